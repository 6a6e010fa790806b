//! Response compression (gzip, br, zstd) by tower-http's `Compression`, with the rules a
//! proxy owes the origin's responses on top.
//!
//! tower-http picks the encoding from `Accept-Encoding` (q-values honored), leaves responses
//! that are already encoded or are ranges alone, drops `Content-Length` and
//! `Accept-Ranges` from what it compresses and adds `Vary: Accept-Encoding`. This layer
//! adds what a proxy must do besides:
//!
//! - a response marked `Cache-Control: no-transform` is passed as is (RFC 9110 §7.7);
//! - a strong `ETag` of a response it compresses is made weak (`W/"…"`): the bytes are no
//!   longer the ones the tag names (what nginx does);
//! - a client whose `Accept-Encoding` rules out both identity and every coding offered gets
//!   the upstream's answer unencoded, with its status (tower-http alone turns it into a
//!   `406` with the upstream's body; RFC 9110 §12.5.3 allows either, and a proxy should not
//!   invent a failure);
//! - only bodies of at least [`min_size`](CompressionLayer::min_size) bytes (1 KiB by
//!   default; below, the framing costs more than it saves), and never gRPC, images, SSE
//!   (`text/event-stream` must flush as it goes), `204` or `304`.
//!
//! The level is one for all three algorithms, 4 by default: gzip 4, brotli 4, zstd 4 cost a
//! fraction of the CPU of their maxima for most of the gain (brotli's own default, 11, is
//! meant for static files, not for every proxied response).
//!
//! Compressing a response that reflects both a secret and attacker-chosen input
//! (BREACH) leaks the secret through the size: leave such routes uncompressed.
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::compression::CompressionLayer;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(CompressionLayer::new())
//!     .service(service_fn(|_: Request<Body>| async {
//!         let res = Response::builder().header("etag", "\"v1\"");
//!         Ok::<_, std::convert::Infallible>(res.body(Body::from("hello ".repeat(500))).unwrap())
//!     }));
//! let req = Request::builder().header("accept-encoding", "gzip").body(Body::empty()).unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["content-encoding"], "gzip");
//! assert_eq!(res.headers()["etag"], "W/\"v1\"");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, ETAG};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_http::compression::predicate::{And, NotForContentType, Predicate, SizeAbove};

pub use tower_http::compression::{CompressionBody, CompressionLevel};

/// The smallest body compressed unless configured otherwise.
pub const DEFAULT_MIN_SIZE: u64 = 1024;

/// The level unless configured otherwise.
pub const DEFAULT_LEVEL: CompressionLevel = CompressionLevel::Precise(4);

/// Compresses responses; see the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct CompressionLayer {
    gzip: bool,
    br: bool,
    zstd: bool,
    level: CompressionLevel,
    min_size: u64,
}

/// The service of [`CompressionLayer`].
#[derive(Clone)]
pub struct Compression<S> {
    inner: tower_http::compression::Compression<Mark<S>, Compressible>,
}

/// Notes, under tower-http's layer, that a response came with a strong `ETag` and no
/// encoding, so that the tag can be weakened if the response gets compressed.
#[derive(Clone, Debug)]
pub struct Mark<S> {
    inner: S,
}

/// The response extension [`Mark`] leaves.
#[derive(Clone, Copy, Debug)]
struct StrongIdentity;

/// A request extension: its `Accept-Encoding` may rule identity out (it has a `q=0`), so
/// [`Mark`] keeps the response's own status for the way out.
#[derive(Clone, Copy, Debug)]
struct KeepStatus;

/// The response extension of a [`KeepStatus`] request: the inner service's status.
#[derive(Clone, Copy, Debug)]
struct OriginalStatus(StatusCode);

/// When [`Compression`] compresses (see the [module docs](self)): tower-http's size and
/// content-type predicates, and [`Transformable`].
pub type Compressible = And<
    And<And<And<SizeAbove, NotForContentType>, NotForContentType>, NotForContentType>,
    Transformable,
>;

/// What tower-http's predicates leave to a proxy: a response the origin marked
/// `Cache-Control: no-transform`, and a 204 or 304 (no body to compress), stay as they are.
#[derive(Clone, Copy, Debug)]
pub struct Transformable;

pin_project! {
    /// Response future of [`Compression`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

pin_project! {
    /// Response future of [`Mark`].
    pub struct MarkFuture<F> {
        #[pin]
        inner: F,
        keep_status: bool,
    }
}

// === impl CompressionLayer ===

impl Default for CompressionLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CompressionLayer {
    /// gzip, br and zstd, level 4, bodies of 1 KiB and more.
    pub const fn new() -> Self {
        Self {
            gzip: true,
            br: true,
            zstd: true,
            level: DEFAULT_LEVEL,
            min_size: DEFAULT_MIN_SIZE,
        }
    }

    /// Whether to offer gzip.
    pub const fn gzip(mut self, on: bool) -> Self {
        self.gzip = on;
        self
    }

    /// Whether to offer brotli.
    pub const fn br(mut self, on: bool) -> Self {
        self.br = on;
        self
    }

    /// Whether to offer zstd.
    pub const fn zstd(mut self, on: bool) -> Self {
        self.zstd = on;
        self
    }

    /// The compression level of all three.
    pub const fn level(mut self, level: CompressionLevel) -> Self {
        self.level = level;
        self
    }

    /// The smallest body compressed (bodies of unknown length always are).
    pub const fn min_size(mut self, bytes: u64) -> Self {
        self.min_size = bytes;
        self
    }
}

impl<S> Layer<S> for CompressionLayer {
    type Service = Compression<S>;

    fn layer(&self, inner: S) -> Compression<S> {
        let inner = tower_http::compression::Compression::new(Mark { inner })
            .gzip(self.gzip)
            .br(self.br)
            .zstd(self.zstd)
            .quality(self.level)
            .compress_when(
                SizeAbove::new(self.min_size)
                    .and(NotForContentType::GRPC)
                    .and(NotForContentType::IMAGES)
                    .and(NotForContentType::SSE)
                    .and(Transformable),
            );
        Compression { inner }
    }
}

// === impl Transformable ===

impl Predicate for Transformable {
    fn should_compress<B: HttpBody>(&self, res: &Response<B>) -> bool {
        let status = res.status();
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return false;
        }
        !res.headers().get_all(CACHE_CONTROL).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
        })
    }
}

// === impl Compression ===

impl<S: std::fmt::Debug> std::fmt::Debug for Compression<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compression").finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Compression<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: HttpBody,
{
    type Response = Response<CompressionBody<ResB>>;
    type Error = S::Error;
    type Future =
        ResponseFuture<
            <tower_http::compression::Compression<Mark<S>, Compressible> as Service<
                Request<ReqB>,
            >>::Future,
        >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let may_refuse_identity = req.headers().get_all(ACCEPT_ENCODING).iter().any(|v| {
            v.as_bytes()
                .windows(3)
                .any(|w| w.eq_ignore_ascii_case(b"q=0"))
        });
        if may_refuse_identity {
            req.extensions_mut().insert(KeepStatus);
        }
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = ready!(self.project().inner.poll(cx))?;
        if let Some(OriginalStatus(status)) = res.extensions_mut().remove() {
            *res.status_mut() = status;
        }
        if res.extensions_mut().remove::<StrongIdentity>().is_some()
            && res.headers().contains_key(CONTENT_ENCODING)
            && let Some(tag) = res.headers().get(ETAG)
        {
            let mut weak = Vec::with_capacity(tag.len() + 2);
            weak.extend_from_slice(b"W/");
            weak.extend_from_slice(tag.as_bytes());
            match HeaderValue::from_bytes(&weak) {
                Ok(weak) => res.headers_mut().insert(ETAG, weak),
                Err(_) => res.headers_mut().remove(ETAG),
            };
        }
        Poll::Ready(Ok(res))
    }
}

// === impl Mark ===

impl<S, ReqB, ResB> Service<Request<ReqB>> for Mark<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = MarkFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        MarkFuture {
            keep_status: req.extensions().get::<KeepStatus>().is_some(),
            inner: self.inner.call(req),
        }
    }
}

impl<F, B, E> Future for MarkFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if *this.keep_status {
            let status = res.status();
            res.extensions_mut().insert(OriginalStatus(status));
        }
        let strong = res
            .headers()
            .get(ETAG)
            .is_some_and(|tag| !tag.as_bytes().starts_with(b"W/"));
        if strong && !res.headers().contains_key(CONTENT_ENCODING) {
            res.extensions_mut().insert(StrongIdentity);
        }
        Poll::Ready(Ok(res))
    }
}
