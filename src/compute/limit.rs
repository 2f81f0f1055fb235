//! Rate limiters per Compute Engine quota class (mutations, reads,
//! operation reads) and one bound on in-flight mutations for every outgoing
//! compute call, sized to Compute Engine's default API quotas, so many
//! callers at once queue here instead of being refused by the cloud; and
//! the call metrics (by method and outcome, latency, calls waiting).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};

use crate::leader::Fence;
use tokio::time::Instant;

use super::{Compute, ComputeError, Instance, InstanceSpec, Listing, Operation};
use crate::metrics::{ClassLabels, MethodCodeLabels, MethodLabels, Metrics};

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

/// Compute Engine's rate quota groups the controller's calls fall in. Each
/// group is counted separately by Compute Engine, so each has its own
/// limiter here: polling can never use up the budget of creating VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuotaClass {
    /// `instances.insert`, `instances.delete`, `instances.setLabels`.
    Mutation,
    /// `instances.get` and `instances.aggregatedList`.
    Read,
    /// `zoneOperations.get`.
    OperationRead,
}

impl QuotaClass {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mutation => "mutation",
            Self::Read => "read",
            Self::OperationRead => "operation_read",
        }
    }
}

/// Calls per second for each quota class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rates {
    /// Inserts, deletes, label changes.
    pub mutations: u32,
    /// Gets and lists.
    pub reads: u32,
    /// Operation reads.
    pub operation_reads: u32,
}

impl Rates {
    /// The same rate for every class.
    pub fn uniform(rate: u32) -> Self {
        Self { mutations: rate, reads: rate, operation_reads: rate }
    }
}

/// A [`Compute`] whose calls pass the limiter of their quota class, whose
/// mutations (insert, delete, setLabels) are bounded in number at once, and
/// which counts every call by method and outcome.
#[derive(Clone)]
pub struct Limited<C> {
    inner: C,
    mutations: Arc<RateLimiter>,
    reads: Arc<RateLimiter>,
    operation_reads: Arc<RateLimiter>,
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    fence: Arc<Fence>,
}

impl<C: Compute> Limited<C> {
    /// Wraps `inner` with a rate per quota class and `max_mutations` at once.
    pub fn new(inner: C, rates: Rates, max_mutations: usize, metrics: Arc<Metrics>) -> Self {
        let limiter = |rate: u32| Arc::new(RateLimiter::new(rate, rate));
        Self {
            inner,
            mutations: limiter(rates.mutations),
            reads: limiter(rates.reads),
            operation_reads: limiter(rates.operation_reads),
            in_flight: Arc::new(Semaphore::new(max_mutations.max(1))),
            metrics,
            fence: Fence::open(),
        }
    }

    /// Sends mutations only while `fence` holds (this replica leads).
    pub fn with_fence(mut self, fence: Arc<Fence>) -> Self {
        self.fence = fence;
        self
    }

    /// Waits for a token of the call's class, makes the call, counts it.
    async fn call<T>(
        &self,
        class: QuotaClass,
        method: &'static str,
        call: impl Future<Output = Result<T, ComputeError>>,
    ) -> Result<T, ComputeError> {
        let limiter = match class {
            QuotaClass::Mutation => &self.mutations,
            QuotaClass::Read => &self.reads,
            QuotaClass::OperationRead => &self.operation_reads,
        };
        let waiting = self.metrics.compute_waiting.get_or_create(&ClassLabels { class: class.label().into() }).clone();
        waiting.inc();
        let slot = match class {
            QuotaClass::Mutation => self.in_flight.acquire().await.ok(),
            _ => None,
        };
        limiter.acquire().await;
        waiting.dec();
        if class == QuotaClass::Mutation && !self.fence.holds() {
            // Not sent: the call's future is lazy and is dropped here.
            return Err(ComputeError::Transport {
                call: method,
                message: "this replica no longer holds the leader Lease; the call was not sent".into(),
            });
        }
        let started = std::time::Instant::now();
        let result = call.await;
        drop(slot);
        let code = match &result {
            Ok(_) => "OK".to_string(),
            Err(e) => e.code().as_str().to_string(),
        };
        self.metrics.compute_requests.get_or_create(&MethodCodeLabels { method: method.into(), code }).inc();
        self.metrics
            .compute_latency
            .get_or_create(&MethodLabels { method: method.into() })
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

impl<C: Compute> Compute for Limited<C> {
    async fn insert(&self, spec: &InstanceSpec) -> Result<Operation, ComputeError> {
        self.call(QuotaClass::Mutation, "instances.insert", self.inner.insert(spec)).await
    }

    async fn delete(&self, zone: &str, name: &str, request_id: &str) -> Result<Operation, ComputeError> {
        self.call(QuotaClass::Mutation, "instances.delete", self.inner.delete(zone, name, request_id)).await
    }

    async fn get(&self, zone: &str, name: &str) -> Result<Option<Instance>, ComputeError> {
        self.call(QuotaClass::Read, "instances.get", self.inner.get(zone, name)).await
    }

    async fn list_by_labels(&self, labels: &BTreeMap<String, String>) -> Result<Listing, ComputeError> {
        self.call(QuotaClass::Read, "instances.aggregatedList", self.inner.list_by_labels(labels)).await
    }

    async fn get_operation(&self, zone: &str, name: &str) -> Result<Operation, ComputeError> {
        self.call(QuotaClass::OperationRead, "zoneOperations.get", self.inner.get_operation(zone, name)).await
    }

    async fn set_labels(
        &self,
        zone: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        fingerprint: &str,
        request_id: &str,
    ) -> Result<Operation, ComputeError> {
        let call = self.inner.set_labels(zone, name, labels, fingerprint, request_id);
        self.call(QuotaClass::Mutation, "instances.setLabels", call).await
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
