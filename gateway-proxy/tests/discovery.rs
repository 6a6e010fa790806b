//! DNS discovery followed by a live proxy, with a resolver the test controls.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::upstream::{DnsDiscovery, Resolve, ResolveFuture, RoundRobin};
use gateway_proxy::{ReverseProxy, Route, Router, Upstream};
use http::Response;
use support::Gateway;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A resolver whose answer the test sets; an empty answer is a failed lookup.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<Vec<SocketAddr>>>);

impl Answers {
    fn set(&self, addrs: &[SocketAddr]) {
        *self.0.lock().unwrap() = addrs.to_vec();
    }
}

impl Resolve for Answers {
    fn resolve(&self, host: &str, _port: u16) -> ResolveFuture {
        assert_eq!(host, "backend.test");
        let answer = self.0.lock().unwrap().clone();
        Box::pin(async move {
            if answer.is_empty() {
                Err(std::io::Error::other("SERVFAIL"))
            } else {
                Ok(answer)
            }
        })
    }
}

/// Polls until `done` holds, for at most 5 s.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn addrs(upstream: &Upstream) -> Vec<String> {
    let mut v: Vec<String> = upstream.endpoints().iter().map(|e| e.to_string()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_changing_dns_answer_is_followed_without_dropping_requests_in_flight() {
    // `a` holds `/slow` until released.
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let a = TestUpstream::serve(move |req| {
        let gate = Arc::clone(&gate);
        async move {
            if req.uri().path() == "/slow" {
                gate.notified().await;
            }
            Ok(Response::new(Body::from("from a")))
        }
    })
    .await;
    let b = TestUpstream::serve(|_| async { Ok(Response::new(Body::from("from b"))) }).await;

    let answers = Answers::default();
    answers.set(&[a.addr()]);
    let dns = DnsDiscovery::new("backend.test:80")
        .unwrap()
        .interval(Duration::from_millis(10))
        .resolver(answers.clone());
    let upstream = Upstream::builder([], RoundRobin::default())
        .discover(dns)
        .build();
    let gw = Gateway::start(
        Router::new().route(Route::prefix("/"), ReverseProxy::new(upstream.clone())),
    )
    .await;
    let url_a = format!("http://{}", a.addr());
    let url_b = format!("http://{}", b.addr());
    eventually("a discovered", || addrs(&upstream) == [url_a.clone()]).await;
    let a_ep = Arc::clone(&upstream.endpoints()[0]);

    // A request to `a` is in flight while the answer changes twice.
    let gw_addr = gw.addr;
    let slow = tokio::spawn(async move { support::raw(gw_addr, &support::get("/slow", "")).await });
    eventually("the slow request reached a", || a_ep.in_flight() == 1).await;

    answers.set(&[a.addr(), b.addr()]);
    let mut both = vec![url_a.clone(), url_b.clone()];
    both.sort();
    eventually("b added", || addrs(&upstream) == both).await;
    assert!(
        upstream.endpoints().iter().any(|e| Arc::ptr_eq(e, &a_ep)),
        "a stays the same endpoint, with its state"
    );
    assert_eq!(a_ep.in_flight(), 1);

    answers.set(&[b.addr()]);
    eventually("a removed", || addrs(&upstream) == [url_b.clone()]).await;
    let b_ep = Arc::clone(&upstream.endpoints()[0]);
    for _ in 0..10 {
        let res = support::raw(gw.addr, &support::get("/", "")).await;
        assert_eq!(support::body_of(&res), "from b");
    }

    // The request that started on `a` still completes there.
    release.notify_one();
    let res = slow.await.unwrap();
    assert_eq!(support::status(&res), 200, "{res}");
    assert_eq!(support::body_of(&res), "from a");
    assert_eq!(a_ep.in_flight(), 0);

    // A failed lookup keeps the last set.
    answers.set(&[]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(Arc::ptr_eq(&upstream.endpoints()[0], &b_ep));
    let res = support::raw(gw.addr, &support::get("/", "")).await;
    assert_eq!(support::body_of(&res), "from b");
    assert_eq!(a.requests().len(), 1, "a only ever saw the slow request");
}

#[test]
fn https_targets_are_refused_for_dns_discovery() {
    let err = DnsDiscovery::new("https://api.example.com").unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    assert!(DnsDiscovery::new("backend:8080").is_ok());
}
