//! A gateway on `127.0.0.1:0` with the edge stack, for the end-to-end tests.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]
#![expect(
    clippy::unwrap_used,
    reason = "set-up helpers panic on failure, like the tests"
)]

pub mod redis;
pub mod scripted;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gateway_core::client_ip::{SetClientIpLayer, TrustedProxies};
use gateway_core::metrics::Metrics;
use gateway_core::test_util::TestUpstream;
use gateway_core::{BoxError, RescueLayer};
use gateway_middleware::metrics::HttpMetricsLayer;
use gateway_proxy::admin::{Admin, Inventory};
use gateway_proxy::server::Readiness;
use gateway_proxy::{ReverseProxy, Router, Server, Upstream};
use http::{Request, Response};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::{Service, ServiceBuilder};

pub struct Gateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    /// Serves `app` behind Rescue and ClientIp (trusting `trusted`), with `tune` applied to
    /// the server.
    pub async fn start_with<S, B>(
        app: S,
        trusted: TrustedProxies,
        tune: impl FnOnce(Server) -> Server,
    ) -> Self
    where
        S: Service<Request<gateway_core::Body>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        gateway_core::test_util::init_tracing();
        let listener = gateway_core::test_util::bind().await;
        let server = tune(Server::from_listener(listener));
        let addr = server.local_addr().unwrap();
        let svc = ServiceBuilder::new()
            .layer(RescueLayer::new())
            .layer(SetClientIpLayer::new(trusted))
            .service(app);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve_with_shutdown(svc, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn start<S, B>(app: S) -> Self
    where
        S: Service<Request<gateway_core::Body>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self::start_with(app, TrustedProxies::none(), |s| s).await
    }

    /// Starts a graceful shutdown and returns the server task.
    pub fn shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("shut down once")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A proxy to `upstream` with short timeouts for tests.
pub fn proxy_to(upstream: &TestUpstream) -> ReverseProxy {
    ReverseProxy::builder(Upstream::single(&upstream.url()).unwrap())
        .response_header_timeout(Some(Duration::from_secs(2)))
        .build()
        .unwrap()
}

/// Sends raw bytes and reads the whole answer (the test requests use `Connection: close`).
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    let out =
        gateway_core::test_util::raw::exchange(addr, request.as_bytes(), Duration::from_secs(3))
            .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of the first response in a raw answer (0 when there is none).
pub fn status(raw: &str) -> u16 {
    gateway_core::test_util::raw::statuses(raw.as_bytes())
        .first()
        .copied()
        .unwrap_or(0)
}

/// A GET with `Connection: close` and `extra` header lines.
pub fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{extra}\r\n")
}

pub fn body_of(raw: &str) -> &str {
    raw.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Waits until `done` holds, looking every 10 ms, for at most 5 s: the way a test waits for
/// something it cannot await, instead of sleeping for a guess.
///
/// # Panics
///
/// When it does not hold within 5 s, with `what`.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 5 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `fut`'s output, if it comes within 5 s: every read a test makes is bounded, so a server
/// that never answers fails the test instead of hanging it.
///
/// # Panics
///
/// When `fut` takes longer, with `what`.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("not within 5 s: {what}"))
}

/// Sends `req` (give it a `Host`) on a new connection with hyper's client, and returns the
/// response with its whole body, as sent (no content decoding).
pub async fn fetch(addr: SocketAddr, req: Request<Bytes>) -> Response<Bytes> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let res = sender
        .send_request(req.map(http_body_util::Full::new))
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

/// A request for [`fetch`]: `method path`, `Host: gw`, and `headers`.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gw");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Bytes::new()).unwrap()
}

/// A gateway with metrics at the edge, and its admin listener.
pub struct Observed {
    pub gateway: Gateway,
    pub admin: SocketAddr,
    pub readiness: Readiness,
    _stop_admin: oneshot::Sender<()>,
}

pub async fn observed(router: Router, inventory: &Inventory, token: Option<&str>) -> Observed {
    observed_with(Metrics::new(), router, inventory, token).await
}

/// [`observed`], reporting into `metrics`.
pub async fn observed_with(
    metrics: Metrics,
    router: Router,
    inventory: &Inventory,
    token: Option<&str>,
) -> Observed {
    inventory.register(&metrics);
    let readiness = Readiness::new();
    let app = ServiceBuilder::new()
        .layer(HttpMetricsLayer::new(&metrics))
        .service(router);
    let gateway = Gateway::start_with(app, gateway_core::client_ip::TrustedProxies::none(), |s| {
        s.metrics(&metrics).readiness(&readiness)
    })
    .await;
    let mut admin = Admin::builder(&metrics, inventory, &readiness);
    if let Some(token) = token {
        admin = admin.token(token);
    }
    let server = Server::from_listener(gateway_core::test_util::bind().await);
    let admin_addr = server.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve_with_shutdown(admin.build(), async {
        let _ = stopped.await;
    }));
    Observed {
        gateway,
        admin: admin_addr,
        readiness,
        _stop_admin: stop,
    }
}

/// The endpoints of [`gateway_with_an_ejected_endpoint`]'s upstream `backend`.
pub struct Backend {
    pub live_url: String,
    pub dead_url: String,
    _live: TestUpstream,
}

/// An observed gateway with route `all` (`/`) to upstream `backend`: a live endpoint and a
/// dead one, ejected after one failure (four requests have been sent), both in the
/// inventory the admin listener shows.
pub async fn gateway_with_an_ejected_endpoint() -> (Observed, Backend) {
    let live = TestUpstream::echo().await;
    let dead = gateway_core::test_util::refused_addr().await;
    let upstream = Upstream::builder(
        [
            live.url().parse().unwrap(),
            format!("http://{dead}").parse().unwrap(),
        ],
        gateway_proxy::upstream::RoundRobin::default(),
    )
    .outlier_detection(gateway_proxy::upstream::OutlierDetection::new(1).max_ejected_percent(50))
    .build();
    // And a route `orders` whose circuit breaker is open (its upstream refused the one
    // request it got).
    let metrics = Metrics::new();
    let breaker = gateway_middleware::circuit_breaker::CircuitBreakerLayer::new(
        "orders",
        gateway_middleware::circuit_breaker::Breaker::consecutive(1)
            .open_for(Duration::from_secs(60), Duration::from_secs(60)),
    )
    .metrics(&metrics);
    let orders = ReverseProxy::builder(Upstream::single(&format!("http://{dead}")).unwrap())
        .connect_retries(0)
        .build()
        .unwrap();
    let router = Router::new()
        .route(
            gateway_proxy::Route::prefix("/").id("all"),
            ReverseProxy::new(upstream.clone()),
        )
        .route(
            gateway_proxy::Route::prefix("/orders").id("orders"),
            ServiceBuilder::new()
                .layer(RescueLayer::new())
                .layer(breaker)
                .service(orders),
        );
    let inventory = Inventory::new();
    inventory.set_upstreams([("backend", upstream)]);
    inventory.set_routes(vec![
        gateway_proxy::admin::RouteInfo::new("all", "/*", "proxy to backend").upstream("backend"),
        gateway_proxy::admin::RouteInfo::new("orders", "/orders/*", "proxy to orders")
            .plugins(["circuit-breaker"]),
    ]);
    let observed = observed_with(metrics, router, &inventory, None).await;
    for _ in 0..4 {
        fetch(observed.gateway.addr, request("GET", "/x", &[])).await;
    }
    fetch(observed.gateway.addr, request("GET", "/orders", &[])).await;
    let backend = Backend {
        live_url: format!("http://{}", live.url().trim_start_matches("http://")),
        dead_url: format!("http://{dead}"),
        _live: live,
    };
    (observed, backend)
}

/// Builds the gateway `yaml` describes, with the built-in plugins registered and `metrics`
/// lent to them.
#[cfg(feature = "config")]
pub fn load_config(
    yaml: &str,
    metrics: Option<&Metrics>,
) -> Result<gateway_proxy::config::Gateway, gateway_proxy::config::ConfigError> {
    load_config_with(yaml, metrics, None)
}

/// [`load_config`], the caches it builds listed in `purgers`.
#[cfg(feature = "config")]
pub fn load_config_with(
    yaml: &str,
    metrics: Option<&Metrics>,
    purgers: Option<&gateway_core::purge::Purgers>,
) -> Result<gateway_proxy::config::Gateway, gateway_proxy::config::ConfigError> {
    use gateway_proxy::config;
    let mut registry = gateway_core::registry::Registry::new();
    if let Some(metrics) = metrics {
        registry.metrics(metrics);
    }
    if let Some(purgers) = purgers {
        registry.purgers(purgers);
    }
    gateway_middleware::config::register(&mut registry);
    let parsed = config::parse("gateway.yaml", yaml, |_| None, &registry)?;
    config::build("gateway.yaml", &parsed)
}

/// Serves the gateway `yaml` describes (see [`load_config`]).
#[cfg(feature = "config")]
pub async fn start_config(yaml: &str, metrics: Option<&Metrics>) -> Gateway {
    let built = load_config(yaml, metrics).unwrap_or_else(|e| panic!("{e}"));
    let trusted = built.trusted.clone();
    Gateway::start_with(built.router, trusted, |s| s).await
}
