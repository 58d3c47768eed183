//! A slave relay board as a state machine without I/O: frames and the time go in, reply frames
//! come out. It enforces its own safety (maximum on-time, commanded durations, master silence,
//! the emergency latch) so no relay stays on when everything above it has gone quiet.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::frame::{
    AckCode, FrameBody, FrameError, FrameRepr, RELAYS_PER_SLAVE_MAX, RelayStates, ReportReason,
    SwitchAction,
};
use crate::mac::MacAddr;
use crate::message::RelayLimits;

/// (command id, relay) pairs a slave remembers, so a retransmitted or re-sent command is applied
/// at most once.
pub const APPLIED_COMMANDS_MAX: usize = 128;

/// What a slave is built with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveSpec {
    pub mac: MacAddr,
    pub relays: Vec<RelayLimits>,
}

#[derive(Debug)]
pub struct SlaveNode {
    mac: MacAddr,
    relays: Vec<RelayLimits>,
    states: u16,
    /// When each relay last went from off to on (for the maximum on-time).
    on_since: [Option<Instant>; RELAYS_PER_SLAVE_MAX as usize],
    /// When a commanded duration ends.
    off_at: [Option<Instant>; RELAYS_PER_SLAVE_MAX as usize],
    master_silent_timeout: Duration,
    last_heard: Instant,
    /// The master went silent and the slave switched everything off; report it once contact
    /// returns.
    silence_unreported: bool,
    silent: bool,
    emergency_latched: bool,
    applied: VecDeque<(u64, u8)>,
    sequence: u32,
}

impl SlaveNode {
    /// Power-up: relays take their boot state, unless the emergency latch survived the reboot.
    /// Returns the boot report for the master.
    pub fn boot(
        spec: &SlaveSpec,
        master_silent_timeout: Duration,
        emergency_latched: bool,
        now: Instant,
    ) -> (SlaveNode, FrameRepr) {
        let relays: Vec<RelayLimits> = spec
            .relays
            .iter()
            .take(usize::from(RELAYS_PER_SLAVE_MAX))
            .copied()
            .collect();
        let mut node = SlaveNode {
            mac: spec.mac,
            relays,
            states: 0,
            on_since: [None; RELAYS_PER_SLAVE_MAX as usize],
            off_at: [None; RELAYS_PER_SLAVE_MAX as usize],
            master_silent_timeout,
            last_heard: now,
            silence_unreported: false,
            silent: false,
            emergency_latched,
            applied: VecDeque::new(),
            sequence: 0,
        };
        if !emergency_latched {
            for relay in 0..node.relay_count() {
                if node.relays[usize::from(relay)].boot_on {
                    node.switch(relay, true, now);
                }
            }
        }
        let reason = if emergency_latched {
            ReportReason::EmergencyStop
        } else {
            ReportReason::Boot
        };
        let report = node.own_frame(FrameBody::StateReport {
            reason,
            states: node.states(),
        });
        (node, report)
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn relay_count(&self) -> u8 {
        self.relays.len() as u8
    }

    pub fn states(&self) -> RelayStates {
        RelayStates {
            bits: self.states,
            count: self.relay_count(),
        }
    }

    pub fn emergency_latched(&self) -> bool {
        self.emergency_latched
    }

    /// The (command id, relay) pairs this slave remembers as applied, oldest first.
    pub fn applied(&self) -> Vec<(u64, u8)> {
        self.applied.iter().copied().collect()
    }

    /// Restores the applied pairs kept across a reboot (the newest [`APPLIED_COMMANDS_MAX`]).
    pub fn restore_applied(&mut self, applied: &[(u64, u8)]) {
        let skip = applied.len().saturating_sub(APPLIED_COMMANDS_MAX);
        self.applied = applied[skip..].iter().copied().collect();
    }

    /// The earliest moment [`SlaveNode::tick`] has something to do; `None` when nothing is
    /// due until the next frame (the master is already silent and every relay is off).
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next = (!self.silent).then(|| self.last_heard + self.master_silent_timeout);
        for relay in 0..self.relay_count() {
            if let Some(at) = self.relay_deadline(relay) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    fn relay_deadline(&self, relay: u8) -> Option<Instant> {
        let r = usize::from(relay);
        if self.states & (1 << relay) == 0 {
            return None;
        }
        let max_on = self.relays[r].max_on_s;
        let limit = (max_on > 0)
            .then(|| self.on_since[r].map(|t| t + Duration::from_secs(u64::from(max_on))))
            .flatten();
        match (limit, self.off_at[r]) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn switch(&mut self, relay: u8, on: bool, now: Instant) {
        let r = usize::from(relay);
        let was_on = self.states & (1 << relay) != 0;
        if on {
            self.states |= 1 << relay;
            if !was_on {
                self.on_since[r] = Some(now);
            }
        } else {
            self.states &= !(1 << relay);
            self.on_since[r] = None;
            self.off_at[r] = None;
        }
    }

    fn all_off(&mut self, now: Instant) {
        for relay in 0..self.relay_count() {
            self.switch(relay, false, now);
        }
    }

    fn own_frame(&mut self, body: FrameBody) -> FrameRepr {
        self.sequence = self.sequence.wrapping_add(1);
        FrameRepr {
            sequence: self.sequence,
            emergency_latched: self.emergency_latched,
            body,
        }
    }

    fn reply(&self, sequence: u32, body: FrameBody) -> FrameRepr {
        FrameRepr {
            sequence,
            emergency_latched: self.emergency_latched,
            body,
        }
    }

    /// Time passes: switch off what must go off. Returns reports for the master (which may not
    /// hear them; the states are also in every later heartbeat reply).
    pub fn tick(&mut self, now: Instant) -> Vec<FrameRepr> {
        let mut out = Vec::new();
        if !self.silent && now >= self.last_heard + self.master_silent_timeout {
            self.silent = true;
            if self.states != 0 {
                self.all_off(now);
                self.silence_unreported = true;
            }
        }
        let mut reason = None;
        for relay in 0..self.relay_count() {
            let r = usize::from(relay);
            let Some(at) = self.relay_deadline(relay) else {
                continue;
            };
            if now >= at {
                let by_duration = self.off_at[r].is_some_and(|t| t <= now);
                self.switch(relay, false, now);
                // Max on-time wins when both fire: it is the one that signals a problem.
                reason = Some(match (reason, by_duration) {
                    (Some(ReportReason::MaxOnTime), _) | (_, false) => ReportReason::MaxOnTime,
                    _ => ReportReason::DurationEnded,
                });
            }
        }
        if let Some(reason) = reason {
            let states = self.states();
            out.push(self.own_frame(FrameBody::StateReport { reason, states }));
        }
        out
    }

    /// A frame from the radio. Frames that fail to parse change nothing; frames a slave does
    /// not expect (acks, reports) are ignored.
    pub fn on_frame(&mut self, bytes: &[u8], now: Instant) -> Result<Vec<FrameRepr>, FrameError> {
        let frame = FrameRepr::from_bytes(bytes)?;
        let mut out = Vec::new();
        let master_frame = matches!(
            frame.body,
            FrameBody::RelayCommand { .. }
                | FrameBody::Heartbeat
                | FrameBody::PairingAccept
                | FrameBody::EmergencyStop
                | FrameBody::EmergencyReset
        );
        if !master_frame {
            return Ok(out);
        }
        self.last_heard = now;
        self.silent = false;
        if frame.emergency_latched && !self.emergency_latched {
            // A heartbeat carries the master's latch, so a slave that missed the stop frame
            // still stops at the next heartbeat.
            self.emergency_latched = true;
            self.all_off(now);
        }
        if self.silence_unreported {
            self.silence_unreported = false;
            let states = self.states();
            out.push(self.own_frame(FrameBody::StateReport {
                reason: ReportReason::MasterSilent,
                states,
            }));
        }
        match frame.body {
            FrameBody::RelayCommand {
                command_id,
                relay,
                action,
                duration_s,
            } => {
                let code = self.apply(command_id, relay, action, duration_s, now);
                out.push(self.reply(
                    frame.sequence,
                    FrameBody::Ack {
                        command_id,
                        relay,
                        code,
                        states: self.states(),
                        elapsed_ms: 0,
                    },
                ));
            }
            FrameBody::Heartbeat => out.push(self.reply(
                frame.sequence,
                FrameBody::StateReport {
                    reason: ReportReason::Heartbeat,
                    states: self.states(),
                },
            )),
            FrameBody::EmergencyStop => {
                self.emergency_latched = true;
                self.all_off(now);
                out.push(self.reply(
                    frame.sequence,
                    FrameBody::StateReport {
                        reason: ReportReason::EmergencyStop,
                        states: self.states(),
                    },
                ));
            }
            FrameBody::EmergencyReset => {
                self.emergency_latched = false;
                out.push(self.reply(
                    frame.sequence,
                    FrameBody::StateReport {
                        reason: ReportReason::Heartbeat,
                        states: self.states(),
                    },
                ));
            }
            _ => {}
        }
        Ok(out)
    }

    fn apply(
        &mut self,
        command_id: u64,
        relay: u8,
        action: SwitchAction,
        duration_s: u32,
        now: Instant,
    ) -> AckCode {
        if relay >= self.relay_count() {
            return AckCode::NoSuchRelay;
        }
        if self.applied.contains(&(command_id, relay)) {
            return AckCode::Duplicate;
        }
        if self.emergency_latched && action == SwitchAction::On {
            return AckCode::EmergencyLatched;
        }
        if self.applied.len() >= APPLIED_COMMANDS_MAX {
            self.applied.pop_front();
        }
        self.applied.push_back((command_id, relay));
        match action {
            SwitchAction::On => {
                self.switch(relay, true, now);
                self.off_at[usize::from(relay)] =
                    (duration_s > 0).then(|| now + Duration::from_secs(u64::from(duration_s)));
            }
            SwitchAction::Off => self.switch(relay, false, now),
        }
        AckCode::Applied
    }
}
