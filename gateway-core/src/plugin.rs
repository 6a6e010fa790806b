//! Middleware built from one trait: custom plugins with request and response hooks.
//!
//! A [`Plugin`] sees the request head before the inner service runs and the response head
//! after it; per-request state lives in its [`Plugin::Ctx`], created per request and handed
//! to every hook. [`PluginLayer`] makes a plugin an ordinary tower layer, so it is ordered by
//! its place in a `ServiceBuilder`, among the built-in layers and tower-http's.
//!
//! # Example
//!
//! ```
//! use gateway_core::{Body, Error, ErrorKind, Flow, Plugin, PluginLayer};
//! use http::{HeaderValue, Request, Response, StatusCode, request, response};
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! /// Requires an `x-tenant` header and echoes it back.
//! #[derive(Clone)]
//! struct Tenant;
//!
//! impl Plugin for Tenant {
//!     type Ctx = Option<HeaderValue>;
//!     const NAME: &'static str = "tenant";
//!
//!     fn new_ctx(&self) -> Self::Ctx {
//!         None
//!     }
//!
//!     async fn on_request(&self, req: &mut request::Parts, ctx: &mut Self::Ctx) -> Result<Flow, Error> {
//!         match req.headers.get("x-tenant") {
//!             Some(t) => { *ctx = Some(t.clone()); Ok(Flow::Continue) }
//!             None => Err(Error::new(ErrorKind::Forbidden)),
//!         }
//!     }
//!
//!     async fn on_response(&self, res: &mut response::Parts, ctx: &mut Self::Ctx) -> Result<(), Error> {
//!         if let Some(t) = ctx.take() { res.headers.insert("x-tenant", t); }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(PluginLayer::new(Tenant))
//!     .service(service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(Response::new(Body::empty())) }));
//!
//! let res = svc.clone().oneshot(Request::new(Body::empty())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::FORBIDDEN);
//!
//! let req = Request::builder().header("x-tenant", "acme").body(Body::empty()).unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-tenant"], "acme");
//! # }
//! ```
//!
//! # Errors
//!
//! An `Err` from `on_request` or `on_response` is a rejection: it becomes the problem
//! response of its [`ErrorKind`](crate::ErrorKind) (logged once, here), and the inner
//! response, if any, is dropped. Errors of the inner service pass through unchanged (as a
//! [`BoxError`]) after [`Plugin::on_error`] has seen them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, request, response};
use tower::{Layer, Service};

use crate::{Body, BoxError, Error};

/// What a request hook decided.
#[derive(Debug)]
pub enum Flow {
    /// Go on to the inner service.
    Continue,
    /// Answer with this response; the inner service is not called. `on_response` still
    /// runs on it.
    Respond(Response<Body>),
}

/// A gateway plugin: hooks on the request and response heads, with per-request state.
///
/// Implement the hooks you need; the defaults continue and do nothing. Hooks may be
/// `async fn`s. Plugins see heads and extensions, not bodies: code that rewrites bodies is a
/// full tower layer.
pub trait Plugin: Send + Sync + 'static {
    /// Per-request state shared by the hooks of one request.
    type Ctx: Send + 'static;

    /// The plugin's name, for logs and metrics labels.
    const NAME: &'static str;

    /// Creates the state for a new request.
    fn new_ctx(&self) -> Self::Ctx;

    /// Runs before the inner service; may edit the request head or answer on its own.
    fn on_request(
        &self,
        req: &mut request::Parts,
        ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<Flow, Error>> + Send {
        let _ = (req, ctx);
        std::future::ready(Ok(Flow::Continue))
    }

    /// Runs on the response head, whether from the inner service or from `Flow::Respond`.
    fn on_response(
        &self,
        res: &mut response::Parts,
        ctx: &mut Self::Ctx,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = (res, ctx);
        std::future::ready(Ok(()))
    }

    /// Observes an error of the inner service (the error itself passes through unchanged).
    fn on_error(&self, err: &BoxError, ctx: &mut Self::Ctx) {
        let _ = (err, ctx);
    }
}

/// Mounts a [`Plugin`] as a tower layer.
#[must_use]
pub struct PluginLayer<P> {
    plugin: Arc<P>,
}

/// The service built by [`PluginLayer`]: the plugin mounted on `inner`. (Not `Plugin<S>`,
/// the tower-http naming, as that is the trait.)
pub struct Mounted<S, P> {
    plugin: Arc<P>,
    inner: S,
}

/// Response future of [`Mounted`].
///
/// NOTE: hooks are `async fn`s whose futures cannot be named, so the adapter boxes one
/// future per request. Built-in middleware uses hand-written futures instead.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>,
}

// === impl PluginLayer ===

impl<P: Plugin> PluginLayer<P> {
    /// Mounts `plugin`.
    pub fn new(plugin: P) -> Self {
        Self {
            plugin: Arc::new(plugin),
        }
    }

    /// Mounts a plugin that is already shared.
    pub const fn from_arc(plugin: Arc<P>) -> Self {
        Self { plugin }
    }
}

impl<P> Clone for PluginLayer<P> {
    fn clone(&self) -> Self {
        Self {
            plugin: Arc::clone(&self.plugin),
        }
    }
}

impl<P: Plugin> fmt::Debug for PluginLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginLayer")
            .field("plugin", &P::NAME)
            .finish()
    }
}

impl<P, S> Layer<S> for PluginLayer<P> {
    type Service = Mounted<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Mounted {
            plugin: Arc::clone(&self.plugin),
            inner,
        }
    }
}

// === impl Mounted ===

impl<P, S: Clone> Clone for Mounted<S, P> {
    fn clone(&self) -> Self {
        Self {
            plugin: Arc::clone(&self.plugin),
            inner: self.inner.clone(),
        }
    }
}

impl<P: Plugin, S: fmt::Debug> fmt::Debug for Mounted<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mounted")
            .field("plugin", &P::NAME)
            .field("inner", &self.inner)
            .finish()
    }
}

impl<P, S, B, ResB> Service<Request<B>> for Mounted<S, P>
where
    P: Plugin,
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // NOTE: `self.inner` is the instance that was driven to readiness; take it and leave
        // a fresh clone behind (tower-service "be careful when cloning inner services").
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let plugin = Arc::clone(&self.plugin);
        ResponseFuture::new(async move {
            let mut ctx = plugin.new_ctx();
            let (mut head, body) = req.into_parts();
            let flow = match plugin.on_request(&mut head, &mut ctx).await {
                Ok(flow) => flow,
                Err(err) => return Ok(reject(P::NAME, &err)),
            };
            let res = match flow {
                Flow::Respond(res) => res,
                Flow::Continue => match inner.call(Request::from_parts(head, body)).await {
                    Ok(res) => res.map(Body::new),
                    Err(err) => {
                        let err = err.into();
                        plugin.on_error(&err, &mut ctx);
                        return Err(err);
                    }
                },
            };
            let (mut head, body) = res.into_parts();
            match plugin.on_response(&mut head, &mut ctx).await {
                Ok(()) => Ok(Response::from_parts(head, body)),
                Err(err) => Ok(reject(P::NAME, &err)),
            }
        })
    }
}

// === impl ResponseFuture ===

impl ResponseFuture {
    fn new(fut: impl Future<Output = Result<Response<Body>, BoxError>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(fut),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

fn reject(plugin: &'static str, err: &Error) -> Response<Body> {
    tracing::debug!(plugin, "plugin rejected the request");
    err.log();
    err.to_response()
}

#[cfg(test)]
mod tests;
