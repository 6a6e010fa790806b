use super::*;
use crate::h1::fields::Field;

fn parse(raw: &str) -> Result<Option<ResponseHead>, InvalidHead> {
    parse_response(&mut BytesMut::from(raw.as_bytes()), |_, _| false)
}

fn body(raw: &str, method: Method) -> Result<Option<Decoder>, InvalidHead> {
    parse(raw)
        .map(|head| head.expect("a complete head"))
        .and_then(|h| h.body(&method))
}

fn request(raw: &str) -> Result<Option<RequestHead>, Refused> {
    parse_request(&mut BytesMut::from(raw.as_bytes()), MAX_HEADERS, 64 * 1024)
}

fn request_body(raw: &str) -> Result<Option<Decoder>, Refused> {
    request(raw).and_then(|head| head.expect("a complete head").body())
}

#[test]
fn a_response_head_is_parsed_and_taken_off_the_buffer() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\nabc"[..],
    );
    let head = parse_response(&mut buf, |_, _| false).unwrap().unwrap();
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
    big.push_str(&"a".repeat(MAX_RESPONSE_HEAD));
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
fn response_framing_follows_rfc_9112() {
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
fn ambiguous_response_framing_is_refused() {
    for raw in [
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
        "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
    ] {
        assert!(body(raw, Method::GET).is_err(), "{raw}");
    }
}

/// Found by the `client_h1` fuzz target: an answer to HEAD (or a 204, 304) was not
/// checked, so its invalid `Content-Length` was forwarded (RFC 9112 §6.3: a proxy answers
/// 502 instead).
#[test]
fn an_invalid_content_length_is_refused_on_bodiless_answers_too() {
    for (raw, method) in [
        (
            "HTTP/1.1 200 OK\r\ncontent-length: t-length:10\r\n\r\n",
            Method::HEAD,
        ),
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            Method::HEAD,
        ),
        (
            "HTTP/1.1 304 Not Modified\r\ncontent-length: -1\r\n\r\n",
            Method::GET,
        ),
        (
            "HTTP/1.1 204 No Content\r\ncontent-length: x\r\n\r\n",
            Method::GET,
        ),
    ] {
        assert!(body(raw, method).is_err(), "{raw}");
    }
}

#[test]
fn skipped_fields_still_say_what_they_mean() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok"[..],
    );
    let head = parse_response(&mut buf, |field, _| field != Field::Other)
        .unwrap()
        .unwrap();
    assert_eq!(head.headers.len(), 1);
    assert!(!head.meta.persistent(head.version));
    assert!(matches!(
        head.body(&Method::GET),
        Ok(Some(Decoder::Length(2)))
    ));
    assert!(!head.meta.nominates);
    let head = parse("HTTP/1.1 200 OK\r\nConnection: x-secret\r\n\r\n")
        .unwrap()
        .unwrap();
    assert!(head.meta.nominates);
}

#[test]
fn field_names_are_told_apart_in_any_case() {
    for (name, field) in [
        (&b"Content-Length"[..], Field::ContentLength),
        (b"TRANSFER-ENCODING", Field::TransferEncoding),
        (b"connection", Field::Connection),
        (b"Keep-Alive", Field::KeepAlive),
        (b"TE", Field::Te),
        (b"Upgrade", Field::Upgrade),
        (b"Proxy-Authorization", Field::ProxyAuthorization),
        (b"Date", Field::Other),
        (b"content-lengths", Field::Other),
        (b"x-te", Field::Other),
    ] {
        assert_eq!(Field::of(name), field, "{}", String::from_utf8_lossy(name));
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
    // HTTP/1.1 is persistent by default, whatever else `Connection` lists.
    let h = head("HTTP/1.1 200 OK\r\n\r\n");
    assert!(h.meta.persistent(h.version));
    let h = head("HTTP/1.1 200 OK\r\nConnection: x-a, upgrade\r\n\r\n");
    assert!(h.meta.persistent(h.version));
    let h = head("HTTP/1.1 200 OK\r\nConnection: x-close\r\n\r\n");
    assert!(h.meta.persistent(h.version));
}

#[test]
fn obs_fold_and_bad_fields_are_refused() {
    assert!(parse("HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n").is_err());
    assert!(parse("HTTP/1.1 200 OK\r\nx y: a\r\n\r\n").is_err());
    assert!(parse("HTTP/1.1 2000 OK\r\n\r\n").is_err());
    assert!(request("GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n").is_err());
    assert!(request("GET / HTTP/1.1\r\nx : a\r\n\r\n").is_err());
}

#[test]
fn a_request_head_is_parsed_and_taken_off_the_buffer() {
    let mut buf = BytesMut::from(
        &b"POST /a/b?c=d HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhiGET"[..],
    );
    let head = parse_request(&mut buf, MAX_HEADERS, 8192).unwrap().unwrap();
    assert_eq!(head.method, Method::POST);
    assert_eq!(head.uri, "/a/b?c=d");
    assert_eq!(head.version, Version::HTTP_11);
    assert_eq!(head.headers["host"], "gw");
    assert!(head.meta.expect_continue);
    assert!(matches!(head.body(), Ok(Some(Decoder::Length(2)))));
    assert_eq!(&buf[..], b"hiGET");
}

#[test]
fn request_limits_answer_with_their_status() {
    let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
    assert_eq!(
        parse_request(&mut BytesMut::from(long_target.as_str()), MAX_HEADERS, 8192).unwrap_err(),
        Refused::UriTooLong
    );
    let big_field = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(
        parse_request(&mut BytesMut::from(big_field.as_str()), MAX_HEADERS, 8192).unwrap_err(),
        Refused::TooLarge
    );
    let many: String = (0..21).map(|i| format!("x-{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
    assert_eq!(
        parse_request(&mut BytesMut::from(many.as_str()), 20, 8192).unwrap_err(),
        Refused::TooLarge
    );
    assert_eq!(
        request("GET / HTTP/2.0\r\n\r\n").unwrap_err(),
        Refused::Version
    );
    assert!(request("GET / HTTP/1.1\r\nHost: a").unwrap().is_none());
}

#[test]
fn request_framing_refuses_every_ambiguity() {
    assert!(matches!(request_body("GET / HTTP/1.1\r\n\r\n"), Ok(None)));
    assert!(matches!(
        request_body("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"),
        Ok(None)
    ));
    assert!(matches!(
        request_body("POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n"),
        Ok(Some(Decoder::Chunked(_)))
    ));
    for raw in [
        "POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        "POST / HTTP/1.1\r\ncontent-length: 5, 6\r\n\r\n",
        "POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
        "POST / HTTP/1.1\r\ncontent-length: 0x5\r\n\r\n",
        "POST / HTTP/1.1\r\ntransfer-encoding: chunked, identity\r\n\r\n",
        "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
    ] {
        assert!(
            matches!(request_body(raw), Err(Refused::Malformed(_))),
            "{raw}"
        );
    }
    assert_eq!(
        request_body("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n").unwrap_err(),
        Refused::Coding
    );
}

#[test]
fn a_request_head_carries_its_framing_and_never_the_callers() {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("up:80"));
    headers.insert("content-length", HeaderValue::from_static("999"));
    headers.insert("transfer-encoding", HeaderValue::from_static("gzip"));
    let extra = (
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_static("10.0.0.1"),
    );
    let mut out = Vec::new();
    write_request(
        &mut out,
        &Method::POST,
        "/a?b",
        None,
        &headers,
        [&extra].into_iter(),
        BodyLength::Known(3),
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "POST /a?b HTTP/1.1\r\nhost: up:80\r\nx-forwarded-for: 10.0.0.1\r\ncontent-length: 3\r\n\r\n"
    );
    // The endpoint's host replaces the request's own.
    let mut out = Vec::new();
    let host = HeaderValue::from_static("up:81");
    write_request(
        &mut out,
        &Method::PUT,
        "/",
        Some(&host),
        &headers,
        std::iter::empty(),
        BodyLength::Chunked,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "PUT / HTTP/1.1\r\nhost: up:81\r\ntransfer-encoding: chunked\r\n\r\n"
    );
}

#[test]
fn a_response_head_is_written_with_its_framing() {
    let mut headers = HeaderMap::new();
    headers.insert("content-length", HeaderValue::from_static("10"));
    headers.insert("x-a", HeaderValue::from_static("1"));
    let mut out = Vec::new();
    write_response(
        &mut out,
        StatusCode::OK,
        &headers,
        false,
        BodyLength::Chunked,
        Persist::Close,
        Some(b"Fri, 04 Dec 2026 15:00:00 GMT"),
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: Fri, 04 Dec 2026 15:00:00 GMT\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let mut out = Vec::new();
    write_response(
        &mut out,
        StatusCode::NOT_MODIFIED,
        &headers,
        true,
        BodyLength::None,
        Persist::KeepAlive,
        None,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\nx-a: 1\r\nconnection: keep-alive\r\n\r\n"
    );
}
