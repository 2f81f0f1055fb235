//! The scale benchmark: N single-shard TestRuns (`echo ok`) in a burst
//! against the local control plane, its own emulator and its own controller
//! (release builds, each its own process). Prints the time until every run
//! Succeeded and every VM is gone, create→insert latency, cloud calls per
//! run by method (the emulator's own counters), Kubernetes writes per run by
//! verb and resource (kube-apiserver's `apiserver_request_total`), reconciles
//! per run, the controller's peak RSS, and what 70 s of idle afterwards
//! cost. Run it through `scripts/bench-scale.sh N [controller flags]`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use serde_json::{Value, json};
use testrun_controller::api::testrun::{TestRun, TestRunPhase};

const IDLE: Duration = Duration::from_secs(70);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kubeconfig() -> PathBuf {
    let script = repo().join("scripts/control-plane.sh");
    let up = Command::new("bash").arg(&script).arg("up").status().expect("control-plane.sh up");
    assert!(up.success(), "control-plane.sh up failed");
    let env = Command::new("bash").arg(&script).arg("env").output().expect("control-plane.sh env");
    let line = String::from_utf8_lossy(&env.stdout).trim().to_string();
    PathBuf::from(line.strip_prefix("export KUBECONFIG=").expect("export line"))
}

/// `apiserver_request_total` summed by (verb, resource) for writes.
async fn apiserver_writes(client: &kube::Client) -> BTreeMap<(String, String), f64> {
    let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
    let text = client.request_text(request).await.expect("kube-apiserver /metrics");
    let mut writes = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let label = |name: &str| {
            labels.split(&format!("{name}=\"")).nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("").to_string()
        };
        let verb = label("verb");
        if !matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" | "CREATE" | "UPDATE") {
            continue;
        }
        let mut resource = label("resource");
        let sub = label("subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        *writes.entry((verb, resource)).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    writes
}

async fn controller_metric(port: u16, name: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("controller metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn emulator_calls(url: &str) -> BTreeMap<String, u64> {
    reqwest::get(format!("{url}/emulator/v1/calls")).await.expect("emulator").json().await.expect("JSON")
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Seconds from the clock-tick fields of /proc/PID/stat, counted after the
/// state (the command name before it may hold spaces).
fn stat_seconds(pid: u32, fields: [usize; 2]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let all: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| all.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(fields[0]) + ticks(fields[1])) / 100.0
}

/// CPU seconds (user + system) a process has used: utime and stime.
fn cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, [11, 12])
}

/// CPU seconds the waited-for children of a process have used (the
/// emulator's VM processes: each VM's agent): cutime and cstime.
fn children_cpu_seconds(pid: u32) -> f64 {
    stat_seconds(pid, [13, 14])
}

/// Pids of the local control plane's processes, by name.
fn control_plane_pids() -> Vec<(String, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm == "kube-apiserver" || comm == "etcd" {
            found.push((comm.to_string(), pid));
        }
    }
    found
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let flags: Vec<String> = args.iter().skip(1).cloned().collect();
    let bin = env!("CARGO_BIN_EXE_testrun-controller");

    let kubeconfig = kubeconfig();
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for generated in testrun_controller::crd::all() {
        let name = generated.crd.metadata.name.clone().expect("name");
        let params = kube::api::PatchParams::apply("bench-scale").force();
        crds.patch(&name, &params, &kube::api::Patch::Apply(&generated.crd)).await.expect("CRD");
    }
    let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let ns = format!("bench-{stamp}");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({ "metadata": { "name": ns } })).expect("ns"))
        .await
        .expect("namespace");

    let work = std::env::temp_dir().join(format!("bench-scale-{stamp}"));
    // The VMs run niced (19 unless TESTRUN_BENCH_VM_NICE says otherwise):
    // real VMs are other machines and never take the controller's CPU.
    let vm_nice = std::env::var("TESTRUN_BENCH_VM_NICE").unwrap_or_else(|_| "19".into());
    let mut emulator = Command::new(bin)
        .args(["emulator", "--listen", "127.0.0.1:0", "--operation-delay", "100ms", "--boot-delay", "0s"])
        .args(["--vm-nice", &vm_nice, "--work-dir"])
        .arg(&work)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("emulator");
    let mut line = String::new();
    BufReader::new(emulator.stdout.take().expect("stdout")).read_line(&mut line).expect("address");
    let emulator_url = line.trim().strip_prefix("listening on ").expect("address line").to_string();
    let emulator = Killed(emulator);

    let (agent, metrics) = (free_port(), free_port());
    let log = std::fs::File::create(work.join("controller.log")).expect("log");
    // BENCH_CONTROLLER_WRAP (e.g. `heaptrack -o /tmp/profile`) runs the
    // controller under a profiler; its RSS and CPU figures are then the
    // wrapper's.
    let wrap: Vec<String> = std::env::var("BENCH_CONTROLLER_WRAP")
        .map(|w| w.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let controller = command
        .args(["run", "--compute-endpoint", &emulator_url, "--watch-namespace", &ns, "--namespace", &ns])
        .args(["--installation-id", &ns, "--agent-listen", &format!("127.0.0.1:{agent}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(&flags)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", std::env::var("BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("controller");
    let controller_pid = controller.id();
    let controller = Killed(controller);
    let ready = Instant::now();
    loop {
        let ok = reqwest::get(format!("http://127.0.0.1:{metrics}/readyz")).await.is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(ready.elapsed() < Duration::from_secs(60), "the controller did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let writes_before = apiserver_writes(&client).await;
    let calls_before = emulator_calls(&emulator_url).await;
    let plane = control_plane_pids();
    let plane_before: Vec<f64> = plane.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let emulator_before = cpu_seconds(emulator.0.id());
    let vms_before = children_cpu_seconds(emulator.0.id());
    let reconciles_before = controller_metric(metrics, "testrun_controller_reconciles_total").await;
    println!("bench-scale: {n} TestRuns; controller flags: {flags:?}");

    let runs: Api<TestRun> = Api::namespaced(client.clone(), &ns);
    // Progress is followed with a watch: a list of every run each half second
    // would cost kube-apiserver more than the controller's own writes.
    let (seen, writer) = kube::runtime::reflector::store();
    let follow = kube::runtime::watcher(runs.clone(), kube::runtime::watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| async {});
    tokio::spawn(follow);
    seen.wait_until_ready().await.expect("watch");
    let start = Instant::now();
    let created: BTreeMap<String, (SystemTime, String)> = futures::stream::iter(0..n)
        .map(|i| {
            let runs = runs.clone();
            async move {
                let run: TestRun = serde_json::from_value(json!({
                    "apiVersion": "testrun.dev/v1alpha1", "kind": "TestRun",
                    "metadata": { "name": format!("run-{i}") },
                    "spec": { "command": ["echo", "ok"], "vm": {
                        "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" } }
                }))
                .expect("TestRun");
                let made = runs.create(&PostParams::default(), &run).await.expect("create");
                (made.metadata.uid.unwrap_or_default().replace('-', ""), (SystemTime::now(), format!("run-{i}")))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let burst = start.elapsed();

    let installation_vms = || async {
        let rows: Vec<Value> = reqwest::get(format!("{emulator_url}/emulator/v1/instances"))
            .await
            .expect("emulator")
            .json()
            .await
            .expect("JSON");
        rows.iter().filter(|r| r["labels"]["installation"] == ns.as_str()).count()
    };
    let converged = loop {
        let done = seen
            .state()
            .iter()
            .filter(|r| {
                r.status.as_ref().is_some_and(|s| s.phase == Some(TestRunPhase::Succeeded) && s.operations.is_empty())
            })
            .count();
        if done == n && installation_vms().await == 0 {
            break start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(1800), "not converged after 30 minutes: {done} of {n}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let writes_after = apiserver_writes(&client).await;
    let calls_after = emulator_calls(&emulator_url).await;
    let reconciles_after = controller_metric(metrics, "testrun_controller_reconciles_total").await;
    let rss = peak_rss_mib(controller_pid);
    let mut cpu = vec![
        format!("controller {:.1}", cpu_seconds(controller_pid)),
        format!("emulator {:.1}", cpu_seconds(emulator.0.id()) - emulator_before),
        format!("VM agents {:.1}", children_cpu_seconds(emulator.0.id()) - vms_before),
    ];
    for ((name, pid), before) in plane.iter().zip(&plane_before) {
        cpu.push(format!("{name} {:.1}", cpu_seconds(*pid) - before));
    }

    // create → insert: when the emulator accepted each run's insert.
    let history: Vec<Value> =
        reqwest::get(format!("{emulator_url}/emulator/v1/history")).await.expect("history").json().await.expect("JSON");
    let mut latency: Vec<(f64, String)> = history
        .iter()
        .filter_map(|row| {
            let name = row["name"].as_str()?;
            let uid = name.strip_prefix("tr-")?.split('-').next()?;
            let (made, run) = created.get(uid)?;
            let at: jiff::Timestamp = row["requestedAt"].as_str()?.parse().ok()?;
            let made = jiff::Timestamp::try_from(*made).ok()?;
            Some((at.duration_since(made).as_secs_f64(), format!("{run} ({made})")))
        })
        .collect::<Vec<_>>();
    latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    let slowest: Vec<String> = latency.iter().rev().take(3).map(|(s, name)| format!("{name} {s:.2} s")).collect();
    let latency: Vec<f64> = latency.into_iter().map(|(s, _)| s).collect();

    let per_run = |x: f64| x / n as f64;
    println!("  created {n} TestRuns in {:.1} s", burst.as_secs_f64());
    println!("  all Succeeded, every VM gone and every operation verified: {:.1} s", converged.as_secs_f64());
    println!(
        "  create -> insert accepted: p50 {:.2} s, p99 {:.2} s ({} inserts)",
        percentile(&latency, 0.5),
        percentile(&latency, 0.99),
        latency.len()
    );
    println!("  slowest inserts: {}; controller log: {}", slowest.join(", "), work.join("controller.log").display());
    let mut total_calls = 0;
    let mut by_method = Vec::new();
    for (method, after) in &calls_after {
        let calls = after - calls_before.get(method).copied().unwrap_or(0);
        total_calls += calls;
        by_method.push(format!("{method} {:.2}", per_run(calls as f64)));
    }
    println!("  cloud calls per run: {:.2} ({})", per_run(total_calls as f64), by_method.join(", "));
    let mut total_writes = 0.0;
    let mut by_verb = Vec::new();
    for (key, after) in &writes_after {
        let mut writes = after - writes_before.get(key).copied().unwrap_or(0.0);
        // The benchmark's own creates are not the controller's.
        if key.1 == "testruns" && key.0 == "POST" {
            writes -= n as f64;
        }
        if writes > 0.0 {
            total_writes += writes;
            by_verb.push(format!("{} {} {:.2}", key.0, key.1, per_run(writes)));
        }
    }
    println!("  Kubernetes writes per run by the controller: {:.2} ({})", per_run(total_writes), by_verb.join(", "));
    println!("  reconciles per run: {:.2}", per_run(reconciles_after - reconciles_before));
    println!("  CPU seconds until converged: {}", cpu.join(", "));
    println!("  controller peak RSS: {rss:.1} MiB");

    let idle_reconciles = controller_metric(metrics, "testrun_controller_reconciles_total").await;
    let idle_calls: u64 = emulator_calls(&emulator_url).await.values().sum();
    tokio::time::sleep(IDLE).await;
    let reconciles = controller_metric(metrics, "testrun_controller_reconciles_total").await - idle_reconciles;
    let calls = emulator_calls(&emulator_url).await.values().sum::<u64>() - idle_calls;
    println!("  {} s idle afterwards: {reconciles} reconciles, {calls} cloud calls", IDLE.as_secs());

    // Leave nothing behind: the controller removes its finalizers.
    let _ = runs.delete_collection(&DeleteParams::default(), &ListParams::default()).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while runs.list(&ListParams::default().limit(1)).await.is_ok_and(|l| !l.items.is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(controller);
    drop(emulator);
    // The Events too: kube-apiserver keeps them in memory for an hour, and
    // a thousand per run would slow the next run down.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let _ = events.delete_collection(&DeleteParams::default(), &ListParams::default()).await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    if std::env::var_os("BENCH_CONTROLLER_LOG").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
}
