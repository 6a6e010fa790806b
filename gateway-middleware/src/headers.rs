//! Header edits: set, append and remove fields of the request (before the inner service
//! sees it) and of the response (before the client does), in one layer and one pass.
//!
//! tower-http's `SetRequestHeader`/`SetResponseHeader` are one layer per field and cannot
//! remove; a route that hides `Server` and `X-Powered-By`, adds HSTS and tags its requests
//! would need five of them. Here a route has one [`EditHeadersLayer`] holding two lists of
//! [`Edits`], applied in the order they were given.
//!
//! Framing and hop-by-hop fields (`Content-Length`, `Transfer-Encoding`, `Connection`, ...)
//! belong to the codec, which writes its own: edits to them have no effect on the wire
//! (the config refuses them).
//!
//! ```
//! use gateway_core::Body;
//! use gateway_middleware::headers::{EditHeadersLayer, Edits};
//! use http::header::{COOKIE, SERVER, STRICT_TRANSPORT_SECURITY};
//! use http::{HeaderValue, Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(
//!         EditHeadersLayer::new()
//!             .request(Edits::new().remove(COOKIE))
//!             .response(
//!                 Edits::new().remove(SERVER).set(
//!                     STRICT_TRANSPORT_SECURITY,
//!                     HeaderValue::from_static("max-age=63072000"),
//!                 ),
//!             ),
//!     )
//!     .service(service_fn(|req: Request<Body>| async move {
//!         assert!(req.headers().get(COOKIE).is_none());
//!         let res = Response::builder().header(SERVER, "origin/1.0");
//!         Ok::<_, std::convert::Infallible>(res.body(Body::empty()).unwrap())
//!     }));
//! let req = Request::builder().header(COOKIE, "session=1").body(Body::empty()).unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert!(res.headers().get(SERVER).is_none());
//! assert_eq!(res.headers()[STRICT_TRANSPORT_SECURITY], "max-age=63072000");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// An ordered list of edits to a header map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Edits {
    edits: Vec<Edit>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Edit {
    Set(HeaderName, HeaderValue),
    Append(HeaderName, HeaderValue),
    Remove(HeaderName),
}

/// Edits the headers of requests and responses; see the [module docs](self).
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct EditHeadersLayer {
    request: Arc<Edits>,
    response: Arc<Edits>,
}

/// The service of [`EditHeadersLayer`].
#[derive(Clone, Debug)]
pub struct EditHeaders<S> {
    inner: S,
    request: Arc<Edits>,
    response: Arc<Edits>,
}

pin_project! {
    /// Response future of [`EditHeaders`]: edits the response's headers.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        edits: Option<Arc<Edits>>,
    }
}

// === impl Edits ===

impl Edits {
    /// No edits.
    pub const fn new() -> Self {
        Self { edits: Vec::new() }
    }

    /// Replaces every value of `name` with `value`.
    pub fn set(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.edits.push(Edit::Set(name, value));
        self
    }

    /// Adds `value` to those of `name`.
    pub fn append(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.edits.push(Edit::Append(name, value));
        self
    }

    /// Removes every value of `name`.
    pub fn remove(mut self, name: HeaderName) -> Self {
        self.edits.push(Edit::Remove(name));
        self
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Applies the edits to `headers`, in order.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for edit in &self.edits {
            match edit {
                Edit::Set(name, value) => {
                    headers.insert(name.clone(), value.clone());
                }
                Edit::Append(name, value) => {
                    headers.append(name.clone(), value.clone());
                }
                Edit::Remove(name) => {
                    headers.remove(name);
                }
            }
        }
    }
}

// === impl EditHeadersLayer ===

impl EditHeadersLayer {
    /// A layer that edits nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The edits made to every request, before the inner service is called.
    pub fn request(mut self, edits: Edits) -> Self {
        self.request = Arc::new(edits);
        self
    }

    /// The edits made to every response of the inner service (not to errors: put the layer
    /// outside a `RescueLayer` to edit problem responses too).
    pub fn response(mut self, edits: Edits) -> Self {
        self.response = Arc::new(edits);
        self
    }
}

impl<S> Layer<S> for EditHeadersLayer {
    type Service = EditHeaders<S>;

    fn layer(&self, inner: S) -> EditHeaders<S> {
        EditHeaders {
            inner,
            request: Arc::clone(&self.request),
            response: Arc::clone(&self.response),
        }
    }
}

// === impl EditHeaders ===

impl<S, ReqB, ResB> Service<Request<ReqB>> for EditHeaders<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        self.request.apply(req.headers_mut());
        ResponseFuture {
            inner: self.inner.call(req),
            edits: (!self.response.is_empty()).then(|| Arc::clone(&self.response)),
        }
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(edits) = this.edits.take() {
            edits.apply(res.headers_mut());
        }
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_apply_in_order() {
        let name = HeaderName::from_static("x-a");
        let v = HeaderValue::from_static;
        let mut headers = HeaderMap::new();
        headers.append(&name, v("old1"));
        headers.append(&name, v("old2"));
        headers.insert("x-b", v("b"));
        Edits::new()
            .set(name.clone(), v("new"))
            .append(name.clone(), v("more"))
            .remove(HeaderName::from_static("x-b"))
            .append(HeaderName::from_static("x-b"), v("again"))
            .apply(&mut headers);
        let a: Vec<_> = headers.get_all(&name).iter().collect();
        assert_eq!(a, ["new", "more"]);
        assert_eq!(headers["x-b"], "again");
        assert_eq!(headers.len(), 3);
    }
}
