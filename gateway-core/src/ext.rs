//! Request extensions with well-known types: set once, read by every later layer.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderValue;
use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// The transport a request arrived on; inserted by the server for every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectInfo {
    /// The address of the peer that opened the connection.
    pub peer: SocketAddr,
    /// The local address the connection was accepted on.
    pub local: SocketAddr,
    /// Whether the connection is TLS (so the client's scheme is `https`).
    pub tls: bool,
}

/// The client's IP address, resolved once per request by [`SetClientIpLayer`].
///
/// [`SetClientIpLayer`]: crate::client_ip::SetClientIpLayer
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientIp {
    ip: IpAddr,
    trusted_peer: bool,
}

/// The id of the route that matched the request; set by the router.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteId(Arc<str>);

/// Who is calling: set by authentication, read by ACLs, rate-limit keys, cache keys and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    consumer: Arc<str>,
    groups: Arc<[Arc<str>]>,
    anonymous: bool,
}

/// The request's id, as received from a trusted source or generated at the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

/// Work that outlives its HTTP exchange (a WebSocket tunnel, a background refresh started
/// by a request) and that the server must wait for, then cut, when it shuts down.
///
/// The server inserts one `Drain` into every request's extensions. Tasks spawned with
/// [`Drain::spawn`] are tracked: on shutdown the server waits for them up to its drain
/// deadline, then [`cut`](Drain::cut)s them (their future is dropped).
#[derive(Clone, Debug, Default)]
pub struct Drain {
    cut: CancellationToken,
    tracker: TaskTracker,
}

// === impl ClientIp ===

impl ClientIp {
    /// A client IP; `trusted_peer` tells whether the connection's peer is a trusted proxy
    /// (whose forwarding headers may be kept).
    pub const fn new(ip: IpAddr, trusted_peer: bool) -> Self {
        Self { ip, trusted_peer }
    }

    /// The client's address.
    pub const fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Whether the request came through a trusted proxy.
    pub const fn trusted_peer(&self) -> bool {
        self.trusted_peer
    }
}

impl fmt::Display for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ip.fmt(f)
    }
}

// === impl RouteId ===

impl RouteId {
    /// A route id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RouteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === impl Identity ===

impl Identity {
    /// An authenticated consumer.
    pub fn consumer(consumer: impl Into<Arc<str>>) -> Self {
        Self {
            consumer: consumer.into(),
            groups: Arc::new([]),
            anonymous: false,
        }
    }

    /// The anonymous identity, for routes that allow unauthenticated access.
    pub fn anonymous() -> Self {
        Self {
            consumer: Arc::from("anonymous"),
            groups: Arc::new([]),
            anonymous: true,
        }
    }

    /// Sets the consumer's groups (read by ACLs).
    #[must_use]
    pub fn with_groups<I, G>(mut self, groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<Arc<str>>,
    {
        self.groups = groups.into_iter().map(Into::into).collect();
        self
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.consumer
    }

    /// The consumer's groups.
    pub fn groups(&self) -> impl ExactSizeIterator<Item = &str> {
        self.groups.iter().map(|g| &**g)
    }

    /// Whether the consumer is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| &**g == group)
    }

    /// Whether this is the anonymous identity.
    pub const fn is_anonymous(&self) -> bool {
        self.anonymous
    }
}

// === impl RequestId ===

impl RequestId {
    /// A request id.
    pub const fn new(id: HeaderValue) -> Self {
        Self(id)
    }

    /// The id as a header value.
    pub const fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

// === impl Drain ===

impl Drain {
    /// A drain with nothing tracked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `fut` as tracked work; it is dropped when the drain is cut.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cut = self.cut.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = fut => {}
                () = cut.cancelled() => {}
            }
        })
    }

    /// How many tracked tasks are running.
    pub fn tracked(&self) -> usize {
        self.tracker.len()
    }

    /// Completes once every tracked task has finished. Tasks spawned later extend the wait.
    pub async fn idle(&self) {
        self.tracker.close();
        self.tracker.wait().await;
        self.tracker.reopen();
    }

    /// Ends every tracked task now, and every task spawned from here on at once.
    pub fn cut(&self) {
        self.cut.cancel();
    }

    /// Whether the drain has been cut.
    pub fn is_cut(&self) -> bool {
        self.cut.is_cancelled()
    }

    /// Completes once the drain is cut, for work that ends itself.
    pub fn cut_signal(&self) -> WaitForCancellationFuture<'_> {
        self.cut.cancelled()
    }
}
