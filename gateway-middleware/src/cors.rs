//! Cross-origin resource sharing (the Fetch standard's CORS protocol) for the routes a
//! browser calls from another origin.
//!
//! A *preflight* (an `OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered
//! here: `204` with the allowed methods and headers when the origin is allowed, a `403`
//! problem when it is not. Every other request, an `OPTIONS` without those headers
//! included, goes to the inner service, and its response gets the `Access-Control-*`
//! headers when the origin is allowed. The layer owns those headers on its routes: the
//! upstream's are replaced, so a browser never sees two `Access-Control-Allow-Origin`s.
//! Responses say `Vary: Origin`, so a cache does not serve one origin's answer to another.
//!
//! Why not tower-http's `CorsLayer`: it answers every `OPTIONS` itself (by design), so an
//! upstream's own `OPTIONS` is unreachable behind it, and it panics on the rule a
//! config file gets wrong most (credentials with any origin). Here that rule cannot be
//! broken: credentials are never allowed with [`allow_any_origin`](CorsLayer::allow_any_origin),
//! since that would let every site read what a signed-in user can (the config refuses it).
//!
//! Put the layer outside the route's other layers (after the IP filter): a preflight must
//! not need credentials, and a `401`, `429` or `502` from inside must reach the browser with
//! its CORS headers, or the page sees an opaque network error instead.
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::cors::CorsLayer;
//! use http::{Method, Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let cors = CorsLayer::new()
//!     .allow_origin("https://app.example.com".parse().unwrap())
//!     .allow_origin("https://*.example.org".parse().unwrap())
//!     .allow_credentials(true);
//! let svc = ServiceBuilder::new().layer(cors).service(service_fn(|_: Request<Body>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//! }));
//! let preflight = Request::builder()
//!     .method(Method::OPTIONS)
//!     .header("origin", "https://shop.example.org")
//!     .header("access-control-request-method", "PUT")
//!     .body(Body::empty())
//!     .unwrap();
//! let res = svc.oneshot(preflight).await.unwrap();
//! assert_eq!(res.status(), StatusCode::NO_CONTENT);
//! assert_eq!(res.headers()["access-control-allow-origin"], "https://shop.example.org");
//! assert_eq!(res.headers()["access-control-allow-credentials"], "true");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, HeaderMap, HeaderName,
    HeaderValue, ORIGIN, VARY,
};
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

const REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
const ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

/// The methods allowed unless others are configured.
const DEFAULT_METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// Answers preflights and adds CORS headers to responses; see the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct CorsLayer {
    policy: Arc<Policy>,
}

/// The service of [`CorsLayer`].
#[derive(Clone, Debug)]
pub struct Cors<S> {
    inner: S,
    policy: Arc<Policy>,
}

/// An allowed origin: exact (`https://app.example.com`, with its port if not the
/// default), a subdomain pattern (`https://*.example.com`: any name under it, not
/// `example.com` itself), or `null` (sandboxed pages and `file:` URLs; think twice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedOrigin(OriginRule);

#[derive(Clone, Debug, PartialEq, Eq)]
enum OriginRule {
    Exact(String),
    /// `scheme://` and `.domain[:port]`: what comes before and after the `*`.
    Subdomains {
        scheme: String,
        suffix: String,
    },
}

/// Why a string is not an [`AllowedOrigin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidOrigin(String);

#[derive(Clone, Debug)]
struct Policy {
    any_origin: bool,
    origins: Vec<AllowedOrigin>,
    methods: HeaderValue,
    /// `None`: whatever the preflight asks for.
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
    private_network: bool,
}

pin_project! {
    /// Response future of [`Cors`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            fut: F,
            // The `Access-Control-Allow-Origin` of an allowed origin.
            allow: Option<HeaderValue>,
            policy: Arc<Policy>,
        },
        Answered { res: Option<Response<Body>> },
    }
}

// === impl AllowedOrigin ===

impl FromStr for AllowedOrigin {
    type Err = InvalidOrigin;

    fn from_str(text: &str) -> Result<Self, InvalidOrigin> {
        let origin = text.trim().to_ascii_lowercase();
        let invalid = |why: &str| Err(InvalidOrigin(format!("`{}` {why}", text.trim())));
        if origin == "null" {
            return Ok(Self(OriginRule::Exact(origin)));
        }
        if origin == "*" {
            return invalid("is any origin: use `allow_any_origin`");
        }
        let Some((scheme, rest)) = origin.split_once("://") else {
            return invalid("is not an origin (`https://host[:port]`)");
        };
        if scheme != "http" && scheme != "https" {
            return invalid("is not an http or https origin");
        }
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.ends_with(':') {
            return invalid(
                "is not an origin: no path, query or user, only `scheme://host[:port]`",
            );
        }
        if let Some(suffix) = rest.strip_prefix('*') {
            let domain = suffix.split(':').next().unwrap_or_default();
            if !suffix.starts_with('.') || domain.len() < 2 || suffix.contains('*') {
                return invalid(
                    "has a `*` that is not a whole leading label (`https://*.example.com`)",
                );
            }
            return Ok(Self(OriginRule::Subdomains {
                scheme: format!("{scheme}://"),
                suffix: suffix.to_owned(),
            }));
        }
        if rest.contains('*') || HeaderValue::from_str(&origin).is_err() {
            return invalid("is not an origin (`https://host[:port]`)");
        }
        Ok(Self(OriginRule::Exact(origin)))
    }
}

impl AllowedOrigin {
    fn allows(&self, origin: &[u8]) -> bool {
        match &self.0 {
            OriginRule::Exact(exact) => origin.eq_ignore_ascii_case(exact.as_bytes()),
            OriginRule::Subdomains { scheme, suffix } => {
                let (scheme, suffix) = (scheme.as_bytes(), suffix.as_bytes());
                if origin.len() <= scheme.len() + suffix.len()
                    || !origin[..scheme.len()].eq_ignore_ascii_case(scheme)
                    || !origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                {
                    return false;
                }
                // The labels the `*` stands for: a host name's characters only, so that
                // neither a port, nor a user, nor a second host can hide in them.
                let labels = &origin[scheme.len()..origin.len() - suffix.len()];
                !labels.starts_with(b".")
                    && !labels.ends_with(b".")
                    && !labels.windows(2).any(|w| w == b"..")
                    && labels
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
            }
        }
    }
}

impl fmt::Display for AllowedOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            OriginRule::Exact(exact) => f.write_str(exact),
            OriginRule::Subdomains { scheme, suffix } => write!(f, "{scheme}*{suffix}"),
        }
    }
}

impl fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidOrigin {}

// === impl CorsLayer ===

impl Default for CorsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CorsLayer {
    /// A policy that allows no origin yet; methods `GET, HEAD, POST, PUT, PATCH, DELETE`,
    /// the request headers a preflight asks for, no credentials.
    pub fn new() -> Self {
        Self {
            policy: Arc::new(Policy {
                any_origin: false,
                origins: Vec::new(),
                methods: join(DEFAULT_METHODS.iter().map(Method::as_str)),
                headers: None,
                expose: None,
                credentials: false,
                max_age: None,
                private_network: false,
            }),
        }
    }

    fn policy(&mut self) -> &mut Policy {
        Arc::make_mut(&mut self.policy)
    }

    /// Allows `origin` too.
    pub fn allow_origin(mut self, origin: AllowedOrigin) -> Self {
        self.policy().origins.push(origin);
        self
    }

    /// Allows every origin (`Access-Control-Allow-Origin: *`), for public, unauthenticated
    /// resources. Credentials are then never allowed, whatever
    /// [`allow_credentials`](Self::allow_credentials) says.
    pub fn allow_any_origin(mut self) -> Self {
        self.policy().any_origin = true;
        self
    }

    /// The methods a preflight allows.
    pub fn allow_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods: Vec<Method> = methods.into_iter().collect();
        self.policy().methods = join(methods.iter().map(Method::as_str));
        self
    }

    /// The request headers a preflight allows (by default, those it asks for).
    pub fn allow_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers: Vec<HeaderName> = headers.into_iter().collect();
        self.policy().headers = Some(join(headers.iter().map(HeaderName::as_str)));
        self
    }

    /// The response headers, beyond the CORS-safelisted ones, a page may read.
    pub fn expose_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers: Vec<HeaderName> = headers.into_iter().collect();
        self.policy().expose =
            (!headers.is_empty()).then(|| join(headers.iter().map(HeaderName::as_str)));
        self
    }

    /// Whether pages may send cookies and `Authorization` (and read the answers).
    pub fn allow_credentials(mut self, allow: bool) -> Self {
        self.policy().credentials = allow;
        self
    }

    /// How long a browser may cache a preflight's answer.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.policy().max_age = Some(HeaderValue::from(max_age.as_secs()));
        self
    }

    /// Whether a public page may call this route on a private network (Chrome's Private
    /// Network Access preflights).
    pub fn allow_private_network(mut self, allow: bool) -> Self {
        self.policy().private_network = allow;
        self
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

// === impl Policy ===

impl Policy {
    fn credentials(&self) -> bool {
        self.credentials && !self.any_origin
    }

    /// The `Access-Control-Allow-Origin` of `origin`, if it is allowed.
    fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        let origin = origin?;
        if self.any_origin {
            Some(HeaderValue::from_static("*"))
        } else if self.origins.iter().any(|o| o.allows(origin.as_bytes())) {
            Some(origin.clone())
        } else {
            None
        }
    }

    /// Puts the headers of an allowed origin's answer on `headers`.
    fn decorate(&self, allow: HeaderValue, headers: &mut HeaderMap) {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        if self.credentials() {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// Whether answers differ by `Origin` (not with `*` for everyone).
    const fn varies(&self) -> bool {
        !self.any_origin
    }

    fn preflight(&self, req: &Request<impl Sized>) -> Response<Body> {
        let Some(allow) = self.allow(req.headers().get(ORIGIN)) else {
            tracing::debug!(origin = ?req.headers().get(ORIGIN), "CORS preflight from an origin not allowed");
            let mut res = Error::new(ErrorKind::Forbidden).to_response();
            res.headers_mut().append(VARY, preflight_vary());
            return res;
        };
        let mut headers = HeaderMap::with_capacity(8);
        self.decorate(allow, &mut headers);
        headers.insert(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        let asked = req.headers().get(ACCESS_CONTROL_REQUEST_HEADERS);
        if let Some(allowed) = self.headers.as_ref().or(asked) {
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, allowed.clone());
        }
        if let Some(max_age) = &self.max_age {
            headers.insert(ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        if self.private_network
            && req
                .headers()
                .get(REQUEST_PRIVATE_NETWORK)
                .is_some_and(|v| v == "true")
        {
            headers.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
        }
        headers.insert(VARY, preflight_vary());
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        *res.headers_mut() = headers;
        res
    }
}

fn preflight_vary() -> HeaderValue {
    HeaderValue::from_static(
        "origin, access-control-request-method, access-control-request-headers",
    )
}

/// `a, b, c` as a header value (every part is a method or a header name: always valid).
fn join<'a>(parts: impl Iterator<Item = &'a str>) -> HeaderValue {
    let joined = parts.collect::<Vec<_>>().join(", ");
    HeaderValue::from_str(&joined).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether the response already varies by `Origin` (or by everything, `*`).
fn varies_by_origin(headers: &HeaderMap) -> bool {
    headers.get_all(VARY).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|name| {
            let name = name.trim_ascii();
            name == b"*" || name.eq_ignore_ascii_case(b"origin")
        })
    })
}

/// Whether `req` is a CORS preflight (not merely an `OPTIONS`).
fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(ORIGIN)
        && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

// === impl Cors ===

impl<S, ReqB, ResB> Service<Request<ReqB>> for Cors<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let state = if is_preflight(&req) {
            State::Answered {
                res: Some(self.policy.preflight(&req)),
            }
        } else {
            State::Called {
                allow: self.policy.allow(req.headers().get(ORIGIN)),
                fut: self.inner.call(req),
                policy: Arc::clone(&self.policy),
            }
        };
        ResponseFuture { state }
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut, allow, policy } => {
                let mut res = ready!(fut.poll(cx))?.map(Body::new);
                let headers = res.headers_mut();
                // The route's CORS answer is this layer's alone.
                for name in [
                    ACCESS_CONTROL_ALLOW_ORIGIN,
                    ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    ACCESS_CONTROL_EXPOSE_HEADERS,
                ] {
                    headers.remove(name);
                }
                if let Some(allow) = allow.take() {
                    policy.decorate(allow, headers);
                    if let Some(expose) = &policy.expose {
                        headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
                    }
                }
                if policy.varies() && !varies_by_origin(headers) {
                    headers.append(VARY, HeaderValue::from_static("origin"));
                }
                Poll::Ready(Ok(res))
            }
            StateProj::Answered { res } => {
                let res = res
                    .take()
                    .unwrap_or_else(|| Error::new(ErrorKind::Internal).to_response());
                Poll::Ready(Ok(res))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(text: &str) -> AllowedOrigin {
        text.parse().unwrap()
    }

    #[test]
    fn exact_origins_match_whole_and_without_case() {
        let o = origin("https://App.example.com");
        assert!(o.allows(b"https://app.example.com"));
        assert!(o.allows(b"HTTPS://APP.EXAMPLE.COM"));
        for no in [
            "https://app.example.com:8443",
            "http://app.example.com",
            "https://app.example.com.evil.net",
            "https://xapp.example.com",
            "",
        ] {
            assert!(!o.allows(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn subdomain_patterns_match_names_under_the_domain_only() {
        let o = origin("https://*.example.com");
        for yes in ["https://a.example.com", "https://a-b.c.example.com"] {
            assert!(o.allows(yes.as_bytes()), "{yes}");
        }
        for no in [
            "https://example.com",
            "https://.example.com",
            "https://evil-example.com",
            "https://a.example.com.evil.net",
            "https://a.example.com:444",
            "http://a.example.com",
            "https://evil.net/.example.com",
            "https://user@a.example.com",
            "https://a..example.com",
            "https://evil.net:1.example.com",
        ] {
            assert!(!o.allows(no.as_bytes()), "{no}");
        }
        assert!(origin("https://*.example.com:8443").allows(b"https://a.example.com:8443"));
    }

    #[test]
    fn vary_is_not_repeated() {
        let mut headers = HeaderMap::new();
        assert!(!varies_by_origin(&headers));
        headers.append(VARY, HeaderValue::from_static("accept-encoding, Origin"));
        assert!(varies_by_origin(&headers));
        let mut star = HeaderMap::new();
        star.append(VARY, HeaderValue::from_static("*"));
        assert!(varies_by_origin(&star));
        let mut other = HeaderMap::new();
        other.append(VARY, HeaderValue::from_static("origin-x, accept"));
        assert!(!varies_by_origin(&other));
    }

    #[test]
    fn what_is_not_an_origin_is_refused() {
        for bad in [
            "*",
            "example.com",
            "ftp://example.com",
            "https://example.com/",
            "https://example.com/path",
            "https://",
            "https://*",
            "https://*example.com",
            "https://a.*.example.com",
            "https://*.*.com",
            "https://user@example.com",
            "https://example.com:",
            "https://exa\nmple.com",
        ] {
            assert!(bad.parse::<AllowedOrigin>().is_err(), "{bad:?}");
        }
        assert_eq!(origin("null").to_string(), "null");
        assert_eq!(
            origin("https://*.Example.com").to_string(),
            "https://*.example.com"
        );
    }
}
