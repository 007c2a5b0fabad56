//! Cluster mode: preparing writes on a shard's leader and applying replicated commands on
//! every replica (kuma_core's `replica` module). The prepared commands travel through the
//! Raft log as plain terms:
//!
//! - `{:kuma_prepared, command_id, entity_id, expected | nil, first_seq, timestamp,
//!   id_sealed, new_key | nil, [{type, metadata, payload, scope | nil}]}`
//! - `{:kuma_erase, command_id, entity_id, timestamp}`
//!
//! and applying one log entry answers `{:kuma_reply, ref, {:ok, outcomes}}` with one
//! outcome per command: `{:appended, appended}`, `{:erased, count}`, `{:refused, reason}`
//! or `{:conflict, head_seq}`.

use crate::atoms;
use crate::error::{encode_result, guard, NifResult, Reason};
use crate::store::StoreResource;
use crate::term::{bin, decode_events, decode_expected, decode_id, AppendedTerm};
use kuma_core::replica::{
    AppendRequest, Outcome, PreparedAppend, PreparedErase, Replicated, SealedEvent, COMMAND_ID_LEN,
};
use kuma_core::{Error, Expected, Result};
use rustler::env::OwnedEnv;
use rustler::types::binary::Binary;
use rustler::{Atom, Encoder, Env, LocalPid, ResourceArc, Term};

rustler::atoms! {
    kuma_applied,
    kuma_apply_failed,
    kuma_prepared,
    kuma_erase,
    appended,
    erased,
    refused,
}

fn bad(what: &'static str, why: &str) -> Error {
    Error::Invalid { what, why: why.into() }
}

fn command_id(term: Term) -> Result<[u8; COMMAND_ID_LEN]> {
    term.decode::<Binary>()
        .ok()
        .and_then(|b| b.as_slice().try_into().ok())
        .ok_or_else(|| bad("command_id", "must be a 16-byte binary"))
}

fn bytes(term: Term, what: &'static str) -> Result<Vec<u8>> {
    term.decode::<Binary>().map(|b| b.as_slice().to_vec()).map_err(|_| bad(what, "must be a binary"))
}

fn optional_bytes(term: Term, what: &'static str) -> Result<Option<Vec<u8>>> {
    if term.is_atom() {
        return Ok(None);
    }
    bytes(term, what).map(Some)
}

fn encode_expected<'a>(env: Env<'a>, expected: Expected) -> Term<'a> {
    match expected {
        Expected::Any => atoms::nil().encode(env),
        Expected::Seq(n) => n.encode(env),
    }
}

fn encode_prepared<'a>(env: Env<'a>, p: PreparedAppend) -> Term<'a> {
    let events: Vec<Term> = p
        .events
        .iter()
        .map(|e| {
            let scope = match &e.scope {
                Some(s) => bin(env, s.as_bytes()),
                None => atoms::nil().encode(env),
            };
            (bin(env, e.event_type.as_bytes()), bin(env, &e.metadata), bin(env, &e.payload), scope).encode(env)
        })
        .collect();
    let new_key = match &p.new_key {
        Some(k) => bin(env, k),
        None => atoms::nil().encode(env),
    };
    let fields = [
        kuma_prepared().encode(env),
        bin(env, &p.command_id),
        bin(env, &p.entity_id),
        encode_expected(env, p.expected),
        p.first_seq.encode(env),
        p.timestamp_us.encode(env),
        bin(env, &p.id_sealed),
        new_key,
        events.encode(env),
    ];
    rustler::types::tuple::make_tuple(env, &fields)
}

fn decode_sealed_events(term: Term) -> Result<Vec<SealedEvent>> {
    let list: Vec<(Binary, Binary, Binary, Term)> =
        term.decode().map_err(|_| bad("events", "must be a list of {type, metadata, payload, scope}"))?;
    list.into_iter()
        .map(|(t, m, p, scope)| {
            let event_type =
                String::from_utf8(t.as_slice().to_vec()).map_err(|_| bad("event_type", "must be UTF-8"))?;
            let scope = optional_bytes(scope, "scope")?
                .map(|s| String::from_utf8(s).map_err(|_| bad("scope", "must be UTF-8")))
                .transpose()?;
            Ok(SealedEvent { event_type, metadata: m.as_slice().to_vec(), payload: p.as_slice().to_vec(), scope })
        })
        .collect()
}

fn decode_command(term: Term) -> Result<Replicated> {
    let fields = rustler::types::tuple::get_tuple(term).map_err(|_| bad("command", "must be a tuple"))?;
    let tag: Atom = fields.first().and_then(|t| t.decode().ok()).ok_or_else(|| bad("command", "untagged"))?;
    match fields.as_slice() {
        [_, cid, id, expected, first_seq, ts, id_sealed, new_key, events] if tag == kuma_prepared() => {
            Ok(Replicated::Append(PreparedAppend {
                command_id: command_id(*cid)?,
                entity_id: decode_id(*id)?,
                expected: decode_expected(*expected)?,
                first_seq: first_seq.decode().map_err(|_| bad("first_seq", "must be an integer"))?,
                timestamp_us: ts.decode().map_err(|_| bad("timestamp", "must be an integer"))?,
                id_sealed: bytes(*id_sealed, "id_sealed")?,
                new_key: optional_bytes(*new_key, "new_key")?,
                events: decode_sealed_events(*events)?,
            }))
        }
        [_, cid, id, ts] if tag == kuma_erase() => Ok(Replicated::Erase(PreparedErase {
            command_id: command_id(*cid)?,
            entity_id: decode_id(*id)?,
            timestamp_us: ts.decode().map_err(|_| bad("timestamp", "must be an integer"))?,
        })),
        _ => Err(bad("command", "not a prepared command")),
    }
}

fn encode_outcomes(env: Env, outcomes: Vec<Outcome>) -> Term {
    let items: Vec<Term> = outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Appended(a) => (appended(), AppendedTerm::from(a)).encode(env),
            Outcome::Erased(n) => (erased(), n).encode(env),
            Outcome::Refused(e) => (refused(), Reason(e)).encode(env),
            Outcome::Conflict { head_seq } => (atoms::conflict(), head_seq).encode(env),
        })
        .collect();
    items.encode(env)
}

fn prepare<'a>(env: Env<'a>, store: ResourceArc<StoreResource>, requests: Term<'a>) -> NifResult<Term<'a>> {
    guard(|| {
        let raw: Vec<(Term, Term, Term, Term)> = requests
            .decode()
            .map_err(|_| bad("requests", "must be a list of {command_id, entity_id, expected_seq, events}"))?;
        let requests = raw
            .into_iter()
            .map(|(cid, id, expected, events)| {
                Ok(AppendRequest {
                    command_id: command_id(cid)?,
                    entity_id: decode_id(id)?,
                    expected: decode_expected(expected)?,
                    events: decode_events(events)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let results: Vec<Term> =
            store.store.prepare(requests).into_iter().map(|r| encode_result(env, r, encode_prepared)).collect();
        Ok(results.encode(env))
    })
}

/// Prepares appends on a shard's leader: `requests` are `{command_id, entity_id,
/// expected_seq | nil, events}`; one `{:ok, prepared} | {:error, reason}` each, in order.
/// Seals every event: the caller picks the `_dirty` twin (a dirty CPU scheduler) for
/// large batches, as for local writes.
#[rustler::nif]
fn cluster_prepare<'a>(env: Env<'a>, store: ResourceArc<StoreResource>, requests: Term<'a>) -> NifResult<Term<'a>> {
    prepare(env, store, requests)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn cluster_prepare_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    requests: Term<'a>,
) -> NifResult<Term<'a>> {
    prepare(env, store, requests)
}

/// Queues the commands of Raft entry `raft_index` of `shard` for its writer and returns at
/// once: the state machine does not wait for the disk (a replay after a crash applies again
/// what was not committed, see kuma_core's replica module), and the writer commits the
/// entries queued meanwhile together. Once committed, `reply_to` (a local pid, or nil)
/// gets `{:kuma_applied, ref, {:ok, outcomes} | {:error, reason}}`; if the entry could not
/// be applied, `watcher` (a local pid, or nil) also gets `{:kuma_apply_failed, shard,
/// raft_index, reason}`.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn cluster_apply<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    shard: u32,
    raft_index: u64,
    commands: Term<'a>,
    reply_to: Term<'a>,
    reference: Term<'a>,
    watcher: Term<'a>,
) -> NifResult<Atom> {
    apply(env, store, shard, raft_index, commands, reply_to, reference, watcher)
}

/// `cluster_apply` on a dirty CPU scheduler, for large entries (decoding copies them).
#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn cluster_apply_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    shard: u32,
    raft_index: u64,
    commands: Term<'a>,
    reply_to: Term<'a>,
    reference: Term<'a>,
    watcher: Term<'a>,
) -> NifResult<Atom> {
    apply(env, store, shard, raft_index, commands, reply_to, reference, watcher)
}

#[allow(clippy::too_many_arguments)]
fn apply<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    shard: u32,
    raft_index: u64,
    commands: Term<'a>,
    reply_to: Term<'a>,
    reference: Term<'a>,
    watcher: Term<'a>,
) -> NifResult<Atom> {
    // A pid that is not (or no longer: a previous run of this node) a process here is no
    // one to tell.
    let reply_to: Option<LocalPid> = reply_to.decode().ok();
    let watcher: Option<LocalPid> = watcher.decode().ok();
    guard(|| {
        let list: Vec<Term> = commands.decode().map_err(|_| bad("commands", "must be a list"))?;
        let commands = list.into_iter().map(decode_command).collect::<Result<Vec<_>>>()?;
        let mut owned = OwnedEnv::new();
        let saved = owned.save(reference);
        let reply = move |result: Result<Vec<Outcome>>| {
            if let (Err(e), Some(watcher)) = (&result, watcher) {
                let _ = OwnedEnv::new().send_and_clear(&watcher, |e2| {
                    (kuma_apply_failed(), shard, raft_index, Reason(e.clone())).encode(e2)
                });
            }
            if let Some(pid) = reply_to {
                let _ = owned.send_and_clear(&pid, |e| {
                    (kuma_applied(), saved.load(e), encode_result(e, result, encode_outcomes)).encode(e)
                });
            }
        };
        let _ = env;
        store.store.replicate(shard, raft_index, commands, Box::new(reply))?;
        Ok(atoms::ok())
    })
}

/// Lets `shard`'s replica apply again after a failed apply: `:ok` once its writer took it.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_replica_reset(store: ResourceArc<StoreResource>, shard: u32) -> NifResult<Atom> {
    guard(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        store.store.replica_reset(shard, Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| Error::Closed)??;
        Ok(atoms::ok())
    })
}

/// The last Raft index applied to `shard`.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_applied_index(store: ResourceArc<StoreResource>, shard: u32) -> NifResult<u64> {
    guard(|| store.store.applied_index(shard))
}

// -- Raft snapshots: a copy of a shard file, and the keys a replica needs to take one ------

fn indexes(list: Vec<Binary>) -> Result<Vec<[u8; 32]>> {
    list.into_iter().map(|b| b.as_slice().try_into().map_err(|_| bad("index", "must be 32 bytes"))).collect()
}

/// A Raft snapshot point: returns once everything queued for `shard` is committed,
/// `{:ok, applied_index}`.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_snapshot_point(store: ResourceArc<StoreResource>, shard: u32) -> NifResult<u64> {
    guard(|| store.store.snapshot_point(shard))
}

/// A copy of `shard`'s file at `path`, made in a read transaction (the writer goes on):
/// `{:ok, applied_index_of_the_copy}`.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_copy(store: ResourceArc<StoreResource>, shard: u32, path: String) -> NifResult<u64> {
    guard(|| store.store.copy_shard(shard, std::path::Path::new(&path)))
}

/// This node no longer holds `shard` (it moved away): its entities' keys are deleted here
/// and its file emptied. `{:ok, keys_deleted}`.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_release(store: ResourceArc<StoreResource>, shard: u32) -> NifResult<u64> {
    guard(|| store.store.release_wait(shard))
}

/// Replaces `shard`'s file by a copy from another replica: `{:ok, applied_index}`.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_install(store: ResourceArc<StoreResource>, shard: u32, path: String) -> NifResult<u64> {
    guard(|| store.store.install_wait(shard, path.into()))
}

/// The keyed hashes of the entities in a shard copy.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_copy_indexes<'a>(env: Env<'a>, path: String) -> NifResult<Term<'a>> {
    guard(|| {
        let list = kuma_core::Store::copy_indexes(std::path::Path::new(&path))?;
        Ok(list.iter().map(|i| bin(env, i)).collect::<Vec<_>>().encode(env))
    })
}

/// Of these keyed hashes, those whose key this node lacks.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_missing_keys<'a>(env: Env<'a>, store: ResourceArc<StoreResource>, list: Vec<Binary>) -> NifResult<Term<'a>> {
    guard(|| {
        let missing = store.store.missing_keys(&indexes(list)?)?;
        Ok(missing.iter().map(|i| bin(env, i)).collect::<Vec<_>>().encode(env))
    })
}

/// The wrapped keys of these keyed hashes that this node has, and those erased here:
/// `{[{index, wrapped}], [index]}`.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_export_keys<'a>(env: Env<'a>, store: ResourceArc<StoreResource>, list: Vec<Binary>) -> NifResult<Term<'a>> {
    guard(|| {
        let wanted = indexes(list)?;
        let keys = store.store.export_keys(&wanted)?;
        let erased = store.store.erased_keys(&wanted)?;
        let keys = keys.iter().map(|(i, w)| (bin(env, i), bin(env, w))).collect::<Vec<_>>();
        let erased = erased.iter().map(|i| bin(env, i)).collect::<Vec<_>>();
        Ok((keys, erased).encode(env))
    })
}

/// Records erasures (keyed hashes) told by another node.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_record_erased(store: ResourceArc<StoreResource>, list: Vec<Binary>) -> NifResult<Atom> {
    guard(|| {
        store.store.record_erased_keys(&indexes(list)?)?;
        Ok(atoms::ok())
    })
}

/// Installs wrapped keys exported by another node.
#[rustler::nif(schedule = "DirtyIo")]
fn cluster_install_keys(store: ResourceArc<StoreResource>, keys: Vec<(Binary, Binary)>) -> NifResult<Atom> {
    guard(|| {
        let keys = keys
            .into_iter()
            .map(|(i, w)| {
                let index: [u8; 32] = i.as_slice().try_into().map_err(|_| bad("index", "must be 32 bytes"))?;
                Ok((index, w.as_slice().to_vec()))
            })
            .collect::<Result<Vec<_>>>()?;
        store.store.install_keys(&keys)?;
        Ok(atoms::ok())
    })
}
