//! The Argo CD health checks in `argocd/` run in a real Lua 5.1 interpreter
//! against objects taken from real runs (their `health_test.yaml`, in the
//! format of Argo CD's own resource customizations), against states derived
//! from them, and match the ConfigMap patch users apply.

mod common;

use serde_json::{Value, json};

fn fixture(kind: &str, name: &str) -> Value {
    let path = common::argocd::script_path(kind).with_file_name("testdata").join(format!("{name}.yaml"));
    serde_norway::from_str(&std::fs::read_to_string(&path).expect("reading a fixture")).expect("a YAML object")
}

#[test]
fn every_health_test_of_both_kinds_passes() {
    for kind in ["TestRun", "PrebuildPreset"] {
        let path = common::argocd::script_path(kind).with_file_name("health_test.yaml");
        let tests: Value =
            serde_norway::from_str(&std::fs::read_to_string(&path).expect("health_test.yaml")).expect("YAML");
        let tests = tests["tests"].as_array().expect("tests");
        assert!(tests.len() >= 3, "{kind}: too few tests");
        let mut statuses = std::collections::BTreeSet::new();
        for test in tests {
            let input = test["inputPath"].as_str().expect("inputPath");
            let name = input.trim_start_matches("testdata/").trim_end_matches(".yaml");
            let (status, message) = common::argocd::health(kind, &fixture(kind, name));
            assert_eq!(status, test["healthStatus"]["status"], "{kind} {input}: {message}");
            assert_eq!(message, test["healthStatus"]["message"], "{kind} {input}");
            statuses.insert(status);
        }
        assert!(statuses.contains("Healthy") && statuses.contains("Degraded"), "{kind}: {statuses:?}");
    }
}

#[test]
fn an_object_the_controller_has_not_looked_at_yet_is_progressing() {
    for (kind, name) in [("TestRun", "succeeded"), ("PrebuildPreset", "ready")] {
        let mut object = fixture(kind, name);
        object["metadata"]["generation"] = json!(2);
        let (status, message) = common::argocd::health(kind, &object);
        assert_eq!(
            (status.as_str(), message.as_str()),
            ("Progressing", "Waiting for the controller to look at the latest spec")
        );
        object.as_object_mut().expect("object").remove("status");
        let (status, _) = common::argocd::health(kind, &object);
        assert_eq!(status, "Progressing", "{kind} without status");
    }
}

#[test]
fn a_run_from_a_controller_without_complete_and_failed_is_judged_by_its_phase() {
    for (name, want) in [("succeeded", "Healthy"), ("failed", "Degraded"), ("running", "Progressing")] {
        let mut run = fixture("TestRun", name);
        let conditions = run["status"]["conditions"].as_array_mut().expect("conditions");
        conditions
            .retain(|c| !["Complete", "Failed", "Stalled", "Reconciling"].contains(&c["type"].as_str().unwrap_or("")));
        let (status, message) = common::argocd::health("TestRun", &run);
        assert_eq!(status, want, "{name}: {message}");
    }
}

#[test]
fn a_pool_short_of_vms_because_provisions_fail_is_degraded_and_one_filling_is_progressing() {
    let mut pool = fixture("PrebuildPreset", "ready");
    let conditions = pool["status"]["conditions"].as_array_mut().expect("conditions");
    for c in conditions.iter_mut() {
        match c["type"].as_str() {
            Some("Ready") => {
                c["status"] = json!("False");
                c["reason"] = json!("PoolFilling");
                c["message"] = json!("1 of 3 ready; 2 provisioning, 0 pending, 0 outdated, 0 claimed");
            }
            Some("Degraded") => {
                c["status"] = json!("True");
                c["reason"] = json!("ProvisionFailing");
                c["message"] = json!("creating pool VM x failed: QUOTA_EXCEEDED");
            }
            _ => {}
        }
    }
    let (status, message) = common::argocd::health("PrebuildPreset", &pool);
    assert_eq!(
        (status.as_str(), message.as_str()),
        ("Degraded", "ProvisionFailing: creating pool VM x failed: QUOTA_EXCEEDED")
    );
    let conditions = pool["status"]["conditions"].as_array_mut().expect("conditions");
    conditions.retain(|c| c["type"] != "Degraded");
    let (status, message) = common::argocd::health("PrebuildPreset", &pool);
    assert_eq!(status, "Progressing", "{message}");
    assert!(message.starts_with("PoolFilling: 1 of 3 ready"), "{message}");
}

#[test]
fn the_argocd_cm_patch_carries_both_scripts_verbatim() {
    let path = common::repo_root().join("argocd/argocd-cm.yaml");
    let patch: Value = serde_norway::from_str(&std::fs::read_to_string(&path).expect("argocd-cm.yaml")).expect("YAML");
    for kind in ["TestRun", "PrebuildPreset"] {
        let script = std::fs::read_to_string(common::argocd::script_path(kind)).expect("health.lua");
        let key = format!("resource.customizations.health.testrun.dev_{kind}");
        assert_eq!(patch["data"][&key].as_str(), Some(script.as_str()), "{key} differs from {kind}/health.lua");
    }
}

#[test]
fn strings_reach_lua_byte_for_byte() {
    let object = json!({ "status": { "conditions": [{
        "type": "Complete", "status": "True", "reason": "Succeeded",
        "message": "quote \" backslash \\ newline \n tab \t µs ✓"
    }], "observedGeneration": 1 }, "metadata": { "generation": 1 } });
    let (status, message) = common::argocd::health("TestRun", &object);
    assert_eq!(status, "Healthy");
    assert_eq!(message, "Succeeded: quote \" backslash \\ newline \n tab \t µs ✓");
}
