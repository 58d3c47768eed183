//! MQTT topic names under `autocore/`: built and parsed in one place, each with its QoS and
//! retain choice.

use std::fmt;

use crate::message::{DeviceId, DeviceIdError};

pub const ROOT: &str = "autocore";
/// Configuration paths below `autocore/config/`: at most this many bytes.
pub const CONFIG_PATH_BYTES_MAX: usize = 128;
/// Any topic this crate parses is at most this long.
pub const TOPIC_BYTES_MAX: usize = 256;

/// MQTT delivery guarantee for a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Telemetry: the next reading replaces a lost one.
    AtMostOnce = 0,
    /// Everything else; receivers tolerate duplicates (absolute actions, command ids).
    AtLeastOnce = 1,
}

/// One topic of contract 2.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `autocore/devices/{id}/announce`
    Announce(DeviceId),
    /// `autocore/devices/{id}/status`
    Status(DeviceId),
    /// `autocore/devices/{id}/telemetry`
    Telemetry(DeviceId),
    /// `autocore/devices/{id}/command`
    Command(DeviceId),
    /// `autocore/devices/{id}/ack`
    Ack(DeviceId),
    /// `autocore/devices/{id}/relays/state`
    RelayState(DeviceId),
    /// `autocore/emergency/stop`
    EmergencyStop,
    /// `autocore/emergency/reset`
    EmergencyReset,
    /// `autocore/config/{path}`; a master's own is `autocore/config/devices/{id}`.
    Config(String),
    /// `autocore/gateway/{agent_id}/status`
    GatewayStatus(DeviceId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is {len} bytes, at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic {topic:?} is not under autocore/")]
    NotOurs { topic: String },
    #[error("topic {topic:?} matches no autocore topic")]
    Unknown { topic: String },
    #[error("topic {topic:?}: {source}")]
    BadId {
        topic: String,
        #[source]
        source: DeviceIdError,
    },
    #[error("config path {path:?}: {reason}")]
    BadConfigPath { path: String, reason: &'static str },
}

impl Topic {
    /// `autocore/config/devices/{id}`
    pub fn device_config(id: &DeviceId) -> Topic {
        Topic::Config(format!("devices/{id}"))
    }

    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        if topic.len() > TOPIC_BYTES_MAX {
            return Err(TopicError::TooLong {
                len: topic.len(),
                max: TOPIC_BYTES_MAX,
            });
        }
        let Some(rest) = topic.strip_prefix(ROOT).and_then(|r| r.strip_prefix('/')) else {
            return Err(TopicError::NotOurs {
                topic: topic.into(),
            });
        };
        let unknown = || TopicError::Unknown {
            topic: topic.into(),
        };
        let id = |text: &str| {
            DeviceId::new(text).map_err(|source| TopicError::BadId {
                topic: topic.into(),
                source,
            })
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["devices", device, "announce"] => Ok(Topic::Announce(id(device)?)),
            ["devices", device, "status"] => Ok(Topic::Status(id(device)?)),
            ["devices", device, "telemetry"] => Ok(Topic::Telemetry(id(device)?)),
            ["devices", device, "command"] => Ok(Topic::Command(id(device)?)),
            ["devices", device, "ack"] => Ok(Topic::Ack(id(device)?)),
            ["devices", device, "relays", "state"] => Ok(Topic::RelayState(id(device)?)),
            ["emergency", "stop"] => Ok(Topic::EmergencyStop),
            ["emergency", "reset"] => Ok(Topic::EmergencyReset),
            ["gateway", agent, "status"] => Ok(Topic::GatewayStatus(id(agent)?)),
            ["config", ..] => {
                let path = &rest["config/".len().min(rest.len())..];
                check_config_path(path)?;
                Ok(Topic::Config(path.into()))
            }
            _ => Err(unknown()),
        }
    }

    pub fn qos(&self) -> Qos {
        match self {
            Topic::Telemetry(_) => Qos::AtMostOnce,
            _ => Qos::AtLeastOnce,
        }
    }

    /// Retained topics describe current state a late subscriber needs; events are not
    /// retained, so a reconnecting master never re-runs an old command.
    pub fn retain(&self) -> bool {
        matches!(
            self,
            Topic::Announce(_)
                | Topic::Status(_)
                | Topic::RelayState(_)
                | Topic::EmergencyStop
                | Topic::Config(_)
                | Topic::GatewayStatus(_)
        )
    }

    /// The device the topic is about, if any.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Topic::Announce(d)
            | Topic::Status(d)
            | Topic::Telemetry(d)
            | Topic::Command(d)
            | Topic::Ack(d)
            | Topic::RelayState(d)
            | Topic::GatewayStatus(d) => Some(d),
            _ => None,
        }
    }
}

fn check_config_path(path: &str) -> Result<(), TopicError> {
    let bad = |reason| TopicError::BadConfigPath {
        path: path.into(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("empty"));
    }
    if path.len() > CONFIG_PATH_BYTES_MAX {
        return Err(bad("longer than 128 bytes"));
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(bad("empty segment"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err(bad("segments may only hold A-Z a-z 0-9 _ . : -"));
        }
    }
    Ok(())
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Announce(d) => write!(f, "{ROOT}/devices/{d}/announce"),
            Topic::Status(d) => write!(f, "{ROOT}/devices/{d}/status"),
            Topic::Telemetry(d) => write!(f, "{ROOT}/devices/{d}/telemetry"),
            Topic::Command(d) => write!(f, "{ROOT}/devices/{d}/command"),
            Topic::Ack(d) => write!(f, "{ROOT}/devices/{d}/ack"),
            Topic::RelayState(d) => write!(f, "{ROOT}/devices/{d}/relays/state"),
            Topic::EmergencyStop => write!(f, "{ROOT}/emergency/stop"),
            Topic::EmergencyReset => write!(f, "{ROOT}/emergency/reset"),
            Topic::Config(path) => write!(f, "{ROOT}/config/{path}"),
            Topic::GatewayStatus(a) => write!(f, "{ROOT}/gateway/{a}/status"),
        }
    }
}

/// Subscription filters the agent uses to hear every master.
pub mod filter {
    pub const ALL_ANNOUNCE: &str = "autocore/devices/+/announce";
    pub const ALL_STATUS: &str = "autocore/devices/+/status";
    pub const ALL_TELEMETRY: &str = "autocore/devices/+/telemetry";
    pub const ALL_ACK: &str = "autocore/devices/+/ack";
    pub const ALL_RELAY_STATE: &str = "autocore/devices/+/relays/state";
    pub const EMERGENCY: &str = "autocore/emergency/+";
}
