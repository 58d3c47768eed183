//! The thin tokio driver around the agent's state machines: it owns the MQTT connection, the
//! store, the backend client and the timers, and moves data between them. Decisions live in
//! `delivery`, `link` and `store`; this module only does the I/O they ask for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::BackoffBuilder;
use bytes::Bytes;
use firmware_protocol::message::PAYLOAD_BYTES_MAX;
use firmware_protocol::{DeviceId, MasterKey};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::json;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::automation::task::AutomationInput;
use crate::automation::{Automation, LatchSource};
use crate::bridge::{self, Inbound};
use crate::cloud::{Cloud, CloudConfig, CloudError, TokenSource};
use crate::config::AgentConfig;
use crate::connectivity::{BackendState, MqttState, Watched};
use crate::delivery::{Delivery, DeliveryAction, DeliveryLimits};
use crate::drop_episode::{DropEpisode, DropLog};
use crate::link::{Link, LinkEvent};
use crate::liveness::{Liveness, Presence};
use crate::metrics::{Metrics, label};
use crate::reports::ReportGate;
use crate::rules::EngineInput;
use crate::store::{
    CommandOutcome, CommandRecord, OutboxClass, OutboxRow, Reading, Store, StoreError, StoreHandle,
};

/// Messages waiting between the MQTT connection and the handler.
pub const INBOUND_QUEUE_MESSAGES_MAX: usize = 10_000;
/// Commands and acks waiting for the delivery task.
pub const DELIVERY_QUEUE_MAX: usize = 1_000;
/// Rule changes read per request.
pub const RULE_CHANGES_PAGE_MAX: u32 = 500;
/// The rules mirror re-reads this far behind its cursor (see docs/decisions/0001).
pub const RULE_CURSOR_OVERLAP_MS: i64 = 5_000;
/// Bad messages logged per second at most; the rest are only counted.
pub const BAD_MESSAGE_LOGS_PER_S_MAX: u32 = 5;
/// Unknown masters reported for adoption per run, at most.
pub const DISCOVERED_DEVICES_MAX: usize = 100;
/// Device configurations are checked every this many poll intervals.
pub const CONFIG_CHECK_POLLS: u64 = 5;
/// Poll intervals without outbox progress, while the backend answers, before a stall.
pub const STALL_POLL_INTERVALS: i64 = 10;
/// Batches of readings waiting for their commit (the inbound loop waits beyond it: backpressure).
pub const TELEMETRY_BATCHES_QUEUED_MAX: usize = 8;
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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the local API and `status` report about the agent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Health {
    pub backend_reachable: bool,
    pub outage_began_ms: Option<i64>,
    pub sync_stalled: bool,
    pub last_backend_error: Option<String>,
    pub mqtt: Watched<MqttState>,
    pub backend: Watched<BackendState>,
}

impl Health {
    /// Why the agent is degraded; empty when it is ok. Offline (no broker, no backend) is a
    /// normal state; a refusal or a stall is not.
    pub fn degraded_reasons(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        reasons.extend(self.mqtt.state.degraded_reason());
        reasons.extend(self.backend.state.degraded_reason());
        if self.sync_stalled {
            reasons.push("sync stalled: the backend answers but the outbox does not move");
        }
        reasons
    }
}

/// Records the MQTT link's state; a change is logged once (not at every retry) and shown in the
/// metrics.
fn note_mqtt_state(shared: &Shared, state: MqttState, detail: Option<String>) {
    let changed = {
        let mut health = shared.health.lock().unwrap_or_else(|p| p.into_inner());
        health.mqtt.set(state, detail.clone())
    };
    let Some(previous) = changed else {
        return;
    };
    let metrics = &shared.metrics;
    crate::metrics::move_state(&metrics.mqtt_state, previous.label(), state.label());
    metrics
        .mqtt_connected
        .set(i64::from(state == MqttState::Connected));
    let error = detail.unwrap_or_default();
    match state.degraded_reason() {
        Some(reason) => warn!(state = state.label(), %error, "{reason}; retrying"),
        None if state == MqttState::Connected => info!("connected to the MQTT broker"),
        None if previous == MqttState::Connected => {
            warn!(state = state.label(), %error, "MQTT connection lost; reconnecting")
        }
        None => warn!(state = state.label(), %error, "MQTT broker unreachable; retrying"),
    }
}

/// State the tasks share. Everything mutable is behind the store or a small mutex.
pub struct Shared {
    pub config: AgentConfig,
    pub store: StoreHandle,
    pub cloud: Cloud,
    pub metrics: Arc<Metrics>,
    pub health: Mutex<Health>,
    mqtt: AsyncClient,
    keys: HashMap<String, MasterKey>,
    masters: HashSet<String>,
    outbox_ready: Notify,
    link: Mutex<Link>,
    mqtt_connected: std::sync::atomic::AtomicBool,
    /// Requests to the automation task (interlocks, emergency stop, macros, controls).
    pub automation: mpsc::Sender<AutomationInput>,
    engine: mpsc::Sender<EngineInput>,
    /// The latest value per (device, sensor) and its time, for macro conditions.
    latest: Mutex<HashMap<(String, String), (f64, i64)>>,
    pub automation_status: Mutex<AutomationStatus>,
    /// Events and rule firings since start, for the operator console (the outbox forgets them
    /// once the cloud has them).
    pub journal: Mutex<crate::console::Journal>,
    /// The operator console's sign-in sessions and hold-to-run leases.
    pub console: crate::console::ConsoleState,
    /// Held from taking a command's signing counter to handing it to the MQTT client, by the
    /// delivery loop and the automation task alike, so commands leave in counter order and a
    /// master never refuses one as `replayed` because another overtook it.
    pub(crate) command_order: tokio::sync::Mutex<()>,
    /// Per master, the request id of a lock call not answered yet (see `pull_commands`).
    lock_requests: Mutex<HashMap<String, String>>,
}

/// What the automation task last reported, for /health and `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AutomationStatus {
    pub emergency: Option<serde_json::Value>,
    pub relays_on: usize,
    pub macros_running: Vec<String>,
    /// The last mutex groups found violated and switched off.
    pub mutex_violations: Vec<crate::safety::MutexViolation>,
    /// Each running macro and the steps its run has done.
    pub macro_steps_done: Vec<(String, u32)>,
}

impl Shared {
    pub(crate) fn key(&self, master: &str) -> Option<MasterKey> {
        self.keys.get(master).cloned()
    }

    pub(crate) fn mqtt(&self) -> &AsyncClient {
        &self.mqtt
    }

    pub(crate) fn notify_outbox(&self) {
        self.outbox_ready.notify_one();
    }

    /// The latest value of a device's sensor and its time.
    pub(crate) fn latest_reading(&self, device: &str, sensor: &str) -> Option<(f64, i64)> {
        self.latest
            .lock()
            .ok()?
            .get(&(device.to_string(), sensor.to_string()))
            .copied()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("agent", &self.config.agent.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(crate) enum DeliveryInput {
    Admit(Box<CommandRecord>),
    Ack(firmware_protocol::message::CommandAck),
    /// Sent already by the automation task (at this time); await its ack.
    Track(Box<CommandRecord>, i64),
    /// The emergency stop: end what would switch something on.
    CancelSwitchingOn(String),
}

/// Runs the agent until `shutdown` completes: serves the local API on `api`, connects to the
/// broker and the backend (neither needs to be up at start), and stops every task cleanly.
pub async fn run(
    config: AgentConfig,
    api: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RuntimeError> {
    // With two providers compiled in (see Cargo.toml), rustls would panic at the first TLS
    // handshake; an error here only means one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
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
    let opened = tokio::task::spawn_blocking(move || Store::open(&path))
        .await
        .map_err(|e| StoreError::Task(e.to_string()));
    let prepared = match opened {
        Ok(Ok(store)) => {
            let store = StoreHandle::new(store);
            prepare_history(&store, config.history_bounds())
                .await
                .map(|()| store)
        }
        Ok(Err(source)) => Err(RuntimeError::Database {
            path: config.store.path.clone(),
            source,
        }),
        Err(e) => Err(e.into()),
    };
    keepalive.abort();
    let store = prepared?;
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
    let stall_after_ms = STALL_POLL_INTERVALS * config.cloud.poll_interval_ms as i64;
    let (automation_tx, automation_rx) = mpsc::channel(AUTOMATION_QUEUE_MAX);
    let (engine_tx, engine_rx) = mpsc::channel(ENGINE_QUEUE_MAX);
    let (engine_out_tx, engine_out_rx) = mpsc::channel(ENGINE_QUEUE_MAX);
    let shared = Arc::new(Shared {
        masters: config.masters.iter().map(|m| m.device_id.clone()).collect(),
        keys,
        store,
        cloud,
        metrics: Arc::new(Metrics::new()),
        health: Mutex::new(Health {
            backend_reachable: true,
            ..Health::default()
        }),
        mqtt,
        outbox_ready: Notify::new(),
        link: Mutex::new(Link::new(stall_after_ms, now_ms())),
        mqtt_connected: std::sync::atomic::AtomicBool::new(false),
        automation: automation_tx,
        engine: engine_tx.clone(),
        latest: Mutex::new(HashMap::new()),
        automation_status: Mutex::new(AutomationStatus::default()),
        journal: Mutex::new(crate::console::Journal::default()),
        console: crate::console::ConsoleState::default(),
        config,
        command_order: tokio::sync::Mutex::new(()),
        lock_requests: Mutex::new(HashMap::new()),
    });
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
    // The engine ends when its input closes, but the senders live as long as `shared`: stop it
    // with everything else.
    let engine_cancel = cancel.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::rules::run_engine(engine, crate::rules::Clock::new(), engine_rx, engine_out_tx) => {}
            _ = engine_cancel.cancelled() => {}
        }
    });
    tasks.spawn(crate::automation::task::run(
        shared.clone(),
        automation,
        automation_rx,
        engine_out_rx,
        engine_tx,
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
    while tasks.join_next().await.is_some() {}
    // A cleanly stopped agent leaves one self-contained database file: what a backup, an
    // upgrade or `status` reads is the file itself, and reading it changes nothing.
    if let Err(e) = shared.store.call(|s| s.checkpoint()).await {
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
        .call(move |s| {
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
            .call(move |s| Ok((s.history_step(&bounds, now_ms())?, s.history_stats()?)))
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

// ------------------------------------------------------------------------------------ MQTT

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

/// Counts every bad message and logs at most a few a second, so a flood cannot fill the disk.
struct BadMessageLog {
    window_start_ms: i64,
    logged: u32,
    suppressed: u64,
}

impl BadMessageLog {
    /// Returns whether this one was logged.
    fn report(&mut self, error: &dyn std::fmt::Display, now: i64) -> bool {
        if now - self.window_start_ms >= 1_000 {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    "more bad MQTT messages were counted but not logged"
                );
            }
            self.window_start_ms = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < BAD_MESSAGE_LOGS_PER_S_MAX {
            self.logged += 1;
            warn!(error = %error, "bad MQTT message refused");
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

async fn inbound_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(String, Bytes)>,
    delivery: mpsc::Sender<DeliveryInput>,
    cancel: CancellationToken,
) {
    let batch_max = shared.config.store.telemetry_batch_rows_max;
    let mut buffer: Vec<Reading> = Vec::with_capacity(batch_max);
    // Readings are committed by a task of their own, in order: this loop (and so every ack,
    // stop and reading the engine waits for) never waits for a telemetry fsync.
    let (writer, batches) = mpsc::channel::<Vec<Reading>>(TELEMETRY_BATCHES_QUEUED_MAX);
    let writer_task = tokio::spawn(telemetry_writer(shared.clone(), batches));
    let mut flush = tokio::time::interval(Duration::from_millis(
        shared.config.store.telemetry_flush_ms,
    ));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bad = BadMessageLog {
        window_start_ms: 0,
        logged: 0,
        suppressed: 0,
    };
    let known = |d: &DeviceId| shared.masters.contains(d.as_str());
    let mut discovered: HashSet<String> = HashSet::new();
    let windows = match shared.store.call(|s| s.report_windows()).await {
        Ok(windows) => windows,
        Err(e) => {
            // Starting with empty windows only lets a replay through once; refusing to run
            // would leave the plant without its agent.
            error!(error = %e, "cannot read the report anti-replay windows; starting empty");
            Vec::new()
        }
    };
    let mut gate = ReportGate::new(
        shared.keys.iter().map(|(m, k)| (m.clone(), k.clone())),
        &windows,
    );
    let mut liveness = Liveness::new(shared.config.mqtt.heartbeat_timeout_ms);
    loop {
        let (topic, payload) = tokio::select! {
            _ = cancel.cancelled() => {
                hand_over(&writer, &mut buffer).await;
                save_report_windows(&shared, &mut gate).await;
                drop(writer);
                let _ = writer_task.await;
                return;
            }
            _ = flush.tick() => {
                hand_over(&writer, &mut buffer).await;
                save_heard(&shared, &mut liveness).await;
                // Saved with the telemetry cadence, not per report: a window that rolls back
                // by one flush after a crash lets at most those reports be replayed once, and
                // only by a client the broker lets publish as that master.
                save_report_windows(&shared, &mut gate).await;
                continue;
            }
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => return,
            },
        };
        let now = now_ms();
        let inbound = match bridge::decode_inbound(&topic, &payload, known, now) {
            Ok(inbound) => inbound,
            Err(e) => {
                shared
                    .metrics
                    .bad_messages
                    .get_or_create(&label("reason", e.reason_label()))
                    .inc();
                let _ = bad.report(&e, now);
                continue;
            }
        };
        // An ack or relay report is believed only when its master signed it: a forged one
        // changes nothing, neither in the cloud nor in the interlocks' view of the relays.
        if let Err(refusal) = gate.admit(&inbound) {
            let check = label("reason", refusal.check_name());
            shared.metrics.bad_messages.get_or_create(&check).inc();
            shared.metrics.reports_refused.get_or_create(&check).inc();
            let _ = bad.report(&refusal, now);
            continue;
        }
        let kind = match &inbound {
            Inbound::Telemetry(_) => "telemetry",
            Inbound::Ack(..) => "ack",
            Inbound::Announce(_) => "announce",
            Inbound::Discovered(_) => "discovered",
            Inbound::Status(..) => "status",
            Inbound::RelayState(..) => "relay_state",
            Inbound::EmergencyStop { .. } | Inbound::EmergencyReset => "emergency",
            Inbound::Ignored => "ignored",
        };
        shared
            .metrics
            .mqtt_messages_in
            .get_or_create(&label("kind", kind))
            .inc();
        // Any message on a master's own topics proves it alive (the broker admits only that
        // master to them); its offline status is the one that says otherwise.
        let heard_from = match &inbound {
            // One message, one master: its readings all carry the topic's device id.
            Inbound::Telemetry(readings) => readings.first().map(|r| r.device_id.as_str()),
            Inbound::Ack(device, _) | Inbound::RelayState(device, _) => Some(device.as_str()),
            Inbound::Status(device, status) if bridge::is_online(status) => Some(device.as_str()),
            _ => None,
        };
        let came_online =
            heard_from.is_some_and(|device| liveness.heard(device, now) == Presence::CameOnline);
        // A status is recorded by its own arm below.
        if let Some(device) = heard_from.filter(|_| came_online)
            && !matches!(inbound, Inbound::Status(..))
        {
            record_presence(&shared, device, true, None, now).await;
        }
        match inbound {
            Inbound::Telemetry(readings) => {
                if let Ok(mut latest) = shared.latest.lock() {
                    for r in &readings {
                        latest.insert(
                            (r.device_id.clone(), r.sensor_key.clone()),
                            (r.value, r.recorded_at_ms.min(now)),
                        );
                    }
                }
                for r in &readings {
                    if shared
                        .engine
                        .try_send(EngineInput::Reading(r.clone()))
                        .is_err()
                    {
                        shared.metrics.engine_readings_dropped.inc();
                    }
                }
                buffer.extend(readings);
                if buffer.len() >= batch_max {
                    hand_over(&writer, &mut buffer).await;
                }
            }
            Inbound::Ack(device, ack) => {
                if let Some(slave) = ack.slave_mac.filter(|_| !ack.relay_states.is_empty()) {
                    let _ = shared.automation.try_send(AutomationInput::Observe {
                        master: device.to_string(),
                        slave_mac: slave.to_string(),
                        states: ack.relay_states.clone(),
                    });
                }
                let _ = delivery.send(DeliveryInput::Ack(ack)).await;
            }
            Inbound::Announce(a) => {
                liveness.heard(a.device_id.as_str(), now);
                record_presence(
                    &shared,
                    a.device_id.as_str(),
                    true,
                    Some(a.firmware.clone()),
                    now,
                )
                .await;
            }
            Inbound::Status(device, status) => {
                let online = bridge::is_online(&status);
                if !online {
                    liveness.said_offline(device.as_str(), now);
                }
                // A status online from a master already online is its heartbeat: heard above,
                // nothing to record.
                if !online || came_online {
                    record_presence(&shared, device.as_str(), online, None, now).await;
                }
            }
            Inbound::RelayState(device, report) => {
                for slave in &report.slaves {
                    let _ = shared.automation.try_send(AutomationInput::Observe {
                        master: device.to_string(),
                        slave_mac: slave.mac.to_string(),
                        states: slave.relay_states.clone(),
                    });
                }
                record_relay_states(&shared, device.as_str(), &report, now).await;
            }
            Inbound::EmergencyStop {
                reason,
                issued_at_ms,
            } => {
                let _ = shared
                    .automation
                    .send(AutomationInput::Stop {
                        reason: reason.unwrap_or_else(|| "stop published on MQTT".into()),
                        by: "mqtt".into(),
                        source: LatchSource::Mqtt { issued_at_ms },
                        reply: None,
                    })
                    .await;
            }
            Inbound::EmergencyReset => {
                // Only someone allowed to reset may: the operator through the local API, or the
                // dashboard through system_status. A reset on MQTT (ours echoed, or forged) is
                // not one.
                debug!(
                    "emergency reset seen on MQTT; the agent resets only from its API or the cloud"
                );
            }
            Inbound::Discovered(announce) => {
                // Once per device per run: a chatty stranger must not fill the outbox.
                if discovered.insert(announce.device_id.to_string())
                    && discovered.len() <= DISCOVERED_DEVICES_MAX
                {
                    info!(device = %announce.device_id, "unknown master announced itself; reporting it for adoption");
                    let payload = json!({
                        "discovered": true, "device_id": announce.device_id.as_str(),
                        "firmware_version": announce.firmware, "mac_address": announce.mac.map(|m| m.to_string()),
                    });
                    let key = format!("discovered:{}", announce.device_id);
                    let _ = shared
                        .store
                        .call(move |s| s.enqueue(OutboxClass::DeviceStatus, &key, &payload, now))
                        .await;
                    shared.outbox_ready.notify_one();
                }
            }
            Inbound::Ignored => {}
        }
    }
}

/// Hands the masters' last-heard times to the store, so its silence check sees them.
async fn save_heard(shared: &Arc<Shared>, liveness: &mut Liveness) {
    let heard = liveness.take_unsaved();
    if heard.is_empty() {
        return;
    }
    if let Err(e) = shared.store.call(move |s| s.note_heard(&heard)).await {
        warn!(error = %e, "could not save when the masters were last heard");
    }
}

async fn save_report_windows(shared: &Arc<Shared>, gate: &mut ReportGate) {
    let moved = gate.take_moved();
    if moved.is_empty() {
        return;
    }
    if let Err(e) = shared
        .store
        .call(move |s| s.save_report_windows(&moved))
        .await
    {
        warn!(error = %e, "could not save the report anti-replay windows");
    }
}

/// A master's report of its slaves' relays (after a duration ended, a maximum on-time, a
/// fail-safe, a reboot): queued so that `relay_slaves` shows what the relays really are.
async fn record_relay_states(
    shared: &Arc<Shared>,
    master: &str,
    report: &firmware_protocol::message::RelayStateReport,
    now: i64,
) {
    let rows: Vec<serde_json::Value> = report
        .slaves
        .iter()
        .map(|slave| {
            json!({
                "master_device_id": master,
                "slave_mac_address": slave.mac.to_string(),
                "relay_states": slave.relay_states,
                "relay_count": slave.relay_states.len().clamp(1, 16),
                "is_online": slave.online,
                "last_seen": crate::cloud::format_timestamp_ms(now),
            })
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let master = master.to_string();
    let states: Vec<(String, Vec<bool>)> = report
        .slaves
        .iter()
        .map(|slave| (slave.mac.to_string(), slave.relay_states.clone()))
        .collect();
    let result = shared
        .store
        .call(move |s| {
            let report = json!({"master_device_id": master, "slaves": rows});
            s.record_relay_report(&master, &states, &report, now)
        })
        .await;
    match result {
        Ok(_) => shared.outbox_ready.notify_one(),
        Err(e) => error!(error = %e, "could not queue relay states"),
    }
}

/// Passes the buffered readings to the telemetry writer.
async fn hand_over(writer: &mpsc::Sender<Vec<Reading>>, buffer: &mut Vec<Reading>) {
    if !buffer.is_empty() {
        let _ = writer.send(std::mem::take(buffer)).await;
    }
}

/// Commits batches of readings in the order they came, until the inbound loop ends.
async fn telemetry_writer(shared: Arc<Shared>, mut batches: mpsc::Receiver<Vec<Reading>>) {
    let mut dropping = DropEpisode::default();
    while let Some(readings) = batches.recv().await {
        flush_readings(&shared, readings, &mut dropping).await;
    }
}

async fn flush_readings(shared: &Arc<Shared>, readings: Vec<Reading>, dropping: &mut DropEpisode) {
    if readings.is_empty() {
        return;
    }
    let count = readings.len();
    let rows_max = shared.config.store.outbox_rows_max;
    let now = now_ms();
    match shared
        .store
        .call(move |s| {
            let added = s.enqueue_readings(&readings, now)?;
            let dropped = s.enforce_outbox_bound(rows_max)?;
            Ok((added, dropped))
        })
        .await
    {
        Ok((added, dropped)) => {
            shared.metrics.readings_stored.inc_by(added as u64);
            shared.metrics.telemetry_dropped.inc_by(dropped);
            match dropping.note(dropped, now) {
                DropLog::Nothing => {}
                DropLog::Began { dropped } => {
                    warn!(
                        dropped,
                        rows_max, "outbox full: dropping the oldest telemetry"
                    );
                }
                DropLog::Lasting { since_last, total } => {
                    warn!(
                        since_last,
                        total, rows_max, "outbox still full: oldest telemetry dropped"
                    );
                }
                DropLog::Ended { total, lasted_ms } => {
                    info!(
                        total,
                        lasted_ms, "outbox has room again: telemetry no longer dropped"
                    );
                }
            }
            shared.outbox_ready.notify_one();
        }
        Err(e) => error!(error = %e, readings = count, "could not store telemetry"),
    }
}

async fn record_presence(
    shared: &Arc<Shared>,
    device: &str,
    online: bool,
    firmware: Option<String>,
    now: i64,
) {
    let device_owned = device.to_string();
    let fw = firmware.clone();
    let result = shared
        .store
        .call(move |s| {
            let first = s.record_presence(&device_owned, online, fw.as_deref(), None, now)?;
            let payload = json!({
                "device_id": device_owned, "is_online": online, "firmware_version": fw,
                "last_seen": crate::cloud::format_timestamp_ms(now), "first_seen": first,
            });
            s.enqueue(
                OutboxClass::DeviceStatus,
                &format!("presence:{device_owned}:{now}"),
                &payload,
                now,
            )?;
            let online = s.devices()?.iter().filter(|d| d.1).count();
            Ok((first, online))
        })
        .await;
    match result {
        Ok((first, online_count)) => {
            shared.metrics.masters_online.set(online_count as i64);
            if first {
                info!(device, "master seen for the first time");
            }
            shared.outbox_ready.notify_one();
        }
        Err(e) => error!(error = %e, device, "could not record presence"),
    }
}

// ------------------------------------------------------------------------------- delivery

async fn delivery_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<DeliveryInput>,
    cancel: CancellationToken,
) {
    let mut delivery = Delivery::new(DeliveryLimits {
        ack_timeout_ms: shared.config.mqtt.ack_timeout_ms as i64,
        attempts_max: shared.config.mqtt.command_attempts_max,
        send_margin_ms: shared.config.mqtt.send_margin_ms as i64,
        in_flight_per_master: shared.config.mqtt.in_flight_per_master as usize,
    });
    loop {
        let wait = delivery
            .next_deadline_ms()
            .map(|d| Duration::from_millis((d - now_ms()).clamp(1, 1_000) as u64))
            .unwrap_or(Duration::from_secs(1));
        let actions = tokio::select! {
            _ = cancel.cancelled() => return,
            input = rx.recv() => match input {
                Some(DeliveryInput::Admit(command)) => delivery.admit(*command, now_ms()),
                Some(DeliveryInput::Ack(ack)) => delivery.on_ack(&ack, now_ms()),
                Some(DeliveryInput::Track(command, sent_at)) => {
                    delivery.track(*command, sent_at);
                    vec![]
                }
                Some(DeliveryInput::CancelSwitchingOn(reason)) => delivery.cancel_switching_on(&reason),
                None => return,
            },
            _ = tokio::time::sleep(wait) => {
                if shared.mqtt_connected.load(std::sync::atomic::Ordering::SeqCst) {
                    delivery.on_tick(now_ms())
                } else {
                    delivery.on_tick_disconnected(now_ms())
                }
            }
        };
        for action in actions {
            perform(&shared, action).await;
        }
    }
}

async fn perform(shared: &Arc<Shared>, action: DeliveryAction) {
    match action {
        DeliveryAction::Send { command, attempt } => {
            let Some(key) = shared.keys.get(&command.master_device_id).cloned() else {
                finish(
                    shared,
                    command.id,
                    CommandOutcome::Failed {
                        reason: format!(
                            "no signing key configured for master {}",
                            command.master_device_id
                        ),
                        execution_time_ms: None,
                    },
                )
                .await;
                return;
            };
            let id = command.id;
            let master = command.master_device_id.clone();
            let _in_counter_order = shared.command_order.lock().await;
            // The counter and the attempt are on disk before the command leaves.
            let counter = shared
                .store
                .call(move |s| {
                    let now = now_ms();
                    let counter = s.next_signing_counter(&master, now)?;
                    s.mark_sent(id, Some(counter), None, now)?;
                    Ok(counter)
                })
                .await;
            let counter = match counter {
                Ok(c) => c,
                Err(e) => {
                    error!(error = %e, command = id, "could not record the delivery; not sending");
                    return;
                }
            };
            match bridge::signed_command(&command, &key, counter) {
                Ok((topic, bytes)) => {
                    debug!(command = id, attempt, counter, "sending command");
                    if let Err(e) = shared
                        .mqtt
                        .publish(topic, QoS::AtLeastOnce, false, bytes)
                        .await
                    {
                        warn!(command = id, error = %e, "publish failed; the ack timeout will resend");
                    } else {
                        shared
                            .metrics
                            .mqtt_messages_out
                            .get_or_create(&label("kind", "command"))
                            .inc();
                    }
                }
                Err(reason) => {
                    finish(
                        shared,
                        id,
                        CommandOutcome::Failed {
                            reason: format!("cannot encode the command: {reason}"),
                            execution_time_ms: None,
                        },
                    )
                    .await
                }
            }
        }
        DeliveryAction::Finish { id, outcome } => finish(shared, id, outcome).await,
    }
}

async fn finish(shared: &Arc<Shared>, id: i64, outcome: CommandOutcome) {
    let label_value = match &outcome {
        CommandOutcome::Completed { .. } => "completed",
        CommandOutcome::Failed { .. } => "failed",
        CommandOutcome::Expired => "expired",
    };
    let failure_reason = match &outcome {
        CommandOutcome::Failed { reason, .. } => Some(reason.clone()),
        CommandOutcome::Expired => Some("expired".to_string()),
        CommandOutcome::Completed { .. } => None,
    };
    if let CommandOutcome::Failed { reason, .. } = &outcome {
        warn!(command = id, reason, "command failed");
    } else {
        info!(command = id, outcome = label_value, "command ended");
    }
    match shared
        .store
        .call(move |s| s.finish_command(id, &outcome, now_ms()))
        .await
    {
        Ok(true) => {
            if id < 0 {
                let _ = shared.automation.try_send(AutomationInput::CommandEnded {
                    id,
                    failure: failure_reason,
                });
            }
            shared
                .metrics
                .commands_finished
                .get_or_create(&label("outcome", label_value))
                .inc();
            shared.outbox_ready.notify_one();
        }
        Ok(false) => {}
        Err(e) => error!(error = %e, command = id, "could not record the command's end"),
    }
}

// ---------------------------------------------------------------------------------- cloud

fn note_cloud_result(shared: &Arc<Shared>, result: Result<(), &CloudError>) {
    let now = now_ms();
    let event = {
        let mut link = shared.link.lock().unwrap_or_else(|p| p.into_inner());
        let event = match result {
            Ok(()) => link.on_answer(now),
            Err(e) if e.backend_answered() => link.on_answer(now),
            Err(_) => link.on_no_answer(now),
        };
        let mut health = shared.health.lock().unwrap_or_else(|p| p.into_inner());
        health.backend_reachable = link.is_reachable();
        health.outage_began_ms = link.outage_began_ms();
        health.last_backend_error = result.err().map(|e| e.to_string());
        event
    };
    note_backend_state(shared, result);
    shared.metrics.backend_reachable.set(i64::from(
        shared
            .health
            .lock()
            .map(|h| h.backend_reachable)
            .unwrap_or(false),
    ));
    if let Some(event) = event {
        record_link_event(shared, event);
    }
}

/// Records what the backend answered to the agent's token; a change is logged once and shown
/// in the metrics.
fn note_backend_state(shared: &Shared, result: Result<(), &CloudError>) {
    let state = BackendState::from_result(result);
    let changed = {
        let mut health = shared.health.lock().unwrap_or_else(|p| p.into_inner());
        health
            .backend
            .set(state, result.err().map(|e| e.to_string()))
    };
    let Some(previous) = changed else {
        return;
    };
    crate::metrics::move_state(
        &shared.metrics.backend_state,
        previous.label(),
        state.label(),
    );
    let error = result.err().map(|e| e.to_string()).unwrap_or_default();
    match state.degraded_reason() {
        Some(reason) => warn!(state = state.label(), %error, "{reason}"),
        // An outage has its own message (OutageBegan).
        None if previous.degraded_reason().is_some() => {
            info!(
                state = state.label(),
                "backend takes the agent's token again"
            )
        }
        None => {}
    }
}

fn record_link_event(shared: &Arc<Shared>, event: LinkEvent) {
    let shared = shared.clone();
    tokio::spawn(async move {
        match event {
            LinkEvent::OutageBegan { at_ms } => {
                warn!("backend unreachable; controlling locally and queueing");
                if let Ok(mut journal) = shared.journal.lock() {
                    journal.push_event(crate::console::journal::Event {
                        at_ms,
                        event_type: "backend_unreachable".into(),
                        severity: "warning".into(),
                        device: None,
                        message: "backend unreachable; controlling locally and queueing".into(),
                    });
                }
                let _ = shared
                    .store
                    .call(move |s| {
                        s.set_cursor(
                            "outage_dropped_at_start",
                            &s.counter("telemetry_dropped")?.to_string(),
                        )
                        .map(|_| at_ms)
                    })
                    .await;
            }
            LinkEvent::OutageEnded {
                began_at_ms,
                duration_ms,
            } => {
                let agent = shared.config.agent.id.clone();
                let now = now_ms();
                let result = shared
                    .store
                    .call(move |s| {
                        // The backoff the rows earned failing during the outage outlived its
                        // cause: every row is due at once, not after its 14th doubling.
                        s.outbox_due_now()?;
                        let stats = s.outbox_stats(now)?;
                        let dropped_before: i64 = s.cursor("outage_dropped_at_start")?.and_then(|v| v.parse().ok()).unwrap_or(0);
                        let dropped = s.counter("telemetry_dropped")? - dropped_before;
                        let payload = json!({
                            "agent_id": agent, "event_type": "backend_outage", "severity": "warning",
                            "source": "agent",
                            "message": format!(
                                "backend unreachable for {} s; {} rows waiting, {} readings dropped",
                                duration_ms / 1000, stats.depth, dropped
                            ),
                            "payload": {"began_at_ms": began_at_ms, "duration_ms": duration_ms,
                                        "queued_rows": stats.depth, "oldest_age_ms": stats.oldest_age_ms,
                                        "readings_dropped": dropped},
                            "occurred_at": crate::cloud::format_timestamp_ms(now),
                        });
                        s.enqueue(OutboxClass::Event, &format!("outage:{began_at_ms}"), &payload, now)?;
                        Ok((stats.depth, payload))
                    })
                    .await;
                let result = result.map(|(depth, report)| {
                    if let Ok(mut journal) = shared.journal.lock() {
                        journal.record(&report, now);
                    }
                    depth
                });
                info!(duration_ms, queued = ?result.ok(), "backend reachable again; draining the outbox");
                shared.outbox_ready.notify_one();
            }
            LinkEvent::Stalled { since_ms } => {
                warn!(
                    since_ms,
                    "sync stalled while the backend answers; restarting it"
                );
            }
        }
    });
}

async fn poll_loop(
    shared: Arc<Shared>,
    delivery: mpsc::Sender<DeliveryInput>,
    cancel: CancellationToken,
) {
    let mut tick =
        tokio::time::interval(Duration::from_millis(shared.config.cloud.poll_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let masters: Vec<String> = shared
        .config
        .masters
        .iter()
        .map(|m| m.device_id.clone())
        .collect();
    let mut polls: u64 = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Completions go out before new locks: a command a master finished while the backend
        // was away would otherwise see its lock time out and be handed out again.
        let completions_waiting = shared
            .store
            .call(|s| s.completions_waiting(now_ms()))
            .await
            .unwrap_or(false);
        for master in &masters {
            if !completions_waiting {
                pull_commands(&shared, master, &delivery).await;
            }
            pull_rules(&shared, master).await;
        }
        pull_latch(&shared).await;
        polls += 1;
        if polls % CONFIG_CHECK_POLLS == 1 {
            deliver_configs(&shared, &masters).await;
            pull_macros(&shared).await;
        }
    }
}

/// The owner's emergency latch as the dashboard sees it.
async fn pull_latch(shared: &Arc<Shared>) {
    let result = shared.cloud.system_status().await;
    // Read on every poll, with or without masters: the backend's answer to the token shows in
    // /health even on an agent without masters. (Outages are the command and push paths' to
    // judge, as before.)
    note_backend_state(shared, result.as_ref().map(|_| ()));
    match result {
        Ok(Some(row)) => {
            let _ = shared
                .automation
                .send(AutomationInput::CloudLatch(row))
                .await;
        }
        Ok(None) => {}
        Err(e) => debug!(error = %e, "could not read system_status"),
    }
}

/// The macros this agent runs, mirrored so they run offline too.
async fn pull_macros(shared: &Arc<Shared>) {
    let rows = match shared.cloud.macros().await {
        Ok(rows) => rows,
        Err(e) => {
            debug!(error = %e, "could not read macros");
            return;
        }
    };
    let mirror: Vec<(String, i64, serde_json::Value)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["revision"].as_i64().unwrap_or(0),
                r.clone(),
            )
        })
        .collect();
    if let Err(e) = shared.store.call(move |s| s.replace_macros(&mirror)).await {
        error!(error = %e, "could not mirror macros");
        return;
    }
    let _ = shared.automation.send(AutomationInput::Macros(rows)).await;
}

/// Publishes a master's configuration (retained, so the broker hands it to the master whenever
/// it reconnects) each time its version moves in the cloud.
async fn deliver_configs(shared: &Arc<Shared>, masters: &[String]) {
    let rows = match shared.cloud.device_configs(masters).await {
        Ok(rows) => rows,
        Err(e) => {
            debug!(error = %e, "could not read device configurations");
            return;
        }
    };
    for row in rows {
        let device = row.device_id.clone();
        let delivered = shared
            .store
            .call(move |s| s.delivered_config_version(&device))
            .await
            .ok()
            .flatten();
        if delivered.is_some_and(|v| v >= row.config_version) {
            continue;
        }
        // An empty object means "nothing authored yet": nothing to deliver.
        if row.config.as_object().is_some_and(|o| o.is_empty()) {
            continue;
        }
        let mut config = row.config.clone();
        config["v"] = json!(firmware_protocol::PROTOCOL_VERSION);
        let encoded = serde_json::from_value::<firmware_protocol::message::DeviceConfig>(config)
            .map_err(|e| e.to_string())
            .and_then(|c| firmware_protocol::Payload::encode(&c).map_err(|e| e.to_string()));
        let topic = DeviceId::new(row.device_id.as_str())
            .map(|id| firmware_protocol::Topic::device_config(&id).to_string())
            .map_err(|e| e.to_string());
        match (encoded, topic) {
            (Ok(bytes), Ok(topic)) => {
                if let Err(e) = shared
                    .mqtt
                    .publish(topic, QoS::AtLeastOnce, true, bytes)
                    .await
                {
                    warn!(device = %row.device_id, error = %e, "could not publish the configuration; will retry");
                    continue;
                }
                shared
                    .metrics
                    .mqtt_messages_out
                    .get_or_create(&label("kind", "config"))
                    .inc();
                info!(device = %row.device_id, version = row.config_version, "configuration delivered");
            }
            (Err(reason), _) | (_, Err(reason)) => {
                let reason = reason.to_string();
                warn!(device = %row.device_id, version = row.config_version, reason, "configuration refused; not delivered");
                let (device, version, agent) = (
                    row.device_id.clone(),
                    row.config_version,
                    shared.config.agent.id.clone(),
                );
                let _ = shared
                    .store
                    .call(move |s| {
                        let payload = json!({
                            "device_id": device, "agent_id": agent, "event_type": "config_rejected",
                            "severity": "error", "source": "agent",
                            "message": format!("configuration version {version} not delivered: {reason}"),
                            "occurred_at": crate::cloud::format_timestamp_ms(now_ms()),
                        });
                        s.enqueue(OutboxClass::Event, &format!("config:{device}:{version}"), &payload, now_ms())
                    })
                    .await;
            }
        }
        let (device, version) = (row.device_id.clone(), row.config_version);
        let _ = shared
            .store
            .call(move |s| s.set_delivered_config_version(&device, version))
            .await;
    }
}

async fn pull_commands(shared: &Arc<Shared>, master: &str, delivery: &mpsc::Sender<DeliveryInput>) {
    let cfg = &shared.config.cloud;
    // The same name until a call is answered: a retry after a lost answer gets what that call
    // locked instead of leaving it locked in the cloud until the lock timeout.
    let request_id = match shared.lock_requests.lock() {
        Ok(mut open) => open
            .entry(master.to_string())
            .or_insert_with(|| uuid::Uuid::new_v4().simple().to_string())
            .clone(),
        Err(_) => uuid::Uuid::new_v4().simple().to_string(),
    };
    let rows = match shared
        .cloud
        .lock_commands(
            master,
            cfg.lock_batch_max,
            cfg.lock_timeout_seconds,
            &request_id,
        )
        .await
    {
        Ok(rows) => {
            note_cloud_result(shared, Ok(()));
            if let Ok(mut open) = shared.lock_requests.lock() {
                open.remove(master);
            }
            rows
        }
        Err(e) => {
            note_cloud_result(shared, Err(&e));
            debug!(master, error = %e, "could not pull commands");
            return;
        }
    };
    for row in rows {
        match row.to_record() {
            Ok(record) => {
                let id = record.id;
                match shared.store.call(move |s| s.command(id)).await {
                    Ok(Some(known)) => {
                        debug!(command = id, state = ?known.state, "command handed out again; already known");
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        error!(error = %e, command = id, "could not read the store; the command will be handed out again");
                        continue;
                    }
                }
                // Through the interlocks first: refused, or rewritten to carry the plan.
                let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
                let asked = shared
                    .automation
                    .send(AutomationInput::CloudCommand {
                        command: Box::new(record.clone()),
                        reply: reply_tx,
                    })
                    .await;
                let verdict = match (asked, reply_rx.await) {
                    (Ok(()), Ok(verdict)) => verdict,
                    _ => Err("the agent is shutting down".to_string()),
                };
                let (record, refusal) = match verdict {
                    Ok(planned) => (planned, None),
                    Err(reason) => (record, Some(reason)),
                };
                let to_store = record.clone();
                let refused = refusal.clone();
                let accepted = shared
                    .store
                    .call(move |s| {
                        let accepted = s.accept_command(&to_store, now_ms())?;
                        if let (crate::store::Accepted::New, Some(reason)) = (&accepted, refused) {
                            s.finish_command(
                                to_store.id,
                                &CommandOutcome::Failed {
                                    reason,
                                    execution_time_ms: None,
                                },
                                now_ms(),
                            )?;
                        }
                        Ok(accepted)
                    })
                    .await;
                if let Some(reason) = refusal {
                    warn!(command = id, master, %reason, "command refused by the interlocks");
                    shared.outbox_ready.notify_one();
                    continue;
                }
                match accepted {
                    Ok(crate::store::Accepted::New) => {
                        info!(command = record.id, master, command_type = %record.command_type, "command accepted");
                        // A polling master takes its commands from the local API instead.
                        let polls = shared.config.master(master).map(|m| m.transport)
                            == Some(crate::config::Transport::Poll);
                        if !polls {
                            let _ = delivery.send(DeliveryInput::Admit(Box::new(record))).await;
                        }
                    }
                    Ok(crate::store::Accepted::Known(state)) => {
                        debug!(
                            command = record.id,
                            ?state,
                            "command handed out again; already known"
                        );
                    }
                    Err(e) => {
                        error!(error = %e, command = record.id, "could not store the command; it will be handed out again")
                    }
                }
            }
            Err(reason) => {
                warn!(
                    command = row.id,
                    reason, "unusable command from the backend; reporting it failed"
                );
                let id = row.id;
                let payload = json!({"command_id": id, "status": "failed", "error_message": format!("agent cannot run it: {reason}")});
                let _ = shared
                    .store
                    .call(move |s| {
                        s.enqueue(
                            OutboxClass::Completion,
                            &format!("completion:{id}"),
                            &payload,
                            now_ms(),
                        )
                    })
                    .await;
                shared.outbox_ready.notify_one();
            }
        }
    }
}

async fn pull_rules(shared: &Arc<Shared>, master: &str) {
    let key = format!("rules:{master}");
    let key_for_read = key.clone();
    let cursor = shared
        .store
        .call(move |s| s.cursor(&key_for_read))
        .await
        .ok()
        .flatten();
    let since = cursor
        .as_deref()
        .and_then(crate::cloud::parse_timestamp_ms)
        .map(|ms| crate::cloud::format_timestamp_ms(ms - RULE_CURSOR_OVERLAP_MS))
        .unwrap_or_else(|| "-infinity".to_string());
    let mut after: Option<String> = None;
    let mut since_page = since;
    loop {
        let page = match shared
            .cloud
            .rule_changes(master, &since_page, after.as_deref(), RULE_CHANGES_PAGE_MAX)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                note_cloud_result(shared, Err(&e));
                return;
            }
        };
        let Some(last) = page.last() else { return };
        let (last_at, last_id) = (last.changed_at.clone(), last.id.clone());
        let records: Vec<_> = page.iter().map(|c| c.to_record()).collect();
        let full = page.len() as u32 == RULE_CHANGES_PAGE_MAX;
        let key = key.clone();
        let cursor_value = last_at.clone();
        match shared
            .store
            .call(move |s| {
                let changed = s.apply_rule_changes(&records)?;
                s.set_cursor(&key, &cursor_value)?;
                Ok(changed)
            })
            .await
        {
            Ok(changed) if changed > 0 => {
                info!(master, changed, "rules mirror updated");
                let _ = shared.automation.send(AutomationInput::ReloadRules).await;
            }
            Ok(_) => {}
            Err(e) => {
                error!(error = %e, "could not update the rules mirror");
                return;
            }
        }
        if !full {
            return;
        }
        since_page = last_at;
        after = Some(last_id);
    }
}

/// Runs the outbox pusher and restarts it when the link says sync stalled.
async fn sync_supervisor(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut pusher = tokio::spawn(push_loop(shared.clone(), cancel.clone()));
    let mut check =
        tokio::time::interval(Duration::from_millis(shared.config.cloud.poll_interval_ms));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = pusher.await;
                return;
            }
            _ = check.tick() => {}
        }
        let now = now_ms();
        let Ok(stats) = shared.store.call(move |s| s.outbox_stats(now)).await else {
            continue;
        };
        shared.metrics.outbox_depth.set(stats.depth as i64);
        let cutoff = now - shared.config.mqtt.heartbeat_timeout_ms as i64;
        if let Ok(silent) = shared
            .store
            .call(move |s| s.mark_silent_offline(cutoff))
            .await
        {
            for device in silent {
                warn!(
                    device,
                    "master silent past its heartbeat timeout; marked offline"
                );
                record_presence(&shared, &device, false, None, now).await;
            }
        }
        shared.metrics.outbox_rejected.set(stats.rejected as i64);
        shared
            .metrics
            .outbox_oldest_age_seconds
            .set(stats.oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
        if let Ok(counts) = shared.store.call(|s| s.command_counts()).await {
            for (state, n) in counts {
                shared
                    .metrics
                    .commands
                    .get_or_create(&label("state", &state))
                    .set(n as i64);
            }
        }
        let stalled = {
            let mut link = shared.link.lock().unwrap_or_else(|p| p.into_inner());
            let event = link.check_stall(stats.depth, now);
            let stalled = link.is_stalled();
            if let Ok(mut h) = shared.health.lock() {
                h.sync_stalled = stalled;
            }
            event
        };
        shared.metrics.sync_stalled.set(i64::from(
            shared
                .health
                .lock()
                .map(|h| h.sync_stalled)
                .unwrap_or(false),
        ));
        if let Some(event) = stalled {
            record_link_event(&shared, event);
            shared.metrics.sync_restarts.inc();
            pusher.abort();
            let _ = (&mut pusher).await;
            // Rows waiting for a backoff that outlived its cause are due again at once.
            let _ = shared.store.call(|s| s.outbox_due_now()).await;
            pusher = tokio::spawn(push_loop(shared.clone(), cancel.clone()));
        }
    }
}

async fn push_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let batch = shared.config.cloud.push_batch_rows_max;
    loop {
        let now = now_ms();
        let rows = match shared.store.call(move |s| s.outbox_due(now, batch)).await {
            Ok(rows) => rows,
            Err(e) => {
                error!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        if rows.is_empty() {
            shared
                .link
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .on_progress(now);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = shared.outbox_ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let mut blocked = false;
        for group in group_by_class(rows) {
            match push_group(&shared, &group).await {
                Ok(()) => {}
                Err(()) => {
                    blocked = true;
                    break;
                }
            }
        }
        if blocked {
            // Order is kept: nothing behind a failed row goes first. Wait for its backoff.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

/// Consecutive rows of one class, in outbox order.
fn group_by_class(rows: Vec<OutboxRow>) -> Vec<Vec<OutboxRow>> {
    let mut groups: Vec<Vec<OutboxRow>> = Vec::new();
    for row in rows {
        match groups.last_mut() {
            Some(g) if g[0].class == row.class => g.push(row),
            _ => groups.push(vec![row]),
        }
    }
    groups
}

/// Pushes one group; Err means a transient failure that blocks the queue for now.
async fn push_group(shared: &Arc<Shared>, group: &[OutboxRow]) -> Result<(), ()> {
    let class = group[0].class;
    let result: Result<(), CloudError> = match class {
        OutboxClass::Telemetry => {
            let readings: Vec<Reading> = group
                .iter()
                .filter_map(|r| serde_json::from_value(r.payload.clone()).ok())
                .collect();
            shared.cloud.insert_readings(&readings).await
        }
        OutboxClass::Completion => {
            // In batches through complete_slave_commands; a batch the backend refuses is
            // retried one by one, so that one bad row is set aside alone.
            for chunk in group.chunks(crate::cloud::COMPLETIONS_PER_CALL_MAX) {
                let payloads: Vec<serde_json::Value> =
                    chunk.iter().map(|r| r.payload.clone()).collect();
                match shared.cloud.report_completions(&payloads).await {
                    Ok(()) => {
                        let seqs: Vec<i64> = chunk.iter().map(|r| r.seq).collect();
                        delivered(shared, class, &seqs).await;
                    }
                    Err(e) if e.is_transient() => return settle_failure(shared, chunk, e).await,
                    Err(e) => {
                        warn!(error = %e, rows = chunk.len(), "completion batch refused; reporting one by one");
                        for row in chunk {
                            match shared.cloud.report_completion(&row.payload).await {
                                Ok(_) => delivered(shared, class, &[row.seq]).await,
                                Err(e) if e.is_transient() => {
                                    return settle_failure(shared, std::slice::from_ref(row), e)
                                        .await;
                                }
                                Err(e) => reject(shared, row, &e.to_string()).await,
                            }
                        }
                    }
                }
            }
            note_cloud_result(shared, Ok(()));
            return Ok(());
        }
        OutboxClass::Event => {
            let rows: Vec<_> = group.iter().map(event_row).collect();
            shared.cloud.insert_idempotent("event_logs", &rows).await
        }
        OutboxClass::RuleCommand => {
            let rows: Vec<_> = group.iter().map(|r| r.payload.clone()).collect();
            shared
                .cloud
                .insert_idempotent("relay_commands_slave", &rows)
                .await
        }
        OutboxClass::DeviceStatus => {
            // Only the newest presence per device matters; older rows are delivered with it.
            let mut latest: BTreeMap<String, &OutboxRow> = BTreeMap::new();
            for row in group {
                if let Some(d) = row.payload["device_id"].as_str() {
                    latest.insert(d.to_string(), row);
                }
            }
            let mut outcome = Ok(());
            for row in latest.values().filter(|r| r.payload["discovered"] == true) {
                let p = &row.payload;
                let device = p["device_id"].as_str().unwrap_or_default();
                if let Err(e) = shared
                    .cloud
                    .register_discovered_device(
                        device,
                        p["firmware_version"].as_str(),
                        p["mac_address"].as_str(),
                    )
                    .await
                {
                    return settle_failure(shared, group, e).await;
                }
            }
            for row in latest.values().filter(|r| r.payload["discovered"] != true) {
                let patch = json!({
                    "is_online": row.payload["is_online"], "last_seen": row.payload["last_seen"],
                });
                let mut patch = patch;
                if let Some(fw) = row.payload["firmware_version"].as_str() {
                    patch["firmware_version"] = json!(fw);
                }
                let device = row.payload["device_id"].as_str().unwrap_or_default();
                if let Err(e) = shared.cloud.update_device_status(device, &patch).await {
                    outcome = Err(e);
                    break;
                }
            }
            outcome
        }
        OutboxClass::RelayState => {
            // The newest report per slave is the truth; older ones in the group go with it.
            let mut latest: BTreeMap<(String, String), serde_json::Value> = BTreeMap::new();
            for row in group {
                for slave in row.payload["slaves"].as_array().into_iter().flatten() {
                    let key = (
                        slave["master_device_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        slave["slave_mac_address"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    );
                    latest.insert(key, slave.clone());
                }
            }
            let rows: Vec<serde_json::Value> = latest.into_values().collect();
            shared.cloud.upsert_relay_slaves(&rows).await
        }
        OutboxClass::RuleFeedback => push_feedback(shared, group).await,
    };
    match result {
        Ok(()) => {
            note_cloud_result(shared, Ok(()));
            let seqs: Vec<i64> = group.iter().map(|r| r.seq).collect();
            delivered(shared, class, &seqs).await;
            Ok(())
        }
        Err(e) => settle_failure(shared, group, e).await,
    }
}

/// The engine's reports: execution records, rule errors, the emergency latch (in order within
/// each kind; a group holds a few hundred rows at most).
async fn push_feedback(shared: &Arc<Shared>, group: &[OutboxRow]) -> Result<(), CloudError> {
    let of_kind = |kind: &str| -> Vec<serde_json::Value> {
        group
            .iter()
            .filter(|r| r.payload["kind"] == kind)
            .map(|r| r.payload["row"].clone())
            .collect()
    };
    let executions = of_kind("execution");
    if !executions.is_empty() {
        shared
            .cloud
            .insert_idempotent("rule_executions", &executions)
            .await?;
    }
    let errors: Vec<serde_json::Value> = group
        .iter()
        .filter(|r| r.payload["kind"] == "rule_error")
        .map(|r| {
            json!({"id": r.payload["id"], "revision": r.payload["revision"], "error": r.payload["error"]})
        })
        .collect();
    for chunk in errors.chunks(500) {
        shared.cloud.report_rule_errors(chunk).await?;
    }
    // Only the newest latch state matters.
    if let Some(latch) = of_kind("system_status").last() {
        shared.cloud.set_system_status(latch).await?;
    }
    Ok(())
}

fn event_row(row: &OutboxRow) -> serde_json::Value {
    let mut value = row.payload.clone();
    // The outbox key is the event's idempotency key in the cloud too.
    value["client_id"] = json!(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        row.idempotency_key.as_bytes()
    ));
    value
}

async fn delivered(shared: &Arc<Shared>, class: OutboxClass, seqs: &[i64]) {
    let seqs_owned = seqs.to_vec();
    if let Err(e) = shared
        .store
        .call(move |s| s.outbox_delivered(&seqs_owned))
        .await
    {
        error!(error = %e, "could not remove delivered rows; they will be sent again (idempotently)");
    }
    shared
        .metrics
        .outbox_pushed
        .get_or_create(&label("class", class.as_str()))
        .inc_by(seqs.len() as u64);
    shared
        .link
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .on_progress(now_ms());
}

async fn settle_failure(
    shared: &Arc<Shared>,
    group: &[OutboxRow],
    error: CloudError,
) -> Result<(), ()> {
    note_cloud_result(shared, Err(&error));
    let now = now_ms();
    if error.is_transient() {
        let attempts = group.iter().map(|r| r.attempts).max().unwrap_or(0) as usize;
        let delay = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(30))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.min(32))
            .unwrap_or(Duration::from_secs(30));
        let seqs: Vec<i64> = group.iter().map(|r| r.seq).collect();
        let reason = error.to_string();
        let _ = shared
            .store
            .call(move |s| s.outbox_retry_later(&seqs, &reason, now + delay.as_millis() as i64))
            .await;
        debug!(error = %error, delay_ms = delay.as_millis() as u64, "push failed; backing off");
        return Err(());
    }
    // A final refusal: set the rows aside with the reason. A batch is retried row by row first,
    // so that one bad reading does not take its neighbours with it.
    if group.len() > 1 && group[0].class == OutboxClass::Telemetry {
        for row in group {
            let single = std::slice::from_ref(row);
            let readings: Vec<Reading> = serde_json::from_value(row.payload.clone())
                .map(|r| vec![r])
                .unwrap_or_default();
            match shared.cloud.insert_readings(&readings).await {
                Ok(()) => delivered(shared, row.class, &[row.seq]).await,
                Err(e) if e.is_transient() => {
                    return Box::pin(settle_failure(shared, single, e)).await;
                }
                Err(e) => reject(shared, row, &e.to_string()).await,
            }
        }
        return Ok(());
    }
    for row in group {
        reject(shared, row, &error.to_string()).await;
    }
    Ok(())
}

async fn reject(shared: &Arc<Shared>, row: &OutboxRow, reason: &str) {
    error!(class = row.class.as_str(), key = %row.idempotency_key, reason, "backend refused an outbox row for good; kept aside");
    let seq = row.seq;
    let reason = reason.to_string();
    let _ = shared
        .store
        .call(move |s| s.outbox_reject(seq, &reason, now_ms()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_messages_are_logged_at_most_a_few_per_second() {
        let mut log = BadMessageLog {
            window_start_ms: 0,
            logged: 0,
            suppressed: 0,
        };
        let error = bridge::InboundError::Topic("x".into());
        let logged_first_second = (0..10_000)
            .filter(|i| log.report(&error, 1_000 + i / 100))
            .count();
        assert_eq!(logged_first_second, BAD_MESSAGE_LOGS_PER_S_MAX as usize);
        assert!(log.report(&error, 2_500), "a new second logs again");
    }

    #[test]
    fn outbox_rows_are_grouped_by_class_in_order() {
        let row = |seq, class| OutboxRow {
            seq,
            class,
            idempotency_key: seq.to_string(),
            payload: json!({}),
            created_at_ms: 0,
            attempts: 0,
        };
        let groups = group_by_class(vec![
            row(1, OutboxClass::Telemetry),
            row(2, OutboxClass::Telemetry),
            row(3, OutboxClass::Completion),
            row(4, OutboxClass::Telemetry),
        ]);
        let seqs: Vec<Vec<i64>> = groups
            .iter()
            .map(|g| g.iter().map(|r| r.seq).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1, 2], vec![3], vec![4]]);
    }
}
