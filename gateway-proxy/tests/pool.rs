//! The upstream connection pool, against real upstreams on loopback.
#![expect(
    clippy::unwrap_used,
    reason = "the helpers panic on failure, like the tests"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gateway_core::Body;
use gateway_core::test_util::{self, TestUpstream};
use gateway_proxy::{HttpClient, ReverseProxy, Upstream};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt;

fn proxy(url: &str, client: HttpClient) -> ReverseProxy {
    ReverseProxy::builder(Upstream::single(url).unwrap())
        .client(client)
        .build()
        .unwrap()
}

/// One GET through `proxy`, read to the end: (status, body).
async fn get(proxy: &ReverseProxy) -> (StatusCode, String) {
    let req = Request::get("/").body(Body::empty()).unwrap();
    let res = proxy.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Reads one request head from `stream` (returns false on EOF first).
async fn read_head(stream: &mut tokio::net::TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let upstream = TestUpstream::echo().await;
    let proxy = proxy(&upstream.url(), HttpClient::builder().build().unwrap());
    for _ in 0..100 {
        assert_eq!(get(&proxy).await.0, StatusCode::OK);
    }
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn concurrent_requests_open_at_most_one_connection_each() {
    let upstream = TestUpstream::echo().await;
    let proxy = proxy(&upstream.url(), HttpClient::builder().build().unwrap());
    for _ in 0..20 {
        let round: Vec<_> = (0..8)
            .map(|_| {
                let proxy = proxy.clone();
                tokio::spawn(async move { get(&proxy).await.0 })
            })
            .collect();
        for task in round {
            assert_eq!(task.await.unwrap(), StatusCode::OK);
        }
    }
    let opened = upstream.connections();
    assert!(
        (1..=8).contains(&opened),
        "{opened} connections for 160 requests at concurrency 8"
    );
}

#[tokio::test]
async fn http2_requests_share_one_connection() {
    let upstream = TestUpstream::echo().await;
    let client = HttpClient::builder().http2_only(true).build().unwrap();
    let proxy = proxy(&upstream.url(), client);
    let all: Vec<_> = (0..20)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move { get(&proxy).await.0 })
        })
        .collect();
    for task in all {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(upstream.last_request().version, http::Version::HTTP_2);
    assert_eq!(upstream.connections(), 1);
}

/// An upstream that answers one request per connection and then closes it without saying
/// so (no `Connection: close`), like a server whose keep-alive timeout just ran out: the
/// closed connection must not be handed the next request.
#[tokio::test]
async fn a_connection_the_upstream_closed_is_not_reused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_head(&mut stream).await {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let proxy = proxy(
        &format!("http://{addr}"),
        HttpClient::builder().build().unwrap(),
    );
    for i in 0..50 {
        assert_eq!(
            get(&proxy).await,
            (StatusCode::OK, "ok".to_owned()),
            "request {i}"
        );
        // Give the close time to arrive, as it would between real requests.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 50);
    server.abort();
}

/// An upstream on its own thread (so it can act while the test's runtime is blocked) that
/// answers one request per connection and closes it 5 ms later without saying so. It
/// stops after accepting `limit` connections and one more. Counts the connections it
/// accepted and those it closed.
struct ClosingUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

fn closing_upstream(limit: usize) -> ClosingUpstream {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (counter, closes) = (Arc::clone(&accepted), Arc::clone(&closed));
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            while let Ok((mut stream, _)) = listener.accept().await {
                if counter.fetch_add(1, Ordering::SeqCst) == limit {
                    return;
                }
                if read_head(&mut stream).await {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(stream);
                closes.fetch_add(1, Ordering::SeqCst);
            }
        });
    });
    ClosingUpstream {
        addr,
        accepted,
        closed,
        thread,
    }
}

/// Blocks the test's runtime (no I/O is processed) until the upstream has closed `n`
/// connections, so the pool cannot have noticed the last close when the next request takes
/// the connection.
fn let_the_upstream_close_unnoticed(up: &ClosingUpstream, n: usize) {
    let waited = tokio::time::Instant::now();
    while up.closed.load(Ordering::SeqCst) < n {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the upstream never closed"
        );
        std::thread::yield_now();
    }
}

/// The harder case: the upstream's close arrives while the pooled connection still looks
/// ready, so the request is written to a connection that is already closed and no answer
/// comes. A GET (idempotent, bodiless) on a connection that sat idle is sent again on a
/// new connection instead of failing with 502.
#[tokio::test(flavor = "current_thread")]
async fn an_idempotent_request_on_a_connection_closed_under_it_is_sent_again() {
    let up = closing_upstream(10);
    let proxy = proxy(
        &format!("http://{}", up.addr),
        HttpClient::builder().build().unwrap(),
    );
    for i in 0..10 {
        assert_eq!(
            get(&proxy).await,
            (StatusCode::OK, "ok".to_owned()),
            "request {i}"
        );
        let_the_upstream_close_unnoticed(&up, i + 1);
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 10);
    drop(tokio::net::TcpStream::connect(up.addr).await);
    up.thread.join().unwrap();
}

/// A POST with a body in the same spot is not sent twice: the client gets the 502.
#[tokio::test(flavor = "current_thread")]
async fn a_post_on_a_connection_closed_under_it_is_not_sent_again() {
    let up = closing_upstream(1);
    let proxy = proxy(
        &format!("http://{}", up.addr),
        HttpClient::builder().build().unwrap(),
    );
    assert_eq!(get(&proxy).await.0, StatusCode::OK);
    let_the_upstream_close_unnoticed(&up, 1);
    let req = Request::post("/orders")
        .body(Body::from("{\"qty\":1}"))
        .unwrap();
    let err = proxy.clone().oneshot(req).await.unwrap_err();
    assert_eq!(
        gateway_core::Error::kind_of(err.as_ref()),
        gateway_core::ErrorKind::BadGateway
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    drop(tokio::net::TcpStream::connect(up.addr).await);
    up.thread.join().unwrap();
}

#[tokio::test]
async fn an_abandoned_response_body_does_not_return_its_connection() {
    let upstream = TestUpstream::streaming(10 << 20).await;
    let proxy = proxy(&upstream.url(), HttpClient::builder().build().unwrap());
    let req = Request::get("/").body(Body::empty()).unwrap();
    let res = proxy.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Read a little of the 10 MB and walk away.
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);

    let (status, body) = get(&proxy).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 10 << 20);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        assert!(read_head(&mut stream).await);
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let served = Instant::now();
        // The gateway closes first: EOF, with no further request.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        let _ = closed_tx.send((served.elapsed(), rest.len()));
    });
    let client = HttpClient::builder()
        .pool_idle_timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let proxy = proxy(&format!("http://{addr}"), client);
    assert_eq!(get(&proxy).await, (StatusCode::OK, "ok".to_owned()));

    let (idle, extra) = tokio::time::timeout(Duration::from_secs(10), closed_rx)
        .await
        .expect("the idle connection was never closed")
        .unwrap();
    assert_eq!(extra, 0);
    assert!(idle >= Duration::from_millis(250), "closed after {idle:?}");
    server.await.unwrap();
}

#[tokio::test]
async fn no_idle_connections_are_kept_when_the_limit_is_zero() {
    let upstream = TestUpstream::echo().await;
    let client = HttpClient::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let proxy = proxy(&upstream.url(), client);
    for _ in 0..5 {
        assert_eq!(get(&proxy).await.0, StatusCode::OK);
    }
    assert_eq!(upstream.connections(), 5);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_connect_error() {
    let addr = test_util::refused_addr().await;
    let proxy = proxy(
        &format!("http://{addr}"),
        HttpClient::builder().build().unwrap(),
    );
    let req = Request::get("/").body(Body::empty()).unwrap();
    let err = proxy.oneshot(req).await.unwrap_err();
    assert_eq!(
        gateway_core::Error::kind_of(err.as_ref()),
        gateway_core::ErrorKind::UpstreamConnect
    );
}

/// The client is a tower `Service` of its own (for layers that call upstreams, such as a
/// JWKS fetch): requests with absolute URIs go to their origin, on pooled connections; a
/// request without scheme and authority is refused without a connection.
#[tokio::test]
async fn the_client_serves_absolute_uris_on_pooled_connections() {
    let up = TestUpstream::echo().await;
    let client = HttpClient::builder().build().unwrap();
    for i in 0..3 {
        let req = Request::post(format!("{}/keys?n={i}", up.url()))
            .body(Body::from("x"))
            .unwrap();
        let res = client.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "x");
    }
    assert_eq!(up.requests().len(), 3);
    assert_eq!(up.requests()[2].uri, "/keys?n=2");
    assert_eq!(up.connections(), 1, "one pooled connection for the three");

    let relative = Request::get("/keys").body(Body::empty()).unwrap();
    let err = client.oneshot(relative).await.unwrap_err();
    assert_eq!(
        gateway_core::Error::kind_of(err.as_ref()),
        gateway_core::ErrorKind::Internal
    );
    assert_eq!(up.requests().len(), 3);
}
