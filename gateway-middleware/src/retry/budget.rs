//! A retry budget: retries may add at most a fraction of the recent requests, plus a floor.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How many slots the window is cut into: a request leaves the budget within a tenth of
/// the window of its time.
const SLOTS: usize = 10;

/// Parts per million, the unit of the ratio.
const PPM: u64 = 1_000_000;

/// How much retrying a route may do: over a sliding window, retries at most `ratio` of the
/// requests in it, plus `floor` retries per second so that a quiet route can retry at all
/// (Finagle's and tower's `TpsBudget` rule; Envoy's `retry_budget`).
///
/// A budget is shared by every request of the layer it is given to (and by the clones of
/// that layer, and across config reloads that keep the layer): its state is an `Arc`.
/// Checking it is lock-free: a request is one atomic add on the current slot; a retry sums
/// the slots.
///
/// Unlike tower's `TpsBudget`, the ratio is exact (tower turns 0.1 into one retry per 9
/// requests) and no lock is taken per request.
///
/// ```
/// use std::time::Duration;
/// use gateway_middleware::retry::Budget;
///
/// // Retries add at most 20% to the load, plus 5 per second on a quiet route.
/// let budget = Budget::new(0.2).unwrap().floor(5).window(Duration::from_secs(10)).unwrap();
/// # let _ = budget;
/// ```
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    /// Retries allowed per request, in parts per million.
    ratio: u64,
    /// Retries allowed per second whatever the traffic.
    floor: u64,
    window: Duration,
    /// The length of a slot, in nanoseconds.
    slot_nanos: u64,
    /// The budget's own epoch: slot numbers count from it.
    start: Instant,
    /// Per slot: requests, tagged with the slot number they count for.
    requests: [AtomicU64; SLOTS],
    /// Per slot: retries, tagged the same way.
    retries: [AtomicU64; SLOTS],
}

/// A budget that cannot be: a ratio that is negative or not a number, or a window shorter
/// than a second or longer than a minute.
#[derive(Debug)]
pub struct InvalidBudget(&'static str);

// === impl Budget ===

impl Budget {
    /// Retries at most `ratio` of the requests (0.2: at most 20% extra load), over a 10 s
    /// window, with a floor of 10 retries per second.
    ///
    /// # Errors
    ///
    /// When `ratio` is negative, not finite, or above 1,000.
    pub fn new(ratio: f64) -> Result<Self, InvalidBudget> {
        if !(ratio.is_finite() && (0.0..=1000.0).contains(&ratio)) {
            return Err(InvalidBudget("the ratio must be between 0 and 1000"));
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0 ≤ ratio ≤ 1000: at most 1e9 parts per million"
        )]
        let ratio = (ratio * PPM as f64).round() as u64;
        Ok(Self::from_parts(ratio, 10, Duration::from_secs(10)))
    }

    /// Retries allowed per second whatever the traffic [default: 10]; 0 for none.
    pub fn floor(self, per_second: u32) -> Self {
        let inner = &self.inner;
        Self::from_parts(inner.ratio, u64::from(per_second), inner.window)
    }

    /// The window requests and retries are counted over [default: 10 s].
    ///
    /// # Errors
    ///
    /// When `window` is under a second or over a minute.
    pub fn window(self, window: Duration) -> Result<Self, InvalidBudget> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&window) {
            return Err(InvalidBudget("the window must be from 1s to 60s"));
        }
        let inner = &self.inner;
        Ok(Self::from_parts(inner.ratio, inner.floor, window))
    }

    fn from_parts(ratio: u64, floor: u64, window: Duration) -> Self {
        let slot_nanos = u64::try_from(window.as_nanos() / SLOTS as u128).unwrap_or(u64::MAX);
        Self {
            inner: Arc::new(Inner {
                ratio,
                floor,
                window,
                slot_nanos,
                start: Instant::now(),
                requests: Default::default(),
                retries: Default::default(),
            }),
        }
    }

    /// Counts a request (its first try).
    pub fn deposit(&self) {
        let slot = self.inner.slot(Instant::now());
        Inner::add(&self.inner.requests, slot);
    }

    /// Takes one retry from the budget; `false` when none is left.
    ///
    /// NOTE: the sum and the add are not one atomic step: requests retrying at the same
    /// moment may each see the last retry left and take it. The overshoot is bounded by the
    /// number of requests deciding at once, and the next decisions see it.
    pub fn withdraw(&self) -> bool {
        let inner = &*self.inner;
        let slot = inner.slot(Instant::now());
        let requests = Inner::sum(&inner.requests, slot);
        let retries = Inner::sum(&inner.retries, slot);
        let allowed = requests.saturating_mul(inner.ratio) / PPM
            + inner.floor.saturating_mul(inner.window.as_secs());
        if retries >= allowed {
            return false;
        }
        Inner::add(&inner.retries, slot);
        true
    }
}

impl Default for Budget {
    /// 20% extra load at most, with a floor of 10 retries per second, over 10 s.
    fn default() -> Self {
        Self::from_parts(PPM / 5, 10, Duration::from_secs(10))
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
        let ratio = self.inner.ratio as f64 / PPM as f64;
        f.debug_struct("Budget")
            .field("ratio", &ratio)
            .field("floor", &self.inner.floor)
            .field("window", &self.inner.window)
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

/// A slot's count lives in the low 40 bits; the slot number it counts for in the high 24
/// (slot numbers wrap after 16 million slots, weeks at the shortest window: a count
/// is never mistaken for one that old, since the window is 10 slots).
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const TAG_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

impl Inner {
    /// The number of the slot `now` falls in.
    fn slot(&self, now: Instant) -> u64 {
        let nanos =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        nanos / self.slot_nanos.max(1)
    }

    /// Adds one to `slot`'s count, resetting a count left from an older turn of the ring.
    fn add(counts: &[AtomicU64; SLOTS], slot: u64) {
        let cell = &counts[Self::index(slot)];
        let tag = slot & TAG_MASK;
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            let held = current >> COUNT_BITS;
            let next = if held == tag {
                current + u64::from(current & COUNT_MASK < COUNT_MASK)
            } else if held.wrapping_sub(tag) & TAG_MASK < TAG_MASK / 2 {
                // A later turn of the ring holds the cell (this caller was descheduled
                // for a whole window): its count is not ours to reset.
                return;
            } else {
                (tag << COUNT_BITS) | 1
            };
            match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// The counts of the window ending with `slot`.
    fn sum(counts: &[AtomicU64; SLOTS], slot: u64) -> u64 {
        (0..SLOTS as u64)
            .filter_map(|back| slot.checked_sub(back))
            .map(|s| {
                let value = counts[Self::index(s)].load(Ordering::Relaxed);
                if value >> COUNT_BITS == s & TAG_MASK {
                    value & COUNT_MASK
                } else {
                    0
                }
            })
            .sum()
    }

    fn index(slot: u64) -> usize {
        // NOTE: the remainder is < SLOTS.
        usize::try_from(slot % SLOTS as u64).unwrap_or(0)
    }
}

// === impl InvalidBudget ===

impl fmt::Display for InvalidBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidBudget {}
