//! The server runner: accepts connections and serves a tower service on them.
//!
//! HTTP/1.1 and HTTP/2 (h2c with prior knowledge, and h2 over TLS via ALPN) on the same
//! port: the server tells them apart by ALPN or by the first bytes, then runs that
//! protocol only. HTTP/1.1 runs on the gateway's own connection and codec (no task, buffer
//! or protocol state beyond the socket between requests; see the `h1` module), HTTP/2 on
//! hyper's. Around them the server enforces the limits a client must not control:
//!
//! - header-read timeout (HTTP/1: a connection without a request in flight must complete
//!   the next request head within it, counted from when it opened or went idle, so it
//!   bounds both a slow head and the wait between keep-alive requests; one timer per
//!   connection enforces it) and TLS-handshake timeout (the same value);
//! - header count and size (431; HTTP/2: header list size), request framing (anything
//!   that could be read two ways is refused with 400 and the connection closed);
//! - a keep-alive idle limit: a connection with no request in flight for that long is
//!   closed (HTTP/2 gets a GOAWAY);
//! - a write timeout (HTTP/1): a client that takes no bytes of its response for that long
//!   is cut;
//! - an idle HTTP/1.1 connection holds no buffer: it waits for the next request with only
//!   the socket;
//! - a cap on concurrent connections: at the cap the server stops accepting and the kernel
//!   backlog holds new clients;
//! - graceful shutdown: stop accepting (new connections are refused), ask every connection
//!   to finish (idle keep-alives close at once, in-flight requests complete), wait for
//!   tracked tunnels, and at the drain deadline cut whatever is left.
//!
//! Every request carries [`ConnectInfo`](gateway_core::ConnectInfo) and the server's
//! [`Drain`] in its extensions, and an HTTP/1.1 request that asks to switch protocols an
//! [`OnUpgrade`](crate::upgrade::OnUpgrade).
//!
//! # Example
//!
//! ```no_run
//! use gateway_core::{Body, RescueLayer};
//! use gateway_proxy::{ReverseProxy, Route, Router, Server};
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let app = Router::new().route(Route::prefix("/"), ReverseProxy::to("http://127.0.0.1:3000")?);
//! Server::bind("0.0.0.0:8080")
//!     .await?
//!     .header_read_timeout(Some(Duration::from_secs(10)))
//!     .max_connections(50_000)
//!     .serve(ServiceBuilder::new().layer(RescueLayer::new()).service(app))
//!     .await?;
//! # Ok(()) }
//! ```

mod conn;
mod h1;
mod incoming;
mod tls;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway_core::Body;
use gateway_core::metrics::Metrics;
use gateway_core::{BoxError, Drain};
use http::{Request, Response};
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::Service;

pub use tls::{InvalidTls, TlsConfig};

/// Serves a tower service on a listener; see the [module docs](self).
#[must_use]
pub struct Server {
    listener: TcpListener,
    config: Config,
    tls: Option<TlsConfig>,
    shrink: Option<Shrink>,
    metrics: Option<Metrics>,
    readiness: Option<Readiness>,
}

/// Whether the gateway should get traffic, for a readiness probe (the admin listener's
/// `/readyz`): every server given it is listening and none is draining.
///
/// Cloning is cheap (one `Arc`); clones share the state.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<ReadinessState>,
}

#[derive(Debug, Default)]
struct ReadinessState {
    /// Servers given this readiness that are not listening yet.
    starting: AtomicUsize,
    draining: AtomicBool,
}

/// A server's connection metrics (see `docs/observability.md`).
#[derive(Clone)]
pub(super) struct ConnMetrics {
    pub(super) open: Gauge,
    pub(super) accepted: Counter,
    pub(super) tls_failures: Counter,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

/// What [`Server::shrink_after_close`] set up.
#[derive(Clone)]
struct Shrink {
    crowd: usize,
    give_back: Arc<dyn Fn() + Send + Sync>,
}

#[derive(Clone, Debug)]
struct Config {
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
    max_headers: usize,
    max_header_bytes: usize,
    h2_max_concurrent_streams: u32,
    drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_headers: h1::MAX_HEADERS,
            max_header_bytes: 64 * 1024,
            h2_max_concurrent_streams: 200,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A [`Server`] setting out of its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidServer {
    reason: &'static str,
}

impl fmt::Display for InvalidServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid server settings: {}", self.reason)
    }
}

impl std::error::Error for InvalidServer {}

impl Config {
    const fn validate(&self) -> Result<(), InvalidServer> {
        let reason = if self.max_connections == 0 {
            "max_connections must be at least 1"
        } else if self.max_headers == 0 || self.max_headers > h1::MAX_HEADERS {
            "max_headers must be 1 to 100"
        } else if self.max_header_bytes < 8192 {
            "max_header_bytes must be at least 8 KiB"
        } else {
            return Ok(());
        };
        Err(InvalidServer { reason })
    }
}

// === impl Server ===

impl Server {
    /// Binds `addr`.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Ok(Self::from_listener(TcpListener::bind(addr).await?))
    }

    /// Serves on an existing listener.
    pub fn from_listener(listener: TcpListener) -> Self {
        Self {
            listener,
            config: Config::default(),
            tls: None,
            shrink: None,
            metrics: None,
            readiness: None,
        }
    }

    /// The address the server listens on.
    ///
    /// # Errors
    ///
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// How long a client may take to send a request head, counted from when the connection
    /// opened (TLS handshake included) or last went idle (default 10 s; `None` for none,
    /// which lets any client hold a connection for ever). For HTTP/1.1 it
    /// also bounds the wait for the next request on a keep-alive connection: the idle limit
    /// there is the smaller of this and [`keep_alive_timeout`](Self::keep_alive_timeout).
    pub const fn header_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.header_read_timeout = forever_if_none(timeout);
        self
    }

    /// Closes a connection with no request in flight for this long (default 60 s; `None`
    /// for never). An
    /// HTTP/1.1 connection waits for its next request head, so it gets the smaller of this
    /// and the [`header_read_timeout`](Self::header_read_timeout); an HTTP/2 connection gets
    /// a GOAWAY.
    pub const fn keep_alive_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.keep_alive_timeout = forever_if_none(timeout);
        self
    }

    /// Closes an HTTP/1.1 connection whose client has taken no bytes of a response for this
    /// long (default 60 s, as nginx's `send_timeout`; `None` for never): a client that stops
    /// reading a large
    /// response is cut instead of holding its connection, and the upstream response behind
    /// it, for ever. Any progress restarts the timer. (HTTP/2 connections are bounded by
    /// flow control, and one whose client stops reading misses the keep-alive pings.)
    pub const fn write_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.write_timeout = forever_if_none(timeout);
        self
    }

    /// At most this many connections at once (default 10,000; at least 1, or
    /// [`serve`](Self::serve) fails with [`InvalidServer`]).
    pub const fn max_connections(mut self, max: usize) -> Self {
        self.config.max_connections = max;
        self
    }

    /// At most this many request headers (HTTP/1; 1 to 100, default 100); more gets 431.
    /// Out of range, [`serve`](Self::serve) fails with [`InvalidServer`].
    pub const fn max_headers(mut self, max: usize) -> Self {
        self.config.max_headers = max;
        self
    }

    /// At most this many bytes of request head (default 64 KiB, at least 8 KiB, or
    /// [`serve`](Self::serve) fails with [`InvalidServer`]); more gets 431 (HTTP/1) or a
    /// stream error (HTTP/2).
    pub const fn max_header_bytes(mut self, max: usize) -> Self {
        self.config.max_header_bytes = max;
        self
    }

    /// At most this many concurrent streams per HTTP/2 connection (default 200).
    pub const fn http2_max_concurrent_streams(mut self, max: u32) -> Self {
        self.config.h2_max_concurrent_streams = max;
        self
    }

    /// How long a graceful shutdown waits before cutting what is left (default 30 s).
    pub const fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Runs `give_back` (on a blocking thread) once a crowd of connections has come and
    /// gone: when at least `crowd` connections were open and the count then falls to a
    /// quarter of that peak. The peak starts again from there.
    ///
    /// This is the place to give the heap those connections freed back to the system:
    /// glibc returns freed memory only from the top of its heap, so after a crowd the
    /// process stays at its peak size otherwise (the example gateway calls glibc's
    /// `malloc_trim` here; measured, 21 MiB back to 7 MiB after 5,000 idle connections
    /// closed, from 5 MiB before they opened).
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// let server = gateway_proxy::Server::bind("0.0.0.0:8080")
    ///     .await?
    ///     .shrink_after_close(1024, || tracing::info!("a crowd of connections has closed"));
    /// # drop(server); Ok(()) }
    /// ```
    pub fn shrink_after_close(
        mut self,
        crowd: usize,
        give_back: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        self.shrink = Some(Shrink {
            crowd: crowd.max(1),
            give_back: Arc::new(give_back),
        });
        self
    }

    /// Reports connections into `metrics`: `gateway_connections_open`,
    /// `gateway_connections_accepted_total` and `gateway_tls_handshake_failures_total`,
    /// labelled with the listening address.
    pub fn metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Reports to `readiness`: not ready until the server serves, and not ready again from
    /// the moment it starts to drain.
    pub fn readiness(mut self, readiness: &Readiness) -> Self {
        if self.readiness.is_none() {
            readiness.inner.starting.fetch_add(1, Ordering::Relaxed);
        }
        self.readiness = Some(readiness.clone());
        self
    }

    /// Terminates TLS with `tls` (ALPN `h2` and `http/1.1`).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Serves `service` until Ctrl-C or SIGTERM, then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// Only when the listener itself fails for good; per-connection errors are logged.
    pub async fn serve<S, B>(self, service: S) -> io::Result<()>
    where
        S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.serve_with_shutdown(service, shutdown_signal()).await
    }

    /// Serves `service` until `signal` completes, then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// When a setting is out of range (an [`io::ErrorKind::InvalidInput`] error whose
    /// source is [`InvalidServer`]), or when the listener itself fails for good;
    /// per-connection errors are logged.
    pub async fn serve_with_shutdown<S, B, F>(self, service: S, signal: F) -> io::Result<()>
    where
        S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        F: Future<Output = ()> + Send,
    {
        let Self {
            listener,
            config,
            tls,
            shrink,
            metrics,
            readiness,
        } = self;
        config
            .validate()
            .map_err(|invalid| io::Error::new(io::ErrorKind::InvalidInput, invalid))?;
        let local = listener.local_addr()?;
        let metrics = metrics.map(|m| ConnMetrics::new(&m, local));
        let shared = Arc::new(conn::ConnShared {
            http2: http2_builder(&config),
            limits: h1::Limits {
                max_headers: config.max_headers,
                max_head: config.max_header_bytes,
                write_timeout: config.write_timeout,
            },
            header_read_timeout: config.header_read_timeout,
            keep_alive_timeout: config.keep_alive_timeout,
            permits: Arc::new(Semaphore::new(config.max_connections)),
            tls: tls.map(|t| t.acceptor()),
            drain: Drain::new(),
            local,
            metrics,
        });
        if let Some(readiness) = &readiness {
            readiness.inner.starting.fetch_sub(1, Ordering::Relaxed);
        }
        let (graceful_tx, graceful_rx) = watch::channel(false);
        let mut tasks = Tasks {
            set: JoinSet::new(),
            peak: 0,
            shrink,
        };
        let mut signal = std::pin::pin!(signal);

        loop {
            tokio::select! {
                biased;
                () = &mut signal => break,
                Some(done) = tasks.set.join_next(), if !tasks.set.is_empty() => tasks.ended(done),
                accepted = accept(&listener, &shared.permits) => match accepted {
                    Ok((stream, peer, permit)) => {
                        let svc = service.clone();
                        let shared = Arc::clone(&shared);
                        let graceful = graceful_rx.clone();
                        let open = shared.metrics.as_ref().map(|m| {
                            m.accepted.inc();
                            OpenConnection::new(&m.open)
                        });
                        tasks.spawn(async move {
                            conn::serve(stream, peer, svc, shared, graceful).await;
                            drop((permit, open));
                        });
                    }
                    Err(err) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }

        // Refuse new connections from here on.
        drop(listener);
        if let Some(readiness) = &readiness {
            readiness.inner.draining.store(true, Ordering::Relaxed);
        }
        tasks
            .drain(&shared.drain, &graceful_tx, config.drain_timeout)
            .await;
        Ok(())
    }
}

// === impl Readiness ===

impl Readiness {
    /// Ready until a server is given it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether every server given this readiness serves, and none drains.
    pub fn is_ready(&self) -> bool {
        self.inner.starting.load(Ordering::Relaxed) == 0 && !self.is_draining()
    }

    /// Whether a server has started to drain (or [`drain`](Self::drain) was called).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Marks the gateway as draining ahead of its servers (say, on the shutdown signal,
    /// before a grace period that lets load balancers notice).
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }
}

// === impl ConnMetrics ===

impl ConnMetrics {
    fn new(metrics: &Metrics, local: SocketAddr) -> Self {
        let label = ListenerLabel {
            listener: local.to_string(),
        };
        let open: Family<ListenerLabel, Gauge> =
            metrics.family("connections_open", "Downstream connections open.");
        let accepted: Family<ListenerLabel, Counter> =
            metrics.family("connections_accepted", "Downstream connections accepted.");
        let tls_failures: Family<ListenerLabel, Counter> = metrics.family(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out.",
        );
        Self {
            open: open.get_or_create_owned(&label),
            accepted: accepted.get_or_create_owned(&label),
            tls_failures: tls_failures.get_or_create_owned(&label),
        }
    }
}

/// One open connection in the gauge, until dropped (the task ended or was aborted).
struct OpenConnection(Gauge);

impl OpenConnection {
    fn new(open: &Gauge) -> Self {
        open.inc();
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The connection tasks of a server.
struct Tasks {
    set: JoinSet<()>,
    /// The most connections open since the last shrink.
    peak: usize,
    shrink: Option<Shrink>,
}

impl Tasks {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.set.spawn(task);
        self.peak = self.peak.max(self.set.len());
    }

    /// A connection task has ended: a panic is logged, and the end of a crowd shrinks the
    /// heap (see [`Server::shrink_after_close`]).
    fn ended(&mut self, done: Result<(), tokio::task::JoinError>) {
        if let Err(err) = done
            && err.is_panic()
        {
            tracing::error!(error = %err, "connection task panicked");
        }
        let open = self.set.len();
        if let Some(shrink) = &self.shrink
            && self.peak >= shrink.crowd
            && open <= self.peak / 4
        {
            tracing::debug!(peak = self.peak, open, "a crowd of connections has closed");
            self.peak = open;
            let give_back = Arc::clone(&shrink.give_back);
            drop(tokio::task::spawn_blocking(move || give_back()));
        }
    }

    /// Asks every connection to finish, waits for them and for the tunnels `drain` tracks,
    /// up to `deadline`, then cuts what is left.
    async fn drain(mut self, drain: &Drain, graceful: &watch::Sender<bool>, deadline: Duration) {
        tracing::info!(
            connections = self.set.len(),
            tunnels = drain.tracked(),
            "shutting down"
        );
        let _ = graceful.send(true);
        let drained = async {
            while self.set.join_next().await.is_some() {}
            drain.idle().await;
        };
        if tokio::time::timeout(deadline, drained).await.is_err() {
            tracing::warn!(
                connections = self.set.len(),
                tunnels = drain.tracked(),
                "drain deadline reached; closing what is left"
            );
        }
        drain.cut();
        self.set.abort_all();
        while self.set.join_next().await.is_some() {}
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("shrink_after_close", &self.shrink.as_ref().map(|s| s.crowd))
            .finish()
    }
}

async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> io::Result<(
    tokio::net::TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let permit = Arc::clone(permits)
        .acquire_owned()
        .await
        .map_err(io::Error::other)?;
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, permit))
}

/// A timeout that may be turned off: `None` is a duration no deadline reaches (see
/// [`gateway_core::time::deadline`]).
const fn forever_if_none(timeout: Option<Duration>) -> Duration {
    match timeout {
        Some(timeout) => timeout,
        None => Duration::MAX,
    }
}

/// hyper's HTTP/2 server, with the server's limits.
fn http2_builder(config: &Config) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Completes on Ctrl-C or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
