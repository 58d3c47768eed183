//! Command delivery to masters as a state machine without I/O: what to send, when to send it
//! again, and how each command ends. It never sends a command with less than the send margin of
//! its life left, except to ask about one that went out unanswered; it ends each command exactly
//! once, and it never ends a command that went out as `expired` on its own account: only the
//! master's answer, or its silence through every ask, ends those. The driver persists every
//! action before performing it.
//!
//! Asking: a command that went out, got no answer and can no longer run in time is sent again
//! past its expiry, up to [`OUTCOME_ASKS_MAX`] times an ack timeout apart. It cannot run then:
//! a master answers a command id it applied `duplicate` (it ran), and refuses an expired one it
//! did not apply with `expired` (it never will). So the cloud learns what the relay did,
//! after a lost ack, a broker restart or the agent's own, instead of recording `failed` for a
//! switch that happened (docs/decisions/0026).

use std::collections::{BTreeMap, VecDeque};

use firmware_protocol::message::{AckErrorCode, AckResult, CommandAck};

use crate::store::{CommandOutcome, CommandRecord};

#[derive(Debug, Clone, Copy)]
pub struct DeliveryLimits {
    pub ack_timeout_ms: i64,
    pub attempts_max: u32,
    /// A command is (re)sent only with more than this much life left, so that the master's
    /// checks and the radio hop to the slave end before the expiry.
    pub send_margin_ms: i64,
    /// Commands from the backlog awaiting one master's ack at once; more wait their turn here
    /// instead of overflowing the master's queue.
    pub in_flight_per_master: usize,
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

/// Sends past the expiry to learn what became of a command that went out unanswered: at the
/// default ack timeout (3 s) the master has 30 s to come back and say.
pub const OUTCOME_ASKS_MAX: u32 = 10;

#[derive(Debug, Clone)]
struct InFlight {
    command: CommandRecord,
    /// Sends within the command's life.
    attempts: u32,
    /// Sends past it, asking for the outcome.
    asks: u32,
    ack_deadline_ms: i64,
}

#[derive(Debug)]
pub struct Delivery {
    limits: DeliveryLimits,
    in_flight: BTreeMap<i64, InFlight>,
    /// Never sent, waiting for their master's in-flight count to drop; in admission order.
    waiting: VecDeque<CommandRecord>,
}

impl Delivery {
    pub fn new(limits: DeliveryLimits) -> Delivery {
        Delivery {
            limits,
            in_flight: BTreeMap::new(),
            waiting: VecDeque::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn sendable(&self, command: &CommandRecord, now_ms: i64) -> bool {
        now_ms + self.limits.send_margin_ms < command.expires_at_ms
    }

    fn in_flight_to(&self, master: &str) -> usize {
        self.in_flight
            .values()
            .filter(|f| f.command.master_device_id == master)
            .count()
    }

    /// A command to deliver: new, or found open in the store after a restart (`attempts` sent
    /// already). Sending again after a restart is safe: masters apply a command id at most once.
    /// One that went out before and can no longer be sent is not ended at once: the master's
    /// ack may still be on its way (held by the broker for the agent's session).
    pub fn admit(&mut self, command: CommandRecord, now_ms: i64) -> Vec<DeliveryAction> {
        let id = command.id;
        if self.in_flight.contains_key(&id) || self.waiting.iter().any(|c| c.id == id) {
            return vec![];
        }
        if command.attempts > 0 {
            let attempts = command.attempts;
            let sendable = self.sendable(&command, now_ms);
            self.in_flight.insert(
                id,
                InFlight {
                    command,
                    attempts,
                    asks: 0,
                    ack_deadline_ms: now_ms + self.limits.ack_timeout_ms,
                },
            );
            return if sendable && attempts < self.limits.attempts_max {
                self.send(id, now_ms)
            } else {
                vec![]
            };
        }
        if !self.sendable(&command, now_ms) {
            return vec![expired_action(&command)];
        }
        if self.in_flight_to(&command.master_device_id) >= self.limits.in_flight_per_master {
            self.waiting.push_back(command);
            return vec![];
        }
        self.in_flight.insert(
            id,
            InFlight {
                command,
                attempts: 0,
                asks: 0,
                ack_deadline_ms: now_ms,
            },
        );
        self.send(id, now_ms)
    }

    /// Sends `id` again, asks about it past its expiry, or ends it when it has no attempt or
    /// ask left.
    fn send(&mut self, id: i64, now_ms: i64) -> Vec<DeliveryAction> {
        let limits = self.limits;
        let sendable = match self.in_flight.get(&id) {
            Some(flight) => self.sendable(&flight.command, now_ms),
            None => return vec![],
        };
        let flight = self.in_flight.get_mut(&id).expect("looked up above");
        let attempts = flight.attempts;
        if !sendable {
            if attempts == 0 {
                return self.end(id, CommandOutcome::Expired, now_ms);
            }
            // Sent and never answered: it may have run. Asked now, it cannot run any more,
            // and the answer says whether it did.
            if flight.asks < OUTCOME_ASKS_MAX {
                flight.asks += 1;
                flight.ack_deadline_ms = now_ms + limits.ack_timeout_ms;
                return vec![DeliveryAction::Send {
                    command: Box::new(flight.command.clone()),
                    attempt: attempts + flight.asks,
                }];
            }
            let reason = format!(
                "no ack from the master before expiry, nor to {} asks after it: whether it ran is unknown",
                flight.asks
            );
            let outcome = CommandOutcome::Failed {
                reason,
                execution_time_ms: None,
            };
            return self.end(id, outcome, now_ms);
        }
        if attempts >= limits.attempts_max {
            return self.end(
                id,
                CommandOutcome::Failed {
                    reason: format!("no ack from the master after {attempts} attempts"),
                    execution_time_ms: None,
                },
                now_ms,
            );
        }
        flight.attempts += 1;
        flight.ack_deadline_ms = now_ms + limits.ack_timeout_ms;
        vec![DeliveryAction::Send {
            command: Box::new(flight.command.clone()),
            attempt: flight.attempts,
        }]
    }

    /// Ends `id` and lets the next waiting command of its master go.
    fn end(&mut self, id: i64, outcome: CommandOutcome, now_ms: i64) -> Vec<DeliveryAction> {
        let Some(flight) = self.in_flight.remove(&id) else {
            return vec![];
        };
        let mut actions = vec![DeliveryAction::Finish { id, outcome }];
        actions.extend(self.promote(&flight.command.master_device_id, now_ms));
        actions
    }

    /// Sends waiting commands of `master` while it has room.
    fn promote(&mut self, master: &str, now_ms: i64) -> Vec<DeliveryAction> {
        let mut actions = Vec::new();
        while self.in_flight_to(master) < self.limits.in_flight_per_master {
            let Some(index) = self
                .waiting
                .iter()
                .position(|c| c.master_device_id == master)
            else {
                break;
            };
            let command = self.waiting.remove(index).expect("position is in range");
            if !self.sendable(&command, now_ms) {
                actions.push(expired_action(&command));
                continue;
            }
            let id = command.id;
            self.in_flight.insert(
                id,
                InFlight {
                    command,
                    attempts: 0,
                    asks: 0,
                    ack_deadline_ms: now_ms,
                },
            );
            actions.extend(self.send(id, now_ms));
        }
        actions
    }

    /// A command already sent once by its creator (the automation path signs and publishes a
    /// command in the step that decided it, to save a hop): only its ack is awaited here.
    pub fn track(&mut self, command: CommandRecord, sent_at_ms: i64) {
        let id = command.id;
        let attempts = command.attempts.max(1);
        self.in_flight.entry(id).or_insert(InFlight {
            command,
            attempts,
            asks: 0,
            ack_deadline_ms: sent_at_ms + self.limits.ack_timeout_ms,
        });
    }

    /// The emergency stop: nothing in flight is sent again. Commands made only of `off` actions
    /// stay (switching off is always safe); the others end as failed with `reason`.
    pub fn cancel_switching_on(&mut self, reason: &str) -> Vec<DeliveryAction> {
        let switches_on = |c: &CommandRecord| crate::command::switches_on(&c.actions);
        let failed = |id: i64| DeliveryAction::Finish {
            id,
            outcome: CommandOutcome::Failed {
                reason: reason.to_string(),
                execution_time_ms: None,
            },
        };
        let doomed: Vec<i64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| switches_on(&f.command))
            .map(|(id, _)| *id)
            .collect();
        let mut actions: Vec<DeliveryAction> = doomed
            .into_iter()
            .filter_map(|id| self.in_flight.remove(&id))
            .map(|f| failed(f.command.id))
            .collect();
        let (doomed, kept): (VecDeque<_>, VecDeque<_>) =
            self.waiting.drain(..).partition(|c| switches_on(c));
        self.waiting = kept;
        actions.extend(doomed.iter().map(|c| failed(c.id)));
        actions
    }

    /// The master's answer. An ack for a command not in flight (a duplicate, or one that
    /// already ended) is ignored.
    pub fn on_ack(&mut self, ack: &CommandAck, now_ms: i64) -> Vec<DeliveryAction> {
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
            // `duplicate` is a slave-confirmed earlier application of this id (PROTOCOL.md,
            // "Acks"): the switch happened, with the relay states of now.
            AckResult::Completed | AckResult::Duplicate => CommandOutcome::Completed {
                execution_time_ms,
                relay_states: (!ack.relay_states.is_empty()).then(|| ack.relay_states.clone()),
            },
            AckResult::Expired => CommandOutcome::Expired,
            AckResult::Rejected | AckResult::Failed => {
                match ack.error.as_ref().map(|e| e.code) {
                    // Our counter fell behind the master's (commands crossed, or a restored
                    // database): sending again at once with a fresh counter is the remedy.
                    Some(AckErrorCode::Replayed) => return self.send(id, now_ms),
                    // The master's queue is full: nothing ran; try again after the ack timeout
                    // without spending an attempt.
                    // An ask refused so is not refunded: the attempts must stay above 0, or
                    // a command that went out would end `expired`.
                    Some(AckErrorCode::Busy) => {
                        if let Some(flight) = self.in_flight.get_mut(&id) {
                            if flight.asks == 0 {
                                flight.attempts = flight.attempts.saturating_sub(1);
                            }
                            flight.ack_deadline_ms = now_ms + self.limits.ack_timeout_ms;
                        }
                        return vec![];
                    }
                    // The master gave up on its slave, but a frame may have switched the relay
                    // with every ack lost on the radio (seed 11 of the fault suite). The master
                    // forgot the id and the slave did not: sent again, it runs if it never did
                    // and is answered `duplicate` if it did. Only the last attempt's failure
                    // is recorded.
                    Some(AckErrorCode::SlaveUnreachable)
                        if self.in_flight.get(&id).is_some_and(|f| {
                            f.attempts < self.limits.attempts_max
                                && self.sendable(&f.command, now_ms)
                        }) =>
                    {
                        return self.send(id, now_ms);
                    }
                    _ => CommandOutcome::Failed {
                        reason: reason(),
                        execution_time_ms: Some(execution_time_ms),
                    },
                }
            }
        };
        self.end(id, outcome, now_ms)
    }

    /// Time passed while the broker is unreachable: nothing can be sent, so no attempt is spent
    /// and ack deadlines move on. Commands that went out wait for the connection to return:
    /// their acks may be held by the broker. Only what never went out ends, at its expiry.
    pub fn on_tick_disconnected(&mut self, now_ms: i64) -> Vec<DeliveryAction> {
        let ack_timeout_ms = self.limits.ack_timeout_ms;
        for flight in self.in_flight.values_mut() {
            flight.ack_deadline_ms = flight.ack_deadline_ms.max(now_ms + ack_timeout_ms);
        }
        self.expire_waiting(now_ms)
    }

    fn expire_waiting(&mut self, now_ms: i64) -> Vec<DeliveryAction> {
        let margin = self.limits.send_margin_ms;
        let (late, kept): (VecDeque<_>, VecDeque<_>) = self
            .waiting
            .drain(..)
            .partition(|c| now_ms + margin >= c.expires_at_ms);
        self.waiting = kept;
        late.iter().map(expired_action).collect()
    }

    /// Time passed: resend what waited too long for its ack, end what can no longer be sent.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<DeliveryAction> {
        let due: Vec<i64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now_ms >= f.ack_deadline_ms)
            .map(|(id, _)| *id)
            .collect();
        let mut actions = self.expire_waiting(now_ms);
        for id in due {
            actions.extend(self.send(id, now_ms));
        }
        actions
    }

    /// The earliest time `on_tick` has something to do.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        let margin = self.limits.send_margin_ms;
        let flights = self.in_flight.values().map(|f| f.ack_deadline_ms);
        let waiting = self.waiting.iter().map(|c| c.expires_at_ms - margin);
        flights.chain(waiting).min()
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
        send_margin_ms: 0,
        in_flight_per_master: 8,
    };

    fn command(id: i64, expires_at_ms: i64) -> CommandRecord {
        CommandRecord {
            id,
            master_device_id: "M".into(),
            slave_mac_address: "14:33:5C:38:BF:60".into(),
            slave_device_id: None,
            actions: crate::command::actions_from_columns(&[0], &["on".into()], &[60]).unwrap(),
            command_type: crate::command::CommandType::Manual,
            triggered_by: crate::command::CommandSource::Manual,
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
        let done = d.on_ack(&ack(1, AckResult::Completed, None), 0);
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
            d.on_ack(&ack(1, AckResult::Completed, None), 0).is_empty(),
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

    fn finished(actions: &[DeliveryAction]) -> Vec<(i64, &CommandOutcome)> {
        actions
            .iter()
            .filter_map(|a| match a {
                DeliveryAction::Finish { id, outcome } => Some((*id, outcome)),
                DeliveryAction::Send { .. } => None,
            })
            .collect()
    }

    /// Past its expiry a command that went out unanswered is sent again to ask what became
    /// of it (the master can no longer run it): `duplicate` ends it completed, `expired` ends
    /// it expired, and silence through every ask ends it failed with the outcome unknown.
    /// Before, it ended `failed` at once, while the relay had switched (fault run, seed 20).
    #[test]
    fn past_its_expiry_a_command_that_went_out_unanswered_is_asked_about() {
        let mut d = Delivery::new(LIMITS);
        for id in 1..=3 {
            assert_eq!(sends(&d.admit(command(id, 1_500), 0)), vec![(id, 1)]);
        }
        let asks = d.on_tick(1_500);
        assert_eq!(sends(&asks), vec![(1, 2), (2, 2), (3, 2)]);
        assert!(finished(&asks).is_empty(), "nothing ends unanswered");

        let ran = d.on_ack(&ack(1, AckResult::Duplicate, None), 1_600);
        assert!(matches!(
            finished(&ran).as_slice(),
            [(1, CommandOutcome::Completed { .. })]
        ));
        let never = d.on_ack(&ack(2, AckResult::Expired, None), 1_600);
        assert_eq!(finished(&never), vec![(2, &CommandOutcome::Expired)]);

        // Command 3's master stays silent: one ask per ack timeout, then the truth.
        let mut t = 1_500;
        for ask in 2..=OUTCOME_ASKS_MAX {
            t += LIMITS.ack_timeout_ms;
            assert_eq!(sends(&d.on_tick(t)), vec![(3, 1 + ask)], "ask {ask}");
        }
        t += LIMITS.ack_timeout_ms;
        match finished(&d.on_tick(t)).as_slice() {
            [(3, CommandOutcome::Failed { reason, .. })] => {
                assert!(reason.contains("whether it ran is unknown"), "{reason}");
                assert!(
                    reason.contains(&format!("{OUTCOME_ASKS_MAX} asks")),
                    "{reason}"
                );
            }
            other => panic!("expected the unknown outcome, got {other:?}"),
        }
        assert_eq!(d.in_flight(), 0);
    }

    /// A busy answer to an ask spends no attempt: the command went out once, so it must never
    /// end `expired` on the agent's account.
    #[test]
    fn a_busy_answer_to_an_ask_keeps_the_command_counted_as_sent() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 1_500), 0);
        assert_eq!(sends(&d.on_tick(1_500)), vec![(1, 2)]);
        let busy = ack(1, AckResult::Rejected, Some(AckErrorCode::Busy));
        assert!(d.on_ack(&busy, 1_600).is_empty());
        let again = d.on_tick(2_600);
        assert_eq!(sends(&again), vec![(1, 3)], "asked again, not expired");
        assert!(finished(&again).is_empty());
    }

    #[test]
    fn while_the_broker_is_away_no_attempt_is_spent_and_sent_commands_wait_for_their_acks() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 100_000), 0);
        d.admit(command(2, 20_000), 0);
        for t in (1_000..30_000).step_by(1_000) {
            assert!(
                d.on_tick_disconnected(t).is_empty(),
                "nothing ends or resends at {t}: an ack may be held for us by the broker"
            );
        }
        // Back: the held ack of command 2 arrives after its expiry and is believed.
        let done = d.on_ack(&ack(2, AckResult::Completed, None), 30_500);
        assert!(matches!(
            done.as_slice(),
            [DeliveryAction::Finish {
                id: 2,
                outcome: CommandOutcome::Completed { .. }
            }]
        ));
        // The first resend of command 1 is attempt 2, not a failure.
        assert_eq!(sends(&d.on_tick(31_000)), vec![(1, 2)]);
    }

    #[test]
    fn a_command_that_never_went_out_ends_expired_at_its_expiry_while_the_broker_is_away() {
        let mut d = Delivery::new(DeliveryLimits {
            in_flight_per_master: 1,
            ..LIMITS
        });
        d.admit(command(1, 100_000), 0);
        assert!(d.admit(command(2, 5_000), 0).is_empty(), "waits its turn");
        assert_eq!(
            d.on_tick_disconnected(5_000),
            vec![DeliveryAction::Finish {
                id: 2,
                outcome: CommandOutcome::Expired
            }]
        );
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
            .on_ack(
                &ack(1, AckResult::Rejected, Some(AckErrorCode::BadSignature)),
                0,
            )
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
            d.on_ack(&ack(2, AckResult::Expired, None), 0),
            vec![DeliveryAction::Finish {
                id: 2,
                outcome: CommandOutcome::Expired
            }]
        );
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
            d.on_ack(&done, 0).as_slice(),
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
        off.actions[0].action = crate::command::SwitchAction::Off;
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

    #[test]
    fn after_a_restart_a_sent_command_past_its_expiry_waits_for_its_ack_instead_of_expiring() {
        let mut d = Delivery::new(LIMITS);
        let mut sent = command(1, 10_000);
        sent.attempts = 1;
        let mut also = command(2, 10_000);
        also.attempts = 1;
        assert!(d.admit(sent, 50_000).is_empty(), "not sent, not ended");
        assert!(d.admit(also, 50_000).is_empty());
        assert!(
            d.on_tick(50_999).is_empty(),
            "the held acks get one ack timeout"
        );
        let done = d.on_ack(&ack(1, AckResult::Completed, None), 50_100);
        assert!(matches!(
            done.as_slice(),
            [DeliveryAction::Finish {
                id: 1,
                outcome: CommandOutcome::Completed { .. }
            }]
        ));
        // No ack held for command 2: it is asked about, and only the master's answer ends it.
        let asked = d.on_tick(51_000);
        assert_eq!(sends(&asked), vec![(2, 2)]);
        assert!(
            finished(&asked).is_empty(),
            "a sent command never ends `expired` by itself"
        );
        let answer = d.on_ack(&ack(2, AckResult::Expired, None), 51_100);
        assert_eq!(finished(&answer), vec![(2, &CommandOutcome::Expired)]);
    }

    #[test]
    fn a_command_is_never_sent_with_less_than_the_margin_of_life_left() {
        let mut d = Delivery::new(DeliveryLimits {
            send_margin_ms: 500,
            ..LIMITS
        });
        assert_eq!(
            d.admit(command(1, 1_400), 1_000),
            vec![DeliveryAction::Finish {
                id: 1,
                outcome: CommandOutcome::Expired
            }],
            "400 ms of life is under the margin: never sent"
        );
        assert_eq!(sends(&d.admit(command(2, 2_600), 0)), vec![(2, 1)]);
        // The ack timeout leaves 1,600 ms: resent. At 2,200, 400 ms are left: not resent to
        // run; from then on it is only asked about (the master refuses it once expired).
        assert_eq!(sends(&d.on_tick(1_000)), vec![(2, 2)]);
        assert!(d.on_tick(1_999).is_empty());
        assert_eq!(sends(&d.on_tick(2_200)), vec![(2, 3)]);
        assert_eq!(d.in_flight(), 1);
    }

    #[test]
    fn at_most_the_bound_is_in_flight_per_master_and_the_rest_follow_as_acks_return() {
        let mut d = Delivery::new(DeliveryLimits {
            in_flight_per_master: 2,
            ..LIMITS
        });
        let mut other = command(9, 100_000);
        other.master_device_id = "N".into();
        assert_eq!(sends(&d.admit(command(1, 100_000), 0)), vec![(1, 1)]);
        assert_eq!(sends(&d.admit(command(2, 100_000), 0)), vec![(2, 1)]);
        assert!(d.admit(command(3, 100_000), 0).is_empty(), "third waits");
        assert_eq!(
            sends(&d.admit(other, 0)),
            vec![(9, 1)],
            "another master is not held up"
        );
        assert_eq!((d.in_flight(), d.waiting()), (3, 1));
        let after = d.on_ack(&ack(1, AckResult::Completed, None), 10);
        assert_eq!(sends(&after), vec![(3, 1)], "an ack lets the next one go");
        assert_eq!(d.waiting(), 0);
    }

    #[test]
    fn a_replayed_refusal_is_answered_by_a_resend_at_once() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 100_000), 0);
        let again = d.on_ack(
            &ack(1, AckResult::Rejected, Some(AckErrorCode::Replayed)),
            10,
        );
        assert_eq!(sends(&again), vec![(1, 2)], "not 3 s later: now");
    }

    #[test]
    fn a_slave_the_master_gave_up_on_is_tried_again_at_once_until_the_attempts_run_out() {
        let mut d = Delivery::new(LIMITS);
        d.admit(command(1, 100_000), 0);
        let unreachable = ack(1, AckResult::Failed, Some(AckErrorCode::SlaveUnreachable));
        assert_eq!(sends(&d.on_ack(&unreachable, 10)), vec![(1, 2)]);
        assert_eq!(sends(&d.on_ack(&unreachable, 20)), vec![(1, 3)]);
        // The last attempt's answer ends it, with the master's reason.
        match d.on_ack(&unreachable, 30).as_slice() {
            [
                DeliveryAction::Finish {
                    id: 1,
                    outcome: CommandOutcome::Failed { reason, .. },
                },
            ] => assert!(reason.starts_with("slave_unreachable"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A resend that found the slave had switched is answered `duplicate`: completed.
        d.admit(command(2, 100_000), 40);
        d.on_ack(
            &ack(2, AckResult::Failed, Some(AckErrorCode::SlaveUnreachable)),
            50,
        );
        assert!(matches!(
            d.on_ack(&ack(2, AckResult::Duplicate, None), 60).as_slice(),
            [DeliveryAction::Finish {
                id: 2,
                outcome: CommandOutcome::Completed { .. }
            }]
        ));
    }

    #[test]
    fn a_slave_the_master_gave_up_on_is_not_tried_again_without_life_left() {
        let mut d = Delivery::new(DeliveryLimits {
            send_margin_ms: 500,
            ..LIMITS
        });
        d.admit(command(1, 1_000), 0);
        let unreachable = ack(1, AckResult::Failed, Some(AckErrorCode::SlaveUnreachable));
        assert!(sends(&d.on_ack(&unreachable, 600)).is_empty());
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn a_busy_master_is_asked_again_after_the_ack_timeout_without_spending_an_attempt() {
        let mut d = Delivery::new(DeliveryLimits {
            attempts_max: 1,
            ..LIMITS
        });
        d.admit(command(1, 100_000), 0);
        for round in 1..5 {
            let t = round * 2_000;
            assert!(
                d.on_ack(&ack(1, AckResult::Rejected, Some(AckErrorCode::Busy)), t)
                    .is_empty(),
                "busy does not fail the command"
            );
            assert_eq!(sends(&d.on_tick(t + 1_000)), vec![(1, 1)], "round {round}");
        }
    }
}
