//! The agent's one typed configuration: TOML, overridden key by key from `AUTOCORE_<SECTION>_<KEY>`
//! environment variables, validated once at start-up with errors that name the wrong key.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not valid TOML at line {line}, column {column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// A configuration the agent runs with but should not: printed by `check-config`, logged at WARN
/// by `run`. `key` names the key (or the file) to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn warning(key: impl Into<String>, message: impl Into<String>) -> ConfigWarning {
    ConfigWarning {
        key: key.into(),
        message: message.into(),
    }
}

/// The shortest operator token accepted: a short one is guessed by anyone on the Pi's network.
pub const OPERATOR_TOKEN_CHARS_MIN: usize = 16;

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A value that must never reach a log: Debug and Display print a placeholder.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub agent: AgentSection,
    pub store: StoreSection,
    pub cloud: CloudSection,
    pub mqtt: MqttSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default)]
    pub history: HistorySection,
    #[serde(default)]
    pub safety: SafetySection,
    #[serde(default)]
    pub masters: Vec<MasterSection>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub notify: crate::notify::NotifySection,
}

/// How the agent logs. `RUST_LOG`, when set, overrides `level`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A tracing filter: `info`, `debug`, `autocore_agent=debug,info`, ...
    #[serde(default = "defaults::log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: defaults::log_level(),
            format: LogFormat::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Plain,
    /// One JSON object per line, for journald or a log shipper.
    Json,
}

/// The decision engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// A reading older than this is unknown and never makes a rule fire.
    #[serde(default = "defaults::stale_after_ms")]
    pub stale_after_ms: u64,
    /// IANA time zone of time windows and cron schedules; empty = the system's.
    #[serde(default)]
    pub time_zone: String,
    /// Replaced by `[history] raw_hours`; still read (with a warning) so that a configuration
    /// written for an older agent keeps working.
    #[serde(default)]
    pub history_hours: Option<u64>,
    /// Expiry of the commands the Pi creates (rules, macros, controls, safety offs).
    #[serde(default = "defaults::command_ttl_ms")]
    pub command_ttl_ms: u64,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            stale_after_ms: defaults::stale_after_ms(),
            time_zone: String::new(),
            history_hours: None,
            command_ttl_ms: defaults::command_ttl_ms(),
        }
    }
}

/// The reading history on the Pi (docs/decisions/0014): raw readings bounded by age and rows,
/// one-minute rollups kept longer, space given back in bounded steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySection {
    /// Raw readings older than this are pruned (default 168; `engine.history_hours` of older
    /// configurations when this is not set).
    #[serde(default)]
    pub raw_hours: Option<u64>,
    /// At most this many raw readings are kept; the oldest minutes go first.
    #[serde(default = "defaults::raw_rows_max")]
    pub raw_rows_max: u64,
    /// One-minute rollups older than this are pruned.
    #[serde(default = "defaults::rollup_days")]
    pub rollup_days: u64,
    /// At most this many rollups (one per device, sensor and minute) are kept.
    #[serde(default = "defaults::rollup_rows_max")]
    pub rollup_rows_max: u64,
    /// How often the housekeeper prunes and gives space back.
    #[serde(default = "defaults::housekeeping_interval_ms")]
    pub housekeeping_interval_ms: u64,
    /// Rows one housekeeping step deletes per table, at most (the store waits that long).
    #[serde(default = "defaults::prune_rows_per_step")]
    pub prune_rows_per_step: u64,
    /// Free pages one step gives back to the file system, at most.
    #[serde(default = "defaults::vacuum_pages_per_step")]
    pub vacuum_pages_per_step: u64,
}

impl Default for HistorySection {
    fn default() -> Self {
        HistorySection {
            raw_hours: None,
            raw_rows_max: defaults::raw_rows_max(),
            rollup_days: defaults::rollup_days(),
            rollup_rows_max: defaults::rollup_rows_max(),
            housekeeping_interval_ms: defaults::housekeeping_interval_ms(),
            prune_rows_per_step: defaults::prune_rows_per_step(),
            vacuum_pages_per_step: defaults::vacuum_pages_per_step(),
        }
    }
}

/// Interlocks that hold whatever sends the command, and who may reset the emergency stop.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetySection {
    /// Bearer token of the local API's operator endpoints (emergency reset, macros, hold
    /// controls), at least [`OPERATOR_TOKEN_CHARS_MIN`] characters. Without it those endpoints
    /// are closed (403); the emergency stop itself needs none.
    #[serde(default)]
    pub operator_token: Option<Secret>,
    /// Cap on any relay's on-time unless a limit says otherwise.
    #[serde(default)]
    pub default_max_on_seconds: Option<u32>,
    /// Mutex groups (per slave: at most one relay of a group on, the others switched off
    /// first, "Marcha Frente" / "Marcha Ré") and per-relay limits.
    #[serde(default)]
    pub mutex_groups: Vec<crate::safety::MutexGroup>,
    #[serde(default)]
    pub limits: Vec<crate::safety::RelayLimit>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// The agent's id, as in `edge_agents.agent_id` and the JWT's `agent_id` claim.
    pub id: String,
    /// Threads of the async runtime. The agent's tasks wait on sockets and on the store's own
    /// thread; one runtime thread saves the wake-ups and memory of the others (decision 23).
    #[serde(default = "defaults::worker_threads")]
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub path: PathBuf,
    /// The outbox's bound; at the bound the oldest telemetry goes first, never a command or a
    /// completion.
    #[serde(default = "defaults::outbox_rows_max")]
    pub outbox_rows_max: u64,
    /// Readings gathered before one commit: an SD card's fsync costs milliseconds.
    #[serde(default = "defaults::telemetry_batch_rows_max")]
    pub telemetry_batch_rows_max: usize,
    #[serde(default = "defaults::telemetry_flush_ms")]
    pub telemetry_flush_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSection {
    /// PostgREST's base URL: `https://<project>.supabase.co/rest/v1` on Supabase.
    pub rest_url: String,
    /// Supabase's public anon key, sent as `apikey`; not needed on plain PostgREST.
    pub api_key: Option<Secret>,
    pub jwt: Option<Secret>,
    /// Read at start and again whenever it changes, so a token rotates without a restart. Holds
    /// the JWT, or the session `provision` wrote (access and refresh token, JSON).
    pub jwt_file: Option<PathBuf>,
    /// Supabase Auth's base URL (`https://<project>.supabase.co/auth/v1`): when set, the agent
    /// refreshes the session in `jwt_file` before its access token expires.
    pub auth_url: Option<String>,
    /// The longest wait between two syncs (while idle); the bound of the adaptive interval.
    #[serde(default = "defaults::poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// The wait after a sync that brought work (commands, rules, settings). Default 250 ms, or
    /// `poll_interval_ms` when that is shorter ([`CloudSection::poll_active_interval_ms`]).
    pub poll_active_interval_ms: Option<u64>,
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// The polls' small reads (locks, rule changes, the latch) give up after this, so a
    /// backend that stops answering is noticed sooner than a push's request timeout.
    /// Default: 3 s, or the request timeout when that is shorter ([`CloudSection::poll_timeout_ms`]).
    pub poll_timeout_ms: Option<u64>,
    /// How long a command locked by this agent stays locked in the cloud.
    #[serde(default = "defaults::lock_timeout_seconds")]
    pub lock_timeout_seconds: u32,
    /// Commands locked per master and sync.
    #[serde(default = "defaults::lock_batch_max")]
    pub lock_batch_max: u32,
    /// Commands locked per sync for all masters together (taken round-robin across masters).
    #[serde(default = "defaults::lock_batch_total")]
    pub lock_batch_total: u32,
    #[serde(default = "defaults::push_batch_rows_max")]
    pub push_batch_rows_max: usize,
    /// How long readings, events and relay states wait for others to join their push; a
    /// command's completion never waits.
    #[serde(default = "defaults::push_linger_ms")]
    pub push_linger_ms: u64,
}

impl CloudSection {
    /// The wait after a sync that brought work (see `poll_active_interval_ms`).
    pub fn poll_active_interval_ms(&self) -> u64 {
        self.poll_active_interval_ms
            .unwrap_or_else(defaults::poll_active_interval_ms)
            .min(self.poll_interval_ms)
    }

    /// How long a poll's read waits for the backend (see `poll_timeout_ms`).
    pub fn poll_timeout_ms(&self) -> u64 {
        self.poll_timeout_ms
            .unwrap_or_else(defaults::poll_timeout_ms)
            .min(self.request_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A CA bundle (PEM) for `mqtts://` brokers with a private CA.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "defaults::ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    #[serde(default = "defaults::command_attempts_max")]
    pub command_attempts_max: u32,
    /// A command is (re)sent only with more than this much life left: the master's checks and
    /// the radio hop must end before its expiry.
    #[serde(default = "defaults::send_margin_ms")]
    pub send_margin_ms: u64,
    /// Backlog commands awaiting one master's ack at once (PROTOCOL.md: a master queues 16).
    #[serde(default = "defaults::in_flight_per_master")]
    pub in_flight_per_master: u32,
    /// A master silent for this long is marked offline.
    #[serde(default = "defaults::heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "defaults::api_listen")]
    pub listen: String,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: defaults::api_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterSection {
    pub device_id: String,
    /// The master's HMAC-SHA256 command-signing key, hex.
    pub key: Secret,
    /// How commands reach this master: pushed over MQTT, or handed out when the master polls
    /// the agent's local API (`get_and_lock_slave_commands`), as the seed's masters poll Supabase.
    #[serde(default)]
    pub transport: Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Mqtt,
    Poll,
}

mod defaults {
    pub fn outbox_rows_max() -> u64 {
        1_000_000
    }
    pub fn telemetry_batch_rows_max() -> usize {
        2_000
    }
    pub fn telemetry_flush_ms() -> u64 {
        500
    }
    pub fn poll_interval_ms() -> u64 {
        900
    }
    pub fn poll_active_interval_ms() -> u64 {
        250
    }
    pub fn poll_timeout_ms() -> u64 {
        3_000
    }
    pub fn request_timeout_ms() -> u64 {
        10_000
    }
    pub fn lock_timeout_seconds() -> u32 {
        30
    }
    pub fn lock_batch_max() -> u32 {
        50
    }
    pub fn lock_batch_total() -> u32 {
        100
    }
    pub fn worker_threads() -> usize {
        1
    }
    pub fn push_batch_rows_max() -> usize {
        1_000
    }
    pub fn push_linger_ms() -> u64 {
        100
    }
    pub fn ack_timeout_ms() -> u64 {
        3_000
    }
    pub fn command_attempts_max() -> u32 {
        3
    }
    pub fn send_margin_ms() -> u64 {
        1_000
    }
    pub fn in_flight_per_master() -> u32 {
        8
    }
    pub fn heartbeat_timeout_ms() -> u64 {
        30_000
    }
    pub fn stale_after_ms() -> u64 {
        60_000
    }
    pub fn history_hours() -> u64 {
        168
    }
    pub fn raw_rows_max() -> u64 {
        3_000_000
    }
    pub fn rollup_days() -> u64 {
        30
    }
    pub fn rollup_rows_max() -> u64 {
        3_000_000
    }
    pub fn housekeeping_interval_ms() -> u64 {
        5_000
    }
    pub fn prune_rows_per_step() -> u64 {
        20_000
    }
    pub fn vacuum_pages_per_step() -> u64 {
        2_048
    }
    pub fn command_ttl_ms() -> u64 {
        30_000
    }
    pub fn api_listen() -> String {
        "127.0.0.1:8787".to_string()
    }
    pub fn log_level() -> String {
        "info".to_string()
    }
}

const SECTIONS: [&str; 10] = [
    "agent", "store", "cloud", "mqtt", "api", "engine", "history", "safety", "log", "notify",
];

impl AgentConfig {
    /// Reads `path`, applies `AUTOCORE_*` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        AgentConfig::load_with_warnings(path).map(|(config, _)| config)
    }

    /// [`AgentConfig::load`], with what the agent runs with but should not: the
    /// configuration's [`AgentConfig::warnings`] and a file holding secrets that others can read.
    pub fn load_with_warnings(
        path: &Path,
    ) -> Result<(AgentConfig, Vec<ConfigWarning>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = AgentConfig::from_toml(&text, path, std::env::vars())?;
        let mut warnings = config.warnings();
        warnings.extend(file_mode_warning(path, &text));
        Ok((config, warnings))
    }

    /// What this configuration runs with but should not.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut warnings = Vec::new();
        if let Ok(addr) = self.api.listen.parse::<SocketAddr>()
            && !addr.ip().is_loopback()
        {
            warnings.push(warning(
                "api.listen",
                format!(
                    "{addr} is reachable from the network, and the local API has no TLS: masters' \
                     and the operator's tokens cross the LAN in clear (use 127.0.0.1 unless \
                     masters poll the Pi, and then only on a trusted network)"
                ),
            ));
        }
        if let Some(file) = &self.cloud.jwt_file
            && let Err(e) = std::fs::File::open(file)
        {
            warnings.push(warning(
                "cloud.jwt_file",
                format!(
                    "cannot read {}: {e}; the backend will refuse the agent until it can",
                    file.display()
                ),
            ));
        }
        if self.engine.history_hours.is_some() {
            warnings.push(warning(
                "engine.history_hours",
                "moved to [history] raw_hours; still read when that is not set",
            ));
        }
        if self.safety.operator_token.is_none() {
            warnings.push(warning(
                "safety.operator_token",
                "not set: the operator endpoints (emergency reset, macros, hold controls) are closed",
            ));
        }
        warnings
    }

    /// Parses `text` (named `origin` in errors) with the given environment.
    pub fn from_toml(
        text: &str,
        origin: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, column) = line_column(text, e.span().map(|s| s.start).unwrap_or(0));
            ConfigError::Syntax {
                path: origin.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        apply_env(&mut table, env)?;
        let config: AgentConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                invalid(
                    if key == "." {
                        "(top level)".into()
                    } else {
                        key
                    },
                    e.into_inner().message().to_string(),
                )
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_id("agent.id", &self.agent.id)?;
        in_range(
            "agent.worker_threads",
            self.agent.worker_threads as u64,
            1,
            64,
        )?;
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        in_range(
            "store.outbox_rows_max",
            self.store.outbox_rows_max,
            1_000,
            100_000_000,
        )?;
        in_range(
            "store.telemetry_batch_rows_max",
            self.store.telemetry_batch_rows_max as u64,
            1,
            100_000,
        )?;
        in_range(
            "store.telemetry_flush_ms",
            self.store.telemetry_flush_ms,
            10,
            60_000,
        )?;
        check_url("cloud.rest_url", &self.cloud.rest_url, &["http", "https"])?;
        match (&self.cloud.jwt, &self.cloud.jwt_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "cloud.jwt",
                    "set cloud.jwt or cloud.jwt_file, not both",
                ));
            }
            (None, None) => return Err(invalid("cloud.jwt", "set cloud.jwt or cloud.jwt_file")),
            _ => {}
        }
        if let Some(auth_url) = &self.cloud.auth_url {
            check_url("cloud.auth_url", auth_url, &["http", "https"])?;
            if self.cloud.jwt_file.is_none() {
                return Err(invalid(
                    "cloud.auth_url",
                    "refreshing a session needs it in cloud.jwt_file (autocore-agent provision writes both)",
                ));
            }
        }
        in_range(
            "cloud.poll_interval_ms",
            self.cloud.poll_interval_ms,
            100,
            3_600_000,
        )?;
        if let Some(active) = self.cloud.poll_active_interval_ms {
            in_range(
                "cloud.poll_active_interval_ms",
                active,
                50,
                self.cloud.poll_interval_ms,
            )?;
        }
        in_range(
            "cloud.request_timeout_ms",
            self.cloud.request_timeout_ms,
            100,
            300_000,
        )?;
        if let Some(poll_timeout_ms) = self.cloud.poll_timeout_ms {
            in_range(
                "cloud.poll_timeout_ms",
                poll_timeout_ms,
                100,
                self.cloud.request_timeout_ms,
            )?;
        }
        in_range(
            "cloud.lock_timeout_seconds",
            self.cloud.lock_timeout_seconds as u64,
            1,
            3_600,
        )?;
        in_range(
            "cloud.lock_batch_max",
            self.cloud.lock_batch_max as u64,
            1,
            100,
        )?;
        in_range(
            "cloud.lock_batch_total",
            self.cloud.lock_batch_total as u64,
            1,
            100,
        )?;
        in_range(
            "cloud.push_batch_rows_max",
            self.cloud.push_batch_rows_max as u64,
            1,
            10_000,
        )?;
        in_range("cloud.push_linger_ms", self.cloud.push_linger_ms, 0, 5_000)?;
        check_url("mqtt.url", &self.mqtt.url, &["mqtt", "mqtts"])?;
        match (&self.mqtt.username, &self.mqtt.password) {
            (Some(_), None) => {
                return Err(invalid(
                    "mqtt.password",
                    "mqtt.username is set without a password: set both or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "mqtt.username",
                    "mqtt.password is set without a username: set both or neither",
                ));
            }
            _ => {}
        }
        if self.mqtt.username.as_deref() == Some("") {
            return Err(invalid("mqtt.username", "must not be empty"));
        }
        if let Some(ca) = &self.mqtt.ca_file
            && let Err(e) = std::fs::File::open(ca)
        {
            return Err(invalid(
                "mqtt.ca_file",
                format!("cannot read {}: {e}", ca.display()),
            ));
        }
        in_range("mqtt.ack_timeout_ms", self.mqtt.ack_timeout_ms, 50, 600_000)?;
        in_range(
            "mqtt.command_attempts_max",
            self.mqtt.command_attempts_max as u64,
            1,
            100,
        )?;
        in_range("mqtt.send_margin_ms", self.mqtt.send_margin_ms, 0, 60_000)?;
        in_range(
            "mqtt.in_flight_per_master",
            self.mqtt.in_flight_per_master as u64,
            1,
            16,
        )?;
        in_range(
            "mqtt.heartbeat_timeout_ms",
            self.mqtt.heartbeat_timeout_ms,
            1_000,
            86_400_000,
        )?;
        self.api.listen.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "api.listen",
                format!("{e} (want host:port, e.g. 127.0.0.1:8787)"),
            )
        })?;
        in_range(
            "engine.stale_after_ms",
            self.engine.stale_after_ms,
            1_000,
            86_400_000,
        )?;
        if let Some(hours) = self.engine.history_hours {
            in_range("engine.history_hours", hours, 0, 24 * 366)?;
        }
        self.validate_history()?;
        in_range(
            "engine.command_ttl_ms",
            self.engine.command_ttl_ms,
            1_000,
            3_600_000,
        )?;
        self.engine_time_zone()?;
        if let Some(token) = &self.safety.operator_token
            && token.expose().trim().chars().count() < OPERATOR_TOKEN_CHARS_MIN
        {
            return Err(invalid(
                "safety.operator_token",
                format!(
                    "must be at least {OPERATOR_TOKEN_CHARS_MIN} characters (an empty or short token \
                     would let anyone on the network reset the emergency stop); remove the key \
                     to close the operator endpoints"
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            invalid(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            )
        })?;
        self.notify.validate()?;
        crate::automation::interlocks(self)
            .validate()
            .map_err(|e| invalid("safety", e.to_string()))?;
        let mut seen = BTreeSet::new();
        for (i, master) in self.masters.iter().enumerate() {
            check_id(&format!("masters[{i}].device_id"), &master.device_id)?;
            if !seen.insert(master.device_id.as_str()) {
                return Err(invalid(
                    format!("masters[{i}].device_id"),
                    format!("{} is listed twice", master.device_id),
                ));
            }
            let key = hex::decode(master.key.expose())
                .map_err(|_| invalid(format!("masters[{i}].key"), "must be hex"))?;
            if key.len() < 16 {
                return Err(invalid(
                    format!("masters[{i}].key"),
                    "must be at least 16 bytes (32 hex digits)",
                ));
            }
        }
        Ok(())
    }

    fn validate_history(&self) -> Result<(), ConfigError> {
        let h = &self.history;
        if let Some(hours) = h.raw_hours {
            in_range("history.raw_hours", hours, 0, 24 * 366)?;
        }
        in_range(
            "history.raw_rows_max",
            h.raw_rows_max,
            10_000,
            1_000_000_000,
        )?;
        in_range("history.rollup_days", h.rollup_days, 1, 3_660)?;
        in_range(
            "history.rollup_rows_max",
            h.rollup_rows_max,
            10_000,
            1_000_000_000,
        )?;
        in_range(
            "history.housekeeping_interval_ms",
            h.housekeeping_interval_ms,
            100,
            3_600_000,
        )?;
        in_range(
            "history.prune_rows_per_step",
            h.prune_rows_per_step,
            100,
            1_000_000,
        )?;
        in_range(
            "history.vacuum_pages_per_step",
            h.vacuum_pages_per_step,
            1,
            1_000_000,
        )?;
        // Rollups answer for the minutes before the raw window: they must reach back further.
        if h.rollup_days * 24 < self.history_raw_hours() {
            return Err(invalid(
                "history.rollup_days",
                format!(
                    "{} days keeps rollups for less than the {} hours of raw readings \
                     (history.raw_hours): keep rollups at least as long",
                    h.rollup_days,
                    self.history_raw_hours()
                ),
            ));
        }
        Ok(())
    }

    /// How long raw readings are kept: `history.raw_hours`, else the older
    /// `engine.history_hours`, else 168.
    pub fn history_raw_hours(&self) -> u64 {
        self.history
            .raw_hours
            .or(self.engine.history_hours)
            .unwrap_or_else(defaults::history_hours)
    }

    /// The history's bounds and step sizes.
    pub fn history_bounds(&self) -> crate::store::HistoryBounds {
        crate::store::HistoryBounds {
            raw_hours: self.history_raw_hours(),
            raw_rows_max: self.history.raw_rows_max,
            rollup_days: self.history.rollup_days,
            rollup_rows_max: self.history.rollup_rows_max,
            prune_rows_per_step: self.history.prune_rows_per_step,
            vacuum_pages_per_step: self.history.vacuum_pages_per_step,
        }
    }

    /// The engine's time zone: `engine.time_zone`, else the system's.
    pub fn engine_time_zone(&self) -> Result<jiff::tz::TimeZone, ConfigError> {
        if self.engine.time_zone.is_empty() {
            return Ok(jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC));
        }
        jiff::tz::TimeZone::get(&self.engine.time_zone).map_err(|e| {
            invalid(
                "engine.time_zone",
                format!(
                    "{:?} is not a known IANA time zone ({e})",
                    self.engine.time_zone
                ),
            )
        })
    }

    pub fn master(&self, device_id: &str) -> Option<&MasterSection> {
        self.masters.iter().find(|m| m.device_id == device_id)
    }

    /// The master signing key as bytes; validated at load.
    pub fn master_key(&self, device_id: &str) -> Option<Vec<u8>> {
        self.masters
            .iter()
            .find(|m| m.device_id == device_id)
            .and_then(|m| hex::decode(m.key.expose()).ok())
    }
}

/// A URL with one of `schemes` and a host.
pub(crate) fn check_url(key: &str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let want = schemes
        .iter()
        .map(|s| format!("{s}://host"))
        .collect::<Vec<_>>()
        .join(" or ");
    let url = url::Url::parse(value)
        .map_err(|e| invalid(key, format!("{value:?} is not a URL ({e}); want {want}")))?;
    if !schemes.contains(&url.scheme()) {
        return Err(invalid(key, format!("{value:?}: want {want}")));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(
            key,
            format!("{value:?} names no host; want {want}"),
        ));
    }
    Ok(())
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The keys whose values must not be readable by other users of the Pi.
const SECRET_KEYS: [&str; 7] = [
    "key",
    "jwt",
    "password",
    "operator_token",
    "api_key",
    "secret",
    "telegram_bot_token",
];

/// A configuration file holding secrets that group or others can read.
pub(crate) fn file_mode_warning(path: &Path, text: &str) -> Option<ConfigWarning> {
    use std::os::unix::fs::PermissionsExt as _;
    let holds_secrets = text.lines().any(|line| {
        let line = line.trim_start();
        !line.starts_with('#')
            && SECRET_KEYS.iter().any(|k| {
                line.strip_prefix(k)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
    });
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (holds_secrets && mode & 0o044 != 0).then(|| {
        warning(
            path.display().to_string(),
            format!(
                "holds secrets (masters' keys, jwt, password or operator_token) and is readable \
                 by group or others (mode {mode:04o}): chmod 600 it"
            ),
        )
    })
}

pub(crate) fn check_id(key: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{value:?} must be 1-64 characters of A-Z a-z 0-9 _ . : -"),
        ))
    }
}

pub(crate) fn in_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(key, format!("{value} is outside {min}..={max}")))
    }
}

/// `AUTOCORE_CLOUD_POLL_INTERVAL_MS=500` sets `[cloud] poll_interval_ms = 500`. A value is read
/// as TOML (number, boolean, quoted string) and otherwise taken as a plain string.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix("AUTOCORE_") else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let Some(section) = SECTIONS
            .iter()
            .find(|s| lower.starts_with(&format!("{s}_")))
        else {
            continue;
        };
        let key = &lower[section.len() + 1..];
        if key.is_empty() {
            return Err(ConfigError::Env {
                var,
                reason: "names no key".into(),
            });
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(ConfigError::Env {
                var,
                reason: format!("[{section}] is not a table"),
            });
        };
        section_table.insert(key.to_string(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../agent.example.toml");

    fn load(text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml(
            text,
            Path::new("agent.toml"),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn error_key(result: Result<AgentConfig, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn the_example_config_is_valid() {
        let config = load(EXAMPLE, &[]).unwrap();
        assert_eq!(config.agent.id, "pi-greenhouse");
        assert_eq!(config.masters.len(), 1);
    }

    #[test]
    fn an_environment_variable_overrides_its_key() {
        let config = load(
            EXAMPLE,
            &[
                ("AUTOCORE_CLOUD_POLL_INTERVAL_MS", "250"),
                ("AUTOCORE_AGENT_ID", "pi-barn"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(config.cloud.poll_interval_ms, 250);
        assert_eq!(config.agent.id, "pi-barn");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let text = EXAMPLE.replace("poll_interval_ms = 900", "poll_interval_ms = \"soon\"");
        assert_eq!(error_key(load(&text, &[])), "cloud.poll_interval_ms");
    }

    #[test]
    fn an_unknown_key_names_its_section() {
        let text = EXAMPLE.replace("[cloud]", "[cloud]\npoll_intervall_ms = 5");
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(
            err.contains("cloud") && err.contains("poll_intervall_ms"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_CLOUD_POLL_INTERVAL_MS", "5")])),
            "cloud.poll_interval_ms"
        );
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_API_LISTEN", "nowhere")])),
            "api.listen"
        );
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_MQTT_URL", "http://x")])),
            "mqtt.url"
        );
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_AGENT_WORKER_THREADS", "0")])),
            "agent.worker_threads"
        );
        assert_eq!(load(EXAMPLE, &[]).unwrap().agent.worker_threads, 1);
        let four = load(EXAMPLE, &[("AUTOCORE_AGENT_WORKER_THREADS", "4")]).unwrap();
        assert_eq!(four.agent.worker_threads, 4);
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_CLOUD_PUSH_LINGER_MS", "6000")])),
            "cloud.push_linger_ms"
        );
        assert_eq!(load(EXAMPLE, &[]).unwrap().cloud.push_linger_ms, 100);
        let none = load(EXAMPLE, &[("AUTOCORE_CLOUD_PUSH_LINGER_MS", "0")]).unwrap();
        assert_eq!(none.cloud.push_linger_ms, 0);
    }

    #[test]
    fn the_poll_timeout_is_three_seconds_or_the_request_timeout_and_never_longer() {
        let config = load(EXAMPLE, &[]).unwrap();
        assert_eq!(config.cloud.poll_timeout_ms(), 3_000);
        let short = load(EXAMPLE, &[("AUTOCORE_CLOUD_REQUEST_TIMEOUT_MS", "1000")]).unwrap();
        assert_eq!(short.cloud.poll_timeout_ms(), 1_000);
        let set = load(EXAMPLE, &[("AUTOCORE_CLOUD_POLL_TIMEOUT_MS", "500")]).unwrap();
        assert_eq!(set.cloud.poll_timeout_ms(), 500);
        assert_eq!(
            error_key(load(
                EXAMPLE,
                &[("AUTOCORE_CLOUD_POLL_TIMEOUT_MS", "20000")]
            )),
            "cloud.poll_timeout_ms",
            "longer than the request timeout (10 s)"
        );
    }

    #[test]
    fn the_active_poll_interval_is_250_ms_or_the_bound_and_never_beyond_it() {
        let config = load(EXAMPLE, &[]).unwrap();
        assert_eq!(config.cloud.poll_interval_ms, 900);
        assert_eq!(config.cloud.poll_active_interval_ms(), 250);
        assert_eq!(config.cloud.lock_batch_total, 100);
        let short = load(EXAMPLE, &[("AUTOCORE_CLOUD_POLL_INTERVAL_MS", "100")]).unwrap();
        assert_eq!(short.cloud.poll_active_interval_ms(), 100);
        assert_eq!(
            error_key(load(
                EXAMPLE,
                &[("AUTOCORE_CLOUD_POLL_ACTIVE_INTERVAL_MS", "1000")]
            )),
            "cloud.poll_active_interval_ms",
            "longer than the idle bound (900 ms)"
        );
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_CLOUD_LOCK_BATCH_TOTAL", "101")])),
            "cloud.lock_batch_total"
        );
    }

    #[test]
    fn a_bad_master_key_names_the_master() {
        let text = EXAMPLE.replace(
            "key = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"",
            "key = \"zz\"",
        );
        assert_eq!(error_key(load(&text, &[])), "masters[0].key");
    }

    #[test]
    fn a_master_polls_or_takes_mqtt_and_nothing_else() {
        let config = load(EXAMPLE, &[]).unwrap();
        assert_eq!(config.masters[0].transport, Transport::Mqtt);
        let text = EXAMPLE.replace("[[masters]]", "[[masters]]\ntransport = \"poll\"");
        assert_eq!(
            load(&text, &[]).unwrap().masters[0].transport,
            Transport::Poll
        );
        let text = EXAMPLE.replace("[[masters]]", "[[masters]]\ntransport = \"pigeon\"");
        assert_eq!(error_key(load(&text, &[])), "masters[0].transport");
    }

    #[test]
    fn an_empty_or_short_operator_token_is_refused_naming_the_key() {
        for token in ["", "   ", "short-token"] {
            let text = EXAMPLE.replace(
                "# operator_token = \"...\"",
                &format!("operator_token = \"{token}\""),
            );
            assert_eq!(
                error_key(load(&text, &[])),
                "safety.operator_token",
                "{token:?}"
            );
        }
        let text = EXAMPLE.replace(
            "# operator_token = \"...\"",
            "operator_token = \"a-long-enough-operator-token\"",
        );
        assert!(load(&text, &[]).is_ok());
        // An empty variable overriding a real token does not open the endpoints either.
        assert_eq!(
            error_key(load(&text, &[("AUTOCORE_SAFETY_OPERATOR_TOKEN", "")])),
            "safety.operator_token"
        );
    }

    #[test]
    fn a_username_without_a_password_or_a_password_without_a_username_is_refused() {
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_MQTT_USERNAME", "autocore")])),
            "mqtt.password"
        );
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_MQTT_PASSWORD", "secret")])),
            "mqtt.username"
        );
        assert!(
            load(
                EXAMPLE,
                &[
                    ("AUTOCORE_MQTT_USERNAME", "autocore"),
                    ("AUTOCORE_MQTT_PASSWORD", "secret")
                ]
            )
            .is_ok()
        );
    }

    #[test]
    fn a_ca_file_that_does_not_exist_is_refused() {
        assert_eq!(
            error_key(load(
                EXAMPLE,
                &[("AUTOCORE_MQTT_CA_FILE", "/nonexistent/autocore-ca.pem")]
            )),
            "mqtt.ca_file"
        );
    }

    #[test]
    fn urls_without_a_host_are_refused_naming_the_key() {
        for url in ["mqtt://:1883", "mqtt://", "mqtts:///x"] {
            assert_eq!(
                error_key(load(EXAMPLE, &[("AUTOCORE_MQTT_URL", url)])),
                "mqtt.url",
                "{url}"
            );
        }
        for url in ["http://", "http://:3000", "ftp://backend", "backend:3000"] {
            assert_eq!(
                error_key(load(EXAMPLE, &[("AUTOCORE_CLOUD_REST_URL", url)])),
                "cloud.rest_url",
                "{url}"
            );
        }
        assert!(
            load(
                EXAMPLE,
                &[("AUTOCORE_MQTT_URL", "mqtts://broker.example:8883")]
            )
            .is_ok()
        );
    }

    fn warned_keys(config: &AgentConfig) -> Vec<String> {
        config.warnings().into_iter().map(|w| w.key).collect()
    }

    #[test]
    fn a_missing_jwt_file_and_a_listen_address_off_loopback_are_warnings_naming_the_key() {
        let config = load(EXAMPLE, &[("AUTOCORE_API_LISTEN", "0.0.0.0:8787")]).unwrap();
        let keys = warned_keys(&config);
        assert!(keys.contains(&"api.listen".to_string()), "{keys:?}");
        assert!(keys.contains(&"cloud.jwt_file".to_string()), "{keys:?}");
        let config = load(EXAMPLE, &[("AUTOCORE_API_LISTEN", "192.168.1.20:8787")]).unwrap();
        assert!(warned_keys(&config).contains(&"api.listen".to_string()));
        let config = load(EXAMPLE, &[("AUTOCORE_API_LISTEN", "[::1]:8787")]).unwrap();
        assert!(!warned_keys(&config).contains(&"api.listen".to_string()));
    }

    #[test]
    fn a_toml_syntax_error_gives_its_line_and_column() {
        let text = EXAMPLE.replace("poll_interval_ms = 900", "poll_interval_ms = = 800");
        let line = EXAMPLE
            .lines()
            .position(|l| l.starts_with("poll_interval_ms"))
            .unwrap()
            + 1;
        match load(&text, &[]) {
            Err(ConfigError::Syntax {
                line: l, column, ..
            }) => {
                assert_eq!((l, column), (line, 20));
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        let message = load(&text, &[]).unwrap_err().to_string();
        assert!(
            message.contains(&format!("line {line}, column 20")),
            "{message}"
        );
    }

    #[test]
    fn a_config_file_holding_keys_that_others_can_read_draws_a_warning_naming_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let text = EXAMPLE.replace(
            "jwt_file = \"/etc/autocore/agent.jwt\"",
            "jwt = \"eyJ.secret.token\"",
        );
        std::fs::write(&path, &text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = file_mode_warning(&path, &text).expect("a warning");
        assert_eq!(warning.key, path.display().to_string());
        assert!(warning.message.contains("0644"), "{warning}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(file_mode_warning(&path, &text), None);
    }

    #[test]
    fn the_log_format_is_plain_or_json_and_its_variable_overrides_it() {
        assert_eq!(load(EXAMPLE, &[]).unwrap().log.format, LogFormat::Plain);
        let config = load(EXAMPLE, &[("AUTOCORE_LOG_FORMAT", "json")]).unwrap();
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_LOG_FORMAT", "xml")])),
            "log.format"
        );
        assert_eq!(
            error_key(load(EXAMPLE, &[("AUTOCORE_LOG_LEVEL", "loud=[")])),
            "log.level"
        );
    }

    #[test]
    fn bad_history_bounds_name_their_key() {
        for (var, value, key) in [
            ("AUTOCORE_HISTORY_RAW_ROWS_MAX", "5", "history.raw_rows_max"),
            (
                "AUTOCORE_HISTORY_RAW_ROWS_MAX",
                "lots",
                "history.raw_rows_max",
            ),
            ("AUTOCORE_HISTORY_RAW_HOURS", "100000", "history.raw_hours"),
            ("AUTOCORE_HISTORY_ROLLUP_DAYS", "0", "history.rollup_days"),
            (
                "AUTOCORE_HISTORY_ROLLUP_ROWS_MAX",
                "-1",
                "history.rollup_rows_max",
            ),
            (
                "AUTOCORE_HISTORY_HOUSEKEEPING_INTERVAL_MS",
                "1",
                "history.housekeeping_interval_ms",
            ),
            (
                "AUTOCORE_HISTORY_PRUNE_ROWS_PER_STEP",
                "0",
                "history.prune_rows_per_step",
            ),
            (
                "AUTOCORE_HISTORY_VACUUM_PAGES_PER_STEP",
                "0",
                "history.vacuum_pages_per_step",
            ),
        ] {
            assert_eq!(
                error_key(load(EXAMPLE, &[(var, value)])),
                key,
                "{var}={value}"
            );
        }
        // Rollups that end before the raw readings do would leave a hole for `rules test`.
        assert_eq!(
            error_key(load(
                EXAMPLE,
                &[
                    ("AUTOCORE_HISTORY_RAW_HOURS", "72"),
                    ("AUTOCORE_HISTORY_ROLLUP_DAYS", "2")
                ]
            )),
            "history.rollup_days"
        );
        let text = EXAMPLE.replace("raw_rows_max = 3000000", "raw_rows_max = 0");
        assert_eq!(error_key(load(&text, &[])), "history.raw_rows_max");
        let text = EXAMPLE.replace("[history]", "[history]\nraw_row_max = 5");
        let err = load(&text, &[]).unwrap_err().to_string();
        assert!(
            err.contains("history") && err.contains("raw_row_max"),
            "{err}"
        );
    }

    #[test]
    fn the_history_bounds_come_from_the_file_and_the_environment() {
        let config = load(EXAMPLE, &[("AUTOCORE_HISTORY_RAW_ROWS_MAX", "500000")]).unwrap();
        let bounds = config.history_bounds();
        assert_eq!(bounds.raw_rows_max, 500_000);
        assert_eq!(bounds.raw_hours, 168);
        assert_eq!(bounds.rollup_days, 30);
        assert!(!warned_keys(&config).contains(&"engine.history_hours".to_string()));
    }

    #[test]
    fn an_older_configuration_with_engine_history_hours_still_loads_with_a_warning() {
        let text = EXAMPLE
            .replace("raw_hours = 168\n", "")
            .replace("[engine]", "[engine]\nhistory_hours = 48");
        let config = load(&text, &[]).unwrap();
        assert_eq!(config.history_bounds().raw_hours, 48);
        assert!(warned_keys(&config).contains(&"engine.history_hours".to_string()));
        // [history] raw_hours wins when both are set.
        let both = text.replace("[history]", "[history]\nraw_hours = 24");
        assert_eq!(load(&both, &[]).unwrap().history_bounds().raw_hours, 24);
        // No [history] at all: the defaults.
        let start = EXAMPLE.find("[history]").unwrap();
        let end = EXAMPLE.find("[safety]").unwrap();
        let bare = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]);
        let config = load(&bare, &[]).unwrap();
        assert_eq!(config.history_bounds().raw_hours, 168);
        assert_eq!(config.history_bounds().raw_rows_max, 3_000_000);
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let text = EXAMPLE.replace(
            "jwt_file = \"/etc/autocore/agent.jwt\"",
            "jwt = \"eyJ.secret.token\"",
        );
        let config = load(&text, &[]).unwrap_or_else(|e| panic!("{e}"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("eyJ.secret.token"));
        assert!(!debug.contains("00112233445566778899"));
    }
}
