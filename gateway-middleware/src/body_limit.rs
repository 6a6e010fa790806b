//! A limit on request body size: a request that announces a larger body is refused with
//! 413 before the service sees it, and one whose body (chunked, or lying about its length)
//! grows past the limit while it streams fails with 413 when it crosses it. Nothing is
//! buffered: the body is counted as it passes.
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::body_limit::BodyLimitLayer;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(BodyLimitLayer::new(1024))
//!     .service(service_fn(|_: Request<Body>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//!     }));
//! let big = Request::post("/").header("content-length", "4096").body(Body::empty()).unwrap();
//! let res = svc.oneshot(big).await.unwrap();
//! assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pub use crate::refuse::ResponseFuture;

/// Limits request bodies to `max` bytes; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct BodyLimitLayer {
    max: u64,
}

/// The service of [`BodyLimitLayer`].
#[derive(Clone, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    max: u64,
}

pin_project! {
    /// A request body counted as it streams.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        left: u64,
    }
}

// === impl BodyLimitLayer ===

impl BodyLimitLayer {
    /// At most `max` bytes of request body.
    pub const fn new(max: u64) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

// === impl BodyLimit ===

impl<S, B, ResB> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<Body>, Response = Response<ResB>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let announced = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|len| len > self.max) {
            tracing::debug!(max = self.max, "request body over the limit");
            return ResponseFuture::refused(ErrorKind::PayloadTooLarge);
        }
        let max = self.max;
        let req = req.map(|inner| Body::new(LimitedBody { inner, left: max }));
        ResponseFuture::called(self.inner.call(req))
    }
}

// === impl LimitedBody ===

impl<B> http_body::Body for LimitedBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(frame) = ready!(this.inner.poll_frame(cx)) else {
            return Poll::Ready(None);
        };
        let frame = frame.map_err(Into::into)?;
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > *this.left {
                tracing::debug!("request body grew over the limit");
                *this.left = 0;
                return Poll::Ready(Some(Err(Error::new(ErrorKind::PayloadTooLarge).into())));
            }
            *this.left -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    /// Reads the whole request body and answers with its length, or with the body's error.
    async fn read_all(req: Request<Body>) -> Result<Response<Body>, Infallible> {
        Ok(match req.into_body().collect().await {
            Ok(body) => Response::new(Body::from(body.to_bytes().len().to_string())),
            Err(err) => Error::from_box(err).to_response(),
        })
    }

    fn chunks(n: usize, size: usize) -> Body {
        let frames =
            (0..n).map(move |_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; size]))));
        Body::new(http_body_util::StreamBody::new(futures_stream(frames)))
    }

    fn futures_stream<I: Iterator + Send + Unpin + 'static>(
        it: I,
    ) -> impl futures_core::Stream<Item = I::Item> + Send + Unpin {
        struct S<I>(I);
        impl<I: Iterator + Unpin> futures_core::Stream for S<I> {
            type Item = I::Item;
            fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<I::Item>> {
                Poll::Ready(self.0.next())
            }
        }
        S(it)
    }

    #[tokio::test]
    async fn bodies_up_to_the_limit_pass_and_larger_ones_are_413() {
        let svc = ServiceBuilder::new()
            .layer(BodyLimitLayer::new(1000))
            .service(service_fn(read_all));
        let call = |body: Body, announced: Option<&str>| {
            let mut req = Request::post("/");
            if let Some(len) = announced {
                req = req.header(CONTENT_LENGTH, len);
            }
            svc.clone().oneshot(req.body(body).unwrap())
        };
        let res = call(chunks(10, 100), None).await.unwrap();
        assert_eq!(res.status(), 200, "exactly the limit, chunked");
        let res = call(chunks(11, 100), None).await.unwrap();
        assert_eq!(res.status(), 413, "one chunk over");
        let res = call(Body::empty(), Some("1001")).await.unwrap();
        assert_eq!(res.status(), 413, "announced over: refused before the body");
        let res = call(chunks(2, 1000), Some("1000")).await.unwrap();
        assert_eq!(res.status(), 413, "a body longer than it said");
    }
}
