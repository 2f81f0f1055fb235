//! The operation tracker and the inventory against the compute emulator,
//! through the real google-cloud-compute-v1 client: who is woken when an
//! operation ends, and how an operation that never ends is settled.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::emulator::EmulatorProcess;
use testrun_controller::compute::gce::GceCompute;
use testrun_controller::compute::naming::request_id;
use testrun_controller::compute::{Compute, ErrorCode, InstanceSpec, OperationStatus};
use testrun_controller::controller::ops::{CloudCall, Seen};
use testrun_controller::inventory::{Inventory, InventoryConfig, OwnerWake};
use testrun_controller::metrics::Metrics;
use testrun_controller::tracker::Tracker;
use testrun_controller::tracker::decide::Patience;

const ZONE: &str = "us-central1-a";

fn spec(name: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.to_string(),
        zone: ZONE.to_string(),
        machine_type: "e2-small".into(),
        image: "img".into(),
        disk_gb: 10,
        labels: BTreeMap::from([("installation".into(), "tracker-test".into())]),
        metadata: BTreeMap::new(),
        startup_script: "".into(),
        service_account: None,
        network: Default::default(),
        spot: false,
        max_run_duration: Duration::from_secs(3600),
        request_id: request_id(&format!("insert/{name}"), 0),
    }
}

struct Harness {
    compute: GceCompute,
    tracker: Arc<Tracker<GceCompute>>,
    inventory: Arc<Inventory>,
    woken: Arc<Mutex<Vec<String>>>,
    emulator_url: String,
    _emulator: EmulatorProcess,
}

async fn harness(emulator_args: &[&str], patience: Patience) -> Harness {
    let emulator = EmulatorProcess::start(&[&["--operation-delay", "200ms"], emulator_args].concat());
    let compute = emulator.compute("proj-tracker").await;
    let metrics = Arc::new(Metrics::new());
    let woken = Arc::new(Mutex::new(Vec::new()));
    let log = woken.clone();
    let wake: OwnerWake = Arc::new(move |owner: &str| log.lock().expect("lock").push(owner.to_string()));
    let selector = BTreeMap::from([("installation".to_string(), "tracker-test".to_string())]);
    let inventory = Inventory::new(selector, InventoryConfig::default(), metrics.clone());
    let tracker = Tracker::new(compute.clone(), inventory.clone(), patience, 4, 4, metrics, wake.clone());
    tokio::spawn(inventory.clone().run(compute.clone(), wake));
    tokio::spawn(tracker.clone().run());
    Harness { compute, tracker, inventory, woken, emulator_url: emulator.url.clone(), _emulator: emulator }
}

impl Harness {
    async fn vm(&self, name: &str) {
        let op = self.compute.insert(&spec(name)).await.expect("insert");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.compute.get_operation(ZONE, &op.name).await.expect("read").status != OperationStatus::Done {
            assert!(Instant::now() < deadline, "insert not done");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_seen(&self, rid: &str) -> Seen {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.tracker.seen([rid]).remove(rid) {
                Some(Seen::InFlight) | None => {}
                Some(seen) => return seen,
            }
            assert!(Instant::now() < deadline, "the operation {rid} never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn woken(&self) -> BTreeSet<String> {
        self.woken.lock().expect("lock").iter().cloned().collect()
    }
}

/// Reads and lists within fractions of a second; settles at `deadline`.
fn impatient(deadline: Duration) -> Patience {
    Patience {
        first_read: Duration::from_millis(200),
        max_pause: Duration::from_millis(500),
        deadline,
        insert_list_after: Duration::from_millis(200),
    }
}

fn delete(name: &str, rid: &str) -> CloudCall {
    CloudCall::Delete { zone: ZONE.into(), name: name.into(), request_id: rid.into() }
}

#[tokio::test]
async fn one_delete_asked_for_by_two_owners_is_made_once_and_wakes_both() {
    let h = harness(&[], Patience::default()).await;
    h.vm("vm-shared").await;
    let rid = request_id("delete/vm-shared", 0);
    h.tracker.submit("preset-uid", delete("vm-shared", &rid));
    h.tracker.submit("run-uid", delete("vm-shared", &rid));
    assert!(matches!(h.wait_seen(&rid).await, Seen::Done));
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.woken() != BTreeSet::from(["preset-uid".to_string(), "run-uid".to_string()]) {
        assert!(Instant::now() < deadline, "woken: {:?}", h.woken());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.compute.get(ZONE, "vm-shared").await.expect("get").is_none());
    assert_eq!(h.tracker.outstanding("run-uid"), 0);

    // Asking after the end is answered at once, with a wake, and no call.
    h.tracker.submit("late-uid", delete("vm-shared", &rid));
    assert!(h.woken().contains("late-uid"), "a late asker is woken at once");

    // The entry lives while any owner still names it.
    h.tracker.forget_except("preset-uid", &BTreeSet::new());
    h.tracker.forget_except("late-uid", &BTreeSet::new());
    assert!(h.tracker.seen([rid.as_str()]).contains_key(&rid), "run-uid still names it");
    h.tracker.forget_except("run-uid", &BTreeSet::new());
    assert!(h.tracker.seen([rid.as_str()]).is_empty());
}

#[tokio::test]
async fn a_delete_that_never_ends_is_settled_at_its_deadline_by_looking_at_the_vm() {
    let h = harness(&["--fault", "call=delete,kind=hang,count=1"], impatient(Duration::from_secs(2))).await;
    h.vm("vm-hung").await;
    let rid = request_id("delete/vm-hung", 0);
    h.tracker.submit("owner", delete("vm-hung", &rid));
    match h.wait_seen(&rid).await {
        Seen::Failed(e) => assert_eq!(e.code(), ErrorCode::OperationTimedOut, "{e}"),
        other => panic!("a hung delete whose VM is still there must fail, so it is made again: {other:?}"),
    }
    assert!(h.woken().contains("owner"));
    assert!(h.compute.get(ZONE, "vm-hung").await.expect("get").is_some(), "the hung delete did nothing");
    // Made again with a new request id, it goes through.
    let again = request_id("delete/vm-hung", 1);
    h.tracker.submit("owner", delete("vm-hung", &again));
    assert!(matches!(h.wait_seen(&again).await, Seen::Done));
    assert!(h.compute.get(ZONE, "vm-hung").await.expect("get").is_none());
}

#[tokio::test]
async fn a_settling_operation_in_an_unreachable_zone_waits_for_the_regular_resync() {
    let h = harness(&["--fault", "call=delete,kind=hang,count=1"], impatient(Duration::from_secs(1))).await;
    // A list has shown the VM before its zone goes down: what that older
    // list saw must not settle anything either.
    h.vm("vm-cut-off").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.inventory.get(ZONE, "vm-cut-off").is_none() {
        assert!(Instant::now() < deadline, "no list showed the VM");
        h.inventory.want_fresh_list();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rid = request_id("delete/vm-cut-off", 0);
    h.tracker.submit("owner", delete("vm-cut-off", &rid));
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.tracker.operation_names([rid.as_str()]).is_empty() {
        assert!(Instant::now() < deadline, "the delete was not accepted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The zone goes down before any list can show the VM.
    let url = format!("{}/emulator/v1", h.emulator_url);
    let http = reqwest::Client::new();
    let rule = serde_json::json!({ "zone": ZONE, "kind": "unreachable" });
    assert_eq!(http.post(format!("{url}/faults")).json(&rule).send().await.expect("admin").status(), 201);
    // Past the deadline the tracker asks for a list to settle the delete;
    // no list can see the zone, so the VM is unknown. It must then wait for
    // the regular resync (30 s away), not ask for a list every second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lists = async || {
        let calls: serde_json::Value =
            http.get(format!("{url}/calls")).send().await.expect("admin").json().await.expect("json");
        calls["instances.aggregatedList"].as_u64().unwrap_or(0)
    };
    let before = lists().await;
    // Meanwhile the tracker is busy elsewhere (each answer is a pass).
    for i in 0..10 {
        let name = format!("vm-elsewhere-{i}");
        let call =
            CloudCall::Delete { zone: "us-central1-b".into(), name: name.clone(), request_id: request_id(&name, 0) };
        h.tracker.submit("other", call);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(lists().await - before, 0, "lists asked for while the zone is unreachable");
    let seen = h.tracker.seen([rid.as_str()]).remove(&rid);
    assert!(matches!(seen, Some(Seen::InFlight)), "nothing is settled on a view that cannot see the zone: {seen:?}");
}

#[tokio::test]
async fn a_vm_an_insert_with_a_lost_answer_may_have_made_stays_expected_until_a_delete_settles_it() {
    let h = harness(&["--fault", "call=insert,kind=lostAnswer,count=1"], Patience::default()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.inventory.lock().synced() {
        assert!(Instant::now() < deadline, "the inventory never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let vm = spec("vm-unanswered");
    h.tracker.submit("owner", CloudCall::Insert(Box::new(vm.clone())));
    match h.wait_seen(&vm.request_id).await {
        Seen::Failed(e) => assert!(e.answer_lost(), "{e}"),
        other => panic!("the insert's answer was lost: {other:?}"),
    }
    // The call was carried out. No list has shown the VM yet (the next is
    // 30 s away): a cleanup that took "not in the inventory" for gone now
    // would leave it behind.
    assert!(h.inventory.lock().listed_at().is_some());
    assert!(
        h.inventory.get(ZONE, "vm-unanswered").is_some(),
        "a VM the call may have made is still expected by the inventory"
    );
    let rid = request_id("delete/vm-unanswered", 0);
    h.tracker.submit("owner", delete("vm-unanswered", &rid));
    assert!(matches!(h.wait_seen(&rid).await, Seen::Done));
    assert!(h.compute.get(ZONE, "vm-unanswered").await.expect("get").is_none());
    assert!(h.inventory.get(ZONE, "vm-unanswered").is_none(), "the delete settles it");
}
