//! One access-log line per request, written off the request path.
//!
//! [`AccessLogLayer`] formats a line when a response has been sent to its end (or the
//! client went away) and hands it to the [`AccessLog`]'s writer thread through a bounded
//! queue (the writer takes what gathered every 10 ms, so a line costs no wake-up of it).
//! A request never waits for the log: when the queue is full (the disk or the pipe
//! behind it cannot keep up) the line is dropped and counted ([`AccessLog::dropped`], and
//! `gateway_access_log_dropped_lines_total` with [`AccessLogBuilder::metrics`]).
//!
//! A JSON line has these fields (see `docs/observability.md`); a field without a value is
//! left out:
//!
//! | field | value |
//! |---|---|
//! | `time` | the request's arrival, RFC 3339 in UTC with milliseconds |
//! | `client_ip` | the [`ClientIp`](gateway_core::ClientIp) (or the connection's peer) |
//! | `method`, `host`, `path` | from the request (the path as the client sent it) |
//! | `query` | only with [`QueryLog::Redact`] (names kept, values `REDACTED`) or [`QueryLog::Keep`] |
//! | `status` | the response status |
//! | `bytes_in`, `bytes_out` | request and response body bytes |
//! | `duration_ms` | arrival to the end of the response body |
//! | `route` | the [`RouteId`](gateway_core::RouteId) |
//! | `upstream`, `upstream_ms`, `upstream_attempts` | the endpoint the request ended on, its time to the response head, how many calls were made |
//! | `user_agent` | the `User-Agent` |
//! | `error` | the [`ErrorKind`](gateway_core::ErrorKind) name when the gateway made the answer (`gateway_timeout`) |
//! | `aborted` | `true` when the response did not reach its end (the client went away) |
//! | `trace_id` | the [`TraceContext`](crate::trace_context::TraceContext) set outside (feature `trace-context`) |
//! | `request_id`, `trace_id`, ... | what inner layers put in the request's [`LogFields`](gateway_core::LogFields) (a request id or a trace set inside) |
//!
//! Strings are escaped, bytes that are not UTF-8 replaced, and the path, host, user agent
//! and referer cut to a bounded length, so a line stays valid and bounded whatever a client
//! sends. [`LogFormat::Combined`] writes the Apache/nginx combined format instead.
//!
//! # Example
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::access_log::{AccessLog, AccessLogLayer};
//! use http::{Request, Response};
//! use std::sync::{Arc, Mutex};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[derive(Clone, Default)] struct Shared(Arc<Mutex<Vec<u8>>>);
//! # impl std::io::Write for Shared {
//! #     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> { self.0.lock().unwrap().write(b) }
//! #     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! # }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! # let out = Shared::default();
//! // `AccessLog::builder().file("/var/log/gateway/access.log")` or `.stdout()` (the default)
//! let log = AccessLog::builder().writer(out.clone()).start()?;
//! let svc = ServiceBuilder::new()
//!     .layer(AccessLogLayer::new(&log))
//!     .service(service_fn(|_: Request<Body>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::from("hello")))
//!     }));
//! let req = Request::get("/hello?token=secret").body(Body::empty()).unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! Body::new(res.into_body()).collect_bytes().await.unwrap();
//!
//! log.flush(std::time::Duration::from_secs(5));
//! let line = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
//! assert!(line.contains(r#""method":"GET","path":"/hello","status":200"#));
//! assert!(!line.contains("secret"), "the query is left out by default");
//! # Ok(())
//! # }
//! ```
//!
//! # Ordering
//!
//! At the edge, inside [`SetClientIpLayer`](gateway_core::SetClientIpLayer) (it reads the
//! client's address) and outside the router and everything that can refuse a request, so
//! that every answer is logged. Layers inside add their fields through [`LogFields`](gateway_core::LogFields).
//!
//! # Log rotation
//!
//! [`AccessLog::reopen`] makes the writer reopen its file (after logrotate moved it away);
//! the example gateway calls it on `SIGUSR1`.

use std::cell::RefCell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_core::{LogFields, LogValue};
use http::{HeaderValue, Version};
use tower::Layer;

use crate::observe::{Head, Observe, ObserveLayer, Outcome};

/// Lines queued for the writer by default.
const DEFAULT_CAPACITY: usize = 4096;
/// The most bytes of a path (or path and query) written.
const MAX_PATH: usize = 2048;
/// The most bytes of a host, user agent or referer written.
const MAX_HEADER: usize = 512;
/// The capacity the two batch buffers (the one lines go into and the one being written)
/// start with.
const BATCH: usize = 64 * 1024;
/// The most capacity a batch buffer keeps between batches. A busy gateway's batch (70,000
/// lines/s of 300 bytes fill 210 KiB per [`REST`]) keeps its room, rather than growing
/// again under the queue's lock, on the request path, every 10 ms; a burst's is given back.
const KEEP: usize = 1024 * 1024;
/// After a batch the writer rests this long, so that lines gather into the next batch
/// without a wake-up of the thread for each of them (a wake-up would cost the request a
/// system call). The queue must hold this long's lines.
const REST: Duration = Duration::from_millis(10);

/// Where lines go and how they look: a handle on the writer thread, shared by every
/// [`AccessLogLayer`] made from it. See the [module docs](self).
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

/// Builds an [`AccessLog`]; from [`AccessLog::builder`].
#[must_use]
pub struct AccessLogBuilder {
    target: Target,
    format: LogFormat,
    query: QueryLog,
    capacity: usize,
    #[cfg(feature = "metrics")]
    metrics: Option<gateway_core::metrics::Metrics>,
}

/// The line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogFormat {
    /// One JSON object per line (the default).
    #[default]
    Json,
    /// The combined log format of Apache and nginx, for tools that read nothing else.
    Combined,
}

/// What is written of a request's query string, which often carries tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueryLog {
    /// Left out (the default).
    #[default]
    Omit,
    /// Parameter names kept, values replaced by `REDACTED`.
    Redact,
    /// Written as the client sent it.
    Keep,
}

/// Logs every request to an [`AccessLog`]; see the [module docs](self). An
/// [`ObserveLayer`] with the access log alone.
#[derive(Clone)]
#[must_use]
pub struct AccessLogLayer {
    observe: ObserveLayer,
}

/// The service of [`AccessLogLayer`].
pub type AccessLogService<S> = Observe<S>;

/// Response future of [`AccessLogService`].
pub type ResponseFuture<F> = crate::observe::ResponseFuture<F>;

/// Response body of [`AccessLogService`]: logs the request when it ends or is dropped.
pub type ResponseBody<B> = crate::observe::ResponseBody<B>;

enum Target {
    Stdout,
    Stderr,
    File(PathBuf),
    Writer(Box<dyn Write + Send>),
}

/// What every handle shares; its drop (the last handle's) closes the queue.
struct Shared {
    queue: Arc<Queue>,
    writer: std::thread::Thread,
    format: LogFormat,
    query: QueryLog,
    dropped: AtomicU64,
    #[cfg(feature = "metrics")]
    dropped_counter: Option<Counter>,
}

/// The lines waiting for the writer: one buffer the requests append to, swapped for the
/// writer's empty one every [`REST`] (no allocation per line, none freed across threads).
struct Queue {
    state: Mutex<Queued>,
    /// Signalled when a batch has been written (for `flush`).
    written: Condvar,
    /// The most lines waiting.
    capacity: usize,
    reopen: AtomicBool,
    lost: AtomicU64,
    #[cfg(feature = "metrics")]
    lost_counter: Option<Counter>,
}

#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    lines: u64,
    /// Batches taken by the writer, and written (or failed).
    taken: u64,
    done: u64,
    /// Every handle is gone: the writer writes what is left and ends.
    closed: bool,
}

#[cfg(feature = "metrics")]
type Counter = prometheus_client::metrics::counter::Counter;

// === impl AccessLog ===

impl AccessLog {
    /// Starts a log to stdout, in JSON, without queries, with room for 4,096 queued lines.
    pub fn builder() -> AccessLogBuilder {
        AccessLogBuilder {
            target: Target::Stdout,
            format: LogFormat::Json,
            query: QueryLog::Omit,
            capacity: DEFAULT_CAPACITY,
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Lines lost so far because writing them failed.
    pub fn lost(&self) -> u64 {
        self.shared.queue.lost.load(Ordering::Relaxed)
    }

    /// Makes the writer reopen its file (after a log rotation moved it): the lines not yet
    /// written go to the new one. A log to stdout, stderr or a writer ignores it.
    pub fn reopen(&self) {
        self.shared.queue.reopen.store(true, Ordering::Release);
        self.shared.writer.unpark();
    }

    /// Waits, up to `timeout`, until every line queued so far is written (for a shutdown).
    /// Returns whether they were. Blocks the thread: call it outside the runtime's workers,
    /// or when nothing else is left to run.
    #[expect(
        clippy::disallowed_types,
        reason = "a blocking wait on the writer thread, in real time, outside any runtime"
    )]
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let queue = &self.shared.queue;
        let mut state = queue.lock();
        // The next batch the writer takes has every line queued so far.
        let target = state.taken + 1;
        self.shared.writer.unpark();
        while state.done < target {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            state = queue
                .written
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Queues `line` (one whole line, newline included), or drops and counts it.
    fn push(&self, line: &[u8]) {
        let queued = {
            let mut state = self.shared.queue.lock();
            let room = state.lines < self.shared.queue.capacity as u64;
            if room {
                state.bytes.extend_from_slice(line);
                state.lines += 1;
            }
            room
        };
        if !queued {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            if let Some(counter) = &self.shared.dropped_counter {
                counter.inc();
            }
        }
    }
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.shared.format)
            .field("query", &self.shared.query)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

// === impl AccessLogBuilder ===

impl AccessLogBuilder {
    /// Lines go to stdout (the default).
    pub fn stdout(mut self) -> Self {
        self.target = Target::Stdout;
        self
    }

    /// Lines go to stderr.
    pub fn stderr(mut self) -> Self {
        self.target = Target::Stderr;
        self
    }

    /// Lines are appended to `path` (created when missing), reopened on
    /// [`AccessLog::reopen`].
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.target = Target::File(path.into());
        self
    }

    /// Lines go to `writer` (a pipe, a socket, a test's buffer).
    pub fn writer(mut self, writer: impl Write + Send + 'static) -> Self {
        self.target = Target::Writer(Box::new(writer));
        self
    }

    /// The line format (JSON by default).
    pub const fn format(mut self, format: LogFormat) -> Self {
        self.format = format;
        self
    }

    /// What is written of query strings (nothing by default).
    pub const fn query(mut self, query: QueryLog) -> Self {
        self.query = query;
        self
    }

    /// How many lines may wait for the writer (at least 1); more are dropped. A line is
    /// at most a few KiB (long fields are cut), so this bounds the queue's memory.
    pub fn capacity(mut self, lines: usize) -> Self {
        self.capacity = lines.max(1);
        self
    }

    /// Counts dropped and lost lines in `metrics`
    /// (`gateway_access_log_dropped_lines_total`, `gateway_access_log_lost_lines_total`).
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, metrics: &gateway_core::metrics::Metrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Opens the file (when there is one) and starts the writer thread.
    ///
    /// # Errors
    ///
    /// The file cannot be opened for appending, or the thread cannot be started.
    pub fn start(self) -> io::Result<AccessLog> {
        let sink = match self.target {
            Target::Stdout => Sink::Stdout,
            Target::Stderr => Sink::Stderr,
            Target::File(path) => Sink::File(open(&path)?, path),
            Target::Writer(writer) => Sink::Writer(writer),
        };
        #[cfg(feature = "metrics")]
        let (dropped_counter, lost_counter) = match &self.metrics {
            Some(metrics) => (
                Some(metrics.metric(
                    "access_log_dropped_lines",
                    "Access-log lines dropped because the writer's queue was full.",
                    Counter::default,
                )),
                Some(metrics.metric(
                    "access_log_lost_lines",
                    "Access-log lines lost because writing them failed.",
                    Counter::default,
                )),
            ),
            None => (None, None),
        };
        let queue = Arc::new(Queue {
            state: Mutex::new(Queued::default()),
            written: Condvar::new(),
            capacity: self.capacity,
            reopen: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            lost_counter,
        });
        let writer = Writer {
            queue: Arc::clone(&queue),
            sink,
            failing: false,
        };
        // NOTE: the thread ends once every handle is gone (`Shared`'s drop closes the
        // queue), after writing what is left.
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        let shared = Arc::new(Shared {
            queue,
            writer: thread.thread().clone(),
            format: self.format,
            query: self.query,
            dropped: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            dropped_counter,
        });
        Ok(AccessLog { shared })
    }
}

impl fmt::Debug for AccessLogBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogBuilder")
            .field("format", &self.format)
            .field("query", &self.query)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

// === the writer thread ===

enum Sink {
    Stdout,
    Stderr,
    File(File, PathBuf),
    Writer(Box<dyn Write + Send>),
}

struct Writer {
    queue: Arc<Queue>,
    sink: Sink,
    /// Whether the last write failed (a failure is logged when it starts, not per line).
    failing: bool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.writer.unpark();
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Writer {
    /// Takes and writes what gathered, every [`REST`] (or at once when woken by `flush` or
    /// `reopen`), until every [`AccessLog`] handle is gone and the queue is empty.
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            // A reopen asked for before this batch was taken applies to it.
            self.maybe_reopen();
            let (lines, taken, closed) = {
                let mut state = self.queue.lock();
                std::mem::swap(&mut state.bytes, &mut batch);
                state.taken += 1;
                (std::mem::take(&mut state.lines), state.taken, state.closed)
            };
            self.write(&batch, lines);
            batch.clear();
            if batch.capacity() > KEEP {
                batch.shrink_to(BATCH);
            }
            self.queue.lock().done = taken;
            self.queue.written.notify_all();
            if closed {
                return;
            }
            std::thread::park_timeout(REST);
        }
    }

    fn write(&mut self, batch: &[u8], lines: u64) {
        if batch.is_empty() {
            return;
        }
        let result = match &mut self.sink {
            Sink::Stdout => io::stdout().lock().write_all(batch),
            Sink::Stderr => io::stderr().lock().write_all(batch),
            Sink::File(file, _) => file.write_all(batch),
            Sink::Writer(writer) => writer.write_all(batch).and_then(|()| writer.flush()),
        };
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("access log written again");
            }
            Ok(()) => {}
            Err(err) => {
                self.queue.lost.fetch_add(lines, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                if let Some(counter) = &self.queue.lost_counter {
                    counter.inc_by(lines);
                }
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(error = %err, "cannot write the access log; lines are lost until it can");
                }
            }
        }
    }

    fn maybe_reopen(&mut self) {
        if !self.queue.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Sink::File(file, path) = &mut self.sink {
            match open(path) {
                Ok(new) => {
                    *file = new;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot reopen the access log; writing on to the old file");
                }
            }
        }
    }
}

// === impl AccessLogLayer ===

impl AccessLogLayer {
    /// Logs to `log`.
    pub fn new(log: &AccessLog) -> Self {
        Self {
            observe: ObserveLayer::new().access_log(log),
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogService<S>;

    fn layer(&self, inner: S) -> AccessLogService<S> {
        self.observe.layer(inner)
    }
}

impl fmt::Debug for AccessLogLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogLayer").finish_non_exhaustive()
    }
}

// === formatting ===

impl AccessLog {
    /// Whether lines show the `Referer` (the combined format), which is then kept.
    pub(crate) fn wants_referer(&self) -> bool {
        self.shared.format == LogFormat::Combined
    }

    /// Formats and queues the line of a request, with the `fields` inner layers added.
    pub(crate) fn line(&self, head: &Head, fields: &LogFields, outcome: &Outcome) {
        thread_local! {
            // A line is formatted here, then copied into the queue: no allocation per line.
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
        }
        LINE.with_borrow_mut(|out| {
            out.clear();
            match self.shared.format {
                LogFormat::Json => json(out, head, fields, outcome, self.shared.query),
                LogFormat::Combined => combined(out, head, fields, outcome, self.shared.query),
            }
            out.push(b'\n');
            self.push(out);
            // NOTE: every field is cut to a bound, so a line is a few KiB at most; this
            // only undoes an unusually long one.
            out.shrink_to(4096);
        });
    }
}

/// Whether `bytes` go into a JSON string as they are: printable ASCII, no quote, no
/// backslash. Eight bytes at a time (a line's strings are most of its bytes).
fn is_plain(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    /// Whether a byte of `w` is below `n` (at most 0x80; bytes from 0x80 up never count).
    const fn below(w: u64, n: u8) -> bool {
        w.wrapping_sub(ONES * n as u64) & !w & HIGH != 0
    }
    /// Whether a byte of `w` is `b` (`w ^ b` has a zero byte).
    const fn has(w: u64, b: u8) -> bool {
        below(w ^ (ONES * b as u64), 1)
    }
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_ne_bytes(word);
        if w & HIGH != 0 || below(w, 0x20) || has(w, 0x7f) || has(w, b'"') || has(w, b'\\') {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if is_plain(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // NOTE: writing a `str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Appends `bytes`, cut to `max` bytes and with what is not UTF-8 replaced, as a JSON string.
fn json_bytes(out: &mut Vec<u8>, bytes: &[u8], max: usize) {
    let bytes = &bytes[..bytes.len().min(max)];
    if is_plain(bytes) {
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
    } else {
        json_str(out, &String::from_utf8_lossy(bytes));
    }
}

/// Appends `n` in decimal.
fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn json(out: &mut Vec<u8>, p: &Head, fields: &LogFields, line: &Outcome, query: QueryLog) {
    out.extend_from_slice(b"{\"time\":\"");
    rfc3339(out, p.time);
    out.push(b'"');
    if let Some(id) = &p.request_id {
        out.extend_from_slice(b",\"request_id\":");
        json_bytes(out, id.header_value().as_bytes(), MAX_HEADER);
    }
    if let Some(ip) = p.client {
        out.extend_from_slice(b",\"client_ip\":\"");
        ip_addr(out, ip);
        out.push(b'"');
    }
    out.extend_from_slice(b",\"method\":");
    json_bytes(out, p.method.as_str().as_bytes(), MAX_HEADER);
    if let Some(host) = p
        .uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or(p.host.as_ref().map(HeaderValue::as_bytes))
    {
        out.extend_from_slice(b",\"host\":");
        json_bytes(out, host, MAX_HEADER);
    }
    out.extend_from_slice(b",\"path\":");
    json_bytes(out, p.uri.path().as_bytes(), MAX_PATH);
    if let Some(q) = p.uri.query() {
        match query {
            QueryLog::Omit => {}
            QueryLog::Redact => {
                out.extend_from_slice(b",\"query\":");
                json_str(out, &redact(q));
            }
            QueryLog::Keep => {
                out.extend_from_slice(b",\"query\":");
                json_bytes(out, q.as_bytes(), MAX_PATH);
            }
        }
    }
    out.extend_from_slice(b",\"status\":");
    int(out, line.status.as_u16());
    out.extend_from_slice(b",\"bytes_in\":");
    int(out, line.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    int(out, line.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    millis(out, line.duration);
    if let Some(route) = &line.route {
        out.extend_from_slice(b",\"route\":");
        json_str(out, route.as_str());
    }
    if let Some(call) = &line.upstream {
        out.extend_from_slice(b",\"upstream\":");
        json_str(out, call.endpoint.as_str());
        out.extend_from_slice(b",\"upstream_ms\":");
        millis(out, call.duration);
        out.extend_from_slice(b",\"upstream_attempts\":");
        int(out, call.attempts);
    }
    if let Some(ua) = &p.user_agent {
        out.extend_from_slice(b",\"user_agent\":");
        json_bytes(out, ua.as_bytes(), MAX_HEADER);
    }
    if let Some(kind) = line.error {
        out.extend_from_slice(b",\"error\":\"");
        out.extend_from_slice(kind.name().as_bytes());
        out.push(b'"');
    }
    if !line.complete {
        out.extend_from_slice(b",\"aborted\":true");
    }
    #[cfg(feature = "trace-context")]
    if let Some(trace) = &p.trace {
        out.extend_from_slice(b",\"trace_id\":\"");
        trace.write_trace_id(out);
        out.push(b'"');
    }
    fields.for_each(|name, value| {
        out.push(b',');
        json_str(out, name);
        out.push(b':');
        match value {
            LogValue::Str(s) => json_bytes(out, s.as_bytes(), MAX_HEADER),
            LogValue::Shared(s) => json_bytes(out, s.as_bytes(), MAX_HEADER),
            LogValue::Header(v) => json_bytes(out, v.as_bytes(), MAX_HEADER),
            LogValue::Uint(n) => int(out, *n),
            LogValue::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        }
    });
    out.push(b'}');
}

/// `host - user [10/Oct/2000:13:55:36 +0000] "GET /path HTTP/1.1" 200 2326 "referer" "agent"`.
fn combined(out: &mut Vec<u8>, p: &Head, fields: &LogFields, line: &Outcome, query: QueryLog) {
    match p.client {
        Some(ip) => ip_addr(out, ip),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" - ");
    let mut user = None;
    fields.for_each(|name, value| {
        if name == "consumer" {
            user = Some(value.to_string());
        }
    });
    match user {
        Some(user) => clf_str(out, user.as_bytes(), MAX_HEADER),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" [");
    clf_time(out, p.time);
    out.extend_from_slice(b"] \"");
    clf_str(out, p.method.as_str().as_bytes(), MAX_HEADER);
    out.push(b' ');
    clf_str(out, p.uri.path().as_bytes(), MAX_PATH);
    if let Some(q) = p.uri.query() {
        match query {
            QueryLog::Omit => {}
            QueryLog::Redact => {
                out.push(b'?');
                clf_str(out, redact(q).as_bytes(), MAX_PATH);
            }
            QueryLog::Keep => {
                out.push(b'?');
                clf_str(out, q.as_bytes(), MAX_PATH);
            }
        }
    }
    out.push(b' ');
    out.extend_from_slice(version(p.version).as_bytes());
    out.extend_from_slice(b"\" ");
    int(out, line.status.as_u16());
    out.push(b' ');
    if line.bytes_out == 0 {
        out.push(b'-');
    } else {
        int(out, line.bytes_out);
    }
    for value in [&p.referer, &p.user_agent] {
        out.extend_from_slice(b" \"");
        match value {
            Some(v) => clf_str(out, v.as_bytes(), MAX_HEADER),
            None => out.push(b'-'),
        }
        out.push(b'"');
    }
}

/// Appends `bytes` cut to `max`, escaped as nginx does: `"`, `\` and bytes outside
/// printable ASCII as `\xHH`.
fn clf_str(out: &mut Vec<u8>, bytes: &[u8], max: usize) {
    for &b in &bytes[..bytes.len().min(max)] {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.push(b);
        }
    }
}

/// The query with every value replaced by `REDACTED` (a parameter without `=` kept as it is).
fn redact(query: &str) -> String {
    let query = &query[..floor_char_boundary(query, MAX_PATH)];
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) => {
                out.push_str(name);
                out.push_str("=REDACTED");
            }
            None => out.push_str(pair),
        }
    }
    out
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// Appends `d` in milliseconds with three decimals: `12.345`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let mut buf = itoa::Buffer::new();
    let text = buf.format(micros).as_bytes();
    if text.len() > 3 {
        let (whole, fraction) = text.split_at(text.len() - 3);
        out.extend_from_slice(whole);
        out.push(b'.');
        out.extend_from_slice(fraction);
    } else {
        out.extend_from_slice(b"0.");
        out.extend_from_slice(&b"000"[text.len()..]);
        out.extend_from_slice(text);
    }
}

fn digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        // NOTE: `n % 10` is a digit.
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// An IP address as text. Each thread keeps the last address it wrote: the requests of a
/// connection, served back to back by one thread, then copy it instead of formatting it.
fn ip_addr(out: &mut Vec<u8>, ip: IpAddr) {
    thread_local! {
        static LAST: RefCell<(Option<IpAddr>, Vec<u8>)> = const { RefCell::new((None, Vec::new())) };
    }
    LAST.with_borrow_mut(|(last, text)| {
        if *last != Some(ip) {
            text.clear();
            match ip {
                IpAddr::V4(v4) => {
                    for (i, octet) in v4.octets().into_iter().enumerate() {
                        if i > 0 {
                            text.push(b'.');
                        }
                        int(text, octet);
                    }
                }
                IpAddr::V6(v6) => {
                    let _ = write!(text, "{v6}");
                }
            }
            *last = Some(ip);
        }
        out.extend_from_slice(text);
    });
}

const fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// The civil date and time of `t` in UTC: (year, month, day, hour, minute, second, millis).
fn civil(t: SystemTime) -> (i64, u32, u32, u32, u32, u32, u32) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil, for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "day, month and the time of day are small and positive by construction"
    )]
    (
        year,
        month as u32,
        day as u32,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
        since.subsec_millis(),
    )
}

/// `2026-12-07T05:23:46.123Z`: the date and time formatted once a second per thread, the
/// milliseconds every time.
fn rfc3339(out: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with_borrow_mut(|(at, text)| {
        if *at != since.as_secs() {
            let (y, mo, d, h, mi, s, _) = civil(t);
            text.clear();
            digits(text, y.unsigned_abs(), 4);
            text.push(b'-');
            for (n, sep) in [(mo, b'-'), (d, b'T'), (h, b':'), (mi, b':'), (s, b'.')] {
                digits(text, n.into(), 2);
                text.push(sep);
            }
            text.pop();
            *at = since.as_secs();
        }
        out.extend_from_slice(text);
    });
    out.push(b'.');
    digits(out, since.subsec_millis().into(), 3);
    out.push(b'Z');
}

/// `07/Dec/2026:05:23:46 +0000`.
fn clf_time(out: &mut Vec<u8>, t: SystemTime) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, _) = civil(t);
    digits(out, d.into(), 2);
    out.push(b'/');
    out.extend_from_slice(MONTHS[(mo as usize).saturating_sub(1) % 12].as_bytes());
    out.push(b'/');
    digits(out, y.unsigned_abs(), 4);
    for n in [h, mi, s] {
        out.push(b':');
        digits(out, n.into(), 2);
    }
    out.extend_from_slice(b" +0000");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)
    }

    #[test]
    fn plain_bytes_are_told_from_the_escaped_eight_at_a_time() {
        let slow = |bytes: &[u8]| {
            bytes
                .iter()
                .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        };
        // Every byte value, at every place of a word and of the remainder after one.
        for len in [1, 7, 8, 9, 16, 19] {
            for at in 0..len {
                for b in 0..=u8::MAX {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    assert_eq!(is_plain(&bytes), slow(&bytes), "{b:#x} at {at} of {len}");
                }
            }
        }
        // Neighbours of the bounds side by side (a borrow must not hide one).
        for pair in [
            [0x1f, 0x20],
            [0x20, 0x1f],
            [0x7f, 0x7e],
            [0x00, 0x80],
            [0x80, 0x00],
        ] {
            let mut bytes = [b'a'; 16];
            bytes[6..8].copy_from_slice(&pair);
            assert_eq!(is_plain(&bytes), slow(&bytes), "{pair:x?}");
        }
        assert!(is_plain(b""));
        assert!(is_plain(b"GET /api/orders?page=2 curl/8.5.0"));
    }

    #[test]
    fn durations_and_addresses_are_formatted() {
        for (micros, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (999, "0.999"),
            (1000, "1.000"),
            (12_345, "12.345"),
            (3_600_000_001, "3600000.001"),
        ] {
            let mut out = Vec::new();
            millis(&mut out, Duration::from_micros(micros));
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
        // The second of two addresses in a row is written from the thread's last one.
        for ip in ["10.0.0.1", "10.0.0.1", "2001:db8::7", "192.168.255.254"] {
            let mut out = Vec::new();
            ip_addr(&mut out, ip.parse().unwrap());
            assert_eq!(String::from_utf8(out).unwrap(), ip);
        }
    }

    #[test]
    fn times_are_formatted_in_utc() {
        let mut out = Vec::new();
        rfc3339(&mut out, at(0, 0));
        assert_eq!(out, b"1970-01-01T00:00:00.000Z");
        out.clear();
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.789
        rfc3339(&mut out, at(951_827_696, 789));
        assert_eq!(out, b"2000-02-29T12:34:56.789Z");
        out.clear();
        rfc3339(&mut out, at(1_796_623_199, 5));
        assert_eq!(out, b"2026-12-07T05:59:59.005Z");
        out.clear();
        clf_time(&mut out, at(971_185_736, 0));
        assert_eq!(out, b"10/Oct/2000:13:48:56 +0000");
        // Every day for 400 years agrees with the HTTP date of the same instant.
        for day in (0..146_097u64).step_by(7) {
            let t = at(day * 86_400 + 3_723, 0);
            let (y, mo, d, ..) = civil(t);
            let http = httpdate::fmt_http_date(t);
            let month = http.split(' ').nth(2).unwrap().to_owned();
            assert_eq!(
                http,
                format!("{}, {d:02} {month} {y} 01:02:03 GMT", &http[..3]),
                "{day}"
            );
            let months = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            assert_eq!(months[mo as usize - 1], month);
        }
    }

    #[test]
    fn queries_are_redacted_by_value() {
        assert_eq!(
            redact("a=1&b&c=x=y&=z"),
            "a=REDACTED&b&c=REDACTED&=REDACTED"
        );
        assert_eq!(redact(""), "");
        let long = "k=".to_owned() + &"é".repeat(MAX_PATH);
        assert!(redact(&long).len() <= MAX_PATH + "REDACTED".len());
    }

    #[test]
    fn hostile_strings_stay_inside_their_field() {
        let mut out = Vec::new();
        json_bytes(&mut out, b"a\"b\\c\n\x00\xff", 100);
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\n\0\u{fffd}");
        out.clear();
        clf_str(&mut out, b"a\"b\\c\n\x00\xff d", 100);
        assert_eq!(out, b"a\\x22b\\x5Cc\\x0A\\x00\\xFF d");
        out.clear();
        json_bytes(&mut out, &[b'x'; 5000], 10);
        assert_eq!(out, b"\"xxxxxxxxxx\"");
    }
}
