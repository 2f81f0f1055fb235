//! The TestRun resource: one CI test run, split into shards, each shard on a
//! VM of its own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, EnvVar, TrackedOperation, VmSpec};
use super::duration::DurationString;
use super::policy::FailurePolicy;

/// What to run and on which VMs: the test command, how many shards, the VM
/// shape or the preset to claim warm VMs from, and the time limits.
#[allow(clippy::duplicated_attributes)] // several printcolumn(...) share keys such as type_
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "testrun.dev",
    version = "v1alpha1",
    kind = "TestRun",
    plural = "testruns",
    shortname = "tr",
    namespaced,
    status = "TestRunStatus",
    doc = "A CI test run on ephemeral Compute Engine VMs. The command runs once per shard, each shard on its own VM; the run succeeds only when every shard's current attempt reported exit code 0.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Where the run stands"),
    printcolumn(name = "Shards", type_ = "integer", json_path = ".spec.shards", description = "Number of shards"),
    printcolumn(
        name = "Attempts",
        type_ = "integer",
        json_path = ".status.attempts",
        description = "Attempts started over all shards"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Oldest-Running",
        type_ = "date",
        json_path = ".status.oldestRunningShardStartTime",
        description = "Since when the longest-running shard that runs now has run",
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
    category = "testrun-all"
)]
#[serde(rename_all = "camelCase")]
pub struct TestRunSpec {
    /// The VM each shard runs on. Required unless `presetRef` is set; with
    /// `presetRef` the preset's VM shape is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSpec>,

    /// A PrebuildPreset in the same namespace to claim warm VMs from. A shard
    /// claims a ready VM of the preset's active template version, or gets a
    /// fresh VM of the preset's shape when none is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset_ref: Option<PresetRef>,

    /// The test command as an argument vector, e.g. `["cargo", "nextest",
    /// "run"]`. It runs once per shard with `TESTRUN_SHARD` and
    /// `TESTRUN_SHARDS` in its environment. Required unless `rerunOf` is
    /// set (a rerun runs the original's command unless this is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 256))]
    pub command: Vec<String>,

    /// Rerun only what failed: this run has only the shards of the named
    /// TestRun (in this namespace) that did not succeed, with their shard
    /// numbers (`TESTRUN_SHARD`, and `TESTRUN_SHARDS` as in the original).
    /// It waits for that run to finish, then runs the original's command,
    /// environment, working directory and VM shape (or preset), except
    /// where this spec sets its own; `shards` is ignored. Time limits,
    /// attempts and the failure policy are this run's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<RerunOf>,

    /// Environment variables for the command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,

    /// Working directory of the command on the VM; the agent's own when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub working_dir: Option<String>,

    /// Number of shards, each on its own VM.
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 256))]
    pub shards: i32,

    /// Longest wall time of one attempt of a shard, e.g. `"30m"`. When it is
    /// over, heartbeats are refused and the shard ends as TimedOut. Unset:
    /// 1h, or the VmClass's `limits.maxRunDuration` when that is shorter
    /// (fixed when the run starts, in `status.started.defaultTimeout`); a
    /// timeout written here that is longer than the class allows is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationString>,

    /// How long a shard's VM may go without a heartbeat before its lease is
    /// lost: the VM is deleted and, while attempts remain, the shard starts
    /// over on a new VM. Never longer than `timeout`: a longer value (the
    /// default with a short timeout) counts as `timeout`.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout: DurationString,

    /// Attempts per shard. Infrastructure failures and lost leases use up
    /// attempts; a failing test ends its shard, and a preemption is retried
    /// without using one (see `maxPreemptions`), unless `failurePolicy`
    /// says otherwise.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: i32,

    /// What happens when an attempt fails: ordered rules matching exit
    /// codes or infrastructure reasons, each retrying the shard (counted or
    /// not), failing the shard, or failing the whole run. Unset: a failing
    /// test ends its shard and infrastructure failures use up attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,

    /// How many preemptions of a shard's Spot VMs are retried without
    /// using an attempt. After that many, the shard's next VMs are
    /// standard VMs when `vm.spotFallback` is true (the default); when it
    /// is false, later preemptions use up attempts.
    #[serde(default = "default_max_preemptions")]
    #[schemars(range(min = 0, max = 10))]
    pub max_preemptions: i32,

    /// Fail fast: once more shards than this have failed (Failed, TimedOut
    /// or Error), the run ends Failed and every other shard is stopped
    /// (Cancelled) and its VM deleted. `0` stops at the first failure;
    /// unset, every shard runs to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 256))]
    pub max_failed_shards: Option<i32>,

    /// Delete the TestRun this many seconds after it finished; kept forever
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Set to true to cancel the run: running shards are stopped, their VMs
    /// deleted, and the run ends as Cancelled.
    #[serde(default)]
    pub cancel: bool,
}

/// The timeout of an attempt that sets none, under a class without a
/// shorter `maxRunDuration`.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

impl TestRunSpec {
    /// The timeout in effect for an attempt: `spec.timeout`, else the
    /// default the run started with, else 1 h. (A timeout that does not
    /// parse counts as 1 h; validation reports it.)
    pub fn attempt_timeout(&self, started: Option<&StartedWith>) -> std::time::Duration {
        self.timeout
            .as_ref()
            .or_else(|| started.and_then(|s| s.default_timeout.as_ref()))
            .and_then(|t| t.parse().ok())
            .unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The timeout in effect as written, for messages.
    pub fn attempt_timeout_text(&self, started: Option<&StartedWith>) -> String {
        self.timeout
            .as_ref()
            .or_else(|| started.and_then(|s| s.default_timeout.as_ref()))
            .map_or_else(|| "1h".to_string(), |t| t.as_str().to_string())
    }

    /// The heartbeat timeout in effect: `heartbeatTimeout`, bounded by the
    /// attempt's timeout, so a default never makes a short run invalid.
    pub fn effective_heartbeat_timeout(&self, started: Option<&StartedWith>) -> std::time::Duration {
        let heartbeat = self.heartbeat_timeout.parse().unwrap_or(std::time::Duration::from_secs(60));
        heartbeat.min(self.attempt_timeout(started))
    }
}

/// The timeout a run that sets none starts with: 1 h, or its class's
/// `maxRunDuration` when that is shorter.
pub fn default_timeout_under(class_max: Option<(std::time::Duration, &DurationString)>) -> DurationString {
    match class_max {
        Some((max, text)) if max < DEFAULT_TIMEOUT => text.clone(),
        _ => DurationString::new("1h"),
    }
}

impl TestRun {
    /// What it started with, if it started.
    pub fn started(&self) -> Option<&StartedWith> {
        self.status.as_ref().and_then(|s| s.started.as_ref())
    }
}

fn default_shards() -> i32 {
    1
}
fn default_heartbeat_timeout() -> DurationString {
    DurationString::new("60s")
}
fn default_max_attempts() -> i32 {
    3
}
fn default_max_preemptions() -> i32 {
    3
}

/// The finished TestRun a rerun reruns the failed shards of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RerunOf {
    /// Name of the TestRun, in the same namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A TestRun a status links to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RunLink {
    /// Its name, in the same namespace.
    pub name: String,
    /// Its uid: a TestRun made again under the same name is another run.
    pub uid: String,
}

/// How many reruns a run's status lists.
pub const MAX_RERUNS_LISTED: usize = 20;

/// A reference to a PrebuildPreset in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PresetRef {
    /// Name of the PrebuildPreset.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Where a TestRun stands: `Pending`, `Provisioning`, `Running`, `Succeeded`,
/// `Failed`, `TimedOut`, `Cancelled` or `Error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum TestRunPhase {
    /// Accepted, no VM requested yet.
    Pending,
    /// VMs are being created or are booting.
    Provisioning,
    /// At least one shard's test is running.
    Running,
    /// Every shard reported exit code 0 from its current attempt.
    Succeeded,
    /// A shard's test failed (non-zero exit code).
    Failed,
    /// A shard ran longer than `timeout`.
    TimedOut,
    /// `spec.cancel` was set.
    Cancelled,
    /// A shard used up its attempts on infrastructure failures.
    Error,
}

impl TestRunPhase {
    /// Whether the run is over; a finished run makes no cloud calls except
    /// deleting what is left.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled | Self::Error)
    }

    /// Whether it is an end other than success that counts as a failure
    /// (`Failed`, `TimedOut`, `Error`; not `Cancelled`).
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::TimedOut | Self::Error)
    }
}

/// Where one shard stands; the same words as the run's phase.
pub type ShardPhase = TestRunPhase;

/// What the controller observed of a TestRun. Written only by the controller,
/// through the status subresource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestRunStatus {
    /// Where the run stands, derived from its shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TestRunPhase>,
    /// When the first VM was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run reached a finished phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the attempt of the longest-running shard that runs now started;
    /// unset while no shard runs. `kubectl get tr -o wide` shows its age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_running_shard_start_time: Option<Time>,
    /// Attempts started over all shards.
    #[serde(default)]
    pub attempts: i32,
    /// One entry per shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Cloud operations the controller started and still follows, or
    /// recently finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<TrackedOperation>,
    /// The run this one reruns the failed shards of (`spec.rerunOf`), once
    /// it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<RunLink>,
    /// Runs that rerun this one's failed shards (the last 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub reruns: Vec<RunLink>,
    /// What the run started with: every attempt, the first and the last,
    /// runs this, whatever the spec or the preset says later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<StartedWith>,
    /// Conditions, each saying the current state:
    /// - `Ready`: True once every shard succeeded.
    /// - `Complete`: True when the run succeeded; `Failed`: True when it
    ///   ended otherwise, with reason `Failed`, `TimedOut`, `Cancelled` or
    ///   `Error` and a message naming the first shard that did not succeed.
    ///   `kubectl wait --for=condition=Complete` (or `Failed`) waits for
    ///   either end.
    /// - `Reconciling` / `Stalled` (kstatus): True while the run is under way
    ///   / when it failed or cannot go on until someone acts (an invalid
    ///   spec, a missing preset).
    /// - `Progressing`: True until the run ends.
    /// - `Degraded`: True while VMs are hard to get (a failed create, a
    ///   zone without capacity) and some shard still waits for its VM.
    /// - `InvalidSpec`, `SpecChanged`, `DeletionFailing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The part of the spec a started run keeps: changes to `shards`, `command`,
/// `env`, `workingDir`, `vm` or `presetRef` after the start are not applied
/// (the `SpecChanged` condition says so); create a new TestRun instead.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartedWith {
    /// Number of shards.
    pub shards: i32,
    /// The command.
    pub command: Vec<String>,
    /// Its environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Its working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// The VM shape every new VM of the run gets: `spec.vm`, or the preset's
    /// shape when the run started (a later change or deletion of the preset
    /// does not touch a started run).
    pub vm: VmSpec,
    /// Whether `vm` is the preset's shape (`spec.vm` was not set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vm_from_preset: bool,
    /// The preset the run claimed warm VMs from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset_ref: Option<PresetRef>,
    /// The timeout of every attempt while `spec.timeout` is unset (also
    /// after it is removed from a started run): 1h, or the VmClass's
    /// `limits.maxRunDuration` when shorter, as the class was at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_timeout: Option<DurationString>,
}

impl StartedWith {
    /// What a spec starts with, on the given VM shape.
    pub fn from_spec(spec: &TestRunSpec, vm: VmSpec) -> Self {
        Self {
            shards: spec.shards,
            command: spec.command.clone(),
            env: spec.env.clone(),
            working_dir: spec.working_dir.clone(),
            vm_from_preset: spec.vm.is_none(),
            vm,
            preset_ref: spec.preset_ref.clone(),
            default_timeout: None,
        }
    }

    /// The fields of `spec` that differ from what the run started with.
    pub fn changed_in(&self, spec: &TestRunSpec) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if spec.shards != self.shards {
            changed.push("shards");
        }
        if spec.command != self.command {
            changed.push("command");
        }
        if spec.env != self.env {
            changed.push("env");
        }
        if spec.working_dir != self.working_dir {
            changed.push("workingDir");
        }
        let vm_changed = if self.vm_from_preset { spec.vm.is_some() } else { spec.vm.as_ref() != Some(&self.vm) };
        if vm_changed {
            changed.push("vm");
        }
        if spec.preset_ref != self.preset_ref {
            changed.push("presetRef");
        }
        changed
    }
}

/// Why an attempt of a shard ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum AttemptOutcome {
    /// The command exited with code 0.
    Succeeded,
    /// The command exited with another code (`exitCode`).
    TestFailed,
    /// Compute Engine reclaimed the Spot VM: its agent said so, or
    /// Compute Engine showed the VM stopping without being asked.
    Preempted,
    /// The VM's agent went silent for longer than `heartbeatTimeout`.
    LeaseLost,
    /// The VM disappeared (before its agent registered, or while the test ran).
    VmLost,
    /// No zone had capacity for the VM.
    CapacityExhausted,
    /// The VM's agent did not register within the registration timeout.
    RegistrationTimeout,
    /// The attempt ran longer than `timeout`.
    TimedOut,
    /// The run was cancelled.
    Cancelled,
    /// Compute Engine refused to create the VM (a permanent error, or
    /// retries ran out).
    CreateFailed,
}

impl AttemptOutcome {
    /// The name, as in status and the `outcome` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::TestFailed => "TestFailed",
            Self::Preempted => "Preempted",
            Self::LeaseLost => "LeaseLost",
            Self::VmLost => "VmLost",
            Self::CapacityExhausted => "CapacityExhausted",
            Self::RegistrationTimeout => "RegistrationTimeout",
            Self::TimedOut => "TimedOut",
            Self::Cancelled => "Cancelled",
            Self::CreateFailed => "CreateFailed",
        }
    }
}

/// How many ended attempts a shard keeps in `history`.
pub const ATTEMPT_HISTORY: usize = 5;

/// One ended attempt of a shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// The attempt, from 1.
    pub attempt: i32,
    /// Why it ended.
    pub outcome: AttemptOutcome,
    /// The command's exit code, for `Succeeded` and `TestFailed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The zone of its VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Its VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// When its agent registered (its lease began), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    pub end_time: Time,
}

/// Where one shard stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard number, from 0.
    pub index: i32,
    /// Current attempt, from 1.
    pub attempt: i32,
    /// The current lease; it grows with every new attempt, and reports from
    /// any other lease are refused.
    #[serde(default)]
    pub lease_id: i64,
    /// The VM of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The zone of that VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Where the shard stands.
    pub phase: ShardPhase,
    /// When the current attempt's VM was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_time: Option<Time>,
    /// Set after an attempt found no zone with capacity: the next attempt
    /// starts no earlier than this (the wait doubles with every such
    /// attempt, up to five minutes), so a stock-out does not use up
    /// `maxAttempts` in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Time>,
    /// When the current attempt's agent registered and its lease began;
    /// `timeout` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the agent last sent a heartbeat for the current lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// The acknowledged result of the current lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ShardResult>,
    /// A plain sentence about the shard's state, e.g. why an attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether the current attempt's VM is a Spot VM (unset before the
    /// first attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot: Option<bool>,
    /// Attempts of the shard that ended in a preemption.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub preemptions: i32,
    /// Attempts of the shard that do not count toward `maxAttempts`
    /// (preemptions, and failures a `failurePolicy` rule ignores): the
    /// attempts counted are `attempt - uncountedAttempts`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uncounted_attempts: i32,
    /// The last attempts that ended (at most 5, oldest first), each with
    /// why: `Succeeded`, `TestFailed` (with its exit code), `Preempted`,
    /// `LeaseLost`, `VmLost`, `CapacityExhausted`, `RegistrationTimeout`,
    /// `TimedOut`, `Cancelled` or `CreateFailed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub history: Vec<AttemptRecord>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl ShardStatus {
    /// The attempts that count toward `maxAttempts`.
    pub fn counted_attempts(&self) -> i32 {
        self.attempt - self.uncounted_attempts
    }
}

/// The result of a shard's test, as the agent reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardResult {
    /// Exit code of the command; 0 is success. A command killed by a signal
    /// reports 128 + the signal number.
    pub exit_code: i32,
    /// Wall time of the command in milliseconds.
    pub duration_ms: i64,
    /// The last lines of the command's output, at most 4 KiB.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub output_tail: String,
}
