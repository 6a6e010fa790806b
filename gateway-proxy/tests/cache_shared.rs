//! Caches from outside: purged by URL and by prefix on the admin listener (with its
//! token), and kept in a real `redis-server` (started by the test on a free port) that two
//! gateway instances share: what one stored the other serves, with `Vary`, for as long as
//! it may be served, a purge through either reaching both, garbage in Redis read as a
//! miss, and Redis going away turning hits into misses, not failures. (Without
//! `redis-server` installed the Redis tests say so and pass, except under CI.)
#![cfg(feature = "config")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use gateway_core::Body;
use gateway_core::metrics::{Format, Metrics};
use gateway_core::purge::Purgers;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::Server;
use gateway_proxy::admin::{Admin, Inventory};
use gateway_proxy::server::Readiness;
use http::{Request, Response};
use support::redis::RedisServer;
use support::{Gateway, fetch, within};
use tokio::sync::oneshot;

const TOKEN: &str = "purge-s3cret";

/// An upstream answering with `max-age=60, stale-if-error=30` (and `Vary:
/// Accept-Language`), a body naming the path, language and call, counting calls.
async fn upstream() -> (TestUpstream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let up = TestUpstream::serve(move |req| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        let lang = req
            .headers()
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let size = if req.uri().path() == "/big" {
            70_000
        } else {
            0
        };
        let body = format!(
            "{} lang={lang} call={n} {}",
            req.uri().path(),
            "x".repeat(size)
        );
        async move {
            Ok(Response::builder()
                .header("cache-control", "max-age=60, stale-if-error=30")
                .header("vary", "Accept-Language")
                .body(Body::from(body))
                .expect("a response"))
        }
    })
    .await;
    (up, calls)
}

/// A gateway whose one route (`/`) caches with `cache` (a YAML flow mapping), with an
/// admin listener (token [`TOKEN`]) that purges its caches.
struct Instance {
    gateway: Gateway,
    admin: SocketAddr,
    metrics: Metrics,
    _purgers: Purgers,
    _stop_admin: oneshot::Sender<()>,
}

async fn instance(up: &TestUpstream, cache: &str) -> Instance {
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ['{up}'] }}
routes:
  - id: site
    match: {{ path: / }}
    upstream: app
    plugins:
      - cache: {cache}
",
        up = up.url()
    );
    let metrics = Metrics::new();
    let purgers = Purgers::new();
    let built = support::load_config_with(&yaml, Some(&metrics), Some(&purgers))
        .unwrap_or_else(|e| panic!("{e}"));
    let gateway = Gateway::start_with(built.router, built.trusted.clone(), |s| s).await;
    let admin = Admin::builder(&metrics, &Inventory::new(), &Readiness::new())
        .token(TOKEN)
        .purgers(&purgers)
        .build();
    let server = Server::from_listener(gateway_core::test_util::bind().await);
    let addr = server.local_addr().expect("bound");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve_with_shutdown(admin, async {
        let _ = stopped.await;
    }));
    Instance {
        gateway,
        admin: addr,
        metrics,
        _purgers: purgers,
        _stop_admin: stop,
    }
}

async fn get(gw: &Instance, path: &str, lang: Option<&str>) -> Response<Bytes> {
    let mut req = Request::get(path).header("host", "a.example");
    if let Some(lang) = lang {
        req = req.header("accept-language", lang);
    }
    within(
        path,
        fetch(gw.gateway.addr, req.body(Bytes::new()).expect("a request")),
    )
    .await
}

fn cache_status(res: &Response<Bytes>) -> &str {
    res.headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn is_hit(res: &Response<Bytes>) -> bool {
    cache_status(res).starts_with("gateway; hit")
}

/// Gets `path` until it is a hit (the store is written once the body has ended).
async fn hit(gw: &Instance, path: &str, lang: Option<&str>) -> Response<Bytes> {
    for _ in 0..200 {
        let res = get(gw, path, lang).await;
        if is_hit(&res) {
            return res;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{path} never became a hit");
}

async fn purge(gw: &Instance, query: &str, token: Option<&str>) -> Response<Bytes> {
    purge_with(gw, "POST", query, token).await
}

async fn purge_with(
    gw: &Instance,
    method: &str,
    query: &str,
    token: Option<&str>,
) -> Response<Bytes> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("/cache/purge?{query}"))
        .header("host", "admin");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    within(
        "purge",
        fetch(gw.admin, req.body(Bytes::new()).expect("a request")),
    )
    .await
}

fn json(res: &Response<Bytes>) -> serde_json::Value {
    serde_json::from_slice(res.body()).unwrap_or_else(|e| panic!("{e}: {res:?}"))
}

#[tokio::test]
async fn purge_by_url_and_by_prefix_on_the_admin_listener() {
    let (up, calls) = upstream().await;
    let gw = instance(&up, "{ name: pages, max_memory: 16MiB }").await;
    for path in ["/v1/a", "/v1/b?x=1", "/v2/a"] {
        assert!(!is_hit(&get(&gw, path, None).await));
        hit(&gw, path, None).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // The token is required.
    let url = "url=http%3A%2F%2FA.Example%3A80%2Fv2%2Fa";
    assert_eq!(purge(&gw, url, None).await.status(), 401);
    assert_eq!(purge(&gw, url, Some("wrong")).await.status(), 401);
    assert!(is_hit(&get(&gw, "/v2/a", None).await), "not purged");

    // One URL (scheme and host as the key has them: case and default port ignored).
    let res = purge(&gw, url, Some(TOKEN)).await;
    assert_eq!(res.status(), 200, "{res:?}");
    assert_eq!(json(&res)["purged"]["pages"], 1);
    assert_eq!(json(&res)["url"], "http://a.example/v2/a");
    assert!(!is_hit(&get(&gw, "/v2/a", None).await));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(is_hit(&get(&gw, "/v1/a", None).await), "other keys kept");

    // A prefix, in the one cache named.
    let res = purge(
        &gw,
        "prefix=http%3A%2F%2Fa.example%2Fv1%2F&cache=pages",
        Some(TOKEN),
    )
    .await;
    assert_eq!(res.status(), 200, "{res:?}");
    assert_eq!(json(&res)["purged"]["pages"], 2);
    assert!(!is_hit(&get(&gw, "/v1/a", None).await));
    assert!(!is_hit(&get(&gw, "/v1/b?x=1", None).await));
    assert_eq!(calls.load(Ordering::SeqCst), 6);

    // Anything else is refused, and purges nothing.
    hit(&gw, "/v2/a", None).await;
    for (method, query, status) in [
        ("GET", url, 405),
        ("POST", "", 400),
        ("POST", "url=%2Fv2%2Fa", 400),
        ("POST", "url=ftp%3A%2F%2Fa.example%2Fv2%2Fa", 400),
        ("POST", "prefix=http%3A%2F%2F%2Fv2", 400),
        (
            "POST",
            "url=http%3A%2F%2Fa.example%2Fv2%2Fa&prefix=http%3A%2F%2Fa.example%2F",
            400,
        ),
        ("POST", "url=http%3A%2F%2Fa.example%2Fv2%2Fa&other=1", 400),
        (
            "POST",
            "url=http%3A%2F%2Fa.example%2Fv2%2Fa&cache=nope",
            404,
        ),
    ] {
        let res = purge_with(&gw, method, query, Some(TOKEN)).await;
        assert_eq!(res.status(), status, "{method} {query}: {res:?}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    let long = format!("url=http%3A%2F%2Fa.example%2F{}", "a".repeat(20_000));
    assert_eq!(purge(&gw, &long, Some(TOKEN)).await.status(), 400);
    assert!(is_hit(&get(&gw, "/v2/a", None).await), "nothing purged");
}

/// Waits until Redis holds `n` variants under `key` (a response is stored once its body
/// has ended).
async fn variants(redis: &RedisServer, key: &[u8], n: i64) {
    for _ in 0..500 {
        if redis.integer(&[b"HLEN", key]).await == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("Redis never held {n} variants");
}

#[tokio::test]
async fn two_instances_share_one_redis_cache() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let (up, calls) = upstream().await;
    let cache = format!(
        "{{ name: pages, max_object: 64KiB, redis: {{ url: '{}' }} }}",
        redis.url()
    );
    let (a, b) = (instance(&up, &cache).await, instance(&up, &cache).await);

    // What A stored, B serves, variant by variant.
    let key: &[u8] = b"gateway:cache:pages:http://a.example/page";
    let first = get(&a, "/page", Some("en")).await;
    assert_eq!(cache_status(&first), "gateway; fwd=uri-miss; stored");
    variants(&redis, key, 1).await;
    let from_b = get(&b, "/page", Some("en")).await;
    assert!(is_hit(&from_b), "{from_b:?}");
    assert_eq!(from_b.body(), first.body());
    assert!(from_b.headers().contains_key("age"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let fr = get(&b, "/page", Some("fr")).await;
    assert!(!is_hit(&fr), "another variant: {fr:?}");
    // One Redis hash per URL, its variants in it.
    variants(&redis, key, 2).await;
    let fr_from_a = get(&a, "/page", Some("fr")).await;
    assert!(is_hit(&fr_from_a), "{fr_from_a:?}");
    assert_eq!(fr_from_a.body(), fr.body());
    assert_eq!(get(&a, "/page", Some("en")).await.body(), first.body());
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Kept as long as they may be served: max-age (60 s) plus stale-if-error (30 s).
    let ttl = redis.integer(&[b"PTTL", key]).await;
    assert!((80_000..=90_000).contains(&ttl), "ttl {ttl} ms");

    // Over max_object: served, never sent to Redis.
    let big = get(&a, "/big", None).await;
    assert_eq!(big.status(), 200);
    assert!(big.body().len() > 64 * 1024);
    assert!(!is_hit(&get(&b, "/big", None).await));
    assert_eq!(
        redis
            .integer(&[b"EXISTS", b"gateway:cache:pages:http://a.example/big"])
            .await,
        0
    );

    // A purge through A's admin reaches what B serves.
    let res = purge(&a, "prefix=http%3A%2F%2Fa.example%2Fpa", Some(TOKEN)).await;
    assert_eq!(res.status(), 200, "{res:?}");
    assert_eq!(json(&res)["purged"]["pages"], 1);
    assert_eq!(redis.integer(&[b"EXISTS", key]).await, 0);
    let calls_before = calls.load(Ordering::SeqCst);
    assert!(!is_hit(&get(&b, "/page", Some("en")).await));
    assert_eq!(calls.load(Ordering::SeqCst), calls_before + 1);

    // Garbage under a key (another program, another version) is a miss, not a failure.
    let garbage: &[u8] = b"gateway:cache:pages:http://a.example/garbage";
    redis
        .command(&[b"HSET", garbage, b"variant", b"GWC\x01not a response"])
        .await;
    let res = get(&a, "/garbage", None).await;
    assert_eq!(res.status(), 200);
    assert!(cache_status(&res).contains("fwd=uri-miss"), "{res:?}");

    // Redis gone: every request is a miss the upstream answers, no error, no hang; the
    // failures are counted.
    hit(&a, "/page", Some("en")).await;
    redis.stop();
    for _ in 0..3 {
        let res = get(&a, "/page", Some("en")).await;
        assert_eq!(res.status(), 200);
        assert!(!is_hit(&res), "{res:?}");
    }
    let scraped = a.metrics.encode(Format::Prometheus);
    assert!(
        scraped
            .lines()
            .any(|l| l.starts_with("gateway_cache_store_errors_total{cache=\"pages\"")),
        "{scraped}"
    );
    // And a purge says which cache it could not reach.
    let res = purge(&a, "url=http%3A%2F%2Fa.example%2Fpage", Some(TOKEN)).await;
    assert_eq!(res.status(), 502, "{res:?}");
    assert_eq!(json(&res)["failed"][0], "pages");
}
