//! What the emulator holds: instances, operations and request ids, and how
//! they are written as Compute Engine JSON.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use google_cloud_compute_v1::model;
use serde_json::{Value, json};

use super::faults::Faults;
use super::vm::VmProcess;

/// Where Compute Engine URLs point.
pub const API_BASE: &str = "https://www.googleapis.com/compute/v1";

/// Identifies an instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    /// Project id.
    pub project: String,
    /// Zone name.
    pub zone: String,
    /// Instance name.
    pub name: String,
}

impl InstanceKey {
    /// `projects/P/zones/Z/instances/N`.
    pub fn resource(&self) -> String {
        format!("projects/{}/zones/{}/instances/{}", self.project, self.zone, self.name)
    }
}

/// Identifies an operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OperationKey {
    /// Project id.
    pub project: String,
    /// Zone name.
    pub zone: String,
    /// Operation name.
    pub name: String,
}

/// An instance's lifecycle status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Being allocated.
    Provisioning,
    /// Preparing to boot.
    Staging,
    /// Booted.
    Running,
    /// Being deleted.
    Stopping,
    /// Stopped.
    Terminated,
}

impl Status {
    /// As Compute Engine writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "PROVISIONING",
            Self::Staging => "STAGING",
            Self::Running => "RUNNING",
            Self::Stopping => "STOPPING",
            Self::Terminated => "TERMINATED",
        }
    }
}

/// One instance.
#[derive(Debug)]
pub struct InstanceRecord {
    /// Numeric id, unique over the emulator's life.
    pub id: u64,
    /// The body it was created with (the resource the client sent).
    pub resource: model::Instance,
    /// Lifecycle status.
    pub status: Status,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Label fingerprint; changes with every label change.
    pub label_fingerprint: [u8; 8],
    /// RFC 3339 creation time.
    pub created: String,
    /// When the insert call was accepted (RFC 3339, milliseconds).
    pub requested: String,
    /// How long it may run before Compute Engine ends it.
    pub max_run: Option<Duration>,
    /// Whether ending it deletes it (otherwise it stops).
    pub delete_on_expiry: bool,
    /// The local process of a booted VM.
    pub process: Option<VmProcess>,
    /// A delete operation is under way.
    pub deleting: bool,
    /// A Spot VM Compute Engine preempted: its metadata says
    /// `instance/preempted` TRUE until it is stopped or deleted.
    pub preempted: bool,
}

impl InstanceRecord {
    /// Whether it was created as a Spot VM (`scheduling.provisioningModel: SPOT`).
    pub fn is_spot(&self) -> bool {
        self.resource
            .scheduling
            .as_ref()
            .and_then(|s| s.provisioning_model.as_ref())
            .and_then(|m| m.name())
            .is_some_and(|m| m == "SPOT")
    }
}

/// Where an operation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpStatus {
    /// Accepted.
    Pending,
    /// In progress.
    Running,
    /// Finished.
    Done,
}

impl OpStatus {
    /// As Compute Engine writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Done => "DONE",
        }
    }
}

/// One zone operation.
#[derive(Clone, Debug)]
pub struct OperationRecord {
    /// Numeric id.
    pub id: u64,
    /// `insert`, `delete` or `setLabels`.
    pub operation_type: &'static str,
    /// The instance it acts on.
    pub target: InstanceKey,
    /// The instance's id.
    pub target_id: u64,
    /// Where it stands.
    pub status: OpStatus,
    /// `(code, message)` when it failed.
    pub error: Option<(String, String)>,
    /// RFC 3339 times.
    pub insert_time: String,
    /// When it started running.
    pub start_time: Option<String>,
    /// When it finished.
    pub end_time: Option<String>,
}

/// A VM that was created (its insert succeeded), kept after it is gone.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryRow {
    /// Project.
    pub project: String,
    /// Zone.
    pub zone: String,
    /// Name.
    pub name: String,
    /// Numeric id.
    pub id: u64,
    /// Labels at creation.
    pub labels: BTreeMap<String, String>,
    /// Process group of its startup script, once booted.
    pub pid: Option<i32>,
    /// When its insert call was accepted (RFC 3339, milliseconds).
    pub requested_at: String,
}

/// Everything the emulator holds, behind one lock.
pub struct State {
    /// Instances by key.
    pub instances: BTreeMap<InstanceKey, InstanceRecord>,
    /// Operations by key.
    pub operations: HashMap<OperationKey, OperationRecord>,
    /// `(project, requestId)` → the operation it started.
    pub request_ids: HashMap<(String, String), OperationKey>,
    /// Fault rules.
    pub faults: Faults,
    /// Every VM ever created, in order.
    pub history: Vec<HistoryRow>,
    /// Every insert accepted to make a VM (all but those failing, vanishing
    /// or out of capacity/quota), in order, whether its operation finished
    /// or not (a VM deleted while it was being made is here, not in
    /// `history`).
    pub accepted_inserts: Vec<HistoryRow>,
    /// Compute API calls received, by method (e.g. `instances.insert`).
    pub calls: BTreeMap<&'static str, u64>,
    next_id: u64,
}

impl State {
    /// Empty, with a fault seed.
    pub fn new(seed: u64) -> Self {
        Self {
            instances: BTreeMap::new(),
            operations: HashMap::new(),
            request_ids: HashMap::new(),
            faults: Faults::new(seed),
            history: Vec::new(),
            accepted_inserts: Vec::new(),
            calls: BTreeMap::new(),
            next_id: 1_000_000_000_000,
        }
    }

    /// A fresh numeric id.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The current time, RFC 3339.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// A stable fake project number for a project id.
pub fn project_number(project: &str) -> u64 {
    project.bytes().fold(1_469_598_103_u64, |h, b| h.wrapping_mul(1_099_511_628_211).wrapping_add(u64::from(b)))
        % 900_000_000_000
        + 100_000_000_000
}

/// A fingerprint for a set of labels and a salt, so every change gives a new one.
pub fn fingerprint(labels: &BTreeMap<String, String>, salt: u64) -> [u8; 8] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for (k, v) in labels {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([1]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.to_be_bytes()
}

fn url_safe(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE.encode(bytes)
}

/// The machine type name from a `machineType` field (URL, partial URL or name).
pub fn machine_type_name(field: &str) -> &str {
    field.rsplit('/').next().unwrap_or(field)
}

/// An instance as Compute Engine returns it.
pub fn instance_json(key: &InstanceKey, record: &InstanceRecord) -> Value {
    let mut value = serde_json::to_value(&record.resource).unwrap_or_else(|_| json!({}));
    let zone_url = format!("{API_BASE}/projects/{}/zones/{}", key.project, key.zone);
    let machine = record.resource.machine_type.as_deref().map(machine_type_name).unwrap_or("e2-medium");
    if let Some(obj) = value.as_object_mut() {
        obj.insert("kind".into(), json!("compute#instance"));
        obj.insert("id".into(), json!(record.id.to_string()));
        obj.insert("creationTimestamp".into(), json!(record.created));
        obj.insert("name".into(), json!(key.name));
        obj.insert("zone".into(), json!(zone_url));
        obj.insert("machineType".into(), json!(format!("{zone_url}/machineTypes/{machine}")));
        obj.insert("status".into(), json!(record.status.as_str()));
        obj.insert("selfLink".into(), json!(format!("{zone_url}/instances/{}", key.name)));
        obj.insert("labels".into(), json!(record.labels));
        obj.insert("labelFingerprint".into(), json!(url_safe(&record.label_fingerprint)));
        obj.insert("cpuPlatform".into(), json!("Emulated CPU"));
        if let Some(metadata) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("kind".into(), json!("compute#metadata"));
            metadata.insert("fingerprint".into(), json!(url_safe(&fingerprint(&BTreeMap::new(), record.id))));
        }
        if let Some(nics) = obj.get_mut("networkInterfaces").and_then(Value::as_array_mut) {
            for (i, nic) in nics.iter_mut().enumerate() {
                if let Some(nic) = nic.as_object_mut() {
                    nic.insert("name".into(), json!(format!("nic{i}")));
                    nic.insert("networkIP".into(), json!("127.0.0.1"));
                }
            }
        }
    }
    value
}

/// An operation as Compute Engine returns it.
pub fn operation_json(key: &OperationKey, op: &OperationRecord) -> Value {
    let zone_url = format!("{API_BASE}/projects/{}/zones/{}", key.project, key.zone);
    let mut value = json!({
        "kind": "compute#operation",
        "id": op.id.to_string(),
        "name": key.name,
        "zone": zone_url,
        "operationType": op.operation_type,
        "targetLink": format!("{zone_url}/instances/{}", op.target.name),
        "targetId": op.target_id.to_string(),
        "status": op.status.as_str(),
        "user": "testrun-controller@emulator",
        "progress": if op.status == OpStatus::Done { 100 } else { 0 },
        "insertTime": op.insert_time,
        "selfLink": format!("{zone_url}/operations/{}", key.name),
    });
    if let Some(obj) = value.as_object_mut() {
        if let Some(start) = &op.start_time {
            obj.insert("startTime".into(), json!(start));
        }
        if let Some(end) = &op.end_time {
            obj.insert("endTime".into(), json!(end));
        }
        if let Some((code, message)) = &op.error {
            obj.insert("error".into(), json!({ "errors": [{ "code": code, "message": message }] }));
            let (status, text) = match code.as_str() {
                "ZONE_RESOURCE_POOL_EXHAUSTED" => (503, "SERVICE UNAVAILABLE"),
                "QUOTA_EXCEEDED" => (403, "FORBIDDEN"),
                _ => (500, "INTERNAL SERVER ERROR"),
            };
            obj.insert("httpErrorStatusCode".into(), json!(status));
            obj.insert("httpErrorMessage".into(), json!(text));
        }
    }
    value
}
