//! The HTTP/1.1 connection over loopback, byte for byte.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_core::Body;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::FREED;
use crate::Server;

/// What the test service does with a request's body.
#[derive(Clone, Copy)]
enum Reads {
    /// Never reads it.
    Nothing,
    /// Reads it to the end and answers with it.
    Echo,
    /// Never reads it, and answers after a while.
    Slowly(Duration),
}

/// A server answering `ok` (or the request body) to everything, recording each request
/// as `METHOD PATH`.
struct Harness {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Harness {
    async fn start(reads: Reads, tune: impl FnOnce(Server) -> Server) -> Self {
        FREED.with(|n| n.set(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = tune(Server::from_listener(listener));
        let addr = server.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let svc = tower::service_fn(move |req: Request<Body>| {
            log.lock()
                .unwrap()
                .push(format!("{} {}", req.method(), req.uri().path()));
            async move {
                let body = match reads {
                    Reads::Nothing => Body::full("ok"),
                    Reads::Slowly(wait) => {
                        tokio::time::sleep(wait).await;
                        Body::full("ok")
                    }
                    Reads::Echo => match req.into_body().collect_bytes().await {
                        Ok(bytes) => Body::from(bytes),
                        Err(_) => {
                            let mut res = Response::new(Body::full("bad"));
                            *res.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok::<_, Infallible>(res);
                        }
                    },
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve_with_shutdown(svc, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            seen,
            stop: Some(stop),
            task,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one response with a `content-length` body: (head, body).
async fn response(stream: &mut TcpStream) -> (String, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.parse::<usize>().unwrap());
            if got.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&got[end + 4..end + 4 + len]).into_owned();
                assert_eq!(
                    got.len(),
                    end + 4 + len,
                    "one response, then nothing: {head}"
                );
                return (head, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

fn status_line(head: &str) -> &str {
    head.lines().next().unwrap_or_default()
}

async fn get(stream: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let (head, _) = response(stream).await;
    status_line(&head).to_owned()
}

/// Everything the server sends until it closes (bounded: 5 s).
async fn rest(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server never closed: {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn an_idle_connection_holds_no_buffer_and_serves_the_next_request() {
    let h = Harness::start(Reads::Nothing, |s| s).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(get(&mut c, "/a").await, "HTTP/1.1 200 OK");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        FREED.with(std::cell::Cell::get) >= 1,
        "the read buffer was freed"
    );
    assert_eq!(get(&mut c, "/b").await, "HTTP/1.1 200 OK");
    assert_eq!(h.seen(), ["GET /a", "GET /b"]);
}

#[tokio::test]
async fn a_head_in_single_bytes_and_pipelined_requests_are_served_in_order() {
    let h = Harness::start(Reads::Echo, |s| s).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    for byte in b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n" {
        c.write_all(&[*byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        response(&mut c).await.0.lines().next(),
        Some("HTTP/1.1 200 OK")
    );
    c.write_all(
        b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nbbb\
          POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\nc\r\n0\r\n\r\n\
          GET /d HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let all = rest(&mut c).await;
    let bodies: Vec<_> = all.split("HTTP/1.1 200 OK").skip(1).collect();
    assert_eq!(bodies.len(), 3, "{all}");
    assert!(bodies[0].ends_with("\r\n\r\nbbb"), "{all}");
    assert!(bodies[1].ends_with("\r\n\r\nc"), "{all}");
    assert!(bodies[2].contains("connection: close"), "{all}");
    assert_eq!(h.seen(), ["GET /a", "POST /b", "POST /c", "GET /d"]);
}

/// A body the service never read must never be parsed as a request (request smuggling).
#[tokio::test]
async fn an_unread_request_body_is_never_parsed_as_a_request() {
    let smuggled: &[u8] = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
    for together in [true, false] {
        let h = Harness::start(Reads::Nothing, |s| s).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            smuggled.len()
        );
        if together {
            // The body arrived with the head: skipped, and the connection reads on.
            c.write_all(&[head.as_bytes(), smuggled].concat())
                .await
                .unwrap();
            assert_eq!(status_line(&response(&mut c).await.0), "HTTP/1.1 200 OK");
            assert_eq!(get(&mut c, "/next").await, "HTTP/1.1 200 OK");
        } else {
            // The body comes later: the connection cannot skip what it has not read, so it
            // closes after the answer.
            c.write_all(head.as_bytes()).await.unwrap();
            let (head, _) = response(&mut c).await;
            assert!(head.contains("connection: close"), "{head}");
            let _ = c.write_all(smuggled).await;
            let _ = rest(&mut c).await;
        }
        assert!(
            !h.seen().iter().any(|p| p.contains("smuggled")),
            "{:?}",
            h.seen()
        );
    }
}

#[tokio::test]
async fn a_slow_head_is_cut_at_the_header_read_timeout() {
    let h = Harness::start(Reads::Nothing, |s| {
        s.header_read_timeout(Some(Duration::from_millis(300)))
    })
    .await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(get(&mut c, "/a").await, "HTTP/1.1 200 OK");
    let idle = tokio::time::Instant::now();
    c.write_all(b"GET /b HTTP/1.1\r\n").await.unwrap();
    assert_eq!(rest(&mut c).await, "", "cut without an answer");
    assert!(idle.elapsed() >= Duration::from_millis(200));
    assert_eq!(h.seen(), ["GET /a"]);
}

#[tokio::test]
async fn protocol_errors_get_their_status_and_close() {
    let long = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70 * 1024));
    for (raw, status) in [
        ("GET / HTTP/2.0\r\nhost: x\r\n\r\n".to_owned(), "505"),
        (
            "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n".to_owned(),
            "501",
        ),
        (
            "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\nabc".to_owned(),
            "400",
        ),
        ("GET / HTTP/1.1\r\nbad header\r\n\r\n".to_owned(), "400"),
        ("G@T / HTTP/1.1\r\nhost: x\r\n\r\n".to_owned(), "400"),
        (long, "414"),
    ] {
        let h = Harness::start(Reads::Nothing, |s| s).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        // A large request may be cut short by the close: that is fine.
        let _ = c.write_all(raw.as_bytes()).await;
        let got = rest(&mut c).await;
        assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{status}: {got}");
        assert!(got.contains("connection: close"), "{got}");
        assert!(got.contains("application/problem+json"), "{got}");
        assert!(h.seen().is_empty(), "{:?}", h.seen());
    }
}

#[tokio::test]
async fn a_broken_chunked_body_fails_its_reader_and_closes() {
    let h = Harness::start(Reads::Echo, |s| s).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    c.write_all(
        b"POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let got = rest(&mut c).await;
    assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
    assert_eq!(h.seen(), ["POST /a"]);
}

#[tokio::test]
async fn an_http10_client_gets_keep_alive_only_when_it_asks() {
    let h = Harness::start(Reads::Nothing, |s| s).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    c.write_all(b"GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = response(&mut c).await;
    assert!(head.contains("connection: keep-alive"), "{head}");
    assert_eq!(body, "ok");
    c.write_all(b"GET /b HTTP/1.0\r\n\r\n").await.unwrap();
    let got = rest(&mut c).await;
    assert!(
        got.contains("connection: close") && got.ends_with("ok"),
        "{got}"
    );
}

#[tokio::test]
async fn an_expecting_client_gets_100_continue_when_the_body_is_read() {
    let h = Harness::start(Reads::Echo, |s| s).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    c.write_all(b"PUT /a HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"data").await.unwrap();
    let (head, body) = response(&mut c).await;
    assert_eq!(
        (status_line(&head), body.as_str()),
        ("HTTP/1.1 200 OK", "data")
    );
}

#[tokio::test]
async fn a_request_in_flight_is_not_cut_by_the_idle_limit() {
    // The idle limit (the smaller of keep-alive and header-read, 200 ms) counts only while
    // no request is in flight: a response that takes longer arrives, and the connection
    // serves the next request.
    let h = Harness::start(Reads::Slowly(Duration::from_millis(600)), |s| {
        s.keep_alive_timeout(Some(Duration::from_millis(200)))
    })
    .await;
    let mut conn = TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(get(&mut conn, "/slow").await, "HTTP/1.1 200 OK");
    assert_eq!(get(&mut conn, "/again").await, "HTTP/1.1 200 OK");
    // Once idle, it is cut at the limit.
    assert_eq!(rest(&mut conn).await, "");
    assert_eq!(h.seen(), ["GET /slow", "GET /again"]);
}

#[tokio::test]
async fn an_idle_connection_is_closed_when_the_server_drains() {
    let mut h = Harness::start(Reads::Nothing, |s| s).await;
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    assert_eq!(get(&mut c, "/a").await, "HTTP/1.1 200 OK");
    let _ = h.stop.take().map(|stop| stop.send(()));
    assert_eq!(rest(&mut c).await, "");
    let done = tokio::time::timeout(Duration::from_secs(5), &mut h.task).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "the server stops at once");
}

/// Finding 1 of the hardening review: a trailer section that ends in a bare LF used to
/// swallow the request pipelined behind it (the section was cut at the first CRLF CRLF).
/// Every byte belongs to exactly one message: both requests are answered and seen.
#[tokio::test]
async fn a_trailer_section_ending_in_bare_lf_never_swallows_the_next_request() {
    for trailers in ["X: 1\n\n", "\n", "X: y\n\r\n", "X: y\r\n\n"] {
        let h = Harness::start(Reads::Echo, |s| s).await;
        let mut c = TcpStream::connect(h.addr).await.unwrap();
        let req = format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             3\r\nabc\r\n0\r\n{trailers}\
             GET /next HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let all = rest(&mut c).await;
        let answers: Vec<_> = all.split("HTTP/1.1 200 OK").skip(1).collect();
        assert_eq!(answers.len(), 2, "{trailers:?}: {all}");
        assert!(answers[0].ends_with("\r\n\r\nabc"), "{trailers:?}: {all}");
        assert_eq!(h.seen(), ["POST /a", "GET /next"], "{trailers:?}");
    }
}

#[test]
fn persistence_needs_every_party_to_agree() {
    use super::{Current, Inbound, Outcome, persists};
    use crate::h1::decode::Decoder;
    use bytes::BytesMut;
    use http::Version;

    let served = Current {
        version: Version::HTTP_11,
        head: false,
        trailers: false,
        persistent: true,
        outcome: Outcome::Served,
        response_persistent: true,
    };
    let read = BytesMut::from(&b"abc"[..]);
    let body = |len| Inbound::Feeding(super::incoming::channel(Decoder::Length(len), false).1);
    assert!(persists(&served, &Inbound::Done, &read, false));
    // A body still to come may never be read; one all here can be skipped.
    assert!(persists(&served, &body(3), &read, false));
    assert!(!persists(&served, &body(4), &read, false));
    assert!(!persists(&served, &Inbound::Broken, &read, false));
    assert!(!persists(&served, &Inbound::Done, &read, true), "draining");
    for current in [
        Current {
            persistent: false,
            ..served
        },
        Current {
            response_persistent: false,
            ..served
        },
        Current {
            outcome: Outcome::Refused,
            ..served
        },
        Current {
            outcome: Outcome::Failed,
            ..served
        },
    ] {
        assert!(
            !persists(&current, &Inbound::Done, &read, false),
            "{current:?}"
        );
    }
}
