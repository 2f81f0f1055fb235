//! A VM's "boot": its `startup-script` runs as a local process in a process
//! group of its own, with `GCE_METADATA_HOST` pointing at a metadata server
//! for that VM alone. Deleting or expiring the VM kills the whole group.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::task::JoinHandle;

use super::Emulator;
use super::state::InstanceKey;

/// How long a VM's processes get between SIGTERM and SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running VM's local process.
#[derive(Debug)]
pub struct VmProcess {
    /// Process id of the startup script, which is also its process group id.
    pub pid: i32,
    /// Address of this VM's metadata server.
    pub metadata_host: String,
    /// The folder holding the script and the console log.
    pub dir: PathBuf,
    metadata_server: JoinHandle<()>,
}

/// Why a VM could not boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The metadata server could not listen.
    #[error("starting the metadata server: {0}")]
    Metadata(#[source] std::io::Error),
    /// The VM folder or script could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// What was written.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The script could not be started.
    #[error("starting the startup script: {0}")]
    Spawn(#[source] std::io::Error),
}

/// What a booting VM needs to know about itself.
pub struct BootInfo {
    /// Which VM.
    pub key: InstanceKey,
    /// Its numeric id.
    pub id: u64,
    /// The startup script.
    pub script: String,
    /// Its metadata items.
    pub metadata: Vec<(String, String)>,
}

/// Starts a VM's metadata server and startup script.
pub async fn boot(emulator: &Arc<Emulator>, info: BootInfo) -> Result<VmProcess, BootError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(BootError::Metadata)?;
    let metadata_host = listener.local_addr().map_err(BootError::Metadata)?.to_string();
    let router = super::metadata::router(emulator.clone(), info.key.clone(), info.id);
    let metadata_server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!(error = %e, "metadata server stopped");
        }
    });

    let dir = emulator.config.work_dir.join("vms").join(&info.key.zone).join(format!("{}-{}", info.key.name, info.id));
    let agent_dir = emulator.config.work_dir.join("agent");
    let started = start_script(&dir, &agent_dir, &info, &metadata_host, emulator.config.vm_nice);
    let pid = match started {
        Ok(pid) => pid,
        Err(e) => {
            metadata_server.abort();
            return Err(e);
        }
    };
    Ok(VmProcess { pid, metadata_host, dir, metadata_server })
}

/// Starts the script in `dir`. `agent_dir` is the emulator's one folder for
/// fetched agents (`TESTRUN_AGENT_DIR`): every VM asks the agent API for the
/// agent, and the first of each build downloads it, the others get 304, as a
/// VM would that kept the build on its disk. (A debug build of the agent is
/// about 90 MiB; a copy per emulated VM would cost a disk write per boot.)
fn start_script(
    dir: &Path,
    agent_dir: &Path,
    info: &BootInfo,
    metadata_host: &str,
    nice: u8,
) -> Result<i32, BootError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BootError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let script_path = dir.join("startup-script");
    std::fs::write(&script_path, &info.script).map_err(write_err(&script_path))?;
    let log_path = dir.join("console.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(write_err(&log_path))?;
    let log_err = log.try_clone().map_err(write_err(&log_path))?;

    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg(&script_path)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .env_remove(crate::agent::protocol::BUILD_ENV)
        .env_remove(crate::agent::protocol::PARENT_ENV)
        .env("GCE_METADATA_HOST", metadata_host)
        .env("TESTRUN_AGENT_DIR", agent_dir)
        .env("GCE_INSTANCE_NAME", &info.key.name)
        .env("GCE_INSTANCE_ZONE", &info.key.zone)
        .env("GCE_PROJECT", &info.key.project);
    for (key, value) in &info.metadata {
        let var: String =
            key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        command.env(format!("GCE_METADATA_ATTR_{var}"), value);
    }
    let nice = libc::c_int::from(nice.min(19));
    // SAFETY: the closure runs between fork and exec and only makes the
    // async-signal-safe prctl(2) and setpriority(2) calls: the script dies
    // with the emulator, at the niceness asked for.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nice > 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(BootError::Spawn)?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let name = info.key.name.clone();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => {
                tracing::debug!(instance = %name, code = ?status.code(), signal = ?status.signal(), "startup script exited")
            }
            Err(e) => tracing::warn!(instance = %name, error = %e, "waiting for the startup script"),
        }
    });
    Ok(pid)
}

impl VmProcess {
    /// Stops the VM: SIGTERM to its process group, SIGKILL after the grace
    /// period, and its metadata server goes away.
    pub fn shut_down(self) {
        self.metadata_server.abort();
        let group = Pid::from_raw(self.pid);
        if self.pid <= 0 || killpg(group, Signal::SIGTERM).is_err() {
            return;
        }
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
            while tokio::time::Instant::now() < deadline {
                if !group_alive(group) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = killpg(group, Signal::SIGKILL);
        });
    }

    /// The ACPI soft off of a preemption notice: SIGTERM to its process
    /// group, while its metadata server keeps answering (the hard stop
    /// follows with [`Self::shut_down`]).
    pub fn soft_off(&self) {
        if self.pid > 0 {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        }
    }

    /// Stops the VM at once (emulator shutdown).
    pub fn kill_now(self) {
        self.metadata_server.abort();
        if self.pid > 0 {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

/// Whether any process of the group still exists.
pub fn group_alive(group: Pid) -> bool {
    killpg(group, None).is_ok()
}
