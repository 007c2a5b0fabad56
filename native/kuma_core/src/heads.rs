//! Entity heads: for each entity, its interned id (`eid`) and last event (seq, position,
//! timestamp, hash).
//!
//! The shard writer is the only one that changes heads. It updates this shared table after
//! every commit and persists heads into the `entities` table only at checkpoints, so the hot
//! write path touches no random pages. Invariant that makes readers correct: an entity whose
//! head changed since the last checkpoint ("dirty") is always present here; an entity absent
//! here has an accurate head row on disk. So a reader looks here first and, on a miss, reads
//! the `entities` row in a read transaction that starts after the lookup.

use std::collections::HashMap;
use std::sync::RwLock;

/// A 32-byte hash from a stored blob (zeros if the blob has the wrong length, which the
/// chain check then reports as a mismatch).
pub(crate) fn hash_from(bytes: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    if bytes.len() == 32 {
        h.copy_from_slice(bytes);
    }
    h
}

/// The last event of an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub eid: i64,
    pub seq: u64,
    pub pos: u64,
    pub ts: i64,
    pub hash: [u8; 32],
}

/// Heads shared between a shard's writer and its readers.
pub struct Heads {
    map: RwLock<HashMap<Box<[u8]>, Head>>,
    /// Above this many entries, clean entries are dropped after a checkpoint.
    cap: usize,
}

impl Heads {
    pub fn new(cap: usize) -> Self {
        Heads { map: RwLock::new(HashMap::new()), cap: cap.max(16) }
    }

    pub fn get(&self, entity_id: &[u8]) -> Option<Head> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).get(entity_id).copied()
    }

    /// Writer only: publish heads after a commit.
    pub(crate) fn publish<'a>(&self, heads: impl IntoIterator<Item = (&'a [u8], Head)>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for (id, head) in heads {
            match map.get_mut(id) {
                Some(h) => *h = head,
                None => {
                    map.insert(id.into(), head);
                }
            }
        }
    }

    /// Writer only: cache a clean head read from disk.
    pub(crate) fn cache_clean(&self, entity_id: &[u8], head: Head) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).entry(entity_id.into()).or_insert(head);
    }

    /// Writer only: forget every head (the shard file was replaced, see writer.rs).
    pub(crate) fn clear(&self) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Writer only: forget an entity (used when its events are deleted).
    pub(crate) fn remove(&self, entity_id: &[u8]) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(entity_id);
    }

    /// Writer only, right after a checkpoint (when every entry is clean): shrink to half the
    /// cap if over it.
    pub(crate) fn trim_clean(&self) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() > self.cap {
            let mut keep = self.cap / 2;
            map.retain(|_, _| {
                if keep > 0 {
                    keep -= 1;
                    true
                } else {
                    false
                }
            });
        }
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}
