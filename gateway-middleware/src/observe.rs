//! What the observing layers (`metrics`, `access_log`, `otlp`) share: a request body that counts
//! what it reads, and a response body that counts what it sends and says when it ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;

#[cfg(any(feature = "metrics", feature = "access-log"))]
pub(crate) use self::request::{count_request, read};

/// Told how an exchange's response body ended.
pub(crate) trait OnEnd {
    /// The body sent `written` bytes and ended (`complete`), or was dropped before its end.
    fn end(self, written: u64, complete: bool);
}

pin_project! {
    /// A response body that counts its data bytes and calls its [`OnEnd`] once: at its end,
    /// or when it is dropped before.
    pub(crate) struct Observed<B, E: OnEnd> {
        #[pin]
        inner: B,
        written: u64,
        // Whether the body had nothing to send from the start (it may never be polled).
        empty: bool,
        on_end: Option<E>,
    }

    impl<B, E: OnEnd> PinnedDrop for Observed<B, E> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_end) = this.on_end.take() {
                // A body with nothing to send ended, polled or not.
                on_end.end(*this.written, *this.empty);
            }
        }
    }
}

// === impl Observed ===

impl<B: http_body::Body, E: OnEnd> Observed<B, E> {
    /// `inner`, observed by `on_end` (when there is one).
    pub(crate) fn new(inner: B, on_end: Option<E>) -> Self {
        Self {
            empty: inner.is_end_stream(),
            inner,
            written: 0,
            on_end,
        }
    }
}

impl<B, E> http_body::Body for Observed<B, E>
where
    B: http_body::Body,
    E: OnEnd,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(Ok(frame)) = &polled
            && let Some(data) = frame.data_ref()
        {
            *this.written += bytes::Buf::remaining(data) as u64;
        }
        let ended = match &polled {
            None => Some(true),
            Some(Err(_)) => Some(false),
            Some(Ok(_)) => this.inner.is_end_stream().then_some(true),
        };
        if let Some(complete) = ended
            && let Some(on_end) = this.on_end.take()
        {
            on_end.end(*this.written, complete);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Request bodies, counted.
#[cfg(any(feature = "metrics", feature = "access-log"))]
mod request {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context, Poll, ready};

    use bytes::Bytes;
    use gateway_core::{Body, BoxError};
    use http_body::{Frame, SizeHint};
    use pin_project_lite::pin_project;

    pin_project! {
        /// A request body that counts what it reads.
        struct Counted {
            #[pin]
            inner: Body,
            read: Arc<AtomicU64>,
        }
    }

    /// `body`, counted: a body with nothing to read (most requests) is passed on as it is,
    /// since counting would box it.
    pub(crate) fn count_request(body: Body) -> (Body, Option<Arc<AtomicU64>>) {
        if http_body::Body::is_end_stream(&body) {
            return (body, None);
        }
        let read = Arc::new(AtomicU64::new(0));
        let counted = Counted {
            inner: body,
            read: Arc::clone(&read),
        };
        (Body::new(counted), Some(read))
    }

    /// What a request body counted so far.
    pub(crate) fn read(counter: Option<&Arc<AtomicU64>>) -> u64 {
        counter.map_or(0, |read| read.load(Ordering::Relaxed))
    }

    // === impl Counted ===

    impl http_body::Body for Counted {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            let this = self.project();
            let polled = ready!(this.inner.poll_frame(cx));
            if let Some(Ok(frame)) = &polled
                && let Some(data) = frame.data_ref()
            {
                this.read.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Poll::Ready(polled)
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }
}
