//! The edge agent on the real stack with the ESP32 simulator: a command from the dashboard runs
//! on the simulated slave and is completed in the cloud; telemetry reaches the backend.

use std::time::Duration;

use autocore_stack::{Claims, Role};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::sync::oneshot;

use crate::support::{
    ALICE, Agent, MASTER, SLAVE, World, eventually, insert_command, master_toml, mqtt_options,
    one_master_sim, start_agent, start_sim, until_status,
};

/// How long the backend stays away in the outage test: short in CI, a minute with
/// AUTOCORE_LONG_FAULTS=1.
fn outage() -> Duration {
    if std::env::var("AUTOCORE_LONG_FAULTS").is_ok_and(|v| v == "1") {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(8)
    }
}

const KEY_HEX: &str = "9a1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";

/// A running simulator and agent, stopped when dropped.
struct Edge {
    _sim_stop: oneshot::Sender<()>,
    agent: Agent,
}

impl std::ops::Deref for Edge {
    type Target = Agent;
    fn deref(&self) -> &Agent {
        &self.agent
    }
}

async fn start_edge(world: &World) -> Edge {
    let sim_stop = start_sim(one_master_sim(world, KEY_HEX));
    let agent = start_agent(world, &master_toml(MASTER, KEY_HEX, "mqtt")).await;
    Edge {
        _sim_stop: sim_stop,
        agent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_from_the_dashboard_runs_on_the_slave_and_is_completed_in_the_cloud() {
    let world = World::start_full();
    let edge = start_edge(&world).await;
    let alice = world.caller(&Claims::user(ALICE));
    let (status, body) = alice
        .send(
            Method::POST,
            "/relay_commands_slave",
            Some(json!({
                "master_device_id": MASTER, "slave_mac_address": SLAVE,
                "relay_numbers": [0, 2], "actions": ["on", "on"], "duration_seconds": [30, 30]
            })),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body[0]["id"].as_i64().unwrap();

    let row = eventually("the command completed in the cloud", Duration::from_secs(30), || {
        let row = world.sql_one(&format!(
            "select status || ' ' || coalesce(execution_time_ms::text, '-') || ' ' || delivery_count from relay_commands_slave where id = {id}"
        ));
        row.starts_with("completed").then_some(row)
    })
    .await;
    let parts: Vec<&str> = row.split(' ').collect();
    assert_ne!(parts[1], "-", "execution time recorded");
    assert_eq!(parts[2], "1", "handed out once");
    assert_eq!(
        world.sql_one(&format!(
            "select relay_states[1:3]::text from relay_slaves where slave_mac_address = '{SLAVE}'"
        )),
        "{t,f,t}",
        "the slave's reported relay states reached relay_slaves"
    );

    // Telemetry from the simulator reaches telemetry_data, and the master is online there.
    eventually("telemetry in the cloud", Duration::from_secs(30), || {
        let n: i64 = world.sql_one(&format!("select count(*) from telemetry_data where device_id = '{MASTER}' and sensor_key = 'ph'")).parse().unwrap();
        (n >= 3).then_some(())
    })
    .await;
    eventually(
        "the master online in device_status",
        Duration::from_secs(30),
        || {
            (world.sql_one(&format!(
                "select is_online from device_status where device_id = '{MASTER}'"
            )) == "t")
                .then_some(())
        },
    )
    .await;

    let health: serde_json::Value = reqwest::get(format!("{}/health", edge.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["backend_reachable"], true);
    assert_eq!(health["status"], "ok");
    let metrics = reqwest::get(format!("{}/metrics", edge.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("autocore_agent_commands_finished_total{outcome=\"completed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_backend_away_commands_run_and_every_reading_and_completion_arrives_once_it_returns()
 {
    let mut world = World::start_full();
    let published = crate::support::telemetry_observer(&world).await;
    // Locks that lapse during the outage: after it, the cloud would hand the commands out again
    // if the agent asked for commands before it had reported what it completed.
    let sim_stop = start_sim(one_master_sim(&world, KEY_HEX));
    let jwt = world.stack.token(&Claims::agent(ALICE, "pi-alice"));
    let agent = crate::support::start_agent_overridden(
        &world,
        &world.stack.rest_url().unwrap(),
        &jwt,
        &crate::support::agent_mqtt_toml(&world, ""),
        &master_toml(MASTER, KEY_HEX, "mqtt"),
        &[("AUTOCORE_CLOUD_LOCK_TIMEOUT_SECONDS", "2")],
    )
    .await;
    let edge = Edge {
        _sim_stop: sim_stop,
        agent,
    };
    eventually(
        "first telemetry in the cloud",
        Duration::from_secs(30),
        || (world.sql_one("select count(*) from telemetry_data") != "0").then_some(()),
    )
    .await;

    // Commands already pulled when the backend goes: the agent holds them in SQLite.
    let ids: Vec<String> = world.sql(&format!(
        "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
         select '{MASTER}', '{SLAVE}', array[r], array['on'], array[2] from generate_series(0, 2) r returning id"
    ));
    eventually(
        "the agent locked the commands",
        Duration::from_secs(30),
        || {
            (world.sql_one("select count(*) from relay_commands_slave where status = 'pending'")
                == "0")
                .then_some(())
        },
    )
    .await;
    world.stack.stop_backend();
    let health: serde_json::Value = loop {
        let h: serde_json::Value = reqwest::get(format!("{}/health", edge.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["backend_reachable"] == false {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["status"], "ok", "offline is a normal state");
    tokio::time::sleep(outage()).await;
    let during: serde_json::Value = reqwest::get(format!("{}/health", edge.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        during["outbox"]["depth"].as_u64().unwrap() > 3,
        "readings and completions queued: {during}"
    );
    let returned_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    world.stack.restart_backend().expect("backend returns");

    let list = ids.join(",");
    eventually("every completion arrived", Duration::from_secs(60), || {
        (world.sql_one(&format!("select count(*) from relay_commands_slave where id in ({list}) and status = 'completed'")) == "3")
            .then_some(())
    })
    .await;
    // Recorded when they happened, during the outage, not when the reports were pushed.
    let (completed_before, with_sent_at) = (
        world.sql_one(&format!(
            "select count(*) from relay_commands_slave where id in ({list})
               and completed_at < to_timestamp({returned_at_ms} / 1000.0)"
        )),
        world.sql_one(&format!(
            "select count(*) from relay_commands_slave where id in ({list})
               and sent_at is not null and sent_at <= completed_at"
        )),
    );
    assert_eq!(
        (completed_before.as_str(), with_sent_at.as_str()),
        ("3", "3")
    );
    // Handed out once: completions went before any new lock after the outage.
    assert_eq!(
        world.sql(&format!(
            "select delivery_count from relay_commands_slave where id in ({list}) order by id"
        )),
        vec!["1", "1", "1"],
        "a command completed during the outage was locked again after it"
    );
    let drained = eventually_async_health(&edge.api, |h| h["outbox"]["depth"] == 0).await;
    assert_eq!(drained["backend_reachable"], true);
    drop(edge);

    // Every reading the master published after the agent's first stored one is in the cloud,
    // once (the table's key would refuse a second copy, so equal sets mean exactly once).
    let stored: std::collections::BTreeSet<i64> = world
        .sql(&format!(
            "select (extract(epoch from recorded_at) * 1000)::bigint from telemetry_data where device_id = '{MASTER}' and sensor_key = 'ph'"
        ))
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let first = *stored.first().unwrap();
    let last = *stored.last().unwrap();
    let expected: std::collections::BTreeSet<i64> = published
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|t| *t >= first && *t <= last)
        .collect();
    assert_eq!(
        stored, expected,
        "readings lost or invented across the outage"
    );
    assert!(
        stored.len() as u64 >= outage().as_secs() * 4,
        "readings from during the outage are there: {}",
        stored.len()
    );
    assert_eq!(
        world.sql_one("select count(*) from event_logs where event_type = 'backend_outage'"),
        "1",
        "the outage is recorded once, with its length"
    );
    let message =
        world.sql_one("select message from event_logs where event_type = 'backend_outage'");
    assert!(message.contains("backend unreachable for"), "{message}");
}

async fn eventually_async_health(
    api: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let h: serde_json::Value = reqwest::get(format!("{api}/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&h) {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never got there: {h}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_agent_resubscribes_and_a_command_sent_meanwhile_completes() {
    let mut world = World::start_full();
    let _edge = start_edge(&world).await;
    eventually("the master online", Duration::from_secs(30), || {
        (world.sql_one(&format!(
            "select is_online from device_status where device_id = '{MASTER}'"
        )) == "t")
            .then_some(())
    })
    .await;
    world.stack.mosquitto_mut().unwrap().stop();
    let id = insert_command(&world, MASTER, SLAVE, 1, 5);
    until_status(&world, &id, "processing", Duration::from_secs(30)).await;
    // Longer than the ack timeout times the attempts: no attempt is spent while the broker is away.
    tokio::time::sleep(Duration::from_secs(7)).await;
    world
        .stack
        .mosquitto_mut()
        .unwrap()
        .restart()
        .expect("broker restarts");
    until_status(&world, &id, "completed", Duration::from_secs(60)).await;
    // Telemetry flows again: the agent resubscribed.
    let before: i64 = world
        .sql_one("select count(*) from telemetry_data")
        .parse()
        .unwrap();
    eventually(
        "telemetry after the restart",
        Duration::from_secs(30),
        || {
            let now: i64 = world
                .sql_one("select count(*) from telemetry_data")
                .parse()
                .unwrap();
            (now > before + 3).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_messages_are_counted_and_control_keeps_working() {
    use firmware_protocol::sim::rumqttc::{AsyncClient, QoS};
    let world = World::start_full();
    let edge = start_edge(&world).await;
    // Only MASTER's rights reach its topics; a login of its own, so that the simulator playing
    // MASTER keeps its connection (the broker makes the username the client id).
    let login = world
        .stack
        .broker_login(
            Role::Master {
                device_id: MASTER.into(),
            },
            "flooder",
        )
        .unwrap();
    let (client, mut eventloop) = AsyncClient::new(
        mqtt_options(&world.stack.mqtt_url().unwrap(), &login),
        20_000,
    );
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let malformed: [&[u8]; 4] = [
        b"{not json",
        br#"{"v":99,"ph":{"value":1}}"#,
        b"",
        br#"{"v":1,"ph":{"value":"high"}}"#,
    ];
    let metrics_url = format!("{}/metrics", edge.api);
    // The agent hears the master's telemetry: it is subscribed.
    eventually("the agent subscribed", Duration::from_secs(30), || {
        (world.sql_one(&format!(
            "select is_online from device_status where device_id = '{MASTER}'"
        )) == "t")
            .then_some(())
    })
    .await;
    // Half as telemetry (QoS 0 for the agent), half as acks (QoS 1).
    for i in 0..10_000usize {
        let topic = if i % 2 == 0 { "telemetry" } else { "ack" };
        client
            .publish(
                format!("autocore/devices/{MASTER}/{topic}"),
                QoS::AtLeastOnce,
                false,
                malformed[i % 4].to_vec(),
            )
            .await
            .unwrap();
    }
    eventually_metric(
        &metrics_url,
        "autocore_agent_bad_messages_total{reason=\"payload\"} 10000",
    )
    .await;

    let id = insert_command(&world, MASTER, SLAVE, 3, 5);
    until_status(&world, &id, "completed", Duration::from_secs(30)).await;
    pump.abort();
}

async fn eventually_metric(url: &str, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metric never reached {line}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_changed_in_the_cloud_reaches_the_master_as_a_retained_message() {
    use firmware_protocol::sim::rumqttc::{AsyncClient, Event, Packet, QoS};
    let world = World::start_full();
    let _edge = start_edge(&world).await;
    let reader = world
        .stack
        .broker_login(
            Role::Master {
                device_id: MASTER.into(),
            },
            "config-reader",
        )
        .unwrap();
    world.sql(&format!(
        "update device_status set config = '{{\"telemetry_interval_ms\": 2000, \"master_silent_timeout_ms\": 5000,
           \"slaves\": [{{\"mac\": \"{SLAVE}\", \"relays\": [{{\"max_on_s\": 600}}, {{\"max_on_s\": 0, \"boot_on\": false}}]}}]}}',
           config_version = config_version + 1 where device_id = '{MASTER}'"
    ));
    // A late subscriber still gets it: the message is retained.
    let mut found = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while found.is_none() && tokio::time::Instant::now() < deadline {
        let (client, mut eventloop) =
            AsyncClient::new(mqtt_options(&world.stack.mqtt_url().unwrap(), &reader), 10);
        client
            .subscribe(
                format!("autocore/config/devices/{MASTER}"),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        let read = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                // Only a retained copy counts: that is what a master reconnecting later gets.
                if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await
                    && p.retain
                {
                    return Some((p.retain, p.payload));
                }
            }
        })
        .await;
        if let Ok(Some(message)) = read {
            found = Some(message);
        }
    }
    let (retained, payload) = found.expect("the configuration was published");
    assert!(retained);
    let config: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(config["telemetry_interval_ms"], 2000);
    assert_eq!(config["v"], 1);

    // A configuration the protocol refuses is not delivered, and the dashboard learns why.
    world.sql(&format!(
        "update device_status set config = '{{\"telemetry_interval_ms\": 1}}', config_version = config_version + 1 where device_id = '{MASTER}'"
    ));
    eventually(
        "the refusal reached event_logs",
        Duration::from_secs(30),
        || {
            (world.sql_one("select count(*) from event_logs where event_type = 'config_rejected'")
                == "1")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_relays_duration_ends_the_cloud_shows_it_off() {
    let world = World::start_full();
    let _edge = start_edge(&world).await;
    let id = insert_command(&world, MASTER, SLAVE, 3, 2);
    eventually("relay 3 on in the cloud", Duration::from_secs(30), || {
        let done = world.sql_one(&format!("select status from relay_commands_slave where id = {id}")) == "completed";
        let on = world.sql_one(&format!("select coalesce((select relay_states[4]::text from relay_slaves where slave_mac_address = '{SLAVE}'), '-')")) == "true";
        (done && on).then_some(())
    })
    .await;
    eventually(
        "relay 3 off in the cloud after its 2 s",
        Duration::from_secs(30),
        || {
            (world.sql_one(&format!(
                "select coalesce((select relay_states[4]::text from relay_slaves where slave_mac_address = '{SLAVE}'), '-')"
            )) == "false")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_master_that_announces_itself_is_registered_for_adoption() {
    use firmware_protocol::sim::rumqttc::{AsyncClient, QoS};
    let world = World::start_full();
    let _edge = start_edge(&world).await;
    // A master with a broker login that this agent does not serve (another Pi's, say).
    let stranger = world
        .stack
        .broker_login(
            Role::Master {
                device_id: "ESP32_STRANGER".into(),
            },
            "ESP32_STRANGER",
        )
        .unwrap();
    eventually("the agent subscribed", Duration::from_secs(30), || {
        (world.sql_one(&format!(
            "select is_online from device_status where device_id = '{MASTER}'"
        )) == "t")
            .then_some(())
    })
    .await;
    let (client, mut eventloop) = AsyncClient::new(
        mqtt_options(&world.stack.mqtt_url().unwrap(), &stranger),
        10,
    );
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let announce = br#"{"v":1,"device_id":"ESP32_STRANGER","kind":"master","firmware":"2.0.1","mac":"24:6F:28:00:00:77","slaves":[],"sensors":[],"telemetry_interval_ms":1000}"#;
    for _ in 0..3 {
        client
            .publish(
                "autocore/devices/ESP32_STRANGER/announce",
                QoS::AtLeastOnce,
                false,
                announce.to_vec(),
            )
            .await
            .unwrap();
    }
    let row = eventually("the stranger in device_status", Duration::from_secs(30), || {
        world.sql("select owner_id::text || ' ' || coalesce(agent_id, 'unassigned') || ' ' || firmware_version from device_status where device_id = 'ESP32_STRANGER'")
        .into_iter()
        .next()
    })
    .await;
    assert_eq!(row, format!("{ALICE} unassigned 2.0.1"));
    // Nothing is ever sent to it, and its telemetry is refused until someone adopts it.
    assert_eq!(
        world.sql_one(
            "select count(*) from relay_commands_slave where master_device_id = 'ESP32_STRANGER'"
        ),
        "0"
    );
    pump.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_changes_reach_the_mirror_within_a_poll_and_status_reports_the_agent() {
    let world = World::start_full();
    let edge = start_edge(&world).await;
    let rule_id = world.sql_one(&format!(
        "insert into decision_rules (device_id, rule_id, rule_name, rule_json, priority) values ('{MASTER}', 'RULE_001',
           'Ajustar pH quando baixo', '{{\"conditions\":{{\"type\":\"sensor_compare\",\"sensor\":\"ph\",\"operator\":\"<\",\"value\":6.5}},
           \"actions\":[{{\"type\":\"relay_on\",\"slave_mac_address\":\"{SLAVE}\",\"relay_number\":0,\"duration_seconds\":60}}]}}', 50)
         returning id"
    ));
    // The agent has created its database before the test reads it.
    eventually_async_health(&edge.api, |h| h["status"] == "ok").await;
    let mirror = |check: &dyn Fn(Option<autocore_agent::store::RuleRecord>) -> bool| {
        let store = autocore_agent::store::Store::open(&edge.db).unwrap();
        check(store.rule(&rule_id).unwrap())
    };
    eventually("the new rule mirrored", Duration::from_secs(10), || {
        mirror(&|r| r.is_some_and(|r| r.enabled && r.priority == 50)).then_some(())
    })
    .await;
    world.sql("update decision_rules set priority = 70 where rule_id = 'RULE_001'");
    eventually("the edit mirrored", Duration::from_secs(10), || {
        mirror(&|r| r.is_some_and(|r| r.priority == 70)).then_some(())
    })
    .await;
    world.sql("update decision_rules set enabled = false where rule_id = 'RULE_001'");
    eventually(
        "the rule disabled in the mirror",
        Duration::from_secs(10),
        || mirror(&|r| r.is_some_and(|r| !r.enabled)).then_some(()),
    )
    .await;
    world.sql("delete from decision_rules where rule_id = 'RULE_001'");
    eventually("the deletion mirrored", Duration::from_secs(10), || {
        mirror(&|r| r.is_some_and(|r| r.deleted)).then_some(())
    })
    .await;

    let report = autocore_agent::status::report(&edge.config).await;
    assert!(report.contains("(running"), "{report}");
    assert!(report.contains("backend reachable: true"), "{report}");
    assert!(report.contains(&format!("{MASTER} online")), "{report}");
    drop(edge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_that_stops_moving_while_the_backend_answers_shows_and_heals() {
    let world = World::start_full();
    let edge = start_edge(&world).await;
    eventually(
        "first telemetry in the cloud",
        Duration::from_secs(30),
        || (world.sql_one("select count(*) from telemetry_data") != "0").then_some(()),
    )
    .await;
    // The backend keeps answering, but refuses every telemetry push: nothing moves.
    world.sql("revoke execute on function insert_telemetry(jsonb) from authenticated");
    let stalled = eventually_async_health(&edge.api, |h| h["sync_stalled"] == true).await;
    assert_eq!(stalled["status"], "degraded");
    assert_eq!(
        stalled["backend_reachable"], true,
        "the backend answers: not an outage"
    );
    let metrics_url = format!("{}/metrics", edge.api);
    let text = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines().any(|l| l == "autocore_agent_sync_stalled 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("autocore_agent_sync_restarts_total ") && !l.ends_with(" 0")),
        "the agent restarted its sync: {text}"
    );
    // The cause goes away: the queue drains and the stall clears without a restart of the agent.
    world.sql("grant execute on function insert_telemetry(jsonb) to authenticated");
    let healed = eventually_async_health(&edge.api, |h| {
        h["sync_stalled"] == false && h["outbox"]["depth"].as_u64() < Some(20)
    })
    .await;
    assert_eq!(healed["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_with_broker_and_backend_down_waits_for_them_and_then_works() {
    let mut world = World::start_full();
    world.stack.stop_backend();
    world.stack.mosquitto_mut().unwrap().stop();
    let edge = start_edge(&world).await;
    let down = eventually_async_health(&edge.api, |h| h["backend_reachable"] == false).await;
    assert_eq!(down["status"], "ok", "the agent runs without them");
    world.stack.mosquitto_mut().unwrap().restart().unwrap();
    world.stack.restart_backend().unwrap();
    let id = insert_command(&world, MASTER, SLAVE, 2, 5);
    until_status(&world, &id, "completed", Duration::from_secs(60)).await;
}

/// Waits (up to 30 s) until /health shows `MASTER` online (`want`) or offline.
async fn until_master_online(api: &str, want: bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while master_online(api).await != Some(want) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether /health shows `MASTER` online.
async fn master_online(api: &str) -> Option<bool> {
    let h: serde_json::Value = reqwest::get(format!("{api}/health"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    h["masters"]
        .as_array()?
        .iter()
        .find(|m| m["device_id"] == MASTER)
        .and_then(|m| m["online"].as_bool())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_only_sends_telemetry_stays_online_and_goes_offline_once_silent() {
    use firmware_protocol::sim::rumqttc::{AsyncClient, QoS};
    const SILENT_AFTER_MS: u64 = 1_500;
    let world = World::start_full();
    let mqtt = crate::support::agent_mqtt_toml(
        &world,
        &format!("heartbeat_timeout_ms = {SILENT_AFTER_MS}"),
    );
    let jwt = world.stack.token(&Claims::agent(ALICE, "pi-alice"));
    let agent = crate::support::start_agent_with(
        &world,
        &jwt,
        &mqtt,
        &master_toml(MASTER, KEY_HEX, "mqtt"),
    )
    .await;
    // A master that never announces and has no status: only readings, as a firmware might
    // between its (lost) status messages. It stays connected when it falls silent, so no last
    // will says anything.
    let master_login = world
        .stack
        .broker_login(
            Role::Master {
                device_id: MASTER.into(),
            },
            "telemetry-only",
        )
        .unwrap();
    let (client, mut eventloop) = AsyncClient::new(
        mqtt_options(&world.stack.mqtt_url().unwrap(), &master_login),
        100,
    );
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    // Readings every 250 ms while `talking` is set.
    let talking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publisher = {
        let talking = talking.clone();
        let topic = format!("autocore/devices/{MASTER}/telemetry");
        tokio::spawn(async move {
            loop {
                if talking.load(std::sync::atomic::Ordering::SeqCst) {
                    let reading = r#"{"v":1,"ph":{"value":6.8,"unit":"pH"}}"#;
                    let _ = client
                        .publish(topic.as_str(), QoS::AtLeastOnce, false, reading)
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    until_master_online(&agent.api, true, "the master online from its telemetry").await;
    // Three times the silence timeout: online at every sample.
    let mut samples = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(3 * SILENT_AFTER_MS);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            master_online(&agent.api).await,
            Some(true),
            "a master heard every 250 ms shown offline (sample {samples})"
        );
        samples += 1;
    }
    assert!(samples >= 20);
    // Silent but connected: offline after the timeout (and the agent's check interval).
    talking.store(false, std::sync::atomic::Ordering::SeqCst);
    until_master_online(&agent.api, false, "the silent master offline").await;
    // Heard again: online again, without an announce.
    talking.store(true, std::sync::atomic::Ordering::SeqCst);
    until_master_online(
        &agent.api,
        true,
        "the master back online from its telemetry",
    )
    .await;
    publisher.abort();
    pump.abort();
    agent.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_call_whose_answer_is_lost_is_retried_and_gets_the_same_command() {
    let world = World::start_full();
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Loses the answer of the first sync that locked something: the backend did the work, the
    // agent sees a 504.
    let lose = armed.clone();
    let proxy = crate::support::faulty_proxy(
        world.stack.rest_url().unwrap(),
        crate::support::ProxyFaults {
            // The first sync answer that hands out a command is lost on its way back.
            lose_answer: Box::new(move |path, answer| {
                let locked_some = path.ends_with("/rpc/sync_agent")
                    && serde_json::from_slice::<serde_json::Value>(answer)
                        .ok()
                        .and_then(|a| a["commands"].as_array().map(|c| !c.is_empty()))
                        .unwrap_or(false);
                locked_some && lose.swap(false, std::sync::atomic::Ordering::SeqCst)
            }),
            ..Default::default()
        },
    )
    .await;
    let sim_stop = start_sim(one_master_sim(&world, KEY_HEX));
    let mqtt = crate::support::agent_mqtt_toml(&world, "");
    let jwt = world.stack.token(&Claims::agent(ALICE, "pi-alice"));
    let agent = crate::support::start_agent_on(
        &world,
        &proxy,
        &jwt,
        &mqtt,
        &master_toml(MASTER, KEY_HEX, "mqtt"),
    )
    .await;
    let id = insert_command(&world, MASTER, SLAVE, 1, 30);
    until_status(&world, &id, "completed", Duration::from_secs(20)).await;
    assert!(
        !armed.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy lost one lock answer"
    );
    // Handed out once: the retry (same request id) returned the row the lost call had locked,
    // instead of it waiting out the 30 s lock timeout to be handed out again.
    assert_eq!(
        world.sql_one(&format!(
            "select delivery_count from relay_commands_slave where id = {id}"
        )),
        "1"
    );
    agent.shut_down().await;
    let _ = sim_stop.send(());
}
