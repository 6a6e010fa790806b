//! The response future of a layer that decides about a request, perhaps after waiting,
//! then passes it on or answers it itself.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use gateway_core::{Body, BoxError, Error, ErrorKind};
use http::{Request, Response, request};
use pin_project_lite::pin_project;
use tower::Service;

/// A decision being made: the request's head back, and the answer if it is refused.
pub(crate) type Deciding =
    Pin<Box<dyn Future<Output = (request::Parts, Option<Response<Body>>)> + Send>>;

pin_project! {
    /// The response future of [`Auth`](super::Auth) and
    /// [`ForwardAuth`](super::ForwardAuth): the inner service's answer, or the layer's own.
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
        Deciding { decision: Deciding, rest: Option<(B, S)> },
        Called { #[pin] fut: S::Future },
        Answered { res: Option<Response<Body>> },
    }
}

impl<S: Service<Request<B>>, B> ResponseFuture<S, B> {
    /// The inner service was called at once.
    pub(crate) const fn called(fut: S::Future) -> Self {
        Self {
            state: State::Called { fut },
        }
    }

    /// The layer answers at once.
    pub(crate) const fn answered(res: Response<Body>) -> Self {
        Self {
            state: State::Answered { res: Some(res) },
        }
    }

    /// The layer decides first; `inner` (made ready) gets the request if it passes.
    pub(crate) const fn deciding(decision: Deciding, body: B, inner: S) -> Self {
        Self {
            state: State::Deciding {
                decision,
                rest: Some((body, inner)),
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
                StateProj::Deciding { decision, rest } => {
                    let (parts, answer) = ready!(decision.as_mut().poll(cx));
                    let next = match (answer, rest.take()) {
                        (Some(res), _) => State::Answered { res: Some(res) },
                        (None, Some((body, mut inner))) => State::Called {
                            fut: inner.call(Request::from_parts(parts, body)),
                        },
                        // NOTE: `rest` is taken only here, and the state moves on at once.
                        (None, None) => State::Answered {
                            res: Some(Error::new(ErrorKind::Internal).to_response()),
                        },
                    };
                    state.set(next);
                }
                StateProj::Called { fut } => {
                    return Poll::Ready(Ok(ready!(fut.poll(cx))?.map(Body::new)));
                }
                StateProj::Answered { res } => {
                    let res = res
                        .take()
                        .unwrap_or_else(|| Error::new(ErrorKind::Internal).to_response());
                    return Poll::Ready(Ok(res));
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

/// A body read whole, `max` bytes at most (a JWKS document, a denial's body).
pub(crate) async fn read_body<B>(body: B, max: usize) -> Result<Bytes, String>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| e.into().to_string())?;
        if let Ok(mut data) = frame.into_data() {
            if out.len() + data.remaining() > max {
                return Err(format!("a body over {max} bytes"));
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                let n = chunk.len();
                out.extend_from_slice(chunk);
                data.advance(n);
            }
        }
    }
    Ok(out.into())
}
