//! Where VMs reach the agent API: the replica that leads writes its own
//! address into the EndpointSlice of the agent Service.
//!
//! The agent Service has no selector, so Kubernetes keeps no endpoints for
//! it; this one EndpointSlice (`<service>-leader`, owned by the Service) is
//! its only one, and it names the leader alone. A new leader overwrites it
//! in one write, a leader that stops empties it before it gives the Lease
//! up, and a leader cut off from the API server cannot keep it: the
//! replica that takes over rewrites it. Readiness is therefore free to mean
//! "this replica works", standby or not, so rolling updates and
//! PodDisruptionBudgets count both replicas.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde_json::json;

use crate::leader::Fence;

/// How often the leader writes its EndpointSlice again (a no-op when
/// nothing changed), so a slice edited by hand, deleted, or overwritten by
/// a late write of a former leader is put back within this.
const REPUBLISH: Duration = Duration::from_secs(5);

/// Wait before trying again after a failed write.
const RETRY: Duration = Duration::from_secs(2);

/// Label Kubernetes reads to join an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label that keeps Kubernetes' own EndpointSlice controllers away.
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Who manages the slice, in [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "testrun-controller.testrun.dev";

/// Name of the port in the slice; the agent Service's port has this name.
pub const PORT_NAME: &str = "agent";

/// The EndpointSlice API in `version` (`v1` or `v1beta1`).
fn slice_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"),
        "endpointslices",
    )
}

/// This replica's place in the agent Service.
#[derive(Clone, Debug)]
pub struct AgentEndpoint {
    /// Namespace of the Service (the controller's own).
    pub namespace: String,
    /// Name of the agent Service.
    pub service: String,
    /// This replica's address (its pod IP).
    pub address: IpAddr,
    /// Port the agent API listens on.
    pub port: u16,
    /// This replica's pod, named in the slice when known.
    pub pod: Option<String>,
    /// The node it runs on, named in the slice when known (load
    /// balancers with a `Local` traffic policy route by it).
    pub node: Option<String>,
    /// Writes happen only while this process may lead.
    pub fence: Arc<Fence>,
    /// Set once a `discovery.k8s.io/v1beta1` write succeeded where `v1`
    /// is not served (Kubernetes 1.20); cleared when v1beta1 is not
    /// served either.
    pub beta: Arc<AtomicBool>,
}

/// Why the slice could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The Service is missing or cannot be read.
    #[error("reading the agent Service {namespace}/{service}: {source}")]
    Service {
        /// Namespace.
        namespace: String,
        /// Name.
        service: String,
        /// The API error.
        source: kube::Error,
    },
    /// The write was refused.
    #[error("writing EndpointSlice {namespace}/{slice}: {source}")]
    Write {
        /// Namespace.
        namespace: String,
        /// Name of the slice.
        slice: String,
        /// The API error.
        source: kube::Error,
    },
    /// The leader Lease lapsed: nothing is written.
    #[error("not writing EndpointSlice {0}: this replica no longer holds the leader Lease")]
    NotLeading(String),
}

impl AgentEndpoint {
    /// Name of the slice: the Service's name and `-leader`.
    pub fn slice_name(&self) -> String {
        format!("{}-leader", self.service)
    }

    /// The slice as this replica writes it in API `version` (`v1`, or
    /// `v1beta1`, which knows only the `ready` condition): naming it, or
    /// (when `serving` is false) empty.
    pub fn slice(&self, version: &str, service_uid: &str, serving: bool) -> serde_json::Value {
        let address_type = if self.address.is_ipv4() { "IPv4" } else { "IPv6" };
        let endpoints = if serving {
            let conditions = if version == "v1" {
                json!({ "ready": true, "serving": true, "terminating": false })
            } else {
                json!({ "ready": true })
            };
            let mut endpoint = json!({ "addresses": [self.address.to_string()], "conditions": conditions });
            if let Some(node) = &self.node {
                if version == "v1" {
                    endpoint["nodeName"] = json!(node);
                } else {
                    endpoint["topology"] = json!({ "kubernetes.io/hostname": node });
                }
            }
            if let Some(pod) = &self.pod {
                endpoint["targetRef"] = json!({ "kind": "Pod", "namespace": self.namespace, "name": pod });
            }
            vec![endpoint]
        } else {
            Vec::new()
        };
        json!({
            "apiVersion": format!("discovery.k8s.io/{version}"),
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.slice_name(),
                "namespace": self.namespace,
                "labels": { SERVICE_NAME_LABEL: self.service, MANAGED_BY_LABEL: MANAGED_BY },
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": self.service,
                    "uid": service_uid,
                    "blockOwnerDeletion": false,
                }],
            },
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": [{ "name": PORT_NAME, "port": self.port, "protocol": "TCP" }],
        })
    }

    /// Writes the slice naming this replica, then again every 5 s, for as
    /// long as the process runs (the runtime's end stops it). `first` is
    /// told when the first write succeeded: VMs can reach this replica.
    pub async fn keep_published(self, client: Client, first: tokio::sync::oneshot::Sender<()>) {
        let mut failing = false;
        let mut first = Some(first);
        loop {
            let wait = match self.write(&client, true).await {
                Ok(()) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                    if failing {
                        tracing::info!(slice = %self.slice_name(), "agent EndpointSlice written");
                    } else {
                        tracing::debug!(slice = %self.slice_name(), "agent EndpointSlice written");
                    }
                    failing = false;
                    REPUBLISH
                }
                Err(e) => {
                    tracing::warn!(error = %e, "VMs cannot reach this leader until its EndpointSlice is written");
                    failing = true;
                    RETRY
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Empties the slice, so no VM is sent to a replica that stopped; only
    /// while this process still holds the leader Lease, so a new leader's
    /// slice is never emptied.
    pub async fn withdraw(&self, client: &Client) {
        match tokio::time::timeout(RETRY, self.write(client, false)).await {
            Ok(Ok(())) => tracing::info!(slice = %self.slice_name(), "emptied the agent EndpointSlice"),
            Ok(Err(e)) => tracing::warn!(error = %e, "emptying the agent EndpointSlice"),
            Err(_) => tracing::warn!(slice = %self.slice_name(), "emptying the agent EndpointSlice timed out"),
        }
    }

    async fn write(&self, client: &Client, serving: bool) -> Result<(), EndpointError> {
        let services: Api<Service> = Api::namespaced(client.clone(), &self.namespace);
        let service = services.get(&self.service).await.map_err(|source| EndpointError::Service {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            source,
        })?;
        let uid = service.meta().uid.clone().unwrap_or_default();
        if !self.fence.holds() {
            return Err(EndpointError::NotLeading(self.slice_name()));
        }
        let params = PatchParams::apply(crate::controller::FIELD_MANAGER).force();
        let mut version = if self.beta.load(Ordering::Relaxed) { "v1beta1" } else { "v1" };
        loop {
            let slices: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &self.namespace, &slice_resource(version));
            let slice = self.slice(version, &uid, serving);
            match slices.patch(&self.slice_name(), &params, &Patch::Apply(slice)).await {
                Ok(_) => {
                    self.beta.store(version == "v1beta1", Ordering::Relaxed);
                    return Ok(());
                }
                // An apply creates what is missing, so a 404 means the API
                // server does not serve this version: try the other once.
                Err(kube::Error::Api(status))
                    if status.code == 404 && version == "v1" && !self.beta.load(Ordering::Relaxed) =>
                {
                    version = "v1beta1";
                }
                Err(kube::Error::Api(status))
                    if status.code == 404 && version == "v1beta1" && self.beta.load(Ordering::Relaxed) =>
                {
                    self.beta.store(false, Ordering::Relaxed);
                    version = "v1";
                }
                Err(source) => {
                    return Err(EndpointError::Write {
                        namespace: self.namespace.clone(),
                        slice: self.slice_name(),
                        source,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use super::*;

    fn endpoint(address: &str) -> AgentEndpoint {
        AgentEndpoint {
            namespace: "ci".into(),
            service: "tc-agent".into(),
            address: address.parse().expect("address"),
            port: 8090,
            pod: Some("tc-0".into()),
            node: Some("node-a".into()),
            fence: Fence::open(),
            beta: Arc::default(),
        }
    }

    #[test]
    fn the_slice_names_the_leader_for_its_service() {
        let slice: EndpointSlice =
            serde_json::from_value(endpoint("10.0.0.7").slice("v1", "uid-1", true)).expect("slice");
        assert_eq!(slice.metadata.name.as_deref(), Some("tc-agent-leader"));
        let labels = slice.metadata.labels.expect("labels");
        assert_eq!(labels[SERVICE_NAME_LABEL], "tc-agent");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints.len(), 1);
        assert_eq!(slice.endpoints[0].addresses, vec!["10.0.0.7".to_string()]);
        assert_eq!(slice.endpoints[0].target_ref.as_ref().and_then(|r| r.name.as_deref()), Some("tc-0"));
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("node-a"));
        let ports = slice.ports.expect("ports");
        assert_eq!((ports[0].name.as_deref(), ports[0].port), (Some(PORT_NAME), Some(8090)));
        let owner = &slice.metadata.owner_references.expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("Service", "tc-agent", "uid-1"));
    }

    #[test]
    fn an_ipv6_leader_gets_an_ipv6_slice_and_a_withdrawn_one_names_nobody() {
        let slice: EndpointSlice =
            serde_json::from_value(endpoint("fd00::7").slice("v1", "uid-1", false)).expect("slice");
        assert_eq!(slice.address_type, "IPv6");
        assert!(slice.endpoints.is_empty());
    }

    #[test]
    fn a_v1beta1_slice_carries_only_the_ready_condition() {
        let slice = endpoint("10.0.0.7").slice("v1beta1", "uid-1", true);
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1beta1");
        assert_eq!(slice["endpoints"][0]["conditions"], json!({ "ready": true }));
        assert_eq!(slice["endpoints"][0]["topology"]["kubernetes.io/hostname"], "node-a");
    }
}
