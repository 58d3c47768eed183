//! The JSON payloads of the MQTT topics, as typed values: every payload carries the protocol
//! version `"v"`, and decoding checks size, version, shape and field ranges before anything
//! else sees the value.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::command_id::CommandId;
use crate::frame::{DURATION_S_MAX, RELAYS_PER_SLAVE_MAX, SwitchAction};
use crate::mac::MacAddr;

/// The `"v"` every payload carries.
pub const PROTOCOL_VERSION: u32 = 1;
/// No payload on any topic may be longer; an ESP32 keeps its MQTT buffer at this size.
pub const PAYLOAD_BYTES_MAX: usize = 4096;
/// Device ids, agent ids: `[A-Za-z0-9_.:-]`, this many bytes at most.
pub const DEVICE_ID_BYTES_MAX: usize = 64;
/// Sensor names in telemetry: `[a-z0-9_]`, this many bytes at most.
pub const SENSOR_KEY_BYTES_MAX: usize = 32;
/// Readings in one telemetry payload.
pub const TELEMETRY_READINGS_MAX: usize = 64;
/// Relay actions in one command (`relay_numbers[]` of one `relay_commands_slave` row).
pub const COMMAND_ACTIONS_MAX: usize = RELAYS_PER_SLAVE_MAX as usize;
/// ESP-NOW allows 20 peers; a master drives at most this many slaves.
pub const SLAVES_PER_MASTER_MAX: usize = 20;
/// Free text (reasons, error messages, firmware versions, units).
pub const TEXT_BYTES_MAX: usize = 256;
/// A signature is HMAC-SHA256: 32 bytes, 64 hex digits.
pub const SIGNATURE_HEX_LEN: usize = 64;

/// Why bytes are not a valid payload. Each variant says which check failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} payload is empty")]
    Empty { what: &'static str },
    #[error("{what} payload is {len} bytes, at most {max} allowed")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} payload is not a JSON object: {reason}")]
    NotJson { what: &'static str, reason: String },
    #[error("{what} payload has no protocol version \"v\"")]
    MissingVersion { what: &'static str },
    #[error("{what} payload has protocol version {got}, this side speaks {supported}")]
    UnsupportedVersion {
        what: &'static str,
        got: String,
        supported: u32,
    },
    #[error("{what} payload does not have the expected shape: {reason}")]
    Shape { what: &'static str, reason: String },
    #[error("{what} payload field `{field}`: {reason}")]
    Field {
        what: &'static str,
        field: String,
        reason: String,
    },
}

impl DecodeError {
    /// A stable snake_case name of the failed check, as used in the test vectors.
    pub fn check_name(&self) -> &'static str {
        match self {
            DecodeError::Empty { .. } => "empty",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::NotJson { .. } => "not_json",
            DecodeError::MissingVersion { .. } => "missing_version",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
            DecodeError::Shape { .. } => "shape",
            DecodeError::Field { .. } => "field",
        }
    }
}

/// Why a value cannot be sent: it would fail the receiver's checks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("refusing to send an invalid payload: {0}")]
    Invalid(#[from] DecodeError),
    #[error("could not serialize {what}: {reason}")]
    Serialize { what: &'static str, reason: String },
}

/// A payload of one topic: encode checks what decode checks, so nothing invalid is sent.
pub trait Payload: Serialize + DeserializeOwned {
    /// The payload's name in errors.
    const WHAT: &'static str;

    /// Range checks beyond what the types already guarantee.
    fn validate(&self) -> Result<(), DecodeError>;

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let value = checked_json(Self::WHAT, bytes)?;
        let decoded: Self = serde_json::from_value(value).map_err(|e| DecodeError::Shape {
            what: Self::WHAT,
            reason: e.to_string(),
        })?;
        decoded.validate()?;
        Ok(decoded)
    }

    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.validate()?;
        let bytes = serde_json::to_vec(self).map_err(|e| EncodeError::Serialize {
            what: Self::WHAT,
            reason: e.to_string(),
        })?;
        if bytes.len() > PAYLOAD_BYTES_MAX {
            return Err(DecodeError::TooLarge {
                what: Self::WHAT,
                len: bytes.len(),
                max: PAYLOAD_BYTES_MAX,
            }
            .into());
        }
        Ok(bytes)
    }
}

/// Size, JSON object and version checks, in that order, so a payload of another version is
/// reported as such rather than as a confusing shape error.
fn checked_json(what: &'static str, bytes: &[u8]) -> Result<serde_json::Value, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty { what });
    }
    if bytes.len() > PAYLOAD_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            what,
            len: bytes.len(),
            max: PAYLOAD_BYTES_MAX,
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson {
            what,
            reason: e.to_string(),
        })?;
    let Some(object) = value.as_object() else {
        return Err(DecodeError::NotJson {
            what,
            reason: "top level is not an object".into(),
        });
    };
    match object.get("v") {
        None => return Err(DecodeError::MissingVersion { what }),
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(v) => {
            return Err(DecodeError::UnsupportedVersion {
                what,
                got: v.to_string(),
                supported: PROTOCOL_VERSION,
            });
        }
    }
    Ok(value)
}

fn field_error(
    what: &'static str,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> DecodeError {
    DecodeError::Field {
        what,
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_text(what: &'static str, field: &str, text: &str) -> Result<(), DecodeError> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(field_error(
            what,
            field,
            format!("{} bytes, at most {TEXT_BYTES_MAX}", text.len()),
        ));
    }
    Ok(())
}

fn check_version(what: &'static str, v: u32) -> Result<(), DecodeError> {
    if v != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what,
            got: v.to_string(),
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// A device id or agent id as it appears in topics: 1..=64 bytes of `[A-Za-z0-9_.:-]`, so it
/// can never contain a topic separator or wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a device id: {reason}")]
pub struct DeviceIdError {
    pub text: String,
    pub reason: &'static str,
}

impl DeviceId {
    pub fn new(text: impl Into<String>) -> Result<DeviceId, DeviceIdError> {
        let text = text.into();
        let reason = if text.is_empty() {
            Some("empty")
        } else if text.len() > DEVICE_ID_BYTES_MAX {
            Some("longer than 64 bytes")
        } else if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            Some("only A-Z a-z 0-9 _ . : - are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(DeviceIdError { text, reason }),
            None => Ok(DeviceId(text)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = DeviceIdError;
    fn try_from(text: String) -> Result<DeviceId, DeviceIdError> {
        DeviceId::new(text)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<DeviceId, DeviceIdError> {
        DeviceId::new(s)
    }
}

// ---------------------------------------------------------------------------------------------
// announce

/// What kind of board announces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Master,
}

/// One slave relay board behind a master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaveInfo {
    pub mac: MacAddr,
    pub relay_count: u8,
}

/// `autocore/devices/{id}/announce` (QoS 1, retained): who the master is and what it drives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    pub v: u32,
    pub device_id: DeviceId,
    pub kind: DeviceKind,
    pub firmware: String,
    pub mac: Option<MacAddr>,
    pub slaves: Vec<SlaveInfo>,
    /// Names of the sensors its telemetry carries.
    pub sensors: Vec<String>,
    pub telemetry_interval_ms: u32,
}

impl Payload for Announce {
    const WHAT: &'static str = "announce";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        check_text(Self::WHAT, "firmware", &self.firmware)?;
        if self.slaves.len() > SLAVES_PER_MASTER_MAX {
            return Err(field_error(
                Self::WHAT,
                "slaves",
                format!(
                    "{} slaves, at most {SLAVES_PER_MASTER_MAX}",
                    self.slaves.len()
                ),
            ));
        }
        for (i, slave) in self.slaves.iter().enumerate() {
            if slave.relay_count > RELAYS_PER_SLAVE_MAX {
                return Err(field_error(
                    Self::WHAT,
                    format!("slaves[{i}].relay_count"),
                    format!(
                        "{} relays, at most {RELAYS_PER_SLAVE_MAX}",
                        slave.relay_count
                    ),
                ));
            }
        }
        if self.sensors.len() > TELEMETRY_READINGS_MAX {
            return Err(field_error(Self::WHAT, "sensors", "too many sensors"));
        }
        for (i, name) in self.sensors.iter().enumerate() {
            check_sensor_key(name)
                .map_err(|reason| field_error(Self::WHAT, format!("sensors[{i}]"), reason))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// status

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Online {
    Online,
    Offline,
}

/// `autocore/devices/{id}/status` and `autocore/gateway/{agent_id}/status` (QoS 1, retained,
/// and the last will with `"status":"offline"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub v: u32,
    pub status: Online,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the device's emergency stop is latched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency_latched: Option<bool>,
}

impl Status {
    pub fn online(emergency_latched: bool) -> Status {
        Status {
            v: PROTOCOL_VERSION,
            status: Online::Online,
            reason: None,
            emergency_latched: Some(emergency_latched),
        }
    }

    /// The last will: what the broker publishes when the connection drops.
    pub fn last_will() -> Status {
        Status {
            v: PROTOCOL_VERSION,
            status: Online::Offline,
            reason: Some("connection lost".into()),
            emergency_latched: None,
        }
    }
}

impl Payload for Status {
    const WHAT: &'static str = "status";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        if let Some(reason) = &self.reason {
            check_text(Self::WHAT, "reason", reason)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// telemetry

/// One sensor reading, `{"value": 6.8, "unit": "pH"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// `autocore/devices/{id}/telemetry` (QoS 0, not retained): the seeds' shape, one key per
/// sensor, `{"v":1,"ts_ms":1700000000000,"ph":{"value":6.8,"unit":"pH"}}`. `v` and `ts_ms` are
/// reserved keys; sensor names are `[a-z0-9_]`, 1..=32 bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub v: u32,
    /// Unix time in milliseconds when the readings were taken, if the board knows it.
    pub ts_ms: Option<u64>,
    pub readings: BTreeMap<String, Reading>,
}

const TELEMETRY_RESERVED_KEYS: [&str; 2] = ["v", "ts_ms"];

fn check_sensor_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > SENSOR_KEY_BYTES_MAX {
        return Err(format!(
            "sensor name must be 1..={SENSOR_KEY_BYTES_MAX} bytes"
        ));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("sensor name may only hold a-z 0-9 _".into());
    }
    if TELEMETRY_RESERVED_KEYS.contains(&key) {
        return Err(format!("{key:?} is reserved"));
    }
    Ok(())
}

impl Serialize for Telemetry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("v", &self.v)?;
        if let Some(ts) = self.ts_ms {
            map.serialize_entry("ts_ms", &ts)?;
        }
        for (key, reading) in &self.readings {
            map.serialize_entry(key, reading)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Telemetry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Telemetry, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let v = map
            .remove("v")
            .ok_or_else(|| D::Error::custom("missing field `v`"))?;
        let v = v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| D::Error::custom("`v` is not a version number"))?;
        let ts_ms = match map.remove("ts_ms") {
            None => None,
            Some(ts) => Some(
                ts.as_u64()
                    .ok_or_else(|| D::Error::custom("`ts_ms` is not a non-negative integer"))?,
            ),
        };
        let mut readings = BTreeMap::new();
        for (key, value) in map {
            let reading: Reading = serde_json::from_value(value)
                .map_err(|e| D::Error::custom(format!("reading {key:?}: {e}")))?;
            readings.insert(key, reading);
        }
        Ok(Telemetry { v, ts_ms, readings })
    }
}

impl Payload for Telemetry {
    const WHAT: &'static str = "telemetry";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        if self.readings.len() > TELEMETRY_READINGS_MAX {
            return Err(field_error(
                Self::WHAT,
                "readings",
                format!(
                    "{} readings, at most {TELEMETRY_READINGS_MAX}",
                    self.readings.len()
                ),
            ));
        }
        for (key, reading) in &self.readings {
            check_sensor_key(key).map_err(|r| field_error(Self::WHAT, key, r))?;
            if !reading.value.is_finite() {
                return Err(field_error(Self::WHAT, key, "value is not a finite number"));
            }
            if let Some(unit) = &reading.unit {
                check_text(Self::WHAT, key, unit)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// relay command

/// One relay of a command: absolute, never a toggle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayAction {
    /// Relay number on the slave, 0-based as in `relay_numbers[]`.
    pub relay: u8,
    pub action: SwitchAction,
    /// For `on`: switch off again after this many seconds (0: only the slave's maximum on-time
    /// applies). Ignored for `off`.
    pub duration_s: u32,
}

/// `autocore/devices/{master_id}/command` (QoS 1, not retained): set relays of one slave. Signed
/// with the master's key (see [`crate::sign`]); `sig` is absent only before signing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayCommand {
    pub v: u32,
    pub command_id: CommandId,
    /// The master this command is for; part of the signed bytes, so a command cannot be
    /// redirected to another master.
    pub master_id: DeviceId,
    /// Strictly increasing per master; the master rejects any counter not above the last it
    /// accepted.
    pub counter: u64,
    /// Unix time in milliseconds after which the command must not run.
    pub expires_at_ms: u64,
    pub slave_mac: MacAddr,
    pub actions: Vec<RelayAction>,
    /// HMAC-SHA256 over [`crate::sign::signing_bytes`], lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl RelayCommand {
    /// A command not yet signed; [`crate::CommandSigner::seal`] sets counter and signature.
    pub fn unsigned(
        command_id: CommandId,
        master_id: DeviceId,
        slave_mac: MacAddr,
        actions: Vec<RelayAction>,
        expires_at_ms: u64,
    ) -> RelayCommand {
        RelayCommand {
            v: PROTOCOL_VERSION,
            command_id,
            master_id,
            counter: 0,
            expires_at_ms,
            slave_mac,
            actions,
            sig: None,
        }
    }
}

impl Payload for RelayCommand {
    const WHAT: &'static str = "command";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        if self.actions.is_empty() || self.actions.len() > COMMAND_ACTIONS_MAX {
            return Err(field_error(
                Self::WHAT,
                "actions",
                format!(
                    "{} actions, need 1..={COMMAND_ACTIONS_MAX}",
                    self.actions.len()
                ),
            ));
        }
        let mut seen = 0u32;
        for (i, action) in self.actions.iter().enumerate() {
            if action.relay >= RELAYS_PER_SLAVE_MAX {
                return Err(field_error(
                    Self::WHAT,
                    format!("actions[{i}].relay"),
                    format!(
                        "relay {} out of range 0..{RELAYS_PER_SLAVE_MAX}",
                        action.relay
                    ),
                ));
            }
            if action.duration_s > DURATION_S_MAX {
                return Err(field_error(
                    Self::WHAT,
                    format!("actions[{i}].duration_s"),
                    format!("{} s, at most {DURATION_S_MAX} s", action.duration_s),
                ));
            }
            if seen & (1 << action.relay) != 0 {
                return Err(field_error(
                    Self::WHAT,
                    format!("actions[{i}].relay"),
                    format!("relay {} appears twice", action.relay),
                ));
            }
            seen |= 1 << action.relay;
        }
        check_signature(Self::WHAT, self.sig.as_deref())
    }
}

/// A present `sig` must be 64 lowercase hex digits; whether it is required is the receiver's
/// check (it answers `unsigned`), so that the error says what is missing.
fn check_signature(what: &'static str, sig: Option<&str>) -> Result<(), DecodeError> {
    if let Some(sig) = sig
        && (sig.len() != SIGNATURE_HEX_LEN
            || !sig.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err(field_error(
            what,
            "sig",
            format!("must be {SIGNATURE_HEX_LEN} lowercase hex digits"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ack

/// How a command ended, as the master reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckResult {
    /// Every relay was set and the slave confirmed it.
    Completed,
    /// This command id was applied before; nothing was done again.
    Duplicate,
    /// The master refused the command (see `error`).
    Rejected,
    /// The command arrived after `expires_at_ms` and was not run.
    Expired,
    /// The master tried and could not finish (see `error`).
    Failed,
}

/// Why a command was rejected or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckErrorCode {
    /// The payload could not be decoded.
    Malformed,
    /// No signature.
    Unsigned,
    /// The signature does not match the master's key and the signed bytes.
    BadSignature,
    /// The counter is not above the last accepted one.
    Replayed,
    /// The command names another master.
    WrongMaster,
    Expired,
    /// The emergency stop is latched; only `off` actions run.
    EmergencyLatched,
    /// The master has no slave with this MAC.
    UnknownSlave,
    /// The slave has no such relay.
    NoSuchRelay,
    /// The slave did not answer in time.
    SlaveUnreachable,
    /// The master's queue of commands waiting for slaves is full; nothing ran. Send again later.
    Busy,
}

impl AckErrorCode {
    /// The code as the wire writes it (`no_such_relay`), also at the head of the
    /// `p_error_message` a polling master reports.
    pub fn as_str(self) -> &'static str {
        match self {
            AckErrorCode::Malformed => "malformed",
            AckErrorCode::Unsigned => "unsigned",
            AckErrorCode::BadSignature => "bad_signature",
            AckErrorCode::Replayed => "replayed",
            AckErrorCode::WrongMaster => "wrong_master",
            AckErrorCode::Expired => "expired",
            AckErrorCode::EmergencyLatched => "emergency_latched",
            AckErrorCode::UnknownSlave => "unknown_slave",
            AckErrorCode::NoSuchRelay => "no_such_relay",
            AckErrorCode::SlaveUnreachable => "slave_unreachable",
            AckErrorCode::Busy => "busy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckError {
    pub code: AckErrorCode,
    pub message: String,
}

/// `autocore/devices/{master_id}/ack` (QoS 1, not retained): the outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAck {
    pub v: u32,
    /// The command's id; absent only when the command was too malformed to read one.
    pub command_id: Option<CommandId>,
    pub result: AckResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AckError>,
    pub slave_mac: Option<MacAddr>,
    /// The slave's relay states after the command, relay 0 first (empty if unknown).
    pub relay_states: Vec<bool>,
    /// From receiving the command to the last relay confirmed.
    pub execution_time_ms: u64,
    /// The master's report counter (see [`crate::sign::ReportSigner`]); absent only before
    /// signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<u64>,
    /// HMAC-SHA256 over [`crate::sign::ack_signing_bytes`], lowercase hex; the agent refuses an
    /// ack without a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl Payload for CommandAck {
    const WHAT: &'static str = "ack";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        if self.relay_states.len() > usize::from(RELAYS_PER_SLAVE_MAX) {
            return Err(field_error(Self::WHAT, "relay_states", "too many relays"));
        }
        if let Some(error) = &self.error {
            check_text(Self::WHAT, "error.message", &error.message)?;
        }
        let needs_error = matches!(self.result, AckResult::Rejected | AckResult::Failed);
        if needs_error && self.error.is_none() {
            return Err(field_error(
                Self::WHAT,
                "error",
                "a rejected or failed command must say why",
            ));
        }
        check_signature(Self::WHAT, self.sig.as_deref())
    }
}

// ---------------------------------------------------------------------------------------------
// relay states

/// Why a slave's relays are as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateReason {
    Command,
    Heartbeat,
    Boot,
    MasterSilent,
    MaxOnTime,
    DurationEnded,
    EmergencyStop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaveState {
    pub mac: MacAddr,
    /// The master heard from this slave within its heartbeat timeout.
    pub online: bool,
    pub relay_states: Vec<bool>,
    pub emergency_latched: bool,
    /// Why the states last changed.
    pub reason: StateReason,
}

/// `autocore/devices/{master_id}/relays/state` (QoS 1, retained): every slave's relays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayStateReport {
    pub v: u32,
    pub slaves: Vec<SlaveState>,
    /// The master's report counter, as in [`CommandAck::counter`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<u64>,
    /// HMAC-SHA256 over [`crate::sign::relay_states_signing_bytes`], lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl Payload for RelayStateReport {
    const WHAT: &'static str = "relay state report";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        if self.slaves.len() > SLAVES_PER_MASTER_MAX {
            return Err(field_error(Self::WHAT, "slaves", "too many slaves"));
        }
        for (i, slave) in self.slaves.iter().enumerate() {
            if slave.relay_states.len() > usize::from(RELAYS_PER_SLAVE_MAX) {
                return Err(field_error(
                    Self::WHAT,
                    format!("slaves[{i}].relay_states"),
                    "too many relays",
                ));
            }
        }
        check_signature(Self::WHAT, self.sig.as_deref())
    }
}

// ---------------------------------------------------------------------------------------------
// emergency

/// `autocore/emergency/stop` (QoS 1, retained) and `autocore/emergency/reset` (QoS 1, not
/// retained). Stop switches every relay off and latches on every node until a reset; a reset
/// only releases the latch, it switches nothing on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Emergency {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix time in milliseconds when someone pressed the button.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at_ms: Option<u64>,
}

impl Emergency {
    pub fn new(reason: impl Into<String>) -> Emergency {
        Emergency {
            v: PROTOCOL_VERSION,
            reason: Some(reason.into()),
            issued_at_ms: None,
        }
    }
}

impl Payload for Emergency {
    const WHAT: &'static str = "emergency";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        if let Some(reason) = &self.reason {
            check_text(Self::WHAT, "reason", reason)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// configuration

/// Limits of one relay that its slave enforces by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayLimits {
    /// The slave switches the relay off after this long on, whatever it was told (0: no limit).
    pub max_on_s: u32,
    /// State at power-up; off unless configured otherwise.
    #[serde(default)]
    pub boot_on: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaveConfig {
    pub mac: MacAddr,
    pub relays: Vec<RelayLimits>,
}

/// `autocore/config/devices/{id}` (QoS 1, retained): a master's settings, delivered again by
/// the broker whenever the master reconnects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub v: u32,
    pub telemetry_interval_ms: u32,
    /// A slave switches everything off after hearing nothing from its master this long.
    pub master_silent_timeout_ms: u32,
    pub slaves: Vec<SlaveConfig>,
}

/// Telemetry more often than this would flood the Pi's SD card.
pub const TELEMETRY_INTERVAL_MS_MIN: u32 = 100;

impl Payload for DeviceConfig {
    const WHAT: &'static str = "config";
    fn validate(&self) -> Result<(), DecodeError> {
        check_version(Self::WHAT, self.v)?;
        if self.telemetry_interval_ms < TELEMETRY_INTERVAL_MS_MIN {
            return Err(field_error(
                Self::WHAT,
                "telemetry_interval_ms",
                format!("at least {TELEMETRY_INTERVAL_MS_MIN} ms"),
            ));
        }
        if self.slaves.len() > SLAVES_PER_MASTER_MAX {
            return Err(field_error(Self::WHAT, "slaves", "too many slaves"));
        }
        for (i, slave) in self.slaves.iter().enumerate() {
            if slave.relays.len() > usize::from(RELAYS_PER_SLAVE_MAX) {
                return Err(field_error(
                    Self::WHAT,
                    format!("slaves[{i}].relays"),
                    "too many relays",
                ));
            }
        }
        Ok(())
    }
}

/// Relay states as a list, relay 0 first, from a frame's bitmap.
pub fn states_to_vec(states: crate::frame::RelayStates) -> Vec<bool> {
    (0..states.count).map(|r| states.is_on(r)).collect()
}
