//! Middleware that bounds a request's time as a whole and tells the layers below its
//! deadline.
//!
//! Like tower's `Timeout`, [`Timeout`] fails a request that has not answered within its
//! duration with an error (a 504 once rescued: [`ErrorKind::GatewayTimeout`]) that travels
//! up for retries and breakers to see. Unlike it, it puts the request's
//! [`Deadline`] in the request's extensions, so the layers below plan with it: a
//! [retry](crate::retry) is not started when it could not end in time, and each try is cut
//! at the deadline. When an outer layer set an earlier deadline, that one stays.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gateway_core::time::Deadline;
//! use gateway_core::{Body, Error, ErrorKind};
//! use gateway_middleware::timeout::TimeoutLayer;
//! use http::{Request, Response};
//! use tower::{BoxError, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let slow = service_fn(|req: Request<Body>| async move {
//!     assert!(req.extensions().get::<Deadline>().is_some());
//!     tokio::time::sleep(Duration::from_secs(60)).await;
//!     Ok::<_, BoxError>(Response::new(Body::empty()))
//! });
//! let service = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(30)))
//!     .service(slow);
//! let err = service.oneshot(Request::new(Body::empty())).await.unwrap_err();
//! assert_eq!(Error::kind_of(&*err), ErrorKind::GatewayTimeout);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use gateway_core::time::Deadline;
use gateway_core::{BoxError, Error, ErrorKind};
use http::Request;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Bounds requests to a total time; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct TimeoutLayer {
    total: Duration,
}

/// The service of a [`TimeoutLayer`].
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    total: Duration,
}

pin_project! {
    /// The response future of [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        total: Duration,
    }
}

/// The request took longer than its total time.
#[derive(Debug)]
struct TimedOut(Duration);

// === impl TimeoutLayer ===

impl TimeoutLayer {
    /// Requests end after `total`, whatever they wait for.
    pub const fn new(total: Duration) -> Self {
        Self { total }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            total: self.total,
        }
    }
}

// === impl Timeout ===

impl<S, B> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut at = gateway_core::time::deadline(Instant::now(), self.total);
        match req.extensions().get::<Deadline>() {
            Some(outer) if outer.at() <= at => at = outer.at(),
            _ => {
                req.extensions_mut().insert(Deadline::new(at));
            }
        }
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep_until(at),
            total: self.total,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        ready!(this.sleep.poll(cx));
        let err = Error::with_source(ErrorKind::GatewayTimeout, TimedOut(*this.total));
        Poll::Ready(Err(err.into()))
    }
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the route did not answer within its total time of {:?}",
            self.0
        )
    }
}

impl std::error::Error for TimedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::Body;
    use http::Response;
    use tower::{ServiceExt, service_fn};

    #[tokio::test(start_paused = true)]
    async fn an_earlier_outer_deadline_stays() {
        let seen = service_fn(|req: Request<Body>| async move {
            let at = req.extensions().get::<Deadline>().unwrap().at();
            Ok::<_, BoxError>(Response::new(Body::from(format!(
                "{:?}",
                at - Instant::now()
            ))))
        });
        let inner = TimeoutLayer::new(Duration::from_secs(30)).layer(seen);
        let outer = TimeoutLayer::new(Duration::from_secs(5)).layer(inner.clone());
        let body = |res: Response<Body>| async move {
            String::from_utf8(res.into_body().collect_bytes().await.unwrap().to_vec()).unwrap()
        };
        let res = outer.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(body(res).await, "5s");
        let res = inner.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(body(res).await, "30s");
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_with_a_gateway_timeout() {
        let never = service_fn(|_: Request<Body>| {
            std::future::pending::<Result<Response<Body>, BoxError>>()
        });
        let started = Instant::now();
        let err = TimeoutLayer::new(Duration::from_secs(3))
            .layer(never)
            .oneshot(Request::new(Body::empty()))
            .await
            .unwrap_err();
        assert_eq!(Error::kind_of(&*err), ErrorKind::GatewayTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
