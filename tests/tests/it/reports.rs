//! Signed reports on the real stack: an ack or relay state report that its master did not sign
//! changes nothing in the cloud, even when it reaches the agent (a stolen broker login, a
//! compromised broker); the same report signed with the master's key is believed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_protocol::message::{
    AckResult, CommandAck, RelayStateReport, SlaveState, StateReason,
};
use firmware_protocol::sim::{self, rumqttc};
use firmware_protocol::{CommandId, DeviceId, MasterKey, Payload, ReportSigner, Topic};
use serde_json::Value;

use crate::support::{
    MASTER, SLAVE, World, eventually, insert_command, master_toml, observe_json, start_agent,
    until_status,
};

const KEY_HEX: &str = "5b1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const FORGER_KEY_HEX: &str = "66666666666666666666666666666666666666666666666666666666666666aa";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A client that logs in as MASTER (its broker login is derived from the key), as a thief of
/// that login or a compromised broker could publish.
async fn as_master(world: &World) -> (rumqttc::AsyncClient, tokio::task::JoinHandle<()>) {
    let master = DeviceId::new(MASTER).unwrap();
    let key = MasterKey::from_hex(KEY_HEX).unwrap();
    let mut options = sim::mqtt_options(&world.stack.mqtt_url().unwrap(), "forger").unwrap();
    options.set_credentials(MASTER, firmware_protocol::broker_password(&key, &master));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    (client, pump)
}

fn all_on_ack(id: i64) -> CommandAck {
    CommandAck {
        v: 1,
        command_id: Some(CommandId::backend(id).unwrap()),
        result: AckResult::Completed,
        error: None,
        slave_mac: Some(SLAVE.parse().unwrap()),
        relay_states: vec![true; 4],
        execution_time_ms: 0,
        counter: None,
        sig: None,
    }
}

fn all_on_report() -> RelayStateReport {
    RelayStateReport {
        v: 1,
        slaves: vec![SlaveState {
            mac: SLAVE.parse().unwrap(),
            online: true,
            relay_states: vec![true; 4],
            emergency_latched: false,
            reason: StateReason::Command,
        }],
        counter: None,
        sig: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ack_or_relay_report_changes_nothing_in_the_cloud_and_a_signed_one_does() {
    let world = World::start_full();
    let mqtt = world.stack.mqtt_url().unwrap();
    // The master is offline: whatever acks the command comes from the test.
    let agent = start_agent(&world, &master_toml(MASTER, KEY_HEX, "mqtt")).await;
    let sent = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sink = sent.clone();
    let monitor = world
        .stack
        .broker_login(autocore_stack::Role::Monitor, "command-observer")
        .unwrap();
    observe_json(
        &mqtt,
        &monitor,
        &Topic::Command(DeviceId::new(MASTER).unwrap()).to_string(),
        rumqttc::QoS::AtLeastOnce,
        move |v| sink.lock().unwrap().push(v),
    )
    .await;
    let id: i64 = insert_command(&world, MASTER, SLAVE, 1, 60)
        .parse()
        .unwrap();
    eventually(
        "the agent sent the command",
        Duration::from_secs(30),
        || (!sent.lock().unwrap().is_empty()).then_some(()),
    )
    .await;

    let (client, pump) = as_master(&world).await;
    let master = DeviceId::new(MASTER).unwrap();
    let forger = || {
        ReportSigner::new(
            master.clone(),
            MasterKey::from_hex(FORGER_KEY_HEX).unwrap(),
            now_ms(),
        )
    };
    let ack_topic = Topic::Ack(master.clone()).to_string();
    let state_topic = Topic::RelayState(master.clone()).to_string();
    let publish = |topic: String, payload: Vec<u8>| {
        let client = client.clone();
        async move {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    };
    publish(
        ack_topic.clone(),
        forger().seal_ack(all_on_ack(id)).encode().unwrap(),
    )
    .await;
    publish(ack_topic.clone(), all_on_ack(id).encode().unwrap()).await;
    publish(
        state_topic.clone(),
        forger()
            .seal_relay_states(all_on_report())
            .encode()
            .unwrap(),
    )
    .await;

    let refused = "autocore_agent_reports_refused_total{reason=\"bad_signature\"}";
    let unsigned = "autocore_agent_reports_refused_total{reason=\"unsigned\"}";
    let api = agent.api.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while crate::support::metric(&api, refused).await < 2.0
        || crate::support::metric(&api, unsigned).await < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent counted the forged reports"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counted means decided: nothing of it reached the cloud.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        world.sql_one(&format!(
            "select status from relay_commands_slave where id = {id}"
        )),
        "completed",
        "a forged ack completed the command"
    );
    assert_eq!(
        world.sql_one(&format!(
            "select count(*) from relay_slaves where slave_mac_address = '{SLAVE}' and true = any(relay_states)"
        )),
        "0",
        "a forged report switched relays on in the cloud"
    );

    // The same ack under the master's own key is believed: the refusals above were about the
    // signature, not about the path.
    let signer = ReportSigner::new(
        master.clone(),
        MasterKey::from_hex(KEY_HEX).unwrap(),
        now_ms(),
    );
    let mut signer = signer;
    publish(ack_topic, signer.seal_ack(all_on_ack(id)).encode().unwrap()).await;
    until_status(
        &world,
        &id.to_string(),
        "completed",
        Duration::from_secs(15),
    )
    .await;
    pump.abort();
    agent.shut_down().await;
}
