//! Per-request cost of the resilience layers: a retry layer whose first try succeeds (the
//! request copied for a retry that does not come, the budget counted), and a circuit
//! breaker's admission and record, closed (lock-free, and with a rate window) and open, and
//! per-endpoint breakers.
//!
//! `cargo bench -p gateway-benches --bench resilience`

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;
use divan::AllocProfiler;
use gateway_benches::{ok_service, ready};
use gateway_core::{Body, ClientIp, RouteId, TriedEndpoints};
use gateway_middleware::circuit_breaker::{
    Breaker, CircuitBreakerLayer, EndpointBreakerLayer, Window,
};
use gateway_middleware::retry::{Budget, RetryLayer, RetryPolicy};
use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use tower::{Layer, ServiceExt, service_fn};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

/// A GET as a browser or an API client sends it, with the extensions the edge sets. Its
/// field values are slices of one shared buffer, as the server's HTTP/1.1 codec makes
/// them (so copying the head shares them rather than copying bytes).
fn request() -> Request<Body> {
    const FIELDS: [(&str, &str); 6] = [
        ("host", "api.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("authorization", "Bearer eyJhbGciOiJFUzI1NiJ9.e30.sig"),
        ("x-request-id", "0b9e3f0c6a1d4e2f"),
    ];
    let buf = Bytes::from(FIELDS.iter().map(|(_, v)| *v).collect::<String>());
    let mut req = Request::get("/api/orders/42?expand=items")
        .body(Body::empty())
        .expect("a request");
    let mut at = 0;
    for (name, value) in FIELDS {
        let slice = buf.slice(at..at + value.len());
        at += value.len();
        req.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_maybe_shared(slice).expect("a field value"),
        );
    }
    let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    req.extensions_mut().insert(ClientIp::new(ip, false));
    req.extensions_mut().insert(RouteId::new("api"));
    req
}

/// The answering service alone, for the layers' cost by difference.
#[divan::bench]
fn baseline(b: divan::Bencher<'_, '_>) {
    let svc = ok_service();
    b.with_inputs(request)
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// The retry layer, first try answered: the copy for a retry, the budget's deposit.
#[divan::bench]
fn retry_first_try_succeeds(b: divan::Bencher<'_, '_>) {
    let svc =
        RetryLayer::new(RetryPolicy::idempotent().budget(Budget::new(0.2).expect("a valid ratio")))
            .layer(ok_service());
    b.with_inputs(request)
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// The retry layer on a `POST` with a body in memory (retried only if never sent).
#[divan::bench]
fn retry_post_in_memory(b: divan::Bencher<'_, '_>) {
    let svc = RetryLayer::new(RetryPolicy::idempotent()).layer(ok_service());
    b.with_inputs(|| {
        let mut req = request();
        *req.method_mut() = http::Method::POST;
        *req.body_mut() = Body::from("{\"item\":42,\"quantity\":1}");
        req
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// A budget's check for a retry, with a full window.
#[divan::bench]
fn budget_withdraw(b: divan::Bencher<'_, '_>) {
    let budget = Budget::new(1000.0).expect("a valid ratio");
    for _ in 0..10_000 {
        budget.deposit();
    }
    b.bench_local(|| budget.withdraw());
}

/// A closed breaker tripping on failures in a row: admission and record, lock-free.
#[divan::bench]
fn breaker_closed_consecutive(b: divan::Bencher<'_, '_>) {
    let svc = CircuitBreakerLayer::new("api", Breaker::consecutive(5)).layer(ok_service());
    b.with_inputs(request)
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// A closed breaker with a failure-rate and a slow-call window of 100 calls (the record
/// takes the window's lock).
#[divan::bench]
fn breaker_closed_rate_window(b: divan::Bencher<'_, '_>) {
    let breaker = Breaker::failure_rate(0.5)
        .min_calls(20)
        .window(Window::count(100))
        .slow_calls(Duration::from_secs(2), 0.8);
    let svc = CircuitBreakerLayer::new("api", breaker).layer(ok_service());
    b.with_inputs(request)
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// An open breaker's refusal (the 503 error, without the upstream).
#[divan::bench]
fn breaker_open_refuses(b: divan::Bencher<'_, '_>) {
    let failing = service_fn(|_: Request<Body>| {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        std::future::ready(Ok::<_, std::convert::Infallible>(res))
    });
    let layer = CircuitBreakerLayer::new(
        "api",
        Breaker::consecutive(1).open_for(Duration::from_secs(3600), Duration::from_secs(3600)),
    );
    let svc = layer.layer(failing);
    let _ = ready(svc.clone().oneshot(request()));
    b.with_inputs(request)
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// Per-endpoint breakers over 8 endpoints, all closed: the 8 admissions, the bar list, and
/// the record for the endpoint picked (here by a stand-in for the proxy's balancer).
#[divan::bench]
fn breaker_per_endpoint_8(b: divan::Bencher<'_, '_>) {
    let authorities: Vec<Authority> = (0..8)
        .map(|i| Authority::try_from(format!("10.0.0.{i}:8080")).expect("an authority"))
        .collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let balancer = service_fn(move |req: Request<Body>| {
        let id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8;
        if let Some(tried) = req.extensions().get::<TriedEndpoints>() {
            let authority = authorities.get(usize::try_from(id).unwrap_or(0)).cloned();
            tried.lock().push(id, authority);
        }
        std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(
            Body::empty(),
        )))
    });
    let svc = EndpointBreakerLayer::new("api", Breaker::consecutive(5)).layer(balancer);
    for _ in 0..8 {
        let _ = ready(svc.clone().oneshot(request()));
    }
    b.with_inputs(request)
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}
