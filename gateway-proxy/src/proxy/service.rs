use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::{Body, BoxError, ClientIp, ConnectInfo, Error, ErrorKind, TriedEndpoints};
use http::header::{CONNECTION, HOST, HeaderValue, TE, UPGRADE, VIA};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version, request};
use tower::Service;

use super::future::{ResponseFuture, UploadBody, Uploaded};
use super::headers::{self, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::h1::fields;
use crate::upgrade::OnUpgrade;
use crate::upstream::{Endpoint, InvalidEndpoint, Selected, Upstream};
use crate::upstream::{Forwarding, HttpClient, InvalidClient, Outbound};

/// Forwards requests to an [`Upstream`]; see the [module docs](super).
///
/// Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct ReverseProxy {
    pub(super) shared: Arc<Shared>,
}

/// Builds a [`ReverseProxy`].
#[derive(Clone)]
#[must_use]
pub struct ReverseProxyBuilder {
    upstream: Upstream,
    client: Option<HttpClient>,
    host: HostHeader,
    x_forwarded: bool,
    forwarded: bool,
    via: Option<String>,
    rewrite: Option<(String, String)>,
    response_header_timeout: Option<Duration>,
    body_idle_timeout: Option<Duration>,
    tunnel_idle_timeout: Option<Duration>,
    connect_retries: u8,
}

/// What `Host` the upstream receives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostHeader {
    /// The upstream endpoint's `host:port` (the default, like nginx and Kong).
    #[default]
    Upstream,
    /// The client's `Host`, unchanged (for upstreams that route on it).
    Preserve,
    /// A fixed value.
    Fixed(HeaderValue),
}

pub(super) struct Shared {
    pub(super) upstream: Upstream,
    pub(super) client: HttpClient,
    host: HostHeader,
    x_forwarded: bool,
    forwarded: bool,
    via: Option<[HeaderValue; 3]>,
    rewrite: Option<(String, String)>,
    pub(super) response_header_timeout: Option<Duration>,
    pub(super) body_idle_timeout: Option<Duration>,
    pub(super) tunnel_idle_timeout: Option<Duration>,
    /// Other endpoints a request whose connection could not be opened goes to.
    pub(super) connect_retries: u8,
}

// === impl ReverseProxy ===

impl ReverseProxy {
    /// A proxy to `upstream` with the default settings and a client of its own.
    ///
    /// # Panics
    ///
    /// Never in practice: the default client configuration always builds.
    pub fn new(upstream: Upstream) -> Self {
        Self::builder(upstream)
            .build()
            .unwrap_or_else(|e| unreachable!("the default client builds: {e}"))
    }

    /// A proxy to one upstream URL (`http://host:port`, `https://host`, or `host:port`).
    ///
    /// # Errors
    ///
    /// When `url` is not a valid upstream.
    pub fn to(url: &str) -> Result<Self, InvalidEndpoint> {
        Upstream::single(url).map(Self::new)
    }

    /// Starts a builder.
    pub fn builder(upstream: Upstream) -> ReverseProxyBuilder {
        ReverseProxyBuilder {
            upstream,
            client: None,
            host: HostHeader::default(),
            x_forwarded: true,
            forwarded: false,
            via: None,
            rewrite: None,
            response_header_timeout: Some(Duration::from_secs(60)),
            body_idle_timeout: Some(Duration::from_secs(60)),
            tunnel_idle_timeout: Some(Duration::from_secs(300)),
            connect_retries: 2,
        }
    }

    /// The upstream this proxy forwards to.
    pub fn upstream(&self) -> &Upstream {
        &self.shared.upstream
    }
}

impl fmt::Debug for ReverseProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReverseProxy")
            .field("upstream", &self.shared.upstream)
            .field("host", &self.shared.host)
            .finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for ReverseProxy
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The pool opens connections on demand; an unreachable upstream fails the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        let shared = &self.shared;
        let (mut head, body) = req.into_parts();
        let selected = match shared.upstream.select(&head) {
            Ok(s) => s,
            Err(err) => return ResponseFuture::failed(err),
        };
        let is_head = head.method == http::Method::HEAD;
        let (out, on_upgrade) = match shared.outbound(&mut head) {
            Ok(outbound) => outbound,
            Err(err) => return ResponseFuture::failed(err),
        };
        let (body, uploading) = shared.upload(body);
        let req = Request::from_parts(head, body);
        let fut = shared.client.send(selected.endpoint(), req, out);
        ResponseFuture::new(
            fut,
            Arc::clone(&self.shared),
            selected,
            is_head,
            on_upgrade,
            uploading,
        )
    }
}

/// The handover an upgrading request waits for, and the drain that tracks the tunnel.
type Upgrading = Option<(OnUpgrade, Option<gateway_core::Drain>)>;

fn via_for(via: &[HeaderValue; 3], version: Version) -> &HeaderValue {
    match version {
        Version::HTTP_10 => &via[0],
        Version::HTTP_2 => &via[2],
        _ => &via[1],
    }
}

// === impl Shared ===

impl Shared {
    /// Turns the client's request head into the upstream's: hop-by-hop fields out (but for
    /// an upgrade, and `TE: trailers`), this hop's forwarding fields and `Via` in, `Host` as
    /// configured, the path rewritten. What is added without being in the request goes to
    /// the [`Outbound`]; an upgrade takes its handover out of the extensions.
    #[inline]
    fn outbound(&self, head: &mut request::Parts) -> Result<(Outbound, Upgrading), Error> {
        let upgrade = if head.version == Version::HTTP_11 {
            fields::upgrade_request(&head.headers)
        } else {
            None
        };
        // The server's drain tracks the tunnel an upgrade becomes.
        let on_upgrade = upgrade.as_ref().and_then(|_| {
            let on_upgrade = head.extensions.remove::<OnUpgrade>()?;
            Some((
                on_upgrade,
                head.extensions.get::<gateway_core::Drain>().cloned(),
            ))
        });
        let te_trailers = fields::accepts_trailers(&head.headers);
        // The client's host, captured before `Connection` may nominate `Host` away.
        let client_host = head.headers.get(HOST).cloned().or_else(|| {
            head.uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });

        let mut out = Outbound::default();
        out.upgrade = upgrade.is_some();
        headers::strip_request(&mut head.headers);
        self.forwarding(head, client_host.as_ref(), &mut out);
        match &self.host {
            // The client sets the endpoint's `Host` (HTTP/1.1) or `:authority` (HTTP/2).
            HostHeader::Upstream => out.endpoint_host = true,
            HostHeader::Preserve => {
                if let Some(host) = client_host {
                    head.headers.insert(HOST, host);
                }
            }
            HostHeader::Fixed(host) => {
                head.headers.insert(HOST, host.clone());
            }
        }
        if let Some(protocol) = upgrade {
            head.headers.insert(UPGRADE, protocol);
            head.headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if te_trailers {
            head.headers
                .insert(TE, HeaderValue::from_static("trailers"));
        }
        if let Some(via) = &self.via {
            head.headers.append(VIA, via_for(via, head.version).clone());
        }
        head.uri = Uri::from(self.rewrite_path(&head.uri)?);
        Ok((out, on_upgrade))
    }

    /// The request body as it goes upstream: under the body idle timeout and, if it still
    /// streams in from the client, watched, so that the response-header timer waits for its
    /// end and its failure is the client's (see `future::Uploaded`).
    #[inline]
    fn upload<B>(&self, body: B) -> (Body, Option<Arc<Uploaded>>)
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut body = Body::new(body);
        if let Some(idle) = self.body_idle_timeout {
            body = body.idle_timeout(idle);
        }
        if body.is_complete() {
            return (body, None);
        }
        let (body, uploaded) = UploadBody::new(body);
        (Body::new(body), Some(uploaded))
    }

    /// The endpoint for a request whose connection to `failed` could not be opened: one
    /// not tried yet for it, with the request (which now lists `failed` as tried); `None`
    /// when every endpoint has been.
    pub(super) fn fail_over(
        &self,
        failed: &Endpoint,
        req: Request<Body>,
    ) -> Option<(Selected, Request<Body>)> {
        let (mut head, body) = req.into_parts();
        if head.extensions.get::<TriedEndpoints>().is_none() {
            // NOTE: with a list, the balancer added `failed` when it picked it.
            let tried = TriedEndpoints::new();
            tried
                .lock()
                .push(failed.id(), Some(failed.authority().clone()));
            head.extensions.insert(tried);
        }
        let tried = head.extensions.get::<TriedEndpoints>()?;
        let untried = {
            let tried = tried.lock();
            self.upstream
                .endpoints()
                .iter()
                .any(|e| !tried.ids().contains(&e.id()) && !tried.barred().contains(&e.id()))
        };
        if !untried {
            return None;
        }
        let next = self.upstream.select(&head).ok()?;
        let id = next.endpoint().id();
        // The untried ones are unavailable (ejected, unhealthy): the balancer picked one
        // tried already.
        if tried.lock().ids().iter().filter(|&&i| i == id).count() > 1 {
            return None;
        }
        Some((next, Request::from_parts(head, body)))
    }

    /// Scrubs client-sent forwarding headers and adds this hop's: to `out` where the request
    /// does not have them, to the request where this hop extends them.
    fn forwarding(
        &self,
        head: &mut request::Parts,
        client_host: Option<&HeaderValue>,
        out: &mut Outbound,
    ) {
        let conn = head.extensions.get::<ConnectInfo>().copied();
        let client = head.extensions.get::<ClientIp>().copied();
        let trusted = client.is_some_and(|c| c.trusted_peer());
        headers::scrub_forwarding(&mut head.headers, trusted);
        let peer = conn.map(|c| c.peer.ip()).or(client.map(|c| c.ip()));
        let proto = if conn.is_some_and(|c| c.tls) {
            "https"
        } else {
            "http"
        };
        // NOTE: from an untrusted peer, `scrub_forwarding` has removed every forwarding
        // header, so the request has none of those added to `out`.
        if self.x_forwarded {
            if let Some(peer) = peer {
                if trusted {
                    headers::append_forwarded_for(&mut head.headers, peer);
                } else {
                    out.add(Forwarding::For, headers::ip_value(peer));
                }
            }
            if !(trusted && head.headers.contains_key(X_FORWARDED_PROTO)) {
                out.add(Forwarding::Proto, HeaderValue::from_static(proto));
            }
            if !(trusted && head.headers.contains_key(X_FORWARDED_HOST))
                && let Some(host) = client_host
            {
                out.add(Forwarding::Host, host.clone());
            }
        }
        if self.forwarded {
            headers::append_forwarded(&mut head.headers, peer, proto, client_host);
        }
    }

    fn rewrite_path(&self, uri: &Uri) -> Result<PathAndQuery, Error> {
        let Some((from, to)) = &self.rewrite else {
            return Ok(uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")));
        };
        let path = uri.path();
        let rest = match path.strip_prefix(from.as_str()) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') || from == "/" => rest,
            _ => {
                return Ok(uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")));
            }
        };
        let mut new =
            String::with_capacity(to.len() + rest.len() + 1 + uri.query().map_or(0, str::len));
        new.push_str(to.trim_end_matches('/'));
        if !rest.starts_with('/') {
            new.push('/');
        }
        new.push_str(rest);
        if let Some(q) = uri.query() {
            new.push('?');
            new.push_str(q);
        }
        PathAndQuery::try_from(new).map_err(|e| Error::with_source(ErrorKind::BadRequest, e))
    }
}

// === impl ReverseProxyBuilder ===

impl ReverseProxyBuilder {
    /// Uses `client` (and its connection pool), e.g. one client shared by every route.
    ///
    /// ```
    /// use gateway_proxy::{HttpClient, ReverseProxy, Upstream};
    /// let client = HttpClient::builder().build().unwrap();
    /// let a = ReverseProxy::builder(Upstream::single("a:80").unwrap()).client(client.clone()).build().unwrap();
    /// let b = ReverseProxy::builder(Upstream::single("b:80").unwrap()).client(client).build().unwrap();
    /// # drop((a, b));
    /// ```
    pub fn client(mut self, client: HttpClient) -> Self {
        self.client = Some(client);
        self
    }

    /// What `Host` the upstream receives (default: the endpoint's authority).
    ///
    /// ```
    /// use gateway_proxy::{HostHeader, ReverseProxy, Upstream};
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).host(HostHeader::Preserve);
    /// ```
    pub fn host(mut self, host: HostHeader) -> Self {
        self.host = host;
        self
    }

    /// Whether to set `X-Forwarded-For`, `-Proto` and `-Host` (default yes). Client-sent
    /// forwarding headers are scrubbed either way unless the peer is a trusted proxy.
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream};
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).x_forwarded(false);
    /// ```
    pub fn x_forwarded(mut self, enabled: bool) -> Self {
        self.x_forwarded = enabled;
        self
    }

    /// Whether to append an RFC 7239 `Forwarded` element (default no).
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream};
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).forwarded(true);
    /// ```
    pub fn forwarded(mut self, enabled: bool) -> Self {
        self.forwarded = enabled;
        self
    }

    /// Appends `Via: <version> <pseudonym>` to requests and responses (default off).
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream};
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).via("gateway");
    /// ```
    pub fn via(mut self, pseudonym: impl Into<String>) -> Self {
        self.via = Some(pseudonym.into());
        self
    }

    /// Removes `prefix` (on a segment boundary) from the path before forwarding:
    /// `/api/users` → `/users`.
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream};
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).strip_prefix("/api");
    /// ```
    pub fn strip_prefix(self, prefix: &str) -> Self {
        self.replace_prefix(prefix, "/")
    }

    /// Replaces `from` (on a segment boundary) with `to`: `/v1/x` → `/internal/v1/x`.
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream};
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).replace_prefix("/v1", "/internal/v1");
    /// ```
    pub fn replace_prefix(mut self, from: &str, to: &str) -> Self {
        let norm = |p: &str| {
            let p = p.trim_end_matches('/');
            if p.starts_with('/') {
                p.to_owned()
            } else {
                format!("/{p}")
            }
        };
        self.rewrite = Some((norm(from), norm(to)));
        self
    }

    /// How long to wait for the upstream's response head once the request is sent (default
    /// 60 s); `None` waits forever. Elapsed → 504.
    ///
    /// A request body that streams from the client is sent when its last byte is: the timer
    /// starts then, so a slow upload is never the upstream's timeout.
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream}; use std::time::Duration;
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).response_header_timeout(Some(Duration::from_secs(5)));
    /// ```
    pub fn response_header_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.response_header_timeout = timeout;
        self
    }

    /// How long either body may go without data (default 60 s); `None` waits forever. A
    /// stalled request body fails the upstream request; a stalled response body aborts the
    /// client's response.
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream}; use std::time::Duration;
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).body_idle_timeout(Some(Duration::from_secs(30)));
    /// ```
    pub fn body_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.body_idle_timeout = timeout;
        self
    }

    /// How long an upgraded connection (a WebSocket, say) may carry no bytes in either
    /// direction before both sides are closed (default 5 min); `None` keeps idle tunnels
    /// open until a side closes them, or the server drains.
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream}; use std::time::Duration;
    /// ReverseProxy::builder(Upstream::single("a:80").unwrap()).tunnel_idle_timeout(Some(Duration::from_secs(60)));
    /// ```
    pub fn tunnel_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.tunnel_idle_timeout = timeout;
        self
    }

    /// How many other endpoints a request is sent to when its connection could not be
    /// opened [default: 2; 0 turns it off].
    ///
    /// Nothing of such a request left the gateway, so any request, a `POST` included, is
    /// safe to send elsewhere, at once and without copying its body: the failover nginx
    /// (`proxy_next_upstream error`) and Kong make by default. Each endpoint is tried once
    /// per request ([`TriedEndpoints`](gateway_core::TriedEndpoints)), and the failure
    /// counts against the endpoint (passive health). Everything else, and any failure
    /// after the request was sent, is the [retry layer](https://docs.rs/gateway-middleware)'s
    /// decision.
    ///
    /// ```
    /// # use gateway_proxy::{ReverseProxy, Upstream};
    /// let upstream = Upstream::round_robin(["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]).unwrap();
    /// ReverseProxy::builder(upstream).connect_retries(1);
    /// ```
    pub fn connect_retries(mut self, others: u8) -> Self {
        self.connect_retries = others;
        self
    }

    /// Builds the proxy.
    ///
    /// # Errors
    ///
    /// When no client was given and the default one cannot be built, or the `Via`
    /// pseudonym is not a valid header value; the cause is the error's `source`.
    pub fn build(self) -> Result<ReverseProxy, InvalidProxy> {
        let client = match &self.client {
            Some(c) => c.clone(),
            None => HttpClient::builder()
                .build()
                .map_err(InvalidProxy::Client)?,
        };
        let via = match &self.via {
            None => None,
            Some(p) => {
                let v = |ver: &str| {
                    HeaderValue::try_from(format!("{ver} {p}"))
                        .map_err(|e| InvalidProxy::Via(p.clone(), e))
                };
                Some([v("1.0")?, v("1.1")?, v("2")?])
            }
        };
        Ok(ReverseProxy {
            shared: Arc::new(Shared {
                upstream: self.upstream.clone(),
                client,
                host: self.host.clone(),
                x_forwarded: self.x_forwarded,
                forwarded: self.forwarded,
                via,
                rewrite: self.rewrite.clone(),
                response_header_timeout: self.response_header_timeout,
                body_idle_timeout: self.body_idle_timeout,
                tunnel_idle_timeout: self.tunnel_idle_timeout,
                connect_retries: self.connect_retries,
            }),
        })
    }
}

/// Why a [`ReverseProxy`] could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum InvalidProxy {
    /// The default client could not be built.
    Client(InvalidClient),
    /// The `Via` pseudonym is not a valid header value.
    Via(String, http::header::InvalidHeaderValue),
}

impl fmt::Display for InvalidProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Client(_) => f.write_str("invalid reverse proxy: its client cannot be built"),
            Self::Via(pseudonym, _) => {
                write!(
                    f,
                    "invalid reverse proxy: the Via pseudonym `{pseudonym}` is not a header value"
                )
            }
        }
    }
}

impl std::error::Error for InvalidProxy {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Client(err) => Some(err),
            Self::Via(_, err) => Some(err),
        }
    }
}

impl fmt::Debug for ReverseProxyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReverseProxyBuilder")
            .field("upstream", &self.upstream)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn via_response(&self, version: Version) -> Option<&HeaderValue> {
        self.via.as_ref().map(|v| via_for(v, version))
    }
}
