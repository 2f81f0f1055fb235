//! The agent on a VM (`testrun-controller agent`): reads its settings from
//! the metadata server, registers, runs the command while heartbeating, and
//! reports the result until the controller acknowledges it. A heartbeat
//! refused with 409 (the lease is lost or timed out) kills the command.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use reqwest::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

use super::protocol::{
    Assignment, BUILD_ENV, BUILD_HEADER, HEARTBEAT_PATH, LeaseClaim, META_AGENT_URL, META_ATTEMPT, META_NAME,
    META_NAMESPACE, META_OWNER_UID, META_PRESET, META_SHARD, META_VM_TOKEN, OUTPUT_TAIL_BYTES, PARENT_ENV,
    POOL_REGISTER_PATH, POOL_WAIT_PATH, PREEMPTED_PATH, PoolHello, REGISTER_PATH, RESULT_PATH, RegisterRequest,
    ResultAck, ResultReport,
};

/// Why the agent stopped without a reported result.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The metadata server did not give a setting.
    #[error("reading metadata {key}: {message}")]
    Metadata {
        /// The key.
        key: String,
        /// What went wrong.
        message: String,
    },
    /// The agent API refused the VM for good.
    #[error("the agent API refused registration ({status}): {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its body.
        body: String,
    },
    /// The command could not be started.
    #[error("starting the command {command:?}: {source}")]
    Spawn {
        /// argv.
        command: Vec<String>,
        /// Why.
        source: std::io::Error,
    },
    /// The lease was lost or timed out while the command ran; it was killed.
    #[error("the lease was lost ({0}); the command was stopped")]
    LeaseLost(String),
    /// Compute Engine is reclaiming the Spot VM; the controller was told
    /// and the command was stopped.
    #[error("the Spot VM is being preempted; the command was stopped")]
    Preempted,
    /// The result could not be delivered in time.
    #[error("the result was not acknowledged: {0}")]
    Undelivered(String),
    /// The agent API serves another build: this one must not run.
    #[error("the agent API serves another build: {0}")]
    StaleBuild(String),
}

/// Where the agent finds its metadata server.
pub fn metadata_host() -> String {
    std::env::var("GCE_METADATA_HOST").unwrap_or_else(|_| "metadata.google.internal".to_string())
}

/// Waits between retries that double from `first` up to `max`.
struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Self { first, next: first, max }
    }

    /// Sleeps for the current wait, then doubles it.
    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// The next wait is `first` again.
    fn reset(&mut self) {
        self.next = self.first;
    }

    /// The next wait is between `low` and `high`.
    fn between(&mut self, low: Duration, high: Duration) {
        self.next = self.next.clamp(low, high);
    }
}

/// The error for a 4xx answer that retrying cannot fix.
async fn refused(response: reqwest::Response) -> AgentError {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status == StatusCode::UPGRADE_REQUIRED {
        return AgentError::StaleBuild(body);
    }
    AgentError::Refused { status: status.as_u16(), body }
}

struct Metadata {
    http: reqwest::Client,
    base: String,
}

impl Metadata {
    async fn get(&self, path: &str) -> Result<String, AgentError> {
        let fail = |message: String| AgentError::Metadata { key: path.to_string(), message };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..20 {
            let response =
                self.http.get(format!("{}/{path}", self.base)).header("Metadata-Flavor", "Google").send().await;
            match response {
                Ok(r) if r.status().is_success() => return r.text().await.map_err(|e| fail(e.to_string())),
                Ok(r) if r.status() == StatusCode::NOT_FOUND => return Err(fail("not set".into())),
                Ok(r) => tracing::warn!(status = %r.status(), key = path, "metadata server answered with an error"),
                Err(e) => tracing::warn!(error = %e, key = path, "metadata server unreachable"),
            }
            backoff.wait().await;
        }
        Err(fail("the metadata server did not answer".into()))
    }

    /// Whether Compute Engine is reclaiming this Spot VM: `instance/preempted`,
    /// asked up to three times (a VM shutting down answers slowly); no
    /// answer says no.
    async fn preempted(&self) -> bool {
        for _ in 0..3 {
            let response = self
                .http
                .get(format!("{}/instance/preempted", self.base))
                .header("Metadata-Flavor", "Google")
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            match response {
                Ok(r) if r.status().is_success() => {
                    if let Ok(text) = r.text().await {
                        return text.trim() == "TRUE";
                    }
                }
                // Not served (no such key): not a Spot VM's metadata server.
                Ok(r) if r.status() == StatusCode::NOT_FOUND => return false,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Every custom attribute of the VM, in one request.
    async fn attributes(&self) -> Result<Attributes, AgentError> {
        let text = self.get("instance/attributes/?recursive=true").await?;
        serde_json::from_str(&text).map(Attributes).map_err(|e| AgentError::Metadata {
            key: "instance/attributes/".into(),
            message: format!("not a JSON object of strings: {e}"),
        })
    }
}

/// The VM's custom metadata attributes.
struct Attributes(std::collections::HashMap<String, String>);

impl Attributes {
    fn get(&self, key: &str) -> Result<String, AgentError> {
        self.0.get(key).cloned().ok_or_else(|| AgentError::Metadata {
            key: format!("instance/attributes/{key}"),
            message: "not set".into(),
        })
    }
}

/// An HTTP client with the agent's request timeout.
fn http_client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, AgentError> {
    builder
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| AgentError::Metadata { key: "-".into(), message: format!("building the HTTP client: {e}") })
}

/// Runs the agent to the end. Returns the command's exit code once the
/// controller acknowledged it.
pub async fn run() -> Result<i32, AgentError> {
    // The metadata server speaks plain HTTP on the VM itself: no proxy, and
    // no TLS roots (loading the system's roots costs more CPU than
    // everything else the agent does before its command starts).
    let plain = http_client(reqwest::Client::builder().no_proxy().tls_certs_only([]))?;
    let metadata = Metadata { http: plain, base: format!("http://{}/computeMetadata/v1", metadata_host()) };
    let number = |key: &'static str, text: String| {
        text.trim()
            .parse::<i32>()
            .map_err(|_| AgentError::Metadata { key: key.into(), message: format!("{text:?} is not a number") })
    };
    let attributes = metadata.attributes().await?;
    let url = attributes.get(META_AGENT_URL)?.trim_end_matches('/').to_string();
    // No idle connections: between a VM's few requests (register,
    // heartbeats, result) the controller holds nothing for it. TLS roots
    // only for an agent API behind HTTPS.
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(0);
    // The build the startup script checked and started: the agent API
    // refuses another than its own, and the script then fetches that.
    if let Some(build) = std::env::var(BUILD_ENV).ok().filter(|b| !b.is_empty()) {
        match reqwest::header::HeaderValue::from_str(&build) {
            Ok(value) => {
                let name = reqwest::header::HeaderName::from_static(BUILD_HEADER);
                builder = builder.default_headers([(name, value)].into_iter().collect());
            }
            Err(_) => tracing::warn!(build = %build, "{BUILD_ENV} is not a header value; the build is not checked"),
        }
    }
    let http = http_client(if url.starts_with("https://") { builder } else { builder.tls_certs_only([]) })?;
    let instance = metadata.get("instance/name").await?;
    if let Ok(preset) = attributes.get(META_PRESET) {
        let hello = PoolHello {
            namespace: attributes.get(META_NAMESPACE)?,
            preset,
            owner_uid: attributes.get(META_OWNER_UID)?,
            instance,
            vm_token: attributes.get(META_VM_TOKEN)?,
        };
        return wait_in_pool(&http, &url, &hello, &metadata).await;
    }
    let request = RegisterRequest {
        namespace: attributes.get(META_NAMESPACE)?,
        testrun: attributes.get(META_NAME)?,
        owner_uid: attributes.get(META_OWNER_UID)?,
        shard: number(META_SHARD, attributes.get(META_SHARD)?)?,
        attempt: number(META_ATTEMPT, attributes.get(META_ATTEMPT)?)?,
        instance,
        vm_token: attributes.get(META_VM_TOKEN)?,
    };
    let mut assignment = register(&http, &url, &request).await?;
    if assignment.namespace.is_empty() {
        assignment.namespace = request.namespace.clone();
        assignment.testrun = request.testrun.clone();
    }
    work(&http, &url, &assignment, &metadata).await
}

/// Runs an assignment and reports its result until acknowledged.
async fn work(
    http: &reqwest::Client,
    url: &str,
    assignment: &Assignment,
    metadata: &Metadata,
) -> Result<i32, AgentError> {
    tracing::info!(
        shard = assignment.shard,
        attempt = assignment.attempt,
        lease = assignment.lease_id,
        "assignment received"
    );
    let claim = LeaseClaim {
        namespace: assignment.namespace.clone(),
        testrun: assignment.testrun.clone(),
        shard: assignment.shard,
        attempt: assignment.attempt,
        lease_id: assignment.lease_id,
        lease_token: assignment.lease_token.clone(),
    };
    let outcome = execute(http, url, assignment, &claim, metadata).await?;
    // A command that failed as its VM was being reclaimed failed because of it.
    if outcome.0 != 0 && metadata.preempted().await {
        tell_preempted(http, url, &claim).await;
        return Err(AgentError::Preempted);
    }
    report(
        http,
        url,
        ResultReport { lease: claim, exit_code: outcome.0, duration_ms: outcome.1, output_tail: outcome.2 },
    )
    .await?;
    Ok(outcome.0)
}

/// A pool VM: says it is ready, then waits for work, asking again each time
/// the agent API answers that there is none yet.
async fn wait_in_pool(
    http: &reqwest::Client,
    url: &str,
    hello: &PoolHello,
    metadata: &Metadata,
) -> Result<i32, AgentError> {
    let mut path = POOL_REGISTER_PATH;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match http.post(format!("{url}{path}")).timeout(Duration::from_secs(60)).json(hello).send().await {
            Ok(r) if r.status() == StatusCode::OK && path == POOL_WAIT_PATH => match r.json::<Assignment>().await {
                // Claimed by a TestRun: run its shard like any agent.
                Ok(assignment) => return work(http, url, &assignment, metadata).await,
                Err(e) => tracing::warn!(error = %e, "unreadable assignment; waiting again"),
            },
            Ok(r) if r.status().is_success() => {
                if path == POOL_REGISTER_PATH {
                    tracing::info!("registered with the pool; waiting for work");
                }
                path = POOL_WAIT_PATH;
                backoff.reset();
                continue;
            }
            Ok(r) if r.status().is_server_error() => {
                tracing::info!(status = %r.status(), "agent API not ready; retrying")
            }
            Ok(r) => return Err(refused(r).await),
            Err(e) => tracing::warn!(error = %e, "agent API unreachable; retrying"),
        }
        backoff.wait().await;
    }
}

async fn register(http: &reqwest::Client, url: &str, request: &RegisterRequest) -> Result<Assignment, AgentError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match http.post(format!("{url}{REGISTER_PATH}")).json(request).send().await {
            Ok(r) if r.status().is_success() => match r.json::<Assignment>().await {
                Ok(assignment) => return Ok(assignment),
                Err(e) => tracing::warn!(error = %e, "unreadable assignment; retrying"),
            },
            Ok(r) if r.status().is_server_error() => {
                tracing::info!(status = %r.status(), "agent API not ready; retrying");
            }
            Ok(r) => return Err(refused(r).await),
            Err(e) => tracing::warn!(error = %e, "agent API unreachable; retrying"),
        }
        backoff.wait().await;
    }
}

/// Output kept from the command: its last bytes.
#[derive(Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend(bytes);
        let excess = self.0.len().saturating_sub(OUTPUT_TAIL_BYTES);
        self.0.drain(..excess);
    }

    fn text(&self) -> String {
        let bytes: Vec<u8> = self.0.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        super::protocol::tail(&text, OUTPUT_TAIL_BYTES).to_string()
    }
}

async fn pump(mut from: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = [0u8; 8192];
    let mut stdout = tokio::io::stdout();
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let _ = stdout.write_all(&buf[..n]).await;
        tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(&buf[..n]);
    }
}

/// Runs the command with heartbeats; returns (exit code, duration ms, output tail).
async fn execute(
    http: &reqwest::Client,
    url: &str,
    assignment: &Assignment,
    claim: &LeaseClaim,
    metadata: &Metadata,
) -> Result<(i32, i64, String), AgentError> {
    let Some((program, args)) = assignment.command.split_first() else {
        return Err(AgentError::Spawn { command: Vec::new(), source: std::io::Error::other("empty command") });
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // The agent's own settings are not the test's.
        .env_remove(BUILD_ENV)
        .env_remove(PARENT_ENV)
        .env("TESTRUN_SHARD", assignment.shard.to_string())
        .env("TESTRUN_SHARDS", assignment.shards.to_string())
        .env("TESTRUN_ATTEMPT", assignment.attempt.to_string());
    for var in &assignment.env {
        command.env(&var.name, &var.value);
    }
    if let Some(dir) = &assignment.working_dir {
        command.current_dir(dir);
    }
    // SAFETY: runs between fork and exec and makes only the async-signal-safe
    // prctl(2) call: the command dies with the agent.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child =
        command.spawn().map_err(|source| AgentError::Spawn { command: assignment.command.clone(), source })?;
    let group = child.id().and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw);
    let tail = Arc::new(Mutex::new(Tail::default()));
    let pumps = [
        child.stdout.take().map(|o| tokio::spawn(pump(o, tail.clone()))),
        child.stderr.take().map(|e| tokio::spawn(pump(e, tail.clone()))),
    ];

    let interval = Duration::from_secs(assignment.heartbeat_interval_seconds.max(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async move {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(terminated);
    /// Why the command is stopped before it ends.
    enum Stop {
        Preempted,
        LeaseLost(String),
    }
    let ended = loop {
        tokio::select! {
            status = child.wait() => break Ok(status),
            // The VM is shutting down: a preemption's soft off, or another.
            () = &mut terminated => {
                break Err(if metadata.preempted().await {
                    Stop::Preempted
                } else {
                    Stop::LeaseLost("the VM is shutting down".into())
                });
            }
            _ = ticker.tick() => {
                if metadata.preempted().await {
                    break Err(Stop::Preempted);
                }
                if let Some(reason) = heartbeat(http, url, claim).await {
                    break Err(Stop::LeaseLost(reason));
                }
            }
        }
    };
    let status = match ended {
        Ok(status) => status,
        Err(stop) => {
            // Take the command's whole group along, then say why (a
            // preemption within its 30 s notice).
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            return Err(match stop {
                Stop::Preempted => {
                    tell_preempted(http, url, claim).await;
                    AgentError::Preempted
                }
                Stop::LeaseLost(reason) => AgentError::LeaseLost(reason),
            });
        }
    };
    for pump in pumps.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
    }
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt as _;
            128 + s.signal().unwrap_or(0)
        }),
        Err(e) => {
            tracing::warn!(error = %e, "waiting for the command");
            255
        }
    };
    let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    let text = tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner).text();
    Ok((code, duration_ms, text))
}

/// Sends one heartbeat; returns why the lease is over, if it is.
async fn heartbeat(http: &reqwest::Client, url: &str, claim: &LeaseClaim) -> Option<String> {
    match http.post(format!("{url}{HEARTBEAT_PATH}")).json(claim).send().await {
        Ok(r)
            if r.status() == StatusCode::CONFLICT
                || r.status() == StatusCode::FORBIDDEN
                || r.status() == StatusCode::GONE =>
        {
            Some(r.text().await.unwrap_or_else(|_| "refused".into()))
        }
        Ok(r) if !r.status().is_success() => {
            tracing::warn!(status = %r.status(), "heartbeat refused; will retry");
            None
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat not delivered; will retry");
            None
        }
    }
}

/// Tells the controller the VM is being preempted, again every second
/// until it answers that the attempt is over (409: it stored the
/// preemption and moved on) or 20 s of the 30 s notice are gone: a
/// controller that restarts meanwhile hears it too.
async fn tell_preempted(http: &reqwest::Client, url: &str, claim: &LeaseClaim) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut told = false;
    while Instant::now() < deadline {
        match http.post(format!("{url}{PREEMPTED_PATH}")).timeout(Duration::from_secs(5)).json(claim).send().await {
            Ok(r) if r.status().is_success() => {
                if !told {
                    tracing::info!("told the controller the Spot VM is being preempted");
                    told = true;
                }
            }
            Ok(r) if r.status() == StatusCode::CONFLICT || r.status() == StatusCode::GONE => return,
            Ok(r) if r.status().is_client_error() && r.status() != StatusCode::TOO_MANY_REQUESTS => {
                tracing::warn!(status = %r.status(), "the preemption report was refused");
                return;
            }
            Ok(r) => tracing::warn!(status = %r.status(), "preemption report not taken; retrying"),
            Err(e) => tracing::warn!(error = %e, "agent API unreachable; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Sends the result until the controller acknowledges that it is stored.
/// The same report is sent each time, so it can be counted only once.
async fn report(http: &reqwest::Client, url: &str, report: ResultReport) -> Result<(), AgentError> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while Instant::now() < deadline {
        match http.post(format!("{url}{RESULT_PATH}")).json(&report).send().await {
            Ok(r) if r.status().is_success() => match r.json::<ResultAck>().await {
                Ok(ResultAck { acknowledged: true }) => return Ok(()),
                // Received, not yet stored: the controller stores it and
                // deletes this VM without further word; asking again (every
                // 1 to 5 s) only covers a controller restart meanwhile.
                Ok(_) => backoff.between(Duration::from_secs(1), Duration::from_secs(5)),
                Err(e) => tracing::warn!(error = %e, "unreadable acknowledgement"),
            },
            Ok(r) if r.status().is_client_error() && r.status() != StatusCode::TOO_MANY_REQUESTS => {
                let status = r.status();
                return Err(AgentError::Undelivered(format!("{status}: {}", r.text().await.unwrap_or_default())));
            }
            Ok(r) => tracing::warn!(status = %r.status(), "result not taken; retrying"),
            Err(e) => tracing::warn!(error = %e, "agent API unreachable; retrying"),
        }
        backoff.wait().await;
    }
    Err(AgentError::Undelivered("no acknowledgement within an hour".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut tail = Tail::default();
        tail.push(&vec![b'a'; 5000]);
        tail.push(b"end");
        let text = tail.text();
        assert_eq!(text.len(), OUTPUT_TAIL_BYTES);
        assert!(text.ends_with("aend"));
    }
}
