//! Deadlines from durations a user configures.

use std::time::Duration;

use tokio::time::Instant;

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
