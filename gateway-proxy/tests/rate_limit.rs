//! Rate limits from the config file over real sockets: 429 problem+json with `Retry-After`
//! and headers that parse as RFC 9651 structured fields, keys that a client cannot rotate
//! (`X-Forwarded-For` from an untrusted peer, header values past the key cap), shadow mode,
//! CORS around the limit, consumers, and buckets that survive a reload.
#![cfg(feature = "config")]

mod support;

use std::collections::BTreeMap;

use bytes::Bytes;
use gateway_core::metrics::{Format, Metrics};
use gateway_core::registry::Registry;
use gateway_proxy::config::{self, ConfigError};
use http::Response;
use support::{Gateway, fetch, request};

fn registry(metrics: Option<&Metrics>) -> Registry {
    let mut registry = Registry::new();
    if let Some(metrics) = metrics {
        registry.metrics(metrics);
    }
    gateway_middleware::config::register(&mut registry);
    registry
}

fn load(yaml: &str, metrics: Option<&Metrics>) -> Result<config::Gateway, ConfigError> {
    support::load_config(yaml, metrics)
}

async fn start(yaml: &str) -> Gateway {
    support::start_config(yaml, None).await
}

async fn start_observed(yaml: &str, metrics: Option<&Metrics>) -> Gateway {
    support::start_config(yaml, metrics).await
}

async fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
    fetch(gw.addr, request("GET", path, headers)).await
}

/// How many of `n` requests with `headers` pass.
async fn passed(gw: &Gateway, path: &str, n: usize, headers: &[(&str, &str)]) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(get(gw, path, headers).await.status() == 200);
    }
    ok
}

/// A member of a `RateLimit` or `RateLimit-Policy` list: the policy's name and its
/// parameters, integers as integers.
#[derive(Debug, PartialEq, Eq)]
struct Member {
    name: String,
    params: BTreeMap<String, Param>,
}

#[derive(Debug, PartialEq, Eq)]
enum Param {
    Int(i64),
    Str(String),
}

/// Parses `value` as an RFC 9651 list of strings with parameters, or fails the test.
fn sf_list(value: &http::HeaderValue) -> Vec<Member> {
    let list: sfv::List = sfv::Parser::new(value.as_bytes())
        .parse()
        .unwrap_or_else(|e| panic!("not a structured-field list: {value:?}: {e}"));
    list.into_iter()
        .map(|entry| {
            let sfv::ListEntry::Item(item) = entry else {
                panic!("an inner list in {value:?}");
            };
            let name = item
                .bare_item
                .as_string()
                .unwrap_or_else(|| panic!("a policy name is a string: {value:?}"))
                .as_str()
                .to_owned();
            let params = item
                .params
                .iter()
                .map(|(k, v)| {
                    let v = match (v.as_integer(), v.as_string()) {
                        (Some(i), _) => Param::Int(i64::from(i)),
                        (_, Some(s)) => Param::Str(s.as_str().to_owned()),
                        _ => panic!("unexpected parameter {k:?}={v:?}"),
                    };
                    (k.as_str().to_owned(), v)
                })
                .collect();
            Member { name, params }
        })
        .collect()
}

fn member(name: &str, params: &[(&str, Param)]) -> Member {
    Member {
        name: name.to_owned(),
        params: params
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Param::Int(i) => Param::Int(*i),
                    Param::Str(s) => Param::Str(s.clone()),
                };
                ((*k).to_owned(), v)
            })
            .collect(),
    }
}

use Param::{Int, Str};

const LIMITED: &str = "
listen: 127.0.0.1:0
routes:
  - match: { path: /api }
    respond: { body: ok }
    plugins:
      - rate-limit:
          limits:
            - { name: second, requests: 2, per: 1m }
            - { name: hour, requests: 100, per: 1h }
            - { name: inflight, concurrent: 5 }
";

#[tokio::test]
async fn a_refusal_is_problem_json_with_retry_after_and_structured_headers() {
    let gw = start(LIMITED).await;
    let first = get(&gw, "/api", &[]).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        sf_list(&first.headers()["ratelimit-policy"]),
        [
            member("second", &[("q", Int(2)), ("w", Int(60))]),
            member("hour", &[("q", Int(100)), ("w", Int(3600))]),
            member(
                "inflight",
                &[("q", Int(5)), ("qu", Str("concurrent-requests".into()))]
            ),
        ]
    );
    assert_eq!(
        sf_list(&first.headers()["ratelimit"]),
        [
            member("second", &[("r", Int(1)), ("t", Int(30))]),
            member("hour", &[("r", Int(99)), ("t", Int(36))]),
            member("inflight", &[("r", Int(4))]),
        ]
    );
    assert_eq!(get(&gw, "/api", &[]).await.status(), 200);

    let refused = get(&gw, "/api", &[]).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = serde_json::from_slice(refused.body()).unwrap();
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["title"], "too many requests");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (29..=30).contains(&retry_after),
        "rounded up: {retry_after}"
    );
    let readings = sf_list(&refused.headers()["ratelimit"]);
    assert_eq!(readings[0].name, "second");
    assert_eq!(readings[0].params["r"], Int(0));
    assert_eq!(
        readings[1].params["r"],
        Int(98),
        "a refused request takes nothing from the other limits"
    );
}

#[tokio::test]
async fn an_untrusted_peer_cannot_rotate_its_way_to_fresh_buckets() {
    let route = "
routes:
  - match: { path: /api }
    respond: { body: ok }
    plugins:
      - rate-limit: { limits: [{ requests: 3, per: 1m }] }
";
    // No trusted proxies: whatever X-Forwarded-For says, the key is the peer.
    let gw = start(&format!("listen: 127.0.0.1:0\n{route}")).await;
    let mut ok = 0;
    for n in 0..20 {
        let xff = format!("198.51.100.{n}");
        ok += passed(&gw, "/api", 1, &[("x-forwarded-for", &xff)]).await;
    }
    assert_eq!(ok, 3, "one bucket for the peer");

    // Behind a trusted proxy (the test client), the key is the right-most untrusted
    // address; the client-written entries to its left are not believed.
    let gw = start(&format!(
        "listen: 127.0.0.1:0\nserver: {{ trusted_proxies: [127.0.0.1] }}\n{route}"
    ))
    .await;
    let mut ok = 0;
    for n in 0..20 {
        let xff = format!("198.51.100.{n}, 7.7.7.7");
        ok += passed(&gw, "/api", 1, &[("x-forwarded-for", &xff)]).await;
    }
    assert_eq!(ok, 3, "one bucket for 7.7.7.7");
    assert_eq!(
        passed(&gw, "/api", 4, &[("x-forwarded-for", "8.8.8.8")]).await,
        3,
        "another client behind the proxy"
    );
    // Unparseable entries fall back to the peer, never to client-chosen text.
    let mut ok = 0;
    for xff in [
        "garbage",
        "unknown",
        "1.2.3.4.5",
        "7.7.7.7:80, x",
        "",
        "::g",
    ] {
        ok += passed(&gw, "/api", 1, &[("x-forwarded-for", xff)]).await;
    }
    ok += passed(&gw, "/api", 1, &[]).await;
    assert_eq!(ok, 3, "all of them in the peer's bucket");
}

#[tokio::test]
async fn rotating_a_header_key_cannot_grow_memory_past_the_cap() {
    let metrics = Metrics::new();
    let gw = start_observed(
        "
listen: 127.0.0.1:0
routes:
  - id: tenants
    match: { path: /api }
    respond: { body: ok }
    plugins:
      - rate-limit:
          limits: [{ name: tenant, requests: 10, per: 1h }]
          key: { header: x-tenant }
          max_keys: 5
",
        Some(&metrics),
    )
    .await;
    let mut statuses = Vec::new();
    for n in 0..40 {
        let tenant = format!("tenant-{n}-{}", "x".repeat(n * 50));
        statuses.push(get(&gw, "/api", &[("x-tenant", &tenant)]).await.status());
    }
    assert!(statuses[..5].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let text = metrics.encode(Format::Prometheus);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.get("route") == Some("tenants")
                    && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v))
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("gateway_rate_limit_keys", None), Some(5.0), "{text}");
    assert_eq!(
        value(
            "gateway_rate_limit_overflow_total",
            Some(("action", "shed"))
        ),
        Some(35.0),
        "{text}"
    );
    assert_eq!(
        value(
            "gateway_rate_limit_decisions_total",
            Some(("decision", "limited"))
        ),
        Some(35.0)
    );
}

#[tokio::test]
async fn shadow_mode_lets_everything_through_with_headers() {
    let gw = start(
        "
listen: 127.0.0.1:0
routes:
  - match: { path: /api }
    respond: { body: ok }
    plugins:
      - rate-limit: { limits: [{ name: trial, requests: 2, per: 1m }], shadow: true, headers: both }
",
    )
    .await;
    for n in 0..10 {
        let res = get(&gw, "/api", &[]).await;
        assert_eq!(res.status(), 200);
        let r = sf_list(&res.headers()["ratelimit"])[0].params["r"].clone_int();
        assert_eq!(r, 1_i64.saturating_sub(n).max(0));
        assert_eq!(res.headers()["x-ratelimit-limit"], "2");
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            r.to_string().as_str()
        );
    }
}

#[tokio::test]
async fn a_429_keeps_its_cors_headers_and_preflights_take_nothing() {
    let gw = start(
        "
listen: 127.0.0.1:0
routes:
  - match: { path: /api }
    respond: { body: ok }
    plugins:
      - cors: { origins: [https://app.example.com], expose: [retry-after, ratelimit, ratelimit-policy] }
      - rate-limit: { limits: [{ requests: 2, per: 1m }] }
",
    )
    .await;
    let origin = [("origin", "https://app.example.com")];
    let preflight = [
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "GET"),
    ];
    for _ in 0..5 {
        let res = fetch(gw.addr, request("OPTIONS", "/api", &preflight)).await;
        assert!(res.status().is_success(), "{:?}", res.status());
    }
    assert_eq!(
        passed(&gw, "/api", 2, &origin).await,
        2,
        "preflights took nothing"
    );
    let refused = get(&gw, "/api", &origin).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = refused.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("retry-after") && exposed.contains("ratelimit"),
        "{exposed}"
    );
}

#[tokio::test]
async fn consumers_have_buckets_of_their_own() {
    let gw = start(
        "
listen: 127.0.0.1:0
routes:
  - match: { path: /api }
    respond: { body: ok }
    plugins:
      - key-auth:
          consumers:
            - { name: alice, keys: [alice-key-0123456789] }
            - { name: bob, keys: [bob-key-0123456789] }
          anonymous: guest
      - rate-limit: { limits: [{ requests: 2, per: 1m }], key: consumer }
",
    )
    .await;
    let alice = [("x-api-key", "alice-key-0123456789")];
    let bob = [("x-api-key", "bob-key-0123456789")];
    assert_eq!(passed(&gw, "/api", 4, &alice).await, 2);
    assert_eq!(passed(&gw, "/api", 4, &bob).await, 2);
    assert_eq!(passed(&gw, "/api", 4, &[]).await, 2, "guests by address");
}

#[tokio::test]
async fn mistakes_in_the_section_are_refused_at_load() {
    let section = |body: &str| {
        format!(
            "listen: x\nroutes:\n  - match: {{ path: /a }}\n    respond: {{}}\n    plugins:\n      - rate-limit: {body}\n"
        )
    };
    for (body, says) in [
        ("{ limits: [] }", "at least one limit"),
        ("{ limits: [{ requests: 10 }] }", "needs `per`"),
        (
            "{ limits: [{ requests: 0, per: 1s }] }",
            "at least one request",
        ),
        ("{ limits: [{ requests: 10, per: 1s, burst: 0 }] }", "burst"),
        (
            "{ limits: [{ requests: 10, per: 1s, concurrent: 2 }] }",
            "not both",
        ),
        ("{ limits: [{ concurrent: 0 }] }", "at least 1"),
        (
            "{ limits: [{ name: a, concurrent: 1 }, { name: a, concurrent: 2 }] }",
            "two limits are named `a`",
        ),
        (
            "{ limits: [{ concurrent: 1 }], key: { header: 'bad name' } }",
            "not a header name",
        ),
        (
            "{ limits: [{ concurrent: 1 }], ipv6_prefix: 129 }",
            "at most 128",
        ),
        ("{ limits: [{ concurrent: 1 }], max_keys: 0 }", "at least 1"),
        (
            "{ limits: [{ concurrent: 1 }], headers: loud }",
            "unknown variant",
        ),
        ("{ limits: [{ concurrent: 1 }], limit: 3 }", "unknown field"),
    ] {
        let err = load(&section(body), None).map(|_| ()).unwrap_err();
        assert!(
            err.path().starts_with("routes[0].plugins[0].rate-limit"),
            "{body}: {err}"
        );
        assert!(err.to_string().contains(says), "{body}: {err}");
    }
}

trait CloneInt {
    fn clone_int(&self) -> i64;
}

impl CloneInt for Param {
    fn clone_int(&self) -> i64 {
        match self {
            Int(i) => *i,
            Str(s) => panic!("not an integer: {s}"),
        }
    }
}

/// A limit's buckets survive a reload that leaves its section as it was, and start over
/// when the section changes.
#[tokio::test]
async fn buckets_survive_a_reload_that_does_not_change_the_limit() {
    let yaml = |requests: u32, other: &str| {
        format!(
            "
listen: 127.0.0.1:0
routes:
  - match: {{ path: /api }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit: {{ limits: [{{ requests: {requests}, per: 1h }}] }}
  - {{ match: {{ exact: /other }}, respond: {{ body: {other} }} }}
"
        )
    };
    let dir = std::env::temp_dir().join(format!("gateway-rate-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("reload.yaml");
    let write = |text: String| {
        let staged = file.with_extension("new");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &file).unwrap();
    };
    write(yaml(2, "one"));
    let (live, built) = config::Live::load(&file, registry(None)).unwrap();
    let gw = Gateway::start_with(live.router(), built.trusted.clone(), |s| s).await;
    tokio::spawn(
        live.clone()
            .watch(Some(std::time::Duration::from_millis(50))),
    );
    let applied = async |n: u64| {
        support::within("the reload", async {
            while live.stats().applied < n {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    };

    assert_eq!(passed(&gw, "/api", 3, &[]).await, 2);
    write(yaml(2, "two"));
    applied(1).await;
    assert_eq!(get(&gw, "/other", &[]).await.body(), "two");
    assert_eq!(
        passed(&gw, "/api", 2, &[]).await,
        0,
        "the same buckets, still empty"
    );
    write(yaml(3, "two"));
    applied(2).await;
    assert_eq!(
        passed(&gw, "/api", 4, &[]).await,
        3,
        "a changed limit starts fresh"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
