//! `fault-run --seed N --profile short|long [--masters 1|2] [--commands-per-s 5]`: runs one
//! seeded fault schedule on the local stack (decision 20), prints the schedule, what the runner
//! did and the checker's report; exits 1 when the report is not clean.

use std::time::Duration;

use anyhow::{Context, bail};
use autocore_stack::faults::runner::{RunOptions, run};
use autocore_stack::faults::schedule::{Profile, Schedule};

struct Args {
    seed: u64,
    profile: Profile,
    masters: usize,
    commands_per_s: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut parsed = Args {
        seed: 1,
        profile: Profile::Short,
        masters: 2,
        commands_per_s: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => parsed.seed = value()?.parse().context("--seed: a whole number")?,
            "--profile" => {
                parsed.profile = value()?.parse().map_err(anyhow::Error::msg)?;
            }
            "--masters" => {
                parsed.masters = value()?.parse().context("--masters: 1 or 2")?;
                if !(1..=2).contains(&parsed.masters) {
                    bail!("--masters: 1 or 2");
                }
            }
            "--commands-per-s" => {
                parsed.commands_per_s = value()?
                    .parse()
                    .context("--commands-per-s: a whole number")?;
                if !(1..=100).contains(&parsed.commands_per_s) {
                    bail!("--commands-per-s: 1..=100");
                }
            }
            "--help" | "-h" => {
                println!(
                    "fault-run --seed N --profile short|long [--masters 1|2] [--commands-per-s 5]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(parsed)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=off,firmware_protocol=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = args()?;
    let schedule = Schedule::from_seed(args.seed, args.profile, args.masters);
    println!(
        "seed {} profile {:?}: {} faults over {} s",
        schedule.seed,
        schedule.profile,
        schedule.faults.len(),
        schedule.profile.faulty_for().as_secs()
    );
    for s in &schedule.faults {
        println!("  at {:>6} ms  {}", s.at.as_millis(), s.fault);
    }
    let agent_bin = autocore_stack::bench::binary_beside_this_one(
        "autocore-agent-under-test",
        "build it with cargo build -p autocore-stack --bins",
    )?;
    // The stack's services die with the thread that started them: the runtime's own thread
    // runs the whole schedule.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("the tokio runtime")?;
    let outcome = runtime
        .block_on(run(RunOptions {
            schedule,
            agent_bin,
            commands_per_s: args.commands_per_s,
            drain_timeout: Duration::from_secs(120),
        }))
        .context("the fault run")?;
    println!("runner:");
    for line in &outcome.log {
        println!("  {line}");
    }
    println!(
        "dashboard inserts refused while Postgres was away: {}",
        outcome.inserts_refused
    );
    println!("checker:\n{}", outcome.report);
    if !outcome.report.is_clean() || outcome.report.drain.is_none() {
        eprintln!("the agent's log ends:");
        let lines: Vec<&str> = outcome.agent_log.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("  {line}");
        }
        std::process::exit(1);
    }
    Ok(())
}
