//! Two controller processes with `--leader-elect` against the real
//! kube-apiserver: one leads, the other stands by (not ready). Agents reach
//! them through a proxy that forwards to whichever reports ready on
//! `/readyz`, as a Service with a readiness probe does. The leader is
//! killed with SIGKILL while every shard runs: the standby takes over, and
//! the run finishes with every result, on its first VMs, with no VM made
//! twice.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

/// Forwards connections to the agent port of the first controller whose
/// `/readyz` answers 200; refuses them while none does.
struct ReadinessProxy {
    port: u16,
}

impl ReadinessProxy {
    async fn start(backends: Arc<std::sync::Mutex<Vec<(u16, u16)>>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let target = Arc::new(AtomicU16::new(0));
        let probing = target.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().expect("client");
            loop {
                let candidates = backends.lock().expect("backends").clone();
                let mut ready = 0;
                for (agent, metrics) in candidates {
                    let url = format!("http://127.0.0.1:{metrics}/readyz");
                    if http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                        ready = agent;
                        break;
                    }
                }
                probing.store(ready, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                let backend = target.load(Ordering::Relaxed);
                if backend == 0 {
                    continue; // dropped: no ready endpoint
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port }
    }
}

async fn wait_readyz(controller: &ControllerProcess, want: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while controller.readyz().await != Some(want) {
        assert!(Instant::now() < deadline, "{what}; log:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn holder(leases: &Api<Lease>) -> (Option<String>, i32) {
    let lease = leases.get("testrun-controller").await.expect("the leader Lease");
    let spec = lease.spec.unwrap_or_default();
    (spec.holder_identity, spec.lease_transitions.unwrap_or(0))
}

#[tokio::test]
async fn the_standby_takes_over_a_killed_leader_and_the_run_loses_no_result_and_makes_no_vm_twice() {
    let (client, ns) = common::setup("leader").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let backends = Arc::new(std::sync::Mutex::new(Vec::new()));
    let proxy = ReadinessProxy::start(backends.clone()).await;
    let agent_url = format!("http://127.0.0.1:{}", proxy.port);
    let args = ["--leader-elect", "--agent-url", &agent_url];
    let kubeconfig = common::control_plane_kubeconfig();

    let mut first = ControllerProcess::start(kubeconfig.clone(), &ns, &emulator.url, &args);
    backends.lock().expect("backends").push((first.agent_port, first.metrics_port));
    wait_readyz(&first, 200, "the first controller never led").await;
    let mut second = ControllerProcess::start(kubeconfig.clone(), &ns, &emulator.url, &args);
    backends.lock().expect("backends").push((second.agent_port, second.metrics_port));
    wait_readyz(&second, 503, "the second controller never stood by").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let (leader, transitions) = holder(&leases).await;
    let leader = leader.expect("a holder");
    assert_eq!(transitions, 0);
    assert!(second.metrics().await.contains("testrun_controller_leader 0"));
    assert!(first.metrics().await.contains("testrun_controller_leader 1"));
    // A standby serves no agent: nothing listens on its agent port.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", second.agent_port)).await.is_err());

    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    common::create_shell_run(&runs, "across-failover", 3, "sleep 8; echo done $TESTRUN_SHARD").await;

    // Every shard's agent registered with the leader: kill it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = runs.get("across-failover").await.expect("get");
        let shards = run.status.map(|s| s.shards).unwrap_or_default();
        if shards.len() == 3 && shards.iter().all(|s| s.phase == TestRunPhase::Running && s.lease_id > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "the shards never all ran; log:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill_hard();
    let killed = Instant::now();
    wait_readyz(&second, 200, "the standby never took over").await;
    let took_over = killed.elapsed();
    eprintln!("failover: the standby was ready {:.1} s after the leader was killed", took_over.as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs(90);
    let finished = loop {
        let run = runs.get("across-failover").await.expect("get");
        if run.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_finished()) {
            break run;
        }
        assert!(Instant::now() < deadline, "the run never finished; log:\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = finished.status.expect("status");
    assert_eq!(status.phase, Some(TestRunPhase::Succeeded), "{status:?}\n{}", second.log());
    for shard in &status.shards {
        assert_eq!(shard.attempt, 1, "shard {} needed another attempt: {status:?}", shard.index);
        let result = shard.result.as_ref().expect("a result");
        assert_eq!(result.output_tail.trim(), format!("done {}", shard.index));
    }
    // Exactly the three VMs of the first attempts were ever made.
    let history: serde_json::Value = reqwest::get(format!("{}/emulator/v1/history", emulator.url))
        .await
        .expect("history")
        .json()
        .await
        .expect("JSON");
    let made: Vec<&str> = history
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["labels"]["installation"] == ns.as_str())
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(made.len(), 3, "VMs made: {made:?}");
    let (now_leader, transitions) = holder(&leases).await;
    assert!(now_leader.as_deref().is_some_and(|h| h != leader), "{now_leader:?} still {leader}");
    assert_eq!(transitions, 1);

    // A leader stopped with SIGTERM gives the Lease up on its way out.
    second.terminate();
    assert!(second.log().contains("gave up the leader Lease"), "{}", second.log());
    let (after, _) = holder(&leases).await;
    assert_eq!(after, None, "the Lease still names a holder after a graceful stop");
    drop(first);
}

/// A TCP proxy to the kube-apiserver that can be cut: every connection
/// through it is dropped and new ones are refused, as a network partition
/// between one replica and the API server would.
struct Partition {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Partition {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (cut, watching) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                let mut cut = watching.clone();
                if *cut.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }
}

/// The time of the first log line containing `what` (RFC 3339, UTC).
fn logged_at(log: &str, what: &str) -> Option<jiff::Timestamp> {
    let line = log.lines().find(|l| l.contains(what))?;
    let plain: String = line.split('\u{1b}').map(|part| part.split_once('m').map_or(part, |(_, rest)| rest)).collect();
    plain.split_whitespace().find_map(|word| word.parse::<jiff::Timestamp>().ok())
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_before_the_standby_takes_over() {
    let (client, ns) = common::setup("leader-cut").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let admin = std::fs::read_to_string(common::control_plane_kubeconfig()).expect("kubeconfig");
    let mut config: serde_json::Value = serde_norway::from_str(&admin).expect("kubeconfig YAML");
    let server = config["clusters"][0]["cluster"]["server"].as_str().expect("server").to_string();
    let upstream: std::net::SocketAddr =
        server.trim_start_matches("https://").parse().expect("the API server's address");
    let partition = Partition::start(upstream).await;
    config["clusters"][0]["cluster"]["server"] = json!(format!("https://127.0.0.1:{}", partition.port));
    let through_partition = std::env::temp_dir().join(format!("kubeconfig-{ns}"));
    std::fs::write(&through_partition, serde_norway::to_string(&config).expect("YAML")).expect("kubeconfig");

    let mut first = ControllerProcess::start(through_partition, &ns, &emulator.url, &["--leader-elect"]);
    wait_readyz(&first, 200, "the first controller never led").await;
    let second = ControllerProcess::start(common::control_plane_kubeconfig(), &ns, &emulator.url, &["--leader-elect"]);
    wait_readyz(&second, 503, "the second controller never stood by").await;

    partition.cut.send_replace(true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = first.exit_code() {
            break code;
        }
        assert!(Instant::now() < deadline, "the cut-off leader kept running; log:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, Some(1), "{}", first.log());
    wait_readyz(&second, 200, "the standby never took over").await;

    // The old leader stopped before the new one began (one clock: this machine's).
    let first_log = first.log();
    let stopped = logged_at(&first_log, "stopping: ")
        .unwrap_or_else(|| panic!("no line says why the leader stopped:\n{first_log}"));
    let second_log = second.log();
    let began = logged_at(&second_log, "became the leader").expect("the standby says it leads");
    assert!(stopped < began, "the old leader stopped at {stopped}, after the new one began at {began}");
    let leases: Api<Lease> = Api::namespaced(client, &ns);
    let (_, transitions) = holder(&leases).await;
    assert_eq!(transitions, 1);
}
