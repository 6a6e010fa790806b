//! A Redis server shared by the layers that keep state across gateway instances (feature
//! `redis`): distributed rate limits, and the cache's
//! [`RedisStore`](crate::cache::RedisStore) when the `cache` feature is on too.
//!
//! [`Redis`] is a cheap handle over one multiplexed connection (the `redis` crate's
//! `ConnectionManager`: pipelined, reconnecting by itself), made on first use, so a gateway
//! starts while Redis is down. Every call has a deadline; a failed or late call starts a
//! backoff (100 ms, doubling to 1 s) during which callers are told at once that Redis is
//! unavailable instead of queueing on it, and one caller at a time probes it again. The
//! first failure and the recovery are logged once each.
//!
//! ```
//! use gateway_middleware::redis::Redis;
//! use std::time::Duration;
//!
//! let redis = Redis::builder("redis://127.0.0.1:6379/0")
//!     .timeout(Duration::from_millis(50))
//!     .build()
//!     .unwrap();
//! assert_eq!(redis.to_string(), "redis://127.0.0.1:6379/0");
//! assert!(Redis::builder("http://x").build().is_err());
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, ScriptInvocation};

/// A Redis server: `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

/// A [`Redis`] that does not keep its connection open.
#[derive(Clone, Debug)]
pub(crate) struct WeakRedis(Weak<Inner>);

/// Builds a [`Redis`].
#[derive(Debug)]
#[must_use]
pub struct RedisBuilder {
    url: String,
    timeout: Duration,
    connect_timeout: Duration,
}

/// A Redis URL that cannot be used, or a timeout of zero.
#[derive(Debug)]
pub struct InvalidRedis {
    reason: String,
    source: Option<redis::RedisError>,
}

/// Why a call to Redis did not answer.
#[derive(Debug)]
pub(crate) enum Unavailable {
    /// Backing off after recent failures: not tried.
    Backoff,
    /// No answer within the deadline.
    Timeout,
    /// The connection or the server failed.
    Failed(redis::RedisError),
}

struct Inner {
    client: redis::Client,
    manager: OnceLock<Result<ConnectionManager, String>>,
    timeout: Duration,
    connect_timeout: Duration,
    shown: String,
    health: Health,
}

/// Recent failures, and when Redis may be tried again.
struct Health {
    origin: tokio::time::Instant,
    failures: AtomicU32,
    retry_at: AtomicU64,
    probing: AtomicBool,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

// === impl Redis ===

impl Redis {
    /// A builder for the server at `url`.
    pub fn builder(url: impl Into<String>) -> RedisBuilder {
        RedisBuilder {
            url: url.into(),
            timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// The most a call may take before it counts as failed.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    #[cfg_attr(
        not(feature = "config"),
        expect(dead_code, reason = "connections are shared by the config's sections")
    )]
    pub(crate) fn downgrade(&self) -> WeakRedis {
        WeakRedis(Arc::downgrade(&self.inner))
    }

    /// Runs `script` with a deadline, unless Redis is being backed off from.
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        script: &ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        self.call(|mut conn| async move { script.invoke_async(&mut conn).await })
            .await
    }

    /// Runs `cmd` with a deadline, unless Redis is being backed off from.
    #[cfg(feature = "cache")]
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        self.call(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs what `call` sends on the connection, with a deadline, unless Redis is being
    /// backed off from; notes how it went.
    async fn call<T, F>(&self, call: impl FnOnce(ConnectionManager) -> F) -> Result<T, Unavailable>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let health = &self.inner.health;
        if !health.admit() {
            return Err(Unavailable::Backoff);
        }
        let conn = match self.manager() {
            Ok(conn) => conn,
            Err(e) => {
                // NOTE: only a misconfigured client fails here; it never gets better.
                health.failed(&self.inner.shown, &e);
                return Err(Unavailable::Failed(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "no connection manager",
                    e,
                ))));
            }
        };
        match tokio::time::timeout(self.inner.timeout, call(conn)).await {
            Ok(Ok(value)) => {
                health.succeeded(&self.inner.shown);
                Ok(value)
            }
            Ok(Err(e)) => {
                health.failed(&self.inner.shown, &e);
                Err(Unavailable::Failed(e))
            }
            Err(_) => {
                health.failed(&self.inner.shown, &"no answer within the timeout");
                Err(Unavailable::Timeout)
            }
        }
    }

    fn manager(&self) -> Result<ConnectionManager, String> {
        let inner = &self.inner;
        let made = inner.manager.get_or_init(|| {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(inner.timeout))
                .set_connection_timeout(Some(inner.connect_timeout))
                // Our backoff decides when to try again; the manager retries a
                // reconnection briefly, so a restarted server is found quickly.
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            ConnectionManager::new_lazy_with_config(inner.client.clone(), config)
                .map_err(|e| e.to_string())
        });
        made.clone()
    }
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.inner.shown)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Redis {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.shown)
    }
}

#[cfg_attr(
    not(feature = "config"),
    expect(dead_code, reason = "connections are shared by the config's sections")
)]
impl WeakRedis {
    pub(crate) fn upgrade(&self) -> Option<Redis> {
        self.0.upgrade().map(|inner| Redis { inner })
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

// === impl RedisBuilder ===

impl RedisBuilder {
    /// The most a call may take before it counts as failed [default: 100 ms]. Keep it
    /// short: a request waits this long at most when Redis hangs.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The most opening a connection may take [default: 1 s].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Checks the URL; connects on first use.
    ///
    /// # Errors
    ///
    /// When the URL is not a Redis URL, or a timeout is zero.
    pub fn build(self) -> Result<Redis, InvalidRedis> {
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(InvalidRedis {
                reason: "a Redis timeout must be more than 0".into(),
                source: None,
            });
        }
        let url = url_without_password(&self.url);
        if !(self.url.starts_with("redis://") || self.url.starts_with("rediss://")) {
            return Err(InvalidRedis {
                reason: format!("`{url}` is not a redis:// or rediss:// URL"),
                source: None,
            });
        }
        let client = redis::Client::open(self.url.as_str()).map_err(|e| InvalidRedis {
            reason: format!("`{url}` is not a usable Redis URL"),
            source: Some(e),
        })?;
        Ok(Redis {
            inner: Arc::new(Inner {
                client,
                manager: OnceLock::new(),
                timeout: self.timeout,
                connect_timeout: self.connect_timeout,
                shown: url,
                health: Health {
                    origin: tokio::time::Instant::now(),
                    failures: AtomicU32::new(0),
                    retry_at: AtomicU64::new(0),
                    probing: AtomicBool::new(false),
                },
            }),
        })
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
fn url_without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

// === impl InvalidRedis ===

impl fmt::Display for InvalidRedis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl StdError for InvalidRedis {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

// === impl Unavailable ===

impl Unavailable {
    /// A label for metrics: `backoff`, `timeout`, `connection`, `server`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Backoff => "backoff",
            Self::Timeout => "timeout",
            Self::Failed(e) if e.is_io_error() || e.is_connection_dropped() => "connection",
            Self::Failed(e) if e.is_connection_refusal() => "connection",
            Self::Failed(_) => "server",
        }
    }
}

impl StdError for Unavailable {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Failed(e) => Some(e),
            Self::Backoff | Self::Timeout => None,
        }
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backoff => f.write_str("backing off after recent failures"),
            Self::Timeout => f.write_str("no answer within the timeout"),
            Self::Failed(e) => write!(f, "{e}"),
        }
    }
}

// === impl Health ===

impl Health {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a call may go to Redis now: always while it is healthy; after failures,
    /// once the backoff is over, to one caller at a time.
    fn admit(&self) -> bool {
        if self.failures.load(Ordering::Acquire) == 0 {
            return true;
        }
        self.now() >= self.retry_at.load(Ordering::Acquire)
            && !self.probing.swap(true, Ordering::AcqRel)
    }

    fn succeeded(&self, shown: &str) {
        let before = self.failures.swap(0, Ordering::AcqRel);
        self.probing.store(false, Ordering::Release);
        if before > 0 {
            tracing::info!(
                redis = shown,
                after_failures = before,
                "redis is reachable again"
            );
        }
    }

    fn failed(&self, shown: &str, error: &dyn fmt::Display) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let backoff = BACKOFF_FIRST
            .saturating_mul(1 << failures.saturating_sub(1).min(10))
            .min(BACKOFF_MAX);
        let at = self
            .now()
            .saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        self.retry_at.store(at, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        if failures == 1 {
            tracing::warn!(redis = shown, error = %error, "redis unavailable; backing off");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            url_without_password("redis://gw:s3cret@cache:6380/2"),
            "redis://gw:***@cache:6380/2"
        );
        assert_eq!(
            url_without_password("rediss://:s3cret@cache"),
            "rediss://:***@cache"
        );
        assert_eq!(url_without_password("redis://cache/0"), "redis://cache/0");
        let err = Redis::builder("redis://u:s3cret@[::1").build().unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(
            Redis::builder("redis://x")
                .timeout(Duration::ZERO)
                .build()
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_one_caller_probes() {
        let redis = Redis::builder("redis://127.0.0.1:1").build().unwrap();
        let health = &redis.inner.health;
        assert!(health.admit());
        health.failed("r", &"down");
        assert!(!health.admit(), "backing off");
        tokio::time::advance(BACKOFF_FIRST).await;
        assert!(health.admit(), "one probe");
        assert!(!health.admit(), "only one");
        health.failed("r", &"down");
        tokio::time::advance(BACKOFF_FIRST).await;
        assert!(!health.admit(), "the backoff doubled");
        tokio::time::advance(BACKOFF_FIRST).await;
        assert!(health.admit());
        health.succeeded("r");
        assert!(health.admit() && health.admit(), "healthy: everyone");
        for _ in 0..20 {
            health.failed("r", &"down");
        }
        tokio::time::advance(BACKOFF_MAX).await;
        assert!(health.admit(), "never more than {BACKOFF_MAX:?}");
    }
}
