//! Runs the controller as its own process (`testrun-controller run`, as
//! users run it) against the local control plane and an emulator, watching
//! one test namespace only, so tests run side by side.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A free loopback port for a process to listen on later: picked below the
/// kernel's ephemeral range (`ip_local_port_range`, 32768 and up by
/// default), so no port 0 listener and no outgoing connection of any test
/// can take it between this pick and the process's bind.
pub fn free_port() -> u16 {
    let below: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let low = 10_000u16.min(below.saturating_sub(1000));
    for _ in 0..1000 {
        let port = rand::random_range(low..below);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {low} and {below}")
}

/// A running controller process.
pub struct ControllerProcess {
    /// Port of the agent API.
    pub agent_port: u16,
    /// Port of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_port: u16,
    program: Vec<OsString>,
    args: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl ControllerProcess {
    /// Starts a controller for `namespace` using the emulator at `compute`.
    pub fn start(kubeconfig: PathBuf, namespace: &str, compute: &str, extra: &[&str]) -> Self {
        let program = vec![OsString::from(env!("CARGO_BIN_EXE_testrun-controller"))];
        Self::start_program(program, kubeconfig, namespace, compute, extra)
    }

    /// Starts a controller with `program` (a command and its first
    /// arguments, e.g. a `chroot` into an image) in place of this build's
    /// executable.
    pub fn start_program(
        program: Vec<OsString>,
        kubeconfig: PathBuf,
        namespace: &str,
        compute: &str,
        extra: &[&str],
    ) -> Self {
        let agent_port = free_port();
        let metrics_port = free_port();
        let mut args: Vec<String> =
            ["run", "--compute-endpoint", compute, "--watch-namespace", namespace, "--namespace", namespace]
                .iter()
                .map(|s| s.to_string())
                .collect();
        // Each test's own installation unless it names one.
        if !extra.contains(&"--installation-id") {
            args.extend(["--installation-id".to_string(), namespace.to_string()]);
        }
        args.push("--metrics-listen".into());
        args.push(format!("127.0.0.1:{metrics_port}"));
        args.push("--agent-listen".into());
        args.push(format!("127.0.0.1:{agent_port}"));
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = std::env::temp_dir().join(format!("controller-{namespace}-{agent_port}.log"));
        let mut me = Self { agent_port, metrics_port, program, args, kubeconfig, log, child: None };
        me.restart();
        me
    }

    /// Starts the process (again), with the same settings and port.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("controller log");
        let child = Command::new(&self.program[0])
            .args(&self.program[1..])
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            // The address written to an agent EndpointSlice is the listener's.
            .env_remove("POD_IP")
            .env_remove("NODE_NAME")
            .env_remove("POD_NAME")
            .env("RUST_LOG", std::env::var("TESTRUN_TEST_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting the controller");
        self.child = Some(child);
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM, as a rollout would, and waits for it
    /// to exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// The HTTP status and body of `/readyz`, or None while nothing listens.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        let response = reqwest::get(&url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.unwrap_or_default()))
    }

    /// The exit code once the process ended on its own.
    pub fn exit_code(&mut self) -> Option<Option<i32>> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).map(|status| status.code())
    }

    /// The controller's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The controller's metrics as text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            match reqwest::get(&url).await {
                Ok(response) => return response.text().await.expect("metrics text"),
                Err(e) => assert!(std::time::Instant::now() < deadline, "metrics endpoint unreachable: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The agent API's base URL.
    pub fn agent_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.agent_port)
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..50 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
