//! [`Compute`] on the `google-cloud-compute-v1` client: Compute Engine with
//! application default credentials, or any endpoint (the emulator) with
//! anonymous credentials.
//!
//! The client's own retries are off: a reconcile never waits out a backoff
//! inside a call; the controller retries on its next pass.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use google_cloud_compute_v1::client::{Instances, ZoneOperations};
use google_cloud_compute_v1::model;
use google_cloud_gax::error::rpc::StatusDetails;
use google_cloud_gax::paginator::Paginator as _;
use google_cloud_gax::retry_policy::NeverRetry;

use super::error::{ComputeError, ErrorCode};
use super::{Compute, Instance, InstanceSpec, InstanceStatus, Listing, Operation, OperationStatus};

/// Where and as whom to reach Compute Engine.
#[derive(Clone, Debug)]
pub struct GceConfig {
    /// The Google Cloud project holding the VMs.
    pub project: String,
    /// An endpoint such as `http://127.0.0.1:8089` (the emulator), reached
    /// with anonymous credentials; Compute Engine itself when unset.
    pub endpoint: Option<String>,
    /// Longest time one HTTP call may take.
    pub call_timeout: Duration,
    /// Page size of list calls.
    pub page_size: u32,
}

impl GceConfig {
    /// Settings for a project, with defaults for the rest.
    pub fn new(project: impl Into<String>) -> Self {
        Self { project: project.into(), endpoint: None, call_timeout: Duration::from_secs(30), page_size: 200 }
    }

    /// The same settings pointed at another endpoint.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Building the Instances client failed (e.g. no default credentials).
    #[error("building the Compute Engine instances client: {0}")]
    Instances(#[source] google_cloud_gax::client_builder::Error),
    /// Building the ZoneOperations client failed.
    #[error("building the Compute Engine zone operations client: {0}")]
    ZoneOperations(#[source] google_cloud_gax::client_builder::Error),
}

/// The Compute Engine back end.
#[derive(Clone, Debug)]
pub struct GceCompute {
    config: GceConfig,
    instances: Instances,
    operations: ZoneOperations,
}

impl GceCompute {
    /// Builds the clients. Without an endpoint this reads application
    /// default credentials.
    pub async fn connect(config: GceConfig) -> Result<Self, ConnectError> {
        let mut instances =
            Instances::builder().with_retry_policy(NeverRetry).with_attempt_timeout(config.call_timeout);
        let mut operations =
            ZoneOperations::builder().with_retry_policy(NeverRetry).with_attempt_timeout(config.call_timeout);
        if let Some(endpoint) = &config.endpoint {
            let anonymous = || google_cloud_auth::credentials::anonymous::Builder::new().build();
            instances = instances.with_endpoint(endpoint).with_credentials(anonymous());
            operations = operations.with_endpoint(endpoint).with_credentials(anonymous());
        }
        let instances = instances.build().await.map_err(ConnectError::Instances)?;
        let operations = operations.build().await.map_err(ConnectError::ZoneOperations)?;
        Ok(Self { config, instances, operations })
    }

    /// The project the VMs live in.
    pub fn project(&self) -> &str {
        &self.config.project
    }
}

impl Compute for GceCompute {
    async fn insert(&self, spec: &InstanceSpec) -> Result<Operation, ComputeError> {
        let op = self
            .instances
            .insert()
            .set_project(&self.config.project)
            .set_zone(&spec.zone)
            .set_request_id(&spec.request_id)
            .set_body(instance_resource(spec))
            .send()
            .await
            .map_err(|e| api_error("instances.insert", e))?;
        Ok(operation(op, &spec.zone))
    }

    async fn delete(&self, zone: &str, name: &str, request_id: &str) -> Result<Operation, ComputeError> {
        let op = self
            .instances
            .delete()
            .set_project(&self.config.project)
            .set_zone(zone)
            .set_instance(name)
            .set_request_id(request_id)
            .send()
            .await
            .map_err(|e| api_error("instances.delete", e))?;
        Ok(operation(op, zone))
    }

    async fn get(&self, zone: &str, name: &str) -> Result<Option<Instance>, ComputeError> {
        let result =
            self.instances.get().set_project(&self.config.project).set_zone(zone).set_instance(name).send().await;
        match result {
            Ok(found) => Ok(Some(instance(found))),
            Err(e) => {
                let e = api_error("instances.get", e);
                if e.is_not_found() { Ok(None) } else { Err(e) }
            }
        }
    }

    async fn list_by_labels(&self, labels: &BTreeMap<String, String>) -> Result<Listing, ComputeError> {
        let mut pages = self
            .instances
            .aggregated_list()
            .set_project(&self.config.project)
            .set_filter(label_filter(labels))
            .set_max_results(self.config.page_size)
            .by_page();
        let mut listing = Listing::default();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| api_error("instances.aggregatedList", e))?;
            listing.pages += 1;
            listing.unreachable.extend(page.unreachables.iter().filter_map(|scope| zone_of_scope(scope)));
            for (scope, scoped) in page.items {
                let unreachable = scoped
                    .warning
                    .as_ref()
                    .and_then(|w| w.code.as_ref())
                    .is_some_and(|c| *c == model::instances_scoped_list::warning::Code::Unreachable);
                if unreachable && let Some(zone) = zone_of_scope(&scope) {
                    listing.unreachable.insert(zone);
                }
                listing.instances.extend(scoped.instances.into_iter().map(instance));
            }
        }
        // The filter already selects; checking again keeps a lenient server
        // from handing back VMs of another installation.
        listing.instances.retain(|i| labels.iter().all(|(k, v)| i.labels.get(k) == Some(v)));
        Ok(listing)
    }

    async fn get_operation(&self, zone: &str, name: &str) -> Result<Operation, ComputeError> {
        let result =
            self.operations.get().set_project(&self.config.project).set_zone(zone).set_operation(name).send().await;
        match result {
            Ok(op) => Ok(operation(op, zone)),
            Err(e) => {
                let e = api_error("zoneOperations.get", e);
                if e.is_not_found() {
                    Err(ComputeError::Api {
                        call: "zoneOperations.get",
                        code: ErrorCode::OperationVanished,
                        status: 404,
                        message: format!("operation {name} in {zone} is not known"),
                    })
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn set_labels(
        &self,
        zone: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        fingerprint: &str,
        request_id: &str,
    ) -> Result<Operation, ComputeError> {
        let fingerprint = URL_SAFE_NO_PAD.decode(fingerprint.trim_end_matches('=')).map_err(|e| ComputeError::Api {
            call: "instances.setLabels",
            code: ErrorCode::Invalid,
            status: 400,
            message: format!("label fingerprint {fingerprint:?} is not base64: {e}"),
        })?;
        let body = model::InstancesSetLabelsRequest::new()
            .set_labels(labels.clone())
            .set_label_fingerprint(bytes::Bytes::from(fingerprint));
        let op = self
            .instances
            .set_labels()
            .set_project(&self.config.project)
            .set_zone(zone)
            .set_instance(name)
            .set_request_id(request_id)
            .set_body(body)
            .send()
            .await
            .map_err(|e| api_error("instances.setLabels", e))?;
        Ok(operation(op, zone))
    }
}

/// A filter expression selecting VMs that carry all `labels`.
pub fn label_filter(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("(labels.{k} = \"{v}\")")).collect::<Vec<_>>().join(" AND ")
}

fn instance_resource(spec: &InstanceSpec) -> model::Instance {
    let zone = &spec.zone;
    let mut metadata_items = Vec::new();
    if !spec.startup_script.is_empty() {
        metadata_items.push(model::metadata::Items::new().set_key("startup-script").set_value(&*spec.startup_script));
    }
    let replaced = |key: &String| !spec.startup_script.is_empty() && key == "startup-script";
    for (key, value) in spec.metadata.iter().filter(|(key, _)| !replaced(key)) {
        metadata_items.push(model::metadata::Items::new().set_key(key).set_value(value));
    }
    let seconds = i64::try_from(spec.max_run_duration.as_secs()).unwrap_or(i64::MAX).max(30);
    let mut scheduling = model::Scheduling::new()
        .set_max_run_duration(model::Duration::new().set_seconds(seconds))
        .set_instance_termination_action(model::scheduling::InstanceTerminationAction::Delete)
        .set_automatic_restart(false);
    scheduling = if spec.spot {
        scheduling.set_provisioning_model(model::scheduling::ProvisioningModel::Spot)
    } else {
        scheduling
            .set_provisioning_model(model::scheduling::ProvisioningModel::Standard)
            .set_on_host_maintenance(model::scheduling::OnHostMaintenance::Terminate)
    };
    let disk = model::AttachedDisk::new().set_boot(true).set_auto_delete(true).set_initialize_params(
        model::AttachedDiskInitializeParams::new().set_source_image(&spec.image).set_disk_size_gb(spec.disk_gb),
    );
    let mut resource = model::Instance::new()
        .set_name(&spec.name)
        .set_machine_type(format!("zones/{zone}/machineTypes/{}", spec.machine_type))
        .set_labels(spec.labels.clone())
        .set_metadata(model::Metadata::new().set_items(metadata_items))
        .set_scheduling(scheduling)
        .set_disks([disk])
        .set_network_interfaces([network_interface(&spec.network)]);
    if !spec.network.tags.is_empty() {
        resource = resource.set_tags(model::Tags::new().set_items(spec.network.tags.clone()));
    }
    if let Some(account) = &spec.service_account {
        resource = resource.set_service_accounts([model::ServiceAccount::new()
            .set_email(&account.email)
            .set_scopes(account.scopes.clone())]);
    }
    resource
}

/// The VM's one interface: the network (the project's `default` when
/// neither it nor a subnetwork is given), the subnetwork, and an external IP
/// only when asked for.
fn network_interface(network: &crate::compute::NetworkSpec) -> model::NetworkInterface {
    let mut nic = model::NetworkInterface::new();
    match (&network.network, &network.subnetwork) {
        (Some(net), _) => nic = nic.set_network(net),
        (None, None) => nic = nic.set_network("global/networks/default"),
        (None, Some(_)) => {}
    }
    if let Some(subnetwork) = &network.subnetwork {
        nic = nic.set_subnetwork(subnetwork);
    }
    if network.external_ip {
        nic = nic.set_access_configs([model::AccessConfig::new()
            .set_name("External NAT")
            .set_type(model::access_config::Type::OneToOneNat)]);
    }
    nic
}

/// The zone of an aggregated list scope (`zones/us-central1-a`); none for
/// regions and other scopes.
fn zone_of_scope(scope: &str) -> Option<String> {
    let zone = scope.rsplit_once("zones/").map(|(_, z)| z)?;
    (!zone.is_empty() && !zone.contains('/')).then(|| zone.to_string())
}

/// The last path segment of a Compute Engine URL (`.../zones/us-central1-a`
/// → `us-central1-a`).
fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

fn instance(found: model::Instance) -> Instance {
    let metadata = found
        .metadata
        .map(|m| m.items.into_iter().filter_map(|i| Some((i.key?, i.value.unwrap_or_default()))).collect())
        .unwrap_or_default();
    Instance {
        name: found.name.unwrap_or_default(),
        zone: found.zone.as_deref().map(last_segment).unwrap_or_default().to_string(),
        status: found
            .status
            .as_ref()
            .and_then(|s| s.name())
            .map(InstanceStatus::parse)
            .unwrap_or(InstanceStatus::Other(String::new())),
        labels: found.labels.into_iter().collect(),
        label_fingerprint: found.label_fingerprint.map(|b| URL_SAFE_NO_PAD.encode(b)).unwrap_or_default(),
        metadata,
        creation_timestamp: found.creation_timestamp,
    }
}

fn operation(op: model::Operation, zone: &str) -> Operation {
    let name = op.name.clone().unwrap_or_default();
    let status = match op.status.as_ref().and_then(|s| s.name()) {
        Some("DONE") => OperationStatus::Done,
        Some("RUNNING") => OperationStatus::Running,
        _ => OperationStatus::Pending,
    };
    let error = operation_error(&op, &name);
    Operation {
        name,
        zone: op.zone.as_deref().map(last_segment).filter(|z| !z.is_empty()).unwrap_or(zone).to_string(),
        status,
        error,
    }
}

fn operation_error(op: &model::Operation, name: &str) -> Option<ComputeError> {
    if let Some(first) = op.error.as_ref().and_then(|e| e.errors.first()) {
        return Some(ComputeError::OperationFailed {
            operation: name.to_string(),
            code: ErrorCode::parse(first.code.as_deref().unwrap_or_default()),
            message: first.message.clone().unwrap_or_default(),
        });
    }
    let status = op.http_error_status_code.filter(|s| *s >= 400)?;
    Some(ComputeError::OperationFailed {
        operation: name.to_string(),
        code: ErrorCode::from_http_status(u16::try_from(status).unwrap_or(500)),
        message: op.http_error_message.clone().unwrap_or_default(),
    })
}

/// Keeps what Compute Engine said about a failed call.
fn api_error(call: &'static str, e: google_cloud_gax::error::Error) -> ComputeError {
    let Some(status) = e.http_status_code() else {
        let code = if e.is_timeout() { "TIMEOUT" } else { "" };
        return if code.is_empty() {
            ComputeError::Transport { call, message: e.to_string() }
        } else {
            ComputeError::Api { call, code: ErrorCode::Timeout, status: 408, message: e.to_string() }
        };
    };
    let reason = e.status().and_then(|s| {
        s.details.iter().find_map(|d| match d {
            StatusDetails::ErrorInfo(info) if !info.reason.is_empty() => Some(info.reason.clone()),
            _ => None,
        })
    });
    let code = match reason {
        Some(reason) => match ErrorCode::parse(&reason) {
            ErrorCode::Other(_) => ErrorCode::from_http_status(status),
            known => known,
        },
        None => ErrorCode::from_http_status(status),
    };
    let message = e.status().map(|s| s.message.clone()).unwrap_or_else(|| e.to_string());
    ComputeError::Api { call, code, status, message }
}
