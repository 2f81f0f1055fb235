//! Requests per second the compute emulator serves on loopback, measured
//! with the real google-cloud-compute-v1 client (through the back end the
//! controller uses), the emulator running as its own process.
//!
//! Run with `cargo bench --bench emulator_throughput`. Settings:
//! `BENCH_CONCURRENCY` (default 32), `BENCH_INSERTS` (default 5000),
//! `BENCH_GETS` (default 50000).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testrun_controller::compute::gce::{GceCompute, GceConfig};
use testrun_controller::compute::naming::request_id;
use testrun_controller::compute::{Compute, InstanceSpec};

const ZONES: [&str; 3] = ["us-central1-a", "us-central1-b", "us-central1-c"];

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn spec(i: usize) -> InstanceSpec {
    InstanceSpec {
        name: format!("bench-{i}"),
        zone: ZONES[i % 3].to_string(),
        machine_type: "e2-small".into(),
        image: "projects/debian-cloud/global/images/family/debian-12".into(),
        disk_gb: 10,
        labels: BTreeMap::from([("managed-by".into(), "testrun-controller".into())]),
        metadata: BTreeMap::new(),
        startup_script: "".into(),
        service_account: None,
        network: Default::default(),
        spot: false,
        max_run_duration: Duration::from_secs(3600),
        request_id: request_id(&format!("bench/{i}"), 0),
    }
}

/// Runs `total` calls of `call` with `concurrency` tasks; returns calls per second.
async fn measure<F, Fut>(concurrency: usize, total: usize, call: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = next.clone();
            let call = call.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    call(i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bench task");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let concurrency = setting("BENCH_CONCURRENCY", 32);
    let inserts = setting("BENCH_INSERTS", 5000);
    let gets = setting("BENCH_GETS", 50_000);
    let work_dir = std::env::temp_dir().join(format!("emulator-bench-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_testrun-controller"))
        .args(["emulator", "--listen", "127.0.0.1:0", "--operation-delay", "0", "--work-dir"])
        .arg(&work_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the emulator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("address line");
    let url = line.trim().trim_start_matches("listening on ").to_string();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let compute = Arc::new(GceCompute::connect(GceConfig::new("bench").with_endpoint(&url)).await.expect("client"));
        let c = compute.clone();
        let insert_rate = measure(concurrency, inserts, move |i| {
            let c = c.clone();
            async move {
                c.insert(&spec(i)).await.expect("insert");
            }
        })
        .await;
        let c = compute.clone();
        let get_rate = measure(concurrency, gets, move |i| {
            let c = c.clone();
            async move {
                let n = i % inserts;
                c.get(ZONES[n % 3], &format!("bench-{n}")).await.expect("get").expect("exists");
            }
        })
        .await;
        println!(
            "emulator throughput on loopback ({} cores, {concurrency} concurrent callers, real client):",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        println!("  instances.insert: {insert_rate:>8.0} requests/s ({inserts} calls)");
        println!("  instances.get:    {get_rate:>8.0} requests/s ({gets} calls)");
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&work_dir);
}
