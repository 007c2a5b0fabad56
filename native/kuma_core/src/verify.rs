//! Integrity checks: recomputing an entity's hash chain from its first event to its head,
//! or every chain of a shard in one scan.

use crate::chain::{Chainer, GENESIS};
use crate::error::{Error, Result};
use crate::heads::{hash_from, Heads};
use crate::reader::{bytes, head, walk, Entity, IdResolver, HASH_MISMATCH, HEAD_MISMATCH};
use rusqlite::Connection;
use std::collections::HashMap;

/// The outcome of verifying one entity's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityVerdict {
    /// Every event from 1 to the head is present and hashes correctly.
    Intact { events: u64, head_hash: [u8; 32] },
    /// The first event that is missing, out of place, or does not hash to its stored hash.
    Broken { seq: u64, why: String },
}

/// Recomputes an entity's chain from seq 1 to its head.
pub fn verify_entity(conn: &Connection, heads: &Heads, shard: u32, entity: &Entity) -> Result<EntityVerdict> {
    let entity_id = entity.id;
    let Some(head) = head(conn, heads, entity)? else {
        return Ok(EntityVerdict::Intact { events: 0, head_hash: GENESIS });
    };
    // A walk checks every link it reads and, when it reaches the head, the head's hash:
    // walking 1..=head in chunks checks the whole chain.
    let mut next = 1u64;
    const CHUNK: u64 = 1024;
    while next <= head.seq {
        let to = head.seq.min(next + CHUNK - 1);
        match walk(conn, shard, entity_id, &head, next, to) {
            Ok(_) => {}
            Err(Error::Corrupt { seq, why }) => return Ok(EntityVerdict::Broken { seq, why }),
            Err(e) => return Err(e),
        }
        next = to + 1;
    }
    Ok(EntityVerdict::Intact { events: head.seq, head_hash: head.hash })
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
/// The chain covers entity ids, which the shard keeps sealed: `resolve` opens them. Rows of
/// an entity whose key is gone (erased, in a copy of the files from before) are counted
/// but cannot be checked; a key missing without an erasure is reported as a problem.
pub fn verify_shard(
    conn: &Connection,
    heads: &Heads,
    max_problems: usize,
    resolve: &IdResolver,
) -> Result<ShardReport> {
    struct State {
        id: Vec<u8>,
        idx: [u8; 32],
        seq: u64,
        pos: u64,
        hash: [u8; 32],
        broken: bool,
    }
    let mut entities: HashMap<i64, State> = HashMap::new();
    let mut unverifiable: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let mut report = ShardReport::default();
    {
        let mut st =
            conn.prepare("SELECT eid, idx, id_sealed FROM entities").map_err(Error::storage("verify shard"))?;
        let mut rows = st.query([]).map_err(Error::storage("verify shard"))?;
        while let Some(r) = rows.next().map_err(Error::storage("verify shard"))? {
            let eid: i64 = r.get(0).map_err(Error::storage("verify shard"))?;
            let idx = hash_from(bytes(r.get_ref(1).map_err(Error::storage("verify shard"))?));
            let sealed = bytes(r.get_ref(2).map_err(Error::storage("verify shard"))?);
            match resolve(&idx, sealed) {
                Ok(Some(id)) => {
                    entities.insert(eid, State { id, idx, seq: 0, pos: 0, hash: GENESIS, broken: false });
                }
                Ok(None) => {
                    unverifiable.insert(eid);
                }
                Err(e) => {
                    unverifiable.insert(eid);
                    if report.problems.len() < max_problems {
                        report.problems.push(ShardProblem {
                            entity_id: format!("#{eid}").into_bytes(),
                            seq: 0,
                            why: format!("its id cannot be opened: {e}"),
                        });
                    }
                }
            }
        }
    }
    report.entities = (entities.len() + unverifiable.len()) as u64;
    // Erased entities whose events are still being deleted: neither counted nor checked.
    let purging: std::collections::HashSet<i64> = conn
        .prepare("SELECT eid FROM purges")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .map_err(Error::storage("verify shard"))?;
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
        if purging.contains(&eid) {
            continue;
        }
        report.events += 1;
        let Some(state) = entities.get_mut(&eid) else {
            if unverifiable.contains(&eid) {
                continue;
            }
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
        let event_type = r.get_ref(5).map(|v| String::from_utf8_lossy(bytes(v)).into_owned()).unwrap_or_default();
        let meta = r.get_ref(6).map(bytes).unwrap_or(&[]);
        let payload = r.get_ref(7).map(bytes).unwrap_or(&[]);
        let stored = hash_from(r.get_ref(8).map(bytes).unwrap_or(&[]));
        let why = if seq != state.seq + 1 {
            Some((state.seq + 1, format!("expected seq {} at position {pos}, found {seq}", state.seq + 1)))
        } else if prev_pos != state.pos {
            Some((seq, format!("back-pointer {prev_pos} at position {pos}, expected {}", state.pos)))
        } else {
            let want = chainer.link(&state.hash, &state.id, seq, ts, &event_type, meta, payload);
            if want != stored {
                Some((seq, HASH_MISMATCH.to_string()))
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
        match head(conn, heads, &Entity { id: &state.id, idx: state.idx })? {
            Some(h) if h.seq == state.seq && h.hash == state.hash => {}
            None if state.seq == 0 => {}
            Some(h) if h.seq == state.seq => problem(&mut report, &state.id, h.seq, HEAD_MISMATCH.into()),
            Some(h) => {
                let why = format!("head says seq {}, stored events end at seq {}", h.seq, state.seq);
                problem(&mut report, &state.id, state.seq + 1, why);
            }
            None => problem(&mut report, &state.id, state.seq, "events stored but no head".into()),
        }
    }
    Ok(report)
}
