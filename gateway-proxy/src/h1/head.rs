//! Message heads: parsing a response head into `http` types, writing a request head.

use std::fmt;
use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Version};

use super::decode::{Chunked, Decoder};

/// The most fields a head may have.
pub(crate) const MAX_HEADERS: usize = 100;
/// The largest head accepted (so that offsets into it fit a `u16`).
pub(crate) const MAX_HEAD: usize = 64 * 1024 - 1;

/// A head that is not valid HTTP/1.1, or that this implementation refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidHead(pub(crate) &'static str);

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    /// What the framing and connection fields said.
    pub(crate) meta: Meta,
}

/// What a head's framing and connection-control fields say.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Meta {
    /// The one `Content-Length` value (several equal values count as one).
    content_length: Option<u64>,
    /// A `Transfer-Encoding` field is present.
    transfer_encoding: bool,
    /// `Transfer-Encoding` is exactly `chunked`.
    chunked: bool,
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep_alive: bool,
}

/// Where one field's name and value lie in the head they were parsed from: start and end
/// of each. Small, because a parse clears an array of them.
#[derive(Clone, Copy)]
struct Span([u16; 4]);

// === parsing ===

/// Parses a response head at the start of `buf`; once it is complete, removes it from
/// `buf` and returns it (its field values share the buffer's memory). `Ok(None)`: not
/// complete yet.
pub(crate) fn parse_response(buf: &mut BytesMut) -> Result<Option<ResponseHead>, InvalidHead> {
    let mut spans = [Span::EMPTY; MAX_HEADERS];
    let (len, status, version, count) = {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(InvalidHead("the response head is too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(InvalidHead("the response has too many header fields"));
            }
            Err(_) => return Err(InvalidHead("the response head is malformed")),
        };
        if len > MAX_HEAD {
            return Err(InvalidHead("the response head is too large"));
        }
        let status = res
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or(InvalidHead("the response status is invalid"))?;
        let version = match res.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let base = buf.as_ptr() as usize;
        for (span, field) in spans.iter_mut().zip(res.headers.iter()) {
            *span = Span::of(base, field.name.as_bytes(), field.value);
        }
        (len, status, version, res.headers.len())
    };
    let head = buf.split_to(len).freeze();
    let (headers, meta) = build(&head, &spans[..count])?;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        meta,
    }))
}

/// The fields of a parsed section (trailers) as a header map sharing `src`'s memory.
pub(crate) fn fields(
    src: &Bytes,
    parsed: &[httparse::Header<'_>],
) -> Result<HeaderMap, InvalidHead> {
    let base = src.as_ptr() as usize;
    let mut spans = [Span::EMPTY; MAX_HEADERS];
    for (span, field) in spans.iter_mut().zip(parsed) {
        *span = Span::of(base, field.name.as_bytes(), field.value);
    }
    build(src, &spans[..parsed.len()]).map(|(map, _)| map)
}

/// Builds the header map of a head whose fields lie in `src` at `spans`, noting what the
/// framing and connection fields say.
fn build(src: &Bytes, spans: &[Span]) -> Result<(HeaderMap, Meta), InvalidHead> {
    let mut map = HeaderMap::with_capacity(spans.len());
    let mut meta = Meta::default();
    for &Span([name_start, name_end, value_start, value_end]) in spans {
        let name = HeaderName::from_bytes(&src[usize::from(name_start)..usize::from(name_end)])
            .map_err(|_| InvalidHead("a field name is invalid"))?;
        let value = src.slice(usize::from(value_start)..usize::from(value_end));
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| InvalidHead("a field value is invalid"))?;
        if name == CONTENT_LENGTH {
            meta.content_length(value.as_bytes())?;
        } else if name == TRANSFER_ENCODING {
            meta.transfer_encoding(value.as_bytes())?;
        } else if name == CONNECTION {
            for token in tokens(value.as_bytes()) {
                if token.eq_ignore_ascii_case(b"close") {
                    meta.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    meta.keep_alive = true;
                }
            }
        }
        map.append(name, value);
    }
    Ok((map, meta))
}

/// The comma-separated elements of a field value, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

// === impl Span ===

impl Span {
    const EMPTY: Self = Self([0; 4]);

    /// The span of a field parsed from the buffer that starts at `base`, within the first
    /// [`MAX_HEAD`] bytes of it.
    fn of(base: usize, name: &[u8], value: &[u8]) -> Self {
        // NOTE: callers check the head's length first, so every offset fits.
        let at = |s: &[u8]| u16::try_from(s.as_ptr() as usize - base).unwrap_or(u16::MAX);
        let (name_start, value_start) = (at(name), at(value));
        Self([
            name_start,
            name_start.saturating_add(u16::try_from(name.len()).unwrap_or(u16::MAX)),
            value_start,
            value_start.saturating_add(u16::try_from(value.len()).unwrap_or(u16::MAX)),
        ])
    }
}

// === impl Meta ===

impl Meta {
    fn content_length(&mut self, value: &[u8]) -> Result<(), InvalidHead> {
        // Several fields, or a list, are accepted only when every value is the same
        // (RFC 9110 §8.6).
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = parse_length(token).ok_or(InvalidHead("the Content-Length is invalid"))?;
            match self.content_length {
                Some(seen) if seen != n => {
                    return Err(InvalidHead("the Content-Length values differ"));
                }
                _ => self.content_length = Some(n),
            }
        }
        Ok(())
    }

    fn transfer_encoding(&mut self, value: &[u8]) -> Result<(), InvalidHead> {
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            // Only `chunked`, once: a proxy that removes the field must undo every coding
            // it lists, and no other transfer coding is in use.
            if !token.eq_ignore_ascii_case(b"chunked") || self.chunked {
                return Err(InvalidHead("the Transfer-Encoding is not plain chunked"));
            }
            self.chunked = true;
        }
        self.transfer_encoding = true;
        Ok(())
    }

    /// Whether the connection may carry another exchange after this message, as far as
    /// its head says.
    pub(crate) const fn persistent(&self, version: Version) -> bool {
        if self.close {
            return false;
        }
        match version {
            Version::HTTP_10 => self.keep_alive,
            _ => true,
        }
    }
}

/// A `Content-Length` value: digits only, no sign, no overflow.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

// === framing ===

impl ResponseHead {
    /// How the body of this response is delimited, given the request's method; `Ok(None)`
    /// when it has none (RFC 9112 §6.3).
    pub(crate) fn body(&self, method: &Method) -> Result<Option<Decoder>, InvalidHead> {
        let meta = &self.meta;
        if *method == Method::HEAD
            || self.status.is_informational()
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
            || (*method == Method::CONNECT && self.status.is_success())
        {
            return Ok(None);
        }
        if meta.transfer_encoding {
            if self.version == Version::HTTP_10 {
                return Err(InvalidHead("an HTTP/1.0 response has a Transfer-Encoding"));
            }
            if meta.content_length.is_some() {
                // A response that could be read two ways: refused, not guessed at.
                return Err(InvalidHead(
                    "a response has both Content-Length and Transfer-Encoding",
                ));
            }
            return Ok(Some(Decoder::Chunked(Chunked::Size)));
        }
        Ok(Some(match meta.content_length {
            Some(len) => Decoder::Length(len),
            None => Decoder::Eof,
        }))
    }
}

// === writing ===

/// How a request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// No body and no framing field.
    None,
    /// `Content-Length: n`.
    Known(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Writes a request head for `target` (origin-form), with `host` as its first field when
/// given. Framing fields in `headers` are skipped: `length` decides them.
pub(crate) fn write_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    host: Option<&HeaderValue>,
    headers: &HeaderMap,
    length: BodyLength,
) {
    out.reserve(64 + target.len() + headers.len() * 32);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    write_fields(out, headers);
    match length {
        BodyLength::None => {}
        BodyLength::Known(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyLength::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes header fields (or trailer fields), skipping the framing ones.
pub(crate) fn write_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

// === impl InvalidHead ===

impl fmt::Display for InvalidHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidHead {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<ResponseHead>, InvalidHead> {
        parse_response(&mut BytesMut::from(raw.as_bytes()))
    }

    fn body(raw: &str, method: Method) -> Result<Option<Decoder>, InvalidHead> {
        parse(raw)
            .map(|head| head.expect("a complete head"))
            .and_then(|h| h.body(&method))
    }

    #[test]
    fn a_response_head_is_parsed_and_taken_off_the_buffer() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\nabc"[..],
        );
        let head = parse_response(&mut buf).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.version, Version::HTTP_11);
        let values: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&buf[..], b"abc");
        assert!(matches!(
            head.body(&Method::GET),
            Ok(Some(Decoder::Length(3)))
        ));
        assert!(head.meta.persistent(head.version));
    }

    #[test]
    fn a_partial_head_waits_and_an_oversized_one_is_refused() {
        assert!(parse("HTTP/1.1 200 OK\r\nx: y\r\n").unwrap().is_none());
        let mut big = String::from("HTTP/1.1 200 OK\r\nx: ");
        big.push_str(&"a".repeat(MAX_HEAD));
        assert!(parse(&big).is_err());
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            parse(&many).unwrap_err(),
            InvalidHead("the response has too many header fields")
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(matches!(
            body(chunked, Method::GET),
            Ok(Some(Decoder::Chunked(_)))
        ));
        assert!(matches!(body(chunked, Method::HEAD), Ok(None)));
        let plain = "HTTP/1.1 200 OK\r\n\r\n";
        assert!(matches!(body(plain, Method::GET), Ok(Some(Decoder::Eof))));
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let raw = format!("HTTP/1.1 {status}\r\ncontent-length: 10\r\n\r\n");
            assert!(matches!(body(&raw, Method::GET), Ok(None)), "{status}");
        }
        let same = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5, 5\r\n\r\n";
        assert!(matches!(
            body(same, Method::GET),
            Ok(Some(Decoder::Length(5)))
        ));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(body(raw, Method::GET).is_err(), "{raw}");
        }
    }

    #[test]
    fn persistence_follows_the_version_and_connection() {
        let head = |raw: &str| parse(raw).unwrap().unwrap();
        let h = head("HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\n\r\n");
        assert!(!h.meta.persistent(h.version));
        let h = head("HTTP/1.0 200 OK\r\n\r\n");
        assert!(!h.meta.persistent(h.version));
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.meta.persistent(h.version));
    }

    #[test]
    fn obs_fold_and_bad_fields_are_refused() {
        assert!(parse("HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nx y: a\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 2000 OK\r\n\r\n").is_err());
    }

    #[test]
    fn a_request_head_carries_its_framing_and_never_the_callers() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("up:80"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("transfer-encoding", HeaderValue::from_static("gzip"));
        let mut out = Vec::new();
        write_request(
            &mut out,
            &Method::POST,
            "/a?b",
            None,
            &headers,
            BodyLength::Known(3),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b HTTP/1.1\r\nhost: up:80\r\ncontent-length: 3\r\n\r\n"
        );
        let mut out = Vec::new();
        headers.remove("host");
        let host = HeaderValue::from_static("up:81");
        write_request(
            &mut out,
            &Method::PUT,
            "/",
            Some(&host),
            &headers,
            BodyLength::Chunked,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "PUT / HTTP/1.1\r\nhost: up:81\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}
