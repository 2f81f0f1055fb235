//! The Compute Engine v1 REST routes the controller's client calls.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use bytes::Bytes;
use google_cloud_compute_v1::model;
use serde_json::{Value, json};

use super::Emulator;
use super::error::GceError;
use super::faults::{Call, FaultKind, Verdict};
use super::filter::{Filter, Subject};
use super::lifecycle::Mutation;
use super::state::{API_BASE, InstanceKey, OperationKey, instance_json, operation_json};
use crate::api::validation::{is_label_key, is_label_value};
use crate::compute::naming::is_valid_instance_name;

type Params = HashMap<String, String>;
type Answer = Result<Response, GceError>;

/// The routes under `/compute/v1`.
pub fn router(emulator: Arc<Emulator>) -> Router {
    let zone = "/compute/v1/projects/{project}/zones/{zone}";
    Router::new()
        .route(&format!("{zone}/instances"), post(insert).get(list))
        .route(&format!("{zone}/instances/{{instance}}"), get(get_instance).delete(delete))
        .route(&format!("{zone}/instances/{{instance}}/setLabels"), post(set_labels))
        .route("/compute/v1/projects/{project}/aggregated/instances", get(aggregated_list))
        .route(&format!("{zone}/operations/{{operation}}"), get(get_operation))
        .route(&format!("{zone}/operations/{{operation}}/wait"), post(wait_operation))
        .fallback(|| async {
            GceError { status: StatusCode::NOT_FOUND, reason: "notFound", message: "Not Found".into() }
        })
        .with_state(emulator)
}

/// Zone names as Compute Engine spells them, e.g. `us-central1-a`.
pub fn is_valid_zone(zone: &str) -> bool {
    let parts: Vec<&str> = zone.split('-').collect();
    parts.len() == 3
        && !parts[0].is_empty()
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1].bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && parts[1].bytes().last().is_some_and(|b| b.is_ascii_digit())
        && parts[1].bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && parts[2].len() == 1
        && parts[2].bytes().all(|b| b.is_ascii_lowercase())
}

fn check_zone(zone: &str) -> Result<(), GceError> {
    if is_valid_zone(zone) {
        Ok(())
    } else {
        Err(GceError::invalid(format!("Invalid value for field 'zone': '{zone}'. Unknown zone.")))
    }
}

/// Counts a call by method, applies HTTP faults and read delays; returns
/// the verdict for the rest.
async fn judge(emulator: &Emulator, call: Call, zone: Option<&str>) -> Result<Verdict, GceError> {
    let verdict = {
        let mut state = emulator.lock();
        *state.calls.entry(call.method()).or_default() += 1;
        state.faults.judge(call, zone)
    };
    match verdict.http_error {
        Some(FaultKind::RateLimit) => return Err(GceError::rate_limited()),
        Some(_) => return Err(GceError::unavailable()),
        None => {}
    }
    if !call.is_mutation() && !verdict.delay.is_zero() {
        tokio::time::sleep(verdict.delay).await;
    }
    Ok(verdict)
}

fn request_id(params: &Params) -> Result<Option<String>, GceError> {
    match params.get("requestId").filter(|r| !r.is_empty()) {
        None => Ok(None),
        Some(rid) if uuid::Uuid::parse_str(rid).is_ok_and(|u| !u.is_nil()) => Ok(Some(rid.clone())),
        Some(rid) => Err(GceError::invalid(format!(
            "Invalid value for field 'requestId': '{rid}'. The request id must be a valid UUID with the exception that zero UUID is not supported."
        ))),
    }
}

/// How a mutation starts.
enum Begin {
    /// The request id already started an operation: answer with it,
    /// untouched by faults, as Compute Engine does for a repeated call.
    Replay(Value),
    /// A new call, with its request id and what the faults decided.
    Fresh(Option<String>, Verdict),
}

async fn begin(emulator: &Emulator, project: &str, zone: &str, params: &Params, call: Call) -> Result<Begin, GceError> {
    check_zone(zone)?;
    let rid = request_id(params)?;
    if let Some(op) = emulator.existing_operation(project, rid.as_deref()) {
        *emulator.lock().calls.entry(call.method()).or_default() += 1;
        return Ok(Begin::Replay(op));
    }
    Ok(Begin::Fresh(rid, judge(emulator, call, Some(zone)).await?))
}

/// The answer to a mutation that started: its operation, or HTTP 503 when a
/// `lostAnswer` fault hit it (the operation runs all the same).
fn answer_mutation(started: Result<Value, GceError>, verdict: Verdict) -> Answer {
    let op = started?;
    if verdict.lose_answer {
        return Err(GceError::unavailable());
    }
    ok(op)
}

fn ok(value: Value) -> Answer {
    Ok(Json(value).into_response())
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, GceError> {
    serde_json::from_slice(body).map_err(|e| GceError::invalid(format!("Invalid JSON payload received. {e}")))
}

fn validate_instance(resource: &model::Instance) -> Result<(), GceError> {
    let field = |name: &str, value: &str, why: &str| {
        Err(GceError::invalid(format!("Invalid value for field 'resource.{name}': '{value}'. {why}")))
    };
    let name = resource.name.as_deref().unwrap_or_default();
    if !is_valid_instance_name(name) {
        return field("name", name, "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'");
    }
    if resource.machine_type.as_deref().is_none_or(str::is_empty) {
        return field("machineType", "", "Machine type must be specified.");
    }
    let boot = resource.disks.iter().find(|d| d.boot == Some(true)).or(resource.disks.first());
    let has_image = boot
        .and_then(|d| d.initialize_params.as_ref())
        .and_then(|p| p.source_image.as_deref())
        .is_some_and(|s| !s.is_empty())
        || boot.and_then(|d| d.source.as_deref()).is_some_and(|s| !s.is_empty());
    if !has_image {
        return field("disks", "", "Boot disk must have a source image or source disk.");
    }
    for (key, value) in &resource.labels {
        if !is_label_key(key) || !is_label_value(value) {
            return field(
                &format!("labels.{key}"),
                value,
                "Label keys and values must conform to RFC 1035 lowercase rules.",
            );
        }
    }
    if resource.labels.len() > 64 {
        return field("labels", "", "At most 64 labels are allowed.");
    }
    if let Some(scheduling) = &resource.scheduling {
        let limited = scheduling.max_run_duration.is_some() || scheduling.termination_time.is_some();
        if limited && scheduling.instance_termination_action.as_ref().and_then(|a| a.name()).is_none() {
            return field(
                "scheduling.instanceTerminationAction",
                "",
                "Instance termination action must be specified when max run duration or termination time is set.",
            );
        }
        if let Some(seconds) = scheduling.max_run_duration.as_ref().and_then(|d| d.seconds)
            && !(30..=120 * 24 * 3600).contains(&seconds)
        {
            return field(
                "scheduling.maxRunDuration.seconds",
                &seconds.to_string(),
                "Must be between 30 seconds and 120 days.",
            );
        }
    }
    Ok(())
}

async fn insert(
    State(emulator): State<Arc<Emulator>>,
    Path((project, zone)): Path<(String, String)>,
    Query(params): Query<Params>,
    body: Bytes,
) -> Answer {
    let (rid, verdict) = match begin(&emulator, &project, &zone, &params, Call::Insert).await? {
        Begin::Replay(op) => return ok(op),
        Begin::Fresh(rid, verdict) => (rid, verdict),
    };
    let resource: model::Instance = parse_body(&body)?;
    validate_instance(&resource)?;
    super::network::check(&resource, &zone)?;
    let key = InstanceKey { project, zone, name: resource.name.clone().unwrap_or_default() };
    answer_mutation(emulator.start(key, rid, Mutation::Insert(Box::new(resource)), verdict), verdict)
}

async fn delete(
    State(emulator): State<Arc<Emulator>>,
    Path((project, zone, name)): Path<(String, String, String)>,
    Query(params): Query<Params>,
) -> Answer {
    let (rid, verdict) = match begin(&emulator, &project, &zone, &params, Call::Delete).await? {
        Begin::Replay(op) => return ok(op),
        Begin::Fresh(rid, verdict) => (rid, verdict),
    };
    answer_mutation(emulator.start(InstanceKey { project, zone, name }, rid, Mutation::Delete, verdict), verdict)
}

async fn set_labels(
    State(emulator): State<Arc<Emulator>>,
    Path((project, zone, name)): Path<(String, String, String)>,
    Query(params): Query<Params>,
    body: Bytes,
) -> Answer {
    let (rid, verdict) = match begin(&emulator, &project, &zone, &params, Call::SetLabels).await? {
        Begin::Replay(op) => return ok(op),
        Begin::Fresh(rid, verdict) => (rid, verdict),
    };
    let request: model::InstancesSetLabelsRequest = parse_body(&body)?;
    for (key, value) in &request.labels {
        if !is_label_key(key) || !is_label_value(value) {
            return Err(GceError::invalid(format!("Invalid value for field 'labels.{key}': '{value}'.")));
        }
    }
    let Some(fingerprint) = request.label_fingerprint else {
        return Err(GceError::invalid("Required field 'labelFingerprint' not specified"));
    };
    let labels = request.labels.into_iter().collect();
    let mutation = Mutation::SetLabels { labels, fingerprint: fingerprint.to_vec() };
    answer_mutation(emulator.start(InstanceKey { project, zone, name }, rid, mutation, verdict), verdict)
}

async fn get_instance(
    State(emulator): State<Arc<Emulator>>,
    Path((project, zone, name)): Path<(String, String, String)>,
) -> Answer {
    check_zone(&zone)?;
    judge(&emulator, Call::Get, Some(&zone)).await?;
    let key = InstanceKey { project, zone, name };
    let state = emulator.lock();
    match state.instances.get(&key) {
        Some(record) => ok(instance_json(&key, record)),
        None => Err(GceError::not_found(&key.resource())),
    }
}

async fn get_operation(
    State(emulator): State<Arc<Emulator>>,
    Path((project, zone, name)): Path<(String, String, String)>,
) -> Answer {
    check_zone(&zone)?;
    judge(&emulator, Call::OperationGet, Some(&zone)).await?;
    let key = OperationKey { project, zone, name };
    let state = emulator.lock();
    match state.operations.get(&key) {
        Some(op) => ok(operation_json(&key, op)),
        None => {
            Err(GceError::not_found(&format!("projects/{}/zones/{}/operations/{}", key.project, key.zone, key.name)))
        }
    }
}

async fn wait_operation(
    State(emulator): State<Arc<Emulator>>,
    Path((project, zone, name)): Path<(String, String, String)>,
) -> Answer {
    check_zone(&zone)?;
    judge(&emulator, Call::OperationWait, Some(&zone)).await?;
    let key = OperationKey { project, zone, name };
    match emulator.wait_operation(&key).await {
        Some(json) => ok(json),
        None => {
            Err(GceError::not_found(&format!("projects/{}/zones/{}/operations/{}", key.project, key.zone, key.name)))
        }
    }
}

/// Reads `filter`, `maxResults` and `pageToken`.
struct Listing {
    filter: Filter,
    max_results: usize,
    after: Option<(String, String)>,
}

fn listing(params: &Params) -> Result<Listing, GceError> {
    let filter = Filter::parse(params.get("filter").map(String::as_str).unwrap_or_default())
        .map_err(|e| GceError::invalid(e.to_string()))?;
    let max_results = match params.get("maxResults").filter(|m| !m.is_empty()) {
        None => 500,
        Some(m) => match m.parse::<usize>() {
            Ok(0) => 500,
            Ok(n) if n <= 500 => n,
            _ => {
                return Err(GceError::invalid(format!(
                    "Invalid value for field 'maxResults': '{m}'. Must be less than or equal to 500"
                )));
            }
        },
    };
    let after = match params.get("pageToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(token) => Some(
            decode_token(token)
                .ok_or_else(|| GceError::invalid(format!("Invalid value for field 'pageToken': '{token}'.")))?,
        ),
    };
    Ok(Listing { filter, max_results, after })
}

fn encode_token(zone: &str, name: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{zone}/{name}"))
}

fn decode_token(token: &str) -> Option<(String, String)> {
    let bytes = URL_SAFE_NO_PAD.decode(token.trim_end_matches('=')).or_else(|_| URL_SAFE.decode(token)).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (zone, name) = text.split_once('/')?;
    Some((zone.to_string(), name.to_string()))
}

/// One page of matching instances of a project (optionally one zone), in
/// (zone, name) order, and the token of the next page.
fn page(
    emulator: &Emulator,
    project: &str,
    zone: Option<&str>,
    listing: &Listing,
) -> (Vec<(String, Value)>, Option<String>) {
    let state = emulator.lock();
    let low = match &listing.after {
        Some((z, n)) => Bound::Excluded(InstanceKey { project: project.into(), zone: z.clone(), name: n.clone() }),
        None => Bound::Included(InstanceKey {
            project: project.into(),
            zone: zone.unwrap_or_default().into(),
            name: String::new(),
        }),
    };
    let mut items = Vec::new();
    let mut next = None;
    for (key, record) in state.instances.range((low, Bound::Unbounded)) {
        if key.project != project || zone.is_some_and(|z| z != key.zone) {
            break;
        }
        let subject =
            Subject { name: &key.name, status: record.status.as_str(), zone: &key.zone, labels: &record.labels };
        if !listing.filter.matches(&subject) {
            continue;
        }
        if items.len() == listing.max_results {
            if let Some((last_zone, last)) = items
                .last()
                .map(|(z, v): &(String, Value)| (z.clone(), v["name"].as_str().unwrap_or_default().to_string()))
            {
                next = Some(encode_token(&last_zone, &last));
            }
            break;
        }
        items.push((key.zone.clone(), instance_json(key, record)));
    }
    (items, next)
}

async fn list(
    State(emulator): State<Arc<Emulator>>,
    Path((project, zone)): Path<(String, String)>,
    Query(params): Query<Params>,
) -> Answer {
    check_zone(&zone)?;
    judge(&emulator, Call::List, Some(&zone)).await?;
    let listing = listing(&params)?;
    let (items, next) = page(&emulator, &project, Some(&zone), &listing);
    let mut body = json!({
        "kind": "compute#instanceList",
        "id": format!("projects/{project}/zones/{zone}/instances"),
        "items": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "selfLink": format!("{API_BASE}/projects/{project}/zones/{zone}/instances"),
    });
    if let Some(token) = next {
        body["nextPageToken"] = json!(token);
    }
    ok(body)
}

async fn aggregated_list(
    State(emulator): State<Arc<Emulator>>,
    Path(project): Path<String>,
    Query(params): Query<Params>,
) -> Answer {
    judge(&emulator, Call::AggregatedList, None).await?;
    let listing = listing(&params)?;
    let unreachable = emulator.lock().faults.unreachable_zones();
    let (items, next) = page(&emulator, &project, None, &listing);
    let mut scopes: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (zone, item) in items {
        if !unreachable.contains(&zone) {
            scopes.entry(format!("zones/{zone}")).or_default().push(item);
        }
    }
    let mut scopes: serde_json::Map<String, Value> =
        scopes.into_iter().map(|(scope, instances)| (scope, json!({ "instances": instances }))).collect();
    // As Compute Engine: a zone that cannot be reached is a scope with a
    // warning and no instances (on the first page).
    if listing.after.is_none() {
        for zone in &unreachable {
            let scope = format!("zones/{zone}");
            scopes.insert(
                scope.clone(),
                json!({ "warning": {
                    "code": "UNREACHABLE",
                    "message": format!("Scope '{scope}' is unreachable; the resources in it are not listed."),
                    "data": [{ "key": "scope", "value": scope }],
                } }),
            );
        }
    }
    let mut body = json!({
        "kind": "compute#instanceAggregatedList",
        "id": format!("projects/{project}/aggregated/instances"),
        "items": scopes,
        "selfLink": format!("{API_BASE}/projects/{project}/aggregated/instances"),
    });
    if let Some(token) = next {
        body["nextPageToken"] = json!(token);
    }
    ok(body)
}
