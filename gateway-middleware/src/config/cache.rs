//! The `cache` section.

use std::sync::Arc;
use std::time::Duration;

use gateway_core::BoxError;
use gateway_core::purge::Purge;
use gateway_core::registry::{Context, PluginFactory, Registry, RouteLayer};
use gateway_core::units::{Period, Size};
use serde::Deserialize;

use super::{Downgraded, Kept};
use crate::cache::{CacheLayer, Heuristic, MemoryStore, Store, WeakMemoryStore};

impl Downgraded for WeakMemoryStore {
    type Strong = MemoryStore;

    fn upgrade(&self) -> Option<MemoryStore> {
        Self::upgrade(self)
    }
}

/// `cache`'s section: `- cache: { max_memory: 256MiB }`.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The memory the stored responses may take [default: 64MiB].
    pub max_memory: Option<Size>,
    /// The largest response stored [default: 8MiB]; larger ones stream through.
    pub max_object: Option<Size>,
    /// Heuristic freshness for responses with a `Last-Modified` but no lifetime: this
    /// share of the time since they were modified (0.1 is usual) [default: off].
    pub heuristic: Option<f64>,
    /// The longest heuristic lifetime [default: 1d].
    pub heuristic_max: Option<Period>,
    /// How long a miss waits for the same request already on its way upstream
    /// [default: 5s]; `0s` turns collapsing off.
    pub collapse_wait: Option<Period>,
    /// The cache's name, in metrics and purges: routes giving the same name (and size)
    /// share one store [default: the route's id].
    pub name: Option<String>,
    /// Keep the responses in Redis, shared by every instance, instead of in memory
    /// (feature `redis`).
    pub redis: Option<CacheRedisConfig>,
}

/// `redis`: the Redis server a cache keeps its responses in.
///
/// ```yaml
/// cache:
///   redis: { url: "redis://:${REDIS_PASSWORD}@10.0.0.5:6379/1", timeout: 250ms }
/// ```
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRedisConfig {
    /// `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS.
    pub url: String,
    /// The most a call may take, a stored body included [default: 250ms].
    pub timeout: Option<Period>,
    /// The most opening a connection may take [default: 1s].
    pub connect_timeout: Option<Period>,
    /// The keys' prefix (default: `gateway:cache:NAME:`, NAME being the cache's name);
    /// instances sharing a cache give the same.
    pub namespace: Option<String>,
}

pub(super) fn register(registry: &mut Registry) {
    registry.register("cache", CacheFactory::default());
}

/// Builds caches; their stores are kept (weakly) by name, so that a reload keeps what
/// they hold, and routes naming the same cache share it; one Redis connection per URL and
/// timeouts.
#[derive(Default)]
struct CacheFactory {
    stores: Kept<u64, WeakMemoryStore>,
    #[cfg(feature = "redis")]
    redis: Kept<(), crate::redis::WeakRedis>,
}

const MIB: u64 = 1024 * 1024;

impl PluginFactory for CacheFactory {
    type Config = CacheConfig;

    fn layer(&self, config: &CacheConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| cx.route().as_str().to_owned());
        let max_object = config.max_object.map_or(8 * MIB, |s| s.0);
        if max_object == 0 {
            return Err("`max_object` must be more than 0".into());
        }
        let max_object = usize::try_from(max_object).unwrap_or(usize::MAX);
        if let Some(redis) = &config.redis {
            if config.max_memory.is_some() {
                return Err(
                    "a cache keeps its responses in memory (`max_memory`) or in \
                    Redis (`redis`), not both"
                        .into(),
                );
            }
            return self.redis(redis, config, cx, &name, max_object);
        }
        let memory = config.max_memory.map_or(64 * MIB, |s| s.0);
        if memory < MIB {
            return Err("`max_memory` must be at least 1MiB".into());
        }
        if max_object as u64 > memory {
            return Err("`max_object` must be at most `max_memory`".into());
        }
        // New, or resized by a reload: a fresh store.
        let store = self.stores.get_or(&name, memory, || {
            let store = MemoryStore::with_capacity(memory);
            if let Some(metrics) = cx.metrics() {
                store.metrics(metrics, &name);
            }
            let weak = store.downgrade();
            (store, weak)
        });
        configured(
            store.purger(),
            CacheLayer::new(store),
            config,
            cx,
            &name,
            max_object,
        )
    }
}

impl CacheFactory {
    #[cfg(feature = "redis")]
    fn redis(
        &self,
        redis: &CacheRedisConfig,
        config: &CacheConfig,
        cx: &Context,
        name: &str,
        max_object: usize,
    ) -> Result<RouteLayer, BoxError> {
        use crate::cache::RedisStore;
        let timeout = redis.timeout.map_or(Duration::from_millis(250), |p| p.0);
        let connect = redis
            .connect_timeout
            .map_or(Duration::from_secs(1), |p| p.0);
        let connection = self.redis.connection(&redis.url, timeout, connect)?;
        let namespace = redis
            .namespace
            .clone()
            .unwrap_or_else(|| format!("gateway:cache:{name}:"));
        let mut store = RedisStore::new(connection)
            .namespace(namespace)
            .max_object(max_object);
        if let Some(metrics) = cx.metrics() {
            store = store.metrics(metrics, name);
        }
        configured(
            store.purger(),
            CacheLayer::new(store),
            config,
            cx,
            name,
            max_object,
        )
    }

    #[cfg(not(feature = "redis"))]
    fn redis(
        &self,
        _: &CacheRedisConfig,
        _: &CacheConfig,
        _: &Context,
        _: &str,
        _: usize,
    ) -> Result<RouteLayer, BoxError> {
        Err("`redis` needs the gateway built with the `redis` feature".into())
    }
}

/// The layer over `layer`'s store, with the rest of `config`; the store listed as
/// `purger` for the admin listener's purge.
fn configured<S: Store + Clone>(
    purger: Arc<dyn Purge>,
    layer: CacheLayer<S>,
    config: &CacheConfig,
    cx: &Context,
    name: &str,
    max_object: usize,
) -> Result<RouteLayer, BoxError> {
    let mut layer = layer
        .max_object(max_object)
        .collapse_wait(config.collapse_wait.map_or(Duration::from_secs(5), |p| p.0));
    if let Some(fraction) = config.heuristic {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(format!("heuristic: a share above 0 and at most 1, not {fraction}").into());
        }
        layer = layer.heuristic(Heuristic {
            fraction,
            max: config
                .heuristic_max
                .map_or(Duration::from_secs(86_400), |p| p.0),
        });
    } else if config.heuristic_max.is_some() {
        return Err("`heuristic_max` without `heuristic`".into());
    }
    if let Some(metrics) = cx.metrics() {
        layer = layer.metrics(metrics, name);
    }
    if let Some(purgers) = cx.purgers() {
        purgers.register(name, &purger);
    }
    Ok(RouteLayer::new(layer))
}
