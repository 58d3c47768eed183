//! The backend as the agent sees it: contract 1's RPCs and tables through PostgREST (the
//! `postgrest` crate over reqwest), with the agent's JWT, re-read from its file when it changes.
//! Every call has a timeout; every failure is classified as transient or final.

pub mod session;
mod token;

use std::time::Duration;

use reqwest011 as reqwest;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::command::{CommandSource, CommandType};
use crate::store::{CommandRecord, CommandState, Reading, RuleRecord};
pub use token::{TokenError, TokenSource, unverified_claims};

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// No connection: network down, connection refused, DNS. The request was not sent.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// Sent, but no answer came (timeout, connection lost): the backend may have done it.
    #[error("backend did not answer: {0}")]
    NoAnswer(String),
    /// The backend answered that it cannot serve now (5xx, 408, 429).
    #[error("backend error {status}: {body}")]
    Server { status: u16, body: String },
    /// The token was refused (401/403): rotated or revoked; retried, and shown in /health.
    #[error("backend refused the agent's token ({status}): {body}")]
    Unauthorized { status: u16, body: String },
    /// The backend refused this request for good (another 4xx): retrying cannot help.
    #[error("backend rejected the request ({status}): {body}")]
    Rejected { status: u16, body: String },
    #[error("unexpected answer from the backend: {0}")]
    Decode(String),
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl CloudError {
    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, CloudError::Rejected { .. } | CloudError::Decode(_))
    }

    /// Whether the backend may have carried the request out although the agent saw a failure:
    /// no answer after sending it, or a gateway's 502/504 (the backend behind it may have
    /// finished). A push that failed so is "in doubt": retried (every write is idempotent), and
    /// never counted as lost.
    pub fn may_have_executed(&self) -> bool {
        matches!(self, CloudError::NoAnswer(_))
            || matches!(
                self,
                CloudError::Server {
                    status: 502 | 504,
                    ..
                }
            )
    }

    /// Whether the backend answered at all (it is up, even if it said no).
    pub fn backend_answered(&self) -> bool {
        matches!(
            self,
            CloudError::Server { .. }
                | CloudError::Unauthorized { .. }
                | CloudError::Rejected { .. }
                | CloudError::Decode(_)
        )
    }
}

/// A row of `relay_commands_slave` as the RPC returns it: the wire's strings and parallel arrays,
/// read only by [`CloudCommand::to_record`], which types it (a row it cannot type is refused
/// alone, not the whole answer).
#[derive(Debug, Clone, Deserialize)]
pub struct CloudCommand {
    pub id: i64,
    pub master_device_id: String,
    pub slave_mac_address: String,
    pub slave_device_id: Option<String>,
    pub relay_numbers: Vec<i64>,
    pub actions: Vec<String>,
    pub duration_seconds: Vec<i64>,
    pub command_type: String,
    pub triggered_by: String,
    pub priority: i32,
    pub rule_id: Option<String>,
    pub rule_name: Option<String>,
    pub expires_at: String,
}

impl CloudCommand {
    /// The agent's record of this command, or why it cannot be one.
    pub fn to_record(&self) -> Result<CommandRecord, String> {
        let expires_at_ms = parse_timestamp_ms(&self.expires_at)
            .ok_or_else(|| format!("unreadable expires_at {:?}", self.expires_at))?;
        let actions = crate::command::actions_from_columns(
            &self.relay_numbers,
            &self.actions,
            &self.duration_seconds,
        )?;
        Ok(CommandRecord {
            id: self.id,
            master_device_id: self.master_device_id.clone(),
            slave_mac_address: self.slave_mac_address.clone(),
            slave_device_id: self.slave_device_id.clone(),
            actions,
            command_type: CommandType::parse(&self.command_type)?,
            triggered_by: CommandSource::parse(&self.triggered_by)?,
            priority: self.priority,
            rule_id: self.rule_id.clone(),
            rule_name: self.rule_name.clone(),
            expires_at_ms,
            state: CommandState::Accepted,
            attempts: 0,
            last_sent_at_ms: None,
            polled_by: None,
        })
    }
}

/// A row of `get_decision_rule_changes`.
#[derive(Debug, Clone, Deserialize)]
pub struct RuleChange {
    pub id: String,
    pub device_id: String,
    pub rule_id: String,
    pub rule_name: Option<String>,
    pub rule_description: Option<String>,
    pub rule_json: Option<Value>,
    pub enabled: bool,
    pub priority: Option<i32>,
    pub cooldown_seconds: Option<i32>,
    pub max_executions_per_hour: Option<i32>,
    pub revision: i64,
    pub deleted: bool,
    pub changed_at: String,
}

impl RuleChange {
    pub fn to_record(&self) -> RuleRecord {
        RuleRecord {
            id: self.id.clone(),
            device_id: self.device_id.clone(),
            rule_id: self.rule_id.clone(),
            rule_name: self.rule_name.clone(),
            rule_description: self.rule_description.clone(),
            rule_json: self.rule_json.clone(),
            enabled: self.enabled && !self.deleted,
            priority: self.priority.unwrap_or(0),
            cooldown_seconds: self.cooldown_seconds.unwrap_or(0),
            max_executions_per_hour: self.max_executions_per_hour.unwrap_or(1),
            revision: self.revision,
            deleted: self.deleted,
            changed_at: self.changed_at.clone(),
        }
    }
}

/// One master's configuration as the dashboard wrote it in `device_status`.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceConfigRow {
    pub device_id: String,
    pub config: Value,
    pub config_version: i64,
}

/// The owner's emergency latch in the cloud (`system_status`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SystemStatusRow {
    pub owner_id: String,
    pub emergency_stop: bool,
    pub emergency_reason: Option<String>,
    pub emergency_changed_at: Option<String>,
    pub emergency_changed_by: Option<String>,
}

/// Where an agent's sync stands: per kind of change, the backend's counter as the last answer
/// gave it (`None`: read that part on the next call). See `sync_agent` in
/// supabase/migrations/20261204000100_agent_sync.sql and docs/decisions/0021.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct SyncCounters {
    pub commands: Option<i64>,
    pub rules: Option<i64>,
    pub configs: Option<i64>,
    pub macros: Option<i64>,
    pub latch: Option<i64>,
}

/// What one `sync_agent` call asks for.
#[derive(Debug, Clone)]
pub struct SyncRequest<'a> {
    pub counters: SyncCounters,
    /// Per master, where its rule changes resume: `(since, after_id)`; a master not named
    /// reads from the beginning.
    pub rule_cursors: &'a [(String, String, Option<String>)],
    /// The masters this agent runs; only they are synced.
    pub masters: &'a [String],
    pub limit_per_master: u32,
    /// 0: lock nothing (while completions are due).
    pub limit_total: u32,
    pub timeout_seconds: u32,
    /// Names the call; repeated after a lost answer, it returns what that call locked.
    pub request_id: &'a str,
}

/// `sync_agent`'s answer: `idle`, or the parts that moved and the next counters.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SyncAnswer {
    pub idle: bool,
    #[serde(default)]
    pub cursor: Option<SyncCounters>,
    #[serde(default)]
    pub commands: Option<Vec<CloudCommand>>,
    #[serde(default)]
    pub rules: Option<Vec<RuleChange>>,
    #[serde(default)]
    pub rules_more: bool,
    #[serde(default)]
    pub configs: Option<Vec<DeviceConfigRow>>,
    #[serde(default)]
    pub macros: Option<Vec<Value>>,
    /// `Some(None)`: read, and the owner never set a latch.
    #[serde(default, deserialize_with = "present")]
    pub latch: Option<Option<SystemStatusRow>>,
}

impl SyncAnswer {
    /// Whether the answer carried anything to act on (the poll interval shortens after it).
    pub fn carries_work(&self) -> bool {
        self.commands.as_ref().is_some_and(|c| !c.is_empty())
            || self.rules.as_ref().is_some_and(|r| !r.is_empty())
            || self.configs.is_some()
            || self.macros.is_some()
            || self.latch.is_some()
    }
}

/// A field that is there, even as null, is `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The most completions `complete_slave_commands` takes in one call.
pub const COMPLETIONS_PER_CALL_MAX: usize = 100;

#[derive(Debug, Clone)]
pub struct CloudConfig {
    pub rest_url: String,
    pub api_key: Option<String>,
    pub request_timeout: Duration,
}

#[derive(Clone)]
pub struct Cloud {
    client: postgrest::Postgrest,
    token: TokenSource,
    timeout: Duration,
    /// For the small reads of every poll (locks, rule changes, the latch): a backend that
    /// stops answering is noticed after this, not after a push's whole request timeout.
    poll_timeout: Duration,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Cloud {
    pub fn new(config: &CloudConfig, token: TokenSource) -> Cloud {
        let mut client = postgrest::Postgrest::new(config.rest_url.trim_end_matches('/'));
        if let Some(key) = &config.api_key {
            client = client.insert_header("apikey", key);
        }
        Cloud {
            client,
            token,
            timeout: config.request_timeout,
            poll_timeout: config.request_timeout,
        }
    }

    async fn send(
        &self,
        builder: postgrest::Builder,
        prefer: Option<&'static str>,
    ) -> Result<String, CloudError> {
        self.send_within(builder, prefer, self.timeout).await
    }

    /// [`Cloud::send`] giving up after `timeout`.
    async fn send_within(
        &self,
        builder: postgrest::Builder,
        prefer: Option<&'static str>,
        timeout: Duration,
    ) -> Result<String, CloudError> {
        let token = self.token.current()?;
        let (client, request) = builder.auth(token).build().timeout(timeout).build_split();
        let mut request = request.map_err(|e| CloudError::Decode(e.to_string()))?;
        if let Some(prefer) = prefer {
            request
                .headers_mut()
                .insert("Prefer", reqwest::header::HeaderValue::from_static(prefer));
        }
        let response = client.execute(request).await.map_err(|e| {
            // Only a connection never made proves the request was not carried out.
            if e.is_connect() {
                CloudError::Unreachable(e.to_string())
            } else {
                CloudError::NoAnswer(e.to_string())
            }
        })?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|e| CloudError::NoAnswer(e.to_string()))?;
        match status {
            200..=299 => Ok(body),
            401 | 403 => Err(CloudError::Unauthorized {
                status,
                body: truncate(body),
            }),
            408 | 429 | 500..=599 => Err(CloudError::Server {
                status,
                body: truncate(body),
            }),
            _ => Err(CloudError::Rejected {
                status,
                body: truncate(body),
            }),
        }
    }

    /// The poll reads give up after this instead of the request timeout (at most that).
    pub fn with_poll_timeout(mut self, poll_timeout: Duration) -> Cloud {
        self.poll_timeout = poll_timeout.min(self.timeout);
        self
    }

    async fn rpc<T: serde::de::DeserializeOwned>(
        &self,
        function: &str,
        args: Value,
    ) -> Result<T, CloudError> {
        self.rpc_within(function, args, self.timeout).await
    }

    async fn rpc_within<T: serde::de::DeserializeOwned>(
        &self,
        function: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<T, CloudError> {
        self.rpc_encoded(function, args.to_string(), timeout).await
    }

    /// An RPC whose arguments are already JSON text.
    async fn rpc_encoded<T: serde::de::DeserializeOwned>(
        &self,
        function: &str,
        args: String,
        timeout: Duration,
    ) -> Result<T, CloudError> {
        let body = self
            .send_within(self.client.rpc(function, args), None, timeout)
            .await?;
        serde_json::from_str(&body).map_err(|e| CloudError::Decode(format!("{function}: {e}")))
    }

    /// Locks up to `limit` commands of `master` for `timeout_seconds`. `request_id` names the
    /// call: repeated after a failure without an answer, it returns what the lost call locked.
    pub async fn lock_commands(
        &self,
        master: &str,
        limit: u32,
        timeout_seconds: u32,
        request_id: &str,
    ) -> Result<Vec<CloudCommand>, CloudError> {
        // Safe to give up early: the retry names the same call and gets what it locked.
        self.rpc_within(
            "get_and_lock_slave_commands",
            json!({
                "p_master_device_id": master, "p_limit": limit,
                "p_timeout_seconds": timeout_seconds, "p_request_id": request_id,
            }),
            self.poll_timeout,
        )
        .await
    }

    /// One sync for all of this agent's masters (`sync_agent`): commands locked, rule changes,
    /// latch, configs and macros that moved since `request.counters`. Safe to give up early, as
    /// the lock call is: its retry names the same request.
    pub async fn sync(&self, request: &SyncRequest<'_>) -> Result<SyncAnswer, CloudError> {
        let mut cursor = serde_json::to_value(request.counters)
            .map_err(|e| CloudError::Decode(e.to_string()))?;
        let rule_cursors: serde_json::Map<String, Value> = request
            .rule_cursors
            .iter()
            .map(|(master, since, after)| (master.clone(), json!({"since": since, "after": after})))
            .collect();
        cursor["rule_cursors"] = Value::Object(rule_cursors);
        self.rpc_within(
            "sync_agent",
            json!({
                "p_cursor": cursor, "p_masters": request.masters,
                "p_limit_per_master": request.limit_per_master,
                "p_limit_total": request.limit_total,
                "p_timeout_seconds": request.timeout_seconds,
                "p_request_id": request.request_id,
            }),
            self.poll_timeout,
        )
        .await
    }

    /// Reports a command's end; returns the status the backend holds afterwards (a command that
    /// expired or was cancelled there keeps that status), or None if the backend does not know it.
    pub async fn report_completion(
        &self,
        completion: &Value,
    ) -> Result<Option<String>, CloudError> {
        let id = completion["command_id"]
            .as_i64()
            .ok_or_else(|| CloudError::Decode("completion without command_id".into()))?;
        let rows: Vec<Value> = match completion["status"].as_str() {
            Some("completed") => {
                self.rpc(
                    "complete_slave_command",
                    json!({"p_command_id": id, "p_execution_time_ms": completion["execution_time_ms"], "p_relay_states": completion["relay_states"]}),
                )
                .await?
            }
            _ => {
                let reason = completion["error_message"].as_str().unwrap_or("failed on the edge");
                self.rpc(
                    "fail_slave_command",
                    json!({"p_command_id": id, "p_error_message": reason, "p_execution_time_ms": completion["execution_time_ms"]}),
                )
                .await?
            }
        };
        Ok(rows
            .first()
            .and_then(|r| r["status"].as_str())
            .map(str::to_string))
    }

    /// Reports up to [`COMPLETIONS_PER_CALL_MAX`] command ends in one call
    /// (`complete_slave_commands`); the same idempotent semantics as one at a time. A command the
    /// agent ended as expired is reported failed, with its reason.
    pub async fn report_completions(&self, completions: &[Value]) -> Result<(), CloudError> {
        let items: Vec<Value> = completions
            .iter()
            .map(|c| {
                let completed = c["status"].as_str() == Some("completed");
                json!({
                    "command_id": c["command_id"],
                    "status": if completed { "completed" } else { "failed" },
                    "execution_time_ms": c["execution_time_ms"],
                    "relay_states": if completed { c["relay_states"].clone() } else { Value::Null },
                    "error_message": if completed {
                        Value::Null
                    } else {
                        json!(c["error_message"].as_str().unwrap_or("failed on the edge"))
                    },
                    // Rows queued by an older agent have no times: the backend records now().
                    "finished_at": c["finished_at_ms"].as_i64().map(format_timestamp_ms),
                    "sent_at": c["sent_at_ms"].as_i64().map(format_timestamp_ms),
                })
            })
            .collect();
        let _rows: Vec<Value> = self
            .rpc("complete_slave_commands", json!({"p_completions": items}))
            .await?;
        Ok(())
    }

    /// Rule changes of `device` after the cursor.
    pub async fn rule_changes(
        &self,
        device: &str,
        since: &str,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RuleChange>, CloudError> {
        self.rpc_within(
            "get_decision_rule_changes",
            json!({"p_device_id": device, "p_since": since, "p_after_id": after_id, "p_limit": limit}),
            self.poll_timeout,
        )
        .await
    }

    /// Inserts readings in one request (`insert_telemetry`: one access check per device, not
    /// per row); readings the backend already has are skipped, so a retried batch never
    /// duplicates.
    pub async fn insert_readings(&self, readings: &[Reading]) -> Result<(), CloudError> {
        // Encoded straight from the readings: a push carries up to a thousand, and building a
        // JSON value of each first cost a dozen allocations per reading.
        #[derive(serde::Serialize)]
        struct Row<'a> {
            device_id: &'a str,
            sensor_key: &'a str,
            value: f64,
            unit: Option<&'a str>,
            recorded_at: String,
        }
        #[derive(serde::Serialize)]
        struct Args<'a> {
            p_readings: Vec<Row<'a>>,
        }
        let args = Args {
            p_readings: readings
                .iter()
                .map(|r| Row {
                    device_id: &r.device_id,
                    sensor_key: &r.sensor_key,
                    value: r.value,
                    unit: r.unit.as_deref(),
                    recorded_at: format_timestamp_ms(r.recorded_at_ms),
                })
                .collect(),
        };
        let args = serde_json::to_string(&args)
            .map_err(|e| CloudError::Decode(format!("insert_telemetry: {e}")))?;
        let _inserted: Value = self
            .rpc_encoded("insert_telemetry", args, self.timeout)
            .await?;
        Ok(())
    }

    /// Inserts rows into a table keyed by `client_id`, ignoring rows already there.
    pub async fn insert_idempotent(&self, table: &str, rows: &[Value]) -> Result<(), CloudError> {
        let builder = self
            .client
            .from(table)
            .insert(Value::Array(rows.to_vec()).to_string())
            .on_conflict("client_id");
        self.send(builder, Some("return=minimal,resolution=ignore-duplicates"))
            .await?;
        Ok(())
    }

    /// Writes back why the engine cannot run rules (`decision_rules.last_error`, null = fine).
    pub async fn report_rule_errors(&self, errors: &[Value]) -> Result<(), CloudError> {
        let _: Value = self
            .rpc("report_rule_errors", json!({ "p_errors": errors }))
            .await?;
        Ok(())
    }

    /// The owner's emergency latch as the cloud has it (none: never set).
    pub async fn system_status(&self) -> Result<Option<SystemStatusRow>, CloudError> {
        let builder = self.client.from("system_status").select(
            "owner_id,emergency_stop,emergency_reason,emergency_changed_at,emergency_changed_by",
        );
        let body = self.send_within(builder, None, self.poll_timeout).await?;
        let mut rows: Vec<SystemStatusRow> = serde_json::from_str(&body)
            .map_err(|e| CloudError::Decode(format!("system_status: {e}")))?;
        Ok(rows.pop())
    }

    /// Sets the owner's emergency latch (the owner is the `sub` of the agent's token).
    pub async fn set_system_status(&self, row: &Value) -> Result<(), CloudError> {
        let owner = self.owner_id()?;
        let mut row = row.clone();
        row["owner_id"] = json!(owner);
        let builder = self
            .client
            .from("system_status")
            .insert(Value::Array(vec![row]).to_string())
            .on_conflict("owner_id");
        self.send(builder, Some("return=minimal,resolution=merge-duplicates"))
            .await?;
        Ok(())
    }

    /// The macros this agent runs, each with its steps embedded.
    pub async fn macros(&self) -> Result<Vec<Value>, CloudError> {
        let builder = self
            .client
            .from("macros")
            .select("id,name,description,enabled,revision,macro_actions(*)");
        let body = self.send_within(builder, None, self.poll_timeout).await?;
        serde_json::from_str(&body).map_err(|e| CloudError::Decode(format!("macros: {e}")))
    }

    /// The owner's user id: the `owner_id` claim of a token Supabase Auth issued to the agent's
    /// own login (whose `sub` is the login), else the `sub` of a minted agent token (read, not
    /// verified: the backend verifies it on every request).
    fn owner_id(&self) -> Result<String, CloudError> {
        let token = self.token.current()?;
        token::unverified_claims(&token)
            .ok()
            .and_then(|c| {
                c["owner_id"]
                    .as_str()
                    .or(c["sub"].as_str())
                    .map(str::to_string)
            })
            .ok_or(CloudError::Token(TokenError::NoOwner))
    }

    /// The configuration the dashboard authored for these masters, with its version.
    pub async fn device_configs(
        &self,
        device_ids: &[String],
    ) -> Result<Vec<DeviceConfigRow>, CloudError> {
        let builder = self
            .client
            .from("device_status")
            .select("device_id,config,config_version")
            .in_("device_id", device_ids);
        let body = self.send_within(builder, None, self.poll_timeout).await?;
        serde_json::from_str(&body).map_err(|e| CloudError::Decode(format!("device_status: {e}")))
    }

    /// Writes slaves' relay states (one row per master and slave, created when first seen).
    pub async fn upsert_relay_slaves(&self, rows: &[Value]) -> Result<(), CloudError> {
        let builder = self
            .client
            .from("relay_slaves")
            .insert(Value::Array(rows.to_vec()).to_string())
            .on_conflict("master_device_id,slave_mac_address");
        self.send(builder, Some("return=minimal,resolution=merge-duplicates"))
            .await?;
        Ok(())
    }

    /// Reports a master heard but not served (`register_discovered_device`): the backend creates
    /// it for this agent's owner, unassigned, unless it exists.
    pub async fn register_discovered_device(
        &self,
        device_id: &str,
        firmware: Option<&str>,
        mac: Option<&str>,
    ) -> Result<(), CloudError> {
        let _rows: Vec<Value> = self
            .rpc(
                "register_discovered_device",
                json!({"p_device_id": device_id, "p_firmware_version": firmware, "p_mac_address": mac}),
            )
            .await?;
        Ok(())
    }

    /// Serves master `device_id` from now on (`adopt_master`); true when the backend created it.
    pub async fn adopt_master(&self, device_id: &str) -> Result<bool, CloudError> {
        let rows: Vec<Value> = self
            .rpc("adopt_master", json!({ "p_device_id": device_id }))
            .await?;
        Ok(rows
            .first()
            .and_then(|r| r["created"].as_bool())
            .unwrap_or(false))
    }

    /// Updates the presence columns of one device row.
    pub async fn update_device_status(
        &self,
        device_id: &str,
        patch: &Value,
    ) -> Result<(), CloudError> {
        let builder = self
            .client
            .from("device_status")
            .eq("device_id", device_id)
            .update(patch.to_string());
        self.send(builder, Some("return=minimal")).await?;
        Ok(())
    }

    /// Registers a master seen for the first time (device discovery); a row that exists is left.
    pub async fn register_device(&self, row: &Value) -> Result<(), CloudError> {
        let builder = self
            .client
            .from("device_status")
            .insert(row.to_string())
            .on_conflict("device_id");
        self.send(builder, Some("return=minimal,resolution=ignore-duplicates"))
            .await?;
        Ok(())
    }
}

fn truncate(mut body: String) -> String {
    const BODY_CHARS_MAX: usize = 500;
    if body.len() > BODY_CHARS_MAX {
        let mut cut = BODY_CHARS_MAX;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
        body.push('…');
    }
    body
}

/// Milliseconds since the epoch from PostgREST's timestamptz text.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

pub fn format_timestamp_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_backend_that_stops_answering_is_given_up_on_after_the_poll_timeout() {
        // Accepts connections and never answers, as a frozen PostgREST does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let cloud = Cloud::new(
            &CloudConfig {
                rest_url: url,
                api_key: None,
                request_timeout: Duration::from_secs(600),
            },
            // `sub` only: a token with an owner, so the request is really sent.
            TokenSource::Inline(crate::config::Secret::new(
                "x.eyJzdWIiOiJhIiwiYWdlbnRfaWQiOiJwaSJ9.y",
            )),
        )
        .with_poll_timeout(Duration::from_millis(200));
        // Within the test's bound only if the poll timeout applies (the request timeout is
        // ten minutes): the lock call and the latch read both give up as unreachable.
        let lock = tokio::time::timeout(
            Duration::from_secs(30),
            cloud.lock_commands("M1", 5, 30, "request-0001"),
        )
        .await
        .expect("the lock call gave up after the poll timeout");
        // Sent and never answered: the backend may have locked something.
        assert!(
            matches!(&lock, Err(e @ CloudError::NoAnswer(_)) if e.may_have_executed()),
            "{lock:?}"
        );
        let latch = tokio::time::timeout(Duration::from_secs(30), cloud.system_status())
            .await
            .expect("the latch read gave up after the poll timeout");
        assert!(matches!(latch, Err(CloudError::NoAnswer(_))), "{latch:?}");
        held.abort();
    }

    #[tokio::test]
    async fn a_token_without_an_owner_is_a_token_problem_not_a_backend_answer() {
        // Payload `{}`: no `sub`. Nothing listens on port 9, and nothing is asked of it.
        let cloud = Cloud::new(
            &CloudConfig {
                rest_url: "http://127.0.0.1:9".into(),
                api_key: None,
                request_timeout: Duration::from_millis(500),
            },
            TokenSource::Inline(crate::config::Secret::new("x.e30.y")),
        );
        let err = cloud
            .set_system_status(&json!({"emergency_stop": true}))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CloudError::Token(TokenError::NoOwner)),
            "{err:?}"
        );
        // So an outage is not taken for over, and /health says the token is the problem.
        assert!(!err.backend_answered());
        assert_eq!(
            crate::connectivity::BackendState::from_result(Err(&err)),
            crate::connectivity::BackendState::NoToken
        );
    }

    #[test]
    fn postgrest_timestamps_are_read_to_the_millisecond() {
        assert_eq!(
            parse_timestamp_ms("1970-01-01T00:00:01.5+00:00"),
            Some(1_500)
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-22T00:00:00+00:00"),
            parse_timestamp_ms("2026-11-22T00:00:00Z")
        );
        assert_eq!(
            parse_timestamp_ms("2026-11-22T01:00:00+01:00"),
            parse_timestamp_ms("2026-11-22T00:00:00Z")
        );
        assert_eq!(parse_timestamp_ms("yesterday"), None);
        assert_eq!(
            parse_timestamp_ms(&format_timestamp_ms(1_763_770_000_123)),
            Some(1_763_770_000_123)
        );
    }

    #[test]
    fn a_command_with_a_bad_relay_or_action_is_not_a_record() {
        let mut cmd: CloudCommand = serde_json::from_value(json!({
            "id": 1, "master_device_id": "M", "slave_mac_address": "14:33:5C:38:BF:60", "slave_device_id": null,
            "relay_numbers": [0], "actions": ["on"], "duration_seconds": [60], "command_type": "manual",
            "triggered_by": "manual", "priority": 10, "rule_id": null, "rule_name": null, "status": "processing",
            "expires_at": "2026-11-22T00:05:00+00:00"
        }))
        .unwrap();
        assert!(cmd.to_record().is_ok());
        cmd.actions = vec!["toggle".into()];
        assert!(cmd.to_record().unwrap_err().contains("on/off"));
        cmd.actions = vec!["on".into()];
        cmd.relay_numbers = vec![300];
        assert!(cmd.to_record().is_err());
    }

    #[test]
    fn only_a_final_refusal_is_not_transient() {
        assert!(CloudError::Unreachable("refused".into()).is_transient());
        assert!(
            CloudError::Server {
                status: 503,
                body: String::new()
            }
            .is_transient()
        );
        assert!(
            CloudError::Unauthorized {
                status: 401,
                body: String::new()
            }
            .is_transient()
        );
        assert!(
            !CloudError::Rejected {
                status: 400,
                body: String::new()
            }
            .is_transient()
        );
        assert!(!CloudError::Unreachable("x".into()).backend_answered());
        assert!(CloudError::NoAnswer("timeout".into()).is_transient());
        assert!(!CloudError::NoAnswer("timeout".into()).backend_answered());
    }

    #[tokio::test]
    async fn only_a_connection_never_made_proves_a_request_was_not_carried_out() {
        // Nothing listens: refused before anything was sent.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let cloud = Cloud::new(
            &CloudConfig {
                rest_url: url,
                api_key: None,
                request_timeout: Duration::from_secs(5),
            },
            TokenSource::Inline(crate::config::Secret::new(
                "x.eyJzdWIiOiJhIiwiYWdlbnRfaWQiOiJwaSJ9.y",
            )),
        );
        let refused = cloud.insert_readings(&[]).await.unwrap_err();
        assert!(matches!(refused, CloudError::Unreachable(_)), "{refused:?}");
        assert!(!refused.may_have_executed());
        // Gateways: 504 and 502 may hide a finished request, 503 says it was not taken.
        for (status, doubt) in [(502, true), (504, true), (503, false), (500, false)] {
            let e = CloudError::Server {
                status,
                body: String::new(),
            };
            assert_eq!(e.may_have_executed(), doubt, "{status}");
        }
    }
}
