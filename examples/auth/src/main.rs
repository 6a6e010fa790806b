//! Authentication composed in code, with an identity provider of its own.
//!
//! The example starts two servers:
//! - a tiny **identity provider** on `127.0.0.1:9911`: it makes an ES256 key at start,
//!   publishes it at `/.well-known/jwks.json`, and signs a token for anyone who asks at
//!   `/token?sub=NAME&groups=a,b` (a demo: a real IdP checks who is asking);
//! - the **gateway** on `127.0.0.1:8082`, which fetches that JWKS through its own HTTP
//!   client (and refreshes it in the background), with three routes:
//!   - `/public`: no authentication;
//!   - `/api`: a JWT **or** an API key, or no credential at all as the `guest` consumer;
//!   - `/admin`: a JWT of a member of `admins` (an ACL after the JWT).
//!
//! Each route answers with who it saw (the `Identity` the auth layer put in the request).
//!
//! ```text
//! cargo run -p example-auth
//! TOKEN=$(curl -s 'http://127.0.0.1:9911/token?sub=alice&groups=admins')
//! curl -i http://127.0.0.1:8082/api -H "Authorization: Bearer $TOKEN"    # 200 hello alice
//! curl -i http://127.0.0.1:8082/api -H 'X-API-Key: demo-key-0123456789'  # 200 hello billing
//! curl -i http://127.0.0.1:8082/api                                       # 200 hello guest
//! curl -i http://127.0.0.1:8082/api -H 'Authorization: Bearer x.y.z'     # 401 invalid_token
//! curl -i http://127.0.0.1:8082/admin -H "Authorization: Bearer $TOKEN"  # 200
//! BOB=$(curl -s 'http://127.0.0.1:9911/token?sub=bob')
//! curl -i http://127.0.0.1:8082/admin -H "Authorization: Bearer $BOB"    # 403
//! ```

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gateway_core::{Body, Identity, RescueLayer};
use gateway_middleware::auth::{Acl, AclLayer, ApiKeys, AuthLayer, Jwks, Jwt, KeyAuth};
use gateway_proxy::{HttpClient, Route, Router, Server};
use http::{Request, Response, StatusCode, header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use tower::{ServiceBuilder, service_fn};

const ISSUER: &str = "http://127.0.0.1:9911";

/// The identity provider: one ES256 key, its JWKS, and tokens for the asking.
struct Idp {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    issuer: String,
}

impl Idp {
    fn new(issuer: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "cannot make a key")?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| "cannot read the key")?;
        Ok(Self {
            key,
            rng,
            issuer: issuer.to_owned(),
        })
    }

    /// The JWKS: the public key's point, split into `x` and `y`.
    fn jwks(&self) -> String {
        let point = self.key.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"demo-1","x":"{}","y":"{}"}}]}}"#,
            URL_SAFE_NO_PAD.encode(x),
            URL_SAFE_NO_PAD.encode(y)
        )
    }

    /// A token for `sub` in `groups`, valid for an hour.
    fn token(&self, sub: &str, groups: &[&str]) -> Result<String, ring::error::Unspecified> {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        let groups: Vec<String> = groups.iter().map(|g| format!("{g:?}")).collect();
        let claims = format!(
            r#"{{"iss":"{}","aud":"demo-api","sub":{sub:?},"exp":{exp},"groups":[{}]}}"#,
            self.issuer,
            groups.join(",")
        );
        let header = r#"{"alg":"ES256","typ":"JWT","kid":"demo-1"}"#;
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = self.key.sign(&self.rng, message.as_bytes())?;
        Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// `/.well-known/jwks.json` and `/token`.
    async fn answer(&self, req: Request<Body>) -> Response<Body> {
        let text = |status: StatusCode, body: String, kind: &'static str| {
            let mut res = Response::new(Body::from(body));
            *res.status_mut() = status;
            res.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
            res
        };
        match req.uri().path() {
            "/.well-known/jwks.json" => {
                text(StatusCode::OK, self.jwks(), "application/jwk-set+json")
            }
            "/token" => {
                let query = req.uri().query().unwrap_or("");
                let param = |name: &str| {
                    query
                        .split('&')
                        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
                        .unwrap_or("")
                };
                let sub = param("sub");
                if sub.is_empty() || !sub.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "?sub=NAME (letters and digits)\n".into(),
                        "text/plain",
                    );
                }
                let groups: Vec<&str> = param("groups")
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .collect();
                match self.token(sub, &groups) {
                    Ok(token) => text(StatusCode::OK, token, "text/plain"),
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        String::new(),
                        "text/plain",
                    ),
                }
            }
            _ => text(StatusCode::NOT_FOUND, String::new(), "text/plain"),
        }
    }
}

/// Serves `idp` on `listener`.
fn serve_idp(idp: Idp, listener: tokio::net::TcpListener) {
    let idp = Arc::new(idp);
    let svc = service_fn(move |req: Request<Body>| {
        let idp = Arc::clone(&idp);
        async move { Ok::<_, Infallible>(idp.answer(req).await) }
    });
    tokio::spawn(
        Server::from_listener(listener).serve(Router::new().route(Route::prefix("/"), svc)),
    );
}

/// What a route answers: who the auth layer said is calling.
fn hello(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
    std::future::ready(Ok(Response::new(Body::from("hello\n"))))
}

fn greet() -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Body>, Infallible>>,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(|req: Request<Body>| {
        let who = req.extensions().get::<Identity>().map_or_else(
            || "nobody".to_owned(),
            |id| {
                format!(
                    "{} (groups: {})",
                    id.name(),
                    id.groups().collect::<Vec<_>>().join(",")
                )
            },
        );
        std::future::ready(Ok(Response::new(Body::from(format!("hello {who}\n")))))
    })
}

/// The gateway's routes, verifying tokens with the JWKS at `jwks_url`.
fn app(jwks_url: &str, issuer: &str) -> Result<Router, Box<dyn std::error::Error>> {
    let jwks = Jwks::remote(jwks_url.parse()?)
        .refresh(Duration::from_secs(300))
        .start(HttpClient::builder().build()?)?;
    let jwt = Jwt::builder(jwks)
        .issuer(issuer)
        .audience("demo-api")
        .groups_claim("groups")
        .leeway(Duration::from_secs(30))
        .build()?;
    let keys = ApiKeys::new().consumer(
        Identity::consumer("billing").with_groups(["services"]),
        ["demo-key-0123456789"],
    );
    let api = ServiceBuilder::new()
        .layer(
            AuthLayer::new(jwt.clone())
                .or(KeyAuth::new(keys).hide_credentials(true))
                .anonymous(Identity::anonymous_as("guest")),
        )
        .service(greet());
    let admin = ServiceBuilder::new()
        .layer(AuthLayer::new(jwt))
        .layer(AclLayer::new(Acl::allow(["admins"])))
        .service(greet());
    Ok(Router::new()
        .route(Route::prefix("/public"), service_fn(hello))
        .route(Route::prefix("/api"), api)
        .route(Route::prefix("/admin"), admin))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let idp_listener = tokio::net::TcpListener::bind("127.0.0.1:9911").await?;
    serve_idp(Idp::new(ISSUER)?, idp_listener);
    let router = app(&format!("{ISSUER}/.well-known/jwks.json"), ISSUER)?;
    let server = Server::bind("127.0.0.1:8082").await?;
    let addr: SocketAddr = server.local_addr()?;
    println!("identity provider on {ISSUER} (/.well-known/jwks.json, /token?sub=NAME&groups=a,b)");
    println!("gateway listening on http://{addr} (/public, /api, /admin)");
    println!("  TOKEN=$(curl -s '{ISSUER}/token?sub=alice&groups=admins')");
    println!("  curl -i http://{addr}/api -H \"Authorization: Bearer $TOKEN\"");
    println!("  curl -i http://{addr}/api -H 'X-API-Key: demo-key-0123456789'");
    println!("  curl -i http://{addr}/admin -H \"Authorization: Bearer $TOKEN\"");
    server
        .serve(
            ServiceBuilder::new()
                .layer(RescueLayer::new())
                .service(router),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// The IdP on a free port, and the gateway's routes using it.
    async fn setup() -> (Arc<Idp>, Router) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let token_idp = Arc::new(Idp::new(&issuer).unwrap());
        let served = Arc::clone(&token_idp);
        let svc = service_fn(move |req: Request<Body>| {
            let idp = Arc::clone(&served);
            async move { Ok::<_, Infallible>(idp.answer(req).await) }
        });
        tokio::spawn(
            Server::from_listener(listener).serve(Router::new().route(Route::prefix("/"), svc)),
        );
        let app = app(&format!("{issuer}/.well-known/jwks.json"), &issuer).unwrap();
        (token_idp, app)
    }

    async fn call(
        app: &Router,
        path: &str,
        header: Option<(&str, String)>,
    ) -> (StatusCode, String) {
        let mut req = Request::get(path).header("host", "gw");
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let res = ServiceBuilder::new()
            .layer(RescueLayer::new())
            .service(app.clone())
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_curl_lines_answer_as_the_docs_say() {
        let (idp, app) = setup().await;
        let bearer = |t: String| Some(("authorization", format!("Bearer {t}")));
        let alice = idp.token("alice", &["admins"]).unwrap();
        let bob = idp.token("bob", &[]).unwrap();

        let (status, body) = call(&app, "/api", bearer(alice.clone())).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "hello alice (groups: admins)\n")
        );
        let key = Some(("x-api-key", "demo-key-0123456789".to_owned()));
        assert_eq!(
            call(&app, "/api", key).await.1,
            "hello billing (groups: services)\n"
        );
        assert_eq!(call(&app, "/api", None).await.1, "hello guest (groups: )\n");
        assert_eq!(
            call(&app, "/api", bearer("x.y.z".into())).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(call(&app, "/admin", bearer(alice)).await.0, StatusCode::OK);
        assert_eq!(
            call(&app, "/admin", bearer(bob)).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(call(&app, "/admin", None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&app, "/public", None).await.0, StatusCode::OK);

        // A token signed by another key with the same `kid` is refused.
        let other = Idp::new(&idp.issuer)
            .unwrap()
            .token("alice", &["admins"])
            .unwrap();
        assert_eq!(
            call(&app, "/admin", bearer(other)).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
}
