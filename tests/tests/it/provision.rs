//! Provisioning on the local stack (docs/decisions/0016-provisioning-and-claim.md): a dashboard
//! user's claim code, `autocore-agent provision` (the real binary) against the claim service and
//! Supabase Auth's refresh grant (the harness's stand-in, `autocore_stack::auth`, running the
//! backend's own `claim_agent` and `custom_access_token_hook`), the agent started from what
//! provisioning wrote completing a dashboard command on `esp32-sim` through the secured broker,
//! its session refreshed, its revocation; and the bad codes, which change nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use autocore_stack::auth::AuthStandIn;
use autocore_stack::{Claims, free_port};
use serde_json::{Value, json};

use crate::support::{
    ALICE, SLAVE, World, eventually, insert_command, one_master_sim, spawn_agent, start_sim,
    until_status,
};

const AGENT: &str = "pi-claimed";
const NEW_MASTER: &str = "ESP32_CLAIMED_1";

/// A dashboard user's claim code, made through PostgREST with the user's JWT.
async fn claim_code(world: &World) -> String {
    let (status, body) = world
        .caller(&Claims::user(ALICE))
        .rpc("create_claim_code", json!({}))
        .await;
    assert!(status.is_success(), "create_claim_code: {status} {body}");
    body[0]["code"].as_str().expect("a code").to_string()
}

async fn stand_in(world: &World, lifetime: Duration) -> AuthStandIn {
    AuthStandIn::start(
        &world.stack.pg_url().unwrap(),
        world.stack.jwt_secret(),
        &world.stack.rest_url().unwrap(),
        lifetime,
    )
    .await
    .expect("the auth stand-in starts")
}

/// `autocore-agent ARGS`, the real binary: (exit code, stdout, stderr).
async fn agent_cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_autocore-agent-under-test"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("the agent binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `provision` with `code` into `dir` (config `dir/agent.toml`, state `dir/state`).
async fn provision(
    auth: &AuthStandIn,
    dir: &Path,
    code: &str,
    agent: &str,
    masters: &[&str],
    extra: &[&str],
) -> (i32, String, String) {
    let config = dir.join("agent.toml");
    let state = dir.join("state");
    let mut args = vec![
        "provision",
        "--code",
        code,
        "--url",
        auth.url(),
        "--agent-id",
        agent,
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    for m in masters {
        args.extend(["--master", m]);
    }
    args.extend(extra);
    agent_cli(&args).await
}

fn session(state: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(state.join("session.json")).unwrap()).unwrap()
}

fn claims_of(token: &str) -> Value {
    autocore_agent::cloud::unverified_claims(token).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_code_provisions_a_pi_that_completes_a_dashboard_command_refreshes_and_stops_when_revoked()
 {
    let world = World::start_full();
    // Tokens live 4 s: refreshed 1 s before expiry, so several times during the test.
    let auth = stand_in(&world, Duration::from_secs(4)).await;
    let code = claim_code(&world).await;

    // What the operator adds to the configuration beforehand (kept by provision) and where.
    let dir = tempfile::tempdir().unwrap();
    let api_port = free_port().unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "[cloud]\npoll_interval_ms = 200\n[store]\ntelemetry_flush_ms = 100\n\
             [mqtt]\nack_timeout_ms = 2000\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n"
        ),
    )
    .unwrap();
    let broker_dir = dir.path().join("broker");
    let mqtt_url = world.stack.mqtt_url().unwrap();
    let (status, stdout, stderr) = provision(
        &auth,
        dir.path(),
        &code,
        AGENT,
        &[NEW_MASTER],
        &[
            "--mqtt-url",
            &mqtt_url,
            "--broker-dir",
            broker_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(status, 0, "provision failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("provisioned agent {AGENT}")),
        "{stdout}"
    );

    // The backend: the agent is alice's, and serves the new master.
    assert_eq!(
        world.sql_one(&format!(
            "select owner_id from edge_agents where agent_id = '{AGENT}'"
        )),
        ALICE.to_string()
    );
    assert_eq!(
        world.sql_one(&format!(
            "select agent_id from device_status where device_id = '{NEW_MASTER}'"
        )),
        AGENT
    );

    // The Pi: a session (0600) whose token is the agent's login's, with the hook's claims.
    let state = dir.path().join("state");
    let first = session(&state);
    let claims = claims_of(first["access_token"].as_str().unwrap());
    assert_eq!(claims["agent_id"], AGENT);
    assert_eq!(claims["owner_id"], ALICE.to_string());
    assert_ne!(
        claims["sub"],
        ALICE.to_string(),
        "sub stays the agent's own login"
    );
    use std::os::unix::fs::PermissionsExt as _;
    for file in [state.join("session.json"), dir.path().join("agent.toml")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let refresh_token = first["refresh_token"].as_str().unwrap().to_string();
    assert!(
        !stdout.contains(&refresh_token) && !stderr.contains(&refresh_token),
        "a token was printed"
    );

    // The configuration provision wrote, with the master's key made on the Pi; the key was sent
    // nowhere: the backend has no column for it.
    let config_path = dir.path().join("agent.toml");
    let config = autocore_agent::config::AgentConfig::load(&config_path).unwrap();
    assert_eq!(config.agent.id, AGENT);
    assert_eq!(
        config.cloud.poll_interval_ms, 200,
        "the operator's keys are kept"
    );
    let key = config.master(NEW_MASTER).expect("the master").key.expose();
    assert_eq!(key.len(), 64);
    assert!(
        std::fs::read_to_string(broker_dir.join("passwd"))
            .unwrap()
            .contains(NEW_MASTER)
    );

    // The secured broker gets the logins provision's files hold (agent and master).
    let users = autocore_agent::broker::users_from_config(&config).unwrap();
    world.stack.mosquitto().unwrap().add_users(&users).unwrap();
    let mut sim = one_master_sim(&world, key);
    sim.masters[0].id = firmware_protocol::DeviceId::new(NEW_MASTER).unwrap();
    let _sim = start_sim(sim);

    let _agent = spawn_agent(&config_path);
    let id = insert_command(&world, NEW_MASTER, SLAVE, 0, 60);
    until_status(&world, &id, "completed", Duration::from_secs(30)).await;

    // The session is refreshed before it expires, and the agent keeps working on the new token.
    eventually("two refreshes", Duration::from_secs(30), || {
        (auth.refreshes() >= 2).then_some(())
    })
    .await;
    let refreshed = session(&state);
    assert_ne!(refreshed["access_token"], first["access_token"]);
    assert_ne!(refreshed["refresh_token"], first["refresh_token"]);
    let first_exp = claims["exp"].as_u64().unwrap();
    eventually("the first token expired", Duration::from_secs(10), || {
        (autocore_stack::jwt::now_secs() > first_exp).then_some(())
    })
    .await;
    let id = insert_command(&world, NEW_MASTER, SLAVE, 1, 60);
    until_status(&world, &id, "completed", Duration::from_secs(30)).await;

    // Revoked from the dashboard: the backend refuses the agent at its next request, and Supabase
    // Auth (the hook) gives it no new token.
    let (status, body) = world
        .caller(&Claims::user(ALICE))
        .send(
            reqwest::Method::PATCH,
            &format!("/edge_agents?agent_id=eq.{AGENT}"),
            Some(json!({"revoked_at": "2026-01-01T00:00:00Z"})),
            None,
        )
        .await;
    assert!(status.is_success(), "revoke: {status} {body}");
    let health_url = format!("http://127.0.0.1:{api_port}/health");
    eventually_async_health(&health_url, "unauthorized").await;
    let id = insert_command(&world, NEW_MASTER, SLAVE, 2, 60);
    tokio::time::sleep(Duration::from_secs(2)).await; // ten poll intervals
    assert_eq!(
        world.sql_one(&format!(
            "select status from relay_commands_slave where id = {id}"
        )),
        "pending",
        "a revoked agent locks nothing"
    );
    // The agent's own refresher is refused at its next refresh (tokens live 4 s here).
    eventually(
        "the agent's refresh refused",
        Duration::from_secs(15),
        || (auth.refused() >= 1).then_some(()),
    )
    .await;
    let current = session(&state);
    let refused = reqwest::Client::new()
        .post(format!(
            "{}/auth/v1/token?grant_type=refresh_token",
            auth.url()
        ))
        .json(&json!({"refresh_token": current["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    assert!(
        refused.text().await.unwrap().contains("revoked"),
        "the refusal says why"
    );
}

/// Polls the agent's /health until its backend state is `state`.
async fn eventually_async_health(url: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(response) = reqwest::get(url).await
            && let Ok(health) = response.json::<Value>().await
            && health["backend"]["state"] == state
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent's backend state never became {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows provisioning writes, to show a refusal wrote none.
fn backend_state(world: &World) -> String {
    world.sql_one(
        "select (select count(*) from edge_agents) || '/' || (select count(*) from private.agent_logins) || '/' ||
                (select count(*) from auth.users) || '/' || (select count(*) from private.claim_codes where used_at is not null) || '/' ||
                (select string_agg(device_id || '=' || coalesce(agent_id, '-'), ',' order by device_id) from device_status)",
    )
}

fn nothing_written(dir: &Path) -> bool {
    !dir.join("agent.toml").exists() && !dir.join("state").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_unknown_used_expired_or_naming_someone_elses_master_fails_clearly_and_changes_nothing()
 {
    let world = World::start();
    let auth = stand_in(&world, Duration::from_secs(3600)).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| -> PathBuf { tmp.path().join(name) };

    // Unknown.
    let before = backend_state(&world);
    let (status, _, stderr) =
        provision(&auth, &dir("unknown"), "ZZZZZ-ZZZZZ", AGENT, &[], &[]).await;
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("claim_code_unknown"), "{stderr}");
    assert!(nothing_written(&dir("unknown")));
    assert_eq!(backend_state(&world), before);

    // Someone else's master: bob's. The code stays good.
    let code = claim_code(&world).await;
    let (status, _, stderr) =
        provision(&auth, &dir("theirs"), &code, AGENT, &["ESP32_BOB_1"], &[]).await;
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("claim_master_taken: master ESP32_BOB_1"),
        "{stderr}"
    );
    assert!(nothing_written(&dir("theirs")));
    assert_eq!(backend_state(&world), before);

    // Used twice: the first use works, the second changes nothing.
    let (status, stdout, stderr) =
        provision(&auth, &dir("first"), &code, AGENT, &[NEW_MASTER], &[]).await;
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    let after_first = backend_state(&world);
    assert_ne!(after_first, before);
    let (status, _, stderr) = provision(&auth, &dir("second"), &code, "pi-second", &[], &[]).await;
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("claim_code_used"), "{stderr}");
    assert!(nothing_written(&dir("second")));
    assert_eq!(backend_state(&world), after_first);

    // One code claimed by two Pis at once, through two claim services (two connections): one
    // gets it, the other is told it is used.
    let code = claim_code(&world).await;
    let other = stand_in(&world, Duration::from_secs(3600)).await;
    let (dir_a, dir_b) = (dir("race-a"), dir("race-b"));
    let (a, b) = tokio::join!(
        provision(&auth, &dir_a, &code, "pi-race-a", &[], &[]),
        provision(&other, &dir_b, &code, "pi-race-b", &[], &[]),
    );
    let mut outcomes = [a, b];
    outcomes.sort_by_key(|o| o.0);
    assert_eq!(outcomes[0].0, 0, "one claim wins: {}", outcomes[0].2);
    assert_eq!(outcomes[1].0, 1, "the other loses");
    assert!(
        outcomes[1].2.contains("claim_code_used"),
        "{}",
        outcomes[1].2
    );
    assert_eq!(
        world.sql_one("select count(*) from edge_agents where agent_id like 'pi-race-%'"),
        "1"
    );
    let after_first = backend_state(&world);

    // Expired.
    let code = claim_code(&world).await;
    world.sql("update private.claim_codes set expires_at = now() - interval '1 second' where used_at is null");
    let (status, _, stderr) = provision(&auth, &dir("expired"), &code, "pi-late", &[], &[]).await;
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("claim_code_expired"), "{stderr}");
    assert!(nothing_written(&dir("expired")));
    assert_eq!(backend_state(&world), after_first);

    // masters add: the backend gives the agent the master, the configuration gets its key, the
    // broker files its login; another owner's master is refused and nothing changes.
    let config = dir("first").join("agent.toml");
    let broker = dir("first").join("broker");
    let (status, stdout, stderr) = agent_cli(&[
        "masters",
        "add",
        "ESP32_CLAIMED_2",
        "--config",
        config.to_str().unwrap(),
        "--broker-dir",
        broker.to_str().unwrap(),
    ])
    .await;
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert_eq!(
        world.sql_one("select agent_id from device_status where device_id = 'ESP32_CLAIMED_2'"),
        AGENT
    );
    let loaded = autocore_agent::config::AgentConfig::load(&config).unwrap();
    assert!(loaded.master("ESP32_CLAIMED_2").is_some());
    assert!(
        std::fs::read_to_string(broker.join("passwd"))
            .unwrap()
            .contains("ESP32_CLAIMED_2")
    );
    let text_before = std::fs::read_to_string(&config).unwrap();
    let (status, _, stderr) = agent_cli(&[
        "masters",
        "add",
        "ESP32_BOB_1",
        "--config",
        config.to_str().unwrap(),
    ])
    .await;
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("master_taken"), "{stderr}");
    assert!(
        stderr.contains("(409)"),
        "not taken for a refused token: {stderr}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text_before);
}
