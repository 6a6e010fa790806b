//! The response future of [`RateLimit`](super::RateLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::{Request, Response, request};
use pin_project_lite::pin_project;

use tower::Service;

use super::layer::{Concluded, Decision, Shared};

/// What a response that was let through gets on its way out: the limits' headers, and the
/// request's place in the concurrency limits, held until its body ends.
pub(crate) struct After {
    shared: Arc<Shared>,
    decision: Decision,
}

/// A decision that waits for Redis.
type Deciding = Pin<Box<dyn Future<Output = Decision> + Send>>;

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Deciding {
            decision: Deciding,
            shared: Arc<Shared>,
            rest: Option<(request::Parts, B, S)>,
        },
        Called { #[pin] fut: S::Future, after: Option<After> },
        Answered { res: Option<Response<Body>> },
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
        // The request keeps its places in the concurrency limits until its body ends.
        let body = if permits.is_empty() {
            Body::new(body)
        } else {
            Body::new(body).with_guard(permits)
        };
        Response::from_parts(parts, body)
    }
}

// === impl ResponseFuture ===

impl<S: Service<Request<B>>, B> ResponseFuture<S, B> {
    pub(crate) const fn called(fut: S::Future, after: After) -> Self {
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

    /// Redis decides first; `inner` (made ready) gets the request if it passes.
    pub(crate) const fn deciding(
        decision: Deciding,
        shared: Arc<Shared>,
        parts: request::Parts,
        body: B,
        inner: S,
    ) -> Self {
        Self {
            state: State::Deciding {
                decision,
                shared,
                rest: Some((parts, body, inner)),
            },
        }
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut state = self.as_mut().project().state;
            match state.as_mut().project() {
                StateProj::Deciding {
                    decision,
                    shared,
                    rest,
                } => {
                    let decision = ready!(decision.as_mut().poll(cx));
                    // NOTE: `rest` is taken only here, and the state moves on at once.
                    let Some((parts, body, mut inner)) = rest.take() else {
                        state.set(State::Answered { res: None });
                        continue;
                    };
                    let next = match shared.conclude(decision, &parts) {
                        Concluded::Pass(after) => State::Called {
                            fut: inner.call(Request::from_parts(parts, body)),
                            after: Some(after),
                        },
                        Concluded::Refuse(res) => State::Answered { res: Some(res) },
                    };
                    state.set(next);
                }
                StateProj::Called { fut, after } => {
                    let res = ready!(fut.poll(cx))?;
                    return Poll::Ready(Ok(match after.take() {
                        Some(after) => after.apply(res),
                        None => res.map(Body::new),
                    }));
                }
                StateProj::Answered { res } => {
                    return Poll::Ready(Ok(res
                        .take()
                        .unwrap_or_else(|| Error::new(ErrorKind::Internal).to_response())));
                }
            }
        }
    }
}

impl<S: Service<Request<B>>, B> fmt::Debug for ResponseFuture<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
