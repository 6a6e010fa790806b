//! Active health checks: every endpoint probed over HTTP by a background task.

use std::fmt;
use std::future::poll_fn;
use std::num::NonZeroU32;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use gateway_core::Body;
use http::header::{HOST, HeaderValue, USER_AGENT};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use super::Endpoint;
use super::HttpClient;
use super::balance::fast_random;
use crate::invalid::Invalid;
use gateway_core::time::deadline;

/// Active HTTP health checking, Kong- and Envoy-style.
///
/// Every endpoint gets a background task that sends `GET <path>` every `interval` (plus a
/// random `0..=jitter`, so a fleet of gateways does not probe in lockstep) and waits at
/// most `timeout` for a response with an expected status. After `unhealthy_threshold`
/// failed probes in a row the endpoint is marked unhealthy and gets no traffic; after
/// `healthy_threshold` passing probes in a row it is healthy again (and, with slow start,
/// ramps up). Endpoints start healthy, so a restart does not refuse traffic while the
/// first probes run. The tasks stop when the upstream is dropped or the endpoint leaves
/// the set.
///
/// ```
/// use gateway_proxy::upstream::{HealthCheck, Upstream, RoundRobin};
/// use std::num::NonZeroU32;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let check = HealthCheck::http("/healthz")
///     .unwrap()
///     .interval(Duration::from_secs(5))
///     .timeout(Duration::from_secs(1))
///     .unhealthy_threshold(NonZeroU32::new(2).unwrap());
/// let endpoints = ["10.0.0.1:80", "10.0.0.2:80"].map(|t| t.parse().unwrap());
/// let upstream = Upstream::builder(endpoints, RoundRobin::default())
///     .health_check(check)
///     .build();
/// # drop(upstream); }
/// ```
#[derive(Clone)]
pub struct HealthCheck {
    path: PathAndQuery,
    host: Option<HeaderValue>,
    statuses: Vec<RangeInclusive<u16>>,
    interval: Duration,
    jitter: Duration,
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    client: HttpClient,
}

/// A health-check configuration that cannot be used.
#[derive(Debug)]
pub struct InvalidHealthCheck(Invalid);

/// The most of a probe's response body that is read (so the connection can be reused);
/// a longer body is dropped with its connection.
const MAX_PROBE_BODY: usize = 64 * 1024;

// === impl HealthCheck ===

impl HealthCheck {
    /// Probes `path` (an absolute path, with an optional query) with `GET`, expecting a
    /// 2xx within 2 s, every 10 s plus up to 1 s of jitter; 3 failures in a row make an
    /// endpoint unhealthy, 2 passes in a row healthy again. Uses its own connection pool
    /// with the web PKI roots; see [`HealthCheck::client`] for private CAs.
    ///
    /// # Errors
    ///
    /// When `path` is not an absolute path.
    pub fn http(path: &str) -> Result<Self, InvalidHealthCheck> {
        if !path.starts_with('/') {
            return Err(InvalidHealthCheck(Invalid::new(format!(
                "health-check path `{path}` must start with `/`"
            ))));
        }
        let path: PathAndQuery = path.parse().map_err(|e| {
            InvalidHealthCheck(Invalid::because(
                format!("health-check path `{path}` is not a valid path"),
                e,
            ))
        })?;
        let client = HttpClient::builder()
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| {
                InvalidHealthCheck(Invalid::because(
                    "the health-check client cannot be built",
                    e,
                ))
            })?;
        Ok(Self {
            path,
            host: None,
            statuses: vec![200..=299],
            interval: Duration::from_secs(10),
            jitter: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            client,
        })
    }

    /// Time between probes (at least 1 ms).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The most random delay added to each interval.
    #[must_use]
    pub const fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// How long a probe may take, connection included.
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Passing probes in a row that make an unhealthy endpoint healthy.
    #[must_use]
    pub fn healthy_threshold(mut self, n: NonZeroU32) -> Self {
        self.healthy_threshold = n.get();
        self
    }

    /// Failed probes in a row that make a healthy endpoint unhealthy.
    #[must_use]
    pub fn unhealthy_threshold(mut self, n: NonZeroU32) -> Self {
        self.unhealthy_threshold = n.get();
        self
    }

    /// The statuses that pass (default `200..=299`), replacing the default.
    #[must_use]
    pub fn expected_statuses(
        mut self,
        statuses: impl IntoIterator<Item = RangeInclusive<u16>>,
    ) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// The `Host` the probes send (default: the endpoint's `host:port`).
    #[must_use]
    pub fn host(mut self, host: HeaderValue) -> Self {
        self.host = Some(host);
        self
    }

    /// The client the probes use (for a private CA, or the proxy's own pool).
    #[must_use]
    pub fn client(mut self, client: HttpClient) -> Self {
        self.client = client;
        self
    }

    /// Starts probing `endpoint` until `cancel` fires.
    pub(super) fn spawn(self: &Arc<Self>, endpoint: Arc<Endpoint>, cancel: CancellationToken) {
        let check = Arc::clone(self);
        tokio::spawn(async move {
            cancel.run_until_cancelled(check.run(&endpoint)).await;
        });
    }

    async fn run(&self, endpoint: &Endpoint) {
        let (mut passes, mut failures) = (0_u32, 0_u32);
        let mut next = deadline(Instant::now(), self.random_jitter());
        loop {
            sleep_until(next).await;
            let started = Instant::now();
            next = deadline(started, self.interval.saturating_add(self.random_jitter()));
            let verdict = match timeout(self.timeout, self.probe(endpoint)).await {
                Ok(verdict) => verdict,
                Err(_) => Err(format!("no response within {:?}", self.timeout)),
            };
            match verdict {
                Ok(()) => {
                    (passes, failures) = (passes.saturating_add(1), 0);
                    if passes >= self.healthy_threshold
                        && endpoint.set_healthy(true, Instant::now())
                    {
                        tracing::info!(%endpoint, passes, "endpoint passes its health checks again");
                    }
                }
                Err(reason) => {
                    (passes, failures) = (0, failures.saturating_add(1));
                    if failures >= self.unhealthy_threshold
                        && endpoint.set_healthy(false, Instant::now())
                    {
                        tracing::warn!(%endpoint, failures, %reason, "endpoint fails its health checks");
                    } else {
                        tracing::debug!(%endpoint, failures, %reason, "health check failed");
                    }
                }
            }
        }
    }

    /// One probe: `Ok` when the endpoint answered with an expected status.
    async fn probe(&self, endpoint: &Endpoint) -> Result<(), String> {
        let mut req = Request::new(Body::empty());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = Uri::from(self.path.clone());
        let headers = req.headers_mut();
        headers.insert(USER_AGENT, HeaderValue::from_static("gateway-health-check"));
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        let sent = self
            .client
            .send(endpoint, req, super::Outbound::default())
            .await
            .map_err(|e| crate::invalid::chain(&e))?;
        let status = sent.response.status().as_u16();
        // Read a small body to the end so the connection goes back to the pool.
        let mut body = sent.response.into_body();
        let mut read = 0;
        while read <= MAX_PROBE_BODY {
            match poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, bytes::Bytes::len),
                Some(Err(_)) | None => break,
            }
        }
        drop(body);
        if self.statuses.iter().any(|r| r.contains(&status)) {
            Ok(())
        } else {
            Err(format!("unexpected status {status}"))
        }
    }

    fn random_jitter(&self) -> Duration {
        let max = u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX);
        if max == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(fast_random() % max.saturating_add(1))
    }
}

impl fmt::Debug for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheck")
            .field("path", &self.path)
            .field("statuses", &self.statuses)
            .field("interval", &self.interval)
            .field("jitter", &self.jitter)
            .field("timeout", &self.timeout)
            .field("healthy_threshold", &self.healthy_threshold)
            .field("unhealthy_threshold", &self.unhealthy_threshold)
            .finish_non_exhaustive()
    }
}

// === impl InvalidHealthCheck ===

impl fmt::Display for InvalidHealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.reason)
    }
}

impl std::error::Error for InvalidHealthCheck {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn an_invalid_path_is_refused_with_its_cause() {
        let relative = HealthCheck::http("healthz").unwrap_err();
        assert!(
            relative.to_string().contains("must start with `/`"),
            "{relative}"
        );
        let invalid = HealthCheck::http("/health z").unwrap_err();
        assert!(invalid.to_string().contains("`/health z`"), "{invalid}");
        assert!(invalid.source().is_some(), "the URI error is kept");
    }
}
