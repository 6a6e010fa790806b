//! What field names and values mean to HTTP/1.1 framing and to the connection: the one
//! table of hop-by-hop fields (RFC 9110 §7.6.1), the fields a trailer must not carry, and
//! the reading of `Connection`, `TE` and `Upgrade`. The codec, the server and the proxy all
//! ask here.

use http::HeaderMap;
use http::header::{
    CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// The fields HTTP/1.1 gives a meaning to, told apart by their raw name (so that a field
/// that is dropped never becomes a `HeaderName`). The first nine are hop-by-hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Field {
    Connection,
    ProxyConnection,
    KeepAlive,
    TransferEncoding,
    Te,
    Upgrade,
    ProxyAuthorization,
    ProxyAuthenticate,
    Http2Settings,
    ContentLength,
    Expect,
    Host,
    Trailer,
    /// A field named like the `close` option: known, so that `Connection: close` (on
    /// every message that closes) makes no `HeaderName` of the option to remove it.
    Close,
    Other,
}

/// A set of [`Field`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Fields(u16);

// === impl Field ===

impl Field {
    const ALL: [Self; 14] = [
        Self::Connection,
        Self::ProxyConnection,
        Self::KeepAlive,
        Self::TransferEncoding,
        Self::Te,
        Self::Upgrade,
        Self::ProxyAuthorization,
        Self::ProxyAuthenticate,
        Self::Http2Settings,
        Self::ContentLength,
        Self::Expect,
        Self::Host,
        Self::Trailer,
        Self::Close,
    ];

    /// The field a raw name stands for, in any case.
    pub(crate) fn of(name: &[u8]) -> Self {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        // NOTE: a switch on the length, then one or two comparisons.
        match name.len() {
            2 if is(b"te") => Self::Te,
            4 if is(b"host") => Self::Host,
            5 if is(b"close") => Self::Close,
            6 if is(b"expect") => Self::Expect,
            7 if is(b"upgrade") => Self::Upgrade,
            7 if is(b"trailer") => Self::Trailer,
            10 if is(b"connection") => Self::Connection,
            10 if is(b"keep-alive") => Self::KeepAlive,
            14 if is(b"content-length") => Self::ContentLength,
            14 if is(b"http2-settings") => Self::Http2Settings,
            16 if is(b"proxy-connection") => Self::ProxyConnection,
            17 if is(b"transfer-encoding") => Self::TransferEncoding,
            18 if is(b"proxy-authenticate") => Self::ProxyAuthenticate,
            19 if is(b"proxy-authorization") => Self::ProxyAuthorization,
            _ => Self::Other,
        }
    }

    /// Whether the field only ever describes one hop (RFC 9110 §7.6.1).
    pub(crate) const fn is_hop_by_hop(self) -> bool {
        (self as u8) <= Self::Http2Settings as u8
    }

    /// The field's name (`None` for [`Field::Other`]).
    fn name(self) -> Option<HeaderName> {
        Some(match self {
            Self::Connection => CONNECTION,
            Self::ProxyConnection => HeaderName::from_static("proxy-connection"),
            Self::KeepAlive => HeaderName::from_static("keep-alive"),
            Self::TransferEncoding => TRANSFER_ENCODING,
            Self::Te => TE,
            Self::Upgrade => UPGRADE,
            Self::ProxyAuthorization => PROXY_AUTHORIZATION,
            Self::ProxyAuthenticate => PROXY_AUTHENTICATE,
            Self::Http2Settings => HeaderName::from_static("http2-settings"),
            Self::ContentLength => CONTENT_LENGTH,
            Self::Expect => EXPECT,
            Self::Host => HOST,
            Self::Trailer => TRAILER,
            Self::Close => HeaderName::from_static("close"),
            Self::Other => return None,
        })
    }
}

// === impl Fields ===

impl Fields {
    /// The hop-by-hop fields.
    pub(crate) const HOP_BY_HOP: Self = Self((1 << (Field::Http2Settings as u16 + 1)) - 1);
    /// What a trailer section must not carry: framing, routing and connection control
    /// (RFC 9110 §6.5.1), which a proxy never forwards.
    pub(crate) const NOT_IN_TRAILERS: Self = Self::HOP_BY_HOP
        .with(Field::ContentLength)
        .with(Field::Host)
        .with(Field::Trailer);

    /// This set and `field`.
    pub(crate) const fn with(self, field: Field) -> Self {
        match field {
            Field::Other => self,
            field => Self(self.0 | 1 << field as u16),
        }
    }

    pub(crate) const fn contains(self, field: Field) -> bool {
        !matches!(field, Field::Other) && self.0 & (1 << field as u16) != 0
    }

    const fn intersect(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The known fields `map` has.
    fn in_map(map: &HeaderMap) -> Self {
        map.keys().fold(Self::default(), |set, name| {
            set.with(Field::of(name.as_str().as_bytes()))
        })
    }
}

/// Removes from `map` the fields of `set`, and when `Connection` is among them, every field
/// it nominates (RFC 9110 §7.6.1).
pub(crate) fn remove(map: &mut HeaderMap, set: Fields) {
    // One pass over the names finds which known fields are there (a response usually has
    // `Connection` and `Content-Length`, a request none): removing only those is cheaper
    // than a dozen removals, each of which hashes its name and probes the map.
    let present = Fields::in_map(map);
    let mut doomed = present.intersect(set);
    if doomed.is_empty() {
        return;
    }
    let mut nominated: Vec<HeaderName> = Vec::new();
    if doomed.contains(Field::Connection) {
        for value in map.get_all(CONNECTION) {
            for token in tokens(value.as_bytes()) {
                match Field::of(token) {
                    Field::Other => {
                        if let Ok(name) = HeaderName::from_bytes(token) {
                            nominated.push(name);
                        }
                    }
                    // A known name needs no allocation (`close`, `keep-alive`, `upgrade`
                    // are the usual tokens), and is removed below if the map has it.
                    field => doomed = doomed.with(field),
                }
            }
        }
        doomed = doomed.intersect(present);
    }
    for name in &nominated {
        map.remove(name);
    }
    for field in Field::ALL {
        if doomed.contains(field)
            && let Some(name) = field.name()
        {
            map.remove(name);
        }
    }
}

/// The comma-separated elements of a field value, trimmed of whitespace, empty ones
/// skipped (RFC 9110 §5.6.1).
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// How many bytes at the start of `s` are `tchar`s (RFC 9110 §5.6.2): the length of the
/// token there.
pub(crate) fn token_len(s: &[u8]) -> usize {
    s.iter()
        .take_while(|&&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
        .count()
}

/// Whether a `Connection` header lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| tokens(v.as_bytes()))
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a `TE` element is `trailers` (its parameters aside).
pub(crate) fn is_te_trailers(element: &[u8]) -> bool {
    let name = element.split(|&b| b == b';').next().unwrap_or_default();
    name.trim_ascii().eq_ignore_ascii_case(b"trailers")
}

/// Whether the client accepts trailers (`TE: trailers`).
pub(crate) fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(TE)
        .iter()
        .flat_map(|v| tokens(v.as_bytes()))
        .any(is_te_trailers)
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request that may be tunnelled: `Connection`
/// lists `upgrade` and the protocol is not `h2c` (an h2c upgrade is never forwarded).
pub(crate) fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(UPGRADE)?;
    let h2c = tokens(upgrade.as_bytes()).any(|p| p.eq_ignore_ascii_case(b"h2c"));
    (!h2c && connection_has(headers, "upgrade")).then(|| upgrade.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_read_back_from_its_name() {
        for field in Field::ALL {
            let name = field.name().expect("a known field");
            assert_eq!(Field::of(name.as_str().as_bytes()), field, "{name}");
            assert_eq!(
                Field::of(name.as_str().to_ascii_uppercase().as_bytes()),
                field
            );
        }
        assert_eq!(Field::of(b"x-connection"), Field::Other);
        assert_eq!(Field::of(b"trailers"), Field::Other);
    }

    #[test]
    fn the_hop_by_hop_set_is_rfc_9110s() {
        let hop: Vec<_> = Field::ALL
            .into_iter()
            .filter(|f| Fields::HOP_BY_HOP.contains(*f))
            .collect();
        assert!(hop.iter().all(|f| f.is_hop_by_hop()));
        assert_eq!(hop.len(), 9);
        for field in [
            Field::ContentLength,
            Field::Expect,
            Field::Host,
            Field::Trailer,
        ] {
            assert!(!field.is_hop_by_hop());
            assert!(Fields::NOT_IN_TRAILERS.contains(field) != (field == Field::Expect));
        }
        assert!(!Fields::HOP_BY_HOP.contains(Field::Other));
        // The codec's set is the one the other crates use.
        let mut names: Vec<_> = hop.iter().filter_map(|f| f.name()).collect();
        let mut shared = gateway_core::fields::HOP_BY_HOP.to_vec();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        shared.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(names, shared);
    }

    fn map<const N: usize>(pairs: [(&'static str, &'static str); N]) -> HeaderMap {
        pairs
            .into_iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn upgrade_detection() {
        assert!(
            upgrade_request(&map([("connection", "Upgrade"), ("upgrade", "websocket")])).is_some()
        );
        assert!(upgrade_request(&map([("upgrade", "websocket")])).is_none());
        assert!(upgrade_request(&map([("connection", "upgrade"), ("upgrade", "h2c")])).is_none());
        assert!(
            upgrade_request(&map([("connection", "upgrade"), ("upgrade", "foo, H2C")])).is_none()
        );
    }

    #[test]
    fn trailers_acceptance() {
        assert!(accepts_trailers(&map([("te", "gzip, trailers")])));
        assert!(accepts_trailers(&map([("te", "trailers;q=1")])));
        assert!(!accepts_trailers(&map([("te", "gzip")])));
    }

    #[test]
    fn tokens_are_trimmed_and_empty_ones_skipped() {
        let got: Vec<_> = tokens(b" a ,,\tB, ").collect();
        assert_eq!(got, [&b"a"[..], b"B"]);
        assert!(is_te_trailers(b" Trailers ;q=1"));
        assert!(!is_te_trailers(b"trailer"));
    }
}
