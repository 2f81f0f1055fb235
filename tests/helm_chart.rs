//! The Helm chart with real Helm: it lints, renders least-privilege RBAC and
//! the Deployment, installs into the local control plane, and a controller
//! running under exactly the chart's ServiceAccount permissions (by
//! impersonation) runs a TestRun, claims from a pool and deletes an expired
//! run without a single forbidden call.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::controller::ControllerProcess;
use common::emulator::EmulatorProcess;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, PostParams};
use serde_json::json;
use testrun_controller::api::prebuild::PrebuildPreset;
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

fn helm() -> PathBuf {
    let out = Command::new("bash")
        .arg(common::repo_root().join("scripts/ensure-helm.sh"))
        .output()
        .expect("running ensure-helm.sh");
    assert!(out.status.success(), "ensure-helm.sh: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn run_helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(helm())
        .args(args)
        .env("KUBECONFIG", common::control_plane_kubeconfig())
        .current_dir(common::repo_root())
        .output()
        .expect("running helm");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_chart_lints_and_renders_least_privilege_rbac() {
    let agent = "agentUrl=http://10.0.0.5:8090";
    let (ok, out) = run_helm(&["lint", "charts/testrun-controller", "--set", "project=my-project", "--set", agent]);
    assert!(ok, "{out}");
    let (ok, out) = run_helm(&["template", "r", "charts/testrun-controller"]);
    assert!(!ok && out.contains("set .Values.project"), "a release without a project is refused: {out}");
    let (ok, out) = run_helm(&["template", "r", "charts/testrun-controller", "--set", "project=my-project"]);
    assert!(!ok && out.contains("set .Values.agentUrl"), "Compute Engine without an agent URL is refused: {out}");

    let (ok, rendered) = run_helm(&[
        "template",
        "r",
        "charts/testrun-controller",
        "--namespace",
        "ci",
        "--set",
        "project=my-project",
        "--set",
        agent,
    ]);
    assert!(ok, "{rendered}");
    let docs: Vec<serde_json::Value> = rendered
        .split("\n---")
        .filter_map(|d| serde_norway::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service"]
    {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("Deployment");
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.contains(&"--project=my-project") && args.contains(&"run"), "{args:?}");
    assert!(
        args.contains(&"--leader-elect") && args.contains(&"--leader-elect-lease=r-testrun-controller"),
        "{args:?}"
    );
    // No wildcard anywhere in the RBAC.
    for doc in docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role") {
        let text = doc.to_string();
        assert!(!text.contains("\"*\""), "wildcard in {text}");
    }
    // The chart's CRDs are the generated ones.
    for file in ["testruns.yaml", "prebuildpresets.yaml", "vmclasses.yaml"] {
        let chart = std::fs::read_to_string(common::repo_root().join("charts/testrun-controller/crds").join(file))
            .expect("chart CRD");
        let generated = std::fs::read_to_string(common::repo_root().join("crds").join(file)).expect("CRD");
        assert!(chart == generated, "charts/testrun-controller/crds/{file} differs from crds/{file}; copy it over");
    }
}

#[tokio::test]
async fn a_controller_with_only_the_charts_permissions_does_its_whole_job() {
    let (client, ns) = common::setup("helm-install").await;
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms", "--boot-delay", "50ms"]);
    let release = format!("r{}", &ns[ns.len().saturating_sub(8)..]);
    let fullname = format!("{release}-testrun-controller");
    let endpoint = format!("computeEndpoint={}", emulator.url);
    let installation = format!("installationId={ns}");
    let watch = format!("watchNamespace={ns}");
    let (ok, out) = run_helm(&[
        "install",
        &release,
        "charts/testrun-controller",
        "--namespace",
        &ns,
        "--set",
        &endpoint,
        "--set",
        &installation,
        "--set",
        &watch,
    ]);
    assert!(ok, "helm install failed: {out}");
    let roles: Api<ClusterRole> = Api::all(client.clone());
    assert!(roles.get_opt(&fullname).await.expect("get").is_some(), "the ClusterRole was installed");

    // The controller runs as the chart's ServiceAccount.
    let admin = std::fs::read_to_string(common::control_plane_kubeconfig()).expect("kubeconfig");
    let mut config: serde_json::Value = serde_norway::from_str(&admin).expect("kubeconfig YAML");
    config["users"][0]["user"]["as"] = json!(format!("system:serviceaccount:{ns}:{fullname}"));
    let impersonating = std::env::temp_dir().join(format!("kubeconfig-{ns}"));
    std::fs::write(&impersonating, serde_norway::to_string(&config).expect("YAML")).expect("writing kubeconfig");
    let secret = format!("{fullname}-lease-key");
    let controller = ControllerProcess::start(
        impersonating,
        &ns,
        &emulator.url,
        &["--lease-secret", &secret, "--leader-elect", "--leader-elect-lease", &fullname],
    );

    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    let preset: PrebuildPreset = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset", "metadata": { "name": "pool" },
        "spec": { "templateVersion": "v1", "instances": 1, "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
    }))
    .expect("preset");
    presets.create(&PostParams::default(), &preset).await.expect("preset");
    let deadline = Instant::now() + Duration::from_secs(60);
    while presets.get("pool").await.expect("get").status.is_none_or(|s| s.ready != 1) {
        assert!(Instant::now() < deadline, "the pool never filled; log:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    let run: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun", "metadata": { "name": "under-rbac" },
        "spec": { "presetRef": { "name": "pool" }, "shards": 2, "command": ["true"], "ttlSecondsAfterFinished": 2 }
    }))
    .expect("TestRun");
    runs.create(&PostParams::default(), &run).await.expect("TestRun");
    let mut succeeded = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match runs.get_opt("under-rbac").await.expect("get") {
            Some(run) => succeeded |= run.status.and_then(|s| s.phase) == Some(TestRunPhase::Succeeded),
            None => break,
        }
        assert!(Instant::now() < deadline, "the run did not finish and expire; log:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(succeeded, "the run succeeded before it was deleted");
    let log = controller.log();
    assert!(!log.to_lowercase().contains("forbidden"), "a call was forbidden:\n{log}");
    let events = common::events(&client, &ns).await;
    assert!(
        events.iter().any(|(r, n)| r == "RunFinished" && n.contains("warm pool")),
        "Events are written: {events:?}"
    );

    let (ok, out) = run_helm(&["uninstall", &release, "--namespace", &ns]);
    assert!(ok, "{out}");
}
