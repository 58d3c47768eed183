//! The AutoCore Edge agent: SQLite mirror, sync with the backend, MQTT bridge and decision engine.
//!
//! `runtime` is the only module that does network I/O; `delivery` and `link` are state machines
//! that take inputs and the time and return what to do; `store` owns SQLite.

pub mod api;
pub mod automation;
pub mod bridge;
pub mod broker;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod connectivity;
pub mod console;
pub mod delivery;
pub mod doctor;
pub mod drop_episode;
pub mod durable_file;
pub mod link;
pub mod liveness;
pub mod macros;
pub mod metrics;
pub mod notify;
pub mod provision;
pub mod reports;
pub mod rules;
pub mod runtime;
pub mod safety;
pub mod service;
pub mod status;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;

pub use runtime::run;

/// The agent's version, as reported in its status and logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
