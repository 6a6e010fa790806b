//! Test helpers: in-process upstreams on `127.0.0.1:0`, raw-socket exchanges, body helpers
//! and tracing set-up. Enabled by the `test-util` feature.
//!
//! Every upstream records what it received (method, target, version, headers, body length
//! and the first 64 KiB of the body) so tests can assert on exactly what crossed the proxy.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::{Body, BoxError};

/// How much of each request body an upstream keeps for assertions.
const KEEP_BODY: usize = 64 * 1024;

/// One request as an upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The request method.
    pub method: Method,
    /// The request target exactly as received.
    pub uri: Uri,
    /// The HTTP version of the upstream connection.
    pub version: Version,
    /// Every header, in order, as received.
    pub headers: HeaderMap,
    /// The total body length (for echo upstreams, which read the body).
    pub body_len: u64,
    /// The first 64 KiB of the body (echo upstreams only).
    pub body: Bytes,
}

impl Recorded {
    /// The value of `name` as a string, if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An upstream server running in this process.
#[derive(Debug)]
pub struct TestUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TestUpstream {
    /// Reads the whole body, records it, and answers 200 with the first 64 KiB of it and an
    /// `x-received-bytes` header.
    pub async fn echo() -> Self {
        Self::recording(|req, log| async move {
            let rec = record_with_body(req).await?;
            let len = rec.body_len;
            let kept = rec.body.clone();
            push(&log, rec);
            let mut res = Response::new(Body::from(kept));
            res.headers_mut().insert("x-received-bytes", len.into());
            Ok(res)
        })
        .await
    }

    /// Like [`TestUpstream::echo`], but waits `delay` before answering.
    pub async fn slow(delay: Duration) -> Self {
        Self::recording(move |req, log| async move {
            push(&log, record_head(&req));
            tokio::time::sleep(delay).await;
            Ok(Response::new(Body::from("slow")))
        })
        .await
    }

    /// Records the request and never answers.
    pub async fn hang() -> Self {
        Self::recording(|req, log| async move {
            push(&log, record_head(&req));
            std::future::pending::<()>().await;
            Ok(Response::new(Body::empty()))
        })
        .await
    }

    /// Answers with a body of `len` bytes (`b'x'`), streamed in 64 KiB chunks.
    pub async fn streaming(len: u64) -> Self {
        Self::recording(move |req, log| async move {
            push(&log, record_head(&req));
            let mut res = Response::new(Body::new(RepeatBody::new(len)));
            res.headers_mut().insert("x-sent-bytes", len.into());
            Ok(res)
        })
        .await
    }

    /// Serves every request with `handler` (requests are recorded without their body).
    pub async fn serve<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<Body>, BoxError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        Self::recording(move |req, log| {
            push(&log, record_head(&req));
            handler(req)
        })
        .await
    }

    /// Accepts, reads a request head, starts a 1 MB response, sends part of it and resets
    /// the connection (RST, not FIN).
    pub async fn reset_mid_body() -> Self {
        let listener = bind().await;
        let addr = local_addr(&listener);
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = read_head(&mut stream).await;
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
                    let _ = stream.write_all(head).await;
                    let _ = stream.write_all(&[b'x'; 16 * 1024]).await;
                    let _ = stream.flush().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = stream.set_zero_linger();
                    drop(stream);
                });
            }
        });
        Self {
            addr,
            log: Arc::default(),
            connections,
            task,
        }
    }

    async fn recording<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>, Arc<Mutex<Vec<Recorded>>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<Body>, BoxError>> + Send + 'static,
    {
        let listener = bind().await;
        let addr = local_addr(&listener);
        let log: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let (task_log, counter) = (Arc::clone(&log), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                let (handler, log) = (Arc::clone(&handler), Arc::clone(&task_log));
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let fut = handler(req, Arc::clone(&log));
                        async move {
                            Ok::<_, Infallible>(fut.await.unwrap_or_else(|err| {
                                let mut res = Response::new(Body::from(err.to_string()));
                                *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                                res
                            }))
                        }
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder.http1().timer(TokioTimer::new());
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            log,
            connections,
            task,
        }
    }

    /// The address it listens on.
    pub const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.log).clone()
    }

    /// The last request received.
    ///
    /// # Panics
    ///
    /// If none was received (a test failure).
    pub fn last_request(&self) -> Recorded {
        lock(&self.log)
            .last()
            .cloned()
            .expect("the upstream received no request")
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address on which nothing listens (connections are refused).
///
/// The port is bound and never listened on, and stays bound for the life of the test
/// process, so no other test can take it (binding a listener and dropping it left the port
/// free for anyone's next `127.0.0.1:0`).
///
/// # Panics
///
/// If loopback cannot be bound (the test cannot run).
pub async fn refused_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("a bound socket's address");
    std::mem::forget(socket);
    addr
}

/// A loopback address for a server a test starts in another process (which cannot be
/// handed a bound socket): free now, and on a port below the ephemeral range, so that the
/// tests' own outgoing connections, whose local ports come from that range, cannot take
/// it before the server binds it, as they could a port the kernel handed out for `:0`.
///
/// # Panics
///
/// If no port in 20000..32000 is free.
pub fn listen_addr() -> SocketAddr {
    use std::hash::{BuildHasher, RandomState};
    let random = RandomState::new();
    for attempt in 0u32..1000 {
        let port = 20_000 + (random.hash_one(attempt) % 12_000) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port in 20000..32000");
}

/// Binds `127.0.0.1:0`.
///
/// # Panics
///
/// If loopback cannot be bound (the test cannot run).
pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("bound listener has an address")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn push(log: &Mutex<Vec<Recorded>>, rec: Recorded) {
    lock(log).push(rec);
}

fn record_head<B>(req: &Request<B>) -> Recorded {
    Recorded {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
        body_len: 0,
        body: Bytes::new(),
    }
}

async fn record_with_body(req: Request<Incoming>) -> Result<Recorded, BoxError> {
    let mut rec = record_head(&req);
    let mut body = req.into_body();
    let mut kept = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            rec.body_len += data.len() as u64;
            let room = KEEP_BODY.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..room.min(data.len())]);
        }
    }
    rec.body = kept.freeze();
    Ok(rec)
}

/// Reads until the end of an HTTP/1 head (`\r\n\r\n`) or EOF.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// A body of `len` bytes of `b'x'`, in 64 KiB frames that share one allocation.
#[derive(Debug)]
pub struct RepeatBody {
    chunk: Bytes,
    left: u64,
}

impl RepeatBody {
    /// A body of `len` bytes.
    pub fn new(len: u64) -> Self {
        static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
        Self {
            chunk: Bytes::from_static(&CHUNK),
            left: len,
        }
    }
}

impl http_body::Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        // NOTE: `n` is at most the chunk length, so the cast cannot truncate.
        #[expect(clippy::cast_possible_truncation, reason = "n <= 64 KiB")]
        let frame = self.chunk.slice(..n as usize);
        std::task::Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// Raw-socket exchanges, for tests that must control every byte.
pub mod raw {
    use super::*;

    /// Writes `bytes` to `addr`, then reads until the peer closes or is idle for `idle`.
    ///
    /// # Panics
    ///
    /// If the connection cannot be made (a test failure).
    pub async fn exchange(addr: SocketAddr, bytes: &[u8], idle: Duration) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(bytes).await.expect("write request");
        read_until_idle(&mut stream, idle).await
    }

    /// Reads until EOF, an error (reset), or `idle` without data.
    pub async fn read_until_idle(stream: &mut TcpStream, idle: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 8192];
        while let Ok(Ok(n)) = tokio::time::timeout(idle, stream.read(&mut chunk)).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
        out
    }

    /// The status codes of every response in a raw HTTP/1 byte stream, in order.
    pub fn statuses(raw: &[u8]) -> Vec<u16> {
        let text = String::from_utf8_lossy(raw);
        text.match_indices("HTTP/1.")
            .filter_map(|(i, _)| {
                let line = &text[i..];
                let code = line.get(9..12)?;
                (line.as_bytes().get(8) == Some(&b' ')).then_some(())?;
                code.parse().ok()
            })
            .collect()
    }
}

/// Installs a `tracing` subscriber writing to the test output (once per process); the
/// filter comes from `RUST_LOG`, default `warn`.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Collects a body into `Bytes`.
///
/// # Panics
///
/// If the body fails (a test failure).
pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.expect("body").to_bytes()
}

/// Collects a body into a `String` (lossy UTF-8).
pub async fn body_string<B>(body: B) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    String::from_utf8_lossy(&body_bytes(body).await).into_owned()
}
