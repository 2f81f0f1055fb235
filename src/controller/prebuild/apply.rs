//! Carries out a pool plan: observe (the preset's VMs from the inventory,
//! its operations from the tracker, which pool agents registered, which
//! claims were abandoned, from the TestRun cache), plan, write the status
//! (guarded; a conflict, e.g. a claim, means read again and plan again),
//! hand the calls to the tracker, publish Events.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::Instrument as _;

use super::plan::{PoolObserved, PoolPlan, plan, plan_cleanup};
use crate::api::FINALIZER;
use crate::api::prebuild::{PrebuildPreset, PresetInstanceState};
use crate::api::testrun::TestRun;
use crate::compute::Compute;
use crate::compute::naming::label_value;
use crate::controller::claims::is_abandoned;
use crate::controller::execute::{
    named_request_ids, next_look, observe_operations, publish, record_accepted, set_finalizer, submit_calls,
    write_status,
};
use crate::controller::slots::Lane;
use crate::controller::wake::Owner;
use crate::controller::{CONFLICT_REQUEUE, Context, Error, conflict_is_no_failure};

/// Times a reconcile re-reads and plans again after a conflicting write.
const CONFLICT_RETRIES: usize = 4;

/// Reconciles one PrebuildPreset.
pub async fn reconcile<C: Compute + Clone>(preset: Arc<PrebuildPreset>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    // Waiting for a slot is a small future; the reconcile itself is boxed.
    let lane = if preset.status.is_none() { Lane::Launch } else { Lane::Follow };
    // Closed on shutdown: the process is going, so is this reconcile.
    let Some(_slot) = ctx.preset_slots.acquire(lane).await else {
        return Ok(Action::await_change());
    };
    // The cache may have moved on while this waited; an object gone from
    // it is gone from the cluster (kube-runtime reconciles only cached ones).
    let Some(preset) = ctx.presets.get(&ObjectRef::from_obj(preset.as_ref())) else {
        return Ok(Action::await_change());
    };
    Box::pin(reconcile_now(preset, ctx.clone())).await
}

async fn reconcile_now<C: Compute + Clone>(preset: Arc<PrebuildPreset>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", prebuildpreset = %preset.name_any(), namespace = %preset.namespace().unwrap_or_default());
    async move {
        // A preset reconcile first waits for the TestRun cache; that wait
        // is not a wedge.
        crate::controller::cache_ready(&ctx.runs).await;
        let _under_way = ctx.metrics.liveness.begin("prebuildpreset");
        let started = std::time::Instant::now();
        let key = format!("preset/{}", preset.uid().unwrap_or_default());
        let result = conflict_is_no_failure(reconcile_inner(preset, &ctx).await);
        ctx.backoff.record(&key, result.is_ok());
        ctx.metrics.reconciled("prebuildpreset", result.is_ok(), started.elapsed());
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_inner<C: Compute + Clone>(cached: Arc<PrebuildPreset>, ctx: &Context<C>) -> Result<Action, Error> {
    let api: Api<PrebuildPreset> = Api::namespaced(ctx.client.clone(), &cached.namespace().unwrap_or_default());
    let uid = cached.uid().unwrap_or_default();
    let owner = label_value(&uid);
    ctx.wakers.register(&owner, Owner::Preset(ObjectRef::from_obj(cached.as_ref())));
    let mut preset = ctx.fresh_presets.latest(cached).as_ref().clone();
    let has_finalizer = preset.finalizers().iter().any(|f| f == FINALIZER);
    let mut deleting = preset.meta().deletion_timestamp.is_some();
    if deleting && !has_finalizer {
        forget(ctx, &uid);
        forget_metrics(ctx, &preset);
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let patched = set_finalizer(&api, &preset, true).await?;
        ctx.fresh_presets.wrote(&preset, patched.clone());
        preset = patched;
    }
    // Which claims are abandoned is read from the TestRun cache: wait until it is filled.
    crate::controller::cache_ready(&ctx.runs).await;

    let mut conflicts = 0;
    let (preset, done, requeue) = loop {
        let vms = ctx.inventory.view(&owner);
        let tracked = preset.status.as_ref().map(|s| s.operations.clone()).unwrap_or_default();
        let now = Timestamp::now();
        let operations = observe_operations(&ctx.tracker, &owner, &tracked, now);
        let registered = ctx.pool.snapshot(&uid);
        let abandoned = abandoned_claims(ctx, &preset);
        let class = ctx.class_of(&preset.namespace().unwrap_or_default(), Some(&preset.spec.vm));
        let observed = PoolObserved {
            preset: &preset,
            now,
            vms: &vms,
            operations: &operations,
            outstanding: ctx.tracker.outstanding(&owner),
            registered: &registered,
            abandoned_claims: &abandoned,
            settings: &ctx.settings,
            key: &ctx.key,
            class: &class,
        };
        let plan = if deleting { plan_cleanup(&observed) } else { plan(&observed) };
        match apply(&api, &preset, ctx, plan, &owner, deleting).await {
            Ok(applied) => break applied,
            Err(e) if e.is_conflict() && conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                tracing::debug!(conflicts, "the PrebuildPreset changed since it was read; reading it again");
                preset = api
                    .get(&preset.name_any())
                    .await
                    .map_err(|source| Error::Read { name: preset.name_any(), source })?;
                if preset.uid().as_deref() != Some(uid.as_str()) {
                    // Deleted and made again under the same name: the new
                    // object has its own reconcile.
                    return Ok(Action::await_change());
                }
                // Deleted meanwhile: from now on nothing is created.
                deleting = preset.meta().deletion_timestamp.is_some();
            }
            // Others keep writing (claims from many runs at once): not an
            // error to back off from; look again shortly.
            Err(e) if e.is_conflict() => {
                tracing::warn!(
                    conflicts,
                    "the PrebuildPreset keeps changing under this controller; looking again in a second"
                );
                return Ok(Action::requeue(CONFLICT_REQUEUE));
            }
            Err(e) => return Err(e),
        }
    };
    if deleting && done {
        set_finalizer(&api, &preset, false).await?;
        forget(ctx, &uid);
        tracing::info!("every pool VM verified gone; finalizer removed");
        return Ok(Action::await_change());
    }
    Ok(next_look(requeue, preset.status.as_ref().is_some_and(|s| !s.operations.is_empty())))
}

fn forget<C: Compute + Clone>(ctx: &Context<C>, uid: &str) {
    ctx.pool.forget(uid);
    ctx.metrics.queue.forget(uid);
    ctx.wakers.forget(&label_value(uid));
    ctx.fresh_presets.forget(uid);
    ctx.tracker.forget_except(&label_value(uid), &Default::default());
}

/// Writes the plan's status if it changed, then hands its calls to the
/// tracker and publishes its Events. Returns the preset as it now is,
/// whether its cleanup is done, and when to look again.
async fn apply<C: Compute + Clone>(
    api: &Api<PrebuildPreset>,
    preset: &PrebuildPreset,
    ctx: &Context<C>,
    plan: PoolPlan,
    owner: &str,
    deleting: bool,
) -> Result<(PrebuildPreset, bool, Duration), Error> {
    let (done, requeue) = (plan.cleanup_done, plan.requeue_after);
    let mut current = preset.clone();
    let mut status = plan.status.clone();
    if preset.status.as_ref() != Some(&status) {
        record_accepted(&ctx.tracker, &mut status.operations);
        let written = write_status(api, preset, &status).await?;
        ctx.fresh_presets.wrote(preset, written.clone());
        current = written;
    }
    record_metrics(ctx, preset, &plan, deleting && done);
    let failing =
        if deleting && done { 0 } else { crate::controller::ops::failing_deletes(&status.operations).count() };
    ctx.metrics.queue.set_failing_deletes(&preset.uid().unwrap_or_default(), failing);
    let PoolPlan { calls, events, .. } = plan;
    ctx.tracker.forget_except(owner, &named_request_ids(&status.operations));
    submit_calls(&ctx.tracker, owner, calls);
    publish(&ctx.recorder, &ctx.metrics, &current, events).await;
    Ok((current, done, requeue))
}

/// Claimed pool VMs whose claiming TestRun no longer exists (read from the
/// TestRun cache, which holds every TestRun of the watched namespaces).
fn abandoned_claims<C: Compute + Clone>(ctx: &Context<C>, preset: &PrebuildPreset) -> BTreeSet<String> {
    preset
        .status
        .iter()
        .flat_map(|s| &s.instances)
        .filter(|i| i.state == PresetInstanceState::Claimed)
        .filter(|i| {
            is_abandoned(i.claimed_by.as_deref(), |namespace, name| {
                ctx.runs.get(&ObjectRef::<TestRun>::new(name).within(namespace)).and_then(|r| r.uid())
            })
        })
        .map(|i| i.name.clone())
        .collect()
}

fn record_metrics<C: Compute + Clone>(ctx: &Context<C>, preset: &PrebuildPreset, plan: &PoolPlan, gone: bool) {
    use crate::metrics::ReasonLabels;
    for reason in &plan.failures {
        ctx.metrics.provision_failures.get_or_create(&ReasonLabels { reason: reason.clone() }).inc();
    }
    if gone {
        forget_metrics(ctx, preset);
        return;
    }
    let m = &ctx.metrics;
    let labels = preset_labels(preset);
    m.pool_series_seen(&preset.uid().unwrap_or_default(), &labels);
    let s = &plan.status;
    let deleting = s.instances.iter().filter(|i| i.state == PresetInstanceState::Deleting).count();
    let counts = [
        i64::from(s.ready),
        i64::from(s.provisioning),
        i64::from(s.claimed),
        i64::from(s.outdated),
        i64::try_from(deleting).unwrap_or(i64::MAX),
    ];
    for (state, count) in crate::metrics::POOL_STATES.iter().zip(counts) {
        m.pool_vms.get_or_create(&state_labels(preset, state)).set(count);
    }
    m.pending_jobs.get_or_create(&labels).set(i64::from(s.pending));
    m.pool_desired_vms.get_or_create(&labels).set(i64::from(preset.spec.instances));
    let troubled = ["Degraded", "Stalled"].iter().any(|t| crate::controller::conditions::is_true(&s.conditions, t));
    m.pool_degraded.get_or_create(&labels).set(i64::from(troubled));
    if plan.cancelled > 0 {
        m.jobs_cancelled.get_or_create(&labels).inc_by(u64::from(plan.cancelled));
    }
}

/// Takes a deleted preset out of every per-preset metric.
fn forget_metrics<C: Compute + Clone>(ctx: &Context<C>, preset: &PrebuildPreset) {
    ctx.metrics.forget_pool(&preset.uid().unwrap_or_default());
}

fn preset_labels(preset: &PrebuildPreset) -> crate::metrics::PresetLabels {
    crate::metrics::PresetLabels { namespace: preset.namespace().unwrap_or_default(), preset: preset.name_any() }
}

fn state_labels(preset: &PrebuildPreset, state: &str) -> crate::metrics::PoolStateLabels {
    crate::metrics::PoolStateLabels {
        namespace: preset.namespace().unwrap_or_default(),
        preset: preset.name_any(),
        state: state.into(),
    }
}
