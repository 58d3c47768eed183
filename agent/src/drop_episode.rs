//! Telemetry dropped at the outbox bound, logged as a change of state: once when dropping
//! begins, a summary a minute while it lasts, once when it ends with the total. Every drop is
//! counted (`telemetry_dropped`); a log line per flush said the same thing a thousand times in
//! a ten-minute outage. Sans-I/O: the writer feeds it each flush's count and the time.

/// How often a summary is logged while dropping lasts.
const SUMMARY_EVERY_MS: i64 = 60_000;

#[derive(Debug, Default)]
pub struct DropEpisode {
    /// Since when readings are being dropped, and how many so far.
    began_ms: Option<i64>,
    dropped: u64,
    /// Dropped since the last line logged.
    unreported: u64,
    last_line_ms: i64,
}

/// What to log after one flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropLog {
    Nothing,
    Began { dropped: u64 },
    Lasting { since_last: u64, total: u64 },
    Ended { total: u64, lasted_ms: i64 },
}

impl DropEpisode {
    /// One flush dropped `dropped` readings (0 when the outbox had room) at `now_ms`.
    pub fn note(&mut self, dropped: u64, now_ms: i64) -> DropLog {
        match (self.began_ms, dropped) {
            (None, 0) => DropLog::Nothing,
            (None, n) => {
                *self = DropEpisode {
                    began_ms: Some(now_ms),
                    dropped: n,
                    unreported: 0,
                    last_line_ms: now_ms,
                };
                DropLog::Began { dropped: n }
            }
            (Some(began), 0) => {
                let total = self.dropped;
                *self = DropEpisode::default();
                DropLog::Ended {
                    total,
                    lasted_ms: now_ms - began,
                }
            }
            (Some(_), n) => {
                self.dropped += n;
                self.unreported += n;
                if now_ms - self.last_line_ms < SUMMARY_EVERY_MS {
                    return DropLog::Nothing;
                }
                self.last_line_ms = now_ms;
                let since_last = std::mem::take(&mut self.unreported);
                DropLog::Lasting {
                    since_last,
                    total: self.dropped,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_episode_logs_its_start_a_summary_a_minute_and_its_end_with_the_total() {
        let mut e = DropEpisode::default();
        assert_eq!(e.note(0, 0), DropLog::Nothing);
        assert_eq!(e.note(5, 1_000), DropLog::Began { dropped: 5 });
        let mut lines = Vec::new();
        // Ten minutes of flushes every 100 ms, each dropping 3.
        for i in 1..=6_000 {
            let line = e.note(3, 1_000 + i * 100);
            if line != DropLog::Nothing {
                lines.push(line);
            }
        }
        assert_eq!(lines.len(), 10, "one summary a minute: {lines:?}");
        assert_eq!(
            lines[0],
            DropLog::Lasting {
                since_last: 600 * 3,
                total: 5 + 600 * 3
            }
        );
        assert_eq!(
            e.note(0, 700_000),
            DropLog::Ended {
                total: 5 + 6_000 * 3,
                lasted_ms: 699_000
            }
        );
        assert_eq!(e.note(0, 700_100), DropLog::Nothing);
        assert_eq!(e.note(1, 800_000), DropLog::Began { dropped: 1 });
    }
}
