//! Policy layers for the gateway, one module and one cargo feature each (the feature is the
//! kebab-case twin of the module, and `full` turns them all on).
//!
//! - [`request_id`] (`request-id`): an id for every request, in [`gateway_core::RequestId`]
//!   and on the request and the response.
//! - [`body_limit`] (`body-limit`): 413 for request bodies over a size, chunked ones too.
//! - [`ip_filter`] (`ip-filter`): allow or deny by client address (403).
//! - [`cors`] (`cors`): CORS preflights answered, response headers for allowed origins.
//! - [`compression`] (`compression`): gzip, br and zstd responses (tower-http's).
//! - [`headers`] (`headers`): set, append and remove request and response headers.
//! - [`trace_context`] (`trace-context`): W3C `traceparent`, continued or started.
//! - [`request_span`] (`request-span`): a `tracing` span per request, so a failed
//!   request's log line names its method, path, route and upstream.
//! - [`otlp`] (`otlp`): a span per sampled request, exported to an OpenTelemetry
//!   collector over OTLP/HTTP.
//! - [`metrics`] (`metrics`): Prometheus request counts, durations and bytes at the edge.
//! - [`access_log`] (`access-log`): one JSON (or combined-format) line per request, written
//!   off the request path.
//! - [`observe`] (with any of `metrics`, `access-log`, `otlp`): the layer those three are,
//!   observing a request once for all of them.
//! - [`auth`] (`auth`): who is calling: JWT (static keys, JWKS files and URLs) and API
//!   keys, any of several with an anonymous fallback, and ACLs by group.
//! - [`rate_limit`] (`rate-limit`): limits per client, consumer, header or route, rates
//!   and requests in flight, stacked, with bounded keys and the IETF `RateLimit` headers.
//! - [`redis`] (`redis`): a Redis server shared by gateway instances, for distributed
//!   rate limits.
//! - [`timeout`] (`timeout`): a route's total time, and its deadline told to the layers
//!   below.
//! - [`retry`] (`retry`): failed requests tried again on other endpoints, within a budget,
//!   with backoff, `Retry-After`, per-try timeouts and replayed bodies.
//! - [`circuit_breaker`] (`circuit-breaker`): calls to a sick upstream refused for a
//!   while, with bounded half-open probes and fallbacks.
//! - [`concurrency_limit`] (`concurrency-limit`): a route's requests in flight capped, the
//!   rest shed at once with a 503.
//! - [`config`] (`config`): the layers above by name, for the declarative config.
//!
//! Caching lands with its issue.
//! Every layer speaks the vocabulary of `gateway-core`: rejections are
//! [`gateway_core::Error`]s rendered in-band, identities and client addresses are read from
//! request extensions, and upstream outcomes are judged by [`gateway_core::classify`].

#![forbid(unsafe_code)]

#[cfg(feature = "access-log")]
pub mod access_log;
#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "body-limit")]
pub mod body_limit;
#[cfg(feature = "cache")]
pub mod cache;
#[cfg(feature = "circuit-breaker")]
pub mod circuit_breaker;
#[cfg(feature = "compression")]
pub mod compression;
#[cfg(feature = "concurrency-limit")]
pub mod concurrency_limit;
#[cfg(feature = "config")]
pub mod config;
#[cfg(feature = "cors")]
pub mod cors;
#[cfg(feature = "headers")]
pub mod headers;
#[cfg(any(feature = "request-id", feature = "trace-context"))]
mod hex;
#[cfg(feature = "ip-filter")]
pub mod ip_filter;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(any(feature = "metrics", feature = "access-log", feature = "otlp"))]
pub mod observe;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "auth", feature = "body-limit", feature = "ip-filter"))]
mod refuse;
#[cfg(feature = "request-id")]
pub mod request_id;
#[cfg(feature = "request-span")]
pub mod request_span;
#[cfg(feature = "retry")]
pub mod retry;
#[cfg(feature = "timeout")]
pub mod timeout;
#[cfg(feature = "trace-context")]
pub mod trace_context;

pub use gateway_core::{Error, ErrorKind};
