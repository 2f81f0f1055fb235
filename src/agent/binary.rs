//! The agent's delivery: the agent API serves the controller's own
//! executable at [`BINARY_PATH`], so a VM's startup script fetches the agent
//! from the controller that made the VM, and the agent is always the
//! controller's own build (no version skew, nothing to install in images).
//!
//! The answer carries the executable's sha256 in [`SHA256_HEADER`] and as
//! its `ETag`; a request with `If-None-Match` naming that build gets 304, so
//! a VM that kept the build (a reboot, or emulated VMs sharing a folder)
//! downloads nothing.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest as _, Sha256};

use crate::metrics::{Metrics, ResultLabels};

/// `GET`: the agent executable.
pub const BINARY_PATH: &str = "/agent/v1/binary";
/// Response header with the lowercase hex sha256 of the executable.
pub const SHA256_HEADER: &str = "testrun-agent-sha256";
/// Response header with the executable's size in bytes (also on 304, so a
/// kept copy that was cut short is noticed).
pub const SIZE_HEADER: &str = "testrun-agent-size";
/// Response header with the executable's CPU architecture, as `uname -m`
/// names it (`x86_64`, `aarch64`).
pub const ARCH_HEADER: &str = "testrun-agent-arch";

/// Why the executable could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the agent executable {path}: {source}")]
pub struct BinaryError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// The executable the agent API hands out, with its checksum.
#[derive(Clone, Debug)]
pub struct AgentBinary {
    /// Where it is read from on every request.
    pub path: PathBuf,
    /// Lowercase hex sha256 of its content.
    pub sha256: String,
    /// Its size in bytes.
    pub len: u64,
}

impl AgentBinary {
    /// The running executable. `/proc/self/exe` names it even after its file
    /// was replaced or deleted (an upgrade in place); where `/proc` is not
    /// mounted, `argv[0]` when it is an absolute path (an image's
    /// entrypoint).
    pub fn this_process() -> Result<Self, BinaryError> {
        let proc_exe = PathBuf::from("/proc/self/exe");
        if proc_exe.exists() {
            return Self::read(proc_exe);
        }
        match std::env::args_os().next().map(PathBuf::from) {
            Some(argv0) if argv0.is_absolute() => Self::read(argv0),
            _ => Self::read(proc_exe),
        }
    }

    /// Hashes the file at `path`.
    pub fn read(path: PathBuf) -> Result<Self, BinaryError> {
        let fail = |source| BinaryError { path: path.clone(), source };
        let mut file = std::fs::File::open(&path).map_err(fail)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let read = file.read(&mut buf).map_err(fail)?;
            if read == 0 {
                break;
            }
            hasher.update(&buf[..read]);
            len += read as u64;
        }
        let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { path, sha256, len })
    }

    fn etag(&self) -> String {
        format!("\"{}\"", self.sha256)
    }

    /// Whether an `If-None-Match` value names this build (or is `*`).
    fn matches(&self, if_none_match: &str) -> bool {
        let etag = self.etag();
        if_none_match.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
    }
}

struct Served {
    binary: AgentBinary,
    metrics: Arc<Metrics>,
}

impl Served {
    /// Counts one answer: `full` (the executable), `not_modified` (304) or
    /// `failed` (the executable could not be read).
    fn count(&self, result: &str) {
        self.metrics.agent_binary_requests.get_or_create(&ResultLabels { result: result.to_string() }).inc();
    }
}

/// The route serving `binary` at [`BINARY_PATH`].
pub fn router(binary: AgentBinary, metrics: Arc<Metrics>) -> Router {
    Router::new().route(BINARY_PATH, get(serve)).with_state(Arc::new(Served { binary, metrics }))
}

async fn serve(State(served): State<Arc<Served>>, request: HeaderMap) -> Response {
    let binary = &served.binary;
    let mut headers = HeaderMap::new();
    if let Ok(etag) = HeaderValue::from_str(&binary.etag()) {
        headers.insert(header::ETAG, etag);
    }
    if let Ok(sha) = HeaderValue::from_str(&binary.sha256) {
        headers.insert(SHA256_HEADER, sha);
    }
    headers.insert(SIZE_HEADER, HeaderValue::from(binary.len));
    headers.insert(ARCH_HEADER, HeaderValue::from_static(std::env::consts::ARCH));
    let cached =
        request.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).any(|v| binary.matches(v));
    if cached {
        served.count("not_modified");
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    match open(&binary.path, binary.len).await {
        Ok(body) => {
            served.count("full");
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(binary.len));
            (StatusCode::OK, headers, body).into_response()
        }
        Err(e) => {
            served.count("failed");
            tracing::error!(error = %e, "serving the agent executable");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

/// The file's content as a streamed body, refused when it is no longer the
/// size that was hashed (the file changed under the controller).
async fn open(path: &Path, len: u64) -> Result<Body, BinaryError> {
    let fail = |source| BinaryError { path: path.to_path_buf(), source };
    let file = tokio::fs::File::open(path).await.map_err(fail)?;
    let size = file.metadata().await.map_err(fail)?.len();
    if size != len {
        return Err(fail(std::io::Error::other(format!("it is {size} bytes now, {len} when it was hashed"))));
    }
    Ok(Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary() -> AgentBinary {
        AgentBinary { path: PathBuf::from("/nonexistent"), sha256: "ab12".into(), len: 0 }
    }

    #[test]
    fn if_none_match_names_the_build_in_any_of_its_forms() {
        let b = binary();
        assert!(b.matches("\"ab12\""));
        assert!(b.matches("W/\"ab12\""));
        assert!(b.matches("\"x\", \"ab12\""));
        assert!(b.matches("*"));
        assert!(!b.matches("\"ab1\""));
        assert!(!b.matches("ab12"));
        assert!(!b.matches(""));
    }

    #[test]
    fn the_checksum_is_the_sha256_of_the_content() {
        let path = std::env::temp_dir().join(format!("agent-binary-{}", std::process::id()));
        std::fs::write(&path, b"abc").expect("write");
        let b = AgentBinary::read(path.clone()).expect("read");
        std::fs::remove_file(&path).ok();
        assert_eq!(b.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(b.len, 3);
    }
}
