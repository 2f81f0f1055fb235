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
}
