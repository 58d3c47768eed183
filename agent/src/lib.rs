//! The AutoCore Edge agent: SQLite mirror, sync with the backend, MQTT bridge and decision engine.
//!
//! The modules arrive with the issues that build them; this crate exists now so that the
//! workspace layout matches ARCHITECTURE.md from the first commit.

/// The agent's version, as reported in its status and logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
