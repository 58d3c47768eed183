//! The seeded fault suite's short profile (decision 20): one fixed seed in CI, another with
//! `AUTOCORE_FAULTS_SEED`; `AUTOCORE_FAULTS=long` runs the long profile. The seed is printed so
//! that a failing run can be replayed with `fault-run --seed N`.

use std::time::Duration;

use autocore_stack::faults::checker::Verdict;
use autocore_stack::faults::runner::{RunOptions, run};
use autocore_stack::faults::schedule::{Profile, Schedule};

/// The seed CI runs.
const CI_SEED: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_seeded_schedule_of_faults_nothing_is_lost_duplicated_late_or_wrong() {
    let seed = std::env::var("AUTOCORE_FAULTS_SEED")
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .expect("AUTOCORE_FAULTS_SEED: a whole number")
        })
        .unwrap_or(CI_SEED);
    let profile = match std::env::var("AUTOCORE_FAULTS").as_deref() {
        Ok("long") => Profile::Long,
        _ => Profile::Short,
    };
    let schedule = Schedule::from_seed(seed, profile, 2);
    println!("fault suite: seed {seed}, profile {profile:?}");
    for s in &schedule.faults {
        println!("  at {:>6} ms  {}", s.at.as_millis(), s.fault);
    }
    let outcome = run(RunOptions {
        schedule: schedule.clone(),
        agent_bin: env!("CARGO_BIN_EXE_autocore-agent-under-test").into(),
        commands_per_s: 5,
        drain_timeout: Duration::from_secs(90),
    })
    .await
    .expect("the run completes");
    for line in &outcome.log {
        println!("  {line}");
    }
    let report = &outcome.report;
    println!("{report}");
    let context = || {
        let lines: Vec<&str> = outcome.agent_log.lines().collect();
        format!(
            "seed {seed}\n{report}\nthe agent's log ends:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    };

    // The run did what it says: faults fired, commands ran, readings arrived.
    assert!(!schedule.faults.is_empty());
    assert!(
        report.commands >= 100,
        "the load created commands: {}",
        context()
    );
    assert!(
        report.outcomes.get("completed").copied().unwrap_or(0) * 2 >= report.commands,
        "most commands completed: {}",
        context()
    );
    assert!(report.readings_accepted > 100, "{}", context());
    assert!(report.drain.is_some(), "the agent drained: {}", context());

    for verdict in [
        Verdict::Lost,
        Verdict::Duplicated,
        Verdict::Late,
        Verdict::Wrong,
    ] {
        assert_eq!(report.count(verdict), 0, "{verdict}: {}", context());
    }
    assert_eq!(report.readings_lost, 0, "{}", context());
    assert_eq!(report.readings_duplicated, 0, "{}", context());
}
