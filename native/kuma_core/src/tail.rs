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

/// A part of a commit's buffer: (start, length).
type Span = (usize, usize);

/// One committed event as the tail keeps it. Its bytes (entity id, type, metadata,
/// payload, scope) live in one buffer shared by every event of its commit: one allocation
/// per commit instead of several per event. Holding ~10,000 events per shard as separate
/// small allocations made malloc measurably slower for the whole writer path
/// (docs/benchmarks.md, "the live tail's cost").
#[derive(Debug, Clone)]
pub struct TailEvent {
    bytes: Arc<Vec<u8>>,
    id: Span,
    event_type: Span,
    metadata: Span,
    payload: Span,
    scope: Option<Span>,
    pub seq: u64,
    pub position: u64,
    pub timestamp_us: i64,
    pub hash: [u8; 32],
}

impl TailEvent {
    fn part(&self, (start, len): Span) -> &[u8] {
        &self.bytes[start..start + len]
    }

    pub fn entity_id(&self) -> &[u8] {
        self.part(self.id)
    }

    fn type_bytes(&self) -> &[u8] {
        self.part(self.event_type)
    }

    fn scope_bytes(&self) -> Option<&[u8]> {
        self.scope.map(|s| self.part(s))
    }

    fn size(&self) -> usize {
        self.id.1 + self.event_type.1 + self.metadata.1 + self.payload.1 + OVERHEAD
    }

    fn matches(&self, q: &ShardQuery) -> bool {
        (q.types.is_empty() || q.types.iter().any(|t| t.as_bytes() == self.type_bytes()))
            && match &q.scope {
                None => true,
                Some(ScopeMatch::Exact(s)) => self.scope_bytes() == Some(s.as_bytes()),
                Some(ScopeMatch::Prefix(p)) => self.scope_bytes().is_some_and(|s| s.starts_with(p.as_bytes())),
            }
            && q.entity_id.as_deref().is_none_or(|id| id == self.entity_id())
            && q.id_prefix.as_deref().is_none_or(|p| self.entity_id().starts_with(p))
            && q.from_ts.is_none_or(|ts| self.timestamp_us >= ts)
            && q.to_ts.is_none_or(|ts| self.timestamp_us <= ts)
    }

    fn to_stored(&self, shard: u32) -> StoredEvent {
        StoredEvent {
            shard,
            entity_id: self.entity_id().to_vec(),
            seq: self.seq,
            position: self.position,
            timestamp_us: self.timestamp_us,
            // Types went in as strings: the bytes are valid UTF-8.
            event_type: String::from_utf8_lossy(self.type_bytes()).into_owned(),
            metadata: self.part(self.metadata).to_vec(),
            payload: self.part(self.payload).to_vec(),
            hash: self.hash,
        }
    }
}

/// The events of one commit, copied into one buffer (`TailEvent`): ids with `id`, then
/// each event with `add`, then `finish`.
#[derive(Debug, Default)]
pub struct TailBatch {
    bytes: Vec<u8>,
    events: Vec<Pending>,
}

#[derive(Debug)]
struct Pending {
    id: Span,
    event_type: Span,
    metadata: Span,
    payload: Span,
    scope: Option<Span>,
    seq: u64,
    position: u64,
    timestamp_us: i64,
    hash: [u8; 32],
}

impl TailBatch {
    /// Room for `bytes` bytes and `events` events.
    pub fn with_capacity(bytes: usize, events: usize) -> Self {
        TailBatch { bytes: Vec::with_capacity(bytes), events: Vec::with_capacity(events) }
    }

    fn put(&mut self, part: &[u8]) -> Span {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(part);
        (start, part.len())
    }

    /// Copies an entity id in; its events are added with what this returns.
    pub fn id(&mut self, entity_id: &[u8]) -> Span {
        self.put(entity_id)
    }

    /// Copies one event in.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        id: Span,
        seq: u64,
        position: u64,
        timestamp_us: i64,
        event_type: &str,
        metadata: &[u8],
        payload: &[u8],
        hash: [u8; 32],
        scope: Option<&str>,
    ) {
        let event_type = self.put(event_type.as_bytes());
        let metadata = self.put(metadata);
        let payload = self.put(payload);
        let scope = scope.map(|s| self.put(s.as_bytes()));
        self.events.push(Pending { id, event_type, metadata, payload, scope, seq, position, timestamp_us, hash });
    }

    /// The events, in position order.
    pub fn finish(self) -> Vec<TailEvent> {
        let bytes = Arc::new(self.bytes);
        let mut events: Vec<TailEvent> = self
            .events
            .into_iter()
            .map(|p| TailEvent {
                bytes: bytes.clone(),
                id: p.id,
                event_type: p.event_type,
                metadata: p.metadata,
                payload: p.payload,
                scope: p.scope,
                seq: p.seq,
                position: p.position,
                timestamp_us: p.timestamp_us,
                hash: p.hash,
            })
            .collect();
        events.sort_unstable_by_key(|e| e.position);
        events
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
        let mut batch = TailBatch::default();
        let id = batch.id(id.as_bytes());
        batch.add(id, pos, pos, pos as i64 * 10, ty, &[], &[pos as u8; 100], [pos as u8; 32], scope);
        batch.finish().remove(0)
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
