//! The `circuit-breaker` section.

use std::time::Duration;

use bytes::Bytes;
use gateway_core::BoxError;
use gateway_core::registry::{Context, PluginFactory, Registry, RouteLayer};
use gateway_core::units::Period;
use http::{Response, StatusCode};
use serde::Deserialize;

use super::{Downgraded, Kept};
use crate::circuit_breaker::{
    Breaker, CircuitBreakerLayer, EndpointBreakerLayer, WeakBreaker, WeakEndpointBreakers, Window,
};

/// `circuit-breaker`'s section: `- circuit-breaker: { consecutive_failures: 5 }`.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Opens after this many failures in a row.
    pub consecutive_failures: Option<u32>,
    /// Opens when this share (0 to 1) of the window's calls failed.
    pub failure_rate: Option<f64>,
    /// Opens when `rate` of the window's calls took `duration` or longer.
    pub slow_calls: Option<SlowCallsConfig>,
    /// The window rates are computed over: `{ calls: 100 }` or `{ time: 30s }` [default:
    /// the last 100 calls].
    pub window: Option<WindowConfig>,
    /// The fewest calls in the window before a rate opens it [default: 20].
    pub min_calls: Option<u32>,
    /// The first open time [default: 5s]; doubled with each opening in a row.
    pub open_for: Option<Period>,
    /// The longest open time [default: 60s].
    pub max_open: Option<Period>,
    /// Calls a half-open breaker lets through to decide [default: 3].
    pub probes: Option<u32>,
    /// The breaker's name: routes giving the same name share one breaker (one per
    /// upstream, say) [default: the route's id].
    pub name: Option<String>,
    /// What one breaker judges: `route` (everything behind the layer, the default) or
    /// `endpoint` (a breaker per endpoint of the route's upstream).
    pub per: Option<Per>,
    /// What a refused call gets [default: 503 with `Retry-After`].
    pub fallback: Option<FallbackConfig>,
}

/// `circuit-breaker.per`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// One breaker for what is behind the layer.
    #[default]
    Route,
    /// A breaker per endpoint of the upstream behind the layer.
    Endpoint,
}

/// `circuit-breaker.slow_calls`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowCallsConfig {
    /// A call this long to its response head is slow.
    pub duration: Period,
    /// The share of slow calls that opens the breaker.
    pub rate: f64,
}

/// `circuit-breaker.window`.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// The last N calls.
    pub calls: Option<u32>,
    /// The calls of the last span.
    pub time: Option<Period>,
}

/// `circuit-breaker.fallback`: an upstream of the config, or a fixed answer.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// The upstream refused requests go to, untouched.
    pub upstream: Option<String>,
    /// A fixed answer's status [default: 503].
    pub status: Option<u16>,
    /// A fixed answer's body [default: empty].
    pub body: Option<String>,
    /// A fixed answer's `Content-Type` [default: `text/plain; charset=utf-8`].
    pub content_type: Option<String>,
}

pub(super) fn register(registry: &mut Registry) {
    registry.register("circuit-breaker", CircuitBreakerFactory::default());
}

impl Downgraded for WeakBreaker {
    type Strong = CircuitBreakerLayer;

    fn upgrade(&self) -> Option<CircuitBreakerLayer> {
        Self::upgrade(self)
    }
}

impl Downgraded for WeakEndpointBreakers {
    type Strong = EndpointBreakerLayer;

    fn upgrade(&self) -> Option<EndpointBreakerLayer> {
        Self::upgrade(self)
    }
}

/// Builds breakers, kept (weakly) by name so that routes naming the same breaker with the
/// same settings share it, and a route's own breaker outlives a remade layer.
#[derive(Default)]
struct CircuitBreakerFactory {
    shared: Kept<Breaker, WeakBreaker>,
    per_endpoint: Kept<Breaker, WeakEndpointBreakers>,
}

impl PluginFactory for CircuitBreakerFactory {
    type Config = CircuitBreakerConfig;

    fn layer(&self, config: &CircuitBreakerConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        let breaker = config.breaker()?;
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| cx.route().as_str().to_owned());
        if config.per == Some(Per::Endpoint) {
            return self.per_endpoint(config, cx, breaker, &name);
        }
        // NOTE: every breaker is kept by its name (the route's id by default), so that a
        // layer made again (its fallback's upstream changed) keeps the breaker's state.
        // New, or with other settings (a reload changed them): a fresh breaker; routes
        // still holding the old one keep it until they are dropped.
        let mut layer = self.shared.get_or(&name, breaker.clone(), || {
            let mut layer = CircuitBreakerLayer::new(&name, breaker);
            if let Some(metrics) = cx.metrics() {
                layer = layer.metrics(metrics);
            }
            let weak = layer.downgrade();
            (layer, weak)
        });
        if let Some(fallback) = &config.fallback {
            layer = match &fallback.upstream {
                Some(upstream) => {
                    if fallback.status.is_some()
                        || fallback.body.is_some()
                        || fallback.content_type.is_some()
                    {
                        return Err("fallback: an `upstream` or a fixed answer, not both".into());
                    }
                    let service = cx.upstream(upstream).ok_or_else(|| {
                        format!("fallback.upstream: no upstream is named `{upstream}`")
                    })?;
                    layer.fallback(service)
                }
                None => layer.fallback_response(fixed(fallback)?),
            };
        }
        // Its refusals (503 circuit_open) travel up as errors, for the route's rescue.
        Ok(RouteLayer::passing_errors(layer))
    }
}

impl CircuitBreakerFactory {
    /// A breaker per endpoint (`per: endpoint`), carried across reloads by name.
    fn per_endpoint(
        &self,
        config: &CircuitBreakerConfig,
        cx: &Context,
        breaker: Breaker,
        name: &str,
    ) -> Result<RouteLayer, BoxError> {
        let mut layer = self.per_endpoint.get_or(name, breaker.clone(), || {
            let mut layer = EndpointBreakerLayer::new(name, breaker);
            if let Some(metrics) = cx.metrics() {
                layer = layer.metrics(metrics);
            }
            let weak = layer.downgrade();
            (layer, weak)
        });
        if let Some(fallback) = &config.fallback {
            if fallback.upstream.is_some() {
                return Err(
                    "fallback.upstream: not with `per: endpoint` (the request has \
                            gone to the proxy by the time every endpoint is found refused); \
                            a fixed answer, or a `per: route` breaker with the fallback"
                        .into(),
                );
            }
            layer = layer.fallback_response(fixed(fallback)?);
        }
        Ok(RouteLayer::passing_errors(layer))
    }
}

/// The fixed answer of `fallback`.
fn fixed(fallback: &FallbackConfig) -> Result<Response<Bytes>, BoxError> {
    let status = StatusCode::from_u16(fallback.status.unwrap_or(503))
        .ok()
        .filter(|s| !s.is_informational())
        .ok_or("fallback.status: must be a final status, 200 to 599")?;
    let content_type = fallback
        .content_type
        .as_deref()
        .unwrap_or("text/plain; charset=utf-8");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Bytes::from(fallback.body.clone().unwrap_or_default()))
        .map_err(|_| {
            format!("fallback.content_type: `{content_type}` is not a header value").into()
        })
}

impl CircuitBreakerConfig {
    fn breaker(&self) -> Result<Breaker, BoxError> {
        let rate = |what: &str, rate: f64| -> Result<f64, BoxError> {
            if rate > 0.0 && rate <= 1.0 {
                Ok(rate)
            } else {
                Err(format!("{what}: a rate is above 0 and at most 1, not {rate}").into())
            }
        };
        let slow = match &self.slow_calls {
            Some(slow) => Some((slow.duration.0, rate("slow_calls.rate", slow.rate)?)),
            None => None,
        };
        let mut breaker = match (self.consecutive_failures, self.failure_rate, slow) {
            (Some(0), ..) => return Err("`consecutive_failures` must be more than 0".into()),
            (Some(n), None, _) => Breaker::consecutive(n),
            (Some(n), Some(r), _) => {
                Breaker::failure_rate(rate("failure_rate", r)?).and_consecutive(n)
            }
            (None, Some(r), _) => Breaker::failure_rate(rate("failure_rate", r)?),
            (None, None, Some((threshold, r))) => Breaker::on_slow_calls(threshold, r),
            (None, None, None) => {
                return Err(
                    "a breaker needs `consecutive_failures`, `failure_rate` or `slow_calls`".into(),
                );
            }
        };
        if let Some((threshold, r)) = slow {
            breaker = breaker.slow_calls(threshold, r);
        }
        if let Some(window) = &self.window {
            breaker = breaker.window(match (window.calls, window.time) {
                (Some(n), None) if (1..=10_000).contains(&n) => Window::count(n),
                (Some(n), None) => {
                    return Err(format!("window.calls: from 1 to 10000, not {n}").into());
                }
                (None, Some(t))
                    if (Duration::from_secs(1)..=Duration::from_secs(600)).contains(&t.0) =>
                {
                    Window::time(t.0)
                }
                (None, Some(_)) => return Err("window.time: from 1s to 10m".into()),
                _ => return Err("window: `calls` or `time`, one of them".into()),
            });
        }
        if let Some(min) = self.min_calls {
            if min == 0 {
                return Err("`min_calls` must be more than 0".into());
            }
            breaker = breaker.min_calls(min);
        }
        let first = self.open_for.map_or(Duration::from_secs(5), |p| p.0);
        let max = self
            .max_open
            .map_or(Duration::from_secs(60).max(first), |p| p.0);
        if first.is_zero() {
            return Err("`open_for` must be more than 0".into());
        }
        if max < first {
            return Err("`max_open` is less than `open_for`".into());
        }
        breaker = breaker.open_for(first, max);
        if let Some(probes) = self.probes {
            if probes == 0 {
                return Err("`probes` must be more than 0".into());
            }
            breaker = breaker.probes(probes);
        }
        Ok(breaker)
    }
}
