//! The agent as a separate process, killed with SIGKILL between locking a command in the cloud
//! and hearing its ack, then started again on the same database: the command completes once, and
//! the slave switches the relay once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use autocore_stack::{Claims, Role};
use firmware_protocol::sim::rumqttc::QoS;
use firmware_protocol::sim::{self, MasterTiming, RadioSpec, SimConfig};
use tokio::sync::oneshot;

use crate::support::{
    ALICE, MASTER, SLAVE, World, eventually, insert_command, observe_json, one_master_sim,
    spawn_agent, until_status,
};

const KEY_HEX: &str = "7c1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";

/// Every ack the master publishes, as (command id, result).
async fn ack_observer(world: &World) -> Arc<Mutex<Vec<(String, String)>>> {
    let acks = Arc::new(Mutex::new(Vec::new()));
    let sink = acks.clone();
    let login = world
        .stack
        .broker_login(Role::Monitor, "ack-observer")
        .unwrap();
    observe_json(
        &world.stack.mqtt_url().unwrap(),
        &login,
        &format!("autocore/devices/{MASTER}/ack"),
        QoS::AtLeastOnce,
        move |v| {
            sink.lock().unwrap().push((
                v["command_id"].as_str().unwrap_or_default().to_string(),
                v["result"].as_str().unwrap_or_default().to_string(),
            ));
        },
    )
    .await;
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_between_lock_and_ack_completes_the_command_once_after_a_restart() {
    let world = World::start_full();
    let mqtt = world.stack.mqtt_url().unwrap();
    let acks = ack_observer(&world).await;

    // A slow radio widens the window between the lock and the ack to well over a second.
    let sim_config = SimConfig {
        timing: MasterTiming {
            frame_ack_timeout_ms: 3_000,
            ..MasterTiming::default()
        },
        radio: RadioSpec {
            loss_percent: 0,
            delay_ms: 700,
        },
        ..one_master_sim(&world, KEY_HEX)
    };
    let (_sim_stop, sim_stopped) = oneshot::channel::<()>();
    tokio::spawn(sim::run(sim_config, async move {
        let _ = sim_stopped.await;
    }));

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agent.db");
    let login = world.stack.broker_login(Role::Agent, "pi-alice").unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"pi-alice\"\n[store]\npath = \"{db}\"\n[cloud]\nrest_url = \"{rest}\"\njwt = \"{jwt}\"\npoll_interval_ms = 100\n\
             [mqtt]\nurl = \"{mqtt}\"\nusername = \"{user}\"\npassword = \"{password}\"\nack_timeout_ms = 5000\n[api]\nlisten = \"127.0.0.1:0\"\n\
             [[masters]]\ndevice_id = \"{MASTER}\"\nkey = \"{KEY_HEX}\"\n",
            db = db.display(),
            rest = world.stack.rest_url().unwrap(),
            jwt = world.stack.token(&Claims::agent(ALICE, "pi-alice")),
            user = login.username,
            password = login.password,
        ),
    )
    .unwrap();
    let mut agent = spawn_agent(&config);
    eventually(
        "the agent and the master connected",
        Duration::from_secs(30),
        || {
            (world.sql_one(&format!(
                "select is_online from device_status where device_id = '{MASTER}'"
            )) == "t")
                .then_some(())
        },
    )
    .await;

    let id = insert_command(&world, MASTER, SLAVE, 0, 60);
    until_status(&world, &id, "processing", Duration::from_secs(30)).await;
    // Give the agent a moment to store and publish the command, then kill it outright.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGKILL: no shutdown code runs.
    agent.kill();
    let state = {
        let store = autocore_agent::store::Store::open(&db).unwrap();
        store
            .command(id.parse().unwrap())
            .unwrap()
            .expect("the locked command was on disk")
            .state
    };
    assert!(
        !state.is_final(),
        "the kill landed between lock and ack (state {state:?})"
    );
    assert_eq!(
        world.sql_one(&format!(
            "select status from relay_commands_slave where id = {id}"
        )),
        "processing",
        "the cloud has not heard of an ack yet"
    );

    let mut agent = spawn_agent(&config);
    until_status(&world, &id, "completed", Duration::from_secs(60)).await;
    assert_eq!(
        world.sql_one(&format!(
            "select delivery_count from relay_commands_slave where id = {id}"
        )),
        "1",
        "the backend handed it out once"
    );
    let command_id = format!("backend:{id}");
    let results: Vec<String> = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|(c, _)| *c == command_id)
        .map(|(_, r)| r.clone())
        .collect();
    assert_eq!(
        results.iter().filter(|r| *r == "completed").count(),
        1,
        "the slave applied the command once; acks: {results:?}"
    );
    assert!(
        results.iter().all(|r| r == "completed" || r == "duplicate"),
        "{results:?}"
    );
    agent.kill();
}
