//! The emulator's own API under `/emulator/v1`: fault rules, the instance
//! and process table, health.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use bytes::Bytes;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Emulator;
use super::faults::FaultRule;
use super::vm::group_alive;

/// A whole fault set, as `PUT /emulator/v1/faults` takes it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSet {
    /// Seed for probabilities.
    #[serde(default)]
    pub seed: u64,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<FaultRule>,
}

/// One VM in the process table.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRow {
    /// Project.
    pub project: String,
    /// Zone.
    pub zone: String,
    /// Name.
    pub name: String,
    /// Status.
    pub status: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Process group id of its startup script, if booted.
    pub pid: Option<i32>,
    /// Whether any process of that group is alive.
    pub process_alive: bool,
    /// The VM's `GCE_METADATA_HOST`.
    pub metadata_host: Option<String>,
    /// Whether it is a Spot VM.
    #[serde(default)]
    pub spot: bool,
    /// Whether Compute Engine preempted it (it stops or goes after the notice).
    #[serde(default)]
    pub preempted: bool,
}

/// The routes under `/emulator/v1`.
pub fn router(emulator: Arc<Emulator>) -> Router {
    Router::new()
        .route("/emulator/v1/healthz", get(|| async { "ok" }))
        .route("/emulator/v1/faults", get(list_faults).post(add_fault).put(replace_faults).delete(clear_faults))
        .route("/emulator/v1/faults/{id}", delete(remove_fault))
        .route("/emulator/v1/instances", get(instances))
        .route("/emulator/v1/instances/{zone}/{name}/preempt", axum::routing::post(preempt))
        .route("/emulator/v1/history", get(history))
        .route("/emulator/v1/accepted-inserts", get(accepted_inserts))
        .route("/emulator/v1/calls", get(calls).delete(reset_calls))
        .with_state(emulator)
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

async fn list_faults(State(emulator): State<Arc<Emulator>>) -> Response {
    Json(json!({ "rules": emulator.lock().faults.rules() })).into_response()
}

async fn add_fault(State(emulator): State<Arc<Emulator>>, body: Bytes) -> Response {
    let rule: FaultRule = match serde_json::from_slice(&body) {
        Ok(rule) => rule,
        Err(e) => return bad_request(format!("invalid fault rule: {e}")),
    };
    if let Err(e) = rule.validate() {
        return bad_request(e);
    }
    let id = emulator.lock().faults.add(rule);
    (StatusCode::CREATED, Json(json!({ "id": id }))).into_response()
}

async fn replace_faults(State(emulator): State<Arc<Emulator>>, body: Bytes) -> Response {
    let set: FaultSet = match serde_json::from_slice(&body) {
        Ok(set) => set,
        Err(e) => return bad_request(format!("invalid fault set: {e}")),
    };
    if let Some(e) = set.rules.iter().find_map(|r| r.validate().err()) {
        return bad_request(e);
    }
    emulator.lock().faults.replace(set.rules, set.seed);
    list_faults(State(emulator)).await
}

async fn clear_faults(State(emulator): State<Arc<Emulator>>) -> Response {
    emulator.lock().faults.replace(Vec::new(), 0);
    StatusCode::NO_CONTENT.into_response()
}

async fn remove_fault(State(emulator): State<Arc<Emulator>>, Path(id): Path<u64>) -> Response {
    if emulator.lock().faults.remove(id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no fault rule {id}") }))).into_response()
    }
}

async fn instances(State(emulator): State<Arc<Emulator>>) -> Json<Vec<VmRow>> {
    let state = emulator.lock();
    let rows = state
        .instances
        .iter()
        .map(|(key, record)| {
            let pid = record.process.as_ref().map(|p| p.pid);
            VmRow {
                project: key.project.clone(),
                zone: key.zone.clone(),
                name: key.name.clone(),
                status: record.status.as_str().to_string(),
                labels: record.labels.clone(),
                pid,
                process_alive: pid.is_some_and(|p| p > 0 && group_alive(Pid::from_raw(p))),
                metadata_host: record.process.as_ref().map(|p| p.metadata_host.clone()),
                spot: record.is_spot(),
                preempted: record.preempted,
            }
        })
        .collect();
    Json(rows)
}

/// Preempts a running Spot VM, named by zone and name (in whichever project
/// holds it): 200 with the notice, 404 without such a VM, 409 for a standard
/// VM or one not RUNNING.
async fn preempt(State(emulator): State<Arc<Emulator>>, Path((zone, name)): Path<(String, String)>) -> Response {
    let key = {
        let state = emulator.lock();
        state.instances.keys().find(|k| k.zone == zone && k.name == name).cloned()
    };
    let refused = |status: StatusCode, e: super::lifecycle::PreemptRefused| {
        (status, Json(json!({ "error": e.to_string() }))).into_response()
    };
    let Some(key) = key else {
        return refused(StatusCode::NOT_FOUND, super::lifecycle::PreemptRefused::NotFound);
    };
    match emulator.preempt(&key, None) {
        Ok(p) => Json(json!({
            "preempted": true,
            "noticeSeconds": p.notice.as_secs_f64(),
            "then": if p.delete { "delete" } else { "stop" },
        }))
        .into_response(),
        Err(e @ super::lifecycle::PreemptRefused::NotFound) => refused(StatusCode::NOT_FOUND, e),
        Err(e) => refused(StatusCode::CONFLICT, e),
    }
}

/// Compute API calls received so far, by method.
async fn calls(State(emulator): State<Arc<Emulator>>) -> Json<std::collections::BTreeMap<&'static str, u64>> {
    Json(emulator.lock().calls.clone())
}

async fn reset_calls(State(emulator): State<Arc<Emulator>>) -> StatusCode {
    emulator.lock().calls.clear();
    StatusCode::NO_CONTENT
}

/// Every VM ever created, with the process group it booted.
async fn accepted_inserts(State(emulator): State<Arc<Emulator>>) -> Json<Vec<super::state::HistoryRow>> {
    Json(emulator.lock().accepted_inserts.clone())
}

async fn history(State(emulator): State<Arc<Emulator>>) -> Json<Vec<super::state::HistoryRow>> {
    Json(emulator.lock().history.clone())
}
