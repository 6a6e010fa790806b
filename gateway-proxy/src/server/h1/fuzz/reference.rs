//! The reference reader of `server_h1`: RFC 9112 request framing, written from the grammar
//! for clarity rather than speed, and strict: whatever it does not recognize ends the
//! connection. It shares no code with the codec (not even `httparse`), so that a bug in one
//! shows up as a disagreement.
//!
//! Where RFC 9112 lets a recipient choose, it chooses what the gateway documents: a bare LF
//! ends a start line or field line (§2.2) but not a chunk line (§7.1); empty lines before
//! a request line are skipped (§2.2); equal `Content-Length` values count as one (RFC 9110
//! §8.6); `Transfer-Encoding` must be exactly `chunked` in HTTP/1.1 and never comes with
//! `Content-Length` (§6.1, §6.3); trailers lose the
//! fields that frame, route or control a connection (RFC 9110 §6.5.1). `Host` (§3.2) is
//! not framing: the router checks it (`router::host`), as it does for HTTP/2.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Version};

use super::{Seen, fields};

/// How the reading ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The input ended between messages, or a message closed the connection.
    Clean,
    /// The input ended inside a head.
    Incomplete,
    /// Something the grammar does not allow.
    Refused(&'static str),
}

#[derive(Debug)]
pub(super) struct Read {
    pub(super) seen: Vec<Seen>,
    pub(super) end: End,
}

/// Reads the requests in `input`, as one connection's bytes, up to its end.
pub(super) fn read(input: &[u8]) -> Read {
    let mut seen = Vec::new();
    let mut at = input;
    let end = loop {
        // Empty lines before a request line are skipped.
        while let Some(rest) = at.strip_prefix(b"\r\n").or_else(|| at.strip_prefix(b"\n")) {
            at = rest;
        }
        if at.is_empty() {
            break End::Clean;
        }
        match message(at) {
            Step::Done {
                seen: one,
                rest,
                close,
            } => {
                seen.push(one);
                at = rest;
                if close {
                    break End::Clean;
                }
            }
            Step::BodyCut(one) => {
                seen.push(one);
                break End::Clean;
            }
            Step::BodyBroken(one, why) => {
                seen.push(one);
                break End::Refused(why);
            }
            Step::HeadCut => break End::Incomplete,
            Step::Refused(why) => break End::Refused(why),
        }
    };
    Read { seen, end }
}

/// Something read and what follows it; `None` when the input ends first.
type Parsed<'a, T> = Result<Option<(T, &'a [u8])>, &'static str>;

enum Step<'a> {
    Done {
        seen: Seen,
        rest: &'a [u8],
        close: bool,
    },
    /// The head was complete, its body was cut short by the end of the input.
    BodyCut(Seen),
    /// The head was accepted (a server hands it on before it reads the body), its body
    /// breaks its framing.
    BodyBroken(Seen, &'static str),
    HeadCut,
    Refused(&'static str),
}

/// A line, up to CRLF or (if `bare_lf`) LF; `None` when the input ends first.
fn line(input: &[u8], bare_lf: bool) -> Parsed<'_, &[u8]> {
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

const fn is_tchar(b: u8) -> bool {
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

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Field lines up to the empty line: (name, value) pairs and what follows.
fn field_lines(mut at: &[u8]) -> Parsed<'_, Vec<(&[u8], &[u8])>> {
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
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn map(lines: &[(&[u8], &[u8])]) -> Result<HeaderMap, &'static str> {
    let mut map = HeaderMap::new();
    for (name, value) in lines {
        let name = HeaderName::from_bytes(name).map_err(|_| "a field name")?;
        let value = HeaderValue::from_bytes(value).map_err(|_| "a field value")?;
        map.append(name, value);
    }
    Ok(map)
}

/// The comma-separated elements of every `name` field, trimmed, empty ones dropped.
fn list<'a>(map: &'a HeaderMap, name: &str) -> Vec<&'a [u8]> {
    map.get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim_ows)
        .filter(|e| !e.is_empty())
        .collect()
}

fn message(input: &[u8]) -> Step<'_> {
    match head_and_body(input) {
        Ok(step) => step,
        Err(why) => Step::Refused(why),
    }
}

fn head_and_body(input: &[u8]) -> Result<Step<'_>, &'static str> {
    let Some((start, rest)) = line(input, true)? else {
        return Ok(Step::HeadCut);
    };
    let mut parts = start.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the request line is not three words");
    };
    if !is_token(method) {
        return Err("the method is not a token");
    }
    if target.is_empty() || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err("the target is not visible characters");
    }
    let version = match version {
        b"HTTP/1.1" => Version::HTTP_11,
        b"HTTP/1.0" => Version::HTTP_10,
        _ => return Err("not HTTP/1.x"),
    };
    let Some((lines, rest)) = field_lines(rest)? else {
        return Ok(Step::HeadCut);
    };
    let uri = http::Uri::try_from(target).map_err(|_| "the target is not a URI")?;
    let headers = map(&lines)?;
    let te = list(&headers, "transfer-encoding");
    let cl = list(&headers, "content-length");
    let has_te = headers.contains_key("transfer-encoding");
    let has_cl = headers.contains_key("content-length");
    let connection = list(&headers, "connection");
    let has = |token: &[u8]| connection.iter().any(|t| t.eq_ignore_ascii_case(token));
    let close = has(b"close") || (version == Version::HTTP_10 && !has(b"keep-alive"));
    let mut seen = Seen {
        method: String::from_utf8_lossy(method).into_owned(),
        target: uri.to_string(),
        version,
        fields: fields(&headers),
        body: None,
        trailers: Vec::new(),
    };
    let (body, trailers, rest) = if has_te {
        if has_cl {
            return Err("both Transfer-Encoding and Content-Length");
        }
        if version == Version::HTTP_10 {
            return Err("Transfer-Encoding in HTTP/1.0");
        }
        if te.len() != 1 || !te[0].eq_ignore_ascii_case(b"chunked") {
            return Err("a transfer coding other than chunked");
        }
        match chunked(rest) {
            Ok(Some(((body, trailers), rest))) => (body, trailers, rest),
            Ok(None) => return Ok(Step::BodyCut(seen)),
            Err(why) => return Ok(Step::BodyBroken(seen, why)),
        }
    } else if has_cl {
        let mut length = None;
        for element in &cl {
            if element.is_empty() || !element.iter().all(u8::is_ascii_digit) {
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
        let n = usize::try_from(length.ok_or("an empty Content-Length")?).unwrap_or(usize::MAX);
        if rest.len() < n {
            return Ok(Step::BodyCut(seen));
        }
        (Bytes::copy_from_slice(&rest[..n]), Vec::new(), &rest[n..])
    } else {
        (Bytes::new(), Vec::new(), rest)
    };
    seen.body = Some(body);
    seen.trailers = trailers;
    Ok(Step::Done { seen, rest, close })
}

/// A chunked body: its data, its trailers and what follows; `None` when the input ends
/// inside it.
fn chunked(mut at: &[u8]) -> Parsed<'_, (Bytes, Vec<(String, Bytes)>)> {
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
