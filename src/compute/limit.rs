//! One rate limiter and one bound on in-flight mutations for every outgoing
//! compute call, sized to Compute Engine's default API quotas, so many
//! reconciles at once queue here instead of being refused by the cloud.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use super::{Compute, ComputeError, Instance, InstanceSpec, Operation};

/// Spaces calls evenly: at most `rate` per second, with bursts of `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    burst: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// `rate` calls per second (at least 1), bursts of up to `burst` calls.
    pub fn new(rate: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / rate.max(1);
        Self { interval, burst: interval * (burst.max(1) - 1), next: Mutex::new(Instant::now()) }
    }

    /// Waits for this call's turn.
    pub async fn acquire(&self) {
        let turn = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            // Unused capacity carries over only up to one burst.
            let earliest = now.checked_sub(self.burst).unwrap_or(now);
            let turn = (*next).max(earliest);
            *next = turn + self.interval;
            turn
        };
        tokio::time::sleep_until(turn).await;
    }
}

/// A [`Compute`] whose calls pass the rate limiter, and whose mutations
/// (insert, delete, setLabels) are bounded in number at once.
#[derive(Clone, Debug)]
pub struct Limited<C> {
    inner: C,
    rate: Arc<RateLimiter>,
    mutations: Arc<Semaphore>,
}

impl<C: Compute> Limited<C> {
    /// Wraps `inner` with `rate` calls per second and `max_mutations` at once.
    pub fn new(inner: C, rate: u32, max_mutations: usize) -> Self {
        Self {
            inner,
            rate: Arc::new(RateLimiter::new(rate, rate)),
            mutations: Arc::new(Semaphore::new(max_mutations.max(1))),
        }
    }
}

impl<C: Compute> Compute for Limited<C> {
    async fn insert(&self, spec: &InstanceSpec) -> Result<Operation, ComputeError> {
        let _slot = self.mutations.acquire().await;
        self.rate.acquire().await;
        self.inner.insert(spec).await
    }

    async fn delete(&self, zone: &str, name: &str, request_id: &str) -> Result<Operation, ComputeError> {
        let _slot = self.mutations.acquire().await;
        self.rate.acquire().await;
        self.inner.delete(zone, name, request_id).await
    }

    async fn get(&self, zone: &str, name: &str) -> Result<Option<Instance>, ComputeError> {
        self.rate.acquire().await;
        self.inner.get(zone, name).await
    }

    async fn list_by_labels(&self, labels: &BTreeMap<String, String>) -> Result<Vec<Instance>, ComputeError> {
        self.rate.acquire().await;
        self.inner.list_by_labels(labels).await
    }

    async fn get_operation(&self, zone: &str, name: &str) -> Result<Operation, ComputeError> {
        self.rate.acquire().await;
        self.inner.get_operation(zone, name).await
    }

    async fn set_labels(
        &self,
        zone: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        fingerprint: &str,
        request_id: &str,
    ) -> Result<Operation, ComputeError> {
        let _slot = self.mutations.acquire().await;
        self.rate.acquire().await;
        self.inner.set_labels(zone, name, labels, fingerprint, request_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Virtual time (tokio's paused clock): deterministic, no wall clock.
    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_after_the_burst() {
        let limiter = RateLimiter::new(10, 5);
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        // The first call of an idle limiter may use the burst.
        let after_burst = Instant::now() - start;
        for _ in 0..10 {
            limiter.acquire().await;
        }
        let spaced = Instant::now() - start - after_burst;
        assert!(spaced >= Duration::from_millis(900), "10 calls at 10/s took {spaced:?} of virtual time");
        assert!(spaced <= Duration::from_millis(1500), "{spaced:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limiter_allows_a_burst_at_once() {
        let limiter = RateLimiter::new(10, 5);
        tokio::time::advance(Duration::from_secs(10)).await;
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        assert_eq!(Instant::now() - start, Duration::ZERO, "a burst of 5 waits for nothing");
        limiter.acquire().await;
        assert!(Instant::now() - start > Duration::ZERO, "the sixth call waits");
    }
}
