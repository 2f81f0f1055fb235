//! The VM inventory: one in-memory view of every VM of this installation,
//! the only place the controller learns from the cloud what exists.
//!
//! It is filled by one paginated aggregated list (filtered to the
//! installation) at start, then again every `--inventory-resync` while it
//! holds any VM, and sooner when the operation tracker asks for a list to
//! confirm an operation (at most one list per second, fewer for large
//! installations). The controller's own calls update it at once: an accepted
//! insert is *expected*, a finished insert *present*, a finished delete
//! *absent*. Reconciles read it and never list the cloud.
//!
//! It knows the limits of what it knows ([`state`]): before the first list,
//! and in a zone the last list reported unreachable, nothing is absent.
//! When a list shows that an object's VMs appeared, vanished or stopped,
//! the object is woken.

pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::compute::{Compute, Instance};
use crate::metrics::{Metrics, ReasonLabels};
use state::{InventoryState, VmView};

/// Wakes the object with this owner uid (label value).
pub type OwnerWake = Arc<dyn Fn(&str) + Send + Sync>;

/// How the inventory lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InventoryConfig {
    /// Time between lists while the inventory holds any VM.
    pub resync: Duration,
    /// Shortest time between two lists asked for by the tracker.
    pub min_gap: Duration,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self { resync: Duration::from_secs(30), min_gap: Duration::from_secs(1) }
    }
}

#[derive(Debug, Default)]
struct Schedule {
    /// A list that starts after this sequence number is wanted.
    wanted_after: Option<u64>,
    /// When the last list started, and its page count.
    last: Option<(Instant, u32)>,
    /// Lists that failed in a row, and when the last one did.
    failures: u32,
    failed_at: Option<Instant>,
}

/// The inventory, shared by reconciles, the tracker and the orphan scan.
pub struct Inventory {
    state: Mutex<InventoryState>,
    schedule: Mutex<Schedule>,
    selector: BTreeMap<String, String>,
    config: InventoryConfig,
    wakeup: Notify,
    listed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Inventory {
    /// An empty, unsynced inventory of the VMs carrying all of `selector`.
    pub fn new(selector: BTreeMap<String, String>, config: InventoryConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let (listed, _) = watch::channel(0);
        Arc::new(Self {
            state: Mutex::new(InventoryState::default()),
            schedule: Mutex::new(Schedule::default()),
            selector,
            config,
            wakeup: Notify::new(),
            listed,
            metrics,
        })
    }

    /// The state, locked (no lock is held across an await).
    pub fn lock(&self) -> MutexGuard<'_, InventoryState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a planner sees of one owner's VMs.
    pub fn view(&self, owner: &str) -> VmView {
        VmView::of(&self.lock(), owner)
    }

    /// One VM by place, whoever owns it, if held.
    pub fn get(&self, zone: &str, name: &str) -> Option<Instance> {
        match self.lock().presence(zone, name) {
            state::Presence::Present(entry) => Some(entry.instance.clone()),
            _ => None,
        }
    }

    /// Asks for a list that starts after sequence number `seq`.
    pub fn want_list_after(&self, seq: u64) {
        let mut schedule = self.schedule();
        if schedule.wanted_after.is_none_or(|w| w < seq) {
            schedule.wanted_after = Some(seq);
            drop(schedule);
            self.wakeup.notify_one();
        }
    }

    /// Asks for a list that starts from now on.
    pub fn want_fresh_list(&self) -> u64 {
        let seq = self.lock().seq();
        self.want_list_after(seq);
        seq
    }

    /// Signals the start sequence number of every list applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.listed.subscribe()
    }

    /// Waits until a list has been applied.
    pub async fn wait_synced(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|started| *started > 0).await;
    }

    /// Waits (up to `timeout`) for a list that started after `seq`; true
    /// when one was applied.
    pub async fn wait_list_after(&self, seq: u64, timeout: Duration) -> bool {
        self.want_list_after(seq);
        let mut rx = self.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|started| *started > seq)).await.is_ok_and(|r| r.is_ok())
    }

    /// The sequence number and every listed VM, with the zones whose VMs
    /// are unknown: the orphan scan's input.
    pub fn listed(&self) -> (Vec<Instance>, BTreeSet<String>) {
        let state = self.lock();
        (state.listed(), state.unreachable().clone())
    }

    /// How long ago the last successful list started.
    pub fn last_list_age(&self) -> Option<Duration> {
        self.schedule().last.map(|(at, _)| at.elapsed())
    }

    /// When the next list is due.
    fn due(&self) -> Option<Instant> {
        let (state_empty, listed_at) = {
            let state = self.lock();
            (state.is_empty(), state.listed_at().unwrap_or(0))
        };
        let schedule = self.schedule();
        let Some((last, pages)) = schedule.last else {
            return Some(schedule.failed_at.map_or_else(Instant::now, |at| at + backoff(schedule.failures)));
        };
        if let Some(failed) = schedule.failed_at {
            return Some(failed + backoff(schedule.failures));
        }
        let gap = self.config.min_gap.max(Duration::from_millis(250) * pages);
        let mut due: Option<Instant> = None;
        if schedule.wanted_after.is_some_and(|w| w >= listed_at) {
            due = Some(last + gap);
        }
        if !state_empty {
            let resync = last + self.config.resync;
            due = Some(due.map_or(resync, |d| d.min(resync)));
        }
        due
    }

    /// Lists once and applies the result.
    pub async fn list_once<C: Compute>(&self, compute: &C, wake: &OwnerWake) {
        let started = self.lock().begin_list();
        let at = Instant::now();
        match compute.list_by_labels(&self.selector).await {
            Ok(listing) => {
                let pages = listing.pages;
                let partial = !listing.unreachable.is_empty();
                if partial {
                    tracing::warn!(zones = ?listing.unreachable, "some zones could not be listed; their VMs are kept as last seen and none counts as gone");
                }
                let changed = {
                    let mut state = self.lock();
                    let changed = state.apply_list(started, listing);
                    self.metrics.inventory_vms.set(i64::try_from(state.len()).unwrap_or(i64::MAX));
                    self.metrics
                        .inventory_unreachable_zones
                        .set(i64::try_from(state.unreachable().len()).unwrap_or(i64::MAX));
                    changed
                };
                let result = if partial { "partial" } else { "ok" };
                self.metrics.inventory_lists.get_or_create(&ReasonLabels { reason: result.into() }).inc();
                {
                    let mut schedule = self.schedule();
                    schedule.last = Some((at, pages));
                    schedule.failures = 0;
                    schedule.failed_at = None;
                    if schedule.wanted_after.is_some_and(|w| w < started) {
                        schedule.wanted_after = None;
                    }
                }
                tracing::debug!(pages, changed = changed.len(), "inventory listed");
                for owner in &changed {
                    wake(owner);
                }
                self.listed.send_replace(started);
            }
            Err(e) => {
                self.metrics.inventory_lists.get_or_create(&ReasonLabels { reason: "error".into() }).inc();
                let mut schedule = self.schedule();
                schedule.failures += 1;
                schedule.failed_at = Some(Instant::now());
                tracing::warn!(error = %e, failures = schedule.failures, retry_in = ?backoff(schedule.failures), "listing the installation's VMs failed; the inventory keeps what it knew");
            }
        }
    }

    /// Lists whenever a list is due, forever.
    pub async fn run<C: Compute>(self: Arc<Self>, compute: C, wake: OwnerWake) {
        loop {
            let notified = self.wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.due() {
                Some(due) if due <= Instant::now() => self.list_once(&compute, &wake).await,
                Some(due) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        () = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

/// Wait after `failures` failed lists in a row: 1 s doubling, at most 60 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}
