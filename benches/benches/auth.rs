//! Per-request cost of the auth layers: the JWT layer for each signature family next to
//! the bare signature check it makes, a cached token, an API key, a cached basic-auth
//! success, and an ACL.
//!
//! `cargo bench -p gateway-benches --bench auth`

#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use divan::AllocProfiler;
use gateway_benches::{ok_service, ready};
use gateway_core::{Body, Identity};
use gateway_middleware::auth::{
    Acl, AclLayer, ApiKeys, AuthLayer, BasicAuth, Jwks, Jwt, JwtKey, KeyAuth, Users,
};
use http::Request;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use tower::{Layer, ServiceExt};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

const KEYS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../gateway-proxy/tests/support/keys/"
);
const SECRET: &[u8] = b"a-secret-of-thirty-two-bytes-or-more!!";

fn main() {
    divan::main();
}

fn file(name: &str) -> Vec<u8> {
    std::fs::read(format!("{KEYS}{name}")).expect("the test keys")
}

/// A token signed with `alg`, its verification key, and the key to check it bare.
fn token(alg: &str) -> (String, JwtKey, DecodingKey, Algorithm) {
    let (algorithm, private, public) = match alg {
        "RS256" => (Algorithm::RS256, "rsa.pem", "rsa.pub.pem"),
        "ES256" => (Algorithm::ES256, "ec.pem", "ec.pub.pem"),
        "EdDSA" => (Algorithm::EdDSA, "ed.pem", "ed.pub.pem"),
        _ => (Algorithm::HS256, "", ""),
    };
    let (signing, key, bare) = match algorithm {
        Algorithm::RS256 => (
            EncodingKey::from_rsa_pem(&file(private)),
            JwtKey::public_pem(algorithm, &file(public)),
            DecodingKey::from_rsa_pem(&file(public)),
        ),
        Algorithm::ES256 => (
            EncodingKey::from_ec_pem(&file(private)),
            JwtKey::public_pem(algorithm, &file(public)),
            DecodingKey::from_ec_pem(&file(public)),
        ),
        Algorithm::EdDSA => (
            EncodingKey::from_ed_pem(&file(private)),
            JwtKey::public_pem(algorithm, &file(public)),
            DecodingKey::from_ed_pem(&file(public)),
        ),
        _ => (
            EncodingKey::from_secret(SECRET),
            JwtKey::hmac(algorithm, SECRET),
            DecodingKey::from_secret(SECRET),
        ),
    };
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + 3600;
    let header = format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"k1"}}"#);
    let claims = format!(
        r#"{{"sub":"alice","iss":"https://idp.example","aud":"api","exp":{exp},"groups":["staff"]}}"#
    );
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signing = signing.expect("a signing key");
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &signing, algorithm).expect("signed");
    let key = key.expect("a verification key").kid("k1");
    (
        format!("{message}.{signature}"),
        key,
        bare.expect("a decoding key"),
        algorithm,
    )
}

fn request(name: &str, value: &str) -> Request<Body> {
    Request::get("/")
        .header(name, value)
        .body(Body::empty())
        .expect("valid request")
}

const ALGS: [&str; 4] = ["RS256", "ES256", "EdDSA", "HS256"];

/// The signature check alone, with jsonwebtoken's own (RustCrypto) backend.
#[divan::bench(args = ALGS)]
fn jwt_bare_signature_rustcrypto(b: divan::Bencher<'_, '_>, alg: &str) {
    let (token, _, bare, algorithm) = token(alg);
    let (message, signature) = token.rsplit_once('.').expect("three parts");
    b.bench_local(|| jsonwebtoken::crypto::verify(signature, message.as_bytes(), &bare, algorithm));
}

/// The signature check alone, as the layer makes it (ring for RSA and ECDSA, jsonwebtoken
/// for EdDSA and HMAC).
#[divan::bench(args = ALGS)]
fn jwt_bare_signature_layer(b: divan::Bencher<'_, '_>, alg: &str) {
    use ring::signature as sig;
    let (token, _, bare, algorithm) = token(alg);
    let (message, signature) = token.rsplit_once('.').expect("three parts");
    let raw = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
    let ring_alg: &'static dyn sig::VerificationAlgorithm = match algorithm {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        _ => {
            b.bench_local(|| {
                jsonwebtoken::crypto::verify(signature, message.as_bytes(), &bare, algorithm)
            });
            return;
        }
    };
    let der = bare.try_get_as_bytes().expect("a DER key");
    b.bench_local(|| {
        let raw = URL_SAFE_NO_PAD.decode(signature).map(|_| &raw);
        sig::UnparsedPublicKey::new(ring_alg, der)
            .verify(message.as_bytes(), raw.expect("base64url"))
    });
}

/// The whole layer, every request verified (no cache).
#[divan::bench(args = ALGS)]
fn jwt_layer(b: divan::Bencher<'_, '_>, alg: &str) {
    let (token, key, _, _) = token(alg);
    let jwt = Jwt::builder(Jwks::keys([key]))
        .issuer("https://idp.example")
        .audience("api")
        .groups_claim("groups")
        .cache(0)
        .build()
        .expect("a jwt method");
    let svc = AuthLayer::new(jwt).layer(ok_service());
    let value = format!("Bearer {token}");
    b.with_inputs(|| request("authorization", &value))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// A token seen before: from the verified-token cache.
#[divan::bench(args = ["RS256", "HS256"])]
fn jwt_layer_cached(b: divan::Bencher<'_, '_>, alg: &str) {
    let (token, key, _, _) = token(alg);
    let jwt = Jwt::builder(Jwks::keys([key]))
        .issuer("https://idp.example")
        .audience("api")
        .build()
        .expect("a jwt method");
    let svc = AuthLayer::new(jwt).layer(ok_service());
    let value = format!("Bearer {token}");
    b.with_inputs(|| request("authorization", &value))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// An API key among 1,000 consumers' keys.
#[divan::bench]
fn api_key(b: divan::Bencher<'_, '_>) {
    let mut keys = ApiKeys::new();
    for i in 0..1000 {
        keys = keys.consumer(
            Identity::consumer(format!("c{i}")),
            [format!("key-{i:016}")],
        );
    }
    let svc = AuthLayer::new(KeyAuth::new(keys)).layer(ok_service());
    b.with_inputs(|| request("x-api-key", "key-0000000000000500"))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

/// A basic-auth success remembered (the hash itself is checked once per 5 minutes).
#[divan::bench]
fn basic_auth_remembered(b: divan::Bencher<'_, '_>) {
    let hash = bcrypt_hash();
    let users = Users::new()
        .user(Identity::consumer("alice"), &hash)
        .expect("a bcrypt hash");
    let svc = AuthLayer::new(BasicAuth::new(users)).layer(ok_service());
    let value = format!("Basic {}", STANDARD.encode("alice:wonderland"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime
        .block_on(svc.clone().oneshot(request("authorization", &value)))
        .expect("checked once");
    b.with_inputs(|| request("authorization", &value))
        .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}

fn bcrypt_hash() -> String {
    bcrypt::hash("wonderland", 4).expect("a bcrypt hash")
}

/// An ACL after authentication (an allow list of three groups).
#[divan::bench]
fn acl(b: divan::Bencher<'_, '_>) {
    let svc = AclLayer::new(Acl::allow(["admins", "ops", "staff"])).layer(ok_service());
    let identity = Identity::consumer("alice").with_groups(["staff"]);
    b.with_inputs(|| {
        let mut req = request("x", "y");
        req.extensions_mut().insert(identity.clone());
        req
    })
    .bench_local_values(|req| ready(svc.clone().oneshot(req)));
}
