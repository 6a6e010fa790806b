//! Middleware that turns every error into a response, so none reaches hyper.
//!
//! `Rescue` is the outermost layer of a gateway. Everything below it may fail with a
//! `BoxError` (a timeout, an unreachable upstream, an open circuit); `Rescue` finds the
//! error's [`ErrorKind`](crate::ErrorKind) by walking its `source()` chain, logs the whole chain once, and
//! answers with the problem response of that kind. Its own error type is [`Infallible`].
//!
//! # Example
//!
//! ```
//! use gateway_core::{Body, BoxError, Error, ErrorKind, RescueLayer};
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(RescueLayer::new())
//!     .service(service_fn(|_: Request<Body>| async {
//!         Err::<Response<Body>, BoxError>(Error::new(ErrorKind::GatewayTimeout).into())
//!     }));
//! let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
//! # }
//! ```
//!
//! # Ordering
//!
//! Put it first in the `ServiceBuilder` (outermost), so that errors from every other layer,
//! including the edge layers, are rescued.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::{Body, BoxError, Error};

/// Turns errors from the inner service into problem responses.
#[must_use]
#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer {
    _priv: (),
}

/// The service built by [`RescueLayer`].
#[derive(Clone, Debug)]
pub struct Rescue<S> {
    inner: S,
    /// An error the inner service reported from `poll_ready`; every later call answers with
    /// it, since a service that failed readiness must not be called.
    failed: Option<crate::ErrorKind>,
}

pin_project! {
    /// Response future of [`Rescue`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Inner { #[pin] fut: F },
        Failed { kind: Option<crate::ErrorKind> },
    }
}

// === impl RescueLayer ===

impl RescueLayer {
    /// A new rescue layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            failed: None,
        }
    }
}

// === impl Rescue ===

impl<S, B, ResB> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.failed.is_none()
            && let Err(err) = ready!(self.inner.poll_ready(cx))
        {
            let err = Error::from_box(err.into());
            err.log();
            self.failed = Some(err.kind());
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let state = match self.failed {
            Some(kind) => State::Failed { kind: Some(kind) },
            None => State::Inner {
                fut: self.inner.call(req),
            },
        };
        ResponseFuture { state }
    }
}

// === impl ResponseFuture ===

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut } => Poll::Ready(Ok(match ready!(fut.poll(cx)) {
                Ok(res) => res.map(Body::new),
                Err(err) => {
                    let err = Error::from_box(err.into());
                    err.log();
                    err.to_response()
                }
            })),
            StateProj::Failed { kind } => {
                let kind = kind.take().unwrap_or(crate::ErrorKind::Internal);
                Poll::Ready(Ok(Error::new(kind).to_response()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use http::StatusCode;
    use tower::{ServiceExt, service_fn};

    async fn status_for(err: BoxError) -> StatusCode {
        let mut err = Some(err);
        let svc = RescueLayer::new().layer(service_fn(move |_: Request<Body>| {
            let err = err.take().expect("called once");
            async move { Err::<Response<Body>, _>(err) }
        }));
        svc.oneshot(Request::new(Body::empty()))
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn errors_become_their_status() {
        assert_eq!(
            status_for(tower::timeout::error::Elapsed::new().into()).await,
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status_for(tower::load_shed::error::Overloaded::new().into()).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_for(Error::new(ErrorKind::CircuitOpen).into()).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_for("unexpected".into()).await,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[tokio::test]
    async fn responses_pass_through() {
        let svc = RescueLayer::new().layer(service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from("ok"))))
        }));
        let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(res.into_body().collect_bytes().await.unwrap(), "ok");
    }

    #[tokio::test]
    async fn poll_ready_failure_is_answered_not_propagated() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut svc = RescueLayer::new().layer(mock);
        handle.send_error(Error::new(ErrorKind::Overloaded));
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
