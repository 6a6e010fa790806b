//! Routes requests by host, normalized path and method to per-route service stacks.
//!
//! Before matching, the router checks the request's host (an HTTP/1.1 request must carry
//! exactly one valid `Host`; an absolute-form target must agree with it) and normalizes the
//! path once (see [`Router`]); the normalized path is written back into the request, so the
//! path the route was chosen for is exactly the path the upstream receives.
//!
//! # Matching
//!
//! - Host: exact (`api.example.com`), wildcard suffix (`*.example.com`, which matches
//!   `a.example.com` and `a.b.example.com` but not `example.com`), or any host. Ports and a
//!   trailing dot are ignored; case does not matter.
//! - Path: exact (`/health`) or prefix on segment boundaries (`/api` matches `/api`,
//!   `/api/` and `/api/x`, never `/apiadmin`).
//! - Method: any, or a listed set.
//!
//! The most specific matching route wins: first by host (exact, then the longest wildcard,
//! then any), then by path (exact, then the longest prefix), then by method (listed before
//! any). No match gives 404, a refused path or host 400, both as problem+json.
//!
//! # Example
//!
//! ```
//! use gateway_core::{Body, RouteId};
//! use gateway_proxy::router::{Route, Router};
//! use http::{Request, Response, StatusCode};
//! use std::convert::Infallible;
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let echo_path = service_fn(|req: Request<Body>| async move {
//!     Ok::<_, Infallible>(Response::new(Body::from(req.uri().path().to_owned())))
//! });
//! let router = Router::new()
//!     .route(Route::prefix("/api").id("api"), echo_path)
//!     .route(Route::exact("/health"), service_fn(|_| async {
//!         Ok::<_, Infallible>(Response::new(Body::from("ok")))
//!     }));
//!
//! let req = Request::get("/api/../api/%75sers").header("host", "gw").body(Body::empty()).unwrap();
//! let res = router.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.into_body().collect_bytes().await.unwrap(), "/api/users");
//!
//! let req = Request::get("/apiadmin").header("host", "gw").body(Body::empty()).unwrap();
//! assert_eq!(router.oneshot(req).await.unwrap().status(), StatusCode::NOT_FOUND);
//! # }
//! ```

#[cfg(test)]
mod fuzz;
mod host;
mod path;
mod route;
mod service;

pub use route::{InvalidRoute, Route};
pub use service::{ResponseFuture, Router};
