//! Unix milliseconds from tokio's clock, so rule timing follows `tokio::time::pause` and
//! `advance` in tests and the wall clock in production.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    anchor: Instant,
    anchor_ms: i64,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// Anchored at the system time now.
    pub fn new() -> Clock {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Clock::starting_at(ms)
    }

    /// Anchored at a given Unix time (tests pick one, e.g. a known weekday).
    pub fn starting_at(unix_ms: i64) -> Clock {
        Clock {
            anchor: Instant::now(),
            anchor_ms: unix_ms,
        }
    }

    pub fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.anchor.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.anchor_ms.saturating_add(elapsed)
    }

    /// The tokio instant of a Unix time (times before the anchor map to the anchor).
    pub fn instant_at(&self, unix_ms: i64) -> Instant {
        let ahead = u64::try_from(unix_ms.saturating_sub(self.anchor_ms)).unwrap_or(0);
        // Far-future deadlines are capped at a year; the loop recomputes them on wake.
        let ahead = ahead.min(365 * 86_400_000);
        self.anchor + Duration::from_millis(ahead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_unix_ms_to_instants_and_back() {
        let clock = Clock::starting_at(1_000_000);
        let now = clock.now_ms();
        assert!((1_000_000..1_060_000).contains(&now));
        assert_eq!(
            clock.instant_at(1_005_000) - clock.instant_at(1_000_000),
            Duration::from_secs(5)
        );
        // Past times map to the anchor; far futures are capped rather than overflowing.
        assert_eq!(clock.instant_at(i64::MIN), clock.instant_at(0));
        assert!(clock.instant_at(i64::MAX) > clock.instant_at(1_000_000));
        assert!(Clock::new().now_ms() > 1_600_000_000_000);
    }
}
