//! The rule language and the decision engine.
//!
//! `model` defines rule_json (and its JSON Schema), `compile` checks a rule against the
//! catalog, `engine` evaluates rules sans-I/O, `driver` runs it on tokio's clock, `replay`
//! runs it over stored readings, `contradiction` flags rules fighting over a relay.
//! See docs/decisions/0004-rule-engine.md.

pub mod clock;
pub mod compile;
pub mod contradiction;
pub mod cron;
pub mod driver;
pub mod engine;
pub mod error;
pub mod eval;
pub mod model;
pub mod replay;
pub mod state;
pub mod window;

#[cfg(test)]
mod tests;

pub use clock::Clock;
pub use compile::{Catalog, CompiledRule, compile};
pub use contradiction::{Contradiction, contradictions};
pub use driver::{EngineInput, EngineOutput, run_engine};
pub use engine::{Engine, EngineSettings, Firing, FiringReading, RuleProblem};
pub use error::RuleError;
pub use model::{Action, Condition, Operator, RuleJson, Weekday, schema_json};
pub use replay::replay;
pub use state::RuleState;
