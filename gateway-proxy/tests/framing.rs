//! Request smuggling attempts, as raw bytes: one client request never becomes two upstream
//! requests, and ambiguous framing is refused.

mod support;

use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use support::{Gateway, proxy_to, raw, status};

async fn setup() -> (Gateway, TestUpstream) {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    (gw, up)
}

/// The upstream must never see the smuggled `/smuggled` request, and must see at most one
/// request per client request.
fn assert_not_smuggled(up: &TestUpstream, max: usize) {
    let seen = up.requests();
    assert!(
        seen.len() <= max,
        "upstream saw {} requests: {seen:?}",
        seen.len()
    );
    assert!(seen.iter().all(|r| r.uri.path() != "/smuggled"), "{seen:?}");
}

#[tokio::test]
async fn content_length_with_transfer_encoding() {
    let (gw, up) = setup().await;
    let attack = "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
                  0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n";
    let res = raw(gw.addr, attack).await;
    // Refused outright (RFC 9112 §6.1 lets a server re-frame instead; this one refuses),
    // the connection closed: one answer, and the upstream hears nothing.
    let statuses = gateway_core::test_util::raw::statuses(res.as_bytes());
    assert_eq!(statuses, [400], "{res}");
    assert_not_smuggled(&up, 0);
}

#[tokio::test]
async fn two_different_content_lengths() {
    let (gw, up) = setup().await;
    let attack = "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n\
                  helloGET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n";
    let res = raw(gw.addr, attack).await;
    assert_eq!(status(&res), 400, "{res}");
    assert_not_smuggled(&up, 0);
}

#[tokio::test]
async fn transfer_encoding_on_http10() {
    let (gw, up) = setup().await;
    let attack = "POST / HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n\
                  0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n";
    let res = raw(gw.addr, attack).await;
    assert_eq!(status(&res), 400, "{res}");
    assert_not_smuggled(&up, 0);
}

#[tokio::test]
async fn malformed_chunk_sizes() {
    for size in ["zz", "-1", "ffffffffffffffffff", "5 ;x\n", "0x5"] {
        let (gw, up) = setup().await;
        let attack = format!(
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
        );
        let res = raw(gw.addr, &attack).await;
        let statuses = gateway_core::test_util::raw::statuses(res.as_bytes());
        // The body is refused when its first chunk line is read: the request head may
        // have gone upstream, but its exchange is aborted and the client gets 400 (its
        // upload broke); never a second request.
        assert_eq!(statuses, [400], "chunk size {size:?}: {res}");
        assert_not_smuggled(&up, 1);
        assert!(
            up.requests().iter().all(|r| r.body_len == 0),
            "chunk size {size:?}"
        );
    }
}

#[tokio::test]
async fn a_chunked_upload_is_reframed_for_the_upstream() {
    let (gw, up) = setup().await;
    let req = "POST /up HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
               5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let res = raw(gw.addr, req).await;
    assert_eq!(status(&res), 200, "{res}");
    let seen = up.last_request();
    assert_eq!(&seen.body[..], b"hello world");
    assert_eq!(up.requests().len(), 1);
}
