//! W3C Trace Context: the `traceparent` a client sent is continued, a missing or malformed
//! one replaced by a new trace, and the upstream always gets a valid `traceparent` whose
//! parent is the gateway's own span.
//!
//! - A valid `traceparent` (one header; version `00`, or a later one read as `00`; lowercase
//!   hex; trace and parent ids not all zeros) keeps its trace id and flags; the parent id
//!   becomes a new span id, the gateway's. Its `tracestate` goes on unchanged when it is
//!   within the standard's limits (32 members, 512 bytes), and is dropped otherwise.
//! - Anything else starts a new trace (random ids, `sampled` as the
//!   [`sample_ratio`](TraceContextLayer::sample_ratio) decides) and drops the client's
//!   `traceparent` and `tracestate`: a malformed one is never forwarded.
//!
//! The request carries the result as a [`TraceContext`] extension (for logs and spans), and
//! the trace id goes in the access log ([`LogFields`] `trace_id`).
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::trace_context::{TraceContext, TraceContextLayer};
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(TraceContextLayer::new())
//!     .service(service_fn(|req: Request<Body>| async move {
//!         let trace = req.extensions().get::<TraceContext>().unwrap();
//!         assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//!         let sent = req.headers()["traceparent"].to_str().unwrap();
//!         assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
//!         assert!(!sent.contains("00f067aa0ba902b7"), "the parent is the gateway's span");
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//!     }));
//! let req = Request::builder()
//!     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
//!     .body(Body::empty())
//!     .unwrap();
//! svc.oneshot(req).await.unwrap();
//! # }
//! ```

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::task::{Context, Poll};

use gateway_core::LogFields;
use http::Request;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tower::{Layer, Service};

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The most `tracestate` members passed on.
const MAX_STATE_MEMBERS: usize = 32;
/// The most `tracestate` bytes passed on.
const MAX_STATE_BYTES: usize = 512;
/// The `sampled` flag.
const SAMPLED: u8 = 0x01;

/// Continues or starts a trace for every request; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct TraceContextLayer {
    /// New traces sampled out of `u64::MAX`.
    sample_below: u64,
    on: bool,
}

/// The service of [`TraceContextLayer`].
#[derive(Clone, Debug)]
pub struct TraceContextService<S> {
    inner: S,
    sample_below: u64,
    on: bool,
}

/// A request's place in its trace: the trace, the caller's span (when it sent one) and the
/// gateway's own span.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    caller_span_id: Option<[u8; 8]>,
    span_id: [u8; 8],
    flags: u8,
}

// === impl TraceContextLayer ===

impl Default for TraceContextLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceContextLayer {
    /// Every new trace sampled.
    pub const fn new() -> Self {
        Self {
            sample_below: u64::MAX,
            on: true,
        }
    }

    /// A layer that leaves requests alone (their trace headers included), for a stack
    /// whose trace context is a choice made at run time: the stack's type stays the same,
    /// and an `off` layer costs a request nothing.
    pub const fn off() -> Self {
        Self {
            sample_below: 0,
            on: false,
        }
    }

    /// The share of *new* traces marked sampled, from 0 to 1 (a continued trace keeps the
    /// caller's decision).
    pub fn sample_ratio(mut self, ratio: f64) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        // NOTE: the float-to-int cast saturates; 1.0 maps to u64::MAX.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a clamped ratio scaled to the u64 range; saturation is the intent"
        )]
        let below = (ratio * u64::MAX as f64) as u64;
        self.sample_below = below;
        self
    }
}

impl<S> Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> TraceContextService<S> {
        TraceContextService {
            inner,
            sample_below: self.sample_below,
            on: self.on,
        }
    }
}

// === impl TraceContextService ===

impl<S, B> Service<Request<B>> for TraceContextService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        if !self.on {
            return self.inner.call(req);
        }
        let headers = req.headers_mut();
        let trace = match TraceContext::continued(headers) {
            Some(trace) => {
                if !state_is_sane(headers) {
                    headers.remove(TRACESTATE);
                }
                trace
            }
            None => {
                headers.remove(TRACESTATE);
                TraceContext::started(self.sample_below == u64::MAX || random() < self.sample_below)
            }
        };
        headers.insert(TRACEPARENT, trace.traceparent());
        if let Some(log) = req.extensions().get::<LogFields>() {
            log.insert("trace_id", trace.trace_id());
        }
        req.extensions_mut().insert(trace);
        self.inner.call(req)
    }
}

// === impl TraceContext ===

impl TraceContext {
    /// The caller's trace, continued with a new span, if `headers` carry one valid
    /// `traceparent`.
    fn continued(headers: &HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let (trace_id, caller, flags) = parse(value.as_bytes())?;
        Some(Self {
            trace_id,
            caller_span_id: Some(caller),
            span_id: nonzero_id(),
            flags,
        })
    }

    /// A new trace.
    fn started(sampled: bool) -> Self {
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&random().to_be_bytes());
        trace_id[8..].copy_from_slice(&nonzero_id());
        Self {
            trace_id,
            caller_span_id: None,
            span_id: nonzero_id(),
            flags: if sampled { SAMPLED } else { 0 },
        }
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// Appends the trace id's 32 lowercase hex digits to `out`, without allocating.
    pub fn write_trace_id(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + 32, 0);
        crate::hex::write(&mut out[start..], &self.trace_id);
    }

    /// The gateway's span id (the upstream's parent), 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span_id)
    }

    /// The caller's span id, when the trace was continued.
    pub fn caller_span_id(&self) -> Option<String> {
        self.caller_span_id.as_ref().map(|id| hex(id))
    }

    /// The trace id's 16 bytes.
    pub const fn trace_id_bytes(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The gateway's span id's 8 bytes.
    pub const fn span_id_bytes(&self) -> [u8; 8] {
        self.span_id
    }

    /// The caller's span id's 8 bytes, when the trace was continued.
    pub const fn caller_span_id_bytes(&self) -> Option<[u8; 8]> {
        self.caller_span_id
    }

    /// The trace flags (`0x01`: sampled).
    pub const fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the trace is sampled.
    pub const fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// Whether the caller sent the trace (rather than the gateway starting it).
    pub const fn is_continued(&self) -> bool {
        self.caller_span_id.is_some()
    }

    /// The `traceparent` the upstream gets.
    pub fn traceparent(&self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        crate::hex::write(&mut out[3..35], &self.trace_id);
        out[35] = b'-';
        crate::hex::write(&mut out[36..52], &self.span_id);
        out[52] = b'-';
        crate::hex::write(&mut out[53..55], &[self.flags]);
        HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &self.trace_id())
            .field("span_id", &self.span_id())
            .field("caller_span_id", &self.caller_span_id())
            .field("sampled", &self.is_sampled())
            .finish()
    }
}

/// Reads `version-traceid-parentid-flags`; see the module docs.
fn parse(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = unhex::<1>(&value[..2])?[0];
    // Version ff is invalid; 00 is exactly 55 bytes; a later version may append fields.
    if version == 0xff
        || (version == 0 && value.len() != 55)
        || (value.len() > 55 && value[55] != b'-')
    {
        return None;
    }
    let trace_id = unhex::<16>(&value[3..35])?;
    let parent = unhex::<8>(&value[36..52])?;
    let flags = unhex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags))
}

/// `N` bytes from `2N` lowercase hex digits.
fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    if text.len() != 2 * N {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    crate::hex::write(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default()
}

/// Whether the `tracestate` fields are within the limits passed on (or absent).
fn state_is_sane(headers: &HeaderMap) -> bool {
    let (mut bytes, mut members) = (0, 0);
    for value in headers.get_all(TRACESTATE) {
        bytes += value.len();
        for member in value.as_bytes().split(|&b| b == b',') {
            let member = member.trim_ascii();
            if member.is_empty() {
                continue;
            }
            members += 1;
            let Some(eq) = member.iter().position(|&b| b == b'=') else {
                return false;
            };
            if eq == 0 || eq == member.len() - 1 {
                return false;
            }
        }
    }
    bytes <= MAX_STATE_BYTES && members <= MAX_STATE_MEMBERS
}

/// 64 random bits: wyrand, seeded once per thread from the OS's randomness (through
/// `RandomState`). Trace ids must be unique and unguessable enough not to collide, not
/// secret; a SipHash per id cost more than the rest of the layer.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut hasher = std::hash::RandomState::new().build_hasher();
            hasher.write_u64(0x9e37_79b9_7f4a_7c15);
            hasher.finish()
        });
    }
    STATE.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "wyrand folds 128 bits to 64"
        )]
        let folded = (t as u64) ^ ((t >> 64) as u64);
        folded
    })
}

/// A random id that is not all zeros.
fn nonzero_id() -> [u8; 8] {
    loop {
        let id = random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::try_from(*name).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn valid_parents_are_continued_and_invalid_ones_are_not() {
        let trace = TraceContext::continued(&headers(&[("traceparent", VALID)])).unwrap();
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.caller_span_id().as_deref(), Some("00f067aa0ba902b7"));
        assert!(trace.is_sampled());
        assert_ne!(trace.span_id(), "00f067aa0ba902b7");
        // A later version is read as 00, with what it appends ignored.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes";
        let trace = TraceContext::continued(&headers(&[("traceparent", later)])).unwrap();
        assert!(!trace.is_sampled());
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                TraceContext::continued(&headers(&[("traceparent", bad)])).is_none(),
                "{bad:?}"
            );
        }
        let two = headers(&[("traceparent", VALID), ("traceparent", VALID)]);
        assert!(TraceContext::continued(&two).is_none());
    }

    #[test]
    fn new_traces_are_valid_and_distinct() {
        let a = TraceContext::started(true);
        let b = TraceContext::started(false);
        assert_ne!(a.trace_id(), b.trace_id());
        for trace in [a, b] {
            let value = trace.traceparent();
            let parsed = parse(value.as_bytes()).unwrap();
            assert_eq!(parsed.0, trace.trace_id);
            assert_eq!(parsed.1, trace.span_id);
        }
        assert!(a.is_sampled() && !b.is_sampled());
    }

    #[test]
    fn tracestate_limits() {
        assert!(state_is_sane(&headers(&[("tracestate", "a=1,b=2")])));
        assert!(state_is_sane(&headers(&[])));
        assert!(!state_is_sane(&headers(&[("tracestate", "novalue")])));
        assert!(!state_is_sane(&headers(&[("tracestate", "=x")])));
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(!state_is_sane(&headers(&[("tracestate", &many)])));
        let long = format!("k={}", "v".repeat(600));
        assert!(!state_is_sane(&headers(&[("tracestate", &long)])));
    }
}
