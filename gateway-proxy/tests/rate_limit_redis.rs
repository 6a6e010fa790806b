//! Distributed rate limits against a real `redis-server` the test starts on a free port:
//! two gateway instances hold one combined limit (with and without leases), Redis stopped
//! mid-test fails open or closed without hanging and recovers by itself, a password-
//! protected Redis, and leases that never let more through than the limit. (Without
//! `redis-server` installed they say so and pass, except under CI.)
#![cfg(feature = "config")]

mod support;

use std::time::Duration;

use bytes::Bytes;
use gateway_core::metrics::{Format, Metrics};
use http::Response;
use support::redis::RedisServer;
use support::{Gateway, fetch, request, within};

async fn start(yaml: &str, metrics: Option<&Metrics>) -> Gateway {
    support::start_config(yaml, metrics).await
}

async fn get(gw: &Gateway, path: &str) -> Response<Bytes> {
    within(path, fetch(gw.addr, request("GET", path, &[]))).await
}

/// Over 10 s, 200 requests a second are offered to a limit of 50 a second (burst 5),
/// alternately through two instances sharing one Redis: one round trip per request on
/// `/each`, leases of 5 on `/leased`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_hold_one_combined_limit() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let yaml = format!(
        "
listen: 127.0.0.1:0
routes:
  - id: each
    match: {{ path: /each }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit:
          limits: [{{ name: fleet, requests: 50, per: 1s, burst: 5 }}]
          key: route
          redis: {{ url: '{url}', on_error: deny }}
  - id: leased
    match: {{ path: /leased }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit:
          limits: [{{ name: fleet, requests: 50, per: 1s, burst: 5 }}]
          key: route
          redis: {{ url: '{url}', on_error: deny, batch: {{ lease: 5, sync: 100ms }} }}
",
        url = redis.url()
    );
    let a = start(&yaml, None).await;
    let b = start(&yaml, None).await;
    let (mut each, mut leased, mut other) = (0_u32, 0_u32, 0_u32);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0_u32;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let gw = if n.is_multiple_of(2) { &a } else { &b };
        n += 1;
        let (x, y) = tokio::join!(get(gw, "/each"), get(gw, "/leased"));
        for (res, count) in [(x, &mut each), (y, &mut leased)] {
            match res.status().as_u16() {
                200 => *count += 1,
                429 => {}
                _ => other += 1,
            }
        }
    }
    eprintln!(
        "offered {n} per route in 10 s; admitted: {each} one round trip each, {leased} with leases"
    );
    assert_eq!(other, 0, "only 200s and 429s");
    // 50/s for 10 s plus the burst: 505; within 10 %.
    assert!((455..=555).contains(&each), "{each} admitted");
    assert!(
        (455..=555).contains(&leased),
        "{leased} admitted with leases"
    );
}

/// Redis killed mid-test: the fail-open route lets everything through, the fail-closed one
/// answers 503, neither waits on Redis, and both are back to normal within 5 s of Redis
/// coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_open_or_closed_and_recovers() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let metrics = Metrics::new();
    let route = |path: &str, on_error: &str, batch: &str| {
        format!(
            "
  - id: {path}
    match: {{ path: /{path} }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit:
          limits: [{{ requests: 1000, per: 1s }}]
          redis: {{ url: '{}', timeout: 50ms, on_error: {on_error} {batch} }}
",
            redis.url()
        )
    };
    let yaml = format!(
        "listen: 127.0.0.1:0\nroutes:{}{}{}",
        route("open", "allow", ""),
        route("closed", "deny", ""),
        route("leased", "deny", ", batch: { lease: 5, sync: 100ms }"),
    );
    let gw = start(&yaml, Some(&metrics)).await;
    let checked = |res: &Response<Bytes>| res.headers().contains_key("ratelimit");
    for path in ["/open", "/closed", "/leased"] {
        let res = get(&gw, path).await;
        assert_eq!(res.status(), 200, "{path}");
        assert!(checked(&res), "{path}: checked in Redis");
    }

    redis.stop();
    for _ in 0..20 {
        let open = get(&gw, "/open").await;
        assert_eq!(open.status(), 200, "fails open");
        assert!(!checked(&open), "not checked");
        let closed = get(&gw, "/closed").await;
        assert_eq!(closed.status(), 503, "fails closed");
        assert_eq!(closed.headers()["content-type"], "application/problem+json");
        assert_eq!(closed.headers()["retry-after"], "1");
    }
    // A lease in hand is spent while it lasts; then the route fails closed too.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(get(&gw, "/leased").await.status(), 503);
    let text = metrics.encode(Format::Prometheus);
    for needle in [
        r#"gateway_rate_limit_decisions_total{route="open",limit="limits[0]",decision="failed_open"} 20"#,
        r#"gateway_rate_limit_decisions_total{route="closed",limit="limits[0]",decision="failed_closed"} 20"#,
        r#"gateway_rate_limit_redis_errors_total{route="open",reason="backoff"}"#,
    ] {
        assert!(text.contains(needle), "{needle}\n{text}");
    }

    redis.restart().await;
    let back = tokio::time::Instant::now();
    loop {
        let open = get(&gw, "/open").await;
        let closed = get(&gw, "/closed").await;
        let leased = get(&gw, "/leased").await;
        if checked(&open) && closed.status() == 200 && leased.status() == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "not recovered within 5 s of Redis coming back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("recovered {:?} after Redis came back", back.elapsed());
}

/// Leases take only what the limit has room for: a limit of 2 a minute lets 2 through,
/// however big the lease; the refusal carries `Retry-After` and the headers.
#[tokio::test]
async fn a_lease_never_lets_more_through_than_the_limit() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let yaml = format!(
        "
listen: 127.0.0.1:0
routes:
  - id: each
    match: {{ path: /each }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit:
          limits: [{{ name: minute, requests: 2, per: 1m }}, {{ name: hour, requests: 100, per: 1h }}]
          redis: {{ url: '{url}' }}
  - id: leased
    match: {{ path: /leased }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit:
          limits: [{{ name: minute, requests: 2, per: 1m }}]
          redis: {{ url: '{url}', batch: {{ lease: 50, sync: 1s }} }}
",
        url = redis.url()
    );
    let a = start(&yaml, None).await;
    let b = start(&yaml, None).await;
    for path in ["/each", "/leased"] {
        let mut ok = 0;
        for gw in [&a, &b, &a, &b, &a] {
            ok += u32::from(get(gw, path).await.status() == 200);
        }
        assert_eq!(ok, 2, "{path}");
        let refused = get(&a, path).await;
        assert_eq!(refused.status(), 429, "{path}");
        let after: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=30).contains(&after), "{path}: {after}");
        let policy = refused.headers()["ratelimit-policy"].to_str().unwrap();
        assert!(policy.starts_with(r#""minute";q=2;w=60"#), "{policy}");
        let readings = refused.headers()["ratelimit"].to_str().unwrap();
        assert!(readings.starts_with(r#""minute";r=0;t="#), "{readings}");
    }
    // All of a request's limits at once: the refused ones took nothing from `hour`.
    let refused = get(&b, "/each").await;
    let readings = refused.headers()["ratelimit"].to_str().unwrap();
    assert!(readings.contains(r#""hour";r=98;"#), "{readings}");
}

#[tokio::test]
async fn a_password_protected_redis() {
    let Some(redis) = RedisServer::start_with(Some("s3cret-pass")).await else {
        return;
    };
    let yaml = |url: &str| {
        format!(
            "
listen: 127.0.0.1:0
routes:
  - match: {{ path: /api }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit:
          limits: [{{ requests: 10, per: 1s }}]
          redis: {{ url: '{url}', on_error: deny }}
"
        )
    };
    let gw = start(&yaml(&redis.url()), None).await;
    let res = get(&gw, "/api").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("ratelimit"));
    let wrong = format!("redis://:wrong@127.0.0.1:{}/0", redis.port());
    let gw = start(&yaml(&wrong), None).await;
    assert_eq!(
        get(&gw, "/api").await.status(),
        503,
        "refused by Redis: fails closed"
    );
}

/// Tokens one instance leased and did not spend go back to Redis after `sync`: another
/// instance refused meanwhile gets them then, not after the limit's whole wait.
#[tokio::test]
async fn unspent_leases_go_back() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let yaml = format!(
        "
listen: 127.0.0.1:0
routes:
  - id: leased
    match: {{ path: /leased }}
    respond: {{ body: ok }}
    plugins:
      - rate-limit:
          limits: [{{ name: minute, requests: 10, per: 1m }}]
          key: route
          redis: {{ url: '{}', on_error: deny, batch: {{ lease: 10, sync: 200ms }} }}
",
        redis.url()
    );
    let a = start(&yaml, None).await;
    let b = start(&yaml, None).await;
    assert_eq!(
        get(&a, "/leased").await.status(),
        200,
        "a leases all 10, spends 1"
    );
    let refused = get(&b, "/leased").await;
    assert_eq!(refused.status(), 429, "b: nothing left in Redis");
    let waited = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(waited, "6", "one token comes back every 6 s");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut ok = 0;
    for _ in 0..12 {
        ok += u32::from(get(&b, "/leased").await.status() == 200);
    }
    assert_eq!(ok, 9, "a's 9 unspent tokens, given back; no more");
}
