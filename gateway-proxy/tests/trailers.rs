//! gRPC-style trailers from an HTTP/2 upstream reach an HTTP/2 client.

mod support;

use std::convert::Infallible;

use bytes::Bytes;
use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::{HttpClient, ReverseProxy, Route, Router, Upstream};
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::Gateway;

#[tokio::test]
async fn trailers_pass_from_an_h2_upstream_to_an_h2_client() {
    let up = TestUpstream::serve(|req| async move {
        assert_eq!(
            req.version(),
            http::Version::HTTP_2,
            "the upstream hop must be HTTP/2"
        );
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse()?);
        trailers.insert("grpc-message", "ok".parse()?);
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\x00\x00\x00\x00\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut res = Response::new(Body::new(StreamBody::new(futures_util::stream::iter(
            frames,
        ))));
        res.headers_mut()
            .insert("content-type", "application/grpc".parse()?);
        Ok(res)
    })
    .await;

    let client = HttpClient::builder().http2_only(true).build().unwrap();
    let proxy = ReverseProxy::builder(Upstream::single(&up.url()).unwrap()).client(client);
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy.build().unwrap())).await;

    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    let req = Request::post(format!("http://{}/pkg.Service/Method", gw.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::from("\x00\x00\x00\x00\x00"))
        .unwrap();
    let res = h2.request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers must reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(&collected.to_bytes()[..], b"\x00\x00\x00\x00\x02hi");
    assert_eq!(up.last_request().header("te"), Some("trailers"));
}
