//! The agent Service as VMs see it: a Service without a selector in the
//! real kube-apiserver, and a TCP proxy that forwards each connection to
//! the endpoint its EndpointSlices name, as kube-proxy does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// A selectorless Service and the proxy in front of its endpoints.
pub struct ServiceProxy {
    /// Port the proxy listens on (127.0.0.1).
    pub port: u16,
    target: Arc<Mutex<Option<(String, u16)>>>,
}

impl ServiceProxy {
    /// Creates Service `name` (port `agent`, no selector) in `namespace`
    /// and follows its EndpointSlices every 100 ms.
    pub async fn start(client: &Client, namespace: &str, name: &str) -> Self {
        let services: Api<Service> = Api::namespaced(client.clone(), namespace);
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service", "metadata": { "name": name },
            "spec": { "ports": [{ "name": "agent", "port": 8090 }] }
        }))
        .expect("Service");
        services.create(&PostParams::default(), &service).await.expect("creating the agent Service");
        Self::follow(client, namespace, name).await
    }

    /// Follows the EndpointSlices of an existing Service `name`.
    pub async fn follow(client: &Client, namespace: &str, name: &str) -> Self {
        let target = Arc::new(Mutex::new(None));
        let following = target.clone();
        // discovery.k8s.io/v1 where served, else v1beta1 (Kubernetes 1.20).
        let api = |version: &str| -> Api<DynamicObject> {
            let gvk = GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice");
            Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk_with_plural(&gvk, "endpointslices"))
        };
        let selector = format!("kubernetes.io/service-name={name}");
        let params = ListParams::default().labels(&selector);
        let slices = match api("v1").list(&params).await {
            Err(kube::Error::Api(status)) if status.code == 404 => api("v1beta1"),
            _ => api("v1"),
        };
        tokio::spawn(async move {
            loop {
                if let Ok(list) = slices.list(&params).await {
                    *following.lock().expect("target") = first_ready(&list.items);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let routing = target.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                let Some(backend) = routing.lock().expect("target").clone() else {
                    continue; // dropped: the Service has no endpoint
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect((backend.0.as_str(), backend.1)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { port, target }
    }

    /// Where connections go now: address and port, or None.
    pub fn target(&self) -> Option<(String, u16)> {
        self.target.lock().expect("target").clone()
    }

    /// The proxy's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until connections go to `port` (None: nowhere).
    pub async fn wait_for_target(&self, port: Option<u16>, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.target().map(|(_, p)| p) != port {
            assert!(std::time::Instant::now() < deadline, "{what}: the Service routes to {:?}", self.target());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The first ready endpoint of the slices, with the slice's `agent` port.
fn first_ready(slices: &[DynamicObject]) -> Option<(String, u16)> {
    slices.iter().find_map(|slice| {
        let port = slice.data["ports"].as_array()?.iter().find(|p| p["name"] == "agent")?["port"].as_u64()?;
        let endpoint = slice.data["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["conditions"]["ready"] != serde_json::json!(false))?;
        Some((endpoint["addresses"][0].as_str()?.to_string(), u16::try_from(port).ok()?))
    })
}
