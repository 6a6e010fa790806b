//! Allow or deny requests by the client's address ([`ClientIp`], as
//! [`SetClientIpLayer`](gateway_core::client_ip::SetClientIpLayer) resolved it from the
//! peer and trusted proxies only, so a forged `X-Forwarded-For` cannot pick its way in).
//!
//! With an allow list, only addresses in it pass; a deny list refuses the addresses in it;
//! both together allow the allow list minus the deny list. A refusal is a 403
//! problem+json, and so is a request with no resolved client address (the layer fails
//! closed when it is mounted without `SetClientIpLayer` in front).
//!
//! ```
//! use gateway_core::{Body, ClientIp};
//! use gateway_middleware::ip_filter::IpFilterLayer;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let filter = IpFilterLayer::new().allow("10.0.0.0/8".parse().unwrap());
//! let svc = ServiceBuilder::new().layer(filter).service(service_fn(|_: Request<Body>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
//! }));
//! let mut req = Request::new(Body::empty());
//! req.extensions_mut().insert(ClientIp::new("192.0.2.1".parse().unwrap(), false));
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::FORBIDDEN);
//! # }
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::{Body, BoxError, ClientIp, ErrorKind};
use http::{Request, Response};
use ipnet::IpNet;
use tower::{Layer, Service};

pub use crate::refuse::ResponseFuture;

/// Filters requests by client address; see the [module docs](self).
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct IpFilterLayer {
    rules: Arc<Rules>,
}

/// The service of [`IpFilterLayer`].
#[derive(Clone, Debug)]
pub struct IpFilter<S> {
    inner: S,
    rules: Arc<Rules>,
}

#[derive(Clone, Debug, Default)]
struct Rules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

// === impl IpFilterLayer ===

impl IpFilterLayer {
    /// No rules yet: everything passes until [`allow`](Self::allow) or [`deny`](Self::deny).
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets addresses in `net` through (and, once there is one allow rule, only those).
    ///
    /// ```
    /// use gateway_middleware::ip_filter::IpFilterLayer;
    /// let layer = IpFilterLayer::new().allow("10.0.0.0/8".parse().unwrap());
    /// # drop(layer);
    /// ```
    pub fn allow(mut self, net: IpNet) -> Self {
        Arc::make_mut(&mut self.rules).allow.push(net.trunc());
        self
    }

    /// Refuses addresses in `net`, even when an allow rule covers them.
    ///
    /// ```
    /// use gateway_middleware::ip_filter::IpFilterLayer;
    /// let layer = IpFilterLayer::new().deny("192.0.2.0/24".parse().unwrap());
    /// # drop(layer);
    /// ```
    pub fn deny(mut self, net: IpNet) -> Self {
        Arc::make_mut(&mut self.rules).deny.push(net.trunc());
        self
    }
}

impl<S> Layer<S> for IpFilterLayer {
    type Service = IpFilter<S>;

    fn layer(&self, inner: S) -> IpFilter<S> {
        IpFilter {
            inner,
            rules: Arc::clone(&self.rules),
        }
    }
}

// === impl Rules ===

impl Rules {
    fn admits(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen on an IPv6 socket is judged as the IPv4 address it is.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let allowed = self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip));
        allowed && !self.deny.iter().any(|n| n.contains(&ip))
    }
}

// === impl IpFilter ===

impl<S, B, ResB> Service<Request<B>> for IpFilter<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let client = req.extensions().get::<ClientIp>().map(ClientIp::ip);
        if !client.is_some_and(|ip| self.rules.admits(ip)) {
            tracing::debug!(client = ?client, "client address refused");
            return ResponseFuture::refused(ErrorKind::Forbidden);
        }
        ResponseFuture::called(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> Rules {
        let nets = |list: &[&str]| list.iter().map(|n| n.parse().unwrap()).collect();
        Rules {
            allow: nets(allow),
            deny: nets(deny),
        }
    }

    #[test]
    fn allow_then_deny() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let r = rules(&["10.0.0.0/8"], &["10.0.0.0/24"]);
        assert!(r.admits(ip("10.1.2.3")));
        assert!(!r.admits(ip("10.0.0.7")), "denied inside the allowed net");
        assert!(!r.admits(ip("192.0.2.1")), "outside the allow list");
        assert!(
            r.admits(ip("::ffff:10.1.2.3")),
            "mapped IPv4 is judged as IPv4"
        );
        let deny_only = rules(&[], &["2001:db8::/32"]);
        assert!(deny_only.admits(ip("192.0.2.1")));
        assert!(!deny_only.admits(ip("2001:db8::1")));
    }
}
