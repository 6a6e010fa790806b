//! Middleware that tries a failed request again, on another endpoint, within a budget.
//!
//! [`RetryLayer`] runs tower's [`Retry`](tower::retry::Retry) with a per-request policy
//! made from a [`RetryPolicy`]:
//!
//! - **What**: by default, requests with idempotent methods (RFC 9110 §9.2.2: `GET`,
//!   `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`) on a connect failure, a reset before any
//!   response, a try that timed out, or a 502, 503 or 504 ([`On`]). Any other request only
//!   when its connection could not be opened: nothing of it was sent. A `POST` that was
//!   sent is never sent again unless [`RetryPolicy::methods`] lists it.
//! - **Where**: each try goes to an endpoint not tried yet for the request (the layer puts
//!   a [`TriedEndpoints`](gateway_core::TriedEndpoints) in it, which the proxy's balancer
//!   reads), until every endpoint was tried.
//! - **When**: after an exponential backoff with full jitter; after the upstream's
//!   `Retry-After` when it sent one (up to [`RetryPolicy::max_retry_after`]; longer, and the
//!   response goes to the client); at once after a connect failure. Never past the
//!   request's [`Deadline`](gateway_core::time::Deadline): a retry that could not finish
//!   in time is not started.
//! - **How much**: a [`Budget`] shared by the route's requests caps retries at a fraction
//!   of recent requests plus a floor, so a sick upstream sees at most that much extra load.
//! - **Bodies**: a request body in memory is cloned for each try. One that streams is
//!   forwarded as it comes (the first try never waits for it) while a copy of at most
//!   [`RetryPolicy::replay_limit`] bytes is kept; a body over the limit is not retried.
//!
//! Every retry is counted (`gateway_retry_attempts_total{route, reason}`), and so is every
//! retryable failure passed on without one (`gateway_retry_skipped_total{route,
//! reason}`: tries, budget, deadline, retry_after, body); the access log's `retry` and
//! `retry_refused` fields say the same for one request, and `upstream_attempts` counts its
//! tries.
//!
//! # Ordering
//!
//! Retry sits on the upstream path, below the policy layers (auth, limits and cache judge
//! a request once) and above the circuit breaker and the proxy:
//! `Timeout → Retry → CircuitBreaker → ReverseProxy`. The [`TimeoutLayer`] above it bounds
//! the request as a whole, retries included; [`RetryPolicy::per_try_timeout`] bounds each
//! try.
//!
//! [`TimeoutLayer`]: crate::timeout::TimeoutLayer
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gateway_core::Body;
//! use gateway_middleware::retry::{Budget, RetryLayer, RetryPolicy};
//! use http::{Request, Response, StatusCode};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // An upstream that fails the first call with a 503.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let upstream = service_fn({
//!     let calls = Arc::clone(&calls);
//!     move |_: Request<Body>| {
//!         let n = calls.fetch_add(1, Ordering::Relaxed);
//!         let status = if n == 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
//!         async move { Ok::<_, BoxError>(Response::builder().status(status).body(Body::empty()).unwrap()) }
//!     }
//! });
//! let service = ServiceBuilder::new()
//!     .layer(RetryLayer::new(
//!         RetryPolicy::idempotent()
//!             .tries(3)
//!             .budget(Budget::new(0.2).unwrap())
//!             .per_try_timeout(Some(Duration::from_secs(2))),
//!     ))
//!     .service(upstream);
//! let res = service.oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(calls.load(Ordering::Relaxed), 2);
//! # }
//! ```

mod budget;
mod layer;
mod policy;
mod replay;

pub use budget::{Budget, InvalidBudget};
pub use layer::{ResponseFuture, Retry, RetryLayer};
pub use policy::{On, RetryPolicy};

#[cfg(test)]
mod tests;
