//! The engine as a tokio task: inputs from a channel, sleeps to the engine's next deadline,
//! outputs to a channel. All logic stays in `Engine`; this only owns time and channels.

use std::collections::HashMap;

use tokio::sync::mpsc;

use super::clock::Clock;
use super::compile::Catalog;
use super::contradiction::Contradiction;
use super::engine::{Engine, Firing, RuleProblem};
use super::state::RuleState;
use crate::store::{Reading, RuleRecord};

#[derive(Debug)]
pub enum EngineInput {
    Reading(Reading),
    /// A new rule set (states are those the engine holds; restore them via `Engine::load`
    /// before starting the task).
    Rules {
        rules: Vec<RuleRecord>,
        catalog: Catalog,
    },
    /// Emergency stop on or off.
    Blocked(bool),
}

#[derive(Debug)]
pub enum EngineOutput {
    Fired(Firing),
    /// States changed by the input or tick just handled; sent after its firings.
    State(Vec<(String, RuleState)>),
    Problems(Vec<RuleProblem>),
    Contradictions(Vec<Contradiction>),
}

/// Runs until `input` closes (or `output` does). Time comes from `clock`, i.e. tokio's clock:
/// the wall clock in production, the paused clock (`advance`, auto-advance) in tests.
pub async fn run_engine(
    mut engine: Engine,
    clock: Clock,
    mut input: mpsc::Receiver<EngineInput>,
    output: mpsc::Sender<EngineOutput>,
) {
    loop {
        let deadline = engine.next_deadline_ms();
        let mut out = Vec::new();
        tokio::select! {
            biased;
            msg = input.recv() => {
                let Some(msg) = msg else { break };
                let now = clock.now_ms();
                match msg {
                    EngineInput::Reading(reading) => out.extend(engine.on_reading(&reading, now).into_iter().map(EngineOutput::Fired)),
                    EngineInput::Rules { rules, catalog } => {
                        let problems = engine.load(&rules, &catalog, &HashMap::new());
                        out.push(EngineOutput::Problems(problems));
                        out.push(EngineOutput::Contradictions(engine.contradictions().to_vec()));
                        // New windows and schedules take their baseline now.
                        out.extend(engine.on_tick(now).into_iter().map(EngineOutput::Fired));
                    }
                    EngineInput::Blocked(blocked) => engine.set_blocked(blocked, now),
                }
            }
            () = tokio::time::sleep_until(clock.instant_at(deadline.unwrap_or(i64::MAX))), if deadline.is_some() => {
                out.extend(engine.on_tick(clock.now_ms()).into_iter().map(EngineOutput::Fired));
            }
        }
        let dirty = engine.take_dirty();
        if !dirty.is_empty() {
            out.push(EngineOutput::State(dirty));
        }
        for item in out {
            if output.send(item).await.is_err() {
                return;
            }
        }
    }
}
