//! What both planners share: the cloud calls they ask for, how they see a
//! tracked operation, the Events they plan, and how an error is written
//! into a tracked operation.

use crate::api::{OperationKind, TrackedOperation, VmSpec};
use crate::compute::messages::{Action, ErrorContext, explain};
use crate::compute::{ComputeError, InstanceSpec, Operation};

/// What a tracked operation looks like now.
#[derive(Clone, Debug)]
pub enum Seen {
    /// Compute Engine's view of it.
    Operation(Operation),
    /// It could not be read.
    Error(ComputeError),
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
}

impl CloudCall {
    /// The request id that ties the call to its tracked operation.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Insert(spec) => &spec.request_id,
            Self::Delete { request_id, .. } => request_id,
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
