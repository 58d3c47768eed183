//! Each kind of caller, with a real JWT through real PostgREST, sees and changes exactly what
//! contract 1 says: users their devices, agents their masters, masters themselves, anon nothing;
//! a revoked agent's token is refused outright.

use autocore_stack::Claims;
use autocore_stack::jwt::now_secs;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{ALICE, BOB, World};

fn seed_commands_and_rules(world: &World) {
    world.sql(
        "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, rule_id)
         select d, '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', d from unnest(array['ESP32_ALICE_1','ESP32_ALICE_2','ESP32_ALICE_R','ESP32_BOB_1']) d;
         insert into decision_rules (device_id, rule_id, rule_name, rule_json)
         select d, 'R_' || d, 'rule of ' || d, '{\"conditions\":{\"type\":\"sensor_compare\",\"sensor\":\"ph\",\"operator\":\"<\",\"value\":6.5},\"actions\":[{\"type\":\"relay_off\",\"slave_mac_address\":\"14:33:5C:38:BF:60\",\"relay_number\":0}]}'
           from unnest(array['ESP32_ALICE_1','ESP32_ALICE_2','ESP32_ALICE_R','ESP32_BOB_1']) d;",
    );
}

fn names(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn each_caller_sees_exactly_its_own_devices_commands_and_rules() {
    let world = World::start();
    seed_commands_and_rules(&world);

    let cases: Vec<(&str, Claims, Vec<String>)> = vec![
        (
            "dashboard user alice",
            Claims::user(ALICE),
            names(&["ESP32_ALICE_1", "ESP32_ALICE_2", "ESP32_ALICE_R"]),
        ),
        (
            "dashboard user bob",
            Claims::user(BOB),
            names(&["ESP32_BOB_1"]),
        ),
        (
            "agent pi-alice",
            Claims::agent(ALICE, "pi-alice"),
            names(&["ESP32_ALICE_1"]),
        ),
        (
            "agent pi-alice-2",
            Claims::agent(ALICE, "pi-alice-2"),
            names(&["ESP32_ALICE_2"]),
        ),
        (
            "master ESP32_ALICE_2",
            Claims::master(ALICE, "ESP32_ALICE_2"),
            names(&["ESP32_ALICE_2"]),
        ),
        (
            "master of another owner claiming alice's device",
            Claims::master(BOB, "ESP32_ALICE_1"),
            vec![],
        ),
    ];
    for (who, claims, devices) in cases {
        let caller = world.caller(&claims);
        assert_eq!(
            caller
                .column("/device_status?select=device_id", "device_id")
                .await,
            devices,
            "{who}: devices"
        );
        assert_eq!(
            caller
                .column(
                    "/relay_commands_slave?select=master_device_id",
                    "master_device_id"
                )
                .await,
            devices,
            "{who}: commands"
        );
        assert_eq!(
            caller
                .column("/decision_rules?select=device_id", "device_id")
                .await,
            devices,
            "{who}: rules"
        );
    }
}

#[tokio::test]
async fn rpcs_for_someone_elses_master_return_nothing_and_change_nothing() {
    let world = World::start();
    seed_commands_and_rules(&world);
    let bob_agent = world.caller(&Claims::agent(BOB, "pi-bob"));
    let alice_master = world.caller(&Claims::master(ALICE, "ESP32_ALICE_2"));
    let alice_cmd = world
        .sql_one("select id from relay_commands_slave where master_device_id = 'ESP32_ALICE_1'");

    for caller in [&bob_agent, &alice_master] {
        let (status, body) = caller
            .rpc(
                "get_and_lock_slave_commands",
                json!({"p_master_device_id": "ESP32_ALICE_1"}),
            )
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!([])));
        let (status, body) = caller
            .rpc(
                "get_active_decision_rules",
                json!({"p_device_id": "ESP32_ALICE_1"}),
            )
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!([])));
        let (status, body) = caller
            .rpc(
                "complete_slave_command",
                json!({"p_command_id": alice_cmd.parse::<i64>().unwrap(), "p_execution_time_ms": 5}),
            )
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!([])));
        let (status, body) = caller
            .send(
                Method::PATCH,
                &format!("/relay_commands_slave?id=eq.{alice_cmd}"),
                Some(json!({"status": "cancelled"})),
                Some("return=representation"),
            )
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!([])));
    }
    assert_eq!(
        world.sql_one(&format!(
            "select status || ' ' || delivery_count from relay_commands_slave where id = {alice_cmd}"
        )),
        "pending 0",
        "the command was neither locked, completed nor cancelled"
    );

    // The master that owns a command completes it the seed's way, with a PATCH.
    let own = world
        .sql_one("select id from relay_commands_slave where master_device_id = 'ESP32_ALICE_2'");
    let (status, body) = alice_master
        .send(
            Method::PATCH,
            &format!("/relay_commands_slave?id=eq.{own}"),
            Some(json!({"status": "completed", "execution_time_ms": 150})),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["status"], "completed");
    assert!(body[0]["completed_at"].is_string(), "completed_at is set");
}

#[tokio::test]
async fn anon_and_bad_tokens_get_nothing() {
    let world = World::start();
    seed_commands_and_rules(&world);
    let anon = world.caller(&Claims::anon());
    let (status, _) = anon.get("/relay_commands_slave").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "anon is refused");
    let (status, _) = anon
        .rpc(
            "get_and_lock_slave_commands",
            json!({"p_master_device_id": "ESP32_ALICE_1"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "anon cannot call the RPC");
    let (status, _) = world.caller_with_token(None).get("/device_status").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token is anon");

    let expired = world
        .stack
        .token(&Claims::user(ALICE).expiring_at(now_secs() - 120));
    let (status, _) = world
        .caller_with_token(Some(expired))
        .get("/device_status")
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an expired token is refused"
    );

    let forged = Claims::service_role().sign("not-the-secret-not-the-secret-32b");
    let (status, _) = world
        .caller_with_token(Some(forged))
        .get("/device_status")
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a token signed with another secret is refused"
    );

    let service = world.caller(&Claims::service_role());
    assert_eq!(
        service
            .column("/device_status?select=device_id", "device_id")
            .await
            .len(),
        4,
        "service_role (never on a Pi) sees everything"
    );
    assert_eq!(
        world.sql_one("select count(*) from relay_commands_slave where status = 'pending'"),
        "4"
    );
}

#[tokio::test]
async fn a_dashboard_user_registers_an_agent_and_a_master_and_reads_them_back_at_once() {
    let world = World::start();
    let alice = world.caller(&Claims::user(ALICE));
    let (status, body) = alice
        .send(
            Method::POST,
            "/edge_agents",
            Some(json!({"agent_id": "pi-new", "owner_id": ALICE})),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body[0]["agent_id"], "pi-new");
    let (status, body) = alice
        .send(
            Method::POST,
            "/device_status",
            Some(json!({"device_id": "ESP32_NEW", "owner_id": ALICE, "agent_id": "pi-new"})),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body[0]["device_id"], "ESP32_NEW");

    // Bob cannot hand himself alice's new agent, nor register a device to alice.
    let bob = world.caller(&Claims::user(BOB));
    let (status, _) = bob
        .send(
            Method::POST,
            "/device_status",
            Some(json!({"device_id": "ESP32_BOBS", "owner_id": BOB, "agent_id": "pi-new"})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = bob
        .send(
            Method::POST,
            "/device_status",
            Some(json!({"device_id": "ESP32_GIFT", "owner_id": ALICE})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The `message` of a PostgREST error answer.
fn message(body: &serde_json::Value) -> &str {
    body["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_revoked_or_foreign_agent_token_is_refused_before_every_request() {
    let world = World::start();
    world.sql(&format!(
        "insert into system_status (owner_id, emergency_stop, emergency_reason) values ('{ALICE}', true, 'pump leak')"
    ));
    for (who, claims) in [
        ("revoked agent", Claims::agent(ALICE, "pi-revoked")),
        (
            "agent claiming another owner",
            Claims::agent(BOB, "pi-alice"),
        ),
        (
            "agent that does not exist",
            Claims::agent(ALICE, "pi-ghost"),
        ),
    ] {
        let caller = world.caller(&claims);
        let attempts = [
            caller.get("/system_status").await,
            caller
                .send(
                    Method::PATCH,
                    &format!("/system_status?owner_id=eq.{ALICE}"),
                    Some(json!({"emergency_stop": false})),
                    Some("return=representation"),
                )
                .await,
            caller
                .send(
                    Method::POST,
                    "/event_logs",
                    Some(json!({"owner_id": ALICE, "event_type": "emergency_stop", "severity": "critical"})),
                    None,
                )
                .await,
            caller
                .rpc(
                    "get_and_lock_slave_commands",
                    json!({"p_master_device_id": "ESP32_ALICE_R"}),
                )
                .await,
            caller.get("/device_status").await,
        ];
        for (status, body) in attempts {
            assert_eq!(status, StatusCode::FORBIDDEN, "{who}: {body}");
            assert!(
                message(&body).starts_with("edge_agent_refused:"),
                "{who}: the refusal says why: {body}"
            );
        }
    }
    assert_eq!(
        world.sql_one("select emergency_stop::text || ' ' || (select count(*) from event_logs) from system_status"),
        "true 0",
        "the latch held and nothing was logged"
    );
    // A live agent of the same owner is not affected.
    let live = world.caller(&Claims::agent(ALICE, "pi-alice"));
    assert_eq!(
        live.column("/system_status?select=emergency_reason", "emergency_reason")
            .await,
        vec!["pump leak".to_string()]
    );
}

#[tokio::test]
async fn only_the_caller_that_serves_a_master_locks_its_commands() {
    let world = World::start();
    world.sql(&format!(
        "insert into device_status (device_id, owner_id, agent_id) values ('ESP32_ALICE_U', '{ALICE}', null);
         insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
         select d, '14:33:5C:38:BF:60', '{{0}}', '{{on}}', '{{60}}'
           from unnest(array['ESP32_ALICE_1', 'ESP32_ALICE_1', 'ESP32_ALICE_U']) d;"
    ));
    let lock = |master: &str| json!({"p_master_device_id": master, "p_limit": 1});

    let alice = world.caller(&Claims::user(ALICE));
    let (status, body) = alice
        .rpc("get_and_lock_slave_commands", lock("ESP32_ALICE_1"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "42501");
    assert!(
        message(&body)
            .starts_with("command_lock_refused: ESP32_ALICE_1 is served by an edge agent"),
        "{body}"
    );
    assert_eq!(
        world.sql_one("select count(*) from relay_commands_slave where status = 'pending'"),
        "3",
        "the refused lock took nothing from the agent"
    );

    let (status, body) = alice
        .rpc("get_and_lock_slave_commands", lock("ESP32_ALICE_U"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["locked_by"], format!("user:{ALICE}"));

    let (status, body) = world
        .caller(&Claims::master(ALICE, "ESP32_ALICE_1"))
        .rpc("get_and_lock_slave_commands", lock("ESP32_ALICE_1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["locked_by"], "device:ESP32_ALICE_1");

    let (status, body) = world
        .caller(&Claims::agent(ALICE, "pi-alice"))
        .rpc("get_and_lock_slave_commands", lock("ESP32_ALICE_1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["locked_by"], "agent:pi-alice");

    // Whoever may not see the master learns nothing, as for a master that does not exist.
    for (claims, master) in [
        (Claims::user(BOB), "ESP32_ALICE_U"),
        (Claims::agent(ALICE, "pi-alice-2"), "ESP32_ALICE_1"),
        (Claims::user(ALICE), "ESP32_NOPE"),
    ] {
        let (status, body) = world
            .caller(&claims)
            .rpc("get_and_lock_slave_commands", lock(master))
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!([])), "{master}");
    }
}

#[tokio::test]
async fn discovery_reveals_nothing_of_a_device_the_agent_does_not_serve() {
    let world = World::start();
    world.sql(&format!(
        "insert into device_status (device_id, owner_id, agent_id, ip_address, config)
         values ('ESP32_ALICE_U', '{ALICE}', null, '10.0.0.5', '{{\"wifi_psk\": \"secret\"}}')"
    ));
    let agent = world.caller(&Claims::agent(ALICE, "pi-alice"));
    for (device, registered) in [
        ("ESP32_ALICE_2", false),
        ("ESP32_ALICE_U", false),
        ("ESP32_BOB_1", false),
        ("ESP32_NEW_1", true),
    ] {
        let (status, body) = agent
            .rpc(
                "register_discovered_device",
                json!({"p_device_id": device, "p_firmware_version": "9.9.9", "p_mac_address": "24:6F:28:00:00:99"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{device}: {body}");
        assert_eq!(
            body,
            json!([{"device_id": device, "registered": registered}]),
            "{device}"
        );
    }
}

#[tokio::test]
async fn the_seeds_completion_records_relay_states_and_wrong_commands_are_refused_by_name() {
    let world = World::start();
    let master = world.caller(&Claims::master(ALICE, "ESP32_ALICE_1"));
    let (status, body) = master
        .send(
            Method::POST,
            "/relay_commands_slave",
            Some(json!({
                "master_device_id": "ESP32_ALICE_1", "slave_mac_address": "14:33:5C:38:BF:60",
                "relay_numbers": [0, 2], "actions": ["on", "on"], "duration_seconds": [60, 0]
            })),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body[0]["id"].as_i64().unwrap();

    // markCommandCompleted, exactly as the seed sends it, then its relay_slaves update.
    let (status, body) = master
        .send(
            Method::PATCH,
            &format!("/relay_commands_slave?id=eq.{id}"),
            Some(json!({"status": "completed", "completed_at": body[0]["created_at"], "execution_time_ms": 150})),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        world.sql_one(
            "select relay_states::text from relay_slaves where master_device_id = 'ESP32_ALICE_1'"
        ),
        "{t,f,t,f,f,f,f,f}",
        "the PATCH recorded the slave's relay states"
    );
    let (status, body) = master
        .send(
            Method::PATCH,
            "/relay_slaves?master_device_id=eq.ESP32_ALICE_1&slave_mac_address=eq.14:33:5C:38:BF:60",
            Some(json!({"relay_states": [true, false, true, false, false, false, false, false]})),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body.as_array().map(Vec::len),
        Some(1),
        "the seed's relay_slaves update finds the row: {body}"
    );

    // A completion before the creation is refused, by name.
    world.sql(
        "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
         values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{1}', '{on}', '{60}')",
    );
    let early = world.sql_one("select max(id) from relay_commands_slave");
    let (status, body) = master
        .send(
            Method::PATCH,
            &format!("/relay_commands_slave?id=eq.{early}"),
            Some(json!({"status": "completed", "completed_at": "2020-01-01T00:00:00Z"})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        message(&body).contains("relay_commands_slave_completed_after_created"),
        "{body}"
    );

    // A master that does not exist and another owner's answer alike, and say what is wrong.
    let alice = world.caller(&Claims::user(ALICE));
    let command = |master: &str, status: &str| {
        json!({
            "master_device_id": master, "slave_mac_address": "14:33:5C:38:BF:60",
            "relay_numbers": [0], "actions": ["on"], "duration_seconds": [60], "status": status
        })
    };
    let mut answers = Vec::new();
    for master in ["ESP32_NOPE", "ESP32_BOB_1"] {
        let (status, body) = alice
            .send(
                Method::POST,
                "/relay_commands_slave",
                Some(command(master, "pending")),
                None,
            )
            .await;
        assert_eq!(
            message(&body),
            format!("relay_commands_slave_unknown_master: unknown device {master}")
        );
        answers.push((status, body["code"].clone(), body["hint"].clone()));
    }
    assert_eq!(answers[0], answers[1], "nothing tells the two apart");
    let (status, body) = alice
        .send(
            Method::POST,
            "/relay_commands_slave",
            Some(command("ESP32_ALICE_1", "queued")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        message(&body).starts_with("relay_commands_slave_status_known: unknown status \"queued\""),
        "{body}"
    );
}
