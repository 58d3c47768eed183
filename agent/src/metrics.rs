//! The agent's Prometheus metrics (prometheus-client), shared by its tasks and rendered by
//! `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub mqtt_messages_in: Family<Labels, Counter>,
    pub mqtt_messages_out: Family<Labels, Counter>,
    pub bad_messages: Family<Labels, Counter>,
    pub reports_refused: Family<Labels, Counter>,
    pub readings_stored: Counter,
    pub telemetry_dropped: Counter,
    pub telemetry_dropped_in_doubt: Counter,
    pub engine_readings_dropped: Counter,
    pub outbox_depth: Gauge,
    pub outbox_oldest_age_seconds: Gauge<f64, AtomicU64>,
    pub outbox_rejected: Gauge,
    pub outbox_pushed: Family<Labels, Counter>,
    pub commands: Family<Labels, Gauge>,
    pub commands_finished: Family<Labels, Counter>,
    pub backend_reachable: Gauge,
    /// 1 for the backend's current state (reachable, unauthorized, ...), 0 for the others.
    pub backend_state: Family<Labels, Gauge>,
    pub mqtt_connected: Gauge,
    pub mqtt_connections: Counter,
    /// 1 for the MQTT link's current state (connected, bad_credentials, ...), 0 for the others.
    pub mqtt_state: Family<Labels, Gauge>,
    pub sync_stalled: Gauge,
    pub sync_restarts: Counter,
    pub masters_online: Gauge,
    /// One automation step's transaction, waiting for the store included.
    pub automation_write_seconds: Histogram,
    /// From a rule firing's arrival in the executor to its last command published.
    pub rule_firing_seconds: Histogram,
    /// Notifications by kind, target and outcome (sent, retried, failed, dropped, rate_limited).
    pub notifications: Family<Labels, Counter>,
    /// The reading history (docs/decisions/0014): raw rows, rollup rows, and the database's
    /// pages in bytes, in all and free, after the last housekeeping step.
    pub history_raw_rows: Gauge,
    pub history_rollup_rows: Gauge,
    pub database_bytes: Gauge,
    pub database_free_bytes: Gauge,
}

/// Buckets from 100 µs to about 400 ms.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 13,
    ))
}

/// A state gauge family holds 1 for the current state only: `from` goes to 0, `to` to 1.
pub fn move_state(family: &Family<Labels, Gauge>, from: &'static str, to: &'static str) {
    family.get_or_create(&label("state", from)).set(0);
    family.get_or_create(&label("state", to)).set(1);
}

pub fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_string(), value.to_string())]
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("autocore_agent");
        let m = Metrics {
            mqtt_messages_in: Family::default(),
            mqtt_messages_out: Family::default(),
            bad_messages: Family::default(),
            reports_refused: Family::default(),
            readings_stored: Counter::default(),
            telemetry_dropped: Counter::default(),
            telemetry_dropped_in_doubt: Counter::default(),
            engine_readings_dropped: Counter::default(),
            outbox_depth: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            outbox_rejected: Gauge::default(),
            outbox_pushed: Family::default(),
            commands: Family::default(),
            commands_finished: Family::default(),
            backend_reachable: Gauge::default(),
            backend_state: Family::default(),
            mqtt_connected: Gauge::default(),
            mqtt_connections: Counter::default(),
            mqtt_state: Family::default(),
            sync_stalled: Gauge::default(),
            sync_restarts: Counter::default(),
            masters_online: Gauge::default(),
            automation_write_seconds: latency_histogram(),
            rule_firing_seconds: latency_histogram(),
            notifications: Family::default(),
            history_raw_rows: Gauge::default(),
            history_rollup_rows: Gauge::default(),
            database_bytes: Gauge::default(),
            database_free_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "automation_write_seconds",
            "Time of one automation step's SQLite transaction, waiting for the store included",
            m.automation_write_seconds.clone(),
        );
        registry.register(
            "rule_firing_seconds",
            "From a rule firing reaching the executor to its commands published",
            m.rule_firing_seconds.clone(),
        );
        registry.register(
            "mqtt_messages_in",
            "MQTT messages received, by kind",
            m.mqtt_messages_in.clone(),
        );
        registry.register(
            "mqtt_messages_out",
            "MQTT messages published, by kind",
            m.mqtt_messages_out.clone(),
        );
        registry.register(
            "bad_messages",
            "MQTT messages refused, by reason",
            m.bad_messages.clone(),
        );
        registry.register(
            "reports_refused",
            "Acks and relay state reports refused for their signature or counter, by check",
            m.reports_refused.clone(),
        );
        registry.register(
            "history_raw_rows",
            "Raw readings kept on the Pi ([history] raw_rows_max bounds them)",
            m.history_raw_rows.clone(),
        );
        registry.register(
            "history_rollup_rows",
            "One-minute rollups kept on the Pi ([history] rollup_rows_max bounds them)",
            m.history_rollup_rows.clone(),
        );
        registry.register(
            "database_bytes",
            "Size of the agent's SQLite database (its pages) after the last housekeeping step",
            m.database_bytes.clone(),
        );
        registry.register(
            "database_free_bytes",
            "Free pages in the database, in bytes, not yet given back to the file system",
            m.database_free_bytes.clone(),
        );
        registry.register(
            "readings_stored",
            "Telemetry readings committed to the outbox",
            m.readings_stored.clone(),
        );
        registry.register(
            "telemetry_dropped",
            "Readings dropped at the outbox bound (oldest first) that the backend never received",
            m.telemetry_dropped.clone(),
        );
        registry.register(
            "telemetry_dropped_in_doubt",
            "Readings dropped at the outbox bound that an earlier push, never answered, may have delivered",
            m.telemetry_dropped_in_doubt.clone(),
        );
        registry.register(
            "engine_readings_dropped",
            "Readings the rule engine could not take (its queue was full); they were stored",
            m.engine_readings_dropped.clone(),
        );
        registry.register(
            "outbox_depth",
            "Rows waiting in the outbox",
            m.outbox_depth.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest row in the outbox",
            m.outbox_oldest_age_seconds.clone(),
        );
        registry.register(
            "outbox_rejected",
            "Rows the backend refused for good, kept aside",
            m.outbox_rejected.clone(),
        );
        registry.register(
            "outbox_pushed",
            "Rows delivered to the backend, by class",
            m.outbox_pushed.clone(),
        );
        registry.register(
            "commands",
            "Commands in the local store, by state",
            m.commands.clone(),
        );
        registry.register(
            "commands_finished",
            "Commands ended, by outcome",
            m.commands_finished.clone(),
        );
        registry.register(
            "backend_reachable",
            "1 while the backend answers",
            m.backend_reachable.clone(),
        );
        registry.register(
            "backend_state",
            "1 for the backend's current state as the agent sees it, 0 for the others",
            m.backend_state.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while the agent is connected to the MQTT broker",
            m.mqtt_connected.clone(),
        );
        registry.register(
            "mqtt_connections",
            "Connections made to the MQTT broker; more than one means it was lost and made again",
            m.mqtt_connections.clone(),
        );
        registry.register(
            "mqtt_state",
            "1 for the MQTT link's current state (why it is down, when it is), 0 for the others",
            m.mqtt_state.clone(),
        );
        for state in crate::connectivity::MqttState::ALL {
            m.mqtt_state
                .get_or_create(&label("state", state.label()))
                .set(i64::from(
                    state == crate::connectivity::MqttState::default(),
                ));
        }
        for state in crate::connectivity::BackendState::ALL {
            m.backend_state
                .get_or_create(&label("state", state.label()))
                .set(i64::from(
                    state == crate::connectivity::BackendState::default(),
                ));
        }
        registry.register(
            "sync_stalled",
            "1 while the backend answers but the outbox makes no progress",
            m.sync_stalled.clone(),
        );
        registry.register(
            "sync_restarts",
            "Times the agent restarted a stalled sync",
            m.sync_restarts.clone(),
        );
        registry.register(
            "masters_online",
            "Masters currently online",
            m.masters_online.clone(),
        );
        registry.register(
            "notifications",
            "Notifications by kind, target and outcome (sent, retried, failed, dropped, rate_limited)",
            m.notifications.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
