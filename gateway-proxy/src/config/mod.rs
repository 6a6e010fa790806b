//! The declarative config of a gateway: a YAML file of listeners, upstreams and routes that
//! maps one-to-one onto the public types a `main.rs` would compose by hand (nothing only a
//! config file can do).
//!
//! ```
//! use gateway_proxy::config;
//!
//! let yaml = "
//! listen: 127.0.0.1:8080
//! upstreams:
//!   api:
//!     endpoints: [http://127.0.0.1:9001, http://127.0.0.1:9002]
//!     balancer: least-request
//! routes:
//!   - match: { path: /api }      # /api and /api/..., never /apiadmin
//!     upstream: api
//!   - match: { path: /old }
//!     redirect: { to: /api, status: 308 }
//! ";
//! let plugins = gateway_core::registry::Registry::new();
//! let parsed = config::parse("gateway.yaml", yaml, |_| None, &plugins).unwrap();
//! assert_eq!(parsed.routes.len(), 2);
//!
//! // A mistake names the file, line, column and key path.
//! let yaml = "listen: x\nroutes:\n  - match: { paht: /a }\n";
//! let err = config::parse("gateway.yaml", yaml, |_| None, &plugins).unwrap_err();
//! assert_eq!(err.location(), Some((3, 14)));
//! assert_eq!(err.path(), "routes[0].match.paht");
//! ```
//!
//! [`read`] or [`parse`] a file into a [`Config`], then [`build`] it (inside a Tokio runtime:
//! upstreams start their health checks) into a [`Gateway`]: its router, trusted proxies and
//! server settings. `${VAR}` in the file is replaced by the environment variable (`${VAR:-x}`
//! with a default, `$$` for a `$`). Durations are written with a unit (`250ms`, `10s`, `5m`),
//! sizes as bytes or with one (`64KiB`, `10MB`).
//!
//! Every key, with its default, is in `docs/config.md`; the order a route's plugins should
//! be listed in, and why, in `docs/architecture.md`.

mod build;
mod live;
mod load;
mod schema;
mod units;

pub use build::{Gateway, build};
pub use gateway_core::units::{InvalidUnit, Period, Size};
pub use live::{Live, LiveRouter, ReloadStats};
pub use load::{ConfigError, Located, parse, read};
pub use schema::{
    AccessLogConfig, AccessLogFormat, AdminConfig, Balancer, Config, EndpointConfig, HashOn,
    HealthCheckConfig, MatchConfig, OtlpConfig, Outlier, PluginConfig, QueryLogging,
    RedirectConfig, ReplacePrefix, RespondConfig, RouteConfig, RouteTimeouts, ServerConfig,
    SpanLevel, SpanMode, TlsFiles, TracingConfig, UpstreamConfig, UpstreamTls,
};
pub use units::{Cidr, Url, http_url, is_address};
