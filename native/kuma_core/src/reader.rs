//! Reads of one entity: its head, its events, its snapshots, its tombstone. These run on
//! reader connections (never the writer's), so they do not delay commits; in the BEAM they
//! run on dirty IO schedulers. Queries across entities: `query.rs`; chain checks:
//! `verify.rs`.
//!
//! Per-entity reads follow the entity's back-pointers: to read seqs `from..=to`, start at
//! the first skip entry at or after `to` (or at the head) and walk `prev_pos` back to `from`,
//! then reverse. Every event is read once, plus fewer than `SKIP_EVERY` extra steps.

use crate::chain::{Chainer, GENESIS};
use crate::codec::StoredEvent;
use crate::error::{Error, Result};
use crate::heads::{hash_from, Head, Heads};
use rusqlite::{params, Connection, OptionalExtension};

/// An entity as reads find it: its id (what events, heads in memory and the hash chain
/// carry) and its keyed hash (how the shard files find it; see shard.rs).
#[derive(Debug, Clone, Copy)]
pub struct Entity<'a> {
    pub id: &'a [u8],
    pub idx: [u8; 32],
}

/// Opens the id a shard stores for an entity (`idx`, `id_sealed`): `Ok(None)` if the entity
/// was erased (its key is gone; only a copy of the files from before its erasure still has
/// its rows). Given by the store, which holds the keys.
pub type IdResolver<'a> = dyn Fn(&[u8; 32], &[u8]) -> Result<Option<Vec<u8>>> + 'a;

/// The head of an entity: from the shared table, else from disk (see heads.rs for why this
/// order is correct).
pub fn head(conn: &Connection, heads: &Heads, entity: &Entity) -> Result<Option<Head>> {
    match heads.get(entity.id) {
        Some(h) => Ok(Some(h)),
        None => head_on_disk(conn, &entity.idx),
    }
}

/// The head persisted in `entities`, by keyed hash; accurate only for entities absent from
/// `Heads`.
pub(crate) fn head_on_disk(conn: &Connection, idx: &[u8; 32]) -> Result<Option<Head>> {
    let h = conn
        .prepare_cached("SELECT eid, head_seq, head_pos, head_ts, head_hash FROM entities WHERE idx = ?1")
        .map_err(Error::storage("read entity head"))?
        .query_row([&idx[..]], |r| {
            Ok(Head {
                eid: r.get(0)?,
                seq: r.get::<_, i64>(1)? as u64,
                pos: r.get::<_, i64>(2)? as u64,
                ts: r.get(3)?,
                hash: hash_from(r.get_ref(4)?.as_blob().unwrap_or(&[])),
            })
        })
        .optional()
        .map_err(Error::storage("read entity head"))?;
    Ok(h.filter(|h| h.seq > 0))
}

pub(crate) struct Row {
    pub(crate) eid: i64,
    seq: u64,
    prev_pos: u64,
    ts: i64,
    event_type: String,
    metadata: Vec<u8>,
    payload: Vec<u8>,
    hash: [u8; 32],
}

const FETCH_SQL: &str = "SELECT eid, seq, prev_pos, ts, type, meta, payload, hash FROM events WHERE pos = ?1";

impl Row {
    /// Reads the first eight columns of `r`, in `FETCH_SQL`'s order.
    pub(crate) fn read(r: &rusqlite::Row) -> rusqlite::Result<Row> {
        Ok(Row {
            eid: r.get(0)?,
            seq: r.get::<_, i64>(1)? as u64,
            prev_pos: r.get::<_, i64>(2)? as u64,
            ts: r.get(3)?,
            event_type: String::from_utf8_lossy(bytes(r.get_ref(4)?)).into_owned(),
            metadata: bytes(r.get_ref(5)?).to_vec(),
            payload: bytes(r.get_ref(6)?).to_vec(),
            hash: hash_from(r.get_ref(7)?.as_blob().unwrap_or(&[])),
        })
    }

    pub(crate) fn into_event(self, shard: u32, entity_id: Vec<u8>, position: u64) -> StoredEvent {
        StoredEvent {
            shard,
            entity_id,
            seq: self.seq,
            position,
            timestamp_us: self.ts,
            event_type: self.event_type,
            metadata: self.metadata,
            payload: self.payload,
            hash: self.hash,
        }
    }
}

/// The bytes of a BLOB or TEXT column (a row altered behind Kuma's back may hold either;
/// the chain check then names it, instead of the read failing with a type error).
pub(crate) fn bytes<'r>(v: rusqlite::types::ValueRef<'r>) -> &'r [u8] {
    match v {
        rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => b,
        _ => &[],
    }
}

fn fetch(stmt: &mut rusqlite::CachedStatement<'_>, pos: u64) -> Result<Option<Row>> {
    stmt.query_row([pos as i64], Row::read).optional().map_err(Error::storage("read event"))
}

/// Reads up to `max` events of one entity starting at `from_seq` (1-based), in order.
pub fn read_entity(
    conn: &Connection,
    heads: &Heads,
    shard: u32,
    entity: &Entity,
    from_seq: u64,
    max: usize,
) -> Result<Vec<StoredEvent>> {
    let from_seq = from_seq.max(1);
    let Some(head) = head(conn, heads, entity)? else {
        return Ok(Vec::new());
    };
    if max == 0 || from_seq > head.seq {
        return Ok(Vec::new());
    }
    let to_seq = head.seq.min(from_seq.saturating_add(max as u64 - 1));
    walk(conn, shard, entity.id, &head, from_seq, to_seq)
}

/// Events `from_seq..=to_seq` of the entity whose head is `head` (stored in `shard`), each
/// checked against the hash chain: every event returned must hash, with its predecessor's
/// stored hash, to its own stored hash, and a read that ends at the head must end on the
/// head's hash. A byte changed behind Kuma's back (a plaintext store has no cipher to catch
/// it) is answered `Error::Corrupt` naming the seq, never read back wrong. The cost is one
/// BLAKE3 per event read and one extra row for the predecessor of `from_seq`.
pub(crate) fn walk(
    conn: &Connection,
    shard: u32,
    entity_id: &[u8],
    head: &Head,
    from_seq: u64,
    to_seq: u64,
) -> Result<Vec<StoredEvent>> {
    let (mut seq, mut pos) = if to_seq == head.seq {
        (head.seq, head.pos)
    } else {
        conn.prepare_cached("SELECT seq, pos FROM skips WHERE eid = ?1 AND seq >= ?2 ORDER BY seq LIMIT 1")
            .map_err(Error::storage("read skip index"))?
            .query_row(params![head.eid, to_seq as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .optional()
            .map_err(Error::storage("read skip index"))?
            .filter(|(s, _)| *s <= head.seq)
            .unwrap_or((head.seq, head.pos))
    };
    let from_head = seq == head.seq;
    // Rows from the start of the walk down to `from_seq`, newest first; those above
    // `to_seq` are passed on the way and neither checked nor returned (a damaged later event
    // does not fail a read of earlier ones).
    let mut rows: Vec<(u64, Row)> = Vec::with_capacity((seq - from_seq + 1) as usize);
    let mut stmt = conn.prepare_cached(FETCH_SQL).map_err(Error::storage("read event"))?;
    let before = loop {
        let row = fetch(&mut stmt, pos)?
            .ok_or_else(|| Error::Corrupt { seq, why: format!("event row at position {pos} is missing") })?;
        if row.eid != head.eid || row.seq != seq {
            return Err(Error::Corrupt {
                seq,
                why: format!(
                    "position {pos} holds seq {} of entity #{}, not this entity's seq {seq}",
                    row.seq, row.eid
                ),
            });
        }
        let prev_pos = row.prev_pos;
        rows.push((pos, row));
        if seq == 1 {
            break GENESIS;
        }
        if prev_pos == 0 || prev_pos >= pos {
            return Err(Error::Corrupt { seq, why: format!("bad back-pointer {prev_pos} at position {pos}") });
        }
        if seq == from_seq {
            break predecessor_hash(conn, head.eid, seq - 1, prev_pos)?;
        }
        pos = prev_pos;
        seq -= 1;
    };
    let mut chainer = Chainer::new();
    let mut prev = before;
    for (_, row) in rows.iter().rev().take_while(|(_, row)| row.seq <= to_seq) {
        let want = chainer.link(&prev, entity_id, row.seq, row.ts, &row.event_type, &row.metadata, &row.payload);
        if want != row.hash {
            return Err(Error::Corrupt { seq: row.seq, why: HASH_MISMATCH.into() });
        }
        prev = want;
    }
    if from_head && to_seq == head.seq && prev != head.hash {
        return Err(Error::Corrupt { seq: head.seq, why: HEAD_MISMATCH.into() });
    }
    Ok(rows
        .into_iter()
        .rev()
        .filter(|(_, row)| row.seq <= to_seq)
        .map(|(pos, row)| row.into_event(shard, entity_id.to_vec(), pos))
        .collect())
}

/// Why a walk refuses an event whose stored hash is not the chain's.
pub(crate) const HASH_MISMATCH: &str = "stored hash does not match the recomputed chain";
/// Why a walk refuses a last event that is not the one the entity's head names.
pub(crate) const HEAD_MISMATCH: &str = "last event does not match the entity head";

/// The stored hash of event `seq` at `pos` (the one before a walk's first event): the link
/// the first event read is checked against.
fn predecessor_hash(conn: &Connection, eid: i64, seq: u64, pos: u64) -> Result<[u8; 32]> {
    conn.prepare_cached("SELECT eid, seq, hash FROM events WHERE pos = ?1")
        .map_err(Error::storage("read event"))?
        .query_row([pos as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64, hash_from(r.get_ref(2)?.as_blob().unwrap_or(&[]))))
        })
        .optional()
        .map_err(Error::storage("read event"))?
        .filter(|(e, s, _)| *e == eid && *s == seq)
        .map(|(_, _, h)| h)
        .ok_or_else(|| Error::Corrupt { seq, why: format!("position {pos} does not hold this entity's seq {seq}") })
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    pub version: u32,
    pub timestamp_us: i64,
    pub hash: [u8; 32],
    pub data: Vec<u8>,
}

/// A row of `SELECT seq, version, ts, hash, data FROM snapshots`.
fn snapshot_row(r: &rusqlite::Row) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        seq: r.get::<_, i64>(0)? as u64,
        version: r.get(1)?,
        timestamp_us: r.get(2)?,
        hash: hash_from(r.get_ref(3)?.as_blob().unwrap_or(&[])),
        data: r.get(4)?,
    })
}

/// The latest snapshot of an entity with this `version` and `seq <= max_seq`.
pub fn latest_snapshot(
    conn: &Connection,
    heads: &Heads,
    entity: &Entity,
    version: u32,
    max_seq: u64,
) -> Result<Option<Snapshot>> {
    let Some(head) = head(conn, heads, entity)? else {
        return Ok(None);
    };
    conn.prepare_cached(
        "SELECT seq, version, ts, hash, data FROM snapshots
         WHERE eid = ?1 AND seq <= ?2 AND version = ?3 ORDER BY seq DESC LIMIT 1",
    )
    .map_err(Error::storage("read snapshot"))?
    .query_row(params![head.eid, max_seq.min(head.seq) as i64, version], snapshot_row)
    .optional()
    .map_err(Error::storage("read snapshot"))
}

/// Every snapshot of an entity, oldest first (data as stored).
pub fn list_snapshots(conn: &Connection, heads: &Heads, entity: &Entity) -> Result<Vec<Snapshot>> {
    let Some(head) = head(conn, heads, entity)? else {
        return Ok(Vec::new());
    };
    let mut st = conn
        .prepare_cached("SELECT seq, version, ts, hash, data FROM snapshots WHERE eid = ?1 ORDER BY seq")
        .map_err(Error::storage("read snapshots"))?;
    let rows = st.query_map([head.eid], snapshot_row).map_err(Error::storage("read snapshots"))?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::storage("read snapshots"))
}

/// Whether a tombstone exists for this keyed hash of an entity id.
pub fn is_erased(conn: &Connection, index: &[u8; 32]) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM tombstones WHERE idx = ?1")
        .map_err(Error::storage("read tombstone"))?
        .exists([&index[..]])
        .map_err(Error::storage("read tombstone"))
}

/// Whether the erasure of the entity with this keyed hash still has work left here: its
/// key not yet destroyed, or its events not yet all deleted.
pub fn erasure_unfinished(conn: &Connection, index: &[u8; 32]) -> Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM tombstones WHERE idx = ?1 AND key_destroyed = 0)
             OR EXISTS (SELECT 1 FROM purges WHERE idx = ?1)",
    )
    .map_err(Error::storage("read erasure"))?
    .query_row([&index[..]], |r| r.get(0))
    .map_err(Error::storage("read erasure"))
}

/// The seq of the entity's last event with a timestamp `<= ts_us` (0 if none). Timestamps
/// never decrease within an entity, so this is a prefix search: the skip index narrows it to
/// at most `SKIP_EVERY` events, which are then read.
pub fn seq_at(conn: &Connection, heads: &Heads, entity: &Entity, ts_us: i64) -> Result<u64> {
    let Some(head) = head(conn, heads, entity)? else {
        return Ok(0);
    };
    if head.ts <= ts_us {
        return Ok(head.seq);
    }
    let below: u64 = conn
        .prepare_cached("SELECT seq FROM skips WHERE eid = ?1 AND ts <= ?2 ORDER BY seq DESC LIMIT 1")
        .map_err(Error::storage("read skip index"))?
        .query_row(params![head.eid, ts_us], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(Error::storage("read skip index"))?
        .unwrap_or(0) as u64;
    let to = head.seq.min(below + crate::shard::SKIP_EVERY);
    if below + 1 > to {
        return Ok(below);
    }
    // The shard does not matter here: only timestamps are read.
    let events = walk(conn, 0, entity.id, &head, below + 1, to)?;
    Ok(events.iter().take_while(|e| e.timestamp_us <= ts_us).last().map_or(below, |e| e.seq))
}
