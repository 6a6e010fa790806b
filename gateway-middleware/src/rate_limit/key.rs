//! What a limit counts by: the client's address, the consumer, a header, the route, a
//! closure, or several of them together.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use gateway_core::{ClientIp, ConnectInfo, Identity};
use http::HeaderName;
use http::request;

/// What a limit counts by: requests with the same key share a bucket.
///
/// A part a request lacks (no consumer, no such header, a closure that returns `None`) is
/// replaced by the request's client address, as Kong does: a request never escapes a limit
/// by leaving a part out, and never lands in one bucket shared by every request without it.
///
/// The client address is [`ClientIp`], the right-most untrusted address (see
/// [`gateway_core::client_ip`]); IPv6 addresses are grouped by their /64 by default, since a
/// single host commonly holds a whole /64 and could otherwise mint a fresh bucket per
/// request.
///
/// ```
/// use gateway_middleware::rate_limit::Key;
/// use http::HeaderName;
///
/// let per_tenant_and_ip = Key::header(HeaderName::from_static("x-tenant")).and(Key::client_ip());
/// assert_eq!(per_tenant_and_ip.to_string(), "header:x-tenant+client-ip");
/// ```
///
/// A header is whatever the client sent, so a client that can choose it can choose its
/// bucket: key on a header only when a layer in front (auth, a trusted proxy) sets it.
#[derive(Clone)]
pub struct Key {
    parts: Arc<[Part]>,
    v4_prefix: u8,
    v6_prefix: u8,
}

/// What a key is made of, fed to a hash: a tag per part and the part's bytes.
pub(crate) trait Sink {
    /// One part of the key.
    fn part(&mut self, tag: u8, bytes: &[u8]);
}

type KeyFn = dyn Fn(&request::Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
enum Part {
    ClientIp,
    Consumer,
    Header(HeaderName),
    Route,
    Fn(Arc<KeyFn>),
}

// === impl Key ===

impl Key {
    fn of(part: Part) -> Self {
        Self {
            parts: Arc::from([part]),
            v4_prefix: 32,
            v6_prefix: 64,
        }
    }

    /// The client's address ([`ClientIp`]; the connection's peer when it is not set).
    pub fn client_ip() -> Self {
        Self::of(Part::ClientIp)
    }

    /// The consumer's name ([`Identity`], set by an auth layer in front); the client's
    /// address for the anonymous consumer and for requests without an identity.
    pub fn consumer() -> Self {
        Self::of(Part::Consumer)
    }

    /// The value of the header `name` (its first line); the client's address when absent.
    pub fn header(name: HeaderName) -> Self {
        Self::of(Part::Header(name))
    }

    /// The route: every request of the route in one bucket.
    pub fn route() -> Self {
        Self::of(Part::Route)
    }

    /// The string `f` makes of the request's head; the client's address when it makes
    /// none.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self::of(Part::Fn(Arc::new(f)))
    }

    /// This key and `other` together (`consumer` and `client_ip`: per consumer per
    /// address).
    pub fn and(self, other: Self) -> Self {
        let parts: Vec<Part> = self
            .parts
            .iter()
            .chain(other.parts.iter())
            .cloned()
            .collect();
        Self {
            parts: parts.into(),
            ..self
        }
    }

    /// Groups IPv6 client addresses by their first `bits` bits [default: 64; 128 keys each
    /// address apart].
    ///
    /// # Panics
    ///
    /// When `bits` is over 128.
    #[track_caller]
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        assert!(
            bits <= 128,
            "an IPv6 prefix is at most 128 bits, not {bits}"
        );
        self.v6_prefix = bits;
        self
    }

    /// Groups IPv4 client addresses by their first `bits` bits [default: 32, each address
    /// apart].
    ///
    /// # Panics
    ///
    /// When `bits` is over 32.
    #[track_caller]
    pub fn ipv4_prefix(mut self, bits: u8) -> Self {
        assert!(bits <= 32, "an IPv4 prefix is at most 32 bits, not {bits}");
        self.v4_prefix = bits;
        self
    }

    /// Whether `other` is this very key (a clone of it), so a request's key is made once
    /// for every limit that shares it.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.parts, &other.parts)
            && self.v4_prefix == other.v4_prefix
            && self.v6_prefix == other.v6_prefix
    }

    /// Feeds the key of `req` to `sink`.
    pub(crate) fn feed(&self, req: &request::Parts, sink: &mut impl Sink) {
        for part in self.parts.iter() {
            match part {
                Part::ClientIp => self.address(req, sink),
                Part::Consumer => match req.extensions.get::<Identity>() {
                    Some(id) if !id.is_anonymous() => sink.part(b'c', id.name().as_bytes()),
                    _ => self.address(req, sink),
                },
                Part::Header(name) => match req.headers.get(name) {
                    Some(value) => sink.part(b'h', value.as_bytes()),
                    None => self.address(req, sink),
                },
                Part::Route => sink.part(b'r', b""),
                Part::Fn(f) => match f(req) {
                    Some(key) => sink.part(b'f', key.as_bytes()),
                    None => self.address(req, sink),
                },
            }
        }
    }

    fn address(&self, req: &request::Parts, sink: &mut impl Sink) {
        let ip = req
            .extensions
            .get::<ClientIp>()
            .map(ClientIp::ip)
            .or_else(|| req.extensions.get::<ConnectInfo>().map(|c| c.peer.ip()));
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(ip)) => sink.part(b'4', &mask_v4(ip, self.v4_prefix).octets()),
            Some(IpAddr::V6(ip)) => sink.part(b'6', &mask_v6(ip, self.v6_prefix).octets()),
            None => sink.part(b'-', b""),
        }
    }
}

fn mask_v4(ip: Ipv4Addr, bits: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn mask_v6(ip: Ipv6Addr, bits: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

impl fmt::Display for Key {
    /// `client-ip`, `consumer`, `header:x-tenant`, `route`, `fn`, joined by `+`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            match part {
                Part::ClientIp => f.write_str("client-ip")?,
                Part::Consumer => f.write_str("consumer")?,
                Part::Header(name) => write!(f, "header:{name}")?,
                Part::Route => f.write_str("route")?,
                Part::Fn(_) => f.write_str("fn")?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("parts", &format_args!("{self}"))
            .field("ipv4_prefix", &self.v4_prefix)
            .field("ipv6_prefix", &self.v6_prefix)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    /// The parts fed, as text.
    #[derive(Default)]
    struct Parts(Vec<(char, Vec<u8>)>);

    impl Sink for Parts {
        fn part(&mut self, tag: u8, bytes: &[u8]) {
            self.0.push((char::from(tag), bytes.to_vec()));
        }
    }

    fn fed(key: &Key, req: &Request<()>) -> Vec<(char, Vec<u8>)> {
        let (parts, ()) = req.clone().into_parts();
        let mut out = Parts::default();
        key.feed(&parts, &mut out);
        out.0
    }

    fn from(ip: &str) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(ClientIp::new(ip.parse().unwrap(), false));
        req
    }

    #[test]
    fn ipv6_addresses_are_grouped_by_prefix() {
        let key = Key::client_ip();
        let a = fed(&key, &from("2001:db8:1:2:aaaa::1"));
        let b = fed(&key, &from("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        let c = fed(&key, &from("2001:db8:1:3::1"));
        assert_eq!(a, b, "one /64, one bucket");
        assert_ne!(a, c, "another /64, another bucket");

        let exact = Key::client_ip().ipv6_prefix(128);
        assert_ne!(
            fed(&exact, &from("2001:db8:1:2::1")),
            fed(&exact, &from("2001:db8:1:2::2"))
        );
        let wide = Key::client_ip().ipv6_prefix(48);
        assert_eq!(
            fed(&wide, &from("2001:db8:1:2::1")),
            fed(&wide, &from("2001:db8:1:ffff::1"))
        );
        let zero = Key::client_ip().ipv6_prefix(0);
        assert_eq!(fed(&zero, &from("::1")), fed(&zero, &from("2001:db8::1")));
    }

    #[test]
    fn ipv4_addresses_apart_unless_grouped_and_mapped_ones_are_ipv4() {
        let key = Key::client_ip();
        assert_ne!(fed(&key, &from("192.0.2.1")), fed(&key, &from("192.0.2.2")));
        assert_eq!(
            fed(&key, &from("192.0.2.1")),
            fed(&key, &from("::ffff:192.0.2.1")),
            "an IPv4-mapped address is the IPv4 address"
        );
        let grouped = Key::client_ip().ipv4_prefix(24);
        assert_eq!(
            fed(&grouped, &from("192.0.2.1")),
            fed(&grouped, &from("192.0.2.200"))
        );
    }

    #[test]
    fn a_missing_part_falls_back_to_the_address() {
        let key = Key::consumer();
        let anonymous = fed(&key, &from("192.0.2.1"));
        assert_eq!(anonymous, [('4', vec![192, 0, 2, 1])]);

        let mut req = from("192.0.2.1");
        req.extensions_mut().insert(Identity::anonymous());
        assert_eq!(
            fed(&key, &req),
            anonymous,
            "the anonymous consumer is keyed by address"
        );
        req.extensions_mut().insert(Identity::consumer("alice"));
        assert_eq!(fed(&key, &req), [('c', b"alice".to_vec())]);

        let header = Key::header(HeaderName::from_static("x-tenant")).and(Key::route());
        assert_eq!(fed(&header, &req)[0], ('4', vec![192, 0, 2, 1]));
        req.headers_mut().insert("x-tenant", "t1".parse().unwrap());
        assert_eq!(
            fed(&header, &req),
            [('h', b"t1".to_vec()), ('r', Vec::new())]
        );

        let f = Key::from_fn(|req| req.uri.query().map(str::to_owned));
        assert_eq!(fed(&f, &req)[0].0, '4');
        assert_eq!(f.to_string(), "fn");
        assert_eq!(fed(&Key::client_ip(), &Request::new(()))[0].0, '-');
    }
}
