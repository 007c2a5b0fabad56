//! The NIF boundary: term conversion and scheduling only. Logic lives in `kuma_core`.
//!
//! Scheduling rules (ARCHITECTURE.md): appends decode their arguments, hand the work to the
//! shard's writer thread and return at once (the commit is answered later with a message
//! `{:kuma_reply, ref, result}` sent from that thread); anything that may touch the disk or
//! wait runs on a dirty IO scheduler; large appends are decoded on a dirty CPU scheduler.
//! Every NIF body runs inside `guard`, so a Rust panic becomes `{:error, {:panic, msg}}`.
//!
//! The Elixir side is `Kuma.Native`, which declares every function here.

use kuma_core::reader::{EntityVerdict, ScopeMatch, ShardQuery, ShardReport, Snapshot};
use kuma_core::sqldb::{SqlDb, Statement, Value};
use kuma_core::{
    AppendEntry, Appended, Error, Expected, Head, Key, NewEvent, SnapshotRequest, Store, StoreConfig, StoredEvent,
    SyncMode,
};
use rustler::env::OwnedEnv;
use rustler::types::binary::{Binary, NewBinary};
use rustler::{Encoder, Env, ResourceArc, Term};
use std::panic::{catch_unwind, AssertUnwindSafe};

mod atoms {
    rustler::atoms! {
        ok,
        error,
        nil,
        normal,
        full,
        kuma_reply,
        invalid,
        too_large,
        wrong_expected_seq,
        store_closed,
        data_dir_locked,
        shard_count_mismatch,
        foreign_file,
        missing_shard,
        unsupported_format,
        storage,
        corrupt,
        panic,
        intact,
        broken,
        entity_id,
        event_type,
        metadata,
        payload,
        events,
        append,
        entries,
        shards,
        shard,
        expected_seq,
        sync,
        data_dir,
        store_id,
        transactions,
        checkpoints,
        problems,
        entities,
        snapshot,
        wrong_master_key,
        missing_keystore,
        encryption_mismatch,
        store_is_encrypted,
        store_is_plain,
        entity_erased,
        decrypt_failed,
        sensitive,
        master_key,
        key,
        kuma_commit,
        exact,
        prefix,
        blob,
        sql,
        rows,
        scope,
        types,
        query,
        sql_params,
    }
}

/// An open store, as held by Elixir.
pub struct StoreResource {
    store: Store,
}

#[rustler::resource_impl]
impl rustler::Resource for StoreResource {}

/// Wraps a core error so it can be encoded as the documented reason term.
struct Reason(Error);

fn what_atom<'a>(env: Env<'a>, what: &str) -> Term<'a> {
    // The set of `what`s is fixed in the core; unknown ones become strings rather than atoms.
    match what {
        "entity_id" => atoms::entity_id().encode(env),
        "event_type" => atoms::event_type().encode(env),
        "metadata" => atoms::metadata().encode(env),
        "payload" => atoms::payload().encode(env),
        "events" => atoms::events().encode(env),
        "append" => atoms::append().encode(env),
        "entries" => atoms::entries().encode(env),
        "shards" => atoms::shards().encode(env),
        "shard" => atoms::shard().encode(env),
        "expected_seq" => atoms::expected_seq().encode(env),
        "sync" => atoms::sync().encode(env),
        "data_dir" => atoms::data_dir().encode(env),
        "snapshot" => atoms::snapshot().encode(env),
        "sensitive" => atoms::sensitive().encode(env),
        "master_key" => atoms::master_key().encode(env),
        "key" => atoms::key().encode(env),
        "scope" => atoms::scope().encode(env),
        "types" => atoms::types().encode(env),
        "query" => atoms::query().encode(env),
        "rows" => atoms::rows().encode(env),
        "sql_params" => atoms::sql_params().encode(env),
        other => other.encode(env),
    }
}

impl Encoder for Reason {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match &self.0 {
            Error::Invalid { what, why } => (atoms::invalid(), what_atom(env, what), why.as_str()).encode(env),
            Error::TooLarge { what, size, max } => (atoms::too_large(), what_atom(env, what), *size, *max).encode(env),
            Error::WrongExpectedSeq { expected, actual } => {
                (atoms::wrong_expected_seq(), *expected, *actual).encode(env)
            }
            Error::Closed => atoms::store_closed().encode(env),
            Error::Locked { path } => (atoms::data_dir_locked(), path.as_str()).encode(env),
            Error::ShardCountMismatch { stored, given } => (atoms::shard_count_mismatch(), *stored, *given).encode(env),
            Error::ForeignFile { path, why } => (atoms::foreign_file(), path.as_str(), why.as_str()).encode(env),
            Error::MissingShard { path } => (atoms::missing_shard(), path.as_str()).encode(env),
            Error::UnsupportedFormat { found, supported } => {
                (atoms::unsupported_format(), *found, *supported).encode(env)
            }
            Error::Storage { context, message } => (atoms::storage(), *context, message.as_str()).encode(env),
            Error::Corrupt { seq, why } => (atoms::corrupt(), *seq, why.as_str()).encode(env),
            Error::Panic { message } => (atoms::panic(), message.as_str()).encode(env),
            Error::WrongMasterKey => atoms::wrong_master_key().encode(env),
            Error::MissingKeystore { path } => (atoms::missing_keystore(), path.as_str()).encode(env),
            Error::EncryptionMismatch { stored: true } => {
                (atoms::encryption_mismatch(), atoms::store_is_encrypted()).encode(env)
            }
            Error::EncryptionMismatch { stored: false } => {
                (atoms::encryption_mismatch(), atoms::store_is_plain()).encode(env)
            }
            Error::Erased => atoms::entity_erased().encode(env),
            Error::Decrypt { seq, why } => (atoms::decrypt_failed(), *seq, why.as_str()).encode(env),
            Error::Sql { index, message } => (atoms::sql(), *index, message.as_str()).encode(env),
        }
    }
}

/// `{:ok, value}` or `{:error, reason}`.
type NifResult<T> = Result<T, Reason>;

/// Runs a NIF body, turning a panic into `Error::Panic`.
fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> NifResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(Reason),
        Err(panic) => Err(Reason(Error::from_panic(panic))),
    }
}

fn bin<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    Binary::from(NewBinary::from_slice(env, bytes)).to_term(env)
}

fn encode_appended<'a>(env: Env<'a>, a: &Appended) -> Term<'a> {
    (a.first_seq, a.last_seq, a.first_pos, a.last_pos, a.timestamp_us, bin(env, &a.last_hash)).encode(env)
}

fn encode_append_result<'a>(env: Env<'a>, r: &Result<Appended, Error>) -> Term<'a> {
    match r {
        Ok(a) => (atoms::ok(), encode_appended(env, a)).encode(env),
        Err(e) => (atoms::error(), Reason(e.clone())).encode(env),
    }
}

/// Encodes stored events as `{entity_id, seq, position, ts, type, metadata, payload, hash}`.
/// A batch of a shard holds many events of few entities and types: each distinct id and
/// type becomes one binary shared by its events, and every payload is a sub-binary of one
/// binary holding the batch's payloads, so a batch costs a handful of allocations instead
/// of four per event (catch-up reads return thousands of events per call).
struct Events(Vec<StoredEvent>);

impl Encoder for Events {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let total: usize = self.0.iter().map(|e| e.payload.len()).sum();
        let payloads = {
            let mut owned = rustler::OwnedBinary::new(total);
            let mut at = 0;
            for e in &self.0 {
                owned.as_mut_slice()[at..at + e.payload.len()].copy_from_slice(&e.payload);
                at += e.payload.len();
            }
            Binary::from_owned(owned, env)
        };
        let mut ids: std::collections::HashMap<&[u8], Term<'a>> = std::collections::HashMap::new();
        let mut types: std::collections::HashMap<&str, Term<'a>> = std::collections::HashMap::new();
        let empty = bin(env, &[]);
        let mut at = 0;
        let items: Vec<Term<'a>> = self
            .0
            .iter()
            .map(|e| {
                let id = *ids.entry(e.entity_id.as_slice()).or_insert_with(|| bin(env, &e.entity_id));
                let ty = *types.entry(e.event_type.as_str()).or_insert_with(|| e.event_type.as_str().encode(env));
                let payload = payloads
                    .make_subbinary(at, e.payload.len())
                    .map(|b| b.to_term(env))
                    .unwrap_or_else(|_| bin(env, &e.payload));
                at += e.payload.len();
                let meta = if e.metadata.is_empty() { empty } else { bin(env, &e.metadata) };
                let fields = [
                    id,
                    e.seq.encode(env),
                    e.position.encode(env),
                    e.timestamp_us.encode(env),
                    ty,
                    meta,
                    payload,
                    bin(env, &e.hash),
                ];
                rustler::types::tuple::make_tuple(env, &fields)
            })
            .collect();
        items.encode(env)
    }
}

/// Sends `{:kuma_reply, ref, message}` to the calling process from a writer thread.
fn replier<'a>(
    env: Env<'a>,
    reference: Term<'a>,
) -> Result<(OwnedEnv, rustler::env::SavedTerm, rustler::LocalPid), Error> {
    if !reference.is_ref() {
        return Err(Error::Invalid { what: "reply_ref", why: "must be a reference".into() });
    }
    let owned = OwnedEnv::new();
    let saved = owned.save(reference);
    Ok((owned, saved, env.pid()))
}

fn decode_expected(term: Term) -> Result<Expected, Error> {
    if term.is_atom() && term.atom_to_string().is_ok_and(|s| s == "nil" || s == "any") {
        return Ok(Expected::Any);
    }
    match term.decode::<u64>() {
        Ok(n) => Ok(Expected::Seq(n)),
        Err(_) => Err(Error::Invalid { what: "expected_seq", why: "must be nil or a non-negative integer".into() }),
    }
}

fn decode_events(term: Term) -> Result<Vec<NewEvent>, Error> {
    let bad = || Error::Invalid {
        what: "events",
        why: "must be a list of {type, metadata, payload} or {type, metadata, payload, scope} tuples".into(),
    };
    let list: Vec<Term> = term.decode().map_err(|_| bad())?;
    list.into_iter()
        .map(|item| {
            let (t, m, p, scope): (Binary, Binary, Binary, Option<Binary>) = match item.decode() {
                Ok((t, m, p)) => (t, m, p, None),
                Err(_) => item.decode().map_err(|_| bad())?,
            };
            let utf8 = |b: Binary, what: &'static str| {
                std::str::from_utf8(b.as_slice())
                    .map(str::to_string)
                    .map_err(|_| Error::Invalid { what, why: "must be valid UTF-8".into() })
            };
            Ok(NewEvent {
                event_type: utf8(t, "event_type")?,
                metadata: m.as_slice().to_vec(),
                payload: p.as_slice().to_vec(),
                scope: scope.map(|s| utf8(s, "scope")).transpose()?,
            })
        })
        .collect()
}

fn decode_id(term: Term) -> Result<Vec<u8>, Error> {
    term.decode::<Binary>()
        .map(|b| b.as_slice().to_vec())
        .map_err(|_| Error::Invalid { what: "entity_id", why: "must be a binary".into() })
}

#[rustler::nif(schedule = "DirtyIo")]
fn store_open(
    data_dir: String,
    shards: u32,
    sync: rustler::Atom,
    writer_threads: u32,
    master_key: Option<Binary>,
    keystore_path: Option<String>,
) -> NifResult<ResourceArc<StoreResource>> {
    guard(|| {
        let sync = if sync == atoms::full() {
            SyncMode::Full
        } else if sync == atoms::normal() {
            SyncMode::Normal
        } else {
            return Err(Error::Invalid { what: "sync", why: "must be :normal or :full".into() });
        };
        let mut config = StoreConfig::new(data_dir);
        config.shards = shards;
        config.sync = sync;
        // 0 = one writer thread per shard.
        config.writer_threads = (writer_threads > 0).then_some(writer_threads as usize);
        // nil = a plain store (created with encryption: false).
        config.master_key = master_key.map(|k| Key::from_bytes(k.as_slice())).transpose()?;
        config.keystore_path = keystore_path.map(std::path::PathBuf::from);
        Ok(ResourceArc::new(StoreResource { store: Store::open(config)? }))
    })
}

#[rustler::nif(schedule = "DirtyIo")]
fn store_close(store: ResourceArc<StoreResource>) -> NifResult<rustler::Atom> {
    guard(|| store.store.close().map(|_| atoms::ok()))
}

#[rustler::nif]
fn store_info(env: Env, store: ResourceArc<StoreResource>) -> Term {
    let s = &store.store;
    let pairs = [
        (atoms::store_id().encode(env), s.store_id().encode(env)),
        (atoms::shards().encode(env), s.shard_count().encode(env)),
        (atoms::data_dir().encode(env), s.data_dir().display().to_string().encode(env)),
    ];
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
}

/// Shard of an entity id for a given shard count (pure; no store needed).
#[rustler::nif]
fn shard_for(entity_id: Binary, shards: u32) -> u32 {
    kuma_core::router::shard_for(entity_id.as_slice(), shards)
}

fn do_append<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    expected: Term<'a>,
    events: Term<'a>,
) -> NifResult<rustler::Atom> {
    guard(|| {
        let id = decode_id(entity_id)?;
        let expected = decode_expected(expected)?;
        let events = decode_events(events)?;
        let (mut owned, saved, pid) = replier(env, reference)?;
        store.store.append(
            id,
            expected,
            events,
            Box::new(move |result| {
                let _ = owned.send_and_clear(&pid, |e| {
                    (atoms::kuma_reply(), saved.load(e), encode_append_result(e, &result)).encode(e)
                });
            }),
        )?;
        Ok(atoms::ok())
    })
}

/// Queues an append; the result arrives as `{:kuma_reply, ref, {:ok, tuple} | {:error, reason}}`.
#[rustler::nif]
fn append<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    expected: Term<'a>,
    events: Term<'a>,
) -> NifResult<rustler::Atom> {
    do_append(env, store, reference, entity_id, expected, events)
}

/// `append` for large inputs, whose decoding and copying may exceed ~100 µs.
#[rustler::nif(schedule = "DirtyCpu")]
fn append_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    expected: Term<'a>,
    events: Term<'a>,
) -> NifResult<rustler::Atom> {
    do_append(env, store, reference, entity_id, expected, events)
}

fn do_append_batch<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entries: Term<'a>,
) -> NifResult<rustler::Atom> {
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
            .collect::<Result<Vec<_>, Error>>()?;
        let (mut owned, saved, pid) = replier(env, reference)?;
        store.store.append_batch(
            entries,
            Box::new(move |results| {
                let _ = owned.send_and_clear(&pid, |e| {
                    let list: Vec<Term> = results.iter().map(|r| encode_append_result(e, r)).collect();
                    (atoms::kuma_reply(), saved.load(e), list).encode(e)
                });
            }),
        )?;
        Ok(atoms::ok())
    })
}

/// Queues appends to many entities; the reply carries one result per entry, in order.
#[rustler::nif]
fn append_batch<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entries: Term<'a>,
) -> NifResult<rustler::Atom> {
    do_append_batch(env, store, reference, entries)
}

/// `append_batch` for large inputs.
#[rustler::nif(schedule = "DirtyCpu")]
fn append_batch_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entries: Term<'a>,
) -> NifResult<rustler::Atom> {
    do_append_batch(env, store, reference, entries)
}

#[allow(clippy::too_many_arguments)]
fn do_save_snapshot<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    seq: u64,
    version: u32,
    hash: Binary<'a>,
    data: Binary<'a>,
) -> NifResult<rustler::Atom> {
    guard(|| {
        let hash: [u8; 32] = hash
            .as_slice()
            .try_into()
            .map_err(|_| Error::Invalid { what: "snapshot", why: "hash must be 32 bytes".into() })?;
        let snapshot =
            SnapshotRequest { entity_id: decode_id(entity_id)?, seq, version, hash, data: data.as_slice().to_vec() };
        let (mut owned, saved, pid) = replier(env, reference)?;
        store.store.save_snapshot(
            snapshot,
            Box::new(move |result| {
                let _ = owned.send_and_clear(&pid, |e| {
                    let answer = match result {
                        Ok(()) => atoms::ok().encode(e),
                        Err(err) => (atoms::error(), Reason(err)).encode(e),
                    };
                    (atoms::kuma_reply(), saved.load(e), answer).encode(e)
                });
            }),
        )?;
        Ok(atoms::ok())
    })
}

/// Queues a snapshot; answered with `{:kuma_reply, ref, :ok | {:error, reason}}`.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn save_snapshot<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    seq: u64,
    version: u32,
    hash: Binary<'a>,
    data: Binary<'a>,
) -> NifResult<rustler::Atom> {
    do_save_snapshot(env, store, reference, entity_id, seq, version, hash, data)
}

/// `save_snapshot` for large snapshots (the copy may exceed ~100 µs).
#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn save_snapshot_dirty<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
    seq: u64,
    version: u32,
    hash: Binary<'a>,
    data: Binary<'a>,
) -> NifResult<rustler::Atom> {
    do_save_snapshot(env, store, reference, entity_id, seq, version, hash, data)
}

struct SnapshotTerm(Option<Snapshot>);

impl Encoder for SnapshotTerm {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match &self.0 {
            None => atoms::nil().encode(env),
            Some(s) => (s.seq, s.version, s.timestamp_us, bin(env, &s.hash), bin(env, &s.data)).encode(env),
        }
    }
}

#[rustler::nif(schedule = "DirtyIo")]
fn latest_snapshot(
    store: ResourceArc<StoreResource>,
    entity_id: Term,
    version: u32,
    max_seq: u64,
) -> NifResult<SnapshotTerm> {
    guard(|| {
        let id = decode_id(entity_id)?;
        store.store.latest_snapshot(&id, version, max_seq).map(SnapshotTerm)
    })
}

#[rustler::nif(schedule = "DirtyIo")]
fn seq_at(store: ResourceArc<StoreResource>, entity_id: Term, ts_us: i64) -> NifResult<u64> {
    guard(|| {
        let id = decode_id(entity_id)?;
        store.store.seq_at(&id, ts_us)
    })
}

/// Queues the erasure of an entity; answered with `{:kuma_reply, ref, {:ok, events} | {:error, reason}}`.
#[rustler::nif]
fn delete<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    reference: Term<'a>,
    entity_id: Term<'a>,
) -> NifResult<rustler::Atom> {
    guard(|| {
        let id = decode_id(entity_id)?;
        let (mut owned, saved, pid) = replier(env, reference)?;
        store.store.delete(
            id,
            Box::new(move |result| {
                let _ = owned.send_and_clear(&pid, |e| {
                    let answer = match result {
                        Ok(n) => (atoms::ok(), n).encode(e),
                        Err(err) => (atoms::error(), Reason(err)).encode(e),
                    };
                    (atoms::kuma_reply(), saved.load(e), answer).encode(e)
                });
            }),
        )?;
        Ok(atoms::ok())
    })
}

/// Seals a value under a subject's data key (creating it durably if needed).
#[rustler::nif(schedule = "DirtyIo")]
fn seal_sensitive<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    subject_id: Term<'a>,
    plaintext: Binary<'a>,
) -> NifResult<Term<'a>> {
    guard(|| {
        let subject = decode_id(subject_id)?;
        store.store.seal_sensitive(&subject, plaintext.as_slice()).map(|sealed| bin(env, &sealed))
    })
}

/// Opens a sealed value; `{:error, :entity_erased}` once the subject is erased.
#[rustler::nif(schedule = "DirtyIo")]
fn unseal_sensitive<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    subject_id: Term<'a>,
    sealed: Binary<'a>,
) -> NifResult<Term<'a>> {
    guard(|| {
        let subject = decode_id(subject_id)?;
        store.store.unseal_sensitive(&subject, sealed.as_slice()).map(|plain| bin(env, &plain))
    })
}

#[rustler::nif(schedule = "DirtyIo")]
fn rotate_master_key(store: ResourceArc<StoreResource>, new_key: Binary) -> NifResult<u64> {
    guard(|| store.store.rotate_master_key(Key::from_bytes(new_key.as_slice())?))
}

#[rustler::nif(schedule = "DirtyIo")]
fn is_erased(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<bool> {
    guard(|| {
        let id = decode_id(entity_id)?;
        store.store.is_erased(&id)
    })
}

struct Snapshots(Vec<kuma_core::Snapshot>);

impl Encoder for Snapshots {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let items: Vec<Term<'a>> = self.0.iter().map(|s| SnapshotTerm(Some(s.clone())).encode(env)).collect();
        items.encode(env)
    }
}

/// Every snapshot of an entity, decrypted: `[{seq, version, timestamp_us, hash, data}]`.
#[rustler::nif(schedule = "DirtyIo")]
fn snapshots(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<Snapshots> {
    guard(|| {
        let id = decode_id(entity_id)?;
        store.store.snapshots(&id).map(Snapshots)
    })
}

#[rustler::nif]
fn store_encrypted(store: ResourceArc<StoreResource>) -> bool {
    store.store.is_encrypted()
}

#[rustler::nif(schedule = "DirtyIo")]
fn flush(store: ResourceArc<StoreResource>) -> NifResult<rustler::Atom> {
    guard(|| store.store.flush().map(|_| atoms::ok()))
}

#[rustler::nif(schedule = "DirtyIo")]
fn read_entity(store: ResourceArc<StoreResource>, entity_id: Term, from_seq: u64, max: usize) -> NifResult<Events> {
    guard(|| {
        let id = decode_id(entity_id)?;
        store.store.read_entity(&id, from_seq, max).map(Events)
    })
}

#[rustler::nif(schedule = "DirtyIo")]
fn read_shard(store: ResourceArc<StoreResource>, shard: u32, after: u64, max: usize) -> NifResult<Events> {
    guard(|| store.store.read_shard(shard, after, max).map(Events))
}

/// `{after, types, scope, id_prefix, from_ts, to_ts}` with scope `nil | {:exact, s} |
/// {:prefix, s}` (see `Kuma.Query`).
fn decode_query(term: Term) -> Result<ShardQuery, Error> {
    let bad = |why: &str| Error::Invalid { what: "query", why: why.into() };
    type Raw<'a> = (u64, Vec<String>, Term<'a>, Option<Binary<'a>>, Option<i64>, Option<i64>);
    let (after, types, scope, id_prefix, from_ts, to_ts): Raw =
        term.decode().map_err(|_| bad("must be {after, types, scope, id_prefix, from_ts, to_ts}"))?;
    let scope = if scope.is_atom() && scope.atom_to_string().is_ok_and(|a| a == "nil") {
        None
    } else {
        let (kind, text): (rustler::Atom, String) =
            scope.decode().map_err(|_| bad("scope must be nil, {:exact, string} or {:prefix, string}"))?;
        Some(if kind == atoms::exact() {
            ScopeMatch::Exact(text)
        } else if kind == atoms::prefix() {
            ScopeMatch::Prefix(text)
        } else {
            return Err(bad("scope must be nil, {:exact, string} or {:prefix, string}"));
        })
    };
    Ok(ShardQuery { after, types, scope, id_prefix: id_prefix.map(|b| b.as_slice().to_vec()), from_ts, to_ts })
}

/// Matching events of one shard and the position searched up to: `{events, searched}`.
#[rustler::nif(schedule = "DirtyIo")]
fn query_shard<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    shard: u32,
    query: Term<'a>,
    max: usize,
) -> NifResult<Term<'a>> {
    guard(|| {
        let q = decode_query(query)?;
        let (events, searched) = store.store.query_shard(shard, &q, max)?;
        Ok((Events(events), searched).encode(env))
    })
}

/// The last committed position of every shard, as a list indexed by shard.
#[rustler::nif]
fn commit_positions(store: ResourceArc<StoreResource>) -> Vec<u64> {
    store.store.commit_positions()
}

/// After every commit that wrote events, `pid` receives `{:kuma_commit, shard, last_pos}`
/// (from the writer thread). `nil` stops it. One listener per store.
#[rustler::nif]
fn set_commit_listener(store: ResourceArc<StoreResource>, pid: Option<rustler::LocalPid>) -> rustler::Atom {
    let listener: Option<kuma_core::CommitListener> = pid.map(|pid| {
        let f: kuma_core::CommitListener = std::sync::Arc::new(move |shard: u32, pos: u64| {
            let mut owned = OwnedEnv::new();
            let _ = owned.send_and_clear(&pid, |e| (atoms::kuma_commit(), shard, pos).encode(e));
        });
        f
    });
    store.store.set_commit_listener(listener);
    atoms::ok()
}

/// A read model's database, as held by Elixir.
pub struct SqlDbResource {
    db: SqlDb,
}

#[rustler::resource_impl]
impl rustler::Resource for SqlDbResource {}

/// Parameters: integers, floats, binaries (TEXT when valid UTF-8, else BLOB), `{:blob, b}`,
/// `nil`, `true`/`false` (1/0).
fn decode_value(term: Term) -> Result<Value, Error> {
    let bad = || Error::Invalid {
        what: "sql_params",
        why: "a parameter must be an integer (64-bit), float, binary, {:blob, binary}, nil or boolean".into(),
    };
    if let Ok(n) = term.decode::<i64>() {
        return Ok(Value::Integer(n));
    }
    if let Ok(x) = term.decode::<f64>() {
        return Ok(Value::Real(x));
    }
    if let Ok(b) = term.decode::<Binary>() {
        return Ok(match std::str::from_utf8(b.as_slice()) {
            Ok(text) => Value::Text(text.to_string()),
            Err(_) => Value::Blob(b.as_slice().to_vec()),
        });
    }
    if term.is_atom() {
        return match term.atom_to_string().map_err(|_| bad())?.as_str() {
            "nil" => Ok(Value::Null),
            "true" => Ok(Value::Integer(1)),
            "false" => Ok(Value::Integer(0)),
            _ => Err(bad()),
        };
    }
    if let Ok((tag, b)) = term.decode::<(rustler::Atom, Binary)>() {
        if tag == atoms::blob() {
            return Ok(Value::Blob(b.as_slice().to_vec()));
        }
    }
    Err(bad())
}

fn decode_params(term: Term) -> Result<Vec<Value>, Error> {
    let list: Vec<Term> =
        term.decode().map_err(|_| Error::Invalid { what: "sql_params", why: "must be a list".into() })?;
    list.into_iter().map(decode_value).collect()
}

fn encode_value<'a>(env: Env<'a>, v: &Value) -> Term<'a> {
    match v {
        Value::Null => atoms::nil().encode(env),
        Value::Integer(n) => n.encode(env),
        Value::Real(x) => x.encode(env),
        Value::Text(t) => t.as_str().encode(env),
        Value::Blob(b) => bin(env, b),
    }
}

#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_open(path: String) -> NifResult<ResourceArc<SqlDbResource>> {
    guard(|| Ok(ResourceArc::new(SqlDbResource { db: SqlDb::open(std::path::Path::new(&path))? })))
}

/// Runs `[{sql, params}]` in one transaction: `{:ok, [changed]}` or `{:error, {:sql, index, msg}}`.
#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_transaction(db: ResourceArc<SqlDbResource>, statements: Term) -> NifResult<Vec<u64>> {
    guard(|| {
        let raw: Vec<(String, Term)> = statements
            .decode()
            .map_err(|_| Error::Invalid { what: "sql", why: "statements must be a list of {sql, params}".into() })?;
        let statements = raw
            .into_iter()
            .map(|(sql, params)| Ok(Statement { sql, params: decode_params(params)? }))
            .collect::<Result<Vec<_>, Error>>()?;
        db.db.transaction(&statements)
    })
}

/// `{:ok, {columns, rows}}`, rows as lists.
#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_query<'a>(env: Env<'a>, db: ResourceArc<SqlDbResource>, sql: String, params: Term<'a>) -> NifResult<Term<'a>> {
    guard(|| {
        let params = decode_params(params)?;
        let rows = db.db.query(&sql, &params)?;
        let encoded: Vec<Term<'a>> =
            rows.rows.iter().map(|r| r.iter().map(|v| encode_value(env, v)).collect::<Vec<_>>().encode(env)).collect();
        Ok((rows.columns, encoded).encode(env))
    })
}

#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_truncate_wal(db: ResourceArc<SqlDbResource>) -> NifResult<rustler::Atom> {
    guard(|| db.db.truncate_wal().map(|_| atoms::ok()))
}

#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_close(db: ResourceArc<SqlDbResource>) -> rustler::Atom {
    db.db.close();
    atoms::ok()
}

struct HeadTerm(Option<Head>);

impl Encoder for HeadTerm {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match &self.0 {
            None => atoms::nil().encode(env),
            Some(h) => (h.seq, h.pos, h.ts, bin(env, &h.hash)).encode(env),
        }
    }
}

#[rustler::nif(schedule = "DirtyIo")]
fn head(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<HeadTerm> {
    guard(|| {
        let id = decode_id(entity_id)?;
        store.store.head(&id).map(HeadTerm)
    })
}

struct Verdict(EntityVerdict);

impl Encoder for Verdict {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match &self.0 {
            EntityVerdict::Intact { events, head_hash } => (atoms::intact(), *events, bin(env, head_hash)).encode(env),
            EntityVerdict::Broken { seq, why } => (atoms::broken(), *seq, why.as_str()).encode(env),
        }
    }
}

#[rustler::nif(schedule = "DirtyIo")]
fn verify_entity(store: ResourceArc<StoreResource>, entity_id: Term) -> NifResult<Verdict> {
    guard(|| {
        let id = decode_id(entity_id)?;
        store.store.verify_entity(&id).map(Verdict)
    })
}

struct Report(ShardReport);

impl Encoder for Report {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let problems: Vec<Term<'a>> =
            self.0.problems.iter().map(|p| (bin(env, &p.entity_id), p.seq, p.why.as_str()).encode(env)).collect();
        let pairs = [
            (atoms::entities().encode(env), self.0.entities.encode(env)),
            (atoms::events().encode(env), self.0.events.encode(env)),
            (atoms::problems().encode(env), problems.encode(env)),
        ];
        Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
    }
}

#[rustler::nif(schedule = "DirtyIo")]
fn verify_shard(store: ResourceArc<StoreResource>, shard: u32, max_problems: usize) -> NifResult<Report> {
    guard(|| store.store.verify_shard(shard, max_problems).map(Report))
}

#[rustler::nif]
fn stats(env: Env, store: ResourceArc<StoreResource>) -> Term {
    let list: Vec<Term> = store
        .store
        .stats()
        .iter()
        .map(|s| {
            let pairs = [
                (atoms::transactions().encode(env), s.transactions.encode(env)),
                (atoms::events().encode(env), s.events.encode(env)),
                (atoms::checkpoints().encode(env), s.checkpoints.encode(env)),
            ];
            Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
        })
        .collect();
    list.encode(env)
}

/// Test builds only: panics inside a NIF, to show the VM survives it.
#[rustler::nif]
fn fault_panic() -> NifResult<rustler::Atom> {
    guard(|| {
        if cfg!(feature = "fault-injection") {
            panic!("fault injection: NIF panic requested");
        }
        Err(Error::Invalid { what: "fault_panic", why: "not a fault-injection build".into() })
    })
}

rustler::init!("Elixir.Kuma.Native");
