//! Upstream faults and slow clients: clear errors, never a hang.
#![expect(
    clippy::unwrap_used,
    reason = "the exchange helper panics on failure, like the tests"
)]

mod support;

use std::time::Duration;

use gateway_core::test_util::{TestUpstream, refused_addr};
use gateway_proxy::{ReverseProxy, Route, Router, Upstream};
use support::{Gateway, get, proxy_to, raw, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn refused_upstream_is_502_problem_json() {
    let addr = refused_addr().await;
    let proxy = ReverseProxy::new(Upstream::single(&addr.to_string()).unwrap());
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy)).await;
    let res = raw(gw.addr, &get("/", "")).await;
    assert_eq!(status(&res), 502, "{res}");
    assert!(
        res.contains("content-type: application/problem+json"),
        "{res}"
    );
    assert!(support::body_of(&res).contains(r#""status":502"#));
    assert!(
        !res.contains(&addr.to_string()),
        "the upstream address must not leak: {res}"
    );
}

#[tokio::test]
async fn hung_upstream_is_504_after_the_timeout() {
    let up = TestUpstream::hang().await;
    let proxy = ReverseProxy::builder(Upstream::single(&up.url()).unwrap())
        .response_header_timeout(Some(Duration::from_millis(300)));
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy.build().unwrap())).await;
    let started = tokio::time::Instant::now();
    let res = raw(gw.addr, &get("/", "")).await;
    assert_eq!(status(&res), 504, "{res}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered before the timeout"
    );
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn upstream_reset_mid_body_closes_the_client_connection() {
    let up = TestUpstream::reset_mid_body().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // Keep-alive request: only an abort (not a hang) can end this read.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("the gateway must close the client connection, not leave it hanging");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // The client got fewer bytes than announced: the truncation is visible, not papered over.
    // The upstream sent 16 KiB of the 1,000,000 bytes it announced, then reset.
    assert!(text.contains("content-length: 1000000"), "{text}");
    let body = got.len() - text.find("\r\n\r\n").unwrap() - 4;
    assert!(body <= 16 * 1024, "body {body}");
}

/// A gateway whose header-read timeout is 700 ms.
async fn gateway_with_short_header_timeout(up: &TestUpstream) -> Gateway {
    Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(up)),
        gateway_core::client_ip::TrustedProxies::none(),
        |s| s.header_read_timeout(Some(Duration::from_millis(700))),
    )
    .await
}

/// Sends `head` one byte every 250 ms and asserts the server closes the connection before
/// the head is complete.
async fn assert_cut_while_trickling(stream: &mut TcpStream, head: &[u8]) {
    let mut closed_after = None;
    for (i, byte) in head.iter().enumerate() {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_after = Some(i);
            break;
        }
        // Check whether the server closed the connection meanwhile.
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_millis(250), stream.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            closed_after = Some(i);
            break;
        }
    }
    let closed_after =
        closed_after.expect("the connection must be closed before the head completes");
    assert!(
        closed_after < head.len() - 1,
        "closed only after {closed_after} bytes"
    );
}

#[tokio::test]
async fn slow_header_client_is_cut_by_the_header_read_timeout() {
    let up = TestUpstream::echo().await;
    let gw = gateway_with_short_header_timeout(&up).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: gw\r\nX-Padding: aaaaaaaaaaaaaaaa\r\n\r\n";
    assert_cut_while_trickling(&mut stream, head).await;
    assert!(up.requests().is_empty());
}

/// The same limit holds for the next request on a keep-alive connection.
#[tokio::test]
async fn a_slow_second_head_on_a_keep_alive_connection_is_cut_too() {
    let up = TestUpstream::echo().await;
    let gw = gateway_with_short_header_timeout(&up).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = support::within("a response", stream.read(&mut buf))
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let head = b"GET /second HTTP/1.1\r\nHost: gw\r\nX-Padding: aaaaaaaaaaaaaaaa\r\n\r\n";
    assert_cut_while_trickling(&mut stream, head).await;
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn too_many_headers_are_refused() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&up)),
        gateway_core::client_ip::TrustedProxies::none(),
        |s| s.max_headers(20).max_header_bytes(8192),
    )
    .await;
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let res = raw(gw.addr, &get("/", &many)).await;
    assert_eq!(status(&res), 431, "{res}");
    let big = format!("X-Big: {}\r\n", "a".repeat(16 * 1024));
    let res = raw(gw.addr, &get("/", &big)).await;
    assert_eq!(status(&res), 431, "{res}");
    assert!(up.requests().is_empty());
}

/// Sends `request` on a keep-alive connection through a proxy with a 300 ms body idle
/// timeout, and reads until the gateway closes the connection (a hang fails with `hang`).
async fn exchange_with_idle_timeout(up: &TestUpstream, request: &[u8], hang: &str) -> String {
    let proxy = ReverseProxy::builder(Upstream::single(&up.url()).unwrap())
        .body_idle_timeout(Some(Duration::from_millis(300)));
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy.build().unwrap())).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        gateway_core::test_util::raw::read_until_idle(&mut stream, Duration::from_secs(10)),
    )
    .await
    .expect(hang);
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn stalled_upstream_body_aborts_the_client_response() {
    use futures_util::StreamExt;
    let up = TestUpstream::serve(|_req| async {
        let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            http_body::Frame::data(bytes::Bytes::from_static(b"partial")),
        )]);
        let stalled = first.chain(futures_util::stream::pending());
        Ok(http::Response::new(gateway_core::Body::new(
            http_body_util::StreamBody::new(stalled),
        )))
    })
    .await;
    let text = exchange_with_idle_timeout(
        &up,
        b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
        "a stalled upstream body must abort the client connection",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("partial"), "{text}");
    // Chunked and never terminated: the client can tell the body is incomplete.
    assert!(!text.ends_with("0\r\n\r\n"), "{text}");
}

#[tokio::test]
async fn stalled_client_upload_is_408() {
    let up = TestUpstream::echo().await;
    let text = exchange_with_idle_timeout(
        &up,
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nonly-part",
        "a stalled upload must be answered",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}
