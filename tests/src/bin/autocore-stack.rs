//! `autocore-stack`: starts the local stack for a person, prints its `KEY=value` lines (with an
//! agent's and a monitor's broker login), and runs until Ctrl-C, then tears everything down.
//! `--master DEVICE_ID=KEY_HEX` (repeatable) gives a master, e.g. an `esp32-sim`, its login.
//! `AUTOCORE_CLAIM_URL` is the local claim service and refresh grant (`autocore_stack::auth`), for
//! `autocore-agent provision --url`.

use anyhow::Context;
use autocore_stack::{EdgeFunctions, Role, Stack, StackOptions};

fn main() -> anyhow::Result<()> {
    let mut masters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        anyhow::ensure!(
            arg == "--master",
            "unknown argument {arg:?}; usage: autocore-stack [--master DEVICE_ID=KEY_HEX]..."
        );
        let value = args.next().context("--master needs DEVICE_ID=KEY_HEX")?;
        let (id, key) = value
            .split_once('=')
            .context("--master needs DEVICE_ID=KEY_HEX")?;
        masters.push((
            firmware_protocol::DeviceId::new(id)?,
            firmware_protocol::MasterKey::from_hex(key)
                .map_err(|e| anyhow::anyhow!("--master {id}: {e}"))?,
        ));
    }
    let stack = Stack::start(StackOptions::default()).context("starting the local stack")?;
    // The edge functions in front of this stack's PostgREST, at /functions/v1/NAME.
    let functions =
        EdgeFunctions::start(&stack.rest_url()?).context("starting the edge functions")?;
    for line in stack.env_lines() {
        println!("{line}");
    }
    println!("AUTOCORE_FUNCTIONS_URL={}", functions.url());
    let agent = stack.broker_login(Role::Agent, "autocore-agent")?;
    let monitor = stack.broker_login(Role::Monitor, "autocore-monitor")?;
    for (id, key) in &masters {
        stack.broker_master(id, key)?;
    }
    println!("AUTOCORE_MQTT_USERNAME={}", agent.username);
    println!("AUTOCORE_MQTT_PASSWORD={}", agent.password);
    println!("AUTOCORE_MQTT_MONITOR_USERNAME={}", monitor.username);
    println!("AUTOCORE_MQTT_MONITOR_PASSWORD={}", monitor.password);
    // Kept until the end: the stand-in's server runs on it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("building the claim service's runtime")?;
    let claim = runtime
        .block_on(autocore_stack::auth::AuthStandIn::start(
            &stack.pg_url()?,
            stack.jwt_secret(),
            &stack.rest_url()?,
            std::time::Duration::from_secs(3600),
        ))
        .context("starting the local claim service")?;
    println!("AUTOCORE_CLAIM_URL={}", claim.url());
    eprintln!("autocore-stack: running; Ctrl-C stops it and removes its data");
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc_channel(tx)?;
    let _ = rx.recv();
    drop(functions);
    drop(claim);
    drop(runtime);
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
