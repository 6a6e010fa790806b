//! Upstreams: a set of endpoints, the balancer that picks one per request, and the
//! [`HttpClient`] that talks to them over pooled connections (HTTP/1.1 on the gateway's own
//! codec, HTTP/2 on hyper's; each endpoint carries its pools, see `pool`). The proxy, the
//! health checks and any layer that calls an upstream share it.
//!
//! An [`Upstream`] is cheap to clone (one `Arc`) and shared by every proxy that sends to it.
//! Each [`Endpoint`] carries its own live state (requests in flight, a peak-EWMA response
//! time, consecutive failures, health), so balancers, the proxy and metrics read the same
//! numbers. [`Upstream::select`] returns a [`Selected`] guard that counts the request in
//! flight until it is dropped (the proxy drops it when the response body ends) and takes
//! the request's outcome via [`Selected::record`]; the response time recorded is the time to
//! the response head.
//!
//! Balancers (one per upstream, chosen at construction):
//! - [`RoundRobin`]: smooth weighted round robin;
//! - [`Random`]: weighted random;
//! - [`LeastRequest`]: power of two choices by requests in flight relative to weight;
//! - [`PeakEwma`]: power of two choices by response-time estimate × load;
//! - [`ConsistentHash`]: Maglev on a [`HashKey`] (client IP, header, cookie, path);
//! - or your own [`Balance`].
//!
//! A retry layer asks for endpoints not tried yet by putting [`TriedEndpoints`] in the
//! request's extensions.
//!
//! Health, set with [`Upstream::builder`]:
//! - passive ([`OutlierDetection`]): endpoints whose requests keep failing are ejected for
//!   a time that grows with each ejection;
//! - active ([`HealthCheck`]): every endpoint is probed over HTTP in the background;
//! - [`WhenAllUnhealthy`] decides what happens when no endpoint is left;
//! - [`UpstreamBuilder::slow_start`] ramps a new or recovered endpoint's weight up.
//!
//! The endpoint set can change while requests flow: [`UpstreamBuilder::discover`] follows
//! any [`tower::discover::Discover`] of endpoints, such as [`DnsDiscovery`]. Endpoints that
//! stay keep their state, and requests in flight finish on the endpoint they started on.
//! [`Endpoint::state`] gives a snapshot of one endpoint's state for metrics.
//!
//! # Example
//!
//! ```
//! use gateway_proxy::upstream::{HashKey, Upstream};
//!
//! let upstream = Upstream::round_robin(["10.0.0.1:8080", "http://10.0.0.2:8080"]).unwrap();
//! assert_eq!(upstream.endpoints().len(), 2);
//! let sticky = Upstream::consistent_hash(HashKey::Cookie("session".into()), ["a:80", "b:80"]).unwrap();
//! # drop(sticky);
//! assert!(Upstream::round_robin(["ftp://nope"]).is_err());
//! ```

mod balance;
mod client;
mod discover;
mod endpoint;
mod exchange;
mod hash;
mod health;
mod outlier;
mod pool;
mod set;

pub use balance::{Balance, BalanceClone, LeastRequest, PeakEwma, PickContext, Random, RoundRobin};
pub use client::{HttpClient, HttpClientBuilder, InvalidClient, ResponseFuture};
pub(crate) use client::{SendError, Sending, Sent};
pub use discover::{DnsDiscovery, Resolve, ResolveFuture, SystemResolver};
pub use endpoint::{Endpoint, EndpointState, InvalidEndpoint, Outcomes};
pub(crate) use exchange::{Forwarding, Outbound, Upgraded};
pub use gateway_core::TriedEndpoints;
pub use hash::{ConsistentHash, HashKey};
pub use health::{HealthCheck, InvalidHealthCheck};
pub use outlier::OutlierDetection;
pub use set::{Endpoints, Selected, Upstream, UpstreamBuilder, WhenAllUnhealthy};

/// A histogram of response times, with the buckets of every latency in the gateway.
fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(gateway_core::metrics::LATENCY_BUCKETS)
}
