//! Load balancing against real upstreams on loopback.
#![expect(
    clippy::unwrap_used,
    reason = "the load helper panics on failure, like the tests"
)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::{ReverseProxy, Route, Router, Upstream};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::Gateway;

/// Sends 3,000 requests at concurrency 16 through a balancer over two fast upstreams and one
/// 20 ms slower, and returns the slow one's share.
async fn slow_share(balance: fn([String; 3]) -> Upstream) -> f64 {
    let fast_a = TestUpstream::echo().await;
    let fast_b = TestUpstream::echo().await;
    let slow = TestUpstream::slow(Duration::from_millis(20)).await;
    let upstream = balance([fast_a.url(), fast_b.url(), slow.url()]);
    let gw =
        Gateway::start(Router::new().route(Route::prefix("/"), ReverseProxy::new(upstream))).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let url = Arc::new(format!("http://{}/", gw.addr));
    let (total, concurrency) = (3_000, 16);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url) = (client.clone(), Arc::clone(&url));
            tokio::spawn(async move {
                for _ in 0..total / concurrency {
                    let res = client
                        .request(Request::get(url.as_str()).body(Body::empty()).unwrap())
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 200);
                    res.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let counts = [
        fast_a.requests().len(),
        fast_b.requests().len(),
        slow.requests().len(),
    ];
    let sent: usize = counts.iter().sum();
    assert_eq!(sent, total / concurrency * concurrency);
    let slow_share = counts[2] as f64 / sent as f64;
    eprintln!("requests per endpoint (fast, fast, slow): {counts:?}; slow share {slow_share:.3}");
    slow_share
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_starves_the_slow_endpoint() {
    let share = slow_share(|t| Upstream::least_request(t).unwrap()).await;
    assert!(
        share < 0.15,
        "the slow endpoint got {share:.3} of the traffic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_starves_the_slow_endpoint() {
    let share = slow_share(|t| Upstream::peak_ewma(t).unwrap()).await;
    assert!(
        share < 0.15,
        "the slow endpoint got {share:.3} of the traffic"
    );
}

#[tokio::test]
async fn a_dead_endpoint_is_ejected_after_consecutive_failures() {
    use gateway_proxy::upstream::{Endpoint, OutlierDetection, RoundRobin};
    let live = TestUpstream::echo().await;
    let dead = gateway_core::test_util::refused_addr().await;
    let targets = [live.url(), dead.to_string()];
    let endpoints = || targets.clone().map(|t| t.parse::<Endpoint>().unwrap());
    let upstream = Upstream::builder(endpoints(), RoundRobin::default())
        .outlier_detection(OutlierDetection::new(2).max_ejected_percent(50))
        .build();
    // Without the failover to another endpoint, to see the failures that eject it.
    let proxy = ReverseProxy::builder(upstream)
        .connect_retries(0)
        .build()
        .unwrap();
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy)).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let res = support::raw(gw.addr, &support::get("/", "")).await;
        statuses.push(support::status(&res));
    }
    let failures = statuses.iter().filter(|s| **s == 502).count();
    assert_eq!(
        failures, 2,
        "exactly the two failures that trigger the ejection: {statuses:?}"
    );
    assert!(statuses[4..].iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(live.requests().len(), 18);

    // With it (the default), the same failures eject the endpoint and no client sees one.
    let upstream = Upstream::builder(endpoints(), RoundRobin::default())
        .outlier_detection(OutlierDetection::new(2).max_ejected_percent(50))
        .build();
    let gw =
        Gateway::start(Router::new().route(Route::prefix("/"), ReverseProxy::new(upstream))).await;
    for _ in 0..20 {
        let res = support::raw(gw.addr, &support::get("/", "")).await;
        assert_eq!(support::status(&res), 200);
    }
    assert_eq!(live.requests().len(), 38);
}

/// A response body fed by the test, chunk by chunk.
struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test]
async fn a_request_is_in_flight_until_its_response_body_ends() {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let upstream = TestUpstream::serve(move |_| {
        let rx = rx.lock().unwrap().take();
        async move {
            let rx = rx.ok_or("one request only")?;
            Ok(http::Response::new(Body::new(ChannelBody(rx))))
        }
    })
    .await;
    let target = Upstream::single(&upstream.url()).unwrap();
    let endpoint = Arc::clone(&target.endpoints()[0]);
    let gw =
        Gateway::start(Router::new().route(Route::prefix("/"), ReverseProxy::new(target))).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
    let res = client
        .request(
            Request::get(format!("http://{}/", gw.addr))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first");
    assert_eq!(endpoint.in_flight(), 1, "the body is still streaming");

    tx.send(bytes::Bytes::from_static(b"last")).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "last");
    tokio::time::timeout(Duration::from_secs(5), async {
        while endpoint.in_flight() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the request leaves flight when its body ends");
}
