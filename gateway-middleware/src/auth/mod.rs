//! Who is calling (feature `auth`): methods that turn a request's credential into an
//! [`Identity`], the [`AuthLayer`] that runs one or several of them, and the [`AclLayer`]
//! that allows or denies by the identity's groups.
//!
//! - [`KeyAuth`]: API keys from a header or a query parameter, held as SHA-256 digests
//!   and compared in constant time.
//! - [`BasicAuth`]: `Authorization: Basic` against bcrypt or Argon2 hashes (an htpasswd
//!   file), checked off the async workers, recent successes remembered.
//! - [`ForwardAuthLayer`]: an external authorization service decides (a 2xx lets the
//!   request through, anything else is the answer), its decisions cached by choice.
//! - [`Jwt`]: JSON Web Tokens verified with static keys, a JWKS file or a JWKS URL, the
//!   algorithm pinned by the key and every registered claim checked strictly.
//!
//! An [`AuthLayer`] accepts a request when any of its methods accepts its credential
//! (`AuthLayer::new(jwt).or(keys)`), puts the [`Identity`] in the request's extensions (for
//! ACLs, rate-limit keys, cache keys and the access log's `consumer`), and passes it on;
//! with [`anonymous`](AuthLayer::anonymous), a request without any credential passes as the
//! anonymous consumer. A credential that is presented and wrong is refused even then: it
//! never falls back to anonymous.
//!
//! Refusals are problem+json from [`gateway_core::Error`]: **401** with a `WWW-Authenticate`
//! challenge per method (RFC 6750 `error="invalid_token"` for a bad bearer token), **503**
//! when the credential cannot be checked now (a JWKS not fetched yet). Why a credential was
//! refused never reaches the client: it is logged once (at `debug`) and counted in
//! `gateway_auth_failures_total{route, method, reason}`.
//!
//! ```
//! use gateway_core::{Body, Identity};
//! use gateway_middleware::auth::{ApiKeys, AuthLayer, KeyAuth};
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let keys = ApiKeys::new().consumer(Identity::consumer("alice").with_groups(["admins"]), ["s3cr3t"]);
//! let svc = ServiceBuilder::new()
//!     .layer(AuthLayer::new(KeyAuth::new(keys)))
//!     .service(service_fn(|req: Request<Body>| async move {
//!         let who = req.extensions().get::<Identity>().map(|id| id.name().to_owned());
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::from(who.unwrap_or_default())))
//!     }));
//!
//! let req = Request::get("/").header("x-api-key", "s3cr3t").body(Body::empty()).unwrap();
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), StatusCode::OK);
//! let req = Request::get("/").header("x-api-key", "guess").body(Body::empty()).unwrap();
//! assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! # }
//! ```

mod acl;
mod api_key;
mod basic;
mod credential;
mod forward;
mod gate;
mod jwt;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::metrics::Metrics;
use gateway_core::{Body, BoxError, Error, ErrorKind, Identity, LogFields, RouteId};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, header, request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tower::{Layer, Service};

pub use acl::{Acl, AclLayer, AclService, ResponseFuture as AclResponseFuture};
pub use api_key::{ApiKeys, KeyAuth};
pub use basic::{BasicAuth, Users, UsersError};
pub use credential::Source;
pub use forward::{AuthClient, ForwardAuth, ForwardAuthLayer};
pub use gate::ResponseFuture;
#[cfg(feature = "config")]
pub(crate) use jwt::WeakJwks;
pub use jwt::{Jwks, JwksBuilder, Jwt, JwtBuilder, JwtKey, KeyError, Startup};

/// A way to authenticate a request: reads its credential and judges it.
///
/// The built-in methods are [`Jwt`] and [`KeyAuth`]; a method of your own implements this
/// and goes into an [`AuthLayer`] like them.
pub trait Authenticate: Send + Sync + 'static {
    /// The method's name, the `method` label of its series (`jwt`, `key-auth`).
    fn name(&self) -> &'static str;

    /// Called for every request before any method judges it: take out what a client must
    /// not send (the headers a method sets from a token's claims).
    fn prepare(&self, req: &mut request::Parts) {
        let _ = req;
    }

    /// Judges the credential of `req`. A check that must wait (a key set being fetched, a
    /// slow hash) returns [`Check::Pending`].
    fn authenticate(&self, req: &request::Parts) -> Check;

    /// The `WWW-Authenticate` challenge sent with a 401 when no credential was presented
    /// (`Bearer realm="api"`), if the method has one.
    fn challenge(&self) -> Option<HeaderValue> {
        None
    }
}

impl<T: Authenticate + ?Sized> Authenticate for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn prepare(&self, req: &mut request::Parts) {
        (**self).prepare(req);
    }

    fn authenticate(&self, req: &request::Parts) -> Check {
        (**self).authenticate(req)
    }

    fn challenge(&self) -> Option<HeaderValue> {
        (**self).challenge()
    }
}

/// A method's answer: now, or once a future resolves.
pub enum Check {
    /// The verdict.
    Done(Verdict),
    /// The verdict, once this resolves.
    Pending(Pin<Box<dyn Future<Output = Verdict> + Send>>),
}

/// What a method made of a request's credential.
#[derive(Debug)]
pub enum Verdict {
    /// The request carries no credential of this method's kind.
    Absent,
    /// The credential is good.
    Accepted(Grant),
    /// A credential was presented and is not good (or cannot be checked now).
    Rejected(Rejection),
}

/// An accepted credential: who it is, and what to do to the request before it goes on.
#[derive(Clone, Debug)]
pub struct Grant {
    method: &'static str,
    identity: Identity,
    strip: Option<Source>,
    headers: Arc<[(HeaderName, HeaderValue)]>,
}

/// A refused credential: the answer (401 or 503), the reason (a metric label) and what
/// is logged about it; none of it but the challenge reaches the client.
#[derive(Clone, Debug)]
pub struct Rejection {
    method: &'static str,
    kind: ErrorKind,
    reason: &'static str,
    challenge: Option<HeaderValue>,
    detail: Option<Cow<'static, str>>,
}

// === impl Grant ===

impl Grant {
    /// `method` accepted the request as `identity`.
    pub fn new(method: &'static str, identity: Identity) -> Self {
        Self {
            method,
            identity,
            strip: None,
            headers: Arc::new([]),
        }
    }

    /// Takes the credential out of the request at `source` before it goes on
    /// (`hide_credentials`).
    #[must_use]
    pub fn strip(mut self, source: Source) -> Self {
        self.strip = Some(source);
        self
    }

    /// Sets these headers on the request before it goes on (a token's claims).
    #[must_use]
    pub fn headers(mut self, headers: Arc<[(HeaderName, HeaderValue)]>) -> Self {
        self.headers = headers;
        self
    }

    /// Who the request comes from.
    pub const fn identity(&self) -> &Identity {
        &self.identity
    }
}

// === impl Rejection ===

impl Rejection {
    /// A 401 from `method`, for `reason` (a short fixed label: `expired`, `unknown_key`).
    pub const fn unauthenticated(method: &'static str, reason: &'static str) -> Self {
        Self {
            method,
            kind: ErrorKind::Unauthenticated,
            reason,
            challenge: None,
            detail: None,
        }
    }

    /// A 503 from `method`: the credential cannot be checked now.
    pub const fn unavailable(method: &'static str, reason: &'static str) -> Self {
        Self {
            method,
            kind: ErrorKind::AuthUnavailable,
            reason,
            challenge: None,
            detail: None,
        }
    }

    /// The `WWW-Authenticate` challenge of the 401.
    #[must_use]
    pub fn challenge(mut self, challenge: HeaderValue) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// What the log says about it, beyond the reason (never sent to the client).
    #[must_use]
    pub fn detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The reason label.
    pub const fn reason(&self) -> &'static str {
        self.reason
    }

    /// The kind of answer: [`ErrorKind::Unauthenticated`] or [`ErrorKind::AuthUnavailable`].
    pub const fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<Verdict> for Check {
    fn from(verdict: Verdict) -> Self {
        Self::Done(verdict)
    }
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Done(v) => f.debug_tuple("Done").field(v).finish(),
            Self::Pending(_) => f.write_str("Pending"),
        }
    }
}

// === the layer ===

/// Authenticates requests with one or several methods; see the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

/// The service of [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Shared {
    methods: Vec<Arc<dyn Authenticate>>,
    anonymous: Option<Identity>,
    preflights: bool,
    counters: Option<Counters>,
}

impl AuthLayer {
    /// Authenticates with `method`.
    pub fn new(method: impl Authenticate) -> Self {
        Self {
            shared: Arc::new(Shared {
                methods: vec![Arc::new(method)],
                anonymous: None,
                preflights: false,
                counters: None,
            }),
        }
    }

    /// Accepts `method` as well: the first method whose credential is good wins, in the
    /// order given; a request with a bad credential for one and a good one for another
    /// passes.
    pub fn or(mut self, method: impl Authenticate) -> Self {
        self.shared_mut().methods.push(Arc::new(method));
        self
    }

    /// Lets a request without any credential through as `identity` (see
    /// [`Identity::anonymous_as`]); one with a bad credential is still refused.
    pub fn anonymous(mut self, identity: Identity) -> Self {
        self.shared_mut().anonymous = Some(identity);
        self
    }

    /// Lets CORS preflights (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
    /// through unauthenticated, as browsers send them without credentials. Off by default;
    /// a `CorsLayer` outside answers preflights itself and needs none of this.
    pub fn allow_preflights(mut self, allow: bool) -> Self {
        self.shared_mut().preflights = allow;
        self
    }

    /// Counts decisions and failures in `metrics`, under the `route` label.
    pub fn metrics(mut self, metrics: &Metrics, route: &str) -> Self {
        let counters = Counters::new(metrics, route, &self.shared.methods);
        self.shared_mut().counters = Some(counters);
        self
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.shared)
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.shared.methods.iter().map(|m| m.name()).collect();
        f.debug_struct("AuthLayer")
            .field("methods", &names)
            .field("anonymous", &self.shared.anonymous)
            .finish_non_exhaustive()
    }
}

impl<S> fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

impl Shared {
    /// Every method's verdict in order, until one accepts.
    fn check(&self, req: &request::Parts) -> Check {
        let mut rejected: Option<Rejection> = None;
        let mut methods = self.methods.iter();
        while let Some(method) = methods.next() {
            match method.authenticate(req) {
                Check::Done(Verdict::Accepted(grant)) => return Verdict::Accepted(grant).into(),
                Check::Done(Verdict::Absent) => {}
                Check::Done(Verdict::Rejected(r)) => {
                    rejected.get_or_insert(r);
                }
                Check::Pending(first) => {
                    // The methods after it judge now (their checks are cheap until
                    // polled) and are awaited in order.
                    let rest: Vec<Check> = methods.map(|m| m.authenticate(req)).collect();
                    return Check::Pending(Box::pin(async move {
                        let mut rejected = rejected;
                        let checks = std::iter::once(Check::Pending(first)).chain(rest);
                        for check in checks {
                            let verdict = match check {
                                Check::Done(verdict) => verdict,
                                Check::Pending(fut) => fut.await,
                            };
                            match verdict {
                                Verdict::Accepted(grant) => return Verdict::Accepted(grant),
                                Verdict::Absent => {}
                                Verdict::Rejected(r) => {
                                    rejected.get_or_insert(r);
                                }
                            }
                        }
                        rejected.map_or(Verdict::Absent, Verdict::Rejected)
                    }));
                }
            }
        }
        rejected.map_or(Verdict::Absent, Verdict::Rejected).into()
    }

    /// Applies `verdict` to the request: `None` to pass it on, or the answer.
    fn apply(&self, verdict: Verdict, req: &mut request::Parts) -> Option<Response<Body>> {
        let log = req.extensions.get::<LogFields>().cloned();
        let identity = match verdict {
            Verdict::Accepted(grant) => {
                if let Some(source) = &grant.strip {
                    source.strip(req);
                }
                for (name, value) in grant.headers.iter() {
                    req.headers.insert(name.clone(), value.clone());
                }
                if let Some(c) = &self.counters {
                    c.accepted(grant.method);
                }
                if let Some(log) = &log {
                    log.insert("auth", grant.method);
                }
                grant.identity
            }
            Verdict::Absent => match &self.anonymous {
                Some(anonymous) => {
                    if let Some(c) = &self.counters {
                        c.anonymous.inc();
                    }
                    if let Some(log) = &log {
                        log.insert("auth", "anonymous");
                    }
                    anonymous.clone()
                }
                None => {
                    if let Some(c) = &self.counters {
                        c.missing.inc();
                    }
                    if let Some(log) = &log {
                        log.insert("auth", "missing");
                    }
                    tracing::debug!(path = req.uri.path(), "no credential");
                    let mut err = Error::new(ErrorKind::Unauthenticated);
                    if let Some(challenge) = self.challenges() {
                        err = err.challenge(challenge);
                    }
                    return Some(err.to_response());
                }
            },
            Verdict::Rejected(r) => {
                if let Some(c) = &self.counters {
                    c.failed(r.method, r.reason, r.kind);
                }
                if let Some(log) = &log {
                    log.insert("auth", r.method);
                    log.insert("auth_error", r.reason);
                }
                let detail = r.detail.as_deref().unwrap_or("");
                match r.kind {
                    ErrorKind::Unauthenticated => tracing::debug!(
                        method = r.method,
                        reason = r.reason,
                        path = req.uri.path(),
                        "credential refused {detail}"
                    ),
                    _ => tracing::warn!(
                        method = r.method,
                        reason = r.reason,
                        path = req.uri.path(),
                        "credential not checked {detail}"
                    ),
                }
                let mut err = Error::new(r.kind);
                if let Some(challenge) = r.challenge.or_else(|| self.challenges()) {
                    err = err.challenge(challenge);
                }
                return Some(err.to_response());
            }
        };
        if let Some(log) = &log {
            log.insert("consumer", Arc::clone(identity.shared_name()));
        }
        req.extensions.insert(identity);
        None
    }

    /// Every method's challenge, in one header value (RFC 9110 §11.6.1).
    fn challenges(&self) -> Option<HeaderValue> {
        let all: Vec<HeaderValue> = self.methods.iter().filter_map(|m| m.challenge()).collect();
        match all.len() {
            0 => None,
            1 => all.into_iter().next(),
            _ => {
                let joined: Vec<&[u8]> = all.iter().map(HeaderValue::as_bytes).collect();
                HeaderValue::from_bytes(&joined.join(&b", "[..])).ok()
            }
        }
    }
}

/// The challenge `SCHEME realm="REALM"` followed by `params` (`, error="invalid_token"`),
/// the realm's quotes and backslashes escaped.
///
/// # Errors
///
/// When the realm holds what no header may (a control character).
pub(crate) fn challenge(
    scheme: &str,
    realm: &str,
    params: &str,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let escaped = realm.replace('\\', "\\\\").replace('"', "\\\"");
    HeaderValue::try_from(format!("{scheme} realm=\"{escaped}\"{params}"))
}

/// Whether `req` is a CORS preflight.
fn is_preflight(req: &request::Parts) -> bool {
    req.method == Method::OPTIONS
        && req.headers.contains_key(header::ORIGIN)
        && req
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl<S, B, ResB> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        for method in &self.shared.methods {
            method.prepare(&mut parts);
        }
        if self.shared.preflights && is_preflight(&parts) {
            let fut = self.inner.call(Request::from_parts(parts, body));
            return ResponseFuture::called(fut);
        }
        match self.shared.check(&parts) {
            Check::Done(verdict) => match self.shared.apply(verdict, &mut parts) {
                None => ResponseFuture::called(self.inner.call(Request::from_parts(parts, body))),
                Some(res) => ResponseFuture::answered(res),
            },
            Check::Pending(check) => {
                // The service that was made ready goes with the request; a clone stays.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let shared = Arc::clone(&self.shared);
                let decision = Box::pin(async move {
                    let verdict = check.await;
                    let answer = shared.apply(verdict, &mut parts);
                    (parts, answer)
                });
                ResponseFuture::deciding(decision, body, inner)
            }
        }
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    route: RouteId,
    method: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    route: RouteId,
    method: &'static str,
    reason: &'static str,
}

/// The series of one auth layer, made when it is built.
#[derive(Clone)]
struct Counters {
    accepted: Vec<(&'static str, Counter)>,
    anonymous: Counter,
    missing: Counter,
    route: RouteId,
    decisions: Family<DecisionLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
}

impl Counters {
    fn new(metrics: &Metrics, route: &str, methods: &[Arc<dyn Authenticate>]) -> Self {
        let decisions: Family<DecisionLabels, Counter> = metrics.family(
            "auth_decisions",
            "Requests an auth layer let through or refused, by method and decision (accepted, anonymous, missing, rejected, unavailable).",
        );
        let failures: Family<FailureLabels, Counter> = metrics.family(
            "auth_failures",
            "Credentials refused, by method and reason.",
        );
        let route = RouteId::new(route);
        let series = |method: &'static str, decision: &'static str| {
            decisions
                .get_or_create(&DecisionLabels {
                    route: route.clone(),
                    method,
                    decision,
                })
                .clone()
        };
        Self {
            accepted: methods
                .iter()
                .map(|m| (m.name(), series(m.name(), "accepted")))
                .collect(),
            anonymous: series("none", "anonymous"),
            missing: series("none", "missing"),
            route: route.clone(),
            decisions: decisions.clone(),
            failures,
        }
    }

    fn accepted(&self, method: &'static str) {
        if let Some((_, counter)) = self.accepted.iter().find(|(m, _)| *m == method) {
            counter.inc();
        }
    }

    /// A refusal: not the hot path, so its series is looked up.
    fn failed(&self, method: &'static str, reason: &'static str, kind: ErrorKind) {
        let decision = match kind {
            ErrorKind::Unauthenticated => "rejected",
            _ => "unavailable",
        };
        self.decisions
            .get_or_create(&DecisionLabels {
                route: self.route.clone(),
                method,
                decision,
            })
            .inc();
        self.failures
            .get_or_create(&FailureLabels {
                route: self.route.clone(),
                method,
                reason,
            })
            .inc();
    }
}
