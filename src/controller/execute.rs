//! The executor steps both controllers share: learn what the tracker knows
//! of an owner's operations, hand it planned calls, write status (guarded),
//! manage the finalizer, publish Events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::object::HasStatus;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::ops::{CloudCall, PlannedEvent, Seen, until};
use super::{Error, FIELD_MANAGER};
use crate::api::{FINALIZER, OperationState, TrackedOperation};
use crate::compute::Compute;
use crate::metrics::{Metrics, ReasonLabels};
use crate::tracker::Tracker;

/// When a planner wants to look again: never (`Duration::MAX`: only a
/// change or a wake brings it back), or after at most five minutes.
pub fn next_look(after: std::time::Duration, operations_open: bool) -> kube::runtime::controller::Action {
    use kube::runtime::controller::Action;
    // An object with operations in its status is woken by the tracker when
    // they end; a look within five minutes is the net under a lost wake.
    if after == std::time::Duration::MAX && !operations_open {
        Action::await_change()
    } else {
        Action::requeue(after.min(std::time::Duration::from_secs(300)))
    }
}

/// Hands the planned calls to the tracker, which makes them in the
/// background and wakes the owner when their operations end.
pub fn submit_calls<C: Compute + Clone>(tracker: &Arc<Tracker<C>>, owner: &str, calls: Vec<CloudCall>) {
    for call in calls {
        tracker.submit(owner, call);
    }
}

/// Has the tracker follow every accepted operation in status it does not
/// know (after a restart), and returns what it knows of every operation.
pub fn observe_operations<C: Compute + Clone>(
    tracker: &Tracker<C>,
    owner: &str,
    operations: &[TrackedOperation],
    now: jiff::Timestamp,
) -> BTreeMap<String, Seen> {
    let known = tracker.seen(operations.iter().map(|op| op.request_id.as_str()));
    for op in operations.iter().filter(|op| op.state == OperationState::Running && !known.contains_key(&op.request_id))
    {
        let age = op.started_at.as_ref().map(|t| until(t.0, now)).unwrap_or_default();
        tracker.adopt(owner, op, age);
    }
    tracker.seen(operations.iter().map(|op| op.request_id.as_str()))
}

/// Writes into the operations of a status about to be written what the
/// tracker learned of them: an intent whose call was accepted is running,
/// under its operation name. (News alone never causes a write.)
pub fn record_accepted<C: Compute + Clone>(tracker: &Tracker<C>, operations: &mut [TrackedOperation]) {
    let names = tracker.operation_names(operations.iter().map(|op| op.request_id.as_str()));
    for op in operations.iter_mut() {
        if let Some(name) = names.get(&op.request_id)
            && op.state == OperationState::Intended
        {
            op.operation = Some(name.clone());
            op.state = OperationState::Running;
            op.tries = op.tries.max(1);
        }
    }
}

/// The request ids a status names (the tracker may forget the others).
pub fn named_request_ids(operations: &[TrackedOperation]) -> BTreeSet<String> {
    operations.iter().map(|op| op.request_id.clone()).collect()
}

/// Replaces an object's status (a PUT of the status subresource), guarded
/// by the resourceVersion `obj` was read at: if anyone wrote since, the
/// write fails with a conflict ([`Error::is_conflict`]) and the caller
/// re-reads and plans again. Returns the object as written.
///
/// A replace rather than a server-side apply: the controller owns the whole
/// status and the guard already orders writers, and kube-apiserver does
/// less work for it (no merge of field sets).
pub async fn write_status<K>(api: &Api<K>, obj: &K, status: &K::Status) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    K::Status: Clone,
{
    let name = obj.name_any();
    let mut body = obj.clone();
    *body.status_mut() = Some(status.clone());
    api.replace_status(&name, &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }, &body)
        .await
        .map_err(|source| Error::WriteStatus { name, source })
}

/// Adds or removes the finalizer with a merge patch guarded by the
/// resourceVersion, so a concurrent change is never overwritten. Returns
/// the object as patched.
pub async fn set_finalizer<K>(api: &Api<K>, obj: &K, present: bool) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut finalizers: Vec<String> = obj.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if present {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": obj.resource_version() } });
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Finalizer { name: obj.name_any(), source })
}

/// Publishes planned Events about an object and counts them by reason; a
/// failure to publish is logged only.
pub async fn publish<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    metrics: &Metrics,
    obj: &K,
    events: Vec<PlannedEvent>,
) {
    let reference = obj.object_ref(&());
    for event in events {
        metrics.events.get_or_create(&ReasonLabels { reason: event.reason.to_string() }).inc();
        let kube_event = Event {
            type_: if event.warning { EventType::Warning } else { EventType::Normal },
            reason: event.reason.to_string(),
            note: Some(event.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&kube_event, &reference).await {
            tracing::warn!(error = %e, reason = event.reason, "publishing an Event failed");
        }
    }
}
