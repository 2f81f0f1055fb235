//! Prometheus metrics and the health endpoints, served on `--metrics-listen`
//! at `/metrics`, `/healthz` and `/readyz`.

pub mod liveness;
pub mod queue;
pub mod steps;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Readiness: caches not filled yet.
const STARTING: u8 = 0;
/// Readiness: another replica leads.
const STANDBY: u8 = 1;
/// Readiness: leading (or alone) with caches filled.
const READY: u8 = 2;

/// Labels naming a PrebuildPreset.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PresetLabels {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub preset: String,
}

/// The `state` label values of `pool_vms`.
pub const POOL_STATES: [&str; 5] = ["ready", "provisioning", "claimed", "outdated", "deleting"];

/// Labels naming a PrebuildPreset and a pool VM state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub preset: String,
    /// `ready`, `provisioning`, `claimed`, `outdated` or `deleting`.
    pub state: String,
}

/// A reason label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: String,
}

/// A result label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// What came of it.
    pub result: String,
}

/// Labels naming a kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `testrun` or `prebuildpreset`.
    pub kind: String,
}

/// Labels naming how a run or an attempt ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// For a run `Succeeded`, `Failed`, `TimedOut`, `Cancelled` or `Error`;
    /// for an attempt an `AttemptOutcome`.
    pub outcome: String,
}

/// Labels of the build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The controller's version (Cargo.toml).
    pub version: String,
}

/// Labels of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `testrun` or `prebuildpreset`.
    pub kind: String,
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of a compute call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodCodeLabels {
    /// The API method, e.g. `instances.insert`.
    pub method: String,
    /// `OK` or the error code.
    pub code: String,
}

/// Labels naming a compute API method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The API method, e.g. `instances.insert`.
    pub method: String,
}

/// Labels naming a quota class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `mutation`, `read` or `operation_read`.
    pub class: String,
}

/// Labels of a resolved operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResolvedLabels {
    /// `insert`, `delete` or `setLabels`.
    pub kind: String,
    /// How the outcome was learned: `evidence` (the inventory or an agent
    /// showed it), `read` (the operation was read), `deadline` (the
    /// operation did not end in time and the VM was looked at).
    pub how: String,
}

type LatencyFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;
type ReconcileFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    /// Pool VMs by preset and state.
    pub pool_vms: Family<PoolStateLabels, Gauge>,
    /// Pending create jobs by preset.
    pub pending_jobs: Family<PresetLabels, Gauge>,
    /// Pending jobs cancelled because their template version stopped being active.
    pub jobs_cancelled: Family<PresetLabels, Counter>,
    /// Failed pool provisions by reason (error code).
    pub provision_failures: Family<ReasonLabels, Counter>,
    /// Time to claim a ready pool VM, in seconds.
    pub claim_seconds: Histogram,
    /// Claim attempts by result (`claimed`, `none`).
    pub claims: Family<ReasonLabels, Counter>,
    /// Reconciles by kind and result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Events published, by reason (e.g. `DeleteFailed`, `DeletionFailing`, `LeaseLost`).
    pub events: Family<ReasonLabels, Counter>,
    /// Orphaned VMs found by the orphan scan.
    pub orphans_found: Counter,
    /// Orphaned VMs deleted by the orphan scan.
    pub orphans_deleted: Counter,
    /// Agent reports from a lease that is not the shard's current one.
    pub stale_reports: Counter,
    /// Agent calls whose token did not verify.
    pub forged_requests: Counter,
    /// Agent calls with a body that could not be read.
    pub malformed_requests: Counter,
    /// Requests for the agent executable by answer (`full`, `not_modified`, `failed`).
    pub agent_binary_requests: Family<ResultLabels, Counter>,
    /// Compute API calls by method and outcome.
    pub compute_requests: Family<MethodCodeLabels, Counter>,
    /// Compute API call latency by method, in seconds (after the rate limiter).
    pub compute_latency: LatencyFamily,
    /// Compute API calls waiting for a token of their quota class.
    pub compute_waiting: Family<ClassLabels, Gauge>,
    /// VMs of this installation the inventory knows.
    pub inventory_vms: Gauge,
    /// Zones the last list could not see.
    pub inventory_unreachable_zones: Gauge,
    /// Inventory lists by result (`ok`, `partial`, `error`).
    pub inventory_lists: Family<ReasonLabels, Counter>,
    /// Cloud operations being followed.
    pub operations_tracked: Gauge,
    /// Cloud operations whose outcome is known, by kind and how it was learned.
    pub operations_resolved: Family<ResolvedLabels, Counter>,
    /// 1 while a preset is Degraded (its latest provisions failed) or
    /// Stalled, by preset; removed with the preset.
    pub pool_degraded: Family<PresetLabels, Gauge>,
    /// Ready VMs each preset wants (`spec.instances`); removed with the preset.
    pub pool_desired_vms: Family<PresetLabels, Gauge>,
    /// Reconcile duration by kind, in seconds.
    pub reconcile_duration: ReconcileFamily,
    /// TestRuns finished, by outcome.
    pub runs_finished: Family<OutcomeLabels, Counter>,
    /// Shard attempts that ended, by outcome (`Succeeded`, `TestFailed`,
    /// `LeaseLost`, …).
    pub attempts_finished: Family<OutcomeLabels, Counter>,
    /// 1, labelled with the build.
    pub build_info: Family<BuildLabels, Gauge>,
    /// The steps of shards' fresh VMs.
    pub shard_steps: steps::ShardSteps,
    /// Runs and shards waiting for VMs.
    pub queue: queue::Queue,
    /// What `/healthz` answers.
    pub liveness: liveness::Liveness,
    /// The presets with per-preset series, by uid.
    pool_series: std::sync::Mutex<std::collections::HashMap<String, PresetLabels>>,
    /// [`STARTING`], [`STANDBY`] or [`READY`].
    readiness: AtomicU8,
    /// 1 while this replica holds the leader Lease (or runs without
    /// leader election), 0 while it stands by.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("testrun_controller");
        let pool_vms = Family::default();
        registry.register("pool_vms", "Pool VMs by PrebuildPreset and state", pool_vms.clone());
        let pending_jobs = Family::default();
        registry.register("pool_pending_jobs", "Create jobs waiting for a provisioner slot", pending_jobs.clone());
        let jobs_cancelled = Family::default();
        registry.register(
            "pool_pending_jobs_cancelled",
            "Pending jobs cancelled because their template version is no longer active",
            jobs_cancelled.clone(),
        );
        let provision_failures = Family::default();
        registry.register("pool_provision_failures", "Failed pool VM provisions by reason", provision_failures.clone());
        let claim_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register("pool_claim_duration_seconds", "Time to claim a ready pool VM", claim_seconds.clone());
        let claims = Family::default();
        registry.register("pool_claims", "Claim attempts by result", claims.clone());
        let reconciles = Family::default();
        registry.register("reconciles", "Reconciles by kind and result", reconciles.clone());
        let events = Family::default();
        registry.register("events", "Events published, by reason", events.clone());
        let orphans_found = Counter::default();
        registry.register("orphans_found", "VMs no live object owns, found by the orphan scan", orphans_found.clone());
        let orphans_deleted = Counter::default();
        registry.register("orphans_deleted", "Orphaned VMs deleted by the orphan scan", orphans_deleted.clone());
        let stale_reports = Counter::default();
        registry.register(
            "agent_stale_reports",
            "Agent reports from a lease that is not current",
            stale_reports.clone(),
        );
        let forged_requests = Counter::default();
        registry.register("agent_forged_requests", "Agent calls whose token did not verify", forged_requests.clone());
        let malformed_requests = Counter::default();
        registry.register(
            "agent_malformed_requests",
            "Agent calls with an unreadable body",
            malformed_requests.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica leads (holds the leader Lease), 0 while it stands by",
            leader.clone(),
        );
        let agent_binary_requests = Family::default();
        registry.register(
            "agent_binary_requests",
            "Requests for the agent executable by answer (full, not_modified, failed)",
            agent_binary_requests.clone(),
        );
        let compute_requests = Family::default();
        registry.register("compute_requests", "Compute API calls by method and outcome", compute_requests.clone());
        let compute_latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "compute_request_duration_seconds",
            "Compute API call latency by method",
            compute_latency.clone(),
        );
        let compute_waiting = Family::default();
        registry.register(
            "compute_calls_waiting",
            "Compute API calls waiting for a token of their quota class",
            compute_waiting.clone(),
        );
        let inventory_vms = Gauge::default();
        registry.register("inventory_vms", "VMs of this installation in the inventory", inventory_vms.clone());
        let inventory_unreachable_zones = Gauge::default();
        registry.register(
            "inventory_unreachable_zones",
            "Zones the last inventory list could not see",
            inventory_unreachable_zones.clone(),
        );
        let inventory_lists = Family::default();
        registry.register("inventory_lists", "Inventory lists by result", inventory_lists.clone());
        let operations_tracked = Gauge::default();
        registry.register("operations_tracked", "Cloud operations being followed", operations_tracked.clone());
        let operations_resolved = Family::default();
        registry.register(
            "operations_resolved",
            "Cloud operations whose outcome is known, by kind and how it was learned",
            operations_resolved.clone(),
        );
        let pool_degraded = Family::default();
        registry.register(
            "pool_degraded",
            "1 while a PrebuildPreset's latest provisions failed or it is stopped by failures or an invalid spec",
            pool_degraded.clone(),
        );
        let pool_desired_vms = Family::default();
        registry.register("pool_desired_vms", "Ready VMs a PrebuildPreset wants", pool_desired_vms.clone());
        let reconcile_duration = ReconcileFamily::new_with_constructor(reconcile_histogram);
        registry.register_with_unit(
            "reconcile_duration",
            "Reconcile duration by kind",
            prometheus_client::registry::Unit::Seconds,
            reconcile_duration.clone(),
        );
        let runs_finished = Family::default();
        registry.register("runs_finished", "TestRuns finished, by outcome", runs_finished.clone());
        let attempts_finished = Family::default();
        registry.register("attempts_finished", "Shard attempts that ended, by outcome", attempts_finished.clone());
        let build_info: Family<BuildLabels, Gauge> = Family::default();
        build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        registry.register("build_info", "The controller's build; always 1", build_info.clone());
        let shard_steps = steps::ShardSteps::default();
        registry.register_with_unit(
            "shard_step_duration",
            "Time each step of a shard's fresh VM took, from the step before (the first from when the VM \
             was asked for): insert_accepted, vm_running, agent_registered, command_started, \
             result_accepted, vm_gone",
            prometheus_client::registry::Unit::Seconds,
            shard_steps.durations.clone(),
        );
        let queue = queue::Queue::default();
        registry.register("runs_waiting", "TestRuns with no shard running or done yet", queue.runs_waiting.clone());
        registry.register("shards_waiting", "Shards waiting for a VM", queue.shards_waiting.clone());
        registry.register(
            "deletes_failing",
            "VM deletes that failed 5 times or more and are still retried",
            queue.deletes_failing.clone(),
        );
        Self {
            registry,
            pool_degraded,
            pool_desired_vms,
            reconcile_duration,
            runs_finished,
            attempts_finished,
            build_info,
            shard_steps,
            queue,
            liveness: liveness::Liveness::default(),
            pool_series: Default::default(),
            compute_requests,
            compute_latency,
            compute_waiting,
            inventory_vms,
            inventory_unreachable_zones,
            inventory_lists,
            operations_tracked,
            operations_resolved,
            pool_vms,
            pending_jobs,
            jobs_cancelled,
            provision_failures,
            claim_seconds,
            claims,
            reconciles,
            events,
            orphans_found,
            orphans_deleted,
            stale_reports,
            forged_requests,
            malformed_requests,
            agent_binary_requests,
            readiness: AtomicU8::new(STARTING),
            leader,
        }
    }

    /// Records that a preset (by uid) has per-preset series.
    pub fn pool_series_seen(&self, uid: &str, labels: &PresetLabels) {
        self.lock_pool_series().insert(uid.to_string(), labels.clone());
    }

    /// Removes every per-preset series of a preset (deleted): a gauge left
    /// at 0 would read as an empty pool that still exists.
    pub fn forget_pool(&self, uid: &str) {
        let labels = {
            let mut series = self.lock_pool_series();
            let Some(labels) = series.remove(uid) else { return };
            // A preset made again under the same name owns them now.
            if series.values().any(|l| *l == labels) {
                return;
            }
            labels
        };
        for state in POOL_STATES {
            let state = PoolStateLabels {
                namespace: labels.namespace.clone(),
                preset: labels.preset.clone(),
                state: state.into(),
            };
            self.pool_vms.remove(&state);
        }
        self.pending_jobs.remove(&labels);
        self.pool_desired_vms.remove(&labels);
        self.pool_degraded.remove(&labels);
        self.jobs_cancelled.remove(&labels);
    }

    /// Keeps the per-preset series of the presets `keep` holds (a sweep
    /// against the cache: a preset whose finalizer was removed by hand is
    /// never reconciled again).
    pub fn retain_pools(&self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.lock_pool_series().keys().filter(|uid| !keep(uid)).cloned().collect();
        for uid in gone {
            self.forget_pool(&uid);
        }
    }

    fn lock_pool_series(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, PresetLabels>> {
        self.pool_series.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a reconcile and how long it took.
    pub fn reconciled(&self, kind: &str, ok: bool, took: std::time::Duration) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles.get_or_create(&ReconcileLabels { kind: kind.into(), result: result.into() }).inc();
        self.reconcile_duration.get_or_create(&KindLabels { kind: kind.into() }).observe(took.as_secs_f64());
    }

    /// Whether the controller is ready.
    pub fn is_ready(&self) -> bool {
        self.readiness.load(Ordering::Relaxed) == READY
    }

    /// Marks the controller ready (its caches and the inventory synced).
    pub fn set_ready(&self) {
        self.readiness.store(READY, Ordering::Relaxed);
    }

    /// Marks the replica a standby: another holds the leader Lease.
    pub fn set_standby(&self) {
        self.readiness.store(STANDBY, Ordering::Relaxed);
        self.leader.set(0);
    }

    /// Marks the replica the leader, still starting until [`Self::set_ready`].
    pub fn set_leading(&self) {
        self.readiness.store(STARTING, Ordering::Relaxed);
        self.leader.set(1);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        text
    }
}

/// The routes `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn render(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
        .into_response()
}

async fn healthz(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.liveness.verdict() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(why) => {
            tracing::error!(%why, "liveness check failing");
            (StatusCode::INTERNAL_SERVER_ERROR, why).into_response()
        }
    }
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.readiness.load(Ordering::Relaxed) {
        READY => (StatusCode::OK, "ok").into_response(),
        // A standby is ready: it works, and takes over when the leader
        // goes. Agents are sent to the leader alone by the agent Service's
        // EndpointSlice, not by readiness, so a rollout or a
        // PodDisruptionBudget counts both replicas.
        STANDBY => (StatusCode::OK, "standby: another replica holds the leader Lease").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response(),
    }
}

/// Serves [`router`] on `addr` in a task of its own; returns the address
/// it listens on.
pub async fn serve(addr: std::net::SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(metrics)).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labelled_metrics() {
        let m = Metrics::new();
        m.pool_vms
            .get_or_create(&PoolStateLabels { namespace: "ci".into(), preset: "pool".into(), state: "ready".into() })
            .set(3);
        m.jobs_cancelled.get_or_create(&PresetLabels { namespace: "ci".into(), preset: "pool".into() }).inc_by(2);
        m.stale_reports.inc();
        let text = m.encode();
        assert!(
            text.contains(r#"testrun_controller_pool_vms{namespace="ci",preset="pool",state="ready"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"testrun_controller_pool_pending_jobs_cancelled_total{namespace="ci",preset="pool"} 2"#),
            "{text}"
        );
        assert!(text.contains("testrun_controller_agent_stale_reports_total 1"), "{text}");
    }

    #[tokio::test]
    async fn healthz_fails_while_a_reconcile_is_wedged_and_recovers_when_it_ends() {
        let metrics = Arc::new(Metrics::new());
        metrics.liveness.set_wedged_after(std::time::Duration::from_millis(50));
        let addr = serve("127.0.0.1:0".parse().expect("an address"), metrics.clone()).await.expect("serving");
        let get = || async {
            let r = reqwest::get(format!("http://{addr}/healthz")).await.expect("GET /healthz");
            (r.status(), r.text().await.expect("a body"))
        };
        assert_eq!(get().await, (reqwest::StatusCode::OK, "ok".to_string()));
        let stuck = metrics.liveness.begin("testrun");
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        let (status, body) = get().await;
        assert_eq!(status, reqwest::StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.starts_with("a testrun reconcile has been under way for"), "{body}");
        drop(stuck);
        assert_eq!(get().await.0, reqwest::StatusCode::OK);
    }

    #[test]
    fn a_gone_preset_loses_every_series_of_its_own() {
        let m = Metrics::new();
        let ours = PresetLabels { namespace: "ci".into(), preset: "pool".into() };
        let other = PresetLabels { namespace: "ci".into(), preset: "other".into() };
        for (uid, labels) in [("u1", &ours), ("u2", &other)] {
            m.pool_series_seen(uid, labels);
            m.pool_desired_vms.get_or_create(labels).set(2);
            m.pool_degraded.get_or_create(labels).set(1);
            m.pool_vms
                .get_or_create(&PoolStateLabels {
                    namespace: labels.namespace.clone(),
                    preset: labels.preset.clone(),
                    state: "ready".into(),
                })
                .set(2);
        }
        // The same name made again (a new uid) keeps the series when the old uid goes.
        m.pool_series_seen("u3", &other);
        m.retain_pools(|uid| uid == "u3");
        let text = m.encode();
        assert!(!text.contains(r#"preset="pool""#), "{text}");
        assert!(text.contains(r#"testrun_controller_pool_desired_vms{namespace="ci",preset="other"} 2"#), "{text}");
    }
}
