//! Wiring: the shared [`Context`], the error policy, the lease key Secret,
//! and [`run`], which starts the controllers, the inventory, the operation
//! tracker, the orphan scan and the agent API. What happens to a TestRun is
//! in [`testrun::plan`]; to a pool, in [`prebuild::plan`].

pub mod claims;
pub mod conditions;
pub mod execute;
pub mod fresh;
pub mod gc;
pub mod housekeeping;
pub mod ops;
pub mod prebuild;
pub mod slots;
pub mod testrun;
pub mod wake;

use slots::Slots;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::agent::api::AgentApi;
use crate::agent::book::{AgentWaiters, LeaseBook, PoolBook};
use crate::agent::tokens::LeaseKey;
use crate::api::prebuild::PrebuildPreset;
use crate::api::testrun::TestRun;
use crate::compute::Compute;
use crate::compute::naming::installation_selector;
use crate::inventory::{Inventory, InventoryConfig};
use crate::metrics::Metrics;
use crate::tracker::Tracker;
use crate::tracker::decide::Patience;
use fresh::Fresh;
use testrun::plan::Settings;
use wake::Wakers;

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "testrun-controller";
/// The key inside the lease key Secret.
const SECRET_KEY: &str = "lease-key";

/// Why a reconcile failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing status failed.
    #[error("writing the status of {name}: {source}")]
    WriteStatus {
        /// The object.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Claiming a pool VM failed.
    #[error("claiming a VM from PrebuildPreset {preset}: {source}")]
    Claim {
        /// The preset.
        preset: String,
        /// Why.
        source: kube::Error,
    },
    /// Reading the preset of a TestRun failed.
    #[error("reading PrebuildPreset {preset}: {source}")]
    ReadPreset {
        /// The preset.
        preset: String,
        /// Why.
        source: kube::Error,
    },
    /// Deleting an expired TestRun failed.
    #[error("deleting {name} after its ttlSecondsAfterFinished: {source}")]
    Delete {
        /// The object.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Reading the object again after a conflict failed.
    #[error("reading {name} again: {source}")]
    Read {
        /// The object.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("updating the finalizer of {name}: {source}")]
    Finalizer {
        /// The object.
        name: String,
        /// Why.
        source: kube::Error,
    },
}

impl Error {
    /// Whether the error is a conflict: someone wrote the object since it
    /// was read; read it again and plan again.
    pub fn is_conflict(&self) -> bool {
        let source = match self {
            Self::WriteStatus { source, .. }
            | Self::Claim { source, .. }
            | Self::Finalizer { source, .. }
            | Self::Delete { source, .. } => source,
            _ => return false,
        };
        matches!(source, kube::Error::Api(e) if e.code == 409)
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The CRDs are not installed or not readable.
    #[error(
        "TestRuns or PrebuildPresets cannot be listed ({0}); install the CRDs with `kubectl apply -f crds/` and check RBAC"
    )]
    Crd(#[source] kube::Error),
    /// The VmClass CRD is not installed or not readable.
    #[error(
        "VmClasses cannot be listed ({0}); install the CRDs with `kubectl apply -f crds/` (helm upgrade does not upgrade them) and let the controller list and watch vmclasses"
    )]
    ClassCrd(#[source] kube::Error),
    /// The lease key Secret could not be read or created.
    #[error("reading or creating Secret {namespace}/{name}: {source}")]
    Secret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The Secret exists but holds no usable key.
    #[error("Secret {namespace}/{name} has no 32-byte `{SECRET_KEY}`; delete it to have a new key made")]
    BadSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A part the controller cannot work without stopped (a panic); the
    /// process exits so that it is restarted, rather than run half-blind.
    #[error("the {0} stopped unexpectedly: {1}")]
    Stopped(&'static str, String),
    /// The agent API could not listen.
    #[error("the agent API cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Per-object exponential backoff after failed reconciles.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records the outcome of a reconcile.
    pub fn record(&self, name: &str, ok: bool) {
        let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            failures.remove(name);
        } else {
            *failures.entry(name.to_string()).or_default() += 1;
        }
    }

    /// Keeps only the objects whose key (`testrun/<uid>`, `preset/<uid>`)
    /// `keep` names.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|key, _| keep(key));
    }

    /// The wait before the next try: 1 s, 2 s, 4 s, … up to 5 minutes.
    pub fn delay(&self, name: &str) -> Duration {
        let failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.get(name).copied().unwrap_or(1).clamp(1, 10);
        Duration::from_secs(1u64 << (n - 1)).min(Duration::from_secs(300))
    }
}

/// Zones recently out of capacity, per machine family, remembered for a
/// few minutes so other runs do not retry them blindly.
pub struct ExhaustedZones {
    until: Mutex<HashMap<(String, String), Instant>>,
    memory: Duration,
}

impl ExhaustedZones {
    /// Remembers for `memory`.
    pub fn new(memory: Duration) -> Self {
        Self { until: Mutex::new(HashMap::new()), memory }
    }

    fn family(machine_type: &str) -> String {
        machine_type.split('-').next().unwrap_or(machine_type).to_string()
    }

    /// Marks a zone out of capacity for a machine type's family.
    pub fn mark(&self, zone: &str, machine_type: &str) {
        let mut until = self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        until.insert((zone.to_string(), Self::family(machine_type)), Instant::now() + self.memory);
    }

    /// The zones out of capacity for a machine type's family now.
    pub fn current(&self, machine_type: &str) -> BTreeSet<String> {
        let family = Self::family(machine_type);
        let now = Instant::now();
        let mut until = self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        until.retain(|_, t| *t > now);
        until.keys().filter(|(_, f)| *f == family).map(|(z, _)| z.clone()).collect()
    }
}

/// What every reconcile shares.
pub struct Context<C: Compute> {
    /// Kubernetes.
    pub client: Client,
    /// The VMs of the installation, as far as known.
    pub inventory: Arc<Inventory>,
    /// Makes planned calls and follows their operations.
    pub tracker: Arc<Tracker<C>>,
    /// Wakes objects by uid.
    pub wakers: Arc<Wakers>,
    /// The TestRun cache.
    pub runs: Store<TestRun>,
    /// The PrebuildPreset cache.
    pub presets: Store<PrebuildPreset>,
    /// The VmClass cache.
    pub classes: Store<crate::api::VmClass>,
    /// TestRuns as last written, until the cache has them.
    pub fresh_runs: Arc<Fresh<TestRun>>,
    /// PrebuildPresets as last written, until the cache has them.
    pub fresh_presets: Arc<Fresh<PrebuildPreset>>,
    /// Pool VMs waiting for an assignment.
    pub agent_waiters: Arc<AgentWaiters>,
    /// Installation settings.
    pub settings: Settings,
    /// Token key.
    pub key: LeaseKey,
    /// What agents said.
    pub book: Arc<LeaseBook>,
    /// Pool VMs whose agent registered.
    pub pool: Arc<PoolBook>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Zones out of capacity.
    pub exhausted_zones: ExhaustedZones,
    /// Backoff after errors.
    pub backoff: Backoff,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// TestRun reconciles at once (launches first, then in arrival order).
    pub run_slots: Arc<Slots>,
    /// PrebuildPreset reconciles at once.
    pub preset_slots: Arc<Slots>,
}

/// When a reconcile that ended in a conflict looks again.
pub const CONFLICT_REQUEUE: Duration = Duration::from_secs(1);

/// A reconcile that ended in a conflict (someone wrote the object since it
/// was read, e.g. under a finalizer patch) is no failure to back off from:
/// it looks again in a second. A change that does not bump the generation
/// would wake nothing else.
pub fn conflict_is_no_failure(result: Result<Action, Error>) -> Result<Action, Error> {
    match result {
        Err(e) if e.is_conflict() => {
            tracing::debug!(error = %e, "the object changed since it was read; looking again in a second");
            Ok(Action::requeue(CONFLICT_REQUEUE))
        }
        other => other,
    }
}

/// Retries a failed reconcile with per-object exponential backoff.
pub fn error_policy<C: Compute>(run: Arc<TestRun>, error: &Error, ctx: Arc<Context<C>>) -> Action {
    let delay = ctx.backoff.delay(&format!("testrun/{}", run.uid().unwrap_or_default()));
    tracing::warn!(testrun = %run.name_any(), namespace = %run.namespace().unwrap_or_default(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Retries a failed preset reconcile with per-object exponential backoff.
pub fn preset_error_policy<C: Compute>(preset: Arc<PrebuildPreset>, error: &Error, ctx: Arc<Context<C>>) -> Action {
    let delay = ctx.backoff.delay(&format!("preset/{}", preset.uid().unwrap_or_default()));
    tracing::warn!(prebuildpreset = %preset.name_any(), namespace = %preset.namespace().unwrap_or_default(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Reads the lease key from its Secret, creating the Secret with a fresh
/// random key when it does not exist.
pub async fn lease_key(client: &Client, namespace: &str, name: &str) -> Result<LeaseKey, StartError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |source| StartError::Secret { namespace: namespace.into(), name: name.into(), source };
    let read = |secret: Secret| {
        secret
            .data
            .and_then(|d| d.get(SECRET_KEY).and_then(|b| LeaseKey::from_bytes(&b.0)))
            .ok_or_else(|| StartError::BadSecret { namespace: namespace.into(), name: name.into() })
    };
    if let Some(secret) = secrets.get_opt(name).await.map_err(err)? {
        return read(secret);
    }
    let key = LeaseKey::generate();
    let secret = Secret {
        metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
        data: Some([(SECRET_KEY.to_string(), ByteString(key.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, "created the lease key Secret");
            Ok(key)
        }
        // Another replica made it first: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => read(secrets.get(name).await.map_err(err)?),
        Err(e) => Err(err(e)),
    }
}

/// How to run the controller.
pub struct RunConfig {
    /// Where the agent API listens.
    pub agent_listen: SocketAddr,
    /// Reconciles at once.
    pub concurrency: u16,
    /// Namespace of the lease key Secret.
    pub namespace: String,
    /// Name of the lease key Secret.
    pub secret_name: String,
    /// Watch only this namespace.
    pub watch_namespace: Option<String>,
    /// The orphan scan.
    pub gc: gc::GcConfig,
    /// How the inventory lists.
    pub inventory: InventoryConfig,
    /// How patient the operation tracker is.
    pub patience: Patience,
    /// Operation reads at once.
    pub operation_reads: usize,
    /// Cloud calls (mutations) in flight at once.
    pub calls_in_flight: usize,
    /// The executable served to VMs at `/agent/v1/binary`.
    pub agent_binary: crate::agent::binary::AgentBinary,
    /// The agent Service's EndpointSlice this replica writes itself into
    /// once its agent API listens; None leaves routing to the caller.
    pub agent_endpoint: Option<crate::agent::endpoint::AgentEndpoint>,
}

/// Waits until a cache holds its first full list. The store's own wait
/// wakes only the last of several concurrent waiters, so this one asks again
/// every 100 ms instead of relying on being woken.
pub async fn cache_ready<K>(store: &Store<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    while tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await.is_err() {}
}

/// What wakes a reconcile from the watch: a new generation (a spec change)
/// or a deletion request. The controller's own status writes do not; what
/// happens to VMs and agents wakes objects directly.
fn trigger<K: Resource>(obj: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    obj.meta().generation.hash(&mut hasher);
    obj.meta().deletion_timestamp.is_some().hash(&mut hasher);
    Some(hasher.finish())
}

/// Cached objects keep no managed fields: they are never read, and they
/// are a large part of each object.
fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

impl<C: Compute> Context<C> {
    /// The VmClass of a VM shape asked for in `namespace` (its
    /// `className`, or the namespace's default class).
    pub fn class_of(&self, namespace: &str, vm: Option<&crate::api::VmSpec>) -> crate::api::vmclass::ClassChoice {
        crate::api::vmclass::resolve(vm.and_then(|v| v.class_name.as_deref()), namespace, &self.classes.state())
    }
}

/// Runs the TestRun and PrebuildPreset controllers, the inventory, the
/// operation tracker, the orphan scan and the agent API until SIGTERM or SIGINT.
pub async fn run<C: Compute + Clone>(
    client: Client,
    compute: C,
    settings: Settings,
    config: RunConfig,
    metrics: Arc<Metrics>,
) -> Result<(), StartError> {
    let runs_api: Api<TestRun> = match &config.watch_namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    runs_api.list(&kube::api::ListParams::default().limit(1)).await.map_err(StartError::Crd)?;
    let presets_api: Api<PrebuildPreset> = match &config.watch_namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    presets_api.list(&kube::api::ListParams::default().limit(1)).await.map_err(StartError::Crd)?;
    let classes_api: Api<crate::api::VmClass> = Api::all(client.clone());
    classes_api.list(&kube::api::ListParams::default().limit(1)).await.map_err(StartError::ClassCrd)?;
    let (gc_runs, gc_presets) = (runs_api.clone(), presets_api.clone());
    let key = lease_key(&client, &config.namespace, &config.secret_name).await?;
    let listener = tokio::net::TcpListener::bind(config.agent_listen)
        .await
        .map_err(|source| StartError::Listen { addr: config.agent_listen, source })?;
    let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel();
    let wake = futures::stream::unfold(wake_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let (pool_tx, pool_rx) = tokio::sync::mpsc::unbounded_channel();
    let pool_wake = futures::stream::unfold(pool_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let wakers = Wakers::new(wake_tx, pool_tx);
    let inventory = Inventory::new(installation_selector(&settings.installation), config.inventory, metrics.clone());
    let tracker = Tracker::new(
        compute.clone(),
        inventory.clone(),
        config.patience,
        config.calls_in_flight,
        config.operation_reads,
        metrics.clone(),
        wakers.as_owner_wake(),
    );
    let fresh_runs: Arc<Fresh<TestRun>> = Arc::new(Fresh::default());
    let fresh_presets: Arc<Fresh<PrebuildPreset>> = Arc::new(Fresh::default());
    let agent_waiters = Arc::new(AgentWaiters::default());

    let (runs, runs_writer) = reflector::store();
    let seen_runs = fresh_runs.clone();
    let waiting = agent_waiters.clone();
    let run_events = watcher::watcher(runs_api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(runs_writer)
        .applied_objects()
        .inspect_ok(move |run: &TestRun| {
            seen_runs.observed(run);
            let started = run.status.as_ref().and_then(|s| s.started.as_ref());
            if started.map_or(run.spec.preset_ref.is_some(), |s| s.preset_ref.is_some()) {
                for instance in run.status.iter().flat_map(|s| &s.shards).filter_map(|s| s.instance.as_deref()) {
                    waiting.notify(instance);
                }
            }
        })
        .predicate_filter(trigger, Default::default());
    // The runner starts every due reconcile at once; each waits for one of
    // `concurrency` slots (see `slots`).
    let runs_controller = Controller::for_stream(run_events, runs.clone())
        .with_config(ControllerConfig::default().concurrency(0))
        .reconcile_on(wake)
        .graceful_shutdown_on(crate::shutdown::requested());
    let (presets, presets_writer) = reflector::store();
    let seen_presets = fresh_presets.clone();
    let preset_events = watcher::watcher(presets_api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(presets_writer)
        .applied_objects()
        .inspect_ok(move |preset: &PrebuildPreset| seen_presets.observed(preset))
        .predicate_filter(trigger, Default::default());
    let presets_controller = Controller::for_stream(preset_events, presets.clone())
        .with_config(ControllerConfig::default().concurrency(0))
        .reconcile_on(pool_wake)
        .graceful_shutdown_on(crate::shutdown::requested());

    // VmClasses: cluster-scoped and few; every reconcile reads the cache.
    let (classes, classes_writer) = reflector::store();
    let class_events = watcher::watcher(classes_api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(classes_writer)
        .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(class_events);
        while let Some(event) = class_events.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching VmClasses");
            }
        }
    });
    // No reconcile starts before the classes are known: a class named but
    // not cached yet must not read as missing.
    tokio::select! {
        () = cache_ready(&classes) => {}
        () = crate::shutdown::requested() => return Ok(()),
    }
    let book = Arc::new(LeaseBook::default());
    let pool = Arc::new(PoolBook::default());
    let agent_api = Arc::new(AgentApi {
        key: key.clone(),
        runs: runs.clone(),
        fresh_runs: fresh_runs.clone(),
        presets: presets.clone(),
        fresh_presets: fresh_presets.clone(),
        book: book.clone(),
        pool: pool.clone(),
        wakers: wakers.clone(),
        agent_waiters: agent_waiters.clone(),
        metrics: metrics.clone(),
        build: config.agent_binary.sha256.clone(),
    });
    let agent_addr = listener.local_addr().unwrap_or(config.agent_listen);
    let (agent_binary, served_to) = (config.agent_binary.clone(), metrics.clone());
    tokio::spawn(async move {
        let routes = crate::agent::api::router(agent_api).merge(crate::agent::binary::router(agent_binary, served_to));
        if let Err(e) = axum::serve(listener, routes).await {
            tracing::error!(error = %e, "agent API stopped");
        }
    });
    // Only now, with the agent API listening, are VMs sent here.
    let reachable = config.agent_endpoint.clone().map(|endpoint| {
        let (first, written) = tokio::sync::oneshot::channel();
        tokio::spawn(endpoint.keep_published(client.clone(), first));
        written
    });
    tracing::info!(agent_api = %agent_addr, agent_url = %settings.agent_url, installation = %settings.installation, "controller starting");

    let inventory_task = tokio::spawn(inventory.clone().run(compute.clone(), wakers.as_owner_wake()));
    let tracker_task = tokio::spawn(tracker.clone().run());
    let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        inventory: inventory.clone(),
        tracker,
        wakers,
        runs: runs.clone(),
        presets: presets.clone(),
        classes: classes.clone(),
        fresh_runs,
        fresh_presets,
        agent_waiters,
        settings,
        key,
        book,
        pool,
        exhausted_zones: ExhaustedZones::new(Duration::from_secs(300)),
        backoff: Backoff::default(),
        metrics: metrics.clone(),
        run_slots: Slots::new(usize::from(config.concurrency)),
        preset_slots: Slots::new(usize::from(config.concurrency)),
    });
    let gc_task = tokio::spawn(gc::run(ctx.clone(), gc_runs, gc_presets, config.gc.clone()));
    let housekeeping_task = tokio::spawn(housekeeping::run(ctx.clone()));
    // On SIGTERM or Ctrl-C kube-runtime waits for every started reconcile;
    // those still waiting for a slot end at once instead of running in turn.
    let closing = (ctx.run_slots.clone(), ctx.preset_slots.clone());
    tokio::spawn(async move {
        crate::shutdown::requested().await;
        closing.0.close();
        closing.1.close();
    });
    // Ready once both caches are filled, the inventory has listed once and
    // (with an agent Service) VMs are sent here.
    let ready = metrics.clone();
    tokio::spawn(async move {
        // (The VmClass cache was filled before anything started.)
        cache_ready(&runs).await;
        cache_ready(&presets).await;
        inventory.wait_synced().await;
        if let Some(written) = reachable {
            // The writer never gives up; an error means the runtime ends.
            if written.await.is_err() {
                return;
            }
        }
        ready.set_ready();
        tracing::info!("caches filled, inventory listed and agents routed here: ready");
    });
    let runs_done =
        runs_controller.run(testrun::apply::reconcile, error_policy, ctx.clone()).for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        });
    let presets_done =
        presets_controller.run(prebuild::apply::reconcile, preset_error_policy, ctx).for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        });
    // The inventory, the tracker, the orphan scan and housekeeping run
    // forever; if one ends (it panicked), nothing would follow operations or
    // see VMs (or memory would grow) while /readyz stayed green, so the
    // process stops instead.
    let part_stopped = async {
        let (part, result) = tokio::select! {
            r = inventory_task => ("VM inventory", r),
            r = tracker_task => ("operation tracker", r),
            r = gc_task => ("orphan scan", r),
            r = housekeeping_task => ("housekeeping", r),
        };
        let why = match result {
            Err(e) if e.is_panic() => "it panicked".to_string(),
            Err(e) => e.to_string(),
            Ok(()) => "it returned".to_string(),
        };
        (part, why)
    };
    tokio::select! {
        _ = futures::future::join(runs_done, presets_done) => {
            tracing::info!("controller stopped");
            Ok(())
        }
        (part, why) = part_stopped => {
            tracing::error!(part, why = %why, "a part of the controller stopped; exiting");
            Err(StartError::Stopped(part, why))
        }
    }
}
