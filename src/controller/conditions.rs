//! Conditions as Kubernetes API conventions want them: one per type, and
//! `lastTransitionTime` changes only when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Condition, ConditionStatus};

/// Sets a condition in `conditions`, keeping its transition time when its
/// status did not change. Returns whether it is news: the condition is new,
/// or its status or message changed (what an Event is worth).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> bool {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let news = existing.status != status || existing.message != message;
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = reason.to_string();
            existing.message = message;
            existing.observed_generation = generation;
            news
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message,
                last_transition_time: Time(now),
                observed_generation: generation,
            });
            true
        }
    }
}

/// The condition of a type, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Where an object stands for kstatus (Flux, kpt, Config Sync and
/// cli-utils read `Reconciling` and `Stalled`): still working toward its
/// spec, unable to get there without someone acting, or there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The controller is still working toward the spec.
    Reconciling { reason: &'static str, message: String },
    /// The spec cannot be reached (or the run ended in failure) until
    /// someone acts.
    Stalled { reason: &'static str, message: String },
    /// The spec is reached: nothing left to do.
    Current { reason: &'static str },
}

/// Sets `Reconciling` and `Stalled`, both always present, at most one True,
/// in the shape kstatus reads.
pub fn set_progress(
    conditions: &mut Vec<Condition>,
    progress: &Progress,
    generation: Option<i64>,
    now: jiff::Timestamp,
) {
    let (reconciling, stalled) = match progress {
        Progress::Reconciling { reason, message } => {
            ((ConditionStatus::True, *reason, message.as_str()), (ConditionStatus::False, *reason, ""))
        }
        Progress::Stalled { reason, message } => {
            ((ConditionStatus::False, *reason, ""), (ConditionStatus::True, *reason, message.as_str()))
        }
        Progress::Current { reason } => ((ConditionStatus::False, *reason, ""), (ConditionStatus::False, *reason, "")),
    };
    set(conditions, "Reconciling", reconciling.0, reconciling.1, reconciling.2, generation, now);
    set(conditions, "Stalled", stalled.0, stalled.1, stalled.2, generation, now);
}

/// Whether a condition of this type is set and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0 = jiff::Timestamp::UNIX_EPOCH;
        let t1 = t0 + jiff::SignedDuration::from_secs(60);
        let mut c = Vec::new();
        assert!(set(&mut c, "Ready", ConditionStatus::False, "Pending", "waiting", Some(1), t0), "new");
        assert!(
            !set(&mut c, "Ready", ConditionStatus::False, "Other", "waiting", Some(1), t0),
            "same status and message"
        );
        assert!(
            set(&mut c, "Ready", ConditionStatus::False, "Provisioning", "creating VMs", Some(1), t1),
            "new message"
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, Time(t0));
        assert_eq!(c[0].reason, "Provisioning");
        assert!(set(&mut c, "Ready", ConditionStatus::True, "Succeeded", "done", Some(2), t1), "new status");
        assert_eq!(c[0].last_transition_time, Time(t1));
        assert_eq!(get(&c, "Ready").map(|c| c.observed_generation), Some(Some(2)));
    }

    #[test]
    fn progress_sets_both_conditions_with_at_most_one_true() {
        let t0 = jiff::Timestamp::UNIX_EPOCH;
        let mut c = Vec::new();
        let cases = [
            Progress::Reconciling { reason: "Running", message: "2 shards".into() },
            Progress::Stalled { reason: "Failed", message: "shard 1 exited with code 1".into() },
            Progress::Current { reason: "Succeeded" },
        ];
        for (case, want) in cases.iter().zip([(true, false), (false, true), (false, false)]) {
            set_progress(&mut c, case, Some(3), t0);
            assert_eq!(c.len(), 2, "{case:?}");
            assert_eq!((is_true(&c, "Reconciling"), is_true(&c, "Stalled")), want, "{case:?}");
        }
        set_progress(&mut c, &cases[1], Some(3), t0);
        let stalled = get(&c, "Stalled").expect("Stalled");
        assert_eq!((stalled.reason.as_str(), stalled.message.as_str()), ("Failed", "shard 1 exited with code 1"));
    }
}
