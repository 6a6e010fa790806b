//! Fuzz target `client_h1` (see `crate::fuzz`): upstream answers, generated and mutated
//! like `server_h1`'s requests and written in random pieces over loopback, read by an
//! [`Exchange`], judged against a strict RFC 9112 response reader.
//!
//! The oracle:
//! - an answer we read whole (head and body) is the one the reference reads: status,
//!   version, end-to-end fields, body, trailers;
//! - a connection goes back to the pool only when the reference says it may carry another
//!   exchange: persistent, delimited, and with no byte after the answer (a byte there is an
//!   answer to no request: the next exchange would read it as its own);
//! - unmutated answers are read as generated;
//! - no exchange hangs once the upstream has closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http::{HeaderMap, Method, Request, Version};
use http_body_util::BodyExt as _;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::{Exchange, Outbound};
use crate::fuzz::rfc9112::{chunked, content_length, field_lines, fields, line, list, map};
use crate::fuzz::spell::{Framing, Style, add, field, framing, style};
use crate::fuzz::{self, Mutation, ensure, mutate, split};
use crate::io::Stream;
use crate::upstream::Endpoint;
use crate::upstream::pool::Pool;
use gateway_core::Body;

/// An answer as read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    version: Version,
    /// End-to-end fields only.
    fields: Vec<(String, Bytes)>,
    body: Bytes,
    trailers: Vec<(String, Bytes)>,
}

#[derive(Clone)]
struct Case {
    head: bool,
    input: Bytes,
    cuts: Vec<usize>,
    expected: Option<Answer>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("head", &self.head)
            .field("input", &self.input)
            .field("cuts", &self.cuts)
            .field("valid", &self.expected.is_some())
            .finish()
    }
}

#[test]
fn fuzz_client_h1() {
    let corpus = CORPUS.iter().map(|input| Case {
        head: false,
        input: Bytes::from_static(input),
        cuts: Vec::new(),
        expected: None,
    });
    fuzz::run("client_h1", corpus, case(), check);
}

fn check(case: Case) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| TestCaseError::fail(err.to_string()))?;
    let (ours, pooled) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), ours(&case))
            .await
            .map_err(|_| TestCaseError::fail("the exchange hangs"))
    })??;
    let reference = reference(&case.input, case.head);
    if let Some(ours) = &ours {
        let Ok(read) = &reference else {
            return Err(TestCaseError::fail(format!(
                "we read an answer the reference refuses ({reference:?}): {ours:#?}"
            )));
        };
        ensure!(
            *ours == read.answer,
            "the answers differ:\nours      {ours:#?}\nreference {:#?}",
            read.answer
        );
    }
    if pooled {
        let reusable = reference
            .as_ref()
            .is_ok_and(|read| read.persistent && read.rest.is_empty());
        ensure!(
            reusable,
            "the connection was pooled; the reference says it cannot be reused: {reference:?}"
        );
    }
    if let Some(expected) = &case.expected {
        ensure!(
            reference
                .as_ref()
                .is_ok_and(|read| read.answer == *expected),
            "the generator or the reference is wrong: {reference:?}\nexpected {expected:#?}"
        );
        ensure!(
            ours.as_ref() == Some(expected),
            "a valid answer: we read {ours:#?}\nexpected {expected:#?}"
        );
    }
    Ok(())
}

/// Our exchange: the answer, if it was read whole, and whether the connection was pooled
/// with everything the upstream sent already there to see.
async fn ours(case: &Case) -> Result<(Option<Answer>, bool), TestCaseError> {
    let fail = |err: std::io::Error| TestCaseError::fail(err.to_string());
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(fail)?;
    let addr = listener.local_addr().map_err(fail)?;
    let client = TcpStream::connect(addr).await.map_err(fail)?;
    let (mut upstream, _) = listener.accept().await.map_err(fail)?;
    let _ = upstream.set_nodelay(true);
    let writes = split(&case.input, &case.cuts);
    // The upstream answers in pieces, then closes its sending side; it stays open (to
    // read) until the exchange is over. Answered at once, everything is there before the
    // exchange reads; in pieces, a piece may come after the exchange has pooled the
    // connection, as it may in production (checkout then finds it and drops it).
    let at_once = writes.len() <= 1;
    let answer = tokio::spawn(async move {
        for piece in writes {
            if upstream.write_all(&piece).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let _ = upstream.shutdown().await;
        upstream
    });
    let endpoint = Endpoint::new(
        Scheme::HTTP,
        addr.to_string()
            .parse()
            .map_err(|_| TestCaseError::fail("addr"))?,
    );
    let pool = Arc::new(Pool::new(&endpoint, Duration::from_secs(60), 8));
    let answer = if at_once {
        // Written and closed before the exchange starts.
        let upstream = answer
            .await
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        tokio::spawn(async move { upstream })
    } else {
        answer
    };
    let method = if case.head { Method::HEAD } else { Method::GET };
    let req = Request::builder()
        .method(method)
        .uri("/")
        .body(Body::empty())
        .map_err(|err| TestCaseError::fail(err.to_string()))?;
    let sent = Exchange::new(
        Stream::Plain(client),
        false,
        Arc::clone(&pool),
        req,
        Outbound::default(),
    )
    .await;
    let read = match sent {
        Ok(sent) => {
            let (parts, body) = sent.response.into_parts();
            match body.collect().await {
                Ok(collected) => Some(Answer {
                    status: parts.status.as_u16(),
                    version: parts.version,
                    fields: end_to_end(
                        &parts.headers,
                        case.head || parts.status == http::StatusCode::NOT_MODIFIED,
                    ),
                    trailers: collected.trailers().map(fields).unwrap_or_default(),
                    body: collected.to_bytes(),
                }),
                Err(_) => None,
            }
        }
        Err(_) => None,
    };
    let pooled = at_once && pool.idle_len() > 0;
    drop(answer.await);
    Ok((read, pooled))
}

/// The fields of `map` that are not hop-by-hop or framing, which the exchange drops; but
/// `Content-Length` stays (`keep_length`) where it describes a body not sent (answers to
/// HEAD, and 304s).
fn end_to_end(map: &HeaderMap, keep_length: bool) -> Vec<(String, Bytes)> {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "proxy-authenticate",
        "proxy-authorization",
        "content-length",
    ];
    fields(map)
        .into_iter()
        .filter(|(name, _)| {
            !HOP.contains(&name.as_str()) || (keep_length && name == "content-length")
        })
        .collect()
}

// === the reference ===

/// What the reference read.
#[derive(Debug)]
struct Read {
    answer: Answer,
    /// The connection may carry another exchange, by what the answer says.
    persistent: bool,
    /// What follows the answer.
    rest: Bytes,
}

/// Reads the answer to a GET (or HEAD) at the start of `input`, a whole connection's
/// bytes: `Err` when it is malformed or cut short. Built on `crate::fuzz::rfc9112`.
fn reference(input: &[u8], head: bool) -> Result<Read, &'static str> {
    let mut at = input;
    loop {
        // Empty lines before a status line are skipped, as before a request line (RFC
        // 9112 §2.2): stray line ends an upstream sent after its previous answer.
        while let Some(rest) = at.strip_prefix(b"\r\n").or_else(|| at.strip_prefix(b"\n")) {
            at = rest;
        }
        let (status_line, rest) = line(at, true)?.ok_or("cut short")?;
        let (version, rest_of_line) = match status_line.split_first_chunk::<9>() {
            Some((b"HTTP/1.1 ", rest)) => (Version::HTTP_11, rest),
            Some((b"HTTP/1.0 ", rest)) => (Version::HTTP_10, rest),
            _ => return Err("not an HTTP/1.x status line"),
        };
        let (code, reason) = rest_of_line.split_at(rest_of_line.len().min(3));
        if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) || code[0] == b'0' {
            return Err("not a status code");
        }
        if !(reason.is_empty() || reason[0] == b' ')
            || reason
                .iter()
                .any(|&b| b != b'\t' && (b < b' ' || b == 0x7f))
        {
            return Err("a malformed reason phrase");
        }
        let status = u16::from(code[0] - b'0') * 100
            + u16::from(code[1] - b'0') * 10
            + u16::from(code[2] - b'0');
        let (lines, rest) = field_lines(rest)?.ok_or("cut short")?;
        let headers = map(&lines)?;
        if status == 101 {
            return Err("a 101 to a request that did not ask to switch");
        }
        if (100..200).contains(&status) {
            // Interim: skipped.
            at = rest;
            continue;
        }
        let connection = list(&headers, "connection");
        let has = |token: &[u8]| connection.iter().any(|t| t.eq_ignore_ascii_case(token));
        let mut persistent = !has(b"close") && (version == Version::HTTP_11 || has(b"keep-alive"));
        let te = list(&headers, "transfer-encoding");
        let (has_te, has_cl) = (
            headers.contains_key("transfer-encoding"),
            headers.contains_key("content-length"),
        );
        let length = content_length(&headers)?;
        let bodiless = head || status == 204 || status == 304;
        let (body, trailers, rest) = if bodiless {
            (Bytes::new(), Vec::new(), rest)
        } else if has_te {
            if version == Version::HTTP_10 {
                return Err("Transfer-Encoding in HTTP/1.0");
            }
            if has_cl {
                return Err("both Transfer-Encoding and Content-Length");
            }
            if te.len() != 1 || !te[0].eq_ignore_ascii_case(b"chunked") {
                return Err("a transfer coding other than chunked");
            }
            let ((body, trailers), rest) = chunked(rest)?.ok_or("cut short")?;
            (body, trailers, rest)
        } else if let Some(n) = length {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if rest.len() < n {
                return Err("cut short");
            }
            (Bytes::copy_from_slice(&rest[..n]), Vec::new(), &rest[n..])
        } else {
            persistent = false;
            (
                Bytes::copy_from_slice(rest),
                Vec::new(),
                &rest[rest.len()..],
            )
        };
        let fields = end_to_end(&headers, head || status == 304);
        return Ok(Read {
            answer: Answer {
                status,
                version,
                fields,
                body,
                trailers,
            },
            persistent,
            rest: Bytes::copy_from_slice(rest),
        });
    }
}

// === generation ===

/// A generated answer.
#[derive(Debug, Clone)]
struct Msg {
    http10: bool,
    status: u16,
    interim: bool,
    fields: Vec<(String, String)>,
    body: Framing,
    close: bool,
    /// Bytes after the answer: a second answer no request asked for.
    extra: bool,
}

const STATUSES: &[u16] = &[200, 201, 204, 206, 301, 304, 404, 500, 503];

/// Pieces of framing a mutation inserts.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b":",
    b"0",
    b";",
    b"\0",
    b"ff",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0",
    b"0\r\n\r\n",
];

fn msg() -> impl Strategy<Value = Msg> {
    (
        proptest::bool::weighted(0.1),
        proptest::sample::select(STATUSES),
        proptest::bool::weighted(0.1),
        proptest::collection::vec(field(), 0..5),
        framing(true),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.1),
    )
        .prop_map(
            |(http10, status, interim, fields, mut body, close, extra)| {
                if status == 204 || status == 304 {
                    body = Framing::None;
                }
                if http10 && matches!(body, Framing::Chunked { .. }) {
                    body = Framing::Eof(Vec::new());
                }
                Msg {
                    http10,
                    status,
                    interim,
                    fields,
                    body,
                    close,
                    extra,
                }
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        msg(),
        style(),
        fuzz::mutation(TOKENS),
        proptest::collection::vec(any::<Index>(), 0..6),
    )
        .prop_map(|(head, msg, mut style, mutation, cuts)| {
            let mut input = Vec::new();
            render(&msg, head, &mut style, &mut input);
            let expected = model(&msg, head);
            let valid = matches!(mutation, Mutation::None);
            mutate(&mut input, &mutation);
            let cuts = cuts.iter().map(|at| at.index(input.len() + 1)).collect();
            Case {
                head,
                input: Bytes::from(input),
                cuts,
                expected: valid.then_some(expected),
            }
        })
}

fn render(msg: &Msg, head: bool, style: &mut Style, out: &mut Vec<u8>) {
    let version = if msg.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    if msg.interim {
        out.extend_from_slice(format!("{version} 103 Early Hints").as_bytes());
        style.end(out);
        style.field(out, "link", "</s.css>; rel=preload");
        style.end(out);
    }
    out.extend_from_slice(format!("{version} {} Status", msg.status).as_bytes());
    style.end(out);
    for (name, value) in &msg.fields {
        style.field(out, name, value);
    }
    style.framing_field(out, &msg.body);
    if msg.close {
        style.field(out, "connection", "close");
    }
    style.end(out);
    if !head {
        style.body(out, &msg.body);
    }
    // Not after an answer delimited by the end of the connection: it would be its body.
    let to_eof = match msg.body {
        Framing::Eof(_) => true,
        Framing::None => !head && msg.status != 204 && msg.status != 304,
        _ => false,
    };
    if msg.extra && !to_eof {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    }
}

fn model(msg: &Msg, head: bool) -> Answer {
    let mut fields = HeaderMap::new();
    for (name, value) in &msg.fields {
        add(&mut fields, name, value);
    }
    if head {
        // Content-Length stays where it describes a body not sent.
        if let Framing::Length(body) = &msg.body {
            add(&mut fields, "content-length", &body.len().to_string());
        }
    }
    let (body, trailers) = if head {
        (Bytes::new(), Vec::new())
    } else {
        msg.body.model()
    };
    Answer {
        status: msg.status,
        version: if msg.http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        },
        fields: self::fields(&fields),
        body,
        trailers,
    }
}

/// Answers that desync a connection pool or split a response.
const CORPUS: &[&[u8]] = &[
    // A trailer section ending in a bare LF, then a second answer.
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: 1\n\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    // Both framings, and obfuscated ones.
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
    // More than the Content-Length says: the rest is no answer's.
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabHTTP/1.1 200 OK\r\n\r\n",
    // Interim answers, and a 101 nobody asked for.
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    // Bodies on bodiless statuses.
    b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    // Line ends and field syntax.
    b"HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
];
