//! The keystore: one random 32-byte data key per entity, stored only wrapped by the master
//! key, in its own SQLite file (default `<data_dir>/keystore.kuma`, or a path of your
//! choosing, e.g. on another volume with its own backup policy).
//!
//! Layout and invariants
//! - Keys are found by `index = BLAKE3.keyed_hash(index_key, entity_id)`; the keystore
//!   never contains an entity id. The 32-byte index key is random and itself stored wrapped
//!   by the master key, so without the master key the index reveals nothing either.
//! - Unwrapping the index key is how a master key is checked: a wrong key fails there,
//!   before anything is read or written.
//! - The file uses `synchronous=FULL`: a new data key is on disk before any event sealed
//!   with it can commit (a shard commit after power loss must never outlive its key).
//! - Keys for new entities are pre-created in durable batches (`pool`, per shard, wrapped
//!   under `Binding::PoolKey`), so a group commit with new entities costs no keystore
//!   fsync. Giving a pool key to an entity (`assign`) writes nothing here: the shard's own
//!   transaction records the claim (slot -> keyed hash) beside the events sealed with it, so
//!   the pair is as durable as those events. `settle` later moves claimed keys into `keys`
//!   in one durable transaction; after a crash, `recover_claims` does it from the shard's
//!   claims before the shard writes anything. Until settled, a claimed key is found in
//!   memory (`pending`); destroying it deletes its pool row.
//! - Destroying a key deletes its row with `secure_delete` on and truncates the WAL, so the
//!   wrapped key is gone from the file; copies of the shards (backups) then hold ciphertext
//!   that nothing can decrypt.
//! - Rotation rewraps every key in one SQLite transaction: a crash leaves the whole file
//!   under the old master key or the whole file under the new one.
//! - An erased entity keeps a tombstone here too (`erased`, by keyed hash), written in the
//!   transaction that deletes its key: no key is ever created again for it, whatever shard
//!   files (a restored backup) come with this keystore.
//! - The file itself is locked (flock) while open: one running store per keystore, and
//!   deleting a lock file cannot admit a second one.

use crate::cipher::{self, Binding, Key};
use crate::clock;
use crate::error::{Error, Result};
use crate::sqlite::{self, SyncMode};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// `PRAGMA application_id` of a keystore: "KUMK".
pub const APPLICATION_ID: i64 = 0x4B55_4D4B;
/// 2: the `erased` table. 3: the `pool` table.
const FORMAT_VERSION: u32 = 3;
const CACHE_CAP: usize = 200_000;
/// Keys pre-created per shard in one durable transaction when its pool runs out.
pub const POOL_REFILL: usize = 512;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value ANY) WITHOUT ROWID;
CREATE TABLE keys (
  idx     BLOB PRIMARY KEY NOT NULL,  -- keyed hash of the entity id
  wrapped BLOB NOT NULL,              -- the data key sealed by the master key
  created INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Tombstones of erased entities (format 2) and pre-created keys (format 3); created on
/// open in older keystores.
const ADDED_TABLES: &str = "
CREATE TABLE IF NOT EXISTS erased (
  idx BLOB PRIMARY KEY NOT NULL,      -- keyed hash of the erased entity id
  ts  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pool (
  slot    INTEGER PRIMARY KEY,        -- never reused
  shard   INTEGER NOT NULL,           -- whose writer may give it out
  wrapped BLOB NOT NULL               -- the key sealed by the master key (Binding::PoolKey)
);
";

/// A pool key given to an entity whose claim is not settled yet.
#[derive(Clone)]
struct Pending {
    shard: u32,
    slot: u64,
    key: Key,
}

/// A claim as a shard records it: pool slot and the keyed hash of the entity given its key.
pub type Claim = (u64, [u8; 32]);

pub struct Keystore {
    path: PathBuf,
    conn: Mutex<Connection>,
    master: RwLock<Key>,
    index_key: Key,
    cache: RwLock<HashMap<[u8; 32], Key>>,
    /// Free pre-created keys per shard, loaded at the shard's first claim.
    pools: Mutex<HashMap<u32, Vec<(u64, Key)>>>,
    /// Claimed pool keys not yet moved into `keys`, by keyed hash.
    pending: RwLock<HashMap<[u8; 32], Pending>>,
    /// Held (flock) while open; released by `close`.
    lock: Mutex<Option<File>>,
    closed: std::sync::atomic::AtomicBool,
}

/// Locks the keystore file itself (flock; SQLite's own locks are fcntl locks, which are
/// independent of it on Linux). The lock's descriptor is closed only after SQLite's
/// connection is, so it cannot drop SQLite's locks.
fn lock_file(path: &Path) -> Result<File> {
    sqlite::lock(path, path, sqlite::DEFAULT_FILE_MODE, "lock keystore")
}

impl Keystore {
    /// Creates a new keystore for `store_id` (permissions `mode`). Fails if the file exists.
    pub fn create(path: &Path, master: Key, store_id: &str, mode: u32) -> Result<Keystore> {
        Keystore::create_with(path, master, store_id, mode, None)
    }

    /// `create` with a given index key (cluster mode: every replica of a shard must find an
    /// entity under the same keyed hash), or a random one.
    pub fn create_with(
        path: &Path,
        master: Key,
        store_id: &str,
        mode: u32,
        index_key: Option<Key>,
    ) -> Result<Keystore> {
        if path.exists() {
            return Err(Error::ForeignFile {
                path: path.display().to_string(),
                why: "keystore file already exists".into(),
            });
        }
        if let Some(dir) = path.parent() {
            sqlite::create_dirs(dir, mode, "create keystore dir")?;
        }
        let conn = sqlite::open_writer(path, Some(mode), "create keystore")?;
        let lock = lock_file(path)?;
        conn.pragma_update(None, "application_id", APPLICATION_ID).map_err(Error::storage("create keystore"))?;
        sqlite::configure(&conn, SyncMode::Full)?;
        let index_key = match index_key {
            Some(k) => k,
            None => Key::random()?,
        };
        let wrapped = cipher::seal(&master, Binding::IndexKey, index_key.as_bytes());
        conn.execute_batch(&format!("BEGIN; {SCHEMA} {ADDED_TABLES} PRAGMA user_version = {FORMAT_VERSION};"))
            .map_err(Error::storage("create keystore"))?;
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('store_id', ?1), ('index_key', ?2)",
            params![store_id, wrapped],
        )
        .map_err(Error::storage("create keystore"))?;
        conn.execute_batch("COMMIT").map_err(Error::storage("create keystore"))?;
        Ok(Keystore::assemble(path, conn, master, index_key, lock))
    }

    fn assemble(path: &Path, conn: Connection, master: Key, index_key: Key, lock: File) -> Keystore {
        Keystore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            master: RwLock::new(master),
            index_key,
            cache: RwLock::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            pending: RwLock::new(HashMap::new()),
            lock: Mutex::new(Some(lock)),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Opens the keystore of `store_id`; fails with `WrongMasterKey` (and reads nothing
    /// else) if `master` is not the key it was written with.
    pub fn open(path: &Path, master: Key, store_id: &str) -> Result<Keystore> {
        let shown = || path.display().to_string();
        if !path.is_file() {
            return Err(Error::MissingKeystore { path: shown() });
        }
        let lock = lock_file(path)?;
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|e| Error::ForeignFile { path: shown(), why: e.to_string() })?;
        let app: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(|e| Error::ForeignFile { path: shown(), why: e.to_string() })?;
        if app != APPLICATION_ID {
            return Err(Error::ForeignFile { path: shown(), why: "not a Kuma keystore".into() });
        }
        let meta = |key: &str| -> Result<Option<rusqlite::types::Value>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(|e| Error::ForeignFile { path: shown(), why: e.to_string() })
        };
        match meta("store_id")? {
            Some(rusqlite::types::Value::Text(id)) if id == store_id => {}
            _ => return Err(Error::ForeignFile { path: shown(), why: "keystore of another store".into() }),
        }
        let Some(rusqlite::types::Value::Blob(wrapped)) = meta("index_key")? else {
            return Err(Error::ForeignFile { path: shown(), why: "keystore has no index key".into() });
        };
        let index_key = cipher::open(&master, Binding::IndexKey, &wrapped).map_err(|_| Error::WrongMasterKey)?;
        let index_key = Key::from_bytes(&index_key)?;
        sqlite::configure(&conn, SyncMode::Full)?;
        conn.execute_batch(&format!("{ADDED_TABLES} PRAGMA user_version = {FORMAT_VERSION};"))
            .map_err(Error::storage("upgrade keystore"))?;
        Ok(Keystore::assemble(path, conn, master, index_key, lock))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key of the keyed hash of ids (compared with the cluster's in cluster mode).
    pub fn index_key(&self) -> &Key {
        &self.index_key
    }

    /// Forgets every cached key and releases the file; every later call fails with `Closed`.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        self.cache.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.pending.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        // Close the file now (removing -wal and -shm), not whenever the store value is
        // dropped: a stopped store must leave its data dir quiet for copies and scans.
        if let Ok(closed) = Connection::open_in_memory() {
            drop(std::mem::replace(&mut *conn, closed));
        }
        drop(conn);
        if let Some(lock) = self.lock.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = lock.unlock();
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// The keyed hash that stands for an entity id in the keystore and in tombstones.
    pub fn index(&self, entity_id: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(self.index_key.as_bytes(), entity_id).as_bytes()
    }

    /// Whether the entity's data key is in memory (no keystore read needed).
    pub fn is_cached(&self, entity_id: &[u8]) -> bool {
        self.cached(&self.index(entity_id)).is_some()
    }

    fn cached(&self, index: &[u8; 32]) -> Option<Key> {
        if let Some(k) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(index) {
            return Some(k.clone());
        }
        self.pending.read().unwrap_or_else(|p| p.into_inner()).get(index).map(|p| p.key.clone())
    }

    fn remember(&self, index: [u8; 32], key: Key) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_CAP {
            cache.clear();
        }
        cache.insert(index, key);
    }

    /// A pool key from its row (`Binding::PoolKey`).
    fn open_pool_key(master: &Key, slot: u64, wrapped: &[u8]) -> Result<Key> {
        let bytes = cipher::open(master, Binding::PoolKey { slot }, wrapped)
            .map_err(|why| Error::Corrupt { seq: 0, why: format!("pool key in keystore: {why}") })?;
        Key::from_bytes(&bytes)
    }

    fn unwrap_row(&self, index: &[u8; 32], wrapped: &[u8]) -> Result<Key> {
        let master = self.master.read().unwrap_or_else(|p| p.into_inner());
        let bytes = cipher::open(&master, Binding::DataKey { index }, wrapped)
            .map_err(|why| Error::Corrupt { seq: 0, why: format!("data key in keystore: {why}") })?;
        Key::from_bytes(&bytes)
    }

    /// The data key of an entity, or `None` if it has none (never written, or erased).
    pub fn get(&self, entity_id: &[u8]) -> Result<Option<Key>> {
        self.get_by_index(&self.index(entity_id))
    }

    /// `get` by keyed hash.
    pub fn get_by_index(&self, index: &[u8; 32]) -> Result<Option<Key>> {
        self.check_open()?;
        let index = *index;
        if let Some(k) = self.cached(&index) {
            return Ok(Some(k));
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let wrapped: Option<Vec<u8>> = conn
            .prepare_cached("SELECT wrapped FROM keys WHERE idx = ?1")
            .map_err(Error::storage("read data key"))?
            .query_row([&index[..]], |r| r.get(0))
            .optional()
            .map_err(Error::storage("read data key"))?;
        drop(conn);
        match wrapped {
            None => Ok(None),
            Some(w) => {
                let key = self.unwrap_row(&index, &w)?;
                self.remember(index, key.clone());
                Ok(Some(key))
            }
        }
    }

    /// Whether the entity of this keyed hash was erased (a tombstone here).
    pub fn is_erased_index(&self, index: &[u8; 32]) -> Result<bool> {
        self.check_open()?;
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let erased = conn
            .prepare_cached("SELECT 1 FROM erased WHERE idx = ?1")
            .map_err(Error::storage("read keystore tombstone"))?
            .exists([&index[..]])
            .map_err(Error::storage("read keystore tombstone"));
        erased
    }

    /// Records tombstones (keyed hashes) of entities erased in the shards, for keystores
    /// that predate this table; idempotent.
    pub fn record_erased(&self, indexes: &[[u8; 32]]) -> Result<()> {
        self.check_open()?;
        if indexes.is_empty() {
            return Ok(());
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("record keystore tombstones"))?;
        let result = (|| -> Result<()> {
            let mut insert = conn
                .prepare_cached("INSERT OR IGNORE INTO erased(idx, ts) VALUES (?1, ?2)")
                .map_err(Error::storage("record keystore tombstones"))?;
            for index in indexes {
                insert
                    .execute(params![&index[..], clock::now_us()])
                    .map_err(Error::storage("record keystore tombstones"))?;
            }
            Ok(())
        })();
        match result.and_then(|_| conn.execute_batch("COMMIT").map_err(Error::storage("record keystore tombstones"))) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// The data keys of `entity_ids`, creating the missing ones in one durable transaction.
    /// No key is created for an erased entity (a tombstone here): it stays keyless.
    pub fn ensure<'a>(&self, entity_ids: impl IntoIterator<Item = &'a [u8]>) -> Result<()> {
        self.check_open()?;
        let missing: Vec<[u8; 32]> =
            entity_ids.into_iter().map(|id| self.index(id)).filter(|i| self.cached(i).is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // A writer may have given one of them a pool key meanwhile (`assign` holds `conn`).
        let missing: Vec<[u8; 32]> = {
            let pending = self.pending.read().unwrap_or_else(|p| p.into_inner());
            missing.into_iter().filter(|i| !pending.contains_key(i)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        conn.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("create data keys"))?;
        let mut found = Vec::with_capacity(missing.len());
        let result = (|| -> Result<()> {
            let master = self.master.read().unwrap_or_else(|p| p.into_inner());
            let mut select = conn
                .prepare_cached("SELECT wrapped FROM keys WHERE idx = ?1")
                .map_err(Error::storage("create data keys"))?;
            let mut insert = conn
                .prepare_cached("INSERT INTO keys(idx, wrapped, created) VALUES (?1, ?2, ?3)")
                .map_err(Error::storage("create data keys"))?;
            let mut erased = conn
                .prepare_cached("SELECT 1 FROM erased WHERE idx = ?1")
                .map_err(Error::storage("create data keys"))?;
            for index in &missing {
                if erased.exists([&index[..]]).map_err(Error::storage("create data keys"))? {
                    continue;
                }
                let existing: Option<Vec<u8>> = select
                    .query_row([&index[..]], |r| r.get(0))
                    .optional()
                    .map_err(Error::storage("create data keys"))?;
                let key = match existing {
                    Some(w) => {
                        let bytes = cipher::open(&master, Binding::DataKey { index }, &w)
                            .map_err(|why| Error::Corrupt { seq: 0, why: format!("data key in keystore: {why}") })?;
                        Key::from_bytes(&bytes)?
                    }
                    None => {
                        let key = Key::random()?;
                        let wrapped = cipher::seal(&master, Binding::DataKey { index }, key.as_bytes());
                        insert
                            .execute(params![&index[..], wrapped, clock::now_us()])
                            .map_err(Error::storage("create data keys"))?;
                        key
                    }
                };
                found.push((*index, key));
            }
            Ok(())
        })();
        match result.and_then(|_| conn.execute_batch("COMMIT").map_err(Error::storage("commit data keys"))) {
            Ok(()) => {
                drop(conn);
                for (index, key) in found {
                    self.remember(index, key);
                }
                Ok(())
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Gives data keys to the entities among `entity_ids` that have none, from shard
    /// `shard`'s pool of pre-created keys, without writing anything here: the caller must
    /// record the returned claims in the same shard transaction as the first events sealed
    /// with them, or hand them back with `unassign` if that transaction fails. Entities with
    /// a key (in memory or here) keep it; erased ones (a tombstone here) get none. The pool
    /// is refilled, `POOL_REFILL` keys or as many as needed, in one durable transaction.
    pub fn assign<'a>(&self, shard: u32, entity_ids: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Claim>> {
        self.check_open()?;
        let mut wanted: Vec<[u8; 32]> = Vec::new();
        for id in entity_ids {
            let index = self.index(id);
            if self.cached(&index).is_none() && !wanted.contains(&index) {
                wanted.push(index);
            }
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        // Held until the claims are in `pending`, so that `ensure` (another thread) sees
        // either the keys made here or none: an entity never gets two keys.
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // Those with a key or a tombstone here are not new.
        let mut fresh = Vec::with_capacity(wanted.len());
        {
            let mut select = conn
                .prepare_cached("SELECT wrapped FROM keys WHERE idx = ?1")
                .map_err(Error::storage("find data key"))?;
            let mut erased =
                conn.prepare_cached("SELECT 1 FROM erased WHERE idx = ?1").map_err(Error::storage("find data key"))?;
            for index in wanted {
                if erased.exists([&index[..]]).map_err(Error::storage("find data key"))? {
                    continue;
                }
                let existing: Option<Vec<u8>> =
                    select.query_row([&index[..]], |r| r.get(0)).optional().map_err(Error::storage("find data key"))?;
                match existing {
                    Some(w) => {
                        let key = self.unwrap_row(&index, &w)?;
                        self.remember(index, key);
                    }
                    None => fresh.push(index),
                }
            }
        }
        if fresh.is_empty() {
            return Ok(Vec::new());
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = match pools.entry(shard) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.load_pool(&conn, shard)?),
        };
        if pool.len() < fresh.len() {
            let more = self.refill(&conn, shard, POOL_REFILL.max(fresh.len() - pool.len()))?;
            // Popped from the end: the keys already free go first.
            let old = std::mem::replace(pool, more);
            pool.extend(old);
        }
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        let mut claims = Vec::with_capacity(fresh.len());
        for index in fresh {
            let (slot, key) = pool.pop().expect("pool refilled above");
            pending.insert(index, Pending { shard, slot, key });
            claims.push((slot, index));
        }
        Ok(claims)
    }

    /// Hands claims back to their pool (the shard transaction that was to record them
    /// failed): their keys were never used by anything durable.
    pub fn unassign(&self, shard: u32, claims: &[Claim]) {
        // Lock order everywhere: conn, pools, pending.
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        let pool = pools.entry(shard).or_default();
        for (slot, index) in claims {
            if let Some(p) = pending.remove(index) {
                debug_assert_eq!(p.slot, *slot);
                pool.push((p.slot, p.key));
            }
        }
    }

    /// Moves every claim of `shard` from its pool row into `keys`, in one durable
    /// transaction. Returns the slots whose claims the shard may now delete. Only the
    /// shard's writer calls it (between its transactions, so every claim is committed).
    pub fn settle(&self, shard: u32) -> Result<Vec<u64>> {
        self.check_open()?;
        let mine: Vec<([u8; 32], Pending)> = self
            .pending
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, p)| p.shard == shard)
            .map(|(i, p)| (*i, p.clone()))
            .collect();
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        {
            let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let master = self.master.read().unwrap_or_else(|p| p.into_inner());
            // Rolled back when dropped uncommitted.
            let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)
                .map_err(Error::storage("settle data keys"))?;
            let mut insert = tx
                .prepare_cached("INSERT OR REPLACE INTO keys(idx, wrapped, created) VALUES (?1, ?2, ?3)")
                .map_err(Error::storage("settle data keys"))?;
            let mut delete =
                tx.prepare_cached("DELETE FROM pool WHERE slot = ?1").map_err(Error::storage("settle data keys"))?;
            for (index, p) in &mine {
                let wrapped = cipher::seal(&master, Binding::DataKey { index }, p.key.as_bytes());
                insert
                    .execute(params![&index[..], wrapped, clock::now_us()])
                    .map_err(Error::storage("settle data keys"))?;
                delete.execute([p.slot as i64]).map_err(Error::storage("settle data keys"))?;
            }
            drop((insert, delete));
            tx.commit().map_err(Error::storage("settle data keys"))?;
        }
        let mut pending = self.pending.write().unwrap_or_else(|p| p.into_inner());
        let mut slots = Vec::with_capacity(mine.len());
        for (index, p) in mine {
            // Still the same claim (not destroyed meanwhile: the writer is the only caller
            // of both for its shard).
            if pending.get(&index).is_some_and(|q| q.slot == p.slot) {
                pending.remove(&index);
            }
            self.remember(index, p.key);
            slots.push(p.slot);
        }
        Ok(slots)
    }

    /// After a crash: settles the claims a shard recorded (with whether the shard holds a
    /// tombstone of the claimed entity) before its writer gives out anything. A claim whose
    /// key is already in `keys` only loses its pool row if one is left; an erased entity's
    /// pool key is destroyed (and its tombstone recorded here); the rest move into `keys`.
    /// A claim whose key is in neither place is an error: events sealed with it exist.
    pub fn recover_claims(&self, claims: &[(u64, [u8; 32], bool)]) -> Result<()> {
        self.check_open()?;
        if claims.is_empty() {
            return Ok(());
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let master = self.master.read().unwrap_or_else(|p| p.into_inner());
        // Rolled back when dropped uncommitted.
        let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)
            .map_err(Error::storage("recover data keys"))?;
        let mut destroyed = false;
        for (slot, index, erased_in_shard) in claims {
            let has_row = |sql: &str| {
                tx.prepare_cached(sql)
                    .and_then(|mut st| st.exists([&index[..]]))
                    .map_err(Error::storage("recover data keys"))
            };
            let erased = *erased_in_shard || has_row("SELECT 1 FROM erased WHERE idx = ?1")?;
            let has_key = has_row("SELECT 1 FROM keys WHERE idx = ?1")?;
            let pooled: Option<Vec<u8>> = tx
                .prepare_cached("SELECT wrapped FROM pool WHERE slot = ?1")
                .and_then(|mut st| st.query_row([*slot as i64], |r| r.get(0)).optional())
                .map_err(Error::storage("recover data keys"))?;
            if erased {
                tx.execute("DELETE FROM keys WHERE idx = ?1", [&index[..]])
                    .map_err(Error::storage("recover data keys"))?;
                tx.execute(
                    "INSERT OR IGNORE INTO erased(idx, ts) VALUES (?1, ?2)",
                    params![&index[..], clock::now_us()],
                )
                .map_err(Error::storage("recover data keys"))?;
                destroyed = true;
            } else if let (false, Some(wrapped)) = (has_key, &pooled) {
                let key = Keystore::open_pool_key(&master, *slot, wrapped)?;
                tx.execute(
                    "INSERT INTO keys(idx, wrapped, created) VALUES (?1, ?2, ?3)",
                    params![
                        &index[..],
                        cipher::seal(&master, Binding::DataKey { index }, key.as_bytes()),
                        clock::now_us()
                    ],
                )
                .map_err(Error::storage("recover data keys"))?;
            } else if !has_key {
                return Err(Error::Corrupt {
                    seq: 0,
                    why: format!("a shard claims pool key {slot}, which the keystore no longer has"),
                });
            }
            if pooled.is_some() {
                tx.execute("DELETE FROM pool WHERE slot = ?1", [*slot as i64])
                    .map_err(Error::storage("recover data keys"))?;
            }
        }
        tx.commit().map_err(Error::storage("recover data keys"))?;
        drop(master);
        if destroyed {
            sqlite::truncate_wal(&conn, "keystore checkpoint")?;
        }
        Ok(())
    }

    /// The free pre-created keys of `shard` (every pool row of it: the shard's claims were
    /// recovered when its writer opened).
    fn load_pool(&self, conn: &Connection, shard: u32) -> Result<Vec<(u64, Key)>> {
        let rows: Vec<(i64, Vec<u8>)> = conn
            .prepare_cached("SELECT slot, wrapped FROM pool WHERE shard = ?1 ORDER BY slot DESC")
            .and_then(|mut st| st.query_map([shard], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(Error::storage("read key pool"))?;
        let master = self.master.read().unwrap_or_else(|p| p.into_inner());
        rows.into_iter()
            .map(|(slot, wrapped)| Ok((slot as u64, Keystore::open_pool_key(&master, slot as u64, &wrapped)?)))
            .collect()
    }

    /// Creates `n` keys for `shard`'s pool in one durable transaction; returns them, the
    /// highest slot first (popped last).
    fn refill(&self, conn: &Connection, shard: u32, n: usize) -> Result<Vec<(u64, Key)>> {
        let master = self.master.read().unwrap_or_else(|p| p.into_inner());
        // Rolled back when dropped uncommitted.
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .map_err(Error::storage("create data keys"))?;
        // Slots are never reused: the last slot ever made is kept in meta (every pool row
        // is made here, so it is also at least the highest slot in the pool).
        let mut next = tx
            .query_row("SELECT value FROM meta WHERE key = 'pool_next'", [], |r| r.get::<_, i64>(0))
            .optional()
            .map_err(Error::storage("create data keys"))?
            .unwrap_or(0) as u64;
        let mut out = Vec::with_capacity(n);
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO pool(slot, shard, wrapped) VALUES (?1, ?2, ?3)")
                .map_err(Error::storage("create data keys"))?;
            for _ in 0..n {
                next += 1;
                let key = Key::random()?;
                let wrapped = cipher::seal(&master, Binding::PoolKey { slot: next }, key.as_bytes());
                insert.execute(params![next as i64, shard, wrapped]).map_err(Error::storage("create data keys"))?;
                out.push((next, key));
            }
        }
        tx.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('pool_next', ?1)", [next as i64])
            .map_err(Error::storage("create data keys"))?;
        tx.commit().map_err(Error::storage("commit data keys"))?;
        out.reverse();
        Ok(out)
    }

    /// Cluster mode, on a shard's leader: the key to seal an entity's events with. A key in
    /// the keystore comes back with `None`; otherwise a new random key comes back with its
    /// wrapped form, to travel in the replicated command that every replica (this one too)
    /// installs when it applies it (`install`). Nothing is written here. `Erased` for an
    /// erased entity.
    pub fn prepare_key(&self, entity_id: &[u8]) -> Result<(Key, Option<Vec<u8>>)> {
        let index = self.index(entity_id);
        if let Some(key) = self.get_by_index(&index)? {
            return Ok((key, None));
        }
        if self.is_erased_index(&index)? {
            return Err(Error::Erased);
        }
        let key = Key::random()?;
        let master = self.master.read().unwrap_or_else(|p| p.into_inner());
        let wrapped = cipher::seal(&master, Binding::DataKey { index: &index }, key.as_bytes());
        Ok((key, Some(wrapped)))
    }

    /// Cluster mode, on every replica: installs data keys that replicated commands carry,
    /// in one durable transaction, before the shard transaction that uses them. For each
    /// `(index, wrapped)`: `Ok(true)` if the keystore now holds exactly that key (installed
    /// or already there), `Ok(false)` if it holds another one (the command was prepared
    /// against a stale view and must not be applied), `Err(Erased)` for an erased entity.
    pub fn install(&self, keys: &[([u8; 32], Vec<u8>)]) -> Result<Vec<Result<bool>>> {
        self.check_open()?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("install data keys"))?;
        let mut installed = Vec::new();
        let result = (|| -> Result<Vec<Result<bool>>> {
            let master = self.master.read().unwrap_or_else(|p| p.into_inner());
            let mut select = conn
                .prepare_cached("SELECT wrapped FROM keys WHERE idx = ?1")
                .map_err(Error::storage("install data keys"))?;
            let mut insert = conn
                .prepare_cached("INSERT INTO keys(idx, wrapped, created) VALUES (?1, ?2, ?3)")
                .map_err(Error::storage("install data keys"))?;
            let mut erased = conn
                .prepare_cached("SELECT 1 FROM erased WHERE idx = ?1")
                .map_err(Error::storage("install data keys"))?;
            let mut out = Vec::with_capacity(keys.len());
            for (index, wrapped) in keys {
                if erased.exists([&index[..]]).map_err(Error::storage("install data keys"))? {
                    out.push(Err(Error::Erased));
                    continue;
                }
                let existing: Option<Vec<u8>> = select
                    .query_row([&index[..]], |r| r.get(0))
                    .optional()
                    .map_err(Error::storage("install data keys"))?;
                match existing {
                    Some(w) => out.push(Ok(&w == wrapped)),
                    None => {
                        let bytes = cipher::open(&master, Binding::DataKey { index }, wrapped)
                            .map_err(|why| Error::Corrupt { seq: 0, why: format!("replicated data key: {why}") })?;
                        insert
                            .execute(params![&index[..], wrapped, clock::now_us()])
                            .map_err(Error::storage("install data keys"))?;
                        installed.push((*index, Key::from_bytes(&bytes)?));
                        out.push(Ok(true));
                    }
                }
            }
            Ok(out)
        })();
        match result
            .and_then(|out| conn.execute_batch("COMMIT").map(|_| out).map_err(Error::storage("install data keys")))
        {
            Ok(out) => {
                drop(conn);
                for (index, key) in installed {
                    self.remember(index, key);
                }
                Ok(out)
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Cluster mode: of these keyed hashes, those erased here (a tombstone).
    pub fn erased_of(&self, indexes: &[[u8; 32]]) -> Result<Vec<[u8; 32]>> {
        let mut out = Vec::new();
        for index in indexes {
            if self.is_erased_index(index)? {
                out.push(*index);
            }
        }
        Ok(out)
    }

    /// Cluster mode: the wrapped keys of these keyed hashes, as stored (those it has), for a
    /// replica that installs a shard copy and lacks them (see `install`).
    pub fn export(&self, indexes: &[[u8; 32]]) -> Result<Vec<([u8; 32], Vec<u8>)>> {
        self.check_open()?;
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut select = conn
            .prepare_cached("SELECT wrapped FROM keys WHERE idx = ?1")
            .map_err(Error::storage("export data keys"))?;
        let mut out = Vec::new();
        for index in indexes {
            let wrapped: Option<Vec<u8>> =
                select.query_row([&index[..]], |r| r.get(0)).optional().map_err(Error::storage("export data keys"))?;
            if let Some(w) = wrapped {
                out.push((*index, w));
            }
        }
        Ok(out)
    }

    /// The keyed hashes among `indexes` that have neither a key nor a tombstone here.
    pub fn missing(&self, indexes: &[[u8; 32]]) -> Result<Vec<[u8; 32]>> {
        let mut out = Vec::new();
        for index in indexes {
            if self.get_by_index(index)?.is_none() && !self.is_erased_index(index)? {
                out.push(*index);
            }
        }
        Ok(out)
    }

    /// Cluster mode: deletes the data keys of entities whose shard moved to other nodes
    /// (zeroed by secure_delete, WAL truncated). Unlike `destroy`, no tombstone: the
    /// entities live on elsewhere. Returns how many keys were here.
    pub fn forget(&self, indexes: &[[u8; 32]]) -> Result<u64> {
        self.check_open()?;
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("forget data keys"))?;
        let deleted = (|| -> Result<u64> {
            let mut delete =
                conn.prepare_cached("DELETE FROM keys WHERE idx = ?1").map_err(Error::storage("forget data keys"))?;
            let mut n = 0;
            for index in indexes {
                n += delete.execute([&index[..]]).map_err(Error::storage("forget data keys"))? as u64;
            }
            Ok(n)
        })()
        .and_then(|n| conn.execute_batch("COMMIT").map(|_| n).map_err(Error::storage("forget data keys")));
        let n = match deleted {
            Ok(n) => n,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        for index in indexes {
            cache.remove(index);
        }
        drop(cache);
        sqlite::truncate_wal(&conn, "keystore checkpoint")?;
        Ok(n)
    }

    /// Destroys an entity's data key: the row is deleted (zeroed by secure_delete) and the
    /// WAL truncated. Returns whether a key existed.
    pub fn destroy(&self, entity_id: &[u8]) -> Result<bool> {
        self.destroy_index(&self.index(entity_id))
    }

    /// `destroy` by keyed hash (used to finish erasures after a crash).
    pub fn destroy_index(&self, index: &[u8; 32]) -> Result<bool> {
        self.check_open()?;
        let index = *index;
        // A key claimed but not settled lives in its pool row.
        let pending = self.pending.read().unwrap_or_else(|p| p.into_inner()).get(&index).map(|p| p.slot);
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("destroy data key"))?;
        let deleted = (|| -> Result<usize> {
            let mut n = conn
                .execute("DELETE FROM keys WHERE idx = ?1", [&index[..]])
                .map_err(Error::storage("destroy data key"))?;
            if let Some(slot) = pending {
                n += conn
                    .execute("DELETE FROM pool WHERE slot = ?1", [slot as i64])
                    .map_err(Error::storage("destroy data key"))?;
            }
            conn.execute("INSERT OR IGNORE INTO erased(idx, ts) VALUES (?1, ?2)", params![&index[..], clock::now_us()])
                .map_err(Error::storage("destroy data key"))?;
            Ok(n)
        })()
        .and_then(|n| conn.execute_batch("COMMIT").map(|_| n).map_err(Error::storage("destroy data key")));
        let n = match deleted {
            Ok(n) => n,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        self.cache.write().unwrap_or_else(|p| p.into_inner()).remove(&index);
        self.pending.write().unwrap_or_else(|p| p.into_inner()).remove(&index);
        sqlite::truncate_wal(&conn, "keystore checkpoint")?;
        Ok(n > 0)
    }

    /// Rewraps every data key (and the index key) with `new_master`, in one transaction.
    /// Returns the number of data keys.
    pub fn rotate(&self, new_master: Key) -> Result<u64> {
        self.check_open()?;
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut master = self.master.write().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("rotate master key"))?;
        let result = (|| -> Result<u64> {
            let mut count = 0u64;
            let mut after: Vec<u8> = Vec::new();
            let mut select = conn
                .prepare("SELECT idx, wrapped FROM keys WHERE idx > ?1 ORDER BY idx LIMIT 1000")
                .map_err(Error::storage("rotate master key"))?;
            let mut update = conn
                .prepare("UPDATE keys SET wrapped = ?2 WHERE idx = ?1")
                .map_err(Error::storage("rotate master key"))?;
            loop {
                let rows: Vec<(Vec<u8>, Vec<u8>)> = select
                    .query_map([&after], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(Error::storage("rotate master key"))?
                    .collect::<rusqlite::Result<_>>()
                    .map_err(Error::storage("rotate master key"))?;
                let Some(last) = rows.last() else { break };
                after = last.0.clone();
                for (idx, wrapped) in &rows {
                    let index: [u8; 32] = idx
                        .as_slice()
                        .try_into()
                        .map_err(|_| Error::Corrupt { seq: 0, why: "keystore index of wrong length".into() })?;
                    let key = cipher::open(&master, Binding::DataKey { index: &index }, wrapped)
                        .map_err(|why| Error::Corrupt { seq: 0, why: format!("data key in keystore: {why}") })?;
                    let rewrapped = cipher::seal(&new_master, Binding::DataKey { index: &index }, &key);
                    update.execute(params![idx, rewrapped]).map_err(Error::storage("rotate master key"))?;
                    count += 1;
                }
            }
            // Pre-created keys are rewrapped too (a few hundred per shard at most).
            let pool: Vec<(i64, Vec<u8>)> = conn
                .prepare("SELECT slot, wrapped FROM pool")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(Error::storage("rotate master key"))?;
            for (slot, wrapped) in pool {
                let key = Keystore::open_pool_key(&master, slot as u64, &wrapped)?;
                let binding = Binding::PoolKey { slot: slot as u64 };
                conn.execute(
                    "UPDATE pool SET wrapped = ?2 WHERE slot = ?1",
                    params![slot, cipher::seal(&new_master, binding, key.as_bytes())],
                )
                .map_err(Error::storage("rotate master key"))?;
            }
            let wrapped_index = cipher::seal(&new_master, Binding::IndexKey, self.index_key.as_bytes());
            conn.execute("UPDATE meta SET value = ?1 WHERE key = 'index_key'", [wrapped_index])
                .map_err(Error::storage("rotate master key"))?;
            Ok(count)
        })();
        match result {
            Ok(count) => {
                conn.execute_batch("COMMIT").map_err(Error::storage("rotate master key"))?;
                *master = new_master;
                // Claimed keys not yet settled are data keys too (rewrapped in the pool).
                let count = count + self.pending.read().unwrap_or_else(|p| p.into_inner()).len() as u64;
                // The old wrapped keys must not linger in the WAL.
                sqlite::truncate_wal(&conn, "keystore checkpoint")?;
                Ok(count)
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_found_again_and_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kuma");
        let master = Key::random().unwrap();
        let ks = Keystore::create(&path, master.clone(), "s1", 0o600).unwrap();
        assert!(ks.get(b"alice").unwrap().is_none());
        ks.ensure([&b"alice"[..], &b"bob"[..]]).unwrap();
        let a = ks.get(b"alice").unwrap().unwrap();
        ks.ensure([&b"alice"[..]]).unwrap();
        assert_eq!(ks.get(b"alice").unwrap().unwrap().as_bytes(), a.as_bytes());
        drop(ks);
        let ks = Keystore::open(&path, master.clone(), "s1").unwrap();
        assert_eq!(ks.get(b"alice").unwrap().unwrap().as_bytes(), a.as_bytes());
        assert!(ks.destroy(b"alice").unwrap());
        assert!(ks.get(b"alice").unwrap().is_none());
        assert!(!ks.destroy(b"alice").unwrap());
        assert!(ks.get(b"bob").unwrap().is_some());
        // Neither the id nor the data key appears in the file.
        drop(ks);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(5).any(|w| w == b"alice"));
        assert!(!bytes.windows(32).any(|w| w == a.as_bytes()));
    }

    #[test]
    fn wrong_master_key_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kuma");
        let master = Key::random().unwrap();
        drop(Keystore::create(&path, master.clone(), "s1", 0o600).unwrap());
        assert!(matches!(Keystore::open(&path, Key::random().unwrap(), "s1"), Err(Error::WrongMasterKey)));
        assert!(matches!(Keystore::open(&path, master.clone(), "other"), Err(Error::ForeignFile { .. })));
        assert!(matches!(
            Keystore::open(&dir.path().join("none.kuma"), master.clone(), "s1"),
            Err(Error::MissingKeystore { .. })
        ));
        let ks = Keystore::open(&path, master.clone(), "s1").unwrap();
        assert!(matches!(Keystore::open(&path, master, "s1"), Err(Error::Locked { .. })));
        drop(ks);
    }

    #[test]
    fn rotation_rewraps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kuma");
        let old = Key::random().unwrap();
        let new = Key::random().unwrap();
        let ks = Keystore::create(&path, old.clone(), "s1", 0o600).unwrap();
        let ids: Vec<Vec<u8>> = (0..2500).map(|i| format!("e{i}").into_bytes()).collect();
        ks.ensure(ids.iter().map(|i| i.as_slice())).unwrap();
        let before: Vec<[u8; 32]> = ids.iter().map(|i| *ks.get(i).unwrap().unwrap().as_bytes()).collect();
        assert_eq!(ks.rotate(new.clone()).unwrap(), 2500);
        drop(ks);
        assert!(matches!(Keystore::open(&path, old, "s1"), Err(Error::WrongMasterKey)));
        let ks = Keystore::open(&path, new, "s1").unwrap();
        let after: Vec<[u8; 32]> = ids.iter().map(|i| *ks.get(i).unwrap().unwrap().as_bytes()).collect();
        assert_eq!(before, after);
    }

    fn pool_rows(path: &Path) -> Vec<(i64, i64)> {
        let c = Connection::open(path).unwrap();
        let mut st = c.prepare("SELECT slot, shard FROM pool ORDER BY slot").unwrap();
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<rusqlite::Result<_>>().unwrap();
        rows
    }

    #[test]
    fn pool_keys_are_claimed_without_a_write_and_settled_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kuma");
        let master = Key::random().unwrap();
        let ks = Keystore::create(&path, master.clone(), "s1", 0o600).unwrap();
        let claims = ks.assign(3, [&b"alice"[..], &b"bob"[..], &b"alice"[..]]).unwrap();
        assert_eq!(claims.len(), 2, "one claim per new entity");
        assert_eq!(claims[0].1, ks.index(b"alice"));
        // The pool was filled for shard 3, durably; the claimed keys are found in memory.
        assert_eq!(pool_rows(&path).len(), POOL_REFILL);
        assert!(pool_rows(&path).iter().all(|(_, shard)| *shard == 3));
        let alice = ks.get(b"alice").unwrap().unwrap();
        assert!(ks.is_cached(b"bob"));
        // Claimed again: no new claim.
        assert!(ks.assign(3, [&b"alice"[..]]).unwrap().is_empty());
        // Settling moves them under their entities and out of the pool.
        let mut slots = ks.settle(3).unwrap();
        slots.sort();
        let mut claimed: Vec<u64> = claims.iter().map(|c| c.0).collect();
        claimed.sort();
        assert_eq!(slots, claimed);
        assert_eq!(pool_rows(&path).len(), POOL_REFILL - 2);
        assert!(ks.settle(3).unwrap().is_empty());
        drop(ks);
        let ks = Keystore::open(&path, master.clone(), "s1").unwrap();
        assert_eq!(ks.get(b"alice").unwrap().unwrap().as_bytes(), alice.as_bytes());
        assert!(ks.get(b"bob").unwrap().is_some());
        // The other free keys are given out after a reopen, never the settled ones again.
        let more = ks.assign(3, [&b"carol"[..]]).unwrap();
        assert!(!claimed.contains(&more[0].0));
        // Another shard has its own pool.
        let other = ks.assign(4, [&b"dave"[..]]).unwrap();
        assert_eq!(pool_rows(&path).iter().filter(|(_, shard)| *shard == 4).count(), POOL_REFILL);
        assert!(other[0].0 > more[0].0);
    }

    #[test]
    fn claims_left_by_a_crash_are_recovered_from_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kuma");
        let master = Key::random().unwrap();
        let ks = Keystore::create(&path, master.clone(), "s1", 0o600).unwrap();
        let claims = ks.assign(0, [&b"alice"[..], &b"gone"[..]]).unwrap();
        let alice = ks.get(b"alice").unwrap().unwrap();
        // A crash: nothing settled, the claims only in the shard.
        drop(ks);
        let ks = Keystore::open(&path, master.clone(), "s1").unwrap();
        assert!(ks.get(b"alice").unwrap().is_none(), "claimed keys are not under their entities yet");
        let erased_in_shard = |i: &[u8; 32]| *i == ks.index(b"gone");
        let recovered: Vec<(u64, [u8; 32], bool)> =
            claims.iter().map(|(slot, idx)| (*slot, *idx, erased_in_shard(idx))).collect();
        ks.recover_claims(&recovered).unwrap();
        assert_eq!(ks.get(b"alice").unwrap().unwrap().as_bytes(), alice.as_bytes());
        // The erased one lost its key for good and stays keyless.
        assert!(ks.get(b"gone").unwrap().is_none());
        assert!(ks.is_erased_index(&ks.index(b"gone")).unwrap());
        assert!(ks.assign(0, [&b"gone"[..]]).unwrap().is_empty());
        let slots: Vec<i64> = pool_rows(&path).iter().map(|r| r.0).collect();
        assert!(claims.iter().all(|(slot, _)| !slots.contains(&(*slot as i64))));
        // Recovering again (a crash before the shard deleted its claims) changes nothing.
        ks.recover_claims(&recovered).unwrap();
        assert_eq!(ks.get(b"alice").unwrap().unwrap().as_bytes(), alice.as_bytes());
        // A claim whose key is nowhere is refused: events sealed with it would be lost.
        let lost = [(9_999_999u64, ks.index(b"nobody"), false)];
        assert!(matches!(ks.recover_claims(&lost), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn unassigned_claims_return_and_destroyed_claims_leave_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kuma");
        let master = Key::random().unwrap();
        let ks = Keystore::create(&path, master.clone(), "s1", 0o600).unwrap();
        let first = ks.assign(1, [&b"a"[..]]).unwrap();
        let key = ks.get(b"a").unwrap().unwrap();
        ks.unassign(1, &first);
        assert!(ks.get(b"a").unwrap().is_none());
        // The same pool key goes to the next new entity.
        let again = ks.assign(1, [&b"b"[..]]).unwrap();
        assert_eq!(again[0].0, first[0].0);
        assert_eq!(ks.get(b"b").unwrap().unwrap().as_bytes(), key.as_bytes());
        // Destroying a claimed key deletes its pool row at once.
        assert!(ks.destroy(b"b").unwrap());
        assert!(ks.get(b"b").unwrap().is_none());
        assert!(!pool_rows(&path).iter().any(|r| r.0 == again[0].0 as i64));
        assert!(ks.settle(1).unwrap().is_empty());
        assert!(ks.assign(1, [&b"b"[..]]).unwrap().is_empty(), "erased: never a key again");
        // `ensure` from another caller does not give a claimed entity a second key.
        ks.assign(1, [&b"c"[..]]).unwrap();
        let c = ks.get(b"c").unwrap().unwrap();
        ks.ensure([&b"c"[..]]).unwrap();
        ks.settle(1).unwrap();
        drop(ks);
        let ks = Keystore::open(&path, master, "s1").unwrap();
        assert_eq!(ks.get(b"c").unwrap().unwrap().as_bytes(), c.as_bytes());
    }

    #[test]
    fn rotation_rewraps_the_pool_and_claimed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.kuma");
        let old = Key::random().unwrap();
        let new = Key::random().unwrap();
        let ks = Keystore::create(&path, old.clone(), "s1", 0o600).unwrap();
        let claims = ks.assign(0, [&b"claimed"[..]]).unwrap();
        let claimed = ks.get(b"claimed").unwrap().unwrap();
        ks.ensure([&b"plain"[..]]).unwrap();
        assert_eq!(ks.rotate(new.clone()).unwrap(), 2);
        drop(ks);
        let ks = Keystore::open(&path, new, "s1").unwrap();
        ks.recover_claims(&[(claims[0].0, claims[0].1, false)]).unwrap();
        assert_eq!(ks.get(b"claimed").unwrap().unwrap().as_bytes(), claimed.as_bytes());
        // The free pool keys open under the new master key too.
        assert_eq!(ks.assign(0, [&b"next"[..]]).unwrap().len(), 1);
    }
}
