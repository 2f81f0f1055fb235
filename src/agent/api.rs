//! The agent API, served by the controller: VMs register, heartbeat and
//! report results here. Every handler answers at once from the controller's
//! cache and the in-memory [`LeaseBook`]; none waits for Compute Engine or
//! a Kubernetes write. A report from any lease but the shard's current one
//! gets 409 and is counted; it never changes the current attempt's state.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::de::DeserializeOwned;

use super::book::{AgentWaiters, LeaseBook, PoolBook};
use super::protocol::{
    ApiError, Assignment, BUILD_HEADER, EnvVar, HEARTBEAT_PATH, LeaseClaim, MAX_BODY_BYTES, OUTPUT_TAIL_BYTES,
    POOL_REGISTER_PATH, POOL_WAIT_PATH, PREEMPTED_PATH, PoolHello, REGISTER_PATH, RESULT_PATH, RegisterRequest,
    ResultAck, ResultReport,
};
use super::tokens::{LeaseKey, LeaseScope};
use crate::api::prebuild::PrebuildPreset;
use crate::api::testrun::{ShardResult, ShardStatus, TestRun};
use crate::compute::naming::testrun_instance_name;
use crate::controller::claims::Claim;
use crate::controller::fresh::Fresh;
use crate::controller::wake::Wakers;
use crate::metrics::steps::Step;

/// Seconds between heartbeats the agent is told to keep: a quarter of the
/// heartbeat timeout in effect, 1 to 15.
pub fn heartbeat_interval(heartbeat_timeout: std::time::Duration) -> u64 {
    (heartbeat_timeout.as_secs() / 4).clamp(1, 15)
}

/// The agent API's shared state.
pub struct AgentApi {
    /// Makes and checks tokens.
    pub key: LeaseKey,
    /// The controller's cache of TestRuns.
    pub runs: Store<TestRun>,
    /// TestRuns as the controller last wrote them, until the cache has them.
    pub fresh_runs: Arc<Fresh<TestRun>>,
    /// The controller's cache of PrebuildPresets.
    pub presets: Store<PrebuildPreset>,
    /// PrebuildPresets as last written (claims), until the cache has them.
    pub fresh_presets: Arc<Fresh<PrebuildPreset>>,
    /// What was heard from agents.
    pub book: Arc<LeaseBook>,
    /// Pool VMs whose agent registered.
    pub pool: Arc<PoolBook>,
    /// Asks the controllers to reconcile an object now.
    pub wakers: Arc<Wakers>,
    /// Pool VMs waiting for an assignment.
    pub agent_waiters: Arc<AgentWaiters>,
    /// Metrics (refusal counts).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The sha256 of this controller's executable, the build agents must
    /// start as (when they say which they are).
    pub build: String,
}

/// An error answer: a status and an [`ApiError`] body.
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { reason: self.1.to_string(), message: self.2 })).into_response()
    }
}

type Answer<T> = Result<Json<T>, Refusal>;

/// The agent API's routes.
pub fn router(api: Arc<AgentApi>) -> Router {
    Router::new()
        .route(REGISTER_PATH, post(register))
        .route(HEARTBEAT_PATH, post(heartbeat))
        .route(RESULT_PATH, post(result))
        .route(PREEMPTED_PATH, post(preempted))
        .route(POOL_REGISTER_PATH, post(pool_register))
        .route(POOL_WAIT_PATH, post(pool_wait))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// An agent that started as another build than this controller's is
/// refused (426) before it takes any work: its startup script then fetches
/// this build. An agent that names no build (one baked into an image, run
/// by `--agent-command`) is taken as it is.
fn check_build(api: &AgentApi, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(build) = headers.get(BUILD_HEADER) else { return Ok(()) };
    if build.as_bytes() == api.build.as_bytes() {
        return Ok(());
    }
    Err(Refusal(
        StatusCode::UPGRADE_REQUIRED,
        "StaleBuild",
        format!(
            "this agent is build {}; the controller serves build {} at /agent/v1/binary",
            String::from_utf8_lossy(build.as_bytes()),
            api.build
        ),
    ))
}

fn parse<T: DeserializeOwned>(api: &AgentApi, body: &Bytes) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        api.metrics.malformed_requests.inc();
        Refusal(StatusCode::BAD_REQUEST, "Malformed", format!("the request body is not valid: {e}"))
    })
}

fn lookup(api: &AgentApi, namespace: &str, name: &str) -> Result<Arc<TestRun>, Refusal> {
    api.runs.get(&ObjectRef::new(name).within(namespace)).map(|run| api.fresh_runs.latest(run)).ok_or_else(|| {
        Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "NotReady",
            format!("TestRun {namespace}/{name} is not known (yet); retry"),
        )
    })
}

fn shard_of(run: &TestRun, shard: i32) -> Option<&ShardStatus> {
    run.status.as_ref()?.shards.iter().find(|s| s.index == shard)
}

fn forged(api: &AgentApi, what: &str) -> Refusal {
    api.metrics.forged_requests.inc();
    Refusal(StatusCode::FORBIDDEN, "Forbidden", format!("the {what} token does not verify"))
}

/// The request names an attempt or lease newer than the controller's view:
/// the view lags behind the controller's own write (tokens are only minted
/// for leases it wrote), so the caller is told to retry, not that it is stale.
fn view_behind() -> Refusal {
    Refusal(StatusCode::SERVICE_UNAVAILABLE, "NotReady", "the controller's view of the shard is behind; retry".into())
}

fn stale(api: &AgentApi, message: String) -> Refusal {
    api.metrics.stale_reports.inc();
    Refusal(StatusCode::CONFLICT, "StaleLease", message)
}

async fn register(State(api): State<Arc<AgentApi>>, headers: HeaderMap, body: Bytes) -> Answer<Assignment> {
    let request: RegisterRequest = parse(&api, &body)?;
    if !api.key.verify_vm(&request.instance, &request.owner_uid, &request.vm_token)
        || request.instance
            != testrun_instance_name(&request.owner_uid, request.shard.max(0) as u32, request.attempt.max(0) as u32)
    {
        return Err(forged(&api, "VM"));
    }
    let run = lookup(&api, &request.namespace, &request.testrun)?;
    if run.metadata.uid.as_deref() != Some(request.owner_uid.as_str()) {
        return Err(Refusal(StatusCode::GONE, "Finished", "this VM belongs to a TestRun that no longer exists".into()));
    }
    check_build(&api, &headers)?;
    let Some(shard) = shard_of(&run, request.shard) else {
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "NotReady",
            "the shard is not recorded yet; retry".into(),
        ));
    };
    if request.attempt > shard.attempt {
        return Err(view_behind());
    }
    if shard.attempt != request.attempt || shard.instance.as_deref() != Some(request.instance.as_str()) {
        return Err(stale(&api, format!("attempt {} is not the shard's current attempt", request.attempt)));
    }
    if shard.phase.is_finished() || run.spec.cancel {
        return Err(Refusal(StatusCode::CONFLICT, "Finished", "the shard has finished".into()));
    }
    let uid = request.owner_uid.as_str();
    api.book.register(uid, shard.index, shard.lease_id, Timestamp::now());
    api.metrics.shard_steps.mark(&request.instance, Step::AgentRegistered);
    api.wakers.wake_run(ObjectRef::from_obj(run.as_ref()));
    tracing::info!(testrun = %request.testrun, namespace = %request.namespace, shard = shard.index, attempt = shard.attempt, lease = shard.lease_id, "agent registered");
    Ok(Json(assignment(&api.key, &run, shard)))
}

/// The assignment of a shard's current attempt, with its lease token.
fn assignment(key: &LeaseKey, run: &TestRun, shard: &ShardStatus) -> Assignment {
    let uid = run.metadata.uid.clone().unwrap_or_default();
    let scope = LeaseScope { uid: &uid, shard: shard.index, attempt: shard.attempt, lease_id: shard.lease_id };
    // Every attempt runs what the run started with.
    let started = run.status.as_ref().and_then(|s| s.started.clone());
    let (shards, command, env, working_dir) = match started {
        Some(s) => (s.shards, s.command, s.env, s.working_dir),
        None => (run.spec.shards, run.spec.command.clone(), run.spec.env.clone(), run.spec.working_dir.clone()),
    };
    Assignment {
        namespace: run.metadata.namespace.clone().unwrap_or_default(),
        testrun: run.metadata.name.clone().unwrap_or_default(),
        shard: shard.index,
        shards,
        attempt: shard.attempt,
        lease_id: shard.lease_id,
        lease_token: key.lease_token(&scope),
        command,
        env: env.into_iter().map(|e| EnvVar { name: e.name, value: e.value }).collect(),
        working_dir,
        timeout_seconds: run.spec.attempt_timeout(run.started()).as_secs(),
        heartbeat_interval_seconds: heartbeat_interval(run.spec.effective_heartbeat_timeout(run.started())),
    }
}

/// Checks a lease claim against the cache; returns the run and its shard.
fn check_lease(api: &AgentApi, claim: &LeaseClaim) -> Result<(Arc<TestRun>, ShardStatus), Refusal> {
    let run = lookup(api, &claim.namespace, &claim.testrun)?;
    let uid = run.metadata.uid.clone().unwrap_or_default();
    let scope = LeaseScope { uid: &uid, shard: claim.shard, attempt: claim.attempt, lease_id: claim.lease_id };
    if !api.key.verify_lease(&scope, &claim.lease_token) {
        return Err(forged(api, "lease"));
    }
    let Some(shard) = shard_of(&run, claim.shard).cloned() else {
        return Err(stale(api, "the shard has no current lease".into()));
    };
    if claim.lease_id > shard.lease_id || claim.attempt > shard.attempt {
        return Err(view_behind());
    }
    if shard.lease_id != claim.lease_id || shard.attempt != claim.attempt {
        return Err(stale(api, format!("lease {} is not the shard's current lease", claim.lease_id)));
    }
    Ok((run, shard))
}

async fn heartbeat(State(api): State<Arc<AgentApi>>, body: Bytes) -> Result<StatusCode, Refusal> {
    let claim: LeaseClaim = parse(&api, &body)?;
    let (run, shard) = check_lease(&api, &claim)?;
    if shard.phase.is_finished() || run.spec.cancel {
        return Err(Refusal(StatusCode::CONFLICT, "Finished", format!("the shard is {:?}; stop", shard.phase)));
    }
    let now = Timestamp::now();
    if let Some(start) = shard.start_time.as_ref() {
        let limit = crate::controller::ops::signed(run.spec.attempt_timeout(run.started()));
        if now.duration_since(start.0) > limit {
            api.wakers.wake_run(ObjectRef::from_obj(run.as_ref()));
            return Err(Refusal(
                StatusCode::CONFLICT,
                "TimedOut",
                format!("the attempt ran longer than {}", run.spec.attempt_timeout_text(run.started())),
            ));
        }
    }
    let uid = run.metadata.uid.clone().unwrap_or_default();
    api.book.heartbeat(&uid, shard.index, shard.lease_id, now);
    Ok(StatusCode::NO_CONTENT)
}

/// The agent's Spot VM is being preempted: recorded for the current lease
/// (the controller ends the attempt as Preempted and retries the shard),
/// 204; 409 once the attempt is over. Sending it again changes nothing.
async fn preempted(State(api): State<Arc<AgentApi>>, body: Bytes) -> Result<StatusCode, Refusal> {
    let claim: LeaseClaim = parse(&api, &body)?;
    let (run, shard) = check_lease(&api, &claim)?;
    if shard.phase.is_finished() || run.spec.cancel {
        return Err(Refusal(StatusCode::CONFLICT, "Finished", format!("the shard is {:?}; stop", shard.phase)));
    }
    let spot_shape = run.started().is_some_and(|s| s.vm.spot);
    if !shard.spot.unwrap_or(spot_shape) {
        return Err(Refusal(
            StatusCode::CONFLICT,
            "NotSpot",
            "the shard's VM is a standard VM; Compute Engine does not preempt it".into(),
        ));
    }
    let uid = run.metadata.uid.clone().unwrap_or_default();
    if api.book.preempted(&uid, shard.index, shard.lease_id, Timestamp::now()).is_err() {
        return Err(stale(&api, "a newer lease holds the shard".into()));
    }
    api.wakers.wake_run(ObjectRef::from_obj(run.as_ref()));
    tracing::info!(testrun = %claim.testrun, namespace = %claim.namespace, shard = shard.index, lease = shard.lease_id, "agent reports its Spot VM preempted");
    Ok(StatusCode::NO_CONTENT)
}

async fn result(State(api): State<Arc<AgentApi>>, body: Bytes) -> Answer<ResultAck> {
    let report: ResultReport = parse(&api, &body)?;
    if report.output_tail.len() > OUTPUT_TAIL_BYTES {
        api.metrics.malformed_requests.inc();
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "Malformed",
            format!("outputTail is longer than {OUTPUT_TAIL_BYTES} bytes"),
        ));
    }
    let (run, shard) = check_lease(&api, &report.lease)?;
    let offered =
        ShardResult { exit_code: report.exit_code, duration_ms: report.duration_ms, output_tail: report.output_tail };
    if let Some(stored) = &shard.result {
        // Status keeps the end of the output that fits the run's budget.
        let same = stored.exit_code == offered.exit_code
            && stored.duration_ms == offered.duration_ms
            && offered.output_tail.ends_with(&stored.output_tail);
        return if same {
            Ok(Json(ResultAck { acknowledged: true }))
        } else {
            Err(Refusal(StatusCode::CONFLICT, "Conflict", "a different result is already stored for this lease".into()))
        };
    }
    if shard.phase.is_finished() {
        return Err(Refusal(
            StatusCode::CONFLICT,
            "Finished",
            format!("the shard ended as {:?} before the result came", shard.phase),
        ));
    }
    let uid = run.metadata.uid.clone().unwrap_or_default();
    let command = std::time::Duration::from_millis(u64::try_from(offered.duration_ms).unwrap_or(0));
    match api.book.result(&uid, shard.index, shard.lease_id, offered.clone(), Timestamp::now()) {
        Err(_) => Err(stale(&api, "a newer lease holds the shard".into())),
        Ok(None) => {
            if let Some(instance) = &shard.instance {
                api.metrics.shard_steps.result_accepted(instance, command);
            }
            api.wakers.wake_run(ObjectRef::from_obj(run.as_ref()));
            Ok(Json(ResultAck { acknowledged: false }))
        }
        Ok(Some(held)) if held != offered => Err(Refusal(
            StatusCode::CONFLICT,
            "Conflict",
            "a different result was already reported for this lease".into(),
        )),
        Ok(_) => {
            api.wakers.wake_run(ObjectRef::from_obj(run.as_ref()));
            // Received, not yet stored: the agent asks again.
            Ok(Json(ResultAck { acknowledged: false }))
        }
    }
}

/// How long a pool VM's wait for work is held open.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Checks a pool VM's identity; returns its preset.
fn check_pool_vm(api: &AgentApi, hello: &PoolHello) -> Result<Arc<PrebuildPreset>, Refusal> {
    if !api.key.verify_vm(&hello.instance, &hello.owner_uid, &hello.vm_token) {
        return Err(forged(api, "VM"));
    }
    let preset = api
        .presets
        .get(&ObjectRef::new(&hello.preset).within(&hello.namespace))
        .map(|p| api.fresh_presets.latest(p))
        .ok_or_else(|| {
            Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "NotReady",
                format!("PrebuildPreset {}/{} is not known (yet); retry", hello.namespace, hello.preset),
            )
        })?;
    if preset.metadata.uid.as_deref() != Some(hello.owner_uid.as_str()) {
        return Err(Refusal(
            StatusCode::GONE,
            "Finished",
            "this VM belongs to a PrebuildPreset that no longer exists".into(),
        ));
    }
    Ok(preset)
}

async fn pool_register(
    State(api): State<Arc<AgentApi>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Refusal> {
    let hello: PoolHello = parse(&api, &body)?;
    let preset = check_pool_vm(&api, &hello)?;
    check_build(&api, &headers)?;
    api.pool.heard(&hello.owner_uid, &hello.instance, Timestamp::now());
    api.wakers.wake_preset(ObjectRef::from_obj(preset.as_ref()));
    tracing::info!(prebuildpreset = %hello.preset, namespace = %hello.namespace, instance = %hello.instance, "pool VM ready");
    Ok(StatusCode::NO_CONTENT)
}

/// A pool VM waits for work: 200 with an assignment as soon as a TestRun
/// claimed it and recorded the claim, or 204 after at most [`POOL_WAIT`]
/// (nothing yet, ask again). The wait is woken by the claim itself (a
/// notification for this VM), with a slow look every second as a backstop.
async fn pool_wait(State(api): State<Arc<AgentApi>>, headers: HeaderMap, body: Bytes) -> Result<Response, Refusal> {
    let hello: PoolHello = parse(&api, &body)?;
    check_pool_vm(&api, &hello)?;
    // A pool VM idle since before an upgrade restarts as the new build.
    check_build(&api, &headers)?;
    let deadline = tokio::time::Instant::now() + POOL_WAIT;
    let notify = api.agent_waiters.waiter(&hello.instance);
    let answer = loop {
        let notified = notify.notified();
        api.pool.heard(&hello.owner_uid, &hello.instance, Timestamp::now());
        if let Some((run, shard)) = claimed_work(&api, &hello) {
            let uid = run.metadata.uid.clone().unwrap_or_default();
            api.book.register(&uid, shard.index, shard.lease_id, Timestamp::now());
            api.wakers.wake_run(ObjectRef::from_obj(run.as_ref()));
            tracing::info!(instance = %hello.instance, testrun = %run.metadata.name.clone().unwrap_or_default(), shard = shard.index, lease = shard.lease_id, "claimed pool VM received its assignment");
            break Json(assignment(&api.key, &run, &shard)).into_response();
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break StatusCode::NO_CONTENT.into_response();
        }
        let _ = tokio::time::timeout((deadline - now).min(std::time::Duration::from_secs(1)), notified).await;
    };
    api.agent_waiters.done(&hello.instance, notify);
    Ok(answer)
}

/// The TestRun shard that claimed this pool VM: the claim recorded in the
/// preset's status names the run and shard, whose current attempt must be
/// this VM.
fn claimed_work(api: &AgentApi, hello: &PoolHello) -> Option<(Arc<TestRun>, ShardStatus)> {
    let preset = api.presets.get(&ObjectRef::new(&hello.preset).within(&hello.namespace))?;
    let preset = api.fresh_presets.latest(preset);
    let instance = preset.status.as_ref()?.instances.iter().find(|i| i.name == hello.instance)?;
    let claim = Claim::parse(instance.claimed_by.as_deref()?)?;
    if claim.namespace != hello.namespace {
        return None;
    }
    let run = lookup(api, &claim.namespace, &claim.testrun).ok()?;
    if !claim.is_by(&claim.namespace, &claim.testrun, run.metadata.uid.as_deref().unwrap_or_default()) {
        return None;
    }
    let shard = run
        .status
        .as_ref()?
        .shards
        .iter()
        .find(|s| s.index == claim.shard && s.instance.as_deref() == Some(hello.instance.as_str()))?
        .clone();
    (!shard.phase.is_finished()).then_some((run, shard))
}
