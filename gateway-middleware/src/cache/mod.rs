//! A shared HTTP cache (RFC 9111, with RFC 5861's stale extensions and RFC 9211's
//! `Cache-Status`).
//!
//! [`CacheLayer`] answers from its [`Store`] what it may and sends the rest upstream:
//! - a fresh stored response (for this request's `Vary` fields and directives) is a hit,
//!   with its `Age`; a `HEAD` is answered from a stored `GET`, and a conditional request
//!   the stored response satisfies (`If-None-Match`, `If-Modified-Since`) gets a `304`;
//! - a stale one with validators is validated: the upstream is asked with
//!   `If-None-Match`/`If-Modified-Since`, and a `304` refreshes its fields and freshness
//!   (RFC 9111 §4.3.4) and answers from the store; when the upstream fails (an error or
//!   a 5xx), a stale response whose `stale-if-error` (or the request's) allows it
//!   answers instead, never past `must-revalidate`;
//! - a stale one within its `stale-while-revalidate` answers at once, and is refreshed in
//!   the background (validated, or fetched whole), one refresh per key at a time;
//! - anything else goes upstream, and a response that may be stored streams to the
//!   client while a copy is kept (up to [`max_object`](CacheLayer::max_object)); the copy
//!   is stored only when the body ended complete (never one cut short, with trailers, or
//!   of the wrong length);
//! - concurrent misses for the same key and credentials wait for the one request already
//!   on its way ([`collapse_wait`](CacheLayer::collapse_wait), then they go themselves),
//!   and answer from what it stored if it fits them (`Vary` and all); a key whose
//!   response could not be stored is not collapsed for the next 10 s (hit-for-miss), so
//!   an uncacheable URL's requests never queue behind one another;
//! - a successful unsafe request (`POST`, `PUT`, `DELETE`...) forgets its URI and its
//!   response's same-origin `Location` and `Content-Location` (§4.4);
//! - `only-if-cached` with nothing to serve is a `504` (`not_cached`);
//! - every response carries `Cache-Status` (`gateway; hit; ttl=42`, `gateway;
//!   fwd=uri-miss; stored`, `fwd=vary-miss`, `fwd=stale; fwd-status=304`, `fwd=request`,
//!   `fwd=bypass`, `detail=collapsed`, `detail=stale-while-revalidate`,
//!   `detail=stale-if-error`);
//! - a single byte range of a stored full response is a `206` (a slice of the stored
//!   body, no copy), an unsatisfiable one a `416`; `If-Range` is honoured (strong
//!   validators only), and several ranges get the whole response.
//!
//! Reporting: [`CacheLayer::metrics`] counts requests by what the cache did
//! (`gateway_cache_requests_total{cache, result}`), [`MemoryStore::metrics`] the bytes it
//! holds and its evictions; the access log's `cache` field says the same per request.
//! From the config file: the `cache` section (`docs/config.md`).
//!
//! Not yet: a range request that misses goes upstream as it is (its 206 is not stored);
//! a Redis store shared by several instances and purging on the admin listener are the
//! cache's next steps.
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::cache::{CacheLayer, MemoryStore};
//! use http::{Request, Response};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{BoxError, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counted = Arc::clone(&calls);
//! let upstream = service_fn(move |_: Request<Body>| {
//!     counted.fetch_add(1, Ordering::SeqCst);
//!     async {
//!         let res = Response::builder().header("cache-control", "max-age=60");
//!         Ok::<_, BoxError>(res.body(Body::from("hello")).unwrap())
//!     }
//! });
//! let store = MemoryStore::with_capacity(64 * 1024 * 1024);
//! let mut cache = tower::ServiceBuilder::new()
//!     .layer(CacheLayer::new(store.clone()))
//!     .service(upstream);
//! let get = || Request::get("/greeting").header("host", "api.example").body(Body::empty()).unwrap();
//!
//! let miss = cache.ready().await.unwrap().call(get()).await.unwrap();
//! assert_eq!(miss.headers()["cache-status"], "gateway; fwd=uri-miss; stored");
//! // The copy is stored once the body has streamed to the client.
//! http_body_util::BodyExt::collect(miss.into_body()).await.unwrap();
//! # tokio::task::yield_now().await;
//!
//! let hit = cache.ready().await.unwrap().call(get()).await.unwrap();
//! assert!(hit.headers()["cache-status"].to_str().unwrap().starts_with("gateway; hit"));
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```
//!
//! # The rules
//!
//! The rules the layer decides by are usable on their own (a plugin that needs to know
//! whether a response may be shared, say):
//! - [`CacheControl`]: the `Cache-Control` directives of a request or a response, parsed
//!   without allocating; malformed or conflicting freshness makes it
//!   [invalid](CacheControl::is_invalid), and an invalid response is stale.
//! - [`storable`]: whether a shared cache may store a response, and if not,
//!   [why](NotStorable). Stricter than RFC 9111 in three places, each a known way caches
//!   leak or poison: a response setting a cookie is never stored; only the statuses a
//!   cache may give heuristic freshness, and the redirects, are stored (never a 401, a
//!   429 or a 5xx other than 501, whatever they say); and a response with neither
//!   freshness nor a validator is not stored, as it could never be reused.
//! - [`Freshness`]: a stored response's lifetime (`s-maxage`, `max-age`, `Expires`, or
//!   [heuristic](Heuristic) freshness only when configured), its age per RFC 9111 §4.2.3,
//!   and what a request may get from it ([`Reuse`]): fresh, stale within `max-stale` or
//!   `stale-while-revalidate`, or validated first; and whether `stale-if-error` lets it
//!   answer when the upstream fails.
//! - [`Key`]: scheme, host (lowercased, default port left out), path and query; nothing
//!   else a client sends (a forwarded host, say) is in it. [`Selection`]: the request
//!   fields a response's `Vary` names, normalised as RFC 9111 §4.1 allows (field lines
//!   combined, whitespace dropped, case folded where the field's tokens ignore case,
//!   `Accept-Encoding` sorted), so that `gzip, br` and `br,gzip` share an entry while an
//!   identity client never gets gzip bytes; `Vary: *` matches nothing.
//! - [`Store`]: where responses are kept, by key, with up to [`MAX_VARIANTS`] `Vary`
//!   variants each; [`MemoryStore`] keeps them in a byte budget, evicted by S3-FIFO
//!   (`quick_cache`, already in the tree for the auth caches: scan-resistant, no
//!   background threads, weights per object; `moka` would add TTLs we do not need, as
//!   freshness is decided per request, and a heavier tree). [`RedisStore`] (feature
//!   `redis`) keeps them in Redis, shared by every instance, each for as long as it can
//!   still be served; [`Stored::to_bytes`] is the layout a store of your own may use.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use gateway_middleware::cache::{CacheControl, Freshness, Reuse, storable};
//! use http::{HeaderMap, Method, StatusCode};
//!
//! let request = HeaderMap::new();
//! let mut response = HeaderMap::new();
//! response.insert("cache-control", "max-age=60, stale-while-revalidate=30".parse().unwrap());
//! let (req_cc, res_cc) = (CacheControl::parse_request(&request), CacheControl::parse(&response));
//! assert!(storable(&Method::GET, &request, &req_cc, StatusCode::OK, &response, &res_cc, None).is_ok());
//!
//! let received = SystemTime::now();
//! let freshness = Freshness::new(StatusCode::OK, &response, &res_cc, received, received, None);
//! let later = |s| received + Duration::from_secs(s);
//! assert_eq!(freshness.reuse(&req_cc, later(10)), Reuse::Fresh);
//! assert_eq!(freshness.reuse(&req_cc, later(70)), Reuse::StaleWhileRevalidate);
//! assert_eq!(freshness.reuse(&req_cc, later(100)), Reuse::Validate);
//! ```
//!
//! # Why not `http-cache-semantics`
//!
//! The issue suggested the `http-cache-semantics` crate for the directive logic. It is
//! right about most of RFC 9111, but not for a gateway's hot path or its rules: it
//! parses `Cache-Control` into a `HashMap` of boxed strings on every check (allocations
//! on each hit), keeps copies of both header maps per entry, implements RFC 7234 without
//! `stale-while-revalidate` or `stale-if-error`, turns heuristic freshness on by default,
//! compares `Vary`-selected values byte for byte (no normalisation), and has no notion of
//! the stricter storing rules above. The rules here are small, allocation-free and
//! tested clause by clause.

mod codec;
mod collapse;
mod directives;
mod freshness;
mod key;
mod layer;
mod range;
#[cfg(feature = "redis")]
mod redis;
mod store;

pub use directives::CacheControl;
pub use freshness::{Freshness, Heuristic, NotStorable, Reuse, storable};
pub use key::{Key, MAX_VARY, Selection, VaryError};
pub use layer::{Cache, CacheLayer, ResponseFuture};
#[cfg(feature = "redis")]
pub use redis::RedisStore;
#[cfg(feature = "config")]
pub(crate) use store::WeakMemoryStore;
pub use store::{MAX_VARIANTS, MemoryStore, Store, StoreError, Stored, Variants};
