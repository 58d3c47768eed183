//! `autocore-stack`: starts the local stack for a person, prints its `KEY=value` lines, and runs
//! until Ctrl-C, then tears everything down.

use anyhow::Context;
use autocore_stack::{Stack, StackOptions};

fn main() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::default()).context("starting the local stack")?;
    for line in stack.env_lines() {
        println!("{line}");
    }
    eprintln!("autocore-stack: running; Ctrl-C stops it and removes its data");
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc_channel(tx)?;
    let _ = rx.recv();
    drop(stack);
    eprintln!("autocore-stack: stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM on a tokio runtime and reports it on `tx`.
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal runtime")?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        let _ = tx.send(());
    });
    Ok(())
}
