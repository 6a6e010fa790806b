use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gateway_core::metrics::{Format, Metrics};
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::{Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::*;

/// An upstream answering `status` after `delay`, counting its calls.
#[derive(Clone)]
struct Upstream {
    status: Arc<std::sync::Mutex<StatusCode>>,
    delay: Duration,
    calls: Arc<AtomicUsize>,
    /// When set, calls wait for a permit (the test releases them).
    gate: Option<Arc<Semaphore>>,
}

impl Upstream {
    fn new(status: u16) -> Self {
        Self {
            status: Arc::new(std::sync::Mutex::new(StatusCode::from_u16(status).unwrap())),
            delay: Duration::ZERO,
            calls: Arc::default(),
            gate: None,
        }
    }

    fn set(&self, status: u16) {
        *self.status.lock().unwrap() = StatusCode::from_u16(status).unwrap();
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (status, delay, gate) = (*self.status.lock().unwrap(), self.delay, self.gate.clone());
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(delay).await;
            Ok(Response::builder()
                .status(status)
                .body(Body::empty())
                .unwrap())
        })
    }
}

async fn call<S>(service: &S) -> Result<StatusCode, ErrorKind>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    service
        .clone()
        .oneshot(Request::new(Body::empty()))
        .await
        .map(|r| r.status())
        .map_err(|e| Error::kind_of(&*e))
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_it_and_it_refuses_without_calling() {
    let up = Upstream::new(503);
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::consecutive(3).open_for(SECOND * 5, SECOND * 60),
    );
    let service = layer.layer(up.clone());
    // A success and a 4xx in between reset the run and count for nothing.
    for status in [503, 503, 200, 503, 404, 503] {
        up.set(status);
        call(&service).await.unwrap();
    }
    assert_eq!(layer.phase(), Phase::Closed);
    // The last 503 above began a run: two more make three.
    up.set(503);
    for _ in 0..2 {
        call(&service).await.unwrap();
    }
    assert_eq!(layer.phase(), Phase::Open);
    let before = up.calls();
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(call(&service).await, Err(ErrorKind::CircuitOpen));
    }
    assert_eq!(up.calls(), before, "refused without touching the upstream");
    assert_eq!(started.elapsed(), Duration::ZERO);
    // The refusal says when to come back: the open time left, rounded up.
    tokio::time::advance(SECOND * 2).await;
    let err = layer
        .layer(up.clone())
        .oneshot(Request::new(Body::empty()))
        .await
        .unwrap_err();
    let err = Error::from_box(err);
    let after = err.retry_after_hint().unwrap();
    assert!(after <= SECOND * 3 && after > SECOND * 3 / 2, "{after:?}");
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_its_probes_however_many_arrive() {
    let mut up = Upstream::new(503);
    let gate = Arc::new(Semaphore::new(0));
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::consecutive(1)
            .probes(3)
            .open_for(SECOND, SECOND * 60),
    );
    call(&layer.layer(up.clone())).await.unwrap();
    assert_eq!(layer.phase(), Phase::Open);
    up.set(200);
    up.gate = Some(Arc::clone(&gate));
    let service = layer.layer(up.clone());
    tokio::time::advance(SECOND).await;
    let before = up.calls();
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move { call(&service).await })
        })
        .collect();
    // Every call has run as far as it can.
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Everyone but the probes is refused at once.
    let mut refused = 0;
    let mut pending = Vec::new();
    for handle in calls {
        if handle.is_finished() {
            assert_eq!(handle.await.unwrap(), Err(ErrorKind::CircuitOpen));
            refused += 1;
        } else {
            pending.push(handle);
        }
    }
    assert_eq!((refused, pending.len()), (97, 3));
    assert_eq!(up.calls() - before, 3);
    assert_eq!(layer.phase(), Phase::HalfOpen);
    gate.add_permits(3);
    for handle in pending {
        assert_eq!(handle.await.unwrap(), Ok(StatusCode::OK));
    }
    assert_eq!(layer.phase(), Phase::Closed, "all probes passed");
    gate.add_permits(1000);
    assert_eq!(call(&service).await, Ok(StatusCode::OK));
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_opens_it_again_for_longer() {
    let up = Upstream::new(503);
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::consecutive(1)
            .probes(1)
            .open_for(SECOND * 10, SECOND * 25),
    );
    let service = layer.layer(up.clone());
    call(&service).await.unwrap();
    // Each opening in a row doubles the time (up to a fifth less, at random), to the cap.
    for (n, full) in [(1, 10), (2, 20), (3, 25), (4, 25)] {
        let opened = Instant::now();
        while call(&service).await == Err(ErrorKind::CircuitOpen) {
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let open = opened.elapsed();
        let full = SECOND * full;
        assert!(
            open <= full + Duration::from_millis(100) && open >= full * 4 / 5,
            "opening {n}: {open:?}"
        );
        assert_eq!(layer.phase(), Phase::Open, "the probe failed");
    }
    // A passing probe closes it, and the next opening is short again.
    tokio::time::advance(SECOND * 25).await;
    up.set(200);
    assert_eq!(call(&service).await, Ok(StatusCode::OK));
    assert_eq!(layer.phase(), Phase::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_failure_rate_opens_it_once_the_window_has_its_minimum() {
    let up = Upstream::new(503);
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::failure_rate(0.5)
            .min_calls(10)
            .window(Window::count(20)),
    );
    let service = layer.layer(up.clone());
    for _ in 0..9 {
        call(&service).await.unwrap();
    }
    assert_eq!(layer.phase(), Phase::Closed, "under the minimum");
    call(&service).await.unwrap();
    assert_eq!(layer.phase(), Phase::Open);

    // Under the rate, it stays closed: 1 failure in every 5 calls.
    let up = Upstream::new(200);
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::failure_rate(0.5)
            .min_calls(10)
            .window(Window::count(20)),
    );
    let service = layer.layer(up.clone());
    for n in 0..40 {
        up.set(if n % 5 == 0 { 503 } else { 200 });
        call(&service).await.unwrap();
    }
    assert_eq!(layer.phase(), Phase::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_time_window_forgets_old_failures() {
    let up = Upstream::new(503);
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::failure_rate(0.5)
            .min_calls(4)
            .window(Window::time(SECOND * 10)),
    );
    let service = layer.layer(up.clone());
    for _ in 0..3 {
        call(&service).await.unwrap();
    }
    tokio::time::advance(SECOND * 11).await;
    up.set(200);
    call(&service).await.unwrap();
    up.set(503);
    call(&service).await.unwrap();
    assert_eq!(
        layer.phase(),
        Phase::Closed,
        "1 failure in 2 calls: under the minimum"
    );
    for _ in 0..2 {
        call(&service).await.unwrap();
    }
    assert_eq!(layer.phase(), Phase::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_alone_open_it() {
    let mut up = Upstream::new(200);
    up.delay = Duration::from_millis(300);
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::on_slow_calls(Duration::from_millis(200), 0.5).min_calls(4),
    );
    let service = layer.layer(up.clone());
    for _ in 0..4 {
        assert_eq!(call(&service).await, Ok(StatusCode::OK));
    }
    assert_eq!(layer.phase(), Phase::Open);
}

#[tokio::test(start_paused = true)]
async fn while_open_the_fallback_answers() {
    let up = Upstream::new(503);
    let spare = Upstream::new(200);
    let layer = CircuitBreakerLayer::new("api", Breaker::consecutive(1)).fallback(spare.clone());
    let service = layer.layer(up.clone());
    assert_eq!(call(&service).await, Ok(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(call(&service).await, Ok(StatusCode::OK));
    assert_eq!((up.calls(), spare.calls()), (1, 1));

    let fixed = Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(bytes::Bytes::from_static(b"{\"orders\":[]}"))
        .unwrap();
    let layer = CircuitBreakerLayer::new("api", Breaker::consecutive(1)).fallback_response(fixed);
    let service = layer.layer(up.clone());
    call(&service).await.unwrap();
    let res = service
        .clone()
        .oneshot(Request::new(Body::empty()))
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(
        res.into_body().collect_bytes().await.unwrap(),
        "{\"orders\":[]}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_dropped_by_its_client_leaves_its_place_to_another() {
    let mut up = Upstream::new(503);
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::consecutive(1).probes(1).open_for(SECOND, SECOND),
    );
    call(&layer.layer(up.clone())).await.unwrap();
    tokio::time::advance(SECOND).await;
    up.set(200);
    up.gate = Some(Arc::new(Semaphore::new(0)));
    let service = layer.layer(up.clone());
    let probe = tokio::spawn({
        let service = service.clone();
        async move { call(&service).await }
    });
    tokio::task::yield_now().await;
    assert_eq!(
        call(&service).await,
        Err(ErrorKind::CircuitOpen),
        "one probe at a time"
    );
    probe.abort();
    let _ = probe.await;
    up.gate = None;
    let service = layer.layer(up.clone());
    assert_eq!(call(&service).await, Ok(StatusCode::OK));
    assert_eq!(layer.phase(), Phase::Closed);
}

#[tokio::test(start_paused = true)]
async fn phases_are_counted_and_shown() {
    let metrics = Metrics::new();
    let up = Upstream::new(503);
    let layer = CircuitBreakerLayer::new(
        "orders",
        Breaker::consecutive(1).probes(1).open_for(SECOND, SECOND),
    )
    .metrics(&metrics);
    let service = layer.layer(up.clone());
    call(&service).await.unwrap();
    call(&service).await.unwrap_err();
    let text = metrics.encode(Format::Prometheus);
    for line in [
        r#"gateway_circuit_breaker_state{breaker="orders"} 1"#,
        r#"gateway_circuit_breaker_transitions_total{breaker="orders",to="open"} 1"#,
        r#"gateway_circuit_breaker_refused_total{breaker="orders"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    tokio::time::advance(SECOND).await;
    up.set(200);
    call(&service).await.unwrap();
    let text = metrics.encode(Format::Prometheus);
    for line in [
        r#"gateway_circuit_breaker_state{breaker="orders"} 0"#,
        r#"gateway_circuit_breaker_transitions_total{breaker="orders",to="half_open"} 1"#,
        r#"gateway_circuit_breaker_transitions_total{breaker="orders",to="closed"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}
