//! Deadlines from durations a user configures.

use std::time::Duration;

use tokio::time::Instant;

/// When a request must have its answer: a request extension, set by the route's total
/// timeout and read by the layers below it (a retry is not started when it could not end
/// in time; a try is cut when the deadline comes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

/// How far ahead a deadline "never" is: what tokio itself uses for an endless sleep.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The instant `after` past `from`; for a duration too long to be a deadline (`Duration::MAX`
/// as "forever", say) one that never comes in practice, thirty years away, instead of a
/// panic on overflow.
///
/// Every layer that turns a configured duration into a deadline goes through here, so that
/// a setting of "forever" behaves the same everywhere.
///
/// ```
/// use std::time::Duration;
/// use gateway_core::time::deadline;
/// use tokio::time::Instant;
///
/// let now = Instant::now();
/// assert!(deadline(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
/// ```
pub fn deadline(from: Instant, after: Duration) -> Instant {
    // NOTE: thirty years past any instant a process sees fits in an `Instant` (tokio's
    // endless sleep makes the same assumption).
    from + after.min(FAR)
}

// === impl Deadline ===

impl Deadline {
    /// The deadline `at`.
    pub const fn new(at: Instant) -> Self {
        Self(at)
    }

    /// When it is.
    pub const fn at(self) -> Instant {
        self.0
    }

    /// The time left before it (zero once it has passed).
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_durations_do_not_overflow() {
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::MAX), now + FAR);
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
