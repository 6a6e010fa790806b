//! The upstream side of the gateway: the reverse proxy, the router, upstreams and the
//! server runner.
//!
//! - [`ReverseProxy`]: forwards to an [`Upstream`] over connections pooled per endpoint
//!   (HTTP/1.1, HTTP/2, rustls), streaming bodies, WebSocket upgrades and trailers.
//! - [`Router`]: host + normalized path + method to per-route service stacks.
//! - [`respond`]: routes answered by the gateway itself (a fixed response, a redirect).
//! - [`Server`]: HTTP/1.1 and HTTP/2 (by ALPN or the first bytes), rustls termination, timeouts,
//!   connection limits and graceful shutdown.
//! - [`admin`]: the admin listener's service (`/metrics`, `/healthz`, `/readyz`, `/status`).

#![forbid(unsafe_code)]

pub mod admin;
mod buffers;
#[cfg(feature = "config")]
pub mod config;
mod crypto;
#[cfg(test)]
mod fuzz;
mod h1;
mod invalid;
mod io;
pub mod proxy;
pub mod respond;
pub mod router;
pub mod server;
mod task;
pub mod upgrade;
pub mod upstream;

pub use proxy::{HostHeader, ReverseProxy};
pub use router::{Route, Router};
pub use server::Server;
pub use upstream::{Endpoint, HttpClient, HttpClientBuilder, Upstream};

/// The README's composition example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
