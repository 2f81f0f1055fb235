//! The `testrun-controller` binary: flags in, one subcommand out.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use testrun_controller::api::duration::parse_flag as duration;
use testrun_controller::compute::naming::default_installation_id;
use testrun_controller::emulator::faults::FaultRule;
use testrun_controller::emulator::{Emulator, EmulatorConfig};
use testrun_controller::telemetry::{self, LogFormat};

/// Runs CI test jobs on ephemeral Compute Engine VMs and keeps warm pools of
/// prebuilt VMs, driven by TestRun and PrebuildPreset custom resources.
#[derive(Parser)]
#[command(name = "testrun-controller", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the TestRun and PrebuildPreset CustomResourceDefinitions as
    /// multi-document YAML (the content of `crds/`).
    Crdgen {
        /// Write one file per CRD into this folder (e.g. `crds/`) instead of
        /// printing them.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Run the local Compute Engine emulator: the Compute Engine v1 REST API
    /// subset the controller uses, VMs that run their startup script as
    /// local processes, per-VM metadata servers, and fault injection.
    Emulator(EmulatorArgs),
    /// Run the controller: reconcile TestRuns and PrebuildPresets, create,
    /// claim and delete their VMs, scan for orphaned VMs, and serve the agent
    /// API that VMs report to and the metrics.
    Run(Box<RunArgs>),
    /// Run the agent on a VM: read settings from the metadata server,
    /// register, run the assigned command with heartbeats, report the result.
    /// Started by the startup script the controller gives every VM.
    Agent {
        /// Log format.
        #[arg(long, value_enum, env = "TESTRUN_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Compute API endpoint, e.g. `http://127.0.0.1:8089` for the emulator
    /// (reached with anonymous credentials). Unset: Compute Engine with
    /// application default credentials.
    #[arg(long, env = "TESTRUN_COMPUTE_ENDPOINT")]
    compute_endpoint: Option<String>,
    /// Google Cloud project that holds the VMs. Required without
    /// `--compute-endpoint`; any id works with the emulator.
    #[arg(long, env = "TESTRUN_PROJECT")]
    project: Option<String>,
    /// Id of this installation, put on every VM as label `installation`; two
    /// installations sharing a project never touch each other's VMs.
    /// Default: the controller's namespace (`--namespace`), followed by
    /// `_<namespace>` with `--watch-namespace`, so two installations in one
    /// cluster never share it. Set it when clusters share a project.
    #[arg(long, env = "TESTRUN_INSTALLATION_ID")]
    installation_id: Option<String>,
    /// Address the agent API listens on.
    #[arg(long, env = "TESTRUN_AGENT_LISTEN", default_value = "0.0.0.0:8090")]
    agent_listen: SocketAddr,
    /// Address serving Prometheus metrics (`/metrics`) and health
    /// (`/healthz`, `/readyz`).
    #[arg(long, env = "TESTRUN_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Time between orphan scans (VMs of this installation that no live
    /// TestRun or PrebuildPreset owns).
    #[arg(long, env = "TESTRUN_GC_INTERVAL", default_value = "2m", value_parser = duration)]
    gc_interval: Duration,
    /// VMs younger than this are never taken for orphans.
    #[arg(long, env = "TESTRUN_GC_GRACE", default_value = "5m", value_parser = duration)]
    gc_grace: Duration,
    /// Only log and count what the orphan scan would mark and delete.
    #[arg(long, env = "TESTRUN_GC_DRY_RUN")]
    gc_dry_run: bool,
    /// URL VMs use to reach the agent API, e.g. `http://10.128.0.5:8090`
    /// (an internal load balancer in front of the agent port). Required with
    /// Compute Engine; with `--compute-endpoint` the default is
    /// `http://127.0.0.1:PORT` with the port of `--agent-listen`.
    #[arg(long, env = "TESTRUN_AGENT_URL")]
    agent_url: Option<String>,
    /// Agent Service to send VMs through: the replica that leads writes its
    /// address (`--agent-address` and the port of `--agent-listen`) into
    /// this Service's EndpointSlice `<service>-leader` in `--namespace`, so
    /// a Service without a selector routes every VM to the leader alone.
    /// The chart's agent Service. Without it, routing is up to you.
    #[arg(long, env = "TESTRUN_AGENT_SERVICE")]
    agent_service: Option<String>,
    /// This replica's address in that EndpointSlice: its pod IP. Default:
    /// the address of `--agent-listen`, unless that is 0.0.0.0 or ::.
    #[arg(long, env = "POD_IP")]
    agent_address: Option<std::net::IpAddr>,
    /// Command the VM startup script runs (followed by `agent`), for images
    /// that carry the agent already. Default: the startup script fetches
    /// this controller's own executable from the agent API
    /// (`GET /agent/v1/binary`), checks its sha256 and runs it.
    #[arg(long, env = "TESTRUN_AGENT_COMMAND")]
    agent_command: Option<String>,
    /// Watch TestRuns in this namespace only (default: all namespaces).
    #[arg(long, env = "TESTRUN_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the Secret holding the lease token key (created when
    /// missing).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Name of that Secret.
    #[arg(long, env = "TESTRUN_LEASE_SECRET", default_value = "testrun-controller-lease-key")]
    lease_secret: String,
    /// Longest time from requesting a VM to its agent registering before
    /// the attempt counts as failed.
    #[arg(long, default_value = "10m", value_parser = duration)]
    registration_timeout: Duration,
    /// First wait before retrying a failed VM delete; it doubles with every
    /// try, up to 5 minutes. After 5 failed tries the owner shows a
    /// DeletionFailing condition.
    #[arg(long, default_value = "2s", value_parser = duration)]
    delete_retry_base: Duration,
    /// Compute API calls per second in each of Compute Engine's quota
    /// classes (mutations, reads, operation reads), each limited on its own,
    /// as Compute Engine counts them (its default quota is 1,500 calls a
    /// minute per class and project). The next three flags set one class.
    #[arg(long, env = "TESTRUN_COMPUTE_QPS", default_value_t = 20)]
    compute_qps: u32,
    /// Inserts, deletes and label changes per second (default: --compute-qps).
    #[arg(long, env = "TESTRUN_COMPUTE_MUTATION_QPS")]
    compute_mutation_qps: Option<u32>,
    /// Instance gets and lists per second (default: --compute-qps).
    #[arg(long, env = "TESTRUN_COMPUTE_READ_QPS")]
    compute_read_qps: Option<u32>,
    /// Operation reads per second (default: --compute-qps).
    #[arg(long, env = "TESTRUN_COMPUTE_OPERATION_READ_QPS")]
    compute_operation_read_qps: Option<u32>,
    /// Time between lists of every VM of the installation while any exists
    /// (the inventory); with none, only the orphan scan lists, every
    /// --gc-interval. Reconciles never list. At least 1s.
    #[arg(long, env = "TESTRUN_INVENTORY_RESYNC", default_value = "30s", value_parser = duration)]
    inventory_resync: Duration,
    /// Longest time a cloud operation is followed; one still unfinished
    /// then is settled by looking at its VM (a delete whose VM is gone is
    /// done, otherwise it is made again; an insert whose VM exists is done).
    /// At least 4s.
    #[arg(long, env = "TESTRUN_OPERATION_TIMEOUT", default_value = "10m", value_parser = duration)]
    operation_timeout: Duration,
    /// Compute mutations (insert, delete, setLabels) in flight at once.
    #[arg(long, env = "TESTRUN_COMPUTE_MAX_MUTATIONS", default_value_t = 32)]
    compute_max_mutations: usize,
    /// Reconciles at once, per kind. Waiting ones start in arrival order,
    /// TestRuns that asked for no VM yet first. A reconcile mostly waits on
    /// the API server, over a connection of its own (HTTP/1.1): more at
    /// once hold more connections and their buffers, and queue inside the
    /// API server instead of here (24 converged 1,000 runs sooner than 64,
    /// in 15% less memory).
    #[arg(long, env = "TESTRUN_CONCURRENCY", default_value_t = 24)]
    concurrency: u16,
    /// Elect a leader among replicas on a `coordination.k8s.io` Lease in
    /// `--namespace`: only the leader reconciles, scans for orphans and
    /// serves agents (see `--agent-service`); the others stand by, ready,
    /// with `standby` on `/readyz`. A leader that cannot renew for
    /// `--leader-elect-renew-deadline` exits.
    #[arg(long, env = "TESTRUN_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "TESTRUN_LEADER_ELECT_LEASE", default_value = "testrun-controller")]
    leader_elect_lease: String,
    /// How long a leader Lease stays valid without renewal: the longest
    /// time a standby waits after the leader died.
    #[arg(long, default_value = "15s", value_parser = duration)]
    leader_elect_lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    #[arg(long, default_value = "10s", value_parser = duration)]
    leader_elect_renew_deadline: Duration,
    /// Time between tries to take or renew the Lease.
    #[arg(long, default_value = "2s", value_parser = duration)]
    leader_elect_retry_period: Duration,
    /// Longest wait, after SIGTERM, for reconciles under way to finish
    /// before the process hands over (empties the agent EndpointSlice,
    /// gives the Lease up) and exits. Keep it some seconds below the pod's
    /// termination grace period, so the hand-over happens before SIGKILL.
    #[arg(long, env = "TESTRUN_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = duration)]
    shutdown_timeout: Duration,
    /// `/healthz` fails once a reconcile has been under way this long: the
    /// controller is wedged, and the kubelet restarts it. Each request to
    /// the kube-apiserver gives up after 295 s without an answer; keep this
    /// above a few of those in a row (a reconcile makes several requests).
    #[arg(long, env = "TESTRUN_WEDGED_AFTER", default_value = "15m", value_parser = positive_duration)]
    wedged_after: Duration,
    /// Log format.
    #[arg(long, value_enum, env = "TESTRUN_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Args)]
struct EmulatorArgs {
    /// Address to serve the Compute Engine API and the admin API
    /// (`/emulator/v1/...`) on. Any project id is accepted; point clients at
    /// `http://ADDR`. Port 0 picks a free port; the address is printed on
    /// stdout as `listening on http://ADDR`.
    #[arg(long, env = "TESTRUN_EMULATOR_LISTEN", default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// Time an operation takes from PENDING to DONE (`0` for instant).
    #[arg(long, env = "TESTRUN_EMULATOR_OPERATION_DELAY", default_value = "500ms", value_parser = duration)]
    operation_delay: Duration,
    /// Time a VM takes from RUNNING to starting its startup script.
    #[arg(long, env = "TESTRUN_EMULATOR_BOOT_DELAY", default_value = "200ms", value_parser = duration)]
    boot_delay: Duration,
    /// Longest time `zoneOperations.wait` blocks (Compute Engine: 2 minutes).
    #[arg(long, default_value = "2m", value_parser = duration)]
    wait_timeout: Duration,
    /// Folder for VM files (startup script, console.log per VM).
    #[arg(long, env = "TESTRUN_EMULATOR_WORK_DIR", default_value_os_t = std::env::temp_dir().join("testrun-emulator"))]
    work_dir: PathBuf,
    /// A fault rule, repeatable: comma-separated `key=value` pairs with
    /// `kind` (capacity, quota, rateLimit, unavailable, slow, fail, hang,
    /// vanish, lostAnswer, unreachable, preempt) and optional `call`
    /// (insert, delete, get, list, aggregatedList, setLabels, operationGet,
    /// operationWait), `zone`, `count`, `probability` (0..1) and `delayMs`
    /// (for slow; for preempt, how long after booting a Spot VM it drew is
    /// preempted). Example:
    /// `--fault call=insert,zone=us-central1-a,kind=capacity,count=2`.
    #[arg(long = "fault", value_name = "RULE")]
    faults: Vec<FaultRule>,
    /// Niceness (0 to 19) of the VMs' processes. Real VMs never take CPU
    /// from the controller; 19 comes closest on one host (the scale
    /// benchmark uses it).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=19))]
    vm_nice: u8,
    /// How long a preempted Spot VM runs after its notice
    /// (`instance/preempted` TRUE in its metadata) before it is stopped, or
    /// deleted with `instanceTerminationAction: DELETE`.
    #[arg(long, default_value = "30s", value_parser = duration)]
    preempt_notice: Duration,
    /// Seed for fault probabilities, so a run is repeatable.
    #[arg(long, default_value_t = 0)]
    fault_seed: u64,
    /// Log format.
    #[arg(long, value_enum, env = "TESTRUN_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { out_dir: None } => crdgen(),
        Command::Crdgen { out_dir: Some(dir) } => crdgen_to(&dir),
        Command::Emulator(args) => run_async(emulator(args)),
        Command::Run(args) => {
            keep_freed_memory_small();
            run_controller(*args)
        }
        Command::Agent { log_format } => {
            use testrun_controller::agent::protocol::STALE_BUILD_EXIT;
            use testrun_controller::agent::runner::AgentError;
            telemetry::init(log_format);
            // A startup script that fetched the agent waits for it (to fetch
            // another build when it is refused as stale); the agent ends
            // with that script, by SIGTERM, so it stops its command too.
            #[cfg(target_os = "linux")]
            if let Some(parent) =
                std::env::var(testrun_controller::agent::protocol::PARENT_ENV).ok().and_then(|p| p.parse::<i32>().ok())
            {
                if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
                    tracing::warn!(error = %e, "the agent will outlive its startup script");
                }
                if nix::unistd::getppid().as_raw() != parent {
                    tracing::error!("the startup script that started the agent is gone");
                    return ExitCode::from(1);
                }
            }
            let mut stale = false;
            // One thread: a VM's agent waits on a child process and makes a
            // few requests; worker threads would only cost start-up time.
            let code = run_on(tokio::runtime::Builder::new_current_thread(), async {
                match testrun_controller::agent::runner::run().await {
                    Ok(code) => {
                        tracing::info!(exit_code = code, "result acknowledged");
                        Ok(())
                    }
                    Err(e @ AgentError::StaleBuild(_)) => {
                        stale = true;
                        Err(format!("agent: {e}"))
                    }
                    Err(e) => Err(format!("agent: {e}")),
                }
            });
            if stale { ExitCode::from(STALE_BUILD_EXIT) } else { code }
        }
    }
}

/// glibc serves blocks of 128 KiB and more (list pages, large bodies, hash
/// tables growing) with mmap, but raises that threshold to the largest block
/// freed so far; after a burst such blocks then come from the heap and stay
/// resident once freed. A fixed threshold returns them to the system, and
/// the heap top is trimmed past 256 KiB: under a burst of 1,000 runs the
/// controller's peak RSS is about 1.3 MiB lower.
fn keep_freed_memory_small() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
    }
}

fn run_async(task: impl Future<Output = Result<(), String>>) -> ExitCode {
    run_on(tokio::runtime::Builder::new_multi_thread(), task)
}

fn run_on(builder: tokio::runtime::Builder, task: impl Future<Output = Result<(), String>>) -> ExitCode {
    match runtime(builder) {
        Ok(runtime) => exit_code(runtime.block_on(task)),
        Err(code) => code,
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("testrun-controller: starting the async runtime: {e}");
        ExitCode::FAILURE
    })
}

fn exit_code(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testrun-controller: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn emulator(args: EmulatorArgs) -> Result<(), String> {
    telemetry::init(args.log_format);
    std::fs::create_dir_all(&args.work_dir).map_err(|e| format!("creating {}: {e}", args.work_dir.display()))?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("listening on {}: {e}", args.listen))?;
    let config = EmulatorConfig {
        operation_delay: args.operation_delay,
        boot_delay: args.boot_delay,
        wait_timeout: args.wait_timeout,
        work_dir: args.work_dir,
        fault_seed: args.fault_seed,
        faults: args.faults,
        vm_nice: args.vm_nice,
        preempt_notice: args.preempt_notice,
    };
    let local = listener.local_addr().map_err(|e| format!("reading the listening address: {e}"))?;
    tracing::info!(listen = %local, faults = config.faults.len(), "compute emulator serving");
    // One line on stdout with the address, for scripts that start it on port 0.
    println!("listening on http://{local}");
    Emulator::new(config)
        .serve(listener, testrun_controller::shutdown::requested())
        .await
        .map_err(|e| format!("serving: {e}"))
}

/// `run`, given at most `timeout` after a stop was requested to finish.
async fn within_shutdown_timeout<E>(run: impl Future<Output = Result<(), E>>, timeout: Duration) -> Result<(), E> {
    let give_up = async {
        testrun_controller::shutdown::requested().await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        ran = run => ran,
        () = give_up => {
            tracing::warn!(?timeout, "stopping before every reconcile finished");
            Ok(())
        }
    }
}

/// What a process that led does once its runtime stopped: nothing of it
/// acts any more, so the Lease may be given up.
struct Handover {
    /// The Lease to give up; None without leader election.
    election: Option<testrun_controller::leader::ElectionConfig>,
    /// The EndpointSlice to empty first, when one was written.
    endpoint: Option<testrun_controller::agent::endpoint::AgentEndpoint>,
    fence: std::sync::Arc<testrun_controller::leader::Fence>,
}

/// Runs the controller; a leader gives its Lease up only after every task
/// of its runtime has stopped (at most 2 s after the controllers ended).
fn run_controller(args: RunArgs) -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let mut handover = None;
    let result = runtime.block_on(controller(args, &mut handover));
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Some(Handover { election, endpoint, fence }) = handover {
        fence.disarm();
        // The reported outcome is the controller's; handing over only logs.
        let _ = run_on(tokio::runtime::Builder::new_current_thread(), async {
            let client = kube_client().await.map_err(|e| format!("connecting to Kubernetes to hand over: {e}"))?;
            // While the Lease is still ours no one else wrote the slice.
            if let Some(endpoint) = endpoint.filter(|_| fence.holds()) {
                endpoint.withdraw(&client).await;
            }
            if let Some(election) = election {
                let mut elector =
                    testrun_controller::leader::Elector::new(client, election, fence).map_err(|e| e.to_string())?;
                elector.release().await;
            }
            Ok(())
        });
    }
    exit_code(result)
}

async fn controller(mut args: RunArgs, handover: &mut Option<Handover>) -> Result<(), String> {
    use testrun_controller::agent::binary::AgentBinary;
    use testrun_controller::agent::startup::{AgentLaunch, startup_script};
    use testrun_controller::compute::gce::{GceCompute, GceConfig};
    use testrun_controller::controller::testrun::plan::Settings;
    use testrun_controller::controller::{RunConfig, run};
    use testrun_controller::leader::{self, ElectionConfig, Elector, Fence};

    telemetry::init(args.log_format);
    // From here on no SIGTERM goes unnoticed, whatever is running.
    testrun_controller::shutdown::listen();
    let project = match (&args.project, &args.compute_endpoint) {
        (Some(project), _) => project.clone(),
        (None, Some(_)) => "local".to_string(),
        (None, None) => {
            return Err("--project is required when talking to Compute Engine (no --compute-endpoint)".into());
        }
    };
    let mut gce = GceConfig::new(project);
    gce.endpoint = args.compute_endpoint.clone();
    let compute = GceCompute::connect(gce).await.map_err(|e| e.to_string())?;
    let metrics = std::sync::Arc::new(testrun_controller::metrics::Metrics::new());
    metrics.liveness.set_wedged_after(args.wedged_after);
    let rates = testrun_controller::compute::limit::Rates {
        mutations: args.compute_mutation_qps.unwrap_or(args.compute_qps),
        reads: args.compute_read_qps.unwrap_or(args.compute_qps),
        operation_reads: args.compute_operation_read_qps.unwrap_or(args.compute_qps),
    };
    let fence = if args.leader_elect { Fence::closed() } else { Fence::open() };
    let compute =
        testrun_controller::compute::limit::Limited::new(compute, rates, args.compute_max_mutations, metrics.clone())
            .with_fence(fence.clone());
    // kube's own client: HTTP/1.1 over a pool of connections. Measured
    // against HTTP/2 to the same kube-apiserver, a burst of writes finished
    // sooner over HTTP/1.1 (README, "Scale").
    let client = kube_client().await.map_err(|e| format!("connecting to Kubernetes: {e}"))?;
    let agent_url = match (args.agent_url.clone().filter(|url| !url.is_empty()), &args.compute_endpoint) {
        (Some(url), _) => url,
        (None, Some(_)) => format!("http://127.0.0.1:{}", args.agent_listen.port()),
        (None, None) => {
            return Err("--agent-url is required with Compute Engine (no --compute-endpoint): the URL VMs reach \
                        the agent API at, such as http://10.128.0.5:8090 or an internal load balancer's address"
                .into());
        }
    };
    match reqwest::Url::parse(&agent_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
        Ok(_) => return Err(format!("--agent-url {agent_url:?} is not an http:// or https:// URL with a host")),
        Err(e) => return Err(format!("--agent-url {agent_url:?} is not a URL: {e}")),
    }
    let binary = tokio::task::spawn_blocking(AgentBinary::this_process)
        .await
        .map_err(|e| format!("hashing this executable: {e}"))?
        .map_err(|e| e.to_string())?;
    let launch = match args.agent_command.clone().filter(|command| !command.is_empty()) {
        Some(command) => AgentLaunch::Command(command),
        None => AgentLaunch::Fetch { agent_url: agent_url.clone(), sha256: binary.sha256.clone(), size: binary.len },
    };
    let agent_endpoint = match args.agent_service.clone().filter(|service| !service.is_empty()) {
        None => None,
        Some(service) => {
            let listen = args.agent_listen.ip();
            let address = args.agent_address.or((!listen.is_unspecified()).then_some(listen)).ok_or_else(|| {
                format!(
                    "--agent-service {service} needs --agent-address (or POD_IP): the address VMs are sent to, \
                     since --agent-listen {} names no single address",
                    args.agent_listen
                )
            })?;
            if args.agent_listen.port() == 0 {
                return Err(format!("--agent-service {service} needs a fixed port in --agent-listen, not 0"));
            }
            Some(testrun_controller::agent::endpoint::AgentEndpoint {
                namespace: args.namespace.clone(),
                service,
                address,
                port: args.agent_listen.port(),
                pod: std::env::var("POD_NAME").ok().filter(|name| !name.is_empty()),
                node: std::env::var("NODE_NAME").ok().filter(|name| !name.is_empty()),
                fence: fence.clone(),
                beta: std::sync::Arc::default(),
            })
        }
    };
    // An empty namespace (e.g. an unset chart value) means all namespaces.
    args.watch_namespace = args.watch_namespace.take().filter(|ns| !ns.is_empty());
    let settings = Settings {
        installation: args
            .installation_id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| default_installation_id(&args.namespace, args.watch_namespace.as_deref())),
        agent_url,
        startup_script: startup_script(&launch).into(),
        registration_timeout: args.registration_timeout,
        delete_retry_base: args.delete_retry_base.max(Duration::from_millis(10)),
        started_at: jiff::Timestamp::now(),
    };
    let config = RunConfig {
        agent_listen: args.agent_listen,
        concurrency: args.concurrency.max(1),
        namespace: args.namespace,
        secret_name: args.lease_secret,
        watch_namespace: args.watch_namespace.clone(),
        gc: testrun_controller::controller::gc::GcConfig {
            interval: args.gc_interval.max(Duration::from_millis(100)),
            grace: args.gc_grace,
            dry_run: args.gc_dry_run,
            scope: args.watch_namespace.clone(),
        },
        inventory: testrun_controller::inventory::InventoryConfig {
            resync: args.inventory_resync.max(Duration::from_secs(1)),
            ..Default::default()
        },
        patience: testrun_controller::tracker::decide::Patience {
            deadline: args.operation_timeout.max(Duration::from_secs(4)),
            ..Default::default()
        },
        operation_reads: 16,
        calls_in_flight: args.compute_max_mutations.max(1),
        agent_binary: binary,
        agent_endpoint: agent_endpoint.clone(),
    };
    let metrics_addr = testrun_controller::metrics::serve(args.metrics_listen, metrics.clone())
        .await
        .map_err(|e| format!("serving metrics on {}: {e}", args.metrics_listen))?;
    tracing::info!(metrics = %metrics_addr, "serving metrics and health");
    if !args.leader_elect {
        *handover = Some(Handover { election: None, endpoint: agent_endpoint, fence });
        metrics.set_leading();
        let ran = within_shutdown_timeout(run(client, compute, settings, config, metrics), args.shutdown_timeout);
        return ran.await.map_err(|e| e.to_string());
    }
    let election = ElectionConfig {
        namespace: config.namespace.clone(),
        name: args.leader_elect_lease.clone(),
        identity: leader::identity(),
        lease_duration: args.leader_elect_lease_duration,
        renew_deadline: args.leader_elect_renew_deadline,
        retry_period: args.leader_elect_retry_period,
    };
    let mut elector = Elector::new(client.clone(), election.clone(), fence.clone()).map_err(|e| e.to_string())?;
    // Ready as a standby once the Lease could be read.
    let standby = metrics.clone();
    let won = tokio::select! {
        won = elector.acquire(move || standby.set_standby()) => won,
        () = testrun_controller::shutdown::requested() => return Ok(()),
    };
    // From here on, a stop hands the Lease over (after the runtime stopped).
    *handover = Some(Handover { election: Some(election), endpoint: agent_endpoint, fence });
    metrics.set_leading();
    let outcome = tokio::select! {
        ran = within_shutdown_timeout(run(client, compute, settings, config, metrics), args.shutdown_timeout) => Ok(ran),
        lost = elector.keep(won) => Err(lost),
    };
    match outcome {
        Ok(ran) => ran.map_err(|e| e.to_string()),
        // Everything this process did as the leader stops with it; the
        // Lease is someone else's or lapses.
        Err(lost) => {
            // Nothing acts from here on: no Compute Engine call, no
            // EndpointSlice write.
            if let Some(Handover { fence, .. }) = handover.take() {
                fence.revoke();
            }
            tracing::error!(error = %lost, "stopping: this replica lost the leader Lease");
            Err(lost.to_string())
        }
    }
}

fn crdgen() -> ExitCode {
    match testrun_controller::crd::all_yaml() {
        Ok(yaml) => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(yaml.as_bytes()).and_then(|()| out.flush()) {
                eprintln!("testrun-controller crdgen: writing to stdout: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("testrun-controller crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn crdgen_to(dir: &std::path::Path) -> ExitCode {
    for generated in testrun_controller::crd::all() {
        let path = dir.join(generated.file_name);
        let written = testrun_controller::crd::to_yaml(&generated.crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display())));
        if let Err(e) = written {
            eprintln!("testrun-controller crdgen: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// The Kubernetes client: the inferred config (in-cluster, else
/// KUBECONFIG) with a read timeout, so a request the apiserver never
/// answers ends in an error instead of holding its reconcile forever.
/// Watches are unaffected: the apiserver ends each within 290 s.
async fn kube_client() -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    config.read_timeout = Some(Duration::from_secs(295));
    // The timeout counts from the request, not from when its pooled
    // connection went idle.
    config.reset_reader_on_write = true;
    kube::Client::try_from(config)
}

/// A duration flag that must be more than zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        d if d.is_zero() => Err("must be more than 0".to_string()),
        d => Ok(d),
    }
}
