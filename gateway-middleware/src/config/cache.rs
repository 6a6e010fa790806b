//! The `cache` section.

use std::time::Duration;

use gateway_core::BoxError;
use gateway_core::registry::{Context, PluginFactory, Registry, RouteLayer};
use gateway_core::units::{Period, Size};
use serde::Deserialize;

use super::{Downgraded, Kept};
use crate::cache::{CacheLayer, Heuristic, MemoryStore, WeakMemoryStore};

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
    /// The cache's name, in metrics: routes giving the same name (and size) share one
    /// store [default: the route's id].
    pub name: Option<String>,
}

pub(super) fn register(registry: &mut Registry) {
    registry.register("cache", CacheFactory::default());
}

/// Builds caches; their stores are kept (weakly) by name, so that a reload keeps what
/// they hold, and routes naming the same cache share it.
#[derive(Default)]
struct CacheFactory {
    stores: Kept<u64, WeakMemoryStore>,
}

const MIB: u64 = 1024 * 1024;

impl PluginFactory for CacheFactory {
    type Config = CacheConfig;

    fn layer(&self, config: &CacheConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        let memory = config.max_memory.map_or(64 * MIB, |s| s.0);
        if memory < MIB {
            return Err("`max_memory` must be at least 1MiB".into());
        }
        let max_object = config.max_object.map_or(8 * MIB, |s| s.0);
        if max_object == 0 || max_object > memory {
            return Err("`max_object` must be more than 0 and at most `max_memory`".into());
        }
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| cx.route().as_str().to_owned());
        // New, or resized by a reload: a fresh store.
        let store = self.stores.get_or(&name, memory, || {
            let store = MemoryStore::with_capacity(memory);
            if let Some(metrics) = cx.metrics() {
                store.metrics(metrics, &name);
            }
            let weak = store.downgrade();
            (store, weak)
        });
        let mut layer = CacheLayer::new(store)
            .max_object(usize::try_from(max_object).unwrap_or(usize::MAX))
            .collapse_wait(config.collapse_wait.map_or(Duration::from_secs(5), |p| p.0));
        if let Some(fraction) = config.heuristic {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(
                    format!("heuristic: a share above 0 and at most 1, not {fraction}").into(),
                );
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
            layer = layer.metrics(metrics, &name);
        }
        Ok(RouteLayer::new(layer))
    }
}
