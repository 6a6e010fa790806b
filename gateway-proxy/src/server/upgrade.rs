//! Protocol switches (`101 Switching Protocols`) on HTTP/1.1 connections.
//!
//! A request that asks to switch (`Connection: upgrade` with an `Upgrade` field) carries an
//! [`OnUpgrade`] in its extensions. If the service answers `101`, the server writes that
//! head and hands the connection over: the [`OnUpgrade`] resolves to the [`Upgraded`]
//! connection, with whatever the client had already sent after its request. Any other
//! answer leaves the connection an ordinary HTTP/1.1 one, and the [`OnUpgrade`] fails.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::io::Rewind;

/// Resolves to the connection once the server has answered the request with `101`.
///
/// Take it out of the request's extensions before the request is consumed. Clones share
/// the one connection: the first to be polled gets it.
#[derive(Clone)]
pub struct OnUpgrade {
    rx: Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>,
}

/// A connection handed over after `101 Switching Protocols`: what the client sent after
/// its request, read before the switch, comes first.
pub struct Upgraded {
    inner: Rewind<Box<dyn Io>>,
}

/// The upgrade did not happen: the service did not answer `101`, or the connection failed
/// before the switch.
#[derive(Debug)]
pub struct NotUpgraded;

/// A connection a switch can hand over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// The server's half: hands the connection over.
pub(super) struct Pending {
    tx: oneshot::Sender<Upgraded>,
}

/// A pair for one request that asks to switch protocols.
pub(super) fn pending() -> (Pending, OnUpgrade) {
    let (tx, rx) = oneshot::channel();
    let rx = Arc::new(Mutex::new(Some(rx)));
    (Pending { tx }, OnUpgrade { rx })
}

// === impl Pending ===

impl Pending {
    pub(super) fn fulfill(self, io: impl Io, read_ahead: Bytes) {
        // The receiver may be gone (the service dropped it): the connection closes.
        let _ = self.tx.send(Upgraded {
            inner: Rewind::new(Box::new(io), read_ahead),
        });
    }
}

// === impl OnUpgrade ===

impl Future for OnUpgrade {
    type Output = Result<Upgraded, NotUpgraded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(pending) = rx.as_mut() else {
            return Poll::Ready(Err(NotUpgraded));
        };
        let upgraded = ready!(Pin::new(pending).poll(cx)).map_err(|_| NotUpgraded);
        *rx = None;
        Poll::Ready(upgraded)
    }
}

impl fmt::Debug for OnUpgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnUpgrade").finish_non_exhaustive()
    }
}

// === impl Upgraded ===

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upgraded").finish_non_exhaustive()
    }
}

// === impl NotUpgraded ===

impl fmt::Display for NotUpgraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the connection was not upgraded")
    }
}

impl std::error::Error for NotUpgraded {}
