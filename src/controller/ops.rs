//! What both planners share: the cloud calls they ask for, how they see a
//! tracked operation, the Events they plan, and how an error is written
//! into a tracked operation.

use crate::api::{OperationKind, TrackedOperation, VmSpec};
use crate::compute::messages::{Action, ErrorContext, explain};
use crate::compute::{ComputeError, InstanceSpec};

/// What the operation tracker knows of a tracked operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The call is queued or in flight, or its operation has not ended.
    InFlight,
    /// It finished without error (or its effect was verified).
    Done,
    /// The call or the operation failed, or it was lost.
    Failed(ComputeError),
}

/// Whether a tracked operation may still act: recorded and not known to
/// have ended (a failed delete waiting for its retry counts: it will be
/// made again).
pub fn may_still_act(op: &crate::api::TrackedOperation, seen: Option<&Seen>) -> bool {
    use crate::api::OperationState;
    match op.state {
        OperationState::Done => false,
        OperationState::Failed => true,
        OperationState::Intended | OperationState::Running => !matches!(seen, Some(Seen::Done)),
    }
}

/// A call to make after the status (with its intent) is written.
#[derive(Clone, Debug, PartialEq)]
pub enum CloudCall {
    /// Create a VM.
    Insert(Box<InstanceSpec>),
    /// Delete a VM.
    Delete {
        /// Zone.
        zone: String,
        /// Instance name.
        name: String,
        /// Request id.
        request_id: String,
    },
    /// Replace a VM's labels (a claimed pool VM becomes its TestRun's).
    SetLabels {
        /// Zone.
        zone: String,
        /// Instance name.
        name: String,
        /// The new labels.
        labels: std::collections::BTreeMap<String, String>,
        /// The label fingerprint they replace.
        fingerprint: String,
        /// Request id.
        request_id: String,
    },
}

impl CloudCall {
    /// The request id that ties the call to its tracked operation.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Insert(spec) => &spec.request_id,
            Self::Delete { request_id, .. } | Self::SetLabels { request_id, .. } => request_id,
        }
    }

    /// The Compute Engine method it calls.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Insert(_) => "instances.insert",
            Self::Delete { .. } => "instances.delete",
            Self::SetLabels { .. } => "instances.setLabels",
        }
    }
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// A sentence.
    pub note: String,
}

/// The zone after `zone` in the list, if any.
pub fn next_zone(zones: &[String], zone: &str) -> Option<String> {
    let at = zones.iter().position(|z| z == zone)?;
    zones.get(at + 1).cloned()
}

/// An error as kept in a tracked operation's `lastError`: its code, then the
/// plain message users see (never Compute Engine's own text).
pub fn describe(error: &ComputeError, op: &TrackedOperation, vm: &VmSpec) -> String {
    let action = if op.kind == OperationKind::Delete { Action::Delete } else { Action::Create };
    let next = next_zone(&vm.zones, &op.zone);
    let cx = ErrorContext {
        instance: Some(&op.instance),
        zone: Some(&op.zone),
        machine_type: Some(&vm.machine_type),
        next_zone: next.as_deref(),
    };
    format!("{}: {}", error.code(), explain(error, action, cx).message)
}

/// A std duration as a signed one (saturating).
pub fn signed(d: std::time::Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX)
}

/// Time from `now` until `at`; zero when `at` is past.
pub fn until(now: jiff::Timestamp, at: jiff::Timestamp) -> std::time::Duration {
    std::time::Duration::try_from(at.duration_since(now)).unwrap_or(std::time::Duration::ZERO)
}

/// Failed tries after which a delete that keeps failing is reported in a
/// `DeletionFailing` condition (it is still retried, every few minutes).
pub const DELETE_TRIES_BEFORE_ALARM: i32 = 5;

/// How soon a cleanup pass that could not see every zone looks again. Only
/// a list that covers every zone can say no VM is left; the inventory lists
/// again within seconds while a zone is unreachable, and an object with no
/// VM left to change is woken by nothing else.
pub const UNSEEN_ZONE_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// The slowest retry of a failing delete.
pub const DELETE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(300);

/// What to do with a failed delete now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteRetry {
    /// Not yet: look again after this long.
    Wait(std::time::Duration),
    /// The operation was turned into a new intent (a new request id); issue it.
    Reissue,
}

/// Backs off a failed delete (`base`, doubling, up to [`DELETE_RETRY_MAX`])
/// and, when due, turns it into a new intent with a new request id.
pub fn retry_delete(op: &mut TrackedOperation, now: jiff::Timestamp, base: std::time::Duration) -> DeleteRetry {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let tries = u32::try_from(op.tries.max(1)).unwrap_or(1);
    let wait = base.saturating_mul(2u32.saturating_pow(tries.saturating_sub(1).min(16))).min(DELETE_RETRY_MAX);
    let since = op.started_at.as_ref().map(|t| t.0).unwrap_or(now);
    let due = since + signed(wait);
    if now < due {
        return DeleteRetry::Wait(until(now, due));
    }
    op.request_id = retry_request_id(op, &format!("delete/{}/{}", op.zone, op.instance), tries);
    // The new call is one more try.
    op.tries = i32::try_from(tries + 1).unwrap_or(i32::MAX);
    op.state = crate::api::OperationState::Intended;
    op.operation = None;
    op.started_at = Some(Time(now));
    DeleteRetry::Reissue
}

/// Tries after which an insert that keeps failing for a passing reason
/// (HTTP 5xx, rate limits, lost answers) gives up.
pub const INSERT_TRIES: u32 = 5;

/// What to do with an insert that failed for a passing reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertRetry {
    /// Not yet: look again after this long.
    Wait(std::time::Duration),
    /// The operation was turned into a new intent; issue it.
    Reissue,
    /// It failed [`INSERT_TRIES`] times: give up on it.
    GiveUp,
}

/// Backs off an insert that failed for a passing reason (`base` seconds,
/// doubling, up to five minutes) and, when due, turns it into a new intent:
/// with its own request id if its answer was lost, else a new one made
/// from `purpose`.
pub fn retry_insert(op: &mut TrackedOperation, now: jiff::Timestamp, base: u64, purpose: &str) -> InsertRetry {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let tries = u32::try_from(op.tries.max(1)).unwrap_or(1);
    if tries >= INSERT_TRIES {
        return InsertRetry::GiveUp;
    }
    let backoff = std::time::Duration::from_secs(base.saturating_mul(2u64.saturating_pow(tries.min(6))))
        .min(std::time::Duration::from_secs(300));
    let since = op.started_at.as_ref().map(|t| t.0).unwrap_or(now);
    let due = since + signed(backoff);
    if now < due {
        return InsertRetry::Wait(until(now, due));
    }
    op.request_id = retry_request_id(op, purpose, tries);
    op.tries = i32::try_from(tries + 1).unwrap_or(i32::MAX);
    op.state = crate::api::OperationState::Intended;
    op.operation = None;
    op.started_at = Some(Time(now));
    InsertRetry::Reissue
}

/// The deletes that have failed [`DELETE_TRIES_BEFORE_ALARM`] times or more.
pub fn failing_deletes(operations: &[TrackedOperation]) -> impl Iterator<Item = &TrackedOperation> {
    operations.iter().filter(|op| {
        op.kind == OperationKind::Delete && op.tries >= DELETE_TRIES_BEFORE_ALARM && op.last_error.is_some()
    })
}

/// The `DeletionFailing` condition from the tracked operations: True while a
/// delete has failed [`DELETE_TRIES_BEFORE_ALARM`] times or more. Returns
/// the message when it turned True in this call.
pub fn deletion_condition(
    conditions: &mut Vec<crate::api::Condition>,
    operations: &[TrackedOperation],
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Option<String> {
    use crate::api::ConditionStatus;
    use crate::controller::conditions;
    let failing: Vec<&TrackedOperation> = failing_deletes(operations).collect();
    let was = conditions::is_true(conditions, "DeletionFailing");
    match failing.first() {
        Some(op) => {
            let message = format!(
                "deleting VM {} in {} failed {} times ({}); still retrying every {} minutes{}",
                op.instance,
                op.zone,
                op.tries,
                op.last_error.as_deref().unwrap_or_default(),
                DELETE_RETRY_MAX.as_secs() / 60,
                if failing.len() > 1 { format!("; {} VMs in all", failing.len()) } else { String::new() },
            );
            conditions::set(
                conditions,
                "DeletionFailing",
                ConditionStatus::True,
                "DeleteRetrying",
                &message,
                generation,
                now,
            );
            (!was).then_some(message)
        }
        None => {
            if was {
                conditions::set(
                    conditions,
                    "DeletionFailing",
                    ConditionStatus::False,
                    "DeletesSucceeded",
                    "",
                    generation,
                    now,
                );
            }
            None
        }
    }
}

/// A new intent: an operation recorded before its call is made.
pub fn intent(
    kind: OperationKind,
    instance: &str,
    zone: &str,
    request_id: &str,
    now: jiff::Timestamp,
) -> TrackedOperation {
    TrackedOperation {
        kind,
        instance: instance.to_string(),
        zone: zone.to_string(),
        request_id: request_id.to_string(),
        operation: None,
        state: crate::api::OperationState::Intended,
        tries: 0,
        started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        last_error: None,
        answer_lost: false,
    }
}

/// The request id for the next try of a failed call: the same one when the
/// last call's answer was lost (it may have been carried out, and Compute
/// Engine acts on a request id at most once), else a new one (the old one
/// would only replay the failure).
pub fn retry_request_id(op: &TrackedOperation, purpose: &str, tries: u32) -> String {
    if op.answer_lost { op.request_id.clone() } else { crate::compute::naming::request_id(purpose, tries) }
}

/// Records a failure the tracker saw on an operation.
pub fn record_failure(op: &mut TrackedOperation, error: &ComputeError, vm: &VmSpec) {
    op.state = crate::api::OperationState::Failed;
    op.last_error = Some(describe(error, op, vm));
    op.answer_lost = error.answer_lost();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OperationState;
    use crate::compute::ErrorCode;

    fn failed_delete(error: &ComputeError) -> TrackedOperation {
        let now = jiff::Timestamp::UNIX_EPOCH;
        let mut op = intent(OperationKind::Delete, "vm-1", "us-central1-a", "rid-0", now);
        op.tries = 1;
        let vm = VmSpec {
            zones: vec!["us-central1-a".into()],
            machine_type: "e2-small".into(),
            image: "img".into(),
            ..VmSpec::default()
        };
        record_failure(&mut op, error, &vm);
        op
    }

    #[test]
    fn a_call_whose_answer_was_lost_is_made_again_with_its_request_id_and_others_with_a_new_one() {
        let later = jiff::Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(3600);
        let base = std::time::Duration::from_secs(1);
        let unanswered = [
            ComputeError::Transport { call: "instances.delete", message: "connection reset".into() },
            ComputeError::Api {
                call: "instances.delete",
                code: ErrorCode::Unavailable,
                status: 503,
                message: String::new(),
            },
            // No answer within the client's deadline.
            ComputeError::Api {
                call: "instances.delete",
                code: ErrorCode::Timeout,
                status: 408,
                message: String::new(),
            },
        ];
        for error in unanswered {
            let mut op = failed_delete(&error);
            assert!(op.answer_lost, "{error}");
            assert_eq!(retry_delete(&mut op, later, base), DeleteRetry::Reissue);
            assert_eq!((op.request_id.as_str(), op.state, op.tries), ("rid-0", OperationState::Intended, 2), "{error}");
        }
        let answered = [
            ComputeError::Api {
                call: "instances.delete",
                code: ErrorCode::RateLimitExceeded,
                status: 429,
                message: String::new(),
            },
            ComputeError::OperationFailed {
                operation: "op-1".into(),
                code: ErrorCode::Unavailable,
                message: String::new(),
            },
        ];
        for error in answered {
            let mut op = failed_delete(&error);
            assert!(!op.answer_lost, "{error}");
            assert_eq!(retry_delete(&mut op, later, base), DeleteRetry::Reissue);
            assert_ne!(op.request_id, "rid-0", "{error}: the old id would replay the failure");
        }
    }
}
