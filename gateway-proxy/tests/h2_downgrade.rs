//! HTTP/2 requests that become HTTP/1.1 upstream: what RFC 9113 requires of the downgrade,
//! sent frame by frame with the `h2` crate (hyper's HTTP/2), so requests a well-behaved
//! client library would refuse to send can be sent.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use h2::client::SendRequest;
use http::Request;
use support::{Gateway, proxy_to};
use tokio::net::TcpStream;

/// An h2c connection (prior knowledge) to the gateway.
async fn connect(addr: SocketAddr) -> SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.unwrap()
}

/// An upstream that records each request as soon as its head arrives.
async fn gateway() -> (Gateway, TestUpstream) {
    let up = TestUpstream::serve(|req| async move {
        let body = Body::new(req.into_body()).collect_bytes().await?;
        let mut res = http::Response::new(Body::empty());
        res.headers_mut()
            .insert("x-received-bytes", body.len().into());
        Ok(res)
    })
    .await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    (gw, up)
}

fn request(uri: &str) -> http::request::Builder {
    Request::builder().method("POST").uri(uri)
}

/// Sends `req` (and `data`, ending the stream, unless the head ends it); the status, or the
/// stream error's reason.
async fn send(
    client: &mut SendRequest<Bytes>,
    req: Request<()>,
    data: Option<&'static str>,
) -> Result<u16, Option<h2::Reason>> {
    let (res, mut stream) = client.send_request(req, data.is_none()).unwrap();
    if let Some(data) = data {
        // The gateway may have reset the stream already.
        let _ = stream.send_data(Bytes::from_static(data.as_bytes()), true);
    }
    match res.await {
        Ok(res) => Ok(res.status().as_u16()),
        Err(err) => Err(err.reason()),
    }
}

/// The request's body length as the upstream read it.
async fn received(
    client: &mut SendRequest<Bytes>,
    req: Request<()>,
    data: Option<&'static str>,
) -> Option<String> {
    let (res, mut stream) = client.send_request(req, data.is_none()).unwrap();
    if let Some(data) = data {
        stream
            .send_data(Bytes::from_static(data.as_bytes()), true)
            .unwrap();
    }
    let res = res.await.ok()?;
    Some(
        res.headers()
            .get("x-received-bytes")?
            .to_str()
            .ok()?
            .to_owned(),
    )
}

/// RFC 9113 §8.2.3: split `cookie` fields are one field, joined with "; ", in HTTP/1.1.
#[tokio::test]
async fn split_cookies_are_joined_for_http11() {
    let (gw, up) = gateway().await;
    let mut client = connect(gw.addr).await;
    let req = request("http://gw/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(())
        .unwrap();
    assert_eq!(send(&mut client, req, None).await, Ok(200));
    let seen = up.last_request();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}

/// RFC 9113 §8.3.1: `:authority` must not carry userinfo; it is refused, not copied into
/// `X-Forwarded-Host`.
#[tokio::test]
async fn userinfo_in_authority_resets_the_stream() {
    let (gw, up) = gateway().await;
    let mut client = connect(gw.addr).await;
    let req = request("http://user@localhost/u").body(()).unwrap();
    assert_eq!(
        send(&mut client, req, None).await,
        Err(Some(h2::Reason::PROTOCOL_ERROR))
    );
    assert!(up.requests().is_empty());
    // The connection serves the next request.
    let req = request("http://localhost/ok").body(()).unwrap();
    assert_eq!(send(&mut client, req, None).await, Ok(200));
}

/// RFC 9113 §8.1.1: a request whose DATA contradicts its `content-length` is malformed;
/// with `content-length: 0` that is known before anything is sent on, and nothing is.
#[tokio::test]
async fn data_after_a_declared_empty_body_never_reaches_the_upstream() {
    let (gw, up) = gateway().await;
    let mut client = connect(gw.addr).await;
    let req = request("http://gw/zero")
        .header("content-length", "0")
        .body(())
        .unwrap();
    assert_eq!(
        send(&mut client, req, Some("smuggled")).await,
        Err(Some(h2::Reason::PROTOCOL_ERROR))
    );
    // A length with a stream that ends at the head is malformed too.
    let req = request("http://gw/short")
        .header("content-length", "5")
        .body(())
        .unwrap();
    assert_eq!(
        send(&mut client, req, None).await,
        Err(Some(h2::Reason::PROTOCOL_ERROR))
    );
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    // An empty body that ends with an empty DATA frame is what it said.
    let req = request("http://gw/empty")
        .header("content-length", "0")
        .body(())
        .unwrap();
    assert_eq!(
        received(&mut client, req, Some("")).await.as_deref(),
        Some("0")
    );
    assert_eq!(up.requests().len(), 1);
}
