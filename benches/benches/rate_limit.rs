//! Per-request cost of the rate-limit layer: a local keyed check with 100,000 keys held
//! (one limit, then two stacked with a concurrency limit, and without headers), and the
//! latency Redis adds, one round trip per request and with leases (against a
//! `redis-server` the bench starts on a free port; skipped when there is none).
//!
//! `cargo bench -p gateway-benches --bench rate_limit`

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use divan::AllocProfiler;
use gateway_benches::{ok_service, ready};
use gateway_core::{Body, ClientIp};
use gateway_middleware::rate_limit::{
    Batch, Distributed, HeaderStyle, Limit, Quota, RateLimitLayer,
};
use gateway_middleware::redis::Redis;
use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

const KEYS: u32 = 100_000;

fn main() {
    divan::main();
}

fn from(n: u32) -> Request<Body> {
    let mut req = Request::new(Body::empty());
    let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
    req.extensions_mut().insert(ClientIp::new(ip, false));
    req
}

/// `layer` over an answering service, with `KEYS` clients already counted.
fn filled(
    layer: &RateLimitLayer,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone
{
    let svc = layer.layer(ok_service());
    for n in 0..KEYS {
        let _ = ready(svc.clone().oneshot(from(n)));
    }
    svc
}

fn bench_layer(b: divan::Bencher<'_, '_>, layer: &RateLimitLayer) {
    let svc = filled(layer);
    let mut n = 0_u32;
    b.with_inputs(|| {
        n = (n + 7_919) % KEYS;
        from(n)
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// The answering service alone, for the layer's cost by difference.
#[divan::bench]
fn baseline(b: divan::Bencher<'_, '_>) {
    let svc = ok_service();
    let mut n = 0_u32;
    b.with_inputs(|| {
        n = (n + 7_919) % KEYS;
        from(n)
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// One limit, one client: the map in cache.
#[divan::bench]
fn local_one_key(b: divan::Bencher<'_, '_>) {
    let svc = RateLimitLayer::per_ip(Quota::per_second(1_000_000_000 / 1_000)).layer(ok_service());
    b.with_inputs(|| from(1))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// One limit per client address, 100,000 addresses held.
#[divan::bench]
fn local_one_limit(b: divan::Bencher<'_, '_>) {
    let layer = RateLimitLayer::per_ip(Quota::per_second(1_000)).max_keys(200_000);
    bench_layer(b, &layer);
}

/// The same, without response headers: what rendering them costs.
#[divan::bench]
fn local_one_limit_no_headers(b: divan::Bencher<'_, '_>) {
    let layer = RateLimitLayer::per_ip(Quota::per_second(1_000))
        .max_keys(200_000)
        .headers(HeaderStyle::None);
    bench_layer(b, &layer);
}

/// Two rates stacked and a concurrency limit, 100,000 addresses held in each.
#[divan::bench]
fn local_stacked(b: divan::Bencher<'_, '_>) {
    let layer = RateLimitLayer::per_ip(Quota::per_second(1_000))
        .and(Limit::rate("hour", Quota::per_hour(1_000_000)))
        .and(Limit::concurrent("inflight", 64))
        .max_keys(200_000);
    bench_layer(b, &layer);
}

/// A `redis-server` on a free port, killed when dropped.
struct Server(Child, u16);

impl Server {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self(child, port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench_redis(b: divan::Bencher<'_, '_>, batch: Option<Batch>) {
    let Some(server) = Server::start() else {
        eprintln!("no redis-server: skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let redis = Redis::builder(format!("redis://127.0.0.1:{}/0", server.1))
        .build()
        .expect("a Redis URL");
    let mut distributed = Distributed::new(redis).namespace("bench");
    if let Some(batch) = batch {
        distributed = distributed.batch(batch);
    }
    let layer = RateLimitLayer::per_ip(Quota::per_second(1_000_000)).distributed(distributed);
    let svc = rt.block_on(async { layer.layer(ok_service()) });
    let mut n = 0_u32;
    b.with_inputs(|| {
        n = (n + 1) % 100;
        from(n)
    })
    .bench_local_values(|req| rt.block_on(svc.clone().oneshot(req)));
    drop(server);
}

/// One round trip per request.
#[divan::bench(sample_count = 50, sample_size = 20)]
fn redis_each_request(b: divan::Bencher<'_, '_>) {
    bench_redis(b, None);
}

/// Leases of 20 tokens, given back after 250 ms.
#[divan::bench(sample_count = 50, sample_size = 20)]
fn redis_leased(b: divan::Bencher<'_, '_>) {
    bench_redis(b, Some(Batch::new(20, Duration::from_millis(250))));
}
