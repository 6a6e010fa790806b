//! Forward authentication: an external service decides (Traefik's `ForwardAuth`, nginx's
//! `auth_request`), and its decisions are cached.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::{Body, BoxError, Error, ErrorKind, Identity, LogFields};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, request};
use sha2::{Digest as _, Sha256};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use super::gate::{ResponseFuture, read_body};

/// The client a [`ForwardAuthLayer`] asks its authorization service through.
pub type AuthClient = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// Asks an authorization service about each request; see [`ForwardAuthLayer::new`].
#[derive(Clone)]
#[must_use]
pub struct ForwardAuthLayer {
    shared: Arc<Shared>,
}

/// The service of [`ForwardAuthLayer`].
#[derive(Clone)]
pub struct ForwardAuth<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What a layer asks with: set by the builder, shared by its services.
#[derive(Clone)]
struct Shared {
    client: AuthClient,
    uri: Uri,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
    denial_headers: Vec<HeaderName>,
    identity_header: Option<HeaderName>,
    timeout: Duration,
    ttl: Duration,
    key_uri: bool,
    memory: Arc<Memory>,
}

/// The decisions remembered, and those being asked for.
struct Memory {
    cache: quick_cache::sync::Cache<[u8; 32], (Arc<Decision>, Instant)>,
    in_flight: Mutex<HashMap<[u8; 32], Pending>>,
}

/// A decision being asked for, that identical requests wait on.
type Pending = Arc<OnceCell<Arc<Decision>>>;

/// What the authorization service said.
#[derive(Debug)]
enum Decision {
    /// 2xx: these headers go on the request (and the consumer, if named).
    Allow {
        headers: Vec<(HeaderName, HeaderValue)>,
        identity: Option<Identity>,
    },
    /// Anything else: this answer goes to the client.
    Deny {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
}

impl Decision {
    /// Whether the decision may be given to other requests with the same key: not a denial
    /// that sets a cookie (a login flow's state or CSRF nonce belongs to one client; replayed,
    /// it would be fixed for everyone who shares the key, all anonymous clients included).
    fn shareable(&self) -> bool {
        match self {
            Self::Allow { .. } => true,
            Self::Deny { headers, .. } => {
                !headers.iter().any(|(name, _)| name == header::SET_COOKIE)
            }
        }
    }
}

/// The most bytes of a denial's body passed to the client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

impl ForwardAuthLayer {
    /// Asks `uri` through `client` about every request: a `GET` carrying the request's
    /// `Authorization` and `Cookie` (see [`request_headers`](Self::request_headers)) and
    /// `X-Forwarded-Method`, `-Proto`, `-Host` and `-Uri`. A 2xx lets the request through;
    /// anything else is the answer to the client (status, body up to 64 KiB, and its
    /// `WWW-Authenticate`, `Location`, `Set-Cookie`, `Content-Type`, `Cache-Control` and
    /// `Retry-After`). A service that cannot be reached, or takes longer than 5 s, gets
    /// the client a 503. No decision is cached unless [`cache_for`](Self::cache_for) says.
    pub fn new<C>(client: C, uri: Uri) -> Self
    where
        C: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
    {
        let client = BoxCloneSyncService::new(client.map_err(Into::into));
        Self {
            shared: Arc::new(Shared {
                client,
                uri,
                request_headers: vec![header::AUTHORIZATION, header::COOKIE],
                response_headers: Vec::new(),
                denial_headers: vec![
                    header::WWW_AUTHENTICATE,
                    header::LOCATION,
                    header::SET_COOKIE,
                    header::CONTENT_TYPE,
                    header::CACHE_CONTROL,
                    header::RETRY_AFTER,
                ],
                identity_header: None,
                timeout: Duration::from_secs(5),
                ttl: Duration::ZERO,
                key_uri: true,
                memory: Arc::new(Memory {
                    cache: quick_cache::sync::Cache::new(10_000),
                    in_flight: Mutex::new(HashMap::new()),
                }),
            }),
        }
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.shared)
    }

    /// The request headers sent to the service [default: `Authorization`, `Cookie`].
    pub fn request_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.shared_mut().request_headers = names.into_iter().collect();
        self
    }

    /// Headers of the service's 2xx copied onto the request (`X-User`, `X-Scopes`); the
    /// client's own copies are always removed first [default: none].
    pub fn response_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.shared_mut().response_headers = names.into_iter().collect();
        self
    }

    /// The header of the service's 2xx that names the consumer, put in the request's
    /// [`Identity`] for ACLs, rate limits and the access log [default: none].
    pub fn identity_header(mut self, name: HeaderName) -> Self {
        self.shared_mut().identity_header = Some(name);
        self
    }

    /// How long one ask may take [default: 5 s].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.shared_mut().timeout = timeout;
        self
    }

    /// Remembers each decision for `ttl`, by the values of the headers sent and (unless
    /// [`cache_by_headers_only`](Self::cache_by_headers_only)) the method, host and URI,
    /// so identical requests within it cost the service one ask; concurrent identical
    /// requests wait for the one ask in flight [default: no cache].
    pub fn cache_for(mut self, ttl: Duration) -> Self {
        self.shared_mut().ttl = ttl;
        self
    }

    /// Keys cached decisions by the headers sent alone, for a service whose answer does
    /// not depend on the request's method, host or URI.
    pub fn cache_by_headers_only(mut self) -> Self {
        self.shared_mut().key_uri = false;
        self
    }
}

impl<S> Layer<S> for ForwardAuthLayer {
    type Service = ForwardAuth<S>;

    fn layer(&self, inner: S) -> ForwardAuth<S> {
        ForwardAuth {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for ForwardAuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardAuthLayer")
            .field("uri", &self.shared.uri)
            .field("ttl", &self.shared.ttl)
            .finish_non_exhaustive()
    }
}

impl<S> fmt::Debug for ForwardAuth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardAuth").finish_non_exhaustive()
    }
}

impl Shared {
    /// The request to the service about `req`.
    fn ask(&self, req: &request::Parts) -> Request<Body> {
        let mut ask = Request::get(self.uri.clone());
        if let Some(headers) = ask.headers_mut() {
            for name in &self.request_headers {
                for value in req.headers.get_all(name) {
                    headers.append(name.clone(), value.clone());
                }
            }
            let forwarded = [
                ("x-forwarded-method", Some(req.method.as_str())),
                ("x-forwarded-proto", req.uri.scheme_str().or(Some("http"))),
                (
                    "x-forwarded-host",
                    req.uri
                        .host()
                        .or_else(|| req.headers.get(header::HOST)?.to_str().ok()),
                ),
                (
                    "x-forwarded-uri",
                    req.uri.path_and_query().map(|p| p.as_str()),
                ),
            ];
            for (name, value) in forwarded {
                if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
        ask.body(Body::empty()).unwrap_or_default()
    }

    /// The cache key of `req`: a digest of what the decision may depend on.
    fn key(&self, req: &request::Parts) -> [u8; 32] {
        let mut hash = Sha256::new();
        for name in &self.request_headers {
            for value in req.headers.get_all(name) {
                hash.update(name.as_str());
                hash.update([0]);
                hash.update((value.len() as u64).to_be_bytes());
                hash.update(value.as_bytes());
            }
        }
        if self.key_uri {
            hash.update([1]);
            hash.update(req.method.as_str());
            hash.update([0]);
            // The URI's authority (HTTP/2, absolute form) or else `Host`, then the target.
            match req.uri.authority() {
                Some(authority) => hash.update(authority.as_str()),
                None => hash.update(
                    req.headers
                        .get(header::HOST)
                        .map_or(&b""[..], |h| h.as_bytes()),
                ),
            }
            hash.update([0]);
            hash.update(req.uri.path_and_query().map_or("", |p| p.as_str()));
        }
        hash.finalize().into()
    }

    /// Asks the service; `None` when it cannot be reached in time.
    async fn decide(&self, ask: Request<Body>) -> Result<Decision, String> {
        let call = self.client.clone().oneshot(ask);
        let res = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (parts, body) = res.into_parts();
        let pick = |names: &[HeaderName], from: &HeaderMap| {
            let mut out = Vec::new();
            for name in names {
                for value in from.get_all(name) {
                    out.push((name.clone(), value.clone()));
                }
            }
            out
        };
        if parts.status.is_success() {
            let identity = self
                .identity_header
                .as_ref()
                .and_then(|name| parts.headers.get(name)?.to_str().ok())
                .filter(|name| !name.is_empty())
                .map(Identity::consumer);
            return Ok(Decision::Allow {
                headers: pick(&self.response_headers, &parts.headers),
                identity,
            });
        }
        let body = read_body(body, MAX_DENIAL_BODY).await?;
        Ok(Decision::Deny {
            status: parts.status,
            headers: pick(&self.denial_headers, &parts.headers),
            body,
        })
    }

    /// The decision about `req`: cached, or asked (once for concurrent identical ones).
    async fn decision(
        self: Arc<Self>,
        ask: Request<Body>,
        key: Option<[u8; 32]>,
    ) -> Result<Arc<Decision>, String> {
        let Some(key) = key else {
            return self.decide(ask).await.map(Arc::new);
        };
        let cell = {
            let mut in_flight = self
                .memory
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(in_flight.entry(key).or_default())
        };
        let decided = cell
            .get_or_try_init(|| async {
                let decision = Arc::new(self.decide(ask).await?);
                if decision.shareable() {
                    self.memory
                        .cache
                        .insert(key, (Arc::clone(&decision), Instant::now()));
                }
                Ok::<_, String>(decision)
            })
            .await
            .cloned();
        let mut in_flight = self
            .memory
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if in_flight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            in_flight.remove(&key);
        }
        decided
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Arc<Decision>> {
        let (decision, at) = self.memory.cache.get(key)?;
        if at.elapsed() < self.ttl {
            return Some(decision);
        }
        self.memory.cache.remove(key);
        None
    }
}

impl<S, B, ResB> Service<Request<B>> for ForwardAuth<S>
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
        for name in &self.shared.response_headers {
            parts.headers.remove(name);
        }
        let key = (!self.shared.ttl.is_zero()).then(|| self.shared.key(&parts));
        if let Some(decision) = key.and_then(|k| self.shared.cached(&k)) {
            return match apply(&decision, &mut parts) {
                None => ResponseFuture::called(self.inner.call(Request::from_parts(parts, body))),
                Some(res) => ResponseFuture::answered(res),
            };
        }
        let ask = self.shared.ask(&parts);
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        let decision = Box::pin(async move {
            let answer = match shared.decision(ask, key).await {
                Ok(decision) => apply(&decision, &mut parts),
                Err(why) => {
                    tracing::warn!(
                        path = parts.uri.path(),
                        "the authorization service failed: {why}"
                    );
                    if let Some(log) = parts.extensions.get::<LogFields>() {
                        log.insert("auth", "forward-auth");
                        log.insert("auth_error", "unavailable");
                    }
                    Some(Error::new(ErrorKind::AuthUnavailable).to_response())
                }
            };
            (parts, answer)
        });
        ResponseFuture::deciding(decision, body, inner)
    }
}

/// Applies `decision` to the request: `None` to pass it on, or the answer.
fn apply(decision: &Decision, req: &mut request::Parts) -> Option<Response<Body>> {
    let log = req.extensions.get::<LogFields>();
    match decision {
        Decision::Allow { headers, identity } => {
            for (name, value) in headers {
                req.headers.append(name.clone(), value.clone());
            }
            if let Some(log) = log {
                log.insert("auth", "forward-auth");
            }
            if let Some(identity) = identity {
                if let Some(log) = log {
                    log.insert("consumer", Arc::clone(identity.shared_name()));
                }
                req.extensions.insert(identity.clone());
            }
            None
        }
        Decision::Deny {
            status,
            headers,
            body,
        } => {
            if let Some(log) = log {
                log.insert("auth", "forward-auth");
                log.insert("auth_error", "denied");
            }
            tracing::debug!(
                status = status.as_u16(),
                path = req.uri.path(),
                "denied by the authorization service"
            );
            let mut res = Response::new(Body::from(body.clone()));
            *res.status_mut() = *status;
            for (name, value) in headers {
                res.headers_mut().append(name.clone(), value.clone());
            }
            Some(res)
        }
    }
}
