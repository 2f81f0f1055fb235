//! The compute back end against the emulator, through the real
//! google-cloud-compute-v1 client: the contract the controller relies on.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::emulator::EmulatorProcess;
use google_cloud_compute_v1::client::{Instances, ZoneOperations};
use google_cloud_compute_v1::model;
use testrun_controller::compute::gce::GceCompute;
use testrun_controller::compute::naming::request_id;
use testrun_controller::compute::{
    Compute, ComputeError, ErrorCode, InstanceSpec, InstanceStatus, Operation, OperationStatus, RetryClass,
};

const ZONE: &str = "us-central1-a";

fn spec(name: &str, zone: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.to_string(),
        zone: zone.to_string(),
        machine_type: "e2-standard-2".into(),
        image: "projects/debian-cloud/global/images/family/debian-12".into(),
        disk_gb: 20,
        labels: BTreeMap::from([("managed-by".into(), "testrun-controller".into()), ("team".into(), "ci".into())]),
        metadata: BTreeMap::from([("greeting".into(), "hello".into())]),
        startup_script: "".into(),
        service_account: None,
        network: Default::default(),
        spot: false,
        max_run_duration: Duration::from_secs(3600),
        request_id: request_id(&format!("insert/{zone}/{name}"), 0),
    }
}

async fn wait_done(compute: &GceCompute, op: &Operation) -> Operation {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let current = compute.get_operation(&op.zone, &op.name).await.expect("reading the operation");
        if current.status == OperationStatus::Done {
            return current;
        }
        assert!(Instant::now() < deadline, "operation {} not DONE in time: {current:?}", op.name);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn raw_clients(emulator: &EmulatorProcess) -> (Instances, ZoneOperations) {
    let anonymous = || google_cloud_auth::credentials::anonymous::Builder::new().build();
    let instances =
        Instances::builder().with_endpoint(&emulator.url).with_credentials(anonymous()).build().await.expect("client");
    let operations = ZoneOperations::builder()
        .with_endpoint(&emulator.url)
        .with_credentials(anonymous())
        .build()
        .await
        .expect("client");
    (instances, operations)
}

#[tokio::test]
async fn insert_runs_the_vm_with_labels_metadata_and_max_run_duration() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "200ms"]);
    let compute = emulator.compute("proj-insert").await;
    let op = compute.insert(&spec("vm-1", ZONE)).await.expect("insert accepted");
    assert_ne!(op.status, OperationStatus::Done, "the call returns before the operation finishes");
    assert_eq!(op.zone, ZONE);

    let during = compute.get(ZONE, "vm-1").await.expect("get").expect("the VM exists while provisioning");
    assert!(matches!(during.status, InstanceStatus::Provisioning | InstanceStatus::Staging), "{:?}", during.status);

    let done = wait_done(&compute, &op).await;
    assert!(done.succeeded(), "{done:?}");
    let vm = compute.get(ZONE, "vm-1").await.expect("get").expect("exists");
    assert_eq!(vm.status, InstanceStatus::Running);
    assert_eq!(vm.zone, ZONE);
    assert_eq!(vm.labels.get("team").map(String::as_str), Some("ci"));
    assert_eq!(vm.metadata.get("greeting").map(String::as_str), Some("hello"));
    assert!(!vm.label_fingerprint.is_empty());

    // The back end always asks Compute Engine to delete the VM by itself.
    let (instances, _) = raw_clients(&emulator).await;
    let raw = instances.get().set_project("proj-insert").set_zone(ZONE).set_instance("vm-1").send().await.expect("get");
    let scheduling = raw.scheduling.expect("scheduling is set");
    assert_eq!(scheduling.max_run_duration.and_then(|d| d.seconds), Some(3600));
    assert_eq!(scheduling.instance_termination_action.as_ref().and_then(|a| a.name()), Some("DELETE"));
}

#[tokio::test]
async fn delete_removes_the_vm_and_not_found_is_reported() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms"]);
    let compute = emulator.compute("proj-delete").await;
    wait_done(&compute, &compute.insert(&spec("vm-1", ZONE)).await.expect("insert")).await;
    let op = compute.delete(ZONE, "vm-1", &request_id("delete/vm-1", 0)).await.expect("delete accepted");
    assert!(wait_done(&compute, &op).await.succeeded());
    assert_eq!(compute.get(ZONE, "vm-1").await.expect("get"), None);

    let err = compute.delete(ZONE, "vm-1", &request_id("delete/vm-1", 1)).await.expect_err("already gone");
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert_eq!(err.http_status(), Some(404));
    assert!(err.is_not_found());
}

#[tokio::test]
async fn request_ids_make_inserts_and_deletes_idempotent() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms"]);
    let compute = emulator.compute("proj-idem").await;
    let vm = spec("vm-1", ZONE);
    let first = compute.insert(&vm).await.expect("insert");
    let again = compute.insert(&vm).await.expect("same requestId is accepted again");
    assert_eq!(first.name, again.name, "same requestId, same operation");
    wait_done(&compute, &first).await;
    let after_done = compute.insert(&vm).await.expect("still the same operation after it finished");
    assert_eq!(after_done.name, first.name);
    assert_eq!(compute.list_by_labels(&BTreeMap::new()).await.expect("list").instances.len(), 1);

    let mut other = vm.clone();
    other.request_id = request_id("insert/other", 0);
    let err = compute.insert(&other).await.expect_err("a new requestId for a taken name");
    assert!(err.is_already_exists(), "{err:?}");
    assert_eq!(err.http_status(), Some(409));
    assert_eq!(err.retry_class(), RetryClass::Permanent);

    let rid = request_id("delete/vm-1", 0);
    let d1 = compute.delete(ZONE, "vm-1", &rid).await.expect("delete");
    let d2 = compute.delete(ZONE, "vm-1", &rid).await.expect("same delete again");
    assert_eq!(d1.name, d2.name);
    assert!(wait_done(&compute, &d1).await.succeeded());
    let d3 = compute.delete(ZONE, "vm-1", &rid).await.expect("same requestId after the VM is gone");
    assert_eq!(d3.name, d1.name, "the finished operation, not notFound");
}

#[tokio::test]
async fn a_call_whose_answer_is_lost_happened_and_its_request_id_returns_its_operation() {
    let emulator =
        EmulatorProcess::start(&["--operation-delay", "50ms", "--fault", "call=insert,kind=lostAnswer,count=1"]);
    let compute = emulator.compute("proj-lost").await;
    let vm = spec("vm-1", ZONE);
    let err = compute.insert(&vm).await.expect_err("the answer is lost");
    assert_eq!((err.http_status(), err.code()), (Some(503), ErrorCode::Unavailable), "{err:?}");
    // The call happened all the same: the same request id gets its operation.
    let op = compute.insert(&vm).await.expect("the same requestId returns the operation");
    assert!(wait_done(&compute, &op).await.succeeded());
    assert_eq!(compute.list_by_labels(&BTreeMap::new()).await.expect("list").instances.len(), 1);
    // A new request id for the same name is told the VM exists.
    let mut other = vm.clone();
    other.request_id = request_id("insert/vm-1", 1);
    assert!(compute.insert(&other).await.expect_err("taken").is_already_exists());
}

#[tokio::test]
async fn aggregated_list_filters_by_label_across_zones_and_pages() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "0"]);
    let mut config = emulator.config("proj-list");
    config.page_size = 100;
    let compute = GceCompute::connect(config).await.expect("client");
    let zones = ["us-central1-a", "us-central1-b", "europe-west4-c"];
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..250 {
        let zone = zones[i % 3];
        let mut vm = spec(&format!("vm-{i:03}"), zone);
        let installation = if i % 5 == 0 { "other" } else { "mine" };
        vm.labels.insert("installation".into(), installation.into());
        if installation == "mine" {
            expected.insert((zone.to_string(), vm.name.clone()));
        }
        compute.insert(&vm).await.expect("insert");
    }
    let selector = BTreeMap::from([
        ("managed-by".to_string(), "testrun-controller".to_string()),
        ("installation".to_string(), "mine".to_string()),
    ]);
    let listing = compute.list_by_labels(&selector).await.expect("aggregated list");
    assert_eq!(listing.pages, 2, "200 matching VMs at 100 a page");
    assert!(listing.unreachable.is_empty());
    let found = listing.instances;
    let got: std::collections::BTreeSet<_> = found.iter().map(|i| (i.zone.clone(), i.name.clone())).collect();
    assert_eq!(found.len(), 200, "every page read, no VM twice");
    assert_eq!(got, expected);

    // The pages really are pages: one raw call returns 100 and a token.
    let (instances, _) = raw_clients(&emulator).await;
    let page = instances
        .aggregated_list()
        .set_project("proj-list")
        .set_filter("labels.installation = mine")
        .set_max_results(100u32)
        .send()
        .await
        .expect("one page");
    let on_page: usize = page.items.values().map(|s| s.instances.len()).sum();
    assert_eq!(on_page, 100);
    assert!(page.next_page_token.is_some_and(|t| !t.is_empty()));
    assert!(page.items.keys().all(|k| k.starts_with("zones/")), "{:?}", page.items.keys());

    let bad = instances.aggregated_list().set_project("proj-list").set_filter("labels.x = (").send().await;
    assert_eq!(bad.expect_err("malformed filter").http_status_code(), Some(400));
}

#[tokio::test]
async fn capacity_and_quota_faults_fail_the_insert_operation() {
    let emulator = EmulatorProcess::start(&[
        "--operation-delay",
        "50ms",
        "--fault",
        "call=insert,zone=us-central1-a,kind=capacity,count=1",
        "--fault",
        "call=insert,zone=us-central1-b,kind=quota,count=1",
    ]);
    let compute = emulator.compute("proj-capacity").await;
    let op = compute.insert(&spec("vm-a", "us-central1-a")).await.expect("the call itself succeeds");
    let done = wait_done(&compute, &op).await;
    let err = done.error.expect("the operation failed");
    assert_eq!(err.code(), ErrorCode::ZoneResourcePoolExhausted);
    assert_eq!(err.retry_class(), RetryClass::TryAnotherZone);
    assert!(matches!(err, ComputeError::OperationFailed { .. }));
    assert_eq!(compute.get("us-central1-a", "vm-a").await.expect("get"), None, "a failed insert leaves no VM");

    let op = compute.insert(&spec("vm-b", "us-central1-b")).await.expect("accepted");
    let err = wait_done(&compute, &op).await.error.expect("failed");
    assert_eq!(err.code(), ErrorCode::QuotaExceeded);
    assert_eq!(err.retry_class(), RetryClass::TryAnotherZone);

    // Counts are used up: the next inserts in both zones succeed.
    for (name, zone) in [("vm-a2", "us-central1-a"), ("vm-b2", "us-central1-b")] {
        let op = compute.insert(&spec(name, zone)).await.expect("accepted");
        assert!(wait_done(&compute, &op).await.succeeded());
    }
}

#[tokio::test]
async fn http_faults_surface_with_status_code_and_retry_class() {
    let emulator = EmulatorProcess::start(&[
        "--operation-delay",
        "0",
        "--fault",
        "call=get,kind=rateLimit,count=1",
        "--fault",
        "call=aggregatedList,kind=unavailable,count=1",
    ]);
    let compute = emulator.compute("proj-http").await;
    let err = compute.get(ZONE, "vm-1").await.expect_err("rate limited");
    assert_eq!(
        (err.code(), err.http_status(), err.retry_class()),
        (ErrorCode::RateLimitExceeded, Some(429), RetryClass::RetryLater)
    );
    assert_eq!(compute.get(ZONE, "vm-1").await.expect("the count is used up"), None);

    let err = compute.list_by_labels(&BTreeMap::new()).await.expect_err("unavailable");
    assert_eq!(
        (err.code(), err.http_status(), err.retry_class()),
        (ErrorCode::Unavailable, Some(503), RetryClass::RetrySoon)
    );
    assert!(compute.list_by_labels(&BTreeMap::new()).await.expect("recovered").instances.is_empty());
}

#[tokio::test]
async fn faults_set_over_the_admin_api_fail_hang_vanish_and_slow_down_deletes() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "50ms"]);
    let compute = emulator.compute("proj-admin").await;
    for name in ["vm-fail", "vm-hang", "vm-vanish", "vm-slow"] {
        wait_done(&compute, &compute.insert(&spec(name, ZONE)).await.expect("insert")).await;
    }
    let http = reqwest::Client::new();
    let faults = format!("{}/emulator/v1/faults", emulator.url);
    let bad =
        http.post(&faults).json(&serde_json::json!({"kind": "capacity", "call": "get"})).send().await.expect("post");
    assert_eq!(bad.status(), 400, "a fault that cannot apply is refused");

    let add = |rule: serde_json::Value| {
        let http = http.clone();
        let faults = faults.clone();
        async move {
            let response = http.post(&faults).json(&rule).send().await.expect("post");
            assert_eq!(response.status(), 201);
        }
    };

    add(serde_json::json!({"call": "delete", "kind": "fail", "count": 1})).await;
    let op = compute.delete(ZONE, "vm-fail", &request_id("d/vm-fail", 0)).await.expect("accepted");
    let err = wait_done(&compute, &op).await.error.expect("the delete failed");
    assert_eq!(err.code(), ErrorCode::Unavailable, "INTERNAL_ERROR is a passing failure: {err:?}");
    assert!(compute.get(ZONE, "vm-fail").await.expect("get").is_some(), "a failed delete leaves the VM");
    let retry = compute.delete(ZONE, "vm-fail", &request_id("d/vm-fail", 1)).await.expect("retry with a new requestId");
    assert!(wait_done(&compute, &retry).await.succeeded());

    add(serde_json::json!({"call": "delete", "kind": "hang", "count": 1})).await;
    let op = compute.delete(ZONE, "vm-hang", &request_id("d/vm-hang", 0)).await.expect("accepted");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let still = compute.get_operation(ZONE, &op.name).await.expect("readable");
    assert_eq!(still.status, OperationStatus::Running, "a hung operation never finishes");
    assert!(compute.get(ZONE, "vm-hang").await.expect("get").is_some());

    add(serde_json::json!({"call": "delete", "kind": "vanish", "count": 1})).await;
    let op = compute.delete(ZONE, "vm-vanish", &request_id("d/vm-vanish", 0)).await.expect("accepted");
    let err = compute.get_operation(ZONE, &op.name).await.expect_err("the operation vanished");
    assert_eq!(err.code(), ErrorCode::OperationVanished);
    assert_eq!(err.retry_class(), RetryClass::RetrySoon);
    assert!(compute.get(ZONE, "vm-vanish").await.expect("get").is_some(), "a vanished delete did nothing");

    add(serde_json::json!({"call": "delete", "kind": "slow", "delayMs": 600, "count": 1})).await;
    let op = compute.delete(ZONE, "vm-slow", &request_id("d/vm-slow", 0)).await.expect("accepted");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_ne!(compute.get_operation(ZONE, &op.name).await.expect("read").status, OperationStatus::Done, "slowed down");
    assert!(wait_done(&compute, &op).await.succeeded());

    let listed: serde_json::Value = http.get(&faults).send().await.expect("get").json().await.expect("json");
    let hits: Vec<u64> =
        listed["rules"].as_array().expect("rules").iter().map(|r| r["hits"].as_u64().unwrap_or(0)).collect();
    assert_eq!(hits, vec![1, 1, 1, 1], "{listed}");
    assert_eq!(http.delete(&faults).send().await.expect("clear").status(), 204);
}

#[tokio::test]
async fn set_labels_needs_the_current_fingerprint() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "0"]);
    let compute = emulator.compute("proj-labels").await;
    wait_done(&compute, &compute.insert(&spec("vm-1", ZONE)).await.expect("insert")).await;
    let before = compute.get(ZONE, "vm-1").await.expect("get").expect("exists");
    let mut labels = before.labels.clone();
    labels.insert("claimed-by".into(), "run-7".into());
    let op = compute
        .set_labels(ZONE, "vm-1", &labels, &before.label_fingerprint, &request_id("claim/vm-1", 0))
        .await
        .expect("the current fingerprint is accepted");
    assert!(wait_done(&compute, &op).await.succeeded());
    let after = compute.get(ZONE, "vm-1").await.expect("get").expect("exists");
    assert_eq!(after.labels, labels);
    assert_ne!(after.label_fingerprint, before.label_fingerprint);

    labels.insert("claimed-by".into(), "run-8".into());
    let err = compute
        .set_labels(ZONE, "vm-1", &labels, &before.label_fingerprint, &request_id("claim/vm-1/b", 0))
        .await
        .expect_err("a stale fingerprint loses");
    assert_eq!((err.code(), err.http_status()), (ErrorCode::ConditionNotMet, Some(412)));
    assert_eq!(compute.get(ZONE, "vm-1").await.expect("get").expect("exists").labels["claimed-by"], "run-7");
}

#[tokio::test]
async fn invalid_requests_are_refused_like_compute_engine() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "0"]);
    let compute = emulator.compute("proj-invalid").await;
    let mut bad = spec("Not_A_Name", ZONE);
    let err = compute.insert(&bad).await.expect_err("bad name");
    assert_eq!((err.code(), err.http_status()), (ErrorCode::Invalid, Some(400)));
    bad = spec("vm-1", ZONE);
    bad.request_id = "not-a-uuid".into();
    assert_eq!(compute.insert(&bad).await.expect_err("bad request id").code(), ErrorCode::Invalid);
    let err = compute.insert(&spec("vm-1", "mars-north1-zz")).await.expect_err("unknown zone");
    assert_eq!(err.code(), ErrorCode::Invalid);
    bad = spec("vm-1", ZONE);
    bad.labels.insert("Team".into(), "x".into());
    assert_eq!(compute.insert(&bad).await.expect_err("bad label").code(), ErrorCode::Invalid);
    assert!(compute.list_by_labels(&BTreeMap::new()).await.expect("list").instances.is_empty(), "nothing was created");
}

#[tokio::test]
async fn network_subnetwork_tags_and_external_ip_reach_compute_engine_as_asked() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "0"]);
    let compute = emulator.compute("proj-network").await;
    let (instances, _) = raw_clients(&emulator).await;
    let read = async |name: &str| {
        instances.get().set_project("proj-network").set_zone(ZONE).set_instance(name).send().await.expect("get")
    };

    // The default: the project's default network, no external IP, no tags.
    let op = compute.insert(&spec("vm-default", ZONE)).await.expect("insert");
    wait_done(&compute, &op).await;
    let vm = read("vm-default").await;
    let nic = &vm.network_interfaces[0];
    assert_eq!(nic.network.as_deref(), Some("global/networks/default"));
    assert!(nic.access_configs.is_empty(), "no external IP unless asked for");
    assert!(vm.tags.is_none_or(|t| t.items.is_empty()));

    // A Shared VPC subnetwork of a host project, tags, an external IP.
    let mut shared = spec("vm-shared", ZONE);
    shared.network.subnetwork = Some("projects/host-project/regions/us-central1/subnetworks/ci".into());
    shared.network.tags = vec!["ci-runner".into(), "allow-agent".into()];
    shared.network.external_ip = true;
    let op = compute.insert(&shared).await.expect("insert");
    wait_done(&compute, &op).await;
    let vm = read("vm-shared").await;
    let nic = &vm.network_interfaces[0];
    assert_eq!(nic.network, None, "the subnetwork names its network");
    assert_eq!(nic.subnetwork.as_deref(), Some("projects/host-project/regions/us-central1/subnetworks/ci"));
    assert_eq!(nic.access_configs.len(), 1);
    assert_eq!(nic.access_configs[0].r#type.as_ref().and_then(|t| t.name()), Some("ONE_TO_ONE_NAT"));
    assert_eq!(vm.tags.expect("tags").items, ["ci-runner", "allow-agent"]);

    // Shapes Compute Engine refuses are refused with 400, and nothing is made.
    let mut bad = spec("vm-bad", ZONE);
    bad.network.subnetwork = Some("regions/europe-west1/subnetworks/ci".into());
    let err = compute.insert(&bad).await.expect_err("a subnetwork of another region");
    assert_eq!((err.code(), err.http_status()), (ErrorCode::Invalid, Some(400)));
    bad = spec("vm-bad", ZONE);
    bad.network.network = Some("default".into());
    assert_eq!(compute.insert(&bad).await.expect_err("a malformed network").code(), ErrorCode::Invalid);
    bad = spec("vm-bad", ZONE);
    bad.network.tags = vec!["Not_A_Tag".into()];
    assert_eq!(compute.insert(&bad).await.expect_err("a malformed tag").code(), ErrorCode::Invalid);
    assert!(compute.get(ZONE, "vm-bad").await.expect("get").is_none(), "nothing was created");
}

#[tokio::test]
async fn termination_time_deletes_the_vm_and_wait_returns_done() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "100ms"]);
    let (instances, operations) = raw_clients(&emulator).await;
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(1500);
    let body = model::Instance::new()
        .set_name("vm-expiring")
        .set_machine_type("zones/us-central1-a/machineTypes/e2-small")
        .set_disks([model::AttachedDisk::new().set_boot(true).set_initialize_params(
            model::AttachedDiskInitializeParams::new()
                .set_source_image("projects/debian-cloud/global/images/family/debian-12"),
        )])
        .set_scheduling(
            model::Scheduling::new()
                .set_termination_time(at.to_string())
                .set_instance_termination_action(model::scheduling::InstanceTerminationAction::Delete),
        );
    let op = instances.insert().set_project("proj-ttl").set_zone(ZONE).set_body(body).send().await.expect("insert");
    let waited = operations
        .wait()
        .set_project("proj-ttl")
        .set_zone(ZONE)
        .set_operation(op.name.clone().expect("named"))
        .send()
        .await
        .expect("wait");
    assert_eq!(waited.status.as_ref().and_then(|s| s.name()), Some("DONE"), "wait blocks until DONE");
    let compute = emulator.compute("proj-ttl").await;
    assert!(compute.get(ZONE, "vm-expiring").await.expect("get").is_some());
    eventually("the VM to expire", async || compute.get(ZONE, "vm-expiring").await.expect("get").is_none()).await;

    // A limit without a termination action is refused, as on Compute Engine.
    let body = model::Instance::new()
        .set_name("vm-no-action")
        .set_machine_type("zones/us-central1-a/machineTypes/e2-small")
        .set_disks([model::AttachedDisk::new()
            .set_initialize_params(model::AttachedDiskInitializeParams::new().set_source_image("img"))])
        .set_scheduling(model::Scheduling::new().set_max_run_duration(model::Duration::new().set_seconds(60)));
    let err =
        instances.insert().set_project("proj-ttl").set_zone(ZONE).set_body(body).send().await.expect_err("refused");
    assert_eq!(err.http_status_code(), Some(400));
}

fn group_alive(pid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

async fn vm_rows(emulator: &EmulatorProcess) -> Vec<serde_json::Value> {
    let url = format!("{}/emulator/v1/instances", emulator.url);
    reqwest::get(&url).await.expect("admin api").json().await.expect("json")
}

const SCRIPT: &str = r#"
printf '%s\n%s\n%s\n%s\n' "$GCE_INSTANCE_NAME" "$GCE_INSTANCE_ZONE" "$GCE_METADATA_HOST" "$GCE_METADATA_ATTR_GREETING" > booted.txt.tmp
mv booted.txt.tmp booted.txt
sleep 600 &
sleep 600
"#;

/// Inserts VMs (name, Spot or not) running [`SCRIPT`] and waits until
/// every one has booted; returns the emulator's rows of them.
async fn boot_script_vms(
    emulator: &EmulatorProcess,
    compute: &GceCompute,
    vms: &[(&str, bool)],
) -> Vec<serde_json::Value> {
    for (name, spot) in vms {
        let mut vm = spec(name, ZONE);
        vm.startup_script = SCRIPT.into();
        vm.spot = *spot;
        wait_done(compute, &compute.insert(&vm).await.expect("insert")).await;
    }
    let mut rows = Vec::new();
    eventually("every VM to boot", async || {
        rows = vm_rows(emulator).await;
        rows.len() == vms.len() && rows.iter().all(|r| r["processAlive"] == true)
    })
    .await;
    rows
}

#[tokio::test]
async fn startup_script_boots_reads_metadata_and_dies_with_its_vm() {
    let mut emulator = EmulatorProcess::start(&["--operation-delay", "50ms", "--boot-delay", "50ms"]);
    let compute = emulator.compute("proj-boot").await;
    let rows = boot_script_vms(&emulator, &compute, &[("vm-1", false), ("vm-2", false)]).await;

    // The script ran with its identity in the environment.
    let row = rows.iter().find(|r| r["name"] == "vm-1").expect("vm-1 listed").clone();
    let booted = emulator.work_dir.join("vms").join(ZONE);
    let mut text = String::new();
    eventually("the script to write its file", async || {
        let dirs =
            std::fs::read_dir(&booted).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()).unwrap_or_default();
        let dir = dirs.iter().find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vm-1-")));
        text = dir.and_then(|d| std::fs::read_to_string(d.join("booted.txt")).ok()).unwrap_or_default();
        !text.is_empty()
    })
    .await;
    let lines: Vec<&str> = text.lines().collect();
    let metadata_host = row["metadataHost"].as_str().expect("metadata host").to_string();
    assert_eq!(lines, vec!["vm-1", ZONE, metadata_host.as_str(), "hello"]);

    // Its metadata server answers as Compute Engine's does.
    let http = reqwest::Client::new();
    let base = format!("http://{metadata_host}/computeMetadata/v1");
    let refused = http.get(format!("{base}/instance/name")).send().await.expect("request");
    assert_eq!(refused.status(), 403, "the Metadata-Flavor header is required");
    let read = |path: &'static str| {
        let http = http.clone();
        let url = format!("{base}/{path}");
        async move {
            let response = http.get(url).header("Metadata-Flavor", "Google").send().await.expect("request");
            (response.status().as_u16(), response.text().await.expect("body"))
        }
    };
    assert_eq!(read("instance/name").await, (200, "vm-1".to_string()));
    assert!(read("instance/zone").await.1.ends_with(&format!("/zones/{ZONE}")));
    assert_eq!(read("instance/attributes/greeting").await, (200, "hello".to_string()));
    assert_eq!(read("project/project-id").await, (200, "proj-boot".to_string()));
    assert_eq!(read("instance/attributes/missing").await.0, 404);
    let keys = read("instance/attributes/").await.1;
    assert!(keys.lines().any(|k| k == "startup-script") && keys.lines().any(|k| k == "greeting"), "{keys}");

    // Deleting the VM kills its whole process group.
    let pid1 = row["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).expect("pid");
    assert!(group_alive(pid1));
    let op = compute.delete(ZONE, "vm-1", &request_id("d/vm-1", 0)).await.expect("delete");
    wait_done(&compute, &op).await;
    eventually("vm-1's processes to die", async || !group_alive(pid1)).await;

    // Stopping the emulator stops the VMs it still runs.
    let pid2 = vm_rows(&emulator)
        .await
        .iter()
        .find_map(|r| r["pid"].as_i64())
        .and_then(|p| i32::try_from(p).ok())
        .expect("vm-2 pid");
    assert!(group_alive(pid2));
    emulator.stop();
    eventually("vm-2's processes to die with the emulator", async || !group_alive(pid2)).await;
}

#[tokio::test]
async fn an_unreachable_zone_is_named_by_the_aggregated_list_and_its_calls_fail() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "0"]);
    let compute = emulator.compute("proj-unreachable").await;
    for (name, zone) in [("vm-a", "us-central1-a"), ("vm-b", "us-central1-b")] {
        wait_done(&compute, &compute.insert(&spec(name, zone)).await.expect("insert")).await;
    }
    let faults = format!("{}/emulator/v1/faults", emulator.url);
    let rule = serde_json::json!({ "zone": "us-central1-a", "kind": "unreachable", "count": 2 });
    let added = reqwest::Client::new().post(&faults).json(&rule).send().await.expect("admin API");
    assert_eq!(added.status(), 201);

    let listing = compute.list_by_labels(&BTreeMap::new()).await.expect("a partial list still answers");
    let names: Vec<&str> = listing.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, vec!["vm-b"], "the unreachable zone's VM is not listed");
    assert_eq!(listing.unreachable, std::collections::BTreeSet::from(["us-central1-a".to_string()]));
    let err = compute.get("us-central1-a", "vm-a").await.expect_err("the zone cannot be reached");
    assert_eq!(err.code(), ErrorCode::Unavailable);
    // The rule's count is used up: the zone answers again, with its VM.
    let listing = compute.list_by_labels(&BTreeMap::new()).await.expect("list");
    assert_eq!(listing.instances.len(), 2);
    assert!(listing.unreachable.is_empty());
}

#[tokio::test]
async fn the_emulator_counts_calls_by_method() {
    let emulator = EmulatorProcess::start(&["--operation-delay", "0"]);
    let compute = emulator.compute("proj-count").await;
    let op = compute.insert(&spec("vm-1", ZONE)).await.expect("insert");
    compute.insert(&spec("vm-1", ZONE)).await.expect("a repeated insert is a call too");
    compute.get_operation(ZONE, &op.name).await.expect("operation");
    compute.list_by_labels(&BTreeMap::new()).await.expect("list");
    compute.get(ZONE, "vm-1").await.expect("get");
    let url = format!("{}/emulator/v1/calls", emulator.url);
    let calls: BTreeMap<String, u64> = reqwest::get(&url).await.expect("admin API").json().await.expect("JSON");
    let expected: BTreeMap<String, u64> =
        [("instances.aggregatedList", 1), ("instances.get", 1), ("instances.insert", 2), ("zoneOperations.get", 1)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(calls, expected);
    reqwest::Client::new().delete(&url).send().await.expect("reset");
    let calls: BTreeMap<String, u64> = reqwest::get(&url).await.expect("admin API").json().await.expect("JSON");
    assert!(calls.is_empty(), "{calls:?}");
}

#[tokio::test]
async fn a_spot_vm_is_preempted_as_compute_engine_does_and_a_standard_one_never() {
    let emulator =
        EmulatorProcess::start(&["--operation-delay", "50ms", "--boot-delay", "50ms", "--preempt-notice", "2s"]);
    let compute = emulator.compute("proj-spot").await;
    let rows = boot_script_vms(&emulator, &compute, &[("spot-1", true), ("standard-1", false)]).await;
    let row = |name: &str| rows.iter().find(|r| r["name"] == name).expect("a row").clone();
    assert_eq!((row("spot-1")["spot"].clone(), row("standard-1")["spot"].clone()), (true.into(), false.into()));
    let http = reqwest::Client::new();
    let preempted_says = |host: String| {
        let http = http.clone();
        async move {
            let url = format!("http://{host}/computeMetadata/v1/instance/preempted");
            let r = http.get(url).header("Metadata-Flavor", "Google").send().await.expect("metadata");
            r.text().await.expect("body")
        }
    };
    let spot_host = row("spot-1")["metadataHost"].as_str().expect("a metadata host").to_string();
    let spot_pid = row("spot-1")["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).expect("pid");
    assert_eq!(preempted_says(spot_host.clone()).await, "FALSE");

    let preempt = |name: &str| {
        let url = format!("{}/emulator/v1/instances/{ZONE}/{name}/preempt", emulator.url);
        async move { reqwest::Client::new().post(url).send().await.expect("admin api") }
    };
    // Compute Engine preempts Spot VMs only.
    let refused = preempt("standard-1").await;
    assert_eq!(refused.status(), 409);
    assert!(refused.text().await.expect("body").contains("not a Spot VM"));
    assert_eq!(preempt("nothing-here").await.status(), 404);

    // The notice, an ACPI soft off: the VM is STOPPING and its processes get
    // SIGTERM, its metadata says TRUE meanwhile, and then (with the
    // controller's instanceTerminationAction DELETE) it is deleted.
    let answer: serde_json::Value = preempt("spot-1").await.json().await.expect("json");
    assert_eq!((answer["preempted"].clone(), answer["then"].clone()), (true.into(), "delete".into()), "{answer}");
    assert_eq!(preempt("spot-1").await.status(), 200, "preempting again changes nothing");
    assert_eq!(preempted_says(spot_host).await, "TRUE");
    let listed = vm_rows(&emulator).await;
    let spot = listed.iter().find(|r| r["name"] == "spot-1").expect("still listed during its notice");
    assert_eq!((spot["status"].clone(), spot["preempted"].clone()), ("STOPPING".into(), true.into()), "{spot}");
    eventually("the soft off to end its processes", async || !group_alive(spot_pid)).await;
    eventually("the preempted VM to be deleted", async || matches!(compute.get(ZONE, "spot-1").await, Ok(None))).await;
    eventually("its processes to die", async || !group_alive(spot_pid)).await;
    let standard = compute.get(ZONE, "standard-1").await.expect("get").expect("the standard VM");
    assert_eq!(standard.status, InstanceStatus::Running);
}

#[tokio::test]
async fn a_preempt_fault_preempts_the_spot_vms_it_draws_after_they_boot() {
    let emulator = EmulatorProcess::start(&[
        "--operation-delay",
        "50ms",
        "--boot-delay",
        "50ms",
        "--preempt-notice",
        "300ms",
        "--fault",
        "call=insert,kind=preempt,delayMs=200",
    ]);
    let compute = emulator.compute("proj-spot-fault").await;
    for (name, spot) in [("spot-2", true), ("standard-2", false)] {
        let mut vm = spec(name, ZONE);
        vm.spot = spot;
        wait_done(&compute, &compute.insert(&vm).await.expect("insert")).await;
    }
    eventually("the Spot VM to be preempted and deleted", async || {
        matches!(compute.get(ZONE, "spot-2").await, Ok(None))
    })
    .await;
    // The standard VM drew the fault too, and is never preempted.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let standard = compute.get(ZONE, "standard-2").await.expect("get").expect("the standard VM");
    assert_eq!(standard.status, InstanceStatus::Running);
    let faults: serde_json::Value =
        reqwest::get(format!("{}/emulator/v1/faults", emulator.url)).await.expect("faults").json().await.expect("json");
    assert_eq!(faults["rules"][0]["kind"], "preempt");

    // A preempt fault for any call but insert is refused.
    let bad = reqwest::Client::new()
        .post(format!("{}/emulator/v1/faults", emulator.url))
        .json(&serde_json::json!({ "call": "delete", "kind": "preempt" }))
        .send()
        .await
        .expect("admin api");
    assert_eq!(bad.status(), 400, "{:?}", bad.text().await);
}
