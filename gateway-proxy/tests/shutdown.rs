//! Graceful shutdown: in-flight requests finish, new connections are refused, idle
//! keep-alives and open tunnels are closed, and the server ends within its drain deadline.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use support::{Gateway, eventually, get, proxy_to, raw, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "support/ws.rs"]
mod upgrade_support;

#[tokio::test]
async fn drain_finishes_in_flight_work_and_cuts_the_rest_at_the_deadline() {
    let slow = TestUpstream::slow(Duration::from_millis(600)).await;
    let fast = TestUpstream::echo().await;
    let ws = upgrade_support::ws_echo_upstream().await;
    let app = Router::new()
        .route(Route::prefix("/slow"), proxy_to(&slow))
        .route(Route::prefix("/ws"), proxy_to(&ws))
        .route(Route::prefix("/"), proxy_to(&fast));
    let drain = Duration::from_millis(1500);
    let mut gw = Gateway::start_with(app, gateway_core::client_ip::TrustedProxies::none(), |s| {
        s.drain_timeout(drain)
    })
    .await;
    let addr = gw.addr;

    // An idle keep-alive connection that has served one request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("a response")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // An open WebSocket.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();

    // A request in flight when the shutdown starts.
    let in_flight = tokio::spawn(async move { raw(addr, &get("/slow", "")).await });
    eventually("the slow request is in flight", || {
        slow.requests().len() == 1
    })
    .await;

    let started = tokio::time::Instant::now();
    let server = gw.shutdown();
    // New connections are refused while draining (once the listener is gone).
    let mut refused = false;
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections must be refused while draining");
    // At once: well before the drain deadline, when what is left is cut.
    let closed = tokio::time::timeout(drain / 2, idle.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the idle keep-alive must be closed at once, got {closed:?}"
    );

    let res = in_flight.await.unwrap();
    assert_eq!(
        status(&res),
        200,
        "the in-flight request must complete: {res}"
    );
    assert_eq!(support::body_of(&res), "slow");

    tokio::time::timeout(drain + Duration::from_secs(2), server)
        .await
        .expect("the server must stop by the drain deadline")
        .unwrap()
        .unwrap();
    // The tunnel kept the drain waiting until the deadline (not less), then was cut. (How
    // soon after it the server stops is bounded by the timeout above, not measured here.)
    let took = started.elapsed();
    assert!(took >= drain, "took {took:?}");
    let next = tokio::time::timeout(Duration::from_secs(2), socket.next())
        .await
        .expect("the tunnel must be closed");
    assert!(!matches!(next, Some(Ok(ref m)) if m.is_text()), "{next:?}");
}

#[tokio::test]
async fn shutdown_without_work_is_immediate() {
    let up = TestUpstream::echo().await;
    let mut gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    assert_eq!(status(&raw(gw.addr, &get("/", "")).await), 200);
    tokio::time::timeout(Duration::from_secs(2), gw.shutdown())
        .await
        .expect("nothing to drain")
        .unwrap()
        .unwrap();
}
