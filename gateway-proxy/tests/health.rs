//! Active health checks against real upstreams on loopback, in paused time.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::upstream::{Endpoint, HealthCheck, RoundRobin, Upstream};
use http::{Response, StatusCode};
use tokio::time::Instant;

const INTERVAL: Duration = Duration::from_secs(10);
const JITTER: Duration = Duration::from_secs(1);
/// How long a probe may take; the test clock moves in small steps, so real loopback probes
/// finish within a few of them.
const TIMEOUT: Duration = Duration::from_secs(3);
const STEP: Duration = Duration::from_millis(50);

/// An upstream whose `/healthz` answers 503 while `failing` is set.
async fn flaky(failing: &Arc<AtomicBool>) -> TestUpstream {
    let failing = Arc::clone(failing);
    TestUpstream::serve(move |req| {
        let fail = req.uri().path() == "/healthz" && failing.load(Ordering::SeqCst);
        async move {
            let mut res = Response::new(Body::empty());
            if fail {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok(res)
        }
    })
    .await
}

fn probes(upstream: &TestUpstream) -> usize {
    upstream
        .requests()
        .iter()
        .filter(|r| r.uri.path() == "/healthz")
        .count()
}

/// Lets (paused) time run in small steps until `done` holds; returns how long it took.
async fn run_until(limit: Duration, done: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "not done within {limit:?}");
        tokio::time::sleep(STEP).await;
    }
    start.elapsed()
}

fn picks(upstream: &Upstream, n: usize) -> Vec<u64> {
    let head = http::Request::new(()).into_parts().0;
    (0..n)
        .map(|_| upstream.select(&head).unwrap().endpoint().id())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_failing_health_path_takes_an_endpoint_out_until_it_passes_again() {
    let failing = Arc::new(AtomicBool::new(false));
    let sick = flaky(&failing).await;
    let well = flaky(&Arc::new(AtomicBool::new(false))).await;
    let check = HealthCheck::http("/healthz")
        .unwrap()
        .interval(INTERVAL)
        .jitter(JITTER)
        .timeout(TIMEOUT)
        .unhealthy_threshold(NonZeroU32::new(3).unwrap())
        .healthy_threshold(NonZeroU32::new(2).unwrap());
    let endpoints = [sick.url(), well.url()].map(|u| u.parse::<Endpoint>().unwrap());
    let upstream = Upstream::builder(endpoints, RoundRobin::default())
        .health_check(check)
        .build();
    let sick_ep = Arc::clone(&upstream.endpoints()[0]);

    // A few passing probes: healthy, and probed on schedule.
    run_until(INTERVAL * 3, || probes(&sick) >= 3).await;
    assert!(sick_ep.is_healthy());
    assert!(picks(&upstream, 10).contains(&sick_ep.id()));

    failing.store(true, Ordering::SeqCst);
    let before = probes(&sick);
    let took = run_until(INTERVAL * 10, || !sick_ep.is_healthy()).await;
    assert_eq!(
        probes(&sick) - before,
        3,
        "unhealthy at the third failed probe, not before"
    );
    assert!(
        took <= (INTERVAL + JITTER) * 3 + TIMEOUT,
        "unhealthy within unhealthy_threshold x (interval + jitter): took {took:?}"
    );
    assert!(
        took >= INTERVAL * 2,
        "three probes need two intervals: {took:?}"
    );
    assert!(
        picks(&upstream, 20).iter().all(|id| *id != sick_ep.id()),
        "an unhealthy endpoint gets no traffic"
    );
    assert!(!upstream.endpoints()[0].state(Instant::now()).healthy);

    failing.store(false, Ordering::SeqCst);
    let before = probes(&sick);
    let took = run_until(INTERVAL * 10, || sick_ep.is_healthy()).await;
    assert_eq!(
        probes(&sick) - before,
        2,
        "healthy after two passing probes"
    );
    assert!(took <= (INTERVAL + JITTER) * 2 + TIMEOUT, "took {took:?}");
    assert!(
        picks(&upstream, 10).contains(&sick_ep.id()),
        "back in rotation"
    );

    // The probes stop with the upstream.
    drop(upstream);
    tokio::time::sleep(STEP).await;
    let (sick_probes, well_probes) = (probes(&sick), probes(&well));
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!((probes(&sick), probes(&well)), (sick_probes, well_probes));
}

#[tokio::test(start_paused = true)]
async fn refused_connections_and_hung_probes_fail_the_check() {
    let refused = gateway_core::test_util::refused_addr().await;
    let hung = TestUpstream::hang().await;
    let check = HealthCheck::http("/healthz")
        .unwrap()
        .interval(INTERVAL)
        .jitter(Duration::ZERO)
        .timeout(TIMEOUT)
        .unhealthy_threshold(NonZeroU32::new(2).unwrap());
    let endpoints = [refused.to_string(), hung.url()].map(|u| u.parse::<Endpoint>().unwrap());
    let upstream = Upstream::builder(endpoints, RoundRobin::default())
        .health_check(check)
        .build();
    let all = upstream.endpoints();
    run_until(INTERVAL * 4, || all.iter().all(|e| !e.is_healthy())).await;
}

#[test]
fn health_paths_must_be_absolute() {
    for bad in ["healthz", "", "http://x/healthz", "/a b"] {
        assert!(HealthCheck::http(bad).is_err(), "{bad:?}");
    }
}
