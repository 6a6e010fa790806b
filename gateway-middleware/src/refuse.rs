//! The response future of a layer that either passes a request on or refuses it itself.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::Response;
use pin_project_lite::pin_project;

pin_project! {
    /// The inner service's answer, or the layer's own refusal (a problem+json response).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] fut: F },
        Refused { kind: ErrorKind },
    }
}

impl<F> ResponseFuture<F> {
    /// Waits for the inner service's answer.
    pub(crate) const fn called(fut: F) -> Self {
        Self {
            state: State::Called { fut },
        }
    }

    /// Answers with `kind`'s problem response at once.
    pub(crate) const fn refused(kind: ErrorKind) -> Self {
        Self {
            state: State::Refused { kind },
        }
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut } => Poll::Ready(Ok(ready!(fut.poll(cx))?.map(Body::new))),
            StateProj::Refused { kind } => Poll::Ready(Ok(Error::new(*kind).to_response())),
        }
    }
}
