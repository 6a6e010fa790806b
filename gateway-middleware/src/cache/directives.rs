//! `Cache-Control` (RFC 9111 §5.2), parsed without allocating.

use std::fmt;

use http::HeaderMap;
use http::header::{CACHE_CONTROL, PRAGMA};

/// The largest delta-seconds kept; larger values are this (RFC 9111 §1.2.2).
const MAX_DELTA: u32 = 2_147_483_648;

/// The directives of a request's or a response's `Cache-Control` fields, as a cache acts
/// on them. Unknown directives are ignored (§5.2.3); directive names are case-insensitive.
///
/// A directive that should carry a number but carries none, or a malformed one, or one
/// given twice with different values makes the field [invalid](Self::is_invalid): the
/// freshness it describes is not to be trusted (a cache then treats the response as
/// stale, §4.2.1).
///
/// ```
/// use gateway_middleware::cache::CacheControl;
/// use http::HeaderMap;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("cache-control", "public, max-age=60, stale-while-revalidate=\"30\"".parse().unwrap());
/// let cc = CacheControl::parse(&headers);
/// assert!(cc.public());
/// assert_eq!(cc.max_age(), Some(60));
/// assert_eq!(cc.stale_while_revalidate(), Some(30));
/// assert!(!cc.is_invalid());
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    flags: u16,
    max_age: Option<u32>,
    s_maxage: Option<u32>,
    max_stale: Option<u32>,
    min_fresh: Option<u32>,
    stale_while_revalidate: Option<u32>,
    stale_if_error: Option<u32>,
}

const NO_CACHE: u16 = 1;
const NO_STORE: u16 = 1 << 1;
const PRIVATE: u16 = 1 << 2;
const PUBLIC: u16 = 1 << 3;
const MUST_REVALIDATE: u16 = 1 << 4;
const PROXY_REVALIDATE: u16 = 1 << 5;
const MUST_UNDERSTAND: u16 = 1 << 6;
const NO_TRANSFORM: u16 = 1 << 7;
const IMMUTABLE: u16 = 1 << 8;
const ONLY_IF_CACHED: u16 = 1 << 9;
/// `max-stale` without a value: any staleness.
const MAX_STALE_ANY: u16 = 1 << 10;
const INVALID: u16 = 1 << 11;

/// The directives without an argument that a cache acts on.
const FLAGS: [(&[u8], u16); 10] = [
    (b"no-cache", NO_CACHE),
    (b"no-store", NO_STORE),
    (b"private", PRIVATE),
    (b"public", PUBLIC),
    (b"must-revalidate", MUST_REVALIDATE),
    (b"proxy-revalidate", PROXY_REVALIDATE),
    (b"must-understand", MUST_UNDERSTAND),
    (b"no-transform", NO_TRANSFORM),
    (b"immutable", IMMUTABLE),
    (b"only-if-cached", ONLY_IF_CACHED),
];

/// The directives whose argument is delta-seconds, and where each is kept.
type Slot = fn(&mut CacheControl) -> &mut Option<u32>;
const NUMBERS: [(&[u8], Slot); 6] = [
    (b"max-age", |cc| &mut cc.max_age),
    (b"s-maxage", |cc| &mut cc.s_maxage),
    (b"max-stale", |cc| &mut cc.max_stale),
    (b"min-fresh", |cc| &mut cc.min_fresh),
    (b"stale-while-revalidate", |cc| {
        &mut cc.stale_while_revalidate
    }),
    (b"stale-if-error", |cc| &mut cc.stale_if_error),
];

impl CacheControl {
    /// The directives of every `Cache-Control` field of `headers`.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(CACHE_CONTROL) {
            cc.parse_field(value.as_bytes());
        }
        cc
    }

    /// A request's directives; a request without `Cache-Control` but with
    /// `Pragma: no-cache` asks for `no-cache` (RFC 9111 §5.4, kept for old clients).
    pub fn parse_request(headers: &HeaderMap) -> Self {
        let mut cc = Self::parse(headers);
        if !headers.contains_key(CACHE_CONTROL)
            && headers.get_all(PRAGMA).iter().any(|v| {
                v.as_bytes()
                    .split(|&b| b == b',')
                    .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"no-cache"))
            })
        {
            cc.flags |= NO_CACHE;
        }
        cc
    }

    fn parse_field(&mut self, field: &[u8]) {
        let mut rest = field;
        loop {
            rest = rest.trim_ascii_start();
            // Empty list elements (`a,,b`) are allowed and skipped (RFC 9110 §5.6.1).
            if let Some(after) = rest.strip_prefix(b",") {
                rest = after;
                continue;
            }
            if rest.is_empty() {
                return;
            }
            let name_end = rest
                .iter()
                .position(|&b| b == b'=' || b == b',' || b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            let (name, after) = rest.split_at(name_end);
            let after = after.trim_ascii_start();
            let (arg, after) = match after.strip_prefix(b"=") {
                Some(value) => {
                    let value = value.trim_ascii_start();
                    match value.strip_prefix(b"\"") {
                        Some(quoted) => match quoted_end(quoted) {
                            Some(end) => (Arg::Quoted(&quoted[..end]), &quoted[end + 1..]),
                            // An unterminated quoted string: the field is broken.
                            None => {
                                self.flags |= INVALID;
                                return;
                            }
                        },
                        None => {
                            let end = value.iter().position(|&b| b == b',').unwrap_or(value.len());
                            (Arg::Token(value[..end].trim_ascii_end()), &value[end..])
                        }
                    }
                }
                None => (Arg::None, after),
            };
            self.directive(name, arg);
            // Anything but a comma before the next directive is a malformed field.
            let after = after.trim_ascii_start();
            match after.strip_prefix(b",") {
                Some(next) => rest = next,
                None if after.is_empty() => return,
                None => {
                    self.flags |= INVALID;
                    return;
                }
            }
        }
    }

    fn directive(&mut self, name: &[u8], arg: Arg<'_>) {
        // NOTE: the qualified forms of no-cache and private (`private="set-cookie"`) take
        // the stricter unqualified meaning, as RFC 9111 §5.2.2.4 and §5.2.2.7 allow.
        if let Some((_, bit)) = FLAGS.iter().find(|(n, _)| name.eq_ignore_ascii_case(n)) {
            self.flags |= bit;
            return;
        }
        if name.eq_ignore_ascii_case(b"max-stale") && matches!(arg, Arg::None) {
            // Without a value: a stale response of any age is acceptable (§5.2.1.2).
            self.flags |= MAX_STALE_ANY;
            return;
        }
        let Some((_, field)) = NUMBERS.iter().find(|(n, _)| name.eq_ignore_ascii_case(n)) else {
            return;
        };
        let Some(value) = self.delta(arg) else { return };
        let slot = field(self);
        match *slot {
            // Twice with different values: invalid.
            Some(old) if old != value => self.flags |= INVALID,
            _ => *slot = Some(value),
        }
    }

    /// The delta-seconds of `arg`; `None` (and the field marked invalid) when it is not one.
    fn delta(&mut self, arg: Arg<'_>) -> Option<u32> {
        let digits = match arg {
            Arg::Token(t) | Arg::Quoted(t) => t,
            Arg::None => &[],
        };
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            self.flags |= INVALID;
            return None;
        }
        let mut value: u64 = 0;
        for d in digits {
            value = (value * 10 + u64::from(d - b'0')).min(u64::from(MAX_DELTA));
        }
        Some(u32::try_from(value).unwrap_or(MAX_DELTA))
    }

    const fn has(&self, bit: u16) -> bool {
        self.flags & bit != 0
    }

    /// `no-cache`: not to be reused without validating it first.
    pub const fn no_cache(&self) -> bool {
        self.has(NO_CACHE)
    }

    /// `no-store`: not to be stored at all.
    pub const fn no_store(&self) -> bool {
        self.has(NO_STORE)
    }

    /// `private`: for one user; a shared cache does not store it.
    pub const fn private(&self) -> bool {
        self.has(PRIVATE)
    }

    /// `public`: storable even where it otherwise would not be (an `Authorization`
    /// request, a status not cacheable by default).
    pub const fn public(&self) -> bool {
        self.has(PUBLIC)
    }

    /// `must-revalidate`: never served stale.
    pub const fn must_revalidate(&self) -> bool {
        self.has(MUST_REVALIDATE)
    }

    /// `proxy-revalidate`: never served stale by a shared cache.
    pub const fn proxy_revalidate(&self) -> bool {
        self.has(PROXY_REVALIDATE)
    }

    /// `must-understand`: stored only by a cache that understands the status code.
    pub const fn must_understand(&self) -> bool {
        self.has(MUST_UNDERSTAND)
    }

    /// `no-transform`.
    pub const fn no_transform(&self) -> bool {
        self.has(NO_TRANSFORM)
    }

    /// `immutable` (RFC 8246).
    pub const fn immutable(&self) -> bool {
        self.has(IMMUTABLE)
    }

    /// `only-if-cached`: a request that wants a stored response or a 504.
    pub const fn only_if_cached(&self) -> bool {
        self.has(ONLY_IF_CACHED)
    }

    /// `max-age`, in seconds.
    pub const fn max_age(&self) -> Option<u32> {
        self.max_age
    }

    /// `s-maxage`, in seconds.
    pub const fn s_maxage(&self) -> Option<u32> {
        self.s_maxage
    }

    /// A request's `max-stale`: `Some(u32::MAX)` for any staleness (no value given).
    pub const fn max_stale(&self) -> Option<u32> {
        if self.has(MAX_STALE_ANY) {
            Some(u32::MAX)
        } else {
            self.max_stale
        }
    }

    /// A request's `min-fresh`, in seconds.
    pub const fn min_fresh(&self) -> Option<u32> {
        self.min_fresh
    }

    /// `stale-while-revalidate` (RFC 5861), in seconds.
    pub const fn stale_while_revalidate(&self) -> Option<u32> {
        self.stale_while_revalidate
    }

    /// `stale-if-error` (RFC 5861), in seconds.
    pub const fn stale_if_error(&self) -> Option<u32> {
        self.stale_if_error
    }

    /// Whether a directive was malformed or given twice with different values.
    pub const fn is_invalid(&self) -> bool {
        self.has(INVALID)
    }
}

impl fmt::Debug for CacheControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CacheControl");
        for (bit, name) in [
            (NO_CACHE, "no_cache"),
            (NO_STORE, "no_store"),
            (PRIVATE, "private"),
            (PUBLIC, "public"),
            (MUST_REVALIDATE, "must_revalidate"),
            (PROXY_REVALIDATE, "proxy_revalidate"),
            (MUST_UNDERSTAND, "must_understand"),
            (NO_TRANSFORM, "no_transform"),
            (IMMUTABLE, "immutable"),
            (ONLY_IF_CACHED, "only_if_cached"),
            (INVALID, "invalid"),
        ] {
            if self.has(bit) {
                d.field(name, &true);
            }
        }
        for (value, name) in [
            (self.max_age, "max_age"),
            (self.s_maxage, "s_maxage"),
            (self.max_stale(), "max_stale"),
            (self.min_fresh, "min_fresh"),
            (self.stale_while_revalidate, "stale_while_revalidate"),
            (self.stale_if_error, "stale_if_error"),
        ] {
            if let Some(v) = value {
                d.field(name, &v);
            }
        }
        d.finish()
    }
}

/// A directive's argument.
#[derive(Clone, Copy)]
enum Arg<'a> {
    None,
    Token(&'a [u8]),
    /// The inside of a quoted string, escapes left in (no directive we read has any).
    Quoted(&'a [u8]),
}

/// Where the quoted string starting after its opening quote ends (its closing quote).
fn quoted_end(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(fields: &[&str]) -> CacheControl {
        let mut headers = HeaderMap::new();
        for f in fields {
            headers.append(CACHE_CONTROL, f.parse().unwrap());
        }
        CacheControl::parse(&headers)
    }

    #[test]
    fn directives_are_read_across_fields_case_and_spacing_aside() {
        let c = cc(&["Public,  MAX-AGE=60", " no-transform ,s-maxage=\"120\""]);
        assert!(c.public() && c.no_transform());
        assert_eq!((c.max_age(), c.s_maxage()), (Some(60), Some(120)));
        assert!(!c.is_invalid());
        let c = cc(&[",,private=\"set-cookie, x-user\",, no-cache=x-a , must-revalidate"]);
        assert!(c.private() && c.no_cache() && c.must_revalidate(), "{c:?}");
        assert!(!c.is_invalid(), "{c:?}");
    }

    #[test]
    fn malformed_or_conflicting_numbers_make_it_invalid() {
        for bad in [
            "max-age=abc",
            "max-age=",
            "max-age",
            "max-age=-1",
            "max-age=1.5",
            "max-age=60, max-age=30",
            "s-maxage=\"60",
            "max-age=60 junk",
        ] {
            assert!(cc(&[bad]).is_invalid(), "{bad}");
        }
        // The same value twice is not a conflict.
        assert!(!cc(&["max-age=60", "max-age=60"]).is_invalid());
        // Unknown directives, with or without arguments, are ignored.
        let c = cc(&["foo, bar=\"a,b\", max-age=5, baz=1"]);
        assert_eq!(c.max_age(), Some(5));
        assert!(!c.is_invalid(), "{c:?}");
    }

    #[test]
    fn huge_numbers_saturate() {
        assert_eq!(
            cc(&["max-age=99999999999999999999"]).max_age(),
            Some(MAX_DELTA)
        );
    }

    #[test]
    fn request_directives_and_the_pragma_fallback() {
        let c = cc(&["max-stale, min-fresh=10, only-if-cached"]);
        assert_eq!((c.max_stale(), c.min_fresh()), (Some(u32::MAX), Some(10)));
        assert!(c.only_if_cached());
        assert_eq!(cc(&["max-stale=30"]).max_stale(), Some(30));

        let mut headers = HeaderMap::new();
        headers.insert(PRAGMA, "No-Cache".parse().unwrap());
        assert!(CacheControl::parse_request(&headers).no_cache());
        headers.insert(CACHE_CONTROL, "max-age=5".parse().unwrap());
        assert!(
            !CacheControl::parse_request(&headers).no_cache(),
            "Cache-Control wins over Pragma"
        );
    }
}
