//! The store's own thread and its group commit. Every call on a [`StoreHandle`] is a job for one
//! thread that owns the SQLite connection. Jobs queued together run in one transaction and share
//! its one commit (one fsync with `synchronous = FULL`); each job is answered only after that
//! commit, so nothing a job wrote is acted on before it is on disk.
//!
//! Urgent jobs (a firing's decision, a command's signing counter) are taken before any other.
//! Once one has joined a group, the group commits as soon as no other urgent job waits: the
//! urgent job waits at most for the one job already running (telemetry is handed over in
//! bounded chunks), then shares the commit with whatever else was due.
//!
//! Each job runs in a savepoint of its own inside the group: a job that fails (or panics) loses
//! all its writes and none of the others'. Store methods open savepoints, not transactions, so
//! that they nest there (outside a group a savepoint is a transaction of its own).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Result, Store, StoreError};

/// Jobs in one group at most: bounds how long a group holds SQLite's write lock.
pub const GROUP_JOBS_MAX: usize = 64;

/// How long a deferred job waits for a group to join before it is committed alone.
pub const DEFERRED_WAIT_MAX: Duration = Duration::from_secs(1);

/// What a job's result does once its group is committed (or its commit failed: the error).
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// Runs the job; says whether it succeeded, and how to answer it.
type Job = Box<dyn FnOnce(&mut Store) -> (bool, Reply) + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Joins the group; goes first.
    Urgent,
    /// Joins the group.
    Normal,
    /// Joins the next group that something else starts, or commits alone after
    /// [`DEFERRED_WAIT_MAX`]: for writes whose loss in a crash is harmless, so that they do not
    /// cost a commit of their own.
    Deferred,
    /// Runs outside any transaction (checkpoint, VACUUM, bounded housekeeping steps).
    Alone,
}

#[derive(Default)]
struct Queue {
    urgent: VecDeque<Job>,
    normal: VecDeque<(Kind, Job)>,
    /// How many of `normal` are deferred, and since when the oldest of them waits.
    deferred: usize,
    deferred_since: Option<Instant>,
    closed: bool,
}

impl Queue {
    /// Whether a group should start now. Deferred jobs alone wait for company or their bound.
    fn due(&self, now: Instant) -> Due {
        if !self.urgent.is_empty() || self.normal.len() > self.deferred || self.closed {
            return Due::Now;
        }
        match self.deferred_since {
            Some(since) if now >= since + DEFERRED_WAIT_MAX => Due::Now,
            Some(since) => Due::At(since + DEFERRED_WAIT_MAX),
            None => Due::WhenWoken,
        }
    }

    fn pop_normal(&mut self) -> Option<(Kind, Job)> {
        let popped = self.normal.pop_front();
        if let Some((Kind::Deferred, _)) = popped {
            self.deferred -= 1;
            if self.deferred == 0 {
                self.deferred_since = None;
            }
        }
        popped
    }
}

/// When the store's thread starts its next group.
enum Due {
    Now,
    /// Only deferred jobs wait, the oldest until then.
    At(Instant),
    /// Nothing waits.
    WhenWoken,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// Closes the queue when the last handle goes: the thread finishes what is queued, then ends
/// and closes the database.
struct Closer(Arc<Inner>);

impl Drop for Closer {
    fn drop(&mut self) {
        let mut queue = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.closed = true;
        self.0.ready.notify_one();
    }
}

/// The store shared by the agent's tasks: a handle to the store's thread.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<Closer>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle").finish_non_exhaustive()
    }
}

impl StoreHandle {
    /// Starts the store's thread with `store`.
    pub fn new(store: Store) -> StoreHandle {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
        });
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("autocore-store".into())
            .spawn(move || run(store, &thread_inner))
            .expect("spawning the store's thread");
        StoreHandle {
            inner: Arc::new(Closer(inner)),
        }
    }

    /// Runs `f` in the next group; answers after its commit.
    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.submit(Kind::Normal, f).await
    }

    /// Like [`StoreHandle::call`], ahead of every job that is not urgent: the hot path's
    /// writes (a firing's decision, a command's signing counter).
    pub async fn call_urgent<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.submit(Kind::Urgent, f).await
    }

    /// Runs `f` outside any transaction, after the jobs queued before it: for what SQLite
    /// refuses inside one (a checkpoint, VACUUM) or what should not hold a group (housekeeping).
    pub async fn call_alone<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.submit(Kind::Alone, f).await
    }

    /// Queues `f` now (not at the first poll, as `call` does) and returns its answer to await:
    /// several jobs queued back to back share a group.
    pub fn call_queued<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + use<R, F>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.queued(Kind::Normal, f)
    }

    /// Queues `f` now to run with the next group something else starts, or alone after
    /// [`DEFERRED_WAIT_MAX`]: for writes whose loss in a crash costs nothing (rows already
    /// delivered, sent again idempotently if their removal is lost). Jobs queued after it still
    /// see its writes, since the queue keeps its order. Its answer comes after that commit.
    pub fn call_deferred<R, F>(&self, f: F) -> impl Future<Output = Result<R>> + use<R, F>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.queued(Kind::Deferred, f)
    }

    fn queued<R, F>(&self, kind: Kind, f: F) -> impl Future<Output = Result<R>> + use<R, F>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let queued = self.enqueue(kind, f);
        async move {
            queued?
                .await
                .map_err(|_| StoreError::Task("the store's thread ended".into()))?
        }
    }

    /// Runs `f` on `items` in jobs of at most `per_job` items, queued back to back: they share
    /// a group commit, and an urgent job waits behind one chunk at most, not the whole batch.
    /// `f` is told whether its chunk is the last. The chunks' answers, in order.
    pub async fn call_chunked<T, R, F>(
        &self,
        mut items: Vec<T>,
        per_job: usize,
        f: F,
    ) -> Vec<Result<R>>
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(&mut Store, Vec<T>, bool) -> Result<R> + Clone + Send + 'static,
    {
        let per_job = per_job.max(1);
        let mut chunks = Vec::with_capacity(items.len().div_ceil(per_job));
        while items.len() > per_job {
            let tail = items.split_off(per_job);
            chunks.push(std::mem::replace(&mut items, tail));
        }
        chunks.push(items);
        let last = chunks.len() - 1;
        let answers: Vec<_> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| {
                let f = f.clone();
                self.call_queued(move |s| f(s, chunk, i == last))
            })
            .collect();
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(answer.await);
        }
        results
    }

    async fn submit<R, F>(&self, kind: Kind, f: F) -> Result<R>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.enqueue(kind, f)?
            .await
            .map_err(|_| StoreError::Task("the store's thread ended".into()))?
    }

    fn enqueue<R, F>(&self, kind: Kind, f: F) -> Result<tokio::sync::oneshot::Receiver<Result<R>>>
    where
        F: FnOnce(&mut Store) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |store: &mut Store| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(store)))
                .unwrap_or_else(|_| Err(StoreError::Task("a store call panicked".into())));
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit: Option<&StoreError>| {
                let _ = tx.send(match commit {
                    Some(e) if result.is_ok() => {
                        Err(StoreError::Task(format!("the group commit failed: {e}")))
                    }
                    _ => result,
                });
            });
            (ok, reply)
        });
        {
            let inner = &self.inner.0;
            let mut queue = inner.queue.lock().map_err(|_| StoreError::Poisoned)?;
            match kind {
                Kind::Urgent => queue.urgent.push_back(job),
                Kind::Deferred => {
                    queue.deferred += 1;
                    queue.deferred_since.get_or_insert_with(Instant::now);
                    queue.normal.push_back((Kind::Deferred, job));
                }
                other => queue.normal.push_back((other, job)),
            }
            inner.ready.notify_one();
        }
        Ok(rx)
    }
}

/// The next job of a group, or why the group ends.
enum Next {
    Job(Job, Kind),
    /// An `Alone` job waits: commit the group first.
    Commit,
}

fn run(mut store: Store, inner: &Inner) {
    loop {
        // Wait for work; end when closed and drained.
        {
            let mut queue = inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if queue.closed && queue.urgent.is_empty() && queue.normal.is_empty() {
                    return;
                }
                queue = match queue.due(Instant::now()) {
                    Due::Now => break,
                    Due::WhenWoken => inner.ready.wait(queue).unwrap_or_else(|p| p.into_inner()),
                    Due::At(at) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        inner
                            .ready
                            .wait_timeout(queue, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                };
            }
            if queue.urgent.is_empty()
                && let Some((Kind::Alone, _)) = queue.normal.front()
                && let Some((_, job)) = queue.pop_normal()
            {
                drop(queue);
                job(&mut store).1(None);
                continue;
            }
        }
        let began = store.begin_group();
        let mut replies: Vec<Reply> = Vec::new();
        let mut urgent_joined = false;
        loop {
            let next = {
                let mut queue = inner.queue.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(job) = queue.urgent.pop_front() {
                    Some(Next::Job(job, Kind::Urgent))
                } else if urgent_joined || replies.len() >= GROUP_JOBS_MAX {
                    None
                } else {
                    match queue.normal.front() {
                        Some((Kind::Alone, _)) => Some(Next::Commit),
                        Some(_) => queue.pop_normal().map(|(kind, job)| Next::Job(job, kind)),
                        None => None,
                    }
                }
            };
            match next {
                Some(Next::Job(job, kind)) => {
                    urgent_joined |= kind == Kind::Urgent;
                    // Each job in a savepoint of its own: a failing one loses all its writes
                    // and nothing of the others'.
                    let own = began.is_ok() && store.begin_job().is_ok();
                    let (ok, reply) = job(&mut store);
                    if own {
                        store.end_job(ok);
                    }
                    replies.push(reply);
                }
                Some(Next::Commit) | None => break,
            }
        }
        // Without a group (BEGIN refused) each job's savepoint was its own transaction.
        let committed = match began {
            Ok(()) => store.commit_group(),
            Err(_) => Ok(()),
        };
        let error = committed.err();
        if error.is_some() {
            store.rollback_group();
        }
        for reply in replies {
            reply(error.as_ref());
        }
    }
}

// Through the statement cache: these run several times per group, and parsing them each time
// showed in the store thread's profile.
impl Store {
    fn run_cached(&self, sql: &str) -> Result<()> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    fn begin_group(&mut self) -> Result<()> {
        self.run_cached("begin")
    }

    fn commit_group(&mut self) -> Result<()> {
        self.run_cached("commit")
    }

    fn begin_job(&mut self) -> Result<()> {
        self.run_cached("savepoint group_job")
    }

    fn end_job(&mut self, ok: bool) {
        if !ok {
            let _ = self.run_cached("rollback to group_job");
        }
        let _ = self.run_cached("release group_job");
    }

    fn rollback_group(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.run_cached("rollback");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use serde_json::json;

    use super::*;
    use crate::store::OutboxClass;

    fn handle() -> (tempfile::TempDir, StoreHandle) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("agent.db")).unwrap();
        (dir, StoreHandle::new(store))
    }

    /// Holds the store's thread in a job until the returned sender is used, so that the jobs
    /// queued meanwhile run together.
    fn hold(store: &StoreHandle) -> mpsc::Sender<()> {
        let (release, released) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        drop(store.call_queued(move |_| {
            started_tx.send(()).unwrap();
            released.recv().unwrap();
            Ok(())
        }));
        started.recv().unwrap();
        release
    }

    fn queue_row(s: &mut Store, key: &str) -> Result<bool> {
        s.enqueue(OutboxClass::Event, key, &json!({"key": key}), 1)
    }

    async fn keys(store: &StoreHandle) -> Vec<String> {
        store
            .call(|s| s.outbox_due(i64::MAX, 100))
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.idempotency_key)
            .collect()
    }

    /// Queues an urgent job that notes "urgent" in `order` when it runs; returns once it is in
    /// the queue (the spawned task has run to its first wait).
    async fn queue_urgent(
        store: &StoreHandle,
        order: &Arc<Mutex<Vec<String>>>,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let seen = order.clone();
        let urgent = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .call_urgent(move |_| {
                        seen.lock().unwrap().push("urgent".to_string());
                        Ok(())
                    })
                    .await
            }
        });
        while store.inner.0.queue.lock().unwrap().urgent.is_empty() {
            tokio::task::yield_now().await;
        }
        urgent
    }

    #[tokio::test]
    async fn jobs_queued_together_share_a_transaction_and_a_failing_one_loses_only_its_writes() {
        let (_dir, store) = handle();
        let release = hold(&store);
        let a = store.call_queued(|s| queue_row(s, "a"));
        let b = store.call_queued(|s| {
            queue_row(s, "b")?;
            // Inside the group: the job's own savepoint, not a transaction of its own.
            assert!(!s.conn.is_autocommit());
            Err::<bool, _>(StoreError::Task("refused after writing".into()))
        });
        let c = store.call_queued(|s| queue_row(s, "c"));
        release.send(()).unwrap();
        assert!(a.await.unwrap());
        assert!(b.await.is_err());
        assert!(c.await.unwrap());
        assert_eq!(keys(&store).await, vec!["a", "c"]);
    }

    #[tokio::test]
    async fn an_urgent_job_runs_before_the_jobs_queued_ahead_of_it() {
        let (_dir, store) = handle();
        let order = Arc::new(Mutex::new(Vec::new()));
        let release = hold(&store);
        let seen = order.clone();
        let normal = store.call_queued(move |_| {
            seen.lock().unwrap().push("normal".to_string());
            Ok(())
        });
        let urgent = queue_urgent(&store, &order).await;
        release.send(()).unwrap();
        urgent.await.unwrap().unwrap();
        normal.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["urgent", "normal"]);
    }

    /// Rows committed in the database file, as another connection sees them.
    fn committed_keys(dir: &tempfile::TempDir) -> Vec<String> {
        let conn = rusqlite::Connection::open(dir.path().join("agent.db")).unwrap();
        let mut stmt = conn
            .prepare("select idempotency_key from outbox order by seq")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap()
    }

    /// A deferred job alone is not committed (within a good part of its bound); the next job
    /// queued takes it into its group, in order: the later job sees its write, and both are
    /// answered after that one commit.
    #[tokio::test]
    async fn a_deferred_job_waits_for_the_next_group_and_goes_first_in_it() {
        let (dir, store) = handle();
        let mut deferred = Box::pin(store.call_deferred(|s| queue_row(s, "deferred")));
        assert!(
            tokio::time::timeout(DEFERRED_WAIT_MAX / 2, &mut deferred)
                .await
                .is_err(),
            "a deferred job alone was answered: it had a commit of its own"
        );
        assert!(committed_keys(&dir).is_empty());
        let next = store.call_queued(|s| {
            let seen: Vec<String> = s
                .outbox_due(i64::MAX, 10)?
                .into_iter()
                .map(|r| r.idempotency_key)
                .collect();
            queue_row(s, "next")?;
            Ok(seen)
        });
        assert!(deferred.await.unwrap());
        assert_eq!(next.await.unwrap(), vec!["deferred"]);
        assert_eq!(committed_keys(&dir), vec!["deferred", "next"]);
    }

    /// With nothing to join, a deferred job is committed alone once its bound has passed.
    #[tokio::test]
    async fn a_deferred_job_alone_is_committed_after_its_bound() {
        let (dir, store) = handle();
        let began = Instant::now();
        let answer = tokio::time::timeout(
            DEFERRED_WAIT_MAX * 5,
            store.call_deferred(|s| queue_row(s, "deferred")),
        )
        .await
        .expect("a deferred job alone was never committed");
        assert!(answer.unwrap());
        assert!(began.elapsed() >= DEFERRED_WAIT_MAX);
        assert_eq!(committed_keys(&dir), vec!["deferred"]);
    }

    /// A batch in chunks: an urgent job queued while the first chunk runs goes next, ahead of
    /// the rest of the batch; only the last chunk is told it is last; answers come in order.
    #[tokio::test]
    async fn an_urgent_job_waits_for_one_chunk_of_a_batch_not_the_whole_batch() {
        let (_dir, store) = handle();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (first_running, running) = mpsc::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let seen = order.clone();
        let batch = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .call_chunked((0..5).collect::<Vec<u32>>(), 2, move |_, chunk, last| {
                        if chunk[0] == 0 {
                            first_running.send(()).unwrap();
                            released.lock().unwrap().recv().unwrap();
                        }
                        seen.lock().unwrap().push(format!("{chunk:?} last={last}"));
                        Ok(chunk.len())
                    })
                    .await
            }
        });
        while running.try_recv().is_err() {
            tokio::task::yield_now().await;
        }
        let urgent = queue_urgent(&store, &order).await;
        release.send(()).unwrap();
        urgent.await.unwrap().unwrap();
        let sizes: Vec<usize> = batch
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        assert_eq!(
            *order.lock().unwrap(),
            vec![
                "[0, 1] last=false",
                "urgent",
                "[2, 3] last=false",
                "[4] last=true"
            ]
        );
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_jobs_beside_it_are_kept() {
        let (_dir, store) = handle();
        let release = hold(&store);
        let a = store.call_queued(|s| queue_row(s, "a"));
        let b = store.call_queued(|s| -> Result<bool> {
            queue_row(s, "b")?;
            panic!("a bug in a store call");
        });
        release.send(()).unwrap();
        assert!(a.await.unwrap());
        assert!(matches!(b.await, Err(StoreError::Task(_))));
        assert_eq!(keys(&store).await, vec!["a"]);
        // The thread lives on.
        assert!(store.call(|s| queue_row(s, "c")).await.unwrap());
    }

    #[tokio::test]
    async fn a_job_alone_runs_outside_any_transaction_and_others_inside_one() {
        let (_dir, store) = handle();
        assert!(
            store
                .call_alone(|s| Ok(s.conn.is_autocommit()))
                .await
                .unwrap()
        );
        assert!(!store.call(|s| Ok(s.conn.is_autocommit())).await.unwrap());
        // A checkpoint is refused inside a transaction; alone it works.
        store.call_alone(|s| s.checkpoint()).await.unwrap();
    }

    #[tokio::test]
    async fn the_thread_ends_and_closes_the_database_when_the_last_handle_goes() {
        let (dir, store) = handle();
        store.call(|s| queue_row(s, "a")).await.unwrap();
        drop(store);
        // Closed cleanly: the last connection's close removes the WAL file.
        let wal = dir.path().join("agent.db-wal");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while wal.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            !wal.exists(),
            "the WAL is still there: the store was not closed"
        );
    }
}
