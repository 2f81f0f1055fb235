//! Starts the compute emulator as its own process (`testrun-controller
//! emulator`, the same binary users run) on a free port, and stops it with
//! SIGTERM when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testrun_controller::compute::gce::{GceCompute, GceConfig};

/// A running emulator process.
pub struct EmulatorProcess {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its VM folder.
    pub work_dir: PathBuf,
    child: Child,
}

impl EmulatorProcess {
    /// Starts an emulator with extra flags (e.g. `--operation-delay 0`).
    pub fn start(args: &[&str]) -> Self {
        let work_dir = std::env::temp_dir().join(format!(
            "emulator-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_testrun-controller"))
            .args(["emulator", "--listen", "127.0.0.1:0", "--work-dir"])
            .arg(&work_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the emulator");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("reading the emulator's address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { url, work_dir, child }
    }

    /// A client for a project, through the real google-cloud-compute-v1 client.
    pub async fn compute(&self, project: &str) -> GceCompute {
        GceCompute::connect(self.config(project)).await.expect("connecting to the emulator")
    }

    /// Client settings for a project.
    pub fn config(&self, project: &str) -> GceConfig {
        GceConfig::new(project).with_endpoint(&self.url)
    }

    /// The process id of the emulator.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the emulator with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}
