//! The built-in layers by name, for the declarative config (feature `config`): [`register`]
//! puts every layer compiled in (by its feature) into a [`Registry`], each with its typed
//! config section.
//!
//! | name | section | layer |
//! |---|---|---|
//! | `request-id` | `{ header: x-request-id, trust_incoming: true }` | [`SetRequestIdLayer`](crate::request_id::SetRequestIdLayer) |
//! | `body-limit` | `{ max: 1MiB }` | [`BodyLimitLayer`](crate::body_limit::BodyLimitLayer) |
//! | `ip-filter` | `{ allow: [10.0.0.0/8], deny: [10.0.0.0/24] }` | [`IpFilterLayer`](crate::ip_filter::IpFilterLayer) |
//! | `cors` | `{ origins: [https://app.example.com], credentials: true }` | [`CorsLayer`](crate::cors::CorsLayer) |
//! | `compression` | `{ algorithms: [zstd, br, gzip], level: 4, min_size: 1KiB }` | [`CompressionLayer`](crate::compression::CompressionLayer) |
//! | `headers` | `{ request: { set: {x-env: prod} }, response: { remove: [server] } }` | [`EditHeadersLayer`](crate::headers::EditHeadersLayer) |
//! | `timeout` | `{ total: 30s }` | [`TimeoutLayer`](crate::timeout::TimeoutLayer): 504 when the route has not answered in time, and the deadline for the layers below |
//! | `jwt` | `{ jwks_url: https://idp/jwks.json, issuer: https://idp, audience: api }` | [`AuthLayer`](crate::auth::AuthLayer) with a [`Jwt`](crate::auth::Jwt) |
//! | `key-auth` | `{ consumers: [{ name: alice, keys: ["${ALICE_KEY}"], groups: [admins] }] }` | [`AuthLayer`](crate::auth::AuthLayer) with a [`KeyAuth`](crate::auth::KeyAuth) |
//! | `basic-auth` | `{ htpasswd_file: /etc/gateway/htpasswd, realm: ops }` | [`AuthLayer`](crate::auth::AuthLayer) with a [`BasicAuth`](crate::auth::BasicAuth) |
//! | `auth` | `{ any_of: [{ jwt: {...} }, { key-auth: {...} }], anonymous: guest }` | [`AuthLayer`](crate::auth::AuthLayer) with several methods |
//! | `acl` | `{ allow: [admins], deny: [banned] }` | [`AclLayer`](crate::auth::AclLayer) |
//! | `forward-auth` | `{ url: http://authz:8080/check, cache_for: 30s }` | [`ForwardAuthLayer`](crate::auth::ForwardAuthLayer) |
//! | `rate-limit` | `{ limits: [{ requests: 10, per: 1s }, { requests: 1000, per: 1h }], key: consumer }` | [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) |
//! | `retry` | `{ tries: 3, budget: { ratio: 0.2 }, per_try_timeout: 2s }` | [`RetryLayer`](crate::retry::RetryLayer) |
//! | `concurrency-limit` | `{ max: 200 }` | [`ConcurrencyLimitLayer`](crate::concurrency_limit::ConcurrencyLimitLayer): 503 over the cap, no queue |
//! | `circuit-breaker` | `{ failure_rate: 0.5, min_calls: 20, fallback: { upstream: spare } }` | [`CircuitBreakerLayer`](crate::circuit_breaker::CircuitBreakerLayer) |
//! | `cache` | `{ max_memory: 256MiB, max_object: 8MiB }` | [`CacheLayer`](crate::cache::CacheLayer) over a [`MemoryStore`](crate::cache::MemoryStore) |
//!
//! Every section is documented key by key in `docs/config.md`.

#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "cache")]
pub mod cache;
#[cfg(feature = "circuit-breaker")]
pub mod circuit_breaker;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
#[cfg(feature = "retry")]
pub mod retry;

use std::collections::BTreeMap;
#[cfg(any(
    feature = "auth",
    feature = "redis",
    feature = "circuit-breaker",
    feature = "cache"
))]
use std::collections::HashMap;
#[cfg(any(
    feature = "auth",
    feature = "redis",
    feature = "circuit-breaker",
    feature = "cache"
))]
use std::sync::{Mutex, PoisonError};

use gateway_core::BoxError;
use gateway_core::registry::{Context, PluginFactory, Registry, RouteLayer};
use gateway_core::units::{Period, Size};
use serde::Deserialize;

/// What a factory keeps by name, weakly, with the settings it was made with: a route (or
/// a reload) naming the same thing with the same settings gets the same one back, state
/// and all; one made with other settings replaces it for the routes built from then on;
/// one no route holds any more is forgotten.
#[cfg(any(
    feature = "auth",
    feature = "redis",
    feature = "circuit-breaker",
    feature = "cache"
))]
pub(crate) struct Kept<S, W>(Mutex<HashMap<String, (S, W)>>);

/// A value held weakly, as [`Kept`] holds it.
#[cfg(any(
    feature = "auth",
    feature = "redis",
    feature = "circuit-breaker",
    feature = "cache"
))]
pub(crate) trait Downgraded {
    type Strong;

    fn upgrade(&self) -> Option<Self::Strong>;
}

#[cfg(any(
    feature = "auth",
    feature = "redis",
    feature = "circuit-breaker",
    feature = "cache"
))]
impl<S, W> Default for Kept<S, W> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

#[cfg(any(
    feature = "auth",
    feature = "redis",
    feature = "circuit-breaker",
    feature = "cache"
))]
impl<S: PartialEq, W: Downgraded> Kept<S, W> {
    /// The one kept as `name` with `settings`, or a new one from `make` (its strong and
    /// weak halves), kept from now on.
    pub(crate) fn get_or_try<E>(
        &self,
        name: &str,
        settings: S,
        make: impl FnOnce() -> Result<(W::Strong, W), E>,
    ) -> Result<W::Strong, E> {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.retain(|_, (_, weak)| weak.upgrade().is_some());
        if let Some(strong) = kept
            .get(name)
            .and_then(|(old, weak)| (*old == settings).then(|| weak.upgrade()).flatten())
        {
            return Ok(strong);
        }
        let (strong, weak) = make()?;
        kept.insert(name.to_owned(), (settings, weak));
        Ok(strong)
    }

    /// As [`get_or_try`](Self::get_or_try), with a `make` that cannot fail.
    #[cfg(any(feature = "circuit-breaker", feature = "cache"))]
    pub(crate) fn get_or(
        &self,
        name: &str,
        settings: S,
        make: impl FnOnce() -> (W::Strong, W),
    ) -> W::Strong {
        match self.get_or_try(name, settings, || Ok::<_, std::convert::Infallible>(make())) {
            Ok(strong) => strong,
            Err(never) => match never {},
        }
    }
}

/// Registers the built-in layers compiled into this build under their config names.
pub fn register(registry: &mut Registry) {
    #[cfg(feature = "request-id")]
    registry.register("request-id", RequestIdFactory);
    #[cfg(feature = "body-limit")]
    registry.register("body-limit", BodyLimitFactory);
    #[cfg(feature = "ip-filter")]
    registry.register("ip-filter", IpFilterFactory);
    #[cfg(feature = "cors")]
    registry.register("cors", CorsFactory);
    #[cfg(feature = "compression")]
    registry.register("compression", CompressionFactory);
    #[cfg(feature = "headers")]
    registry.register("headers", HeadersFactory);
    registry.register("timeout", TimeoutFactory);
    #[cfg(feature = "concurrency-limit")]
    registry.register("concurrency-limit", ConcurrencyLimitFactory);
    #[cfg(feature = "auth")]
    auth::register(registry);
    #[cfg(feature = "rate-limit")]
    rate_limit::register(registry);
    #[cfg(feature = "retry")]
    retry::register(registry);
    #[cfg(feature = "circuit-breaker")]
    circuit_breaker::register(registry);
    #[cfg(feature = "cache")]
    cache::register(registry);
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

    fn layer(&self, config: &RequestIdConfig, _: &Context) -> Result<RouteLayer, BoxError> {
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

    fn layer(&self, config: &BodyLimitConfig, _: &Context) -> Result<RouteLayer, BoxError> {
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

    fn layer(&self, config: &IpFilterConfig, _: &Context) -> Result<RouteLayer, BoxError> {
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
    /// whatever the inner layers do (retries included: they are not started when they
    /// could not end in time).
    pub total: Period,
}

struct TimeoutFactory;

impl PluginFactory for TimeoutFactory {
    type Config = TimeoutConfig;

    fn layer(&self, config: &TimeoutConfig, _: &Context) -> Result<RouteLayer, BoxError> {
        if config.total.0.is_zero() {
            return Err("`total` must be more than 0".into());
        }
        // Its 504 travels up as an error, for breakers and the route's rescue to see.
        Ok(RouteLayer::passing_errors(
            crate::timeout::TimeoutLayer::new(config.total.0),
        ))
    }
}

/// `concurrency-limit`'s section.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimitConfig {
    /// The most requests in flight on the route (until their response bodies end).
    pub max: usize,
}

#[cfg(feature = "concurrency-limit")]
struct ConcurrencyLimitFactory;

#[cfg(feature = "concurrency-limit")]
impl PluginFactory for ConcurrencyLimitFactory {
    type Config = ConcurrencyLimitConfig;

    fn layer(&self, config: &ConcurrencyLimitConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        if config.max == 0 {
            return Err("`max` must be more than 0".into());
        }
        let mut layer = crate::concurrency_limit::ConcurrencyLimitLayer::new(config.max);
        if let Some(metrics) = cx.metrics() {
            layer = layer.metrics(metrics, cx.route().as_str());
        }
        // Its 503s travel up as errors, for the route's rescue to answer.
        Ok(RouteLayer::passing_errors(layer))
    }
}

/// `cors`'s section.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// The allowed origins: `https://app.example.com`, `https://*.example.com`, or `"*"`
    /// alone for any.
    pub origins: Vec<String>,
    /// The methods a preflight allows [default: GET, HEAD, POST, PUT, PATCH, DELETE].
    pub methods: Option<Vec<String>>,
    /// The request headers a preflight allows [default: those it asks for].
    pub headers: Option<Vec<String>>,
    /// The response headers a page may read, beyond the safelisted ones.
    #[serde(default)]
    pub expose: Vec<String>,
    /// Whether pages may send cookies and `Authorization` [default: false].
    #[serde(default)]
    pub credentials: bool,
    /// How long a browser may cache a preflight's answer.
    pub max_age: Option<Period>,
    /// Whether to answer Private Network Access preflights [default: false].
    #[serde(default)]
    pub private_network: bool,
}

#[cfg(any(feature = "cors", feature = "headers"))]
fn header_name(name: &str) -> Result<http::HeaderName, BoxError> {
    http::HeaderName::try_from(name.trim())
        .map_err(|_| format!("`{name}` is not a header name").into())
}

#[cfg(feature = "cors")]
struct CorsFactory;

#[cfg(feature = "cors")]
impl PluginFactory for CorsFactory {
    type Config = CorsConfig;

    fn layer(&self, config: &CorsConfig, _: &Context) -> Result<RouteLayer, BoxError> {
        use crate::cors::{AllowedOrigin, CorsLayer};
        let mut layer = CorsLayer::new();
        let any = config.origins.iter().any(|o| o.trim() == "*");
        if any {
            if config.origins.len() > 1 {
                return Err("`*` allows every origin: it goes alone in `origins`".into());
            }
            if config.credentials {
                return Err(
                    "`credentials: true` cannot go with any origin (`*`): every site \
                            could read what a signed-in user can; list the origins"
                        .into(),
                );
            }
            layer = layer.allow_any_origin();
        } else if config.origins.is_empty() {
            return Err("`origins` is empty: list the origins allowed, or `\"*\"`".into());
        }
        for origin in config.origins.iter().filter(|_| !any) {
            layer = layer.allow_origin(origin.parse::<AllowedOrigin>()?);
        }
        if let Some(methods) = &config.methods {
            let methods = methods
                .iter()
                .map(|m| {
                    http::Method::from_bytes(m.trim().as_bytes())
                        .map_err(|_| format!("`{m}` is not a method"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            layer = layer.allow_methods(methods);
        }
        if let Some(headers) = &config.headers {
            let headers = headers.iter().map(|h| header_name(h));
            layer = layer.allow_headers(headers.collect::<Result<Vec<_>, _>>()?);
        }
        let expose = config.expose.iter().map(|h| header_name(h));
        layer = layer.expose_headers(expose.collect::<Result<Vec<_>, _>>()?);
        if let Some(max_age) = config.max_age {
            layer = layer.max_age(max_age.0);
        }
        Ok(RouteLayer::new(
            layer
                .allow_credentials(config.credentials)
                .allow_private_network(config.private_network),
        ))
    }
}

/// `compression`'s section.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// The encodings offered, among `gzip`, `br`, `zstd` [default: all three].
    pub algorithms: Option<Vec<Algorithm>>,
    /// `fastest`, `best`, or a number (gzip 1-9, br 0-11, zstd 1-22) [default: 4].
    pub level: Option<Level>,
    /// The smallest body compressed [default: 1KiB].
    pub min_size: Option<Size>,
}

/// A content coding of `compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// `gzip`.
    Gzip,
    /// `br`.
    Br,
    /// `zstd`.
    Zstd,
}

/// A compression level: `fastest`, `best`, or a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "`fastest`, `best` or a number")]
pub enum Level {
    /// A name.
    Named(NamedLevel),
    /// A number, as each algorithm reads it.
    Number(i32),
}

/// A named [`Level`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamedLevel {
    /// Each algorithm's fastest.
    Fastest,
    /// Each algorithm's smallest output.
    Best,
}

#[cfg(feature = "compression")]
struct CompressionFactory;

#[cfg(feature = "compression")]
impl PluginFactory for CompressionFactory {
    type Config = CompressionConfig;

    fn layer(&self, config: &CompressionConfig, _: &Context) -> Result<RouteLayer, BoxError> {
        use crate::compression::{CompressionLayer, CompressionLevel};
        let mut layer = CompressionLayer::new();
        if let Some(algorithms) = &config.algorithms {
            if algorithms.is_empty() {
                return Err("`algorithms` is empty: leave the plugin out instead".into());
            }
            layer = layer
                .gzip(algorithms.contains(&Algorithm::Gzip))
                .br(algorithms.contains(&Algorithm::Br))
                .zstd(algorithms.contains(&Algorithm::Zstd));
        }
        if let Some(level) = config.level {
            layer = layer.level(match level {
                Level::Named(NamedLevel::Fastest) => CompressionLevel::Fastest,
                Level::Named(NamedLevel::Best) => CompressionLevel::Best,
                Level::Number(n) if (0..=22).contains(&n) => CompressionLevel::Precise(n),
                Level::Number(n) => return Err(format!("level {n} is not in 0..=22").into()),
            });
        }
        if let Some(min) = config.min_size {
            layer = layer.min_size(min.0);
        }
        Ok(RouteLayer::new(layer))
    }
}

/// `headers`'s section.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    /// Edits to requests, before the layers inside and the upstream see them.
    #[serde(default)]
    pub request: EditsConfig,
    /// Edits to responses, before the layers outside and the client see them.
    #[serde(default)]
    pub response: EditsConfig,
}

/// The edits of one side, applied in the order `remove`, `set`, `append`.
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditsConfig {
    /// Fields removed (every value).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Fields set, replacing any values.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Values added to those of a field.
    #[serde(default)]
    pub append: BTreeMap<String, String>,
}

#[cfg(feature = "headers")]
struct HeadersFactory;

#[cfg(feature = "headers")]
impl PluginFactory for HeadersFactory {
    type Config = HeadersConfig;

    fn layer(&self, config: &HeadersConfig, _: &Context) -> Result<RouteLayer, BoxError> {
        let request = edits("request", &config.request)?;
        let response = edits("response", &config.response)?;
        if request.is_empty() && response.is_empty() {
            return Err(
                "no edits: give `request` or `response` a `set`, `append` or `remove`".into(),
            );
        }
        Ok(RouteLayer::new(
            crate::headers::EditHeadersLayer::new()
                .request(request)
                .response(response),
        ))
    }
}

/// Whether `name` is a field the codec owns (framing, hop-by-hop) or the route's `host`
/// sets.
#[cfg(feature = "headers")]
fn not_editable(name: &http::HeaderName) -> bool {
    use http::header::{CONTENT_LENGTH, HOST, TRAILER};
    gateway_core::fields::HOP_BY_HOP.contains(name)
        || [CONTENT_LENGTH, HOST, TRAILER].contains(name)
}

#[cfg(feature = "headers")]
fn edits(side: &str, config: &EditsConfig) -> Result<crate::headers::Edits, BoxError> {
    let name = |name: &str| {
        let name = header_name(name)?;
        if not_editable(&name) {
            let why = if name == http::header::HOST {
                "the route's `host` sets it"
            } else {
                "the HTTP/1.1 codec writes it"
            };
            return Err(format!("`{side}` cannot edit `{name}`: {why}").into());
        }
        Ok::<_, BoxError>(name)
    };
    let value = |value: &str| {
        http::HeaderValue::from_str(value)
            .map_err(|_| format!("`{}` is not a header value", value.escape_debug()))
    };
    let mut edits = crate::headers::Edits::new();
    for removed in &config.remove {
        edits = edits.remove(name(removed)?);
    }
    for (field, v) in &config.set {
        edits = edits.set(name(field)?, value(v)?);
    }
    for (field, v) in &config.append {
        edits = edits.append(name(field)?, value(v)?);
    }
    Ok(edits)
}

#[cfg(feature = "redis")]
impl Kept<(), crate::redis::WeakRedis> {
    /// The connection to `url` with these timeouts: one however many sections (and
    /// reloads) name it.
    pub(crate) fn connection(
        &self,
        url: &str,
        timeout: std::time::Duration,
        connect: std::time::Duration,
    ) -> Result<crate::redis::Redis, BoxError> {
        let id = format!("{url} {timeout:?} {connect:?}");
        self.get_or_try(&id, (), || {
            let redis = crate::redis::Redis::builder(url)
                .timeout(timeout)
                .connect_timeout(connect)
                .build()?;
            let weak = redis.downgrade();
            Ok::<_, BoxError>((redis, weak))
        })
    }
}
