//! The decision engine on the real stack with `esp32-sim` ramping pH from 6.8 to 6.0: the seed's
//! rule (created through PostgREST as the dashboard does) fires once per cooldown, the relay goes
//! on for its duration, and the cloud gets each command and each execution record exactly once —
//! with the backend up, and with it stopped (the records arrive after it returns). Then the
//! emergency stop from the local API and from the cloud, and its reset.

use std::time::Duration;

use autocore_stack::Claims;
use firmware_protocol::sim::{SensorSource, SensorSpec};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{
    ALICE, Agent, MASTER, SLAVE, World, eventually, insert_command, master_toml, one_master_sim,
    start_agent, start_sim, until_status,
};

const KEY_HEX: &str = "3b1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const OPERATOR: &str = "operator-secret-for-tests";
/// Short enough for a test, long enough to see several firings apart.
const COOLDOWN_S: i64 = 3;
const DURATION_S: i64 = 2;

/// Creates a rule of MASTER as the dashboard does (PostgREST, alice's token); returns its id.
async fn create_rule(world: &World, rule: Value) -> String {
    let alice = world.caller(&Claims::user(ALICE));
    let mut row = json!({"device_id": MASTER});
    row.as_object_mut()
        .unwrap()
        .extend(rule.as_object().unwrap().clone());
    let (status, body) = alice
        .send(
            Method::POST,
            "/decision_rules",
            Some(row),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body[0]["id"].as_str().unwrap().to_string()
}

/// The seed's rule, with a test-sized cooldown and duration.
async fn create_seed_rule(world: &World) -> String {
    create_rule(
        world,
        json!({
            "rule_id": "RULE_001", "rule_name": "Ajustar pH quando baixo",
            "rule_json": {
                "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
                "actions": [{"type": "relay_on", "slave_mac_address": SLAVE, "relay_number": 0,
                             "duration_seconds": DURATION_S}]
            },
            "enabled": true, "priority": 50, "cooldown_seconds": COOLDOWN_S,
            "max_executions_per_hour": 100
        }),
    )
    .await
}

/// pH from 6.8 down to 6.0 in 4 s (a reading every 200 ms), then steady at 6.0.
fn ramping_sim(world: &World) -> firmware_protocol::sim::SimConfig {
    let mut sim = one_master_sim(world, KEY_HEX);
    sim.masters[0].sensors = vec![SensorSpec {
        name: "ph".into(),
        unit: Some("pH".into()),
        source: SensorSource::Ramp {
            from: 6.8,
            to: 6.0,
            steps: 20,
        },
    }];
    sim
}

async fn agent(world: &World) -> Agent {
    let tail = format!(
        "[engine]\nstale_after_ms = 5000\n[safety]\noperator_token = \"{OPERATOR}\"\n{}",
        master_toml(MASTER, KEY_HEX, "mqtt")
    );
    start_agent(world, &tail).await
}

/// Waits until the agent's mirror holds the rule (so the engine runs it offline too).
async fn until_mirrored(agent: &Agent, rule_id: &str) {
    let db = agent.db.clone();
    let rule_id = rule_id.to_string();
    eventually(
        "the rule reached the agent's mirror",
        Duration::from_secs(30),
        || {
            let store = autocore_agent::store::Store::open(&db).ok()?;
            (!store.rules_named(&rule_id).ok()?.is_empty()).then_some(())
        },
    )
    .await;
}

/// Execution times (ms) of the rule's firings as the cloud has them, oldest first, checked to
/// match the commands one to one.
fn cloud_firings(world: &World) -> Vec<i64> {
    world
        .sql(
            "select (extract(epoch from executed_at) * 1000)::bigint from rule_executions
             where rule_id = 'RULE_001' and result = 'executed' order by executed_at",
        )
        .iter()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Every execution names exactly one command, and that command is in the cloud exactly once,
/// labelled as the rule's, completed on the slave.
fn assert_each_execution_has_its_one_command(world: &World) {
    let broken = world.sql(
        "select e.id, count(c.id), string_agg(c.status, ',') from rule_executions e
           left join relay_commands_slave c on c.client_id = any (e.command_client_ids)
          where e.rule_id = 'RULE_001'
          group by e.id
         having count(c.id) <> 1 or cardinality(min(e.command_client_ids)) <> 1
             or bool_or(c.status <> 'completed') or bool_or(c.command_type <> 'rule')
             or bool_or(c.triggered_by <> 'rule') or bool_or(c.rule_id <> 'RULE_001')
             or bool_or(c.priority <> 50) or bool_or(c.rule_name <> 'Ajustar pH quando baixo')",
    );
    assert!(
        broken.is_empty(),
        "executions without exactly one proper command: {broken:?}"
    );
    let orphans = world.sql_one(
        "select count(*) from relay_commands_slave c where c.command_type = 'rule'
           and not exists (select 1 from rule_executions e where c.client_id = any (e.command_client_ids))",
    );
    assert_eq!(orphans, "0", "every rule command belongs to an execution");
}

/// Consecutive firings are a cooldown apart: never sooner (the cooldown holds), and not much
/// later (a reading comes every 200 ms while pH stays below 6.5).
fn assert_once_per_cooldown(times: &[i64]) {
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (COOLDOWN_S * 1000..COOLDOWN_S * 1000 + 1_500).contains(&gap),
            "firings {gap} ms apart, want one per {COOLDOWN_S} s cooldown: {times:?}"
        );
    }
}

async fn api(
    agent: &Agent,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut request = client
        .request(method, format!("{}{path}", agent.api))
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_ph_rule_fires_once_per_cooldown_and_the_cloud_learns_each_firing_once() {
    let world = World::start_full();
    let rule = create_seed_rule(&world).await;
    let agent = agent(&world).await;
    until_mirrored(&agent, "RULE_001").await;
    let _sim = start_sim(ramping_sim(&world));

    // The relay goes on when pH falls below 6.5.
    eventually("relay 0 on in the cloud", Duration::from_secs(30), || {
        (world.sql(&format!(
            "select coalesce(relay_states[1], false) from relay_slaves
              where master_device_id = '{MASTER}' and slave_mac_address = '{SLAVE}'"
        )) == ["t"])
        .then_some(())
    })
    .await;
    eventually("four firings in the cloud", Duration::from_secs(30), || {
        (cloud_firings(&world).len() >= 4).then_some(())
    })
    .await;
    // Stop the rule and let the last duration run out: the relay goes off by itself.
    world.sql(&format!(
        "update decision_rules set enabled = false where id = '{rule}'"
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let times = cloud_firings(&world);
    assert_once_per_cooldown(&times);
    eventually(
        "relay 0 off after its duration",
        Duration::from_secs(15),
        || {
            (world.sql_one(&format!(
                "select relay_states[1] from relay_slaves
              where master_device_id = '{MASTER}' and slave_mac_address = '{SLAVE}'"
            )) == "f")
                .then_some(())
        },
    )
    .await;
    eventually("every command reported", Duration::from_secs(20), || {
        (world.sql_one("select count(*) from relay_commands_slave where command_type = 'rule'")
            == times.len().to_string())
        .then_some(())
    })
    .await;
    assert_each_execution_has_its_one_command(&world);

    // `autocore-agent rules test` replays the rule over the readings the Pi kept and lists when
    // it would have fired: the same firings, a cooldown apart.
    let now = autocore_agent::shared::now_ms();
    let report = autocore_agent::cli::rules_test(
        &agent.config,
        &autocore_agent::cli::RuleUnderTest::Named("RULE_001".into()),
        now - 600_000,
        now,
    )
    .unwrap();
    let replayed = report.lines().filter(|l| l.starts_with("  ")).count();
    assert!(
        replayed + 1 >= times.len() && replayed <= times.len() + 1,
        "replay lists about the live firings ({} live):\n{report}",
        times.len()
    );
    assert!(report.contains("< 6.5"), "{report}");
    let explanation = world.sql_one(
        "select explanation from rule_executions where rule_id = 'RULE_001' order by executed_at limit 1",
    );
    assert!(
        explanation.contains("< 6.5")
            && explanation.contains("this hour")
            && explanation.contains("interlocks ok")
            && explanation.contains(&format!("relay 0 on {DURATION_S} s")),
        "the record explains itself: {explanation}"
    );
    let readings = world.sql_one(
        "select readings::text from rule_executions where rule_id = 'RULE_001' order by executed_at limit 1",
    );
    assert!(
        readings.contains("\"ph\""),
        "the readings that made it true: {readings}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_backend_stopped_the_rule_still_fires_and_the_records_arrive_after_it_returns() {
    let mut world = World::start_full();
    create_seed_rule(&world).await;
    let agent = agent(&world).await;
    until_mirrored(&agent, "RULE_001").await;
    world.stack.stop_backend();
    let _sim = start_sim(ramping_sim(&world));

    // Offline: the engine fires on the Pi and the slave runs the commands.
    let db = agent.db.clone();
    let done_offline = eventually(
        "three rule commands completed offline",
        // Three firings a cooldown apart take about 15 s idle; a bound, not a target, wide
        // enough for a machine busy with other work.
        Duration::from_secs(120),
        || {
            let store = autocore_agent::store::Store::open(&db).ok()?;
            let open = store.open_commands().ok()?;
            let completed: usize = store
                .outbox_due(i64::MAX, 10_000)
                .ok()?
                .iter()
                .filter(|r| r.class == autocore_agent::store::OutboxClass::RuleCommand)
                .filter(|r| r.payload["command_type"] == "rule")
                .filter(|r| r.payload["status"] == "completed")
                .count();
            (completed >= 3 && open.is_empty()).then_some(completed)
        },
    )
    .await;
    world.stack.restart_backend().expect("backend returns");
    // Disable the rule so the count settles; the Pi learns of it through the mirror.
    world.sql("update decision_rules set enabled = false where rule_id = 'RULE_001'");
    eventually(
        "every offline firing reached the cloud",
        Duration::from_secs(60),
        || {
            let executions = cloud_firings(&world).len();
            let commands: usize = world
                .sql_one("select count(*) from relay_commands_slave where command_type = 'rule'")
                .parse()
                .unwrap();
            (executions >= done_offline && executions == commands).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let times = cloud_firings(&world);
    assert_once_per_cooldown(&times);
    assert_each_execution_has_its_one_command(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emergency_stop_switches_everything_off_blocks_commands_and_holds_until_reset() {
    let world = World::start_full();
    let agent = agent(&world).await;
    let _sim = start_sim(one_master_sim(&world, KEY_HEX));
    let on = insert_command(&world, MASTER, SLAVE, 1, 600);
    until_status(&world, &on, "completed", Duration::from_secs(30)).await;

    let (status, body) = api(
        &agent,
        Method::POST,
        "/emergency/stop",
        None,
        json!({"reason": "leak", "by": "test"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "anyone may stop: {body}");
    eventually(
        "every relay off in the cloud",
        Duration::from_secs(20),
        || {
            (world.sql_one(&format!(
                "select bool_or(s) from relay_slaves, unnest(relay_states) s
              where master_device_id = '{MASTER}'"
            )) == "f")
                .then_some(())
        },
    )
    .await;
    eventually("the dashboard shows the latch and a critical event", Duration::from_secs(20), || {
        let latched = world.sql_one("select coalesce(bool_or(emergency_stop), false) from system_status");
        let events = world.sql_one("select count(*) from event_logs where event_type = 'emergency_stop' and severity = 'critical'");
        (latched == "t" && events == "1").then_some(())
    })
    .await;
    // Blocked: a command from the dashboard fails with the reason.
    let blocked = insert_command(&world, MASTER, SLAVE, 2, 30);
    until_status(&world, &blocked, "failed", Duration::from_secs(30)).await;
    let reason = world.sql_one(&format!(
        "select error_message from relay_commands_slave where id = {blocked}"
    ));
    assert!(reason.contains("emergency"), "{reason}");

    // Only the operator may reset.
    let (status, _) = api(&agent, Method::POST, "/emergency/reset", None, json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api(
        &agent,
        Method::POST,
        "/emergency/reset",
        Some("wrong"),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = api(
        &agent,
        Method::POST,
        "/emergency/reset",
        Some(OPERATOR),
        json!({"by": "operator"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("the cloud's latch lifted", Duration::from_secs(20), || {
        (world.sql_one("select bool_or(emergency_stop) from system_status") == "f").then_some(())
    })
    .await;
    let after = insert_command(&world, MASTER, SLAVE, 2, 5);
    until_status(&world, &after, "completed", Duration::from_secs(30)).await;

    // From the dashboard: alice sets the latch in system_status; the agent stops the plant.
    world.sql(&format!(
        "update system_status set emergency_stop = true, emergency_reason = 'from the dashboard',
            emergency_changed_at = now() + interval '1 second', emergency_changed_by = 'alice'
          where owner_id = '{ALICE}'"
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, state) = api(&agent, Method::GET, "/emergency", None, Value::Null).await;
        if state["latched"] == true {
            assert_eq!(state["emergency"]["reason"], "from the dashboard");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never latched from the cloud: {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = insert_command(&world, MASTER, SLAVE, 3, 5);
    until_status(&world, &refused, "failed", Duration::from_secs(30)).await;
    agent.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_the_engine_cannot_run_gets_its_reason_in_the_dashboard_and_clears_when_fixed() {
    let world = World::start_full();
    // The database now refuses this rule (sql/tests/120_rule_validation.sql); a row stored before
    // that check (triggers off, as the migration found it) is what the engine still meets.
    world.sql(&format!(
        "set session_replication_role = replica;
         insert into decision_rules (device_id, rule_id, rule_name, rule_json) values ('{MASTER}', 'RULE_BAD', 'typo',
           '{{\"conditions\": {{\"type\": \"sensor_compare\", \"sensor\": \"ph\", \"operator\": \"=<\", \"value\": 6.5}},
             \"actions\": [{{\"type\": \"relay_on\", \"slave_mac_address\": \"{SLAVE}\", \"relay_number\": 0}}]}}')"
    ));
    let _agent = agent(&world).await;
    let error = eventually(
        "the engine's reason in last_error",
        Duration::from_secs(30),
        || {
            let e = world.sql_one(
                "select coalesce(last_error, '-') from decision_rules where rule_id = 'RULE_BAD'",
            );
            (e != "-").then_some(e)
        },
    )
    .await;
    assert!(
        error.contains("=<") && error.contains("operator"),
        "{error}"
    );
    assert_eq!(
        world.sql_one("select revision from decision_rules where rule_id = 'RULE_BAD'"),
        "1",
        "writing the error back is not an edit"
    );
    world.sql(
        "update decision_rules set rule_json = jsonb_set(rule_json, '{conditions,operator}', '\"<=\"')
          where rule_id = 'RULE_BAD'",
    );
    eventually(
        "the error cleared once the rule is fixed",
        Duration::from_secs(30),
        || {
            (world.sql_one(
                "select coalesce(last_error, '-') from decision_rules where rule_id = 'RULE_BAD'",
            ) == "-")
                .then_some(())
        },
    )
    .await;
}

/// A slave that boots with both relays of a mutex group on (its configured boot state, or a
/// board switched by hand) has the whole group switched off by the agent at once, recorded as
/// an event in the cloud and listed in `/health`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutex_group_found_violated_at_boot_is_switched_off_at_once_and_reported() {
    let world = World::start_full();
    let mut sim = one_master_sim(&world, KEY_HEX);
    for relay in [2, 3] {
        sim.masters[0].slaves[0].relays[relay].boot_on = true;
    }
    let tail = format!(
        "[safety]\noperator_token = \"{OPERATOR}\"\n[[safety.mutex_groups]]\nname = \"motor direction\"\nmaster = \"{MASTER}\"\nslave_mac = \"{SLAVE}\"\nrelays = [2, 3]\n{}",
        master_toml(MASTER, KEY_HEX, "mqtt")
    );
    let agent = start_agent(&world, &tail).await;
    let _sim = start_sim(sim);
    let event = eventually(
        "the violation recorded in the cloud",
        Duration::from_secs(30),
        || {
            world
                .sql("select message from event_logs where event_type = 'mutex_violation'")
                .into_iter()
                .next()
        },
    )
    .await;
    assert!(
        event.contains("motor direction") && event.contains("relays 2, 3 on"),
        "{event}"
    );
    // The slave's own report says both are off now.
    eventually(
        "the group off in relay_slaves",
        Duration::from_secs(30),
        || {
            (world.sql_one(&format!(
                "select relay_states[3:4]::text from relay_slaves where slave_mac_address = '{SLAVE}'"
            )) == "{f,f}")
                .then_some(())
        },
    )
    .await;
    let health: Value = reqwest::get(format!("{}/health", agent.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = &health["automation"]["mutex_violations"];
    assert_eq!(listed[0]["group"], "motor direction", "{health}");
    assert_eq!(listed[0]["relays_on"], json!([2, 3]), "{health}");
    agent.shut_down().await;
}
