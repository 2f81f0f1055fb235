//! The VmClass resource (cluster-scoped, owned by the platform team): the
//! Compute Engine side of a VM that a namespace user must not choose freely
//! (network, subnetwork, tags, external IP, service account), and limits on
//! what TestRuns and PrebuildPresets of the class may ask for. It plays the
//! part Karpenter's NodeClass and Kubernetes' StorageClass play.
//!
//! [`resolve`] picks a request's class and [`check`] holds the request
//! against it; both are pure.

use std::sync::Arc;
use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SERVICE_ACCOUNT_PATTERN;
use super::duration::DurationString;
use crate::compute::{NetworkSpec, ServiceAccountSpec};

/// Annotation that makes a VmClass the one used when a request names none.
pub const DEFAULT_CLASS_ANNOTATION: &str = "testrun.dev/is-default-class";

/// Scopes a class's service account gets when it names none.
pub const DEFAULT_SCOPES: &[&str] = &["https://www.googleapis.com/auth/cloud-platform"];

/// The Compute Engine side of a VM, and what requests of the class may ask.
#[allow(clippy::duplicated_attributes)] // several printcolumn(...) share keys such as type_
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "testrun.dev",
    version = "v1alpha1",
    kind = "VmClass",
    plural = "vmclasses",
    shortname = "vmc",
    doc = "The Compute Engine side of VMs that namespace users must not choose: network, subnetwork, network tags, external IP and service account, and limits on machine types, images, zones, shards, run time and pool size. TestRuns and PrebuildPresets name one in spec.vm.className; without one, the class annotated testrun.dev/is-default-class: \"true\" applies. Cluster-scoped: platform teams own it, users need only get.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network", description = "VPC network"),
    printcolumn(name = "Subnetwork", type_ = "string", json_path = ".spec.subnetwork", description = "Subnetwork"),
    printcolumn(
        name = "ServiceAccount",
        type_ = "string",
        json_path = ".spec.serviceAccount.email",
        description = "Service account VMs run as"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct VmClassSpec {
    /// VPC network of the VMs: `global/networks/NAME`, or
    /// `projects/PROJECT/global/networks/NAME`. Unset: the subnetwork's
    /// network, or the project's `default` network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub network: Option<String>,

    /// Subnetwork of the VMs: `regions/REGION/subnetworks/NAME`, or
    /// `projects/HOST_PROJECT/regions/REGION/subnetworks/NAME` for a Shared
    /// VPC. Its region must be the region of every zone the VMs use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub subnetwork: Option<String>,

    /// Network tags put on the VMs, which firewall rules select them by
    /// (e.g. the rule that lets the VMs reach the agent port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(pattern(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")))]
    pub network_tags: Vec<String>,

    /// Give every VM an ephemeral external IP. Default false: VMs reach the
    /// internet only through Cloud NAT, and nothing outside the VPC reaches
    /// them.
    #[serde(default)]
    pub external_ip: bool,

    /// The service account VMs run as. Unset: none (the VMs get no Google
    /// credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ClassServiceAccount>,

    /// What requests of the class may ask for.
    #[serde(default)]
    pub limits: VmClassLimits,

    /// Namespaces whose TestRuns and PrebuildPresets may use the class
    /// (glob patterns, e.g. `team-a-*`). Empty: every namespace. A default
    /// class is the default only in these namespaces, so each team may
    /// have its own; a namespace no default class admits is refused
    /// unless it names a class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub allowed_namespaces: Vec<String>,
}

/// The service account of a class's VMs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClassServiceAccount {
    /// Its e-mail, e.g. `ci-runner@my-project.iam.gserviceaccount.com`. The
    /// controller's own service account needs `roles/iam.serviceAccountUser`
    /// on it.
    #[schemars(length(min = 3, max = 320), pattern(SERVICE_ACCOUNT_PATTERN))]
    pub email: String,
    /// OAuth scopes. Unset: `https://www.googleapis.com/auth/cloud-platform`
    /// (access then follows the account's IAM roles).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub scopes: Vec<String>,
}

/// Limits on requests of a class; an unset or empty limit allows anything.
/// Lists are glob patterns (`*` any run of characters, `?` one, `[a-c]` a
/// set), e.g. `e2-*`, `projects/debian-cloud/global/images/*`,
/// `us-central1-?`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmClassLimits {
    /// Machine types requests may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub allowed_machine_types: Vec<String>,
    /// Boot images requests may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024)))]
    pub allowed_images: Vec<String>,
    /// Zones requests may list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    pub allowed_zones: Vec<String>,
    /// Most shards a TestRun may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_shards: Option<i32>,
    /// Longest `timeout` a TestRun may have, e.g. `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_run_duration: Option<DurationString>,
    /// Most `instances` a PrebuildPreset may keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_pool_instances: Option<i32>,
}

/// Which class a request gets.
#[derive(Clone, Debug)]
pub enum ClassChoice {
    /// No class named and no default class: no limits, the project's
    /// default network, no service account.
    NoClass,
    /// This class.
    Class(Arc<VmClass>),
    /// The named class does not exist (yet).
    Missing(String),
}

/// The class for a request from `namespace` naming `name` (or none), among
/// `classes`. With no name, a class annotated [`DEFAULT_CLASS_ANNOTATION`]
/// `"true"` whose `allowedNamespaces` admit the namespace (so each team
/// may have a default of its own); when several are, the newest, as
/// Kubernetes picks among default StorageClasses (ties: the first name).
/// When default classes exist but none admits the namespace, the newest
/// of them, which refuses it: no class at all only when there is no
/// default class.
pub fn resolve(name: Option<&str>, namespace: &str, classes: &[Arc<VmClass>]) -> ClassChoice {
    let name_of = |c: &VmClass| c.metadata.name.clone().unwrap_or_default();
    if let Some(name) = name.filter(|n| !n.is_empty()) {
        return classes
            .iter()
            .find(|c| name_of(c) == name)
            .map_or_else(|| ClassChoice::Missing(name.to_string()), |c| ClassChoice::Class(c.clone()));
    }
    let is_default = |c: &&Arc<VmClass>| {
        c.metadata.annotations.as_ref().and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION)).is_some_and(|v| v == "true")
    };
    let newest = |a: &&Arc<VmClass>, b: &&Arc<VmClass>| {
        let created = |c: &VmClass| c.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a).cmp(&created(b)).then_with(|| name_of(b).cmp(&name_of(a)))
    };
    let defaults: Vec<&Arc<VmClass>> = classes.iter().filter(is_default).collect();
    // A namespace no default class admits gets the newest default anyway,
    // whose check then refuses it: a default class restricted to some
    // namespaces must never leave the others without any limit.
    let chosen = defaults
        .iter()
        .copied()
        .filter(|c| matches_any(&c.spec.allowed_namespaces, namespace))
        .max_by(newest)
        .or_else(|| defaults.iter().copied().max_by(newest));
    chosen.map_or(ClassChoice::NoClass, |c| ClassChoice::Class(c.clone()))
}

/// What a request asks of its class.
#[derive(Clone, Debug, Default)]
pub struct ClassRequest<'a> {
    /// Where the fields live, e.g. `spec.vm`.
    pub at: &'a str,
    /// The namespace of the object asking.
    pub namespace: &'a str,
    /// The VM's machine type.
    pub machine_type: &'a str,
    /// The VM's image.
    pub image: &'a str,
    /// The zones listed.
    pub zones: &'a [String],
    /// A TestRun's shards.
    pub shards: Option<i32>,
    /// A TestRun's timeout.
    pub timeout: Option<Duration>,
    /// A PrebuildPreset's instances.
    pub pool_instances: Option<i32>,
}

fn matches_any(patterns: &[String], value: &str) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|p| glob::Pattern::new(p).is_ok_and(|pattern| pattern.matches(value)) || p == value)
}

/// Every way `request` falls outside `class`, as `field: why` sentences;
/// empty when it fits.
pub fn check(class: &VmClass, request: &ClassRequest<'_>) -> Vec<String> {
    let name = class.metadata.name.clone().unwrap_or_default();
    let limits = &class.spec.limits;
    let at = request.at;
    let mut problems = Vec::new();
    if !matches_any(&class.spec.allowed_namespaces, request.namespace) {
        problems.push(format!(
            "{at}.className: VmClass {name} is not for namespace {:?} (allowed: {})",
            request.namespace,
            class.spec.allowed_namespaces.join(", ")
        ));
        return problems;
    }
    if !matches_any(&limits.allowed_machine_types, request.machine_type) {
        problems.push(format!(
            "{at}.machineType: {:?} is not allowed by VmClass {name} (allowed: {})",
            request.machine_type,
            limits.allowed_machine_types.join(", ")
        ));
    }
    if !matches_any(&limits.allowed_images, request.image) {
        problems.push(format!(
            "{at}.image: {:?} is not allowed by VmClass {name} (allowed: {})",
            request.image,
            limits.allowed_images.join(", ")
        ));
    }
    let subnet_region = class.spec.subnetwork.as_deref().and_then(subnetwork_region);
    for (i, zone) in request.zones.iter().enumerate() {
        if let Some(region) = subnet_region
            && zone.rsplit_once('-').map(|(r, _)| r) != Some(region)
        {
            problems
                .push(format!("{at}.zones[{i}]: {zone:?} is not in region {region} of VmClass {name}'s subnetwork"));
        }
        if !matches_any(&limits.allowed_zones, zone) {
            problems.push(format!(
                "{at}.zones[{i}]: {zone:?} is not allowed by VmClass {name} (allowed: {})",
                limits.allowed_zones.join(", ")
            ));
        }
    }
    if let (Some(max), Some(shards)) = (limits.max_shards, request.shards)
        && shards > max
    {
        problems.push(format!("spec.shards: {shards} is more than VmClass {name} allows ({max})"));
    }
    if let (Some(max), Some(timeout)) = (&limits.max_run_duration, request.timeout) {
        match max.parse() {
            Ok(limit) if timeout > limit => problems
                .push(format!("spec.timeout: {}s is longer than VmClass {name} allows ({max})", timeout.as_secs())),
            Ok(_) => {}
            Err(e) => problems.push(format!("spec.timeout: VmClass {name} has an invalid limits.maxRunDuration: {e}")),
        }
    }
    if let (Some(max), Some(instances)) = (limits.max_pool_instances, request.pool_instances)
        && instances > max
    {
        problems.push(format!("spec.instances: {instances} is more than VmClass {name} allows ({max})"));
    }
    problems
}

impl ClassChoice {
    /// The class, when there is one.
    pub fn class(&self) -> Option<&VmClass> {
        match self {
            ClassChoice::Class(c) => Some(c),
            _ => None,
        }
    }

    /// The class's `limits.maxRunDuration`, parsed, with its text.
    pub fn max_run_duration(&self) -> Option<(std::time::Duration, &DurationString)> {
        let ClassChoice::Class(class) = self else { return None };
        let text = class.spec.limits.max_run_duration.as_ref()?;
        Some((text.parse().ok()?, text))
    }

    /// Why `request` cannot be made in this class, as one message (the
    /// problems joined by `; `); none when it can.
    pub fn refusal(&self, request: &ClassRequest<'_>) -> Option<String> {
        let problems = match self {
            ClassChoice::NoClass => Vec::new(),
            ClassChoice::Missing(name) => vec![format!("{}.className: VmClass {name} does not exist", request.at)],
            ClassChoice::Class(class) => check(class, request),
        };
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

/// A spec's own problems and its class's refusal as one InvalidSpec
/// message (`; ` between them); none when neither has any.
pub fn join_refusals(spec: Option<String>, class: Option<String>) -> Option<String> {
    match (spec, class) {
        (Some(spec), Some(class)) => Some(format!("{spec}; {class}")),
        (spec, class) => spec.or(class),
    }
}

/// The region of a subnetwork path or URL (`…/regions/REGION/subnetworks/…`).
fn subnetwork_region(subnetwork: &str) -> Option<&str> {
    let (_, rest) = subnetwork.split_once("regions/")?;
    rest.split('/').next().filter(|r| !r.is_empty())
}

/// The network interface a class gives its VMs.
pub fn network(class: Option<&VmClass>) -> NetworkSpec {
    class.map_or_else(NetworkSpec::default, |c| NetworkSpec {
        network: c.spec.network.clone(),
        subnetwork: c.spec.subnetwork.clone(),
        tags: c.spec.network_tags.clone(),
        external_ip: c.spec.external_ip,
    })
}

/// The service account (e-mail and scopes) a class gives its VMs.
pub fn service_account(class: Option<&VmClass>) -> Option<ServiceAccountSpec> {
    let account = class?.spec.service_account.as_ref()?;
    let scopes = if account.scopes.is_empty() {
        DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
    } else {
        account.scopes.clone()
    };
    Some(ServiceAccountSpec { email: account.email.clone(), scopes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn class(name: &str, default: bool, created_s: i64) -> Arc<VmClass> {
        let mut c = VmClass::new(name, VmClassSpec::default());
        if default {
            c.metadata.annotations = Some([(DEFAULT_CLASS_ANNOTATION.to_string(), "true".to_string())].into());
        }
        c.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created_s).expect("time")));
        Arc::new(c)
    }

    fn name(choice: &ClassChoice) -> String {
        match choice {
            ClassChoice::Class(c) => c.metadata.name.clone().unwrap_or_default(),
            ClassChoice::NoClass => "<none>".into(),
            ClassChoice::Missing(n) => format!("missing {n}"),
        }
    }

    #[test]
    fn a_named_class_is_used_or_reported_missing() {
        let classes = [class("a", false, 1), class("b", true, 2)];
        assert_eq!(name(&resolve(Some("a"), "ci", &classes)), "a");
        assert_eq!(name(&resolve(Some("zz"), "ci", &classes)), "missing zz");
    }

    #[test]
    fn without_a_name_the_newest_default_class_applies_or_none() {
        let classes = [class("old", true, 1), class("new", true, 5), class("plain", false, 9)];
        assert_eq!(name(&resolve(None, "ci", &classes)), "new");
        assert_eq!(name(&resolve(Some(""), "ci", &classes)), "new");
        assert_eq!(name(&resolve(None, "ci", &[class("plain", false, 1)])), "<none>");
        assert_eq!(name(&resolve(None, "ci", &[class("y", true, 1), class("x", true, 1)])), "x");
    }

    #[test]
    fn a_default_class_for_other_namespaces_is_not_the_default_here() {
        let mut team = (*class("team-b", true, 9)).clone();
        team.spec.allowed_namespaces = vec!["team-b-*".into()];
        let classes = [class("everyone", true, 1), Arc::new(team)];
        assert_eq!(name(&resolve(None, "team-b-ci", &classes)), "team-b");
        assert_eq!(name(&resolve(None, "team-a-ci", &classes)), "everyone");
        // Named, it is found (and refused by its check) whatever the namespace.
        assert_eq!(name(&resolve(Some("team-b"), "team-a-ci", &classes)), "team-b");
    }

    #[test]
    fn a_namespace_no_default_class_admits_gets_one_that_refuses_it_not_no_limits() {
        let mut team = (*class("team-b", true, 9)).clone();
        team.spec.allowed_namespaces = vec!["team-b-*".into()];
        let classes = [Arc::new(team), class("plain", false, 10)];
        let ClassChoice::Class(chosen) = resolve(None, "elsewhere", &classes) else {
            panic!("a namespace outside every default class got no class, so no limit");
        };
        let request = ClassRequest { at: "spec.vm", namespace: "elsewhere", ..Default::default() };
        let refused = check(&chosen, &request);
        assert!(refused.iter().any(|r| r.contains("elsewhere")), "{refused:?}");
    }

    fn limited() -> VmClass {
        let mut c = VmClass::new("ci", VmClassSpec::default());
        c.spec.limits = VmClassLimits {
            allowed_machine_types: vec!["e2-*".into(), "n2-standard-4".into()],
            allowed_images: vec!["projects/debian-cloud/global/images/*".into()],
            allowed_zones: vec!["us-central1-?".into()],
            max_shards: Some(8),
            max_run_duration: Some(DurationString::from("1h")),
            max_pool_instances: Some(10),
        };
        c
    }

    fn request<'a>(zones: &'a [String]) -> ClassRequest<'a> {
        ClassRequest {
            at: "spec.vm",
            namespace: "ci",
            machine_type: "e2-standard-2",
            image: "projects/debian-cloud/global/images/family/debian-12",
            zones,
            shards: Some(8),
            timeout: Some(Duration::from_secs(3600)),
            pool_instances: None,
        }
    }

    #[test]
    fn a_request_inside_the_limits_fits() {
        let zones = vec!["us-central1-a".to_string(), "us-central1-b".to_string()];
        assert_eq!(check(&limited(), &request(&zones)), Vec::<String>::new());
    }

    #[test]
    fn every_limit_refuses_what_falls_outside_it_and_says_which() {
        let zones = vec!["us-central1-a".to_string(), "europe-west4-b".to_string()];
        let mut r = request(&zones);
        r.machine_type = "c3-highcpu-176";
        r.image = "projects/my-project/global/images/anything";
        r.shards = Some(9);
        r.timeout = Some(Duration::from_secs(7200));
        let problems = check(&limited(), &r);
        let fields: Vec<&str> = problems.iter().map(|p| p.split(':').next().unwrap_or_default()).collect();
        assert_eq!(fields, ["spec.vm.machineType", "spec.vm.image", "spec.vm.zones[1]", "spec.shards", "spec.timeout"]);
        assert!(problems[0].contains("not allowed by VmClass ci (allowed: e2-*, n2-standard-4)"), "{problems:?}");
        let pool = ClassRequest { pool_instances: Some(11), shards: None, timeout: None, ..request(&[]) };
        assert_eq!(check(&limited(), &pool), ["spec.instances: 11 is more than VmClass ci allows (10)"]);
    }

    #[test]
    fn a_class_for_some_namespaces_refuses_the_others() {
        let mut c = limited();
        c.spec.allowed_namespaces = vec!["team-a-*".into()];
        let zones = vec!["us-central1-a".to_string()];
        let mut r = request(&zones);
        r.namespace = "team-a-ci";
        assert!(check(&c, &r).is_empty());
        r.namespace = "team-b";
        assert_eq!(
            check(&c, &r),
            ["spec.vm.className: VmClass ci is not for namespace \"team-b\" (allowed: team-a-*)"]
        );
    }

    #[test]
    fn zones_outside_the_subnetworks_region_are_refused() {
        let mut c = limited();
        c.spec.limits.allowed_zones = vec![];
        c.spec.subnetwork = Some("projects/host/regions/us-central1/subnetworks/ci".into());
        let zones = vec!["us-central1-a".to_string(), "us-east1-b".to_string()];
        assert_eq!(
            check(&c, &request(&zones)),
            ["spec.vm.zones[1]: \"us-east1-b\" is not in region us-central1 of VmClass ci's subnetwork"]
        );
    }

    #[test]
    fn a_class_gives_its_network_and_service_account_with_default_scopes() {
        let mut c = VmClass::new("net", VmClassSpec::default());
        c.spec.subnetwork = Some("projects/host/regions/us-central1/subnetworks/ci".into());
        c.spec.network_tags = vec!["ci".into()];
        c.spec.service_account =
            Some(ClassServiceAccount { email: "ci@p.iam.gserviceaccount.com".into(), scopes: vec![] });
        let net = network(Some(&c));
        assert_eq!(net.subnetwork.as_deref(), Some("projects/host/regions/us-central1/subnetworks/ci"));
        assert_eq!(net.tags, ["ci"]);
        assert!(!net.external_ip);
        assert_eq!(
            service_account(Some(&c)),
            Some(ServiceAccountSpec {
                email: "ci@p.iam.gserviceaccount.com".into(),
                scopes: vec![DEFAULT_SCOPES[0].to_string()]
            })
        );
        assert_eq!(network(None), NetworkSpec::default());
        assert_eq!(service_account(None), None);
    }
}
