//! Opening and closing a store, and what it tells about itself.

use crate::atoms;
use crate::error::{guard, NifResult};
use kuma_core::{CommitListener, CommittedEntity, Error, Key, Store, StoreConfig, SyncMode};
use rustler::env::OwnedEnv;
use rustler::types::binary::Binary;
use rustler::{Atom, Encoder, LocalPid, NifMap, ResourceArc, Term};
use std::sync::Arc;

/// An open store, as held by Elixir.
pub struct StoreResource {
    pub store: Store,
}

#[rustler::resource_impl]
impl rustler::Resource for StoreResource {}

#[rustler::nif(schedule = "DirtyIo")]
#[allow(clippy::too_many_arguments)]
fn store_open(
    data_dir: String,
    shards: u32,
    sync: Atom,
    writer_threads: u32,
    master_key: Option<Binary>,
    keystore_path: Option<String>,
    file_mode: u32,
    cluster_key: Option<Binary>,
    tail_bytes: u64,
    global_order: bool,
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
        config.file_mode = file_mode;
        // nil = single node; else the cluster's 32-byte key (see kuma_core::replica).
        config.cluster_key = cluster_key
            .map(|k| {
                <[u8; 32]>::try_from(k.as_slice())
                    .map_err(|_| Error::Invalid { what: "cluster_key", why: "must be 32 bytes".into() })
            })
            .transpose()?;
        config.tail_bytes = usize::try_from(tail_bytes).unwrap_or(usize::MAX);
        config.global_order = global_order;
        Ok(ResourceArc::new(StoreResource { store: Store::open(config)? }))
    })
}

#[rustler::nif(schedule = "DirtyIo")]
fn store_close(store: ResourceArc<StoreResource>) -> NifResult<Atom> {
    guard(|| store.store.close().map(|_| atoms::ok()))
}

/// `%{store_id, shards, encrypted}`.
#[derive(NifMap)]
#[rustler(encode)]
struct InfoTerm {
    store_id: String,
    shards: u32,
    encrypted: bool,
}

#[rustler::nif]
fn store_info(store: ResourceArc<StoreResource>) -> InfoTerm {
    let s = &store.store;
    InfoTerm { store_id: s.store_id().to_string(), shards: s.shard_count(), encrypted: s.is_encrypted() }
}

/// The shard that stores `entity_id` (pure; see kuma_core's router).
#[rustler::nif]
fn store_shard_for(store: ResourceArc<StoreResource>, entity_id: Binary) -> u32 {
    store.store.shard_for(entity_id.as_slice())
}

/// Per-shard writer counters: `[%{transactions, events, checkpoints}]`.
#[derive(NifMap)]
#[rustler(encode)]
struct StatsTerm {
    transactions: u64,
    events: u64,
    checkpoints: u64,
}

#[rustler::nif]
fn store_stats(store: ResourceArc<StoreResource>) -> Vec<StatsTerm> {
    store
        .store
        .stats()
        .iter()
        .map(|s| StatsTerm { transactions: s.transactions, events: s.events, checkpoints: s.checkpoints })
        .collect()
}

/// `%{queues, shard_threads, tail_bytes, sqlite_bytes}`: commands waiting for each writer
/// thread, the thread of each shard, and the bytes held natively (for Kuma.Metrics).
#[derive(NifMap)]
#[rustler(encode)]
struct LoadTerm {
    queues: Vec<usize>,
    shard_threads: Vec<usize>,
    tail_bytes: u64,
    sqlite_bytes: u64,
}

#[rustler::nif]
fn store_load(store: ResourceArc<StoreResource>) -> LoadTerm {
    let (queues, shard_threads) = store.store.queue_depths();
    LoadTerm {
        queues,
        shard_threads,
        tail_bytes: store.store.tail_bytes(),
        sqlite_bytes: kuma_core::sqlite::sqlite_memory_used(),
    }
}

/// After each batch of commits the store-wide order recorded, `pid` receives
/// `{:kuma_order, watermark}` (from the sequencer thread). `nil` stops it.
#[rustler::nif]
fn store_follow_order(store: ResourceArc<StoreResource>, pid: Option<LocalPid>) -> Atom {
    let listener = pid.map(|pid| -> kuma_core::order::OrderListener {
        Arc::new(move |watermark: u64| {
            let mut owned = OwnedEnv::new();
            let _ = owned.send_and_clear(&pid, |e| (atoms::kuma_order(), watermark).encode(e));
        })
    });
    store.store.set_order_listener(listener);
    atoms::ok()
}

/// The last position of the store-wide order readers may see (`nil`: no order kept).
#[rustler::nif]
fn store_global_position(store: ResourceArc<StoreResource>) -> Option<u64> {
    store.store.global_position()
}

/// The last committed position of every shard, as a list indexed by shard.
#[rustler::nif]
fn store_commit_positions(store: ResourceArc<StoreResource>) -> Vec<u64> {
    store.store.commit_positions()
}

/// After every commit that wrote events, `pid` receives `{:kuma_commit, shard, last_pos}`
/// (from the writer thread), or with `details` `{:kuma_commit, shard, last_pos, entities}`
/// where `entities` lists `{entity_id, first_pos, prev_pos}` of each entity written (a
/// commit without them may still come: then any entity may have been written). `nil`
/// stops it. One follower per store (`Kuma.Feed`).
#[rustler::nif]
fn store_follow_commits(store: ResourceArc<StoreResource>, pid: Option<LocalPid>, details: bool) -> Atom {
    let listener = pid.map(|pid| -> CommitListener {
        Arc::new(move |shard: u32, pos: u64, entities: Option<&[CommittedEntity]>| {
            let mut owned = OwnedEnv::new();
            let _ = owned.send_and_clear(&pid, |e| match entities {
                None => (atoms::kuma_commit(), shard, pos).encode(e),
                Some(entities) => {
                    let list: Vec<Term> = entities
                        .iter()
                        .map(|c| (crate::term::bin(e, &c.entity_id), c.first_pos, c.prev_pos).encode(e))
                        .collect();
                    (atoms::kuma_commit(), shard, pos, list).encode(e)
                }
            });
        })
    });
    store.store.set_commit_listener(listener, details);
    atoms::ok()
}
