//! The declarative config: a file loads, builds and routes as it says, and every kind of
//! mistake is reported with its file, line, column and key path.
#![cfg(feature = "config")]

mod support;

use gateway_core::registry::Registry;
use gateway_core::test_util::TestUpstream;
use gateway_core::{Error, Flow, Plugin};
use gateway_proxy::config::{self, ConfigError};
use http::request;
use serde::Deserialize;
use support::{Gateway, raw, status};

/// A plugin of the test's own, registered as `tag`: sets `x-tag` on requests.
struct Tag(http::HeaderValue);

impl Plugin for Tag {
    type Ctx = ();
    const NAME: &'static str = "tag";
    fn new_ctx(&self) {}
    async fn on_request(&self, req: &mut request::Parts, (): &mut ()) -> Result<Flow, Error> {
        req.headers.insert("x-tag", self.0.clone());
        Ok(Flow::Continue)
    }
}

/// `tag`'s config section.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagConfig {
    value: String,
}

/// A plugin with state: numbers the responses of its route (`x-count`), from `start`.
struct Count(std::sync::atomic::AtomicU64);

impl Plugin for Count {
    type Ctx = ();
    const NAME: &'static str = "count";
    fn new_ctx(&self) {}
    async fn on_response(&self, res: &mut http::response::Parts, (): &mut ()) -> Result<(), Error> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        res.headers.insert("x-count", n.into());
        Ok(())
    }
}

/// `count`'s config section.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountConfig {
    start: u64,
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry.plugin("tag", |c: &TagConfig| Ok(Tag(c.value.parse()?)));
    registry.plugin("count", |c: &CountConfig| {
        Ok(Count(std::sync::atomic::AtomicU64::new(c.start)))
    });
    gateway_middleware::config::register(&mut registry);
    registry
}

fn parse(yaml: &str) -> Result<config::Config, ConfigError> {
    let env = |name: &str| (name == "API_URL").then(|| "http://127.0.0.1:1".to_owned());
    config::parse("gateway.yaml", yaml, env, &registry())
}

/// Parses and builds (inside the test's runtime: upstreams start their checks).
fn load(yaml: &str) -> Result<config::Gateway, ConfigError> {
    config::build("gateway.yaml", &parse(yaml)?)
}

async fn start(yaml: &str) -> Gateway {
    let built = load(yaml).unwrap_or_else(|e| panic!("{e}"));
    let trusted = built.trusted.clone();
    Gateway::start_with(built.router, trusted, |s| s).await
}

/// The example of the config issue, plugins and all: `/api` and `/api/...` go to the
/// upstream with a request id, `/apiadmin` does not, bodies over 1 MiB get 413, `/old`
/// redirects.
#[tokio::test]
async fn the_example_routes_as_its_comments_say() {
    let a = TestUpstream::echo().await;
    let b = TestUpstream::echo().await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  api:
    endpoints: [{}, {}]
    balancer: least-request
routes:
  - match: {{ path: /api }}               # /api and /api/..., never /apiadmin
    upstream: api
    plugins:
      - request-id: {{}}
      - body-limit: {{ max: 1MiB }}         # larger bodies get 413
  - match: {{ path: /old }}
    redirect: {{ to: /api, status: 308 }}
",
        a.url(),
        b.url()
    );
    let gw = start(&yaml).await;
    for path in ["/api", "/api/", "/api/users/7"] {
        let res = raw(gw.addr, &support::get(path, "")).await;
        assert_eq!(status(&res), 200, "{path}: {res}");
    }
    let seen: Vec<String> = a
        .requests()
        .into_iter()
        .chain(b.requests())
        .map(|r| r.uri.to_string())
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for path in ["/apiadmin", "/", "/ap"] {
        let res = raw(gw.addr, &support::get(path, "")).await;
        assert_eq!(status(&res), 404, "{path}: {res}");
    }
    let res = raw(gw.addr, &support::get("/old/x", "")).await;
    assert_eq!(status(&res), 308, "{res}");
    assert!(
        res.to_ascii_lowercase().contains("\r\nlocation: /api\r\n"),
        "{res}"
    );
    // The request id: made here, seen by the upstream, returned to the client.
    let res = raw(gw.addr, &support::get("/api/id", "")).await;
    let id = res
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no request id: {res}"));
    assert_eq!(id.len(), 32, "{res}");
    let seen = a
        .requests()
        .into_iter()
        .chain(b.requests())
        .find(|r| r.uri == "/api/id");
    assert_eq!(
        seen.and_then(|r| r.header("x-request-id").map(str::to_owned))
            .as_deref(),
        Some(id)
    );
    // A body announced over 1 MiB is refused before the upstream hears of it.
    let big = "POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1048577\r\nConnection: close\r\n\r\n";
    let res = raw(gw.addr, big).await;
    assert_eq!(status(&res), 413, "{res}");
    assert!(res.contains("application/problem+json"), "{res}");
    assert_eq!(a.requests().len() + b.requests().len(), 4);
}

/// The small layers from the file, with hostile input: a chunked body that grows past the
/// limit is cut with 413; a client's sane request id is kept, an insane one replaced.
#[tokio::test]
async fn built_in_layers_hold_against_hostile_input() {
    let up = TestUpstream::echo().await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  up: {{ endpoints: ['{}'] }}
routes:
  - match: {{ path: / }}
    upstream: up
    plugins:
      - request-id: {{ header: x-correlation-id }}
      - body-limit: {{ max: 1KiB }}
",
        up.url()
    );
    let gw = start(&yaml).await;
    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /in HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let res = raw(gw.addr, &chunked).await;
    assert_eq!(status(&res), 413, "{res}");
    let ok = format!(
        "POST /in HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    assert_eq!(status(&raw(gw.addr, &ok).await), 200);
    let res = raw(
        gw.addr,
        &support::get("/sane", "X-Correlation-Id: trace-42\r\n"),
    )
    .await;
    assert!(res.contains("x-correlation-id: trace-42\r\n"), "{res}");
    assert_eq!(
        up.last_request().header("x-correlation-id"),
        Some("trace-42")
    );
    let res = raw(
        gw.addr,
        &support::get("/insane", "X-Correlation-Id: <script>\r\n"),
    )
    .await;
    assert!(!res.contains("<script>"), "{res}");
    let replaced = up.last_request();
    assert_eq!(replaced.header("x-correlation-id").map(str::len), Some(32));
}

#[tokio::test]
async fn routes_match_hosts_methods_and_exact_paths_and_rewrite_prefixes() {
    let up = TestUpstream::echo().await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  up: {{ endpoints: ['{}'] }}
routes:
  - id: v1
    match: {{ host: api.example.com, path: /v1, methods: [get] }}
    upstream: up
    replace_prefix: {{ from: /v1, to: /internal/v1 }}
  - match: {{ exact: /ping }}
    respond: {{ status: 200, body: pong }}
  - match: {{ path: /strip }}
    upstream: up
    strip_prefix: /strip
",
        up.url()
    );
    let gw = start(&yaml).await;
    let res = raw(
        gw.addr,
        "GET /v1/a HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(up.last_request().uri, "/internal/v1/a");
    let res = raw(gw.addr, "POST /v1/a HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert_ne!(status(&res), 200, "POST is not matched: {res}");
    let res = raw(
        gw.addr,
        "GET /v1/a HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 404, "another host: {res}");
    let res = raw(gw.addr, &support::get("/ping", "")).await;
    assert_eq!(
        (status(&res), support::body_of(&res)),
        (200, "pong"),
        "{res}"
    );
    assert_eq!(
        status(&raw(gw.addr, &support::get("/ping/x", "")).await),
        404
    );
    let res = raw(gw.addr, &support::get("/strip/b?q=1", "")).await;
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(up.last_request().uri, "/b?q=1");
    assert_eq!(up.requests().len(), 2);
}

/// A registered plugin configured in the file runs in its route's stack, outermost first,
/// and only there.
#[tokio::test]
async fn registered_plugins_run_in_their_route() {
    let up = TestUpstream::echo().await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  up: {{ endpoints: ['{}'] }}
routes:
  - match: {{ path: /tagged }}
    upstream: up
    plugins:
      - tag: {{ value: outer }}
      - tag: {{ value: inner }}
  - match: {{ path: /plain }}
    upstream: up
",
        up.url()
    );
    let gw = start(&yaml).await;
    assert_eq!(
        status(&raw(gw.addr, &support::get("/tagged", "")).await),
        200
    );
    let seen = up.last_request();
    assert_eq!(
        seen.headers.get("x-tag").map(|v| v.as_bytes()),
        Some(&b"inner"[..])
    );
    assert_eq!(
        status(&raw(gw.addr, &support::get("/plain", "")).await),
        200
    );
    assert_eq!(up.last_request().headers.get("x-tag"), None);
}

#[test]
fn environment_variables_are_interpolated() {
    let yaml = "listen: ${PORT:-127.0.0.1:9}\nupstreams:\n  a: { endpoints: ['${API_URL}'] }\nroutes: []\n# $$ stays\n";
    let config = parse(yaml).unwrap();
    assert_eq!(config.listen, "127.0.0.1:9");
    assert_eq!(
        config.upstreams["a"].endpoints,
        [config::EndpointConfig::Url(config::Url(
            "http://127.0.0.1:1".into()
        ))]
    );
}

#[test]
fn durations_sizes_and_weights_are_read() {
    let yaml = "
listen: 127.0.0.1:0
server:
  keep_alive_timeout: 250ms
  max_header_bytes: 32KiB
  trusted_proxies: [10.0.0.0/8, 192.168.1.1]
upstreams:
  a:
    endpoints: [{ url: 'http://127.0.0.1:1', weight: 3 }, '127.0.0.1:2']
    outlier_detection: off
    health_check: { path: /healthz, interval: 5s }
routes: []
";
    let config = parse(yaml).unwrap();
    assert_eq!(
        config.server.keep_alive_timeout,
        Some(config::Period(std::time::Duration::from_millis(250)))
    );
    assert_eq!(
        config.server.max_header_bytes,
        Some(config::Size(32 * 1024))
    );
    let a = &config.upstreams["a"];
    assert!(
        matches!(a.endpoints[0], config::EndpointConfig::Weighted { weight, .. } if weight.get() == 3)
    );
    assert_eq!(a.outlier_detection, config::Outlier::Off);
}

/// A mistake: what it is, the file, where (line, column), the key path, and a word of the
/// message.
type Mistake = (
    &'static str,
    &'static str,
    (usize, usize),
    &'static str,
    &'static str,
);

/// Each kind of mistake: where (line, column), the key path, and a word of what.
#[tokio::test]
async fn mistakes_name_their_line_column_and_key_path() {
    let cases: &[Mistake] = &[
        (
            "unknown key",
            "listen: x\nroutes:\n  - match: { paht: /a }\n",
            (3, 14),
            "routes[0].match.paht",
            "unknown field",
        ),
        (
            "wrong type",
            "listen: x\nupstreams:\n  api:\n    endpoints: 5\nroutes: []\n",
            (4, 16),
            "upstreams.api.endpoints",
            "",
        ),
        (
            "duration without a unit",
            "listen: x\nserver:\n  keep_alive_timeout: 30\nroutes: []\n",
            (3, 23),
            "server.keep_alive_timeout",
            "",
        ),
        (
            "bad size",
            "listen: x\nserver:\n  max_header_bytes: lots\nroutes: []\n",
            (3, 21),
            "server.max_header_bytes",
            "not a size",
        ),
        (
            "bad CIDR",
            "listen: x\nserver:\n  trusted_proxies: [10.0.0.0/8, 10.0.0.0/33]\nroutes: []\n",
            (3, 33),
            "server.trusted_proxies[1]",
            "not a CIDR",
        ),
        (
            "bad URL",
            "listen: x\nupstreams:\n  api:\n    endpoints: ['ftp://x:1']\nroutes: []\n",
            (4, 17),
            "upstreams.api.endpoints[0]",
            "ftp://x:1",
        ),
        (
            "a route naming a missing upstream",
            "listen: x\nupstreams:\n  api: { endpoints: ['127.0.0.1:1'] }\nroutes:\n  - match: { path: /a }\n    upstream: apj\n",
            (6, 15),
            "routes[0].upstream",
            "no upstream is named `apj`",
        ),
        (
            "a plugin nobody registered",
            "listen: x\nroutes:\n  - match: { path: /a }\n    respond: {}\n    plugins:\n      - tga: { value: x }\n",
            (6, 14),
            "routes[0].plugins[0].tga",
            "no plugin is named `tga` (registered: acl, auth, basic-auth, body-limit, cache, circuit-breaker, compression, concurrency-limit, cors, count, forward-auth, headers, ip-filter, jwt, key-auth, rate-limit, request-id, retry, tag, timeout)",
        ),
        (
            "a plugin's section with a mistake",
            "listen: x\nroutes:\n  - match: { path: /a }\n    respond: {}\n    plugins:\n      - tag: { valeu: x }\n",
            (6, 16),
            "routes[0].plugins[0].tag.valeu",
            "unknown field",
        ),
        (
            "a plugin's section its factory refuses",
            "listen: x\nroutes:\n  - match: { path: /a }\n    respond: {}\n    plugins:\n      - tag: { value: \"a\\nb\" }\n",
            (6, 9),
            "routes[0].plugins[0].tag",
            "failed to parse header value",
        ),
        (
            "an unset variable",
            "listen: x\nroutes: []\nupstreams:\n  a: { endpoints: ['${NOT_SET}'] }\n",
            (4, 21),
            "",
            "`NOT_SET` is not set",
        ),
        (
            "a route with two kinds of path (its own place: a build-time check)",
            "listen: x\nroutes:\n  - match: { path: /a, exact: /b }\n    respond: {}\n",
            (3, 5),
            "routes[0].match",
            "cannot go together",
        ),
        (
            "a route that duplicates another",
            "listen: x\nroutes:\n  - match: { path: /a }\n    respond: {}\n  - id: again\n    match: { path: /a }\n    respond: {}\n",
            (5, 5),
            "routes[1].match",
            "",
        ),
        (
            "an access log queue of nothing",
            "listen: x\nroutes: []\naccess_log: { to: stdout, queue: 0 }\n",
            (3, 34),
            "access_log.queue",
            "not between 1 and 1000000",
        ),
        (
            "an access log format nobody knows",
            "listen: x\nroutes: []\naccess_log:\n  format: xml\n",
            (4, 11),
            "access_log.format",
            "unknown variant",
        ),
        (
            "a sample ratio above 1",
            "listen: x\nroutes: []\ntracing: { sample_ratio: 1.5 }\n",
            (3, 26),
            "tracing.sample_ratio",
            "1.5 is not between 0 and 1",
        ),
        (
            "an OTLP endpoint that is not http",
            "listen: x\nroutes: []\ntracing:\n  otlp: { endpoint: 'grpc://c:4317' }\n",
            (4, 21),
            "tracing.otlp.endpoint",
            "is not an http:// or https:// URL",
        ),
        (
            "an OTLP header that is not one",
            "listen: x\nroutes: []\ntracing:\n  otlp:\n    endpoint: http://c:4318/v1/traces\n    headers: { 'a b': x }\n",
            (6, 14),
            "tracing.otlp.headers",
            "`a b` is not a header name",
        ),
        (
            "YAML syntax",
            "listen: x\nroutes: []\nserver: { drain_timeout: 1s\n",
            (3, 9),
            "server",
            "",
        ),
    ];
    for (what, yaml, at, path, says) in cases {
        let err = load(yaml).map(|_| ()).unwrap_err();
        assert_eq!(err.location(), Some(*at), "{what}: {err}");
        assert_eq!(err.path(), *path, "{what}: {err}");
        assert!(err.message().contains(says), "{what}: {err}");
        let text = err.to_string();
        let prefix = format!("gateway.yaml:{}:{}: ", at.0, at.1);
        assert!(text.starts_with(&prefix), "{what}: {text}");
    }
    // What the sections say of each other is checked once they are read, and named by
    // key path.
    let err = load(
        "listen: x\nroutes: []\ntracing:\n  trace_context: false\n  otlp: { endpoint: 'http://c:4318/v1/traces' }\n",
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(err.path(), "tracing.otlp", "{err}");
    assert!(
        err.message().contains("needs `trace_context: true`"),
        "{err}"
    );
}

/// A config file of the test's own: written, rewritten, and read by a [`config::Live`].
struct File(std::path::PathBuf);

impl File {
    fn new(name: &str, yaml: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gateway-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = Self(dir.join(name));
        file.write(yaml);
        file
    }

    fn write(&self, yaml: &str) {
        // Replaced whole, as editors and config maps do.
        let staged = self.0.with_extension("new");
        std::fs::write(&staged, yaml).unwrap_or_else(|e| panic!("{e}"));
        std::fs::rename(&staged, &self.0).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Serves `file` live, watched every 100 ms.
async fn start_live(file: &File) -> (Gateway, config::Live) {
    let (live, built) = config::Live::load(&file.0, registry()).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway::start_with(live.router(), built.trusted.clone(), |s| s).await;
    tokio::spawn(
        live.clone()
            .watch(Some(std::time::Duration::from_millis(100))),
    );
    (gw, live)
}

/// Waits (at most 2 s) for the reloads applied to reach `n`.
async fn applied(live: &config::Live, n: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while live.stats().applied < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not applied within 2 s: {:?}",
            live.stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A change to the file applies within 2 s; a request in flight finishes on the route it
/// started on, and a keep-alive connection opened before serves the new routes after.
#[tokio::test]
async fn a_reload_applies_without_dropping_requests_or_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = TestUpstream::echo().await;
    let slow = TestUpstream::slow(std::time::Duration::from_secs(1)).await;
    let v1 = format!(
        "
listen: 127.0.0.1:0
upstreams:
  up: {{ endpoints: ['{}'] }}
  slow: {{ endpoints: ['{}'] }}
routes:
  - {{ match: {{ path: /a }}, upstream: up }}
  - {{ match: {{ path: /slow }}, upstream: slow }}
",
        up.url(),
        slow.url()
    );
    let file = File::new("reload.yaml", &v1);
    let (gw, live) = start_live(&file).await;
    let mut kept = tokio::net::TcpStream::connect(gw.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ask = async |path: &str| {
        let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
        kept.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = vec![0u8; 4096];
        let n = support::within("a response", kept.read(&mut buf))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(ask("/a").await.starts_with("HTTP/1.1 200"));
    let addr = gw.addr;
    let in_flight = tokio::spawn(async move { raw(addr, &support::get("/slow", "")).await });
    support::eventually("the slow request is in flight", || {
        slow.requests().len() == 1
    })
    .await;

    let v2 = format!(
        "
listen: 127.0.0.1:0
upstreams:
  up: {{ endpoints: ['{}'] }}
routes:
  - {{ match: {{ path: /b }}, upstream: up }}
  - {{ match: {{ path: /slow }}, respond: {{ body: moved }} }}
",
        up.url()
    );
    file.write(&v2);
    applied(&live, 1).await;
    let res = in_flight.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (status(&res), support::body_of(&res)),
        (200, "slow"),
        "{res}"
    );
    assert!(
        ask("/b").await.starts_with("HTTP/1.1 200"),
        "the kept connection sees /b"
    );
    assert!(
        ask("/a").await.starts_with("HTTP/1.1 404"),
        "and no longer /a"
    );
    let res = raw(gw.addr, &support::get("/slow", "")).await;
    assert_eq!(support::body_of(&res), "moved");
    assert_eq!(live.stats().refused, 0);
}

/// An invalid new file changes nothing; the refusal is counted and kept, with its place.
#[tokio::test]
async fn an_invalid_reload_changes_nothing_and_is_reported() {
    let up = TestUpstream::echo().await;
    let good = format!(
        "listen: 127.0.0.1:0\nupstreams:\n  up: {{ endpoints: ['{}'] }}\nroutes:\n  - {{ match: {{ path: /a }}, upstream: up }}\n",
        up.url()
    );
    let file = File::new("invalid.yaml", &good);
    let (gw, live) = start_live(&file).await;
    file.write("listen: 127.0.0.1:0\nroutes:\n  - { match: { path: /a }, upstream: gone }\n");
    let err = live.reload().unwrap_err();
    assert_eq!(err.path(), "routes[0].upstream");
    let stats = live.stats();
    assert!(stats.refused >= 1 && stats.applied == 0, "{stats:?}");
    assert!(
        stats.last_error.is_some_and(|e| e.contains(":3:")),
        "with its place"
    );
    assert_eq!(status(&raw(gw.addr, &support::get("/a", "")).await), 200);
}

/// An upstream's state (an ejected endpoint, its running health checks) survives a reload
/// that changes something else, and starts over when its own config changes.
#[tokio::test]
async fn upstream_state_survives_unless_its_own_config_changes() {
    let up = TestUpstream::echo().await;
    let checked = TestUpstream::echo().await;
    let dead = gateway_core::test_util::refused_addr().await;
    let config = |other: &str, flaky_extra: &str| {
        format!(
            "
listen: 127.0.0.1:0
upstreams:
  flaky:
    endpoints: ['http://{dead}', '{up}']
    outlier_detection: {{ consecutive_failures: 1 }}
    {flaky_extra}
  checked:
    endpoints: ['{checked}']
    health_check: {{ path: /healthz, interval: 5s }}
routes:
  - {{ match: {{ path: /f }}, upstream: flaky, connect_retries: 0 }}
  - {{ match: {{ path: /c }}, upstream: checked }}
  - {{ match: {{ exact: /other }}, respond: {{ body: {other} }} }}
",
            up = up.url(),
            checked = checked.url(),
        )
    };
    let probes = || {
        checked
            .requests()
            .iter()
            .filter(|r| r.uri == "/healthz")
            .count()
    };
    let failures = async |addr| {
        let mut failed = 0;
        for _ in 0..4 {
            if status(&raw(addr, &support::get("/f", "")).await) != 200 {
                failed += 1;
            }
        }
        failed
    };
    let file = File::new("state.yaml", &config("one", ""));
    let (gw, live) = start_live(&file).await;
    support::eventually("the first health probe", || probes() == 1).await;
    // The dead endpoint fails once, and is ejected.
    assert!(failures(gw.addr).await >= 1);
    assert_eq!(failures(gw.addr).await, 0, "ejected");

    file.write(&config("two", ""));
    applied(&live, 1).await;
    assert_eq!(
        support::body_of(&raw(gw.addr, &support::get("/other", "")).await),
        "two"
    );
    assert_eq!(
        failures(gw.addr).await,
        0,
        "still ejected after an unrelated change"
    );
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(probes(), 1, "the health check was not restarted");

    file.write(&config("two", "slow_start: 1s"));
    applied(&live, 2).await;
    assert!(
        failures(gw.addr).await >= 1,
        "its own change starts it fresh"
    );
}

/// A plugin's state (what its layer holds) survives a reload that leaves its route's section
/// as it was, and starts over when the section changes.
#[tokio::test]
async fn plugin_state_survives_unless_its_section_changes() {
    let config = |start: u64, other: &str| {
        format!(
            "
listen: 127.0.0.1:0
routes:
  - match: {{ exact: /n }}
    respond: {{ body: n }}
    plugins:
      - count: {{ start: {start} }}
  - {{ match: {{ exact: /other }}, respond: {{ body: {other} }} }}
"
        )
    };
    let count = async |addr| {
        let res = raw(addr, &support::get("/n", "")).await;
        res.lines()
            .find_map(|l| l.strip_prefix("x-count: "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no count: {res}"))
    };
    let file = File::new("plugin-state.yaml", &config(0, "one"));
    let (gw, live) = start_live(&file).await;
    assert_eq!((count(gw.addr).await, count(gw.addr).await), (0, 1));
    file.write(&config(0, "two"));
    applied(&live, 1).await;
    assert_eq!(count(gw.addr).await, 2, "carried over");
    file.write(&config(100, "two"));
    applied(&live, 2).await;
    assert_eq!(
        count(gw.addr).await,
        100,
        "its section changed: built fresh"
    );
}

/// An open circuit breaker stays open across a reload that leaves its section as it was
/// (the upstream is still not called), and a changed section starts a closed one.
#[tokio::test]
async fn an_open_breaker_stays_open_across_a_reload_that_keeps_it() {
    let failing = TestUpstream::serve(|_| async {
        Ok(http::Response::builder()
            .status(500)
            .body(gateway_core::Body::empty())
            .expect("a response"))
    })
    .await;
    let config = |open_for: &str, other: &str| {
        format!(
            "
listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ['{up}'] }}
routes:
  - id: api
    match: {{ path: /api }}
    upstream: app
    plugins:
      - circuit-breaker: {{ consecutive_failures: 1, open_for: {open_for} }}
  - {{ match: {{ exact: /other }}, respond: {{ body: {other} }} }}
",
            up = failing.url()
        )
    };
    let file = File::new("breaker-state.yaml", &config("1m", "one"));
    let (gw, live) = start_live(&file).await;
    assert_eq!(status(&raw(gw.addr, &support::get("/api", "")).await), 500);
    assert_eq!(status(&raw(gw.addr, &support::get("/api", "")).await), 503);
    file.write(&config("1m", "two"));
    applied(&live, 1).await;
    assert_eq!(
        support::body_of(&raw(gw.addr, &support::get("/other", "")).await),
        "two"
    );
    assert_eq!(
        status(&raw(gw.addr, &support::get("/api", "")).await),
        503,
        "still open"
    );
    assert_eq!(failing.requests().len(), 1);
    file.write(&config("2m", "two"));
    applied(&live, 2).await;
    assert_eq!(
        status(&raw(gw.addr, &support::get("/api", "")).await),
        500,
        "its section changed: a closed breaker"
    );
    assert_eq!(failing.requests().len(), 2);
}

/// A breaker kept across a reload is not kept with its old fallback: when the fallback's
/// upstream changes, refused requests go to the new one.
#[tokio::test]
async fn a_breakers_fallback_follows_its_upstream_across_a_reload() {
    let failing = TestUpstream::serve(|_| async {
        Ok(http::Response::builder()
            .status(500)
            .body(gateway_core::Body::empty())
            .expect("a response"))
    })
    .await;
    let named = |name: &'static str| {
        TestUpstream::serve(move |_| async move {
            Ok(http::Response::new(gateway_core::Body::from(name)))
        })
    };
    let (old, new) = (named("old spare").await, named("new spare").await);
    let config = |spare: &TestUpstream| {
        format!(
            "
listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ['{up}'] }}
  spare: {{ endpoints: ['{spare}'] }}
routes:
  - id: api
    match: {{ path: /api }}
    upstream: app
    plugins:
      - circuit-breaker: {{ consecutive_failures: 1, open_for: 1m, fallback: {{ upstream: spare }} }}
",
            up = failing.url(),
            spare = spare.url()
        )
    };
    let file = File::new("breaker-fallback.yaml", &config(&old));
    let (gw, live) = start_live(&file).await;
    assert_eq!(status(&raw(gw.addr, &support::get("/api", "")).await), 500);
    assert_eq!(
        support::body_of(&raw(gw.addr, &support::get("/api", "")).await),
        "old spare"
    );
    file.write(&config(&new));
    applied(&live, 1).await;
    assert_eq!(
        support::body_of(&raw(gw.addr, &support::get("/api", "")).await),
        "new spare",
        "the fallback is the upstream as configured now"
    );
    assert_eq!(old.requests().len(), 1);
}

/// A `cache` section from the file: a miss then a hit, and what it holds survives a
/// reload that leaves the section as it was; a resized cache starts empty.
#[tokio::test]
async fn a_cache_keeps_its_contents_across_a_reload_that_keeps_it() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&calls);
    let up = TestUpstream::serve(move |_| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {
            Ok(http::Response::builder()
                .header("cache-control", "max-age=600")
                .body(gateway_core::Body::from("cached"))
                .expect("a response"))
        }
    })
    .await;
    let config = |memory: &str, other: &str| {
        format!(
            "
listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ['{up}'] }}
routes:
  - id: api
    match: {{ path: /api }}
    upstream: app
    plugins:
      - cache: {{ max_memory: {memory} }}
  - {{ match: {{ exact: /other }}, respond: {{ body: {other} }} }}
",
            up = up.url()
        )
    };
    let cache_status = |raw: &str| {
        raw.lines()
            .find_map(|l| l.strip_prefix("cache-status: "))
            .unwrap_or_default()
            .to_owned()
    };
    let file = File::new("cache-state.yaml", &config("16MiB", "one"));
    let (gw, live) = start_live(&file).await;
    let first = raw(gw.addr, &support::get("/api", "")).await;
    assert_eq!(cache_status(&first), "gateway; fwd=uri-miss; stored");
    let mut hit = String::new();
    for _ in 0..50 {
        hit = raw(gw.addr, &support::get("/api", "")).await;
        if cache_status(&hit).contains("hit") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(cache_status(&hit).starts_with("gateway; hit"), "{hit}");
    file.write(&config("16MiB", "two"));
    applied(&live, 1).await;
    let kept = raw(gw.addr, &support::get("/api", "")).await;
    assert!(
        cache_status(&kept).starts_with("gateway; hit"),
        "kept: {kept}"
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    file.write(&config("32MiB", "two"));
    applied(&live, 2).await;
    let fresh = raw(gw.addr, &support::get("/api", "")).await;
    assert_eq!(
        cache_status(&fresh),
        "gateway; fwd=uri-miss; stored",
        "resized: empty"
    );
}

/// `ip-filter` from the file judges the resolved client address: a forged
/// `X-Forwarded-For` from an untrusted peer does not get it in.
#[tokio::test]
async fn the_ip_filter_judges_the_resolved_client_address() {
    let up = TestUpstream::echo().await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  up: {{ endpoints: ['{}'] }}
routes:
  - match: {{ path: /internal }}
    upstream: up
    plugins:
      - ip-filter: {{ allow: [10.0.0.0/8] }}
  - match: {{ path: /local }}
    upstream: up
    plugins:
      - ip-filter: {{ allow: [127.0.0.1], deny: [192.0.2.0/24] }}
",
        up.url()
    );
    let gw = start(&yaml).await;
    let res = raw(gw.addr, &support::get("/internal", "")).await;
    assert_eq!(status(&res), 403, "{res}");
    assert!(res.contains("application/problem+json"), "{res}");
    let forged = support::get("/internal", "X-Forwarded-For: 10.1.2.3\r\n");
    assert_eq!(
        status(&raw(gw.addr, &forged).await),
        403,
        "forged header ignored"
    );
    assert!(up.requests().is_empty());
    assert_eq!(
        status(&raw(gw.addr, &support::get("/local", "")).await),
        200
    );
    assert_eq!(up.requests().len(), 1);
    let err = load("listen: x\nroutes:\n  - match: { path: /a }\n    respond: {}\n    plugins:\n      - ip-filter: {}\n")
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.path(), "routes[0].plugins[0].ip-filter", "{err}");
    let err = load("listen: x\nroutes:\n  - match: { path: /a }\n    respond: {}\n    plugins:\n      - ip-filter: { allow: [10.0.0.0/33] }\n")
        .map(|_| ())
        .unwrap_err();
    assert!(err.message().contains("10.0.0.0/33"), "{err}");
}

/// `timeout` from the file: a route that does not answer in time gets 504 problem+json.
#[tokio::test]
async fn a_route_timeout_answers_504() {
    let slow = TestUpstream::slow(std::time::Duration::from_secs(2)).await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  slow: {{ endpoints: ['{}'] }}
routes:
  - match: {{ path: / }}
    upstream: slow
    plugins:
      - timeout: {{ total: 200ms }}
",
        slow.url()
    );
    let gw = start(&yaml).await;
    let res = raw(gw.addr, &support::get("/", "")).await;
    assert_eq!(status(&res), 504, "{res}");
    assert!(res.contains("application/problem+json"), "{res}");
    let err = load("listen: x\nroutes:\n  - match: { path: /a }\n    respond: {}\n    plugins:\n      - timeout: { total: 0s }\n")
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.path(), "routes[0].plugins[0].timeout", "{err}");
}

/// `cors`, `compression` and `headers` from the file, and the layer order the docs give:
/// with `cors` first, a 502 of an unreachable upstream and a 504 of the route's `timeout`
/// reach the page with their CORS headers.
#[tokio::test]
async fn cors_compression_and_header_edits_from_the_file() {
    let up = TestUpstream::echo().await;
    let slow = TestUpstream::slow(std::time::Duration::from_secs(2)).await;
    let down = gateway_core::test_util::refused_addr().await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  up: {{ endpoints: ['{}'] }}
  slow: {{ endpoints: ['{}'] }}
  down: {{ endpoints: ['http://{down}'] }}
routes:
  - match: {{ path: /slow }}
    upstream: slow
    plugins:
      - cors: {{ origins: ['https://*.example.com'] }}
      - timeout: {{ total: 200ms }}
  - match: {{ path: /down }}
    upstream: down
    plugins:
      - cors: {{ origins: ['https://*.example.com'] }}
  - match: {{ path: / }}
    upstream: up
    plugins:
      - cors:
          origins: [https://app.example.com]
          methods: [GET, POST]
          headers: [content-type]
          credentials: true
          max_age: 10m
      - compression: {{ algorithms: [gzip], level: fastest, min_size: 10 }}
      - headers:
          request: {{ remove: [cookie], set: {{ x-env: prod }} }}
          response: {{ remove: [x-received-bytes], append: {{ x-served-by: gw }} }}
",
        up.url(),
        slow.url()
    );
    let gw = start(&yaml).await;
    let app = ("origin", "https://app.example.com");

    let preflight = support::request(
        "OPTIONS",
        "/x",
        &[app, ("access-control-request-method", "POST")],
    );
    let res = support::fetch(gw.addr, preflight).await;
    assert_eq!(res.status(), 204);
    assert_eq!(res.headers()["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        res.headers()["access-control-allow-headers"],
        "content-type"
    );
    assert_eq!(res.headers()["access-control-max-age"], "600");
    assert_eq!(res.headers()["access-control-allow-credentials"], "true");
    assert!(up.requests().is_empty());

    let mut req = support::request(
        "POST",
        "/x",
        &[app, ("accept-encoding", "gzip"), ("cookie", "a=1")],
    );
    *req.body_mut() = bytes::Bytes::from("echo ".repeat(100));
    let res = support::fetch(gw.addr, req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(res.headers()["content-encoding"], "gzip");
    assert_eq!(res.headers()["x-served-by"], "gw");
    assert!(res.headers().get("x-received-bytes").is_none());
    let seen = up.last_request();
    assert_eq!(seen.header("x-env"), Some("prod"));
    assert!(seen.header("cookie").is_none());

    // Errors inside the route's CORS layer still carry its headers.
    let shop = ("origin", "https://shop.example.com");
    for (path, code) in [("/down", 502), ("/slow", 504)] {
        let res = support::fetch(gw.addr, support::request("GET", path, &[shop])).await;
        assert_eq!(res.status(), code, "{path}");
        assert_eq!(
            res.headers()["access-control-allow-origin"],
            "https://shop.example.com",
            "{path}"
        );
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }

    // The sections' own mistakes, with their key paths.
    let section = |plugin: &str| {
        format!(
            "listen: x\nroutes:\n  - match: {{ path: /a }}\n    respond: {{}}\n    plugins:\n      - {plugin}\n"
        )
    };
    for (plugin, path, says) in [
        (
            "cors: { origins: ['*'], credentials: true }",
            "routes[0].plugins[0].cors",
            "cannot go with any origin",
        ),
        (
            "cors: { origins: ['https://app.example.com/'] }",
            "routes[0].plugins[0].cors",
            "no path",
        ),
        (
            "cors: { origins: [] }",
            "routes[0].plugins[0].cors",
            "`origins` is empty",
        ),
        (
            "cors: { origin: [x] }",
            "routes[0].plugins[0].cors.origin",
            "unknown field",
        ),
        (
            "compression: { level: 30 }",
            "routes[0].plugins[0].compression",
            "not in 0..=22",
        ),
        (
            "compression: { algorithms: [deflate] }",
            "routes[0].plugins[0].compression.algorithms[0]",
            "deflate",
        ),
        (
            "headers: { response: { set: { content-length: '0' } } }",
            "routes[0].plugins[0].headers",
            "cannot edit `content-length`",
        ),
        (
            "headers: { request: { set: { host: evil } } }",
            "routes[0].plugins[0].headers",
            "the route's `host`",
        ),
        ("headers: {}", "routes[0].plugins[0].headers", "no edits"),
    ] {
        let err = load(&section(plugin)).map(|_| ()).unwrap_err();
        assert_eq!(err.path(), path, "{plugin}: {err}");
        assert!(err.message().contains(says), "{plugin}: {err}");
        assert_eq!(
            err.location().map(|(line, _)| line),
            Some(6),
            "{plugin}: {err}"
        );
    }
}

/// The commented example config of the gateway we ship routes as its comments say (its
/// listener and upstream addresses swapped for the test's own).
#[tokio::test]
async fn the_commented_example_config_routes_as_it_says() {
    let api = TestUpstream::echo().await;
    let api2 = TestUpstream::echo().await;
    let static_up = TestUpstream::echo().await;
    let yaml = include_str!("../../examples/gateway/gateway.example.yaml")
        .replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0")
        .replace("http://127.0.0.1:9001", &api.url())
        .replace("http://127.0.0.1:9002", &api2.url())
        .replace("http://127.0.0.1:9003", &static_up.url());
    let env = |_: &str| None;
    let config = config::parse("gateway.example.yaml", &yaml, env, &registry())
        .unwrap_or_else(|e| panic!("{e}"));
    let built = config::build("gateway.example.yaml", &config).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway::start_with(built.router, built.trusted.clone(), |s| s).await;
    let app = ("origin", "https://app.example.com");
    let both = |f: &dyn Fn(&gateway_core::test_util::Recorded) -> bool| {
        api.requests().iter().chain(&api2.requests()).any(f)
    };

    // /api/... goes to `api` without its /api, with a request id, CORS, compression, HSTS.
    let mut req = support::request("POST", "/api/users", &[app, ("accept-encoding", "zstd")]);
    *req.body_mut() = bytes::Bytes::from("user ".repeat(400));
    let res = support::fetch(gw.addr, req).await;
    assert_eq!(res.status(), 200);
    assert!(both(
        &|r| r.uri == "/users" && r.header("x-request-id").is_some()
    ));
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["content-encoding"], "zstd");
    assert_eq!(h["strict-transport-security"], "max-age=63072000");
    assert_eq!(h["x-request-id"].len(), 32);
    assert_eq!(
        h["ratelimit-policy"],
        r#""per-second";q=50;w=1, "per-hour";q=20000;w=3600"#
    );
    assert!(h.contains_key("ratelimit"));
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("ratelimit"), "{exposed}");
    // Never /apiadmin.
    let res = support::fetch(gw.addr, support::request("GET", "/apiadmin", &[])).await;
    assert_eq!(res.status(), 404);
    // Over 1 MiB: 413, with the CORS headers a page needs to read it.
    let big = format!(
        "POST /api/upload HTTP/1.1\r\nHost: gw\r\nOrigin: https://x.app.example.com\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        2 << 20
    );
    let res = raw(gw.addr, &big).await;
    assert_eq!(status(&res), 413, "{res}");
    assert!(
        res.contains("access-control-allow-origin: https://x.app.example.com\r\n"),
        "{res}"
    );
    // A preflight is answered by the gateway.
    let preflight = support::request(
        "OPTIONS",
        "/api/users",
        &[app, ("access-control-request-method", "DELETE")],
    );
    let before = api.requests().len() + api2.requests().len();
    assert_eq!(support::fetch(gw.addr, preflight).await.status(), 204);
    // The gateway's own answers.
    let res = support::fetch(gw.addr, support::request("GET", "/healthz", &[])).await;
    assert_eq!(
        (res.status().as_u16(), res.body().as_ref()),
        (200, &b"ok"[..])
    );
    // `methods: [GET, HEAD]`: a POST matches no route.
    let res = support::fetch(gw.addr, support::request("POST", "/healthz", &[])).await;
    assert_eq!(res.status(), 404);
    let res = support::fetch(gw.addr, support::request("GET", "/old/page", &[])).await;
    assert_eq!(res.status(), 308);
    assert_eq!(res.headers()["location"], "/api");
    assert_eq!(api.requests().len() + api2.requests().len(), before);
    // Another host: `static`, with the client's Host.
    let req = support::request("GET", "/logo.svg", &[]);
    let (mut parts, body) = req.into_parts();
    parts
        .headers
        .insert("host", "static.example.com".parse().unwrap());
    let res = support::fetch(gw.addr, http::Request::from_parts(parts, body)).await;
    assert_eq!(res.status(), 200);
    let seen = static_up.last_request();
    assert_eq!(seen.uri, "/logo.svg");
    assert_eq!(seen.header("host"), Some("static.example.com"));
    // Past the per-second burst: 429, with the CORS headers a page needs to read it.
    let mut refused = None;
    for _ in 0..150 {
        let res = support::fetch(gw.addr, support::request("GET", "/api/x", &[app])).await;
        if res.status() == 429 {
            refused = Some(res);
            break;
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("never limited"));
    let h = refused.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["content-type"], "application/problem+json");
}
