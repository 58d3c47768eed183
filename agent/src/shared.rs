//! State the agent's tasks share: the configuration, the store, the backend client, the MQTT
//! client, health, and the channels into the automation task (requests, and readings for the
//! engine it owns).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use firmware_protocol::MasterKey;
use rumqttc::AsyncClient;
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::automation::task::AutomationInput;
use crate::cloud::Cloud;
use crate::config::AgentConfig;
use crate::connectivity::{BackendState, MqttState, Watched};
use crate::link::Link;
use crate::metrics::Metrics;
use crate::store::{CommandRecord, StoreHandle};

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
pub(crate) fn note_mqtt_state(shared: &Shared, state: MqttState, detail: Option<String>) {
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
    pub(crate) mqtt: AsyncClient,
    pub(crate) keys: HashMap<String, MasterKey>,
    pub(crate) masters: HashSet<String>,
    pub(crate) outbox_ready: Notify,
    /// Rows that may wait `[cloud] push_linger_ms` for company (readings, events, relay states).
    pub(crate) outbox_soon: Notify,
    pub(crate) link: Mutex<Link>,
    pub(crate) mqtt_connected: std::sync::atomic::AtomicBool,
    /// Requests to the automation task (interlocks, emergency stop, macros, controls).
    pub automation: mpsc::Sender<AutomationInput>,
    /// Readings for the engine, which the automation task owns.
    pub(crate) engine: mpsc::Sender<crate::store::Reading>,
    /// The latest value per (device, sensor) and its time, for macro conditions.
    pub(crate) latest: Mutex<HashMap<(String, String), (f64, i64)>>,
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

/// What [`Shared::new`] is given; the rest starts empty.
pub(crate) struct SharedParts {
    pub config: AgentConfig,
    pub store: StoreHandle,
    pub cloud: Cloud,
    pub keys: HashMap<String, MasterKey>,
    pub mqtt: AsyncClient,
    pub automation: mpsc::Sender<AutomationInput>,
    pub engine: mpsc::Sender<crate::store::Reading>,
}

impl Shared {
    pub(crate) fn new(parts: SharedParts) -> Shared {
        let SharedParts {
            config,
            store,
            cloud,
            keys,
            mqtt,
            automation,
            engine,
        } = parts;
        // A sync this long overdue marks the link stalled.
        let stall_after_ms =
            crate::sync::STALL_POLL_INTERVALS * config.cloud.poll_interval_ms as i64;
        Shared {
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
            outbox_soon: Notify::new(),
            link: Mutex::new(Link::new(stall_after_ms, now_ms())),
            mqtt_connected: std::sync::atomic::AtomicBool::new(false),
            automation,
            engine,
            latest: Mutex::new(HashMap::new()),
            automation_status: Mutex::new(AutomationStatus::default()),
            journal: Mutex::new(crate::console::Journal::default()),
            console: crate::console::ConsoleState::default(),
            config,
            command_order: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn key(&self, master: &str) -> Option<MasterKey> {
        self.keys.get(master).cloned()
    }

    pub(crate) fn mqtt(&self) -> &AsyncClient {
        &self.mqtt
    }

    /// Rows the backend should have at once: a command's completion (the next sync locks
    /// nothing new while one waits), or a drain after an outage.
    pub(crate) fn notify_outbox(&self) {
        self.outbox_ready.notify_one();
    }

    /// Rows that may share a push with what follows within `[cloud] push_linger_ms`.
    pub(crate) fn notify_outbox_soon(&self) {
        self.outbox_soon.notify_one();
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
