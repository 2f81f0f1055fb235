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
use crate::api::FINALIZER;
use crate::api::testrun::TestRun;
use crate::compute::Compute;
use crate::controller::execute::{make_calls, owned_vms, publish, read_operations, set_finalizer, write_status};
use crate::controller::{Context, Error};

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
    let requeue = plan.requeue_after;
    execute(run, ctx, &api, plan).await?;
    Ok(if requeue == Duration::MAX {
        Action::await_change()
    } else {
        Action::requeue(requeue.min(Duration::from_secs(300)))
    })
}

async fn observe_and_plan<C: Compute>(run: &TestRun, ctx: &Context<C>, cleanup: bool) -> Result<Plan, Error> {
    let uid = run.uid().unwrap_or_default();
    let vms = owned_vms(&ctx.compute, &ctx.settings.installation, &uid).await?;
    let tracked = run.status.as_ref().map(|s| s.operations.clone()).unwrap_or_default();
    let operations = read_operations(&ctx.compute, &tracked).await;
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
    Ok(plan)
}

/// Writes the plan's status (intents first), makes its calls, writes what
/// they returned and publishes its Events.
async fn execute<C: Compute>(run: &TestRun, ctx: &Context<C>, api: &Api<TestRun>, plan: Plan) -> Result<(), Error> {
    let Plan { mut status, calls, events, .. } = plan;
    if run.status.as_ref() != Some(&status) {
        write_status(api, run, &status).await?;
    }
    if !calls.is_empty() {
        let before = status.clone();
        make_calls(&ctx.compute, &calls, &mut status.operations, &run.spec.vm.clone().unwrap_or_default()).await;
        if status != before {
            write_status(api, run, &status).await?;
        }
    }
    publish(&ctx.recorder, run, events).await;
    Ok(())
}
