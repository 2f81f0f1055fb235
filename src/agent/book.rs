//! What the agent API has heard and the controller has not yet written:
//! registrations, heartbeats (coalesced here, written at most every few
//! seconds) and results waiting to be persisted. Keyed by TestRun uid and
//! shard; only the reporting lease's entry is ever touched.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use jiff::Timestamp;

use crate::api::testrun::ShardResult;

/// What was heard from one shard's current lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Heard {
    /// The lease it was heard under.
    pub lease_id: i64,
    /// When its agent registered.
    pub registered_at: Option<Timestamp>,
    /// When anything was first heard under this lease (a registration, a
    /// heartbeat or a result): when the lease began, as far as this process
    /// knows, if the registration was heard by a process before it.
    pub first_heard: Option<Timestamp>,
    /// Its last heartbeat.
    pub last_heartbeat: Option<Timestamp>,
    /// Its result, accepted but not yet in status.
    pub result: Option<ShardResult>,
    /// When its agent said Compute Engine is reclaiming the VM.
    pub preempted_at: Option<Timestamp>,
}

impl Heard {
    /// A lease nothing was heard under yet.
    fn nothing_yet(lease_id: i64) -> Self {
        Self {
            lease_id,
            registered_at: None,
            first_heard: None,
            last_heartbeat: None,
            result: None,
            preempted_at: None,
        }
    }
}

/// A newer lease holds the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superseded;

/// The in-memory lease book, shared by the agent API and the controller.
#[derive(Default)]
pub struct LeaseBook {
    entries: Mutex<HashMap<String, BTreeMap<i32, Heard>>>,
}

impl LeaseBook {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, BTreeMap<i32, Heard>>) -> R) -> R {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut entries)
    }

    /// The entry of a shard's lease, created (or replaced when an older
    /// lease held it) as needed; `None` when a newer lease holds it, so a
    /// stale report can never disturb the current lease.
    fn entry<'a>(
        map: &'a mut HashMap<String, BTreeMap<i32, Heard>>,
        uid: &str,
        shard: i32,
        lease_id: i64,
        now: Timestamp,
    ) -> Option<&'a mut Heard> {
        let shards = map.entry(uid.to_string()).or_default();
        let heard = shards.entry(shard).or_insert_with(|| Heard::nothing_yet(lease_id));
        if heard.lease_id > lease_id {
            return None;
        }
        if heard.lease_id < lease_id {
            *heard = Heard::nothing_yet(lease_id);
        }
        heard.first_heard.get_or_insert(now);
        Some(heard)
    }

    /// Records a registration (which is also a first heartbeat).
    pub fn register(&self, uid: &str, shard: i32, lease_id: i64, now: Timestamp) {
        self.with(|m| {
            if let Some(heard) = Self::entry(m, uid, shard, lease_id, now) {
                heard.registered_at.get_or_insert(now);
                heard.last_heartbeat = Some(now);
            }
        });
    }

    /// Records a heartbeat.
    pub fn heartbeat(&self, uid: &str, shard: i32, lease_id: i64, now: Timestamp) {
        self.with(|m| {
            if let Some(heard) = Self::entry(m, uid, shard, lease_id, now) {
                heard.last_heartbeat = Some(now);
            }
        });
    }

    /// Records that the lease's VM is being preempted; `Err` when a newer
    /// lease holds the shard.
    pub fn preempted(&self, uid: &str, shard: i32, lease_id: i64, now: Timestamp) -> Result<(), Superseded> {
        self.with(|m| {
            let heard = Self::entry(m, uid, shard, lease_id, now).ok_or(Superseded)?;
            heard.preempted_at.get_or_insert(now);
            Ok(())
        })
    }

    /// Records a result. Returns the result already held for this lease if
    /// there is one (the first result of a lease wins), and `Err` when a
    /// newer lease holds the shard.
    pub fn result(
        &self,
        uid: &str,
        shard: i32,
        lease_id: i64,
        result: ShardResult,
        now: Timestamp,
    ) -> Result<Option<ShardResult>, Superseded> {
        self.with(|m| {
            let heard = Self::entry(m, uid, shard, lease_id, now).ok_or(Superseded)?;
            heard.last_heartbeat = Some(now);
            Ok(match &heard.result {
                Some(existing) => Some(existing.clone()),
                None => {
                    heard.result = Some(result);
                    None
                }
            })
        })
    }

    /// What was heard for a run, by shard.
    pub fn snapshot(&self, uid: &str) -> BTreeMap<i32, Heard> {
        self.with(|m| m.get(uid).cloned().unwrap_or_default())
    }

    /// Drops everything about a run (once it is finished and written).
    pub fn forget(&self, uid: &str) {
        self.with(|m| {
            m.remove(uid);
        });
    }

    /// Keeps only the runs `keep` names (a late report about a run that
    /// is gone made its entry again).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.with(|m| m.retain(|uid, _| keep(uid)));
    }

    /// How many runs have entries.
    pub fn len(&self) -> usize {
        self.with(|m| m.len())
    }

    /// Whether no run has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pool VMs whose agent registered and waits for an assignment, by preset
/// uid and instance name, with when they were last heard.
#[derive(Default)]
pub struct PoolBook {
    entries: Mutex<HashMap<String, BTreeMap<String, Timestamp>>>,
}

impl PoolBook {
    /// Records that a pool VM's agent is there.
    pub fn heard(&self, uid: &str, instance: &str, now: Timestamp) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.entry(uid.to_string()).or_default().insert(instance.to_string(), now);
    }

    /// The pool VMs heard for a preset.
    pub fn snapshot(&self, uid: &str) -> BTreeMap<String, Timestamp> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.get(uid).cloned().unwrap_or_default()
    }

    /// Drops everything about a preset.
    pub fn forget(&self, uid: &str) {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(uid);
    }

    /// Keeps only the VMs `keep` names (by preset uid and instance), and
    /// presets with a VM left.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|uid, vms| {
            vms.retain(|name, _| keep(uid, name));
            !vms.is_empty()
        });
    }

    /// How many pool VMs have entries.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values().map(BTreeMap::len).sum()
    }

    /// Whether no pool VM has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pool VMs whose agent waits (long poll) for an assignment, by instance
/// name: a claim for the VM wakes exactly its waiter.
#[derive(Default)]
pub struct AgentWaiters {
    waiting: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Notify>>>,
}

impl AgentWaiters {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, std::sync::Arc<tokio::sync::Notify>>> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The notification of a VM's waiter (made when none exists).
    pub fn waiter(&self, instance: &str) -> std::sync::Arc<tokio::sync::Notify> {
        self.waiting().entry(instance.to_string()).or_default().clone()
    }

    /// Wakes the waiter of a VM, if one waits (or will ask next).
    pub fn notify(&self, instance: &str) {
        if let Some(notify) = self.waiting().get(instance) {
            notify.notify_one();
        }
    }

    /// A waiter is done: forget it unless another one waits too.
    pub fn done(&self, instance: &str, notify: std::sync::Arc<tokio::sync::Notify>) {
        let mut waiting = self.waiting();
        // One reference here, one in the map: nobody else holds it.
        if std::sync::Arc::strong_count(&notify) <= 2 {
            waiting.remove(instance);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(code: i32) -> ShardResult {
        ShardResult { exit_code: code, duration_ms: 5, output_tail: String::new() }
    }

    #[test]
    fn first_result_of_a_lease_wins_and_a_new_lease_starts_clean() {
        let book = LeaseBook::default();
        let t = Timestamp::UNIX_EPOCH;
        book.register("u", 0, 1, t);
        assert_eq!(book.result("u", 0, 1, result(0), t), Ok(None));
        assert_eq!(book.result("u", 0, 1, result(3), t), Ok(Some(result(0))));
        assert_eq!(book.snapshot("u")[&0].result, Some(result(0)));
        book.register("u", 0, 2, t);
        let heard = &book.snapshot("u")[&0];
        assert_eq!((heard.lease_id, heard.result.clone()), (2, None));
        // The old lease can no longer touch the shard.
        assert_eq!(book.result("u", 0, 1, result(9), t), Err(Superseded));
        book.heartbeat("u", 0, 1, Timestamp::MAX);
        assert_eq!(book.snapshot("u")[&0].last_heartbeat, Some(t));
        // A lease first heard by heartbeats began with the first of them.
        let later = t + jiff::SignedDuration::from_secs(60);
        book.heartbeat("u", 0, 3, t);
        book.heartbeat("u", 0, 3, later);
        let heard = &book.snapshot("u")[&0];
        assert_eq!((heard.registered_at, heard.first_heard, heard.last_heartbeat), (None, Some(t), Some(later)));
        book.forget("u");
        assert!(book.snapshot("u").is_empty());
    }
}
