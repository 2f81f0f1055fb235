//! The executor steps both controllers share: list an owner's VMs, read its
//! tracked operations, make planned calls and record what they returned,
//! write status, manage the finalizer, publish Events.

use std::collections::BTreeMap;

use futures::future::join_all;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::ops::{CloudCall, PlannedEvent, Seen, describe};
use super::{Error, FIELD_MANAGER};
use crate::api::{FINALIZER, OperationKind, OperationState, TrackedOperation, VmSpec};
use crate::compute::naming::{LABEL_OWNER_UID, installation_selector, label_value};
use crate::compute::{Compute, Instance, OperationStatus};
use crate::metrics::{Metrics, ReasonLabels};

/// Every VM of this installation that carries the owner's uid.
pub async fn owned_vms<C: Compute>(compute: &C, installation: &str, uid: &str) -> Result<Vec<Instance>, Error> {
    let mut selector = installation_selector(installation);
    selector.insert(LABEL_OWNER_UID.to_string(), label_value(uid));
    compute.list_by_labels(&selector).await.map_err(Error::ListVms)
}

/// The state of every tracked operation that is running, by request id.
pub async fn read_operations<C: Compute>(compute: &C, operations: &[TrackedOperation]) -> BTreeMap<String, Seen> {
    let running = operations
        .iter()
        .filter(|op| op.state == OperationState::Running)
        .filter_map(|op| Some((op.request_id.clone(), op.zone.clone(), op.operation.clone()?)));
    join_all(running.map(|(rid, zone, op)| async move {
        let state = match compute.get_operation(&zone, &op).await {
            Ok(op) => Seen::Operation(op),
            Err(e) => Seen::Error(e),
        };
        (rid, state)
    }))
    .await
    .into_iter()
    .collect()
}

/// Makes the calls (concurrently) and records in `operations` what each
/// returned: the operation name, or the error in plain words.
pub async fn make_calls<C: Compute>(
    compute: &C,
    calls: &[CloudCall],
    operations: &mut [TrackedOperation],
    vm: &VmSpec,
) {
    let results = join_all(calls.iter().map(|call| async move {
        let result = match call {
            CloudCall::Insert(spec) => compute.insert(spec).await,
            CloudCall::Delete { zone, name, request_id } => compute.delete(zone, name, request_id).await,
        };
        (call.request_id().to_string(), result)
    }))
    .await;
    for (request_id, result) in results {
        let Some(op) = operations.iter_mut().find(|o| o.request_id == request_id) else { continue };
        op.tries += 1;
        match result {
            Ok(returned) => {
                op.operation = Some(returned.name.clone());
                match (&returned.status, &returned.error) {
                    (_, Some(error)) => {
                        op.state = OperationState::Failed;
                        op.last_error = Some(describe(error, op, vm));
                    }
                    (OperationStatus::Done, None) => op.state = OperationState::Done,
                    _ => op.state = OperationState::Running,
                }
            }
            Err(error) if error.is_not_found() && op.kind == OperationKind::Delete => op.state = OperationState::Done,
            Err(error) => {
                tracing::warn!(instance = %op.instance, zone = %op.zone, error = %error, "cloud call failed");
                op.state = OperationState::Failed;
                op.last_error = Some(describe(&error, op, vm));
            }
        }
    }
}

/// Writes an object's status with server-side apply on the status
/// subresource. With `guard`, the write carries the resourceVersion `obj`
/// was read at and fails with a conflict if anyone wrote since (a claim).
///
/// Returns the resourceVersion after the write.
pub async fn write_status<K, S>(api: &Api<K>, obj: &K, status: &S, guard: bool) -> Result<Option<String>, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let mut patch = json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status });
    if guard {
        patch["metadata"] = json!({ "resourceVersion": obj.resource_version() });
    }
    api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(|written| written.resource_version())
        .map_err(|source| Error::WriteStatus { name: obj.name_any(), source })
}

/// Adds or removes the finalizer with a merge patch guarded by the
/// resourceVersion, so a concurrent change is never overwritten.
pub async fn set_finalizer<K>(api: &Api<K>, obj: &K, present: bool) -> Result<(), Error>
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
        .map(|_| ())
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
