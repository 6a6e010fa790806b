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

use super::conn::Connection;
use super::incoming::{self, Fed, Feed};
use crate::buffers::{self, READ_START};
use crate::h1::encode::{Encoder, WriteBuf};
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
        // The current request's body, as far as the connection is concerned.
        body: Inbound,
        // What the current request said that its response needs.
        request: Current,
        limits: Limits,
        info: ConnectInfo,
        drain: Drain,
        // When the last response went out (or the connection opened): the connection has
        // been idle since, unless a request is in flight (see `Connection::idle_since`).
        idle_since: Instant,
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

/// The current request's body, as the connection sees it.
enum Inbound {
    /// None, or all of it read off the connection.
    Done,
    /// Read off the connection as its reader asks for it.
    Feeding(Feed),
    /// Left unread by its reader: skipped once the response is out, if it is all here.
    Abandoned(Feed),
    /// It broke its framing, or the connection failed under it.
    Broken,
}

/// What a response needs to know of its request, and what decides whether another
/// request may follow (see [`persists`]).
#[derive(Debug, Clone, Copy)]
struct Current {
    version: Version,
    head: bool,
    trailers: bool,
    /// The request's head allows another request after it.
    persistent: bool,
    outcome: Outcome,
    /// The response allows another request after it: no `Connection: close`, and a body
    /// that ends by its framing, not by the close. Known once the response head is out.
    response_persistent: bool,
}

/// How an exchange went, as far as the connection is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The service answered.
    Served,
    /// The request was refused before the service saw it: the client may still be
    /// sending it.
    Refused,
    /// The service failed, or answered with what cannot be sent as it is.
    Failed,
}

/// A response on its way out.
struct Writing {
    /// The body still to send (`None` once its end is queued).
    body: Option<Body>,
    encoder: Encoder,
    /// A `101`: the connection is handed over once the head is out.
    switching: bool,
}

/// Whether the connection reads another request after the current exchange: the one
/// place it is decided (RFC 9112 §9.3, §9.6). Asked when the response head is written (a
/// `Connection: close` tells the client) and again once the response is out, when the
/// request body may have broken since, or been left where it cannot be skipped.
fn persists(request: &Current, body: &Inbound, read: &BytesMut, draining: bool) -> bool {
    request.persistent
        && request.outcome == Outcome::Served
        && request.response_persistent
        && !draining
        && match body {
            Inbound::Done => true,
            // Unread, it may never be read; all here, it can be skipped.
            Inbound::Feeding(feed) | Inbound::Abandoned(feed) => feed.is_buffered(read),
            Inbound::Broken => false,
        }
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
    /// A connection on `io`, opened at `opened`, whose client has sent `first` already.
    pub(super) fn new(
        io: I,
        first: BytesMut,
        service: S,
        limits: Limits,
        info: ConnectInfo,
        drain: Drain,
        opened: Instant,
    ) -> Self {
        Self {
            io: Some(io),
            unparsed: !first.is_empty(),
            read: first,
            eof: false,
            write: WriteBuf::default(),
            service,
            state: State::Head,
            body: Inbound::Done,
            request: Current::unparsed(Outcome::Served),
            limits,
            info,
            drain,
            idle_since: opened,
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
            let next = match this.state.as_mut().project() {
                StateProj::Head => ready!(poll_head(&mut this, cx))?,
                StateProj::Waiting { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(res)) => respond(&mut this, res.map(Body::new)),
                    Poll::Ready(Err(err)) => fail(&mut this, err.into()),
                    // The service may have just asked for body it can have at once.
                    Poll::Pending if feed(&mut this, cx) => continue,
                    Poll::Pending => return Poll::Pending,
                },
                StateProj::Writing { out } => {
                    let trailers = this.request.trailers;
                    match this
                        .write
                        .poll_send(&mut out.body, &mut out.encoder, trailers, io, cx)
                    {
                        Poll::Ready(Ok(())) => finish(&mut this),
                        Poll::Ready(Err(err)) => {
                            // The client is gone, or the body failed halfway: the response
                            // cannot be completed, so the connection is cut short.
                            this.state.set(State::Done);
                            *this.io = None;
                            return Poll::Ready(Err(err.into_box()));
                        }
                        Poll::Pending if feed(&mut this, cx) => continue,
                        Poll::Pending if stalled(&mut this, cx) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(STALLED.into()));
                        }
                        Poll::Pending => return Poll::Pending,
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
                        Poll::Ready(Ok(())) => State::Done,
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
                    *this.body = Inbound::Done;
                    return Poll::Ready(Ok(()));
                }
            };
            this.state.set(next);
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
        *self.project().draining = true;
    }

    /// A request is in flight from its head to the end of its response: a head still
    /// arriving is the header-read timeout's business, not a request.
    fn idle_since(&self) -> Option<Instant> {
        match self.state {
            State::Waiting { .. } | State::Writing { .. } => None,
            State::Head | State::Closing { .. } | State::Done => Some(self.idle_since),
        }
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
                *this.request = Current::unparsed(Outcome::Failed);
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
        }
        buffers::make_room(this.read, READ_START);
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
        buffers::make_room(this.read, READ_START);
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
    *this.body = Inbound::Done;
    true
}

/// Feeds the request body to its reader as far as it can now; whether the reader has
/// something new (a piece, or the end).
#[inline]
fn feed<I, S>(this: &mut ConnProj<'_, I, S>, cx: &mut Context<'_>) -> bool
where
    I: Transport,
    S: Service<Request<Body>>,
{
    // NOTE: called at every turn of every state, and most requests have no body to feed.
    if !matches!(this.body, Inbound::Feeding(_)) {
        return false;
    }
    feed_body(this, cx)
}

fn feed_body<I, S>(this: &mut ConnProj<'_, I, S>, cx: &mut Context<'_>) -> bool
where
    I: Transport,
    S: Service<Request<Body>>,
{
    let (Inbound::Feeding(feed), Some(io)) = (&mut *this.body, this.io.as_mut()) else {
        return false;
    };
    let fed = match feed.poll_feed(cx, io, this.read, this.write) {
        Poll::Pending => return feed.take_delivered(),
        Poll::Ready(fed) => fed,
    };
    *this.body = match (fed, std::mem::replace(this.body, Inbound::Done)) {
        // The rest of the body stays on the connection: skipped or closed on once the
        // response is out.
        (Fed::Abandoned, Inbound::Feeding(feed)) => Inbound::Abandoned(feed),
        (Fed::Broken, _) => Inbound::Broken,
        _ => Inbound::Done,
    };
    true
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
        persistent: meta.persistent(version),
        outcome: Outcome::Served,
        response_persistent: true,
    };
    let body = match framing {
        None => Body::empty(),
        Some(mut decoder) => match decoder.take_buffered(this.read) {
            // The whole body came with the head: one piece of bytes, no feeding.
            Some(whole) => Body::from(whole),
            None => {
                let (body, feed) = incoming::channel(decoder, meta.expect_continue);
                *this.body = Inbound::Feeding(feed);
                Body::new(body)
            }
        },
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
    *this.request = Current::unparsed(Outcome::Refused);
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
    this.request.outcome = Outcome::Failed;
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
        (parts, _) = Error::new(ErrorKind::Internal).to_response().into_parts();
        switching = false;
        this.request.outcome = Outcome::Failed;
    }
    if let Inbound::Feeding(feed) | Inbound::Abandoned(feed) = this.body {
        // No `100 Continue` once the answer has started.
        feed.expect_continue = false;
    }
    let (length, sent) = response_length(this.request, parts.status, &parts.headers, &body);
    this.request.response_persistent =
        !connection_has(&parts.headers, "close") && length != BodyLength::Close;
    let persist = if switching {
        Persist::Default
    } else if !persists(this.request, this.body, this.read, *this.draining) {
        Persist::Close
    } else if this.request.version == Version::HTTP_10 {
        Persist::KeepAlive
    } else {
        Persist::Default
    };
    let date = (!parts.headers.contains_key(http::header::DATE)).then(date);
    head::write_response(
        this.write.head(),
        parts.status,
        &parts.headers,
        // Answers to `HEAD` and 304s describe a body they do not send.
        this.request.head || parts.status == StatusCode::NOT_MODIFIED,
        length,
        persist,
        date.as_ref().map(|d| d.as_slice()),
    );
    let (encoder, body) = Encoder::for_body(sent, body);
    State::Writing {
        out: Writing {
            body,
            encoder,
            switching,
        },
    }
}

/// How a response body is announced, and how much of it is sent: none for 1xx, 204 and
/// 304, nor for an answer to `HEAD`, which announces the length of the body it does not
/// send; a body of unknown length goes in chunks to an HTTP/1.1 client, and ends with the
/// connection for an HTTP/1.0 one.
fn response_length(
    request: &Current,
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &Body,
) -> (BodyLength, BodyLength) {
    let hint = body.size_hint();
    let bodiless = request.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        let length = BodyLength::of(&hint, request.version == Version::HTTP_11);
        return (length, length);
    }
    let announced = match hint.exact() {
        Some(len) if request.head && !headers.contains_key(CONTENT_LENGTH) => {
            BodyLength::Known(len)
        }
        _ => BodyLength::None,
    };
    (announced, BodyLength::None)
}

/// After a response: hands the connection over for a switch, reads on, or closes.
fn finish<I, S, F>(this: &mut ConnProj<'_, I, S>) -> State<F>
where
    I: Transport,
    S: Service<Request<Body>>,
{
    *this.idle_since = Instant::now();
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
    let mut linger = this.request.outcome == Outcome::Refused;
    if let Inbound::Feeding(feed) | Inbound::Abandoned(feed) = this.body {
        // The service answered without reading the whole body: skip the rest if it is
        // here already; otherwise the connection cannot find the next request, and the
        // client may still be sending it.
        if feed.skip_buffered(this.read) {
            *this.body = Inbound::Done;
        } else {
            linger = true;
        }
    }
    let persists = persists(this.request, this.body, this.read, *this.draining);
    // What is left of the body is not read any more: a reader still waiting gets an error.
    *this.body = Inbound::Done;
    if !persists {
        return State::Closing {
            shut: false,
            linger,
            lingered: 0,
        };
    }
    *this.unparsed = !this.read.is_empty();
    State::Head
}

// === impl Current ===

impl Current {
    /// For an exchange whose request was never parsed (or never read whole): nothing can
    /// follow it.
    const fn unparsed(outcome: Outcome) -> Self {
        Self {
            version: Version::HTTP_11,
            head: false,
            trailers: false,
            persistent: false,
            outcome,
            response_persistent: true,
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
