//! The headers that tell clients about limits: `RateLimit-Policy` and `RateLimit` (RFC 9651
//! structured-field lists, draft-ietf-httpapi-ratelimit-headers-10), or the legacy
//! `X-RateLimit-*` trio.

use std::fmt::Write as _;
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// Which headers a rate limit adds to every response it lets through or refuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` of draft-ietf-httpapi-ratelimit-headers, every
    /// limit listed:
    ///
    /// ```text
    /// RateLimit-Policy: "second";q=10;w=1, "hour";q=1000;w=3600
    /// RateLimit: "second";r=7;t=1, "hour";r=981;t=68
    /// ```
    #[default]
    Ietf,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds) of the
    /// rate limit with the least room left, what older clients (and Kong, Traefik plugins)
    /// read.
    Legacy,
    /// Both.
    Both,
    /// None: only `Retry-After` on a 429.
    None,
}

/// What one limit says about a request: how much is left, and when it is all back. Small
/// (a request's decision carries one per limit, and moves with its future).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reading {
    remaining: u32,
    /// Milliseconds, rounded up; [`NO_RESET`] for concurrency limits, which come back as
    /// requests end.
    reset_ms: u32,
}

const NO_RESET: u32 = u32::MAX;

/// The per-limit part of the headers of one layer, rendered once.
#[derive(Clone, Debug)]
pub(crate) struct Policies {
    style: HeaderStyle,
    /// `RateLimit-Policy`, the same on every response.
    policy: Option<HeaderValue>,
    /// Each limit's name as a structured-field string, with its quota (for legacy headers).
    limits: Box<[(String, Option<u64>)]>,
}

const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// A limit as `RateLimit-Policy` describes it.
pub(crate) enum Described<'a> {
    Rate {
        name: &'a str,
        requests: u32,
        period: Duration,
    },
    Concurrent {
        name: &'a str,
        max: u32,
    },
}

// === impl Reading ===

impl Reading {
    pub(crate) fn new(remaining: u64, reset: Option<Duration>) -> Self {
        let reset_ms = reset.map_or(NO_RESET, |d| {
            let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 > 0);
            u32::try_from(ms).unwrap_or(NO_RESET - 1).min(NO_RESET - 1)
        });
        Self {
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            reset_ms,
        }
    }

    pub(crate) fn remaining(self) -> u64 {
        u64::from(self.remaining)
    }

    pub(crate) fn reset(self) -> Option<Duration> {
        (self.reset_ms != NO_RESET).then(|| Duration::from_millis(u64::from(self.reset_ms)))
    }
}

// === impl Policies ===

impl Policies {
    pub(crate) fn new<'a>(
        style: HeaderStyle,
        limits: impl IntoIterator<Item = Described<'a>>,
    ) -> Self {
        let mut policy = String::new();
        let mut names = Vec::new();
        for limit in limits {
            if !policy.is_empty() {
                policy.push_str(", ");
            }
            match limit {
                Described::Rate {
                    name,
                    requests,
                    period,
                } => {
                    let name = sf_string(name);
                    let _ = write!(policy, "{name};q={requests};w={}", seconds(period).max(1));
                    names.push((name, Some(u64::from(requests))));
                }
                Described::Concurrent { name, max } => {
                    let name = sf_string(name);
                    let _ = write!(policy, "{name};q={max};qu=\"concurrent-requests\"");
                    names.push((name, None));
                }
            }
        }
        Self {
            style,
            // NOTE: built from digits, ASCII names (escaped) and punctuation only.
            policy: HeaderValue::try_from(policy).ok(),
            limits: names.into(),
        }
    }

    /// Adds the headers for `readings` (the limits that judged the request, by index) to
    /// `headers`.
    pub(crate) fn write(&self, readings: &[Option<Reading>], headers: &mut HeaderMap) {
        if matches!(self.style, HeaderStyle::Ietf | HeaderStyle::Both) {
            if let Some(policy) = &self.policy {
                headers.insert(RATELIMIT_POLICY, policy.clone());
            }
            let mut value = String::with_capacity(32 * self.limits.len());
            let mut digits = itoa::Buffer::new();
            for (reading, (name, _)) in readings.iter().zip(self.limits.iter()) {
                let Some(reading) = reading else {
                    continue;
                };
                if !value.is_empty() {
                    value.push_str(", ");
                }
                value.push_str(name);
                value.push_str(";r=");
                value.push_str(digits.format(reading.remaining()));
                if let Some(reset) = reading.reset() {
                    value.push_str(";t=");
                    value.push_str(digits.format(seconds(reset)));
                }
            }
            if let Ok(value) = HeaderValue::try_from(value)
                && !value.is_empty()
            {
                headers.insert(RATELIMIT, value);
            }
        }
        if matches!(self.style, HeaderStyle::Legacy | HeaderStyle::Both) {
            // The rate limit with the least room, the one that will refuse first.
            let tightest = readings
                .iter()
                .zip(self.limits.iter())
                .filter_map(|(r, (_, q))| Some((r.as_ref()?, (*q)?)))
                .min_by_key(|(r, _)| (r.remaining(), std::cmp::Reverse(r.reset())));
            if let Some((reading, quota)) = tightest {
                headers.insert(X_LIMIT, HeaderValue::from(quota));
                headers.insert(X_REMAINING, HeaderValue::from(reading.remaining()));
                let reset = reading.reset().map_or(0, seconds);
                headers.insert(X_RESET, HeaderValue::from(reset));
            }
        }
    }
}

/// Whole seconds, rounded up: a client told to wait 0 s after 300 ms would come back early.
pub(crate) fn seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `name` as an RFC 9651 string: quoted, `\` and `"` escaped, and anything outside
/// printable ASCII (which a string cannot hold) replaced by `_`.
fn sf_string(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(style: HeaderStyle) -> Policies {
        Policies::new(
            style,
            [
                Described::Rate {
                    name: "per \"second\"",
                    requests: 10,
                    period: Duration::from_secs(1),
                },
                Described::Rate {
                    name: "hourly",
                    requests: 1000,
                    period: Duration::from_secs(3600),
                },
                Described::Concurrent {
                    name: "inflight",
                    max: 4,
                },
            ],
        )
    }

    #[test]
    fn ietf_lists_every_limit() {
        let mut headers = HeaderMap::new();
        let readings = [
            Some(Reading::new(7, Some(Duration::from_millis(300)))),
            Some(Reading::new(990, Some(Duration::from_secs(36)))),
            Some(Reading::new(3, None)),
        ];
        policies(HeaderStyle::Ietf).write(&readings, &mut headers);
        assert_eq!(
            headers["ratelimit-policy"],
            r#""per \"second\"";q=10;w=1, "hourly";q=1000;w=3600, "inflight";q=4;qu="concurrent-requests""#
        );
        assert_eq!(
            headers["ratelimit"],
            r#""per \"second\"";r=7;t=1, "hourly";r=990;t=36, "inflight";r=3"#
        );
        assert!(!headers.contains_key("x-ratelimit-limit"));
    }

    #[test]
    fn legacy_names_the_tightest_rate_limit() {
        let mut headers = HeaderMap::new();
        let readings = [
            Some(Reading::new(0, Some(Duration::from_millis(1500)))),
            None,
            Some(Reading::new(0, None)),
        ];
        policies(HeaderStyle::Legacy).write(&readings, &mut headers);
        assert_eq!(headers["x-ratelimit-limit"], "10");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        assert_eq!(headers["x-ratelimit-reset"], "2");
        assert!(!headers.contains_key("ratelimit"));

        let mut none = HeaderMap::new();
        policies(HeaderStyle::None).write(&readings, &mut none);
        assert!(none.is_empty());
    }
}
