//! Checks the OpenAPI schema cannot express (the local API server predates
//! CEL rules). The controller runs them on every reconcile and reports what
//! they find in an `InvalidSpec` condition instead of acting on the spec.

use std::collections::BTreeSet;
use std::fmt;

use super::common::VmSpec;
use super::duration::DurationString;
use super::policy::{ExitCodeOperator, FailurePolicy, MAX_EXIT_CODES, MAX_RULES};
use super::prebuild::PrebuildPresetSpec;
use super::testrun::TestRunSpec;

/// Label keys the controller sets on every VM; a spec may not set them.
pub const RESERVED_LABEL_KEYS: &[&str] = &[
    "managed-by",
    "installation",
    "owner-kind",
    "owner-namespace",
    "owner-uid",
    "shard",
    "attempt",
    "template-version",
];
/// Metadata keys the controller sets on every VM, or that would run
/// another script in place of its own (Compute Engine runs
/// `startup-script-url` instead of `startup-script`); a spec may not set
/// them.
pub const RESERVED_METADATA_KEYS: &[&str] = &["startup-script", "startup-script-url"];
/// Metadata key prefix reserved for the controller (agent settings and token).
pub const RESERVED_METADATA_PREFIX: &str = "testrun-";

/// Compute Engine allows at most this many labels on a VM; the controller
/// sets up to seven of its own.
const MAX_USER_LABELS: usize = 64 - RESERVED_LABEL_KEYS.len();
/// Bytes `command`, `env` and `workingDir` may take together, written as
/// JSON (a control character takes six): a started run keeps a copy in its
/// status, which must stay far below etcd's limit.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Bytes `vm.metadata` (keys and values) may take, written as JSON; a
/// started run keeps a copy in its status too.
pub const MAX_METADATA_BYTES: usize = 128 * 1024;

/// Bytes a character takes in a JSON string as kube-apiserver writes it
/// (Go's encoder): a quote, a backslash, `\n`, `\r` and `\t` take two;
/// every other control character, `<`, `>`, `&`, U+2028 and U+2029 take
/// six (`\u0026`: the encoder escapes them for HTML).
pub fn json_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' => 2,
        '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => 6,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Bytes a string takes written as a JSON string, quotes aside: what it
/// costs in etcd.
pub fn json_len(text: &str) -> usize {
    text.chars().map(json_char_len).sum()
}

/// One problem with a spec: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.vm.labels`.
    pub field: String,
    /// What is wrong, in plain words.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All the problems found in one spec, in field order.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<FieldError>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), message: message.into() });
    }

    fn duration(&mut self, field: &str, value: &DurationString) -> Option<std::time::Duration> {
        match value.parse() {
            Ok(d) => Some(d),
            Err(e) => {
                self.add(field, e.to_string());
                None
            }
        }
    }

    fn finish(self) -> Result<(), InvalidSpec> {
        if self.0.is_empty() { Ok(()) } else { Err(InvalidSpec(self.0)) }
    }
}

/// The longest `spec.timeout`: a week (Compute Engine's `maxRunDuration`
/// allows 120 days; a test that runs longer than a week is not a test).
pub const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Checks a TestRun spec beyond its schema.
pub fn validate_testrun(spec: &TestRunSpec) -> Result<(), InvalidSpec> {
    let mut p = Problems::default();
    match (&spec.vm, &spec.preset_ref) {
        (None, None) if spec.rerun_of.is_none() => {
            p.add("spec.vm", "is required unless spec.presetRef or spec.rerunOf is set")
        }
        (None, None) => {}
        (Some(vm), _) => check_vm(&mut p, "spec.vm", vm),
        (None, Some(_)) => {}
    }
    match spec.command.first() {
        None if spec.rerun_of.is_none() => p.add("spec.command", "is required unless spec.rerunOf is set"),
        Some(program) if program.is_empty() => {
            p.add("spec.command", "the first element (the program) must not be empty")
        }
        _ => {}
    }
    let mut seen = BTreeSet::new();
    for (i, var) in spec.env.iter().enumerate() {
        if !seen.insert(var.name.as_str()) {
            p.add(format!("spec.env[{i}].name"), format!("{:?} is set more than once", var.name));
        }
    }
    let command_bytes = spec.command.iter().map(|c| json_len(c)).sum::<usize>()
        + spec.env.iter().map(|e| json_len(&e.name) + json_len(&e.value)).sum::<usize>()
        + spec.working_dir.as_ref().map_or(0, |d| json_len(d));
    if command_bytes > MAX_COMMAND_BYTES {
        p.add(
            "spec.command",
            format!(
                "spec.command, spec.env and spec.workingDir take {command_bytes} bytes together as JSON; at most {MAX_COMMAND_BYTES} are allowed (pass large inputs as files)"
            ),
        );
    }
    if let Some(written) = &spec.timeout
        && let Some(timeout) = p.duration("spec.timeout", written)
        && timeout > MAX_TIMEOUT
    {
        p.add("spec.timeout", format!("{written} is longer than the longest run allowed, 7 days"));
    }
    // A heartbeat timeout longer than the timeout is bounded by it (see
    // TestRunSpec::effective_heartbeat_timeout), never refused: the
    // default (60s) would otherwise refuse every run shorter than a minute.
    p.duration("spec.heartbeatTimeout", &spec.heartbeat_timeout);
    if let Some(policy) = &spec.failure_policy {
        check_failure_policy(&mut p, policy);
    }
    p.finish()
}

/// The rules of a failure policy, checked as the Job API checks a
/// `podFailurePolicy`.
fn check_failure_policy(p: &mut Problems, policy: &FailurePolicy) {
    if policy.rules.len() > MAX_RULES {
        p.add("spec.failurePolicy.rules", format!("at most {MAX_RULES} rules are allowed, got {}", policy.rules.len()));
    }
    for (i, rule) in policy.rules.iter().enumerate() {
        let at = format!("spec.failurePolicy.rules[{i}]");
        match (&rule.on_exit_codes, rule.on_reasons.is_empty()) {
            (None, true) => p.add(&at, "one of onExitCodes and onReasons is required"),
            (Some(_), false) => p.add(&at, "onExitCodes and onReasons are mutually exclusive; set one"),
            _ => {}
        }
        if let Some(codes) = &rule.on_exit_codes {
            let at = format!("{at}.onExitCodes.values");
            if codes.values.is_empty() || codes.values.len() > MAX_EXIT_CODES {
                p.add(&at, format!("between 1 and {MAX_EXIT_CODES} exit codes are required"));
            }
            if let Some(bad) = codes.values.iter().find(|v| !(0..=255).contains(*v)) {
                p.add(&at, format!("{bad} is not an exit code (0 to 255)"));
            }
            if codes.values.windows(2).any(|w| w[0] >= w[1]) {
                p.add(&at, "must be in ascending order, each value once");
            }
            if codes.operator == ExitCodeOperator::In && codes.values.contains(&0) {
                p.add(&at, "0 is a success and cannot be listed with the In operator");
            }
        }
        let mut seen = BTreeSet::new();
        for reason in &rule.on_reasons {
            if !seen.insert(*reason) {
                p.add(format!("{at}.onReasons"), format!("{reason:?} is listed more than once"));
            }
        }
    }
}

/// Checks a PrebuildPreset spec beyond its schema.
pub fn validate_prebuild_preset(spec: &PrebuildPresetSpec) -> Result<(), InvalidSpec> {
    let mut p = Problems::default();
    check_vm(&mut p, "spec.vm", &spec.vm);
    // A base longer than max raises max to it (FailureBackoff::effective),
    // never refused: the default max (5m) would refuse a base of 10m.
    p.duration("spec.failureBackoff.base", &spec.failure_backoff.base);
    p.duration("spec.failureBackoff.max", &spec.failure_backoff.max);
    p.finish()
}

fn check_vm(p: &mut Problems, at: &str, vm: &VmSpec) {
    let mut zones = BTreeSet::new();
    for (i, zone) in vm.zones.iter().enumerate() {
        if !zones.insert(zone.as_str()) {
            p.add(format!("{at}.zones[{i}]"), format!("zone {zone:?} is listed more than once"));
        }
    }
    if vm.labels.len() > MAX_USER_LABELS {
        p.add(format!("{at}.labels"), format!("at most {MAX_USER_LABELS} labels are allowed, got {}", vm.labels.len()));
    }
    for (key, value) in &vm.labels {
        if RESERVED_LABEL_KEYS.contains(&key.as_str()) {
            p.add(format!("{at}.labels"), format!("key {key:?} is set by the controller"));
        } else if !is_label_key(key) {
            p.add(
                format!("{at}.labels"),
                format!(
                    "key {key:?} must start with a lowercase letter and hold only lowercase letters, digits, '_' and '-' (at most 63)"
                ),
            );
        }
        if !is_label_value(value) {
            p.add(
                format!("{at}.labels"),
                format!("value {value:?} of {key:?} may hold only lowercase letters, digits, '_' and '-' (at most 63)"),
            );
        }
    }
    let metadata_bytes: usize = vm.metadata.iter().map(|(k, v)| json_len(k) + json_len(v)).sum();
    if metadata_bytes > MAX_METADATA_BYTES {
        p.add(
            format!("{at}.metadata"),
            format!("takes {metadata_bytes} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed"),
        );
    }
    for key in vm.metadata.keys() {
        if RESERVED_METADATA_KEYS.contains(&key.as_str()) || key.starts_with(RESERVED_METADATA_PREFIX) {
            p.add(format!("{at}.metadata"), format!("key {key:?} is set by the controller"));
        } else if key.is_empty()
            || key.len() > 128
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            p.add(
                format!("{at}.metadata"),
                format!("key {key:?} may hold only letters, digits, '_' and '-' (1 to 128)"),
            );
        }
    }
}

/// Compute Engine label keys: 1–63 characters, a lowercase letter first,
/// then lowercase letters, digits, `_` and `-`.
pub fn is_label_key(key: &str) -> bool {
    key.len() <= 63
        && key.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Compute Engine label values: 0–63 lowercase letters, digits, `_` and `-`.
pub fn is_label_value(value: &str) -> bool {
    value.len() <= 63 && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::EnvVar;
    use crate::api::prebuild::FailureBackoff;
    use crate::api::testrun::PresetRef;
    use proptest::prelude::*;

    fn vm() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "zones": ["us-central1-a", "us-central1-b"],
            "machineType": "e2-standard-4",
            "image": "projects/debian-cloud/global/images/family/debian-12",
        }))
        .expect("valid vm")
    }

    fn testrun() -> TestRunSpec {
        serde_json::from_value(serde_json::json!({
            "vm": vm(),
            "command": ["cargo", "test"],
        }))
        .expect("valid testrun")
    }

    fn preset() -> PrebuildPresetSpec {
        serde_json::from_value(serde_json::json!({
            "templateVersion": "v1",
            "instances": 3,
            "vm": vm(),
        }))
        .expect("valid preset")
    }

    #[test]
    fn json_sizes_are_those_kube_apiserver_writes() {
        // As Go's encoder writes them: `"a\u0026\u003c\u003e\u2028\u0008\n\"é"`.
        assert_eq!(json_len("a&<>\u{2028}\u{8}\n\"é"), 1 + 6 * 5 + 2 + 2 + 2);
        let written = serde_json::to_string("a\u{1}\t\\").expect("json");
        assert_eq!(json_len("a\u{1}\t\\"), written.len() - 2);
    }

    fn fields(result: Result<(), InvalidSpec>) -> Vec<String> {
        result.err().map(|e| e.0.into_iter().map(|f| f.field).collect()).unwrap_or_default()
    }

    #[test]
    fn failure_policy_rules_are_checked_as_the_job_api_checks_them() {
        let with = |rules: serde_json::Value| {
            let mut spec = testrun();
            spec.failure_policy = Some(serde_json::from_value(serde_json::json!({ "rules": rules })).expect("rules"));
            validate_testrun(&spec)
        };
        assert_eq!(
            with(serde_json::json!([
                {"action": "RetryShard", "onExitCodes": {"operator": "In", "values": [75, 76]}},
                {"action": "Ignore", "onReasons": ["Preempted", "VmLost"]},
                {"action": "FailRun", "onExitCodes": {"operator": "NotIn", "values": [0, 1]}},
            ])),
            Ok(())
        );
        let problems = |rules| {
            with(rules).err().map(|e| e.0.into_iter().map(|f| f.to_string()).collect::<Vec<_>>()).unwrap_or_default()
        };
        assert_eq!(
            problems(serde_json::json!([{"action": "FailShard"}])),
            ["spec.failurePolicy.rules[0]: one of onExitCodes and onReasons is required"]
        );
        assert_eq!(
            problems(serde_json::json!([
                {"action": "FailShard", "onReasons": ["VmLost"], "onExitCodes": {"operator": "In", "values": [1]}}
            ])),
            ["spec.failurePolicy.rules[0]: onExitCodes and onReasons are mutually exclusive; set one"]
        );
        assert_eq!(
            problems(serde_json::json!([{"action": "FailShard", "onExitCodes": {"operator": "In", "values": [0, 3]}}])),
            [
                "spec.failurePolicy.rules[0].onExitCodes.values: 0 is a success and cannot be listed with the In operator"
            ]
        );
        assert_eq!(
            problems(serde_json::json!([
                {"action": "Ignore", "onReasons": ["VmLost"]},
                {"action": "FailShard", "onExitCodes": {"operator": "NotIn", "values": [3, 3, 2]}},
                {"action": "FailShard", "onReasons": ["LeaseLost", "LeaseLost"]},
            ])),
            [
                "spec.failurePolicy.rules[1].onExitCodes.values: must be in ascending order, each value once",
                "spec.failurePolicy.rules[2].onReasons: LeaseLost is listed more than once",
            ]
        );
    }

    #[test]
    fn a_plain_testrun_is_valid() {
        assert_eq!(validate_testrun(&testrun()), Ok(()));
    }

    #[test]
    fn vm_is_required_without_preset_ref() {
        let mut spec = testrun();
        spec.vm = None;
        let err = validate_testrun(&spec).expect_err("vm missing");
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].field, "spec.vm");
        assert!(err.to_string().contains("presetRef"), "{err}");

        spec.preset_ref = Some(PresetRef { name: "pool".into() });
        assert_eq!(validate_testrun(&spec), Ok(()));
    }

    #[test]
    fn command_and_vm_may_be_left_out_only_by_a_rerun() {
        let mut spec = testrun();
        spec.command.clear();
        spec.vm = None;
        assert_eq!(fields(validate_testrun(&spec)), ["spec.vm", "spec.command"]);
        spec.rerun_of = Some(crate::api::testrun::RerunOf { name: "nightly".into() });
        assert_eq!(validate_testrun(&spec), Ok(()));
    }

    #[test]
    fn empty_program_is_rejected() {
        let mut spec = testrun();
        spec.command = vec![String::new(), "x".into()];
        assert_eq!(fields(validate_testrun(&spec)), ["spec.command"]);
    }

    #[test]
    fn command_env_and_metadata_have_a_size_budget() {
        let mut spec = testrun();
        spec.command = vec!["x".repeat(MAX_COMMAND_BYTES / 2)];
        spec.env = vec![EnvVar { name: "A".into(), value: "y".repeat(MAX_COMMAND_BYTES / 2 - 1) }];
        assert_eq!(validate_testrun(&spec), Ok(()), "exactly the budget");
        spec.working_dir = Some("/w".into());
        assert_eq!(fields(validate_testrun(&spec)), ["spec.command"]);
        let mut spec = testrun();
        if let Some(vm) = spec.vm.as_mut() {
            vm.metadata.insert("big".into(), "z".repeat(MAX_METADATA_BYTES));
        }
        assert_eq!(fields(validate_testrun(&spec)), ["spec.vm.metadata"]);
        // Sizes count as JSON: a control character takes six bytes.
        let mut spec = testrun();
        spec.command = vec!["\u{1}".repeat(MAX_COMMAND_BYTES / 6)];
        assert_eq!(validate_testrun(&spec), Ok(()));
        spec.command[0].push('\u{1}');
        assert_eq!(fields(validate_testrun(&spec)), ["spec.command"]);
        let mut spec = testrun();
        if let Some(vm) = spec.vm.as_mut() {
            vm.metadata.insert("big".into(), "\"".repeat(MAX_METADATA_BYTES / 2));
        }
        assert_eq!(fields(validate_testrun(&spec)), ["spec.vm.metadata"]);
    }

    #[test]
    fn duplicate_env_names_are_rejected() {
        let mut spec = testrun();
        spec.env = ["A", "B", "A"].iter().map(|n| EnvVar { name: (*n).into(), value: String::new() }).collect();
        assert_eq!(fields(validate_testrun(&spec)), ["spec.env[2].name"]);
    }

    #[test]
    fn a_timeout_longer_than_a_week_is_rejected() {
        let mut spec = testrun();
        spec.timeout = Some("168h".into());
        assert!(validate_testrun(&spec).is_ok());
        for long in ["169h", "99999999999h"] {
            spec.timeout = Some(long.into());
            spec.heartbeat_timeout = "1m".into();
            assert_eq!(fields(validate_testrun(&spec)), ["spec.timeout"], "{long}");
        }
    }

    #[test]
    fn a_default_heartbeat_timeout_never_makes_a_short_run_invalid() {
        // Only `timeout: 8s` written: the default heartbeatTimeout (60s) is
        // bounded by it instead of refusing the run.
        let mut spec: TestRunSpec = serde_json::from_value(serde_json::json!({
            "command": ["true"], "timeout": "8s",
            "vm": { "zones": ["us-central1-a"], "machineType": "e2-small", "image": "img" }
        }))
        .expect("spec");
        assert_eq!(spec.heartbeat_timeout.as_str(), "60s");
        assert_eq!(validate_testrun(&spec), Ok(()));
        assert_eq!(spec.effective_heartbeat_timeout(None), std::time::Duration::from_secs(8));
        spec.heartbeat_timeout = "2s".into();
        assert_eq!(spec.effective_heartbeat_timeout(None), std::time::Duration::from_secs(2));
    }

    #[test]
    fn malformed_and_zero_durations_are_reported_per_field() {
        let mut spec = testrun();
        spec.timeout = Some("0s".into());
        spec.heartbeat_timeout = "soon".into();
        assert_eq!(fields(validate_testrun(&spec)), ["spec.timeout", "spec.heartbeatTimeout"]);
    }

    #[test]
    fn reserved_and_malformed_labels_are_rejected() {
        let mut spec = testrun();
        let vm = spec.vm.as_mut().expect("vm");
        vm.labels.insert("managed-by".into(), "me".into());
        vm.labels.insert("Team".into(), "ci".into());
        vm.labels.insert("team".into(), "CI".into());
        vm.labels.insert("ok".into(), "fine_1".into());
        let err = validate_testrun(&spec).expect_err("bad labels");
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("\"managed-by\" is set by the controller"), "{text}");
        assert!(text.contains("key \"Team\""), "{text}");
        assert!(text.contains("value \"CI\""), "{text}");
    }

    #[test]
    fn reserved_metadata_keys_are_rejected() {
        let mut spec = testrun();
        let vm = spec.vm.as_mut().expect("vm");
        vm.metadata.insert("startup-script".into(), "rm -rf /".into());
        vm.metadata.insert("testrun-token".into(), "x".into());
        vm.metadata.insert("startup-script-url".into(), "gs://b/s.sh".into());
        vm.metadata.insert("enable-oslogin".into(), "TRUE".into());
        assert_eq!(fields(validate_testrun(&spec)), ["spec.vm.metadata", "spec.vm.metadata", "spec.vm.metadata"]);
    }

    #[test]
    fn duplicate_zones_are_rejected() {
        let mut spec = testrun();
        spec.vm.as_mut().expect("vm").zones.push("us-central1-a".into());
        assert_eq!(fields(validate_testrun(&spec)), ["spec.vm.zones[2]"]);
    }

    #[test]
    fn a_backoff_base_above_the_default_max_raises_the_max_instead_of_refusing() {
        let mut spec = preset();
        assert_eq!(validate_prebuild_preset(&spec), Ok(()));
        // Only `base: 10m` written; the default max is 5m.
        spec.failure_backoff = serde_json::from_value(serde_json::json!({ "base": "10m" })).expect("backoff");
        assert_eq!(validate_prebuild_preset(&spec), Ok(()));
        let ten = std::time::Duration::from_secs(600);
        assert_eq!(spec.failure_backoff.effective(), (ten, ten));
        spec.failure_backoff = FailureBackoff { base: "10s".into(), max: "1m".into() };
        assert_eq!(
            spec.failure_backoff.effective(),
            (std::time::Duration::from_secs(10), std::time::Duration::from_secs(60))
        );
        spec.failure_backoff.base = "soon".into();
        assert_eq!(fields(validate_prebuild_preset(&spec)), ["spec.failureBackoff.base"]);
    }

    #[test]
    fn preset_vm_is_checked_too() {
        let mut spec = preset();
        spec.vm.labels.insert("owner-uid".into(), "x".into());
        assert_eq!(fields(validate_prebuild_preset(&spec)), ["spec.vm.labels"]);
    }

    proptest! {
        #[test]
        fn label_key_rules_match_gce(key in "[a-zA-Z0-9_.-]{0,70}") {
            let expected = !key.is_empty()
                && key.len() <= 63
                && key.starts_with(|c: char| c.is_ascii_lowercase())
                && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            prop_assert_eq!(is_label_key(&key), expected);
        }

        /// Validation never panics and every problem names a spec field.
        #[test]
        fn validation_reports_fields_never_panics(
            labels in proptest::collection::btree_map("[a-zA-Z-]{0,8}", "[a-zA-Z0-9]{0,8}", 0..6),
            timeout in "[0-9a-z]{0,5}",
            heartbeat in "[0-9a-z]{0,5}",
        ) {
            let mut spec = testrun();
            spec.vm.as_mut().expect("vm").labels = labels;
            spec.timeout = Some(timeout.as_str().into());
            spec.heartbeat_timeout = heartbeat.as_str().into();
            if let Err(e) = validate_testrun(&spec) {
                prop_assert!(!e.0.is_empty());
                for f in &e.0 { prop_assert!(f.field.starts_with("spec.")); }
            }
        }
    }
}
