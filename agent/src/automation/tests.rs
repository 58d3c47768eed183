//! The executor's decisions, without I/O: what a firing, a cloud command, a stop, a reset and a
//! hold turn into (commands, reports, publications), and what they refuse.

use std::path::Path;

use serde_json::json;

use super::*;
use crate::rules::engine::{Firing, FiringReading};
use crate::rules::model::Action;

const MASTER: &str = "ESP32_A";
const SLAVE: &str = "14:33:5C:38:BF:60";

fn config() -> AgentConfig {
    let text = format!(
        r#"
        [agent]
        id = "pi-test"
        [store]
        path = "/tmp/unused.db"
        [cloud]
        rest_url = "http://127.0.0.1:1"
        jwt = "x.y.z"
        [mqtt]
        url = "mqtt://127.0.0.1:1"
        [safety]
        operator_token = "operator-token-for-tests"
        [[safety.mutex_groups]]
        name = "motor"
        master = "{MASTER}"
        slave_mac = "{SLAVE}"
        relays = [2, 3]
        [[safety.limits]]
        master = "{MASTER}"
        slave_mac = "{SLAVE}"
        relay = 0
        max_on_seconds = 120
        min_off_seconds = 30
        [[masters]]
        device_id = "{MASTER}"
        key = "00112233445566778899aabbccddeeff"
        "#
    );
    AgentConfig::from_toml(&text, Path::new("test.toml"), Vec::new()).unwrap()
}

fn automation() -> Automation {
    let config = config();
    Automation::new(&config, Safety::new(interlocks(&config)), 0, 0)
}

fn firing(actions: Vec<Action>, at: i64) -> Firing {
    Firing {
        rule: "c0000000-0000-0000-0000-000000000001".into(),
        rule_id: "RULE_001".into(),
        rule_name: "pH low".into(),
        device_id: MASTER.into(),
        priority: 50,
        actions,
        fired_at_ms: at,
        readings: vec![FiringReading {
            sensor: "ph".into(),
            value: 6.31,
            recorded_at_ms: at,
        }],
        explanation: "ph 6.31 < 6.5; 1/10 this hour".into(),
        hourly_count: 1,
        hourly_max: 10,
        cooldown_seconds: 60,
    }
}

/// A manual command from the dashboard for SLAVE, priority 10.
fn cloud_command(
    id: i64,
    relay_numbers: Vec<i64>,
    actions: Vec<String>,
    duration_seconds: Vec<i64>,
) -> CommandRecord {
    CommandRecord {
        id,
        master_device_id: MASTER.into(),
        slave_mac_address: SLAVE.into(),
        slave_device_id: None,
        actions: crate::command::actions_from_columns(&relay_numbers, &actions, &duration_seconds)
            .unwrap(),
        command_type: crate::command::CommandType::Manual,
        triggered_by: crate::command::CommandSource::Manual,
        priority: 10,
        rule_id: None,
        rule_name: None,
        expires_at_ms: 60_000,
        state: CommandState::Accepted,
        attempts: 0,
        last_sent_at_ms: None,
        polled_by: None,
    }
}

fn relay_on(relay: u8, duration_seconds: u32) -> Action {
    Action::RelayOn {
        slave_mac_address: SLAVE.into(),
        relay_number: relay,
        duration_seconds,
    }
}

fn execution(step: &Step) -> serde_json::Value {
    step.write
        .outbox
        .iter()
        .find(|e| e.payload["kind"] == "execution")
        .map(|e| e.payload["row"].clone())
        .expect("an execution record")
}

#[test]
fn a_firing_becomes_a_rule_command_sent_at_once_with_its_record_and_state() {
    let mut a = automation();
    let step = a.on_firings(
        vec![firing(vec![relay_on(0, 60)], 1_000)],
        vec![("rule".into(), json!({"last_fired_ms": 1_000}))],
        1_000,
    );
    assert_eq!(step.send.len(), 1);
    let cmd = &step.send[0];
    assert!(cmd.id < 0, "a Pi-created command has an edge id");
    assert_eq!(
        (cmd.command_type.as_str(), cmd.triggered_by.as_str()),
        ("rule", "rule")
    );
    assert_eq!(cmd.rule_id.as_deref(), Some("RULE_001"));
    assert_eq!(cmd.priority, 50);
    assert_eq!(
        cmd.actions,
        vec![RelayAction {
            relay: 0,
            action: SwitchAction::On,
            duration_s: 60
        }]
    );
    assert_eq!(
        step.write.rule_states.len(),
        1,
        "the state goes with the command"
    );
    let row = execution(&step);
    assert_eq!(row["result"], "executed");
    let text = row["explanation"].as_str().unwrap();
    assert!(
        text.starts_with("ph 6.31 < 6.5; 1/10 this hour; interlocks ok"),
        "{text}"
    );
    assert!(text.contains("relay 0 on 60 s"), "{text}");
    assert_eq!(row["command_client_ids"].as_array().unwrap().len(), 1);
}

#[test]
fn a_firing_the_interlocks_refuse_runs_none_of_its_actions_and_says_why() {
    let mut a = automation();
    // Relay 0 was just switched off: its minimum off-time (30 s) refuses the whole firing,
    // including the part that alone would pass.
    a.observe(MASTER, SLAVE, &[false, false, false, false], 1_000);
    let step = a.on_firings(
        vec![firing(vec![relay_on(1, 10), relay_on(0, 60)], 2_000)],
        vec![],
        2_000,
    );
    assert!(step.send.is_empty() && step.write.commands.is_empty());
    let row = execution(&step);
    assert_eq!(row["result"], "refused");
    let text = row["explanation"].as_str().unwrap();
    assert!(
        text.contains("refused: relay 0 must stay off for another")
            && text.contains("minimum off-time"),
        "{text}"
    );
}

#[test]
fn a_cloud_command_into_a_mutex_group_switches_the_peer_off_first() {
    let mut a = automation();
    a.observe(MASTER, SLAVE, &[false, false, true, false], 0);
    let cmd = cloud_command(7, vec![3], vec!["on".into()], vec![0]);
    let (planned, step) = a.check_cloud_command(cmd, 1_000);
    let planned = planned.unwrap();
    let sent = crate::command::actions_to_columns(&planned.actions);
    assert_eq!(sent.relay_numbers, vec![2, 3], "peer off first, then on");
    assert_eq!(sent.actions, vec!["off", "on"]);
    assert!(
        step.write.safety.is_some(),
        "the arbiter's state is persisted"
    );
}

#[test]
fn the_emergency_stop_latches_publishes_blocks_and_is_logged_then_only_a_reset_lifts_it() {
    let mut a = automation();
    let (newly, step) = a.emergency_stop("pump leak", "alice", LatchSource::LocalApi, 5_000);
    assert!(newly);
    assert_eq!(step.publish.len(), 1);
    assert!(
        step.publish[0].0.ends_with("emergency/stop") && step.publish[0].2,
        "retained stop"
    );
    assert!(step.cancel_switching_on.is_some());
    assert_eq!(step.block_engine, Some(true));
    let event = step
        .write
        .outbox
        .iter()
        .find(|e| e.class == OutboxClass::Event)
        .unwrap();
    assert_eq!(event.payload["severity"], "critical");
    assert!(
        step.write
            .outbox
            .iter()
            .any(|e| e.payload["kind"] == "system_status"
                && e.payload["row"]["emergency_stop"] == true),
        "the dashboard learns of the latch"
    );
    // Nothing switches on while latched: rules, holds, macros, cloud commands.
    let refused = a.on_firings(vec![firing(vec![relay_on(0, 60)], 6_000)], vec![], 6_000);
    assert!(refused.send.is_empty());
    let (held, _) = a.press(RelayRef::new(MASTER, SLAVE, 1), 10, "bob", 6_000);
    assert!(held.is_err());

    let (reset, step) = a.emergency_reset("alice", LatchSource::LocalApi, 7_000);
    assert!(reset);
    assert_eq!(
        step.publish[0],
        (
            firmware_protocol::topic::Topic::EmergencyStop.to_string(),
            vec![],
            true
        ),
        "the retained stop is cleared first"
    );
    assert!(step.publish[1].0.ends_with("emergency/reset"));
    assert_eq!(step.block_engine, Some(false));
    assert!(
        a.on_firings(vec![firing(vec![relay_on(1, 5)], 8_000)], vec![], 8_000)
            .send
            .len()
            == 1
    );
}

#[test]
fn the_clouds_latch_wins_only_when_it_is_newer_than_ours() {
    let mut a = automation();
    let step = a.cloud_latch(
        true,
        Some("dashboard stop"),
        Some("alice"),
        Some(10_000),
        10_500,
    );
    assert_eq!(
        step.block_engine,
        Some(true),
        "a newer stop in the cloud latches"
    );
    assert!(
        !step
            .write
            .outbox
            .iter()
            .any(|e| e.payload["kind"] == "system_status"),
        "no echo back to the cloud"
    );
    // Reset here at 20 s; the cloud still says stop (changed at 10 s) until the outbox lands.
    a.emergency_reset("op", LatchSource::LocalApi, 20_000);
    let stale = a.cloud_latch(true, None, None, Some(10_000), 21_000);
    assert!(
        stale.block_engine.is_none(),
        "a stale cloud row does not latch again"
    );
    let newer = a.cloud_latch(true, None, None, Some(30_000), 31_000);
    assert_eq!(newer.block_engine, Some(true));
    let reset = a.cloud_latch(false, None, Some("alice"), Some(40_000), 41_000);
    assert_eq!(
        reset.block_engine,
        Some(false),
        "a reset in the dashboard lifts it"
    );
}

#[test]
fn a_hold_switches_on_for_at_most_its_maximum_and_off_when_released() {
    let mut a = automation();
    let relay = RelayRef::new(MASTER, SLAVE, 1);
    let (ok, step) = a.press(relay.clone(), 30, "op", 0);
    ok.unwrap();
    assert_eq!(
        crate::command::actions_to_columns(&step.send[0].actions).actions,
        vec!["on"]
    );
    assert_eq!(
        crate::command::actions_to_columns(&step.send[0].actions).duration_seconds,
        vec![30],
        "the slave ends it even if the Pi dies"
    );
    let (again, _) = a.press(relay.clone(), 30, "op", 1);
    assert!(again.is_err(), "one hold per relay");
    let (released, step) = a.release(&relay, 2_000);
    released.unwrap();
    assert_eq!(
        crate::command::actions_to_columns(&step.send[0].actions).actions,
        vec!["off"]
    );
    assert!(a.release(&relay, 3_000).0.is_err());
}

fn relay_step(sequence: i32, relay: u8, action: &str, delay_ms: u32) -> serde_json::Value {
    json!({"sequence": sequence, "action_type": "relay", "delay_ms": delay_ms,
           "action_payload": {"master_device_id": MASTER, "slave_mac_address": SLAVE,
                              "relay_number": relay, "action": action, "duration_seconds": 0}})
}

fn macros() -> Vec<serde_json::Value> {
    vec![
        json!({"id": "fill", "name": "fill the tank", "enabled": true, "revision": 1, "macro_actions": [
            relay_step(10, 1, "on", 0),
            relay_step(20, 1, "off", 5_000),
        ]}),
        json!({"id": "loop-a", "name": "a", "enabled": true, "revision": 1, "macro_actions": [
            {"sequence": 1, "action_type": "macro", "action_target": "loop-b"}]}),
        json!({"id": "loop-b", "name": "b", "enabled": true, "revision": 1, "macro_actions": [
            {"sequence": 1, "action_type": "macro", "action_target": "loop-a"}]}),
    ]
}

fn no_conditions(_: &serde_json::Value) -> Result<bool, String> {
    Ok(true)
}

#[test]
fn a_macro_runs_its_steps_in_order_with_delays_through_the_interlocks_and_once_at_a_time() {
    let mut a = automation();
    let refused = a.set_macros(&macros());
    assert_eq!(
        refused.len(),
        2,
        "both macros of the cycle are refused: {refused:?}"
    );
    assert!(
        refused.iter().all(|(_, why)| why.contains("cycl")),
        "{refused:?}"
    );
    let (run, step) = a.start_macro("fill", "op", 0, &mut no_conditions);
    run.unwrap();
    assert_eq!(step.send.len(), 1);
    assert_eq!(
        (
            step.send[0].triggered_by.as_str(),
            crate::command::actions_to_columns(&step.send[0].actions).actions
        ),
        ("macro", vec!["on"])
    );
    let (again, _) = a.start_macro("fill", "op", 1, &mut no_conditions);
    assert!(again.is_err(), "one run at a time");
    assert!(
        a.tick(4_000, &mut no_conditions).send.is_empty(),
        "the delay holds"
    );
    let off = a.tick(5_001, &mut no_conditions);
    assert_eq!(off.send.len(), 1);
    assert_eq!(
        crate::command::actions_to_columns(&off.send[0].actions).actions,
        vec!["off"]
    );
    let done = a.tick(5_002, &mut no_conditions);
    assert!(
        done.write
            .outbox
            .iter()
            .any(|e| e.payload["event_type"] == "macro_run"),
        "the run's end is recorded"
    );
    let (cyclic, step) = a.start_macro("loop-a", "op", 6_000, &mut no_conditions);
    assert!(
        cyclic.is_err() && step.send.is_empty(),
        "a cyclic macro runs nothing"
    );
}

#[test]
fn a_cancelled_macro_runs_no_further_step_and_a_stop_cancels_it() {
    let mut a = automation();
    a.set_macros(&macros());
    a.start_macro("fill", "op", 0, &mut no_conditions)
        .0
        .unwrap();
    let (cancelled, _) = a.cancel_macro("fill", 1_000);
    assert!(cancelled);
    assert!(a.tick(6_000, &mut no_conditions).send.is_empty());
    a.start_macro("fill", "op", 7_000, &mut no_conditions)
        .0
        .unwrap();
    a.emergency_stop("test", "op", LatchSource::LocalApi, 8_000);
    assert!(a.running_macros().is_empty(), "the stop ends every run");
    let (blocked, _) = a.start_macro("fill", "op", 9_000, &mut no_conditions);
    assert!(blocked.is_err());
}

#[test]
fn a_slave_seen_with_two_relays_of_a_mutex_group_on_has_the_whole_group_switched_off() {
    let mut a = automation();
    // Booted (or switched at the board) with both motor directions on.
    let step = a.observe(MASTER, SLAVE, &[false, false, true, true], 5_000);
    assert_eq!(step.send.len(), 1, "resolved at once");
    let off = &step.send[0];
    let sent = crate::command::actions_to_columns(&off.actions);
    assert_eq!(sent.relay_numbers, vec![2, 3]);
    assert_eq!(sent.actions, vec!["off", "off"]);
    let event = step
        .write
        .outbox
        .iter()
        .find(|e| e.payload["event_type"] == "mutex_violation")
        .expect("recorded as an event");
    assert!(
        event.payload["message"]
            .as_str()
            .unwrap()
            .contains("mutex group 'motor' found violated"),
        "{}",
        event.payload["message"]
    );
    assert_eq!(a.mutex_violations().len(), 1);
    assert_eq!(a.mutex_violations()[0].relays_on, vec![2, 3]);

    // One relay of the group on is what the group allows: nothing to resolve.
    let step = a.observe(MASTER, SLAVE, &[true, false, false, true], 6_000);
    assert!(step.send.is_empty());
    assert_eq!(a.mutex_violations().len(), 1);
}

#[test]
fn a_cloud_command_the_interlocks_adjust_records_what_the_slave_is_sent() {
    let mut a = automation();
    let cmd = cloud_command(8, vec![0], vec!["on".into()], vec![3_600]);
    let (planned, step) = a.check_cloud_command(cmd.clone(), 1_000);
    assert_eq!(
        crate::command::actions_to_columns(&planned.unwrap().actions).duration_seconds,
        vec![120],
        "max on-time"
    );
    let event = step
        .write
        .outbox
        .iter()
        .find(|e| e.payload["event_type"] == "command_adjusted")
        .expect("what ran is recorded");
    assert_eq!(
        event.payload["payload"]["requested"]["duration_seconds"],
        json!([3_600])
    );
    assert_eq!(
        event.payload["payload"]["sent"]["duration_seconds"],
        json!([120])
    );

    // A command the interlocks leave as it is records nothing extra.
    let mut b = automation();
    let plain = CommandRecord {
        actions: vec![RelayAction {
            duration_s: 60,
            ..cmd.actions[0]
        }],
        ..cmd
    };
    let (_, step) = b.check_cloud_command(plain, 1_000);
    assert!(step.write.outbox.is_empty());
}
