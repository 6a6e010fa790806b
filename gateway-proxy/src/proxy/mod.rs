//! A reverse proxy: forwards requests to an [`Upstream`](crate::Upstream) over pooled
//! connections and streams both bodies.
//!
//! HTTP/1.1 upstream connections are driven by the task of the request they carry (our own
//! codec on `httparse`; an idle connection is only its socket); HTTP/2 ones are hyper's.
//!
//! What it does on every hop (RFC 9110 §7.6.1):
//!
//! - removes every header named in `Connection`, then the hop-by-hop headers
//!   (`Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`,
//!   `Proxy-Authorization`, `Proxy-Authenticate`, `HTTP2-Settings`), in both directions,
//!   before adding any header of its own; `TE: trailers` is re-added when the client sent it;
//! - regenerates framing: `Content-Length` and `Transfer-Encoding` are never copied; each
//!   hop is framed from the body itself (responses to `HEAD` and 304s keep their length);
//!   an upstream answer that could be read two ways (`Content-Length` with
//!   `Transfer-Encoding`, differing lengths, codings other than `chunked`) is a 502, and
//!   its connection is closed;
//! - scrubs client-sent forwarding headers (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`, and
//!   look-alikes such as `X_Forwarded_For`) unless the peer is a trusted proxy (as resolved
//!   by [`SetClientIpLayer`](gateway_core::SetClientIpLayer)), then sets `X-Forwarded-For`,
//!   `-Proto`, `-Host`, and optionally `Forwarded` and `Via`;
//! - tunnels an HTTP/1.1 `Upgrade` (WebSocket) only once the upstream answered `101`; any
//!   other answer is an ordinary response and the client connection stays HTTP; `h2c`
//!   upgrades are never forwarded;
//! - passes trailers through (gRPC over HTTP/2 with [`HttpClientBuilder::http2_only`](crate::HttpClientBuilder::http2_only)).
//!
//! # Example
//!
//! ```
//! use gateway_core::Body;
//! use gateway_core::test_util::TestUpstream;
//! use gateway_proxy::{ReverseProxy, Upstream};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let upstream = TestUpstream::echo().await;
//! let proxy = ReverseProxy::builder(Upstream::single(&upstream.url()).unwrap())
//!     .strip_prefix("/api")
//!     .build()
//!     .unwrap();
//! let req = Request::get("/api/users?id=7").header("host", "gw").body(Body::empty()).unwrap();
//! let res = proxy.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(upstream.last_request().uri, "/users?id=7");
//! # }
//! ```
//!
//! # Errors
//!
//! Upstream-path failures are `BoxError`s carrying a [`gateway_core::Error`]:
//! an unreachable upstream is [`ErrorKind::UpstreamConnect`](gateway_core::ErrorKind)
//! (502), a broken exchange `BadGateway` (502), no response head within the timeout
//! `GatewayTimeout` (504), and an empty upstream `NoHealthyUpstream` (503). Retry and
//! breaker layers see them as errors; `RescueLayer` turns them into responses.

mod future;
pub(crate) mod headers;
mod service;

pub use future::ResponseFuture;
pub use service::{HostHeader, InvalidProxy, ReverseProxy, ReverseProxyBuilder};
