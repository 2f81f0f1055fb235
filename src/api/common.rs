//! Types shared by TestRun and PrebuildPreset: the VM shape, environment
//! variables, conditions and tracked cloud operations.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Compute Engine zone names, e.g. `us-central1-a` or `europe-west4-b`.
pub const ZONE_PATTERN: &str = r"^[a-z]+-[a-z]+[0-9]+-[a-z]$";
/// Compute Engine machine type names, e.g. `e2-standard-4`, `n2-custom-8-16384`, `f1-micro`.
pub const MACHINE_TYPE_PATTERN: &str = r"^[a-z][a-z0-9]*(-[a-z0-9]+)+$";
/// Compute Engine label values: lowercase letters, digits, `_` and `-`, at most 63 characters.
pub const LABEL_VALUE_PATTERN: &str = r"^[a-z0-9_-]{0,63}$";
/// Service account e-mail addresses.
pub const SERVICE_ACCOUNT_PATTERN: &str = r"^[a-z0-9-]+@[a-z0-9.-]+\.[a-z]+$";
/// Environment variable names.
pub const ENV_NAME_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";

/// The shape of a Compute Engine VM: where it runs, what it runs on and what
/// it boots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    /// Zones to create the VM in, in order of preference, e.g.
    /// `["us-central1-a", "us-central1-b"]`. When a zone is out of capacity or
    /// quota the next one is tried.
    #[schemars(length(min = 1, max = 16), inner(pattern(ZONE_PATTERN)))]
    pub zones: Vec<String>,

    /// Compute Engine machine type, e.g. `e2-standard-4`.
    #[schemars(length(min = 1, max = 63), pattern(MACHINE_TYPE_PATTERN))]
    pub machine_type: String,

    /// Boot disk image: an image or image family URL such as
    /// `projects/debian-cloud/global/images/family/debian-12`.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// Boot disk size in GB.
    #[serde(default = "default_disk_gb")]
    #[schemars(range(min = 10, max = 65536))]
    pub disk_gb: i32,

    /// Extra labels put on the VM. Keys and values follow Compute Engine's
    /// label rules (lowercase letters, digits, `_` and `-`, at most 63
    /// characters); keys the controller sets itself (`managed-by`,
    /// `installation`, `owner-kind`, `owner-namespace`, `owner-uid`, `shard`,
    /// `attempt`, `template-version`) are not allowed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map_schema")]
    pub labels: BTreeMap<String, String>,

    /// Extra instance metadata (key/value pairs the VM can read from its
    /// metadata server). Keys the controller sets itself (`startup-script`
    /// and those starting with `testrun-`) and `startup-script-url` (which
    /// would run in place of the controller's script) are not allowed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,

    /// The VmClass the VM belongs to: its network, service account and
    /// limits (`kubectl get vmclasses`). Unset: the class annotated
    /// `testrun.dev/is-default-class: "true"`, or none (the project's
    /// default network, no service account, no limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub class_name: Option<String>,

    /// Use Spot VMs (`provisioningModel: SPOT`, deleted when reclaimed):
    /// cheaper, but Compute Engine may reclaim them at any time. A TestRun
    /// retries a reclaimed VM's shard on a new VM without using an
    /// attempt, up to `maxPreemptions` times; a pool replaces it.
    #[serde(default)]
    pub spot: bool,

    /// For a TestRun with `spot`: once a shard was preempted
    /// `maxPreemptions` times, its next VMs are standard VMs. Set to false
    /// to stay on Spot VMs, each further preemption then using an attempt.
    /// A PrebuildPreset ignores it.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub spot_fallback: bool,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            zones: Vec::new(),
            machine_type: String::new(),
            image: String::new(),
            disk_gb: default_disk_gb(),
            labels: BTreeMap::new(),
            metadata: BTreeMap::new(),
            class_name: None,
            spot: false,
            spot_fallback: true,
        }
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A string map whose values must be Compute Engine label values.
fn label_map_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 64,
        "additionalProperties": { "type": "string", "pattern": LABEL_VALUE_PATTERN },
    })
}

fn default_disk_gb() -> i32 {
    20
}

/// One environment variable for the test command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EnvVar {
    /// Variable name, e.g. `RUST_LOG`.
    #[schemars(length(min = 1, max = 256), pattern(ENV_NAME_PATTERN))]
    pub name: String,
    /// Variable value; empty when unset.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// Whether a condition holds, following Kubernetes API conventions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell.
    Unknown,
}

/// One aspect of an object's state, following Kubernetes API conventions
/// (`type`, `status`, `reason`, `message`, `lastTransitionTime`,
/// `observedGeneration`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type in CamelCase, e.g. `Ready`, `Progressing`, `Degraded`,
    /// `InvalidSpec`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// A CamelCase word saying why the condition last changed, for programs.
    pub reason: String,
    /// A sentence saying why the condition last changed, for people.
    #[serde(default)]
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: Time,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// What a tracked cloud operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OperationKind {
    /// Creates a VM.
    Insert,
    /// Deletes a VM.
    Delete,
    /// Changes a VM's labels (a prebuilt VM being claimed).
    SetLabels,
}

/// Where a tracked cloud operation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OperationState {
    /// Recorded, call not yet confirmed by Compute Engine.
    Intended,
    /// Accepted by Compute Engine, not finished.
    Running,
    /// Finished without error.
    Done,
    /// Finished with an error, or vanished.
    Failed,
}

/// A cloud operation the controller started and follows to its end. It is
/// recorded before the call is made, so a crash never loses track of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackedOperation {
    /// What the operation does.
    pub kind: OperationKind,
    /// The VM it acts on.
    pub instance: String,
    /// The zone of that VM.
    pub zone: String,
    /// The idempotency key sent with the call; a retried call with the same
    /// key never acts twice.
    pub request_id: String,
    /// The Compute Engine operation name, once the call was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Where the operation stands.
    pub state: OperationState,
    /// How many times the call was made.
    #[serde(default)]
    pub tries: i32,
    /// When the operation was first recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// A plain description of the last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The last call got no answer that says whether Compute Engine took
    /// it (no connection, or HTTP 5xx): it is made again with the same
    /// request id, so it acts at most once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answer_lost: bool,
}
