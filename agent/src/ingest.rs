//! Ingest: what masters publish, decoded and authenticated; readings batched into the store and
//! fed to the engine; acks handed to delivery; presence and relay states recorded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use firmware_protocol::DeviceId;
use futures_util::future::OptionFuture;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::automation::LatchSource;
use crate::automation::task::AutomationInput;
use crate::bridge::{self, Inbound};
use crate::drop_episode::{DropEpisode, DropLog};
use crate::liveness::{Liveness, Presence};
use crate::metrics::label;
use crate::reports::ReportGate;
use crate::shared::{DeliveryInput, Shared, now_ms};
use crate::store::{OutboxClass, OutboxDrops, Reading};

/// Bad messages logged per second at most; the rest are only counted.
pub const BAD_MESSAGE_LOGS_PER_S_MAX: u32 = 5;
/// Unknown masters reported for adoption per run, at most.
pub const DISCOVERED_DEVICES_MAX: usize = 100;
/// Batches of readings waiting for their commit (the inbound loop waits beyond it: backpressure).
pub const TELEMETRY_BATCHES_QUEUED_MAX: usize = 8;
/// Readings written by one store job: what a firing may have to wait for behind telemetry
/// (about 0.3 ms on an x86 core; a reading costs its outbox row, its raw history row and its
/// minute's rollup).
pub const TELEMETRY_ROWS_PER_JOB: usize = 25;
/// Bookkeeping writes (presence, relay states, last heard, report windows) waiting for their
/// commit; past it the inbound loop waits for the oldest (backpressure on a flood of reports).
pub const BOOKKEEPING_IN_FLIGHT_MAX: usize = 64;

/// The store writes ingest queues and does not wait for: a reading or ack behind them must not
/// wait for their fsync. Queued in order (the store runs them in that order); their answers
/// (logs, metrics, the outbox's wake-up) are taken by tasks of their own, at most
/// [`BOOKKEEPING_IN_FLIGHT_MAX`] at once.
struct Bookkeeping {
    in_flight: tokio::task::JoinSet<()>,
}

impl Bookkeeping {
    async fn add(&mut self, answer: impl Future<Output = ()> + Send + 'static) {
        while self.in_flight.try_join_next().is_some() {}
        if self.in_flight.len() >= BOOKKEEPING_IN_FLIGHT_MAX {
            let _ = self.in_flight.join_next().await;
        }
        self.in_flight.spawn(answer);
    }

    /// Every answer taken: at shutdown, before the store may close.
    async fn finish(&mut self) {
        while self.in_flight.join_next().await.is_some() {}
    }
}

/// Counts every bad message and logs at most a few a second, so a flood cannot fill the disk.
pub(crate) struct BadMessageLog {
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

pub(crate) async fn inbound_loop(
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
    let mut bookkeeping = Bookkeeping {
        in_flight: tokio::task::JoinSet::new(),
    };
    loop {
        let (topic, payload) = tokio::select! {
            _ = cancel.cancelled() => {
                hand_over(&writer, &mut buffer).await;
                save_report_windows(&shared, &mut gate).await;
                bookkeeping.finish().await;
                drop(writer);
                let _ = writer_task.await;
                return;
            }
            _ = flush.tick() => {
                hand_over(&writer, &mut buffer).await;
                bookkeeping.add(save_heard(&shared, &mut liveness)).await;
                // Saved with the telemetry cadence, not per report: a window that rolls back
                // by one flush after a crash lets at most those reports be replayed once, and
                // only by a client the broker lets publish as that master.
                bookkeeping.add(save_report_windows(&shared, &mut gate)).await;
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
            bookkeeping
                .add(record_presence(&shared, device, true, None, now))
                .await;
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
                    if shared.engine.try_send(r.clone()).is_err() {
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
                bookkeeping
                    .add(record_presence(
                        &shared,
                        a.device_id.as_str(),
                        true,
                        Some(a.firmware.clone()),
                        now,
                    ))
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
                    bookkeeping
                        .add(record_presence(&shared, device.as_str(), online, None, now))
                        .await;
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
                bookkeeping
                    .add(record_relay_states(&shared, device.as_str(), &report, now))
                    .await;
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
                    let answer = shared.store.call_queued(move |s| {
                        s.enqueue(OutboxClass::DeviceStatus, &key, &payload, now)
                    });
                    let shared = shared.clone();
                    bookkeeping
                        .add(async move {
                            match answer.await {
                                Ok(_) => shared.notify_outbox_soon(),
                                Err(e) => error!(error = %e, "could not queue a discovered master"),
                            }
                        })
                        .await;
                }
            }
            Inbound::Ignored => {}
        }
    }
}

// Each writer below queues its store job when called and returns the handling of the answer:
// the job is in line before the caller goes on, whether it awaits the answer or not.

/// Hands the masters' last-heard times to the store, so its silence check sees them.
pub(crate) fn save_heard(
    shared: &Arc<Shared>,
    liveness: &mut Liveness,
) -> impl Future<Output = ()> + Send + 'static {
    let heard = liveness.take_unsaved();
    let answer =
        (!heard.is_empty()).then(|| shared.store.call_queued(move |s| s.note_heard(&heard)));
    async move {
        if let Some(Err(e)) = OptionFuture::from(answer).await {
            warn!(error = %e, "could not save when the masters were last heard");
        }
    }
}

pub(crate) fn save_report_windows(
    shared: &Arc<Shared>,
    gate: &mut ReportGate,
) -> impl Future<Output = ()> + Send + 'static {
    let moved = gate.take_moved();
    let answer = (!moved.is_empty()).then(|| {
        shared
            .store
            .call_queued(move |s| s.save_report_windows(&moved))
    });
    async move {
        if let Some(Err(e)) = OptionFuture::from(answer).await {
            warn!(error = %e, "could not save the report anti-replay windows");
        }
    }
}

/// A master's report of its slaves' relays (after a duration ended, a maximum on-time, a
/// fail-safe, a reboot): queued so that `relay_slaves` shows what the relays really are.
pub(crate) fn record_relay_states(
    shared: &Arc<Shared>,
    master: &str,
    report: &firmware_protocol::message::RelayStateReport,
    now: i64,
) -> impl Future<Output = ()> + Send + 'static {
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
    let master = master.to_string();
    let states: Vec<(String, Vec<bool>)> = report
        .slaves
        .iter()
        .map(|slave| (slave.mac.to_string(), slave.relay_states.clone()))
        .collect();
    // Deferred: a report is the relays' whole state, so one lost in a crash is made good by
    // the next, and the master reports again after a restart. Most join the commit of the
    // interlocks' own record of the same report (the inbound loop's `Observe`), instead of one each.
    let answer = (!rows.is_empty()).then(|| {
        shared.store.call_deferred(move |s| {
            let report = json!({"master_device_id": master, "slaves": rows});
            s.record_relay_report(&master, &states, &report, now)
        })
    });
    let shared = shared.clone();
    async move {
        match OptionFuture::from(answer).await {
            None => {}
            Some(Ok(_)) => shared.notify_outbox_soon(),
            Some(Err(e)) => error!(error = %e, "could not queue relay states"),
        }
    }
}

/// Passes the buffered readings to the telemetry writer.
pub(crate) async fn hand_over(writer: &mpsc::Sender<Vec<Reading>>, buffer: &mut Vec<Reading>) {
    if !buffer.is_empty() {
        let _ = writer.send(std::mem::take(buffer)).await;
    }
}

/// Commits batches of readings in the order they came, until the inbound loop ends.
pub(crate) async fn telemetry_writer(
    shared: Arc<Shared>,
    mut batches: mpsc::Receiver<Vec<Reading>>,
) {
    let mut dropping = DropEpisode::default();
    while let Some(readings) = batches.recv().await {
        flush_readings(&shared, readings, &mut dropping).await;
    }
}

pub(crate) async fn flush_readings(
    shared: &Arc<Shared>,
    readings: Vec<Reading>,
    dropping: &mut DropEpisode,
) {
    if readings.is_empty() {
        return;
    }
    let count = readings.len();
    let rows_max = shared.config.store.outbox_rows_max;
    let now = now_ms();
    let answers = shared
        .store
        .call_chunked(readings, TELEMETRY_ROWS_PER_JOB, move |s, chunk, last| {
            let added = s.enqueue_readings(&chunk, now)?;
            let drops = if last {
                s.enforce_outbox_bound(rows_max)?
            } else {
                OutboxDrops::default()
            };
            Ok((added, drops))
        })
        .await;
    let total = answers
        .into_iter()
        .try_fold((0, OutboxDrops::default()), |(a, d), answer| {
            answer.map(|(added, drops)| {
                (
                    a + added,
                    OutboxDrops {
                        lost: d.lost + drops.lost,
                        in_doubt: d.in_doubt + drops.in_doubt,
                    },
                )
            })
        });
    match total {
        Ok((added, drops)) => {
            shared.metrics.readings_stored.inc_by(added as u64);
            shared.metrics.telemetry_dropped.inc_by(drops.lost);
            shared
                .metrics
                .telemetry_dropped_in_doubt
                .inc_by(drops.in_doubt);
            let dropped = drops.lost + drops.in_doubt;
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
            shared.notify_outbox_soon();
        }
        Err(e) => error!(error = %e, readings = count, "could not store telemetry"),
    }
}

pub(crate) fn record_presence(
    shared: &Arc<Shared>,
    device: &str,
    online: bool,
    firmware: Option<String>,
    now: i64,
) -> impl Future<Output = ()> + Send + 'static {
    let device_owned = device.to_string();
    let answer = shared.store.call_queued(move |s| {
        let first = s.record_presence(&device_owned, online, firmware.as_deref(), None, now)?;
        let payload = json!({
            "device_id": device_owned, "is_online": online, "firmware_version": firmware,
            "last_seen": crate::cloud::format_timestamp_ms(now), "first_seen": first,
        });
        s.enqueue(
            OutboxClass::DeviceStatus,
            &crate::store::event_key("presence", &device_owned, now),
            &payload,
            now,
        )?;
        let online = s.devices()?.iter().filter(|d| d.1).count();
        Ok((first, online))
    });
    let shared = shared.clone();
    let device = device.to_string();
    async move {
        match answer.await {
            Ok((first, online_count)) => {
                shared.metrics.masters_online.set(online_count as i64);
                if first {
                    info!(device, "master seen for the first time");
                }
                shared.notify_outbox_soon();
            }
            Err(e) => error!(error = %e, device, "could not record presence"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER: &str = "ESP32_A";

    fn shared(dir: &std::path::Path) -> (Arc<Shared>, mpsc::Receiver<Reading>) {
        crate::testing::shared_state(
            dir,
            crate::testing::NOWHERE,
            &format!(
                "[[masters]]\ndevice_id = \"{MASTER}\"\nkey = \"00112233445566778899aabbccddeeff\"\n"
            ),
            "",
        )
    }

    fn telemetry(value: f64) -> (String, Bytes) {
        (
            format!("autocore/devices/{MASTER}/telemetry"),
            Bytes::from(format!(r#"{{"v":1,"ph":{{"value":{value}}}}}"#)),
        )
    }

    async fn next_reading(readings: &mut mpsc::Receiver<Reading>) -> Option<Reading> {
        tokio::time::timeout(Duration::from_secs(2), readings.recv())
            .await
            .ok()
            .flatten()
    }

    /// The bookkeeping an announce, a status or a relay report causes is written without the
    /// inbound loop waiting for it: a reading behind it reaches the engine while the store is
    /// busy (a commit's fsync, a long job), and the bookkeeping is written once it is free.
    #[tokio::test]
    async fn a_reading_behind_an_announce_reaches_the_engine_while_the_store_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, mut readings) = shared(dir.path());
        let (inbound, rx) = mpsc::channel(16);
        let (delivery, _delivery_rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let ingest = tokio::spawn(inbound_loop(shared.clone(), rx, delivery, cancel.clone()));
        inbound.send(telemetry(1.0)).await.unwrap();
        assert_eq!(
            next_reading(&mut readings).await.map(|r| r.value),
            Some(1.0)
        );

        // The store's thread held by a job until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let holding = shared.store.call_queued(move |_| {
            let _ = held.recv();
            Ok(())
        });
        let announce = format!(
            r#"{{"v":1,"device_id":"{MASTER}","kind":"master","firmware":"9.9.9","mac":null,"slaves":[],"sensors":["ph"],"telemetry_interval_ms":1000}}"#
        );
        inbound
            .send((
                format!("autocore/devices/{MASTER}/announce"),
                Bytes::from(announce),
            ))
            .await
            .unwrap();
        inbound.send(telemetry(2.0)).await.unwrap();
        let behind = next_reading(&mut readings).await;
        release.send(()).unwrap();
        holding.await.unwrap();
        assert_eq!(
            behind.map(|r| r.value),
            Some(2.0),
            "the reading behind the announce waited for the store"
        );

        cancel.cancel();
        ingest.await.unwrap();
        let rows = shared
            .store
            .call(|s| s.outbox_due(i64::MAX, 100))
            .await
            .unwrap();
        assert!(
            rows.iter().any(|r| r.class == OutboxClass::DeviceStatus
                && r.payload["firmware_version"] == "9.9.9"),
            "the announce's presence is queued for the cloud: {rows:?}"
        );
    }

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
}
