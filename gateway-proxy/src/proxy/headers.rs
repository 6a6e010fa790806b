//! Header rules of a proxy hop (RFC 9110 §7.6.1) and the forwarding headers.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::IpAddr;

use http::header::{FORWARDED, HeaderMap, HeaderName, HeaderValue};

use crate::h1::fields::{self, Field, Fields};

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Prepares a request's headers for the next hop: removes every header named in
/// `Connection`, the hop-by-hop headers, `Content-Length` (the framing is set for the next
/// hop from the body itself) and `Expect` (the gateway answers `100-continue` to the client
/// when the body is first read; the upstream gets a request without the expectation).
pub(crate) fn strip_request(headers: &mut HeaderMap) {
    fields::remove(
        headers,
        Fields::HOP_BY_HOP
            .with(Field::ContentLength)
            .with(Field::Expect),
    );
}

/// Prepares a response's headers for the next hop: removes every header named in
/// `Connection`, the hop-by-hop headers, and `Content-Length` unless `keep_content_length`
/// (responses to `HEAD` and `304`s, whose length describes a body that is not sent).
pub(crate) fn strip_response(headers: &mut HeaderMap, keep_content_length: bool) {
    let set = if keep_content_length {
        Fields::HOP_BY_HOP
    } else {
        Fields::HOP_BY_HOP.with(Field::ContentLength)
    };
    fields::remove(headers, set);
}

/// Forwarding headers and their look-alikes, by their name with `-`, `_` and `.` removed,
/// with the one spelling that is kept from trusted peers.
const FORWARDING: [(&[u8], &str); 17] = [
    (b"xforwardedfor", "x-forwarded-for"),
    (b"xforwardedproto", "x-forwarded-proto"),
    (b"xforwardedhost", "x-forwarded-host"),
    (b"xforwardedport", "x-forwarded-port"),
    (b"xforwardedprefix", "x-forwarded-prefix"),
    (b"xforwardedserver", "x-forwarded-server"),
    (b"xforwardedscheme", "x-forwarded-scheme"),
    (b"xforwardedssl", "x-forwarded-ssl"),
    (b"xforwarded", "x-forwarded"),
    (b"forwarded", "forwarded"),
    (b"forwardedfor", "forwarded-for"),
    (b"xrealip", "x-real-ip"),
    (b"xclientip", "x-client-ip"),
    (b"clientip", "client-ip"),
    (b"trueclientip", "true-client-ip"),
    (b"xoriginalforwardedfor", "x-original-forwarded-for"),
    (b"xclusterclientip", "x-cluster-client-ip"),
];

/// The first three letters of every name in [`FORWARDING`].
const PREFIXES: [[u8; 3]; 7] = [
    *b"xfo", *b"xre", *b"xcl", *b"xor", *b"for", *b"cli", *b"tru",
];

/// Removes client-sent forwarding headers: all of them from untrusted peers, and from
/// trusted peers every look-alike spelling (`X_Forwarded_For`, `x.forwarded.for`, ...) that
/// some upstream frameworks would read as the real header.
pub(crate) fn scrub_forwarding(headers: &mut HeaderMap, trusted_peer: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let s = name.as_str().as_bytes();
        if !matches!(s.first(), Some(b'x' | b'f' | b't' | b'c')) {
            continue;
        }
        let mut folded = [0u8; 32];
        let mut n = 0;
        for &b in s {
            if matches!(b, b'-' | b'_' | b'.') {
                continue;
            }
            if n == folded.len() {
                n = 0;
                break;
            }
            folded[n] = b;
            n += 1;
            // Most names that start like one of these are none of them (`traceparent`,
            // `cache-control`): they are let go after three letters.
            if n == 3 && !PREFIXES.contains(&[folded[0], folded[1], folded[2]]) {
                n = 0;
                break;
            }
        }
        if let Some((_, canonical)) = FORWARDING.iter().find(|(f, _)| *f == &folded[..n])
            && (!trusted_peer || name.as_str() != *canonical)
        {
            doomed.push(name.clone());
        }
    }
    for name in &doomed {
        headers.remove(name);
    }
}

/// An IP address as a header value (`1.2.3.4`, `2001:db8::1`).
///
/// Each thread keeps the last address it formatted: the requests of one connection, which
/// one thread serves back to back, then share one value (a reference count) instead of
/// formatting, allocating and freeing it each time.
pub(crate) fn ip_value(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((cached, value)) if *cached == ip => value.clone(),
        _ => {
            let value = format_ip(ip);
            *last = Some((ip, value.clone()));
            value
        }
    })
}

/// `ip` as a header value, formatted without the heap.
fn format_ip(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 64];
    let len = match ip {
        // The common case without the formatting machinery.
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            len
        }
        IpAddr::V6(_) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // NOTE: an IPv6 address is at most 45 bytes, so it always fits the buffer.
            let _ = write!(cursor, "{ip}");
            usize::try_from(cursor.position()).unwrap_or(0)
        }
    };
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Appends `ip` to an existing `X-Forwarded-For` chain (all its lines joined in order).
pub(crate) fn append_forwarded_for(headers: &mut HeaderMap, ip: IpAddr) {
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(X_FORWARDED_FOR) {
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    let value = if joined.is_empty() {
        ip_value(ip)
    } else {
        joined.extend_from_slice(b", ");
        let _ = write!(joined, "{ip}");
        HeaderValue::from_bytes(&joined).unwrap_or_else(|_| ip_value(ip))
    };
    headers.insert(X_FORWARDED_FOR, value);
}

/// Appends an RFC 7239 element for this hop to `Forwarded`.
pub(crate) fn append_forwarded(
    headers: &mut HeaderMap,
    client: Option<IpAddr>,
    proto: &str,
    host: Option<&HeaderValue>,
) {
    let mut element: Vec<u8> = Vec::with_capacity(64);
    match client {
        Some(IpAddr::V4(ip)) => {
            let _ = write!(element, "for={ip}");
        }
        Some(IpAddr::V6(ip)) => {
            let _ = write!(element, "for=\"[{ip}]\"");
        }
        None => element.extend_from_slice(b"for=unknown"),
    }
    let _ = write!(element, ";proto={proto}");
    if let Some(host) = host.map(HeaderValue::as_bytes)
        && !host
            .iter()
            .any(|b| matches!(b, b'"' | b'\\') || b.is_ascii_control())
    {
        element.extend_from_slice(b";host=\"");
        element.extend_from_slice(host);
        element.push(b'"');
    }
    if let Ok(value) = HeaderValue::from_bytes(&element) {
        headers.append(FORWARDED, value);
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn ip_values_match_the_standard_formatting() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "100.101.109.110",
            "255.255.255.255",
            "9.99.199.200",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(format_ip(parsed), ip, "{ip}");
            // Twice: the second answer is the cached one.
            assert_eq!(ip_value(parsed), ip, "{ip}");
            assert_eq!(ip_value(parsed), ip, "{ip}");
        }
    }

    #[test]
    fn connection_nominated_and_hop_by_hop_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("content-length", "5"),
            ("expect", "100-continue"),
            ("x-kept", "3"),
            ("trailer", "grpc-status"),
        ]);
        let mut response = h.clone();
        strip_request(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["trailer", "x-kept"]);
        // A response keeps `Expect` (it means nothing there), and drops the rest alike.
        strip_response(&mut response, false);
        let mut left: Vec<_> = response.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["expect", "trailer", "x-kept"]);
    }

    #[test]
    fn without_connection_nothing_else_is_nominated() {
        let mut h = map(&[
            ("te", "trailers"),
            ("x-secret", "1"),
            ("content-length", "5"),
        ]);
        strip_response(&mut h, true);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-secret"]);
    }

    #[test]
    fn content_length_can_be_kept() {
        let mut h = map(&[("content-length", "5")]);
        strip_response(&mut h, true);
        assert_eq!(h["content-length"], "5");
        strip_response(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn every_forwarding_name_starts_with_a_known_prefix() {
        for (folded, _) in FORWARDING {
            assert!(
                PREFIXES.contains(&[folded[0], folded[1], folded[2]]),
                "{}",
                String::from_utf8_lossy(folded)
            );
        }
    }

    #[test]
    fn lookalikes_are_scrubbed() {
        let all = [
            ("x-forwarded-for", "1"),
            ("x_forwarded_for", "2"),
            ("x.forwarded.for", "3"),
            ("x-forwarded_host", "4"),
            ("forwarded", "5"),
            ("x-real-ip", "6"),
            ("true-client-ip", "7"),
            ("x-forwarded-proto", "8"),
            ("x-request-id", "9"),
            ("xforwardedfor", "10"),
            ("traceparent", "11"),
            ("x-cluster-client-ip", "12"),
        ];
        let mut untrusted = map(&all);
        scrub_forwarding(&mut untrusted, false);
        assert_eq!(
            untrusted.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-request-id", "traceparent"]
        );

        let mut trusted = map(&all);
        scrub_forwarding(&mut trusted, true);
        let mut left: Vec<_> = trusted.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "forwarded",
                "traceparent",
                "true-client-ip",
                "x-cluster-client-ip",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-real-ip",
                "x-request-id"
            ]
        );
    }

    #[test]
    fn forwarded_for_chain_is_joined_and_appended() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.1");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "2001:db8::1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }

    #[test]
    fn rfc7239_elements() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("gw:8080");
        append_forwarded(
            &mut h,
            Some("2001:db8::1".parse().unwrap()),
            "https",
            Some(&host),
        );
        append_forwarded(&mut h, Some("192.0.2.1".parse().unwrap()), "http", None);
        let v: Vec<_> = h.get_all("forwarded").iter().collect();
        assert_eq!(v[0], r#"for="[2001:db8::1]";proto=https;host="gw:8080""#);
        assert_eq!(v[1], "for=192.0.2.1;proto=http");
    }
}
