//! The agent's durable state in SQLite (WAL, `synchronous=FULL`): commands it accepted, the
//! outbox of everything the cloud must learn, the rules mirror, device and relay state, and the
//! signing counters. Every promise (an accepted command, an outbox row, a counter) is on disk
//! before the caller acts on it. No I/O but SQLite; time comes in as `now_ms`.

mod automation;
mod checkpointer;
mod console;
pub mod history;
mod notify;
pub mod polling;
pub(crate) mod schema;
mod writer;

pub use automation::{AutomationWrite, OutboxEntry};
pub use checkpointer::{CHECKPOINT_EVERY, Checkpointer};
pub use console::{DeviceRow, SlaveRelays};
pub use history::{HistoryBounds, HistoryStats, ReplayReadings, Rollup, StepReport};
pub use notify::NotificationRow;
pub use writer::{GROUP_JOBS_MAX, StoreHandle};

use std::path::Path;

use crate::command::{CommandSource, CommandType, RelayAction};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON is unreadable: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "the database has schema version {found}, newer than this agent's ({known}): a newer \
         autocore-agent wrote it; install that version or a later one again (an agent never \
         downgrades its database)"
    )]
    NewerSchema { found: i64, known: i64 },
    #[error("the store's lock was poisoned by a panic")]
    Poisoned,
    #[error("the store task failed: {0}")]
    Task(String),
    #[error("the database has schema version {found}, this agent's is {known}")]
    SchemaVersion { found: i64, known: i64 },
    #[error("no database at {0} (the agent creates it when it runs)")]
    Missing(std::path::PathBuf),
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Another connection held a lock SQLite would not wait for.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}

/// The outbox key of an event that has no id of its own (a presence change, a relay report):
/// its subject, its time and a sequence number of this process. Ingest does not wait for the
/// store, so two events of one master can share a millisecond; with the time alone the outbox
/// kept the first and dropped the newer (a relay report that switched a group off, lost).
pub(crate) fn event_key(kind: &str, subject: &str, now_ms: i64) -> String {
    static EVENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = EVENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{kind}:{subject}:{now_ms}:{n}")
}

/// The outbox rows due: command completions first, then oldest first.
const OUTBOX_DUE: &str =
    "select seq, class, idempotency_key, payload, created_at_ms, attempts from outbox
     where next_attempt_at_ms <= ?1
     order by case class when 'completion' then 0 else 1 end, seq limit ?2";

/// The database directory's mode when the agent creates it: only the agent's user enters.
pub const DATA_DIR_MODE: u32 = 0o700;
/// The next signing counter of a master, in the caller's transaction (`?1` master, `?2` now in
/// Unix ms). A master without a counter here starts at the current Unix time in milliseconds, so
/// after the Pi loses its database the counters still climb above what the master last accepted
/// (the agent sends far fewer than one command per millisecond), as PROTOCOL.md promises.
pub(crate) const NEXT_SIGNING_COUNTER: &str =
    "insert into signing_counters (master_device_id, counter) values (?1, max(?2, 1))
     on conflict (master_device_id) do update set counter = counter + 1
     returning counter";

/// Prepared statements kept for reuse on the agent's connection.
pub const STATEMENTS_CACHED_MAX: usize = 128;
/// The WAL file's size left after a checkpoint (`journal_size_limit`).
pub const WAL_BYTES_KEPT: u64 = 16 * 1024 * 1024;
/// How long a statement waits for another connection's lock.
pub const BUSY_TIMEOUT_MS: u64 = 5_000;
/// How long opening the store keeps retrying a preparation that another connection's lock
/// refused at once, and how long it waits between tries.
pub const OPEN_BUSY_WAIT_MS: u64 = 30_000;
pub const OPEN_BUSY_RETRY_MS: u64 = 50;
/// The database's mode, and its `-wal` and `-shm` files': commands, keys' counters and
/// readings are the agent's alone.
pub const DATABASE_FILE_MODE: u32 = 0o600;

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Sets the database's files to [`DATABASE_FILE_MODE`], whatever the umask made them (and
/// whatever an older agent left).
fn restrict_files(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        files.push(name.into());
    }
    for file in files.iter().filter(|f| f.exists()) {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(DATABASE_FILE_MODE))
            .map_err(file_error(file))?;
    }
    Ok(())
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What a command is, as the agent keeps it. Relay actions are absolute: "on" or "off".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: i64,
    pub master_device_id: String,
    pub slave_mac_address: String,
    pub slave_device_id: Option<String>,
    /// One action per relay (the table's `relay_numbers`, `actions`, `duration_seconds`).
    pub actions: Vec<RelayAction>,
    pub command_type: CommandType,
    pub triggered_by: CommandSource,
    pub priority: i32,
    pub rule_id: Option<String>,
    pub rule_name: Option<String>,
    pub expires_at_ms: i64,
    pub state: CommandState,
    pub attempts: u32,
    pub last_sent_at_ms: Option<i64>,
    pub polled_by: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    /// On disk, not yet sent to its master.
    Accepted,
    /// Published to the master (or handed to it through the local API); awaiting the ack.
    Sent,
    Completed,
    Failed,
    Expired,
}

impl CommandState {
    fn as_str(self) -> &'static str {
        match self {
            CommandState::Accepted => "accepted",
            CommandState::Sent => "sent",
            CommandState::Completed => "completed",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }

    fn parse(s: &str) -> CommandState {
        match s {
            "sent" => CommandState::Sent,
            "completed" => CommandState::Completed,
            "failed" => CommandState::Failed,
            "expired" => CommandState::Expired,
            _ => CommandState::Accepted,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Completed | CommandState::Failed | CommandState::Expired
        )
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandOutcome {
    Completed {
        execution_time_ms: u32,
        relay_states: Option<Vec<bool>>,
    },
    Failed {
        reason: String,
        execution_time_ms: Option<u32>,
    },
    /// Its expiry passed before it could run; it never will.
    Expired,
}

/// Whether `accept_command` took a new command or already knew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    New,
    Known(CommandState),
}

/// What the cloud must learn, by kind; the outbox drops only telemetry at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxClass {
    Completion,
    Telemetry,
    Event,
    RuleCommand,
    DeviceStatus,
    RelayState,
    RuleFeedback,
}

impl OutboxClass {
    pub const ALL: [OutboxClass; 7] = [
        OutboxClass::Completion,
        OutboxClass::Telemetry,
        OutboxClass::Event,
        OutboxClass::RuleCommand,
        OutboxClass::DeviceStatus,
        OutboxClass::RelayState,
        OutboxClass::RuleFeedback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutboxClass::Completion => "completion",
            OutboxClass::Telemetry => "telemetry",
            OutboxClass::Event => "event",
            OutboxClass::RuleCommand => "rule_command",
            OutboxClass::DeviceStatus => "device_status",
            OutboxClass::RelayState => "relay_state",
            OutboxClass::RuleFeedback => "rule_feedback",
        }
    }

    fn parse(s: &str) -> Option<OutboxClass> {
        OutboxClass::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub seq: i64,
    pub class: OutboxClass,
    pub idempotency_key: String,
    pub payload: Value,
    pub created_at_ms: i64,
    pub attempts: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutboxStats {
    pub depth: u64,
    pub oldest_age_ms: Option<i64>,
    pub by_class: Vec<(OutboxClass, u64)>,
    pub rejected: u64,
}

/// One sensor reading, as telemetry reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub device_id: String,
    pub sensor_key: String,
    pub value: f64,
    pub unit: Option<String>,
    pub recorded_at_ms: i64,
    /// When the agent received it (None: unknown, take `recorded_at_ms`). Kept with the history
    /// so `rules test` judges staleness as the live engine did; the cloud does not need it.
    #[serde(skip)]
    pub received_at_ms: Option<i64>,
}

/// One rule as the mirror keeps it (a deleted rule stays as a tombstone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleRecord {
    pub id: String,
    pub device_id: String,
    pub rule_id: String,
    pub rule_name: Option<String>,
    pub rule_description: Option<String>,
    pub rule_json: Option<Value>,
    pub enabled: bool,
    pub priority: i32,
    pub cooldown_seconds: i32,
    pub max_executions_per_hour: i32,
    pub revision: i64,
    pub deleted: bool,
    pub changed_at: String,
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// Outbox rows handed to the push loop by [`Store::outbox_take_for_push`] and not taken
    /// again since: the bound never drops them while their push may still succeed.
    pushing: Vec<i64>,
}

/// Readings [`Store::enforce_outbox_bound`] dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxDrops {
    /// Never received by the backend: lost.
    pub lost: u64,
    /// Dropped although an earlier push of them may have reached the backend (only when
    /// nothing certainly lost was left to drop): lost or not, nobody can tell.
    pub in_doubt: u64,
}

impl Store {
    /// Opens the database, creating it (and its directory, [`DATA_DIR_MODE`]) if missing; its
    /// files get [`DATABASE_FILE_MODE`].
    pub fn open(path: &Path) -> Result<Store> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DATA_DIR_MODE)
                .create(parent)
                .map_err(file_error(parent))?;
            // The umask may have taken bits from the mode above; set it as meant.
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(DATA_DIR_MODE))
                .map_err(file_error(parent))?;
        }
        // Created with its mode, not chmod-ed after: no moment when others may open it.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(DATABASE_FILE_MODE)
            .open(path)
            .map_err(file_error(path))?;
        restrict_files(path)?;
        let store = Store::init(Connection::open(path)?)?;
        // SQLite creates -wal and -shm with the database's mode; an older agent's may differ.
        restrict_files(path)?;
        Ok(store)
    }

    /// Opens a database that exists, never creating one: for `status` and `rules test`, which
    /// must not leave an empty database where the agent would look for its own.
    pub fn open_existing(path: &Path) -> Result<Store> {
        if !path.is_file() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let store = Store::init(conn)?;
        restrict_files(path)?;
        Ok(store)
    }

    /// Opens a database that exists read-only: no migration, no chmod, nothing written, for
    /// `doctor`, which must leave the Pi as it found it. A schema older than this agent's is
    /// refused (the agent migrates it when it runs), a newer one too.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        if !path.is_file() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let found: i64 = conn.query_row("pragma user_version", [], |r| r.get(0))?;
        let known = schema::MIGRATIONS.len() as i64;
        if found != known {
            return Err(StoreError::SchemaVersion { found, known });
        }
        Ok(Store {
            conn,
            pushing: Vec::new(),
        })
    }

    /// The schema version this agent writes.
    pub fn schema_version() -> i64 {
        schema::MIGRATIONS.len() as i64
    }

    pub fn open_in_memory() -> Result<Store> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        // The busy timeout first: another process (`status`, a test) may hold the file briefly.
        conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
        // Every statement the agent runs again stays prepared (parsing is most of a small
        // statement's cost): more than rusqlite's default of 16.
        conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED_MAX);
        // SQLite re-prepares a statement at every new value bound to a parameter the planner
        // looked at (`limit ?`, `like ?`): the outbox's read was parsed again at every push.
        // The plans do not depend on those values, so keep them.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        // A job's savepoint copies each page it changes into a sub-journal, which SQLite spills
        // to a temporary file past 64 KiB: thousands of writes a second to a file nobody keeps.
        conn.pragma_update(None, "temp_store", "memory")?;
        let mut store = Store {
            conn,
            pushing: Vec::new(),
        };
        // Switching a new file to WAL and migrating it can meet another connection doing the
        // same; some of those lock conflicts answer "busy" without waiting on the timeout, so
        // the whole preparation is tried again rather than failing the agent's start.
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(OPEN_BUSY_WAIT_MS);
        loop {
            match store.prepare() {
                Ok(()) => return Ok(store),
                Err(e) if e.is_busy() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(OPEN_BUSY_RETRY_MS));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// WAL, FULL sync (what we promised survives power loss), foreign keys, migrations.
    /// Incremental auto-vacuum takes effect only on a new file (set before WAL writes its
    /// header); an older database is switched by [`Store::ensure_incremental_vacuum`]. The WAL
    /// is cut back to [`WAL_BYTES_KEPT`] after a checkpoint, so a big prune's WAL does not stay.
    fn prepare(&mut self) -> Result<()> {
        // Only on a new file: setting it rewrites the header even when it is already set, and
        // `status` or `doctor` must leave an existing database as they found it.
        let pages: i64 = self.conn.query_row("pragma page_count", [], |r| r.get(0))?;
        if pages == 0 {
            self.conn
                .execute_batch("pragma auto_vacuum = incremental;")?;
        }
        self.conn.execute_batch(&format!(
            "pragma journal_mode = wal;
             pragma synchronous = full;
             pragma foreign_keys = on;
             pragma journal_size_limit = {WAL_BYTES_KEPT};"
        ))?;
        self.migrate()
    }

    /// Turns this connection's automatic checkpoint off: a [`Checkpointer`] does it beside the
    /// writer instead of inside one of its commits.
    pub fn leave_checkpoints_to_a_checkpointer(&mut self) -> Result<()> {
        self.conn.execute_batch("pragma wal_autocheckpoint = 0;")?;
        Ok(())
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .query_row("pragma user_version", [], |r| r.get(0))?;
        let known = schema::MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::NewerSchema {
                found: version,
                known,
            });
        }
        for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
            // Immediate: another process opening the same file (`status`, `rules test`) waits
            // here instead of running the same migration at the same time.
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now: i64 = tx.query_row("pragma user_version", [], |r| r.get(0))?;
            if now > i as i64 {
                continue;
            }
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- commands

    /// Records a command before anything acts on it. A command already known (handed out again
    /// after a lock timeout, or pulled twice) is not recorded again: its state is returned.
    pub fn accept_command(&mut self, cmd: &CommandRecord, now_ms: i64) -> Result<Accepted> {
        let tx = self.conn.savepoint()?;
        let known: Option<String> = tx
            .query_row("select state from commands where id = ?1", [cmd.id], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(state) = known {
            return Ok(Accepted::Known(CommandState::parse(&state)));
        }
        insert_command(&tx, cmd, None, now_ms)?;
        tx.commit()?;
        Ok(Accepted::New)
    }

    pub fn command(&self, id: i64) -> Result<Option<CommandRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{COMMAND_SELECT} where id = ?1"))?;
        let row = stmt.query_row([id], command_from_row).optional()?;
        Ok(row)
    }

    /// Commands not yet finished, oldest first.
    pub fn open_commands(&self) -> Result<Vec<CommandRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{COMMAND_SELECT} where state in ('accepted', 'sent') order by accepted_at_ms, id"
        ))?;
        let rows = stmt.query_map([], command_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Counts commands by state, for metrics.
    pub fn command_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("select state, count(*) from commands group by state order by state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records one delivery attempt (before the publish, so a crash never forgets it happened).
    pub fn mark_sent(
        &mut self,
        id: i64,
        signing_counter: Option<u64>,
        polled_by: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "update commands set state = 'sent', attempts = attempts + 1, last_sent_at_ms = ?2,
                signing_counter = coalesce(?3, signing_counter), polled_by = coalesce(?4, polled_by)
             where id = ?1 and state in ('accepted', 'sent')",
            )?
            .execute(params![
                id,
                now_ms,
                signing_counter.map(|c| c as i64),
                polled_by
            ])?;
        Ok(())
    }

    /// Ends a command and queues its report to the cloud in the same transaction. Returns false
    /// if it had already ended (a duplicate ack): nothing changes then.
    pub fn finish_command(
        &mut self,
        id: i64,
        outcome: &CommandOutcome,
        now_ms: i64,
    ) -> Result<bool> {
        let tx = self.conn.savepoint()?;
        let row: Option<(String, String, String, Option<i64>)> = tx
            .prepare_cached(
                "select state, master_device_id, slave_mac_address, last_sent_at_ms from commands where id = ?1",
            )?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        let Some((state, master, slave, sent_at_ms)) = row else {
            return Ok(false);
        };
        if CommandState::parse(&state).is_final() {
            return Ok(false);
        }
        let (state, exec_ms, error, relay_states) = match outcome {
            CommandOutcome::Completed {
                execution_time_ms,
                relay_states,
            } => (
                CommandState::Completed,
                Some(*execution_time_ms),
                None,
                relay_states.clone(),
            ),
            CommandOutcome::Failed {
                reason,
                execution_time_ms,
            } => (
                CommandState::Failed,
                *execution_time_ms,
                Some(reason.clone()),
                None,
            ),
            CommandOutcome::Expired => (
                CommandState::Expired,
                None,
                Some("expired before it could run".to_string()),
                None,
            ),
        };
        let states_json = relay_states
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?;
        tx.prepare_cached(
            "update commands set state = ?2, finished_at_ms = ?3, execution_time_ms = ?4,
                error_message = ?5, relay_states = ?6 where id = ?1",
        )?
        .execute(params![
            id,
            state.as_str(),
            now_ms,
            exec_ms,
            error,
            states_json
        ])?;
        if let Some(states) = &relay_states {
            upsert_relay_states(&tx, &master, &slave, states, now_ms)?;
        }
        if id < 0 {
            automation::edge_command_report(
                &tx,
                id,
                state.as_str(),
                exec_ms,
                error.as_deref(),
                now_ms,
            )?;
            tx.commit()?;
            return Ok(true);
        }
        // The times travel with the report: pushed after an outage, it still says when the
        // master answered and when the command went out.
        let payload = serde_json::json!({
            "command_id": id,
            "status": state.as_str(),
            "execution_time_ms": exec_ms,
            "error_message": error,
            "relay_states": relay_states,
            "finished_at_ms": now_ms,
            "sent_at_ms": sent_at_ms,
        });
        insert_outbox(
            &tx,
            OutboxClass::Completion,
            &format!("completion:{id}"),
            &payload,
            now_ms,
        )?;
        tx.commit()?;
        Ok(true)
    }

    // ---------------------------------------------------------------- outbox

    /// Queues one row; false if a row with this idempotency key is already queued.
    pub fn enqueue(
        &mut self,
        class: OutboxClass,
        idempotency_key: &str,
        payload: &Value,
        now_ms: i64,
    ) -> Result<bool> {
        let tx = self.conn.savepoint()?;
        let inserted = insert_outbox(&tx, class, idempotency_key, payload, now_ms)?;
        tx.commit()?;
        Ok(inserted)
    }

    /// Queues a batch of readings in one transaction (one fsync for the whole batch); a reading
    /// already queued (same device, sensor and time) is skipped. Returns how many were new.
    pub fn enqueue_readings(&mut self, readings: &[Reading], now_ms: i64) -> Result<usize> {
        let tx = self.conn.savepoint()?;
        let mut added = 0;
        {
            let mut stmt = tx.prepare_cached(
                "insert into outbox (class, idempotency_key, payload, created_at_ms)
                 values ('telemetry', ?1, ?2, ?3) on conflict (idempotency_key) do nothing",
            )?;
            for r in readings {
                let key = format!("t:{}:{}:{}", r.device_id, r.sensor_key, r.recorded_at_ms);
                added += stmt.execute(params![key, serde_json::to_string(r)?, now_ms])?;
            }
        }
        history::record(&tx, readings)?;
        tx.commit()?;
        Ok(added)
    }

    /// Up to `limit` rows due now: command completions first (the cloud must learn what ran
    /// before it hands out more), then oldest first.
    pub fn outbox_due(&self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>> {
        let mut stmt = self.conn.prepare_cached(OUTBOX_DUE)?;
        let rows = stmt.query_map(params![now_ms, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, class, key, payload, created, attempts) = row?;
            let Some(class) = OutboxClass::parse(&class) else {
                continue;
            };
            out.push(OutboxRow {
                seq,
                class,
                idempotency_key: key,
                payload: serde_json::from_str(&payload)?,
                created_at_ms: created,
                attempts: attempts as u32,
            });
        }
        Ok(out)
    }

    /// [`Store::outbox_due`] for the push loop: the rows are under way until the next call, and
    /// [`Store::enforce_outbox_bound`] leaves them alone meanwhile.
    pub fn outbox_take_for_push(&mut self, now_ms: i64, limit: usize) -> Result<Vec<OutboxRow>> {
        let rows = self.outbox_due(now_ms, limit)?;
        self.pushing = rows.iter().map(|r| r.seq).collect();
        Ok(rows)
    }

    /// Whether a command's completion is due to be pushed at `now_ms`. One backing off after
    /// failures does not count: it must not hold up every new command.
    pub fn completions_waiting(&self, now_ms: i64) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "select exists (select 1 from outbox where class = 'completion' and next_attempt_at_ms <= ?1)",
            )?
            .query_row([now_ms], |r| r.get(0))?)
    }

    /// The cloud has these rows: remove them.
    pub fn outbox_delivered(&mut self, seqs: &[i64]) -> Result<()> {
        // One statement for the whole batch: a drain deletes a thousand rows per request.
        let list = serde_json::to_string(seqs)?;
        self.conn
            .prepare_cached("delete from outbox where seq in (select value from json_each(?1))")?
            .execute([list])?;
        Ok(())
    }

    /// A transient failure: try these rows again from `next_attempt_at_ms`. `in_doubt`: the
    /// backend may have received them (no answer after sending); once in doubt, a row stays so.
    pub fn outbox_retry_later(
        &mut self,
        seqs: &[i64],
        error: &str,
        next_attempt_at_ms: i64,
        in_doubt: bool,
    ) -> Result<()> {
        let tx = self.conn.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(
                "update outbox set attempts = attempts + 1, last_error = ?2, next_attempt_at_ms = ?3,
                        in_doubt = max(in_doubt, ?4)
                 where seq = ?1",
            )?;
            for seq in seqs {
                stmt.execute(params![seq, error, next_attempt_at_ms, in_doubt])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Makes every waiting row due now (after a sync restart).
    pub fn outbox_due_now(&mut self) -> Result<usize> {
        Ok(self
            .conn
            .prepare_cached(
                "update outbox set next_attempt_at_ms = 0 where next_attempt_at_ms > 0",
            )?
            .execute([])?)
    }

    /// The cloud refused this row for good: move it aside with the reason, so it neither blocks
    /// the queue nor disappears.
    pub fn outbox_reject(&mut self, seq: i64, reason: &str, now_ms: i64) -> Result<()> {
        let tx = self.conn.savepoint()?;
        tx.prepare_cached("insert or replace into outbox_rejected (seq, class, idempotency_key, payload, created_at_ms, rejected_at_ms, reason)
             select seq, class, idempotency_key, payload, created_at_ms, ?2, ?3 from outbox where seq = ?1")?.execute(params![seq, now_ms, reason])?;
        tx.prepare_cached("delete from outbox where seq = ?1")?
            .execute([seq])?;
        tx.commit()?;
        Ok(())
    }

    pub fn outbox_stats(&self, now_ms: i64) -> Result<OutboxStats> {
        let (depth, oldest): (i64, Option<i64>) =
            self.conn
                .query_row("select count(*), min(created_at_ms) from outbox", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        let mut stmt = self
            .conn
            .prepare_cached("select class, count(*) from outbox group by class")?;
        let by_class = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .filter_map(|r| r.ok())
            .filter_map(|(c, n)| OutboxClass::parse(&c).map(|c| (c, n as u64)))
            .collect();
        let rejected: i64 =
            self.conn
                .query_row("select count(*) from outbox_rejected", [], |r| r.get(0))?;
        Ok(OutboxStats {
            depth: depth as u64,
            oldest_age_ms: oldest.map(|t| (now_ms - t).max(0)),
            by_class,
            rejected: rejected as u64,
        })
    }

    /// Keeps the outbox at or under `rows_max` by dropping the oldest telemetry; nothing else is
    /// ever dropped, so a queue of only commands and completions may exceed the bound. Readings
    /// whose push is under way are never dropped (the push may succeed), and readings in doubt
    /// (an earlier push may have reached the backend) only when nothing certainly lost is left:
    /// so `telemetry_dropped` counts exactly the readings the backend never got, and
    /// `telemetry_dropped_in_doubt` the ones nobody can tell about.
    pub fn enforce_outbox_bound(&mut self, rows_max: u64) -> Result<OutboxDrops> {
        let depth: i64 = self
            .conn
            .prepare_cached("select count(*) from outbox")?
            .query_row([], |r| r.get(0))?;
        let excess = depth - rows_max as i64;
        if excess <= 0 {
            return Ok(OutboxDrops::default());
        }
        let pushing = serde_json::to_string(&self.pushing)?;
        let tx = self.conn.savepoint()?;
        let drop_oldest = |in_doubt: i64, limit: i64| {
            tx.prepare_cached(
                "delete from outbox where seq in (
                   select seq from outbox
                   where class = 'telemetry' and in_doubt = ?1
                     and seq not in (select value from json_each(?2))
                   order by seq limit ?3)",
            )?
            .execute(params![in_doubt, pushing, limit])
            .map(|n| n as u64)
        };
        let lost = drop_oldest(0, excess)?;
        let in_doubt = match excess - lost as i64 {
            0 => 0,
            left => drop_oldest(1, left)?,
        };
        add_counter(&tx, "telemetry_dropped", lost as i64)?;
        add_counter(&tx, "telemetry_dropped_in_doubt", in_doubt as i64)?;
        tx.commit()?;
        Ok(OutboxDrops { lost, in_doubt })
    }

    // ---------------------------------------------------------------- counters

    /// The next command-signing counter for `master`, on disk before it is used: after a crash
    /// the counter never goes back, so a master never sees a counter twice.
    pub fn next_signing_counter(&mut self, master: &str, now_ms: i64) -> Result<u64> {
        let tx = self.conn.savepoint()?;
        let value: i64 = tx
            .prepare_cached(NEXT_SIGNING_COUNTER)?
            .query_row(params![master, now_ms], |r| r.get(0))?;
        tx.commit()?;
        Ok(value as u64)
    }

    /// The last command-signing counter used for each master.
    pub fn signing_counters(&self) -> Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare("select master_device_id, counter from signing_counters")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Each master's report anti-replay window: (master, highest counter, seen bitmap).
    pub fn report_windows(&self) -> Result<Vec<(String, u64, u64)>> {
        let mut stmt = self
            .conn
            .prepare("select master_device_id, highest, seen from report_windows")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Saves windows that moved, in one transaction. u64s are stored by their bits.
    pub fn save_report_windows(&mut self, windows: &[(String, u64, u64)]) -> Result<()> {
        let tx = self.conn.savepoint()?;
        for (master, highest, seen) in windows {
            tx.prepare_cached(
                "insert into report_windows (master_device_id, highest, seen) values (?1, ?2, ?3)
                 on conflict (master_device_id) do update
                 set highest = excluded.highest, seen = excluded.seen",
            )?
            .execute(params![master, *highest as i64, *seen as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn add_to_counter(&mut self, name: &str, by: i64) -> Result<()> {
        add_counter(&self.conn, name, by)?;
        Ok(())
    }

    pub fn counter(&self, name: &str) -> Result<i64> {
        Ok(self
            .conn
            .prepare_cached("select value from counters where name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    pub fn cursor(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("select value from cursors where name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_cursor(&mut self, name: &str, value: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "insert into cursors (name, value) values (?1, ?2)
             on conflict (name) do update set value = excluded.value",
            )?
            .execute(params![name, value])?;
        Ok(())
    }

    // ---------------------------------------------------------------- rules mirror

    /// Applies changes from the cloud; a change older than what is mirrored (lower revision) is
    /// ignored, so re-reading an overlap is harmless. Returns how many rows changed.
    pub fn apply_rule_changes(&mut self, changes: &[RuleRecord]) -> Result<usize> {
        let tx = self.conn.savepoint()?;
        let mut changed = 0;
        {
            let mut stmt = tx.prepare_cached(
                "insert into rules (id, device_id, rule_id, rule_name, rule_description, rule_json, enabled,
                    priority, cooldown_seconds, max_executions_per_hour, revision, deleted, changed_at)
                 values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 on conflict (id) do update set
                    device_id = excluded.device_id, rule_id = excluded.rule_id,
                    rule_name = coalesce(excluded.rule_name, rules.rule_name),
                    rule_description = coalesce(excluded.rule_description, rules.rule_description),
                    rule_json = coalesce(excluded.rule_json, rules.rule_json),
                    enabled = excluded.enabled, priority = excluded.priority,
                    cooldown_seconds = excluded.cooldown_seconds,
                    max_executions_per_hour = excluded.max_executions_per_hour,
                    revision = excluded.revision, deleted = excluded.deleted, changed_at = excluded.changed_at
                 where excluded.revision > rules.revision",
            )?;
            for r in changes {
                changed += stmt.execute(params![
                    r.id,
                    r.device_id,
                    r.rule_id,
                    r.rule_name,
                    r.rule_description,
                    r.rule_json.as_ref().map(Value::to_string),
                    r.enabled,
                    r.priority,
                    r.cooldown_seconds,
                    r.max_executions_per_hour,
                    r.revision,
                    r.deleted,
                    r.changed_at,
                ])?;
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Enabled, not deleted rules of a device by `priority DESC`, as the cloud RPC returns them.
    pub fn active_rules(&self, device_id: &str, limit: usize) -> Result<Vec<RuleRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{RULE_SELECT} where device_id = ?1 and enabled and not deleted order by priority desc, rowid limit ?2"
        ))?;
        let rows = stmt.query_map(params![device_id, limit as i64], rule_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn rule(&self, id: &str) -> Result<Option<RuleRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("{RULE_SELECT} where id = ?1"))?;
        Ok(stmt.query_row([id], rule_from_row).optional()?)
    }

    // ---------------------------------------------------------------- devices

    /// Records that a master spoke; returns true if it had never been seen before.
    pub fn record_presence(
        &mut self,
        device_id: &str,
        online: bool,
        firmware_version: Option<&str>,
        wifi_rssi: Option<i32>,
        now_ms: i64,
    ) -> Result<bool> {
        let known: bool = self.conn.query_row(
            "select exists (select 1 from devices where device_id = ?1)",
            [device_id],
            |r| r.get(0),
        )?;
        self.conn.prepare_cached("insert into devices (device_id, online, last_seen_ms, firmware_version, wifi_rssi)
             values (?1, ?2, ?3, ?4, ?5)
             on conflict (device_id) do update set online = excluded.online, last_seen_ms = excluded.last_seen_ms,
               firmware_version = coalesce(excluded.firmware_version, devices.firmware_version),
               wifi_rssi = coalesce(excluded.wifi_rssi, devices.wifi_rssi)")?.execute(params![device_id, online, now_ms, firmware_version, wifi_rssi])?;
        Ok(!known)
    }

    /// Moves the last-heard time of masters still online (never back, never for one offline):
    /// what keeps a master that sends only telemetry from looking silent.
    pub fn note_heard(&mut self, heard: &[(String, i64)]) -> Result<()> {
        let tx = self.conn.savepoint()?;
        {
            let mut stmt = tx.prepare_cached(
                "update devices set last_seen_ms = max(coalesce(last_seen_ms, 0), ?2)
                 where device_id = ?1 and online = 1",
            )?;
            for (device, at_ms) in heard {
                stmt.execute(params![device, at_ms])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks offline every device still online whose last message is older than `cutoff_ms`;
    /// returns their ids (a master that died without a last will goes quiet this way).
    pub fn mark_silent_offline(&mut self, cutoff_ms: i64) -> Result<Vec<String>> {
        let tx = self.conn.savepoint()?;
        let ids: Vec<String> = {
            let mut stmt = tx.prepare_cached(
                "update devices set online = 0 where online = 1 and coalesce(last_seen_ms, 0) < ?1 returning device_id",
            )?;
            stmt.query_map([cutoff_ms], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        tx.commit()?;
        Ok(ids)
    }

    /// The configuration version last delivered to a master, if any.
    pub fn delivered_config_version(&self, device_id: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "select delivered_config_version from devices where device_id = ?1",
                [device_id],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    pub fn set_delivered_config_version(&mut self, device_id: &str, version: i64) -> Result<()> {
        self.conn.prepare_cached("insert into devices (device_id, delivered_config_version) values (?1, ?2)
             on conflict (device_id) do update set delivered_config_version = excluded.delivered_config_version")?.execute(params![device_id, version])?;
        Ok(())
    }

    /// Devices and whether each is online, for status and metrics.
    pub fn devices(&self) -> Result<Vec<(String, bool, Option<i64>)>> {
        let mut stmt = self.conn.prepare_cached(
            "select device_id, online, last_seen_ms from devices order by device_id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

macro_rules! command_columns {
    () => {
        "select id, master_device_id, slave_mac_address, slave_device_id, relay_numbers, actions,
        duration_seconds, command_type, triggered_by, priority, rule_id, rule_name, expires_at_ms, state,
        attempts, last_sent_at_ms, polled_by"
    };
}
use command_columns;
const COMMAND_SELECT: &str = concat!(command_columns!(), " from commands");

fn command_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CommandRecord> {
    fn json<T: serde::de::DeserializeOwned>(
        r: &rusqlite::Row<'_>,
        i: usize,
    ) -> rusqlite::Result<T> {
        let text: String = r.get(i)?;
        serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    }
    let bad = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let relay_numbers: Vec<i64> = json(r, 4)?;
    let actions: Vec<String> = json(r, 5)?;
    let duration_seconds: Vec<i64> = json(r, 6)?;
    Ok(CommandRecord {
        id: r.get(0)?,
        master_device_id: r.get(1)?,
        slave_mac_address: r.get(2)?,
        slave_device_id: r.get(3)?,
        actions: crate::command::actions_from_columns(&relay_numbers, &actions, &duration_seconds)
            .map_err(|e| bad(5, e))?,
        command_type: CommandType::parse(&r.get::<_, String>(7)?).map_err(|e| bad(7, e))?,
        triggered_by: CommandSource::parse(&r.get::<_, String>(8)?).map_err(|e| bad(8, e))?,
        priority: r.get(9)?,
        rule_id: r.get(10)?,
        rule_name: r.get(11)?,
        expires_at_ms: r.get(12)?,
        state: CommandState::parse(&r.get::<_, String>(13)?),
        attempts: r.get::<_, i64>(14)? as u32,
        last_sent_at_ms: r.get(15)?,
        polled_by: r.get(16)?,
    })
}

const RULE_SELECT: &str =
    "select id, device_id, rule_id, rule_name, rule_description, rule_json, enabled, priority,
    cooldown_seconds, max_executions_per_hour, revision, deleted, changed_at from rules";

fn rule_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RuleRecord> {
    let json: Option<String> = r.get(5)?;
    Ok(RuleRecord {
        id: r.get(0)?,
        device_id: r.get(1)?,
        rule_id: r.get(2)?,
        rule_name: r.get(3)?,
        rule_description: r.get(4)?,
        rule_json: json.and_then(|j| serde_json::from_str(&j).ok()),
        enabled: r.get(6)?,
        priority: r.get(7)?,
        cooldown_seconds: r.get(8)?,
        max_executions_per_hour: r.get(9)?,
        revision: r.get(10)?,
        deleted: r.get(11)?,
        changed_at: r.get(12)?,
    })
}

/// Records a command as accepted (nothing if its id is known); `client_id` for commands the Pi
/// created.
fn insert_command(
    conn: &Connection,
    cmd: &CommandRecord,
    client_id: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    let columns = crate::command::actions_to_columns(&cmd.actions);
    conn.prepare_cached("insert into commands (id, master_device_id, slave_mac_address, slave_device_id, relay_numbers,
            actions, duration_seconds, command_type, triggered_by, priority, rule_id, rule_name,
            expires_at_ms, state, accepted_at_ms, client_id)
         values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'accepted', ?14, ?15)
         on conflict (id) do nothing")?.execute(params![
            cmd.id,
            cmd.master_device_id,
            cmd.slave_mac_address,
            cmd.slave_device_id,
            serde_json::to_string(&columns.relay_numbers)?,
            serde_json::to_string(&columns.actions)?,
            serde_json::to_string(&columns.duration_seconds)?,
            cmd.command_type.as_str(),
            cmd.triggered_by.as_str(),
            cmd.priority,
            cmd.rule_id,
            cmd.rule_name,
            cmd.expires_at_ms,
            now_ms,
            client_id,
        ])?;
    Ok(())
}

fn upsert_relay_states(
    conn: &Connection,
    master: &str,
    slave: &str,
    states: &[bool],
    now_ms: i64,
) -> Result<()> {
    conn.prepare_cached(
        "insert into relay_states (master_device_id, slave_mac_address, states, updated_at_ms)
         values (?1, ?2, ?3, ?4)
         on conflict (master_device_id, slave_mac_address) do update
           set states = excluded.states, updated_at_ms = excluded.updated_at_ms",
    )?
    .execute(params![
        master,
        slave,
        serde_json::to_string(states)?,
        now_ms
    ])?;
    Ok(())
}

fn insert_outbox(
    conn: &Connection,
    class: OutboxClass,
    key: &str,
    payload: &Value,
    now_ms: i64,
) -> Result<bool> {
    let n = conn.prepare_cached("insert into outbox (class, idempotency_key, payload, created_at_ms) values (?1, ?2, ?3, ?4)
         on conflict (idempotency_key) do nothing")?.execute(params![class.as_str(), key, payload.to_string(), now_ms])?;
    Ok(n == 1)
}

fn add_counter(conn: &Connection, name: &str, by: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "insert into counters (name, value) values (?1, ?2)
         on conflict (name) do update set value = value + excluded.value",
    )?
    .execute(params![name, by])?;
    Ok(())
}

#[cfg(test)]
mod tests;
