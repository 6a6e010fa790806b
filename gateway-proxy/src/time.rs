//! Deadlines from durations a user configures.

use std::time::Duration;

use tokio::time::Instant;

/// How far ahead a deadline "never" is: what tokio itself uses for an endless sleep.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `after` from `from`, or a deadline that never comes when `after` is too long to be one
/// (`Duration::MAX`, or anything past what `Instant` holds): a setting of "forever" must
/// not panic on overflow.
pub(crate) fn deadline(from: Instant, after: Duration) -> Instant {
    from.checked_add(after.min(FAR)).unwrap_or(from)
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
