//! What happens to a PrebuildPreset's pool, as a pure function: the preset,
//! its VMs in the cloud, its tracked operations and the pool VMs whose agent
//! registered go in; the new status, the cloud calls and the Events come out.
//!
//! The rules:
//! - desired − actual → create jobs. A job waits in `status.pendingJobs`
//!   until a provisioner slot (`maxConcurrentProvisions`) is free; only then
//!   is its VM's insert recorded and called.
//! - Pending jobs of any template version but the active one are cancelled
//!   (counted in `cancelledTotal`, one Event per pass). Jobs already
//!   provisioning finish; their VMs are outdated.
//! - Outdated ready VMs are deleted only as new-version VMs become ready, so
//!   a rollout never lowers the number of ready VMs below `instances`.
//! - Surplus VMs are deleted, pending jobs first, then provisioning ones,
//!   then ready ones. Claimed VMs are not the pool's any more.
//! - A failed provision backs off (`failureBackoff`); after
//!   `maxConsecutiveFailures` in a row the preset is Degraded and creates no
//!   VM until its spec changes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::agent::protocol::{
    META_AGENT_URL, META_NAMESPACE, META_OWNER_UID, META_PRESET, META_TEMPLATE_VERSION, META_VM_TOKEN,
};
use crate::agent::tokens::LeaseKey;
use crate::api::prebuild::{
    PendingJob, PrebuildPreset, PrebuildPresetSpec, PrebuildPresetStatus, PresetInstance, PresetInstanceState,
};
use crate::api::validation::validate_prebuild_preset;
use crate::api::vmclass::{self, ClassChoice, ClassRequest};

use crate::api::{ConditionStatus, OperationKind, OperationState, TrackedOperation};
use crate::compute::InstanceSpec;
use crate::compute::naming::{preset_instance_name, preset_labels, request_id};
use crate::controller::conditions::{self, Progress};
use crate::controller::ops::{
    CloudCall, DeleteRetry, InsertRetry, PlannedEvent, Seen, UNSEEN_ZONE_RECHECK, deletion_condition, intent,
    may_still_act, record_failure, retry_delete, retry_insert, signed, until,
};
use crate::controller::testrun::plan::Settings;
use crate::inventory::state::VmView;

/// What a preset asks of its VmClass.
pub fn pool_request<'a>(preset: &'a PrebuildPreset, namespace: &'a str) -> ClassRequest<'a> {
    ClassRequest {
        at: "spec.vm",
        namespace,
        machine_type: &preset.spec.vm.machine_type,
        image: &preset.spec.vm.image,
        zones: &preset.spec.vm.zones,
        shards: None,
        timeout: None,
        pool_instances: Some(preset.spec.instances),
    }
}

/// How long a pool VM may live before Compute Engine deletes it; the pool
/// then replaces it.
pub const POOL_VM_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A ready pool VM this old is replaced: the rest of its lifetime is kept
/// for the test that claims it (a run claims only a VM that outlives its
/// timeout).
pub const POOL_VM_RECYCLE_AGE: Duration = Duration::from_secs(18 * 3600);

/// Everything the pool planner looks at.
pub struct PoolObserved<'a> {
    /// The preset.
    pub preset: &'a PrebuildPreset,
    /// The current time.
    pub now: Timestamp,
    /// The preset's VMs as the inventory knows them, with how far their
    /// absence can be trusted.
    pub vms: &'a VmView,
    /// What the operation tracker knows of tracked operations, by request id.
    pub operations: &'a BTreeMap<String, Seen>,
    /// Operations of the preset the tracker still follows: cleanup is not
    /// done while any is.
    pub outstanding: usize,
    /// Pool VMs whose agent registered, with when it was last heard.
    pub registered: &'a BTreeMap<String, Timestamp>,
    /// Claimed pool VMs whose claiming TestRun no longer exists: they will
    /// never be relabelled, so the pool deletes them.
    pub abandoned_claims: &'a BTreeSet<String>,
    /// Installation settings.
    pub settings: &'a Settings,
    /// The key VM tokens are made with.
    pub key: &'a LeaseKey,
    /// The preset's VmClass.
    pub class: &'a ClassChoice,
}

/// The outcome of planning a pool.
#[derive(Clone, Debug)]
pub struct PoolPlan {
    /// The status to write.
    pub status: PrebuildPresetStatus,
    /// Calls to make after the status is written.
    pub calls: Vec<CloudCall>,
    /// Events to publish.
    pub events: Vec<PlannedEvent>,
    /// Pending jobs cancelled in this pass.
    pub cancelled: u32,
    /// Error codes of the provisions that failed in this pass.
    pub failures: Vec<String>,
    /// When to look again at the latest.
    pub requeue_after: Duration,
    /// Deleting: every VM is verified gone.
    pub cleanup_done: bool,
}

struct Pool<'a> {
    obs: &'a PoolObserved<'a>,
    status: PrebuildPresetStatus,
    calls: Vec<CloudCall>,
    events: Vec<PlannedEvent>,
    cancelled: u32,
    failures: Vec<String>,
    wake: Duration,
    /// Planning the cleanup of a preset being deleted: nothing is created.
    cleanup: bool,
}

/// The wait after `failures` failed provisions in a row: `base`, doubling,
/// at most `max`.
pub fn backoff(base: Duration, max: Duration, failures: i32) -> Duration {
    let doublings = u32::try_from(failures.saturating_sub(1).clamp(0, 20)).unwrap_or(0);
    base.saturating_mul(2u32.saturating_pow(doublings)).min(max)
}

/// When a pool VM's create job was picked up (`now` if unknown).
fn born(instance: &PresetInstance, now: Timestamp) -> Timestamp {
    instance.created_at.as_ref().map_or(now, |t| t.0)
}

/// When a ready pool VM reaches its recycle age.
fn recycle_due(instance: &PresetInstance, now: Timestamp) -> Timestamp {
    born(instance, now) + signed(POOL_VM_RECYCLE_AGE)
}

/// Plans one reconcile of a preset that is not being deleted.
pub fn plan(obs: &PoolObserved<'_>) -> PoolPlan {
    let preset = obs.preset;
    let mut p = Pool {
        obs,
        status: preset.status.clone().unwrap_or_default(),
        calls: Vec::new(),
        events: Vec::new(),
        cancelled: 0,
        failures: Vec::new(),
        wake: Duration::MAX,
        cleanup: false,
    };
    let generation = preset.metadata.generation;
    let namespace = preset.metadata.namespace.clone().unwrap_or_default();
    p.status.selector = Some(pool_selector(preset));
    let refused = obs.class.refusal(&pool_request(preset, &namespace));
    if refused.is_some() {
        p.wake = crate::controller::testrun::plan::CLASS_POLL;
    }
    let invalid = vmclass::join_refusals(validate_prebuild_preset(&preset.spec).err().map(|e| e.to_string()), refused);
    if let Some(message) = invalid {
        let new = conditions::get(&p.status.conditions, "InvalidSpec").is_none_or(|c| c.message != message);
        conditions::set(
            &mut p.status.conditions,
            "InvalidSpec",
            ConditionStatus::True,
            "InvalidSpec",
            &message,
            generation,
            obs.now,
        );
        conditions::set(
            &mut p.status.conditions,
            "Ready",
            ConditionStatus::False,
            "InvalidSpec",
            &message,
            generation,
            obs.now,
        );
        if new {
            p.event(true, "InvalidSpec", message);
        }
        p.status.observed_generation = generation;
        return p.finish(false);
    }
    conditions::set(&mut p.status.conditions, "InvalidSpec", ConditionStatus::False, "Valid", "", generation, obs.now);
    // A change of what a provision makes clears the failure streak (and
    // with it Degraded and Stalled); a new size does not. (A status from
    // before the digest was kept: a spec change then counts as one.)
    let digest = preset.spec.provision_digest();
    let changed = match &p.status.provision_spec_digest {
        Some(before) if PrebuildPresetSpec::comparable_digest(before) => *before != digest,
        _ => p.status.observed_generation != generation,
    };
    if changed {
        p.status.consecutive_failures = 0;
    }
    p.status.provision_spec_digest = Some(digest);
    p.status.observed_generation = generation;
    p.status.active_version = Some(preset.spec.template_version.clone());

    p.cancel_outdated_jobs();
    p.follow_operations();
    p.sync_instances();
    p.scale();
    p.collect_strays(false);
    p.count();
    p.finish(false)
}

/// Plans one reconcile of a preset being deleted: delete every pool VM.
pub fn plan_cleanup(obs: &PoolObserved<'_>) -> PoolPlan {
    let mut p = Pool {
        obs,
        status: obs.preset.status.clone().unwrap_or_default(),
        calls: Vec::new(),
        events: Vec::new(),
        cancelled: 0,
        failures: Vec::new(),
        wake: Duration::MAX,
        cleanup: true,
    };
    p.status.pending_jobs.clear();
    p.follow_operations();
    p.sync_instances();
    p.collect_strays(true);
    p.count();
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

impl Pool<'_> {
    fn event(&mut self, warning: bool, reason: &'static str, note: impl Into<String>) {
        self.events.push(PlannedEvent { warning, reason, note: note.into() });
    }

    fn wake_within(&mut self, d: Duration) {
        self.wake = self.wake.min(d.max(Duration::from_millis(200)));
    }

    fn active(&self) -> &str {
        &self.obs.preset.spec.template_version
    }

    fn uid(&self) -> String {
        self.obs.preset.metadata.uid.clone().unwrap_or_default()
    }

    /// Whether an operation of this kind on this VM may still act (a failed
    /// delete waiting for its retry counts).
    /// The pool VMs with an operation of this kind that may still act.
    fn names_in_flight(&self, kind: OperationKind) -> BTreeSet<String> {
        self.status
            .instances
            .iter()
            .filter(|i| self.in_flight(kind, &i.zone, &i.name))
            .map(|i| i.name.clone())
            .collect()
    }

    fn in_flight(&self, kind: OperationKind, zone: &str, name: &str) -> bool {
        self.status.operations.iter().any(|op| {
            op.kind == kind
                && op.zone == zone
                && op.instance == name
                && may_still_act(op, self.obs.operations.get(&op.request_id))
        })
    }

    /// Pending jobs of a version that is not the active one are cancelled:
    /// no cloud call was made for them.
    fn cancel_outdated_jobs(&mut self) {
        let active = self.active().to_string();
        let mut versions = BTreeSet::new();
        let before = self.status.pending_jobs.len();
        self.status.pending_jobs.retain(|job| {
            let keep = job.template_version == active;
            if !keep {
                versions.insert(job.template_version.clone());
            }
            keep
        });
        let cancelled = before - self.status.pending_jobs.len();
        if cancelled > 0 {
            self.cancelled = u32::try_from(cancelled).unwrap_or(u32::MAX);
            self.status.cancelled_total += i64::from(self.cancelled);
            let versions: Vec<String> = versions.into_iter().collect();
            self.event(
                false,
                "PendingJobsCancelled",
                format!(
                    "cancelled {cancelled} pending job(s) of template version {} (active: {active})",
                    versions.join(", ")
                ),
            );
        }
    }

    fn failed_provision(&mut self, code: &str, message: String) {
        self.failures.push(code.to_string());
        self.status.consecutive_failures += 1;
        self.status.last_failure_time = Some(Time(self.obs.now));
        self.event(true, "ProvisionFailed", message.clone());
        let limit = self.obs.preset.spec.max_consecutive_failures;
        let generation = self.obs.preset.metadata.generation;
        let reason = if self.status.consecutive_failures >= limit { "TooManyFailures" } else { "ProvisionFailing" };
        conditions::set(
            &mut self.status.conditions,
            "Degraded",
            ConditionStatus::True,
            reason,
            message,
            generation,
            self.obs.now,
        );
    }

    /// Goes through every tracked operation with what the tracker knows of
    /// it. News alone (an insert finished while its VM's agent has not
    /// registered yet) changes nothing in status.
    fn follow_operations(&mut self) {
        let vm = self.obs.preset.spec.vm.clone();
        let ops = std::mem::take(&mut self.status.operations);
        let mut kept = Vec::new();
        for mut op in ops {
            let provisioning = |p: &Self| {
                p.status.instances.iter().any(|i| i.name == op.instance && i.state == PresetInstanceState::Provisioning)
            };
            match (op.state, self.obs.operations.get(&op.request_id)) {
                (OperationState::Done, _) => continue,
                (OperationState::Failed, _) => {}
                (_, Some(Seen::InFlight)) => {
                    kept.push(op);
                    continue;
                }
                (_, Some(Seen::Done)) => {
                    if op.kind == OperationKind::Delete {
                        self.status.instances.retain(|i| !(i.name == op.instance && i.zone == op.zone));
                    } else if op.kind == OperationKind::Insert && !self.cleanup && provisioning(self) {
                        kept.push(op);
                    }
                    continue;
                }
                (_, Some(Seen::Failed(error))) => record_failure(&mut op, error, &vm),
                (OperationState::Intended, None) => {
                    if op.kind == OperationKind::Insert && (self.cleanup || !provisioning(self)) {
                        // Never made again; a VM an earlier process may have
                        // made is deleted as a stray once the inventory shows it.
                        let claimed = self.status.instances.iter().any(|i| {
                            i.name == op.instance
                                && i.state == PresetInstanceState::Claimed
                                && !self.obs.abandoned_claims.contains(&i.name)
                        });
                        if self.cleanup && !claimed {
                            self.delete(&op.zone, &op.instance);
                        }
                        continue;
                    }
                    self.reissue(&op);
                    kept.push(op);
                    continue;
                }
                // Followed by the tracker from the executor's adoption.
                (OperationState::Running, None) => {
                    kept.push(op);
                    continue;
                }
            }
            // Failed.
            let message = op.last_error.clone().unwrap_or_default();
            match op.kind {
                OperationKind::Insert => {
                    let state = self
                        .status
                        .instances
                        .iter()
                        .find(|i| i.name == op.instance && i.zone == op.zone)
                        .map(|i| (i.state, i.template_version == self.obs.preset.spec.template_version));
                    // Its agent registered: the VM exists, whatever the insert's answer said.
                    if matches!(state, Some((PresetInstanceState::Ready | PresetInstanceState::Claimed, _))) {
                        continue;
                    }
                    // A VM of the active version the pool still waits for.
                    let still_wanted = state == Some((PresetInstanceState::Provisioning, true));
                    // It may have been carried out: made again with its own
                    // request id (Compute Engine acts on it once), not counted
                    // as a failed provision unless it keeps failing.
                    if op.answer_lost && !self.cleanup && still_wanted {
                        let purpose = format!("insert/{}/{}", op.zone, op.instance);
                        match retry_insert(&mut op, self.obs.now, 2, &purpose) {
                            InsertRetry::Wait(wait) => {
                                self.wake_within(wait);
                                kept.push(op);
                                continue;
                            }
                            InsertRetry::Reissue => {
                                self.reissue(&op);
                                kept.push(op);
                                continue;
                            }
                            // Kept failing: a failed provision like any other.
                            InsertRetry::GiveUp => {}
                        }
                    }
                    self.status.instances.retain(|i| !(i.name == op.instance && i.zone == op.zone));
                    // A failed provision of a VM the pool still waits for
                    // (one retired meanwhile, e.g. late, was counted then).
                    if !self.cleanup && still_wanted {
                        let code = message.split_once(": ").map_or("UNKNOWN", |(code, _)| code).to_string();
                        self.failed_provision(&code, format!("creating pool VM {} failed: {message}", op.instance));
                    }
                }
                OperationKind::Delete | OperationKind::SetLabels => {
                    if message.starts_with("RESOURCE_NOT_FOUND") {
                        self.status.instances.retain(|i| !(i.name == op.instance && i.zone == op.zone));
                        continue;
                    }
                    match retry_delete(&mut op, self.obs.now, self.obs.settings.delete_retry_base) {
                        DeleteRetry::Wait(wait) => self.wake_within(wait),
                        DeleteRetry::Reissue => {
                            self.event(
                                true,
                                "DeleteFailed",
                                format!("deleting VM {} failed ({message}); retrying", op.instance),
                            );
                            self.reissue(&op);
                        }
                    }
                    kept.push(op);
                }
            }
        }
        kept.append(&mut self.status.operations);
        self.status.operations = kept;
    }

    fn reissue(&mut self, op: &TrackedOperation) {
        let call = match op.kind {
            OperationKind::Insert => {
                let Some(instance) = self.status.instances.iter().find(|i| i.name == op.instance) else { return };
                let version = instance.template_version.clone();
                CloudCall::Insert(Box::new(self.instance_spec(&op.instance, &op.zone, &version, &op.request_id)))
            }
            _ => CloudCall::Delete {
                zone: op.zone.clone(),
                name: op.instance.clone(),
                request_id: op.request_id.clone(),
            },
        };
        self.calls.push(call);
    }

    fn instance_spec(&self, name: &str, zone: &str, version: &str, rid: &str) -> InstanceSpec {
        let preset = self.obs.preset;
        let vm = &preset.spec.vm;
        let uid = self.uid();
        let mut labels = vm.labels.clone();
        labels.extend(preset_labels(
            &self.obs.settings.installation,
            &preset.metadata.namespace.clone().unwrap_or_default(),
            &uid,
            version,
        ));
        let mut metadata = vm.metadata.clone();
        metadata.insert(META_AGENT_URL.into(), self.obs.settings.agent_url.clone());
        metadata.insert(META_VM_TOKEN.into(), self.obs.key.vm_token(name, &uid));
        metadata.insert(META_NAMESPACE.into(), preset.metadata.namespace.clone().unwrap_or_default());
        metadata.insert(META_PRESET.into(), preset.metadata.name.clone().unwrap_or_default());
        metadata.insert(META_OWNER_UID.into(), uid.clone());
        metadata.insert(META_TEMPLATE_VERSION.into(), version.to_string());
        InstanceSpec {
            name: name.to_string(),
            zone: zone.to_string(),
            machine_type: vm.machine_type.clone(),
            image: vm.image.clone(),
            disk_gb: i64::from(vm.disk_gb),
            labels,
            metadata,
            startup_script: self.obs.settings.startup_script.clone(),
            service_account: vmclass::service_account(self.obs.class.class()),
            network: vmclass::network(self.obs.class.class()),
            spot: vm.spot,
            max_run_duration: POOL_VM_LIFETIME,
            request_id: rid.to_string(),
        }
    }

    /// Brings the instance list in line with the cloud and the agents.
    fn sync_instances(&mut self) {
        let now = self.obs.now;
        let timeout = signed(self.obs.settings.registration_timeout);
        let mut lost = Vec::new();
        let mut late = Vec::new();
        let mut handed_over = Vec::new();
        let mut abandoned = Vec::new();
        let mut retiring = Vec::new();
        let deleting = self.names_in_flight(OperationKind::Delete);
        let creating = self.names_in_flight(OperationKind::Insert);
        let mut deadline: Option<Timestamp> = None;
        for i in &mut self.status.instances {
            // Only a view that covers the zone can say a VM is gone.
            let gone = self.obs.vms.absent(&i.zone, &i.name);
            let creating = creating.contains(&i.name);
            match i.state {
                PresetInstanceState::Provisioning if self.obs.registered.contains_key(&i.name) => {
                    i.state = PresetInstanceState::Ready;
                    self.status.consecutive_failures = 0;
                }
                PresetInstanceState::Provisioning if gone && !creating => lost.push(i.name.clone()),
                PresetInstanceState::Provisioning => {
                    let created = i.created_at.as_ref().map(|t| t.0).unwrap_or(now);
                    let due = created + timeout;
                    if now > due {
                        late.push((i.name.clone(), i.zone.clone()));
                    } else {
                        deadline = Some(deadline.map_or(due, |d| d.min(due)));
                    }
                }
                PresetInstanceState::Ready if gone => lost.push(i.name.clone()),
                // Replaced from its recycle age on (see `scale`).
                PresetInstanceState::Ready => {
                    let due = recycle_due(i, now);
                    if now < due {
                        deadline = Some(deadline.map_or(due, |d| d.min(due)));
                    }
                }
                // A claimed VM leaves the pool once relabelled to its TestRun.
                PresetInstanceState::Claimed if gone => handed_over.push(i.name.clone()),
                PresetInstanceState::Claimed if self.obs.abandoned_claims.contains(&i.name) => {
                    abandoned.push((i.zone.clone(), i.name.clone()));
                }
                // Retired while its insert could still act: the VM is
                // deleted once the insert is over.
                PresetInstanceState::Deleting if creating => {}
                // The delete, not absence from a list, ends the entry (a
                // list may not show a VM whose insert just ended): a delete
                // answered notFound is done.
                PresetInstanceState::Deleting if deleting.contains(&i.name) => {}
                PresetInstanceState::Deleting => retiring.push((i.zone.clone(), i.name.clone())),
                _ => {}
            }
        }
        self.status.instances.retain(|i| !handed_over.contains(&i.name));
        for (zone, name) in abandoned {
            self.event(
                true,
                "ClaimAbandoned",
                format!("pool VM {name} was claimed by a TestRun that no longer exists; deleting it"),
            );
            self.retire(&zone, &name);
        }
        for name in lost {
            self.status.instances.retain(|i| i.name != name);
            self.event(true, "VmVanished", format!("pool VM {name} disappeared"));
        }
        for (zone, name) in retiring {
            self.delete(&zone, &name);
        }

        for (name, zone) in late {
            if let Some(i) = self.status.instances.iter_mut().find(|i| i.name == name) {
                i.state = PresetInstanceState::Deleting;
            }
            self.failed_provision(
                "REGISTRATION_TIMEOUT",
                format!("the agent on pool VM {name} did not register in time"),
            );
            self.retire(&zone, &name);
        }
        if let Some(due) = deadline {
            self.wake_within(until(now, due) + Duration::from_millis(100));
        }
    }

    fn delete(&mut self, zone: &str, name: &str) {
        if self.in_flight(OperationKind::Delete, zone, name) {
            return;
        }
        let rid = request_id(&format!("delete/{zone}/{name}"), 0);
        self.status.operations.push(intent(OperationKind::Delete, name, zone, &rid, self.obs.now));
        self.calls.push(CloudCall::Delete { zone: zone.to_string(), name: name.to_string(), request_id: rid });
    }

    fn count_state(&self, state: PresetInstanceState, active: Option<bool>) -> usize {
        let version = self.active();
        self.status
            .instances
            .iter()
            .filter(|i| i.state == state && active.is_none_or(|a| (i.template_version == version) == a))
            .count()
    }

    /// Creates, starts, cancels and deletes to reach `instances` ready VMs
    /// of the active version.
    fn scale(&mut self) {
        let spec = &self.obs.preset.spec;
        let desired = usize::try_from(spec.instances).unwrap_or(0);
        let active = self.active().to_string();
        let ready_active = self.count_state(PresetInstanceState::Ready, Some(true));
        let provisioning_active = self.count_state(PresetInstanceState::Provisioning, Some(true));
        // Ready VMs at their recycle age are replaced like outdated ones:
        // they count as missing, and go only as their replacements are ready.
        let now = self.obs.now;
        let mut aged: Vec<(Timestamp, String, String)> = self
            .status
            .instances
            .iter()
            .filter(|i| i.state == PresetInstanceState::Ready && i.template_version == active)
            .filter(|i| now >= recycle_due(i, now))
            .map(|i| (born(i, now), i.zone.clone(), i.name.clone()))
            .collect();
        aged.sort();
        let have = (ready_active - aged.len()) + provisioning_active + self.status.pending_jobs.len();

        if have < desired {
            for _ in have..desired {
                self.status.jobs_created += 1;
                self.status.pending_jobs.push(PendingJob {
                    id: self.status.jobs_created.to_string(),
                    template_version: active.clone(),
                    created_at: Some(Time(self.obs.now)),
                });
            }
        } else if have > desired {
            let mut surplus = have - desired;
            // Pending jobs go first: nothing was called for them.
            while surplus > 0 && self.status.pending_jobs.pop().is_some() {
                surplus -= 1;
            }
            for state in [PresetInstanceState::Provisioning, PresetInstanceState::Ready] {
                let victims: Vec<(String, String)> = self
                    .status
                    .instances
                    .iter()
                    .rev()
                    .filter(|i| i.state == state && i.template_version == active)
                    .take(surplus)
                    .map(|i| (i.zone.clone(), i.name.clone()))
                    .collect();
                for (zone, name) in victims {
                    surplus -= 1;
                    self.retire(&zone, &name);
                }
            }
        }

        let ready_now = self.count_state(PresetInstanceState::Ready, Some(true));
        let recyclable = ready_now.saturating_sub(desired).min(aged.len());
        for (_, zone, name) in aged.into_iter().take(recyclable) {
            let still_ready =
                self.status.instances.iter().any(|i| i.name == name && i.state == PresetInstanceState::Ready);
            if still_ready {
                self.event(
                    false,
                    "VmRecycled",
                    format!(
                        "pool VM {name} is {}h old and its replacement is ready; deleting it",
                        POOL_VM_RECYCLE_AGE.as_secs() / 3600
                    ),
                );
                self.retire(&zone, &name);
            }
        }

        // Rolling: outdated ready VMs go only as new ones are ready.
        let ready_outdated: Vec<(String, String)> = self
            .status
            .instances
            .iter()
            .filter(|i| i.state == PresetInstanceState::Ready && i.template_version != active)
            .map(|i| (i.zone.clone(), i.name.clone()))
            .collect();
        let removable = (ready_active + ready_outdated.len()).saturating_sub(desired).min(ready_outdated.len());
        for (zone, name) in ready_outdated.into_iter().take(removable) {
            self.retire(&zone, &name);
        }

        self.start_jobs();
    }

    /// Takes a VM out of the pool and deletes it. While its insert may
    /// still act, the delete waits: a delete racing the insert would find
    /// nothing, and the VM would land afterwards (see `sync_instances`).
    fn retire(&mut self, zone: &str, name: &str) {
        if let Some(i) = self.status.instances.iter_mut().find(|i| i.name == name) {
            i.state = PresetInstanceState::Deleting;
        }
        if !self.in_flight(OperationKind::Insert, zone, name) {
            self.delete(zone, name);
        }
    }

    /// Moves pending jobs into free provisioner slots, unless backing off or
    /// degraded.
    fn start_jobs(&mut self) {
        let spec = &self.obs.preset.spec;
        if self.status.pending_jobs.is_empty() || self.cleanup {
            return;
        }
        let failures = self.status.consecutive_failures;
        if failures >= spec.max_consecutive_failures {
            return;
        }
        if failures > 0 {
            let (base, max) = spec.failure_backoff.effective();
            let since = self.status.last_failure_time.as_ref().map(|t| t.0).unwrap_or(self.obs.now);
            let due = since + signed(backoff(base, max, failures));
            if self.obs.now < due {
                self.wake_within(until(self.obs.now, due));
                return;
            }
        }
        let busy = self.count_state(PresetInstanceState::Provisioning, None);
        let slots = usize::try_from(spec.max_concurrent_provisions).unwrap_or(1).saturating_sub(busy);
        let zones = &spec.vm.zones;
        for _ in 0..slots {
            if self.status.pending_jobs.is_empty() {
                break;
            }
            let job = self.status.pending_jobs.remove(0);
            let uid = self.uid();
            let name = preset_instance_name(&uid, &job.id);
            let zone = zones
                .get(usize::try_from(self.status.consecutive_failures).unwrap_or(0) % zones.len().max(1))
                .cloned()
                .unwrap_or_default();
            let rid = request_id(&format!("insert/{uid}/{}/{zone}", job.id), 0);
            self.status.instances.push(PresetInstance {
                name: name.clone(),
                zone: zone.clone(),
                template_version: job.template_version.clone(),
                state: PresetInstanceState::Provisioning,
                claimed_by: None,
                created_at: Some(Time(self.obs.now)),
            });
            self.status.operations.push(intent(OperationKind::Insert, &name, &zone, &rid, self.obs.now));
            let spec = self.instance_spec(&name, &zone, &job.template_version, &rid);
            self.calls.push(CloudCall::Insert(Box::new(spec)));
        }
    }

    /// Deletes every VM of the preset it does not keep (all when `everything`).
    fn collect_strays(&mut self, everything: bool) {
        // Even when everything goes, a VM claimed by a live TestRun is kept:
        // it is that run's as soon as it is relabelled.
        let known: BTreeSet<(String, String)> = self
            .status
            .instances
            .iter()
            .filter(|i| {
                !everything || (i.state == PresetInstanceState::Claimed && !self.obs.abandoned_claims.contains(&i.name))
            })
            .map(|i| (i.zone.clone(), i.name.clone()))
            .collect();
        let strays: Vec<(String, String)> = self
            .obs
            .vms
            .vms
            .iter()
            .map(|v| (v.zone.clone(), v.name.clone()))
            .filter(|key| !known.contains(key))
            .collect();
        for (zone, name) in strays {
            if self.in_flight(OperationKind::Insert, &zone, &name) {
                continue;
            }
            if let Some(i) = self.status.instances.iter_mut().find(|i| i.name == name) {
                i.state = PresetInstanceState::Deleting;
            }
            self.delete(&zone, &name);
        }
    }

    fn count(&mut self) {
        self.status.ready = i32::try_from(self.count_state(PresetInstanceState::Ready, Some(true))).unwrap_or(i32::MAX);
        self.status.provisioning =
            i32::try_from(self.count_state(PresetInstanceState::Provisioning, None)).unwrap_or(i32::MAX);
        self.status.pending = i32::try_from(self.status.pending_jobs.len()).unwrap_or(i32::MAX);
        self.status.claimed = i32::try_from(self.count_state(PresetInstanceState::Claimed, None)).unwrap_or(i32::MAX);
        let active = self.active().to_string();
        self.status.outdated = i32::try_from(
            self.status
                .instances
                .iter()
                .filter(|i| {
                    i.template_version != active
                        && matches!(i.state, PresetInstanceState::Ready | PresetInstanceState::Provisioning)
                })
                .count(),
        )
        .unwrap_or(i32::MAX);
    }

    /// kstatus's `Reconciling` and `Stalled`: a pool filling, replacing or
    /// deleting VMs is reconciling; one with an invalid spec or too many
    /// failed provisions in a row is stalled until its spec changes.
    fn progress_conditions(&mut self) {
        let generation = self.obs.preset.metadata.generation;
        let now = self.obs.now;
        let condition = |type_: &str| {
            conditions::get(&self.status.conditions, type_)
                .filter(|c| c.status == ConditionStatus::True)
                .map(|c| (c.reason.clone(), c.message.clone()))
        };
        let stalled_by = condition("InvalidSpec").map(|(_, m)| ("InvalidSpec", m)).or_else(|| {
            condition("Degraded").filter(|(r, _)| r == "TooManyFailures").map(|(_, m)| ("TooManyFailures", m))
        });
        let status = &self.status;
        let filling = status.ready < self.obs.preset.spec.instances;
        let busy = filling
            || status.provisioning + status.pending + status.outdated > 0
            || status.operations.iter().any(|o| o.state != OperationState::Done);
        let progress = match stalled_by {
            Some((reason, message)) => Progress::Stalled { reason, message },
            None if busy => Progress::Reconciling {
                reason: if filling { "PoolFilling" } else { "PoolSettling" },
                message: conditions::get(&status.conditions, "Ready").map(|c| c.message.clone()).unwrap_or_default(),
            },
            None => Progress::Current { reason: "PoolReady" },
        };
        conditions::set_progress(&mut self.status.conditions, &progress, generation, now);
    }

    fn finish(mut self, cleanup_done: bool) -> PoolPlan {
        let generation = self.obs.preset.metadata.generation;
        let now = self.obs.now;
        let invalid = conditions::is_true(&self.status.conditions, "InvalidSpec");
        if !invalid {
            let desired = self.obs.preset.spec.instances;
            let summary = format!(
                "{} of {desired} ready; {} provisioning, {} pending, {} outdated, {} claimed",
                self.status.ready,
                self.status.provisioning,
                self.status.pending,
                self.status.outdated,
                self.status.claimed
            );
            let ready = if self.status.ready >= desired { ConditionStatus::True } else { ConditionStatus::False };
            let reason = if ready == ConditionStatus::True { "PoolReady" } else { "PoolFilling" };
            conditions::set(&mut self.status.conditions, "Ready", ready, reason, &summary, generation, now);
            let busy = self.status.provisioning + self.status.pending + self.status.outdated > 0
                || self.status.operations.iter().any(|o| o.state != OperationState::Done);
            let progressing = if busy { ConditionStatus::True } else { ConditionStatus::False };
            conditions::set(&mut self.status.conditions, "Progressing", progressing, reason, summary, generation, now);
            let limit = self.obs.preset.spec.max_consecutive_failures;
            if self.status.consecutive_failures == 0 {
                conditions::set(
                    &mut self.status.conditions,
                    "Degraded",
                    ConditionStatus::False,
                    "AsExpected",
                    "",
                    generation,
                    now,
                );
            } else if self.status.consecutive_failures >= limit {
                let message =
                    conditions::get(&self.status.conditions, "Degraded").map(|c| c.message.clone()).unwrap_or_default();
                let message = if message.contains("no new VM is created") {
                    message
                } else {
                    format!(
                        "{limit} provisions failed in a row; no new VM is created until the spec changes. Last: {message}"
                    )
                };
                conditions::set(
                    &mut self.status.conditions,
                    "Degraded",
                    ConditionStatus::True,
                    "TooManyFailures",
                    message,
                    generation,
                    now,
                );
            }
        }
        self.progress_conditions();
        if let Some(message) = deletion_condition(&mut self.status.conditions, &self.status.operations, generation, now)
        {
            self.events.push(PlannedEvent { warning: true, reason: "DeletionFailing", note: message });
        }
        PoolPlan {
            status: self.status,
            calls: self.calls,
            events: self.events,
            cancelled: self.cancelled,
            failures: self.failures,
            requeue_after: self.wake,
            cleanup_done,
        }
    }
}

/// The pool in label-selector form, for the scale subresource's
/// `status.selector`: by uid, which is always a valid label value (a name
/// can be longer than 63 characters).
pub fn pool_selector(preset: &PrebuildPreset) -> String {
    format!("testrun.dev/prebuild-preset-uid={}", preset.metadata.uid.as_deref().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    //! The pool planner against a small in-memory cloud.
    use super::*;
    use crate::api::prebuild::PrebuildPresetSpec;
    use crate::compute::{ComputeError, Instance};
    use jiff::SignedDuration;
    use proptest::prelude::*;

    fn preset(instances: i32, version: &str, slots: i32) -> PrebuildPreset {
        let spec: PrebuildPresetSpec = serde_json::from_value(serde_json::json!({
            "templateVersion": version,
            "instances": instances,
            "maxConcurrentProvisions": slots,
            "failureBackoff": { "base": "10s", "max": "40s" },
            "maxConsecutiveFailures": 3,
            "vm": { "zones": ["us-central1-a", "us-central1-b"], "machineType": "e2-small", "image": "img" }
        }))
        .expect("spec");
        let mut p = PrebuildPreset::new("pool", spec);
        p.metadata.namespace = Some("ns".into());
        p.metadata.uid = Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into());
        p.metadata.generation = Some(1);
        p
    }

    struct World {
        preset: PrebuildPreset,
        now: Timestamp,
        vms: Vec<Instance>,
        /// Calls made, by request id: (instance, zone, kind, done).
        ops: BTreeMap<String, (String, String, OperationKind, bool)>,
        registered: BTreeMap<String, Timestamp>,
        abandoned: BTreeSet<String>,
        settings: Settings,
        key: LeaseKey,
        /// The preset is being deleted: passes plan its cleanup.
        deleting: bool,
        /// Request ids whose call was carried out but its answer lost.
        lost: BTreeSet<String>,
    }

    impl World {
        fn new(preset: PrebuildPreset) -> Self {
            let now = Timestamp::from_second(1_800_000_000).expect("time");
            Self {
                preset,
                now,
                vms: Vec::new(),
                ops: BTreeMap::new(),
                registered: BTreeMap::new(),
                abandoned: BTreeSet::new(),
                settings: Settings {
                    installation: "t".into(),
                    agent_url: "http://agent".into(),
                    startup_script: "#!/bin/sh\nexec agent\n".into(),
                    registration_timeout: Duration::from_secs(600),
                    delete_retry_base: Duration::from_secs(2),
                    started_at: now,
                },
                key: LeaseKey::from_bytes(&[2; 32]).expect("key"),
                deleting: false,
                lost: BTreeSet::new(),
            }
        }

        fn status(&self) -> PrebuildPresetStatus {
            self.preset.status.clone().unwrap_or_default()
        }

        /// What the tracker would say, by request id: an insert that
        /// finished without its VM failed for capacity.
        fn seen(&self) -> BTreeMap<String, Seen> {
            self.ops
                .iter()
                .map(|(rid, (instance, _, kind, done))| {
                    let seen = if !done {
                        Seen::InFlight
                    } else if self.lost.contains(rid) {
                        Seen::Failed(ComputeError::Api {
                            call: "instances.insert",
                            code: crate::compute::ErrorCode::Unavailable,
                            status: 503,
                            message: String::new(),
                        })
                    } else if *kind == OperationKind::Insert && !self.vms.iter().any(|v| v.name == *instance) {
                        Seen::Failed(ComputeError::OperationFailed {
                            operation: rid.clone(),
                            code: crate::compute::ErrorCode::ZoneResourcePoolExhausted,
                            message: String::new(),
                        })
                    } else {
                        Seen::Done
                    };
                    (rid.clone(), seen)
                })
                .collect()
        }

        /// One reconcile.
        fn reconcile(&mut self) -> PoolPlan {
            let seen = self.seen();
            let view = VmView::complete(self.vms.clone());
            let outstanding = self.ops.values().filter(|(_, _, _, done)| !done).count();
            let planner = if self.deleting { plan_cleanup } else { plan };
            let plan = planner(&PoolObserved {
                preset: &self.preset,
                now: self.now,
                vms: &view,
                operations: &seen,
                outstanding,
                registered: &self.registered,
                abandoned_claims: &self.abandoned,
                settings: &self.settings,
                key: &self.key,
                class: &ClassChoice::NoClass,
            });
            for call in &plan.calls {
                let rid = call.request_id().to_string();
                if self.ops.get(&rid).is_some_and(|(_, _, _, done)| !done) {
                    continue;
                }
                let (zone, instance, kind) = match call {
                    CloudCall::Insert(spec) => (spec.zone.clone(), spec.name.clone(), OperationKind::Insert),
                    CloudCall::Delete { zone, name, .. } | CloudCall::SetLabels { zone, name, .. } => {
                        (zone.clone(), name.clone(), OperationKind::Delete)
                    }
                };
                self.ops.insert(rid, (instance, zone, kind, false));
            }
            self.preset.status = Some(plan.status.clone());
            plan
        }

        /// Running operations finish; inserts succeed unless `fail`.
        fn finish(&mut self, fail: bool) {
            for (instance, zone, kind, done) in self.ops.values_mut() {
                if *done {
                    continue;
                }
                *done = true;
                match kind {
                    // A call made again after a lost answer finds its VM.
                    OperationKind::Insert if self.vms.iter().any(|v| v.name == *instance) => {}
                    OperationKind::Insert if !fail => self.vms.push(Instance {
                        name: instance.clone(),
                        zone: zone.clone(),
                        status: crate::compute::InstanceStatus::Running,
                        labels: BTreeMap::new(),
                        label_fingerprint: String::new(),
                        metadata: BTreeMap::new(),
                        creation_timestamp: None,
                    }),
                    OperationKind::Delete => self.vms.retain(|v| v.name != *instance),
                    _ => {}
                }
            }
        }

        /// Every booted VM's agent registers.
        fn boot(&mut self) {
            for vm in &self.vms {
                self.registered.insert(vm.name.clone(), self.now);
            }
        }

        fn advance_hours(&mut self, hours: i64) {
            self.now += SignedDuration::from_hours(hours);
        }

        fn set_version(&mut self, version: &str) {
            self.preset.spec.template_version = version.into();
            self.preset.metadata.generation = self.preset.metadata.generation.map(|g| g + 1);
        }

        fn ready(&self, version: &str) -> usize {
            self.status()
                .instances
                .iter()
                .filter(|i| i.state == PresetInstanceState::Ready && i.template_version == version)
                .count()
        }
    }

    #[test]
    fn a_pool_insert_whose_answer_was_lost_is_made_again_with_its_request_id_and_counts_as_no_failure() {
        let mut w = World::new(preset(1, "v1", 1));
        let rid = w.reconcile().calls[0].request_id().to_string();
        // Carried out (the VM exists), but its answer was lost.
        w.finish(false);
        w.lost.insert(rid.clone());
        assert!(w.reconcile().calls.is_empty(), "made again after a pause");
        w.now += SignedDuration::from_secs(10);
        let plan = w.reconcile();
        let inserts: Vec<&str> = plan.calls.iter().map(|c| c.request_id()).collect();
        assert_eq!(inserts, [rid.as_str()], "made again with its own request id");
        // Compute Engine answers with the operation the first call started.
        w.lost.clear();
        w.ops.values_mut().for_each(|op| op.3 = true);
        w.reconcile();
        w.boot();
        w.reconcile();
        assert_eq!((w.ready("v1"), w.vms.len()), (1, 1), "{:?}", w.status());
        assert_eq!(w.status().consecutive_failures, 0, "a lost answer is no failed provision");
        assert!(w.reconcile().calls.is_empty());
    }

    #[test]
    fn a_pool_vm_whose_agent_registers_while_its_lost_insert_waits_stays_ready() {
        let mut w = World::new(preset(1, "v1", 1));
        let rid = w.reconcile().calls[0].request_id().to_string();
        w.finish(false);
        w.lost.insert(rid);
        w.reconcile();
        // The VM boots while the insert waits to be made again.
        w.boot();
        w.reconcile();
        w.now += SignedDuration::from_secs(10);
        let plan = w.reconcile();
        assert!(plan.calls.is_empty(), "neither made again nor deleted: {:?}", plan.calls);
        assert_eq!((w.ready("v1"), w.vms.len()), (1, 1), "{:?}", w.status());
        assert_eq!(w.status().consecutive_failures, 0);
        assert!(w.status().operations.is_empty(), "the insert is over: {:?}", w.status().operations);
    }

    #[test]
    fn a_vm_retired_while_its_insert_runs_is_deleted_once_the_insert_is_over() {
        let mut w = World::new(preset(2, "v1", 2));
        w.reconcile();
        // Scaled to zero while both inserts run.
        w.preset.spec.instances = 0;
        let plan = w.reconcile();
        assert!(
            plan.calls.iter().all(|c| !matches!(c, CloudCall::Delete { .. })),
            "a delete racing the insert finds nothing and the VM lands after it: {:?}",
            plan.calls
        );
        assert!(w.status().instances.iter().all(|i| i.state == PresetInstanceState::Deleting));
        assert!(w.reconcile().calls.iter().all(|c| !matches!(c, CloudCall::Delete { .. })));
        // The inserts land: now the VMs are deleted.
        w.finish(false);
        assert_eq!(w.vms.len(), 2);
        let plan = w.reconcile();
        let deletes = plan.calls.iter().filter(|c| matches!(c, CloudCall::Delete { .. })).count();
        assert_eq!(deletes, 2, "{:?}", plan.calls);
        w.finish(false);
        w.reconcile();
        assert!(w.vms.is_empty());
        assert!(w.status().instances.is_empty(), "{:?}", w.status().instances);
        // An insert that failed leaves nothing to delete, and no entry.
        let mut w = World::new(preset(1, "v1", 1));
        w.reconcile();
        w.preset.spec.instances = 0;
        w.reconcile();
        w.finish(true);
        let plan = w.reconcile();
        assert!(plan.calls.is_empty(), "{:?}", plan.calls);
        assert!(w.status().instances.is_empty(), "{:?}", w.status().instances);
    }

    #[test]
    fn a_deleted_preset_with_no_vm_left_looks_again_while_a_zone_cannot_be_seen() {
        let w = World::new(preset(0, "v1", 1));
        let cleanup = |view: &VmView| {
            plan_cleanup(&PoolObserved {
                preset: &w.preset,
                now: w.now,
                vms: view,
                operations: &BTreeMap::new(),
                outstanding: 0,
                registered: &w.registered,
                abandoned_claims: &w.abandoned,
                settings: &w.settings,
                key: &w.key,
                class: &ClassChoice::NoClass,
            })
        };
        let unseen = VmView { vms: Vec::new(), synced: true, unknown_zones: ["us-central1-b".to_string()].into() };
        let plan = cleanup(&unseen);
        assert!(!plan.cleanup_done);
        assert!(plan.requeue_after <= UNSEEN_ZONE_RECHECK, "{:?}", plan.requeue_after);
        assert!(cleanup(&VmView::complete(Vec::new())).cleanup_done);
    }

    #[test]
    fn a_ready_vm_is_replaced_before_it_is_too_old_to_claim() {
        let mut w = World::new(preset(1, "v1", 1));
        w.reconcile();
        w.finish(false);
        w.boot();
        w.reconcile();
        assert_eq!(w.ready("v1"), 1);
        let first = w.status().instances[0].name.clone();
        w.advance_hours(17);
        assert!(w.reconcile().calls.is_empty(), "young enough to keep");
        w.advance_hours(1);
        // Its replacement is made first; the old VM stays ready meanwhile.
        let plan = w.reconcile();
        assert!(matches!(&plan.calls[..], [CloudCall::Insert(_)]), "{:?}", plan.calls);
        assert_eq!(w.ready("v1"), 1);
        w.finish(false);
        w.boot();
        let plan = w.reconcile();
        assert!(
            matches!(&plan.calls[..], [CloudCall::Delete { name, .. }] if *name == first),
            "deleted once the replacement is ready: {:?}",
            plan.calls
        );
        w.finish(false);
        w.reconcile();
        let names: Vec<String> = w.status().instances.iter().map(|i| i.name.clone()).collect();
        assert_eq!(w.ready("v1"), 1);
        assert!(!names.contains(&first), "{names:?}");
    }

    #[test]
    fn jobs_wait_for_provisioner_slots() {
        let mut w = World::new(preset(3, "v1", 2));
        let plan = w.reconcile();
        assert_eq!(plan.calls.len(), 2, "two slots");
        assert_eq!((plan.status.provisioning, plan.status.pending), (2, 1));
        w.finish(false);
        w.boot();
        let plan = w.reconcile();
        assert_eq!(plan.calls.len(), 1, "the pending job starts once a slot frees");
        w.finish(false);
        w.boot();
        w.reconcile();
        assert_eq!(w.status().ready, 3);
    }

    #[test]
    fn a_version_change_cancels_only_pending_jobs_of_other_versions() {
        let mut w = World::new(preset(3, "v1", 1));
        w.reconcile();
        assert_eq!(w.status().pending_jobs.len(), 2);
        w.set_version("v2");
        let plan = w.reconcile();
        assert_eq!(plan.cancelled, 2);
        assert_eq!(plan.status.cancelled_total, 2);
        assert!(
            plan.events.iter().any(|e| e.reason == "PendingJobsCancelled" && e.note.contains("template version v1"))
        );
        assert!(plan.status.pending_jobs.iter().all(|j| j.template_version == "v2"));
        // The provisioning v1 VM keeps going; nothing of v1 is started.
        assert!(plan.calls.is_empty(), "the single slot is still busy: {:?}", plan.calls);
        assert_eq!(plan.status.instances.iter().filter(|i| i.template_version == "v1").count(), 1);
    }

    #[test]
    fn outdated_vms_go_only_as_new_ones_are_ready() {
        let mut w = World::new(preset(2, "v1", 2));
        for _ in 0..3 {
            w.reconcile();
            w.finish(false);
            w.boot();
        }
        w.reconcile();
        assert_eq!(w.ready("v1"), 2);
        let c = w.status().conditions;
        assert!(!conditions::is_true(&c, "Reconciling") && !conditions::is_true(&c, "Stalled"), "{c:?}");
        w.set_version("v2");
        let plan = w.reconcile();
        assert!(conditions::is_true(&plan.status.conditions, "Reconciling"), "rolling");
        assert!(
            !plan.calls.iter().any(|c| matches!(c, CloudCall::Delete { .. })),
            "no v1 VM goes before a v2 VM is ready"
        );
        w.finish(false);
        // One v2 ready → one v1 goes.
        let first = w
            .vms
            .iter()
            .find(|v| w.status().instances.iter().any(|i| i.name == v.name && i.template_version == "v2"))
            .map(|v| v.name.clone())
            .expect("a v2 VM");
        w.registered.insert(first, w.now);
        let plan = w.reconcile();
        assert_eq!(plan.calls.iter().filter(|c| matches!(c, CloudCall::Delete { .. })).count(), 1);
        assert_eq!((w.ready("v1"), w.ready("v2")), (1, 1), "still two ready while rolling");
        w.finish(false);
        w.boot();
        w.reconcile();
        w.finish(false);
        w.reconcile();
        assert_eq!((w.ready("v1"), w.ready("v2")), (0, 2));
    }

    #[test]
    fn the_provision_digest_is_pinned_and_ignores_the_size() {
        let p = preset(2, "v1", 2);
        let mut bigger = p.spec.clone();
        bigger.instances = 9;
        assert_eq!(p.spec.provision_digest(), bigger.provision_digest());
        // Changing the spec type changes this: raise PROVISION_DIGEST_VERSION
        // with it, so upgrades do not clear every failure streak.
        assert_eq!(p.spec.provision_digest(), "v1:c585fd59da5c7585");
        assert!(PrebuildPresetSpec::comparable_digest(&p.spec.provision_digest()));
        assert!(!PrebuildPresetSpec::comparable_digest("v0:0123"));
    }

    #[test]
    fn failures_back_off_then_stop_until_the_spec_changes() {
        let mut w = World::new(preset(1, "v1", 1));
        w.reconcile();
        w.finish(true);
        w.reconcile();
        assert_eq!(w.status().consecutive_failures, 1);
        let plan = w.reconcile();
        assert!(plan.calls.is_empty(), "backing off");
        w.now += SignedDuration::from_secs(10);
        assert_eq!(w.reconcile().calls.len(), 1, "after the base backoff it tries again");
        w.finish(true);
        w.reconcile();
        w.now += SignedDuration::from_secs(19);
        assert!(w.reconcile().calls.is_empty(), "the backoff doubled");
        w.now += SignedDuration::from_secs(1);
        assert_eq!(w.reconcile().calls.len(), 1);
        w.finish(true);
        w.reconcile();
        assert_eq!(w.status().consecutive_failures, 3);
        w.now += SignedDuration::from_secs(3600);
        let plan = w.reconcile();
        assert!(plan.calls.is_empty(), "degraded: no more creation");
        let degraded = conditions::get(&plan.status.conditions, "Degraded").expect("Degraded");
        assert_eq!((degraded.status, degraded.reason.as_str()), (ConditionStatus::True, "TooManyFailures"));
        let stalled = conditions::get(&plan.status.conditions, "Stalled").expect("Stalled");
        assert_eq!((stalled.status, stalled.reason.as_str()), (ConditionStatus::True, "TooManyFailures"));
        // A new size (kubectl scale, an autoscaler) does not lift it...
        w.preset.spec.instances = 2;
        w.preset.metadata.generation = Some(2);
        let plan = w.reconcile();
        assert!(plan.calls.is_empty(), "scaling a stopped pool makes no VM");
        assert!(conditions::is_true(&plan.status.conditions, "Stalled"));
        // ...a change of what a provision makes does.
        w.preset.spec.vm.machine_type = "e2-standard-4".into();
        w.preset.metadata.generation = Some(3);
        let plan = w.reconcile();
        assert_eq!(plan.calls.len(), 1, "a spec change starts over");
        assert_eq!(plan.status.consecutive_failures, 0);
        let c = &plan.status.conditions;
        assert!(conditions::is_true(c, "Reconciling") && !conditions::is_true(c, "Stalled"), "{c:?}");
    }

    #[test]
    fn claimed_vms_stay_until_relabelled_unless_their_claimer_is_gone() {
        let mut w = World::new(preset(1, "v1", 1));
        w.reconcile();
        w.finish(false);
        w.boot();
        w.reconcile();
        let mut status = w.status();
        status.instances[0].state = PresetInstanceState::Claimed;
        status.instances[0].claimed_by = Some("ns/run/0".into());
        let claimed = status.instances[0].name.clone();
        w.preset.status = Some(status);
        // Deleting the preset while the claimed VM still carries its labels: kept.
        let view = VmView::complete(w.vms.clone());
        let cleanup = plan_cleanup(&PoolObserved {
            preset: &w.preset,
            now: w.now,
            vms: &view,
            operations: &BTreeMap::new(),
            outstanding: 0,
            registered: &w.registered,
            abandoned_claims: &BTreeSet::new(),
            settings: &w.settings,
            key: &w.key,
            class: &ClassChoice::NoClass,
        });
        assert!(!cleanup.calls.iter().any(|c| matches!(c, CloudCall::Delete { name, .. } if *name == claimed)));
        assert!(!cleanup.cleanup_done, "the finalizer waits for the relabel");
        // Its claimer is gone: the pool deletes it.
        w.abandoned.insert(claimed.clone());
        let plan = w.reconcile();
        assert!(plan.calls.iter().any(|c| matches!(c, CloudCall::Delete { name, .. } if *name == claimed)));
        assert!(plan.events.iter().any(|e| e.reason == "ClaimAbandoned"));
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(10), s(300), 1), s(10));
        assert_eq!(backoff(s(10), s(300), 2), s(20));
        assert_eq!(backoff(s(10), s(300), 4), s(80));
        assert_eq!(backoff(s(10), s(300), 10), s(300));
        assert_eq!(backoff(s(10), s(300), i32::MAX), s(300));
    }

    #[derive(Clone, Debug)]
    enum Step {
        Claim,
        Finish(bool),
        Boot,
        Version(u8),
        Instances(i32),
        Advance(i64),
        Delete,
        /// Every open call is carried out but answered with HTTP 503.
        LoseAnswers,
    }

    impl World {
        fn open_calls(&self) -> Vec<String> {
            self.ops.iter().filter(|(_, op)| !op.3).map(|(rid, _)| rid.clone()).collect()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn pool_invariants_hold(steps in proptest::collection::vec(prop_oneof![
            any::<bool>().prop_map(Step::Finish),
            Just(Step::Claim),
            Just(Step::Boot),
            (1u8..4).prop_map(Step::Version),
            (0i32..6).prop_map(Step::Instances),
            (1i64..60).prop_map(Step::Advance),
            Just(Step::Delete),
            Just(Step::LoseAnswers),
        ], 1..40)) {
            let mut w = World::new(preset(3, "v1", 2));
            let mut claimed = BTreeSet::new();
            w.reconcile();
            for step in steps {
                match step {
                    Step::Claim => {
                        // A TestRun claims a ready VM (the VM keeps the preset's labels until relabelled).
                        let mut status = w.status();
                        if let Some(i) = status.instances.iter_mut().find(|i| i.state == PresetInstanceState::Ready) {
                            i.state = PresetInstanceState::Claimed;
                            i.claimed_by = Some("ns/run/0".into());
                            claimed.insert(i.name.clone());
                        }
                        w.preset.status = Some(status);
                    }
                    Step::Finish(fail) => {
                        // Calls made again are answered this time.
                        for rid in w.open_calls() {
                            w.lost.remove(&rid);
                        }
                        w.finish(fail);
                    }
                    Step::LoseAnswers => {
                        let open = w.open_calls();
                        w.finish(false);
                        w.lost.extend(open);
                    }
                    Step::Boot => w.boot(),
                    Step::Version(v) => w.set_version(&format!("v{v}")),
                    Step::Instances(n) => { w.preset.spec.instances = n; w.preset.metadata.generation = w.preset.metadata.generation.map(|g| g + 1); }
                    Step::Advance(s) => w.now += SignedDuration::from_secs(s),
                    Step::Delete => w.deleting = true,
                }
                let ready_before = w.status().instances.iter().filter(|i| i.state == PresetInstanceState::Ready).count()
                    + w.status().instances.iter().filter(|i| i.state == PresetInstanceState::Provisioning && w.registered.contains_key(&i.name)).count();
                let plan = w.reconcile();
                // Claimed VMs are never deleted by the pool.
                for call in &plan.calls {
                    if let CloudCall::Delete { name, .. } = call {
                        prop_assert!(!claimed.contains(name), "the pool deleted claimed VM {}", name);
                    }
                    // Every call is named by an operation in the status the
                    // plan writes: a pass planned from an old copy, whose
                    // guarded write is refused, makes no unrecorded call.
                    prop_assert!(
                        plan.status.operations.iter().any(|op| op.request_id == call.request_id()),
                        "call {:?} is not recorded in status", call
                    );
                }
                if w.deleting {
                    // A pass on a preset being deleted never creates
                    // anything, and is done only when every VM is gone.
                    prop_assert!(!plan.calls.iter().any(|c| matches!(c, CloudCall::Insert(_))), "{:?}", plan.calls);
                    if plan.cleanup_done {
                        prop_assert!(w.vms.is_empty(), "done with VMs left: {:?}", w.vms);
                    }
                    continue;
                }
                let status = plan.status;
                let active = w.preset.spec.template_version.clone();
                let desired = usize::try_from(w.preset.spec.instances).unwrap_or(0);
                let live_active = status.instances.iter().filter(|i| i.template_version == active && matches!(i.state, PresetInstanceState::Ready | PresetInstanceState::Provisioning)).count();
                // Never more of the active version than wanted.
                prop_assert!(live_active + status.pending_jobs.len() <= desired, "{} + {} > {}", live_active, status.pending_jobs.len(), desired);
                // Never more provisioning than slots.
                prop_assert!(status.provisioning <= 2);
                // No pending job of another version, and nothing of another version is started.
                prop_assert!(status.pending_jobs.iter().all(|j| j.template_version == active));
                for call in &plan.calls {
                    if let CloudCall::Insert(spec) = call {
                        prop_assert_eq!(spec.labels.get("template-version"), Some(&active));
                    }
                }
                // Availability: the pool's own deletions never take the ready
                // count below what it was or below `instances`, whichever is less.
                let ready_after = status.instances.iter().filter(|i| i.state == PresetInstanceState::Ready).count();
                prop_assert!(ready_after >= ready_before.min(desired), "ready {} -> {} (desired {})", ready_before, ready_after, desired);
            }
        }
    }
}
