//! One accepted connection: TLS, the hyper connection, idle tracking and graceful close.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::Service;
use tower::ServiceExt;
use tower::util::Oneshot;

use crate::io::Coalesce;

/// What every connection task shares.
pub(super) struct Shared {
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
    pub(super) header_read_timeout: Duration,
    pub(super) keep_alive_timeout: Duration,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) drain: Drain,
    pub(super) local: SocketAddr,
}

/// Requests in flight and the last time the connection went idle.
struct Activity {
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
    let io = Coalesce::new(TokioIo::new(stream));
    run(io, h2, info, service, &shared, graceful).await;
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

async fn run<I, S, B>(
    io: I,
    h2: bool,
    info: ConnectInfo,
    service: S,
    shared: &Shared,
    graceful: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity {
        started: Instant::now(),
        in_flight: AtomicUsize::new(0),
        idle_since_ms: AtomicU64::new(0),
    });
    let svc = ConnService {
        inner: service,
        info,
        drain: shared.drain.clone(),
        activity: Arc::clone(&activity),
    };
    if h2 {
        let idle = Idle {
            limit: shared.keep_alive_timeout,
            hard: false,
        };
        // Boxed: HTTP/2 connections are few and their state is large; keeping it out of
        // line keeps every HTTP/1.1 connection task small.
        let conn = Box::pin(shared.http2.serve_connection(io, svc));
        drive(conn, &activity, info, idle, graceful).await;
    } else {
        // The next request head must be complete within the header-read timeout of the
        // connection going idle (or opening). hyper could time the head itself, but with a
        // timer armed and dropped for every request; the idle check below costs nothing
        // per request.
        let idle = Idle {
            limit: shared.keep_alive_timeout.min(shared.header_read_timeout),
            hard: true,
        };
        let conn = shared.http1.serve_connection(io, svc).with_upgrades();
        drive(std::pin::pin!(conn), &activity, info, idle, graceful).await;
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

/// How long a connection may go without a request in flight, and how it is then closed.
#[derive(Clone, Copy)]
struct Idle {
    limit: Duration,
    /// Drop the connection (HTTP/1.1: nothing to say; a partial head is abandoned) rather
    /// than shut it down gracefully (HTTP/2: `GOAWAY`).
    hard: bool,
}

/// Runs `conn` to the end, closing it once it has gone without a request in flight for
/// the idle limit, or gracefully when the server drains.
async fn drive<C>(
    mut conn: C,
    activity: &Activity,
    info: ConnectInfo,
    idle: Idle,
    mut graceful: watch::Receiver<bool>,
) where
    C: Connection + Unpin,
{
    // One timer per connection, moved only when it fires: nothing per request.
    let timer = tokio::time::sleep(idle.limit);
    let mut timer = std::pin::pin!(timer);
    let mut closing = false;
    loop {
        tokio::select! {
            res = &mut conn => {
                if let Err(err) = res {
                    tracing::debug!(peer = %info.peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = graceful.wait_for(|draining| *draining), if !closing => {
                Pin::new(&mut conn).graceful_shutdown();
                closing = true;
            }
            () = timer.as_mut(), if !closing => {
                match activity.idle_deadline(idle.limit) {
                    Some(deadline) if deadline > Instant::now() => timer.as_mut().reset(deadline),
                    Some(_) if idle.hard => {
                        tracing::debug!(peer = %info.peer, "no request head within the idle limit; closing");
                        return;
                    }
                    Some(_) => {
                        tracing::trace!(peer = %info.peer, "closing idle keep-alive connection");
                        Pin::new(&mut conn).graceful_shutdown();
                        closing = true;
                    }
                    // A request is in flight: look again a full period later.
                    None => timer.as_mut().reset(Instant::now() + idle.limit),
                }
            }
        }
    }
}

// === impl Activity ===

impl Activity {
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// When the connection becomes idle for too long, or `None` while a request is in flight.
    fn idle_deadline(&self, keep_alive: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.started + since + keep_alive)
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

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = BoxError;
    type Future = ConnFuture<S>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
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
