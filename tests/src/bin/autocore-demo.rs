//! `autocore-demo`: the whole flow on the local stack, narrated for a person. At this stage: a
//! dashboard user registers an agent and a master, sends three commands through PostgREST, and
//! the agent locks them through the RPC in hand-out order and completes one.

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
    let stack = Stack::start(StackOptions::default()).context("starting the local stack")?;
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

    step("Done; the stack is torn down");
    Ok(())
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
    let resp = http
        .post(format!("{rest}{path}"))
        .bearer_auth(token)
        .header("Prefer", "return=representation")
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
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
