//! Deterministic VM names, labels and request ids. A name and a request id
//! follow from what the VM is for, so a retried or repeated call after a
//! crash can never create a second VM.

use std::collections::BTreeMap;

use uuid::Uuid;

/// Label on every VM this controller creates.
pub const LABEL_MANAGED_BY: &str = "managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "testrun-controller";
/// Label naming the controller installation that owns the VM.
pub const LABEL_INSTALLATION: &str = "installation";
/// Label naming the kind of the owner (`testrun` or `prebuildpreset`).
pub const LABEL_OWNER_KIND: &str = "owner-kind";
/// Label holding the owner's uid.
pub const LABEL_OWNER_UID: &str = "owner-uid";
/// Label holding the owner's namespace: an orphan scan limited to some
/// namespaces judges only VMs whose owner it could have seen.
pub const LABEL_OWNER_NAMESPACE: &str = "owner-namespace";
/// Label holding the shard number (TestRun VMs).
pub const LABEL_SHARD: &str = "shard";
/// Label holding the attempt number (TestRun VMs).
pub const LABEL_ATTEMPT: &str = "attempt";
/// Label holding the template version (preset VMs).
pub const LABEL_TEMPLATE_VERSION: &str = "template-version";

/// Namespace for request ids, so they never collide with other tools' ids.
const REQUEST_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a0e_8d3b_4c55_9a61_7e2f_0b4d_13c7);

/// Who owns a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerKind {
    /// A TestRun shard attempt.
    TestRun,
    /// A PrebuildPreset pool member.
    PrebuildPreset,
}

impl OwnerKind {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::TestRun => "testrun",
            Self::PrebuildPreset => "prebuildpreset",
        }
    }
}

/// Turns any text into a valid label value: lowercase, `[a-z0-9_-]`, at most
/// 63 characters.
pub fn label_value(text: &str) -> String {
    text.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' { c } else { '-' })
        .take(63)
        .collect()
}

/// The labels every VM of this installation carries.
pub fn base_labels(installation: &str, kind: OwnerKind, namespace: &str, owner_uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_INSTALLATION.to_string(), label_value(installation)),
        (LABEL_OWNER_KIND.to_string(), kind.label().to_string()),
        (LABEL_OWNER_NAMESPACE.to_string(), label_value(namespace)),
        (LABEL_OWNER_UID.to_string(), label_value(owner_uid)),
    ])
}

/// The installation id when none is given: the controller's own namespace,
/// and the namespace it watches when it watches one (`<own>_<watched>`; a
/// namespace name never holds `_`), so two installations in one cluster
/// never share an id. Too long for a label value, it becomes `i-` and a
/// digest of both.
pub fn default_installation_id(own_namespace: &str, watched: Option<&str>) -> String {
    let id = match watched {
        Some(watched) => format!("{own_namespace}_{watched}"),
        None => own_namespace.to_string(),
    };
    if id.len() <= 63 && label_value(&id) == id {
        return id;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("i-{hex}")
}

/// The labels that select every VM of an installation.
pub fn installation_selector(installation: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_INSTALLATION.to_string(), label_value(installation)),
    ])
}

/// Labels of a TestRun shard attempt's VM.
pub fn testrun_labels(
    installation: &str,
    namespace: &str,
    owner_uid: &str,
    shard: u32,
    attempt: u32,
) -> BTreeMap<String, String> {
    let mut labels = base_labels(installation, OwnerKind::TestRun, namespace, owner_uid);
    labels.insert(LABEL_SHARD.to_string(), shard.to_string());
    labels.insert(LABEL_ATTEMPT.to_string(), attempt.to_string());
    labels
}

/// Labels of a preset pool VM.
pub fn preset_labels(
    installation: &str,
    namespace: &str,
    owner_uid: &str,
    template_version: &str,
) -> BTreeMap<String, String> {
    let mut labels = base_labels(installation, OwnerKind::PrebuildPreset, namespace, owner_uid);
    labels.insert(LABEL_TEMPLATE_VERSION.to_string(), label_value(template_version));
    labels
}

/// A compact, name-safe form of a Kubernetes uid: its 32 hex digits.
fn uid_digits(uid: &str) -> String {
    let digits: String = uid.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    if digits.is_empty() { "0".to_string() } else { digits }
}

/// Name of a TestRun shard attempt's VM: `tr-<uid>-<shard>-<attempt>`.
pub fn testrun_instance_name(owner_uid: &str, shard: u32, attempt: u32) -> String {
    bounded_name("tr", &uid_digits(owner_uid), &format!("{shard}-{attempt}"))
}

/// Name of a preset pool VM: `pb-<uid>-<job>`.
pub fn preset_instance_name(owner_uid: &str, job_id: &str) -> String {
    let job: String = job_id
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .collect();
    bounded_name("pb", &uid_digits(owner_uid), &job)
}

/// `<prefix>-<middle>-<suffix>`, shortening the middle to stay within 63
/// characters; the suffix (what makes names differ within an owner) is kept.
fn bounded_name(prefix: &str, middle: &str, suffix: &str) -> String {
    let suffix: String = suffix.chars().take(30).collect();
    let room = 63usize.saturating_sub(prefix.len() + suffix.len() + 2);
    let middle: String = middle.chars().take(room).collect();
    let name = format!("{prefix}-{middle}-{suffix}");
    name.trim_end_matches('-').to_string()
}

/// A deterministic request id (a UUID, as Compute Engine requires) for one
/// call: the same purpose and try give the same id.
pub fn request_id(purpose: &str, try_number: u32) -> String {
    Uuid::new_v5(&REQUEST_ID_NAMESPACE, format!("{purpose}#{try_number}").as_bytes()).to_string()
}

/// Whether a name is a valid Compute Engine resource name (RFC 1035: a
/// lowercase letter, then up to 62 lowercase letters, digits or `-`, not
/// ending in `-`).
pub fn is_valid_instance_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validation::{is_label_key, is_label_value};
    use proptest::prelude::*;

    const UID: &str = "3f2b5c1e-9a7d-4e21-8c3b-0d5e6f7a8b9c";

    #[test]
    fn testrun_names_are_deterministic_and_distinct() {
        let a = testrun_instance_name(UID, 0, 1);
        assert_eq!(a, "tr-3f2b5c1e9a7d4e218c3b0d5e6f7a8b9c-0-1");
        assert_eq!(a, testrun_instance_name(UID, 0, 1));
        assert_ne!(a, testrun_instance_name(UID, 0, 2));
        assert_ne!(a, testrun_instance_name(UID, 1, 1));
        assert!(is_valid_instance_name(&a));
        let big = testrun_instance_name(UID, 255, 10);
        assert!(is_valid_instance_name(&big) && big.ends_with("-255-10"), "{big}");
    }

    #[test]
    fn labels_follow_the_label_rules() {
        let labels = testrun_labels("Prod EU", "team-a", UID, 3, 2);
        assert_eq!(labels[LABEL_INSTALLATION], "prod-eu");
        assert_eq!(labels[LABEL_SHARD], "3");
        assert_eq!(labels[LABEL_ATTEMPT], "2");
        assert_eq!(labels[LABEL_OWNER_KIND], "testrun");
        for (k, v) in labels.iter().chain(preset_labels("x", "team-a", UID, "V1.2").iter()) {
            assert!(is_label_key(k) && is_label_value(v), "{k}={v}");
        }
        assert_eq!(preset_labels("x", "team-a", UID, "V1.2")[LABEL_TEMPLATE_VERSION], "v1-2");
        assert_eq!(labels[LABEL_OWNER_NAMESPACE], "team-a");
    }

    #[test]
    fn default_installation_ids_differ_per_installation() {
        assert_eq!(default_installation_id("testrun-system", None), "testrun-system");
        assert_eq!(default_installation_id("ci", Some("team-a")), "ci_team-a");
        // `_` never occurs in a namespace, so these cannot collide.
        assert_ne!(default_installation_id("a-b", Some("c")), default_installation_id("a", Some("b-c")));
        let long = "n".repeat(60);
        let a = default_installation_id(&long, Some("team-a"));
        let b = default_installation_id(&long, Some("team-b"));
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(is_label_value(id) && id.starts_with("i-"), "{id}");
            assert_eq!(label_value(id), *id);
        }
        assert_eq!(a, default_installation_id(&long, Some("team-a")), "stable across restarts");
    }

    #[test]
    fn request_ids_are_uuids_that_change_with_the_try() {
        let a = request_id("delete/tr-1", 0);
        assert_eq!(a, request_id("delete/tr-1", 0));
        assert_ne!(a, request_id("delete/tr-1", 1));
        assert_ne!(a, request_id("delete/tr-2", 0));
        assert!(Uuid::parse_str(&a).is_ok());
    }

    proptest! {
        #[test]
        fn names_are_always_valid(uid in "[a-zA-Z0-9-]{0,80}", shard in 0u32..1000, attempt in 0u32..1000, job in "[a-zA-Z0-9_.-]{1,40}") {
            let t = testrun_instance_name(&uid, shard, attempt);
            prop_assert!(is_valid_instance_name(&t), "{}", t);
            let suffix = format!("-{shard}-{attempt}");
            prop_assert!(t.ends_with(&suffix));
            let p = preset_instance_name(&uid, &job);
            prop_assert!(is_valid_instance_name(&p), "{}", p);
        }

        #[test]
        fn label_values_are_always_valid(text in ".{0,100}") {
            prop_assert!(is_label_value(&label_value(&text)));
        }
    }
}
