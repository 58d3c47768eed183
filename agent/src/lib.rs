//! The AutoCore Edge agent: SQLite mirror, sync with the backend, MQTT bridge and decision engine.

pub mod bridge;
pub mod cloud;
pub mod config;
pub mod delivery;
pub mod metrics;
pub mod store;

/// The agent's version, as reported in its status and logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
