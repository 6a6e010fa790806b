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
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::io::Rewind;

/// Resolves to the connection once the server has answered the request with `101`.
///
/// Take it out of the request's extensions before the request is consumed. Clones share
/// the one connection: the first to be polled once it is there gets it, the others fail
/// with [`NotUpgraded`]. Every clone being polled is woken when the switch happens or
/// fails, whichever task polls it.
#[derive(Clone)]
pub struct OnUpgrade {
    shared: Arc<Mutex<Handover>>,
}

/// The state an [`OnUpgrade`] and its clones share with the server's [`Pending`].
enum Handover {
    /// Not decided yet: the tasks waiting for it.
    Waiting(Vec<Waker>),
    /// Switched: the connection, for the first clone to take it.
    Ready(Upgraded),
    /// Taken by a clone, or the switch did not happen.
    Gone,
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

/// The server's half: hands the connection over (or, dropped, says it will not).
pub(crate) struct Pending {
    shared: Arc<Mutex<Handover>>,
}

/// A pair for one request that asks to switch protocols.
pub(crate) fn pending() -> (Pending, OnUpgrade) {
    let shared = Arc::new(Mutex::new(Handover::Waiting(Vec::new())));
    (
        Pending {
            shared: Arc::clone(&shared),
        },
        OnUpgrade { shared },
    )
}

fn lock(shared: &Mutex<Handover>) -> MutexGuard<'_, Handover> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl Pending ===

impl Pending {
    pub(super) fn fulfill(self, io: impl Io, read_ahead: Bytes) {
        // Nobody may be left to take it (the service dropped every clone): then the
        // connection closes with the last reference.
        let upgraded = Upgraded {
            inner: Rewind::new(Box::new(io), read_ahead),
        };
        self.decide(Handover::Ready(upgraded));
    }

    /// Settles the handover, if it is still waiting, and wakes whoever waits.
    fn decide(&self, outcome: Handover) {
        let waiting = {
            let mut shared = lock(&self.shared);
            match &mut *shared {
                Handover::Waiting(wakers) => {
                    let wakers = std::mem::take(wakers);
                    *shared = outcome;
                    wakers
                }
                _ => return,
            }
        };
        for waker in waiting {
            waker.wake();
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Not fulfilled (a fulfilled one has moved on from `Waiting`): no switch.
        self.decide(Handover::Gone);
    }
}

// === impl OnUpgrade ===

impl Future for OnUpgrade {
    type Output = Result<Upgraded, NotUpgraded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = lock(&self.shared);
        match std::mem::replace(&mut *shared, Handover::Gone) {
            Handover::Waiting(mut wakers) => {
                // NOTE: one waker per task polling a clone, not one for them all: a clone
                // polled from a second task must not take the first task's wake-up.
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                *shared = Handover::Waiting(wakers);
                Poll::Pending
            }
            Handover::Ready(upgraded) => Poll::Ready(Ok(upgraded)),
            Handover::Gone => Poll::Ready(Err(NotUpgraded)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 4e of the hardening review: clones polled from two tasks both wake up (they
    /// shared one receiver, which kept one waker: the other task was never woken).
    #[tokio::test]
    async fn every_clone_polled_is_woken() {
        let (pending, on_upgrade) = pending();
        let first = tokio::spawn(on_upgrade.clone());
        let second = tokio::spawn(on_upgrade);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        let (client, _server) = tokio::io::duplex(64);
        pending.fulfill(client, Bytes::new());
        let woken = |task| tokio::time::timeout(std::time::Duration::from_secs(5), task);
        let results = [
            woken(first).await.expect("woken").unwrap().is_ok(),
            woken(second).await.expect("woken").unwrap().is_ok(),
        ];
        // One of them got the connection; the other was told, not left waiting.
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
    }

    #[tokio::test]
    async fn a_switch_that_does_not_happen_fails_every_clone() {
        let (pending, on_upgrade) = pending();
        let waiting = tokio::spawn(on_upgrade.clone());
        tokio::task::yield_now().await;
        drop(pending);
        assert!(waiting.await.unwrap().is_err());
        assert!(on_upgrade.await.is_err());
    }
}
