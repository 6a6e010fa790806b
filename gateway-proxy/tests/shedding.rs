//! A route that must not queue: over its concurrency limit, requests get a 503 with
//! `Retry-After` at once, while the ones in flight finish; the place comes back when a
//! response has streamed.
#![cfg(feature = "config")]

mod support;

use std::time::Duration;

use gateway_core::test_util::TestUpstream;
use support::{fetch, request, within};

#[tokio::test]
async fn over_its_limit_a_route_sheds_at_once_with_503() {
    let slow = TestUpstream::slow(Duration::from_millis(500)).await;
    let gw = support::start_config(
        &format!(
            "listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ['{}'] }}
routes:
  - id: api
    match: {{ path: / }}
    upstream: app
    plugins:
      - concurrency-limit: {{ max: 2 }}
",
            slow.url()
        ),
        None,
    )
    .await;
    let addr = gw.addr;
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { fetch(addr, request("GET", "/", &[])).await.status() }))
        .collect();
    support::eventually("both requests reach the upstream", || {
        slow.requests().len() == 2
    })
    .await;
    let shed = within("the shed answer", fetch(addr, request("GET", "/", &[]))).await;
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_eq!(shed.headers()["content-type"], "application/problem+json");
    assert_eq!(
        slow.requests().len(),
        2,
        "the shed request never reached the upstream"
    );
    for call in held {
        assert_eq!(within("the held requests", call).await.unwrap(), 200);
    }
    // Their places came back.
    assert_eq!(fetch(addr, request("GET", "/", &[])).await.status(), 200);
}
