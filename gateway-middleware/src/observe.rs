//! Observing a request once for everything that reports on it: metrics, the access log, OTLP
//! export and the request span.
//!
//! [`ObserveLayer`] wraps a service once, however many of them it reports to: one
//! clock read when a request arrives and one when its response body ends, one copy of the
//! request's head (only when the access log or a span needs it), one wrapper around the
//! future and one around the response body. Each of [`HttpMetricsLayer`],
//! [`AccessLogLayer`] and [`OtlpLayer`] is this layer with one part; stacking them works,
//! and costs a wrapper each. At the edge, use one `ObserveLayer` with the parts you want:
//!
//! ```
//! use gateway_core::Body;
//! use gateway_core::metrics::{Format, Metrics};
//! use gateway_middleware::access_log::AccessLog;
//! use gateway_middleware::observe::ObserveLayer;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let metrics = Metrics::new();
//! let log = AccessLog::builder().writer(std::io::sink()).start()?;
//! let svc = ServiceBuilder::new()
//!     .layer(ObserveLayer::new().metrics(&metrics).access_log(&log))
//!     .service(service_fn(|_: Request<Body>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::from("hello")))
//!     }));
//! let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
//! Body::new(res.into_body()).collect_bytes().await.unwrap();
//! assert!(metrics.encode(Format::Prometheus).contains("gateway_http_requests_total"));
//! # Ok(())
//! # }
//! ```
//!
//! A request is recorded when its response body ends, or when the client goes away before
//! (the access log says `aborted`). A request the inner service fails is recorded with the
//! status its error maps to. The layer's errors are boxed (`BoxError`).
//!
//! [`HttpMetricsLayer`]: crate::metrics::HttpMetricsLayer
//! [`AccessLogLayer`]: crate::access_log::AccessLogLayer
//! [`OtlpLayer`]: crate::otlp::OtlpLayer

use std::fmt;
use std::future::Future;
#[cfg(any(feature = "access-log", feature = "otlp"))]
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, ready};
#[cfg(any(feature = "access-log", feature = "otlp"))]
use std::time::{Duration, SystemTime};

#[cfg(feature = "access-log")]
use gateway_core::RequestId;
use gateway_core::{Body, BoxError, Error, ErrorKind, RouteId};
#[cfg(any(feature = "access-log", feature = "otlp"))]
use gateway_core::{ClientIp, ConnectInfo, LogFields, UpstreamCall};
#[cfg(any(feature = "access-log", feature = "otlp"))]
use http::header::{self, HeaderValue};
#[cfg(any(feature = "access-log", feature = "otlp"))]
use http::{Method, Uri, Version};
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use self::request::{count_request, read};

/// Reports every request to the parts it was given; see the [module docs](self).
#[derive(Clone, Default)]
#[must_use]
pub struct ObserveLayer {
    parts: Arc<Parts>,
}

/// The service of [`ObserveLayer`] (and of the metrics, access-log and OTLP layers).
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    /// `None` when there is nothing to report to: requests pass through.
    parts: Option<Arc<Parts>>,
}

pin_project! {
    /// Response future of [`Observe`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        exchange: Option<Exchange>,
    }
}

pin_project! {
    /// Response body of [`Observe`]: counts its bytes and records the request once, at its
    /// end or when it is dropped before.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        written: u64,
        // Whether the body had nothing to send from the start (it may never be polled).
        empty: bool,
        finish: Option<Finish>,
        // The request's span, entered while the body is polled.
        span: SpanSlot,
    }

    impl<B> PinnedDrop for ResponseBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(finish) = this.finish.take() {
                // A body with nothing to send ended, polled or not.
                finish.end(*this.written, *this.empty);
            }
        }
    }
}

/// A request's trace (none without the `trace-context` feature).
#[cfg(all(
    feature = "trace-context",
    any(feature = "access-log", feature = "otlp")
))]
type Trace = crate::trace_context::TraceContext;
#[cfg(all(not(feature = "trace-context"), feature = "access-log"))]
type Trace = ();

/// The wall-clock time at `now`, from a pair of clock readings each thread renews every
/// second: one clock read per request instead of two. (A step of the system clock shows
/// in the access log within a second.)
#[cfg(any(feature = "access-log", feature = "otlp"))]
fn wall_clock(now: Instant) -> SystemTime {
    thread_local! {
        static BASE: std::cell::Cell<Option<(Instant, SystemTime)>> =
            const { std::cell::Cell::new(None) };
    }
    BASE.with(|base| match base.get() {
        Some((at, wall)) if now >= at && now - at < Duration::from_secs(1) => wall + (now - at),
        _ => {
            let wall = SystemTime::now();
            base.set(Some((now, wall)));
            wall
        }
    })
}

/// Where a request's span is kept (nowhere without the `request-span` feature).
#[cfg(feature = "request-span")]
type SpanSlot = Option<tracing::Span>;
#[cfg(not(feature = "request-span"))]
type SpanSlot = ();

/// What an [`Observe`] reports to.
#[derive(Clone, Default)]
struct Parts {
    #[cfg(feature = "metrics")]
    metrics: Option<Arc<crate::metrics::Shared>>,
    #[cfg(feature = "access-log")]
    log: Option<crate::access_log::AccessLog>,
    #[cfg(feature = "otlp")]
    otlp: Option<crate::otlp::OtlpExporter>,
    #[cfg(feature = "request-span")]
    span: Option<crate::request_span::RequestSpanLayer>,
}

/// A request on its way, until its response comes.
struct Exchange {
    parts: Arc<Parts>,
    /// The request's span, entered while the inner future is polled.
    #[cfg(feature = "request-span")]
    span: Option<tracing::Span>,
    start: Instant,
    /// What the request body has read so far; `None` for a request without a body.
    read: Option<Arc<AtomicU64>>,
    /// The method's row in a route's request counters, and its label.
    #[cfg(feature = "metrics")]
    method: (usize, &'static str),
    /// The request's log fields, which carry its head (for the access log and the span).
    #[cfg(any(feature = "access-log", feature = "otlp"))]
    log: Option<LogFields>,
}

/// The request's head as the access log and the OTLP span report it.
#[cfg(any(feature = "access-log", feature = "otlp"))]
pub(crate) struct Head {
    pub(crate) time: SystemTime,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: Version,
    #[cfg(feature = "otlp")]
    pub(crate) tls: bool,
    pub(crate) host: Option<HeaderValue>,
    pub(crate) user_agent: Option<HeaderValue>,
    #[cfg(feature = "access-log")]
    pub(crate) referer: Option<HeaderValue>,
    pub(crate) client: Option<IpAddr>,
    #[cfg(feature = "access-log")]
    pub(crate) request_id: Option<RequestId>,
    /// The trace, when a `TraceContextLayer` outside set it.
    #[cfg(feature = "trace-context")]
    pub(crate) trace: Option<crate::trace_context::TraceContext>,
    /// The caller's `tracestate`, for the span.
    #[cfg(feature = "otlp")]
    pub(crate) trace_state: Option<HeaderValue>,
    /// Whether the request's span is exported.
    #[cfg(feature = "otlp")]
    pub(crate) export: bool,
    /// The fields an outer layer put in the request before this one (it reports them
    /// too): the inner layers write there, not into the fields that carry this head.
    outer: Option<LogFields>,
}

/// How a request ended.
#[cfg(any(feature = "access-log", feature = "otlp"))]
pub(crate) struct Outcome {
    pub(crate) status: StatusCode,
    pub(crate) route: Option<RouteId>,
    pub(crate) error: Option<ErrorKind>,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// From the request's arrival to the end of its response.
    pub(crate) duration: Duration,
    pub(crate) upstream: Option<UpstreamCall>,
    /// Whether the response body reached its end.
    pub(crate) complete: bool,
}

/// An answered request, until its response body ends.
pub(crate) struct Finish {
    exchange: Exchange,
    status: StatusCode,
    #[cfg(any(feature = "access-log", feature = "otlp"))]
    route: Option<RouteId>,
    #[cfg(any(feature = "access-log", feature = "otlp"))]
    error: Option<ErrorKind>,
    #[cfg(feature = "metrics")]
    series: Option<Arc<crate::metrics::RouteSeries>>,
}

// === impl ObserveLayer ===

impl ObserveLayer {
    /// A layer that reports to nothing yet: until it is given a part, requests pass through
    /// it (so that a stack whose observing is a choice made at run time keeps its type).
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts and times requests in `metrics` (see [`crate::metrics`]).
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, metrics: &gateway_core::metrics::Metrics) -> Self {
        Arc::make_mut(&mut self.parts).metrics = Some(crate::metrics::Shared::new(metrics));
        self
    }

    /// Writes a line per request to `log` (see [`crate::access_log`]).
    #[cfg(feature = "access-log")]
    pub fn access_log(mut self, log: &crate::access_log::AccessLog) -> Self {
        Arc::make_mut(&mut self.parts).log = Some(log.clone());
        self
    }

    /// Exports a span per sampled request through `exporter` (see [`crate::otlp`]).
    #[cfg(feature = "otlp")]
    pub fn otlp(mut self, exporter: &crate::otlp::OtlpExporter) -> Self {
        Arc::make_mut(&mut self.parts).otlp = Some(exporter.clone());
        self
    }

    /// Puts requests in a `request` span as `spans` says (see [`crate::request_span`]),
    /// without a layer of its own around them.
    #[cfg(feature = "request-span")]
    pub fn request_span(mut self, spans: crate::request_span::RequestSpanLayer) -> Self {
        Arc::make_mut(&mut self.parts).span = spans.is_on().then_some(spans);
        self
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            parts: (!self.parts.is_empty()).then(|| Arc::clone(&self.parts)),
        }
    }
}

impl fmt::Debug for ObserveLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObserveLayer").finish_non_exhaustive()
    }
}

// === impl Parts ===

impl Parts {
    /// Whether there is nothing to report to (checked when the layer wraps a service).
    fn is_empty(&self) -> bool {
        let mut empty = true;
        #[cfg(feature = "metrics")]
        {
            empty &= self.metrics.is_none();
        }
        #[cfg(feature = "access-log")]
        {
            empty &= self.log.is_none();
        }
        #[cfg(feature = "otlp")]
        {
            empty &= self.otlp.is_none();
        }
        #[cfg(feature = "request-span")]
        {
            empty &= self.span.is_none();
        }
        empty
    }

    /// Whether the span of a request in `trace` is exported.
    #[cfg(feature = "otlp")]
    fn exports(&self, trace: Option<&crate::trace_context::TraceContext>) -> bool {
        self.otlp.is_some() && trace.is_some_and(crate::trace_context::TraceContext::is_sampled)
    }

    #[cfg(all(feature = "access-log", not(feature = "otlp")))]
    const fn exports<T>(&self, _: Option<&T>) -> bool {
        false
    }

    /// Whether requests are logged, and with their `Referer` (the combined format).
    #[cfg(feature = "access-log")]
    fn logs(&self) -> (bool, bool) {
        self.log
            .as_ref()
            .map_or((false, false), |log| (true, log.wants_referer()))
    }

    #[cfg(all(feature = "otlp", not(feature = "access-log")))]
    const fn logs(&self) -> (bool, bool) {
        (false, false)
    }
}

// === impl Observe ===

impl<S, ResB> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: http_body::Body,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(parts) = &self.parts else {
            return ResponseFuture {
                inner: self.inner.call(req),
                exchange: None,
            };
        };
        let start = Instant::now();
        #[cfg(all(
            feature = "trace-context",
            any(feature = "access-log", feature = "otlp", feature = "request-span")
        ))]
        let trace = req
            .extensions()
            .get::<crate::trace_context::TraceContext>()
            .copied();
        #[cfg(all(not(feature = "trace-context"), feature = "access-log"))]
        let trace = None::<Trace>;
        let read = count_request(req.body_mut());
        #[cfg(any(feature = "access-log", feature = "otlp"))]
        let head = {
            let export = parts.exports(trace.as_ref());
            let (logs, referer) = parts.logs();
            (logs || export).then(|| Head::of(&mut req, start, trace, export, referer))
        };
        #[cfg(feature = "metrics")]
        let method = match &parts.metrics {
            Some(metrics) => metrics.arrived(req.method()),
            None => (0, ""),
        };
        #[cfg(feature = "request-span")]
        let span = parts
            .span
            .and_then(|spans| spans.span(&req, trace.as_ref()));
        #[cfg(feature = "request-span")]
        if let Some(span) = &span {
            // Inner layers record into the request's own span (`route`, `upstream`).
            req.extensions_mut().insert(span.clone());
        }
        let exchange = Exchange {
            parts: Arc::clone(parts),
            #[cfg(feature = "request-span")]
            span,
            start,
            read,
            #[cfg(feature = "metrics")]
            method,
            #[cfg(any(feature = "access-log", feature = "otlp"))]
            log: head,
        };
        let inner = {
            #[cfg(feature = "request-span")]
            let _entered = exchange.span.as_ref().map(tracing::Span::enter);
            self.inner.call(req)
        };
        ResponseFuture {
            inner,
            exchange: Some(exchange),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Observe<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observe")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

// === impl Head ===

#[cfg(any(feature = "access-log", feature = "otlp"))]
impl Head {
    /// The head of `req` (with its `Referer` when asked), in the [`LogFields`] the inner
    /// layers fill, which go in its extensions (unless an outer layer's are there).
    fn of<B>(
        req: &mut Request<B>,
        start: Instant,
        trace: Option<Trace>,
        export: bool,
        referer: bool,
    ) -> LogFields {
        #[cfg(not(feature = "access-log"))]
        let _ = referer;
        #[cfg(not(feature = "trace-context"))]
        let _ = trace;
        let outer = req.extensions().get::<LogFields>().cloned();
        let headers = req.headers();
        let extensions = req.extensions();
        let connection = extensions.get::<ConnectInfo>();
        #[cfg(not(feature = "otlp"))]
        let _ = export;
        let head = Self {
            time: wall_clock(start),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            #[cfg(feature = "otlp")]
            tls: connection.is_some_and(|c| c.tls),
            host: headers.get(header::HOST).cloned(),
            user_agent: headers.get(header::USER_AGENT).cloned(),
            #[cfg(feature = "access-log")]
            referer: referer
                .then(|| headers.get(header::REFERER).cloned())
                .flatten(),
            client: extensions
                .get::<ClientIp>()
                .map(ClientIp::ip)
                .or_else(|| connection.map(|c| c.peer.ip())),
            #[cfg(feature = "access-log")]
            request_id: extensions.get::<RequestId>().cloned(),
            #[cfg(feature = "trace-context")]
            trace,
            #[cfg(feature = "otlp")]
            trace_state: if export {
                headers.get(crate::trace_context::TRACESTATE).cloned()
            } else {
                None
            },
            #[cfg(feature = "otlp")]
            export,
            outer,
        };
        let fresh = head.outer.is_none();
        let log = LogFields::with(head);
        if fresh {
            req.extensions_mut().insert(log.clone());
        }
        log
    }

    /// The fields the inner layers wrote: `own`, the fields this head is in, unless an
    /// outer layer's came first.
    fn fields<'a>(&'a self, own: &'a LogFields) -> &'a LogFields {
        self.outer.as_ref().unwrap_or(own)
    }
}

// === impl ResponseFuture ===

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    ResB: http_body::Body,
{
    type Output = Result<Response<ResponseBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let polled = {
            #[cfg(feature = "request-span")]
            let _entered = this
                .exchange
                .as_ref()
                .and_then(|exchange| exchange.span.as_ref())
                .map(tracing::Span::enter);
            ready!(this.inner.poll(cx))
        };
        let res = match polled {
            Ok(res) => res,
            Err(err) => {
                let err = err.into();
                if let Some(exchange) = this.exchange.take() {
                    let kind = Error::kind_of(&*err);
                    Finish::new(exchange, kind.status(), None, Some(kind)).end(0, false);
                }
                return Poll::Ready(Err(err));
            }
        };
        #[cfg(feature = "request-span")]
        let span = this
            .exchange
            .as_mut()
            .and_then(|exchange| exchange.span.take());
        #[cfg(feature = "request-span")]
        if let Some(span) = &span {
            span.record("status", res.status().as_u16());
        }
        #[cfg(not(feature = "request-span"))]
        let span = ();
        let finish = this.exchange.take().map(|exchange| {
            let extensions = res.extensions();
            Finish::new(
                exchange,
                res.status(),
                extensions.get::<RouteId>().cloned(),
                extensions.get::<ErrorKind>().copied(),
            )
        });
        Poll::Ready(Ok(res.map(|inner| ResponseBody {
            // NOTE: asked only when there is something to record.
            empty: finish.is_some() && inner.is_end_stream(),
            inner,
            written: 0,
            finish,
            span,
        })))
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

// === impl ResponseBody ===

impl<B: http_body::Body> http_body::Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        #[cfg(feature = "request-span")]
        let _entered = this.span.as_ref().map(tracing::Span::enter);
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        if this.finish.is_none() {
            return Poll::Ready(polled);
        }
        if let Some(Ok(frame)) = &polled
            && let Some(data) = frame.data_ref()
        {
            *this.written += bytes::Buf::remaining(data) as u64;
        }
        let ended = match &polled {
            None => Some(true),
            Some(Err(_)) => Some(false),
            Some(Ok(_)) => this.inner.is_end_stream().then_some(true),
        };
        if let Some(complete) = ended
            && let Some(finish) = this.finish.take()
        {
            finish.end(*this.written, complete);
        }
        Poll::Ready(polled)
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
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

// === impl Finish ===

impl Finish {
    fn new(
        exchange: Exchange,
        status: StatusCode,
        route: Option<RouteId>,
        error: Option<ErrorKind>,
    ) -> Self {
        #[cfg(feature = "metrics")]
        let series = exchange
            .parts
            .metrics
            .as_ref()
            .map(|metrics| metrics.series(route.as_ref()));
        #[cfg(not(any(feature = "access-log", feature = "otlp")))]
        let _ = (route, error);
        Self {
            exchange,
            status,
            #[cfg(any(feature = "access-log", feature = "otlp"))]
            route,
            #[cfg(any(feature = "access-log", feature = "otlp"))]
            error,
            #[cfg(feature = "metrics")]
            series,
        }
    }

    /// Records the request, whose response body sent `written` bytes and reached its end
    /// (`complete`) or not.
    fn end(mut self, written: u64, complete: bool) {
        #[cfg(not(any(feature = "access-log", feature = "otlp")))]
        let _ = complete;
        let exchange = &mut self.exchange;
        let duration = exchange.start.elapsed();
        let bytes_in = read(exchange.read.as_ref());
        #[cfg(feature = "metrics")]
        if let (Some(metrics), Some(series)) = (&exchange.parts.metrics, &self.series) {
            metrics.record(
                series,
                exchange.method,
                self.status,
                duration,
                bytes_in,
                written,
            );
        }
        #[cfg(any(feature = "access-log", feature = "otlp"))]
        let Some(own) = exchange.log.take() else {
            return;
        };
        #[cfg(any(feature = "access-log", feature = "otlp"))]
        let Some(head) = own.attached::<Head>() else {
            return;
        };
        #[cfg(any(feature = "access-log", feature = "otlp"))]
        let fields = head.fields(&own);
        #[cfg(any(feature = "access-log", feature = "otlp"))]
        let outcome = Outcome {
            status: self.status,
            route: self.route.take(),
            error: self.error,
            bytes_in,
            bytes_out: written,
            duration,
            upstream: fields.upstream(),
            complete,
        };
        #[cfg(feature = "access-log")]
        if let Some(log) = &exchange.parts.log {
            log.line(head, fields, &outcome);
        }
        #[cfg(feature = "otlp")]
        if head.export
            && let Some(exporter) = &exchange.parts.otlp
        {
            exporter.queue(head, &outcome);
        }
    }
}

// === impl Exchange ===

impl Drop for Exchange {
    fn drop(&mut self) {
        // Answered or not (the client went away before the answer), the request leaves.
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.parts.metrics {
            metrics.left();
        }
    }
}

/// Request bodies, counted.
mod request {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context, Poll, ready};

    use bytes::Bytes;
    use gateway_core::{Body, BoxError};
    use http_body::{Frame, SizeHint};
    use pin_project_lite::pin_project;

    pin_project! {
        /// A request body that counts what it reads.
        struct Counted {
            #[pin]
            inner: Body,
            read: Arc<AtomicU64>,
        }
    }

    /// Counts what `body` reads, and returns the count: a body with nothing to read (most
    /// requests) is left as it is, since counting would box it.
    pub(super) fn count_request(body: &mut Body) -> Option<Arc<AtomicU64>> {
        if http_body::Body::is_end_stream(body) {
            return None;
        }
        let read = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            inner: std::mem::take(body),
            read: Arc::clone(&read),
        };
        *body = Body::new(counted);
        Some(read)
    }

    /// What a request body counted so far.
    pub(super) fn read(counter: Option<&Arc<AtomicU64>>) -> u64 {
        counter.map_or(0, |read| read.load(Ordering::Relaxed))
    }

    // === impl Counted ===

    impl http_body::Body for Counted {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            let this = self.project();
            let polled = ready!(this.inner.poll_frame(cx));
            if let Some(Ok(frame)) = &polled
                && let Some(data) = frame.data_ref()
            {
                this.read.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Poll::Ready(polled)
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }
}

#[cfg(all(test, any(feature = "access-log", feature = "otlp")))]
mod tests {
    use super::*;

    /// What a log writer has been given.
    #[cfg(feature = "access-log")]
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    #[cfg(feature = "access-log")]
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[cfg(feature = "access-log")]
    #[tokio::test]
    async fn stacked_logs_both_get_what_the_inner_layers_add() {
        use tower::{ServiceBuilder, ServiceExt, service_fn};

        let (outer, inner) = (Captured::default(), Captured::default());
        let start = |to: &Captured| {
            crate::access_log::AccessLog::builder()
                .writer(to.clone())
                .start()
                .unwrap()
        };
        let (outer_log, inner_log) = (start(&outer), start(&inner));
        let svc = ServiceBuilder::new()
            .layer(ObserveLayer::new().access_log(&outer_log))
            .layer(ObserveLayer::new().access_log(&inner_log))
            .service(service_fn(|req: Request<Body>| async move {
                let fields = req.extensions().get::<LogFields>().unwrap();
                // The outer layer's fields, not ones carrying the inner layer's head.
                assert!(
                    fields
                        .attached::<Head>()
                        .is_some_and(|head| head.outer.is_none())
                );
                fields.insert("cache", "HIT");
                Ok::<_, std::convert::Infallible>(Response::new(Body::from("hello")))
            }));
        let req = Request::builder().uri("/a").body(Body::empty()).unwrap();
        let res = svc.oneshot(req).await.unwrap();
        Body::new(res.into_body()).collect_bytes().await.unwrap();
        for (log, captured) in [(&outer_log, &outer), (&inner_log, &inner)] {
            assert!(log.flush(Duration::from_secs(5)));
            let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
            assert_eq!(line["path"], "/a");
            assert_eq!(line["cache"], "HIT", "{text}");
        }
    }

    #[test]
    fn the_wall_clock_follows_the_monotonic_one_for_a_second() {
        let now = Instant::now();
        let first = wall_clock(now);
        let later = wall_clock(now + Duration::from_millis(10));
        assert_eq!(
            later.duration_since(first).ok(),
            Some(Duration::from_millis(10))
        );
        // Past a second, the system clock is read again (here: it has not moved by two).
        let renewed = wall_clock(now + Duration::from_secs(2));
        let moved = renewed.duration_since(first).unwrap_or_default();
        assert!(moved < Duration::from_secs(1), "{moved:?}");
    }
}
