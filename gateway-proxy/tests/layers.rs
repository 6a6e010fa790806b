//! The small layers composed in code, as a user's `main.rs` would, over real sockets and
//! with hostile input: request ids, body limits, IP filters, timeouts, CORS, compression,
//! header edits, and the routes the gateway answers itself.
#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and every unwrap here is an assertion"
)]

mod support;

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use gateway_core::client_ip::TrustedProxies;
use gateway_core::test_util::{TestUpstream, refused_addr};
use gateway_core::{Body, BoxError, RescueLayer};
use gateway_middleware::body_limit::BodyLimitLayer;
use gateway_middleware::compression::CompressionLayer;
use gateway_middleware::cors::CorsLayer;
use gateway_middleware::headers::{EditHeadersLayer, Edits};
use gateway_middleware::ip_filter::IpFilterLayer;
use gateway_middleware::request_id::SetRequestIdLayer;
use gateway_middleware::trace_context::TraceContextLayer;
use gateway_proxy::respond::{Redirect, Respond};
use gateway_proxy::{ReverseProxy, Route, Router, Upstream};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Uri};
use support::{Gateway, fetch, proxy_to, raw, request, status};
use tower::ServiceBuilder;

#[tokio::test]
async fn request_ids_body_limits_and_ip_filters_hold_in_code() {
    let up = TestUpstream::echo().await;
    let router = Router::new()
        .route(
            Route::prefix("/id"),
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new())
                .service(proxy_to(&up)),
        )
        .route(
            Route::prefix("/upload"),
            ServiceBuilder::new()
                .layer(BodyLimitLayer::new(1024))
                .service(proxy_to(&up)),
        )
        .route(
            Route::prefix("/internal"),
            ServiceBuilder::new()
                .layer(IpFilterLayer::new().allow("10.0.0.0/8".parse().unwrap()))
                .service(proxy_to(&up)),
        );
    let gw = Gateway::start(router).await;

    let res = fetch(gw.addr, request("GET", "/id", &[("x-request-id", "a\tb")])).await;
    let id = res.headers()["x-request-id"].clone();
    assert_eq!(id.len(), 32, "an insane id is replaced");
    assert_eq!(up.last_request().header("x-request-id"), id.to_str().ok());

    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let res = raw(gw.addr, &chunked).await;
    assert_eq!(status(&res), 413, "{res}");
    assert!(res.contains("application/problem+json"), "{res}");

    let before = up.requests().len();
    let forged = support::get("/internal", "X-Forwarded-For: 10.1.2.3\r\n");
    assert_eq!(status(&raw(gw.addr, &forged).await), 403);
    assert_eq!(up.requests().len(), before, "refused before the upstream");
}

#[tokio::test]
async fn a_timeout_in_code_answers_504_through_the_edge_rescue() {
    let slow = TestUpstream::slow(Duration::from_secs(2)).await;
    let router = Router::new().route(
        Route::prefix("/"),
        ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
                200,
            )))
            .service(proxy_to(&slow)),
    );
    let gw = Gateway::start(router).await;
    let res = raw(gw.addr, &support::get("/", "")).await;
    assert_eq!(status(&res), 504, "{res}");
    assert!(res.contains("application/problem+json"), "{res}");
}

/// An upstream that answers every request with its own CORS headers and a `Server`.
async fn opinionated_upstream() -> TestUpstream {
    TestUpstream::serve(|_| async {
        let mut res = Response::new(Body::from("from upstream"));
        let headers = res.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        headers.insert(header::SERVER, HeaderValue::from_static("origin/1.0"));
        Ok::<_, BoxError>(res)
    })
    .await
}

fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin("https://app.example.com".parse().unwrap())
        .allow_origin("https://*.example.org".parse().unwrap())
        .allow_credentials(true)
        .expose_headers([HeaderName::from_static("x-total")])
        .max_age(Duration::from_secs(600))
}

#[tokio::test]
async fn cors_answers_preflights_decorates_responses_and_passes_plain_options() {
    let up = opinionated_upstream().await;
    let down = Upstream::single(&format!("http://{}", refused_addr().await)).unwrap();
    let router = Router::new()
        .route(
            Route::prefix("/api"),
            ServiceBuilder::new().layer(cors()).service(proxy_to(&up)),
        )
        .route(
            // The documented order: CORS outside, a route Rescue inside it, so the 502 of an
            // unreachable upstream reaches the page with its CORS headers.
            Route::prefix("/down"),
            ServiceBuilder::new()
                .layer(cors())
                .layer(RescueLayer::new())
                .service(ReverseProxy::new(down)),
        );
    let gw = Gateway::start(router).await;
    let app = ("origin", "https://app.example.com");

    // A preflight from an allowed origin is answered here.
    let preflight = request(
        "OPTIONS",
        "/api/items",
        &[
            ("origin", "https://shop.example.org"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "x-custom, content-type"),
        ],
    );
    let res = fetch(gw.addr, preflight).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://shop.example.org");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(
        h["access-control-allow-methods"],
        "GET, HEAD, POST, PUT, PATCH, DELETE"
    );
    assert_eq!(h["access-control-allow-headers"], "x-custom, content-type");
    assert_eq!(h["access-control-max-age"], "600");
    assert!(up.requests().is_empty(), "preflights stay at the gateway");

    // A preflight from anywhere else is refused, and says so.
    for evil in [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "https://example.org",
        "null",
    ] {
        let preflight = request(
            "OPTIONS",
            "/api",
            &[("origin", evil), ("access-control-request-method", "GET")],
        );
        let res = fetch(gw.addr, preflight).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{evil}");
        assert!(res.headers().get("access-control-allow-origin").is_none());
    }

    // A plain OPTIONS (no preflight headers) is the upstream's to answer.
    let res = fetch(gw.addr, request("OPTIONS", "/api", &[app])).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(up.last_request().method, Method::OPTIONS);

    // An allowed origin's request: our CORS headers replace the upstream's.
    let res = fetch(gw.addr, request("GET", "/api", &[app])).await;
    assert_eq!(res.status(), StatusCode::OK);
    let values: Vec<_> = res
        .headers()
        .get_all("access-control-allow-origin")
        .iter()
        .collect();
    assert_eq!(values, ["https://app.example.com"]);
    assert_eq!(res.headers()["access-control-expose-headers"], "x-total");
    assert_eq!(res.headers()[header::VARY], "origin");

    // Another origin's: no CORS headers at all (not even the upstream's `*`), still `Vary`.
    let res = fetch(
        gw.addr,
        request("GET", "/api", &[("origin", "https://evil.example")]),
    )
    .await;
    assert!(res.headers().get("access-control-allow-origin").is_none());
    assert_eq!(res.headers()[header::VARY], "origin");

    // The 502 of an unreachable upstream carries the CORS headers.
    let res = fetch(gw.addr, request("GET", "/down", &[app])).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
}

/// An upstream that answers with `len` bytes of text, a strong `ETag`, and what the request
/// asks for in `x-cache-control` as its `Cache-Control`.
async fn text_upstream(len: usize) -> TestUpstream {
    TestUpstream::serve(move |req| async move {
        let text = "the quick brown fox jumps over the lazy dog\n".repeat(len / 44 + 1);
        let mut res = Response::new(Body::from(text[..len].to_owned()));
        let headers = res.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        if let Some(cc) = req.headers().get("x-cache-control") {
            headers.insert(header::CACHE_CONTROL, cc.clone());
        }
        Ok::<_, BoxError>(res)
    })
    .await
}

fn decoded(res: &Response<Bytes>) -> Vec<u8> {
    let body = res.body().as_ref();
    let mut out = Vec::new();
    match res
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes())
    {
        None => out.extend_from_slice(body),
        Some(b"gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some(b"br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some(b"zstd") => out = zstd::decode_all(body).unwrap(),
        Some(other) => panic!("unexpected encoding {other:?}"),
    }
    out
}

#[tokio::test]
async fn compression_negotiates_and_leaves_alone_what_it_must() {
    let up = text_upstream(20_000).await;
    let small = text_upstream(100).await;
    let router = Router::new()
        .route(
            Route::prefix("/small"),
            ServiceBuilder::new()
                .layer(CompressionLayer::new())
                .service(proxy_to(&small)),
        )
        .route(
            Route::prefix("/"),
            ServiceBuilder::new()
                .layer(CompressionLayer::new())
                .service(proxy_to(&up)),
        );
    let gw = Gateway::start(router).await;
    let plain = "the quick brown fox jumps over the lazy dog\n".repeat(20_000 / 44 + 1);
    let plain = &plain.as_bytes()[..20_000];

    for (accept, chosen) in [
        ("gzip", Some("gzip")),
        ("br", Some("br")),
        ("zstd", Some("zstd")),
        ("gzip;q=0.5, br;q=1.0", Some("br")),
        ("GZIP", Some("gzip")),
        ("identity", None),
        ("gzip;q=0", None),
        ("deflate", None),
        ("*;q=0", None),
        ("identity;q=0, deflate", None),
        ("gzip;q=abc, zstd;q=2, , ;;;", None),
    ] {
        let res = fetch(gw.addr, request("GET", "/", &[("accept-encoding", accept)])).await;
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "{accept}: the upstream's status"
        );
        let encoding = res.headers().get(header::CONTENT_ENCODING);
        assert_eq!(encoding.and_then(|v| v.to_str().ok()), chosen, "{accept}");
        assert_eq!(decoded(&res), plain, "{accept}");
        if chosen.is_some() {
            assert!(res.body().len() < plain.len() / 4, "{accept}: compressed");
            assert_eq!(res.headers()[header::ETAG], "W/\"v1\"", "{accept}");
            assert_eq!(res.headers()[header::VARY], "accept-encoding");
        } else {
            assert_eq!(res.headers()[header::ETAG], "\"v1\"", "{accept}");
        }
    }

    // `no-transform` is obeyed; a small body is not worth it.
    let res = fetch(
        gw.addr,
        request(
            "GET",
            "/",
            &[
                ("accept-encoding", "gzip"),
                ("x-cache-control", "public, No-Transform"),
            ],
        ),
    )
    .await;
    assert!(res.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(res.body().as_ref(), plain);
    let res = fetch(
        gw.addr,
        request("GET", "/small", &[("accept-encoding", "gzip")]),
    )
    .await;
    assert!(res.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(res.body().len(), 100);

    // A hostile `Accept-Encoding` of 6 KiB is read without harm.
    let hostile = "gzip;q=0.".to_owned() + &"9".repeat(6000);
    let res = fetch(
        gw.addr,
        request("GET", "/", &[("accept-encoding", &hostile)]),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(decoded(&res), plain);
}

#[tokio::test]
async fn header_edits_apply_to_requests_and_responses() {
    let up = opinionated_upstream().await;
    let edits = EditHeadersLayer::new()
        .request(Edits::new().remove(header::COOKIE).set(
            HeaderName::from_static("x-user"),
            HeaderValue::from_static("gateway"),
        ))
        .response(Edits::new().remove(header::SERVER).append(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000"),
        ));
    let router = Router::new().route(
        Route::prefix("/"),
        ServiceBuilder::new().layer(edits).service(proxy_to(&up)),
    );
    let gw = Gateway::start(router).await;
    let res = fetch(
        gw.addr,
        request(
            "GET",
            "/",
            &[
                ("cookie", "session=secret"),
                ("x-user", "admin"),
                ("x-user", "root"),
            ],
        ),
    )
    .await;
    let seen = up.last_request();
    assert!(seen.header("cookie").is_none());
    let users: Vec<_> = seen.headers.get_all("x-user").iter().collect();
    assert_eq!(users, ["gateway"], "the client's forged values are gone");
    assert!(res.headers().get(header::SERVER).is_none());
    assert_eq!(
        res.headers()[header::STRICT_TRANSPORT_SECURITY],
        "max-age=63072000"
    );
}

#[tokio::test]
async fn fixed_responses_and_redirects_need_no_upstream() {
    let router = Router::new()
        .route(
            Route::exact("/healthz"),
            Respond::new(StatusCode::OK).text("ok\n"),
        )
        .route(
            Route::prefix("/old"),
            Redirect::permanent(Uri::from_static("/api")),
        );
    let gw = Gateway::start_with(router, TrustedProxies::none(), |s| s).await;
    let res = fetch(gw.addr, request("GET", "/healthz", &[])).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body().as_ref(), b"ok\n");
    let res = raw(
        gw.addr,
        "HEAD /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert!(res.ends_with("\r\n\r\n"), "a HEAD gets no body: {res:?}");
    assert!(res.contains("content-length: 3\r\n"), "{res}");
    // The redirect's target is fixed: a hostile Host or path does not steer it.
    let res = raw(
        gw.addr,
        "GET //evil.example/old HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    if status(&res) == 308 {
        assert!(res.contains("\r\nlocation: /api\r\n"), "{res}");
    } else {
        assert_eq!(status(&res), 404, "{res}");
    }
    let res = raw(
        gw.addr,
        "GET /old/x?y=1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 308, "{res}");
    assert!(res.contains("\r\nlocation: /api\r\n"), "{res}");
}

/// `(trace id, parent id, flags)` of a `traceparent` the upstream received, checked for form.
fn parent_parts(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(hex(parts[1], 32) && parts[1] != "0".repeat(32), "{value}");
    assert!(hex(parts[2], 16) && parts[2] != "0".repeat(16), "{value}");
    assert!(hex(parts[3], 2), "{value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn trace_context_is_continued_started_or_replaced() {
    let up = TestUpstream::echo().await;
    let router = Router::new().route(
        Route::prefix("/"),
        ServiceBuilder::new()
            .layer(TraceContextLayer::new())
            .service(proxy_to(&up)),
    );
    let gw = Gateway::start(router).await;
    let seen = |up: &TestUpstream| {
        let last = up.last_request();
        let parents: Vec<String> = last
            .headers
            .get_all("traceparent")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(parents.len(), 1, "exactly one traceparent: {parents:?}");
        let state = last.header("tracestate").map(str::to_owned);
        (parent_parts(&parents[0]), state)
    };

    // Continued: the same trace and flags, a new parent; tracestate passed on.
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let req = request(
        "GET",
        "/",
        &[("traceparent", valid), ("tracestate", "vendor=abc")],
    );
    fetch(gw.addr, req).await;
    let ((trace, parent, flags), state) = seen(&up);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parent, "00f067aa0ba902b7");
    assert_eq!(flags, "00");
    assert_eq!(state.as_deref(), Some("vendor=abc"));

    // Started when there is none.
    fetch(gw.addr, request("GET", "/", &[])).await;
    let ((first, _, flags), state) = seen(&up);
    assert_eq!(flags, "01");
    assert!(state.is_none());
    fetch(gw.addr, request("GET", "/", &[])).await;
    assert_ne!(seen(&up).0.0, first, "a new trace each time");

    // Replaced when malformed, its tracestate dropped.
    for bad in [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "garbage",
    ] {
        let req = request(
            "GET",
            "/",
            &[("traceparent", bad), ("tracestate", "evil=1")],
        );
        fetch(gw.addr, req).await;
        let ((trace, _, _), state) = seen(&up);
        assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
        assert!(state.is_none(), "{bad}: tracestate dropped");
    }
    // Two traceparents are one too many.
    let req = request(
        "GET",
        "/",
        &[("traceparent", valid), ("traceparent", valid)],
    );
    fetch(gw.addr, req).await;
    assert_ne!(seen(&up).0.0, "4bf92f3577b34da6a3ce929d0e0e4736");
}
