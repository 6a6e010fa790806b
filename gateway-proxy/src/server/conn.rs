//! One accepted connection: TLS, the protocol, idle tracking and graceful close.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::{Body, BoxError, ConnectInfo, Drain};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::Service;
use tower::ServiceExt;
use tower::util::Oneshot;

use super::h1::{self, Limits, Transport};
use crate::io::Coalesce;

/// What every connection task shares.
pub(super) struct Shared {
    pub(super) http2: http2::Builder<TokioExecutor>,
    pub(super) limits: Limits,
    pub(super) header_read_timeout: Duration,
    pub(super) keep_alive_timeout: Duration,
    /// One permit per open connection.
    pub(super) permits: Arc<Semaphore>,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) drain: Drain,
    pub(super) local: SocketAddr,
}

/// Requests in flight, and the last time the connection went idle.
pub(super) struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

pub(super) async fn serve<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    shared: Arc<Shared>,
    graceful: watch::Receiver<bool>,
) where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
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
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                run_h2(
                    Coalesce::new(TokioIo::new(stream)),
                    info,
                    service,
                    &shared,
                    graceful,
                )
                .await;
            } else {
                run_h1(stream, info, service, &shared, graceful).await;
            }
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
        Box::pin(run_h2(io, info, service, &shared, graceful)).await;
    } else {
        run_h1(stream, info, service, &shared, graceful).await;
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
    })
}

/// HTTP/1.1, on the gateway's own connection (see `h1`): the next request head must be
/// complete within the header-read timeout of the connection opening or going idle.
async fn run_h1<I, S, B>(
    io: I,
    info: ConnectInfo,
    service: S,
    shared: &Shared,
    mut graceful: watch::Receiver<bool>,
) where
    I: Transport,
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = activity();
    let idle = Idle {
        limit: shared.keep_alive_timeout.min(shared.header_read_timeout),
        hard: true,
    };
    let scope = Scope {
        activity: &activity,
        info,
        idle,
    };
    let mut timer = std::pin::pin!(tokio::time::sleep(idle.limit));
    let conn = h1::Conn::new(
        io,
        service,
        shared.limits,
        info,
        shared.drain.clone(),
        Arc::clone(&activity),
    );
    let mut conn = std::pin::pin!(conn);
    drive(&mut conn, scope, &mut graceful, timer.as_mut()).await;
}

/// HTTP/2 (either transport): hyper's connection, with the requests' bodies passed on as
/// [`Body`].
async fn run_h2<I, S, B>(
    io: I,
    info: ConnectInfo,
    service: S,
    shared: &Shared,
    mut graceful: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = activity();
    let svc = ConnService::new(service, info, shared, &activity);
    let idle = Idle {
        limit: shared.keep_alive_timeout,
        hard: false,
    };
    let scope = Scope {
        activity: &activity,
        info,
        idle,
    };
    let mut timer = std::pin::pin!(tokio::time::sleep(idle.limit));
    // Boxed: HTTP/2 connections are few and their state is large.
    let mut conn = Box::pin(shared.http2.serve_connection(io, svc));
    drive(&mut conn, scope, &mut graceful, timer.as_mut()).await;
}

/// A connection of either protocol.
pub(super) trait Connection: Future {
    /// Finishes what is in flight, takes nothing new, then closes.
    fn graceful_shutdown(self: Pin<&mut Self>);
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
}

/// What [`drive`] looks at besides the connection.
#[derive(Clone, Copy)]
struct Scope<'a> {
    activity: &'a Activity,
    info: ConnectInfo,
    idle: Idle,
}

/// Runs `conn` until it ends, closing it once it has gone without a request in flight
/// for the idle limit, or gracefully when the server drains.
async fn drive<C, E>(
    conn: &mut C,
    scope: Scope<'_>,
    graceful: &mut watch::Receiver<bool>,
    mut timer: Pin<&mut tokio::time::Sleep>,
) where
    C: Connection<Output = Result<(), E>> + Unpin,
    E: fmt::Display,
{
    let Scope {
        activity,
        info,
        idle,
    } = scope;
    let mut drained = std::pin::pin!(graceful.wait_for(|draining| *draining));
    // One timer per connection, moved only when it fires: nothing per request.
    let mut closing = false;
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(res) = Pin::new(&mut *conn).poll(cx) {
                return Poll::Ready(Event::Done(res));
            }
            if closing {
                return Poll::Pending;
            }
            // NOTE: while a request is in flight the idle limit cannot be due, and an
            // HTTP/1.1 connection closes after its request anyway once the server drains:
            // both are looked at when the connection is idle again, not at every wake-up
            // of a busy connection. (The timer and the drain signal keep the wakers they
            // were last polled with.)
            let busy = activity.idle_since().is_none();
            if busy && idle.hard {
                return Poll::Pending;
            }
            if drained.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Drain);
            }
            if !busy && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Done(res) => {
                if let Err(err) = res {
                    tracing::debug!(peer = %info.peer, error = %err, "connection ended with an error");
                }
                return;
            }
            Event::Drain => {
                Pin::new(&mut *conn).graceful_shutdown();
                closing = true;
            }
            Event::Timer => {
                let now = Instant::now();
                let Some(since) = activity.idle_since() else {
                    timer.as_mut().reset(now + idle.limit);
                    continue;
                };
                if since + idle.limit <= now {
                    if idle.hard {
                        tracing::debug!(peer = %info.peer, "no request head within the idle limit; closing");
                        return;
                    }
                    tracing::trace!(peer = %info.peer, "closing idle keep-alive connection");
                    Pin::new(&mut *conn).graceful_shutdown();
                    closing = true;
                    continue;
                }
                timer.as_mut().reset(since + idle.limit);
            }
        }
    }
}

/// What [`drive`] woke up for.
enum Event<E> {
    Done(Result<(), E>),
    Drain,
    Timer,
}

// === impl Activity ===

impl Activity {
    pub(super) fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn end(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Since when the connection has had no request in flight; `None` while it has one.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.started + since)
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
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = BoxError;
    type Future = ConnFuture<S>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(Body::from);
        if req.extensions().is_empty() {
            *req.extensions_mut() = crate::buffers::extensions();
        }
        req.extensions_mut().insert(self.info);
        req.extensions_mut().insert(self.drain.clone());
        self.activity.begin();
        ConnFuture {
            fut: self.inner.clone().oneshot(req),
            guard: Some(InFlight(Arc::clone(&self.activity))),
        }
    }
}

pin_project! {
    struct ConnFuture<S>
    where
        S: Service<Request<Body>>,
    {
        #[pin]
        fut: Oneshot<S, Request<Body>>,
        guard: Option<InFlight>,
    }
}

impl<S, B> Future for ConnFuture<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
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
