//! The seam to the cloud: the [`Compute`] trait the reconcilers use, its one
//! implementation on the `google-cloud-compute-v1` client ([`gce`]), how
//! errors are kept ([`error`]) and explained ([`messages`]), and how VMs are
//! named and labelled ([`naming`]).
//!
//! The same implementation talks to Compute Engine (application default
//! credentials) and to the emulator in this repository (an endpoint and
//! anonymous credentials), so every test goes through the real client.

pub mod error;
pub mod gce;
pub mod limit;
pub mod messages;
pub mod naming;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

pub use error::{ComputeError, ErrorCode, RetryClass};

/// A VM to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Instance name (RFC 1035, at most 63 characters).
    pub name: String,
    /// Zone, e.g. `us-central1-a`.
    pub zone: String,
    /// Machine type name, e.g. `e2-standard-4`.
    pub machine_type: String,
    /// Boot image, e.g. `projects/debian-cloud/global/images/family/debian-12`.
    pub image: String,
    /// Boot disk size in GB.
    pub disk_gb: i64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Metadata items other than `startup-script`.
    pub metadata: BTreeMap<String, String>,
    /// The startup script (metadata `startup-script`; none when empty):
    /// one script for every VM of the controller, shared, so inserts
    /// waiting in the queue hold one copy of it, not one each.
    pub startup_script: std::sync::Arc<str>,
    /// The service account the VM runs as; none when unset.
    pub service_account: Option<ServiceAccountSpec>,
    /// The VM's network interface.
    pub network: NetworkSpec,
    /// Spot provisioning.
    pub spot: bool,
    /// Compute Engine deletes the VM after running this long, whatever
    /// happens to the controller.
    pub max_run_duration: Duration,
    /// Idempotency key (a UUID): the same key never creates twice.
    pub request_id: String,
}

/// A VM's service account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceAccountSpec {
    /// Its e-mail.
    pub email: String,
    /// OAuth scopes.
    pub scopes: Vec<String>,
}

/// Where a VM's one network interface goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkSpec {
    /// VPC network: `global/networks/NAME`, or `projects/PROJECT/global/networks/NAME`.
    /// None: the project's `default` network (or the subnetwork's own).
    pub network: Option<String>,
    /// Subnetwork: `regions/REGION/subnetworks/NAME`, or
    /// `projects/HOST_PROJECT/regions/REGION/subnetworks/NAME` in a Shared VPC.
    pub subnetwork: Option<String>,
    /// Network tags, which firewall rules and routes select VMs by.
    pub tags: Vec<String>,
    /// An ephemeral external IP (`ONE_TO_ONE_NAT`). Without one a VM reaches
    /// the internet only through Cloud NAT.
    pub external_ip: bool,
}

/// A VM's lifecycle state, as Compute Engine reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    /// Resources are being allocated.
    Provisioning,
    /// Resources are acquired; the VM is being prepared to boot.
    Staging,
    /// Booting or running.
    Running,
    /// Being stopped or deleted.
    Stopping,
    /// Stopped or ended (e.g. after `maxRunDuration` with action STOP).
    Terminated,
    /// Any other status, kept as written.
    Other(String),
}

impl InstanceStatus {
    /// Reads a status as Compute Engine writes it.
    pub fn parse(status: &str) -> Self {
        match status {
            "PROVISIONING" => Self::Provisioning,
            "STAGING" => Self::Staging,
            "RUNNING" => Self::Running,
            "STOPPING" => Self::Stopping,
            "TERMINATED" => Self::Terminated,
            other => Self::Other(other.to_string()),
        }
    }
}

/// A VM as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Instance name.
    pub name: String,
    /// Zone name (not URL).
    pub zone: String,
    /// Lifecycle state.
    pub status: InstanceStatus,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The label fingerprint to send with a label change (optimistic
    /// concurrency), base64 as Compute Engine writes it.
    pub label_fingerprint: String,
    /// Metadata items.
    pub metadata: BTreeMap<String, String>,
    /// Creation time (RFC 3339), when known.
    pub creation_timestamp: Option<String>,
}

/// Where an operation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperationStatus {
    /// Accepted, not started.
    Pending,
    /// In progress.
    Running,
    /// Finished, with or without an error.
    Done,
}

/// A zone operation as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// Operation name, to read it again.
    pub name: String,
    /// Zone of the operation.
    pub zone: String,
    /// Where it stands.
    pub status: OperationStatus,
    /// The error it finished with, if any.
    pub error: Option<ComputeError>,
}

impl Operation {
    /// Whether the operation finished without error.
    pub fn succeeded(&self) -> bool {
        self.status == OperationStatus::Done && self.error.is_none()
    }
}

/// What one aggregated list saw: the VMs, and the zones it could not see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Every VM that matched, across every zone that answered.
    pub instances: Vec<Instance>,
    /// Zones Compute Engine reported as unreachable: a VM missing from
    /// `instances` in one of these zones may still exist.
    pub unreachable: std::collections::BTreeSet<String>,
    /// Pages read.
    pub pages: u32,
}

/// The cloud calls the reconcilers make, and nothing else. Every call
/// returns at once: mutations return the operation to follow, never wait
/// for it.
pub trait Compute: Send + Sync + 'static {
    /// Starts creating a VM.
    fn insert(&self, spec: &InstanceSpec) -> impl Future<Output = Result<Operation, ComputeError>> + Send;

    /// Starts deleting a VM.
    fn delete(
        &self,
        zone: &str,
        name: &str,
        request_id: &str,
    ) -> impl Future<Output = Result<Operation, ComputeError>> + Send;

    /// Reads a VM; `Ok(None)` when it does not exist.
    fn get(&self, zone: &str, name: &str) -> impl Future<Output = Result<Option<Instance>, ComputeError>> + Send;

    /// Lists every VM, across all zones, that carries all of `labels`,
    /// reading every page, and names the zones that could not be listed.
    fn list_by_labels(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Listing, ComputeError>> + Send;

    /// Reads a zone operation. An operation Compute Engine no longer knows
    /// is an error with code [`ErrorCode::OperationVanished`].
    fn get_operation(&self, zone: &str, name: &str) -> impl Future<Output = Result<Operation, ComputeError>> + Send;

    /// Starts replacing a VM's labels; fails with
    /// [`ErrorCode::ConditionNotMet`] when `fingerprint` is not the VM's
    /// current label fingerprint.
    fn set_labels(
        &self,
        zone: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        fingerprint: &str,
        request_id: &str,
    ) -> impl Future<Output = Result<Operation, ComputeError>> + Send;
}
