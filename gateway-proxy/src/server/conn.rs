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

use bytes::{Bytes, BytesMut};
use gateway_core::{Body, BoxError, ConnectInfo, Drain};
use http::header::{CONTENT_LENGTH, COOKIE, HeaderValue};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt as _;
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
use crate::buffers;
use crate::h1::head::parse_length;
use crate::io::{Coalesce, Rewind};
use gateway_core::time::deadline;

/// What every connection task shares.
pub(super) struct ConnShared {
    pub(super) http2: http2::Builder<TokioExecutor>,
    pub(super) limits: Limits,
    pub(super) header_read_timeout: Duration,
    pub(super) keep_alive_timeout: Duration,
    /// One permit per open connection.
    pub(super) permits: Arc<Semaphore>,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) drain: Drain,
    pub(super) local: SocketAddr,
    pub(super) metrics: Option<super::ConnMetrics>,
}

/// An HTTP/2 connection's requests in flight, and the last time it went idle. (An
/// HTTP/1.1 connection knows from its own state: see `h1::Conn`.)
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

pub(super) async fn serve<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    shared: Arc<ConnShared>,
    graceful: watch::Receiver<bool>,
) where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // The header-read timeout counts from here: the TLS handshake or the protocol sniff,
    // then the first head, all within it.
    let opened = Instant::now();
    let _ = stream.set_nodelay(true);
    let info = ConnectInfo {
        peer,
        local: shared.local,
        tls: shared.tls.is_some(),
    };
    if let Some(acceptor) = shared.tls.clone() {
        // Boxed: a TLS session is kilobytes of state, and plain connections should not
        // reserve room for it in their task.
        let tls = serve_tls(stream, &acceptor, opened, info, service, &shared, graceful);
        Box::pin(tls).await;
        return;
    }
    let sniffed = tokio::time::timeout(shared.header_read_timeout, sniff(&stream)).await;
    let (protocol, first) = match sniffed {
        Ok(Ok(Some(sniffed))) => sniffed,
        // Closed, or failed, before sending a byte.
        Ok(Ok(None) | Err(_)) => return,
        Err(_) => {
            tracing::debug!(%peer, "no request within the header-read timeout");
            return;
        }
    };
    match protocol {
        Sniffed::Http1 => run_h1(stream, first, opened, info, service, &shared, graceful).await,
        Sniffed::Http2 => {
            let io = Coalesce::new(TokioIo::new(Rewind::new(stream, first.freeze())));
            Box::pin(run_h2(io, opened, info, service, &shared, graceful)).await;
        }
        Sniffed::Neither => {
            buffers::give(first);
            tracing::debug!(%peer, "neither an HTTP/1.1 request nor the HTTP/2 preface");
            refuse_preface(stream, shared.header_read_timeout).await;
        }
    }
}

/// TLS: the handshake, within the header-read timeout, then the protocol ALPN chose.
async fn serve_tls<S, B>(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    opened: Instant,
    info: ConnectInfo,
    service: S,
    shared: &ConnShared,
    graceful: watch::Receiver<bool>,
) where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let peer = info.peer;
    let handshake = tokio::time::timeout(shared.header_read_timeout, acceptor.accept(stream));
    let stream = match handshake.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "TLS handshake failed");
            if let Some(m) = &shared.metrics {
                m.tls_failures.inc();
            }
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            if let Some(m) = &shared.metrics {
                m.tls_failures.inc();
            }
            return;
        }
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let io = Coalesce::new(TokioIo::new(stream));
        run_h2(io, opened, info, service, shared, graceful).await;
    } else {
        let first = BytesMut::new();
        run_h1(stream, first, opened, info, service, shared, graceful).await;
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a plain-text client speaks, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    Http1,
    /// h2c with prior knowledge.
    Http2,
    /// Started like the preface and then was not it, or a first line that is not an
    /// HTTP/1.x request line.
    Neither,
}

/// Tells h2c prior knowledge (`PRI * HTTP/2.0…`) from HTTP/1.1 by a plain-text client's
/// first bytes, which are returned with the answer for the protocol to read first; `None`
/// when it closed before sending anything.
///
/// No HTTP/1.1 method starts with `PRI` (RFC 9113 §3.4 reserves it for the preface): three
/// bytes tell it from `POST`, `PUT`, `PATCH` and `PROPFIND`. A client that starts with them
/// must then send the whole preface; one that does not is refused as HTTP/2 refuses an
/// invalid preface, with a connection error of type PROTOCOL_ERROR (`refuse_preface`). So is
/// a client whose first line, complete in what it has sent, does not end in `HTTP/`: it
/// does not speak HTTP/1.1, and an HTTP/1.1 error page means nothing to it (h2spec 3.5/2
/// opens with `INVALID CONNECTION PREFACE`). HTTP/1.1 requests are handed on as soon as
/// they cannot be the preface, usually after the first read.
///
/// NOTE: the bytes are read, not peeked: a peek returns at once with the same bytes for
/// as long as no more arrive, so a client that sends `P` and stops would have the sniff
/// spin (it once slept 1 ms between peeks: a thousand such clients cost most of a core).
async fn sniff(stream: &TcpStream) -> io::Result<Option<(Sniffed, BytesMut)>> {
    let mut buf = BytesMut::new();
    loop {
        stream.readable().await?;
        if buf.capacity() == 0 {
            // Taken once the client has sent something, as a connection's read buffer is.
            buf = buffers::take();
        }
        let eof = match stream.try_read_buf(&mut buf) {
            Ok(0) if buf.is_empty() => {
                buffers::give(buf);
                return Ok(None);
            }
            Ok(0) => true,
            Ok(_) => false,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        };
        if let Some(sniffed) = judge(&buf, eof) {
            return Ok(Some((sniffed, buf)));
        }
    }
}

/// What the first bytes a client sent say it speaks; `None` while they could still be the
/// preface.
fn judge(first: &[u8], eof: bool) -> Option<Sniffed> {
    let n = first.len().min(PREFACE.len());
    if first[..n] == PREFACE[..n] {
        return match n {
            24 => Some(Sniffed::Http2),
            _ if eof => Some(if n < 3 {
                Sniffed::Http1
            } else {
                Sniffed::Neither
            }),
            _ => None,
        };
    }
    if n >= 3 && first.starts_with(b"PRI") {
        return Some(Sniffed::Neither);
    }
    // The request line, if it is all here: its last word is its version.
    let Some(end) = first.iter().position(|&b| b == b'\n') else {
        return Some(Sniffed::Http1);
    };
    let line = &first[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    // An empty line before the request line is allowed (RFC 9112 §2.2).
    if line.is_empty() || version.starts_with(b"HTTP/") {
        Some(Sniffed::Http1)
    } else {
        Some(Sniffed::Neither)
    }
}

/// Refuses a client that is not speaking HTTP/1.1 and sent an invalid HTTP/2 preface: the
/// server's preface (an empty SETTINGS frame), then GOAWAY with PROTOCOL_ERROR (RFC 9113
/// §3.4, §5.4.1), then close. Bounded by `limit`, as a client that reads nothing must not
/// keep the connection.
async fn refuse_preface(mut stream: TcpStream, limit: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DEBUG: &[u8] = b"invalid connection preface";
    const FRAMES: [u8; 9 + 9 + 8 + DEBUG.len()] = {
        let mut out = [0u8; 9 + 9 + 8 + DEBUG.len()];
        // SETTINGS: length 0, type 0x4, no flags, stream 0.
        out[3] = 0x4;
        // GOAWAY: length 8 + debug, type 0x7, stream 0; last stream 0, PROTOCOL_ERROR (0x1).
        out[9 + 2] = (8 + DEBUG.len()) as u8;
        out[9 + 3] = 0x7;
        out[9 + 9 + 7] = 0x1;
        let mut i = 0;
        while i < DEBUG.len() {
            out[9 + 9 + 8 + i] = DEBUG[i];
            i += 1;
        }
        out
    };
    let refuse = async {
        stream.write_all(&FRAMES).await?;
        stream.shutdown().await?;
        // What the client sent meanwhile is read and dropped (up to a bound), so that
        // closing with it unread does not reset the connection before the GOAWAY is read.
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(limit, refuse).await;
}

/// An HTTP/2 connection's view of its requests, shared with its service and response
/// bodies; idle since `opened`.
fn activity(opened: Instant) -> Arc<Activity> {
    Arc::new(Activity {
        started: opened,
        in_flight: AtomicUsize::new(0),
        idle_since_ms: AtomicU64::new(0),
    })
}

/// HTTP/1.1, on the gateway's own connection (see `h1`): the next request head must be
/// complete within the header-read timeout of the connection opening or going idle.
async fn run_h1<I, S, B>(
    io: I,
    first: BytesMut,
    opened: Instant,
    info: ConnectInfo,
    service: S,
    shared: &ConnShared,
    mut graceful: watch::Receiver<bool>,
) where
    I: Transport,
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let idle = IdleLimit {
        limit: shared.keep_alive_timeout.min(shared.header_read_timeout),
        hard: true,
    };
    let scope = Scope { info, idle };
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline(opened, idle.limit)));
    let conn = h1::Conn::new(
        io,
        first,
        service,
        shared.limits,
        info,
        shared.drain.clone(),
        opened,
    );
    let mut conn = std::pin::pin!(conn);
    drive(&mut conn, scope, &mut graceful, timer.as_mut()).await;
}

/// HTTP/2 (either transport): hyper's connection, with the requests' bodies passed on as
/// [`Body`].
async fn run_h2<I, S, B>(
    io: I,
    opened: Instant,
    info: ConnectInfo,
    service: S,
    shared: &ConnShared,
    mut graceful: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = activity(opened);
    let svc = ConnService::new(service, info, shared, &activity);
    let idle = IdleLimit {
        limit: shared.keep_alive_timeout,
        hard: false,
    };
    let scope = Scope { info, idle };
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline(opened, idle.limit)));
    let mut conn = H2 {
        // Boxed: HTTP/2 connections are few and their state is large.
        conn: Box::pin(shared.http2.serve_connection(io, svc)),
        activity,
    };
    drive(&mut conn, scope, &mut graceful, timer.as_mut()).await;
}

/// A connection of either protocol.
pub(super) trait Connection: Future {
    /// Finishes what is in flight, takes nothing new, then closes.
    fn graceful_shutdown(self: Pin<&mut Self>);

    /// Since when the connection has had no request in flight; `None` while it has one.
    fn idle_since(&self) -> Option<Instant>;
}

impl<C: Connection + ?Sized> Connection for Pin<&mut C> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().as_mut().graceful_shutdown();
    }

    fn idle_since(&self) -> Option<Instant> {
        (**self).idle_since()
    }
}

/// hyper's HTTP/2 connection, with its requests counted: they run concurrently, in tasks
/// of their own, and their bodies outlive their handlers (see [`Activity`]).
struct H2<C> {
    conn: Pin<Box<C>>,
    activity: Arc<Activity>,
}

impl<C: Future> Future for H2<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().conn.as_mut().poll(cx)
    }
}

impl<I, S, B> Connection for H2<http2::Connection<I, S, TokioExecutor>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        self.get_mut().conn.as_mut().graceful_shutdown();
    }

    fn idle_since(&self) -> Option<Instant> {
        self.activity.idle_since()
    }
}

/// How long a connection may go without a request in flight, and what happens then.
#[derive(Clone, Copy)]
struct IdleLimit {
    limit: Duration,
    /// Drop the connection (HTTP/1.1: nothing to say; a partial head is abandoned) rather
    /// than shut it down gracefully (HTTP/2: `GOAWAY`).
    hard: bool,
}

/// What [`drive`] looks at besides the connection.
#[derive(Clone, Copy)]
struct Scope {
    info: ConnectInfo,
    idle: IdleLimit,
}

/// Runs `conn` until it ends, closing it once it has gone without a request in flight
/// for the idle limit, or gracefully when the server drains.
async fn drive<C, E>(
    conn: &mut C,
    scope: Scope,
    graceful: &mut watch::Receiver<bool>,
    mut timer: Pin<&mut tokio::time::Sleep>,
) where
    C: Connection<Output = Result<(), E>> + Unpin,
    E: fmt::Display,
{
    let Scope { info, idle } = scope;
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
            let busy = conn.idle_since().is_none();
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
                let Some(since) = conn.idle_since() else {
                    timer.as_mut().reset(deadline(now, idle.limit));
                    continue;
                };
                if deadline(since, idle.limit) <= now {
                    if idle.hard {
                        tracing::debug!(peer = %info.peer, "no request head within the idle limit; closing");
                        return;
                    }
                    tracing::trace!(peer = %info.peer, "closing idle keep-alive connection");
                    Pin::new(&mut *conn).graceful_shutdown();
                    closing = true;
                    continue;
                }
                timer.as_mut().reset(deadline(since, idle.limit));
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
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(ms, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Since when the connection has had no request in flight; `None` while it has one.
    fn idle_since(&self) -> Option<Instant> {
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
    /// How long a request may hold its stream open after its head: see [`Admit::Hold`].
    hold_timeout: Duration,
}

impl<S> ConnService<S> {
    fn new(inner: S, info: ConnectInfo, shared: &ConnShared, activity: &Arc<Activity>) -> Self {
        Self {
            inner,
            info,
            drain: shared.drain.clone(),
            activity: Arc::clone(activity),
            hold_timeout: shared.header_read_timeout,
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
        let guard = Some(InFlight(Arc::clone(&self.activity)));
        let state = match downgrade(&mut req) {
            Err(malformed) => {
                tracing::debug!(peer = %self.info.peer, reason = malformed, "malformed HTTP/2 request");
                Admit::Malformed
            }
            Ok(Declared::Empty) if !http_body::Body::is_end_stream(req.body()) => Admit::Hold {
                held: Box::new(Held {
                    svc: Some(self.inner.clone()),
                    req,
                    timeout: Box::pin(tokio::time::sleep(self.hold_timeout)),
                }),
            },
            Ok(_) => Admit::Ready {
                fut: self.inner.clone().oneshot(req),
            },
        };
        ConnFuture { state, guard }
    }
}

/// What an HTTP/2 request's head says of its body.
enum Declared {
    /// `content-length: 0`.
    Empty,
    Other,
}

pin_project! {
    /// What becomes of an HTTP/2 request before the service sees it.
    #[project = AdmitProj]
    enum Admit<S>
    where
        S: Service<Request<Body>>,
    {
        /// Passed on: the service's answer.
        Ready { #[pin] fut: Oneshot<S, Request<Body>> },
        /// Malformed (RFC 9113 §8.1.1): the stream is reset with `PROTOCOL_ERROR`.
        Malformed,
        /// It declares an empty body but its stream is open: held until the stream ends,
        /// so that DATA contradicting the declaration is refused before anything reaches
        /// the upstream (as nginx and HAProxy do), at no cost in buffering.
        Hold { held: Box<Held<S>> },
    }
}

struct Held<S> {
    /// Taken when the request is passed on.
    svc: Option<S>,
    req: Request<Body>,
    timeout: Pin<Box<tokio::time::Sleep>>,
}

/// The checks an HTTP/2 request needs before it can become an HTTP/1.1 one upstream
/// (those `h2` itself does not make), and the one rewrite: split `cookie` fields are
/// joined (RFC 9113 §8.2.3).
fn downgrade(req: &mut Request<Body>) -> Result<Declared, &'static str> {
    // RFC 9113 §8.3.1: `:authority` MUST NOT include userinfo; it would otherwise travel
    // on in `Host` or `X-Forwarded-Host`.
    if req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err("userinfo in :authority");
    }
    let mut cookies = req.headers().get_all(COOKIE).iter();
    if cookies.next().is_some() && cookies.next().is_some() {
        let joined = req
            .headers()
            .get_all(COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect::<Vec<_>>()
            .join(&b"; "[..]);
        let joined = HeaderValue::from_bytes(&joined).map_err(|_| "a cookie field is malformed")?;
        req.headers_mut().insert(COOKIE, joined);
    }
    let mut lengths = req.headers().get_all(CONTENT_LENGTH).iter();
    let Some(length) = lengths.next() else {
        return Ok(Declared::Other);
    };
    let length = parse_length(length.as_bytes())
        .filter(|_| lengths.next().is_none())
        .ok_or("content-length is malformed")?;
    // RFC 9113 §8.1.1: a body that ends with the head must be what the head declared.
    if length > 0 && http_body::Body::is_end_stream(req.body()) {
        return Err("content-length with no body");
    }
    Ok(if length == 0 {
        Declared::Empty
    } else {
        Declared::Other
    })
}

/// The stream error of a malformed request.
fn malformed() -> BoxError {
    h2::Error::from(h2::Reason::PROTOCOL_ERROR).into()
}

pin_project! {
    struct ConnFuture<S>
    where
        S: Service<Request<Body>>,
    {
        #[pin]
        state: Admit<S>,
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
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                AdmitProj::Ready { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let guard = this.guard.take();
                    return Poll::Ready(Ok(res.map(|inner| TrackedBody {
                        inner,
                        _guard: guard,
                    })));
                }
                AdmitProj::Malformed => return Poll::Ready(Err(malformed())),
                AdmitProj::Hold { held } => {
                    let body = ready!(held.poll_end(cx))?;
                    let req = std::mem::take(&mut held.req).map(|_| body);
                    let Some(svc) = held.svc.take() else {
                        return Poll::Ready(Err(malformed()));
                    };
                    let fut = svc.oneshot(req);
                    this.state.set(Admit::Ready { fut });
                }
            }
        }
    }
}

impl<S> Held<S> {
    /// Waits for the end of a body declared empty: its stream ends (perhaps with trailers,
    /// which the body then carries) or an empty DATA frame comes first; any data is
    /// malformed, and so is a stream left open past the header-read timeout.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<Result<Body, BoxError>> {
        loop {
            let frame = match Pin::new(self.req.body_mut()).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    ready!(self.timeout.as_mut().poll(cx));
                    return Poll::Ready(Err(malformed()));
                }
            };
            let frame = match frame {
                None => return Poll::Ready(Ok(Body::empty())),
                Some(Err(err)) => return Poll::Ready(Err(err)),
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(_) => return Poll::Ready(Err(malformed())),
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    let trailers = std::future::ready(Some(Ok(trailers)));
                    return Poll::Ready(Ok(Body::new(Body::empty().with_trailers(trailers))));
                }
            }
        }
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
