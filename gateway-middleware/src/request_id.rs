//! Request ids: every request gets one, in the [`RequestId`] extension (for logs and later
//! layers), on the request the upstream sees, on the response, and in the access log
//! ([`gateway_core::LogFields`] `request_id`).
//!
//! An id the client sent in the header is kept when it is a sane one (1 to 128 characters
//! of letters, digits and `-_.:@/+=`), so that a trace that started upstream of the gateway
//! goes on; anything else (or every incoming id, with `trust_incoming(false)`) is replaced
//! by a new one. New ids are 32 hex digits: a random per-process prefix and a counter,
//! unique without a lock or a random number per request.
//!
//! ```
//! use gateway_core::{Body, RequestId};
//! use gateway_middleware::request_id::SetRequestIdLayer;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(SetRequestIdLayer::new())
//!     .service(service_fn(|req: Request<Body>| async move {
//!         let id = req.extensions().get::<RequestId>().cloned();
//!         assert_eq!(id.map(|id| id.header_value().clone()), req.headers().get("x-request-id").cloned());
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//!     }));
//! let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
//! assert_eq!(res.headers()["x-request-id"].len(), 32);
//! # }
//! ```

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use gateway_core::{LogFields, RequestId};
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// The header used unless another is configured.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming id kept.
const MAX_LEN: usize = 128;

/// Gives every request an id; see the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct SetRequestIdLayer {
    header: HeaderName,
    trust_incoming: bool,
}

/// The service of [`SetRequestIdLayer`].
#[derive(Clone, Debug)]
pub struct SetRequestId<S> {
    inner: S,
    header: HeaderName,
    trust_incoming: bool,
}

pin_project! {
    /// Response future of [`SetRequestId`]: puts the id on the response.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        header: HeaderName,
        id: Option<HeaderValue>,
    }
}

// === impl SetRequestIdLayer ===

impl SetRequestIdLayer {
    /// Ids in `X-Request-Id`, incoming ones kept when sane.
    pub const fn new() -> Self {
        Self {
            header: X_REQUEST_ID,
            trust_incoming: true,
        }
    }

    /// Uses `header` instead of `X-Request-Id`.
    ///
    /// ```
    /// use gateway_middleware::request_id::SetRequestIdLayer;
    /// let layer = SetRequestIdLayer::new().header(http::HeaderName::from_static("x-correlation-id"));
    /// # drop(layer);
    /// ```
    pub fn header(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }

    /// Whether an id the client sent is kept (when sane) [default: true]. Turn it off at an
    /// edge whose clients must not choose the ids that appear in its logs.
    ///
    /// ```
    /// use gateway_middleware::request_id::SetRequestIdLayer;
    /// let layer = SetRequestIdLayer::new().trust_incoming(false);
    /// # drop(layer);
    /// ```
    pub const fn trust_incoming(mut self, trust: bool) -> Self {
        self.trust_incoming = trust;
        self
    }
}

impl Default for SetRequestIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for SetRequestIdLayer {
    type Service = SetRequestId<S>;

    fn layer(&self, inner: S) -> SetRequestId<S> {
        SetRequestId {
            inner,
            header: self.header.clone(),
            trust_incoming: self.trust_incoming,
        }
    }
}

// === impl SetRequestId ===

impl<S, B, ResB> Service<Request<B>> for SetRequestId<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let incoming = req
            .headers()
            .get(&self.header)
            .filter(|id| self.trust_incoming && is_sane(id.as_bytes()))
            .cloned();
        let id = incoming.unwrap_or_else(generate);
        req.headers_mut().insert(self.header.clone(), id.clone());
        if let Some(log) = req.extensions().get::<LogFields>() {
            log.insert("request_id", id.clone());
        }
        req.extensions_mut().insert(RequestId::new(id.clone()));
        ResponseFuture {
            inner: self.inner.call(req),
            header: self.header.clone(),
            id: Some(id),
        }
    }
}

// === impl ResponseFuture ===

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            // An id the upstream chose for the same request wins: it is the one its logs have.
            if !res.headers().contains_key(&*this.header) {
                res.headers_mut().insert(this.header.clone(), id);
            }
        }
        Poll::Ready(Ok(res))
    }
}

/// Whether a client's id is one to keep: short, and nothing a log line could trip on.
fn is_sane(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/+=".contains(b))
}

/// A new id: a random per-process prefix, then a counter, 32 hex digits in all.
fn generate() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // NOTE: std's `RandomState` is seeded from the OS's randomness once per process.
    let prefix = *PREFIX.get_or_init(|| std::hash::RandomState::new().build_hasher().finish());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut hex = [0u8; 32];
    crate::hex::write(&mut hex[..16], &prefix.to_be_bytes());
    crate::hex::write(&mut hex[16..], &n.to_be_bytes());
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_unique_hex() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_eq!(
            a.as_bytes()[..16],
            b.as_bytes()[..16],
            "one prefix per process"
        );
    }

    #[test]
    fn only_sane_incoming_ids_are_kept() {
        for sane in [
            "abc",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "a.b:c/d+e=f@g_h",
        ] {
            assert!(is_sane(sane.as_bytes()), "{sane}");
        }
        let long = "a".repeat(MAX_LEN + 1);
        for insane in ["", "a b", "a\"b", "<script>", "é", long.as_str()] {
            assert!(!is_sane(insane.as_bytes()), "{insane}");
        }
    }
}
