//! The grammar both reference readers share (RFC 9112, RFC 9110 §5): written for clarity
//! rather than speed, sharing no code with the codec (not even `httparse`), so that a bug
//! in one shows up as a disagreement with the other.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Something read and what follows it; `None` when the input ends first.
pub(crate) type Parsed<'a, T> = Result<Option<(T, &'a [u8])>, &'static str>;

/// A line, up to CRLF or (if `bare_lf`) LF; `None` when the input ends first.
pub(crate) fn line(input: &[u8], bare_lf: bool) -> Parsed<'_, &[u8]> {
    let Some(lf) = input.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let (line, rest) = (&input[..lf], &input[lf + 1..]);
    let line = match line.strip_suffix(b"\r") {
        Some(line) => line,
        None if bare_lf => line,
        None => return Err("a line does not end with CRLF"),
    };
    if line.contains(&b'\r') {
        return Err("a bare CR");
    }
    Ok(Some((line, rest)))
}

pub(crate) const fn is_tchar(b: u8) -> bool {
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
}

pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Field lines up to the empty line: (name, value) pairs and what follows.
pub(crate) fn field_lines(mut at: &[u8]) -> Parsed<'_, Vec<(&[u8], &[u8])>> {
    let mut out = Vec::new();
    loop {
        let Some((line, rest)) = line(at, true)? else {
            return Ok(None);
        };
        at = rest;
        if line.is_empty() {
            return Ok(Some((out, at)));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err("a field line without a colon");
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if !is_token(name) {
            // Includes obs-fold (a line that starts with whitespace) and a space before
            // the colon.
            return Err("a field name is not a token");
        }
        let value = trim_ows(value);
        if value.iter().any(|&b| b != b'\t' && (b < b' ' || b == 0x7f)) {
            return Err("a control character in a field value");
        }
        out.push((name, value));
    }
}

fn trim_start_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

/// Without optional whitespace (SP, HTAB) at either end.
pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

pub(crate) fn map(lines: &[(&[u8], &[u8])]) -> Result<HeaderMap, &'static str> {
    let mut map = HeaderMap::new();
    for (name, value) in lines {
        let name = HeaderName::from_bytes(name).map_err(|_| "a field name")?;
        let value = HeaderValue::from_bytes(value).map_err(|_| "a field value")?;
        map.append(name, value);
    }
    Ok(map)
}

/// The comma-separated elements of every `name` field, trimmed, empty ones dropped.
pub(crate) fn list<'a>(map: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    map.get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim_ows)
        .filter(|e| !e.is_empty())
        .collect()
}

/// A chunked body: its data, its trailers and what follows; `None` when the input ends
/// inside it.
pub(crate) fn chunked(mut at: &[u8]) -> Parsed<'_, (Bytes, Vec<(String, Bytes)>)> {
    let mut data = Vec::new();
    loop {
        let Some((line, rest)) = line(at, false)? else {
            return Ok(None);
        };
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 {
            return Err("a chunk size is not hex");
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap_or("x"), 16)
            .map_err(|_| "a chunk size overflows")?;
        chunk_ext(&line[digits..])?;
        at = rest;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        // The data, then CRLF: wrong as soon as a byte of it is wrong, cut short before.
        let end = at.get(size..).unwrap_or_default();
        if !b"\r\n".starts_with(&end[..end.len().min(2)]) {
            return Err("chunk data is not followed by CRLF");
        }
        if end.len() < 2 {
            return Ok(None);
        }
        data.extend_from_slice(&at[..size]);
        at = &at[size + 2..];
    }
    let Some((lines, rest)) = field_lines(at)? else {
        return Ok(None);
    };
    let mut trailers = map(&lines)?;
    for name in [
        "content-length",
        "transfer-encoding",
        "host",
        "connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        trailers.remove(name);
    }
    Ok(Some(((Bytes::from(data), fields(&trailers)), rest)))
}

/// `*( BWS ";" BWS ext-name [ BWS "=" BWS ext-value ] )`, ext-value a token or a
/// quoted string.
fn chunk_ext(mut ext: &[u8]) -> Result<(), &'static str> {
    const BAD: &str = "a malformed chunk extension";
    let token = |s: &[u8]| -> usize { s.iter().take_while(|&&b| is_tchar(b)).count() };
    loop {
        ext = trim_start_ows(ext);
        if ext.is_empty() {
            return Ok(());
        }
        ext = trim_start_ows(ext.strip_prefix(b";").ok_or(BAD)?);
        let name = token(ext);
        if name == 0 {
            return Err(BAD);
        }
        ext = trim_start_ows(&ext[name..]);
        if let Some(value) = ext.strip_prefix(b"=") {
            ext = trim_start_ows(value);
            if let Some(quoted) = ext.strip_prefix(b"\"") {
                let mut i = 0;
                loop {
                    match quoted.get(i) {
                        None => return Err(BAD),
                        Some(b'"') => break,
                        Some(b'\\') => i += 2,
                        Some(&b) if b == b'\t' || (b >= b' ' && b != 0x7f) => i += 1,
                        Some(_) => return Err(BAD),
                    }
                }
                ext = &quoted[i + 1..];
            } else {
                let value = token(ext);
                if value == 0 {
                    return Err(BAD);
                }
                ext = &ext[value..];
            }
        }
    }
}

/// The body length `Content-Length` says (`None` without one): digits only, and the same
/// in every field and list element (RFC 9110 §8.6).
pub(crate) fn content_length(map: &HeaderMap) -> Result<Option<u64>, &'static str> {
    if !map.contains_key("content-length") {
        return Ok(None);
    }
    let mut length = None;
    for element in list(map, "content-length") {
        if !element.iter().all(u8::is_ascii_digit) {
            return Err("a Content-Length is not digits");
        }
        let n = std::str::from_utf8(element)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("a Content-Length overflows")?;
        if length.is_some_and(|l| l != n) {
            return Err("Content-Lengths disagree");
        }
        length = Some(n);
    }
    length.map(Some).ok_or("an empty Content-Length")
}

/// A header map's fields, in its order, as comparable values.
pub(crate) fn fields(map: &HeaderMap) -> Vec<(String, Bytes)> {
    map.iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}
