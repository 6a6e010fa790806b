//! The sliding windows failure and slow-call rates are computed over.

use std::collections::VecDeque;
use std::time::Duration;

/// The calls a breaker's rates are computed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window(Kind);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Count(u32),
    Time(Duration),
}

/// One call's outcome, as a window counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Outcome {
    pub(super) failed: bool,
    pub(super) slow: bool,
}

/// What a window holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Stats {
    pub(super) calls: u32,
    pub(super) failures: u32,
    pub(super) slow: u32,
}

/// A window's contents.
pub(super) enum WindowState {
    /// The last `len` outcomes, and their sums.
    Count {
        len: usize,
        outcomes: VecDeque<Outcome>,
        stats: Stats,
    },
    /// Per tenth of the window: its number and what it saw.
    Time {
        bucket: Duration,
        buckets: VecDeque<(u64, Stats)>,
    },
}

/// How many buckets a time window is cut into: a call leaves it within a tenth of the
/// window of its time.
const BUCKETS: u32 = 10;

// === impl Window ===

impl Window {
    /// The last `calls` calls.
    ///
    /// # Panics
    ///
    /// When `calls` is 0.
    pub fn count(calls: u32) -> Self {
        assert!(calls > 0, "a window holds at least one call");
        Self(Kind::Count(calls))
    }

    /// The calls of the last `span` (counted in tenths of it).
    ///
    /// # Panics
    ///
    /// When `span` is under 10 ms.
    pub fn time(span: Duration) -> Self {
        assert!(
            span >= Duration::from_millis(10),
            "a time window spans at least 10 ms"
        );
        Self(Kind::Time(span))
    }
}

// === impl WindowState ===

impl WindowState {
    pub(super) fn new(window: &Window) -> Self {
        match window.0 {
            Kind::Count(len) => Self::Count {
                len: len as usize,
                outcomes: VecDeque::with_capacity((len as usize).min(1024)),
                stats: Stats::default(),
            },
            Kind::Time(span) => Self::Time {
                bucket: span / BUCKETS,
                buckets: VecDeque::with_capacity(BUCKETS as usize),
            },
        }
    }

    /// Adds `outcome`, seen `at` (since the breaker's epoch); what the window holds now.
    pub(super) fn push(&mut self, outcome: Outcome, at: Duration) -> Stats {
        match self {
            Self::Count {
                len,
                outcomes,
                stats,
            } => {
                if outcomes.len() == *len
                    && let Some(old) = outcomes.pop_front()
                {
                    stats.remove(old);
                }
                outcomes.push_back(outcome);
                stats.add(outcome);
                *stats
            }
            Self::Time { bucket, buckets } => {
                let now =
                    u64::try_from(at.as_nanos() / bucket.as_nanos().max(1)).unwrap_or(u64::MAX);
                let oldest = now.saturating_sub(u64::from(BUCKETS - 1));
                while buckets.front().is_some_and(|(n, _)| *n < oldest) {
                    buckets.pop_front();
                }
                match buckets.back_mut() {
                    Some((n, stats)) if *n == now => stats.add(outcome),
                    _ => {
                        let mut stats = Stats::default();
                        stats.add(outcome);
                        buckets.push_back((now, stats));
                    }
                }
                buckets.iter().fold(Stats::default(), |sum, (_, s)| Stats {
                    calls: sum.calls + s.calls,
                    failures: sum.failures + s.failures,
                    slow: sum.slow + s.slow,
                })
            }
        }
    }

    /// Empties the window (the breaker closed: it starts afresh).
    pub(super) fn clear(&mut self) {
        match self {
            Self::Count {
                outcomes, stats, ..
            } => {
                outcomes.clear();
                *stats = Stats::default();
            }
            Self::Time { buckets, .. } => buckets.clear(),
        }
    }
}

// === impl Stats ===

impl Stats {
    fn add(&mut self, outcome: Outcome) {
        self.calls += 1;
        self.failures += u32::from(outcome.failed);
        self.slow += u32::from(outcome.slow);
    }

    fn remove(&mut self, outcome: Outcome) {
        self.calls -= 1;
        self.failures -= u32::from(outcome.failed);
        self.slow -= u32::from(outcome.slow);
    }
}
