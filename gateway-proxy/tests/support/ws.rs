//! A WebSocket echo upstream built on hyper's upgrade.

use futures_util::{SinkExt, StreamExt};
use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use http::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A WebSocket echo server built on hyper's upgrade.
pub(crate) async fn ws_echo_upstream() -> TestUpstream {
    TestUpstream::serve(|mut req| async move {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .ok_or("no websocket key")?
            .clone();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                } else if msg.is_close() {
                    break;
                }
            }
        });
        let res = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Body::empty())?;
        Ok(res)
    })
    .await
}
