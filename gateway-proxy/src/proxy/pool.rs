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
//! - A plain-text HTTP/1.1 connection idle for the park delay is parked: its task hands
//!   back the socket and ends, freeing hyper's read and write buffers, its request channel
//!   and the task (about 29 KiB), and the pool keeps only the socket. The next request
//!   that takes it checks that the upstream has neither closed it nor sent anything, and
//!   starts a new hyper connection on it. The same timer looks at parked sockets once per
//!   park delay and drops those the upstream has closed (tokio knows without a system call
//!   which sockets have reported anything).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Poll, ready};
use std::time::Duration;

use gateway_core::Body;
use http::header::{HOST, HeaderValue};
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Request, Version};
use hyper::client::conn::{http1, http2};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::io::Coalesce;
use crate::upstream::Endpoint;

/// An upstream connection's socket, as hyper sees it.
pub(crate) type Io = Coalesce<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// The socket of a parked (plain-text) connection.
pub(crate) type Socket = TokioIo<TcpStream>;

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
    /// How long a plain HTTP/1.1 connection stays idle before it is parked (`None`: never).
    park_after: Option<Duration>,
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
    conn: Pooled,
    since: Instant,
}

enum Pooled {
    /// A hyper connection, its task running.
    Live(H1),
    /// Only the socket of one.
    Parked(Socket),
}

/// An HTTP/1.1 connection: the handle that sends on it, and how to park it.
pub(crate) struct H1 {
    pub(crate) tx: http1::SendRequest<Body>,
    /// Shared with the connection's task; `None` when it is never parked (TLS, an upgrade,
    /// parking off).
    park: Option<Arc<Park>>,
}

/// Asks an HTTP/1.1 connection's task to hand its socket back to the pool once the
/// connection ends, rather than close it.
#[derive(Default)]
struct Park {
    /// When it went idle, once the pool has asked.
    asked: Mutex<Option<Instant>>,
}

/// A connection ready to take a request.
pub(crate) enum Conn {
    /// With the moment it went idle in the pool (`None`: new).
    H1(H1, Option<Instant>),
    H2(http2::SendRequest<Body>),
    /// A parked socket that looked open, and when it went idle: it needs a new hyper
    /// connection ([`Pool::resume`]).
    Parked(Socket, Instant),
}

/// Returns an HTTP/1.1 connection to its pool when dropped, if it can take another request.
/// The proxy keeps it on the response body, so that happens when the body has been read.
pub(crate) struct Checkin {
    pool: Arc<Pool>,
    conn: Option<H1>,
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
    pub(crate) fn new(
        endpoint: &Endpoint,
        idle_timeout: Duration,
        park_after: Option<Duration>,
        max_idle: usize,
    ) -> Self {
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
            park_after,
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
        while let Some(idle) = state.idle.pop() {
            match idle.conn {
                // One that is not ready has been closed (or is closing) by its peer.
                Pooled::Live(h1) if h1.tx.is_ready() => {
                    return Some(Conn::H1(h1, Some(idle.since)));
                }
                Pooled::Live(_) => {}
                Pooled::Parked(io) if is_open(&io) => {
                    return Some(Conn::Parked(io, idle.since));
                }
                Pooled::Parked(_) => {}
            }
        }
        None
    }

    /// Runs a new HTTP/1.1 connection in its own task. With `parkable`, the pool may park
    /// it once it has been idle for the park delay.
    pub(crate) fn spawn_h1(
        self: &Arc<Self>,
        tx: http1::SendRequest<Body>,
        conn: http1::Connection<Io, Body>,
        parkable: bool,
    ) -> H1 {
        let park = (parkable && self.park_after.is_some()).then(Arc::<Park>::default);
        let Some(handle) = park.clone() else {
            spawn_conn(conn.with_upgrades(), "upstream connection failed");
            return H1 { tx, park };
        };
        let pool = Arc::downgrade(self);
        // NOTE: the connection runs without hyper's upgrade support (it would shut the
        // socket down when the connection ends, and the socket is what parking keeps), so
        // a parkable connection never carries an upgrade: those get connections of their
        // own. An unsolicited `101` just ends the connection.
        let mut conn = Some(conn);
        drop(tokio::spawn(std::future::poll_fn(move |cx| {
            let Some(running) = conn.as_mut() else {
                return Poll::Ready(());
            };
            match ready!(running.poll_without_shutdown(cx)) {
                Err(err) => tracing::debug!(error = %err, "upstream connection failed"),
                Ok(()) => {
                    if let Some(since) = handle.asked()
                        && let Some(pool) = pool.upgrade()
                        && let Some(ended) = conn.take()
                    {
                        let parts = ended.into_parts();
                        // Bytes the upstream sent unasked: not a socket to reuse.
                        if parts.read_buf.is_empty() {
                            pool.park(parts.io, since);
                        }
                    }
                }
            }
            // The connection (if not parked) closes with the task.
            Poll::Ready(())
        })));
        H1 { tx, park }
    }

    /// Starts a new hyper connection on a parked socket.
    pub(crate) async fn resume(
        self: &Arc<Self>,
        builder: &http1::Builder,
        socket: Socket,
    ) -> Result<H1, hyper::Error> {
        let io = Coalesce::new(MaybeHttpsStream::Http(socket));
        let (tx, conn) = builder.handshake(io).await?;
        Ok(self.spawn_h1(tx, conn, true))
    }

    /// Keeps the socket of a connection the pool asked to park.
    fn park(self: &Arc<Self>, io: Io, since: Instant) {
        let MaybeHttpsStream::Http(socket) = io.into_inner() else {
            return;
        };
        let mut state = self.lock();
        if state.idle.len() >= self.max_idle {
            return;
        }
        #[cfg(test)]
        PARKED.with(|n| n.set(n.get() + 1));
        // The stack is oldest first, and the connection has been idle since `since`.
        let at = state.idle.partition_point(|idle| idle.since <= since);
        state.idle.insert(
            at,
            Idle {
                conn: Pooled::Parked(socket),
                since,
            },
        );
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

    /// Puts an HTTP/1.1 connection that can take a request back on the stack.
    fn put(self: &Arc<Self>, conn: H1) {
        let mut state = self.lock();
        if state.idle.len() >= self.max_idle {
            return;
        }
        state.idle.push(Idle {
            conn: Pooled::Live(conn),
            since: Instant::now(),
        });
        self.reap_soon(&mut state);
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

/// Closes idle connections once they have been idle for the pool's timeout, parks those
/// idle for the park delay, and drops parked sockets the upstream has closed; ends when
/// the pool has no idle connection left or is gone.
async fn reap(pool: Weak<Pool>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let mut state = pool.lock();
            let now = Instant::now();
            let timeout = pool.idle_timeout;
            let park_at = pool.park_after.and_then(|after| now.checked_sub(after));
            let mut next = None::<Instant>;
            let mut soonest = |at: Instant| next = Some(next.map_or(at, |next| next.min(at)));
            state.idle.retain(|idle| {
                if now >= idle.since + timeout {
                    return false;
                }
                match &idle.conn {
                    Pooled::Live(h1) if h1.tx.is_closed() => return false,
                    Pooled::Live(H1 {
                        park: Some(park), ..
                    }) => {
                        if park_at.is_some_and(|at| idle.since <= at) {
                            // NOTE: asked before the entry (and with it the last handle
                            // that sends on the connection) is dropped: that drop is what
                            // ends the connection and makes its task look.
                            park.ask(idle.since);
                            return false;
                        }
                        if let Some(after) = pool.park_after {
                            soonest(idle.since + after);
                        }
                    }
                    Pooled::Live(_) => {}
                    Pooled::Parked(io) if !is_open(io) => return false,
                    // Looked at again a park delay from now.
                    Pooled::Parked(_) => soonest(now + pool.park_after.unwrap_or(timeout)),
                }
                soonest(idle.since + timeout);
                true
            });
            match next {
                Some(next) => next,
                None => {
                    state.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

/// Whether a parked socket is still open with nothing to read: the upstream has neither
/// closed it nor sent anything unasked. One non-blocking read, which tokio skips (answering
/// "would block" without a system call) until the socket has reported readable.
fn is_open(socket: &Socket) -> bool {
    let mut byte = [0u8; 1];
    matches!(socket.inner().try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Runs an upstream connection in its own task until it closes, logging how it failed.
///
/// NOTE: a `poll_fn` over the connection, not an `async` block awaiting it: the block
/// would hold the connection twice (as its captured value and inside the `.await`), which
/// doubles the task an idle pooled connection keeps (3,512 instead of 1,752 bytes for
/// HTTP/1.1).
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
thread_local! {
    /// How many connections this thread's pools have parked.
    pub(crate) static PARKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// === impl Park ===

impl Park {
    fn ask(&self, since: Instant) {
        *self.asked.lock().unwrap_or_else(PoisonError::into_inner) = Some(since);
    }

    /// When the connection went idle, if the pool asked for its socket.
    fn asked(&self) -> Option<Instant> {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

// === impl Checkin ===

impl Checkin {
    pub(crate) const fn new(pool: Arc<Pool>, conn: H1) -> Self {
        Self {
            pool,
            conn: Some(conn),
        }
    }
}

impl Drop for Checkin {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.tx.is_ready() {
            self.pool.put(conn);
        } else if !conn.tx.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The connection task has not caught up with the end of the exchange yet (the
            // request body may still be going out): wait for it off the request path.
            let pool = Arc::clone(&self.pool);
            drop(runtime.spawn(async move {
                if conn.tx.ready().await.is_ok() {
                    pool.put(conn);
                }
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gateway_core::Body;
    use gateway_core::test_util::{TestUpstream, body_string};
    use http::{Request, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tower::ServiceExt;

    use super::PARKED;
    use crate::{HttpClient, ReverseProxy, Upstream};

    const PARK_AFTER: Duration = Duration::from_millis(20);

    fn parked() -> usize {
        PARKED.with(std::cell::Cell::get)
    }

    fn proxy(url: &str, park_after: Option<Duration>) -> ReverseProxy {
        let client = HttpClient::builder()
            .pool_park_after(park_after)
            .build()
            .unwrap();
        ReverseProxy::builder(Upstream::single(url).unwrap())
            .client(client)
            .build()
            .unwrap()
    }

    /// One request through `proxy`, read to the end: (status, body).
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

    /// Waits until the pool has parked `n` connections in all (bounded: a pool that never
    /// parks fails the test).
    async fn until_parked(n: usize) {
        for _ in 0..200 {
            if parked() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} connections parked, expected {n}", parked());
    }

    #[tokio::test]
    async fn an_idle_connection_is_parked_and_carries_the_next_request() {
        let upstream = TestUpstream::echo().await;
        let proxy = proxy(&upstream.url(), Some(PARK_AFTER));
        let before = parked();
        assert_eq!(send(&proxy, "GET").await.0, StatusCode::OK);
        until_parked(before + 1).await;
        // Parked again after each request: the same socket every time.
        for round in 2..=3 {
            let (status, body) = send(&proxy, "POST").await;
            assert_eq!(status, StatusCode::OK);
            assert!(body.contains("payload"), "{body}");
            until_parked(before + round).await;
        }
        assert_eq!(upstream.connections(), 1);
    }

    #[tokio::test]
    async fn without_a_park_delay_idle_connections_are_never_parked() {
        let upstream = TestUpstream::echo().await;
        let proxy = proxy(&upstream.url(), None);
        let before = parked();
        assert_eq!(send(&proxy, "GET").await.0, StatusCode::OK);
        tokio::time::sleep(PARK_AFTER * 5).await;
        assert_eq!(send(&proxy, "GET").await.0, StatusCode::OK);
        assert_eq!(parked(), before);
        assert_eq!(upstream.connections(), 1);
    }

    /// Reads one request with a 7-byte body (what [`send`] sends) and answers `200 ok`.
    async fn answer_one(stream: &mut TcpStream) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let mut body = [0u8; 7];
        stream.read_exact(&mut body).await.unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
    }

    /// An upstream that answers one request per connection with `200 ok`, then does what
    /// `after` says with the connection once it has been parked.
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
                    // Let the pool park it, then close it or talk out of turn.
                    tokio::time::sleep(PARK_AFTER * 5).await;
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

    /// A parked socket the upstream closed, or wrote to unasked, is not used: a POST (which
    /// is never sent twice) gets a new connection and its answer.
    #[tokio::test]
    async fn a_parked_socket_the_upstream_closed_or_wrote_to_is_replaced() {
        for after in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale",
        ] {
            let (url, upstream) = one_shot_upstream(after).await;
            let proxy = proxy(&url, Some(PARK_AFTER));
            let before = parked();
            assert_eq!(send(&proxy, "POST").await, (StatusCode::OK, "ok".into()));
            until_parked(before + 1).await;
            // The upstream has closed it (or written to it) by now.
            tokio::time::sleep(PARK_AFTER * 10).await;
            assert_eq!(send(&proxy, "POST").await, (StatusCode::OK, "ok".into()));
            // Bounded: had the POST gone to the parked socket, no second connection comes.
            let accepted = tokio::time::timeout(Duration::from_secs(2), upstream).await;
            assert_eq!(accepted.unwrap().unwrap(), 2);
        }
    }

    /// The pool lets go of a parked socket once the upstream has closed its side, without
    /// waiting for a request to find out (or for the idle timeout).
    #[tokio::test]
    async fn a_parked_socket_the_upstream_closed_is_let_go_by_itself() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            answer_one(&mut stream).await;
            tokio::time::sleep(PARK_AFTER * 5).await;
            stream.shutdown().await.unwrap();
            // EOF once the gateway closes its side too.
            let mut byte = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await
        });
        let proxy = proxy(&url, Some(PARK_AFTER));
        let before = parked();
        assert_eq!(send(&proxy, "GET").await, (StatusCode::OK, "ok".into()));
        until_parked(before + 1).await;
        let closed = upstream.await.unwrap();
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    }
}
