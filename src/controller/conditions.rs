//! Conditions as Kubernetes API conventions want them: one per type, and
//! `lastTransitionTime` changes only when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Condition, ConditionStatus};

/// Sets a condition in `conditions`, keeping its transition time when its
/// status did not change.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: jiff::Timestamp,
) {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = reason.to_string();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: Time(now),
            observed_generation: generation,
        }),
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
        set(&mut c, "Ready", ConditionStatus::False, "Pending", "waiting", Some(1), t0);
        set(&mut c, "Ready", ConditionStatus::False, "Provisioning", "creating VMs", Some(1), t1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, Time(t0));
        assert_eq!(c[0].reason, "Provisioning");
        set(&mut c, "Ready", ConditionStatus::True, "Succeeded", "done", Some(2), t1);
        assert_eq!(c[0].last_transition_time, Time(t1));
        assert_eq!(get(&c, "Ready").map(|c| c.observed_generation), Some(Some(2)));
    }
}
