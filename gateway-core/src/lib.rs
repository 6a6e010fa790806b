//! The shared vocabulary of the gateway crates.
//!
//! Everything the policy layers (`gateway-middleware`) and the upstream side
//! (`gateway-proxy`) agree on lives here, and nothing else: no policy, no sockets.
//!
//! - [`Body`]: the one body type at every boundary we own.
//! - [`Error`] and [`ErrorKind`]: the one mapping from failure to HTTP status and a safe
//!   RFC 9457 body; [`RescueLayer`] applies it at the edge.
//! - [`Plugin`], [`PluginLayer`], [`Flow`]: custom plugins as ordinary tower layers.
//! - Request extensions read by every layer: [`ConnectInfo`], [`ClientIp`] (resolved by
//!   [`client_ip::SetClientIpLayer`]), [`RouteId`], [`Identity`], [`RequestId`],
//!   [`Drain`], and [`LogFields`] (what inner layers add to the access log).
//! - [`classify`]: one judgement of upstream outcomes for retries, breakers, health and
//!   metrics.
//! - `metrics` (feature `metrics`): the Prometheus registry and its label conventions.
//! - [`time::deadline`]: configured durations as deadlines, "forever" included.
//! - [`fields::HOP_BY_HOP`]: the fields that describe one connection, never passed on.
//! - [`purge`]: caches forgetting what they hold, on the admin listener's request.
//! - [`boxed::oneshot`]: a type-erased route service called with one allocation.
//! - `test_util` (feature `test-util`): in-process upstreams and raw-socket helpers.

#![forbid(unsafe_code)]
#![doc = include_str!("../../docs/plugins.md")]

mod body;
pub mod boxed;
pub mod classify;
pub mod client_ip;
mod error;
mod ext;
pub mod fields;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod plugin;
pub mod purge;
#[cfg(feature = "registry")]
pub mod registry;
pub mod rescue;
#[cfg(feature = "test-util")]
pub mod test_util;
pub mod time;
#[cfg(feature = "registry")]
pub mod units;

pub use body::{Body, BodyIdleTimeout};
pub use client_ip::SetClientIpLayer;
pub use error::{Error, ErrorKind};
pub use ext::{
    ClientIp, ConnectInfo, Drain, Identity, LogFields, LogValue, RequestId, RouteId, Tried,
    TriedEndpoints, UpstreamCall,
};
pub use plugin::{Flow, Plugin, PluginLayer};
pub use rescue::RescueLayer;

/// The boxed error type used on the upstream path.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
