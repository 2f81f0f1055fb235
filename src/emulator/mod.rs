//! A local Compute Engine: the subset of the Compute Engine v1 REST API the
//! controller uses, faithful enough that the real `google-cloud-compute-v1`
//! client cannot tell it apart, plus a metadata server per VM and fault
//! injection.
//!
//! - [`api`]: the routes `instances.insert/get/list/delete/setLabels/aggregatedList`
//!   and `zoneOperations.get/wait`.
//! - [`lifecycle`]: operations moving PENDING → RUNNING → DONE and instances
//!   PROVISIONING → STAGING → RUNNING → STOPPING → gone, `maxRunDuration`.
//! - [`vm`] and [`metadata`]: a VM boots by running its `startup-script` as
//!   a local process group that reads its metadata from its own server.
//! - [`network`]: network interfaces, subnetworks and tags checked as
//!   Compute Engine checks them.
//! - [`faults`] and [`admin`]: seeded fault rules, set by flag or over HTTP
//!   at `/emulator/v1/faults`.

pub mod admin;
pub mod api;
pub mod error;
pub mod faults;
pub mod filter;
pub mod lifecycle;
pub mod metadata;
pub mod network;
pub mod state;
pub mod vm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use tokio::sync::Notify;

use faults::FaultRule;
use state::State;

/// How the emulator behaves.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// How long an operation takes from PENDING to DONE.
    pub operation_delay: Duration,
    /// How long a VM takes from RUNNING to starting its startup script.
    pub boot_delay: Duration,
    /// Longest time `zoneOperations.wait` waits.
    pub wait_timeout: Duration,
    /// Where VM folders (script, console log) are kept.
    pub work_dir: PathBuf,
    /// Seed for fault probabilities.
    pub fault_seed: u64,
    /// Fault rules active from the start.
    pub faults: Vec<FaultRule>,
    /// Scheduling niceness of VM processes (0 to 19): real VMs never take
    /// CPU from the controller; on one host, 19 comes closest.
    pub vm_nice: u8,
    /// How long a preempted Spot VM runs between its preemption notice
    /// (`instance/preempted` TRUE) and being stopped or deleted; 30 s on
    /// Compute Engine.
    pub preempt_notice: Duration,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            operation_delay: Duration::from_millis(500),
            boot_delay: Duration::from_millis(200),
            wait_timeout: Duration::from_secs(120),
            work_dir: std::env::temp_dir().join("testrun-emulator"),
            fault_seed: 0,
            faults: Vec::new(),
            vm_nice: 0,
            preempt_notice: Duration::from_secs(30),
        }
    }
}

/// The emulator's shared state.
pub struct Emulator {
    /// Its settings.
    pub config: EmulatorConfig,
    state: Mutex<State>,
    /// Signalled whenever an operation changes, for `zoneOperations.wait`.
    changed: Notify,
}

impl Emulator {
    /// A new emulator with the configured fault rules.
    pub fn new(config: EmulatorConfig) -> Arc<Self> {
        let mut state = State::new(config.fault_seed);
        for rule in config.faults.iter().cloned() {
            state.faults.add(rule);
        }
        Arc::new(Self { config, state: Mutex::new(state), changed: Notify::new() })
    }

    /// The state, locked. A panic while the lock was held cannot leave it
    /// half-written in a way later calls trip over, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every route: the Compute Engine API and the admin API.
    pub fn router(self: &Arc<Self>) -> Router {
        api::router(self.clone()).merge(admin::router(self.clone()))
    }

    /// Serves on `listener` until `shutdown` completes, then stops every VM.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        let result = axum::serve(listener, router).with_graceful_shutdown(shutdown).await;
        self.stop_all_vms();
        result
    }

    /// Kills every VM's processes at once.
    pub fn stop_all_vms(&self) {
        let mut state = self.lock();
        for record in state.instances.values_mut() {
            if let Some(process) = record.process.take() {
                process.kill_now();
            }
        }
    }
}

/// Starts an emulator on `addr` in the background (for tests and local
/// runs) and returns its address.
pub async fn spawn(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<(SocketAddr, Arc<Emulator>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let emulator = Emulator::new(config);
    let serving = emulator.clone();
    tokio::spawn(async move {
        if let Err(e) = serving.serve(listener, std::future::pending()).await {
            tracing::error!(error = %e, "emulator stopped");
        }
    });
    Ok((local, emulator))
}
