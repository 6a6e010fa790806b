//! Metrics, the admin listener and readiness, over real sockets: scrapes are parsed as
//! Prometheus parses them, never matched as strings.
#![expect(clippy::unwrap_used, reason = "tests")]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use gateway_core::test_util::TestUpstream;
use gateway_proxy::admin::Inventory;
use gateway_proxy::server::Readiness;
use gateway_proxy::{ReverseProxy, Route, Router};
use prometheus_parse::{Scrape, Value};
use support::{eventually, fetch, observed, request, within};

/// Every sample of a scrape, by metric name and sorted labels.
#[derive(Debug)]
struct Samples(BTreeMap<(String, String), Value>);

impl Samples {
    async fn scrape(admin: SocketAddr, token: Option<&str>) -> Self {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let res = fetch(admin, request("GET", "/metrics", &headers)).await;
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        let text = String::from_utf8(res.into_body().to_vec()).unwrap();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let mut samples = BTreeMap::new();
        for s in scrape.samples {
            let labels: BTreeMap<_, _> = s.labels.iter().collect();
            let key = (s.metric.clone(), format!("{labels:?}"));
            assert!(
                samples.insert(key, s.value).is_none(),
                "a series appears twice: {}",
                s.metric
            );
        }
        Self(samples)
    }

    /// The value of a counter or gauge `metric` with exactly `labels`.
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let key = (
            metric.to_owned(),
            format!("{:?}", labels.iter().collect::<BTreeMap<_, _>>()),
        );
        match self.0.get(&key) {
            Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
            Some(other) => panic!("{metric} {labels:?} is {other:?}"),
            None => 0.0,
        }
    }

    /// The observation count of histogram `metric` with `labels`.
    fn histogram_count(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(&format!("{metric}_count"), labels)
    }

    fn series(&self) -> usize {
        self.0.len()
    }
}

/// The gateway of most tests here: route `api` (`/api`) to an echo upstream.
async fn api_gateway(token: Option<&str>) -> (support::Observed, TestUpstream) {
    let upstream = TestUpstream::echo().await;
    let router = Router::new().route(
        Route::prefix("/api").id("api"),
        ReverseProxy::to(&upstream.url()).unwrap(),
    );
    (observed(router, &Inventory::new(), token).await, upstream)
}

#[tokio::test]
async fn a_scrape_counts_exactly_the_requests_sent_by_route_and_class() {
    let (observed, _upstream) = api_gateway(None).await;
    let gw = observed.gateway.addr;
    // One request first, so every series exists before the baseline.
    fetch(gw, request("GET", "/api/warm", &[])).await;
    fetch(gw, request("GET", "/nowhere", &[])).await;
    let before = Samples::scrape(observed.admin, None).await;

    for i in 0..7 {
        let res = fetch(gw, request("GET", &format!("/api/items/{i}"), &[])).await;
        assert_eq!(res.status(), 200);
    }
    for _ in 0..3 {
        let res = fetch(gw, request("GET", "/nowhere", &[])).await;
        assert_eq!(res.status(), 404);
    }
    let after = Samples::scrape(observed.admin, None).await;

    let delta = |metric: &str, labels: &[(&str, &str)]| {
        after.value(metric, labels) - before.value(metric, labels)
    };
    let api_2xx = [("route", "api"), ("method", "GET"), ("status_class", "2xx")];
    let none_4xx = [("route", "-"), ("method", "GET"), ("status_class", "4xx")];
    assert_eq!(delta("gateway_http_requests_total", &api_2xx), 7.0);
    assert_eq!(delta("gateway_http_requests_total", &none_4xx), 3.0);
    assert_eq!(
        after.histogram_count("gateway_http_request_duration_seconds", &[("route", "api")])
            - before.histogram_count("gateway_http_request_duration_seconds", &[("route", "api")]),
        7.0
    );
    // The echo upstream answers with the (empty) request body: the 404 bodies are ours.
    assert!(delta("gateway_http_response_body_bytes_total", &[("route", "-")]) > 0.0);
    let listener = observed.gateway.addr.to_string();
    assert_eq!(
        delta(
            "gateway_connections_accepted_total",
            &[("listener", listener.as_str())]
        ),
        10.0
    );
    assert_eq!(after.value("gateway_http_requests_in_flight", &[]), 0.0);
}

#[tokio::test]
async fn upstream_attempts_and_endpoint_states_show_an_ejected_endpoint() {
    let (observed, backend) = support::gateway_with_an_ejected_endpoint().await;
    let samples = Samples::scrape(observed.admin, None).await;
    let (live_url, dead_url) = (backend.live_url.as_str(), backend.dead_url.as_str());
    fn at(endpoint: &str) -> [(&str, &str); 2] {
        [("upstream", "backend"), ("endpoint", endpoint)]
    }
    let ejected = |e: &str| samples.value("gateway_upstream_endpoint_ejected", &at(e));
    assert_eq!(ejected(dead_url), 1.0, "{samples:?}");
    assert_eq!(ejected(live_url), 0.0);
    assert_eq!(
        samples.value("gateway_upstream_endpoint_healthy", &at(live_url)),
        1.0
    );
    let attempts = |e: &str, outcome: &str| {
        samples.value(
            "gateway_upstream_attempts_total",
            &[
                ("upstream", "backend"),
                ("endpoint", e),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(
        attempts(dead_url, "retryable"),
        1.0,
        "one refused connection"
    );
    // Four requests, all answered by the live endpoint: the refused one went on to it.
    assert_eq!(attempts(live_url, "success"), 4.0);
    assert_eq!(
        samples.histogram_count(
            "gateway_upstream_response_duration_seconds",
            &[("upstream", "backend")]
        ),
        5.0
    );

    // `/status` says the same, in JSON.
    let res = fetch(observed.admin, request("GET", "/status", &[])).await;
    assert_eq!(res.status(), 200);
    let status: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
    let endpoints = status["upstreams"][0]["endpoints"].as_array().unwrap();
    let state_of = |url: &str| {
        endpoints
            .iter()
            .find(|e| e["url"] == url)
            .map(|e| e["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state_of(dead_url).as_deref(), Some("ejected"));
    assert_eq!(state_of(live_url).as_deref(), Some("healthy"));
    assert_eq!(status["routes"][0]["id"], "all");
    assert_eq!(status["routes"][0]["upstream"], "backend");
}

#[tokio::test]
async fn ten_thousand_random_paths_add_no_series() {
    let (observed, _upstream) = api_gateway(None).await;
    let gw = observed.gateway.addr;
    fetch(gw, request("GET", "/api/warm", &[])).await;
    fetch(gw, request("GET", "/warm", &[])).await;
    let before = Samples::scrape(observed.admin, None).await;

    // Over a few keep-alive connections: distinct paths, hosts and odd methods under
    // both the route and no route.
    let mut tasks = Vec::new();
    for conn in 0..4u32 {
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(gw).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(c);
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(conn);
            for i in 0..2_500u32 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let path = if i % 2 == 0 {
                    format!("/api/{seed:x}/{i}")
                } else {
                    format!("/{seed:x}?q={i}")
                };
                let req = http::Request::get(path)
                    .header("host", format!("h{seed:x}.example"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                sender.ready().await.unwrap();
                let res = sender.send_request(req).await.unwrap();
                http_body_util::BodyExt::collect(res.into_body())
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        within("10,000 requests", task).await.unwrap();
    }
    let after = Samples::scrape(observed.admin, None).await;
    assert_eq!(after.series(), before.series());
    let sent = after.value(
        "gateway_http_requests_total",
        &[("route", "api"), ("method", "GET"), ("status_class", "2xx")],
    ) - before.value(
        "gateway_http_requests_total",
        &[("route", "api"), ("method", "GET"), ("status_class", "2xx")],
    );
    assert_eq!(sent, 5_000.0);
}

#[tokio::test]
async fn the_token_is_required_on_every_admin_path_and_admin_is_not_public() {
    let (observed, _upstream) = api_gateway(Some("s3cret")).await;
    for path in ["/metrics", "/healthz", "/readyz", "/status", "/", "/nope"] {
        for auth in [
            None,
            Some("Bearer wrong!"),
            Some("Bearer s3cre"),
            Some("s3cret"),
            // admin:wrong, admin (no password), admin:s3cretX, not base64
            Some("Basic YWRtaW46d3Jvbmc="),
            Some("Basic YWRtaW4="),
            Some("Basic YWRtaW46czNjcmV0WA=="),
            Some("Basic !!!"),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
            let res = fetch(observed.admin, request("GET", path, &headers)).await;
            assert_eq!(res.status(), 401, "{path} with {auth:?}");
            // Tools send the bearer token; a browser asks for Basic credentials.
            assert_eq!(
                res.headers()["www-authenticate"],
                r#"Bearer realm="gateway-admin", Basic realm="gateway-admin", charset="UTF-8""#
            );
            assert_eq!(res.headers()["content-type"], "application/problem+json");
        }
    }
    let ok = [("authorization", "Bearer s3cret")];
    // admin:s3cret, and any user name with the token as the password.
    let basic = [("authorization", "Basic YWRtaW46czNjcmV0")];
    let basic_other = [("authorization", "Basic b3BzOnMzY3JldA==")];
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/status",
        "/",
        "/ui/status.js",
        "/ui/status.css",
    ] {
        for auth in [&ok, &basic, &basic_other] {
            let res = fetch(observed.admin, request("GET", path, auth)).await;
            assert_eq!(res.status(), 200, "{path} {auth:?}");
        }
    }
    // The page keeps to itself.
    let page = fetch(observed.admin, request("GET", "/", &ok)).await;
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"));
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let res = fetch(observed.admin, request("POST", "/metrics", &ok)).await;
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "GET, HEAD");
    // OpenMetrics when asked for.
    let res = fetch(
        observed.admin,
        request(
            "GET",
            "/metrics",
            &[
                ok[0],
                ("accept", "application/openmetrics-text;version=1.0.0"),
            ],
        ),
    )
    .await;
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(res.body().ends_with(b"# EOF\n"));

    // The public listener routes; it has no admin paths, token or not.
    for path in ["/metrics", "/status", "/readyz"] {
        let res = fetch(observed.gateway.addr, request("GET", path, &ok)).await;
        assert_eq!(res.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn readyz_is_503_while_draining() {
    let slow = TestUpstream::slow(Duration::from_millis(800)).await;
    let router = Router::new().route(
        Route::prefix("/").id("slow"),
        ReverseProxy::to(&slow.url()).unwrap(),
    );
    let inventory = Inventory::new();
    let mut observed = observed(router, &inventory, None).await;
    let admin = observed.admin;
    let readyz = || async move { fetch(admin, request("GET", "/readyz", &[])).await };
    eventually_ready(&observed.readiness).await;
    let res = readyz().await;
    assert_eq!(
        (res.status().as_u16(), &res.body()[..]),
        (200, &b"ready\n"[..])
    );

    let gw = observed.gateway.addr;
    let in_flight = tokio::spawn(async move { fetch(gw, request("GET", "/x", &[])).await });
    eventually("the request reaches the upstream", || {
        !slow.requests().is_empty()
    })
    .await;
    let server = observed.gateway.shutdown();
    eventually("the server drains", || observed.readiness.is_draining()).await;
    let res = readyz().await;
    assert_eq!(
        (res.status().as_u16(), &res.body()[..]),
        (503, &b"draining\n"[..])
    );
    // The request in flight still gets its answer.
    assert_eq!(
        within("the drained request", in_flight)
            .await
            .unwrap()
            .status(),
        200
    );
    within("the server stops", server).await.unwrap().unwrap();
}

async fn eventually_ready(readiness: &Readiness) {
    eventually("the server serves", || readiness.is_ready()).await;
}
