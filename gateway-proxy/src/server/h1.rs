//! HTTP/1.1 connections, served on the gateway's own codec (see `crate::h1`).
//!
//! One [`Conn`] future per connection, polled by the connection's task: it reads a request
//! head, calls the service, feeds the request body to whoever reads it (see `incoming`),
//! and writes the response, a small one in a single `send` with its head. Requests on a
//! connection are served one at a time, pipelined ones from what was read ahead.
//!
//! What it holds between requests is the socket: the read buffer is freed whenever it is
//! empty and the socket has nothing to read, and the write buffer's memory is the only
//! other allocation it keeps (empty, a few hundred bytes).
//!
//! The limits a client could abuse are checked here or by the caller (`conn::drive`):
//! head size and field count (431, 414), framing (400 for anything that could be read two
//! ways, 501 for transfer codings other than `chunked`, 505 for other versions), the time
//! to send a head (the header-read timeout), and bodies that break their framing (the
//! reader gets a 400 error and the connection closes).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use gateway_core::{Body, BoxError, ConnectInfo, Drain, Error, ErrorKind};
use http::header::{CONTENT_LENGTH, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::conn::{Activity, Connection};
use super::incoming::{self, Fed, Feed};
use crate::buffers::{self, READ_START};
use crate::h1::encode::{Encoder, FillError, WriteBuf};
use crate::h1::fields::connection_has;
use crate::h1::head::{self, BodyLength, Persist, Refused, RequestHead};
use crate::upgrade;
use gateway_core::time::deadline;

pub(super) use crate::h1::head::MAX_HEADERS;

/// What a closing connection reads and drops of a body the client is still sending, so
/// that its response is not lost to a reset.
const LINGER_MAX: usize = 256 * 1024;

/// A transport an HTTP/1.1 connection runs on.
pub(super) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Waits until a read would find something, without reading: an idle connection
    /// waits for its next request holding no buffer.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Self::poll_read_ready(self, cx)
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TLS session keeps buffers of its own anyway; read straight away.
        Poll::Ready(Ok(()))
    }
}

/// The limits of a request head.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_headers: usize,
    pub(super) max_head: usize,
    /// How long a response write may wait for the client to take a byte.
    pub(super) write_timeout: Duration,
}

pin_project! {
    /// An HTTP/1.1 connection being served; see the module docs.
    #[project = ConnProj]
    pub(super) struct Conn<I, S>
    where
        S: Service<Request<Body>>,
    {
        io: Option<I>,
        read: BytesMut,
        // Bytes have arrived since the head was last parsed.
        unparsed: bool,
        // The client has closed its side.
        eof: bool,
        write: WriteBuf,
        service: S,
        #[pin]
        state: State<S::Future>,
        // The current request's body, still being read off the connection.
        feed: Option<Feed>,
        // The current request's body, left unread by its reader.
        abandoned: Option<Feed>,
        // What the current request said that its response needs.
        request: Current,
        limits: Limits,
        info: ConnectInfo,
        drain: Drain,
        activity: Arc<Activity>,
        // The server asked the connection to finish.
        draining: bool,
        // The current request asked to switch protocols.
        upgrade: Option<upgrade::Pending>,
        // Armed while the client takes no bytes of a response: see `stalled`.
        stall: Option<Stall>,
    }
}

/// The write timeout's timer, and how much had been written when it was last set.
struct Stall {
    timer: Pin<Box<Sleep>>,
    written: u64,
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Reading a request head.
        Head,
        // Waiting for the response.
        Waiting { #[pin] fut: F },
        // Writing the response.
        Writing { out: Writing },
        // Writing what is left, then closing: the sending side first, then, once the
        // client has read everything, the connection.
        Closing { shut: bool, linger: bool, lingered: usize },
        Done,
    }
}

/// What a response needs to know of its request.
#[derive(Debug, Clone, Copy)]
struct Current {
    version: Version,
    head: bool,
    trailers: bool,
    /// Another request may follow this one.
    keep_alive: bool,
    /// The request was refused before the service saw it: the client may still be
    /// sending it.
    refused: bool,
}

/// A response on its way out.
struct Writing {
    /// The body still to send (`None` once its end is queued).
    body: Option<Body>,
    encoder: Encoder,
    /// A `101`: the connection is handed over once the head is out.
    switching: bool,
}

// === impl Conn ===

impl<I, S, B> Conn<I, S>
where
    I: Transport,
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// A connection on `io`, whose client has sent `first` already.
    pub(super) fn new(
        io: I,
        first: BytesMut,
        service: S,
        limits: Limits,
        info: ConnectInfo,
        drain: Drain,
        activity: Arc<Activity>,
    ) -> Self {
        Self {
            io: Some(io),
            unparsed: !first.is_empty(),
            read: first,
            eof: false,
            write: WriteBuf::default(),
            service,
            state: State::Head,
            feed: None,
            abandoned: None,
            request: Current {
                version: Version::HTTP_11,
                head: false,
                trailers: false,
                keep_alive: true,
                refused: false,
            },
            limits,
            info,
            drain,
            activity,
            draining: false,
            upgrade: None,
            stall: None,
        }
    }
}

impl<I, S, B> Future for Conn<I, S>
where
    I: Transport,
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // The request body, whoever reads it: read off the socket as it is asked for.
            feed(&mut this, cx);
            let Some(io) = this.io.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match this.state.as_mut().project() {
                StateProj::Head => match poll_head(&mut this, cx) {
                    Poll::Ready(Ok(next)) => this.state.set(next),
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => return Poll::Pending,
                },
                StateProj::Waiting { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(res)) => {
                        let next = respond(&mut this, res.map(Body::new));
                        this.state.set(next);
                    }
                    Poll::Ready(Err(err)) => {
                        let next = fail(&mut this, err.into());
                        this.state.set(next);
                    }
                    Poll::Pending => {
                        // The service may have just asked for body it can have at once.
                        if feed(&mut this, cx) {
                            continue;
                        }
                        return Poll::Pending;
                    }
                },
                StateProj::Writing { out } => {
                    match out.poll_send(cx, io, this.write, this.request.trailers) {
                        Poll::Ready(Ok(())) => {
                            let next = finish(&mut this);
                            this.state.set(next);
                        }
                        Poll::Ready(Err(err)) => {
                            // The client is gone, or the body failed halfway: the response
                            // cannot be completed, so the connection is cut short.
                            this.state.set(State::Done);
                            *this.io = None;
                            return Poll::Ready(Err(err));
                        }
                        Poll::Pending => {
                            if feed(&mut this, cx) {
                                continue;
                            }
                            if stalled(&mut this, cx) {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(STALLED.into()));
                            }
                            return Poll::Pending;
                        }
                    }
                }
                StateProj::Closing {
                    shut,
                    linger,
                    lingered,
                } => {
                    // Copied out (the state is borrowed from `this`), and back on `Pending`.
                    let (mut shut, linger, mut lingered) = (*shut, *linger, *lingered);
                    match poll_close(&mut this, cx, &mut shut, linger, &mut lingered) {
                        Poll::Ready(Ok(())) => this.state.set(State::Done),
                        Poll::Ready(Err(err)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(err));
                        }
                        Poll::Pending => {
                            this.state.set(State::Closing {
                                shut,
                                linger,
                                lingered,
                            });
                            return Poll::Pending;
                        }
                    }
                }
                StateProj::Done => {
                    *this.io = None;
                    *this.feed = None;
                    *this.abandoned = None;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<I, S, B> Connection for Conn<I, S>
where
    I: Transport,
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.project();
        *this.draining = true;
        this.request.keep_alive = false;
    }
}

/// Reads the next request head and hands it to the service: the state that follows (the
/// service's future, a refusal, or the end of the connection).
fn poll_head<I, S, B>(
    this: &mut ConnProj<'_, I, S>,
    cx: &mut Context<'_>,
) -> Poll<Result<State<S::Future>, BoxError>>
where
    I: Transport,
    S: Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    loop {
        // As in every state: the request body, read off the socket as it is asked for.
        feed(this, cx);
        if *this.draining && this.read.is_empty() {
            return Poll::Ready(Ok(State::Closing {
                shut: false,
                linger: false,
                lingered: 0,
            }));
        }
        if *this.unparsed {
            // The service takes a request as soon as it is parsed: it must be ready for one
            // first (and requests wait in the socket until it is).
            if let Err(err) = ready!(this.service.poll_ready(cx)) {
                this.activity.begin();
                return Poll::Ready(Ok(fail(this, err.into())));
            }
            *this.unparsed = false;
            match head::parse_request(this.read, this.limits.max_headers, this.limits.max_head) {
                Ok(Some(head)) => {
                    return Poll::Ready(Ok(match start(this, head) {
                        Ok(req) => State::Waiting {
                            fut: this.service.call(req),
                        },
                        Err(refused) => refuse(this, refused),
                    }));
                }
                Ok(None) => {}
                Err(refused) => return Poll::Ready(Ok(refuse(this, refused))),
            }
        }
        if *this.eof {
            // Closed between requests, or in the middle of a head.
            return Poll::Ready(Ok(State::Done));
        }
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Ok(State::Done));
        };
        if this.read.capacity() == 0 {
            // Nothing buffered: wait for the client before taking memory.
            ready!(io.poll_read_ready(cx))?;
            *this.read = buffers::take();
        } else if this.read.capacity() - this.read.len() < 1024 {
            this.read.reserve(READ_START);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, this.read) {
            Poll::Ready(Ok(0)) => *this.eof = true,
            Poll::Ready(Ok(_)) => *this.unparsed = true,
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
            Poll::Pending => {
                if this.read.is_empty() && this.read.capacity() > 0 {
                    // Idle: hold no buffer while waiting.
                    buffers::give(std::mem::take(this.read));
                    #[cfg(test)]
                    FREED.with(|n| n.set(n.get() + 1));
                }
                return Poll::Pending;
            }
        }
    }
}

/// Closes the connection: writes what is left, shuts the sending side, then reads (and
/// drops) what the client still sends until it closes too, up to a bound (a close with
/// unread data would reset the connection, and the client could lose the response).
/// `Ready(Ok)` once the connection can be dropped; `shut` and `lingered` keep the progress.
fn poll_close<I, S>(
    this: &mut ConnProj<'_, I, S>,
    cx: &mut Context<'_>,
    shut: &mut bool,
    linger: bool,
    lingered: &mut usize,
) -> Poll<Result<(), BoxError>>
where
    I: Transport,
    S: Service<Request<Body>>,
{
    loop {
        feed(this, cx);
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if !*shut {
            let written = match this.write.poll_write(io, cx) {
                Poll::Ready(written) => written,
                Poll::Pending => {
                    if stalled(this, cx) {
                        return Poll::Ready(Err(STALLED.into()));
                    }
                    return Poll::Pending;
                }
            };
            if written.is_err() || ready!(Pin::new(&mut *io).poll_shutdown(cx)).is_err() {
                return Poll::Ready(Ok(()));
            }
            *shut = true;
        }
        if !linger || *this.eof || *lingered >= LINGER_MAX {
            return Poll::Ready(Ok(()));
        }
        this.read.clear();
        if this.read.capacity() < READ_START {
            this.read.reserve(READ_START);
        }
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *io),
            cx,
            this.read
        )) {
            Ok(0) | Err(_) => *this.eof = true,
            Ok(n) => *lingered += n,
        }
    }
}

/// Why a connection was cut while writing.
const STALLED: &str = "the client took no response bytes within the write timeout";

/// Whether the client has taken no bytes of what is queued for it for the write timeout;
/// called when a write is pending on the socket (not on the response body). The timer is
/// made on the first stall of a connection and kept: a client that reads never has one.
fn stalled<I, S>(this: &mut ConnProj<'_, I, S>, cx: &mut Context<'_>) -> bool
where
    S: Service<Request<Body>>,
{
    if this.write.is_empty() {
        // Waiting for the body, not for the client.
        return false;
    }
    let written = this.write.written();
    let limit = this.limits.write_timeout;
    let stall = this.stall.get_or_insert_with(|| Stall {
        timer: Box::pin(tokio::time::sleep(limit)),
        written,
    });
    if stall.written != written {
        stall.written = written;
        stall.timer.as_mut().reset(deadline(Instant::now(), limit));
    }
    if stall.timer.as_mut().poll(cx).is_pending() {
        return false;
    }
    tracing::debug!(peer = %this.info.peer, "{STALLED}; closing");
    *this.io = None;
    *this.feed = None;
    *this.abandoned = None;
    true
}

/// Feeds the request body to its reader as far as it can now; whether the reader has
/// something new (a piece, or the end).
fn feed<I, S>(this: &mut ConnProj<'_, I, S>, cx: &mut Context<'_>) -> bool
where
    I: Transport,
    S: Service<Request<Body>>,
{
    let (Some(feed), Some(io)) = (this.feed.as_mut(), this.io.as_mut()) else {
        return false;
    };
    match feed.poll_feed(cx, io, this.read, this.write) {
        Poll::Pending => feed.take_delivered(),
        Poll::Ready(fed) => {
            match fed {
                Fed::Complete => *this.feed = None,
                Fed::Broken => {
                    *this.feed = None;
                    this.request.keep_alive = false;
                }
                // The rest of the body stays on the connection: skipped or closed on once
                // the response is out.
                Fed::Abandoned => *this.abandoned = this.feed.take(),
            }
            true
        }
    }
}

/// Turns a parsed head into the request for the service.
fn start<I, S>(this: &mut ConnProj<'_, I, S>, head: RequestHead) -> Result<Request<Body>, Refused>
where
    S: Service<Request<Body>>,
{
    let framing = head.body()?;
    let RequestHead {
        method,
        uri,
        version,
        headers,
        meta,
    } = head;
    *this.request = Current {
        version,
        head: method == Method::HEAD,
        trailers: meta.te_trailers,
        keep_alive: meta.persistent(version) && !*this.draining,
        refused: false,
    };
    let body = match framing {
        None => Body::empty(),
        // The whole body came with the head: one piece of bytes, no feeding.
        Some(crate::h1::decode::Decoder::Length(len)) if len <= this.read.len() as u64 => {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            Body::from(this.read.split_to(len).freeze())
        }
        Some(decoder) => {
            let (body, feed) = incoming::channel(decoder, meta.expect_continue);
            *this.feed = Some(feed);
            Body::new(body)
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    let upgrade = meta.upgrade && headers.contains_key(UPGRADE);
    *req.headers_mut() = headers;
    let extensions = req.extensions_mut();
    *extensions = buffers::extensions();
    extensions.insert(*this.info);
    extensions.insert(this.drain.clone());
    if upgrade {
        let (pending, on_upgrade) = upgrade::pending();
        extensions.insert(on_upgrade);
        *this.upgrade = Some(pending);
    }
    this.activity.begin();
    Ok(req)
}

/// Answers a refused head, then closes.
fn refuse<I, S, F>(this: &mut ConnProj<'_, I, S>, refused: Refused) -> State<F>
where
    S: Service<Request<Body>>,
{
    let kind = match refused {
        Refused::Malformed(_) => ErrorKind::BadRequest,
        Refused::TooLarge => ErrorKind::HeaderFieldsTooLarge,
        Refused::UriTooLong => ErrorKind::UriTooLong,
        Refused::Coding => ErrorKind::NotImplemented,
        Refused::Version => ErrorKind::VersionNotSupported,
    };
    tracing::debug!(peer = %this.info.peer, reason = %refused, "request refused");
    this.activity.begin();
    this.request.keep_alive = false;
    this.request.head = false;
    this.request.refused = true;
    respond(this, Error::new(kind).to_response())
}

/// Answers a service that failed (it should have turned its errors into responses), then
/// closes.
fn fail<I, S, F>(this: &mut ConnProj<'_, I, S>, err: BoxError) -> State<F>
where
    S: Service<Request<Body>>,
{
    let err = Error::from_box(err);
    err.log();
    this.request.keep_alive = false;
    respond(this, err.to_response())
}

/// Writes the head of `res` and sets up its body.
fn respond<I, S, F>(this: &mut ConnProj<'_, I, S>, res: Response<Body>) -> State<F>
where
    S: Service<Request<Body>>,
{
    let (mut parts, body) = res.into_parts();
    let mut switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    if switching && this.upgrade.is_none() || parts.status.is_informational() && !switching {
        // Only a requested switch may answer `101`; other interim responses are not
        // forwarded as final ones.
        tracing::warn!(status = %parts.status, "the service answered with an interim status");
        let fallback = Error::new(ErrorKind::Internal).to_response();
        (parts, _) = fallback.into_parts();
        switching = false;
        this.request.keep_alive = false;
    }
    if connection_has(&parts.headers, "close") {
        this.request.keep_alive = false;
    }
    for feed in [this.feed.as_mut(), this.abandoned.as_mut()]
        .into_iter()
        .flatten()
    {
        // No `100 Continue` once the answer has started.
        feed.expect_continue = false;
        // A body not read yet may never be: announce the close it would take.
        if !feed.is_buffered(this.read) {
            this.request.keep_alive = false;
        }
    }
    let current = *this.request;
    let status = parts.status;
    let bodiless = current.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let keep_length = current.head || status == StatusCode::NOT_MODIFIED;
    let length = if bodiless {
        // A `HEAD` answer announces the length of the body it does not send.
        match exact {
            Some(len) if current.head && !parts.headers.contains_key(CONTENT_LENGTH) => {
                BodyLength::Known(len)
            }
            _ => BodyLength::None,
        }
    } else if let Some(len) = exact {
        BodyLength::Known(len)
    } else if current.version == Version::HTTP_11 {
        BodyLength::Chunked
    } else {
        // An HTTP/1.0 client learns where the body ends from the connection closing.
        this.request.keep_alive = false;
        BodyLength::Close
    };
    let persist = if switching {
        Persist::Default
    } else if !this.request.keep_alive {
        Persist::Close
    } else if current.version == Version::HTTP_10 {
        Persist::KeepAlive
    } else {
        Persist::Default
    };
    let date = (!parts.headers.contains_key(http::header::DATE)).then(date);
    head::write_response(
        this.write.head(),
        status,
        &parts.headers,
        keep_length,
        length,
        persist,
        date.as_ref().map(|d| d.as_slice()),
    );
    let encoder = match length {
        BodyLength::Known(len) if !bodiless => Encoder::Length(len),
        BodyLength::Chunked => Encoder::Chunked,
        BodyLength::Close => Encoder::Close,
        _ => Encoder::Length(0),
    };
    State::Writing {
        out: Writing {
            body: (!bodiless).then_some(body),
            encoder,
            switching,
        },
    }
}

/// After a response: hands the connection over for a switch, reads on, or closes.
fn finish<I, S, F>(this: &mut ConnProj<'_, I, S>) -> State<F>
where
    I: Transport,
    S: Service<Request<Body>>,
{
    this.activity.end();
    let switching = matches!(
        this.state.as_mut().project(),
        StateProj::Writing { out } if out.switching
    );
    let pending = this.upgrade.take();
    if switching
        && let Some(pending) = pending
        && let Some(io) = this.io.take()
    {
        pending.fulfill(io, this.read.split().freeze());
        return State::Done;
    }
    let mut linger = this.request.refused;
    if let Some(mut feed) = this.feed.take().or_else(|| this.abandoned.take()) {
        // The service answered without reading the whole body: skip the rest if it is
        // here already; otherwise the connection cannot find the next request, and the
        // client may still be sending it.
        if !feed.skip_buffered(this.read) {
            this.request.keep_alive = false;
            linger = true;
        }
    }
    if !this.request.keep_alive || *this.draining {
        return State::Closing {
            shut: false,
            linger,
            lingered: 0,
        };
    }
    *this.unparsed = !this.read.is_empty();
    State::Head
}

// === impl Writing ===

impl Writing {
    /// Sends what the body has, and its end; ready once everything has been written.
    fn poll_send<I: Transport>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        write: &mut WriteBuf,
        trailers: bool,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            // Trailers go to a client that asked for them (`TE: trailers`).
            match write.fill(&mut self.body, &mut self.encoder, trailers, cx) {
                Ok(()) => {}
                Err(FillError::Body(err)) => return Poll::Ready(Err(err)),
                Err(FillError::Length(mismatch)) => return Poll::Ready(Err(mismatch.into())),
            }
            if write.is_empty() {
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            ready!(write.poll_write(io, cx))?;
        }
    }
}

/// Today's `Date` value, formatted once a second per thread.
fn date() -> [u8; 29] {
    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(at, value)| {
        if *at != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == value.len() {
                value.copy_from_slice(text.as_bytes());
                *at = secs;
            }
        }
        *value
    })
}

#[cfg(test)]
thread_local! {
    /// Read buffers freed by idle connections on this thread (the tests' runtime).
    static FREED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
