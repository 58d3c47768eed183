//! `esp32-sim`: parses flags, sets up logging and runs [`firmware_protocol::sim::run`] until
//! Ctrl-C or SIGTERM, then publishes each master's offline status and exits.

use anyhow::Context;
use clap::Parser;
use firmware_protocol::sim::{self, cli::Args};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Args::parse()
        .into_config()
        .context("invalid command line")?;
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    };
    sim::run(config, shutdown)
        .await
        .context("simulator stopped")
}
