//! HTTP/1.1 upstreams that misbehave, byte for byte: the gateway hands on only answers it
//! could read one way, and never reuses a connection that carried anything doubtful.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

mod support;

use std::time::Duration;

use gateway_proxy::{ReverseProxy, Route, Router, Upstream};
use support::scripted::{Reply, Scripted, Then};
use support::{Gateway, body_of, raw, status};

async fn gateway(up: &Scripted) -> Gateway {
    let proxy = ReverseProxy::builder(Upstream::single(&up.url).unwrap())
        .response_header_timeout(Some(Duration::from_secs(2)))
        .build()
        .unwrap();
    Gateway::start(Router::new().route(Route::prefix("/"), proxy)).await
}

/// A GET on a connection of its own (`Connection: close`).
fn get(path: &str) -> String {
    support::get(path, "")
}

/// The body of a raw answer, with its chunked framing (if any) taken off.
fn content(res: &str) -> String {
    let (head, body) = res.split_once("\r\n\r\n").unwrap_or((res, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

#[tokio::test]
async fn ambiguous_or_malformed_answers_are_502_and_their_connection_is_dropped() {
    for bad in [
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 7\r\n\r\nok",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nx-folded: a\r\n b\r\ncontent-length: 2\r\n\r\nok",
        "HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        "NOT HTTP AT ALL\r\n\r\n",
    ] {
        // The bad answer leaves its connection open: the gateway must close it itself.
        let up = Scripted::start(move |n| {
            if n == 0 {
                Reply::keep(bad)
            } else {
                Reply::ok("fresh")
            }
        })
        .await;
        let gw = gateway(&up).await;
        let res = raw(gw.addr, &get("/")).await;
        // A bad head is a 502; a body found broken once the head went out cuts the response.
        assert!(
            status(&res) == 502 || !res.contains("\r\n0\r\n\r\n"),
            "{bad:?} -> {res}"
        );
        let res = raw(gw.addr, &get("/")).await;
        assert_eq!((status(&res), body_of(&res)), (200, "fresh"), "{bad:?}");
        assert_eq!(
            up.connections(),
            2,
            "{bad:?}: the doubtful connection was reused"
        );
    }
}

#[tokio::test]
async fn bytes_after_an_answer_are_never_served_as_the_next_one() {
    let smuggled = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled";
    for later in [false, true] {
        let up = Scripted::start(move |n| match n {
            0 if later => Reply {
                later: Some((Duration::from_millis(50), smuggled.into())),
                ..Reply::ok("first")
            },
            0 => Reply::keep(format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst{smuggled}"
            )),
            _ => Reply::ok("fresh"),
        })
        .await;
        let gw = gateway(&up).await;
        assert_eq!(body_of(&raw(gw.addr, &get("/")).await), "first");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let res = raw(gw.addr, &get("/")).await;
        assert_eq!(
            (status(&res), body_of(&res)),
            (200, "fresh"),
            "later: {later}"
        );
        assert_eq!(up.connections(), 2, "later: {later}");
    }
}

#[tokio::test]
async fn an_answer_in_single_bytes_with_chunks_and_trailers_arrives_whole() {
    let answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-up: 1\r\n\r\n\
                  5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n";
    let up = Scripted::start(move |_| Reply {
        piece: 1,
        ..Reply::keep(answer)
    })
    .await;
    let gw = gateway(&up).await;
    for _ in 0..2 {
        let res = raw(gw.addr, &get("/")).await;
        assert_eq!(status(&res), 200, "{res}");
        assert!(res.to_ascii_lowercase().contains("x-up: 1"), "{res}");
        assert_eq!(content(&res), "hello world", "{res}");
    }
    assert_eq!(
        up.connections(),
        1,
        "a cleanly read answer keeps its connection"
    );
}

#[tokio::test]
async fn informational_answers_are_skipped() {
    let up = Scripted::start(|_| {
        Reply::keep(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
    })
    .await;
    let gw = gateway(&up).await;
    let res = raw(gw.addr, &get("/")).await;
    assert_eq!(
        gateway_core::test_util::raw::statuses(res.as_bytes()),
        [200],
        "{res}"
    );
    assert_eq!(body_of(&res), "ok");
}

#[tokio::test]
async fn answers_that_end_their_connection_are_not_pooled() {
    let up = Scripted::start(|n| match n {
        0 => Reply::close("HTTP/1.1 200 OK\r\n\r\nread until close"),
        1 => Reply::keep("HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\nold1"),
        2 => Reply::keep("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nclose"),
        _ => Reply::ok("kept"),
    })
    .await;
    let gw = gateway(&up).await;
    for want in ["read until close", "old1", "close", "kept", "kept"] {
        assert_eq!(content(&raw(gw.addr, &get("/")).await), want);
    }
    // One connection each for the first three, then one for the last two.
    assert_eq!(up.connections(), 4);
}

#[tokio::test]
async fn an_oversized_answer_head_is_a_502() {
    let big = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let up = Scripted::start(move |_| Reply::keep(big.clone())).await;
    let gw = gateway(&up).await;
    assert_eq!(status(&raw(gw.addr, &get("/")).await), 502);
}

#[tokio::test]
async fn an_unsolicited_switch_of_protocols_is_a_502() {
    let up = Scripted::start(|_| {
        Reply::keep("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n")
    })
    .await;
    let gw = gateway(&up).await;
    assert_eq!(status(&raw(gw.addr, &get("/")).await), 502);
}

#[tokio::test]
async fn a_head_answer_keeps_its_length_and_has_no_body() {
    let up =
        Scripted::start(|_| Reply::keep("HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")).await;
    let gw = gateway(&up).await;
    for _ in 0..2 {
        let res = raw(
            gw.addr,
            "HEAD / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&res), 200, "{res}");
        assert!(
            res.to_ascii_lowercase().contains("content-length: 1000"),
            "{res}"
        );
        assert_eq!(body_of(&res), "");
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client() {
    let up = Scripted::start(|_| Reply {
        then: Then::AnswerEarly,
        ..Reply::keep(
            "HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbig",
        )
    })
    .await;
    let gw = gateway(&up).await;
    let body = "x".repeat(1024 * 1024);
    let req = format!(
        "POST / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let res = raw(gw.addr, &req).await;
    assert_eq!(
        (status(&res), body_of(&res)),
        (413, "big"),
        "{}",
        &res[..res.len().min(300)]
    );
}

#[tokio::test]
async fn request_bodies_keep_their_length_or_are_chunked() {
    let up = Scripted::start(|_| Reply::ok("ok")).await;
    let gw = gateway(&up).await;
    let sized =
        "POST / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(status(&raw(gw.addr, sized).await), 200);
    let chunked = "POST / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
                   3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    assert_eq!(status(&raw(gw.addr, chunked).await), 200);
    let empty = "POST / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(status(&raw(gw.addr, empty).await), 200);
    let seen = up.requests();
    assert!(
        seen[0].contains("content-length: 5\r\n") && seen[0].ends_with("\r\n\r\nhello"),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].contains("transfer-encoding: chunked\r\n"),
        "{}",
        seen[1]
    );
    assert!(
        seen[1].ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
        "{:?}",
        seen[1]
    );
    assert!(seen[2].contains("content-length: 0\r\n"), "{}", seen[2]);
    assert!(
        seen.iter()
            .all(|r| r.starts_with("POST / HTTP/1.1\r\nhost: 127.0.0.1:")),
        "{seen:?}"
    );
}

/// Finding 1 on the client side: an answer whose trailer section ends in a bare LF ends
/// there; what follows it is not part of it and is never served as the next answer.
#[tokio::test]
async fn an_answer_whose_trailers_end_in_bare_lf_ends_there() {
    // Ends in CRLF CRLF: cut there, the section would take these bytes with it unparsed,
    // and the connection, its buffer empty, would be reused.
    let smuggled = "HTTP/1.1 200 OK\r\nx-smuggled: 1\r\n\r\n";
    for trailers in ["x-sum: 1\n\n", "\n"] {
        let up = Scripted::start(move |n| match n {
            0 => Reply::keep(format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                 5\r\nfirst\r\n0\r\n{trailers}{smuggled}"
            )),
            _ => Reply::ok("fresh"),
        })
        .await;
        let gw = gateway(&up).await;
        let res = raw(gw.addr, &get("/")).await;
        assert_eq!(
            (status(&res), content(&res)),
            (200, "first".into()),
            "{res}"
        );
        let res = raw(gw.addr, &get("/")).await;
        assert_eq!(
            (status(&res), body_of(&res)),
            (200, "fresh"),
            "{trailers:?}"
        );
        assert_eq!(up.connections(), 2, "{trailers:?}");
    }
}
