//! `autocore-agent doctor` on the real stack: a healthy set-up passes every check it owns and
//! exits 0 unless the host fails one of its own (a CI disk has taken 400 ms for an fsync);
//! a wrong broker password, a stopped broker, a token signed with the wrong secret and an expired
//! one each fail their check with the reason and what to do, and exit 1. Beside a running agent
//! doctor reads the broker's state from its /health instead of taking its session over.

use std::path::{Path, PathBuf};
use std::process::Command;

use autocore_agent::doctor::{self, Level, Report};
use autocore_stack::jwt::now_secs;
use autocore_stack::{Claims, Role};

use crate::support::{ALICE, MASTER, World, master_toml, start_agent};

const KEY_HEX: &str = "4c1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";

/// An agent's state directory with a database in which MASTER was heard just now and has
/// signed one command, as a run of the agent leaves it.
fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("agent.db");
    let mut store = autocore_agent::store::Store::open(&db).unwrap();
    store
        .record_presence(
            MASTER,
            true,
            Some("1.0.0"),
            None,
            autocore_agent::shared::now_ms(),
        )
        .unwrap();
    store
        .next_signing_counter(MASTER, autocore_agent::shared::now_ms())
        .unwrap();
    (dir, db)
}

/// Writes a 0600 configuration for pi-alice in `dir`, named `name`. The local API's port 0 is
/// never a running agent's, so doctor connects to the broker itself.
fn config(dir: &Path, name: &str, db: &Path, world: &World, jwt: &str, password: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"
            [agent]
            id = "pi-alice"
            [store]
            path = "{db}"
            [cloud]
            rest_url = "{rest}"
            jwt = "{jwt}"
            [mqtt]
            url = "{mqtt}"
            username = "pi-alice"
            password = "{password}"
            [api]
            listen = "127.0.0.1:0"
            [safety]
            operator_token = "a-long-enough-operator-token"
            [[masters]]
            device_id = "{MASTER}"
            key = "{KEY_HEX}"
            "#,
            db = db.display(),
            rest = world.stack.rest_url().unwrap(),
            mqtt = world.stack.mqtt_url().unwrap(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn level(report: &Report, check: &str) -> Level {
    report
        .find(check)
        .unwrap_or_else(|| panic!("no {check} line:\n{}", report.text()))
        .level
}

/// Asserts that `check` failed, with `words` in its finding and a hint.
fn assert_fails(report: &Report, check: &str, words: &str) {
    let finding = report
        .find(check)
        .unwrap_or_else(|| panic!("no {check} line:\n{}", report.text()));
    assert_eq!(finding.level, Level::Fail, "{}", report.text());
    assert!(finding.message.contains(words), "{}", report.text());
    assert!(
        finding.hint.as_deref().is_some_and(|h| !h.is_empty()),
        "{}",
        report.text()
    );
}

fn binary(config: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_autocore-agent-under-test"))
        .arg("doctor")
        .arg("-c")
        .arg(config)
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .expect("the agent's binary runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_set_up_passes_every_check_it_owns_and_exits_0_unless_the_host_fails_one() {
    let world = World::start_full();
    let login = world.stack.broker_login(Role::Agent, "pi-alice").unwrap();
    let jwt = world
        .stack
        .token(&Claims::agent(ALICE, "pi-alice").expiring_at(now_secs() + 30 * 86_400));
    let (dir, db) = state_dir();
    let path = config(dir.path(), "agent.toml", &db, &world, &jwt, &login.password);

    let report = doctor::run(&path).await;
    let text = report.text();
    for check in product_checks() {
        assert_eq!(level(&report, &check), Level::Ok, "{check}:\n{text}");
    }
    // What the host gives (NTP, a disk shared with other jobs) is measured, not assumed: a CI
    // disk has taken 400 ms for one fsync. It may warn or fail; the verdict must follow it.
    let host_failed = HOST_CHECKS
        .iter()
        .any(|check| level(&report, check) == Level::Fail);
    assert_eq!(report.failed(), host_failed, "{text}");
    println!("{text}");

    let out = binary(&path, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed_lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    for line in &failed_lines {
        assert!(
            HOST_CHECKS
                .iter()
                .any(|check| line.starts_with(&format!("FAIL  {check}: "))),
            "only a host check may fail:\n{stdout}"
        );
    }
    let expected_code = if failed_lines.is_empty() { 0 } else { 1 };
    assert_eq!(out.status.code(), Some(expected_code), "{stdout}");
    for check in product_checks() {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok    {check}: "))),
            "{check}:\n{stdout}"
        );
    }
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .ends_with(&format!("{} failed", failed_lines.len())),
        "{stdout}"
    );

    let json = binary(&path, &["--json"]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let findings = value["findings"].as_array().unwrap();
    assert!(findings.len() >= 10, "{value}");
    let mut host_failed = false;
    for finding in findings {
        let check = finding["check"].as_str().unwrap();
        if HOST_CHECKS.contains(&check) {
            host_failed |= finding["level"] == "fail";
        } else {
            assert_eq!(finding["level"], "ok", "{value}");
        }
    }
    assert_eq!(value["failed"], host_failed, "{value}");
    assert_eq!(json.status.code(), Some(i32::from(host_failed)), "{value}");
}

/// The checks of what the product sets up: on a healthy set-up each is ok.
fn product_checks() -> Vec<String> {
    [
        "config",
        "clock skew",
        "broker",
        "backend",
        "token",
        "permissions",
        "database",
    ]
    .map(String::from)
    .into_iter()
    .chain([format!("master {MASTER}")])
    .collect()
}

/// The checks of what the host gives.
const HOST_CHECKS: [&str; 3] = ["clock sync", "disk", "fsync"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_a_stopped_broker_and_refused_tokens_each_fail_with_the_reason() {
    let mut world = World::start_full();
    let login = world.stack.broker_login(Role::Agent, "pi-alice").unwrap();
    let good_jwt = world
        .stack
        .token(&Claims::agent(ALICE, "pi-alice").expiring_at(now_secs() + 30 * 86_400));
    let (dir, db) = state_dir();
    let config = |name: &str, world: &World, jwt: &str, password: &str| {
        config(dir.path(), name, &db, world, jwt, password)
    };

    let wrong_password = config("wrong-password.toml", &world, &good_jwt, "not-the-password");
    let report = doctor::run(&wrong_password).await;
    // Mosquitto answers a wrong password with CONNACK 5, other brokers with 4.
    let broker = report.find("broker").unwrap();
    assert!(
        broker.message.contains("(CONNACK 5") || broker.message.contains("(CONNACK 4"),
        "{}",
        report.text()
    );
    assert_fails(&report, "broker", "refused");
    assert_eq!(level(&report, "backend"), Level::Ok, "{}", report.text());

    let wrong_secret = Claims::agent(ALICE, "pi-alice")
        .expiring_at(now_secs() + 30 * 86_400)
        .sign("not-the-backends-secret-at-all-0123456789");
    let path = config("wrong-secret.toml", &world, &wrong_secret, &login.password);
    let report = doctor::run(&path).await;
    assert_fails(&report, "backend", "token refused (HTTP 401");
    assert_eq!(level(&report, "broker"), Level::Ok, "{}", report.text());

    let expired = world
        .stack
        .token(&Claims::agent(ALICE, "pi-alice").expiring_at(now_secs() - 3_600));
    let path = config("expired.toml", &world, &expired, &login.password);
    let report = doctor::run(&path).await;
    assert_fails(&report, "backend", "token refused");
    assert_fails(&report, "token", "expired 60 min ago");

    let soon = world
        .stack
        .token(&Claims::agent(ALICE, "pi-alice").expiring_at(now_secs() + 3 * 3_600));
    let path = config("expiring.toml", &world, &soon, &login.password);
    let report = doctor::run(&path).await;
    let token = report.find("token").unwrap();
    assert_eq!(token.level, Level::Warn, "{}", report.text());
    assert!(token.message.starts_with("expires in"), "{}", report.text());
    assert!(
        !report.failed(),
        "a warning alone passes: {}",
        report.text()
    );

    world.stack.mosquitto_mut().unwrap().stop();
    let path = config("broker-stopped.toml", &world, &good_jwt, &login.password);
    let report = doctor::run(&path).await;
    assert_fails(&report, "broker", "unreachable");
    println!("{}", report.text());
    let out = binary(&path, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL  broker: unreachable")),
        "{stdout}"
    );
}

#[tokio::test]
async fn doctor_without_a_database_says_so_and_creates_none() {
    // No stack: broker and backend fail, which is not what this test is about.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("agent.db");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nid = \"pi-x\"\n[store]\npath = \"{}\"\n[cloud]\nrest_url = \"http://127.0.0.1:0\"\njwt = \"t\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n",
            db.display()
        ),
    )
    .unwrap();
    let report = doctor::run(&path).await;
    let database = report.find("database").unwrap();
    assert_eq!(database.level, Level::Warn, "{}", report.text());
    assert!(
        database.message.starts_with("no database yet"),
        "{}",
        report.text()
    );
    assert!(
        !db.exists() && !db.parent().unwrap().exists(),
        "{}",
        report.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_running_agent_doctor_reads_the_broker_from_its_health_instead_of_connecting_as_it()
 {
    use std::os::unix::fs::PermissionsExt as _;
    let world = World::start_full();
    let agent = start_agent(&world, &master_toml(MASTER, KEY_HEX, "mqtt")).await;
    // Polled as an operator would: doctor reads the same /health.
    let health = format!("{}/health", agent.api);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let body: serde_json::Value = reqwest::get(&health).await.unwrap().json().await.unwrap();
        if body["mqtt"]["state"] == "connected" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never connected: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let c = &agent.config;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nid = \"pi-alice\"\n[store]\npath = \"{}\"\n[cloud]\nrest_url = \"{}\"\njwt = \"{}\"\n[mqtt]\nurl = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\n[api]\nlisten = \"{}\"\n",
            c.store.path.display(),
            c.cloud.rest_url,
            c.cloud.jwt.as_ref().unwrap().expose(),
            c.mqtt.url,
            c.mqtt.username.as_deref().unwrap(),
            c.mqtt.password.as_ref().unwrap().expose(),
            c.api.listen,
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let report = doctor::run(&path).await;
    let broker = report.find("broker").unwrap();
    assert_eq!(broker.level, Level::Ok, "{}", report.text());
    assert!(
        broker.message.contains("the running agent is connected"),
        "{}",
        report.text()
    );
    agent.shut_down().await;
}
