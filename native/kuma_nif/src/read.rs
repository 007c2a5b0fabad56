//! Reads, on dirty IO schedulers: one entity's events, head and snapshots, queries across
//! a shard's entities, and the chain checks.

use crate::error::{guard, NifResult};
use crate::store::StoreResource;
use crate::term::{decode_id, Bytes, Events, Hash, HeadTerm, QueryTerm, SnapshotTerm};
use kuma_core::EntityVerdict;
use rustler::{Encoder, Env, NifMap, NifTaggedEnum, ResourceArc, Term};

/// Up to `max` events of an entity from `from_seq`, decrypted: `[kuma_event]`.
#[rustler::nif(schedule = "DirtyIo")]
fn read_entity(store: ResourceArc<StoreResource>, entity_id: Term, from_seq: u64, max: usize) -> NifResult<Events> {
    guard(|| store.store.read_entity(&decode_id(entity_id)?, from_seq, max).map(Events))
}

/// The head of an entity (`nil` if it has no events).
#[rustler::nif(schedule = "DirtyIo")]
fn read_head(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<Option<HeadTerm>> {
    guard(|| {
        let head = store.store.head(&decode_id(entity_id)?)?;
        Ok(head.map(|h| HeadTerm { seq: h.seq, position: h.pos, timestamp: h.ts, hash: Hash(h.hash) }))
    })
}

/// Events of one shard after position `after` matching `query` (a `%Kuma.Query{}`), the
/// position searched up to and the chain hash stored there: `{[kuma_event], searched,
/// hash | nil}`.
#[rustler::nif(schedule = "DirtyIo")]
fn read_query<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    shard: u32,
    after: u64,
    query: QueryTerm<'a>,
    max: usize,
) -> NifResult<Term<'a>> {
    guard(|| {
        let page = store.store.query_shard(shard, &query.to_shard_query(after), max)?;
        Ok((Events(page.events), page.searched, page.searched_hash.map(Hash)).encode(env))
    })
}

/// Events in the store-wide order after global position `after`: `{[kuma_event],
/// [global position], searched}` (the two lists in step; read on after `searched`).
#[rustler::nif(schedule = "DirtyIo")]
fn read_all<'a>(env: Env<'a>, store: ResourceArc<StoreResource>, after: u64, max: usize) -> NifResult<Term<'a>> {
    guard(|| {
        let page = store.store.read_all(after, max)?;
        let (globals, events): (Vec<u64>, Vec<_>) = page.events.into_iter().unzip();
        Ok((Events(events), globals, page.searched).encode(env))
    })
}

/// Where a reader that stopped at `position` of `shard` stands: `{hash | nil, last}`, the
/// chain hash of the event stored at that position now and the shard's last position.
#[rustler::nif(schedule = "DirtyIo")]
fn read_position(store: ResourceArc<StoreResource>, shard: u32, position: u64) -> NifResult<(Option<Hash>, u64)> {
    guard(|| {
        let (hash, last) = store.store.position_check(shard, position)?;
        Ok((hash.map(Hash), last))
    })
}

/// The latest snapshot with `version` at or before `max_seq`, decrypted (or `nil`).
#[rustler::nif(schedule = "DirtyIo")]
fn read_snapshot(
    store: ResourceArc<StoreResource>,
    entity_id: Term,
    version: u32,
    max_seq: u64,
) -> NifResult<Option<SnapshotTerm>> {
    guard(|| Ok(store.store.latest_snapshot(&decode_id(entity_id)?, version, max_seq)?.map(SnapshotTerm::from)))
}

/// Every snapshot of an entity, oldest first, decrypted.
#[rustler::nif(schedule = "DirtyIo")]
fn read_snapshots(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<Vec<SnapshotTerm>> {
    guard(|| Ok(store.store.snapshots(&decode_id(entity_id)?)?.into_iter().map(SnapshotTerm::from).collect()))
}

/// The seq of the entity's last event committed at or before `ts_us` (0 if none).
#[rustler::nif(schedule = "DirtyIo")]
fn read_seq_at(store: ResourceArc<StoreResource>, entity_id: Term, ts_us: i64) -> NifResult<u64> {
    guard(|| store.store.seq_at(&decode_id(entity_id)?, ts_us))
}

/// Whether the entity was erased.
#[rustler::nif(schedule = "DirtyIo")]
fn read_erased(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<bool> {
    guard(|| store.store.is_erased(&decode_id(entity_id)?))
}

/// How far an erasure got on this node: `nil` (not erased), `false` (its key or events are
/// still being removed), `true` (complete).
#[rustler::nif(schedule = "DirtyIo")]
fn read_erasure(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<Option<bool>> {
    guard(|| store.store.erasure_state(&decode_id(entity_id)?))
}

/// `{:intact, %{events, hash}}` or `{:broken, %{seq, why}}`.
#[derive(NifTaggedEnum)]
#[rustler(encode)]
enum VerdictTerm {
    Intact { events: u64, hash: Hash },
    Broken { seq: u64, why: String },
}

/// Recomputes one entity's chain.
#[rustler::nif(schedule = "DirtyIo")]
fn read_verify_entity(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<VerdictTerm> {
    guard(|| {
        Ok(match store.store.verify_entity(&decode_id(entity_id)?)? {
            EntityVerdict::Intact { events, head_hash } => VerdictTerm::Intact { events, hash: Hash(head_hash) },
            EntityVerdict::Broken { seq, why } => VerdictTerm::Broken { seq, why },
        })
    })
}

/// `%{entity_id, seq, why}`: the first problem of one entity.
#[derive(NifMap)]
#[rustler(encode)]
struct ProblemTerm {
    entity_id: Bytes,
    seq: u64,
    why: String,
}

/// `%{entities, events, problems}`.
#[derive(NifMap)]
#[rustler(encode)]
struct ReportTerm {
    entities: u64,
    events: u64,
    problems: Vec<ProblemTerm>,
}

/// Recomputes every chain of one shard.
#[rustler::nif(schedule = "DirtyIo")]
fn read_verify_shard(store: ResourceArc<StoreResource>, shard: u32, max_problems: usize) -> NifResult<ReportTerm> {
    guard(|| {
        let report = store.store.verify_shard(shard, max_problems)?;
        Ok(ReportTerm {
            entities: report.entities,
            events: report.events,
            problems: report
                .problems
                .into_iter()
                .map(|p| ProblemTerm { entity_id: Bytes(p.entity_id), seq: p.seq, why: p.why })
                .collect(),
        })
    })
}
