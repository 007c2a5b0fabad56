//! Queries across the entities of one shard: by position, type, scope, entity id prefix
//! and time, served by the shard's indexes (docs/storage-format.md). Every filter is
//! applied in SQL, before any payload is decrypted.

use crate::codec::StoredEvent;
use crate::error::{Error, Result};
use crate::reader::Row;
use rusqlite::Connection;
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
pub fn query_shard(conn: &Connection, shard: u32, q: &ShardQuery, max: usize) -> Result<(Vec<StoredEvent>, u64)> {
    use rusqlite::types::Value;
    // Entity ids are looked up once per distinct entity rather than joined per row: a
    // catch-up batch holds many events of few entities.
    let mut sql =
        String::from("SELECT e.eid, e.seq, e.prev_pos, e.ts, e.type, e.meta, e.payload, e.hash, e.pos FROM events e");
    if q.id_prefix.is_some() || q.entity_id.is_some() {
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
    if let Some(id) = &q.entity_id {
        sql.push_str(" AND n.entity_id = ?");
        args.push(Value::Blob(id.clone()));
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
        events.push(row.into_event(shard, entity_id, pos));
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
