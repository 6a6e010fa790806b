//! A custom plugin: a tenant allow-list, written as one `Plugin` impl and mounted between
//! tower-http layers in front of the reverse proxy.
//!
//! The plugin
//! - rejects requests without an `X-Tenant` header (400, through `gateway_core::Error`),
//! - answers unknown tenants itself with a 403 and its own JSON body (`Flow::Respond`),
//! - carries the tenant and the start time in its `Ctx` from the request to the response,
//!   where it echoes the tenant and adds a `Server-Timing` entry.
//!
//! The same plugin is usable from a config file once registered, with its own typed config
//! section (see `plugins` and `CONFIG` below): `cargo run -p example-custom-plugin --
//! --from-config` serves the route from the config instead.
//!
//! ```text
//! cargo run -p example-custom-plugin
//! curl -i http://127.0.0.1:8081/orders -H 'X-Tenant: acme'      # 200, x-tenant: acme
//! curl -i http://127.0.0.1:8081/orders -H 'X-Tenant: mallory'   # 403 from the plugin
//! curl -i http://127.0.0.1:8081/orders                          # 400 problem+json
//! ```

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use gateway_core::registry::Registry;
use gateway_core::{Body, Error, ErrorKind, Flow, Plugin, PluginLayer, RescueLayer};
use gateway_proxy::config;
use gateway_proxy::{ReverseProxy, Route, Router, Server, Upstream};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, request, response};
use serde::Deserialize;
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_http::set_header::{SetRequestHeaderLayer, SetResponseHeaderLayer};
use tower_http::trace::TraceLayer;

const X_TENANT: HeaderName = HeaderName::from_static("x-tenant");

/// Lets through only the tenants it knows.
#[derive(Clone, Debug)]
struct TenantAllowList {
    tenants: Arc<HashSet<String>>,
}

/// What the plugin carries from the request to the response.
#[derive(Debug)]
struct TenantCtx {
    tenant: Option<HeaderValue>,
    started: Instant,
}

impl TenantAllowList {
    fn new<I: IntoIterator<Item = S>, S: Into<String>>(tenants: I) -> Self {
        Self {
            tenants: Arc::new(tenants.into_iter().map(Into::into).collect()),
        }
    }
}

/// The plugin's config section: `- tenant-allow-list: { tenants: [acme, globex] }`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantConfig {
    tenants: Vec<String>,
}

/// The plugins a config file may name: this one, registered with its config type in one
/// call.
fn plugins() -> Registry {
    let mut registry = Registry::new();
    registry.plugin("tenant-allow-list", |config: &TenantConfig| {
        Ok(TenantAllowList::new(config.tenants.iter().cloned()))
    });
    registry
}

/// The route of [`app`], from a config file: the plugin by its registered name.
const CONFIG: &str = "
listen: 127.0.0.1:8081
upstreams:
  orders:
    endpoints: ['${ORDERS_UPSTREAM}']
routes:
  - match: { path: / }
    upstream: orders
    plugins:
      - tenant-allow-list: { tenants: [acme, globex] }
";

/// The router [`CONFIG`] describes, with the orders upstream at `upstream`.
fn app_from_config(upstream: &str) -> Result<Router, config::ConfigError> {
    let env = |name: &str| (name == "ORDERS_UPSTREAM").then(|| upstream.to_owned());
    let parsed = config::parse("CONFIG", CONFIG, env, &plugins())?;
    Ok(config::build("CONFIG", &parsed)?.router)
}

impl Plugin for TenantAllowList {
    type Ctx = TenantCtx;
    const NAME: &'static str = "tenant-allow-list";

    fn new_ctx(&self) -> TenantCtx {
        TenantCtx {
            tenant: None,
            started: Instant::now(),
        }
    }

    async fn on_request(
        &self,
        req: &mut request::Parts,
        ctx: &mut TenantCtx,
    ) -> Result<Flow, Error> {
        let tenant = req
            .headers
            .get(&X_TENANT)
            .ok_or(Error::new(ErrorKind::BadRequest))?;
        let known = tenant.to_str().is_ok_and(|t| self.tenants.contains(t));
        if !known {
            let mut res = Response::new(Body::from(r#"{"error":"unknown tenant"}"#));
            *res.status_mut() = StatusCode::FORBIDDEN;
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(Flow::Respond(res));
        }
        ctx.tenant = Some(tenant.clone());
        Ok(Flow::Continue)
    }

    async fn on_response(
        &self,
        res: &mut response::Parts,
        ctx: &mut TenantCtx,
    ) -> Result<(), Error> {
        if let Some(tenant) = ctx.tenant.take() {
            res.headers.insert(X_TENANT, tenant);
        }
        let micros = ctx.started.elapsed().as_micros();
        let timing = format!("gateway;dur={}.{:03}", micros / 1000, micros % 1000);
        if let Ok(v) = HeaderValue::try_from(timing) {
            res.headers.append("server-timing", v);
        }
        Ok(())
    }
}

/// The stack: tower-http layers around the plugin, the proxy at the bottom.
fn app(upstream: Upstream) -> Router {
    let proxy = ReverseProxy::new(upstream);
    let api = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(SetRequestHeaderLayer::overriding(
            HeaderName::from_static("x-gateway"),
            HeaderValue::from_static("custom-plugin-example"),
        ))
        .layer(PluginLayer::new(TenantAllowList::new(["acme", "globex"])))
        .layer(SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        ))
        .service(proxy);
    Router::new().route(Route::prefix("/"), api)
}

/// A toy upstream that says which tenant and gateway it saw.
async fn toy_upstream() -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let svc = tower::service_fn(|req: Request<Body>| async move {
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        let body = format!(
            "orders of tenant {} (via {})\n",
            header("x-tenant"),
            header("x-gateway")
        );
        Ok::<_, Infallible>(Response::new(Body::from(body)))
    });
    tokio::spawn(async move {
        let _ = Server::from_listener(listener)
            .serve(Router::new().route(Route::prefix("/"), svc))
            .await;
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let upstream = toy_upstream().await?;
    let server = Server::bind("127.0.0.1:8081").await?;
    println!(
        "custom-plugin example listening on http://{}",
        server.local_addr()?
    );
    println!("  curl -i http://127.0.0.1:8081/orders -H 'X-Tenant: acme'");
    println!("  curl -i http://127.0.0.1:8081/orders -H 'X-Tenant: mallory'");
    // `-- --from-config`: the same route from `CONFIG`, the plugin by its registered name.
    let router = if std::env::args().any(|a| a == "--from-config") {
        app_from_config(&upstream.to_string())?
    } else {
        app(Upstream::single(&upstream.to_string())?)
    };
    let stack = ServiceBuilder::new()
        .layer(RescueLayer::new())
        .service(router);
    server.serve(stack).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::test_util::TestUpstream;
    use tower::ServiceExt;

    async fn call(upstream: &TestUpstream, tenant: Option<&'static str>) -> Response<Body> {
        let mut req = Request::get("/orders").header("host", "gw");
        if let Some(t) = tenant {
            req = req.header("x-tenant", t);
        }
        let stack = ServiceBuilder::new()
            .layer(RescueLayer::new())
            .service(app(Upstream::single(&upstream.url()).unwrap()));
        stack
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn known_tenants_pass_with_ctx_carried_to_the_response() {
        let up = TestUpstream::echo().await;
        let res = call(&up, Some("acme")).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-tenant"], "acme");
        assert!(
            res.headers()["server-timing"]
                .to_str()
                .unwrap()
                .starts_with("gateway;dur=")
        );
        // Layers outside and inside the plugin both ran.
        assert_eq!(res.headers()["x-content-type-options"], "nosniff");
        assert_eq!(
            up.last_request().header("x-gateway"),
            Some("custom-plugin-example")
        );
    }

    #[tokio::test]
    async fn unknown_tenants_get_the_plugins_own_answer() {
        let up = TestUpstream::echo().await;
        let res = call(&up, Some("mallory")).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(res.headers()["content-type"], "application/json");
        assert!(up.requests().is_empty());
    }

    /// The plugin configured from YAML by its registered name behaves as it does in code.
    #[tokio::test]
    async fn the_plugin_works_from_a_config_file() {
        let up = TestUpstream::echo().await;
        let app = app_from_config(&up.url()).unwrap();
        let call = |tenant: &'static str| {
            let req = Request::get("/orders")
                .header("host", "gw")
                .header("x-tenant", tenant)
                .body(Body::empty())
                .unwrap();
            ServiceBuilder::new()
                .layer(RescueLayer::new())
                .service(app.clone())
                .oneshot(req)
        };
        let res = call("mallory").await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert!(up.requests().is_empty());
        let res = call("globex").await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-tenant"], "globex");
        assert_eq!(up.requests().len(), 1);
    }

    #[tokio::test]
    async fn missing_tenant_is_a_problem_response() {
        let up = TestUpstream::echo().await;
        let res = call(&up, None).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert!(up.requests().is_empty());
    }
}
