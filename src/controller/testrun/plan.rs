//! What happens to a TestRun, as a pure function: the run, the VMs seen in
//! the cloud, the tracked operations' states and what the agent API heard go
//! in; the new status, the cloud calls to make and the Events to emit come
//! out. Nothing here talks to Kubernetes or Compute Engine.
//!
//! The story of a shard:
//! 1. Pending → a VM is requested for attempt 1 (its insert is recorded as
//!    *intended* in `status.operations` before the call is made, with a
//!    deterministic name and request id) → Provisioning.
//! 2. The VM boots, its agent registers: the lease begins → Running.
//! 3. The agent reports its result: it is written to status (only then is it
//!    acknowledged to the agent) → Succeeded or Failed, and the VM is deleted.
//! 4. No heartbeat for `heartbeatTimeout`, a VM that vanished or never
//!    registered, or no zone with capacity → the attempt is lost: its VM is
//!    deleted and, while attempts remain, attempt n+1 starts with a new lease;
//!    otherwise the shard ends in Error.
//! 5. Longer than `timeout` → TimedOut, the VM is deleted.
//!
//! Every VM of the run that is not the current attempt's VM of an unfinished
//! shard is deleted (tracked), whatever the reason it exists.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::agent::book::Heard;
use crate::agent::protocol::{
    META_AGENT_URL, META_ATTEMPT, META_NAME, META_NAMESPACE, META_OWNER_UID, META_SHARD, META_VM_TOKEN,
};
use crate::agent::tokens::LeaseKey;
use crate::api::testrun::{
    ATTEMPT_HISTORY, AttemptOutcome, AttemptRecord, ShardResult, ShardStatus, StartedWith, TestRun, TestRunPhase,
    TestRunStatus, default_timeout_under,
};
use crate::api::validation::validate_testrun;
use crate::api::vmclass::{self, ClassChoice, ClassRequest};
use crate::api::{ConditionStatus, OperationKind, OperationState, TrackedOperation, VmSpec};
use crate::compute::messages::reason;
use crate::compute::naming::{request_id, testrun_instance_name, testrun_labels};
use crate::compute::{ErrorCode, InstanceSpec, InstanceStatus, RetryClass};
use crate::controller::conditions::{self, Progress};
pub use crate::controller::ops::{CloudCall, PlannedEvent, Seen, describe, next_zone};
use crate::controller::ops::{
    DeleteRetry, InsertRetry, UNSEEN_ZONE_RECHECK, deletion_condition, intent, may_still_act, record_failure,
    retry_delete, retry_insert, signed, until,
};
use crate::controller::testrun::policy;
use crate::controller::testrun::rerun::Rerun;
use crate::inventory::state::VmView;

/// Settings of the installation that shape every plan.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Installation id (a VM label).
    pub installation: String,
    /// The agent API's URL as VMs reach it.
    pub agent_url: String,
    /// The startup script every VM runs ([`crate::agent::startup`]).
    pub startup_script: std::sync::Arc<str>,
    /// How long a VM may take from request to agent registration.
    pub registration_timeout: Duration,
    /// First wait before retrying a failed delete (it doubles per try).
    pub delete_retry_base: Duration,
    /// When this controller process started: no lease is judged lost on
    /// heartbeats it could not have heard.
    pub started_at: Timestamp,
}

/// Everything the planner looks at.
pub struct Observed<'a> {
    /// The TestRun.
    pub run: &'a TestRun,
    /// The current time.
    pub now: Timestamp,
    /// The run's VMs as the inventory knows them (and its claimed pool
    /// VMs), with how far their absence can be trusted.
    pub vms: &'a VmView,
    /// What the operation tracker knows of tracked operations, by request id.
    pub operations: &'a BTreeMap<String, Seen>,
    /// Operations of the run the tracker still follows (calls queued or
    /// in flight included): cleanup is not done while any is.
    pub outstanding: usize,
    /// What the agent API heard, by shard.
    pub heard: &'a BTreeMap<i32, Heard>,
    /// Zones currently known to be out of capacity for this machine family.
    pub exhausted_zones: &'a BTreeSet<String>,
    /// The installation's settings.
    pub settings: &'a Settings,
    /// The key VM tokens are made with.
    pub key: &'a LeaseKey,
    /// Pool VMs claimed for shards (`presetRef`), by shard: (instance, zone).
    pub claims: &'a BTreeMap<i32, (String, String)>,
    /// The VM shape of the preset named in `presetRef`, when it exists.
    pub preset_vm: Option<&'a VmSpec>,
    /// The VmClass of the run's VM shape.
    pub class: &'a ClassChoice,
    /// Where a rerun (`spec.rerunOf`) stands before it starts.
    pub rerun: &'a Rerun,
}

/// The outcome of planning.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The status to write.
    pub status: TestRunStatus,
    /// Calls to make, after the status is written.
    pub calls: Vec<CloudCall>,
    /// Events to publish.
    pub events: Vec<PlannedEvent>,
    /// Zones found out of capacity.
    pub exhausted: Vec<String>,
    /// When to look again at the latest.
    pub requeue_after: Duration,
    /// Deleting: every VM is verified gone and no operation is in flight.
    pub cleanup_done: bool,
    /// `ttlSecondsAfterFinished` has passed: delete the TestRun.
    pub expired: bool,
    /// The attempts this plan ends, by outcome (counted once its status is
    /// written).
    pub ended: Vec<AttemptOutcome>,
}

/// How long heartbeats alone may go unwritten to status.
pub const HEARTBEAT_WRITE_INTERVAL: Duration = Duration::from_secs(15);
/// How long a rerun waits before looking at its original again (a change
/// of the original also wakes it).
const RERUN_POLL: Duration = Duration::from_secs(15);
/// How long a run waits before looking for its missing PrebuildPreset again.
const PRESET_POLL: Duration = Duration::from_secs(15);
/// Margin added to `timeout` for a VM's `maxRunDuration`.
const MAX_RUN_MARGIN: Duration = Duration::from_secs(15 * 60);

/// How long a VM of a run must be able to live: the run's `timeout`, the
/// wait for its agent to register, and a margin. A shard's own VMs get it
/// as `maxRunDuration`; a claimed pool VM must have this much life left.
pub fn vm_life_needed(timeout: Duration, registration_timeout: Duration) -> Duration {
    timeout + registration_timeout + MAX_RUN_MARGIN
}

struct Planner<'a> {
    obs: &'a Observed<'a>,
    status: TestRunStatus,
    calls: Vec<CloudCall>,
    events: Vec<PlannedEvent>,
    exhausted: Vec<String>,
    wake: Duration,
    degraded: Option<(String, String)>,
    /// Planning the cleanup of a run being deleted: nothing is created.
    cleanup: bool,
    /// VMs whose insert may have been made and that must be verified gone (cleanup).
    unverified: BTreeSet<(String, String)>,
    /// Why no VM may be created now (the spec turned invalid after the start).
    blocked: Option<String>,
    /// `presetRef` names no preset: `Ready` says so until the run ends.
    waiting_for_preset: bool,
    /// The attempts this pass ended.
    ended: Vec<AttemptOutcome>,
    /// A `FailRun` rule ended the run, and why: every other shard stops.
    run_failed: Option<String>,
    /// A rerun that cannot start yet: (reason, message, stalled).
    rerun_waiting: Option<(&'static str, String, bool)>,
    /// Request ids of the inserts this pass intends (none of them made yet).
    new_inserts: BTreeSet<String>,
}

/// Plans one reconcile of a run that is not being deleted.
pub fn plan(obs: &Observed<'_>) -> Plan {
    let run = obs.run;
    let mut p = Planner {
        obs,
        status: run.status.clone().unwrap_or_default(),
        calls: Vec::new(),
        events: Vec::new(),
        exhausted: Vec::new(),
        wake: Duration::MAX,
        degraded: None,
        cleanup: false,
        unverified: BTreeSet::new(),
        blocked: None,
        waiting_for_preset: false,
        ended: Vec::new(),
        run_failed: None,
        rerun_waiting: None,
        new_inserts: BTreeSet::new(),
    };
    p.status.observed_generation = run.metadata.generation;

    // A started run goes on with the shape it started with; only creating a
    // VM needs a valid spec. A run begun before its shape was kept in status
    // goes on too: following, advancing and deleting need no shape.
    let begun = p.status.shards.iter().any(|s| s.attempt > 0);
    let refused = shape(run, obs.preset_vm).and_then(|vm| obs.class.refusal(&class_request(run, vm, obs.rerun)));
    let class_refused = refused.is_some();
    let invalid = vmclass::join_refusals(validate_testrun(&run.spec).err().map(|e| e.to_string()), refused);
    if let Some(message) = &invalid {
        p.invalid(message);
        if class_refused {
            // A class is changed without touching the run: look again.
            p.wake = CLASS_POLL;
        }
        if p.status.started.is_none() && !begun {
            return p.finish(false);
        }
        p.blocked = Some(message.clone());
    }
    // A run that ended before it started (a rerun cancelled while it
    // waited) stays as it ended.
    if p.status.started.is_none() && p.status.phase.is_some_and(|ph| ph.is_finished()) {
        let expired = p.ttl_expired();
        let mut plan = p.finish(false);
        plan.expired = expired;
        return plan;
    }
    if let Rerun::Waiting { reason, message, stalled } = obs.rerun {
        if run.spec.cancel {
            // Nothing started: cancelled at once.
            p.status.phase = Some(TestRunPhase::Cancelled);
            p.status.completion_time.get_or_insert(Time(obs.now));
            return p.finish(false);
        }
        p.rerun_waits(reason, message, *stalled);
        return p.finish(false);
    }
    // Said before anything returns early: a fixed spec is no longer
    // invalid while the run waits for its preset, but its VmClass can only
    // judge it once the preset gives it a shape.
    if invalid.is_none() {
        let (status, reason, message) = if shape(run, obs.preset_vm).is_some() {
            (ConditionStatus::False, "Valid", "")
        } else {
            (ConditionStatus::Unknown, "PresetNotFound", "the VmClass checks the run once its preset gives it a shape")
        };
        conditions::set(
            &mut p.status.conditions,
            "InvalidSpec",
            status,
            reason,
            message,
            run.metadata.generation,
            obs.now,
        );
    }
    let started = p.status.started.as_ref().map(|s| s.vm.clone());
    let vm = match started.or_else(|| run.spec.vm.clone()).or_else(|| obs.preset_vm.cloned()) {
        Some(vm) => vm,
        None => {
            // presetRef names a preset that does not exist (yet): wait for it.
            let message = p.preset_missing();
            p.wake = PRESET_POLL;
            if !begun {
                return p.finish(false);
            }
            p.blocked.get_or_insert(message);
            // Only error messages use the shape of a run that creates nothing.
            VmSpec::default()
        }
    };

    if p.status.shards.is_empty() && p.status.started.is_none() {
        p.status.start_time = Some(Time(obs.now));
        let indexes: Vec<i32> = match obs.rerun {
            Rerun::Ready { original, shards } => {
                p.status.rerun_of = Some(original.clone());
                shards.clone()
            }
            _ => (0..run.spec.shards).collect(),
        };
        p.status.shards = indexes
            .into_iter()
            .map(|index| ShardStatus {
                index,
                attempt: 0,
                lease_id: 0,
                instance: None,
                zone: None,
                phase: TestRunPhase::Pending,
                requested_time: None,
                retry_after: None,
                start_time: None,
                last_heartbeat: None,
                result: None,
                message: None,
                spot: None,
                preemptions: 0,
                uncounted_attempts: 0,
                history: Vec::new(),
            })
            .collect();
    }
    match &p.status.started {
        None if p.blocked.is_some() => {}
        None => {
            // Kept even when spec.timeout is set: removed later, the run
            // falls back to a default its class admits, not to 1h.
            let mut started = StartedWith::from_spec(&run.spec, vm.clone());
            started.default_timeout = Some(default_timeout_under(obs.class.max_run_duration()));
            p.status.started = Some(started);
        }
        Some(started) => {
            let changed = started.changed_in(&run.spec);
            p.spec_changed(&changed);
        }
    }

    p.follow_operations(&vm);
    for i in 0..p.status.shards.len() {
        p.advance_shard(i, &vm);
    }
    p.stop_the_rest();
    p.collect_strays(false);
    p.derive_phase();
    let expired = p.ttl_expired();
    let mut plan = p.finish(false);
    plan.expired = expired;
    plan
}

/// Plans one reconcile of a run being deleted: create nothing, delete every
/// VM, and be done only when every VM is verified gone, no operation is
/// open and the inventory can see every zone.
pub fn plan_cleanup(obs: &Observed<'_>) -> Plan {
    let mut p = Planner {
        obs,
        status: obs.run.status.clone().unwrap_or_default(),
        calls: Vec::new(),
        events: Vec::new(),
        exhausted: Vec::new(),
        wake: Duration::MAX,
        degraded: None,
        cleanup: true,
        unverified: BTreeSet::new(),
        blocked: None,
        waiting_for_preset: false,
        ended: Vec::new(),
        run_failed: None,
        rerun_waiting: None,
        new_inserts: BTreeSet::new(),
    };
    // Without a VM shape the operations are still followed; the shape only
    // words error messages.
    let vm = p.status.started.as_ref().map(|s| s.vm.clone()).or_else(|| obs.run.spec.vm.clone());
    p.follow_operations(&vm.unwrap_or_default());
    // Attempts under way end with the run.
    for index in 0..p.status.shards.len() {
        if matches!(p.status.shards[index].phase, TestRunPhase::Provisioning | TestRunPhase::Running) {
            p.record_attempt(index, AttemptOutcome::Cancelled, None);
        }
    }
    p.collect_strays(true);
    if !obs.vms.is_complete() {
        p.wake_within(UNSEEN_ZONE_RECHECK);
    }
    let done = obs.vms.vms.is_empty()
        && obs.vms.is_complete()
        && p.status.operations.is_empty()
        && p.calls.is_empty()
        && obs.outstanding == 0;
    p.finish(done)
}

impl Planner<'_> {
    fn event(&mut self, warning: bool, reason: &'static str, note: impl Into<String>) {
        self.events.push(PlannedEvent { warning, reason, note: note.into() });
    }

    fn wake_within(&mut self, d: Duration) {
        self.wake = self.wake.min(d.max(Duration::from_millis(200)));
    }

    fn invalid(&mut self, message: &str) {
        let generation = self.obs.run.metadata.generation;
        let now = self.obs.now;
        let news = conditions::set(
            &mut self.status.conditions,
            "InvalidSpec",
            ConditionStatus::True,
            "InvalidSpec",
            message,
            generation,
            now,
        );
        conditions::set(
            &mut self.status.conditions,
            "Ready",
            ConditionStatus::False,
            "InvalidSpec",
            message,
            generation,
            now,
        );
        if news {
            self.event(true, "InvalidSpec", message.to_string());
        }
        if self.status.phase.is_none() {
            self.status.phase = Some(TestRunPhase::Pending);
        }
        self.wake = Duration::MAX;
    }

    /// A rerun waits for its original to exist and finish.
    fn rerun_waits(&mut self, reason: &'static str, message: &str, stalled: bool) {
        let run = self.obs.run;
        if conditions::get(&self.status.conditions, "Ready").is_none_or(|c| c.reason != reason) {
            self.event(stalled, reason, message.to_string());
        }
        conditions::set(
            &mut self.status.conditions,
            "Ready",
            ConditionStatus::False,
            reason,
            message,
            run.metadata.generation,
            self.obs.now,
        );
        self.rerun_waiting = Some((reason, message.to_string(), stalled));
        self.wake = RERUN_POLL;
    }

    /// Reports that the preset named in `presetRef` does not exist, in the
    /// `Ready` condition (with a Warning when that is news); returns why.
    fn preset_missing(&mut self) -> String {
        let run = self.obs.run;
        let name = run.spec.preset_ref.as_ref().map(|r| r.name.clone()).unwrap_or_default();
        let message = format!("PrebuildPreset {name} does not exist; waiting for it (or set spec.vm)");
        self.waiting_for_preset = true;
        if conditions::get(&self.status.conditions, "Ready").is_none_or(|c| c.reason != "PresetNotFound") {
            self.event(true, "PresetNotFound", message.clone());
        }
        conditions::set(
            &mut self.status.conditions,
            "Ready",
            ConditionStatus::False,
            "PresetNotFound",
            message.clone(),
            run.metadata.generation,
            self.obs.now,
        );
        message
    }

    /// Reports spec fields changed after the start (not applied) in the
    /// `SpecChanged` condition, with a Warning when it turns True.
    fn spec_changed(&mut self, changed: &[&str]) {
        let generation = self.obs.run.metadata.generation;
        let now = self.obs.now;
        if changed.is_empty() {
            if conditions::get(&self.status.conditions, "SpecChanged").is_some() {
                conditions::set(
                    &mut self.status.conditions,
                    "SpecChanged",
                    ConditionStatus::False,
                    "AsStarted",
                    "",
                    generation,
                    now,
                );
            }
            return;
        }
        let message = format!(
            "spec.{} changed after the run started; a started run goes on with what it started with \
             (status.started): create a new TestRun to run the new spec",
            changed.join(", spec.")
        );
        if conditions::set(
            &mut self.status.conditions,
            "SpecChanged",
            ConditionStatus::True,
            "ChangedAfterStart",
            message.clone(),
            generation,
            now,
        ) {
            self.event(true, "SpecChangeIgnored", message);
        }
    }

    /// Whether an operation of this kind on this VM may still act: recorded
    /// and not known to have ended (a failed delete waiting for its retry
    /// counts: it will be made again).
    fn in_flight(&self, kind: OperationKind, zone: &str, name: &str) -> bool {
        self.status.operations.iter().any(|op| {
            op.kind == kind
                && op.zone == zone
                && op.instance == name
                && may_still_act(op, self.obs.operations.get(&op.request_id))
                && !(op.kind == OperationKind::Insert
                    && op.state != OperationState::Failed
                    && self.booted(&op.zone, &op.instance))
        })
    }

    /// Whether the VM's agent registered for a shard's current attempt:
    /// then the VM exists, and its insert is over whatever its operation says.
    fn booted(&self, zone: &str, name: &str) -> bool {
        self.status.shards.iter().any(|s| {
            s.zone.as_deref() == Some(zone)
                && s.instance.as_deref() == Some(name)
                && (s.start_time.is_some()
                    || self
                        .obs
                        .heard
                        .get(&s.index)
                        .is_some_and(|h| h.lease_id == s.lease_id && h.registered_at.is_some()))
        })
    }

    /// Whether a shard still waits on this VM's agent.
    fn provisioning_on(&self, zone: &str, name: &str) -> bool {
        self.status.shards.iter().any(|s| {
            s.phase == TestRunPhase::Provisioning
                && s.zone.as_deref() == Some(zone)
                && s.instance.as_deref() == Some(name)
        })
    }

    fn wanted(&self) -> BTreeSet<(String, String)> {
        self.status
            .shards
            .iter()
            .filter(|s| matches!(s.phase, TestRunPhase::Provisioning | TestRunPhase::Running))
            .filter_map(|s| Some((s.zone.clone()?, s.instance.clone()?)))
            .collect()
    }

    /// Goes through every tracked operation with what the tracker knows of
    /// it and decides what each needs. News alone (an insert finished while
    /// its shard still waits for the agent) changes nothing in status.
    fn follow_operations(&mut self, vm: &VmSpec) {
        let wanted = self.wanted();
        let ops = std::mem::take(&mut self.status.operations);
        let mut kept = Vec::new();
        for mut op in ops {
            let is_wanted = wanted.contains(&(op.zone.clone(), op.instance.clone()));
            match (op.state, self.obs.operations.get(&op.request_id)) {
                (OperationState::Done, _) => {}
                (OperationState::Failed, _) => {
                    if let Some(op) = self.after_failure(op, vm, is_wanted) {
                        kept.push(op);
                    }
                }
                // Its agent registered: the VM exists, the insert is over.
                (_, Some(Seen::InFlight) | None)
                    if op.kind == OperationKind::Insert && self.booted(&op.zone, &op.instance) => {}
                (_, Some(Seen::InFlight)) => kept.push(op),
                (_, Some(Seen::Done)) => {
                    if op.kind == OperationKind::Insert && !self.cleanup && self.provisioning_on(&op.zone, &op.instance)
                    {
                        kept.push(op);
                    }
                }
                // A retry kept unmade while no VM could be created: the
                // failure the tracker still holds is the one already counted.
                (OperationState::Intended, Some(Seen::Failed(error)))
                    if is_wanted && !self.cleanup && op.answer_lost && error.answer_lost() && self.parked(&op) =>
                {
                    self.reissue(&op, vm);
                    kept.push(op);
                }
                (_, Some(Seen::Failed(error))) => {
                    record_failure(&mut op, error, vm);
                    if let Some(op) = self.after_failure(op, vm, is_wanted) {
                        kept.push(op);
                    }
                }
                (OperationState::Intended, None) if op.kind == OperationKind::Insert && self.cleanup => {
                    // Never made again, but an earlier process may have made
                    // it: the VM must be verified gone.
                    self.unverified.insert((op.zone.clone(), op.instance.clone()));
                }
                (OperationState::Intended, None) if op.kind == OperationKind::Insert && !is_wanted => {
                    // The attempt was abandoned before its call was confirmed:
                    // never issue it. A VM it may have made is deleted as a stray.
                }
                (OperationState::Intended, None) => {
                    self.reissue(&op, vm);
                    kept.push(op);
                }
                // Followed by the tracker from the executor's adoption.
                (OperationState::Running, None) => kept.push(op),
            }
        }
        // Operations started while following (a retry in the next zone) come after.
        kept.append(&mut self.status.operations);
        self.status.operations = kept;
    }

    /// Whether an insert intent is kept unmade: no VM may be created now,
    /// or none could when it was recorded (its shard's clock is stopped).
    fn parked(&self, op: &TrackedOperation) -> bool {
        op.kind == OperationKind::Insert
            && (self.blocked.is_some()
                || self.status.shards.iter().any(|s| {
                    s.instance.as_deref() == Some(op.instance.as_str())
                        && s.zone.as_deref() == Some(op.zone.as_str())
                        && s.requested_time.is_none()
                }))
    }

    /// Re-issues a recorded intent (same request id: Compute Engine runs it
    /// at most once). While no VM may be created (`blocked`) an insert is
    /// kept unmade instead: its shard waits, with no registration clock
    /// running, and the intent is made once the spec is valid again.
    fn reissue(&mut self, op: &TrackedOperation, vm: &VmSpec) {
        let call = match op.kind {
            // A run being deleted creates nothing.
            OperationKind::Insert if self.cleanup => return,
            OperationKind::Insert => {
                let Some(position) = self.status.shards.iter().position(|s| {
                    s.instance.as_deref() == Some(op.instance.as_str()) && s.zone.as_deref() == Some(op.zone.as_str())
                }) else {
                    return;
                };
                let blocked = self.blocked.clone();
                let now = self.obs.now;
                let shard = &mut self.status.shards[position];
                if let Some(why) = blocked {
                    shard.requested_time = None;
                    shard.message = Some(format!("attempt {} waits for its VM in {}: {why}", shard.attempt, op.zone));
                    return;
                }
                // The registration deadline runs from when the VM is asked for.
                shard.requested_time.get_or_insert(Time(now));
                let (index, attempt) = (shard.index, shard.attempt);
                CloudCall::Insert(Box::new(self.instance_spec(index, attempt, &op.zone, vm, &op.request_id)))
            }
            OperationKind::Delete | OperationKind::SetLabels => CloudCall::Delete {
                zone: op.zone.clone(),
                name: op.instance.clone(),
                request_id: op.request_id.clone(),
            },
        };
        self.calls.push(call);
    }

    /// Decides what follows a failed operation; returns the operation to
    /// keep tracking, if any.
    fn after_failure(&mut self, mut op: TrackedOperation, vm: &VmSpec, is_wanted: bool) -> Option<TrackedOperation> {
        let message = op.last_error.clone().unwrap_or_default();
        let code = error_code_of(&message);
        match op.kind {
            OperationKind::Delete | OperationKind::SetLabels => {
                if code == Some(ErrorCode::NotFound) {
                    return None;
                }
                match retry_delete(&mut op, self.obs.now, self.obs.settings.delete_retry_base) {
                    DeleteRetry::Wait(wait) => self.wake_within(wait),
                    DeleteRetry::Reissue => {
                        self.event(
                            true,
                            "DeleteFailed",
                            format!("deleting VM {} failed ({message}); retrying", op.instance),
                        );
                        self.reissue(&op, vm);
                    }
                }
                Some(op)
            }
            OperationKind::Insert => {
                if !is_wanted || self.cleanup {
                    return None;
                }
                let index = self.status.shards.iter().position(|s| {
                    s.instance.as_deref() == Some(op.instance.as_str()) && s.zone.as_deref() == Some(op.zone.as_str())
                })?;
                let retry = code.as_ref().map(|c| c.retry_class()).unwrap_or(RetryClass::RetrySoon);
                self.degraded = Some((code.as_ref().map_or("CloudError", reason).to_string(), message.clone()));
                match retry {
                    RetryClass::TryAnotherZone => {
                        self.exhausted.push(op.zone.clone());
                        match next_zone(&vm.zones, &op.zone) {
                            Some(next) => {
                                self.event(true, "ZoneUnavailable", message);
                                let shard = &mut self.status.shards[index];
                                shard.zone = Some(next.clone());
                                shard.message = Some(format!("VM requested in {next}"));
                                let (i, attempt) = (shard.index, shard.attempt);
                                self.start_insert(i, attempt, &next, vm);
                            }
                            None => {
                                let wait = capacity_wait(self.status.shards[index].attempt);
                                let why = format!("no zone has capacity: {message}");
                                self.end_attempt(
                                    index,
                                    AttemptOutcome::CapacityExhausted,
                                    None,
                                    &format!("failed: {why}"),
                                    vm,
                                    Some(wait),
                                );
                            }
                        }
                        None
                    }
                    RetryClass::RetrySoon | RetryClass::RetryLater => {
                        let base = if retry == RetryClass::RetryLater { 10 } else { 2 };
                        let shard = &self.status.shards[index];
                        let purpose = format!("insert/{}/{}/{}/{}", self.uid(), shard.index, shard.attempt, op.zone);
                        match retry_insert(&mut op, self.obs.now, base, &purpose) {
                            InsertRetry::GiveUp => {
                                let why = format!("creating the VM kept failing: {message}");
                                self.fail_attempt(index, AttemptOutcome::CreateFailed, &why, vm);
                                None
                            }
                            InsertRetry::Wait(wait) => {
                                self.wake_within(wait);
                                Some(op)
                            }
                            InsertRetry::Reissue => {
                                // A new request id: intended in this pass.
                                self.new_inserts.insert(op.request_id.clone());
                                self.reissue(&op, vm);
                                Some(op)
                            }
                        }
                    }
                    RetryClass::Permanent => {
                        self.event(true, "VmCreateFailed", message.clone());
                        self.fail_attempt(index, AttemptOutcome::CreateFailed, &message, vm);
                        None
                    }
                }
            }
        }
    }

    fn uid(&self) -> String {
        self.obs.run.metadata.uid.clone().unwrap_or_default()
    }

    fn next_lease_id(&self) -> i64 {
        self.status.shards.iter().map(|s| s.lease_id).max().unwrap_or(0) + 1
    }

    fn first_zone(&self, vm: &VmSpec) -> String {
        vm.zones
            .iter()
            .find(|z| !self.obs.exhausted_zones.contains(*z))
            .or(vm.zones.first())
            .cloned()
            .unwrap_or_default()
    }

    fn instance_spec(&self, shard: i32, attempt: i32, zone: &str, vm: &VmSpec, request_id: &str) -> InstanceSpec {
        let run = self.obs.run;
        let uid = self.uid();
        let name = testrun_instance_name(&uid, shard.max(0) as u32, attempt.max(0) as u32);
        let mut labels = vm.labels.clone();
        labels.extend(testrun_labels(
            &self.obs.settings.installation,
            &run.metadata.namespace.clone().unwrap_or_default(),
            &uid,
            shard.max(0) as u32,
            attempt.max(0) as u32,
        ));
        let mut metadata = vm.metadata.clone();
        metadata.insert(META_AGENT_URL.into(), self.obs.settings.agent_url.clone());
        metadata.insert(META_VM_TOKEN.into(), self.obs.key.vm_token(&name, &uid));
        metadata.insert(META_NAMESPACE.into(), run.metadata.namespace.clone().unwrap_or_default());
        metadata.insert(META_NAME.into(), run.metadata.name.clone().unwrap_or_default());
        metadata.insert(META_OWNER_UID.into(), uid.clone());
        metadata.insert(META_SHARD.into(), shard.to_string());
        metadata.insert(META_ATTEMPT.into(), attempt.to_string());
        InstanceSpec {
            name,
            zone: zone.to_string(),
            machine_type: vm.machine_type.clone(),
            image: vm.image.clone(),
            disk_gb: i64::from(vm.disk_gb),
            labels,
            metadata,
            startup_script: self.obs.settings.startup_script.clone(),
            service_account: vmclass::service_account(self.obs.class.class()),
            network: vmclass::network(self.obs.class.class()),
            // As the attempt was started: a Spot VM until the shard falls back.
            spot: vm.spot
                && self
                    .status
                    .shards
                    .iter()
                    .find(|s| s.index == shard && s.attempt == attempt)
                    .and_then(|s| s.spot)
                    .unwrap_or(true),
            max_run_duration: vm_life_needed(
                run.spec.attempt_timeout(self.status.started.as_ref()),
                self.obs.settings.registration_timeout,
            ),
            request_id: request_id.to_string(),
        }
    }

    /// Records the intent to create a shard attempt's VM and asks for the
    /// call (kept unmade while `blocked`, see `reissue`).
    fn start_insert(&mut self, index: i32, attempt: i32, zone: &str, vm: &VmSpec) {
        if self.cleanup {
            return;
        }
        let uid = self.uid();
        let rid = request_id(&format!("insert/{uid}/{index}/{attempt}/{zone}"), 0);
        let name = testrun_instance_name(&uid, index.max(0) as u32, attempt.max(0) as u32);
        let op = intent(OperationKind::Insert, &name, zone, &rid, self.obs.now);
        self.reissue(&op, vm);
        self.new_inserts.insert(rid);
        self.status.operations.push(op);
    }

    /// Starts the next attempt of a shard with a new lease: on a claimed
    /// pool VM for a first attempt when one was claimed, on a new VM otherwise.
    fn start_attempt(&mut self, index: usize, vm: &VmSpec) {
        if self.run_over().is_some() {
            // Stopped after the shard loop (stop_the_rest); no VM for it.
            self.status.shards[index].phase = TestRunPhase::Pending;
            return;
        }
        if let Some(why) = self.blocked.clone() {
            let shard = &mut self.status.shards[index];
            shard.phase = TestRunPhase::Pending;
            shard.retry_after = None;
            shard.message = Some(format!("attempt {} waits: {why}", shard.attempt + 1));
            return;
        }
        let lease_id = self.next_lease_id();
        let shard_index = self.status.shards[index].index;
        if self.status.shards[index].attempt == 0
            && let Some((name, zone)) = self.obs.claims.get(&shard_index).cloned()
        {
            let shard = &mut self.status.shards[index];
            shard.attempt = 1;
            shard.lease_id = lease_id;
            shard.zone = Some(zone.clone());
            shard.instance = Some(name.clone());
            shard.phase = TestRunPhase::Provisioning;
            shard.requested_time = Some(Time(self.obs.now));
            shard.retry_after = None;
            // Pool VMs are made to the preset's shape.
            shard.spot = Some(self.obs.preset_vm.map_or(vm.spot, |p| p.spot));
            shard.message = Some(format!("attempt 1 on pool VM {name} in {zone}"));
            self.status.attempts += 1;
            return;
        }
        let zone = self.first_zone(vm);
        let uid = self.uid();
        let spot = policy::next_is_spot(&self.obs.run.spec, vm.spot, vm.spot_fallback, &self.status.shards[index]);
        let shard = &mut self.status.shards[index];
        shard.attempt += 1;
        shard.spot = Some(spot);
        shard.lease_id = lease_id;
        shard.zone = Some(zone.clone());
        shard.instance = Some(testrun_instance_name(&uid, shard.index.max(0) as u32, shard.attempt.max(0) as u32));
        shard.phase = TestRunPhase::Provisioning;
        shard.requested_time = Some(Time(self.obs.now));
        shard.retry_after = None;
        shard.start_time = None;
        shard.last_heartbeat = None;
        shard.result = None;
        shard.message = Some(if spot || !vm.spot {
            format!("attempt {} requested in {zone}", shard.attempt)
        } else {
            format!(
                "attempt {} requested in {zone} on a standard VM after {} preemptions",
                shard.attempt, shard.preemptions
            )
        });
        let (i, attempt) = (shard.index, shard.attempt);
        self.status.attempts += 1;
        self.start_insert(i, attempt, &zone, vm);
    }

    /// The current attempt failed for infrastructure reasons.
    fn fail_attempt(&mut self, index: usize, outcome: AttemptOutcome, why: &str, vm: &VmSpec) {
        self.end_attempt(index, outcome, None, &format!("failed: {why}"), vm, None);
    }

    /// Why the run is over though shards are under way: a `FailRun` rule
    /// matched, or more shards failed than `spec.maxFailedShards` allows.
    fn run_over(&self) -> Option<(&'static str, String)> {
        if let Some(why) = &self.run_failed {
            return Some(("FailRun", why.clone()));
        }
        let allowed = self.obs.run.spec.max_failed_shards?;
        let count = self.status.shards.iter().filter(|s| s.phase.is_failure()).count();
        (count > usize::try_from(allowed).unwrap_or(0))
            .then(|| ("FailFast", format!("{count} shards failed, more than spec.maxFailedShards ({allowed}) allows")))
    }

    /// A run that is over (`run_over`) stops every shard still under way or
    /// waiting (Cancelled); its VM is then deleted as no shard wants it.
    /// The run ends Failed (or Error, TimedOut: as the shard that ended it).
    fn stop_the_rest(&mut self) {
        let Some((reason, why)) = self.run_over() else { return };
        let mut stopped = 0;
        for index in 0..self.status.shards.len() {
            let phase = self.status.shards[index].phase;
            if phase.is_finished() {
                continue;
            }
            if matches!(phase, TestRunPhase::Provisioning | TestRunPhase::Running) {
                self.record_attempt(index, AttemptOutcome::Cancelled, None);
            }
            let s = &mut self.status.shards[index];
            s.phase = TestRunPhase::Cancelled;
            s.retry_after = None;
            s.message = Some(format!("stopped: {why}"));
            stopped += 1;
            // An insert this pass only intends is never made: no VM to pay
            // for and delete. One intended earlier may have been made; it
            // is followed and its VM deleted.
            let instance = s.instance.clone();
            let unmade = |op: &TrackedOperation| {
                op.kind == OperationKind::Insert
                    && Some(&op.instance) == instance.as_ref()
                    && self.new_inserts.contains(&op.request_id)
            };
            let dropped: BTreeSet<String> =
                self.status.operations.iter().filter(|op| unmade(op)).map(|op| op.request_id.clone()).collect();
            self.status.operations.retain(|op| !dropped.contains(&op.request_id));
            // No insert call for it in this pass either (one intended
            // earlier stays tracked until it settles, and its VM is deleted).
            self.calls.retain(|c| !matches!(c, CloudCall::Insert(spec) if Some(&spec.name) == instance.as_ref()));
        }
        if stopped > 0 {
            self.event(true, reason, format!("{why}; stopped {stopped} other shards and delete their VMs"));
        }
    }

    /// The current attempt's VM vanished: a Spot VM that goes without a
    /// word was most likely reclaimed (its notice missed: the controller
    /// restarted, or no list saw it stop), any other is lost.
    fn vm_lost(&mut self, index: usize, name: &str, when: &str, spot: bool, vm: &VmSpec) {
        if spot {
            let what = format!("was preempted: Spot VM {name} disappeared {when}");
            self.end_attempt(index, AttemptOutcome::Preempted, None, &what, vm, None);
        } else {
            self.fail_attempt(index, AttemptOutcome::VmLost, &format!("VM {name} disappeared {when}"), vm);
        }
    }

    /// Whether the shard's current VM is a Spot VM (an attempt begun by a
    /// version that did not record it: as the run's shape says).
    fn current_spot(&self, index: usize, vm: &VmSpec) -> bool {
        self.status.shards[index].spot.unwrap_or(vm.spot)
    }

    /// Whether Compute Engine shows the VM stopping or stopped though no
    /// delete of the controller's is under way or was ever asked for.
    fn stopped_unasked(&self, zone: &str, name: &str) -> bool {
        let stopping = self.obs.vms.vms.iter().any(|v| {
            v.zone == zone
                && v.name == name
                && matches!(v.status, InstanceStatus::Stopping | InstanceStatus::Terminated)
        });
        stopping
            && !self
                .status
                .operations
                .iter()
                .any(|o| o.kind == OperationKind::Delete && o.zone == zone && o.instance == name)
    }

    /// Records why the shard's current attempt ended, keeping the last
    /// [`ATTEMPT_HISTORY`].
    fn record_attempt(&mut self, index: usize, outcome: AttemptOutcome, exit_code: Option<i32>) {
        let now = self.obs.now;
        let shard = &mut self.status.shards[index];
        if shard.attempt < 1 || shard.history.last().is_some_and(|r| r.attempt == shard.attempt) {
            return;
        }
        shard.history.push(AttemptRecord {
            attempt: shard.attempt,
            outcome,
            exit_code,
            zone: shard.zone.clone(),
            instance: shard.instance.clone(),
            start_time: shard.start_time.clone(),
            end_time: Time(now),
        });
        let excess = shard.history.len().saturating_sub(ATTEMPT_HISTORY);
        shard.history.drain(..excess);
        self.ended.push(outcome);
    }

    /// The current attempt ended without success (`what` says how, after
    /// "attempt N"); `spec.failurePolicy` or the default decides what
    /// follows: the next attempt now, or after `wait` (the shard waits in
    /// Pending until `retryAfter`), or the end of the shard or of the run.
    fn end_attempt(
        &mut self,
        index: usize,
        outcome: AttemptOutcome,
        exit_code: Option<i32>,
        what: &str,
        vm: &VmSpec,
        wait: Option<Duration>,
    ) {
        self.record_attempt(index, outcome, exit_code);
        if outcome == AttemptOutcome::Preempted {
            self.status.shards[index].preemptions += 1;
        }
        let spec = &self.obs.run.spec;
        let max = spec.max_attempts;
        let now = self.obs.now;
        let (i, attempt) = (self.status.shards[index].index, self.status.shards[index].attempt);
        if spec.cancel || self.cleanup {
            // No next attempt for a cancelled or deleted run.
            let shard = &mut self.status.shards[index];
            shard.phase = TestRunPhase::Pending;
            shard.message = Some(format!("attempt {attempt} {what}"));
            return;
        }
        let (next, because) = policy::decide(spec, &self.status.shards[index], outcome, exit_code);
        let by = match because {
            policy::Because::Rule(r) => format!(" (failurePolicy.rules[{r}])"),
            policy::Because::Default => String::new(),
        };
        let reason = if outcome == AttemptOutcome::Preempted { "Preempted" } else { "AttemptFailed" };
        match next {
            policy::Next::Retry { counted } => {
                let shard = &mut self.status.shards[index];
                if !counted {
                    shard.uncounted_attempts += 1;
                }
                let uncounted = if counted { "" } else { ", not counted toward maxAttempts" };
                match wait {
                    Some(wait) => {
                        let told = format!(
                            "attempt {attempt} {what}{by}; attempt {} starts in {}s{uncounted}",
                            attempt + 1,
                            wait.as_secs()
                        );
                        shard.phase = TestRunPhase::Pending;
                        shard.retry_after = Some(Time(now + signed(wait)));
                        shard.message = Some(told.clone());
                        self.event(true, reason, format!("shard {i} {told}"));
                        self.wake_within(wait);
                    }
                    None => {
                        self.event(
                            true,
                            reason,
                            format!(
                                "shard {i} attempt {attempt} {what}{by}; starting attempt {}{uncounted}",
                                attempt + 1
                            ),
                        );
                        self.start_attempt(index, vm);
                    }
                }
            }
            policy::Next::EndShard(phase) | policy::Next::EndRun(phase) | policy::Next::OutOfAttempts(phase) => {
                let out_of_attempts = matches!(next, policy::Next::OutOfAttempts(_));
                let counted = self.status.shards[index].counted_attempts();
                let shard = &mut self.status.shards[index];
                shard.phase = phase;
                let told = if out_of_attempts {
                    shard.message = Some(format!("attempt {counted} of {max} {what}{by}"));
                    format!("shard {i} used all {max} attempts; attempt {attempt} {what}{by}")
                } else {
                    shard.message = Some(format!("attempt {attempt} {what}{by}"));
                    format!("shard {i} attempt {attempt} {what}{by}")
                };
                match phase {
                    TestRunPhase::Error => self.event(true, "ShardError", told),
                    TestRunPhase::TimedOut => self.event(true, "TimedOut", format!("{told}; its VM is deleted")),
                    _ => self.event(true, "ShardFailed", told),
                }
                if matches!(next, policy::Next::EndRun(_)) && self.run_failed.is_none() {
                    self.run_failed = Some(format!("shard {i} attempt {attempt} {what}{by}, which fails the run"));
                }
            }
        }
    }

    fn advance_shard(&mut self, index: usize, vm: &VmSpec) {
        let now = self.obs.now;
        let run = self.obs.run;
        let shard = self.status.shards[index].clone();
        if shard.phase.is_finished() {
            return;
        }
        if run.spec.cancel {
            // An attempt under way ends; one already ended (waiting for the
            // next) was recorded then.
            if matches!(shard.phase, TestRunPhase::Provisioning | TestRunPhase::Running) {
                self.record_attempt(index, AttemptOutcome::Cancelled, None);
            }
            let s = &mut self.status.shards[index];
            s.phase = TestRunPhase::Cancelled;
            s.retry_after = None;
            s.message = Some("the run was cancelled".into());
            return;
        }
        if shard.phase == TestRunPhase::Pending {
            if let Some(at) = shard.retry_after.as_ref().map(|t| t.0).filter(|at| now < *at) {
                self.wake_within(until(now, at));
                return;
            }
            self.start_attempt(index, vm);
            return;
        }
        let heard = self.obs.heard.get(&shard.index).filter(|h| h.lease_id == shard.lease_id);
        let (zone, name) = (shard.zone.clone().unwrap_or_default(), shard.instance.clone().unwrap_or_default());
        // Only a view that covers the zone can say the VM is gone.
        let vm_gone = self.obs.vms.absent(&zone, &name);
        let creating = self.in_flight(OperationKind::Insert, &zone, &name);

        let started = self.status.started.as_ref();
        let timeout = signed(run.spec.attempt_timeout(started));
        let heartbeat_timeout = signed(run.spec.effective_heartbeat_timeout(started));
        let timeout_text = run.spec.attempt_timeout_text(started);
        let heartbeat_text = format!("{:?}", run.spec.effective_heartbeat_timeout(started));

        // The agent registered: its lease began. A heartbeat on the current
        // lease says the same (its registration was heard by a process
        // that stopped before writing it); the lease began with the first.
        if shard.phase == TestRunPhase::Provisioning
            && let Some(registered) = heard.and_then(|h| h.registered_at.or(h.first_heard))
        {
            let s = &mut self.status.shards[index];
            s.phase = TestRunPhase::Running;
            s.start_time = Some(Time(registered));
            s.last_heartbeat = heard.and_then(|h| h.last_heartbeat).map(Time);
            s.message = Some(format!("attempt {} running under lease {}", s.attempt, s.lease_id));
            self.wake_within(Duration::try_from(heartbeat_timeout).unwrap_or(Duration::from_secs(60)));
        }

        // Preempted: the agent said so (a failing result it sent too is
        // the preemption's doing), or Compute Engine shows the Spot VM
        // stopping though the controller asked no such thing, or a Spot VM
        // went with a command killed by a signal (the soft off's SIGTERM).
        // An attempt past its timeout has timed out whatever came after.
        let spot = self.current_spot(index, vm);
        let running_since = self.status.shards[index].start_time.as_ref().map(|t| t.0);
        let timed_out = running_since.is_some_and(|start| now.duration_since(start) > timeout);
        let preempted_heard = heard.is_some_and(|h| h.preempted_at.is_some());
        let stopping = spot && self.stopped_unasked(&zone, &name);
        let killed = heard.and_then(|h| h.result.as_ref()).is_some_and(|r| r.exit_code >= 128);
        let preempted = !timed_out && (preempted_heard || stopping || (spot && killed && vm_gone));
        let result = heard.and_then(|h| h.result.clone()).filter(|r| r.exit_code == 0 || !preempted);

        // A result is final: write it, then the agent is told it is stored.
        if let Some(result) = result {
            let outcome = if result.exit_code == 0 { AttemptOutcome::Succeeded } else { AttemptOutcome::TestFailed };
            // The tails of all shards share one budget, so status stays small.
            let budget = crate::agent::protocol::tail_budget(self.status.shards.len());
            let s = &mut self.status.shards[index];
            s.last_heartbeat = heard.and_then(|h| h.last_heartbeat).map(Time).or(s.last_heartbeat.take());
            s.result = Some(ShardResult {
                output_tail: crate::agent::protocol::json_tail(&result.output_tail, budget).to_string(),
                ..result.clone()
            });
            if outcome == AttemptOutcome::Succeeded {
                self.record_attempt(index, outcome, Some(0));
                let s = &mut self.status.shards[index];
                s.phase = TestRunPhase::Succeeded;
                s.message = Some(format!("attempt {} exited with code 0", s.attempt));
                // A success is told once per run (RunFinished).
                return;
            }
            let what = format!("exited with code {} after {} ms", result.exit_code, result.duration_ms);
            self.end_attempt(index, outcome, Some(result.exit_code), &what, vm, None);
            return;
        }
        if preempted {
            let how = if preempted_heard { "its agent said so" } else { "Compute Engine stopped it" };
            let what = format!("was preempted: Compute Engine reclaimed Spot VM {name} ({how})");
            self.end_attempt(index, AttemptOutcome::Preempted, None, &what, vm, None);
            return;
        }

        let shard = self.status.shards[index].clone();
        if shard.phase == TestRunPhase::Provisioning {
            let any_open = self
                .status
                .operations
                .iter()
                .any(|o| o.instance == name && o.zone == zone && self.in_flight(o.kind, &zone, &name));
            if !creating && vm_gone && !any_open {
                self.vm_lost(index, &name, "before its agent registered", spot, vm);
                return;
            }
            let requested = shard.requested_time.as_ref().map(|t| t.0).unwrap_or(now);
            let deadline = requested + signed(self.obs.settings.registration_timeout);
            if now >= deadline {
                self.fail_attempt(
                    index,
                    AttemptOutcome::RegistrationTimeout,
                    &format!(
                        "the agent on VM {name} did not register within {}s",
                        self.obs.settings.registration_timeout.as_secs()
                    ),
                    vm,
                );
            } else {
                self.wake_within(until(now, deadline));
            }
            return;
        }

        // Running.
        let start = shard.start_time.as_ref().map(|t| t.0).unwrap_or(now);
        if now.duration_since(start) > timeout {
            self.end_attempt(
                index,
                AttemptOutcome::TimedOut,
                None,
                &format!("ran longer than {timeout_text}"),
                vm,
                None,
            );
            return;
        }
        if vm_gone && !creating {
            self.vm_lost(index, &name, "while the test ran", spot, vm);
            return;
        }
        let last_heard = [
            heard.and_then(|h| h.last_heartbeat),
            shard.last_heartbeat.as_ref().map(|t| t.0),
            Some(start),
            Some(self.obs.settings.started_at),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(now);
        if now.duration_since(last_heard) > heartbeat_timeout {
            let why = format!("no heartbeat for {heartbeat_text}");
            self.event(true, "LeaseLost", format!("shard {} lost lease {}: {why}", shard.index, shard.lease_id));
            self.fail_attempt(index, AttemptOutcome::LeaseLost, &format!("lease lost ({why})"), vm);
            return;
        }
        // Heartbeats alone are written at most every HEARTBEAT_WRITE_INTERVAL.
        if let Some(beat) = heard.and_then(|h| h.last_heartbeat) {
            let written = shard.last_heartbeat.as_ref().map(|t| t.0);
            if written.is_none_or(|w| beat.duration_since(w) >= signed(HEARTBEAT_WRITE_INTERVAL)) {
                self.status.shards[index].last_heartbeat = Some(Time(beat));
            }
        }
        let lease_deadline = last_heard + heartbeat_timeout;
        let time_deadline = start + timeout;
        self.wake_within(until(now, lease_deadline.min(time_deadline)) + Duration::from_millis(100));
        self.wake_within(HEARTBEAT_WRITE_INTERVAL);
    }

    /// Deletes every VM of the run that no unfinished shard's current
    /// attempt uses (all of them when `everything`), once its creation has
    /// settled; in a cleanup, also every VM an earlier process may have made.
    fn collect_strays(&mut self, everything: bool) {
        let wanted = if everything { BTreeSet::new() } else { self.wanted() };
        let mut targets: BTreeSet<(String, String)> =
            self.obs.vms.vms.iter().map(|v| (v.zone.clone(), v.name.clone())).collect();
        targets.extend(std::mem::take(&mut self.unverified));
        // A finished shard's VM goes even if the inventory has not shown it yet.
        for s in &self.status.shards {
            if (s.phase.is_finished() || everything)
                && let (Some(zone), Some(name)) = (&s.zone, &s.instance)
                && self.status.operations.iter().any(|o| o.kind == OperationKind::Insert && &o.instance == name)
            {
                targets.insert((zone.clone(), name.clone()));
            }
        }
        for (zone, name) in targets {
            if wanted.contains(&(zone.clone(), name.clone()))
                || self.in_flight(OperationKind::Delete, &zone, &name)
                || self.in_flight(OperationKind::Insert, &zone, &name)
            {
                continue;
            }
            let rid = request_id(&format!("delete/{zone}/{name}"), 0);
            let op = intent(OperationKind::Delete, &name, &zone, &rid, self.obs.now);
            self.status.operations.push(op);
            self.calls.push(CloudCall::Delete { zone, name, request_id: rid });
        }
    }

    /// Whether a finished run's `ttlSecondsAfterFinished` is over (and its
    /// VMs are gone); otherwise wakes up when it will be.
    fn ttl_expired(&mut self) -> bool {
        let (Some(ttl), Some(done)) =
            (self.obs.run.spec.ttl_seconds_after_finished, self.status.completion_time.as_ref())
        else {
            return false;
        };
        if !self.status.phase.is_some_and(|p| p.is_finished()) {
            return false;
        }
        let due = done.0 + SignedDuration::from_secs(ttl.max(0));
        if self.obs.now < due {
            self.wake_within(until(self.obs.now, due));
            return false;
        }
        self.status.operations.is_empty() && self.obs.vms.vms.is_empty()
    }

    fn derive_phase(&mut self) {
        let shards = &self.status.shards;
        // A rerun of a run whose every shard succeeded has nothing to do.
        let nothing_to_run = shards.is_empty() && self.status.rerun_of.is_some() && self.status.started.is_some();
        let all_finished = (nothing_to_run || !shards.is_empty()) && shards.iter().all(|s| s.phase.is_finished());
        let any = |p: TestRunPhase| shards.iter().any(|s| s.phase == p);
        let phase = if all_finished {
            if shards.iter().all(|s| s.phase == TestRunPhase::Succeeded) {
                TestRunPhase::Succeeded
            } else if self.obs.run.spec.cancel {
                TestRunPhase::Cancelled
            } else if any(TestRunPhase::Failed) {
                TestRunPhase::Failed
            } else if any(TestRunPhase::TimedOut) {
                TestRunPhase::TimedOut
            } else {
                TestRunPhase::Error
            }
        } else if any(TestRunPhase::Running) {
            TestRunPhase::Running
        } else if any(TestRunPhase::Provisioning) {
            TestRunPhase::Provisioning
        } else {
            TestRunPhase::Pending
        };
        self.status.phase = Some(phase);
        self.status.oldest_running_shard_start_time = shards
            .iter()
            .filter(|s| s.phase == TestRunPhase::Running)
            .filter_map(|s| s.start_time.clone())
            .min_by_key(|t| t.0);
        if phase.is_finished() && self.status.completion_time.is_none() {
            self.status.completion_time = Some(Time(self.obs.now));
            let done = shards.iter().filter(|s| s.phase == TestRunPhase::Succeeded).count();
            let mut note = format!("{phase:?}: {done} of {} shards succeeded", shards.len());
            if let Some(started) = self.status.start_time.as_ref() {
                let took = self.obs.now.duration_since(started.0).as_secs().max(0);
                note.push_str(&format!(" in {took}s"));
            }
            let uid = self.uid();
            let warm = shards
                .iter()
                .filter(|s| {
                    let fresh = testrun_instance_name(&uid, s.index.max(0) as u32, s.attempt.max(0) as u32);
                    s.instance.as_ref().is_some_and(|i| *i != fresh)
                })
                .count();
            if warm > 0 {
                note.push_str(&format!("; {warm} on a warm pool VM"));
            }
            self.event(phase != TestRunPhase::Succeeded, "RunFinished", note);
        }
    }

    fn finish(mut self, cleanup_done: bool) -> Plan {
        let generation = self.obs.run.metadata.generation;
        let now = self.obs.now;
        let invalid = conditions::get(&self.status.conditions, "InvalidSpec")
            .filter(|c| c.status == ConditionStatus::True)
            .map(|c| c.message.clone());
        let phase = self.status.phase;
        let waiting_for_preset = self.waiting_for_preset && !phase.is_some_and(|p| p.is_finished());
        if let Some(phase) = phase.filter(|_| invalid.is_none()) {
            let (ready, reason, message) = match phase {
                TestRunPhase::Succeeded => (ConditionStatus::True, "Succeeded", "every shard succeeded".to_string()),
                p => (ConditionStatus::False, phase_reason(p), self.summary()),
            };
            // While the run waits for its preset, Ready says that.
            if !waiting_for_preset {
                conditions::set(&mut self.status.conditions, "Ready", ready, reason, message.clone(), generation, now);
            }
            let progressing = if phase.is_finished() { ConditionStatus::False } else { ConditionStatus::True };
            conditions::set(
                &mut self.status.conditions,
                "Progressing",
                progressing,
                phase_reason(phase),
                message,
                generation,
                now,
            );
        }
        self.terminal_conditions(phase, invalid);
        self.degraded_condition(phase);
        if let Some(message) = deletion_condition(&mut self.status.conditions, &self.status.operations, generation, now)
        {
            self.events.push(PlannedEvent { warning: true, reason: "DeletionFailing", note: message });
        }
        Plan {
            status: self.status,
            calls: self.calls,
            events: self.events,
            exhausted: self.exhausted,
            requeue_after: self.wake,
            cleanup_done,
            expired: false,
            ended: self.ended,
        }
    }

    /// `Complete` and `Failed` as a Job has them (so `kubectl wait` can wait
    /// for either end), and kstatus's `Reconciling` and `Stalled`.
    fn terminal_conditions(&mut self, phase: Option<TestRunPhase>, invalid: Option<String>) {
        let generation = self.obs.run.metadata.generation;
        let now = self.obs.now;
        let phase = phase.unwrap_or(TestRunPhase::Pending);
        let reason = phase_reason(phase);
        let succeeded = phase == TestRunPhase::Succeeded;
        let failed = phase.is_finished() && !succeeded;
        let (complete, complete_message) = if succeeded {
            (
                ConditionStatus::True,
                format!("{} of {} shards succeeded", self.status.shards.len(), self.status.shards.len()),
            )
        } else {
            (ConditionStatus::False, String::new())
        };
        conditions::set(&mut self.status.conditions, "Complete", complete, reason, complete_message, generation, now);
        let failure = failed.then(|| self.failure_message());
        let failed_status = if failed { ConditionStatus::True } else { ConditionStatus::False };
        let failed_message = failure.clone().unwrap_or_default();
        conditions::set(&mut self.status.conditions, "Failed", failed_status, reason, failed_message, generation, now);

        let preset_missing = conditions::get(&self.status.conditions, "Ready")
            .filter(|c| c.reason == "PresetNotFound")
            .map(|c| c.message.clone());
        let progress = if let Some(message) = failure {
            Progress::Stalled { reason, message }
        } else if succeeded {
            Progress::Current { reason }
        } else if let Some(message) = invalid {
            Progress::Stalled { reason: "InvalidSpec", message }
        } else if let Some(message) = preset_missing {
            Progress::Stalled { reason: "PresetNotFound", message }
        } else if let Some((reason, message, stalled)) = self.rerun_waiting.clone() {
            if stalled { Progress::Stalled { reason, message } } else { Progress::Reconciling { reason, message } }
        } else {
            Progress::Reconciling { reason, message: self.summary() }
        };
        conditions::set_progress(&mut self.status.conditions, &progress, generation, now);
    }

    /// Why a finished run did not succeed: its tally and the first shard
    /// that did not succeed.
    fn failure_message(&self) -> String {
        let mut message = self.summary();
        if self.obs.run.spec.cancel {
            message.insert_str(0, "cancelled (spec.cancel); ");
        }
        // A shard that failed, rather than one stopped because of it.
        let shards = &self.status.shards;
        let first = shards
            .iter()
            .find(|s| s.phase.is_failure())
            .or_else(|| shards.iter().find(|s| s.phase.is_finished() && s.phase != TestRunPhase::Succeeded));
        if let Some(shard) = first {
            message.push_str(&format!(
                "; shard {} {}: {}",
                shard.index,
                phase_reason(shard.phase),
                shard.message.as_deref().unwrap_or("no message")
            ));
        }
        message
    }

    /// `Degraded` says whether VMs are hard to get now: True from a failed
    /// create until every unfinished shard has its VM (or the run is over).
    /// What happened stays in the Events and the shards' messages.
    fn degraded_condition(&mut self, phase: Option<TestRunPhase>) {
        let generation = self.obs.run.metadata.generation;
        let now = self.obs.now;
        if let Some((reason, message)) = self.degraded.take() {
            conditions::set(
                &mut self.status.conditions,
                "Degraded",
                ConditionStatus::True,
                &reason,
                message,
                generation,
                now,
            );
            return;
        }
        let over = phase.is_some_and(|p| p.is_finished())
            || self.status.shards.iter().all(|s| s.phase.is_finished() || s.phase == TestRunPhase::Running);
        if over && conditions::is_true(&self.status.conditions, "Degraded") {
            conditions::set(
                &mut self.status.conditions,
                "Degraded",
                ConditionStatus::False,
                "AsExpected",
                "every shard that needs a VM has one",
                generation,
                now,
            );
        }
    }

    fn summary(&self) -> String {
        let count = |p: TestRunPhase| self.status.shards.iter().filter(|s| s.phase == p).count();
        format!(
            "{} shards: {} succeeded, {} running, {} provisioning, {} pending, {} failed, {} timed out, {} error",
            self.status.shards.len(),
            count(TestRunPhase::Succeeded),
            count(TestRunPhase::Running),
            count(TestRunPhase::Provisioning),
            count(TestRunPhase::Pending),
            count(TestRunPhase::Failed),
            count(TestRunPhase::TimedOut),
            count(TestRunPhase::Error),
        )
    }
}

fn phase_reason(phase: TestRunPhase) -> &'static str {
    match phase {
        TestRunPhase::Pending => "Pending",
        TestRunPhase::Provisioning => "Provisioning",
        TestRunPhase::Running => "Running",
        TestRunPhase::Succeeded => "Succeeded",
        TestRunPhase::Failed => "Failed",
        TestRunPhase::TimedOut => "TimedOut",
        TestRunPhase::Cancelled => "Cancelled",
        TestRunPhase::Error => "Error",
    }
}

/// The error code kept at the start of a tracked operation's `lastError`
/// (`CODE: message`).
fn error_code_of(last_error: &str) -> Option<ErrorCode> {
    let (code, _) = last_error.split_once(": ")?;
    Some(ErrorCode::parse(code))
}

/// How often a run or preset its VmClass refuses is looked at again (a
/// class is created or changed without touching the objects of the class).
pub const CLASS_POLL: Duration = Duration::from_secs(30);

/// The shape of the VMs a run makes: what it started with, else its
/// `spec.vm`, else its preset's.
pub fn shape<'a>(run: &'a TestRun, preset_vm: Option<&'a VmSpec>) -> Option<&'a VmSpec> {
    let started = run.status.as_ref().and_then(|s| s.started.as_ref()).map(|s| &s.vm);
    started.or(run.spec.vm.as_ref()).or(preset_vm)
}

/// What a run asks of its VmClass.
/// A started run is held to what it started with (its shards), not to a
/// spec edited since.
pub fn class_request<'a>(run: &'a TestRun, vm: &'a VmSpec, rerun: &Rerun) -> ClassRequest<'a> {
    let started = run.status.as_ref().and_then(|s| s.started.as_ref());
    // A rerun makes VMs for the shards it reruns, not for the original's.
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let shards = match (rerun, run.status.as_ref()) {
        (Rerun::Ready { shards, .. }, _) => count(shards.len()),
        (_, Some(status)) if status.rerun_of.is_some() => count(status.shards.len()),
        _ => started.map_or(run.spec.shards, |s| s.shards),
    };
    ClassRequest {
        at: if run.spec.vm.is_some() { "spec.vm" } else { "the preset's spec.vm" },
        namespace: run.metadata.namespace.as_deref().unwrap_or_default(),
        machine_type: &vm.machine_type,
        image: &vm.image,
        zones: &vm.zones,
        shards: Some(shards),
        timeout: run.spec.timeout.as_ref().and_then(|t| t.parse().ok()),
        pool_instances: None,
    }
}

/// How long a shard waits before its next attempt after an attempt found
/// no zone with capacity: 30 s, doubling with every attempt, up to 5 min.
fn capacity_wait(attempt: i32) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0).min(4);
    (Duration::from_secs(30) * 2u32.pow(doublings)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    //! The planner against a small in-memory world: operations finish when
    //! the test says, agents register, beat and report when the test says.
    use super::*;
    use crate::api::duration::DurationString;
    use crate::api::testrun::TestRunSpec;
    use crate::compute::{ComputeError, Instance};
    use proptest::prelude::*;

    const UID: &str = "6b0c3f1e-2a4d-4b8e-9c1f-0d2e3f4a5b6c";

    fn run(shards: i32, max_attempts: i32) -> TestRun {
        let spec: TestRunSpec = serde_json::from_value(serde_json::json!({
            "shards": shards,
            "maxAttempts": max_attempts,
            "command": ["true"],
            "timeout": "10m",
            "heartbeatTimeout": "30s",
            "vm": { "zones": ["us-central1-a", "us-central1-b"], "machineType": "e2-small", "image": "img" }
        }))
        .expect("spec");
        let mut run = TestRun::new("r", spec);
        run.metadata.namespace = Some("ns".into());
        run.metadata.uid = Some(UID.into());
        run.metadata.generation = Some(1);
        run
    }

    /// A tiny cloud: operations finish when told, VMs appear on insert.
    struct World {
        run: TestRun,
        now: Timestamp,
        vms: Vec<Instance>,
        /// Calls made, by request id: (instance, zone, kind, error, done).
        ops: BTreeMap<String, (String, String, OperationKind, Option<ComputeError>, bool)>,
        heard: BTreeMap<i32, Heard>,
        settings: Settings,
        key: LeaseKey,
        inserts_after_finish: u32,
        preset_vm: Option<VmSpec>,
        /// The run's VmClass.
        class: ClassChoice,
        /// The run is being deleted: passes plan its cleanup.
        deleting: bool,
        /// Where the run's rerun stands.
        rerun: Rerun,
    }

    impl World {
        fn new(run: TestRun) -> Self {
            let now = Timestamp::from_second(1_800_000_000).expect("time");
            Self {
                run,
                now,
                vms: Vec::new(),
                ops: BTreeMap::new(),
                heard: BTreeMap::new(),
                settings: Settings {
                    installation: "test".into(),
                    agent_url: "http://agent".into(),
                    startup_script: "#!/bin/sh\nexec agent\n".into(),
                    registration_timeout: Duration::from_secs(600),
                    delete_retry_base: Duration::from_secs(2),
                    started_at: now,
                },
                key: LeaseKey::from_bytes(&[1; 32]).expect("key"),
                inserts_after_finish: 0,
                preset_vm: None,
                class: ClassChoice::NoClass,
                deleting: false,
                rerun: Rerun::Nothing,
            }
        }

        fn status(&self) -> TestRunStatus {
            self.run.status.clone().unwrap_or_default()
        }

        /// One reconcile: observe, plan, write status, make calls, write again.
        /// What the tracker would say: by request id.
        fn seen(&self) -> BTreeMap<String, Seen> {
            self.ops
                .iter()
                .map(|(rid, (_, _, _, error, done))| {
                    let seen = match (done, error) {
                        (false, _) => Seen::InFlight,
                        (true, Some(e)) => Seen::Failed(e.clone()),
                        (true, None) => Seen::Done,
                    };
                    (rid.clone(), seen)
                })
                .collect()
        }

        /// One reconcile: observe, plan, write status, hand the calls to the "tracker".
        fn reconcile(&mut self) -> Plan {
            let seen = self.seen();
            let finished_before = self.status().phase.is_some_and(|p| p.is_finished());
            let exhausted = BTreeSet::new();
            let view = VmView::complete(self.vms.clone());
            let outstanding = self.ops.values().filter(|(_, _, _, _, done)| !done).count();
            let planner = if self.deleting { plan_cleanup } else { plan };
            let plan = planner(&Observed {
                run: &self.run,
                now: self.now,
                vms: &view,
                operations: &seen,
                outstanding,
                heard: &self.heard,
                exhausted_zones: &exhausted,
                settings: &self.settings,
                key: &self.key,
                claims: &BTreeMap::new(),
                preset_vm: self.preset_vm.as_ref(),
                class: &self.class,
                rerun: &self.rerun,
            });
            for call in &plan.calls {
                let rid = call.request_id().to_string();
                if self.ops.get(&rid).is_some_and(|(_, _, _, _, done)| !done) {
                    continue;
                }
                let (zone, instance, kind) = match call {
                    CloudCall::Insert(spec) => {
                        if finished_before {
                            self.inserts_after_finish += 1;
                        }
                        if !self.vms.iter().any(|v| v.name == spec.name && v.zone == spec.zone) {
                            self.vms.push(Instance {
                                name: spec.name.clone(),
                                zone: spec.zone.clone(),
                                status: crate::compute::InstanceStatus::Provisioning,
                                labels: spec.labels.clone(),
                                label_fingerprint: String::new(),
                                metadata: spec.metadata.clone(),
                                creation_timestamp: None,
                            });
                        }
                        (spec.zone.clone(), spec.name.clone(), OperationKind::Insert)
                    }
                    CloudCall::Delete { zone, name: vm, .. } | CloudCall::SetLabels { zone, name: vm, .. } => {
                        (zone.clone(), vm.clone(), OperationKind::Delete)
                    }
                };
                self.ops.insert(rid, (instance, zone, kind, None, false));
            }
            self.run.status = Some(plan.status.clone());
            plan
        }

        /// Every running operation finishes (inserts in `fail_zone` fail for capacity).
        fn finish_operations(&mut self, fail_zone: Option<&str>) {
            for (instance, zone, kind, error, done) in self.ops.values_mut() {
                if *done {
                    continue;
                }
                *done = true;
                match kind {
                    OperationKind::Insert if Some(zone.as_str()) == fail_zone => {
                        *error = Some(ComputeError::OperationFailed {
                            operation: "x".into(),
                            code: ErrorCode::ZoneResourcePoolExhausted,
                            message: String::new(),
                        });
                        self.vms.retain(|v| !(v.name == *instance && v.zone == *zone));
                    }
                    OperationKind::Delete => self.vms.retain(|v| !(v.name == *instance && v.zone == *zone)),
                    _ => {}
                }
            }
        }

        fn shard(&self, index: i32) -> ShardStatus {
            self.status().shards.into_iter().find(|s| s.index == index).expect("shard")
        }

        fn register(&mut self, index: i32) {
            let lease_id = self.shard(index).lease_id;
            self.heard.insert(
                index,
                Heard {
                    lease_id,
                    registered_at: Some(self.now),
                    first_heard: Some(self.now),
                    last_heartbeat: Some(self.now),
                    result: None,
                    preempted_at: None,
                },
            );
        }

        fn report(&mut self, index: i32, exit_code: i32) {
            let lease_id = self.shard(index).lease_id;
            let heard = self.heard.entry(index).or_insert(Heard {
                lease_id,
                registered_at: Some(self.now),
                first_heard: Some(self.now),
                last_heartbeat: None,
                result: None,
                preempted_at: None,
            });
            if heard.lease_id == lease_id {
                heard.last_heartbeat = Some(self.now);
                heard.result = Some(ShardResult { exit_code, duration_ms: 10, output_tail: "out".into() });
            }
        }

        fn advance(&mut self, secs: i64) {
            self.now += SignedDuration::from_secs(secs);
        }

        /// The shard's agent says its VM is being preempted.
        fn agent_says_preempted(&mut self, index: i32) {
            let lease_id = self.shard(index).lease_id;
            let now = self.now;
            let heard = self.heard.entry(index).or_insert(Heard {
                lease_id,
                registered_at: Some(now),
                first_heard: Some(now),
                last_heartbeat: Some(now),
                result: None,
                preempted_at: None,
            });
            if heard.lease_id == lease_id {
                heard.preempted_at = Some(now);
            }
        }

        /// Compute Engine shows the shard's VM stopping.
        fn vm_stops(&mut self, index: i32) {
            let name = self.shard(index).instance;
            for vm in self.vms.iter_mut().filter(|v| Some(&v.name) == name.as_ref()) {
                vm.status = crate::compute::InstanceStatus::Stopping;
            }
        }

        /// Both zones turn out to have no capacity, one after the other.
        fn every_zone_out_of_capacity(&mut self) -> Plan {
            self.finish_operations(Some("us-central1-a"));
            self.reconcile();
            self.finish_operations(Some("us-central1-b"));
            self.reconcile()
        }

        /// Every open call is carried out (a delete deletes its VM; an
        /// insert's VM is there from the call), but answered with HTTP 503.
        fn lose_open_answers(&mut self) {
            let lost = ComputeError::Api {
                call: "instances",
                code: ErrorCode::Unavailable,
                status: 503,
                message: String::new(),
            };
            for (instance, zone, kind, error, done) in self.ops.values_mut() {
                if *done {
                    continue;
                }
                (*error, *done) = (Some(lost.clone()), true);
                if *kind == OperationKind::Delete {
                    self.vms.retain(|v| !(v.name == *instance && v.zone == *zone));
                }
            }
        }

        /// Every call made so far ends with this error.
        fn fail_every_call(&mut self, error: &ComputeError) {
            for (_, _, _, e, done) in self.ops.values_mut() {
                (*e, *done) = (Some(error.clone()), true);
            }
        }

        /// Shard 0's insert finishes, its agent registers and succeeds.
        fn shard_0_succeeds(&mut self) {
            self.finish_operations(None);
            self.reconcile();
            self.register(0);
            self.report(0, 0);
            self.reconcile();
        }
    }

    #[test]
    fn a_run_goes_from_pending_to_succeeded_and_deletes_its_vms() {
        let mut w = World::new(run(2, 3));
        let plan = w.reconcile();
        assert_eq!(plan.calls.len(), 2, "one VM per shard");
        assert!(plan.calls.iter().all(|c| matches!(c, CloudCall::Insert(_))));
        assert_eq!(w.status().phase, Some(TestRunPhase::Provisioning));
        // The intent is in status before any call result is known.
        assert_eq!(plan.status.operations.len(), 2);
        assert!(plan.status.operations.iter().all(|o| o.state == OperationState::Intended));

        w.finish_operations(None);
        w.reconcile();
        w.register(0);
        w.register(1);
        w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Running));
        let first_start = w.shard(0).start_time.clone().expect("started");
        assert_eq!(w.status().oldest_running_shard_start_time, Some(first_start));
        w.report(0, 0);
        let plan = w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Running), "one shard is still running");
        assert_eq!(w.status().oldest_running_shard_start_time, w.shard(1).start_time);
        let shard0 = w.shard(0).instance;
        assert!(
            matches!(&plan.calls[..], [CloudCall::Delete { name, .. }] if Some(name) == shard0.as_ref()),
            "{:?}",
            plan.calls
        );
        let c = w.status().conditions;
        assert!(conditions::is_true(&c, "Reconciling") && !conditions::is_true(&c, "Complete"));
        w.report(1, 0);
        let plan = w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded));
        let c = w.status().conditions;
        let complete = conditions::get(&c, "Complete").expect("Complete");
        assert_eq!((complete.status, complete.reason.as_str()), (ConditionStatus::True, "Succeeded"));
        for type_ in ["Failed", "Reconciling", "Stalled", "Progressing"] {
            assert!(!conditions::is_true(&c, type_), "{type_}: {c:?}");
        }
        assert_eq!(w.status().oldest_running_shard_start_time, None, "no shard runs");
        assert_eq!(plan.calls.iter().filter(|c| matches!(c, CloudCall::Delete { .. })).count(), 1);
        w.finish_operations(None);
        w.reconcile();
        assert!(w.vms.is_empty());
        assert!(w.status().operations.is_empty());
    }

    #[test]
    fn a_deleted_run_with_no_vm_left_looks_again_while_a_zone_cannot_be_seen() {
        let mut w = World::new(run(1, 3));
        w.reconcile();
        w.finish_operations(None);
        w.register(0);
        w.report(0, 0);
        w.reconcile();
        w.finish_operations(None);
        w.reconcile();
        assert!(w.status().operations.is_empty() && w.vms.is_empty());
        let exhausted = BTreeSet::new();
        let cleanup = |view: &VmView| {
            plan_cleanup(&Observed {
                run: &w.run,
                now: w.now,
                vms: view,
                operations: &BTreeMap::new(),
                outstanding: 0,
                heard: &BTreeMap::new(),
                exhausted_zones: &exhausted,
                settings: &w.settings,
                key: &w.key,
                claims: &BTreeMap::new(),
                preset_vm: None,
                class: &ClassChoice::NoClass,
                rerun: &Rerun::Nothing,
            })
        };
        // A zone is unreachable: "no VM left" cannot be believed yet, and
        // nothing about the run will change to wake it: it looks again soon.
        let unseen = VmView { vms: Vec::new(), synced: true, unknown_zones: ["us-central1-b".to_string()].into() };
        let plan = cleanup(&unseen);
        assert!(!plan.cleanup_done);
        assert!(plan.requeue_after <= UNSEEN_ZONE_RECHECK, "{:?}", plan.requeue_after);
        assert!(cleanup(&VmView::complete(Vec::new())).cleanup_done);
    }

    #[test]
    fn a_repeated_reconcile_reissues_intents_with_the_same_request_id() {
        let mut w = World::new(run(1, 3));
        let first = w.reconcile();
        // Status written, calls lost (crash): plan again from the written status.
        let mut status = first.status.clone();
        for op in &mut status.operations {
            op.state = OperationState::Intended;
            op.operation = None;
        }
        w.run.status = Some(status);
        let exhausted = BTreeSet::new();
        let again = plan(&Observed {
            run: &w.run,
            now: w.now,
            vms: &VmView::complete(Vec::new()),
            operations: &BTreeMap::new(),
            outstanding: 0,
            heard: &BTreeMap::new(),
            exhausted_zones: &exhausted,
            settings: &w.settings,
            key: &w.key,
            claims: &BTreeMap::new(),
            preset_vm: None,
            class: &ClassChoice::NoClass,
            rerun: &Rerun::Nothing,
        });
        assert_eq!(again.calls.len(), 1);
        assert_eq!(again.calls[0].request_id(), first.calls[0].request_id());
        assert_eq!(again.status.attempts, 1, "re-issuing is not a new attempt");
    }

    #[test]
    fn capacity_moves_to_the_next_zone_without_using_an_attempt() {
        let mut w = World::new(run(1, 3));
        w.reconcile();
        w.finish_operations(Some("us-central1-a"));
        let plan = w.reconcile();
        let shard = w.shard(0);
        assert_eq!((shard.attempt, shard.zone.as_deref()), (1, Some("us-central1-b")));
        assert_eq!(plan.exhausted, vec!["us-central1-a".to_string()]);
        assert!(matches!(&plan.calls[..], [CloudCall::Insert(spec)] if spec.zone == "us-central1-b"));
        // No zone left: the attempt is used up and the next one starts over,
        // after a wait.
        w.finish_operations(Some("us-central1-b"));
        w.reconcile();
        w.advance(30);
        w.reconcile();
        assert_eq!(w.shard(0).attempt, 2);
        let history = w.shard(0).history;
        assert_eq!(history.iter().map(|r| r.outcome).collect::<Vec<_>>(), [AttemptOutcome::CapacityExhausted]);
        assert!(conditions::is_true(&w.status().conditions, "Degraded"), "no VM yet");
        // Degraded is the state now, not a record: it clears once the shard
        // has its VM.
        w.finish_operations(None);
        w.reconcile();
        w.register(0);
        w.reconcile();
        assert_eq!(w.shard(0).phase, TestRunPhase::Running);
        let c = w.status().conditions;
        let degraded = conditions::get(&c, "Degraded").expect("Degraded");
        assert_eq!((degraded.status, degraded.reason.as_str()), (ConditionStatus::False, "AsExpected"));
        w.report(0, 0);
        w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded));
        assert!(!conditions::is_true(&w.status().conditions, "Degraded"));
    }

    #[test]
    fn a_failed_run_says_why_in_failed_and_stalled() {
        let mut w = World::new(run(2, 3));
        w.reconcile();
        w.finish_operations(None);
        w.reconcile();
        w.register(0);
        w.register(1);
        w.report(0, 0);
        w.report(1, 7);
        w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Failed));
        let c = w.status().conditions;
        let failed = conditions::get(&c, "Failed").expect("Failed");
        assert_eq!((failed.status, failed.reason.as_str()), (ConditionStatus::True, "Failed"));
        assert!(failed.message.contains("shard 1 Failed: attempt 1 exited with code 7"), "{}", failed.message);
        let stalled = conditions::get(&c, "Stalled").expect("Stalled");
        assert_eq!((stalled.status, stalled.message.as_str()), (ConditionStatus::True, failed.message.as_str()));
        assert!(!conditions::is_true(&c, "Complete") && !conditions::is_true(&c, "Reconciling"));
    }

    #[test]
    fn a_heartbeat_on_the_current_lease_counts_as_registration_after_a_restart() {
        let mut w = World::new(run(1, 2));
        w.reconcile();
        w.finish_operations(None);
        w.reconcile();
        // The registration was heard by the process before; this one hears
        // only heartbeats, right up to the registration deadline and past it.
        let lease_id = w.shard(0).lease_id;
        let first = w.now + SignedDuration::from_secs(10);
        for _ in 0..61 {
            w.advance(10);
            w.heard.insert(
                0,
                Heard {
                    lease_id,
                    registered_at: None,
                    first_heard: Some(first),
                    last_heartbeat: Some(w.now),
                    result: None,
                    preempted_at: None,
                },
            );
            // This process is slow to look: its first pass after the
            // restart comes when many heartbeats were heard.
            if w.now >= first + SignedDuration::from_secs(300) {
                w.reconcile();
            }
        }
        let shard = w.shard(0);
        assert_eq!((shard.attempt, shard.phase), (1, TestRunPhase::Running), "{shard:?}");
        assert_eq!(shard.start_time, Some(Time(first)), "the lease began with its first heartbeat heard");
        w.report(0, 0);
        w.reconcile();
        assert_eq!(w.shard(0).phase, TestRunPhase::Succeeded);
    }

    #[test]
    fn capacity_in_no_zone_makes_the_next_attempt_wait_instead_of_using_up_attempts() {
        let mut w = World::new(run(1, 3));
        w.reconcile();
        // Every zone is out of capacity for attempt 1.
        let plan = w.every_zone_out_of_capacity();
        let shard = w.shard(0);
        assert_eq!((shard.attempt, shard.phase), (1, TestRunPhase::Pending), "{shard:?}");
        assert!(plan.calls.is_empty(), "no VM is asked for while the shard waits: {:?}", plan.calls);
        assert!(plan.requeue_after <= Duration::from_secs(30), "woken when the wait is over");
        // Passes during the wait change nothing.
        for _ in 0..5 {
            w.advance(5);
            assert!(w.reconcile().calls.is_empty());
            assert_eq!(w.shard(0).attempt, 1);
        }
        w.advance(5);
        let plan = w.reconcile();
        let shard = w.shard(0);
        assert_eq!((shard.attempt, shard.phase, shard.retry_after.clone()), (2, TestRunPhase::Provisioning, None));
        assert!(matches!(&plan.calls[..], [CloudCall::Insert(spec)] if spec.zone == "us-central1-a"));
        // The waits double.
        assert_eq!([1, 2, 3, 4, 5, 6].map(|a| capacity_wait(a).as_secs()), [30, 60, 120, 240, 300, 300]);
    }

    #[test]
    fn an_insert_whose_operation_was_lost_or_timed_out_is_made_again_in_the_same_attempt() {
        for code in [ErrorCode::OperationVanished, ErrorCode::OperationTimedOut] {
            let mut w = World::new(run(1, 3));
            let first = w.reconcile();
            for (_, _, _, error, done) in w.ops.values_mut() {
                *done = true;
                *error = Some(ComputeError::Api {
                    call: "zoneOperations.get",
                    code: code.clone(),
                    status: 404,
                    message: String::new(),
                });
            }
            w.vms.clear();
            w.reconcile();
            w.advance(10);
            let again = w.reconcile();
            let shard = w.shard(0);
            assert_eq!((shard.attempt, shard.phase), (1, TestRunPhase::Provisioning), "{code}: {shard:?}");
            assert!(
                matches!(&again.calls[..], [CloudCall::Insert(spec)] if spec.zone == "us-central1-a"),
                "{code}: made again in the same zone: {:?}",
                again.calls
            );
            assert_ne!(again.calls[0].request_id(), first.calls[0].request_id(), "{code}: with a new request id");
        }
    }

    #[test]
    fn a_silent_agent_loses_its_lease_and_attempts_run_out() {
        let mut w = World::new(run(1, 2));
        w.reconcile();
        w.finish_operations(None);
        w.register(0);
        w.reconcile();
        let first = w.shard(0);
        w.advance(31);
        let plan = w.reconcile();
        let second = w.shard(0);
        assert_eq!(second.attempt, 2);
        assert!(second.lease_id > first.lease_id);
        assert!(plan.events.iter().any(|e| e.reason == "LeaseLost"));
        assert!(
            plan.calls
                .iter()
                .any(|c| matches!(c, CloudCall::Delete { name, .. } if Some(name) == first.instance.as_ref()))
        );
        // A late result from the first lease is not the current lease's.
        w.heard.insert(
            0,
            Heard {
                lease_id: first.lease_id,
                registered_at: None,
                first_heard: None,
                last_heartbeat: Some(w.now),
                result: Some(ShardResult { exit_code: 0, duration_ms: 1, output_tail: String::new() }),
                preempted_at: None,
            },
        );
        w.reconcile();
        assert_eq!(w.shard(0).phase, TestRunPhase::Provisioning);
        w.finish_operations(None);
        w.register(0);
        w.reconcile();
        w.advance(31);
        w.reconcile();
        assert_eq!(w.shard(0).phase, TestRunPhase::Error);
        assert_eq!(w.status().phase, Some(TestRunPhase::Error));
        // Each attempt says why it ended, on which VM.
        let history = w.shard(0).history;
        let told: Vec<(i32, AttemptOutcome)> = history.iter().map(|r| (r.attempt, r.outcome)).collect();
        assert_eq!(told, [(1, AttemptOutcome::LeaseLost), (2, AttemptOutcome::LeaseLost)]);
        assert_eq!(history[0].instance, first.instance);
        assert!(history.iter().all(|r| r.start_time.is_some() && r.zone.is_some()));
    }

    #[test]
    fn heartbeats_reach_status_at_most_every_fifteen_seconds() {
        let mut w = World::new(run(1, 3));
        w.reconcile();
        w.finish_operations(None);
        w.register(0);
        w.reconcile();
        let written = w.shard(0).last_heartbeat.expect("registration is written");
        for _ in 0..2 {
            w.advance(5);
            w.heard.get_mut(&0).expect("heard").last_heartbeat = Some(w.now);
            w.reconcile();
            assert_eq!(w.shard(0).last_heartbeat.as_ref(), Some(&written), "a heartbeat alone waits");
        }
        w.advance(5);
        w.heard.get_mut(&0).expect("heard").last_heartbeat = Some(w.now);
        w.reconcile();
        assert_eq!(w.shard(0).last_heartbeat, Some(Time(w.now)), "15 s later it is written");
    }

    #[test]
    fn cancelling_stops_every_shard_and_deletes_the_vms() {
        let mut w = World::new(run(2, 3));
        w.reconcile();
        w.finish_operations(None);
        w.register(0);
        w.reconcile();
        w.run.spec.cancel = true;
        let plan = w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Cancelled));
        assert!(w.status().shards.iter().all(|s| s.phase == TestRunPhase::Cancelled));
        assert_eq!(plan.calls.iter().filter(|c| matches!(c, CloudCall::Delete { .. })).count(), 2);
        assert!(!plan.calls.iter().any(|c| matches!(c, CloudCall::Insert(_))));
        let failed = conditions::get(&plan.status.conditions, "Failed").expect("Failed");
        assert_eq!((failed.status, failed.reason.as_str()), (ConditionStatus::True, "Cancelled"));
        assert!(failed.message.starts_with("cancelled (spec.cancel)"), "{}", failed.message);
    }

    #[test]
    fn a_cancelled_run_whose_insert_fails_starts_no_next_attempt() {
        let mut w = World::new(run(1, 3));
        w.reconcile();
        w.run.spec.cancel = true;
        w.fail_every_call(&ComputeError::OperationFailed {
            operation: "x".into(),
            code: ErrorCode::Other("INVALID_FIELD_VALUE".into()),
            message: "boom".into(),
        });
        let plan = w.reconcile();
        assert_eq!(inserts(&plan), 0, "{:?}", plan.calls);
        let shard = w.shard(0);
        assert_eq!((shard.attempt, shard.phase), (1, TestRunPhase::Cancelled));
        assert!(shard.history.len() <= 1, "{:?}", shard.history);
    }

    #[test]
    fn deleting_a_run_ends_its_attempts_under_way_as_cancelled_once() {
        let mut w = World::new(run(2, 3));
        w.reconcile();
        w.finish_operations(None);
        w.register(0);
        w.reconcile();
        w.deleting = true;
        let first = w.reconcile();
        assert_eq!(first.ended, [AttemptOutcome::Cancelled, AttemptOutcome::Cancelled]);
        let again = w.reconcile();
        assert!(again.ended.is_empty(), "told once: {:?}", again.ended);
        assert!(
            w.status().shards.iter().all(|s| s.history.last().map(|r| r.outcome) == Some(AttemptOutcome::Cancelled))
        );
    }

    #[test]
    fn the_longest_history_of_the_largest_run_fits_well_within_etcd() {
        let record = AttemptRecord {
            attempt: 10,
            outcome: AttemptOutcome::RegistrationTimeout,
            exit_code: Some(255),
            zone: Some("northamerica-northeast1-c".into()),
            instance: Some("x".repeat(63)),
            start_time: Some(Time(Timestamp::UNIX_EPOCH)),
            end_time: Time(Timestamp::UNIX_EPOCH),
        };
        let history = vec![record; ATTEMPT_HISTORY];
        let per_shard = serde_json::to_vec(&history).expect("JSON").len();
        assert!(per_shard * 256 < 400 * 1024, "{per_shard} bytes a shard");
    }

    #[test]
    fn more_failed_shards_than_allowed_stop_the_others_and_delete_their_vms() {
        let mut fast = run(4, 3);
        fast.spec.max_failed_shards = Some(0);
        let mut w = World::new(fast);
        w.reconcile();
        w.finish_operations(None);
        w.reconcile();
        for i in 0..4 {
            w.register(i);
        }
        w.reconcile();
        w.report(2, 1);
        let plan = w.reconcile();
        let status = w.status();
        assert_eq!(status.phase, Some(TestRunPhase::Failed));
        let phases: Vec<TestRunPhase> = status.shards.iter().map(|s| s.phase).collect();
        use TestRunPhase::{Cancelled, Failed};
        assert_eq!(phases, [Cancelled, Cancelled, Failed, Cancelled]);
        assert!(status.shards[0].message.as_deref().unwrap_or_default().contains("more than spec.maxFailedShards (0)"));
        let deletes = plan.calls.iter().filter(|c| matches!(c, CloudCall::Delete { .. })).count();
        assert_eq!(deletes, 4, "every VM goes: {:?}", plan.calls);
        assert!(plan.events.iter().any(|e| e.reason == "FailFast"));
        let failed = conditions::get(&plan.status.conditions, "Failed").expect("Failed");
        assert!(failed.message.contains("shard 2 Failed"), "the failed shard, not a stopped one: {}", failed.message);
        assert_eq!(status.shards[0].history.last().map(|r| r.outcome), Some(AttemptOutcome::Cancelled));

        // One failure allowed: the run goes on.
        let mut lenient = run(2, 3);
        lenient.spec.max_failed_shards = Some(1);
        let mut w = World::new(lenient);
        w.reconcile();
        w.finish_operations(None);
        w.reconcile();
        w.register(0);
        w.register(1);
        w.reconcile();
        w.report(0, 1);
        w.reconcile();
        assert_eq!(w.shard(1).phase, TestRunPhase::Running);
    }

    #[test]
    fn invalid_specs_make_no_calls() {
        let mut bad = run(1, 3);
        bad.spec.vm = None;
        let mut w = World::new(bad);
        let plan = w.reconcile();
        assert!(plan.calls.is_empty());
        let c = conditions::get(&plan.status.conditions, "InvalidSpec").expect("condition");
        assert_eq!(c.status, ConditionStatus::True);
        assert!(c.message.contains("spec.vm"), "{}", c.message);
        let stalled = conditions::get(&plan.status.conditions, "Stalled").expect("Stalled");
        assert_eq!((stalled.status, stalled.reason.as_str()), (ConditionStatus::True, "InvalidSpec"));
        assert!(!conditions::is_true(&plan.status.conditions, "Reconciling"));
    }

    fn inserts(plan: &Plan) -> usize {
        plan.calls.iter().filter(|c| matches!(c, CloudCall::Insert(_))).count()
    }

    #[test]
    fn a_run_waiting_for_its_preset_says_so_in_ready_and_stalled_and_warns_once() {
        let mut waiting = run(1, 3);
        waiting.spec.vm = None;
        waiting.spec.preset_ref = Some(crate::api::testrun::PresetRef { name: "pool".into() });
        // First invalid (it leaves the phase Pending), then fixed.
        waiting.spec.env = vec![crate::api::EnvVar { name: "A".into(), value: "1".into() }; 2];
        let mut w = World::new(waiting);
        w.reconcile();
        assert!(conditions::is_true(&w.status().conditions, "InvalidSpec"));
        w.run.spec.env.truncate(1);
        let plan = w.reconcile();
        let mut warnings = plan.events.iter().filter(|e| e.reason == "PresetNotFound").count();
        // Fixed, but not judged by its class yet: Unknown, not Valid.
        let invalid = conditions::get(&w.status().conditions, "InvalidSpec").expect("InvalidSpec").clone();
        assert_eq!((invalid.status, invalid.reason.as_str()), (ConditionStatus::Unknown, "PresetNotFound"));
        for _ in 0..3 {
            let plan = w.reconcile();
            warnings += plan.events.iter().filter(|e| e.reason == "PresetNotFound").count();
            let c = &plan.status.conditions;
            let ready = conditions::get(c, "Ready").expect("Ready");
            assert_eq!(ready.reason, "PresetNotFound", "{c:?}");
            let stalled = conditions::get(c, "Stalled").expect("Stalled");
            assert_eq!((stalled.status, stalled.reason.as_str()), (ConditionStatus::True, "PresetNotFound"));
        }
        assert_eq!(warnings, 1, "one Warning, not one per look");
    }

    #[test]
    fn a_started_run_goes_on_when_its_preset_is_deleted() {
        let mut with_preset = run(1, 3);
        let shape = with_preset.spec.vm.take();
        with_preset.spec.preset_ref = Some(crate::api::testrun::PresetRef { name: "pool".into() });
        let mut w = World::new(with_preset);
        w.preset_vm = shape.clone();
        assert_eq!(inserts(&w.reconcile()), 1, "a fresh VM of the preset's shape");
        assert_eq!(w.status().started.map(|s| s.vm), shape, "the shape is kept in status");
        w.finish_operations(None);
        // The preset goes; the run goes on to its result.
        w.preset_vm = None;
        w.register(0);
        w.reconcile();
        w.report(0, 0);
        let plan = w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded));
        assert_eq!(plan.calls.iter().filter(|c| matches!(c, CloudCall::Delete { .. })).count(), 1);
        // A lost VM is created again from the kept shape.
        let mut again = World::new(w.run.clone());
        again.run.status = None;
        again.preset_vm = shape.clone();
        again.reconcile();
        again.preset_vm = None;
        again.finish_operations(None);
        again.vms.clear();
        again.advance(1);
        let plan = again.reconcile();
        let Some(CloudCall::Insert(spec)) = plan.calls.iter().find(|c| matches!(c, CloudCall::Insert(_))) else {
            panic!("attempt 2 gets a VM without the preset: {:?}", plan.calls);
        };
        assert_eq!(Some(&spec.machine_type), shape.as_ref().map(|v| &v.machine_type));
        assert_eq!(again.shard(0).attempt, 2);
    }

    #[test]
    fn an_invalid_spec_after_the_start_stops_new_vms_not_running_ones() {
        let mut w = World::new(run(2, 3));
        w.reconcile();
        w.finish_operations(None);
        w.register(0);
        w.register(1);
        w.reconcile();
        // The spec turns invalid (a heartbeat timeout longer than the timeout).
        w.run.spec.heartbeat_timeout = "soon".into();
        let vm1 = w.shard(1).instance.expect("instance");
        w.vms.retain(|v| v.name != vm1);
        w.report(0, 0);
        let plan = w.reconcile();
        assert_eq!(inserts(&plan), 0, "no new VM while the spec is invalid");
        assert_eq!(w.shard(0).phase, TestRunPhase::Succeeded, "the running shard's result is stored");
        assert_eq!(w.shard(1).phase, TestRunPhase::Pending, "{:?}", w.shard(1).message);
        let invalid = conditions::get(&w.status().conditions, "InvalidSpec").expect("InvalidSpec").clone();
        assert_eq!(invalid.status, ConditionStatus::True);
        // Fixed: shard 1 starts its next attempt.
        w.run.spec.heartbeat_timeout = "30s".into();
        let plan = w.reconcile();
        assert_eq!(inserts(&plan), 1);
        assert_eq!(w.shard(1).attempt, 2);
        assert_eq!(w.shard(1).phase, TestRunPhase::Provisioning);
    }

    #[test]
    fn a_run_begun_without_its_shape_in_status_finishes_when_its_spec_turns_invalid_or_its_preset_goes() {
        // Runs started by a controller that kept no `status.started`.
        for broken in ["invalid spec", "preset gone"] {
            let mut with_preset = run(2, 3);
            let shape = with_preset.spec.vm.take();
            with_preset.spec.preset_ref = Some(crate::api::testrun::PresetRef { name: "pool".into() });
            let mut w = World::new(with_preset);
            w.preset_vm = shape.clone();
            w.reconcile();
            w.finish_operations(None);
            w.register(0);
            w.register(1);
            w.reconcile();
            let mut status = w.status();
            status.started = None;
            w.run.status = Some(status);
            match broken {
                "invalid spec" => w.run.spec.heartbeat_timeout = "soon".into(),
                _ => w.preset_vm = None,
            }
            // Shard 1 loses its VM: no new one while the run cannot say its shape.
            let vm1 = w.shard(1).instance.expect("instance");
            w.vms.retain(|v| v.name != vm1);
            w.report(0, 0);
            let plan = w.reconcile();
            assert_eq!(inserts(&plan), 0, "{broken}: no VM without a shape");
            assert_eq!(w.shard(0).phase, TestRunPhase::Succeeded, "{broken}: the result is stored");
            assert_eq!(w.shard(1).phase, TestRunPhase::Pending, "{broken}");
            assert!(w.shard(1).message.is_some_and(|m| m.starts_with("attempt 2 waits: ")), "{broken}");
            assert_eq!(w.status().started, None, "{broken}: no shape is made up");
            // Cancelled, it ends, and its VMs go.
            w.run.spec.cancel = true;
            w.reconcile();
            assert_eq!(w.status().phase, Some(TestRunPhase::Cancelled), "{broken}");
        }
    }

    #[test]
    fn a_shard_waiting_out_a_stock_out_says_it_waits_for_a_valid_spec_once_its_spec_turns_invalid() {
        let mut w = World::new(run(1, 3));
        w.reconcile();
        w.every_zone_out_of_capacity();
        assert!(w.shard(0).message.is_some_and(|m| m.contains("attempt 2 starts in 30s")), "{:?}", w.shard(0));
        w.run.spec.heartbeat_timeout = "soon".into();
        w.advance(31);
        let plan = w.reconcile();
        assert_eq!(inserts(&plan), 0);
        let shard = w.shard(0);
        assert_eq!((shard.phase, shard.retry_after.clone()), (TestRunPhase::Pending, None));
        assert!(shard.message.is_some_and(|m| m.starts_with("attempt 2 waits: ")), "{:?}", w.shard(0));
    }

    #[test]
    fn an_insert_that_fails_while_the_spec_is_invalid_waits_in_its_attempt_and_is_made_once_fixed() {
        // maxAttempts 1: an attempt burned while blocked would end the run.
        for error in [ErrorCode::ZoneResourcePoolExhausted, ErrorCode::Unavailable] {
            let mut w = World::new(run(1, 1));
            w.reconcile();
            w.run.spec.heartbeat_timeout = "soon".into();
            w.fail_every_call(&ComputeError::OperationFailed {
                operation: "x".into(),
                code: error.clone(),
                message: String::new(),
            });
            w.vms.clear();
            // The retry backoff of a 503 is over long before this.
            w.advance(5);
            assert_eq!(inserts(&w.reconcile()), 0, "{error:?}: no VM while the spec is invalid");
            w.advance(3600);
            assert_eq!(inserts(&w.reconcile()), 0, "{error:?}");
            let shard = w.shard(0);
            let zone = if error == ErrorCode::Unavailable { "us-central1-a" } else { "us-central1-b" };
            assert_eq!((shard.attempt, shard.phase), (1, TestRunPhase::Provisioning), "{error:?}: {shard:?}");
            assert_eq!(shard.zone.as_deref(), Some(zone), "{error:?}");
            assert_eq!(shard.requested_time, None, "{error:?}: no registration clock runs");
            let waits = format!("attempt 1 waits for its VM in {zone}: ");
            assert!(shard.message.as_ref().is_some_and(|m| m.starts_with(&waits)), "{error:?}: {shard:?}");

            // Fixed: the same attempt's insert is made, and its clock starts.
            w.run.spec.heartbeat_timeout = "30s".into();
            let plan = w.reconcile();
            let made: Vec<_> = plan
                .calls
                .iter()
                .filter_map(|c| match c {
                    CloudCall::Insert(spec) => Some(spec.zone.clone()),
                    _ => None,
                })
                .collect();
            assert_eq!(made, [zone], "{error:?}");
            assert_eq!(w.shard(0).requested_time, Some(Time(w.now)), "{error:?}");
            w.shard_0_succeeds();
            assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded), "{error:?}: {:?}", w.status());
        }
    }

    #[test]
    fn an_insert_whose_answer_was_lost_while_the_spec_is_invalid_is_made_again_with_its_request_id_once_fixed() {
        let mut w = World::new(run(1, 1));
        let first = w.reconcile().calls[0].request_id().to_string();
        w.run.spec.heartbeat_timeout = "soon".into();
        let lost = ComputeError::Api {
            call: "instances.insert",
            code: ErrorCode::Unavailable,
            status: 503,
            message: String::new(),
        };
        w.fail_every_call(&lost);
        // Its retry comes due while no VM may be made, and stays unmade:
        // the tracker's answer, still the same, is not counted again.
        for _ in 0..20 {
            w.advance(30);
            assert_eq!(inserts(&w.reconcile()), 0);
        }
        let shard = w.shard(0);
        assert_eq!((shard.attempt, shard.phase), (1, TestRunPhase::Provisioning), "{shard:?}");
        w.run.spec.heartbeat_timeout = "30s".into();
        let plan = w.reconcile();
        let ids: Vec<&str> = plan.calls.iter().map(|c| c.request_id()).collect();
        assert_eq!(ids, [first.as_str()], "made again with its own request id");
        w.shard_0_succeeds();
        assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded), "{:?}", w.status());
    }

    #[test]
    fn spec_changes_after_the_start_are_reported_not_applied() {
        let mut w = World::new(run(1, 3));
        w.reconcile();
        w.run.spec.shards = 3;
        w.run.spec.command = vec!["false".into()];
        let plan = w.reconcile();
        assert_eq!(w.status().shards.len(), 1, "no shard added");
        assert_eq!(inserts(&plan), 0);
        let changed = conditions::get(&w.status().conditions, "SpecChanged").expect("SpecChanged").clone();
        assert_eq!(changed.status, ConditionStatus::True);
        assert!(changed.message.contains("spec.shards, spec.command"), "{}", changed.message);
        assert!(plan.events.iter().any(|e| e.reason == "SpecChangeIgnored"));
        assert_eq!(w.status().started.map(|s| s.command), Some(vec!["true".to_string()]));
        w.run.spec.shards = 1;
        w.run.spec.command = vec!["true".into()];
        w.reconcile();
        let changed = conditions::get(&w.status().conditions, "SpecChanged").expect("SpecChanged").clone();
        assert_eq!(changed.status, ConditionStatus::False, "back as started");
    }

    /// A run of `shards` with these failure policy rules, every shard's VM
    /// made and its agent registered.
    fn running_with_rules(shards: i32, max_attempts: i32, rules: serde_json::Value) -> World {
        let mut r = run(shards, max_attempts);
        r.spec.failure_policy = Some(serde_json::from_value(serde_json::json!({ "rules": rules })).expect("policy"));
        let mut w = World::new(r);
        w.reconcile();
        w.finish_operations(None);
        w.reconcile();
        for i in 0..shards {
            w.register(i);
        }
        w.reconcile();
        w
    }

    fn spot_run(max_attempts: i32, max_preemptions: i32) -> TestRun {
        let mut r = run(1, max_attempts);
        r.spec.vm.as_mut().expect("vm").spot = true;
        r.spec.max_preemptions = max_preemptions;
        r
    }

    /// Shard 0's VM is made and its agent registered: it runs.
    fn running(w: &mut World) {
        w.finish_operations(None);
        w.reconcile();
        w.register(0);
        w.reconcile();
        assert_eq!(w.shard(0).phase, TestRunPhase::Running);
    }

    fn insert_spot(plan: &Plan) -> Option<bool> {
        plan.calls.iter().find_map(|c| match c {
            CloudCall::Insert(spec) => Some(spec.spot),
            _ => None,
        })
    }

    #[test]
    fn a_rerun_runs_only_the_shards_it_was_given_under_their_own_numbers() {
        let mut w = World::new(run(5, 3));
        w.rerun = Rerun::Ready {
            original: crate::api::testrun::RunLink { name: "orig".into(), uid: "u".into() },
            shards: vec![1, 3],
        };
        let plan = w.reconcile();
        w.rerun = Rerun::Nothing;
        let status = w.status();
        assert_eq!(status.shards.iter().map(|s| s.index).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(status.started.as_ref().map(|s| s.shards), Some(5), "TESTRUN_SHARDS stays 5");
        assert_eq!(status.rerun_of.as_ref().map(|l| l.name.as_str()), Some("orig"));
        let names: Vec<String> = plan
            .calls
            .iter()
            .filter_map(|c| match c {
                CloudCall::Insert(spec) => Some(spec.metadata[META_SHARD].clone()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["1", "3"]);
        w.finish_operations(None);
        w.reconcile();
        for i in [1, 3] {
            w.register(i);
            w.report(i, 0);
        }
        w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded));
    }

    #[test]
    fn a_rerun_of_a_run_that_fully_succeeded_succeeds_at_once_and_one_that_waits_says_why() {
        let mut w = World::new(run(2, 3));
        w.rerun = Rerun::Ready {
            original: crate::api::testrun::RunLink { name: "orig".into(), uid: "u".into() },
            shards: vec![],
        };
        let plan = w.reconcile();
        assert_eq!(inserts(&plan), 0);
        assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded));
        assert!(conditions::is_true(&w.status().conditions, "Complete"));

        let mut waiting = World::new(run(2, 3));
        waiting.rerun = Rerun::Waiting { reason: "WaitingForOriginal", message: "waits".into(), stalled: false };
        let plan = waiting.reconcile();
        assert_eq!(inserts(&plan), 0);
        let c = &waiting.status().conditions;
        assert_eq!(conditions::get(c, "Ready").map(|c| c.reason.as_str()), Some("WaitingForOriginal"));
        assert!(conditions::is_true(c, "Reconciling") && !conditions::is_true(c, "Stalled"));
        assert_eq!(plan.requeue_after, RERUN_POLL);
        waiting.rerun = Rerun::Waiting { reason: "RerunOfNotFound", message: "gone".into(), stalled: true };
        waiting.reconcile();
        assert!(conditions::is_true(&waiting.status().conditions, "Stalled"));
    }

    #[test]
    fn a_rerun_cancelled_while_it_waited_stays_cancelled_when_its_original_finishes() {
        let mut w = World::new(run(2, 3));
        w.run.spec.cancel = true;
        w.rerun = Rerun::Waiting { reason: "WaitingForOriginal", message: "waits".into(), stalled: false };
        w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Cancelled));
        // The original finishes with nothing failed; then the cancel is even undone.
        w.rerun = Rerun::Ready {
            original: crate::api::testrun::RunLink { name: "orig".into(), uid: "u".into() },
            shards: vec![],
        };
        w.run.spec.cancel = false;
        let plan = w.reconcile();
        let status = w.status();
        assert_eq!((status.phase, status.started.is_some(), inserts(&plan)), (Some(TestRunPhase::Cancelled), false, 0));
        assert!(status.rerun_of.is_none());
    }

    #[test]
    fn a_preemption_uses_no_attempt_until_max_preemptions_then_the_shard_gets_a_standard_vm() {
        let mut w = World::new(spot_run(1, 2));
        assert_eq!(insert_spot(&w.reconcile()), Some(true));
        for n in 1..=2 {
            running(&mut w);
            w.agent_says_preempted(0);
            let plan = w.reconcile();
            let shard = w.shard(0);
            assert_eq!(shard.history.last().map(|r| r.outcome), Some(AttemptOutcome::Preempted));
            assert_eq!((shard.attempt, shard.preemptions, shard.uncounted_attempts), (n + 1, n, n));
            assert_eq!(shard.counted_attempts(), 1, "maxAttempts is 1, and the shard goes on");
            assert_eq!(insert_spot(&plan), Some(n < 2), "after 2 preemptions the VM is standard");
            assert!(plan.events.iter().any(|e| e.reason == "Preempted"), "{:?}", plan.events);
        }
        assert_eq!(w.shard(0).spot, Some(false));
        running(&mut w);
        w.report(0, 0);
        w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Succeeded));
    }

    #[test]
    fn a_spot_vm_compute_engine_stops_unasked_is_preempted_and_a_standard_one_is_not() {
        let mut w = World::new(spot_run(3, 3));
        w.reconcile();
        running(&mut w);
        w.vm_stops(0);
        w.reconcile();
        assert_eq!(w.shard(0).history.last().map(|r| r.outcome), Some(AttemptOutcome::Preempted));
        assert_eq!(w.shard(0).counted_attempts(), 1);

        let mut standard = World::new(run(1, 3));
        standard.reconcile();
        running(&mut standard);
        standard.vm_stops(0);
        standard.reconcile();
        assert!(standard.shard(0).history.is_empty(), "a stopping standard VM is no preemption");
        assert_eq!(standard.shard(0).phase, TestRunPhase::Running);
    }

    #[test]
    fn a_spot_vm_that_vanishes_or_takes_its_command_down_with_a_signal_was_preempted_unless_timed_out() {
        // Gone without a word: its notice was missed.
        let mut w = World::new(spot_run(1, 3));
        w.reconcile();
        running(&mut w);
        w.vms.clear();
        w.reconcile();
        assert_eq!(w.shard(0).history.last().map(|r| r.outcome), Some(AttemptOutcome::Preempted));
        assert_eq!((w.shard(0).phase, w.shard(0).counted_attempts()), (TestRunPhase::Provisioning, 1));

        // SIGTERM'd (143) and gone: the soft off, not the test.
        let mut w = World::new(spot_run(1, 3));
        w.reconcile();
        running(&mut w);
        w.report(0, 143);
        w.vms.clear();
        w.reconcile();
        assert_eq!(
            w.shard(0).history.last().map(|r| (r.outcome, r.exit_code)),
            Some((AttemptOutcome::Preempted, None))
        );

        // A 143 from a VM that still runs is the test's own.
        let mut w = World::new(spot_run(1, 3));
        w.reconcile();
        running(&mut w);
        w.report(0, 143);
        w.reconcile();
        assert_eq!(w.shard(0).phase, TestRunPhase::Failed);

        // Past its timeout, a stopping VM (maxRunDuration) timed out.
        let mut w = World::new(spot_run(1, 3));
        w.reconcile();
        running(&mut w);
        w.advance(11 * 60);
        w.vm_stops(0);
        w.reconcile();
        assert_eq!(w.shard(0).phase, TestRunPhase::TimedOut);
    }

    #[test]
    fn without_spot_fallback_preemptions_past_the_limit_use_attempts_on_spot_vms() {
        let mut r = spot_run(2, 1);
        r.spec.vm.as_mut().expect("vm").spot_fallback = false;
        let mut w = World::new(r);
        w.reconcile();
        for _ in 0..3 {
            running(&mut w);
            w.agent_says_preempted(0);
            let plan = w.reconcile();
            if w.shard(0).phase.is_finished() {
                break;
            }
            assert_eq!(insert_spot(&plan), Some(true));
        }
        let shard = w.shard(0);
        assert_eq!(shard.phase, TestRunPhase::Error, "{:?}", shard.message);
        assert_eq!((shard.attempt, shard.preemptions, shard.uncounted_attempts), (3, 3, 1));
    }

    #[test]
    fn a_failing_result_sent_with_a_preemption_is_the_preemption() {
        let mut w = World::new(spot_run(3, 3));
        w.reconcile();
        running(&mut w);
        w.report(0, 143);
        w.agent_says_preempted(0);
        w.reconcile();
        let shard = w.shard(0);
        assert_eq!(shard.history.iter().map(|r| r.outcome).collect::<Vec<_>>(), [AttemptOutcome::Preempted]);
        assert_eq!(shard.phase, TestRunPhase::Provisioning);
    }

    #[test]
    fn a_fail_run_rule_ends_the_run_at_once_and_deletes_every_vm() {
        let mut w = running_with_rules(
            3,
            3,
            serde_json::json!([{"action": "FailRun", "onExitCodes": {"operator": "In", "values": [2]}}]),
        );
        w.report(1, 2);
        let plan = w.reconcile();
        let status = w.status();
        assert_eq!(status.phase, Some(TestRunPhase::Failed));
        let phases: Vec<TestRunPhase> = status.shards.iter().map(|s| s.phase).collect();
        assert_eq!(phases, [TestRunPhase::Cancelled, TestRunPhase::Failed, TestRunPhase::Cancelled]);
        let deletes = plan.calls.iter().filter(|c| matches!(c, CloudCall::Delete { .. })).count();
        assert_eq!(deletes, 3, "{:?}", plan.calls);
        assert!(plan.events.iter().any(|e| e.reason == "FailRun"), "{:?}", plan.events);
        w.finish_operations(None);
        w.reconcile();
        assert!(w.vms.is_empty(), "{:?}", w.vms);
    }

    #[test]
    fn a_run_a_fail_run_rule_ends_asks_for_no_vm_in_that_pass_even_for_a_shard_retried_in_it() {
        let mut w = running_with_rules(
            2,
            3,
            serde_json::json!([{"action": "FailRun", "onExitCodes": {"operator": "In", "values": [9]}}]),
        );
        // Shard 0's VM vanishes (a retry) and shard 1 fails the run, in one pass.
        let name = w.shard(0).instance;
        w.vms.retain(|v| Some(&v.name) != name.as_ref());
        w.report(1, 9);
        let plan = w.reconcile();
        assert_eq!(inserts(&plan), 0, "{:?}", plan.calls);
        let status = w.status();
        assert_eq!(status.phase, Some(TestRunPhase::Failed));
        assert_eq!(status.shards[0].phase, TestRunPhase::Cancelled);
        assert!(
            status.operations.iter().all(|o| o.kind != OperationKind::Insert
                || o.instance != status.shards[0].instance.clone().unwrap_or_default()),
            "the unmade insert is not tracked: {:?}",
            status.operations
        );
        w.finish_operations(None);
        w.reconcile();
        assert!(w.vms.is_empty(), "{:?}", w.vms);
    }

    #[test]
    fn a_run_ended_in_the_pass_that_retries_a_failed_insert_makes_no_insert() {
        let mut w = running_with_rules(
            2,
            3,
            serde_json::json!([{"action": "FailRun", "onExitCodes": {"operator": "In", "values": [9]}}]),
        );
        // Shard 0 is on attempt 2, whose insert failed with a 503: the
        // retry is due when shard 1 fails the run.
        let name = w.shard(0).instance;
        w.vms.retain(|v| Some(&v.name) != name.as_ref());
        w.reconcile();
        assert_eq!(w.shard(0).attempt, 2);
        w.fail_every_call(&ComputeError::Api {
            call: "instances.insert",
            code: ErrorCode::Unavailable,
            status: 503,
            message: String::new(),
        });
        w.vms.retain(|v| !v.name.ends_with("-0-2"));
        w.advance(30);
        w.register(1);
        w.report(1, 9);
        let plan = w.reconcile();
        assert_eq!(w.status().phase, Some(TestRunPhase::Failed));
        assert_eq!(inserts(&plan), 0, "{:?}", plan.calls);
    }

    #[test]
    fn an_ignore_rule_retries_without_counting_and_fail_shard_ends_the_shard() {
        let mut w = running_with_rules(
            1,
            1,
            serde_json::json!([
                {"action": "Ignore", "onReasons": ["VmLost"]},
                {"action": "FailShard", "onReasons": ["LeaseLost"]},
            ]),
        );
        let name = w.shard(0).instance;
        w.vms.retain(|v| Some(&v.name) != name.as_ref());
        w.reconcile();
        let shard = w.shard(0);
        assert_eq!((shard.attempt, shard.uncounted_attempts, shard.phase), (2, 1, TestRunPhase::Provisioning));
        running(&mut w);
        w.advance(31);
        w.reconcile();
        let shard = w.shard(0);
        assert_eq!(shard.phase, TestRunPhase::Error);
        assert_eq!(shard.history.last().map(|r| r.outcome), Some(AttemptOutcome::LeaseLost));
        assert!(shard.message.as_deref().unwrap_or_default().contains("failurePolicy.rules[1]"), "{:?}", shard.message);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Advance(i64),
        Finish,
        FailZoneA,
        Register(i32),
        Report(i32, i32),
        Vanish(i32),
        Delete,
        /// The spec turns invalid (or valid again): no VM may be created.
        BreakSpec(bool),
        /// Every open call is carried out, but its answer is lost (HTTP 503).
        LoseAnswers,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1i64..40).prop_map(Step::Advance),
            Just(Step::Finish),
            Just(Step::FailZoneA),
            (0i32..3).prop_map(Step::Register),
            ((0i32..3), prop_oneof![Just(0), Just(1)]).prop_map(|(s, c)| Step::Report(s, c)),
            (0i32..3).prop_map(Step::Vanish),
            Just(Step::Delete),
            any::<bool>().prop_map(Step::BreakSpec),
            Just(Step::LoseAnswers),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn invariants_hold_whatever_happens(steps in proptest::collection::vec(step(), 1..40)) {
            let mut w = World::new(run(3, 3));
            w.reconcile();
            for step in steps {
                match step {
                    Step::Advance(s) => w.advance(s),
                    Step::Finish => w.finish_operations(None),
                    Step::FailZoneA => w.finish_operations(Some("us-central1-a")),
                    Step::Register(i) => w.register(i),
                    Step::Report(i, code) => w.report(i, code),
                    Step::Vanish(i) => { let name = w.shard(i).instance; w.vms.retain(|v| Some(&v.name) != name.as_ref()); }
                    Step::Delete => w.deleting = true,
                    Step::BreakSpec(broken) => {
                        w.run.spec.heartbeat_timeout = if broken { "soon" } else { "30s" }.into();
                    }
                    Step::LoseAnswers => w.lose_open_answers(),
                }
                let before: Vec<ShardStatus> = w.status().shards;
                let plan = w.reconcile();
                let status = w.status();

                // Every call is named by an operation in the status the plan
                // writes: a pass planned from an old copy, whose guarded
                // write is refused, makes no call that is not recorded.
                for call in &plan.calls {
                    prop_assert!(
                        plan.status.operations.iter().any(|op| op.request_id == call.request_id()),
                        "call {:?} is not recorded in status", call
                    );
                }

                // A run whose spec is invalid creates nothing.
                if validate_testrun(&w.run.spec).is_err() {
                    prop_assert_eq!(inserts(&plan), 0, "an invalid run asked for an insert: {:?}", plan.calls);
                }

                // A pass on a run being deleted never creates anything, and
                // is done only when every VM it may have made is gone and no
                // call is open.
                if w.deleting {
                    prop_assert_eq!(inserts(&plan), 0, "cleanup asked for an insert: {:?}", plan.calls);
                    if plan.cleanup_done {
                        prop_assert!(w.vms.is_empty(), "done with VMs left: {:?}", w.vms);
                        prop_assert!(w.ops.values().all(|(_, _, _, _, done)| *done), "done with calls open");
                    }
                }

                // Never two VMs for one shard attempt.
                let mut names = BTreeSet::new();
                for vm in &w.vms {
                    prop_assert!(names.insert(vm.name.clone()), "two VMs named {}", vm.name);
                }
                // Never completion while a shard may still run; success only with every result 0.
                if status.phase.is_some_and(|p| p.is_finished()) {
                    prop_assert!(status.shards.iter().all(|s| s.phase.is_finished()));
                }
                if status.phase == Some(TestRunPhase::Succeeded) {
                    prop_assert!(status.shards.iter().all(|s| s.result.as_ref().is_some_and(|r| r.exit_code == 0)));
                }
                // Attempts are bounded; a finished shard never changes; lease ids never go back.
                for (old, new) in before.iter().zip(&status.shards) {
                    prop_assert!(new.counted_attempts() <= 3);
                    prop_assert!(new.attempt <= 3 + policy::MAX_UNCOUNTED_ATTEMPTS);
                    prop_assert!(new.lease_id >= old.lease_id);
                    if old.phase.is_finished() {
                        prop_assert_eq!(old, new);
                    }
                }
                // A finished run makes no creation calls.
                prop_assert_eq!(w.inserts_after_finish, 0);
                // Every ended attempt is told once, in order, and a shard's
                // end is its last attempt's outcome.
                for shard in &status.shards {
                    prop_assert!(shard.history.len() <= ATTEMPT_HISTORY);
                    prop_assert!(shard.history.windows(2).all(|w| w[0].attempt < w[1].attempt), "{:?}", shard.history);
                    prop_assert!(shard.history.iter().all(|r| r.attempt >= 1 && r.attempt <= shard.attempt));
                    let last = shard.history.last().map(|r| (r.attempt, r.outcome, r.exit_code));
                    match shard.phase {
                        TestRunPhase::Succeeded => {
                            prop_assert_eq!(last, Some((shard.attempt, AttemptOutcome::Succeeded, Some(0))));
                        }
                        TestRunPhase::Failed => {
                            let code = shard.result.as_ref().map(|r| r.exit_code);
                            prop_assert_eq!(last, Some((shard.attempt, AttemptOutcome::TestFailed, code)));
                        }
                        TestRunPhase::TimedOut => {
                            prop_assert_eq!(last.map(|l| (l.0, l.1)), Some((shard.attempt, AttemptOutcome::TimedOut)));
                        }
                        TestRunPhase::Error => {
                            let outcome = last.map(|l| l.1);
                            prop_assert!(
                                !matches!(outcome, None | Some(AttemptOutcome::Succeeded | AttemptOutcome::TestFailed)),
                                "an Error shard ended on {:?}", outcome
                            );
                        }
                        _ => {}
                    }
                }
                // The conditions say the current phase: Complete only on
                // success, Failed only on another end, never Reconciling
                // and Stalled at once, nothing left Reconciling at the end.
                let c = &status.conditions;
                let finished = status.phase.is_some_and(|p| p.is_finished());
                let succeeded = status.phase == Some(TestRunPhase::Succeeded);
                prop_assert_eq!(conditions::is_true(c, "Complete"), succeeded);
                prop_assert_eq!(conditions::is_true(c, "Failed"), finished && !succeeded);
                prop_assert!(!(conditions::is_true(c, "Reconciling") && conditions::is_true(c, "Stalled")));
                if finished {
                    prop_assert!(!conditions::is_true(c, "Reconciling"));
                    prop_assert_eq!(conditions::is_true(c, "Stalled"), !succeeded);
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    enum PolicyStep {
        Advance(i64),
        Finish,
        Register(i32),
        Report(i32, i32),
        Vanish(i32),
        /// The shard's agent says its VM is being preempted.
        Preempt(i32),
        /// Compute Engine shows the shard's VM stopping.
        Stop(i32),
        /// Open operations finish, inserts in us-central1-a for capacity.
        FailZoneA,
    }

    fn policy_step() -> impl Strategy<Value = PolicyStep> {
        prop_oneof![
            (1i64..40).prop_map(PolicyStep::Advance),
            Just(PolicyStep::Finish),
            (0i32..3).prop_map(PolicyStep::Register),
            ((0i32..3), prop_oneof![Just(0), Just(1), Just(75)]).prop_map(|(s, c)| PolicyStep::Report(s, c)),
            (0i32..3).prop_map(PolicyStep::Vanish),
            (0i32..3).prop_map(PolicyStep::Preempt),
            (0i32..3).prop_map(PolicyStep::Stop),
            Just(PolicyStep::FailZoneA),
        ]
    }

    /// Policies a property test draws from: none, and each action on exit
    /// codes and on infrastructure reasons.
    fn policies() -> impl Strategy<Value = Option<serde_json::Value>> {
        prop_oneof![
            Just(None),
            Just(Some(
                serde_json::json!([{"action": "RetryShard", "onExitCodes": {"operator": "In", "values": [75]}}])
            )),
            Just(Some(
                serde_json::json!([{"action": "FailRun", "onExitCodes": {"operator": "NotIn", "values": [75]}}])
            )),
            Just(Some(serde_json::json!([{"action": "FailRun", "onReasons": ["VmLost", "LeaseLost"]}]))),
            Just(Some(serde_json::json!([{"action": "Ignore", "onReasons": ["VmLost", "LeaseLost"]}]))),
            Just(Some(serde_json::json!([{"action": "FailShard", "onReasons": ["VmLost"]}]))),
            Just(Some(
                serde_json::json!([{"action": "FailRun", "onReasons": ["CapacityExhausted", "RegistrationTimeout"]}])
            )),
            Just(Some(serde_json::json!([{"action": "Ignore", "onReasons": ["TimedOut", "CapacityExhausted"]}]))),
            Just(Some(serde_json::json!([{"action": "RetryShard", "onReasons": ["Preempted"]}]))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn failure_policies_and_preemptions_keep_their_promises(
            rules in policies(),
            max_preemptions in 0i32..3,
            fallback in any::<bool>(),
            steps in proptest::collection::vec(policy_step(), 1..50),
        ) {
            let mut r = run(3, 2);
            let vm = r.spec.vm.as_mut().expect("vm");
            (vm.spot, vm.spot_fallback) = (true, fallback);
            r.spec.max_preemptions = max_preemptions;
            let fail_run = rules.as_ref().is_some_and(|r| r.to_string().contains("FailRun"));
            // A rule on Preempted replaces the default (free up to maxPreemptions).
            let preemption_ruled = rules.as_ref().is_some_and(|r| r.to_string().contains("Preempted"));
            r.spec.failure_policy = rules.map(|rules| serde_json::from_value(serde_json::json!({"rules": rules})).expect("policy"));
            let mut w = World::new(r);
            let mut first_spot: BTreeMap<String, bool> = BTreeMap::new();
            w.reconcile();
            for step in steps {
                match step {
                    PolicyStep::Advance(s) => w.advance(s),
                    PolicyStep::Finish => w.finish_operations(None),
                    PolicyStep::Register(i) => w.register(i),
                    PolicyStep::Report(i, code) => w.report(i, code),
                    PolicyStep::Vanish(i) => { let name = w.shard(i).instance; w.vms.retain(|v| Some(&v.name) != name.as_ref()); }
                    PolicyStep::Preempt(i) => w.agent_says_preempted(i),
                    PolicyStep::Stop(i) => w.vm_stops(i),
                    PolicyStep::FailZoneA => w.finish_operations(Some("us-central1-a")),
                }
                let before: Vec<ShardStatus> = w.status().shards;
                let plan = w.reconcile();
                let status = w.status();
                for (old, new) in before.iter().zip(&status.shards) {
                    // Attempts are counted within maxAttempts, uncounted ones within their bound.
                    prop_assert!(new.counted_attempts() <= 2, "{:?}", new);
                    prop_assert!(new.uncounted_attempts <= policy::MAX_UNCOUNTED_ATTEMPTS);
                    // A preemption never uses an attempt while maxPreemptions allows.
                    if !preemption_ruled && new.preemptions == old.preemptions + 1 && new.preemptions <= max_preemptions {
                        prop_assert_eq!(new.uncounted_attempts, old.uncounted_attempts + 1, "{:?}", new.history);
                        prop_assert!(!new.phase.is_finished(), "a free preemption ended the shard: {:?}", new.message);
                    }
                    // Once fallen back, a shard's VMs are standard.
                    if fallback && new.preemptions >= max_preemptions.max(1) && new.attempt > old.attempt {
                        prop_assert_eq!(new.spot, Some(false), "attempt {} on Spot after {} preemptions", new.attempt, new.preemptions);
                    }
                    if !fallback && new.attempt > old.attempt {
                        prop_assert_eq!(new.spot, Some(true));
                    }
                }
                // An insert made again (same request id) makes the same VM: Spot or not.
                for call in &plan.calls {
                    if let CloudCall::Insert(spec) = call {
                        let first = *first_spot.entry(spec.request_id.clone()).or_insert(spec.spot);
                        prop_assert_eq!(first, spec.spot, "insert {} changed its provisioning model", spec.name);
                    }
                }
                // The pass that ends a run asks for no VM.
                if status.phase.is_some_and(|p| p.is_finished()) {
                    prop_assert_eq!(inserts(&plan), 0, "a VM asked for as the run ended: {:?}", plan.calls);
                }
                // A run a FailRun rule ended stops every shard at once, and
                // asks for every one of its VMs to go (once its insert settled).
                if fail_run && status.shards.iter().any(|s| s.message.as_deref().is_some_and(|m| m.contains("which fails the run")) || s.phase.is_failure() && s.message.as_deref().is_some_and(|m| m.contains("failurePolicy.rules[0]"))) {
                    prop_assert!(status.phase.is_some_and(|p| p.is_finished()), "{:?}", status.shards);
                }
                if status.phase.is_some_and(|p| p.is_finished()) {
                    prop_assert!(status.shards.iter().all(|s| s.phase.is_finished()));
                    for vm in &w.vms {
                        let going = w.ops.values().any(|(name, zone, kind, _, done)| {
                            name == &vm.name && zone == &vm.zone && (*kind == OperationKind::Delete || (*kind == OperationKind::Insert && !done))
                        });
                        prop_assert!(going, "VM {} left running by a finished run", vm.name);
                    }
                }
                prop_assert_eq!(w.inserts_after_finish, 0);
            }
        }
    }

    #[test]
    fn a_run_without_a_timeout_takes_its_class_limit_as_its_default_and_an_explicit_longer_one_is_refused() {
        use crate::api::vmclass::{VmClass, VmClassLimits, VmClassSpec};
        let mut class = VmClass::new("short", VmClassSpec::default());
        class.spec.limits = VmClassLimits { max_run_duration: Some(DurationString::from("30m")), ..Default::default() };
        let class = ClassChoice::Class(std::sync::Arc::new(class));
        let mut unset = run(1, 3);
        unset.spec.timeout = None;
        let mut w = World::new(unset);
        w.class = class.clone();
        let plan = w.reconcile();
        assert!(!conditions::is_true(&plan.status.conditions, "InvalidSpec"), "{:?}", plan.status.conditions);
        let started = plan.status.started.as_ref().expect("started");
        assert_eq!(started.default_timeout.as_ref().map(|t| t.as_str()), Some("30m"));
        let life = plan.calls.iter().find_map(|c| match c {
            CloudCall::Insert(spec) => Some(spec.max_run_duration),
            _ => None,
        });
        let registration = w.settings.registration_timeout;
        assert_eq!(life, Some(vm_life_needed(Duration::from_secs(1800), registration)));
        // The attempt ends at the class's limit, not at an hour.
        w.finish_operations(None);
        w.reconcile();
        w.register(0);
        w.reconcile();
        w.advance(31 * 60);
        w.reconcile();
        let shard = w.shard(0);
        assert_eq!(shard.phase, TestRunPhase::TimedOut, "{shard:?}");
        assert_eq!(shard.message.as_deref(), Some("attempt 1 ran longer than 30m"));

        // Written by the user, a longer timeout is refused.
        let mut long = run(1, 3);
        long.spec.timeout = Some("2h".into());
        let mut w = World::new(long);
        w.class = class;
        let plan = w.reconcile();
        let invalid = conditions::get(&plan.status.conditions, "InvalidSpec").expect("InvalidSpec");
        assert!(
            invalid.message.contains("spec.timeout: 7200s is longer than VmClass short allows (30m)"),
            "{}",
            invalid.message
        );
        assert!(plan.calls.is_empty());
    }

    #[test]
    fn a_run_without_a_timeout_under_no_class_or_a_longer_limit_defaults_to_an_hour() {
        for choice in [ClassChoice::NoClass, {
            let mut class = crate::api::vmclass::VmClass::new("long", Default::default());
            class.spec.limits.max_run_duration = Some(DurationString::from("3h"));
            ClassChoice::Class(std::sync::Arc::new(class))
        }] {
            let mut unset = run(1, 3);
            unset.spec.timeout = None;
            let mut w = World::new(unset);
            w.class = choice;
            let plan = w.reconcile();
            let started = plan.status.started.as_ref().expect("started");
            assert_eq!(started.default_timeout.as_ref().map(|t| t.as_str()), Some("1h"));
        }
    }

    #[test]
    fn a_run_its_class_refuses_creates_nothing_and_says_why() {
        use crate::api::vmclass::{VmClass, VmClassLimits, VmClassSpec};
        let mut class = VmClass::new("ci", VmClassSpec::default());
        class.spec.limits = VmClassLimits { allowed_machine_types: vec!["n2-*".into()], ..Default::default() };
        let mut w = World::new(run(2, 1));
        w.class = ClassChoice::Class(std::sync::Arc::new(class.clone()));
        let plan = w.reconcile();
        assert!(plan.calls.is_empty(), "{:?}", plan.calls);
        let invalid = conditions::get(&w.status().conditions, "InvalidSpec").expect("InvalidSpec").clone();
        assert_eq!(invalid.status, ConditionStatus::True);
        assert!(
            invalid.message.contains("spec.vm.machineType") && invalid.message.contains("VmClass ci"),
            "{}",
            invalid.message
        );
        assert_eq!(plan.requeue_after, CLASS_POLL, "looked at again: the class may change");

        // Named but missing: refused the same way.
        w.class = ClassChoice::Missing("gone".into());
        w.reconcile();
        let invalid = conditions::get(&w.status().conditions, "InvalidSpec").expect("InvalidSpec").clone();
        assert!(invalid.message.contains("VmClass gone does not exist"), "{}", invalid.message);

        // The class widened: the run starts, on the class's network and account.
        class.spec.limits.allowed_machine_types.push("e2-*".into());
        class.spec.subnetwork = Some("regions/us-central1/subnetworks/ci".into());
        class.spec.service_account = Some(crate::api::vmclass::ClassServiceAccount {
            email: "ci@p.iam.gserviceaccount.com".into(),
            scopes: vec![],
        });
        w.class = ClassChoice::Class(std::sync::Arc::new(class));
        let plan = w.reconcile();
        let inserts: Vec<&InstanceSpec> = plan
            .calls
            .iter()
            .filter_map(|c| match c {
                CloudCall::Insert(spec) => Some(spec.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(inserts.len(), 2, "{:?}", plan.calls);
        for spec in inserts {
            assert_eq!(spec.network.subnetwork.as_deref(), Some("regions/us-central1/subnetworks/ci"));
            assert_eq!(spec.service_account.as_ref().map(|a| a.email.as_str()), Some("ci@p.iam.gserviceaccount.com"));
        }
    }
}
