//! Hop-by-hop and forwarding header rules, over real sockets.

mod support;

use gateway_core::client_ip::TrustedProxies;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::{HostHeader, ReverseProxy, Route, Router, Upstream};
use support::{Gateway, get, proxy_to, raw, status};

#[tokio::test]
async fn connection_nominated_headers_never_reach_the_upstream() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let res = raw(
        gw.addr,
        &get("/", "Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 2\r\n"),
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    let seen = up.last_request();
    assert!(seen.header("x-secret").is_none(), "{:?}", seen.headers);
    assert!(seen.header("keep-alive").is_none());
    assert_eq!(seen.header("x-kept"), Some("2"));
    // The upstream hop's own Connection header is hyper's, not the client's.
    assert!(
        seen.header("connection")
            .is_none_or(|c| !c.to_ascii_lowercase().contains("x-secret"))
    );
}

#[tokio::test]
async fn connection_cannot_remove_the_gateways_own_forwarding_headers() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let res = raw(
        gw.addr,
        &get("/", "Connection: X-Forwarded-For, X-Forwarded-Proto\r\n"),
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    let seen = up.last_request();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("gw"));
}

#[tokio::test]
async fn response_connection_headers_are_hidden_from_the_client() {
    let up = TestUpstream::serve(|_req| async {
        let mut res = http::Response::new(gateway_core::Body::from("x"));
        res.headers_mut()
            .insert("connection", "X-Internal".parse().unwrap());
        res.headers_mut()
            .insert("x-internal", "secret".parse().unwrap());
        res.headers_mut().insert("x-public", "ok".parse().unwrap());
        Ok(res)
    })
    .await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let res = raw(gw.addr, &get("/", "")).await;
    assert_eq!(status(&res), 200, "{res}");
    let res = res.to_ascii_lowercase();
    assert!(!res.contains("x-internal"), "{res}");
    assert!(res.contains("x-public: ok"), "{res}");
}

#[tokio::test]
async fn untrusted_forwarding_headers_and_lookalikes_are_dropped() {
    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\
                 Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\n\
                 X.Forwarded.For: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\n";
    let res = raw(gw.addr, &get("/", spoof)).await;
    assert_eq!(status(&res), 200, "{res}");
    let seen = up.last_request();
    for (name, value) in &seen.headers {
        assert!(
            !value.as_bytes().windows(7).any(|w| w == b"6.6.6.6") && value != "evil",
            "{name}: {value:?} reached the upstream"
        );
    }
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("gw"));
    assert!(seen.header("x-real-ip").is_none());
    assert!(seen.header("forwarded").is_none());
}

/// Answers with the `ClientIp` the gateway resolved.
fn client_ip_app() -> Router {
    Router::new().route(
        Route::prefix("/"),
        tower::service_fn(|req: http::Request<gateway_core::Body>| async move {
            let ip = req
                .extensions()
                .get::<gateway_core::ClientIp>()
                .map(|c| c.ip().to_string());
            Ok::<_, std::convert::Infallible>(http::Response::new(gateway_core::Body::from(
                ip.unwrap_or_default(),
            )))
        }),
    )
}

#[tokio::test]
async fn client_ip_behind_a_trusted_proxy_is_the_rightmost_untrusted() {
    let trusted = TrustedProxies::builder()
        .cidr("127.0.0.0/8")
        .cidr("10.0.0.0/8")
        .build()
        .unwrap();
    let gw = Gateway::start_with(client_ip_app(), trusted, |s| s).await;
    for (xff, want) in [
        ("6.6.6.6, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        ("203.0.113.9", "203.0.113.9"),
        ("garbage", "127.0.0.1"),
        ("6.6.6.6, garbage, 10.0.0.2", "127.0.0.1"),
    ] {
        let res = raw(gw.addr, &get("/", &format!("X-Forwarded-For: {xff}\r\n"))).await;
        assert_eq!(status(&res), 200, "{res}");
        assert_eq!(support::body_of(&res), want, "X-Forwarded-For: {xff}");
    }
}

#[tokio::test]
async fn trusted_proxy_chain_is_extended_not_replaced() {
    let up = TestUpstream::echo().await;
    let trusted = TrustedProxies::builder().cidr("127.0.0.1").build().unwrap();
    let gw = Gateway::start_with(
        Router::new().route(Route::prefix("/"), proxy_to(&up)),
        trusted,
        |s| s,
    )
    .await;
    let res = raw(
        gw.addr,
        &get("/", "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nX_Forwarded_For: 6.6.6.6\r\n"),
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    let seen = up.last_request();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert!(seen.headers.keys().all(|k| !k.as_str().contains('_')));
}

#[tokio::test]
async fn host_is_rewritten_or_preserved_and_forwarded_via_added() {
    let up = TestUpstream::echo().await;
    let rewrite = proxy_to(&up);
    let preserve = ReverseProxy::builder(Upstream::single(&up.url()).unwrap())
        .host(HostHeader::Preserve)
        .forwarded(true)
        .via("gw-test")
        .strip_prefix("/keep");
    let app = Router::new()
        .route(Route::prefix("/rewrite"), rewrite)
        .route(Route::prefix("/keep"), preserve.build().unwrap());
    let gw = Gateway::start(app).await;

    assert_eq!(status(&raw(gw.addr, &get("/rewrite", "")).await), 200);
    assert_eq!(
        up.last_request().header("host"),
        Some(up.addr().to_string().as_str())
    );

    assert_eq!(status(&raw(gw.addr, &get("/keep/x?y=1", "")).await), 200);
    let seen = up.last_request();
    assert_eq!(seen.header("host"), Some("gw"));
    assert_eq!(seen.uri, "/x?y=1");
    assert_eq!(
        seen.header("forwarded"),
        Some(r#"for=127.0.0.1;proto=http;host="gw""#)
    );
    assert_eq!(seen.header("via"), Some("1.1 gw-test"));
}

#[tokio::test]
async fn expect_continue_is_answered_by_the_gateway_and_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let up = TestUpstream::echo().await;
    let gw = Gateway::start(Router::new().route(Route::prefix("/"), proxy_to(&up))).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(
        b"POST /up HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    // The client holds its body back until the gateway says to go on.
    let mut interim = vec![0u8; 25];
    tokio::time::timeout(
        std::time::Duration::from_secs(3),
        conn.read_exact(&mut interim),
    )
    .await
    .expect("the gateway must answer 100 Continue, not wait for the body")
    .unwrap();
    assert_eq!(&interim[..], b"HTTP/1.1 100 Continue\r\n\r\n");
    conn.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(3),
        conn.read_to_end(&mut rest),
    )
    .await
    .unwrap()
    .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(status(&rest), 200, "{rest}");
    let seen = up.last_request();
    assert_eq!(&seen.body[..], b"hello");
    assert!(seen.header("expect").is_none(), "{:?}", seen.headers);
}
