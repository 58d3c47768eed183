//! The `autocore-agent` command line: `run`, `status`, `check-config`, `broker-config`, `doctor`,
//! `provision`, `masters add`, `rules test|schema`. Kept in the library so
//! that the binary and the end-to-end tests run exactly the same code.

use std::path::PathBuf;

use crate::config::AgentConfig;
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "autocore-agent",
    version,
    about = "AutoCore Edge agent: relays, sensors and rules on the Pi, synced with the backend, in control offline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// The TOML configuration (see agent/agent.example.toml); AUTOCORE_<SECTION>_<KEY>
        /// environment variables override its keys.
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
    },
    /// Print the agent's state: from the running agent's /health, or from its database.
    Status {
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
    },
    /// Check the configuration and exit: 0 if valid (warnings, if any, printed on stderr), else
    /// 2 with the wrong key and why.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
    },
    /// Write Mosquitto's password file, ACL and config snippet for this agent and its masters.
    BrokerConfig {
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
        /// Where `passwd`, `acl` and `autocore.conf` go, e.g. /etc/mosquitto/conf.d.
        #[arg(long)]
        out: PathBuf,
        /// The listener masters connect to, `PORT` (every interface) or `ADDRESS:PORT`; its
        /// settings (the username as client id) belong to it.
        #[arg(long, default_value = "1883")]
        listener: crate::broker::Listener,
        /// A read-only login for a tool (repeatable); its password is kept in
        /// OUT/monitor-NAME.secret.
        #[arg(long = "monitor", value_name = "NAME")]
        monitors: Vec<String>,
    },
    /// Check what the agent needs (config, clock, broker, backend, disk, permissions,
    /// masters), one line each with what to do; exit 1 if a check failed (warnings exit 0).
    Doctor {
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
        /// One JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Make this Pi an edge agent with a claim code from the dashboard: writes the agent's
    /// session (0600) in the state directory and its configuration (0600), with a new key for
    /// each master; with --broker-dir, Mosquitto's files too.
    Provision {
        /// The claim code (XXXXX-XXXXX, case and dashes do not matter).
        #[arg(long)]
        code: String,
        /// The project's base URL (https://<project>.supabase.co); the claim goes to
        /// URL/functions/v1/claim-agent.
        #[arg(long)]
        url: String,
        /// This Pi's agent id (edge_agents.agent_id).
        #[arg(long)]
        agent_id: String,
        /// A name for the dashboard.
        #[arg(long)]
        name: Option<String>,
        /// A master this agent serves (repeatable); its key is made here and never sent.
        #[arg(long = "master", value_name = "DEVICE_ID")]
        masters: Vec<String>,
        /// Supabase's public (anon or publishable) key, never the service-role key.
        #[arg(long, env = "AUTOCORE_CLOUD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// The configuration to write; keys it has that provisioning does not set are kept.
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
        /// Where the session (session.json) goes, and the database if the configuration names none.
        #[arg(long, default_value = "/var/lib/autocore")]
        state_dir: PathBuf,
        /// The broker the agent and its masters use ([mqtt] url).
        #[arg(long)]
        mqtt_url: Option<String>,
        /// Write Mosquitto's passwd, acl and autocore.conf there (as broker-config does).
        #[arg(long)]
        broker_dir: Option<PathBuf>,
        #[arg(long, default_value = "1883")]
        listener: crate::broker::Listener,
    },
    /// Masters of this agent.
    Masters {
        #[command(subcommand)]
        command: MastersCommand,
    },
    /// Rules: replay one over stored telemetry, or print the rule_json schema.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum MastersCommand {
    /// Serve one more master: the backend assigns it to this agent, a new key goes into the
    /// configuration, and with --broker-dir Mosquitto's files get its login.
    Add {
        device_id: String,
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
        #[arg(long)]
        broker_dir: Option<PathBuf>,
        #[arg(long, default_value = "1883")]
        listener: crate::broker::Listener,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Replay a rule over the readings stored on this Pi and list when it would have fired.
    Test {
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
        /// The rule: its rule_id or uuid in the mirror.
        #[arg(required_unless_present = "file")]
        rule: Option<String>,
        /// Test a rule_json file instead (not yet in the cloud); needs --device.
        #[arg(long, requires = "device")]
        file: Option<PathBuf>,
        /// The master whose readings the rule from --file reads.
        #[arg(long)]
        device: Option<String>,
        /// How far back to replay.
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// Cooldown and hourly limit for a rule from --file.
        #[arg(long, default_value_t = 60)]
        cooldown_seconds: i32,
        #[arg(long, default_value_t = 10)]
        max_executions_per_hour: i32,
    },
    /// Print the JSON Schema of rule_json (the same as schemas/rule_json.schema.json).
    Schema,
}

/// What `rules test` replays.
#[derive(Debug, Clone)]
pub enum RuleUnderTest {
    /// A rule in the mirror, by rule_id or uuid.
    Named(String),
    /// A rule_json of one's own, against a device's readings.
    Json {
        rule_json: serde_json::Value,
        device_id: String,
        cooldown_seconds: i32,
        max_executions_per_hour: i32,
    },
}

/// Replays a rule over the readings stored in the agent's database from `since_ms` to `until_ms`
/// and describes each firing, one per line (the report ends with a count).
pub fn rules_test(
    config: &AgentConfig,
    rule: &RuleUnderTest,
    since_ms: i64,
    until_ms: i64,
) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let store = crate::store::Store::open_existing(&config.store.path)
        .with_context(|| format!("opening {}", config.store.path.display()))?;
    let records = match rule {
        RuleUnderTest::Named(name) => {
            let found = store.rules_named(name)?;
            anyhow::ensure!(
                !found.is_empty(),
                "no rule {name:?} in the mirror at {}",
                config.store.path.display()
            );
            found
        }
        RuleUnderTest::Json {
            rule_json,
            device_id,
            cooldown_seconds,
            max_executions_per_hour,
        } => vec![crate::store::RuleRecord {
            id: "00000000-0000-0000-0000-000000000000".into(),
            device_id: device_id.clone(),
            rule_id: "RULE_UNDER_TEST".into(),
            rule_name: Some("rule under test".into()),
            rule_description: None,
            rule_json: Some(rule_json.clone()),
            enabled: true,
            priority: 50,
            cooldown_seconds: *cooldown_seconds,
            max_executions_per_hour: *max_executions_per_hour,
            revision: 1,
            deleted: false,
            changed_at: String::new(),
        }],
    };
    let catalog = crate::rules::Catalog {
        relay_counts: store.relay_counts()?,
        macros: store
            .macros()?
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect(),
    };
    let settings = crate::rules::EngineSettings {
        stale_after_ms: config.engine.stale_after_ms as i64,
        time_zone: config.engine_time_zone()?,
    };
    let mut out = String::new();
    for record in records {
        let history = store.readings_for_replay(&record.device_id, since_ms, until_ms)?;
        let readings = history.readings;
        let count = readings.len();
        let firings = crate::rules::replay(&record, &catalog, &settings, readings)
            .map_err(|e| anyhow::anyhow!("rule {} cannot run: {e}", record.rule_id))?;
        writeln!(
            out,
            "rule {} on {}: {} readings replayed, {} firings",
            record.rule_id,
            record.device_id,
            count,
            firings.len()
        )?;
        if history.from_rollups > 0
            && let Some(raw_from) = history.raw_from_ms
        {
            writeln!(
                out,
                "note: {} of them stand for a minute each (the minute's last reading per sensor): \
                 raw readings before {} are pruned (see [history])",
                history.from_rollups,
                crate::cloud::format_timestamp_ms(raw_from)
            )?;
        }
        for f in &firings {
            writeln!(
                out,
                "  {}  {}",
                crate::cloud::format_timestamp_ms(f.fired_at_ms),
                f.explanation
            )?;
        }
    }
    Ok(out)
}

/// The exit code of what a restart cannot fix (as for a bad command line): a configuration
/// that cannot be used, or a database a newer agent wrote. The unit's
/// `RestartPreventExitStatus=2` keeps systemd from restarting the agent into it every 2 s.
pub const EXIT_SETUP: u8 = 2;

/// How the binary ends: an error is printed as one line of causes (`{:#}`), never with anyhow's
/// Debug form, which adds a backtrace when `RUST_BACKTRACE` is set; a configuration error or a
/// newer database exits with [`EXIT_SETUP`], any other with 1.
pub fn exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let setup = e.chain().any(|cause| {
                cause.downcast_ref::<crate::config::ConfigError>().is_some()
                    || matches!(
                        cause.downcast_ref::<crate::store::StoreError>(),
                        Some(crate::store::StoreError::NewerSchema { .. })
                    )
            });
            std::process::ExitCode::from(if setup { EXIT_SETUP } else { 1 })
        }
    }
}

/// Logs as `[log]` says, to stdout; colours only when stdout is a terminal (a journal or a file
/// gets no escape codes). `RUST_LOG`, when set, overrides `[log] level`.
fn init_logging(log: &crate::config::LogSection) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    // A second initialisation (tests calling this twice) keeps the first.
    let _ = match log.format {
        crate::config::LogFormat::Plain => builder.try_init(),
        crate::config::LogFormat::Json => builder.json().try_init(),
    };
}

/// Parses the process's arguments and runs the chosen subcommand.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let (config, warnings) = AgentConfig::load_with_warnings(&config)
                .with_context(|| format!("configuration {}", config.display()))?;
            init_logging(&config.log);
            for w in &warnings {
                tracing::warn!(key = %w.key, "configuration: {}", w.message);
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.agent.worker_threads)
                .thread_name("autocore-rt")
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(async move {
                let api = tokio::net::TcpListener::bind(&config.api.listen)
                    .await
                    .with_context(|| {
                        format!(
                            "binding the local API on {} (api.listen)",
                            config.api.listen
                        )
                    })?;
                crate::run(config, api, shutdown_signal())
                    .await
                    .context("the agent stopped with an error")
            })
        }
        Command::Status { config } => {
            let config = load(&config)?;
            init_logging(&config.log);
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let text = runtime.block_on(crate::status::report(&config));
            println!("{text}");
            Ok(())
        }
        Command::CheckConfig { config: path } => {
            let (_, warnings) = AgentConfig::load_with_warnings(&path)
                .with_context(|| format!("configuration {}", path.display()))?;
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            match warnings.len() {
                0 => println!("{}: valid", path.display()),
                n => println!("{}: valid, with {n} warning(s)", path.display()),
            }
            Ok(())
        }
        Command::BrokerConfig {
            config,
            out,
            listener,
            monitors,
        } => {
            let config = load(&config)?;
            let mut users = crate::broker::users_from_config(&config)?;
            users.extend(crate::broker::monitor_users(&out, &monitors)?);
            let files = crate::broker::write_files(&out, &users, &listener)?;
            println!("{}", crate::broker::install_hint(&files, users.len()));
            Ok(())
        }
        Command::Doctor { config, json } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let report = runtime.block_on(crate::doctor::run(&config));
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            Ok(report.result()?)
        }
        Command::Provision {
            code,
            url,
            agent_id,
            name,
            masters,
            api_key,
            config,
            state_dir,
            mqtt_url,
            broker_dir,
            listener,
        } => {
            let request = crate::provision::ProvisionRequest {
                url,
                code,
                agent_id,
                name,
                masters,
                api_key,
                config_path: config,
                state_dir,
                mqtt_url,
                timeout: std::time::Duration::from_secs(30),
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let done = runtime
                .block_on(crate::provision::provision(&request))
                .context("provisioning")?;
            println!(
                "provisioned agent {} for owner {}: session in {} (0600), configuration in {} (0600) with {} master(s): {}",
                done.agent_id,
                done.owner_id,
                done.session_path.display(),
                done.config_path.display(),
                done.masters.len(),
                done.masters.join(", ")
            );
            println!(
                "each master's key is its [[masters]] key there: flash it onto the master; it never left this Pi"
            );
            write_broker_files(&done.config_path, broker_dir.as_deref(), &listener)?;
            Ok(())
        }
        Command::Masters {
            command:
                MastersCommand::Add {
                    device_id,
                    config: path,
                    broker_dir,
                    listener,
                },
        } => {
            let config = load(&path)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let (_, created) =
                runtime.block_on(crate::provision::add_master(&path, &config, &device_id))?;
            println!(
                "master {device_id} {} for agent {}; its key is in {} ([[masters]]): flash it onto the master, then restart the agent",
                if created { "registered" } else { "assigned" },
                config.agent.id,
                path.display()
            );
            write_broker_files(&path, broker_dir.as_deref(), &listener)?;
            Ok(())
        }
        Command::Rules {
            command: RulesCommand::Schema,
        } => {
            println!("{}", crate::rules::schema_json());
            Ok(())
        }
        Command::Rules {
            command:
                RulesCommand::Test {
                    config,
                    rule,
                    file,
                    device,
                    hours,
                    cooldown_seconds,
                    max_executions_per_hour,
                },
        } => {
            let config = load(&config)?;
            init_logging(&config.log);
            let rule = match (rule, file, device) {
                (_, Some(file), Some(device_id)) => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    RuleUnderTest::Json {
                        rule_json: serde_json::from_str(&text)
                            .with_context(|| format!("{} is not JSON", file.display()))?,
                        device_id,
                        cooldown_seconds,
                        max_executions_per_hour,
                    }
                }
                (Some(name), _, _) => RuleUnderTest::Named(name),
                _ => anyhow::bail!("name a rule, or give --file and --device"),
            };
            let now = crate::shared::now_ms();
            let since = now - (hours as i64) * 3_600_000;
            print!("{}", rules_test(&config, &rule, since, now)?);
            Ok(())
        }
    }
}

/// Mosquitto's files from the configuration at `config`, when a folder is given.
fn write_broker_files(
    config: &std::path::Path,
    dir: Option<&std::path::Path>,
    listener: &crate::broker::Listener,
) -> anyhow::Result<()> {
    let Some(dir) = dir else {
        println!(
            "broker logins: run autocore-agent broker-config -c {} --out /etc/mosquitto/conf.d, then reload mosquitto",
            config.display()
        );
        return Ok(());
    };
    let config = load(config)?;
    let users = crate::broker::users_from_config(&config)?;
    let files = crate::broker::write_files(dir, &users, listener)?;
    println!("{}", crate::broker::install_hint(&files, users.len()));
    Ok(())
}

fn load(path: &std::path::Path) -> anyhow::Result<AgentConfig> {
    AgentConfig::load(path).with_context(|| format!("configuration {}", path.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
