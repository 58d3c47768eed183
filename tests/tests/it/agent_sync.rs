//! One sync per agent per tick (docs/decisions/0021-one-sync-per-agent.md) with a real agent:
//! a backlog on one master is drained in large batches without starving another master.

use std::time::Duration;

use autocore_stack::Claims;

use crate::support::{
    ALICE, World, agent_mqtt_toml, eventually, insert_command, insert_pending_commands,
    master_toml, start_agent_overridden,
};

const KEY_A: &str = "9a1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const KEY_B: &str = "1a1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const BACKLOG: &str = "ESP32_ALICE_1";
const OTHER: &str = "ESP32_ALICE_3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_2000_does_not_starve_another_master_and_drains_in_large_batches() {
    let world = World::start_full();
    world.sql(&format!(
        "insert into device_status (device_id, owner_id, agent_id, mac_address)
         values ('{OTHER}', 'a0000000-0000-0000-0000-000000000001', 'pi-alice', '24:6F:28:00:00:05')"
    ));
    insert_pending_commands(&world, BACKLOG, 2_000);
    let lone = insert_command(&world, OTHER, "14:33:5C:38:BF:60", 1, 30);
    // Masters that poll the agent's local API: what is measured is the sync, not delivery.
    // A total no bigger than one master's limit: only the round-robin across masters lets the
    // lone command in (the backlog's priorities run up to 100, above its 10).
    let agent = start_agent_overridden(
        &world,
        &world.stack.rest_url().unwrap(),
        &world.stack.token(&Claims::agent(ALICE, "pi-alice")),
        &agent_mqtt_toml(&world, ""),
        &format!(
            "{}{}",
            master_toml(BACKLOG, KEY_A, "poll"),
            master_toml(OTHER, KEY_B, "poll")
        ),
        &[
            ("AUTOCORE_CLOUD_LOCK_BATCH_MAX", "100"),
            ("AUTOCORE_CLOUD_LOCK_BATCH_TOTAL", "100"),
        ],
    )
    .await;
    eventually(
        "the other master's command locked",
        Duration::from_secs(20),
        || {
            (world.sql_one(&format!(
                "select status from relay_commands_slave where id = {lone}"
            )) != "pending")
                .then_some(())
        },
    )
    .await;
    // The first tick: the lone command was locked in the same call (the same transaction
    // time) as the first batch of the backlog, which took the rest of the total.
    let first_batch = world.sql_one(&format!(
        "select count(*) from relay_commands_slave
          where master_device_id = '{BACKLOG}'
            and locked_at = (select locked_at from relay_commands_slave where id = {lone})"
    ));
    assert_eq!(
        first_batch, "99",
        "the lone command came with the backlog's first batch"
    );
    assert_eq!(
        world.sql_one(&format!(
            "select count(*) from relay_commands_slave
              where master_device_id = '{BACKLOG}' and locked_at is not null
                and locked_at < (select locked_at from relay_commands_slave where id = {lone})"
        )),
        "0",
        "no backlog command was locked before it"
    );
    // The backlog keeps draining with no new command to wake the sync, a batch at a time.
    eventually("500 of the backlog locked", Duration::from_secs(30), || {
        (world
            .sql_one(&format!(
                "select count(*) from relay_commands_slave where master_device_id = '{BACKLOG}' and delivery_count > 0"
            ))
            .parse::<u32>()
            .unwrap_or(0)
            >= 500)
            .then_some(())
    })
    .await;
    let biggest_batch: u32 = world
        .sql_one(&format!(
            "select max(n) from (select count(*) n from relay_commands_slave
              where master_device_id = '{BACKLOG}' and locked_at is not null group by locked_at) b"
        ))
        .parse()
        .unwrap();
    assert_eq!(biggest_batch, 100, "the backlog drains 100 per sync");
    agent.shut_down().await;
}

/// Two sync calls with one request id at once (a retry and the lost call it repeats, both let
/// go when a frozen PostgREST resumes) lock one set of commands, and both answers name it.
/// Unserialised, each locked a command and the agent heard of one: the other stayed locked in
/// the cloud until the lock timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_calls_with_one_request_id_at_once_lock_one_set_and_both_return_it() {
    let world = World::start_full();
    insert_command(&world, BACKLOG, "14:33:5C:38:BF:60", 0, 30);
    insert_command(&world, BACKLOG, "14:33:5C:38:BF:60", 1, 30);
    let url = world.stack.pg_url().unwrap();
    let claims = serde_json::json!({"role": "authenticated", "agent_id": "pi-alice", "sub": ALICE})
        .to_string();
    // As PostgREST runs a call: one transaction, the caller's claims and role. One command per
    // call, so that two calls that both lock take different ones.
    let begin_as_agent = |client: tokio_postgres::Client| {
        let claims = claims.clone();
        async move {
            client
                .batch_execute(&format!(
                    "begin; select set_config('request.jwt.claims', '{claims}', true); set local role authenticated;"
                ))
                .await
                .unwrap();
            client
        }
    };
    const CALL: &str =
        "select public.sync_agent('{}'::jsonb, null, 1, 1, 30, 'race-request-0001')::text";
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    };
    let first = begin_as_agent(connect().await).await;
    let first_answer: String = first.query_one(CALL, &[]).await.unwrap().get(0);
    let second = begin_as_agent(connect().await).await;
    let second_call = tokio::spawn(async move {
        let answer: String = second.query_one(CALL, &[]).await.unwrap().get(0);
        second.batch_execute("commit").await.unwrap();
        answer
    });
    // The second call runs while the first has not committed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.batch_execute("commit").await.unwrap();
    let second_answer = second_call.await.unwrap();

    let ids = |answer: &str| -> Vec<i64> {
        let answer: serde_json::Value = serde_json::from_str(answer).unwrap();
        answer["commands"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["id"].as_i64()).collect())
            .unwrap_or_default()
    };
    assert_eq!(ids(&first_answer).len(), 1, "{first_answer}");
    assert_eq!(
        ids(&second_answer),
        ids(&first_answer),
        "a retry gets what the call it repeats locked"
    );
    assert_eq!(
        world.sql_one("select count(*) from relay_commands_slave where status = 'processing'"),
        "1",
        "nothing is locked that no answer names"
    );
}
