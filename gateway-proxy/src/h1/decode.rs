//! Reading a message body the way its framing says (RFC 9112 §6.3, §7.1).

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::SizeHint;

use super::fields::{self, Fields};
use super::head::{self, MAX_HEADERS};
use crate::buffers::{READ_MAX, READ_START};

/// The longest chunk-size line accepted, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

/// How a body is delimited, and how far it has been read.
#[derive(Debug)]
pub(crate) enum Decoder {
    /// `Content-Length`: this many bytes are left (0: complete).
    Length(u64),
    /// The chunked transfer coding.
    Chunked(Chunked),
    /// Everything until the peer closes the connection (a response without framing).
    Eof,
}

/// Where a chunked body is.
#[derive(Debug)]
pub(crate) enum Chunked {
    /// A chunk-size line comes next.
    Size,
    /// Inside a chunk: this many data bytes are left.
    Data(u64),
    /// The CRLF that ends a chunk's data comes next.
    DataEnd,
    /// The last chunk has been read; the trailer section comes next.
    Trailers,
    /// Complete.
    Done,
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug)]
pub(crate) enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// Nothing complete yet: read more.
    More,
}

/// A body that breaks its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidBody(&'static str);

// === impl Decoder ===

impl Decoder {
    /// Whether the whole body has been read.
    pub(crate) const fn is_done(&self) -> bool {
        matches!(self, Self::Length(0) | Self::Chunked(Chunked::Done))
    }

    /// How many body bytes are known to be left, if the framing says.
    pub(crate) const fn remaining(&self) -> Option<u64> {
        match self {
            Self::Length(left) => Some(*left),
            Self::Chunked(Chunked::Data(left)) => Some(*left),
            _ => None,
        }
    }

    /// How much to read off the connection for the next piece: what the framing says is
    /// left of the body or of the current chunk, at most [`READ_MAX`]; a buffer's worth
    /// when it does not say.
    pub(crate) fn read_size(&self) -> usize {
        self.remaining().map_or(READ_START, |left| {
            usize::try_from(left).map_or(READ_MAX, |left| left.clamp(1, READ_MAX))
        })
    }

    /// Whether the rest of the body is all in `buf` already.
    pub(crate) fn is_buffered(&self, buf: &BytesMut) -> bool {
        matches!(self, Self::Length(left) if *left <= buf.len() as u64)
    }

    /// The rest of the body in one piece, if it is all in `buf` already (a small body that
    /// came with its head, or what a reader left of one): taken out of `buf`, and the
    /// decoder is done. Nothing to feed piece by piece, and the connection is free at once.
    #[inline]
    pub(crate) fn take_buffered(&mut self, buf: &mut BytesMut) -> Option<Bytes> {
        if !self.is_buffered(buf) {
            return None;
        }
        let Self::Length(left) = std::mem::replace(self, Self::Length(0)) else {
            return None;
        };
        // NOTE: no larger than `buf`, so it fits.
        Some(
            buf.split_to(usize::try_from(left).unwrap_or(buf.len()))
                .freeze(),
        )
    }

    /// What is known of the body's length left, for [`http_body::Body::size_hint`]: exact
    /// with `Content-Length`; with chunks, only a lower bound (the rest of the current
    /// chunk), never an exact size, or a layer that asks would frame the body by it.
    pub(crate) fn size_hint(&self) -> SizeHint {
        match self {
            Self::Length(left) => SizeHint::with_exact(*left),
            Self::Chunked(Chunked::Done) => SizeHint::with_exact(0),
            Self::Chunked(Chunked::Data(left)) => {
                let mut hint = SizeHint::new();
                hint.set_lower(*left);
                hint
            }
            _ => SizeHint::new(),
        }
    }

    /// Takes the next piece of the body out of `buf`; `eof` says the peer has closed the
    /// connection, so nothing will be added to `buf`.
    ///
    /// Data comes out as slices of `buf`'s memory, never copied.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, InvalidBody> {
        match self {
            Self::Length(0) => Ok(Decoded::End),
            Self::Length(left) => {
                if buf.is_empty() {
                    return more(eof);
                }
                let n = take(left, buf.len());
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Self::Eof => {
                if !buf.is_empty() {
                    Ok(Decoded::Data(buf.split().freeze()))
                } else if eof {
                    *self = Self::Length(0);
                    Ok(Decoded::End)
                } else {
                    Ok(Decoded::More)
                }
            }
            Self::Chunked(state) => state.decode(buf, eof),
        }
    }
}

/// Takes up to `available` of the `left` bytes of a body or chunk.
fn take(left: &mut u64, available: usize) -> usize {
    // NOTE: the minimum is at most `available`, so it fits a `usize`.
    let n = usize::try_from((*left).min(available as u64)).unwrap_or(available);
    *left -= n as u64;
    n
}

/// Nothing complete in the buffer: more is needed, unless the peer has closed.
const fn more(eof: bool) -> Result<Decoded, InvalidBody> {
    if eof {
        Err(InvalidBody(
            "the connection closed before the body was complete",
        ))
    } else {
        Ok(Decoded::More)
    }
}

// === impl Chunked ===

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Decoded, InvalidBody> {
        loop {
            match self {
                Self::Size => {
                    let Some(line) = line_end(buf, MAX_CHUNK_LINE)? else {
                        return more(eof);
                    };
                    let size = chunk_size(&buf[..line])?;
                    buf.advance(line + 2);
                    *self = if size == 0 {
                        Self::Trailers
                    } else {
                        Self::Data(size)
                    };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return more(eof);
                    }
                    let n = take(left, buf.len());
                    if *left == 0 {
                        *self = Self::DataEnd;
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return more(eof);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(InvalidBody("chunk data is not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers => {
                    let Some(end) = section_end(buf)? else {
                        return more(eof);
                    };
                    let section = buf.split_to(end).freeze();
                    *self = Self::Done;
                    return match trailers(&section)? {
                        Some(fields) => Ok(Decoded::Trailers(fields)),
                        None => Ok(Decoded::End),
                    };
                }
                Self::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// Where the line at the start of `buf` ends (the index of its CR), once it is complete.
/// Lines end with CRLF: a bare LF is refused rather than guessed at, as is a line longer
/// than `max`.
fn line_end(buf: &[u8], max: usize) -> Result<Option<usize>, InvalidBody> {
    let window = &buf[..buf.len().min(max + 2)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) if lf > 0 && window[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(InvalidBody("a chunk line does not end with CRLF")),
        None if window.len() > max => Err(InvalidBody("a chunk line is too long")),
        None => Ok(None),
    }
}

/// The size on a chunk-size line: hex digits, then optional extensions, which must follow
/// their grammar and are otherwise ignored (RFC 9112 §7.1.1).
fn chunk_size(line: &[u8]) -> Result<u64, InvalidBody> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(InvalidBody("a chunk size is not a hex number"));
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(digit))
            .ok_or(InvalidBody("a chunk size overflows"))?;
    }
    if !is_chunk_ext(&line[digits..]) {
        return Err(InvalidBody("a chunk size is followed by something else"));
    }
    Ok(size)
}

/// Whether `ext` is `*( BWS ";" BWS ext-name [ BWS "=" BWS ext-value ] )`, where a name is
/// a token and a value a token or a quoted string.
///
/// NOTE: strict, although extensions are dropped: a lenient reading (anything up to the
/// line end) is where parsers disagree about where a chunk line ends, and nothing sends
/// anything but the grammar.
fn is_chunk_ext(mut ext: &[u8]) -> bool {
    loop {
        ext = skip_bws(ext);
        let Some(rest) = ext.strip_prefix(b";") else {
            return ext.is_empty();
        };
        ext = skip_bws(rest);
        let name = fields::token_len(ext);
        if name == 0 {
            return false;
        }
        ext = skip_bws(&ext[name..]);
        let Some(rest) = ext.strip_prefix(b"=") else {
            continue;
        };
        ext = skip_bws(rest);
        let value = match ext.strip_prefix(b"\"") {
            Some(quoted) => match quoted_len(quoted) {
                Some(len) => len + 1,
                None => return false,
            },
            None => fields::token_len(ext),
        };
        if value == 0 {
            return false;
        }
        ext = &ext[value..];
    }
}

/// `BWS`: optional spaces and tabs.
fn skip_bws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

/// The length of a quoted string's rest, after its opening quote and up to and with its
/// closing one (RFC 9110 §5.6.4); `None` when it is malformed or not closed.
fn quoted_len(s: &[u8]) -> Option<usize> {
    let text = |b: u8| b == b'\t' || (b >= b' ' && b != 0x7f);
    let mut i = 0;
    loop {
        match *s.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' if s.get(i + 1).is_some_and(|&b| text(b)) => i += 2,
            b'\\' => return None,
            b if text(b) => i += 1,
            _ => return None,
        }
    }
}

/// The length of the trailer section at the start of `buf` (field lines and the empty
/// line after them), once it is complete.
///
/// NOTE: the end is found by the parser that reads the fields, by the same rules as the
/// end of a head (a line may end in a bare LF, RFC 9112 §2.2), never by looking for CRLF
/// CRLF: a section the parser ends earlier than such a search would leave bytes that
/// belong to no message (the next request, pipelined behind the body).
fn section_end(buf: &[u8]) -> Result<Option<usize>, InvalidBody> {
    let window = &buf[..buf.len().min(MAX_TRAILERS)];
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(window, &mut fields) {
        Ok(httparse::Status::Complete((len, _))) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_TRAILERS => {
            Err(InvalidBody("the trailer section is too large"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(InvalidBody("the trailer section is malformed")),
    }
}

/// The fields of a complete trailer section (`None` when it has none), without those a
/// trailer must not carry: framing, routing and connection control (RFC 9110 §6.5.1),
/// which a proxy never forwards.
fn trailers(section: &Bytes) -> Result<Option<HeaderMap>, InvalidBody> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((len, parsed))) if len == section.len() => parsed,
        _ => return Err(InvalidBody("the trailer section is malformed")),
    };
    if parsed.is_empty() {
        return Ok(None);
    }
    let mut map =
        head::fields(section, parsed).map_err(|_| InvalidBody("a trailer is malformed"))?;
    fields::remove(&mut map, Fields::NOT_IN_TRAILERS);
    Ok(Some(map))
}

// === impl InvalidBody ===

impl fmt::Display for InvalidBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidBody {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` to a decoder `step` bytes at a time; returns the data, the trailers
    /// and whether the body ended.
    fn run(
        mut decoder: Decoder,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>, bool), InvalidBody> {
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf, fed == input.len())? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers, true)),
                Decoded::More => {
                    if fed == input.len() {
                        return Ok((data, trailers, false));
                    }
                    let next = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
            }
        }
    }

    fn chunked() -> Decoder {
        Decoder::Chunked(Chunked::Size)
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let input = b"5\r\nhello\r\n7;ext=\"v\"\r\n, world\r\n0\r\nx-sum: 1\r\nx-n: 2\r\n\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let (data, trailers, done) = run(chunked(), input, step).unwrap();
            assert_eq!(data, b"hello, world", "step {step}");
            let trailers = trailers.unwrap();
            assert_eq!(trailers["x-sum"], "1");
            assert_eq!(trailers["x-n"], "2");
            assert!(done);
        }
    }

    #[test]
    fn a_chunked_body_without_trailers_ends_at_the_empty_line() {
        let (data, trailers, done) = run(chunked(), b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!(
            (data.as_slice(), trailers.is_none(), done),
            (&b"abc"[..], true, true)
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        // Each input is whole (it ends as a body ends), so what fails is the flaw named,
        // not the end of the input.
        for (bad, why) in [
            (&b"x\r\n0\r\n\r\n"[..], "a chunk size is not a hex number"),
            (
                b"5\nhello\r\n0\r\n\r\n",
                "a chunk line does not end with CRLF",
            ),
            (
                b"5\r\nhelloXY0\r\n\r\n",
                "chunk data is not followed by CRLF",
            ),
            (
                b"-5\r\nhello\r\n0\r\n\r\n",
                "a chunk size is not a hex number",
            ),
            (
                b"5 x\r\nhello\r\n0\r\n\r\n",
                "a chunk size is followed by something else",
            ),
            (
                b"5;a\x01b\r\nhello\r\n0\r\n\r\n",
                "a chunk size is followed by something else",
            ),
            (
                b"10000000000000000\r\nx\r\n0\r\n\r\n",
                "a chunk size overflows",
            ),
            (
                b"0\r\nbad trailer\r\n\r\n",
                "the trailer section is malformed",
            ),
        ] {
            assert_eq!(
                run(chunked(), bad, 1).err(),
                Some(InvalidBody(why)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Found by the `server_h1` fuzz target: extensions were checked for control bytes
    /// only, so `1;a<"q"` was read as a chunk line, where a strict parser refuses it.
    #[test]
    fn chunk_extensions_follow_their_grammar() {
        for good in [
            &b"1;a\r\nx\r\n0\r\n\r\n"[..],
            b"1 ; a = b\r\nx\r\n0\r\n\r\n",
            b"1;a=\"q \\\" ;\";b\r\nx\r\n0;z=1\r\n\r\n",
        ] {
            let (data, _, done) = run(chunked(), good, 1).unwrap();
            assert_eq!((data.as_slice(), done), (&b"x"[..], true));
        }
        for bad in [
            &b"1;a<\"q\"\r\nx\r\n0\r\n\r\n"[..],
            b"1;\r\nx\r\n0\r\n\r\n",
            b"1;=b\r\nx\r\n0\r\n\r\n",
            b"1;a=\r\nx\r\n0\r\n\r\n",
            b"1;a=\"open\r\nx\r\n0\r\n\r\n",
            b"1;a b\r\nx\r\n0\r\n\r\n",
            b"1\x0c;a\r\nx\r\n0\r\n\r\n",
            b"1;a=\"\x01\"\r\nx\r\n0\r\n\r\n",
        ] {
            assert_eq!(
                run(chunked(), bad, 1).err(),
                Some(InvalidBody("a chunk size is followed by something else")),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn endless_chunk_lines_and_trailers_are_cut() {
        let mut line = b"5;".to_vec();
        line.resize(MAX_CHUNK_LINE + 10, b'a');
        assert_eq!(
            run(chunked(), &line, 1000).unwrap_err(),
            InvalidBody("a chunk line is too long")
        );
        let mut trailer = b"0\r\nx: ".to_vec();
        trailer.resize(MAX_TRAILERS + 10, b'a');
        assert!(run(chunked(), &trailer, 1000).is_err());
    }

    #[test]
    fn forbidden_trailers_are_dropped() {
        let input = b"0\r\ncontent-length: 5\r\nx-ok: 1\r\n\r\n";
        let (_, trailers, _) = run(chunked(), input, input.len()).unwrap();
        let trailers = trailers.unwrap();
        assert_eq!(trailers.len(), 1);
        assert_eq!(trailers["x-ok"], "1");
    }

    #[test]
    fn a_truncated_body_is_an_error_and_extra_bytes_are_left_alone() {
        assert!(run(Decoder::Length(10), b"short", 2).is_err());
        assert!(run(chunked(), b"5\r\nhel", 2).is_err());
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        let mut decoder = Decoder::Length(4);
        assert!(matches!(decoder.decode(&mut buf, false), Ok(Decoded::Data(d)) if d == "abcd"));
        assert!(matches!(decoder.decode(&mut buf, false), Ok(Decoded::End)));
        assert_eq!(&buf[..], b"ef");
    }

    /// Every byte after a body belongs to the next message: the end of a trailer section
    /// is where the field parser ends it, bare LF included (it used to be cut at the first
    /// CRLF CRLF, and what lay between was lost: a pipelined request vanished).
    #[test]
    fn a_trailer_section_ends_where_its_fields_end() {
        for (input, trailers) in [
            (&b"3\r\nabc\r\n0\r\nX: 1\n\n"[..], 1),
            (b"3\r\nabc\r\n0\r\n\n", 0),
            (b"3\r\nabc\r\n0\r\nX: y\n\r\n", 1),
            (b"3\r\nabc\r\n0\r\nX: y\r\n\n", 1),
            (b"3\r\nabc\r\n0\r\n\r\n", 0),
        ] {
            let next = b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n";
            let mut buf = BytesMut::from(&[input, &next[..]].concat()[..]);
            let mut decoder = chunked();
            let mut fields = None;
            loop {
                match decoder.decode(&mut buf, false).unwrap() {
                    Decoded::Data(d) => assert_eq!(d, "abc"),
                    Decoded::Trailers(t) => fields = Some(t),
                    Decoded::End => break,
                    Decoded::More => panic!("complete: {input:?}"),
                }
                if decoder.is_done() {
                    break;
                }
            }
            assert_eq!(&buf[..], next, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(fields.map_or(0, |f| f.len()), trailers);
        }
    }

    /// Finding 4c of the hardening review: a chunked body's size is never exact (it was the
    /// rest of the current chunk, and a layer asking would have framed the body by it).
    #[test]
    fn a_chunked_body_has_no_exact_size() {
        let mut decoder = chunked();
        let mut buf = BytesMut::from(&b"5\r\nhel"[..]);
        assert!(matches!(
            decoder.decode(&mut buf, false),
            Ok(Decoded::Data(_))
        ));
        let hint = decoder.size_hint();
        assert_eq!((hint.lower(), hint.exact()), (2, None));
        assert_eq!(Decoder::Length(7).size_hint().exact(), Some(7));
    }

    #[test]
    fn a_close_delimited_body_ends_with_the_connection() {
        let (data, _, done) = run(Decoder::Eof, b"all of it", 4).unwrap();
        assert_eq!((data.as_slice(), done), (&b"all of it"[..], true));
    }
}
