//! Collapsing: concurrent misses for the same full key wait for one upstream request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Key;

/// The most keys with a request in flight that others may wait for; past it, misses go
/// upstream without collapsing (the table never grows with an attack on many keys).
const MAX_FLIGHTS: usize = 10_000;

/// The most keys remembered as not storable ([`Leader::pass`]); past it, no more are
/// remembered until some expire (those keys collapse as before: slower, never wrong).
const MAX_PASSES: usize = 10_000;

/// How long a key whose response could not be stored goes upstream without collapsing
/// (Varnish's hit-for-miss): waiting for a response that will not be stored only
/// delays the waiters, who then go upstream anyway.
pub(super) const PASS_FOR: Duration = Duration::from_secs(10);

/// The requests in flight that later misses may wait for, by flight key: the primary key
/// and the request's credentials (a response to one client's `Authorization` is never
/// waited for by another's; whether a waiter may use what was stored is then decided
/// by the same rules as any hit, `Vary` included).
#[derive(Default)]
pub(super) struct Flights {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    flights: HashMap<FlightKey, watch::Receiver<bool>>,
    /// Keys not to collapse, until when (their last response could not be stored).
    passes: HashMap<FlightKey, Instant>,
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
    /// Goes upstream on its own (the table is full, or the key's responses are not
    /// stored).
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
        if let Some(&until) = table.passes.get(&key) {
            if Instant::now() < until {
                return Role::Alone;
            }
            table.passes.remove(&key);
        }
        if let Some(waiting) = table.flights.get(&key)
            && !*waiting.borrow()
        {
            return Role::Follower(waiting.clone());
        }
        if table.flights.len() >= MAX_FLIGHTS {
            return Role::Alone;
        }
        let (done, waiting) = watch::channel(false);
        table.flights.insert(key.clone(), waiting);
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

impl Leader {
    /// The response could not be stored: the key's misses go upstream without waiting
    /// for one another for `period`, and those waiting now are released.
    pub(super) fn pass(self, period: Duration) {
        let mut table = self
            .flights
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if table.passes.len() >= MAX_PASSES {
            table.passes.retain(|_, until| *until > now);
        }
        if table.passes.len() < MAX_PASSES {
            table.passes.insert(self.key.clone(), now + period);
        }
        drop(table);
        // NOTE: dropping `self` now releases the waiters (it takes the lock again).
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut table = self
            .flights
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if table
            .flights
            .get(&self.key)
            .is_some_and(|w| w.same_channel(&self.done.subscribe()))
        {
            table.flights.remove(&self.key);
        }
        drop(table);
        // A leader dropped without a result (an error, the client gone) also releases
        // the waiters: they go upstream themselves.
        self.done.send_replace(true);
    }
}
