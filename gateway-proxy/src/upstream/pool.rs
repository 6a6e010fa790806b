//! Upstream connections, pooled per endpoint.
//!
//! Each [`Endpoint`] carries the pool of every client that talks to it (almost always one),
//! so finding the pool is a field read, not a map lookup, and the pool (with its idle
//! connections) goes away with the endpoint when discovery removes it.
//!
//! - HTTP/1.1: an idle connection is its socket and nothing else (no task, no buffer):
//!   exchanges run in the task of their request (see `exchange`). Idle connections are a
//!   LIFO stack, so a quiet period lets the oldest ones expire. A connection goes back on
//!   the stack when its response has been read to the end; one whose response was
//!   abandoned, or which said it would close, is closed instead. Before a connection is
//!   taken, a non-blocking peek checks that the upstream has neither closed it nor sent
//!   anything unasked.
//! - HTTP/2: one shared connection per endpoint, multiplexed, run by hyper in a task of its
//!   own. Requests that find none wait for the one being made (with prior knowledge, or
//!   once the endpoint has negotiated HTTP/2 by ALPN; only the very first burst to an ALPN
//!   endpoint may open several).
//! - Idle connections close after the idle timeout, and those the upstream closed are let
//!   go within a second: one timer task per pool, not per connection, that runs only while
//!   the pool holds idle connections.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use gateway_core::Body;
use http::header::HeaderValue;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Version};
use hyper::client::conn::http2;
use rustls_pki_types::ServerName;
use tokio::time::Instant;

use crate::io::Stream;
use crate::upstream::Endpoint;

/// How often the pool looks for idle connections the upstream has closed.
const CLOSED_CHECK: Duration = Duration::from_secs(1);

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
    pub(crate) host: HeaderValue,
    /// What the connector dials, and the `:scheme` and `:authority` of HTTP/2 requests.
    pub(super) target: Uri,
    /// The name the upstream's certificate must carry (`https` endpoints).
    pub(super) server_name: Option<ServerName<'static>>,
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
    idle: Vec<IdleConn>,
    /// The shared HTTP/2 connection.
    h2: Option<http2::SendRequest<Body>>,
    /// Whether the expiry task is running.
    reaping: bool,
}

struct IdleConn {
    io: Stream,
    since: Instant,
}

/// A connection ready to take a request.
pub(crate) enum Ready {
    /// An HTTP/1.1 connection, and whether it comes from the pool (rather than new).
    H1(Stream, bool),
    H2(http2::SendRequest<Body>),
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
        // An IPv6 literal is bracketed in an authority, not in a server name.
        let name = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = (*scheme == Scheme::HTTPS)
            .then(|| ServerName::try_from(name.to_owned()).ok())
            .flatten();
        Self {
            host,
            target,
            server_name,
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
    pub(crate) fn checkout(&self) -> Option<Ready> {
        let mut closed = Vec::new();
        let conn = {
            let mut state = self.lock();
            if let Some(h2) = &state.h2 {
                if h2.is_ready() {
                    return Some(Ready::H2(h2.clone()));
                }
                state.h2 = None;
            }
            loop {
                match state.idle.pop() {
                    Some(idle) if idle.io.is_idle_and_open() => {
                        break Some(Ready::H1(idle.io, true));
                    }
                    // Closed (or talking out of turn): dropped below, outside the lock.
                    Some(idle) => closed.push(idle.io),
                    None => break None,
                }
            }
        };
        drop(closed);
        conn
    }

    /// How many HTTP/1.1 connections are idle in the pool, open or not.
    #[cfg(test)]
    pub(crate) fn idle_len(&self) -> usize {
        self.lock().idle.len()
    }

    /// Puts an HTTP/1.1 connection that can take another request back on the stack.
    pub(crate) fn put(self: &Arc<Self>, io: Stream) {
        let mut state = self.lock();
        if state.idle.len() >= self.max_idle {
            drop(state);
            return;
        }
        state.idle.push(IdleConn {
            io,
            since: Instant::now(),
        });
        self.reap_soon(&mut state);
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

    /// Starts the expiry task, unless it is running.
    fn reap_soon(self: &Arc<Self>, state: &mut State) {
        if !state.reaping
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            state.reaping = true;
            drop(runtime.spawn(reap(Arc::downgrade(self))));
        }
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

/// Closes idle connections once they have been idle for the pool's timeout, and those the
/// upstream has closed; ends when the pool has no idle connection left or is gone.
async fn reap(pool: Weak<Pool>) {
    let mut closing = Vec::new();
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let mut state = pool.lock();
            let now = Instant::now();
            let expiry = |since: Instant| gateway_core::time::deadline(since, pool.idle_timeout);
            // NOTE: the sockets are closed below, outside the lock every checkout takes.
            let expired = state.idle.extract_if(.., |idle| {
                expiry(idle.since) <= now || !idle.io.is_idle_and_open()
            });
            closing.extend(expired.map(|idle| idle.io));
            let next = state
                .idle
                .iter()
                .map(|idle| idle.since)
                .min()
                .map(|oldest| expiry(oldest).min(now + CLOSED_CHECK));
            if next.is_none() {
                state.reaping = false;
            }
            next
        };
        closing.clear();
        let Some(next) = next else { return };
        tokio::time::sleep_until(next).await;
    }
}

/// Runs an HTTP/2 upstream connection in its own task until it closes, logging how it
/// failed.
///
/// NOTE: a `poll_fn` over the connection, not an `async` block awaiting it: the block
/// would hold the connection twice (as its captured value and inside the `.await`).
pub(crate) fn spawn_conn<C>(mut conn: C, failed: &'static str)
where
    C: Future<Output = Result<(), hyper::Error>> + Unpin + Send + 'static,
{
    drop(tokio::spawn(std::future::poll_fn(move |cx| {
        Pin::new(&mut conn).poll(cx).map(|result| {
            if let Err(err) = result {
                tracing::debug!(error = %err, "{failed}");
            }
        })
    })));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gateway_core::Body;
    use gateway_core::test_util::body_string;
    use http::{Request, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tower::ServiceExt;

    use crate::{ReverseProxy, Upstream};

    /// How long the upstreams below wait before closing or writing to an idle connection.
    const LATER: Duration = Duration::from_millis(100);

    /// One request with a 7-byte body through `proxy`, read to the end: (status, body).
    async fn send(proxy: &ReverseProxy, method: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri("/")
            .body(Body::from("payload"))
            .unwrap();
        let res = proxy.clone().oneshot(req).await.unwrap();
        let status = res.status();
        (status, body_string(res.into_body()).await)
    }

    /// Reads one request with a 7-byte body (what [`send`] sends) and answers `200 ok`.
    async fn answer_one(stream: &mut TcpStream) {
        let read = async {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).await?;
                head.push(byte[0]);
            }
            let mut body = [0u8; 7];
            stream.read_exact(&mut body).await
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("a request within 5 s")
            .unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
    }

    /// An upstream that answers one request per connection with `200 ok`, then does what
    /// `after` says with the first connection while it sits idle in the pool.
    async fn one_shot_upstream(after: &'static [u8]) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut accepted = 0;
            let mut held = Vec::new();
            while accepted < 2 {
                let (mut stream, _) = listener.accept().await.unwrap();
                accepted += 1;
                answer_one(&mut stream).await;
                if accepted == 1 {
                    tokio::time::sleep(LATER).await;
                    if after.is_empty() {
                        drop(stream);
                    } else {
                        stream.write_all(after).await.unwrap();
                        held.push(stream);
                    }
                } else {
                    held.push(stream);
                }
            }
            accepted
        });
        (url, task)
    }

    /// An idle connection the upstream closed, or wrote to unasked, is not used: a POST
    /// (which is never sent twice) gets a new connection and its answer.
    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_or_wrote_to_is_replaced() {
        for after in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale",
        ] {
            let (url, upstream) = one_shot_upstream(after).await;
            let proxy = ReverseProxy::to(&url).unwrap();
            assert_eq!(send(&proxy, "POST").await, (StatusCode::OK, "ok".into()));
            // The upstream has closed it (or written to it) by now.
            tokio::time::sleep(LATER * 3).await;
            assert_eq!(send(&proxy, "POST").await, (StatusCode::OK, "ok".into()));
            // Bounded: had the POST gone to the idle connection, no second one comes.
            let accepted = tokio::time::timeout(Duration::from_secs(2), upstream).await;
            assert_eq!(accepted.unwrap().unwrap(), 2);
        }
    }

    /// The pool lets go of an idle connection once the upstream has closed its side,
    /// without waiting for a request to find out (or for the idle timeout).
    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_let_go_by_itself() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            answer_one(&mut stream).await;
            tokio::time::sleep(LATER).await;
            stream.shutdown().await.unwrap();
            // EOF once the gateway closes its side too.
            let mut byte = [0u8; 1];
            tokio::time::timeout(super::CLOSED_CHECK * 3, stream.read(&mut byte)).await
        });
        let proxy = ReverseProxy::new(Upstream::single(&url).unwrap());
        assert_eq!(send(&proxy, "GET").await, (StatusCode::OK, "ok".into()));
        let closed = upstream.await.unwrap();
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    }
}
