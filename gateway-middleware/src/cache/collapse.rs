//! Collapsing: concurrent misses for the same full key wait for one upstream request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;

use super::Key;

/// The most keys with a request in flight that others may wait for; past it, misses go
/// upstream without collapsing (the table never grows with an attack on many keys).
const MAX_FLIGHTS: usize = 10_000;

/// The requests in flight that later misses may wait for, by flight key: the primary key
/// and the request's credentials (a response to one client's `Authorization` is never
/// waited for by another's; whether a waiter may use what was stored is then decided
/// by the same rules as any hit, `Vary` included).
#[derive(Default)]
pub(super) struct Flights {
    table: Mutex<HashMap<FlightKey, watch::Receiver<bool>>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct FlightKey {
    key: Key,
    credentials: Option<HeaderValue>,
}

/// What a miss does.
pub(super) enum Role {
    /// Goes upstream; the others wait until this is dropped.
    Leader(Leader),
    /// Waits for the leader (at most the collapse wait), then looks again.
    Follower(watch::Receiver<bool>),
    /// Goes upstream on its own (the table is full).
    Alone,
}

/// The request in flight for a key: dropped when its response is stored, or known not to
/// be, or abandoned; the waiters then look in the store again.
pub(super) struct Leader {
    flights: Arc<Flights>,
    key: FlightKey,
    done: watch::Sender<bool>,
}

impl FlightKey {
    pub(super) fn new(key: &Key, credentials: Option<&HeaderValue>) -> Self {
        Self {
            key: key.clone(),
            credentials: credentials.cloned(),
        }
    }
}

impl Flights {
    /// The role of a miss for `key`.
    pub(super) fn join(self: &Arc<Self>, key: FlightKey) -> Role {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(waiting) = table.get(&key)
            && !*waiting.borrow()
        {
            return Role::Follower(waiting.clone());
        }
        if table.len() >= MAX_FLIGHTS {
            return Role::Alone;
        }
        let (done, waiting) = watch::channel(false);
        table.insert(key.clone(), waiting);
        Role::Leader(Leader {
            flights: Arc::clone(self),
            key,
            done,
        })
    }
}

/// Waits for the leader, at most `wait`; whether it finished in time.
pub(super) async fn follow(mut waiting: watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::time::timeout(wait, waiting.wait_for(|done| *done))
        .await
        .is_ok_and(|r| r.is_ok())
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut table = self
            .flights
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if table
            .get(&self.key)
            .is_some_and(|w| w.same_channel(&self.done.subscribe()))
        {
            table.remove(&self.key);
        }
        drop(table);
        // A leader dropped without a result (an error, the client gone) also releases
        // the waiters: they go upstream themselves.
        self.done.send_replace(true);
    }
}
