//! A request body that can be sent again: the first try streams it from the client while a
//! copy of at most `limit` bytes is kept; later tries replay the copy, then go on with what
//! the client has not sent yet.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gateway_core::{Body, BoxError};
use http::HeaderMap;
use http_body::{Frame, SizeHint};

/// One try's view of a request body shared by every try of the request.
pub(super) struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The frames of the client's body this copy has yielded.
    pos: usize,
    /// The data bytes this copy has yielded.
    yielded: u64,
    /// Whether this copy has yielded the trailers.
    trailers_sent: bool,
}

/// The handle the retry policy keeps, to make copies and to know whether one can replay.
#[derive(Clone)]
pub(super) struct Replay {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    /// Copies of the data frames read so far, while they fit under `limit`.
    chunks: Vec<Bytes>,
    buffered: usize,
    limit: usize,
    /// More than `limit` bytes went by: the copy was let go and no new try can replay.
    overflowed: bool,
    /// Frames taken from the client's body (data and trailers), by any copy.
    taken: usize,
    /// The rest of the client's body; `None` once it ended or failed.
    rest: Option<Body>,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// The client's body failed: no try can have it whole.
    failed: bool,
    /// The body's length, when it was known from the start.
    len: Option<u64>,
}

/// Why a copy cannot go on: what it needs was let go (over the limit) or never came.
#[derive(Debug)]
pub(super) struct NotReplayable;

// === impl Replay ===

impl Replay {
    /// Wraps the client's `body`, keeping a copy of at most `limit` bytes.
    pub(super) fn new(body: Body, limit: usize) -> Self {
        use http_body::Body as _;
        let len = body.size_hint().exact();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                chunks: Vec::new(),
                buffered: 0,
                limit,
                overflowed: false,
                taken: 0,
                rest: Some(body),
                trailers: None,
                ended: false,
                failed: false,
                len,
            })),
        }
    }

    /// A copy that yields the whole body from its start.
    pub(super) fn body(&self) -> ReplayBody {
        ReplayBody {
            shared: Arc::clone(&self.shared),
            pos: 0,
            yielded: 0,
            trailers_sent: false,
        }
    }

    /// Whether nothing was read from the client's body yet.
    pub(super) fn untouched(&self) -> bool {
        self.lock().taken == 0
    }

    /// Whether a new copy can yield the whole body: nothing was let go and nothing failed.
    pub(super) fn is_replayable(&self) -> bool {
        let shared = self.lock();
        !shared.overflowed && !shared.failed
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = self.lock();
        f.debug_struct("Replay")
            .field("buffered", &shared.buffered)
            .field("limit", &shared.limit)
            .field("overflowed", &shared.overflowed)
            .finish_non_exhaustive()
    }
}

// === impl ReplayBody ===

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = &mut *shared;
        if this.pos < shared.taken {
            // Behind the client's body: replay from the copy.
            if shared.overflowed {
                return Poll::Ready(Some(Err(NotReplayable.into())));
            }
            if let Some(chunk) = shared.chunks.get(this.pos) {
                this.pos += 1;
                this.yielded += chunk.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
            }
            // Past the data frames, only the trailers were taken.
            this.pos = shared.taken;
            if let (Some(trailers), false) = (&shared.trailers, this.trailers_sent) {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
        }
        let Some(rest) = shared.rest.as_mut() else {
            if shared.failed {
                return Poll::Ready(Some(Err(NotReplayable.into())));
            }
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(rest).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                shared.taken += 1;
                this.pos = shared.taken;
                match frame.data_ref() {
                    Some(data) => {
                        this.yielded += data.len() as u64;
                        if !shared.overflowed {
                            if shared.buffered + data.len() <= shared.limit {
                                // NOTE: a copy, not a clone of the client's `Bytes`: a
                                // clone would pin the connection's whole read buffer, and
                                // the limit would not bound the memory held.
                                shared.buffered += data.len();
                                shared.chunks.push(Bytes::copy_from_slice(data));
                            } else {
                                shared.overflowed = true;
                                shared.chunks = Vec::new();
                                shared.buffered = 0;
                            }
                        }
                    }
                    None => {
                        if let Some(trailers) = frame.trailers_ref() {
                            this.trailers_sent = true;
                            shared.trailers = Some(trailers.clone());
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(err)) => {
                shared.rest = None;
                shared.failed = true;
                Poll::Ready(Some(Err(err)))
            }
            None => {
                shared.rest = None;
                shared.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if this_is_behind(self, &shared) {
            return false;
        }
        match &shared.rest {
            Some(rest) => rest.is_end_stream(),
            None => shared.ended && (shared.trailers.is_none() || self.trailers_sent),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        match shared.len {
            Some(len) => SizeHint::with_exact(len.saturating_sub(self.yielded)),
            None => SizeHint::default(),
        }
    }
}

/// Whether `body` has frames to replay before it reaches the client's body.
fn this_is_behind(body: &ReplayBody, shared: &Shared) -> bool {
    body.pos < shared.taken || (shared.trailers.is_some() && !body.trailers_sent)
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

// === impl NotReplayable ===

impl fmt::Display for NotReplayable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body cannot be sent again: it was over the replay limit or failed")
    }
}

impl std::error::Error for NotReplayable {}
