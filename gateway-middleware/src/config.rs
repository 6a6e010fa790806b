//! The built-in layers by name, for the declarative config (feature `config`): [`register`]
//! puts every layer compiled in (by its feature) into a [`Registry`], each with its typed
//! config section.
//!
//! | name | section | layer |
//! |---|---|---|
//! | `request-id` | `{ header: x-request-id, trust_incoming: true }` | [`SetRequestIdLayer`](crate::request_id::SetRequestIdLayer) |
//! | `body-limit` | `{ max: 1MiB }` | [`BodyLimitLayer`](crate::body_limit::BodyLimitLayer) |

use gateway_core::BoxError;
use gateway_core::registry::{PluginFactory, Registry, RouteLayer};
use gateway_core::units::Size;
use serde::Deserialize;

/// Registers the built-in layers compiled into this build under their config names.
pub fn register(registry: &mut Registry) {
    #[cfg(feature = "request-id")]
    registry.register("request-id", RequestIdFactory);
    #[cfg(feature = "body-limit")]
    registry.register("body-limit", BodyLimitFactory);
    let _ = registry;
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
