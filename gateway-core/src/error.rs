//! The gateway's error type and its one mapping to HTTP responses.
//!
//! Every layer that rejects a request or fails on the upstream path speaks in [`ErrorKind`]s;
//! [`Error::to_response`] is the only place in the workspace that turns a kind into a status
//! and a body. Bodies are RFC 9457 `application/problem+json` documents built from the kind
//! alone, so no internal detail (addresses, causes, stack of sources) can reach a client:
//! those go to the log, once, where the error is turned into a response.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Method, Response, StatusCode};

use crate::{Body, BoxError, RouteId};

/// What went wrong, as far as the client and the policy layers need to know.
///
/// Each kind maps to exactly one HTTP status (see [`ErrorKind::status`]).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or was refused as unsafe (bad path, bad `Host`, ...): 400.
    BadRequest,
    /// No or invalid credentials: 401 ("Unauthorized", RFC 9110's name for what is an
    /// authentication failure), with a `WWW-Authenticate` challenge when one is set.
    #[doc(alias = "Unauthorized")]
    #[doc(alias = "401")]
    Unauthenticated,
    /// Authenticated but not allowed: 403.
    Forbidden,
    /// No route matches the request: 404.
    NotFound,
    /// The resource does not take the request's method: 405.
    MethodNotAllowed,
    /// The client was too slow sending its request: 408.
    RequestTimeout,
    /// The request body is over the configured limit: 413.
    PayloadTooLarge,
    /// The request line is over the server's head size limit: 414.
    UriTooLong,
    /// The request head has too many fields or is over the size limit: 431.
    HeaderFieldsTooLarge,
    /// A rate limit was hit: 429, with `Retry-After` when known.
    TooManyRequests,
    /// A bug or an unexpected failure inside the gateway: 500.
    Internal,
    /// The request uses a protocol feature the gateway does not implement (a transfer
    /// coding other than `chunked`): 501.
    NotImplemented,
    /// The upstream could not be reached (refused, unreachable, TLS failure); nothing was
    /// sent, so the request is safe to retry elsewhere: 502.
    UpstreamConnect,
    /// The upstream broke the protocol or the connection after the request was sent: 502.
    BadGateway,
    /// The circuit breaker is open for this upstream: 503.
    CircuitOpen,
    /// Credentials cannot be checked now (the keys of a JWKS not fetched yet, the
    /// authorization service unreachable): 503.
    AuthUnavailable,
    /// A rate limit cannot be checked now (its Redis is down or slow) and is configured
    /// to fail closed: 503.
    RateLimitUnavailable,
    /// Every endpoint of the upstream is unhealthy or the set is empty: 503.
    NoHealthyUpstream,
    /// The gateway sheds load (concurrency limit, full queue): 503.
    Overloaded,
    /// The upstream did not answer in time: 504.
    GatewayTimeout,
    /// The request asked for a stored response only (`Cache-Control: only-if-cached`) and
    /// none could answer it: 504 (RFC 9111 §5.2.1.7).
    NotCached,
    /// The request is not HTTP/1.x (on an HTTP/1 connection): 505.
    VersionNotSupported,
}

/// A gateway error: a kind, an optional cause for the log, and the few response details a
/// kind may carry (`Retry-After`, `WWW-Authenticate`).
pub struct Error {
    kind: ErrorKind,
    source: Option<BoxError>,
    retry_after: Option<Duration>,
    challenge: Option<HeaderValue>,
    /// The upstream endpoint the failure happened at, for the log.
    upstream: Option<Authority>,
}

// === impl ErrorKind ===

/// The one table from kind to status and client-safe title; status, title and problem body
/// are all generated from it so they cannot drift apart.
macro_rules! status_table {
    ($($kind:ident => $code:literal $status:ident $name:literal $title:literal,)*) => {
        impl ErrorKind {
            /// The HTTP status for this kind. This is the workspace's one status mapping.
            pub const fn status(self) -> StatusCode {
                match self { $(Self::$kind => StatusCode::$status,)* }
            }

            /// A `snake_case` name for access logs and metrics labels: `upstream_connect`.
            pub const fn name(self) -> &'static str {
                match self { $(Self::$kind => $name,)* }
            }

            /// A short, client-safe description, used as the problem `title` and in logs.
            pub const fn title(self) -> &'static str {
                match self { $(Self::$kind => $title,)* }
            }

            /// The RFC 9457 body: static bytes, so rendering an error never allocates.
            const fn problem(self) -> &'static str {
                match self {
                    $(Self::$kind => concat!(
                        r#"{"type":"about:blank","title":""#, $title, r#"","status":"#, $code, "}"
                    ),)*
                }
            }
        }
    };
}

status_table! {
    BadRequest => 400 BAD_REQUEST "bad_request" "bad request",
    Unauthenticated => 401 UNAUTHORIZED "unauthenticated" "authentication required",
    Forbidden => 403 FORBIDDEN "forbidden" "forbidden",
    NotFound => 404 NOT_FOUND "not_found" "no route matches the request",
    MethodNotAllowed => 405 METHOD_NOT_ALLOWED "method_not_allowed" "method not allowed",
    RequestTimeout => 408 REQUEST_TIMEOUT "request_timeout" "request timed out",
    PayloadTooLarge => 413 PAYLOAD_TOO_LARGE "payload_too_large" "request body too large",
    UriTooLong => 414 URI_TOO_LONG "uri_too_long" "request line too long",
    HeaderFieldsTooLarge => 431 REQUEST_HEADER_FIELDS_TOO_LARGE "header_fields_too_large" "request header fields too large",
    TooManyRequests => 429 TOO_MANY_REQUESTS "too_many_requests" "too many requests",
    Internal => 500 INTERNAL_SERVER_ERROR "internal" "internal error",
    NotImplemented => 501 NOT_IMPLEMENTED "not_implemented" "not implemented",
    UpstreamConnect => 502 BAD_GATEWAY "upstream_connect" "upstream unreachable",
    BadGateway => 502 BAD_GATEWAY "bad_gateway" "upstream failed",
    CircuitOpen => 503 SERVICE_UNAVAILABLE "circuit_open" "upstream circuit open",
    AuthUnavailable => 503 SERVICE_UNAVAILABLE "auth_unavailable" "authentication unavailable",
    RateLimitUnavailable => 503 SERVICE_UNAVAILABLE "rate_limit_unavailable" "rate limiting unavailable",
    NoHealthyUpstream => 503 SERVICE_UNAVAILABLE "no_healthy_upstream" "no healthy upstream",
    Overloaded => 503 SERVICE_UNAVAILABLE "overloaded" "gateway overloaded",
    GatewayTimeout => 504 GATEWAY_TIMEOUT "gateway_timeout" "upstream timed out",
    NotCached => 504 GATEWAY_TIMEOUT "not_cached" "no stored response (only-if-cached)",
    VersionNotSupported => 505 HTTP_VERSION_NOT_SUPPORTED "version_not_supported" "HTTP version not supported",
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

// === impl Error ===

impl Error {
    /// An error of `kind` without a cause.
    pub const fn new(kind: ErrorKind) -> Self {
        Self {
            kind,
            source: None,
            retry_after: None,
            challenge: None,
            upstream: None,
        }
    }

    /// An error of `kind` caused by `source`; the cause is logged, never sent to clients.
    pub fn with_source(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            source: Some(source.into()),
            ..Self::new(kind)
        }
    }

    /// Adds a `Retry-After` to the response (whole seconds, rounded up).
    #[must_use]
    pub const fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Adds a `WWW-Authenticate` challenge to the response (401 only).
    #[must_use]
    pub fn challenge(mut self, challenge: HeaderValue) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// Names the upstream endpoint (`host:port`) the failure happened at; the log line
    /// says it (never the response).
    #[must_use]
    pub fn at_upstream(mut self, endpoint: Authority) -> Self {
        self.upstream = Some(endpoint);
        self
    }

    /// The upstream endpoint the failure happened at, if known.
    pub const fn upstream(&self) -> Option<&Authority> {
        self.upstream.as_ref()
    }

    /// The error's kind.
    pub const fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The `Retry-After` the response will carry, if any.
    pub const fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Finds the gateway meaning of any error by walking its `source()` chain.
    ///
    /// An [`Error`] anywhere in the chain gives its kind; tower's `Elapsed` and tokio's
    /// `Elapsed` mean [`ErrorKind::GatewayTimeout`]; tower's `Overloaded` means
    /// [`ErrorKind::Overloaded`]; anything else is [`ErrorKind::Internal`].
    pub fn kind_of(err: &(dyn StdError + 'static)) -> ErrorKind {
        Self::find(err).map_or_else(|| Self::foreign_kind(err), Error::kind)
    }

    /// Turns any boxed error into an [`Error`], keeping the original as the cause.
    pub fn from_box(err: BoxError) -> Self {
        match err.downcast::<Self>() {
            Ok(err) => *err,
            Err(err) => {
                let (kind, retry_after, challenge, upstream) = match Self::find(&*err) {
                    Some(e) => (
                        e.kind,
                        e.retry_after,
                        e.challenge.clone(),
                        e.upstream.clone(),
                    ),
                    None => (Self::foreign_kind(&*err), None, None, None),
                };
                Self {
                    kind,
                    source: Some(err),
                    retry_after,
                    challenge,
                    upstream,
                }
            }
        }
    }

    /// The response for this error: status from the kind, problem+json body, and the
    /// kind-specific headers. The [`ErrorKind`] rides in the response's extensions, so the
    /// layers outside (the access log, a breaker) can tell a `502` the gateway made from
    /// one the upstream sent. Allocates nothing but the response head.
    pub fn to_response(&self) -> Response<Body> {
        let mut res = Response::new(Body::from(Bytes::from_static(
            self.kind.problem().as_bytes(),
        )));
        *res.status_mut() = self.kind.status();
        res.extensions_mut().insert(self.kind);
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.kind == ErrorKind::Unauthenticated
            && let Some(challenge) = &self.challenge
        {
            headers.insert(header::WWW_AUTHENTICATE, challenge.clone());
        }
        res
    }

    /// Logs the error with its whole cause chain, at a level that fits its kind.
    ///
    /// Call this once, where the error becomes a response.
    pub fn log(&self) {
        self.emit(None, None, None);
    }

    /// [`log`](Self::log)s the error with the request it answers: its method, path and
    /// route, and the upstream endpoint when the failure happened at one.
    ///
    /// ```text
    /// WARN request failed method=GET path=/api/orders route=api upstream=10.0.0.7:8080 status=502 error=upstream unreachable: ...
    /// ```
    pub fn log_for(&self, method: &Method, path: &str, route: Option<&RouteId>) {
        self.emit(
            Some(method.as_str()),
            Some(path),
            route.map(RouteId::as_str),
        );
    }

    /// The one log event of an error; the fields without a value are left out.
    fn emit(&self, method: Option<&str>, path: Option<&str>, route: Option<&str>) {
        use tracing::field::display;
        let status = self.kind.status().as_u16();
        let (method, path, route) = (method.map(display), path.map(display), route.map(display));
        let upstream = self.upstream.as_ref().map(display);
        macro_rules! event {
            ($level:ident, $message:literal) => {
                tracing::$level!(method, path, route, upstream, status, error = %Chain(self), $message)
            };
        }
        match self.kind {
            ErrorKind::Internal => event!(error, "request failed"),
            // The breaker logged its opening once; each refusal while open is routine.
            ErrorKind::CircuitOpen => event!(debug, "request refused: circuit open"),
            // The client asked for a stored response only: its choice, not a failure.
            ErrorKind::NotCached => event!(debug, "request not answered: nothing stored"),
            k if k.status().is_server_error() => event!(warn, "request failed"),
            _ => event!(debug, "request rejected"),
        }
    }

    fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Self> {
        let mut next = Some(err);
        while let Some(err) = next {
            if let Some(e) = err.downcast_ref::<Self>() {
                return Some(e);
            }
            next = err.source();
        }
        None
    }

    fn foreign_kind(err: &(dyn StdError + 'static)) -> ErrorKind {
        let mut next = Some(err);
        while let Some(err) = next {
            if err.is::<tower::timeout::error::Elapsed>() || err.is::<tokio::time::error::Elapsed>()
            {
                return ErrorKind::GatewayTimeout;
            }
            if err.is::<tower::load_shed::error::Overloaded>() {
                return ErrorKind::Overloaded;
            }
            next = err.source();
        }
        ErrorKind::Internal
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Self::new(kind)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.title())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// Displays an error followed by its sources: `a: b: c`.
struct Chain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(err) = next {
            write!(f, ": {err}")?;
            next = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorKind; 18] = [
        ErrorKind::BadRequest,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::RequestTimeout,
        ErrorKind::PayloadTooLarge,
        ErrorKind::TooManyRequests,
        ErrorKind::Internal,
        ErrorKind::UpstreamConnect,
        ErrorKind::BadGateway,
        ErrorKind::CircuitOpen,
        ErrorKind::AuthUnavailable,
        ErrorKind::RateLimitUnavailable,
        ErrorKind::NoHealthyUpstream,
        ErrorKind::Overloaded,
        ErrorKind::GatewayTimeout,
        ErrorKind::NotCached,
    ];

    #[tokio::test]
    async fn problem_bodies_are_json_with_the_status() {
        for kind in ALL {
            let res = Error::new(kind).to_response();
            assert_eq!(res.status(), kind.status());
            assert_eq!(
                res.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
            let body = res.into_body().collect_bytes().await.unwrap();
            let body = std::str::from_utf8(&body).unwrap();
            let expected = format!(
                r#"{{"type":"about:blank","title":"{}","status":{}}}"#,
                kind.title(),
                kind.status().as_u16()
            );
            assert_eq!(body, expected);
        }
    }

    #[tokio::test]
    async fn causes_never_reach_the_body() {
        let err = Error::with_source(ErrorKind::BadGateway, "connect to 10.1.2.3:8080 refused");
        let body = err.to_response().into_body().collect_bytes().await.unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("10.1.2.3"));
    }

    #[test]
    fn retry_after_rounds_up_and_challenge_only_on_401() {
        let res = Error::new(ErrorKind::TooManyRequests)
            .retry_after(Duration::from_millis(1500))
            .to_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "2");
        let challenge = HeaderValue::from_static("Bearer");
        let res = Error::new(ErrorKind::Unauthenticated)
            .challenge(challenge.clone())
            .to_response();
        assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let res = Error::new(ErrorKind::Forbidden)
            .challenge(challenge)
            .to_response();
        assert!(!res.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[derive(Debug)]
    struct Wrapper(BoxError);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn kinds_are_found_through_sources() {
        let inner = Error::new(ErrorKind::TooManyRequests).retry_after(Duration::from_secs(3));
        let err = Error::from_box(Box::new(Wrapper(Box::new(inner))));
        assert_eq!(err.kind(), ErrorKind::TooManyRequests);
        assert_eq!(err.retry_after_hint(), Some(Duration::from_secs(3)));

        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(
            Error::from_box(Box::new(Wrapper(elapsed))).kind(),
            ErrorKind::GatewayTimeout
        );
        let shed: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(Error::from_box(shed).kind(), ErrorKind::Overloaded);
        assert_eq!(Error::from_box("boom".into()).kind(), ErrorKind::Internal);
    }

    #[test]
    fn display_is_the_title_and_chain_shows_causes() {
        let err = Error::with_source(ErrorKind::BadGateway, "reset");
        assert_eq!(err.to_string(), "upstream failed");
        assert_eq!(Chain(&err).to_string(), "upstream failed: reset");
    }
}
