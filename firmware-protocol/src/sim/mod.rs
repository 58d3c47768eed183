//! The ESP32 simulator: masters that talk MQTT (or poll the backend's RPC over HTTP) and drive
//! slave relay boards over a simulated ESP-NOW radio, through the real frame codec.
//!
//! [`run`] takes a [`SimConfig`] and a shutdown future, so tests drive it in-process; the
//! `esp32-sim` binary only parses flags ([`cli`]) and calls it. The master and slave logic are
//! state machines without I/O ([`master::MasterCore`], [`slave::SlaveNode`]); this module is
//! the tokio driver around them.

pub mod cli;
pub mod master;
pub mod radio;
pub mod sensor;
pub mod slave;
pub mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

pub use master::{MasterSpec, MasterTiming, SlaveCommandRow};
pub use radio::{RadioControl, RadioSpec};
/// The MQTT client the simulator uses, re-exported so tests and tools use the same version.
pub use rumqttc;
pub use sensor::{SensorSource, SensorSpec};
pub use slave::SlaveSpec;

use crate::frame::{FrameBody, FrameRepr};
use crate::mac::MacAddr;
use crate::message::{Payload, Status};
use crate::topic::{Qos, Topic};
use master::{MasterCore, MasterState, Output};
use radio::{Airframe, Link, Radio};
use slave::SlaveNode;
use state::SlavePersisted;

/// Requests the MQTT client may queue before `publish` waits.
pub const MQTT_REQUESTS_MAX: usize = 256;
/// MQTT keep-alive; the broker publishes the last will after 1.5 times this without traffic.
pub const MQTT_KEEP_ALIVE_S: u64 = 5;
/// Wait this long before reconnecting to a broker that went away.
pub const MQTT_RECONNECT_DELAY_MS: u64 = 500;
/// How long a clean shutdown waits for the offline status to reach the broker.
pub const SHUTDOWN_FLUSH_MS: u64 = 2000;
/// An HTTP request to the backend gives up after this long.
pub const HTTP_TIMEOUT_MS: u64 = 10_000;

/// Polling `get_and_lock_slave_commands` instead of (or besides) MQTT commands.
#[derive(Clone)]
pub struct PollSpec {
    /// PostgREST root, e.g. `http://127.0.0.1:3000`; the RPCs are under `{rest_url}/rpc/`.
    pub rest_url: String,
    pub jwt: String,
    pub interval_ms: u64,
    /// `p_limit`
    pub limit: u32,
    /// `p_timeout_seconds`
    pub lock_timeout_s: u32,
}

// Written by hand so the token never reaches a log through `{:?}`.
impl std::fmt::Debug for PollSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollSpec")
            .field("rest_url", &self.rest_url)
            .field("jwt", &"<redacted>")
            .field("interval_ms", &self.interval_ms)
            .field("limit", &self.limit)
            .field("lock_timeout_s", &self.lock_timeout_s)
            .finish()
    }
}

/// Everything the simulator needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `mqtt://host:port`; without it the masters only poll over HTTP.
    pub mqtt_url: Option<String>,
    pub masters: Vec<MasterSpec>,
    pub timing: MasterTiming,
    pub radio: RadioSpec,
    /// Where latches and counters survive restarts; without it nothing does.
    pub state_dir: Option<PathBuf>,
    /// Where each slave appends a JSON line for every relay a command switched
    /// ([`state::Actuation`]): what the relays did, for checkers of the whole system.
    pub actuation_log_dir: Option<PathBuf>,
    /// Radio conditions changed while the simulator runs; when set, `radio` is ignored.
    pub radio_control: Option<RadioControl>,
    pub poll: Option<PollSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("master {master} stopped: {reason}")]
    Master { master: String, reason: String },
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `mqtt://host:port` (or `tcp://`) into host and port.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), SimError> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| SimError::Config(format!("MQTT URL {url:?} must start with mqtt://")))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| SimError::Config(format!("MQTT URL {url:?} has a bad port")))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() {
        return Err(SimError::Config(format!("MQTT URL {url:?} has no host")));
    }
    Ok((host.to_string(), port))
}

/// MQTT options as the simulator uses them: keep-alive, TCP_NODELAY is set on the event loop.
pub fn mqtt_options(url: &str, client_id: &str) -> Result<rumqttc::MqttOptions, SimError> {
    let (host, port) = parse_mqtt_url(url)?;
    let mut options = rumqttc::MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(MQTT_KEEP_ALIVE_S));
    options.set_clean_session(true);
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    Ok(options)
}

/// An event loop with TCP_NODELAY: without it a QoS 1 round trip waits on Nagle's algorithm.
pub fn mqtt_client(options: rumqttc::MqttOptions) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, MQTT_REQUESTS_MAX);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

fn qos(q: Qos) -> rumqttc::QoS {
    match q {
        Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
    }
}

/// Runs every configured master with its slaves until `shutdown` completes, then publishes
/// each master's offline status and returns. A master that fails stops the whole run.
pub async fn run(
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SimError> {
    if config.masters.is_empty() {
        return Err(SimError::Config("no master configured".into()));
    }
    if config.mqtt_url.is_none() && config.poll.is_none() {
        return Err(SimError::Config(
            "need an MQTT URL, an HTTP poll configuration, or both".into(),
        ));
    }
    if let Some(dir) = &config.state_dir {
        std::fs::create_dir_all(dir).map_err(|e| SimError::State {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut masters = JoinSet::new();
    for spec in &config.masters {
        let config = config.clone();
        let spec = spec.clone();
        let stop = stop_rx.clone();
        masters.spawn(async move { run_master(config, spec, stop).await });
    }
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        Some(done) = masters.join_next() => match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(SimError::Master { master: "?".into(), reason: e.to_string() }),
        },
    };
    let _ = stop_tx.send(true);
    while let Some(done) = masters.join_next().await {
        if let Ok(Err(e)) = done {
            warn!(error = %e, "master stopped with an error");
        }
    }
    outcome
}

/// Inputs of one master's core, from its helper tasks.
enum Inbound {
    Connected,
    Message { topic: String, payload: Vec<u8> },
    Polled(Vec<SlaveCommandRow>),
}

async fn run_master(
    config: SimConfig,
    spec: MasterSpec,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SimError> {
    let master_id = spec.id.clone();
    let persisted: MasterState = match &config.state_dir {
        Some(dir) => state::load(&state::master_path(dir, &master_id))?,
        None => MasterState::default(),
    };
    info!(master = %master_id, latched = persisted.emergency_latched, last_counter = ?persisted.last_counter, "master booting");
    let mut core = MasterCore::new(&spec, config.timing, persisted);
    let radio = match &config.radio_control {
        Some(control) => Radio::controlled(control.clone()),
        None => Radio::new(config.radio),
    };
    let mut tasks = JoinSet::new();

    // Slaves, each behind its own radio queue; all answer into the master's queue. Each link
    // keeps its frames in order, as ESP-NOW between two peers does.
    let (to_master, mut master_rx) = radio.channel();
    let mut to_slaves: BTreeMap<MacAddr, Link> = BTreeMap::new();
    for slave_spec in &spec.slaves {
        let (tx, rx) = radio.channel();
        to_slaves.insert(slave_spec.mac, tx);
        let path = config
            .state_dir
            .as_ref()
            .map(|d| state::slave_path(d, &master_id, slave_spec.mac));
        let persisted: SlavePersisted = match &path {
            Some(p) => state::load(p)?,
            None => SlavePersisted::default(),
        };
        let actuation_log = config
            .actuation_log_dir
            .as_ref()
            .map(|d| state::actuation_log_path(d, &master_id, slave_spec.mac));
        tasks.spawn(run_slave(
            slave_spec.clone(),
            config.timing,
            persisted,
            SlaveFiles {
                state: path,
                actuation_log,
            },
            rx,
            to_master.clone(),
            stop.clone(),
        ));
    }

    let (inbox_tx, mut inbox) = mpsc::channel::<Inbound>(MQTT_REQUESTS_MAX);

    let mqtt = match &config.mqtt_url {
        Some(url) => {
            let client_id = format!("esp32-sim-{master_id}");
            let mut options = mqtt_options(url, &client_id)?;
            // The broker login a real master has: its device id, and the password derived from
            // its key (PROTOCOL.md, "Broker credentials").
            options.set_credentials(
                master_id.as_str(),
                crate::sign::broker_password(&spec.key, &master_id),
            );
            let will = Status::last_will()
                .encode()
                .map_err(|e| SimError::Config(e.to_string()))?;
            let status = Topic::Status(master_id.clone());
            options.set_last_will(rumqttc::LastWill::new(
                status.to_string(),
                will,
                qos(status.qos()),
                status.retain(),
            ));
            let (client, eventloop) = mqtt_client(options);
            tasks.spawn(drive_mqtt(
                eventloop,
                client.clone(),
                core.subscriptions(),
                inbox_tx.clone(),
                stop.clone(),
                master_id.to_string(),
            ));
            Some(client)
        }
        None => None,
    };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(HTTP_TIMEOUT_MS))
        .build()
        .map_err(|e| SimError::Config(format!("HTTP client: {e}")))?;
    if let Some(poll) = &config.poll {
        tasks.spawn(drive_poll(
            http.clone(),
            poll.clone(),
            master_id.to_string(),
            inbox_tx.clone(),
            stop.clone(),
        ));
    }
    drop(inbox_tx);

    let timing = config.timing;
    let mut telemetry =
        tokio::time::interval(Duration::from_millis(timing.telemetry_interval_ms.max(1)));
    telemetry.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(timing.heartbeat_interval_ms.max(1)));
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let retry_every = Duration::from_millis((timing.frame_ack_timeout_ms / 4).max(5));
    let mut retry = tokio::time::interval(retry_every);
    retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut connected = config.mqtt_url.is_none();

    let io = MasterIo {
        master: master_id.to_string(),
        mqtt: mqtt.clone(),
        to_slaves,
        http,
        poll: config.poll.clone(),
        state_path: config
            .state_dir
            .as_ref()
            .map(|d| state::master_path(d, &master_id)),
    };

    loop {
        let outputs = tokio::select! {
            _ = stop.changed() => break,
            Some(inbound) = inbox.recv() => match inbound {
                Inbound::Connected => {
                    connected = true;
                    info!(master = %master_id, "connected to the broker");
                    core.on_connected()
                }
                Inbound::Message { topic, payload } => core.on_mqtt(&topic, &payload, Instant::now(), wall_ms()),
                Inbound::Polled(rows) => core.on_polled(rows, Instant::now(), wall_ms()),
            },
            Some((from, bytes)) = master_rx.recv() => core.on_radio(from, &bytes, Instant::now()),
            _ = telemetry.tick(), if connected && io.mqtt.is_some() => core.telemetry(wall_ms()),
            _ = heartbeat.tick() => core.on_heartbeat(Instant::now()),
            _ = retry.tick() => core.on_retry_tick(Instant::now()),
        };
        io.perform(&mut core, outputs)?;
    }

    if let Some(client) = &mqtt {
        let offline = core.offline_status();
        let _ = io.perform(&mut core, vec![offline]);
        let _ = client.disconnect().await;
    }
    let flush = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(SHUTDOWN_FLUSH_MS), flush)
        .await
        .is_err()
    {
        warn!(master = %master_id, "helper tasks did not stop in time");
    }
    info!(master = %master_id, "master stopped");
    Ok(())
}

/// The I/O a master's outputs need.
struct MasterIo {
    master: String,
    mqtt: Option<rumqttc::AsyncClient>,
    to_slaves: BTreeMap<MacAddr, Link>,
    http: reqwest::Client,
    poll: Option<PollSpec>,
    state_path: Option<PathBuf>,
}

/// The master's own address on the simulated radio.
const MASTER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);

impl MasterIo {
    fn perform(&self, core: &mut MasterCore, outputs: Vec<Output>) -> Result<(), SimError> {
        let mut outputs: std::collections::VecDeque<Output> = outputs.into();
        while let Some(output) = outputs.pop_front() {
            match output {
                Output::Withdraw { to, command } => {
                    let Some(link) = self.to_slaves.get(&to) else {
                        continue;
                    };
                    let taken = link.withdraw(|bytes| match command {
                        None => true,
                        Some(id) => FrameRepr::from_bytes(bytes).is_ok_and(|f| {
                            matches!(f.body, FrameBody::RelayCommand { command_id, .. } if command_id == id.to_raw())
                        }),
                    });
                    if !taken.is_empty() {
                        debug!(master = %self.master, slave = %to, frames = taken.len(), "withdrew frames that had not left");
                        outputs.extend(core.on_withdrawn(to, &taken, Instant::now()));
                    }
                }
                Output::Publish { topic, payload } => {
                    let Some(client) = &self.mqtt else { continue };
                    debug!(master = %self.master, %topic, bytes = payload.len(), "publish");
                    // Never wait for the broker: while it is away the request queue fills, and a
                    // master that blocks here would stop heartbeating its slaves.
                    if let Err(e) = client.try_publish(
                        topic.to_string(),
                        qos(topic.qos()),
                        topic.retain(),
                        payload,
                    ) {
                        warn!(master = %self.master, %topic, error = %e, "publish dropped");
                    }
                }
                Output::Frame { to, bytes } => match self.to_slaves.get(&to) {
                    Some(link) => link.transmit(MASTER_MAC, &bytes),
                    None => {
                        warn!(master = %self.master, slave = %to, "no radio link to this slave")
                    }
                },
                Output::Complete(completion) => {
                    let Some(poll) = self.poll.clone() else {
                        continue;
                    };
                    let http = self.http.clone();
                    let master = self.master.clone();
                    tokio::spawn(async move { complete(&http, &poll, &master, completion).await });
                }
                Output::Persist(state) => {
                    if let Some(path) = &self.state_path {
                        state::save(path, &state)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where a slave keeps its state and logs what it switched.
struct SlaveFiles {
    state: Option<PathBuf>,
    actuation_log: Option<PathBuf>,
}

/// The relay switches a command frame caused, from the frame and the slave's replies to it.
fn actuations(received: &[u8], replies: &[FrameRepr], at_ms: u64) -> Vec<state::Actuation> {
    let Ok(FrameRepr {
        body:
            FrameBody::RelayCommand {
                command_id,
                relay,
                action,
                duration_s,
            },
        ..
    }) = FrameRepr::from_bytes(received)
    else {
        return Vec::new();
    };
    let applied = replies.iter().any(|r| {
        matches!(r.body, FrameBody::Ack { command_id: c, relay: r, code: crate::frame::AckCode::Applied, .. } if c == command_id && r == relay)
    });
    if !applied {
        return Vec::new();
    }
    let command_id = crate::command_id::CommandId::from_raw(command_id)
        .map(|c| c.to_string())
        .unwrap_or_else(|_| format!("raw:{command_id}"));
    vec![state::Actuation {
        command_id,
        relay,
        action: match action {
            crate::frame::SwitchAction::On => "on".into(),
            crate::frame::SwitchAction::Off => "off".into(),
        },
        duration_s,
        at_ms,
    }]
}

async fn run_slave(
    spec: SlaveSpec,
    timing: MasterTiming,
    persisted: SlavePersisted,
    files: SlaveFiles,
    mut rx: mpsc::Receiver<Airframe>,
    to_master: Link,
    mut stop: watch::Receiver<bool>,
) {
    let silent = Duration::from_millis(timing.master_silent_timeout_ms);
    let (mut node, boot) =
        SlaveNode::boot(&spec, silent, persisted.emergency_latched, Instant::now());
    node.restore_applied(&persisted.applied);
    let state_path = files.state;
    let send = |frames: Vec<FrameRepr>| {
        for frame in frames {
            match frame.to_bytes() {
                Ok(bytes) => to_master.transmit(spec.mac, &bytes),
                Err(e) => error!(slave = %spec.mac, error = %e, "slave built an invalid frame"),
            }
        }
    };
    send(vec![boot]);
    let mut latched = node.emergency_latched();
    loop {
        let frames = tokio::select! {
            _ = stop.changed() => break,
            received = rx.recv() => match received {
                None => break,
                Some((from, bytes)) => match node.on_frame(&bytes, Instant::now()) {
                    Ok(frames) => {
                        let switched = actuations(&bytes, &frames, wall_ms());
                        if !switched.is_empty() {
                            persist_slave(&state_path, &node, &spec);
                        }
                        if let Some(log) = &files.actuation_log {
                            for a in &switched {
                                if let Err(e) = state::append_actuation(log, a) {
                                    error!(slave = %spec.mac, error = %e, "could not log an actuation");
                                }
                            }
                        }
                        frames
                    }
                    Err(e) => {
                        warn!(slave = %spec.mac, %from, error = %e, "dropping a bad frame");
                        Vec::new()
                    }
                },
            },
            () = sleep_until_or_forever(node.next_deadline()) => node.tick(Instant::now()),
        };
        if node.emergency_latched() != latched {
            latched = node.emergency_latched();
            persist_slave(&state_path, &node, &spec);
        }
        send(frames);
    }
}

/// Saves a slave's latch and applied pairs, before its replies leave.
fn persist_slave(path: &Option<PathBuf>, node: &SlaveNode, spec: &SlaveSpec) {
    let Some(path) = path else { return };
    let persisted = SlavePersisted {
        emergency_latched: node.emergency_latched(),
        applied: node.applied(),
    };
    if let Err(e) = state::save(path, &persisted) {
        error!(slave = %spec.mac, error = %e, "could not persist the slave's state");
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn drive_mqtt(
    mut eventloop: rumqttc::EventLoop,
    client: rumqttc::AsyncClient,
    subscriptions: Vec<Topic>,
    inbox: mpsc::Sender<Inbound>,
    mut stop: watch::Receiver<bool>,
    master: String,
) {
    use rumqttc::{Event, Packet};
    let mut stopping = false;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = stop.changed(), if !stopping => {
                // Keep polling so the offline status and the disconnect get out.
                stopping = true;
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                for topic in &subscriptions {
                    if let Err(e) = client
                        .subscribe(topic.to_string(), rumqttc::QoS::AtLeastOnce)
                        .await
                    {
                        warn!(%master, %topic, error = %e, "subscribe failed");
                    }
                }
                let _ = inbox.send(Inbound::Connected).await;
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let _ = inbox
                    .send(Inbound::Message {
                        topic: publish.topic,
                        payload: publish.payload.to_vec(),
                    })
                    .await;
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                if stopping {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if stopping {
                    break;
                }
                warn!(%master, error = %e, "MQTT connection failed; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(MQTT_RECONNECT_DELAY_MS)) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
}

async fn drive_poll(
    http: reqwest::Client,
    poll: PollSpec,
    master: String,
    inbox: mpsc::Sender<Inbound>,
    mut stop: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(Duration::from_millis(poll.interval_ms.max(1)));
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = every.tick() => {}
        }
        let url = format!(
            "{}/rpc/get_and_lock_slave_commands",
            poll.rest_url.trim_end_matches('/')
        );
        let body = serde_json::json!({
            "p_master_device_id": master,
            "p_limit": poll.limit,
            "p_timeout_seconds": poll.lock_timeout_s,
        });
        let response = http
            .post(&url)
            .bearer_auth(&poll.jwt)
            .json(&body)
            .send()
            .await;
        let rows = match response {
            Ok(r) if r.status().is_success() => r.json::<Vec<SlaveCommandRow>>().await,
            Ok(r) => {
                warn!(%master, status = %r.status(), "polling commands failed");
                continue;
            }
            Err(e) => {
                warn!(%master, error = %e, "polling commands failed");
                continue;
            }
        };
        match rows {
            Ok(rows) if rows.is_empty() => {}
            Ok(rows) => {
                info!(%master, count = rows.len(), "polled commands");
                if inbox.send(Inbound::Polled(rows)).await.is_err() {
                    break;
                }
            }
            Err(e) => warn!(%master, error = %e, "polled rows do not have the expected shape"),
        }
    }
}

async fn complete(
    http: &reqwest::Client,
    poll: &PollSpec,
    master: &str,
    completion: master::Completion,
) {
    let base = poll.rest_url.trim_end_matches('/');
    let (url, body) = match &completion.outcome {
        Ok(states) => (
            format!("{base}/rpc/complete_slave_command"),
            serde_json::json!({
                "p_command_id": completion.command_id,
                "p_execution_time_ms": completion.execution_time_ms.min(i32::MAX as u64),
                "p_relay_states": states,
            }),
        ),
        Err(message) => (
            format!("{base}/rpc/fail_slave_command"),
            serde_json::json!({
                "p_command_id": completion.command_id,
                "p_error_message": message,
            }),
        ),
    };
    match http
        .post(&url)
        .bearer_auth(&poll.jwt)
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {
            info!(%master, command_id = completion.command_id, ok = completion.outcome.is_ok(), "reported command completion");
        }
        Ok(r) => {
            warn!(%master, command_id = completion.command_id, status = %r.status(), "reporting completion failed")
        }
        Err(e) => {
            warn!(%master, command_id = completion.command_id, error = %e, "reporting completion failed")
        }
    }
}
