//! Request path normalization: the path a policy decides on is the path the upstream gets.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PathError {
    /// Not origin-form (`*`, empty, or not starting with `/`).
    NotOriginForm,
    /// A `%` not followed by two hex digits.
    BadEncoding,
    /// An encoded `/` or `\` (`%2F`, `%5C`): its meaning differs between servers.
    EncodedSeparator,
    /// A NUL, CR, LF or other control byte, raw or encoded, or a raw `\`.
    Forbidden,
    /// `..` segments that climb above the root.
    AboveRoot,
}

/// Normalizes an origin-form path (without the query):
///
/// 1. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, and the
///    hex digits of every other escape are upper-cased;
/// 2. runs of `/` collapse into one;
/// 3. `.` and `..` segments are removed (RFC 3986 §5.2.4); climbing above `/` is refused.
///
/// Refused outright: encoded `/` or `\`, any control byte (raw or encoded: NUL, CR, LF, ...),
/// a raw `\`, and malformed escapes. Returns the input unchanged (borrowed) when it is
/// already canonical, which is the common case.
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    if is_canonical(bytes)? {
        return Ok(Cow::Borrowed(path));
    }
    // Slow path: decode unreserved escapes into a fresh buffer, then rebuild the segments.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let v = escape_value(bytes, i)?;
            check_escaped(v)?;
            if is_unreserved(v) {
                decoded.push(char::from(v));
            } else {
                decoded.push('%');
                decoded.push(char::from(HEX[usize::from(v >> 4)]));
                decoded.push(char::from(HEX[usize::from(v & 0xF)]));
            }
            i += 3;
        } else {
            decoded.push(char::from(b));
            i += 1;
        }
    }
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "/";
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for s in &out {
        normalized.push('/');
        normalized.push_str(s);
    }
    if trailing || normalized.is_empty() {
        normalized.push('/');
    }
    Ok(Cow::Owned(normalized))
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Validates every byte and tells whether the path is already canonical.
fn is_canonical(bytes: &[u8]) -> Result<bool, PathError> {
    let mut canonical = true;
    let mut i = 0;
    let mut segment_start = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let v = escape_value(bytes, i)?;
                check_escaped(v)?;
                if is_unreserved(v)
                    || bytes[i + 1].is_ascii_lowercase()
                    || bytes[i + 2].is_ascii_lowercase()
                {
                    canonical = false;
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Forbidden),
            b if b.is_ascii_control() => return Err(PathError::Forbidden),
            b'/' => {
                let segment = &bytes[segment_start..i];
                if i > 0 && matches!(segment, b"" | b"/" | b"/." | b"/..") {
                    canonical = false;
                }
                segment_start = i;
            }
            _ => {}
        }
        i += 1;
    }
    if matches!(&bytes[segment_start..], b"/." | b"/..") {
        canonical = false;
    }
    Ok(canonical)
}

fn escape_value(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    let hi = bytes.get(i + 1).and_then(|b| hex(*b));
    let lo = bytes.get(i + 2).and_then(|b| hex(*b));
    match (hi, lo) {
        (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
        _ => Err(PathError::BadEncoding),
    }
}

fn check_escaped(v: u8) -> Result<(), PathError> {
    match v {
        b'/' | b'\\' => Err(PathError::EncodedSeparator),
        v if v.is_ascii_control() => Err(PathError::Forbidden),
        _ => Ok(()),
    }
}

const fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn ok(input: &str, want: &str) {
        assert_eq!(normalize(input).as_deref(), Ok(want), "input {input:?}");
    }

    #[track_caller]
    fn err(input: &str, want: PathError) {
        assert_eq!(normalize(input), Err(want), "input {input:?}");
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in ["/", "/api", "/api/", "/a/b.c/d~e", "/x%20y", "/%E2%82%AC"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn the_classic_evasions_resolve_to_the_canonical_path() {
        ok("/%61dmin", "/admin");
        ok("//admin", "/admin");
        ok("/./admin", "/admin");
        ok("/public/../admin", "/admin");
        ok("/public/%2e%2e/admin", "/admin");
        ok("/public/%2E%2E/admin", "/admin");
        ok("/public/.%2e/admin", "/admin");
        ok("/a//b///c", "/a/b/c");
        ok("/a/b/..", "/a/");
        ok("/a/b/.", "/a/b/");
        ok("/a/./", "/a/");
        ok("/..a/b", "/..a/b");
        ok("/a/%7euser", "/a/~user");
        ok("/x%2a", "/x%2A");
        ok("/x%2A", "/x%2A");
        ok("/a/..", "/");
        ok("//", "/");
    }

    #[test]
    fn the_unsafe_is_refused() {
        err("/admin%2fx", PathError::EncodedSeparator);
        err("/admin%2Fx", PathError::EncodedSeparator);
        err("/a%5cb", PathError::EncodedSeparator);
        err("/a\\b", PathError::Forbidden);
        err("/admin%00", PathError::Forbidden);
        err("/a%0d%0aSet-Cookie:x", PathError::Forbidden);
        err("/a%0A", PathError::Forbidden);
        err("/a\u{7f}", PathError::Forbidden);
        err("/a%zz", PathError::BadEncoding);
        err("/a%2", PathError::BadEncoding);
        err("/a%", PathError::BadEncoding);
        err("/..", PathError::AboveRoot);
        err("/a/../../b", PathError::AboveRoot);
        err("/%2e%2e/etc/passwd", PathError::AboveRoot);
        err("*", PathError::NotOriginForm);
        err("", PathError::NotOriginForm);
        err("api", PathError::NotOriginForm);
    }

    #[test]
    fn normalization_is_idempotent() {
        for p in ["/%61dmin/./x//y/../z", "/a/%7e/b%2a/", "/p/%2e/q"] {
            let once = normalize(p).unwrap().into_owned();
            let twice = normalize(&once).unwrap();
            assert_eq!(once, twice, "{p}");
            assert!(matches!(twice, Cow::Borrowed(_)));
        }
    }
}
