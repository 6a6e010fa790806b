use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::UNIX_EPOCH;

use base64::Engine as _;
use bytes::Bytes;
use gateway_core::metrics::{Format, Metrics};
use gateway_core::purge::{PurgeTarget, Purgers, key_url_of};
use gateway_core::{Body, Error, ErrorKind};
use http::header::{ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::Service;

use super::Inventory;
use crate::server::Readiness;

/// The admin listener's service; see the [module docs](super).
///
/// Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct Admin {
    shared: Arc<Shared>,
}

/// Builds an [`Admin`].
#[must_use]
pub struct AdminBuilder {
    metrics: Metrics,
    inventory: Inventory,
    readiness: Readiness,
    token: Option<String>,
    purgers: Option<Purgers>,
}

struct Shared {
    metrics: Metrics,
    inventory: Inventory,
    readiness: Readiness,
    purgers: Option<Purgers>,
    /// The token, when one is required.
    token: Option<Vec<u8>>,
}

/// The status page and its assets: plain files, no build step.
const PAGE: &str = include_str!("ui/index.html");
const STYLE: &str = include_str!("ui/status.css");
const SCRIPT: &str = include_str!("ui/status.js");

/// What the status page may load: its own script and style, and fetches to this origin.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The challenge of a 401: a bearer token for tools; Basic (any user name, the token as
/// the password) so that a browser asks for it and then sends it with the page's fetches.
const CHALLENGE: &str =
    r#"Bearer realm="gateway-admin", Basic realm="gateway-admin", charset="UTF-8""#;

// === impl Admin ===

impl Admin {
    /// Starts a builder: `/metrics` from `metrics`, `/status` from `inventory`, `/readyz`
    /// from `readiness`.
    pub fn builder(
        metrics: &Metrics,
        inventory: &Inventory,
        readiness: &Readiness,
    ) -> AdminBuilder {
        AdminBuilder {
            metrics: metrics.clone(),
            inventory: inventory.clone(),
            readiness: readiness.clone(),
            token: None,
            purgers: None,
        }
    }
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("token", &self.shared.token.is_some())
            .finish_non_exhaustive()
    }
}

impl Service<Request<Body>> for Admin {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if req.uri().path() == PURGE
            && let Some(purgers) = self.shared.purgers.clone()
            && self.shared.authorized(&req)
        {
            let (method, uri) = (req.method().clone(), req.uri().clone());
            return Box::pin(async move { Ok(purge(&purgers, &method, uri.query()).await) });
        }
        let res = self.shared.answer(&req);
        Box::pin(async move { Ok(res) })
    }
}

// === impl AdminBuilder ===

impl AdminBuilder {
    /// Requires `Authorization: Bearer <token>` on every path (`/healthz` included: probes
    /// send it too). An empty token is no token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// Serves `POST /cache/purge` for the caches in `purgers` (see the
    /// [module docs](super#purging-caches)).
    pub fn purgers(mut self, purgers: &Purgers) -> Self {
        self.purgers = Some(purgers.clone());
        self
    }

    /// The service.
    pub fn build(self) -> Admin {
        Admin {
            shared: Arc::new(Shared {
                metrics: self.metrics,
                inventory: self.inventory,
                readiness: self.readiness,
                token: self.token.map(String::into_bytes),
                purgers: self.purgers,
            }),
        }
    }
}

impl fmt::Debug for AdminBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminBuilder")
            .field("token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

// === impl Shared ===

impl Shared {
    fn answer(&self, req: &Request<Body>) -> Response<Body> {
        if !self.authorized(req) {
            return Error::new(ErrorKind::Unauthenticated)
                .challenge(HeaderValue::from_static(CHALLENGE))
                .to_response();
        }
        let path = req.uri().path();
        if !matches!(
            path,
            "/" | "/ui/status.css"
                | "/ui/status.js"
                | "/metrics"
                | "/healthz"
                | "/readyz"
                | "/status"
        ) {
            return Error::new(ErrorKind::NotFound).to_response();
        }
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut res = Error::new(ErrorKind::MethodNotAllowed).to_response();
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return res;
        }
        let mut res = match path {
            "/metrics" => {
                let format = Format::negotiate(req.headers().get(http::header::ACCEPT));
                text(
                    StatusCode::OK,
                    format.content_type(),
                    self.metrics.encode(format),
                )
            }
            "/" => page(PAGE, "text/html; charset=utf-8"),
            "/ui/status.css" => page(STYLE, "text/css; charset=utf-8"),
            "/ui/status.js" => page(SCRIPT, "text/javascript; charset=utf-8"),
            "/healthz" => text(StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => {
                if self.readiness.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n".into())
                } else if self.readiness.is_ready() {
                    text(StatusCode::OK, TEXT, "ready\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n".into())
                }
            }
            _ => text(
                StatusCode::OK,
                "application/json",
                self.status().to_string(),
            ),
        };
        res.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if req.method() == Method::HEAD {
            *res.body_mut() = Body::empty();
        }
        res
    }

    /// Whether the request carries the token, when one is required: `Bearer <token>`, or
    /// `Basic` credentials with the token as the password (compared in constant time).
    fn authorized(&self, req: &Request<Body>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(given) = req.headers().get(AUTHORIZATION) else {
            return false;
        };
        let given = given.as_bytes();
        if let Some(bearer) = given.strip_prefix(b"Bearer ") {
            return same(bearer, token);
        }
        let Some(basic) = given.strip_prefix(b"Basic ") else {
            return false;
        };
        // NOTE: credentials are short; a longer header is refused before decoding.
        if basic.len() > 1024 {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim_ascii())
        else {
            return false;
        };
        decoded
            .iter()
            .position(|&b| b == b':')
            .is_some_and(|colon| same(&decoded[colon + 1..], token))
    }

    /// The `/status` document.
    fn status(&self) -> Value {
        let now = Instant::now();
        let routes: Vec<Value> = self
            .inventory
            .routes()
            .into_iter()
            .map(|r| {
                json!({
                    "id": r.id,
                    "host": r.host,
                    "path": r.path,
                    "methods": r.methods,
                    "upstream": r.upstream,
                    "action": r.action,
                    "plugins": r.plugins,
                })
            })
            .collect();
        let upstreams: Vec<Value> = self
            .inventory
            .upstreams()
            .into_iter()
            .map(|(name, upstream)| {
                let endpoints: Vec<Value> = upstream
                    .endpoints()
                    .iter()
                    .map(|e| {
                        let s = e.state(now);
                        let o = e.outcomes();
                        let state = if !s.healthy {
                            "unhealthy"
                        } else if s.ejected {
                            "ejected"
                        } else {
                            "healthy"
                        };
                        json!({
                            "url": s.url,
                            "state": state,
                            "weight": s.weight,
                            "in_flight": s.in_flight,
                            "latency_ewma_ms": s.rtt.map(|d| d.as_secs_f64() * 1e3),
                            "consecutive_failures": s.consecutive_failures,
                            "ejections": s.ejections,
                            "requests": {
                                "success": o.success,
                                "failure": o.failure,
                                "retryable": o.retryable,
                                "client": o.client,
                            },
                        })
                    })
                    .collect();
                json!({ "name": &*name, "endpoints": endpoints })
            })
            .collect();
        let config = self.inventory.config().map(|c| {
            json!({
                "source": c.source,
                "version": c.version,
                "reloads": { "applied": c.applied, "refused": c.refused },
                "last_error": c.last_error,
                "last_applied": c.last_applied
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
            })
        });
        json!({
            "ready": self.readiness.is_ready(),
            "draining": self.readiness.is_draining(),
            "config": config,
            "routes": routes,
            "upstreams": upstreams,
        })
    }
}

/// `POST /cache/purge?url=…|prefix=…[&cache=…]`: forgets what the caches hold for a
/// URL or under a URL prefix; how many keys each cache forgot, as JSON.
async fn purge(purgers: &Purgers, method: &Method, query: Option<&str>) -> Response<Body> {
    if method != Method::POST {
        let mut res = Error::new(ErrorKind::MethodNotAllowed).to_response();
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return res;
    }
    let Some((cache, target)) = purge_query(query.unwrap_or("")) else {
        return Error::new(ErrorKind::BadRequest).to_response();
    };
    let Ok(results) = purgers.purge(cache.as_deref(), &target).await else {
        return Error::new(ErrorKind::NotFound).to_response();
    };
    let mut purged = serde_json::Map::new();
    let mut failed = Vec::new();
    for (name, result) in results {
        match result {
            Ok(n) => {
                purged.insert(name, n.into());
            }
            Err(e) => {
                tracing::warn!(cache = %name, error = %e, "cache purge failed");
                failed.push(name);
            }
        }
    }
    let (what, value) = match &target {
        PurgeTarget::Url(url) => ("url", url),
        PurgeTarget::Prefix(prefix) => ("prefix", prefix),
    };
    tracing::info!(target: "gateway::admin", %what, %value, ?purged, ?failed, "cache purge");
    let status = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    let mut res = text(
        status,
        "application/json",
        json!({ what: value, "purged": purged, "failed": failed }).to_string(),
    );
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The purge's path.
const PURGE: &str = "/cache/purge";

/// The longest URL or prefix a purge takes.
const MAX_PURGE_URL: usize = 8 * 1024;

/// A purge's query: the cache (`cache=`, optional) and what to forget: `url=` or
/// `prefix=`, exactly one, an absolute `http://` or `https://` URL with a host, its
/// scheme and host normalised as a cache key has them (lowercase host, no default port).
fn purge_query(query: &str) -> Option<(Option<String>, PurgeTarget)> {
    if query.len() > 3 * MAX_PURGE_URL {
        return None;
    }
    let (mut cache, mut target) = (None, None);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*name {
            "cache" => {
                if cache.replace(value.into_owned()).is_some() {
                    return None;
                }
                continue;
            }
            "url" => PurgeTarget::Url(normalised_url(&value)?),
            "prefix" => PurgeTarget::Prefix(normalised_url(&value)?),
            _ => return None,
        };
        if target.replace(slot).is_some() {
            return None;
        }
    }
    Some((cache, target?))
}

/// `url` as a cache keys it ([`key_url_of`]), if it is printable ASCII within the bounds.
fn normalised_url(url: &str) -> Option<String> {
    if url.len() > MAX_PURGE_URL || !url.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    key_url_of(url)
}

/// Whether `a` and `b` are equal, in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A file of the status page, with the headers that keep it to itself.
fn page(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::from(Bytes::from_static(body.as_bytes())));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_POLICY),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    res
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut res = Response::new(Body::from(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}
