//! The origin every target proxies to: a small fixed body and a 64 KiB body, keep-alive,
//! counting connections and requests so the upstream connection reuse can be read off.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The small response body.
pub(crate) const SMALL: &[u8] = b"hello, world!\n";
/// The large response size.
pub(crate) const LARGE_LEN: usize = 64 * 1024;

/// Counters of what the origin saw.
#[derive(Default)]
pub(crate) struct Counts {
    connections: AtomicU64,
    requests: AtomicU64,
}

impl Counts {
    /// (connections accepted, requests served) so far.
    pub(crate) fn read(&self) -> (u64, u64) {
        (
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

/// Starts the origin on its own thread and runtime; returns its address and counters.
pub(crate) fn start() -> io::Result<(SocketAddr, Arc<Counts>)> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let counts = Arc::new(Counts::default());
    let task_counts = Arc::clone(&counts);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("origin".into())
        .spawn(move || runtime.block_on(serve(std_listener, task_counts)))?;
    Ok((addr, counts))
}

async fn serve(listener: std::net::TcpListener, counts: Arc<Counts>) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let large = Bytes::from(vec![b'x'; LARGE_LEN]);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let (counts, large) = (Arc::clone(&counts), large.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                counts.requests.fetch_add(1, Ordering::Relaxed);
                let body = if req.uri().path() == "/64k" {
                    large.clone()
                } else {
                    Bytes::from_static(SMALL)
                };
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
