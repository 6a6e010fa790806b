//! Dynamic endpoint sets: following a [`tower::discover::Discover`], and DNS discovery.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::{Future, poll_fn};
use std::hash::Hash;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::{Pin, pin};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_core::Stream;
use gateway_core::BoxError;
use http::uri::{Authority, Scheme};
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tower::discover::{Change, Discover};

use super::set::Inner;
use super::{Endpoint, InvalidEndpoint};

/// Resolves a host name to socket addresses, for [`DnsDiscovery`].
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host`, with `port`.
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture;
}

/// What [`Resolve::resolve`] returns.
pub type ResolveFuture = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// The operating system's resolver (`getaddrinfo` on Tokio's blocking pool), so
/// `/etc/hosts`, search domains and `nsswitch` apply as they do for every other program.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

/// Discovers the endpoints of a host name by resolving it again and again, like Envoy's
/// `STRICT_DNS` clusters and nginx's `resolve`: every address is one endpoint, and each
/// resolution that answers differently inserts the new addresses and removes the gone ones.
/// A failed or empty resolution keeps the last set (a DNS hiccup must not empty an
/// upstream) and is reported as an error, which the upstream logs.
///
/// A [`Stream`] of [`Change`]s, and so a [`Discover`]; give it to
/// [`UpstreamBuilder::discover`](super::UpstreamBuilder::discover). Endpoints are
/// `http://ip:port`: upstreams send their own `Host` unless the proxy sets one
/// ([`HostHeader`](crate::HostHeader)). TLS upstreams are refused, since their
/// certificates name the host, not its addresses; give those by name and let the client
/// resolve them per connection.
pub struct DnsDiscovery {
    host: String,
    port: u16,
    interval: Duration,
    weight: NonZeroU32,
    resolver: Arc<dyn Resolve>,
    current: BTreeSet<SocketAddr>,
    pending: VecDeque<Change<SocketAddr, Endpoint>>,
    next: Option<Pin<Box<Sleep>>>,
    resolving: Option<ResolveFuture>,
}

/// What the follower remembers of a discovered endpoint.
struct Known {
    id: u64,
    scheme: Scheme,
    authority: Authority,
    weight: u32,
}

/// Follows `discover` into the upstream until the upstream is dropped (`cancel`).
pub(super) fn spawn<D>(discover: D, upstream: Weak<Inner>, cancel: CancellationToken)
where
    D: Discover<Service = Endpoint> + Send + 'static,
    D::Key: Hash + fmt::Debug + Send,
    D::Error: Into<BoxError> + Send,
{
    tokio::spawn(async move {
        cancel.run_until_cancelled(follow(discover, upstream)).await;
    });
}

async fn follow<D>(discover: D, upstream: Weak<Inner>)
where
    D: Discover<Service = Endpoint>,
    D::Key: Hash + fmt::Debug,
    D::Error: Into<BoxError>,
{
    let mut discover = pin!(discover);
    let mut known: HashMap<D::Key, Known> = HashMap::new();
    let mut ended = false;
    while !ended {
        let Some(first) = poll_fn(|cx| discover.as_mut().poll_discover(cx)).await else {
            break;
        };
        // Apply every change that is ready now at once: one new set, one balancer rebuild.
        let mut batch = vec![first];
        loop {
            match poll_fn(|cx| Poll::Ready(discover.as_mut().poll_discover(cx))).await {
                Poll::Ready(Some(change)) => batch.push(change),
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        let Some(inner) = upstream.upgrade() else {
            return;
        };
        let (mut removed, mut added) = (Vec::new(), Vec::<Endpoint>::new());
        let mut drop_id = |id: u64, added: &mut Vec<Endpoint>| {
            if let Some(i) = added.iter().position(|e| e.id() == id) {
                added.swap_remove(i);
            } else {
                removed.push(id);
            }
        };
        for change in batch {
            match change {
                Ok(Change::Insert(key, endpoint)) => {
                    if let Some(old) = known.get(&key) {
                        if old.is(&endpoint) {
                            continue;
                        }
                        drop_id(old.id, &mut added);
                    }
                    tracing::info!(?key, %endpoint, "endpoint discovered");
                    known.insert(key, Known::of(&endpoint));
                    added.push(endpoint);
                }
                Ok(Change::Remove(key)) => {
                    if let Some(old) = known.remove(&key) {
                        tracing::info!(?key, "endpoint gone");
                        drop_id(old.id, &mut added);
                    }
                }
                Err(error) => {
                    let error: BoxError = error.into();
                    tracing::warn!(%error, "endpoint discovery failed; keeping the current set");
                }
            }
        }
        if !removed.is_empty() || !added.is_empty() {
            inner.apply(&removed, added);
        }
    }
    tracing::info!("endpoint discovery ended; keeping the last set");
}

// === impl Known ===

impl Known {
    fn of(endpoint: &Endpoint) -> Self {
        Self {
            id: endpoint.id(),
            scheme: endpoint.scheme().clone(),
            authority: endpoint.authority().clone(),
            weight: endpoint.weight(),
        }
    }

    /// Whether `endpoint` is the same address and weight (so the known one stays).
    fn is(&self, endpoint: &Endpoint) -> bool {
        self.scheme == *endpoint.scheme()
            && self.authority == *endpoint.authority()
            && self.weight == endpoint.weight()
    }
}

// === impl SystemResolver ===

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

// === impl DnsDiscovery ===

impl DnsDiscovery {
    /// Resolves `target` (`host:port` or `http://host[:port]`) every 5 s with the system
    /// resolver; endpoints get weight 1.
    ///
    /// # Errors
    ///
    /// When `target` does not parse, or is `https`.
    pub fn new(target: &str) -> Result<Self, InvalidEndpoint> {
        let endpoint: Endpoint = target.parse()?;
        if *endpoint.scheme() == Scheme::HTTPS {
            return Err(InvalidEndpoint::new(
                target,
                "DNS discovery connects by address, which a TLS certificate does not name; \
                 give an https upstream by name instead",
            ));
        }
        let authority = endpoint.authority();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            interval: Duration::from_secs(5),
            weight: NonZeroU32::MIN,
            resolver: Arc::new(SystemResolver),
            current: BTreeSet::new(),
            pending: VecDeque::new(),
            next: None,
            resolving: None,
        })
    }

    /// Time between resolutions (at least 1 ms).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The weight of every discovered endpoint.
    #[must_use]
    pub fn weight(mut self, weight: NonZeroU32) -> Self {
        self.weight = weight;
        self
    }

    /// Resolves with `resolver` instead of the system's.
    #[must_use]
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Arc::new(resolver);
        self
    }

    /// Queues the changes from the current set to `addrs`.
    fn update(&mut self, addrs: Vec<SocketAddr>) {
        let next: BTreeSet<SocketAddr> = addrs.into_iter().collect();
        for gone in self.current.difference(&next) {
            self.pending.push_back(Change::Remove(*gone));
        }
        for new in next.difference(&self.current) {
            let Ok(authority) = new.to_string().parse::<Authority>() else {
                continue;
            };
            let endpoint = Endpoint::new(Scheme::HTTP, authority).with_weight(self.weight);
            self.pending.push_back(Change::Insert(*new, endpoint));
        }
        self.current = next;
    }
}

impl Stream for DnsDiscovery {
    type Item = io::Result<Change<SocketAddr, Endpoint>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if let Some(resolving) = this.resolving.as_mut() {
                let result = ready!(resolving.as_mut().poll(cx));
                this.resolving = None;
                let deadline = gateway_core::time::deadline(Instant::now(), this.interval);
                match this.next.as_mut() {
                    Some(next) => next.as_mut().reset(deadline),
                    None => this.next = Some(Box::pin(sleep_until(deadline))),
                }
                match result {
                    Ok(addrs) if !addrs.is_empty() => this.update(addrs),
                    Ok(_) => {
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("`{}` resolved to no address", this.host),
                        ))));
                    }
                    Err(e) => {
                        return Poll::Ready(Some(Err(io::Error::new(
                            e.kind(),
                            format!("resolving `{}`: {e}", this.host),
                        ))));
                    }
                }
                continue;
            }
            if let Some(next) = this.next.as_mut() {
                ready!(next.as_mut().poll(cx));
            }
            this.resolving = Some(this.resolver.resolve(&this.host, this.port));
        }
    }
}

impl fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("interval", &self.interval)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}
