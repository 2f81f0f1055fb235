//! The controller's Kubernetes client against the real kube-apiserver: it
//! speaks HTTP/2, so every request and watch shares one connection.

mod common;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tower::ServiceExt;

async fn config() -> kube::Config {
    let kubeconfig = Kubeconfig::read_from(common::control_plane_kubeconfig()).expect("reading the kubeconfig");
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config")
}

#[tokio::test]
async fn the_client_speaks_http2_to_the_api_server() {
    let config = config().await;
    let service = testrun_controller::kube_client::service(&config).expect("service");
    let request = http::Request::get("/version").body(kube::client::Body::empty()).expect("request");
    let response = service.oneshot(request).await.expect("GET /version");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2, "ALPN should settle on h2");
}

#[tokio::test]
async fn the_client_authenticates_and_serves_kube_apis() {
    let client = testrun_controller::kube_client::client(config().await).expect("client");
    let namespaces: Api<Namespace> = Api::all(client);
    let default = namespaces.get("default").await.expect("reading a namespace as the admin user");
    assert_eq!(default.metadata.name.as_deref(), Some("default"));
    let listed = namespaces.list(&ListParams::default().limit(1)).await.expect("listing");
    assert_eq!(listed.items.len(), 1);
}
