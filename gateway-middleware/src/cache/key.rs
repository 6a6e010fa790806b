//! What a stored response is found by: the request's scheme, host, path and query (the
//! primary key, RFC 9111 §4), then the request fields its `Vary` names, normalised
//! (§4.1).

use std::fmt;

use bytes::Bytes;
use gateway_core::purge::{key_url, key_url_of};
use http::header::{HOST, VARY};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// The most `Vary` field names one stored response may select on; a response naming
/// more is not stored (each is compared on every hit).
pub const MAX_VARY: usize = 8;

/// The primary key of a request: `scheme://host[:port]path?query`, the host lowercased
/// and a default port left out. Only what the client asked for is in it: never a
/// forwarded host or any other field a client could send to poison another client's
/// entry (the key of Pingora's CVE-2026-2836 had no host).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key(Bytes);

impl Key {
    /// The key of a request for `uri` with fields `headers`, reached over TLS when
    /// `tls`; `None` when it names no host (an HTTP/1.0 request without `Host`), which is
    /// not cached.
    pub fn of(uri: &Uri, headers: &HeaderMap, tls: bool) -> Option<Self> {
        let host = match uri.authority() {
            Some(authority) => authority.as_str(),
            None => headers.get(HOST)?.to_str().ok()?,
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        key_url(tls, host, path).map(|url| Self(Bytes::from(url)))
    }

    /// The key of an absolute `http` or `https` URL (a `Location`), normalised as
    /// [`of`](Self::of) normalises a request's (and the admin listener a purge's URL);
    /// `None` for another scheme or no host.
    pub fn from_absolute(url: &str) -> Option<Self> {
        key_url_of(url).map(|url| Self(Bytes::from(url)))
    }

    /// The key as text (the URL it stands for).
    pub fn as_str(&self) -> &str {
        // NOTE: built from `&str` pieces only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A key from its text (as [`as_str`](Self::as_str) gave it), for a purge.
    pub fn from_url(url: &str) -> Self {
        Self(Bytes::copy_from_slice(url.as_bytes()))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Key").field(&self.as_str()).finish()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The request fields a stored response was selected by (its `Vary`), with the values
/// its request had, normalised: a later request matches when its own normalised values
/// are the same.
#[derive(Clone, Debug, Default)]
pub struct Selection(Vec<Selected>);

/// One field a response varies on, with the value its request had.
#[derive(Clone, Debug)]
struct Selected {
    name: HeaderName,
    /// The value normalised; `None` when the request had no such field.
    normalised: Option<Bytes>,
    /// The value as sent, when it was one field line: a later request sending the very
    /// same bytes matches without normalising (the common case, and no allocation).
    raw: Option<HeaderValue>,
}

impl PartialEq for Selection {
    /// The same fields with the same normalised values.
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|(a, b)| a.name == b.name && a.normalised == b.normalised)
    }
}

impl Eq for Selection {}

/// Why a response's `Vary` cannot be honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaryError {
    /// `Vary: *`: no request matches.
    Star,
    /// More than [`MAX_VARY`] names, or a name that is not a field name.
    Unsupported,
}

impl Selection {
    /// The selection of a response with headers `res` to a request with headers `req`.
    ///
    /// # Errors
    ///
    /// When the response's `Vary` cannot be honoured.
    pub fn of(req: &HeaderMap, res: &HeaderMap) -> Result<Self, VaryError> {
        let mut names: Vec<HeaderName> = Vec::new();
        for value in res.get_all(VARY) {
            for name in value.as_bytes().split(|&b| b == b',') {
                let name = name.trim_ascii();
                if name.is_empty() {
                    continue;
                }
                if name == b"*" {
                    return Err(VaryError::Star);
                }
                let name = HeaderName::from_bytes(name).map_err(|_| VaryError::Unsupported)?;
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        if names.len() > MAX_VARY {
            return Err(VaryError::Unsupported);
        }
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(Self(
            names
                .into_iter()
                .map(|name| {
                    let mut values = req.get_all(&name).iter();
                    let raw = match (values.next(), values.next()) {
                        (Some(one), None) => Some(one.clone()),
                        _ => None,
                    };
                    Selected {
                        normalised: normalised(req, &name),
                        raw,
                        name,
                    }
                })
                .collect(),
        ))
    }

    /// Whether a request with headers `req` selects the same response.
    pub fn matches(&self, req: &HeaderMap) -> bool {
        self.0.iter().all(|selected| {
            let mut values = req.get_all(&selected.name).iter();
            match (values.next(), values.next(), &selected.raw) {
                (None, _, _) => selected.normalised.is_none(),
                (Some(one), None, Some(raw)) if one == raw => true,
                _ => normalised(req, &selected.name) == selected.normalised,
            }
        })
    }

    /// The selected fields and their normalised values as bytes: equal for equal
    /// selections (a remote store's name for a variant).
    pub fn id(&self) -> Vec<u8> {
        let mut w = super::codec::Writer::default();
        self.write_with(&mut w, false);
        w.into_vec()
    }

    pub(super) fn write(&self, w: &mut super::codec::Writer) {
        self.write_with(w, true);
    }

    /// The fields and normalised values, and the raw values when `raw`.
    fn write_with(&self, w: &mut super::codec::Writer, raw: bool) {
        w.u8(u8::try_from(self.0.len()).unwrap_or(u8::MAX));
        for selected in &self.0 {
            w.bytes(selected.name.as_str().as_bytes());
            w.optional(selected.normalised.as_deref());
            if raw {
                w.optional(selected.raw.as_ref().map(HeaderValue::as_bytes));
            }
        }
    }

    pub(super) fn read(r: &mut super::codec::Reader) -> Option<Self> {
        let n = usize::from(r.u8()?);
        if n > MAX_VARY {
            return None;
        }
        let mut selected = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.name()?;
            let normalised = r.optional()?;
            let raw = match r.optional()? {
                Some(raw) => Some(HeaderValue::from_maybe_shared(raw).ok()?),
                None => None,
            };
            selected.push(Selected {
                name,
                normalised,
                raw,
            });
        }
        Some(Self(selected))
    }

    /// The field names selected on.
    pub fn names(&self) -> impl Iterator<Item = &HeaderName> {
        self.0.iter().map(|selected| &selected.name)
    }

    /// Whether the response varies on nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The value of the fields `name` of `req` as a cache compares them (RFC 9111 §4.1): the
/// field lines combined, whitespace around list elements and their parameters removed;
/// for the fields whose tokens are case-insensitive, lowercased; for `Accept-Encoding`,
/// whose order carries no meaning, sorted. `None` when the request has no such field.
fn normalised(req: &HeaderMap, name: &HeaderName) -> Option<Bytes> {
    let mut values = req.get_all(name).iter().peekable();
    values.peek()?;
    let lower = matches!(
        name.as_str(),
        "accept-encoding" | "accept-language" | "accept-charset"
    );
    let mut elements: Vec<Vec<u8>> = Vec::new();
    for value in values {
        for element in value.as_bytes().split(|&b| b == b',') {
            let element = element.trim_ascii();
            if element.is_empty() {
                continue;
            }
            let mut clean = Vec::with_capacity(element.len());
            for part in element.split(|&b| b == b';') {
                if !clean.is_empty() {
                    clean.push(b';');
                }
                let part = part.trim_ascii();
                match part.iter().position(|&b| b == b'=') {
                    Some(eq) => {
                        clean.extend_from_slice(part[..eq].trim_ascii());
                        clean.push(b'=');
                        clean.extend_from_slice(part[eq + 1..].trim_ascii());
                    }
                    None => clean.extend_from_slice(part),
                }
            }
            if lower {
                clean.make_ascii_lowercase();
            }
            elements.push(clean);
        }
    }
    if name == http::header::ACCEPT_ENCODING {
        elements.sort();
    }
    Some(Bytes::from(elements.join(&b","[..])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, request};

    fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut req = Request::get(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap().into_parts().0
    }

    fn key(uri: &str, headers: &[(&str, &str)], tls: bool) -> Option<String> {
        let parts = parts(uri, headers);
        Key::of(&parts.uri, &parts.headers, tls).map(|k| k.to_string())
    }

    #[test]
    fn an_absolute_url_has_the_key_of_its_request() {
        for (url, target, host, tls) in [
            (
                "http://API.example.com:80/a?b",
                "/a?b",
                "api.example.com",
                false,
            ),
            ("HTTPS://u@Example.com:443", "/", "example.com", true),
            (
                "https://example.com:8443?q",
                "/?q",
                "example.com:8443",
                true,
            ),
        ] {
            assert_eq!(
                Key::from_absolute(url).map(|k| k.to_string()),
                key(target, &[("host", host)], tls),
                "{url}"
            );
        }
        assert!(Key::from_absolute("ftp://example.com/").is_none());
        assert!(Key::from_absolute("http:///a").is_none());
    }

    #[test]
    fn the_key_has_scheme_host_path_and_query() {
        assert_eq!(
            key("/a/b?x=1&y=2", &[("host", "API.Example.com")], false).as_deref(),
            Some("http://api.example.com/a/b?x=1&y=2")
        );
        assert_eq!(
            key("/a", &[("host", "example.com:443")], true).as_deref(),
            Some("https://example.com/a"),
            "a default port is left out"
        );
        assert_eq!(
            key("/a", &[("host", "example.com:8443")], true).as_deref(),
            Some("https://example.com:8443/a")
        );
        assert_eq!(
            key("http://b.example/x", &[("host", "a.example")], false).as_deref(),
            Some("http://b.example/x"),
            "the absolute form's authority is the host"
        );
        assert_eq!(key("/a", &[], false), None, "no host, no key");
        // Hosts, schemes and queries apart are keys apart; unkeyed fields change nothing.
        let a = key("/x", &[("host", "a.example")], false);
        assert_ne!(a, key("/x", &[("host", "b.example")], false));
        assert_ne!(a, key("/x", &[("host", "a.example")], true));
        assert_ne!(a, key("/x?a=1", &[("host", "a.example")], false));
        assert_eq!(
            a,
            key(
                "/x",
                &[("host", "a.example"), ("x-forwarded-host", "evil.example")],
                false
            )
        );
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        parts("/", fields).headers
    }

    #[test]
    fn vary_selects_on_normalised_values() {
        let res = headers(&[
            ("vary", "Accept-Encoding, accept-language"),
            ("vary", "x-a"),
        ]);
        let req = headers(&[
            ("accept-encoding", "gzip, br"),
            ("accept-language", "en-GB"),
        ]);
        let selection = Selection::of(&req, &res).unwrap();
        let names: Vec<&str> = selection.names().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept-encoding", "accept-language", "x-a"]);
        assert!(selection.matches(&req));
        assert!(selection.matches(&headers(&[
            ("accept-encoding", "BR"),
            ("accept-encoding", "gzip"),
            ("accept-language", "en-gb"),
        ])));
        assert!(!selection.matches(&headers(&[
            ("accept-encoding", "gzip"),
            ("accept-language", "en-GB"),
        ])));
        assert!(
            !selection.matches(&headers(&[
                ("accept-encoding", "gzip, br"),
                ("accept-language", "en-GB"),
                ("x-a", "1"),
            ])),
            "absent and present differ"
        );
        assert!(!selection.matches(&headers(&[("accept-encoding", "identity")])));
        // Parameters' whitespace does not matter; their values' case does, outside the
        // case-insensitive fields.
        let res = headers(&[("vary", "accept")]);
        let s = Selection::of(&headers(&[("accept", "text/html; q=0.9")]), &res).unwrap();
        assert!(s.matches(&headers(&[("accept", "text/html;q=0.9")])));
        assert!(!s.matches(&headers(&[("accept", "text/html;q=0.8")])));
    }

    #[test]
    fn vary_star_and_too_many_names_are_refused() {
        let req = HeaderMap::new();
        assert_eq!(
            Selection::of(&req, &headers(&[("vary", "accept, *")])),
            Err(VaryError::Star)
        );
        let many = (0..=MAX_VARY)
            .map(|i| format!("x-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            Selection::of(&req, &headers(&[("vary", &many)])),
            Err(VaryError::Unsupported)
        );
        assert!(Selection::of(&req, &HeaderMap::new()).unwrap().is_empty());
    }
}
