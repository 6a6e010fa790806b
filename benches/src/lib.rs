//! Shared helpers for the gateway benches.
//!
//! The micro benches drive services whose futures complete on their first poll, so they are
//! polled directly with a no-op waker: no runtime is measured, only the layer.

#![forbid(unsafe_code)]

pub mod conformance;
pub mod process;

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use gateway_core::Body;
use http::{Request, Response};
use tower::{Service, service_fn};

/// A service that answers every request at once with an empty 200: what the layers under
/// measurement wrap.
pub fn ok_service()
-> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    service_fn(|_: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Body::empty())))
    })
}

/// Polls `fut` once and returns its output.
///
/// # Panics
///
/// If the future is not ready on its first poll (the bench set-up is wrong).
pub fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("bench future was not ready on its first poll"),
    }
}

/// The value of the command-line option `parser` just returned, as UTF-8 (for the bench
/// binaries' argument parsing).
///
/// # Errors
///
/// If the option has no value or it is not UTF-8.
pub fn arg_value(parser: &mut lexopt::Parser) -> Result<String, String> {
    parser
        .value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|_| "arguments must be UTF-8".to_owned())
}
