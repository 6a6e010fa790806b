//! What a config file says, as serde reads it. Checked here only as far as types go; what
//! the parts say of each other (a route naming an upstream that is not there) is checked by
//! `build`.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;

use gateway_core::registry::{Registry, Section};
use serde::Deserialize;
use serde::de;

use super::load::Located;
use super::units::{Cidr, Url};
use gateway_core::units::{Period, Size};

/// A whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The address the gateway listens on (`127.0.0.1:8080`, `[::]:443`, `localhost:8080`).
    pub listen: String,
    /// The listener's settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Upstreams by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Routes, matched most specific first (see [`crate::Router`]), each with its place in
    /// the file (for the errors only the whole config reveals).
    pub routes: Vec<Located<RouteConfig>>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`, `/status`) [default: none].
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The access log [default: none].
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    /// Request spans and W3C trace context [default: none].
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
}

/// `access_log:`: one line per request, written off the request path
/// (`gateway_middleware::access_log`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `stdout`, `stderr`, or a file appended to (reopened on `SIGUSR1`) [default: `stdout`].
    #[serde(
        default = "AccessLogConfig::default_to",
        deserialize_with = "AccessLogConfig::read_to"
    )]
    pub to: String,
    /// `json` or `combined` [default: `json`].
    #[serde(default)]
    pub format: AccessLogFormat,
    /// What is written of query strings: `omit`, `redact` or `keep` [default: `omit`].
    #[serde(default)]
    pub query: QueryLogging,
    /// Lines that may wait for the writer; more are dropped and counted [default: 4096].
    #[serde(
        default = "AccessLogConfig::default_queue",
        deserialize_with = "AccessLogConfig::read_queue"
    )]
    pub queue: usize,
}

impl AccessLogConfig {
    fn default_to() -> String {
        "stdout".to_owned()
    }

    const fn default_queue() -> usize {
        4096
    }

    fn read_to<'de, D: de::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let to = String::deserialize(d)?;
        if to.trim().is_empty() {
            return Err(de::Error::custom("say `stdout`, `stderr` or a file"));
        }
        Ok(to)
    }

    fn read_queue<'de, D: de::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let queue = usize::deserialize(d)?;
        if !(1..=1_000_000).contains(&queue) {
            return Err(de::Error::custom(format!(
                "{queue} lines is not between 1 and 1000000"
            )));
        }
        Ok(queue)
    }
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            to: Self::default_to(),
            format: AccessLogFormat::default(),
            query: QueryLogging::default(),
            queue: Self::default_queue(),
        }
    }
}

/// `access_log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// The Apache/nginx combined log format.
    Combined,
}

/// `access_log.query`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueryLogging {
    /// Left out.
    #[default]
    Omit,
    /// Names kept, values `REDACTED`.
    Redact,
    /// As sent.
    Keep,
}

/// `tracing:`: a `tracing` span per request and W3C trace context.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Which requests get a `request` span: `sampled` (those whose trace is sampled),
    /// `all`, or `off` [default: `sampled`].
    #[serde(default)]
    pub spans: SpanMode,
    /// The level of the `request` span [default: `info`].
    #[serde(default)]
    pub span_level: SpanLevel,
    /// Continue the client's `traceparent` (or start a trace) and forward it upstream
    /// [default: `true`].
    #[serde(default = "TracingConfig::default_trace_context")]
    pub trace_context: bool,
    /// The share of new traces marked sampled, from 0 to 1 [default: 0.1].
    #[serde(
        default = "TracingConfig::default_sample_ratio",
        deserialize_with = "TracingConfig::read_ratio"
    )]
    pub sample_ratio: f64,
    /// Export a span per sampled request to an OpenTelemetry collector over OTLP/HTTP
    /// [default: none].
    #[serde(default)]
    pub otlp: Option<OtlpConfig>,
}

/// `tracing.otlp`: where and how spans are exported (`gateway_middleware::otlp`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's traces endpoint, `http://collector:4318/v1/traces`.
    #[serde(deserialize_with = "OtlpConfig::read_endpoint")]
    pub endpoint: http::Uri,
    /// The resource's `service.name` [default: `gateway`].
    #[serde(default = "OtlpConfig::default_service_name")]
    pub service_name: String,
    /// Headers sent with every export (a backend's API key) [default: none].
    #[serde(default, deserialize_with = "OtlpConfig::read_headers")]
    pub headers: http::HeaderMap,
    /// Finished spans that may wait for the exporter; more are dropped and counted
    /// [default: 2048].
    #[serde(
        default = "OtlpConfig::default_queue",
        deserialize_with = "OtlpConfig::read_queue"
    )]
    pub queue: usize,
    /// The most spans in one export [default: 512].
    #[serde(
        default = "OtlpConfig::default_batch",
        deserialize_with = "OtlpConfig::read_batch"
    )]
    pub batch: usize,
    /// How long a span may wait for its batch to fill [default: `5s`].
    #[serde(default = "OtlpConfig::default_batch_delay")]
    pub batch_delay: Period,
    /// How long one export may take [default: `10s`].
    #[serde(default = "OtlpConfig::default_timeout")]
    pub timeout: Period,
}

impl OtlpConfig {
    fn default_service_name() -> String {
        "gateway".to_owned()
    }

    const fn default_queue() -> usize {
        2048
    }

    const fn default_batch() -> usize {
        512
    }

    const fn default_batch_delay() -> Period {
        Period(std::time::Duration::from_secs(5))
    }

    const fn default_timeout() -> Period {
        Period(std::time::Duration::from_secs(10))
    }

    /// An OTLP config sending to `endpoint`, the rest by default.
    pub fn new(endpoint: http::Uri) -> Self {
        Self {
            endpoint,
            service_name: Self::default_service_name(),
            headers: http::HeaderMap::new(),
            queue: Self::default_queue(),
            batch: Self::default_batch(),
            batch_delay: Self::default_batch_delay(),
            timeout: Self::default_timeout(),
        }
    }

    fn read_endpoint<'de, D: de::Deserializer<'de>>(d: D) -> Result<http::Uri, D::Error> {
        super::units::http_url(&String::deserialize(d)?).map_err(de::Error::custom)
    }

    fn read_headers<'de, D: de::Deserializer<'de>>(d: D) -> Result<http::HeaderMap, D::Error> {
        let mut headers = http::HeaderMap::new();
        for (name, value) in BTreeMap::<String, String>::deserialize(d)? {
            let name = http::HeaderName::try_from(name.as_str())
                .map_err(|_| de::Error::custom(format!("`{name}` is not a header name")))?;
            let value = http::HeaderValue::try_from(value).map_err(|_| {
                de::Error::custom(format!("the value of `{name}` is not a header value"))
            })?;
            headers.append(name, value);
        }
        Ok(headers)
    }

    fn read_queue<'de, D: de::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let queue = usize::deserialize(d)?;
        if !(1..=1_000_000).contains(&queue) {
            return Err(de::Error::custom(format!(
                "{queue} spans is not between 1 and 1000000"
            )));
        }
        Ok(queue)
    }

    fn read_batch<'de, D: de::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let batch = usize::deserialize(d)?;
        if !(1..=10_000).contains(&batch) {
            return Err(de::Error::custom(format!(
                "{batch} spans is not between 1 and 10000"
            )));
        }
        Ok(batch)
    }
}

impl TracingConfig {
    const fn default_trace_context() -> bool {
        true
    }

    const fn default_sample_ratio() -> f64 {
        0.1
    }

    fn read_ratio<'de, D: de::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let ratio = f64::deserialize(d)?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(de::Error::custom(format!("{ratio} is not between 0 and 1")));
        }
        Ok(ratio)
    }
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            spans: SpanMode::default(),
            span_level: SpanLevel::default(),
            trace_context: Self::default_trace_context(),
            sample_ratio: Self::default_sample_ratio(),
            otlp: None,
        }
    }
}

/// `tracing.spans`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpanMode {
    /// No request spans.
    Off,
    /// Spans for the requests whose trace is sampled.
    #[default]
    Sampled,
    /// A span for every request.
    All,
}

/// `tracing.span_level`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpanLevel {
    /// At `ERROR`.
    Error,
    /// At `WARN`.
    Warn,
    /// At `INFO`.
    #[default]
    Info,
    /// At `DEBUG`.
    Debug,
    /// At `TRACE`.
    Trace,
}

/// `admin:`: the admin listener, on an address of its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens [default: `127.0.0.1:9901`]. Anything but loopback wants a
    /// `token`.
    #[serde(default = "AdminConfig::default_listen")]
    pub listen: String,
    /// A bearer token every admin request must carry (`${ADMIN_TOKEN}` reads it from the
    /// environment) [default: none].
    pub token: Option<String>,
}

impl AdminConfig {
    /// The default admin address.
    pub const DEFAULT_LISTEN: &str = "127.0.0.1:9901";

    fn default_listen() -> String {
        Self::DEFAULT_LISTEN.to_owned()
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
            token: None,
        }
    }
}

/// The listener's settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Serve HTTPS with these files.
    pub tls: Option<TlsFiles>,
    /// Peers whose `X-Forwarded-For` is believed (CIDRs or addresses).
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// How long a client may take to send a request head [default: 30s].
    pub header_read_timeout: Option<Period>,
    /// How long an idle keep-alive connection stays open [default: 60s].
    pub keep_alive_timeout: Option<Period>,
    /// How long a response write may wait for the client to take a byte [default: 60s].
    pub write_timeout: Option<Period>,
    /// How long a graceful shutdown waits for what is in flight [default: 30s].
    pub drain_timeout: Option<Period>,
    /// Connections open at once; more wait to be accepted.
    pub max_connections: Option<usize>,
    /// Header fields in a request head, 1 to 100 [default: 100].
    pub max_headers: Option<usize>,
    /// Bytes in a request head, at least 8KiB [default: 64KiB].
    pub max_header_bytes: Option<Size>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The PEM certificate chain file.
    pub cert: String,
    /// The PEM private key file.
    pub key: String,
}

/// One upstream: its endpoints and how they share the load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Its endpoints: `http://host:port`, `https://host`, or `host:port`.
    pub endpoints: Vec<EndpointConfig>,
    /// How they share the load [default: round-robin].
    #[serde(default)]
    pub balancer: Balancer,
    /// Active health checks.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive ejection after consecutive failures; `off` to turn it off.
    #[serde(default)]
    pub outlier_detection: Outlier,
    /// Ramps a new or recovered endpoint's share up over this long.
    pub slow_start: Option<Period>,
    /// Endpoints given by host name are resolved this often, and every address they resolve
    /// to is balanced over.
    pub dns_refresh: Option<Period>,
    /// TLS towards the endpoints.
    pub tls: Option<UpstreamTls>,
}

/// An endpoint: its URL, or its URL and weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointConfig {
    /// A URL, weight 1.
    Url(Url),
    /// A URL and its weight.
    Weighted {
        /// The URL.
        url: Url,
        /// Its share, relative to the others.
        weight: NonZeroU32,
    },
}

/// How an upstream's endpoints share the load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Balancer {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Weighted random.
    Random,
    /// The less loaded of two random picks (P2C).
    LeastRequest,
    /// Peak-EWMA of response times.
    Ewma,
    /// Consistent hashing on a key of the request.
    Hash(HashOn),
}

/// What a consistent-hash balancer hashes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum HashOn {
    /// The client IP (see `ClientIp`).
    ClientIp,
    /// The path.
    Path,
    /// A request header.
    Header(String),
    /// A cookie.
    Cookie(String),
}

/// Active health checks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The path probed with `GET`.
    pub path: String,
    /// Time between probes [default: 10s].
    pub interval: Option<Period>,
    /// How long a probe may take [default: 2s].
    pub timeout: Option<Period>,
    /// Passing probes in a row to be healthy again [default: 2].
    pub healthy_threshold: Option<NonZeroU32>,
    /// Failed probes in a row to be unhealthy [default: 3].
    pub unhealthy_threshold: Option<NonZeroU32>,
}

/// Passive outlier ejection: `off`, or `{ consecutive_failures: N }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outlier {
    /// Turned off.
    Off,
    /// On.
    On {
        /// Failed requests in a row (502/503/504, resets, refused connections) that eject.
        consecutive_failures: usize,
    },
}

/// Upstream TLS: a private CA, and whether the web PKI roots are trusted too.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// A PEM file of CA certificates to trust.
    pub ca: Option<String>,
    /// Trust the web PKI roots as well [default: true].
    pub webpki_roots: Option<bool>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name in logs and metrics [default: `routes[N]`].
    pub id: Option<String>,
    /// What it matches (the `match` key).
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    /// The upstream requests go to; or `redirect`, or `respond`.
    pub upstream: Option<Located<String>>,
    /// Answers with a redirect instead of proxying.
    pub redirect: Option<RedirectConfig>,
    /// Answers with a fixed response instead of proxying.
    pub respond: Option<RespondConfig>,
    /// Removes this prefix from the path before forwarding.
    pub strip_prefix: Option<String>,
    /// Replaces a path prefix before forwarding.
    pub replace_prefix: Option<ReplacePrefix>,
    /// The `Host` the upstream sees: `upstream` (its endpoint), `preserve` (the client's), or a
    /// fixed value.
    pub host: Option<String>,
    /// Timeouts towards the upstream.
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// Other endpoints a request whose connection could not be opened is sent to
    /// [default: 2; 0 for none].
    pub connect_retries: Option<u8>,
    /// The route's plugins, outermost first: `- name: { section }`, each a plugin
    /// registered by that name (see [`Registry`]).
    #[serde(default)]
    pub plugins: Vec<Located<PluginConfig>>,
}

/// One entry of a route's `plugins`: a registered plugin's name and its config section.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// The section, read by the plugin's factory.
    pub section: Section,
}

thread_local! {
    /// The registry plugin sections are read with, while `load::parse_with` runs.
    pub(super) static REGISTRY: std::cell::RefCell<Registry> = std::cell::RefCell::new(Registry::new());
}

impl<'de> Deserialize<'de> for PluginConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = PluginConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a plugin's name and its config section: `- name: { ... }`")
            }

            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PluginConfig, A::Error> {
                let Some(name) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("a plugin entry needs the plugin's name"));
                };
                let registry = REGISTRY.with_borrow(Registry::clone);
                let section = map.next_value_seed(Seed {
                    registry: &registry,
                    name: &name,
                })?;
                if let Some(other) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "one plugin per entry: `{other}` goes in an entry of its own"
                    )));
                }
                Ok(PluginConfig { section })
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Reads a section with the factory registered under `name`.
struct Seed<'a> {
    registry: &'a Registry,
    name: &'a str,
}

impl<'de> de::DeserializeSeed<'de> for Seed<'_> {
    type Value = Section;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Section, D::Error> {
        self.registry.section(self.name, deserializer)
    }
}

/// What a route matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// A host (`api.example.com`) or a wildcard (`*.example.com`).
    pub host: Option<String>,
    /// A path prefix, matched on segment boundaries (`/api` matches `/api` and `/api/x`,
    /// never `/apix`).
    pub path: Option<String>,
    /// An exact path.
    pub exact: Option<String>,
    /// Methods matched [default: all].
    #[serde(default)]
    pub methods: Vec<String>,
}

/// `replace_prefix: { from: /v1, to: /api/v1 }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacePrefix {
    /// The prefix replaced.
    pub from: String,
    /// What replaces it.
    pub to: String,
}

/// A redirect route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// The `Location`: a path, or an absolute URL.
    pub to: String,
    /// 301, 302, 303, 307 or 308 [default: 308].
    pub status: Option<u16>,
}

/// A route that answers by itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    /// [default: 200]
    pub status: Option<u16>,
    /// The body [default: empty].
    #[serde(default)]
    pub body: String,
    /// [default: `text/plain; charset=utf-8`]
    pub content_type: Option<String>,
}

/// A route's timeouts towards its upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    /// From the request being sent to the response head [default: 60s].
    pub response_header: Option<Period>,
    /// Longest pause inside a request or response body [default: 60s].
    pub body_idle: Option<Period>,
    /// Longest pause in an upgraded connection [default: 5m].
    pub tunnel_idle: Option<Period>,
}

// NOTE: written by hand rather than `#[serde(untagged)]`, whose errors lose the reason (and
// the place) of the variant that came closest.
impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Weighted {
            url: Url,
            weight: NonZeroU32,
        }
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = EndpointConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a URL, or `{ url: URL, weight: N }`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<EndpointConfig, E> {
                Url::deserialize(de::value::StrDeserializer::new(v)).map(EndpointConfig::Url)
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<EndpointConfig, A::Error> {
                let w = Weighted::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(EndpointConfig::Weighted {
                    url: w.url,
                    weight: w.weight,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl<'de> Deserialize<'de> for Outlier {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct On {
            consecutive_failures: usize,
        }
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Outlier;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`off`, or `{ consecutive_failures: N }`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Outlier, E> {
                if v == "off" {
                    Ok(Outlier::Off)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Outlier, E> {
                // A YAML 1.1 reader's `off`.
                if v {
                    Err(E::invalid_value(de::Unexpected::Bool(v), &self))
                } else {
                    Ok(Outlier::Off)
                }
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Outlier, A::Error> {
                let on = On::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Outlier::On {
                    consecutive_failures: on.consecutive_failures,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Default for Outlier {
    fn default() -> Self {
        Self::On {
            consecutive_failures: 5,
        }
    }
}
