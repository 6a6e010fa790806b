//! Range requests answered from a stored full response (RFC 9110 §14).

use std::ops::Range;

use http::HeaderMap;
use http::header::{ETAG, IF_RANGE, LAST_MODIFIED, RANGE};

/// What a request's `Range` asks of a body of `len` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Ranged {
    /// No usable range (none, not bytes, several, or an `If-Range` that does not match):
    /// the whole body.
    Whole,
    /// One satisfiable range: a 206.
    Part(Range<usize>),
    /// No satisfiable range: a 416.
    Unsatisfiable,
}

/// The range `req` asks of a stored body of `len` bytes whose fields are `stored`.
pub(super) fn ranged(req: &HeaderMap, stored: &HeaderMap, len: usize) -> Ranged {
    let mut values = req.get_all(RANGE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Ranged::Whole;
    };
    if let Some(condition) = req.get(IF_RANGE) {
        // A strong entity tag, or the exact `Last-Modified` (§13.1.5); anything else
        // means the client's copy is not this one.
        let matches = if condition.as_bytes().starts_with(b"\"") {
            stored.get(ETAG) == Some(condition)
        } else {
            stored.get(LAST_MODIFIED) == Some(condition)
        };
        if !matches {
            return Ranged::Whole;
        }
    }
    let Some(spec) = value.as_bytes().strip_prefix(b"bytes=") else {
        return Ranged::Whole;
    };
    let spec = spec.trim_ascii();
    // Several ranges: the whole body (a server may ignore Range; no multipart).
    if spec.contains(&b',') {
        return Ranged::Whole;
    }
    let Some(dash) = spec.iter().position(|&b| b == b'-') else {
        return Ranged::Whole;
    };
    let number = |s: &[u8]| -> Option<u64> {
        let s = s.trim_ascii();
        if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    let len64 = u64::try_from(len).unwrap_or(u64::MAX);
    let (first, last) = (&spec[..dash], &spec[dash + 1..]);
    let range = match (first.trim_ascii().is_empty(), number(first), number(last)) {
        // `-N`: the last N bytes.
        (true, _, Some(suffix)) => {
            if suffix == 0 {
                return Ranged::Unsatisfiable;
            }
            len64.saturating_sub(suffix)..len64
        }
        (false, Some(first), last)
            if last.is_some() || spec[dash + 1..].trim_ascii().is_empty() =>
        {
            if first >= len64 {
                return Ranged::Unsatisfiable;
            }
            match last {
                Some(last) if last < first => return Ranged::Whole,
                Some(last) => first..last.saturating_add(1).min(len64),
                None => first..len64,
            }
        }
        _ => return Ranged::Whole,
    };
    if len == 0 {
        return Ranged::Unsatisfiable;
    }
    let to = |n: u64| usize::try_from(n).unwrap_or(len);
    Ranged::Part(to(range.start)..to(range.end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(range: &str, if_range: Option<&str>, len: usize) -> Ranged {
        let mut req = HeaderMap::new();
        req.insert(RANGE, range.parse().unwrap());
        if let Some(c) = if_range {
            req.insert(IF_RANGE, c.parse().unwrap());
        }
        let mut stored = HeaderMap::new();
        stored.insert(ETAG, "\"v1\"".parse().unwrap());
        stored.insert(
            LAST_MODIFIED,
            "Sat, 01 Jan 2026 00:00:00 GMT".parse().unwrap(),
        );
        ranged(&req, &stored, len)
    }

    #[test]
    fn single_byte_ranges() {
        assert_eq!(ask("bytes=0-9", None, 100), Ranged::Part(0..10));
        assert_eq!(ask("bytes=90-", None, 100), Ranged::Part(90..100));
        assert_eq!(ask("bytes=-5", None, 100), Ranged::Part(95..100));
        assert_eq!(ask("bytes=-500", None, 100), Ranged::Part(0..100));
        assert_eq!(ask("bytes=50-5000", None, 100), Ranged::Part(50..100));
        assert_eq!(ask("bytes=100-", None, 100), Ranged::Unsatisfiable);
        assert_eq!(ask("bytes=-0", None, 100), Ranged::Unsatisfiable);
    }

    #[test]
    fn anything_else_is_the_whole_body() {
        for range in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=",
            "bytes=-",
            "bytes=99999999999999999999-",
        ] {
            assert_eq!(ask(range, None, 100), Ranged::Whole, "{range}");
        }
        assert_eq!(ask("bytes=0-9", Some("\"v1\""), 100), Ranged::Part(0..10));
        assert_eq!(ask("bytes=0-9", Some("\"v2\""), 100), Ranged::Whole);
        assert_eq!(
            ask("bytes=0-9", Some("W/\"v1\""), 100),
            Ranged::Whole,
            "weak tags never match"
        );
        assert_eq!(
            ask("bytes=0-9", Some("Sat, 01 Jan 2026 00:00:00 GMT"), 100),
            Ranged::Part(0..10)
        );
    }
}
