//! How the HTTP/1.1 targets spell the messages they generate: every legal variation of
//! line ends, whitespace, case and chunk syntax, and the model of what a correct reader
//! makes of it.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

use super::rfc9112::fields;

/// How a message is spelled.
#[derive(Debug, Clone)]
pub(crate) struct Style {
    /// Per line, cycled: a bare LF instead of CRLF (start line and field lines only).
    bare_lf: Vec<bool>,
    /// Optional whitespace before and after field values.
    ows: (&'static str, &'static str),
    upper_names: bool,
    upper_hex: bool,
    /// Leading zeros on chunk sizes.
    zeros: usize,
    /// Extensions on chunk lines.
    ext: &'static str,
    /// Lines ended so far.
    line: usize,
}

/// A message body and its framing.
#[derive(Debug, Clone)]
pub(crate) enum Framing {
    None,
    Length(Vec<u8>),
    Chunked {
        chunks: Vec<Vec<u8>>,
        trailers: Vec<(String, String)>,
    },
    /// Until the connection closes (responses only).
    Eof(Vec<u8>),
}

/// Field names without meaning to HTTP/1.1 framing or connection control.
pub(crate) const NAMES: &[&str] = &[
    "x-a",
    "x-b",
    "accept",
    "user-agent",
    "cookie",
    "x-forwarded-for",
    "cache-control",
    "x-long-name-with-dashes",
];

// === impl Style ===

impl Style {
    /// Ends a start line or field line.
    pub(crate) fn end(&mut self, out: &mut Vec<u8>) {
        let bare = self.bare_lf[self.line % self.bare_lf.len()];
        self.line += 1;
        out.extend_from_slice(if bare { b"\n" } else { b"\r\n" });
    }

    /// A field line.
    pub(crate) fn field(&mut self, out: &mut Vec<u8>, name: &str, value: &str) {
        if self.upper_names {
            out.extend(name.bytes().map(|b| b.to_ascii_uppercase()));
        } else {
            out.extend_from_slice(name.as_bytes());
        }
        out.push(b':');
        out.extend_from_slice(self.ows.0.as_bytes());
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(self.ows.1.as_bytes());
        self.end(out);
    }

    /// The field that frames `body`, if it takes one.
    pub(crate) fn framing_field(&mut self, out: &mut Vec<u8>, body: &Framing) {
        match body {
            Framing::None | Framing::Eof(_) => {}
            Framing::Length(body) => self.field(out, "content-length", &body.len().to_string()),
            Framing::Chunked { .. } => self.field(out, "transfer-encoding", "chunked"),
        }
    }

    /// The body, framed as it says.
    pub(crate) fn body(&mut self, out: &mut Vec<u8>, body: &Framing) {
        match body {
            Framing::None => {}
            Framing::Length(body) | Framing::Eof(body) => out.extend_from_slice(body),
            Framing::Chunked { chunks, trailers } => {
                for chunk in chunks.iter().map(Vec::as_slice).chain([&[][..]]) {
                    let width = self.zeros + 1;
                    let size = if self.upper_hex {
                        format!("{:0width$X}", chunk.len())
                    } else {
                        format!("{:0width$x}", chunk.len())
                    };
                    out.extend_from_slice(size.as_bytes());
                    out.extend_from_slice(self.ext.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    if !chunk.is_empty() {
                        out.extend_from_slice(chunk);
                        out.extend_from_slice(b"\r\n");
                    }
                }
                for (name, value) in trailers {
                    self.field(out, name, value);
                }
                self.end(out);
            }
        }
    }
}

// === impl Framing ===

impl Framing {
    /// The framing field, as a correct reader sees it.
    pub(crate) fn model_field(&self, fields: &mut HeaderMap) {
        match self {
            Self::None | Self::Eof(_) => {}
            Self::Length(body) => add(fields, "content-length", &body.len().to_string()),
            Self::Chunked { .. } => add(fields, "transfer-encoding", "chunked"),
        }
    }

    /// The body and trailers a correct reader sees.
    pub(crate) fn model(&self) -> (Bytes, Vec<(String, Bytes)>) {
        match self {
            Self::None => (Bytes::new(), Vec::new()),
            Self::Length(body) | Self::Eof(body) => (Bytes::from(body.clone()), Vec::new()),
            Self::Chunked { chunks, trailers } => {
                let mut map = HeaderMap::new();
                for (name, value) in trailers {
                    add(&mut map, name, value);
                }
                (Bytes::from(chunks.concat()), fields(&map))
            }
        }
    }
}

/// Appends a generated field as a correct reader sees it (without optional whitespace).
pub(crate) fn add(fields: &mut HeaderMap, name: &str, value: &str) {
    let name = HeaderName::from_bytes(name.as_bytes()).expect("generated names are tokens");
    let value = HeaderValue::from_str(value.trim_matches([' ', '\t']))
        .expect("generated values are visible ASCII");
    fields.append(name, value);
}

// === strategies ===

pub(crate) fn style() -> impl Strategy<Value = Style> {
    (
        proptest::collection::vec(proptest::bool::weighted(0.2), 1..8),
        proptest::sample::select(&[("", ""), (" ", ""), ("\t", " "), ("  ", " \t")][..]),
        any::<bool>(),
        any::<bool>(),
        0..3usize,
        proptest::sample::select(&["", ";a", ";a=b", ";a=\"q ;\"", " ; a = b"][..]),
    )
        .prop_map(|(bare_lf, ows, upper_names, upper_hex, zeros, ext)| Style {
            bare_lf,
            ows,
            upper_names,
            upper_hex,
            zeros,
            ext,
            line: 0,
        })
}

/// A field value: visible ASCII, spaces and tabs inside.
pub(crate) fn value() -> impl Strategy<Value = String> {
    "([!-~]([ \t!-~]{0,10}[!-~])?)?"
}

pub(crate) fn field() -> impl Strategy<Value = (String, String)> {
    (proptest::sample::select(NAMES), value()).prop_map(|(n, v)| (n.to_owned(), v))
}

/// No body, a `Content-Length` one or a chunked one (`eof`: or one delimited by the end of
/// the connection).
pub(crate) fn framing(eof: bool) -> impl Strategy<Value = Framing> {
    let body = || proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        Just(Framing::None),
        body().prop_map(Framing::Length),
        (
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..24), 0..4),
            proptest::collection::vec(field(), 0..3),
        )
            .prop_map(|(chunks, trailers)| Framing::Chunked { chunks, trailers }),
        body().prop_map(move |body| if eof {
            Framing::Eof(body)
        } else {
            Framing::Length(body)
        }),
    ]
}
