//! Per-request cost of the cache layer: a hit (lookup, `Vary` match, freshness, the
//! response built from the stored one with `Age` and `Cache-Status`), next to the
//! answering service alone; and the parsing of `Cache-Control`.
//!
//! `cargo bench -p gateway-benches --bench cache`

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use divan::AllocProfiler;
use gateway_benches::{ok_service, ready};
use gateway_core::Body;
use gateway_middleware::cache::{CacheControl, CacheLayer, Key, MemoryStore, Store, Stored};
use http::{HeaderMap, Request, StatusCode};
use tower::{Layer, ServiceExt};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

/// A GET as an API client sends it.
fn request() -> Request<Body> {
    Request::get("/api/catalog/42?expand=items")
        .header("host", "api.example.com")
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, br")
        .header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0")
        .body(Body::empty())
        .expect("a request")
}

/// A store holding the response to [`request`]: 1 KiB, `Vary: Accept-Encoding`.
fn warm_store() -> MemoryStore {
    let store = MemoryStore::with_capacity(64 * 1024 * 1024);
    let req = request();
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("content-type", "application/json"),
        ("cache-control", "public, max-age=3600"),
        ("vary", "Accept-Encoding"),
        ("etag", "\"5d8c72a5edda8d6a\""),
        ("date", &httpdate::fmt_http_date(SystemTime::now())),
    ] {
        headers.insert(
            http::header::HeaderName::from_static(name),
            value.parse().expect("a value"),
        );
    }
    let now = SystemTime::now();
    let body = Bytes::from(vec![b'x'; 1024]);
    let stored = Stored::new(
        req.headers(),
        StatusCode::OK,
        headers,
        body,
        (now, now),
        None,
    )
    .expect("a response to store");
    let key = Key::of(req.uri(), req.headers(), false).expect("a key");
    ready(store.put(&key, Arc::new(stored))).expect("stored");
    store
}

/// The answering service alone.
#[divan::bench]
fn baseline(b: divan::Bencher<'_, '_>) {
    let svc = ok_service();
    b.with_inputs(request)
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// A hit: the upstream is not called.
#[divan::bench]
fn hit(b: divan::Bencher<'_, '_>) {
    let svc = CacheLayer::new(warm_store()).layer(ok_service());
    b.with_inputs(request).bench_local_values(|req| {
        let res = ready(svc.clone().oneshot(req)).expect("a response");
        assert!(res.headers().contains_key("age"));
        res
    });
}

/// `Cache-Control` of a typical response, parsed.
#[divan::bench]
fn parse_cache_control(b: divan::Bencher<'_, '_>) {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CACHE_CONTROL,
        "public, max-age=3600, s-maxage=600, stale-while-revalidate=60"
            .parse()
            .expect("a value"),
    );
    b.bench_local(|| CacheControl::parse(divan::black_box(&headers)));
}
