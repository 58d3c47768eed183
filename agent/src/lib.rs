//! The AutoCore Edge agent: SQLite mirror, sync with the backend, MQTT bridge and decision engine.
//!
//! The state machines (`delivery`, `link`, `liveness`, `reports`, `rules`, `safety`) take inputs
//! and the time and return what to do; `store` owns SQLite. The tasks that do the I/O are thin:
//! `ingest` (what masters publish), `dispatch` (commands to masters), `sync` (pull from and push
//! to the backend), `automation::task`, `notify::task` and `api`; `runtime` starts and stops them.
//! Dependencies run one way: `runtime` → the tasks → `shared` → the state machines and `store`.

pub mod api;
pub mod automation;
pub mod bridge;
pub mod broker;
pub mod cli;
pub mod cloud;
pub mod command;
pub mod config;
pub mod connectivity;
pub mod console;
pub mod delivery;
mod dispatch;
pub mod doctor;
pub mod drop_episode;
pub mod durable_file;
mod ingest;
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
pub mod shared;
pub mod status;
pub mod store;
pub mod sync;
#[cfg(test)]
pub(crate) mod testing;

pub use runtime::run;

/// The agent's version, as reported in its status and logs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
