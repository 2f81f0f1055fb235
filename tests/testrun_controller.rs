//! The TestRun controller end to end: a real kube-apiserver, the compute
//! emulator behind the real client, the controller and real agents, each as
//! its own process.

mod common;

use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use testrun_controller::agent::protocol::{LeaseClaim, ResultReport};
use testrun_controller::agent::tokens::{LeaseKey, LeaseScope};
use testrun_controller::api::ConditionStatus;
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

struct Env {
    ns: String,
    runs: Api<TestRun>,
    client: kube::Client,
    emulator: EmulatorProcess,
    controller: ControllerProcess,
}

async fn setup(test: &str, emulator_args: &[&str], controller_args: &[&str]) -> Env {
    let (client, ns) = common::setup(test).await;
    let emulator =
        EmulatorProcess::start(&[&["--operation-delay", "200ms", "--boot-delay", "50ms"], emulator_args].concat());
    let controller = ControllerProcess::start(common::control_plane_kubeconfig(), &ns, &emulator.url, controller_args);
    let runs = Api::namespaced(client.clone(), &ns);
    Env { ns, runs, client, emulator, controller }
}

fn testrun(name: &str, shards: i32, command: &[&str]) -> Value {
    json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "TestRun",
        "metadata": { "name": name },
        "spec": {
            "shards": shards,
            "command": command,
            "timeout": "2m",
            "heartbeatTimeout": "20s",
            "vm": {
                "zones": ["us-central1-a", "us-central1-b"],
                "machineType": "e2-standard-2",
                "image": "projects/debian-cloud/global/images/family/debian-12"
            }
        }
    })
}

/// A one-shard run whose first attempt hangs (so its lease is lost after
/// 3 s of silence, once its agent is frozen) and whose later attempts run
/// `then`.
fn hangs_in_attempt_1(name: &str, then: &str) -> Value {
    let script = format!("if [ \"$TESTRUN_ATTEMPT\" = 1 ]; then exec sleep 120; fi; {then}");
    let mut body = testrun(name, 1, &["sh", "-c", &script]);
    body["spec"]["heartbeatTimeout"] = json!("3s");
    body
}

impl Env {
    async fn create(&self, body: Value) -> TestRun {
        let run: TestRun = serde_json::from_value(body).expect("TestRun");
        self.runs.create(&PostParams::default(), &run).await.expect("creating the TestRun")
    }

    /// Waits until `check` holds for the run; fails with its status and the controller log.
    async fn wait_for(&self, name: &str, what: &str, timeout: Duration, check: impl Fn(&TestRun) -> bool) -> TestRun {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.runs.get(name).await.expect("reading the TestRun");
            if check(&run) {
                return run;
            }
            if Instant::now() > deadline {
                let log = self.controller.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                panic!(
                    "timed out waiting for {what}; status:\n{}\ncontroller log:\n{}",
                    serde_json::to_string_pretty(&run.status).unwrap_or_default(),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_phase(&self, name: &str, phase: TestRunPhase) -> TestRun {
        self.wait_for(name, &format!("phase {phase:?}"), Duration::from_secs(60), |r| {
            r.status.as_ref().and_then(|s| s.phase) == Some(phase)
        })
        .await
    }

    /// This installation's VMs in the emulator.
    async fn vms(&self) -> Vec<Value> {
        common::installation_vms(&self.emulator.url, &self.ns).await
    }

    /// The agent process of the installation's first VM.
    async fn first_agent_pid(&self) -> i32 {
        self.vms().await[0]["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).expect("the VM booted")
    }

    /// Stops (SIGSTOP) every process of the first VM, its agent among them,
    /// as a frozen VM: no more heartbeats from it.
    async fn freeze_first_agent(&self) -> i32 {
        let pid = self.first_agent_pid().await;
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        pid
    }

    async fn wait_no_vms(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vms = self.vms().await;
            if vms.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "VMs left behind: {vms:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn events(&self) -> Vec<(String, String)> {
        common::events(&self.client, &self.ns).await
    }

    async fn lease_key(&self) -> LeaseKey {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let secret = secrets.get("testrun-controller-lease-key").await.expect("the lease key Secret exists");
        let bytes = secret.data.and_then(|d| d.get("lease-key").cloned()).expect("lease-key");
        LeaseKey::from_bytes(&bytes.0).expect("32 bytes")
    }
}

#[tokio::test]
async fn three_shards_succeed_and_every_vm_is_deleted() {
    let env = setup("three-shards", &[], &[]).await;
    env.create(testrun("ok", 3, &["sh", "-c", "echo hello from shard $TESTRUN_SHARD of $TESTRUN_SHARDS"])).await;
    let run = env.wait_phase("ok", TestRunPhase::Succeeded).await;
    let status = run.status.expect("status");
    assert_eq!(status.shards.len(), 3);
    assert_eq!(status.attempts, 3);
    for shard in &status.shards {
        assert_eq!(shard.phase, TestRunPhase::Succeeded);
        assert_eq!(shard.attempt, 1);
        let result = shard.result.as_ref().expect("a result");
        assert_eq!(result.exit_code, 0);
        assert_eq!(result.output_tail.trim(), format!("hello from shard {} of 3", shard.index));
    }
    let leases: std::collections::BTreeSet<i64> = status.shards.iter().map(|s| s.lease_id).collect();
    assert_eq!(leases.len(), 3, "every shard has its own lease");
    assert!(status.completion_time.is_some());
    assert!(run.metadata.finalizers.unwrap_or_default().contains(&"testrun.dev/cleanup".to_string()));
    env.wait_no_vms().await;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready condition");
    assert_eq!(ready.reason, "Succeeded");
    // Every delete is verified, and then nothing is left to follow.
    env.wait_for("ok", "every delete verified", Duration::from_secs(30), |r| {
        r.status.as_ref().is_some_and(|s| s.operations.is_empty())
    })
    .await;
    // A run that went well is told in one Event, not one per shard and VM.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events = env.events().await;
        if !events.is_empty() {
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(events[0].0, "RunFinished");
            assert!(events[0].1.starts_with("Succeeded: 3 of 3 shards succeeded"), "{events:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no RunFinished Event");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Every VM got its agent from the agent API: the emulator's VMs share
    // one agent folder, so one downloaded it and the two others ran the
    // copy it kept without asking. The copy is the controller's own
    // executable.
    let metrics = env.controller.metrics().await;
    let count = |result: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("testrun_controller_agent_binary_requests_total{{result=\"{result}\"}} "))
            })
            .map_or(0, |v| v.trim().parse::<u64>().expect("a count"))
    };
    assert_eq!((count("full"), count("not_modified")), (1, 0), "{metrics}");
    // On-call's view: the run counted by outcome, nothing left waiting, and
    // every step of each shard's VM timed once (vm_running may be skipped
    // when an agent registers before its insert's operation is read).
    for line in [
        "testrun_controller_runs_finished_total{outcome=\"Succeeded\"} 1",
        "testrun_controller_attempts_finished_total{outcome=\"Succeeded\"} 3",
        "testrun_controller_runs_waiting 0",
        "testrun_controller_shards_waiting 0",
        "testrun_controller_build_info{version=\"",
        "testrun_controller_reconcile_duration_seconds_count{kind=\"testrun\"}",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    for step in ["insert_accepted", "agent_registered", "command_started", "result_accepted"] {
        let line = format!("testrun_controller_shard_step_duration_seconds_count{{step=\"{step}\"}} 3");
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    env.wait_metric("testrun_controller_shard_step_duration_seconds_count{step=\"vm_gone\"} 3").await;
    let exe = std::fs::read(env!("CARGO_BIN_EXE_testrun-controller")).expect("the controller executable");
    let kept: Vec<_> =
        std::fs::read_dir(env.emulator.work_dir.join("agent")).expect("the agent folder").flatten().collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].file_name().to_string_lossy().starts_with("testrun-agent-"), "{kept:?}");
    assert!(std::fs::read(kept[0].path()).expect("the fetched agent") == exe, "the VMs ran another executable");
}

#[tokio::test]
async fn a_failing_shard_fails_the_run_with_its_exit_code_and_kubectl_wait_sees_either_end() {
    let env = setup("failing-shard", &[], &[]).await;
    env.create(testrun(
        "bad",
        2,
        &["sh", "-c", "echo checking; if [ $TESTRUN_SHARD = 1 ]; then echo boom >&2; exit 3; fi"],
    ))
    .await;
    env.create(testrun("good", 1, &["true"])).await;
    // What CI does: wait for an end by condition, with kubectl.
    let ns = env.ns.clone();
    let wait = move |args: &[&str]| {
        let ns = ns.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let mut all = vec!["wait".to_string(), "-n".to_string(), ns];
            all.extend(args);
            common::kubectl(&all.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    // Reconciling=False: either end (or stuck), one command for both runs.
    let (ok, out, err) =
        wait(&["--for=condition=Reconciling=False", "tr/bad", "tr/good", "--timeout=90s"]).await.expect("kubectl wait");
    assert!(ok, "kubectl wait for either end: {out}{err}");
    let (ok, out, err) = wait(&["--for=condition=Failed", "tr/bad", "--timeout=10s"]).await.expect("kubectl wait");
    assert!(ok && out.contains("condition met"), "kubectl wait Failed: {out}{err}");
    let (ok, out, err) = wait(&["--for=condition=Complete", "tr/good", "--timeout=10s"]).await.expect("kubectl wait");
    assert!(ok && out.contains("condition met"), "kubectl wait Complete: {out}{err}");
    let (ok, _, _) = wait(&["--for=condition=Complete", "tr/bad", "--timeout=2s"]).await.expect("kubectl wait");
    assert!(!ok, "a failed run never reads as Complete");
    // Argo CD's view, from the repository's health checks.
    let good = env.runs.get("good").await.expect("the run");
    let message = common::argocd::expect_health("TestRun", &good, "succeeded", "Healthy");
    assert_eq!(message, "Succeeded: 1 of 1 shards succeeded");
    let run = env.wait_phase("bad", TestRunPhase::Failed).await;
    let message = common::argocd::expect_health("TestRun", &run, "failed", "Degraded");
    assert!(message.starts_with("Failed: 2 shards: 1 succeeded"), "{message}");
    let status = run.status.expect("status");
    let failed = status.conditions.iter().find(|c| c.type_ == "Failed").expect("a Failed condition");
    assert_eq!((failed.status, failed.reason.as_str()), (ConditionStatus::True, "Failed"));
    assert!(failed.message.contains("shard 1 Failed: attempt 1 exited with code 3"), "{}", failed.message);
    let stalled = status.conditions.iter().find(|c| c.type_ == "Stalled").expect("a Stalled condition");
    assert_eq!(stalled.status, ConditionStatus::True, "kstatus reads a failed run as Failed");
    let failed = status.shards.iter().find(|s| s.index == 1).expect("shard 1");
    assert_eq!(failed.phase, TestRunPhase::Failed);
    let result = failed.result.as_ref().expect("result");
    assert_eq!(result.exit_code, 3);
    assert!(result.output_tail.contains("boom"), "{result:?}");
    assert_eq!(failed.attempt, 1, "a failing test does not use up attempts");
    let told: Vec<_> = failed.history.iter().map(|r| (r.attempt, r.outcome, r.exit_code)).collect();
    assert_eq!(told, [(1, testrun_controller::api::testrun::AttemptOutcome::TestFailed, Some(3))]);
    assert_eq!(status.shards[0].phase, TestRunPhase::Succeeded);
    env.wait_no_vms().await;
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_creates_no_vm() {
    let env = setup("invalid-spec", &[], &[]).await;
    let mut body = testrun("invalid", 1, &["true"]);
    body["spec"]["env"] = json!([{ "name": "A", "value": "1" }, { "name": "A", "value": "2" }]);
    env.create(body).await;
    let run = env
        .wait_for("invalid", "an InvalidSpec condition", Duration::from_secs(30), |r| {
            r.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "InvalidSpec" && c.status == testrun_controller::api::ConditionStatus::True)
            })
        })
        .await;
    let message = common::argocd::expect_health("TestRun", &run, "invalid-spec", "Degraded");
    assert!(message.starts_with("InvalidSpec: "), "{message}");
    let status = run.status.expect("status");
    let condition = status.conditions.iter().find(|c| c.type_ == "InvalidSpec").expect("condition");
    assert!(condition.message.contains("spec.env[1].name"), "{}", condition.message);
    assert!(status.shards.is_empty() && status.operations.is_empty());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(env.vms().await.is_empty(), "no VM for an invalid spec");

    // A default never makes a spec invalid: a run that sets only a timeout
    // shorter than the default heartbeatTimeout (60s) runs.
    let mut short = testrun("short", 1, &["true"]);
    short["spec"]["timeout"] = json!("8s");
    short["spec"].as_object_mut().expect("spec").remove("heartbeatTimeout");
    env.create(short).await;

    // Fixing the spec lets it run.
    env.runs
        .patch(
            "invalid",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"env": [{ "name": "A", "value": "1" }]}})),
        )
        .await
        .expect("fixing the spec");
    env.wait_phase("invalid", TestRunPhase::Succeeded).await;
    let short = env.wait_phase("short", TestRunPhase::Succeeded).await;
    assert_eq!(short.spec.heartbeat_timeout.as_str(), "60s", "the default was applied");
}

#[tokio::test]
async fn deleting_a_running_testrun_deletes_its_vms_first() {
    let env = setup("delete-mid-run", &[], &[]).await;
    env.create(testrun("long", 2, &["sleep", "300"])).await;
    let run = env
        .wait_for("long", "both shards running", Duration::from_secs(60), |r: &TestRun| {
            r.status.as_ref().is_some_and(|s| s.shards.iter().all(|s| s.phase == TestRunPhase::Running))
        })
        .await;
    let message = common::argocd::expect_health("TestRun", &run, "running", "Progressing");
    assert!(message.starts_with("Running: 2 shards: 0 succeeded, 2 running"), "{message}");
    assert_eq!(env.vms().await.len(), 2);
    env.runs.delete("long", &DeleteParams::default()).await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.runs.get_opt("long").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "the TestRun was not removed; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(env.vms().await.is_empty(), "the finalizer went before the VMs");
}

#[tokio::test]
async fn a_deleted_run_whose_vm_delete_hangs_keeps_its_finalizer_until_the_vm_is_gone() {
    let env = setup("hung-cleanup", &[], &["--operation-timeout", "4s", "--delete-retry-base", "100ms"]).await;
    env.create(testrun("hung", 1, &["sleep", "300"])).await;
    env.wait_phase("hung", TestRunPhase::Running).await;
    env.add_fault(json!({ "call": "delete", "kind": "hang", "count": 1 })).await;
    env.runs.delete("hung", &DeleteParams::default()).await.expect("delete");
    // The hung delete leaves the VM: the finalizer holds until the delete
    // is settled at its deadline, made again and verified.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_held = false;
    while env.runs.get_opt("hung").await.expect("get").is_some() {
        if !env.vms().await.is_empty() {
            seen_held = true;
        }
        assert!(Instant::now() < deadline, "the TestRun was not removed; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen_held, "the VM outlived the first (hung) delete while the TestRun was held");
    assert!(env.vms().await.is_empty(), "the finalizer went before the VM");
    assert_eq!(env.calls().await["instances.delete"], 2, "one hung delete, one that went through");
}

#[tokio::test]
async fn forged_stale_and_malformed_agent_calls_are_refused() {
    let env = setup("forged-tokens", &[], &[]).await;
    env.create(testrun("guarded", 1, &["sleep", "300"])).await;
    let run = env.wait_phase("guarded", TestRunPhase::Running).await;
    let uid = run.metadata.uid.clone().expect("uid");
    let shard = run.status.as_ref().expect("status").shards[0].clone();
    let key = env.lease_key().await;
    let http = reqwest::Client::new();
    let url = env.controller.agent_url();
    let post = |path: &'static str, body: Value| {
        let http = http.clone();
        let url = url.clone();
        async move { http.post(format!("{url}{path}")).json(&body).send().await.expect("agent API").status().as_u16() }
    };
    let claim = |lease_id: i64, attempt: i32, token: String| LeaseClaim {
        namespace: env.ns.clone(),
        testrun: "guarded".into(),
        shard: 0,
        attempt,
        lease_id,
        lease_token: token,
    };
    let scope = |lease_id: i64, attempt: i32| LeaseScope { uid: &uid, shard: 0, attempt, lease_id };

    // Registration with a VM token of another VM.
    let register = json!({
        "namespace": env.ns, "testrun": "guarded", "ownerUid": uid, "shard": 0, "attempt": 1,
        "instance": shard.instance, "vmToken": key.vm_token("some-other-vm", &uid),
    });
    assert_eq!(post("/agent/v1/register", register).await, 403);
    // A genuine VM whose agent started as another build than the
    // controller's: 426, so its startup script fetches the current build.
    let genuine = json!({
        "namespace": env.ns, "testrun": "guarded", "ownerUid": uid, "shard": 0, "attempt": 1,
        "instance": shard.instance, "vmToken": key.vm_token(shard.instance.as_deref().unwrap_or_default(), &uid),
    });
    let stale = http
        .post(format!("{url}/agent/v1/register"))
        .header("Testrun-Agent-Build", "0".repeat(64))
        .json(&genuine)
        .send()
        .await
        .expect("agent API");
    assert_eq!(stale.status(), 426);
    let body: Value = stale.json().await.expect("a JSON error");
    assert_eq!(body["reason"], "StaleBuild", "{body}");
    // A heartbeat with a made-up token.
    let forged = claim(shard.lease_id, 1, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    assert_eq!(post("/agent/v1/heartbeat", serde_json::to_value(&forged).expect("json")).await, 403);
    // A result from an older lease than the current one, with a valid token for it.
    let stale = claim(shard.lease_id - 1, 1, key.lease_token(&scope(shard.lease_id - 1, 1)));
    let report = ResultReport { lease: stale.clone(), exit_code: 0, duration_ms: 1, output_tail: "poison".into() };
    assert_eq!(post("/agent/v1/result", serde_json::to_value(&report).expect("json")).await, 409);
    assert_eq!(post("/agent/v1/heartbeat", serde_json::to_value(&stale).expect("json")).await, 409);
    // A lease newer than the controller's view (only its own write can mint
    // one, and the view lags behind it): "retry", and nothing is stored.
    let ahead = claim(shard.lease_id + 1, 1, key.lease_token(&scope(shard.lease_id + 1, 1)));
    let report = ResultReport { lease: ahead.clone(), exit_code: 0, duration_ms: 1, output_tail: "poison".into() };
    assert_eq!(post("/agent/v1/result", serde_json::to_value(&report).expect("json")).await, 503);
    // A token for the right lease used by another run's name.
    let mut other = claim(shard.lease_id, 1, key.lease_token(&scope(shard.lease_id, 1)));
    other.testrun = "someone-else".into();
    assert_eq!(post("/agent/v1/heartbeat", serde_json::to_value(&other).expect("json")).await, 503);
    // Malformed and oversized bodies.
    let malformed = http.post(format!("{url}/agent/v1/heartbeat")).body("{not json").send().await.expect("send");
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.expect("a JSON error");
    assert_eq!(body["reason"], "Malformed");
    let huge = http.post(format!("{url}/agent/v1/result")).body(vec![b'x'; 70 * 1024]).send().await.expect("send");
    assert_eq!(huge.status(), 413);
    let unknown_field = json!({"namespace": env.ns, "testrun": "guarded", "shard": 0, "attempt": 1, "leaseId": 1, "leaseToken": "x", "admin": true});
    assert_eq!(post("/agent/v1/heartbeat", unknown_field).await, 400);

    // Nothing changed: the shard still runs under its lease, no result.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = env.runs.get("guarded").await.expect("get");
    let current = &now.status.expect("status").shards[0];
    assert_eq!((current.phase, current.lease_id, current.attempt), (TestRunPhase::Running, shard.lease_id, 1));
    assert!(current.result.is_none(), "a forged or stale report never lands");
    let metrics = env.controller.metrics().await;
    for (name, at_least) in
        [("agent_forged_requests_total", 2), ("agent_stale_reports_total", 2), ("agent_malformed_requests_total", 2)]
    {
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("testrun_controller_{name} ")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"));
        assert!(value >= at_least, "{name} = {value}");
    }
}

fn group_alive(pid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

async fn wait_dead(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while group_alive(pid) {
        assert!(Instant::now() < deadline, "process group {pid} still alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_command_running_past_its_timeout_ends_as_timed_out() {
    let env = setup("timeout", &[], &[]).await;
    let mut body = testrun("slow", 1, &["sleep", "120"]);
    body["spec"]["timeout"] = json!("3s");
    body["spec"]["heartbeatTimeout"] = json!("2s");
    env.create(body).await;
    env.wait_phase("slow", TestRunPhase::Running).await;
    let pid = env.first_agent_pid().await;
    let run = env.wait_phase("slow", TestRunPhase::TimedOut).await;
    let message = common::argocd::expect_health("TestRun", &run, "timed-out", "Degraded");
    assert!(message.contains("ran longer than 3s"), "{message}");
    let shard = &run.status.expect("status").shards[0];
    assert_eq!(shard.phase, TestRunPhase::TimedOut);
    assert!(shard.message.as_deref().unwrap_or_default().contains("longer than 3s"), "{shard:?}");
    assert!(shard.result.is_none());
    env.wait_no_vms().await;
    wait_dead(pid).await;
}

#[tokio::test]
async fn a_zone_out_of_capacity_sends_the_vm_to_the_next_zone() {
    let env = setup("capacity", &["--fault", "call=insert,zone=us-central1-a,kind=capacity,count=1"], &[]).await;
    env.create(testrun("elsewhere", 1, &["true"])).await;
    let run = env.wait_phase("elsewhere", TestRunPhase::Succeeded).await;
    let status = run.status.expect("status");
    let shard = &status.shards[0];
    assert_eq!(shard.zone.as_deref(), Some("us-central1-b"));
    assert_eq!(shard.attempt, 1, "moving to another zone does not use up an attempt");
    // Degraded says the state now: the shard got its VM, so it is over; the
    // Event keeps what happened.
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").expect("a Degraded condition");
    assert_eq!((degraded.status, degraded.reason.as_str()), (ConditionStatus::False, "AsExpected"));
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, n)| r == "ZoneUnavailable"
            && n.contains("zone us-central1-a has no capacity for e2-standard-2; trying us-central1-b")),
        "{events:?}"
    );
    env.wait_no_vms().await;
}

#[tokio::test]
async fn an_insert_whose_answer_was_lost_is_made_again_with_its_request_id_and_followed() {
    // The first insert in zone a is carried out, but answered with HTTP 503;
    // its operation takes 8 s and then fails for capacity. Made again with
    // the same request id, the call returns that operation, and its failure
    // sends the VM to zone b in the same attempt. (A new request id would be
    // told the VM exists, take it for made, and lose it when the operation
    // fails: a second attempt, or a VM in zone a.)
    let env = setup(
        "lost-answer",
        &[
            "--fault",
            "call=insert,zone=us-central1-a,kind=lostAnswer,count=1",
            "--fault",
            "call=insert,zone=us-central1-a,kind=capacity,count=1",
            "--fault",
            "call=insert,zone=us-central1-a,kind=slow,delayMs=8000,count=1",
        ],
        &[],
    )
    .await;
    env.create(testrun("lost", 1, &["true"])).await;
    let run = env.wait_phase("lost", TestRunPhase::Succeeded).await;
    let shard = &run.status.expect("status").shards[0];
    assert_eq!((shard.zone.as_deref(), shard.attempt), (Some("us-central1-b"), 1), "{shard:?}");
    let events = env.events().await;
    assert!(events.iter().any(|(r, n)| r == "ZoneUnavailable" && n.contains("us-central1-a")), "{events:?}");
    env.wait_no_vms().await;
}

#[tokio::test]
async fn a_lost_lease_moves_the_shard_to_a_new_attempt_and_the_old_worker_is_refused() {
    let env = setup("lost-lease", &[], &[]).await;
    env.create(hangs_in_attempt_1("flaky", "echo finished by attempt $TESTRUN_ATTEMPT")).await;
    let first = env.wait_phase("flaky", TestRunPhase::Running).await;
    let old = first.status.as_ref().expect("status").shards[0].clone();
    let uid = first.metadata.uid.clone().expect("uid");
    // Freeze the agent: no more heartbeats from attempt 1.
    let pid = env.freeze_first_agent().await;

    let run = env.wait_phase("flaky", TestRunPhase::Succeeded).await;
    let shard = &run.status.as_ref().expect("status").shards[0];
    assert_eq!(shard.attempt, 2);
    assert!(shard.lease_id > old.lease_id, "a new attempt has a new, larger lease");
    let result = shard.result.as_ref().expect("result");
    assert_eq!(result.output_tail.trim(), "finished by attempt 2");
    let events = env.events().await;
    assert!(events.iter().any(|(r, _)| r == "LeaseLost"), "{events:?}");
    wait_dead(pid).await;

    // The old worker comes back and reports: refused, nothing changes.
    let key = env.lease_key().await;
    let scope = LeaseScope { uid: &uid, shard: 0, attempt: old.attempt, lease_id: old.lease_id };
    let report = ResultReport {
        lease: LeaseClaim {
            namespace: env.ns.clone(),
            testrun: "flaky".into(),
            shard: 0,
            attempt: old.attempt,
            lease_id: old.lease_id,
            lease_token: key.lease_token(&scope),
        },
        exit_code: 1,
        duration_ms: 1,
        output_tail: "stale".into(),
    };
    let response = reqwest::Client::new()
        .post(format!("{}/agent/v1/result", env.controller.agent_url()))
        .json(&report)
        .send()
        .await
        .expect("agent API");
    assert_eq!(response.status(), 409);
    let after = env.runs.get("flaky").await.expect("get");
    let shard = &after.status.expect("status").shards[0];
    assert_eq!(shard.result.as_ref(), Some(result));
    // Each attempt says why it ended, on its own VM.
    use testrun_controller::api::testrun::AttemptOutcome;
    let told: Vec<(i32, AttemptOutcome, Option<i32>)> =
        shard.history.iter().map(|r| (r.attempt, r.outcome, r.exit_code)).collect();
    assert_eq!(told, [(1, AttemptOutcome::LeaseLost, None), (2, AttemptOutcome::Succeeded, Some(0))]);
    assert_eq!(shard.history[0].instance, old.instance);
    assert_ne!(shard.history[0].instance, shard.history[1].instance);
    env.wait_no_vms().await;
    env.wait_metric("testrun_controller_attempts_finished_total{outcome=\"LeaseLost\"} 1").await;
}

#[tokio::test]
async fn spec_changes_after_the_start_are_reported_and_every_attempt_runs_what_the_run_started_with() {
    let env = setup("spec-change", &[], &[]).await;
    env.create(hangs_in_attempt_1("steady", "echo attempt $TESTRUN_ATTEMPT of $TESTRUN_SHARDS")).await;
    env.wait_phase("steady", TestRunPhase::Running).await;
    let changed = json!({ "spec": { "shards": 2, "command": ["sh", "-c", "echo changed; exit 3"] } });
    env.runs.patch("steady", &PatchParams::default(), &Patch::Merge(&changed)).await.expect("patch");
    let reported = env
        .wait_for("steady", "SpecChanged", Duration::from_secs(30), |r| {
            r.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| c.type_ == "SpecChanged" && c.status == ConditionStatus::True)
            })
        })
        .await;
    let condition = reported.status.expect("status").conditions.into_iter().find(|c| c.type_ == "SpecChanged");
    assert!(condition.is_some_and(|c| c.message.contains("spec.shards, spec.command")));
    // Attempt 1 is lost; attempt 2 runs the command the run started with.
    let pid = env.freeze_first_agent().await;
    let run = env.wait_phase("steady", TestRunPhase::Succeeded).await;
    let status = run.status.expect("status");
    assert_eq!(status.shards.len(), 1, "no shard added");
    assert_eq!(status.shards[0].attempt, 2);
    let result = status.shards[0].result.as_ref().expect("result");
    assert_eq!(result.output_tail.trim(), "attempt 2 of 1");
    let events = env.events().await;
    assert!(events.iter().any(|(r, _)| r == "SpecChangeIgnored"), "{events:?}");
    wait_dead(pid).await;
    env.wait_no_vms().await;
}

#[tokio::test]
async fn the_largest_legal_run_fits_in_etcd_to_the_end() {
    use testrun_controller::api::validation::{MAX_COMMAND_BYTES, MAX_METADATA_BYTES};
    let env = setup("largest-run", &[], &["--compute-qps", "500"]).await;
    // 256 shards, each printing 8 KiB of control characters (six bytes each
    // once escaped in JSON), with command, env, labels and metadata at their
    // limits, reached with control characters and `&` (which kube-apiserver's
    // encoder escapes for HTML: six bytes too).
    let script = "head -c 8192 /dev/zero | tr '\\000' '\\001'";
    let env_vars: Vec<Value> =
        (0..256).map(|i| json!({ "name": format!("V{i:03}"), "value": "e".repeat(120) })).collect();
    let env_bytes: usize = 256 * (4 + 120);
    let script_bytes = testrun_controller::api::validation::json_len(script);
    let padding = "\u{1}".repeat((MAX_COMMAND_BYTES - env_bytes - script_bytes - "sh".len() - "-c".len()) / 6);
    let mut body = testrun("largest", 256, &["sh", "-c", script, &padding]);
    body["spec"]["env"] = json!(env_vars);
    let labels: serde_json::Map<String, Value> =
        (0..56).map(|i| (format!("l{i:02}{}", "k".repeat(60)), json!("v".repeat(63)))).collect();
    let metadata: serde_json::Map<String, Value> = (0..32)
        .map(|i| {
            let c = if i % 2 == 0 { "\u{1}" } else { "&" };
            (format!("m{i:02}"), json!(c.repeat((MAX_METADATA_BYTES / 32 - 3) / 6)))
        })
        .collect();
    body["spec"]["vm"]["labels"] = json!(labels);
    body["spec"]["vm"]["metadata"] = json!(metadata);
    env.create(body).await;

    let run = env
        .wait_for("largest", "all 256 shards to finish", Duration::from_secs(240), |r| {
            r.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_finished())
        })
        .await;
    let status = run.status.clone().expect("status");
    let conditions = &status.conditions;
    assert!(
        !conditions.iter().any(|c| c.type_ == "InvalidSpec" && c.status == ConditionStatus::True),
        "the largest legal spec is valid: {conditions:?}"
    );
    assert_eq!(
        status.phase,
        Some(TestRunPhase::Succeeded),
        "{:?}",
        status.shards.iter().find(|s| s.phase != TestRunPhase::Succeeded)
    );
    assert_eq!(status.shards.iter().filter(|s| s.result.as_ref().is_some_and(|r| r.exit_code == 0)).count(), 256);
    let tail = status.shards[0].result.as_ref().map(|r| r.output_tail.clone()).unwrap_or_default();
    assert!(!tail.is_empty() && tail.chars().all(|c| c == '\u{1}'), "the end of the output is kept");
    // The object as kube-apiserver writes it (the encoder it stores with).
    let path = format!("/apis/testrun.dev/v1alpha1/namespaces/{}/testruns/largest", env.ns);
    let request = http::Request::get(path).body(Vec::new()).expect("request");
    let size = env.client.request_text(request).await.expect("raw get").len();
    eprintln!("largest legal run: {size} bytes as kube-apiserver writes it");
    assert!(size < 1024 * 1024, "the object takes {size} bytes");
    env.wait_no_vms().await;
}

#[tokio::test]
async fn a_controller_killed_mid_run_finishes_the_run_after_restart() {
    let mut env = setup("restart", &[], &[]).await;
    env.create(testrun("survivor", 2, &["sh", "-c", "sleep 4; echo done $TESTRUN_SHARD"])).await;
    // Kill it while VMs are being requested, and again while tests run.
    env.wait_for("survivor", "a requested VM", Duration::from_secs(30), |r| {
        r.status.as_ref().is_some_and(|s| !s.operations.is_empty())
    })
    .await;
    env.controller.kill_hard();
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.controller.restart();
    env.wait_phase("survivor", TestRunPhase::Running).await;
    env.controller.kill_hard();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.controller.restart();

    let run = env.wait_phase("survivor", TestRunPhase::Succeeded).await;
    let status = run.status.expect("status");
    assert_eq!(status.attempts, 2, "no attempt was repeated");
    for shard in &status.shards {
        assert_eq!(shard.attempt, 1);
        assert_eq!(
            shard.result.as_ref().map(|r| r.output_tail.trim().to_string()),
            Some(format!("done {}", shard.index))
        );
    }
    env.wait_no_vms().await;
}

#[tokio::test]
async fn a_finished_run_is_deleted_after_its_ttl() {
    let env = setup("ttl", &[], &[]).await;
    let mut body = testrun("short-lived", 1, &["true"]);
    body["spec"]["ttlSecondsAfterFinished"] = json!(1);
    env.create(body).await;
    env.wait_phase("short-lived", TestRunPhase::Succeeded).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.runs.get_opt("short-lived").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "the TestRun outlived its ttl; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(env.vms().await.is_empty());
}

#[tokio::test]
async fn failing_deletes_are_retried_reported_and_finally_verified() {
    let env =
        setup("delete-retries", &["--fault", "call=delete,kind=fail,count=6"], &["--delete-retry-base", "100ms"]).await;
    env.create(testrun("sticky", 1, &["true"])).await;
    env.wait_phase("sticky", TestRunPhase::Succeeded).await;
    let failing = env
        .wait_for("sticky", "a DeletionFailing condition", Duration::from_secs(60), |r| {
            r.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "DeletionFailing" && c.status == testrun_controller::api::ConditionStatus::True)
            })
        })
        .await;
    let condition = failing
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "DeletionFailing")
        .expect("condition");
    assert!(condition.message.contains("failed 5 times"), "{}", condition.message);
    assert_eq!(env.vms().await.len(), 1, "the VM is still there while deletes fail");
    env.wait_metric("testrun_controller_deletes_failing 1").await;
    // The seventh try goes through; the delete is verified and the alarm clears.
    env.wait_for("sticky", "the alarm to clear", Duration::from_secs(60), |r| {
        r.status.as_ref().is_some_and(|s| {
            s.operations.is_empty()
                && s.conditions.iter().any(|c| {
                    c.type_ == "DeletionFailing" && c.status == testrun_controller::api::ConditionStatus::False
                })
        })
    })
    .await;
    env.wait_no_vms().await;
    env.wait_metric("testrun_controller_deletes_failing 0").await;
    let events = env.events().await;
    assert!(events.iter().any(|(r, _)| r == "DeletionFailing"), "{events:?}");
    let metrics = env.controller.metrics().await;
    assert!(metrics.contains("testrun_controller_events_total{reason=\"DeleteFailed\"}"), "{metrics}");
}

#[tokio::test]
async fn a_vanished_delete_is_noticed_and_repeated() {
    let env =
        setup("vanished-delete", &["--fault", "call=delete,kind=vanish,count=1"], &["--delete-retry-base", "100ms"])
            .await;
    env.create(testrun("ghost", 1, &["true"])).await;
    env.wait_phase("ghost", TestRunPhase::Succeeded).await;
    env.wait_no_vms().await;
    let run = env
        .wait_for("ghost", "no operation left", Duration::from_secs(30), |r| {
            r.status.as_ref().is_some_and(|s| s.operations.is_empty())
        })
        .await;
    assert_eq!(run.status.expect("status").phase, Some(TestRunPhase::Succeeded));
}

impl Env {
    /// Adds a fault rule over the emulator's admin API; returns its id.
    async fn add_fault(&self, rule: Value) -> u64 {
        let url = format!("{}/emulator/v1/faults", self.emulator.url);
        let added = reqwest::Client::new().post(&url).json(&rule).send().await.expect("admin API");
        assert_eq!(added.status(), 201, "{rule}");
        let body: Value = added.json().await.expect("json");
        body["id"].as_u64().expect("an id")
    }

    async fn remove_fault(&self, id: u64) {
        let url = format!("{}/emulator/v1/faults/{id}", self.emulator.url);
        let removed = reqwest::Client::new().delete(&url).send().await.expect("admin API");
        assert_eq!(removed.status(), 204);
    }

    /// Calls the emulator has answered, by method.
    async fn calls(&self) -> Value {
        let url = format!("{}/emulator/v1/calls", self.emulator.url);
        reqwest::get(&url).await.expect("admin API").json().await.expect("json")
    }

    /// Waits until the controller's metrics contain `line`.
    async fn wait_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = self.controller.metrics().await;
            if metrics.lines().any(|l| l.starts_with(line)) {
                return;
            }
            assert!(Instant::now() < deadline, "no metric line {line:?} in:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn an_unreachable_zone_is_never_read_as_a_lost_vm_or_a_finished_delete() {
    let env = setup("unreachable", &[], &["--inventory-resync", "1s", "--delete-retry-base", "100ms"]).await;
    let mut body = testrun("cut-off", 1, &["sleep", "6"]);
    body["spec"]["vm"]["zones"] = json!(["us-central1-a"]);
    env.create(body).await;
    env.wait_phase("cut-off", TestRunPhase::Running).await;
    env.wait_for("cut-off", "the agent to register", Duration::from_secs(60), |r| {
        r.status.as_ref().is_some_and(|s| s.shards.iter().any(|sh| sh.last_heartbeat.is_some()))
    })
    .await;
    let fault = env.add_fault(json!({ "zone": "us-central1-a", "kind": "unreachable" })).await;
    env.wait_metric("testrun_controller_inventory_unreachable_zones 1").await;
    // Lists keep coming back without the zone's VM; the shard keeps its
    // attempt and its VM, and no second VM is made.
    let run = env.wait_phase("cut-off", TestRunPhase::Succeeded).await;
    let status = run.status.expect("status");
    assert_eq!(status.shards[0].attempt, 1, "a partial list lost no VM: {status:?}");
    assert_eq!(status.attempts, 1);
    assert_eq!(env.calls().await["instances.insert"], 1);
    assert!(
        env.controller.metrics().await.contains("testrun_controller_inventory_lists_total{reason=\"partial\"}"),
        "lists were partial while the zone was cut off"
    );

    // Deleted while the zone is cut off: the finalizer stays, and so does the VM.
    env.runs.delete("cut-off", &DeleteParams::default()).await.expect("delete");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kept = env.runs.get("cut-off").await.expect("the TestRun is kept while its VM cannot be verified gone");
    assert!(kept.metadata.deletion_timestamp.is_some());
    assert!(kept.metadata.finalizers.unwrap_or_default().contains(&"testrun.dev/cleanup".to_string()));
    assert_eq!(env.vms().await.len(), 1, "the VM is still there");

    // The zone answers again: the VM is deleted, verified, and the TestRun goes.
    env.remove_fault(fault).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.runs.get_opt("cut-off").await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "the TestRun was not released; log:\n{}", env.controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_no_vms().await;
}

#[tokio::test]
async fn a_hung_delete_is_settled_at_its_deadline_and_made_again() {
    let env = setup(
        "hung-delete",
        &["--fault", "call=delete,kind=hang,count=1"],
        &["--operation-timeout", "4s", "--delete-retry-base", "100ms"],
    )
    .await;
    env.create(testrun("stuck", 1, &["true"])).await;
    env.wait_phase("stuck", TestRunPhase::Succeeded).await;
    env.wait_for("stuck", "the delete to be made again and verified", Duration::from_secs(60), |r| {
        r.status.as_ref().is_some_and(|s| s.operations.is_empty())
    })
    .await;
    env.wait_no_vms().await;
    assert_eq!(env.calls().await["instances.delete"], 2, "one hung delete, one that went through");
    env.wait_metric("testrun_controller_operations_resolved_total{kind=\"delete\",how=\"deadline\"} 1").await;
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, m)| r == "DeleteFailed" && m.contains("did not finish within --operation-timeout")),
        "the hung delete is surfaced: {events:?}"
    );
}

#[tokio::test]
async fn max_failed_shards_0_stops_a_ten_shard_run_at_its_first_failure_and_deletes_every_vm() {
    let env = setup("fail-fast", &[], &[]).await;
    let mut body =
        testrun("fast", 10, &["sh", "-c", "if [ $TESTRUN_SHARD = 3 ]; then sleep 2; exit 1; fi; exec sleep 120"]);
    body["spec"]["maxFailedShards"] = json!(0);
    env.create(body).await;
    let run = env.wait_phase("fast", TestRunPhase::Failed).await;
    let status = run.status.expect("status");
    for shard in &status.shards {
        let want = if shard.index == 3 { TestRunPhase::Failed } else { TestRunPhase::Cancelled };
        assert_eq!(shard.phase, want, "shard {}: {:?}", shard.index, shard.message);
    }
    assert!(
        status.shards[0].message.as_deref().unwrap_or_default().contains("more than spec.maxFailedShards (0)"),
        "{:?}",
        status.shards[0].message
    );
    let failed = status.conditions.iter().find(|c| c.type_ == "Failed").expect("Failed");
    assert!(failed.message.contains("shard 3 Failed: attempt 1 exited with code 1"), "{}", failed.message);
    // No money spent on a run already red: every VM goes, long before the
    // other shards' two minutes.
    env.wait_no_vms().await;
    let events = env.events().await;
    assert!(events.iter().any(|(r, n)| r == "FailFast" && n.contains("stopped 9 other shards")), "{events:?}");
}

#[tokio::test]
async fn exit_code_75_is_retried_by_a_retry_shard_rule_and_other_codes_end_the_shard() {
    use testrun_controller::api::testrun::AttemptOutcome;
    let env = setup("retry-rule", &[], &[]).await;
    // Shard 0 exits 75 (temporary failure) once, then passes; shard 1
    // exits 3, which no rule retries.
    let script = "if [ $TESTRUN_SHARD = 1 ]; then exit 3; fi; \
                  if [ $TESTRUN_ATTEMPT = 1 ]; then exit 75; fi; echo passed on attempt $TESTRUN_ATTEMPT";
    let mut body = testrun("flaky-exit", 2, &["sh", "-c", script]);
    body["spec"]["failurePolicy"] =
        json!({"rules": [{"action": "RetryShard", "onExitCodes": {"operator": "In", "values": [75]}}]});
    env.create(body).await;
    let run = env.wait_phase("flaky-exit", TestRunPhase::Failed).await;
    let status = run.status.expect("status");
    let told = |i: usize| -> Vec<(i32, AttemptOutcome, Option<i32>)> {
        status.shards[i].history.iter().map(|r| (r.attempt, r.outcome, r.exit_code)).collect()
    };
    assert_eq!(told(0), [(1, AttemptOutcome::TestFailed, Some(75)), (2, AttemptOutcome::Succeeded, Some(0))]);
    assert_eq!(status.shards[0].phase, TestRunPhase::Succeeded);
    assert_eq!(status.shards[0].result.as_ref().map(|r| r.output_tail.trim()), Some("passed on attempt 2"));
    assert_eq!(status.shards[0].uncounted_attempts, 0, "RetryShard counts the attempt");
    assert_eq!(told(1), [(1, AttemptOutcome::TestFailed, Some(3))]);
    assert_eq!(status.shards[1].phase, TestRunPhase::Failed);
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, n)| r == "AttemptFailed"
            && n.contains("shard 0 attempt 1 exited with code 75")
            && n.contains("(failurePolicy.rules[0]); starting attempt 2")),
        "{events:?}"
    );
    env.wait_no_vms().await;
}

#[tokio::test]
async fn a_fail_run_rule_stops_every_other_shard_and_deletes_its_vm() {
    let env = setup("fail-run", &[], &[]).await;
    let mut body =
        testrun("red", 4, &["sh", "-c", "if [ $TESTRUN_SHARD = 2 ]; then sleep 2; exit 9; fi; exec sleep 120"]);
    body["spec"]["failurePolicy"] = json!({"rules": [
        {"action": "FailRun", "onExitCodes": {"operator": "In", "values": [9]}},
    ]});
    env.create(body).await;
    let run = env.wait_phase("red", TestRunPhase::Failed).await;
    let status = run.status.expect("status");
    for shard in &status.shards {
        let want = if shard.index == 2 { TestRunPhase::Failed } else { TestRunPhase::Cancelled };
        assert_eq!(shard.phase, want, "shard {}: {:?}", shard.index, shard.message);
    }
    env.wait_no_vms().await;
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, n)| r == "FailRun" && n.contains("which fails the run; stopped 3 other shards")),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_preempted_spot_vm_is_retried_without_using_an_attempt_then_the_shard_falls_back_to_standard() {
    use testrun_controller::api::testrun::AttemptOutcome;
    let env = setup("preempted", &["--preempt-notice", "5s"], &[]).await;
    // Attempts 1 and 2 run until preempted; attempt 3 passes.
    let script = "if [ $TESTRUN_ATTEMPT -lt 3 ]; then exec sleep 120; fi; sleep 3; echo passed on $TESTRUN_ATTEMPT";
    let mut body = testrun("spot", 1, &["sh", "-c", script]);
    body["spec"]["vm"]["spot"] = json!(true);
    body["spec"]["maxAttempts"] = json!(1);
    body["spec"]["maxPreemptions"] = json!(2);
    env.create(body).await;
    let vm_of = |run: &TestRun| {
        let shard = &run.status.as_ref().expect("status").shards[0];
        (shard.zone.clone().expect("zone"), shard.instance.clone().expect("instance"))
    };
    for attempt in 1..=2 {
        let run = env
            .wait_for("spot", &format!("attempt {attempt} running"), Duration::from_secs(60), |r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.shards[0].attempt == attempt && s.shards[0].phase == TestRunPhase::Running)
            })
            .await;
        let (zone, name) = vm_of(&run);
        let row = env.vms().await.into_iter().find(|r| r["name"] == name.as_str()).expect("the VM");
        assert_eq!(row["spot"], json!(true), "attempt {attempt} runs on a Spot VM: {row}");
        let url = format!("{}/emulator/v1/instances/{zone}/{name}/preempt", env.emulator.url);
        let answer = reqwest::Client::new().post(url).send().await.expect("emulator admin API");
        assert!(answer.status().is_success(), "{}", answer.status());
    }
    let third = env
        .wait_for("spot", "attempt 3", Duration::from_secs(60), |r| {
            r.status.as_ref().is_some_and(|s| s.shards[0].attempt == 3)
        })
        .await;
    let (_, name) = vm_of(&third);
    let row = env.vms().await.into_iter().find(|r| r["name"] == name.as_str()).expect("attempt 3's VM");
    assert_eq!(row["spot"], json!(false), "after maxPreemptions the shard falls back to a standard VM: {row}");

    let run = env.wait_phase("spot", TestRunPhase::Succeeded).await;
    let shard = &run.status.expect("status").shards[0];
    let told: Vec<(i32, AttemptOutcome)> = shard.history.iter().map(|r| (r.attempt, r.outcome)).collect();
    assert_eq!(told, [(1, AttemptOutcome::Preempted), (2, AttemptOutcome::Preempted), (3, AttemptOutcome::Succeeded)]);
    // maxAttempts is 1: only the third attempt counted.
    assert_eq!((shard.preemptions, shard.uncounted_attempts, shard.counted_attempts()), (2, 2, 1));
    assert_eq!(shard.spot, Some(false));
    assert_eq!(shard.result.as_ref().map(|r| r.output_tail.trim()), Some("passed on 3"));
    env.wait_metric("testrun_controller_attempts_finished_total{outcome=\"Preempted\"} 2").await;
    let events = env.events().await;
    assert!(
        events.iter().any(|(r, n)| r == "Preempted"
            && n.contains("(its agent said so)")
            && n.contains("not counted toward maxAttempts")),
        "{events:?}"
    );
    env.wait_no_vms().await;
}

#[tokio::test]
async fn a_rerun_of_a_five_shard_run_with_two_failures_runs_exactly_those_two_shards() {
    let env = setup("rerun", &[], &[]).await;
    // Shards 1 and 3 fail unless RERUN is set; every shard says who it is.
    let script = "if [ -z \"$RERUN\" ] && { [ $TESTRUN_SHARD = 1 ] || [ $TESTRUN_SHARD = 3 ]; }; then exit 1; fi; \
                  sleep 1; echo shard $TESTRUN_SHARD of $TESTRUN_SHARDS";
    env.create(testrun("nightly", 5, &["sh", "-c", script])).await;
    // Made while the original still runs: it waits for it to finish.
    env.create(json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "TestRun",
        "metadata": { "name": "nightly-again" },
        "spec": { "rerunOf": { "name": "nightly" }, "env": [{ "name": "RERUN", "value": "1" }] }
    }))
    .await;
    let original = env.wait_phase("nightly", TestRunPhase::Failed).await;
    let failed: Vec<i32> = original
        .status
        .as_ref()
        .expect("status")
        .shards
        .iter()
        .filter(|s| s.phase != TestRunPhase::Succeeded)
        .map(|s| s.index)
        .collect();
    assert_eq!(failed, [1, 3]);

    let rerun = env.wait_phase("nightly-again", TestRunPhase::Succeeded).await;
    let status = rerun.status.expect("status");
    let ran: Vec<(i32, i32, String)> = status
        .shards
        .iter()
        .map(|s| (s.index, s.attempt, s.result.as_ref().map(|r| r.output_tail.trim().to_string()).unwrap_or_default()))
        .collect();
    assert_eq!(ran, [(1, 1, "shard 1 of 5".to_string()), (3, 1, "shard 3 of 5".to_string())]);
    assert_eq!(status.attempts, 2, "exactly two VMs");
    let link = status.rerun_of.expect("rerunOf");
    assert_eq!((link.name.as_str(), Some(link.uid.as_str())), ("nightly", original.metadata.uid.as_deref()));
    let started = status.started.expect("started");
    assert_eq!(started.command, ["sh", "-c", script], "the original's command");
    // The original links back.
    let original = env
        .wait_for("nightly", "the rerun listed", Duration::from_secs(30), |r| {
            r.status.as_ref().is_some_and(|s| !s.reruns.is_empty())
        })
        .await;
    let reruns = original.status.expect("status").reruns;
    assert_eq!(
        reruns.iter().map(|l| (l.name.as_str(), Some(l.uid.as_str()))).collect::<Vec<_>>(),
        [("nightly-again", rerun.metadata.uid.as_deref())]
    );
    // Never a VM for a shard that succeeded in the original.
    let inserted: Vec<Value> = reqwest::get(format!("{}/emulator/v1/accepted-inserts", env.emulator.url))
        .await
        .expect("emulator admin API")
        .json()
        .await
        .expect("JSON");
    let owner = testrun_controller::compute::naming::label_value(&rerun.metadata.uid.expect("uid"));
    let mut shards: Vec<&str> = inserted
        .iter()
        .filter(|i| i["labels"]["owner-uid"] == owner.as_str())
        .filter_map(|i| i["labels"]["shard"].as_str())
        .collect();
    shards.sort_unstable();
    assert_eq!(shards, ["1", "3"], "{inserted:?}");
    env.wait_no_vms().await;
}
