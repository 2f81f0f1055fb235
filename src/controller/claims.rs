//! Claims: a TestRun shard takes a ready VM from a PrebuildPreset's pool.
//! The claim is recorded in the preset's status with an update guarded by
//! the preset's resourceVersion, so two claimers (two TestRuns, or two
//! controller replicas) can never take the same VM: the second write fails
//! with a conflict and the loser reads again and picks another VM.

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

/// Claims a ready VM of the preset's active version for `claim` (or returns
/// the one it holds). `Ok(None)`: no ready VM.
pub async fn claim_ready_vm(
    api: &Api<PrebuildPreset>,
    preset_name: &str,
    claim: &Claim,
) -> Result<Option<PresetInstance>, kube::Error> {
    for _ in 0..CLAIM_TRIES {
        let Some(mut preset) = api.get_opt(preset_name).await? else { return Ok(None) };
        if let Some(instance) = held(&preset, claim) {
            return Ok(Some(instance));
        }
        let version = preset.spec.template_version.clone();
        let Some(status) = preset.status.as_mut() else { return Ok(None) };
        let Some(instance) = status
            .instances
            .iter_mut()
            .find(|i| i.state == PresetInstanceState::Ready && i.template_version == version && i.claimed_by.is_none())
        else {
            return Ok(None);
        };
        instance.state = PresetInstanceState::Claimed;
        instance.claimed_by = Some(claim.to_string());
        let taken = instance.clone();
        status.ready = (status.ready - 1).max(0);
        status.claimed += 1;
        // The object carries the resourceVersion it was read at: a claim
        // made meanwhile by anyone else makes this write fail.
        match api.replace_status(preset_name, &PostParams::default(), &preset).await {
            Ok(_) => return Ok(Some(taken)),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
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
