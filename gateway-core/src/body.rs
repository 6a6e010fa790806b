//! The one response body type used at every boundary the gateway owns.

use std::any::Any;
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::BoxError;
use crate::error::{Error, ErrorKind};

/// A streaming HTTP body.
///
/// `Body` is what every gateway layer returns and what the proxy sends upstream. It is a
/// newtype so its inside can change, but its cost model is part of the contract:
///
/// - [`Body::empty`] and [`Body::from`] on `Bytes`/`&'static str` never allocate for the
///   body itself;
/// - a [`hyper::body::Incoming`] (a client's request body, an upstream's response body) is
///   held as it is and streamed frame by frame, never copied or buffered;
/// - any other [`http_body::Body`] is boxed once.
///
/// [`Body::new`] recognises `Body` and `Incoming` at run time, so generic code can wrap
/// whatever it is handed without paying for a box in the common case.
pub struct Body {
    kind: Kind,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    /// A complete body (empty, or one piece of bytes) with a guard: no box for the body.
    Guarded {
        bytes: Option<Bytes>,
        guard: Option<Box<dyn Send>>,
    },
    Incoming {
        body: Incoming,
        extras: Extras,
    },
    Boxed {
        body: UnsyncBoxBody<Bytes, BoxError>,
        extras: Extras,
    },
}

/// What a streaming body may carry besides its frames, applied after each poll.
#[derive(Default)]
struct Extras {
    idle: Option<IdleTimer>,
    /// Kept alive until the body ends (see [`Body::with_guard`]).
    guard: Option<Box<dyn Send>>,
}

/// A per-body idle timer; the `Sleep` is created lazily, the first time the body has to
/// wait, so bodies that are already complete never allocate one.
struct IdleTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

/// The error a body yields when no frame arrived within its idle timeout.
#[derive(Debug)]
pub struct BodyIdleTimeout {
    timeout: Duration,
}

// === impl Body ===

impl Body {
    /// Wraps any body whose data is `Bytes`.
    ///
    /// A `Body` is returned unchanged and an `Incoming` is stored without boxing.
    pub fn new<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut slot = Some(body);
        if let Some(slot) = (&mut slot as &mut dyn Any).downcast_mut::<Option<Body>>() {
            // NOTE: `slot` is `Some`: it was filled two lines above.
            return slot.take().unwrap_or_default();
        }
        if let Some(slot) = (&mut slot as &mut dyn Any).downcast_mut::<Option<Incoming>>()
            && let Some(incoming) = slot.take()
        {
            return Self::from(incoming);
        }
        match slot {
            Some(body) => Self::boxed(body.map_err(Into::into).boxed_unsync()),
            None => Self::empty(),
        }
    }

    /// An empty body.
    pub const fn empty() -> Self {
        Self { kind: Kind::Empty }
    }

    /// A body made of one chunk of bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::from(bytes.into())
    }

    /// Whether the whole body is in memory (empty, or one piece of bytes): reading it
    /// never waits for anyone.
    pub const fn is_complete(&self) -> bool {
        matches!(
            self.kind,
            Kind::Empty | Kind::Full(_) | Kind::Guarded { .. }
        )
    }

    /// A copy of a body that is all in memory ([`is_complete`](Self::is_complete)): its
    /// bytes, shared (a guard stays with the original); `None` for a body that streams.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            Kind::Empty => Some(Self::empty()),
            Kind::Full(bytes) | Kind::Guarded { bytes, .. } => Some(Self {
                kind: Kind::Full(bytes.clone()),
            }),
            Kind::Incoming { .. } | Kind::Boxed { .. } => None,
        }
    }

    /// Fails the body with [`BodyIdleTimeout`] when no frame arrives for `timeout`.
    ///
    /// Applies to streaming bodies; empty and full bodies are complete already and are
    /// returned unchanged. The timer is armed only while the body is actually waiting.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        if let Some(extras) = self.extras_mut() {
            extras.idle = Some(IdleTimer::new(timeout));
        }
        self
    }

    /// Keeps `guard` alive until the body ends (its last frame or an error) or is dropped,
    /// whichever comes first: for state that lasts as long as a response streams, such as
    /// an upstream endpoint's count of requests in flight.
    ///
    /// The guard is boxed; the body itself stays as it is (empty, full, `Incoming` or
    /// boxed).
    pub fn with_guard(mut self, guard: impl Send + 'static) -> Self {
        let slot = match &mut self.kind {
            Kind::Empty => {
                self.kind = Kind::Guarded {
                    bytes: None,
                    guard: None,
                };
                return self.with_guard(guard);
            }
            Kind::Full(bytes) => {
                self.kind = Kind::Guarded {
                    bytes: bytes.take(),
                    guard: None,
                };
                return self.with_guard(guard);
            }
            Kind::Guarded { guard: slot, .. } => slot,
            Kind::Incoming { extras, .. } | Kind::Boxed { extras, .. } => &mut extras.guard,
        };
        // A second guard joins the first rather than releasing it early.
        *slot = Some(match slot.take() {
            Some(earlier) => Box::new((earlier, guard)),
            None => Box::new(guard),
        });
        self
    }

    const fn boxed(body: UnsyncBoxBody<Bytes, BoxError>) -> Self {
        Self {
            kind: Kind::Boxed {
                body,
                extras: Extras {
                    idle: None,
                    guard: None,
                },
            },
        }
    }

    /// The extras of a streaming body; complete bodies have none.
    fn extras_mut(&mut self) -> Option<&mut Extras> {
        match &mut self.kind {
            Kind::Empty | Kind::Full(_) | Kind::Guarded { .. } => None,
            Kind::Incoming { extras, .. } | Kind::Boxed { extras, .. } => Some(extras),
        }
    }

    /// Collects the whole body into one `Bytes`.
    ///
    /// Meant for tests and for small bodies whose size is bounded by the caller; the proxy
    /// path never calls it.
    ///
    /// # Errors
    ///
    /// Fails with the body's own error.
    pub async fn collect_bytes(self) -> Result<Bytes, BoxError> {
        Ok(self.collect().await?.to_bytes())
    }
}

impl Default for Body {
    fn default() -> Self {
        Self::empty()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Empty => "empty",
            Kind::Full(_) => "full",
            Kind::Guarded { .. } => "guarded",
            Kind::Incoming { .. } => "incoming",
            Kind::Boxed { .. } => "boxed",
        };
        f.debug_tuple("Body").field(&kind).finish()
    }
}

impl From<Incoming> for Body {
    fn from(body: Incoming) -> Self {
        Self {
            kind: Kind::Incoming {
                body,
                extras: Extras::default(),
            },
        }
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            Self::empty()
        } else {
            Self {
                kind: Kind::Full(Some(bytes)),
            }
        }
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Self::from(Bytes::from_static(s.as_bytes()))
    }
}

impl From<&'static [u8]> for Body {
    fn from(s: &'static [u8]) -> Self {
        Self::from(Bytes::from_static(s))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Self::from(Bytes::from(s))
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Self::from(Bytes::from(v))
    }
}

impl From<()> for Body {
    fn from((): ()) -> Self {
        Self::empty()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Guarded { bytes, guard } => Poll::Ready(match bytes.take() {
                Some(bytes) => Some(Ok(Frame::data(bytes))),
                None => {
                    drop(guard.take());
                    None
                }
            }),
            Kind::Incoming { body, extras } => {
                let polled = Pin::new(body)
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(Into::into)));
                extras.after_poll(cx, polled)
            }
            Kind::Boxed { body, extras } => {
                let polled = Pin::new(body).poll_frame(cx);
                extras.after_poll(cx, polled)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(bytes) | Kind::Guarded { bytes, .. } => bytes.is_none(),
            Kind::Incoming { body, .. } => body.is_end_stream(),
            Kind::Boxed { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) | Kind::Guarded { bytes, .. } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Incoming { body, .. } => body.size_hint(),
            Kind::Boxed { body, .. } => body.size_hint(),
        }
    }
}

// === impl IdleTimer ===

impl IdleTimer {
    const fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: None,
            armed: false,
        }
    }

    /// Passes a ready frame through (disarming the timer) or, while the body waits, polls
    /// the timer and fails the body once it fires.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<Option<Result<T, BoxError>>>,
    ) -> Poll<Option<Result<T, BoxError>>> {
        if polled.is_ready() {
            // The next wait starts a fresh window.
            self.armed = false;
            return polled;
        }
        let deadline = crate::time::deadline(Instant::now(), self.timeout);
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if !self.armed {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        ready!(sleep.as_mut().poll(cx));
        let timeout = self.timeout;
        Poll::Ready(Some(Err(Error::with_source(
            ErrorKind::RequestTimeout,
            BodyIdleTimeout { timeout },
        )
        .into())))
    }
}

// === impl Extras ===

impl Extras {
    /// Applies the idle timer to a poll's result and releases the guard at the body's end
    /// (no more frames, or an error).
    fn after_poll(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<Option<Result<Frame<Bytes>, BoxError>>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.idle {
            Some(idle) => idle.check(cx, polled),
            None => polled,
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            drop(self.guard.take());
        }
        polled
    }
}

// === impl BodyIdleTimeout ===

impl BodyIdleTimeout {
    /// The idle timeout that elapsed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for BodyIdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no body data for {:?}", self.timeout)
    }
}

impl std::error::Error for BodyIdleTimeout {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::Full;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn body_is_returned_unchanged_by_new() {
        let b = Body::new(Body::from("abc"));
        assert!(matches!(b.kind, Kind::Full(Some(_))));
        let b = Body::new(Body::empty());
        assert!(matches!(b.kind, Kind::Empty));
    }

    #[test]
    fn other_bodies_are_boxed_once() {
        let b = Body::new(Full::new(Bytes::from_static(b"x")));
        assert!(matches!(b.kind, Kind::Boxed { .. }));
        assert_eq!(b.size_hint().exact(), Some(1));
    }

    #[test]
    fn empty_bytes_become_empty() {
        let b = Body::from(Bytes::new());
        assert!(b.is_end_stream());
        assert_eq!(b.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn a_guard_lives_until_the_body_ends() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let released = Arc::new(AtomicBool::new(false));
        let (tx, body) = ChannelBody::new();
        let mut body = Body::new(body).with_guard(Flag(Arc::clone(&released)));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(frame.is_some());
        assert!(!released.load(Ordering::SeqCst), "still streaming");
        drop(tx);
        assert!(
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .await
                .is_none()
        );
        assert!(
            released.load(Ordering::SeqCst),
            "released at the end, not at drop"
        );
        drop(body);

        // Dropping a body half-read releases it too.
        let released = Arc::new(AtomicBool::new(false));
        let body = Body::from("x").with_guard(Flag(Arc::clone(&released)));
        assert!(!released.load(Ordering::SeqCst));
        drop(body);
        assert!(released.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_second_guard_joins_the_first() {
        let (first, second) = (Arc::new(()), Arc::new(()));
        let body = Body::new(Full::new(Bytes::from_static(b"x")))
            .with_guard(Arc::clone(&first))
            .with_guard(Arc::clone(&second));
        assert_eq!(
            (Arc::strong_count(&first), Arc::strong_count(&second)),
            (2, 2)
        );
        assert_eq!(body.collect_bytes().await.unwrap(), "x");
        assert_eq!(
            (Arc::strong_count(&first), Arc::strong_count(&second)),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn full_body_yields_once() {
        assert_eq!(Body::from("hello").collect_bytes().await.unwrap(), "hello");
    }

    #[test]
    fn only_bodies_in_memory_are_complete() {
        assert!(Body::empty().is_complete());
        assert!(Body::from("x").is_complete());
        assert!(Body::from("x").with_guard(()).is_complete());
        let (_tx, streaming) = ChannelBody::new();
        assert!(!Body::new(streaming).is_complete());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fails_a_stalled_stream() {
        let (tx, body) = ChannelBody::new();
        let body = Body::new(body).idle_timeout(Duration::from_secs(5));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let err = body.collect_bytes().await.unwrap_err();
        let err = err.downcast_ref::<Error>().expect("gateway error");
        assert_eq!(err.kind(), ErrorKind::RequestTimeout);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_resets_on_every_frame() {
        let (tx, body) = ChannelBody::new();
        let body = Body::new(body).idle_timeout(Duration::from_secs(5));
        let feeder = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tx.send(Bytes::from_static(b"a")).await.unwrap();
            }
        });
        assert_eq!(body.collect_bytes().await.unwrap(), "aaaa");
        feeder.await.unwrap();
    }

    /// A body fed by a channel; ends when the sender is dropped.
    struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

    impl ChannelBody {
        fn new() -> (tokio::sync::mpsc::Sender<Bytes>, Self) {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            (tx, Self(rx))
        }
    }

    impl http_body::Body for ChannelBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }
}
