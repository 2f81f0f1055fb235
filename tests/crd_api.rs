//! The CRDs against a real kube-apiserver: they install, defaults are applied
//! by the server, invalid objects are rejected naming the field, status is
//! written only through the status subresource, the examples apply, and
//! `kubectl explain` shows the doc comments.

mod common;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::core::Status;
use kube::discovery::Discovery;
use serde_json::{Value, json};
use testrun_controller::api::{PrebuildPreset, TestRun, TestRunPhase, TestRunStatus};

fn testrun_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("testrun.dev", "v1alpha1", "TestRun"), "testruns")
}

fn preset_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("testrun.dev", "v1alpha1", "PrebuildPreset"),
        "prebuildpresets",
    )
}

fn minimal_testrun(name: &str) -> Value {
    json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "TestRun",
        "metadata": { "name": name },
        "spec": {
            "command": ["true"],
            "vm": {
                "zones": ["us-central1-a"],
                "machineType": "e2-small",
                "image": "projects/debian-cloud/global/images/family/debian-12"
            }
        }
    })
}

fn minimal_preset(name: &str) -> Value {
    json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "PrebuildPreset",
        "metadata": { "name": name },
        "spec": {
            "templateVersion": "v1",
            "instances": 3,
            "vm": {
                "zones": ["europe-west4-b"],
                "machineType": "n2-standard-8",
                "image": "projects/debian-cloud/global/images/family/debian-12"
            }
        }
    })
}

/// A change that makes a valid object invalid.
type Mutation = Box<dyn Fn(&mut Value)>;

/// Creates an object from raw JSON, so defaults seen afterwards are the
/// server's, not serde's.
async fn create_raw(api: &Api<DynamicObject>, body: Value) -> Result<Value, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(body).expect("well-formed object");
    let created = api.create(&PostParams::default(), &obj).await?;
    Ok(serde_json::to_value(created).expect("serializable"))
}

fn api_error(result: Result<Value, kube::Error>) -> Status {
    match result {
        Err(kube::Error::Api(e)) => *e,
        Err(other) => panic!("expected an API error, got {other}"),
        Ok(obj) => panic!("expected the server to reject the object, it stored {obj}"),
    }
}

#[tokio::test]
async fn crds_install_and_are_served_with_short_names() {
    let client = common::client().await;
    // Apply the committed files, exactly what `kubectl apply -f crds/` applies.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for file in ["testruns.yaml", "prebuildpresets.yaml", "vmclasses.yaml"] {
        let text = std::fs::read_to_string(common::repo_root().join("crds").join(file)).expect("reading crds/");
        let crd: CustomResourceDefinition = serde_norway::from_str(&text).expect("crds/ holds a CRD");
        let name = crd.metadata.name.clone().expect("named");
        crds.patch(&name, &PatchParams::apply("testrun-controller-tests").force(), &Patch::Apply(&crd))
            .await
            .expect("the server accepts the committed CRD");
        common::wait_established(&crds, &name).await;
        let stored = crds.get(&name).await.expect("CRD readable");
        let version = &stored.spec.versions[0];
        assert!(version.served && version.storage);
        if name == "vmclasses.testrun.dev" {
            // Configuration owned by the platform team: cluster-wide, no status.
            assert_eq!(stored.spec.scope, "Cluster");
            assert_eq!(stored.spec.names.short_names, Some(vec!["vmc".to_string()]));
        } else {
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{name} has /status");
        }
    }

    let discovery = Discovery::new(client).filter(&["testrun.dev"]).run().await.expect("discovery");
    let group = discovery.get("testrun.dev").expect("group testrun.dev is served");
    let kinds: Vec<String> = group.recommended_resources().into_iter().map(|(r, _)| r.kind).collect();
    for kind in ["TestRun", "PrebuildPreset", "VmClass"] {
        assert!(kinds.contains(&kind.to_string()), "{kind} is not served: {kinds:?}");
    }

    let stored = crds.get("testruns.testrun.dev").await.expect("CRD");
    assert_eq!(stored.spec.names.short_names, Some(vec!["tr".to_string()]));
    let stored = crds.get("prebuildpresets.testrun.dev").await.expect("CRD");
    assert_eq!(stored.spec.names.short_names, Some(vec!["pbp".to_string()]));
}

#[tokio::test]
async fn valid_testrun_round_trips_with_server_defaults() {
    let (client, ns) = common::setup("testrun-defaults").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &testrun_resource());
    let created = create_raw(&api, minimal_testrun("defaults")).await.expect("valid TestRun accepted");
    let spec = &created["spec"];
    assert_eq!(spec["shards"], 1);
    // No schema default for timeout: unset, it is 1h or the VmClass's
    // maxRunDuration, whichever is shorter, fixed at the start.
    assert!(spec.get("timeout").is_none(), "{spec}");
    assert_eq!(spec["heartbeatTimeout"], "60s");
    assert_eq!(spec["maxAttempts"], 3);
    assert_eq!(spec["cancel"], false);
    assert_eq!(spec["vm"]["diskGb"], 20);
    assert_eq!(spec["vm"]["spot"], false);

    // The typed client reads back exactly what was stored.
    let typed: Api<TestRun> = Api::namespaced(client, &ns);
    let run = typed.get("defaults").await.expect("typed read");
    assert_eq!(run.spec.shards, 1);
    assert_eq!(run.spec.timeout, None);
    assert_eq!(run.spec.attempt_timeout(None), Duration::from_secs(3600));
    assert_eq!(run.spec.command, vec!["true".to_string()]);
    assert!(run.status.is_none());
    assert_eq!(testrun_controller::api::validation::validate_testrun(&run.spec), Ok(()));
}

#[tokio::test]
async fn valid_preset_round_trips_with_server_defaults() {
    let (client, ns) = common::setup("preset-defaults").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &preset_resource());
    let created = create_raw(&api, minimal_preset("pool")).await.expect("valid PrebuildPreset accepted");
    let spec = &created["spec"];
    assert_eq!(spec["maxConcurrentProvisions"], 2);
    assert_eq!(spec["maxConsecutiveFailures"], 5);
    assert_eq!(spec["failureBackoff"], json!({ "base": "10s", "max": "5m" }));

    let typed: Api<PrebuildPreset> = Api::namespaced(client, &ns);
    let preset = typed.get("pool").await.expect("typed read");
    assert_eq!(preset.spec.instances, 3);
    assert_eq!(preset.spec.template_version, "v1");
}

#[tokio::test]
async fn invalid_testruns_are_rejected_naming_the_field() {
    let (client, ns) = common::setup("testrun-invalid").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &testrun_resource());
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("zero-shards", Box::new(|o| o["spec"]["shards"] = json!(0)), "spec.shards"),
        ("too-many-shards", Box::new(|o| o["spec"]["shards"] = json!(257)), "spec.shards"),
        ("bad-zone", Box::new(|o| o["spec"]["vm"]["zones"] = json!(["US-Central1"])), "spec.vm.zones"),
        ("no-zones", Box::new(|o| o["spec"]["vm"]["zones"] = json!([])), "spec.vm.zones"),
        (
            "bad-machine-type",
            Box::new(|o| o["spec"]["vm"]["machineType"] = json!("big machine")),
            "spec.vm.machineType",
        ),
        ("bad-duration", Box::new(|o| o["spec"]["timeout"] = json!("1 hour")), "spec.timeout"),
        ("bad-heartbeat", Box::new(|o| o["spec"]["heartbeatTimeout"] = json!("60")), "spec.heartbeatTimeout"),
        ("no-command", Box::new(|o| o["spec"]["command"] = json!([])), "spec.command"),
        ("zero-attempts", Box::new(|o| o["spec"]["maxAttempts"] = json!(0)), "spec.maxAttempts"),
        ("bad-label-value", Box::new(|o| o["spec"]["vm"]["labels"] = json!({"team": "CI Team"})), "spec.vm.labels"),
        ("bad-env-name", Box::new(|o| o["spec"]["env"] = json!([{"name": "1X", "value": ""}])), "spec.env"),
        (
            "negative-ttl",
            Box::new(|o| o["spec"]["ttlSecondsAfterFinished"] = json!(-1)),
            "spec.ttlSecondsAfterFinished",
        ),
        ("small-disk", Box::new(|o| o["spec"]["vm"]["diskGb"] = json!(1)), "spec.vm.diskGb"),
    ];
    for (name, mutate, field) in cases {
        let mut body = minimal_testrun(name);
        mutate(&mut body);
        let err = api_error(create_raw(&api, body).await);
        assert_eq!(err.code, 422, "{name}: {err:?}");
        assert!(err.message.contains(field), "{name}: message should name {field}: {}", err.message);
    }
    for (name, timeout) in [("negative-duration", "-1h"), ("bare-fraction", ".5h")] {
        let mut body = minimal_testrun(name);
        body["spec"]["timeout"] = json!(timeout);
        let err = api_error(create_raw(&api, body).await);
        assert_eq!(err.code, 422, "{name}: {err:?}");
    }
    // Nothing invalid was stored.
    let stored = api.list(&Default::default()).await.expect("list");
    assert!(stored.items.is_empty(), "rejected objects must not be stored");

    // Durations as Kubernetes writes them are taken, and read the same way.
    let mut body = minimal_testrun("kubernetes-durations");
    body["spec"]["timeout"] = json!("1.5h");
    body["spec"]["heartbeatTimeout"] = json!("2m30.5s");
    create_raw(&api, body).await.expect("Kubernetes durations are accepted");
    let stored = api.get("kubernetes-durations").await.expect("get");
    let spec: testrun_controller::api::testrun::TestRunSpec =
        serde_json::from_value(stored.data["spec"].clone()).expect("spec");
    assert_eq!(spec.attempt_timeout(None), Duration::from_secs(5400));
    assert_eq!(spec.heartbeat_timeout.parse(), Ok(Duration::from_millis(150_500)));
}

#[tokio::test]
async fn invalid_presets_are_rejected_naming_the_field() {
    let (client, ns) = common::setup("preset-invalid").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &preset_resource());
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("too-many", Box::new(|o| o["spec"]["instances"] = json!(1001)), "spec.instances"),
        ("negative", Box::new(|o| o["spec"]["instances"] = json!(-1)), "spec.instances"),
        ("bad-version", Box::new(|o| o["spec"]["templateVersion"] = json!("V1!")), "spec.templateVersion"),
        (
            "no-vm",
            Box::new(|o| {
                o["spec"].as_object_mut().expect("object").remove("vm");
            }),
            "spec.vm",
        ),
        ("zero-slots", Box::new(|o| o["spec"]["maxConcurrentProvisions"] = json!(0)), "spec.maxConcurrentProvisions"),
        ("bad-backoff", Box::new(|o| o["spec"]["failureBackoff"] = json!({"base": "ten"})), "spec.failureBackoff.base"),
    ];
    for (name, mutate, field) in cases {
        let mut body = minimal_preset(name);
        mutate(&mut body);
        let err = api_error(create_raw(&api, body).await);
        assert_eq!(err.code, 422, "{name}: {err:?}");
        assert!(err.message.contains(field), "{name}: message should name {field}: {}", err.message);
    }
}

#[tokio::test]
async fn status_is_written_only_through_the_status_subresource() {
    let (client, ns) = common::setup("status-subresource").await;
    let api: Api<TestRun> = Api::namespaced(client, &ns);

    // A status sent with create is dropped.
    let mut body = minimal_testrun("status");
    body["status"] = json!({ "phase": "Succeeded", "attempts": 7 });
    let run: TestRun = serde_json::from_value(body).expect("typed TestRun");
    let created = api.create(&PostParams::default(), &run).await.expect("created");
    assert_eq!(created.status, None, "create must ignore status");

    // A status sent to the main resource is ignored.
    let patch = json!({ "spec": { "shards": 2 }, "status": { "phase": "Failed" } });
    let patched = api.patch("status", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patched");
    assert_eq!(patched.spec.shards, 2, "the spec part of the patch applies");
    assert_eq!(patched.status, None, "the main resource must ignore status");

    // The status subresource writes status (server-side apply, as the controller does) ...
    let status = TestRunStatus { phase: Some(TestRunPhase::Running), attempts: 2, ..Default::default() };
    let apply = json!({
        "apiVersion": "testrun.dev/v1alpha1",
        "kind": "TestRun",
        "status": status,
    });
    let params = PatchParams::apply("testrun-controller").force();
    let patched = api.patch_status("status", &params, &Patch::Apply(&apply)).await.expect("status applied");
    assert_eq!(patched.status.as_ref().and_then(|s| s.phase), Some(TestRunPhase::Running));
    assert_eq!(patched.status.as_ref().map(|s| s.attempts), Some(2));

    // ... and ignores spec.
    let sneaky = json!({ "spec": { "shards": 9 }, "status": { "attempts": 3 } });
    let patched = api.patch_status("status", &PatchParams::default(), &Patch::Merge(&sneaky)).await.expect("patched");
    assert_eq!(patched.spec.shards, 2, "the status subresource must ignore spec");
    assert_eq!(patched.status.map(|s| s.attempts), Some(3));

    // An invalid status is rejected too: the schema covers status.
    let bad = json!({ "status": { "phase": "Exploded" } });
    let err = api.patch_status("status", &PatchParams::default(), &Patch::Merge(&bad)).await.expect_err("bad phase");
    match err {
        kube::Error::Api(e) => assert!(e.message.contains("status.phase"), "{}", e.message),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn examples_apply_with_kubectl() {
    let (client, ns) = common::setup("examples").await;
    let (ok, stdout, stderr) = common::kubectl(&["apply", "-n", &ns, "-f", "examples/"]);
    assert!(ok, "kubectl apply -f examples/ failed: {stderr}");
    assert!(stdout.contains("testrun.testrun.dev/example-tests"), "{stdout}");
    assert!(stdout.contains("prebuildpreset.testrun.dev/example-pool"), "{stdout}");

    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    let run = runs.get("example-tests").await.expect("the example TestRun exists");
    assert_eq!(run.spec.shards, 2);
    assert_eq!(testrun_controller::api::validation::validate_testrun(&run.spec), Ok(()));
    let spot = runs.get("example-spot-tests").await.expect("the Spot example exists");
    assert_eq!(testrun_controller::api::validation::validate_testrun(&spot.spec), Ok(()));
    assert_eq!(spot.spec.failure_policy.map(|p| p.rules.len()), Some(3));
    let presets: Api<PrebuildPreset> = Api::namespaced(client, &ns);
    let preset = presets.get("example-pool").await.expect("the example PrebuildPreset exists");
    assert_eq!(preset.spec.instances, 3);
    assert_eq!(testrun_controller::api::validation::validate_prebuild_preset(&preset.spec), Ok(()));

    // Short names and printer columns work.
    let (ok, stdout, stderr) = common::kubectl(&["get", "tr,pbp", "-n", &ns]);
    assert!(ok, "{stderr}");
    for column in ["PHASE", "SHARDS", "ATTEMPTS", "VERSION", "DESIRED", "READY", "PENDING"] {
        assert!(stdout.contains(column), "column {column} missing from:\n{stdout}");
    }
}

#[tokio::test]
async fn kubectl_explain_shows_the_doc_comments() {
    let client = common::client().await;
    common::install_crds(&client).await;
    // Old fields and new ones: status fields, the started default, the
    // scale selector.
    let fields: [(usize, &str, &[&str]); 9] = [
        (0, "testrun.spec.shards", &["spec", "shards"]),
        (0, "testrun.spec.failurePolicy", &["spec", "failurePolicy"]),
        (0, "testrun.spec.maxPreemptions", &["spec", "maxPreemptions"]),
        (0, "testrun.spec.rerunOf", &["spec", "rerunOf"]),
        (0, "testrun.status.reruns", &["status", "reruns"]),
        (0, "testrun.spec.timeout", &["spec", "timeout"]),
        (0, "testrun.status.oldestRunningShardStartTime", &["status", "oldestRunningShardStartTime"]),
        (0, "testrun.status.started.defaultTimeout", &["status", "started", "defaultTimeout"]),
        (1, "prebuildpreset.status.selector", &["status", "selector"]),
    ];
    for (crd, field, path) in fields {
        let wanted = schema_description(crd, path);
        assert!(!wanted.is_empty(), "{field} has a doc comment");
        // The server publishes CRD schemas to its OpenAPI document shortly
        // after the CRD changes; wait for it.
        let mut last = String::new();
        let mut shown = false;
        for _ in 0..60 {
            let (ok, stdout, stderr) = common::kubectl(&["explain", field]);
            let flat = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
            if ok && flat.contains(&wanted) {
                shown = true;
                break;
            }
            last = format!("{stdout}{stderr}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(shown, "kubectl explain {field} never showed {wanted:?}; last output:\n{last}");
    }
}

/// Every field path of a schema (`spec.vm.zones`), arrays read through
/// their items, with its description.
fn schema_fields(node: &Value, at: &str, out: &mut Vec<(String, String)>) {
    let node = if node["type"] == "array" { &node["items"] } else { node };
    if let Some(properties) = node["properties"].as_object() {
        for (name, child) in properties {
            let path = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
            out.push((path.clone(), child["description"].as_str().unwrap_or_default().to_string()));
            schema_fields(child, &path, out);
        }
    }
}

/// The field paths `kubectl explain KIND --recursive` lists.
fn explained_fields(kind: &str) -> Vec<String> {
    let (ok, stdout, stderr) = common::kubectl(&["explain", kind, "--recursive"]);
    assert!(ok, "kubectl explain {kind} --recursive: {stderr}");
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut paths = Vec::new();
    for line in stdout.lines().skip_while(|l| !l.starts_with("FIELDS:")).skip(1) {
        let Some(name) = line.split_whitespace().next() else { continue };
        let depth = line.len() - line.trim_start().len();
        while stack.last().is_some_and(|(d, _)| *d >= depth) {
            stack.pop();
        }
        let path = stack.last().map_or_else(|| name.to_string(), |(_, p)| format!("{p}.{name}"));
        paths.push(path.clone());
        stack.push((depth, path));
    }
    paths
}

#[tokio::test]
async fn every_field_has_a_description_and_kubectl_explain_lists_every_field() {
    let client = common::client().await;
    common::install_crds(&client).await;
    for crd in testrun_controller::crd::all() {
        let crd = crd.crd;
        let kind = crd.spec.names.singular.clone().unwrap_or_default();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
        let mut fields = Vec::new();
        schema_fields(&schema["openAPIV3Schema"], "", &mut fields);
        // The Kubernetes machinery's own fields are described by Kubernetes.
        let fields: Vec<(String, String)> = fields
            .into_iter()
            .filter(|(path, _)| {
                !["apiVersion", "kind", "metadata"].contains(&path.split('.').next().unwrap_or_default())
            })
            .collect();
        let undescribed: Vec<&String> = fields.iter().filter(|(_, d)| d.trim().is_empty()).map(|(p, _)| p).collect();
        assert!(undescribed.is_empty(), "{kind}: fields without a description: {undescribed:?}");
        // The server publishes a changed CRD to its OpenAPI document shortly after.
        let mut missing = Vec::new();
        for _ in 0..60 {
            let listed = explained_fields(&kind);
            missing = fields.iter().map(|(p, _)| p).filter(|p| !listed.contains(p)).cloned().collect();
            if missing.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(missing.is_empty(), "kubectl explain {kind} --recursive does not list {missing:?}");
    }
}

/// The description the generated CRD carries for a field of TestRun.
fn schema_description(crd: usize, path: &[&str]) -> String {
    let crd = testrun_controller::crd::all().remove(crd).crd;
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    let mut node = &schema["openAPIV3Schema"];
    for key in path {
        node = &node["properties"][key];
    }
    node["description"].as_str().unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ")
}
