//! A store: a data directory holding N shards, one writer thread per shard, and pools of
//! reader connections. This is the core's public entry point.
//!
//! Data directory layout (docs/storage-format.md):
//! ```text
//! <data_dir>/LOCK            held with an exclusive file lock while a store is open
//! <data_dir>/KUMA            manifest: format, store id, shard count (written last on creation)
//! <data_dir>/shards/NNN.kuma one SQLite file per shard (+ -wal, -shm)
//! ```

use crate::cipher::{self, Binding, Key};
use crate::codec::{validate_append, validate_entity_id, Expected, NewEvent, StoredEvent};
use crate::error::{Error, Result};
use crate::heads::{Head, Heads};
use crate::keystore::Keystore;
use crate::manifest::Manifest;
use crate::order::{Order, OrderListener};
use crate::protection::Protection;
use crate::query::{self, Page, ShardQuery};
use crate::reader::{self, Entity, Snapshot};
use crate::readers::Readers;
use crate::replica::{AppendRequest, Outcome, PreparedAppend, Replicated, SealedEvent};
use crate::router::shard_for;
use crate::shard::{self, ShardIdentity, FORMAT_VERSION};
use crate::sqlite::{self, SyncMode};
use crate::tail::Tail;
use crate::verify::{self, EntityVerdict, ShardReport};
use crate::writer::{
    AppendEntry, Appended, Command, CommitListener, Commits, Reply, ShardSpec, Shared, SnapshotRequest, WriterConfig,
    WriterStats, Writers,
};
use rusqlite::Connection;
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub shards: u32,
    pub sync: SyncMode,
    pub writer: WriterConfig,
    /// Most entity heads kept in memory per shard (clean ones beyond it are dropped).
    pub heads_cap: usize,
    /// The master key: `Some` = an encrypted store (the default in Kuma's Elixir API),
    /// `None` = a plain store. Fixed when the store is created.
    pub master_key: Option<Key>,
    /// Where the keystore is (default `<data_dir>/keystore.kuma`).
    pub keystore_path: Option<PathBuf>,
    /// Writer threads; shard i is served by thread i % writer_threads. `None` (default):
    /// one per shard. Fewer threads mean fewer OS context switches but also a smaller share
    /// of the CPU against the BEAM's schedulers (docs/benchmarks.md, "Writer threads").
    pub writer_threads: Option<usize>,
    /// Permissions of the files Kuma creates (directories get the matching search bits);
    /// default 0600, the owner's only.
    pub file_mode: u32,
    /// Cluster mode: the cluster's key for keyed hashes of ids (the keystore's index key,
    /// or a plain store's tombstone key), the same on every node. The store is then a set
    /// of replicas, written only by applying replicated commands (replica.rs).
    pub cluster_key: Option<[u8; 32]>,
    /// Bytes of newest committed events each shard keeps in memory, in clear, to answer
    /// readers that have caught up without reading the file (tail.rs); 0 turns it off.
    /// Not kept by cluster replicas.
    pub tail_bytes: usize,
    /// Keep the store-wide order (order.rs): one gapless sequence over every shard's events
    /// in commit order, in `order.kuma`. Single node only (ignored in cluster mode).
    pub global_order: bool,
}

impl StoreConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            shards: 16,
            sync: SyncMode::Normal,
            writer: WriterConfig::default(),
            heads_cap: 65_536,
            writer_threads: None,
            master_key: None,
            keystore_path: None,
            file_mode: sqlite::DEFAULT_FILE_MODE,
            cluster_key: None,
            tail_bytes: crate::tail::DEFAULT_TAIL_BYTES,
            global_order: true,
        }
    }
}

/// A page of the store-wide order (`Store::read_all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllPage {
    /// (global position, event), in global order.
    pub events: Vec<(u64, StoredEvent)>,
    /// The global position searched to: read on after it.
    pub searched: u64,
}

/// Largest snapshot, in bytes.
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// Most shards a store may have.
pub const MAX_SHARDS: u32 = 1024;

/// What readers share about one shard: its heads (kept by its writer) and its connections.
struct ShardHandle {
    heads: Arc<Heads>,
    readers: Readers,
    stats: Arc<Mutex<WriterStats>>,
    /// The newest committed events, in clear (tail.rs).
    tail: Arc<Tail>,
}

/// An open store. Cheap to share (`Arc<Store>`); every method is thread-safe.
pub struct Store {
    data_dir: PathBuf,
    store_id: String,
    shards: Vec<ShardHandle>,
    writers: Writers,
    closed: AtomicBool,
    protection: Arc<Protection>,
    commits: Arc<Commits>,
    /// The store-wide order (order.rs), when kept.
    order: Option<Arc<Order>>,
    /// The data directory's and LOCK's flocks, released by `close`.
    lock: Mutex<Option<(File, File)>>,
    /// Cluster mode: written only through `replicate` (see replica.rs).
    replicated: bool,
    /// Permissions of the files the store creates (shard copies too).
    file_mode: u32,
}

impl Store {
    /// Opens (or creates) the store in `config.data_dir`.
    pub fn open(config: StoreConfig) -> Result<Store> {
        if config.shards == 0 || config.shards > MAX_SHARDS {
            return Err(Error::invalid("shards", format!("must be 1..={MAX_SHARDS}, got {}", config.shards)));
        }
        let dir = config.data_dir.clone();
        let mode = config.file_mode;
        sqlite::create_dirs(&dir, mode, "create data dir")?;
        // The directory itself is locked (flock), and LOCK too: deleting a file cannot admit
        // a second writer of the same shards.
        let lock = sqlite::lock(&dir, &dir, mode, "lock data dir")?;
        let lock_file = sqlite::lock(&dir.join("LOCK"), &dir, mode, "lock data dir")?;

        let shard_dir = dir.join("shards");
        let encrypted = config.master_key.is_some();
        let (manifest, creating) = match Manifest::read(&dir)? {
            Some(m) => {
                if m.format > FORMAT_VERSION {
                    return Err(Error::UnsupportedFormat { found: m.format, supported: FORMAT_VERSION });
                }
                if m.shards != config.shards {
                    return Err(Error::ShardCountMismatch { stored: m.shards, given: config.shards });
                }
                if m.encrypted != encrypted {
                    return Err(Error::EncryptionMismatch { stored: m.encrypted });
                }
                if let (Some(cluster), Some(stored)) = (config.cluster_key, m.tombstone_key) {
                    if cluster != stored {
                        return Err(Error::ClusterMismatch {
                            why: "the data dir was written by another cluster".into(),
                        });
                    }
                }
                (m, false)
            }
            None => {
                let leftovers = std::fs::read_dir(&shard_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
                if leftovers {
                    return Err(Error::ForeignFile {
                        path: shard_dir.display().to_string(),
                        why: "shard files exist but the manifest KUMA is missing (interrupted creation or \
                              foreign files); move them away to create a new store here"
                            .into(),
                    });
                }
                sqlite::create_dirs(&shard_dir, mode, "create shard dir")?;
                (Manifest::new_with(FORMAT_VERSION, config.shards, encrypted, config.cluster_key)?, true)
            }
        };

        // Protection before any shard is touched: a wrong master key changes nothing.
        let keystore_path = config.keystore_path.clone().unwrap_or_else(|| dir.join("keystore.kuma"));
        let cluster_key = config.cluster_key.map(|k| Key::from_bytes(&k)).transpose()?;
        let protection = Arc::new(match (&config.master_key, manifest.tombstone_key) {
            (Some(master), _) if creating => Protection::Encrypted(Box::new(Keystore::create_with(
                &keystore_path,
                master.clone(),
                &manifest.store_id,
                mode,
                cluster_key.clone(),
            )?)),
            (Some(master), _) => {
                let keystore = Keystore::open(&keystore_path, master.clone(), &manifest.store_id)?;
                if cluster_key.as_ref().is_some_and(|k| k.as_bytes() != keystore.index_key().as_bytes()) {
                    return Err(Error::ClusterMismatch { why: "the keystore was written by another cluster".into() });
                }
                Protection::Encrypted(Box::new(keystore))
            }
            (None, Some(tombstone_key)) => Protection::Plain { tombstone_key },
            (None, None) => Protection::Plain { tombstone_key: *blake3::hash(manifest.store_id.as_bytes()).as_bytes() },
        });

        let mut handles = Vec::with_capacity(config.shards as usize);
        let mut specs = Vec::with_capacity(config.shards as usize);
        for index in 0..config.shards {
            let path = shard::shard_path(&shard_dir, index);
            let heads = Arc::new(Heads::new(config.heads_cap));
            let stats = Arc::new(Mutex::new(WriterStats::default()));
            // Cluster replicas keep no tail: their events arrive sealed by the leader.
            let tail = Arc::new(Tail::new(index, if config.cluster_key.is_some() { 0 } else { config.tail_bytes }));
            specs.push(ShardSpec {
                index,
                path: path.clone(),
                heads: heads.clone(),
                stats: stats.clone(),
                tail: tail.clone(),
            });
            handles.push(ShardHandle { heads, readers: Readers::new(&path), stats, tail });
        }
        // The order log is opened before the writers (a failure changes nothing), brought
        // level with the shards after they opened, and fed from then on.
        let mut order = match config.global_order && config.cluster_key.is_none() {
            true => Some(Order::open(&dir, config.sync, mode)?),
            false => None,
        };
        let commits = Arc::new(Commits::new(config.shards));
        let shared = Shared {
            creating,
            replicated: config.cluster_key.is_some(),
            file_mode: mode,
            identity: ShardIdentity { store_id: manifest.store_id.clone(), index: 0, count: config.shards },
            sync: config.sync,
            config: config.writer,
            protection: protection.clone(),
            commits: commits.clone(),
        };
        let threads = config.writer_threads.unwrap_or(config.shards as usize);
        let writers = match Writers::start(specs, threads, shared) {
            Ok(w) => w,
            Err(e) => {
                if creating {
                    let _ = std::fs::remove_dir_all(&shard_dir);
                    if protection.is_encrypted() {
                        drop(protection);
                        let _ = std::fs::remove_file(&keystore_path);
                    }
                }
                return Err(e);
            }
        };
        if let Some(order) = order.as_mut() {
            let started = order.recover(&commits.positions()).and_then(|_| order.start());
            match started {
                Ok(sequencer) => commits.set_sequencer(Some(sequencer)),
                Err(e) => {
                    writers.stop();
                    return Err(e);
                }
            }
        }
        if creating {
            manifest.write(&dir, mode)?;
        }
        Ok(Store {
            order: order.map(Arc::new),
            data_dir: dir,
            store_id: manifest.store_id,
            shards: handles,
            writers,
            closed: AtomicBool::new(false),
            protection,
            commits,
            lock: Mutex::new(Some((lock, lock_file))),
            replicated: config.cluster_key.is_some(),
            file_mode: mode,
        })
    }

    /// Whether this store is a set of replicas (cluster mode).
    pub fn is_replicated(&self) -> bool {
        self.replicated
    }

    /// Local writes are refused in cluster mode: they would make this replica differ.
    fn local_writes(&self) -> Result<()> {
        if self.replicated {
            Err(Error::Replicated)
        } else {
            Ok(())
        }
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The shard holding `entity_id` (see router.rs).
    pub fn shard_for(&self, entity_id: &[u8]) -> u32 {
        shard_for(entity_id, self.shard_count())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Queues an append of `events` to one entity. Returns an error (and never calls
    /// `reply`) if the input is invalid or the store is closed; otherwise `reply` is called
    /// exactly once, from the shard's writer thread, after the commit.
    pub fn append(
        &self,
        entity_id: Vec<u8>,
        expected: Expected,
        events: Vec<NewEvent>,
        reply: Reply<Result<Appended>>,
    ) -> Result<()> {
        self.local_writes()?;
        validate_append(&entity_id, &events)?;
        let shard = self.shard_for(&entity_id);
        let entries = vec![AppendEntry { entity_id, expected, events }];
        let reply: Reply<Vec<Result<Appended>>> =
            Box::new(move |mut results| reply(results.pop().unwrap_or(Err(Error::Closed))));
        self.writers.send(shard, Command::append(entries, reply))
    }

    /// Queues appends to many entities. All entries are validated first (nothing is queued if
    /// one is invalid); each entry is atomic on its own. `reply` gets one result per entry,
    /// in input order, once every shard involved has committed.
    pub fn append_batch(&self, entries: Vec<AppendEntry>, reply: Reply<Vec<Result<Appended>>>) -> Result<()> {
        self.local_writes()?;
        if entries.is_empty() {
            return Err(Error::invalid("entries", "must not be empty"));
        }
        for e in &entries {
            validate_append(&e.entity_id, &e.events)?;
        }
        let n = entries.len();
        let mut parts: Vec<(Vec<usize>, Vec<AppendEntry>)> =
            (0..self.shard_count()).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, e) in entries.into_iter().enumerate() {
            let part = &mut parts[self.shard_for(&e.entity_id) as usize];
            part.0.push(i);
            part.1.push(e);
        }
        let parts: Vec<(u32, Vec<usize>, Vec<AppendEntry>)> = parts
            .into_iter()
            .enumerate()
            .filter(|(_, p)| !p.0.is_empty())
            .map(|(s, (idx, es))| (s as u32, idx, es))
            .collect();
        let fan_in = Arc::new(FanIn {
            state: Mutex::new(FanInState {
                results: (0..n).map(|_| None).collect(),
                remaining: parts.len(),
                reply: Some(reply),
            }),
        });
        self.writers.send_each(parts.into_iter().map(|(shard, indexes, entries)| {
            let fan = fan_in.clone();
            let reply: Reply<Vec<Result<Appended>>> = Box::new(move |results| fan.deliver(&indexes, results));
            (shard, Command::append(entries, reply))
        }))
    }

    /// Queues a snapshot of an entity's state as of `snapshot.seq`. `reply` is called once,
    /// from the writer thread: an error if the entity does not have that seq (yet).
    pub fn save_snapshot(&self, snapshot: SnapshotRequest, reply: Reply<Result<()>>) -> Result<()> {
        validate_entity_id(&snapshot.entity_id)?;
        if snapshot.data.len() > MAX_SNAPSHOT_BYTES {
            return Err(Error::TooLarge {
                what: "snapshot",
                size: snapshot.data.len() as u64,
                max: MAX_SNAPSHOT_BYTES as u64,
            });
        }
        let shard = self.shard_for(&snapshot.entity_id);
        self.writers.send(shard, Command::snapshot(snapshot, reply))
    }

    /// Queues the deletion of an entity's snapshots of `version`; `reply` is called once,
    /// from the writer thread.
    pub fn delete_snapshots(&self, entity_id: Vec<u8>, version: u32, reply: Reply<Result<()>>) -> Result<()> {
        validate_entity_id(&entity_id)?;
        let shard = self.shard_for(&entity_id);
        self.writers.send(shard, Command::delete_snapshots(entity_id, version, reply))
    }

    /// The latest snapshot of an entity with `version`, at or before `max_seq`, decrypted.
    pub fn latest_snapshot(&self, entity_id: &[u8], version: u32, max_seq: u64) -> Result<Option<Snapshot>> {
        let snap = self.with_entity(entity_id, |c, h, _, e| reader::latest_snapshot(c, h, e, version, max_seq))?;
        match snap {
            None => Ok(None),
            Some(mut snap) => {
                let key = self.protection.data_key(entity_id)?;
                snap.data = self.protection.open_snapshot(key.as_ref(), entity_id, snap.seq, &snap.data)?;
                Ok(Some(snap))
            }
        }
    }

    /// The seq of the entity's last event committed at or before `ts_us` (0 if none).
    pub fn seq_at(&self, entity_id: &[u8], ts_us: i64) -> Result<u64> {
        self.with_entity(entity_id, |c, h, _, e| reader::seq_at(c, h, e, ts_us))
    }

    /// Rewrites a shard's file (`VACUUM`) after everything queued before is committed: the
    /// space of deleted rows goes back, and no stale copy of a row SQLite moved or deleted
    /// stays in free space. Writes to the shard wait meanwhile (proportional to its size).
    pub fn compact(&self, shard: u32, reply: Reply<Result<()>>) -> Result<()> {
        if shard >= self.shard_count() {
            return Err(Error::invalid("shard", format!("no shard {shard} (store has {})", self.shard_count())));
        }
        self.writers.send(shard, Command::compact(reply))
    }

    /// Blocks until every append queued before this call is committed, checkpoints heads and
    /// settles claimed keys (keystore.rs): a quiet store changes no file after it.
    pub fn flush(&self) -> Result<()> {
        let mut waits = Vec::new();
        for shard in 0..self.shard_count() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            self.writers.send(shard, Command::barrier(Box::new(move |r| drop(tx.send(r)))))?;
            waits.push(rx);
        }
        for rx in waits {
            rx.recv().map_err(|_| Error::Closed)??;
        }
        Ok(())
    }

    fn with_reader<T>(&self, shard: u32, f: impl FnOnce(&Connection, &Heads) -> Result<T>) -> Result<T> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let handle = self
            .shards
            .get(shard as usize)
            .ok_or_else(|| Error::invalid("shard", format!("no shard {shard} (store has {})", self.shards.len())))?;
        handle.readers.with(|conn| f(conn, &handle.heads))
    }

    /// Runs a read of one entity in one read transaction. A read that meets a missing or
    /// misplaced event (`Corrupt`) is checked against the entity's tombstone in the same
    /// snapshot: an entity erased while it was being read answers `Erased`, never corrupt.
    fn with_entity<T>(
        &self,
        entity_id: &[u8],
        f: impl FnOnce(&Connection, &Heads, u32, &Entity) -> Result<T>,
    ) -> Result<T> {
        validate_entity_id(entity_id)?;
        let shard = self.shard_for(entity_id);
        let entity = Entity { id: entity_id, idx: self.protection.index(entity_id) };
        self.with_reader(shard, |c, h| match f(c, h, shard, &entity) {
            Err(Error::Corrupt { .. }) if reader::is_erased(c, &entity.idx)? => Err(Error::Erased),
            result => result,
        })
    }

    /// Opens a sealed entity id (see shard.rs); `None` if the entity was erased.
    fn resolve_id(&self, idx: &[u8; 32], sealed: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.protection.data_key_by_index(idx) {
            Ok(key) => self.protection.open_id(key.as_ref(), idx, sealed).map(Some),
            Err(Error::Erased) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The head (last seq, position, timestamp, hash) of an entity, or `None` if it has no
    /// events; `Err(Erased)` if it was erased.
    pub fn head(&self, entity_id: &[u8]) -> Result<Option<Head>> {
        self.with_entity(entity_id, |c, h, _, e| match reader::head(c, h, e)? {
            None if reader::is_erased(c, &e.idx)? || self.protection.is_erased(entity_id)? => Err(Error::Erased),
            head => Ok(head),
        })
    }

    /// Whether the entity was erased: a tombstone in its shard, or in the keystore (which
    /// also holds it when the shard files are a copy from before the erasure).
    pub fn is_erased(&self, entity_id: &[u8]) -> Result<bool> {
        let in_shard = self.with_entity(entity_id, |c, _, _, e| reader::is_erased(c, &e.idx))?;
        Ok(in_shard || self.protection.is_erased(entity_id)?)
    }

    /// How far the erasure of an entity got on this node: `None` if it was not erased,
    /// `Some(false)` while its key or events are still being removed (the entity is already
    /// unreadable), `Some(true)` once both are gone.
    pub fn erasure_state(&self, entity_id: &[u8]) -> Result<Option<bool>> {
        if !self.is_erased(entity_id)? {
            return Ok(None);
        }
        let unfinished = self.with_entity(entity_id, |c, _, _, e| reader::erasure_unfinished(c, &e.idx))?;
        Ok(Some(!unfinished))
    }

    /// Up to `max` events of an entity from `from_seq` on, in order, decrypted.
    /// `Err(Erased)` for an erased entity.
    pub fn read_entity(&self, entity_id: &[u8], from_seq: u64, max: usize) -> Result<Vec<StoredEvent>> {
        let raw = self.read_entity_sealed(entity_id, from_seq, max)?;
        if raw.is_empty() {
            // Nothing to decrypt, but an erased entity must say so.
            self.head(entity_id)?;
            return Ok(raw);
        }
        let key = self.protection.data_key(entity_id)?;
        raw.into_iter().map(|ev| self.protection.open_stored(key.as_ref(), ev)).collect()
    }

    /// `read_entity` without decryption: payload and metadata as stored (for export and tests).
    pub fn read_entity_sealed(&self, entity_id: &[u8], from_seq: u64, max: usize) -> Result<Vec<StoredEvent>> {
        self.with_entity(entity_id, |c, h, shard, e| reader::read_entity(c, h, shard, e, from_seq, max))
    }

    /// Up to `max` events of a shard with position greater than `after`, in position
    /// order, decrypted. Events of an entity whose key is gone (erased, seen in a copy of
    /// the files taken before the erasure) are left out.
    pub fn read_shard(&self, shard: u32, after: u64, max: usize) -> Result<Vec<StoredEvent>> {
        Ok(self.query_shard(shard, &ShardQuery { after, ..Default::default() }, max)?.events)
    }

    /// Up to `max` events of a shard matching `query`, in position order, decrypted, and
    /// how far the shard was searched (see `query::Page`): reading on from there never
    /// skips nor repeats an event. Events whose key is gone are left out (see
    /// `read_shard`); filters run before decryption.
    pub fn query_shard(&self, shard: u32, query: &ShardQuery, max: usize) -> Result<Page> {
        query.validate()?;
        // A reader that has caught up is answered from memory (tail.rs).
        if let Some(page) = self.shards.get(shard as usize).and_then(|h| h.tail.query(query, max)) {
            return Ok(page);
        }
        let entity_idx = query.entity_id.as_ref().map(|id| self.protection.index(id));
        let resolve = |idx: &[u8; 32], sealed: &[u8]| self.resolve_id(idx, sealed);
        let page =
            self.with_reader(shard, |c, _| query::query_shard(c, shard, query, max, entity_idx.as_ref(), &resolve))?;
        Ok(Page { events: self.protection.open_events(page.events)?, ..page })
    }

    /// Events in the store-wide order (order.rs): up to `max` after global position
    /// `after`, each with its global position, and how far the order was searched (pass it
    /// as `after` to read on; erased events keep their numbers and are left out).
    /// `Err(Invalid)` if the store keeps no store-wide order.
    pub fn read_all(&self, after: u64, max: usize) -> Result<AllPage> {
        let order = self
            .order
            .as_ref()
            .ok_or_else(|| Error::invalid("global_order", "this store keeps no store-wide order"))?;
        let watermark = order.watermark();
        let mut events = Vec::new();
        let mut searched = after;
        'ranges: for r in order.ranges_after(after, max.clamp(1, 10_000))? {
            let start = r.first.max(after + 1);
            let end = (r.first + r.count - 1).min(watermark);
            if start > end {
                break;
            }
            let from_pos = r.pos + (start - r.first);
            let to_pos = r.pos + (end - r.first);
            let room = (max - events.len()).min((end - start + 1) as usize);
            let page = self.query_shard(r.shard, &ShardQuery { after: from_pos - 1, ..Default::default() }, room)?;
            for ev in page.events {
                // A page with erased events left out may run past the range: the rest
                // belongs to later ranges.
                if ev.position > to_pos {
                    break;
                }
                let global = r.first + (ev.position - r.pos);
                events.push((global, ev));
                if events.len() >= max {
                    searched = global;
                    break 'ranges;
                }
            }
            searched = end;
        }
        Ok(AllPage { events, searched })
    }

    /// The last global position readers may see (`None`: no store-wide order kept).
    pub fn global_position(&self) -> Option<u64> {
        self.order.as_ref().map(|o| o.watermark())
    }

    /// The global position of a shard's event (`None` if not numbered yet or no order).
    pub fn global_of(&self, shard: u32, position: u64) -> Result<Option<u64>> {
        match &self.order {
            Some(order) => order.global_of(shard, position),
            None => Ok(None),
        }
    }

    /// Sets (or removes) the function told each new store-wide watermark.
    pub fn set_order_listener(&self, listener: Option<OrderListener>) {
        if let Some(order) = &self.order {
            order.set_listener(listener);
        }
    }

    /// The positions of `shard` its tail holds in memory, `first..=last` (empty when
    /// `first > last`), and its bytes (tail.rs).
    pub fn tail_span(&self, shard: u32) -> Option<(u64, u64, usize)> {
        self.shards.get(shard as usize).map(|h| h.tail.span())
    }

    /// Where a reader that stopped at `position` of `shard` stands: the chain hash of the
    /// event stored there (if any) and the shard's last position now. A reader that kept
    /// the hash with its position sees from these whether the shard still holds the
    /// history it read (see `Kuma.Projection`).
    pub fn position_check(&self, shard: u32, position: u64) -> Result<(Option<[u8; 32]>, u64)> {
        self.with_reader(shard, |c, _| Ok((query::event_hash(c, position)?, query::last_position(c)?)))
    }

    /// The last committed position of every shard (0 for an empty shard).
    pub fn commit_positions(&self) -> Vec<u64> {
        self.commits.positions()
    }

    /// Sets (or removes) the function told `(shard, last position, entities)` after every
    /// commit that wrote events; with `details`, the entities written (see
    /// `Commits::set_listener`). It runs on writer threads: it must return quickly.
    pub fn set_commit_listener(&self, listener: Option<CommitListener>, details: bool) {
        self.commits.set_listener(listener, details);
    }

    /// Erases an entity: deletes its events, snapshots and head (zeroed by SQLite's
    /// secure_delete), leaves a tombstone (a keyed hash, not the id), destroys its data key
    /// and truncates both WALs. `reply` gets the number of events deleted. Appends to the
    /// id fail with `Erased` from then on.
    pub fn delete(&self, entity_id: Vec<u8>, reply: Reply<Result<u64>>) -> Result<()> {
        self.local_writes()?;
        validate_entity_id(&entity_id)?;
        let shard = self.shard_for(&entity_id);
        self.writers.send(shard, Command::erase(entity_id, reply))
    }

    /// Cluster mode, on a shard's leader: prepares appends for replication (see replica.rs).
    /// Each entity's next seqs come from its head here plus the earlier requests of the
    /// same call for it; an entity without a key gets a new one, carried wrapped in its
    /// commands until a replica applies them. One result per request, in order: an erased
    /// entity, a missing key or bad input fails only its request.
    pub fn prepare(&self, requests: Vec<AppendRequest>) -> Vec<Result<PreparedAppend>> {
        let mut seqs: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut new_keys: HashMap<Vec<u8>, (Key, Vec<u8>)> = HashMap::new();
        requests
            .into_iter()
            .map(|r| {
                validate_append(&r.entity_id, &r.events)?;
                let current = match seqs.get(&r.entity_id) {
                    Some(seq) => *seq,
                    None => self.head(&r.entity_id)?.map_or(0, |h| h.seq),
                };
                let (key, new_key) = match (self.protection.keystore(), new_keys.get(&r.entity_id)) {
                    (None, _) => (None, None),
                    (Some(_), Some((key, wrapped))) => (Some(key.clone()), Some(wrapped.clone())),
                    (Some(keystore), None) => match keystore.prepare_key(&r.entity_id)? {
                        (key, None) => (Some(key), None),
                        // A key made for an entity that has events would leave them unreadable.
                        (_, Some(_)) if current > 0 => return Err(Error::KeyMissing),
                        (key, Some(wrapped)) => {
                            new_keys.insert(r.entity_id.clone(), (key.clone(), wrapped.clone()));
                            (Some(key), Some(wrapped))
                        }
                    },
                };
                let idx = self.protection.index(&r.entity_id);
                let events = r
                    .events
                    .iter()
                    .enumerate()
                    .map(|(i, ev)| {
                        let seq = current + 1 + i as u64;
                        let (metadata, payload) =
                            self.protection.seal_event(key.as_ref(), &r.entity_id, seq, &ev.metadata, &ev.payload);
                        SealedEvent { event_type: ev.event_type.clone(), metadata, payload, scope: ev.scope.clone() }
                    })
                    .collect::<Vec<_>>();
                seqs.insert(r.entity_id.clone(), current + events.len() as u64);
                Ok(PreparedAppend {
                    command_id: r.command_id,
                    id_sealed: self.protection.seal_id(key.as_ref(), &idx, &r.entity_id),
                    entity_id: r.entity_id,
                    expected: r.expected,
                    first_seq: current + 1,
                    timestamp_us: crate::clock::now_us(),
                    new_key,
                    events,
                })
            })
            .collect()
    }

    /// Cluster mode: queues the commands of Raft entry `raft_index` of `shard` for its
    /// writer, which applies them in one transaction (see replica.rs). `reply` gets one
    /// outcome per command, or the error that kept the whole entry from being applied (it
    /// then left nothing behind, and applying it again is safe).
    pub fn replicate(
        &self,
        shard: u32,
        raft_index: u64,
        commands: Vec<Replicated>,
        reply: Reply<Result<Vec<Outcome>>>,
    ) -> Result<()> {
        if !self.replicated {
            return Err(Error::invalid("replicate", "not a cluster-mode store"));
        }
        if shard >= self.shard_count() {
            return Err(Error::invalid("shard", format!("no shard {shard} (store has {})", self.shard_count())));
        }
        for c in &commands {
            validate_entity_id(c.entity_id())?;
            if self.shard_for(c.entity_id()) != shard {
                return Err(Error::invalid("replicate", "a command's entity belongs to another shard"));
            }
        }
        self.writers.send(shard, Command::replicate(raft_index, commands, reply))
    }

    /// Cluster mode: lets `shard`'s replica apply again after a failed apply (its Raft
    /// member is then restarted, which applies the entries again from the log).
    pub fn replica_reset(&self, shard: u32, reply: Reply<Result<()>>) -> Result<()> {
        if shard >= self.shard_count() {
            return Err(Error::invalid("shard", format!("no shard {shard} (store has {})", self.shard_count())));
        }
        self.writers.send(shard, Command::replica_reset(reply))
    }

    /// Cluster mode, a Raft snapshot: returns once every command queued for `shard` before
    /// is committed, with the applied index its file then holds. The snapshot is the file
    /// itself; a copy is made only when a snapshot is sent (`copy_shard`).
    pub fn snapshot_point(&self, shard: u32) -> Result<u64> {
        self.check_replica_shard(shard)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writers.send(shard, Command::barrier(Box::new(move |r| drop(tx.send(r)))))?;
        rx.recv().map_err(|_| Error::Closed)??;
        self.applied_index(shard)
    }

    /// Cluster mode: a copy of `shard`'s file at `path` (`VACUUM INTO`), made in a read
    /// transaction: the writer goes on meanwhile. The applied index the copy holds.
    pub fn copy_shard(&self, shard: u32, path: &std::path::Path) -> Result<u64> {
        self.check_replica_shard(shard)?;
        let _ = std::fs::remove_file(path);
        let shown = path.to_string_lossy().into_owned();
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // A connection of its own: VACUUM runs outside any transaction (the pooled
        // readers' reads run in one).
        let conn = crate::sqlite::open_reader(&shard::shard_path(&self.data_dir.join("shards"), shard))?;
        conn.execute("VACUUM INTO ?1", [&shown]).map_err(Error::storage("copy shard"))?;
        crate::sqlite::set_mode(path, self.file_mode)?;
        let copy = crate::sqlite::open_reader(path)?;
        Ok(crate::shard::meta_get::<i64>(&copy, "applied_index")
            .map_err(Error::storage("read applied index"))?
            .unwrap_or(0) as u64)
    }

    /// Cluster mode: replaces `shard`'s file by a copy another replica made with `backup`
    /// (the keys its entities need must be here first, `install_keys`), and waits. The
    /// applied index it holds.
    pub fn install_wait(&self, shard: u32, path: PathBuf) -> Result<u64> {
        self.check_replica_shard(shard)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writers.send(shard, Command::install(path, Box::new(move |r| drop(tx.send(r)))))?;
        let result = rx.recv().map_err(|_| Error::Closed)?;
        self.shards[shard as usize].readers.reset();
        result
    }

    /// Cluster mode: this node no longer holds a replica of `shard` (it moved away): the
    /// keys of its entities are deleted here and its file emptied. Waits; answers how many
    /// keys were deleted.
    pub fn release_wait(&self, shard: u32) -> Result<u64> {
        self.check_replica_shard(shard)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.writers.send(shard, Command::release(Box::new(move |r| drop(tx.send(r)))))?;
        let result = rx.recv().map_err(|_| Error::Closed)?;
        self.shards[shard as usize].readers.reset();
        result
    }

    fn check_replica_shard(&self, shard: u32) -> Result<()> {
        if !self.replicated {
            return Err(Error::invalid("shard copy", "not a cluster-mode store"));
        }
        if shard >= self.shard_count() {
            return Err(Error::invalid("shard", format!("no shard {shard} (store has {})", self.shard_count())));
        }
        Ok(())
    }

    /// Cluster mode: the keyed hashes of the entities in a shard copy (`backup`'s file).
    pub fn copy_indexes(path: &std::path::Path) -> Result<Vec<[u8; 32]>> {
        let conn = crate::sqlite::open_reader(path)?;
        let mut st = conn.prepare("SELECT idx FROM entities").map_err(Error::storage("read shard copy"))?;
        let rows = st
            .query_map([], |r| Ok(crate::heads::hash_from(crate::reader::bytes(r.get_ref(0)?))))
            .map_err(Error::storage("read shard copy"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::storage("read shard copy"))
    }

    /// Cluster mode: of these keyed hashes, those whose key this node lacks (and that are
    /// not erased here).
    pub fn missing_keys(&self, indexes: &[[u8; 32]]) -> Result<Vec<[u8; 32]>> {
        match self.protection.keystore() {
            Some(keystore) => keystore.missing(indexes),
            None => Ok(Vec::new()),
        }
    }

    /// Cluster mode: the wrapped keys of these keyed hashes that this node has.
    pub fn export_keys(&self, indexes: &[[u8; 32]]) -> Result<Vec<([u8; 32], Vec<u8>)>> {
        match self.protection.keystore() {
            Some(keystore) => keystore.export(indexes),
            None => Ok(Vec::new()),
        }
    }

    /// Cluster mode: of these keyed hashes, those erased on this node (their keys are gone:
    /// a replica taking a copy from before their erasure records the erasure instead).
    pub fn erased_keys(&self, indexes: &[[u8; 32]]) -> Result<Vec<[u8; 32]>> {
        match self.protection.keystore() {
            Some(keystore) => keystore.erased_of(indexes),
            None => Ok(Vec::new()),
        }
    }

    /// Cluster mode: records erasures (keyed hashes) told by another node, so that no key is
    /// ever made here for them.
    pub fn record_erased_keys(&self, indexes: &[[u8; 32]]) -> Result<()> {
        match self.protection.keystore() {
            Some(keystore) => keystore.record_erased(indexes),
            None => Ok(()),
        }
    }

    /// Cluster mode: installs wrapped keys (from `export_keys` on another node).
    pub fn install_keys(&self, keys: &[([u8; 32], Vec<u8>)]) -> Result<()> {
        if let Some(keystore) = self.protection.keystore() {
            for r in keystore.install(keys)? {
                match r {
                    Ok(_) | Err(Error::Erased) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Cluster mode: the last Raft index applied to `shard`'s file.
    pub fn applied_index(&self, shard: u32) -> Result<u64> {
        self.with_reader(shard, |c, _| {
            Ok(crate::shard::meta_get::<i64>(c, "applied_index")
                .map_err(Error::storage("read applied index"))?
                .unwrap_or(0) as u64)
        })
    }

    /// Seals `plaintext` under `subject_id`'s data key (created if needed), for a value
    /// about the subject stored in another entity's events. Erasing the subject makes it
    /// unreadable everywhere.
    pub fn seal_sensitive(&self, subject_id: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        validate_entity_id(subject_id)?;
        let keystore = self.protection.keystore().ok_or_else(|| {
            Error::invalid("sensitive", "the store was created without encryption; sensitive values need it")
        })?;
        if self.is_erased(subject_id)? {
            return Err(Error::Erased);
        }
        // A subject with events must already have its key: a missing one is an error, never
        // replaced (ensure never makes one for an erased subject either).
        if self.head(subject_id)?.is_none() {
            if self.replicated && keystore.get(subject_id)?.is_none() {
                // A key made here would exist on this node only.
                return Err(Error::invalid(
                    "sensitive",
                    "in cluster mode a subject must have events before values about it",
                ));
            }
            keystore.ensure([subject_id])?;
        }
        let key = self.protection.data_key(subject_id)?.ok_or(Error::Erased)?;
        Ok(cipher::seal(&key, Binding::Sensitive { subject_id }, plaintext))
    }

    /// Opens a value sealed by `seal_sensitive`; `Err(Erased)` once the subject is erased.
    pub fn unseal_sensitive(&self, subject_id: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        validate_entity_id(subject_id)?;
        let key = self.protection.data_key(subject_id)?.ok_or(Error::Erased)?;
        cipher::open(&key, Binding::Sensitive { subject_id }, sealed)
            .map_err(|why| Error::Decrypt { seq: 0, why: format!("sensitive value: {why}") })
    }

    /// Rewraps every data key with a new master key (one keystore transaction). Returns
    /// the number of keys rewrapped.
    pub fn rotate_master_key(&self, new_master: Key) -> Result<u64> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // Replicated commands carry new keys wrapped by the leader's master key: every node
        // must have the same one at all times.
        self.local_writes()?;
        let keystore = self
            .protection
            .keystore()
            .ok_or_else(|| Error::invalid("master_key", "the store was created without encryption"))?;
        keystore.rotate(new_master)
    }

    pub fn is_encrypted(&self) -> bool {
        self.protection.is_encrypted()
    }

    /// Every snapshot of an entity (all versions), oldest first, decrypted.
    pub fn snapshots(&self, entity_id: &[u8]) -> Result<Vec<Snapshot>> {
        let raw = self.with_entity(entity_id, |c, h, _, e| reader::list_snapshots(c, h, e))?;
        if raw.is_empty() {
            return Ok(raw);
        }
        let key = self.protection.data_key(entity_id)?;
        raw.into_iter()
            .map(|mut snap| {
                snap.data = self.protection.open_snapshot(key.as_ref(), entity_id, snap.seq, &snap.data)?;
                Ok(snap)
            })
            .collect()
    }

    /// Recomputes one entity's hash chain.
    pub fn verify_entity(&self, entity_id: &[u8]) -> Result<EntityVerdict> {
        // A broken chain goes through `with_entity` as `Corrupt`, so that an entity erased
        // during the check answers `Erased` rather than looking tampered with.
        let verdict = self.with_entity(entity_id, |c, h, shard, e| match verify::verify_entity(c, h, shard, e)? {
            EntityVerdict::Broken { seq, why } => Err(Error::Corrupt { seq, why }),
            intact => Ok(intact),
        });
        match verdict {
            Err(Error::Corrupt { seq, why }) => Ok(EntityVerdict::Broken { seq, why }),
            other => other,
        }
    }

    /// Recomputes every chain in one shard.
    pub fn verify_shard(&self, shard: u32, max_problems: usize) -> Result<ShardReport> {
        let resolve = |idx: &[u8; 32], sealed: &[u8]| self.resolve_id(idx, sealed);
        self.with_reader(shard, |c, h| verify::verify_shard(c, h, max_problems, &resolve))
    }

    /// Commands queued for each writer thread, and the thread that serves each shard.
    pub fn queue_depths(&self) -> (Vec<usize>, Vec<usize>) {
        (self.writers.queue_depths(), self.writers.thread_of_shards())
    }

    /// Bytes the store holds in memory outside the BEAM: the live tails of its shards.
    /// (SQLite's own allocations are process-wide: `sqlite_memory_used`.)
    pub fn tail_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.tail.span().2 as u64).sum()
    }

    /// Per-shard writer statistics.
    pub fn stats(&self) -> Vec<WriterStats> {
        self.shards.iter().map(|s| *s.stats.lock().unwrap_or_else(|p| p.into_inner())).collect()
    }

    /// Stops accepting requests, lets every writer commit what is queued and checkpoint,
    /// waits for them, and releases the data directory. Idempotent.
    pub fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        for s in &self.shards {
            s.readers.close();
        }
        let panicked = self.writers.stop();
        // After the writers: what they committed last is numbered before the log closes.
        if let Some(order) = &self.order {
            self.commits.set_sequencer(None);
            order.close();
        }
        if let Some(keystore) = self.protection.keystore() {
            keystore.close();
        }
        if let Some((dir, file)) = self.lock.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = file.unlock();
            let _ = dir.unlock();
        }
        if panicked {
            return Err(Error::Panic { message: "a shard writer thread panicked".into() });
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

struct FanInState {
    results: Vec<Option<Result<Appended>>>,
    remaining: usize,
    reply: Option<Reply<Vec<Result<Appended>>>>,
}

/// Collects the per-shard parts of a batch; the last part to finish sends the one reply.
struct FanIn {
    state: Mutex<FanInState>,
}

impl FanIn {
    fn deliver(&self, indexes: &[usize], results: Vec<Result<Appended>>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut results = results.into_iter();
        for &i in indexes {
            st.results[i] = Some(results.next().unwrap_or(Err(Error::Closed)));
        }
        st.remaining -= 1;
        if st.remaining == 0 {
            let all = std::mem::take(&mut st.results).into_iter().map(|r| r.unwrap_or(Err(Error::Closed))).collect();
            if let Some(reply) = st.reply.take() {
                drop(st);
                reply(all);
            }
        }
    }
}
