//! Middleware that resolves the client's IP address once per request.
//!
//! The client IP is the connection's peer address, unless the peer is a configured trusted
//! proxy. Then the forwarding header (`X-Forwarded-For` or RFC 7239 `Forwarded`) is walked
//! from right to left, skipping trusted hops, and the first untrusted address is the client.
//! The leftmost value is never taken on faith: it is whatever the client wrote. An entry that
//! does not parse stops the walk and the peer address is used.
//!
//! The result is stored as [`ClientIp`] in the request extensions, with whether the peer was
//! trusted (the proxy uses that to decide whether client-sent forwarding headers survive).
//!
//! # Example
//!
//! ```
//! use gateway_core::{Body, ClientIp, ConnectInfo};
//! use gateway_core::client_ip::{SetClientIpLayer, TrustedProxies};
//! use http::{Request, Response};
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let trusted = TrustedProxies::builder().cidr("10.0.0.0/8").build().unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(SetClientIpLayer::new(trusted))
//!     .service(service_fn(|req: Request<Body>| async move {
//!         let ip = req.extensions().get::<ClientIp>().unwrap().ip();
//!         Ok::<_, Infallible>(Response::new(Body::from(ip.to_string())))
//!     }));
//!
//! let mut req = Request::builder()
//!     .header("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2")
//!     .body(Body::empty())
//!     .unwrap();
//! req.extensions_mut().insert(ConnectInfo {
//!     peer: "10.0.0.1:40000".parse().unwrap(),
//!     local: "10.0.0.9:8080".parse().unwrap(),
//!     tls: false,
//! });
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.into_body().collect_bytes().await.unwrap(), "203.0.113.7");
//! # }
//! ```
//!
//! # Ordering
//!
//! Early, before anything that keys on the client (IP filters, rate limits, logs). It needs
//! [`ConnectInfo`], which the gateway's server inserts; requests without it get no
//! `ClientIp`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use http::header::{FORWARDED, HeaderMap, HeaderName};
use ipnet::IpNet;
use tower::{Layer, Service};

use crate::{ClientIp, ConnectInfo};

/// Which header trusted proxies use to report the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// The proxies whose forwarding headers are believed.
///
/// Built with [`TrustedProxies::builder`]; [`TrustedProxies::none`] (the default) trusts
/// nobody, so the client IP is always the peer address.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    inner: Arc<Trust>,
}

#[derive(Debug, Default)]
struct Trust {
    cidrs: Vec<IpNet>,
    hops: Option<usize>,
    header: ForwardedHeader,
}

/// Builder for [`TrustedProxies`].
#[derive(Debug, Default)]
#[must_use]
pub struct TrustedProxiesBuilder {
    cidrs: Vec<String>,
    hops: Option<usize>,
    header: ForwardedHeader,
}

/// A trusted-proxy configuration that cannot be used.
#[derive(Debug)]
pub struct InvalidTrustedProxies {
    reason: String,
    source: Option<ipnet::AddrParseError>,
}

/// Resolves [`ClientIp`] for each request.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct SetClientIpLayer {
    trusted: TrustedProxies,
}

/// The service built by [`SetClientIpLayer`].
#[derive(Clone, Debug)]
pub struct SetClientIp<S> {
    inner: S,
    trusted: TrustedProxies,
}

// === impl TrustedProxies ===

impl TrustedProxies {
    /// Trusts no proxy: the client IP is the peer address.
    pub fn none() -> Self {
        Self::default()
    }

    /// Starts a configuration.
    pub fn builder() -> TrustedProxiesBuilder {
        TrustedProxiesBuilder::default()
    }

    /// Whether `ip` is a trusted proxy address.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.inner.cidrs.iter().any(|net| net.contains(&ip))
    }

    /// Whether the connection's peer is trusted (by address, or by a hop count alone).
    fn peer_trusted(&self, peer: IpAddr) -> bool {
        if self.inner.cidrs.is_empty() {
            self.inner.hops.is_some()
        } else {
            self.is_trusted(peer)
        }
    }

    /// Resolves the client of a request that arrived from `peer` with `headers`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> ClientIp {
        let peer = canonical(peer);
        if !self.peer_trusted(peer) {
            return ClientIp::new(peer, false);
        }
        let ip = match self.inner.header {
            ForwardedHeader::XForwardedFor => self.walk(
                peer,
                headers
                    .get_all(X_FORWARDED_FOR)
                    .iter()
                    .rev()
                    .flat_map(|v| v.as_bytes().rsplit(|b| *b == b','))
                    .map(|entry| parse_node(entry, false)),
            ),
            ForwardedHeader::Forwarded => self.walk(
                peer,
                headers
                    .get_all(FORWARDED)
                    .iter()
                    .rev()
                    .flat_map(|v| v.as_bytes().rsplit(|b| *b == b','))
                    .map(forwarded_for),
            ),
        };
        ClientIp::new(ip, true)
    }

    /// Walks hops right to left (`entries` is already reversed). `None` entries are garbage.
    fn walk(&self, peer: IpAddr, entries: impl Iterator<Item = Option<IpAddr>>) -> IpAddr {
        // The peer is the first trusted hop; `budget` is how many more entries may be
        // skipped as proxies.
        let mut budget = self.inner.hops.map_or(usize::MAX, |h| h - 1);
        let mut last = peer;
        for entry in entries {
            let Some(ip) = entry else { return peer };
            let ip = canonical(ip);
            if budget == 0 || (!self.inner.cidrs.is_empty() && !self.is_trusted(ip)) {
                return ip;
            }
            budget -= 1;
            last = ip;
        }
        if self.inner.hops.is_some() {
            // Fewer hops than configured: the request bypassed one of our proxies, so the
            // leftmost entry was not written by a trusted hop.
            return peer;
        }
        last
    }
}

/// A network as configuration writes it: a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single
/// address (a network of one), surrounding spaces ignored and host bits cleared. The one
/// reading of such lists, for trusted proxies and for the address filters built on
/// [`ClientIp`].
///
/// # Errors
///
/// When `text` is neither (the CIDR parser's error).
pub fn parse_net(text: &str) -> Result<IpNet, ipnet::AddrParseError> {
    let text = text.trim();
    IpNet::from_str(text)
        .or_else(|e| IpAddr::from_str(text).map(IpNet::from).map_err(|_| e))
        .map(|net| net.trunc())
}

// === impl TrustedProxiesBuilder ===

impl TrustedProxiesBuilder {
    /// Trusts peers and hops in `cidr` (`10.0.0.0/8`, `::1/128`, or a bare address).
    pub fn cidr(mut self, cidr: impl Into<String>) -> Self {
        self.cidrs.push(cidr.into());
        self
    }

    /// Trusts exactly `hops` proxies in front of the gateway (the peer counts as one): the
    /// client is the `hops`-th address from the right of the forwarding header.
    pub const fn hops(mut self, hops: usize) -> Self {
        self.hops = Some(hops);
        self
    }

    /// Reads `header` instead of `X-Forwarded-For`.
    pub const fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    ///
    /// A CIDR that does not parse, or a hop count of zero.
    pub fn build(self) -> Result<TrustedProxies, InvalidTrustedProxies> {
        let cidrs = self
            .cidrs
            .iter()
            .map(|c| {
                parse_net(c).map_err(|e| InvalidTrustedProxies {
                    reason: format!("`{}` is not a CIDR or an IP address", c.trim()),
                    source: Some(e),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.hops == Some(0) {
            return Err(InvalidTrustedProxies {
                reason: "a trusted hop count must be at least 1".into(),
                source: None,
            });
        }
        Ok(TrustedProxies {
            inner: Arc::new(Trust {
                cidrs,
                hops: self.hops,
                header: self.header,
            }),
        })
    }
}

// === impl InvalidTrustedProxies ===

impl fmt::Display for InvalidTrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid trusted proxies: {}", self.reason)
    }
}

impl std::error::Error for InvalidTrustedProxies {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

// === impl SetClientIpLayer ===

impl SetClientIpLayer {
    /// Resolves client IPs, believing the forwarding headers of `trusted` proxies.
    pub const fn new(trusted: TrustedProxies) -> Self {
        Self { trusted }
    }
}

impl<S> Layer<S> for SetClientIpLayer {
    type Service = SetClientIp<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetClientIp {
            inner,
            trusted: self.trusted.clone(),
        }
    }
}

// === impl SetClientIp ===

impl<S, B> Service<Request<B>> for SetClientIp<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        if let Some(info) = req.extensions().get::<ConnectInfo>() {
            let client = self.trusted.resolve(info.peer.ip(), req.headers());
            req.extensions_mut().insert(client);
        }
        self.inner.call(req)
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, what dual-stack sockets report) are
/// compared and reported as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Parses one node: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`; with `quoted`,
/// the RFC 7239 quoted-string form is accepted too.
fn parse_node(raw: &[u8], quoted: bool) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    let s = if quoted {
        s.strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(s)
    } else {
        s
    };
    if let Ok(ip) = IpAddr::from_str(s) {
        return Some(ip);
    }
    if let Ok(addr) = SocketAddr::from_str(s) {
        return Some(addr.ip());
    }
    // `[v6]` without a port.
    s.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| IpAddr::from_str(s).ok())
}

/// The `for=` node of one `Forwarded` element (`for=1.2.3.4;proto=https`).
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    element
        .split(|b| *b == b';')
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (name, value) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
            name.eq_ignore_ascii_case(b"for").then_some(&value[1..])
        })
        .and_then(|node| parse_node(node, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &'static str, values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_static(v));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(c: &str) -> TrustedProxies {
        TrustedProxies::builder().cidr(c).build().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_headers_say() {
        let h = headers("x-forwarded-for", &["1.1.1.1"]);
        let c = cidr("10.0.0.0/8").resolve(ip("203.0.113.9"), &h);
        assert_eq!(c, ClientIp::new(ip("203.0.113.9"), false));
        let c = TrustedProxies::none().resolve(ip("10.0.0.1"), &h);
        assert_eq!(c.ip(), ip("10.0.0.1"));
    }

    #[test]
    fn rightmost_untrusted_wins_never_the_leftmost() {
        let h = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.7", "10.1.1.1"]);
        let c = cidr("10.0.0.0/8").resolve(ip("10.0.0.1"), &h);
        assert_eq!(c, ClientIp::new(ip("203.0.113.7"), true));
    }

    #[test]
    fn garbage_falls_back_to_the_peer() {
        for bad in ["garbage", "1.2.3.4.5", "", "[::1", "unknown"] {
            let h = headers("x-forwarded-for", &[bad]);
            let h = if bad.is_empty() { HeaderMap::new() } else { h };
            let c = cidr("10.0.0.0/8").resolve(ip("10.0.0.1"), &h);
            assert_eq!(c.ip(), ip("10.0.0.1"), "entry {bad:?}");
        }
    }

    #[test]
    fn ports_and_brackets_are_handled() {
        for (entry, want) in [
            ("203.0.113.7:4711", "203.0.113.7"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            (" 203.0.113.7 ", "203.0.113.7"),
        ] {
            let h = headers("x-forwarded-for", &[entry]);
            let c = cidr("10.0.0.0/8").resolve(ip("10.0.0.1"), &h);
            assert_eq!(c.ip(), ip(want), "entry {entry:?}");
        }
    }

    #[test]
    fn hop_count_picks_the_nth_from_the_right() {
        let two = TrustedProxies::builder().hops(2).build().unwrap();
        let h = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.7, 198.51.100.2"]);
        assert_eq!(two.resolve(ip("192.0.2.1"), &h).ip(), ip("203.0.113.7"));
        let one = TrustedProxies::builder().hops(1).build().unwrap();
        assert_eq!(one.resolve(ip("192.0.2.1"), &h).ip(), ip("198.51.100.2"));
        let three = TrustedProxies::builder().hops(3).build().unwrap();
        assert_eq!(three.resolve(ip("192.0.2.1"), &h).ip(), ip("6.6.6.6"));
        // Fewer entries than hops: the chain bypassed a proxy.
        let five = TrustedProxies::builder().hops(5).build().unwrap();
        assert_eq!(five.resolve(ip("192.0.2.1"), &h).ip(), ip("192.0.2.1"));
    }

    #[test]
    fn all_trusted_chain_resolves_to_its_leftmost_trusted_hop() {
        let h = headers("x-forwarded-for", &["10.9.9.9, 10.1.1.1"]);
        assert_eq!(
            cidr("10.0.0.0/8").resolve(ip("10.0.0.1"), &h).ip(),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn forwarded_header_is_parsed_per_rfc7239() {
        let t = TrustedProxies::builder()
            .cidr("10.0.0.0/8")
            .header(ForwardedHeader::Forwarded)
            .build()
            .unwrap();
        let h = headers(
            "forwarded",
            &[r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https, For=10.2.2.2"#],
        );
        assert_eq!(t.resolve(ip("10.0.0.1"), &h).ip(), ip("2001:db8::7"));
        let h = headers("forwarded", &["for=_hidden"]);
        assert_eq!(t.resolve(ip("10.0.0.1"), &h).ip(), ip("10.0.0.1"));
        // X-Forwarded-For is not read in this mode.
        let h = headers("x-forwarded-for", &["1.1.1.1"]);
        assert_eq!(t.resolve(ip("10.0.0.1"), &h).ip(), ip("10.0.0.1"));
    }

    #[test]
    fn mapped_ipv6_peers_match_ipv4_cidrs() {
        let c = cidr("10.0.0.0/8").resolve(
            ip("::ffff:10.0.0.1"),
            &headers("x-forwarded-for", &["1.2.3.4"]),
        );
        assert_eq!(c, ClientIp::new(ip("1.2.3.4"), true));
    }

    #[test]
    fn bad_config_is_rejected() {
        assert!(
            TrustedProxies::builder()
                .cidr("10.0.0.0/33")
                .build()
                .is_err()
        );
        let err = TrustedProxies::builder().cidr("nope").build().unwrap_err();
        assert!(err.to_string().contains("`nope`"), "{err}");
        assert!(
            std::error::Error::source(&err).is_some(),
            "the parse error is kept"
        );
        assert!(TrustedProxies::builder().hops(0).build().is_err());
        assert!(
            TrustedProxies::builder()
                .cidr("192.168.1.1")
                .build()
                .is_ok()
        );
    }
}
