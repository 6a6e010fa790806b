//! Calling a type-erased route service with one allocation per request: the router's route
//! table and the config's boxed route stacks share it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use crate::{Body, BoxError};

/// The future of a type-erased route service.
pub type BoxResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// Calls `service` with `req` in one boxed future.
///
/// Route stacks are nearly always ready: then the request goes straight into the call, and
/// the box holds only the call's future (not the service and the request, moved again when
/// it is polled). A stack that is not ready is waited for inside the future.
pub fn oneshot<S, ResB>(mut service: S, req: Request<Body>) -> BoxResponseFuture
where
    S: Service<Request<Body>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => {
            let fut = service.call(req);
            Box::pin(async move {
                match fut.await {
                    Ok(res) => Ok(res.map(Body::new)),
                    Err(err) => Err(err.into()),
                }
            })
        }
        Poll::Ready(Err(err)) => Box::pin(std::future::ready(Err(err.into()))),
        Poll::Pending => Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            match service.call(req).await {
                Ok(res) => Ok(res.map(Body::new)),
                Err(err) => Err(err.into()),
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, ErrorKind};
    use http::StatusCode;

    /// Pending on its first readiness poll (waking at once), then answers 200, or fails
    /// with `fail` when given.
    struct Slow {
        polled: bool,
        fail: Option<ErrorKind>,
    }

    impl Service<Request<Body>> for Slow {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.polled {
                return Poll::Ready(Ok(()));
            }
            self.polled = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            assert!(self.polled, "called before it was ready");
            std::future::ready(match self.fail {
                Some(kind) => Err(Error::new(kind).into()),
                None => Ok(Response::new(Body::empty())),
            })
        }
    }

    #[tokio::test]
    async fn a_service_not_ready_at_once_is_waited_for() {
        let slow = Slow {
            polled: false,
            fail: None,
        };
        let res = oneshot(slow, Request::new(Body::empty())).await;
        assert_eq!(res.map(|r| r.status()).ok(), Some(StatusCode::OK));
        let failing = Slow {
            polled: true,
            fail: Some(ErrorKind::BadGateway),
        };
        let err = oneshot(failing, Request::new(Body::empty())).await.err();
        let kind = err.map(|e| Error::from_box(e).kind());
        assert_eq!(kind, Some(ErrorKind::BadGateway));
    }
}
