//! The history checker: pure, so each verdict is shown by a hand-made history in its tests.
//!
//! Verdicts on commands:
//! - LOST: never ended in the cloud (still pending, processing or sent after the drain);
//! - DUPLICATED: a relay switched more than once for one command;
//! - LATE: a relay switched after the command's expiry;
//! - WRONG: the cloud's record differs from what the relays did (`completed` with a relay that
//!   never switched, or failed, expired or cancelled with a relay that did).
//!
//! On readings: a reading the agent accepted that is not in the cloud is lost (beyond those it
//! counted as dropped at its outbox bound); a reading in the cloud twice is duplicated.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use super::history::{FINAL_STATES, History, ReadingKey};

/// A verdict on one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Lost,
    Duplicated,
    Late,
    Wrong,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Lost => "LOST",
            Verdict::Duplicated => "DUPLICATED",
            Verdict::Late => "LATE",
            Verdict::Wrong => "WRONG",
        })
    }
}

/// One command that got a verdict, with what shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    pub command: i64,
    pub detail: String,
}

/// The checker's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub commands: usize,
    /// Of them, made by the Pi itself (offs at the end of a duration, all-offs).
    pub made_by_pi: usize,
    /// Final cloud states and how many commands ended in each.
    pub outcomes: BTreeMap<String, usize>,
    /// Commands the cloud handed out more than once.
    pub redelivered: usize,
    pub findings: Vec<Finding>,
    pub readings_accepted: usize,
    pub readings_in_cloud: usize,
    pub readings_lost: usize,
    pub readings_duplicated: usize,
    pub readings_dropped_at_bound: u64,
    pub drain: Option<Duration>,
}

impl Report {
    pub fn count(&self, verdict: Verdict) -> usize {
        self.findings
            .iter()
            .filter(|f| f.verdict == verdict)
            .count()
    }

    /// No command lost, duplicated, late or wrong, and no reading lost or duplicated.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.readings_lost == 0 && self.readings_duplicated == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "commands: {} ({} made by the Pi itself)",
            self.commands, self.made_by_pi
        )?;
        for (state, n) in &self.outcomes {
            writeln!(f, "  {state}: {n}")?;
        }
        writeln!(f, "  handed out more than once: {}", self.redelivered)?;
        for verdict in [
            Verdict::Lost,
            Verdict::Duplicated,
            Verdict::Late,
            Verdict::Wrong,
        ] {
            writeln!(f, "{verdict}: {}", self.count(verdict))?;
        }
        writeln!(
            f,
            "readings: {} accepted by the agent, {} in the cloud, {} lost, {} duplicated, {} dropped at the outbox bound",
            self.readings_accepted,
            self.readings_in_cloud,
            self.readings_lost,
            self.readings_duplicated,
            self.readings_dropped_at_bound
        )?;
        match self.drain {
            Some(d) => writeln!(f, "drain after the last heal: {} ms", d.as_millis())?,
            None => writeln!(f, "drain after the last heal: did not drain")?,
        }
        for finding in &self.findings {
            writeln!(
                f,
                "{} command {}: {}",
                finding.verdict, finding.command, finding.detail
            )?;
        }
        Ok(())
    }
}

/// Judges one run's history.
pub fn check(history: &History) -> Report {
    let mut report = Report {
        commands: history.commands.len(),
        drain: history.drain,
        ..Report::default()
    };
    for c in &history.commands {
        *report.outcomes.entry(c.status.clone()).or_default() += 1;
        if c.command_type != "manual" {
            report.made_by_pi += 1;
        }
        if c.delivery_count > 1 {
            report.redelivered += 1;
        }
        let mut finding = |verdict, detail: String| {
            report.findings.push(Finding {
                verdict,
                command: c.id,
                detail,
            })
        };
        let ended = FINAL_STATES.contains(&c.status.as_str());
        if !ended {
            finding(
                Verdict::Lost,
                format!(
                    "still {} in the cloud at the end (delivered {} times)",
                    c.status, c.delivery_count
                ),
            );
        }
        for relay in &c.relays {
            let switched: Vec<_> = c.actuations.iter().filter(|a| a.relay == *relay).collect();
            if switched.len() > 1 {
                let times: Vec<i64> = switched.iter().map(|a| a.at_ms).collect();
                finding(
                    Verdict::Duplicated,
                    format!(
                        "relay {relay} switched {} times, at {times:?}",
                        switched.len()
                    ),
                );
            }
            if let Some(late) = switched.iter().find(|a| a.at_ms > c.expires_ms) {
                finding(
                    Verdict::Late,
                    format!(
                        "relay {relay} switched {} ms after the expiry",
                        late.at_ms - c.expires_ms
                    ),
                );
            }
            match c.status.as_str() {
                "completed" if switched.is_empty() => finding(
                    Verdict::Wrong,
                    format!("completed in the cloud, but relay {relay} never switched"),
                ),
                "failed" | "expired" | "cancelled" if !switched.is_empty() => finding(
                    Verdict::Wrong,
                    format!(
                        "{} in the cloud ({}), but relay {relay} switched at {}",
                        c.status,
                        c.error.as_deref().unwrap_or("no error"),
                        switched[0].at_ms
                    ),
                ),
                _ => {}
            }
        }
    }
    report.findings.sort_by_key(|f| (f.verdict, f.command));

    let readings = &history.readings;
    let mut in_cloud: BTreeMap<&ReadingKey, usize> = BTreeMap::new();
    for r in &readings.in_cloud {
        *in_cloud.entry(r).or_default() += 1;
    }
    let accepted: BTreeSet<&ReadingKey> = readings.accepted.iter().collect();
    let missing = accepted
        .iter()
        .filter(|r| !in_cloud.contains_key(*r))
        .count();
    report.readings_accepted = accepted.len();
    report.readings_in_cloud = readings.in_cloud.len();
    report.readings_dropped_at_bound = readings.dropped_at_bound;
    // Which readings the bound dropped is not recorded, only how many: the rest are lost.
    report.readings_lost = missing.saturating_sub(readings.dropped_at_bound as usize);
    report.readings_duplicated = in_cloud.values().map(|n| n - 1).sum();
    report
}

#[cfg(test)]
mod tests {
    use super::super::history::{AckSeen, Actuation, CommandHistory, Readings};
    use super::*;

    fn command(id: i64, status: &str, switched_at: &[i64]) -> CommandHistory {
        CommandHistory {
            id,
            master: "M".into(),
            relays: vec![0],
            created_ms: 1_000,
            expires_ms: 21_000,
            locked_ms: Some(1_100),
            delivery_count: 1,
            sent_ms: Some(1_150),
            completed_ms: None,
            status: status.into(),
            error: None,
            command_type: "manual".into(),
            acks: vec![AckSeen {
                result: "completed".into(),
                at_ms: 1_300,
            }],
            actuations: switched_at
                .iter()
                .map(|t| Actuation {
                    relay: 0,
                    action: "on".into(),
                    at_ms: *t,
                })
                .collect(),
        }
    }

    fn verdicts(history: &History) -> Vec<(Verdict, i64)> {
        check(history)
            .findings
            .iter()
            .map(|f| (f.verdict, f.command))
            .collect()
    }

    fn key(t: i64) -> ReadingKey {
        ReadingKey {
            device_id: "M".into(),
            sensor_key: "ph".into(),
            recorded_at_ms: t,
        }
    }

    #[test]
    fn a_history_where_every_relay_did_what_the_cloud_says_is_clean() {
        let history = History {
            commands: vec![
                command(1, "completed", &[1_200]),
                command(2, "expired", &[]),
                command(3, "failed", &[]),
            ],
            readings: Readings {
                accepted: vec![key(1), key(2)],
                in_cloud: vec![key(2), key(1)],
                dropped_at_bound: 0,
            },
            drain: Some(Duration::from_millis(800)),
        };
        let report = check(&history);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.outcomes["completed"], 1);
        assert_eq!(report.readings_accepted, 2);
    }

    #[test]
    fn a_command_that_never_ended_in_the_cloud_is_lost() {
        for status in ["pending", "processing", "sent"] {
            let history = History {
                commands: vec![command(7, status, &[])],
                ..History::default()
            };
            assert_eq!(verdicts(&history), [(Verdict::Lost, 7)], "{status}");
        }
    }

    #[test]
    fn a_relay_switched_twice_by_one_command_is_duplicated() {
        let history = History {
            commands: vec![command(4, "completed", &[1_200, 4_000])],
            ..History::default()
        };
        assert_eq!(verdicts(&history), [(Verdict::Duplicated, 4)]);
    }

    #[test]
    fn a_relay_switched_after_the_expiry_is_late() {
        let history = History {
            commands: vec![command(5, "completed", &[21_001])],
            ..History::default()
        };
        assert_eq!(verdicts(&history), [(Verdict::Late, 5)]);
        // At the expiry itself is not late.
        let history = History {
            commands: vec![command(5, "completed", &[21_000])],
            ..History::default()
        };
        assert!(verdicts(&history).is_empty());
    }

    #[test]
    fn completed_without_a_switch_and_ended_unsuccessfully_with_one_are_wrong() {
        let history = History {
            commands: vec![
                command(1, "completed", &[]),
                command(2, "expired", &[1_200]),
                command(3, "failed", &[1_200]),
                command(4, "cancelled", &[1_200]),
            ],
            ..History::default()
        };
        assert_eq!(
            verdicts(&history),
            [
                (Verdict::Wrong, 1),
                (Verdict::Wrong, 2),
                (Verdict::Wrong, 3),
                (Verdict::Wrong, 4)
            ]
        );
    }

    #[test]
    fn only_the_relay_that_never_switched_makes_a_completed_command_wrong() {
        let mut c = command(9, "completed", &[1_200]);
        c.relays = vec![0, 1];
        let history = History {
            commands: vec![c],
            ..History::default()
        };
        let report = check(&history);
        assert_eq!(report.count(Verdict::Wrong), 1);
        assert!(report.findings[0].detail.contains("relay 1"), "{report}");
    }

    #[test]
    fn accepted_readings_missing_in_the_cloud_are_lost_beyond_those_counted_dropped() {
        let history = History {
            readings: Readings {
                accepted: vec![key(1), key(2), key(3), key(4)],
                in_cloud: vec![key(1)],
                dropped_at_bound: 1,
            },
            ..History::default()
        };
        let report = check(&history);
        assert_eq!(report.readings_lost, 2);
        assert_eq!(report.readings_dropped_at_bound, 1);
        assert!(!report.is_clean());
    }

    #[test]
    fn a_reading_twice_in_the_cloud_is_duplicated() {
        let history = History {
            readings: Readings {
                accepted: vec![key(1)],
                in_cloud: vec![key(1), key(1), key(1)],
                dropped_at_bound: 0,
            },
            ..History::default()
        };
        let report = check(&history);
        assert_eq!(report.readings_duplicated, 2);
        assert_eq!(report.readings_lost, 0);
        assert!(!report.is_clean());
    }

    #[test]
    fn the_report_prints_every_count_and_each_finding() {
        let history = History {
            commands: vec![command(1, "completed", &[]), command(2, "pending", &[])],
            drain: None,
            ..History::default()
        };
        let text = check(&history).to_string();
        for line in [
            "LOST: 1",
            "DUPLICATED: 0",
            "LATE: 0",
            "WRONG: 1",
            "did not drain",
            "WRONG command 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
