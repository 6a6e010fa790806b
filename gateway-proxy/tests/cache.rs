//! The cache layer in front of the proxy, over real sockets: misses stored as they
//! stream, hits without the upstream (HEAD and conditional requests too), and the rules
//! that keep one client's response from another: host and scheme in the key, unkeyed
//! fields, `Authorization`, `Vary`, `no-store`/`private`/`Set-Cookie`, truncated bodies,
//! invalidation by unsafe methods, `only-if-cached`.
#![cfg(feature = "config")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use gateway_middleware::cache::{CacheLayer, MemoryStore};
use http::{Request, Response};
use support::{Gateway, fetch, proxy_to};
use tower::ServiceBuilder;

/// An upstream answering every request with `headers` and a body naming the request
/// (path, host, `Accept-Encoding`, call number), counting calls.
async fn upstream(
    headers: &'static [(&'static str, &'static str)],
) -> (TestUpstream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let up = TestUpstream::serve(move |req| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let body = format!(
            "{} host={} ae={} xfh={} call={n}",
            req.uri().path(),
            header("host"),
            header("accept-encoding"),
            header("x-forwarded-host"),
        );
        async move {
            let mut res = Response::builder();
            for (name, value) in headers {
                res = res.header(*name, *value);
            }
            Ok(res.body(Body::from(body)).expect("a response"))
        }
    })
    .await;
    (up, calls)
}

async fn cached(up: &TestUpstream) -> (Gateway, MemoryStore) {
    let store = MemoryStore::with_capacity(16 * 1024 * 1024);
    let app = ServiceBuilder::new()
        .layer(CacheLayer::new(store.clone()))
        .service(proxy_to(up));
    (Gateway::start(app).await, store)
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
    let mut req = Request::get(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req = req.header("host", "a.example");
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Bytes::new()).expect("a request")
}

fn cache_status(res: &Response<Bytes>) -> &str {
    res.headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The store is written when the body has ended: wait for it.
async fn stored(store: &MemoryStore, keys: usize) {
    support::eventually("the response is stored", || store.len() >= keys).await;
}

#[tokio::test]
async fn a_miss_is_stored_and_the_next_request_is_a_hit_without_the_upstream() {
    let (up, calls) = upstream(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")]).await;
    let (gw, store) = cached(&up).await;
    let first = fetch(gw.addr, get("/x?q=1", &[])).await;
    assert_eq!(first.status(), 200);
    assert_eq!(cache_status(&first), "gateway; fwd=uri-miss; stored");
    stored(&store, 1).await;

    let second = fetch(gw.addr, get("/x?q=1", &[])).await;
    assert_eq!(second.body(), first.body());
    assert!(
        cache_status(&second).starts_with("gateway; hit; ttl="),
        "{second:?}"
    );
    assert!(second.headers().contains_key("age"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // HEAD from the stored GET: the same fields, no body.
    let head = fetch(
        gw.addr,
        Request::head("/x?q=1")
            .header("host", "a.example")
            .body(Bytes::new())
            .unwrap(),
    )
    .await;
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        first.body().len().to_string().as_str()
    );
    assert!(head.body().is_empty());
    // A conditional request the stored response satisfies: 304 from the cache.
    let not_modified = fetch(gw.addr, get("/x?q=1", &[("if-none-match", "W/\"v1\"")])).await;
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], "\"v1\"");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Another query is another key.
    let other = fetch(gw.addr, get("/x?q=2", &[])).await;
    assert_eq!(cache_status(&other), "gateway; fwd=uri-miss; stored");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn host_is_keyed_and_a_forwarded_host_cannot_poison_the_entry() {
    let (up, calls) = upstream(&[("cache-control", "max-age=60")]).await;
    let (gw, store) = cached(&up).await;
    let a = fetch(
        gw.addr,
        get(
            "/p",
            &[("host", "a.example"), ("x-forwarded-host", "evil.example")],
        ),
    )
    .await;
    stored(&store, 1).await;
    let b = fetch(gw.addr, get("/p", &[("host", "b.example")])).await;
    assert!(
        String::from_utf8_lossy(b.body()).contains("xfh=b.example"),
        "{b:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "Host b is not served Host a's entry"
    );
    // The client's X-Forwarded-Host never reached the upstream (the proxy sets its own
    // from the Host it keyed on), so it is not in the entry.
    assert!(
        String::from_utf8_lossy(a.body()).contains("xfh=a.example"),
        "{a:?}"
    );
    let plain = fetch(gw.addr, get("/p", &[("host", "a.example")])).await;
    assert_eq!(plain.body(), a.body());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_response_to_an_authorized_request_is_not_served_to_others() {
    let (up, calls) = upstream(&[("cache-control", "max-age=60")]).await;
    let (gw, store) = cached(&up).await;
    let with_a = fetch(gw.addr, get("/me", &[("authorization", "Bearer A")])).await;
    assert_eq!(cache_status(&with_a), "gateway; fwd=uri-miss");
    assert!(store.is_empty());
    let with_b = fetch(gw.addr, get("/me", &[("authorization", "Bearer B")])).await;
    assert_eq!(cache_status(&with_b), "gateway; fwd=uri-miss");
    let without = fetch(gw.addr, get("/me", &[])).await;
    assert_eq!(cache_status(&without), "gateway; fwd=uri-miss; stored");
    assert_ne!(without.body(), with_a.body());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    stored(&store, 1).await;

    // `public` allows sharing it.
    let (up, calls) = upstream(&[("cache-control", "public, max-age=60")]).await;
    let (gw, store) = cached(&up).await;
    fetch(gw.addr, get("/pub", &[("authorization", "Bearer A")])).await;
    stored(&store, 1).await;
    let res = fetch(gw.addr, get("/pub", &[])).await;
    assert!(cache_status(&res).contains("hit"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn vary_keeps_encodings_apart() {
    let (up, calls) =
        upstream(&[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")]).await;
    let (gw, store) = cached(&up).await;
    let gzip = fetch(gw.addr, get("/v", &[("accept-encoding", "gzip, br")])).await;
    stored(&store, 1).await;
    let identity = fetch(gw.addr, get("/v", &[])).await;
    assert_eq!(cache_status(&identity), "gateway; fwd=vary-miss; stored");
    assert!(String::from_utf8_lossy(identity.body()).contains("ae=-"));
    // The same preference in another order and case is the same variant.
    let again = fetch(gw.addr, get("/v", &[("accept-encoding", "BR,gzip")])).await;
    assert!(cache_status(&again).contains("hit"), "{again:?}");
    assert_eq!(again.body(), gzip.body());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn responses_that_must_not_be_shared_are_not_stored() {
    for headers in [
        &[("cache-control", "max-age=60, no-store")][..],
        &[("cache-control", "private, max-age=60")],
        &[("cache-control", "max-age=60"), ("set-cookie", "session=1")],
        &[("cache-control", "max-age=60"), ("vary", "*")],
        &[],
    ] {
        let (up, calls) = upstream(headers).await;
        let (gw, store) = cached(&up).await;
        for _ in 0..2 {
            let res = fetch(gw.addr, get("/s", &[])).await;
            assert_eq!(cache_status(&res), "gateway; fwd=uri-miss", "{headers:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{headers:?}");
        assert!(store.is_empty());
    }
}

#[tokio::test]
async fn a_truncated_body_is_never_stored() {
    use futures_util::stream;
    use http_body::Frame;
    let up = TestUpstream::serve(|_| async {
        // The head and a part of the body go out; then the upstream dies.
        let frames = stream::unfold(0, |step| async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"half of it"))), 1)),
                1 => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    Some((Err(std::io::Error::other("the upstream died")), 2))
                }
                _ => None,
            }
        });
        Ok(Response::builder()
            .header("cache-control", "max-age=60")
            .header("content-length", "100")
            .body(Body::new(http_body_util::StreamBody::new(frames)))
            .expect("a response"))
    })
    .await;
    let (gw, store) = cached(&up).await;
    let raw = support::raw(gw.addr, &support::get("/t", "")).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "the head went out: {raw}");
    assert!(raw.contains("half of it"), "{raw}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(store.is_empty(), "a cut body is not stored");
    // Nor one over the object limit, nor one whose length is wrong: the limit.
    let (up, calls) = upstream(&[("cache-control", "max-age=60")]).await;
    let store = MemoryStore::with_capacity(1 << 20);
    let app = ServiceBuilder::new()
        .layer(CacheLayer::new(store.clone()).max_object(10))
        .service(proxy_to(&up));
    let gw = Gateway::start(app).await;
    for _ in 0..2 {
        let res = fetch(gw.addr, get("/big", &[])).await;
        assert!(res.body().len() > 10);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(store.is_empty());
}

#[tokio::test]
async fn unsafe_methods_invalidate_and_only_if_cached_gets_504() {
    let (up, calls) = upstream(&[
        ("cache-control", "max-age=60"),
        ("content-location", "/other"),
    ])
    .await;
    let (gw, store) = cached(&up).await;
    fetch(gw.addr, get("/doc", &[])).await;
    fetch(gw.addr, get("/other", &[])).await;
    stored(&store, 2).await;
    let post = fetch(
        gw.addr,
        Request::post("/doc")
            .header("host", "a.example")
            .body(Bytes::from_static(b"x"))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status(), 200);
    assert!(
        store.is_empty(),
        "the URI and its Content-Location are forgotten"
    );
    let res = fetch(gw.addr, get("/doc", &[])).await;
    assert_eq!(cache_status(&res), "gateway; fwd=uri-miss; stored");
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    let res = fetch(
        gw.addr,
        get("/nothing", &[("cache-control", "only-if-cached")]),
    )
    .await;
    assert_eq!(res.status(), 504);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "only-if-cached never goes upstream"
    );
}

/// An upstream with `cache-control` and an ETag `"v1"`, answering a matching
/// `If-None-Match` with 304, or `status` when it is set to something else than 200.
async fn validating(
    cache_control: &'static str,
) -> (
    TestUpstream,
    Arc<AtomicUsize>,
    Arc<std::sync::atomic::AtomicU16>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let (c, st) = (Arc::clone(&calls), Arc::clone(&status));
    let up = TestUpstream::serve(move |req| {
        c.fetch_add(1, Ordering::SeqCst);
        let status = st.load(Ordering::SeqCst);
        let matches = req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"");
        async move {
            let res = Response::builder()
                .header("cache-control", cache_control)
                .header("etag", "\"v1\"");
            let res = match (status, matches) {
                (200, true) => res.status(304).body(Body::empty()),
                (200, false) => res.body(Body::from("the document")),
                (status, _) => res.status(status).body(Body::from("failing")),
            };
            Ok(res.expect("a response"))
        }
    })
    .await;
    (up, calls, status)
}

#[tokio::test]
async fn a_stale_response_is_validated_and_a_304_makes_it_fresh_again() {
    let (up, calls, _) = validating("max-age=1").await;
    let (gw, store) = cached(&up).await;
    fetch(gw.addr, get("/d", &[])).await;
    stored(&store, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let res = fetch(gw.addr, get("/d", &[])).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.body().as_ref(),
        b"the document",
        "the stored body, validated"
    );
    assert_eq!(
        cache_status(&res),
        "gateway; fwd=stale; fwd-status=304; stored"
    );
    assert_eq!(up.last_request().header("if-none-match"), Some("\"v1\""));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Fresh again: a hit.
    let res = fetch(gw.addr, get("/d", &[])).await;
    assert!(cache_status(&res).contains("hit"), "{res:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stale_if_error_answers_for_a_failing_upstream_unless_must_revalidate() {
    for (cache_control, served_stale) in [
        ("max-age=1, stale-if-error=60", true),
        ("max-age=1, stale-if-error=60, must-revalidate", false),
        ("max-age=1", false),
    ] {
        let (up, _, status) = validating(cache_control).await;
        let (gw, store) = cached(&up).await;
        fetch(gw.addr, get("/e", &[])).await;
        stored(&store, 1).await;
        status.store(503, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let res = fetch(gw.addr, get("/e", &[])).await;
        if served_stale {
            assert_eq!(res.status(), 200, "{cache_control}");
            assert_eq!(res.body().as_ref(), b"the document");
            assert_eq!(
                cache_status(&res),
                "gateway; fwd=stale; fwd-status=503; detail=stale-if-error"
            );
        } else {
            assert_eq!(res.status(), 503, "{cache_control}");
        }
    }
}

/// A slow upstream: 100 concurrent misses for one key make one upstream request; 20
/// concurrent requests with 20 different credentials never share a response.
#[tokio::test]
async fn concurrent_misses_collapse_into_one_upstream_request_but_never_across_credentials() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let up = TestUpstream::serve(move |req| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Ok(Response::builder()
                .header("cache-control", "max-age=60")
                .body(Body::from(format!("call={n} auth={auth}")))
                .expect("a response"))
        }
    })
    .await;
    let (gw, _store) = cached(&up).await;
    let addr = gw.addr;
    let crowd: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { fetch(addr, get("/hot", &[])).await }))
        .collect();
    let mut collapsed = 0;
    for call in crowd {
        let res = support::within("the crowd", call).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.body().as_ref(), b"call=1 auth=-");
        collapsed += usize::from(cache_status(&res).ends_with("detail=collapsed"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one upstream request");
    assert_eq!(collapsed, 99);

    let crowd: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                let auth = format!("Bearer token-{i}");
                let res = fetch(addr, get("/private", &[("authorization", &auth)])).await;
                (auth, res)
            })
        })
        .collect();
    for call in crowd {
        let (auth, res) = support::within("the credentialed crowd", call)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(res.body()).into_owned();
        assert!(body.ends_with(&format!("auth={auth}")), "{auth} got {body}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 21);
}

/// A key whose response is not storable stops collapsing for a while (hit-for-miss):
/// after one `no-store` answer, 10 concurrent requests reach the upstream together
/// instead of 9 of them waiting for the first only to go upstream after it.
#[tokio::test]
async fn a_key_whose_response_is_not_stored_is_not_collapsed() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (now, peak) = (Arc::clone(&in_flight), Arc::clone(&most));
    let up = TestUpstream::serve(move |_| {
        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(n, Ordering::SeqCst);
        let now = Arc::clone(&now);
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(Response::builder()
                .header("cache-control", "no-store")
                .body(Body::from("fresh every time"))
                .expect("a response"))
        }
    })
    .await;
    let (gw, store) = cached(&up).await;
    let addr = gw.addr;
    assert_eq!(fetch(addr, get("/live", &[])).await.status(), 200);
    let crowd: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { fetch(addr, get("/live", &[])).await }))
        .collect();
    for call in crowd {
        let res = support::within("the crowd", call).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(!cache_status(&res).contains("collapsed"), "{res:?}");
    }
    assert_eq!(most.load(Ordering::SeqCst), 10, "all ten upstream at once");
    assert!(store.is_empty());

    // Another key still collapses.
    most.store(0, Ordering::SeqCst);
    let crowd: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { fetch(addr, get("/other", &[])).await }))
        .collect();
    for call in crowd {
        support::within("the second crowd", call).await.unwrap();
    }
    assert!(
        most.load(Ordering::SeqCst) < 10,
        "the first of a key is waited for"
    );
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_in_the_background() {
    let (up, calls, _) = validating("max-age=1, stale-while-revalidate=30").await;
    let (gw, store) = cached(&up).await;
    fetch(gw.addr, get("/swr", &[])).await;
    stored(&store, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let res = fetch(gw.addr, get("/swr", &[])).await;
    assert_eq!(res.body().as_ref(), b"the document");
    let status = cache_status(&res);
    assert!(
        status.starts_with("gateway; hit; ttl=")
            && status.ends_with("detail=stale-while-revalidate"),
        "{status}"
    );
    // The refresh: one conditional request, which makes the entry fresh again.
    support::eventually("the background refresh", || {
        calls.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(up.last_request().header("if-none-match"), Some("\"v1\""));
    let mut fresh = false;
    for _ in 0..50 {
        let res = fetch(gw.addr, get("/swr", &[])).await;
        if !cache_status(&res).contains("detail=") {
            fresh = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(fresh, "the entry was refreshed");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one refresh for all those requests"
    );
}

#[tokio::test]
async fn a_range_of_a_stored_response_is_a_206_from_the_cache() {
    let (up, calls, _) = validating("max-age=60").await;
    let (gw, store) = cached(&up).await;
    fetch(gw.addr, get("/r", &[])).await;
    stored(&store, 1).await;
    let part = fetch(gw.addr, get("/r", &[("range", "bytes=4-11")])).await;
    assert_eq!(part.status(), 206);
    assert_eq!(part.body().as_ref(), b"document");
    assert_eq!(part.headers()["content-range"], "bytes 4-11/12");
    let tail = fetch(
        gw.addr,
        get("/r", &[("range", "bytes=-3"), ("if-range", "\"v1\"")]),
    )
    .await;
    assert_eq!(
        (tail.status().as_u16(), tail.body().as_ref()),
        (206, &b"ent"[..])
    );
    let changed = fetch(
        gw.addr,
        get("/r", &[("range", "bytes=0-2"), ("if-range", "\"v0\"")]),
    )
    .await;
    assert_eq!(
        changed.status(),
        200,
        "another version: the whole of this one"
    );
    let beyond = fetch(gw.addr, get("/r", &[("range", "bytes=50-")])).await;
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], "bytes */12");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// From the config file, with metrics: every request counted once by what the cache did,
/// and the bytes it holds.
#[tokio::test]
async fn the_cache_section_counts_what_it_does() {
    use gateway_core::metrics::{Format, Metrics};
    let (up, calls) = upstream(&[("cache-control", "max-age=60")]).await;
    let metrics = Metrics::new();
    let gw = support::start_config(
        &format!(
            "listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ['{}'] }}
routes:
  - id: api
    match: {{ path: / }}
    upstream: app
    plugins:
      - cache: {{ max_memory: 8MiB, max_object: 1MiB }}
",
            up.url()
        ),
        Some(&metrics),
    )
    .await;
    fetch(gw.addr, get("/m", &[])).await;
    let text = || metrics.encode(Format::Prometheus);
    support::eventually("the response is stored", || {
        !text().contains("gateway_cache_bytes{cache=\"api\"} 0")
    })
    .await;
    for _ in 0..3 {
        fetch(gw.addr, get("/m", &[])).await;
    }
    let post = Request::post("/m")
        .header("host", "a.example")
        .body(Bytes::new())
        .unwrap();
    fetch(gw.addr, post).await;
    let text = text();
    for line in [
        "gateway_cache_requests_total{cache=\"api\",result=\"miss\"} 1",
        "gateway_cache_requests_total{cache=\"api\",result=\"hit\"} 3",
        "gateway_cache_requests_total{cache=\"api\",result=\"bypass\"} 1",
        "gateway_cache_evictions_total{cache=\"api\"} 0",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A 100 MiB miss streams: its first megabyte reaches the client while the upstream is
/// still sending (the upstream sends the rest only once the client has it, so a cache
/// that waited for the whole body would hang here), and past the object limit nothing is
/// held or stored.
#[tokio::test]
async fn a_large_miss_streams_to_the_client_before_the_upstream_is_done() {
    use http_body::Frame;
    use http_body_util::BodyExt;
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: usize = 100;
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let gate = Arc::new(std::sync::Mutex::new(Some(reached_rx)));
    let up = TestUpstream::serve(move |_| {
        let gate = gate.lock().unwrap().take();
        async move {
            let chunk = Bytes::from(vec![b'x'; CHUNK]);
            let frames = futures_util::stream::unfold((0, gate), move |(i, mut gate)| {
                let chunk = chunk.clone();
                async move {
                    if i == CHUNKS {
                        return None;
                    }
                    if i == 1
                        && let Some(gate) = gate.take()
                    {
                        let _ = gate.await;
                    }
                    Some((Ok::<_, std::io::Error>(Frame::data(chunk)), (i + 1, gate)))
                }
            });
            Ok(Response::builder()
                .header("cache-control", "max-age=60")
                .header("content-length", (CHUNK * CHUNKS).to_string())
                .body(Body::new(http_body_util::StreamBody::new(frames)))
                .expect("a response"))
        }
    })
    .await;
    let (gw, store) = cached(&up).await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let res = sender
        .send_request(get("/big", &[]).map(http_body_util::Full::new))
        .await
        .unwrap();
    assert_eq!(res.headers()["cache-status"], "gateway; fwd=uri-miss");
    let mut body = res.into_body();
    let mut received = 0;
    let mut reached_tx = Some(reached_tx);
    while let Some(frame) = support::within("the body", body.frame()).await {
        received += frame.unwrap().into_data().map_or(0, |d| d.len());
        if received >= CHUNK
            && let Some(tx) = reached_tx.take()
        {
            tx.send(()).unwrap();
        }
    }
    assert_eq!(received, CHUNK * CHUNKS);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(store.is_empty(), "over the object limit: not stored");
}
