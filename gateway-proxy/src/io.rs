//! Socket adapters shared by the server and the client side.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use pin_project_lite::pin_project;

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

impl<I> Coalesce<I> {
    pub(crate) const fn new(inner: I) -> Self {
        Self { inner }
    }

    pub(crate) const fn get_ref(&self) -> &I {
        &self.inner
    }

    pub(crate) fn into_inner(self) -> I {
        self.inner
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
