//! Crash safety under injected faults: many TestRuns (every third on Spot
//! VMs) and two presets while the emulator injects capacity, quota, 503,
//! slow, failing and vanishing operations, hung ones and calls whose answer
//! is lost, at a fixed seed, the controller is killed with SIGKILL at
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
use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use common::plane::ControlPlane;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use serde_json::{Value, json};
use testrun_controller::api::prebuild::PrebuildPreset;
use testrun_controller::api::testrun::{AttemptOutcome, TestRun, TestRunPhase};

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

/// Whether run `i`'s command fails (its exit code decides its outcome).
fn fails(i: usize) -> bool {
    i % 9 == 4
}

/// Whether run `i` runs on Spot VMs (never one on a preset).
fn spot(i: usize) -> bool {
    i % 3 == 1
}

fn testrun(i: usize, shards: usize, preset: bool) -> TestRun {
    // Each result names the attempt it came from: a result of a superseded
    // attempt accepted into status would show another number.
    let command = if fails(i) {
        "sleep 1; echo attempt=$TESTRUN_ATTEMPT; exit 1"
    } else {
        "sleep 1; echo attempt=$TESTRUN_ATTEMPT"
    };
    let mut spec = json!({
        "shards": shards,
        "command": ["sh", "-c", command],
        "timeout": "3m",
        "heartbeatTimeout": "20s",
        "maxAttempts": 8,
    });
    if preset {
        spec["presetRef"] = json!({ "name": format!("pool-{}", i % 2) });
    } else {
        spec["vm"] = json!({ "zones": ["us-central1-a", "us-central1-b", "us-central1-c"], "machineType": "e2-small", "image": "img", "spot": spot(i) });
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

async fn add_fault(emulator: &EmulatorProcess, rule: Value) -> u64 {
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/emulator/v1/faults", emulator.url))
        .json(&rule)
        .send()
        .await
        .expect("adding a fault")
        .json()
        .await
        .expect("json");
    answer["id"].as_u64().expect("fault id")
}

async fn remove_fault(emulator: &EmulatorProcess, id: u64) {
    reqwest::Client::new()
        .delete(format!("{}/emulator/v1/faults/{id}", emulator.url))
        .send()
        .await
        .expect("removing a fault");
}

/// What the test did to the system, for the figures.
#[derive(Default)]
struct Disturbed {
    kills: usize,
    runs_deleted: BTreeSet<String>,
    presets_deleted: usize,
    template_changes: usize,
    unreachable_windows: usize,
}

#[tokio::test]
async fn the_controller_survives_kills_and_faults_without_losing_results_or_leaking_vms() {
    let scale = scale();
    let plane = ControlPlane::start("chaos");
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
        "call=insert,kind=hang,probability=0.02",
        "--fault",
        "kind=unavailable,probability=0.03",
        "--fault",
        "call=insert,kind=lostAnswer,probability=0.05",
        "--fault",
        "call=delete,kind=lostAnswer,probability=0.05",
        "--fault",
        "call=delete,kind=slow,delayMs=800,probability=0.3",
        "--fault",
        "call=delete,kind=fail,probability=0.15",
        "--fault",
        "call=delete,kind=vanish,probability=0.05",
        "--fault",
        "call=delete,kind=hang,probability=0.03",
    ]);
    // The orphan scan only reports (dry run): a VM nobody tracks stays and
    // is seen at the end, instead of being cleaned up behind the test.
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
            "--gc-dry-run",
            "--registration-timeout",
            "30s",
            "--operation-timeout",
            "6s",
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
    let mut shards_of: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..scale.runs {
        let shards = 1 + i % 3;
        shards_of.insert(format!("chaos-{i}"), shards);
        runs.create(&PostParams::default(), &testrun(i, shards, i % 5 == 0)).await.expect("TestRun");
    }

    // Chaos: SIGKILL the controller at random moments; restart kube-apiserver
    // once (every watch relists); a zone becomes unreachable for a while;
    // TestRuns are deleted mid-flight; pool-0 changes its template version
    // and pool-1 is deleted once the runs on it have started.
    let started = Instant::now();
    let mut disturbed = Disturbed::default();
    let mut pool_1_deleted = false;
    for kill in 0..scale.kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
        controller.kill_hard();
        disturbed.kills += 1;
        if kill == 1 {
            plane.script("restart-apiserver");
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
        controller.restart();
        let client = common::client_from(&plane.kubeconfig).await;
        let (runs, presets): (Api<TestRun>, Api<PrebuildPreset>) =
            (Api::namespaced(client.clone(), &ns), Api::namespaced(client, &ns));
        match kill % 3 {
            0 => {
                // Delete a run or two, whatever they are doing.
                for _ in 0..2 {
                    let name = format!("chaos-{}", rng.random_range(0..scale.runs));
                    if disturbed.runs_deleted.insert(name.clone()) {
                        runs.delete(&name, &DeleteParams::default()).await.expect("deleting a TestRun");
                    }
                }
            }
            1 => {
                let zone = ["us-central1-b", "us-central1-c"][rng.random_range(0..2)];
                let id = add_fault(&emulator, json!({ "zone": zone, "kind": "unreachable" })).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
                remove_fault(&emulator, id).await;
                disturbed.unreachable_windows += 1;
            }
            _ => {
                let version = format!("v{}", disturbed.template_changes + 2);
                presets
                    .patch(
                        "pool-0",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"templateVersion": version}})),
                    )
                    .await
                    .expect("changing pool-0's template");
                disturbed.template_changes += 1;
            }
        }
        if !pool_1_deleted && all_started_on(&runs, "pool-1").await {
            presets.delete("pool-1", &DeleteParams::default()).await.expect("deleting pool-1");
            pool_1_deleted = true;
            disturbed.presets_deleted += 1;
        }
    }
    let client = common::client_from(&plane.kubeconfig).await;
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    let deadline = started + scale.deadline;
    if !pool_1_deleted {
        while !all_started_on(&runs, "pool-1").await {
            assert!(Instant::now() < deadline, "runs on pool-1 never started");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        presets.delete("pool-1", &DeleteParams::default()).await.expect("deleting pool-1");
        disturbed.presets_deleted += 1;
    }

    // Every run left finishes; every deleted run and preset is gone.
    let finished = loop {
        let list = runs.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        let names: BTreeSet<String> = list.iter().filter_map(|r| r.metadata.name.clone()).collect();
        let lingering: Vec<&String> = disturbed.runs_deleted.iter().filter(|n| names.contains(*n)).collect();
        let stuck: Vec<String> = list
            .iter()
            .filter(|r| r.metadata.name.as_ref().is_some_and(|n| lingering.contains(&n)))
            .map(|r| serde_json::to_string_pretty(&(&r.metadata.name, &r.metadata.uid, &r.status)).unwrap_or_default())
            .collect();
        let done: Vec<TestRun> = list
            .into_iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_finished()))
            .collect();
        let pool_1 = presets.get_opt("pool-1").await.ok().flatten();
        if done.len() + disturbed.runs_deleted.len() == scale.runs && lingering.is_empty() && pool_1.is_none() {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} runs finished, deleted runs still there: {lingering:?} {}, pool-1 there: {}; log tail:\n{}",
            done.len(),
            scale.runs - disturbed.runs_deleted.len(),
            stuck.join("\n"),
            pool_1.is_some(),
            tail(&controller.log())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Every VM is deleted and verified, except pool-0's warm VMs: with the
    // orphan scan only reporting, a VM nobody tracks would stay here.
    // pool-0's VMs are exactly the ones its status lists, none of them
    // being deleted.
    let unowned = loop {
        let pool_0 = presets.get("pool-0").await.expect("pool-0");
        let pool_0_uid = pool_0.metadata.uid.clone().unwrap_or_default();
        let listed: BTreeSet<String> =
            pool_0.status.iter().flat_map(|s| &s.instances).map(|i| format!("{:?} {}", i.state, i.name)).collect();
        let list = runs.list(&Default::default()).await.expect("list").items;
        let busy = list.iter().filter(|r| r.status.as_ref().is_some_and(|s| !s.operations.is_empty())).count();
        let vms = common::installation_vms(&emulator.url, &ns).await;
        let (pool_vms, unowned): (Vec<Value>, Vec<Value>) =
            vms.into_iter().partition(|v| v["labels"]["owner-uid"].as_str() == Some(pool_0_uid.as_str()));
        let in_cloud: BTreeSet<String> =
            pool_vms.iter().filter_map(|v| v["name"].as_str()).map(|n| format!("Ready {n}")).collect();
        if busy == 0 && unowned.is_empty() && listed == in_cloud {
            break unowned;
        }
        assert!(
            Instant::now() < deadline,
            "{busy} runs still deleting; VMs no live object owns: {unowned:#?}; pool-0 lists {listed:?}, the cloud has {in_cloud:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Outcomes: exactly what each command decides, with every shard's result,
    // from the attempt status names.
    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let (mut results, mut lost, mut stale, mut attempts, mut preempted) = (0, 0, 0, 0, 0);
    for run in &finished {
        let name = run.metadata.name.clone().unwrap_or_default();
        let i: usize = name.trim_start_matches("chaos-").parse().expect("index");
        let status = run.status.as_ref().expect("status");
        let phase = status.phase.expect("phase");
        *phases.entry(format!("{phase:?}")).or_default() += 1;
        attempts += status.attempts;
        let expected = if fails(i) { TestRunPhase::Failed } else { TestRunPhase::Succeeded };
        assert_eq!(phase, expected, "{name}: {:#?}", status.shards);
        assert_eq!(status.shards.len(), shards_of[&name], "{name}");
        for shard in &status.shards {
            // Only Spot VMs are preempted, and a preemption never costs an
            // attempt while maxPreemptions (3) allows.
            let told = shard.history.iter().filter(|r| r.outcome == AttemptOutcome::Preempted).count();
            assert!(told == 0 || spot(i), "{name} shard {} preempted on standard VMs", shard.index);
            assert!(shard.uncounted_attempts >= shard.preemptions.min(3), "{name} shard {}: {shard:?}", shard.index);
            preempted += shard.preemptions;
            match &shard.result {
                Some(result) => {
                    results += 1;
                    assert_eq!(result.exit_code, if fails(i) { 1 } else { 0 }, "{name} shard {}", shard.index);
                    if !result.output_tail.contains(&format!("attempt={}\n", shard.attempt)) {
                        stale += 1;
                    }
                }
                None => lost += 1,
            }
        }
    }
    let expected_results: usize =
        shards_of.iter().filter(|(n, _)| !disturbed.runs_deleted.contains(*n)).map(|(_, s)| s).sum();
    assert_eq!((lost, stale), (0, 0), "results lost or taken from a superseded attempt");
    assert_eq!(results, expected_results, "one result per shard of every run left");

    // No shard attempt ever had two VMs: every insert the emulator accepted
    // to make a VM, finished or not.
    let accepted = admin(&emulator, "accepted-inserts").await;
    let accepted = accepted.as_array().expect("accepted inserts");
    let mut per_attempt: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for row in accepted {
        let labels = &row["labels"];
        if labels["owner-kind"] == "testrun" && labels["installation"] == ns.as_str() {
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

    // No agent outlived its VM.
    let history = admin(&emulator, "history").await;
    let history = history.as_array().expect("history");
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
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for rule in faults["rules"].as_array().into_iter().flatten() {
        *by_kind.entry(rule["kind"].as_str().unwrap_or("?").to_string()).or_default() +=
            rule["hits"].as_u64().unwrap_or(0);
    }
    let pool_vms = history.iter().filter(|r| r["labels"]["owner-kind"] == "prebuildpreset").count();
    println!(
        "chaos: {} runs ({} shards), {} deleted mid-flight, the rest finished {:?}; {} results in status; {} attempts \
         ({} preemptions); \
         {} VMs created ({} for pools), {} inserts accepted; faults by kind {:?}; {} controller kills; 1 kube-apiserver restart; \
         {} unreachable-zone windows; {} template changes; {} preset deleted; duplicates 0; unowned {}; lost results 0; \
         stale results accepted 0; stray agents 0; {:.0} s",
        scale.runs,
        shards_of.values().sum::<usize>(),
        disturbed.runs_deleted.len(),
        phases,
        results,
        attempts,
        preempted,
        history.len(),
        pool_vms,
        accepted.len(),
        by_kind,
        disturbed.kills,
        disturbed.unreachable_windows,
        disturbed.template_changes,
        disturbed.presets_deleted,
        unowned.len(),
        started.elapsed().as_secs_f64(),
    );
}

/// Whether every TestRun on this preset has started (so deleting the preset
/// cannot keep one from ever getting its VM shape).
async fn all_started_on(runs: &Api<TestRun>, preset: &str) -> bool {
    let Ok(list) = runs.list(&Default::default()).await else { return false };
    list.items
        .iter()
        .filter(|r| r.spec.preset_ref.as_ref().is_some_and(|p| p.name == preset))
        .all(|r| r.status.as_ref().is_some_and(|s| s.started.is_some()))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
