//! The seeded fault suite (decision 20): a schedule of faults from a seed ([`schedule`]), a run
//! of it on the real local stack under load ([`runner`]), the history of every command and
//! reading ([`history`]) and the checker that judges it ([`checker`]). [`power_cut`] is the
//! SQLite VFS that makes a `kill -9` lose what a power cut would.

pub mod checker;
pub mod history;
pub mod power_cut;
pub mod runner;
pub mod schedule;
