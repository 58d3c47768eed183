//! Starts and stops the agent: opens the store, builds `Shared`, restores the engine and the
//! interlocks from disk, owns the MQTT event loop, and spawns the tasks (`ingest`, `dispatch`,
//! `sync`, automation, notifier, housekeeper, watchdog, local API). No decision is made here.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use firmware_protocol::MasterKey;
use firmware_protocol::message::PAYLOAD_BYTES_MAX;
use rumqttc::{Event, EventLoop, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::automation::Automation;
use crate::bridge::{self};
use crate::cloud::{Cloud, CloudConfig, TokenSource};
use crate::config::AgentConfig;
use crate::connectivity::MqttState;
use crate::dispatch::delivery_loop;
use crate::ingest::inbound_loop;
use crate::metrics::Metrics;
use crate::shared::{DeliveryInput, Shared, SharedParts, note_mqtt_state, now_ms};
use crate::store::{Store, StoreError, StoreHandle};
use crate::sync::{pull::poll_loop, sync_supervisor};

/// Messages waiting between the MQTT connection and the handler.
pub const INBOUND_QUEUE_MESSAGES_MAX: usize = 10_000;
/// Commands and acks waiting for the delivery task.
pub const DELIVERY_QUEUE_MAX: usize = 1_000;
/// Requests waiting for the automation task.
pub const AUTOMATION_QUEUE_MAX: usize = 1_000;
/// Readings waiting for the rule engine; beyond it readings skip the engine (counted).
pub const ENGINE_QUEUE_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    // No `{0}` beside `#[from]`: the cause is the error's source, printed once by `{:#}`.
    #[error("store")]
    Store(#[from] StoreError),
    #[error("database {}", path.display())]
    Database {
        path: std::path::PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("mqtt")]
    Bridge(#[from] bridge::BridgeError),
    #[error("safety/engine configuration: {0}")]
    Interlocks(String),
    #[error("masters[{device_id}].key: {reason}")]
    MasterKey { device_id: String, reason: String },
    #[error("local API: {0}")]
    Api(std::io::Error),
}

/// How long the tasks have to end after the stop before they are aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` completes: serves the local API on `api`, connects to the
/// broker and the backend (neither needs to be up at start), and stops every task cleanly.
pub async fn run(
    config: AgentConfig,
    api: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RuntimeError> {
    crate::bridge::install_tls_provider();
    // Migrating an old database (schema 6 rolls up the whole history) and bringing its history
    // within bounds can outlast systemd's start timeout on a slow card: extend it meanwhile.
    const EXTEND_EVERY: Duration = Duration::from_secs(20);
    crate::service::extend_start(EXTEND_EVERY * 3);
    let keepalive = tokio::spawn(async {
        loop {
            tokio::time::sleep(EXTEND_EVERY).await;
            crate::service::extend_start(EXTEND_EVERY * 3);
        }
    });
    let path = config.store.path.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&path)?;
        // No commit (a firing's among them) pays for folding the WAL back: a thread of its
        // own does it beside the writer.
        let checkpointer =
            crate::store::Checkpointer::start(&path, crate::store::CHECKPOINT_EVERY)?;
        store.leave_checkpoints_to_a_checkpointer()?;
        Ok::<_, StoreError>((store, checkpointer))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()));
    let prepared = match opened {
        Ok(Ok((store, checkpointer))) => {
            let store = StoreHandle::new(store);
            prepare_history(&store, config.history_bounds())
                .await
                .map(|()| (store, checkpointer))
        }
        Ok(Err(source)) => Err(RuntimeError::Database {
            path: config.store.path.clone(),
            source,
        }),
        Err(e) => Err(e.into()),
    };
    keepalive.abort();
    let (store, _checkpointer) = prepared?;
    let token = match (&config.cloud.jwt, &config.cloud.jwt_file) {
        (Some(jwt), _) => TokenSource::Inline(jwt.clone()),
        (None, Some(path)) => TokenSource::file(path.clone()),
        (None, None) => TokenSource::Inline(crate::config::Secret::new("")),
    };
    let cloud = Cloud::new(
        &CloudConfig {
            rest_url: config.cloud.rest_url.clone(),
            api_key: config
                .cloud
                .api_key
                .as_ref()
                .map(|k| k.expose().to_string()),
            request_timeout: Duration::from_millis(config.cloud.request_timeout_ms),
        },
        token,
    )
    .with_poll_timeout(Duration::from_millis(config.cloud.poll_timeout_ms()));
    let mut keys = HashMap::new();
    for master in &config.masters {
        let key =
            MasterKey::from_hex(master.key.expose()).map_err(|e| RuntimeError::MasterKey {
                device_id: master.device_id.clone(),
                reason: e.to_string(),
            })?;
        keys.insert(master.device_id.clone(), key);
    }
    let (mqtt, eventloop) =
        bridge::mqtt_client(bridge::mqtt_options(&config.mqtt, &config.agent.id)?);
    let (automation_tx, automation_rx) = mpsc::channel(AUTOMATION_QUEUE_MAX);
    let (engine_tx, engine_rx) = mpsc::channel(ENGINE_QUEUE_MAX);
    let shared = Arc::new(Shared::new(SharedParts {
        config,
        store,
        cloud,
        keys,
        mqtt,
        automation: automation_tx,
        engine: engine_tx,
    }));
    let (automation, engine) = start_automation(&shared).await?;

    let cancel = CancellationToken::new();
    if let (Some(auth_url), Some(session)) =
        (&shared.config.cloud.auth_url, &shared.config.cloud.jwt_file)
    {
        tokio::spawn(crate::cloud::session::run_refresher(
            session.clone(),
            auth_url.clone(),
            shared
                .config
                .cloud
                .api_key
                .as_ref()
                .map(|k| k.expose().to_string()),
            Duration::from_millis(shared.config.cloud.request_timeout_ms),
            cancel.clone(),
        ));
    }
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE_MESSAGES_MAX);
    let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_QUEUE_MAX);

    // Commands open when the agent stopped are delivered again: masters apply an id once.
    let open = shared.store.call(|s| s.open_commands()).await?;
    if !open.is_empty() {
        info!(
            commands = open.len(),
            "resuming commands that were open at the last stop"
        );
    }

    let mut tasks = JoinSet::new();
    tasks.spawn(mqtt_loop(
        shared.clone(),
        eventloop,
        inbound_tx,
        cancel.clone(),
    ));
    tasks.spawn(inbound_loop(
        shared.clone(),
        inbound_rx,
        delivery_tx.clone(),
        cancel.clone(),
    ));
    tasks.spawn(delivery_loop(shared.clone(), delivery_rx, cancel.clone()));
    for command in open {
        let polls = shared
            .config
            .master(&command.master_device_id)
            .map(|m| m.transport)
            == Some(crate::config::Transport::Poll);
        if !polls {
            let _ = delivery_tx
                .send(DeliveryInput::Admit(Box::new(command)))
                .await;
        }
    }
    tasks.spawn(crate::automation::task::run(
        shared.clone(),
        automation,
        engine,
        crate::rules::Clock::new(),
        automation_rx,
        engine_rx,
        delivery_tx.clone(),
        cancel.clone(),
    ));
    tasks.spawn(poll_loop(shared.clone(), delivery_tx, cancel.clone()));
    tasks.spawn(sync_supervisor(shared.clone(), cancel.clone()));
    // Independent of the backend: notifications go straight from the Pi to their targets.
    tasks.spawn(crate::notify::task::run(
        shared.config.agent.id.clone(),
        shared.config.notify.clone(),
        shared.store.clone(),
        shared.metrics.clone(),
        cancel.clone(),
    ));
    let app = crate::api::app(shared.clone());
    let api_cancel = cancel.clone();
    tasks.spawn(crate::api::serve(
        api,
        app,
        crate::api::ServeLimits::default(),
        api_cancel,
    ));
    tasks.spawn(housekeeper(
        shared.store.clone(),
        shared.metrics.clone(),
        shared.config.history_bounds(),
        Duration::from_millis(shared.config.history.housekeeping_interval_ms),
        cancel.clone(),
    ));
    if let Some(period) = crate::service::watchdog_period() {
        tasks.spawn(watchdog_loop(shared.clone(), period, cancel.clone()));
    }
    info!(agent = %shared.config.agent.id, version = crate::VERSION, "agent running");
    crate::service::ready();

    shutdown.await;
    crate::service::stopping();
    info!("shutting down");
    publish_gateway_status(
        &shared,
        firmware_protocol::message::Status {
            v: firmware_protocol::PROTOCOL_VERSION,
            status: firmware_protocol::message::Online::Offline,
            reason: Some("agent stopped".into()),
            emergency_latched: None,
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    let _ = shared.mqtt.disconnect().await;
    // Every task looks at the cancel; a task that misses it must not hold the stop past
    // systemd's timeout (and its SIGKILL) nor skip the checkpoint below. Whatever it was doing
    // is then cut short as a crash would cut it, which the store and the idempotency keys cover.
    let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        warn!(
            tasks = tasks.len(),
            grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
            "tasks still running after the stop's grace: aborted"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // A cleanly stopped agent leaves one self-contained database file: what a backup, an
    // upgrade or `status` reads is the file itself, and reading it changes nothing.
    if let Err(e) = shared.store.call_alone(|s| s.checkpoint()).await {
        warn!(error = %e, "could not fold the WAL into the database at shutdown");
    }
    Ok(())
}

/// Feeds systemd's watchdog every `period` (half its interval) while the runtime schedules
/// tasks and the store answers: a wedged runtime or a store lock held for good stops the pings,
/// and systemd restarts the agent.
async fn watchdog_loop(shared: Arc<Shared>, period: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared.store.call(|_| Ok(())).await {
            Ok(()) => crate::service::watchdog(),
            Err(e) => warn!(error = %e, "the store did not answer: not feeding the watchdog"),
        }
    }
}

/// Before anything else runs: the history brought within its bounds (after an upgrade from an
/// unbounded history this deletes most of it), then a database made before schema 6 switched
/// to incremental auto-vacuum with its one VACUUM, which then copies only what is kept.
async fn prepare_history(
    store: &StoreHandle,
    bounds: crate::store::HistoryBounds,
) -> Result<(), RuntimeError> {
    store
        .call_alone(move |s| {
            let mut deleted = 0;
            // Nothing else runs yet: larger steps, and all of them.
            let bounds = crate::store::HistoryBounds {
                prune_rows_per_step: bounds.prune_rows_per_step.saturating_mul(10),
                vacuum_pages_per_step: 0,
                ..bounds
            };
            loop {
                let step = s.history_step(&bounds, now_ms())?;
                deleted += step.raw_deleted + step.rollup_deleted;
                if step.raw_deleted + step.rollup_deleted == 0 || !step.more {
                    break;
                }
            }
            if deleted > 0 {
                info!(deleted, "history pruned to its bounds");
            }
            if s.auto_vacuum_mode()? != 2 {
                info!("switching the database to incremental auto-vacuum: one VACUUM, once");
                let started = std::time::Instant::now();
                s.ensure_incremental_vacuum()?;
                info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "database switched to incremental auto-vacuum"
                );
            }
            Ok(())
        })
        .await?;
    Ok(())
}

/// Drives the history's housekeeping: one bounded step (prune, then give pages back) every
/// `interval`, so neither a full history nor a drained outbox keeps the SD card's space.
async fn housekeeper(
    store: StoreHandle,
    metrics: Arc<Metrics>,
    bounds: crate::store::HistoryBounds,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let bounds = bounds.clone();
        let result = store
            .call_alone(move |s| Ok((s.history_step(&bounds, now_ms())?, s.history_stats()?)))
            .await;
        if let Ok((_, stats)) = &result {
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            metrics.history_raw_rows.set(gauge(stats.raw_rows));
            metrics.history_rollup_rows.set(gauge(stats.rollup_rows));
            metrics
                .database_bytes
                .set(gauge(stats.page_count * stats.page_size));
            metrics
                .database_free_bytes
                .set(gauge(stats.freelist_pages * stats.page_size));
        }
        match result.map(|(step, _)| step) {
            Ok(step) if step.raw_deleted + step.rollup_deleted + step.pages_vacuumed > 0 => {
                debug!(
                    raw_deleted = step.raw_deleted,
                    rollup_deleted = step.rollup_deleted,
                    pages_vacuumed = step.pages_vacuumed,
                    free_pages = step.freelist_pages,
                    "history housekeeping"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "history housekeeping failed; trying again"),
        }
    }
}

/// The engine and the automation executor, restored from disk: rule timers and arming, relays
/// on with their off-deadline, the emergency latch, macros.
async fn start_automation(
    shared: &Arc<Shared>,
) -> Result<(Automation, crate::rules::Engine), RuntimeError> {
    let config = &shared.config;
    let interlocks = crate::automation::interlocks(config);
    let mut safety = crate::safety::Safety::try_new(interlocks)
        .map_err(|e| RuntimeError::Interlocks(e.to_string()))?;
    let (snapshot, last_edge, latch_changed, macros, states) = shared
        .store
        .call(|s| {
            Ok((
                s.safety_snapshot()?,
                s.last_edge_command_number()?,
                s.cursor("latch_changed_ms")?
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0),
                s.macros()?,
                s.rule_states()?,
            ))
        })
        .await?;
    if let Some(snapshot) = snapshot.and_then(|v| serde_json::from_value(v).ok()) {
        safety.restore(snapshot);
    }
    let latch_changed = latch_changed.max(safety.emergency().map(|e| e.since_ms).unwrap_or(0));
    let mut automation = Automation::new(config, safety, last_edge, latch_changed);
    for (id, problem) in automation.set_macros(&macros) {
        warn!(macro_id = %id, %problem, "macro refused");
    }
    let time_zone = config
        .engine_time_zone()
        .map_err(|e| RuntimeError::Interlocks(e.to_string()))?;
    let mut engine = crate::rules::Engine::new(crate::rules::EngineSettings {
        stale_after_ms: config.engine.stale_after_ms as i64,
        time_zone,
    });
    let states: HashMap<String, crate::rules::RuleState> = states
        .into_iter()
        .filter_map(|(k, v)| serde_json::from_value(v).ok().map(|s| (k, s)))
        .collect();
    let (rules, catalog) = crate::automation::task::rules_and_catalog(shared, &automation).await?;
    let problems = engine.load(&rules, &catalog, &states);
    if automation.safety().emergency().is_some() {
        engine.set_blocked(true, now_ms());
        warn!("the emergency stop is still latched from before the restart");
    }
    let loaded = crate::automation::task::running_rules(&rules);
    crate::automation::task::record_problems(shared, &loaded, problems).await;
    info!(
        rules = loaded.len(),
        contradictions = engine.contradictions().len(),
        "decision engine loaded"
    );
    Ok((automation, engine))
}

/// The agent's own presence, retained on `autocore/gateway/{id}/status` (the last will says
/// offline if the agent vanishes without saying so).
async fn publish_gateway_status(shared: &Arc<Shared>, status: firmware_protocol::message::Status) {
    let payload = firmware_protocol::Payload::encode(&status).unwrap_or_default();
    let topic = bridge::gateway_status_topic(&shared.config.agent.id);
    if let Err(e) = shared
        .mqtt
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
    {
        debug!(error = %e, "could not publish the gateway status");
    }
}

async fn mqtt_loop(
    shared: Arc<Shared>,
    mut eventloop: EventLoop,
    inbound: mpsc::Sender<(String, Bytes)>,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                shared
                    .mqtt_connected
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                shared.metrics.mqtt_connections.inc();
                note_mqtt_state(&shared, MqttState::Connected, None);
                for (filter, qos) in bridge::SUBSCRIPTIONS {
                    if let Err(e) = shared.mqtt.subscribe(filter, qos).await {
                        warn!(filter, error = %e, "subscribe failed");
                    }
                }
                publish_gateway_status(&shared, firmware_protocol::message::Status::online(false))
                    .await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // An oversized payload is queued cut to one byte past the protocol's bound:
                // decoding still refuses and counts it, and a queue of them stays small.
                let payload = if p.payload.len() > PAYLOAD_BYTES_MAX {
                    Bytes::copy_from_slice(&p.payload[..=PAYLOAD_BYTES_MAX])
                } else {
                    p.payload
                };
                // Waiting here pushes back on the broker instead of dropping messages.
                if inbound.send((p.topic, payload)).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared
                    .mqtt_connected
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                note_mqtt_state(&shared, MqttState::from_error(&e), Some(e.to_string()));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}
