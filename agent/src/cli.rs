//! The `autocore-agent` command line: `run`, `status`, `check-config`. Kept in the library so
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
    /// Check the configuration and exit: 0 if valid, else the wrong key and why.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/autocore/agent.toml")]
        config: PathBuf,
    },
}

/// Parses the process's arguments and runs the chosen subcommand.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    match cli.command {
        Command::Run { config } => {
            let config = load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
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
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let text = runtime.block_on(crate::status::report(&config));
            println!("{text}");
            Ok(())
        }
        Command::CheckConfig { config } => {
            load(&config)?;
            println!("{}: valid", config.display());
            Ok(())
        }
    }
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
