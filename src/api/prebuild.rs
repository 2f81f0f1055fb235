//! The PrebuildPreset resource: a warm pool of prebuilt VMs for one template
//! version.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, TrackedOperation, VmSpec};
use super::duration::DurationString;

impl PrebuildPresetSpec {
    /// A digest of every field but `instances`: what a provision makes and
    /// how failures are handled.
    /// Starts with [`PROVISION_DIGEST_VERSION`]: a digest of another version
    /// (the spec type gained a field) is not compared, so an upgrade never
    /// clears every failure streak at once.
    pub fn provision_digest(&self) -> String {
        use sha2::Digest as _;
        let mut spec = self.clone();
        spec.instances = 0;
        let json = serde_json::to_vec(&spec).unwrap_or_default();
        let digest = sha2::Sha256::digest(&json);
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("{PROVISION_DIGEST_VERSION}:{hex}")
    }

    /// Whether `before` is a digest of the current version.
    pub fn comparable_digest(before: &str) -> bool {
        before.split_once(':').is_some_and(|(v, _)| v == PROVISION_DIGEST_VERSION)
    }
}

/// The version of [`PrebuildPresetSpec::provision_digest`]; raise it when
/// the spec's serialization changes (a test pins a digest).
pub const PROVISION_DIGEST_VERSION: &str = "v1";

/// Template versions: usable as a Compute Engine label value (lowercase
/// letters, digits, `_` and `-`, 1 to 63 characters, starting with a letter
/// or digit).
pub const TEMPLATE_VERSION_PATTERN: &str = r"^[a-z0-9][a-z0-9_-]{0,62}$";

/// The pool wanted: its template version, its size, the VM shape, how many
/// VMs may be created at once, and how failures back off.
#[allow(clippy::duplicated_attributes)] // several printcolumn(...) share keys such as type_
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "testrun.dev",
    version = "v1alpha1",
    kind = "PrebuildPreset",
    plural = "prebuildpresets",
    shortname = "pbp",
    namespaced,
    status = "PrebuildPresetStatus",
    doc = "A warm pool of prebuilt VMs of one template version. TestRuns that name the preset in presetRef claim ready VMs from it, and the pool backfills. Changing templateVersion rolls the pool: pending jobs of other versions are cancelled and outdated VMs are replaced as new ones become ready.",
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.templateVersion",
        description = "Active template version"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.instances", description = "Ready VMs wanted"),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.ready",
        description = "Ready, unclaimed VMs of the active version"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.pending",
        description = "Create jobs waiting for a provisioner slot"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Provisioning",
        type_ = "integer",
        json_path = ".status.provisioning",
        description = "VMs being created or booting",
        priority = 1
    ),
    printcolumn(
        name = "Outdated",
        type_ = "integer",
        json_path = ".status.outdated",
        description = "VMs of a template version no longer active",
        priority = 1
    ),
    printcolumn(
        name = "Claimed",
        type_ = "integer",
        json_path = ".status.claimed",
        description = "VMs claimed by TestRuns",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        description = "Message of the Ready condition",
        priority = 1
    ),
    category = "testrun-all",
    scale(
        spec_replicas_path = ".spec.instances",
        status_replicas_path = ".status.ready",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PrebuildPresetSpec {
    /// The active template version, e.g. `v42` or a commit hash. Changing it
    /// rolls the pool to the new version.
    #[schemars(length(min = 1, max = 63), pattern(TEMPLATE_VERSION_PATTERN))]
    pub template_version: String,

    /// Number of ready, unclaimed VMs of the active version to keep.
    #[schemars(range(min = 0, max = 1000))]
    pub instances: i32,

    /// The shape of the pool's VMs.
    pub vm: VmSpec,

    /// Provisioner slots: at most this many VMs are being created at once;
    /// further create jobs wait as pending jobs.
    #[serde(default = "default_max_concurrent_provisions")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrent_provisions: i32,

    /// How long to wait before retrying after a failed provision.
    #[serde(default)]
    pub failure_backoff: FailureBackoff,

    /// After this many failed provisions in a row the preset is Degraded and
    /// stops creating VMs until its spec changes.
    #[serde(default = "default_max_consecutive_failures")]
    #[schemars(range(min = 1, max = 100))]
    pub max_consecutive_failures: i32,
}

fn default_max_concurrent_provisions() -> i32 {
    2
}
fn default_max_consecutive_failures() -> i32 {
    5
}

/// Exponential backoff after failed provisions: the wait starts at `base`,
/// doubles with each failure in a row, and never exceeds `max` (or `base`,
/// when that is longer: a `base` above the default `max` is not an error).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FailureBackoff {
    /// The first wait, e.g. `"10s"`.
    #[serde(default = "default_backoff_base")]
    pub base: DurationString,
    /// The longest wait, e.g. `"5m"`.
    #[serde(default = "default_backoff_max")]
    pub max: DurationString,
}

impl FailureBackoff {
    /// The first and the longest wait in effect: `max` is at least `base`.
    pub fn effective(&self) -> (std::time::Duration, std::time::Duration) {
        let base = self.base.parse().unwrap_or(std::time::Duration::from_secs(10));
        let max = self.max.parse().unwrap_or(std::time::Duration::from_secs(300));
        (base, max.max(base))
    }
}

impl Default for FailureBackoff {
    fn default() -> Self {
        Self { base: default_backoff_base(), max: default_backoff_max() }
    }
}

fn default_backoff_base() -> DurationString {
    DurationString::new("10s")
}
fn default_backoff_max() -> DurationString {
    DurationString::new("5m")
}

/// What the controller observed of a PrebuildPreset. Written only by the
/// controller, through the status subresource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrebuildPresetStatus {
    /// The template version the pool is built for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, unclaimed VMs of the active version; the scale subresource's
    /// `status.replicas` (`kubectl scale pbp/NAME --replicas=N` sets
    /// `spec.instances`).
    #[serde(default)]
    pub ready: i32,
    /// The pool in label-selector form (`testrun.dev/prebuild-preset-uid=UID`),
    /// for the scale subresource: a HorizontalPodAutoscaler needs one. It
    /// selects no Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// VMs being created or booting.
    #[serde(default)]
    pub provisioning: i32,
    /// Create jobs waiting for a provisioner slot.
    #[serde(default)]
    pub pending: i32,
    /// VMs claimed by TestRuns and not yet released.
    #[serde(default)]
    pub claimed: i32,
    /// VMs of a template version that is no longer active.
    #[serde(default)]
    pub outdated: i32,
    /// Pending jobs cancelled because their template version stopped being
    /// the active one, since the preset was created.
    #[serde(default)]
    pub cancelled_total: i64,
    /// Failed provisions in a row; reset by a successful one or a change of
    /// what a provision makes (not of `spec.instances`: scaling a pool,
    /// by hand or by an autoscaler, does not lift `maxConsecutiveFailures`).
    #[serde(default)]
    pub consecutive_failures: i32,
    /// A digest of what a provision makes (`templateVersion`, `vm`,
    /// `failureBackoff`, `maxConsecutiveFailures`, `maxConcurrentProvisions`);
    /// the failure streak starts over when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provision_spec_digest: Option<String>,
    /// When the last provision failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Create jobs made since the preset was created; the next job's id
    /// follows from it.
    #[serde(default)]
    pub jobs_created: i64,
    /// Create jobs waiting for a provisioner slot, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_jobs: Vec<PendingJob>,
    /// The pool's VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<PresetInstance>,
    /// Cloud operations the controller started and still follows, or
    /// recently finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<TrackedOperation>,
    /// Conditions, each saying the current state:
    /// - `Ready`: True while at least `spec.instances` VMs are ready.
    /// - `Reconciling` / `Stalled` (kstatus): True while the pool fills,
    ///   rolls or deletes VMs / while an invalid spec or
    ///   `maxConsecutiveFailures` failed provisions in a row stop it until
    ///   the spec changes.
    /// - `Progressing`: True while VMs are being created, replaced or deleted.
    /// - `Degraded`: True while the latest provisions failed.
    /// - `InvalidSpec`, `DeletionFailing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A create job that no provisioner slot has picked up yet: no cloud call has
/// been made for it, so it can still be cancelled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingJob {
    /// Job id, unique within the preset; the VM's name derives from it.
    pub id: String,
    /// The template version the job builds.
    pub template_version: String,
    /// When the job was queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
}

/// Where a pool VM stands: `Provisioning`, `Ready`, `Claimed` or `Deleting`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PresetInstanceState {
    /// Being created or booting; its agent has not registered yet.
    Provisioning,
    /// Booted, its agent registered and waits for an assignment.
    Ready,
    /// Handed to a TestRun, which owns it from then on.
    Claimed,
    /// Being deleted.
    Deleting,
}

/// One VM of the pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PresetInstance {
    /// Instance name.
    pub name: String,
    /// Zone of the VM.
    pub zone: String,
    /// The template version it was built from.
    pub template_version: String,
    /// Where it stands.
    pub state: PresetInstanceState,
    /// The TestRun shard that claimed it, if any: `namespace/name/shard/uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// When its create job was picked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Time>,
}
