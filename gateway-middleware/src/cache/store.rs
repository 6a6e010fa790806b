//! Where responses are kept: the [`Store`] trait, and [`MemoryStore`], a byte-bounded
//! in-process store.

use std::fmt;
use std::future::{Future, ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use gateway_core::metrics::Metrics;
use http::{HeaderMap, HeaderValue, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{CacheControl, Freshness, Heuristic, Key, Selection, VaryError};

/// The most responses kept under one key (its `Vary` variants); storing another drops
/// the oldest.
pub const MAX_VARIANTS: usize = 8;

/// A response as stored: what a hit answers with, and what it was selected and judged by.
///
/// Made by [`Stored::new`] (or read back by [`Stored::from_bytes`]).
#[derive(Clone, Debug)]
pub struct Stored {
    /// Its status.
    pub status: StatusCode,
    /// Its header fields, without the hop-by-hop ones.
    pub headers: HeaderMap,
    /// Its whole body.
    pub body: Bytes,
    /// The request fields its `Vary` selects on, with their values.
    pub selection: Selection,
    /// Its freshness and age.
    pub freshness: Freshness,
    /// What hits on it reuse.
    hot: Hot,
}

/// What the hits on a stored response reuse instead of making again: its fields with room
/// for `Age` and `Cache-Status`, and those two values as of the last hit's second.
#[derive(Default)]
pub(super) struct Hot {
    /// The fields, `Age` and `Cache-Status` among them (their values replaced on each
    /// hit): a clone takes both without growing.
    pub(super) template: OnceLock<HeaderMap>,
    /// The `Age` and plain-hit `Cache-Status` values of the second the last hit was in.
    pub(super) stamp: std::sync::Mutex<Option<Stamp>>,
}

/// `Age` and a plain hit's `Cache-Status` at one age (in seconds), for one cache name.
pub(super) struct Stamp {
    pub(super) age: u64,
    pub(super) name: HeaderValue,
    pub(super) age_value: HeaderValue,
    pub(super) status: HeaderValue,
}

impl Clone for Hot {
    /// A copy starts without: its fields may change.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for Hot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hot").finish_non_exhaustive()
    }
}

impl Stored {
    /// The response of `status`, `headers` and `body` to a request with fields `req`,
    /// sent at `requested` and answered at `received`, as a store keeps it (its fields as
    /// given: leave out the hop-by-hop ones).
    ///
    /// # Errors
    ///
    /// When its `Vary` cannot be honoured.
    pub fn new(
        req: &HeaderMap,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        (requested, received): (SystemTime, SystemTime),
        heuristic: Option<Heuristic>,
    ) -> Result<Self, VaryError> {
        let cc = CacheControl::parse(&headers);
        let selection = Selection::of(req, &headers)?;
        let freshness = Freshness::new(status, &headers, &cc, requested, received, heuristic);
        Ok(Self::assemble(status, headers, body, selection, freshness))
    }

    /// A stored response of these parts.
    pub(super) fn assemble(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        selection: Selection,
        freshness: Freshness,
    ) -> Self {
        Self {
            status,
            headers,
            body,
            selection,
            freshness,
            hot: Hot::default(),
        }
    }

    /// What hits on it reuse.
    pub(super) const fn hot(&self) -> &Hot {
        &self.hot
    }

    /// What it weighs in a store: its body, its fields, and a fixed overhead.
    pub fn weight(&self) -> u64 {
        // NOTE: 64 bytes a field for its two map entries (its own, and its hits'
        // template's, which shares the names and values).
        let fields: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 64)
            .sum();
        u64::try_from(self.body.len() + fields + 256).unwrap_or(u64::MAX)
    }
}

/// The responses stored under one key, newest first.
pub type Variants = Arc<[Arc<Stored>]>;

/// A store failed (a remote one: unreachable, timed out). The cache then goes to the
/// upstream as if nothing were stored.
#[derive(Debug)]
pub struct StoreError(pub Box<dyn std::error::Error + Send + Sync>);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cache store: {}", self.0)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Where a cache keeps responses. Implement it for another backend; [`MemoryStore`] is
/// the default.
///
/// A store bounds what it holds (bytes, objects) and may forget anything at any time: a
/// forgotten response is a miss.
pub trait Store: Send + Sync + 'static {
    /// The responses under `key` at once, when the store can tell without waiting (an
    /// in-process store); `None` (the default) to be asked with [`get`](Self::get). A hit
    /// found here is answered without allocating the cache's future.
    fn peek(&self, key: &Key) -> Option<Variants> {
        let _ = key;
        None
    }

    /// The responses stored under `key`, newest first (empty when none).
    fn get(&self, key: &Key) -> impl Future<Output = Result<Variants, StoreError>> + Send;

    /// Stores `stored` under `key`, in place of a response with the same selection, and
    /// keeping at most [`MAX_VARIANTS`] under the key.
    fn put(
        &self,
        key: &Key,
        stored: Arc<Stored>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets what is stored under `key`; whether there was anything.
    fn remove(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Forgets what is stored under every key starting with `prefix` (a URL prefix, such
    /// as `https://api.example.com/v1/`); how many keys.
    fn purge_prefix(&self, prefix: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Responses kept in memory, up to a byte budget, evicted by S3-FIFO (`quick_cache`):
/// scan-resistant, so one crawl over many URLs does not flush the hot entries.
///
/// Clones share the store.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Memory>,
}

struct Memory {
    cache:
        quick_cache::sync::Cache<Key, Variants, Weight, quick_cache::DefaultHashBuilder, Evictions>,
    budget: u64,
    report: Arc<Report>,
}

/// What the store reports: evictions always, and its metrics once asked to.
#[derive(Default)]
struct Report {
    evictions: AtomicU64,
    metrics: OnceLock<(Gauge, Counter)>,
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<Key, Variants> for Weight {
    fn weight(&self, key: &Key, variants: &Variants) -> u64 {
        let stored: u64 = variants.iter().map(|s| s.weight()).sum();
        stored + u64::try_from(key.as_bytes().len()).unwrap_or(u64::MAX)
    }
}

/// Counts what the store evicts (for `gateway_cache_evictions_total`).
#[derive(Clone)]
struct Evictions(Arc<Report>);

impl quick_cache::Lifecycle<Key, Variants> for Evictions {
    type RequestState = ();

    fn on_evict(&self, (): &mut (), _: Key, _: Variants) {
        self.0.evictions.fetch_add(1, Ordering::Relaxed);
        if let Some((_, evicted)) = self.0.metrics.get() {
            evicted.inc();
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    cache: Arc<str>,
}

impl MemoryStore {
    /// A store holding at most `bytes` of responses (bodies, fields and overhead).
    pub fn with_capacity(bytes: u64) -> Self {
        let report = Arc::new(Report::default());
        // About one object per 16 KiB of budget to start with; the table grows as needed.
        let estimated = usize::try_from(bytes / 16_384)
            .unwrap_or(usize::MAX)
            .clamp(64, 1 << 20);
        let cache = quick_cache::sync::Cache::with(
            estimated,
            bytes.max(1),
            Weight,
            quick_cache::DefaultHashBuilder::default(),
            Evictions(Arc::clone(&report)),
        );
        Self {
            inner: Arc::new(Memory {
                cache,
                budget: bytes,
                report,
            }),
        }
    }

    /// Reports the bytes held (`gateway_cache_bytes{cache}`) and the evictions
    /// (`gateway_cache_evictions_total{cache}`) in `metrics`, `cache` being `label`. Once:
    /// later calls change nothing.
    pub fn metrics(&self, metrics: &Metrics, label: &str) {
        let labels = StoreLabels {
            cache: label.into(),
        };
        let bytes: Family<StoreLabels, Gauge> =
            metrics.family("cache_bytes", "Bytes of responses a cache holds");
        let evicted: Family<StoreLabels, Counter> = metrics.family(
            "cache_evictions",
            "Keys a cache evicted to stay within its byte budget",
        );
        let pair = (
            bytes.get_or_create(&labels).clone(),
            evicted.get_or_create(&labels).clone(),
        );
        if self.inner.report.metrics.set(pair).is_ok() {
            self.inner.measured();
        }
    }

    /// The store, held weakly (what the config keeps to carry it across reloads).
    #[cfg(feature = "config")]
    pub(crate) fn downgrade(&self) -> WeakMemoryStore {
        WeakMemoryStore(Arc::downgrade(&self.inner))
    }

    /// The store as a [`Purge`](gateway_core::purge::Purge), for the admin listener's
    /// purge: it is the store itself, so [`Purgers`](gateway_core::purge::Purgers), which
    /// holds it weakly, lists the store for as long as it exists.
    pub fn purger(&self) -> Arc<dyn gateway_core::purge::Purge> {
        Arc::clone(&self.inner) as _
    }

    /// The bytes held now.
    pub fn bytes_held(&self) -> u64 {
        self.inner.cache.weight()
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// The keys held now.
    pub fn len(&self) -> usize {
        self.inner.cache.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The keys evicted to make room so far.
    pub fn evictions(&self) -> u64 {
        self.inner.report.evictions.load(Ordering::Relaxed)
    }

    /// The responses under `key`, at once.
    pub fn get_now(&self, key: &Key) -> Variants {
        self.inner.cache.get(key).unwrap_or_else(|| Arc::new([]))
    }

    fn put_now(&self, key: &Key, stored: Arc<Stored>) {
        // An object heavier than the whole budget is not stored (nor are its variants
        // pushed out for it).
        if stored.weight() > self.inner.budget {
            return;
        }
        let old = self.get_now(key);
        let variants: Variants = std::iter::once(Arc::clone(&stored))
            .chain(
                old.iter()
                    .filter(|v| v.selection != stored.selection)
                    .cloned(),
            )
            .take(MAX_VARIANTS)
            .collect();
        self.inner.cache.insert(key.clone(), variants);
        self.inner.measured();
    }
}

/// A [`MemoryStore`] held weakly.
#[cfg(feature = "config")]
pub(crate) struct WeakMemoryStore(std::sync::Weak<Memory>);

#[cfg(feature = "config")]
impl WeakMemoryStore {
    pub(crate) fn upgrade(&self) -> Option<MemoryStore> {
        Some(MemoryStore {
            inner: self.0.upgrade()?,
        })
    }
}

impl Store for MemoryStore {
    fn peek(&self, key: &Key) -> Option<Variants> {
        Some(self.get_now(key))
    }

    fn get(&self, key: &Key) -> impl Future<Output = Result<Variants, StoreError>> + Send {
        ready(Ok(self.get_now(key)))
    }

    fn put(
        &self,
        key: &Key,
        stored: Arc<Stored>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.put_now(key, stored);
        ready(Ok(()))
    }

    fn remove(&self, key: &Key) -> impl Future<Output = Result<bool, StoreError>> + Send {
        ready(Ok(self.inner.remove(key)))
    }

    fn purge_prefix(&self, prefix: &str) -> impl Future<Output = Result<u64, StoreError>> + Send {
        ready(Ok(self.inner.purge_prefix(prefix)))
    }
}

impl Memory {
    /// Updates the bytes-held gauge.
    fn measured(&self) {
        if let Some((bytes, _)) = self.report.metrics.get() {
            bytes.set(i64::try_from(self.cache.weight()).unwrap_or(i64::MAX));
        }
    }

    fn remove(&self, key: &Key) -> bool {
        let removed = self.cache.remove(key).is_some();
        self.measured();
        removed
    }

    fn purge_prefix(&self, prefix: &str) -> u64 {
        let purged = AtomicU64::new(0);
        self.cache.retain(|key, _| {
            let keep = !key.as_bytes().starts_with(prefix.as_bytes());
            if !keep {
                purged.fetch_add(1, Ordering::Relaxed);
            }
            keep
        });
        self.measured();
        purged.into_inner()
    }
}

impl gateway_core::purge::Purge for Memory {
    fn purge<'a>(
        &'a self,
        target: &'a gateway_core::purge::PurgeTarget,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<u64, gateway_core::BoxError>> + Send + 'a>>
    {
        use gateway_core::purge::PurgeTarget;
        let purged = match target {
            PurgeTarget::Url(url) => u64::from(self.remove(&Key::from_url(url))),
            PurgeTarget::Prefix(prefix) => self.purge_prefix(prefix),
        };
        Box::pin(ready(Ok(purged)))
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.len())
            .field("bytes", &self.bytes_held())
            .field("budget", &self.inner.budget)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: usize, vary_value: Option<&str>) -> Arc<Stored> {
        let mut req = HeaderMap::new();
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", "max-age=60".parse().unwrap());
        if let Some(v) = vary_value {
            headers.insert("vary", "accept-language".parse().unwrap());
            req.insert("accept-language", v.parse().unwrap());
        }
        let now = SystemTime::now();
        let body = Bytes::from(vec![b'x'; body]);
        Arc::new(Stored::new(&req, StatusCode::OK, headers, body, (now, now), None).unwrap())
    }

    fn key(path: &str) -> Key {
        Key::from_url(&format!("http://a.example{path}"))
    }

    #[test]
    fn variants_replace_their_own_selection_and_are_capped() {
        let store = MemoryStore::with_capacity(1 << 20);
        let k = key("/x");
        store.put_now(&k, stored(10, Some("en")));
        store.put_now(&k, stored(20, Some("fr")));
        store.put_now(&k, stored(30, Some("en")));
        let variants = store.get_now(&k);
        let sizes: Vec<usize> = variants.iter().map(|v| v.body.len()).collect();
        assert_eq!(sizes, [30, 20], "newest first; the old `en` replaced");
        for i in 0..20 {
            store.put_now(&k, stored(1, Some(&format!("l{i}"))));
        }
        assert_eq!(store.get_now(&k).len(), MAX_VARIANTS);
    }

    #[test]
    fn the_byte_budget_holds_and_evictions_are_counted() {
        let store = MemoryStore::with_capacity(256 * 1024);
        for i in 0..200 {
            store.put_now(&key(&format!("/{i}")), stored(4096, None));
        }
        assert!(store.bytes_held() <= 256 * 1024, "{}", store.bytes_held());
        assert!(store.evictions() > 100, "{}", store.evictions());
        // Heavier than the whole budget: not stored.
        store.put_now(&key("/huge"), stored(300 * 1024, None));
        assert!(store.get_now(&key("/huge")).is_empty());
    }

    #[tokio::test]
    async fn purge_by_key_and_by_prefix() {
        let store = MemoryStore::with_capacity(1 << 20);
        for path in ["/v1/a", "/v1/b", "/v2/a"] {
            store.put_now(&key(path), stored(1, None));
        }
        assert!(store.remove(&key("/v2/a")).await.unwrap());
        assert!(!store.remove(&key("/v2/a")).await.unwrap());
        let purged = store.purge_prefix("http://a.example/v1/").await.unwrap();
        assert_eq!(purged, 2);
        assert!(store.is_empty());
    }
}
