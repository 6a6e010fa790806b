//! Idle plain HTTP/1.1 connections without their hyper connection: the socket adapter that
//! tells when one can be released, and the wait for the next request.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for a connection's whole
//! life. Most keep-alive connections are idle most of the time, so the server takes an
//! idle one apart ([`http1::Connection::into_parts`](hyper::server::conn::http1)) and
//! waits for readability on the bare socket; nginx and HAProxy free their buffers the same
//! way. Taking it apart is safe only at a message boundary, which hyper does not expose;
//! [`ParkIo`] records what hyper last did with the socket so that [`Activity`] can tell.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::conn::Activity;
use crate::io::Coalesce;

pin_project! {
    /// The socket of a plain HTTP/1.1 connection as hyper sees it: [`Coalesce`]d writes,
    /// hyper's last read and flush recorded in the connection's [`Activity`], and the bytes
    /// a released connection had read ahead served first to the next one.
    pub(super) struct ParkIo {
        #[pin]
        inner: Coalesce<TokioIo<TcpStream>>,
        activity: Arc<Activity>,
        rewound: Bytes,
    }
}

impl ParkIo {
    pub(super) fn new(inner: TokioIo<TcpStream>, activity: Arc<Activity>) -> Self {
        Self {
            inner: Coalesce::new(inner),
            activity,
            rewound: Bytes::new(),
        }
    }

    /// Serves `bytes` before anything more from the socket.
    pub(super) fn rewind(&mut self, bytes: Bytes) {
        debug_assert!(self.rewound.is_empty(), "rewound twice without a read");
        self.rewound = bytes;
    }

    pub(super) fn socket(&self) -> &TcpStream {
        self.inner.get_ref().inner()
    }
}

impl Read for ParkIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.rewound.is_empty() {
            let n = this.rewound.len().min(buf.remaining());
            buf.put_slice(&this.rewound[..n]);
            this.rewound.advance(n);
            return Poll::Ready(Ok(()));
        }
        let res = this.inner.poll_read(cx, buf);
        this.activity.flag(Activity::READ_BLOCKED, res.is_pending());
        res
    }
}

impl Write for ParkIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.activity.flag(Activity::WRITE_DIRTY, true);
        this.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.activity.flag(Activity::WRITE_DIRTY, true);
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        // NOTE: hyper flushes the socket only once its own write buffer is empty, so a
        // completed flush means nothing written is held anywhere above the kernel.
        let res = this.inner.poll_flush(cx);
        if let Poll::Ready(Ok(())) = res {
            this.activity.flag(Activity::WRITE_DIRTY, false);
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Waits, holding only the socket, until the client sends more (`true`), or `deadline`
/// passes or the server drains (`false`: close it).
pub(super) async fn wait(
    socket: &TcpStream,
    deadline: Instant,
    graceful: &mut watch::Receiver<bool>,
    mut timer: Pin<&mut Sleep>,
) -> bool {
    if deadline <= Instant::now() {
        return false;
    }
    timer.as_mut().reset(deadline);
    tokio::select! {
        // Data, end of stream or an error: the next hyper connection reads which.
        ready = socket.readable() => ready.is_ok(),
        _ = graceful.wait_for(|draining| *draining) => false,
        () = timer => false,
    }
}

#[cfg(test)]
thread_local! {
    /// Idle connections released on this thread (the tests' current-thread runtime).
    pub(super) static RELEASED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use gateway_core::Body;
    use http::{Request, Response};
    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::RELEASED;
    use crate::Server;

    /// A server answering `ok` to everything without reading request bodies, recording
    /// the paths it was asked for.
    struct Harness {
        addr: SocketAddr,
        paths: Arc<Mutex<Vec<String>>>,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<std::io::Result<()>>,
    }

    impl Harness {
        async fn start(tune: impl FnOnce(Server) -> Server) -> Self {
            RELEASED.with(|n| n.set(0));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = tune(Server::from_listener(listener));
            let addr = server.local_addr().unwrap();
            let paths = Arc::new(Mutex::new(Vec::new()));
            let seen = Arc::clone(&paths);
            let svc = tower::service_fn(move |req: Request<Incoming>| {
                seen.lock().unwrap().push(req.uri().path().to_owned());
                async { Ok::<_, Infallible>(Response::new(Body::full("ok"))) }
            });
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(server.serve_with_shutdown(svc, async {
                let _ = stopped.await;
            }));
            Self {
                addr,
                paths,
                stop: Some(stop),
                task,
            }
        }

        fn paths(&self) -> Vec<String> {
            self.paths.lock().unwrap().clone()
        }
    }

    fn released() -> usize {
        RELEASED.with(std::cell::Cell::get)
    }

    /// Reads one `ok` response (its head and its 2-byte body) and returns its status line.
    async fn response(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n")
                && got.len() >= end + 4 + 2
            {
                let head = String::from_utf8_lossy(&got[..end]).into_owned();
                assert_eq!(&got[end + 4..], b"ok", "one response, then nothing: {head}");
                return head.lines().next().unwrap_or_default().to_owned();
            }
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("a response within 5 s")
                .unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    }

    async fn get(stream: &mut TcpStream, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        response(stream).await
    }

    /// Whether the server closes `stream` within 5 s, having sent nothing more.
    async fn closes(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn an_idle_connection_is_released_and_serves_the_next_request_on_its_socket() {
        let h = Harness::start(|s| s.release_idle_after(Some(Duration::from_millis(50)))).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        assert_eq!(get(&mut c, "/a").await, "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(released(), 1, "released once, after the delay");
        assert_eq!(get(&mut c, "/b").await, "HTTP/1.1 200 OK");
        assert_eq!(get(&mut c, "/c").await, "HTTP/1.1 200 OK");
        assert_eq!(h.paths(), ["/a", "/b", "/c"]);
    }

    #[tokio::test]
    async fn a_busy_connection_keeps_its_buffers_until_the_delay() {
        let h = Harness::start(|s| s.release_idle_after(Some(Duration::from_secs(30)))).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        for _ in 0..3 {
            assert_eq!(get(&mut c, "/").await, "HTTP/1.1 200 OK");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(released(), 0);
    }

    #[tokio::test]
    async fn a_crowded_server_releases_at_once() {
        let h = Harness::start(|s| {
            s.release_idle_after(Some(Duration::from_secs(30)))
                .release_idle_above(1)
        })
        .await;
        let mut a = TcpStream::connect(h.addr).await.unwrap();
        let mut b = TcpStream::connect(h.addr).await.unwrap();
        assert_eq!(get(&mut a, "/a").await, "HTTP/1.1 200 OK");
        assert_eq!(get(&mut b, "/b").await, "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            released(),
            2,
            "two connections open, above one: both released"
        );
        assert_eq!(get(&mut a, "/a").await, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn the_start_of_a_head_read_before_a_release_is_not_lost() {
        let h = Harness::start(|s| s.release_idle_after(Some(Duration::ZERO))).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        assert_eq!(get(&mut c, "/a").await, "HTTP/1.1 200 OK");
        // Half a head, a pause long enough for the connection to be released with it,
        // then the rest.
        c.write_all(b"GET /b HTTP/1.1\r\nho").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = released();
        c.write_all(b"st: x\r\n\r\n").await.unwrap();
        assert_eq!(response(&mut c).await, "HTTP/1.1 200 OK");
        assert!(before >= 1, "released after /a");
        assert_eq!(h.paths(), ["/a", "/b"]);
    }

    /// A request body the service never read must not be parsed as the next request
    /// once the connection is idle (request smuggling by a released connection).
    #[tokio::test]
    async fn an_unread_request_body_is_never_parsed_as_a_request() {
        let h = Harness::start(|s| s.release_idle_after(Some(Duration::ZERO))).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        let smuggled: &[u8] = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            smuggled.len()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        assert_eq!(response(&mut c).await, "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.write_all(smuggled).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // hyper discards the body and reads the next request, or closes; either way the
        // body is never a request.
        if c.write_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .is_ok()
        {
            let mut rest = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(500), c.read_to_end(&mut rest)).await;
        }
        assert!(
            !h.paths().iter().any(|p| p == "/smuggled"),
            "{:?}",
            h.paths()
        );
        assert_eq!(h.paths()[0], "/upload");
        assert_eq!(released(), 0, "never released after a request with a body");
    }

    #[tokio::test]
    async fn a_released_connection_still_gets_the_header_read_timeout() {
        let h = Harness::start(|s| {
            s.release_idle_after(Some(Duration::ZERO))
                .header_read_timeout(Duration::from_millis(400))
        })
        .await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        assert_eq!(get(&mut c, "/a").await, "HTTP/1.1 200 OK");
        let idle = tokio::time::Instant::now();
        // A head that never completes.
        c.write_all(b"GET /b HTTP/1.1\r\n").await.unwrap();
        assert!(closes(&mut c).await, "cut at the header-read timeout");
        assert!(idle.elapsed() >= Duration::from_millis(300));
        assert!(released() >= 1);
        assert_eq!(h.paths(), ["/a"]);
    }

    #[tokio::test]
    async fn a_released_connection_is_closed_when_the_server_drains() {
        let mut h = Harness::start(|s| s.release_idle_after(Some(Duration::ZERO))).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        assert_eq!(get(&mut c, "/a").await, "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(released(), 1);
        let _ = h.stop.take().map(|stop| stop.send(()));
        assert!(closes(&mut c).await);
        let done = tokio::time::timeout(Duration::from_secs(5), &mut h.task).await;
        assert!(matches!(done, Ok(Ok(Ok(())))), "the server stops at once");
    }
}
