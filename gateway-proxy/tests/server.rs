//! The server runner: TLS termination with ALPN, HTTPS upstreams with a private CA, the
//! keep-alive idle limit and the connection cap.
#![expect(
    clippy::unwrap_used,
    reason = "the PKI set-up helper panics on failure, like the tests"
)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gateway_core::Body;
use gateway_core::client_ip::TrustedProxies;
use gateway_core::test_util::{RepeatBody, TestUpstream};
use gateway_proxy::server::TlsConfig;
use gateway_proxy::{HttpClient, ReverseProxy, Route, Router, Upstream};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use support::{Gateway, eventually, get, proxy_to, raw, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Pki {
    cert_pem: String,
    dir: std::path::PathBuf,
}

impl Pki {
    fn localhost(name: &str) -> Self {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = std::env::temp_dir().join(format!("gateway-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), key.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
        Self {
            cert_pem: key.cert.pem(),
            dir,
        }
    }

    fn tls(&self) -> TlsConfig {
        TlsConfig::from_pem_files(self.dir.join("cert.pem"), self.dir.join("key.pem")).unwrap()
    }

    fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        #[expect(
            deprecated,
            reason = "the provider the gateway uses: see its crypto module"
        )]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn tls_termination_negotiates_h2_and_http11_by_alpn() {
    let pki = Pki::localhost("terminate");
    let up = TestUpstream::echo().await;
    let tls = pki.tls();
    let gw = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&up)),
        TrustedProxies::none(),
        |s| s.tls(tls),
    )
    .await;
    let url = format!("https://localhost:{}/tls", gw.addr.port());

    for offer_h2 in [true, false] {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(pki.client_config())
            .https_only();
        // ALPN offers h2 + http/1.1, or http/1.1 alone.
        let (https, want) = if offer_h2 {
            (https.enable_all_versions().build(), Version::HTTP_2)
        } else {
            (https.enable_http1().build(), Version::HTTP_11)
        };
        let client = Client::builder(TokioExecutor::new()).build::<_, Body>(https);
        let res = client
            .request(Request::get(&url).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.version(), want);
        res.into_body().collect().await.unwrap();
        assert_eq!(up.last_request().header("x-forwarded-proto"), Some("https"));
    }
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_ca() {
    // The "upstream" is a TLS gateway in front of an echo server.
    let pki = Pki::localhost("upstream");
    let echo = TestUpstream::echo().await;
    let tls = pki.tls();
    let tls_upstream = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&echo)),
        TrustedProxies::none(),
        |s| s.tls(tls),
    )
    .await;
    let target = format!("https://localhost:{}", tls_upstream.addr.port());

    let trusting = HttpClient::builder()
        .webpki_roots(false)
        .add_root_pem(pki.cert_pem.as_bytes())
        .unwrap();
    let good =
        ReverseProxy::builder(Upstream::single(&target).unwrap()).client(trusting.build().unwrap());
    // Default roots only: the private CA is unknown, so the handshake must fail.
    let bad = ReverseProxy::new(Upstream::single(&target).unwrap());

    let app = Router::new()
        .route(Route::prefix("/good"), good.build().unwrap())
        .route(Route::prefix("/bad"), bad);
    let gw = Gateway::start(app).await;

    let res = raw(gw.addr, &get("/good", "")).await;
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(echo.last_request().uri, "/good");

    let res = raw(gw.addr, &get("/bad", "")).await;
    assert_eq!(status(&res), 502, "{res}");
    assert_eq!(echo.requests().len(), 1);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&up)),
        TrustedProxies::none(),
        |s| {
            s.keep_alive_timeout(Some(Duration::from_millis(300)))
                .header_read_timeout(Some(Duration::from_secs(30)))
        },
    )
    .await;
    let mut conn = TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = support::within("a response", conn.read(&mut buf))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("an idle keep-alive connection must be closed by the idle limit");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "closed too early"
    );
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&up)),
        TrustedProxies::none(),
        |s| s.max_connections(1),
    )
    .await;
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    first
        .write_all(b"GET /1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    assert!(
        support::within("a response", first.read(&mut buf))
            .await
            .unwrap()
            > 0
    );

    let second = tokio::spawn({
        let addr = gw.addr;
        async move { raw(addr, &get("/2", "")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second connection must wait while the first holds the slot"
    );
    assert_eq!(up.requests().len(), 1);
    drop(first);
    let res = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("a freed slot must let the waiting connection in")
        .unwrap();
    assert_eq!(status(&res), 200, "{res}");
}

/// The server tells h2c prior knowledge (`PRI * HTTP/2.0…`) from HTTP/1.1 by the first three
/// bytes: methods that start like it, and a first byte sent alone, are still HTTP/1.1.
#[tokio::test]
async fn http1_methods_that_start_like_the_h2_preface_stay_http1() {
    let upstream = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&upstream))).await;

    let res = raw(
        gw.addr,
        "PROPFIND /dav HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(upstream.last_request().method.as_str(), "PROPFIND");

    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream
        .write_all(b"OST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut res = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut res))
        .await
        .expect("the response, then the close")
        .unwrap();
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(upstream.last_request().uri, "/p");
}

/// RFC 9113 §3.4: an invalid connection preface is a connection error of type
/// PROTOCOL_ERROR. A client that starts like the preface and is not it, or whose first line
/// is not an HTTP/1.1 request line (h2spec 3.5/2), gets the server's empty SETTINGS and a
/// GOAWAY with PROTOCOL_ERROR, then the connection closes; the upstream hears nothing.
#[tokio::test]
async fn an_invalid_preface_gets_goaway_protocol_error() {
    let upstream = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&upstream))).await;

    let cases: [&[&[u8]]; 5] = [
        // h2spec 3.5/2.
        &[b"INVALID CONNECTION PREFACE\r\n\r\n"],
        // The preface with its last byte wrong, at once and a byte at a time.
        &[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\rQ"],
        &[b"PRI * HTTP/2.0\r\n\r\nSM\r", b"\n", b"\r", b"Q"],
        // Starts with PRI, then is something else.
        &[b"PRI", b" / HTTP/1.1\r\nHost: a\r\n\r\n"],
        // Cut short.
        &[b"PRI * HTTP/2.0\r\n"],
    ];
    for (i, writes) in cases.iter().enumerate() {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        for write in *writes {
            stream.write_all(write).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if i == 4 {
            stream.shutdown().await.unwrap();
        }
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got))
            .await
            .expect("the connection closes")
            .unwrap();
        // SETTINGS: empty, type 0x4, stream 0.
        assert_eq!(
            got.get(..9),
            Some(&[0, 0, 0, 4, 0, 0, 0, 0, 0][..]),
            "case {i}: {got:?}"
        );
        // GOAWAY: type 0x7, stream 0, last stream 0, PROTOCOL_ERROR.
        let goaway = &got[9..];
        let len = usize::from(goaway[1]) << 8 | usize::from(goaway[2]);
        assert_eq!(
            goaway.len(),
            9 + len,
            "case {i}: one GOAWAY, then EOF: {got:?}"
        );
        assert_eq!(goaway[3], 0x7, "case {i}: {got:?}");
        assert_eq!(&goaway[5..9], &[0, 0, 0, 0], "case {i}");
        assert_eq!(&goaway[9..13], &[0, 0, 0, 0], "case {i}: last stream id");
        assert_eq!(&goaway[13..17], &[0, 0, 0, 1], "case {i}: PROTOCOL_ERROR");
    }
    assert!(upstream.requests().is_empty());

    // HTTP/1.1 requests for another version still get an HTTP/1.1 answer.
    let res = raw(gw.addr, "GET / HTTP/2.0\r\nHost: a\r\n\r\n").await;
    assert_eq!(status(&res), 505, "{res}");
    // A valid preface is HTTP/2, as always.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    support::within("the frames", stream.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(head[3], 0x4, "the server's SETTINGS");
    assert!(upstream.requests().is_empty());
}

/// A client that connects and says nothing is dropped at the header-read timeout.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_header_read_timeout() {
    let upstream = TestUpstream::echo().await;
    let server = gateway_proxy::Server::bind("127.0.0.1:0")
        .await
        .unwrap()
        .header_read_timeout(Some(Duration::from_millis(200)));
    let addr = server.local_addr().unwrap();
    let app = Router::new().route(Route::prefix("/"), proxy_to(&upstream));
    let task = tokio::spawn(server.serve(app));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the silent connection was never closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    task.abort();
}

/// The header-read timeout counts from the connection's opening, across the protocol
/// sniff: a first byte sent late does not start the time for the head afresh (it did, so a
/// client had twice the timeout).
#[tokio::test]
async fn the_first_head_is_due_within_the_timeout_of_the_connection_opening() {
    let upstream = TestUpstream::echo().await;
    let gw = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&upstream)),
        TrustedProxies::none(),
        |s| s.header_read_timeout(Some(Duration::from_millis(1000))),
    )
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream.write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    // 1.4 s after opening: the connection is gone, whatever the client sends now.
    let _ = stream.write_all(b"ET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(upstream.requests().is_empty());
}

/// Once an HTTPS endpoint has negotiated HTTP/2 by ALPN, a burst of requests that finds no
/// connection (the last one was closed) opens one, not one per request.
#[tokio::test]
async fn a_burst_to_an_alpn_http2_endpoint_shares_one_new_connection() {
    let pki = Pki::localhost("upstream-h2");
    let echo = TestUpstream::echo().await;
    let tls = pki.tls();
    let tls_upstream = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&echo)),
        TrustedProxies::none(),
        |s| {
            s.tls(tls)
                .keep_alive_timeout(Some(Duration::from_millis(200)))
        },
    )
    .await;
    // A TCP relay in front of it counts the connections the proxy opens.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (counter, closes) = (Arc::clone(&opened), Arc::clone(&closed));
    let upstream_addr = tls_upstream.addr;
    let relay_task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let closes = Arc::clone(&closes);
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(upstream_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                closes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });

    let client = HttpClient::builder()
        .webpki_roots(false)
        .add_root_pem(pki.cert_pem.as_bytes())
        .unwrap();
    let proxy = ReverseProxy::builder(
        Upstream::single(&format!("https://localhost:{relay_port}")).unwrap(),
    )
    .client(client.build().unwrap())
    .build()
    .unwrap();
    let call = |proxy: ReverseProxy| async move {
        let req = Request::get("/").body(Body::empty()).unwrap();
        let res = tower::ServiceExt::oneshot(proxy, req).await.unwrap();
        let head = (res.status(), res.version());
        drop(res.into_body().collect().await.unwrap());
        head
    };
    assert_eq!(call(proxy.clone()).await, (StatusCode::OK, Version::HTTP_2));
    // The upstream closes the idle HTTP/2 connection (GOAWAY after 200 ms), and the proxy
    // its side.
    eventually("the idle HTTP/2 connection is closed", || {
        closed.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let burst: Vec<_> = (0..20).map(|_| tokio::spawn(call(proxy.clone()))).collect();
    for req in burst {
        assert_eq!(req.await.unwrap(), (StatusCode::OK, Version::HTTP_2));
    }
    assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), 2);
    relay_task.abort();
}

/// Once a crowd of connections has come and gone, the server runs its shrink hook (once),
/// and not while connections are only coming.
#[tokio::test]
async fn a_crowd_that_closes_runs_the_shrink_hook_once() {
    let up = TestUpstream::echo().await;
    let shrunk = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&shrunk);
    let gw = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&up)),
        TrustedProxies::none(),
        move |s| {
            s.shrink_after_close(8, move || {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        },
    )
    .await;
    let mut crowd = Vec::new();
    for i in 0..10 {
        let mut conn = TcpStream::connect(gw.addr).await.unwrap();
        let req = format!("GET /{i} HTTP/1.1\r\nHost: gw\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        assert!(
            support::within("a response", conn.read(&mut buf))
                .await
                .unwrap()
                > 0
        );
        crowd.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        shrunk.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "not while they are open"
    );
    drop(crowd);
    for _ in 0..100 {
        if shrunk.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(shrunk.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Set when dropped: the response body it guards was dropped, its connection cut.
struct Dropped(Arc<AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A client reads a 256 MiB response, for twice the write timeout, and is not cut while it
/// reads; once it stops reading, the server cuts it at the write timeout and drops the
/// response.
///
/// NOTE: progress is what the socket takes: the kernel wakes a writer only once a third
/// of its send buffer (up to megabytes) is free, so a reader is "slow" for the timeout
/// below some rate (for the 60 s default, about 25 KB/s), as with nginx's `send_timeout`.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_write_timeout() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let app = tower::service_fn(move |_: Request<Body>| {
        let guard = Dropped(Arc::clone(&flag));
        async move {
            let body = Body::new(RepeatBody::new(256 << 20)).with_guard(guard);
            Ok::<_, std::convert::Infallible>(Response::new(body))
        }
    });
    let gw = Gateway::start_with(app, TrustedProxies::none(), |s| {
        s.write_timeout(Some(Duration::from_secs(2)))
    })
    .await;
    // A small receive buffer, so that what the client reads opens the window at once.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut client = socket.connect(gw.addr).await.unwrap();
    client.write_all(get("/", "").as_bytes()).await.unwrap();

    // Four seconds of reading, 64 KiB every 20 ms: progress within every timeout, so the
    // response goes on.
    let mut buf = vec![0u8; 64 * 1024];
    let reading = Instant::now();
    while reading.elapsed() < Duration::from_secs(4) {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the response goes on")
            .unwrap();
        assert!(n > 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!dropped.load(Ordering::SeqCst), "cut while the client read");

    // Then it stops reading: cut once the socket buffers are full and the timeout passed.
    let stopped = Instant::now();
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "a client that stopped reading was never cut"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the kernel buffered still arrives, then the connection ends.
    let mut total = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the cut connection stays open"),
        }
    }
    assert!(total < 256 << 20, "the whole response arrived: {total}");
}

/// Settings out of range are refused when the server starts, not clamped.
#[tokio::test]
async fn out_of_range_settings_are_refused_at_start() {
    for tune in [
        (|s: gateway_proxy::Server| s.max_headers(0))
            as fn(gateway_proxy::Server) -> gateway_proxy::Server,
        |s| s.max_headers(101),
        |s| s.max_header_bytes(4096),
        |s| s.max_connections(0),
    ] {
        let server = tune(gateway_proxy::Server::bind("127.0.0.1:0").await.unwrap());
        let app = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
        });
        let err = server.serve(app).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
        let source = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<gateway_proxy::server::InvalidServer>());
        assert!(source.is_some(), "{err:?}");
    }
}
