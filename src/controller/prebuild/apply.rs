//! Carries out a pool plan: observe (list the preset's VMs, read its
//! operations, read which pool agents registered), plan, write the status
//! with every intent, make the calls, write what they returned, Events.

use std::sync::Arc;

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::Instrument as _;

use super::plan::{PoolObserved, PoolPlan, plan, plan_cleanup};
use crate::api::FINALIZER;
use crate::api::prebuild::PrebuildPreset;
use crate::compute::Compute;
use crate::controller::execute::{make_calls, owned_vms, publish, read_operations, set_finalizer, write_status};
use crate::controller::{Context, Error};

/// Reconciles one PrebuildPreset.
pub async fn reconcile<C: Compute>(preset: Arc<PrebuildPreset>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", prebuildpreset = %preset.name_any(), namespace = %preset.namespace().unwrap_or_default());
    async move {
        let key = format!("preset/{}", preset.name_any());
        let result = reconcile_inner(&preset, &ctx).await;
        ctx.backoff.record(&key, result.is_ok());
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_inner<C: Compute>(preset: &PrebuildPreset, ctx: &Context<C>) -> Result<Action, Error> {
    let api: Api<PrebuildPreset> = Api::namespaced(ctx.client.clone(), &preset.namespace().unwrap_or_default());
    let has_finalizer = preset.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = preset.meta().deletion_timestamp.is_some();
    if deleting && !has_finalizer {
        return Ok(Action::await_change());
    }
    if !deleting && !has_finalizer {
        set_finalizer(&api, preset, true).await?;
        return Ok(Action::await_change());
    }
    let uid = preset.uid().unwrap_or_default();
    let vms = owned_vms(&ctx.compute, &ctx.settings.installation, &uid).await?;
    let tracked = preset.status.as_ref().map(|s| s.operations.clone()).unwrap_or_default();
    let operations = read_operations(&ctx.compute, &tracked).await;
    let registered = ctx.pool.snapshot(&uid);
    let observed = PoolObserved {
        preset,
        now: Timestamp::now(),
        vms: &vms,
        operations: &operations,
        registered: &registered,
        settings: &ctx.settings,
        key: &ctx.key,
    };
    let plan = if deleting { plan_cleanup(&observed) } else { plan(&observed) };
    let (done, requeue) = (plan.cleanup_done, plan.requeue_after);
    let PoolPlan { mut status, calls, events, .. } = plan;
    let mut current = preset.clone();
    if preset.status.as_ref() != Some(&status) {
        current.metadata.resource_version = write_status(&api, &current, &status, true).await?;
    }
    if !calls.is_empty() {
        let before = status.clone();
        make_calls(&ctx.compute, &calls, &mut status.operations, &preset.spec.vm).await;
        if status != before {
            write_status(&api, &current, &status, true).await?;
        }
    }
    publish(&ctx.recorder, preset, events).await;
    if deleting && done {
        set_finalizer(&api, preset, false).await?;
        ctx.pool.forget(&uid);
        tracing::info!("every pool VM deleted; finalizer removed");
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(requeue.min(std::time::Duration::from_secs(300))))
}
