//! The `retry` section.

use std::time::Duration;

use gateway_core::BoxError;
use gateway_core::registry::{Context, PluginFactory, Registry, RouteLayer};
use gateway_core::units::{Period, Size};
use http::{Method, StatusCode};
use serde::Deserialize;

use crate::retry::{Budget, On, RetryLayer, RetryPolicy};

/// `retry`'s section: `- retry: { tries: 3, budget: { ratio: 0.2 } }`.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included [default: 3].
    pub tries: Option<u32>,
    /// The methods retried on every failure [default: GET, HEAD, OPTIONS, TRACE, PUT,
    /// DELETE]; any other is retried only when its connection could not be opened.
    pub methods: Option<Vec<String>>,
    /// The failures retried: `connect`, `reset`, `timeout`, `status` [default: all four].
    pub on: Option<Vec<RetryOn>>,
    /// The statuses `status` means [default: 502, 503, 504].
    pub statuses: Option<Vec<u16>>,
    /// The backoff between tries.
    pub backoff: Option<BackoffConfig>,
    /// The longest upstream `Retry-After` waited for [default: 5s].
    pub max_retry_after: Option<Period>,
    /// How much retrying the route may do.
    pub budget: Option<BudgetConfig>,
    /// How long one try may take to its response head [default: none].
    pub per_try_timeout: Option<Period>,
    /// The most request body bytes kept to send again [default: 64KiB].
    pub replay_limit: Option<Size>,
}

/// A failure a policy retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryOn {
    /// The connection could not be opened.
    Connect,
    /// The connection closed or reset before any response.
    Reset,
    /// A try timed out.
    Timeout,
    /// The response has one of the `statuses`.
    Status,
}

/// `retry.backoff`: full jitter under `base × 2ⁿ⁻¹`, at most `max`.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// [default: 25ms]
    pub base: Option<Period>,
    /// [default: 1s]
    pub max: Option<Period>,
}

/// `retry.budget`: retries at most `ratio` of the requests over `window`, plus `floor`
/// per second.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// [default: 0.2]
    pub ratio: Option<f64>,
    /// Retries per second allowed whatever the traffic [default: 10].
    pub floor: Option<u32>,
    /// [default: 10s]
    pub window: Option<Period>,
}

pub(super) fn register(registry: &mut Registry) {
    registry.register("retry", RetryFactory);
}

struct RetryFactory;

impl PluginFactory for RetryFactory {
    type Config = RetryConfig;

    fn layer(&self, config: &RetryConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        let mut layer = RetryLayer::new(config.policy()?);
        if let Some(metrics) = cx.metrics() {
            layer = layer.metrics(metrics, cx.route().as_str());
        }
        // Its failures (the last try's) travel up as errors, for the breaker and the
        // route's rescue.
        Ok(RouteLayer::passing_errors(layer))
    }
}

impl RetryConfig {
    fn policy(&self) -> Result<RetryPolicy, BoxError> {
        let mut policy = RetryPolicy::idempotent();
        if let Some(tries) = self.tries {
            if !(1..=10).contains(&tries) {
                return Err(format!("`tries` is from 1 to 10, not {tries}").into());
            }
            policy = policy.tries(tries);
        }
        if let Some(methods) = &self.methods {
            let methods = methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("methods: `{m}` is not a method"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            policy = policy.methods(methods);
        }
        if let Some(on) = &self.on {
            let Some(set) = on
                .iter()
                .map(|o| match o {
                    RetryOn::Connect => On::CONNECT,
                    RetryOn::Reset => On::RESET,
                    RetryOn::Timeout => On::TIMEOUT,
                    RetryOn::Status => On::STATUS,
                })
                .reduce(|a, b| a | b)
            else {
                return Err("`on` lists no failure (leave the plugin out to retry nothing)".into());
            };
            policy = policy.on(set);
        }
        if let Some(statuses) = &self.statuses {
            let statuses = statuses
                .iter()
                .map(|&s| {
                    StatusCode::from_u16(s)
                        .ok()
                        .filter(|s| s.is_client_error() || s.is_server_error())
                        .ok_or_else(|| format!("statuses: {s} is not a 4xx or 5xx status"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            policy = policy.statuses(statuses);
        }
        if let Some(backoff) = &self.backoff {
            let base = backoff.base.map_or(Duration::from_millis(25), |p| p.0);
            let max = backoff.max.map_or(Duration::from_secs(1), |p| p.0);
            if max < base {
                return Err("backoff: `max` is less than `base`".into());
            }
            policy = policy.backoff(base, max);
        }
        if let Some(max) = self.max_retry_after {
            policy = policy.max_retry_after(max.0);
        }
        if let Some(budget) = &self.budget {
            let mut b = Budget::new(budget.ratio.unwrap_or(0.2))
                .map_err(|e| format!("budget.ratio: {e}"))?;
            if let Some(floor) = budget.floor {
                b = b.floor(floor);
            }
            if let Some(window) = budget.window {
                b = b
                    .window(window.0)
                    .map_err(|e| format!("budget.window: {e}"))?;
            }
            policy = policy.budget(b);
        }
        if let Some(timeout) = self.per_try_timeout {
            if timeout.0.is_zero() {
                return Err("`per_try_timeout` must be more than 0".into());
            }
            policy = policy.per_try_timeout(Some(timeout.0));
        }
        if let Some(limit) = self.replay_limit {
            policy = policy.replay_limit(usize::try_from(limit.0).unwrap_or(usize::MAX));
        }
        Ok(policy)
    }
}
