//! OpenTelemetry export: a `SERVER` span for every sampled request, sent to a collector
//! over OTLP/HTTP (binary protobuf, `POST /v1/traces`) in batches, off the request path.
//!
//! The span is the gateway's own span of the
//! [`TraceContext`](crate::trace_context::TraceContext): its id is the parent id the
//! upstream got in `traceparent`, and its parent is the caller's span (when the caller sent
//! one). So a trace shows the client's span, the gateway's under it, and the upstream's
//! under that. Only requests whose trace is sampled are exported; the others cost a
//! lookup of the extension. The [`TraceContextLayer`] outside decides (its sample ratio
//! for new traces; the caller's flag for continued ones).
//!
//! | span | value |
//! |---|---|
//! | name | `GET api`: the method and the route's name, or the method alone |
//! | kind | `SERVER` |
//! | status | `ERROR` for a 5xx or a response body cut short, unset otherwise |
//! | `http.request.method`, `url.path`, `url.scheme`, `server.address`, `client.address`, `user_agent.original`, `network.protocol.version` | from the request (client-sent text cut to a bound) |
//! | `http.request.body.size` | the request body's size, when it had one |
//! | `http.response.status_code`, `http.response.body.size` | from the response |
//! | `error.type` | the [`ErrorKind`](gateway_core::ErrorKind) name when the gateway made the answer, or the status code of a 5xx |
//! | `gateway.route`, `gateway.upstream.endpoint`, `gateway.upstream.attempts` | the route's name, the endpoint of the last upstream call, the calls made |
//!
//! A span is written in the protobuf wire format when its request ends (its text cut, so
//! at most a few KiB, and nothing of the request kept), then waits in a bounded queue for
//! the exporter task; when the queue is full it is
//! dropped and counted ([`OtlpExporter::dropped`], `gateway_otlp_dropped_spans_total`), and
//! requests never wait. The task sends a batch when it is full or when the oldest span in
//! it has waited [`batch_delay`](OtlpExporterBuilder::batch_delay); a batch the collector
//! refuses with 429, 502, 503 or 504, or that meets a transport error or a timeout, is
//! sent again (up to three tries, `Retry-After` honoured up to 30 s) and then counted as
//! lost. A failing collector is logged once, and once again when it answers again.
//!
//! The collector is reached through any tower `Service` that sends an HTTP request with an
//! absolute URI (the gateway's `gateway_proxy::HttpClient`, with its pooling and TLS).
//!
//! ## Why our own exporter
//!
//! The OpenTelemetry SDK (`opentelemetry_sdk`, `opentelemetry-otlp`,
//! `tracing-opentelemetry`) would build a span tree in the subscriber with ids of its own
//! choosing, while the ids that matter are the ones already in `traceparent`; it would tie
//! export to the `tracing` subscriber's filter; and it brings a second HTTP stack and, for
//! protobuf, `prost`'s derive with a second major version of `itertools` into the tree. One
//! span per request, written from its record straight into the protobuf wire format (the
//! `wire` module, a page of code), is all the gateway needs.
//!
//! ```
//! use gateway_core::{Body, BoxError};
//! use gateway_middleware::otlp::{OtlpExporter, OtlpLayer};
//! use gateway_middleware::trace_context::TraceContextLayer;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // In a gateway: `gateway_proxy::HttpClient::builder().build()?`.
//! let client = service_fn(|_: Request<Body>| async {
//!     Ok::<_, BoxError>(Response::new(Body::empty()))
//! });
//! let exporter = OtlpExporter::builder("http://127.0.0.1:4318/v1/traces".parse()?)
//!     .service_name("edge")
//!     .start(client)?;
//! let svc = ServiceBuilder::new()
//!     .layer(TraceContextLayer::new().sample_ratio(0.1))
//!     .layer(OtlpLayer::new(&exporter))
//!     .service(service_fn(|_: Request<Body>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//!     }));
//! svc.oneshot(Request::new(Body::empty())).await?;
//! exporter.flush(std::time::Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```
//!
//! [`TraceContextLayer`]: crate::trace_context::TraceContextLayer

mod wire;

use std::error::Error as StdError;
use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gateway_core::{Body, BoxError};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::observe::{Head, Observe, ObserveLayer, Outcome};

/// Spans queued for the exporter by default.
const DEFAULT_CAPACITY: usize = 2048;
/// Spans per export request by default.
const DEFAULT_BATCH: usize = 512;
/// How long a span may wait for its batch to fill, by default.
const DEFAULT_DELAY: Duration = Duration::from_secs(5);
/// How long an export request may take, by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of an export request the collector may answer again.
const TRIES: u32 = 3;
/// The longest `Retry-After` honoured, and the longest wait between tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The most bytes of a path written.
const MAX_PATH: usize = 1024;
/// The most bytes of a host, user agent or `tracestate` written.
const MAX_HEADER: usize = 512;
/// The most bytes of a collector's answer read (and then dropped).
const MAX_ANSWER: usize = 64 * 1024;
/// `Span.flags`: the parent's remoteness is known (`CONTEXT_HAS_IS_REMOTE`).
const HAS_IS_REMOTE: u32 = 0x100;
/// `Span.flags`: the parent is remote (`CONTEXT_IS_REMOTE`).
const IS_REMOTE: u32 = 0x200;

/// A handle on the exporter task, shared by every [`OtlpLayer`] made from it. The task
/// ends, after sending what is queued, once every handle is gone. See the
/// [module docs](self).
#[derive(Clone)]
pub struct OtlpExporter {
    shared: Arc<Shared>,
}

/// Builds an [`OtlpExporter`]; from [`OtlpExporter::builder`].
#[must_use]
pub struct OtlpExporterBuilder {
    endpoint: Uri,
    resource: Vec<(String, String)>,
    headers: HeaderMap,
    capacity: usize,
    batch: usize,
    delay: Duration,
    timeout: Duration,
    #[cfg(feature = "metrics")]
    metrics: Option<gateway_core::metrics::Metrics>,
}

/// An exporter that cannot start: what is wrong.
#[derive(Debug)]
pub struct InvalidExporter(&'static str);

/// Exports a span for every sampled request; see the [module docs](self). An
/// [`ObserveLayer`] with OTLP export alone.
#[derive(Clone)]
#[must_use]
pub struct OtlpLayer {
    observe: ObserveLayer,
}

/// The service of [`OtlpLayer`].
pub type OtlpService<S> = Observe<S>;

/// Response future of [`OtlpService`].
pub type ResponseFuture<F> = crate::observe::ResponseFuture<F>;

/// Response body of [`OtlpService`]: ends the span when it ends or is dropped.
pub type ResponseBody<B> = crate::observe::ResponseBody<B>;

/// What every handle shares; its drop (the last handle's) closes the queue.
struct Shared {
    queue: mpsc::Sender<Message>,
    dropped: AtomicU64,
    counts: Arc<Counts>,
    #[cfg(feature = "metrics")]
    dropped_counter: Option<Counter>,
}

/// What the task counts.
#[derive(Default)]
struct Counts {
    exported: AtomicU64,
    lost: AtomicU64,
    #[cfg(feature = "metrics")]
    exported_counter: Option<Counter>,
    #[cfg(feature = "metrics")]
    lost_counter: Option<Counter>,
}

#[cfg(feature = "metrics")]
type Counter = prometheus_client::metrics::counter::Counter;

enum Message {
    /// A finished span: the fields of its `Span` message, written when its request ended
    /// (bounded, and holding nothing of the request).
    Span(Vec<u8>),
    Flush(oneshot::Sender<()>),
}

/// A finished request's span, as it is written.
struct SpanRecord<'a> {
    head: &'a Head,
    outcome: &'a Outcome,
    /// The span's end, in nanoseconds since the Unix epoch.
    end: u64,
}

/// The exporter task.
struct Task<C> {
    client: C,
    queue: mpsc::Receiver<Message>,
    endpoint: Uri,
    headers: HeaderMap,
    resource: Vec<(String, String)>,
    batch: usize,
    delay: Duration,
    timeout: Duration,
    counts: Arc<Counts>,
    failing: bool,
}

/// Why an export request failed.
enum Failure {
    /// Worth another try (after the collector's `Retry-After`, if it sent one).
    Retryable(String, Option<Duration>),
    Final(String),
}

// === impl OtlpExporter ===

impl OtlpExporter {
    /// Starts a builder for a collector's traces endpoint
    /// (`http://collector:4318/v1/traces`).
    pub fn builder(endpoint: Uri) -> OtlpExporterBuilder {
        OtlpExporterBuilder {
            endpoint,
            resource: vec![("service.name".to_owned(), "gateway".to_owned())],
            headers: HeaderMap::new(),
            capacity: DEFAULT_CAPACITY,
            batch: DEFAULT_BATCH,
            delay: DEFAULT_DELAY,
            timeout: DEFAULT_TIMEOUT,
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// Spans dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted so far.
    pub fn exported(&self) -> u64 {
        self.shared.counts.exported.load(Ordering::Relaxed)
    }

    /// Spans lost so far because the collector refused them or could not be reached.
    pub fn lost(&self) -> u64 {
        self.shared.counts.lost.load(Ordering::Relaxed)
    }

    /// Sends the spans queued so far, waiting at most `timeout` for the task to have sent
    /// them (or given up on them). For a clean exit.
    pub async fn flush(&self, timeout: Duration) {
        let (done, sent) = oneshot::channel();
        let flushed = async {
            if self.shared.queue.send(Message::Flush(done)).await.is_ok() {
                let _ = sent.await;
            }
        };
        if tokio::time::timeout(timeout, flushed).await.is_err() {
            tracing::warn!(
                ?timeout,
                "spans are still waiting for the OTLP collector; not waiting longer"
            );
        }
    }

    /// Queues the span of a finished request, or drops and counts it. The span is written
    /// now, so that a queued span holds its few bounded KiB rather than the request's head
    /// (which a client may have made 64 KiB).
    pub(crate) fn queue(&self, head: &Head, outcome: &Outcome) {
        let Ok(permit) = self.shared.queue.try_reserve() else {
            self.drop_one();
            return;
        };
        let end = unix_nanos(head.time).saturating_add(nanos(outcome.duration));
        let mut span = Vec::with_capacity(512);
        SpanRecord { head, outcome, end }.encode(&mut span);
        permit.send(Message::Span(span));
    }

    /// Counts a span dropped on a full queue.
    fn drop_one(&self) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(counter) = &self.shared.dropped_counter {
            counter.inc();
        }
    }
}

impl fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("dropped", &self.dropped())
            .field("exported", &self.exported())
            .field("lost", &self.lost())
            .finish()
    }
}

// === impl OtlpExporterBuilder ===

impl OtlpExporterBuilder {
    /// The `service.name` of the spans' resource [default: `gateway`].
    pub fn service_name(self, name: impl Into<String>) -> Self {
        self.resource_attribute("service.name", name)
    }

    /// A string attribute of the spans' resource (`deployment.environment.name`,
    /// `service.instance.id`...); a key given again replaces the earlier value.
    pub fn resource_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.resource.retain(|(k, _)| *k != key);
        self.resource.push((key, value.into()));
        self
    }

    /// A header sent with every export request (a backend's API key, say).
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// How many finished spans may wait for the exporter (at least 1); more are dropped
    /// [default: 2048]. A span is at most a few KiB (long fields are cut), so this bounds
    /// the queue's memory.
    pub fn capacity(mut self, spans: usize) -> Self {
        self.capacity = spans.max(1);
        self
    }

    /// The most spans in one export request (at least 1) [default: 512].
    pub fn batch_size(mut self, spans: usize) -> Self {
        self.batch = spans.max(1);
        self
    }

    /// How long a span may wait for its batch to fill before the batch is sent anyway
    /// [default: 5 s].
    pub const fn batch_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// How long one export request (and reading its answer) may take [default: 10 s].
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Counts exported, dropped and lost spans in `metrics`
    /// (`gateway_otlp_exported_spans_total`, `gateway_otlp_dropped_spans_total`,
    /// `gateway_otlp_lost_spans_total`).
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, metrics: &gateway_core::metrics::Metrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Starts the exporter task on the current tokio runtime, sending through `client`.
    ///
    /// # Errors
    ///
    /// The endpoint is not an absolute `http` or `https` URI, or there is no tokio runtime.
    pub fn start<C, B>(self, client: C) -> Result<OtlpExporter, InvalidExporter>
    where
        C: Service<Request<Body>, Response = Response<B>> + Send + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
    {
        let scheme = self.endpoint.scheme_str();
        if !matches!(scheme, Some("http" | "https")) || self.endpoint.authority().is_none() {
            return Err(InvalidExporter(
                "the OTLP endpoint must be an absolute http:// or https:// URI",
            ));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| InvalidExporter("the OTLP exporter needs a tokio runtime to start"))?;
        #[cfg(feature = "metrics")]
        let counter = |name, help| {
            self.metrics
                .as_ref()
                .map(|metrics| metrics.metric(name, help, Counter::default))
        };
        let counts = Arc::new(Counts {
            #[cfg(feature = "metrics")]
            exported_counter: counter("otlp_exported_spans", "Spans the OTLP collector accepted."),
            #[cfg(feature = "metrics")]
            lost_counter: counter(
                "otlp_lost_spans",
                "Spans lost because the OTLP collector refused them or could not be reached.",
            ),
            ..Counts::default()
        });
        let (queue, receiver) = mpsc::channel(self.capacity);
        let task = Task {
            client,
            queue: receiver,
            endpoint: self.endpoint,
            headers: self.headers,
            resource: self.resource,
            batch: self.batch,
            delay: self.delay,
            timeout: self.timeout,
            counts: Arc::clone(&counts),
            failing: false,
        };
        runtime.spawn(task.run());
        Ok(OtlpExporter {
            shared: Arc::new(Shared {
                queue,
                dropped: AtomicU64::new(0),
                counts,
                #[cfg(feature = "metrics")]
                dropped_counter: counter(
                    "otlp_dropped_spans",
                    "Spans dropped because the OTLP exporter's queue was full.",
                ),
            }),
        })
    }
}

impl fmt::Debug for OtlpExporterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpExporterBuilder")
            .field("endpoint", &self.endpoint)
            .field("resource", &self.resource)
            .field("capacity", &self.capacity)
            .field("batch", &self.batch)
            .field("delay", &self.delay)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// === impl InvalidExporter ===

impl fmt::Display for InvalidExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl StdError for InvalidExporter {}

// === impl OtlpLayer ===

impl OtlpLayer {
    /// Exports the sampled requests' spans through `exporter`.
    pub fn new(exporter: &OtlpExporter) -> Self {
        Self {
            observe: ObserveLayer::new().otlp(exporter),
        }
    }
}

impl fmt::Debug for OtlpLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for OtlpLayer {
    type Service = OtlpService<S>;

    fn layer(&self, inner: S) -> OtlpService<S> {
        self.observe.layer(inner)
    }
}

// === impl SpanRecord ===

impl SpanRecord<'_> {
    /// Writes the span as an OTLP `Span` message's fields.
    fn encode(&self, out: &mut Vec<u8>) {
        let (p, o) = (self.head, self.outcome);
        // NOTE: a span is exported only for a request with a (sampled) trace.
        let Some(trace) = &p.trace else {
            return;
        };
        wire::bytes(out, 1, &trace.trace_id_bytes());
        wire::bytes(out, 2, &trace.span_id_bytes());
        if let Some(state) = &p.trace_state {
            wire::bytes(out, 3, cut(state.as_bytes(), MAX_HEADER).as_bytes());
        }
        if let Some(parent) = trace.caller_span_id_bytes() {
            wire::bytes(out, 4, &parent);
        }
        // The name, `GET api` (a string is written as a message is: its bytes after their
        // length).
        wire::message(out, 5, |out| {
            out.extend_from_slice(p.method.as_str().as_bytes());
            if let Some(route) = &o.route {
                out.push(b' ');
                out.extend_from_slice(route.as_str().as_bytes());
            }
        });
        wire::uint(out, 6, 2); // SPAN_KIND_SERVER
        wire::fixed64(out, 7, unix_nanos(p.time));
        wire::fixed64(out, 8, self.end);
        self.attributes(out);
        let failed = o.status.is_server_error() || !o.complete;
        if failed {
            wire::message(out, 15, |out| {
                if !o.complete && !o.status.is_server_error() {
                    wire::bytes(out, 2, b"the response ended before its body was sent");
                }
                wire::uint(out, 3, 2); // STATUS_CODE_ERROR
            });
        }
        let remote = if trace.is_continued() { IS_REMOTE } else { 0 };
        wire::fixed32(out, 16, u32::from(trace.flags()) | HAS_IS_REMOTE | remote);
    }

    fn attributes(&self, out: &mut Vec<u8>) {
        let (p, o) = (self.head, self.outcome);
        string_attribute(out, "http.request.method", p.method.as_str());
        string_attribute(out, "url.path", &cut(p.uri.path().as_bytes(), MAX_PATH));
        let scheme = p
            .uri
            .scheme_str()
            .unwrap_or(if p.tls { "https" } else { "http" });
        string_attribute(out, "url.scheme", scheme);
        let host = p
            .uri
            .host()
            .map(str::as_bytes)
            .or_else(|| p.host.as_ref().map(|h| host_of(h.as_bytes())));
        if let Some(host) = host {
            string_attribute(out, "server.address", &cut(host, MAX_HEADER));
        }
        if let Some(client) = p.client {
            string_attribute(out, "client.address", &client.to_string());
        }
        if let Some(agent) = &p.user_agent {
            string_attribute(
                out,
                "user_agent.original",
                &cut(agent.as_bytes(), MAX_HEADER),
            );
        }
        let version = match p.version {
            Version::HTTP_09 => "0.9",
            Version::HTTP_10 => "1.0",
            Version::HTTP_2 => "2",
            Version::HTTP_3 => "3",
            _ => "1.1",
        };
        string_attribute(out, "network.protocol.version", version);
        int_attribute(
            out,
            "http.response.status_code",
            u64::from(o.status.as_u16()),
        );
        if o.bytes_in > 0 {
            int_attribute(out, "http.request.body.size", o.bytes_in);
        }
        int_attribute(out, "http.response.body.size", o.bytes_out);
        if let Some(kind) = o.error {
            string_attribute(out, "error.type", kind.name());
        } else if o.status.is_server_error() {
            string_attribute(out, "error.type", o.status.as_str());
        }
        if let Some(route) = &o.route {
            string_attribute(out, "gateway.route", route.as_str());
        }
        if let Some(upstream) = &o.upstream {
            string_attribute(out, "gateway.upstream.endpoint", upstream.endpoint.as_str());
            int_attribute(
                out,
                "gateway.upstream.attempts",
                u64::from(upstream.attempts),
            );
        }
    }
}

/// A `KeyValue` with a string value, as a `Span.attributes` (or `Resource.attributes`)
/// entry.
fn string_attribute(out: &mut Vec<u8>, key: &str, value: &str) {
    wire::message(out, 9, |out| {
        wire::bytes(out, 1, key.as_bytes());
        wire::message(out, 2, |out| wire::bytes(out, 1, value.as_bytes()));
    });
}

/// A `KeyValue` with an integer value, as a `Span.attributes` entry.
fn int_attribute(out: &mut Vec<u8>, key: &str, value: u64) {
    wire::message(out, 9, |out| {
        wire::bytes(out, 1, key.as_bytes());
        wire::message(out, 2, |out| wire::uint(out, 3, value));
    });
}

/// At most `max` bytes of `text` as UTF-8: invalid sequences replaced, cut at a character
/// boundary.
fn cut(text: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&text[..text.len().min(max)]);
    let mut text = text.into_owned();
    while text.len() > max {
        text.pop();
    }
    text
}

/// The host of a `Host` header's value, without its port.
fn host_of(value: &[u8]) -> &[u8] {
    if value.first() == Some(&b'[') {
        return value
            .iter()
            .position(|&b| b == b']')
            .map_or(value, |end| &value[..=end]);
    }
    value
        .iter()
        .position(|&b| b == b':')
        .map_or(value, |colon| &value[..colon])
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, nanos)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

// === impl Task ===

impl<C, B> Task<C>
where
    C: Service<Request<Body>, Response = Response<B>>,
    C::Error: Into<BoxError>,
    B: http_body::Body,
{
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.batch.min(DEFAULT_BATCH));
        let mut flushed = Vec::new();
        let mut closed = false;
        while !closed {
            match self.queue.recv().await {
                Some(Message::Span(span)) => batch.push(span),
                Some(Message::Flush(done)) => {
                    let _ = done.send(());
                    continue;
                }
                None => break,
            }
            let deadline = Instant::now() + self.delay;
            while batch.len() < self.batch {
                match tokio::time::timeout_at(deadline, self.queue.recv()).await {
                    Ok(Some(Message::Span(span))) => batch.push(span),
                    Ok(Some(Message::Flush(done))) => {
                        flushed.push(done);
                        break;
                    }
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.export(&batch).await;
            batch.clear();
            for done in flushed.drain(..) {
                let _ = done.send(());
            }
        }
    }

    /// Sends `batch`, trying again as the collector allows, and counts the outcome.
    async fn export(&mut self, batch: &[Vec<u8>]) {
        let body = Bytes::from(self.encode(batch));
        let spans = batch.len() as u64;
        let mut tries = 0;
        let failure = loop {
            tries += 1;
            let failure = match self.send(body.clone()).await {
                Ok(()) => {
                    self.counts.exported.fetch_add(spans, Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    if let Some(counter) = &self.counts.exported_counter {
                        counter.inc_by(spans);
                    }
                    if self.failing {
                        self.failing = false;
                        tracing::info!(endpoint = %self.endpoint, "the OTLP collector takes spans again");
                    }
                    return;
                }
                Err(failure) => failure,
            };
            match failure {
                Failure::Retryable(_, after) if tries < TRIES => {
                    let backoff = Duration::from_millis(500) * 2u32.pow(tries - 1);
                    tokio::time::sleep(after.unwrap_or(backoff).min(MAX_BACKOFF)).await;
                }
                Failure::Retryable(why, _) | Failure::Final(why) => break why,
            }
        };
        self.counts.lost.fetch_add(spans, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(counter) = &self.counts.lost_counter {
            counter.inc_by(spans);
        }
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                endpoint = %self.endpoint,
                error = %failure,
                "cannot export spans to the OTLP collector; spans are lost until it takes them"
            );
        }
    }

    /// An `ExportTraceServiceRequest` of `batch`.
    fn encode(&self, batch: &[Vec<u8>]) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(256 + batch.iter().map(|span| span.len() + 3).sum::<usize>());
        // resource_spans
        wire::message(&mut out, 1, |out| {
            // resource
            wire::message(out, 1, |out| {
                for (key, value) in &self.resource {
                    wire::message(out, 1, |out| {
                        wire::bytes(out, 1, key.as_bytes());
                        wire::message(out, 2, |out| wire::bytes(out, 1, value.as_bytes()));
                    });
                }
            });
            // scope_spans
            wire::message(out, 2, |out| {
                wire::message(out, 1, |out| {
                    wire::bytes(out, 1, b"gateway");
                    wire::bytes(out, 2, env!("CARGO_PKG_VERSION").as_bytes());
                });
                for span in batch {
                    wire::message(out, 2, |out| out.extend_from_slice(span));
                }
            });
        });
        out
    }

    /// One export request.
    async fn send(&mut self, body: Bytes) -> Result<(), Failure> {
        let mut req = Request::post(self.endpoint.clone())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Body::full(body))
            .map_err(|err| Failure::Final(err.to_string()))?;
        req.headers_mut().extend(self.headers.clone());
        let exchange = async {
            poll_fn(|cx| self.client.poll_ready(cx))
                .await
                .map_err(|err| Failure::Retryable(chain(&*err.into()), None))?;
            let res = self
                .client
                .call(req)
                .await
                .map_err(|err| Failure::Retryable(chain(&*err.into()), None))?;
            let status = res.status();
            let retry_after = res
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            drain(res.into_body()).await;
            if status.is_success() {
                Ok(())
            } else if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
                Err(Failure::Retryable(
                    format!("the collector answered {status}"),
                    retry_after,
                ))
            } else {
                Err(Failure::Final(format!("the collector answered {status}")))
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::Retryable(
                    format!("no answer within {:?}", self.timeout),
                    None,
                ))
            })
    }
}

/// Reads and drops at most [`MAX_ANSWER`] bytes of an answer, so that its connection can
/// be used again.
async fn drain<B: http_body::Body>(body: B) {
    let mut body = std::pin::pin!(body);
    let mut read = 0;
    while read < MAX_ANSWER {
        match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += bytes::Buf::remaining(data);
                }
            }
            Some(Err(_)) | None => return,
        }
    }
}

/// An error and its sources, `: `-separated.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable(why, _) | Self::Final(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary() {
        assert_eq!(cut("héllo".as_bytes(), 2), "h");
        assert_eq!(cut(b"abc", 10), "abc");
        assert_eq!(cut(&[b'a', 0xff, b'b'], 10), "a\u{fffd}b");
        assert!(cut(&[0xff; 100], 10).len() <= 10);
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_of(b"example.com:8080"), b"example.com");
        assert_eq!(host_of(b"example.com"), b"example.com");
        assert_eq!(host_of(b"[::1]:80"), b"[::1]");
    }
}
