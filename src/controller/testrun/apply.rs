//! Carries out a TestRun plan: observe (the run's VMs from the inventory,
//! its operations from the tracker, what the agent API heard, its preset
//! from the cache), plan, write the status with every intent (guarded by
//! the resourceVersion it was planned from; a conflict means read again and
//! plan again), hand the calls to the tracker, publish Events. No step waits
//! for a cloud operation, and no step calls the cloud.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::Instrument as _;

use super::plan::{Observed, Plan, plan, plan_cleanup};
use super::plan::{class_request, shape, vm_life_needed};
use super::rerun::{self, Rerun};
use crate::api::prebuild::PrebuildPreset;
use crate::api::testrun::{MAX_RERUNS_LISTED, RunLink, TestRun, TestRunPhase, TestRunStatus};
use crate::api::validation::validate_testrun;
use crate::api::{FINALIZER, VmSpec};
use crate::compute::naming::{LABEL_OWNER_UID, LABEL_TEMPLATE_VERSION, label_value, request_id, testrun_labels};
use crate::compute::{Compute, Instance};
use crate::controller::claims::{Claim, born_after, claim_ready_vms, held};
use crate::controller::execute::{
    named_request_ids, next_look, observe_operations, publish, record_accepted, set_finalizer, submit_calls,
    write_status,
};
use crate::controller::ops::{CloudCall, Seen, failing_deletes};
use crate::controller::prebuild::plan::POOL_VM_LIFETIME;
use crate::controller::slots::Lane;
use crate::controller::wake::Owner;
use crate::controller::{CONFLICT_REQUEUE, Context, Error, conflict_is_no_failure};
use crate::metrics::queue::Waiting;
use crate::metrics::steps::Step;

/// Times a reconcile re-reads and plans again after a conflicting write.
const CONFLICT_RETRIES: usize = 4;

/// Reconciles one TestRun.
pub async fn reconcile<C: Compute + Clone>(run: Arc<TestRun>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    // Waiting for a slot is a small future; the reconcile itself is boxed.
    // Closed on shutdown: the process is going, so is this reconcile.
    let Some(_slot) = ctx.run_slots.acquire(lane(&run)).await else {
        return Ok(Action::await_change());
    };
    // The cache may have moved on while this waited; an object gone from
    // it is gone from the cluster (kube-runtime reconciles only cached ones).
    let Some(run) = ctx.runs.get(&ObjectRef::from_obj(run.as_ref())) else {
        return Ok(Action::await_change());
    };
    Box::pin(reconcile_now(run, ctx.clone())).await
}

/// A run that has asked for no VM yet launches; anything else follows.
fn lane(run: &TestRun) -> Lane {
    let asked = run.status.as_ref().is_some_and(|s| {
        !s.operations.is_empty() || s.phase.is_some_and(|p| p.is_finished()) || s.shards.iter().any(|sh| sh.attempt > 0)
    });
    if asked || run.meta().deletion_timestamp.is_some() { Lane::Follow } else { Lane::Launch }
}

async fn reconcile_now<C: Compute + Clone>(run: Arc<TestRun>, ctx: Arc<Context<C>>) -> Result<Action, Error> {
    let span =
        tracing::info_span!("reconcile", testrun = %run.name_any(), namespace = %run.namespace().unwrap_or_default());
    async move {
        let _under_way = ctx.metrics.liveness.begin("testrun");
        let started = std::time::Instant::now();
        let result = conflict_is_no_failure(reconcile_inner(run.clone(), &ctx).await);
        ctx.backoff.record(&format!("testrun/{}", run.uid().unwrap_or_default()), result.is_ok());
        ctx.metrics.reconciled("testrun", result.is_ok(), started.elapsed());
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_inner<C: Compute + Clone>(cached: Arc<TestRun>, ctx: &Context<C>) -> Result<Action, Error> {
    let api: Api<TestRun> = Api::namespaced(ctx.client.clone(), &cached.namespace().unwrap_or_default());
    let uid = cached.uid().unwrap_or_default();
    let owner = label_value(&uid);
    ctx.wakers.register(&owner, Owner::TestRun(ObjectRef::from_obj(cached.as_ref())));
    let mut run = ctx.fresh_runs.latest(cached).as_ref().clone();
    let mut deleting = run.meta().deletion_timestamp.is_some();
    let has_finalizer = run.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        forget(ctx, &uid);
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        // The finalizer goes on before any VM can exist.
        let patched = set_finalizer(&api, &run, true).await?;
        ctx.fresh_runs.wrote(&run, patched.clone());
        run = patched;
    }

    let mut conflicts = 0;
    let plan = loop {
        let (plan, preset) = observe_and_plan(&run, ctx, deleting).await?;
        match apply(&api, &run, ctx, plan, preset, &owner).await {
            Ok(applied) => break applied,
            Err(e) if e.is_conflict() && conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                tracing::debug!(conflicts, "the TestRun changed since it was read; reading it again");
                run = api.get(&run.name_any()).await.map_err(|source| Error::Read { name: run.name_any(), source })?;
                if run.uid().as_deref() != Some(uid.as_str()) {
                    // Deleted and made again under the same name: the new
                    // object has its own reconcile.
                    return Ok(Action::await_change());
                }
                // Deleted meanwhile: from now on nothing is created.
                deleting = run.meta().deletion_timestamp.is_some();
            }
            // Others keep writing (claims from many runs at once): not an
            // error to back off from; look again shortly.
            Err(e) if e.is_conflict() => {
                tracing::warn!(
                    conflicts,
                    "the TestRun keeps changing under this controller; looking again in a second"
                );
                return Ok(Action::requeue(CONFLICT_REQUEUE));
            }
            Err(e) => return Err(e),
        }
    };
    let Applied { run, cleanup_done, expired, requeue } = plan;

    if deleting && cleanup_done {
        set_finalizer(&api, &run, false).await?;
        forget(ctx, &uid);
        tracing::info!("every VM verified gone; finalizer removed");
        return Ok(Action::await_change());
    }
    if expired {
        tracing::info!("ttlSecondsAfterFinished is over; deleting the TestRun");
        api.delete(&run.name_any(), &kube::api::DeleteParams::default())
            .await
            .map_err(|source| Error::Delete { name: run.name_any(), source })?;
        return Ok(Action::await_change());
    }
    Ok(next_look(requeue, run.status.as_ref().is_some_and(|s| !s.operations.is_empty())))
}

/// A run that just finished wakes the reruns waiting for it (once per run:
/// a look through the cache).
fn wake_reruns<C: Compute + Clone>(ctx: &Context<C>, run: &TestRun) {
    let (name, namespace) = (run.name_any(), run.namespace());
    for other in ctx.runs.state() {
        let waits = other.spec.rerun_of.as_ref().is_some_and(|r| r.name == name)
            && other.namespace() == namespace
            && other.started().is_none()
            && !other.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_finished());
        if waits {
            ctx.wakers.wake_run(ObjectRef::from_obj(other.as_ref()));
        }
    }
}

/// Lists a rerun in its original's `status.reruns` (the last
/// [`MAX_RERUNS_LISTED`]), unless it is there already or the original is
/// gone. The write is guarded like every status write: on a conflict the
/// original is read again, a few times; a link not written now is written
/// by the rerun's next pass.
async fn link_original<C: Compute + Clone>(
    api: &Api<TestRun>,
    ctx: &Context<C>,
    original: &RunLink,
    rerun: &TestRun,
    first: bool,
) {
    let me = RunLink { name: rerun.name_any(), uid: rerun.uid().unwrap_or_default() };
    let key = ObjectRef::<TestRun>::new(&original.name).within(&rerun.namespace().unwrap_or_default());
    let Some(mut current) = ctx.runs.get(&key).map(|o| ctx.fresh_runs.latest(o).as_ref().clone()) else { return };
    for _ in 0..CONFLICT_RETRIES {
        if current.uid().as_deref() != Some(original.uid.as_str()) {
            return;
        }
        let mut status = current.status.clone().unwrap_or_default();
        if status.reruns.contains(&me) || (!first && status.reruns.len() >= MAX_RERUNS_LISTED) {
            return;
        }
        status.reruns.push(me.clone());
        let excess = status.reruns.len().saturating_sub(MAX_RERUNS_LISTED);
        status.reruns.drain(..excess);
        match write_status(api, &current, &status).await {
            Ok(written) => {
                ctx.fresh_runs.wrote(&current, written);
                return;
            }
            Err(e) if e.is_conflict() => match api.get_opt(&original.name).await {
                Ok(Some(fresh)) => current = fresh,
                _ => return,
            },
            Err(e) => {
                tracing::warn!(original = %original.name, error = %e, "could not list this rerun in its original's status");
                return;
            }
        }
    }
}

/// What a run adds to the queue: nothing once finished or being deleted.
fn waiting(status: &TestRunStatus, deleting: bool) -> Waiting {
    if deleting || status.phase.is_some_and(|p| p.is_finished()) {
        return Waiting::default();
    }
    let shards =
        status.shards.iter().filter(|s| matches!(s.phase, TestRunPhase::Pending | TestRunPhase::Provisioning)).count();
    let started = status.shards.iter().any(|s| s.phase == TestRunPhase::Running || s.phase.is_finished());
    Waiting { run: !started, shards: i64::try_from(shards).unwrap_or(i64::MAX) }
}

fn forget<C: Compute + Clone>(ctx: &Context<C>, uid: &str) {
    ctx.metrics.queue.forget(uid);
    ctx.book.forget(uid);
    ctx.wakers.forget(&label_value(uid));
    ctx.fresh_runs.forget(uid);
    ctx.tracker.forget_except(&label_value(uid), &Default::default());
}

/// What a TestRun with `presetRef` sees of its preset: the VM shape, the
/// pool VMs its shards claimed (claiming for shards that need one), those
/// VMs as the inventory holds them, and the label changes that make them
/// the run's.
#[derive(Default)]
struct PresetView {
    vm: Option<VmSpec>,
    claims: BTreeMap<i32, (String, String)>,
    claimed_vms: Vec<Instance>,
    relabels: Vec<CloudCall>,
    /// Every relabel request id considered (the tracker keeps their outcome).
    relabel_ids: BTreeSet<String>,
}

/// Whether the classes let `run` take VMs from `preset`: the run's own
/// shape (what it started with, its `spec.vm`, else the preset's) is
/// admitted by its class, the preset's class admits the run, and the
/// preset itself fits its class (a refused pool lends nothing).
fn class_admits<C: Compute>(ctx: &Context<C>, run: &TestRun, preset: &PrebuildPreset, rerun: &Rerun) -> bool {
    let own = shape(run, Some(&preset.spec.vm)).unwrap_or(&preset.spec.vm);
    let namespace = run.namespace().unwrap_or_default();
    let run_admitted = ctx.class_of(&namespace, Some(own)).refusal(&class_request(run, own, rerun)).is_none();
    let preset_class = ctx.class_of(&namespace, Some(&preset.spec.vm));
    let lends = preset_class.refusal(&class_request(run, &preset.spec.vm, rerun)).is_none()
        && preset_class.refusal(&crate::controller::prebuild::plan::pool_request(preset, &namespace)).is_none();
    run_admitted && lends
}

async fn preset_view<C: Compute + Clone>(
    run: &TestRun,
    ctx: &Context<C>,
    cleanup: bool,
    rerun: &Rerun,
) -> Result<PresetView, Error> {
    // A started run keeps the preset it started with.
    let started = run.status.as_ref().and_then(|s| s.started.as_ref());
    let preset_ref = match started {
        Some(started) => started.preset_ref.as_ref(),
        None => run.spec.preset_ref.as_ref(),
    };
    let Some(preset_ref) = preset_ref else { return Ok(PresetView::default()) };
    let namespace = run.namespace().unwrap_or_default();
    let key = ObjectRef::<PrebuildPreset>::new(&preset_ref.name).within(&namespace);
    let Some(cached) = ctx.presets.get(&key) else { return Ok(PresetView::default()) };
    let preset = ctx.fresh_presets.latest(cached);
    let status = run.status.clone().unwrap_or_default();
    // A run whose spec is invalid takes nothing from the pool: it could not
    // use a VM before the spec is fixed.
    let may_claim = !cleanup
        && !run.spec.cancel
        && !status.phase.is_some_and(|p| p.is_finished())
        && validate_testrun(&run.spec).is_ok()
        && class_admits(ctx, run, &preset, rerun);
    // A started run has the shards it started with, whatever the spec says
    // now; a rerun only those it reruns.
    let shards: Vec<i32> = if !status.shards.is_empty() {
        status.shards.iter().map(|s| s.index).collect()
    } else if let Rerun::Ready { shards, .. } = rerun {
        shards.clone()
    } else if matches!(rerun, Rerun::Waiting { .. }) || status.started.is_some() {
        Vec::new()
    } else {
        (0..run.spec.shards).collect()
    };
    let claims: Vec<Claim> = shards
        .into_iter()
        .map(|shard| Claim { namespace: namespace.clone(), testrun: run.name_any(), shard, uid: run.uid() })
        .collect();
    let wanting: Vec<Claim> = claims
        .iter()
        .filter(|c| held(&preset, c).is_none())
        .filter(|c| may_claim && status.shards.iter().find(|s| s.index == c.shard).is_none_or(|s| s.attempt == 0))
        .cloned()
        .collect();
    // A pool VM must live as long as a VM of the run's own would; a run
    // that needs longer than any pool VM lives gets new VMs.
    let needed = vm_life_needed(run.spec.attempt_timeout(started), ctx.settings.registration_timeout);
    let born_after = born_after(Timestamp::now(), POOL_VM_LIFETIME, needed);
    let mut taken = BTreeMap::new();
    if let Some(born_after) = born_after
        && !wanting.is_empty()
    {
        let presets: Api<PrebuildPreset> = Api::namespaced(ctx.client.clone(), &namespace);
        let started = std::time::Instant::now();
        let claimed = claim_ready_vms(&presets, &preset, &wanting, Some(born_after))
            .await
            .map_err(|source| Error::Claim { preset: preset_ref.name.clone(), source })?;
        ctx.metrics.claim_seconds.observe(started.elapsed().as_secs_f64());
        let counted = |reason: &str, n: usize| {
            if n == 0 {
                return;
            }
            let labels = crate::metrics::ReasonLabels { reason: reason.into() };
            ctx.metrics.claims.get_or_create(&labels).inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        };
        counted("claimed", claimed.taken.len());
        counted("none", wanting.len().saturating_sub(claimed.taken.len()));
        if let Some(written) = claimed.written {
            ctx.fresh_presets.wrote(&preset, written);
            // The pool backfills what was taken.
            ctx.wakers.wake_preset(key.clone());
        }
        taken = claimed.taken;
    }
    let mut view = PresetView { vm: Some(preset.spec.vm.clone()), ..PresetView::default() };
    for claim in &claims {
        if let Some(instance) = taken.get(&claim.shard).cloned().or_else(|| held(&preset, claim)) {
            view.claims.insert(claim.shard, (instance.name, instance.zone));
        }
    }
    // A claimed VM becomes the run's: relabel it; see it until it carries the run's labels.
    let uid = run.uid().unwrap_or_default();
    for (shard, (name, zone)) in &view.claims {
        let Some(vm) = ctx.inventory.get(zone, name) else { continue };
        if vm.labels.get(LABEL_OWNER_UID) != Some(&label_value(&uid)) && !cleanup {
            let mut labels = vm.labels.clone();
            labels.remove(LABEL_TEMPLATE_VERSION);
            labels.extend(testrun_labels(
                &ctx.settings.installation,
                &run.namespace().unwrap_or_default(),
                &uid,
                u32::try_from(*shard).unwrap_or(0),
                1,
            ));
            let rid = request_id(&format!("claim/{uid}/{shard}/{zone}/{name}/{}", vm.label_fingerprint), 0);
            view.relabel_ids.insert(rid.clone());
            match ctx.tracker.seen([rid.as_str()]).get(&rid) {
                // The fingerprint was stale: a fresh list brings the current one.
                Some(Seen::Failed(_)) => {
                    ctx.inventory.want_fresh_list();
                }
                Some(_) => {}
                None => view.relabels.push(CloudCall::SetLabels {
                    zone: zone.clone(),
                    name: name.clone(),
                    labels,
                    fingerprint: vm.label_fingerprint.clone(),
                    request_id: rid,
                }),
            }
        }
        view.claimed_vms.push(vm);
    }
    Ok(view)
}

async fn observe_and_plan<C: Compute + Clone>(
    run: &TestRun,
    ctx: &Context<C>,
    cleanup: bool,
) -> Result<(Plan, PresetView), Error> {
    let uid = run.uid().unwrap_or_default();
    let owner = label_value(&uid);
    // A rerun is planned as the run it stands for.
    let original = run.spec.rerun_of.as_ref().filter(|_| run.started().is_none()).and_then(|r| {
        let key = ObjectRef::<TestRun>::new(&r.name).within(&run.namespace().unwrap_or_default());
        ctx.runs.get(&key).map(|o| ctx.fresh_runs.latest(o))
    });
    let (run, rerun) = rerun::effective(run, original.as_deref());
    let run = run.as_ref();
    let preset = preset_view(run, ctx, cleanup, &rerun).await?;
    let mut vms = ctx.inventory.view(&owner);
    for vm in &preset.claimed_vms {
        if !vms.has(&vm.zone, &vm.name) {
            vms.vms.push(vm.clone());
        }
    }
    let now = Timestamp::now();
    let tracked = run.status.as_ref().map(|s| s.operations.clone()).unwrap_or_default();
    let operations = observe_operations(&ctx.tracker, &owner, &tracked, now);
    let heard = ctx.book.snapshot(&uid);
    // The shape new VMs get: what the run started with, else what it would start with.
    let vm = shape(run, preset.vm.as_ref());
    let machine = vm.map(|v| v.machine_type.clone()).unwrap_or_default();
    let exhausted = ctx.exhausted_zones.current(&machine);
    let class = ctx.class_of(&run.namespace().unwrap_or_default(), vm);
    let observed = Observed {
        run,
        now,
        vms: &vms,
        operations: &operations,
        outstanding: ctx.tracker.outstanding(&owner),
        heard: &heard,
        exhausted_zones: &exhausted,
        settings: &ctx.settings,
        key: &ctx.key,
        claims: &preset.claims,
        preset_vm: preset.vm.as_ref(),
        class: &class,
        rerun: &rerun,
    };
    let plan = if cleanup { plan_cleanup(&observed) } else { plan(&observed) };
    if cleanup && !plan.cleanup_done {
        tracing::debug!(
            vms = vms.vms.len(),
            complete = vms.is_complete(),
            outstanding = observed.outstanding,
            operations = plan.status.operations.len(),
            calls = plan.calls.len(),
            "cleanup not done yet"
        );
    }
    for zone in &plan.exhausted {
        ctx.exhausted_zones.mark(zone, &machine);
    }
    Ok((plan, preset))
}

/// What applying a plan left to do.
struct Applied {
    run: TestRun,
    cleanup_done: bool,
    expired: bool,
    requeue: Duration,
}

/// Writes the plan's status (intents first) if it changed, then hands its
/// calls to the tracker and publishes its Events.
async fn apply<C: Compute + Clone>(
    api: &Api<TestRun>,
    run: &TestRun,
    ctx: &Context<C>,
    plan: Plan,
    preset: PresetView,
    owner: &str,
) -> Result<Applied, Error> {
    let Plan { mut status, calls, events, cleanup_done, expired, requeue_after, ended, .. } = plan;
    let mut current = run.clone();
    if run.status.as_ref() != Some(&status) {
        record_accepted(&ctx.tracker, &mut status.operations);
        let written = write_status(api, run, &status).await?;
        ctx.fresh_runs.wrote(run, written.clone());
        current = written;
        let was_finished = run.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_finished());
        if let Some(phase) = status.phase.filter(|p| p.is_finished() && !was_finished) {
            let outcome = format!("{phase:?}");
            ctx.metrics.runs_finished.get_or_create(&crate::metrics::OutcomeLabels { outcome }).inc();
            wake_reruns(ctx, run);
        }
        for outcome in &ended {
            let labels = crate::metrics::OutcomeLabels { outcome: outcome.name().to_string() };
            ctx.metrics.attempts_finished.get_or_create(&labels).inc();
        }
        // A pool VM's agent waiting for this run's claim can have its assignment now.
        let preset_ref = status.started.as_ref().map_or(run.spec.preset_ref.as_ref(), |s| s.preset_ref.as_ref());
        if preset_ref.is_some() {
            for shard in &status.shards {
                if let Some(instance) = &shard.instance {
                    ctx.agent_waiters.notify(instance);
                }
            }
        }
    }
    // Linked when the rerun starts, and again while it runs if that write
    // did not land; never pushing another rerun out of a full list but the
    // first time, so reruns of one original do not take turns.
    let first = run.status.as_ref().is_none_or(|s| s.rerun_of.is_none());
    let under_way = !status.phase.is_some_and(|p| p.is_finished()) && run.meta().deletion_timestamp.is_none();
    if let Some(original) = status.rerun_of.as_ref().filter(|_| first || under_way) {
        link_original(api, ctx, original, &current, first).await;
    }
    let mut keep = named_request_ids(&status.operations);
    keep.extend(preset.relabel_ids);
    ctx.tracker.forget_except(owner, &keep);
    submit_calls(&ctx.tracker, owner, preset.relabels);
    for call in &calls {
        if let CloudCall::Insert(spec) = call {
            ctx.metrics.shard_steps.mark(&spec.name, Step::Created);
        }
    }
    let uid = run.uid().unwrap_or_default();
    ctx.metrics.queue.set(&uid, waiting(&status, run.meta().deletion_timestamp.is_some()));
    ctx.metrics.queue.set_failing_deletes(&uid, failing_deletes(&status.operations).count());
    submit_calls(&ctx.tracker, owner, calls);
    publish(&ctx.recorder, &ctx.metrics, &current, events).await;
    Ok(Applied { run: current, cleanup_done, expired, requeue: requeue_after })
}
