//! The pooled HTTP client the proxy forwards with.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway_core::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A pooled HTTP/1.1 + HTTP/2 client with rustls, shared by any number of proxies.
///
/// Cloning is cheap: clones share the connection pool.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Body>,
    http2_only: bool,
}

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
    pub const fn is_http2_only(&self) -> bool {
        self.http2_only
    }

    pub(crate) fn request(
        &self,
        req: http::Request<Body>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        self.inner.request(req)
    }
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("http2_only", &self.http2_only)
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

        let inner = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            .http2_only(self.http2_only)
            .build(https);
        Ok(HttpClient {
            inner,
            http2_only: self.http2_only,
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
