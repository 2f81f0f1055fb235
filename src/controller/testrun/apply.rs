//! Carries out a TestRun plan: observe (list the run's VMs, read its
//! operations, read the lease book), plan, write the status with every
//! intent, make the cloud calls, write what they returned, publish Events.
//! No step waits for a cloud operation to finish.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::Instrument as _;

use super::plan::{Observed, Plan, plan, plan_cleanup};
use std::collections::BTreeMap;

use crate::api::prebuild::PrebuildPreset;
use crate::api::testrun::TestRun;
use crate::api::{FINALIZER, VmSpec};
use crate::compute::naming::{LABEL_OWNER_UID, LABEL_TEMPLATE_VERSION, label_value, request_id, testrun_labels};
use crate::compute::{Compute, Instance};
use crate::controller::claims::{Claim, claim_ready_vm, held};
use crate::controller::execute::{make_calls, owned_vms, publish, read_operations, set_finalizer, write_status};
use crate::controller::{Context, Error};

/// Reconciles one TestRun.
pub async fn reconcile<C: Compute>(run: Arc<TestRun>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    let span =
        tracing::info_span!("reconcile", testrun = %run.name_any(), namespace = %run.namespace().unwrap_or_default());
    async move {
        let result = reconcile_inner(&run, &ctx).await;
        ctx.backoff.record(&run.name_any(), result.is_ok());
        ctx.metrics.reconciled("testrun", result.is_ok());
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_inner<C: Compute>(run: &TestRun, ctx: &Context<C>) -> Result<Action, Error> {
    let api: Api<TestRun> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let has_finalizer = run.finalizers().iter().any(|f| f == FINALIZER);

    if run.meta().deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        let plan = observe_and_plan(run, ctx, true).await?;
        let (done, requeue) = (plan.cleanup_done, plan.requeue_after);
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
    let plan = observe_and_plan(run, ctx, false).await?;
    let (requeue, expired) = (plan.requeue_after, plan.expired);
    execute(run, ctx, &api, plan).await?;
    if expired {
        tracing::info!("ttlSecondsAfterFinished is over; deleting the TestRun");
        api.delete(&run.name_any(), &kube::api::DeleteParams::default())
            .await
            .map_err(|source| Error::Delete { name: run.name_any(), source })?;
        return Ok(Action::await_change());
    }
    Ok(if requeue == Duration::MAX {
        Action::await_change()
    } else {
        Action::requeue(requeue.min(Duration::from_secs(300)))
    })
}

/// What a TestRun with `presetRef` sees of its preset: the VM shape, the
/// pool VMs its shards claimed (claiming for shards that need one), and
/// those VMs when they are not yet labelled as the run's.
#[derive(Default)]
struct PresetView {
    vm: Option<VmSpec>,
    claims: BTreeMap<i32, (String, String)>,
    claimed_vms: Vec<Instance>,
}

async fn preset_view<C: Compute>(
    run: &TestRun,
    ctx: &Context<C>,
    vms: &[Instance],
    cleanup: bool,
) -> Result<PresetView, Error> {
    let Some(preset_ref) = &run.spec.preset_ref else { return Ok(PresetView::default()) };
    let namespace = run.namespace().unwrap_or_default();
    let api: Api<PrebuildPreset> = Api::namespaced(ctx.client.clone(), &namespace);
    let read_error = |source| Error::ReadPreset { preset: preset_ref.name.clone(), source };
    let Some(preset) = api.get_opt(&preset_ref.name).await.map_err(read_error)? else {
        return Ok(PresetView::default());
    };
    let status = run.status.clone().unwrap_or_default();
    let may_claim = !cleanup && !run.spec.cancel && !status.phase.is_some_and(|p| p.is_finished());
    let mut view = PresetView { vm: Some(preset.spec.vm.clone()), ..PresetView::default() };
    for shard in 0..run.spec.shards {
        let claim = Claim { namespace: namespace.clone(), testrun: run.name_any(), shard };
        let first_attempt_pending = status.shards.iter().find(|s| s.index == shard).is_none_or(|s| s.attempt == 0);
        let held = match held(&preset, &claim) {
            Some(instance) => Some(instance),
            None if may_claim && first_attempt_pending => {
                let started = std::time::Instant::now();
                let taken = claim_ready_vm(&api, &preset_ref.name, &claim)
                    .await
                    .map_err(|source| Error::Claim { preset: preset_ref.name.clone(), source })?;
                ctx.metrics.claim_seconds.observe(started.elapsed().as_secs_f64());
                let result = if taken.is_some() { "claimed" } else { "none" };
                ctx.metrics.claims.get_or_create(&crate::metrics::ReasonLabels { reason: result.into() }).inc();
                taken
            }
            None => None,
        };
        if let Some(instance) = held {
            view.claims.insert(shard, (instance.name, instance.zone));
        }
    }
    // A claimed VM becomes the run's: relabel it, and see it until the list does.
    let uid = run.uid().unwrap_or_default();
    for (shard, (name, zone)) in &view.claims {
        if vms.iter().any(|v| &v.name == name && &v.zone == zone) {
            continue;
        }
        let Some(vm) = ctx.compute.get(zone, name).await.map_err(Error::ListVms)? else { continue };
        if vm.labels.get(LABEL_OWNER_UID) != Some(&label_value(&uid)) {
            let mut labels = vm.labels.clone();
            labels.remove(LABEL_TEMPLATE_VERSION);
            labels.extend(testrun_labels(&ctx.settings.installation, &uid, u32::try_from(*shard).unwrap_or(0), 1));
            let rid = request_id(&format!("claim/{uid}/{shard}/{zone}/{name}"), 0);
            if let Err(e) = ctx.compute.set_labels(zone, name, &labels, &vm.label_fingerprint, &rid).await {
                tracing::warn!(instance = %name, error = %e, "relabelling a claimed VM failed; retrying next pass");
            }
        }
        view.claimed_vms.push(vm);
    }
    Ok(view)
}

async fn observe_and_plan<C: Compute>(run: &TestRun, ctx: &Context<C>, cleanup: bool) -> Result<Plan, Error> {
    let uid = run.uid().unwrap_or_default();
    let mut vms = owned_vms(&ctx.compute, &ctx.settings.installation, &uid).await?;
    let preset = preset_view(run, ctx, &vms, cleanup).await?;
    vms.extend(preset.claimed_vms.iter().cloned());
    let tracked = run.status.as_ref().map(|s| s.operations.clone()).unwrap_or_default();
    let operations = read_operations(&ctx.compute, &tracked).await;
    let heard = ctx.book.snapshot(&uid);
    let machine = run.spec.vm.as_ref().or(preset.vm.as_ref()).map(|v| v.machine_type.clone()).unwrap_or_default();
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
        claims: &preset.claims,
        preset_vm: preset.vm.as_ref(),
    };
    let plan = if cleanup { plan_cleanup(&observed) } else { plan(&observed) };
    for zone in &plan.exhausted {
        ctx.exhausted_zones.mark(zone, &machine);
    }
    Ok(plan)
}

/// Writes the plan's status (intents first), makes its calls, writes what
/// they returned and publishes its Events.
async fn execute<C: Compute>(run: &TestRun, ctx: &Context<C>, api: &Api<TestRun>, plan: Plan) -> Result<(), Error> {
    let Plan { mut status, calls, events, .. } = plan;
    if run.status.as_ref() != Some(&status) {
        write_status(api, run, &status, false).await?;
    }
    if !calls.is_empty() {
        let before = status.clone();
        make_calls(&ctx.compute, &calls, &mut status.operations, &run.spec.vm.clone().unwrap_or_default()).await;
        if status != before {
            write_status(api, run, &status, false).await?;
        }
    }
    publish(&ctx.recorder, &ctx.metrics, run, events).await;
    Ok(())
}
