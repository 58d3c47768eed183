//! The command queue through real PostgREST: concurrent lockers, and idempotent inserts.

use std::collections::HashSet;

use autocore_stack::Claims;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{ALICE, World, insert_pending_commands};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_lockers_drain_two_thousand_commands_each_handed_out_exactly_once() {
    let world = World::start();
    insert_pending_commands(&world, "ESP32_ALICE_1", 2_000);
    let agent = world.caller(&Claims::agent(ALICE, "pi-alice"));

    let mut lockers = Vec::new();
    for _ in 0..16 {
        let agent = agent.clone();
        lockers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                // A long lock timeout: nothing may come back round during the test.
                let (status, body) = agent
                    .rpc(
                        "get_and_lock_slave_commands",
                        json!({"p_master_device_id": "ESP32_ALICE_1", "p_limit": 5, "p_timeout_seconds": 600}),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                let rows = body.as_array().unwrap().clone();
                if rows.is_empty() {
                    return mine;
                }
                assert!(rows.len() <= 5, "p_limit is respected");
                mine.extend(rows.iter().map(|r| r["id"].as_i64().unwrap()));
            }
        }));
    }
    let mut all = Vec::new();
    let mut busy_lockers = 0;
    for locker in lockers {
        let mine = locker.await.unwrap();
        if !mine.is_empty() {
            busy_lockers += 1;
        }
        all.extend(mine);
    }
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 2_000, "every command handed out, none twice");
    assert_eq!(distinct.len(), 2_000, "no command handed out twice");
    assert!(busy_lockers > 1, "the lockers really ran side by side");
    assert_eq!(
        world.sql_one(
            "select count(*) from relay_commands_slave where master_device_id = 'ESP32_ALICE_1' and status = 'processing' and delivery_count = 1"
        ),
        "2000"
    );
}

#[tokio::test]
async fn a_retried_insert_with_the_same_client_id_creates_one_command() {
    let world = World::start();
    let agent = world.caller(&Claims::agent(ALICE, "pi-alice"));
    let row = json!({
        "client_id": "c0000000-0000-4000-8000-000000000001",
        "master_device_id": "ESP32_ALICE_1",
        "slave_mac_address": "14:33:5C:38:BF:60",
        "relay_numbers": [0], "actions": ["on"], "duration_seconds": [60],
        "command_type": "rule", "triggered_by": "rule", "rule_id": "RULE_001",
        "rule_name": "Ajustar pH quando baixo", "priority": 50, "status": "completed"
    });
    for _ in 0..3 {
        let (status, body) = agent
            .send(
                Method::POST,
                "/relay_commands_slave?on_conflict=client_id",
                Some(row.clone()),
                Some("resolution=ignore-duplicates,return=minimal"),
            )
            .await;
        assert!(status.is_success(), "{status}: {body}");
    }
    assert_eq!(
        world.sql_one("select count(*) from relay_commands_slave where client_id = 'c0000000-0000-4000-8000-000000000001'"),
        "1"
    );
}

#[tokio::test]
async fn an_invalid_command_is_refused_with_the_broken_rule_named() {
    let world = World::start();
    let alice = world.caller(&Claims::user(ALICE));
    let base = json!({
        "master_device_id": "ESP32_ALICE_1", "slave_mac_address": "14:33:5C:38:BF:60",
        "relay_numbers": [0], "actions": ["on"], "duration_seconds": [60]
    });
    let cases = [
        (
            json!({"priority": 120}),
            "relay_commands_slave_priority_range",
        ),
        (
            json!({"relay_numbers": [0, 1], "actions": ["on"], "duration_seconds": [1, 1]}),
            "relay_commands_slave_arrays_same_length",
        ),
        (
            json!({"command_type": "magic"}),
            "relay_commands_slave_command_type_known",
        ),
        (
            json!({"relay_numbers": [0, 1, 2, 3, 4, 5], "actions": ["on", "on", "on", "on", "on", "on"], "duration_seconds": [1, 1, 1, 1, 1, 1]}),
            "relay_commands_slave_manual_max_5_relays",
        ),
    ];
    for (patch, constraint) in cases {
        let mut row = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            row[k] = v.clone();
        }
        let (status, body) = alice
            .send(Method::POST, "/relay_commands_slave", Some(row), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{constraint}: {body}");
        assert!(
            body["message"].as_str().unwrap_or("").contains(constraint),
            "the error names {constraint}: {body}"
        );
    }
    assert_eq!(
        world.sql_one("select count(*) from relay_commands_slave"),
        "0"
    );
}
