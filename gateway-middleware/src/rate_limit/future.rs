//! The response future and body of [`RateLimit`](super::RateLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::Response;
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;

use super::layer::{Decision, Shared};
use super::store::Permit;

/// What a response that was let through gets on its way out: the limits' headers, and the
/// request's place in the concurrency limits, held until its body ends.
pub(crate) struct After {
    shared: Arc<Shared>,
    decision: Decision,
}

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] fut: F, after: Option<After> },
        Answered { res: Option<Response<Body>> },
    }
}

pin_project! {
    /// A response body that holds its request's concurrency permits until it is done.
    struct Holding<B> {
        #[pin]
        inner: B,
        permits: Vec<Permit>,
    }
}

// === impl After ===

impl After {
    pub(crate) const fn new(shared: Arc<Shared>, decision: Decision) -> Self {
        Self { shared, decision }
    }

    fn apply<B>(self, res: Response<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Decision {
            readings, permits, ..
        } = self.decision;
        let (mut parts, body) = res.into_parts();
        self.shared.policies().write(&readings, &mut parts.headers);
        let body = if permits.is_empty() {
            Body::new(body)
        } else {
            Body::new(Holding {
                inner: body,
                permits,
            })
        };
        Response::from_parts(parts, body)
    }
}

// === impl ResponseFuture ===

impl<F> ResponseFuture<F> {
    pub(crate) const fn called(fut: F, after: After) -> Self {
        Self {
            state: State::Called {
                fut,
                after: Some(after),
            },
        }
    }

    pub(crate) const fn answered(res: Response<Body>) -> Self {
        Self {
            state: State::Answered { res: Some(res) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { fut, after } => {
                let res = ready!(fut.poll(cx))?;
                Poll::Ready(Ok(match after.take() {
                    Some(after) => after.apply(res),
                    None => res.map(Body::new),
                }))
            }
            StateProj::Answered { res } => Poll::Ready(Ok(res
                .take()
                .unwrap_or_else(|| Error::new(ErrorKind::Internal).to_response()))),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

// === impl Holding ===

impl<B> http_body::Body for Holding<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if frame.is_none() {
            // The body is done: the request no longer counts, even if the body lingers.
            this.permits.clear();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
