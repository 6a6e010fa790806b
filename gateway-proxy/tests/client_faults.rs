//! Failures on the client's side of an exchange are the client's: aborted, malformed and
//! slow uploads never count against the upstream (no ejection, no timeout), while an
//! upstream that fails the same requests itself still is ejected.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use gateway_core::test_util::TestUpstream;
use gateway_proxy::upstream::{OutlierDetection, RoundRobin};
use gateway_proxy::{Endpoint, ReverseProxy, Route, Router, Upstream};
use support::scripted::{Reply, Scripted};
use support::{Gateway, body_of, raw, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// An upstream over `urls` that ejects an endpoint after 5 failures in a row (any share of
/// them), behind a gateway whose request bodies may idle for `body_idle`.
async fn gateway(urls: &[&str], body_idle: Duration) -> (Gateway, Upstream) {
    let endpoints = urls.iter().map(|u| u.parse::<Endpoint>().unwrap());
    let upstream = Upstream::builder(endpoints, RoundRobin::default())
        .outlier_detection(OutlierDetection::new(5).max_ejected_percent(100))
        .build();
    let proxy = ReverseProxy::builder(upstream.clone())
        .response_header_timeout(Some(Duration::from_secs(2)))
        .body_idle_timeout(Some(body_idle))
        .build()
        .unwrap();
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy)).await;
    (gw, upstream)
}

/// Sends `bytes`, waits `wait`, then closes (or, with `read`, reads the answer first).
async fn upload(addr: SocketAddr, bytes: &'static [u8], wait: Duration, read: bool) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(bytes).await.unwrap();
    tokio::time::sleep(wait).await;
    let mut out = Vec::new();
    if read {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn none_ejected(upstream: &Upstream) {
    let now = Instant::now();
    for endpoint in upstream.endpoints().iter() {
        assert!(!endpoint.is_ejected(now), "{endpoint} was ejected");
        assert_eq!(endpoint.consecutive_failures(), 0, "{endpoint}");
    }
}

/// Finding 2 of the hardening review: any client could keep endpoints out of rotation by
/// aborting five uploads in a row, or sending five malformed chunked bodies.
#[tokio::test]
async fn aborted_malformed_and_stalled_uploads_eject_nothing() {
    let (a, b) = (TestUpstream::echo().await, TestUpstream::echo().await);
    let (gw, upstream) = gateway(&[&a.url(), &b.url()], Duration::from_millis(300)).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            match i % 3 {
                // Aborted: the head and part of the body, then gone.
                0 => {
                    let req = b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc";
                    upload(addr, req, Duration::from_millis(100), false).await;
                }
                // Malformed: a chunk size that is not one (the gateway answers 400).
                1 => {
                    let req = b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n";
                    let res = upload(addr, req, Duration::ZERO, true).await;
                    assert_eq!(status(&res), 400, "{res}");
                }
                // Stalled: part of the body, then nothing past the body idle timeout (408).
                _ => {
                    let req = b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc";
                    let res = upload(addr, req, Duration::ZERO, true).await;
                    assert_eq!(status(&res), 408, "{res}");
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    none_ejected(&upstream);
    // Both endpoints still take requests.
    for _ in 0..4 {
        let res = raw(gw.addr, &support::get("/", "")).await;
        assert_eq!(status(&res), 200, "{res}");
    }
    assert!(!a.requests().is_empty() && !b.requests().is_empty());
}

/// The same uploads, sent whole, to an upstream that itself drops them: that endpoint is
/// ejected (the test above can fail).
#[tokio::test]
async fn an_upstream_failing_uploads_itself_is_ejected() {
    let good = TestUpstream::echo().await;
    let bad = Scripted::start(|_| Reply::close("")).await;
    let (gw, upstream) = gateway(&[&good.url(), &bad.url], Duration::from_secs(5)).await;
    let req = "POST /u HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc";
    for _ in 0..12 {
        let _ = raw(gw.addr, req).await;
    }
    let now = Instant::now();
    let ejected: Vec<_> = upstream
        .endpoints()
        .iter()
        .filter(|e| e.is_ejected(now))
        .map(ToString::to_string)
        .collect();
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert!(bad.url.ends_with(&ejected[0]), "{ejected:?} vs {}", bad.url);
}

/// Finding 4a: the response-header timeout starts once the request is all sent, so an
/// upload trickled for longer than it is neither a 504 nor a failure of the upstream.
#[tokio::test]
async fn an_upload_trickled_past_the_response_header_timeout_succeeds() {
    let up = TestUpstream::echo().await;
    let upstream = Upstream::single(&up.url()).unwrap();
    let proxy = ReverseProxy::builder(upstream.clone())
        .response_header_timeout(Some(Duration::from_secs(1)))
        .build()
        .unwrap();
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy)).await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"POST /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 20\r\n\r\n")
        .await
        .unwrap();
    // 20 bytes over 2 s: twice the response-header timeout.
    for byte in b"abcdefghijklmnopqrst" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.write_all(&[*byte]).await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let res = String::from_utf8_lossy(&out);
    assert_eq!(
        (status(&res), body_of(&res)),
        (200, "abcdefghijklmnopqrst"),
        "{res}"
    );
    none_ejected(&upstream);
}

/// The acceptance case on the default settings (a 60 s response-header timeout): an upload
/// trickled over two minutes, in paused time.
#[tokio::test(start_paused = true)]
async fn a_two_minute_upload_succeeds_under_the_defaults() {
    let up = TestUpstream::echo().await;
    let proxy = ReverseProxy::new(Upstream::single(&up.url()).unwrap());
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy)).await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"POST /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 120\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.write_all(b"x").await.unwrap();
    }
    assert!(started.elapsed() >= Duration::from_secs(120));
    let mut out = Vec::new();
    support::within("the answer and the close", c.read_to_end(&mut out))
        .await
        .unwrap();
    let res = String::from_utf8_lossy(&out);
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(body_of(&res).len(), 120, "{res}");
}
