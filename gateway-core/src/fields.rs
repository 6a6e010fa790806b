//! Field names every crate treats the same way.

use http::header::{
    CONNECTION, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
};

/// The hop-by-hop fields (RFC 9110 §7.6.1, with the obsolete `Keep-Alive` and
/// `Proxy-Connection`, and HTTP/2's `HTTP2-Settings`): they describe one connection, so a
/// proxy never forwards them, a cache never stores them, and a header edit may not set
/// them. The fields a `Connection` field names are hop-by-hop too.
pub const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    TRANSFER_ENCODING,
    TE,
    UPGRADE,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
    HeaderName::from_static("http2-settings"),
];
