//! One shard = one SQLite file in WAL mode. This module owns its schema and the checks made
//! when it is opened (connection settings: `sqlite.rs`). Layout and reasoning: docs/storage-format.md.

use crate::error::{Error, Result};
use crate::sqlite::{self, SyncMode};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};

/// `PRAGMA application_id` of every Kuma shard: "KUMA" in ASCII. A SQLite file without it
/// is not ours and is never written to.
pub const APPLICATION_ID: i64 = 0x4B55_4D41;
/// `PRAGMA user_version`: the shard format version this build reads and writes.
/// 2: events.scope and the query indexes. 3: entities are found by a keyed hash of their id
/// and store the id sealed; snapshots are a rowid table. 4: `key_claims`. 5: `purges`.
pub const FORMAT_VERSION: u32 = 5;
/// Every `SKIP_EVERY`-th event of an entity gets a row in `skips`.
pub const SKIP_EVERY: u64 = 64;

/// The shard schema. Events are append-only by position; per-entity order is kept by
/// back-pointers (`prev_pos`) and a sparse `skips` index, and entity heads are checkpointed
/// into `entities` lazily (see docs/storage-format.md for why).
///
/// No entity id is stored in clear in an encrypted store: an entity is found by `idx`, the
/// keyed hash of its id (the key of tombstones and of the keystore too), and its id is kept
/// sealed under its own data key (`id_sealed`), for reads across entities. SQLite moves
/// cells between pages as b-trees grow and leaves stale copies in free space that
/// `secure_delete` never sees; this way no copy of an erased entity's id, wherever it
/// lingers, can be read. Snapshots are a rowid table for the same reason: rows appended in
/// order, not inserted into the middle of a b-tree whose pages then split.
pub const SCHEMA: &str = "
CREATE TABLE meta (
  key   TEXT PRIMARY KEY NOT NULL,
  value ANY
) WITHOUT ROWID;
CREATE TABLE entities (
  eid       INTEGER PRIMARY KEY,
  idx       BLOB NOT NULL UNIQUE,   -- keyed hash of the entity id
  id_sealed BLOB NOT NULL,          -- the id, sealed under the entity's key (the id in plain stores)
  head_seq  INTEGER NOT NULL,
  head_pos  INTEGER NOT NULL,
  head_ts   INTEGER NOT NULL,
  head_hash BLOB NOT NULL
);
CREATE TABLE events (
  pos      INTEGER PRIMARY KEY,
  eid      INTEGER NOT NULL,
  seq      INTEGER NOT NULL,
  prev_pos INTEGER NOT NULL,
  ts       INTEGER NOT NULL,
  type     TEXT NOT NULL,
  meta     BLOB NOT NULL,
  payload  BLOB NOT NULL,
  hash     BLOB NOT NULL,
  scope    TEXT
);
CREATE TABLE skips (
  eid INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  pos INTEGER NOT NULL,
  ts  INTEGER NOT NULL,
  PRIMARY KEY (eid, seq)
) WITHOUT ROWID;
CREATE TABLE tombstones (
  idx           BLOB PRIMARY KEY NOT NULL,  -- keyed hash of an erased entity id
  ts            INTEGER NOT NULL,
  key_destroyed INTEGER NOT NULL            -- 1 once the keystore no longer has its key
) WITHOUT ROWID;
CREATE TABLE snapshots (
  sid     INTEGER PRIMARY KEY,
  eid     INTEGER NOT NULL,
  seq     INTEGER NOT NULL,
  version INTEGER NOT NULL,
  ts      INTEGER NOT NULL,
  hash    BLOB NOT NULL,
  data    BLOB NOT NULL
);
CREATE UNIQUE INDEX snapshots_by_entity ON snapshots(eid, seq);
";

/// Format 4: pre-created data keys given to new entities, recorded in the transaction of
/// their first events and deleted once the keystore holds them under the entity (see
/// keystore.rs). Empty in plain and cluster stores. Part of every new shard; added to
/// format-3 shards on open.
const KEY_CLAIMS: &str = "
CREATE TABLE IF NOT EXISTS key_claims (
  slot INTEGER PRIMARY KEY,           -- the keystore pool slot whose key this entity got
  idx  BLOB NOT NULL                  -- keyed hash of the entity id
);
";

/// Format 5: erased entities whose event rows are still being deleted. An erasure commits
/// its tombstone and deletes the entity's row, snapshots and skips at once; its events are
/// then deleted newest first, following their back-pointers, in small transactions between
/// the shard's other work (so an erasure never holds the writer for long), and a crash
/// resumes from `next_pos`. While a row is here no new entity is given its eid.
const PURGES: &str = "
CREATE TABLE IF NOT EXISTS purges (
  eid      INTEGER PRIMARY KEY,     -- the erased entity's eid
  idx      BLOB NOT NULL,           -- keyed hash of its id
  next_pos INTEGER NOT NULL         -- its newest event not deleted yet
);
";

/// Indexes for queries across entities (format 2). Both are ordered by position after their
/// key, so "events of type T after position P" is a range scan in commit order. The type
/// index leaves out untyped events and the scope index events without a scope, so neither
/// costs an append that cannot be found through it.
pub const QUERY_INDEXES: &str = "
CREATE INDEX events_by_type ON events(type, pos) WHERE type <> '';
CREATE INDEX events_by_scope ON events(scope, pos) WHERE scope IS NOT NULL;
";

/// Identity of a shard, checked against the `meta` table on every open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIdentity {
    pub store_id: String,
    pub index: u32,
    pub count: u32,
}

/// The file name of shard `index`.
pub fn shard_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("{index:03}.kuma"))
}

/// Creates a new, empty shard file (permissions `mode`). Fails if the file already exists.
pub fn create(path: &Path, id: &ShardIdentity, sync: SyncMode, mode: u32) -> Result<Connection> {
    if path.exists() {
        return Err(Error::ForeignFile { path: path.display().to_string(), why: "file already exists".into() });
    }
    let conn = sqlite::open_writer(path, Some(mode), "create shard")?;
    conn.pragma_update(None, "application_id", APPLICATION_ID).map_err(Error::storage("create shard"))?;
    sqlite::configure(&conn, sync)?;
    let init = format!(
        "BEGIN; {SCHEMA} {QUERY_INDEXES} {KEY_CLAIMS} {PURGES}
         INSERT INTO meta(key, value) VALUES ('store_id', '{}'), ('shard_index', {}), ('shard_count', {}),
           ('checkpoint_pos', 0), ('pos_floor', 0);
         PRAGMA user_version = {FORMAT_VERSION};
         COMMIT;",
        id.store_id.replace('\'', ""),
        id.index,
        id.count
    );
    conn.execute_batch(&init).map_err(Error::storage("create shard schema"))?;
    Ok(conn)
}

/// Opens an existing shard and checks that it is the shard `expected` says it is. Format 1
/// is upgraded to 2 here; the upgrade to 3 needs the store's keys (`migrate_to_3`).
/// Returns the connection and the format found.
pub fn open(path: &Path, expected: &ShardIdentity, sync: SyncMode) -> Result<(Connection, u32)> {
    let shown = || path.display().to_string();
    if !path.is_file() {
        return Err(Error::MissingShard { path: shown() });
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| Error::ForeignFile { path: shown(), why: e.to_string() })?;
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| Error::ForeignFile { path: shown(), why: e.to_string() })?;
    if app_id != APPLICATION_ID {
        return Err(Error::ForeignFile {
            path: shown(),
            why: format!("SQLite application_id is {app_id:#x}, not Kuma's {APPLICATION_ID:#x}"),
        });
    }
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| Error::ForeignFile { path: shown(), why: e.to_string() })?;
    if version > FORMAT_VERSION {
        return Err(Error::UnsupportedFormat { found: version, supported: FORMAT_VERSION });
    }
    let found = identity(&conn).map_err(|e| Error::ForeignFile { path: shown(), why: e.to_string() })?;
    if found.store_id != expected.store_id {
        return Err(Error::ForeignFile {
            path: shown(),
            why: format!("belongs to store {}, not {}", found.store_id, expected.store_id),
        });
    }
    if found.count != expected.count {
        return Err(Error::ShardCountMismatch { stored: found.count, given: expected.count });
    }
    if found.index != expected.index {
        return Err(Error::ForeignFile {
            path: shown(),
            why: format!("is shard {}, expected shard {}", found.index, expected.index),
        });
    }
    sqlite::configure(&conn, sync)?;
    if version < 2 {
        migrate_to_2(&conn)?;
    }
    Ok((conn, version.max(2)))
}

/// Format 3 or 4 -> 5: the `key_claims` (4) and `purges` (5) tables, where missing. New
/// tables only: nothing is rewritten.
pub fn migrate_to_5(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!("BEGIN IMMEDIATE; {KEY_CLAIMS} {PURGES} PRAGMA user_version = 5; COMMIT;")).map_err(
        |e| {
            let _ = conn.execute_batch("ROLLBACK");
            Error::storage("upgrade shard to format 5")(e)
        },
    )
}

/// Format 1 -> 2: events get their `scope` column and the two query indexes. Adding a
/// nullable column rewrites nothing; building the indexes reads every event once.
fn migrate_to_2(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; ALTER TABLE events ADD COLUMN scope TEXT; {QUERY_INDEXES} PRAGMA user_version = 2; COMMIT;"
    ))
    .map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        Error::storage("upgrade shard to format 2")(e)
    })
}

/// Format 2 -> 3: entities are rewritten keyed by `idx` with their ids sealed (`seal` gives
/// both for an id), and snapshots become a rowid table. Then the file is vacuumed, so no
/// page of it keeps an id in clear. Runs once, when a format-2 shard is first opened.
pub fn migrate_to_3(conn: &Connection, seal: impl Fn(&[u8]) -> Result<([u8; 32], Vec<u8>)>) -> Result<()> {
    let fail = |e: rusqlite::Error| {
        let _ = conn.execute_batch("ROLLBACK");
        Error::storage("upgrade shard to format 3")(e)
    };
    conn.execute_batch("BEGIN IMMEDIATE").map_err(fail)?;
    let upgrade = || -> Result<()> {
        conn.execute_batch(
            "ALTER TABLE entities RENAME TO entities_v2;
             ALTER TABLE snapshots RENAME TO snapshots_v2;
             CREATE TABLE entities (eid INTEGER PRIMARY KEY, idx BLOB NOT NULL UNIQUE, id_sealed BLOB NOT NULL,
               head_seq INTEGER NOT NULL, head_pos INTEGER NOT NULL, head_ts INTEGER NOT NULL, head_hash BLOB NOT NULL);
             CREATE TABLE snapshots (sid INTEGER PRIMARY KEY, eid INTEGER NOT NULL, seq INTEGER NOT NULL,
               version INTEGER NOT NULL, ts INTEGER NOT NULL, hash BLOB NOT NULL, data BLOB NOT NULL);
             CREATE UNIQUE INDEX snapshots_by_entity ON snapshots(eid, seq);
             INSERT INTO snapshots(eid, seq, version, ts, hash, data)
               SELECT eid, seq, version, ts, hash, data FROM snapshots_v2 ORDER BY eid, seq;
             DROP TABLE snapshots_v2;",
        )
        .map_err(Error::storage("upgrade shard to format 3"))?;
        // (eid, entity_id, head_seq, head_pos, head_ts, head_hash) of every entity.
        type V2Row = (i64, Vec<u8>, i64, i64, i64, Vec<u8>);
        let rows: Vec<V2Row> = conn
            .prepare("SELECT eid, entity_id, head_seq, head_pos, head_ts, head_hash FROM entities_v2")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(Error::storage("upgrade shard to format 3"))?;
        let mut insert = conn
            .prepare("INSERT INTO entities VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
            .map_err(Error::storage("upgrade shard to format 3"))?;
        for (eid, id, seq, pos, ts, hash) in rows {
            let (idx, sealed) = seal(&id)?;
            insert
                .execute(rusqlite::params![eid, &idx[..], sealed, seq, pos, ts, hash])
                .map_err(Error::storage("upgrade shard to format 3"))?;
        }
        conn.execute_batch("DROP TABLE entities_v2; PRAGMA user_version = 3;")
            .map_err(Error::storage("upgrade shard to format 3"))
    };
    if let Err(e) = upgrade() {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e);
    }
    conn.execute_batch("COMMIT").map_err(fail)?;
    conn.execute_batch("VACUUM").map_err(Error::storage("vacuum after upgrade to format 3"))?;
    Ok(())
}

fn identity(conn: &Connection) -> rusqlite::Result<ShardIdentity> {
    Ok(ShardIdentity {
        store_id: meta_get(conn, "store_id")?.unwrap_or_default(),
        index: meta_get(conn, "shard_index")?.unwrap_or(u32::MAX),
        count: meta_get(conn, "shard_count")?.unwrap_or(0),
    })
}

/// Reads one `meta` value.
pub fn meta_get<T: rusqlite::types::FromSql>(conn: &Connection, key: &str) -> rusqlite::Result<Option<T>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(index: u32) -> ShardIdentity {
        ShardIdentity { store_id: "s1".into(), index, count: 4 }
    }

    #[test]
    fn create_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = shard_path(dir.path(), 2);
        drop(create(&p, &ident(2), SyncMode::Normal, 0o600).unwrap());
        let (c, version) = open(&p, &ident(2), SyncMode::Full).unwrap();
        assert_eq!(version, FORMAT_VERSION);
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "FULL");
        assert!(matches!(create(&p, &ident(2), SyncMode::Normal, 0o600), Err(Error::ForeignFile { .. })));
    }

    #[test]
    fn refuses_wrong_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = shard_path(dir.path(), 0);
        assert!(matches!(open(&p, &ident(0), SyncMode::Normal), Err(Error::MissingShard { .. })));

        std::fs::write(&p, b"this is not a database, just some text that is long enough").unwrap();
        assert!(matches!(open(&p, &ident(0), SyncMode::Normal), Err(Error::ForeignFile { .. })));
        std::fs::remove_file(&p).unwrap();

        let other = Connection::open(&p).unwrap();
        other.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);").unwrap();
        drop(other);
        let err = open(&p, &ident(0), SyncMode::Normal).unwrap_err();
        assert!(matches!(err, Error::ForeignFile { ref why, .. } if why.contains("application_id")), "{err}");
        std::fs::remove_file(&p).unwrap();

        drop(create(&p, &ident(0), SyncMode::Normal, 0o600).unwrap());
        assert!(matches!(
            open(&p, &ShardIdentity { count: 8, ..ident(0) }, SyncMode::Normal),
            Err(Error::ShardCountMismatch { stored: 4, given: 8 })
        ));
        assert!(matches!(open(&p, &ident(1), SyncMode::Normal), Err(Error::ForeignFile { .. })));
        assert!(matches!(
            open(&p, &ShardIdentity { store_id: "other".into(), ..ident(0) }, SyncMode::Normal),
            Err(Error::ForeignFile { .. })
        ));
        let c = Connection::open(&p).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(open(&p, &ident(0), SyncMode::Normal), Err(Error::UnsupportedFormat { found: 99, .. })));
    }

    #[test]
    fn format_1_shards_are_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = shard_path(dir.path(), 0);
        drop(create(&p, &ident(0), SyncMode::Normal, 0o600).unwrap());
        // Turn it back into a format-1 shard holding one event.
        let c = Connection::open(&p).unwrap();
        c.execute_batch(
            "DROP INDEX events_by_type; DROP INDEX events_by_scope; ALTER TABLE events DROP COLUMN scope;
             INSERT INTO events(pos, eid, seq, prev_pos, ts, type, meta, payload, hash)
               VALUES (1, 1, 1, 0, 5, 'a', x'', x'01', x'00');
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(c);
        let (c, found) = open(&p, &ident(0), SyncMode::Normal).unwrap();
        let version: u32 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!((found, version), (2, 2));
        let scope: Option<String> = c.query_row("SELECT scope FROM events WHERE pos = 1", [], |r| r.get(0)).unwrap();
        assert_eq!(scope, None);
        let indexes: i64 = c
            .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'events_by_%'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(indexes, 2);
    }

    #[test]
    fn format_2_shards_are_upgraded_to_sealed_ids_leaving_no_id_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = shard_path(dir.path(), 0);
        drop(create(&p, &ident(0), SyncMode::Normal, 0o600).unwrap());
        // A format-2 shard: ids in clear, snapshots keyed by (eid, seq).
        let c = Connection::open(&p).unwrap();
        c.execute_batch(
            "DROP TABLE entities; DROP TABLE snapshots;
             CREATE TABLE entities (eid INTEGER PRIMARY KEY, entity_id BLOB NOT NULL UNIQUE, head_seq INTEGER NOT NULL,
               head_pos INTEGER NOT NULL, head_ts INTEGER NOT NULL, head_hash BLOB NOT NULL);
             CREATE TABLE snapshots (eid INTEGER NOT NULL, seq INTEGER NOT NULL, version INTEGER NOT NULL,
               ts INTEGER NOT NULL, hash BLOB NOT NULL, data BLOB NOT NULL, PRIMARY KEY (eid, seq)) WITHOUT ROWID;
             INSERT INTO entities VALUES (1, CAST('customer-secret-id' AS BLOB), 3, 3, 9, x'aa');
             INSERT INTO snapshots VALUES (1, 2, 1, 9, x'bb', x'cc');
             PRAGMA user_version = 2;",
        )
        .unwrap();
        drop(c);
        let (c, found) = open(&p, &ident(0), SyncMode::Normal).unwrap();
        assert_eq!(found, 2);
        migrate_to_3(&c, |id| Ok(([7u8; 32], id.iter().map(|b| b ^ 0x5a).collect()))).unwrap();
        let version: u32 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 3);
        let (eid, idx, sealed, seq): (i64, Vec<u8>, Vec<u8>, i64) = c
            .query_row("SELECT eid, idx, id_sealed, head_seq FROM entities", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap();
        assert_eq!((eid, idx, seq), (1, vec![7u8; 32], 3));
        assert_eq!(sealed.iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>(), b"customer-secret-id");
        let snap: (i64, i64, Vec<u8>) =
            c.query_row("SELECT eid, seq, data FROM snapshots", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        assert_eq!(snap, (1, 2, vec![0xcc]));
        drop(c);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend(std::fs::read(p.with_extension("kuma-wal")).unwrap_or_default());
        assert!(!bytes.windows(18).any(|w| w == b"customer-secret-id"), "no id in clear is left in the file");
    }
}
