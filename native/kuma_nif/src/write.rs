//! Writes: everything a shard's writer thread does. Each NIF decodes its arguments, queues
//! the work and returns `:ok` at once; the answer arrives later as `{:kuma_reply, ref,
//! answer}` (reply.rs). Large inputs go through the `_dirty` twin, on a dirty CPU
//! scheduler, because decoding and copying them may take longer than ~100 µs (the caller
//! picks, `Kuma.EventLog` decides where the line is).

use crate::atoms;
use crate::error::{guard, NifResult};
use crate::reply;
use crate::store::StoreResource;
use crate::term::{decode_events, decode_expected, decode_id, AppendedTerm};
use kuma_core::{AppendEntry, Appended, Error, Result, SnapshotRequest};
use rustler::types::binary::Binary;
use rustler::{Atom, Encoder, Env, ResourceArc, Term};

fn appended(env: Env, a: Appended) -> Term {
    AppendedTerm::from(a).encode(env)
}

fn appended_each(env: Env, results: Vec<Result<Appended>>) -> Term {
    let items: Vec<Term> = results.into_iter().map(|r| crate::error::encode_result(env, r, appended)).collect();
    items.encode(env)
}

fn done(env: Env, _: ()) -> Term {
    atoms::ok().encode(env)
}

fn count(env: Env, n: u64) -> Term {
    n.encode(env)
}

fn append<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    expected: Term<'a>,
    events: Term<'a>,
) -> NifResult<Atom> {
    guard(|| {
        let (id, expected, events) = (decode_id(entity_id)?, decode_expected(expected)?, decode_events(events)?);
        store.store.append(id, expected, events, reply::later(env, reference, appended)?)?;
        Ok(atoms::ok())
    })
}

/// Queues an append to one entity: answered with `{:ok, appended} | {:error, reason}`.
#[rustler::nif]
fn write_append<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    expected: Term<'a>,
    events: Term<'a>,
) -> NifResult<Atom> {
    append(env, store, reference, entity_id, expected, events)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn write_append_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    expected: Term<'a>,
    events: Term<'a>,
) -> NifResult<Atom> {
    append(env, store, reference, entity_id, expected, events)
}

fn batch<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entries: Term<'a>,
) -> NifResult<Atom> {
    guard(|| {
        let raw: Vec<(Term, Term, Term)> = entries.decode().map_err(|_| Error::Invalid {
            what: "entries",
            why: "must be a list of {entity_id, expected_seq, events}".into(),
        })?;
        let entries = raw
            .into_iter()
            .map(|(id, expected, events)| {
                Ok(AppendEntry {
                    entity_id: decode_id(id)?,
                    expected: decode_expected(expected)?,
                    events: decode_events(events)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let reply = reply::later(env, reference, appended_each)?;
        // The batch's answer is a list, never an error as a whole.
        store.store.append_batch(entries, Box::new(move |results| reply(Ok(results))))?;
        Ok(atoms::ok())
    })
}

/// Queues appends to many entities: answered with `{:ok, [{:ok, appended} | {:error,
/// reason}]}`, one per entry, in order.
#[rustler::nif]
fn write_batch<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entries: Term<'a>,
) -> NifResult<Atom> {
    batch(env, store, reference, entries)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn write_batch_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entries: Term<'a>,
) -> NifResult<Atom> {
    batch(env, store, reference, entries)
}

#[allow(clippy::too_many_arguments)]
fn snapshot<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    seq: u64,
    version: u32,
    hash: Binary<'a>,
    data: Binary<'a>,
) -> NifResult<Atom> {
    guard(|| {
        let hash: [u8; 32] = hash
            .as_slice()
            .try_into()
            .map_err(|_| Error::Invalid { what: "snapshot", why: "hash must be 32 bytes".into() })?;
        let snapshot =
            SnapshotRequest { entity_id: decode_id(entity_id)?, seq, version, hash, data: data.as_slice().to_vec() };
        store.store.save_snapshot(snapshot, reply::later(env, reference, done)?)?;
        Ok(atoms::ok())
    })
}

/// Queues a snapshot: answered with `{:ok, :ok} | {:error, reason}`.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn write_snapshot<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    seq: u64,
    version: u32,
    hash: Binary<'a>,
    data: Binary<'a>,
) -> NifResult<Atom> {
    snapshot(env, store, reference, entity_id, seq, version, hash, data)
}

#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn write_snapshot_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    seq: u64,
    version: u32,
    hash: Binary<'a>,
    data: Binary<'a>,
) -> NifResult<Atom> {
    snapshot(env, store, reference, entity_id, seq, version, hash, data)
}

/// Queues the deletion of an entity's snapshots of `version`: answered with
/// `{:ok, :ok} | {:error, reason}`.
#[rustler::nif]
fn write_delete_snapshots<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    version: u32,
) -> NifResult<Atom> {
    guard(|| {
        store.store.delete_snapshots(decode_id(entity_id)?, version, reply::later(env, reference, done)?)?;
        Ok(atoms::ok())
    })
}

/// Queues the erasure of an entity: answered with `{:ok, events_deleted} | {:error, reason}`.
#[rustler::nif]
fn write_erase<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
) -> NifResult<Atom> {
    guard(|| {
        store.store.delete(decode_id(entity_id)?, reply::later(env, reference, count)?)?;
        Ok(atoms::ok())
    })
}

/// Queues the compaction of one shard (`VACUUM`): answered with `{:ok, :ok} | {:error, reason}`.
#[rustler::nif]
fn write_compact<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    shard: u32,
) -> NifResult<Atom> {
    guard(|| {
        store.store.compact(shard, reply::later(env, reference, done)?)?;
        Ok(atoms::ok())
    })
}

/// Waits until every write queued before this call is committed, and checkpoints heads.
#[rustler::nif(schedule = "DirtyIo")]
fn write_flush(store: ResourceArc<StoreResource>) -> NifResult<Atom> {
    guard(|| store.store.flush().map(|_| atoms::ok()))
}
