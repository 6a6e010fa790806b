//! Per-request cost and allocations of the pieces on the hot path, each around an
//! always-ready inner service.
//!
//! `cargo bench -p gateway-benches --bench hot_path`

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::IpAddr;

use divan::AllocProfiler;
use gateway_benches::{ok_service, ready};
use gateway_core::client_ip::TrustedProxies;
use gateway_core::{Body, Flow, Plugin, PluginLayer, RescueLayer};
use gateway_middleware::body_limit::BodyLimitLayer;
use gateway_middleware::compression::CompressionLayer;
use gateway_middleware::cors::CorsLayer;
use gateway_middleware::headers::{EditHeadersLayer, Edits};
use gateway_middleware::ip_filter::IpFilterLayer;
use gateway_middleware::request_id::SetRequestIdLayer;
use gateway_middleware::trace_context::TraceContextLayer;
use gateway_proxy::upstream::{
    ConsistentHash, Endpoint, HashKey, LeastRequest, PeakEwma, Random, RoundRobin,
};
use gateway_proxy::{Route, Router, Upstream};
use http::{HeaderMap, HeaderValue, Request, Response, request};
use tower::{Layer, Service, ServiceExt, service_fn};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

fn request(path: &str) -> Request<Body> {
    Request::get(path)
        .header("host", "gw.example")
        .body(Body::empty())
        .expect("valid request")
}

/// A plugin whose hooks do a little real work, as a small plugin would.
struct HeaderPlugin;

impl Plugin for HeaderPlugin {
    type Ctx = bool;
    const NAME: &'static str = "bench";

    fn new_ctx(&self) -> bool {
        false
    }

    async fn on_request(
        &self,
        req: &mut request::Parts,
        ctx: &mut bool,
    ) -> Result<Flow, gateway_core::Error> {
        *ctx = req.headers.contains_key("host");
        Ok(Flow::Continue)
    }

    async fn on_response(
        &self,
        res: &mut http::response::Parts,
        ctx: &mut bool,
    ) -> Result<(), gateway_core::Error> {
        if *ctx {
            res.headers
                .insert("x-plugin", HeaderValue::from_static("1"));
        }
        Ok(())
    }
}

#[divan::bench]
fn inner_service_alone(b: divan::Bencher<'_, '_>) {
    let svc = ok_service();
    b.with_inputs(|| request("/"))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench]
fn plugin_adapter(b: divan::Bencher<'_, '_>) {
    let svc = PluginLayer::new(HeaderPlugin).layer(ok_service());
    b.with_inputs(|| request("/"))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench]
fn request_id_new(b: divan::Bencher<'_, '_>) {
    let svc = SetRequestIdLayer::new().layer(ok_service());
    b.with_inputs(|| request("/"))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench]
fn request_id_kept(b: divan::Bencher<'_, '_>) {
    let svc = SetRequestIdLayer::new().layer(ok_service());
    b.with_inputs(|| {
        let mut req = request("/");
        req.headers_mut().insert(
            "x-request-id",
            HeaderValue::from_static("0f8fad5b-d9cb-469f-a165-70867728950e"),
        );
        req
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench(args = ["continued", "started"])]
fn trace_context(b: divan::Bencher<'_, '_>, how: &str) {
    let svc = TraceContextLayer::new().layer(ok_service());
    let continued = how == "continued";
    b.with_inputs(|| {
        let mut req = request("/");
        if continued {
            req.headers_mut().insert(
                "traceparent",
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
        }
        req
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// A route's answer (a 5-byte body, the route's id in its extensions): what the
/// observing layers below see; each of them is measured against this.
fn named_route()
-> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    let route = gateway_core::RouteId::new("api");
    service_fn(move |_: Request<Body>| {
        let mut res = Response::new(Body::from("hello"));
        res.extensions_mut().insert(route.clone());
        std::future::ready(Ok::<_, Infallible>(res))
    })
}

/// The like-for-like baseline of the observing layers: the route's answer, its body
/// drained.
#[divan::bench]
fn named_route_alone(b: divan::Bencher<'_, '_>) {
    let svc = named_route();
    b.with_inputs(|| request("/")).bench_local_values(|req| {
        let res = ready(svc.clone().oneshot(req)).expect("infallible");
        drain(res.into_body())
    });
}

/// The edge metrics of one request to a named route: counted, timed and its body bytes
/// summed, the response body drained to its end (where the recording happens).
#[divan::bench]
fn http_metrics(b: divan::Bencher<'_, '_>) {
    let metrics = gateway_core::metrics::Metrics::new();
    let svc = gateway_middleware::metrics::HttpMetricsLayer::new(&metrics).layer(named_route());
    b.with_inputs(|| request("/")).bench_local_values(|req| {
        let res = ready(svc.clone().oneshot(req)).expect("infallible");
        drain(res.into_body())
    });
}

/// An access-log line, formatted and queued (the writer thread writes to nowhere).
#[divan::bench(args = ["json", "combined"])]
fn access_log(b: divan::Bencher<'_, '_>, format: &str) {
    use gateway_middleware::access_log::{AccessLog, AccessLogLayer, LogFormat};
    let log = AccessLog::builder()
        .writer(std::io::sink())
        .format(if format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Combined
        })
        .capacity(1 << 20)
        .start()
        .expect("a thread");
    let svc = AccessLogLayer::new(&log).layer(named_route());
    b.with_inputs(|| {
        let mut req = request("/api/orders?page=2");
        req.headers_mut()
            .insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
        req
    })
    .bench_local_values(|req| {
        let res = ready(svc.clone().oneshot(req)).expect("infallible");
        drain(res.into_body())
    });
    log.flush(std::time::Duration::from_secs(10));
}

/// A subscriber that formats spans and writes events at `info` (to nowhere), as this
/// thread's default until the guard drops.
fn info_subscriber() -> tracing::subscriber::DefaultGuard {
    tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    )
}

/// A `request` span per request, under a subscriber that formats spans and writes events
/// (to nowhere): what a gateway logging at `info` pays.
#[divan::bench]
fn request_span(b: divan::Bencher<'_, '_>) {
    let _subscriber = info_subscriber();
    let svc = gateway_middleware::request_span::RequestSpanLayer::new().layer(named_route());
    b.with_inputs(|| request("/api/orders"))
        .bench_local_values(|req| {
            let res = ready(svc.clone().oneshot(req)).expect("infallible");
            drain(res.into_body())
        });
}

/// OTLP export on the request path, behind a started trace (`trace_context`'s `started` is
/// its baseline): `sampled`, a span recorded and queued for the exporter task (on a
/// runtime thread of its own, encoding batches for a client that answers at once);
/// `unsampled`, the extension lookup that lets the request pass.
#[divan::bench(args = ["sampled", "unsampled"])]
fn otlp_span(b: divan::Bencher<'_, '_>, sampling: &str) {
    use gateway_middleware::otlp::{OtlpExporter, OtlpLayer};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let _entered = runtime.enter();
    let collector = service_fn(|_: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::empty())))
    });
    let exporter = OtlpExporter::builder("http://127.0.0.1:4318/v1/traces".parse().expect("a URI"))
        .capacity(1 << 16)
        .start(collector)
        .expect("a runtime");
    let ratio = if sampling == "sampled" { 1.0 } else { 0.0 };
    let svc = tower::ServiceBuilder::new()
        .layer(TraceContextLayer::new().sample_ratio(ratio))
        .layer(OtlpLayer::new(&exporter))
        .service(named_route());
    b.with_inputs(|| {
        let mut req = request("/api/orders");
        req.headers_mut()
            .insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
        req
    })
    .bench_local_values(|req| {
        let res = ready(svc.clone().oneshot(req)).expect("infallible");
        drain(res.into_body())
    });
}

/// The example gateway's observing edge: trace context, one observing layer for metrics
/// and the access log, and the request span, against `named_route_alone`.
#[divan::bench]
fn observability_all(b: divan::Bencher<'_, '_>) {
    use gateway_middleware::access_log::AccessLog;
    let _subscriber = info_subscriber();
    let metrics = gateway_core::metrics::Metrics::new();
    let log = AccessLog::builder()
        .writer(std::io::sink())
        .capacity(1 << 20)
        .start()
        .expect("a thread");
    let svc = tower::ServiceBuilder::new()
        .layer(TraceContextLayer::new())
        .layer(
            gateway_middleware::observe::ObserveLayer::new()
                .metrics(&metrics)
                .access_log(&log),
        )
        .layer(gateway_middleware::request_span::RequestSpanLayer::new())
        .service(named_route());
    b.with_inputs(|| request("/api/orders"))
        .bench_local_values(|req| {
            let res = ready(svc.clone().oneshot(req)).expect("infallible");
            drain(res.into_body())
        });
    log.flush(std::time::Duration::from_secs(10));
}

#[divan::bench]
fn body_limit_check(b: divan::Bencher<'_, '_>) {
    let svc = BodyLimitLayer::new(1 << 20).layer(ok_service());
    b.with_inputs(|| request("/"))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench]
fn ip_filter_ten_rules(b: divan::Bencher<'_, '_>) {
    let mut filter = IpFilterLayer::new();
    for i in 0..10u8 {
        filter = filter.allow(format!("10.{i}.0.0/16").parse().expect("a CIDR"));
    }
    let svc = filter.layer(ok_service());
    b.with_inputs(|| {
        let mut req = request("/");
        req.extensions_mut().insert(gateway_core::ClientIp::new(
            IpAddr::from([10, 9, 1, 1]),
            false,
        ));
        req
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin("https://app.example.com".parse().expect("an origin"))
        .allow_origin("https://*.example.org".parse().expect("an origin"))
        .allow_credentials(true)
}

#[divan::bench]
fn cors_allowed_request(b: divan::Bencher<'_, '_>) {
    let svc = cors().layer(ok_service());
    b.with_inputs(|| {
        let mut req = request("/");
        req.headers_mut().insert(
            "origin",
            HeaderValue::from_static("https://shop.example.org"),
        );
        req
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench]
fn cors_preflight(b: divan::Bencher<'_, '_>) {
    let svc = cors().layer(ok_service());
    b.with_inputs(|| {
        let mut req = request("/");
        *req.method_mut() = http::Method::OPTIONS;
        let h = req.headers_mut();
        h.insert(
            "origin",
            HeaderValue::from_static("https://app.example.com"),
        );
        h.insert(
            "access-control-request-method",
            HeaderValue::from_static("PUT"),
        );
        req
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench]
fn header_edits_two_each_way(b: divan::Bencher<'_, '_>) {
    let layer = EditHeadersLayer::new()
        .request(Edits::new().remove(http::header::COOKIE).set(
            http::HeaderName::from_static("x-env"),
            HeaderValue::from_static("prod"),
        ))
        .response(Edits::new().remove(http::header::SERVER).set(
            http::header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000"),
        ));
    let svc = layer.layer(ok_service());
    b.with_inputs(|| request("/"))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// The text a compression bench serves: `len` bytes of English-ish prose.
fn prose(len: usize) -> bytes::Bytes {
    let text = "the quick brown fox jumps over the lazy dog; ".repeat(len / 45 + 1);
    bytes::Bytes::copy_from_slice(&text.as_bytes()[..len])
}

/// Reads a body to its end (every frame must be ready at once) and returns its length.
fn drain<B: http_body::Body>(body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    let mut len = 0;
    while let Some(frame) = ready(body.frame()) {
        if let Ok(data) = frame.expect("a frame").into_data() {
            len += bytes::Buf::remaining(&data);
        }
    }
    len
}

/// The cost of the layer on a response it leaves alone (too small), the common case.
#[divan::bench]
fn compression_skips_small(b: divan::Bencher<'_, '_>) {
    let body = prose(200);
    let svc = CompressionLayer::new().layer(service_fn(move |_: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::from(body.clone()))))
    }));
    b.with_inputs(|| {
        let mut req = request("/");
        req.headers_mut().insert(
            "accept-encoding",
            HeaderValue::from_static("gzip, br, zstd"),
        );
        req
    })
    .bench_local_values(|req| {
        drain(
            ready(svc.clone().oneshot(req))
                .expect("infallible")
                .into_body(),
        )
    });
}

/// Compressing a 16 KiB response at the default level, by algorithm.
#[divan::bench(args = ["gzip", "br", "zstd"])]
fn compression_16k(b: divan::Bencher<'_, '_>, encoding: &'static str) {
    let body = prose(16 * 1024);
    let svc = CompressionLayer::new().layer(service_fn(move |_: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::from(body.clone()))))
    }));
    b.with_inputs(|| {
        let mut req = request("/");
        req.headers_mut()
            .insert("accept-encoding", HeaderValue::from_static(encoding));
        req
    })
    .bench_local_values(|req| {
        drain(
            ready(svc.clone().oneshot(req))
                .expect("infallible")
                .into_body(),
        )
    });
}

#[divan::bench]
fn rescue(b: divan::Bencher<'_, '_>) {
    let svc = RescueLayer::new().layer(ok_service());
    b.with_inputs(|| request("/"))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

#[divan::bench]
fn client_ip_trusted_chain(b: divan::Bencher<'_, '_>) {
    let trusted = TrustedProxies::builder()
        .cidr("10.0.0.0/8")
        .build()
        .expect("valid CIDR");
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.7, 203.0.113.9, 10.1.2.3"),
    );
    let peer: IpAddr = "10.0.0.1".parse().expect("valid IP");
    b.bench_local(|| trusted.resolve(divan::black_box(peer), divan::black_box(&headers)));
}

fn router(routes: usize) -> Router {
    let mut router = Router::new();
    for i in 0..routes {
        router = router.route(Route::prefix(format!("/svc{i}/api")), ok_service());
    }
    router.route(Route::exact("/health"), ok_service())
}

#[divan::bench(args = [1, 1000])]
fn router_match(b: divan::Bencher<'_, '_>, routes: usize) {
    let router = router(routes);
    let path = format!("/svc{}/api/users/42", routes / 2);
    b.with_inputs(|| request(&path))
        .bench_local_values(|req| ready(router.clone().oneshot(req)));
}

#[divan::bench]
fn router_normalizes_a_hostile_path(b: divan::Bencher<'_, '_>) {
    let router = router(10);
    b.with_inputs(|| request("/svc9/./x/../api//users/%34%32"))
        .bench_local_values(|req| ready(router.clone().oneshot(req)));
}

fn ten_endpoints() -> impl Iterator<Item = Endpoint> {
    (0..10).map(|i| {
        format!("10.0.0.{i}:8080")
            .parse::<Endpoint>()
            .expect("valid endpoint")
            .with_weight(std::num::NonZeroU32::new(i + 1).expect("i + 1 is not 0"))
    })
}

/// `Upstream::select` (balancer pick + in-flight accounting) over 10 weighted endpoints.
#[divan::bench(args = ["round-robin", "random", "least-request", "peak-ewma", "hash-header"])]
fn balancer_pick_10(b: divan::Bencher<'_, '_>, balancer: &str) {
    let upstream = match balancer {
        "round-robin" => Upstream::new(ten_endpoints(), RoundRobin::default()),
        "random" => Upstream::new(ten_endpoints(), Random::default()),
        "least-request" => Upstream::new(ten_endpoints(), LeastRequest::default()),
        "peak-ewma" => Upstream::new(ten_endpoints(), PeakEwma::default()),
        _ => Upstream::new(
            ten_endpoints(),
            ConsistentHash::new(HashKey::Header(http::header::HeaderName::from_static(
                "x-user",
            ))),
        ),
    };
    let (parts, ()) = Request::get("/")
        .header("x-user", "user-1234")
        .body(())
        .expect("valid request")
        .into_parts();
    b.bench_local(|| upstream.select(divan::black_box(&parts)).map(drop));
}

/// A browser-like request from an untrusted peer, as the proxy receives it.
fn client_request() -> Request<Body> {
    let mut req = Request::get("/api/users/42?expand=orders")
        .header("host", "gw.example")
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
        )
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, deflate, br")
        .header("accept-language", "en-GB,en;q=0.5")
        .header(
            "authorization",
            "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl",
        )
        .header("cookie", "session=4f2a9c; theme=dark")
        .header("connection", "keep-alive")
        .header("x-forwarded-for", "203.0.113.66")
        .header("x-request-id", "0f8fad5b-d9cb-469f-a165-70867728950e")
        .body(Body::empty())
        .expect("valid request");
    req.extensions_mut().insert(gateway_core::ConnectInfo {
        peer: "198.51.100.7:50432".parse().expect("valid address"),
        local: "10.0.0.2:8080".parse().expect("valid address"),
        tls: false,
    });
    req
}

/// `ReverseProxy::call` up to the point where the upstream exchange would start: the
/// header rules (hop-by-hop stripping, forwarding scrubbed and set, `Host`), the balancer
/// pick and the response future, then dropping it unsent. No connection is made.
#[divan::bench]
fn proxy_request_rewrite(b: divan::Bencher<'_, '_>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let proxy = gateway_proxy::ReverseProxy::new(
        Upstream::single("http://10.0.0.1:8080").expect("valid upstream"),
    );
    b.with_inputs(client_request)
        .bench_local_values(|req| proxy.clone().call(req));
}
