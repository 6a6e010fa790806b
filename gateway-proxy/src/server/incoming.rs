//! The body of a request on an HTTP/1.1 connection: the connection reads it off the socket
//! as the reader asks for it, one piece at a time, and hands each piece over without
//! copying it.
//!
//! The reader ([`RequestBody`]) and the connection ([`Feed`]) share one slot. The reader
//! says it wants the next piece; the connection, which owns the socket, decodes it from
//! what it has read (reading more when it must) and puts it in the slot. Usually both run
//! in the connection's task (the service's future polls the body), so no task switch or
//! channel is involved; a reader in another task works the same way through the wakers.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use gateway_core::{BoxError, Error, ErrorKind};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::buffers;
use crate::h1::decode::{Decoded, Decoder, InvalidBody};
use crate::h1::encode::WriteBuf;
use crate::task::register;

/// The reader's side: an `http_body::Body`.
pub(crate) struct RequestBody {
    slot: Arc<Mutex<Slot>>,
}

/// The connection's side.
pub(super) struct Feed {
    slot: Arc<Mutex<Slot>>,
    decoder: Decoder,
    /// The client waits for `100 Continue` before it sends the body.
    pub(super) expect_continue: bool,
    /// The client has closed its side.
    eof: bool,
    /// A piece was handed over since [`take_delivered`](Self::take_delivered).
    delivered: bool,
}

/// What one step of [`Feed::hand_over`] came to.
enum Step {
    /// The reader has not asked for a piece, or has not taken the last one.
    Waiting,
    /// The reader has a new piece; more of the body follows.
    Handed,
    /// Feeding is over.
    Over(Fed),
    /// The reader asked, and `read` holds no whole piece: read more.
    Read,
}

/// How feeding a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fed {
    /// The whole body has been read off the connection.
    Complete,
    /// The reader is gone before the end: the rest of the body is still on the connection.
    Abandoned,
    /// The body broke its framing, or the connection failed: it cannot carry another
    /// request.
    Broken,
}

#[derive(Default)]
struct Slot {
    /// The next piece, waiting for the reader.
    piece: Option<Frame<Bytes>>,
    /// Nothing follows `piece`.
    end: bool,
    error: Option<BoxError>,
    /// The reader asked for the next piece and has none.
    wants: bool,
    /// What the framing says of the body bytes still to come.
    hint: SizeHint,
    reader: Option<Waker>,
    conn: Option<Waker>,
    /// The reader is gone.
    dropped: bool,
}

/// The body's framing broke, or the connection failed before it was complete.
#[derive(Debug)]
struct Truncated(&'static str);

/// A body and the feed that fills it.
pub(super) fn channel(decoder: Decoder, expect_continue: bool) -> (RequestBody, Feed) {
    let slot = Arc::new(Mutex::new(Slot {
        hint: decoder.size_hint(),
        ..Slot::default()
    }));
    let body = RequestBody {
        slot: Arc::clone(&slot),
    };
    let feed = Feed {
        slot,
        decoder,
        expect_continue,
        eof: false,
        delivered: false,
    };
    (body, feed)
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl RequestBody ===

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let wake = {
            let mut slot = lock(&self.slot);
            if let Some(piece) = slot.piece.take() {
                return Poll::Ready(Some(Ok(piece)));
            }
            if let Some(err) = slot.error.take() {
                slot.end = true;
                return Poll::Ready(Some(Err(err)));
            }
            if slot.end {
                return Poll::Ready(None);
            }
            slot.wants = true;
            register(&mut slot.reader, cx);
            slot.conn.take()
        };
        if let Some(conn) = wake {
            conn.wake();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let slot = lock(&self.slot);
        slot.end && slot.piece.is_none() && slot.error.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let slot = lock(&self.slot);
        let buffered = match &slot.piece {
            Some(piece) => piece.data_ref().map_or(0, |d| d.len() as u64),
            None => 0,
        };
        let mut hint = SizeHint::new();
        hint.set_lower(slot.hint.lower() + buffered);
        if let Some(upper) = slot.hint.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let wake = {
            let mut slot = lock(&self.slot);
            slot.dropped = true;
            slot.conn.take()
        };
        if let Some(conn) = wake {
            conn.wake();
        }
    }
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody").finish_non_exhaustive()
    }
}

// === impl Feed ===

impl Feed {
    /// Whether a piece was handed over since the last call.
    pub(super) fn take_delivered(&mut self) -> bool {
        std::mem::take(&mut self.delivered)
    }

    /// Whether the rest of the body is all in `read` already.
    pub(super) fn is_buffered(&self, read: &BytesMut) -> bool {
        self.decoder.is_buffered(read)
    }

    /// The rest of the body, if it is all in `read` already: skips it (the reader is gone,
    /// or never came) so that the connection can carry the next request.
    pub(super) fn skip_buffered(&mut self, read: &mut BytesMut) -> bool {
        self.decoder.take_buffered(read).is_some()
    }

    /// Moves pieces of the body from the connection to the reader while it asks for them,
    /// reading the socket when it must (and answering `100 Continue` first, when the
    /// client waits for it). Ready once feeding is over.
    pub(super) fn poll_feed<I>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        read: &mut BytesMut,
        write: &mut WriteBuf,
    ) -> Poll<Fed>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            match self.hand_over(cx, read) {
                Step::Waiting => return Poll::Pending,
                Step::Handed => continue,
                Step::Over(fed) => return Poll::Ready(fed),
                Step::Read => {}
            }
            if self.expect_continue {
                // The client waits for our word before it sends the body.
                self.expect_continue = false;
                write.put(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            if !write.is_empty() {
                if ready!(write.poll_write(io, cx)).is_err() {
                    return Poll::Ready(self.fail("the connection failed"));
                }
                continue;
            }
            buffers::make_room(read, self.decoder.read_size());
            match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, read)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(_) => return Poll::Ready(self.fail("the connection failed")),
            }
        }
    }

    /// Hands the reader the next piece of the body, if it asks for one and `read` has it.
    fn hand_over(&mut self, cx: &mut Context<'_>, read: &mut BytesMut) -> Step {
        let (step, wake) = {
            let mut slot = lock(&self.slot);
            if slot.dropped {
                return Step::Over(Fed::Abandoned);
            }
            if !slot.wants || slot.piece.is_some() {
                register(&mut slot.conn, cx);
                return Step::Waiting;
            }
            let step = match self.decoder.decode(read, self.eof) {
                Ok(Decoded::More) => return Step::Read,
                Ok(Decoded::Data(data)) => {
                    slot.hint = self.decoder.size_hint();
                    slot.piece = Some(Frame::data(data));
                    slot.end = self.decoder.is_done();
                    if slot.end {
                        Step::Over(Fed::Complete)
                    } else {
                        Step::Handed
                    }
                }
                Ok(Decoded::Trailers(trailers)) => {
                    slot.piece = Some(Frame::trailers(trailers));
                    slot.end = true;
                    Step::Over(Fed::Complete)
                }
                Ok(Decoded::End) => {
                    slot.end = true;
                    Step::Over(Fed::Complete)
                }
                Err(invalid) => {
                    slot.error = Some(bad_body(invalid));
                    Step::Over(Fed::Broken)
                }
            };
            self.delivered = true;
            slot.wants = false;
            (step, slot.reader.take())
        };
        if let Some(reader) = wake {
            reader.wake();
        }
        step
    }

    /// Fails the body: the reader gets an error, and the connection is done.
    fn fail(&mut self, why: &'static str) -> Fed {
        self.truncate(why);
        Fed::Broken
    }

    /// Ends a body that is not complete with an error, so that a reader still waiting
    /// gets the error, not a hang.
    fn truncate(&self, why: &'static str) {
        let wake = {
            let mut slot = lock(&self.slot);
            if slot.end || slot.error.is_some() {
                return;
            }
            slot.error = Some(Error::with_source(ErrorKind::BadRequest, Truncated(why)).into());
            slot.reader.take()
        };
        if let Some(reader) = wake {
            reader.wake();
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        // The connection moved on (or closed) before the body was complete.
        self.truncate("the request ended first");
    }
}

/// A body that broke its framing: the client's fault (400).
fn bad_body(invalid: InvalidBody) -> BoxError {
    Error::with_source(ErrorKind::BadRequest, invalid).into()
}

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body incomplete: {}", self.0)
    }
}

impl std::error::Error for Truncated {}
