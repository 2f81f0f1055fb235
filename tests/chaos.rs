//! Crash safety under injected faults: many TestRuns and two presets while
//! the emulator injects capacity, quota, 503, slow, failing and vanishing
//! operations at a fixed seed, the controller is killed with SIGKILL at
//! random moments and restarted, and kube-apiserver is restarted once. At
//! the end every run is finished with its results in status, no VM is left
//! that no object owns, no shard attempt ever had two VMs, and no agent
//! process outlived its VM.
//!
//! `TESTRUN_CHAOS=long` runs a longer version (more runs, more kills).
//!
//! It runs on a control plane of its own (its own etcd and kube-apiserver,
//! sharing the cached build), so restarting kube-apiserver disturbs no other
//! test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::controller::{ControllerProcess, free_port};
use common::emulator::EmulatorProcess;
use kube::api::{Api, PostParams};
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use serde_json::{Value, json};
use testrun_controller::api::prebuild::PrebuildPreset;
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

struct Scale {
    runs: usize,
    kills: usize,
    deadline: Duration,
}

fn scale() -> Scale {
    if std::env::var("TESTRUN_CHAOS").as_deref() == Ok("long") {
        Scale { runs: 200, kills: 20, deadline: Duration::from_secs(1800) }
    } else {
        Scale { runs: 50, kills: 5, deadline: Duration::from_secs(240) }
    }
}

/// A control plane of the test's own, on free ports, sharing the cached
/// kube-apiserver build.
struct ControlPlane {
    env: Vec<(String, String)>,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    fn script(&self, command: &str) {
        let out = Command::new("bash")
            .arg(common::repo_root().join("scripts/control-plane.sh"))
            .arg(command)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("running control-plane.sh");
        assert!(out.status.success(), "control-plane.sh {command}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn start() -> Self {
        let shared = common::control_plane_kubeconfig();
        let bin = shared.parent().expect("state folder").join("bin");
        let state = std::env::temp_dir().join(format!("chaos-plane-{}", std::process::id()));
        let etcd = loop {
            let port = free_port();
            if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break port;
            }
        };
        let env = vec![
            ("TESTRUN_STATE_DIR".to_string(), state.display().to_string()),
            ("TESTRUN_BIN_DIR".to_string(), bin.display().to_string()),
            ("TESTRUN_APISERVER_PORT".to_string(), free_port().to_string()),
            ("TESTRUN_ETCD_PORT".to_string(), etcd.to_string()),
        ];
        let plane = Self { env, kubeconfig: state.join("kubeconfig") };
        plane.script("up");
        plane
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.script("down");
        if let Some((_, state)) = self.env.iter().find(|(k, _)| k == "TESTRUN_STATE_DIR") {
            let _ = std::fs::remove_dir_all(state);
        }
    }
}

fn testrun(i: usize, shards: usize, preset: bool) -> TestRun {
    let command = if i % 9 == 4 { "sleep 1; echo failing; exit 1" } else { "sleep 1; echo ok" };
    let mut spec = json!({
        "shards": shards,
        "command": ["sh", "-c", command],
        "timeout": "3m",
        "heartbeatTimeout": "20s",
        "maxAttempts": 6,
    });
    if preset {
        spec["presetRef"] = json!({ "name": format!("pool-{}", i % 2) });
    } else {
        spec["vm"] = json!({ "zones": ["us-central1-a", "us-central1-b", "us-central1-c"], "machineType": "e2-small", "image": "img" });
    }
    serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun",
        "metadata": { "name": format!("chaos-{i}") }, "spec": spec,
    }))
    .expect("TestRun")
}

fn preset(i: usize) -> PrebuildPreset {
    serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset",
        "metadata": { "name": format!("pool-{i}") },
        "spec": {
            "templateVersion": "v1", "instances": 2, "maxConcurrentProvisions": 2,
            "failureBackoff": { "base": "1s", "max": "4s" }, "maxConsecutiveFailures": 50,
            "vm": { "zones": ["us-central1-a", "us-central1-b"], "machineType": "e2-small", "image": "img" }
        }
    }))
    .expect("preset")
}

async fn admin(emulator: &EmulatorProcess, path: &str) -> Value {
    reqwest::get(format!("{}/emulator/v1/{path}", emulator.url)).await.expect("admin").json().await.expect("json")
}

#[tokio::test]
async fn the_controller_survives_kills_and_faults_without_losing_results_or_leaking_vms() {
    let scale = scale();
    let plane = ControlPlane::start();
    let client = common::client_from(&plane.kubeconfig).await;
    common::install_crds(&client).await;
    let ns = common::create_namespace(&client, "chaos").await;
    let emulator = EmulatorProcess::start(&[
        "--operation-delay",
        "150ms",
        "--boot-delay",
        "50ms",
        "--fault-seed",
        "42",
        "--fault",
        "call=insert,zone=us-central1-a,kind=capacity,probability=0.2",
        "--fault",
        "call=insert,kind=quota,probability=0.05",
        "--fault",
        "call=insert,kind=vanish,probability=0.05",
        "--fault",
        "kind=unavailable,probability=0.03",
        "--fault",
        "call=delete,kind=slow,delayMs=800,probability=0.3",
        "--fault",
        "call=delete,kind=fail,probability=0.15",
        "--fault",
        "call=delete,kind=vanish,probability=0.05",
    ]);
    let mut controller = ControllerProcess::start(
        plane.kubeconfig.clone(),
        &ns,
        &emulator.url,
        &[
            "--delete-retry-base",
            "200ms",
            "--gc-interval",
            "3s",
            "--gc-grace",
            "20s",
            "--registration-timeout",
            "60s",
            "--compute-qps",
            "100",
        ],
    );
    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    for i in 0..2 {
        presets.create(&PostParams::default(), &preset(i)).await.expect("preset");
    }
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    let mut rng = StdRng::seed_from_u64(7);
    let mut shards_total = 0;
    for i in 0..scale.runs {
        let shards = 1 + i % 3;
        shards_total += shards;
        runs.create(&PostParams::default(), &testrun(i, shards, i % 5 == 0)).await.expect("TestRun");
    }

    // Chaos: SIGKILL the controller at random moments; restart kube-apiserver once.
    let started = Instant::now();
    for kill in 0..scale.kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
        controller.kill_hard();
        if kill == 1 {
            plane.script("restart-apiserver");
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
        controller.restart();
    }

    // Every run finishes.
    let client = common::client_from(&plane.kubeconfig).await;
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    let deadline = started + scale.deadline;
    let finished = loop {
        let list = runs.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        let done: Vec<TestRun> = list
            .into_iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_finished()))
            .collect();
        if done.len() == scale.runs {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} runs finished; log tail:\n{}",
            done.len(),
            scale.runs,
            tail(&controller.log())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Every VM of a finished run is deleted and verified.
    loop {
        let list = runs.list(&Default::default()).await.expect("list").items;
        let busy = list.iter().filter(|r| r.status.as_ref().is_some_and(|s| !s.operations.is_empty())).count();
        let live_uids: BTreeSet<String> = presets
            .list(&Default::default())
            .await
            .expect("presets")
            .items
            .into_iter()
            .filter_map(|p| p.metadata.uid)
            .collect();
        let vms = common::installation_vms(&emulator.url, &ns).await;
        let unowned: Vec<&Value> =
            vms.iter().filter(|v| !v["labels"]["owner-uid"].as_str().is_some_and(|u| live_uids.contains(u))).collect();
        if busy == 0 && unowned.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{busy} runs still deleting, unowned VMs: {unowned:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Results: every shard of a Succeeded or Failed run has its result.
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut results = 0;
    let mut attempts = 0;
    for run in &finished {
        let status = run.status.as_ref().expect("status");
        let phase = status.phase.expect("phase");
        *phases.entry(format!("{phase:?}")).or_default() += 1;
        attempts += status.attempts;
        if matches!(phase, TestRunPhase::Succeeded | TestRunPhase::Failed) {
            for shard in &status.shards {
                if shard.phase == TestRunPhase::Succeeded || shard.phase == TestRunPhase::Failed {
                    assert!(
                        shard.result.is_some(),
                        "{} shard {} finished without its result",
                        run.metadata.name.clone().unwrap_or_default(),
                        shard.index
                    );
                    results += 1;
                }
            }
        }
        if phase == TestRunPhase::Succeeded {
            assert!(status.shards.iter().all(|s| s.result.as_ref().is_some_and(|r| r.exit_code == 0)));
        }
    }

    // No shard attempt ever had two VMs; no agent outlived its VM.
    let history = admin(&emulator, "history").await;
    let history = history.as_array().expect("history");
    let mut per_attempt: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for row in history {
        let labels = &row["labels"];
        if labels["owner-kind"] == "testrun" && row["labels"]["installation"] == ns.as_str() {
            let key = (
                labels["owner-uid"].as_str().unwrap_or_default().to_string(),
                labels["shard"].as_str().unwrap_or_default().to_string(),
                labels["attempt"].as_str().unwrap_or_default().to_string(),
            );
            *per_attempt.entry(key).or_default() += 1;
        }
    }
    let doubled: Vec<_> = per_attempt.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "shard attempts with two VMs: {doubled:?}");
    let alive: BTreeSet<String> = common::installation_vms(&emulator.url, &ns)
        .await
        .iter()
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    let mut strays = Vec::new();
    for row in history {
        let name = row["name"].as_str().unwrap_or_default();
        if let Some(pid) = row["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
            && !alive.contains(name)
        {
            let gone = Instant::now() + Duration::from_secs(5);
            while nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_ok() && Instant::now() < gone {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_ok() {
                strays.push(name.to_string());
            }
        }
    }
    assert!(strays.is_empty(), "agents outlived their VMs: {strays:?}");

    let faults = admin(&emulator, "faults").await;
    let hits: u64 = faults["rules"].as_array().map(|r| r.iter().filter_map(|f| f["hits"].as_u64()).sum()).unwrap_or(0);
    let pool_vms = history.iter().filter(|r| r["labels"]["owner-kind"] == "prebuildpreset").count();
    println!(
        "chaos: {} runs ({} shards) finished {:?}; {} results in status; {} attempts; {} VMs created ({} for pools); \
         {} faults injected; {} controller kills; 1 kube-apiserver restart; 0 shard attempts with two VMs; 0 unowned VMs; 0 stray agents; {:.0} s",
        finished.len(),
        shards_total,
        phases,
        results,
        attempts,
        history.len(),
        pool_vms,
        hits,
        scale.kills,
        started.elapsed().as_secs_f64(),
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
