//! Middleware that stops calling a sick upstream for a while: a circuit breaker.
//!
//! A [`CircuitBreakerLayer`] holds one breaker (its clones share it; give several routes
//! one layer to share a breaker per upstream). The breaker is **closed** while calls go
//! well; it **opens** on the conditions its [`Breaker`] sets (failures in a row, a failure
//! rate or a slow-call rate over a sliding [`Window`] with a minimum number of calls), and
//! while open refuses calls at once, without touching the upstream. After its open time
//! (doubling with each opening in a row, up to a cap, with jitter) it is **half-open**:
//! exactly [`probes`](Breaker::probes) calls go through, however many arrive at once, and
//! decide: one failed or slow probe opens it again, all of them passing close it.
//!
//! Admission is lock-free (atomics only); failures are what [`gateway_core::classify`]
//! says they are, so a 4xx or a client's broken upload never counts against the upstream.
//!
//! While open, a call gets, as configured:
//! - a `503` problem+json (`circuit_open`) with `Retry-After` (the default; an error passed
//!   up, so the route's rescue answers it inside CORS);
//! - a fixed response ([`CircuitBreakerLayer::fallback_response`]);
//! - or a **fallback service** ([`CircuitBreakerLayer::fallback`]): another upstream, or
//!   another route's stack, gets the request untouched.
//!
//! Changes of phase are logged once each (`warn` when it opens), counted
//! (`gateway_circuit_breaker_transitions_total{breaker, to}`), and shown
//! (`gateway_circuit_breaker_state{breaker}`, on the admin status page); refused calls are
//! counted (`gateway_circuit_breaker_refused_total`) and carry `circuit_breaker: "open"` in
//! the access log.
//!
//! # One breaker per endpoint
//!
//! A [`CircuitBreakerLayer`] judges what is behind it as one: a route, or an upstream
//! when routes share the layer. An [`EndpointBreakerLayer`] keeps a breaker for each
//! endpoint of the upstream behind it instead (Resilience4j's breakers by instance, or
//! Envoy's outlier detection with half-open probes): before each call it bars the
//! endpoints whose breaker is open ([`Tried::bar`](gateway_core::Tried::bar)), the
//! proxy's balancer picks among the others, and the outcome goes to the breaker of the
//! endpoint picked (and, when the proxy failed over from endpoints it could not connect
//! to, a failure to each of them). A half-open endpoint gets exactly its probes. When
//! every endpoint is barred, the call is refused without touching the upstream: a `503`
//! (`circuit_open`) with `Retry-After`, or a fixed response.
//!
//! ```
//! use gateway_middleware::circuit_breaker::{Breaker, EndpointBreakerLayer};
//!
//! // Each endpoint of `orders` opens on its own after 5 failures in a row.
//! let layer = EndpointBreakerLayer::new("orders", Breaker::consecutive(5));
//! # let _ = layer;
//! ```
//!
//! # Ordering
//!
//! `Retry → CircuitBreaker → Timeout → ReverseProxy`: below the retry layer, so that each
//! try is judged (and a try refused by an open breaker is not retried); above the route's
//! timeout or the proxy's response header timeout, so that a hanging upstream counts as a
//! failure rather than as a call that never ends.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gateway_core::{Body, Error, ErrorKind};
//! use gateway_middleware::circuit_breaker::{Breaker, CircuitBreakerLayer, Phase};
//! use http::{Request, Response, StatusCode};
//! use tower::{BoxError, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let layer = CircuitBreakerLayer::new("orders", Breaker::consecutive(2));
//! let dead = service_fn(|_: Request<Body>| async {
//!     Ok::<_, BoxError>(Response::builder().status(503).body(Body::empty()).unwrap())
//! });
//! let mut service = tower::ServiceBuilder::new().layer(layer.clone()).service(dead);
//! for _ in 0..2 {
//!     let res = service.ready().await.unwrap().call(Request::new(Body::empty())).await.unwrap();
//!     assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! }
//! assert_eq!(layer.phase(), Phase::Open);
//! // Refused without calling the upstream.
//! let err = service.ready().await.unwrap().call(Request::new(Body::empty())).await.unwrap_err();
//! assert_eq!(Error::kind_of(&*err), ErrorKind::CircuitOpen);
//! # }
//! ```

mod breaker;
mod endpoint;
mod layer;
mod window;

pub use breaker::{Breaker, Phase};
#[cfg(feature = "config")]
pub(crate) use endpoint::WeakEndpointBreakers;
pub use endpoint::{EndpointBreaker, EndpointBreakerLayer, EndpointFuture};
#[cfg(feature = "config")]
pub(crate) use layer::WeakBreaker;
pub use layer::{CircuitBreaker, CircuitBreakerLayer, ResponseFuture};
pub use window::Window;

#[cfg(test)]
mod tests;
