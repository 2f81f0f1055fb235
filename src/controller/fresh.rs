//! The object as this controller last wrote it, until the watch catches up.
//!
//! After a status write the reflector's copy is stale for a moment; a
//! reconcile woken in that moment (an operation finished, an agent
//! reported) would plan from the old status, and its guarded write would
//! conflict. So each write is remembered with every resourceVersion this
//! controller replaced since the cache last caught up: while the cache
//! holds one of them (it may lag by several writes), the written object is
//! the truth. Any other version in the cache (the write arrived, or
//! someone else wrote later) ends the entry; the cache never goes back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::{Resource, ResourceExt};

/// Versions older than the last write that one entry remembers. A cache
/// lagging further behind is read as is (its plan then conflicts and is
/// made again), so the bound costs only a retry.
const MAX_REPLACED: usize = 16;

/// Writes since the cache last caught up: the versions they replaced,
/// oldest first, and the object last written.
struct Written<K> {
    replaced: std::collections::VecDeque<Option<String>>,
    mine: Arc<K>,
}

/// Objects written recently, by uid.
pub struct Fresh<K> {
    written: Mutex<HashMap<String, Written<K>>>,
}

impl<K> Default for Fresh<K> {
    fn default() -> Self {
        Self { written: Mutex::new(HashMap::new()) }
    }
}

impl<K: Resource> Fresh<K> {
    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, Written<K>>> {
        self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest known version of an object read from the cache.
    pub fn latest(&self, cached: Arc<K>) -> Arc<K> {
        let Some(uid) = cached.uid() else { return cached };
        let mut written = self.written();
        match written.get(&uid) {
            Some(w) if w.replaced.contains(&cached.resource_version()) => w.mine.clone(),
            Some(_) => {
                written.remove(&uid);
                cached
            }
            None => cached,
        }
    }

    /// Remembers a write: `before` was replaced by `after`.
    pub fn wrote(&self, before: &K, mut after: K) {
        // Like the cache, without managedFields (nothing reads them).
        after.meta_mut().managed_fields = None;
        let Some(uid) = after.uid() else { return };
        let mut written = self.written();
        // The write succeeded on top of `before`, so every version replaced
        // earlier is older still and stays in the chain.
        let mine = Arc::new(after);
        let entry = written.entry(uid).or_insert_with(|| Written { replaced: Default::default(), mine: mine.clone() });
        entry.replaced.push_back(before.resource_version());
        if entry.replaced.len() > MAX_REPLACED {
            entry.replaced.pop_front();
        }
        entry.mine = mine;
    }

    /// The watch delivered a version of an object: unless it is one this
    /// controller has since replaced, the entry is over.
    pub fn observed(&self, obj: &K) {
        let Some(uid) = obj.uid() else { return };
        let mut written = self.written();
        if written.get(&uid).is_some_and(|w| !w.replaced.contains(&obj.resource_version())) {
            written.remove(&uid);
        }
    }

    /// Forgets an object.
    pub fn forget(&self, uid: &str) {
        self.written().remove(uid);
    }

    /// Keeps only the objects whose uid `keep` names.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.written().retain(|uid, _| keep(uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::testrun::TestRun;

    fn run(rv: &str) -> TestRun {
        let mut run: TestRun = serde_json::from_value(serde_json::json!({
            "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun",
            "metadata": { "name": "r", "uid": "u", "resourceVersion": rv },
            "spec": { "command": ["true"], "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "i" } }
        }))
        .expect("TestRun");
        run.metadata.resource_version = Some(rv.into());
        run
    }

    #[test]
    fn the_written_object_wins_until_the_cache_moves_on() {
        let fresh = Fresh::default();
        fresh.wrote(&run("1"), run("2"));
        assert_eq!(fresh.latest(Arc::new(run("1"))).resource_version().as_deref(), Some("2"));
        fresh.observed(&run("2"));
        assert_eq!(fresh.latest(Arc::new(run("1"))).resource_version().as_deref(), Some("1"), "entry over");
        fresh.wrote(&run("2"), run("3"));
        assert_eq!(fresh.latest(Arc::new(run("5"))).resource_version().as_deref(), Some("5"), "someone wrote later");
        assert_eq!(fresh.latest(Arc::new(run("2"))).resource_version().as_deref(), Some("2"), "and the entry is gone");
    }

    #[test]
    fn a_cache_several_writes_behind_never_goes_back() {
        let fresh = Fresh::default();
        fresh.wrote(&run("1"), run("2"));
        fresh.wrote(&run("2"), run("3"));
        fresh.wrote(&run("3"), run("4"));
        for behind in ["1", "2", "3"] {
            fresh.observed(&run(behind));
            assert_eq!(
                fresh.latest(Arc::new(run(behind))).resource_version().as_deref(),
                Some("4"),
                "cache at {behind}"
            );
        }
        fresh.observed(&run("4"));
        assert_eq!(fresh.latest(Arc::new(run("1"))).resource_version().as_deref(), Some("1"), "caught up: entry over");
    }
}
