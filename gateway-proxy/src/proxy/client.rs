//! The pooled HTTP client the proxy forwards with.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gateway_core::{Body, Error, ErrorKind};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tower::ServiceExt;

use super::pool::{Checkin, Conn, H1, Io, Pool, spawn_conn};
use crate::io::Coalesce;
use crate::upstream::Endpoint;

/// A pooled HTTP/1.1 + HTTP/2 client with rustls, shared by any number of proxies.
///
/// Connections are pooled per upstream endpoint (see the `pool` module): HTTP/1.1 ones
/// are reused once a response body has been read to the end, HTTP/2 ones are shared.
/// Cloning is cheap: clones share the pools.
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tells this client's pools apart from other clients' on a shared endpoint.
    id: u64,
    connector: HttpsConnector<HttpConnector>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    http2_only: bool,
    idle_timeout: Duration,
    park_after: Option<Duration>,
    max_idle: usize,
}

/// The upstream's response head, and what returns its connection to the pool once the
/// response body has been read.
pub(crate) struct Sent {
    pub(crate) response: Response<Incoming>,
    pub(crate) checkin: Option<Checkin>,
}

/// The future of [`HttpClient::send`].
pub(crate) type SendFuture = Pin<Box<dyn Future<Output = Result<Sent, Error>> + Send>>;

/// How many pooled connections a request may find closed before it gets a new one.
const STALE_RETRIES: usize = 2;

/// A pooled connection idle for at least this long may have been closed by the upstream's
/// keep-alive timeout as we use it; a replayable request sent on it keeps a copy. Busier
/// connections skip the copy: upstream keep-alive timeouts are seconds, not milliseconds.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// Builds an [`HttpClient`].
///
/// ```
/// use gateway_proxy::HttpClient;
/// use std::time::Duration;
///
/// let client = HttpClient::builder()
///     .connect_timeout(Duration::from_secs(2))
///     .pool_idle_timeout(Duration::from_secs(30))
///     .build()
///     .unwrap();
/// # drop(client);
/// ```
#[derive(Debug, Clone)]
pub struct HttpClientBuilder {
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_park_after: Option<Duration>,
    pool_max_idle_per_host: usize,
    tcp_keepalive: Option<Duration>,
    http2_only: bool,
    webpki_roots: bool,
    extra_roots: Vec<CertificateDer<'static>>,
}

/// A client configuration that cannot be used.
#[derive(Debug)]
pub struct InvalidClient {
    reason: String,
}

// === impl HttpClient ===

impl HttpClient {
    /// Starts a builder with production defaults.
    pub fn builder() -> HttpClientBuilder {
        HttpClientBuilder::default()
    }

    /// Whether every upstream connection speaks HTTP/2.
    pub fn is_http2_only(&self) -> bool {
        self.inner.http2_only
    }

    /// Sends `req` to `endpoint` on a pooled connection or a new one. The request's URI
    /// needs only a path: the client puts it in the form the connection's protocol wants
    /// and adds `Host` to HTTP/1.1 requests that have none.
    pub(crate) fn send(&self, endpoint: &Endpoint, req: Request<Body>) -> SendFuture {
        let inner = &self.inner;
        let pool = self.pool(endpoint);
        match pool.checkout() {
            // The common case: an idle HTTP/1.1 connection takes the request at once, and
            // the (small) future only waits for the response head.
            Some(Conn::H1(conn, Some(since))) => Box::pin(inner.send_idle(pool, conn, since, req)),
            Some(Conn::Parked(io, since)) => {
                let inner = Arc::clone(inner);
                Box::pin(async move {
                    let conn = pool.resume(&inner.h1, io).await.map_err(handshake_failed)?;
                    inner.send_idle(pool, conn, since, req).await
                })
            }
            conn => Box::pin(Arc::clone(inner).send(pool, req, conn, 0)),
        }
    }

    /// Like [`send`](Self::send), for a request that asks to upgrade the connection: on
    /// HTTP/1.1 it goes on a new connection of its own, which can become a tunnel (pooled
    /// connections cannot, see `Pool::spawn_h1`).
    pub(crate) fn send_upgrade(&self, endpoint: &Endpoint, req: Request<Body>) -> SendFuture {
        let inner = Arc::clone(&self.inner);
        let pool = self.pool(endpoint);
        if inner.http2_only || pool.speaks_h2() {
            return Box::pin(inner.send(pool, req, None, 0));
        }
        Box::pin(async move {
            let conn = Box::pin(inner.connect(&pool, false)).await?;
            inner.send(pool, req, Some(conn), STALE_RETRIES).await
        })
    }

    /// This client's pool for `endpoint`.
    fn pool(&self, endpoint: &Endpoint) -> Arc<Pool> {
        let inner = &self.inner;
        endpoint.pools.get(inner.id, || {
            Pool::new(
                endpoint,
                inner.idle_timeout,
                inner.park_after,
                inner.max_idle,
            )
        })
    }
}

/// Sends `req` on an HTTP/1.1 connection that returns to `pool` once the response is read.
async fn send_h1(
    pool: &Arc<Pool>,
    mut conn: H1,
    mut req: Request<Body>,
) -> Result<Sent, TrySendError<Request<Body>>> {
    pool.http1_form(&mut req);
    let response = conn.tx.try_send_request(req).await?;
    Ok(Sent {
        response,
        checkin: Some(Checkin::new(Arc::clone(pool), conn)),
    })
}

/// A new connection that could not be set up.
fn handshake_failed(err: hyper::Error) -> Error {
    Error::with_source(ErrorKind::UpstreamConnect, err)
}

impl Inner {
    /// Sends `req` on a connection that was idle in the pool since `since`.
    fn send_idle(
        self: &Arc<Self>,
        pool: Arc<Pool>,
        mut conn: H1,
        since: tokio::time::Instant,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Sent, Error>> + Send + use<> {
        // NOTE: the request is handed to the connection here and the future only waits
        // for the answer, which keeps the common case's future small (it is not
        // `send_h1`, whose future would hold the request until first polled).
        pool.http1_form(&mut req);
        // A connection that sat idle may have been closed by the upstream just as we write
        // to it. Keep what it takes to send a replayable request again.
        let replay = (since.elapsed() >= REPLAY_AFTER_IDLE)
            .then(|| replayable(&req))
            .flatten();
        let sent = conn.tx.try_send_request(req);
        let inner = Arc::clone(self);
        async move {
            match sent.await {
                Ok(response) => Ok(Sent {
                    response,
                    checkin: Some(Checkin::new(pool, conn)),
                }),
                Err(refused) => inner.after_refusal(pool, refused, replay).await,
            }
        }
    }

    /// Sends `req` on `conn`, or on a connection from the pool or a new one; `stale`
    /// pooled connections were already found closed.
    async fn send(
        self: Arc<Self>,
        pool: Arc<Pool>,
        mut req: Request<Body>,
        mut conn: Option<Conn>,
        mut stale: usize,
    ) -> Result<Sent, Error> {
        loop {
            let (conn, pooled) = match conn.take().or_else(|| pool.checkout()) {
                Some(conn) => (conn, true),
                None if self.http2_only || pool.speaks_h2() => {
                    // One connection carries every request: wait for one being made.
                    let _connecting = pool.h2_connecting.lock().await;
                    match pool.checkout() {
                        Some(conn) => (conn, true),
                        None => (Box::pin(self.connect(&pool, true)).await?, false),
                    }
                }
                None => (Box::pin(self.connect(&pool, true)).await?, false),
            };
            let sent = match conn {
                Conn::H1(conn, _) => send_h1(&pool, conn, req).await,
                Conn::Parked(socket, _) => {
                    let conn = pool
                        .resume(&self.h1, socket)
                        .await
                        .map_err(handshake_failed)?;
                    send_h1(&pool, conn, req).await
                }
                Conn::H2(mut tx) => {
                    pool.http2_form(&mut req);
                    tx.try_send_request(req).await.map(|response| Sent {
                        response,
                        checkin: None,
                    })
                }
            };
            let mut refused = match sent {
                Ok(sent) => return Ok(sent),
                Err(refused) => refused,
            };
            match refused.take_message() {
                // Nothing was written: the pooled connection was closed under us.
                Some(again) if pooled && stale < STALE_RETRIES => {
                    stale += 1;
                    req = again;
                }
                _ => return Err(exchange_error(refused.into_error())),
            }
        }
    }

    /// What follows a failed request on a pooled connection:
    /// - nothing was written (the connection was closed under us): another connection;
    /// - the connection had been idle, the request is idempotent and bodiless, and the
    ///   upstream closed or reset it without an answer: the request again, on a new
    ///   connection (RFC 9110 §9.2.2);
    /// - otherwise the error.
    fn after_refusal(
        self: Arc<Self>,
        pool: Arc<Pool>,
        mut refused: TrySendError<Request<Body>>,
        replay: Option<Request<Body>>,
    ) -> SendFuture {
        if let Some(req) = refused.take_message() {
            return Box::pin(self.send(pool, req, None, 1));
        }
        let err = refused.into_error();
        match replay {
            Some(req) if closed_without_answer(&err) => {
                tracing::debug!(error = %err, "idle upstream connection closed under the request; sending it again");
                Box::pin(async move {
                    let conn = self.connect(&pool, true).await?;
                    self.send(pool, req, Some(conn), STALE_RETRIES).await
                })
            }
            _ => Box::pin(std::future::ready(Err(exchange_error(err)))),
        }
    }

    /// Dials the endpoint, negotiates the protocol and spawns the connection task; a
    /// `parkable` plain HTTP/1.1 connection may be parked when idle.
    async fn connect(&self, pool: &Arc<Pool>, parkable: bool) -> Result<Conn, Error> {
        let io = self
            .connector
            .clone()
            .oneshot(pool.target.clone())
            .await
            .map_err(|e| Error::with_source(ErrorKind::UpstreamConnect, e))?;
        let h2 = self.http2_only || io.connected().is_negotiated_h2();
        let plain = matches!(io, MaybeHttpsStream::Http(_));
        let io: Io = Coalesce::new(io);
        if h2 {
            let (tx, conn) = self.h2.handshake(io).await.map_err(handshake_failed)?;
            spawn_conn(conn, "upstream HTTP/2 connection failed");
            pool.set_h2(tx.clone());
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = self.h1.handshake(io).await.map_err(handshake_failed)?;
            Ok(Conn::H1(pool.spawn_h1(tx, conn, parkable && plain), None))
        }
    }
}

/// A copy of `req` to send again, if it may be: an idempotent method and no body.
fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(Body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether the upstream closed or reset the connection without answering.
fn closed_without_answer(err: &hyper::Error) -> bool {
    err.is_incomplete_message()
        || err.is_canceled()
        || err.is_closed()
        || std::error::Error::source(err).is_some_and(|e| e.is::<std::io::Error>())
}

/// A failed exchange: a failure of our own request body (the client stalled: 408) keeps
/// its kind; anything else broke the exchange with the upstream (502).
fn exchange_error(err: hyper::Error) -> Error {
    let kind = match Error::kind_of(&err) {
        ErrorKind::Internal => ErrorKind::BadGateway,
        kind => kind,
    };
    Error::with_source(kind, err)
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("http2_only", &self.inner.http2_only)
            .finish_non_exhaustive()
    }
}

// === impl HttpClientBuilder ===

impl Default for HttpClientBuilder {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(60),
            pool_park_after: Some(Duration::from_secs(1)),
            pool_max_idle_per_host: 256,
            tcp_keepalive: Some(Duration::from_secs(60)),
            http2_only: false,
            webpki_roots: true,
            extra_roots: Vec::new(),
        }
    }
}

impl HttpClientBuilder {
    /// How long establishing a TCP connection may take (default 5 s). A connect that times
    /// out is an unreachable upstream (502).
    ///
    /// ```
    /// # use std::time::Duration;
    /// gateway_proxy::HttpClient::builder().connect_timeout(Duration::from_millis(500));
    /// ```
    pub fn connect_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an idle pooled connection is kept (default 60 s); keep it below the
    /// upstream's own keep-alive timeout so the gateway closes first.
    ///
    /// ```
    /// # use std::time::Duration;
    /// gateway_proxy::HttpClient::builder().pool_idle_timeout(Duration::from_secs(20));
    /// ```
    pub fn pool_idle_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// How long a plain-text HTTP/1.1 connection stays idle in the pool before it is parked
    /// (default 1 s; `None` never parks).
    ///
    /// A parked connection keeps only its socket: hyper's buffers, its request channel and
    /// its task (about 29 KiB) are freed, as nginx and HAProxy free the buffers of idle
    /// upstream connections. The next request that takes it starts a new hyper connection
    /// on the socket (no new TCP connection), after checking that the upstream has neither
    /// closed it nor sent anything. Connections over TLS are not parked.
    ///
    /// ```
    /// # use std::time::Duration;
    /// gateway_proxy::HttpClient::builder().pool_park_after(Some(Duration::from_secs(5)));
    /// ```
    pub fn pool_park_after(&mut self, delay: Option<Duration>) -> &mut Self {
        self.pool_park_after = delay;
        self
    }

    /// At most this many idle connections per upstream host are kept (default 256).
    ///
    /// ```
    /// gateway_proxy::HttpClient::builder().pool_max_idle_per_host(32);
    /// ```
    pub fn pool_max_idle_per_host(&mut self, max: usize) -> &mut Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// TCP keep-alive probes on upstream connections (default every 60 s; `None` disables).
    ///
    /// ```
    /// gateway_proxy::HttpClient::builder().tcp_keepalive(None);
    /// ```
    pub fn tcp_keepalive(&mut self, interval: Option<Duration>) -> &mut Self {
        self.tcp_keepalive = interval;
        self
    }

    /// Speak HTTP/2 to every upstream: prior knowledge (h2c) for `http`, ALPN `h2` for
    /// `https`. Needed for gRPC. Without it, `https` upstreams negotiate HTTP/2 or HTTP/1.1
    /// by ALPN and `http` upstreams get HTTP/1.1.
    ///
    /// ```
    /// gateway_proxy::HttpClient::builder().http2_only(true);
    /// ```
    pub fn http2_only(&mut self, enabled: bool) -> &mut Self {
        self.http2_only = enabled;
        self
    }

    /// Whether the Mozilla root certificates (webpki-roots) are trusted (default yes).
    ///
    /// ```
    /// gateway_proxy::HttpClient::builder().webpki_roots(false);
    /// ```
    pub fn webpki_roots(&mut self, enabled: bool) -> &mut Self {
        self.webpki_roots = enabled;
        self
    }

    /// Trusts the CA certificates of a PEM bundle as well, for private upstream PKIs.
    ///
    /// ```
    /// let mut builder = gateway_proxy::HttpClient::builder();
    /// assert!(builder.add_root_pem(b"not a pem").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// When the bundle holds no certificate or cannot be parsed.
    pub fn add_root_pem(&mut self, pem: &[u8]) -> Result<&mut Self, InvalidClient> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InvalidClient {
                reason: format!("bad CA bundle: {e}"),
            })?;
        if certs.is_empty() {
            return Err(InvalidClient {
                reason: "the CA bundle holds no certificate".into(),
            });
        }
        self.extra_roots.extend(certs);
        Ok(self)
    }

    /// Reads a PEM CA bundle from `path` (see [`HttpClientBuilder::add_root_pem`]).
    ///
    /// ```
    /// let mut builder = gateway_proxy::HttpClient::builder();
    /// assert!(builder.add_root_pem_file("/nonexistent/ca.pem").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// When the file cannot be read or parsed.
    pub fn add_root_pem_file(
        &mut self,
        path: impl AsRef<Path>,
    ) -> Result<&mut Self, InvalidClient> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| InvalidClient {
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        self.add_root_pem(&pem)
    }

    /// Builds the client.
    ///
    /// # Errors
    ///
    /// When the TLS configuration cannot be built (no root certificate at all).
    pub fn build(&self) -> Result<HttpClient, InvalidClient> {
        let mut roots = RootCertStore::empty();
        if self.webpki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for cert in &self.extra_roots {
            roots.add(cert.clone()).map_err(|e| InvalidClient {
                reason: format!("unusable CA certificate: {e}"),
            })?;
        }
        if roots.is_empty() {
            return Err(InvalidClient {
                reason: "no root certificate is trusted".into(),
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| InvalidClient {
                reason: format!("TLS: {e}"),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_keepalive(self.tcp_keepalive);

        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let https = if self.http2_only {
            https.enable_http2().wrap_connector(http)
        } else {
            https.enable_all_versions().wrap_connector(http)
        };

        let h1 = http1::Builder::new();
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(HttpClient {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                connector: https,
                h1,
                h2,
                http2_only: self.http2_only,
                idle_timeout: self.pool_idle_timeout,
                park_after: self.pool_park_after,
                max_idle: self.pool_max_idle_per_host,
            }),
        })
    }
}

// === impl InvalidClient ===

impl InvalidClient {
    pub(crate) const fn new(reason: String) -> Self {
        Self { reason }
    }
}

impl fmt::Display for InvalidClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid proxy client: {}", self.reason)
    }
}

impl std::error::Error for InvalidClient {}
