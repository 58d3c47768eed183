//! Signing under a master's key, HMAC-SHA256 over canonical byte strings (never over JSON, which
//! two implementations may serialize differently): relay commands the agent sends (a strictly
//! increasing counter against replay), the acks and relay state reports a master sends back (a
//! counter checked against an anti-replay window), and the master's broker password.
//!
//! Command signed bytes, in order (integers little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 19 | ASCII `autocore/command/v1` (domain and protocol version) |
//! | 1 | length L of `master_id` |
//! | L | `master_id`, ASCII |
//! | 8 | `counter` u64 |
//! | 8 | `command_id`, raw u64 ([`crate::CommandId::to_raw`]) |
//! | 8 | `expires_at_ms` u64 |
//! | 6 | `slave_mac` |
//! | 1 | number N of actions |
//! | N × 6 | per action: relay u8, action u8 (1 off, 2 on), `duration_s` u32 |

use std::fmt;

use ring::hmac;

use crate::message::{
    AckErrorCode, AckResult, CommandAck, DeviceId, RelayCommand, RelayStateReport, StateReason,
};

/// The first bytes of every signed command.
pub const SIGNING_DOMAIN: &[u8] = b"autocore/command/v1";
/// The first bytes of every signed report (ack or relay states).
pub const REPORT_SIGNING_DOMAIN: &[u8] = b"autocore/report/v1";
/// What a master's broker password is derived from (see [`broker_password`]).
pub const BROKER_PASSWORD_CONTEXT: &[u8] = b"autocore/mqtt/v1:";
/// Counters a report may lag behind the highest accepted one and still be accepted once.
pub const REPORT_REPLAY_WINDOW: u64 = 64;
pub const KEY_BYTES_MIN: usize = 16;
pub const KEY_BYTES_MAX: usize = 64;

/// A master's HMAC key. Its `Debug` prints nothing secret, and it offers no way to read the
/// key back, so it cannot end up in a log by accident.
#[derive(Clone)]
pub struct MasterKey {
    key: hmac::Key,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is {len} bytes, need {KEY_BYTES_MIN}..={KEY_BYTES_MAX}")]
    Length { len: usize },
    /// The text itself is not repeated: it may be most of a key.
    #[error("key is not hex")]
    NotHex,
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey, KeyError> {
        if !(KEY_BYTES_MIN..=KEY_BYTES_MAX).contains(&bytes.len()) {
            return Err(KeyError::Length { len: bytes.len() });
        }
        Ok(MasterKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    pub fn from_hex(text: &str) -> Result<MasterKey, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(|_| KeyError::NotHex)?;
        MasterKey::from_bytes(&bytes)
    }
}

impl std::str::FromStr for MasterKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<MasterKey, KeyError> {
        MasterKey::from_hex(s)
    }
}

/// The exact bytes the signature covers (see the module docs). `sig` itself is not part of it.
pub fn signing_bytes(command: &RelayCommand) -> Vec<u8> {
    let master = command.master_id.as_str().as_bytes();
    let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 1 + master.len() + 31 + 6 * 16);
    out.extend_from_slice(SIGNING_DOMAIN);
    // DeviceId guarantees at most 64 bytes, so the length fits a byte.
    out.push(master.len() as u8);
    out.extend_from_slice(master);
    out.extend_from_slice(&command.counter.to_le_bytes());
    out.extend_from_slice(&command.command_id.to_raw().to_le_bytes());
    out.extend_from_slice(&command.expires_at_ms.to_le_bytes());
    out.extend_from_slice(&command.slave_mac.0);
    // Validation limits actions to 16; a longer list would be rejected before signing.
    out.push(command.actions.len().min(255) as u8);
    for action in &command.actions {
        out.push(action.relay);
        out.push(action.action as u8);
        out.extend_from_slice(&action.duration_s.to_le_bytes());
    }
    out
}

/// HMAC-SHA256 of [`signing_bytes`], lowercase hex.
pub fn signature_hex(command: &RelayCommand, key: &MasterKey) -> String {
    mac_hex(key, &signing_bytes(command))
}

/// Checks a hex MAC over `signed` in constant time.
fn check_mac(key: &MasterKey, signed: &[u8], sig: &str) -> Result<(), VerifyError> {
    let sig = hex::decode(sig).map_err(|_| VerifyError::MalformedSignature)?;
    if sig.len() != 32 {
        return Err(VerifyError::MalformedSignature);
    }
    hmac::verify(&key.key, signed, &sig).map_err(|_| VerifyError::BadSignature)
}

/// Why a master refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("command is unsigned")]
    Unsigned,
    #[error("signature is not 64 hex digits")]
    MalformedSignature,
    #[error("signature does not match (wrong key or changed content)")]
    BadSignature,
    #[error("command is for master {got}, this is {expected}")]
    WrongMaster { expected: DeviceId, got: DeviceId },
    #[error("counter {counter} is not above the last accepted {last}: replayed or stale")]
    Replayed { counter: u64, last: u64 },
}

impl VerifyError {
    /// A stable snake_case name, as used in the test vectors and in acks.
    pub fn check_name(&self) -> &'static str {
        match self {
            VerifyError::Unsigned => "unsigned",
            VerifyError::MalformedSignature => "malformed_signature",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::WrongMaster { .. } => "wrong_master",
            VerifyError::Replayed { .. } => "replayed",
        }
    }
}

/// The master's side: checks signatures and keeps the replay counter. Persist
/// [`CommandVerifier::last_counter`] across restarts, or a replay of an old command would be
/// accepted after a reboot.
#[derive(Debug, Clone)]
pub struct CommandVerifier {
    master_id: DeviceId,
    key: MasterKey,
    last_counter: Option<u64>,
}

impl CommandVerifier {
    pub fn new(master_id: DeviceId, key: MasterKey, last_counter: Option<u64>) -> CommandVerifier {
        CommandVerifier {
            master_id,
            key,
            last_counter,
        }
    }

    pub fn last_counter(&self) -> Option<u64> {
        self.last_counter
    }

    /// Checks signature, master and counter; on success the counter becomes the last accepted.
    /// The signature is checked first, so a forged counter can never advance the state.
    pub fn verify(&mut self, command: &RelayCommand) -> Result<(), VerifyError> {
        let sig = command.sig.as_deref().ok_or(VerifyError::Unsigned)?;
        check_mac(&self.key, &signing_bytes(command), sig)?;
        if command.master_id != self.master_id {
            return Err(VerifyError::WrongMaster {
                expected: self.master_id.clone(),
                got: command.master_id.clone(),
            });
        }
        if let Some(last) = self.last_counter
            && command.counter <= last
        {
            return Err(VerifyError::Replayed {
                counter: command.counter,
                last,
            });
        }
        self.last_counter = Some(command.counter);
        Ok(())
    }
}

/// The agent's side: assigns counters and signs. Start `next_counter` above anything used
/// before (persist it, or start from the current Unix time in milliseconds, which only grows).
#[derive(Debug, Clone)]
pub struct CommandSigner {
    key: MasterKey,
    next_counter: u64,
}

impl CommandSigner {
    pub fn new(key: MasterKey, next_counter: u64) -> CommandSigner {
        CommandSigner { key, next_counter }
    }

    pub fn next_counter(&self) -> u64 {
        self.next_counter
    }

    /// Gives the command the next counter and its signature.
    pub fn seal(&mut self, mut command: RelayCommand) -> RelayCommand {
        command.counter = self.next_counter;
        self.next_counter = self.next_counter.saturating_add(1);
        command.sig = Some(signature_hex(&command, &self.key));
        command
    }
}

/// A master's MQTT password: lowercase hex of HMAC-SHA256(key, `autocore/mqtt/v1:` ‖ device id).
/// Derived from the command-signing key, so provisioning a master's key provisions its broker
/// login too; the prefix differs from every signed string, so a password is never a signature.
pub fn broker_password(key: &MasterKey, device_id: &DeviceId) -> String {
    let mut message = Vec::with_capacity(BROKER_PASSWORD_CONTEXT.len() + device_id.as_str().len());
    message.extend_from_slice(BROKER_PASSWORD_CONTEXT);
    message.extend_from_slice(device_id.as_str().as_bytes());
    mac_hex(key, &message)
}

/// Which report a signed string covers: the byte after the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReportKind {
    Ack = 1,
    RelayStates = 2,
}

fn report_header(kind: ReportKind, master_id: &DeviceId, counter: u64, out: &mut Vec<u8>) {
    let master = master_id.as_str().as_bytes();
    out.extend_from_slice(REPORT_SIGNING_DOMAIN);
    out.push(kind as u8);
    // DeviceId guarantees at most 64 bytes.
    out.push(master.len() as u8);
    out.extend_from_slice(master);
    out.extend_from_slice(&counter.to_le_bytes());
}

/// Relay states as count and bitmap (bit n = relay n on); at most 16 relays after validation.
fn push_states(states: &[bool], out: &mut Vec<u8>) {
    let bitmap =
        states.iter().take(16).enumerate().fold(
            0u16,
            |bits, (i, &on)| if on { bits | (1 << i) } else { bits },
        );
    out.push(states.len().min(255) as u8);
    out.extend_from_slice(&bitmap.to_le_bytes());
}

/// The one-byte code of an ack's result in signed bytes.
pub fn ack_result_code(result: AckResult) -> u8 {
    match result {
        AckResult::Completed => 1,
        AckResult::Duplicate => 2,
        AckResult::Rejected => 3,
        AckResult::Expired => 4,
        AckResult::Failed => 5,
    }
}

/// The one-byte code of an ack's error in signed bytes (0: no error).
pub fn ack_error_code(code: Option<AckErrorCode>) -> u8 {
    match code {
        None => 0,
        Some(AckErrorCode::Malformed) => 1,
        Some(AckErrorCode::Unsigned) => 2,
        Some(AckErrorCode::BadSignature) => 3,
        Some(AckErrorCode::Replayed) => 4,
        Some(AckErrorCode::WrongMaster) => 5,
        Some(AckErrorCode::Expired) => 6,
        Some(AckErrorCode::EmergencyLatched) => 7,
        Some(AckErrorCode::UnknownSlave) => 8,
        Some(AckErrorCode::NoSuchRelay) => 9,
        Some(AckErrorCode::SlaveUnreachable) => 10,
        Some(AckErrorCode::Busy) => 11,
    }
}

/// The one-byte code of a relay state reason in signed bytes.
pub fn state_reason_code(reason: StateReason) -> u8 {
    match reason {
        StateReason::Command => 1,
        StateReason::Heartbeat => 2,
        StateReason::Boot => 3,
        StateReason::MasterSilent => 4,
        StateReason::MaxOnTime => 5,
        StateReason::DurationEnded => 6,
        StateReason::EmergencyStop => 7,
    }
}

/// The bytes an ack's signature covers; `master_id` is the master of the topic it came on, so an
/// ack cannot be replayed on another master's topic. `sig` itself is not part of it.
///
/// | bytes | field |
/// | --- | --- |
/// | 18 | ASCII `autocore/report/v1` |
/// | 1 | 1 (ack) |
/// | 1 + L | length and `master_id` |
/// | 8 | `counter` u64 |
/// | 8 | `command_id` raw u64, 0 when null |
/// | 1 | result code ([`ack_result_code`]) |
/// | 1 | error code ([`ack_error_code`], 0 none) |
/// | 2 + M | error message length u16 and its UTF-8 bytes (0 when no error) |
/// | 1 + 6 | 1 and `slave_mac`, or 0 and six zero bytes when null |
/// | 1 + 2 | relay count and relay state bitmap u16 |
/// | 8 | `execution_time_ms` u64 |
pub fn ack_signing_bytes(master_id: &DeviceId, ack: &CommandAck) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    report_header(
        ReportKind::Ack,
        master_id,
        ack.counter.unwrap_or(0),
        &mut out,
    );
    let id = ack.command_id.map(|id| id.to_raw()).unwrap_or(0);
    out.extend_from_slice(&id.to_le_bytes());
    out.push(ack_result_code(ack.result));
    out.push(ack_error_code(ack.error.as_ref().map(|e| e.code)));
    let message = ack
        .error
        .as_ref()
        .map(|e| e.message.as_bytes())
        .unwrap_or(&[]);
    // Validation limits messages to 256 bytes.
    out.extend_from_slice(&(message.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    out.extend_from_slice(message);
    match ack.slave_mac {
        Some(mac) => {
            out.push(1);
            out.extend_from_slice(&mac.0);
        }
        None => {
            out.push(0);
            out.extend_from_slice(&[0; 6]);
        }
    }
    push_states(&ack.relay_states, &mut out);
    out.extend_from_slice(&ack.execution_time_ms.to_le_bytes());
    out
}

/// The bytes a relay state report's signature covers.
///
/// | bytes | field |
/// | --- | --- |
/// | 18 | ASCII `autocore/report/v1` |
/// | 1 | 2 (relay states) |
/// | 1 + L | length and `master_id` |
/// | 8 | `counter` u64 |
/// | 1 | number N of slaves |
/// | N × 12 | per slave: `mac` (6), `online` u8, `emergency_latched` u8, reason code ([`state_reason_code`]), relay count u8, bitmap u16 |
pub fn relay_states_signing_bytes(master_id: &DeviceId, report: &RelayStateReport) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + 12 * report.slaves.len());
    report_header(
        ReportKind::RelayStates,
        master_id,
        report.counter.unwrap_or(0),
        &mut out,
    );
    // Validation limits slaves to 20.
    out.push(report.slaves.len().min(255) as u8);
    for slave in &report.slaves {
        out.extend_from_slice(&slave.mac.0);
        out.push(u8::from(slave.online));
        out.push(u8::from(slave.emergency_latched));
        out.push(state_reason_code(slave.reason));
        push_states(&slave.relay_states, &mut out);
    }
    out
}

fn mac_hex(key: &MasterKey, bytes: &[u8]) -> String {
    hex::encode(hmac::sign(&key.key, bytes).as_ref())
}

/// The master's side of reports: gives each ack and relay state report the next counter and its
/// signature. Start `next_counter` above every counter used before: persist it, or start at the
/// Unix time in milliseconds at boot (safe while the master sends fewer than one report per
/// millisecond on average, which acks and state changes never approach).
#[derive(Debug, Clone)]
pub struct ReportSigner {
    master_id: DeviceId,
    key: MasterKey,
    next_counter: u64,
}

impl ReportSigner {
    pub fn new(master_id: DeviceId, key: MasterKey, next_counter: u64) -> ReportSigner {
        ReportSigner {
            master_id,
            key,
            next_counter,
        }
    }

    pub fn next_counter(&self) -> u64 {
        self.next_counter
    }

    fn take_counter(&mut self) -> u64 {
        let counter = self.next_counter;
        self.next_counter = self.next_counter.saturating_add(1);
        counter
    }

    pub fn seal_ack(&mut self, mut ack: CommandAck) -> CommandAck {
        ack.counter = Some(self.take_counter());
        ack.sig = Some(mac_hex(
            &self.key,
            &ack_signing_bytes(&self.master_id, &ack),
        ));
        ack
    }

    pub fn seal_relay_states(&mut self, mut report: RelayStateReport) -> RelayStateReport {
        report.counter = Some(self.take_counter());
        report.sig = Some(mac_hex(
            &self.key,
            &relay_states_signing_bytes(&self.master_id, &report),
        ));
        report
    }
}

/// An anti-replay window as IPsec keeps one (RFC 4303): a counter above the highest accepted is
/// accepted; one up to [`REPORT_REPLAY_WINDOW`] − 1 below it is accepted once, so reports that
/// crossed in flight are not refused; anything older, or seen before, is a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: Option<u64>,
    /// Bit n: `highest - n` was accepted.
    seen: u64,
}

impl ReplayWindow {
    /// A window restored from [`ReplayWindow::highest`] and [`ReplayWindow::seen_bits`].
    pub fn from_parts(highest: Option<u64>, seen: u64) -> ReplayWindow {
        ReplayWindow { highest, seen }
    }

    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    pub fn seen_bits(&self) -> u64 {
        self.seen
    }

    /// Whether `counter` would be accepted, without accepting it.
    pub fn check(&self, counter: u64) -> Result<(), VerifyError> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if counter > highest {
            return Ok(());
        }
        let behind = highest - counter;
        if behind >= REPORT_REPLAY_WINDOW || self.seen & (1 << behind) != 0 {
            return Err(VerifyError::Replayed {
                counter,
                last: highest,
            });
        }
        Ok(())
    }

    /// Checks and records `counter`.
    pub fn accept(&mut self, counter: u64) -> Result<(), VerifyError> {
        self.check(counter)?;
        match self.highest {
            Some(highest) if counter <= highest => self.seen |= 1 << (highest - counter),
            Some(highest) => {
                let ahead = counter - highest;
                self.seen = if ahead >= REPORT_REPLAY_WINDOW {
                    1
                } else {
                    (self.seen << ahead) | 1
                };
                self.highest = Some(counter);
            }
            None => {
                self.seen = 1;
                self.highest = Some(counter);
            }
        }
        Ok(())
    }
}

/// The agent's side of reports: checks an ack's or relay state report's signature under the
/// master's key (for the master of the topic it came on), then its counter against the window.
/// The signature is checked first, so a forged report can never move the window.
#[derive(Debug, Clone)]
pub struct ReportVerifier {
    master_id: DeviceId,
    key: MasterKey,
    window: ReplayWindow,
}

impl ReportVerifier {
    pub fn new(master_id: DeviceId, key: MasterKey, window: ReplayWindow) -> ReportVerifier {
        ReportVerifier {
            master_id,
            key,
            window,
        }
    }

    pub fn window(&self) -> ReplayWindow {
        self.window
    }

    fn verify(
        &mut self,
        counter: Option<u64>,
        sig: Option<&str>,
        signed: &[u8],
    ) -> Result<(), VerifyError> {
        let (Some(counter), Some(sig)) = (counter, sig) else {
            return Err(VerifyError::Unsigned);
        };
        check_mac(&self.key, signed, sig)?;
        self.window.accept(counter)
    }

    pub fn verify_ack(&mut self, ack: &CommandAck) -> Result<(), VerifyError> {
        let signed = ack_signing_bytes(&self.master_id, ack);
        self.verify(ack.counter, ack.sig.as_deref(), &signed)
    }

    pub fn verify_relay_states(&mut self, report: &RelayStateReport) -> Result<(), VerifyError> {
        let signed = relay_states_signing_bytes(&self.master_id, report);
        self.verify(report.counter, report.sig.as_deref(), &signed)
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;
    use crate::message::{AckError, SlaveState};
    use crate::{CommandId, MacAddr};

    fn key() -> MasterKey {
        MasterKey::from_hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
            .unwrap()
    }

    fn master() -> DeviceId {
        DeviceId::new("ESP32_HIDRO_F44738").unwrap()
    }

    fn ack() -> CommandAck {
        CommandAck {
            v: 1,
            command_id: Some(CommandId::backend(123).unwrap()),
            result: AckResult::Completed,
            error: None,
            slave_mac: Some("14:33:5C:38:BF:60".parse::<MacAddr>().unwrap()),
            relay_states: vec![true, false, false, false],
            execution_time_ms: 150,
            counter: None,
            sig: None,
        }
    }

    fn report() -> RelayStateReport {
        RelayStateReport {
            v: 1,
            slaves: vec![SlaveState {
                mac: "14:33:5C:38:BF:60".parse().unwrap(),
                online: true,
                relay_states: vec![false, true],
                emergency_latched: false,
                reason: StateReason::Command,
            }],
            counter: None,
            sig: None,
        }
    }

    #[test]
    fn a_signed_ack_verifies_and_every_changed_field_fails() {
        let mut signer = ReportSigner::new(master(), key(), 10);
        let sealed = signer.seal_ack(ack());
        assert_eq!(sealed.counter, Some(10));
        let mut verifier = ReportVerifier::new(master(), key(), ReplayWindow::default());
        verifier.verify_ack(&sealed).unwrap();

        let mut changes: Vec<CommandAck> = Vec::new();
        let mut c = sealed.clone();
        c.result = AckResult::Failed;
        c.error = Some(AckError {
            code: AckErrorCode::SlaveUnreachable,
            message: "x".into(),
        });
        changes.push(c);
        let mut c = sealed.clone();
        c.relay_states[1] = true;
        changes.push(c);
        let mut c = sealed.clone();
        c.command_id = Some(CommandId::backend(124).unwrap());
        changes.push(c);
        let mut c = sealed.clone();
        c.execution_time_ms = 0;
        changes.push(c);
        let mut c = sealed.clone();
        c.slave_mac = None;
        changes.push(c);
        let mut c = sealed.clone();
        c.counter = Some(99);
        changes.push(c);
        for changed in changes {
            let mut fresh = ReportVerifier::new(master(), key(), ReplayWindow::default());
            assert_eq!(
                fresh.verify_ack(&changed),
                Err(VerifyError::BadSignature),
                "{changed:?}"
            );
        }
        let mut other_master = ReportVerifier::new(
            DeviceId::new("ESP32_OTHER").unwrap(),
            key(),
            ReplayWindow::default(),
        );
        assert_eq!(
            other_master.verify_ack(&sealed),
            Err(VerifyError::BadSignature),
            "an ack moved to another master's topic"
        );
        let mut unsigned = ReportVerifier::new(master(), key(), ReplayWindow::default());
        assert_eq!(unsigned.verify_ack(&ack()), Err(VerifyError::Unsigned));
    }

    #[test]
    fn a_signed_relay_state_report_verifies_and_a_changed_state_fails() {
        let mut signer = ReportSigner::new(master(), key(), 1);
        let sealed = signer.seal_relay_states(report());
        let mut verifier = ReportVerifier::new(master(), key(), ReplayWindow::default());
        verifier.verify_relay_states(&sealed).unwrap();
        let mut forged = sealed.clone();
        forged.slaves[0].relay_states = vec![true, true];
        let mut fresh = ReportVerifier::new(master(), key(), ReplayWindow::default());
        assert_eq!(
            fresh.verify_relay_states(&forged),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn the_window_accepts_reordered_counters_once_and_refuses_replays_and_old_ones() {
        let mut window = ReplayWindow::default();
        window.accept(100).unwrap();
        window.accept(103).unwrap();
        window.accept(101).unwrap();
        assert!(matches!(
            window.accept(101),
            Err(VerifyError::Replayed {
                counter: 101,
                last: 103
            })
        ));
        assert!(window.accept(103).is_err());
        window.accept(102).unwrap();
        window.accept(103 + 63).unwrap();
        assert!(window.accept(103).is_err(), "63 behind, seen");
        window.accept(104).unwrap();
        assert!(window.accept(102).is_err(), "64 behind: too old");
        window.accept(10_000).unwrap();
        assert!(window.accept(9_937).is_ok());
        assert!(window.accept(9_936).is_err());
        let restored = ReplayWindow::from_parts(window.highest(), window.seen_bits());
        assert_eq!(restored, window);
    }

    #[test]
    fn a_replayed_report_is_refused_after_its_signature_checks() {
        let mut signer = ReportSigner::new(master(), key(), 5);
        let first = signer.seal_ack(ack());
        let mut verifier = ReportVerifier::new(master(), key(), ReplayWindow::default());
        verifier.verify_ack(&first).unwrap();
        assert!(matches!(
            verifier.verify_ack(&first),
            Err(VerifyError::Replayed { .. })
        ));
    }

    #[test]
    fn the_broker_password_is_derived_from_key_and_device() {
        let a = broker_password(&key(), &master());
        assert_eq!(a.len(), 64);
        assert_ne!(
            a,
            broker_password(&key(), &DeviceId::new("ESP32_OTHER").unwrap())
        );
        assert_eq!(a, broker_password(&key(), &master()));
    }
}
