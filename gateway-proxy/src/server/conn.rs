//! One accepted connection: TLS, the hyper connection, idle tracking, releasing idle
//! HTTP/1.1 connections, and graceful close.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::{BoxError, ConnectInfo, Drain};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::Service;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::park::{self, ParkIo};
use crate::io::Coalesce;

/// What every connection task shares.
pub(super) struct Shared {
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
    pub(super) header_read_timeout: Duration,
    pub(super) keep_alive_timeout: Duration,
    pub(super) release_idle_after: Option<Duration>,
    /// Above this many open connections, idle ones are released as soon as they are idle.
    pub(super) release_idle_above: usize,
    /// One permit per open connection, out of `max_connections`.
    pub(super) permits: Arc<Semaphore>,
    pub(super) max_connections: usize,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) drain: Drain,
    pub(super) local: SocketAddr,
}

/// Requests in flight, the last time the connection went idle, and what its hyper
/// connection was last seen doing.
pub(super) struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
    /// `Activity::*` bits: set and read by the connection's own task (the socket adapter,
    /// the service), hence relaxed.
    io: AtomicU8,
}

pub(super) async fn serve<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    shared: Arc<Shared>,
    graceful: watch::Receiver<bool>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let _ = stream.set_nodelay(true);
    let info = ConnectInfo {
        peer,
        local: shared.local,
        tls: shared.tls.is_some(),
    };
    if let Some(acceptor) = shared.tls.clone() {
        // Boxed: a TLS session is kilobytes of state, and plain connections should not
        // reserve room for it in their task.
        Box::pin(async move {
            let handshake =
                tokio::time::timeout(shared.header_read_timeout, acceptor.accept(stream));
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = Coalesce::new(TokioIo::new(stream));
            run(io, h2, info, service, &shared, graceful).await;
        })
        .await;
        return;
    }
    let h2 = match tokio::time::timeout(shared.header_read_timeout, sniff_h2c(&stream)).await {
        Ok(Ok(Some(h2))) => h2,
        // Closed, or failed, before sending a byte.
        Ok(Ok(None) | Err(_)) => return,
        Err(_) => {
            tracing::debug!(%peer, "no request within the header-read timeout");
            return;
        }
    };
    if h2 {
        let io = Coalesce::new(TokioIo::new(stream));
        run(io, true, info, service, &shared, graceful).await;
    } else {
        run_http1(stream, info, service, &shared, graceful).await;
    }
}

/// Whether a plain-text client opens with the HTTP/2 connection preface (h2c with prior
/// knowledge), judged from the first bytes without consuming them; `None` when it closed
/// before sending anything.
///
/// No HTTP/1.1 method starts with `PRI` (RFC 9113 §3.4 reserves it for the preface), and
/// three bytes tell it from `POST`, `PUT`, `PATCH` and `PROPFIND`.
async fn sniff_h2c(stream: &TcpStream) -> io::Result<Option<bool>> {
    const PREFIX: &[u8] = b"PRI";
    let mut buf = [0u8; PREFIX.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf[..n] != PREFIX[..n] {
            return Ok(Some(false));
        }
        if n == PREFIX.len() {
            return Ok(Some(true));
        }
        // A prefix of `PRI` so far: peeking again returns at once with the same bytes, so
        // wait a little for more (the caller's timeout bounds this).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The connection's view of its requests, shared with its service and response bodies.
fn activity() -> Arc<Activity> {
    Arc::new(Activity {
        started: Instant::now(),
        in_flight: AtomicUsize::new(0),
        idle_since_ms: AtomicU64::new(0),
        io: AtomicU8::new(0),
    })
}

/// HTTP/2 (either transport) and HTTP/1.1 over TLS: one hyper connection for the
/// connection's lifetime.
async fn run<I, S, B>(
    io: I,
    h2: bool,
    info: ConnectInfo,
    service: S,
    shared: &Shared,
    mut graceful: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = activity();
    let svc = ConnService::new(service, info, shared, &activity);
    let idle = if h2 {
        Idle {
            limit: shared.keep_alive_timeout,
            hard: false,
            release_after: None,
        }
    } else {
        // A TLS session keeps its own buffers whatever hyper does, so the connection is
        // not released when idle (see `run_http1`).
        shared.http1_idle(None)
    };
    let scope = Scope {
        shared,
        activity: &activity,
        info,
        idle,
    };
    let mut timer = std::pin::pin!(tokio::time::sleep(idle.period()));
    if h2 {
        // Boxed: HTTP/2 connections are few and their state is large; keeping it out of
        // line keeps every HTTP/1.1 connection task small.
        let mut conn = Box::pin(shared.http2.serve_connection(io, svc));
        drive(&mut conn, scope, &mut graceful, timer.as_mut()).await;
    } else {
        let conn = shared.http1.serve_connection(io, svc).with_upgrades();
        let mut conn = std::pin::pin!(conn);
        drive(&mut conn, scope, &mut graceful, timer.as_mut()).await;
    }
}

/// Plain HTTP/1.1. Once the connection has had no request in flight for the release
/// delay (at once while the server is crowded), its hyper connection (read and write
/// buffers, parser state: about 17 KiB) is taken apart and the task waits for the next
/// request with nothing but the socket, as nginx and HAProxy do with idle keep-alive
/// connections; the next request gets a new hyper connection on the same socket.
async fn run_http1<S, B>(
    stream: TcpStream,
    info: ConnectInfo,
    service: S,
    shared: &Shared,
    mut graceful: watch::Receiver<bool>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = activity();
    let idle = shared.http1_idle(shared.release_idle_after);
    let mut timer = std::pin::pin!(tokio::time::sleep(idle.period()));
    let mut io = ParkIo::new(TokioIo::new(stream), Arc::clone(&activity));
    let mut svc = ConnService::new(service, info, shared, &activity);
    let scope = Scope {
        shared,
        activity: &activity,
        info,
        idle,
    };
    loop {
        // Boxed: the task waits for the next request with only the socket, so it should
        // not keep room for a hyper connection (about 800 bytes) while it does.
        let mut conn = Box::new(shared.http1.serve_connection(io, svc).with_upgrades());
        let driven = drive(&mut *conn, scope, &mut graceful, timer.as_mut());
        if let Driven::Done = driven.await {
            return;
        }
        // NOTE: moved out in a block of its own, so the box is freed here and not at the
        // end of the iteration, after the wait.
        let conn = {
            let boxed = conn;
            *boxed
        };
        let Some(parts) = conn.into_parts() else {
            // Upgraded: only a finished connection is, and it never parks.
            return;
        };
        (io, svc) = (parts.io, parts.service);
        // NOTE: even empty, `read_buf` may share hyper's whole read buffer; it must not
        // live on into the wait below.
        let read_ahead = parts.read_buf;
        if !read_ahead.is_empty() {
            // The start of the next request head: hand it to the next connection.
            io.rewind(read_ahead);
            activity.flag(Activity::HELD, true);
            continue;
        }
        drop(read_ahead);
        #[cfg(test)]
        park::RELEASED.with(|n| n.set(n.get() + 1));
        tracing::trace!(peer = %info.peer, "idle connection released its buffers");
        // Released only with no request in flight, so it is idle; the next head is due
        // within the limit of its going idle.
        let deadline = activity.idle_since().unwrap_or_else(Instant::now) + idle.limit;
        if !park::wait(io.socket(), deadline, &mut graceful, timer.as_mut()).await {
            return;
        }
        // The next request is arriving: look again a period from now, or at the
        // deadline for its head, whichever comes first.
        timer
            .as_mut()
            .reset(deadline.min(Instant::now() + idle.period()));
    }
}

/// A hyper connection of either protocol.
trait Connection: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Connection for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        Self::graceful_shutdown(self);
    }
}

impl<I, S, B> Connection for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        Self::graceful_shutdown(self);
    }
}

impl<C: Connection + ?Sized> Connection for Pin<Box<C>> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful_shutdown();
    }
}

impl<C: Connection + ?Sized> Connection for Pin<&mut C> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful_shutdown();
    }
}

/// How long a connection may go without a request in flight, and what happens then.
#[derive(Clone, Copy)]
struct Idle {
    limit: Duration,
    /// Drop the connection (HTTP/1.1: nothing to say; a partial head is abandoned) rather
    /// than shut it down gracefully (HTTP/2: `GOAWAY`).
    hard: bool,
    /// Release the hyper connection after this long without a request in flight.
    release_after: Option<Duration>,
}

/// What [`drive`] looks at besides the connection.
#[derive(Clone, Copy)]
struct Scope<'a> {
    shared: &'a Shared,
    activity: &'a Activity,
    info: ConnectInfo,
    idle: Idle,
}

/// How [`drive`] ended.
enum Driven {
    /// The connection is finished.
    Done,
    /// The connection has been idle for the release delay and may be taken apart.
    Release,
}

/// Runs `conn` until it ends, closing it once it has gone without a request in flight
/// for the idle limit, or gracefully when the server drains; or until it has been idle
/// long enough to be released.
async fn drive<C>(
    conn: &mut C,
    scope: Scope<'_>,
    graceful: &mut watch::Receiver<bool>,
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Driven
where
    C: Connection + Unpin,
{
    let Scope {
        shared,
        activity,
        info,
        idle,
    } = scope;
    // One timer per connection, moved only when it fires: nothing per request.
    let mut closing = false;
    loop {
        let until = Until {
            conn: &mut *conn,
            activity,
            eager: (idle.release_after.is_some() && !closing).then_some((idle, shared)),
        };
        tokio::select! {
            res = until => {
                let Some(res) = res else {
                    return Driven::Release;
                };
                if let Err(err) = res {
                    tracing::debug!(peer = %info.peer, error = %err, "connection ended with an error");
                }
                return Driven::Done;
            }
            _ = graceful.wait_for(|draining| *draining), if !closing => {
                Pin::new(&mut *conn).graceful_shutdown();
                closing = true;
            }
            () = timer.as_mut(), if !closing => {
                let now = Instant::now();
                let Some(since) = activity.idle_since() else {
                    // A request is in flight: look again a period later.
                    timer.as_mut().reset(idle.next_check(None, now));
                    continue;
                };
                if since + idle.limit <= now {
                    if idle.hard {
                        tracing::debug!(peer = %info.peer, "no request head within the idle limit; closing");
                        return Driven::Done;
                    }
                    tracing::trace!(peer = %info.peer, "closing idle keep-alive connection");
                    Pin::new(&mut *conn).graceful_shutdown();
                    closing = true;
                    continue;
                }
                if idle.release_after.is_some_and(|after| since + after <= now)
                    && activity.releasable()
                {
                    return Driven::Release;
                }
                timer.as_mut().reset(idle.next_check(Some(since), now));
            }
        }
    }
}

/// Polls a connection; completes with `None` as soon as the connection waits with
/// nothing that releasing it would lose, if it may be released at once (`eager`: no
/// release delay, or a crowded server).
struct Until<'a, C> {
    conn: &'a mut C,
    activity: &'a Activity,
    eager: Option<(Idle, &'a Shared)>,
}

impl<C: Connection + Unpin> Future for Until<'_, C> {
    type Output = Option<Result<(), hyper::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match Pin::new(&mut *this.conn).poll(cx) {
            Poll::Ready(res) => Poll::Ready(Some(res)),
            Poll::Pending
                if this.eager.is_some_and(|(idle, shared)| {
                    (idle.release_after == Some(Duration::ZERO) || shared.crowded())
                        && this.activity.releasable()
                }) =>
            {
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

// === impl Idle ===

impl Idle {
    /// How often the timer looks at a connection with a request in flight.
    fn period(self) -> Duration {
        match self.release_after {
            // Released as soon as it is idle (see `Until`), not by the timer.
            Some(Duration::ZERO) | None => self.limit,
            Some(after) => after.min(self.limit),
        }
    }

    /// When to look at the connection next, given since when it has been idle.
    ///
    /// An idle connection is looked at when it may be released, and at its deadline; one
    /// with a request in flight a period later. (A connection that was idle but not
    /// releasable, because hyper was mid-message, is looked at again at its deadline
    /// only: the moment it becomes releasable is not observed.)
    fn next_check(self, idle_since: Option<Instant>, now: Instant) -> Instant {
        let Some(since) = idle_since else {
            return now + self.period();
        };
        let deadline = since + self.limit;
        match self.release_after {
            Some(after) if !after.is_zero() && since + after > now => deadline.min(since + after),
            _ => deadline,
        }
    }
}

impl Shared {
    /// Whether so many connections are open that idle ones release their buffers at once.
    fn crowded(&self) -> bool {
        let open = self.max_connections - self.permits.available_permits();
        open > self.release_idle_above
    }

    /// The idle policy of HTTP/1.1 connections: the next request head must be complete
    /// within the header-read timeout of the connection going idle (or opening). hyper
    /// could time the head itself, but with a timer armed and dropped for every request;
    /// the idle check costs nothing per request.
    fn http1_idle(&self, release_after: Option<Duration>) -> Idle {
        Idle {
            limit: self.keep_alive_timeout.min(self.header_read_timeout),
            hard: true,
            release_after,
        }
    }
}

// === impl Activity ===

impl Activity {
    /// hyper's last read found no data: it waits for the client.
    pub(super) const READ_BLOCKED: u8 = 1;
    /// hyper wrote since its last completed flush.
    pub(super) const WRITE_DIRTY: u8 = 2;
    /// The last request came with a body. hyper may still be reading or discarding it
    /// after the response, and nothing outside hyper can tell when it is done.
    const BODY: u8 = 4;
    /// The start of a head was handed to a new connection: keep that one until the head
    /// is complete (releasing it again would only hand the same bytes on, forever).
    const HELD: u8 = 8;

    fn begin(&self, body: bool) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.flag(Self::BODY, body);
        self.flag(Self::HELD, false);
    }

    fn end(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Sets or clears `bit`.
    pub(super) fn flag(&self, bit: u8, on: bool) {
        let flags = self.io.load(Ordering::Relaxed);
        let next = if on { flags | bit } else { flags & !bit };
        if next != flags {
            self.io.store(next, Ordering::Relaxed);
        }
    }

    /// Since when the connection has had no request in flight; `None` while it has one.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.started + since)
    }

    /// Whether the hyper connection, as last polled, holds nothing that taking it apart
    /// would lose: no request in flight, no request body that may be unread, everything
    /// written flushed, and a read waiting for the client. (A read-ahead start of the next
    /// head is not lost either: it is handed to the next connection.)
    fn releasable(&self) -> bool {
        let flags = self.io.load(Ordering::Relaxed);
        self.in_flight.load(Ordering::Acquire) == 0
            && flags & (Self::BODY | Self::WRITE_DIRTY | Self::HELD) == 0
            && flags & Self::READ_BLOCKED != 0
    }
}

/// Marks one request in flight until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The hyper service of one connection: adds the connection's extensions, and tracks
/// requests in flight for the idle limit.
struct ConnService<S> {
    inner: S,
    info: ConnectInfo,
    drain: Drain,
    activity: Arc<Activity>,
}

impl<S> ConnService<S> {
    fn new(inner: S, info: ConnectInfo, shared: &Shared, activity: &Arc<Activity>) -> Self {
        Self {
            inner,
            info,
            drain: shared.drain.clone(),
            activity: Arc::clone(activity),
        }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = BoxError;
    type Future = ConnFuture<S>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if req.extensions().is_empty() {
            *req.extensions_mut() = roomy_extensions();
        }
        req.extensions_mut().insert(self.info);
        req.extensions_mut().insert(self.drain.clone());
        self.activity
            .begin(!http_body::Body::is_end_stream(req.body()));
        ConnFuture {
            fut: self.inner.clone().oneshot(req),
            guard: Some(InFlight(Arc::clone(&self.activity))),
        }
    }
}

/// Empty extensions with room for seven entries.
///
/// A request's extensions start as a table of three entries, and a gateway inserts more
/// than that (the two above, the client IP, the route, an identity...): the fourth insert
/// would grow the table, allocating a new one and moving the others, on every request.
/// Cloning an empty table of the right size costs the same allocation as the first insert.
fn roomy_extensions() -> http::Extensions {
    #[derive(Clone)]
    struct Slot<const N: usize>;

    thread_local! {
        static ROOMY: http::Extensions = {
            let mut ext = http::Extensions::new();
            ext.insert(Slot::<0>);
            ext.insert(Slot::<1>);
            ext.insert(Slot::<2>);
            ext.insert(Slot::<3>);
            // NOTE: `clear` keeps the table's allocation, and a clone copies its size.
            ext.clear();
            ext
        };
    }
    ROOMY.with(http::Extensions::clone)
}

pin_project! {
    struct ConnFuture<S>
    where
        S: Service<Request<Incoming>>,
    {
        #[pin]
        fut: Oneshot<S, Request<Incoming>>,
        guard: Option<InFlight>,
    }
}

impl<S, B> Future for ConnFuture<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.fut.poll(cx)).map_err(Into::into)?;
        let guard = this.guard.take();
        Poll::Ready(Ok(res.map(|inner| TrackedBody {
            inner,
            _guard: guard,
        })))
    }
}

pin_project! {
    /// A response body that keeps its request counted in flight until it is done.
    pub(super) struct TrackedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
