//! The requests, plans and refusals the arbiter deals in.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One relay: master device id, slave MAC (upper case), relay number 0..=15.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RelayRef {
    pub master: String,
    pub slave_mac: String,
    pub relay: u8,
}

impl RelayRef {
    pub fn new(master: &str, slave_mac: &str, relay: u8) -> RelayRef {
        RelayRef {
            master: master.to_string(),
            slave_mac: slave_mac.to_ascii_uppercase(),
            relay,
        }
    }
}

impl fmt::Display for RelayRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} relay {}", self.master, self.slave_mac, self.relay)
    }
}

/// Who asked for a switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Manual,
    Rule,
    Macro,
    Hold,
    Polling,
    Automation,
    /// The arbiter's own offs (deadline, max on-time, emergency stop).
    Safety,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Manual => "manual",
            Source::Rule => "rule",
            Source::Macro => "macro",
            Source::Hold => "hold",
            Source::Polling => "polling",
            Source::Automation => "automation",
            Source::Safety => "safety",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Switch {
    /// `duration_s` 0 = until switched off (still capped by the max on-time).
    On {
        duration_s: u32,
    },
    Off,
}

/// Switches for relays of one slave, from one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchRequest {
    pub source: Source,
    /// 0..=100; a relay switched on at priority P can only be changed at priority >= P.
    pub priority: i32,
    pub master: String,
    pub slave_mac: String,
    /// 1..=16 distinct relays.
    pub switches: Vec<(u8, Switch)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedSwitch {
    pub relay: u8,
    pub on: bool,
    /// Seconds the slave keeps it on (0 = until off); already capped by the max on-time.
    pub duration_s: u32,
    /// Short reason when the arbiter added or changed this switch ("mutex 'motor'", "max on-time 300 s").
    pub note: Option<String>,
}

/// An accepted request, ready to send as one command to one slave, in the order the slave must
/// apply the switches (offs first, so mutex peers are off before anything goes on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub master: String,
    pub slave_mac: String,
    pub source: Source,
    pub priority: i32,
    pub switches: Vec<PlannedSwitch>,
    pub notes: Vec<String>,
}

impl Plan {
    /// One line for logs and the audit trail, e.g.
    /// "interlocks ok; relay 1 off (mutex 'motor'); relay 0 on 60 s".
    pub fn summary(&self) -> String {
        let mut out = String::from("interlocks ok");
        for s in &self.switches {
            out.push_str("; ");
            out.push_str(&format!("relay {}", s.relay));
            if !s.on {
                out.push_str(" off");
            } else if s.duration_s == 0 {
                out.push_str(" on until off");
            } else {
                out.push_str(&format!(" on {} s", s.duration_s));
            }
            if let Some(n) = &s.note {
                out.push_str(&format!(" ({n})"));
            }
        }
        out
    }
}

/// Why a request was refused; the whole request is refused, nothing of it is sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "emergency stop is latched ({reason}): only switching off is allowed until it is reset"
    )]
    EmergencyStop { reason: String },
    #[error("relay {relay} must stay off for another {remaining_s} s (minimum off-time)")]
    MinOffTime { relay: u8, remaining_s: u32 },
    #[error(
        "relay {relay} is held by {holder} at priority {holder_priority}, higher than this request's"
    )]
    HeldByHigherPriority {
        relay: u8,
        holder_priority: i32,
        holder: Source,
    },
    #[error("relays of mutex group '{group}' cannot be switched on together")]
    MutexConflict { group: String },
    #[error(
        "relay {relay} has been on for its maximum on-time of {max_on_s} s; it must go off first"
    )]
    MaxOnTime { relay: u8, max_on_s: u32 },
    #[error("invalid request: {0}")]
    Invalid(String),
}
