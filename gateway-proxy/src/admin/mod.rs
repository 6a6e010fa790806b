//! The admin listener: metrics, probes and status, on an address of its own.
//!
//! [`Admin`] is a tower service for a second [`Server`](crate::Server), bound to a loopback
//! address by default, never to the public listener. It answers `GET` (and `HEAD`):
//!
//! | path | answer |
//! |---|---|
//! | `/` | the status page (HTML, with `/ui/status.css` and `/ui/status.js`): readiness, config, request rates, routes, upstreams with each endpoint's state; it refreshes itself from `/status` and `/metrics` |
//! | `/metrics` | every metric, in the Prometheus text format (OpenMetrics when `Accept` asks) |
//! | `/healthz` | `200 ok`: the process is alive |
//! | `/readyz` | `200 ready` when every server serves; `503` while starting or draining |
//! | `/status` | JSON: routes, upstreams with each endpoint's state, the config's version and reloads |
//! | `POST /cache/purge` | forgets cached responses, when given the caches ([`AdminBuilder::purgers`]; see below) |
//!
//! With a [token](AdminBuilder::token), every path requires `Authorization: Bearer <token>`,
//! or Basic credentials with the token as the password (what a browser sends after asking
//! for them); a 401 problem response otherwise. What `/status` shows is an [`Inventory`], kept
//! current by whoever builds the gateway (the config loader does on every reload).
//!
//! # Purging caches
//!
//! With the gateway's caches ([`Purgers`](gateway_core::purge::Purgers): the config lists
//! every `cache` section's store there), `POST /cache/purge` takes one of:
//!
//! - `url=<absolute URL>`: every stored variant of that URL
//!   (`url=https%3A%2F%2Fshop.example%2Fcart%3Fid%3D7`);
//! - `prefix=<absolute URL prefix>`: every URL starting with it
//!   (`prefix=https%3A%2F%2Fshop.example%2Fstatic%2F`);
//!
//! and `cache=<name>` to purge one cache only (all of them otherwise). Scheme and host
//! are matched as the cache keys them (lowercase, without the default port). The answer
//! is JSON: the keys each cache forgot (`{"prefix": "…", "purged": {"static": 12},
//! "failed": []}`), `502` when a cache's store could not be reached (it is named in
//! `failed`, the cause logged), `404` for a `cache` that does not exist, `400` for
//! anything else. The admin token, when set, is required as on every path.
//!
//! ```text
//! curl -X POST -H "Authorization: Bearer $TOKEN" \
//!   "http://127.0.0.1:9901/cache/purge?prefix=https%3A%2F%2Fshop.example%2Fstatic%2F"
//! ```
//!
//! # Example
//!
//! ```
//! use gateway_core::Body;
//! use gateway_core::metrics::Metrics;
//! use gateway_proxy::admin::{Admin, Inventory};
//! use gateway_proxy::server::Readiness;
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (metrics, inventory, readiness) = (Metrics::new(), Inventory::new(), Readiness::new());
//! inventory.register(&metrics);
//! let admin = Admin::builder(&metrics, &inventory, &readiness).token("s3cret").build();
//!
//! let req = Request::get("/readyz").body(Body::empty()).unwrap();
//! assert_eq!(admin.clone().oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//!
//! let req = Request::get("/readyz")
//!     .header("authorization", "Bearer s3cret")
//!     .body(Body::empty())
//!     .unwrap();
//! assert_eq!(admin.oneshot(req).await.unwrap().status(), StatusCode::OK);
//! # }
//! ```

mod inventory;
mod service;

pub use inventory::{ConfigStatus, Inventory, RouteInfo};
pub use service::{Admin, AdminBuilder};
