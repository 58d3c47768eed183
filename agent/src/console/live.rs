//! The console's live view: one snapshot of what the pages show that changes (latch, relays,
//! link, outbox, masters, macros), sent over SSE whenever it differs from the last one sent, so
//! a change reaches an open page within [`CHECK_EVERY`] plus the network.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::shared::{Shared, now_ms};
use crate::store::{DeviceRow, OutboxStats, SlaveRelays};

/// How often an open page's snapshot is recomputed.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What the pages show that changes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub now_ms: i64,
    pub emergency: Option<Value>,
    pub backend: &'static str,
    pub backend_reachable: bool,
    pub outage_began_ms: Option<i64>,
    pub mqtt: &'static str,
    pub outbox_depth: u64,
    pub outbox_oldest_age_ms: Option<i64>,
    pub devices: Vec<DeviceView>,
    pub slaves: Vec<SlaveView>,
    pub macros_running: Vec<(String, u32)>,
    pub held: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceView {
    pub device_id: String,
    pub online: bool,
    pub last_seen_ms: Option<i64>,
    pub firmware_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SlaveView {
    pub master: String,
    pub slave_mac: String,
    pub states: Vec<bool>,
    pub updated_at_ms: i64,
}

impl Snapshot {
    pub async fn gather(shared: &Shared) -> Result<Snapshot, crate::store::StoreError> {
        let now = now_ms();
        let (stats, devices, slaves): (OutboxStats, Vec<DeviceRow>, Vec<SlaveRelays>) = shared
            .store
            .call(move |s| Ok((s.outbox_stats(now)?, s.device_rows()?, s.slave_relays()?)))
            .await?;
        let health = shared.health.lock().map(|h| h.clone()).unwrap_or_default();
        let status = shared
            .automation_status
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        Ok(Snapshot {
            now_ms: now,
            emergency: status.emergency,
            backend: health.backend.state.label(),
            backend_reachable: health.backend_reachable,
            outage_began_ms: health.outage_began_ms,
            mqtt: health.mqtt.state.label(),
            outbox_depth: stats.depth,
            outbox_oldest_age_ms: stats.oldest_age_ms,
            devices: devices
                .into_iter()
                .map(|d| DeviceView {
                    device_id: d.device_id,
                    online: d.online,
                    last_seen_ms: d.last_seen_ms,
                    firmware_version: d.firmware_version,
                })
                .collect(),
            slaves: slaves
                .into_iter()
                .map(|s| SlaveView {
                    master: s.master,
                    slave_mac: s.slave_mac,
                    states: s.states,
                    updated_at_ms: s.updated_at_ms,
                })
                .collect(),
            macros_running: status.macro_steps_done,
            held: shared
                .console
                .leases
                .held()
                .iter()
                .map(|r| relay_key(&r.master, &r.slave_mac, r.relay))
                .collect(),
        })
    }

    /// What the page's script applies: texts by `data-live` key, relay states by
    /// `data-relay` key, and the latch. Times are sent as texts made here, so the script
    /// formats nothing.
    pub fn to_view(&self) -> Value {
        let mut texts = Map::new();
        let mut put = |k: &str, v: String| {
            texts.insert(k.to_string(), Value::String(v));
        };
        put("backend", self.backend_text());
        put("mqtt", self.mqtt.replace('_', " "));
        put("outbox_depth", self.outbox_depth.to_string());
        put(
            "outbox_age",
            self.outbox_oldest_age_ms
                .map(|a| ago_text(a / 1000))
                .unwrap_or_else(|| "empty".into()),
        );
        let online = self.devices.iter().filter(|d| d.online).count();
        put(
            "masters",
            format!("{online} online, {} offline", self.devices.len() - online),
        );
        for d in &self.devices {
            put(
                &format!("online:{}", d.device_id),
                if d.online { "online" } else { "offline" }.into(),
            );
            put(
                &format!("seen:{}", d.device_id),
                d.last_seen_ms
                    .map(|t| ago_text((self.now_ms - t) / 1000))
                    .unwrap_or_else(|| "never".into()),
            );
        }
        put(
            "macros",
            if self.macros_running.is_empty() {
                "none running".into()
            } else {
                self.macros_running
                    .iter()
                    .map(|(id, steps)| format!("{id} (step {})", steps + 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        for (id, steps) in &self.macros_running {
            put(
                &format!("macro:{id}"),
                format!("running, step {}", steps + 1),
            );
        }
        let mut relays = Map::new();
        for s in &self.slaves {
            for (i, on) in s.states.iter().enumerate() {
                relays.insert(
                    relay_key(&s.master, &s.slave_mac, i as u8),
                    Value::Bool(*on),
                );
            }
        }
        json!({
            "latched": self.emergency.is_some(),
            "latch_text": self.latch_text(),
            "texts": texts,
            "relays": relays,
            "held": self.held,
        })
    }

    pub fn backend_text(&self) -> String {
        match (self.backend_reachable, self.outage_began_ms) {
            (false, Some(t)) => format!(
                "unreachable since {} ({})",
                time_text(t),
                ago_text((self.now_ms - t) / 1000)
            ),
            (false, None) => "unreachable".into(),
            _ => self.backend.replace('_', " "),
        }
    }

    pub fn latch_text(&self) -> String {
        match &self.emergency {
            None => String::new(),
            Some(e) => format!(
                "EMERGENCY STOP latched by {}: {}",
                e["by"].as_str().unwrap_or("?"),
                e["reason"].as_str().unwrap_or("?")
            ),
        }
    }
}

/// A time as the pages show it: "2026-12-03 10:00:00 UTC".
pub fn time_text(ms: i64) -> String {
    let text = crate::cloud::format_timestamp_ms(ms);
    // Whole seconds are enough for a person.
    let text = match text.find('.') {
        Some(dot) => format!("{}Z", &text[..dot]),
        None => text,
    };
    text.replace('T', " ").replace('Z', " UTC")
}

/// The key of one relay in the page (`data-relay`) and in the live view.
pub fn relay_key(master: &str, slave_mac: &str, relay: u8) -> String {
    format!("{master}|{}|{relay}", slave_mac.to_ascii_uppercase())
}

/// "42 s", "3 min", "2 h 5 min", "4 d".
pub fn ago_text(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d", s / 86_400),
    }
}

/// `GET /console/live`: the live view for a signed-in page, as SSE. It ends when the agent
/// shuts down (the automation task is gone), so a held-open page never delays a shutdown.
pub(crate) async fn events(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if super::session_of(&shared, &headers).is_none() {
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    }
    let stream = async_stream(shared);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

fn async_stream(
    shared: Arc<Shared>,
) -> impl futures_core::Stream<Item = Result<Event, Infallible>> {
    let state = (shared, None::<Value>, tokio::time::interval(CHECK_EVERY));
    futures_util::stream::unfold(state, |(shared, mut last, mut tick)| async move {
        loop {
            tick.tick().await;
            if shared.automation.is_closed() {
                return None;
            }
            let Ok(snapshot) = Snapshot::gather(&shared).await else {
                continue;
            };
            let view = snapshot.to_view();
            if last.as_ref() == Some(&view) {
                continue;
            }
            last = Some(view.clone());
            let event = Event::default().event("state").data(view.to_string());
            return Some((Ok(event), (shared, last, tick)));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_a_person_says_them() {
        assert_eq!(ago_text(-3), "0 s");
        assert_eq!(ago_text(59), "59 s");
        assert_eq!(ago_text(125), "2 min");
        assert_eq!(ago_text(7_500), "2 h 5 min");
        assert_eq!(ago_text(200_000), "2 d");
        assert_eq!(time_text(1_796_292_000_123), "2026-12-03 10:00:00 UTC");
    }
}
