//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's
//! semantics: only the leader reconciles, scans for orphans and serves
//! agents (see [`crate::agent::endpoint`]); the others wait, ready to
//! take over.
//!
//! - A candidate takes the Lease when it has no holder, or when its record
//!   has not changed for `lease_duration` as measured by the candidate's
//!   own monotonic clock since it first saw that record (so clock skew
//!   between nodes does not matter, only clock rate).
//! - The leader renews every `retry_period`. When no renewal has succeeded
//!   for `renew_deadline` (shorter than `lease_duration`), it stops leading
//!   before anyone else may take over, and the process exits, as
//!   controller-runtime's do: a leader cut off from the API server never
//!   goes on acting next to a new one.
//! - Every write carries the `resourceVersion` it read, so two candidates
//!   never both win.
//! - On shutdown the leader gives the Lease up (no holder), so a rolling
//!   update hands over at once instead of after `lease_duration`.
//!
//! [`decide`] is the pure rule; [`Elector`] talks to the API server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

/// Whether this process may act as the leader: valid until a deadline that
/// every successful renewal moves to (its request's start + renew deadline).
/// Compute Engine mutations check it right before they are sent, and a
/// watchdog thread, outside the async runtime, ends the process once it
/// passed, so a process that stalled (CPU throttling, a paused container)
/// never acts after a standby may have taken over.
#[derive(Debug)]
pub struct Fence {
    base: std::time::Instant,
    /// Milliseconds after `base`; `u64::MAX` when there is no election.
    valid_until: AtomicU64,
    /// Set once the process stopped acting (its runtime is shut down): the
    /// watchdog then lets it give the Lease up and exit on its own.
    disarmed: AtomicBool,
}

impl Fence {
    /// A fence that always holds (no leader election).
    pub fn open() -> Arc<Self> {
        Arc::new(Self {
            base: std::time::Instant::now(),
            valid_until: AtomicU64::new(u64::MAX),
            disarmed: AtomicBool::new(false),
        })
    }

    /// A fence that holds nothing yet.
    pub fn closed() -> Arc<Self> {
        Arc::new(Self {
            base: std::time::Instant::now(),
            valid_until: AtomicU64::new(0),
            disarmed: AtomicBool::new(false),
        })
    }

    /// Whether the process may act now.
    pub fn holds(&self) -> bool {
        let until = self.valid_until.load(Ordering::Acquire);
        until == u64::MAX || self.millis(std::time::Instant::now()) < until
    }

    /// Ends the lead at once (it was lost): every later check fails, and
    /// the watchdog lets the process stop on its own.
    pub fn revoke(&self) {
        self.disarm();
        self.valid_until.store(0, Ordering::Release);
    }

    /// Stops the watchdog: the process no longer acts (its runtime stopped).
    pub fn disarm(&self) {
        self.disarmed.store(true, Ordering::Release);
    }

    fn millis(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn extend(&self, until: std::time::Instant) {
        self.valid_until.store(self.millis(until), Ordering::Release);
    }

    /// Ends the process once the fence no longer holds; checks every 100 ms
    /// on a thread of its own.
    fn watch(self: &Arc<Self>) {
        let fence = self.clone();
        let spawned = std::thread::Builder::new().name("leader-fence".into()).spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                if !fence.holds() && !fence.disarmed.load(Ordering::Acquire) {
                    tracing::error!("stopping: the leader Lease was not renewed in time");
                    std::process::exit(1);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "starting the leader fence thread");
            std::process::exit(1);
        }
    }
}

/// How often a standby reads the Lease: one small GET, so a dead leader's
/// last renewal is known to within this.
pub const STANDBY_POLL: Duration = Duration::from_millis(500);

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name, made unique).
    pub identity: String,
    /// How long a Lease record stays valid without a renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between tries to take or renew the Lease.
    pub retry_period: Duration,
}

/// Why the election settings cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The durations are out of order.
    #[error("leader election needs retry period ({retry:?}) < renew deadline ({renew:?}) < lease duration ({lease:?})")]
    Durations {
        /// Retry period.
        retry: Duration,
        /// Renew deadline.
        renew: Duration,
        /// Lease duration.
        lease: Duration,
    },
    /// The leader stopped leading.
    #[error("lost the leader Lease {namespace}/{name}: {why}")]
    Lost {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What happened.
        why: String,
    },
}

impl ElectionConfig {
    /// Checks the durations.
    pub fn validate(&self) -> Result<(), ElectionError> {
        if self.retry_period.is_zero()
            || self.retry_period >= self.renew_deadline
            || self.renew_deadline >= self.lease_duration
        {
            return Err(ElectionError::Durations {
                retry: self.retry_period,
                renew: self.renew_deadline,
                lease: self.lease_duration,
            });
        }
        Ok(())
    }
}

/// What a candidate knows of the Lease record it last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The holder, when there is one.
    pub holder: Option<String>,
    /// `renewTime` as written (compared, never trusted as a clock).
    pub renew_time: Option<Timestamp>,
    /// `leaseDurationSeconds` as written by the holder.
    pub lease_duration: Option<Duration>,
}

/// What to do with the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write the record as ours (take it, or renew it).
    Write,
    /// Someone else holds a live record: wait.
    Wait,
}

/// The rule: take or renew the Lease, or wait. `unchanged_for` is how long
/// (by this candidate's clock) the record has looked exactly as it does.
pub fn decide(record: &Observed, me: &str, unchanged_for: Duration, config_duration: Duration) -> Decision {
    match record.holder.as_deref() {
        None | Some("") => Decision::Write,
        Some(holder) if holder == me => Decision::Write,
        Some(_) => {
            // The holder's own duration counts when it wrote a longer one.
            let valid_for = record.lease_duration.map_or(config_duration, |d| d.max(config_duration));
            if unchanged_for >= valid_for { Decision::Write } else { Decision::Wait }
        }
    }
}

fn observed(lease: &Lease) -> Observed {
    let spec = lease.spec.as_ref();
    Observed {
        holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
        renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
        lease_duration: spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs),
    }
}

/// Takes part in the election for one process.
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    fence: Arc<Fence>,
    /// The record last read and since when it has looked so.
    seen: Option<(Observed, Instant)>,
}

impl Elector {
    /// An elector over the Lease in `config.namespace`.
    pub fn new(client: Client, config: ElectionConfig, fence: Arc<Fence>) -> Result<Self, ElectionError> {
        config.validate()?;
        let api = Api::namespaced(client, &config.namespace);
        Ok(Self { api, config, fence, seen: None })
    }

    /// The election's settings.
    pub fn config(&self) -> &ElectionConfig {
        &self.config
    }

    /// Waits until this process holds the Lease. While another replica
    /// holds it, the record is read every [`STANDBY_POLL`], so a renewal is
    /// seen within that and the Lease is taken as soon as it went unchanged
    /// for the lease duration: a standby takes over a dead leader at most
    /// `lease_duration + STANDBY_POLL` after its last renewal.
    /// `standing_by` is called each time the Lease was read and another
    /// replica holds it.
    pub async fn acquire(&mut self, mut standing_by: impl FnMut()) -> Instant {
        let mut logged_holder = None;
        // A try that takes longer than this is given up: its write may land,
        // but the lead it gave is then counted from its start, below.
        let patience = self.config.renew_deadline / 2;
        loop {
            let started = Instant::now();
            let wait = match tokio::time::timeout(patience, self.try_acquire_or_renew()).await {
                Ok(Ok(Held::ByUs)) if started.elapsed() < self.config.renew_deadline => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "became the leader");
                    self.fence.extend((started + self.config.renew_deadline).into_std());
                    self.fence.watch();
                    return started;
                }
                Ok(Ok(Held::ByUs)) => self.config.retry_period,
                Ok(Ok(Held::By(holder))) => {
                    standing_by();
                    if logged_holder.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.config.name, %holder, "standing by: another replica leads");
                        logged_holder = Some(holder);
                    }
                    STANDBY_POLL.min(self.config.retry_period)
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.config.name, error = %e, "reading or writing the leader Lease");
                    jittered(self.config.retry_period)
                }
                Err(_) => {
                    tracing::warn!(lease = %self.config.name, "the leader Lease did not answer in {patience:?}");
                    jittered(self.config.retry_period)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Renews the Lease until a renewal has not succeeded for the renew
    /// deadline, or another replica holds it; returns why leading ended.
    /// `last_renewed` is the start of the try that won the Lease: a lead
    /// counts from when its request left, never from when its answer came.
    pub async fn keep(&mut self, mut last_renewed: Instant) -> ElectionError {
        loop {
            let deadline = last_renewed + self.config.renew_deadline;
            tokio::time::sleep_until((Instant::now() + self.config.retry_period).min(deadline)).await;
            if Instant::now() >= deadline {
                return self.lost(format!("no renewal succeeded for {:?}", self.config.renew_deadline));
            }
            let started = Instant::now();
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(Held::ByUs)) => {
                    last_renewed = started;
                    self.fence.extend((started + self.config.renew_deadline).into_std());
                }
                Ok(Ok(Held::By(holder))) => return self.lost(format!("{holder} holds it now")),
                Ok(Err(e)) => tracing::warn!(lease = %self.config.name, error = %e, "renewing the leader Lease"),
                Err(_) => return self.lost(format!("no renewal succeeded for {:?}", self.config.renew_deadline)),
            }
        }
    }

    fn lost(&self, why: String) -> ElectionError {
        ElectionError::Lost { namespace: self.config.namespace.clone(), name: self.config.name.clone(), why }
    }

    /// Gives the Lease up when this process holds it (on shutdown), within
    /// two seconds.
    pub async fn release(&mut self) {
        if tokio::time::timeout(Duration::from_secs(2), self.give_up()).await.is_err() {
            tracing::warn!(lease = %self.config.name, "giving up the leader Lease timed out");
        }
    }

    async fn give_up(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else { return };
        if observed(&lease).holder.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.metadata.managed_fields = None;
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.config.name, "gave up the leader Lease"),
            Err(e) => tracing::warn!(lease = %self.config.name, error = %e, "giving up the leader Lease"),
        }
    }

    /// One try: whether this process holds the Lease now.
    async fn try_acquire_or_renew(&mut self) -> Result<Held, kube::Error> {
        let me = self.config.identity.clone();
        let seconds = i32::try_from(self.config.lease_duration.as_secs_f64().ceil() as u64).unwrap_or(i32::MAX).max(1);
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.seen = Some((observed(&created), Instant::now()));
                    Ok(Held::ByUs)
                }
                Err(e) if is_conflict(&e) => Ok(Held::By("another replica".into())),
                Err(e) => Err(e),
            };
        };
        let record = observed(&lease);
        let since = match &self.seen {
            Some((seen, since)) if *seen == record => *since,
            _ => {
                let now = Instant::now();
                self.seen = Some((record.clone(), now));
                now
            }
        };
        if decide(&record, &me, since.elapsed(), self.config.lease_duration) == Decision::Wait {
            return Ok(Held::By(record.holder.unwrap_or_default()));
        }
        let ours = record.holder.as_deref() == Some(me.as_str());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(me);
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        lease.metadata.managed_fields = None;
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                self.seen = Some((observed(&written), Instant::now()));
                Ok(Held::ByUs)
            }
            Err(e) if is_conflict(&e) => Ok(Held::By(record.holder.unwrap_or_else(|| "another replica".into()))),
            Err(e) => Err(e),
        }
    }
}

/// Who holds the Lease after a try.
enum Held {
    /// This process.
    ByUs,
    /// Another replica.
    By(String),
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

/// `period` plus up to 20 %, so candidates do not try in lockstep.
fn jittered(period: Duration) -> Duration {
    period + period.mul_f64(rand::random::<f64>() * 0.2)
}

/// A unique identity for this process: its pod name (or host name) and a
/// random suffix, so a restarted pod never mistakes its old record for its own.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "testrun-controller".into());
    format!("{base}_{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn held_by(holder: Option<&str>) -> Observed {
        Observed {
            holder: holder.map(str::to_string),
            renew_time: Some(Timestamp::UNIX_EPOCH),
            lease_duration: Some(D),
        }
    }

    #[test]
    fn a_free_lease_is_taken_at_once() {
        assert_eq!(decide(&held_by(None), "b", Duration::ZERO, D), Decision::Write);
        assert_eq!(decide(&held_by(Some("")), "b", Duration::ZERO, D), Decision::Write);
    }

    #[test]
    fn the_holder_renews_its_own_lease() {
        assert_eq!(decide(&held_by(Some("a")), "a", Duration::ZERO, D), Decision::Write);
    }

    #[test]
    fn another_holder_is_waited_for_until_its_record_went_unchanged_for_the_lease_duration() {
        let record = held_by(Some("a"));
        assert_eq!(decide(&record, "b", Duration::from_secs(14), D), Decision::Wait);
        assert_eq!(decide(&record, "b", D, D), Decision::Write);
    }

    #[test]
    fn a_holder_that_wrote_a_longer_duration_is_given_it() {
        let mut record = held_by(Some("a"));
        record.lease_duration = Some(Duration::from_secs(60));
        assert_eq!(decide(&record, "b", Duration::from_secs(30), D), Decision::Wait);
        assert_eq!(decide(&record, "b", Duration::from_secs(60), D), Decision::Write);
        // A shorter one written by the holder does not shorten the wait.
        record.lease_duration = Some(Duration::from_secs(1));
        assert_eq!(decide(&record, "b", Duration::from_secs(5), D), Decision::Wait);
    }

    #[test]
    fn durations_must_be_ordered() {
        let config = |retry, renew, lease| ElectionConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        };
        assert!(config(2, 10, 15).validate().is_ok());
        assert!(config(2, 15, 15).validate().is_err());
        assert!(config(10, 10, 15).validate().is_err());
        assert!(config(0, 10, 15).validate().is_err());
    }
}
