//! Slow and stalled clients at scale cost the gateway nothing while they wait, and do not
//! keep anyone else waiting.
//!
//! NOTE: this binary measures the CPU time of its own process (`/proc/self/stat`): its tests
//! must not share the process with busy ones, so they live here, alone.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

mod support;

use std::time::Duration;

use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use support::{Gateway, get, proxy_to, raw, status};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The CPU time this process has used, user and system (Linux: `/proc` counts in
/// hundredths of a second).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces), from the state on: utime and
    // stime are the 12th and 13th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Finding 4b of the hardening review: a client that sent part of `PRI` had the HTTP/2
/// sniff peek and sleep 1 ms in a loop: 1,000 of them burnt 2.6 s of CPU every 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_stalled_in_the_preface_cost_no_cpu() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(b"P").await.unwrap();
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_time() - before;
    // Idle, the process spends nothing measurable; the spinning sniff spent most of a core.
    assert!(spent < Duration::from_millis(200), "{spent:?} in 2 s");
    // Meanwhile a well-behaved client is served as usual.
    let res = raw(gw.addr, &get("/", "")).await;
    assert_eq!(status(&res), 200, "{res}");
    drop(stalled);
}
