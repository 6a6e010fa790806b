use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gateway_core::{Body, BoxError, Error, ErrorKind, RouteId};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use tower::Service;

use super::host::{HostError, request_host};
use super::path::{PathError, normalize};
use super::route::{InvalidRoute, Route, Table};

/// Routes requests to per-route services; see the [module docs](super).
///
/// A route's response carries the route's [`RouteId`] in its extensions (for the access log
/// and the metrics outside the router). A route's *error* is answered here, as its problem
/// response (logged once), so that it names its route too: the router never fails.
///
/// Cloning is cheap (one `Arc`); routes are fixed once the router is built.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    table: Table,
    routes: Vec<Arc<dyn ErasedService>>,
    fallback: Option<Arc<dyn ErasedService>>,
}

type BoxFuture = gateway_core::boxed::BoxResponseFuture;

/// Response future of [`Router`].
pub struct ResponseFuture {
    kind: Kind,
}

enum Kind {
    Ready(Option<Response<Body>>),
    /// A route's answer, with what its failure's log line says of the request.
    Route(BoxFuture, Option<RouteId>, Method, Uri),
}

/// A route's service with its type erased. Calling it clones the service into the one boxed
/// future it returns, so a routed request costs a single allocation.
trait ErasedService: Send + Sync {
    fn oneshot(&self, req: Request<Body>) -> BoxFuture;
}

impl<S, ResB> ErasedService for S
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    fn oneshot(&self, req: Request<Body>) -> BoxFuture {
        gateway_core::boxed::oneshot(self.clone(), req)
    }
}

/// A config-built route (already boxed, with the router's future type): called as it is,
/// without a second box around its own.
#[cfg(feature = "config")]
struct Boxed(gateway_core::registry::RouteService);

#[cfg(feature = "config")]
impl ErasedService for Boxed {
    fn oneshot(&self, req: Request<Body>) -> BoxFuture {
        self.0.clone().call(req)
    }
}

/// `service`, type-erased for the route table.
fn erase<S, ResB>(service: S) -> Arc<dyn ErasedService>
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    #[cfg(feature = "config")]
    if let Some(boxed) =
        (&service as &dyn std::any::Any).downcast_ref::<gateway_core::registry::RouteService>()
    {
        return Arc::new(Boxed(boxed.clone()));
    }
    Arc::new(service)
}

// === impl Router ===

impl Router {
    /// A router without routes: every request gets 404.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner::default()),
        }
    }

    /// Adds a route.
    ///
    /// # Panics
    ///
    /// When the route is invalid or duplicates another one (a programming error); use
    /// [`Router::try_route`] for routes that come from configuration.
    #[must_use]
    #[track_caller]
    pub fn route<S, ResB>(self, route: Route, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        ResB: http_body::Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        match self.try_route(route, service) {
            Ok(router) => router,
            Err(err) => panic!("{err}"),
        }
    }

    /// Adds a route.
    ///
    /// # Errors
    ///
    /// When the route's path is not normalized, its host pattern is malformed, or another
    /// route already matches the same host, path and method.
    pub fn try_route<S, ResB>(mut self, route: Route, service: S) -> Result<Self, InvalidRoute>
    where
        S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        ResB: http_body::Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let inner = self.inner_mut();
        let index = inner.routes.len();
        inner.table.insert(route, index)?;
        inner.routes.push(erase(service));
        Ok(self)
    }

    /// Serves requests that match no route (instead of 404). The fallback still only sees
    /// requests whose host and path passed validation.
    #[must_use]
    pub fn fallback<S, ResB>(mut self, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        ResB: http_body::Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        self.inner_mut().fallback = Some(erase(service));
        self
    }

    fn inner_mut(&mut self) -> &mut Inner {
        // NOTE: routers are built before they are cloned into a server; a clone made during
        // building is split off here so building never affects an existing copy.
        if Arc::get_mut(&mut self.inner).is_none() {
            let old = &*self.inner;
            self.inner = Arc::new(Inner {
                table: old.table.clone(),
                routes: old.routes.clone(),
                fallback: old.fallback.clone(),
            });
        }
        Arc::get_mut(&mut self.inner).unwrap_or_else(|| unreachable!("just made unique"))
    }

    fn reject(kind: ErrorKind, why: &'static str) -> ResponseFuture {
        tracing::debug!(reason = why, "request refused by the router");
        ResponseFuture {
            kind: Kind::Ready(Some(Error::new(kind).to_response())),
        }
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.inner.routes.len())
            .field("fallback", &self.inner.fallback.is_some())
            .finish()
    }
}

impl<B> Service<Request<B>> for Router
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Route services are driven to readiness inside their own futures.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        self.dispatch(req)
    }
}

impl Router {
    /// Routes `req`: what [`Service::call`] does, through a shared reference (the router of
    /// a live config is called through its current `Arc` without a clone of it).
    pub fn dispatch<B>(&self, req: Request<B>) -> ResponseFuture
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if req.method() == Method::CONNECT {
            return Self::reject(ErrorKind::BadRequest, "CONNECT is not proxied");
        }
        let host = match request_host(&req) {
            Ok(host) => host,
            Err(e) => {
                return Self::reject(
                    ErrorKind::BadRequest,
                    match e {
                        HostError::Missing => "missing Host",
                        HostError::Multiple => "several Host headers",
                        HostError::Invalid => "invalid Host",
                        HostError::Mismatch => "target and Host disagree",
                    },
                );
            }
        };
        let path = match normalize(req.uri().path()) {
            Ok(path) => path,
            Err(e) => {
                return Self::reject(
                    ErrorKind::BadRequest,
                    match e {
                        PathError::NotOriginForm => "path is not origin-form",
                        PathError::BadEncoding => "malformed percent-encoding",
                        PathError::EncodedSeparator => "encoded / or \\ in path",
                        PathError::Forbidden => "control character or \\ in path",
                        PathError::AboveRoot => "path climbs above the root",
                    },
                );
            }
        };
        let found = self
            .inner
            .table
            .lookup(host.as_deref(), &path, req.method())
            .map(|i| (&self.inner.routes[i], self.inner.table.id(i)));
        let (service, id) = match (found, &self.inner.fallback) {
            (Some((svc, id)), _) => (svc, id.cloned()),
            (None, Some(fallback)) => (fallback, None),
            (None, None) => return Self::reject(ErrorKind::NotFound, "no route matches"),
        };
        let new_uri = match path {
            Cow::Borrowed(_) => None,
            Cow::Owned(path) => Some(with_path(req.uri(), &path)),
        };
        drop(host);
        let mut req = req.map(Body::new);
        if let Some(uri) = new_uri {
            match uri {
                Some(uri) => *req.uri_mut() = uri,
                None => return Self::reject(ErrorKind::BadRequest, "unparsable target"),
            }
        }
        if let Some(id) = &id {
            // The request's span, when it has one, names its route.
            if let Some(span) = req.extensions().get::<tracing::Span>() {
                span.record("route", tracing::field::display(id));
            }
            req.extensions_mut().insert(id.clone());
        }
        let (method, uri) = (req.method().clone(), req.uri().clone());
        ResponseFuture {
            kind: Kind::Route(service.oneshot(req), id, method, uri),
        }
    }
}

/// `uri` with its path replaced, its query kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")).ok()?,
        None => PathAndQuery::try_from(path).ok()?,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).ok()
}

// === impl ResponseFuture ===

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.kind {
            Kind::Ready(res) => Poll::Ready(Ok(res
                .take()
                .unwrap_or_else(|| Error::new(ErrorKind::Internal).to_response()))),
            Kind::Route(fut, id, method, uri) => {
                let mut res = match ready!(fut.as_mut().poll(cx)) {
                    Ok(res) => res,
                    // NOTE: answered here, not at the edge, so that the answer still names
                    // its route (for the access log and the metrics outside), and its log
                    // line the request.
                    Err(err) => {
                        let err = Error::from_box(err);
                        err.log_for(method, uri.path(), id.as_ref());
                        err.to_response()
                    }
                };
                if let Some(id) = id.take() {
                    res.extensions_mut().insert(id);
                }
                Poll::Ready(Ok(res))
            }
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use std::convert::Infallible;
    use tower::service_fn;

    fn tag(
        name: &'static str,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync {
        service_fn(move |req: Request<Body>| async move {
            let id = req
                .extensions()
                .get::<gateway_core::RouteId>()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default();
            let body = format!("{name} {} {id}", req.uri());
            Ok::<_, Infallible>(Response::new(Body::from(body)))
        })
    }

    async fn call(router: &Router, req: Request<Body>) -> (StatusCode, String) {
        let res = router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect_bytes().await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn get(target: &str) -> Request<Body> {
        Request::get(target)
            .header("host", "gw")
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn routes_on_the_normalized_path_and_keeps_the_query() {
        let router = Router::new().route(Route::prefix("/admin").id("admin"), tag("admin"));
        assert_eq!(
            call(&router, get("/x/../%61dmin//users?q=%2F")).await,
            (StatusCode::OK, "admin /admin/users?q=%2F admin".into())
        );
    }

    #[tokio::test]
    async fn refusals_are_problem_responses() {
        let router = Router::new().route(Route::prefix("/"), tag("all"));
        assert_eq!(
            call(&router, get("/a%2fb")).await.0,
            StatusCode::BAD_REQUEST
        );
        let no_host = Request::get("/").body(Body::empty()).unwrap();
        assert_eq!(call(&router, no_host).await.0, StatusCode::BAD_REQUEST);
        let empty = Router::new();
        let res = empty.oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }

    #[tokio::test]
    async fn fallback_takes_unmatched_requests() {
        let router = Router::new()
            .route(Route::exact("/a"), tag("a"))
            .fallback(tag("fallback"));
        assert_eq!(
            call(&router, get("/b")).await,
            (StatusCode::OK, "fallback /b ".into())
        );
    }

    #[test]
    #[should_panic(expected = "invalid route")]
    fn invalid_routes_panic_in_route() {
        let _ = Router::new().route(Route::prefix("nope"), tag("x"));
    }

    #[test]
    fn building_from_a_clone_leaves_the_original_alone() {
        let a = Router::new().route(Route::exact("/a"), tag("a"));
        let b = a.clone().route(Route::exact("/b"), tag("b"));
        assert_eq!(a.inner.routes.len(), 1);
        assert_eq!(b.inner.routes.len(), 2);
    }
}
