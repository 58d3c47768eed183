//! Command delivery to masters as a state machine without I/O: what to send, when to send it
//! again, and how each command ends. It never sends a command at or after its expiry, and it
//! ends each command exactly once. The driver persists every action before performing it.

use std::collections::BTreeMap;

use firmware_protocol::message::{AckErrorCode, AckResult, CommandAck};

use crate::store::{CommandOutcome, CommandRecord};

#[derive(Debug, Clone, Copy)]
pub struct DeliveryLimits {
    pub ack_timeout_ms: i64,
    pub attempts_max: u32,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryAction {
    /// Sign and publish this command (again); `attempt` counts from 1.
    Send {
        command: Box<CommandRecord>,
        attempt: u32,
    },
    /// The command is over: persist the outcome and report it.
    Finish { id: i64, outcome: CommandOutcome },
}

#[derive(Debug, Clone)]
struct InFlight {
    command: CommandRecord,
    attempts: u32,
    ack_deadline_ms: i64,
}

#[derive(Debug)]
pub struct Delivery {
    limits: DeliveryLimits,
    in_flight: BTreeMap<i64, InFlight>,
}

impl Delivery {
    pub fn new(limits: DeliveryLimits) -> Delivery {
        Delivery {
            limits,
            in_flight: BTreeMap::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A command to deliver: new, or found open in the store after a restart (`attempts` sent
    /// already). Sending again after a restart is safe: masters apply a command id at most once.
    pub fn admit(&mut self, command: CommandRecord, now_ms: i64) -> Vec<DeliveryAction> {
        if self.in_flight.contains_key(&command.id) {
            return vec![];
        }
        if now_ms >= command.expires_at_ms {
            return vec![expired_action(&command)];
        }
        let (id, attempts) = (command.id, command.attempts);
        self.in_flight.insert(
            id,
            InFlight {
                command,
                attempts,
                ack_deadline_ms: now_ms,
            },
        );
        self.send(id, now_ms).into_iter().collect()
    }

    fn send(&mut self, id: i64, now_ms: i64) -> Option<DeliveryAction> {
        let limits = self.limits;
        let flight = self.in_flight.get_mut(&id)?;
        if flight.attempts >= limits.attempts_max {
            let attempts = flight.attempts;
            self.in_flight.remove(&id);
            return Some(DeliveryAction::Finish {
                id,
                outcome: CommandOutcome::Failed {
                    reason: format!("no ack from the master after {attempts} attempts"),
                    execution_time_ms: None,
                },
            });
        }
        flight.attempts += 1;
        flight.ack_deadline_ms = now_ms + limits.ack_timeout_ms;
        Some(DeliveryAction::Send {
            command: Box::new(flight.command.clone()),
            attempt: flight.attempts,
        })
    }

    /// A command already sent once by its creator (the automation path signs and publishes a
    /// command in the step that decided it, to save a hop): only its ack is awaited here.
    pub fn track(&mut self, command: CommandRecord, sent_at_ms: i64) {
        let id = command.id;
        let attempts = command.attempts.max(1);
        self.in_flight.entry(id).or_insert(InFlight {
            command,
            attempts,
            ack_deadline_ms: sent_at_ms + self.limits.ack_timeout_ms,
        });
    }

    /// The emergency stop: nothing in flight is sent again. Commands made only of `off` actions
    /// stay (switching off is always safe); the others end as failed with `reason`.
    pub fn cancel_switching_on(&mut self, reason: &str) -> Vec<DeliveryAction> {
        let doomed: Vec<i64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.command.actions.iter().any(|a| a == "on"))
            .map(|(id, _)| *id)
            .collect();
        doomed
            .into_iter()
            .filter_map(|id| self.in_flight.remove(&id))
            .map(|f| DeliveryAction::Finish {
                id: f.command.id,
                outcome: CommandOutcome::Failed {
                    reason: reason.to_string(),
                    execution_time_ms: None,
                },
            })
            .collect()
    }

    /// The master's answer. An ack for a command not in flight (a duplicate, or one that
    /// already ended) is ignored.
    pub fn on_ack(&mut self, ack: &CommandAck) -> Vec<DeliveryAction> {
        let Some(id) = ack.command_id.map(crate::bridge::local_command_id) else {
            return vec![];
        };
        if !self.in_flight.contains_key(&id) {
            return vec![];
        }
        let execution_time_ms = u32::try_from(ack.execution_time_ms).unwrap_or(u32::MAX);
        let reason = || {
            ack.error
                .as_ref()
                .map(|e| format!("{}: {}", code_name(e.code), e.message))
                .unwrap_or_else(|| "refused by the master".to_string())
        };
        let outcome = match ack.result {
            AckResult::Completed | AckResult::Duplicate => CommandOutcome::Completed {
                execution_time_ms,
                relay_states: (!ack.relay_states.is_empty()).then(|| ack.relay_states.clone()),
            },
            AckResult::Expired => CommandOutcome::Expired,
            AckResult::Rejected | AckResult::Failed => {
                // A replay rejection means our counter fell behind the master's (a restored
                // database, say): sending again with a fresh counter is the remedy.
                if ack.error.as_ref().map(|e| e.code) == Some(AckErrorCode::Replayed) {
                    return vec![];
                }
                CommandOutcome::Failed {
                    reason: reason(),
                    execution_time_ms: Some(execution_time_ms),
                }
            }
        };
        self.in_flight.remove(&id);
        vec![DeliveryAction::Finish { id, outcome }]
    }

    /// Time passed while the broker is unreachable: nothing can be sent, so no attempt is spent
    /// and ack deadlines move on; only what expired ends.
    pub fn on_tick_disconnected(&mut self, now_ms: i64) -> Vec<DeliveryAction> {
        let ack_timeout_ms = self.limits.ack_timeout_ms;
        let expired: Vec<i64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now_ms >= f.command.expires_at_ms)
            .map(|(id, _)| *id)
            .collect();
        for flight in self.in_flight.values_mut() {
            flight.ack_deadline_ms = flight.ack_deadline_ms.max(now_ms + ack_timeout_ms);
        }
        let mut actions = Vec::new();
        for id in expired {
            if let Some(flight) = self.in_flight.remove(&id) {
                actions.push(DeliveryAction::Finish {
                    id,
                    outcome: if flight.attempts == 0 {
                        CommandOutcome::Expired
                    } else {
                        CommandOutcome::Failed {
                            reason: format!(
                                "no ack from the master before expiry ({} attempts; broker unreachable)",
                                flight.attempts
                            ),
                            execution_time_ms: None,
                        }
                    },
                });
            }
        }
        actions
    }

    /// Time passed: resend what waited too long for its ack, end what expired.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<DeliveryAction> {
        let due: Vec<i64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now_ms >= f.ack_deadline_ms)
            .map(|(id, _)| *id)
            .collect();
        let mut actions = Vec::new();
        for id in due {
            let Some(flight) = self.in_flight.get(&id) else {
                continue;
            };
            if now_ms >= flight.command.expires_at_ms {
                // Sent, never acknowledged, and now too late to send again. The master refuses
                // it after expiry too, so it did not run late; whether it ran in time is unknown.
                let attempts = flight.attempts;
                self.in_flight.remove(&id);
                actions.push(DeliveryAction::Finish {
                    id,
                    outcome: if attempts == 0 {
                        CommandOutcome::Expired
                    } else {
                        CommandOutcome::Failed {
                            reason: format!(
                                "no ack from the master before expiry ({attempts} attempts)"
                            ),
                            execution_time_ms: None,
                        }
                    },
                });
                continue;
            }
            actions.extend(self.send(id, now_ms));
        }
        actions
    }

    /// The earliest time `on_tick` has something to do.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        self.in_flight
            .values()
            .map(|f| f.ack_deadline_ms.min(f.command.expires_at_ms))
            .min()
    }
}

fn expired_action(command: &CommandRecord) -> DeliveryAction {
    DeliveryAction::Finish {
        id: command.id,
        outcome: CommandOutcome::Expired,
    }
}

fn code_name(code: AckErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{code:?}"))
}

#[cfg(test)]
mod tests {
    use firmware_protocol::message::AckError;
    use firmware_protocol::{CommandId, PROTOCOL_VERSION};

    use super::*;
    use crate::store::CommandState;

    const LIMITS: DeliveryLimits = DeliveryLimits {
        ack_timeout_ms: 1_000,
        attempts_max: 3,
    };

    fn command(id: i64, expires_at_ms: i64) -> CommandRecord {
        CommandRecord {
            id,
            master_device_id: "M".into(),
            slave_mac_address: "14:33:5C:38:BF:60".into(),
            slave_device_id: None,
            relay_numbers: vec![0],
            actions: vec!["on".into()],
            duration_seconds: vec![60],
            command_type: "manual".into(),
            triggered_by: "manual".into(),
            priority: 10,
            rule_id: None,
            rule_name: None,
            expires_at_ms,
            state: CommandState::Accepted,
            attempts: 0,
            last_sent_at_ms: None,
            polled_by: None,
        }
    }

    fn ack(id: i64, result: AckResult, error: Option<AckErrorCode>) -> CommandAck {
        CommandAck {
            v: PROTOCOL_VERSION,
            command_id: Some(CommandId::backend(id).unwrap()),
            result,
            error: error.map(|code| AckError {
                code,
                message: "why".into(),
            }),
            slave_mac: None,
            relay_states: vec![true, false],
            execution_time_ms: 120,
            counter: None,
            sig: None,
        }
    }

    fn sends(actions: &[DeliveryAction]) -> Vec<(i64, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                DeliveryAction::Send { command, attempt } => Some((command.id, *attempt)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_command_is_sent_once_and_completed_by_its_ack() {
        let mut d = Delivery::new(LIMITS);
        assert_eq!(sends(&d.admit(command(1, 10_000), 0)), vec![(1, 1)]);
        assert!(
            d.admit(command(1, 10_000), 1).is_empty(),
            "admitted twice, sent once"
        );
        let done = d.on_ack(&ack(1, AckResult::Completed, None));
        assert_eq!(
            done,
            vec![DeliveryAction::Finish {
                id: 1,
                outcome: CommandOutcome::Completed {
                    execution_time_ms: 120,
                    relay_states: Some(vec![true, false])
                }
            }]
        );
        assert!(
            d.on_ack(&ack(1, AckResult::Completed, None)).is_empty(),
            "a second ack ends nothing"
        );
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn an_expired_command_is_never_sent() {
        let mut d = Delivery::new(LIMITS);
        assert_eq!(
            d.admit(command(1, 500), 500),
            vec![DeliveryAction::Finish {
                id: 1,
                outcome: CommandOutcome::Expired
            }]
        );
    }

    #[test]
    fn without_an_ack_a_command_is_resent_then_failed_with_a_reason() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 100_000), 0);
        assert!(d.on_tick(999).is_empty());
        assert_eq!(sends(&d.on_tick(1_000)), vec![(1, 2)]);
        assert_eq!(sends(&d.on_tick(2_000)), vec![(1, 3)]);
        match d.on_tick(3_000).as_slice() {
            [
                DeliveryAction::Finish {
                    id: 1,
                    outcome: CommandOutcome::Failed { reason, .. },
                },
            ] => {
                assert!(reason.contains("3 attempts"), "{reason}")
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn no_resend_happens_at_or_after_the_expiry() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 1_500), 0);
        match d.on_tick(1_500).as_slice() {
            [
                DeliveryAction::Finish {
                    outcome: CommandOutcome::Failed { reason, .. },
                    ..
                },
            ] => {
                assert!(reason.contains("before expiry"))
            }
            other => panic!("expected a failure at expiry, got {other:?}"),
        }
    }

    #[test]
    fn while_the_broker_is_away_no_attempt_is_spent_but_expiry_still_ends_commands() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 100_000), 0);
        d.admit(command(2, 20_000), 0);
        for t in (1_000..20_000).step_by(1_000) {
            assert!(
                d.on_tick_disconnected(t).is_empty(),
                "nothing ends or resends at {t}"
            );
        }
        match d.on_tick_disconnected(20_000).as_slice() {
            [
                DeliveryAction::Finish {
                    id: 2,
                    outcome: CommandOutcome::Failed { reason, .. },
                },
            ] => {
                assert!(reason.contains("broker unreachable"))
            }
            other => panic!("expected command 2 to end at its expiry, got {other:?}"),
        }
        // Back online: the first resend is attempt 2, not a failure.
        assert_eq!(sends(&d.on_tick(21_000)), vec![(1, 2)]);
    }

    #[test]
    fn a_restart_resumes_the_attempt_count() {
        let mut d = Delivery::new(LIMITS);
        let mut cmd = command(1, 100_000);
        cmd.attempts = 2;
        assert_eq!(sends(&d.admit(cmd, 0)), vec![(1, 3)]);
    }

    #[test]
    fn rejections_fail_with_the_masters_reason_and_expiry_is_kept_apart() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 100_000), 0);
        d.admit(command(2, 100_000), 0);
        match d
            .on_ack(&ack(
                1,
                AckResult::Rejected,
                Some(AckErrorCode::BadSignature),
            ))
            .as_slice()
        {
            [
                DeliveryAction::Finish {
                    outcome: CommandOutcome::Failed { reason, .. },
                    ..
                },
            ] => {
                assert!(reason.starts_with("bad_signature"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            d.on_ack(&ack(2, AckResult::Expired, None)),
            vec![DeliveryAction::Finish {
                id: 2,
                outcome: CommandOutcome::Expired
            }]
        );
    }

    #[test]
    fn a_replay_rejection_leaves_the_command_to_be_sent_again_with_a_new_counter() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 100_000), 0);
        assert!(
            d.on_ack(&ack(1, AckResult::Rejected, Some(AckErrorCode::Replayed)))
                .is_empty()
        );
        assert_eq!(sends(&d.on_tick(1_000)), vec![(1, 2)]);
    }

    #[test]
    fn a_command_sent_by_its_creator_is_only_awaited_and_resent_on_timeout() {
        let mut d = Delivery::new(LIMITS);
        let mut edge = command(-3, 10_000);
        edge.attempts = 1;
        d.track(edge, 0);
        assert!(
            d.on_tick(999).is_empty(),
            "not sent again before the ack timeout"
        );
        assert_eq!(sends(&d.on_tick(1_000)), vec![(-3, 2)]);
        let mut done = ack(1, AckResult::Completed, None);
        done.command_id = Some(CommandId::edge(3).unwrap());
        assert!(matches!(
            d.on_ack(&done).as_slice(),
            [DeliveryAction::Finish {
                id: -3,
                outcome: CommandOutcome::Completed { .. }
            }]
        ));
    }

    #[test]
    fn the_emergency_stop_ends_every_command_that_switches_on_and_keeps_the_offs() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 10_000), 0);
        let mut off = command(2, 10_000);
        off.actions = vec!["off".into()];
        d.admit(off, 0);
        let ended = d.cancel_switching_on("emergency stop");
        assert!(matches!(
            ended.as_slice(),
            [DeliveryAction::Finish {
                id: 1,
                outcome: CommandOutcome::Failed { .. }
            }]
        ));
        assert_eq!(d.in_flight(), 1);
        assert!(sends(&d.on_tick(1_000)).iter().all(|(id, _)| *id == 2));
    }
}
