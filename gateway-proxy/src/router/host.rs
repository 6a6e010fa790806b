//! Which host a request is for, validated per RFC 9112 §3.2 and RFC 9113 §8.3.1.

use std::borrow::Cow;

use http::header::HOST;
use http::uri::Scheme;
use http::{Request, Version};

use crate::h1::head::parse_length;

/// Why a request's host was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostError {
    /// An HTTP/1.1 request without `Host`.
    Missing,
    /// More than one `Host` header.
    Multiple,
    /// A `Host` that is not a valid `host[:port]`.
    Invalid,
    /// The target's authority and `Host` name different hosts.
    Mismatch,
}

/// The request's host, normalized (lower case, no port, no trailing dot), or `None` when
/// the request names no host (HTTP/1.0 without `Host`). Borrows from the request unless the
/// host has upper-case letters.
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<Option<Cow<'_, str>>, HostError> {
    let mut values = req.headers().get_all(HOST).iter();
    let header = values.next();
    if values.next().is_some() {
        return Err(HostError::Multiple);
    }
    let header = header
        .map(|v| split_authority(v.as_bytes()).ok_or(HostError::Invalid))
        .transpose()?;
    let target = req.uri().authority().map(|a| {
        // NOTE: `http` has already parsed the target's authority; only the port may be odd.
        (a.host(), a.port_u16())
    });
    let default_port = match req.uri().scheme() {
        Some(s) if *s == Scheme::HTTPS => 443,
        _ => 80,
    };
    match (target, header) {
        (Some((t_host, t_port)), Some((h_host, h_port))) => {
            if normalize(t_host) == normalize(h_host)
                && t_port.unwrap_or(default_port) == h_port.unwrap_or(default_port)
            {
                Ok(Some(normalize(t_host)))
            } else {
                Err(HostError::Mismatch)
            }
        }
        (Some(_), None) if req.version() == Version::HTTP_11 => Err(HostError::Missing),
        (Some((t_host, _)), None) => Ok(Some(normalize(t_host))),
        (None, Some((h_host, _))) => Ok(Some(normalize(h_host))),
        (None, None) if req.version() == Version::HTTP_11 => Err(HostError::Missing),
        (None, None) => Ok(None),
    }
}

/// Splits a `Host` value into host and port, validating RFC 3986 `host [ ":" port ]`:
/// an IP literal in brackets, or a non-empty reg-name / IPv4 address. User info, paths and
/// anything outside the grammar are refused. One pass over the bytes (this runs for every
/// request).
fn split_authority(bytes: &[u8]) -> Option<(&str, Option<u16>)> {
    let host_len = if bytes.first() == Some(&b'[') {
        let end = bytes.iter().position(|&b| b == b']')?;
        std::str::from_utf8(&bytes[1..end])
            .ok()?
            .parse::<std::net::Ipv6Addr>()
            .ok()?;
        end + 1
    } else {
        // A reg-name runs up to the first byte outside it, which must start the port.
        bytes
            .iter()
            .position(|&b| !REG_NAME[usize::from(b)])
            .unwrap_or(bytes.len())
    };
    if host_len == 0 {
        return None;
    }
    let port = match &bytes[host_len..] {
        [] => None,
        [b':', digits @ ..] => Some(u16::try_from(parse_length(digits)?).ok()?),
        _ => return None,
    };
    // NOTE: the host is ASCII (reg-name bytes, or an IPv6 literal that parsed).
    let host = std::str::from_utf8(&bytes[..host_len]).ok()?;
    Some((host, port))
}

/// The bytes of a reg-name or IPv4 address: unreserved, sub-delims and `%` (RFC 3986 §3.2.2),
/// as a table: this runs over every request's `Host`.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        b += 1;
    }
    table
};

fn normalize(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(target).version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn host(r: &Request<()>) -> Result<Option<String>, HostError> {
        request_host(r).map(|h| h.map(Cow::into_owned))
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        assert_eq!(
            host(&req(Version::HTTP_11, "/", &["GW:8080"])),
            Ok(Some("gw".into()))
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "/", &["gw."])),
            Ok(Some("gw".into()))
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "/", &[])),
            Err(HostError::Missing)
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "/", &["a", "b"])),
            Err(HostError::Multiple)
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "/", &["a", "a"])),
            Err(HostError::Multiple)
        );
        for bad in [
            "", "a b", "u@gw", "gw:", "gw:port", "gw/x", "[::1", "[nope]", "gw:99999", ":80",
        ] {
            assert_eq!(
                host(&req(Version::HTTP_11, "/", &[bad])),
                Err(HostError::Invalid),
                "{bad:?}"
            );
        }
    }

    /// The parser this file had before `split_authority` went to one pass.
    fn reference(bytes: &[u8]) -> Option<(&str, Option<u16>)> {
        let s = std::str::from_utf8(bytes).ok()?;
        let (host, port) = if s.starts_with('[') {
            let end = s.find(']')?;
            s[1..end].parse::<std::net::Ipv6Addr>().ok()?;
            (&s[..=end], &s[end + 1..])
        } else {
            let end = s.find(':').unwrap_or(s.len());
            let host = &s[..end];
            if host.is_empty() || !host.bytes().all(|b| REG_NAME[usize::from(b)]) {
                return None;
            }
            (host, &s[end..])
        };
        let port = match port.strip_prefix(':') {
            None if port.is_empty() => None,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse().ok()?)
            }
            _ => return None,
        };
        Some((host, port))
    }

    #[test]
    fn split_authority_agrees_with_the_reference_on_every_short_value() {
        // Every value of up to four bytes over an alphabet with each byte class the
        // grammar cares about, then longer ones around the edges of ports and literals.
        const ALPHABET: &[u8] = b"a0:[]@/. \xff%";
        let mut values: Vec<Vec<u8>> = vec![Vec::new()];
        let mut last = values.clone();
        for _ in 0..4 {
            last = last
                .iter()
                .flat_map(|v| {
                    ALPHABET.iter().map(move |&b| {
                        let mut v = v.clone();
                        v.push(b);
                        v
                    })
                })
                .collect();
            values.extend(last.iter().cloned());
        }
        for extra in [
            "gw:65535",
            "gw:65536",
            "gw:0",
            "gw:00080",
            "gw:99999999999",
            "gw:+80",
            "gw:-1",
            "[::1]",
            "[::1]:443",
            "[::1]x",
            "[::1]:",
            "[fe80::1%25eth0]",
            "[v1.x]",
            "[]",
            "GW.example.com.:8080",
            "a\u{e9}b",
            "\u{e9}",
            "a:\u{e9}",
        ] {
            values.push(extra.as_bytes().to_vec());
        }
        values.push(b"gw\xff:80".to_vec());
        for v in &values {
            assert_eq!(
                split_authority(v),
                reference(v),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn reg_name_table_is_rfc3986() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b);
            assert_eq!(REG_NAME[usize::from(b)], expected, "byte {b:#04x}");
        }
    }

    #[test]
    fn ip_literals_and_ports() {
        assert_eq!(
            host(&req(Version::HTTP_11, "/", &["[::1]:8080"])),
            Ok(Some("[::1]".into()))
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "/", &["127.0.0.1"])),
            Ok(Some("127.0.0.1".into()))
        );
    }

    #[test]
    fn http10_may_omit_host() {
        assert_eq!(host(&req(Version::HTTP_10, "/", &[])), Ok(None));
    }

    #[test]
    fn absolute_form_must_agree_with_host() {
        assert_eq!(
            host(&req(Version::HTTP_11, "http://gw/x", &["gw:80"])),
            Ok(Some("gw".into()))
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "http://other.host/", &["gw"])),
            Err(HostError::Mismatch)
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "http://gw:8080/", &["gw"])),
            Err(HostError::Mismatch)
        );
        assert_eq!(
            host(&req(Version::HTTP_11, "http://gw/", &[])),
            Err(HostError::Missing)
        );
    }

    #[test]
    fn http2_uses_authority_and_checks_host() {
        assert_eq!(
            host(&req(Version::HTTP_2, "https://gw/x", &[])),
            Ok(Some("gw".into()))
        );
        assert_eq!(
            host(&req(Version::HTTP_2, "https://gw/x", &["evil"])),
            Err(HostError::Mismatch)
        );
    }
}
