//! [`RedisStore`]: responses kept in Redis, shared by every gateway instance that names
//! the same server and namespace.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use bytes::Bytes;
use gateway_core::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::{Key, MAX_VARIANTS, Store, StoreError, Stored, Variants};
use crate::redis::{Redis, Unavailable};

/// Stores one response under its key's hash, in place of the one with the same
/// selection; keeps at most `ARGV[4]` of them; extends the key's life to `ARGV[3]` ms
/// when that is longer than what it has left.
const PUT: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local max = tonumber(ARGV[4])
local n = redis.call('HLEN', KEYS[1])
if n > max then
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if n <= max then break end
    if field ~= ARGV[1] then
      redis.call('HDEL', KEYS[1], field)
      n = n - 1
    end
  end
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return n
";

static PUT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(PUT));

/// Keys a purge by prefix asks for (and deletes) at a time.
const SCAN_BATCH: usize = 500;

/// Responses kept in Redis (feature `redis`), shared by every gateway instance that uses
/// the same server and namespace: what one instance stored, another serves.
///
/// Each URL is one Redis hash (`<namespace><url>`) holding its variants (at most
/// [`MAX_VARIANTS`]), each in the [`Stored::to_bytes`] layout; it lives as long as its
/// freshest variant is fresh plus its stale window (`stale-while-revalidate`,
/// `stale-if-error`), so Redis drops what can no longer be served. A response with no
/// such time left (`no-cache`, `max-age=0`) is not sent to Redis at all. Responses over
/// [`max_object`](Self::max_object) are not stored.
///
/// Redis bounds the memory: give it a `maxmemory` and an eviction policy
/// (`volatile-ttl` or `allkeys-lru`). Calls have [`Redis`]'s deadline; when Redis is
/// down or slow, requests go to the upstream as misses (and the cause is logged once).
/// Instances' clocks are assumed to agree (ages are computed from when a response was
/// received, as any shared cache does).
///
/// ```
/// use gateway_middleware::cache::{CacheLayer, RedisStore};
/// use gateway_middleware::redis::Redis;
///
/// let redis = Redis::builder("redis://127.0.0.1:6379/0").build().unwrap();
/// let store = RedisStore::new(redis).namespace("shop:cache:").max_object(1 << 20);
/// let layer = CacheLayer::new(store);
/// # drop(layer);
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Redis,
    namespace: String,
    max_object: usize,
    /// `gateway_cache_store_errors_total`, and this cache's label in it.
    errors: Option<(Family<ErrorLabels, Counter>, Arc<str>)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    cache: Arc<str>,
    reason: &'static str,
}

impl RedisStore {
    /// A store in `redis`, under the namespace `gateway:cache:`, for responses of up to
    /// 8 MiB.
    pub fn new(redis: Redis) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                namespace: "gateway:cache:".into(),
                max_object: 8 * 1024 * 1024,
                errors: None,
            }),
        }
    }

    /// Keys start with `namespace`: caches sharing one Redis keep apart by it, and
    /// instances sharing one cache give the same.
    #[must_use]
    pub fn namespace(self, namespace: impl Into<String>) -> Self {
        self.with(|inner| inner.namespace = namespace.into())
    }

    /// Responses whose body is over `bytes` are not stored.
    #[must_use]
    pub fn max_object(self, bytes: usize) -> Self {
        self.with(|inner| inner.max_object = bytes)
    }

    /// Counts the calls to Redis that failed in `metrics`
    /// (`gateway_cache_store_errors_total{cache, reason}`, `cache` being `label`; reasons
    /// as the rate limits' Redis errors have them: `timeout`, `connection`, `server`,
    /// `backoff`).
    #[must_use]
    pub fn metrics(self, metrics: &Metrics, label: &str) -> Self {
        let family = metrics.family(
            "cache_store_errors",
            "Calls to a cache's remote store that failed (the request went on as a miss)",
        );
        self.with(|inner| inner.errors = Some((family, label.into())))
    }

    /// The Redis server.
    pub fn redis(&self) -> &Redis {
        &self.inner.redis
    }

    /// The store as a [`Purge`](gateway_core::purge::Purge), for the admin listener's
    /// purge: it is the store itself, so [`Purgers`](gateway_core::purge::Purgers), which
    /// holds it weakly, lists the store for as long as it exists.
    pub fn purger(&self) -> Arc<dyn gateway_core::purge::Purge> {
        Arc::clone(&self.inner) as _
    }

    fn with(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Inner {
            redis: self.inner.redis.clone(),
            namespace: self.inner.namespace.clone(),
            max_object: self.inner.max_object,
            errors: self.inner.errors.clone(),
        };
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl Store for RedisStore {
    fn get(&self, key: &Key) -> impl Future<Output = Result<Variants, StoreError>> + Send {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.inner.key(key.as_bytes()));
        async move {
            let fields: Vec<(Vec<u8>, Vec<u8>)> = self.inner.query(&cmd).await?;
            let mut variants: Vec<Arc<Stored>> = fields
                .into_iter()
                .filter_map(|(_, value)| Stored::from_bytes(Bytes::from(value)))
                .map(Arc::new)
                .collect();
            // Newest first, as the cache looks for the first that matches.
            variants.sort_by_key(|v| std::cmp::Reverse(v.freshness.received()));
            Ok(variants.into())
        }
    }

    fn put(
        &self,
        key: &Key,
        stored: Arc<Stored>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let now = SystemTime::now();
        let keep = stored
            .freshness
            .ttl(now)
            .saturating_add(stored.freshness.stale_window());
        let ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        let call = (ms > 0 && stored.body.len() <= self.inner.max_object).then(|| {
            let mut call = PUT_SCRIPT.prepare_invoke();
            call.key(self.inner.key(key.as_bytes()))
                .arg(stored.selection.id())
                .arg(stored.to_bytes())
                .arg(ms)
                .arg(MAX_VARIANTS);
            call
        });
        async move {
            if let Some(call) = call {
                let _: i64 = self
                    .inner
                    .redis
                    .invoke(&call)
                    .await
                    .map_err(|e| self.inner.failed(e))?;
            }
            Ok(())
        }
    }

    fn remove(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner.remove(key.as_bytes())
    }

    fn purge_prefix(&self, prefix: &str) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.inner.purge_prefix(prefix.as_bytes())
    }
}

impl Inner {
    /// Counts `e`, and makes it the store's error.
    fn failed(&self, e: Unavailable) -> StoreError {
        if let Some((family, cache)) = &self.errors {
            family
                .get_or_create(&ErrorLabels {
                    cache: Arc::clone(cache),
                    reason: e.reason(),
                })
                .inc();
        }
        StoreError(Box::new(e))
    }

    /// Runs `cmd`; a failure is counted and made the store's error.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.redis.query(cmd).await.map_err(|e| self.failed(e))
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.namespace.len() + key.len());
        k.extend_from_slice(self.namespace.as_bytes());
        k.extend_from_slice(key);
        k
    }

    async fn remove(&self, key: &[u8]) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(key));
        let removed: u64 = self.query(&cmd).await?;
        Ok(removed > 0)
    }

    /// Deletes every key starting with `prefix`, `SCAN`ning for them a batch at a time.
    async fn purge_prefix(&self, prefix: &[u8]) -> Result<u64, StoreError> {
        let mut pattern = glob_escaped(&self.key(prefix));
        pattern.push(b'*');
        let mut cursor: u64 = 0;
        let mut purged = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_BATCH);
            let (next, keys): (u64, Vec<Vec<u8>>) = self.query(&scan).await?;
            if !keys.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(&keys);
                let n: u64 = self.query(&unlink).await?;
                purged += n;
            }
            if next == 0 {
                return Ok(purged);
            }
            cursor = next;
        }
    }
}

/// `bytes` with Redis's glob characters escaped, so that a prefix matches itself only.
fn glob_escaped(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    for &b in bytes {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\' | b'^' | b'-') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

impl gateway_core::purge::Purge for Inner {
    fn purge<'a>(
        &'a self,
        target: &'a gateway_core::purge::PurgeTarget,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<u64, gateway_core::BoxError>> + Send + 'a>>
    {
        use gateway_core::purge::PurgeTarget;
        Box::pin(async move {
            Ok(match target {
                PurgeTarget::Url(url) => u64::from(self.remove(url.as_bytes()).await?),
                PurgeTarget::Prefix(prefix) => self.purge_prefix(prefix.as_bytes()).await?,
            })
        })
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("redis", &self.inner.redis)
            .field("namespace", &self.inner.namespace)
            .field("max_object", &self.inner.max_object)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_matches_only_itself() {
        assert_eq!(
            glob_escaped(b"gw:http://a/x?[a]*"),
            b"gw:http://a/x\\?\\[a\\]\\*".to_vec()
        );
    }
}
