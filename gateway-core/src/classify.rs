//! One judgement of upstream outcomes, shared by retries, circuit breakers, passive health
//! checks and metrics, so they never disagree about what a failure is.
//!
//! | outcome                                        | class                     |
//! |------------------------------------------------|---------------------------|
//! | 1xx–4xx response                               | [`Class::Success`]        |
//! | 502, 503, 504 response                         | [`Class::Retryable`]      |
//! | other 5xx response                             | [`Class::Failure`]        |
//! | error before the request left the gateway: `UpstreamConnect`, `CircuitOpen`, `NoHealthyUpstream`, `Overloaded` | [`Class::Retryable`] |
//! | error of a 4xx kind: the client's side broke the exchange (its body aborted, malformed or stalled: `BadRequest`, `RequestTimeout`, `PayloadTooLarge`, ...) | [`Class::Client`] |
//! | any other error (timeout, reset after sending, protocol) | [`Class::Failure`] |
//!
//! A 4xx response is the client's problem, not the upstream's, so it counts as a success
//! for health and breaking. An *error* of a 4xx kind says nothing about the upstream at all
//! (the exchange broke on the client's side before the upstream could answer), so it is
//! [`Class::Client`]: neither a success nor a failure. Were it a failure, any client could
//! get healthy endpoints ejected by aborting its uploads.
//!
//! Whether a `Retryable` outcome is actually retried (method idempotency, budgets) is the
//! retry policy's decision; `Failure` means "the upstream may have acted on the request".

use http::{Response, StatusCode};

use crate::{BoxError, Error, ErrorKind};

/// The class of an upstream outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// The upstream did its job.
    Success,
    /// The upstream failed, and the request may have had effects.
    Failure,
    /// The upstream failed in a way that is safe to try again elsewhere.
    Retryable,
    /// The client's side broke the exchange (its request body aborted, malformed or too
    /// slow, its connection gone). It says nothing about the upstream: passive health,
    /// balancer latency and breakers leave it out, and it is never retried.
    Client,
}

impl Class {
    /// Whether the outcome is a failure of the upstream, retryable or not.
    pub const fn is_failure(self) -> bool {
        matches!(self, Self::Failure | Self::Retryable)
    }

    /// Whether the outcome says something about the upstream (anything but
    /// [`Class::Client`]).
    pub const fn is_upstream(self) -> bool {
        !matches!(self, Self::Client)
    }
}

/// Classifies a response status.
pub const fn status(status: StatusCode) -> Class {
    match status.as_u16() {
        502..=504 => Class::Retryable,
        500..=599 => Class::Failure,
        _ => Class::Success,
    }
}

/// Classifies a response.
pub fn response<B>(res: &Response<B>) -> Class {
    status(res.status())
}

/// Classifies an error from the upstream path, by its [`ErrorKind`].
pub fn error(err: &BoxError) -> Class {
    match Error::kind_of(&**err) {
        ErrorKind::UpstreamConnect
        | ErrorKind::CircuitOpen
        | ErrorKind::NoHealthyUpstream
        | ErrorKind::Overloaded => Class::Retryable,
        kind if kind.status().is_client_error() => Class::Client,
        _ => Class::Failure,
    }
}

/// Whether `err` says the upstream's connection closed or reset under the request before
/// its response came (an `io::Error` of such a kind anywhere in its `source()` chain):
/// what a retry policy's "reset" condition means.
pub fn is_reset(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| is_reset_kind(io.kind()))
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Whether an I/O error of `kind` means the peer closed or reset the connection.
pub const fn is_reset_kind(kind: std::io::ErrorKind) -> bool {
    matches!(
        kind,
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    )
}

/// Classifies the result of a call to the upstream path.
pub fn result<B>(res: &Result<Response<B>, BoxError>) -> Class {
    match res {
        Ok(res) => response(res),
        Err(err) => error(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for (code, class) in [
            (200, Class::Success),
            (304, Class::Success),
            (404, Class::Success),
            (429, Class::Success),
            (500, Class::Failure),
            (501, Class::Failure),
            (502, Class::Retryable),
            (503, Class::Retryable),
            (504, Class::Retryable),
            (505, Class::Failure),
        ] {
            assert_eq!(status(StatusCode::from_u16(code).unwrap()), class, "{code}");
        }
    }

    #[test]
    fn errors() {
        let e = |k| -> BoxError { Error::new(k).into() };
        assert_eq!(error(&e(ErrorKind::UpstreamConnect)), Class::Retryable);
        assert_eq!(error(&e(ErrorKind::CircuitOpen)), Class::Retryable);
        assert_eq!(error(&e(ErrorKind::BadGateway)), Class::Failure);
        assert_eq!(error(&e(ErrorKind::GatewayTimeout)), Class::Failure);
        assert_eq!(
            error(&tower::timeout::error::Elapsed::new().into()),
            Class::Failure
        );
        assert_eq!(error(&"boom".into()), Class::Failure);
        // The client's side broke the exchange: nothing is said of the upstream.
        for kind in [ErrorKind::BadRequest, ErrorKind::RequestTimeout] {
            let wrapped: BoxError = Error::with_source(ErrorKind::BadGateway, e(kind)).into();
            assert_eq!(error(&e(kind)), Class::Client, "{kind:?}");
            // Wrapped in a gateway error of another kind, the outer kind decides.
            assert_eq!(error(&wrapped), Class::Failure);
        }
        assert!(!Class::Client.is_failure() && !Class::Client.is_upstream());
        let ok: Result<Response<()>, BoxError> = Ok(Response::new(()));
        assert_eq!(result(&ok), Class::Success);
        assert!(!Class::Success.is_failure());
        assert!(Class::Retryable.is_failure());
    }

    #[test]
    fn resets_are_found_in_the_chain() {
        use std::io;
        let reset = |kind| -> BoxError {
            Error::with_source(ErrorKind::BadGateway, io::Error::from(kind)).into()
        };
        assert!(is_reset(&*reset(io::ErrorKind::ConnectionReset)));
        assert!(is_reset(&*reset(io::ErrorKind::UnexpectedEof)));
        assert!(!is_reset(&*reset(io::ErrorKind::InvalidData)));
        assert!(!is_reset(&*e_plain()));
    }

    fn e_plain() -> BoxError {
        Error::new(ErrorKind::BadGateway).into()
    }
}
