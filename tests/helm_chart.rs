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
use common::service::ServiceProxy;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, PostParams};
use serde_json::json;
use testrun_controller::api::VmClass;
use testrun_controller::api::prebuild::PrebuildPreset;
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

fn helm() -> PathBuf {
    ensured_tool("ensure-helm.sh")
}

/// The path a `scripts/ensure-*.sh` prints, after it made sure the tool is there.
fn ensured_tool(script: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(common::repo_root().join("scripts").join(script))
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn run_helm(args: &[&str]) -> (bool, String) {
    run_at(&common::control_plane_kubeconfig(), &helm(), args)
}

/// `helm template` with `sets`; the documents it renders.
fn render(sets: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["template", "r", "charts/testrun-controller", "--namespace", "ci"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let (ok, rendered) = run_helm(&args);
    assert!(ok, "{rendered}");
    rendered
        .split("\n---")
        .filter_map(|d| serde_norway::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d.is_object())
        .collect()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).unwrap_or_else(|| {
        panic!("no {kind} {name} among {:?}", docs.iter().map(|d| &d["metadata"]["name"]).collect::<Vec<_>>())
    })
}

/// Every resource a set of RBAC rules grants, as `group/resource:verb`.
fn grants(role: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        for group in rule["apiGroups"].as_array().into_iter().flatten() {
            for resource in rule["resources"].as_array().into_iter().flatten() {
                for verb in rule["verbs"].as_array().into_iter().flatten() {
                    out.push(format!(
                        "{}/{}:{}",
                        group.as_str().unwrap_or(""),
                        resource.as_str().unwrap_or(""),
                        verb.as_str().unwrap_or("")
                    ));
                }
            }
        }
    }
    out
}

/// Uninstalls a release when dropped, so a failed test leaves no
/// cluster-scoped object (a VmClass, a ClusterRole) behind for the others.
struct Release<'a> {
    name: &'a str,
    namespace: &'a str,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let _ = run_helm(&["uninstall", self.name, "--namespace", self.namespace, "--ignore-not-found"]);
    }
}

const GCE: [&str; 2] = ["project=my-project", "agentUrl=http://10.0.0.5:8090"];

#[test]
fn a_bad_value_fails_the_install_with_a_message_naming_it() {
    for (set, says) in [
        ("gc.interval=2min", "gc.interval"),
        ("replicaCount=-1", "replicaCount"),
        ("log.format=xml", "log.format"),
        ("agentService.type=External", "agentService.type"),
        ("agentServce.port=80", "agentServce"),
        ("agentUrl=10.0.0.5:8090", "agentUrl"),
        ("leaderElection.enabled=false", "leaderElection.enabled"),
    ] {
        let (ok, out) =
            run_helm(&["template", "r", "charts/testrun-controller", "--set", GCE[0], "--set", GCE[1], "--set", set]);
        assert!(!ok && out.contains(says), "{set} was accepted or not named: {out}");
    }
    // One replica without leader election is fine, and never rolls two at once.
    let docs = render(&[GCE[0], GCE[1], "leaderElection.enabled=false", "replicaCount=1"]);
    let deployment = find(&docs, "Deployment", "r-testrun-controller");
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
}

#[test]
fn the_chart_renders_every_pod_setting_a_platform_team_sets() {
    let docs = render(&[
        GCE[0],
        GCE[1],
        "imagePullSecrets[0].name=regcred",
        "podAnnotations.team=ci",
        "podLabels.tier=infra",
        "priorityClassName=system-cluster-critical",
        "extraEnv[0].name=HTTPS_PROXY",
        "extraEnv[0].value=http://proxy:3128",
        "envFrom[0].secretRef.name=testrun-env",
        "extraVolumes[0].name=scratch",
        "extraVolumes[0].emptyDir.medium=Memory",
        "extraVolumeMounts[0].name=scratch",
        "extraVolumeMounts[0].mountPath=/scratch",
        "log.level=debug",
        "log.format=text",
        "agentService.type=LoadBalancer",
        "agentService.annotations.networking\\.gke\\.io/load-balancer-type=Internal",
        "agentService.loadBalancerSourceRanges[0]=10.128.0.0/20",
        "defaultVmClass.create=true",
        "defaultVmClass.spec.network=ci",
        "defaultVmClass.spec.limits.maxShards=8",
    ]);
    let deployment = find(&docs, "Deployment", "r-testrun-controller");
    assert_eq!(deployment["metadata"]["namespace"], "ci");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"]["team"], "ci");
    assert_eq!(pod["metadata"]["labels"]["tier"], "infra");
    let spec = &pod["spec"];
    assert_eq!(spec["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    assert_eq!(spec["volumes"][0]["emptyDir"]["medium"], "Memory");
    let spread = &spec["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"], "r", "{spread}");
    let container = &spec["containers"][0];
    assert_eq!(container["volumeMounts"][0]["mountPath"], "/scratch");
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "testrun-env");
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or("").into(), e["value"].as_str().unwrap_or("").into()))
        .collect();
    assert!(env.contains(&("RUST_LOG".into(), "debug".into())), "{env:?}");
    assert!(env.contains(&("HTTPS_PROXY".into(), "http://proxy:3128".into())), "{env:?}");
    assert!(env.iter().any(|(name, _)| name == "POD_IP"), "{env:?}");
    let args: Vec<&str> = container["args"].as_array().expect("args").iter().filter_map(|a| a.as_str()).collect();
    assert!(args.contains(&"--log-format=text") && args.contains(&"--agent-service=r-testrun-controller-agent"));
    // The agent Service: an internal load balancer, no selector (the leader
    // writes its EndpointSlice), open to the VMs' range only.
    let agent = find(&docs, "Service", "r-testrun-controller-agent");
    assert_eq!(agent["spec"]["type"], "LoadBalancer");
    assert!(agent["spec"]["selector"].is_null(), "{agent}");
    assert_eq!(agent["spec"]["loadBalancerSourceRanges"][0], "10.128.0.0/20");
    assert_eq!(agent["metadata"]["annotations"]["networking.gke.io/load-balancer-type"], "Internal");
    assert_eq!(agent["spec"]["ports"][0]["name"], "agent");
    let pdb = find(&docs, "PodDisruptionBudget", "r-testrun-controller");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    // Rendered without a cluster (GitOps), the PDB is policy/v1.
    assert_eq!(pdb["apiVersion"], "policy/v1");
    let class = find(&docs, "VmClass", "default");
    assert_eq!(class["metadata"]["annotations"]["testrun.dev/is-default-class"], "true");
    assert_eq!(class["spec"]["limits"]["maxShards"], 8);
}

#[test]
fn with_a_watched_namespace_the_controller_gets_a_role_there_and_no_cluster_wide_write() {
    let docs = render(&[GCE[0], GCE[1], "watchNamespace=team-a"]);
    let cluster = grants(find(&docs, "ClusterRole", "r-testrun-controller"));
    assert_eq!(
        cluster,
        ["testrun.dev/vmclasses:get", "testrun.dev/vmclasses:list", "testrun.dev/vmclasses:watch"],
        "cluster-wide, only VmClasses are read"
    );
    let workloads = find(&docs, "Role", "r-testrun-controller-workloads");
    assert_eq!(workloads["metadata"]["namespace"], "team-a");
    let granted = grants(workloads);
    for want in
        ["testrun.dev/testruns:watch", "testrun.dev/prebuildpresets/status:patch", "events.k8s.io/events:create"]
    {
        assert!(granted.iter().any(|g| g == want), "{want} missing from {granted:?}");
    }
    let binding = find(&docs, "RoleBinding", "r-testrun-controller-workloads");
    assert_eq!(binding["subjects"][0]["namespace"], "ci");
    // Without it the same rules are cluster-wide.
    let docs = render(&GCE);
    let cluster = grants(find(&docs, "ClusterRole", "r-testrun-controller"));
    assert!(cluster.iter().any(|g| g == "testrun.dev/testruns:watch"), "{cluster:?}");
    assert!(!docs.iter().any(|d| d["metadata"]["name"] == "r-testrun-controller-workloads"));
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
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
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
    // The chart's VmClass, for this namespace alone, with a limit the pool
    // fits. Not annotated as the default here: tests beside this one would
    // get it.
    let class = format!("defaultVmClass.name={ns}");
    let class_namespaces = format!("defaultVmClass.spec.allowedNamespaces[0]={ns}");
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
        "--set",
        "defaultVmClass.create=true",
        "--set",
        &class,
        "--set",
        &class_namespaces,
        "--set",
        "defaultVmClass.spec.limits.allowedMachineTypes[0]=e2-*",
        "--set",
        "defaultVmClass.spec.limits.maxShards=2",
        "--set",
        "defaultVmClass.isDefault=false",
    ]);
    let _installed = Release { name: &release, namespace: &ns };
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
    // VMs reach it through the chart's agent Service, whose EndpointSlice
    // the controller writes (with the chart's permissions).
    let agent_service = format!("{fullname}-agent");
    let service = ServiceProxy::follow(&client, &ns, &agent_service).await;
    let agent_url = service.url();
    let controller = ControllerProcess::start(
        impersonating,
        &ns,
        &emulator.url,
        &[
            "--lease-secret",
            &secret,
            "--leader-elect",
            "--leader-elect-lease",
            &fullname,
            "--agent-service",
            &agent_service,
            "--agent-url",
            &agent_url,
        ],
    );
    service.wait_for_target(Some(controller.agent_port), "the controller never wrote the agent EndpointSlice").await;

    let presets: Api<PrebuildPreset> = Api::namespaced(client.clone(), &ns);
    let preset: PrebuildPreset = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "PrebuildPreset", "metadata": { "name": "pool" },
        "spec": { "templateVersion": "v1", "instances": 1, "vm": { "className": ns, "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
    }))
    .expect("preset");
    presets.create(&PostParams::default(), &preset).await.expect("preset");
    let deadline = Instant::now() + Duration::from_secs(60);
    while presets.get("pool").await.expect("get").status.is_none_or(|s| s.ready != 1) {
        assert!(Instant::now() < deadline, "the pool never filled; log:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The chart's class holds: a run above its shard limit is refused.
    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    let too_big: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun", "metadata": { "name": "too-big" },
        "spec": { "presetRef": { "name": "pool" }, "shards": 3, "command": ["true"], "vm": { "className": ns, "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
    }))
    .expect("TestRun");
    runs.create(&PostParams::default(), &too_big).await.expect("TestRun");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = runs.get("too-big").await.expect("get");
        let refusal = run.status.iter().flat_map(|s| &s.conditions).find(|c| c.reason == "InvalidSpec").cloned();
        if let Some(condition) = refusal {
            assert!(
                condition.message.contains("spec.shards") && condition.message.contains(&ns),
                "{}",
                condition.message
            );
            break;
        }
        assert!(Instant::now() < deadline, "the run above the class limit was not refused; log:\n{}", controller.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    runs.delete("too-big", &Default::default()).await.expect("delete");
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
    let classes: Api<VmClass> = Api::all(client.clone());
    assert!(classes.get_opt(&ns).await.expect("get").is_none(), "the chart's VmClass outlived the release");
}

/// The path of promtool (scripts/ensure-promtool.sh takes it from Debian's
/// prometheus package when none is installed).
fn promtool() -> PathBuf {
    ensured_tool("ensure-promtool.sh")
}

fn run_promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(common::repo_root().join("charts/testrun-controller/files"))
        .output()
        .expect("running promtool");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn chart_file(name: &str) -> String {
    std::fs::read_to_string(common::repo_root().join("charts/testrun-controller/files").join(name))
        .expect("a chart file")
}

#[test]
fn the_alert_rules_check_and_pass_their_unit_tests_in_promtool() {
    let (ok, out) = run_promtool(&["check", "rules", "alerts.yaml"]);
    assert!(ok && out.contains("SUCCESS: 6 rules found"), "{out}");
    let (ok, out) = run_promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(ok && out.contains("SUCCESS"), "{out}");
}

#[test]
fn alerts_a_dashboard_and_a_service_monitor_come_behind_toggles() {
    let kinds = |docs: &[serde_json::Value]| -> Vec<String> {
        docs.iter().filter_map(|d| d["kind"].as_str().map(str::to_string)).collect()
    };
    let plain = render(&GCE);
    assert!(!kinds(&plain).iter().any(|k| k == "ServiceMonitor" || k == "PrometheusRule"), "{:?}", kinds(&plain));
    assert!(
        !plain.iter().any(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "r-testrun-controller-dashboard")
    );

    let on =
        [&GCE[..], &["serviceMonitor.enabled=true", "prometheusRule.enabled=true", "grafanaDashboard.enabled=true"]]
            .concat();
    let docs = render(&on);
    // The ServiceMonitor selects the metrics Service alone, by a port it has.
    let monitor = find(&docs, "ServiceMonitor", "r-testrun-controller");
    let wanted = monitor["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
    let services: Vec<&serde_json::Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    let selected: Vec<&str> = services
        .iter()
        .filter(|s| wanted.iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
        .filter_map(|s| s["metadata"]["name"].as_str())
        .collect();
    assert_eq!(selected, ["r-testrun-controller-metrics"], "{wanted:?}");
    let metrics_service = find(&docs, "Service", "r-testrun-controller-metrics");
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().expect("a port name");
    assert!(metrics_service["spec"]["ports"].as_array().expect("ports").iter().any(|p| p["name"] == port));

    // The PrometheusRule carries files/alerts.yaml, and promtool takes it as rendered.
    let rule = find(&docs, "PrometheusRule", "r-testrun-controller");
    let file: serde_json::Value = serde_norway::from_str(&chart_file("alerts.yaml")).expect("alerts.yaml");
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    let rendered = std::env::temp_dir().join(format!("rendered-rules-{}.yaml", std::process::id()));
    std::fs::write(&rendered, serde_norway::to_string(&rule["spec"]).expect("YAML")).expect("writing the rules");
    let (ok, out) = run_promtool(&["check", "rules", rendered.to_str().expect("a path")]);
    let _ = std::fs::remove_file(&rendered);
    assert!(ok, "the rendered PrometheusRule: {out}");

    // The dashboard ConfigMap carries files/dashboard.json, for the sidecar.
    let dashboard = find(&docs, "ConfigMap", "r-testrun-controller-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let carried: serde_json::Value =
        serde_json::from_str(dashboard["data"]["testrun-controller.json"].as_str().expect("the JSON")).expect("JSON");
    let file: serde_json::Value = serde_json::from_str(&chart_file("dashboard.json")).expect("dashboard.json");
    assert_eq!(carried, file);
}

/// The metric families the controller exports, from its own registry. A
/// family is printed once it has a series: each gets one here.
fn exported_families() -> std::collections::BTreeSet<String> {
    use testrun_controller::metrics::steps::{Step, StepLabels};
    use testrun_controller::metrics::*;
    let m = Metrics::new();
    let preset = PresetLabels { namespace: "ci".into(), preset: "pool".into() };
    let reason = ReasonLabels { reason: "r".into() };
    let _ = m.pool_vms.get_or_create(&PoolStateLabels {
        namespace: "ci".into(),
        preset: "pool".into(),
        state: "ready".into(),
    });
    for family in [&m.pending_jobs, &m.pool_degraded, &m.pool_desired_vms] {
        let _ = family.get_or_create(&preset);
    }
    let _ = m.jobs_cancelled.get_or_create(&preset);
    for family in [&m.provision_failures, &m.claims, &m.events, &m.inventory_lists] {
        let _ = family.get_or_create(&reason);
    }
    let _ = m.reconciles.get_or_create(&ReconcileLabels { kind: "testrun".into(), result: "ok".into() });
    let _ = m.agent_binary_requests.get_or_create(&ResultLabels { result: "full".into() });
    let _ =
        m.compute_requests.get_or_create(&MethodCodeLabels { method: "instances.insert".into(), code: "OK".into() });
    let _ = m.compute_latency.get_or_create(&MethodLabels { method: "instances.insert".into() });
    let _ = m.compute_waiting.get_or_create(&ClassLabels { class: "mutation".into() });
    let _ = m.operations_resolved.get_or_create(&ResolvedLabels { kind: "insert".into(), how: "read".into() });
    let _ = m.reconcile_duration.get_or_create(&KindLabels { kind: "testrun".into() });
    let _ = m.runs_finished.get_or_create(&OutcomeLabels { outcome: "Succeeded".into() });
    let _ = m.attempts_finished.get_or_create(&OutcomeLabels { outcome: "LeaseLost".into() });
    let _ = m.shard_steps.durations.get_or_create(&StepLabels { step: Step::VmGone });
    m.encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The metric names a text uses, as families (suffixes such as `_total`
/// and `_bucket` dropped).
fn families_used(text: &str) -> std::collections::BTreeSet<String> {
    let names = regex::Regex::new(r"testrun_controller_[a-z_]+").expect("a regex");
    names
        .find_iter(text)
        .map(|m| {
            let name = m.as_str();
            ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_use_is_exported_and_every_exported_one_is_in_readme() {
    let exported = exported_families();
    assert!(exported.len() > 20, "{exported:?}");
    for (file, min) in [("alerts.yaml", 6), ("dashboard.json", 25)] {
        let used = families_used(&chart_file(file));
        assert!(used.len() >= min, "{file} uses only {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses metrics the controller does not export: {unknown:?}");
    }
    let dashboard: serde_json::Value = serde_json::from_str(&chart_file("dashboard.json")).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_i64().expect("an id")), "two panels share id {}", panel["id"]);
    }
    let readme = std::fs::read_to_string(common::repo_root().join("README.md")).expect("README.md");
    let missing: Vec<_> = exported.iter().filter(|f| !readme.contains(&format!("`{f}`"))).collect();
    assert!(missing.is_empty(), "README does not list {missing:?}");
}

/// Runs a command with `KUBECONFIG` set; returns (success, stdout and stderr).
fn run_at(kubeconfig: &std::path::Path, program: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(common::repo_root())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_crd_chart_carries_the_generated_crds() {
    for file in ["testruns.yaml", "prebuildpresets.yaml", "vmclasses.yaml"] {
        let chart =
            std::fs::read_to_string(common::repo_root().join("charts/testrun-controller-crds/files").join(file))
                .expect("CRD");
        let generated = std::fs::read_to_string(common::repo_root().join("crds").join(file)).expect("CRD");
        assert!(
            chart == generated,
            "charts/testrun-controller-crds/files/{file} differs from crds/{file}; copy it over"
        );
    }
    let (ok, out) = run_helm(&["lint", "charts/testrun-controller-crds"]);
    assert!(ok, "{out}");
    let (ok, out) = run_helm(&["template", "c", "charts/testrun-controller-crds", "--set", "keep=false"]);
    assert!(ok && out.matches("kind: CustomResourceDefinition").count() == 3, "{out}");
    assert!(!out.contains("helm.sh/resource-policy"), "keep=false keeps nothing");
}

#[tokio::test]
async fn the_crd_chart_adopts_crds_applied_before_upgrades_them_and_keeps_them_on_uninstall() {
    // CRDs are cluster-wide: this test has a control plane of its own.
    let plane = common::plane::ControlPlane::start("crd-chart");
    let kubeconfig = plane.kubeconfig.clone();
    let kubectl = PathBuf::from("kubectl");
    let helm = helm();

    // CRDs as an older release left them, applied with kubectl: without the
    // testrun-all category and without PrebuildPreset's scale subresource.
    let old = std::env::temp_dir().join(format!("old-crds-{}", std::process::id()));
    std::fs::create_dir_all(&old).expect("a folder");
    for file in ["testruns.yaml", "prebuildpresets.yaml", "vmclasses.yaml"] {
        let text = std::fs::read_to_string(common::repo_root().join("crds").join(file)).expect("CRD");
        let mut crd: serde_json::Value = serde_norway::from_str(&text).expect("YAML");
        crd["spec"]["names"].as_object_mut().expect("names").remove("categories");
        for version in crd["spec"]["versions"].as_array_mut().expect("versions") {
            if let Some(sub) = version["subresources"].as_object_mut() {
                sub.remove("scale");
            }
        }
        std::fs::write(old.join(file), serde_json::to_string(&crd).expect("JSON")).expect("writing");
    }
    let (ok, out) = run_at(&kubeconfig, &kubectl, &["apply", "-f", old.to_str().expect("a path")]);
    let _ = std::fs::remove_dir_all(&old);
    assert!(ok, "{out}");
    let (ok, out) = run_at(
        &kubeconfig,
        &kubectl,
        &[
            "wait",
            "--for=condition=Established",
            "crd/testruns.testrun.dev",
            "crd/prebuildpresets.testrun.dev",
            "--timeout=60s",
        ],
    );
    assert!(ok, "{out}");
    let client = common::client_from(&kubeconfig).await;
    let runs: Api<TestRun> = Api::namespaced(client.clone(), "default");
    let run: TestRun = serde_json::from_value(json!({
        "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun", "metadata": { "name": "kept" },
        "spec": { "command": ["true"], "vm": { "zones": ["us-central1-a"], "machineType": "e2-standard-2",
                  "image": "projects/debian-cloud/global/images/family/debian-12" } }
    }))
    .expect("a TestRun");
    runs.create(&PostParams::default(), &run).await.expect("creating a TestRun");

    // Helm refuses CRDs it does not own; adopt-crds.sh hands them over.
    let install = ["install", "crds", "charts/testrun-controller-crds", "--namespace", "default"];
    let (ok, out) = run_at(&kubeconfig, &helm, &install);
    assert!(!ok && out.contains("invalid ownership metadata"), "{out}");
    let script = common::repo_root().join("scripts/adopt-crds.sh");
    let (ok, out) = run_at(&kubeconfig, &PathBuf::from("bash"), &[script.to_str().expect("a path"), "crds", "default"]);
    assert!(ok, "adopt-crds.sh: {out}");
    let (ok, out) = run_at(&kubeconfig, &helm, &install);
    assert!(ok, "helm install after adopting: {out}");

    // The release brought the CRDs up to date; the TestRun is untouched.
    let crd_json = |name: &str| {
        let (ok, out) = run_at(&kubeconfig, &kubectl, &["get", "crd", name, "-o", "json"]);
        assert!(ok, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON")
    };
    let pbp = crd_json("prebuildpresets.testrun.dev");
    assert_eq!(pbp["spec"]["names"]["categories"], json!(["testrun-all"]));
    assert_eq!(pbp["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"], ".spec.instances");
    assert_eq!(pbp["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    let tr = crd_json("testruns.testrun.dev");
    assert_eq!(tr["spec"]["names"]["categories"], json!(["testrun-all"]));
    assert!(runs.get_opt("kept").await.expect("get").is_some());

    // A later helm upgrade applies what the chart holds now (here a change
    // made by hand is put back).
    let (ok, out) = run_at(
        &kubeconfig,
        &kubectl,
        &[
            "patch",
            "crd",
            "testruns.testrun.dev",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/names/categories"}]"#,
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) =
        run_at(&kubeconfig, &helm, &["upgrade", "crds", "charts/testrun-controller-crds", "--namespace", "default"]);
    assert!(ok, "helm upgrade: {out}");
    assert_eq!(crd_json("testruns.testrun.dev")["spec"]["names"]["categories"], json!(["testrun-all"]));

    // Uninstalling keeps the CRDs, and with them every TestRun.
    let (ok, out) = run_at(&kubeconfig, &helm, &["uninstall", "crds", "--namespace", "default"]);
    assert!(ok, "{out}");
    assert!(out.contains("kept due to the resource policy"), "{out}");
    for name in ["testruns.testrun.dev", "prebuildpresets.testrun.dev", "vmclasses.testrun.dev"] {
        let (ok, out) = run_at(&kubeconfig, &kubectl, &["get", "crd", name]);
        assert!(ok, "{name} went with the release: {out}");
    }
    assert!(runs.get_opt("kept").await.expect("get").is_some(), "the TestRun went with the release");
}
