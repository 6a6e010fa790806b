//! A layer the config may leave out, without a box per request for having the choice.
//!
//! `ServiceBuilder::option_layer` needs both of its branches to answer with the same type,
//! which a layer that wraps the response body (metrics, the access log, spans) does not;
//! boxing the body costs an allocation and a dynamic call per frame. [`Optional`] answers
//! with [`http_body_util::Either`] of the two bodies instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use gateway_core::BoxError;
use http::Response;
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// `L` when it is there, nothing when it is not.
#[derive(Clone, Debug)]
pub(crate) struct Optional<L>(Option<L>);

/// The service of [`Optional`].
#[derive(Clone, Debug)]
pub(crate) enum OptionalService<A, B> {
    On(A),
    Off(B),
}

pin_project! {
    /// The response future of [`OptionalService`].
    #[project = Proj]
    pub(crate) enum OptionalFuture<A, B> {
        On { #[pin] fut: A },
        Off { #[pin] fut: B },
    }
}

impl<L> Optional<L> {
    pub(crate) const fn new(layer: Option<L>) -> Self {
        Self(layer)
    }
}

impl<S, L: Layer<S>> Layer<S> for Optional<L> {
    type Service = OptionalService<L::Service, S>;

    fn layer(&self, inner: S) -> Self::Service {
        match &self.0 {
            Some(layer) => OptionalService::On(layer.layer(inner)),
            None => OptionalService::Off(inner),
        }
    }
}

impl<A, B, Req, BodyA, BodyB> Service<Req> for OptionalService<A, B>
where
    A: Service<Req, Response = Response<BodyA>>,
    B: Service<Req, Response = Response<BodyB>>,
    A::Error: Into<BoxError>,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<BodyA, BodyB>>;
    type Error = BoxError;
    type Future = OptionalFuture<A::Future, B::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Self::On(svc) => svc.poll_ready(cx).map_err(Into::into),
            Self::Off(svc) => svc.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self {
            Self::On(svc) => OptionalFuture::On { fut: svc.call(req) },
            Self::Off(svc) => OptionalFuture::Off { fut: svc.call(req) },
        }
    }
}

impl<A, B, BodyA, BodyB, EA, EB> Future for OptionalFuture<A, B>
where
    A: Future<Output = Result<Response<BodyA>, EA>>,
    B: Future<Output = Result<Response<BodyB>, EB>>,
    EA: Into<BoxError>,
    EB: Into<BoxError>,
{
    type Output = Result<Response<Either<BodyA, BodyB>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match self.project() {
            Proj::On { fut } => ready!(fut.poll(cx))
                .map(|res| res.map(Either::Left))
                .map_err(Into::into),
            Proj::Off { fut } => ready!(fut.poll(cx))
                .map(|res| res.map(Either::Right))
                .map_err(Into::into),
        })
    }
}
