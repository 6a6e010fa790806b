//! The `rate-limit` section.

#[cfg(feature = "redis")]
use std::time::Duration;

use gateway_core::BoxError;
use gateway_core::registry::{Context, PluginFactory, Registry, RouteLayer};
use gateway_core::units::Period;
use http::HeaderName;
use serde::Deserialize;

use crate::rate_limit::{HeaderStyle, Key, Limit, MAX_LIMITS, Quota, RateLimitLayer, WhenFull};

/// Registers `rate-limit`.
pub(super) fn register(registry: &mut Registry) {
    registry.register("rate-limit", RateLimitFactory::default());
}

/// `rate-limit`'s section: one or more limits, stacked.
///
/// ```yaml
/// rate-limit:
///   limits:
///     - { name: second, requests: 10, per: 1s, burst: 20 }
///     - { name: hour, requests: 1000, per: 1h, key: consumer }
///     - { name: inflight, concurrent: 4 }
///   key: client-ip
///   headers: ietf
/// ```
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The limits; a request passes when every one has room.
    pub limits: Vec<LimitConfig>,
    /// What the limits without a key of their own count by [default: `client-ip`].
    pub key: Option<KeyConfig>,
    /// IPv6 client addresses are grouped by this prefix [default: 64].
    pub ipv6_prefix: Option<u8>,
    /// IPv4 client addresses are grouped by this prefix [default: 32].
    pub ipv4_prefix: Option<u8>,
    /// What a request takes from the rate limits [default: 1].
    pub cost: Option<u32>,
    /// Count and add headers, refuse nothing [default: false].
    #[serde(default)]
    pub shadow: bool,
    /// `ietf` (`RateLimit-Policy` and `RateLimit`), `legacy` (`X-RateLimit-*`), `both` or
    /// `none` [default: ietf].
    pub headers: Option<HeaderStyleConfig>,
    /// The most keys each limit holds [default: 100000].
    pub max_keys: Option<usize>,
    /// What new keys get when a limit is full of keys in use: `shed` (429) or `share` (one
    /// bucket for them all) [default: shed].
    pub when_full: Option<WhenFullConfig>,
    /// Keep the rate limits in Redis, shared by every instance (feature `redis`).
    pub redis: Option<RedisConfig>,
}

/// `redis`: where distributed limits are kept.
///
/// ```yaml
/// redis:
///   url: redis://:${REDIS_PASSWORD}@10.0.0.5:6379/0
///   timeout: 50ms
///   on_error: allow
///   batch: { lease: 10, sync: 250ms }
/// ```
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS.
    pub url: String,
    /// The most a call may take [default: 100ms].
    pub timeout: Option<Period>,
    /// The most opening a connection may take [default: 1s].
    pub connect_timeout: Option<Period>,
    /// When Redis cannot be asked: `allow` (fail open) or `deny` (503) [default: allow].
    pub on_error: Option<OnErrorConfig>,
    /// The keys' namespace [default: the route's id]; routes with the same namespace
    /// and limit names share their limits.
    pub namespace: Option<String>,
    /// Take tokens in leases instead of asking Redis for every request.
    pub batch: Option<BatchConfig>,
}

/// `on_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnErrorConfig {
    /// Let requests through.
    Allow,
    /// Refuse them with 503.
    Deny,
}

/// `batch`: leases of `lease` tokens, unspent ones given back after `sync`.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Tokens per lease.
    pub lease: u32,
    /// When unspent tokens go back [default: 250ms].
    pub sync: Option<Period>,
}

/// One limit: a rate (`requests` per `per`, with an optional `burst`) or `concurrent`
/// requests in flight.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// The limit's name, in the headers, metrics and logs [default: `limits[N]`].
    pub name: Option<String>,
    /// Requests per `per`.
    pub requests: Option<u32>,
    /// The period of `requests` (`1s`, `1m`, `1h`).
    pub per: Option<Period>,
    /// The most requests at once after a quiet spell [default: `requests`].
    pub burst: Option<u32>,
    /// Requests in flight at once (instead of a rate).
    pub concurrent: Option<u32>,
    /// What this limit counts by [default: the section's `key`].
    pub key: Option<KeyConfig>,
}

/// A key: `client-ip`, `consumer`, `route`, `{ header: NAME }`, or a list of them (all
/// together).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum KeyConfig {
    /// One part.
    One(KeyPart),
    /// Several parts together.
    All(Vec<KeyPart>),
}

/// One part of a key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeyPart {
    /// The client's address.
    ClientIp,
    /// The consumer (the client's address when anonymous).
    Consumer,
    /// The route: one bucket for all its requests.
    Route,
    /// A header's value (the client's address when absent).
    Header(String),
}

/// `headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyleConfig {
    /// `RateLimit-Policy` and `RateLimit`.
    Ietf,
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset`.
    Legacy,
    /// Both.
    Both,
    /// None.
    None,
}

/// `when_full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFullConfig {
    /// Refuse new keys.
    Shed,
    /// One shared bucket for new keys.
    Share,
}

#[cfg(feature = "redis")]
impl super::Downgraded for crate::redis::WeakRedis {
    type Strong = crate::redis::Redis;

    fn upgrade(&self) -> Option<crate::redis::Redis> {
        Self::upgrade(self)
    }
}

/// Makes `rate-limit` layers; one Redis connection per URL and timeouts, however many
/// routes (and reloads) use it.
#[derive(Default)]
struct RateLimitFactory {
    #[cfg(feature = "redis")]
    redis: super::Kept<(), crate::redis::WeakRedis>,
}

impl PluginFactory for RateLimitFactory {
    type Config = RateLimitConfig;

    fn layer(&self, config: &RateLimitConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        Ok(RouteLayer::new(config.layer(self, cx)?))
    }
}

impl RateLimitFactory {
    #[cfg(feature = "redis")]
    fn distributed(
        &self,
        config: &RedisConfig,
        cx: &Context,
    ) -> Result<crate::rate_limit::Distributed, BoxError> {
        use crate::rate_limit::{Batch, Distributed, OnError};
        let timeout = config.timeout.map_or(Duration::from_millis(100), |p| p.0);
        let connect = config
            .connect_timeout
            .map_or(Duration::from_secs(1), |p| p.0);
        let redis = self.redis.connection(&config.url, timeout, connect)?;
        let mut distributed = Distributed::new(redis).namespace(
            config
                .namespace
                .clone()
                .unwrap_or_else(|| cx.route().as_str().to_owned()),
        );
        if let Some(on_error) = config.on_error {
            distributed = distributed.on_error(match on_error {
                OnErrorConfig::Allow => OnError::Allow,
                OnErrorConfig::Deny => OnError::Deny,
            });
        }
        if let Some(batch) = &config.batch {
            let sync = batch.sync.map_or(Duration::from_millis(250), |p| p.0);
            distributed = distributed.batch(Batch::try_new(batch.lease, sync)?);
        }
        Ok(distributed)
    }
}

impl RateLimitConfig {
    fn layer(&self, factory: &RateLimitFactory, cx: &Context) -> Result<RateLimitLayer, BoxError> {
        if self.limits.is_empty() {
            return Err("`limits` needs at least one limit".into());
        }
        if self.limits.len() > MAX_LIMITS {
            return Err(format!("`limits` holds at most {MAX_LIMITS} limits").into());
        }
        let prefixes = |key: Key| -> Result<Key, BoxError> {
            let mut key = key;
            if let Some(bits) = self.ipv6_prefix {
                if bits > 128 {
                    return Err(format!("`ipv6_prefix` is at most 128, not {bits}").into());
                }
                key = key.ipv6_prefix(bits);
            }
            if let Some(bits) = self.ipv4_prefix {
                if bits > 32 {
                    return Err(format!("`ipv4_prefix` is at most 32, not {bits}").into());
                }
                key = key.ipv4_prefix(bits);
            }
            Ok(key)
        };
        let default_key = prefixes(match &self.key {
            Some(key) => key.key()?,
            None => Key::client_ip(),
        })?;
        let mut names: Vec<String> = Vec::new();
        let mut layer: Option<RateLimitLayer> = None;
        for (i, limit) in self.limits.iter().enumerate() {
            let name = limit.name.clone().unwrap_or_else(|| format!("limits[{i}]"));
            if names.contains(&name) {
                return Err(format!("two limits are named `{name}`").into());
            }
            let mut made = limit
                .limit(&name)
                .map_err(|e| format!("limits[{i}] ({name}): {e}"))?;
            if let Some(key) = &limit.key {
                made = made.key(prefixes(key.key()?)?);
            }
            names.push(name);
            layer = Some(match layer {
                None => RateLimitLayer::new(made).key(default_key.clone()),
                Some(layer) => layer.and(made),
            });
        }
        let Some(mut layer) = layer else {
            return Err("`limits` needs at least one limit".into());
        };
        if let Some(cost) = self.cost {
            layer = layer.cost(cost);
        }
        layer = layer.shadow(self.shadow);
        if let Some(style) = self.headers {
            layer = layer.headers(match style {
                HeaderStyleConfig::Ietf => HeaderStyle::Ietf,
                HeaderStyleConfig::Legacy => HeaderStyle::Legacy,
                HeaderStyleConfig::Both => HeaderStyle::Both,
                HeaderStyleConfig::None => HeaderStyle::None,
            });
        }
        if let Some(max) = self.max_keys {
            if max == 0 {
                return Err("`max_keys` must be at least 1".into());
            }
            layer = layer.max_keys(max);
        }
        if let Some(when_full) = self.when_full {
            layer = layer.when_full(match when_full {
                WhenFullConfig::Shed => WhenFull::Shed,
                WhenFullConfig::Share => WhenFull::Share,
            });
        }
        if let Some(metrics) = cx.metrics() {
            layer = layer.metrics(metrics, cx.route().as_str());
        }
        if let Some(redis) = &self.redis {
            #[cfg(feature = "redis")]
            {
                layer = layer.distributed(factory.distributed(redis, cx)?);
            }
            #[cfg(not(feature = "redis"))]
            {
                let _ = (redis, factory);
                return Err("`redis` needs the gateway built with the `redis` feature".into());
            }
        }
        Ok(layer)
    }
}

impl LimitConfig {
    fn limit(&self, name: &str) -> Result<Limit, BoxError> {
        match (self.requests, self.per, self.concurrent) {
            (Some(requests), Some(per), None) => {
                let mut quota = Quota::new(requests, per.0)?;
                if let Some(burst) = self.burst {
                    quota = quota.with_burst(burst)?;
                }
                Ok(Limit::rate(name, quota))
            }
            (None, None, Some(max)) if self.burst.is_none() => {
                if max == 0 {
                    return Err("`concurrent` must be at least 1".into());
                }
                Ok(Limit::concurrent(name, max))
            }
            (Some(_), None, None) => Err("`requests` needs `per` (1s, 1m, 1h)".into()),
            (None, Some(_), None) => Err("`per` needs `requests`".into()),
            (None, None, None) => Err("a limit needs `requests` and `per`, or `concurrent`".into()),
            _ => Err(
                "a limit is a rate (`requests`, `per`, `burst`) or `concurrent`, not both".into(),
            ),
        }
    }
}

impl KeyConfig {
    fn key(&self) -> Result<Key, BoxError> {
        let part = |part: &KeyPart| -> Result<Key, BoxError> {
            Ok(match part {
                KeyPart::ClientIp => Key::client_ip(),
                KeyPart::Consumer => Key::consumer(),
                KeyPart::Route => Key::route(),
                KeyPart::Header(name) => Key::header(
                    HeaderName::try_from(name.as_str())
                        .map_err(|_| format!("`{name}` is not a header name"))?,
                ),
            })
        };
        match self {
            Self::One(one) => part(one),
            Self::All(parts) => {
                let mut parts = parts.iter();
                let Some(first) = parts.next() else {
                    return Err("a key needs at least one part".into());
                };
                parts.try_fold(part(first)?, |key, next| Ok(key.and(part(next)?)))
            }
        }
    }
}
