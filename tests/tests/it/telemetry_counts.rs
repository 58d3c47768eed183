//! Telemetry dropped at the outbox bound is counted exactly: after an outage in which pushes
//! reached the backend but their answers were lost (as behind a frozen PostgREST or a request
//! timeout), and then the backend refused everything until the outbox overflowed, the agent's
//! drop counter equals the readings missing in the cloud.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use autocore_stack::Claims;

use crate::support::{
    ALICE, MASTER, World, eventually, master_toml, start_agent_overridden, start_sim,
};

const KEY_HEX: &str = "4c1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const SENSORS: usize = 10;

/// What the proxy in front of PostgREST does.
const PASS: u8 = 0;
/// Forwards telemetry pushes (the backend stores them) and answers 504: the answer is lost.
const LOSE_TELEMETRY_ANSWERS: u8 = 1;
/// Answers 503 without forwarding anything: the backend is away.
const AWAY: u8 = 2;

fn fast_sim(world: &World) -> firmware_protocol::sim::SimConfig {
    use firmware_protocol::sim::{SensorSource, SensorSpec};
    let mut config = crate::support::one_master_sim(world, KEY_HEX);
    config.masters[0].sensors = (0..SENSORS)
        .map(|i| SensorSpec {
            name: format!("s{i}"),
            unit: None,
            source: SensorSource::Fixed(i as f64),
        })
        .collect();
    // 10 sensors every 20 ms: 500 readings a second.
    config.timing.telemetry_interval_ms = 20;
    config
}

/// The agent of these tests, serving the one fast master, with the backend at `rest` and one
/// configuration key overridden.
async fn start_agent(world: &World, rest: &str, setting: (&str, &str)) -> crate::support::Agent {
    let jwt = world.stack.token(&Claims::agent(ALICE, "pi-alice"));
    let mqtt = crate::support::agent_mqtt_toml(world, "");
    start_agent_overridden(
        world,
        rest,
        &jwt,
        &mqtt,
        &master_toml(MASTER, KEY_HEX, "mqtt"),
        &[setting],
    )
    .await
}

async fn counter(api: &str, name: &str) -> u64 {
    crate::support::metric(api, &format!("autocore_agent_{name}_total ")).await as u64
}

async fn outbox_depth(api: &str) -> u64 {
    let health: serde_json::Value = reqwest::get(format!("{api}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["outbox"]["depth"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_dropped_at_the_outbox_bound_are_exactly_the_readings_missing_in_the_cloud() {
    let world = World::start_full();
    let mode = Arc::new(AtomicU8::new(PASS));
    let (refuse, lose) = (mode.clone(), mode.clone());
    let rest = crate::support::faulty_proxy(
        world.stack.rest_url().unwrap(),
        crate::support::ProxyFaults {
            refuse: Box::new(move |_| (refuse.load(Ordering::SeqCst) == AWAY).then_some(503)),
            lose_answer: Box::new(move |path, _| {
                lose.load(Ordering::SeqCst) == LOSE_TELEMETRY_ANSWERS
                    && path.ends_with("/rpc/insert_telemetry")
            }),
            ..Default::default()
        },
    )
    .await;

    // Every telemetry message the master publishes, by its time.
    let published = crate::support::telemetry_observer(&world).await;

    let sim_stop = start_sim(fast_sim(&world));
    let agent = start_agent(&world, &rest, ("AUTOCORE_STORE_OUTBOX_ROWS_MAX", "1000")).await;
    eventually("telemetry in the cloud", Duration::from_secs(30), || {
        (world.sql_one("select count(*) from telemetry_data") != "0").then_some(())
    })
    .await;

    // 1. Pushes arrive, answers are lost: those readings are in the cloud, the agent cannot know.
    // One second at 500 readings a second: the readings in doubt fill half the 1,000-row bound.
    mode.store(LOSE_TELEMETRY_ANSWERS, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // 2. The backend is away until the outbox has overflowed several times over.
    mode.store(AWAY, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while counter(&agent.api, "telemetry_dropped").await < 2_000 {
        assert!(tokio::time::Instant::now() < deadline, "nothing dropped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 3. Heal, stop the master, and let the outbox drain.
    mode.store(PASS, Ordering::SeqCst);
    let _ = sim_stop.send(());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while outbox_depth(&agent.api).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox never drained"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dropped = counter(&agent.api, "telemetry_dropped").await;
    let dropped_in_doubt = counter(&agent.api, "telemetry_dropped_in_doubt").await;
    let stored: u64 = world
        .sql_one(&format!(
            "select count(*) from telemetry_data where device_id = '{MASTER}'"
        ))
        .parse()
        .unwrap();
    let first_stored: i64 = world
        .sql_one(&format!(
            "select (extract(epoch from min(recorded_at)) * 1000)::bigint from telemetry_data
              where device_id = '{MASTER}'"
        ))
        .parse()
        .unwrap();
    // What the agent accepted: every message from the first one it stored on.
    let accepted = published
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= first_stored)
        .count() as u64
        * SENSORS as u64;
    agent.shut_down().await;
    assert_eq!(
        dropped_in_doubt, 0,
        "readings in doubt fit in the bound, so none had to go"
    );
    assert_eq!(
        accepted - stored,
        dropped,
        "missing in the cloud ({accepted} accepted - {stored} stored) vs counted as dropped"
    );
}

/// A stop while the outbox drains a backlog into a slow backend: the agent stops at once, cutting
/// short at most the push under way, and leaves the rest for its next run (idempotency keys make
/// the cut push harmless). A drain that never looked at the stop held the agent until the whole
/// backlog was gone: longer than systemd, or a test, waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_long_drain_ends_the_pushes_at_once() {
    use std::sync::atomic::AtomicUsize;
    let world = World::start_full();
    let mode = Arc::new(AtomicU8::new(AWAY));
    let pushes = Arc::new(AtomicUsize::new(0));
    let (refuse, counted) = (mode.clone(), pushes.clone());
    let is_push = |path: &str| path.ends_with("/rpc/insert_telemetry");
    let rest = crate::support::faulty_proxy(
        world.stack.rest_url().unwrap(),
        crate::support::ProxyFaults {
            // Only telemetry is refused: the rest of the link stays up.
            refuse: Box::new(move |path| {
                if !is_push(path) {
                    None
                } else if refuse.load(Ordering::SeqCst) == AWAY {
                    Some(503)
                } else {
                    counted.fetch_add(1, Ordering::SeqCst);
                    None
                }
            }),
            delay: Box::new(move |path| is_push(path).then_some(Duration::from_millis(400))),
            ..Default::default()
        },
    )
    .await;
    let sim_stop = start_sim(fast_sim(&world));
    let agent = start_agent(&world, &rest, ("AUTOCORE_CLOUD_PUSH_BATCH_ROWS_MAX", "50")).await;
    // A backlog of 30 pushes or more: 12 s of draining at 400 ms each.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while outbox_depth(&agent.api).await < 1_500 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backlog built up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sim_stop.send(());
    mode.store(PASS, Ordering::SeqCst);
    eventually("the drain under way", Duration::from_secs(30), || {
        (pushes.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;

    let before_stop = pushes.load(Ordering::SeqCst);
    agent.shut_down().await;
    let during_stop = pushes.load(Ordering::SeqCst) - before_stop;
    // The push under way, and one begun in the 200 ms the agent takes to say it is going.
    assert!(
        during_stop <= 2,
        "{during_stop} pushes began after the stop: the drain went on"
    );
}
