//! One request and its response on an upstream HTTP/1.1 connection, driven by the task of
//! the request itself.
//!
//! [`Exchange`] writes the request head (and a small body with it, in one `send`), streams
//! the rest of the body, and reads the response head; the response body ([`ResponseBody`])
//! reads the rest from the socket as the client's side asks for it, and puts the
//! connection back in its pool when the response ends, if the connection can carry
//! another exchange. A small response that arrived whole with its head is handed over as
//! one piece of bytes and its connection returned at once.
//!
//! An idle pooled connection is only its socket: no task, channel or buffer of its own.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::header::{HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};

use super::pool::Pool;
use crate::buffers::{self, READ_START};
use crate::h1::decode::{Decoded, Decoder, InvalidBody};
use crate::h1::encode::{Encoder, LengthMismatch, SendError, WriteBuf};
use crate::h1::fields::Field;
use crate::h1::head::{self, BodyLength, InvalidHead, ResponseHead};
use crate::io::{Rewind, Stream};

/// How a request goes out, beyond the request itself.
#[derive(Debug, Default)]
pub(crate) struct Outbound {
    /// The forwarding fields the proxy adds, none of which the request has, one slot per
    /// [`Forwarding`] field. They are kept apart from the request's own: an HTTP/1.1 head
    /// is written once, so writing them after the request's fields costs nothing, where
    /// inserting them into its header map first costs a hash and a probe each. An HTTP/2
    /// request gets them inserted.
    fields: [Option<(HeaderName, HeaderValue)>; 3],
    /// The endpoint's `Host` replaces the request's own.
    pub(crate) endpoint_host: bool,
    /// The request asks to switch protocols: on HTTP/1.1, a `101` hands the connection over
    /// for a tunnel ([`Sent::upgraded`]).
    pub(crate) upgrade: bool,
}

/// The forwarding fields a proxy adds to a request ([`Outbound::add`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forwarding {
    For,
    Proto,
    Host,
}

impl Forwarding {
    const fn name(self) -> HeaderName {
        // NOTE: constants, so that the names are checked at compile time, not per request.
        const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
        const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
        const HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
        match self {
            Self::For => FOR,
            Self::Proto => PROTO,
            Self::Host => HOST,
        }
    }
}

/// Sends a request on a connection and waits for the response head.
pub(crate) struct Exchange {
    /// `None` once the exchange has completed.
    inner: Option<Box<Parts>>,
}

/// What the response head arrived with.
pub(crate) struct Sent {
    pub(crate) response: Response<Body>,
    /// The response's hop-by-hop fields are gone already (see [`Parts::poll_head`]).
    pub(crate) stripped: bool,
    /// The connection, once the upstream switched protocols (`101`) for an upgrade.
    pub(crate) upgraded: Option<Upgraded>,
}

/// Why an exchange failed, and whether its request may be sent again.
pub(crate) struct Failed {
    pub(crate) error: Error,
    /// A request that may be sent again on a new connection: idempotent and bodiless, on
    /// a pooled connection the upstream closed before answering anything (the keep-alive
    /// race, RFC 9110 §9.2.2).
    pub(crate) replay: Option<Box<Replay>>,
}

/// What it takes to send a request again: see [`Failed::replay`].
pub(crate) struct Replay {
    pub(crate) head: Vec<u8>,
    pub(crate) method: Method,
    pub(crate) upgrade: bool,
    pub(crate) pool: Arc<Pool>,
}

/// A response body read from the upstream connection as it is polled.
pub(crate) struct ResponseBody {
    /// `None` once the body has ended (the connection pooled or closed).
    wire: Option<Wire>,
    out: Outgoing,
    decoder: Decoder,
    pool: Arc<Pool>,
    /// The connection may carry another exchange once this one is complete.
    persistent: bool,
}

/// An upstream connection that switched protocols, for the tunnel: what was read after the
/// `101` head comes first.
pub(crate) type Upgraded = Rewind<Stream>;

/// Everything an exchange holds until its response head arrives. Boxed: the request's
/// future is moved around before it is first polled, and this is most of it.
struct Parts {
    wire: Wire,
    out: Outgoing,
    method: Method,
    pool: Arc<Pool>,
    /// The connection carried exchanges before: the upstream may close it as we write.
    reused: bool,
    /// Idempotent and bodiless: it may be sent again (see [`Failed::replay`]).
    replayable: bool,
    /// The request asks to switch protocols.
    upgrade: bool,
    /// Bytes of an answer have arrived.
    answered: bool,
    /// Bytes have arrived since the head was last parsed.
    unparsed: bool,
}

/// The socket and what has been read from it.
struct Wire {
    io: Stream,
    read: BytesMut,
    /// The upstream has closed its side: nothing more will be read.
    eof: bool,
}

/// The request on its way out.
struct Outgoing {
    buf: WriteBuf,
    encoder: Encoder,
    /// The body still to read and send; `None` once its end is queued, or without one.
    body: Option<Body>,
    state: SendState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SendState {
    Writing,
    /// All of it has been written.
    Done,
    /// The socket refused more (the upstream closed its side): the answer may still come.
    Refused,
}

/// What broke an exchange.
#[derive(Debug)]
enum Broken {
    Io(io::Error),
    /// The upstream closed the connection before its response was complete.
    Closed,
    Head(InvalidHead),
    Body(InvalidBody),
    /// The request body did not match its length.
    Length(LengthMismatch),
    /// The request body failed: the client's upload stalled or broke.
    Upload(BoxError),
    /// A `101` to a request that did not ask to switch protocols.
    Unsolicited,
}

/// The upstream closed the connection before its response was complete.
#[derive(Debug)]
struct UpstreamClosed;

/// The upstream switched protocols unasked.
#[derive(Debug)]
struct UnsolicitedSwitch;

// === impl Outbound ===

impl Outbound {
    /// Adds a forwarding field the request does not have (a second value replaces the
    /// first).
    pub(crate) fn add(&mut self, field: Forwarding, value: HeaderValue) {
        self.fields[field as usize] = Some((field.name(), value));
    }

    /// Moves what the request goes out with into it: for an HTTP/2 request, which is not
    /// written here.
    pub(crate) fn apply(&mut self, headers: &mut HeaderMap) {
        if self.endpoint_host {
            // `:authority` says it.
            headers.remove(HOST);
        }
        for (name, value) in self.fields.iter_mut().filter_map(Option::take) {
            headers.insert(name, value);
        }
    }
}

// === impl Sent ===

impl Sent {
    /// A response that came over HTTP/2.
    pub(crate) fn h2(response: Response<hyper::body::Incoming>) -> Self {
        Self {
            response: response.map(Body::from),
            stripped: false,
            upgraded: None,
        }
    }
}

// === impl Exchange ===

impl Exchange {
    /// Starts sending `req` on `io`, a new connection or one from `pool` (`reused`).
    pub(crate) fn new(
        io: Stream,
        reused: bool,
        pool: Arc<Pool>,
        req: Request<Body>,
        out: Outbound,
    ) -> Self {
        let (parts, body) = req.into_parts();
        let length = if http_body::Body::is_end_stream(&body) {
            // An empty body is announced where the method is meant to carry one.
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                BodyLength::Known(0)
            } else {
                BodyLength::None
            }
        } else {
            BodyLength::of(&http_body::Body::size_hint(&body), true)
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = (out.endpoint_host || !parts.headers.contains_key(HOST)).then_some(&pool.host);
        let mut head = Vec::new();
        head::write_request(
            &mut head,
            &parts.method,
            target,
            host,
            &parts.headers,
            out.fields.iter().flatten(),
            length,
        );
        let (encoder, body) = Encoder::for_body(length, body);
        let replayable = body.is_none() && parts.method.is_idempotent();
        let http::request::Parts {
            method, extensions, ..
        } = parts;
        // The request is written: its extensions' table serves the next request.
        buffers::give_extensions(extensions);
        let request = Replay {
            head,
            method,
            upgrade: out.upgrade,
            pool,
        };
        Self::start(io, reused, request, encoder, body, replayable)
    }

    /// Sends again, on a new connection, a request that failed as [`Failed`] says it may
    /// be.
    pub(crate) fn replay(io: Stream, replay: Replay) -> Self {
        // Not replayable twice: a new connection closed before answering is an answer.
        Self::start(io, false, replay, Encoder::Length(0), None, false)
    }

    /// Starts sending `request` (its head written out, where it goes, on `io`), with
    /// `body` after it as `encoder` frames it.
    fn start(
        io: Stream,
        reused: bool,
        request: Replay,
        encoder: Encoder,
        body: Option<Body>,
        replayable: bool,
    ) -> Self {
        let Replay {
            head,
            method,
            upgrade,
            pool,
        } = request;
        Self {
            inner: Some(Box::new(Parts {
                wire: Wire {
                    io,
                    read: BytesMut::new(),
                    eof: false,
                },
                out: Outgoing {
                    buf: WriteBuf::new(head),
                    encoder,
                    body,
                    state: SendState::Writing,
                },
                method,
                pool,
                reused,
                replayable,
                upgrade,
                answered: false,
                unparsed: false,
            })),
        }
    }
}

impl Future for Exchange {
    type Output = Result<Sent, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(parts) = this.inner.as_mut() else {
            return Poll::Ready(Err(Failed {
                error: Error::new(ErrorKind::Internal),
                replay: None,
            }));
        };
        let result = ready!(parts.poll_head(cx));
        let Some(parts) = this.inner.take() else {
            unreachable!("taken only here, and checked above")
        };
        Poll::Ready(match result {
            Ok(head) => parts.respond(head),
            Err(broken) => Err(parts.fail(broken)),
        })
    }
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange").finish_non_exhaustive()
    }
}

// === impl Parts ===

impl Parts {
    /// Writes the request while waiting for the response head: the upstream may answer
    /// before it has read the whole body. Informational responses are skipped.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, Broken>> {
        loop {
            self.out.poll_send(&mut self.wire.io, cx)?;
            // Parsed only when something new has arrived: a head is parsed once, not at
            // every wake-up.
            if self.unparsed {
                self.unparsed = false;
                let head_request = self.method == Method::HEAD;
                let parsed = head::parse_response(&mut self.wire.read, |field, status| {
                    // The hop-by-hop fields go as they are parsed (but for a `101`, whose
                    // `Upgrade` the tunnel needs), and so does `Content-Length`, which the
                    // body's own framing replaces (but where it describes a body that is
                    // not sent: answers to `HEAD`, and 304s).
                    status != StatusCode::SWITCHING_PROTOCOLS
                        && (field.is_hop_by_hop()
                            || (field == Field::ContentLength
                                && !head_request
                                && status != StatusCode::NOT_MODIFIED))
                });
                match parsed {
                    Err(invalid) => return Poll::Ready(Err(Broken::Head(invalid))),
                    // 100 Continue, 103 Early Hints: not forwarded; what follows them may be
                    // here already.
                    Ok(Some(head))
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        self.unparsed = !self.wire.read.is_empty();
                        continue;
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                }
            }
            if self.wire.eof {
                return Poll::Ready(Err(Broken::Closed));
            }
            if ready!(self.wire.poll_fill(cx, READ_START)).map_err(Broken::Io)? > 0 {
                self.answered = true;
                self.unparsed = true;
            }
        }
    }

    /// The response to hand on, once its head has arrived.
    fn respond(self: Box<Self>, head: ResponseHead) -> Result<Sent, Failed> {
        let mut parts = self;
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            if !parts.upgrade {
                return Err(parts.fail(Broken::Unsolicited));
            }
            let Self { mut wire, .. } = *parts;
            let read_ahead = wire.read.split().freeze();
            return Ok(Sent {
                response: response(head, Body::empty()),
                stripped: false,
                upgraded: Some(Rewind::new(wire.io, read_ahead)),
            });
        }
        let decoder = match head.body(&parts.method) {
            Ok(decoder) => decoder,
            Err(invalid) => return Err(parts.fail(Broken::Head(invalid))),
        };
        let persistent =
            head.meta.persistent(head.version) && !matches!(decoder, Some(Decoder::Eof));
        let body = match decoder {
            None | Some(Decoder::Length(0)) => {
                parts.release(persistent);
                Body::empty()
            }
            Some(mut decoder) => {
                if let Some(whole) = decoder.take_buffered(&mut parts.wire.read) {
                    // The connection is free now.
                    parts.release(persistent);
                    Body::from(whole)
                } else {
                    let Self {
                        wire, out, pool, ..
                    } = *parts;
                    Body::new(ResponseBody {
                        wire: Some(wire),
                        out,
                        decoder,
                        pool,
                        persistent,
                    })
                }
            }
        };
        Ok(Sent {
            response: response(head, body),
            stripped: true,
            upgraded: None,
        })
    }

    /// Returns the connection to its pool if it can carry another exchange: persistent,
    /// the request all written, and nothing read beyond the response.
    fn release(self: Box<Self>, persistent: bool) {
        let Self {
            wire, out, pool, ..
        } = *self;
        wire.release(&out, &pool, persistent);
    }

    fn fail(self: Box<Self>, broken: Broken) -> Failed {
        let closed = match &broken {
            Broken::Closed => true,
            Broken::Io(err) => gateway_core::classify::is_reset_kind(err.kind()),
            _ => false,
        };
        let replay = if closed && self.reused && self.replayable && !self.answered {
            let Self {
                out,
                method,
                upgrade,
                pool,
                ..
            } = *self;
            Some(Box::new(Replay {
                head: out.buf.into_bytes(),
                method,
                upgrade,
                pool,
            }))
        } else {
            None
        };
        Failed {
            error: broken.into_error(),
            replay,
        }
    }
}

/// A response with `head` and `body`.
fn response(head: ResponseHead, body: Body) -> Response<Body> {
    let mut res = Response::new(body);
    *res.status_mut() = head.status;
    *res.version_mut() = head.version;
    *res.headers_mut() = head.headers;
    res
}

// === impl Wire ===

impl Wire {
    /// Reads what the socket has into the buffer, making room for `want` bytes (see
    /// [`buffers::make_room`]); `Ok(0)` when the upstream has closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        buffers::make_room(&mut self.read, want);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.read
        ))?;
        if n == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Returns the connection to `pool` if it can carry another exchange; otherwise it
    /// closes here.
    fn release(self, out: &Outgoing, pool: &Arc<Pool>, persistent: bool) {
        let Self { io, read, eof } = self;
        if persistent && out.state == SendState::Done && read.is_empty() && !eof {
            pool.put(io);
        }
        buffers::give(read);
    }
}

// === impl Outgoing ===

impl Outgoing {
    /// Writes what it can of the request. The socket refusing more is not an error here
    /// (the upstream may have answered and closed); the request body failing is.
    fn poll_send(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Result<(), Broken> {
        if self.state != SendState::Writing {
            return Ok(());
        }
        match self
            .buf
            .poll_send(&mut self.body, &mut self.encoder, true, io, cx)
        {
            Poll::Ready(Ok(())) => self.state = SendState::Done,
            // The socket, or the body, which wakes the task when it has more.
            Poll::Pending => {}
            Poll::Ready(Err(SendError::Body(err))) => return Err(Broken::Upload(err)),
            Poll::Ready(Err(SendError::Length(mismatch))) => return Err(Broken::Length(mismatch)),
            Poll::Ready(Err(SendError::Io(err))) => {
                tracing::debug!(error = %err, "upstream stopped reading the request");
                self.state = SendState::Refused;
            }
        }
        Ok(())
    }
}

// === impl ResponseBody ===

impl ResponseBody {
    /// The body has ended: its connection goes back to the pool if it can.
    fn finish(&mut self) {
        if let Some(wire) = self.wire.take() {
            wire.release(&self.out, &self.pool, self.persistent);
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(wire) = this.wire.as_mut() else {
                return Poll::Ready(None);
            };
            if let Err(broken) = this.out.poll_send(&mut wire.io, cx) {
                this.wire = None;
                return Poll::Ready(Some(Err(broken.into_error().into())));
            }
            let frame = match this.decoder.decode(&mut wire.read, wire.eof) {
                Ok(Decoded::Data(data)) => Frame::data(data),
                Ok(Decoded::Trailers(trailers)) => Frame::trailers(trailers),
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {
                    if let Err(err) = ready!(wire.poll_fill(cx, this.decoder.read_size())) {
                        this.wire = None;
                        return Poll::Ready(Some(Err(Broken::Io(err).into_error().into())));
                    }
                    continue;
                }
                Err(invalid) => {
                    this.wire = None;
                    return Poll::Ready(Some(Err(Broken::Body(invalid).into_error().into())));
                }
            };
            // NOTE: the connection is released with the last piece, not when the body is
            // polled once more: a reader may stop at `is_end_stream`, or after trailers.
            if this.decoder.is_done() {
                this.finish();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }
    fn is_end_stream(&self) -> bool {
        self.wire.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

// === impl Broken ===

impl Broken {
    /// The gateway error: a failure of the client's own upload keeps its kind (a stalled
    /// upload is the client's 408); anything else broke the exchange with the upstream
    /// (502).
    fn into_error(self) -> Error {
        match self {
            Self::Upload(err) => {
                let kind = match Error::kind_of(&*err) {
                    ErrorKind::Internal => ErrorKind::BadGateway,
                    kind => kind,
                };
                Error::with_source(kind, err)
            }
            Self::Io(err) => Error::with_source(ErrorKind::BadGateway, err),
            // An `io::Error` of kind `UnexpectedEof`, so that retry policies see a reset.
            Self::Closed => Error::with_source(
                ErrorKind::BadGateway,
                io::Error::new(io::ErrorKind::UnexpectedEof, UpstreamClosed),
            ),
            Self::Head(err) => Error::with_source(ErrorKind::BadGateway, err),
            Self::Body(err) => Error::with_source(ErrorKind::BadGateway, err),
            Self::Length(err) => Error::with_source(ErrorKind::BadGateway, err),
            Self::Unsolicited => Error::with_source(ErrorKind::BadGateway, UnsolicitedSwitch),
        }
    }
}

impl fmt::Display for UpstreamClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the upstream closed the connection before its response was complete")
    }
}

impl std::error::Error for UpstreamClosed {}

impl fmt::Display for UnsolicitedSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the upstream switched protocols for a request that did not ask to")
    }
}

impl std::error::Error for UnsolicitedSwitch {}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::uri::Scheme;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::upstream::Endpoint;

    /// An exchange on a fresh loopback connection whose upstream has already written
    /// `answer`.
    async fn exchange(answer: &[u8]) -> Sent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut upstream, _) = listener.accept().await.unwrap();
        upstream.write_all(answer).await.unwrap();
        let endpoint = Endpoint::new(Scheme::HTTP, addr.to_string().parse().unwrap());
        let pool = Arc::new(Pool::new(&endpoint, Duration::from_secs(60), 8));
        let req = Request::get("/").body(Body::empty()).unwrap();
        let sent =
            Exchange::new(Stream::Plain(client), false, pool, req, Outbound::default()).await;
        // Keep the upstream's side open until the answer has been read.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(upstream);
        });
        sent.ok().unwrap()
    }

    #[tokio::test]
    async fn a_large_body_is_read_in_large_pieces() {
        let body = vec![b'x'; 64 * 1024];
        let mut answer =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(&body);
        let mut body = exchange(&answer).await.response.into_body();
        let (mut frames, mut len) = (0, 0);
        while let Some(frame) = body.frame().await {
            len += frame.unwrap().into_data().unwrap().len();
            frames += 1;
        }
        assert_eq!(len, 64 * 1024);
        // The first read is a head-sized buffer; the rest of the body comes in one.
        assert!(frames <= 2, "{frames} pieces");
    }

    #[tokio::test]
    async fn a_small_answer_that_arrived_whole_is_one_piece() {
        let sent =
            exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
        assert!(sent.stripped);
        assert!(
            sent.response.headers().is_empty(),
            "{:?}",
            sent.response.headers()
        );
        let body = sent.response.into_body();
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(2));
        assert_eq!(body.collect_bytes().await.unwrap(), "ok");
    }
}
