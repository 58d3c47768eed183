//! Each kind of caller, with a real JWT through real PostgREST, sees and changes exactly what
//! contract 1 says: users their devices, agents their masters, masters themselves, anon nothing.

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
         select d, 'R_' || d, 'rule of ' || d, '{\"conditions\":{},\"actions\":[{\"type\":\"relay_on\"}]}'
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
