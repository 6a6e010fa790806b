//! Upstream connections, pooled per endpoint.
//!
//! Each [`Endpoint`] carries the pool of every client that talks to it (almost always one),
//! so finding the pool is a field read, not a map lookup, and the pool (with its idle
//! connections) goes away with the endpoint when discovery removes it.
//!
//! - HTTP/1.1: idle connections are a LIFO stack, so a quiet period lets the oldest ones
//!   expire. A connection goes back to the stack when its response body has been read to
//!   the end (the guard rides on the response body); one whose body was abandoned is never
//!   reused. A request that a pooled connection could not take before writing anything
//!   (the upstream closed it while idle) is retried on another connection.
//! - HTTP/2: one shared connection per endpoint, multiplexed. Requests that find none wait
//!   for the one being made (with prior knowledge, or once the endpoint has negotiated
//!   HTTP/2 by ALPN; only the very first burst to an ALPN endpoint may open several).
//! - Idle connections close after the idle timeout: one timer per pool, not per
//!   connection, that runs only while the pool holds idle connections.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use gateway_core::Body;
use http::header::{HOST, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Version};
use hyper::client::conn::{http1, http2};
use tokio::time::Instant;

use crate::upstream::Endpoint;

/// The pools of every client that uses one endpoint.
#[derive(Default)]
pub(crate) struct Pools {
    /// The first client's pool; the common case, read without a lock.
    first: OnceLock<(u64, Arc<Pool>)>,
    /// Pools of further clients (a health-check client with its own TLS roots, say).
    others: Mutex<Vec<(u64, Arc<Pool>)>>,
}

/// The connections of one client to one endpoint.
pub(crate) struct Pool {
    /// `Host` for HTTP/1.1 requests that have none: the authority without a default port.
    host: HeaderValue,
    /// What the connector dials, and the `:scheme` and `:authority` of HTTP/2 requests.
    pub(super) target: Uri,
    idle_timeout: Duration,
    max_idle: usize,
    state: Mutex<State>,
    /// Held while an HTTP/2 connection is being made, so that concurrent requests wait for
    /// it instead of each opening their own.
    pub(super) h2_connecting: tokio::sync::Mutex<()>,
    /// Whether the endpoint has negotiated HTTP/2 by ALPN before: from then on, new
    /// connections are made one at a time as with prior knowledge.
    speaks_h2: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Idle HTTP/1.1 connections, most recently used last.
    idle: Vec<Idle>,
    /// The shared HTTP/2 connection.
    h2: Option<http2::SendRequest<Body>>,
    /// Whether the expiry task is running.
    reaping: bool,
}

struct Idle {
    tx: http1::SendRequest<Body>,
    since: Instant,
}

/// A connection ready to take a request.
pub(crate) enum Conn {
    /// With the moment it went idle in the pool (`None`: new).
    H1(http1::SendRequest<Body>, Option<Instant>),
    H2(http2::SendRequest<Body>),
}

/// Returns an HTTP/1.1 connection to its pool when dropped, if it can take another request.
/// The proxy keeps it on the response body, so that happens when the body has been read.
pub(crate) struct Checkin {
    pool: Arc<Pool>,
    tx: Option<http1::SendRequest<Body>>,
}

// === impl Pools ===

impl Pools {
    /// The pool of client `id`, made by `make` the first time.
    pub(crate) fn get(&self, id: u64, make: impl Fn() -> Pool) -> Arc<Pool> {
        let (first, pool) = self.first.get_or_init(|| (id, Arc::new(make())));
        if *first == id {
            return Arc::clone(pool);
        }
        let mut others = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, pool)) = others.iter().find(|(other, _)| *other == id) {
            return Arc::clone(pool);
        }
        let pool = Arc::new(make());
        others.push((id, Arc::clone(&pool)));
        pool
    }
}

impl fmt::Debug for Pools {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pools").finish_non_exhaustive()
    }
}

// === impl Pool ===

impl Pool {
    pub(crate) fn new(endpoint: &Endpoint, idle_timeout: Duration, max_idle: usize) -> Self {
        let (scheme, authority) = (endpoint.scheme(), endpoint.authority());
        let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => authority.as_str(),
            _ => authority.host(),
        };
        let host = HeaderValue::from_str(host)
            .unwrap_or_else(|_| unreachable!("an authority is a valid header value"));
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_else(|_| unreachable!("scheme and authority come from a valid URI"));
        Self {
            host,
            target,
            idle_timeout,
            max_idle,
            state: Mutex::new(State::default()),
            h2_connecting: tokio::sync::Mutex::new(()),
            speaks_h2: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pooled connection that can take a request now, if there is one.
    pub(crate) fn checkout(&self) -> Option<Conn> {
        let mut state = self.lock();
        if let Some(h2) = &state.h2 {
            if h2.is_ready() {
                return Some(Conn::H2(h2.clone()));
            }
            state.h2 = None;
        }
        // A connection that is not ready has been closed (or is closing) by its peer.
        while let Some(idle) = state.idle.pop() {
            if idle.tx.is_ready() {
                return Some(Conn::H1(idle.tx, Some(idle.since)));
            }
        }
        None
    }

    /// Shares a new HTTP/2 connection with the requests that follow.
    pub(crate) fn set_h2(&self, tx: http2::SendRequest<Body>) {
        self.speaks_h2.store(true, Ordering::Relaxed);
        self.lock().h2 = Some(tx);
    }

    /// Whether the endpoint is known to speak HTTP/2.
    pub(crate) fn speaks_h2(&self) -> bool {
        self.speaks_h2.load(Ordering::Relaxed)
    }

    /// Puts an HTTP/1.1 connection that can take a request back on the stack.
    fn put(self: &Arc<Self>, tx: http1::SendRequest<Body>) {
        let mut state = self.lock();
        if state.idle.len() >= self.max_idle {
            return;
        }
        state.idle.push(Idle {
            tx,
            since: Instant::now(),
        });
        if !state.reaping
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            state.reaping = true;
            drop(runtime.spawn(reap(Arc::downgrade(self))));
        }
    }

    /// Makes `req` an origin-form HTTP/1.1 request with a `Host`.
    pub(crate) fn http1_form(&self, req: &mut Request<Body>) {
        // The proxy and the health checks send origin-form already; a request that went to
        // an HTTP/2 connection first (a retry) is absolute-form.
        if req.uri().authority().is_some() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
        }
        *req.version_mut() = Version::HTTP_11;
        // One lookup, where `contains_key` and `insert` would hash and probe twice.
        req.headers_mut()
            .entry(HOST)
            .or_insert_with(|| self.host.clone());
    }

    /// Makes `req` an absolute-form HTTP/2 request (`:scheme` and `:authority`).
    pub(crate) fn http2_form(&self, req: &mut Request<Body>) {
        let mut parts = http::uri::Parts::default();
        parts.scheme = self.target.scheme().cloned();
        parts.authority = self.target.authority().cloned();
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_2;
    }
}

/// Closes idle connections once they have been idle for the pool's timeout; ends when the
/// pool has no idle connection left or is gone.
async fn reap(pool: Weak<Pool>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let mut state = pool.lock();
            let now = Instant::now();
            let timeout = pool.idle_timeout;
            state
                .idle
                .retain(|idle| now < idle.since + timeout && !idle.tx.is_closed());
            match state.idle.first() {
                // The stack is oldest first.
                Some(oldest) => oldest.since + timeout,
                None => {
                    state.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

// === impl Checkin ===

impl Checkin {
    pub(crate) const fn new(pool: Arc<Pool>, tx: http1::SendRequest<Body>) -> Self {
        Self { pool, tx: Some(tx) }
    }
}

impl Drop for Checkin {
    fn drop(&mut self) {
        let Some(mut tx) = self.tx.take() else { return };
        if tx.is_ready() {
            self.pool.put(tx);
        } else if !tx.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The connection task has not caught up with the end of the exchange yet (the
            // request body may still be going out): wait for it off the request path.
            let pool = Arc::clone(&self.pool);
            drop(runtime.spawn(async move {
                if tx.ready().await.is_ok() {
                    pool.put(tx);
                }
            }));
        }
    }
}
