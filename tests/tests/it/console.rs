//! The operator console in a real browser: headless Chromium driven by playwright-core
//! (`tests/console/console.mjs`) against the agent on the local stack with `esp32-sim`. The
//! script does what an operator does; at each `STEP` it prints, this test checks the other
//! side: what the simulated master reports of its relays, the latch, the backend. Screenshots
//! of every page (desktop and 360 px) land in `target/console-screenshots/`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use autocore_stack::{Claims, Role, repo_root};
use firmware_protocol::sim::rumqttc::QoS;
use firmware_protocol::sim::{SensorSource, SensorSpec};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::support::{
    ALICE, MASTER, SLAVE, World, eventually, master_toml, observe_json, one_master_sim,
    start_agent, start_sim,
};

const KEY_HEX: &str = "6d1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const OPERATOR: &str = "operator-token-for-the-console-tests";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The browser and its driver, or why this machine cannot run the test.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let driver = repo_root().join("tools/node_modules/playwright-core/index.mjs");
    if !driver.exists() {
        return Err(format!(
            "{} is missing (scripts/install-deps)",
            driver.display()
        ));
    }
    if !PathBuf::from(CHROMIUM).exists() {
        return Err(format!("{CHROMIUM} is missing (scripts/install-deps)"));
    }
    Ok((driver, PathBuf::from(CHROMIUM)))
}

/// What the simulated master last reported of SLAVE's relays (its retained state topic).
async fn relay_observer(world: &World) -> Arc<Mutex<Option<Vec<bool>>>> {
    let seen = Arc::new(Mutex::new(None));
    let sink = seen.clone();
    let login = world
        .stack
        .broker_login(Role::Monitor, "console-observer")
        .unwrap();
    observe_json(
        &world.stack.mqtt_url().unwrap(),
        &login,
        &format!("autocore/devices/{MASTER}/relays/state"),
        QoS::AtLeastOnce,
        move |v| {
            if let Some(slave) = v["slaves"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["mac"] == SLAVE))
            {
                let states = slave["relay_states"]
                    .as_array()
                    .map(|a| a.iter().map(|b| b.as_bool() == Some(true)).collect());
                *sink.lock().unwrap() = states;
            }
        },
    )
    .await;
    seen
}

/// Waits until the simulated slave reports relays matching `want` (10 s at most).
async fn sim_reports(
    seen: &Arc<Mutex<Option<Vec<bool>>>>,
    what: &str,
    want: impl Fn(&[bool]) -> bool,
) {
    eventually(what, Duration::from_secs(10), || {
        seen.lock()
            .unwrap()
            .as_deref()
            .filter(|s| want(s))
            .map(|_| ())
    })
    .await;
}

async fn latched(api: &str) -> bool {
    let body: Value = reqwest::get(format!("{api}/emergency"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["latched"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_plant_from_the_console_in_a_real_browser() {
    let (driver, chromium) = match browser() {
        Ok(b) => b,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the console's browser test cannot run in CI: {why}")
        }
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let mut world = World::start_full();
    // The seed's pH rule on relay 0, so that the Rules page has a firing to explain.
    let (status, body) = world
        .caller(&Claims::user(ALICE))
        .send(
            Method::POST,
            "/decision_rules",
            Some(json!({
                "device_id": MASTER, "rule_id": "RULE_001", "rule_name": "Ajustar pH quando baixo",
                "rule_json": {
                    "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
                    "actions": [{"type": "relay_on", "slave_mac_address": SLAVE, "relay_number": 0,
                                 "duration_seconds": 2}]
                },
                "enabled": true, "priority": 50, "cooldown_seconds": 5, "max_executions_per_hour": 100
            })),
            Some("return=representation"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A macro: relay 1 on at once, off a minute later (long enough to be seen running).
    let macro_id = world.sql_one(&format!(
        "insert into macros (owner_id, agent_id, name) values ('{ALICE}', 'pi-alice', 'Fill the tank') returning id"
    ));
    let relay = |action: &str| {
        format!(
            r#"{{"master_device_id": "{MASTER}", "slave_mac_address": "{SLAVE}", "relay_number": 1, "action": "{action}", "duration_seconds": 120}}"#
        )
    };
    world.sql(&format!(
        "insert into macro_actions (macro_id, sequence, action_type, action_payload, delay_ms) values
           ('{macro_id}', 0, 'relay', '{}', 0), ('{macro_id}', 1, 'relay', '{}', 60000)",
        relay("on"),
        relay("off")
    ));
    let tail = format!(
        "[engine]\nstale_after_ms = 5000\n[safety]\noperator_token = \"{OPERATOR}\"\n\
         [[safety.mutex_groups]]\nname = \"motor\"\nmaster = \"{MASTER}\"\nslave_mac = \"{SLAVE}\"\nrelays = [2, 3]\n{}",
        master_toml(MASTER, KEY_HEX, "mqtt")
    );
    let agent = start_agent(&world, &tail).await;
    let seen = relay_observer(&world).await;
    // pH from 6.8 down to 6.0 in 4 s, then steady: the rule fires once per cooldown.
    let mut sim = one_master_sim(&world, KEY_HEX);
    sim.masters[0].sensors = vec![SensorSpec {
        name: "ph".into(),
        unit: Some("pH".into()),
        source: SensorSource::Ramp {
            from: 6.8,
            to: 6.0,
            steps: 20,
        },
    }];
    let _sim = start_sim(sim);

    let screenshots = repo_root().join("target/console-screenshots");
    let mut script = tokio::process::Command::new("node")
        .arg(repo_root().join("tests/console/console.mjs"))
        .env("CONSOLE_URL", &agent.api)
        .env("OPERATOR_TOKEN", OPERATOR)
        .env("MASTER", MASTER)
        .env("SLAVE", SLAVE)
        .env("MACRO_ID", &macro_id)
        .env("PLAYWRIGHT_CORE", &driver)
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOTS", &screenshots)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs the console script");
    let mut answers = script.stdin.take().unwrap();
    let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
    let mut agent = Some(agent);
    let mut steps = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("the console script finishes within 4 minutes")
            .unwrap();
        let Some(line) = line else { break };
        eprintln!("console.mjs: {line}");
        if line == "DONE" {
            steps.push("DONE".to_string());
            break;
        }
        let Some(step) = line.strip_prefix("STEP ") else {
            continue;
        };
        let api = agent.as_ref().map(|a| a.api.clone()).unwrap_or_default();
        match step {
            "refused-requests" => {
                // Nothing reached the relays.
                sim_reports(&seen, "the slave reports relay 1 off", |s| !s[1]).await;
            }
            "relay1-on" | "hold-on" | "key-hold-on" | "hold-on-again" | "relay1-on-offline"
            | "macro-running" => {
                sim_reports(
                    &seen,
                    &format!("{step}: the slave reports relay 1 on"),
                    |s| s[1],
                )
                .await
            }
            "relay1-off" | "hold-released" | "key-hold-released" | "macro-cancelled-relay-off" => {
                sim_reports(
                    &seen,
                    &format!("{step}: the slave reports relay 1 off"),
                    |s| !s[1],
                )
                .await
            }
            "hold-still-on" => {
                let states = seen.lock().unwrap().clone().unwrap();
                assert!(states[1], "held past the lease: still on at the slave");
            }
            "hold-page-closed" => {
                // Within sim_reports' 10 s: the 1 s lease lapsed, long before the hold's 60 s.
                sim_reports(&seen, "the page closed mid-hold: relay 1 off", |s| !s[1]).await;
            }
            "mutex-refused" => {
                let states = seen.lock().unwrap().clone().unwrap();
                assert!(
                    !states[2] && !states[3],
                    "neither motor relay went on: {states:?}"
                );
            }
            "stop-backend" => world.stack.stop_backend(),
            "stopped" => {
                assert!(latched(&api).await, "the agent is latched");
                sim_reports(&seen, "every simulated relay off after the stop", |s| {
                    s.iter().all(|on| !on)
                })
                .await;
            }
            "switch-refused-latched" => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let states = seen.lock().unwrap().clone().unwrap();
                assert!(
                    states.iter().all(|on| !on),
                    "nothing went on while latched: {states:?}"
                );
            }
            "reset" => assert!(!latched(&api).await, "the reset lifted the latch"),
            "shut-down-agent" => agent.take().unwrap().shut_down().await,
            other => panic!("unknown step {other}"),
        }
        steps.push(step.to_string());
        answers.write_all(b"ok\n").await.unwrap();
    }
    drop(answers);
    let status = tokio::time::timeout(Duration::from_secs(30), script.wait())
        .await
        .expect("the console script exits")
        .unwrap();
    assert!(
        status.success(),
        "the console script failed after {steps:?}"
    );
    assert_eq!(steps.last().map(String::as_str), Some("DONE"), "{steps:?}");
    if let Some(agent) = agent {
        agent.shut_down().await;
    }
}
