//! Authentication and ACLs composed in code, over real sockets: API keys, JWTs minted here
//! (good ones and every kind of bad one), any of several methods, the anonymous consumer,
//! and ACLs by group. Every refused request must be refused before the upstream.
#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and every unwrap here is an assertion"
)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gateway_core::Identity;
use gateway_core::test_util::TestUpstream;
use gateway_middleware::auth::{Acl, AclLayer, ApiKeys, AuthLayer, Jwks, Jwt, JwtKey, KeyAuth};
use gateway_proxy::{Route, Router};
use http::header::HeaderName;
use jsonwebtoken::{Algorithm, EncodingKey};
use support::{Gateway, fetch, proxy_to, request};
use tower::{Layer as _, ServiceBuilder};

const RSA: &[u8] = include_bytes!("support/keys/rsa.pem");
const RSA_PUB: &[u8] = include_bytes!("support/keys/rsa.pub.pem");
const EC: &[u8] = include_bytes!("support/keys/ec.pem");
const EC_PUB: &[u8] = include_bytes!("support/keys/ec.pub.pem");
const ED: &[u8] = include_bytes!("support/keys/ed.pem");
const ED_PUB: &[u8] = include_bytes!("support/keys/ed.pub.pem");
const SECRET: &[u8] = b"a-secret-of-thirty-two-bytes-or-more!!";

fn now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    i64::try_from(secs).unwrap()
}

/// A token with exactly this header and these claims, signed with `key` by `alg` (or with an
/// empty signature when `alg` is `None`).
fn mint(header: &str, claims: &str, key: Option<(&EncodingKey, Algorithm)>) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = match key {
        Some((key, alg)) => jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap(),
        None => String::new(),
    };
    format!("{message}.{signature}")
}

fn claims(extra: &str) -> String {
    let exp = now() + 600;
    format!(r#"{{"sub":"alice","iss":"https://idp.test","aud":"api","exp":{exp}{extra}}}"#)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A gateway whose one route is `layer` over a proxy to `up`.
async fn guarded<L, ResB>(layer: L, up: &TestUpstream) -> Gateway
where
    L: tower::Layer<gateway_proxy::ReverseProxy>,
    L::Service: tower::Service<http::Request<gateway_core::Body>, Response = http::Response<ResB>>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as tower::Service<http::Request<gateway_core::Body>>>::Future: Send,
    <L::Service as tower::Service<http::Request<gateway_core::Body>>>::Error:
        Into<gateway_core::BoxError>,
    ResB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResB::Error: Into<gateway_core::BoxError>,
{
    let router = Router::new().route(Route::prefix("/"), layer.layer(proxy_to(up)));
    Gateway::start(router).await
}

#[tokio::test]
async fn every_jwt_rule_refuses_before_the_upstream() {
    let up = TestUpstream::echo().await;
    let keys = Jwks::keys([
        JwtKey::public_pem(Algorithm::RS256, RSA_PUB)
            .unwrap()
            .kid("rsa"),
        JwtKey::public_pem(Algorithm::ES256, EC_PUB)
            .unwrap()
            .kid("ec"),
        JwtKey::public_pem(Algorithm::EdDSA, ED_PUB)
            .unwrap()
            .kid("ed"),
        JwtKey::hmac(Algorithm::HS256, SECRET).unwrap().kid("hs"),
    ]);
    let jwt = Jwt::builder(keys)
        .issuer("https://idp.test")
        .audience("api")
        .leeway(Duration::from_secs(60))
        .max_lifetime(Duration::from_secs(86_400))
        .claim_header("sub", HeaderName::from_static("x-consumer"))
        .build()
        .unwrap();
    let gw = guarded(AuthLayer::new(jwt), &up).await;

    // Where a token's `jku`, `x5u` and `jwk` point: nothing may ever ask it.
    let lure = TestUpstream::echo().await;
    let rsa = EncodingKey::from_rsa_pem(RSA).unwrap();
    let ec = EncodingKey::from_ec_pem(EC).unwrap();
    let ed = EncodingKey::from_ed_pem(ED).unwrap();
    let hs = EncodingKey::from_secret(SECRET).unwrap();
    let rs256 = Some((&rsa, Algorithm::RS256));
    let head = |alg: &str, kid: &str| format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}"}}"#);

    // Good tokens, one per family; the client's own `x-consumer` is replaced by the claim.
    for token in [
        mint(&head("RS256", "rsa"), &claims(""), rs256),
        mint(
            &head("ES256", "ec"),
            &claims(""),
            Some((&ec, Algorithm::ES256)),
        ),
        mint(
            &head("EdDSA", "ed"),
            &claims(""),
            Some((&ed, Algorithm::EdDSA)),
        ),
        mint(
            &head("HS256", "hs"),
            &claims(""),
            Some((&hs, Algorithm::HS256)),
        ),
        // Within the leeway; `aud` as an array holding the audience; `jku` never followed.
        mint(
            &head("RS256", "rsa"),
            &claims(&format!(r#","nbf":{}"#, now() + 30)),
            rs256,
        ),
        mint(
            &format!(
                r#"{{"alg":"RS256","kid":"rsa","jku":"{0}/jwks","x5u":"{0}/cert","jwk":{{"kty":"oct","k":"AAAA"}}}}"#,
                lure.url()
            ),
            &format!(
                r#"{{"sub":"alice","iss":"https://idp.test","aud":["web","api"],"exp":{}}}"#,
                now() - 30
            ),
            rs256,
        ),
    ] {
        let res = fetch(
            gw.addr,
            request(
                "GET",
                "/",
                &[
                    ("authorization", &bearer(&token)),
                    ("x-consumer", "mallory"),
                ],
            ),
        )
        .await;
        assert_eq!(res.status(), 200, "{token}");
        assert_eq!(up.last_request().header("x-consumer"), Some("alice"));
    }
    let accepted = up.requests().len();

    let pub_as_secret = EncodingKey::from_secret(RSA_PUB).unwrap();
    let hs512 = EncodingKey::from_secret(SECRET).unwrap();
    let good = mint(&head("RS256", "rsa"), &claims(""), rs256);
    let (good_head, rest) = good.split_once('.').unwrap();
    let (good_payload, good_sig) = rest.split_once('.').unwrap();
    let evil_payload = URL_SAFE_NO_PAD.encode(claims("").replace("alice", "admin"));
    let mut flipped = URL_SAFE_NO_PAD.decode(good_sig).unwrap();
    flipped[10] ^= 1;
    let refused = [
        ("alg none", mint(r#"{"alg":"none"}"#, &claims(""), None)),
        (
            "HS256 with the RSA public key as secret",
            mint(
                &head("HS256", "rsa"),
                &claims(""),
                Some((&pub_as_secret, Algorithm::HS256)),
            ),
        ),
        (
            "alg not the key's",
            mint(
                &head("HS512", "hs"),
                &claims(""),
                Some((&hs512, Algorithm::HS512)),
            ),
        ),
        (
            "no exp",
            mint(
                &head("RS256", "rsa"),
                r#"{"sub":"alice","iss":"https://idp.test","aud":"api"}"#,
                rs256,
            ),
        ),
        (
            "exp a string",
            mint(
                &head("RS256", "rsa"),
                r#"{"sub":"alice","iss":"https://idp.test","aud":"api","exp":"9999999999"}"#,
                rs256,
            ),
        ),
        (
            "expired past the leeway",
            mint(
                &head("RS256", "rsa"),
                &claims("").replace(&format!("{}", now() + 600), &format!("{}", now() - 120)),
                rs256,
            ),
        ),
        (
            "nbf ahead",
            mint(
                &head("RS256", "rsa"),
                &claims(&format!(r#","nbf":{}"#, now() + 3600)),
                rs256,
            ),
        ),
        (
            "nbf a string",
            mint(&head("RS256", "rsa"), &claims(r#","nbf":"0""#), rs256),
        ),
        (
            "exp ten years ahead",
            mint(
                &head("RS256", "rsa"),
                &claims("").replace(
                    &format!("{}", now() + 600),
                    &format!("{}", now() + 315_360_000),
                ),
                rs256,
            ),
        ),
        (
            "wrong iss",
            mint(
                &head("RS256", "rsa"),
                &claims("").replace("https://idp.test", "https://evil"),
                rs256,
            ),
        ),
        (
            "iss a number",
            mint(
                &head("RS256", "rsa"),
                &claims("").replace(r#""https://idp.test""#, "12345"),
                rs256,
            ),
        ),
        (
            "no iss",
            mint(
                &head("RS256", "rsa"),
                &format!(r#"{{"sub":"alice","aud":"api","exp":{}}}"#, now() + 600),
                rs256,
            ),
        ),
        (
            "wrong aud",
            mint(
                &head("RS256", "rsa"),
                &claims("").replace(r#""api""#, r#""web""#),
                rs256,
            ),
        ),
        (
            "aud a number",
            mint(
                &head("RS256", "rsa"),
                &claims("").replace(r#""api""#, "42"),
                rs256,
            ),
        ),
        (
            "no aud",
            mint(
                &head("RS256", "rsa"),
                &format!(
                    r#"{{"sub":"alice","iss":"https://idp.test","exp":{}}}"#,
                    now() + 600
                ),
                rs256,
            ),
        ),
        (
            "unknown kid",
            mint(&head("RS256", "nope"), &claims(""), rs256),
        ),
        (
            "kid path traversal",
            mint(&head("RS256", "../../../../dev/null"), &claims(""), rs256),
        ),
        (
            "crit",
            mint(
                r#"{"alg":"RS256","kid":"rsa","crit":["exp"],"exp":1}"#,
                &claims(""),
                rs256,
            ),
        ),
        (
            "tampered payload",
            format!("{good_head}.{evil_payload}.{good_sig}"),
        ),
        (
            "tampered signature",
            format!(
                "{good_head}.{good_payload}.{}",
                URL_SAFE_NO_PAD.encode(&flipped)
            ),
        ),
        ("two parts", format!("{good_head}.{good_payload}")),
        ("four parts", format!("{good}.x")),
        ("bad base64", format!("{good_head}.%%%.{good_sig}")),
        (
            "no sub",
            mint(
                &head("RS256", "rsa"),
                &format!(
                    r#"{{"iss":"https://idp.test","aud":"api","exp":{}}}"#,
                    now() + 600
                ),
                rs256,
            ),
        ),
    ];
    for (what, token) in &refused {
        let res = fetch(
            gw.addr,
            request("GET", "/", &[("authorization", &bearer(token))]),
        )
        .await;
        assert_eq!(res.status(), 401, "{what}");
        let challenge = res.headers()["www-authenticate"].to_str().unwrap();
        assert_eq!(
            challenge, r#"Bearer realm="gateway", error="invalid_token""#,
            "{what}"
        );
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        let body = String::from_utf8_lossy(res.body());
        assert!(
            !body.contains("exp") && !body.contains("kid"),
            "{what}: nothing about why: {body}"
        );
    }
    for (what, value) in [
        ("empty bearer", "Bearer".to_owned()),
        ("two spaces", format!("Bearer  {good}")),
        ("a 20 KiB token", bearer(&"a".repeat(20 * 1024))),
    ] {
        let res = fetch(gw.addr, request("GET", "/", &[("authorization", &value)])).await;
        assert_eq!(res.status(), 401, "{what}");
    }
    let two = fetch(
        gw.addr,
        request(
            "GET",
            "/",
            &[
                ("authorization", &bearer(&good)),
                ("authorization", &bearer(&good)),
            ],
        ),
    )
    .await;
    assert_eq!(two.status(), 401, "two Authorization headers");
    let none = fetch(gw.addr, request("GET", "/", &[])).await;
    assert_eq!(none.status(), 401);
    assert_eq!(
        none.headers()["www-authenticate"],
        r#"Bearer realm="gateway""#,
        "no error without a token"
    );
    assert_eq!(
        up.requests().len(),
        accepted,
        "no refused request reached the upstream"
    );
    assert!(lure.requests().is_empty(), "jku and x5u are never followed");
}

#[tokio::test]
async fn api_keys_acls_anonymous_and_any_of() {
    let up = TestUpstream::echo().await;
    let keys = || {
        ApiKeys::new()
            .consumer(
                Identity::consumer("alice").with_groups(["admins"]),
                ["alice-key"],
            )
            .consumer(
                Identity::consumer("bob").with_groups(["staff"]),
                ["bob-key", "bob-old-key"],
            )
    };
    let jwt = Jwt::builder(Jwks::keys(
        [JwtKey::hmac(Algorithm::HS256, SECRET).unwrap()],
    ))
    .build()
    .unwrap();
    let router = Router::new()
        .route(
            Route::prefix("/keys"),
            ServiceBuilder::new()
                .layer(AuthLayer::new(KeyAuth::new(keys()).hide_credentials(true)))
                .service(proxy_to(&up)),
        )
        .route(
            Route::prefix("/admin"),
            ServiceBuilder::new()
                .layer(AuthLayer::new(KeyAuth::new(keys())))
                .layer(AclLayer::new(Acl::allow(["admins"])))
                .service(proxy_to(&up)),
        )
        .route(
            Route::prefix("/open"),
            ServiceBuilder::new()
                .layer(AuthLayer::new(KeyAuth::new(keys())).anonymous(Identity::anonymous()))
                .layer(AclLayer::new(Acl::deny(["staff"])))
                .service(proxy_to(&up)),
        )
        .route(
            Route::prefix("/any"),
            ServiceBuilder::new()
                .layer(AuthLayer::new(jwt).or(KeyAuth::new(keys())))
                .service(proxy_to(&up)),
        );
    let gw = Gateway::start(router).await;
    let get = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        fetch(gw.addr, request("GET", path, &headers))
    };
    let key = |k: &str| vec![("x-api-key", k.to_owned())];

    let before = up.requests().len();
    let res = get("/keys", key("bob-old-key")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        up.last_request().header("x-api-key"),
        None,
        "hide_credentials"
    );
    for (what, headers) in [
        ("a wrong key", key("guess")),
        ("no key", vec![]),
        ("an empty key", key("")),
        (
            "two keys",
            vec![
                ("x-api-key", "bob-key".to_owned()),
                ("x-api-key", "bob-key".to_owned()),
            ],
        ),
    ] {
        let res = get("/keys", headers).await;
        assert_eq!(res.status(), 401, "{what}");
        assert_eq!(
            res.headers()["www-authenticate"],
            r#"ApiKey realm="gateway""#,
            "{what}"
        );
    }
    let res = fetch(gw.addr, request("GET", "/keys?apikey=bob-key", &[])).await;
    assert_eq!(
        res.status(),
        401,
        "a key in the query when only the header is read"
    );
    assert_eq!(up.requests().len(), before + 1);

    assert_eq!(get("/admin", key("alice-key")).await.status(), 200);
    assert_eq!(
        get("/admin", key("bob-key")).await.status(),
        403,
        "not in the allowed group"
    );
    assert_eq!(get("/admin", vec![]).await.status(), 401);

    assert_eq!(get("/open", vec![]).await.status(), 200, "anonymous");
    assert_eq!(get("/open", key("alice-key")).await.status(), 200);
    assert_eq!(
        get("/open", key("guess")).await.status(),
        401,
        "a bad key never falls back to anonymous"
    );
    assert_eq!(
        get("/open", key("bob-key")).await.status(),
        403,
        "denied group"
    );

    let hs = EncodingKey::from_secret(SECRET).unwrap();
    let token = mint(
        r#"{"alg":"HS256"}"#,
        &claims(""),
        Some((&hs, Algorithm::HS256)),
    );
    let auth = |t: &str| ("authorization", bearer(t));
    assert_eq!(
        get("/any", vec![auth(&token)]).await.status(),
        200,
        "the JWT"
    );
    assert_eq!(get("/any", key("bob-key")).await.status(), 200, "the key");
    let bad = format!("{token}x");
    let both = vec![auth(&bad), ("x-api-key", "bob-key".to_owned())];
    assert_eq!(
        get("/any", both).await.status(),
        200,
        "a bad token and a good key"
    );
    let res = get("/any", vec![auth(&bad)]).await;
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()["www-authenticate"],
        r#"Bearer realm="gateway", error="invalid_token""#
    );
    let res = get("/any", vec![]).await;
    assert_eq!(
        res.headers()["www-authenticate"],
        r#"Bearer realm="gateway", ApiKey realm="gateway""#,
        "every method's challenge"
    );
}

/// The JWK of a PEM public key: the EC point or Ed25519 key is the end of its SPKI DER.
fn jwk(pem: &[u8], kid: &str) -> String {
    let pem = std::str::from_utf8(pem).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    if pem == std::str::from_utf8(EC_PUB).unwrap() {
        let point = &der[der.len() - 65..];
        let (x, y) = (
            URL_SAFE_NO_PAD.encode(&point[1..33]),
            URL_SAFE_NO_PAD.encode(&point[33..]),
        );
        format!(r#"{{"kty":"EC","crv":"P-256","kid":"{kid}","alg":"ES256","x":"{x}","y":"{y}"}}"#)
    } else {
        let x = URL_SAFE_NO_PAD.encode(&der[der.len() - 32..]);
        format!(r#"{{"kty":"OKP","crv":"Ed25519","kid":"{kid}","x":"{x}"}}"#)
    }
}

/// A JWKS endpoint serving what `doc` holds (503 when it is empty), counting its fetches.
async fn idp(doc: std::sync::Arc<std::sync::Mutex<String>>) -> TestUpstream {
    use gateway_core::Body;
    TestUpstream::serve(move |_| {
        let doc = doc.lock().unwrap().clone();
        async move {
            let mut res = http::Response::new(Body::from(doc.clone()));
            if doc.is_empty() {
                *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok(res)
        }
    })
    .await
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_random_kids_cost_the_idp_nothing() {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new(format!(r#"{{"keys":[{}]}}"#, jwk(EC_PUB, "k1"))));
    let idp = idp(Arc::clone(&doc)).await;
    let client = gateway_proxy::HttpClient::builder().build().unwrap();
    let jwks = Jwks::remote(idp.url().parse().unwrap())
        .refresh(Duration::from_secs(3600))
        .refetch_cooldown(Duration::from_secs(60))
        .start(client)
        .unwrap();
    let jwt = Jwt::builder(jwks).build().unwrap();
    let up = TestUpstream::echo().await;
    let gw = guarded(AuthLayer::new(jwt), &up).await;
    let ec = EncodingKey::from_ec_pem(EC).unwrap();
    let ed = EncodingKey::from_ed_pem(ED).unwrap();
    let send = |token: String| {
        fetch(
            gw.addr,
            request("GET", "/", &[("authorization", &bearer(&token))]),
        )
    };

    let k1 = mint(
        r#"{"alg":"ES256","kid":"k1"}"#,
        &claims(""),
        Some((&ec, Algorithm::ES256)),
    );
    assert_eq!(
        send(k1.clone()).await.status(),
        200,
        "waits for the first set"
    );
    assert_eq!(idp.requests().len(), 1);

    // The IdP rotates in a new key: a token signed by it is accepted after one refetch.
    *doc.lock().unwrap() = format!(
        r#"{{"keys":[{},{}]}}"#,
        jwk(EC_PUB, "k1"),
        jwk(ED_PUB, "k2")
    );
    let k2 = mint(
        r#"{"alg":"EdDSA","kid":"k2"}"#,
        &claims(""),
        Some((&ed, Algorithm::EdDSA)),
    );
    assert_eq!(send(k2.clone()).await.status(), 200);
    assert_eq!(idp.requests().len(), 2, "one refetch");

    // A thousand random `kid`s within the cooldown: refused, and no fetch at all.
    let mut refused = 0;
    for i in 0..1000u32 {
        let kid = format!("random-{i}-{}", i.wrapping_mul(2_654_435_761));
        let token = mint(
            &format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#),
            &claims(""),
            Some((&ed, Algorithm::EdDSA)),
        );
        if send(token).await.status() == 401 {
            refused += 1;
        }
    }
    assert_eq!(refused, 1000);
    assert_eq!(
        idp.requests().len(),
        2,
        "no fetch for unknown kids within the cooldown"
    );
    assert_eq!(send(k1).await.status(), 200);
    assert_eq!(send(k2).await.status(), 200);
}

#[tokio::test]
async fn the_last_good_keys_stay_while_the_idp_is_down() {
    use std::sync::{Arc, Mutex};
    let doc = Arc::new(Mutex::new(format!(r#"{{"keys":[{}]}}"#, jwk(ED_PUB, "k1"))));
    let idp = idp(Arc::clone(&doc)).await;
    let client = gateway_proxy::HttpClient::builder().build().unwrap();
    let jwks = Jwks::remote(idp.url().parse().unwrap())
        .refresh(Duration::from_millis(50))
        .refresh_bounds(Duration::from_millis(50), Duration::from_secs(1))
        .start(client)
        .unwrap();
    let jwt = Jwt::builder(jwks.clone()).build().unwrap();
    let up = TestUpstream::echo().await;
    let gw = guarded(AuthLayer::new(jwt), &up).await;
    let ed = EncodingKey::from_ed_pem(ED).unwrap();
    let token = mint(
        r#"{"alg":"EdDSA","kid":"k1"}"#,
        &claims(""),
        Some((&ed, Algorithm::EdDSA)),
    );
    let send = || {
        fetch(
            gw.addr,
            request("GET", "/", &[("authorization", &bearer(&token))]),
        )
    };
    assert_eq!(send().await.status(), 200);

    doc.lock().unwrap().clear();
    let down_at = idp.requests().len();
    support::eventually("two failed fetches", || idp.requests().len() >= down_at + 2).await;
    assert_eq!(
        send().await.status(),
        200,
        "the last good keys still verify"
    );
    assert_eq!(jwks.current().len(), 1);
}

#[tokio::test]
async fn before_the_first_set_requests_fail_with_503_when_asked() {
    let down = gateway_core::test_util::refused_addr().await;
    let client = gateway_proxy::HttpClient::builder().build().unwrap();
    let jwks = Jwks::remote(format!("http://{down}/jwks").parse().unwrap())
        .startup(gateway_middleware::auth::Startup::Fail)
        .start(client)
        .unwrap();
    let up = TestUpstream::echo().await;
    let gw = guarded(AuthLayer::new(Jwt::builder(jwks).build().unwrap()), &up).await;
    let hs = EncodingKey::from_secret(SECRET).unwrap();
    let token = mint(
        r#"{"alg":"HS256"}"#,
        &claims(""),
        Some((&hs, Algorithm::HS256)),
    );
    let res = fetch(
        gw.addr,
        request("GET", "/", &[("authorization", &bearer(&token))]),
    )
    .await;
    assert_eq!(res.status(), 503);
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn basic_auth_right_wrong_unknown_and_hidden() {
    use gateway_middleware::auth::{BasicAuth, Users};
    let up = TestUpstream::echo().await;
    let users = Users::from_htpasswd(
        &format!("alice:{}\n", bcrypt::hash("wonder land", 4).unwrap()),
        |_| vec!["admins".to_owned()],
    )
    .unwrap();
    let basic = BasicAuth::new(users).hide_credentials(true).realm("ops");
    let gw = guarded(
        ServiceBuilder::new()
            .layer(AuthLayer::new(basic))
            .layer(AclLayer::new(Acl::allow(["admins"]))),
        &up,
    )
    .await;
    let basic = |user_pass: &str| {
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        );
        fetch(gw.addr, request("GET", "/", &[("authorization", &value)]))
    };
    for _ in 0..2 {
        assert_eq!(basic("alice:wonder land").await.status(), 200);
        assert_eq!(up.last_request().header("authorization"), None, "hidden");
    }
    let seen = up.requests().len();
    for (what, user_pass) in [
        ("wrong", "alice:wonderland"),
        ("unknown", "mallory:x"),
        ("no user", ":x"),
    ] {
        let res = basic(user_pass).await;
        assert_eq!(res.status(), 401, "{what}");
        assert_eq!(
            res.headers()["www-authenticate"],
            r#"Basic realm="ops""#,
            "{what}"
        );
    }
    let res = fetch(
        gw.addr,
        request("GET", "/", &[("authorization", "Basic !!")]),
    )
    .await;
    assert_eq!(res.status(), 401);
    assert_eq!(fetch(gw.addr, request("GET", "/", &[])).await.status(), 401);
    assert_eq!(up.requests().len(), seen);
}

#[tokio::test]
async fn forward_auth_allows_denies_and_caches_its_decisions() {
    use gateway_core::Body;
    use gateway_middleware::auth::ForwardAuthLayer;
    // The authorization service: `Bearer good` is alice, anything else is sent to log in.
    let authz = TestUpstream::serve(|req| async move {
        let good = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == "Bearer good");
        let login = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == "Bearer login");
        let res = if login {
            http::Response::builder()
                .status(302)
                .header("location", "https://login.test/")
                .header("set-cookie", "state=nonce-for-one-client")
                .body(Body::empty())
        } else if good {
            http::Response::builder()
                .header("x-user", "alice")
                .header("x-other", "no")
                .body(Body::empty())
        } else {
            http::Response::builder()
                .status(302)
                .header("location", "https://login.test/")
                .header("x-secret", "internal")
                .body(Body::from("log in first"))
        };
        Ok(res.unwrap())
    })
    .await;
    let up = TestUpstream::echo().await;
    let client = gateway_proxy::HttpClient::builder().build().unwrap();
    let layer = ForwardAuthLayer::new(client, format!("{}/check", authz.url()).parse().unwrap())
        .response_headers([HeaderName::from_static("x-user")])
        .identity_header(HeaderName::from_static("x-user"))
        .cache_for(Duration::from_secs(60));
    let gw = guarded(
        ServiceBuilder::new()
            .layer(layer)
            .layer(AclLayer::new(Acl::deny(["nobody"]))),
        &up,
    )
    .await;
    let send = |auth: &'static str| {
        fetch(
            gw.addr,
            request(
                "GET",
                "/orders?page=2",
                &[("authorization", auth), ("x-user", "mallory")],
            ),
        )
    };

    for _ in 0..5 {
        let res = send("Bearer good").await;
        assert_eq!(res.status(), 200);
        let seen = up.last_request();
        assert_eq!(
            seen.header("x-user"),
            Some("alice"),
            "the service's header, not the client's"
        );
        assert_eq!(seen.header("x-other"), None, "only the chosen headers");
    }
    assert_eq!(
        authz.requests().len(),
        1,
        "one ask for five identical requests within the TTL"
    );
    let asked = authz.last_request();
    assert_eq!(asked.uri, "/check");
    assert_eq!(asked.header("authorization"), Some("Bearer good"));
    assert_eq!(asked.header("x-forwarded-uri"), Some("/orders?page=2"));
    assert_eq!(asked.header("x-forwarded-method"), Some("GET"));

    let forwarded = up.requests().len();
    for _ in 0..3 {
        let res = send("Bearer bad").await;
        assert_eq!(res.status(), 302, "the service's answer goes to the client");
        assert_eq!(res.headers()["location"], "https://login.test/");
        assert!(!res.headers().contains_key("x-secret"));
        assert_eq!(res.body().as_ref(), b"log in first");
    }
    assert_eq!(authz.requests().len(), 2, "denials are cached too");
    for _ in 0..2 {
        let res = send("Bearer login").await;
        assert_eq!(res.headers()["set-cookie"], "state=nonce-for-one-client");
    }
    assert_eq!(
        authz.requests().len(),
        4,
        "a denial that sets a cookie is not shared"
    );
    assert_eq!(
        up.requests().len(),
        forwarded,
        "no denied request reached the upstream"
    );

    // An unreachable service: 503, nothing forwarded.
    let down = gateway_core::test_util::refused_addr().await;
    let client = gateway_proxy::HttpClient::builder().build().unwrap();
    let gw = guarded(
        ForwardAuthLayer::new(client, format!("http://{down}/").parse().unwrap()),
        &up,
    )
    .await;
    let res = fetch(
        gw.addr,
        request("GET", "/", &[("authorization", "Bearer good")]),
    )
    .await;
    assert_eq!(res.status(), 503);
    assert_eq!(up.requests().len(), forwarded);
}

#[tokio::test]
async fn a_cached_token_still_expires() {
    let up = TestUpstream::echo().await;
    let jwt = Jwt::builder(Jwks::keys(
        [JwtKey::hmac(Algorithm::HS256, SECRET).unwrap()],
    ))
    .build()
    .unwrap();
    let gw = guarded(AuthLayer::new(jwt), &up).await;
    let hs = EncodingKey::from_secret(SECRET).unwrap();
    // NOTE: two seconds ahead, not one: `exp` is whole seconds, and one could pass
    // between minting and the second request on a loaded machine.
    let exp = now() + 2;
    let token = mint(
        r#"{"alg":"HS256"}"#,
        &format!(r#"{{"sub":"alice","exp":{exp}}}"#),
        Some((&hs, Algorithm::HS256)),
    );
    let send = || {
        fetch(
            gw.addr,
            request("GET", "/", &[("authorization", &bearer(&token))]),
        )
    };
    assert_eq!(send().await.status(), 200);
    assert_eq!(send().await.status(), 200, "from the cache");
    while now() < exp {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(send().await.status(), 401, "the cache honours exp");
}

/// The auth sections of a config file, loaded as the example gateway loads them (with the
/// metrics and an HTTP client lent), and their mistakes.
#[cfg(feature = "config")]
mod from_config {
    use super::*;
    use gateway_core::metrics::{Format, Metrics};
    use gateway_core::registry::Registry;
    use gateway_proxy::config;

    fn registry(metrics: &Metrics) -> Registry {
        let mut registry = Registry::new();
        gateway_middleware::config::register(&mut registry);
        registry.metrics(metrics);
        registry.client(gateway_proxy::HttpClient::builder().build().unwrap());
        registry
    }

    fn load(yaml: &str, metrics: &Metrics) -> Result<config::Gateway, config::ConfigError> {
        let parsed = config::parse("gateway.yaml", yaml, |_| None, &registry(metrics))?;
        config::build("gateway.yaml", &parsed)
    }

    #[tokio::test]
    async fn every_auth_section_works_from_a_file() {
        let up = TestUpstream::echo().await;
        let dir = std::env::temp_dir().join(format!("gw-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let consumers = dir.join("consumers.yaml");
        std::fs::write(
            &consumers,
            "- { name: carol, keys: [carol-key-0123456789], groups: [admins] }\n",
        )
        .unwrap();
        let htpasswd = dir.join("htpasswd");
        std::fs::write(
            &htpasswd,
            format!("dave:{}\n", bcrypt::hash("pw", 4).unwrap()),
        )
        .unwrap();
        let pem = dir.join("ec.pub.pem");
        std::fs::write(&pem, EC_PUB).unwrap();
        let yaml = format!(
            r#"
listen: 127.0.0.1:0
upstreams:
  app: {{ endpoints: ["{up}"] }}
routes:
  - id: keys
    match: {{ path: /keys }}
    upstream: app
    plugins:
      - key-auth:
          consumers: [{{ name: alice, keys: [alice-key-0123456789], groups: [staff] }}]
          consumers_file: {consumers}
          hide_credentials: true
      - acl: {{ allow: [admins] }}
  - id: basic
    match: {{ path: /basic }}
    upstream: app
    plugins:
      - basic-auth: {{ htpasswd_file: {htpasswd}, realm: ops }}
  - id: guest
    match: {{ path: /guest }}
    upstream: app
    plugins:
      - key-auth: {{ consumers_file: {consumers}, anonymous: guest, anonymous_groups: [public] }}
      - acl: {{ allow: [public] }}
  - id: any
    match: {{ path: /any }}
    upstream: app
    plugins:
      - auth:
          any_of:
            - jwt: {{ public_key_file: {pem}, algorithm: ES256, issuer: https://idp.test, audience: api, claims_to_headers: {{ sub: x-user }} }}
            - key-auth: {{ consumers_file: {consumers} }}
          anonymous: guest
"#,
            up = up.url(),
            consumers = consumers.display(),
            htpasswd = htpasswd.display(),
            pem = pem.display(),
        );
        let metrics = Metrics::new();
        let built = load(&yaml, &metrics).unwrap_or_else(|e| panic!("{e}"));
        let gw = Gateway::start(built.router).await;
        let get = |path: &'static str, headers: Vec<(&'static str, String)>| {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            fetch(gw.addr, request("GET", path, &headers))
        };

        assert_eq!(
            get("/keys", vec![("x-api-key", "carol-key-0123456789".into())])
                .await
                .status(),
            200
        );
        assert_eq!(up.last_request().header("x-api-key"), None);
        assert_eq!(
            get("/keys", vec![("x-api-key", "alice-key-0123456789".into())])
                .await
                .status(),
            403
        );
        assert_eq!(
            get("/keys", vec![("x-api-key", "wrong-key-0123456789".into())])
                .await
                .status(),
            401
        );

        let basic = |pw: &str| {
            (
                "authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("dave:{pw}"))
                ),
            )
        };
        assert_eq!(get("/basic", vec![basic("pw")]).await.status(), 200);
        let res = get("/basic", vec![basic("nope")]).await;
        assert_eq!(
            (
                res.status().as_u16(),
                res.headers()["www-authenticate"].to_str().unwrap()
            ),
            (401, r#"Basic realm="ops""#)
        );

        assert_eq!(
            get("/guest", vec![]).await.status(),
            200,
            "the anonymous consumer's group is allowed"
        );
        let carol = vec![("x-api-key", "carol-key-0123456789".to_owned())];
        assert_eq!(
            get("/guest", carol).await.status(),
            403,
            "carol is not in `public`"
        );

        let ec = EncodingKey::from_ec_pem(EC).unwrap();
        let token = mint(
            r#"{"alg":"ES256"}"#,
            &claims(""),
            Some((&ec, Algorithm::ES256)),
        );
        assert_eq!(
            get("/any", vec![("authorization", bearer(&token))])
                .await
                .status(),
            200
        );
        assert_eq!(up.last_request().header("x-user"), Some("alice"));
        assert_eq!(
            get("/any", vec![("x-api-key", "carol-key-0123456789".into())])
                .await
                .status(),
            200
        );
        assert_eq!(get("/any", vec![]).await.status(), 200, "anonymous");
        assert_eq!(
            get("/any", vec![("authorization", bearer("x.y.z"))])
                .await
                .status(),
            401
        );

        let text = metrics.encode(Format::Prometheus);
        for line in [
            r#"gateway_auth_decisions_total{route="keys",method="key-auth",decision="accepted"} 2"#,
            r#"gateway_auth_decisions_total{route="keys",method="key-auth",decision="rejected"} 1"#,
            r#"gateway_auth_failures_total{route="keys",method="key-auth",reason="unknown_key"} 1"#,
            r#"gateway_acl_decisions_total{route="keys",decision="denied"} 1"#,
            r#"gateway_auth_decisions_total{route="any",method="none",decision="anonymous"} 1"#,
            r#"gateway_auth_failures_total{route="basic",method="basic-auth",reason="bad_password"} 1"#,
            r#"gateway_auth_failures_total{route="any",method="jwt",reason="malformed"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn auth_mistakes_are_refused_at_load() {
        let metrics = Metrics::new();
        let route = |plugin: &str| {
            format!(
                "listen: 127.0.0.1:0\nroutes:\n  - match: {{ path: / }}\n    respond: {{ status: 200 }}\n    plugins:\n      - {plugin}\n"
            )
        };
        for (plugin, why) in [
            ("jwt: {}", "give one of"),
            (
                "jwt: { secret: s, jwks_url: http://idp/jwks }",
                "give one of",
            ),
            (
                "jwt: { secret: short, algorithm: HS256 }",
                "at least 32 bytes",
            ),
            (
                "jwt: { secret: a-secret-of-thirty-two-bytes-or-more, algorithm: none }",
                "not a signing algorithm",
            ),
            (
                "jwt: { public_key_file: /nonexistent.pem, algorithm: RS256 }",
                "cannot read",
            ),
            (
                "jwt: { jwks_url: http://idp/jwks, startup: maybe }",
                "`wait` or `fail`",
            ),
            (
                "jwt: { secret: a-secret-of-thirty-two-bytes-or-more, algorithm: HS256, issuer: 5 }",
                "a string or a list of strings",
            ),
            (
                "jwt: { secret: a-secret-of-thirty-two-bytes-or-more, algorithm: HS256, oops: 1 }",
                "unknown field",
            ),
            (
                "key-auth: { consumers: [{ name: a, keys: [short] }] }",
                "guessable",
            ),
            ("key-auth: { consumers: [] }", "no consumer has a key"),
            (
                "basic-auth: { users: [{ name: a, password_hash: plain }] }",
                "not accepted",
            ),
            ("auth: { any_of: [] }", "at least one method"),
            ("acl: {}", "`allow` or a `deny`"),
            ("forward-auth: { url: /relative }", "absolute"),
        ] {
            let err = match load(&route(plugin), &metrics) {
                Ok(_) => panic!("{plugin} was accepted"),
                Err(err) => err.to_string(),
            };
            assert!(err.contains(why), "{plugin}: {err}");
        }
    }
}

/// The commented auth route of the example config loads once uncommented, and guards its
/// route as its comments say.
#[cfg(feature = "config")]
#[tokio::test]
async fn the_example_configs_auth_block_works_uncommented() {
    let example = include_str!("../../examples/gateway/gateway.example.yaml");
    let (before, rest) = example.split_once("  # --- auth example\n").unwrap();
    let (block, after) = rest.split_once("  # --- end\n").unwrap();
    let block: String = block
        .lines()
        .map(|l| format!("{}\n", l.replacen("# ", "", 1)))
        .collect();
    let yaml = format!("{before}{block}{after}");
    let down = gateway_core::test_util::refused_addr().await;
    let env = move |name: &str| match name {
        "JWKS_URL" => Some(format!("http://{down}/jwks.json")),
        "ADMIN_KEY" => Some("ops-bot-key-0123456789".to_owned()),
        _ => None,
    };
    let mut registry = gateway_core::registry::Registry::new();
    gateway_middleware::config::register(&mut registry);
    registry.client(gateway_proxy::HttpClient::builder().build().unwrap());
    let parsed = gateway_proxy::config::parse("gateway.example.yaml", &yaml, env, &registry)
        .unwrap_or_else(|e| panic!("{e}"));
    let built = gateway_proxy::config::build("gateway.example.yaml", &parsed)
        .unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway::start(built.router).await;
    let res = fetch(gw.addr, request("GET", "/admin", &[])).await;
    assert_eq!(res.status(), 401);
    let key = [("x-api-key", "ops-bot-key-0123456789")];
    let res = fetch(gw.addr, request("GET", "/admin", &key)).await;
    assert_ne!(
        res.status(),
        401,
        "the key passes auth and the ACL (the upstream may be down)"
    );
    assert_ne!(res.status(), 403);
}

#[tokio::test]
async fn preflights_pass_unauthenticated_only_when_asked() {
    let up = TestUpstream::echo().await;
    let keys = || ApiKeys::new().consumer(Identity::consumer("alice"), ["alice-key-0123456789"]);
    let router = Router::new()
        .route(
            Route::prefix("/open"),
            AuthLayer::new(KeyAuth::new(keys()))
                .allow_preflights(true)
                .layer(proxy_to(&up)),
        )
        .route(
            Route::prefix("/closed"),
            AuthLayer::new(KeyAuth::new(keys())).layer(proxy_to(&up)),
        );
    let gw = Gateway::start(router).await;
    let preflight = [
        ("origin", "https://app.test"),
        ("access-control-request-method", "PUT"),
    ];
    let send = |path: &'static str, headers: &[(&str, &str)]| {
        fetch(gw.addr, request("OPTIONS", path, headers))
    };
    assert_eq!(
        send("/open", &preflight).await.status(),
        200,
        "a preflight passes"
    );
    assert_eq!(up.last_request().method, http::Method::OPTIONS);
    assert_eq!(send("/closed", &preflight).await.status(), 401);
    assert_eq!(
        send("/open", &[("origin", "https://app.test")])
            .await
            .status(),
        401,
        "a plain OPTIONS is no preflight"
    );
    let get = fetch(gw.addr, request("GET", "/open", &preflight)).await;
    assert_eq!(get.status(), 401, "nor is a GET with preflight headers");
}
