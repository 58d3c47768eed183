//! `autocore-demo`: the whole flow on the local stack, narrated for a person: a dashboard user
//! registers an agent and a master, sends commands through PostgREST, and the RPC hands them out
//! in order; then the real agent with a simulated ESP32 runs a dashboard command, the seed's pH
//! rule fires on the simulator's falling pH with the backend up and again with it down (the
//! records arrive when it returns), and the emergency stop holds until the operator resets it.

use anyhow::{Context, bail};
use autocore_stack::{Claims, Stack, StackOptions};
use serde_json::{Value, json};
use uuid::Uuid;

const MASTER: &str = "ESP32_HIDRO_F44738";
const SLAVE_MAC: &str = "14:33:5C:38:BF:60";
const AGENT: &str = "pi-greenhouse";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    step("Starting the local stack (Postgres 15, PostgREST 12, Mosquitto) on loopback");
    let mut stack = Stack::start(StackOptions::default()).context("starting the local stack")?;
    for line in stack.env_lines() {
        if !line.starts_with("AUTOCORE_JWT_SECRET") {
            println!("    {line}");
        }
    }

    // Sign-up happens in Supabase Auth; here the user row is created directly.
    let owner = Uuid::new_v4();
    stack
        .postgres()?
        .psql(
            "autocore",
            &[
                "-c",
                &format!(
                    "insert into auth.users (id, email) values ('{owner}', 'grower@example.com')"
                ),
            ],
        )
        .context("creating the dashboard user")?;
    let http = reqwest::Client::new();
    let rest = stack.rest_url()?;
    let dashboard = stack.token(&Claims::user(owner));
    let agent = stack.token(&Claims::agent(owner, AGENT));

    step("The dashboard registers a Pi agent and an ESP32 master");
    post(
        &http,
        &rest,
        &dashboard,
        "/edge_agents",
        json!({"agent_id": AGENT, "owner_id": owner, "name": "greenhouse Pi"}),
    )
    .await?;
    post(
        &http,
        &rest,
        &dashboard,
        "/device_status",
        json!({"device_id": MASTER, "owner_id": owner, "agent_id": AGENT, "device_name": "Hydroponics master", "mac_address": "24:6F:28:F4:47:38"}),
    )
    .await?;
    println!("    agent {AGENT} serves master {MASTER}");

    step("The dashboard sends three commands, in this order");
    let commands = [
        json!({"relay_numbers": [0, 1], "actions": ["on", "on"], "duration_seconds": [30, 30], "command_type": "manual", "triggered_by": "manual", "priority": 10}),
        json!({"relay_numbers": [2], "actions": ["on"], "duration_seconds": [60], "command_type": "rule", "triggered_by": "rule", "priority": 50, "rule_id": "RULE_001", "rule_name": "Ajustar pH quando baixo"}),
        json!({"relay_numbers": [3], "actions": ["on"], "duration_seconds": [5], "command_type": "peristaltic", "triggered_by": "peristaltic", "priority": 80}),
    ];
    for mut command in commands {
        command["master_device_id"] = json!(MASTER);
        command["slave_mac_address"] = json!(SLAVE_MAC);
        let created = post(&http, &rest, &dashboard, "/relay_commands_slave", command).await?;
        println!("    {}", describe(&created[0]));
    }

    step("The agent calls get_and_lock_slave_commands: peristaltic > rule > manual, then priority");
    let locked = post(
        &http,
        &rest,
        &agent,
        "/rpc/get_and_lock_slave_commands",
        json!({"p_master_device_id": MASTER, "p_limit": 5, "p_timeout_seconds": 30}),
    )
    .await?;
    let locked = locked.as_array().context("the RPC returns an array")?;
    for (i, row) in locked.iter().enumerate() {
        println!("    {}. {}", i + 1, describe(row));
    }
    if locked.len() != 3 {
        bail!("expected 3 locked commands, got {}", locked.len());
    }

    step("Called again, the RPC hands out nothing: every command is locked");
    let again = post(
        &http,
        &rest,
        &agent,
        "/rpc/get_and_lock_slave_commands",
        json!({"p_master_device_id": MASTER}),
    )
    .await?;
    println!("    {again}");

    step("The agent completes the first command, as markCommandCompleted does");
    let first = locked[0]["id"].as_i64().context("command id")?;
    let done = post(
        &http,
        &rest,
        &agent,
        "/rpc/complete_slave_command",
        json!({"p_command_id": first, "p_execution_time_ms": 142}),
    )
    .await?;
    println!("    {}", describe(&done[0]));
    let slaves = get(
        &http,
        &rest,
        &dashboard,
        "/relay_slaves?select=slave_mac_address,relay_states",
    )
    .await?;
    println!("    relay_slaves as the dashboard sees it: {slaves}");

    step("The dashboard cancels the two commands still locked, before the real agent starts");
    for row in &locked[1..] {
        let id = row["id"].as_i64().context("command id")?;
        let cancelled = patch(
            &http,
            &rest,
            &dashboard,
            &format!("/relay_commands_slave?id=eq.{id}"),
            json!({"status": "cancelled"}),
        )
        .await?;
        println!("    {}", describe(&cancelled[0]));
    }

    edge_demo(&mut stack, &http, &dashboard, owner).await?;

    step("Done; the stack is torn down");
    Ok(())
}

const KEY_HEX: &str = "5f1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
/// The local API's operator token in this demo (a real one lives in the agent's config only).
const OPERATOR: &str = "demo-operator-token";
const RULE_COOLDOWN_S: u32 = 5;
const RULE_DURATION_S: u32 = 3;

/// Part two: the real agent and a simulated ESP32 master with one slave board.
async fn edge_demo(
    stack: &mut Stack,
    http: &reqwest::Client,
    dashboard: &str,
    owner: Uuid,
) -> anyhow::Result<()> {
    use firmware_protocol::message::RelayLimits;
    use firmware_protocol::sim::{
        self, MasterSpec, MasterTiming, RadioSpec, SensorSource, SensorSpec, SimConfig, SlaveSpec,
    };

    step(
        "Starting esp32-sim: master ESP32_HIDRO_F44738 with slave 14:33:5C:38:BF:60 (4 relays), pH drifting 6.8 -> 6.0",
    );
    let sim_config = SimConfig {
        mqtt_url: Some(stack.mqtt_url()?),
        masters: vec![MasterSpec {
            id: firmware_protocol::DeviceId::new(MASTER)?,
            key: firmware_protocol::MasterKey::from_hex(KEY_HEX)?,
            slaves: vec![SlaveSpec {
                mac: SLAVE_MAC.parse()?,
                relays: vec![
                    RelayLimits {
                        max_on_s: 600,
                        boot_on: false
                    };
                    4
                ],
            }],
            sensors: vec![SensorSpec {
                name: "ph".into(),
                unit: Some("pH".into()),
                source: SensorSource::Ramp {
                    from: 6.8,
                    to: 6.0,
                    steps: 60,
                },
            }],
        }],
        timing: MasterTiming {
            telemetry_interval_ms: 250,
            ..MasterTiming::default()
        },
        radio: RadioSpec {
            loss_percent: 0,
            delay_ms: 2,
        },
        state_dir: None,
        poll: None,
    };
    // The master logs in with its device id and the password derived from its key.
    stack.admit_sim(&sim_config)?;
    let (sim_stop, sim_stopped) = tokio::sync::oneshot::channel::<()>();
    let sim_task = tokio::spawn(sim::run(sim_config, async move {
        let _ = sim_stopped.await;
    }));

    step(
        "Starting autocore-agent for pi-greenhouse (its own SQLite, the agent's JWT, poll every 500 ms)",
    );
    let dir = tempfile::tempdir()?;
    let toml = format!(
        "[agent]\nid = \"{AGENT}\"\n[store]\npath = \"{db}\"\ntelemetry_flush_ms = 200\n\
         [cloud]\nrest_url = \"{rest}\"\njwt = \"{jwt}\"\npoll_interval_ms = 500\n\
         [mqtt]\nurl = \"{mqtt}\"\nusername = \"autocore-{AGENT}\"\npassword = \"{mqtt_password}\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [engine]\nstale_after_ms = 10000\n[safety]\noperator_token = \"{OPERATOR}\"\n\
         [[masters]]\ndevice_id = \"{MASTER}\"\nkey = \"{KEY_HEX}\"\n",
        db = dir.path().join("agent.db").display(),
        rest = stack.rest_url()?,
        jwt = stack.token(&Claims::agent(owner, AGENT)),
        mqtt = stack.mqtt_url()?,
        mqtt_password = autocore_stack::random_secret(16),
    );
    let config = autocore_agent::config::AgentConfig::from_toml(
        &toml,
        std::path::Path::new("demo.toml"),
        std::iter::empty(),
    )?;
    // The broker admits no one else: the logins `autocore-agent broker-config` writes for this
    // configuration (the agent, and each master with its derived password).
    stack
        .mosquitto()?
        .add_users(&autocore_agent::broker::users_from_config(&config)?)?;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let health_url = format!("http://{}/health", api.local_addr()?);
    let local_api = format!("http://{}", api.local_addr()?);
    let db = dir.path().join("agent.db");
    let (agent_stop, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(autocore_agent::run(config, api, async move {
        let _ = agent_stopped.await;
    }));
    println!("    local API: {health_url}");

    step(
        "The dashboard sends relay 1 on for 10 s; the agent pulls it, signs it, the master runs it",
    );
    let rest = stack.rest_url()?;
    let created = post(
        http,
        &rest,
        dashboard,
        "/relay_commands_slave",
        json!({"master_device_id": MASTER, "slave_mac_address": SLAVE_MAC, "relay_numbers": [1], "actions": ["on"], "duration_seconds": [10]}),
    )
    .await?;
    let id = created[0]["id"].as_i64().context("command id")?;
    let done = wait_for(
        http,
        &rest,
        dashboard,
        &format!("/relay_commands_slave?id=eq.{id}"),
        |rows| rows[0]["status"] == "completed",
    )
    .await?;
    println!(
        "    {}  execution {} ms",
        describe(&done[0]),
        done[0]["execution_time_ms"]
    );
    let slaves = get(http, &rest, dashboard, "/relay_slaves?select=relay_states").await?;
    println!(
        "    relay states in the cloud: {}",
        slaves[0]["relay_states"]
    );

    step("The dashboard creates the seed's rule through PostgREST: pH < 6.5 -> relay 0 on");
    let rule = post(
        http,
        &rest,
        dashboard,
        "/decision_rules",
        json!({
            "device_id": MASTER, "rule_id": "RULE_001", "rule_name": "Ajustar pH quando baixo",
            "rule_json": {
                "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
                "actions": [{"type": "relay_on", "slave_mac_address": SLAVE_MAC, "relay_number": 0,
                             "duration_seconds": RULE_DURATION_S}]
            },
            "priority": 50, "cooldown_seconds": RULE_COOLDOWN_S, "max_executions_per_hour": 60
        }),
    )
    .await?;
    println!(
        "    rule {} (cooldown {RULE_COOLDOWN_S} s, relay on {RULE_DURATION_S} s); the agent mirrors it and evaluates every reading",
        rule[0]["id"]
    );

    step(
        "pH falls below 6.5: the rule fires on the Pi, the slave runs it, the cloud learns afterwards",
    );
    let fired = wait_for(
        http,
        &rest,
        dashboard,
        "/rule_executions?select=executed_at,result,explanation&order=executed_at",
        |rows| rows.as_array().is_some_and(|r| r.len() >= 2),
    )
    .await?;
    for row in fired.as_array().into_iter().flatten() {
        println!(
            "    {}  {}",
            row["executed_at"],
            row["explanation"].as_str().unwrap_or("")
        );
    }
    let rule_commands = get(
        http,
        &rest,
        dashboard,
        "/relay_commands_slave?select=id,command_type,triggered_by,rule_id,priority,relay_numbers,actions,status&command_type=eq.rule&triggered_by=eq.rule&status=eq.completed&order=id",
    )
    .await?;
    for row in rule_commands.as_array().into_iter().flatten() {
        println!(
            "    {}  triggered_by {}  rule {}",
            describe(row),
            row["triggered_by"],
            row["rule_id"]
        );
    }

    step(
        "The backend goes away (PostgREST and Postgres stopped); the agent keeps control and queues",
    );
    let before = rule_commands.as_array().map_or(0, |r| r.len());
    stack.stop_backend();
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let h: Value = http.get(&health_url).send().await?.json().await?;
        println!(
            "    backend reachable: {:<5}  outbox: {} rows waiting",
            h["backend_reachable"], h["outbox"]["depth"]
        );
    }

    let offline = autocore_agent::store::Store::open(&db)?
        .outbox_due(i64::MAX, 10_000)?
        .into_iter()
        .filter(|r| r.payload["kind"] == "execution")
        .count();
    println!(
        "    rule firings while the backend was away: {offline}; their records wait in the outbox"
    );

    step("The backend returns; the outbox drains in order, each row once");
    stack.restart_backend().context("restarting the backend")?;
    let mut last_depth = Value::Null;
    for _ in 0..60 {
        let h: Value = http.get(&health_url).send().await?.json().await?;
        last_depth = h["outbox"]["depth"].clone();
        if h["backend_reachable"] == true && h["outbox"]["depth"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    println!("    outbox depth now {last_depth}");
    let events = get(
        http,
        &rest,
        dashboard,
        "/event_logs?select=event_type,message&event_type=eq.backend_outage",
    )
    .await;
    match events {
        Ok(rows) => println!("    event recorded in the cloud: {}", rows[0]["message"]),
        Err(e) => println!("    (event not visible yet: {e})"),
    }
    let readings = get(
        http,
        &rest,
        dashboard,
        "/telemetry_data?select=value&sensor_key=eq.ph&order=recorded_at.desc&limit=1",
    )
    .await?;
    println!("    latest pH in the cloud: {}", readings[0]["value"]);
    let after = get(
        http,
        &rest,
        dashboard,
        "/relay_commands_slave?select=id&command_type=eq.rule&triggered_by=eq.rule&status=eq.completed",
    )
    .await?;
    println!(
        "    rule commands in the cloud: {before} before the outage, {} now (each once)",
        after.as_array().map_or(0, |r| r.len())
    );

    step(
        "Emergency stop from the Pi's local API: every relay off on every master, all commands blocked",
    );
    let stopped: Value = http
        .post(format!("{local_api}/emergency/stop"))
        .json(&json!({"reason": "demo: water on the floor", "by": "grower"}))
        .send()
        .await?
        .json()
        .await?;
    println!("    {stopped}");
    let latched = wait_for(
        http,
        &rest,
        dashboard,
        "/system_status?select=emergency_stop,emergency_reason",
        |rows| rows[0]["emergency_stop"] == true,
    )
    .await?;
    println!("    system_status in the cloud: {}", latched[0]);
    let refused = post(
        http,
        &rest,
        dashboard,
        "/relay_commands_slave",
        json!({"master_device_id": MASTER, "slave_mac_address": SLAVE_MAC, "relay_numbers": [2], "actions": ["on"], "duration_seconds": [5]}),
    )
    .await?;
    let id = refused[0]["id"].as_i64().context("command id")?;
    let failed = wait_for(
        http,
        &rest,
        dashboard,
        &format!("/relay_commands_slave?id=eq.{id}"),
        |rows| rows[0]["status"] == "failed",
    )
    .await?;
    println!(
        "    {}  {}",
        describe(&failed[0]),
        failed[0]["error_message"].as_str().unwrap_or("")
    );
    let critical = get(
        http,
        &rest,
        dashboard,
        "/event_logs?select=severity,message&event_type=eq.emergency_stop",
    )
    .await?;
    println!(
        "    event: {} {}",
        critical[0]["severity"], critical[0]["message"]
    );

    step(
        "Reset: refused without the operator token, accepted with it; nothing switches back on by itself",
    );
    let anonymous = http
        .post(format!("{local_api}/emergency/reset"))
        .send()
        .await?;
    println!("    without the token: {}", anonymous.status());
    let reset = http
        .post(format!("{local_api}/emergency/reset"))
        .bearer_auth(OPERATOR)
        .json(&json!({"by": "grower"}))
        .send()
        .await?;
    println!(
        "    with the operator token: {} {}",
        reset.status(),
        reset.text().await?
    );
    let cleared = wait_for(
        http,
        &rest,
        dashboard,
        "/system_status?select=emergency_stop",
        |rows| rows[0]["emergency_stop"] == false,
    )
    .await?;
    println!("    system_status in the cloud: {}", cleared[0]);

    let _ = agent_stop.send(());
    let _ = sim_stop.send(());
    let _ = agent_task.await;
    let _ = sim_task.await;
    Ok(())
}

async fn wait_for(
    http: &reqwest::Client,
    rest: &str,
    token: &str,
    path: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    for _ in 0..100 {
        let rows = get(http, rest, token, path).await?;
        if done(&rows) {
            return Ok(rows);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bail!("{path} never reached the expected state")
}

async fn patch(
    http: &reqwest::Client,
    rest: &str,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    write(http.patch(format!("{rest}{path}")), token, path, body).await
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn describe(row: &Value) -> String {
    format!(
        "#{} {:<11} priority {:>3}  relays {} {}  status {}",
        row["id"],
        row["command_type"].as_str().unwrap_or("?"),
        row["priority"],
        row["relay_numbers"],
        row["actions"],
        row["status"].as_str().unwrap_or("?"),
    )
}

async fn post(
    http: &reqwest::Client,
    rest: &str,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    write(http.post(format!("{rest}{path}")), token, path, body).await
}

/// A write as the dashboard sends it: the caller's token, the written rows back.
async fn write(
    request: reqwest::RequestBuilder,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let resp = request
        .bearer_auth(token)
        .header("Prefer", "return=representation")
        .json(&body)
        .send()
        .await
        .with_context(|| format!("writing {path}"))?;
    answer(resp, path).await
}

async fn get(http: &reqwest::Client, rest: &str, token: &str, path: &str) -> anyhow::Result<Value> {
    let resp = http
        .get(format!("{rest}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    answer(resp, path).await
}

async fn answer(resp: reqwest::Response, path: &str) -> anyhow::Result<Value> {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{path}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}
