//! A `tracing` span around every request, so that whatever is logged while a request is
//! served says which request it was.
//!
//! The span is named `request` and has these fields:
//!
//! | field | set by |
//! |---|---|
//! | `method`, `path` | this layer, from the request (the path without its query) |
//! | `trace_id` | this layer, from the [`TraceContext`] when one is set outside |
//! | `route` | the router, when a route matches |
//! | `upstream` | the proxy, with the endpoint (`host:port`) it picked |
//! | `status` | this layer, when the response head is ready |
//!
//! The span rides in the request's extensions (a [`tracing::Span`]): that is where the
//! router and the proxy find it to record their fields, and a request without one costs
//! them a lookup, not a trip through the subscriber.
//!
//! A failed request's log line then reads
//! `WARN request{method=GET path=/api/x route=api upstream=10.0.0.7:8080}: request failed
//! status=502 error=...`. The span is entered while the inner service's future and the
//! response body are polled. The layer logs no events of its own: the access log has one
//! line per request.
//!
//! The span's level is `INFO` by default: a subscriber that filters `INFO` out creates no
//! span and pays nothing for it.
//!
//! A span costs a few microseconds with `tracing-subscriber`'s formatter (more than the
//! rest of the observing layers together), so [`sampled_only`](RequestSpanLayer::sampled_only)
//! makes one only for requests whose trace is sampled (a [`TraceContext`] set outside says
//! so), the way tracing systems record spans: with a sample ratio of 0.1, a tenth of the
//! requests pay for one, and the others pass through untouched (no clock read, no
//! entering). A failed request's log line names its method, path, route and upstream either
//! way ([`gateway_core::Error::log_for`]).
//!
//! At an edge that also has metrics or an access log, the
//! `observe::ObserveLayer` (features `metrics`, `access-log` or `otlp`) makes and enters the same span
//! (`ObserveLayer::request_span`), without a wrapper of its own.
//!
//! [`TraceContext`]: crate::trace_context::TraceContext
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::request_span::RequestSpanLayer;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(RequestSpanLayer::new())
//!     .service(service_fn(|_: Request<Body>| async {
//!         tracing::warn!("logged inside the request's span");
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//!     }));
//! svc.oneshot(Request::new(Body::empty())).await.unwrap();
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::field::Empty;
use tracing::{Level, Span};

use crate::trace_context::TraceContext;

/// Puts requests in a `request` span; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct RequestSpanLayer {
    level: Level,
    sampled_only: bool,
    on: bool,
}

/// The service of [`RequestSpanLayer`].
#[derive(Clone, Debug)]
pub struct RequestSpan<S> {
    inner: S,
    layer: RequestSpanLayer,
}

pin_project! {
    /// Response future of [`RequestSpan`]: polled inside the span, when there is one.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Option<Span>,
    }
}

pin_project! {
    /// Response body of [`RequestSpan`]: polled inside the span, when there is one.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        span: Option<Span>,
    }
}

// === impl RequestSpanLayer ===

impl Default for RequestSpanLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestSpanLayer {
    /// A span for every request, at `INFO`.
    pub const fn new() -> Self {
        Self {
            level: Level::INFO,
            sampled_only: false,
            on: true,
        }
    }

    /// A layer that makes no spans, for a stack whose spans are a choice made at run time:
    /// the stack's type stays the same, and requests pass through.
    pub const fn off() -> Self {
        Self {
            level: Level::INFO,
            sampled_only: false,
            on: false,
        }
    }

    /// A span only for requests whose [`TraceContext`] (set by a `TraceContextLayer`
    /// outside) is sampled; none for the others, nor for a request without one.
    pub const fn sampled_only(mut self) -> Self {
        self.sampled_only = true;
        self
    }

    /// Spans at `level`: at `WARN`, a subscriber that shows warnings only still makes
    /// them.
    pub const fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
}

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> RequestSpan<S> {
        RequestSpan {
            inner,
            layer: *self,
        }
    }
}

// === impl RequestSpan ===

impl<S, B, ResB> Service<Request<B>> for RequestSpan<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let trace = req.extensions().get::<TraceContext>().copied();
        let span = self.layer.span(&req, trace.as_ref());
        let inner = match &span {
            Some(span) => {
                // Inner layers record into the request's own span (`route`, `upstream`).
                req.extensions_mut().insert(span.clone());
                span.in_scope(|| self.inner.call(req))
            }
            None => self.inner.call(req),
        };
        ResponseFuture { inner, span }
    }
}

impl RequestSpanLayer {
    /// Whether the layer makes spans at all.
    pub(crate) const fn is_on(&self) -> bool {
        self.on
    }

    /// The span of `req`, in `trace`, unless it gets none.
    pub(crate) fn span<B>(&self, req: &Request<B>, trace: Option<&TraceContext>) -> Option<Span> {
        if !self.on {
            return None;
        }
        if self.sampled_only && !trace.is_some_and(TraceContext::is_sampled) {
            return None;
        }
        // NOTE: the trace id goes in with the span, not recorded after it: a subscriber
        // that formats fields (`tracing_subscriber::fmt`) formats once, not twice.
        let trace_id = trace.map(|trace| tracing::field::display(trace.trace_id()));
        macro_rules! span {
            ($level:expr) => {
                tracing::span!(
                    $level,
                    "request",
                    method = %req.method(),
                    path = %req.uri().path(),
                    route = Empty,
                    upstream = Empty,
                    status = Empty,
                    trace_id = trace_id,
                )
            };
        }
        let span = match self.level {
            Level::ERROR => span!(Level::ERROR),
            Level::WARN => span!(Level::WARN),
            Level::INFO => span!(Level::INFO),
            Level::DEBUG => span!(Level::DEBUG),
            _ => span!(Level::TRACE),
        };
        if span.is_disabled() {
            return None;
        }
        Some(span)
    }
}

// === impl ResponseFuture ===

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResponseBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = {
            let _entered = this.span.as_ref().map(Span::enter);
            ready!(this.inner.poll(cx))?
        };
        let span = this.span.take();
        if let Some(span) = &span {
            span.record("status", res.status().as_u16());
        }
        Poll::Ready(Ok(res.map(|inner| ResponseBody { inner, span })))
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}

// === impl ResponseBody ===

impl<B: http_body::Body> http_body::Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let _entered = this.span.as_ref().map(Span::enter);
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}
