//! An ESP32 master as a state machine without I/O: MQTT messages, polled command rows, radio
//! frames and ticks go in; MQTT publications, radio frames, HTTP completions and state to
//! persist come out. The driver in [`super::run`] does the I/O.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::sensor::SensorSpec;
use super::slave::SlaveSpec;
use crate::command_id::CommandId;
use crate::frame::{AckCode, FRAME_LEN, FrameBody, FrameRepr, ReportReason, SwitchAction};
use crate::mac::MacAddr;
use crate::message::{
    AckError, AckErrorCode, AckResult, Announce, CommandAck, DeviceId, DeviceKind, Emergency,
    PROTOCOL_VERSION, Payload, Reading, RelayAction, RelayCommand, RelayStateReport, SlaveInfo,
    SlaveState, StateReason, Status, Telemetry, states_to_vec,
};
use crate::sign::{CommandVerifier, MasterKey, ReportSigner, VerifyError};
use crate::topic::Topic;

/// Command ids a master remembers as applied (and persists) once their slave confirmed them, so
/// a command sent again is answered `duplicate` with the first application's outcome.
pub const APPLIED_COMMANDS_MAX: usize = 128;
/// Commands waiting for slave acks at once; more are refused as busy.
pub const PENDING_COMMANDS_MAX: usize = 16;
/// The simulator's firmware version in announcements.
/// How often a master publishes its status online, whatever else it sends (PROTOCOL.md,
/// heartbeat): the agent marks a master offline after 30 s without hearing it.
pub const STATUS_HEARTBEAT: Duration = Duration::from_secs(10);
pub const FIRMWARE: &str = concat!("esp32-sim-", env!("CARGO_PKG_VERSION"));

/// One master as configured.
#[derive(Debug, Clone)]
pub struct MasterSpec {
    pub id: DeviceId,
    pub key: MasterKey,
    pub slaves: Vec<SlaveSpec>,
    pub sensors: Vec<SensorSpec>,
}

/// Timings of the master and its radio link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterTiming {
    pub telemetry_interval_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// Without a frame from its master this long, a slave switches everything off.
    pub master_silent_timeout_ms: u64,
    /// A master considers a slave offline after this long without a frame from it.
    pub slave_offline_after_ms: u64,
    /// Wait this long for a slave's ack before sending a frame again.
    pub frame_ack_timeout_ms: u64,
    /// Send a command frame at most this many times.
    pub frame_attempts_max: u32,
}

impl Default for MasterTiming {
    fn default() -> MasterTiming {
        MasterTiming {
            telemetry_interval_ms: 1000,
            heartbeat_interval_ms: 1000,
            master_silent_timeout_ms: 5000,
            slave_offline_after_ms: 3500,
            frame_ack_timeout_ms: 200,
            frame_attempts_max: 5,
        }
    }
}

/// What a master keeps across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterState {
    pub last_counter: Option<u64>,
    pub emergency_latched: bool,
    pub applied: Vec<CommandId>,
}

/// One row of `get_and_lock_slave_commands`, as PostgREST returns it (other columns ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SlaveCommandRow {
    pub id: i64,
    pub master_device_id: String,
    pub slave_mac_address: String,
    pub relay_numbers: Vec<i32>,
    pub actions: Vec<String>,
    #[serde(default)]
    pub duration_seconds: Option<Vec<Option<i32>>>,
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// The end of a command that came through HTTP polling, to report with
/// `complete_slave_command` or `fail_slave_command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub command_id: i64,
    pub execution_time_ms: u64,
    /// `Ok(relay states)` or `Err(error message)`.
    pub outcome: Result<Vec<bool>, String>,
}

/// Something for the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Publish {
        topic: Topic,
        payload: Vec<u8>,
    },
    Frame {
        to: MacAddr,
        bytes: [u8; FRAME_LEN],
    },
    /// Take back the frames to this slave that have not left yet (of one command, or all);
    /// the driver hands what it took back to [`MasterCore::on_withdrawn`].
    Withdraw {
        to: MacAddr,
        command: Option<CommandId>,
    },
    Complete(Completion),
    Persist(MasterState),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Mqtt,
    Http,
}

#[derive(Debug)]
struct PendingFrame {
    sequence: u32,
    relay: u8,
    bytes: [u8; FRAME_LEN],
    sent_at: Instant,
    attempts: u32,
    /// Copies taken back before they left: when it equals `attempts`, the slave never got it.
    withdrawn: u32,
    /// An `on` action (never resent while latched).
    switches_on: bool,
    code: Option<AckCode>,
}

impl PendingFrame {
    fn never_sent(&self) -> bool {
        self.code.is_none() && self.withdrawn >= self.attempts
    }
}

#[derive(Debug)]
struct Pending {
    id: CommandId,
    origin: Origin,
    slave: MacAddr,
    started: Instant,
    frames: Vec<PendingFrame>,
}

#[derive(Debug, Clone)]
struct SlaveView {
    relay_count: u8,
    states: Vec<bool>,
    last_heard: Option<Instant>,
    emergency_latched: bool,
    reason: StateReason,
}

#[derive(Debug)]
pub struct MasterCore {
    id: DeviceId,
    timing: MasterTiming,
    verifier: CommandVerifier,
    /// Signs acks and relay state reports (PROTOCOL.md, "Signing reports").
    reporter: ReportSigner,
    emergency_latched: bool,
    applied: VecDeque<CommandId>,
    slaves: BTreeMap<MacAddr, SlaveView>,
    sensors: Vec<SensorSpec>,
    telemetry_ticks: u64,
    pending: Vec<Pending>,
    sequence: u32,
    last_report: Option<Vec<u8>>,
    /// Connected to the broker (`on_connected` ran): no heartbeat goes out before, where it
    /// could overtake the subscriptions and tell the world a master listens that does not yet.
    connected: bool,
    /// When the status online was last published (the MQTT heartbeat).
    last_status: Option<Instant>,
}

type Outputs = Vec<Output>;

impl MasterCore {
    pub fn new(spec: &MasterSpec, timing: MasterTiming, state: MasterState) -> MasterCore {
        let slaves = spec
            .slaves
            .iter()
            .map(|s| {
                (
                    s.mac,
                    SlaveView {
                        relay_count: s.relays.len() as u8,
                        states: vec![false; s.relays.len()],
                        last_heard: None,
                        emergency_latched: false,
                        reason: StateReason::Boot,
                    },
                )
            })
            .collect();
        let mut applied: VecDeque<CommandId> = state.applied.into_iter().collect();
        while applied.len() > APPLIED_COMMANDS_MAX {
            applied.pop_front();
        }
        MasterCore {
            id: spec.id.clone(),
            timing,
            verifier: CommandVerifier::new(spec.id.clone(), spec.key.clone(), state.last_counter),
            // The boot time in milliseconds is above every counter of earlier boots: reports
            // are far fewer than one per millisecond, so nothing needs persisting.
            reporter: ReportSigner::new(spec.id.clone(), spec.key.clone(), unix_now_ms()),
            emergency_latched: state.emergency_latched,
            applied,
            slaves,
            sensors: spec.sensors.clone(),
            telemetry_ticks: 0,
            pending: Vec::new(),
            sequence: 0,
            last_report: None,
            connected: false,
            last_status: None,
        }
    }

    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    pub fn emergency_latched(&self) -> bool {
        self.emergency_latched
    }

    /// Topics to subscribe to, each at QoS 1.
    pub fn subscriptions(&self) -> Vec<Topic> {
        vec![
            Topic::Command(self.id.clone()),
            Topic::EmergencyStop,
            Topic::EmergencyReset,
            Topic::device_config(&self.id),
        ]
    }

    fn state(&self) -> MasterState {
        MasterState {
            last_counter: self.verifier.last_counter(),
            emergency_latched: self.emergency_latched,
            applied: self.applied.iter().copied().collect(),
        }
    }

    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    fn frame(&mut self, body: FrameBody) -> [u8; FRAME_LEN] {
        let repr = FrameRepr {
            sequence: self.next_sequence(),
            emergency_latched: self.emergency_latched,
            body,
        };
        // Every body the master builds is in range by construction (relays checked against
        // the slave, durations by the payload's validation).
        repr.to_bytes().unwrap_or([0; FRAME_LEN])
    }

    fn publish<P: Payload>(out: &mut Outputs, topic: Topic, payload: &P) {
        match payload.encode() {
            Ok(payload) => out.push(Output::Publish { topic, payload }),
            Err(e) => warn!(%topic, error = %e, "not publishing an invalid payload"),
        }
    }

    /// Online status, announcement and relay states, after each (re)connection.
    pub fn on_connected(&mut self) -> Outputs {
        let mut out = Vec::new();
        let announce = Announce {
            v: PROTOCOL_VERSION,
            device_id: self.id.clone(),
            kind: DeviceKind::Master,
            firmware: FIRMWARE.into(),
            mac: None,
            slaves: self
                .slaves
                .iter()
                .map(|(mac, s)| SlaveInfo {
                    mac: *mac,
                    relay_count: s.relay_count,
                })
                .collect(),
            sensors: self.sensors.iter().map(|s| s.name.clone()).collect(),
            telemetry_interval_ms: self.timing.telemetry_interval_ms.min(u64::from(u32::MAX))
                as u32,
        };
        // Announce first: whoever sees the device come online already knows what it is.
        Self::publish(&mut out, Topic::Announce(self.id.clone()), &announce);
        Self::publish(
            &mut out,
            Topic::Status(self.id.clone()),
            &Status::online(self.emergency_latched),
        );
        self.last_report = None;
        self.report_states(&mut out);
        self.connected = true;
        self.last_status = None;
        out
    }

    /// The retained offline status to publish before a clean disconnect.
    pub fn offline_status(&self) -> Output {
        let status = Status {
            v: PROTOCOL_VERSION,
            status: crate::message::Online::Offline,
            reason: Some("shutdown".into()),
            emergency_latched: Some(self.emergency_latched),
        };
        Output::Publish {
            topic: Topic::Status(self.id.clone()),
            payload: status.encode().unwrap_or_default(),
        }
    }

    fn report_states(&mut self, out: &mut Outputs) {
        let report = RelayStateReport {
            v: PROTOCOL_VERSION,
            slaves: self
                .slaves
                .iter()
                .map(|(mac, s)| SlaveState {
                    mac: *mac,
                    online: s.last_heard.is_some(),
                    relay_states: s.states.clone(),
                    emergency_latched: s.emergency_latched,
                    reason: s.reason,
                })
                .collect(),
            counter: None,
            sig: None,
        };
        // Compared unsigned: every signed copy differs by its counter.
        let Ok(unsigned) = report.encode() else {
            return;
        };
        if self.last_report.as_ref() != Some(&unsigned) {
            self.last_report = Some(unsigned);
            let sealed = self.reporter.seal_relay_states(report);
            Self::publish(out, Topic::RelayState(self.id.clone()), &sealed);
        }
    }

    /// One telemetry payload from the configured sensors.
    pub fn telemetry(&mut self, wall_ms: u64) -> Outputs {
        let mut out = Vec::new();
        if self.sensors.is_empty() {
            return out;
        }
        let tick = self.telemetry_ticks;
        self.telemetry_ticks += 1;
        let readings = self
            .sensors
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Reading {
                        value: s.value_at(tick),
                        unit: s.unit.clone(),
                    },
                )
            })
            .collect();
        let telemetry = Telemetry {
            v: PROTOCOL_VERSION,
            ts_ms: Some(wall_ms),
            readings,
        };
        Self::publish(&mut out, Topic::Telemetry(self.id.clone()), &telemetry);
        out
    }

    /// Heartbeats to every slave, and offline detection.
    pub fn on_heartbeat(&mut self, now: Instant) -> Outputs {
        let mut out = Vec::new();
        let offline_after = Duration::from_millis(self.timing.slave_offline_after_ms);
        let macs: Vec<MacAddr> = self.slaves.keys().copied().collect();
        for mac in macs {
            let bytes = self.frame(FrameBody::Heartbeat);
            out.push(Output::Frame { to: mac, bytes });
            if let Some(view) = self.slaves.get_mut(&mac)
                && view
                    .last_heard
                    .is_some_and(|t| now.duration_since(t) > offline_after)
            {
                warn!(master = %self.id, slave = %mac, "slave went silent");
                view.last_heard = None;
            }
        }
        self.report_states(&mut out);
        match self.last_status {
            _ if !self.connected => {}
            // The status `on_connected` published starts the count.
            None => self.last_status = Some(now),
            Some(t) if now.duration_since(t) >= STATUS_HEARTBEAT => {
                self.last_status = Some(now);
                Self::publish(
                    &mut out,
                    Topic::Status(self.id.clone()),
                    &Status::online(self.emergency_latched),
                );
            }
            Some(_) => {}
        }
        out
    }

    /// Frames to `to` that the radio took back before they left. A command none of whose
    /// unanswered frames ever left did not run at all: while latched it ends `failed`
    /// (withdrawn by the stop) at once; otherwise it is resent as usual.
    pub fn on_withdrawn(&mut self, to: MacAddr, frames: &[Vec<u8>], now: Instant) -> Outputs {
        let mut out = Vec::new();
        for bytes in frames {
            let Ok(frame) = FrameRepr::from_bytes(bytes) else {
                continue;
            };
            for pending in self.pending.iter_mut().filter(|p| p.slave == to) {
                for f in pending
                    .frames
                    .iter_mut()
                    .filter(|f| f.sequence == frame.sequence)
                {
                    f.withdrawn += 1;
                }
            }
        }
        if !self.emergency_latched {
            return out;
        }
        let mut withdrawn = Vec::new();
        for (index, pending) in self.pending.iter().enumerate() {
            let open: Vec<&PendingFrame> =
                pending.frames.iter().filter(|f| f.code.is_none()).collect();
            if pending.slave == to && !open.is_empty() && open.iter().all(|f| f.never_sent()) {
                withdrawn.push(index);
            }
        }
        for index in withdrawn.into_iter().rev() {
            let pending = self.pending.remove(index);
            self.forget_applied(&mut out, pending.id);
            let elapsed = now.duration_since(pending.started).as_millis() as u64;
            let states = self.slave_states(pending.slave);
            info!(master = %self.id, command_id = %pending.id, "command withdrawn by the emergency stop before it reached the slave");
            self.finish(
                &mut out,
                pending.origin,
                Some(pending.id),
                Some(pending.slave),
                AckResult::Failed,
                Some((
                    AckErrorCode::EmergencyLatched,
                    "withdrawn by the emergency stop before it reached the slave".into(),
                )),
                states,
                elapsed,
            );
        }
        out
    }

    /// Retransmits frames whose ack is late; fails commands that ran out of attempts.
    pub fn on_retry_tick(&mut self, now: Instant) -> Outputs {
        let mut out = Vec::new();
        let timeout = Duration::from_millis(self.timing.frame_ack_timeout_ms);
        let mut failed = Vec::new();
        let latched = self.emergency_latched;
        for (index, pending) in self.pending.iter_mut().enumerate() {
            for frame in pending.frames.iter_mut().filter(|f| f.code.is_none()) {
                if now.duration_since(frame.sent_at) < timeout {
                    continue;
                }
                // Latched: a switch-on is never sent again; the command ends when the slave's
                // answer to what already left arrives, or as unreachable.
                if latched && frame.switches_on {
                    if frame.attempts >= self.timing.frame_attempts_max {
                        failed.push(index);
                        break;
                    }
                    frame.attempts += 1;
                    frame.withdrawn += 1;
                    frame.sent_at = now;
                    continue;
                }
                if frame.attempts >= self.timing.frame_attempts_max {
                    failed.push(index);
                    break;
                }
                frame.attempts += 1;
                frame.sent_at = now;
                debug!(slave = %pending.slave, sequence = frame.sequence, attempt = frame.attempts, "resending relay command frame");
                out.push(Output::Frame {
                    to: pending.slave,
                    bytes: frame.bytes,
                });
            }
        }
        for index in failed.into_iter().rev() {
            let pending = self.pending.remove(index);
            // A command reported failed must never run afterwards: nothing of it may still be
            // waiting to leave.
            out.push(Output::Withdraw {
                to: pending.slave,
                command: Some(pending.id),
            });
            self.forget_applied(&mut out, pending.id);
            let message = format!(
                "slave {} did not acknowledge after {} attempts",
                pending.slave, self.timing.frame_attempts_max
            );
            warn!(master = %self.id, command_id = %pending.id, "{message}");
            let elapsed = now.duration_since(pending.started).as_millis() as u64;
            let states = self.slave_states(pending.slave);
            self.finish(
                &mut out,
                pending.origin,
                Some(pending.id),
                Some(pending.slave),
                AckResult::Failed,
                Some((AckErrorCode::SlaveUnreachable, message)),
                states,
                elapsed,
            );
        }
        out
    }

    /// A command that failed or was refused by the slave did not (fully) run, so a retry with the
    /// same id must run; the slave's own (id, relay) memory still keeps any relay that did switch
    /// from switching twice.
    fn forget_applied(&mut self, out: &mut Outputs, id: CommandId) {
        self.applied.retain(|a| *a != id);
        out.push(Output::Persist(self.state()));
    }

    fn slave_states(&self, mac: MacAddr) -> Vec<bool> {
        self.slaves
            .get(&mac)
            .map(|s| s.states.clone())
            .unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)] // reason: one place builds both kinds of outcome
    fn finish(
        &mut self,
        out: &mut Outputs,
        origin: Origin,
        command_id: Option<CommandId>,
        slave_mac: Option<MacAddr>,
        result: AckResult,
        error: Option<(AckErrorCode, String)>,
        relay_states: Vec<bool>,
        execution_time_ms: u64,
    ) {
        match origin {
            Origin::Mqtt => {
                let ack = CommandAck {
                    v: PROTOCOL_VERSION,
                    command_id,
                    result,
                    error: error.map(|(code, message)| AckError { code, message }),
                    slave_mac,
                    relay_states,
                    execution_time_ms,
                    counter: None,
                    sig: None,
                };
                let ack = self.reporter.seal_ack(ack);
                Self::publish(out, Topic::Ack(self.id.clone()), &ack);
            }
            Origin::Http => {
                let Some(id) = command_id.map(CommandId::row_id) else {
                    return;
                };
                let outcome = match (result, error) {
                    (AckResult::Completed | AckResult::Duplicate, _) => Ok(relay_states),
                    (_, Some((code, message))) => Err(format!("{}: {message}", code.as_str())),
                    (other, None) => Err(format!("{other:?}").to_lowercase()),
                };
                out.push(Output::Complete(Completion {
                    command_id: id,
                    execution_time_ms,
                    outcome,
                }));
            }
        }
    }

    /// A message on a subscribed topic. Bad input is logged and answered, never fatal.
    pub fn on_mqtt(&mut self, topic: &str, payload: &[u8], now: Instant, wall_ms: u64) -> Outputs {
        let mut out = Vec::new();
        let topic = match Topic::parse(topic) {
            Ok(t) => t,
            Err(e) => {
                warn!(master = %self.id, error = %e, "message on an unknown topic");
                return out;
            }
        };
        match topic {
            Topic::Command(id) if id == self.id => self.on_command(&mut out, payload, now, wall_ms),
            Topic::EmergencyStop => self.on_emergency_stop(&mut out, payload),
            Topic::EmergencyReset => self.on_emergency_reset(&mut out, payload),
            Topic::Config(_) => {
                debug!(master = %self.id, "configuration received; the simulator keeps its command-line settings");
            }
            other => debug!(master = %self.id, topic = %other, "ignoring message"),
        }
        out
    }

    #[allow(clippy::too_many_arguments)] // reason: mirrors `finish`, plus the log line
    fn reject(
        &mut self,
        out: &mut Outputs,
        origin: Origin,
        command_id: Option<CommandId>,
        slave: Option<MacAddr>,
        result: AckResult,
        code: AckErrorCode,
        message: String,
    ) {
        warn!(master = %self.id, command_id = ?command_id.map(|c| c.to_string()), ?code, "rejected command: {message}");
        let states = slave.map(|s| self.slave_states(s)).unwrap_or_default();
        self.finish(
            out,
            origin,
            command_id,
            slave,
            result,
            Some((code, message)),
            states,
            0,
        );
    }

    fn on_command(&mut self, out: &mut Outputs, payload: &[u8], now: Instant, wall_ms: u64) {
        let command = match RelayCommand::decode(payload) {
            Ok(c) => c,
            Err(e) => {
                // Echo the id if one can be read, so the sender can match the rejection.
                let id = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("command_id")?.as_str()?.parse().ok());
                self.reject(
                    out,
                    Origin::Mqtt,
                    id,
                    None,
                    AckResult::Rejected,
                    AckErrorCode::Malformed,
                    e.to_string(),
                );
                return;
            }
        };
        if let Err(e) = self.verifier.verify(&command) {
            let code = match e {
                VerifyError::Unsigned => AckErrorCode::Unsigned,
                VerifyError::MalformedSignature | VerifyError::BadSignature => {
                    AckErrorCode::BadSignature
                }
                VerifyError::Replayed { .. } => AckErrorCode::Replayed,
                VerifyError::WrongMaster { .. } => AckErrorCode::WrongMaster,
            };
            self.reject(
                out,
                Origin::Mqtt,
                Some(command.command_id),
                Some(command.slave_mac),
                AckResult::Rejected,
                code,
                e.to_string(),
            );
            return;
        }
        out.push(Output::Persist(self.state()));
        info!(master = %self.id, command_id = %command.command_id, counter = command.counter, "verified command");
        self.execute(
            out,
            Origin::Mqtt,
            command.command_id,
            command.slave_mac,
            &command.actions,
            command.expires_at_ms,
            now,
            wall_ms,
        );
    }

    /// Rows from `get_and_lock_slave_commands`. The backend (over TLS, with this master's JWT)
    /// is the authority here, so rows carry no HMAC.
    pub fn on_polled(&mut self, rows: Vec<SlaveCommandRow>, now: Instant, wall_ms: u64) -> Outputs {
        let mut out = Vec::new();
        for row in rows {
            let id = match CommandId::from_row_id(row.id) {
                Ok(id) => id,
                Err(e) => {
                    warn!(master = %self.id, row = row.id, "ignoring polled row: {e}");
                    continue;
                }
            };
            match polled_command(&row) {
                Ok((mac, actions, expires_at_ms)) => self.execute(
                    &mut out,
                    Origin::Http,
                    id,
                    mac,
                    &actions,
                    expires_at_ms,
                    now,
                    wall_ms,
                ),
                Err(message) => self.reject(
                    &mut out,
                    Origin::Http,
                    Some(id),
                    None,
                    AckResult::Rejected,
                    AckErrorCode::Malformed,
                    message,
                ),
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)] // reason: both origins share the whole path
    fn execute(
        &mut self,
        out: &mut Outputs,
        origin: Origin,
        id: CommandId,
        slave: MacAddr,
        actions: &[RelayAction],
        expires_at_ms: u64,
        now: Instant,
        wall_ms: u64,
    ) {
        if self.pending.iter().any(|p| p.id == id) {
            // Still running: its one ack follows when it ends. Answering "duplicate" now would
            // report relay states the slave has not reached yet.
            info!(master = %self.id, command_id = %id, "command already in progress; its ack will follow");
            return;
        }
        if self.applied.contains(&id) {
            info!(master = %self.id, command_id = %id, "command already applied; not applying again");
            let states = self.slave_states(slave);
            self.finish(
                out,
                origin,
                Some(id),
                Some(slave),
                AckResult::Duplicate,
                None,
                states,
                0,
            );
            return;
        }
        // After the in-progress and applied checks: a resend of a command that already ran
        // gets `duplicate` (nothing runs), even past its expiry; `expired` would tell the agent
        // it never ran.
        if wall_ms > expires_at_ms {
            let message = format!("expired {} ms ago", wall_ms - expires_at_ms);
            self.reject(
                out,
                origin,
                Some(id),
                Some(slave),
                AckResult::Expired,
                AckErrorCode::Expired,
                message,
            );
            return;
        }
        let Some(view) = self.slaves.get(&slave) else {
            self.reject(
                out,
                origin,
                Some(id),
                Some(slave),
                AckResult::Rejected,
                AckErrorCode::UnknownSlave,
                format!("no slave {slave} behind this master"),
            );
            return;
        };
        if let Some(a) = actions.iter().find(|a| a.relay >= view.relay_count) {
            let message = format!(
                "slave {slave} has {} relays, no relay {}",
                view.relay_count, a.relay
            );
            self.reject(
                out,
                origin,
                Some(id),
                Some(slave),
                AckResult::Rejected,
                AckErrorCode::NoSuchRelay,
                message,
            );
            return;
        }
        if self.emergency_latched && actions.iter().any(|a| a.action == SwitchAction::On) {
            self.reject(
                out,
                origin,
                Some(id),
                Some(slave),
                AckResult::Rejected,
                AckErrorCode::EmergencyLatched,
                "emergency stop is latched; only off actions run until a reset".into(),
            );
            return;
        }
        if self.pending.len() >= PENDING_COMMANDS_MAX {
            self.reject(
                out,
                origin,
                Some(id),
                Some(slave),
                AckResult::Rejected,
                AckErrorCode::Busy,
                format!("{PENDING_COMMANDS_MAX} commands already waiting for slaves"),
            );
            return;
        }
        // Not yet "applied": only the slave's confirmation makes it so (see `on_ack`). A master
        // that reboots before it sends the command on again; the slave's own memory of
        // (command id, relay) keeps a relay that did switch from switching twice, and its
        // `duplicate` answer tells that it did.
        let mut frames = Vec::new();
        for action in actions {
            let bytes = self.frame(FrameBody::RelayCommand {
                command_id: id.to_raw(),
                relay: action.relay,
                action: action.action,
                duration_s: match action.action {
                    SwitchAction::On => action.duration_s,
                    SwitchAction::Off => 0,
                },
            });
            out.push(Output::Frame { to: slave, bytes });
            frames.push(PendingFrame {
                sequence: self.sequence,
                relay: action.relay,
                bytes,
                sent_at: now,
                attempts: 1,
                withdrawn: 0,
                switches_on: action.action == SwitchAction::On,
                code: None,
            });
        }
        self.pending.push(Pending {
            id,
            origin,
            slave,
            started: now,
            frames,
        });
    }

    fn on_emergency_stop(&mut self, out: &mut Outputs, payload: &[u8]) {
        if payload.is_empty() {
            // Clearing the retained stop message; the latch is released only by a reset.
            return;
        }
        match Emergency::decode(payload) {
            Ok(stop) => warn!(master = %self.id, reason = ?stop.reason, "emergency stop"),
            // Stopping is always safe, so even an unreadable stop message stops.
            Err(e) => {
                warn!(master = %self.id, error = %e, "emergency stop with an unreadable payload; stopping anyway")
            }
        }
        let was_latched = self.emergency_latched;
        self.emergency_latched = true;
        let macs: Vec<MacAddr> = self.slaves.keys().copied().collect();
        for mac in macs {
            // Nothing queued before the stop may reach the slave after it: the stop goes
            // ahead of every frame that has not left yet.
            out.push(Output::Withdraw {
                to: mac,
                command: None,
            });
            let bytes = self.frame(FrameBody::EmergencyStop);
            out.push(Output::Frame { to: mac, bytes });
        }
        if !was_latched {
            out.push(Output::Persist(self.state()));
            Self::publish(out, Topic::Status(self.id.clone()), &Status::online(true));
        }
    }

    fn on_emergency_reset(&mut self, out: &mut Outputs, payload: &[u8]) {
        match Emergency::decode(payload) {
            Ok(reset) => info!(master = %self.id, reason = ?reset.reason, "emergency reset"),
            Err(e) => {
                // Releasing the latch is the dangerous direction: only a valid message does it.
                warn!(master = %self.id, error = %e, "ignoring an unreadable emergency reset");
                return;
            }
        }
        if !self.emergency_latched {
            return;
        }
        self.emergency_latched = false;
        let macs: Vec<MacAddr> = self.slaves.keys().copied().collect();
        for mac in macs {
            let bytes = self.frame(FrameBody::EmergencyReset);
            out.push(Output::Frame { to: mac, bytes });
        }
        out.push(Output::Persist(self.state()));
        Self::publish(out, Topic::Status(self.id.clone()), &Status::online(false));
    }

    /// A frame from a slave. Frames that do not parse are logged and dropped.
    pub fn on_radio(&mut self, from: MacAddr, bytes: &[u8], now: Instant) -> Outputs {
        let mut out = Vec::new();
        let frame = match FrameRepr::from_bytes(bytes) {
            Ok(f) => f,
            Err(e) => {
                warn!(master = %self.id, slave = %from, error = %e, "dropping a bad frame");
                return out;
            }
        };
        let master_latched = self.emergency_latched;
        let Some(view) = self.slaves.get_mut(&from) else {
            warn!(master = %self.id, slave = %from, "frame from an unknown slave");
            return out;
        };
        view.last_heard = Some(now);
        view.emergency_latched = frame.emergency_latched;
        let mut reset_slave = false;
        match frame.body {
            FrameBody::StateReport { reason, states } => {
                view.states = states_to_vec(states);
                view.reason = match reason {
                    ReportReason::Heartbeat => view.reason,
                    ReportReason::Boot => StateReason::Boot,
                    ReportReason::MasterSilent => StateReason::MasterSilent,
                    ReportReason::MaxOnTime => StateReason::MaxOnTime,
                    ReportReason::DurationEnded => StateReason::DurationEnded,
                    ReportReason::EmergencyStop => StateReason::EmergencyStop,
                };
                if reason == ReportReason::MasterSilent {
                    warn!(master = %self.id, slave = %from, "slave switched its relays off while it could not hear this master");
                }
                // A slave that was off the air during a reset still holds its latch.
                reset_slave = frame.emergency_latched && !master_latched;
            }
            FrameBody::Ack {
                command_id,
                relay,
                code,
                states,
                ..
            } => {
                view.states = states_to_vec(states);
                view.reason = StateReason::Command;
                self.on_ack(&mut out, from, frame.sequence, command_id, relay, code, now);
            }
            FrameBody::PairingRequest { .. } => {
                let bytes = self.frame(FrameBody::PairingAccept);
                out.push(Output::Frame { to: from, bytes });
            }
            _ => debug!(master = %self.id, slave = %from, "ignoring a frame meant for slaves"),
        }
        if reset_slave {
            let bytes = self.frame(FrameBody::EmergencyReset);
            out.push(Output::Frame { to: from, bytes });
        }
        self.report_states(&mut out);
        out
    }

    #[allow(clippy::too_many_arguments)] // reason: the fields of one ack frame
    fn on_ack(
        &mut self,
        out: &mut Outputs,
        from: MacAddr,
        sequence: u32,
        command_id: u64,
        relay: u8,
        code: AckCode,
        now: Instant,
    ) {
        let Some(index) = self.pending.iter().position(|p| {
            p.slave == from
                && p.id.to_raw() == command_id
                && p.frames
                    .iter()
                    .any(|f| f.sequence == sequence && f.relay == relay)
        }) else {
            debug!(master = %self.id, slave = %from, sequence, "ack for no pending command (late duplicate)");
            return;
        };
        let pending = &mut self.pending[index];
        for f in pending.frames.iter_mut() {
            if f.sequence == sequence {
                // After a resend, "duplicate" means an earlier copy of this very frame got
                // through and only its ack was lost: for this command it was applied.
                f.code = Some(if code == AckCode::Duplicate && f.attempts > 1 {
                    AckCode::Applied
                } else {
                    code
                });
            }
        }
        if pending.frames.iter().any(|f| f.code.is_none()) {
            return;
        }
        let pending = self.pending.remove(index);
        let elapsed = now.duration_since(pending.started).as_millis() as u64;
        let states = self.slave_states(pending.slave);
        let codes: Vec<AckCode> = pending.frames.iter().filter_map(|f| f.code).collect();
        let (result, error) = if codes.contains(&AckCode::NoSuchRelay) {
            (
                AckResult::Rejected,
                Some((
                    AckErrorCode::NoSuchRelay,
                    "the slave has no such relay".to_string(),
                )),
            )
        } else if codes.contains(&AckCode::EmergencyLatched) {
            (
                AckResult::Rejected,
                Some((
                    AckErrorCode::EmergencyLatched,
                    "the slave's emergency stop is latched".to_string(),
                )),
            )
        } else if codes.iter().all(|c| *c == AckCode::Duplicate) {
            (AckResult::Duplicate, None)
        } else {
            (AckResult::Completed, None)
        };
        if result == AckResult::Rejected {
            self.forget_applied(out, pending.id);
        } else {
            // Confirmed by the slave: from now on this id is answered `duplicate` without
            // reaching the slave again.
            if self.applied.len() >= APPLIED_COMMANDS_MAX {
                self.applied.pop_front();
            }
            self.applied.push_back(pending.id);
            out.push(Output::Persist(self.state()));
        }
        info!(master = %self.id, command_id = %pending.id, ?result, execution_time_ms = elapsed, "command finished");
        self.finish(
            out,
            pending.origin,
            Some(pending.id),
            Some(pending.slave),
            result,
            error,
            states,
            elapsed,
        );
    }
}

/// Checks a polled row and turns it into relay actions.
fn polled_command(row: &SlaveCommandRow) -> Result<(MacAddr, Vec<RelayAction>, u64), String> {
    let mac: MacAddr = row
        .slave_mac_address
        .parse()
        .map_err(|e: crate::mac::MacAddrError| e.to_string())?;
    if row.relay_numbers.len() != row.actions.len() {
        return Err("relay_numbers and actions differ in length".into());
    }
    if row.relay_numbers.is_empty() || row.relay_numbers.len() > crate::message::COMMAND_ACTIONS_MAX
    {
        return Err("a command needs 1..=16 relays".into());
    }
    let durations = row.duration_seconds.clone().unwrap_or_default();
    let mut actions = Vec::new();
    for (i, (&relay, action)) in row.relay_numbers.iter().zip(&row.actions).enumerate() {
        let relay = u8::try_from(relay)
            .ok()
            .filter(|r| *r < crate::frame::RELAYS_PER_SLAVE_MAX)
            .ok_or_else(|| format!("relay_numbers[{i}] = {relay} out of range"))?;
        let action = match action.as_str() {
            "on" => SwitchAction::On,
            "off" => SwitchAction::Off,
            other => return Err(format!("actions[{i}] = {other:?}, expected on or off")),
        };
        let duration = durations.get(i).copied().flatten().unwrap_or(0);
        let duration_s = u32::try_from(duration)
            .ok()
            .filter(|d| *d <= crate::frame::DURATION_S_MAX)
            .ok_or_else(|| format!("duration_seconds[{i}] = {duration} out of range"))?;
        actions.push(RelayAction {
            relay,
            action,
            duration_s,
        });
    }
    let expires_at_ms = match &row.expires_at {
        None => u64::MAX,
        Some(text) => {
            let at =
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| format!("expires_at {text:?}: {e}"))?;
            u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
        }
    };
    Ok((mac, actions, expires_at_ms))
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
