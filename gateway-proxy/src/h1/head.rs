//! Message heads: parsing request and response heads into `http` types, and writing them.

use std::fmt;
use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use http_body::SizeHint;

use super::decode::{Chunked, Decoder};
use super::fields::{Field, is_te_trailers, tokens};

/// The most fields a head may have.
pub(crate) const MAX_HEADERS: usize = 100;
/// The largest response head accepted.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A head that is not valid HTTP/1.1, or that this implementation refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidHead(pub(crate) &'static str);

/// Why a request head is refused, by the status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// 400: malformed, or framed ambiguously.
    Malformed(&'static str),
    /// 431: too many fields, or a head over the size limit.
    TooLarge,
    /// 414: the request line alone is over the size limit.
    UriTooLong,
    /// 501: a transfer coding other than `chunked`.
    Coding,
    /// 505: not HTTP/1.x.
    Version,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) meta: Meta,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) meta: Meta,
}

/// What a head's framing and connection-control fields say.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Meta {
    /// The one `Content-Length` value (several equal values count as one).
    content_length: Option<u64>,
    /// `Content-Length` fields that are malformed or disagree.
    bad_length: bool,
    /// A `Transfer-Encoding` field is present.
    transfer_encoding: bool,
    /// `Transfer-Encoding` lists `chunked` once, last.
    chunked_last: bool,
    /// `Transfer-Encoding` lists anything but one `chunked`.
    other_coding: bool,
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep_alive: bool,
    /// `Connection: upgrade`.
    pub(crate) upgrade: bool,
    /// `Expect: 100-continue`.
    pub(crate) expect_continue: bool,
    /// `Connection` names a field (beyond `close`, `keep-alive` and `upgrade`).
    pub(crate) nominates: bool,
    /// `TE: trailers`: the client accepts trailers.
    pub(crate) te_trailers: bool,
}

/// Where one field's name and value lie in the head they were parsed from: start and end
/// of each.
#[derive(Clone, Copy)]
struct Span([u32; 4]);

// === parsing ===

/// Parses a request head at the start of `buf` with at most `max_headers` fields (up to
/// [`MAX_HEADERS`]) and `max_head` bytes; once it is complete, removes it from `buf` and
/// returns it (its field values share the buffer's memory). `Ok(None)`: not complete yet.
pub(crate) fn parse_request(
    buf: &mut BytesMut,
    max_headers: usize,
    max_head: usize,
) -> Result<Option<RequestHead>, Refused> {
    let mut spans = [Span::EMPTY; MAX_HEADERS];
    let max_headers = max_headers.min(MAX_HEADERS);
    let (len, method, target, version, count) = {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let parsed = req.parse_with_uninit_headers(buf, &mut fields[..max_headers]);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len <= max_head => len,
            Ok(httparse::Status::Partial) if buf.len() <= max_head => return Ok(None),
            // Over the limit: the request line itself, or the fields.
            Ok(_)
                if req.version.is_none()
                    || req.path.map_or(0, str::len) + "OPTIONS  HTTP/1.1\r\n".len() > max_head =>
            {
                return Err(Refused::UriTooLong);
            }
            Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooLarge),
            Err(httparse::Error::Version) => return Err(Refused::Version),
            Err(_) => return Err(Refused::Malformed("the request head is malformed")),
        };
        let method = req.method.unwrap_or_default();
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| Refused::Malformed("the method is invalid"))?;
        let version = match req.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let base = buf.as_ptr() as usize;
        let target = req
            .path
            .map(|p| Span::range(base, p.as_bytes()))
            .unwrap_or_default();
        for (span, field) in spans.iter_mut().zip(req.headers.iter()) {
            *span = Span::of(base, field.name.as_bytes(), field.value);
        }
        (len, method, target, version, req.headers.len())
    };
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1))
        .map_err(|_| Refused::Malformed("the request target is invalid"))?;
    // Room for the fields a proxy adds (`X-Forwarded-*`, `Forwarded`, `Via`) without
    // growing the map.
    let (headers, meta) = build(&head, &spans[..count], count + 5, |_| false)
        .map_err(|InvalidHead(why)| Refused::Malformed(why))?;
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        meta,
    }))
}

/// Parses a response head at the start of `buf`; once it is complete, removes it from
/// `buf` and returns it (its field values share the buffer's memory). `Ok(None)`: not
/// complete yet.
///
/// Fields for which `skip(field, status)` holds are read for what they say about framing
/// and the connection, but left out of the header map: a proxy drops the hop-by-hop ones
/// this way without inserting them first.
pub(crate) fn parse_response(
    buf: &mut BytesMut,
    skip: impl Fn(Field, StatusCode) -> bool,
) -> Result<Option<ResponseHead>, InvalidHead> {
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
            Ok(httparse::Status::Complete(len)) if len <= MAX_RESPONSE_HEAD => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
            Ok(_) => return Err(InvalidHead("the response head is too large")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(InvalidHead("the response has too many header fields"));
            }
            Err(_) => return Err(InvalidHead("the response head is malformed")),
        };
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
    let (headers, meta) = build(&head, &spans[..count], count + 1, |field| {
        skip(field, status)
    })?;
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
    build(src, &spans[..parsed.len()], parsed.len(), |_| false).map(|(map, _)| map)
}

/// Builds the header map (with room for `room` fields) of a head whose fields lie in `src`
/// at `spans`, noting what the framing and connection fields say, and leaving out those
/// `skip` names.
fn build(
    src: &Bytes,
    spans: &[Span],
    room: usize,
    skip: impl Fn(Field) -> bool,
) -> Result<(HeaderMap, Meta), InvalidHead> {
    let mut map = HeaderMap::with_capacity(room);
    let mut meta = Meta::default();
    for &Span([name_start, name_end, value_start, value_end]) in spans {
        let name = &src[name_start as usize..name_end as usize];
        let range = value_start as usize..value_end as usize;
        let field = Field::of(name);
        meta.note(field, &src[range.clone()]);
        if skip(field) {
            continue;
        }
        let name =
            HeaderName::from_bytes(name).map_err(|_| InvalidHead("a field name is invalid"))?;
        let value = HeaderValue::from_maybe_shared(src.slice(range))
            .map_err(|_| InvalidHead("a field value is invalid"))?;
        map.append(name, value);
    }
    if meta.nominates && skip(Field::Connection) {
        // `Connection` is left out, so the fields it names go too (RFC 9110 §7.6.1).
        for &Span([name_start, name_end, value_start, value_end]) in spans {
            if Field::of(&src[name_start as usize..name_end as usize]) != Field::Connection {
                continue;
            }
            for token in tokens(&src[value_start as usize..value_end as usize]) {
                if let Ok(name) = HeaderName::from_bytes(token) {
                    map.remove(name);
                }
            }
        }
    }
    Ok((map, meta))
}

// === impl Span ===

impl Span {
    const EMPTY: Self = Self([0; 4]);

    /// Where `s` lies in the buffer that starts at `base`.
    fn range(base: usize, s: &[u8]) -> (usize, usize) {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    }

    /// The span of a field parsed from the buffer that starts at `base`.
    fn of(base: usize, name: &[u8], value: &[u8]) -> Self {
        // NOTE: heads are limited far below 4 GiB, so every offset fits.
        let at = |s: &[u8]| {
            let (start, end) = Self::range(base, s);
            (
                u32::try_from(start).unwrap_or(u32::MAX),
                u32::try_from(end).unwrap_or(u32::MAX),
            )
        };
        let ((name_start, name_end), (value_start, value_end)) = (at(name), at(value));
        Self([name_start, name_end, value_start, value_end])
    }
}

// === impl Meta ===

impl Meta {
    /// Notes what a field says about framing and the connection.
    fn note(&mut self, field: Field, value: &[u8]) {
        match field {
            Field::ContentLength => {
                // Several fields, or a list, are accepted only when every value is the
                // same (RFC 9110 §8.6).
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    match parse_length(token) {
                        Some(n) if self.content_length.is_none_or(|seen| seen == n) => {
                            self.content_length = Some(n);
                        }
                        _ => self.bad_length = true,
                    }
                }
            }
            Field::TransferEncoding => {
                self.transfer_encoding = true;
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    let chunked = token.eq_ignore_ascii_case(b"chunked");
                    // Only `chunked`, once: a proxy that removes the field must undo every
                    // coding it lists, and no other transfer coding is in use.
                    self.other_coding |= !chunked || self.chunked_last;
                    self.chunked_last = chunked;
                }
            }
            Field::Connection => {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        self.upgrade = true;
                    } else {
                        self.nominates = true;
                    }
                }
            }
            Field::Expect => {
                self.expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
            }
            Field::Te => self.te_trailers |= tokens(value).any(is_te_trailers),
            _ => {}
        }
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
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        let digit = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

// === framing ===

impl RequestHead {
    /// How the body of this request is delimited; `Ok(None)` when it has none (RFC 9112
    /// §6.3). Framing that could be read two ways is refused, never guessed at: that is
    /// what request smuggling feeds on.
    pub(crate) fn body(&self) -> Result<Option<Decoder>, Refused> {
        let meta = &self.meta;
        if meta.bad_length {
            return Err(Refused::Malformed("the Content-Length is invalid"));
        }
        if meta.transfer_encoding {
            if self.version == Version::HTTP_10 {
                return Err(Refused::Malformed(
                    "an HTTP/1.0 request has a Transfer-Encoding",
                ));
            }
            if meta.content_length.is_some() {
                return Err(Refused::Malformed(
                    "a request has both Content-Length and Transfer-Encoding",
                ));
            }
            if !meta.chunked_last {
                return Err(Refused::Malformed(
                    "the Transfer-Encoding does not end in chunked",
                ));
            }
            if meta.other_coding {
                return Err(Refused::Coding);
            }
            return Ok(Some(Decoder::Chunked(Chunked::Size)));
        }
        Ok(match meta.content_length {
            None | Some(0) => None,
            Some(len) => Some(Decoder::Length(len)),
        })
    }
}

impl ResponseHead {
    /// How the body of this response is delimited, given the request's method; `Ok(None)`
    /// when it has none (RFC 9112 §6.3).
    pub(crate) fn body(&self, method: &Method) -> Result<Option<Decoder>, InvalidHead> {
        let meta = &self.meta;
        // NOTE: checked first: an invalid Content-Length is an unrecoverable error whatever
        // the message (RFC 9112 §6.3), and one on an answer to HEAD would be forwarded.
        if meta.bad_length {
            return Err(InvalidHead(
                "the Content-Length is invalid or the values differ",
            ));
        }
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
            if meta.other_coding || !meta.chunked_last {
                return Err(InvalidHead("the Transfer-Encoding is not plain chunked"));
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

/// How a message body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// No body and no framing field.
    None,
    /// `Content-Length: n`.
    Known(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// No framing field: the body ends when the connection closes (responses to HTTP/1.0
    /// clients of unknown length).
    Close,
}

impl BodyLength {
    /// How a body of `hint`'s size is announced: by its length where that is known; else in
    /// chunks, to a peer that reads them (`chunked`: HTTP/1.1); else by the close.
    pub(crate) fn of(hint: &SizeHint, chunked: bool) -> Self {
        match hint.exact() {
            Some(n) => Self::Known(n),
            None if chunked => Self::Chunked,
            None => Self::Close,
        }
    }
}

/// Writes a request head for `target` (origin-form): `host` as its first field when given
/// (in place of any `Host` in `headers`), then `headers`, then `extra`. Framing fields in
/// `headers` are skipped: `length` decides them.
pub(crate) fn write_request<'a>(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    host: Option<&HeaderValue>,
    headers: &HeaderMap,
    extra: impl Iterator<Item = &'a (HeaderName, HeaderValue)> + Clone,
    length: BodyLength,
) {
    // The head's exact size (give or take the framing field's 40 bytes): a guess grew the
    // buffer, a copy of the whole head, whenever the forwarding fields and a
    // `traceparent` took it past.
    let field = |(name, value): (&HeaderName, &HeaderValue)| name.as_str().len() + value.len() + 4;
    let size = method.as_str().len()
        + target.len()
        + 16
        + host.map_or(0, |host| host.len() + 8)
        + headers.iter().map(field).sum::<usize>()
        + extra
            .clone()
            .map(|(name, value)| field((name, value)))
            .sum::<usize>()
        + 40;
    out.reserve(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        write_field(out, HOST.as_str(), host);
    }
    for (name, value) in headers {
        let skip =
            name == CONTENT_LENGTH || name == TRANSFER_ENCODING || (host.is_some() && name == HOST);
        if !skip {
            write_field(out, name.as_str(), value);
        }
    }
    for (name, value) in extra {
        write_field(out, name.as_str(), value);
    }
    write_length(out, length);
    out.extend_from_slice(b"\r\n");
}

fn write_field(out: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The connection-control field a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Persist {
    /// None: HTTP/1.1 keep-alive is the default.
    Default,
    /// `Connection: keep-alive` (to an HTTP/1.0 client that asked for it).
    KeepAlive,
    /// `Connection: close`.
    Close,
}

/// Writes a response head. Framing fields in `headers` are skipped, but for a
/// `Content-Length` kept as given (`keep_length`: responses to `HEAD` and `304`s describe a
/// body that is not sent); `length` decides the rest. `date` is added unless `headers`
/// has one.
pub(crate) fn write_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    keep_length: bool,
    length: BodyLength,
    persist: Persist,
    date: Option<&[u8]>,
) {
    out.reserve(128 + headers.len() * 32);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_fields(out, headers, keep_length);
    if let Some(date) = date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    write_length(out, length);
    match persist {
        Persist::Default => {}
        Persist::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
        Persist::Close => out.extend_from_slice(b"connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

fn write_length(out: &mut Vec<u8>, length: BodyLength) {
    match length {
        BodyLength::None | BodyLength::Close => {}
        BodyLength::Known(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyLength::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
}

/// Writes header fields (or trailer fields), skipping the framing ones (but for
/// `Content-Length`, if `keep_length`).
pub(crate) fn write_fields(out: &mut Vec<u8>, headers: &HeaderMap, keep_length: bool) {
    for (name, value) in headers {
        if (name == CONTENT_LENGTH && !keep_length) || name == TRANSFER_ENCODING {
            continue;
        }
        write_field(out, name.as_str(), value);
    }
}

// === impl InvalidHead ===

impl fmt::Display for InvalidHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidHead {}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => f.write_str(why),
            Self::TooLarge => f.write_str("the request head is too large"),
            Self::UriTooLong => f.write_str("the request line is too long"),
            Self::Coding => f.write_str("a transfer coding other than chunked"),
            Self::Version => f.write_str("not an HTTP/1.x request"),
        }
    }
}

impl std::error::Error for Refused {}

#[cfg(test)]
mod tests;
