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
use std::collections::BTreeSet;

use crate::api::FINALIZER;
use crate::api::prebuild::{PrebuildPreset, PresetInstanceState};
use crate::api::testrun::TestRun;
use crate::compute::Compute;
use crate::controller::claims::Claim;
use crate::controller::execute::{make_calls, owned_vms, publish, read_operations, set_finalizer, write_status};
use crate::controller::{Context, Error};

/// Reconciles one PrebuildPreset.
pub async fn reconcile<C: Compute>(preset: Arc<PrebuildPreset>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", prebuildpreset = %preset.name_any(), namespace = %preset.namespace().unwrap_or_default());
    async move {
        let key = format!("preset/{}", preset.name_any());
        let result = reconcile_inner(&preset, &ctx).await;
        ctx.backoff.record(&key, result.is_ok());
        ctx.metrics.reconciled("prebuildpreset", result.is_ok());
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
    let abandoned = abandoned_claims(ctx, preset).await?;
    let observed = PoolObserved {
        preset,
        now: Timestamp::now(),
        vms: &vms,
        operations: &operations,
        registered: &registered,
        abandoned_claims: &abandoned,
        settings: &ctx.settings,
        key: &ctx.key,
    };
    let plan = if deleting { plan_cleanup(&observed) } else { plan(&observed) };
    let (done, requeue) = (plan.cleanup_done, plan.requeue_after);
    record_metrics(ctx, preset, &plan, deleting && done);
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
    publish(&ctx.recorder, &ctx.metrics, preset, events).await;
    if deleting && done {
        set_finalizer(&api, preset, false).await?;
        ctx.pool.forget(&uid);
        tracing::info!("every pool VM deleted; finalizer removed");
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(requeue.min(std::time::Duration::from_secs(300))))
}

/// Claimed pool VMs whose claiming TestRun no longer exists.
async fn abandoned_claims<C: Compute>(ctx: &Context<C>, preset: &PrebuildPreset) -> Result<BTreeSet<String>, Error> {
    let mut abandoned = BTreeSet::new();
    let claimed = preset.status.iter().flat_map(|s| &s.instances).filter(|i| i.state == PresetInstanceState::Claimed);
    for instance in claimed {
        let Some(claim) = instance.claimed_by.as_deref().and_then(Claim::parse) else {
            abandoned.insert(instance.name.clone());
            continue;
        };
        let runs: Api<TestRun> = Api::namespaced(ctx.client.clone(), &claim.namespace);
        let run = runs.get_opt(&claim.testrun).await.map_err(|source| Error::ReadClaimer {
            testrun: format!("{}/{}", claim.namespace, claim.testrun),
            source,
        })?;
        if run.is_none() {
            abandoned.insert(instance.name.clone());
        }
    }
    Ok(abandoned)
}

fn record_metrics<C: Compute>(ctx: &Context<C>, preset: &PrebuildPreset, plan: &PoolPlan, gone: bool) {
    use crate::metrics::{PoolStateLabels, PresetLabels, ReasonLabels};
    let namespace = preset.namespace().unwrap_or_default();
    let name = preset.name_any();
    let labels = PresetLabels { namespace: namespace.clone(), preset: name.clone() };
    let s = &plan.status;
    let deleting =
        s.instances.iter().filter(|i| i.state == crate::api::prebuild::PresetInstanceState::Deleting).count();
    for (state, count) in [
        ("ready", i64::from(s.ready)),
        ("provisioning", i64::from(s.provisioning)),
        ("claimed", i64::from(s.claimed)),
        ("outdated", i64::from(s.outdated)),
        ("deleting", i64::try_from(deleting).unwrap_or(i64::MAX)),
    ] {
        let state_labels = PoolStateLabels { namespace: namespace.clone(), preset: name.clone(), state: state.into() };
        ctx.metrics.pool_vms.get_or_create(&state_labels).set(if gone { 0 } else { count });
    }
    ctx.metrics.pending_jobs.get_or_create(&labels).set(if gone { 0 } else { i64::from(s.pending) });
    if plan.cancelled > 0 {
        ctx.metrics.jobs_cancelled.get_or_create(&labels).inc_by(u64::from(plan.cancelled));
    }
    for reason in &plan.failures {
        ctx.metrics.provision_failures.get_or_create(&ReasonLabels { reason: reason.clone() }).inc();
    }
}
