//! A master that polls the Pi instead of the backend: the agent (in-process) pulls a dashboard
//! command into SQLite, the simulated master polls it from the agent's local API with its own
//! token, runs it on its slave and completes it there, and the completion reaches the cloud,
//! also when the backend was away while the command ran.

use std::time::Duration;

use autocore_stack::Claims;
use firmware_protocol::message::RelayLimits;
use firmware_protocol::sim::{
    self, MasterSpec, MasterTiming, PollSpec, RadioSpec, SimConfig, SlaveSpec,
};
use firmware_protocol::{DeviceId, MasterKey};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::{ALICE, Agent, World, eventually, master_toml};

const MASTER: &str = "ESP32_ALICE_1";
const MASTER_KEY: &str = "5b1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
/// Another master of the same agent, also polling: it must never see MASTER's commands.
const NEIGHBOUR: &str = "ESP32_ALICE_2";
const NEIGHBOUR_KEY: &str = "c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b5b1e9c2a7b3d4e6f";
const SLAVE: &str = "14:33:5C:38:BF:60";

/// The token a master shows the Pi's local API, derived as firmware derives it.
fn local_token(device_id: &str, key_hex: &str) -> String {
    autocore_agent::api::master_token(&hex::decode(key_hex).unwrap(), device_id)
}

/// The operator's token for the local API's controls.
const OPERATOR: &str = "operator-token-for-the-polling-tests";

/// The agent in-process, both masters polling; stopped when dropped.
async fn start_agent(world: &World) -> Agent {
    let masters = format!(
        "[safety]\noperator_token = \"{OPERATOR}\"\n{}{}",
        master_toml(MASTER, MASTER_KEY, "poll"),
        master_toml(NEIGHBOUR, NEIGHBOUR_KEY, "poll")
    );
    crate::support::start_agent(world, &masters).await
}

/// The simulated MASTER, without MQTT: it only polls the Pi's local API.
struct PollingMaster {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

fn start_polling_master(agent: &Agent) -> PollingMaster {
    let config = SimConfig {
        mqtt_url: None,
        masters: vec![MasterSpec {
            id: DeviceId::new(MASTER).unwrap(),
            key: MasterKey::from_hex(MASTER_KEY).unwrap(),
            slaves: vec![SlaveSpec {
                mac: SLAVE.parse().unwrap(),
                relays: vec![
                    RelayLimits {
                        max_on_s: 3600,
                        boot_on: false
                    };
                    4
                ],
            }],
            sensors: vec![],
        }],
        timing: MasterTiming::default(),
        radio: RadioSpec {
            loss_percent: 0,
            delay_ms: 1,
        },
        state_dir: None,
        actuation_log_dir: None,
        radio_control: None,
        poll: Some(PollSpec {
            rest_url: format!("{}/rest/v1", agent.api),
            jwt: local_token(MASTER, MASTER_KEY),
            interval_ms: 200,
            limit: 5,
            lock_timeout_s: 30,
        }),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        sim::run(config, async move {
            let _ = stopped.await;
        })
        .await
        .expect("the simulated master runs");
    });
    PollingMaster { stop, task }
}

impl PollingMaster {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// One call to the Pi's local API; the body as JSON (Null if empty).
async fn local(
    agent: &Agent,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Value,
    prefer: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}/rest/v1{path}", agent.api))
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(prefer) = prefer {
        request = request.header("Prefer", prefer);
    }
    let response = request.send().await.expect("the local API answers");
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn finished_locally(agent: &Agent) -> bool {
    let metrics = reqwest::get(format!("{}/metrics", agent.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .any(|l| l == "autocore_agent_commands_finished_total{outcome=\"completed\"} 1")
}

/// Sends a command as the dashboard user and waits until the agent has locked it in the cloud.
async fn dashboard_command(world: &World, relays: Value) -> i64 {
    let actions: Vec<&str> = relays.as_array().unwrap().iter().map(|_| "on").collect();
    let durations: Vec<i32> = relays.as_array().unwrap().iter().map(|_| 30).collect();
    let (status, body) = world
        .caller(&Claims::user(ALICE))
        .send(
            Method::POST,
            "/relay_commands_slave",
            Some(json!({
                "master_device_id": MASTER, "slave_mac_address": SLAVE,
                "relay_numbers": relays, "actions": actions, "duration_seconds": durations,
            })),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body[0]["id"].as_i64().unwrap();
    eventually(
        "the agent pulled the command",
        Duration::from_secs(30),
        || {
            (world.sql_one(&format!(
                "select status from relay_commands_slave where id = {id}"
            )) == "processing")
                .then_some(())
        },
    )
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_polling_the_pi_runs_a_dashboard_command_that_then_completes_in_the_cloud() {
    let world = World::start_full();
    let agent = start_agent(&world).await;
    let id = dashboard_command(&world, json!([0, 2])).await;

    // Before the master polls: a wrong token is refused, the neighbour gets nothing of it.
    let args = json!({"p_master_device_id": MASTER});
    let forged = local_token(MASTER, NEIGHBOUR_KEY);
    for token in [None, Some("00"), Some(forged.as_str())] {
        let (status, body) = local(
            &agent,
            Method::POST,
            "/rpc/get_and_lock_slave_commands",
            token,
            args.clone(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert_eq!(body["code"], "PGRST301");
    }
    let neighbour = local_token(NEIGHBOUR, NEIGHBOUR_KEY);
    let (status, rows) = local(
        &agent,
        Method::POST,
        "/rpc/get_and_lock_slave_commands",
        Some(&neighbour),
        args.clone(),
        None,
    )
    .await;
    assert_eq!((status, rows), (StatusCode::OK, json!([])));
    let (_, rows) = local(
        &agent,
        Method::POST,
        "/rpc/get_and_lock_slave_commands",
        Some(&neighbour),
        json!({"p_master_device_id": NEIGHBOUR}),
        None,
    )
    .await;
    assert_eq!(
        rows,
        json!([]),
        "its own queue does not hold MASTER's command"
    );
    let (_, rows) = local(
        &agent,
        Method::POST,
        "/rpc/complete_slave_command",
        Some(&neighbour),
        json!({"p_command_id": id, "p_execution_time_ms": 1}),
        None,
    )
    .await;
    assert_eq!(rows, json!([]));
    let (status, rows) = local(
        &agent,
        Method::PATCH,
        &format!("/relay_commands_slave?id=eq.{id}"),
        Some(&neighbour),
        json!({"status": "failed", "error_message": "not mine"}),
        Some("return=representation"),
    )
    .await;
    assert_eq!((status, rows), (StatusCode::OK, json!([])));
    assert!(!finished_locally(&agent).await);

    let master = start_polling_master(&agent);
    let row = eventually(
        "the command completed in the cloud",
        Duration::from_secs(60),
        || {
            let row = world.sql_one(&format!(
                "select status || ' ' || coalesce(execution_time_ms::text, '-') || ' ' || coalesce(error_message, '-')
                   from relay_commands_slave where id = {id}"
            ));
            (!row.starts_with("processing")).then_some(row)
        },
    )
    .await;
    assert!(row.starts_with("completed "), "{row}");
    assert!(!row.contains(" - "), "execution time recorded: {row}");
    assert_eq!(
        world.sql_one(&format!(
            "select relay_states[1:3]::text from relay_slaves where slave_mac_address = '{SLAVE}'"
        )),
        "{t,f,t}",
        "the relay states the master reported to the Pi reached relay_slaves"
    );
    assert!(finished_locally(&agent).await);
    // Completed: never handed out again.
    let (_, rows) = local(
        &agent,
        Method::POST,
        "/rpc/get_and_lock_slave_commands",
        Some(&local_token(MASTER, MASTER_KEY)),
        json!({"p_master_device_id": MASTER, "p_timeout_seconds": 1}),
        None,
    )
    .await;
    assert_eq!(rows, json!([]));
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_backend_away_a_pulled_command_runs_through_the_pi_and_its_completion_arrives_later()
 {
    let mut world = World::start_full();
    let agent = start_agent(&world).await;
    let id = dashboard_command(&world, json!([1])).await;

    world.stack.stop_backend();
    eventually_health(&agent, |h| h["backend_reachable"] == false).await;
    let master = start_polling_master(&agent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !finished_locally(&agent).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the master never completed the command on the Pi"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued = eventually_health(&agent, |h| h["outbox"]["depth"].as_u64() >= Some(1)).await;
    assert_eq!(queued["backend_reachable"], false, "{queued}");

    world.stack.restart_backend().expect("the backend returns");
    eventually(
        "the completion reached the cloud",
        Duration::from_secs(60),
        || {
            (world.sql_one(&format!(
                "select status from relay_commands_slave where id = {id}"
            )) == "completed")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        world.sql_one(&format!(
            "select relay_states[2]::text from relay_slaves where slave_mac_address = '{SLAVE}'"
        )),
        "true"
    );
    master.stop().await;
}

async fn eventually_health(agent: &Agent, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let health: Value = reqwest::get(format!("{}/health", agent.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&health) {
            return health;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never got there: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_polling_the_pi_runs_a_command_the_pi_created_itself() {
    let world = World::start_full();
    let agent = start_agent(&world).await;
    // The operator holds relay 1 on: a command the Pi creates (no cloud row), which the local
    // API serves with a negative id (PROTOCOL.md, command ids).
    let held = reqwest::Client::new()
        .post(format!("{}/controls/hold", agent.api))
        .bearer_auth(OPERATOR)
        .json(&json!({"master": MASTER, "slave_mac": SLAVE, "relay": 1, "max_seconds": 60}))
        .send()
        .await
        .unwrap();
    assert!(held.status().is_success(), "{}", held.text().await.unwrap());
    // The simulated master polls it, runs it on its slave and completes it.
    let master = start_polling_master(&agent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !finished_locally(&agent).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Pi's own command never completed on the polling master"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    master.stop().await;
    agent.shut_down().await;
}
