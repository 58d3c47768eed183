//! `autocore-agent doctor`: what an agent needs to run well, checked one line at a time with what
//! to do about a failure. The probes (files, the clock, the broker, the backend, the database) sit
//! at the edges and gather plain facts; the functions that turn facts into a [`Finding`] are pure
//! and unit-tested. Doctor never creates or changes the agent's state: the database is opened
//! read-only, and the fsync probe's file is removed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::ConnectReturnCode;
use serde::Serialize;

use crate::config::AgentConfig;
use crate::connectivity::MqttState;
use crate::shared::now_ms;
use crate::store::{Store, StoreError};

/// How long doctor waits for the broker's CONNACK: a broker on the LAN answers in milliseconds.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long doctor waits for a running agent's `/health`.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// A clock this far from the backend's is worth a look: the `Date` header has a resolution of
/// one second, so anything under this is noise.
pub const CLOCK_SKEW_WARN_MS: i64 = 2_000;
/// A clock this far off eats a third of a command's default 30 s life (`engine.command_ttl_ms`):
/// commands expire early or run late.
pub const CLOCK_SKEW_FAIL_MS: i64 = 10_000;
/// A token that expires within a day needs rotating now.
pub const TOKEN_WARN_S: i64 = 86_400;
/// Samples of the fsync probe; the median is reported.
pub const FSYNC_SAMPLES: usize = 5;
/// Bytes written before each fsync: about one small commit.
pub const FSYNC_PROBE_BYTES: usize = 4_096;
/// Above this an fsync costs like a slow SD card's: every commit of a command waits for it.
pub const FSYNC_WARN_MS: f64 = 15.0;
/// Above this the disk is failing or saturated.
pub const FSYNC_FAIL_MS: f64 = 250.0;
/// Under this SQLite soon cannot commit: accepted commands and completions would be refused.
pub const FREE_FAIL_BYTES: u64 = 100 * 1024 * 1024;
/// Under this (or under [`FREE_WARN_PERCENT`]) the disk is filling up.
pub const FREE_WARN_BYTES: u64 = 1024 * 1024 * 1024;
pub const FREE_WARN_PERCENT: f64 = 10.0;

/// How a check came out. A warning alone leaves doctor's exit code 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    /// As printed at the start of a line: a failure in capitals, to be seen.
    pub fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One check's outcome: what was found and, unless all is well, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Finding {
    pub fn ok(check: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            level: Level::Ok,
            message: message.into(),
            hint: None,
        }
    }

    pub fn warn(
        check: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Finding {
        Finding {
            level: Level::Warn,
            hint: Some(hint.into()),
            ..Finding::ok(check, message)
        }
    }

    pub fn fail(
        check: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Finding {
        Finding {
            level: Level::Fail,
            hint: Some(hint.into()),
            ..Finding::ok(check, message)
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<4}  {}: {}",
            self.level.label(),
            self.check,
            self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, " — {hint}")?;
        }
        Ok(())
    }
}

/// Every finding of one run, in the order the checks ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub findings: Vec<Finding>,
}

/// Doctor found at least one failure; the binary exits 1 with it.
#[derive(Debug, thiserror::Error)]
#[error("doctor: {0} check(s) failed")]
pub struct Failed(pub usize);

impl Report {
    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    pub fn failed(&self) -> bool {
        self.count(Level::Fail) > 0
    }

    /// The first finding of `check`.
    pub fn find(&self, check: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.check == check)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} checks: {} ok, {} warning(s), {} failed",
            self.findings.len(),
            self.count(Level::Ok),
            self.count(Level::Warn),
            self.count(Level::Fail)
        )
    }

    /// One line per finding, then the summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for finding in &self.findings {
            out.push_str(&finding.to_string());
            out.push('\n');
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "findings": self.findings,
            "ok": self.count(Level::Ok),
            "warn": self.count(Level::Warn),
            "fail": self.count(Level::Fail),
            "failed": self.failed(),
        })
    }

    /// Ok unless a check failed.
    pub fn result(&self) -> Result<(), Failed> {
        match self.count(Level::Fail) {
            0 => Ok(()),
            n => Err(Failed(n)),
        }
    }
}

// ------------------------------------------------------------------ classifications (pure)

/// `timedatectl show -p NTPSynchronized --value`'s answer, or why there is none.
pub fn classify_ntp(answer: Result<&str, &str>) -> Finding {
    const CHECK: &str = "clock sync";
    match answer.map(str::trim) {
        Ok("yes") => Finding::ok(CHECK, "NTP synchronised"),
        Ok("no") => Finding::warn(
            CHECK,
            "not NTP synchronised",
            "enable time sync (timedatectl set-ntp true, or chrony): command expiries and \
             schedules read this clock",
        ),
        Ok(other) => Finding::warn(
            CHECK,
            format!("cannot tell (timedatectl says {other:?})"),
            "check that the clock is synchronised by NTP (chrony, systemd-timesyncd)",
        ),
        Err(why) => Finding::warn(
            CHECK,
            format!("cannot tell: {why}"),
            "check that the clock is synchronised by NTP (chrony, systemd-timesyncd); the \
             clock skew line compares it with the backend's",
        ),
    }
}

/// Our clock minus the backend's (positive: ours is ahead), or None when it could not be
/// measured (`why`).
pub fn classify_skew(skew_ms: Result<i64, &str>) -> Finding {
    const CHECK: &str = "clock skew";
    let hint = "synchronise the clock (timedatectl set-ntp true, or chrony): command expiries \
                are compared with it";
    let skew_ms = match skew_ms {
        Ok(ms) => ms,
        Err(why) => {
            return Finding::warn(
                CHECK,
                format!("cannot tell: {why}"),
                "fix the backend line first",
            );
        }
    };
    let side = if skew_ms >= 0 { "ahead of" } else { "behind" };
    let message = format!(
        "{:.1} s {side} the backend's (its Date header)",
        skew_ms.unsigned_abs() as f64 / 1000.0
    );
    match skew_ms.abs() {
        ms if ms <= CLOCK_SKEW_WARN_MS => Finding::ok(CHECK, message),
        ms if ms <= CLOCK_SKEW_FAIL_MS => Finding::warn(CHECK, message, hint),
        _ => Finding::fail(CHECK, message, hint),
    }
}

/// The `exp` claim of a JWT (seconds since the epoch), read without verifying: the backend
/// verifies. None when the token has no `exp`.
pub fn jwt_exp(token: &str) -> Result<Option<i64>, String> {
    let claims = crate::cloud::unverified_claims(token)?;
    match &claims["exp"] {
        serde_json::Value::Null => Ok(None),
        exp => exp
            .as_f64()
            .map(|s| Some(s as i64))
            .ok_or_else(|| format!("its exp claim {exp} is not a number")),
    }
}

/// The token's expiry against the time now.
pub fn classify_token(exp: Result<Option<i64>, String>, now_s: i64) -> Finding {
    const CHECK: &str = "token";
    let rotate = "issue a new agent token and put it in cloud.jwt_file (re-read without a \
                  restart) or cloud.jwt";
    match exp {
        Err(why) => Finding::fail(CHECK, format!("cannot be read: {why}"), rotate),
        Ok(None) => Finding::ok(CHECK, "has no expiry (no exp claim)"),
        Ok(Some(exp)) => {
            let at = jiff::Timestamp::from_second(exp)
                .map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_else(|_| exp.to_string());
            let left = exp - now_s;
            if left <= 0 {
                Finding::fail(
                    CHECK,
                    format!("expired {} ago ({at})", human_ms(-left * 1000)),
                    rotate,
                )
            } else if left < TOKEN_WARN_S {
                Finding::warn(
                    CHECK,
                    format!("expires in {} ({at})", human_ms(left * 1000)),
                    rotate,
                )
            } else {
                Finding::ok(
                    CHECK,
                    format!("expires in {} ({at})", human_ms(left * 1000)),
                )
            }
        }
    }
}

/// The access token of a session the agent refreshes (`cloud.auth_url`): a short life is normal,
/// since the agent renews it before it ends; an ended one is renewed when the agent runs, unless
/// the refresh token is refused (revoked: provision again).
pub fn classify_session(exp: Result<Option<i64>, String>, now_s: i64) -> Finding {
    const CHECK: &str = "token";
    let again = "provision the Pi again with a new claim code (autocore-agent provision)";
    match exp {
        Err(why) => Finding::fail(CHECK, format!("cannot be read: {why}"), again),
        Ok(None) => Finding::ok(CHECK, "has no expiry (no exp claim)"),
        Ok(Some(exp)) => {
            let left = exp - now_s;
            if left > 0 {
                Finding::ok(
                    CHECK,
                    format!(
                        "session token expires in {}; the agent refreshes it before then (cloud.auth_url)",
                        human_ms(left * 1000)
                    ),
                )
            } else {
                Finding::warn(
                    CHECK,
                    format!(
                        "session token expired {} ago; the agent refreshes it when it runs",
                        human_ms(-left * 1000)
                    ),
                    format!("start the agent; if its log says the refresh was refused, {again}"),
                )
            }
        }
    }
}

/// What one authenticated request to the backend came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAnswer {
    /// An HTTP status and the body (PostgREST's error JSON, or the rows).
    Status(u16, String),
    /// No answer: the error's chain.
    Unreachable(String),
}

pub fn classify_backend(url: &str, answer: &BackendAnswer, elapsed: Duration) -> Finding {
    const CHECK: &str = "backend";
    let (status, body) = match answer {
        BackendAnswer::Unreachable(why) => {
            return Finding::fail(
                CHECK,
                format!("unreachable at {url}: {why}"),
                "check the network and cloud.rest_url; offline, the agent keeps control and \
                 syncs when the backend is back",
            );
        }
        BackendAnswer::Status(status, body) => (*status, body),
    };
    // PostgREST's error body is `{"code", "message", ...}`; its message says why in words.
    let why = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect());
    match status {
        200..=299 => Finding::ok(
            CHECK,
            format!(
                "{url} accepts the agent's token (HTTP {status} in {} ms)",
                elapsed.as_millis()
            ),
        ),
        401 | 403 => Finding::fail(
            CHECK,
            format!("token refused (HTTP {status}: {why})"),
            "the token must be signed with the backend's JWT secret, unexpired, for an agent \
             registered and not revoked: issue a new one and put it in cloud.jwt_file",
        ),
        408 | 429 | 500..=599 => Finding::fail(
            CHECK,
            format!("answers with a server error (HTTP {status}: {why})"),
            "a problem of the backend's: check its status; the agent keeps control and queues \
             what the cloud must learn",
        ),
        _ => Finding::fail(
            CHECK,
            format!("answered HTTP {status} at {url} ({why})"),
            "check cloud.rest_url: PostgREST's base URL (https://<project>.supabase.co/rest/v1 \
             on Supabase)",
        ),
    }
}

/// What one MQTT CONNECT with the agent's options came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerOutcome {
    Accepted,
    /// The broker answered the CONNECT with this refusal.
    Refused(ConnectReturnCode),
    /// No CONNACK: the link's state and the error in words.
    Failed(MqttState, String),
    TimedOut,
}

impl BrokerOutcome {
    pub fn from_error(error: &rumqttc::ConnectionError) -> BrokerOutcome {
        match error {
            rumqttc::ConnectionError::ConnectionRefused(code) => BrokerOutcome::Refused(*code),
            other => BrokerOutcome::Failed(MqttState::from_error(other), other.to_string()),
        }
    }
}

/// A CONNACK refusal in words.
pub fn connack_words(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Success => "accepted",
        ConnectReturnCode::RefusedProtocolVersion => "refused the protocol version (CONNACK 1)",
        ConnectReturnCode::BadClientId => "refused the client id (CONNACK 2)",
        ConnectReturnCode::ServiceUnavailable => "is unavailable (CONNACK 3)",
        ConnectReturnCode::BadUserNamePassword => "refused the username or password (CONNACK 4)",
        // Mosquitto answers a wrong password with this code too.
        ConnectReturnCode::NotAuthorized => {
            "refused: not authorised (CONNACK 5: a wrong password or an unknown user)"
        }
    }
}

const LOGIN_HINT: &str = "check [mqtt] username and password against the broker's password \
                          file (autocore-agent broker-config writes both)";

pub fn classify_broker(url: &str, user: Option<&str>, outcome: &BrokerOutcome) -> Finding {
    const CHECK: &str = "broker";
    let who = user.map_or_else(|| "anonymous".to_string(), |u| format!("login {u:?}"));
    match outcome {
        BrokerOutcome::Accepted => Finding::ok(CHECK, format!("{url} accepted {who}")),
        BrokerOutcome::Refused(code) => {
            let hint = match code {
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                    LOGIN_HINT
                }
                ConnectReturnCode::ServiceUnavailable => "check the broker's log",
                _ => "check that the broker speaks MQTT 3.1.1 and its listener's settings",
            };
            Finding::fail(
                CHECK,
                format!("{url} {} for {who}", connack_words(*code)),
                hint,
            )
        }
        BrokerOutcome::Failed(MqttState::Tls, why) => Finding::fail(
            CHECK,
            format!("TLS with {url} failed: {why}"),
            "check [mqtt] ca_file and that the broker's certificate names the host of the url",
        ),
        BrokerOutcome::Failed(_, why) => Finding::fail(
            CHECK,
            format!("unreachable at {url}: {why}"),
            "start the broker (systemctl status mosquitto) and check [mqtt] url",
        ),
        BrokerOutcome::TimedOut => Finding::fail(
            CHECK,
            format!(
                "no CONNACK from {url} within {} s",
                BROKER_TIMEOUT.as_secs()
            ),
            "check [mqtt] url (an MQTT listener, mqtts:// for TLS) and the broker's log",
        ),
    }
}

/// The broker as a running agent's `/health` reports it (`mqtt.state`, `mqtt.detail`): doctor
/// does not connect beside a running agent, since the broker makes the username the client id and
/// a second connection with the agent's login would take its session over.
pub fn classify_broker_health(url: &str, state: &str, detail: Option<&str>) -> Finding {
    const CHECK: &str = "broker";
    let detail = detail.map(|d| format!(": {d}")).unwrap_or_default();
    let state = MqttState::ALL
        .into_iter()
        .find(|s| s.label() == state)
        .unwrap_or(MqttState::ProtocolError);
    match state {
        MqttState::Connected => {
            Finding::ok(CHECK, format!("{url}: the running agent is connected"))
        }
        MqttState::Connecting => Finding::warn(
            CHECK,
            format!("{url}: the running agent is still connecting"),
            "run doctor again in a few seconds",
        ),
        MqttState::Unreachable => Finding::fail(
            CHECK,
            format!("{url}: the running agent cannot reach it{detail}"),
            "start the broker (systemctl status mosquitto) and check [mqtt] url",
        ),
        refused => Finding::fail(
            CHECK,
            format!(
                "{} (reported by the running agent{detail})",
                refused.degraded_reason().unwrap_or("mqtt: refused")
            ),
            match refused {
                MqttState::BadCredentials | MqttState::NotAuthorized => LOGIN_HINT,
                MqttState::Tls => "check [mqtt] ca_file and the broker's certificate",
                _ => "check the broker's log",
            },
        ),
    }
}

/// Free space on the state directory's filesystem.
pub fn classify_free(dir: &Path, available: u64, total: u64) -> Finding {
    const CHECK: &str = "disk";
    let percent = if total == 0 {
        0.0
    } else {
        available as f64 * 100.0 / total as f64
    };
    let message = format!(
        "{} free of {} ({percent:.0}%) on {}'s filesystem",
        human_bytes(available),
        human_bytes(total),
        dir.display()
    );
    let hint = "free space (old logs, journalctl --vacuum-size) or lower \
                history.raw_rows_max: SQLite cannot commit on a full disk";
    if available < FREE_FAIL_BYTES {
        Finding::fail(CHECK, message, hint)
    } else if available < FREE_WARN_BYTES || percent < FREE_WARN_PERCENT {
        Finding::warn(CHECK, message, hint)
    } else {
        Finding::ok(CHECK, message)
    }
}

/// The median of `samples` (None when there are none).
pub fn median(samples: &[Duration]) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}

/// The median cost of write + fsync in the state directory.
pub fn classify_fsync(dir: &Path, samples: Result<&[Duration], &str>) -> Finding {
    const CHECK: &str = "fsync";
    let samples = match samples {
        Ok(s) => s,
        Err(why) => {
            return Finding::warn(
                CHECK,
                format!("cannot measure in {}: {why}", dir.display()),
                "run doctor as the agent's user (sudo -u autocore autocore-agent doctor)",
            );
        }
    };
    let Some(median) = median(samples) else {
        return Finding::warn(CHECK, "no sample", "run doctor again");
    };
    let ms = median.as_secs_f64() * 1000.0;
    let message = format!(
        "{ms:.1} ms median of {} write+fsync in {}",
        samples.len(),
        dir.display()
    );
    let hint = "a slow SD card: every accepted command waits for one; use a better card or an \
                SSD, and keep store.telemetry_batch_rows_max high";
    if ms > FSYNC_FAIL_MS {
        Finding::fail(CHECK, message, hint)
    } else if ms > FSYNC_WARN_MS {
        Finding::warn(CHECK, message, hint)
    } else {
        Finding::ok(CHECK, message)
    }
}

/// Modes of the state directory and the database's files against what the agent creates them
/// with, and the configuration's own warning about its mode.
pub fn classify_permissions(
    dir: Option<(&Path, u32)>,
    files: &[(PathBuf, u32)],
    config_warning: Option<&crate::config::ConfigWarning>,
) -> Finding {
    const CHECK: &str = "permissions";
    let mut wrong = Vec::new();
    let mut fixes = Vec::new();
    let mut fine = Vec::new();
    if let Some((dir, mode)) = dir {
        let mode = mode & 0o777;
        if mode & 0o077 != 0 {
            wrong.push(format!("{} is {mode:04o}", dir.display()));
            fixes.push(format!(
                "chmod {:o} {}",
                crate::store::DATA_DIR_MODE,
                dir.display()
            ));
        } else {
            fine.push(format!("data dir {mode:04o}"));
        }
    }
    for (file, mode) in files {
        let mode = mode & 0o777;
        if mode & 0o077 != 0 {
            wrong.push(format!("{} is {mode:04o}", file.display()));
            fixes.push(format!(
                "chmod {:o} {}",
                crate::store::DATABASE_FILE_MODE,
                file.display()
            ));
        }
    }
    if !files.is_empty() && fixes.len() == wrong.len() {
        fine.push(format!("database {:04o}", files[0].1 & 0o777));
    }
    if let Some(w) = config_warning {
        wrong.push(format!("{} is readable by others and holds secrets", w.key));
        fixes.push(format!("chmod 600 {}", w.key));
    } else {
        fine.push("config not readable by others".into());
    }
    if wrong.is_empty() {
        Finding::ok(CHECK, fine.join(", "))
    } else {
        Finding::warn(CHECK, wrong.join("; "), fixes.join("; "))
    }
}

/// What the agent's database says about one master.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MasterFacts {
    /// Online as last recorded, and when it was last heard; None if never seen.
    pub presence: Option<(bool, Option<i64>)>,
    /// The last command-signing counter used for it.
    pub signing_counter: Option<u64>,
    /// The highest report counter accepted from it.
    pub report_counter: Option<u64>,
}

pub fn classify_master(
    device_id: &str,
    facts: &MasterFacts,
    now_ms: i64,
    heartbeat_timeout_ms: u64,
) -> Finding {
    let check = format!("master {device_id}");
    let counters = format!(
        "signing counter {}, report counter {}",
        facts
            .signing_counter
            .map_or_else(|| "none yet".to_string(), |c| c.to_string()),
        facts
            .report_counter
            .map_or_else(|| "none yet".to_string(), |c| c.to_string()),
    );
    let power = "check that it is powered, on Wi-Fi and has its broker login (autocore-agent \
                 broker-config)";
    match facts.presence {
        None | Some((_, None)) => Finding::warn(check, format!("never seen; {counters}"), power),
        Some((online, Some(seen))) => {
            let ago = human_ms((now_ms - seen).max(0));
            if online && now_ms - seen <= heartbeat_timeout_ms as i64 {
                Finding::ok(check, format!("online, last seen {ago} ago; {counters}"))
            } else if online {
                Finding::warn(
                    check,
                    format!("last seen {ago} ago (online when the agent last ran); {counters}"),
                    "start the agent, or if it runs: ".to_string() + power,
                )
            } else {
                Finding::warn(
                    check,
                    format!("offline, last seen {ago} ago; {counters}"),
                    power,
                )
            }
        }
    }
}

/// `1.5 s`, `12 min`, `3 h`, `5 days`.
pub fn human_ms(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 10_000 => format!("{:.1} s", ms as f64 / 1000.0),
        0..=119 => format!("{s} s"),
        120..=7_199 => format!("{} min", s / 60),
        7_200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

fn human_bytes(bytes: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    if bytes as f64 >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{} MiB", bytes / (1024 * 1024))
    }
}

// ------------------------------------------------------------------ probes (I/O)

/// Runs every check against the configuration at `config_path`.
pub async fn run(config_path: &Path) -> Report {
    let mut report = Report::default();
    let config = match AgentConfig::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            report.findings.push(Finding::fail(
                "config",
                format!("{} does not load: {e}", config_path.display()),
                "fix the key it names (autocore-agent check-config says the same); nothing \
                 else can be checked without it",
            ));
            return report;
        }
    };
    let warnings = config.warnings();
    if warnings.is_empty() {
        report.findings.push(Finding::ok(
            "config",
            format!(
                "{} loads (agent {}, {} master(s))",
                config_path.display(),
                config.agent.id,
                config.masters.len()
            ),
        ));
    }
    for w in &warnings {
        report.findings.push(Finding::warn(
            "config",
            w.to_string(),
            format!("change {} in {}", w.key, config_path.display()),
        ));
    }

    report.findings.push(classify_ntp(
        ntp_synchronised().await.as_deref().map_err(String::as_str),
    ));
    let (backend, answer, skew) = probe_backend(&config).await;
    report.findings.push(classify_skew(
        skew.as_ref().copied().map_err(String::as_str),
    ));
    report.findings.push(broker(&config).await);
    report.findings.push(backend);
    if let Some(answer) = answer {
        report.findings.push(answer);
    }
    report.findings.extend(disk(&config));
    report.findings.push(permissions(&config, config_path));
    report.findings.extend(database_and_masters(&config));
    report
}

/// `timedatectl`'s NTPSynchronized, or why it cannot say.
async fn ntp_synchronised() -> Result<String, String> {
    let out = tokio::process::Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .output()
        .await
        .map_err(|e| format!("timedatectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "timedatectl: {}",
            stderr.lines().next().unwrap_or("failed").trim()
        ))
    }
}

/// One authenticated GET (the owner's emergency latch, as the agent polls it): the backend
/// finding, the token finding, and our clock's skew against the answer's `Date`.
async fn probe_backend(config: &AgentConfig) -> (Finding, Option<Finding>, Result<i64, String>) {
    let source = match (&config.cloud.jwt, &config.cloud.jwt_file) {
        (Some(jwt), _) => Ok(crate::cloud::TokenSource::Inline(jwt.clone())),
        (None, Some(file)) => Ok(crate::cloud::TokenSource::file(file.clone())),
        // Refused when the configuration loads; kept as a finding rather than a panic.
        (None, None) => Err("neither cloud.jwt nor cloud.jwt_file is set".to_string()),
    };
    let token = match source.and_then(|s| s.current().map_err(|e| e.to_string())) {
        Ok(token) => token,
        Err(e) => {
            return (
                Finding::fail(
                    "backend",
                    format!("no token to send: {e}"),
                    "make cloud.jwt_file readable by the agent's user",
                ),
                None,
                Err("no token".into()),
            );
        }
    };
    let token_finding = if config.cloud.auth_url.is_some() {
        classify_session(jwt_exp(&token), now_ms() / 1000)
    } else {
        classify_token(jwt_exp(&token), now_ms() / 1000)
    };
    let base = config.cloud.rest_url.trim_end_matches('/');
    let url = format!("{base}/system_status?select=owner_id&limit=1");
    let client = reqwest011::Client::builder()
        .timeout(Duration::from_millis(config.cloud.request_timeout_ms))
        .build();
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            let answer = BackendAnswer::Unreachable(error_chain(&e));
            return (
                classify_backend(base, &answer, Duration::ZERO),
                Some(token_finding),
                Err("no HTTP client".into()),
            );
        }
    };
    let mut request = client.get(&url).bearer_auth(&token);
    if let Some(key) = &config.cloud.api_key {
        request = request.header("apikey", key.expose());
    }
    let sent_ms = now_ms();
    let started = Instant::now();
    let (answer, skew) = match request.send().await {
        Err(e) => (
            BackendAnswer::Unreachable(error_chain(&e)),
            Err("the backend did not answer".to_string()),
        ),
        Ok(response) => {
            let received_ms = now_ms();
            let skew = response
                .headers()
                .get("date")
                .and_then(|d| d.to_str().ok())
                .ok_or_else(|| "the backend's answer has no Date header".to_string())
                .and_then(|d| skew_ms(d, sent_ms, received_ms));
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            (BackendAnswer::Status(status, body), skew)
        }
    };
    (
        classify_backend(base, &answer, started.elapsed()),
        Some(token_finding),
        skew,
    )
}

/// Our clock minus the backend's, from an HTTP `Date` (whole seconds, so its middle is taken)
/// and the middle of our request's round trip.
pub fn skew_ms(date: &str, sent_ms: i64, received_ms: i64) -> Result<i64, String> {
    let theirs = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(date)
        .map_err(|e| format!("the backend's Date {date:?} does not parse: {e}"))?;
    let ours = sent_ms + (received_ms - sent_ms) / 2;
    Ok(ours - (theirs.as_millisecond() + 500))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

async fn broker(config: &AgentConfig) -> Finding {
    let url = config.mqtt.url.as_str();
    if let Some(health) = running_agent_health(config).await {
        return classify_broker_health(
            url,
            health["mqtt"]["state"].as_str().unwrap_or("?"),
            health["mqtt"]["detail"].as_str(),
        );
    }
    let outcome = connect_broker(config).await;
    classify_broker(url, config.mqtt.username.as_deref(), &outcome)
}

/// The running agent's `/health`, if one answers at `api.listen`.
async fn running_agent_health(config: &AgentConfig) -> Option<serde_json::Value> {
    let client = reqwest011::Client::builder()
        .timeout(HEALTH_TIMEOUT)
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{}/health", config.api.listen))
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    body.get("mqtt").is_some().then_some(body)
}

/// One CONNECT with the agent's own options (its client id, persistent session, TLS, will),
/// then a clean DISCONNECT (so the will is not published). Manual acks: a message the broker
/// queued for the agent's session while it was away is left unacknowledged, so the broker
/// delivers it again to the agent instead of losing it to doctor.
async fn connect_broker(config: &AgentConfig) -> BrokerOutcome {
    crate::bridge::install_tls_provider();
    let mut options = match crate::bridge::mqtt_options(&config.mqtt, &config.agent.id) {
        Ok(o) => o,
        Err(e) => return BrokerOutcome::Failed(MqttState::Refused, e.to_string()),
    };
    options.set_manual_acks(true);
    let (client, mut eventloop) = crate::bridge::mqtt_client(options);
    let connack = tokio::time::timeout(BROKER_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    return match ack.code {
                        ConnectReturnCode::Success => BrokerOutcome::Accepted,
                        code => BrokerOutcome::Refused(code),
                    };
                }
                Ok(_) => {}
                Err(e) => return BrokerOutcome::from_error(&e),
            }
        }
    })
    .await
    .unwrap_or(BrokerOutcome::TimedOut);
    if connack == BrokerOutcome::Accepted && client.disconnect().await.is_ok() {
        // Until the DISCONNECT is on the wire; the loop then ends with an error.
        let _ = tokio::time::timeout(BROKER_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    connack
}

/// The state directory, or the nearest existing folder above it when the agent has not
/// created it yet (on the same filesystem, as a rule).
fn state_dir(config: &AgentConfig) -> (PathBuf, bool) {
    let dir = config
        .store
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut probe = dir.clone();
    while !probe.is_dir() {
        match probe.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => probe = parent.to_path_buf(),
            _ => return (PathBuf::from("."), false),
        }
    }
    let exists = probe == dir;
    (probe, exists)
}

fn disk(config: &AgentConfig) -> Vec<Finding> {
    let (dir, _) = state_dir(config);
    let free = match nix::sys::statvfs::statvfs(&dir) {
        // The casts are no-ops on 64-bit; these fields are u32 on a 32-bit Raspberry Pi OS.
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => {
            let fragment = s.fragment_size() as u64;
            classify_free(
                &dir,
                s.blocks_available() as u64 * fragment,
                s.blocks() as u64 * fragment,
            )
        }
        Err(e) => Finding::warn(
            "disk",
            format!("cannot read free space of {}: {e}", dir.display()),
            "check the path in store.path",
        ),
    };
    let samples = measure_fsync(&dir);
    let fsync = classify_fsync(&dir, samples.as_deref().map_err(|e| e.as_str()));
    vec![free, fsync]
}

/// Writes and fsyncs a small file in `dir` [`FSYNC_SAMPLES`] times, then removes it.
fn measure_fsync(dir: &Path) -> Result<Vec<Duration>, String> {
    use std::io::Write as _;
    let path = dir.join(format!(".autocore-doctor-{}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| e.to_string())?;
    let block = vec![0x5a_u8; FSYNC_PROBE_BYTES];
    let mut samples = Vec::with_capacity(FSYNC_SAMPLES);
    let mut result = Ok(());
    for _ in 0..FSYNC_SAMPLES {
        let started = Instant::now();
        if let Err(e) = file.write_all(&block).and_then(|()| file.sync_all()) {
            result = Err(e.to_string());
            break;
        }
        samples.push(started.elapsed());
    }
    drop(file);
    let removed = std::fs::remove_file(&path).map_err(|e| e.to_string());
    result.and(removed).map(|()| samples)
}

fn mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

fn permissions(config: &AgentConfig, config_path: &Path) -> Finding {
    let (dir, exists) = state_dir(config);
    let dir_mode = exists.then(|| mode(&dir)).flatten();
    let mut files = Vec::new();
    let db = &config.store.path;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = PathBuf::from(name);
        if let Some(m) = mode(&path) {
            files.push((path, m));
        }
    }
    let text = std::fs::read_to_string(config_path).unwrap_or_default();
    let warning = crate::config::file_mode_warning(config_path, &text);
    classify_permissions(
        dir_mode.map(|m| (dir.as_path(), m)),
        &files,
        warning.as_ref(),
    )
}

fn database_and_masters(config: &AgentConfig) -> Vec<Finding> {
    let mut findings = Vec::new();
    let db = &config.store.path;
    let store = match Store::open_read_only(db) {
        Ok(store) => Some(store),
        Err(StoreError::Missing(_)) => {
            findings.push(Finding::warn(
                "database",
                format!("no database yet at {}", db.display()),
                "the agent creates it when it first runs",
            ));
            None
        }
        Err(e @ StoreError::SchemaVersion { .. }) => {
            findings.push(Finding::warn(
                "database",
                format!("{}: {e}", db.display()),
                "the agent migrates an older database when it runs; a newer one needs a newer agent",
            ));
            None
        }
        Err(e) => {
            findings.push(Finding::fail(
                "database",
                format!("{} cannot be read: {e}", db.display()),
                "run doctor as the agent's user; restore the database from a backup if it is damaged",
            ));
            None
        }
    };
    let now = now_ms();
    let mut devices = Vec::new();
    let mut signing = Vec::new();
    let mut reports = Vec::new();
    if let Some(store) = &store {
        let read = store.devices().and_then(|d| {
            Ok((
                d,
                store.signing_counters()?,
                store.report_windows()?,
                store.outbox_stats(now)?,
            ))
        });
        match read {
            Ok((d, s, r, outbox)) => {
                findings.push(Finding::ok(
                    "database",
                    format!(
                        "{} (schema {}, read-only): outbox {} row(s)",
                        db.display(),
                        Store::schema_version(),
                        outbox.depth
                    ),
                ));
                devices = d;
                signing = s;
                reports = r;
            }
            Err(e) => findings.push(Finding::fail(
                "database",
                format!("{} cannot be read: {e}", db.display()),
                "restore the database from a backup if it is damaged",
            )),
        }
    }
    if config.masters.is_empty() {
        findings.push(Finding::warn(
            "masters",
            "none configured",
            "add a [[masters]] entry per ESP32 master this agent serves",
        ));
    }
    for master in &config.masters {
        let id = master.device_id.as_str();
        let facts = MasterFacts {
            presence: devices
                .iter()
                .find(|(d, _, _)| d == id)
                .map(|(_, online, seen)| (*online, *seen)),
            signing_counter: signing.iter().find(|(d, _)| d == id).map(|(_, c)| *c),
            report_counter: reports.iter().find(|(d, _, _)| d == id).map(|(_, h, _)| *h),
        };
        findings.push(classify_master(
            id,
            &facts,
            now,
            config.mqtt.heartbeat_timeout_ms,
        ));
    }
    findings
}

#[cfg(test)]
mod tests;
