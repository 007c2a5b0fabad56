//! What every SQLite file Kuma writes has in common: how a writing connection is set up
//! (WAL, `synchronous`, `secure_delete`, a busy timeout), how read-only connections are
//! opened, how a WAL is emptied after an erasure, and the file lock that admits one writer.
//! Shards, the keystore and read-model databases all go through here, so a setting is
//! decided once.

use crate::error::{Error, Result};
use rusqlite::{Connection, OpenFlags};
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// Permissions of the files Kuma creates unless told otherwise: the owner's only. Data
/// keys, ciphertexts, entity heads and read models are nobody else's business.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// The permissions of a directory for files of `file_mode`: searchable where readable.
pub fn dir_mode(file_mode: u32) -> u32 {
    file_mode | ((file_mode & 0o444) >> 2)
}

/// Creates `dir` and its missing parents with `dir_mode(file_mode)` (existing ones keep
/// theirs).
pub(crate) fn create_dirs(dir: &Path, file_mode: u32, context: &'static str) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(dir_mode(file_mode))
        .create(dir)
        .map_err(|e| Error::Storage { context, message: format!("{}: {e}", dir.display()) })
}

/// Creates an empty file with `mode` if it does not exist yet (SQLite then creates its
/// `-wal` and `-shm` with the same permissions).
pub(crate) fn create_file(path: &Path, mode: u32, context: &'static str) -> Result<()> {
    match File::options().write(true).create_new(true).mode(mode).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Storage { context, message: format!("{}: {e}", path.display()) }),
    }
}

/// Sets a file's permissions (a file Kuma did not create itself, such as a `VACUUM INTO`
/// copy, which SQLite creates with the process's umask).
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Storage { context: "set file mode", message: format!("{}: {e}", path.display()) })
}

/// How long a connection waits for a lock held by a reader or a checkpoint before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// SQLite `synchronous` setting of a writing connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// `synchronous=NORMAL`: a commit reaches the OS before it is acknowledged (survives a
    /// crash of the VM); the WAL is fsynced at checkpoints only, so power loss may undo the
    /// last commits (never corrupt the file).
    Normal,
    /// `synchronous=FULL`: the WAL is fsynced before every commit is acknowledged (survives
    /// power loss).
    Full,
}

impl SyncMode {
    fn pragma(self) -> &'static str {
        match self {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        }
    }
}

/// Changes the `synchronous` level of a connection (outside a transaction).
pub(crate) fn set_sync(conn: &Connection, sync: SyncMode) -> Result<()> {
    conn.pragma_update(None, "synchronous", sync.pragma()).map_err(Error::storage("set synchronous"))
}

/// Bytes SQLite has allocated in this OS process (page caches, statements), for every
/// store and read model together.
pub fn sqlite_memory_used() -> u64 {
    // SAFETY: sqlite3_memory_used reads a counter under SQLite's own mutex; no arguments.
    unsafe { rusqlite::ffi::sqlite3_memory_used() }.max(0) as u64
}

/// Opens a writing connection; `create: Some(mode)` creates the file with `mode` first if
/// it does not exist.
pub(crate) fn open_writer(path: &Path, create: Option<u32>, context: &'static str) -> Result<Connection> {
    if let Some(mode) = create {
        create_file(path, mode, context)?;
    }
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(Error::storage(context))
}

/// Sets up a writing connection: WAL mode, the `synchronous` level, a busy timeout,
/// temporary tables in memory, and `secure_delete` (deleted content is overwritten with
/// zeros, which erasure relies on).
pub(crate) fn configure(conn: &Connection, sync: SyncMode) -> Result<()> {
    let mode: String =
        conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(Error::storage("set WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Storage { context: "set WAL mode", message: format!("journal_mode is {mode}") });
    }
    set_sync(conn, sync)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(Error::storage("set busy timeout"))?;
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(Error::storage("set temp_store"))?;
    conn.pragma_update(None, "secure_delete", "ON").map_err(Error::storage("set secure_delete"))?;
    Ok(())
}

/// Opens a connection that only reads, for readers beside the one writer. It is opened
/// read-only, which no statement can undo (a `query_only` pragma could be switched off).
pub(crate) fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(Error::storage("open reader"))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(Error::storage("open reader"))?;
    Ok(conn)
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`, retried while readers hold old snapshots: moves every
/// committed page into the main file and empties the WAL, so no old page image (of rows
/// just deleted) survives in `-wal`.
pub(crate) fn truncate_wal(conn: &Connection, context: &'static str) -> Result<()> {
    for attempt in 0..50 {
        let busy: i64 =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).map_err(Error::storage(context))?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2 * (attempt + 1)));
    }
    Err(Error::Storage { context, message: "WAL checkpoint stayed busy (a reader holds an old snapshot)".into() })
}

/// Rewrites the whole file (`VACUUM`) and empties the WAL: no stale copy of a deleted or
/// moved row survives in the free space of a page. SQLite leaves such copies where cells
/// were moved between pages as b-trees grew or shrank, and `secure_delete` never sees them.
pub(crate) fn compact(conn: &Connection, context: &'static str) -> Result<()> {
    conn.execute_batch("VACUUM").map_err(Error::storage(context))?;
    truncate_wal(conn, context)
}

/// Takes an exclusive lock (flock) on `lock_path` (a file, created with `mode` if missing,
/// or a directory). `Locked { path: shown }` if another open file description holds it
/// (this VM or another process).
pub(crate) fn lock(lock_path: &Path, shown: &Path, mode: u32, context: &'static str) -> Result<File> {
    let opened = if lock_path.is_dir() {
        File::open(lock_path)
    } else {
        File::options().create(true).truncate(false).write(true).mode(mode).open(lock_path)
    };
    let f = opened.map_err(|e| Error::Storage { context, message: format!("{}: {e}", lock_path.display()) })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked { path: shown.display().to_string() }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(context)(e)),
    }
}
