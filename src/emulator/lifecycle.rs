//! How mutations play out over time. A call records its operation and
//! returns at once; a task then moves the operation PENDING → RUNNING → DONE
//! over the configured delay and changes the instance as Compute Engine
//! would, or fails the way an injected fault says.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use google_cloud_compute_v1::model;
use serde_json::Value;

use super::Emulator;
use super::error::GceError;
use super::faults::{FaultKind, Verdict};
use super::state::{
    InstanceKey, InstanceRecord, OpStatus, OperationKey, OperationRecord, Status, fingerprint, now_rfc3339,
    operation_json,
};
use super::vm::{self, BootInfo};

/// A mutation to start.
pub enum Mutation {
    /// `instances.insert` with its body.
    Insert(Box<model::Instance>),
    /// `instances.delete`.
    Delete,
    /// `instances.setLabels` with the new labels and the fingerprint sent.
    SetLabels {
        /// New labels.
        labels: BTreeMap<String, String>,
        /// The fingerprint the caller read (decoded).
        fingerprint: Vec<u8>,
    },
}

impl Mutation {
    fn operation_type(&self) -> &'static str {
        match self {
            Self::Insert(_) => "insert",
            Self::Delete => "delete",
            Self::SetLabels { .. } => "setLabels",
        }
    }
}

fn error_code(kind: FaultKind) -> Option<(&'static str, &'static str)> {
    match kind {
        FaultKind::Capacity => Some((
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            "The zone does not have enough resources available to fulfill the request. Try a different zone, or try again later.",
        )),
        FaultKind::Quota => Some(("QUOTA_EXCEEDED", "Quota 'CPUS' exceeded. Limit: 24.0 in region.")),
        FaultKind::Fail => Some(("INTERNAL_ERROR", "Internal error. Please try again or contact Google Support.")),
        _ => None,
    }
}

impl Emulator {
    /// The operation a request id already started, if any: a repeated call
    /// gets it back, untouched by faults, as on Compute Engine.
    pub fn existing_operation(&self, project: &str, request_id: Option<&str>) -> Option<Value> {
        let state = self.lock();
        let op_key = state.request_ids.get(&(project.to_string(), request_id?.to_string()))?;
        state.operations.get(op_key).map(|op| operation_json(op_key, op))
    }

    /// Starts a mutation and returns its operation as JSON. A repeated
    /// `requestId` returns the operation it started the first time.
    pub fn start(
        self: &Arc<Self>,
        target: InstanceKey,
        request_id: Option<String>,
        mutation: Mutation,
        verdict: Verdict,
    ) -> Result<Value, GceError> {
        let mut state = self.lock();
        if let Some(rid) = &request_id
            && let Some(op_key) = state.request_ids.get(&(target.project.clone(), rid.clone()))
            && let Some(op) = state.operations.get(op_key)
        {
            return Ok(operation_json(op_key, op));
        }

        let target_id = match &mutation {
            Mutation::Insert(_) => {
                if state.instances.contains_key(&target) {
                    return Err(GceError::already_exists(&target.resource()));
                }
                0
            }
            Mutation::Delete | Mutation::SetLabels { .. } => match state.instances.get(&target) {
                Some(record) => record.id,
                None => return Err(GceError::not_found(&target.resource())),
            },
        };
        if let Mutation::SetLabels { fingerprint: sent, .. } = &mutation {
            let current = state.instances.get(&target).map(|r| r.label_fingerprint).unwrap_or_default();
            if sent.as_slice() != current.as_slice() {
                return Err(GceError::condition_not_met(
                    "Labels fingerprint either invalid or resource labels have changed",
                ));
            }
        }

        let op_id = state.next_id();
        let effective = !matches!(
            verdict.operation,
            Some(FaultKind::Fail | FaultKind::Hang | FaultKind::Vanish | FaultKind::Capacity | FaultKind::Quota)
        );
        let operation_type = mutation.operation_type();
        let target_id = match mutation {
            Mutation::Insert(resource) if verdict.operation != Some(FaultKind::Vanish) => {
                let id = state.next_id();
                let record = new_instance(id, *resource);
                // A hung insert made its (never booting) VM too.
                if effective || verdict.operation == Some(FaultKind::Hang) {
                    let row = super::state::HistoryRow {
                        project: target.project.clone(),
                        zone: target.zone.clone(),
                        name: target.name.clone(),
                        id,
                        labels: record.labels.clone(),
                        pid: None,
                        requested_at: record.requested.clone(),
                    };
                    state.accepted_inserts.push(row);
                }
                state.instances.insert(target.clone(), record);
                id
            }
            Mutation::Delete if effective => {
                if let Some(record) = state.instances.get_mut(&target) {
                    record.deleting = true;
                }
                target_id
            }
            Mutation::SetLabels { labels, .. } if effective => {
                let salt = state.next_id();
                if let Some(record) = state.instances.get_mut(&target) {
                    record.label_fingerprint = fingerprint(&labels, salt);
                    record.labels = labels;
                }
                target_id
            }
            _ => target_id,
        };

        let op_key = OperationKey {
            project: target.project.clone(),
            zone: target.zone.clone(),
            name: format!("operation-{}-{op_id:x}", jiff::Timestamp::now().as_millisecond()),
        };
        let op = OperationRecord {
            id: op_id,
            operation_type,
            target: target.clone(),
            target_id,
            status: OpStatus::Pending,
            error: None,
            insert_time: now_rfc3339(),
            start_time: None,
            end_time: None,
        };
        let answer = operation_json(&op_key, &op);
        if verdict.operation == Some(FaultKind::Vanish) {
            // Returned once, never stored: reading it later gives 404.
            return Ok(answer);
        }
        state.operations.insert(op_key.clone(), op);
        if let Some(rid) = request_id {
            state.request_ids.insert((target.project.clone(), rid), op_key.clone());
        }
        drop(state);

        let delay = self.config.operation_delay + verdict.delay;
        let emulator = self.clone();
        let preempt_after = verdict.preempt_after;
        tokio::spawn(async move {
            emulator.clone().drive(op_key, target.clone(), target_id, operation_type, verdict.operation, delay).await;
            // (drive returns once an inserted VM has booted.)
            if let Some(after) = preempt_after {
                tokio::time::sleep(after).await;
                // A standard VM, or an insert that made none, is not preempted.
                if let Err(e) = emulator.preempt(&target, Some(target_id)) {
                    tracing::debug!(instance = %target.name, error = %e, "the preempt fault found nothing to preempt");
                }
            }
        });
        Ok(answer)
    }

    async fn drive(
        self: Arc<Self>,
        op_key: OperationKey,
        target: InstanceKey,
        target_id: u64,
        operation_type: &'static str,
        fault: Option<FaultKind>,
        delay: Duration,
    ) {
        tokio::time::sleep(delay / 2).await;
        self.update_operation(&op_key, |op| {
            op.status = OpStatus::Running;
            op.start_time = Some(now_rfc3339());
        });
        {
            let mut state = self.lock();
            if let Some(record) = state.instances.get_mut(&target).filter(|r| r.id == target_id) {
                match operation_type {
                    "insert" if record.status == Status::Provisioning => record.status = Status::Staging,
                    "delete" if fault.is_none() => {
                        record.status = Status::Stopping;
                        if let Some(process) = record.process.take() {
                            process.shut_down();
                        }
                    }
                    _ => {}
                }
            }
        }
        if fault == Some(FaultKind::Hang) {
            return;
        }
        tokio::time::sleep(delay - delay / 2).await;

        let failure = fault.and_then(error_code);
        let mut boot = None;
        {
            let mut state = self.lock();
            let record = state.instances.get_mut(&target).filter(|r| r.id == target_id);
            match (operation_type, failure, record) {
                ("insert", Some(_), Some(_)) => {
                    if let Some(mut gone) = state.instances.remove(&target)
                        && let Some(process) = gone.process.take()
                    {
                        process.kill_now();
                    }
                }
                ("insert", None, Some(record)) if !record.deleting => {
                    record.status = Status::Running;
                    boot = Some(boot_info(&target, record));
                    let row = super::state::HistoryRow {
                        project: target.project.clone(),
                        zone: target.zone.clone(),
                        name: target.name.clone(),
                        id: record.id,
                        labels: record.labels.clone(),
                        pid: None,
                        requested_at: record.requested.clone(),
                    };
                    state.history.push(row);
                }
                ("delete", None, Some(_)) => {
                    if let Some(mut gone) = state.instances.remove(&target)
                        && let Some(process) = gone.process.take()
                    {
                        process.shut_down();
                    }
                }
                ("delete", Some(_), Some(record)) => record.deleting = false,
                _ => {}
            }
        }
        self.update_operation(&op_key, |op| {
            op.status = OpStatus::Done;
            op.end_time = Some(now_rfc3339());
            op.error = failure.map(|(code, message)| (code.to_string(), message.to_string()));
        });

        if let Some((info, max_run, delete_on_expiry)) = boot {
            if let Some(max_run) = max_run {
                let emulator = self.clone();
                let key = target.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(max_run).await;
                    emulator.expire(&key, target_id, delete_on_expiry, "max run duration reached");
                });
            }
            if let Some(info) = info {
                tokio::time::sleep(self.config.boot_delay).await;
                self.boot(info).await;
            }
        }
    }

    async fn boot(self: &Arc<Self>, info: BootInfo) {
        let still_wanted = |state: &super::state::State| {
            state
                .instances
                .get(&info.key)
                .is_some_and(|r| r.id == info.id && r.status == Status::Running && !r.deleting && r.process.is_none())
        };
        if !still_wanted(&self.lock()) {
            return;
        }
        let key = info.key.clone();
        let id = info.id;
        match vm::boot(self, info).await {
            Ok(process) => {
                let mut state = self.lock();
                match state.instances.get_mut(&key).filter(|r| r.id == id && !r.deleting && r.status == Status::Running)
                {
                    Some(record) => {
                        let pid = process.pid;
                        record.process = Some(process);
                        if let Some(row) = state.history.iter_mut().rev().find(|r| r.id == id) {
                            row.pid = Some(pid);
                        }
                    }
                    None => process.kill_now(),
                }
            }
            Err(e) => tracing::warn!(instance = %key.name, zone = %key.zone, error = %e, "VM failed to boot"),
        }
    }

    /// `maxRunDuration` is over, or a preemption notice: delete or stop the VM.
    fn expire(&self, key: &InstanceKey, id: u64, delete: bool, why: &'static str) {
        let mut state = self.lock();
        let Some(record) = state.instances.get_mut(key).filter(|r| r.id == id) else { return };
        if let Some(process) = record.process.take() {
            process.shut_down();
        }
        if delete {
            state.instances.remove(key);
            tracing::info!(instance = %key.name, zone = %key.zone, why, "VM deleted");
        } else {
            record.status = Status::Terminated;
            tracing::info!(instance = %key.name, zone = %key.zone, why, "VM stopped");
        }
    }

    /// Preempts a running Spot VM as Compute Engine does: `instance/preempted`
    /// turns TRUE in its metadata now, the VM goes STOPPING and its processes
    /// get SIGTERM, and after the preemption notice the rest is killed and
    /// the VM is stopped, or deleted with `instanceTerminationAction: DELETE`.
    /// `id` pins the VM (a VM of the same name made later is not touched).
    /// Preempting a preempted VM changes nothing.
    pub fn preempt(self: &Arc<Self>, key: &InstanceKey, id: Option<u64>) -> Result<Preempted, PreemptRefused> {
        let (id, delete) = {
            let mut state = self.lock();
            let record = state
                .instances
                .get_mut(key)
                .filter(|r| id.is_none_or(|id| r.id == id))
                .ok_or(PreemptRefused::NotFound)?;
            if !record.is_spot() {
                return Err(PreemptRefused::NotSpot);
            }
            if record.preempted {
                return Ok(Preempted { notice: self.config.preempt_notice, delete: record.delete_on_expiry });
            }
            if record.status != Status::Running || record.deleting {
                return Err(PreemptRefused::NotRunning);
            }
            // The notice is an ACPI soft off: the guest starts shutting
            // down now, and its metadata server still answers.
            record.preempted = true;
            record.status = Status::Stopping;
            if let Some(process) = record.process.as_ref() {
                process.soft_off();
            }
            (record.id, record.delete_on_expiry)
        };
        tracing::info!(instance = %key.name, zone = %key.zone, notice = ?self.config.preempt_notice, "Spot VM preempted");
        let emulator = self.clone();
        let key = key.clone();
        let notice = self.config.preempt_notice;
        tokio::spawn(async move {
            tokio::time::sleep(notice).await;
            emulator.expire(&key, id, delete, "preempted");
        });
        Ok(Preempted { notice, delete })
    }

    fn update_operation(&self, key: &OperationKey, change: impl FnOnce(&mut OperationRecord)) {
        let mut state = self.lock();
        if let Some(op) = state.operations.get_mut(key) {
            change(op);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Waits until the operation is DONE or `wait_timeout` passes, then
    /// returns it (`zoneOperations.wait`).
    pub async fn wait_operation(&self, key: &OperationKey) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + self.config.wait_timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let current = {
                let state = self.lock();
                state.operations.get(key).map(|op| (op.status, operation_json(key, op)))
            };
            match current {
                None => return None,
                Some((OpStatus::Done, json)) => return Some(json),
                Some((_, json)) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Some(json);
                    }
                }
            }
        }
    }
}

type Boot = (Option<BootInfo>, Option<Duration>, bool);

fn boot_info(key: &InstanceKey, record: &InstanceRecord) -> Boot {
    let metadata: Vec<(String, String)> = record
        .resource
        .metadata
        .as_ref()
        .map(|m| m.items.iter().filter_map(|i| Some((i.key.clone()?, i.value.clone().unwrap_or_default()))).collect())
        .unwrap_or_default();
    let script = metadata.iter().find(|(k, _)| k == "startup-script").map(|(_, v)| v.clone());
    let info = script.map(|script| BootInfo { key: key.clone(), id: record.id, script, metadata });
    (info, record.max_run, record.delete_on_expiry)
}

fn new_instance(id: u64, resource: model::Instance) -> InstanceRecord {
    let labels: BTreeMap<String, String> = resource.labels.clone().into_iter().collect();
    let scheduling = resource.scheduling.as_ref();
    let max_run = scheduling
        .and_then(|s| s.max_run_duration.as_ref())
        .and_then(|d| d.seconds)
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
        .or_else(|| {
            let at: jiff::Timestamp = scheduling?.termination_time.as_deref()?.parse().ok()?;
            let left = at.duration_since(jiff::Timestamp::now());
            Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
        });
    let delete_on_expiry = scheduling
        .and_then(|s| s.instance_termination_action.as_ref())
        .and_then(|a| a.name())
        .is_some_and(|a| a == "DELETE");
    InstanceRecord {
        id,
        label_fingerprint: fingerprint(&labels, id),
        labels,
        resource,
        status: Status::Provisioning,
        created: now_rfc3339(),
        requested: jiff::Timestamp::now()
            .round(jiff::Unit::Millisecond)
            .unwrap_or_else(|_| jiff::Timestamp::now())
            .to_string(),
        max_run,
        delete_on_expiry,
        process: None,
        deleting: false,
        preempted: false,
    }
}

/// A preemption under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preempted {
    /// How long the VM runs on after its notice.
    pub notice: Duration,
    /// Whether it is then deleted (else stopped).
    pub delete: bool,
}

/// Why a VM cannot be preempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreemptRefused {
    /// No such VM.
    #[error("no such instance")]
    NotFound,
    /// A standard VM: Compute Engine preempts Spot VMs only.
    #[error("the instance is not a Spot VM (scheduling.provisioningModel is not SPOT)")]
    NotSpot,
    /// It is not RUNNING (still starting, stopped or being deleted).
    #[error("the instance is not RUNNING")]
    NotRunning,
}
