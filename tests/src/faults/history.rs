//! What happened in one run, as the checker reads it: every command the dashboard created with
//! what the cloud says about it, the acks masters published and the relays its slaves switched;
//! every reading the agent accepted and every reading in the cloud.

use std::time::Duration;

/// The cloud's states in which a command has ended.
pub const FINAL_STATES: [&str; 4] = ["completed", "failed", "expired", "cancelled"];

/// One relay switched by a command, from a slave's actuation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actuation {
    pub relay: u8,
    /// `on` or `off`.
    pub action: String,
    /// Unix ms at the slave.
    pub at_ms: i64,
}

/// One ack a master published, as a monitor on the broker heard it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckSeen {
    /// `completed`, `duplicate`, `failed`, `rejected`, `expired`, ...
    pub result: String,
    /// Unix ms when the monitor heard it.
    pub at_ms: i64,
}

/// One command from creation to its final state in the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHistory {
    /// `relay_commands_slave.id`.
    pub id: i64,
    pub master: String,
    /// The relays it switches.
    pub relays: Vec<u8>,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub locked_ms: Option<i64>,
    /// How often the cloud handed it out.
    pub delivery_count: i32,
    pub sent_ms: Option<i64>,
    pub completed_ms: Option<i64>,
    /// The cloud's state at the end of the run.
    pub status: String,
    pub error: Option<String>,
    /// `manual` for the dashboard's; `automation` for those the Pi made itself.
    pub command_type: String,
    pub acks: Vec<AckSeen>,
    pub actuations: Vec<Actuation>,
}

/// A reading by its identity (device, sensor, time), as the cloud's unique key has it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadingKey {
    pub device_id: String,
    pub sensor_key: String,
    pub recorded_at_ms: i64,
}

/// The readings of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readings {
    /// Every reading the agent accepted: on its disk (`readings_history`, written in the
    /// transaction that queued it for the cloud).
    pub accepted: Vec<ReadingKey>,
    /// Every reading row in the cloud (`telemetry_data`), repeats included.
    pub in_cloud: Vec<ReadingKey>,
    /// Readings the agent counted as dropped at its outbox bound (`telemetry_dropped`).
    pub dropped_at_bound: u64,
}

/// One run's history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub commands: Vec<CommandHistory>,
    pub readings: Readings,
    /// From the last fault's heal to the moment every command had ended in the cloud and the
    /// agent's outbox was empty; `None` if that did not happen before the run gave up.
    pub drain: Option<Duration>,
}
