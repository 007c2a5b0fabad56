//! The live tail of a shard: its newest committed events, in clear, kept in memory by its
//! writer right after each commit. A reader that has caught up (projections,
//! subscriptions, `Kuma.query/2` from a recent position) is answered from here, without
//! reading SQLite or decrypting; one further behind falls back to the file. The writer
//! already holds every event in clear when it commits, so followers no longer each read
//! and decrypt what was just written.
//!
//! Rules that keep it equal to the file:
//! - events enter only after their transaction committed, before the shard's commit
//!   position is published, so a reader woken by a commit finds them here;
//! - the tail holds every committed position in `(from, last]`, without gaps; what cannot
//!   keep that (a position written that the writer did not add) resets it;
//! - an erasure resets it before its transaction commits: an erased entity's events are
//!   never served from memory, whether the erasure then commits or not;
//! - it is bounded in bytes: the oldest events leave first, and `from` moves with them.
//!
//! Cluster replicas do not keep one (their events arrive sealed by the leader).

use crate::codec::StoredEvent;
use crate::query::{Page, ScopeMatch, ShardQuery};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Bytes a shard's tail may hold by default (payloads, metadata, ids, types and a fixed
/// overhead per event): at 200-byte events about 10,000 events per shard.
pub const DEFAULT_TAIL_BYTES: usize = 4 << 20;

/// Fixed cost counted per event on top of its byte fields.
const OVERHEAD: usize = 128;

/// One committed event as the tail keeps it.
#[derive(Debug, Clone)]
pub struct TailEvent {
    pub entity_id: Arc<[u8]>,
    pub seq: u64,
    pub position: u64,
    pub timestamp_us: i64,
    pub event_type: String,
    pub metadata: Vec<u8>,
    pub payload: Vec<u8>,
    pub hash: [u8; 32],
    pub scope: Option<String>,
}

impl TailEvent {
    fn size(&self) -> usize {
        self.entity_id.len() + self.event_type.len() + self.metadata.len() + self.payload.len() + OVERHEAD
    }

    fn matches(&self, q: &ShardQuery) -> bool {
        (q.types.is_empty() || q.types.contains(&self.event_type))
            && match &q.scope {
                None => true,
                Some(ScopeMatch::Exact(s)) => self.scope.as_deref() == Some(s.as_str()),
                Some(ScopeMatch::Prefix(p)) => self.scope.as_deref().is_some_and(|s| s.starts_with(p.as_str())),
            }
            && q.entity_id.as_deref().is_none_or(|id| *id == *self.entity_id)
            && q.id_prefix.as_deref().is_none_or(|p| self.entity_id.starts_with(p))
            && q.from_ts.is_none_or(|ts| self.timestamp_us >= ts)
            && q.to_ts.is_none_or(|ts| self.timestamp_us <= ts)
    }

    fn to_stored(&self, shard: u32) -> StoredEvent {
        StoredEvent {
            shard,
            entity_id: self.entity_id.to_vec(),
            seq: self.seq,
            position: self.position,
            timestamp_us: self.timestamp_us,
            event_type: self.event_type.clone(),
            metadata: self.metadata.clone(),
            payload: self.payload.clone(),
            hash: self.hash,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Positions `from + 1 ..= last`, in order.
    events: VecDeque<TailEvent>,
    from: u64,
    last: u64,
    bytes: usize,
}

/// A shard's live tail (see the module doc). Shared by its writer and its readers.
#[derive(Debug)]
pub struct Tail {
    shard: u32,
    cap: usize,
    inner: Mutex<Inner>,
}

impl Tail {
    /// An empty tail of `shard` holding at most `cap` bytes (0: off, never holds anything).
    pub fn new(shard: u32, cap: usize) -> Self {
        Tail { shard, cap, inner: Mutex::new(Inner::default()) }
    }

    /// Whether it keeps events at all (the writer then gives it none).
    pub fn is_on(&self) -> bool {
        self.cap > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writer: empties the tail; it holds the events after `last` (the shard's last
    /// committed position) from now on.
    pub fn reset(&self, last: u64) {
        let mut t = self.lock();
        t.events.clear();
        t.bytes = 0;
        t.from = last;
        t.last = last;
    }

    /// Writer, after a commit: the transaction's events, in position order, and the
    /// shard's last position after it. Events that do not continue the tail exactly reset
    /// it instead.
    pub fn push(&self, events: Vec<TailEvent>, last: u64) {
        let mut t = self.lock();
        let contiguous = events.iter().enumerate().all(|(i, e)| e.position == t.last + 1 + i as u64)
            && t.last + events.len() as u64 == last;
        if !contiguous || self.cap == 0 {
            t.events.clear();
            t.bytes = 0;
            t.from = last;
            t.last = last;
            return;
        }
        for e in events {
            t.bytes += e.size();
            t.events.push_back(e);
        }
        t.last = last;
        while t.bytes > self.cap {
            let Some(old) = t.events.pop_front() else { break };
            t.bytes -= old.size();
            t.from = old.position;
        }
    }

    /// The page `query_shard` would return, if the tail holds everything it needs: every
    /// position after `query.after`, and the event at the position searched to (for its
    /// hash). `None`: read the file.
    pub fn query(&self, q: &ShardQuery, max: usize) -> Option<Page> {
        let t = self.lock();
        if q.after < t.from || q.after > t.last {
            return None;
        }
        let start = (q.after - t.from) as usize;
        let mut events = Vec::new();
        for e in t.events.iter().skip(start) {
            if events.len() >= max {
                break;
            }
            if e.matches(q) {
                events.push(e.to_stored(self.shard));
            }
        }
        let searched = match events.last() {
            Some(last) if events.len() >= max => last.position,
            _ => t.last,
        }
        .max(q.after);
        if searched <= t.from {
            return None;
        }
        let searched_hash = Some(t.events[(searched - t.from - 1) as usize].hash);
        Some(Page { events, searched, searched_hash })
    }

    /// (first position held, last position, bytes held), for tests and stats.
    pub fn span(&self) -> (u64, u64, usize) {
        let t = self.lock();
        (t.from + 1, t.last, t.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(pos: u64, id: &str, ty: &str, scope: Option<&str>) -> TailEvent {
        TailEvent {
            entity_id: Arc::from(id.as_bytes()),
            seq: pos,
            position: pos,
            timestamp_us: pos as i64 * 10,
            event_type: ty.into(),
            metadata: vec![],
            payload: vec![pos as u8; 100],
            hash: [pos as u8; 32],
            scope: scope.map(String::from),
        }
    }

    fn q(after: u64) -> ShardQuery {
        ShardQuery { after, ..Default::default() }
    }

    #[test]
    fn answers_only_what_it_holds_from_the_reader_position_on() {
        let t = Tail::new(0, 1 << 20);
        t.reset(10);
        assert!(t.query(&q(10), 5).is_none(), "nothing after 10 held yet: the file answers");
        t.push((11..=15).map(|p| ev(p, "a", "T", None)).collect(), 15);
        assert!(t.query(&q(9), 5).is_none(), "position 10 is not held");
        let page = t.query(&q(12), 2).unwrap();
        assert_eq!(page.events.iter().map(|e| e.position).collect::<Vec<_>>(), vec![13, 14]);
        assert_eq!((page.searched, page.searched_hash), (14, Some([14; 32])));
        let page = t.query(&q(12), 10).unwrap();
        assert_eq!(page.events.len(), 3);
        assert_eq!((page.searched, page.searched_hash), (15, Some([15; 32])));
        let page = t.query(&q(15), 10).unwrap();
        assert!(page.events.is_empty());
        assert_eq!(page.searched, 15);
    }

    #[test]
    fn filters_like_the_file_query() {
        let t = Tail::new(3, 1 << 20);
        t.reset(0);
        t.push(
            vec![
                ev(1, "acct-1", "Opened", Some("org:a/t:1")),
                ev(2, "user-1", "Opened", Some("org:b")),
                ev(3, "acct-2", "Closed", None),
                ev(4, "acct-1", "Closed", Some("org:a")),
            ],
            4,
        );
        let positions = |query: ShardQuery| {
            t.query(&query, 10).unwrap().events.iter().map(|e| (e.shard, e.position)).collect::<Vec<_>>()
        };
        let only = |v: &[u64]| v.iter().map(|p| (3, *p)).collect::<Vec<_>>();
        assert_eq!(positions(ShardQuery { types: vec!["Closed".into()], ..q(0) }), only(&[3, 4]));
        assert_eq!(positions(ShardQuery { scope: Some(ScopeMatch::Prefix("org:a".into())), ..q(0) }), only(&[1, 4]));
        assert_eq!(positions(ShardQuery { scope: Some(ScopeMatch::Exact("org:a".into())), ..q(0) }), only(&[4]));
        assert_eq!(positions(ShardQuery { id_prefix: Some(b"acct-".to_vec()), ..q(1) }), only(&[3, 4]));
        assert_eq!(positions(ShardQuery { entity_id: Some(b"acct-1".to_vec()), ..q(0) }), only(&[1, 4]));
        assert_eq!(positions(ShardQuery { from_ts: Some(20), to_ts: Some(30), ..q(0) }), only(&[2, 3]));
        // A filtered page that is not full was searched to the last position.
        assert_eq!(t.query(&ShardQuery { types: vec!["None".into()], ..q(0) }, 10).unwrap().searched, 4);
    }

    #[test]
    fn drops_the_oldest_beyond_its_bytes_and_resets_on_a_gap() {
        let t = Tail::new(0, 3 * (100 + 1 + 1 + OVERHEAD));
        t.reset(0);
        t.push((1..=5).map(|p| ev(p, "a", "T", None)).collect(), 5);
        assert_eq!((t.span().0, t.span().1), (3, 5));
        assert!(t.query(&q(1), 10).is_none());
        assert_eq!(t.query(&q(2), 10).unwrap().events.len(), 3);
        // Position 6 was written but not given to the tail: it must not answer past it.
        t.push(vec![ev(7, "a", "T", None)], 7);
        assert!(t.query(&q(5), 10).is_none());
        assert_eq!((t.span().0, t.span().1), (8, 7), "empty: positions 8 on, up to 7");
    }
}
