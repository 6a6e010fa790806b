//! Passive health checking: ejecting endpoints whose requests keep failing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Endpoint;
use gateway_core::time::deadline;

/// Passive health checking: endpoints whose requests keep failing (as judged by
/// [`gateway_core::classify`]: connect errors, resets, timeouts, 5xx) are ejected for a
/// while.
///
/// An endpoint with `consecutive_failures` failures in a row is ejected for
/// `base_ejection × (number of ejections)`, at most `max_ejection`, so an endpoint that keeps
/// failing stays out longer each time. The count restarts after a healthy spell of
/// `max_ejection`. At most `max_ejected_percent` of the endpoints (but always at least one)
/// are ejected at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    consecutive_failures: usize,
    base_ejection: Duration,
    max_ejection: Duration,
    max_ejected_percent: u8,
}

// === impl OutlierDetection ===

impl OutlierDetection {
    /// Ejects after `consecutive_failures` failures in a row (at least 1); 30 s base
    /// ejection, 300 s at most, at most 10% of the endpoints (at least one) at once.
    pub const fn new(consecutive_failures: usize) -> Self {
        Self {
            consecutive_failures: if consecutive_failures == 0 {
                1
            } else {
                consecutive_failures
            },
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 10,
        }
    }

    /// The first ejection's length; later ones are multiples of it.
    pub const fn base_ejection(mut self, d: Duration) -> Self {
        self.base_ejection = d;
        self
    }

    /// The longest ejection.
    pub const fn max_ejection(mut self, d: Duration) -> Self {
        self.max_ejection = d;
        self
    }

    /// At most this share of the endpoints is ejected at once (0–100; one endpoint may
    /// always be ejected).
    pub const fn max_ejected_percent(mut self, percent: u8) -> Self {
        self.max_ejected_percent = if percent > 100 { 100 } else { percent };
        self
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self::new(5)
    }
}

impl OutlierDetection {
    /// Whether `failures` consecutive failures call for an ejection.
    pub(super) const fn is_due(&self, failures: usize) -> bool {
        failures >= self.consecutive_failures
    }

    /// Ejects `endpoint` if it is due and the cap allows; callers serialize calls so the
    /// cap holds.
    pub(super) fn maybe_eject(
        &self,
        endpoint: &Endpoint,
        endpoints: &[Arc<Endpoint>],
        now: Instant,
    ) {
        if endpoint.is_ejected(now) || !self.is_due(endpoint.failures.load(Ordering::Relaxed)) {
            return;
        }
        let ejected = endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let cap = (endpoints.len() * usize::from(self.max_ejected_percent) / 100).max(1);
        if ejected >= cap {
            tracing::debug!(%endpoint, ejected, cap, "not ejecting: too many endpoints ejected");
            return;
        }
        if endpoint
            .ejected_until()
            .is_some_and(|until| now.saturating_duration_since(until) >= self.max_ejection)
        {
            // A long healthy spell since the last ejection: start counting afresh.
            endpoint.ejections.store(0, Ordering::Relaxed);
        }
        let count = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = self
            .base_ejection
            .saturating_mul(count)
            .min(self.max_ejection);
        endpoint.eject_until(deadline(now, duration));
        endpoint.failures.store(0, Ordering::Relaxed);
        tracing::warn!(%endpoint, ?duration, ejections = count, "ejecting failing endpoint");
    }
}
