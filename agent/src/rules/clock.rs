//! Unix milliseconds for the engine: the system's wall clock in production, so schedules and
//! time windows follow the Pi's clock when NTP corrects it (a Pi has no battery clock and may
//! boot hours off), and a simulated wall clock on tokio's clock in tests, which `pause`/`advance`
//! move and [`Clock::jump`] sets forward or back.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The driver sleeps at most this long, so a wall clock set forward or back while it waits is
/// noticed within this time.
pub const WAKE_AT_LEAST_EVERY_MS: u64 = 60_000;

#[derive(Debug, Clone)]
pub struct Clock {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    System,
    Simulated {
        anchor: Instant,
        anchor_ms: i64,
        /// What [`Clock::jump`] added, shared by every clone.
        jumped_ms: Arc<AtomicI64>,
    },
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// The system's wall clock.
    pub fn new() -> Clock {
        Clock {
            source: Source::System,
        }
    }

    /// A simulated wall clock at `unix_ms` now, moving with tokio's clock (tests pick a time,
    /// e.g. a known weekday).
    pub fn starting_at(unix_ms: i64) -> Clock {
        Clock {
            source: Source::Simulated {
                anchor: Instant::now(),
                anchor_ms: unix_ms,
                jumped_ms: Arc::new(AtomicI64::new(0)),
            },
        }
    }

    /// Sets a simulated wall clock forward (positive) or back, as an operator or NTP would;
    /// the system clock is not this program's to change, so there it does nothing.
    pub fn jump(&self, by_ms: i64) {
        if let Source::Simulated { jumped_ms, .. } = &self.source {
            jumped_ms.fetch_add(by_ms, Ordering::SeqCst);
        }
    }

    pub fn now_ms(&self) -> i64 {
        match &self.source {
            Source::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            Source::Simulated {
                anchor,
                anchor_ms,
                jumped_ms,
            } => {
                let elapsed = i64::try_from(anchor.elapsed().as_millis()).unwrap_or(i64::MAX);
                anchor_ms
                    .saturating_add(elapsed)
                    .saturating_add(jumped_ms.load(Ordering::SeqCst))
            }
        }
    }

    /// When to wake for the Unix time `unix_ms`: at once if it has passed, and never later
    /// than [`WAKE_AT_LEAST_EVERY_MS`] from now.
    pub fn instant_at(&self, unix_ms: i64) -> Instant {
        let ahead = u64::try_from(unix_ms.saturating_sub(self.now_ms())).unwrap_or(0);
        Instant::now() + Duration::from_millis(ahead.min(WAKE_AT_LEAST_EVERY_MS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_simulated_clock_follows_tokio_and_jumps() {
        let clock = Clock::starting_at(1_000_000);
        assert_eq!(clock.now_ms(), 1_000_000);
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(clock.now_ms(), 1_001_500);
        let copy = clock.clone();
        copy.jump(-3_600_000);
        assert_eq!(clock.now_ms(), 1_001_500 - 3_600_000);
        assert_eq!(
            clock.instant_at(clock.now_ms() + 5_000) - Instant::now(),
            Duration::from_secs(5)
        );
        // Past times wake at once; far futures wake within the bound, then look again.
        assert_eq!(clock.instant_at(i64::MIN), Instant::now());
        assert_eq!(
            clock.instant_at(i64::MAX) - Instant::now(),
            Duration::from_millis(WAKE_AT_LEAST_EVERY_MS)
        );
    }

    #[test]
    fn the_system_clock_is_the_wall_clock() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let now = Clock::new().now_ms();
        assert!(now >= before && now < before + 60_000);
    }
}
