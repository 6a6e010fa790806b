//! Request extensions with well-known types: set once, read by every later layer.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use http::uri::Authority;

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
    attributes: Arc<[(Arc<str>, Arc<str>)]>,
    anonymous: bool,
}

/// The request's id, as received from a trusted source or generated at the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

/// The fields of a request's access-log line that only the layers inside know: the upstream
/// endpoint and its time (set by the proxy), and whatever later layers add (the consumer,
/// a rate-limit or cache status, retries).
///
/// The access log inserts one into every request at the edge and reads it when the response
/// ends; an inner layer that has something to say looks it up in the request's extensions
/// and, when it is there, sets a field. Without an access log there is none, and nothing
/// is recorded.
///
/// ```
/// use gateway_core::LogFields;
///
/// let fields = LogFields::new();
/// fields.insert("cache", "HIT");
/// fields.insert("cache", "MISS"); // the last value of a name wins
/// fields.insert("tries", 2u64);
/// let mut seen = Vec::new();
/// fields.for_each(|name, value| seen.push(format!("{name}={value}")));
/// assert_eq!(seen, ["cache=MISS", "tries=2"]);
/// ```
#[derive(Clone)]
pub struct LogFields(Arc<Shared<dyn Any + Send + Sync>>);

/// The fields, and what the layer that made them keeps with them ([`LogFields::with`]).
struct Shared<T: ?Sized> {
    fields: Mutex<Fields>,
    attached: T,
}

#[derive(Default)]
struct Fields {
    upstream: Option<UpstreamCall>,
    extra: Vec<(&'static str, LogValue)>,
}

/// The upstream call a request ended with (the last, when it was retried).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamCall {
    /// The endpoint's `host:port`.
    pub endpoint: Authority,
    /// From the request's sending (its body's end, when it streamed) to the response head,
    /// or to the failure.
    pub duration: Duration,
    /// How many upstream calls the request made, this one included.
    pub attempts: u32,
}

/// The value of an extra [`LogFields`] field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogValue {
    /// A string, written quoted.
    Str(Cow<'static, str>),
    /// A header's value (a request id), written quoted; kept as it is, without a copy.
    Header(HeaderValue),
    /// A shared string (a consumer's name), written quoted; kept without a copy.
    Shared(Arc<str>),
    /// A number.
    Uint(u64),
    /// A flag.
    Bool(bool),
}

/// The endpoints already tried for one request, shared by every try of it, and the ones
/// the request must not go to.
///
/// A retry layer inserts one into the request before the first try (the copies of the
/// request for later tries share it); the proxy's balancer then skips the endpoints it
/// lists and adds the one it picks. When every endpoint has been tried, the list is
/// ignored.
///
/// A layer that judges endpoints (a per-endpoint circuit breaker) [bars](Tried::bar) some
/// for the next try: the balancer never picks those, and fails with
/// [`ErrorKind::CircuitOpen`](crate::ErrorKind::CircuitOpen) when only they are left.
#[derive(Clone, Debug, Default)]
pub struct TriedEndpoints(Arc<Mutex<Tried>>);

/// What a [`TriedEndpoints`] holds; see [`TriedEndpoints::lock`].
#[derive(Debug, Default)]
pub struct Tried {
    ids: Vec<u64>,
    /// The authority of each id in `ids`, when the picker gave it.
    authorities: Vec<Option<Authority>>,
    barred: Vec<u64>,
}

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

// === impl TriedEndpoints ===

impl TriedEndpoints {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many endpoints were tried.
    pub fn len(&self) -> usize {
        self.lock().ids.len()
    }

    /// Whether no endpoint was tried yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The list, for a balancer to skip and add to.
    pub fn lock(&self) -> MutexGuard<'_, Tried> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Tried ===

impl Tried {
    /// The ids of the endpoints tried, in order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// The endpoints tried from the `from`th on, with their authority when known.
    pub fn since(&self, from: usize) -> impl Iterator<Item = (u64, Option<&Authority>)> {
        let ids = self.ids.get(from..).unwrap_or_default();
        let authorities = self.authorities.get(from..).unwrap_or_default();
        ids.iter()
            .enumerate()
            .map(|(i, &id)| (id, authorities.get(i).and_then(Option::as_ref)))
    }

    /// Adds the endpoint picked for a try.
    pub fn push(&mut self, id: u64, authority: Option<Authority>) {
        self.ids.push(id);
        self.authorities.push(authority);
    }

    /// The endpoints the next try must not go to.
    pub fn barred(&self) -> &[u64] {
        &self.barred
    }

    /// Bars `ids` for the next try, in place of those barred before.
    pub fn bar(&mut self, ids: impl IntoIterator<Item = u64>) {
        self.barred.clear();
        self.barred.extend(ids);
    }
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
            attributes: Arc::new([]),
            anonymous: false,
        }
    }

    /// The anonymous identity, for routes that allow unauthenticated access.
    pub fn anonymous() -> Self {
        Self {
            consumer: Arc::from("anonymous"),
            groups: Arc::new([]),
            attributes: Arc::new([]),
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

    /// Sets attributes of the caller that later layers may key on (a token's chosen claims:
    /// `tenant`, `plan`), replacing any set before.
    #[must_use]
    pub fn with_attributes<I, K, V>(mut self, attributes: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<Arc<str>>,
        V: Into<Arc<str>>,
    {
        self.attributes = attributes
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// The anonymous identity named `consumer` (Kong's anonymous consumer), for routes that
    /// let callers without credentials through under a name of their own.
    pub fn anonymous_as(consumer: impl Into<Arc<str>>) -> Self {
        Self {
            consumer: consumer.into(),
            ..Self::anonymous()
        }
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.consumer
    }

    /// The consumer's name, shared (for a log field or a map key without a copy).
    pub fn shared_name(&self) -> &Arc<str> {
        &self.consumer
    }

    /// The attribute `name`, when the caller has it.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| &**v)
    }

    /// Every attribute, in the order set.
    pub fn attributes(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.attributes.iter().map(|(k, v)| (&**k, &**v))
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

// === impl LogFields ===

impl Default for LogFields {
    fn default() -> Self {
        Self::new()
    }
}

impl LogFields {
    /// No fields set.
    pub fn new() -> Self {
        Self::with(())
    }

    /// No fields set, and `attached` kept with them, in the same allocation, for the layer
    /// that made them to read back ([`attached`](Self::attached)): the access log keeps its
    /// copy of the request's head there, one allocation per request instead of two.
    pub fn with<T: Any + Send + Sync>(attached: T) -> Self {
        Self(Arc::new(Shared {
            fields: Mutex::new(Fields::default()),
            attached,
        }))
    }

    /// What [`with`](Self::with) attached, if it is a `T`.
    ///
    /// ```
    /// use gateway_core::LogFields;
    ///
    /// let fields = LogFields::with(7u32);
    /// assert_eq!(fields.attached::<u32>(), Some(&7));
    /// assert_eq!(fields.attached::<u64>(), None);
    /// assert_eq!(LogFields::new().attached::<u32>(), None);
    /// ```
    pub fn attached<T: Any>(&self) -> Option<&T> {
        self.0.attached.downcast_ref()
    }

    /// Records an upstream call to `endpoint` that took `duration`; a later call (a retry)
    /// replaces it and counts as one more attempt.
    pub fn set_upstream(&self, endpoint: &Authority, duration: Duration) {
        let mut fields = self.lock();
        let attempts = fields.upstream.as_ref().map_or(0, |u| u.attempts) + 1;
        fields.upstream = Some(UpstreamCall {
            endpoint: endpoint.clone(),
            duration,
            attempts,
        });
    }

    /// The upstream call, if the request made one.
    pub fn upstream(&self) -> Option<UpstreamCall> {
        self.lock().upstream.clone()
    }

    /// Sets the field `name` (a `snake_case` name from `docs/observability.md`), replacing
    /// an earlier value.
    pub fn insert(&self, name: &'static str, value: impl Into<LogValue>) {
        let value = value.into();
        let mut fields = self.lock();
        match fields.extra.iter_mut().find(|(n, _)| *n == name) {
            Some((_, old)) => *old = value,
            None => fields.extra.push((name, value)),
        }
    }

    /// Calls `f` with every extra field, in the order they were first set.
    pub fn for_each(&self, mut f: impl FnMut(&'static str, &LogValue)) {
        for (name, value) in &self.lock().extra {
            f(name, value);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fields> {
        self.0.fields.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for LogFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields = self.lock();
        f.debug_struct("LogFields")
            .field("upstream", &fields.upstream)
            .field("extra", &fields.extra)
            .finish()
    }
}

// === impl LogValue ===

impl From<&'static str> for LogValue {
    fn from(s: &'static str) -> Self {
        Self::Str(Cow::Borrowed(s))
    }
}

impl From<String> for LogValue {
    fn from(s: String) -> Self {
        Self::Str(Cow::Owned(s))
    }
}

impl From<Arc<str>> for LogValue {
    fn from(s: Arc<str>) -> Self {
        Self::Shared(s)
    }
}

impl From<HeaderValue> for LogValue {
    fn from(v: HeaderValue) -> Self {
        Self::Header(v)
    }
}

impl From<u64> for LogValue {
    fn from(n: u64) -> Self {
        Self::Uint(n)
    }
}

impl From<u32> for LogValue {
    fn from(n: u32) -> Self {
        Self::Uint(n.into())
    }
}

impl From<bool> for LogValue {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

impl fmt::Display for LogValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::Shared(s) => f.write_str(s),
            Self::Header(v) => f.write_str(&String::from_utf8_lossy(v.as_bytes())),
            Self::Uint(n) => n.fmt(f),
            Self::Bool(b) => b.fmt(f),
        }
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
