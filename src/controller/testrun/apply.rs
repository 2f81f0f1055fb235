//! Carries out a TestRun plan: observe (list the run's VMs, read its
//! operations, read the lease book), plan, write the status with every
//! intent, make the cloud calls, write what they returned, publish Events.
//! No step waits for a cloud operation to finish.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument as _;

use super::plan::{CloudCall, Observed, Plan, Seen, describe, plan, plan_cleanup};
use crate::api::testrun::{TestRun, TestRunStatus};
use crate::api::{FINALIZER, OperationState};
use crate::compute::naming::{LABEL_OWNER_UID, installation_selector};
use crate::compute::{Compute, OperationStatus};
use crate::controller::{Context, Error, FIELD_MANAGER};

/// Reconciles one TestRun.
pub async fn reconcile<C: Compute>(run: Arc<TestRun>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    let span =
        tracing::info_span!("reconcile", testrun = %run.name_any(), namespace = %run.namespace().unwrap_or_default());
    async move {
        let result = reconcile_inner(&run, &ctx).await;
        ctx.backoff.record(&run.name_any(), result.is_ok());
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_inner<C: Compute>(run: &TestRun, ctx: &Context<C>) -> Result<Action, Error> {
    let namespace = run.namespace().unwrap_or_default();
    let api: Api<TestRun> = Api::namespaced(ctx.client.clone(), &namespace);
    let has_finalizer = run.finalizers().iter().any(|f| f == FINALIZER);

    if run.meta().deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        let (plan, _) = observe_and_plan(run, ctx, true).await?;
        let done = plan.cleanup_done;
        let requeue = plan.requeue_after;
        execute(run, ctx, &api, plan).await?;
        if done {
            set_finalizer(&api, run, false).await?;
            ctx.book.forget(&run.uid().unwrap_or_default());
            tracing::info!("every VM deleted; finalizer removed");
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(requeue));
    }
    if !has_finalizer {
        // The finalizer goes on before any VM can exist.
        set_finalizer(&api, run, true).await?;
        return Ok(Action::await_change());
    }
    let (plan, _) = observe_and_plan(run, ctx, false).await?;
    let requeue = plan.requeue_after;
    execute(run, ctx, &api, plan).await?;
    Ok(if requeue == Duration::MAX {
        Action::await_change()
    } else {
        Action::requeue(requeue.min(Duration::from_secs(300)))
    })
}

async fn observe_and_plan<C: Compute>(run: &TestRun, ctx: &Context<C>, cleanup: bool) -> Result<(Plan, ()), Error> {
    let uid = run.uid().unwrap_or_default();
    let mut selector = installation_selector(&ctx.settings.installation);
    selector.insert(LABEL_OWNER_UID.to_string(), crate::compute::naming::label_value(&uid));
    let vms = ctx.compute.list_by_labels(&selector).await.map_err(Error::ListVms)?;

    let tracked: Vec<(String, String, String)> = run
        .status
        .as_ref()
        .map(|s| {
            s.operations
                .iter()
                .filter(|op| op.state == OperationState::Running)
                .filter_map(|op| Some((op.request_id.clone(), op.zone.clone(), op.operation.clone()?)))
                .collect()
        })
        .unwrap_or_default();
    let seen = join_all(tracked.into_iter().map(|(rid, zone, op)| async move {
        let state = match ctx.compute.get_operation(&zone, &op).await {
            Ok(op) => Seen::Operation(op),
            Err(e) => Seen::Error(e),
        };
        (rid, state)
    }))
    .await;
    let operations: BTreeMap<String, Seen> = seen.into_iter().collect();
    let heard = ctx.book.snapshot(&uid);
    let machine = run.spec.vm.as_ref().map(|v| v.machine_type.clone()).unwrap_or_default();
    let exhausted = ctx.exhausted_zones.current(&machine);
    let observed = Observed {
        run,
        now: Timestamp::now(),
        vms: &vms,
        operations: &operations,
        heard: &heard,
        exhausted_zones: &exhausted,
        settings: &ctx.settings,
        key: &ctx.key,
    };
    let plan = if cleanup { plan_cleanup(&observed) } else { plan(&observed) };
    for zone in &plan.exhausted {
        ctx.exhausted_zones.mark(zone, &machine);
    }
    Ok((plan, ()))
}

/// Writes the plan's status (intents first), makes its calls, writes what
/// they returned and publishes its Events.
async fn execute<C: Compute>(run: &TestRun, ctx: &Context<C>, api: &Api<TestRun>, plan: Plan) -> Result<(), Error> {
    let Plan { mut status, calls, events, .. } = plan;
    if run.status.as_ref() != Some(&status) {
        write_status(api, run, &status).await?;
    }
    if !calls.is_empty() {
        let vm = run.spec.vm.clone().unwrap_or_default();
        let results = join_all(calls.iter().map(|call| async move {
            let result = match call {
                CloudCall::Insert(spec) => ctx.compute.insert(spec).await,
                CloudCall::Delete { zone, name, request_id } => ctx.compute.delete(zone, name, request_id).await,
            };
            (call.request_id().to_string(), result)
        }))
        .await;
        let before = status.clone();
        for (request_id, result) in results {
            let Some(op) = status.operations.iter_mut().find(|o| o.request_id == request_id) else { continue };
            op.tries += 1;
            match result {
                Ok(returned) => {
                    op.operation = Some(returned.name.clone());
                    match (&returned.status, &returned.error) {
                        (_, Some(error)) => {
                            op.state = OperationState::Failed;
                            op.last_error = Some(describe(error, op, &vm));
                        }
                        (OperationStatus::Done, None) => op.state = OperationState::Done,
                        _ => op.state = OperationState::Running,
                    }
                }
                Err(error) if error.is_not_found() && op.kind == crate::api::OperationKind::Delete => {
                    op.state = OperationState::Done;
                }
                Err(error) => {
                    tracing::warn!(instance = %op.instance, zone = %op.zone, error = %error, "cloud call failed");
                    op.state = OperationState::Failed;
                    op.last_error = Some(describe(&error, op, &vm));
                }
            }
        }
        if status != before {
            write_status(api, run, &status).await?;
        }
    }
    let reference = run.object_ref(&());
    for event in events {
        let published = ctx
            .recorder
            .publish(
                &Event {
                    type_: if event.warning { EventType::Warning } else { EventType::Normal },
                    reason: event.reason.to_string(),
                    note: Some(event.note.clone()),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &reference,
            )
            .await;
        if let Err(e) = published {
            tracing::warn!(error = %e, reason = event.reason, "publishing an Event failed");
        }
    }
    Ok(())
}

async fn write_status(api: &Api<TestRun>, run: &TestRun, status: &TestRunStatus) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": TestRun::api_version(&()),
        "kind": TestRun::kind(&()),
        "status": status,
    });
    api.patch_status(&run.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::WriteStatus { name: run.name_any(), source })
}

/// Adds or removes the finalizer with a merge patch guarded by the
/// resourceVersion, so a concurrent change is never overwritten.
async fn set_finalizer(api: &Api<TestRun>, run: &TestRun, present: bool) -> Result<(), Error> {
    let mut finalizers: Vec<String> = run.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if present {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = json!({
        "metadata": { "finalizers": finalizers, "resourceVersion": run.resource_version() },
    });
    api.patch(&run.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::Finalizer { name: run.name_any(), source })
}
