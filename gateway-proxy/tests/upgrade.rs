//! WebSocket tunnelling, and upgrades the upstream declines (only a 101 makes a tunnel).

mod support;

use futures_util::{SinkExt, StreamExt};
use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use http::StatusCode;
use support::{Gateway, proxy_to, raw};
use tokio_tungstenite::tungstenite::Message;

#[path = "support/ws.rs"]
mod upgrade_support;
use upgrade_support::ws_echo_upstream;

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let up = ws_echo_upstream().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let (mut ws, res) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "through", "the gateway"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[0u8, 1, 2, 255]
    );
    ws.close(None).await.unwrap();
    let seen = up.last_request();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("connection"), Some("upgrade"));
}

#[tokio::test]
async fn declined_upgrade_is_not_a_tunnel() {
    // The echo upstream answers every request, upgrade or not, with 200.
    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let pipelined = "GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
                     GET /second HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let res = raw(gw.addr, pipelined).await;
    let statuses = gateway_core::test_util::raw::statuses(res.as_bytes());
    assert_eq!(statuses, [200, 200], "{res}");
    let paths: Vec<String> = up.requests().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(
        paths,
        ["/ws", "/second"],
        "the second request must be parsed and routed"
    );
}

#[tokio::test]
async fn h2c_upgrade_is_never_forwarded() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let req = "GET / HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
               Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let res = raw(gw.addr, req).await;
    assert_eq!(support::status(&res), 200, "{res}");
    let seen = up.last_request();
    assert!(seen.header("upgrade").is_none());
    assert!(seen.header("http2-settings").is_none());
}

/// Issue 18, item 4: a tunnel with no bytes either way for the idle timeout is closed; one
/// that keeps talking is not, however long it lives.
#[tokio::test]
async fn an_idle_tunnel_is_closed_and_an_active_one_is_not() {
    use std::time::Duration;

    let up = ws_echo_upstream().await;
    let proxy =
        gateway_proxy::ReverseProxy::builder(gateway_proxy::Upstream::single(&up.url()).unwrap())
            .tunnel_idle_timeout(Some(Duration::from_millis(400)))
            .build()
            .unwrap();
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy)).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap();
    // Active for three times the idle timeout: a message every 100 ms.
    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = format!("ping {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    // Then quiet: the gateway closes the tunnel (the stream ends or fails), well before
    // the bound of this wait.
    let ended = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    match ended {
        Ok(None | Some(Err(_))) => {}
        Ok(Some(Ok(msg))) => assert!(msg.is_close(), "{msg:?}"),
        Err(_) => panic!("the idle tunnel was not closed"),
    }
}
