//! Writing a message: the bytes waiting for the socket, and a body in its framing.

use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use tokio::io::AsyncWrite;

use super::head::{self, BodyLength};
use gateway_core::BoxError;

/// Data up to this size is copied next to what precedes it, so that a head and a small
/// body leave in one `send`; larger data is written from its own memory (`writev`).
const COPY_MAX: usize = 4 * 1024;

/// How the body being written is framed, and what it still owes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Encoder {
    /// `Content-Length`: this many bytes are still owed.
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Raw bytes until the connection closes.
    Close,
}

/// Bytes waiting for the socket, in order: small pieces copied into one buffer, then at
/// most one large piece of data written from its own memory, then a short suffix (the
/// CRLF that closes a chunk).
#[derive(Debug, Default)]
pub(crate) struct WriteBuf {
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    pos: usize,
    data: Option<Bytes>,
    suffix: &'static [u8],
    /// Bytes written since the buffer was made: progress, for a write timeout.
    written: u64,
}

/// A body that does not match the length it announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LengthMismatch(&'static str);

/// Why [`WriteBuf::poll_send`] stopped.
#[derive(Debug)]
pub(crate) enum SendError<E> {
    /// The body failed.
    Body(E),
    /// The body broke the length it announced.
    Length(LengthMismatch),
    /// The socket failed.
    Io(io::Error),
}

// === impl Encoder ===

impl Encoder {
    /// How a body announced as `length` goes on the wire, and the body, if there is any to
    /// send (none is polled where none is announced).
    pub(crate) fn for_body<B>(length: BodyLength, body: B) -> (Self, Option<B>) {
        match length {
            BodyLength::None | BodyLength::Known(0) => (Self::Length(0), None),
            BodyLength::Known(n) => (Self::Length(n), Some(body)),
            BodyLength::Chunked => (Self::Chunked, Some(body)),
            BodyLength::Close => (Self::Close, Some(body)),
        }
    }
}

// === impl WriteBuf ===

impl WriteBuf {
    /// Starts with `head`, the message head already written out.
    pub(crate) const fn new(head: Vec<u8>) -> Self {
        Self {
            buf: head,
            pos: 0,
            data: None,
            suffix: b"",
            written: 0,
        }
    }

    /// Whether everything has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.buf.len() && self.data.is_none() && self.suffix.is_empty()
    }

    /// Whether more data may be queued before writing: the queue is short and holds no
    /// large piece yet.
    pub(crate) fn has_room(&self) -> bool {
        self.data.is_none() && self.suffix.is_empty() && self.buf.len() - self.pos < COPY_MAX
    }

    /// Queues raw bytes (a message head, an interim response).
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer to write a message head into, after what is queued. Call only when
    /// nothing large is queued.
    pub(crate) fn head(&mut self) -> &mut Vec<u8> {
        debug_assert!(self.data.is_none() && self.suffix.is_empty());
        self.compact();
        &mut self.buf
    }

    /// Everything queued from the start, written or not: the head of a bodiless request,
    /// kept to send it again.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Queues a piece of a body in `encoder`'s framing. Call only when [`has_room`].
    ///
    /// [`has_room`]: Self::has_room
    pub(crate) fn data(
        &mut self,
        encoder: &mut Encoder,
        data: Bytes,
    ) -> Result<(), LengthMismatch> {
        if data.is_empty() {
            return Ok(());
        }
        self.compact();
        match encoder {
            Encoder::Close => {
                self.push(data);
            }
            Encoder::Length(left) => {
                let len = data.len() as u64;
                if len > *left {
                    return Err(LengthMismatch("the body is longer than its Content-Length"));
                }
                *left -= len;
                self.push(data);
            }
            Encoder::Chunked => {
                let mut hex = [0u8; 16];
                self.buf.extend_from_slice(hex_size(data.len(), &mut hex));
                self.buf.extend_from_slice(b"\r\n");
                if self.push(data) {
                    self.buf.extend_from_slice(b"\r\n");
                } else {
                    self.suffix = b"\r\n";
                }
            }
        }
        Ok(())
    }

    /// Queues what `body` has ready, in `encoder`'s framing, while the queue is short, so
    /// that small pieces leave together (a head and a small body in one `send`). `body`
    /// becomes `None` once its end is queued; its trailers go only where `trailers` allows
    /// (and the framing is chunked).
    fn fill<B>(
        &mut self,
        body: &mut Option<B>,
        encoder: &mut Encoder,
        trailers: bool,
        cx: &mut Context<'_>,
    ) -> Result<(), SendError<B::Error>>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        while self.has_room() {
            let Some(pending) = body.as_mut() else {
                break;
            };
            let Poll::Ready(frame) = Pin::new(pending).poll_frame(cx) else {
                break;
            };
            match frame {
                None => {
                    *body = None;
                    self.end(encoder, None).map_err(SendError::Length)?;
                }
                Some(Err(err)) => return Err(SendError::Body(err)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.data(encoder, data).map_err(SendError::Length)?,
                    Err(frame) => {
                        if let Ok(fields) = frame.into_trailers() {
                            *body = None;
                            self.end(encoder, trailers.then_some(&fields))
                                .map_err(SendError::Length)?;
                        }
                    }
                },
            }
        }
        Ok(())
    }

    /// Sends `body` in `encoder`'s framing: queues what it has ready (see
    /// [`fill`](Self::fill)) and writes it as the socket takes it, flushing once the queue is
    /// empty. Ready once the body's end has been written; pending while the socket or the
    /// body is (the body wakes the task when it has more).
    pub(crate) fn poll_send<B, W>(
        &mut self,
        body: &mut Option<B>,
        encoder: &mut Encoder,
        trailers: bool,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), SendError<B::Error>>>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            self.fill(body, encoder, trailers, cx)?;
            if self.is_empty() {
                return if body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            ready!(self.poll_write(io, cx)).map_err(SendError::Io)?;
        }
    }

    /// Queues the end of a body: the last chunk and the trailers, if chunked. Call only
    /// when [`has_room`](Self::has_room).
    pub(crate) fn end(
        &mut self,
        encoder: &Encoder,
        trailers: Option<&HeaderMap>,
    ) -> Result<(), LengthMismatch> {
        match encoder {
            Encoder::Length(0) | Encoder::Close => Ok(()),
            Encoder::Length(_) => Err(LengthMismatch(
                "the body is shorter than its Content-Length",
            )),
            Encoder::Chunked => {
                self.compact();
                self.buf.extend_from_slice(b"0\r\n");
                if let Some(trailers) = trailers {
                    head::write_fields(&mut self.buf, trailers, false);
                }
                self.buf.extend_from_slice(b"\r\n");
                Ok(())
            }
        }
    }

    /// Copies small data into the buffer (`true`), or keeps large data as the piece
    /// written from its own memory (`false`).
    fn push(&mut self, data: Bytes) -> bool {
        if data.len() <= COPY_MAX {
            self.buf.extend_from_slice(&data);
            true
        } else {
            self.data = Some(data);
            false
        }
    }

    /// Drops what has been written, keeping the buffer's memory.
    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Writes everything queued, then flushes (which a TLS stream needs).
    pub(crate) fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let head = &self.buf[self.pos..];
            let data = self.data.as_deref().unwrap_or_default();
            let written = if data.is_empty() && self.suffix.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, head))?
            } else {
                let bufs = [
                    IoSlice::new(head),
                    IoSlice::new(data),
                    IoSlice::new(self.suffix),
                ];
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &bufs))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(written);
        }
        Pin::new(io).poll_flush(cx)
    }

    /// How many bytes have been written, in all.
    pub(crate) const fn written(&self) -> u64 {
        self.written
    }

    fn advance(&mut self, mut n: usize) {
        self.written += n as u64;
        let head = (self.buf.len() - self.pos).min(n);
        self.pos += head;
        n -= head;
        if n == 0 {
            return;
        }
        if let Some(data) = &mut self.data {
            let taken = data.len().min(n);
            data.advance(taken);
            n -= taken;
            if data.is_empty() {
                self.data = None;
            }
        }
        self.suffix = &self.suffix[n.min(self.suffix.len())..];
    }
}

/// `n` in lower-case hex.
fn hex_size(mut n: usize, out: &mut [u8; 16]) -> &[u8] {
    let mut at = out.len();
    loop {
        at -= 1;
        out[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &out[at..];
        }
    }
}

// === impl SendError ===

impl<E: Into<BoxError>> SendError<E> {
    pub(crate) fn into_box(self) -> BoxError {
        match self {
            Self::Body(err) => err.into(),
            Self::Length(mismatch) => mismatch.into(),
            Self::Io(err) => err.into(),
        }
    }
}

// === impl LengthMismatch ===

impl fmt::Display for LengthMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for LengthMismatch {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `limit` bytes per call and records them.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.limit - n);
                self.out.extend_from_slice(&buf[..take]);
                n += take;
            }
            self.calls += 1;
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn flush(buf: &mut WriteBuf, limit: usize) -> (Vec<u8>, usize) {
        let mut io = Trickle {
            out: Vec::new(),
            limit,
            calls: 0,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(buf.poll_write(&mut io, &mut cx).is_ready());
        assert!(buf.is_empty());
        (io.out, io.calls)
    }

    #[test]
    fn a_head_and_a_small_body_leave_in_one_write() {
        let mut buf = WriteBuf::new(b"HEAD\r\n\r\n".to_vec());
        let mut enc = Encoder::Length(5);
        buf.data(&mut enc, Bytes::from_static(b"hello")).unwrap();
        buf.end(&enc, None).unwrap();
        assert_eq!(
            flush(&mut buf, usize::MAX),
            (b"HEAD\r\n\r\nhello".to_vec(), 1)
        );
    }

    #[test]
    fn chunks_are_framed_whatever_their_size_and_the_write_sizes() {
        let big = Bytes::from(vec![b'x'; COPY_MAX + 1]);
        for limit in [1, 3, 1000, usize::MAX] {
            let mut buf = WriteBuf::new(b"H\r\n\r\n".to_vec());
            let mut enc = Encoder::Chunked;
            buf.data(&mut enc, Bytes::from_static(b"abc")).unwrap();
            buf.data(&mut enc, Bytes::new()).unwrap();
            let (mut out, _) = flush(&mut buf, limit);
            buf.data(&mut enc, big.clone()).unwrap();
            assert!(!buf.has_room());
            out.extend(flush(&mut buf, limit).0);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            buf.end(&enc, Some(&trailers)).unwrap();
            out.extend(flush(&mut buf, limit).0);
            let mut want = b"H\r\n\r\n3\r\nabc\r\n1001\r\n".to_vec();
            want.extend_from_slice(&big);
            want.extend_from_slice(b"\r\n0\r\ngrpc-status: 0\r\n\r\n");
            assert_eq!(out, want, "limit {limit}");
        }
    }

    #[test]
    fn a_body_that_breaks_its_length_is_an_error() {
        let mut buf = WriteBuf::new(Vec::new());
        let mut enc = Encoder::Length(3);
        assert!(buf.data(&mut enc, Bytes::from_static(b"abcd")).is_err());
        buf.data(&mut enc, Bytes::from_static(b"ab")).unwrap();
        assert!(buf.end(&enc, None).is_err());
    }

    #[test]
    fn hex_sizes() {
        let mut out = [0u8; 16];
        assert_eq!(hex_size(0, &mut out), b"0");
        assert_eq!(hex_size(0x1a2f, &mut out), b"1a2f");
        assert_eq!(hex_size(usize::MAX, &mut out).len(), 16);
    }
}
