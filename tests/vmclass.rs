//! VmClasses against the real kube-apiserver, the controller and the
//! emulator: a run or preset outside its class's limits is refused with
//! InvalidSpec and creates nothing; a run of a class gets the class's
//! subnetwork, tags and service account on its VMs; a run naming a class
//! that does not exist yet starts once the class is made.
//!
//! Classes are cluster-scoped, so each test names its own after its
//! namespace, and none is made the default (that would reach other tests).

mod common;

use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use testrun_controller::api::prebuild::PrebuildPreset;
use testrun_controller::api::testrun::{TestRun, TestRunPhase};
use testrun_controller::api::{ConditionStatus, VmClass};

async fn make_class(client: &kube::Client, body: Value) -> VmClass {
    let classes: Api<VmClass> = Api::all(client.clone());
    let class: VmClass = serde_json::from_value(body).expect("a VmClass");
    classes.create(&PostParams::default(), &class).await.expect("creating the VmClass")
}

fn run_of(name: &str, class: &str, shards: i32, machine_type: &str, command: &str) -> TestRun {
    serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "TestRun",
        "metadata": { "name": name },
        "spec": {
            "shards": shards,
            "command": ["sh", "-c", command],
            "timeout": "2m",
            "vm": {
                "className": class,
                "zones": ["us-central1-a"],
                "machineType": machine_type,
                "image": "projects/debian-cloud/global/images/family/debian-12"
            }
        }
    }))
    .expect("a TestRun")
}

async fn invalid_message<K>(
    api: &Api<K>,
    name: &str,
    status: impl Fn(&K) -> Option<Vec<testrun_controller::api::Condition>>,
) -> String
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let object = api.get(name).await.expect("reading the object");
        let invalid = status(&object)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "InvalidSpec" && c.status == ConditionStatus::True);
        if let Some(condition) = invalid {
            return condition.message;
        }
        assert!(Instant::now() < deadline, "{name} was never refused: {object:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_phase(runs: &Api<TestRun>, name: &str, phase: TestRunPhase, within: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    loop {
        let run = runs.get(name).await.expect("reading the TestRun");
        if run.status.as_ref().and_then(|s| s.phase) == Some(phase) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never reached {phase:?}: {:?}\n{}", run.status, log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn requests_outside_their_class_are_refused_and_create_nothing() {
    let (client, ns) = common::setup("vmclass-limits").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let controller = ControllerProcess::start(common::control_plane_kubeconfig(), &ns, &emulator.url, &[]);
    let class = format!("{ns}-limited");
    make_class(
        &client,
        json!({
            "apiVersion": "testrun.dev/v1alpha1", "kind": "VmClass", "metadata": { "name": class },
            "spec": { "limits": {
                "allowedMachineTypes": ["n2-*"], "allowedZones": ["us-central1-?"],
                "maxShards": 2, "maxRunDuration": "30m", "maxPoolInstances": 1
            } }
        }),
    )
    .await;

    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    runs.create(&PostParams::default(), &run_of("too-big", &class, 3, "e2-standard-2", "true")).await.expect("create");
    let message = invalid_message(&runs, "too-big", |r| r.status.clone().map(|s| s.conditions)).await;
    assert!(
        message.contains(&format!("spec.vm.machineType: \"e2-standard-2\" is not allowed by VmClass {class}")),
        "{message}"
    );
    assert!(message.contains(&format!("spec.shards: 3 is more than VmClass {class} allows (2)")), "{message}");

    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    let preset: PrebuildPreset = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset", "metadata": { "name": "big-pool" },
        "spec": { "templateVersion": "v1", "instances": 5, "vm": {
            "className": class, "zones": ["us-central1-a"], "machineType": "n2-standard-2", "image": "img" } }
    }))
    .expect("a preset");
    presets.create(&PostParams::default(), &preset).await.expect("create");
    let message = invalid_message(&presets, "big-pool", |p| p.status.clone().map(|s| s.conditions)).await;
    assert!(message.contains(&format!("spec.instances: 5 is more than VmClass {class} allows (1)")), "{message}");

    // A timeout written longer than the class allows is refused...
    let mut too_long = run_of("too-long", &class, 1, "n2-standard-2", "true");
    too_long.spec.timeout = Some("2h".into());
    runs.create(&PostParams::default(), &too_long).await.expect("create");
    let message = invalid_message(&runs, "too-long", |r| r.status.clone().map(|s| s.conditions)).await;
    assert!(message.contains(&format!("spec.timeout: 7200s is longer than VmClass {class} allows (30m)")), "{message}");

    // ...but the default never is: within the limits and without a timeout,
    // the run takes the class's 30m instead of 1h.
    let mut fits = run_of("fits", &class, 2, "n2-standard-2", "true");
    fits.spec.timeout = None;
    runs.create(&PostParams::default(), &fits).await.expect("create");
    wait_phase(&runs, "fits", TestRunPhase::Succeeded, Duration::from_secs(60), || controller.log()).await;
    let fits = runs.get("fits").await.expect("get");
    let default = fits.started().and_then(|s| s.default_timeout.clone()).map(|t| t.as_str().to_string());
    assert_eq!(default.as_deref(), Some("30m"));
    // Only the run that fits made VMs.
    let history: Value = reqwest::get(format!("{}/emulator/v1/history", emulator.url))
        .await
        .expect("history")
        .json()
        .await
        .expect("JSON");
    let owners: Vec<&str> = history
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["labels"]["installation"] == ns.as_str())
        .filter_map(|r| r["labels"]["owner-kind"].as_str())
        .collect();
    assert_eq!(owners, ["testrun", "testrun"], "{history}");
    let classes: Api<VmClass> = Api::all(client);
    classes.delete(&class, &DeleteParams::default()).await.expect("deleting the class");
}

#[tokio::test]
async fn a_run_gets_its_class_network_and_service_account_and_waits_for_a_class_made_later() {
    let (client, ns) = common::setup("vmclass-net").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let controller = ControllerProcess::start(common::control_plane_kubeconfig(), &ns, &emulator.url, &[]);
    let class = format!("{ns}-net");
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);

    // The run names a class that does not exist yet: refused, nothing made.
    runs.create(&PostParams::default(), &run_of("networked", &class, 1, "e2-standard-2", "sleep 3; echo ok"))
        .await
        .expect("create");
    let message = invalid_message(&runs, "networked", |r| r.status.clone().map(|s| s.conditions)).await;
    assert!(message.contains(&format!("spec.vm.className: VmClass {class} does not exist")), "{message}");

    make_class(
        &client,
        json!({
            "apiVersion": "testrun.dev/v1alpha1", "kind": "VmClass", "metadata": { "name": class },
            "spec": {
                "subnetwork": "projects/host-project/regions/us-central1/subnetworks/ci",
                "networkTags": ["ci-agent"],
                "serviceAccount": { "email": "ci-runner@my-project.iam.gserviceaccount.com" }
            }
        }),
    )
    .await;
    // Looked at again without the run being touched (the class poll).
    let deadline = Instant::now() + Duration::from_secs(60);
    let vm = loop {
        let rows = common::installation_vms(&emulator.url, &ns).await;
        if let Some(name) = rows.first().and_then(|r| r["name"].as_str()) {
            let zone = rows[0]["zone"].as_str().unwrap_or("us-central1-a").to_string();
            let url = format!("{}/compute/v1/projects/local/zones/{zone}/instances/{name}", emulator.url);
            break reqwest::get(url).await.expect("get").json::<Value>().await.expect("JSON");
        }
        assert!(Instant::now() < deadline, "no VM was made after the class appeared:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let nic = &vm["networkInterfaces"][0];
    assert_eq!(nic["subnetwork"], "projects/host-project/regions/us-central1/subnetworks/ci", "{vm}");
    assert!(nic["accessConfigs"].as_array().is_none_or(|a| a.is_empty()), "no external IP: {vm}");
    assert_eq!(vm["tags"]["items"], json!(["ci-agent"]), "{vm}");
    assert_eq!(vm["serviceAccounts"][0]["email"], "ci-runner@my-project.iam.gserviceaccount.com", "{vm}");
    assert_eq!(vm["serviceAccounts"][0]["scopes"], json!(["https://www.googleapis.com/auth/cloud-platform"]), "{vm}");
    wait_phase(&runs, "networked", TestRunPhase::Succeeded, Duration::from_secs(60), || controller.log()).await;
    let classes: Api<VmClass> = Api::all(client);
    classes.delete(&class, &DeleteParams::default()).await.expect("deleting the class");
}

#[tokio::test]
async fn a_run_its_class_refuses_takes_nothing_from_a_pool() {
    let (client, ns) = common::setup("vmclass-claim").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let controller = ControllerProcess::start(common::control_plane_kubeconfig(), &ns, &emulator.url, &[]);
    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    let preset: PrebuildPreset = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset", "metadata": { "name": "pool" },
        "spec": { "templateVersion": "v1", "instances": 1, "vm": {
            "zones": ["us-central1-a"], "machineType": "e2-standard-2", "image": "img" } }
    }))
    .expect("a preset");
    presets.create(&PostParams::default(), &preset).await.expect("create");
    let deadline = Instant::now() + Duration::from_secs(60);
    while presets.get("pool").await.expect("get").status.is_none_or(|s| s.ready != 1) {
        assert!(Instant::now() < deadline, "the pool never filled:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The run's own shape names a class that does not exist: it is refused,
    // and must not take the ready VM while it waits.
    let mut run = run_of("refused", &format!("{ns}-nowhere"), 1, "e2-standard-2", "true");
    run.spec.preset_ref = Some(serde_json::from_value(json!({ "name": "pool" })).expect("a presetRef"));
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    runs.create(&PostParams::default(), &run).await.expect("create");
    let message = invalid_message(&runs, "refused", |r| r.status.clone().map(|s| s.conditions)).await;
    assert!(message.contains("does not exist"), "{message}");
    // A few reconciles later the pool still holds its first VM, unclaimed:
    // it never had to make another.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = presets.get("pool").await.expect("get").status.expect("status");
    assert!(status.instances.iter().all(|i| i.claimed_by.is_none()), "the refused run took a pool VM: {status:?}");
    assert_eq!((status.ready, status.jobs_created), (1, 1), "the pool lost VMs to the refused run: {status:?}");
}
