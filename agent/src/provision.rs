//! `autocore-agent provision` and `masters add` (docs/decisions/0016-provisioning-and-claim.md):
//! a claim code from the dashboard becomes this Pi's identity (an `edge_agents` row, a Supabase
//! Auth session), its masters with keys made here, and the broker logins they need.
//!
//! Masters' keys are generated on the Pi and never leave it: the backend learns only which
//! masters the agent serves; the keys live in the configuration (0600), from which they are
//! flashed onto the masters. The claim service holds the service-role key; the Pi never does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest011 as reqwest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;

use crate::cloud::session::{self, Session};
use crate::config::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("the claim service at {url} did not answer: {reason}")]
    Unreachable { url: String, reason: String },
    /// The code is unknown, used or expired, or a master or the agent id is taken: nothing was
    /// changed, here or in the backend.
    #[error("the claim was refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the claim service answered something else than a claim: {0}")]
    Answer(String),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the configuration provisioning would write is invalid: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error("no randomness from the system")]
    Random,
}

/// What the claim service answers (`claim-agent`, or the local stand-in).
#[derive(Deserialize)]
pub struct ClaimAnswer {
    pub access_token: String,
    pub refresh_token: String,
    #[serde(default)]
    pub expires_at: Option<i64>,
    pub agent_id: String,
    pub owner_id: String,
    /// PostgREST's and Supabase Auth's base URLs for this project.
    pub rest_url: String,
    pub auth_url: String,
    #[serde(default)]
    pub masters: Vec<String>,
}

impl std::fmt::Debug for ClaimAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimAnswer")
            .field("agent_id", &self.agent_id)
            .field("owner_id", &self.owner_id)
            .field("masters", &self.masters)
            .finish_non_exhaustive()
    }
}

/// What to claim, and where to put what the claim gives.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// The project's base URL: the claim service is `{url}/functions/v1/claim-agent`.
    pub url: String,
    pub code: String,
    pub agent_id: String,
    pub name: Option<String>,
    pub masters: Vec<String>,
    /// Supabase's public (anon or publishable) key; never the service-role key.
    pub api_key: Option<String>,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    /// `[mqtt] url` to write; the configuration's, or the local broker, when absent.
    pub mqtt_url: Option<String>,
    pub timeout: Duration,
}

/// What [`provision`] wrote.
#[derive(Debug)]
pub struct Provisioned {
    pub agent_id: String,
    pub owner_id: String,
    pub config_path: PathBuf,
    pub session_path: PathBuf,
    pub masters: Vec<String>,
}

/// The claim service's endpoint under a project's base URL.
pub fn claim_url(url: &str) -> String {
    format!("{}/functions/v1/claim-agent", url.trim_end_matches('/'))
}

/// Exchanges the claim code; writes the session (0600) and the configuration (0600, the old one
/// kept as `.bak`): agent id, backend and auth URLs, the session file, a broker login for the
/// agent, and a `[[masters]]` entry with a new key per master (an existing master keeps its key).
pub async fn provision(request: &ProvisionRequest) -> Result<Provisioned, ProvisionError> {
    let base = read_table(&request.config_path)?;
    // The configuration is checked with placeholders before the code is spent, so a bad key
    // in it (or a bad agent id) costs no claim code.
    crate::config::check_id("agent.id", &request.agent_id)?;
    let placeholder = ClaimAnswer {
        access_token: String::new(),
        refresh_token: String::new(),
        expires_at: None,
        agent_id: request.agent_id.clone(),
        owner_id: String::new(),
        rest_url: "http://127.0.0.1".into(),
        auth_url: "http://127.0.0.1".into(),
        masters: request.masters.clone(),
    };
    config_text(&base, &placeholder, request)?;
    let answer = claim(request).await?;
    let text = config_text(&base, &answer, request)?;
    create_state_dir(&request.state_dir)?;
    let session_path = session_path(&request.state_dir);
    session::write(
        &session_path,
        &Session {
            access_token: answer.access_token.clone(),
            refresh_token: answer.refresh_token.clone(),
            expires_at: answer.expires_at,
        },
    )?;
    write_config(&request.config_path, &text)?;
    give_to_state_dir_owner(&request.state_dir, &[&session_path, &request.config_path])?;
    Ok(Provisioned {
        agent_id: answer.agent_id,
        owner_id: answer.owner_id,
        config_path: request.config_path.clone(),
        session_path,
        masters: answer.masters,
    })
}

fn session_path(state_dir: &Path) -> PathBuf {
    state_dir.join("session.json")
}

/// The configuration `base` becomes with what the claim gave, checked as the agent loads it.
fn config_text(
    base: &toml::Table,
    answer: &ClaimAnswer,
    request: &ProvisionRequest,
) -> Result<String, ProvisionError> {
    let mut table = base.clone();
    set(&mut table, "agent", "id", answer.agent_id.clone().into());
    if !has(&table, "store", "path") {
        let db = request.state_dir.join("agent.db");
        set(&mut table, "store", "path", db.display().to_string().into());
    }
    set(
        &mut table,
        "cloud",
        "rest_url",
        answer.rest_url.clone().into(),
    );
    set(
        &mut table,
        "cloud",
        "auth_url",
        answer.auth_url.clone().into(),
    );
    set(
        &mut table,
        "cloud",
        "jwt_file",
        session_path(&request.state_dir)
            .display()
            .to_string()
            .into(),
    );
    if let Some(cloud) = table.get_mut("cloud").and_then(|c| c.as_table_mut()) {
        cloud.remove("jwt");
    }
    if let Some(key) = &request.api_key {
        set(&mut table, "cloud", "api_key", key.clone().into());
    }
    if let Some(url) = &request.mqtt_url {
        set(&mut table, "mqtt", "url", url.clone().into());
    } else if !has(&table, "mqtt", "url") {
        set(&mut table, "mqtt", "url", "mqtt://127.0.0.1:1883".into());
    }
    set(
        &mut table,
        "mqtt",
        "username",
        answer.agent_id.clone().into(),
    );
    if !has(&table, "mqtt", "password") {
        set(&mut table, "mqtt", "password", random_hex(24)?.into());
    }
    let mut masters = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for id in answer.masters.iter().filter(|id| seen.insert(id.as_str())) {
        let key = match existing_key(&table, id) {
            Some(key) => key,
            None => random_hex(32)?,
        };
        masters.push(master_entry(id, &key));
    }
    table.insert("masters".into(), toml::Value::Array(masters));
    let text = toml::to_string(&table).map_err(|e| ProvisionError::File {
        path: request.config_path.clone(),
        reason: e.to_string(),
    })?;
    AgentConfig::from_toml(&text, &request.config_path, std::iter::empty())?;
    Ok(text)
}

/// `POST {url}/functions/v1/claim-agent`: the code, the agent id and name, the masters.
pub async fn claim(request: &ProvisionRequest) -> Result<ClaimAnswer, ProvisionError> {
    let url = claim_url(&request.url);
    let mut http = reqwest::Client::new()
        .post(&url)
        .timeout(request.timeout)
        .json(&serde_json::json!({
            "code": request.code,
            "agent_id": request.agent_id,
            "name": request.name,
            "masters": request.masters,
        }));
    if let Some(key) = &request.api_key {
        // Supabase's gateway wants the public key as both.
        http = http.header("apikey", key).bearer_auth(key);
    }
    let response = http.send().await.map_err(|e| ProvisionError::Unreachable {
        url: url.clone(),
        reason: e.without_url().to_string(),
    })?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|e| ProvisionError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    if !(200..300).contains(&status) {
        return Err(ProvisionError::Refused {
            status,
            message: session::auth_error_message(&body),
        });
    }
    serde_json::from_str(&body).map_err(|e| ProvisionError::Answer(e.to_string()))
}

/// `masters add`: the backend first (`adopt_master`: refused, nothing here changes), then a new
/// key in a `[[masters]]` entry of the configuration. Returns the new configuration.
pub async fn add_master(
    config_path: &Path,
    config: &AgentConfig,
    device_id: &str,
) -> Result<(AgentConfig, bool), anyhow::Error> {
    use anyhow::Context as _;
    crate::config::check_id("device_id", device_id)?;
    anyhow::ensure!(
        config.master(device_id).is_none(),
        "{device_id} is already a master of this agent (in {})",
        config_path.display()
    );
    let mut table = read_table(config_path)?;
    let cloud = crate::cloud::Cloud::new(
        &crate::cloud::CloudConfig {
            rest_url: config.cloud.rest_url.clone(),
            api_key: config
                .cloud
                .api_key
                .as_ref()
                .map(|k| k.expose().to_string()),
            request_timeout: Duration::from_millis(config.cloud.request_timeout_ms),
        },
        match (&config.cloud.jwt, &config.cloud.jwt_file) {
            (Some(jwt), _) => crate::cloud::TokenSource::Inline(jwt.clone()),
            (None, Some(path)) => crate::cloud::TokenSource::file(path.clone()),
            (None, None) => anyhow::bail!("cloud.jwt: set cloud.jwt or cloud.jwt_file"),
        },
    );
    let created = cloud
        .adopt_master(device_id)
        .await
        .with_context(|| format!("the backend did not give {device_id} to this agent"))?;
    let entry = master_entry(device_id, &random_hex(32)?);
    match table.get_mut("masters").and_then(|m| m.as_array_mut()) {
        Some(masters) => masters.push(entry),
        None => {
            table.insert("masters".into(), toml::Value::Array(vec![entry]));
        }
    }
    let text = toml::to_string(&table)?;
    let new = AgentConfig::from_toml(&text, config_path, std::iter::empty())?;
    write_config(config_path, &text)?;
    Ok((new, created))
}

fn master_entry(device_id: &str, key_hex: &str) -> toml::Value {
    let mut entry = toml::Table::new();
    entry.insert("device_id".into(), device_id.into());
    entry.insert("key".into(), key_hex.into());
    toml::Value::Table(entry)
}

fn existing_key(table: &toml::Table, device_id: &str) -> Option<String> {
    table
        .get("masters")?
        .as_array()?
        .iter()
        .find(|m| m.get("device_id").and_then(|d| d.as_str()) == Some(device_id))?
        .get("key")?
        .as_str()
        .map(str::to_string)
}

fn has(table: &toml::Table, section: &str, key: &str) -> bool {
    table
        .get(section)
        .and_then(|s| s.as_table())
        .is_some_and(|s| s.contains_key(key))
}

fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    if let Some(section) = entry.as_table_mut() {
        section.insert(key.to_string(), value);
    }
}

/// The configuration as a table: what is there is kept, provisioning sets its keys over it.
fn read_table(path: &Path) -> Result<toml::Table, ProvisionError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse()
            .map_err(|e: toml::de::Error| ProvisionError::File {
                path: path.to_path_buf(),
                reason: e.message().to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(toml::Table::new()),
        Err(e) => Err(ProvisionError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Writes the configuration 0600, keeping the previous one as `.bak` (0600 too: it holds keys).
fn write_config(path: &Path, text: &str) -> Result<(), ProvisionError> {
    let file_err = |e: std::io::Error| ProvisionError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(file_err)?;
    }
    let previous_owner = std::fs::metadata(path).ok().map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        (m.uid(), m.gid())
    });
    if path.exists() {
        let mut bak = path.as_os_str().to_owned();
        bak.push(".bak");
        let old = std::fs::read_to_string(path).map_err(file_err)?;
        crate::broker::write_atomically(Path::new(&bak), &old, 0o600)?;
    }
    crate::broker::write_atomically(path, text, 0o600)?;
    // Run as root, the file stays its owner's (the package makes it autocore's).
    if let Some((uid, gid)) = previous_owner
        && nix::unistd::geteuid().is_root()
    {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(file_err)?;
    }
    Ok(())
}

/// Run as root (`sudo autocore-agent provision`), the files go to the state directory's owner
/// (the package's `autocore` user), who runs the agent and rewrites the session; run as that
/// user, they are its own already.
fn give_to_state_dir_owner(dir: &Path, files: &[&Path]) -> Result<(), ProvisionError> {
    use std::os::unix::fs::MetadataExt as _;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let meta = std::fs::metadata(dir).map_err(|e| ProvisionError::File {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    for file in files {
        std::os::unix::fs::chown(file, Some(meta.uid()), Some(meta.gid())).map_err(|e| {
            ProvisionError::File {
                path: file.to_path_buf(),
                reason: format!("giving it to the state directory's owner: {e}"),
            }
        })?;
    }
    Ok(())
}

fn create_state_dir(dir: &Path) -> Result<(), ProvisionError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ProvisionError::File {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })
}

/// `bytes` bytes from the system's CSPRNG (ring), as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String, ProvisionError> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| ProvisionError::Random)?;
    Ok(hex::encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_256_bit_values() {
        let a = random_hex(32).unwrap();
        let b = random_hex(32).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(firmware_protocol::MasterKey::from_hex(&a).is_ok());
    }

    #[test]
    fn a_master_already_in_the_configuration_keeps_its_key() {
        let table: toml::Table = "[[masters]]\ndevice_id = \"M1\"\nkey = \"ab\"\n"
            .parse()
            .unwrap();
        assert_eq!(existing_key(&table, "M1").as_deref(), Some("ab"));
        assert_eq!(existing_key(&table, "M2"), None);
    }

    #[tokio::test]
    async fn an_unreachable_claim_service_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let request = ProvisionRequest {
            url: "http://127.0.0.1:9".into(),
            code: "ABCDE-FGHJK".into(),
            agent_id: "pi-x".into(),
            name: None,
            masters: vec![],
            api_key: None,
            config_path: dir.path().join("agent.toml"),
            state_dir: dir.path().join("state"),
            mqtt_url: None,
            timeout: Duration::from_millis(500),
        };
        let err = provision(&request).await.unwrap_err();
        assert!(matches!(err, ProvisionError::Unreachable { .. }), "{err:?}");
        assert!(!request.config_path.exists());
        assert!(!request.state_dir.exists());
    }
}
