//! What the agent and the agent API say to each other: JSON bodies over
//! HTTP, and the metadata keys a VM finds its settings under.

use serde::{Deserialize, Serialize};

use crate::api::validation::json_char_len;

/// `POST`: a VM asks for its assignment.
pub const REGISTER_PATH: &str = "/agent/v1/register";
/// `POST`: the agent says its lease is alive.
pub const HEARTBEAT_PATH: &str = "/agent/v1/heartbeat";
/// `POST`: the agent reports its command's result.
pub const RESULT_PATH: &str = "/agent/v1/result";
/// `POST` (a lease claim): the agent says Compute Engine is reclaiming its
/// Spot VM (the metadata server's `instance/preempted` is `TRUE`).
pub const PREEMPTED_PATH: &str = "/agent/v1/preempted";
/// `POST`: a pool VM says it is ready.
pub const POOL_REGISTER_PATH: &str = "/agent/v1/pool/register";
/// `POST`: a pool VM waits (long poll) for an assignment.
pub const POOL_WAIT_PATH: &str = "/agent/v1/pool/wait";
/// Request header with the build (sha256) an agent started as; the agent
/// API refuses registration of another build than its own with 426, so a
/// VM that kept an older build fetches the current one.
pub const BUILD_HEADER: &str = "testrun-agent-build";
/// Environment variable the startup script gives the agent its build in.
pub const BUILD_ENV: &str = "TESTRUN_AGENT_BUILD";
/// Environment variable with the pid of the startup script that started
/// the agent: the agent ends with it.
pub const PARENT_ENV: &str = "TESTRUN_AGENT_PARENT";
/// The agent's exit code when it was refused as another build: the startup
/// script then fetches the controller's.
pub const STALE_BUILD_EXIT: u8 = 3;
/// Largest request body the agent API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest output tail kept from a command.
pub const OUTPUT_TAIL_BYTES: usize = 4096;
/// Bytes all of a run's output tails may take in its status, as JSON (with
/// escapes): with many shards each keeps less, so the object stays far
/// below etcd's limit of 1.5 MiB.
pub const OUTPUT_TAILS_BUDGET: usize = 128 * 1024;

/// The bytes of output tail, as JSON, one shard of a run of `shards` keeps.
pub fn tail_budget(shards: usize) -> usize {
    OUTPUT_TAIL_BYTES.min(OUTPUT_TAILS_BUDGET / shards.max(1))
}

/// The longest end of `text` that takes at most `budget` bytes written as a
/// JSON string (quotes aside): a control character takes up to six.
pub fn json_tail(text: &str, budget: usize) -> &str {
    let mut used = 0;
    let mut start = text.len();
    for (at, c) in text.char_indices().rev() {
        let cost = json_char_len(c);
        if used + cost > budget {
            break;
        }
        used += cost;
        start = at;
    }
    &text[start..]
}

/// Metadata key: the agent API's URL.
pub const META_AGENT_URL: &str = "testrun-agent-url";
/// Metadata key: the VM's token.
pub const META_VM_TOKEN: &str = "testrun-vm-token";
/// Metadata key: the TestRun's namespace.
pub const META_NAMESPACE: &str = "testrun-namespace";
/// Metadata key: the TestRun's name.
pub const META_NAME: &str = "testrun-name";
/// Metadata key: the TestRun's uid.
pub const META_OWNER_UID: &str = "testrun-owner-uid";
/// Metadata key: the PrebuildPreset's name (pool VMs only).
pub const META_PRESET: &str = "testrun-preset";
/// Metadata key: the template version a pool VM was built from.
pub const META_TEMPLATE_VERSION: &str = "testrun-template-version";
/// Metadata key: the shard index.
pub const META_SHARD: &str = "testrun-shard";
/// Metadata key: the attempt number.
pub const META_ATTEMPT: &str = "testrun-attempt";

/// A VM asking for its assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    /// TestRun namespace.
    pub namespace: String,
    /// TestRun name.
    pub testrun: String,
    /// TestRun uid.
    pub owner_uid: String,
    /// Shard index.
    pub shard: i32,
    /// Attempt number.
    pub attempt: i32,
    /// The VM's instance name.
    pub instance: String,
    /// The VM's token from its metadata.
    pub vm_token: String,
}

/// A pool VM announcing itself, or waiting for work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolHello {
    /// PrebuildPreset namespace.
    pub namespace: String,
    /// PrebuildPreset name.
    pub preset: String,
    /// PrebuildPreset uid.
    pub owner_uid: String,
    /// The VM's instance name.
    pub instance: String,
    /// The VM's token from its metadata.
    pub vm_token: String,
}

/// One environment variable of the command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// What a VM is to run, with the lease it reports under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// TestRun namespace.
    #[serde(default)]
    pub namespace: String,
    /// TestRun name.
    #[serde(default)]
    pub testrun: String,
    /// Shard index.
    pub shard: i32,
    /// Number of shards.
    pub shards: i32,
    /// Attempt number.
    pub attempt: i32,
    /// The lease id.
    pub lease_id: i64,
    /// The lease token.
    pub lease_token: String,
    /// argv of the command.
    pub command: Vec<String>,
    /// Its environment.
    pub env: Vec<EnvVar>,
    /// Its working directory, if any.
    pub working_dir: Option<String>,
    /// Seconds the attempt may run in all (counted from registration).
    pub timeout_seconds: u64,
    /// Seconds between heartbeats.
    pub heartbeat_interval_seconds: u64,
}

/// Which lease a heartbeat or result is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseClaim {
    /// TestRun namespace.
    pub namespace: String,
    /// TestRun name.
    pub testrun: String,
    /// Shard index.
    pub shard: i32,
    /// Attempt number.
    pub attempt: i32,
    /// Lease id.
    pub lease_id: i64,
    /// Lease token.
    pub lease_token: String,
}

/// The result of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResultReport {
    /// The lease reporting.
    pub lease: LeaseClaim,
    /// Exit code (128 + signal when killed by a signal).
    pub exit_code: i32,
    /// Wall time in milliseconds.
    pub duration_ms: i64,
    /// The last lines of output, at most [`OUTPUT_TAIL_BYTES`].
    pub output_tail: String,
}

/// The answer to a result report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultAck {
    /// True once the result is stored in the TestRun's status; until then
    /// the agent sends the same report again.
    pub acknowledged: bool,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A CamelCase word: `Malformed`, `Forbidden`, `StaleLease`, `TimedOut`,
    /// `NotFound`, `NotReady`, `Finished`, `Conflict`.
    pub reason: String,
    /// A sentence.
    pub message: String,
}

/// Keeps the last `limit` bytes of text, cut at a character boundary.
pub fn tail(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_json_tail_fits_its_budget_as_json(text in "(?s).{0,300}", budget in 0usize..200) {
            let kept = json_tail(&text, budget);
            prop_assert!(text.ends_with(kept));
            // Counted as kube-apiserver writes it, which never takes fewer
            // bytes than the plainest JSON encoding.
            let written = crate::api::validation::json_len(kept);
            prop_assert!(written <= budget, "{} > {}", written, budget);
            prop_assert!(serde_json::to_string(kept).expect("json").len() - 2 <= written);
            // Nothing more would have fitted.
            if kept.len() < text.len() {
                let longer = &text[text[..text.len() - kept.len()].char_indices().last().map_or(0, |(i, _)| i)..];
                prop_assert!(crate::api::validation::json_len(longer) > budget);
            }
        }
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("hello", 10), "hello");
        assert_eq!(tail("hello", 3), "llo");
        let s = "aé€"; // 1 + 2 + 3 bytes
        assert_eq!(tail(s, 4), "€");
        assert_eq!(tail(s, 5), "é€");
        assert!(tail(&"x".repeat(10_000), OUTPUT_TAIL_BYTES).len() == OUTPUT_TAIL_BYTES);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let body = r#"{"namespace":"a","testrun":"b","shard":0,"attempt":1,"leaseId":1,"leaseToken":"t","extra":1}"#;
        assert!(serde_json::from_str::<LeaseClaim>(body).is_err());
    }
}
