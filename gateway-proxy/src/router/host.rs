//! Which host a request is for, validated per RFC 9112 §3.2 and RFC 9113 §8.3.1.

use std::borrow::Cow;

use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{Request, Version};

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
/// the request names no host (HTTP/1.0 without `Host`).
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<Option<Cow<'_, str>>, HostError> {
    let mut values = req.headers().get_all(HOST).iter();
    let header = values.next();
    if values.next().is_some() {
        return Err(HostError::Multiple);
    }
    let header = header
        .map(|v| parse_authority(v.as_bytes()).ok_or(HostError::Invalid))
        .transpose()?;
    let scheme = req.uri().scheme();
    match (req.uri().authority(), header) {
        (Some(target), Some(header)) => {
            if same_host(target, &header, scheme) {
                Ok(Some(normalize(target.host())))
            } else {
                Err(HostError::Mismatch)
            }
        }
        (Some(target), None) => {
            if req.version() == Version::HTTP_11 {
                Err(HostError::Missing)
            } else {
                Ok(Some(normalize(target.host())))
            }
        }
        (None, Some(header)) => Ok(Some(normalize_owned(header))),
        (None, None) => {
            if req.version() == Version::HTTP_11 {
                Err(HostError::Missing)
            } else {
                Ok(None)
            }
        }
    }
}

fn parse_authority(bytes: &[u8]) -> Option<Authority> {
    if bytes.is_empty() || bytes.contains(&b'@') {
        return None;
    }
    let authority = Authority::try_from(bytes).ok()?;
    if authority.host().is_empty() {
        return None;
    }
    // `Authority` is lenient about the port (`host:`, `host:port`); ours must be a number.
    let rest = authority.as_str().strip_prefix(authority.host())?;
    match rest.strip_prefix(':') {
        None if rest.is_empty() => Some(authority),
        Some(port) if !port.is_empty() && port.parse::<u16>().is_ok() => Some(authority),
        _ => None,
    }
}

fn same_host(target: &Authority, header: &Authority, scheme: Option<&Scheme>) -> bool {
    let default = match scheme {
        Some(s) if *s == Scheme::HTTPS => 443,
        _ => 80,
    };
    normalize(target.host()) == normalize(header.host())
        && target.port_u16().unwrap_or(default) == header.port_u16().unwrap_or(default)
}

fn normalize(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

fn normalize_owned(authority: Authority) -> Cow<'static, str> {
    Cow::Owned(normalize(authority.host()).into_owned())
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
        assert_eq!(host(&req(Version::HTTP_11, "/", &["GW:8080"])), Ok(Some("gw".into())));
        assert_eq!(host(&req(Version::HTTP_11, "/", &["gw."])), Ok(Some("gw".into())));
        assert_eq!(host(&req(Version::HTTP_11, "/", &[])), Err(HostError::Missing));
        assert_eq!(host(&req(Version::HTTP_11, "/", &["a", "b"])), Err(HostError::Multiple));
        assert_eq!(host(&req(Version::HTTP_11, "/", &["a", "a"])), Err(HostError::Multiple));
        for bad in ["", "a b", "u@gw", "gw:", "gw:port", "gw/x"] {
            assert_eq!(
                host(&req(Version::HTTP_11, "/", &[bad])),
                Err(HostError::Invalid),
                "{bad:?}"
            );
        }
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
