//! The operation tracker: one task that follows every outstanding cloud
//! operation of the installation and wakes the owning object when its
//! operation ends, so no reconcile ever polls an operation.
//!
//! Reconciles hand it their calls ([`Tracker::submit`]) after the intent is
//! in status; it makes each call in the background (through the quota-class
//! rate limiters), keeps the inventory up to date with what was accepted and
//! finished, and learns each operation's outcome as cheaply as it can
//! ([`decide`]): from the inventory first, by reading the operation only
//! when no evidence comes, and, past the deadline, by looking at the VM
//! itself. Reads run with bounded concurrency.

pub mod decide;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::api::{OperationKind, OperationState, TrackedOperation};
use crate::compute::{Compute, ComputeError, ErrorCode, Instance, InstanceStatus, Operation, OperationStatus};
use crate::controller::ops::{CloudCall, Seen};
use crate::inventory::state::{Origin, Presence};
use crate::inventory::{Inventory, OwnerWake};
use crate::metrics::steps::Step;
use crate::metrics::{Metrics, ResolvedLabels};
use decide::{Looked, Next, Patience, Running, decide, next_read_after, settled};

/// Resolved operations nobody asked about for this long are forgotten.
const RESOLVED_KEEP: Duration = Duration::from_secs(3600);
/// How long the loop sleeps at most.
const IDLE_TICK: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
enum Phase {
    /// The call is waiting for its turn or in flight.
    Queued,
    /// Accepted; following its operation.
    Running { run: Running, op: String, busy: bool },
    /// Past its deadline or forgotten by Compute Engine: waiting for a list
    /// that started after `after`, then a get. With `ask`, that list is
    /// asked for; without (its zone was unreachable, or the get failed), the
    /// regular resync brings it.
    Settling { run: Running, after: u64, ask: bool, busy: bool, why: ErrorCode },
    /// The outcome is known.
    Resolved { seen: Seen, at: Instant },
}

#[derive(Clone, Debug)]
struct Tracked {
    /// Every object that asked for this call (two may plan the same delete,
    /// e.g. a preset and the run that claimed its VM); all are woken.
    owners: BTreeSet<String>,
    kind: OperationKind,
    zone: String,
    instance: String,
    /// For a label change: the labels it sets.
    labels: Option<BTreeMap<String, String>>,
    /// For an insert: the VM as requested (what the inventory expects).
    expected: Option<Instance>,
    phase: Phase,
    op_name: Option<String>,
}

/// What to do outside the locks after a pass.
enum Effect {
    Resolved { rid: String, how: &'static str },
    Read { rid: String, zone: String, op: String },
    Look { rid: String, zone: String, instance: String },
}

/// The tracker, shared by every reconcile.
pub struct Tracker<C> {
    compute: C,
    entries: Mutex<HashMap<String, Tracked>>,
    changed: Notify,
    inventory: Arc<Inventory>,
    patience: Patience,
    reads: Arc<Semaphore>,
    /// Calls in flight at once.
    calls: Arc<Semaphore>,
    /// Calls waiting for their turn, first submitted first.
    queue: Mutex<VecDeque<(String, CloudCall)>>,
    metrics: Arc<Metrics>,
    wake: OwnerWake,
}

fn kind_label(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::Insert => "insert",
        OperationKind::Delete => "delete",
        OperationKind::SetLabels => "setLabels",
    }
}

fn lost(why: &ErrorCode, zone: &str, instance: &str, deadline: Duration) -> ComputeError {
    let message = match why {
        ErrorCode::OperationVanished => format!("the operation on VM {instance} in {zone} is no longer known"),
        _ => format!("the operation on VM {instance} in {zone} did not finish within {}s", deadline.as_secs()),
    };
    ComputeError::Api { call: "zoneOperations.get", code: why.clone(), status: 404, message }
}

impl<C: Compute + Clone> Tracker<C> {
    /// A tracker making calls on `compute` (at most `calls_in_flight` at
    /// once), keeping `inventory` up to date, reading at most `concurrency`
    /// operations at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        compute: C,
        inventory: Arc<Inventory>,
        patience: Patience,
        calls_in_flight: usize,
        concurrency: usize,
        metrics: Arc<Metrics>,
        wake: OwnerWake,
    ) -> Arc<Self> {
        Arc::new(Self {
            compute,
            entries: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            inventory,
            patience,
            reads: Arc::new(Semaphore::new(concurrency.max(1))),
            calls: Arc::new(Semaphore::new(calls_in_flight.max(1))),
            queue: Mutex::new(VecDeque::new()),
            metrics,
            wake,
        })
    }

    /// The compute back end the tracker calls (for the orphan scan's own calls).
    pub fn compute(&self) -> &C {
        &self.compute
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, Tracked>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes a planned call in the background and follows its operation.
    /// A call whose request id is already being followed is not made again.
    pub fn submit(self: &Arc<Self>, owner: &str, call: CloudCall) {
        let rid = call.request_id().to_string();
        let (kind, zone, instance, labels, expected) = match &call {
            CloudCall::Insert(spec) => {
                let expected = Instance {
                    name: spec.name.clone(),
                    zone: spec.zone.clone(),
                    status: InstanceStatus::Provisioning,
                    labels: spec.labels.clone(),
                    label_fingerprint: String::new(),
                    // The inventory keeps no metadata.
                    metadata: BTreeMap::new(),
                    creation_timestamp: None,
                };
                (OperationKind::Insert, spec.zone.clone(), spec.name.clone(), None, Some(expected))
            }
            CloudCall::Delete { zone, name, .. } => (OperationKind::Delete, zone.clone(), name.clone(), None, None),
            CloudCall::SetLabels { zone, name, labels, .. } => {
                (OperationKind::SetLabels, zone.clone(), name.clone(), Some(labels.clone()), None)
            }
        };
        {
            let mut entries = self.entries();
            let answer_lost =
                |t: &Tracked| matches!(&t.phase, Phase::Resolved { seen: Seen::Failed(e), .. } if e.answer_lost());
            if let Some(t) = entries.get_mut(&rid).filter(|t| answer_lost(t)) {
                // The last call with this request id got no answer: it may
                // have been carried out. Made again with the same id,
                // Compute Engine answers with the operation it started, or
                // makes the call now.
                tracing::debug!(request_id = %rid, "call made again: its last answer was lost");
                t.owners.insert(owner.to_string());
                t.phase = Phase::Queued;
                t.op_name = None;
                self.count(&entries);
            } else if let Some(t) = entries.get_mut(&rid) {
                // Not made twice; the new owner is woken with the others.
                let first_ask = t.owners.insert(owner.to_string());
                if matches!(t.phase, Phase::Resolved { .. }) {
                    // The same request id would only replay the known outcome.
                    tracing::debug!(request_id = %rid, "call not made again: its outcome is known");
                    drop(entries);
                    if first_ask {
                        (self.wake)(owner);
                    }
                }
                return;
            } else {
                entries.insert(
                    rid.clone(),
                    Tracked {
                        owners: BTreeSet::from([owner.to_string()]),
                        kind,
                        zone,
                        instance,
                        labels,
                        expected,
                        phase: Phase::Queued,
                        op_name: None,
                    },
                );
                self.count(&entries);
            }
        }
        tracing::debug!(request_id = %rid, ?kind, "call queued");
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push_back((rid, call));
        self.dispatch();
    }

    /// Starts queued calls while there is room in flight. A queued call is
    /// a small value; the call itself (a large future) exists only for the
    /// few in flight.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let Ok(turn) = self.calls.clone().try_acquire_owned() else { return };
            let Some((rid, call)) = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front()
            else {
                return;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let call_made = Box::pin(async {
                    match &call {
                        CloudCall::Insert(spec) => me.compute.insert(spec).await,
                        CloudCall::Delete { zone, name, request_id } => me.compute.delete(zone, name, request_id).await,
                        CloudCall::SetLabels { zone, name, labels, fingerprint, request_id } => {
                            me.compute.set_labels(zone, name, labels, fingerprint, request_id).await
                        }
                    }
                });
                // A call that panics is answered as a failed call, so its
                // entry never stays queued (and its owner's finalizer on).
                let result =
                    futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(call_made)).await.unwrap_or_else(
                        |_| Err(ComputeError::Transport { call: call.method(), message: "the call panicked".into() }),
                    );
                me.accepted(&rid, result);
                drop(turn);
                me.dispatch();
            });
        }
    }

    /// Follows an operation recorded in status that this process did not
    /// start (after a restart): from now on, as if just accepted.
    pub fn adopt(&self, owner: &str, op: &TrackedOperation, age: Duration) {
        let Some(name) = op.operation.clone().filter(|_| op.state == OperationState::Running) else { return };
        let mut entries = self.entries();
        if let Some(t) = entries.get_mut(&op.request_id) {
            t.owners.insert(owner.to_string());
            return;
        }
        let now = Instant::now();
        let accepted = now.checked_sub(age).unwrap_or(now);
        let run = Running {
            kind: op.kind,
            zone: op.zone.clone(),
            instance: op.instance.clone(),
            accepted,
            accepted_seq: self.inventory.lock().seq(),
            reads: 0,
            next_read: now,
        };
        entries.insert(
            op.request_id.clone(),
            Tracked {
                owners: BTreeSet::from([owner.to_string()]),
                kind: op.kind,
                zone: op.zone.clone(),
                instance: op.instance.clone(),
                labels: None,
                expected: None,
                phase: Phase::Running { run, op: name.clone(), busy: false },
                op_name: Some(name),
            },
        );
        self.count(&entries);
        drop(entries);
        self.changed.notify_one();
    }

    /// What is known of the operations with these request ids.
    pub fn seen<'a>(&self, rids: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, Seen> {
        let entries = self.entries();
        rids.into_iter()
            .filter_map(|rid| {
                let t = entries.get(rid)?;
                let seen = match &t.phase {
                    Phase::Resolved { seen, .. } => seen.clone(),
                    _ => Seen::InFlight,
                };
                Some((rid.to_string(), seen))
            })
            .collect()
    }

    /// The operation names known for these request ids.
    pub fn operation_names<'a>(&self, rids: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
        let entries = self.entries();
        rids.into_iter().filter_map(|rid| Some((rid.to_string(), entries.get(rid)?.op_name.clone()?))).collect()
    }

    /// Operations of an owner whose outcome is not known yet.
    pub fn outstanding(&self, owner: &str) -> usize {
        self.entries()
            .values()
            .filter(|t| t.owners.contains(owner) && !matches!(t.phase, Phase::Resolved { .. }))
            .count()
    }

    /// Forgets an owner's resolved operations that its status no longer names.
    pub fn forget_except(&self, owner: &str, keep: &BTreeSet<String>) {
        let mut entries = self.entries();
        entries.retain(|rid, t| {
            if keep.contains(rid) || !matches!(t.phase, Phase::Resolved { .. }) {
                return true;
            }
            t.owners.remove(owner);
            !t.owners.is_empty()
        });
    }

    fn count(&self, entries: &HashMap<String, Tracked>) {
        let open = entries.values().filter(|t| !matches!(t.phase, Phase::Resolved { .. })).count();
        self.metrics.operations_tracked.set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// Records what a call returned.
    fn accepted(&self, rid: &str, result: Result<Operation, ComputeError>) {
        let now = Instant::now();
        tracing::debug!(request_id = %rid, result = ?result.as_ref().map(|op| (&op.name, op.status)), "call answered");
        let mut how = None;
        {
            let mut entries = self.entries();
            let Some(t) = entries.get_mut(rid) else { return };
            match result {
                Ok(op) => {
                    if t.kind == OperationKind::Insert {
                        self.metrics.shard_steps.mark(&t.instance, Step::InsertAccepted);
                    }
                    t.op_name = Some(op.name.clone());
                    match (op.status, op.error) {
                        (_, Some(error)) => {
                            t.phase = Phase::Resolved { seen: Seen::Failed(error), at: now };
                            how = Some("read");
                        }
                        (OperationStatus::Done, None) => {
                            t.phase = Phase::Resolved { seen: Seen::Done, at: now };
                            how = Some("read");
                        }
                        _ => {
                            let mut inventory = self.inventory.lock();
                            let accepted_seq = inventory.seq();
                            if let Some(expected) = t.expected.clone() {
                                inventory.expect(expected);
                            }
                            drop(inventory);
                            let run = Running {
                                kind: t.kind,
                                zone: t.zone.clone(),
                                instance: t.instance.clone(),
                                accepted: now,
                                accepted_seq,
                                reads: 0,
                                next_read: now + self.patience.first_read,
                            };
                            t.phase = Phase::Running { run, op: op.name, busy: false };
                        }
                    }
                }
                // A VM of this (deterministic) name exists: the insert happened.
                Err(e) if t.kind == OperationKind::Insert && e.is_already_exists() => {
                    t.phase = Phase::Resolved { seen: Seen::Done, at: now };
                    how = Some("evidence");
                }
                Err(e) if t.kind == OperationKind::Delete && e.is_not_found() => {
                    t.phase = Phase::Resolved { seen: Seen::Done, at: now };
                    how = Some("evidence");
                }
                Err(e) => {
                    tracing::warn!(instance = %t.instance, zone = %t.zone, error = %e, "cloud call failed");
                    t.phase = Phase::Resolved { seen: Seen::Failed(e), at: now };
                    how = Some("call");
                }
            }
        }
        if let Some(how) = how {
            self.resolved(rid, how);
        }
        self.changed.notify_one();
    }

    /// Applies a resolution: keeps the inventory in step, counts it, wakes
    /// the owner.
    fn resolved(&self, rid: &str, how: &'static str) {
        let Some(t) = self.entries().get(rid).cloned() else { return };
        let Phase::Resolved { seen, .. } = &t.phase else { return };
        let mut woken: BTreeSet<String> = BTreeSet::new();
        {
            let mut inventory = self.inventory.lock();
            match (t.kind, seen) {
                (OperationKind::Insert, Seen::Done) => inventory.created(&t.zone, &t.instance, t.expected.clone()),
                (OperationKind::Insert, Seen::Failed(ComputeError::OperationFailed { .. })) => {
                    inventory.gone(&t.zone, &t.instance);
                }
                // The call got no answer: it may have been carried out, so
                // the VM is expected until its owner deletes it or the same
                // call, made again, settles it.
                (OperationKind::Insert, Seen::Failed(e)) if e.answer_lost() => {
                    if let Some(expected) = t.expected.clone() {
                        inventory.expect(expected);
                    }
                }
                // Lost, timed out with no VM, or the call failed: expect
                // nothing (a list still shows the VM if it exists after all).
                (OperationKind::Insert, Seen::Failed(_)) => inventory.not_created(&t.zone, &t.instance),
                (OperationKind::Delete, Seen::Done) => {
                    inventory.gone(&t.zone, &t.instance);
                }
                // The operation says there was no such VM.
                (OperationKind::Delete, Seen::Failed(e)) if e.is_not_found() => {
                    inventory.gone(&t.zone, &t.instance);
                }
                (OperationKind::SetLabels, Seen::Done) => {
                    if let Some(labels) = t.labels.clone() {
                        woken.extend(inventory.relabelled(&t.zone, &t.instance, labels));
                    }
                }
                _ => {}
            }
        }
        match (t.kind, seen) {
            (OperationKind::Insert, Seen::Done) => self.metrics.shard_steps.mark(&t.instance, Step::VmRunning),
            (OperationKind::Delete, Seen::Done) => self.metrics.shard_steps.mark(&t.instance, Step::VmGone),
            (OperationKind::Delete, Seen::Failed(e)) if e.is_not_found() => {
                self.metrics.shard_steps.mark(&t.instance, Step::VmGone);
            }
            _ => {}
        }
        let labels = ResolvedLabels { kind: kind_label(t.kind).into(), how: how.into() };
        self.metrics.operations_resolved.get_or_create(&labels).inc();
        self.count(&self.entries());
        woken.extend(t.owners.iter().cloned());
        for owner in woken {
            (self.wake)(&owner);
        }
    }

    /// One pass over every operation: resolve what evidence settles, start
    /// reads and looks, ask for lists. Returns when to pass again.
    fn pass(self: &Arc<Self>) -> Instant {
        let now = Instant::now();
        let mut next = now + IDLE_TICK;
        let mut effects = Vec::new();
        let mut list_after: Option<u64> = None;
        {
            // Lock order everywhere: entries, then the inventory.
            let mut entries = self.entries();
            let inventory = self.inventory.lock();
            entries.retain(
                |_, t| !matches!(t.phase, Phase::Resolved { at, .. } if now.duration_since(at) > RESOLVED_KEEP),
            );
            for (rid, t) in entries.iter_mut() {
                match &mut t.phase {
                    Phase::Running { run, op, busy: false } => match decide(run, &inventory, now, &self.patience) {
                        Next::Done => {
                            t.phase = Phase::Resolved { seen: Seen::Done, at: now };
                            effects.push(Effect::Resolved { rid: rid.clone(), how: "evidence" });
                        }
                        Next::Read => {
                            effects.push(Effect::Read { rid: rid.clone(), zone: t.zone.clone(), op: op.clone() });
                            if let Phase::Running { busy, .. } = &mut t.phase {
                                *busy = true;
                            }
                        }
                        Next::Settle => {
                            let after = inventory.seq();
                            list_after = list_after.max(Some(after));
                            tracing::warn!(instance = %t.instance, zone = %t.zone, operation = %op, "operation did not finish in time; looking at the VM");
                            t.phase = Phase::Settling {
                                run: run.clone(),
                                after,
                                ask: true,
                                busy: false,
                                why: ErrorCode::OperationTimedOut,
                            };
                        }
                        Next::Wait { until, list_after: wanted } => {
                            next = next.min(until);
                            if wanted.is_some() {
                                list_after = list_after.max(wanted);
                            }
                        }
                    },
                    Phase::Settling { run, after, ask, busy: false, why } => {
                        if inventory.listed_at().is_none_or(|at| at <= *after) {
                            if *ask {
                                list_after = list_after.max(Some(*after));
                            }
                            continue;
                        }
                        // A zone the last list could not see settles
                        // nothing, not even by a VM an older list showed.
                        match inventory.presence_now(&t.zone, &t.instance) {
                            // Only a VM a list showed is evidence; an entry
                            // the inventory holds because this very insert
                            // was accepted proves nothing.
                            Presence::Present(entry) if entry.origin == Origin::Listed => {
                                let seen = if settled(run.kind, Looked::Present) {
                                    Seen::Done
                                } else {
                                    Seen::Failed(lost(why, &t.zone, &t.instance, self.patience.deadline))
                                };
                                t.phase = Phase::Resolved { seen, at: now };
                                effects.push(Effect::Resolved { rid: rid.clone(), how: "deadline" });
                            }
                            Presence::Present(_) | Presence::Absent => {
                                effects.push(Effect::Look {
                                    rid: rid.clone(),
                                    zone: t.zone.clone(),
                                    instance: t.instance.clone(),
                                });
                                if let Phase::Settling { busy, .. } = &mut t.phase {
                                    *busy = true;
                                }
                            }
                            Presence::Unknown => {
                                // Its zone cannot be seen: wait for a later
                                // list that can (the regular resync; asking
                                // for one now would list every second while
                                // the zone is down).
                                *after = inventory.seq();
                                *ask = false;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(seq) = list_after {
            self.inventory.want_list_after(seq);
        }
        for effect in effects {
            match effect {
                Effect::Resolved { rid, how } => self.resolved(&rid, how),
                Effect::Read { rid, zone, op } => self.spawn_read(rid, zone, op),
                Effect::Look { rid, zone, instance } => self.spawn_look(rid, zone, instance),
            }
        }
        next
    }

    fn spawn_read(self: &Arc<Self>, rid: String, zone: String, op: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = me.reads.acquire().await;
            let result = Box::pin(me.compute.get_operation(&zone, &op)).await;
            tracing::debug!(request_id = %rid, operation = %op, result = ?result.as_ref().map(|o| (o.status, o.error.is_some())), "operation read");
            let now = Instant::now();
            let mut how = None;
            {
                let mut entries = me.entries();
                let Some(t) = entries.get_mut(&rid) else { return };
                let Phase::Running { run, .. } = &mut t.phase else { return };
                let mut run = run.clone();
                t.phase = match result {
                    Ok(read) if read.status == OperationStatus::Done => {
                        how = Some("read");
                        let seen = read.error.map_or(Seen::Done, Seen::Failed);
                        Phase::Resolved { seen, at: now }
                    }
                    Err(e) if e.code() == ErrorCode::OperationVanished => {
                        tracing::warn!(instance = %t.instance, zone = %t.zone, operation = %op, "operation vanished; looking at the VM");
                        let after = me.inventory.lock().seq();
                        me.inventory.want_list_after(after);
                        Phase::Settling { run, after, ask: true, busy: false, why: ErrorCode::OperationVanished }
                    }
                    other => {
                        if let Err(e) = other {
                            tracing::debug!(operation = %op, error = %e, "reading an operation failed; trying again later");
                        }
                        run.reads += 1;
                        run.next_read = next_read_after(now, run.reads, &me.patience);
                        Phase::Running { run, op: op.clone(), busy: false }
                    }
                };
            }
            if let Some(how) = how {
                me.resolved(&rid, how);
            }
            me.changed.notify_one();
        });
    }

    fn spawn_look(self: &Arc<Self>, rid: String, zone: String, instance: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = me.reads.acquire().await;
            let result = Box::pin(me.compute.get(&zone, &instance)).await;
            let now = Instant::now();
            let mut resolved = false;
            {
                let mut entries = me.entries();
                let Some(t) = entries.get_mut(&rid) else { return };
                let Phase::Settling { run, why, .. } = &t.phase else { return };
                let (run, why) = (run.clone(), why.clone());
                t.phase = match result {
                    Ok(found) => {
                        resolved = true;
                        let looked = if found.is_some() { Looked::Present } else { Looked::Absent };
                        let seen = if settled(run.kind, looked) {
                            Seen::Done
                        } else {
                            Seen::Failed(lost(&why, &zone, &instance, me.patience.deadline))
                        };
                        Phase::Resolved { seen, at: now }
                    }
                    Err(e) => {
                        tracing::debug!(instance = %instance, error = %e, "looking at a VM failed; trying again after the next resync");
                        let after = me.inventory.lock().seq();
                        Phase::Settling { run, after, ask: false, busy: false, why }
                    }
                };
            }
            if resolved {
                me.resolved(&rid, "deadline");
            }
            me.changed.notify_one();
        });
    }

    /// Follows operations forever.
    pub async fn run(self: Arc<Self>) {
        let mut listed = self.inventory.subscribe();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = self.pass();
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = notified => {}
                _ = listed.changed() => {}
            }
        }
    }
}
