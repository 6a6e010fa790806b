//! The built-in layers by name, for the declarative config (feature `config`): [`register`]
//! puts every layer compiled in (by its feature) into a [`Registry`], each with its typed
//! config section.
//!
//! | name | section | layer |
//! |---|---|---|
//! | `request-id` | `{ header: x-request-id, trust_incoming: true }` | [`SetRequestIdLayer`](crate::request_id::SetRequestIdLayer) |
//! | `body-limit` | `{ max: 1MiB }` | [`BodyLimitLayer`](crate::body_limit::BodyLimitLayer) |
//! | `ip-filter` | `{ allow: [10.0.0.0/8], deny: [10.0.0.0/24] }` | [`IpFilterLayer`](crate::ip_filter::IpFilterLayer) |
//! | `timeout` | `{ total: 30s }` | tower's [`TimeoutLayer`](tower::timeout::TimeoutLayer): 504 when the route has not answered in time |

use gateway_core::BoxError;
use gateway_core::registry::{PluginFactory, Registry, RouteLayer};
use gateway_core::units::{Period, Size};
use serde::Deserialize;

/// Registers the built-in layers compiled into this build under their config names.
pub fn register(registry: &mut Registry) {
    #[cfg(feature = "request-id")]
    registry.register("request-id", RequestIdFactory);
    #[cfg(feature = "body-limit")]
    registry.register("body-limit", BodyLimitFactory);
    #[cfg(feature = "ip-filter")]
    registry.register("ip-filter", IpFilterFactory);
    registry.register("timeout", TimeoutFactory);
}

/// `request-id`'s section.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestIdConfig {
    /// The header [default: `x-request-id`].
    pub header: Option<String>,
    /// Keep a sane id the client sent [default: true].
    pub trust_incoming: Option<bool>,
}

/// `body-limit`'s section.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyLimitConfig {
    /// The most bytes of request body (`1MiB`, `512kB`, `65536`).
    pub max: Size,
}

#[cfg(feature = "request-id")]
struct RequestIdFactory;

#[cfg(feature = "request-id")]
impl PluginFactory for RequestIdFactory {
    type Config = RequestIdConfig;

    fn layer(&self, config: &RequestIdConfig) -> Result<RouteLayer, BoxError> {
        let mut layer = crate::request_id::SetRequestIdLayer::new();
        if let Some(header) = &config.header {
            layer = layer.header(http::HeaderName::try_from(header.as_str())?);
        }
        if let Some(trust) = config.trust_incoming {
            layer = layer.trust_incoming(trust);
        }
        Ok(RouteLayer::new(layer))
    }
}

#[cfg(feature = "body-limit")]
struct BodyLimitFactory;

#[cfg(feature = "body-limit")]
impl PluginFactory for BodyLimitFactory {
    type Config = BodyLimitConfig;

    fn layer(&self, config: &BodyLimitConfig) -> Result<RouteLayer, BoxError> {
        Ok(RouteLayer::new(crate::body_limit::BodyLimitLayer::new(
            config.max.0,
        )))
    }
}

/// `ip-filter`'s section: CIDRs or single addresses.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    /// Only these pass (when given).
    #[serde(default)]
    pub allow: Vec<String>,
    /// These never pass.
    #[serde(default)]
    pub deny: Vec<String>,
}

#[cfg(feature = "ip-filter")]
struct IpFilterFactory;

#[cfg(feature = "ip-filter")]
impl PluginFactory for IpFilterFactory {
    type Config = IpFilterConfig;

    fn layer(&self, config: &IpFilterConfig) -> Result<RouteLayer, BoxError> {
        let net = |text: &str| {
            gateway_core::client_ip::parse_net(text)
                .map_err(|_| format!("`{}` is not a CIDR or an IP address", text.trim()))
        };
        let mut layer = crate::ip_filter::IpFilterLayer::new();
        for allowed in &config.allow {
            layer = layer.allow(net(allowed)?);
        }
        for denied in &config.deny {
            layer = layer.deny(net(denied)?);
        }
        if config.allow.is_empty() && config.deny.is_empty() {
            return Err("an ip-filter needs an `allow` or a `deny` list".into());
        }
        Ok(RouteLayer::new(layer))
    }
}

/// `timeout`'s section.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// The most a request may take on this route, from the layer to the response head,
    /// whatever the inner layers do (retries included, once they exist).
    pub total: Period,
}

struct TimeoutFactory;

impl PluginFactory for TimeoutFactory {
    type Config = TimeoutConfig;

    fn layer(&self, config: &TimeoutConfig) -> Result<RouteLayer, BoxError> {
        if config.total.0.is_zero() {
            return Err("`total` must be more than 0".into());
        }
        Ok(RouteLayer::new(tower::timeout::TimeoutLayer::new(
            config.total.0,
        )))
    }
}
