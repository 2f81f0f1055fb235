//! Two controller processes with `--leader-elect` against the real
//! kube-apiserver: one leads, the other stands by (ready, serving no
//! agent). Agents reach them through a selectorless Service whose
//! EndpointSlice the leader writes, followed by a proxy as kube-proxy
//! follows it. The leader is killed with SIGKILL while every shard runs:
//! the standby takes over and points the Service at itself, and the run
//! finishes with every result, on its first VMs, with no VM made twice.

mod common;

use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use common::service::ServiceProxy;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

/// Waits until `/readyz` answers 200 with a body starting with `body`:
/// `ok` for the leader once its caches are filled, `standby` for a standby.
async fn wait_readyz(controller: &ControllerProcess, body: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !controller.readyz().await.is_some_and(|(status, text)| status == 200 && text.starts_with(body)) {
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
    let service = ServiceProxy::start(&client, &ns, "agents").await;
    let agent_url = service.url();
    let args = ["--leader-elect", "--agent-url", &agent_url, "--agent-service", "agents"];
    let kubeconfig = common::control_plane_kubeconfig();

    let mut first = ControllerProcess::start(kubeconfig.clone(), &ns, &emulator.url, &args);
    wait_readyz(&first, "ok", "the first controller never led").await;
    service.wait_for_target(Some(first.agent_port), "the leader never wrote its EndpointSlice").await;
    let mut second = ControllerProcess::start(kubeconfig.clone(), &ns, &emulator.url, &args);
    // A standby is ready (rollouts and disruption budgets count it) ...
    wait_readyz(&second, "standby", "the second controller never stood by").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let (leader, transitions) = holder(&leases).await;
    let leader = leader.expect("a holder");
    assert_eq!(transitions, 0);
    assert!(second.metrics().await.contains("testrun_controller_leader 0"));
    assert!(first.metrics().await.contains("testrun_controller_leader 1"));
    // ... but serves no agent: nothing listens on its agent port, and the
    // Service still sends VMs to the leader alone.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", second.agent_port)).await.is_err());
    assert_eq!(service.target(), Some(("127.0.0.1".to_string(), first.agent_port)));

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
    service.wait_for_target(Some(second.agent_port), "the new leader never took the Service over").await;
    let took_over = killed.elapsed();
    eprintln!(
        "failover: the Service sent VMs to the standby {:.1} s after the leader was killed",
        took_over.as_secs_f64()
    );

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

    // A rollout: a new replica stands by, the leader gets SIGTERM, and the
    // new one leads and takes the Service over at once, not after a lease.
    let mut third = ControllerProcess::start(kubeconfig.clone(), &ns, &emulator.url, &args);
    wait_readyz(&third, "standby", "the third controller never stood by").await;
    let stopped = Instant::now();
    second.terminate();
    assert!(second.log().contains("gave up the leader Lease"), "{}", second.log());
    assert!(second.log().contains("emptied the agent EndpointSlice"), "{}", second.log());
    service.wait_for_target(Some(third.agent_port), "the new replica never took the Service over").await;
    let handed_over = stopped.elapsed();
    eprintln!("rollout: the Service sent VMs to the new replica {:.1} s after SIGTERM", handed_over.as_secs_f64());
    let (now_leader, transitions) = holder(&leases).await;
    assert!(now_leader.is_some_and(|h| third.log().contains(&h)), "the third controller holds the Lease");
    assert_eq!(transitions, 2);

    // The last one stopped sends no more VMs to itself and gives the Lease up.
    third.terminate();
    let (after, _) = holder(&leases).await;
    assert_eq!(after, None, "the Lease still names a holder after a graceful stop");
    service.wait_for_target(None, "the stopped leader's EndpointSlice still names it").await;
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
    wait_readyz(&first, "ok", "the first controller never led").await;
    let second = ControllerProcess::start(common::control_plane_kubeconfig(), &ns, &emulator.url, &["--leader-elect"]);
    wait_readyz(&second, "standby", "the second controller never stood by").await;

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
    wait_readyz(&second, "ok", "the standby never took over").await;

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
