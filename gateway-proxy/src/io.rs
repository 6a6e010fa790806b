//! Socket adapters shared by the server and the client side.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::rt::{Read, ReadBufCursor, Write};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Up to this many bytes spread over several buffers are copied into one and written with
/// a single `write` instead of a `writev`.
const COALESCE_MAX: usize = 1024;

pin_project! {
    /// Writes a vectored write of one buffer, or of several small ones (a response head and
    /// a small body, typically), as one contiguous `send`, and passes larger ones through
    /// as `writev`.
    ///
    /// hyper always writes through `writev` when the socket supports it, with the head and
    /// each body chunk as separate buffers. For the small messages that dominate API
    /// traffic, a `send` (after one copy into a stack buffer when there are several) costs
    /// the kernel less than `writev` and its per-segment work; for large bodies `writev`
    /// avoids copying them.
    #[derive(Debug)]
    pub(crate) struct Coalesce<I> {
        #[pin]
        inner: I,
    }
}

/// A connection handed over after a protocol switch (`101`): the bytes read past the
/// switch come first, then the connection's own.
#[derive(Debug)]
pub(crate) struct Rewind<I> {
    io: I,
    read_ahead: Bytes,
}

/// An upstream connection's socket: plain TCP, or TLS over it.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session is kilobytes; plain connections should not reserve room for it.
    Tls(Box<TlsStream<TcpStream>>),
}

// === impl Stream ===

impl Stream {
    /// The TCP connection underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Whether TLS negotiated HTTP/2 by ALPN.
    pub(crate) fn is_h2(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }

    /// Whether an idle connection can carry a request: the peer has neither closed it nor
    /// sent anything unasked (the rest of an earlier answer, or an alert before closing).
    ///
    /// One non-blocking peek, which tokio answers without a system call while the socket
    /// has not reported readable since it was last drained.
    pub(crate) fn is_idle_and_open(&self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(self.tcp().poll_peek(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(tcp) => tcp.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

// === impl Rewind ===

impl<I> Rewind<I> {
    pub(crate) const fn new(io: I, read_ahead: Bytes) -> Self {
        Self { io, read_ahead }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read_ahead.is_empty() {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead[..n]);
            this.read_ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// === impl Coalesce ===

impl<I> Coalesce<I> {
    pub(crate) const fn new(inner: I) -> Self {
        Self { inner }
    }
}

impl<I: Read> Read for Coalesce<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<I: Write> Write for Coalesce<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = self.project().inner;
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        let (Some(first), second) = (nonempty.next(), nonempty.next()) else {
            return Poll::Ready(Ok(0));
        };
        if second.is_none() {
            // One buffer: a plain `send` (no `writev` and its iovec set-up).
            return inner.poll_write(cx, first);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total > COALESCE_MAX {
            return inner.poll_write_vectored(cx, bufs);
        }
        let mut flat = [0u8; COALESCE_MAX];
        let mut len = 0;
        for b in bufs {
            flat[len..len + b.len()].copy_from_slice(b);
            len += b.len();
        }
        inner.poll_write(cx, &flat[..len])
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Writes once through `Coalesce` over loopback TCP and reads back what the peer got.
    async fn roundtrip(parts: &[&[u8]]) -> (usize, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut b, _) = listener.accept().await.expect("accept");
        let mut io = Coalesce::new(TokioIo::new(a));
        assert!(io.is_write_vectored());
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let n = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write_vectored(cx, &slices))
            .await
            .expect("write");
        drop(io);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        (n, got)
    }

    #[tokio::test]
    async fn small_vectored_writes_arrive_whole_and_in_order() {
        let (n, got) = roundtrip(&[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"hello"]).await;
        assert_eq!(n, 24);
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\nhello");
    }

    #[tokio::test]
    async fn large_vectored_writes_keep_every_byte() {
        let big = vec![7u8; COALESCE_MAX * 2];
        let (n, got) = roundtrip(&[b"head", &big]).await;
        let mut want = b"head".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(got, want[..n]);
    }
}
