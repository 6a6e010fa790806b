//! How many requests a limit lets through, over what period, with what burst.

use std::error::Error as StdError;
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// A rate: `requests` per `period`, with room for a burst of `burst` requests at once (by
/// default as many as `requests`).
///
/// It is the GCRA of [`governor`]: one request's worth of room comes back every
/// `period / requests`, and a client that was quiet may spend up to `burst` at once. So
/// `Quota::per_second(10)` admits 10 requests at once, then one every 100 ms;
/// `Quota::per_minute(600).burst(50)` admits 50 at once, then one every 100 ms.
///
/// ```
/// use gateway_middleware::rate_limit::Quota;
/// use std::time::Duration;
///
/// let q = Quota::per_minute(600).burst(50);
/// assert_eq!(q.interval(), Duration::from_millis(100));
/// assert_eq!(q.burst_size(), 50);
/// assert!(Quota::new(0, Duration::from_secs(1)).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    requests: NonZeroU32,
    period: Duration,
    burst: NonZeroU32,
}

/// A quota that cannot be enforced: no requests, no period, or a period so short for its
/// count that one request's share of it is under a microsecond.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidQuota {
    reason: &'static str,
}

// === impl Quota ===

impl Quota {
    /// `requests` per `period`, with a burst of `requests`.
    ///
    /// # Errors
    ///
    /// When `requests` is zero, or `period / requests` is under a microsecond.
    pub fn new(requests: u32, period: Duration) -> Result<Self, InvalidQuota> {
        let Some(requests) = NonZeroU32::new(requests) else {
            return Err(InvalidQuota::new("a quota must allow at least one request"));
        };
        if period / requests.get() < Duration::from_micros(1) {
            return Err(InvalidQuota::new(
                "a quota's period divided by its requests must be at least a microsecond",
            ));
        }
        Ok(Self {
            requests,
            period,
            burst: requests,
        })
    }

    /// `requests` per second.
    ///
    /// # Panics
    ///
    /// When `requests` is zero or over a million (use [`Quota::new`] for values from
    /// configuration).
    #[track_caller]
    pub fn per_second(requests: u32) -> Self {
        Self::fixed(requests, Duration::from_secs(1))
    }

    /// `requests` per minute.
    ///
    /// # Panics
    ///
    /// When `requests` is zero.
    #[track_caller]
    pub fn per_minute(requests: u32) -> Self {
        Self::fixed(requests, Duration::from_secs(60))
    }

    /// `requests` per hour.
    ///
    /// # Panics
    ///
    /// When `requests` is zero.
    #[track_caller]
    pub fn per_hour(requests: u32) -> Self {
        Self::fixed(requests, Duration::from_secs(3600))
    }

    /// `requests` per day.
    ///
    /// # Panics
    ///
    /// When `requests` is zero.
    #[track_caller]
    pub fn per_day(requests: u32) -> Self {
        Self::fixed(requests, Duration::from_secs(86_400))
    }

    #[track_caller]
    fn fixed(requests: u32, period: Duration) -> Self {
        match Self::new(requests, period) {
            Ok(quota) => quota,
            Err(e) => panic!("invalid quota {requests}/{period:?}: {e}"),
        }
    }

    /// The most requests admitted at once after a quiet spell (at least 1).
    ///
    /// # Panics
    ///
    /// When `burst` is zero (use [`Quota::with_burst`] for values from configuration).
    #[track_caller]
    pub fn burst(self, burst: u32) -> Self {
        match self.with_burst(burst) {
            Ok(quota) => quota,
            Err(e) => panic!("invalid burst {burst}: {e}"),
        }
    }

    /// [`burst`](Self::burst), for values from configuration.
    ///
    /// # Errors
    ///
    /// When `burst` is zero.
    pub fn with_burst(mut self, burst: u32) -> Result<Self, InvalidQuota> {
        self.burst = NonZeroU32::new(burst)
            .ok_or(InvalidQuota::new("a burst must allow at least one request"))?;
        Ok(self)
    }

    /// The requests per period (the `q` of `RateLimit-Policy`).
    pub const fn requests(&self) -> u32 {
        self.requests.get()
    }

    /// The period (the `w` of `RateLimit-Policy`, in seconds).
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// The burst size.
    pub const fn burst_size(&self) -> u32 {
        self.burst.get()
    }

    /// The time one request's worth of room takes to come back: `period / requests`.
    pub fn interval(&self) -> Duration {
        self.period / self.requests.get()
    }

    /// The quota as governor takes it.
    pub(crate) fn governor(&self) -> governor::Quota {
        // NOTE: `new` refused intervals under a microsecond, so this is never `None`.
        governor::Quota::with_period(self.interval())
            .unwrap_or_else(|| governor::Quota::per_second(self.requests))
            .allow_burst(self.burst)
    }
}

// === impl InvalidQuota ===

impl InvalidQuota {
    const fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

impl fmt::Display for InvalidQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}

impl StdError for InvalidQuota {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_cannot_be_enforced() {
        assert!(Quota::new(0, Duration::from_secs(1)).is_err());
        assert!(Quota::new(2_000_000, Duration::from_secs(1)).is_err());
        assert!(Quota::new(1, Duration::ZERO).is_err());
        assert!(Quota::per_second(1).with_burst(0).is_err());
        let q = Quota::new(1_000, Duration::from_secs(1)).unwrap();
        assert_eq!(q.interval(), Duration::from_millis(1));
        assert_eq!(q.governor().burst_size().get(), 1_000);
        assert_eq!(q.governor().replenish_interval(), Duration::from_millis(1));
    }

    #[test]
    #[should_panic(expected = "invalid quota")]
    fn zero_requests_is_a_programming_error() {
        let _ = Quota::per_second(0);
    }
}
