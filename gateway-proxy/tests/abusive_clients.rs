//! Abusive clients at scale: slowloris heads and bodies, clients that stop reading, idle
//! keep-alives, thousands at once, do not starve a well-behaved client or grow memory
//! without bound.
//!
//! NOTE: this binary measures the memory of its own process (`/proc/self/status`): its one
//! test must not share the process with others.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

mod support;

use std::time::Duration;

use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use support::{Gateway, get, proxy_to, raw, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// VmRSS of this process (the gateway, its upstream and its clients), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The soft limit on open files: the test needs about 8,000.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// 2,000 abusive connections held at once: 500 trickle a request head a byte at a time,
/// 500 trickle a request body, 500 asked for a large response and read nothing, 500 sit
/// idle after a request. Meanwhile a well-behaved client's 200 requests all succeed
/// (each within a 5 s bound: starvation would show as timeouts, not as a slower median),
/// and the process's memory grows by less than 120 MiB (measured: 77 MiB, of which
/// 50 MiB for the 500 readers, whose in-flight response pieces are up to 64 KiB on each
/// side of the gateway, 18 MiB for the 500 uploads, which hold an upstream connection
/// each, and 5 MiB for the 500 unfinished heads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_slowloris_connections_do_not_starve_a_normal_client() {
    const EACH: usize = 500;
    let limit = open_files_limit();
    assert!(
        limit >= 8_000,
        "this test holds about 8,000 sockets; raise the open-files limit (ulimit -n), now {limit}"
    );
    let echo = TestUpstream::echo().await;
    let big = TestUpstream::streaming(64 << 20).await;
    let app = Router::new()
        .route(Route::prefix("/big"), proxy_to(&big))
        .route(Route::prefix("/"), proxy_to(&echo));
    let gw = Gateway::start(app).await;
    let addr = gw.addr;

    // Warm-up and the baseline.
    let mut baseline = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        assert_eq!(status(&raw(addr, &get("/", "")).await), 200);
        baseline.push(started.elapsed());
    }
    let rss_before = rss_kib();

    let mut held = Vec::with_capacity(4 * EACH);
    // Heads, a byte at a time, never finished.
    let mut heads = Vec::with_capacity(EACH);
    for _ in 0..EACH {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        heads.push(c);
    }
    // Bodies: a 1 MB upload, a byte at a time.
    let mut bodies = Vec::with_capacity(EACH);
    for _ in 0..EACH {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nx")
            .await
            .unwrap();
        bodies.push(c);
    }
    // Readers that never read a 64 MiB response.
    for _ in 0..EACH {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(get("/big", "").as_bytes()).await.unwrap();
        held.push(c);
    }
    // Idle keep-alives, after one request each.
    for _ in 0..EACH {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(get("/", "").as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = support::within("a response", c.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0);
        held.push(c);
    }

    // The trickle goes on while the normal client works.
    let trickle = tokio::spawn(async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for c in heads.iter_mut().chain(bodies.iter_mut()) {
                let _ = c.write_all(b"x").await;
            }
        }
        (heads, bodies)
    });

    let mut latencies = Vec::new();
    for i in 0..200 {
        let started = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(5), raw(addr, &get("/", "")))
            .await
            .unwrap_or_else(|_| panic!("request {i} starved"));
        assert_eq!(status(&res), 200, "{res}");
        latencies.push(started.elapsed());
    }
    let rss_during = rss_kib();
    let (heads, bodies) = trickle.await.unwrap();
    assert_eq!(heads.len() + bodies.len() + held.len(), 4 * EACH);

    latencies.sort();
    baseline.sort();
    let grew = rss_during.saturating_sub(rss_before);
    println!(
        "normal client: p50 {:?} p99 {:?} max {:?} (alone: p50 {:?} max {:?}); RSS {} MiB -> {} MiB (+{} MiB) with {} abusive connections",
        latencies[100],
        latencies[198],
        latencies[199],
        baseline[25],
        baseline[49],
        rss_before / 1024,
        rss_during / 1024,
        grew / 1024,
        4 * EACH
    );
    assert!(grew < 120 * 1024, "RSS grew by {} MiB", grew / 1024);
    drop((heads, bodies, held));
}
