//! Sums over the objects this replica reconciles: queue depth (TestRuns and
//! shards waiting for a VM, `runs_waiting` and `shards_waiting`) and VM
//! deletes that keep failing (`deletes_failing`). An object that finishes
//! or is deleted leaves the sums.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;

/// What one run adds to the queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    /// Whether no shard of the run is running or done yet.
    pub run: bool,
    /// Shards waiting for their VM (pending or provisioning).
    pub shards: i64,
}

/// The queue, by run uid, the failing deletes, by object uid, and their
/// gauges.
#[derive(Default)]
pub struct Queue {
    by_run: Mutex<HashMap<String, Waiting>>,
    failing: Mutex<HashMap<String, i64>>,
    /// VM deletes that failed 5 times or more and are still retried.
    pub deletes_failing: Gauge,
    /// TestRuns with no shard running or done yet.
    pub runs_waiting: Gauge,
    /// Shards waiting for a VM.
    pub shards_waiting: Gauge,
}

impl Queue {
    /// Sets what a run adds; a run that adds nothing leaves the map.
    pub fn set(&self, uid: &str, waiting: Waiting) {
        let mut by_run = self.by_run.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if waiting == Waiting::default() {
            by_run.remove(uid);
        } else {
            by_run.insert(uid.to_string(), waiting);
        }
        let runs = by_run.values().filter(|w| w.run).count();
        let shards: i64 = by_run.values().map(|w| w.shards).sum();
        self.runs_waiting.set(i64::try_from(runs).unwrap_or(i64::MAX));
        self.shards_waiting.set(shards);
    }

    /// Sets how many of an object's VM deletes keep failing.
    pub fn set_failing_deletes(&self, uid: &str, n: usize) {
        let mut failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if n == 0 {
            failing.remove(uid);
        } else {
            failing.insert(uid.to_string(), i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.deletes_failing.set(failing.values().sum());
    }

    /// Keeps only the objects `keep` holds (a sweep against the caches: an
    /// object whose finalizer was removed by hand is never reconciled
    /// again).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = {
            let by_run = self.by_run.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            by_run.keys().chain(failing.keys()).filter(|uid| !keep(uid)).cloned().collect()
        };
        for uid in gone {
            self.forget(&uid);
        }
    }

    /// Takes an object out (finished or deleted).
    pub fn forget(&self, uid: &str) {
        self.set(uid, Waiting::default());
        self.set_failing_deletes(uid, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauges_are_the_sums_and_a_forgotten_run_leaves_them() {
        let q = Queue::default();
        q.set("a", Waiting { run: true, shards: 3 });
        q.set("b", Waiting { run: false, shards: 1 });
        assert_eq!((q.runs_waiting.get(), q.shards_waiting.get()), (1, 4));
        q.set("a", Waiting { run: false, shards: 2 });
        assert_eq!((q.runs_waiting.get(), q.shards_waiting.get()), (0, 3));
        q.set_failing_deletes("a", 2);
        q.set_failing_deletes("p", 1);
        assert_eq!(q.deletes_failing.get(), 3);
        q.forget("a");
        q.forget("b");
        assert_eq!((q.runs_waiting.get(), q.shards_waiting.get(), q.deletes_failing.get()), (0, 0, 1));
        assert!(q.by_run.lock().expect("lock").is_empty());
        q.set("c", Waiting { run: true, shards: 1 });
        q.retain(|uid| uid == "c");
        assert_eq!((q.runs_waiting.get(), q.deletes_failing.get()), (1, 0), "p is gone, c stays");
    }
}
