//! The shapes that cross the boundary, each decoded or encoded here, once.
//!
//! Results are records and maps (rustler derives where they fit). Stored events are the
//! one hand-written encoder, because catch-up reads return thousands of events per call:
//! `{:kuma_event, entity_id, seq, position, shard, timestamp, type, metadata, payload,
//! hash}`, the record `Kuma.Native` declares. A batch holds many events of few entities and
//! types, so each distinct id and type becomes one binary shared by its events, and every
//! payload is a sub-binary of one binary holding the batch's payloads: a handful of
//! allocations per batch instead of four per event.

use crate::atoms;
use kuma_core::{Appended, Error, Expected, NewEvent, ScopeMatch, ShardQuery, StoredEvent};
use rustler::types::binary::{Binary, NewBinary, OwnedBinary};
use rustler::{Encoder, Env, NifMap, NifRecord, NifStruct, NifTaggedEnum, Term};
use std::collections::HashMap;

/// A new binary holding `bytes`.
pub fn bin<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    Binary::from(NewBinary::from_slice(env, bytes)).to_term(env)
}

/// Bytes encoded as a binary (a `Vec<u8>` would encode as a list).
pub struct Bytes(pub Vec<u8>);

impl Encoder for Bytes {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        bin(env, &self.0)
    }
}

/// A 32-byte chain hash, encoded as a binary.
pub struct Hash(pub [u8; 32]);

impl Encoder for Hash {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        bin(env, &self.0)
    }
}

/// What a successful append reports: `Kuma.Native`'s `appended` record.
#[derive(NifRecord)]
#[tag = "kuma_appended"]
#[rustler(encode)]
pub struct AppendedTerm {
    shard: u32,
    first_seq: u64,
    last_seq: u64,
    first_pos: u64,
    last_pos: u64,
    timestamp: i64,
    hash: Hash,
}

impl From<Appended> for AppendedTerm {
    fn from(a: Appended) -> Self {
        AppendedTerm {
            shard: a.shard,
            first_seq: a.first_seq,
            last_seq: a.last_seq,
            first_pos: a.first_pos,
            last_pos: a.last_pos,
            timestamp: a.timestamp_us,
            hash: Hash(a.last_hash),
        }
    }
}

/// Stored events as a list of `kuma_event` records (see the module doc).
pub struct Events(pub Vec<StoredEvent>);

impl Encoder for Events {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let total: usize = self.0.iter().map(|e| e.payload.len()).sum();
        let payloads = {
            let mut owned = OwnedBinary::new(total);
            let mut at = 0;
            for e in &self.0 {
                owned.as_mut_slice()[at..at + e.payload.len()].copy_from_slice(&e.payload);
                at += e.payload.len();
            }
            Binary::from_owned(owned, env)
        };
        let mut ids: HashMap<&[u8], Term<'a>> = HashMap::new();
        let mut types: HashMap<&str, Term<'a>> = HashMap::new();
        let tag = atoms::kuma_event().encode(env);
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
                    tag,
                    id,
                    e.seq.encode(env),
                    e.position.encode(env),
                    e.shard.encode(env),
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

/// An entity id: a binary (its limits are checked by the core).
pub fn decode_id(term: Term) -> Result<Vec<u8>, Error> {
    term.decode::<Binary>()
        .map(|b| b.as_slice().to_vec())
        .map_err(|_| Error::Invalid { what: "entity_id", why: "must be a binary".into() })
}

/// `nil` (no check) or the entity's expected last seq.
pub fn decode_expected(term: Term) -> Result<Expected, Error> {
    if term.is_atom() && term.atom_to_string().is_ok_and(|s| s == "nil") {
        return Ok(Expected::Any);
    }
    term.decode::<u64>()
        .map(Expected::Seq)
        .map_err(|_| Error::Invalid { what: "expected_seq", why: "must be nil or a non-negative integer".into() })
}

/// Encoded events: `[{type, metadata, payload, scope | nil}]` (see `Kuma.Codec`).
pub fn decode_events(term: Term) -> Result<Vec<NewEvent>, Error> {
    let bad =
        || Error::Invalid { what: "events", why: "must be a list of {type, metadata, payload, scope} tuples".into() };
    let list: Vec<Term> = term.decode().map_err(|_| bad())?;
    list.into_iter()
        .map(|item| {
            let (t, m, p, scope): (Binary, Binary, Binary, Option<Binary>) = item.decode().map_err(|_| bad())?;
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

/// How a query matches scopes: `{:exact, scope}` or `{:prefix, prefix}`.
#[derive(NifTaggedEnum)]
#[rustler(decode)]
enum ScopeTerm {
    Exact(String),
    Prefix(String),
}

/// A `%Kuma.Query{}` (the filter of queries, projections and subscriptions).
#[derive(NifStruct)]
#[module = "Kuma.Query"]
#[rustler(decode)]
pub struct QueryTerm<'a> {
    types: Vec<String>,
    scope: Option<ScopeTerm>,
    id_prefix: Option<Binary<'a>>,
    entity_id: Option<Binary<'a>>,
    from: Option<i64>,
    to: Option<i64>,
}

impl QueryTerm<'_> {
    /// The core's query for events after position `after`.
    pub fn to_shard_query(&self, after: u64) -> ShardQuery {
        ShardQuery {
            after,
            types: self.types.clone(),
            scope: self.scope.as_ref().map(|s| match s {
                ScopeTerm::Exact(s) => ScopeMatch::Exact(s.clone()),
                ScopeTerm::Prefix(p) => ScopeMatch::Prefix(p.clone()),
            }),
            id_prefix: self.id_prefix.map(|b| b.as_slice().to_vec()),
            entity_id: self.entity_id.map(|b| b.as_slice().to_vec()),
            from_ts: self.from,
            to_ts: self.to,
        }
    }
}

/// An entity's head: `%{seq, position, timestamp, hash}`.
#[derive(NifMap)]
#[rustler(encode)]
pub struct HeadTerm {
    pub seq: u64,
    pub position: u64,
    pub timestamp: i64,
    pub hash: Hash,
}

/// A snapshot: `%{seq, version, timestamp, hash, data}`.
#[derive(NifMap)]
#[rustler(encode)]
pub struct SnapshotTerm {
    pub seq: u64,
    pub version: u32,
    pub timestamp: i64,
    pub hash: Hash,
    pub data: Bytes,
}

impl From<kuma_core::Snapshot> for SnapshotTerm {
    fn from(s: kuma_core::Snapshot) -> Self {
        SnapshotTerm {
            seq: s.seq,
            version: s.version,
            timestamp: s.timestamp_us,
            hash: Hash(s.hash),
            data: Bytes(s.data),
        }
    }
}
