//! The reference reader of `server_h1`: RFC 9112 request framing, built on the grammar of
//! `crate::fuzz::rfc9112`, and strict: whatever it does not recognize ends the connection.
//!
//! Where RFC 9112 lets a recipient choose, it chooses what the gateway documents: a bare LF
//! ends a start line or field line (§2.2) but not a chunk line (§7.1); empty lines before
//! a request line are skipped (§2.2); equal `Content-Length` values count as one (RFC 9110
//! §8.6); `Transfer-Encoding` must be exactly `chunked` in HTTP/1.1 and never comes with
//! `Content-Length` (§6.1, §6.3); trailers lose the
//! fields that frame, route or control a connection (RFC 9110 §6.5.1). `Host` (§3.2) is
//! not framing: the router checks it (`router::host`), as it does for HTTP/2.

use bytes::Bytes;
use http::Version;

use super::Seen;
use crate::fuzz::rfc9112::{
    chunked, content_length, field_lines, fields, is_token, line, list, map,
};

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
    } else if let Some(n) = content_length(&headers)? {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
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
