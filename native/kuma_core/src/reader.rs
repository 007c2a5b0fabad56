//! Reads and integrity checks. These run on reader connections (never the writer's), so they
//! do not delay commits; in the BEAM they run on dirty IO schedulers.
//!
//! Per-entity reads follow the entity's back-pointers: to read seqs `from..=to`, start at
//! the first skip entry at or after `to` (or at the head) and walk `prev_pos` back to `from`,
//! then reverse. Every event is read once, plus fewer than `SKIP_EVERY` extra steps.

use crate::chain::{Chainer, GENESIS};
use crate::codec::StoredEvent;
use crate::error::{Error, Result};
use crate::heads::{hash_from, Head, Heads};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;

/// The head of an entity: from the shared table, else from disk (see heads.rs for why this
/// order is correct).
pub fn head(conn: &Connection, heads: &Heads, entity_id: &[u8]) -> Result<Option<Head>> {
    match heads.get(entity_id) {
        Some(h) => Ok(Some(h)),
        None => head_on_disk(conn, entity_id),
    }
}

/// The head persisted in `entities`; accurate only for entities absent from `Heads`.
pub(crate) fn head_on_disk(conn: &Connection, entity_id: &[u8]) -> Result<Option<Head>> {
    let h = conn
        .prepare_cached("SELECT eid, head_seq, head_pos, head_ts, head_hash FROM entities WHERE entity_id = ?1")
        .map_err(Error::storage("read entity head"))?
        .query_row([entity_id], |r| {
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

struct Row {
    eid: i64,
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
    fn read(r: &rusqlite::Row) -> rusqlite::Result<Row> {
        Ok(Row {
            eid: r.get(0)?,
            seq: r.get::<_, i64>(1)? as u64,
            prev_pos: r.get::<_, i64>(2)? as u64,
            ts: r.get(3)?,
            event_type: r.get(4)?,
            metadata: r.get(5)?,
            payload: r.get(6)?,
            hash: hash_from(r.get_ref(7)?.as_blob().unwrap_or(&[])),
        })
    }

    fn into_event(self, entity_id: Vec<u8>, position: u64) -> StoredEvent {
        StoredEvent {
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

fn fetch(stmt: &mut rusqlite::CachedStatement<'_>, pos: u64) -> Result<Option<Row>> {
    stmt.query_row([pos as i64], Row::read).optional().map_err(Error::storage("read event"))
}

/// Reads up to `max` events of one entity starting at `from_seq` (1-based), in order.
pub fn read_entity(
    conn: &Connection,
    heads: &Heads,
    entity_id: &[u8],
    from_seq: u64,
    max: usize,
) -> Result<Vec<StoredEvent>> {
    let from_seq = from_seq.max(1);
    let Some(head) = head(conn, heads, entity_id)? else {
        return Ok(Vec::new());
    };
    if max == 0 || from_seq > head.seq {
        return Ok(Vec::new());
    }
    let to_seq = head.seq.min(from_seq.saturating_add(max as u64 - 1));
    walk(conn, entity_id, &head, from_seq, to_seq)
}

/// Events `from_seq..=to_seq` of the entity whose head is `head`.
fn walk(conn: &Connection, entity_id: &[u8], head: &Head, from_seq: u64, to_seq: u64) -> Result<Vec<StoredEvent>> {
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
    let mut out = Vec::with_capacity((to_seq - from_seq + 1) as usize);
    let mut stmt = conn.prepare_cached(FETCH_SQL).map_err(Error::storage("read event"))?;
    loop {
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
        if seq <= to_seq {
            out.push(row.into_event(entity_id.to_vec(), pos));
        }
        if seq == from_seq {
            break;
        }
        if prev_pos == 0 || prev_pos >= pos {
            return Err(Error::Corrupt { seq, why: format!("bad back-pointer {prev_pos} at position {pos}") });
        }
        pos = prev_pos;
        seq -= 1;
    }
    out.reverse();
    Ok(out)
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
    entity_id: &[u8],
    version: u32,
    max_seq: u64,
) -> Result<Option<Snapshot>> {
    let Some(head) = head(conn, heads, entity_id)? else {
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
pub fn list_snapshots(conn: &Connection, heads: &Heads, entity_id: &[u8]) -> Result<Vec<Snapshot>> {
    let Some(head) = head(conn, heads, entity_id)? else {
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

/// The seq of the entity's last event with a timestamp `<= ts_us` (0 if none). Timestamps
/// never decrease within an entity, so this is a prefix search: the skip index narrows it to
/// at most `SKIP_EVERY` events, which are then read.
pub fn seq_at(conn: &Connection, heads: &Heads, entity_id: &[u8], ts_us: i64) -> Result<u64> {
    let Some(head) = head(conn, heads, entity_id)? else {
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
    let events = walk(conn, entity_id, &head, below + 1, to)?;
    Ok(events.iter().take_while(|e| e.timestamp_us <= ts_us).last().map_or(below, |e| e.seq))
}

/// Which of a shard's events a query wants. Every filter is applied in SQL, before any
/// payload is decrypted; an empty filter matches every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardQuery {
    /// Only events with a position greater than this.
    pub after: u64,
    /// Only events of one of these types (empty: any type).
    pub types: Vec<String>,
    /// Only events with this scope, or a scope starting with this prefix.
    pub scope: Option<ScopeMatch>,
    /// Only events of entities whose id starts with these bytes.
    pub id_prefix: Option<Vec<u8>>,
    /// Only events with a timestamp (µs) at or after this...
    pub from_ts: Option<i64>,
    /// ...and at or before this.
    pub to_ts: Option<i64>,
}

/// How an event's scope is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeMatch {
    Exact(String),
    Prefix(String),
}

/// Most types one query may name.
pub const MAX_QUERY_TYPES: usize = 64;

impl ShardQuery {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.types.len() > MAX_QUERY_TYPES {
            return Err(Error::TooLarge { what: "types", size: self.types.len() as u64, max: MAX_QUERY_TYPES as u64 });
        }
        if let Some(ScopeMatch::Exact(s) | ScopeMatch::Prefix(s)) = &self.scope {
            if s.len() > crate::codec::MAX_SCOPE_BYTES {
                return Err(Error::invalid("scope", "longer than any stored scope"));
            }
        }
        Ok(())
    }
}

/// The smallest string greater than every string that starts with `prefix` (None: there is
/// no upper bound). SQLite compares TEXT byte by byte, as Rust compares `str`.
fn text_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        if (0xD800..0xE000).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The same for bytes.
fn bytes_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut bytes = prefix.to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xFF {
            bytes.push(last + 1);
            return Some(bytes);
        }
    }
    None
}

/// Up to `max` events of a shard matching `q`, in position order, and the position up to
/// which the shard has been searched (see `Store::query_shard`). Runs inside the caller's
/// read transaction, so both come from one snapshot.
pub fn query_shard(conn: &Connection, q: &ShardQuery, max: usize) -> Result<(Vec<StoredEvent>, u64)> {
    use rusqlite::types::Value;
    // Entity ids are looked up once per distinct entity rather than joined per row: a
    // catch-up batch holds many events of few entities.
    let mut sql =
        String::from("SELECT e.eid, e.seq, e.prev_pos, e.ts, e.type, e.meta, e.payload, e.hash, e.pos FROM events e");
    if q.id_prefix.is_some() {
        sql.push_str(" JOIN entities n ON n.eid = e.eid");
    }
    sql.push_str(" WHERE e.pos > ?");
    let mut args: Vec<Value> = vec![Value::Integer(q.after as i64)];
    if !q.types.is_empty() {
        sql.push_str(" AND e.type IN (");
        sql.push_str(&vec!["?"; q.types.len()].join(", "));
        sql.push(')');
        args.extend(q.types.iter().map(|t| Value::Text(t.clone())));
    }
    match &q.scope {
        Some(ScopeMatch::Exact(s)) => {
            sql.push_str(" AND e.scope = ?");
            args.push(Value::Text(s.clone()));
        }
        Some(ScopeMatch::Prefix(p)) => {
            sql.push_str(" AND e.scope >= ?");
            args.push(Value::Text(p.clone()));
            if let Some(upper) = text_upper_bound(p) {
                sql.push_str(" AND e.scope < ?");
                args.push(Value::Text(upper));
            }
        }
        None => {}
    }
    if let Some(prefix) = &q.id_prefix {
        sql.push_str(" AND n.entity_id >= ?");
        args.push(Value::Blob(prefix.clone()));
        if let Some(upper) = bytes_upper_bound(prefix) {
            sql.push_str(" AND n.entity_id < ?");
            args.push(Value::Blob(upper));
        }
    }
    if let Some(ts) = q.from_ts {
        sql.push_str(" AND e.ts >= ?");
        args.push(Value::Integer(ts));
    }
    if let Some(ts) = q.to_ts {
        sql.push_str(" AND e.ts <= ?");
        args.push(Value::Integer(ts));
    }
    sql.push_str(" ORDER BY e.pos LIMIT ?");
    args.push(Value::Integer(max.min(i64::MAX as usize) as i64));

    let mut st = conn.prepare_cached(&sql).map_err(Error::storage("query shard"))?;
    let mut id_of =
        conn.prepare_cached("SELECT entity_id FROM entities WHERE eid = ?1").map_err(Error::storage("query shard"))?;
    let mut ids: HashMap<i64, Vec<u8>> = HashMap::new();
    let mut events = Vec::new();
    let mut rows = st.query(rusqlite::params_from_iter(args)).map_err(Error::storage("query shard"))?;
    while let Some(r) = rows.next().map_err(Error::storage("query shard"))? {
        let row = Row::read(r).map_err(Error::storage("query shard"))?;
        let pos = r.get::<_, i64>(8).map_err(Error::storage("query shard"))? as u64;
        let entity_id = match ids.get(&row.eid) {
            Some(id) => id.clone(),
            None => {
                let id: Vec<u8> = id_of.query_row([row.eid], |r| r.get(0)).map_err(Error::storage("query shard"))?;
                ids.insert(row.eid, id.clone());
                id
            }
        };
        events.push(row.into_event(entity_id, pos));
    }
    drop(rows);
    let searched = match events.last() {
        Some(last) if events.len() >= max => last.position,
        _ => conn
            .query_row(
                "SELECT max(coalesce((SELECT max(pos) FROM events), 0),
                            coalesce((SELECT value FROM meta WHERE key = 'pos_floor'), 0))",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(Error::storage("query shard"))? as u64,
    };
    Ok((events, searched.max(q.after)))
}

/// The outcome of verifying one entity's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityVerdict {
    /// Every event from 1 to the head is present and hashes correctly.
    Intact { events: u64, head_hash: [u8; 32] },
    /// The first event that is missing, out of place, or does not hash to its stored hash.
    Broken { seq: u64, why: String },
}

/// Recomputes an entity's chain from seq 1 to its head.
pub fn verify_entity(conn: &Connection, heads: &Heads, entity_id: &[u8]) -> Result<EntityVerdict> {
    let Some(head) = head(conn, heads, entity_id)? else {
        return Ok(EntityVerdict::Intact { events: 0, head_hash: GENESIS });
    };
    let mut chainer = Chainer::new();
    let mut prev = GENESIS;
    let mut next = 1u64;
    const CHUNK: u64 = 1024;
    while next <= head.seq {
        let to = head.seq.min(next + CHUNK - 1);
        let events = match walk(conn, entity_id, &head, next, to) {
            Ok(evs) => evs,
            Err(Error::Corrupt { seq, why }) => return Ok(EntityVerdict::Broken { seq, why }),
            Err(e) => return Err(e),
        };
        for ev in events {
            let want =
                chainer.link(&prev, entity_id, ev.seq, ev.timestamp_us, &ev.event_type, &ev.metadata, &ev.payload);
            if want != ev.hash {
                return Ok(EntityVerdict::Broken {
                    seq: ev.seq,
                    why: "stored hash does not match the recomputed chain".into(),
                });
            }
            prev = want;
        }
        next = to + 1;
    }
    if prev != head.hash {
        return Ok(EntityVerdict::Broken { seq: head.seq, why: "last event does not match the entity head".into() });
    }
    Ok(EntityVerdict::Intact { events: head.seq, head_hash: prev })
}

/// A problem found by a shard scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardProblem {
    pub entity_id: Vec<u8>,
    pub seq: u64,
    pub why: String,
}

/// The outcome of verifying a whole shard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardReport {
    pub entities: u64,
    pub events: u64,
    /// First problem of each broken entity (at most `max_problems`).
    pub problems: Vec<ShardProblem>,
}

/// Scans a shard in position order, recomputing every entity's chain, and checks each
/// entity's last event against its head. Memory is proportional to the number of entities.
pub fn verify_shard(conn: &Connection, heads: &Heads, max_problems: usize) -> Result<ShardReport> {
    struct State {
        id: Vec<u8>,
        seq: u64,
        pos: u64,
        hash: [u8; 32],
        broken: bool,
    }
    let mut entities: HashMap<i64, State> = HashMap::new();
    {
        let mut st = conn.prepare("SELECT eid, entity_id FROM entities").map_err(Error::storage("verify shard"))?;
        let mut rows = st.query([]).map_err(Error::storage("verify shard"))?;
        while let Some(r) = rows.next().map_err(Error::storage("verify shard"))? {
            let eid: i64 = r.get(0).map_err(Error::storage("verify shard"))?;
            let id: Vec<u8> = r.get(1).map_err(Error::storage("verify shard"))?;
            entities.insert(eid, State { id, seq: 0, pos: 0, hash: GENESIS, broken: false });
        }
    }
    let mut report = ShardReport { entities: entities.len() as u64, ..Default::default() };
    let mut chainer = Chainer::new();
    let problem = |report: &mut ShardReport, id: &[u8], seq: u64, why: String| {
        if report.problems.len() < max_problems {
            report.problems.push(ShardProblem { entity_id: id.to_vec(), seq, why });
        }
    };
    let mut st = conn
        .prepare("SELECT pos, eid, seq, prev_pos, ts, type, meta, payload, hash FROM events ORDER BY pos")
        .map_err(Error::storage("verify shard"))?;
    let mut rows = st.query([]).map_err(Error::storage("verify shard"))?;
    while let Some(r) = rows.next().map_err(Error::storage("verify shard"))? {
        report.events += 1;
        let get_err = Error::storage("verify shard");
        let (pos, eid, seq, prev_pos, ts) = (|| -> rusqlite::Result<_> {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
                r.get::<_, i64>(4)?,
            ))
        })()
        .map_err(get_err)?;
        let Some(state) = entities.get_mut(&eid) else {
            problem(
                &mut report,
                format!("#{eid}").as_bytes(),
                seq,
                format!("event at position {pos} names unknown entity #{eid}"),
            );
            continue;
        };
        if state.broken {
            continue;
        }
        let event_type: String = r.get(5).unwrap_or_default();
        let meta = r.get_ref(6).ok().and_then(|v| v.as_blob().ok()).unwrap_or(&[]);
        let payload = r.get_ref(7).ok().and_then(|v| v.as_blob().ok()).unwrap_or(&[]);
        let stored = hash_from(r.get_ref(8).ok().and_then(|v| v.as_blob().ok()).unwrap_or(&[]));
        let why = if seq != state.seq + 1 {
            Some((state.seq + 1, format!("expected seq {} at position {pos}, found {seq}", state.seq + 1)))
        } else if prev_pos != state.pos {
            Some((seq, format!("back-pointer {prev_pos} at position {pos}, expected {}", state.pos)))
        } else {
            let want = chainer.link(&state.hash, &state.id, seq, ts, &event_type, meta, payload);
            if want != stored {
                Some((seq, "stored hash does not match the recomputed chain".to_string()))
            } else {
                state.seq = seq;
                state.pos = pos;
                state.hash = want;
                None
            }
        };
        if let Some((bad_seq, why)) = why {
            state.broken = true;
            let id = state.id.clone();
            problem(&mut report, &id, bad_seq, why);
        }
    }
    drop(rows);
    drop(st);
    for state in entities.values().filter(|s| !s.broken) {
        match head(conn, heads, &state.id)? {
            Some(h) if h.seq == state.seq && h.hash == state.hash => {}
            None if state.seq == 0 => {}
            Some(h) => {
                let why = format!("head says seq {}, stored events end at seq {}", h.seq, state.seq);
                problem(&mut report, &state.id, state.seq + 1, why);
            }
            None => problem(&mut report, &state.id, state.seq, "events stored but no head".into()),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{bytes_upper_bound, text_upper_bound};

    #[test]
    fn upper_bounds_cover_exactly_the_prefix() {
        assert_eq!(text_upper_bound("org:acme/").as_deref(), Some("org:acme0"));
        assert_eq!(text_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(text_upper_bound("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(text_upper_bound(""), None);
        assert_eq!(bytes_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(bytes_upper_bound(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(bytes_upper_bound(&[0xFF]), None);
        for p in ["org:acme/", "x", "\u{10FFFF}a"] {
            let upper = text_upper_bound(p).unwrap();
            for s in [p.to_string(), format!("{p}zzz"), format!("{p}\u{10FFFF}\u{10FFFF}")] {
                assert!(s.as_str() < upper.as_str(), "{s:?} < {upper:?}");
            }
            assert!(upper.as_str() > p && !upper.starts_with(p));
        }
    }
}
