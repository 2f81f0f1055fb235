//! The network fields of an insert, checked as Compute Engine checks them:
//! one interface with a network and/or a subnetwork given as a full URL or
//! a partial path (another project's for a Shared VPC), a subnetwork in the
//! zone's region, at most one `ONE_TO_ONE_NAT` access config, and network
//! tags that are RFC 1035 names.

use google_cloud_compute_v1::model;

use super::error::GceError;
use crate::compute::naming::is_valid_instance_name;

/// The most tags an instance may carry.
const MAX_TAGS: usize = 64;

fn invalid(field: &str, value: &str, why: &str) -> GceError {
    GceError::invalid(format!("Invalid value for field 'resource.{field}': '{value}'. {why}"))
}

/// The path of a resource URL after `compute/v1/` (or the path as given
/// when it is partial), split into segments.
fn segments(url: &str) -> Vec<&str> {
    let path = url.split_once("/compute/v1/").map_or(url, |(_, rest)| rest);
    let path = if url.starts_with("https://") && !url.contains("/compute/v1/") { "" } else { path };
    path.split('/').collect()
}

/// `[projects/P/]global/networks/NAME`.
fn is_network(url: &str) -> bool {
    match segments(url).as_slice() {
        ["global", "networks", name] => is_valid_instance_name(name),
        ["projects", project, "global", "networks", name] => !project.is_empty() && is_valid_instance_name(name),
        _ => false,
    }
}

/// `[projects/P/]regions/R/subnetworks/NAME`: its region.
fn subnetwork_region(url: &str) -> Option<&str> {
    match segments(url).as_slice() {
        ["regions", region, "subnetworks", name] if is_valid_instance_name(name) => Some(region),
        ["projects", project, "regions", region, "subnetworks", name]
            if !project.is_empty() && is_valid_instance_name(name) =>
        {
            Some(region)
        }
        _ => None,
    }
}

/// The region of a zone (`us-central1-a` → `us-central1`).
fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(region, _)| region)
}

/// Checks the network interfaces and tags of an insert into `zone`.
pub fn check(resource: &model::Instance, zone: &str) -> Result<(), GceError> {
    if resource.network_interfaces.len() > 1 {
        return Err(invalid("networkInterfaces", "", "The emulator supports one network interface."));
    }
    for (i, nic) in resource.network_interfaces.iter().enumerate() {
        let field = |name: &str| format!("networkInterfaces[{i}].{name}");
        if let Some(network) = nic.network.as_deref()
            && !is_network(network)
        {
            return Err(invalid(&field("network"), network, "The URL is malformed."));
        }
        if let Some(subnetwork) = nic.subnetwork.as_deref() {
            let Some(region) = subnetwork_region(subnetwork) else {
                return Err(invalid(&field("subnetwork"), subnetwork, "The URL is malformed."));
            };
            if region != region_of(zone) {
                return Err(invalid(
                    &field("subnetwork"),
                    subnetwork,
                    &format!("Subnetwork must be in region '{}' of zone '{zone}'.", region_of(zone)),
                ));
            }
        }
        if nic.access_configs.len() > 1 {
            return Err(invalid(&field("accessConfigs"), "", "At most one access config is allowed per interface."));
        }
        for (j, access) in nic.access_configs.iter().enumerate() {
            let kind = access.r#type.as_ref().and_then(|t| t.name()).unwrap_or("ONE_TO_ONE_NAT");
            if kind != "ONE_TO_ONE_NAT" {
                return Err(invalid(&field(&format!("accessConfigs[{j}].type")), kind, "Must be ONE_TO_ONE_NAT."));
            }
        }
    }
    if let Some(tags) = &resource.tags {
        if tags.items.len() > MAX_TAGS {
            return Err(invalid("tags.items", "", &format!("At most {MAX_TAGS} tags are allowed.")));
        }
        for (i, tag) in tags.items.iter().enumerate() {
            if !is_valid_instance_name(tag) {
                return Err(invalid(
                    &format!("tags.items[{i}]"),
                    tag,
                    "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(network: Option<&str>, subnetwork: Option<&str>) -> model::Instance {
        let mut nic = model::NetworkInterface::new();
        if let Some(n) = network {
            nic = nic.set_network(n);
        }
        if let Some(s) = subnetwork {
            nic = nic.set_subnetwork(s);
        }
        model::Instance::new().set_network_interfaces([nic])
    }

    #[test]
    fn networks_and_subnetworks_in_every_accepted_form() {
        for (network, subnetwork) in [
            (Some("global/networks/default"), None),
            (Some("projects/host/global/networks/shared"), Some("projects/host/regions/us-central1/subnetworks/ci")),
            (None, Some("regions/us-central1/subnetworks/ci")),
            (
                Some("https://www.googleapis.com/compute/v1/projects/p/global/networks/vpc"),
                Some("https://www.googleapis.com/compute/v1/projects/p/regions/us-central1/subnetworks/ci"),
            ),
        ] {
            assert!(check(&nic(network, subnetwork), "us-central1-a").is_ok(), "{network:?} {subnetwork:?}");
        }
    }

    #[test]
    fn malformed_paths_and_a_subnetwork_of_another_region_are_refused() {
        for (network, subnetwork) in [
            (Some("default"), None),
            (Some("global/networks/Bad_Name"), None),
            (Some("https://example.com/networks/x"), None),
            (None, Some("subnetworks/ci")),
            (None, Some("regions/europe-west1/subnetworks/ci")),
            (None, Some("projects//regions/us-central1/subnetworks/ci")),
        ] {
            let refused = check(&nic(network, subnetwork), "us-central1-a");
            assert!(refused.is_err(), "{network:?} {subnetwork:?} was accepted");
        }
    }

    #[test]
    fn tags_are_rfc_1035_names() {
        let tagged = |tags: &[&str]| model::Instance::new().set_tags(model::Tags::new().set_items(tags.to_vec()));
        assert!(check(&tagged(&["ci-runner", "allow-agent"]), "us-central1-a").is_ok());
        assert!(check(&tagged(&["CI"]), "us-central1-a").is_err());
        assert!(check(&tagged(&["-x"]), "us-central1-a").is_err());
        let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check(&tagged(&many), "us-central1-a").is_err());
    }

    #[test]
    fn one_access_config_of_type_one_to_one_nat() {
        let with = |configs: Vec<model::AccessConfig>| {
            model::Instance::new().set_network_interfaces([model::NetworkInterface::new().set_access_configs(configs)])
        };
        let nat = || model::AccessConfig::new().set_type(model::access_config::Type::OneToOneNat);
        assert!(check(&with(vec![nat()]), "us-central1-a").is_ok());
        assert!(check(&with(vec![nat(), nat()]), "us-central1-a").is_err());
    }
}
