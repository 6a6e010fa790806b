use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::classify::{self, Class};
use gateway_core::{Body, BoxError, Drain, Error, ErrorKind};
use http::header::{CONNECTION, HeaderValue, UPGRADE, VIA};
use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::headers;
use super::service::Shared;
use crate::task::register;
use crate::upgrade::OnUpgrade;
use crate::upstream::Selected;
use crate::upstream::{SendError, Sending, Sent, Upgraded};
use gateway_core::time::deadline;

pin_project! {
    /// Response future of [`ReverseProxy`](super::ReverseProxy).
    pub struct ResponseFuture {
        // The response-header timer: armed once the whole request has been sent.
        #[pin]
        timeout: Option<Sleep>,
        upload: Upload,
        state: State,
    }
}

/// How a request body that streams from the client went out: when it was all sent (its
/// last frame taken, or the body dropped), and whether it failed.
///
/// NOTE: the response-header timeout counts from the end of the upload, not from the
/// endpoint's selection: a client's slow upload is not the upstream's slowness, and must
/// neither time out a healthy upstream nor count against it. A failed upload (aborted,
/// malformed, stalled) is the client's doing, whatever error the exchange then saw: it
/// is recorded as [`Class::Client`].
#[derive(Debug, Default)]
pub(super) struct Uploaded {
    state: Mutex<UploadState>,
}

/// Where the request's body is, for the response-header timer and the outcome's class.
enum Upload {
    /// In memory, written with the head: the timer runs from the endpoint's selection.
    InMemory,
    /// Streaming from the client: the timer waits for its end.
    Streaming(Arc<Uploaded>),
    /// All sent (or failed): the timer runs.
    Sent { failed: bool },
}

#[derive(Debug, Default)]
struct UploadState {
    at: Option<Instant>,
    failed: bool,
    waiter: Option<Waker>,
}

pin_project! {
    /// A request body streaming from the client, reporting to its [`Uploaded`].
    pub(super) struct UploadBody {
        #[pin]
        inner: Body,
        uploaded: Arc<Uploaded>,
    }

    impl PinnedDrop for UploadBody {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its end: the exchange is done with it.
            this.uploaded.finish(false);
        }
    }
}

enum State {
    Waiting {
        fut: Sending,
        shared: Arc<Shared>,
        selected: Selected,
        is_head: bool,
        upgrade: Option<(OnUpgrade, Option<Drain>)>,
        /// Other endpoints left to try if the connection cannot be opened.
        connect_retries: u8,
    },
    Failed(Option<Error>),
    Done,
}

impl ResponseFuture {
    /// `streaming`: the request's body streams, and the response-header timer starts when
    /// it has all been sent; otherwise (a body in memory, written with the head) the
    /// timer starts at the endpoint's selection.
    pub(super) fn new(
        fut: Sending,
        shared: Arc<Shared>,
        selected: Selected,
        is_head: bool,
        upgrade: Option<(OnUpgrade, Option<Drain>)>,
        streaming: Option<Arc<Uploaded>>,
    ) -> Self {
        let (timeout, upload) = match streaming {
            Some(uploaded) => (None, Upload::Streaming(uploaded)),
            // From the selection's clock reading: one clock read fewer per request.
            None => (header_timer(&shared, selected.started()), Upload::InMemory),
        };
        Self {
            timeout,
            upload,
            state: State::Waiting {
                connect_retries: shared.connect_retries,
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
            upload: Upload::InMemory,
            state: State::Failed(Some(err)),
        }
    }
}

/// The response-header timer for a request sent at `sent`; none without a timeout.
fn header_timer(shared: &Shared, sent: Instant) -> Option<Sleep> {
    Some(tokio::time::sleep_until(deadline(
        sent,
        shared.response_header_timeout?,
    )))
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut timeout = this.timeout;
        let State::Waiting {
            fut,
            selected,
            shared,
            connect_retries,
            ..
        } = this.state
        else {
            return Poll::Ready(match std::mem::replace(this.state, State::Done) {
                State::Failed(Some(err)) => Err(err.into()),
                _ => Err(Error::new(ErrorKind::Internal).into()),
            });
        };
        let result = match fut.poll_send(cx) {
            Poll::Ready(Err(SendError {
                error,
                unsent: Some(unsent),
            })) if *connect_retries > 0 => {
                // Nothing was sent: the request goes to another endpoint as it is.
                *connect_retries -= 1;
                selected.record(Class::Retryable);
                let (req, out) = *unsent;
                match shared.fail_over(selected.endpoint(), req) {
                    Some((next, req)) => {
                        tracing::debug!(
                            %error,
                            failed = %selected.endpoint().authority(),
                            next = %next.endpoint().authority(),
                            "upstream connection failed; sending the request to another endpoint"
                        );
                        *fut = shared.client.send(next.endpoint(), req, out);
                        if matches!(this.upload, Upload::InMemory) {
                            timeout.set(header_timer(shared, next.started()));
                        }
                        // NOTE: the failed endpoint was recorded above; dropping it ends
                        // its count of requests in flight.
                        *selected = next;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    None => {
                        // NOTE: recorded above; the endpoint the error happened at.
                        let at = selected.endpoint().authority().clone();
                        *this.state = State::Done;
                        return Poll::Ready(Err(error.at_upstream(at).into()));
                    }
                }
            }
            Poll::Ready(result) => result.map_err(|failed| failed.error),
            Poll::Pending => {
                if let Upload::Streaming(uploaded) = this.upload {
                    // The timer starts once the body is all sent.
                    let Some((at, failed)) = uploaded.poll_sent(cx) else {
                        return Poll::Pending;
                    };
                    *this.upload = Upload::Sent { failed };
                    selected.request_sent(at);
                    timeout.set(header_timer(shared, at));
                }
                if let Some(timeout) = timeout.as_pin_mut() {
                    ready!(timeout.poll(cx));
                    let mut err = Error::new(ErrorKind::GatewayTimeout);
                    if let State::Waiting { selected, .. } =
                        std::mem::replace(this.state, State::Done)
                    {
                        selected.record(Class::Failure);
                        err = err.at_upstream(selected.endpoint().authority().clone());
                    }
                    return Poll::Ready(Err(err.into()));
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
        let class = match &outcome {
            Err(_) if this.upload.failed() => Class::Client,
            outcome => classify::result(outcome),
        };
        selected.record(class);
        // A failure's log line names the endpoint; the request stays in flight on its
        // endpoint until the response body ends.
        Poll::Ready(match outcome {
            Ok(res) => Ok(res.map(|body| body.with_guard(selected))),
            Err(err) => Err(Error::from_box(err)
                .at_upstream(selected.endpoint().authority().clone())
                .into()),
        })
    }
}

// === impl Uploaded ===

impl Uploaded {
    /// When the body was all sent and whether it failed, once it is over; until then `cx`
    /// is woken when it is.
    fn poll_sent(&self, cx: &Context<'_>) -> Option<(Instant, bool)> {
        let mut state = self.lock();
        if state.at.is_none() {
            register(&mut state.waiter, cx);
        }
        state.at.map(|at| (at, state.failed))
    }

    /// Whether the body failed (on the client's side) before its end.
    fn failed(&self) -> bool {
        self.lock().failed
    }

    /// The body ended (or `failed`); the first call counts.
    fn finish(&self, failed: bool) {
        let waiter = {
            let mut state = self.lock();
            if state.at.is_some() {
                return;
            }
            state.at = Some(Instant::now());
            state.failed = failed;
            state.waiter.take()
        };
        if let Some(waker) = waiter {
            waker.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UploadState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Upload ===

impl Upload {
    /// Whether the request's body failed on the client's side (so far).
    fn failed(&self) -> bool {
        match self {
            Self::InMemory => false,
            Self::Streaming(uploaded) => uploaded.failed(),
            Self::Sent { failed } => *failed,
        }
    }
}

// === impl UploadBody ===

impl UploadBody {
    pub(super) fn new(inner: Body) -> (Self, Arc<Uploaded>) {
        let uploaded = Arc::new(Uploaded::default());
        let body = Self {
            inner,
            uploaded: Arc::clone(&uploaded),
        };
        (body, uploaded)
    }
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        match &polled {
            None => this.uploaded.finish(false),
            Some(Err(_)) => this.uploaded.finish(true),
            Some(Ok(_)) => {}
        }
        Poll::Ready(polled.map(|frame| {
            frame.map_err(|err| {
                // The client's body failed: its kind if it has one (a stall is 408), 400
                // otherwise (an HTTP/2 client reset its stream), never the upstream's 502.
                match Error::kind_of(&*err) {
                    ErrorKind::Internal => Error::with_source(ErrorKind::BadRequest, err).into(),
                    _ => err,
                }
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
        let tunnel = tunnel(client, upstream, shared.tunnel_idle_timeout);
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

/// Copies bytes both ways between the client's upgraded connection and the upstream's,
/// closing both once neither has sent anything for `idle`.
async fn tunnel(client: OnUpgrade, mut upstream: Upgraded, idle: Option<Duration>) {
    let mut client = match client.await {
        Ok(client) => client,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return;
        }
    };
    let base = Instant::now();
    // Milliseconds since `base` of the last bytes read from either side.
    let last = AtomicU64::new(0);
    let copied = {
        let mut client = Active {
            io: &mut client,
            base,
            last: &last,
        };
        let mut upstream = Active {
            io: &mut upstream,
            base,
            last: &last,
        };
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        match idle {
            None => Some(copy.await),
            Some(idle) => {
                let mut copy = std::pin::pin!(copy);
                loop {
                    let quiet_since = base + Duration::from_millis(last.load(Ordering::Relaxed));
                    let due = deadline(quiet_since, idle);
                    if due <= Instant::now() {
                        break None;
                    }
                    tokio::select! {
                        copied = &mut copy => break Some(copied),
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
            }
        }
    };
    match copied {
        Some(Ok((up, down))) => tracing::trace!(up, down, "tunnel closed"),
        Some(Err(err)) => tracing::debug!(error = %err, "tunnel failed"),
        None => tracing::debug!(?idle, "tunnel idle; closing it"),
    }
}

/// One side of a tunnel, noting when it last had bytes to read.
struct Active<'a, I> {
    io: &'a mut I,
    base: Instant,
    last: &'a AtomicU64,
}

impl<I: AsyncRead + Unpin> AsyncRead for Active<'_, I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let ms = u64::try_from(this.base.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.last.store(ms, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Active<'_, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
