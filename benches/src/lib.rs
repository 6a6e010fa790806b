//! Shared helpers for the gateway benches.
//!
//! The micro benches drive services whose futures complete on their first poll, so they are
//! polled directly with a no-op waker: no runtime is measured, only the layer.

#![forbid(unsafe_code)]

pub mod conformance;
pub mod process;

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::pin::pin;
use std::process::ExitCode;
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

/// The `main` of a bench binary called `name`: its options from `parse` (`None` for
/// `--help`, which prints `help`; an error exits 2 with `help`), then `run` on a
/// current-thread runtime, whose error is printed as `name: error`.
pub fn bin_main<O, F, E>(
    name: &str,
    help: &str,
    parse: impl FnOnce() -> Result<Option<O>, String>,
    run: impl FnOnce(O) -> F,
) -> ExitCode
where
    F: Future<Output = Result<ExitCode, E>>,
    E: Display,
{
    let opts = match parse() {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{help}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("{name}: {err}\n\n{help}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{name}: no runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(opts)).unwrap_or_else(|err| {
        eprintln!("{name}: {err}");
        ExitCode::FAILURE
    })
}
