//! Claims: a TestRun shard takes a ready VM from a PrebuildPreset's pool.
//! The claim is recorded in the preset's status with an update guarded by
//! the preset's resourceVersion, so two claimers (two TestRuns, or two
//! controller replicas) can never take the same VM: the second write fails
//! with a conflict and the loser reads again and picks another VM.

use std::collections::BTreeMap;

use jiff::Timestamp;
use kube::api::{Api, PostParams};

use crate::api::prebuild::{PrebuildPreset, PresetInstance, PresetInstanceState};

/// Who claimed a pool VM: `namespace/testrun/shard/uid`. The uid makes a
/// TestRun deleted and made again under the same name a different
/// claimer: the new run never inherits the old run's VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// TestRun namespace.
    pub namespace: String,
    /// TestRun name.
    pub testrun: String,
    /// Shard index.
    pub shard: i32,
    /// TestRun uid; `None` in claims written before uids were recorded.
    pub uid: Option<String>,
}

impl Claim {
    /// Reads `namespace/testrun/shard/uid` (or `namespace/testrun/shard`).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('/');
        let (namespace, testrun, shard) = (parts.next()?, parts.next()?, parts.next()?);
        let uid = parts.next().map(str::to_string);
        if parts.next().is_some() || uid.as_deref().is_some_and(str::is_empty) {
            return None;
        }
        Some(Self { namespace: namespace.into(), testrun: testrun.into(), shard: shard.parse().ok()?, uid })
    }

    /// Whether the claim was made by this TestRun (a claim without a uid
    /// belongs to whichever run has the name).
    pub fn is_by(&self, namespace: &str, name: &str, uid: &str) -> bool {
        self.namespace == namespace && self.testrun == name && self.uid.as_deref().is_none_or(|u| u == uid)
    }
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.testrun, self.shard)?;
        match &self.uid {
            Some(uid) => write!(f, "/{uid}"),
            None => Ok(()),
        }
    }
}

/// The pool VM this claim already holds, if any.
pub fn held(preset: &PrebuildPreset, claim: &Claim) -> Option<PresetInstance> {
    held_in(&preset.status.as_ref()?.instances, claim)
}

fn held_in(instances: &[PresetInstance], claim: &Claim) -> Option<PresetInstance> {
    instances
        .iter()
        .find(|i| {
            i.claimed_by.as_deref().and_then(Claim::parse).is_some_and(|c| {
                c.shard == claim.shard
                    && c.is_by(&claim.namespace, &claim.testrun, claim.uid.as_deref().unwrap_or_default())
            })
        })
        .cloned()
}

/// Whether a claim's TestRun is gone: `uid_of` finds the uid of the TestRun
/// of a namespace and name, if one exists. A run made again under the
/// same name is not the claimer.
pub fn is_abandoned(claimed_by: Option<&str>, uid_of: impl Fn(&str, &str) -> Option<String>) -> bool {
    match claimed_by.and_then(Claim::parse) {
        Some(claim) => match uid_of(&claim.namespace, &claim.testrun) {
            Some(uid) => !claim.is_by(&claim.namespace, &claim.testrun, &uid),
            None => true,
        },
        None => true,
    }
}

/// Whether a pool VM may be claimed: ready, of the active version, not
/// claimed, and (when `born_after` is given) made no earlier than that.
pub fn claimable(instance: &PresetInstance, version: &str, born_after: Option<Timestamp>) -> bool {
    instance.state == PresetInstanceState::Ready
        && instance.template_version == version
        && instance.claimed_by.is_none()
        && born_after.is_none_or(|after| instance.created_at.as_ref().is_some_and(|t| t.0 >= after))
}

/// The earliest birth of a pool VM that still lives `needed` (`None`: no
/// pool VM lives that long).
pub fn born_after(now: Timestamp, lifetime: std::time::Duration, needed: std::time::Duration) -> Option<Timestamp> {
    let spare = lifetime.checked_sub(needed)?;
    now.checked_sub(jiff::SignedDuration::try_from(spare).ok()?).ok()
}

/// How many times a claim retries after losing a race.
const CLAIM_TRIES: usize = 8;

/// What a claim took.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The VMs taken in this call, by shard.
    pub taken: BTreeMap<i32, PresetInstance>,
    /// The preset as written, when a claim was written.
    pub written: Option<PrebuildPreset>,
}

/// Claims ready VMs of the preset's active version for each of `claims` that
/// holds none, as far as there are ready VMs, in one status update guarded
/// by the preset's resourceVersion: a claim made meanwhile by anyone else
/// makes the write fail, and the preset is read again and claimed from
/// afresh. `preset` may be a cached copy; a stale one only costs a retry.
///
/// Only VMs made at or after `born_after` are taken (when given): a pool
/// VM lives a fixed time, and a run needs one that outlives its timeout.
pub async fn claim_ready_vms(
    api: &Api<PrebuildPreset>,
    preset: &PrebuildPreset,
    claims: &[Claim],
    born_after: Option<Timestamp>,
) -> Result<Claimed, kube::Error> {
    let name = preset.metadata.name.clone().unwrap_or_default();
    let mut preset = preset.clone();
    for _ in 0..CLAIM_TRIES {
        let version = preset.spec.template_version.clone();
        let wanting: Vec<&Claim> = claims.iter().filter(|c| held(&preset, c).is_none()).collect();
        let Some(status) = preset.status.as_mut() else { return Ok(Claimed::default()) };
        let mut taken = BTreeMap::new();
        for claim in wanting {
            let Some(instance) = status.instances.iter_mut().find(|i| claimable(i, &version, born_after)) else {
                break;
            };
            instance.state = PresetInstanceState::Claimed;
            instance.claimed_by = Some(claim.to_string());
            taken.insert(claim.shard, instance.clone());
            status.ready = (status.ready - 1).max(0);
            status.claimed += 1;
        }
        if taken.is_empty() {
            return Ok(Claimed::default());
        }
        match api.replace_status(&name, &PostParams::default(), &preset).await {
            Ok(written) => return Ok(Claimed { taken, written: Some(written) }),
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(&name).await? {
                Some(fresh) => preset = fresh,
                None => return Ok(Claimed::default()),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(Claimed::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(uid: Option<&str>) -> Claim {
        Claim { namespace: "ci".into(), testrun: "run-1".into(), shard: 7, uid: uid.map(Into::into) }
    }

    #[test]
    fn claims_round_trip_and_reject_junk() {
        for claim in [claim(Some("6b0c3f1e-2a4d-4b8e-9c1f-0d2e3f4a5b6c")), claim(None)] {
            assert_eq!(Claim::parse(&claim.to_string()), Some(claim));
        }
        for bad in ["", "a/b", "a/b/c", "a/b/1/", "a/b/1/u/x", "a/b/-x"] {
            assert_eq!(Claim::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_run_claims_only_a_vm_that_outlives_its_timeout() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use std::time::Duration;
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let hour = Duration::from_secs(3600);
        let vm = |age_hours: i64| PresetInstance {
            name: "vm".into(),
            zone: "z".into(),
            template_version: "v1".into(),
            state: PresetInstanceState::Ready,
            claimed_by: None,
            created_at: Some(Time(now - jiff::SignedDuration::from_hours(age_hours))),
        };
        // A 24 h VM: a run that needs 2 h takes one up to 22 h old.
        let after = born_after(now, 24 * hour, 2 * hour);
        assert!(claimable(&vm(22), "v1", after));
        assert!(!claimable(&vm(23), "v1", after), "it would be deleted under the running test");
        assert!(!claimable(&vm(0), "v2", after), "not the active version");
        assert!(claimable(&vm(23), "v1", None));
        assert_eq!(born_after(now, 24 * hour, 25 * hour), None, "no pool VM lives long enough");
    }

    #[test]
    fn a_run_made_again_under_the_same_name_neither_holds_nor_keeps_the_old_claim() {
        let old = claim(Some("old-uid")).to_string();
        let instances = [PresetInstance {
            name: "vm-1".into(),
            zone: "z".into(),
            template_version: "v1".into(),
            state: PresetInstanceState::Claimed,
            claimed_by: Some(old.clone()),
            created_at: None,
        }];
        assert!(held_in(&instances, &claim(Some("old-uid"))).is_some());
        assert!(held_in(&instances, &claim(Some("new-uid"))).is_none(), "the new run must not inherit the VM");
        let cache = |uid: &'static str| move |_: &str, _: &str| Some(uid.to_string());
        assert!(!is_abandoned(Some(&old), cache("old-uid")));
        assert!(is_abandoned(Some(&old), cache("new-uid")), "the old run is gone, so is its claim");
        assert!(is_abandoned(Some(&old), |_: &str, _: &str| None));
        // A claim written before uids were recorded belongs to the run of its name.
        let legacy = claim(None).to_string();
        assert!(!is_abandoned(Some(&legacy), cache("any")));
        assert!(is_abandoned(Some("junk"), cache("any")));
    }
}
