//! The pooled HTTP client the proxy forwards with.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_rustls::TlsConnector;
use tower::ServiceExt;

use super::exchange::{Exchange, Failed, Outbound};
use super::pool::{Pool, Ready, spawn_conn};
use crate::invalid::Invalid;
use crate::io::{Coalesce, Stream};
use crate::upstream::Endpoint;

pub(crate) use super::exchange::Sent;

/// A pooled HTTP/1.1 + HTTP/2 client with rustls, shared by any number of proxies.
///
/// Connections are pooled per upstream endpoint (see the `pool` module): an HTTP/1.1 one
/// is reused once its response has been read to the end, an HTTP/2 one is shared.
/// Cloning is cheap: clones share the pools.
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Tells this client's pools apart from other clients' on a shared endpoint.
    id: u64,
    connector: HttpConnector,
    tls: TlsConnector,
    h2: http2::Builder<TokioExecutor>,
    http2_only: bool,
    idle_timeout: Duration,
    max_idle: usize,
    /// The endpoints of the requests sent through [`Service::call`], by scheme and
    /// authority, so that their connections are pooled: at most [`MAX_ORIGINS`] of them.
    origins: Mutex<HashMap<(Scheme, Authority), Arc<Endpoint>>>,
}

/// The most origins a client called as a `Service` keeps pools for; past that, the pools of
/// one it knows are let go (their connections close once idle) to make room.
const MAX_ORIGINS: usize = 64;

/// The future of [`HttpClient::send`].
pub(crate) enum Sending {
    /// An exchange on a pooled HTTP/1.1 connection: the common case, not boxed.
    Pooled {
        exchange: Exchange,
        client: Arc<Inner>,
    },
    /// Anything else: a new connection, HTTP/2, a request sent again.
    Other(Pin<Box<dyn Future<Output = Result<Sent, SendError>> + Send>>),
}

/// A failed send, with the request when none of it left: its connection could not be
/// opened, so it can go to another endpoint as it is.
pub(crate) struct SendError {
    pub(crate) error: Error,
    pub(crate) unsent: Option<Box<(Request<Body>, Outbound)>>,
}

/// Builds an [`HttpClient`].
///
/// ```
/// use gateway_proxy::HttpClient;
/// use std::time::Duration;
///
/// let client = HttpClient::builder()
///     .connect_timeout(Some(Duration::from_secs(2)))
///     .pool_idle_timeout(Some(Duration::from_secs(30)))
///     .build()
///     .unwrap();
/// # drop(client);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct HttpClientBuilder {
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    tcp_keepalive: Option<Duration>,
    http2_only: bool,
    webpki_roots: bool,
    extra_roots: Vec<CertificateDer<'static>>,
}

/// A client configuration that cannot be used: what is wrong, and the cause (if any) as
/// the error's `source`.
#[derive(Debug)]
pub struct InvalidClient(Invalid);

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

    /// Sends `req` to `endpoint` on a pooled connection or a new one, as `out` says. The
    /// request's URI needs only a path: the client puts it in the form the connection's
    /// protocol wants and adds `Host` to HTTP/1.1 requests that have none.
    pub(crate) fn send(&self, endpoint: &Endpoint, req: Request<Body>, out: Outbound) -> Sending {
        let client = Arc::clone(&self.inner);
        let pool = self.pool(endpoint);
        match pool.checkout() {
            // The common case: the exchange runs at once on an idle connection.
            Some(Ready::H1(io, reused)) => Sending::Pooled {
                exchange: Exchange::new(io, reused, pool, req, out),
                client,
            },
            Some(Ready::H2(tx)) => Sending::Other(Box::pin(async move {
                client
                    .send_h2(pool, tx, req, out)
                    .await
                    .map_err(SendError::from)
            })),
            None => Sending::Other(Box::pin(client.send_new(pool, req, out))),
        }
    }

    /// This client's pool for `endpoint`.
    fn pool(&self, endpoint: &Endpoint) -> Arc<Pool> {
        let inner = &self.inner;
        endpoint.pools.get(inner.id, || {
            Pool::new(endpoint, inner.idle_timeout, inner.max_idle)
        })
    }
}

impl Inner {
    /// Runs the exchange of `req` on an HTTP/1.1 connection. A request the upstream closed
    /// a pooled connection under without answering is sent again on a new connection, if
    /// it is idempotent and bodiless (RFC 9110 §9.2.2); a POST never is.
    async fn exchange(
        self: Arc<Self>,
        pool: Arc<Pool>,
        io: Stream,
        reused: bool,
        req: Request<Body>,
        out: Outbound,
    ) -> Result<Sent, Error> {
        match Exchange::new(io, reused, pool, req, out).await {
            Ok(sent) => Ok(sent),
            Err(failed) => self.after(failed).await,
        }
    }

    /// After a failed exchange: the request again on a new connection, if it may be sent
    /// again; otherwise the error.
    async fn after(self: Arc<Self>, failed: Failed) -> Result<Sent, Error> {
        let Failed {
            error,
            replay: Some(replay),
        } = failed
        else {
            return Err(failed.error);
        };
        tracing::debug!(%error, "pooled upstream connection closed under the request; sending it again");
        let pool = Arc::clone(&replay.pool);
        if let Ready::H1(io, _) = Box::pin(self.connect(&pool)).await? {
            return Exchange::replay(io, *replay)
                .await
                .map_err(|failed| failed.error);
        }
        // The endpoint answered the new connection with HTTP/2: a head written for HTTP/1.1
        // cannot go on it.
        Err(error)
    }

    /// Sends `req` on a new connection; with HTTP/2, on the one connection being made.
    async fn send_new(
        self: Arc<Self>,
        pool: Arc<Pool>,
        req: Request<Body>,
        out: Outbound,
    ) -> Result<Sent, SendError> {
        let conn = if self.http2_only || pool.speaks_h2() {
            // One connection carries every request: wait for one being made.
            let _connecting = pool.h2_connecting.lock().await;
            match pool.checkout() {
                Some(conn) => Ok(conn),
                None => Box::pin(self.connect(&pool)).await,
            }
        } else {
            Box::pin(self.connect(&pool)).await
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(error) => {
                return Err(SendError {
                    error,
                    unsent: Some(Box::new((req, out))),
                });
            }
        };
        let sent = match conn {
            Ready::H1(io, reused) => self.exchange(pool, io, reused, req, out).await,
            Ready::H2(tx) => self.send_h2(pool, tx, req, out).await,
        };
        sent.map_err(SendError::from)
    }

    /// Sends `req` on the shared HTTP/2 connection; if it closed before taking the request,
    /// on a new one.
    async fn send_h2(
        self: Arc<Self>,
        pool: Arc<Pool>,
        mut tx: http2::SendRequest<Body>,
        mut req: Request<Body>,
        mut out: Outbound,
    ) -> Result<Sent, Error> {
        out.apply(req.headers_mut());
        pool.http2_form(&mut req);
        let refused = match tx.try_send_request(req).await {
            Ok(response) => return Ok(Sent::h2(response)),
            Err(refused) => refused,
        };
        let mut refused = refused;
        let Some(req) = refused.take_message() else {
            return Err(exchange_error(refused.into_error()));
        };
        // Nothing was sent: the connection had closed under us.
        let Ready::H2(mut tx) = Box::pin(self.connect(&pool)).await? else {
            return Err(exchange_error(refused.into_error()));
        };
        tx.send_request(req)
            .await
            .map(Sent::h2)
            .map_err(exchange_error)
    }

    /// Dials the endpoint, with TLS for `https`, and sets up the protocol it speaks: an
    /// HTTP/1.1 connection is its socket; an HTTP/2 one runs in a task and is shared.
    async fn connect(&self, pool: &Arc<Pool>) -> Result<Ready, Error> {
        let connect_failed =
            |e: gateway_core::BoxError| Error::with_source(ErrorKind::UpstreamConnect, e);
        let tcp = self
            .connector
            .clone()
            .oneshot(pool.target.clone())
            .await
            .map_err(|e| connect_failed(e.into()))?
            .into_inner();
        let io = match &pool.server_name {
            None => Stream::Plain(tcp),
            Some(name) => {
                let tls = self
                    .tls
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| connect_failed(e.into()))?;
                Stream::Tls(Box::new(tls))
            }
        };
        if !(self.http2_only || io.is_h2()) {
            return Ok(Ready::H1(io, false));
        }
        let (tx, conn) = self
            .h2
            .handshake(Coalesce::new(TokioIo::new(io)))
            .await
            .map_err(|e| connect_failed(e.into()))?;
        spawn_conn(conn, "upstream HTTP/2 connection failed");
        pool.set_h2(tx.clone());
        Ok(Ready::H2(tx))
    }
}

/// Sends a request whose URI is absolute (`http://host:port/path`, `https://host/path`)
/// to that origin, on a pooled connection: for layers that call upstreams of their own (a
/// JWKS fetch, a probe). Errors are [`gateway_core::Error`]s, as the proxy's are; a URI
/// without scheme and authority is refused without a connection.
///
/// ```no_run
/// use gateway_core::Body;
/// use gateway_proxy::HttpClient;
/// use tower::ServiceExt;
///
/// # async fn run() -> Result<(), gateway_core::BoxError> {
/// let client = HttpClient::builder().build()?;
/// let req = http::Request::get("https://idp.example/.well-known/jwks.json").body(Body::empty())?;
/// let res = client.oneshot(req).await?;
/// # drop(res); Ok(()) }
/// ```
impl tower::Service<Request<Body>> for HttpClient {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let (Some(scheme), Some(authority)) = (req.uri().scheme(), req.uri().authority()) else {
            let err = Error::with_source(
                ErrorKind::Internal,
                "a request sent through HttpClient needs an absolute URI",
            );
            return ResponseFuture(CallState::Refused(Some(err)));
        };
        let endpoint = {
            let key = (scheme.clone(), authority.clone());
            let mut origins = self
                .inner
                .origins
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if origins.len() >= MAX_ORIGINS && !origins.contains_key(&key) {
                let evicted = origins.keys().next().cloned();
                if let Some(evicted) = evicted {
                    origins.remove(&evicted);
                }
            }
            Arc::clone(
                origins
                    .entry(key)
                    .or_insert_with(|| Arc::new(Endpoint::new(scheme.clone(), authority.clone()))),
            )
        };
        ResponseFuture(CallState::Sending(self.send(
            &endpoint,
            req,
            Outbound::default(),
        )))
    }
}

/// The future of an [`HttpClient`] called as a `Service`.
pub struct ResponseFuture(CallState);

enum CallState {
    Sending(Sending),
    Refused(Option<Error>),
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            CallState::Sending(sending) => match ready!(Pin::new(sending).poll(cx)) {
                Ok(sent) => Poll::Ready(Ok(sent.response)),
                Err(err) => Poll::Ready(Err(err.into())),
            },
            CallState::Refused(err) => Poll::Ready(Err(err
                .take()
                .unwrap_or_else(|| Error::new(ErrorKind::Internal))
                .into())),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

// === impl Sending ===

impl Sending {
    /// Polls the send; a failure gives the request back when none of it left.
    pub(crate) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Sent, SendError>> {
        loop {
            match self {
                Self::Pooled { exchange, client } => {
                    let failed = match ready!(Pin::new(exchange).poll(cx)) {
                        Ok(sent) => return Poll::Ready(Ok(sent)),
                        Err(failed) if failed.replay.is_none() => {
                            return Poll::Ready(Err(failed.error.into()));
                        }
                        Err(failed) => failed,
                    };
                    let client = Arc::clone(client);
                    *self = Self::Other(Box::pin(async move {
                        client.after(failed).await.map_err(SendError::from)
                    }));
                }
                Self::Other(fut) => return fut.as_mut().poll(cx),
            }
        }
    }
}

impl Future for Sending {
    type Output = Result<Sent, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_send(cx).map_err(|failed| failed.error)
    }
}

// === impl SendError ===

impl From<Error> for SendError {
    fn from(error: Error) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

impl fmt::Debug for Sending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sending").finish_non_exhaustive()
    }
}

/// A failed HTTP/2 exchange: a failure of our own request body (the client stalled: 408)
/// keeps its kind; anything else broke the exchange with the upstream (502).
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
            pool_max_idle_per_host: 256,
            tcp_keepalive: Some(Duration::from_secs(60)),
            http2_only: false,
            webpki_roots: true,
            extra_roots: Vec::new(),
        }
    }
}

impl HttpClientBuilder {
    /// How long establishing a TCP connection may take (default 5 s; `None` for as long as
    /// the system allows). A connect that times
    /// out is an unreachable upstream (502).
    ///
    /// ```
    /// # use std::time::Duration;
    /// gateway_proxy::HttpClient::builder().connect_timeout(Some(Duration::from_millis(500)));
    /// ```
    pub fn connect_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.connect_timeout = timeout.unwrap_or(Duration::MAX);
        self
    }

    /// How long an idle pooled connection is kept (default 60 s; `None` for as long as the
    /// upstream keeps it); keep it below the
    /// upstream's own keep-alive timeout so the gateway closes first.
    ///
    /// ```
    /// # use std::time::Duration;
    /// gateway_proxy::HttpClient::builder().pool_idle_timeout(Some(Duration::from_secs(20)));
    /// ```
    pub fn pool_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.pool_idle_timeout = timeout.unwrap_or(Duration::MAX);
        self
    }

    /// At most this many idle connections per upstream host are kept (default 256).
    ///
    /// ```
    /// gateway_proxy::HttpClient::builder().pool_max_idle_per_host(32);
    /// ```
    pub fn pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// TCP keep-alive probes on upstream connections (default every 60 s; `None` disables).
    ///
    /// ```
    /// gateway_proxy::HttpClient::builder().tcp_keepalive(None);
    /// ```
    pub fn tcp_keepalive(mut self, interval: Option<Duration>) -> Self {
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
    pub fn http2_only(mut self, enabled: bool) -> Self {
        self.http2_only = enabled;
        self
    }

    /// Whether the Mozilla root certificates (webpki-roots) are trusted (default yes).
    ///
    /// ```
    /// gateway_proxy::HttpClient::builder().webpki_roots(false);
    /// ```
    pub fn webpki_roots(mut self, enabled: bool) -> Self {
        self.webpki_roots = enabled;
        self
    }

    /// Trusts the CA certificates of a PEM bundle as well, for private upstream PKIs.
    ///
    /// ```
    /// let builder = gateway_proxy::HttpClient::builder();
    /// assert!(builder.add_root_pem(b"not a pem").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// When the bundle holds no certificate or cannot be parsed.
    pub fn add_root_pem(mut self, pem: &[u8]) -> Result<Self, InvalidClient> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InvalidClient(Invalid::because("the CA bundle cannot be parsed", e)))?;
        if certs.is_empty() {
            return Err(InvalidClient(Invalid::new(
                "the CA bundle holds no certificate",
            )));
        }
        self.extra_roots.extend(certs);
        Ok(self)
    }

    /// Reads a PEM CA bundle from `path` (see [`HttpClientBuilder::add_root_pem`]).
    ///
    /// ```
    /// let builder = gateway_proxy::HttpClient::builder();
    /// assert!(builder.add_root_pem_file("/nonexistent/ca.pem").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// When the file cannot be read or parsed.
    pub fn add_root_pem_file(self, path: impl AsRef<Path>) -> Result<Self, InvalidClient> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| {
            InvalidClient(Invalid::because(
                format!("cannot read {}", path.display()),
                e,
            ))
        })?;
        self.add_root_pem(&pem)
    }

    /// Builds the client.
    ///
    /// # Errors
    ///
    /// When the TLS configuration cannot be built (no root certificate at all).
    pub fn build(self) -> Result<HttpClient, InvalidClient> {
        let mut roots = RootCertStore::empty();
        if self.webpki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for cert in &self.extra_roots {
            roots.add(cert.clone()).map_err(|e| {
                InvalidClient(Invalid::because("a CA certificate cannot be used", e))
            })?;
        }
        if roots.is_empty() {
            return Err(InvalidClient(Invalid::new(
                "no root certificate is trusted",
            )));
        }
        let provider = crate::crypto::provider();
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| InvalidClient(Invalid::because("the TLS configuration is refused", e)))?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut tls = tls;
        // HTTP/2 where the upstream offers it, unless told to speak nothing else.
        tls.alpn_protocols = if self.http2_only {
            vec![b"h2".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_keepalive(self.tcp_keepalive);

        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(HttpClient {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                connector: http,
                tls: TlsConnector::from(Arc::new(tls)),
                h2,
                http2_only: self.http2_only,
                idle_timeout: self.pool_idle_timeout,
                max_idle: self.pool_max_idle_per_host,
                origins: Mutex::new(HashMap::new()),
            }),
        })
    }
}

// === impl InvalidClient ===

impl fmt::Display for InvalidClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid HTTP client: {}", self.0.reason)
    }
}

impl std::error::Error for InvalidClient {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
