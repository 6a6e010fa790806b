//! Durations (`250ms`, `10s`, `5m`, `1h`) and sizes (`64KiB`, `10MB`, `512`) as a config file
//! spells them: the units every config section shares (feature `registry`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};

/// A duration written with its unit: `250ms`, `10s`, `1.5s`, `5m`, `1h`, `1d`. A bare number
/// is refused: `30` could mean seconds or milliseconds, and guessing wrong is a bad outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Period(pub Duration);

/// A size in bytes: a bare number of bytes, or with a unit, decimal (`kB`, `MB`, `GB`: powers
/// of 1000) or binary (`KiB`, `MiB`, `GiB`: powers of 1024), as their standards define them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Size(pub u64);

/// A duration or size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUnit(String);

// === impl Period ===

impl Period {
    /// Parses `text`; see the type's docs.
    ///
    /// # Errors
    ///
    /// When `text` is not a number followed by one of the units.
    pub fn parse(text: &str) -> Result<Self, InvalidUnit> {
        let bad = || {
            InvalidUnit(format!(
                "`{text}` is not a duration like 250ms, 10s, 5m or 1h"
            ))
        };
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, unit) = text.split_at(split);
        let unit_secs = match unit.trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            _ => return Err(bad()),
        };
        let number: f64 = number.parse().map_err(|_| bad())?;
        Duration::try_from_secs_f64(number * unit_secs)
            .map(Self)
            .map_err(|_| bad())
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}

impl From<Period> for Duration {
    fn from(span: Period) -> Self {
        span.0
    }
}

// === impl Size ===

impl Size {
    /// Parses `text`; see the type's docs.
    ///
    /// # Errors
    ///
    /// When `text` is not a number of bytes, optionally followed by a unit.
    pub fn parse(text: &str) -> Result<Self, InvalidUnit> {
        let bad = || InvalidUnit(format!("`{text}` is not a size like 512, 64KiB or 10MB"));
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" => 1000,
            "MB" => 1000 * 1000,
            "GB" => 1000 * 1000 * 1000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(bad()),
        };
        if let Ok(whole) = number.parse::<u64>() {
            return whole.checked_mul(scale).map(Self).ok_or_else(bad);
        }
        // A fraction of a unit (`1.5MiB`), rounded down to whole bytes.
        let number: f64 = number.parse().map_err(|_| bad())?;
        #[expect(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a fraction of a unit is approximate by nature; range checked below"
        )]
        let bytes = (number * scale as f64) as u64;
        if number.is_finite() && number >= 0.0 && bytes < u64::MAX {
            Ok(Self(bytes))
        } else {
            Err(bad())
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Size;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 512, 64KiB or 10MB")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("`{v}` is not a size")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

// === impl InvalidUnit ===

impl fmt::Display for InvalidUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidUnit {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        for (text, ms) in [
            ("250ms", 250),
            ("10s", 10_000),
            ("1.5s", 1500),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1d", 86_400_000),
            (" 2s ", 2000),
        ] {
            assert_eq!(
                Period::parse(text),
                Ok(Period(Duration::from_millis(ms))),
                "{text}"
            );
        }
        for bad in [
            "30", "", "s", "10 sec", "-1s", "1e3s", "10ns", "5M", "1..2s",
        ] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        for (text, bytes) in [
            ("512", 512),
            ("512B", 512),
            ("64KiB", 65_536),
            ("1MiB", 1_048_576),
            ("10MB", 10_000_000),
            ("1kB", 1000),
            ("1.5KiB", 1536),
            ("2GiB", 2_147_483_648),
        ] {
            assert_eq!(Size::parse(text), Ok(Size(bytes)), "{text}");
        }
        for bad in [
            "",
            "KiB",
            "1 parsec",
            "-1",
            "99999999999999999999GiB",
            "1Kib",
        ] {
            assert!(Size::parse(bad).is_err(), "{bad}");
        }
    }
}
