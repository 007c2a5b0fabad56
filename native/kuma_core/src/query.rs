//! Queries across the entities of one shard: by position, type, scope, entity id prefix
//! and time, served by the shard's indexes (docs/storage-format.md). Every filter is
//! applied in SQL, before any payload is decrypted.

use crate::codec::StoredEvent;
use crate::error::{Error, Result};
use crate::heads::hash_from;
use crate::reader::{bytes, IdResolver, Row};
use rusqlite::{Connection, OptionalExtension};
use std::collections::HashMap;

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
    /// Only events of this one entity.
    pub entity_id: Option<Vec<u8>>,
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
        if let Some(id) = &self.entity_id {
            crate::codec::validate_entity_id(id)?;
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

/// One page of a query: the matching events, and how far the shard was searched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub events: Vec<StoredEvent>,
    /// The position up to which the shard was searched: the last event returned when the
    /// page is full, else the shard's last committed position as of the same read
    /// snapshot. Reading on from there never skips nor repeats an event.
    pub searched: u64,
    /// The chain hash of the event at `searched`, if one is stored there: a reader keeps it
    /// with its checkpoint to notice, later, a shard whose positions were handed out again
    /// (a lost WAL tail) instead of skipping what took them.
    pub searched_hash: Option<[u8; 32]>,
}

/// Up to `max` events of a shard matching `q`, in position order (see `Page`). Runs inside
/// the caller's read transaction, so everything comes from one snapshot. `entity_idx` is
/// the keyed hash of `q.entity_id`; `resolve` opens sealed entity ids (an erased entity's
/// events, in a copy of the files from before its erasure, are left out).
pub fn query_shard(
    conn: &Connection,
    shard: u32,
    q: &ShardQuery,
    max: usize,
    entity_idx: Option<&[u8; 32]>,
    resolve: &IdResolver,
) -> Result<Page> {
    use rusqlite::types::Value;
    let mut sql =
        String::from("SELECT e.eid, e.seq, e.prev_pos, e.ts, e.type, e.meta, e.payload, e.hash, e.pos FROM events e");
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
    if let Some(idx) = entity_idx {
        sql.push_str(" AND e.eid = (SELECT eid FROM entities WHERE idx = ?)");
        args.push(Value::Blob(idx.to_vec()));
    }
    if let Some(ts) = q.from_ts {
        sql.push_str(" AND e.ts >= ?");
        args.push(Value::Integer(ts));
    }
    if let Some(ts) = q.to_ts {
        sql.push_str(" AND e.ts <= ?");
        args.push(Value::Integer(ts));
    }
    // Ids are sealed, so an id prefix is matched here, after the id is opened: the rows are
    // then read until `max` match, not `max` rows.
    sql.push_str(" ORDER BY e.pos");
    if q.id_prefix.is_none() {
        sql.push_str(" LIMIT ?");
        args.push(Value::Integer(max.min(i64::MAX as usize) as i64));
    }

    let mut st = conn.prepare_cached(&sql).map_err(Error::storage("query shard"))?;
    let mut id_of = conn
        .prepare_cached("SELECT idx, id_sealed FROM entities WHERE eid = ?1")
        .map_err(Error::storage("query shard"))?;
    // Ids are opened once per distinct entity: a catch-up batch holds many events of few.
    let mut ids: HashMap<i64, Option<Vec<u8>>> = HashMap::new();
    let mut events = Vec::new();
    let mut rows = st.query(rusqlite::params_from_iter(args)).map_err(Error::storage("query shard"))?;
    while events.len() < max {
        let Some(r) = rows.next().map_err(Error::storage("query shard"))? else { break };
        let row = Row::read(r).map_err(Error::storage("query shard"))?;
        let pos = r.get::<_, i64>(8).map_err(Error::storage("query shard"))? as u64;
        let entity_id = match ids.get(&row.eid) {
            Some(id) => id.clone(),
            None => {
                // No entity row: an erased entity whose events are still being deleted.
                let id = match id_of
                    .query_row([row.eid], |r| Ok((hash_from(bytes(r.get_ref(0)?)), bytes(r.get_ref(1)?).to_vec())))
                    .optional()
                    .map_err(Error::storage("query shard"))?
                {
                    Some((idx, sealed)) => resolve(&idx, &sealed)?,
                    None => None,
                };
                ids.insert(row.eid, id.clone());
                id
            }
        };
        let Some(entity_id) = entity_id else { continue };
        if q.id_prefix.as_ref().is_some_and(|p| !entity_id.starts_with(p)) {
            continue;
        }
        events.push(row.into_event(shard, entity_id, pos));
    }
    drop(rows);
    let searched = match events.last() {
        Some(last) if events.len() >= max => last.position,
        _ => last_position(conn)?,
    };
    let searched = searched.max(q.after);
    let searched_hash = event_hash(conn, searched)?;
    Ok(Page { events, searched, searched_hash })
}

/// The chain hash of the event stored at `pos`, if any.
pub fn event_hash(conn: &Connection, pos: u64) -> Result<Option<[u8; 32]>> {
    conn.prepare_cached("SELECT hash FROM events WHERE pos = ?1")
        .map_err(Error::storage("read event hash"))?
        .query_row([pos as i64], |r| Ok(hash_from(bytes(r.get_ref(0)?))))
        .optional()
        .map_err(Error::storage("read event hash"))
}

/// The last position handed out in the shard (events or, after erasures, the floor).
pub fn last_position(conn: &Connection) -> Result<u64> {
    conn.query_row(
        "SELECT max(coalesce((SELECT max(pos) FROM events), 0),
                    coalesce((SELECT value FROM meta WHERE key = 'pos_floor'), 0))",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|p| p as u64)
    .map_err(Error::storage("read last position"))
}

#[cfg(test)]
mod tests {
    use super::text_upper_bound;

    #[test]
    fn upper_bounds_cover_exactly_the_prefix() {
        assert_eq!(text_upper_bound("org:acme/").as_deref(), Some("org:acme0"));
        assert_eq!(text_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(text_upper_bound("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(text_upper_bound(""), None);
        for p in ["org:acme/", "x", "\u{10FFFF}a"] {
            let upper = text_upper_bound(p).unwrap();
            for s in [p.to_string(), format!("{p}zzz"), format!("{p}\u{10FFFF}\u{10FFFF}")] {
                assert!(s.as_str() < upper.as_str(), "{s:?} < {upper:?}");
            }
            assert!(upper.as_str() > p && !upper.starts_with(p));
        }
    }
}
