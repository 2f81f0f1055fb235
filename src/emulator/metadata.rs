//! The metadata server of one VM, as on Compute Engine: every request must
//! carry `Metadata-Flavor: Google`, and answers carry it too.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Emulator;
use super::state::{InstanceKey, machine_type_name, project_number};

#[derive(Clone)]
struct Vm {
    emulator: Arc<Emulator>,
    key: InstanceKey,
    id: u64,
}

/// The metadata routes for one VM.
pub fn router(emulator: Arc<Emulator>, key: InstanceKey, id: u64) -> Router {
    Router::new().fallback(serve).with_state(Vm { emulator, key, id })
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert("Metadata-Flavor", HeaderValue::from_static("Google"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(body: impl Into<String>) -> Response {
    answer(StatusCode::OK, "application/text", body.into())
}

fn not_found() -> Response {
    answer(StatusCode::NOT_FOUND, "text/html; charset=UTF-8", "Not Found".to_string())
}

async fn serve(State(vm): State<Vm>, Query(params): Query<HashMap<String, String>>, request: Request) -> Response {
    let flavor = request.headers().get("Metadata-Flavor").and_then(|v| v.to_str().ok());
    if flavor != Some("Google") {
        return answer(
            StatusCode::FORBIDDEN,
            "text/html; charset=UTF-8",
            "Missing required header: Metadata-Flavor".into(),
        );
    }
    let path = request.uri().path().trim_start_matches("/computeMetadata/v1/").to_string();
    if !request.uri().path().starts_with("/computeMetadata/v1/") {
        return not_found();
    }
    let json_wanted =
        params.get("alt").is_some_and(|a| a == "json") || params.get("recursive").is_some_and(|r| r == "true");

    let (machine_type, attributes, service_account, preempted) = {
        let state = vm.emulator.lock();
        let Some(record) = state.instances.get(&vm.key).filter(|r| r.id == vm.id) else {
            return answer(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "instance is gone".into());
        };
        let attributes: Vec<(String, String)> = record
            .resource
            .metadata
            .as_ref()
            .map(|m| {
                m.items.iter().filter_map(|i| Some((i.key.clone()?, i.value.clone().unwrap_or_default()))).collect()
            })
            .unwrap_or_default();
        let machine = record.resource.machine_type.as_deref().map(machine_type_name).unwrap_or_default().to_string();
        let account =
            record.resource.service_accounts.first().and_then(|s| s.email.clone()).unwrap_or_else(|| "default".into());
        (machine, attributes, account, record.preempted)
    };
    let number = project_number(&vm.key.project);
    match path.as_str() {
        "instance/name" => text(&vm.key.name),
        // TRUE from a Spot VM's preemption notice until it stops (no
        // wait_for_change: the answer is immediate).
        "instance/preempted" => text(if preempted { "TRUE" } else { "FALSE" }),
        "instance/id" => text(vm.id.to_string()),
        "instance/zone" => text(format!("projects/{number}/zones/{}", vm.key.zone)),
        "instance/hostname" => text(format!("{}.{}.c.{}.internal", vm.key.name, vm.key.zone, vm.key.project)),
        "instance/machine-type" => text(format!("projects/{number}/machineTypes/{machine_type}")),
        "instance/service-accounts/default/email" => text(service_account),
        "project/project-id" => text(&vm.key.project),
        "project/numeric-project-id" => text(number.to_string()),
        "instance/attributes/" | "instance/attributes" => {
            if json_wanted {
                let map: serde_json::Map<String, serde_json::Value> =
                    attributes.into_iter().map(|(k, v)| (k, json!(v))).collect();
                answer(StatusCode::OK, "application/json", serde_json::Value::Object(map).to_string())
            } else {
                text(attributes.into_iter().map(|(k, _)| format!("{k}\n")).collect::<String>())
            }
        }
        other => match other.strip_prefix("instance/attributes/") {
            Some(key) => match attributes.into_iter().find(|(k, _)| k == key) {
                Some((_, value)) => text(value),
                None => not_found(),
            },
            None => not_found(),
        },
    }
}
