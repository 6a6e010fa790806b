//! Routes the gateway answers itself, with no upstream: a fixed response ([`Respond`]: a
//! health endpoint, a maintenance page, a `410 Gone`) and a redirect ([`Redirect`], tower-http's).
//!
//! ```
//! use gateway_proxy::respond::{Redirect, Respond};
//! use gateway_proxy::{Route, Router};
//! use http::{StatusCode, Uri};
//!
//! let router = Router::new()
//!     .route(
//!         Route::exact("/healthz"),
//!         Respond::new(StatusCode::OK).text("ok\n"),
//!     )
//!     .route(
//!         Route::prefix("/old"),
//!         Redirect::permanent(Uri::from_static("/api")),
//!     );
//! # let _ = router;
//! ```

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::Body;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use tower::Service;

/// tower-http's redirect service: every request gets the status and the `Location`.
pub type Redirect = tower_http::services::Redirect<Body>;

/// Answers every request with the same response.
///
/// The body is shared (`Bytes`), so an answer costs the response head and a reference count.
/// Framing (`Content-Length`) is the server's; a `HEAD` gets the head alone.
#[derive(Clone, Debug)]
pub struct Respond {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Respond {
    /// An empty response with `status`.
    pub fn new(status: StatusCode) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header (a second value of a name is appended, not replaced).
    #[must_use]
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The body, as is; set its `Content-Type` with [`header`](Self::header).
    #[must_use]
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// A `text/plain; charset=utf-8` body.
    #[must_use]
    pub fn text(self, text: impl Into<Bytes>) -> Self {
        self.header(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )
        .body(text)
    }
}

impl<B> Service<Request<B>> for Respond {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        let mut res = Response::new(Body::from(self.body.clone()));
        *res.status_mut() = self.status;
        res.headers_mut().clone_from(&self.headers);
        ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn answers_with_what_it_was_given() {
        let respond = Respond::new(StatusCode::GONE)
            .header(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("1"),
            )
            .header(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("2"),
            )
            .text("gone\n");
        for _ in 0..2 {
            let res = respond
                .clone()
                .oneshot(Request::new(Body::empty()))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::GONE);
            let values: Vec<_> = res.headers().get_all("x-a").iter().collect();
            assert_eq!(values, ["1", "2"]);
            assert_eq!(res.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "gone\n");
        }
    }
}
