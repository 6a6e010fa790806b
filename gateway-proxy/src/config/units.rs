//! Values a config file gives as text and that are checked as they are read: endpoint
//! URLs, CIDRs and listen addresses. (Durations and sizes are `gateway_core::units`,
//! shared with the plugins' sections.)

use serde::de::{self, Deserialize, Deserializer};

/// Whether `v` is an address to listen on: `127.0.0.1:8080`, `[::]:443`, or a host name
/// with a port (`localhost:8080`, resolved when binding).
///
/// ```
/// use gateway_proxy::config::is_address;
///
/// assert!(is_address("127.0.0.1:9901") && is_address("[::1]:80") && is_address("localhost:1"));
/// assert!(!is_address("localhost") && !is_address(":80") && !is_address("host:99999"));
/// ```
pub fn is_address(v: &str) -> bool {
    v.parse::<std::net::SocketAddr>().is_ok()
        || v.rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// `text` as an absolute `http://` or `https://` URL (a collector's, a service's).
///
/// ```
/// use gateway_proxy::config::http_url;
///
/// assert_eq!(http_url("http://c:4318/v1/traces").unwrap().path(), "/v1/traces");
/// assert!(http_url("grpc://c:4317").is_err() && http_url("/v1/traces").is_err());
/// ```
///
/// # Errors
///
/// What is wrong with `text`, naming it.
pub fn http_url(text: &str) -> Result<http::Uri, String> {
    let uri = text
        .parse::<http::Uri>()
        .map_err(|e| format!("`{text}`: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(format!("`{text}` is not an http:// or https:// URL"));
    }
    Ok(uri)
}

/// An endpoint URL (`http://host:port`, `https://host`, `host:port`), checked as it is read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Url(pub String);

/// A CIDR (`10.0.0.0/8`) or a single address, checked as it is read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cidr(pub String);

impl<'de> Deserialize<'de> for Url {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse::<crate::Endpoint>()
            .map_err(|e| de::Error::custom(format!("`{text}`: {e}")))?;
        Ok(Self(text))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if gateway_core::client_ip::parse_net(&text).is_err() {
            return Err(de::Error::custom(format!(
                "`{text}` is not a CIDR or an IP address"
            )));
        }
        Ok(Self(text))
    }
}
