//! The orphan scan against the emulator and a real kube-apiserver: a VM
//! made behind the controller's back with this installation's labels is
//! found, marked and deleted; a VM of another installation and the VMs of
//! live objects are never touched.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use testrun_controller::api::testrun::{TestRun, TestRunPhase};
use testrun_controller::compute::naming::request_id;
use testrun_controller::compute::{Compute, InstanceSpec};

/// A VM of an installation whose owner, in the namespace of the same name, never existed.
fn stray(name: &str, installation: &str) -> InstanceSpec {
    stray_of(name, installation, Some(installation))
}

/// A VM with an installation's labels whose owner never existed, labelled
/// with an owner namespace when one is given.
fn stray_of(name: &str, installation: &str, namespace: Option<&str>) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        zone: "us-central1-a".into(),
        machine_type: "e2-small".into(),
        image: "img".into(),
        disk_gb: 10,
        labels: BTreeMap::from([
            ("managed-by".into(), "testrun-controller".into()),
            ("installation".into(), installation.into()),
            ("owner-kind".into(), "testrun".into()),
            ("owner-uid".into(), "00000000-dead-dead-dead-000000000000".into()),
        ])
        .into_iter()
        .chain(namespace.map(|ns| ("owner-namespace".to_string(), ns.to_string())))
        .collect(),
        metadata: BTreeMap::new(),
        startup_script: "".into(),
        service_account: None,
        network: Default::default(),
        spot: false,
        max_run_duration: Duration::from_secs(3600),
        request_id: request_id(&format!("stray/{name}"), 0),
    }
}

async fn all_vms(emulator: &EmulatorProcess) -> Vec<Value> {
    reqwest::get(format!("{}/emulator/v1/instances", emulator.url)).await.expect("admin").json().await.expect("json")
}

async fn find(emulator: &EmulatorProcess, name: &str) -> Option<Value> {
    all_vms(emulator).await.into_iter().find(|v| v["name"] == name)
}

#[tokio::test]
async fn orphans_are_marked_then_deleted_and_nothing_else_is_touched() {
    let (client, ns) = common::setup("gc-orphans").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let controller = ControllerProcess::start(
        common::control_plane_kubeconfig(),
        &ns,
        &emulator.url,
        &["--gc-interval", "700ms", "--gc-grace", "0s"],
    );
    // A live run whose VM must survive every scan.
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    let run: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun", "metadata": { "name": "alive" },
        "spec": { "command": ["sleep", "300"], "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
    }))
    .expect("TestRun");
    runs.create(&PostParams::default(), &run).await.expect("create");

    let compute = emulator.compute("local").await;
    compute.insert(&stray("orphan-1", &ns)).await.expect("insert behind the controller's back");
    compute.insert(&stray("foreign-1", "another-installation")).await.expect("insert another installation's VM");

    let mut marked = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match find(&emulator, "orphan-1").await {
            Some(vm) => marked |= vm["labels"]["orphan-found-at"].is_string(),
            None => break,
        }
        assert!(Instant::now() < deadline, "the orphan was not deleted; log:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(marked, "the orphan was marked before it was deleted");

    // Several more scans later: the other installation's VM and the live run's VM are untouched.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let foreign = find(&emulator, "foreign-1").await.expect("another installation's VM is never deleted");
    assert!(foreign["labels"].get("orphan-found-at").is_none(), "{foreign}");
    let running = runs.get("alive").await.expect("get");
    assert_eq!(running.status.as_ref().and_then(|s| s.phase), Some(TestRunPhase::Running));
    let instance = running.status.and_then(|s| s.shards[0].instance.clone()).expect("instance");
    let vm = find(&emulator, &instance).await.expect("the live run's VM is kept");
    assert!(vm["labels"].get("orphan-found-at").is_none(), "{vm}");

    let metrics = controller.metrics().await;
    assert!(metrics.contains("testrun_controller_orphans_deleted_total 1"), "{metrics}");
    assert!(metrics.contains("testrun_controller_orphans_found_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_dry_run_only_reports() {
    let (_client, ns) = common::setup("gc-dry-run").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "0"]);
    let controller = ControllerProcess::start(
        common::control_plane_kubeconfig(),
        &ns,
        &emulator.url,
        &["--gc-interval", "300ms", "--gc-grace", "0s", "--gc-dry-run"],
    );
    emulator.compute("local").await.insert(&stray("orphan-2", &ns)).await.expect("insert");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = controller.metrics().await;
        let found = metrics
            .lines()
            .find_map(|l| l.strip_prefix("testrun_controller_orphans_found_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if found >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the dry run never reported the orphan:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let vm = find(&emulator, "orphan-2").await.expect("a dry run deletes nothing");
    assert!(vm["labels"].get("orphan-found-at").is_none(), "a dry run marks nothing: {vm}");
}

#[tokio::test]
async fn a_neighbour_watching_another_namespace_never_deletes_a_live_vm() {
    // Two controllers, one per namespace, with the same installation id; B
    // scans for orphans every 300 ms (A seldom, so it does not undo B's
    // marks). B sees A's VMs in its lists but cannot see their owners.
    let (client, team_a) = common::setup("gc-neighbour-a").await;
    let team_b = common::create_namespace(&client, "gc-neighbour-b").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let a_flags = ["--gc-interval", "10m", "--installation-id", "shared"];
    let b_flags = ["--gc-interval", "300ms", "--gc-grace", "0s", "--installation-id", "shared"];
    let a = ControllerProcess::start(common::control_plane_kubeconfig(), &team_a, &emulator.url, &a_flags);
    let b = ControllerProcess::start(common::control_plane_kubeconfig(), &team_b, &emulator.url, &b_flags);

    let runs: Api<TestRun> = Api::namespaced(client.clone(), &team_a);
    let run: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun", "metadata": { "name": "long" },
        "spec": { "command": ["sleep", "6"], "maxAttempts": 1,
                  "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
    }))
    .expect("TestRun");
    runs.create(&PostParams::default(), &run).await.expect("create");
    // B's scan works: an unowned VM of its own namespace goes.
    let compute = emulator.compute("local").await;
    compute.insert(&stray_of("orphan-of-b", "shared", Some(&team_b))).await.expect("insert");

    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        let run = runs.get("long").await.expect("get");
        if let Some(phase) = run.status.as_ref().and_then(|s| s.phase).filter(|p| p.is_finished()) {
            break (phase, run);
        }
        assert!(Instant::now() < deadline, "the run never finished; A:\n{}\nB:\n{}", a.log(), b.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (phase, run) = finished;
    let status = run.status.expect("status");
    assert_eq!(phase, TestRunPhase::Succeeded, "{status:?}\nB:\n{}", b.log());
    assert_eq!(status.shards[0].result.as_ref().map(|r| r.exit_code), Some(0));
    assert_eq!(status.attempts, 1, "the VM ran its test to the end on the first attempt");
    assert!(find(&emulator, "orphan-of-b").await.is_none(), "B's own orphan was deleted; B:\n{}", b.log());
    let b_metrics = b.metrics().await;
    assert!(b_metrics.contains("testrun_controller_orphans_deleted_total 1"), "{b_metrics}");
}
