//! What the gateway is made of at the moment, for `/status`, the status page and the
//! metrics read when scraped.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use gateway_core::metrics::Metrics;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use tokio::time::Instant;

use crate::upstream::{EndpointState, Upstream};

/// The routes, the upstreams by name and the config's reload history, as the admin
/// listener shows them. Whoever builds the gateway keeps it current: the config loader
/// ([`Live`](crate::config::Live), feature `config`) does on every reload; code-first
/// gateways set it once.
///
/// Cloning is cheap (one `Arc`); clones share the state.
#[derive(Clone, Default)]
pub struct Inventory {
    inner: Arc<RwLock<State>>,
}

#[derive(Default)]
struct State {
    routes: Vec<RouteInfo>,
    upstreams: Vec<(Arc<str>, Upstream)>,
    config: Option<ConfigStatus>,
}

/// One route, as the status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteInfo {
    /// The route's id (its `route` label).
    pub id: String,
    /// The host it matches (`None`: any).
    pub host: Option<String>,
    /// The path it matches (`/api` exact or `/api/*` prefix, as configured).
    pub path: String,
    /// The methods it takes (empty: any).
    pub methods: Vec<String>,
    /// The upstream it forwards to, if it forwards.
    pub upstream: Option<String>,
    /// What it does, in a few words (`proxy to api`, `respond 200`, `redirect 301`).
    pub action: String,
    /// Its plugins, in order.
    pub plugins: Vec<String>,
}

/// How the config has gone: where it came from, and its reloads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigStatus {
    /// The config's source (its file).
    pub source: String,
    /// Configs applied so far, the first load included: the version being served.
    pub version: u64,
    /// Reloads that applied a changed config.
    pub applied: u64,
    /// Reloads refused (the gateway serving on with the last good config).
    pub refused: u64,
    /// Why the last reload was refused, until one applies.
    pub last_error: Option<String>,
    /// When a config was last applied.
    pub last_applied: Option<SystemTime>,
}

// === impl RouteInfo ===

impl RouteInfo {
    /// A route with its id, the path it matches, and what it does.
    pub fn new(id: impl Into<String>, path: impl Into<String>, action: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            path: path.into(),
            action: action.into(),
            ..Self::default()
        }
    }

    /// Sets the host it matches.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Sets the upstream it forwards to.
    #[must_use]
    pub fn upstream(mut self, upstream: impl Into<String>) -> Self {
        self.upstream = Some(upstream.into());
        self
    }

    /// Sets the methods it takes.
    #[must_use]
    pub fn methods<I: IntoIterator<Item = S>, S: Into<String>>(mut self, methods: I) -> Self {
        self.methods = methods.into_iter().map(Into::into).collect();
        self
    }

    /// Sets its plugins, in order.
    #[must_use]
    pub fn plugins<I: IntoIterator<Item = S>, S: Into<String>>(mut self, plugins: I) -> Self {
        self.plugins = plugins.into_iter().map(Into::into).collect();
        self
    }
}

// === impl ConfigStatus ===

impl ConfigStatus {
    /// The status of the config from `source`, at `version`.
    pub fn new(source: impl Into<String>, version: u64) -> Self {
        Self {
            source: source.into(),
            version,
            ..Self::default()
        }
    }
}

// === impl Inventory ===

impl Inventory {
    /// An empty inventory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the routes.
    pub fn set_routes(&self, routes: Vec<RouteInfo>) {
        self.write().routes = routes;
    }

    /// Replaces the upstreams (each shown, and measured, under its name).
    pub fn set_upstreams<I, N>(&self, upstreams: I)
    where
        I: IntoIterator<Item = (N, Upstream)>,
        N: Into<Arc<str>>,
    {
        self.write().upstreams = upstreams.into_iter().map(|(n, u)| (n.into(), u)).collect();
    }

    /// Sets how the config has gone.
    pub fn set_config(&self, config: ConfigStatus) {
        self.write().config = Some(config);
    }

    /// The routes.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.read().routes.clone()
    }

    /// The upstreams by name.
    pub fn upstreams(&self) -> Vec<(Arc<str>, Upstream)> {
        self.read().upstreams.clone()
    }

    /// How the config has gone, if there is one.
    pub fn config(&self) -> Option<ConfigStatus> {
        self.read().config.clone()
    }

    /// Reports the upstreams and the config into `metrics`, read on every scrape: see
    /// `docs/observability.md` for the names. Call it once per registry.
    pub fn register(&self, metrics: &Metrics) {
        metrics.collector(Scrape(self.clone()));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("Inventory")
            .field("routes", &state.routes.len())
            .field("upstreams", &state.upstreams.len())
            .field("config", &state.config)
            .finish()
    }
}

/// The inventory's metrics, read when scraped.
#[derive(Debug)]
struct Scrape(Inventory);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let state = self.0.read();
        let now = Instant::now();
        let endpoints: Vec<(&str, EndpointState, crate::upstream::Outcomes)> = state
            .upstreams
            .iter()
            .flat_map(|(name, upstream)| {
                let set = upstream.endpoints();
                set.iter()
                    .map(|e| (&**name, e.state(now), e.outcomes()))
                    .collect::<Vec<_>>()
            })
            .collect();

        let mut attempts = encoder.encode_descriptor(
            "upstream_attempts",
            "Requests sent to an endpoint, by outcome (gateway_core::classify).",
            None,
            MetricType::Counter,
        )?;
        for (upstream, state, outcomes) in &endpoints {
            for (outcome, n) in [
                ("success", outcomes.success),
                ("failure", outcomes.failure),
                ("retryable", outcomes.retryable),
                ("client", outcomes.client),
            ] {
                let labels = [
                    ("upstream", *upstream),
                    ("endpoint", state.url.as_str()),
                    ("outcome", outcome),
                ];
                attempts
                    .encode_family(&labels)?
                    .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&n, None)?;
            }
        }

        let mut latency = encoder.encode_descriptor(
            "upstream_response_duration_seconds",
            "Time from sending a request (its body included) to the response head.",
            None,
            MetricType::Histogram,
        )?;
        for (name, upstream) in &state.upstreams {
            let labels = [("upstream", &**name)];
            upstream.latency().encode(latency.encode_family(&labels)?)?;
        }

        type Gauge = fn(&EndpointState) -> f64;
        let gauges: [(&str, &str, Gauge); 4] = [
            (
                "upstream_endpoint_healthy",
                "1 while active health checks pass (always, without them).",
                |s| f64::from(u8::from(s.healthy)),
            ),
            (
                "upstream_endpoint_ejected",
                "1 while passive health checking keeps the endpoint out.",
                |s| f64::from(u8::from(s.ejected)),
            ),
            (
                "upstream_endpoint_in_flight",
                "Requests in flight to the endpoint.",
                |s| s.in_flight as f64,
            ),
            (
                "upstream_endpoint_latency_ewma_seconds",
                "The balancer's peak-EWMA response-time estimate (0 before a sample).",
                |s| s.rtt.map_or(0.0, |d| d.as_secs_f64()),
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (upstream, state, _) in &endpoints {
                let labels = [("upstream", *upstream), ("endpoint", state.url.as_str())];
                family.encode_family(&labels)?.encode_gauge(&value(state))?;
            }
        }

        if let Some(config) = &state.config {
            let mut reloads = encoder.encode_descriptor(
                "config_reloads",
                "Config reloads, by result (applied, or refused and the last good kept).",
                None,
                MetricType::Counter,
            )?;
            for (result, n) in [("applied", config.applied), ("refused", config.refused)] {
                reloads
                    .encode_family(&[("result", result)])?
                    .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&n, None)?;
            }
            let last = config
                .last_applied
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64());
            encoder
                .encode_descriptor(
                    "config_last_applied_timestamp_seconds",
                    "When a config was last applied (Unix time).",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&last)?;
            encoder
                .encode_descriptor(
                    "config_last_reload_successful",
                    "1 when the last reload applied (or none was refused since), 0 when it was refused.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&i64::from(config.last_error.is_none()))?;
        }
        Ok(())
    }
}
