//! The PrebuildPreset controller end to end: a real kube-apiserver, the
//! compute emulator behind the real client, the controller and the pool
//! VMs' real agents, each as its own process.

mod common;

use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testrun_controller::api::ConditionStatus;
use testrun_controller::api::prebuild::{PrebuildPreset, PresetInstanceState};

struct Env {
    ns: String,
    presets: Api<PrebuildPreset>,
    client: kube::Client,
    emulator: EmulatorProcess,
    controller: ControllerProcess,
}

async fn setup(test: &str, emulator_args: &[&str]) -> Env {
    let (client, ns) = common::setup(test).await;
    let emulator = EmulatorProcess::start(emulator_args);
    let controller = ControllerProcess::start(common::control_plane_kubeconfig(), &ns, &emulator.url, &[]);
    let presets = Api::namespaced(client.clone(), &ns);
    Env { ns, presets, client, emulator, controller }
}

fn preset(instances: i32, version: &str, slots: i32) -> Value {
    json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "PrebuildPreset",
        "metadata": { "name": "pool" },
        "spec": {
            "templateVersion": version,
            "instances": instances,
            "maxConcurrentProvisions": slots,
            "failureBackoff": { "base": "1s", "max": "2s" },
            "maxConsecutiveFailures": 3,
            "vm": {
                "zones": ["us-central1-a", "us-central1-b"],
                "machineType": "e2-standard-2",
                "image": "projects/debian-cloud/global/images/family/debian-12"
            }
        }
    })
}

impl Env {
    async fn create(&self, body: Value) {
        let preset: PrebuildPreset = serde_json::from_value(body).expect("PrebuildPreset");
        self.presets.create(&PostParams::default(), &preset).await.expect("creating the preset");
    }

    async fn patch(&self, spec: Value) {
        self.presets
            .patch("pool", &PatchParams::default(), &Patch::Merge(&json!({ "spec": spec })))
            .await
            .expect("patching the preset");
    }

    /// Waits until a TestRun has finished; returns its status.
    async fn finished_run(
        &self,
        runs: &Api<testrun_controller::api::testrun::TestRun>,
        name: &str,
    ) -> testrun_controller::api::testrun::TestRunStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let run = runs.get(name).await.expect("get");
            if let Some(status) = run.status.filter(|s| s.phase.is_some_and(|p| p.is_finished())) {
                return status;
            }
            assert!(Instant::now() < deadline, "TestRun {name} never finished; log:\n{}", self.controller.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&PrebuildPreset) -> bool) -> PrebuildPreset {
        self.wait_while(what, check, |_| {}).await
    }

    /// Waits until `check` holds, calling `watch` on every state seen.
    async fn wait_while(
        &self,
        what: &str,
        check: impl Fn(&PrebuildPreset) -> bool,
        mut watch: impl FnMut(&PrebuildPreset),
    ) -> PrebuildPreset {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let preset = self.presets.get("pool").await.expect("reading the preset");
            watch(&preset);
            if check(&preset) {
                return preset;
            }
            if Instant::now() > deadline {
                let log = self.controller.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                panic!(
                    "timed out waiting for {what}; status:\n{}\ncontroller log:\n{}",
                    serde_json::to_string_pretty(&preset.status).unwrap_or_default(),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn vms(&self) -> Vec<Value> {
        common::installation_vms(&self.emulator.url, &self.ns).await
    }

    /// Waits until the emulator holds exactly `n` VMs of this installation, all booted.
    async fn wait_vms(&self, n: usize, version: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let vms = self.vms().await;
            if vms.len() == n && vms.iter().all(|v| v["labels"]["template-version"] == version) {
                return;
            }
            assert!(Instant::now() < deadline, "expected {n} VMs of {version}, have {vms:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn ready(p: &PrebuildPreset, version: &str) -> usize {
    p.status.as_ref().map_or(0, |s| {
        s.instances.iter().filter(|i| i.state == PresetInstanceState::Ready && i.template_version == version).count()
    })
}

fn ready_any(p: &PrebuildPreset) -> usize {
    p.status.as_ref().map_or(0, |s| s.instances.iter().filter(|i| i.state == PresetInstanceState::Ready).count())
}

#[tokio::test]
async fn a_pool_fills_scales_up_and_scales_down() {
    let env = setup("pool-scale", &["--operation-delay", "200ms", "--boot-delay", "50ms"]).await;
    env.create(preset(3, "v1", 2)).await;
    let p = env.wait_for("3 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 3)).await;
    let message = common::argocd::expect_health("PrebuildPreset", &p, "ready", "Healthy");
    assert!(message.starts_with("PoolReady: 3 of 3 ready"), "{message}");
    assert!(
        p.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True))
    );
    env.wait_vms(3, "v1").await;
    assert!(env.vms().await.iter().all(|v| v["processAlive"] == true), "every pool VM runs its agent");

    // The scale subresource: kubectl scale (as an HPA or KEDA would) sets
    // spec.instances, and /scale reports the ready VMs and a selector.
    let (ok, out, err) = common::kubectl(&["scale", "-n", &env.ns, "pbp/pool", "--replicas=5"]);
    assert!(ok, "kubectl scale: {out}{err}");
    let p = env.wait_for("5 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 5)).await;
    assert_eq!(p.spec.instances, 5);
    env.wait_vms(5, "v1").await;
    let path = format!("/apis/testrun.dev/v1alpha1/namespaces/{}/prebuildpresets/pool/scale", env.ns);
    let (ok, out, err) = common::kubectl(&["get", "--raw", &path]);
    assert!(ok, "reading /scale: {err}");
    let scale: Value = serde_json::from_str(&out).expect("a Scale");
    assert_eq!((&scale["spec"]["replicas"], &scale["status"]["replicas"]), (&json!(5), &json!(5)), "{scale}");
    let uid = p.metadata.uid.clone().expect("uid");
    assert_eq!(scale["status"]["selector"], json!(format!("testrun.dev/prebuild-preset-uid={uid}")));
    // The schema holds for /scale too.
    let (ok, _, err) = common::kubectl(&["scale", "-n", &env.ns, "pbp/pool", "--replicas=1001"]);
    assert!(!ok && err.contains("spec.instances"), "more than the schema's maximum: {err}");
    // The category lists the pool; -o wide adds the Ready condition's reason.
    // (A fresh discovery cache: categories come from discovery, and an
    // older cache of this machine's kubectl knows the CRDs without it.)
    let cache = std::env::temp_dir().join(format!("kubectl-cache-{}", env.ns));
    let cache = format!("--cache-dir={}", cache.display());
    let (ok, out, err) = common::kubectl(&["get", "testrun-all", "-n", &env.ns, "-o", "wide", &cache]);
    assert!(ok, "kubectl get testrun-all: {err}");
    assert!(out.contains("prebuildpreset.testrun.dev/pool") && out.contains("PoolReady"), "{out}");

    env.patch(json!({ "instances": 2 })).await;
    let p =
        env.wait_for("2 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 2 && s.instances.len() == 2)).await;
    assert_eq!(p.status.expect("status").pending, 0);
    env.wait_vms(2, "v1").await;
}

#[tokio::test]
async fn a_new_template_version_cancels_pending_jobs_and_rolls_without_losing_ready_vms() {
    let env = setup("pool-roll", &["--operation-delay", "600ms", "--boot-delay", "50ms"]).await;
    env.create(preset(3, "v1", 1)).await;
    env.wait_for("3 ready v1", |p| ready(p, "v1") == 3).await;

    // v2: three jobs, one provisioning and two pending behind the single slot.
    env.patch(json!({ "templateVersion": "v2" })).await;
    env.wait_for("v2 jobs pending", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.pending_jobs.len() == 2 && s.pending_jobs.iter().all(|j| j.template_version == "v2"))
    })
    .await;
    // v3 before they start: the two pending v2 jobs are cancelled, the running one finishes.
    env.patch(json!({ "templateVersion": "v3" })).await;
    let mut lowest = usize::MAX;
    let p = env
        .wait_while(
            "3 ready v3 and nothing else",
            |p| ready(p, "v3") == 3 && p.status.as_ref().is_some_and(|s| s.instances.len() == 3),
            |p| {
                lowest = lowest.min(ready_any(p));
            },
        )
        .await;
    let status = p.status.expect("status");
    assert_eq!(status.cancelled_total, 2, "exactly the two pending v2 jobs were cancelled");
    assert_eq!(status.active_version.as_deref(), Some("v3"));
    assert!(lowest >= 3, "ready VMs dropped to {lowest} during the rollout");
    let events = common::events(&env.client, &env.ns).await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "PendingJobsCancelled" && n.contains("2 pending job(s) of template version v2")),
        "{events:?}"
    );
    env.wait_vms(3, "v3").await;
    let metrics = env.controller.metrics().await;
    let cancelled =
        format!("testrun_controller_pool_pending_jobs_cancelled_total{{namespace=\"{}\",preset=\"pool\"}} 2", env.ns);
    assert!(metrics.contains(&cancelled), "{cancelled} not in\n{metrics}");
    let ready = format!("testrun_controller_pool_vms{{namespace=\"{}\",preset=\"pool\",state=\"ready\"}} 3", env.ns);
    assert!(metrics.contains(&ready), "{ready} not in\n{metrics}");
}

#[tokio::test]
async fn repeated_capacity_failures_back_off_then_degrade_until_the_spec_changes() {
    let env = setup(
        "pool-degraded",
        &["--operation-delay", "100ms", "--boot-delay", "50ms", "--fault", "call=insert,kind=capacity"],
    )
    .await;
    env.create(preset(1, "v1", 1)).await;
    let p = env
        .wait_for("Degraded", |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Degraded" && c.reason == "TooManyFailures"))
        })
        .await;
    let message = common::argocd::expect_health("PrebuildPreset", &p, "too-many-failures", "Degraded");
    assert!(message.starts_with("TooManyFailures: 3 provisions failed in a row"), "{message}");
    let status = p.status.expect("status");
    assert_eq!(status.consecutive_failures, 3);
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").expect("Degraded");
    assert_eq!(degraded.status, ConditionStatus::True);
    assert!(degraded.message.contains("has no capacity"), "{}", degraded.message);
    // It stopped creating: no insert reaches the cloud any more.
    let faults = format!("{}/emulator/v1/faults", env.emulator.url);
    let hits = |v: Value| v["rules"][0]["hits"].as_u64().unwrap_or(0);
    let before = hits(reqwest::get(&faults).await.expect("faults").json().await.expect("json"));
    assert_eq!(before, 3);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = hits(reqwest::get(&faults).await.expect("faults").json().await.expect("json"));
    assert_eq!(after, before, "a degraded preset creates nothing");
    let metrics = env.controller.metrics().await;
    assert!(
        metrics.contains("testrun_controller_pool_provision_failures_total{reason=\"ZONE_RESOURCE_POOL_EXHAUSTED\"} 3"),
        "{metrics}"
    );

    // Capacity is back. Scaling (kubectl scale, an autoscaler) does not
    // lift the stop: the spec's generation moves, the streak stays.
    reqwest::Client::new().delete(&faults).send().await.expect("clearing faults");
    let (ok, out, err) = common::kubectl(&["scale", "-n", &env.ns, "pbp/pool", "--replicas=2"]);
    assert!(ok, "kubectl scale: {out}{err}");
    let p = env
        .wait_for("the scale seen", |p| {
            p.status.as_ref().is_some_and(|s| s.observed_generation == p.metadata.generation)
        })
        .await;
    let status = p.status.expect("status");
    assert_eq!(status.consecutive_failures, 3, "scaling cleared the failure streak");
    assert!(status.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == ConditionStatus::True));
    // A change of what a provision makes does: the preset recovers.
    env.patch(json!({ "templateVersion": "v2" })).await;
    let p = env.wait_for("2 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 2)).await;
    common::argocd::expect_health("PrebuildPreset", &p, "recovered", "Healthy");
    let degraded = p.status.expect("status").conditions.into_iter().find(|c| c.type_ == "Degraded").expect("Degraded");
    assert_eq!(degraded.status, ConditionStatus::False);
}

#[tokio::test]
async fn deleting_a_preset_deletes_its_vms_first() {
    let env = setup("pool-delete", &["--operation-delay", "200ms", "--boot-delay", "50ms"]).await;
    env.create(preset(2, "v1", 2)).await;
    env.wait_for("2 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 2)).await;
    let pids: Vec<i32> =
        env.vms().await.iter().filter_map(|v| v["pid"].as_i64()).filter_map(|p| i32::try_from(p).ok()).collect();
    assert_eq!(pids.len(), 2);
    let ours = format!("namespace=\"{}\",preset=\"pool\"", env.ns);
    let metrics = env.controller.metrics().await;
    let wanted = format!("testrun_controller_pool_desired_vms{{{ours}}} 2");
    assert!(metrics.contains(&wanted), "{wanted} not in\n{metrics}");
    env.presets.delete("pool", &DeleteParams::default()).await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.presets.get_opt("pool").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "the preset was not removed; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(env.vms().await.is_empty(), "the finalizer went before the VMs");
    for pid in pids {
        let deadline = Instant::now() + Duration::from_secs(10);
        while nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_ok() {
            assert!(Instant::now() < deadline, "agent process group {pid} outlived its VM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A deleted preset's series are removed, not left at 0.
    let metrics = env.controller.metrics().await;
    let left: Vec<&str> = metrics.lines().filter(|l| l.contains(&ours)).collect();
    assert!(left.is_empty(), "series of the deleted preset remain: {left:?}");
}

#[tokio::test]
async fn ten_runs_claim_from_a_pool_of_three_and_the_rest_fall_back() {
    use testrun_controller::api::testrun::{TestRun, TestRunPhase};
    let env = setup("pool-claims", &["--operation-delay", "300ms", "--boot-delay", "50ms"]).await;
    env.create(preset(3, "v1", 3)).await;
    env.wait_for("3 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 3)).await;
    let warm: std::collections::BTreeSet<String> =
        env.vms().await.iter().filter_map(|v| v["name"].as_str().map(String::from)).collect();

    let runs: Api<TestRun> = Api::namespaced(env.client.clone(), &env.ns);
    let creations = (0..10).map(|i| {
        let runs = runs.clone();
        async move {
            let run: TestRun = serde_json::from_value(json!({
                "apiVersion": "testrun.dev/v1alpha1",
                "kind": "TestRun",
                "metadata": { "name": format!("claim-{i}") },
                "spec": { "presetRef": { "name": "pool" }, "command": ["sh", "-c", "echo ran on $GCE_INSTANCE_NAME"], "heartbeatTimeout": "20s" }
            }))
            .expect("TestRun");
            runs.create(&PostParams::default(), &run).await.expect("creating a TestRun");
        }
    });
    futures::future::join_all(creations).await;

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut done = Vec::new();
    while done.len() < 10 {
        done = runs
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(TestRunPhase::Succeeded))
            .collect();
        assert!(Instant::now() < deadline, "only {} of 10 runs succeeded; log:\n{}", done.len(), env.controller.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let instances: Vec<String> =
        done.iter().filter_map(|r| r.status.as_ref()?.shards.first()?.instance.clone()).collect();
    let claimed: Vec<&String> = instances.iter().filter(|name| warm.contains(*name)).collect();
    let distinct: std::collections::BTreeSet<&String> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), 3, "three runs got a warm VM: {instances:?}");
    assert_eq!(distinct.len(), 3, "no warm VM was claimed twice");
    assert_eq!(instances.iter().filter(|n| n.starts_with("tr-")).count(), 7, "seven fell back to fresh VMs");
    for run in &done {
        let shard = &run.status.as_ref().expect("status").shards[0];
        let out = shard.result.as_ref().map(|r| r.output_tail.trim().to_string()).unwrap_or_default();
        assert_eq!(
            out,
            format!("ran on {}", shard.instance.clone().unwrap_or_default()),
            "the shard ran on its own VM"
        );
    }

    // The pool backfills to three ready VMs, none of them the claimed ones.
    let p = env
        .wait_for("the pool to backfill", |p| {
            p.status.as_ref().is_some_and(|s| s.ready == 3 && s.instances.iter().all(|i| !warm.contains(&i.name)))
        })
        .await;
    assert_eq!(p.status.expect("status").instances.len(), 3);
    let events = common::events(&env.client, &env.ns).await;
    let warm_runs = events.iter().filter(|(r, n)| r == "RunFinished" && n.contains("1 on a warm pool VM")).count();
    assert_eq!(warm_runs, 3, "{events:?}");
    let metrics = env.controller.metrics().await;
    assert!(metrics.contains("testrun_controller_pool_claims_total{reason=\"claimed\"} 3"), "{metrics}");
    assert!(metrics.contains("testrun_controller_pool_claim_duration_seconds_count"), "{metrics}");
}

#[tokio::test]
async fn deleting_a_preset_leaves_claimed_vms_to_their_testruns() {
    use testrun_controller::api::testrun::{TestRun, TestRunPhase};
    let env = setup("pool-delete-claimed", &["--operation-delay", "200ms", "--boot-delay", "50ms"]).await;
    env.create(preset(1, "v1", 1)).await;
    env.wait_for("1 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 1)).await;
    let warm = env.vms().await[0]["name"].as_str().expect("name").to_string();

    let runs: Api<TestRun> = Api::namespaced(env.client.clone(), &env.ns);
    // The test runs until the file exists (the emulated VM is a local process).
    let flag = std::env::temp_dir().join(format!("{}-go", env.ns));
    let wait = format!("while [ ! -e '{}' ]; do sleep 0.2; done", flag.display());
    let run: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun", "metadata": { "name": "long" },
        "spec": { "presetRef": { "name": "pool" }, "command": ["sh", "-c", wait], "heartbeatTimeout": "20s" }
    }))
    .expect("TestRun");
    runs.create(&PostParams::default(), &run).await.expect("create");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = runs.get("long").await.expect("get");
        let shard = run.status.as_ref().and_then(|s| s.shards.first().cloned());
        if shard.as_ref().is_some_and(|s| s.phase == TestRunPhase::Running) {
            assert_eq!(shard.and_then(|s| s.instance), Some(warm.clone()), "the run claimed the warm VM");
            break;
        }
        assert!(Instant::now() < deadline, "the run did not start on the warm VM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    env.presets.delete("pool", &DeleteParams::default()).await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.presets.get_opt("pool").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "the preset was not removed; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = env.vms().await;
    let names: Vec<&str> = left.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, vec![warm.as_str()], "only the claimed VM is left");
    assert_eq!(left[0]["labels"]["owner-kind"], "testrun");
    assert_eq!(left[0]["processAlive"], true);
    // Without its preset the run goes on to its result, and its VM goes.
    std::fs::write(&flag, b"").expect("flag");
    let status = env.finished_run(&runs, "long").await;
    let _ = std::fs::remove_file(&flag);
    assert_eq!(status.phase, Some(TestRunPhase::Succeeded), "{status:?}");
    assert_eq!(status.shards[0].result.as_ref().map(|r| r.exit_code), Some(0));
    assert_eq!(status.started.as_ref().map(|s| s.vm.machine_type.as_str()), Some("e2-standard-2"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env.vms().await.is_empty() {
        assert!(Instant::now() < deadline, "the run's VM was not deleted; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_invalid_run_takes_nothing_from_the_pool_until_it_is_fixed() {
    use testrun_controller::api::testrun::{TestRun, TestRunPhase};
    let env = setup("pool-invalid-claimer", &["--operation-delay", "100ms", "--boot-delay", "50ms"]).await;
    env.create(preset(1, "v1", 1)).await;
    env.wait_for("1 ready", |p| p.status.as_ref().is_some_and(|s| s.ready == 1)).await;
    let warm = env.vms().await[0]["name"].as_str().expect("name").to_string();

    let runs: Api<TestRun> = Api::namespaced(env.client.clone(), &env.ns);
    // Invalid: it sets one environment variable twice.
    let run: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun", "metadata": { "name": "bad" },
        "spec": { "presetRef": { "name": "pool" }, "command": ["true"],
                  "env": [{ "name": "A", "value": "1" }, { "name": "A", "value": "2" }] }
    }))
    .expect("TestRun");
    runs.create(&PostParams::default(), &run).await.expect("create");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = runs.get("bad").await.expect("get");
        let invalid = run.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "InvalidSpec").cloned());
        if invalid.is_some_and(|c| c.status == ConditionStatus::True) {
            break;
        }
        assert!(Instant::now() < deadline, "the run was not reported invalid; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = env.presets.get("pool").await.expect("get").status.expect("status");
    assert_eq!((pool.claimed, pool.ready), (0, 1), "an invalid run claimed a warm VM: {pool:?}");

    // Fixed, it claims the warm VM and runs on it.
    runs.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(&json!({ "spec": { "env": [{ "name": "A", "value": "1" }] } })),
    )
    .await
    .expect("fix");
    let status = env.finished_run(&runs, "bad").await;
    assert_eq!(status.phase, Some(TestRunPhase::Succeeded), "{status:?}");
    assert_eq!(status.shards[0].instance.as_deref(), Some(warm.as_str()), "ran on the warm VM");
}

#[tokio::test]
async fn a_preset_that_keeps_changing_under_the_controller_is_looked_at_again_not_failed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = setup("conflicts", &["--operation-delay", "300ms"]).await;
    env.create(preset(0, "v1", 3)).await;
    // Writers change the preset as fast as they can, as claims from many
    // runs at once do, from before its finalizer goes on: the controller's
    // guarded writes keep conflicting.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let (presets, stop) = (env.presets.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let touch = json!({ "metadata": { "annotations": { format!("writer-{w}"): n.to_string() } } });
                    let _ = presets.patch("pool", &PatchParams::default(), &Patch::Merge(&touch)).await;
                }
            })
        })
        .collect();
    // The pool keeps changing size, so every pass has a status to write.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut size = 0;
    while !env.controller.log().contains("keeps changing under this controller") {
        assert!(Instant::now() < deadline, "the writers never made a reconcile conflict five times in a row");
        size = if size == 3 { 2 } else { 3 };
        env.patch(json!({ "instances": size })).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    env.patch(json!({ "instances": 3 })).await;
    // Not an error (whose backoff grows to minutes): looked at again, the
    // pool fills.
    env.wait_for("3 ready VMs", |p| p.status.as_ref().is_some_and(|s| s.ready == 3)).await;
    let metrics = env.controller.metrics().await;
    let errors = metrics.lines().find(|l| l.contains(r#"kind="prebuildpreset""#) && l.contains(r#"result="error""#));
    let log = env.controller.log();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("reconcile failed")).take(3).collect();
    assert_eq!(errors, None, "a conflict counted as a failed reconcile: {failed:?}");
}
