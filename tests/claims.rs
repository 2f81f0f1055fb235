//! Optimistic concurrency against a real kube-apiserver: many claimers at
//! once, each with its own client as separate controller replicas would
//! have, never take the same pool VM; a status or finalizer change planned
//! from an old copy of an object (a cache behind a relist) never lands.

mod common;

use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use testrun_controller::api::prebuild::{PrebuildPreset, PresetInstanceState};
use testrun_controller::api::testrun::{ShardResult, ShardStatus, TestRun, TestRunPhase, TestRunStatus};
use testrun_controller::controller::claims::{Claim, claim_ready_vms, held};
use testrun_controller::controller::execute::{set_finalizer, write_status};

#[tokio::test]
async fn concurrent_claimers_never_take_the_same_vm() {
    let (client, ns) = common::setup("claims-race").await;
    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    let preset: PrebuildPreset = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "PrebuildPreset",
        "metadata": { "name": "pool" },
        "spec": {
            "templateVersion": "v2",
            "instances": 4,
            "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" }
        }
    }))
    .expect("preset");
    presets.create(&PostParams::default(), &preset).await.expect("create");
    // Three ready VMs of the active version, one outdated, one provisioning.
    let instance = |name: &str, version: &str, state: &str| json!({ "name": name, "zone": "us-central1-a", "templateVersion": version, "state": state });
    let status = json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset",
        "status": { "ready": 3, "instances": [
            instance("vm-a", "v2", "Ready"), instance("vm-b", "v2", "Ready"), instance("vm-c", "v2", "Ready"),
            instance("vm-old", "v1", "Ready"), instance("vm-new", "v2", "Provisioning"),
        ]}
    });
    presets.patch_status("pool", &PatchParams::apply("test").force(), &Patch::Apply(&status)).await.expect("status");

    // Ten claimers, each with its own client, all at once.
    let kubeconfig = common::control_plane_kubeconfig();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let kubeconfig = kubeconfig.clone();
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let client = common::client_from(&kubeconfig).await;
            let api: Api<PrebuildPreset> = Api::namespaced(client, &ns);
            let claim =
                Claim { namespace: ns.clone(), testrun: format!("run-{i}"), shard: 0, uid: Some(format!("uid-{i}")) };
            // Each starts from the preset as read before anyone claimed.
            let read = api.get("pool").await.expect("reading the preset");
            let claimed = claim_ready_vms(&api, &read, std::slice::from_ref(&claim), None).await.expect("claiming");
            (claim, claimed.taken.get(&0).cloned())
        }));
    }
    let mut won = Vec::new();
    for task in tasks {
        let (claim, taken) = task.await.expect("task");
        if let Some(instance) = taken {
            won.push((claim, instance.name));
        }
    }
    let mut names: Vec<String> = won.iter().map(|(_, n)| n.clone()).collect();
    names.sort();
    assert_eq!(names, vec!["vm-a", "vm-b", "vm-c"], "each ready VM of the active version went to exactly one claimer");

    let stored = presets.get("pool").await.expect("get");
    let status = stored.status.clone().expect("status");
    for (claim, name) in &won {
        let instance = status.instances.iter().find(|i| &i.name == name).expect("listed");
        assert_eq!(instance.state, PresetInstanceState::Claimed);
        assert_eq!(instance.claimed_by.as_deref(), Some(claim.to_string().as_str()));
        // Claiming again returns what the claimer holds, not another VM.
        assert_eq!(held(&stored, claim).map(|i| i.name), Some(name.clone()));
    }
    let untouched = |n: &str| status.instances.iter().find(|i| i.name == n).map(|i| i.state);
    assert_eq!(untouched("vm-old"), Some(PresetInstanceState::Ready), "outdated VMs are never claimed");
    assert_eq!(untouched("vm-new"), Some(PresetInstanceState::Provisioning));
    assert_eq!(status.claimed, 3);
}

#[tokio::test]
async fn a_multi_shard_run_takes_its_vms_in_one_write() {
    let (client, ns) = common::setup("claims-batch").await;
    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    let preset: PrebuildPreset = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset",
        "metadata": { "name": "pool" },
        "spec": { "templateVersion": "v1", "instances": 2,
                  "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
    }))
    .expect("preset");
    presets.create(&PostParams::default(), &preset).await.expect("create");
    let instance =
        |name: &str| json!({ "name": name, "zone": "us-central1-a", "templateVersion": "v1", "state": "Ready" });
    let status = json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset",
        "status": { "ready": 2, "instances": [instance("vm-a"), instance("vm-b")] }
    });
    presets.patch_status("pool", &PatchParams::apply("test").force(), &Patch::Apply(&status)).await.expect("status");
    let read = presets.get("pool").await.expect("get");
    let claims: Vec<Claim> = (0..3)
        .map(|shard| Claim { namespace: ns.clone(), testrun: "run".into(), shard, uid: Some("uid".into()) })
        .collect();
    let claimed = claim_ready_vms(&presets, &read, &claims, None).await.expect("claiming");
    assert_eq!(claimed.taken.len(), 2, "two ready VMs for three shards");
    let written = claimed.written.expect("one write");
    let version = |p: &PrebuildPreset| p.metadata.resource_version.clone().and_then(|v| v.parse::<u64>().ok());
    let stored = presets.get("pool").await.expect("get");
    assert_eq!(version(&written), version(&stored), "nothing else wrote after the claim");
    assert_eq!(stored.status.expect("status").claimed, 2);
    // Claiming again with the stale copy: the shards keep what they hold, and no VM is left for the third.
    let again = claim_ready_vms(&presets, &read, &claims, None).await.expect("claiming again");
    assert!(again.taken.is_empty() && again.written.is_none(), "{again:?}");
}

#[tokio::test]
async fn a_status_planned_from_an_old_copy_never_lands() {
    let (client, ns) = common::setup("stale-replay").await;
    let runs: Api<TestRun> = Api::namespaced(client, &ns);
    let run: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun",
        "metadata": { "name": "run" },
        "spec": { "command": ["true"],
                  "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
    }))
    .expect("run");
    let created = runs.create(&PostParams::default(), &run).await.expect("create");
    let with_finalizer = set_finalizer(&runs, &created, true).await.expect("finalizer");
    let shard = |attempt: i32, phase: TestRunPhase, result: Option<ShardResult>| ShardStatus {
        index: 0,
        attempt,
        lease_id: i64::from(attempt),
        instance: Some(format!("vm-{attempt}")),
        zone: Some("us-central1-a".into()),
        phase,
        requested_time: None,
        retry_after: None,
        start_time: None,
        last_heartbeat: None,
        result,
        message: None,
        spot: None,
        preemptions: 0,
        uncounted_attempts: 0,
        history: Vec::new(),
    };
    let status = |shard: ShardStatus, phase: TestRunPhase| TestRunStatus {
        phase: Some(phase),
        shards: vec![shard],
        ..TestRunStatus::default()
    };
    // Attempt 1 runs; the copy read now is what a lagging cache keeps.
    let old =
        write_status(&runs, &with_finalizer, &status(shard(1, TestRunPhase::Running, None), TestRunPhase::Running))
            .await
            .expect("attempt 1");
    // Attempt 1 lost its lease; attempt 2 runs and fails.
    let failed = ShardResult { exit_code: 1, duration_ms: 5, output_tail: "attempt 2".into() };
    let newer =
        write_status(&runs, &old, &status(shard(2, TestRunPhase::Failed, Some(failed.clone())), TestRunPhase::Failed))
            .await
            .expect("attempt 2");

    // A pass planned from the old copy accepts a success from attempt 1's
    // superseded worker, erasing attempt 2: refused as a conflict, which the
    // reconcile answers by reading again and planning again.
    let stale = ShardResult { exit_code: 0, duration_ms: 1, output_tail: "attempt 1".into() };
    let replay = status(shard(1, TestRunPhase::Succeeded, Some(stale)), TestRunPhase::Succeeded);
    let refused = write_status(&runs, &old, &replay).await.expect_err("the old copy's write is refused");
    assert!(refused.is_conflict(), "{refused:?}");
    // So is taking the finalizer off from the old copy.
    let refused = set_finalizer(&runs, &old, false).await.expect_err("the old copy's finalizer change is refused");
    assert!(refused.is_conflict(), "{refused:?}");

    let stored = runs.get("run").await.expect("get");
    assert_eq!(stored.metadata.resource_version, newer.metadata.resource_version, "nothing landed");
    let kept = stored.status.expect("status");
    assert_eq!((kept.phase, kept.shards[0].attempt), (Some(TestRunPhase::Failed), 2));
    assert_eq!(kept.shards[0].result.as_ref(), Some(&failed));
    assert_eq!(stored.metadata.finalizers.unwrap_or_default().len(), 1, "the finalizer stays");
}
