//! Path normalization and host checks, with the hostile inputs sent as raw bytes.

mod support;

use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use support::{Gateway, get, proxy_to, raw, status};

struct Setup {
    gw: Gateway,
    admin: TestUpstream,
    public: TestUpstream,
    api: TestUpstream,
    rest: TestUpstream,
}

async fn setup() -> Setup {
    let (admin, public, api, rest) = (
        TestUpstream::echo().await,
        TestUpstream::echo().await,
        TestUpstream::echo().await,
        TestUpstream::echo().await,
    );
    let app = Router::new()
        .route(Route::prefix("/admin"), proxy_to(&admin))
        .route(Route::prefix("/public"), proxy_to(&public))
        .route(Route::prefix("/api"), proxy_to(&api))
        .route(Route::prefix("/").host("known.example"), proxy_to(&rest));
    Setup {
        gw: Gateway::start(app).await,
        admin,
        public,
        api,
        rest,
    }
}

#[tokio::test]
async fn evasions_get_the_canonical_decision_and_the_upstream_the_canonical_path() {
    let s = setup().await;
    for path in [
        "/admin",
        "/%61dmin",
        "//admin",
        "/./admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
    ] {
        let before = s.admin.requests().len();
        let res = raw(s.gw.addr, &get(path, "")).await;
        assert_eq!(status(&res), 200, "{path}: {res}");
        assert_eq!(
            s.admin.requests().len(),
            before + 1,
            "{path} must reach the admin route"
        );
        assert_eq!(s.admin.last_request().uri, "/admin", "{path}");
    }
    assert!(
        s.public.requests().is_empty(),
        "no evasion may reach /public"
    );
}

#[tokio::test]
async fn unsafe_paths_are_refused_before_any_upstream() {
    let s = setup().await;
    for path in [
        "/admin%2fx",
        "/admin%2Fx",
        "/admin%00",
        "/admin%0d%0aX:1",
        "/admin%5c..%5c",
        "/admin\\x",
        "/%zz",
        "/../admin",
        "*",
    ] {
        let res = raw(s.gw.addr, &get(path, "")).await;
        assert_eq!(status(&res), 400, "{path}: {res}");
        assert!(res.contains("application/problem+json"), "{path}: {res}");
    }
    for up in [&s.admin, &s.public, &s.api, &s.rest] {
        assert!(up.requests().is_empty());
    }
}

#[tokio::test]
async fn prefixes_match_on_segment_boundaries_only() {
    let s = setup().await;
    assert_eq!(status(&raw(s.gw.addr, &get("/api/x", "")).await), 200);
    assert_eq!(s.api.requests().len(), 1);
    let res = raw(s.gw.addr, &get("/apiadmin", "")).await;
    assert_eq!(status(&res), 404, "{res}");
    assert_eq!(s.api.requests().len(), 1);
    assert!(s.admin.requests().is_empty());
}

#[tokio::test]
async fn absolute_form_must_agree_with_host() {
    let s = setup().await;
    let res = raw(
        s.gw.addr,
        "GET http://other.host/admin HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 400, "{res}");
    let res = raw(
        s.gw.addr,
        "GET http://gw/admin HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(s.admin.last_request().uri, "/admin");
}

#[tokio::test]
async fn host_rules() {
    let s = setup().await;
    // Unknown host: only host-less routes can match, and `/other` has none.
    let res = raw(
        s.gw.addr,
        "GET /other HTTP/1.1\r\nHost: unknown.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 404, "{res}");
    let res = raw(
        s.gw.addr,
        "GET /other HTTP/1.1\r\nHost: KNOWN.example.\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert_eq!(s.rest.requests().len(), 1);
    for bad in [
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: u@known.example\r\nConnection: close\r\n\r\n",
    ] {
        assert_eq!(status(&raw(s.gw.addr, bad).await), 400, "{bad:?}");
    }
    assert_eq!(s.rest.requests().len(), 1);
}
