//! Circuit breakers from the config file over real sockets: a dead upstream opens one, an
//! open one answers without touching the upstream, half-open sends exactly its probes when
//! a crowd arrives, recovery closes it, latency alone opens it, and the fallback upstream
//! answers while it is open; per endpoint, each endpoint's breaker opens alone.
#![cfg(feature = "config")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gateway_core::Body;
use gateway_core::metrics::{Format, Metrics};
use gateway_core::test_util::{TestUpstream, refused_addr};
use http::Response;
use support::{Gateway, fetch, request, within};
use tokio::time::Instant;

/// A gateway with one route `/` to the upstream at `url`, under a `circuit-breaker` with
/// `settings`; `spare` is an upstream for fallbacks.
async fn gateway(url: &str, settings: &str, spare: &str, metrics: Option<&Metrics>) -> Gateway {
    support::start_config(
        &format!(
            "listen: 127.0.0.1:0
upstreams:
  app:
    endpoints: ['{url}']
    outlier_detection: off
  spare:
    endpoints: ['{spare}']
routes:
  - id: api
    match: {{ path: / }}
    upstream: app
    plugins:
      - circuit-breaker: {settings}
"
        ),
        metrics,
    )
    .await
}

/// An upstream that answers `status` (settable) after `delay`, counting its calls.
struct Counted {
    up: TestUpstream,
    calls: Arc<AtomicUsize>,
    status: Arc<AtomicUsize>,
}

async fn counted(delay: Duration) -> Counted {
    let calls = Arc::new(AtomicUsize::new(0));
    let status = Arc::new(AtomicUsize::new(200));
    let (c, s) = (Arc::clone(&calls), Arc::clone(&status));
    let up = TestUpstream::serve(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        let status = u16::try_from(s.load(Ordering::SeqCst)).unwrap_or(500);
        async move {
            tokio::time::sleep(delay).await;
            Ok(Response::builder()
                .status(status)
                .body(Body::from("from the upstream"))
                .expect("a response"))
        }
    })
    .await;
    Counted { up, calls, status }
}

async fn status(gw: &Gateway) -> u16 {
    fetch(gw.addr, request("GET", "/", &[]))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_dead_upstream_opens_it_and_it_answers_without_the_upstream() {
    let dead = format!("http://{}", refused_addr().await);
    let spare = TestUpstream::echo().await;
    let metrics = Metrics::new();
    let gw = gateway(
        &dead,
        "{ consecutive_failures: 3, open_for: 30s }",
        &spare.url(),
        Some(&metrics),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(status(&gw).await, 502);
    }
    // Open: a 503 problem+json with Retry-After, at once.
    let res = fetch(gw.addr, request("GET", "/", &[])).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((25..=30).contains(&after), "{after}");
    let text = metrics.encode(Format::Prometheus);
    assert!(
        text.contains(r#"gateway_circuit_breaker_state{breaker="api"} 1"#),
        "{text}"
    );

    // While open, the upstream is not touched.
    let failing = counted(Duration::ZERO).await;
    failing.status.store(503, Ordering::SeqCst);
    let gw = gateway(
        &failing.up.url(),
        "{ consecutive_failures: 2, open_for: 30s }",
        &spare.url(),
        None,
    )
    .await;
    assert_eq!(status(&gw).await, 503);
    assert_eq!(status(&gw).await, 503);
    let calls = failing.calls.load(Ordering::SeqCst);
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let res = within(
            "an open breaker's answer",
            fetch(gw.addr, request("GET", "/", &[])),
        )
        .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(res.status(), 503);
        assert!(res.headers().contains_key("retry-after"));
    }
    assert_eq!(
        failing.calls.load(Ordering::SeqCst),
        calls,
        "the upstream was not touched while open"
    );
    eprintln!("slowest answer of an open breaker over 20: {slowest:?}");
}

#[tokio::test]
async fn half_open_sends_exactly_its_probes_when_a_crowd_arrives_and_recovery_closes_it() {
    let up = counted(Duration::from_millis(300)).await;
    up.status.store(503, Ordering::SeqCst);
    let spare = TestUpstream::echo().await;
    let gw = gateway(
        &up.up.url(),
        "{ consecutive_failures: 1, open_for: 1s, probes: 2 }",
        &spare.url(),
        None,
    )
    .await;
    assert_eq!(status(&gw).await, 503);
    assert_eq!(status(&gw).await, 503, "open: refused");
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    up.status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // 100 requests at once: the two probes reach the upstream (and take 300 ms); the rest
    // are refused without waiting for them.
    let addr = gw.addr;
    let crowd: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { fetch(addr, request("GET", "/", &[])).await.status() }))
        .collect();
    let mut statuses = Vec::new();
    for call in crowd {
        statuses.push(within("the crowd", call).await.unwrap().as_u16());
    }
    let passed = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!((passed, refused), (2, 98), "{statuses:?}");
    assert_eq!(up.calls.load(Ordering::SeqCst), 3, "exactly the two probes");

    // Both passed: closed, everything goes through.
    for _ in 0..5 {
        assert_eq!(status(&gw).await, 200);
    }
    assert_eq!(up.calls.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn latency_alone_opens_a_slow_call_window() {
    let up = counted(Duration::from_millis(150)).await;
    let spare = TestUpstream::echo().await;
    let gw = gateway(
        &up.up.url(),
        "{ slow_calls: { duration: 100ms, rate: 0.5 }, min_calls: 4, open_for: 30s }",
        &spare.url(),
        None,
    )
    .await;
    for _ in 0..4 {
        assert_eq!(status(&gw).await, 200, "slow, but answered");
    }
    assert_eq!(status(&gw).await, 503, "open on latency alone");
    assert_eq!(up.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn the_fallback_upstream_answers_while_it_is_open() {
    let up = counted(Duration::ZERO).await;
    up.status.store(500, Ordering::SeqCst);
    let spare = TestUpstream::echo().await;
    let gw = gateway(
        &up.up.url(),
        "{ consecutive_failures: 2, open_for: 30s, fallback: { upstream: spare } }",
        &spare.url(),
        None,
    )
    .await;
    assert_eq!(status(&gw).await, 500);
    assert_eq!(status(&gw).await, 500);
    let res = fetch(gw.addr, request("POST", "/orders?x=1", &[])).await;
    assert_eq!(res.status(), 200, "answered by the spare");
    assert_eq!(spare.last_request().uri, "/orders?x=1");
    assert_eq!(spare.last_request().method, "POST");
    assert_eq!(up.calls.load(Ordering::SeqCst), 2);

    // A fixed answer instead.
    let gw = gateway(
        &up.up.url(),
        "{ consecutive_failures: 1, fallback: { status: 200, body: '{\"orders\":[]}', content_type: application/json } }",
        &spare.url(),
        None,
    )
    .await;
    assert_eq!(status(&gw).await, 500);
    let res = fetch(gw.addr, request("GET", "/", &[])).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.body().as_ref(), b"{\"orders\":[]}");
}

/// A gateway with one route `/` to an upstream of `endpoints` (round robin, no outlier
/// detection, no connect failover), under a per-endpoint `circuit-breaker` with `settings`.
async fn per_endpoint(endpoints: &[&str], settings: &str, metrics: Option<&Metrics>) -> Gateway {
    let list = endpoints
        .iter()
        .map(|e| format!("'{e}'"))
        .collect::<Vec<_>>()
        .join(", ");
    support::start_config(
        &format!(
            "listen: 127.0.0.1:0
upstreams:
  app:
    endpoints: [{list}]
    outlier_detection: off
routes:
  - id: api
    match: {{ path: / }}
    upstream: app
    connect_retries: 0
    plugins:
      - circuit-breaker: {settings}
"
        ),
        metrics,
    )
    .await
}

/// Per endpoint: the failing endpoint's breaker opens and the healthy one takes every
/// request (clients see only the failures that opened it); its half-open probe comes
/// back, succeeds, and closes it; when every endpoint is open, calls are refused without
/// touching any.
#[tokio::test]
async fn per_endpoint_breakers_open_alone_probe_and_refuse_when_all_are_open() {
    let (sick, well) = (counted(Duration::ZERO).await, counted(Duration::ZERO).await);
    sick.status.store(500, Ordering::SeqCst);
    let metrics = Metrics::new();
    let gw = per_endpoint(
        &[&sick.up.url(), &well.up.url()],
        "{ per: endpoint, consecutive_failures: 2, open_for: 1s, probes: 1 }",
        Some(&metrics),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(status(&gw).await);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        18,
        "{statuses:?}"
    );
    assert_eq!(
        sick.calls.load(Ordering::SeqCst),
        2,
        "open after two failures"
    );
    let text = metrics.encode(Format::Prometheus);
    let series = format!(
        "gateway_circuit_breaker_state{{breaker=\"api/{}\"}} 1",
        sick.up.addr()
    );
    assert!(text.contains(&series), "{series} in:\n{text}");

    // The open time over, the sick endpoint recovered: one probe reaches it, and closes it.
    sick.status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..10 {
        assert_eq!(status(&gw).await, 200);
    }
    let probed = sick.calls.load(Ordering::SeqCst);
    assert!(
        probed >= 4,
        "closed again: back in the rotation ({probed} calls)"
    );

    // Both failing: each opens on its own, then the route refuses without calling either.
    sick.status.store(500, Ordering::SeqCst);
    well.status.store(500, Ordering::SeqCst);
    let before = sick.calls.load(Ordering::SeqCst) + well.calls.load(Ordering::SeqCst);
    let mut failures = 0;
    let res = loop {
        let res = fetch(gw.addr, request("GET", "/", &[])).await;
        if res.status() != 500 {
            break res;
        }
        failures += 1;
        assert!(failures <= 4, "two failures each open both");
    };
    assert_eq!(failures, 4);
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(res.headers().contains_key("retry-after"));
    let body = String::from_utf8_lossy(res.body());
    assert!(body.contains("upstream circuit open"), "{body}");
    for _ in 0..10 {
        assert_eq!(status(&gw).await, 503);
    }
    let after = sick.calls.load(Ordering::SeqCst) + well.calls.load(Ordering::SeqCst);
    assert_eq!(after - before, 4, "refused calls touch no endpoint");
    let refused = metrics.encode(Format::Prometheus);
    assert!(
        refused.contains("gateway_circuit_breaker_refused_total{breaker=\"api\"} 11"),
        "{refused}"
    );
}

/// Per endpoint, behind retries: a try refused by one endpoint's breaker goes to another,
/// and the proxy's connect failover counts a refusing endpoint's failures against it.
#[tokio::test]
async fn a_dead_endpoint_opens_its_breaker_through_the_connect_failover() {
    let dead_addr = refused_addr().await;
    let dead = format!("http://{dead_addr}");
    let well = counted(Duration::ZERO).await;
    let metrics = Metrics::new();
    let gw = support::start_config(
        &format!(
            "listen: 127.0.0.1:0
upstreams:
  app:
    endpoints: ['{dead}', '{well}']
    outlier_detection: off
routes:
  - id: api
    match: {{ path: / }}
    upstream: app
    plugins:
      - circuit-breaker: {{ per: endpoint, consecutive_failures: 2, open_for: 1m }}
",
            well = well.up.url()
        ),
        Some(&metrics),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(
            status(&gw).await,
            200,
            "the proxy fails over; the client sees no 502"
        );
    }
    assert_eq!(well.calls.load(Ordering::SeqCst), 20);
    let text = metrics.encode(Format::Prometheus);
    for series in [
        format!("gateway_circuit_breaker_state{{breaker=\"api/{dead_addr}\"}} 1"),
        format!(
            "gateway_circuit_breaker_state{{breaker=\"api/{}\"}} 0",
            well.up.addr()
        ),
    ] {
        assert!(text.contains(&series), "{series} in:\n{text}");
    }
}

#[tokio::test]
async fn mistakes_in_the_section_are_refused_at_load() {
    for (section, says) in [
        ("{}", "needs `consecutive_failures`"),
        ("{ failure_rate: 1.5 }", "above 0 and at most 1"),
        ("{ consecutive_failures: 0 }", "more than 0"),
        ("{ consecutive_failures: 1, probes: 0 }", "`probes`"),
        (
            "{ consecutive_failures: 1, window: { calls: 5, time: 1s } }",
            "one of them",
        ),
        (
            "{ consecutive_failures: 1, fallback: { upstream: nowhere } }",
            "no upstream is named `nowhere`",
        ),
        (
            "{ consecutive_failures: 1, open_for: 10s, max_open: 1s }",
            "less than",
        ),
        (
            "{ per: endpoint, consecutive_failures: 1, fallback: { upstream: app } }",
            "not with `per: endpoint`",
        ),
        (
            "{ per: upstream, consecutive_failures: 1 }",
            "unknown variant",
        ),
    ] {
        let yaml = format!(
            "listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ['http://127.0.0.1:9'] }}
routes:
  - match: {{ path: / }}
    upstream: app
    plugins:
      - circuit-breaker: {section}
"
        );
        let err = support::load_config(&yaml, None).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains(says), "{section}: {err}");
    }
}
