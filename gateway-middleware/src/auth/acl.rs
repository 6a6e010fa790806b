//! Allow or deny by the caller's groups, after authentication.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::metrics::Metrics;
use gateway_core::{BoxError, ErrorKind, Identity, LogFields, RouteId};
use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tower::{Layer, Service};

pub use crate::refuse::ResponseFuture;

/// Which groups may pass (Kong's `acl`): with an allow list, a caller in at least one of
/// its groups; with a deny list, a caller in none of its groups; with both, both.
///
/// It reads the [`Identity`] an [`AuthLayer`](super::AuthLayer) outside put in the request:
/// a caller in no allowed group (the anonymous one included, unless its groups are
/// allowed) gets a 403; a request that no auth layer identified gets a 401 (the ACL fails
/// closed when mounted without one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    allow: Vec<Arc<str>>,
    deny: Vec<Arc<str>>,
}

impl Acl {
    /// Lets only callers in one of `groups` through.
    pub fn allow<I, G>(groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<Arc<str>>,
    {
        Self::default().and_allow(groups)
    }

    /// Refuses callers in any of `groups`.
    pub fn deny<I, G>(groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<Arc<str>>,
    {
        Self::default().and_deny(groups)
    }

    /// Allows `groups` as well.
    #[must_use]
    pub fn and_allow<I, G>(mut self, groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<Arc<str>>,
    {
        self.allow.extend(groups.into_iter().map(Into::into));
        self
    }

    /// Denies `groups` as well.
    #[must_use]
    pub fn and_deny<I, G>(mut self, groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<Arc<str>>,
    {
        self.deny.extend(groups.into_iter().map(Into::into));
        self
    }

    /// Whether `identity` may pass.
    pub fn admits(&self, identity: &Identity) -> bool {
        let allowed = self.allow.is_empty() || self.allow.iter().any(|g| identity.in_group(g));
        allowed && !self.deny.iter().any(|g| identity.in_group(g))
    }
}

/// Applies an [`Acl`] to requests.
#[derive(Clone, Debug)]
#[must_use]
pub struct AclLayer {
    acl: Arc<Acl>,
    counters: Option<Arc<AclCounters>>,
}

/// The service of [`AclLayer`].
#[derive(Clone, Debug)]
pub struct AclService<S> {
    inner: S,
    acl: Arc<Acl>,
    counters: Option<Arc<AclCounters>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AclLabels {
    route: RouteId,
    decision: &'static str,
}

#[derive(Debug)]
struct AclCounters {
    allowed: Counter,
    denied: Counter,
    unidentified: Counter,
}

impl AclLayer {
    /// Applies `acl`.
    pub fn new(acl: Acl) -> Self {
        Self {
            acl: Arc::new(acl),
            counters: None,
        }
    }

    /// Counts decisions in `gateway_acl_decisions_total{route, decision}`.
    pub fn metrics(mut self, metrics: &Metrics, route: &str) -> Self {
        let family: Family<AclLabels, Counter> = metrics.family(
            "acl_decisions",
            "Requests an ACL let through (allowed) or refused (denied: 403, unidentified: 401).",
        );
        let route = RouteId::new(route);
        let series = |decision| {
            family
                .get_or_create(&AclLabels {
                    route: route.clone(),
                    decision,
                })
                .clone()
        };
        self.counters = Some(Arc::new(AclCounters {
            allowed: series("allowed"),
            denied: series("denied"),
            unidentified: series("unidentified"),
        }));
        self
    }
}

impl<S> Layer<S> for AclLayer {
    type Service = AclService<S>;

    fn layer(&self, inner: S) -> AclService<S> {
        AclService {
            inner,
            acl: Arc::clone(&self.acl),
            counters: self.counters.clone(),
        }
    }
}

impl<S, B, ResB> Service<Request<B>> for AclService<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<gateway_core::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (kind, decision) = match req.extensions().get::<Identity>() {
            Some(identity) if self.acl.admits(identity) => {
                if let Some(c) = &self.counters {
                    c.allowed.inc();
                }
                return ResponseFuture::called(self.inner.call(req));
            }
            Some(identity) => {
                tracing::debug!(consumer = identity.name(), "refused by the ACL");
                if let Some(c) = &self.counters {
                    c.denied.inc();
                }
                (ErrorKind::Forbidden, "denied")
            }
            None => {
                tracing::debug!("no identity for the ACL: is an auth layer outside it?");
                if let Some(c) = &self.counters {
                    c.unidentified.inc();
                }
                (ErrorKind::Unauthenticated, "unidentified")
            }
        };
        if let Some(log) = req.extensions().get::<LogFields>() {
            log.insert("acl", decision);
        }
        ResponseFuture::refused(kind)
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "allow {:?}, deny {:?}", self.allow, self.deny)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_and_deny_lists() {
        let admin = Identity::consumer("a").with_groups(["admins", "staff"]);
        let staff = Identity::consumer("s").with_groups(["staff"]);
        let nobody = Identity::consumer("n");
        let acl = Acl::allow(["admins"]);
        assert!(acl.admits(&admin));
        assert!(!acl.admits(&staff));
        assert!(!acl.admits(&nobody));
        let acl = Acl::deny(["admins"]);
        assert!(!acl.admits(&admin));
        assert!(acl.admits(&staff));
        assert!(acl.admits(&nobody));
        let acl = Acl::allow(["staff"]).and_deny(["admins"]);
        assert!(!acl.admits(&admin));
        assert!(acl.admits(&staff));
        assert!(!Acl::allow(["staff"]).admits(&Identity::anonymous()));
    }
}
