//! Prometheus metrics and the health endpoints, served on `--metrics-listen`
//! at `/metrics`, `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Labels naming a PrebuildPreset.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PresetLabels {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub preset: String,
}

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

/// Labels of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `testrun` or `prebuildpreset`.
    pub kind: String,
    /// `ok` or `error`.
    pub result: String,
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
    ready: AtomicBool,
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
        Self {
            registry,
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
            ready: AtomicBool::new(false),
        }
    }

    /// Counts a reconcile.
    pub fn reconciled(&self, kind: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles.get_or_create(&ReconcileLabels { kind: kind.into(), result: result.into() }).inc();
    }

    /// Marks the controller ready (its watches are running).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
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
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn render(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
        .into_response()
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> Response {
    if metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
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
}
