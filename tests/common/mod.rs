//! Shared harness for integration tests: one real local control plane
//! (etcd + kube-apiserver from `scripts/control-plane.sh`) for the whole
//! test run, the CRDs installed in it, and a namespace of its own per test so
//! tests run in parallel.

#![allow(dead_code)]

pub mod argocd;
pub mod controller;
pub mod emulator;
pub mod plane;
pub mod service;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the control plane unless it runs already (the script is idempotent
/// and serialises parallel callers with a lock) and returns its kubeconfig.
pub fn control_plane_kubeconfig() -> PathBuf {
    let script = repo_root().join("scripts/control-plane.sh");
    let up = Command::new("bash").arg(&script).arg("up").output().expect("running scripts/control-plane.sh up");
    assert!(up.status.success(), "scripts/control-plane.sh up failed:\n{}", String::from_utf8_lossy(&up.stderr));
    let env = Command::new("bash").arg(&script).arg("env").output().expect("running scripts/control-plane.sh env");
    let line = String::from_utf8(env.stdout).expect("utf-8 from control-plane.sh env");
    let path = line
        .trim()
        .strip_prefix("export KUBECONFIG=")
        .unwrap_or_else(|| panic!("unexpected output of control-plane.sh env: {line:?}"));
    PathBuf::from(path)
}

/// A client for the local control plane, as the admin user.
pub async fn client() -> Client {
    let path = control_plane_kubeconfig();
    client_from(&path).await
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("reading the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("building a client config from the kubeconfig");
    Client::try_from(config).expect("building a client")
}

/// Installs the CRDs generated from the Rust types (the same as `crds/`,
/// which another test checks) and waits until both are Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("testrun-controller-tests").force();
    for generated in testrun_controller::crd::all() {
        let name = generated.crd.metadata.name.clone().expect("CRD has a name");
        crds.patch(&name, &params, &Patch::Apply(&generated.crd)).await.expect("applying a CRD");
    }
    for generated in testrun_controller::crd::all() {
        let name = generated.crd.metadata.name.clone().expect("CRD has a name");
        wait_established(&crds, &name).await;
    }
}

/// Waits until a CRD reports the Established condition.
pub async fn wait_established(crds: &Api<CustomResourceDefinition>, name: &str) {
    let cond = kube::runtime::conditions::is_crd_established();
    let wait = kube::runtime::wait::await_condition(crds.clone(), name, cond);
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not Established within 30 s"))
        .expect("watching the CRD");
}

/// A client with the CRDs installed and a fresh namespace for one test.
pub async fn setup(test: &str) -> (Client, String) {
    let client = client().await;
    install_crds(&client).await;
    let ns = create_namespace(&client, test).await;
    (client, ns)
}

/// Creates a namespace named after the test with a unique suffix.
pub async fn create_namespace(client: &Client, test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let prefix: String =
        test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(30).collect();
    let name = format!(
        "t-{}-{:x}{:x}{}",
        prefix.trim_matches('-'),
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, ..Default::default() };
    namespaces.create(&PostParams::default(), &ns).await.expect("creating the test namespace");
    name
}

/// Runs kubectl against the local control plane and returns (success, stdout, stderr).
pub fn kubectl(args: &[&str]) -> (bool, String, String) {
    let kubeconfig = control_plane_kubeconfig();
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(repo_root())
        .output()
        .expect("running kubectl (scripts/control-plane.sh up installs it when missing)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The VMs of one installation in an emulator (its admin table).
pub async fn installation_vms(emulator_url: &str, installation: &str) -> Vec<serde_json::Value> {
    let rows: Vec<serde_json::Value> = reqwest::get(format!("{emulator_url}/emulator/v1/instances"))
        .await
        .expect("emulator admin API")
        .json()
        .await
        .expect("JSON");
    rows.into_iter().filter(|r| r["labels"]["installation"] == installation).collect()
}

/// The (reason, note) of every Event in a namespace.
pub async fn events(client: &Client, namespace: &str) -> Vec<(String, String)> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), namespace);
    events
        .list(&Default::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Creates a TestRun of `shards` shards running `sh -c script` on fresh VMs
/// in one zone, and waits for nothing.
pub async fn create_shell_run(
    runs: &Api<testrun_controller::api::testrun::TestRun>,
    name: &str,
    shards: i32,
    script: &str,
) {
    let run: testrun_controller::api::testrun::TestRun = serde_json::from_value(serde_json::json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "TestRun",
        "metadata": { "name": name },
        "spec": {
            "shards": shards,
            "command": ["sh", "-c", script],
            "timeout": "3m",
            "vm": {
                "zones": ["us-central1-a"],
                "machineType": "e2-standard-2",
                "image": "projects/debian-cloud/global/images/family/debian-12"
            }
        }
    }))
    .expect("a TestRun");
    runs.create(&PostParams::default(), &run).await.expect("creating the TestRun");
}
