//! Liveness: `/healthz` fails once a reconcile has been under way longer
//! than `--wedged-after` (a reconcile stuck on a lock or a call that never
//! returns: the loop no longer progresses for that object, and a restart is
//! the cure). A part of the controller that ends stops the process itself.
//!
//! A slow or unreachable kube-apiserver should not fail it: each request
//! gives up after 295 s without an answer and the reconcile ends with an
//! error, which a restart would not mend; the default limit is above a few
//! such requests in a row.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The default of `--wedged-after`.
pub const DEFAULT_WEDGED_AFTER: Duration = Duration::from_secs(900);

/// The reconciles under way.
pub struct Liveness {
    next: AtomicU64,
    in_flight: Mutex<HashMap<u64, (&'static str, Instant)>>,
    wedged_after: Mutex<Duration>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            in_flight: Mutex::new(HashMap::new()),
            wedged_after: Mutex::new(DEFAULT_WEDGED_AFTER),
        }
    }
}

/// A reconcile under way; it ends when dropped.
#[must_use = "the reconcile counts as under way until this is dropped"]
pub struct InFlight<'a> {
    liveness: &'a Liveness,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.liveness.lock_in_flight().remove(&self.id);
    }
}

impl Liveness {
    /// Sets how long a reconcile may run before the process counts as wedged.
    pub fn set_wedged_after(&self, after: Duration) {
        *self.wedged_after.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = after;
    }

    /// Marks a reconcile of `kind` under way from now.
    pub fn begin(&self, kind: &'static str) -> InFlight<'_> {
        self.begin_at(kind, Instant::now())
    }

    fn begin_at(&self, kind: &'static str, at: Instant) -> InFlight<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock_in_flight().insert(id, (kind, at));
        InFlight { liveness: self, id }
    }

    /// `Ok` while live, else why not.
    pub fn verdict(&self) -> Result<(), String> {
        self.verdict_at(Instant::now())
    }

    fn verdict_at(&self, now: Instant) -> Result<(), String> {
        let limit = *self.wedged_after.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let oldest = self
            .lock_in_flight()
            .values()
            .map(|(kind, at)| (*kind, now.saturating_duration_since(*at)))
            .max_by_key(|(_, age)| *age);
        match oldest {
            Some((kind, age)) if age > limit => Err(format!(
                "a {kind} reconcile has been under way for {}s, longer than --wedged-after ({}s)",
                age.as_secs(),
                limit.as_secs()
            )),
            _ => Ok(()),
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (&'static str, Instant)>> {
        self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_under_way_too_long_fails_liveness_until_it_ends() {
        let live = Liveness::default();
        live.set_wedged_after(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(live.verdict_at(t0).is_ok(), "nothing under way");
        let stuck = live.begin_at("testrun", t0);
        {
            let _quick = live.begin_at("prebuildpreset", t0 + Duration::from_secs(50));
            assert!(live.verdict_at(t0 + Duration::from_secs(60)).is_ok());
            let why = live.verdict_at(t0 + Duration::from_secs(61)).expect_err("wedged");
            assert!(why.starts_with("a testrun reconcile has been under way for 61s"), "{why}");
        }
        drop(stuck);
        assert!(live.verdict_at(t0 + Duration::from_secs(3600)).is_ok(), "it ended: live again");
    }
}
