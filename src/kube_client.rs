//! The Kubernetes client: kube's own layers (base URI, authentication,
//! impersonation headers) over a hyper client that speaks HTTP/2 whenever
//! the API server offers it.
//!
//! kube's default client is HTTP/1.1 only, so every request in flight holds
//! a TLS connection of its own: with dozens of reconciles writing at once
//! that is dozens of handshakes for the API server and tens of KiB of
//! buffers each for the controller. Over HTTP/2 all requests and watches
//! share one connection. A kubeconfig with a proxy keeps kube's client.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use tower::{BoxError, ServiceBuilder};

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No kubeconfig or in-cluster configuration was found or readable.
    #[error("reading the Kubernetes configuration: {0}")]
    Config(#[from] kube::config::InferConfigError),
    /// The configuration names credentials or TLS settings that do not work.
    #[error("setting up the Kubernetes client: {0}")]
    Setup(#[from] kube::Error),
    /// `tls-server-name` is not a valid DNS name or IP address.
    #[error("tls-server-name {0:?} is not a valid server name")]
    ServerName(String),
}

/// How often an idle HTTP/2 connection is pinged, so a dead one is noticed
/// (there is no per-request read timeout on a shared connection).
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// HTTP/2 connections the requests are spread over: kube-apiserver serves
/// the frames of one connection from one goroutine, so a single connection
/// would serialise a burst of writes.
const CONNECTIONS: usize = 4;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Hyper clients (each keeps its own connection) taken in turn.
#[derive(Clone)]
struct Spread {
    clients: Arc<[HyperClient<Https, kube::client::Body>]>,
    next: Arc<AtomicUsize>,
}

impl tower::Service<http::Request<kube::client::Body>> for Spread {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        // A legacy hyper client is always ready; its pool queues.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[turn].request(request)
    }
}

/// The HTTP service under the client: kube's layers over hyper.
pub type Service = tower::util::BoxCloneSyncService<
    http::Request<kube::client::Body>,
    http::Response<hyper::body::Incoming>,
    BoxError,
>;

/// Reads the configuration as kubectl does (in-cluster or kubeconfig) and
/// makes a client for it.
pub async fn connect() -> Result<kube::Client, ClientError> {
    client(kube::Config::infer().await?)
}

/// A client for `config`.
pub fn client(config: kube::Config) -> Result<kube::Client, ClientError> {
    if config.proxy_url.is_some() {
        // kube's builder knows HTTP CONNECT and SOCKS proxies.
        return Ok(kube::Client::try_from(config)?);
    }
    let namespace = config.default_namespace.clone();
    Ok(kube::Client::new(service(&config)?, namespace))
}

/// The HTTP service for `config`, HTTP/2 when the server agrees (ALPN), else
/// HTTP/1.1.
pub fn service(config: &kube::Config) -> Result<Service, ClientError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    http.set_nodelay(true);
    let mut tls =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config.rustls_client_config()?).https_or_http();
    if let Some(name) = &config.tls_server_name {
        let server = name.clone().try_into().map_err(|_| ClientError::ServerName(name.clone()))?;
        tls = tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(server));
    }
    let https = tls.enable_all_versions().wrap_connector(http);
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            HyperClient::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .http2_keep_alive_interval(KEEP_ALIVE)
                .http2_keep_alive_while_idle(true)
                .build(https.clone())
        })
        .collect();
    let hyper = Spread { clients: clients.into(), next: Arc::new(AtomicUsize::new(0)) };
    let stack = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(tower::util::BoxCloneSyncService::new(stack))
}
