//! Folds the WAL into the database file from a connection and a thread of its own, so that no
//! commit pays for it. SQLite's automatic checkpoint runs inside the commit that crosses 1,000
//! WAL pages: with telemetry flowing that is a firing's commit every few seconds, held up by a
//! copy of megabytes and an fsync of the database file. A passive checkpoint runs beside the
//! writer without blocking it (decision 23).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;

use super::{BUSY_TIMEOUT_MS, Result};

/// How often the WAL is folded back.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Runs while held; dropping it stops the thread (after the checkpoint under way).
#[derive(Debug)]
pub struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path` every `every`. The writer's connection
    /// should then have its automatic checkpoint off ([`super::Store::leave_checkpoints_to_a_checkpointer`]).
    pub fn start(path: &Path, every: Duration) -> Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        let (stop, stopped) = mpsc::channel::<()>();
        let path: PathBuf = path.to_path_buf();
        std::thread::Builder::new()
            .name("autocore-checkpoint".into())
            .spawn(move || {
                loop {
                    match stopped.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Stopped, or the handle dropped.
                        _ => return,
                    }
                    if let Err(e) = conn.query_row("pragma wal_checkpoint(passive)", [], |_| Ok(()))
                    {
                        tracing::warn!(path = %path.display(), error = %e, "WAL checkpoint failed; retrying");
                    }
                }
            })
            .map_err(|e| super::StoreError::Task(format!("starting the checkpoint thread: {e}")))?;
        Ok(Checkpointer { _stop: stop })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{OutboxClass, Store};

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn the_wal_is_folded_into_the_database_by_the_thread_and_not_by_the_commits() {
        // Small rows and only just past the threshold: CI machines can be short of disk, and
        // the point is the count of WAL frames, not their size (once 287 MB free was seen).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let wal = dir.path().join("agent.db-wal");
        let mut store = Store::open(&path).unwrap();
        store.leave_checkpoints_to_a_checkpointer().unwrap();
        let payload = serde_json::json!({"pad": "x".repeat(64)});
        let frame = 4_096 + 24;
        // SQLite's automatic checkpoint runs in the commit that leaves 1,000 frames or more.
        let past_the_automatic_checkpoint = 32 + 1_100 * frame;
        let before = file_len(&path);
        let mut written: u64 = 0;
        while file_len(&wal) < past_the_automatic_checkpoint {
            store
                .enqueue(OutboxClass::Event, &format!("event:{written}"), &payload, 1)
                .unwrap();
            written += 1;
            assert!(written < 5_000, "the WAL did not grow past 1,100 frames");
        }
        assert_eq!(
            file_len(&path),
            before,
            "no commit folded the WAL into the database ({written} commits)"
        );
        let checkpointer = Checkpointer::start(&path, Duration::from_millis(20)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while file_len(&path) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpointer never folded the WAL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Writes go on beside it.
        for i in written..written + 200 {
            store
                .enqueue(OutboxClass::Event, &format!("event:{i}"), &payload, 1)
                .unwrap();
        }
        drop(checkpointer);
        assert_eq!(store.outbox_stats(1).unwrap().depth, written + 200);
    }
}
