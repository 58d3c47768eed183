//! The broker as a trust boundary: on the secured Mosquitto (anonymous off, the password file and
//! ACL of `autocore_agent::broker`) a client without a login cannot connect, one master cannot
//! speak or listen for another, only the agent commands, nobody can take the agent's session,
//! oversized payloads are dropped, and `autocore-agent broker-config`'s files work on a real
//! Mosquitto. `AUTOCORE_OPEN_BROKER=1` starts the harness's broker open, where these tests fail.

use std::time::Duration;

use autocore_stack::{Login, Role};
use firmware_protocol::sim::rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
};
use firmware_protocol::{DeviceId, MasterKey};
use tokio::sync::mpsc;

use crate::support::{
    MASTER, SLAVE, World, eventually, insert_command, master_toml, one_master_sim, start_agent,
    start_sim, until_status,
};

const KEY_HEX: &str = "3b1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
/// Master B: has a login of its own on the broker, and tries to act for MASTER (A).
const OTHER: &str = "ESP32_OTHER";
const OTHER_KEY_HEX: &str = "bb1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const WAIT: Duration = Duration::from_secs(15);

fn options(mqtt_url: &str, client_id: &str, login: Option<&Login>) -> MqttOptions {
    let (host, port) = firmware_protocol::sim::parse_mqtt_url(mqtt_url).unwrap();
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some(login) = login {
        options.set_credentials(login.username.as_str(), login.password.as_str());
    }
    options
}

/// A connected test client: what it received, in order.
struct Client {
    client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Packet>,
    received: Vec<Publish>,
    session_present: bool,
}

/// Connects, and returns the broker's refusal if it refuses.
async fn connect(options: MqttOptions) -> Result<Client, ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let session_present = loop {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("the broker answers the CONNECT")?
        {
            Event::Incoming(Packet::ConnAck(ack)) => break ack.session_present,
            _ => continue,
        }
    };
    let (tx, packets) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // No reconnection: a client the broker drops stays dropped.
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(packet) = event
                && tx.send(packet).is_err()
            {
                break;
            }
        }
    });
    Ok(Client {
        client,
        packets,
        received: Vec::new(),
        session_present,
    })
}

impl Client {
    async fn with(mqtt_url: &str, login: &Login) -> Client {
        connect(options(mqtt_url, &login.username, Some(login)))
            .await
            .unwrap_or_else(|e| panic!("{} connects: {e}", login.username))
    }

    /// Subscribes and waits for the SUBACK; messages arriving meanwhile are kept.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        self.next_packet_until(|p| matches!(p, Packet::SubAck(_)), "SUBACK")
            .await;
    }

    async fn next_packet_until(&mut self, done: impl Fn(&Packet) -> bool, what: &str) {
        let wait = async {
            loop {
                let packet = self.packets.recv().await.expect("the client is connected");
                let stop = done(&packet);
                if let Packet::Publish(p) = packet {
                    self.received.push(p);
                }
                if stop {
                    return;
                }
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"));
    }

    /// Waits for a message on `topic` whose payload contains `text`.
    async fn wait_for(&mut self, topic: &str, text: &str) {
        let found = |p: &Publish| p.topic == topic && contains(&p.payload, text);
        if self.received.iter().any(found) {
            return;
        }
        self.next_packet_until(
            |p| matches!(p, Packet::Publish(p) if found(p)),
            &format!("{text:?} on {topic}"),
        )
        .await;
    }

    async fn publish(&self, topic: &str, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .unwrap();
    }

    /// Publishes at QoS 1 and waits for the PUBACK: Mosquitto has routed the message (or
    /// dropped it) by then, so what a subscriber gets from it is queued before anything published
    /// afterwards.
    async fn publish_acked(&mut self, topic: &str, retain: bool, payload: impl Into<Vec<u8>>) {
        self.publish(topic, retain, payload).await;
        self.next_packet_until(|p| matches!(p, Packet::PubAck(_)), "PUBACK")
            .await;
    }

    /// Messages received so far whose payload contains `text`, as `topic: payload`.
    fn received_with(&self, text: &str) -> Vec<String> {
        self.received
            .iter()
            .filter(|p| contains(&p.payload, text))
            .map(|p| format!("{}: {}", p.topic, String::from_utf8_lossy(&p.payload)))
            .collect()
    }
}

fn contains(payload: &[u8], text: &str) -> bool {
    String::from_utf8_lossy(payload).contains(text)
}

fn other_login(world: &World) -> Login {
    world
        .stack
        .broker_master(
            &DeviceId::new(OTHER).unwrap(),
            &MasterKey::from_hex(OTHER_KEY_HEX).unwrap(),
        )
        .unwrap()
}

fn topic(device: &str, leaf: &str) -> String {
    format!("autocore/devices/{device}/{leaf}")
}

/// An agent serving MASTER, and the simulator playing it, both online.
async fn edge(world: &World) -> (crate::support::Agent, tokio::sync::oneshot::Sender<()>) {
    let sim = start_sim(one_master_sim(world, KEY_HEX));
    let agent = start_agent(world, &master_toml(MASTER, KEY_HEX, "mqtt")).await;
    eventually("the master online", WAIT, || {
        (world.sql_one(&format!(
            "select is_online from device_status where device_id = '{MASTER}'"
        )) == "t")
            .then_some(())
    })
    .await;
    (agent, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_login_or_with_a_wrong_password_cannot_connect() {
    let world = World::start_full();
    let url = world.stack.mqtt_url().unwrap();
    let agent = world.stack.broker_login(Role::Agent, "pi-alice").unwrap();

    let anonymous = connect(options(&url, "anonymous", None)).await;
    assert!(
        matches!(anonymous, Err(ConnectionError::ConnectionRefused(_))),
        "no login: {:?}",
        anonymous.err()
    );
    let wrong = Login {
        password: format!("{}x", agent.password),
        ..agent.clone()
    };
    let refused = connect(options(&url, "pi-alice", Some(&wrong))).await;
    assert!(
        matches!(refused, Err(ConnectionError::ConnectionRefused(_))),
        "wrong password: {:?}",
        refused.err()
    );
    let unknown = Login {
        username: "nobody".into(),
        password: agent.password.clone(),
    };
    assert!(matches!(
        connect(options(&url, "nobody", Some(&unknown))).await,
        Err(ConnectionError::ConnectionRefused(_))
    ));
    // The right login is let in.
    Client::with(&url, &agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_masters_login_cannot_publish_telemetry_acks_status_or_announce_for_a_master() {
    let world = World::start_full();
    let url = world.stack.mqtt_url().unwrap();
    let (agent, _sim) = edge(&world).await;
    let monitor = world.stack.broker_login(Role::Monitor, "watch").unwrap();
    let mut watch = Client::with(&url, &monitor).await;
    watch.subscribe("autocore/#").await;
    let other = Client::with(&url, &other_login(&world)).await;

    let forged_ph = 1.234;
    other
        .publish(
            &topic(MASTER, "telemetry"),
            false,
            format!(r#"{{"v":1,"ph":{{"value":{forged_ph},"unit":"pH"}}}}"#),
        )
        .await;
    other
        .publish(
            &topic(MASTER, "ack"),
            false,
            r#"{"v":1,"command_id":"forged-1","result":"completed","execution_time_ms":1}"#,
        )
        .await;
    other
        .publish(
            &topic(MASTER, "status"),
            true,
            r#"{"v":1,"status":"offline","reason":"forged"}"#,
        )
        .await;
    other
        .publish(
            &topic(MASTER, "announce"),
            true,
            format!(
                r#"{{"v":1,"device_id":"{MASTER}","kind":"master","firmware":"forged","slaves":[],"sensors":[],"telemetry_interval_ms":1000}}"#
            ),
        )
        .await;
    // Its own topic is allowed; once this arrives, whatever came before it has been delivered.
    other
        .publish(
            &topic(OTHER, "telemetry"),
            false,
            r#"{"v":1,"marker":{"value":1}}"#,
        )
        .await;
    watch.wait_for(&topic(OTHER, "telemetry"), "marker").await;
    assert_eq!(watch.received_with("1.234"), Vec::<String>::new());
    assert_eq!(watch.received_with("forged"), Vec::<String>::new());

    // A later subscriber gets MASTER's own retained status and announce, not forged ones.
    let late_login = world.stack.broker_login(Role::Monitor, "late").unwrap();
    let mut late = Client::with(&url, &late_login).await;
    late.subscribe(&topic(MASTER, "status")).await;
    late.subscribe(&topic(MASTER, "announce")).await;
    late.wait_for(&topic(MASTER, "announce"), MASTER).await;
    assert_eq!(late.received_with("forged"), Vec::<String>::new());

    // The agent stored MASTER's readings after the forgery, and not the forged one.
    let since = autocore_agent::shared::now_ms();
    let readings = eventually("a reading of the master after the forgery", WAIT, || {
        let store = autocore_agent::store::Store::open(&agent.db).ok()?;
        let all = store.readings_between(MASTER, 0, i64::MAX).ok()?;
        all.iter().any(|r| r.recorded_at_ms > since).then_some(all)
    })
    .await;
    assert!(
        readings.iter().all(|r| (r.value - forged_ph).abs() > 1e-9),
        "the forged reading was stored"
    );
    assert_eq!(
        world.sql_one(&format!(
            "select is_online from device_status where device_id = '{MASTER}'"
        )),
        "t",
        "the forged offline status did not reach the agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_masters_login_does_not_receive_the_commands_sent_to_a_master() {
    let world = World::start_full();
    let url = world.stack.mqtt_url().unwrap();
    let (_agent, _sim) = edge(&world).await;
    let mut other = Client::with(&url, &other_login(&world)).await;
    other.subscribe(&topic(MASTER, "command")).await;
    other.subscribe("autocore/#").await;
    other.subscribe(&topic(OTHER, "command")).await;

    let id = insert_command(&world, MASTER, SLAVE, 2, 5);
    until_status(&world, &id, "completed", WAIT).await;
    // What the agent sends to OTHER itself does reach it: the subscriptions work.
    let agent_rights = world.stack.broker_login(Role::Agent, "tester").unwrap();
    let tester = Client::with(&url, &agent_rights).await;
    tester
        .publish(&topic(OTHER, "command"), false, "marker")
        .await;
    other.wait_for(&topic(OTHER, "command"), "marker").await;
    let theirs: Vec<String> = other
        .received
        .iter()
        .filter(|p| p.topic.contains(MASTER))
        .map(|p| p.topic.clone())
        .collect();
    assert_eq!(theirs, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masters_login_cannot_publish_commands_configs_or_an_emergency_stop() {
    let world = World::start_full();
    let url = world.stack.mqtt_url().unwrap();
    let (_agent, _sim) = edge(&world).await;
    let monitor = world.stack.broker_login(Role::Monitor, "watch").unwrap();
    let mut watch = Client::with(&url, &monitor).await;
    watch.subscribe("autocore/#").await;
    let other = Client::with(&url, &other_login(&world)).await;

    other
        .publish(&topic(MASTER, "command"), false, r#"{"v":1,"forged":true}"#)
        .await;
    other
        .publish(
            &format!("autocore/config/devices/{MASTER}"),
            true,
            r#"{"v":1,"telemetry_interval_ms":60000,"forged":true}"#,
        )
        .await;
    other
        .publish(
            "autocore/emergency/stop",
            true,
            r#"{"v":1,"reason":"forged"}"#,
        )
        .await;
    other
        .publish(
            "autocore/emergency/reset",
            false,
            r#"{"v":1,"reason":"forged"}"#,
        )
        .await;
    other
        .publish(
            &topic(OTHER, "telemetry"),
            false,
            r#"{"v":1,"marker":{"value":1}}"#,
        )
        .await;
    watch.wait_for(&topic(OTHER, "telemetry"), "marker").await;
    assert_eq!(watch.received_with("forged"), Vec::<String>::new());

    // Nothing forged stays retained: a fresh subscriber gets the retained messages of the first
    // SUBSCRIBE before those of the second, which ends with MASTER's own announce.
    let late_login = world.stack.broker_login(Role::Monitor, "late").unwrap();
    let mut late = Client::with(&url, &late_login).await;
    late.subscribe("autocore/config/#").await;
    late.subscribe("autocore/emergency/#").await;
    late.subscribe(&topic(MASTER, "announce")).await;
    late.wait_for(&topic(MASTER, "announce"), MASTER).await;
    assert_eq!(late.received_with("forged"), Vec::<String>::new());

    // No emergency stop latched anywhere: a dashboard command still runs.
    let id = insert_command(&world, MASTER, SLAVE, 1, 5);
    until_status(&world, &id, "completed", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitors_login_reads_everything_and_publishes_nothing() {
    let world = World::start_full();
    let url = world.stack.mqtt_url().unwrap();
    let (_agent, _sim) = edge(&world).await;
    let watch_login = world.stack.broker_login(Role::Monitor, "watch").unwrap();
    let mut watch = Client::with(&url, &watch_login).await;
    watch.subscribe("autocore/#").await;
    watch.wait_for(&topic(MASTER, "telemetry"), "ph").await;

    let tool_login = world.stack.broker_login(Role::Monitor, "tool").unwrap();
    let mut tool = Client::with(&url, &tool_login).await;
    tool.publish_acked(
        "autocore/emergency/stop",
        true,
        r#"{"v":1,"reason":"forged"}"#,
    )
    .await;
    tool.publish_acked(
        &topic(MASTER, "telemetry"),
        false,
        r#"{"v":1,"ph":{"value":1.234,"forged":1}}"#,
    )
    .await;
    tool.publish_acked(&topic(MASTER, "command"), false, r#"{"v":1,"forged":true}"#)
        .await;
    let agent_rights = world.stack.broker_login(Role::Agent, "tester").unwrap();
    let tester = Client::with(&url, &agent_rights).await;
    tester
        .publish(&topic(OTHER, "command"), false, "marker")
        .await;
    watch.wait_for(&topic(OTHER, "command"), "marker").await;
    assert_eq!(watch.received_with("forged"), Vec::<String>::new());

    // The agent was not stopped: a dashboard command still runs.
    let id = insert_command(&world, MASTER, SLAVE, 1, 5);
    until_status(&world, &id, "completed", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_with_the_agents_client_id_does_not_take_its_session_or_kick_it_off() {
    let world = World::start_full();
    let url = world.stack.mqtt_url().unwrap();
    let (_agent, _sim) = edge(&world).await;
    let gateway = "autocore/gateway/pi-alice/status";
    let monitor = world.stack.broker_login(Role::Monitor, "watch").unwrap();
    let mut watch = Client::with(&url, &monitor).await;
    watch.subscribe(gateway).await;
    watch.wait_for(gateway, "online").await;

    // The client id the agent asks for, and its username (the client id the broker gives it).
    let mut intruders = Vec::new();
    for (n, client_id) in ["autocore-agent-pi-alice", "pi-alice"]
        .into_iter()
        .enumerate()
    {
        let intruder_login = world
            .stack
            .broker_login(Role::Monitor, &format!("intruder-{n}"))
            .unwrap();
        let mut intruder_options = options(&url, client_id, Some(&intruder_login));
        intruder_options.set_clean_session(false);
        let intruder = connect(intruder_options)
            .await
            .expect("the intruder connects");
        assert!(
            !intruder.session_present,
            "with client id {client_id} the intruder was handed the agent's persistent session"
        );
        intruders.push(intruder);
    }

    // The agent still commands the master, and never went offline.
    let id = insert_command(&world, MASTER, SLAVE, 0, 5);
    until_status(&world, &id, "completed", WAIT).await;
    assert_eq!(watch.received_with("offline"), Vec::<String>::new());
    drop(intruders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_the_protocols_limit_is_dropped_by_the_broker() {
    let world = World::start_full();
    let url = world.stack.mqtt_url().unwrap();
    let monitor = world.stack.broker_login(Role::Monitor, "watch").unwrap();
    let mut watch = Client::with(&url, &monitor).await;
    watch.subscribe("autocore/#").await;
    let other = Client::with(&url, &other_login(&world)).await;
    let limit = firmware_protocol::message::PAYLOAD_BYTES_MAX;
    let padded = |size: usize, tag: &str| {
        let mut payload = format!(r#"{{"v":1,"{tag}":{{"value":1}},"pad":""#).into_bytes();
        payload.resize(size - 2, b'x');
        payload.extend_from_slice(b"\"}");
        payload
    };
    other
        .publish(&topic(OTHER, "telemetry"), false, padded(limit + 1, "big"))
        .await;
    other
        .publish(&topic(OTHER, "telemetry"), false, padded(limit, "fits"))
        .await;
    watch.wait_for(&topic(OTHER, "telemetry"), "fits").await;
    let sizes: Vec<usize> = watch.received.iter().map(|p| p.payload.len()).collect();
    assert_eq!(
        sizes,
        vec![limit],
        "only the payload within the limit arrives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_broker_config_writes_are_accepted_by_a_real_mosquitto() {
    use autocore_stack::process::{ManagedProcess, ProcessSpec, RunAs};
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("conf.d");
    let agent_password = "a long agent password";
    let toml = dir.path().join("agent.toml");
    std::fs::write(
        &toml,
        format!(
            "[agent]\nid = \"pi-alice\"\n[store]\npath = \"{db}\"\n[cloud]\nrest_url = \"http://127.0.0.1:1\"\njwt = \"x\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nusername = \"autocore\"\npassword = \"{agent_password}\"\n\
             {master}",
            db = dir.path().join("agent.db").display(),
            master = master_toml(MASTER, KEY_HEX, "mqtt"),
        ),
    )
    .unwrap();
    let port = autocore_stack::free_port().unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_autocore-agent-under-test"))
        .args([
            "broker-config",
            "--monitor",
            "watcher",
            "--listener",
            &format!("127.0.0.1:{port}"),
            "-c",
        ])
        .arg(&toml)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("chown mosquitto"), "{stdout}");
    assert!(stdout.contains("reload"), "{stdout}");
    let mode = |name: &str| {
        std::fs::metadata(out.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("passwd"), 0o600);
    assert_eq!(mode("acl"), 0o640);
    assert_eq!(mode("monitor-watcher.secret"), 0o600);
    let monitor = Login {
        username: "watcher".into(),
        password: std::fs::read_to_string(out.join("monitor-watcher.secret"))
            .unwrap()
            .trim()
            .to_string(),
    };

    // The snippet from a conf.d as on Debian, the files owned by Mosquitto's user as the hint
    // says (and the snippet too: here Mosquitto starts as that user, not as root).
    let run_as = RunAs::system_user(&["mosquitto", "nobody"]);
    if let Some(r) = run_as {
        for path in [
            dir.path().to_path_buf(),
            out.clone(),
            out.join("passwd"),
            out.join("acl"),
            out.join("autocore.conf"),
        ] {
            std::os::unix::fs::chown(&path, Some(r.uid), Some(r.gid)).unwrap();
        }
    }
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("log_dest stderr\ninclude_dir {}\n", out.display()),
    )
    .unwrap();
    let mut broker = ManagedProcess::spawn(ProcessSpec {
        name: "mosquitto",
        program: "/usr/sbin/mosquitto".into(),
        args: vec!["-c".into(), conf.display().to_string()],
        env: vec![],
        run_as,
        log_path: dir.path().join("mosquitto.log"),
        stop_signal: nix::sys::signal::Signal::SIGTERM,
    })
    .unwrap();
    let url = format!("mqtt://127.0.0.1:{port}");
    let agent = Login {
        username: "autocore".into(),
        password: agent_password.into(),
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut agent_client = loop {
        match connect(options(&url, "autocore", Some(&agent))).await {
            Ok(client) => break client,
            // Mosquitto is still starting: nothing listens yet.
            Err(ConnectionError::Io(_)) if tokio::time::Instant::now() < deadline => {
                broker.ensure_running().unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the agent's login is refused: {e}\n{}", broker.log_tail()),
        }
    };
    assert!(matches!(
        connect(options(&url, "anonymous", None)).await,
        Err(ConnectionError::ConnectionRefused(_))
    ));
    // The master logs in with its derived password, and the agent hears it come online.
    agent_client.subscribe(&topic(MASTER, "status")).await;
    // And a monitor, with the password broker-config made for it.
    let mut watcher = Client::with(&url, &monitor).await;
    watcher.subscribe(&topic(MASTER, "status")).await;
    let _sim = start_sim(one_master_sim_at(&url));
    agent_client
        .wait_for(&topic(MASTER, "status"), "online")
        .await;
    watcher.wait_for(&topic(MASTER, "status"), "online").await;
}

/// The simulator playing MASTER on a broker outside the world.
fn one_master_sim_at(url: &str) -> firmware_protocol::sim::SimConfig {
    use firmware_protocol::message::RelayLimits;
    use firmware_protocol::sim::{MasterSpec, MasterTiming, RadioSpec, SimConfig, SlaveSpec};
    SimConfig {
        mqtt_url: Some(url.to_string()),
        masters: vec![MasterSpec {
            id: DeviceId::new(MASTER).unwrap(),
            key: MasterKey::from_hex(KEY_HEX).unwrap(),
            slaves: vec![SlaveSpec {
                mac: SLAVE.parse().unwrap(),
                relays: vec![
                    RelayLimits {
                        max_on_s: 60,
                        boot_on: false
                    };
                    4
                ],
            }],
            sensors: vec![],
        }],
        timing: MasterTiming::default(),
        radio: RadioSpec::default(),
        state_dir: None,
        actuation_log_dir: None,
        radio_control: None,
        poll: None,
    }
}
