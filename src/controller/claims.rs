//! Claims: a TestRun shard takes a ready VM from a PrebuildPreset's pool.
//! The claim is recorded in the preset's status with an update guarded by
//! the preset's resourceVersion, so two claimers (two TestRuns, or two
//! controller replicas) can never take the same VM: the second write fails
//! with a conflict and the loser reads again and picks another VM.

use std::collections::BTreeMap;

use kube::api::{Api, PostParams};

use crate::api::prebuild::{PrebuildPreset, PresetInstance, PresetInstanceState};

/// Who claimed a pool VM: `namespace/testrun/shard`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// TestRun namespace.
    pub namespace: String,
    /// TestRun name.
    pub testrun: String,
    /// Shard index.
    pub shard: i32,
}

impl Claim {
    /// Reads `namespace/testrun/shard`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('/');
        let (namespace, testrun, shard) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some(Self { namespace: namespace.into(), testrun: testrun.into(), shard: shard.parse().ok()? })
    }
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.testrun, self.shard)
    }
}

/// The pool VM this claim already holds, if any.
pub fn held(preset: &PrebuildPreset, claim: &Claim) -> Option<PresetInstance> {
    let text = claim.to_string();
    preset.status.as_ref()?.instances.iter().find(|i| i.claimed_by.as_deref() == Some(text.as_str())).cloned()
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
pub async fn claim_ready_vms(
    api: &Api<PrebuildPreset>,
    preset: &PrebuildPreset,
    claims: &[Claim],
) -> Result<Claimed, kube::Error> {
    let name = preset.metadata.name.clone().unwrap_or_default();
    let mut preset = preset.clone();
    for _ in 0..CLAIM_TRIES {
        let version = preset.spec.template_version.clone();
        let wanting: Vec<&Claim> = claims.iter().filter(|c| held(&preset, c).is_none()).collect();
        let Some(status) = preset.status.as_mut() else { return Ok(Claimed::default()) };
        let mut taken = BTreeMap::new();
        for claim in wanting {
            let Some(instance) = status.instances.iter_mut().find(|i| {
                i.state == PresetInstanceState::Ready && i.template_version == version && i.claimed_by.is_none()
            }) else {
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

    #[test]
    fn claims_round_trip_and_reject_junk() {
        let claim = Claim { namespace: "ci".into(), testrun: "run-1".into(), shard: 7 };
        assert_eq!(Claim::parse(&claim.to_string()), Some(claim));
        for bad in ["", "a/b", "a/b/c", "a/b/1/2", "a/b/-x"] {
            assert_eq!(Claim::parse(bad), None, "{bad}");
        }
    }
}
