//! From a parsed config to what serves it: the upstreams, the router, and the server's
//! settings; and the checks parsing cannot make (a route's upstream must exist, a route has
//! exactly one target, ...).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gateway_core::client_ip::TrustedProxies;
use gateway_core::registry::{RouteLayer, RouteService, Section, Upstreams};
use gateway_core::{Body, RouteId};
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};

use super::load::{ConfigError, Located};
use super::schema::{
    AccessLogConfig, AdminConfig, Balancer, Config, EndpointConfig, HashOn, HealthCheckConfig,
    Outlier, RouteConfig, ServerConfig, TracingConfig, UpstreamConfig, UpstreamTls,
};
use crate::admin::{ConfigStatus, Inventory, RouteInfo};
use crate::invalid::chain;
use crate::proxy::HostHeader;
use crate::respond::{Redirect, Respond};
use crate::server::TlsConfig;
use crate::upstream::{
    ConsistentHash, DnsDiscovery, Endpoint, HashKey, HealthCheck, HttpClient, LeastRequest,
    OutlierDetection, PeakEwma, Random, RoundRobin, Upstream,
};
use crate::{ReverseProxy, Route, Router, Server};

/// A config made into what serves it.
#[derive(Debug)]
pub struct Gateway {
    /// Where to listen, as the file says it (a host name is resolved when binding).
    pub listen: String,
    /// The routes.
    pub router: Router,
    /// Whose forwarding headers are believed.
    pub trusted: TrustedProxies,
    /// The admin listener, when the config has one.
    pub admin: Option<AdminConfig>,
    /// The access log, when the config has one (made by the binary: the layer lives in
    /// `gateway-middleware`).
    pub access_log: Option<AccessLogConfig>,
    /// Request spans and trace context, when the config has them.
    pub tracing: Option<TracingConfig>,
    /// The routes and upstreams built, for the admin listener (a [`Live`](super::Live)
    /// config keeps it current across reloads).
    pub inventory: Inventory,
    server: ServerConfig,
    tls: Option<TlsConfig>,
}

impl Gateway {
    /// Applies the config's server settings (timeouts, limits, drain, TLS) to `server`.
    pub fn configure(&self, mut server: Server) -> Server {
        let s = &self.server;
        if let Some(t) = s.header_read_timeout {
            server = server.header_read_timeout(Some(t.into()));
        }
        if let Some(t) = s.keep_alive_timeout {
            server = server.keep_alive_timeout(Some(t.into()));
        }
        if let Some(t) = s.write_timeout {
            server = server.write_timeout(Some(t.into()));
        }
        if let Some(t) = s.drain_timeout {
            server = server.drain_timeout(t.into());
        }
        if let Some(n) = s.max_connections {
            server = server.max_connections(n);
        }
        if let Some(n) = s.max_headers {
            server = server.max_headers(n);
        }
        if let Some(n) = s.max_header_bytes {
            server = server.max_header_bytes(usize::try_from(n.0).unwrap_or(usize::MAX));
        }
        if let Some(tls) = &self.tls {
            server = server.tls(tls.clone());
        }
        server
    }

    /// Whether the listener serves HTTPS.
    pub const fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Builds what `config` (read from `file`, named in errors) describes. Upstreams start their
/// health checks and discovery here, so call it inside a Tokio runtime.
///
/// # Errors
///
/// The first part of the config that cannot be used, with where it is.
pub fn build(file: &str, config: &Config) -> Result<Gateway, ConfigError> {
    build_from(file, config, &Parts::default()).map(|(gateway, _)| gateway)
}

/// What a build made that the next one may keep, by key: upstreams by name (their endpoint
/// state and running health checks), and plugin layers by route and place (the state their
/// services share: a factory's layer holds it).
#[derive(Default)]
pub(super) struct Parts {
    upstreams: BTreeMap<String, (UpstreamConfig, Built)>,
    layers: HashMap<(String, usize), Kept>,
}

/// A plugin layer a build made, with what it was made of.
struct Kept {
    section: Section,
    layer: RouteLayer,
    /// The upstreams the layer was lent (a breaker's fallback), as they were configured:
    /// when one changes, the layer is made again, not kept with the old one.
    lent: Vec<(String, UpstreamConfig)>,
}

/// Where a build's plugin layers come from and go.
struct Layers<'a> {
    previous: &'a HashMap<(String, usize), Kept>,
    next: HashMap<(String, usize), Kept>,
    /// The config's upstreams, for layers that send requests elsewhere.
    upstreams: Upstreams,
    configs: &'a BTreeMap<String, (UpstreamConfig, Built)>,
}

/// The upstreams of a config as services for its layers (a breaker's fallback): a proxy
/// to each, with the default settings and the upstream's own client.
fn lend(upstreams: &BTreeMap<String, (UpstreamConfig, Built)>) -> Upstreams {
    let built: BTreeMap<String, Built> = upstreams
        .iter()
        .map(|(name, (_, built))| (name.clone(), built.clone()))
        .collect();
    Arc::new(move |name: &str| {
        let proxy = built.get(name)?.proxy().build().ok()?;
        Some(RouteService::new(proxy))
    })
}

/// Builds `config` as [`build`] does, keeping from `previous` every upstream and plugin
/// layer whose key and config did not change; what it made, for the next build.
pub(super) fn build_from(
    file: &str,
    config: &Config,
    previous: &Parts,
) -> Result<(Gateway, Parts), ConfigError> {
    let err = |path: &str, message: String| ConfigError::new(file, None, path, message);
    let tls = match &config.server.tls {
        Some(files) => Some(
            TlsConfig::from_pem_files(&files.cert, &files.key)
                .map_err(|e| err("server.tls", chain(&e)))?,
        ),
        None => None,
    };
    let mut trusted = TrustedProxies::builder();
    for cidr in &config.server.trusted_proxies {
        trusted = trusted.cidr(cidr.0.as_str());
    }
    let trusted = trusted
        .build()
        .map_err(|e| err("server.trusted_proxies", chain(&e)))?;
    let mut upstreams = BTreeMap::new();
    for (name, up) in &config.upstreams {
        let built = match previous.upstreams.get(name) {
            Some((old, built)) if old == up => built.clone(),
            _ => {
                let path = format!("upstreams.{name}");
                upstream(up).map_err(|message| err(&path, message))?
            }
        };
        upstreams.insert(name.clone(), (up.clone(), built));
    }
    let mut layers = Layers {
        previous: &previous.layers,
        next: HashMap::new(),
        upstreams: lend(&upstreams),
        configs: &upstreams,
    };
    let mut router = Router::new();
    for (index, route) in config.routes.iter().enumerate() {
        router = add_route(file, router, index, route, &upstreams, &mut layers)?;
    }
    if let Some(tracing) = &config.tracing
        && tracing.otlp.is_some()
        && !tracing.trace_context
    {
        return Err(err(
            "tracing.otlp",
            "exporting spans needs `trace_context: true` (a span's ids are its trace context)"
                .into(),
        ));
    }
    if let Some(admin) = &config.admin {
        check_admin(admin).map_err(|(key, message)| err(&format!("admin.{key}"), message))?;
    }
    let layers = layers.next;
    let parts = Parts { upstreams, layers };
    let inventory = Inventory::new();
    let (routes, upstreams) = inventory_of(config, &parts);
    inventory.set_routes(routes);
    inventory.set_upstreams(upstreams);
    let mut status = ConfigStatus::new(file, 1);
    status.last_applied = Some(std::time::SystemTime::now());
    inventory.set_config(status);
    let gateway = Gateway {
        listen: config.listen.clone(),
        router,
        trusted,
        admin: config.admin.clone(),
        access_log: config.access_log.clone(),
        tracing: config.tracing.clone(),
        inventory,
        server: config.server.clone(),
        tls,
    };
    Ok((gateway, parts))
}

/// An upstream and the client its proxies use (its own when it has TLS settings).
#[derive(Clone)]
struct Built {
    upstream: Upstream,
    client: Option<HttpClient>,
}

impl Built {
    /// A proxy to the upstream, with its client when it has one of its own.
    fn proxy(&self) -> crate::proxy::ReverseProxyBuilder {
        let proxy = ReverseProxy::builder(self.upstream.clone());
        match &self.client {
            Some(client) => proxy.client(client.clone()),
            None => proxy,
        }
    }
}

fn upstream(config: &UpstreamConfig) -> Result<Built, String> {
    if config.endpoints.is_empty() && config.dns_refresh.is_none() {
        return Err("endpoints: an upstream needs at least one endpoint".into());
    }
    let client = match &config.tls {
        Some(tls) => Some(client(tls)?),
        None => None,
    };
    let (fixed, discovered) = endpoints(config)?;
    let mut builder = match &config.balancer {
        Balancer::RoundRobin => Upstream::builder(fixed, RoundRobin::default()),
        Balancer::Random => Upstream::builder(fixed, Random::default()),
        Balancer::LeastRequest => Upstream::builder(fixed, LeastRequest::default()),
        Balancer::Ewma => Upstream::builder(fixed, PeakEwma::default()),
        Balancer::Hash(on) => Upstream::builder(fixed, ConsistentHash::new(hash_key(on)?)),
    };
    for dns in discovered {
        builder = builder.discover(dns);
    }
    if let Some(check) = &config.health_check {
        builder = builder.health_check(health_check(check, client.as_ref())?);
    }
    if let Outlier::On {
        consecutive_failures,
    } = config.outlier_detection
        && consecutive_failures > 0
    {
        builder = builder.outlier_detection(OutlierDetection::new(consecutive_failures));
    }
    if let Some(window) = config.slow_start {
        builder = builder.slow_start(window.into());
    }
    Ok(Built {
        upstream: builder.build(),
        client,
    })
}

/// The client of an upstream with TLS settings of its own.
fn client(tls: &UpstreamTls) -> Result<HttpClient, String> {
    let mut client = HttpClient::builder();
    if let Some(roots) = tls.webpki_roots {
        client = client.webpki_roots(roots);
    }
    if let Some(ca) = &tls.ca {
        client = client
            .add_root_pem_file(ca)
            .map_err(|e| format!("tls.ca: {}", chain(&e)))?;
    }
    client.build().map_err(|e| format!("tls: {}", chain(&e)))
}

/// The fixed endpoints, and the discovery of those given by host name when `dns_refresh`
/// asks for it.
fn endpoints(config: &UpstreamConfig) -> Result<(Vec<Endpoint>, Vec<DnsDiscovery>), String> {
    let mut fixed = Vec::new();
    let mut discovered = Vec::new();
    for (index, endpoint) in config.endpoints.iter().enumerate() {
        let (url, weight) = match endpoint {
            EndpointConfig::Url(url) => (&url.0, None),
            EndpointConfig::Weighted { url, weight } => (&url.0, Some(*weight)),
        };
        let bad = |e: &dyn std::error::Error| format!("endpoints[{index}]: {}", chain(e));
        let mut parsed: Endpoint = url.parse().map_err(|e| bad(&e))?;
        let by_name = parsed
            .authority()
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_err();
        match config.dns_refresh {
            Some(every) if by_name && parsed.scheme() == &http::uri::Scheme::HTTP => {
                let mut dns = DnsDiscovery::new(url)
                    .map_err(|e| bad(&e))?
                    .interval(every.into());
                if let Some(weight) = weight {
                    dns = dns.weight(weight);
                }
                discovered.push(dns);
            }
            _ => {
                if let Some(weight) = weight {
                    parsed = parsed.with_weight(weight);
                }
                fixed.push(parsed);
            }
        }
    }
    Ok((fixed, discovered))
}

fn hash_key(on: &HashOn) -> Result<HashKey, String> {
    Ok(match on {
        HashOn::ClientIp => HashKey::ClientIp,
        HashOn::Path => HashKey::Path,
        HashOn::Header(name) => HashKey::Header(
            http::header::HeaderName::try_from(name.as_str())
                .map_err(|_| format!("balancer.hash.header: `{name}` is not a header name"))?,
        ),
        HashOn::Cookie(name) if !name.is_empty() => HashKey::Cookie(name.clone()),
        HashOn::Cookie(_) => return Err("balancer.hash.cookie: the name is empty".into()),
    })
}

fn health_check(
    check: &HealthCheckConfig,
    client: Option<&HttpClient>,
) -> Result<HealthCheck, String> {
    let mut probe =
        HealthCheck::http(&check.path).map_err(|e| format!("health_check.path: {}", chain(&e)))?;
    let interval: Duration = check.interval.map_or(Duration::from_secs(10), Into::into);
    if interval.is_zero() {
        return Err("health_check.interval: must be more than 0".into());
    }
    probe = probe.interval(interval).jitter(interval / 10);
    if let Some(timeout) = check.timeout {
        probe = probe.timeout(timeout.into());
    }
    if let Some(n) = check.healthy_threshold {
        probe = probe.healthy_threshold(n);
    }
    if let Some(n) = check.unhealthy_threshold {
        probe = probe.unhealthy_threshold(n);
    }
    if let Some(client) = client {
        probe = probe.client(client.clone());
    }
    Ok(probe)
}

fn add_route(
    file: &str,
    router: Router,
    index: usize,
    located: &Located<RouteConfig>,
    upstreams: &BTreeMap<String, (UpstreamConfig, Built)>,
    layers: &mut Layers<'_>,
) -> Result<Router, ConfigError> {
    let config = &located.value;
    // Where a route's mistake is, when nothing more precise is known: the route itself.
    let here = located.location();
    let at = |key: &str| {
        if key.is_empty() {
            format!("routes[{index}]")
        } else {
            format!("routes[{index}].{key}")
        }
    };
    let err = |(key, message): (&str, String)| ConfigError::new(file, here, at(key), message);
    let mistake = |m: Mistake| ConfigError::new(file, m.at.or(here), at(&m.key), m.message);
    let id = config
        .id
        .clone()
        .unwrap_or_else(|| format!("routes[{index}]"));
    let route = route(config).map_err(err)?.id(id.as_str());
    let added = match (&config.upstream, &config.redirect, &config.respond) {
        (Some(name), None, None) => {
            let Some((_, built)) = upstreams.get(name.value.as_str()) else {
                let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                let message = format!(
                    "no upstream is named `{}` (there are: {})",
                    name.value,
                    known.join(", ")
                );
                return Err(ConfigError::at(file, name, at("upstream"), message));
            };
            let proxy = proxy(config, built).map_err(err)?;
            mount(router, route, proxy, config, &id, layers)
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            match fixed_answer(config).map_err(err)? {
                Answer::Redirect(redirect) => mount(router, route, redirect, config, &id, layers),
                Answer::Respond(respond) => mount(router, route, respond, config, &id, layers),
            }
        }
        _ => {
            let message = "a route needs exactly one of `upstream`, `redirect` and `respond`";
            return Err(err(("", message.to_owned())));
        }
    };
    added.map_err(mistake)
}

/// What a route matches; the failing key and why.
fn route(config: &RouteConfig) -> Result<Route, Wrong> {
    let m = &config.matches;
    let mut route = match (&m.path, &m.exact) {
        (Some(_), Some(_)) => {
            return Err(("match", "`path` and `exact` cannot go together".into()));
        }
        (Some(prefix), None) => Route::prefix(prefix.as_str()),
        (None, Some(exact)) => Route::exact(exact.as_str()),
        (None, None) => Route::prefix("/"),
    };
    if let Some(host) = &m.host {
        route = route.host(host);
    }
    for method in &m.methods {
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| ("match.methods", format!("`{method}` is not a method")))?;
        route = route.method(method);
    }
    Ok(route)
}

/// A key under a route that is wrong, and why.
type Wrong = (&'static str, String);

/// The answer of a route without an upstream.
enum Answer {
    Redirect(Redirect),
    Respond(Respond),
}

fn fixed_answer(config: &RouteConfig) -> Result<Answer, Wrong> {
    if let Some(redirect) = &config.redirect {
        let status = StatusCode::from_u16(redirect.status.unwrap_or(308))
            .ok()
            .filter(|s| matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308))
            .ok_or_else(|| {
                (
                    "redirect.status",
                    "must be 301, 302, 303, 307 or 308".into(),
                )
            })?;
        let to = &redirect.to;
        let location_ok = to.starts_with('/') && !to.starts_with("//")
            || to.starts_with("http://")
            || to.starts_with("https://");
        let location = Uri::try_from(to.as_str())
            .ok()
            .filter(|uri| location_ok && HeaderValue::try_from(uri.to_string()).is_ok())
            .ok_or_else(|| {
                let why = format!("`{to}` is not a path (`/x`) or an http(s) URL");
                ("redirect.to", why)
            })?;
        return Ok(Answer::Redirect(Redirect::with_status_code(
            status, location,
        )));
    }
    let respond = config.respond.as_ref().ok_or(("", String::new()))?;
    let status = StatusCode::from_u16(respond.status.unwrap_or(200))
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or_else(|| {
            (
                "respond.status",
                "must be a final status, 200 to 599".into(),
            )
        })?;
    let content_type = respond
        .content_type
        .as_deref()
        .unwrap_or("text/plain; charset=utf-8");
    let content_type = HeaderValue::from_str(content_type).map_err(|_| {
        let why = format!("`{content_type}` is not a header value");
        ("respond.content_type", why)
    })?;
    Ok(Answer::Respond(
        Respond::new(status)
            .header(CONTENT_TYPE, content_type)
            .body(respond.body.clone()),
    ))
}

/// Adds `service` as `route`, under the route's plugins (outermost first). A route without
/// plugins keeps its service's own type; one with plugins is boxed, as their layers are.
fn mount<S, E>(
    router: Router,
    route: Route,
    service: S,
    config: &RouteConfig,
    id: &str,
    layers: &mut Layers<'_>,
) -> Result<Router, Mistake>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = E>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    E: Into<gateway_core::BoxError> + 'static,
{
    let added = if config.plugins.is_empty() {
        router.try_route(route, service)
    } else {
        // The proxy's errors travel up as errors through the layers of the upstream path
        // (timeout, retries, breaker); the first in-band layer answers them, so the layers
        // outside it (CORS, compression) decorate the 502 like any response.
        let mut stack = RouteService::new(service);
        // The innermost layer that answers in-band, seen so far from the inside out.
        let mut in_band: Option<&str> = None;
        for (index, plugin) in config.plugins.iter().enumerate().rev() {
            let section = &plugin.value.section;
            let key = (id.to_owned(), index);
            let configs = layers.configs;
            let (layer, lent) = match layers.previous.get(&key) {
                // The same plugin with the same config in the same place, lent the same
                // upstreams: its layer, and the state it holds, carry over.
                Some(old)
                    if old.section.same_as(section)
                        && old.lent.iter().all(|(name, config)| {
                            configs.get(name).is_some_and(|(now, _)| now == config)
                        }) =>
                {
                    (old.layer.clone(), old.lent.clone())
                }
                _ => {
                    // The upstreams the factory asks for are noted, to know when to
                    // make the layer again.
                    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
                    let lend: Upstreams = {
                        let (asked, upstreams) = (Arc::clone(&asked), layers.upstreams.clone());
                        Arc::new(move |name: &str| {
                            asked
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(name.to_owned());
                            upstreams(name)
                        })
                    };
                    let layer = section
                        .layer_with(&RouteId::new(id), Some(lend))
                        .map_err(|e| Mistake {
                            key: format!("plugins[{index}].{}", section.name()),
                            at: plugin.location(),
                            message: chain(&*e),
                        })?;
                    let asked =
                        std::mem::take(&mut *asked.lock().unwrap_or_else(PoisonError::into_inner));
                    let lent = asked
                        .into_iter()
                        .filter_map(|name| {
                            let config = configs.get(&name)?.0.clone();
                            Some((name, config))
                        })
                        .collect();
                    (layer, lent)
                }
            };
            match in_band {
                Some(inner) if layer.passes_errors() => tracing::warn!(
                    route = id,
                    plugin = section.name(),
                    inside = inner,
                    "`{}` is listed before `{inner}` but passes its errors up: its failures \
                     will skip `{inner}` (list the upstream path's layers last)",
                    section.name()
                ),
                None if !layer.passes_errors() => in_band = Some(section.name()),
                _ => {}
            }
            stack = tower::Layer::layer(&layer, stack);
            layers.next.insert(
                key,
                Kept {
                    section: section.clone(),
                    layer,
                    lent,
                },
            );
        }
        router.try_route(route, stack)
    };
    added.map_err(|e| Mistake {
        key: "match".to_owned(),
        at: None,
        message: chain(&e),
    })
}

/// What is wrong with a route: the key under the route, where, and why.
struct Mistake {
    key: String,
    at: Option<(usize, usize)>,
    message: String,
}

/// The proxy of a route to its upstream; the failing key and why.
fn proxy(config: &RouteConfig, built: &Built) -> Result<ReverseProxy, Wrong> {
    let mut proxy = built.proxy();
    match (&config.strip_prefix, &config.replace_prefix) {
        (Some(_), Some(_)) => {
            return Err((
                "strip_prefix",
                "`strip_prefix` and `replace_prefix` cannot go together".into(),
            ));
        }
        (Some(prefix), None) => proxy = proxy.strip_prefix(prefix),
        (None, Some(replace)) => proxy = proxy.replace_prefix(&replace.from, &replace.to),
        (None, None) => {}
    }
    if let Some(host) = &config.host {
        proxy = proxy.host(match host.as_str() {
            "upstream" => HostHeader::Upstream,
            "preserve" => HostHeader::Preserve,
            fixed => HostHeader::Fixed(
                HeaderValue::from_str(fixed)
                    .map_err(|_| ("host", format!("`{fixed}` is not a header value")))?,
            ),
        });
    }
    if let Some(others) = config.connect_retries {
        proxy = proxy.connect_retries(others);
    }
    let t = &config.timeouts;
    if let Some(t) = t.response_header {
        proxy = proxy.response_header_timeout(Some(t.into()));
    }
    if let Some(t) = t.body_idle {
        proxy = proxy.body_idle_timeout(Some(t.into()));
    }
    if let Some(t) = t.tunnel_idle {
        proxy = proxy.tunnel_idle_timeout(Some(t.into()));
    }
    proxy.build().map_err(|e| ("", chain(&e)))
}

/// An admin section that cannot be used.
fn check_admin(admin: &AdminConfig) -> Result<(), (&'static str, String)> {
    if !super::is_address(&admin.listen) {
        return Err((
            "listen",
            format!("`{}` is not an address with a port", admin.listen),
        ));
    }
    if admin.token.as_deref() == Some("") {
        return Err((
            "token",
            "the token is empty (leave it out for none)".to_owned(),
        ));
    }
    Ok(())
}

/// What `config` was built into, as the admin listener shows it.
pub(super) fn inventory_of(
    config: &Config,
    parts: &Parts,
) -> (Vec<RouteInfo>, Vec<(String, Upstream)>) {
    let routes = config
        .routes
        .iter()
        .enumerate()
        .map(|(index, located)| {
            let r = &located.value;
            let id = r.id.clone().unwrap_or_else(|| format!("routes[{index}]"));
            let path = match (&r.matches.exact, &r.matches.path) {
                (Some(exact), _) => exact.clone(),
                (None, Some(prefix)) => format!("{}/*", prefix.trim_end_matches('/')),
                (None, None) => "/*".to_owned(),
            };
            let action = match (&r.upstream, &r.redirect, &r.respond) {
                (Some(name), _, _) => format!("proxy to {}", name.value),
                (_, Some(redirect), _) => format!("redirect to {}", redirect.to),
                (_, _, Some(respond)) => format!("respond {}", respond.status.unwrap_or(200)),
                _ => String::new(),
            };
            let mut info = RouteInfo::new(id, path, action)
                .methods(r.matches.methods.iter().cloned())
                .plugins(r.plugins.iter().map(|p| p.value.section.name().to_owned()));
            if let Some(host) = &r.matches.host {
                info = info.host(host.clone());
            }
            if let Some(name) = &r.upstream {
                info = info.upstream(name.value.clone());
            }
            info
        })
        .collect();
    let upstreams = parts
        .upstreams
        .iter()
        .map(|(name, (_, built))| (name.clone(), built.upstream.clone()))
        .collect();
    (routes, upstreams)
}
