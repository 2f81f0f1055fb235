//! Keeps the controller's in-memory books as small as the cluster: what
//! was remembered about an object that is gone (a late agent report can
//! make an entry again after the object's finalizer came off; a preset's
//! VM leaves the pool) is dropped by a periodic sweep against the caches.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::ResourceExt;

use crate::agent::book::{LeaseBook, PoolBook};
use crate::compute::Compute;
use crate::compute::naming::label_value;
use crate::controller::wake::Wakers;
use crate::controller::{Backoff, Context, cache_ready};

/// How often the books are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The objects that exist, by uid: TestRuns, and presets with the names of
/// their VMs.
#[derive(Debug, Default)]
pub struct Live {
    /// TestRun uids.
    pub runs: BTreeSet<String>,
    /// PrebuildPreset uids, with the VMs in their status.
    pub presets: BTreeMap<String, BTreeSet<String>>,
}

/// The books a sweep keeps small.
pub struct Books<'a> {
    /// Agent reports by TestRun uid.
    pub leases: &'a LeaseBook,
    /// Pool agents by preset uid and VM.
    pub pool: &'a PoolBook,
    /// Owners to wake, by uid label value.
    pub wakers: &'a Wakers,
    /// Failure counts, by `testrun/<uid>` and `preset/<uid>`.
    pub backoff: &'a Backoff,
}

/// Drops every entry about an object (or pool VM) that `live` does not hold.
pub fn sweep(books: &Books<'_>, live: &Live) {
    books.leases.retain(|uid| live.runs.contains(uid));
    books.pool.retain(|uid, vm| live.presets.get(uid).is_some_and(|vms| vms.contains(vm)));
    let owners: BTreeSet<String> = live.runs.iter().chain(live.presets.keys()).map(|u| label_value(u)).collect();
    books.wakers.retain(|label| owners.contains(label));
    books.backoff.retain(|key| match key.split_once('/') {
        Some(("testrun", uid)) => live.runs.contains(uid),
        Some(("preset", uid)) => live.presets.contains_key(uid),
        _ => false,
    });
}

/// Sweeps the books every minute, once the caches are filled (an empty
/// cache would look like a cluster with nothing in it).
pub async fn run<C: Compute + Clone>(ctx: std::sync::Arc<Context<C>>) {
    cache_ready(&ctx.runs).await;
    cache_ready(&ctx.presets).await;
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let live = Live {
            runs: ctx.runs.state().iter().filter_map(|r| r.uid()).collect(),
            presets: ctx
                .presets
                .state()
                .iter()
                .filter_map(|p| {
                    let vms = p.status.iter().flat_map(|s| &s.instances).map(|i| i.name.clone()).collect();
                    Some((p.uid()?, vms))
                })
                .collect(),
        };
        let books = Books { leases: &ctx.book, pool: &ctx.pool, wakers: &ctx.wakers, backoff: &ctx.backoff };
        sweep(&books, &live);
        ctx.fresh_runs.retain(|uid| live.runs.contains(uid));
        ctx.fresh_presets.retain(|uid| live.presets.contains_key(uid));
        ctx.metrics.queue.retain(|uid| live.runs.contains(uid) || live.presets.contains_key(uid));
        ctx.metrics.retain_pools(|uid| live.presets.contains_key(uid));
        tracing::debug!(
            runs = live.runs.len(),
            presets = live.presets.len(),
            lease_book = ctx.book.len(),
            pool_book = ctx.pool.len(),
            "in-memory books swept"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[test]
    fn entries_of_gone_objects_and_pool_vms_are_dropped_and_live_ones_kept() {
        let (runs_tx, _runs_rx) = tokio::sync::mpsc::unbounded_channel();
        let (presets_tx, _presets_rx) = tokio::sync::mpsc::unbounded_channel();
        let wakers = Wakers::new(runs_tx, presets_tx);
        let (leases, pool, backoff) = (LeaseBook::default(), PoolBook::default(), Backoff::default());
        let now = Timestamp::UNIX_EPOCH;
        for uid in ["run-live", "run-gone"] {
            leases.register(uid, 0, 1, now);
            backoff.record(&format!("testrun/{uid}"), false);
            wakers.register(
                &label_value(uid),
                crate::controller::wake::Owner::TestRun(kube::runtime::reflector::ObjectRef::new(uid)),
            );
        }
        for (uid, vm) in [("pool-live", "vm-kept"), ("pool-live", "vm-left"), ("pool-gone", "vm-x")] {
            pool.heard(uid, vm, now);
        }
        backoff.record("testrun/run-gone", false);
        backoff.record("preset/pool-gone", false);
        let live = Live {
            runs: ["run-live".to_string()].into(),
            presets: [("pool-live".to_string(), ["vm-kept".to_string()].into())].into(),
        };
        sweep(&Books { leases: &leases, pool: &pool, wakers: &wakers, backoff: &backoff }, &live);
        assert_eq!(leases.len(), 1);
        assert!(!leases.snapshot("run-live").is_empty());
        assert_eq!(pool.len(), 1);
        assert!(pool.snapshot("pool-live").contains_key("vm-kept"));
        assert_eq!(wakers.len(), 1);
        assert_eq!(backoff.delay("testrun/run-live"), Duration::from_secs(1));
        // A gone object's failures are not remembered (two were: a third
        // would wait 4 s).
        backoff.record("testrun/run-gone", false);
        assert_eq!(backoff.delay("testrun/run-gone"), Duration::from_secs(1));
    }
}
