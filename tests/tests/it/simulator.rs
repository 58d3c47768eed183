//! The ESP32 simulator against a real Mosquitto: announce, telemetry, signed commands and their
//! acks, rejections of unsigned, tampered and replayed commands, relay durations, bad input,
//! the emergency latch and the replay counter across restarts, and the last will.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use autocore_stack::{Mosquitto, Role};
use firmware_protocol::frame::SwitchAction;
use firmware_protocol::message::{
    AckErrorCode, AckResult, Announce, CommandAck, Emergency, Online, Payload, RelayAction,
    RelayCommand, RelayLimits, RelayStateReport, StateReason, Status, Telemetry,
};
use firmware_protocol::sim::rumqttc::{self, Event, Packet, QoS};
use firmware_protocol::sim::{
    self, MasterSpec, MasterTiming, RadioSpec, SensorSource, SensorSpec, SimConfig, SlaveSpec,
};
use firmware_protocol::{CommandId, CommandSigner, DeviceId, MacAddr, MasterKey, Topic};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const KEY_HEX: &str = "5f1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
/// Every wait for an MQTT message gives up after this long.
const MESSAGE_TIMEOUT_MS: u64 = 10_000;

fn master_id() -> DeviceId {
    DeviceId::new("ESP32_SIM_01").unwrap()
}

fn slave_mac() -> MacAddr {
    "14:33:5C:38:BF:60".parse().unwrap()
}

fn key() -> MasterKey {
    MasterKey::from_hex(KEY_HEX).unwrap()
}

fn config(mqtt_url: &str, state_dir: Option<&Path>) -> SimConfig {
    SimConfig {
        mqtt_url: Some(mqtt_url.to_string()),
        masters: vec![MasterSpec {
            id: master_id(),
            key: key(),
            slaves: vec![SlaveSpec {
                mac: slave_mac(),
                relays: vec![
                    RelayLimits {
                        max_on_s: 3600,
                        boot_on: false
                    };
                    4
                ],
            }],
            sensors: vec![SensorSpec {
                name: "ph".into(),
                unit: Some("pH".into()),
                source: SensorSource::Ramp {
                    from: 6.8,
                    to: 6.0,
                    steps: 4,
                },
            }],
        }],
        timing: MasterTiming {
            telemetry_interval_ms: 100,
            heartbeat_interval_ms: 200,
            master_silent_timeout_ms: 5_000,
            slave_offline_after_ms: 1_000,
            frame_ack_timeout_ms: 200,
            frame_attempts_max: 5,
        },
        radio: RadioSpec::default(),
        state_dir: state_dir.map(Path::to_path_buf),
        actuation_log_dir: None,
        radio_control: None,
        poll: None,
    }
}

/// [`config`] for `broker`, with the master's login there.
fn config_on(broker: &Mosquitto, state_dir: Option<&Path>) -> SimConfig {
    let config = config(&broker.url(), state_dir);
    broker.add_sim_masters(&config).unwrap();
    config
}

/// A running simulator and the means to stop it cleanly.
struct RunningSim {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), sim::SimError>>,
}

impl RunningSim {
    fn start(config: SimConfig) -> RunningSim {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sim::run(config, async move {
            let _ = stopped.await;
        }));
        RunningSim {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the simulator stops within 10 s")
            .expect("the simulator task did not panic");
        result.expect("the simulator stopped without an error");
    }
}

/// A test's own MQTT client with the agent's rights (it sends commands and emergency stops),
/// subscribed to everything under `autocore/`.
struct Observer {
    client: rumqttc::AsyncClient,
    messages: mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
}

impl Observer {
    async fn connect(broker: &Mosquitto, name: &str) -> Observer {
        let login = broker.login(Role::Agent, name).unwrap();
        let mut options = sim::mqtt_options(&broker.url(), name).unwrap();
        options.set_credentials(login.username, login.password);
        let (client, mut eventloop) = sim::mqtt_client(options);
        let (tx, messages) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = oneshot::channel();
        client
            .subscribe("autocore/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec(), p.retain)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_millis(MESSAGE_TIMEOUT_MS), subscribed)
            .await
            .expect("the observer subscribes in time")
            .unwrap();
        Observer { client, messages }
    }

    /// The next message on `topic` that `accept` takes, within the timeout.
    async fn wait_for<T>(
        &mut self,
        topic: &Topic,
        what: &str,
        mut accept: impl FnMut(&[u8]) -> Option<T>,
    ) -> T {
        let topic = topic.to_string();
        let wait = async {
            loop {
                let (t, payload, _) = self.messages.recv().await.expect("observer alive");
                if t == topic
                    && let Some(value) = accept(&payload)
                {
                    return value;
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(MESSAGE_TIMEOUT_MS), wait)
            .await
            .unwrap_or_else(|_| panic!("no {what} on {topic} within {MESSAGE_TIMEOUT_MS} ms"))
    }

    async fn wait_online(&mut self) -> Status {
        self.wait_for(&Topic::Status(master_id()), "online status", |p| {
            Status::decode(p)
                .ok()
                .filter(|s| s.status == Online::Online)
        })
        .await
    }

    async fn ack_for(&mut self, id: CommandId) -> CommandAck {
        self.wait_for(&Topic::Ack(master_id()), "ack", |p| {
            CommandAck::decode(p)
                .ok()
                .filter(|a| a.command_id == Some(id))
        })
        .await
    }

    async fn publish(&self, topic: &Topic, payload: Vec<u8>) {
        self.client
            .publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    async fn publish_retained(&self, topic: &Topic, payload: Vec<u8>) {
        self.client
            .publish(topic.to_string(), QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
    }

    async fn send_command(&self, command: &RelayCommand) {
        self.publish(&Topic::Command(master_id()), command.encode().unwrap())
            .await;
    }
}

fn far_future_ms() -> u64 {
    4_000_000_000_000
}

fn command(id: i64, relay: u8, action: SwitchAction, duration_s: u32) -> RelayCommand {
    RelayCommand::unsigned(
        CommandId::backend(id).unwrap(),
        master_id(),
        slave_mac(),
        vec![RelayAction {
            relay,
            action,
            duration_s,
        }],
        far_future_ms(),
    )
}

fn signer() -> CommandSigner {
    CommandSigner::new(key(), 1)
}

/// Log lines the simulator writes while the guard lives. Tokio tests run on one thread, so a
/// thread-local subscriber sees every task of the simulator.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let log = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || log.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn the_simulator_announces_itself_and_reports_telemetry_that_ramps() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-announce").await;
    let sim = RunningSim::start(config_on(&broker, None));

    let announce = observer
        .wait_for(&Topic::Announce(master_id()), "announce", |p| {
            Announce::decode(p).ok()
        })
        .await;
    assert_eq!(announce.device_id, master_id());
    assert_eq!(announce.slaves.len(), 1);
    assert_eq!(announce.slaves[0].relay_count, 4);
    assert_eq!(announce.sensors, vec!["ph".to_string()]);
    let status = observer.wait_online().await;
    assert_eq!(status.emergency_latched, Some(false));

    let mut values = Vec::new();
    while values.len() < 6 {
        let t = observer
            .wait_for(&Topic::Telemetry(master_id()), "telemetry", |p| {
                Telemetry::decode(p).ok()
            })
            .await;
        assert_eq!(t.readings["ph"].unit.as_deref(), Some("pH"));
        values.push(t.readings["ph"].value);
    }
    assert!((values[0] - 6.8).abs() < 1e-9, "{values:?}");
    assert!(values.windows(2).all(|w| w[1] <= w[0]), "{values:?}");
    assert!(
        (values[5] - 6.0).abs() < 1e-9,
        "the ramp holds at its end: {values:?}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn the_simulator_executes_a_signed_command_and_acks_it_with_relay_states() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-exec").await;
    let sim = RunningSim::start(config_on(&broker, None));
    observer.wait_online().await;

    let sealed = signer().seal(command(101, 1, SwitchAction::On, 600));
    observer.send_command(&sealed).await;
    let ack = observer.ack_for(sealed.command_id).await;
    assert_eq!(ack.result, AckResult::Completed, "{ack:?}");
    assert_eq!(ack.slave_mac, Some(slave_mac()));
    assert_eq!(ack.relay_states, vec![false, true, false, false]);
    assert!(ack.execution_time_ms < 5_000);

    let report = observer
        .wait_for(&Topic::RelayState(master_id()), "relay states", |p| {
            RelayStateReport::decode(p)
                .ok()
                .filter(|r| r.slaves[0].relay_states[1])
        })
        .await;
    assert!(report.slaves[0].online);
    sim.stop().await;
}

#[tokio::test]
async fn the_simulator_rejects_unsigned_tampered_and_replayed_commands_in_its_ack_and_log() {
    let broker = Mosquitto::start().unwrap();
    let log = CapturedLog::default();
    let _guard = log.install();
    let mut observer = Observer::connect(&broker, "observer-reject").await;
    let sim = RunningSim::start(config_on(&broker, None));
    observer.wait_online().await;
    let mut signer = signer();

    let unsigned = command(201, 0, SwitchAction::On, 60);
    observer.send_command(&unsigned).await;
    let ack = observer.ack_for(unsigned.command_id).await;
    assert_eq!(ack.result, AckResult::Rejected);
    assert_eq!(ack.error.unwrap().code, AckErrorCode::Unsigned);

    let mut tampered = signer.seal(command(202, 0, SwitchAction::On, 60));
    tampered.actions[0].duration_s = 86_400;
    observer.send_command(&tampered).await;
    let ack = observer.ack_for(tampered.command_id).await;
    assert_eq!(ack.result, AckResult::Rejected);
    assert_eq!(ack.error.unwrap().code, AckErrorCode::BadSignature);

    let wrong_key = CommandSigner::new(MasterKey::from_hex(&"ab".repeat(32)).unwrap(), 50)
        .seal(command(203, 0, SwitchAction::On, 60));
    observer.send_command(&wrong_key).await;
    let ack = observer.ack_for(wrong_key.command_id).await;
    assert_eq!(ack.error.unwrap().code, AckErrorCode::BadSignature);

    let good = signer.seal(command(204, 0, SwitchAction::On, 60));
    observer.send_command(&good).await;
    assert_eq!(
        observer.ack_for(good.command_id).await.result,
        AckResult::Completed
    );
    observer.send_command(&good).await;
    let ack = observer.ack_for(good.command_id).await;
    assert_eq!(ack.result, AckResult::Rejected);
    assert_eq!(ack.error.unwrap().code, AckErrorCode::Replayed);

    let text = log.text();
    assert!(
        text.contains("rejected command: command is unsigned"),
        "{text}"
    );
    assert!(
        text.contains("rejected command: signature does not match"),
        "{text}"
    );
    assert!(text.contains("replayed or stale"), "{text}");
    assert!(!text.contains(KEY_HEX), "the key never reaches the log");
    sim.stop().await;
}

#[tokio::test]
async fn the_simulator_switches_a_relay_off_when_its_duration_ends() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-duration").await;
    let sim = RunningSim::start(config_on(&broker, None));
    observer.wait_online().await;

    let sealed = signer().seal(command(301, 2, SwitchAction::On, 1));
    observer.send_command(&sealed).await;
    let ack = observer.ack_for(sealed.command_id).await;
    assert_eq!(ack.relay_states, vec![false, false, true, false]);
    let report = observer
        .wait_for(&Topic::RelayState(master_id()), "relay switched off", |p| {
            RelayStateReport::decode(p)
                .ok()
                .filter(|r| r.slaves[0].reason == StateReason::DurationEnded)
        })
        .await;
    assert_eq!(report.slaves[0].relay_states, vec![false; 4]);
    sim.stop().await;
}

#[tokio::test]
async fn the_simulator_answers_bad_payloads_with_typed_rejections_and_keeps_serving() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-bad").await;
    let sim = RunningSim::start(config_on(&broker, None));
    observer.wait_online().await;

    let good = signer().seal(command(401, 3, SwitchAction::On, 60));
    let good_bytes = good.encode().unwrap();
    let mut wrong_version: serde_json::Value = serde_json::from_slice(&good_bytes).unwrap();
    wrong_version["v"] = serde_json::json!(2);
    // No oversized case: the broker drops a payload over PAYLOAD_BYTES_MAX before any master
    // sees it (broker.rs).
    let bad_inputs: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good_bytes[..good_bytes.len() - 5].to_vec()),
        ("wrong version", serde_json::to_vec(&wrong_version).unwrap()),
        ("random bytes", vec![0x93, 0x00, 0xff, 0x10, 0x7b]),
        ("empty", vec![]),
    ];
    for (what, payload) in bad_inputs {
        observer
            .publish(&Topic::Command(master_id()), payload)
            .await;
        let ack = observer
            .wait_for(&Topic::Ack(master_id()), "rejection", |p| {
                CommandAck::decode(p).ok()
            })
            .await;
        assert_eq!(ack.result, AckResult::Rejected, "{what}");
        let error = ack.error.unwrap();
        assert_eq!(error.code, AckErrorCode::Malformed, "{what}");
        assert!(!error.message.is_empty(), "{what}");
    }
    // Garbage where a reset is expected is ignored, and the simulator is still there.
    observer
        .publish(&Topic::EmergencyReset, b"not json".to_vec())
        .await;

    observer.send_command(&good).await;
    let ack = observer.ack_for(good.command_id).await;
    assert_eq!(ack.result, AckResult::Completed);
    assert!(ack.relay_states[3]);
    sim.stop().await;
}

#[tokio::test]
async fn an_emergency_stop_switches_everything_off_and_stays_latched_across_a_restart() {
    let broker = Mosquitto::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut observer = Observer::connect(&broker, "observer-emergency").await;
    let sim = RunningSim::start(config_on(&broker, Some(state.path())));
    observer.wait_online().await;
    let mut signer = signer();

    let on = signer.seal(command(501, 0, SwitchAction::On, 600));
    observer.send_command(&on).await;
    assert!(observer.ack_for(on.command_id).await.relay_states[0]);

    observer
        .publish_retained(
            &Topic::EmergencyStop,
            Emergency::new("test button").encode().unwrap(),
        )
        .await;
    observer
        .wait_for(&Topic::RelayState(master_id()), "everything off", |p| {
            RelayStateReport::decode(p).ok().filter(|r| {
                r.slaves[0].emergency_latched && r.slaves[0].relay_states.iter().all(|s| !s)
            })
        })
        .await;
    sim.stop().await;

    // Clear the retained stop, so only the persisted latch can keep the nodes stopped.
    observer
        .publish_retained(&Topic::EmergencyStop, Vec::new())
        .await;
    let sim = RunningSim::start(config_on(&broker, Some(state.path())));
    let status = observer.wait_online().await;
    assert_eq!(status.emergency_latched, Some(true));

    let refused = signer.seal(command(502, 0, SwitchAction::On, 600));
    observer.send_command(&refused).await;
    let ack = observer.ack_for(refused.command_id).await;
    assert_eq!(ack.result, AckResult::Rejected);
    assert_eq!(ack.error.unwrap().code, AckErrorCode::EmergencyLatched);

    observer
        .publish(
            &Topic::EmergencyReset,
            Emergency::new("all clear").encode().unwrap(),
        )
        .await;
    observer
        .wait_for(&Topic::Status(master_id()), "unlatched status", |p| {
            Status::decode(p)
                .ok()
                .filter(|s| s.emergency_latched == Some(false))
        })
        .await;
    let allowed = signer.seal(command(503, 0, SwitchAction::On, 600));
    observer.send_command(&allowed).await;
    let ack = observer.ack_for(allowed.command_id).await;
    assert_eq!(ack.result, AckResult::Completed, "{ack:?}");
    sim.stop().await;
}

#[tokio::test]
async fn a_master_keeps_its_replay_counter_and_applied_ids_across_a_restart() {
    let broker = Mosquitto::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut observer = Observer::connect(&broker, "observer-counter").await;
    let sim = RunningSim::start(config_on(&broker, Some(state.path())));
    observer.wait_online().await;
    let mut signer = signer();

    let first = signer.seal(command(601, 0, SwitchAction::On, 600));
    observer.send_command(&first).await;
    assert_eq!(
        observer.ack_for(first.command_id).await.result,
        AckResult::Completed
    );
    sim.stop().await;

    let sim = RunningSim::start(config_on(&broker, Some(state.path())));
    observer.wait_online().await;
    observer.send_command(&first).await;
    let ack = observer.ack_for(first.command_id).await;
    assert_eq!(ack.error.unwrap().code, AckErrorCode::Replayed);
    // The same id signed again with a fresh counter is not applied twice either.
    let again = signer.seal(command(601, 0, SwitchAction::On, 600));
    observer.send_command(&again).await;
    assert_eq!(
        observer.ack_for(again.command_id).await.result,
        AckResult::Duplicate
    );
    sim.stop().await;
}

#[tokio::test]
async fn the_broker_publishes_the_last_will_when_a_master_vanishes() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-will").await;
    let sim = RunningSim::start(config_on(&broker, None));
    observer.wait_online().await;

    // Aborting drops the connection without a DISCONNECT, as a power cut would.
    sim.task.abort();
    let status = observer
        .wait_for(&Topic::Status(master_id()), "last will", |p| {
            Status::decode(p)
                .ok()
                .filter(|s| s.status == Online::Offline)
        })
        .await;
    assert_eq!(status.reason.as_deref(), Some("connection lost"));
}

#[tokio::test]
async fn a_clean_shutdown_publishes_an_offline_status() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-shutdown").await;
    let sim = RunningSim::start(config_on(&broker, None));
    observer.wait_online().await;
    sim.stop().await;
    let status = observer
        .wait_for(&Topic::Status(master_id()), "offline status", |p| {
            Status::decode(p)
                .ok()
                .filter(|s| s.status == Online::Offline)
        })
        .await;
    assert_eq!(status.reason.as_deref(), Some("shutdown"));
}

/// Polls `sql` until it returns `expected` or the timeout passes; the backend has no event to
/// wait on, so this is the event.
async fn wait_for_sql(world: &crate::support::World, sql: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(MESSAGE_TIMEOUT_MS);
    loop {
        let got = world.sql(sql).join("\n");
        if got == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sql} gave {got:?}, not {expected:?}, within {MESSAGE_TIMEOUT_MS} ms"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_polling_master_runs_backend_commands_and_reports_completion_and_failure() {
    use crate::support::{ALICE, World};
    let world = World::start();
    let master = "ESP32_ALICE_1";
    let id_ok = world.sql_one(&format!(
        "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
         values ('{master}', '14:33:5C:38:BF:60', array[1], array['on'], array[60]) returning id"
    ));
    let id_bad_relay = world.sql_one(&format!(
        "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
         values ('{master}', '14:33:5C:38:BF:60', array[9], array['on'], array[60]) returning id"
    ));
    let token = world
        .stack
        .token(&autocore_stack::Claims::master(ALICE, master));
    let mut config = config("mqtt://127.0.0.1:1", None);
    config.mqtt_url = None;
    config.masters[0].id = DeviceId::new(master).unwrap();
    config.poll = Some(sim::PollSpec {
        rest_url: world.stack.rest_url().unwrap(),
        jwt: token,
        interval_ms: 100,
        limit: 5,
        lock_timeout_s: 30,
    });
    let sim = RunningSim::start(config);

    wait_for_sql(
        &world,
        &format!("select status, execution_time_ms is not null from relay_commands_slave where id = {id_ok}"),
        "completed|t",
    )
    .await;
    wait_for_sql(
        &world,
        &format!("select status, error_message like '%relay%' from relay_commands_slave where id = {id_bad_relay}"),
        "failed|t",
    )
    .await;
    sim.stop().await;
}

#[tokio::test]
async fn commands_get_through_a_lossy_slow_radio_and_each_is_applied_once() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-lossy").await;
    let mut config = config_on(&broker, None);
    config.radio = RadioSpec {
        loss_percent: 20,
        delay_ms: 5,
    };
    // With 20 % loss each way a round trip succeeds 64 % of the time; ten attempts fail with a
    // probability of 4e-5. The ack timeout is far above the radio's 5 ms so that a busy machine
    // (CI beside other work) delays acks without using up attempts; a late ack only means a
    // resent frame, which the slave must apply once all the same.
    config.timing.frame_attempts_max = 10;
    config.timing.frame_ack_timeout_ms = 1_000;
    let sim = RunningSim::start(config);
    observer.wait_online().await;
    let mut signer = signer();

    for (id, relay) in [(701, 0u8), (702, 1), (703, 2)] {
        let sealed = signer.seal(command(id, relay, SwitchAction::On, 600));
        observer.send_command(&sealed).await;
        let ack = observer.ack_for(sealed.command_id).await;
        assert_eq!(ack.result, AckResult::Completed, "{ack:?}");
        assert!(ack.relay_states[usize::from(relay)], "{ack:?}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn two_masters_run_side_by_side_each_accepting_only_its_own_key() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-two").await;
    let second_id = DeviceId::new("ESP32_SIM_02").unwrap();
    let second_key_hex = "77".repeat(32);
    let mut config = config_on(&broker, None);
    let mut second = config.masters[0].clone();
    second.id = second_id.clone();
    second.key = MasterKey::from_hex(&second_key_hex).unwrap();
    config.masters.push(second);
    broker.add_sim_masters(&config).unwrap();
    let sim = RunningSim::start(config);
    observer
        .wait_for(
            &Topic::Status(second_id.clone()),
            "second master online",
            |p| {
                Status::decode(p)
                    .ok()
                    .filter(|s| s.status == Online::Online)
            },
        )
        .await;

    // Signed with the first master's key: the second master refuses it.
    let mut for_second = command(801, 0, SwitchAction::On, 60);
    for_second.master_id = second_id.clone();
    let wrong = signer().seal(for_second.clone());
    observer
        .publish(&Topic::Command(second_id.clone()), wrong.encode().unwrap())
        .await;
    let ack = observer
        .wait_for(&Topic::Ack(second_id.clone()), "rejection", |p| {
            CommandAck::decode(p).ok()
        })
        .await;
    assert_eq!(ack.error.unwrap().code, AckErrorCode::BadSignature);

    let right =
        CommandSigner::new(MasterKey::from_hex(&second_key_hex).unwrap(), 1).seal(RelayCommand {
            command_id: CommandId::backend(802).unwrap(),
            ..for_second
        });
    observer
        .publish(&Topic::Command(second_id.clone()), right.encode().unwrap())
        .await;
    let ack = observer
        .wait_for(&Topic::Ack(second_id.clone()), "ack", |p| {
            CommandAck::decode(p).ok()
        })
        .await;
    assert_eq!(ack.result, AckResult::Completed, "{ack:?}");
    sim.stop().await;
}

fn command_for(id: i64, actions: &[(u8, SwitchAction, u32)]) -> RelayCommand {
    let mut command = command(id, actions[0].0, actions[0].1, actions[0].2);
    command.actions = actions
        .iter()
        .map(|&(relay, action, duration_s)| RelayAction {
            relay,
            action,
            duration_s,
        })
        .collect();
    command
}

/// The agent's end-to-end setup: a radio with a small delay, on a runtime with several threads.
/// A radio that let one frame overtake another left the master with the states of whichever ack
/// arrived last, e.g. [false, false, true, false] after switching relays 0 and 2 on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_two_relays_switches_both_and_acks_both_states() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-two-relays").await;
    let mut config = config_on(&broker, None);
    config.radio = RadioSpec {
        loss_percent: 0,
        delay_ms: 1,
    };
    let heartbeat_ms = config.timing.heartbeat_interval_ms;
    let sim = RunningSim::start(config);
    observer.wait_online().await;
    let mut signer = signer();
    let on = SwitchAction::On;
    let off = SwitchAction::Off;

    let both = signer.seal(command_for(901, &[(0, on, 30), (2, on, 30)]));
    observer.send_command(&both).await;
    let ack = observer.ack_for(both.command_id).await;
    assert_eq!(ack.result, AckResult::Completed, "{ack:?}");
    assert_eq!(ack.slave_mac, Some(slave_mac()));
    assert_eq!(ack.relay_states, vec![true, false, true, false], "{ack:?}");

    // The slave itself holds both on: after a few heartbeats (each answered with the slave's
    // states) a late subscriber's retained relay states still show them.
    tokio::time::sleep(Duration::from_millis(3 * heartbeat_ms)).await;
    let mut late = Observer::connect(&broker, "observer-two-relays-late").await;
    let report = late
        .wait_for(&Topic::RelayState(master_id()), "relay states", |p| {
            RelayStateReport::decode(p).ok()
        })
        .await;
    assert!(report.slaves[0].online, "{report:?}");
    assert_eq!(
        report.slaves[0].relay_states,
        vec![true, false, true, false],
        "{report:?}"
    );

    // The same command again (same id, new counter) is a duplicate and switches nothing.
    let again = signer.seal(command_for(901, &[(0, on, 30), (2, on, 30)]));
    observer.send_command(&again).await;
    let ack = observer.ack_for(again.command_id).await;
    assert_eq!(ack.result, AckResult::Duplicate, "{ack:?}");
    assert_eq!(ack.relay_states, vec![true, false, true, false], "{ack:?}");

    // More pairs, in either order, each from every relay off: each ack shows exactly its pair.
    for (id, relays) in [(902, [3u8, 1]), (903, [2, 0]), (904, [1, 2])] {
        let all_off: Vec<(u8, SwitchAction, u32)> = (0..4).map(|r| (r, off, 0)).collect();
        let clear = signer.seal(command_for(id + 100, &all_off));
        observer.send_command(&clear).await;
        let ack = observer.ack_for(clear.command_id).await;
        assert_eq!(ack.relay_states, vec![false; 4], "{ack:?}");

        let pair = signer.seal(command_for(id, &[(relays[0], on, 30), (relays[1], on, 30)]));
        observer.send_command(&pair).await;
        let ack = observer.ack_for(pair.command_id).await;
        assert_eq!(ack.result, AckResult::Completed, "{ack:?}");
        let expected: Vec<bool> = (0..4u8).map(|r| relays.contains(&r)).collect();
        assert_eq!(ack.relay_states, expected, "command {id}: {ack:?}");
    }
    sim.stop().await;
}

/// The reported case: with a slow radio (1.5 s a frame) a relay-on was still queued when the
/// stop latched, was acked `failed`, and then switched the relay on at the slave before the stop
/// frame arrived. Now the latching master withdraws what it queued, so the stop goes first and
/// the command, which never left, ends failed for the stop and never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_on_a_slow_radio_withdraws_what_was_queued_and_nothing_switches_on_after_it() {
    let broker = Mosquitto::start().unwrap();
    let mut observer = Observer::connect(&broker, "observer-slow-stop").await;
    let mut slow = config_on(&broker, None);
    slow.radio = RadioSpec {
        loss_percent: 0,
        delay_ms: 1_500,
    };
    let sim = RunningSim::start(slow);
    observer.wait_online().await;
    let mut signer = signer();
    let on = signer.seal(command(601, 0, SwitchAction::On, 600));
    observer.send_command(&on).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    observer
        .publish_retained(
            &Topic::EmergencyStop,
            Emergency::new("slow radio").encode().unwrap(),
        )
        .await;
    let ack = observer.ack_for(on.command_id).await;
    assert_eq!(ack.result, AckResult::Failed, "{ack:?}");
    assert_eq!(
        ack.error.map(|e| e.code),
        Some(AckErrorCode::EmergencyLatched),
        "withdrawn by the stop, not timed out"
    );
    // Twice the radio's round trip: no report ever shows the relay on.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let state_topic = Topic::RelayState(master_id()).to_string();
    let mut reports = 0;
    while let Ok(Some((topic, payload, _))) =
        tokio::time::timeout_at(deadline, observer.messages.recv()).await
    {
        if topic == state_topic
            && let Ok(report) = RelayStateReport::decode(&payload)
        {
            reports += 1;
            assert!(
                !report.slaves[0]
                    .relay_states
                    .first()
                    .copied()
                    .unwrap_or(false),
                "relay 0 came on after the stop: {report:?}"
            );
        }
    }
    assert!(reports > 0, "the slave's states were reported");
    observer
        .publish_retained(&Topic::EmergencyStop, Vec::new())
        .await;
    sim.stop().await;
}
