//! A power cut for SQLite: a VFS that wraps the default one and, before each write or
//! truncation of the database, its WAL or its journal, appends the bytes it overwrites to an
//! undo log beside the file (`<file>-unsynced`), which an fsync of that file empties. Reads and
//! writes go to the real file, so the process behaves as it would without the VFS.
//!
//! After `kill -9` of the process, [`cut`] puts the overwritten bytes back, newest first, and
//! cuts each file to its size at its last fsync: what is left is what the disk held at the last
//! fsync, as after a power cut (a disk that keeps what it synced and nothing else). The `-shm`
//! file is removed: SQLite rebuilds it from the WAL, as it does after a reboot.
//!
//! The agent under test installs it as the default VFS when [`ENV`] is `1`; nothing else uses
//! it. Not modelled: directory entries (a file created and never synced survives the cut), and
//! a disk that reorders or tears writes within one fsync interval.

#![allow(
    unsafe_code,
    reason = "a SQLite VFS is C callbacks over raw pointers (libsqlite3-sys FFI)"
)]

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use libsqlite3_sys as ffi;

/// Set to `1` to make the agent under test run on this VFS.
pub const ENV: &str = "AUTOCORE_TEST_POWER_CUT_VFS";
/// The VFS's registered name.
pub const VFS_NAME: &str = "autocore-power-cut";
const UNDO_SUFFIX: &str = "-unsynced";
/// The files whose writes a power cut can lose: the database, its WAL and its journal.
const SIBLINGS: [&str; 3] = ["", "-wal", "-journal"];

#[derive(Debug, thiserror::Error)]
pub enum PowerCutError {
    #[error("SQLite has no default VFS to wrap")]
    NoDefaultVfs,
    #[error("registering the VFS failed with SQLite code {0}")]
    Register(c_int),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("undo log {0} is damaged")]
    Damaged(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PowerCutError + '_ {
    move |source| PowerCutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The undo log of one file: 8 bytes of the file's size at its last fsync, then records of
/// (offset u64, length u32, the bytes that were there), all little-endian.
#[derive(Debug)]
struct UndoLog {
    file: File,
    end: u64,
}

impl UndoLog {
    fn create(path: &Path, size: u64) -> std::io::Result<UndoLog> {
        let file = File::options()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        let mut log = UndoLog { file, end: 0 };
        log.synced(size)?;
        Ok(log)
    }

    fn synced(&mut self, size: u64) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.write_all_at(&size.to_le_bytes(), 0)?;
        self.end = 8;
        Ok(())
    }

    fn keep(&mut self, offset: u64, old: &[u8]) -> std::io::Result<()> {
        let mut record = Vec::with_capacity(12 + old.len());
        record.extend_from_slice(&offset.to_le_bytes());
        record.extend_from_slice(&(old.len() as u32).to_le_bytes());
        record.extend_from_slice(old);
        self.file.write_all_at(&record, self.end)?;
        self.end += record.len() as u64;
        Ok(())
    }
}

/// One undo log per file path, shared by every handle the process opened on it: an fsync
/// through one handle makes every handle's writes durable.
struct Shared {
    log: Mutex<UndoLog>,
}

/// Each open file's undo log and how many handles use it.
type Registry = Mutex<HashMap<PathBuf, (Arc<Shared>, usize)>>;

fn registry() -> &'static Registry {
    static LOGS: OnceLock<Registry> = OnceLock::new();
    LOGS.get_or_init(Mutex::default)
}

fn undo_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(UNDO_SUFFIX);
    PathBuf::from(name)
}

/// Our file: SQLite's header, our state, then the wrapped VFS's file.
#[repr(C)]
struct PcFile {
    base: ffi::sqlite3_file,
    path: Option<PathBuf>,
    shared: Option<Arc<Shared>>,
}

const REAL_OFFSET: usize = std::mem::size_of::<PcFile>().next_multiple_of(16);

unsafe fn real(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: x_open allocated REAL_OFFSET + the base file's size (szOsFile).
    unsafe { (file as *mut u8).add(REAL_OFFSET) as *mut ffi::sqlite3_file }
}

unsafe fn methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the base VFS set pMethods when its xOpen succeeded; its methods are static.
    unsafe { &*(*real(file)).pMethods }
}

unsafe fn shared(file: *mut ffi::sqlite3_file) -> Option<Arc<Shared>> {
    // SAFETY: x_open initialised the PcFile before setting our methods.
    unsafe { (*(file as *mut PcFile)).shared.clone() }
}

unsafe fn file_size(file: *mut ffi::sqlite3_file) -> Option<u64> {
    let mut size: ffi::sqlite3_int64 = 0;
    // SAFETY: delegating to the base file.
    let rc = unsafe { (methods(file).xFileSize?)(real(file), &mut size) };
    (rc == ffi::SQLITE_OK).then_some(size.max(0) as u64)
}

/// Keeps the bytes in `offset..offset + len` as they are now (zeros past the end).
unsafe fn keep_before(file: *mut ffi::sqlite3_file, offset: u64, len: usize) -> bool {
    // SAFETY: callers pass our file.
    let Some(shared) = (unsafe { shared(file) }) else {
        return true;
    };
    let mut old = vec![0u8; len];
    // SAFETY: delegating to the base file with a buffer of `len` bytes.
    let rc = unsafe {
        match methods(file).xRead {
            Some(read) => read(
                real(file),
                old.as_mut_ptr() as *mut c_void,
                len as c_int,
                offset as ffi::sqlite3_int64,
            ),
            None => ffi::SQLITE_IOERR,
        }
    };
    // A short read fills the rest with zeros, which is what is past the end.
    if rc != ffi::SQLITE_OK && rc != ffi::SQLITE_IOERR_SHORT_READ {
        return false;
    }
    let Ok(mut log) = shared.log.lock() else {
        return false;
    };
    log.keep(offset, &old).is_ok()
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes each file it opened once; we drop our state after the base file.
    unsafe {
        let rc = match methods(file).xClose {
            Some(close) => close(real(file)),
            None => ffi::SQLITE_OK,
        };
        let pc = file as *mut PcFile;
        if let Some(path) = (*pc).path.take()
            && let Ok(mut logs) = registry().lock()
            && let Some((_, users)) = logs.get_mut(&path)
        {
            *users -= 1;
            if *users == 0 {
                logs.remove(&path);
            }
        }
        std::ptr::drop_in_place(pc);
        rc
    }
}

unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: delegating.
    unsafe {
        match methods(file).xRead {
            Some(f) => f(real(file), buf, amount, offset),
            None => ffi::SQLITE_IOERR_READ,
        }
    }
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: our file; the undo record is written before the bytes it covers.
    unsafe {
        if !keep_before(file, offset.max(0) as u64, amount.max(0) as usize) {
            return ffi::SQLITE_IOERR_WRITE;
        }
        match methods(file).xWrite {
            Some(f) => f(real(file), buf, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    // SAFETY: our file; what the truncation removes is kept first.
    unsafe {
        let new = size.max(0) as u64;
        if let Some(now) = file_size(file)
            && now > new
            && !keep_before(file, new, (now - new) as usize)
        {
            return ffi::SQLITE_IOERR_TRUNCATE;
        }
        match methods(file).xTruncate {
            Some(f) => f(real(file), size),
            None => ffi::SQLITE_IOERR_TRUNCATE,
        }
    }
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: our file; the undo log empties only once the fsync succeeded.
    unsafe {
        let rc = match methods(file).xSync {
            Some(f) => f(real(file), flags),
            None => ffi::SQLITE_IOERR_FSYNC,
        };
        if rc == ffi::SQLITE_OK
            && let Some(shared) = shared(file)
            && let Some(size) = file_size(file)
            && let Ok(mut log) = shared.log.lock()
            && log.synced(size).is_err()
        {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        rc
    }
}

macro_rules! delegate {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*), $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: delegating to the base file with SQLite's own arguments.
            unsafe {
                match methods(file).$method {
                    Some(f) => f(real(file) $(, $arg)*),
                    None => $missing,
                }
            }
        }
    };
}

delegate!(x_file_size, xFileSize, (size: *mut ffi::sqlite3_int64), ffi::SQLITE_IOERR_FSTAT);
delegate!(x_lock, xLock, (level: c_int), ffi::SQLITE_IOERR_LOCK);
delegate!(x_unlock, xUnlock, (level: c_int), ffi::SQLITE_IOERR_UNLOCK);
delegate!(x_check_reserved_lock, xCheckReservedLock, (out: *mut c_int), ffi::SQLITE_IOERR_CHECKRESERVEDLOCK);
delegate!(x_file_control, xFileControl, (op: c_int, arg: *mut c_void), ffi::SQLITE_NOTFOUND);
delegate!(x_sector_size, xSectorSize, (), 4096);
delegate!(x_device_characteristics, xDeviceCharacteristics, (), 0);
delegate!(x_shm_map, xShmMap, (page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void), ffi::SQLITE_IOERR_SHMMAP);
delegate!(x_shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int), ffi::SQLITE_IOERR_SHMLOCK);
delegate!(x_shm_unmap, xShmUnmap, (delete: c_int), ffi::SQLITE_OK);
delegate!(x_unfetch, xUnfetch, (offset: ffi::sqlite3_int64, p: *mut c_void), ffi::SQLITE_OK);

unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: delegating.
    unsafe {
        if let Some(f) = methods(file).xShmBarrier {
            f(real(file));
        }
    }
}

unsafe extern "C" fn x_fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: delegating; without memory mapping SQLite reads through xRead.
    unsafe {
        match methods(file).xFetch {
            Some(f) => f(real(file), offset, amount, out),
            None => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite hands us szOsFile bytes at `file`; pAppData is the wrapped VFS.
    unsafe {
        let base = (*vfs).pAppData as *mut ffi::sqlite3_vfs;
        let pc = file as *mut PcFile;
        std::ptr::write(
            pc,
            PcFile {
                base: ffi::sqlite3_file {
                    pMethods: std::ptr::null(),
                },
                path: None,
                shared: None,
            },
        );
        let Some(open) = (*base).xOpen else {
            std::ptr::drop_in_place(pc);
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = open(base, name, real(file), flags, out_flags);
        if rc != ffi::SQLITE_OK {
            std::ptr::drop_in_place(pc);
            return rc;
        }
        (*pc).base.pMethods = &IO_METHODS;
        let durable =
            ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL | ffi::SQLITE_OPEN_MAIN_JOURNAL;
        if name.is_null() || flags & durable == 0 {
            return rc;
        }
        let Ok(path) = CStr::from_ptr(name).to_str().map(PathBuf::from) else {
            return rc;
        };
        let size = file_size(file).unwrap_or(0);
        let Ok(mut logs) = registry().lock() else {
            return rc;
        };
        let entry = match logs.get_mut(&path) {
            Some(entry) => entry,
            None => {
                // Whatever the file holds when the first handle opens it is on the disk.
                let Ok(log) = UndoLog::create(&undo_path(&path), size) else {
                    x_close(file);
                    return ffi::SQLITE_CANTOPEN;
                };
                logs.entry(path.clone()).or_insert((
                    Arc::new(Shared {
                        log: Mutex::new(log),
                    }),
                    0,
                ))
            }
        };
        entry.1 += 1;
        (*pc).shared = Some(entry.0.clone());
        (*pc).path = Some(path);
        rc
    }
}

/// Registers the VFS, wrapping the current default; `as_default` makes every connection that
/// names no VFS use it. Registering again does nothing.
pub fn install(as_default: bool) -> Result<(), PowerCutError> {
    static INSTALLED: OnceLock<Result<(), c_int>> = OnceLock::new();
    let done = INSTALLED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find initialises SQLite; the new VFS is leaked, so it outlives
        // every connection, as SQLite requires.
        unsafe {
            let base = ffi::sqlite3_vfs_find(std::ptr::null());
            if base.is_null() {
                return Err(-1);
            }
            let name = CString::new(VFS_NAME).map_err(|_| -1)?;
            let mut vfs = *base;
            vfs.szOsFile = (REAL_OFFSET + (*base).szOsFile as usize) as c_int;
            vfs.zName = name.into_raw() as *const c_char;
            vfs.pAppData = base as *mut c_void;
            vfs.pNext = std::ptr::null_mut();
            vfs.xOpen = Some(x_open);
            let vfs = Box::into_raw(Box::new(vfs));
            match ffi::sqlite3_vfs_register(vfs, c_int::from(as_default)) {
                ffi::SQLITE_OK => Ok(()),
                rc => Err(rc),
            }
        }
    });
    match done {
        Ok(()) => Ok(()),
        Err(-1) => Err(PowerCutError::NoDefaultVfs),
        Err(rc) => Err(PowerCutError::Register(*rc)),
    }
}

/// Installs the VFS as the default when [`ENV`] is `1`; returns whether it did.
pub fn install_from_env() -> Result<bool, PowerCutError> {
    if std::env::var(ENV).as_deref() != Ok("1") {
        return Ok(false);
    }
    install(true).map(|()| true)
}

/// What a power cut took back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Undone {
    /// Writes and truncations undone.
    pub writes: u64,
    /// Bytes put back.
    pub bytes: u64,
}

/// The power cut, after the process that used the VFS on `db` is dead: every write after each
/// file's last fsync is undone and the `-shm` file removed.
pub fn cut(db: &Path) -> Result<Undone, PowerCutError> {
    let mut undone = Undone::default();
    for suffix in SIBLINGS {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let file_path = PathBuf::from(name);
        let log_path = undo_path(&file_path);
        let log = match std::fs::read(&log_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&log_path)(e)),
        };
        if file_path.exists() {
            let (writes, bytes) = undo(&file_path, &log_path, &log)?;
            undone.writes += writes;
            undone.bytes += bytes;
        }
        std::fs::remove_file(&log_path).map_err(io(&log_path))?;
    }
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    match std::fs::remove_file(PathBuf::from(shm)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(db)(e)),
        _ => Ok(undone),
    }
}

/// Applies one undo log; returns the writes and bytes it put back.
fn undo(file_path: &Path, log_path: &Path, log: &[u8]) -> Result<(u64, u64), PowerCutError> {
    let damaged = || PowerCutError::Damaged(log_path.to_path_buf());
    let size = u64::from_le_bytes(
        log.get(..8)
            .ok_or_else(damaged)?
            .try_into()
            .map_err(|_| damaged())?,
    );
    let mut records = Vec::new();
    let mut at = 8usize;
    while at < log.len() {
        let head = log.get(at..at + 12).ok_or_else(damaged)?;
        let offset = u64::from_le_bytes(head[..8].try_into().map_err(|_| damaged())?);
        let len = u32::from_le_bytes(head[8..].try_into().map_err(|_| damaged())?) as usize;
        let bytes = log.get(at + 12..at + 12 + len).ok_or_else(damaged)?;
        records.push((offset, bytes));
        at += 12 + len;
    }
    let file = File::options()
        .write(true)
        .open(file_path)
        .map_err(io(file_path))?;
    for (offset, bytes) in records.iter().rev() {
        file.write_all_at(bytes, *offset).map_err(io(file_path))?;
    }
    file.set_len(size).map_err(io(file_path))?;
    file.sync_all().map_err(io(file_path))?;
    let bytes = records.iter().map(|(_, b)| b.len() as u64).sum();
    Ok((records.len() as u64, bytes))
}

/// Removes the undo logs beside `db` without applying them: a plain `kill -9` keeps every
/// write (the page cache outlives the process).
pub fn forget(db: &Path) -> Result<(), PowerCutError> {
    for suffix in SIBLINGS {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let log_path = undo_path(Path::new(&name));
        match std::fs::remove_file(&log_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&log_path)(e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};

    fn open(path: &Path) -> Connection {
        install(false).unwrap();
        let conn =
            Connection::open_with_flags_and_vfs(path, OpenFlags::default(), VFS_NAME).unwrap();
        conn.execute_batch(
            "pragma journal_mode = wal; pragma synchronous = full;
             create table if not exists t (n integer primary key);",
        )
        .unwrap();
        conn
    }

    /// The files as the page cache holds them at the moment of the cut, copied elsewhere, with
    /// the power cut applied (or not).
    fn snapshot(db: &Path, to: &Path, power_cut: bool) -> (Vec<i64>, Undone) {
        for suffix in ["", "-wal", "-unsynced", "-wal-unsynced"] {
            let mut from = db.as_os_str().to_owned();
            from.push(suffix);
            let mut target = to.as_os_str().to_owned();
            target.push(suffix);
            if Path::new(&from).exists() {
                std::fs::copy(&from, &target).unwrap();
            }
        }
        let undone = if power_cut {
            cut(to).unwrap()
        } else {
            forget(to).unwrap();
            Undone::default()
        };
        let conn = Connection::open(to).unwrap();
        let mut stmt = conn.prepare("select n from t order by n").unwrap();
        let rows = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<Vec<i64>, _>>()
            .unwrap();
        (rows, undone)
    }

    #[test]
    fn a_power_cut_loses_the_commits_after_the_last_fsync_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let conn = open(&db);
        conn.execute("insert into t values (1)", []).unwrap();
        // Committed, but not synced: a power cut may lose it.
        conn.execute_batch("pragma synchronous = off; insert into t values (2);")
            .unwrap();
        assert_eq!(snapshot(&db, &dir.path().join("kill.db"), false).0, [1, 2]);
        let (kept, undone) = snapshot(&db, &dir.path().join("cut.db"), true);
        assert_eq!(kept, [1]);
        assert!(undone.writes > 0 && undone.bytes > 0, "{undone:?}");
        drop(conn);
    }

    #[test]
    fn with_synchronous_full_a_power_cut_loses_no_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        let conn = open(&db);
        for n in 1..=50 {
            conn.execute("insert into t values (?1)", [n]).unwrap();
        }
        // A checkpoint rewrites the database file; what it wrote is synced too.
        conn.execute_batch("pragma wal_checkpoint(truncate);")
            .unwrap();
        conn.execute("insert into t values (51)", []).unwrap();
        let (kept, _) = snapshot(&db, &dir.path().join("cut.db"), true);
        assert_eq!(kept, (1..=51).collect::<Vec<i64>>());
        drop(conn);
    }
}
