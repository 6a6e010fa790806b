//! Retries over real sockets: a flaky upstream behind budgets of 0.5 and 0.1, an endpoint
//! refusing connections behind the default setup, POSTs never sent twice, resets retried
//! elsewhere, `Retry-After` and the route's deadline, and bodies replayed up to the cap.
#![cfg(feature = "config")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::Body;
use gateway_core::test_util::{TestUpstream, raw, refused_addr};
use http::Response;
use http_body_util::BodyExt;
use support::scripted::{Reply, Scripted};
use support::{Gateway, eventually, fetch, request, within};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// A gateway with one route `/` to the upstream of `endpoints`, under `plugins` (YAML list
/// items, indented for the route).
async fn gateway(endpoints: &[String], plugins: &str) -> Gateway {
    let endpoints = endpoints.join(", ");
    let plugins = if plugins.is_empty() {
        String::new()
    } else {
        format!("    plugins:\n{plugins}")
    };
    support::start_config(
        &format!(
            "listen: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{endpoints}]
    outlier_detection: off
routes:
  - id: api
    match: {{ path: / }}
    upstream: app
{plugins}"
        ),
        None,
    )
    .await
}

/// An upstream failing a fixed 30% of the calls it gets with 503: call `k` fails when a
/// hash of `k` says so, so a run is the same every time (sequential requests see the same
/// sequence); the calls it got.
async fn flaky() -> (TestUpstream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let up = TestUpstream::serve(move |_| {
        let k = counter.fetch_add(1, Ordering::SeqCst) as u64;
        async move {
            // splitmix64 of the call's number.
            let mut z = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let status = if z % 100 < 30 { 503 } else { 200 };
            Ok(Response::builder()
                .status(status)
                .body(Body::empty())
                .expect("a response"))
        }
    })
    .await;
    (up, calls)
}

/// Sends `n` GETs one after the other; how many succeeded.
async fn successes(gw: &Gateway, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(fetch(gw.addr, request("GET", "/", &[])).await.status() == 200);
    }
    ok
}

#[tokio::test]
async fn a_budget_of_half_hides_a_30_percent_failure_rate_and_a_tenth_caps_the_extra_load() {
    const N: usize = 2000;
    let (up, calls) = flaky().await;
    let gw = gateway(
        &[up.url()],
        "      - retry: { tries: 4, budget: { ratio: 0.5 }, backoff: { base: 1ms, max: 4ms } }\n",
    )
    .await;
    let ok = successes(&gw, N).await;
    let sent = calls.load(Ordering::SeqCst);
    assert!(ok * 100 >= N * 99, "{ok} of {N} succeeded");
    assert!(
        sent * 2 <= N * 3,
        "the upstream got {sent} calls for {N} requests"
    );
    eprintln!("budget 0.5: {ok} of {N} succeeded, {sent} upstream calls");

    let (up, calls) = flaky().await;
    let gw = gateway(
        &[up.url()],
        "      - retry: { tries: 4, budget: { ratio: 0.1, floor: 0 }, backoff: { base: 1ms, max: 4ms } }\n",
    )
    .await;
    let fewer = successes(&gw, N).await;
    let sent = calls.load(Ordering::SeqCst);
    eprintln!("budget 0.1: {fewer} of {N} succeeded, {sent} upstream calls");
    assert!(
        sent - N <= N / 10,
        "{} extra calls for {N} requests",
        sent - N
    );
    assert!(sent > N, "some retries were made");
    assert!(
        fewer < ok,
        "{fewer} succeeded with the small budget, {ok} with the large"
    );
}

#[tokio::test]
async fn an_endpoint_refusing_connections_costs_no_502_by_default() {
    let up = TestUpstream::echo().await;
    let dead = format!("http://{}", refused_addr().await);
    // No retry plugin: the proxy sends what could not be sent to the other endpoint.
    let gw = gateway(&[dead.clone(), up.url()], "").await;
    for n in 0..50 {
        let method = if n % 2 == 0 { "GET" } else { "POST" };
        let res = fetch(gw.addr, request(method, "/", &[])).await;
        assert_eq!(res.status(), 200, "request {n} ({method})");
    }
    assert_eq!(up.requests().len(), 50);
    // Both endpoints dead: a 502, after each was tried once.
    let other = format!("http://{}", refused_addr().await);
    let gw = gateway(&[dead, other], "").await;
    assert_eq!(fetch(gw.addr, request("GET", "/", &[])).await.status(), 502);
}

#[tokio::test]
async fn a_sent_post_is_never_sent_again_and_a_reset_get_goes_to_the_other_endpoint() {
    // An endpoint that reads each request, then closes the connection without a word.
    let resets = Scripted::start(|_| Reply::close(Vec::new())).await;
    let up = TestUpstream::echo().await;
    let gw = gateway(&[resets.url.clone(), up.url()], "      - retry: {}\n").await;
    for _ in 0..10 {
        let res = fetch(gw.addr, request("GET", "/", &[])).await;
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        up.requests().len(),
        10,
        "every GET answered by the live endpoint"
    );
    assert!(
        !resets.requests().is_empty(),
        "some GETs went to the resetting one first"
    );

    let (resets_before, up_before) = (resets.requests().len(), up.requests().len());
    let mut failed = 0;
    for n in 0..10 {
        let mut req = request("POST", "/", &[]);
        *req.body_mut() = Bytes::from(format!("order {n}"));
        let status = fetch(gw.addr, req).await.status();
        assert!(status == 200 || status == 502, "{status}");
        failed += usize::from(status == 502);
    }
    let to_resets = resets.requests().len() - resets_before;
    let to_up = up.requests().len() - up_before;
    assert_eq!(to_resets + to_up, 10, "each POST was sent once");
    assert_eq!(
        failed, to_resets,
        "a reset POST fails rather than going elsewhere"
    );
    assert!(failed > 0);
}

#[tokio::test]
async fn retry_after_delays_the_retry_unless_it_would_pass_the_deadline() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    // Every other call is a 503 asking for 2 s.
    let up = TestUpstream::serve(move |_| {
        let first = counter.fetch_add(1, Ordering::SeqCst).is_multiple_of(2);
        async move {
            let res = if first {
                Response::builder().status(503).header("retry-after", "2")
            } else {
                Response::builder().status(200)
            };
            Ok(res.body(Body::empty()).unwrap())
        }
    })
    .await;
    let gw = gateway(&[up.url()], "      - retry: {}\n").await;
    let started = Instant::now();
    assert_eq!(fetch(gw.addr, request("GET", "/", &[])).await.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A route that must answer within a second: the 503 goes back at once.
    let gw = gateway(
        &[up.url()],
        "      - timeout: { total: 1s }\n      - retry: {}\n",
    )
    .await;
    let res = within("the 503", fetch(gw.addr, request("GET", "/", &[]))).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "2");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_large_upload_streams_and_is_not_retried_but_a_small_one_is() {
    let received = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, kept) = (Arc::clone(&received), Arc::clone(&bodies));
    // Reads each body as it comes, counting; fails every first call of a pair with 503.
    let up = TestUpstream::serve(move |req| {
        let (seen, kept) = (Arc::clone(&seen), Arc::clone(&kept));
        async move {
            let mut body = req.into_body();
            let mut len = 0;
            while let Some(frame) = body.frame().await {
                let n = frame?.data_ref().map_or(0, Bytes::len);
                len += n;
                seen.fetch_add(n, Ordering::SeqCst);
            }
            let calls = {
                let mut kept = kept.lock().unwrap();
                kept.push(len);
                kept.len()
            };
            let status = if calls % 2 == 1 { 503 } else { 200 };
            Ok(Response::builder()
                .status(status)
                .body(Body::empty())
                .expect("a response"))
        }
    })
    .await;
    let gw = gateway(&[up.url()], "      - retry: { replay_limit: 64KiB }\n").await;

    // 1 MiB: half of it goes out, and reaches the upstream before the rest is written.
    const MIB: usize = 1024 * 1024;
    let mut client = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head =
        format!("PUT / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: {MIB}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&vec![b'x'; MIB / 2]).await.unwrap();
    eventually("the upload's first half reaches the upstream", || {
        received.load(Ordering::SeqCst) > 0
    })
    .await;
    client.write_all(&vec![b'y'; MIB / 2]).await.unwrap();
    let answer = raw::read_until_idle(&mut client, Duration::from_secs(3)).await;
    assert_eq!(raw::statuses(&answer), [503], "not retried");
    assert_eq!(*bodies.lock().unwrap(), [MIB]);

    // 1 KiB: retried, the same bytes again.
    bodies.lock().unwrap().clear();
    let mut req = request("PUT", "/", &[]);
    *req.body_mut() = Bytes::from(vec![b'z'; 1024]);
    assert_eq!(fetch(gw.addr, req).await.status(), 200);
    assert_eq!(*bodies.lock().unwrap(), [1024, 1024]);
}
