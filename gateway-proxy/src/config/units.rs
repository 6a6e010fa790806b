//! Values a config file gives as text and that are checked as they are read: endpoint
//! URLs and CIDRs. (Durations and sizes are `gateway_core::units`, shared with the plugins'
//! sections.)

use serde::de::{self, Deserialize, Deserializer};

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
