//! The cache layer: answers from the store what it may, sends the rest upstream, and
//! stores what it may while the response streams to the client.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use gateway_core::metrics::Metrics;
use gateway_core::{Body, BoxError, ConnectInfo, Drain, Error, ErrorKind, LogFields};
use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_LOCATION, CONTENT_RANGE, DATE, ETAG, EXPIRES, HeaderName, HeaderValue, IF_MATCH,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, LOCATION,
    RANGE, TRAILER, TRANSFER_ENCODING, VARY,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use pin_project_lite::pin_project;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tower::{Layer, Service};

use super::collapse::{FlightKey, Flights, Leader, PASS_FOR, Role, follow};
use super::range::{Ranged, ranged};
use super::store::Stamp;
use super::{CacheControl, Freshness, Heuristic, Key, Reuse, Selection, Store, Stored, storable};

/// `Cache-Status` (RFC 9211).
static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The largest response stored by default.
const DEFAULT_MAX_OBJECT: usize = 8 * 1024 * 1024;

/// How long a miss waits by default for the same request in flight.
const DEFAULT_COLLAPSE_WAIT: Duration = Duration::from_secs(5);

/// A shared HTTP cache in front of a route's upstream; see the [module docs](super).
///
/// Cloning is cheap; clones (and the services they make) share the store.
#[must_use]
pub struct CacheLayer<S> {
    shared: Arc<Shared<S>>,
}

/// The service of a [`CacheLayer`].
pub struct Cache<St, S> {
    inner: S,
    shared: Arc<Shared<St>>,
}

struct Shared<S> {
    store: S,
    name: HeaderValue,
    max_object: usize,
    heuristic: Option<Heuristic>,
    collapse_wait: Duration,
    flights: Arc<Flights>,
    /// `gateway_cache_requests_total{cache, result}`, by [`Outcome`].
    counters: Option<[Counter; 7]>,
}

impl<S> Clone for CacheLayer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<St, S: Clone> Clone for Cache<St, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: Store> CacheLayer<S> {
    /// A cache keeping responses in `store`, named `gateway` in `Cache-Status`, storing
    /// responses of up to 8 MiB, without heuristic freshness.
    pub fn new(store: S) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                name: HeaderValue::from_static("gateway"),
                max_object: DEFAULT_MAX_OBJECT,
                heuristic: None,
                collapse_wait: DEFAULT_COLLAPSE_WAIT,
                flights: Arc::default(),
                counters: None,
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Shared<S>)) -> Self
    where
        S: Clone,
    {
        let mut shared = Shared {
            store: self.shared.store.clone(),
            name: self.shared.name.clone(),
            max_object: self.shared.max_object,
            heuristic: self.shared.heuristic,
            collapse_wait: self.shared.collapse_wait,
            flights: Arc::default(),
            counters: self.shared.counters.clone(),
        };
        f(&mut shared);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Responses over `bytes` are not stored (they stream to the client all the same).
    pub fn max_object(self, bytes: usize) -> Self
    where
        S: Clone,
    {
        self.with(|s| s.max_object = bytes)
    }

    /// Gives responses with a `Last-Modified` but no explicit lifetime a heuristic one
    /// (RFC 9111 §4.2.2); off by default.
    pub fn heuristic(self, heuristic: Heuristic) -> Self
    where
        S: Clone,
    {
        self.with(|s| s.heuristic = Some(heuristic))
    }

    /// How long a miss waits for the same request already on its way upstream (then it
    /// goes itself) [default: 5 s]; zero turns collapsing off.
    pub fn collapse_wait(self, wait: Duration) -> Self
    where
        S: Clone,
    {
        self.with(|s| s.collapse_wait = wait)
    }

    /// Counts requests by what the cache did in `metrics`
    /// (`gateway_cache_requests_total{cache, result}`, `cache` being `label`: a route id,
    /// or the name routes share a cache by).
    pub fn metrics(self, metrics: &Metrics, label: &str) -> Self
    where
        S: Clone,
    {
        let family: Family<RequestLabels, Counter> = metrics.family(
            "cache_requests",
            "Requests by what the cache did: hit, miss, bypass, revalidated, stale_while_revalidate, stale_if_error, collapsed",
        );
        let cache: Arc<str> = label.into();
        let counters = Outcome::ALL.map(|outcome| {
            family
                .get_or_create(&RequestLabels {
                    cache: Arc::clone(&cache),
                    result: outcome.as_str(),
                })
                .clone()
        });
        self.with(|s| s.counters = Some(counters))
    }

    /// The cache's name in `Cache-Status` (a token, such as `edge`).
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header value.
    pub fn name(self, name: &str) -> Self
    where
        S: Clone,
    {
        let name = HeaderValue::from_str(name).expect("a cache name is a header value");
        self.with(|s| s.name = name)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.shared.store
    }
}

impl<St, S> Layer<S> for CacheLayer<St> {
    type Service = Cache<St, S>;

    fn layer(&self, inner: S) -> Cache<St, S> {
        Cache {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> fmt::Debug for CacheLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("name", &self.shared.name)
            .field("max_object", &self.shared.max_object)
            .finish_non_exhaustive()
    }
}

impl<St, S: fmt::Debug> fmt::Debug for Cache<St, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// What the cache did for a request: the access log's `cache` field and the `result`
/// label of `gateway_cache_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Answered from the store.
    Hit,
    /// Went upstream (a miss, a stale entry fetched again, or the client asking for it).
    Miss,
    /// Not cacheable (a method other than GET and HEAD, no host).
    Bypass,
    /// A stale entry validated with the upstream (304) and answered from the store.
    Revalidated,
    /// A stale entry answered at once and refreshed in the background.
    StaleWhileRevalidate,
    /// A stale entry answering for a failing upstream.
    StaleIfError,
    /// Waited for the same request in flight, then answered from what it stored.
    Collapsed,
}

impl Outcome {
    const ALL: [Self; 7] = [
        Self::Hit,
        Self::Miss,
        Self::Bypass,
        Self::Revalidated,
        Self::StaleWhileRevalidate,
        Self::StaleIfError,
        Self::Collapsed,
    ];

    const fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
            Self::Revalidated => "revalidated",
            Self::StaleWhileRevalidate => "stale_while_revalidate",
            Self::StaleIfError => "stale_if_error",
            Self::Collapsed => "collapsed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    cache: Arc<str>,
    result: &'static str,
}

impl<S> Shared<S> {
    /// Counts `outcome` and notes it in the access log.
    fn report(&self, log: Option<&LogFields>, outcome: Outcome) {
        if let Some(log) = log {
            log.insert("cache", outcome.as_str());
        }
        if let Some(counters) = &self.counters {
            counters[outcome as usize].inc();
        }
    }
}

/// Why a request went upstream (`Cache-Status: fwd=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forward {
    /// Nothing stored under the key.
    UriMiss,
    /// Something stored, but not for this request's `Vary` fields.
    VaryMiss,
    /// Stored, but stale (or the request asked for fresher).
    Stale,
    /// The request asked for the upstream (`no-cache`).
    Request,
    /// Not cacheable at all: a method other than GET and HEAD, or no host.
    Bypass,
}

impl Forward {
    const fn as_str(self) -> &'static str {
        match self {
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Stale => "stale",
            Self::Request => "request",
            Self::Bypass => "bypass",
        }
    }
}

impl<St, S> Service<Request<Body>> for Cache<St, S>
where
    St: Store + Clone,
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let shared = &self.shared;
        let tls = req.extensions().get::<ConnectInfo>().is_some_and(|c| c.tls);
        let key = Key::of(req.uri(), req.headers(), tls);
        let cacheable = req.method() == Method::GET || req.method() == Method::HEAD;
        // A store that answers at once (memory) answers a hit without the boxed future.
        let mut seen = None;
        if cacheable
            && let Some(key) = &key
            && let Some(variants) = shared.store.peek(key)
        {
            let req_cc = CacheControl::parse_request(req.headers());
            let now = SystemTime::now();
            if let Some(stored) = reusable(&variants, req.headers(), &req_cc, now) {
                shared.report(req.extensions().get::<LogFields>(), Outcome::Hit);
                let res = hit(stored, &req, shared.hit_marks(stored, now, None));
                return ResponseFuture::ready(Ok(res));
            }
            seen = Some(variants);
        }
        let shared = Arc::clone(&self.shared);
        // NOTE: the ready service goes to this request; the clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::boxed(serve(shared, inner, req, key, seen))
    }
}

pin_project! {
    /// The response future of [`Cache`]: a hit answered at once, or the way upstream.
    pub struct ResponseFuture {
        #[pin]
        kind: FutureKind,
    }
}

pin_project! {
    #[project = FutureKindProj]
    enum FutureKind {
        Ready { result: Option<Result<Response<Body>, BoxError>> },
        Boxed { fut: Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>> },
    }
}

impl ResponseFuture {
    fn ready(result: Result<Response<Body>, BoxError>) -> Self {
        Self {
            kind: FutureKind::Ready {
                result: Some(result),
            },
        }
    }

    fn boxed(fut: impl Future<Output = Result<Response<Body>, BoxError>> + Send + 'static) -> Self {
        Self {
            kind: FutureKind::Boxed { fut: Box::pin(fut) },
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            FutureKindProj::Ready { result } => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(Error::new(ErrorKind::Internal).into())),
            ),
            FutureKindProj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

async fn serve<St, S>(
    shared: Arc<Shared<St>>,
    mut inner: S,
    mut req: Request<Body>,
    key: Option<Key>,
    seen: Option<crate::cache::Variants>,
) -> Result<Response<Body>, BoxError>
where
    St: Store + Clone,
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let log = req.extensions().get::<LogFields>().cloned();
    let method = req.method().clone();
    let key = match key {
        Some(key) if method == Method::GET || method == Method::HEAD => key,
        target => {
            // Unsafe methods invalidate what they may have changed (RFC 9111 §4.4).
            return bypass(&shared, inner, req, target, log.as_ref()).await;
        }
    };
    let req_cc = CacheControl::parse_request(req.headers());
    let now = SystemTime::now();
    let variants = match seen {
        Some(variants) => variants,
        None => match shared.store.get(&key).await {
            Ok(variants) => variants,
            Err(e) => {
                // NOTE: the store logs its own outage once (and counts each failure).
                tracing::debug!(error = %e, "cache store unavailable: the request goes upstream");
                Arc::new([])
            }
        },
    };
    let found = variants
        .iter()
        .find(|v| v.selection.matches(req.headers()))
        .cloned();
    let forward = match &found {
        Some(stored) => match stored.freshness.reuse(&req_cc, now) {
            Reuse::Fresh | Reuse::Stale => {
                shared.report(log.as_ref(), Outcome::Hit);
                return Ok(hit(stored, &req, shared.hit_marks(stored, now, None)));
            }
            // Served stale now, refreshed in the background (RFC 5861 §3), one refresh
            // per key at a time.
            Reuse::StaleWhileRevalidate if !req_cc.no_cache() && method == Method::GET => {
                let flight = FlightKey::new(&key, req.headers().get(AUTHORIZATION));
                shared.report(log.as_ref(), Outcome::StaleWhileRevalidate);
                let marks = shared.hit_marks(stored, now, Some("stale-while-revalidate"));
                let res = hit(stored, &req, marks);
                if let Role::Leader(leader) = shared.flights.join(flight) {
                    let drain = req.extensions().get::<Drain>().cloned();
                    let refresh = background(
                        Arc::clone(&shared),
                        inner,
                        req,
                        key,
                        Arc::clone(stored),
                        leader,
                    );
                    match drain {
                        Some(drain) => drop(drain.spawn(refresh)),
                        None => drop(tokio::spawn(refresh)),
                    }
                }
                return Ok(res);
            }
            Reuse::StaleWhileRevalidate | Reuse::Validate if req_cc.no_cache() => Forward::Request,
            Reuse::StaleWhileRevalidate | Reuse::Validate => Forward::Stale,
        },
        None if variants.is_empty() => Forward::UriMiss,
        None => Forward::VaryMiss,
    };
    if req_cc.only_if_cached() {
        return Err(Error::new(ErrorKind::NotCached).into());
    }
    // The same request already on its way upstream: wait for it, then look again
    // (bounded; then go upstream alone).
    let mut leader = None;
    if method == Method::GET && !req_cc.no_cache() && !shared.collapse_wait.is_zero() {
        let flight = FlightKey::new(&key, req.headers().get(AUTHORIZATION));
        match shared.flights.join(flight) {
            Role::Leader(l) => leader = Some(l),
            Role::Follower(waiting) => {
                let now = SystemTime::now();
                if follow(waiting, shared.collapse_wait).await
                    && let Ok(variants) = shared.store.get(&key).await
                    && let Some(stored) = reusable(&variants, req.headers(), &req_cc, now)
                {
                    shared.report(log.as_ref(), Outcome::Collapsed);
                    let marks = shared.hit_marks(stored, now, Some("collapsed"));
                    return Ok(hit(stored, &req, marks));
                }
            }
            Role::Alone => {}
        }
    }
    // A stored response to validate: the upstream is asked whether it changed (RFC 9111
    // §4.3.1), unless the client asks a question of its own.
    let validating = found
        .as_ref()
        .filter(|stored| {
            method == Method::GET && !conditional(req.headers()) && add_validators(stored, &mut req)
        })
        .cloned();
    // Only a GET's response fills the cache; its request's fields are kept to judge it.
    let keep = (method == Method::GET).then(|| req.headers().clone());
    let result = inner.call(req).await.map_err(Into::into);
    let received = SystemTime::now();
    // The upstream failed: a stale response that allows it answers instead (RFC 5861 §4).
    let failed = match &result {
        Ok(res) => res.status().is_server_error(),
        Err(_) => true,
    };
    if failed
        && let Some(stored) = &found
        && stored.freshness.usable_on_error(&req_cc, received)
    {
        let status = result.as_ref().map_or(502, |res| res.status().as_u16());
        tracing::debug!(key = %key, status, "upstream failed: a stale response answers");
        shared.report(log.as_ref(), Outcome::StaleIfError);
        let marks = shared.forwarded_marks(
            stored,
            received,
            &format!("fwd=stale; fwd-status={status}; detail=stale-if-error"),
        );
        let headers = HeaderMap::new();
        return Ok(hit(stored, (&Method::GET, &headers), marks));
    }
    let res = result?;
    if let (Some(stored), StatusCode::NOT_MODIFIED) = (&validating, res.status()) {
        let refreshed = refresh(stored, res.headers(), now, received, shared.heuristic);
        put(&shared.store, &key, Arc::clone(&refreshed)).await;
        shared.report(log.as_ref(), Outcome::Revalidated);
        let marks =
            shared.forwarded_marks(&refreshed, received, "fwd=stale; fwd-status=304; stored");
        let headers = HeaderMap::new();
        return Ok(hit(&refreshed, (&Method::GET, &headers), marks));
    }
    shared.report(log.as_ref(), Outcome::Miss);
    let Some(req_headers) = keep else {
        return Ok(mark(res, &shared.name, forward, false));
    };
    let (selection, freshness) = match judge(&shared, &req_headers, &req_cc, &res, now, received) {
        Ok(judged) => judged,
        Err(why) => {
            tracing::trace!(key = %key, why, "response not stored");
            // Later misses for the key need not wait for one another (hit-for-miss).
            if let Some(leader) = leader {
                leader.pass(PASS_FOR);
            }
            return Ok(mark(res, &shared.name, forward, false));
        }
    };
    let expected = length(&res);
    let (parts, body) = res.into_parts();
    let pending = Pending {
        store: shared.store.clone(),
        flight: leader,
        key,
        status: parts.status,
        headers: storable_headers(&parts.headers),
        selection,
        freshness,
    };
    let body = Body::new(Recording {
        inner: body,
        buf: Some(BytesMut::with_capacity(expected.map_or(0, |n| {
            usize::try_from(n).unwrap_or(0).min(shared.max_object)
        }))),
        limit: shared.max_object,
        expected,
        pending: Some(pending),
    });
    let res = Response::from_parts(parts, body);
    Ok(mark(res, &shared.name, forward, true))
}

/// Whether a GET's response may be stored, and if so by what it is selected and how
/// fresh it is; if not, why (for the trace).
fn judge<St>(
    shared: &Shared<St>,
    req: &HeaderMap,
    req_cc: &CacheControl,
    res: &Response<Body>,
    requested: SystemTime,
    received: SystemTime,
) -> Result<(Selection, Freshness), &'static str> {
    let res_cc = CacheControl::parse(res.headers());
    storable(
        &Method::GET,
        req,
        req_cc,
        res.status(),
        res.headers(),
        &res_cc,
        shared.heuristic,
    )
    .map_err(|why| why.as_str())?;
    let selection = Selection::of(req, res.headers()).map_err(|_| "vary")?;
    if length(res).is_some_and(|len| len > u64::try_from(shared.max_object).unwrap_or(u64::MAX)) {
        return Err("size");
    }
    let freshness = Freshness::new(
        res.status(),
        res.headers(),
        &res_cc,
        requested,
        received,
        shared.heuristic,
    );
    Ok((selection, freshness))
}

/// Refreshes `stored` in the background: validated when it has validators, fetched
/// whole otherwise, stored if it may be. `leader` keeps other refreshes (and misses) of
/// the key waiting until it is done.
async fn background<St, S>(
    shared: Arc<Shared<St>>,
    mut inner: S,
    req: Request<Body>,
    key: Key,
    stored: Arc<Stored>,
    leader: Leader,
) where
    St: Store + Clone,
    S: Service<Request<Body>, Response = Response<Body>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let (mut parts, _) = req.into_parts();
    // Its own request: no client conditionals, and no share in the client's log line.
    for name in CONDITIONALS {
        parts.headers.remove(name);
    }
    parts.extensions.remove::<LogFields>();
    let req_headers = parts.headers.clone();
    let req_cc = CacheControl::parse_request(&req_headers);
    let mut req = Request::from_parts(parts, Body::empty());
    let validating = add_validators(&stored, &mut req);
    let requested = SystemTime::now();
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(e) => {
            let e: BoxError = e.into();
            tracing::debug!(key = %key, error = %e, "background refresh failed");
            return;
        }
    };
    let received = SystemTime::now();
    let refreshed = if validating && res.status() == StatusCode::NOT_MODIFIED {
        refresh(
            &stored,
            res.headers(),
            requested,
            received,
            shared.heuristic,
        )
    } else {
        let Ok((selection, freshness)) =
            judge(&shared, &req_headers, &req_cc, &res, requested, received)
        else {
            return;
        };
        let (parts, body) = res.into_parts();
        let limited = http_body_util::Limited::new(body, shared.max_object);
        let Ok(collected) = http_body_util::BodyExt::collect(limited).await else {
            return;
        };
        if collected.trailers().is_some() {
            return;
        }
        Arc::new(Stored::assemble(
            parts.status,
            storable_headers(&parts.headers),
            collected.to_bytes(),
            selection,
            freshness,
        ))
    };
    put(&shared.store, &key, refreshed).await;
    drop(leader);
}

/// The `Age` and `Cache-Status` a response from the store carries.
struct Marks {
    age: HeaderValue,
    status: HeaderValue,
}

/// A hit: the stored response with its `marks`; a `304` to a conditional request it
/// satisfies; a `206` or `416` to a range request; no body for a `HEAD`.
fn hit<'r>(stored: &Stored, req: impl Into<Asked<'r>>, marks: Marks) -> Response<Body> {
    let req: Asked<'r> = req.into();
    let mut res = if not_modified(stored, req.headers) {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        // RFC 9110 §15.4.5: the fields a 200 would have carried that describe it.
        for field in [CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, VARY] {
            for value in stored.headers.get_all(&field) {
                res.headers_mut().append(field.clone(), value.clone());
            }
        }
        res
    } else {
        let head = req.method == Method::HEAD;
        let len = stored.body.len();
        let range = if req.method == Method::GET
            && stored.status == StatusCode::OK
            && req.headers.contains_key(RANGE)
        {
            ranged(req.headers, &stored.headers, len)
        } else {
            Ranged::Whole
        };
        let (status, body, content_range) = match range {
            Ranged::Whole if head => (stored.status, Body::empty(), None),
            Ranged::Whole => (stored.status, Body::from(stored.body.clone()), None),
            Ranged::Part(part) => {
                let value = format!("bytes {}-{}/{len}", part.start, part.end.saturating_sub(1));
                let body = Body::from(stored.body.slice(part));
                (StatusCode::PARTIAL_CONTENT, body, Some(value))
            }
            Ranged::Unsatisfiable => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                Body::empty(),
                Some(format!("bytes */{len}")),
            ),
        };
        let mut res = Response::new(body);
        *res.status_mut() = status;
        *res.headers_mut() = template(stored).clone();
        if head {
            // The length of the body a GET would get.
            res.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        if let Some(value) = content_range.and_then(|v| HeaderValue::try_from(v).ok()) {
            res.headers_mut().insert(CONTENT_RANGE, value);
        }
        res
    };
    let headers = res.headers_mut();
    headers.insert(AGE, marks.age);
    // NOTE: a stored response has no `Cache-Status` of ours or theirs (see
    // `storable_headers`): ours is the only one.
    headers.insert(CACHE_STATUS.clone(), marks.status);
    res
}

/// `stored`'s fields with `Age` and `Cache-Status` (placeholders, replaced by every hit),
/// made on its first hit: a hit clones them and replaces the two in place instead of
/// growing the map.
fn template(stored: &Stored) -> &HeaderMap {
    stored.hot().template.get_or_init(|| {
        // NOTE: `HeaderMap::insert` reserves a slot before it looks for the name, so a
        // map that is full grows even to replace a value: the template has room for the
        // two placeholders, one more, and a HEAD's `Content-Length` or a range's
        // `Content-Range` (its capacity survives a clone: it is the index's).
        let mut headers = HeaderMap::with_capacity(stored.headers.len() + 4);
        for (name, value) in &stored.headers {
            if name != AGE && name != CACHE_STATUS {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(AGE, HeaderValue::from_static("0"));
        headers.insert(CACHE_STATUS.clone(), HeaderValue::from_static("-"));
        headers
    })
}

/// What a hit answers: the request's method and fields.
struct Asked<'r> {
    method: &'r Method,
    headers: &'r HeaderMap,
}

impl<'r> From<&'r Request<Body>> for Asked<'r> {
    fn from(req: &'r Request<Body>) -> Self {
        Self {
            method: req.method(),
            headers: req.headers(),
        }
    }
}

impl<'r> From<(&'r Method, &'r HeaderMap)> for Asked<'r> {
    fn from((method, headers): (&'r Method, &'r HeaderMap)) -> Self {
        Self { method, headers }
    }
}

impl<S> Shared<S> {
    /// The `Age` and this cache's `Cache-Status` entry for a hit on `stored` at `now`,
    /// with `detail`.
    fn hit_marks(&self, stored: &Stored, now: SystemTime, detail: Option<&str>) -> Marks {
        let age = stored.freshness.age(now).as_secs();
        let made = || Marks {
            age: HeaderValue::from(age),
            status: self.make_hit_status(stored, age, detail),
        };
        if detail.is_some() {
            return made();
        }
        // Hits in the same second share their values (a hot object is hit thousands of
        // times a second); a contended stamp is made afresh instead of waited for.
        let Ok(mut stamp) = stored.hot().stamp.try_lock() else {
            return made();
        };
        if let Some(s) = &*stamp
            && s.age == age
            && s.name == self.name
        {
            return Marks {
                age: s.age_value.clone(),
                status: s.status.clone(),
            };
        }
        let marks = made();
        *stamp = Some(Stamp {
            age,
            name: self.name.clone(),
            age_value: marks.age.clone(),
            status: marks.status.clone(),
        });
        marks
    }

    /// The `Age` of `stored` at `now`, and this cache's `Cache-Status` entry for an answer
    /// from the store after going upstream: `params` after the name.
    fn forwarded_marks(&self, stored: &Stored, now: SystemTime, params: &str) -> Marks {
        Marks {
            age: HeaderValue::from(stored.freshness.age(now).as_secs()),
            status: HeaderValue::try_from(entry(&self.name, params))
                .unwrap_or_else(|_| self.name.clone()),
        }
    }

    fn make_hit_status(&self, stored: &Stored, age: u64, detail: Option<&str>) -> HeaderValue {
        let ttl = i128::from(stored.freshness.lifetime().as_secs()) - i128::from(age);
        let mut entry = BytesMut::with_capacity(self.name.len() + 48);
        entry.extend_from_slice(self.name.as_bytes());
        entry.extend_from_slice(b"; hit; ttl=");
        entry.extend_from_slice(itoa::Buffer::new().format(ttl).as_bytes());
        if let Some(detail) = detail {
            entry.extend_from_slice(b"; detail=");
            entry.extend_from_slice(detail.as_bytes());
        }
        // NOTE: a header value (the name) and ASCII: always valid.
        HeaderValue::from_maybe_shared(entry.freeze()).unwrap_or_else(|_| self.name.clone())
    }
}

/// Whether the client's request is conditional (its own validators).
fn conditional(req: &HeaderMap) -> bool {
    CONDITIONALS.iter().any(|name| req.contains_key(name))
}

/// The fields that make a request conditional.
const CONDITIONALS: [HeaderName; 5] = [
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_MATCH,
    IF_UNMODIFIED_SINCE,
    IF_RANGE,
];

/// Stores `stored` under `key`; a store that fails is logged, and the response simply
/// not kept.
async fn put<St: Store>(store: &St, key: &Key, stored: Arc<Stored>) {
    if let Err(e) = store.put(key, stored).await {
        tracing::debug!(error = %e, key = %key, "cache store failed: response not kept");
    }
}

/// The first of `variants` that a request with fields `req` and directives `req_cc` may
/// be answered with as it is at `now`.
fn reusable<'a>(
    variants: &'a [Arc<Stored>],
    req: &HeaderMap,
    req_cc: &CacheControl,
    now: SystemTime,
) -> Option<&'a Arc<Stored>> {
    variants
        .iter()
        .find(|v| v.selection.matches(req))
        .filter(|v| matches!(v.freshness.reuse(req_cc, now), Reuse::Fresh | Reuse::Stale))
}

/// A request that does not go through the cache: passed on; an unsafe one that
/// succeeded forgets what it may have changed (RFC 9111 §4.4).
async fn bypass<St, S>(
    shared: &Shared<St>,
    mut inner: S,
    req: Request<Body>,
    target: Option<Key>,
    log: Option<&LogFields>,
) -> Result<Response<Body>, BoxError>
where
    St: Store,
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    let unsafe_method = !req.method().is_safe();
    let res = inner.call(req).await.map_err(Into::into)?;
    if unsafe_method
        && let Some(target) = target
        && (res.status().is_success() || res.status().is_redirection())
    {
        invalidate(&shared.store, &target, res.headers()).await;
    }
    shared.report(log, Outcome::Bypass);
    Ok(mark(res, &shared.name, Forward::Bypass, false))
}

/// Makes `req` ask whether `stored` changed, with its validators; `false` when it has
/// none (then the request fetches it whole).
fn add_validators(stored: &Stored, req: &mut Request<Body>) -> bool {
    let mut added = false;
    if let Some(etag) = stored.headers.get(ETAG) {
        req.headers_mut().insert(IF_NONE_MATCH, etag.clone());
        added = true;
    }
    if let Some(modified) = stored.headers.get(LAST_MODIFIED) {
        req.headers_mut()
            .insert(IF_MODIFIED_SINCE, modified.clone());
        added = true;
    }
    added
}

/// The stored response updated by a `304` (RFC 9111 §4.3.4): its fields replaced by the
/// 304's, but for those describing the body, and its freshness computed again.
fn refresh(
    stored: &Stored,
    fresh: &HeaderMap,
    requested: SystemTime,
    received: SystemTime,
    heuristic: Option<Heuristic>,
) -> Arc<Stored> {
    let mut headers = stored.headers.clone();
    let updates = storable_headers(fresh);
    for name in updates.keys() {
        if [
            CONTENT_LENGTH,
            CONTENT_ENCODING,
            CONTENT_RANGE,
            TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            continue;
        }
        headers.remove(name);
        for value in updates.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let cc = CacheControl::parse(&headers);
    let freshness = Freshness::new(stored.status, &headers, &cc, requested, received, heuristic);
    Arc::new(Stored::assemble(
        stored.status,
        headers,
        stored.body.clone(),
        stored.selection.clone(),
        freshness,
    ))
}

/// Whether a stored response satisfies the client's conditional request (RFC 9110 §13.1.2
/// and §13.1.3): a matching `If-None-Match` (weak comparison), or, without one, no change
/// since `If-Modified-Since`.
fn not_modified(stored: &Stored, req: &HeaderMap) -> bool {
    if stored.status != StatusCode::OK {
        return false;
    }
    if req.contains_key(IF_NONE_MATCH) {
        let Some(etag) = stored.headers.get(ETAG).map(|e| weak(e.as_bytes())) else {
            return false;
        };
        return req.get_all(IF_NONE_MATCH).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .any(|tag| tag == b"*" || weak(tag) == etag)
        });
    }
    let date = |h: &HeaderMap, name| {
        h.get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
    };
    match (
        date(req, IF_MODIFIED_SINCE),
        date(&stored.headers, LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// An entity tag without its weakness mark, for the weak comparison.
fn weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// Adds `Cache-Status` to a response that went upstream.
fn mark(
    mut res: Response<Body>,
    name: &HeaderValue,
    forward: Forward,
    stored: bool,
) -> Response<Body> {
    let stored = if stored { "; stored" } else { "" };
    let status = entry(name, format_args!("fwd={}{stored}", forward.as_str()));
    prepend_status(res.headers_mut(), status);
    res
}

/// This cache's `Cache-Status` entry: its `name`, then `params`.
fn entry(name: &HeaderValue, params: impl fmt::Display) -> String {
    format!("{}; {params}", name.to_str().unwrap_or("gateway"))
}

/// Puts this cache's entry first in `Cache-Status`, before the ones of caches upstream
/// (RFC 9211 §2).
fn prepend_status(headers: &mut HeaderMap, ours: String) {
    let value = match headers.get(&CACHE_STATUS).map(HeaderValue::to_str) {
        Some(Ok(theirs)) if headers.get_all(&CACHE_STATUS).iter().count() == 1 => {
            format!("{ours}, {theirs}")
        }
        _ => ours,
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(CACHE_STATUS.clone(), value);
    }
}

/// The fields of a response as stored: without the hop-by-hop ones (and those its
/// `Connection` names), its `Age` (recomputed on each hit) and our `Cache-Status`.
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect();
    for name in named {
        kept.remove(name);
    }
    // NOTE: a stored body has no trailers, so no `Trailer` announcing them.
    for name in gateway_core::fields::HOP_BY_HOP
        .iter()
        .chain([&TRAILER, &AGE, &CACHE_STATUS])
    {
        kept.remove(name);
    }
    kept
}

/// The length of a response's body: its exact size (the proxy conveys the upstream's
/// framing so), or its `Content-Length`.
fn length(res: &Response<Body>) -> Option<u64> {
    http_body::Body::size_hint(res.body()).exact().or_else(|| {
        res.headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    })
}

/// Forgets what an unsafe request may have changed: its own URI, and its response's
/// `Location` and `Content-Location` when they are on the same origin (RFC 9111 §4.4).
async fn invalidate<St: Store>(store: &St, target: &Key, res: &HeaderMap) {
    let mut keys = vec![target.clone()];
    let origin = origin_of(target.as_str());
    for field in [LOCATION, CONTENT_LOCATION] {
        let Some(key) = res
            .get(field)
            .and_then(|v| v.to_str().ok())
            .and_then(|reference| resolve(target.as_str(), reference))
        else {
            continue;
        };
        // Another origin's entries are not this response's to invalidate.
        if origin_of(key.as_str()) == origin {
            keys.push(key);
        }
    }
    for key in keys {
        if let Err(e) = store.remove(&key).await {
            tracing::warn!(error = %e, key = %key, "cache invalidation failed");
        }
    }
}

/// The key of the URL a `Location` or `Content-Location` (a URI reference) names,
/// resolved against the request's `base` URL (RFC 3986 §5.2); `None` for what is not an
/// http(s) URL.
fn resolve(base: &str, reference: &str) -> Option<Key> {
    let reference = reference.split('#').next().unwrap_or_default();
    // A key is `scheme://authority` and a target that starts with `/`.
    let origin = origin_of(base);
    let (scheme, _) = origin.split_once("://")?;
    let (base_path, base_query) = split_query(&base[origin.len()..]);
    let absolute = if let Some(net) = reference.strip_prefix("//") {
        format!("{scheme}://{net}")
    } else if reference
        .split_once(':')
        .is_some_and(|(s, _)| !s.is_empty() && !s.contains(['/', '?']))
    {
        reference.to_owned()
    } else {
        let (path, query) = split_query(reference);
        let merged = if path.is_empty() {
            base_path.to_owned()
        } else if path.starts_with('/') {
            path.to_owned()
        } else {
            // §5.2.3: the base's path up to its last segment, then the reference's.
            let dir = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
            format!("{dir}{path}")
        };
        let mut url = format!("{origin}{}", remove_dot_segments(&merged));
        match (query, path.is_empty()) {
            (Some(query), _) => {
                url.push('?');
                url.push_str(query);
            }
            // §5.2.2: an empty reference keeps the base's query.
            (None, true) => {
                if let Some(query) = base_query {
                    url.push('?');
                    url.push_str(query);
                }
            }
            (None, false) => {}
        }
        url
    };
    Key::from_absolute(&absolute)
}

/// A path and its query, if it has one.
fn split_query(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// RFC 3986 §5.2.4: `.` and `..` segments taken out of an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    out.pop();
                }
                // A trailing `.` or `..` leaves a directory: `/a/b/..` is `/a/`.
                if last {
                    out.push("");
                }
            }
            segment => out.push(segment),
        }
    }
    format!("/{}", out.join("/"))
}

/// `scheme://host[:port]` of a key's URL.
fn origin_of(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    let end = url[after..].find('/').map_or(url.len(), |i| after + i);
    &url[..end]
}

/// What a response being recorded is stored as once its body has ended well.
struct Pending<St> {
    store: St,
    /// Released once the response is stored (or will not be): the waiters look again.
    flight: Option<Leader>,
    key: Key,
    status: StatusCode,
    headers: HeaderMap,
    selection: Selection,
    freshness: Freshness,
}

pin_project! {
    /// A response body passed to the client as it comes, and copied (up to the object
    /// limit) to be stored when it ends complete: never a body cut short, over the
    /// limit, with trailers, or shorter or longer than its `Content-Length`.
    struct Recording<B, St> {
        #[pin]
        inner: B,
        buf: Option<BytesMut>,
        limit: usize,
        expected: Option<u64>,
        pending: Option<Pending<St>>,
    }
}

impl<B, St> http_body::Body for Recording<B, St>
where
    B: http_body::Body<Data = Bytes>,
    St: Store,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &frame {
            Some(Ok(frame)) => {
                match frame.data_ref() {
                    Some(data) => {
                        if let Some(buf) = this.buf.as_mut() {
                            if buf.len() + data.len() > *this.limit {
                                *this.buf = None;
                            } else {
                                buf.extend_from_slice(data);
                            }
                        }
                    }
                    // Trailers: not stored (a hit could not replay them faithfully).
                    None => *this.buf = None,
                }
                // A server that knows the body is over does not poll it again.
                this.inner.is_end_stream()
            }
            Some(Err(_)) => {
                *this.buf = None;
                false
            }
            None => true,
        };
        if ended && let (Some(buf), Some(pending)) = (this.buf.take(), this.pending.take()) {
            let complete = this
                .expected
                .is_none_or(|n| u64::try_from(buf.len()).is_ok_and(|len| len == n));
            if complete {
                pending.store(buf.freeze());
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<St: Store> Pending<St> {
    fn store(self, body: Bytes) {
        let stored = Arc::new(Stored::assemble(
            self.status,
            self.headers,
            body,
            self.selection,
            self.freshness,
        ));
        let (store, key, flight) = (self.store, self.key, self.flight);
        let storing = async move {
            put(&store, &key, stored).await;
            drop(flight);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(storing);
            }
            Err(_) => tracing::debug!("no runtime to store the response in"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3986 §5.4.1's normal examples (on an http base, with `g:h` not an http URL),
    /// and the lower-cased origin keys have.
    #[test]
    fn locations_resolve_against_the_request() {
        let base = "http://a/b/c/d;p?q";
        for (reference, url) in [
            ("g:h", None),
            ("g", Some("http://a/b/c/g")),
            ("./g", Some("http://a/b/c/g")),
            ("g/", Some("http://a/b/c/g/")),
            ("/g", Some("http://a/g")),
            ("//g", Some("http://g/")),
            ("?y", Some("http://a/b/c/d;p?y")),
            ("g?y", Some("http://a/b/c/g?y")),
            ("#s", Some("http://a/b/c/d;p?q")),
            ("g#s", Some("http://a/b/c/g")),
            (";x", Some("http://a/b/c/;x")),
            ("", Some("http://a/b/c/d;p?q")),
            (".", Some("http://a/b/c/")),
            ("./", Some("http://a/b/c/")),
            ("..", Some("http://a/b/")),
            ("../", Some("http://a/b/")),
            ("../g", Some("http://a/b/g")),
            ("../..", Some("http://a/")),
            ("../../g", Some("http://a/g")),
            ("../../../g", Some("http://a/g")),
            ("/./g", Some("http://a/g")),
            ("g/../h", Some("http://a/b/c/h")),
            ("HTTPS://Other.Example/X", Some("https://other.example/X")),
            ("http://A:80/x", Some("http://a/x")),
            ("ftp://a/b", None),
        ] {
            assert_eq!(
                resolve(base, reference).as_ref().map(Key::as_str),
                url,
                "{reference:?}"
            );
        }
    }

    fn marks() -> Marks {
        Marks {
            age: HeaderValue::from_static("1"),
            status: HeaderValue::from_static("gateway; hit"),
        }
    }

    /// A hit fills its two marks into the room its template keeps, whatever the count of
    /// stored fields: the map it clones never grows (it did for 4 fields, which left a
    /// `HeaderMap` of capacity 6 full).
    #[test]
    fn a_hits_fields_never_grow() {
        let now = SystemTime::now();
        for count in 0..40 {
            let mut headers = HeaderMap::new();
            for i in 0..count {
                let name = HeaderName::try_from(format!("x-field-{i}")).expect("a name");
                headers.insert(name, HeaderValue::from_static("v"));
            }
            let stored = Stored::new(
                &HeaderMap::new(),
                StatusCode::OK,
                headers,
                Bytes::from_static(b"body"),
                (now, now),
                None,
            )
            .expect("storable");
            let room = template(&stored).capacity();
            for (method, range) in [
                (Method::GET, None),
                (Method::HEAD, None),
                (Method::GET, Some("bytes=0-1")),
            ] {
                let mut asked = HeaderMap::new();
                if let Some(range) = range {
                    asked.insert(RANGE, HeaderValue::from_static(range));
                }
                let res = hit(&stored, (&method, &asked), marks());
                assert_eq!(
                    res.headers().len(),
                    count + 2 + usize::from(range.is_some() || method == Method::HEAD),
                    "{count} fields, {method}"
                );
                assert_eq!(
                    res.headers().capacity(),
                    room,
                    "{count} fields, {method} {range:?}: grew"
                );
                assert_eq!(res.headers()[AGE], "1");
            }
        }
    }
}
