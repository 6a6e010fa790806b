use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use gateway_core::classify::{self, Class};
use gateway_core::{Body, BoxError, Drain, Error, ErrorKind};
use http::header::{CONNECTION, HeaderValue, UPGRADE, VIA};
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::client::{Sending, Sent};
use super::exchange::Upgraded;
use super::headers;
use super::service::Shared;
use crate::server::OnUpgrade;
use crate::upstream::Selected;

pin_project! {
    /// Response future of [`ReverseProxy`](super::ReverseProxy).
    pub struct ResponseFuture {
        #[pin]
        timeout: Option<Sleep>,
        state: State,
    }
}

enum State {
    Waiting {
        fut: Sending,
        shared: Arc<Shared>,
        selected: Selected,
        is_head: bool,
        upgrade: Option<(OnUpgrade, Option<Drain>)>,
    },
    Failed(Option<Error>),
    Done,
}

impl ResponseFuture {
    pub(super) fn new(
        fut: Sending,
        shared: Arc<Shared>,
        selected: Selected,
        is_head: bool,
        upgrade: Option<(OnUpgrade, Option<Drain>)>,
    ) -> Self {
        Self {
            // From the selection's clock reading: one clock read fewer per request.
            timeout: shared
                .response_header_timeout
                .map(|timeout| tokio::time::sleep_until(selected.started() + timeout)),
            state: State::Waiting {
                fut,
                shared,
                selected,
                is_head,
                upgrade,
            },
        }
    }

    pub(super) const fn failed(err: Error) -> Self {
        Self {
            timeout: None,
            state: State::Failed(Some(err)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let State::Waiting { fut, .. } = this.state else {
            return Poll::Ready(match std::mem::replace(this.state, State::Done) {
                State::Failed(Some(err)) => Err(err.into()),
                _ => Err(Error::new(ErrorKind::Internal).into()),
            });
        };
        let result = match Pin::new(fut).poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                if let Some(timeout) = this.timeout.as_pin_mut() {
                    ready!(timeout.poll(cx));
                    if let State::Waiting { selected, .. } =
                        std::mem::replace(this.state, State::Done)
                    {
                        selected.record(Class::Failure);
                    }
                    return Poll::Ready(Err(Error::new(ErrorKind::GatewayTimeout).into()));
                }
                return Poll::Pending;
            }
        };
        let State::Waiting {
            shared,
            selected,
            is_head,
            upgrade,
            ..
        } = std::mem::replace(this.state, State::Done)
        else {
            unreachable!("matched as Waiting above")
        };
        let outcome = match result {
            Ok(Sent {
                response,
                stripped,
                upgraded,
            }) => respond(response, stripped, upgraded, &shared, is_head, upgrade),
            Err(err) => Err(err.into()),
        };
        selected.record(classify::result(&outcome));
        // The request stays in flight on its endpoint until the response body ends.
        Poll::Ready(outcome.map(|res| res.map(|body| body.with_guard(selected))))
    }
}

/// Turns the upstream's response into the client's: header rules, body idle timeout, and
/// the tunnel when the upstream switched protocols.
fn respond(
    mut res: Response<Body>,
    stripped: bool,
    upgraded: Option<Upgraded>,
    shared: &Shared,
    is_head: bool,
    upgrade: Option<(OnUpgrade, Option<Drain>)>,
) -> Result<Response<Body>, BoxError> {
    let status = res.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // NOTE: only a 101 answering an upgrade the client asked for becomes a tunnel.
        let (Some((client, drain)), Some(upstream)) = (upgrade, upgraded) else {
            return Err(
                Error::with_source(ErrorKind::BadGateway, "unsolicited 101 from upstream").into(),
            );
        };
        let protocol = res.headers().get(UPGRADE).cloned();
        headers::strip_response(res.headers_mut(), true);
        if let Some(protocol) = protocol {
            res.headers_mut().insert(UPGRADE, protocol);
        }
        res.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        let tunnel = tunnel(client, upstream);
        match drain {
            Some(drain) => drop(drain.spawn(tunnel)),
            None => drop(tokio::spawn(tunnel)),
        }
        return Ok(res);
    }
    if !stripped {
        let keep_length = is_head || status == StatusCode::NOT_MODIFIED;
        headers::strip_response(res.headers_mut(), keep_length);
    }
    if let Some(via) = shared.via_response(res.version()) {
        res.headers_mut().append(VIA, via.clone());
    }
    Ok(match shared.body_idle_timeout {
        Some(idle) => res.map(|body| body.idle_timeout(idle)),
        None => res,
    })
}

/// Copies bytes both ways between the client's upgraded connection and the upstream's.
async fn tunnel(client: OnUpgrade, mut upstream: Upgraded) {
    let mut client = match client.await {
        Ok(client) => client,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::trace!(up, down, "tunnel closed"),
        Err(err) => tracing::debug!(error = %err, "tunnel failed"),
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
