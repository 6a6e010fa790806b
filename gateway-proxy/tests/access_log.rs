//! The access log over real sockets: one valid JSON line per request with its fields,
//! whatever the client sends; a blocked writer drops and counts lines, and requests do
//! not wait for it; a reopened file gets the next lines.
#![expect(clippy::unwrap_used, reason = "tests")]

mod support;

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::metrics::Metrics;
use gateway_core::test_util::TestUpstream;
use gateway_core::{Body, BoxError};
use gateway_middleware::access_log::{AccessLog, AccessLogLayer, LogFormat, QueryLog};
use gateway_middleware::request_id::SetRequestIdLayer;
use gateway_middleware::trace_context::TraceContextLayer;
use gateway_proxy::{ReverseProxy, Route, Router, Upstream};
use http::{Request, Response};
use serde_json::Value;
use support::{Gateway, body_of, fetch, get, raw, request, status, within};
use tower::{Service, ServiceBuilder};

/// What the writer has been given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn json(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// A router with `api` (to `upstream`, with request ids and trace context) and `slow`
/// (to an upstream that never answers, with a short header timeout), logging to `log`.
fn gateway_app(
    log: &AccessLog,
    upstream: &TestUpstream,
    hung: &TestUpstream,
) -> impl Service<
    Request<Body>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static>,
    Error = BoxError,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let api = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new())
        .layer(TraceContextLayer::new())
        .service(ReverseProxy::to(&upstream.url()).unwrap());
    let slow = ReverseProxy::builder(Upstream::single(&hung.url()).unwrap())
        .response_header_timeout(Some(Duration::from_millis(200)))
        .build()
        .unwrap();
    let router = Router::new()
        .route(Route::prefix("/api").id("api"), api)
        .route(Route::prefix("/slow").id("slow"), slow);
    ServiceBuilder::new()
        .layer(AccessLogLayer::new(log))
        .service(router)
}

#[tokio::test]
async fn every_request_gets_one_json_line_with_its_fields() {
    let upstream = TestUpstream::echo().await;
    let hung = TestUpstream::hang().await;
    let out = Captured::default();
    let log = AccessLog::builder()
        .writer(out.clone())
        .query(QueryLog::Redact)
        .start()
        .unwrap();
    let gw = Gateway::start(gateway_app(&log, &upstream, &hung)).await;

    let ok = fetch(
        gw.addr,
        request(
            "POST",
            "/api/items?token=secret&page=2",
            &[
                ("user-agent", "curl/8.5"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ],
        )
        .map(|_| Bytes::from_static(b"hello")),
    )
    .await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.body().as_ref(), b"hello");
    let missing = raw(gw.addr, &get("/nowhere", "")).await;
    assert_eq!(status(&missing), 404);
    let timed_out = raw(gw.addr, &get("/slow", "")).await;
    assert_eq!(status(&timed_out), 504);
    // Quotes, a backslash, control and non-UTF-8 bytes where a client controls the text.
    let hostile = gateway_core::test_util::raw::exchange(
        gw.addr,
        b"GET /api/a%22b HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\
          User-Agent: evil\" \\ \t\xff\xfe\",\"status\":1\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let hostile = String::from_utf8_lossy(&hostile);
    assert_eq!(status(&hostile), 200, "{hostile}");
    assert!(log.flush(Duration::from_secs(5)));

    let lines = out.json();
    assert_eq!(lines.len(), 4, "{:?}", out.lines());
    let post = &lines[0];
    assert_eq!(post["method"], "POST");
    assert_eq!(post["host"], "gw");
    assert_eq!(post["path"], "/api/items");
    assert_eq!(post["query"], "token=REDACTED&page=REDACTED");
    assert_eq!(post["status"], 200);
    assert_eq!(post["bytes_in"], 5);
    assert_eq!(post["bytes_out"], 5);
    assert_eq!(post["route"], "api");
    assert_eq!(post["client_ip"], "127.0.0.1");
    assert_eq!(post["user_agent"], "curl/8.5");
    assert_eq!(post["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        post["request_id"].as_str().unwrap(),
        ok.headers()["x-request-id"].to_str().unwrap()
    );
    assert_eq!(
        post["upstream"],
        upstream.url().trim_start_matches("http://")
    );
    assert_eq!(post["upstream_attempts"], 1);
    assert!(post["upstream_ms"].as_f64().unwrap() <= post["duration_ms"].as_f64().unwrap());
    assert!(post.get("error").is_none() && post.get("aborted").is_none());
    assert!(post["time"].as_str().unwrap().ends_with('Z'));
    assert!(!out.lines()[0].contains("secret"));

    let missing = &lines[1];
    assert_eq!(
        (missing["status"].as_u64(), missing["route"].as_str()),
        (Some(404), None)
    );
    assert_eq!(missing["error"], "not_found");

    let slow = &lines[2];
    assert_eq!(slow["status"], 504);
    assert_eq!(slow["route"], "slow");
    assert_eq!(slow["error"], "gateway_timeout");
    assert_eq!(slow["upstream"], hung.url().trim_start_matches("http://"));
    assert!(slow["upstream_ms"].as_f64().unwrap() >= 200.0);

    let hostile = &lines[3];
    assert_eq!(hostile["path"], "/api/a%22b");
    assert_eq!(
        hostile["status"], 200,
        "the injected status stays in its string"
    );
    assert_eq!(
        hostile["user_agent"],
        "evil\" \\ \t\u{fffd}\u{fffd}\",\"status\":1"
    );
    assert_eq!(log.dropped(), 0);
}

#[tokio::test]
async fn a_client_that_leaves_mid_response_is_logged_as_aborted() {
    let upstream = TestUpstream::streaming(64 * 1024 * 1024).await;
    let hung = TestUpstream::hang().await;
    let out = Captured::default();
    let log = AccessLog::builder().writer(out.clone()).start().unwrap();
    let gw = Gateway::start(gateway_app(&log, &upstream, &hung)).await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        stream
            .write_all(get("/api/big", "").as_bytes())
            .await
            .unwrap();
        let mut first = [0; 1024];
        within("the first bytes", stream.read(&mut first))
            .await
            .unwrap();
    }
    support::eventually("the line", || {
        log.flush(Duration::from_secs(1));
        !out.lines().is_empty()
    })
    .await;
    let line = &out.json()[0];
    assert_eq!(line["status"], 200);
    assert_eq!(line["aborted"], true);
    assert!(line["bytes_out"].as_u64().unwrap() < 64 * 1024 * 1024);
}

/// A writer that blocks in its first write until released, saying when it got there.
struct Blocked {
    entered: Option<mpsc::Sender<()>>,
    release: mpsc::Receiver<()>,
    out: Captured,
}

impl Write for Blocked {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(entered) = self.entered.take() {
            entered.send(()).unwrap();
            self.release.recv().unwrap();
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_blocked_writer_drops_and_counts_lines_and_requests_do_not_wait() {
    let upstream = TestUpstream::echo().await;
    let hung = TestUpstream::hang().await;
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let out = Captured::default();
    let metrics = Metrics::new();
    let log = AccessLog::builder()
        .writer(Blocked {
            entered: Some(entered_tx),
            release: release_rx,
            out: out.clone(),
        })
        .capacity(4)
        .metrics(&metrics)
        .start()
        .unwrap();
    let gw = Gateway::start(gateway_app(&log, &upstream, &hung)).await;

    // The first line takes the writer into its blocked write.
    assert_eq!(status(&raw(gw.addr, &get("/api/first", "")).await), 200);
    entered.recv_timeout(Duration::from_secs(5)).unwrap();
    // 50 more: 4 wait in the queue, 46 are dropped, and every request is answered.
    within(
        "50 requests while the writer is stuck",
        Box::pin(async {
            for i in 0..50 {
                let res = raw(gw.addr, &get(&format!("/api/{i}"), "")).await;
                assert_eq!(status(&res), 200);
                assert_eq!(body_of(&res), "");
            }
        }),
    )
    .await;
    assert_eq!(log.dropped(), 46);
    let scraped = metrics.encode(gateway_core::metrics::Format::Prometheus);
    assert!(
        scraped.contains("gateway_access_log_dropped_lines_total 46"),
        "{scraped}"
    );

    release.send(()).unwrap();
    assert!(log.flush(Duration::from_secs(5)));
    let paths: Vec<String> = out
        .json()
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        paths,
        ["/api/first", "/api/0", "/api/1", "/api/2", "/api/3"]
    );
}

#[tokio::test]
async fn a_reopened_file_gets_the_next_lines() {
    let upstream = TestUpstream::echo().await;
    let hung = TestUpstream::hang().await;
    let dir = std::env::temp_dir().join(format!("gateway-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let _ = std::fs::remove_file(&path);
    let log = AccessLog::builder()
        .file(&path)
        .format(LogFormat::Combined)
        .query(QueryLog::Keep)
        .start()
        .unwrap();
    let gw = Gateway::start(gateway_app(&log, &upstream, &hung)).await;

    raw(
        gw.addr,
        &get(
            "/api/before?x=1",
            "Referer: https://ref.example/\"x\r\nUser-Agent: ua/1\r\n",
        ),
    )
    .await;
    assert!(log.flush(Duration::from_secs(5)));
    std::fs::rename(&path, &rotated).unwrap();
    log.reopen();
    raw(gw.addr, &get("/api/after", "")).await;
    assert!(log.flush(Duration::from_secs(5)));

    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&path).unwrap();
    let line = old.trim_end();
    assert!(
        line.starts_with("127.0.0.1 - - ["),
        "combined format: {line}"
    );
    assert!(
        line.ends_with(
            "\"GET /api/before?x=1 HTTP/1.1\" 200 - \"https://ref.example/\\x22x\" \"ua/1\""
        ),
        "{line}"
    );
    assert_eq!(old.lines().count(), 1);
    assert_eq!(new.lines().count(), 1);
    assert!(new.contains("\"GET /api/after HTTP/1.1\" 200 -"), "{new}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct LogLines(Arc<Mutex<Vec<u8>>>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        Captured(Arc::clone(&self.0))
    }
}

/// The lines logged while `requests` are sent to a gateway of `layer` around a route `api`
/// to a dead upstream (whose address is returned with them).
async fn logged_failures<L, S, B>(layer: L) -> (String, std::net::SocketAddr)
where
    L: tower::Layer<Router, Service = S>,
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let dead = gateway_core::test_util::refused_addr().await;
    let lines = LogLines::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(lines.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // NOTE: a current-thread runtime: the gateway's tasks run on this thread, under this
    // subscriber.
    let _default = tracing::subscriber::set_default(subscriber);
    let router = Router::new().route(
        Route::prefix("/api").id("api"),
        ReverseProxy::to(&format!("http://{dead}")).unwrap(),
    );
    let gw = Gateway::start(layer.layer(router)).await;
    assert_eq!(
        status(&raw(gw.addr, &get("/api/orders?id=7", "")).await),
        502
    );
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    (text, dead)
}

fn failure_line(text: &str) -> &str {
    text.lines()
        .find(|l| l.contains("request failed"))
        .unwrap_or_else(|| panic!("no failure logged: {text}"))
}

#[tokio::test]
async fn a_failed_request_is_logged_with_its_method_path_route_and_upstream() {
    // Without a span: the router's line says it all.
    let (text, dead) = logged_failures(tower::layer::util::Identity::new()).await;
    let failed = failure_line(&text);
    assert!(
        failed.contains(&format!(
            "method=GET path=/api/orders route=api upstream={dead} status=502"
        )),
        "{failed}"
    );
    assert!(
        !failed.contains("id=7"),
        "the query stays out of logs: {failed}"
    );

    // With a span, it is named too (and so is everything else logged meanwhile).
    let spans = gateway_middleware::request_span::RequestSpanLayer::new();
    let (text, dead) = logged_failures(spans).await;
    let failed = failure_line(&text);
    assert!(
        failed.contains(&format!(
            "request{{method=GET path=/api/orders route=api upstream={dead} status=502}}"
        )) || failed.contains(&format!(
            "request{{method=GET path=/api/orders route=api upstream={dead}}}"
        )),
        "{failed}"
    );

    // The same span made by the observing layer, without a layer of its own.
    let observe = gateway_middleware::observe::ObserveLayer::new()
        .request_span(gateway_middleware::request_span::RequestSpanLayer::new());
    let (text, dead) = logged_failures(observe).await;
    let failed = failure_line(&text);
    assert!(
        failed.contains(&format!(
            "request{{method=GET path=/api/orders route=api upstream={dead}}}"
        )),
        "{failed}"
    );

    // Spans for sampled traces only: none for a request without a trace.
    let spans = gateway_middleware::request_span::RequestSpanLayer::new().sampled_only();
    let (text, _) = logged_failures(spans).await;
    assert!(!failure_line(&text).contains("request{"), "{text}");
}

/// Auth layers inside the access log report the consumer, the method and why a credential
/// was refused, and never the credential.
#[tokio::test]
async fn the_consumer_and_auth_outcome_reach_the_log() {
    use gateway_core::Identity;
    use gateway_middleware::auth::{Acl, AclLayer, ApiKeys, AuthLayer, KeyAuth};
    let upstream = TestUpstream::echo().await;
    let out = Captured::default();
    let log = AccessLog::builder().writer(out.clone()).start().unwrap();
    let keys = ApiKeys::new()
        .consumer(
            Identity::consumer("alice").with_groups(["admins"]),
            ["alice-key-0123456789"],
        )
        .consumer(Identity::consumer("bob"), ["bob-key-0123456789"]);
    let api = ServiceBuilder::new()
        .layer(AuthLayer::new(KeyAuth::new(keys)).anonymous(Identity::anonymous_as("guest")))
        .layer(AclLayer::new(
            Acl::deny(["banned"]).and_allow(["admins", "nobody"]),
        ))
        .service(ReverseProxy::to(&upstream.url()).unwrap());
    let app = ServiceBuilder::new()
        .layer(AccessLogLayer::new(&log))
        .service(Router::new().route(Route::prefix("/").id("api"), api));
    let gw = Gateway::start(app).await;
    for key in [
        "alice-key-0123456789",
        "wrong-key-0123456789",
        "bob-key-0123456789",
    ] {
        fetch(gw.addr, request("GET", "/", &[("x-api-key", key)])).await;
    }
    fetch(gw.addr, request("GET", "/", &[])).await;
    assert!(log.flush(Duration::from_secs(5)));
    let lines = out.json();
    assert_eq!(lines.len(), 4, "{:?}", out.lines());
    let field = |i: usize, name: &str| lines[i][name].as_str().map(str::to_owned);
    assert_eq!(
        (
            lines[0]["status"].as_u64(),
            field(0, "consumer"),
            field(0, "auth")
        ),
        (Some(200), Some("alice".into()), Some("key-auth".into()))
    );
    assert_eq!(
        (lines[1]["status"].as_u64(), field(1, "auth_error")),
        (Some(401), Some("unknown_key".into()))
    );
    assert_eq!(field(1, "consumer"), None);
    assert_eq!(
        (
            lines[2]["status"].as_u64(),
            field(2, "consumer"),
            field(2, "acl")
        ),
        (Some(403), Some("bob".into()), Some("denied".into()))
    );
    assert_eq!(
        (field(3, "consumer"), field(3, "auth")),
        (Some("guest".into()), Some("anonymous".into()))
    );
    assert!(
        !out.lines().concat().contains("key-0123456789"),
        "no key in the log"
    );
}

/// A rate limit inside the access log says what it decided, and which limit refused.
#[tokio::test]
async fn the_rate_limit_decision_reaches_the_log() {
    use gateway_middleware::rate_limit::{Limit, Quota, RateLimitLayer};
    let upstream = TestUpstream::echo().await;
    let out = Captured::default();
    let log = AccessLog::builder().writer(out.clone()).start().unwrap();
    let api = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_ip(Quota::per_hour(100))
                .and(Limit::rate("burst", Quota::per_hour(100).burst(1))),
        )
        .service(ReverseProxy::to(&upstream.url()).unwrap());
    let app = ServiceBuilder::new()
        .layer(AccessLogLayer::new(&log))
        .service(Router::new().route(Route::prefix("/").id("api"), api));
    let gw = Gateway::start(app).await;
    for _ in 0..2 {
        fetch(gw.addr, request("GET", "/", &[])).await;
    }
    assert!(log.flush(Duration::from_secs(5)));
    let lines = out.json();
    assert_eq!(lines.len(), 2, "{:?}", out.lines());
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["rate_limit"], "allowed");
    assert_eq!(lines[0].get("rate_limit_policy"), None);
    assert_eq!(lines[1]["status"], 429);
    assert_eq!(lines[1]["rate_limit"], "limited");
    assert_eq!(lines[1]["rate_limit_policy"], "burst");
    assert_eq!(
        upstream.requests().len(),
        1,
        "the refused request never left"
    );
}
