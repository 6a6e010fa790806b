//! Middleware that limits requests per key (feature `rate-limit`): rates on governor's GCRA
//! and requests in flight, several stacked on one route, with bounded key memory and the
//! IETF `RateLimit` headers.
//!
//! - A [`Limit`] is a rate ([`Limit::rate`] with a [`Quota`]: so many requests per period,
//!   with a burst) or a number of requests in flight ([`Limit::concurrent`]), counted per
//!   [`Key`]: the client's address (IPv6 grouped by /64), the consumer, a header, the route,
//!   a closure, or several of them together.
//! - A [`RateLimitLayer`] holds one or more limits (`.and(..)`): a request passes only when
//!   every limit has room, and takes nothing from any of them when one refuses. Its clones,
//!   and all the services it makes, share one set of buckets.
//! - Refusals are **429** problem+json from [`gateway_core::Error`], with `Retry-After`
//!   rounded up. Every response carries `RateLimit-Policy` and `RateLimit` (the RFC 9651
//!   lists of draft-ietf-httpapi-ratelimit-headers), the legacy `X-RateLimit-*` trio, both
//!   or none ([`HeaderStyle`]). In [`shadow`](RateLimitLayer::shadow) mode nothing is
//!   refused: refusals are counted, logged and shown in the headers.
//! - Each limit holds at most [`max_keys`](RateLimitLayer::max_keys) keys. Keys whose
//!   bucket is full again are evicted off the request path; a map full of keys in use
//!   sheds new keys or counts them in one shared bucket ([`WhenFull`]), and says so in
//!   `gateway_rate_limit_overflow_total`.
//! - With [`distributed`](RateLimitLayer::distributed) (feature `redis`) the rates are kept
//!   in Redis and hold across every gateway instance: one atomic script per request, or
//!   leases that spare most requests the round trip; failing open or closed when Redis is
//!   down.
//!
//! The guide, with every rule, the headers, Redis and the measured cost, is
//! `docs/rate-limit.md`.
//!
//! # Example
//!
//! ```
//! use gateway_core::{Body, ClientIp};
//! use gateway_middleware::rate_limit::{Limit, Quota, RateLimitLayer};
//! use http::{Request, Response, StatusCode};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut svc = ServiceBuilder::new()
//!     .layer(
//!         RateLimitLayer::per_ip(Quota::per_second(10).burst(2))
//!             .and(Limit::rate("hour", Quota::per_hour(1_000))),
//!     )
//!     .service(service_fn(|_: Request<Body>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//!     }));
//!
//! let req = || {
//!     let mut req = Request::new(Body::empty());
//!     req.extensions_mut().insert(ClientIp::new([192, 0, 2, 7].into(), false));
//!     req
//! };
//! let ok = svc.ready().await.unwrap().call(req()).await.unwrap();
//! assert_eq!(ok.headers()["ratelimit"], r#""per-ip";r=1;t=1, "hour";r=999;t=4"#);
//! svc.ready().await.unwrap().call(req()).await.unwrap();
//! let refused = svc.ready().await.unwrap().call(req()).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()["retry-after"], "1");
//! # }
//! ```
//!
//! # Ordering
//!
//! Inside CORS (so a 429 carries the CORS headers a browser needs to read it, and
//! preflights, answered by CORS, take nothing), inside auth when keyed by consumer (the
//! [`Identity`](gateway_core::Identity) is set there), and after the client address is
//! resolved ([`gateway_core::client_ip`]): the key is the right-most untrusted address, so
//! a client rotating `X-Forwarded-For` does not get a fresh bucket.

mod future;
mod header;
mod key;
mod layer;
mod quota;
#[cfg(feature = "redis")]
mod remote;
mod store;

pub use future::ResponseFuture;
pub use header::HeaderStyle;
pub use key::Key;
pub use layer::{Limit, MAX_LIMITS, RateLimit, RateLimitLayer};
pub use quota::{InvalidQuota, Quota};
#[cfg(feature = "redis")]
pub use remote::{Batch, Distributed, OnError};
pub use store::WhenFull;

#[cfg(test)]
mod tests;
