use std::convert::Infallible;
use std::time::Duration;

use gateway_core::metrics::{Format, Metrics};
use gateway_core::{Body, ClientIp, Identity};
use http::{Request, Response, StatusCode};
use tower::util::BoxCloneService;
use tower::{ServiceExt, service_fn};

use super::*;

type Svc = BoxCloneService<Request<Body>, Response<Body>, Infallible>;

fn service(layer: RateLimitLayer) -> Svc {
    BoxCloneService::new(tower::Layer::layer(
        &layer,
        service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::from("ok")))
        }),
    ))
}

fn from(ip: &str) -> Request<Body> {
    let mut req = Request::new(Body::empty());
    req.extensions_mut()
        .insert(ClientIp::new(ip.parse().unwrap(), false));
    req
}

async fn send(svc: &Svc, req: Request<Body>) -> Response<Body> {
    svc.clone().oneshot(req).await.unwrap()
}

async fn status(svc: &Svc, ip: &str) -> StatusCode {
    send(svc, from(ip)).await.status()
}

fn header<'a>(res: &'a Response<Body>, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

async fn admitted(svc: &Svc, ip: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if status(svc, ip).await == StatusCode::OK {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(start_paused = true)]
async fn a_quota_admits_its_burst_then_one_per_interval() {
    let svc = service(RateLimitLayer::per_ip(Quota::per_second(10)));
    assert_eq!(
        admitted(&svc, "192.0.2.1", 15).await,
        10,
        "the burst is the count"
    );
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(
        admitted(&svc, "192.0.2.1", 3).await,
        1,
        "one back per 100 ms"
    );
    tokio::time::advance(Duration::from_millis(250)).await;
    assert_eq!(admitted(&svc, "192.0.2.1", 3).await, 2);
    assert_eq!(
        admitted(&svc, "192.0.2.2", 12).await,
        10,
        "another key, another bucket"
    );

    // Sustained: over 10 s at 20 requests a second, 10/s (plus the first burst) pass.
    let svc = service(RateLimitLayer::per_ip(Quota::per_second(10)));
    let mut ok = 0;
    for _ in 0..200 {
        ok += admitted(&svc, "192.0.2.3", 1).await;
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    assert!((105..=111).contains(&ok), "{ok} admitted");
}

#[tokio::test(start_paused = true)]
async fn a_burst_is_separate_from_the_rate() {
    let svc = service(RateLimitLayer::per_ip(Quota::per_minute(60).burst(5)));
    assert_eq!(admitted(&svc, "192.0.2.1", 8).await, 5);
    let res = send(&svc, from("192.0.2.1")).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(admitted(&svc, "192.0.2.1", 3).await, 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_rounded_up() {
    // One request every 1.5 s.
    let quota = Quota::new(2, Duration::from_secs(3)).unwrap().burst(1);
    let svc = service(RateLimitLayer::per_ip(quota));
    assert_eq!(status(&svc, "192.0.2.1").await, StatusCode::OK);
    let res = send(&svc, from("192.0.2.1")).await;
    assert_eq!(
        header(&res, "retry-after"),
        Some("2"),
        "1.5 s is 2, never 1"
    );
    tokio::time::advance(Duration::from_millis(1_450)).await;
    let res = send(&svc, from("192.0.2.1")).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&res, "retry-after"),
        Some("1"),
        "50 ms left is 1 s, never 0"
    );
    tokio::time::advance(Duration::from_millis(50)).await;
    assert_eq!(status(&svc, "192.0.2.1").await, StatusCode::OK);

    let hourly = service(RateLimitLayer::per_ip(Quota::per_hour(1)));
    assert_eq!(status(&hourly, "192.0.2.1").await, StatusCode::OK);
    let res = send(&hourly, from("192.0.2.1")).await;
    assert_eq!(header(&res, "retry-after"), Some("3600"));
}

#[tokio::test(start_paused = true)]
async fn stacked_limits_take_nothing_when_one_refuses() {
    let svc = service(
        RateLimitLayer::new(Limit::rate("second", Quota::per_second(10)))
            .and(Limit::rate("hour", Quota::per_hour(3))),
    );
    assert_eq!(admitted(&svc, "192.0.2.1", 3).await, 3);
    // The hourly limit refuses from now on; the per-second one must keep its room.
    for _ in 0..20 {
        let res = send(&svc, from("192.0.2.1")).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            header(&res, "ratelimit"),
            Some(r#""second";r=7;t=1, "hour";r=0;t=3600"#),
            "the refused requests took nothing from `second`"
        );
    }

    // The other way round: the first limit refuses, the second is never touched.
    let svc = service(
        RateLimitLayer::new(Limit::rate("second", Quota::per_second(1).burst(2)))
            .and(Limit::rate("hour", Quota::per_hour(100))),
    );
    assert_eq!(admitted(&svc, "192.0.2.1", 10).await, 2);
    tokio::time::advance(Duration::from_secs(2)).await;
    let res = send(&svc, from("192.0.2.1")).await;
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""second";r=1;t=1, "hour";r=97;t=108"#),
        "the hourly limit gave 3, not 11"
    );
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""second";q=1;w=1, "hour";q=100;w=3600"#)
    );
}

#[tokio::test(start_paused = true)]
async fn limits_keyed_apart_count_apart() {
    let svc = service(
        RateLimitLayer::per_ip(Quota::per_second(2))
            .and(Limit::rate("consumer", Quota::per_second(3)).key(Key::consumer())),
    );
    let as_alice = |ip: &str| {
        let mut req = from(ip);
        req.extensions_mut().insert(Identity::consumer("alice"));
        req
    };
    let mut ok = 0;
    for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"] {
        for _ in 0..2 {
            ok += usize::from(send(&svc, as_alice(ip)).await.status() == StatusCode::OK);
        }
    }
    assert_eq!(ok, 3, "alice's 3 from any address");
}

#[tokio::test(start_paused = true)]
async fn cost_takes_more_than_one() {
    let svc = service(RateLimitLayer::per_ip(Quota::per_second(10)).cost(3));
    assert_eq!(admitted(&svc, "192.0.2.1", 5).await, 3);
    let res = send(&svc, from("192.0.2.1")).await;
    assert_eq!(header(&res, "ratelimit"), Some(r#""per-ip";r=0;t=1"#));

    let by_query = service(
        RateLimitLayer::per_ip(Quota::per_second(10)).cost_fn(|req| {
            req.uri
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1)
        }),
    );
    let with_cost = |n: u32| {
        let mut req = from("192.0.2.1");
        *req.uri_mut() = format!("/?n={n}").parse().unwrap();
        req
    };
    assert_eq!(send(&by_query, with_cost(0)).await.status(), StatusCode::OK);
    assert_eq!(send(&by_query, with_cost(9)).await.status(), StatusCode::OK);
    assert_eq!(
        send(&by_query, with_cost(2)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(send(&by_query, with_cost(1)).await.status(), StatusCode::OK);
    let never = send(&by_query, with_cost(11)).await;
    assert_eq!(never.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&never, "retry-after"),
        None,
        "a cost over the burst never fits"
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_map_sheds_new_keys_until_idle_ones_are_evicted() {
    let layer = RateLimitLayer::per_ip(Quota::per_second(1)).max_keys(2);
    let svc = service(layer.clone());
    assert_eq!(status(&svc, "192.0.2.1").await, StatusCode::OK);
    assert_eq!(status(&svc, "192.0.2.2").await, StatusCode::OK);
    let shed = send(&svc, from("192.0.2.3")).await;
    assert_eq!(shed.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&shed, "retry-after"), Some("1"));
    // The shed key started a sweep; keys in use survive it (evicting them would hand out
    // fresh buckets).
    tokio::task::yield_now().await;
    assert_eq!(
        status(&svc, "192.0.2.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Once their buckets are full again, the next sweep a new key starts evicts them.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        status(&svc, "192.0.2.3").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::task::yield_now().await;
    assert_eq!(status(&svc, "192.0.2.3").await, StatusCode::OK);
    assert_eq!(status(&svc, "192.0.2.4").await, StatusCode::OK);
    assert_eq!(
        status(&svc, "192.0.2.5").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_map_can_share_one_bucket_instead() {
    let svc = service(
        RateLimitLayer::per_ip(Quota::per_second(1))
            .max_keys(1)
            .when_full(WhenFull::Share),
    );
    assert_eq!(status(&svc, "192.0.2.1").await, StatusCode::OK);
    assert_eq!(
        status(&svc, "192.0.2.2").await,
        StatusCode::OK,
        "the shared bucket"
    );
    assert_eq!(
        status(&svc, "192.0.2.3").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        status(&svc, "2001:db8::1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(start_paused = true)]
async fn ipv6_clients_of_one_prefix_share_a_bucket() {
    let svc = service(RateLimitLayer::per_ip(Quota::per_second(2)));
    let mut ok = 0;
    for i in 0..10 {
        ok += admitted(&svc, &format!("2001:db8:0:7::{i:x}"), 1).await;
    }
    assert_eq!(ok, 2, "one /64");
    assert_eq!(status(&svc, "2001:db8:0:8::1").await, StatusCode::OK);

    let apart = service(
        RateLimitLayer::per_ip(Quota::per_second(2)).key(Key::client_ip().ipv6_prefix(128)),
    );
    let mut ok = 0;
    for i in 0..10 {
        ok += admitted(&apart, &format!("2001:db8:0:7::{i:x}"), 1).await;
    }
    assert_eq!(ok, 10);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_counts_until_the_body_is_done() {
    let svc = service(RateLimitLayer::new(Limit::concurrent("inflight", 2)));
    let first = send(&svc, from("192.0.2.1")).await;
    assert_eq!(header(&first, "ratelimit"), Some(r#""inflight";r=1"#));
    let second = send(&svc, from("192.0.2.1")).await;
    let third = send(&svc, from("192.0.2.1")).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&third, "ratelimit-policy"),
        Some(r#""inflight";q=2;qu="concurrent-requests""#)
    );
    assert_eq!(status(&svc, "192.0.2.9").await, StatusCode::OK, "per key");
    drop(second);
    let fourth = send(&svc, from("192.0.2.1")).await;
    assert_eq!(fourth.status(), StatusCode::OK);
    // Read to the end, a body gives its place back.
    let body = first.into_body().collect_bytes().await.unwrap();
    assert_eq!(body, "ok");
    assert_eq!(status(&svc, "192.0.2.1").await, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_refuses_nothing_but_says_what_it_would() {
    let metrics = Metrics::new();
    let svc = service(
        RateLimitLayer::per_ip(Quota::per_second(2))
            .shadow(true)
            .metrics(&metrics, "api"),
    );
    let mut last = None;
    for _ in 0..5 {
        let res = send(&svc, from("192.0.2.1")).await;
        assert_eq!(res.status(), StatusCode::OK);
        last = Some(res);
    }
    assert_eq!(
        header(last.as_ref().unwrap(), "ratelimit"),
        Some(r#""per-ip";r=0;t=1"#)
    );
    let text = metrics.encode(Format::Prometheus);
    assert!(
        text.contains(
            r#"gateway_rate_limit_decisions_total{route="api",limit="per-ip",decision="allowed"} 2"#
        ),
        "{text}"
    );
    assert!(text.contains(
        r#"gateway_rate_limit_decisions_total{route="api",limit="per-ip",decision="shadow_limited"} 3"#
    ), "{text}");
    assert!(
        text.contains(r#"gateway_rate_limit_keys{route="api",limit="per-ip"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn clones_and_services_of_one_layer_share_their_buckets() {
    let layer = RateLimitLayer::per_ip(Quota::per_second(3));
    let a = service(layer.clone());
    let b = service(layer);
    assert_eq!(admitted(&a, "192.0.2.1", 2).await, 2);
    assert_eq!(admitted(&b, "192.0.2.1", 2).await, 1);
}

#[tokio::test(start_paused = true)]
async fn headers_follow_the_chosen_style() {
    let legacy =
        service(RateLimitLayer::per_ip(Quota::per_minute(60)).headers(HeaderStyle::Legacy));
    let res = send(&legacy, from("192.0.2.1")).await;
    assert_eq!(header(&res, "x-ratelimit-limit"), Some("60"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("59"));
    assert_eq!(header(&res, "x-ratelimit-reset"), Some("1"));
    assert_eq!(header(&res, "ratelimit"), None);

    let none = service(RateLimitLayer::per_ip(Quota::per_minute(1)).headers(HeaderStyle::None));
    assert_eq!(send(&none, from("192.0.2.1")).await.headers().len(), 0);
    let refused = send(&none, from("192.0.2.1")).await;
    assert_eq!(header(&refused, "retry-after"), Some("60"));
    assert_eq!(header(&refused, "ratelimit"), None);
}
