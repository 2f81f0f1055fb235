//! The startup script the controller writes, run by the real `/bin/sh`
//! against the real agent route (`GET /agent/v1/binary`) over HTTP, with
//! curl, with wget only, with neither, with a bad checksum, and with VMs
//! sharing one agent folder. The "agent" served is a small shell script
//! that writes down how it was started.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use testrun_controller::agent::binary::{AgentBinary, router};
use testrun_controller::agent::startup::{AgentLaunch, startup_script};
use testrun_controller::metrics::Metrics;

struct Served {
    url: String,
    metrics: Arc<Metrics>,
    sha256: String,
    len: u64,
}

impl Served {
    fn count(&self, result: &str) -> u64 {
        let text = self.metrics.encode();
        text.lines()
            .find(|l| {
                l.starts_with("testrun_controller_agent_binary_requests_total{")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |n| n.parse().expect("a count"))
    }

    fn script(&self) -> String {
        startup_script(&AgentLaunch::Fetch { agent_url: self.url.clone(), sha256: self.sha256.clone(), size: self.len })
    }
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agent-delivery-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// An "agent" that appends its arguments to `$AGENT_RAN`, padded to `size`
/// bytes so a download takes a while.
fn fake_agent(dir: &Path, size: usize) -> PathBuf {
    let path = dir.join("served-agent");
    let mut body = b"#!/bin/sh\necho \"ran: $*\" >>\"$AGENT_RAN\"\nexit 0\n#".to_vec();
    body.resize(size.max(body.len()), b'x');
    body.push(b'\n');
    std::fs::write(&path, body).expect("writing the agent");
    path
}

async fn serve(binary: AgentBinary) -> Served {
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (sha256, len) = (binary.sha256.clone(), binary.len);
    let app = router(binary, metrics.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Served { url, metrics, sha256, len }
}

/// A PATH folder with only these tools (and what every script needs).
fn tools(dir: &Path, extra: &[&str]) -> PathBuf {
    let bin = dir.join(format!("bin-{}", extra.join("-")));
    std::fs::create_dir_all(&bin).expect("bin folder");
    for tool in
        ["sh", "mkdir", "chmod", "rm", "mv", "cat", "sleep", "tr", "awk", "cut", "sha256sum", "uname", "wc", "sync"]
            .iter()
            .chain(extra)
    {
        let found = ["/usr/bin", "/bin"].iter().map(|d| Path::new(d).join(tool)).find(|p| p.exists());
        let found = found.unwrap_or_else(|| panic!("{tool} is not installed"));
        let _ = std::os::unix::fs::symlink(found, bin.join(tool));
    }
    bin
}

/// Runs the startup script with `PATH=bin` and the agent folder `agent_dir`,
/// killed after `limit` when it has not ended (it retries forever).
async fn run_script(script: &str, dir: &Path, bin: &Path, agent_dir: &Path, limit: Duration) -> Output {
    let path = dir.join(format!("startup-script-{}", rand_suffix()));
    std::fs::write(&path, script).expect("writing the script");
    let child = tokio::process::Command::new("/bin/sh")
        .arg(&path)
        .env_clear()
        .env("PATH", bin)
        .env("TESTRUN_AGENT_DIR", agent_dir)
        .env("AGENT_RAN", dir.join("ran"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the script");
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => output.expect("the script's output"),
        Err(_) => Output { status: std::os::unix::process::ExitStatusExt::from_raw(9), stdout: vec![], stderr: vec![] },
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id())
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("ran")).unwrap_or_default().lines().map(str::to_string).collect()
}

fn kept_builds(agent_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(agent_dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

async fn fetches_checks_and_runs_the_agent_with(tool: &str) {
    let dir = scratch(tool);
    let served = serve(AgentBinary::read(fake_agent(&dir, 0)).expect("hashing")).await;
    let bin = tools(&dir, &[tool]);
    let agent_dir = dir.join("agent");

    let first = run_script(&served.script(), &dir, &bin, &agent_dir, Duration::from_secs(30)).await;
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(ran(&dir), ["ran: agent"], "{}", stderr(&first));
    assert_eq!(kept_builds(&agent_dir), [format!("testrun-agent-{}", served.sha256)]);
    assert_eq!((served.count("full"), served.count("not_modified")), (1, 0));

    // A VM that kept the build (a reboot) runs it without asking.
    let second = run_script(&served.script(), &dir, &bin, &agent_dir, Duration::from_secs(30)).await;
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(ran(&dir), ["ran: agent", "ran: agent"], "{}", stderr(&second));
    assert_eq!((served.count("full"), served.count("not_modified")), (1, 0));
    assert!(stderr(&second).contains("running the agent kept in"), "{}", stderr(&second));
}

#[tokio::test]
async fn the_script_fetches_checks_and_runs_the_agent_with_curl() {
    fetches_checks_and_runs_the_agent_with("curl").await;
}

#[tokio::test]
async fn the_script_fetches_checks_and_runs_the_agent_with_wget_alone() {
    fetches_checks_and_runs_the_agent_with("wget").await;
}

#[tokio::test]
async fn a_download_whose_checksum_does_not_match_is_never_run() {
    let dir = scratch("checksum");
    let mut binary = AgentBinary::read(fake_agent(&dir, 0)).expect("hashing");
    binary.sha256 = "0".repeat(64);
    let served = serve(binary).await;
    let bin = tools(&dir, &["curl"]);
    let agent_dir = dir.join("agent");
    let out = run_script(&served.script(), &dir, &bin, &agent_dir, Duration::from_secs(4)).await;
    assert!(!out.status.success(), "the script must keep trying, not end");
    assert!(ran(&dir).is_empty(), "a download with the wrong checksum ran");
    assert!(
        kept_builds(&agent_dir).is_empty(),
        "a download with the wrong checksum was kept: {:?}",
        kept_builds(&agent_dir)
    );
    assert!(served.count("full") >= 2, "the script retries");
}

#[tokio::test]
async fn without_curl_or_wget_the_script_says_so_and_stops() {
    let dir = scratch("notools");
    let served = serve(AgentBinary::read(fake_agent(&dir, 0)).expect("hashing")).await;
    let bin = tools(&dir, &[]);
    let out = run_script(&served.script(), &dir, &bin, &dir.join("agent"), Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("neither curl nor wget is on PATH"), "{}", stderr(&out));
    assert_eq!(served.count("full"), 0);
}

#[tokio::test]
async fn vms_sharing_an_agent_folder_download_each_build_once_and_ask_nothing_more() {
    let dir = scratch("shared");
    // 32 MiB: the others start while the first still downloads.
    let served = serve(AgentBinary::read(fake_agent(&dir, 32 << 20)).expect("hashing")).await;
    let bin = tools(&dir, &["curl"]);
    let agent_dir = dir.join("agent");
    let script = served.script();
    let runs = (0..6).map(|_| run_script(&script, &dir, &bin, &agent_dir, Duration::from_secs(60)));
    for out in futures::future::join_all(runs).await {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(ran(&dir).len(), 6);
    // One downloaded; the others waited for its copy and ran it, asking nothing.
    assert_eq!((served.count("full"), served.count("not_modified")), (1, 0));
    assert_eq!(
        kept_builds(&agent_dir),
        [format!("testrun-agent-{}", served.sha256)],
        "no lock or download left behind"
    );
}

#[tokio::test]
async fn a_kept_copy_cut_short_is_fetched_again_not_run() {
    let dir = scratch("short");
    let served = serve(AgentBinary::read(fake_agent(&dir, 4096)).expect("hashing")).await;
    let bin = tools(&dir, &["curl"]);
    let agent_dir = dir.join("agent");
    let first = run_script(&served.script(), &dir, &bin, &agent_dir, Duration::from_secs(30)).await;
    assert!(first.status.success(), "{}", stderr(&first));
    // A crash left the kept copy short (as a lost write would).
    let kept = agent_dir.join(format!("testrun-agent-{}", served.sha256));
    std::fs::write(&kept, b"#!/bin/sh\n").expect("cutting the copy short");
    let second = run_script(&served.script(), &dir, &bin, &agent_dir, Duration::from_secs(30)).await;
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stderr(&second).contains("cut short: fetching it again"), "{}", stderr(&second));
    assert_eq!(ran(&dir), ["ran: agent", "ran: agent"], "{}", stderr(&second));
    assert_eq!((served.count("full"), served.count("not_modified")), (2, 1));
    assert_eq!(
        std::fs::metadata(&kept).expect("kept").len(),
        std::fs::metadata(dir.join("served-agent")).expect("served").len()
    );
}

/// `vms` VMs made by an older controller share a folder that keeps its
/// build, which the agent API now refuses (exit 3, as the real agent does
/// on a 426): each runs it, is refused, and gets the current build.
async fn kept_stale_build_replaced(test: &str, vms: usize) -> (Served, PathBuf, Vec<Output>) {
    let dir = scratch(test);
    // The controller now serves this build, which writes down the build it
    // was started as. 8 MiB: the others wait while one downloads.
    let current = dir.join("current-agent");
    let mut body = b"#!/bin/sh\necho \"ran: $* as $TESTRUN_AGENT_BUILD\" >>\"$AGENT_RAN\"\nexit 0\n#".to_vec();
    body.resize(8 << 20, b'x');
    body.push(b'\n');
    std::fs::write(&current, body).expect("writing the agent");
    let served = serve(AgentBinary::read(current).expect("hashing")).await;
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir).expect("agent folder");
    let old_body = "#!/bin/sh\necho \"refused: $TESTRUN_AGENT_BUILD\" >>\"$AGENT_RAN\"\nexit 3\n";
    let old_sha = "a".repeat(64);
    let old = agent_dir.join(format!("testrun-agent-{old_sha}"));
    std::fs::write(&old, old_body).expect("writing the old build");
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let script = startup_script(&AgentLaunch::Fetch {
        agent_url: served.url.clone(),
        sha256: old_sha.clone(),
        size: old_body.len() as u64,
    });
    let bin = tools(&dir, &["curl"]);
    let runs = (0..vms).map(|_| run_script(&script, &dir, &bin, &agent_dir, Duration::from_secs(60)));
    let outputs = futures::future::join_all(runs).await;
    (served, dir, outputs)
}

#[tokio::test]
async fn a_kept_build_the_agent_api_refuses_as_stale_is_replaced_by_the_current_one() {
    let (served, dir, outputs) = kept_stale_build_replaced("stale", 1).await;
    let out = &outputs[0];
    assert!(out.status.success(), "{}", stderr(out));
    assert_eq!(
        ran(&dir),
        [format!("refused: {}", "a".repeat(64)), format!("ran: agent as {}", served.sha256)],
        "{}",
        stderr(out)
    );
    assert!(stderr(out).contains("serves another build"), "{}", stderr(out));
    assert_eq!((served.count("full"), served.count("not_modified")), (1, 0));
}

#[tokio::test]
async fn vms_sharing_a_folder_with_a_stale_build_download_the_current_one_once() {
    let (served, dir, outputs) = kept_stale_build_replaced("stale-shared", 4).await;
    for out in &outputs {
        assert!(out.status.success(), "{}", stderr(out));
    }
    let mut lines = ran(&dir);
    lines.sort();
    let refused = format!("refused: {}", "a".repeat(64));
    let current = format!("ran: agent as {}", served.sha256);
    assert_eq!(lines.iter().filter(|l| **l == refused).count(), 4, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| **l == current).count(), 4, "{lines:?}");
    // One downloaded under the lock; the others were told its copy is current.
    assert_eq!((served.count("full"), served.count("not_modified")), (1, 3));
}
