//! The shard writer: one OS thread per shard owns the shard's only writing connection.
//!
//! Requests arrive over a channel. The thread blocks for the first one, drains whatever else
//! is queued (up to a cap), writes it all in one transaction (group commit), publishes the
//! new entity heads, and only then answers every waiter. A request is therefore acknowledged
//! only once it is durable to the degree the shard's `SyncMode` promises, and readers see it
//! as soon as it is acknowledged.
//!
//! Invariants
//! - Positions are handed out here, in commit order, and never reused (`pos_floor`).
//! - An append is atomic: its expected-seq check happens before any of its rows is written,
//!   and a failing transaction rolls back every append in it.
//! - Every request gets exactly one answer, also when the transaction fails or a panic is
//!   caught; the thread itself never unwinds.
//! - In encrypted stores, the data keys of every entity in a group are durable in the
//!   keystore before the group's transaction begins (a new entity's key was pre-created in
//!   its shard's pool, and the transaction records its claim: keystore.rs); payload,
//!   metadata and snapshots are sealed here, and the chain hash covers the sealed bytes.
//! - An erased entity (tombstone) is never written again: its appends get `Erased`.

use crate::chain::{Chainer, GENESIS};
use crate::clock;
use crate::codec::{Expected, NewEvent};
use crate::error::{Error, Result};
use crate::heads::{hash_from, Head, Heads};
use crate::keystore::Claim;
use crate::protection::Protection;
use crate::reader::{bytes, head_on_disk};
use crate::replica::{self, Outcome, PreparedAppend, PreparedErase, Replicated};
use crate::shard::{self, meta_get, ShardIdentity, SKIP_EVERY};
use crate::sqlite::{self, SyncMode};
use crate::tail::{Tail, TailBatch, TailEvent};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A callback that answers one request. Called exactly once, on the writer thread.
pub type Reply<T> = Box<dyn FnOnce(T) + Send>;

/// Called on a writer thread after each commit that wrote events: `(shard, last position,
/// the entities written if asked for)` (see `Commits::set_listener`). It must be quick and
/// must not block (the NIF's sends a message).
pub type CommitListener = Arc<dyn Fn(u32, u64, Option<&[CommittedEntity]>) + Send + Sync>;

/// One entity's part of a commit, told to a listener that asked for details: the position
/// of its first event in the commit, and of its event before that (0 if it had none). A
/// reader following only this entity, already past `prev_pos`, knows that nothing of the
/// entity lies before `first_pos` that it has not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEntity {
    pub entity_id: Vec<u8>,
    pub first_pos: u64,
    pub prev_pos: u64,
}

/// What writers publish about their commits: the last committed position of every shard,
/// and who to tell. Positions become visible here only after the transaction committed, in
/// commit order, so a reader that reads up to `last(shard)` never passes over a late commit.
pub struct Commits {
    positions: Vec<AtomicU64>,
    listener: RwLock<Option<CommitListener>>,
    /// The listener wants the entities of each commit (`CommittedEntity`).
    details: AtomicBool,
    /// The store-wide order's sequencer (order.rs), told each commit's positions.
    sequencer: RwLock<Option<crossbeam_channel::Sender<(u32, u64, u64)>>>,
}

impl Commits {
    pub(crate) fn new(shards: u32) -> Self {
        Commits {
            positions: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            listener: RwLock::new(None),
            details: AtomicBool::new(false),
            sequencer: RwLock::new(None),
        }
    }

    /// Sets (or removes) where each commit's positions go for the store-wide order.
    pub(crate) fn set_sequencer(&self, sequencer: Option<crossbeam_channel::Sender<(u32, u64, u64)>>) {
        *self.sequencer.write().unwrap_or_else(|p| p.into_inner()) = sequencer;
    }

    /// A commit of `shard` wrote positions `first..=last`: numbered in the store-wide order
    /// in the order commits report here (before anyone is answered).
    fn sequence(&self, shard: u32, first: u64, last: u64) {
        if let Some(tx) = self.sequencer.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send((shard, first, last));
        }
    }

    /// The last committed position of every shard.
    pub fn positions(&self) -> Vec<u64> {
        self.positions.iter().map(|p| p.load(Ordering::Acquire)).collect()
    }

    /// Sets (or removes) the function told `(shard, last position, entities)` after every
    /// commit that wrote events; `details` asks for the entities (else `None`). Even with
    /// `details`, a commit may come without them (a shard's first publication when it
    /// opens, replicated writes): the listener must then assume any entity was written.
    pub fn set_listener(&self, listener: Option<CommitListener>, details: bool) {
        let mut current = self.listener.write().unwrap_or_else(|p| p.into_inner());
        self.details.store(details && listener.is_some(), Ordering::Release);
        *current = listener;
    }

    /// Whether the listener wants the entities of each commit.
    fn wants_details(&self) -> bool {
        self.details.load(Ordering::Acquire)
    }

    fn publish(&self, shard: u32, last: u64, entities: Option<&[CommittedEntity]>) {
        if let Some(p) = self.positions.get(shard as usize) {
            p.fetch_max(last, Ordering::AcqRel);
        }
        let listener = self.listener.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(listener) = listener {
            // A panicking listener must not take the writer thread down.
            let _ = catch_unwind(AssertUnwindSafe(|| listener(shard, last, entities)));
        }
    }
}

/// One entity's part of an append.
#[derive(Debug, Clone)]
pub struct AppendEntry {
    pub entity_id: Vec<u8>,
    pub expected: Expected,
    pub events: Vec<NewEvent>,
}

/// What a successful append reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The shard the events went to.
    pub shard: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_pos: u64,
    pub last_pos: u64,
    pub timestamp_us: i64,
    pub last_hash: [u8; 32],
}

/// A snapshot of an entity's state as of `seq`, whose event has chain hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub entity_id: Vec<u8>,
    pub seq: u64,
    pub version: u32,
    pub hash: [u8; 32],
    pub data: Vec<u8>,
}

/// A request to a shard writer. Each kind carries its work and the callback that answers
/// it; the transaction stores its outcome in the request, and `answer` sends it once the
/// transaction committed (or the failure, for every part, when it did not).
pub enum Command {
    Append(Append),
    Snapshot(Snapshot),
    Barrier(Barrier),
    Erase(Erase),
    Compact(Compact),
    Replicate(Replicate),
    ReplicaReset(Barrier),
    Install(FileCommand),
    Release(Release),
}

/// Append entries; the reply gets one result per entry, in order.
pub struct Append {
    entries: Vec<AppendEntry>,
    reply: Reply<Vec<Result<Appended>>>,
    results: Vec<Result<Appended>>,
}

/// Store a snapshot (refused if the entity does not have that seq yet), or delete an
/// entity's snapshots of one version.
pub struct Snapshot {
    op: SnapshotOp,
    reply: Reply<Result<()>>,
    result: Option<Result<()>>,
}

enum SnapshotOp {
    Save(SnapshotRequest),
    Delete { entity_id: Vec<u8>, version: u32 },
}

/// Answered once everything queued before it is committed; also checkpoints heads.
pub struct Barrier {
    reply: Reply<Result<()>>,
}

/// Erase an entity: its events, snapshots and head go, a tombstone stays, its data key is
/// destroyed and the WAL truncated. Answers the number of events deleted.
pub struct Erase {
    entity_id: Vec<u8>,
    reply: Reply<Result<u64>>,
    result: Option<Result<u64>>,
}

/// Rewrite the shard file (`VACUUM`) once everything before is committed: no stale copy of
/// a deleted or moved row stays in free space, and the space of deleted rows goes back.
pub struct Compact {
    reply: Reply<Result<()>>,
    result: Option<Result<()>>,
}

/// Cluster mode, for Raft snapshots (see replica.rs): `Install` replaces the shard file by
/// a copy of another replica's (`Store::copy_shard`). Answers the applied index the file
/// then holds, and runs alone, between transactions.
pub struct FileCommand {
    path: PathBuf,
    reply: Reply<Result<u64>>,
}

/// Cluster mode: this node no longer holds a replica of the shard (it moved to other
/// nodes). The keys of its entities are deleted here and the file replaced by an empty
/// one; answers how many keys were deleted. Runs alone, between transactions.
pub struct Release {
    reply: Reply<Result<u64>>,
}

/// Cluster mode: apply the commands of one Raft log entry (see replica.rs). The reply gets
/// one outcome per command, in order.
pub struct Replicate {
    raft_index: u64,
    commands: Vec<Replicated>,
    reply: Reply<Result<Vec<Outcome>>>,
    outcomes: Vec<Outcome>,
}

impl Command {
    /// Whether this command erases an entity.
    fn erases(&self) -> bool {
        match self {
            Command::Erase(_) => true,
            Command::Replicate(r) => r.commands.iter().any(|c| matches!(c, Replicated::Erase(_))),
            _ => false,
        }
    }

    pub fn append(entries: Vec<AppendEntry>, reply: Reply<Vec<Result<Appended>>>) -> Command {
        Command::Append(Append { entries, reply, results: Vec::new() })
    }

    pub fn snapshot(snapshot: SnapshotRequest, reply: Reply<Result<()>>) -> Command {
        Command::Snapshot(Snapshot { op: SnapshotOp::Save(snapshot), reply, result: None })
    }

    pub fn delete_snapshots(entity_id: Vec<u8>, version: u32, reply: Reply<Result<()>>) -> Command {
        Command::Snapshot(Snapshot { op: SnapshotOp::Delete { entity_id, version }, reply, result: None })
    }

    pub fn barrier(reply: Reply<Result<()>>) -> Command {
        Command::Barrier(Barrier { reply })
    }

    pub fn erase(entity_id: Vec<u8>, reply: Reply<Result<u64>>) -> Command {
        Command::Erase(Erase { entity_id, reply, result: None })
    }

    pub fn compact(reply: Reply<Result<()>>) -> Command {
        Command::Compact(Compact { reply, result: None })
    }

    pub fn replicate(raft_index: u64, commands: Vec<Replicated>, reply: Reply<Result<Vec<Outcome>>>) -> Command {
        Command::Replicate(Replicate { raft_index, commands, reply, outcomes: Vec::new() })
    }

    /// Cluster mode: lets a replica whose apply failed apply again (see `replica_failed`).
    pub fn replica_reset(reply: Reply<Result<()>>) -> Command {
        Command::ReplicaReset(Barrier { reply })
    }

    pub fn install(path: PathBuf, reply: Reply<Result<u64>>) -> Command {
        Command::Install(FileCommand { path, reply })
    }

    pub fn release(reply: Reply<Result<u64>>) -> Command {
        Command::Release(Release { reply })
    }

    /// How much of a transaction's budget (`max_txn_events`) the request uses.
    fn weight(&self) -> usize {
        match self {
            Command::Append(a) => a.entries.iter().map(|e| e.events.len()).sum(),
            Command::Replicate(r) => r
                .commands
                .iter()
                .map(|c| match c {
                    Replicated::Append(a) => a.events.len(),
                    Replicated::Erase(_) => 1000,
                })
                .sum(),
            Command::Snapshot(_) | Command::Barrier(_) | Command::ReplicaReset(_) => 1,
            Command::Erase(_) | Command::Compact(_) | Command::Install(_) | Command::Release(_) => 1000,
        }
    }

    /// Answers with the outcome the transaction stored, or with `failure` for every part.
    /// A panicking callback must not take the writer thread down, so it is contained here.
    fn answer(self, failure: Option<&Error>) {
        let _ = catch_unwind(AssertUnwindSafe(|| match (self, failure) {
            (Command::Append(a), None) => (a.reply)(a.results),
            (Command::Append(a), Some(e)) => (a.reply)(a.entries.iter().map(|_| Err(e.clone())).collect()),
            (Command::Snapshot(s), None) => (s.reply)(s.result.unwrap_or(Ok(()))),
            (Command::Barrier(b), None) => (b.reply)(Ok(())),
            (Command::Erase(d), None) => (d.reply)(d.result.unwrap_or(Ok(0))),
            (Command::ReplicaReset(b), None) => (b.reply)(Ok(())),
            (
                Command::Snapshot(Snapshot { reply, .. })
                | Command::Barrier(Barrier { reply })
                | Command::ReplicaReset(Barrier { reply }),
                Some(e),
            ) => reply(Err(e.clone())),
            (Command::Erase(d), Some(e)) => (d.reply)(Err(e.clone())),
            (Command::Compact(c), None) => (c.reply)(c.result.unwrap_or(Ok(()))),
            (Command::Compact(c), Some(e)) => (c.reply)(Err(e.clone())),
            (Command::Install(FileCommand { reply, .. }) | Command::Release(Release { reply }), Some(e)) => {
                reply(Err(e.clone()))
            }
            // Answered by `ShardWriter::file_command`, never in a batch.
            (Command::Install(FileCommand { reply, .. }) | Command::Release(Release { reply }), None) => {
                reply(Err(Error::invalid("file command", "not run")))
            }
            (Command::Replicate(r), None) => (r.reply)(Ok(r.outcomes)),
            (Command::Replicate(r), Some(e)) => (r.reply)(Err(e.clone())),
        }));
    }
}

/// Tuning of a writer; the defaults are what the benchmarks were run with.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most events written in one transaction; the rest waits for the next one.
    pub max_txn_events: usize,
    /// Checkpoint heads after this many events...
    pub checkpoint_events: u64,
    /// ...or this long after the first unpersisted head change.
    pub checkpoint_interval: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig { max_txn_events: 20_000, checkpoint_events: 32_768, checkpoint_interval: Duration::from_secs(1) }
    }
}

/// Statistics kept by a writer, for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    pub transactions: u64,
    pub events: u64,
    pub checkpoints: u64,
}

pub(crate) struct ShardWriter {
    index: u32,
    commits: Arc<Commits>,
    conn: Connection,
    heads: Arc<Heads>,
    protection: Arc<Protection>,
    config: WriterConfig,
    next_pos: u64,
    /// Heads changed since the last checkpoint, by eid.
    dirty: HashMap<i64, Head>,
    events_since_checkpoint: u64,
    dirty_since: Option<Instant>,
    chainer: Chainer,
    stats: Arc<std::sync::Mutex<WriterStats>>,
    /// Some erasure committed its rows but could not yet destroy its key.
    erasures_pending: bool,
    /// Cluster mode: the last Raft index applied (meta `applied_index`); `None` otherwise.
    applied_index: Option<u64>,
    /// Cluster mode: why the last transaction with replicated commands failed, if it did.
    /// Until `Command::ReplicaReset`, every replicated command is refused with it: entries
    /// applied after a failed one would leave a hole in this replica, so none is, and the
    /// replica applies them again, in order, when its Raft member is restarted.
    replica_failed: Option<Error>,
    /// What reopening the file needs (`Install`).
    path: PathBuf,
    identity: ShardIdentity,
    sync: SyncMode,
    file_mode: u32,
    replicated: bool,
    /// Pre-created keys this group is giving to new entities (recorded in its transaction;
    /// handed back to the pool if it fails).
    claiming: Vec<Claim>,
    /// Claims committed and not yet settled in the keystore.
    unsettled: usize,
    /// Erased entities' events are still to be deleted (`purges` has rows): a chunk runs
    /// after every group commit, and back to back while the queue is empty...
    purging: bool,
    /// ...unless the last chunk failed (a full disk): then again at the next idle tick.
    purge_failed: bool,
    /// The shard's newest events in clear, for readers (tail.rs); off on replicas.
    tail: Arc<Tail>,
}

/// Claims a shard lets pile up before the keystore settles them (one durable keystore
/// transaction, then their rows are deleted here); they are settled when idle and at stop
/// too. Bounded so that recovering them after a crash stays quick.
const SETTLE_AT: usize = 4096;

/// An erased entity's events are deleted at most this many per transaction...
const PURGE_CHUNK: usize = 2_000;
/// ...and for at most this long, so that appends queued behind a purge wait about this
/// much, whatever the size of the entity erased (W6 in docs/benchmarks.md).
const PURGE_BUDGET: Duration = Duration::from_millis(4);

/// A shard a writer thread opens (or creates) and then serves.
pub(crate) struct ShardSpec {
    pub index: u32,
    pub path: PathBuf,
    pub heads: Arc<Heads>,
    pub stats: Arc<std::sync::Mutex<WriterStats>>,
    pub tail: Arc<Tail>,
}

/// What every writer thread of a store shares.
pub(crate) struct Shared {
    pub creating: bool,
    /// Cluster mode: the shard is a replica, written by `Command::Replicate` only.
    pub replicated: bool,
    pub file_mode: u32,
    pub identity: ShardIdentity,
    pub sync: SyncMode,
    pub config: WriterConfig,
    pub protection: Arc<Protection>,
    pub commits: Arc<Commits>,
}

/// Sends `(slot of the shard in its writer thread, command)` to one writer thread.
type WriterSender = Sender<(usize, Command)>;

/// The writer threads of a store and the channels to them. Shard `i` is served by thread
/// `i % threads`; `routes[shard]` is (thread, the shard's slot in that thread).
pub(crate) struct Writers {
    senders: RwLock<Option<Vec<WriterSender>>>,
    routes: Vec<(usize, usize)>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Writers {
    /// Starts `threads` writer threads. Each opens (or creates) and recovers its own shards,
    /// so opening is parallel too, then serves them. If any shard fails to open, every
    /// thread is stopped and the error of the lowest failing shard is returned.
    pub fn start(shards: Vec<ShardSpec>, threads: usize, shared: Shared) -> Result<Writers> {
        let threads = threads.clamp(1, shards.len().max(1));
        let mut routes = Vec::with_capacity(shards.len());
        let mut per_thread: Vec<Vec<ShardSpec>> = (0..threads).map(|_| Vec::new()).collect();
        for spec in shards {
            let thread = spec.index as usize % threads;
            routes.push((thread, per_thread[thread].len()));
            per_thread[thread].push(spec);
        }
        let shared = Arc::new(shared);
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<(u32, Result<()>)>();
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for (t, specs) in per_thread.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded::<(usize, Command)>();
            let (ready, shared) = (ready_tx.clone(), shared.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("kuma-writer-{t}"))
                .spawn(move || {
                    let mut writers = Vec::new();
                    for spec in specs {
                        let index = spec.index;
                        let opened = catch_unwind(AssertUnwindSafe(|| ShardWriter::open(spec, &shared)))
                            .unwrap_or_else(|panic| Err(Error::from_panic(panic)));
                        match opened {
                            Ok(writer) => {
                                writers.push(writer);
                                let _ = ready.send((index, Ok(())));
                            }
                            Err(e) => {
                                let _ = ready.send((index, Err(e)));
                                return;
                            }
                        }
                    }
                    drop(ready);
                    serve(writers, rx);
                })
                .map_err(Error::io("start shard writer"));
            match spawned {
                Ok(handle) => {
                    senders.push(tx);
                    handles.push(handle);
                }
                Err(e) => {
                    drop(senders);
                    handles.into_iter().for_each(|h| drop(h.join()));
                    return Err(e);
                }
            }
        }
        drop(ready_tx);
        let mut first_error: Option<(u32, Error)> = None;
        for (index, result) in ready_rx.iter() {
            if let Err(e) = result {
                if first_error.as_ref().is_none_or(|(i, _)| index < *i) {
                    first_error = Some((index, e));
                }
            }
        }
        let writers = Writers { senders: RwLock::new(Some(senders)), routes, threads: std::sync::Mutex::new(handles) };
        match first_error {
            None => Ok(writers),
            Some((_, e)) => {
                writers.stop();
                Err(e)
            }
        }
    }

    /// Queues a command for the writer of `shard`. Fails only after `stop`: a writer thread
    /// never exits while its sender exists (it catches every panic).
    pub fn send(&self, shard: u32, command: Command) -> Result<()> {
        self.send_each([(shard, command)])
    }

    /// Queues several commands under one lock, so `stop` cannot interleave: either every
    /// command is queued or none is.
    pub fn send_each(&self, commands: impl IntoIterator<Item = (u32, Command)>) -> Result<()> {
        let guard = self.senders.read().unwrap_or_else(|p| p.into_inner());
        let senders = guard.as_ref().ok_or(Error::Closed)?;
        for (shard, command) in commands {
            let (thread, slot) = *self.routes.get(shard as usize).ok_or(Error::Closed)?;
            senders[thread].send((slot, command)).map_err(|_| Error::Closed)?;
        }
        Ok(())
    }

    /// Commands queued for each writer thread and not yet taken (empty once stopped).
    pub fn queue_depths(&self) -> Vec<usize> {
        let guard = self.senders.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|senders| senders.iter().map(|tx| tx.len()).collect()).unwrap_or_default()
    }

    /// The writer thread that serves each shard.
    pub fn thread_of_shards(&self) -> Vec<usize> {
        self.routes.iter().map(|(thread, _)| *thread).collect()
    }

    /// Stops accepting commands, lets every writer commit what is queued and checkpoint,
    /// and waits for the threads. Returns whether one of them had panicked. Idempotent.
    pub fn stop(&self) -> bool {
        drop(self.senders.write().unwrap_or_else(|p| p.into_inner()).take());
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        threads.into_iter().fold(false, |panicked, t| panicked | t.join().is_err())
    }
}

/// The body of a writer thread serving one or more shards (`shards[i]` receives the
/// commands sent as `(i, command)`): block for the first command, drain what else is
/// queued (up to `max_txn_events`), then commit one transaction per shard that has work.
/// By default every shard has its own thread; serving several shards per thread trades
/// fewer context switches for a smaller CPU share (measured in docs/benchmarks.md). Ends,
/// after a final checkpoint of every shard, when all senders are gone.
fn serve(mut shards: Vec<ShardWriter>, rx: Receiver<(usize, Command)>) {
    let Some(config) = shards.first().map(|w| w.config) else { return };
    loop {
        // While erased events are being deleted the queue is only polled: with nothing
        // queued, the next chunk runs at once.
        let next = if shards.iter().any(ShardWriter::purge_due) {
            match rx.try_recv() {
                Ok(message) => Ok(message),
                Err(TryRecvError::Empty) => {
                    shards.iter_mut().filter(|w| w.purge_due()).for_each(|w| w.purge_step());
                    continue;
                }
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            }
        } else {
            rx.recv_timeout(config.checkpoint_interval)
        };
        let (first_shard, first) = match next {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => {
                for w in shards.iter_mut() {
                    if w.checkpoint_due() {
                        w.group_commit(Vec::new());
                    }
                    if w.erasures_pending {
                        w.retry_erasures();
                    }
                    if w.unsettled > 0 {
                        w.settle_keys();
                    }
                    // A purge that failed (a full disk) is tried again when idle.
                    w.purge_failed = false;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batches: Vec<Vec<Command>> = shards.iter().map(|_| Vec::new()).collect();
        let mut weight = first.weight();
        batches[first_shard].push(first);
        while weight < config.max_txn_events {
            match rx.try_recv() {
                Ok((i, cmd)) => {
                    weight += cmd.weight();
                    batches[i].push(cmd);
                }
                Err(_) => break,
            }
        }
        for (w, batch) in shards.iter_mut().zip(batches) {
            w.run(batch);
            // One chunk per group commit while the queue stays busy: a purge never waits
            // for a quiet moment, and never holds the queue longer than a chunk.
            if w.purge_due() {
                w.purge_step();
            }
        }
    }
    // Clean shutdown: finish deleting erased events, persist every head so the next open
    // replays nothing, and settle every claimed key.
    for w in shards.iter_mut() {
        w.purge_all();
        if !w.dirty.is_empty() {
            w.group_commit(vec![Command::barrier(Box::new(|_| {}))]);
        }
        if w.unsettled > 0 {
            w.settle_keys();
        }
    }
}

/// The events a committed batch appended, for the shard's tail, copied into one buffer for
/// the whole commit (`TailBatch`; the requests and their bytes are freed once answered, as
/// without a tail). Entities erased in the same batch are left out (the tail then has a gap
/// and resets: they are never served).
fn tail_events(batch: &[Command], start_pos: u64, hashes: &[[u8; 32]], erased: &[Vec<u8>]) -> Vec<TailEvent> {
    let appended = || {
        batch
            .iter()
            .filter_map(|c| match c {
                Command::Append(Append { entries, results, .. }) => Some(entries.iter().zip(results.iter())),
                _ => None,
            })
            .flatten()
            .filter_map(|(entry, result)| result.as_ref().ok().map(|a| (entry, a)))
            .filter(|(entry, _)| !erased.contains(&entry.entity_id))
    };
    let size: usize = appended()
        .map(|(entry, _)| {
            entry.entity_id.len()
                + entry
                    .events
                    .iter()
                    .map(|ev| {
                        ev.event_type.len()
                            + ev.metadata.len()
                            + ev.payload.len()
                            + ev.scope.as_ref().map_or(0, String::len)
                    })
                    .sum::<usize>()
        })
        .sum();
    let mut tail = TailBatch::with_capacity(size, hashes.len());
    for (entry, a) in appended() {
        let id = tail.id(&entry.entity_id);
        for (i, ev) in entry.events.iter().enumerate() {
            let position = a.first_pos + i as u64;
            let Some(hash) = hashes.get((position - start_pos) as usize) else { return tail.finish() };
            tail.add(
                id,
                a.first_seq + i as u64,
                position,
                a.timestamp_us,
                &ev.event_type,
                &ev.metadata,
                &ev.payload,
                *hash,
                ev.scope.as_deref(),
            );
        }
    }
    tail.finish()
}

/// What a committed transaction leaves to do after its COMMIT: the ids it erased (their
/// keys still to destroy) and the chain hashes of its events in position order (for the
/// tail; empty when the shard keeps none).
struct Committed {
    erased: Vec<Vec<u8>>,
    hashes: Vec<[u8; 32]>,
    /// For a commit listener that asked for them; `None` if it did not, or if replicated
    /// writes were applied (their entities are not collected).
    entities: Option<Vec<CommittedEntity>>,
}

/// What one group commit has done so far, before its COMMIT: nothing here is visible to
/// readers until the commit succeeds.
#[derive(Default)]
struct Txn<'a> {
    /// Heads changed by this transaction, keyed by entity id.
    tentative: HashMap<&'a [u8], Head>,
    /// Entities erased by this transaction, with their eid if they had events.
    erased: Vec<(&'a [u8], Option<i64>)>,
    force_checkpoint: bool,
    written: u64,
    /// Cluster mode: the Raft index this transaction applied up to.
    applied_index: Option<u64>,
    /// Chain hashes of the events written, in position order (when the shard keeps a tail).
    hashes: Vec<[u8; 32]>,
    /// Each entity written, first time in this transaction: (id, first position, position
    /// of its event before), when the commit listener wants them.
    entities: Option<Vec<(&'a [u8], u64, u64)>>,
}

impl Txn<'_> {
    /// An entity's head as this transaction sees it: `Erased` once erased in it (so nothing
    /// later in the group writes to the rows just deleted), its tentative head if written
    /// in it, else the committed one.
    fn head(&self, w: &ShardWriter, entity_id: &[u8]) -> Result<Option<Head>> {
        if self.erased.iter().any(|(id, _)| *id == entity_id) {
            return Err(Error::Erased);
        }
        match self.tentative.get(entity_id) {
            Some(h) => Ok(Some(*h)),
            None => w.lookup_head(entity_id),
        }
    }
}

impl ShardWriter {
    /// Opens (or creates) a shard and recovers its writer.
    fn open(spec: ShardSpec, shared: &Shared) -> Result<Self> {
        let identity = ShardIdentity { index: spec.index, ..shared.identity.clone() };
        let conn = if shared.creating {
            shard::create(&spec.path, &identity, shared.sync, shared.file_mode)?
        } else {
            let (conn, format) = shard::open(&spec.path, &identity, shared.sync)?;
            if format < 3 {
                let p = &shared.protection;
                shard::migrate_to_3(&conn, |id| {
                    let idx = p.index(id);
                    Ok((idx, p.seal_id(p.data_key(id)?.as_ref(), &idx, id)))
                })?;
            }
            if format < 5 {
                shard::migrate_to_5(&conn)?;
            }
            conn
        };
        ShardWriter::recover(spec, conn, shared)
    }

    /// Prepares a writer on an opened shard: finds the next position and recovers the heads
    /// changed after the last checkpoint by scanning the events written since then.
    fn recover(spec: ShardSpec, conn: Connection, shared: &Shared) -> Result<Self> {
        let ShardSpec { index, heads, stats, path, tail } = spec;
        let mut writer = ShardWriter {
            index,
            commits: shared.commits.clone(),
            conn,
            heads,
            protection: shared.protection.clone(),
            config: shared.config,
            next_pos: 1,
            dirty: HashMap::new(),
            events_since_checkpoint: 0,
            dirty_since: None,
            chainer: Chainer::new(),
            stats,
            erasures_pending: false,
            applied_index: None,
            replica_failed: None,
            path,
            identity: ShardIdentity { index, ..shared.identity.clone() },
            sync: shared.sync,
            file_mode: shared.file_mode,
            replicated: shared.replicated,
            claiming: Vec::new(),
            unsettled: 0,
            purging: false,
            purge_failed: false,
            tail,
        };
        writer.load()?;
        Ok(writer)
    }

    /// (Re)reads what the writer keeps of its file: the next position, the applied index,
    /// the heads changed since the last checkpoint, unfinished erasures.
    fn load(&mut self) -> Result<()> {
        let conn = &self.conn;
        let checkpoint: u64 =
            meta_get::<i64>(conn, "checkpoint_pos").map_err(Error::storage("read checkpoint"))?.unwrap_or(0) as u64;
        let floor: u64 =
            meta_get::<i64>(conn, "pos_floor").map_err(Error::storage("read pos floor"))?.unwrap_or(0) as u64;
        let max_pos: u64 = conn
            .query_row("SELECT coalesce(max(pos), 0) FROM events", [], |r| r.get::<_, i64>(0))
            .map_err(Error::storage("read last position"))? as u64;
        let applied = meta_get::<i64>(conn, "applied_index").map_err(Error::storage("read applied index"))?;
        self.applied_index = if self.replicated {
            conn.execute_batch(replica::SCHEMA).map_err(Error::storage("prepare replica tables"))?;
            Some(applied.unwrap_or(0) as u64)
        } else if applied.is_some() {
            // Written locally, this replica would differ from the others for good.
            return Err(Error::ClusterMismatch {
                why: "the data dir holds a cluster's replicas: start it with :cluster".into(),
            });
        } else {
            None
        };
        self.next_pos = max_pos.max(floor) + 1;
        self.dirty.clear();
        self.events_since_checkpoint = 0;
        self.dirty_since = None;
        // Claimed keys first: recovering heads opens the ids sealed under them.
        self.recover_claims()?;
        self.replay_tail(checkpoint)?;
        // An erasure that cannot be finished now (the keystore's disk is full) does not
        // keep the store closed: it is retried while the store runs.
        self.erasures_pending = self.finish_erasures().is_err();
        self.purging = self.purges_left()?;
        self.tail.reset(self.next_pos - 1);
        self.record_erasures_in_keystore()?;
        self.commits.publish(self.index, self.next_pos - 1, None);
        Ok(())
    }

    /// Runs what a writer thread drained for this shard: group commits, except that an
    /// `Install` or `Release` runs alone, after the commands queued before it committed.
    fn run(&mut self, batch: Vec<Command>) {
        let mut pending = Vec::new();
        for command in batch {
            match command {
                Command::Install(_) | Command::Release(_) => {
                    if !pending.is_empty() {
                        self.group_commit(std::mem::take(&mut pending));
                    }
                    self.file_command(command);
                }
                other => pending.push(other),
            }
        }
        if !pending.is_empty() || self.checkpoint_due() {
            self.group_commit(pending);
        }
    }

    fn file_command(&mut self, command: Command) {
        let outcome = |w: &mut ShardWriter, c: &Command| match c {
            Command::Install(f) => w.install(&f.path),
            Command::Release(_) => w.release(),
            _ => Err(Error::invalid("file command", "not a file command")),
        };
        let result = catch_unwind(AssertUnwindSafe(|| outcome(self, &command)))
            .unwrap_or_else(|panic| Err(Error::from_panic(panic)));
        if let Command::Install(FileCommand { reply, .. }) | Command::Release(Release { reply }) = command {
            let _ = catch_unwind(AssertUnwindSafe(|| reply(result)));
        }
    }

    /// Replaces the shard file by a copy of another replica's (made by `backup`): the copy
    /// is given this store's identity, swapped in, and read as the writer reads a file it
    /// opens. Entities erased in it lose their keys here too. The store resets its readers.
    fn install(&mut self, from: &std::path::Path) -> Result<u64> {
        if !self.replicated {
            return Err(Error::invalid("install", "not a cluster-mode store"));
        }
        let incoming = self.path.with_extension("kuma-install");
        let _ = std::fs::remove_file(&incoming);
        std::fs::copy(from, &incoming).map_err(Error::io("install shard: copy"))?;
        sqlite::set_mode(&incoming, self.file_mode)?;
        {
            let c = Connection::open(&incoming).map_err(Error::storage("install shard: open copy"))?;
            c.execute("UPDATE meta SET value = ?1 WHERE key = 'store_id'", [&self.identity.store_id])
                .map_err(Error::storage("install shard: identity"))?;
        }
        // Copied into the live file with SQLite's backup API, in one write transaction:
        // readers (other connections) see the old content or the new, never a mix, and no
        // open connection is left on a file swapped away under it.
        let restored = (|| -> Result<()> {
            let src = Connection::open(&incoming).map_err(Error::storage("install shard: open copy"))?;
            let backup = rusqlite::backup::Backup::new(&src, &mut self.conn)
                .map_err(Error::storage("install shard: restore"))?;
            match backup.step(-1).map_err(Error::storage("install shard: restore"))? {
                rusqlite::backup::StepResult::Done => Ok(()),
                other => Err(Error::Storage { context: "install shard: restore", message: format!("{other:?}") }),
            }
        })();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", incoming.display()));
        }
        restored?;
        self.heads.clear();
        self.replica_failed = None;
        if let Some(keystore) = self.protection.keystore() {
            for idx in &self.keyed_hashes("SELECT idx FROM tombstones", "read tombstones")? {
                keystore.destroy_index(idx)?;
            }
        }
        self.load()?;
        Ok(self.applied_index.unwrap_or(0))
    }

    /// The keyed hashes (`idx`) a one-column query of the shard file returns.
    fn keyed_hashes(&self, sql: &str, context: &'static str) -> Result<Vec<[u8; 32]>> {
        self.conn
            .prepare(sql)
            .map_err(Error::storage(context))?
            .query_map([], |r| Ok(hash_from(bytes(r.get_ref(0)?))))
            .map_err(Error::storage(context))?
            .collect::<rusqlite::Result<_>>()
            .map_err(Error::storage(context))
    }

    /// This node no longer holds the shard: the keys of its entities go (they live on in
    /// the other replicas, so no tombstone), then an empty file replaces it. Keys first: a
    /// crash in between leaves rows without keys here, and the release is done again.
    fn release(&mut self) -> Result<u64> {
        if !self.replicated {
            return Err(Error::invalid("release", "not a cluster-mode store"));
        }
        let indexes = self.keyed_hashes("SELECT idx FROM entities", "read entities")?;
        let forgotten = match self.protection.keystore() {
            Some(keystore) => keystore.forget(&indexes)?,
            None => 0,
        };
        let empty = self.path.with_extension("kuma-empty");
        let remove = |p: &std::path::Path| {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
            }
        };
        remove(&empty);
        drop(shard::create(&empty, &self.identity, self.sync, self.file_mode)?);
        let installed = self.install(&empty);
        remove(&empty);
        installed?;
        Ok(forgotten)
    }

    /// Heads changed after the last checkpoint, from the events written since: all go to
    /// `dirty` (by eid, so the next checkpoint persists them), and those whose id can be
    /// opened are published for readers. An entity whose key is gone or missing keeps its
    /// head on disk until then: nothing can be read or written for it meanwhile.
    fn replay_tail(&mut self, checkpoint: u64) -> Result<()> {
        let mut recovered: HashMap<i64, (Head, [u8; 32], Vec<u8>)> = HashMap::new();
        {
            let mut st = self
                .conn
                .prepare(
                    "SELECT e.pos, e.eid, e.seq, e.ts, e.hash, n.idx, n.id_sealed FROM events e
                     JOIN entities n ON n.eid = e.eid WHERE e.pos > ?1 ORDER BY e.pos",
                )
                .map_err(Error::storage("recover heads"))?;
            let mut rows = st.query([checkpoint as i64]).map_err(Error::storage("recover heads"))?;
            while let Some(r) = rows.next().map_err(Error::storage("recover heads"))? {
                let head = Head {
                    pos: r.get::<_, i64>(0).map_err(Error::storage("recover heads"))? as u64,
                    eid: r.get(1).map_err(Error::storage("recover heads"))?,
                    seq: r.get::<_, i64>(2).map_err(Error::storage("recover heads"))? as u64,
                    ts: r.get(3).map_err(Error::storage("recover heads"))?,
                    hash: hash_from(r.get_ref(4).map_err(Error::storage("recover heads"))?.as_blob().unwrap_or(&[])),
                };
                let idx = hash_from(bytes(r.get_ref(5).map_err(Error::storage("recover heads"))?));
                let sealed = bytes(r.get_ref(6).map_err(Error::storage("recover heads"))?).to_vec();
                recovered.insert(head.eid, (head, idx, sealed));
            }
        }
        if !recovered.is_empty() {
            self.events_since_checkpoint = self.next_pos.saturating_sub(checkpoint + 1);
            self.dirty_since = Some(Instant::now());
            let mut readable = Vec::with_capacity(recovered.len());
            for (head, idx, sealed) in recovered.into_values() {
                self.dirty.insert(head.eid, head);
                let p = &self.protection;
                if let Ok(id) = p.data_key_by_index(&idx).and_then(|key| p.open_id(key.as_ref(), &idx, &sealed)) {
                    readable.push((id, head));
                }
            }
            self.heads.publish(readable.iter().map(|(id, h)| (id.as_slice(), *h)));
        }
        Ok(())
    }

    /// Heads changed long enough ago that they should be persisted even without traffic.
    fn checkpoint_due(&self) -> bool {
        !self.dirty.is_empty() && self.dirty_since.is_some_and(|t| t.elapsed() >= self.config.checkpoint_interval)
    }

    /// Writes a batch in one transaction and answers every request in it.
    ///
    /// What happens before COMMIT and after it are kept apart: a failure before COMMIT
    /// (disk full, a panic) leaves nothing on disk and nothing changed in memory, and every
    /// request of the batch is answered with it; once COMMIT succeeded the batch succeeded,
    /// and what follows (emptying the WAL and destroying the keys of erased entities) can
    /// only fail those erasures, which are finished later (`finish_erasures`).
    fn group_commit(&mut self, batch: Vec<Command>) {
        let mut batch = self.refuse_while_failed(batch);
        let replicating = batch.iter().any(|c| matches!(c, Command::Replicate(_)));
        let start_pos = self.next_pos;
        // An erasure's tombstone is durable before its key is destroyed (after the commit):
        // its transaction is synced whatever the store's sync mode.
        let erasing = self.sync != SyncMode::Full && batch.iter().any(Command::erases);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if erasing {
                sqlite::set_sync(&self.conn, SyncMode::Full)?;
            }
            self.write_transaction(&mut batch)
        }))
        .unwrap_or_else(|panic| Err(Error::from_panic(panic)));
        if erasing {
            let _ = sqlite::set_sync(&self.conn, self.sync);
        }
        match outcome {
            Ok(Committed { erased, hashes, entities }) => {
                // Published before anyone is answered: whatever a caller was told is
                // committed is already covered by `Commits::positions`.
                if self.tail.is_on() && self.next_pos != start_pos {
                    self.tail.push(tail_events(&batch, start_pos, &hashes, &erased), self.next_pos - 1);
                }
                if self.next_pos != start_pos {
                    self.commits.sequence(self.index, start_pos, self.next_pos - 1);
                    self.commits.publish(self.index, self.next_pos - 1, entities.as_deref());
                }
                self.unsettled += std::mem::take(&mut self.claiming).len();
                if !erased.is_empty() {
                    self.finish_erased(erased, &mut batch);
                }
                // A flush leaves nothing to change in the files afterwards (a copy of a
                // quiet store taken after `flush` is consistent): erased events are deleted
                // and claims settled first.
                if batch.iter().any(|c| matches!(c, Command::Barrier(_))) {
                    self.purge_all();
                    if self.unsettled > 0 {
                        self.settle_keys();
                    }
                }
                self.compact_if_asked(&mut batch);
                for command in batch {
                    command.answer(None);
                }
                if self.unsettled >= SETTLE_AT {
                    self.settle_keys();
                }
            }
            Err(e) => {
                // Nothing of this transaction is on disk: undo our in-memory view too.
                let _ = self.conn.execute_batch("ROLLBACK");
                self.next_pos = start_pos;
                let claiming = std::mem::take(&mut self.claiming);
                if let (Some(keystore), false) = (self.protection.keystore(), claiming.is_empty()) {
                    keystore.unassign(self.index, &claiming);
                }
                if replicating {
                    self.replica_failed = Some(e.clone());
                }
                for command in batch {
                    command.answer(Some(&e));
                }
            }
        }
    }

    /// Cluster mode: a reset clears a failed replica; while it is failed, its replicated
    /// commands are answered with the failure at once, unapplied (see `replica_failed`).
    fn refuse_while_failed(&mut self, batch: Vec<Command>) -> Vec<Command> {
        let mut kept = Vec::with_capacity(batch.len());
        for command in batch {
            match command {
                Command::ReplicaReset(_) => {
                    self.replica_failed = None;
                    command.answer(None);
                }
                Command::Replicate(_) if self.replica_failed.is_some() => {
                    let failed = self.replica_failed.clone();
                    command.answer(failed.as_ref());
                }
                other => kept.push(other),
            }
        }
        kept
    }

    /// Runs every request of the batch in one transaction, storing each one's outcome in
    /// it, and commits. An error means nothing of the batch was kept and nothing in memory
    /// changed. Returns the ids erased by the batch (committed, their keys still to destroy).
    fn write_transaction(&mut self, batch: &mut [Command]) -> Result<Committed> {
        // Data keys first: new entities get pre-created (already durable) keys, claimed in
        // this transaction; never an erased id (its appends are refused below, and it must
        // stay keyless).
        if let Some(keystore) = self.protection.keystore() {
            // Keys are made only for entities without events: a key missing for one that has
            // events is an error (KeyMissing), never replaced by a new key under which its
            // past events would be unreadable.
            let mut fresh: Vec<&[u8]> = Vec::new();
            for command in batch.iter() {
                if let Command::Append(a) = command {
                    for e in &a.entries {
                        let id = e.entity_id.as_slice();
                        if !keystore.is_cached(id)
                            && matches!(self.lookup_head(id), Ok(None))
                            && !self.is_erased(id).unwrap_or(true)
                        {
                            fresh.push(id);
                        }
                    }
                }
            }
            self.claiming = keystore.assign(self.index, fresh)?;
        }
        let installed = self.install_replicated_keys(batch)?;
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("begin transaction"))?;
        if !self.claiming.is_empty() {
            let mut claim = self
                .conn
                .prepare_cached("INSERT INTO key_claims(slot, idx) VALUES (?1, ?2)")
                .map_err(Error::storage("claim data keys"))?;
            for (slot, idx) in &self.claiming {
                claim.execute(params![*slot as i64, &idx[..]]).map_err(Error::storage("claim data keys"))?;
            }
        }
        let mut txn = Txn::default();
        if self.commits.wants_details() && !batch.iter().any(|c| matches!(c, Command::Replicate(_))) {
            txn.entities = Some(Vec::new());
        }
        let start_pos = self.next_pos;
        for command in batch {
            match command {
                Command::Append(Append { entries, results, .. }) => {
                    let entries: &[AppendEntry] = entries;
                    for entry in entries {
                        let r = self.append_entry(&mut txn, entry);
                        match &r {
                            Ok(a) => txn.written += a.last_seq - a.first_seq + 1,
                            // A concurrency conflict, an erased id or a missing key is this
                            // entry's answer; anything else (I/O, disk full) aborts the whole
                            // transaction.
                            Err(Error::WrongExpectedSeq { .. } | Error::Erased | Error::KeyMissing) => {}
                            Err(e) => return Err(e.clone()),
                        }
                        results.push(r);
                    }
                }
                Command::Snapshot(Snapshot { op, result, .. }) => {
                    let r = match op {
                        SnapshotOp::Save(snapshot) => self.save_snapshot(&txn, snapshot),
                        SnapshotOp::Delete { entity_id, version } => self.delete_snapshots(&txn, entity_id, *version),
                    };
                    if let Err(e @ Error::Storage { .. }) = &r {
                        return Err(e.clone());
                    }
                    *result = Some(r);
                }
                Command::Barrier(_) | Command::Compact(_) => txn.force_checkpoint = true,
                Command::ReplicaReset(_) | Command::Install(_) | Command::Release(_) => {}
                Command::Replicate(Replicate { raft_index, commands, outcomes, .. }) => {
                    let commands: &[Replicated] = commands;
                    self.apply_entry(&mut txn, *raft_index, commands, &installed, outcomes)?;
                }
                Command::Erase(Erase { entity_id, result, .. }) => {
                    let entity_id: &[u8] = entity_id;
                    // Never served from memory again, whether this commits or not.
                    self.tail.reset(start_pos - 1);
                    // An entity appended and deleted in one group: the delete must see the
                    // appends, so its tentative head is used and then dropped.
                    let head = match txn.head(self, entity_id) {
                        Err(Error::Erased) => None,
                        head => head?,
                    };
                    txn.tentative.remove(entity_id);
                    let count = self.delete_rows(entity_id, head, clock::now_us())?;
                    txn.erased.push((entity_id, head.map(|h| h.eid)));
                    *result = Some(Ok(count));
                }
            }
        }
        // Heads of entities erased here are not written (their rows are gone, and a new
        // entity may already have been given the same eid in this transaction).
        let erased_eids: Vec<i64> = txn.erased.iter().filter_map(|(_, eid)| *eid).collect();
        let pending = self.dirty.len() + txn.tentative.len();
        let checkpoint = pending > 0
            && (txn.force_checkpoint
                || self.events_since_checkpoint + txn.written >= self.config.checkpoint_events
                || pending >= self.heads.cap() / 2
                || self.dirty_since.is_some_and(|t| t.elapsed() >= self.config.checkpoint_interval));
        if checkpoint {
            let dirty = self.dirty.values().filter(|h| !erased_eids.contains(&h.eid));
            self.write_checkpoint(dirty.chain(txn.tentative.values()))?;
        }
        #[cfg(feature = "fault-injection")]
        crate::fault::commit(txn.erased.iter().map(|(id, _)| *id))?;
        self.conn.execute_batch("COMMIT").map_err(Error::storage("commit"))?;

        // Committed: from here on nothing can fail, and memory follows the disk.
        if let Some(index) = txn.applied_index {
            self.applied_index = Some(index);
        }
        for eid in &erased_eids {
            self.dirty.remove(eid);
        }
        for (id, _) in &txn.erased {
            self.heads.remove(id);
        }
        self.heads.publish(txn.tentative.iter().map(|(k, v)| (*k, *v)));
        if checkpoint {
            self.dirty.clear();
            self.events_since_checkpoint = 0;
            self.dirty_since = None;
            self.heads.trim_clean();
        } else if !txn.tentative.is_empty() {
            self.dirty.extend(txn.tentative.values().map(|h| (h.eid, *h)));
            self.events_since_checkpoint += txn.written;
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.transactions += 1;
        stats.events += txn.written;
        stats.checkpoints += u64::from(checkpoint);
        let entities = txn.entities.map(|written| {
            written
                .into_iter()
                .map(|(id, first_pos, prev_pos)| CommittedEntity { entity_id: id.to_vec(), first_pos, prev_pos })
                .collect()
        });
        Ok(Committed {
            erased: txn.erased.into_iter().map(|(id, _)| id.to_vec()).collect(),
            hashes: txn.hashes,
            entities,
        })
    }

    /// After the (synced) commit of erasures: their tombstones are durable, so their keys
    /// go now; their events are deleted next, in chunks (`purge_step`). A failure fails
    /// only the erasures concerned (the caller is told, and deleting again finishes them);
    /// their tombstones keep `key_destroyed = 0`, and `finish_erasures` completes them when
    /// the writer is next idle or the store next opens.
    fn finish_erased(&mut self, erased: Vec<Vec<u8>>, batch: &mut [Command]) {
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Vec<(Vec<u8>, Error)> {
            erased.into_iter().filter_map(|id| self.destroy_key(&id).err().map(|e| (id, e))).collect()
        }))
        .unwrap_or_else(|panic| vec![(Vec::new(), Error::from_panic(panic))]);
        if outcome.is_empty() {
            return;
        }
        self.erasures_pending = true;
        for command in batch.iter_mut() {
            if let Command::Erase(Erase { entity_id, result, .. }) = command {
                if let Some((_, e)) = outcome.iter().find(|(id, _)| id.is_empty() || id == entity_id) {
                    *result = Some(Err(e.clone()));
                }
            }
        }
    }

    /// Runs a compaction the batch asked for (after its commit), and stores its outcome.
    fn compact_if_asked(&mut self, batch: &mut [Command]) {
        if !batch.iter().any(|c| matches!(c, Command::Compact(_))) {
            return;
        }
        let done = catch_unwind(AssertUnwindSafe(|| sqlite::compact(&self.conn, "compact shard")))
            .unwrap_or_else(|panic| Err(Error::from_panic(panic)));
        for command in batch.iter_mut() {
            if let Command::Compact(Compact { result, .. }) = command {
                *result = Some(done.clone());
            }
        }
    }

    /// Persists heads (later entries for the same eid win) and the checkpoint position.
    fn write_checkpoint<'h>(&self, heads: impl Iterator<Item = &'h Head>) -> Result<()> {
        let mut st = self
            .conn
            .prepare_cached(
                "UPDATE entities SET head_seq = ?2, head_pos = ?3, head_ts = ?4, head_hash = ?5 WHERE eid = ?1",
            )
            .map_err(Error::storage("checkpoint heads"))?;
        for h in heads {
            st.execute(params![h.eid, h.seq as i64, h.pos as i64, h.ts, &h.hash[..]])
                .map_err(Error::storage("checkpoint heads"))?;
        }
        self.conn
            .execute("UPDATE meta SET value = ?1 WHERE key = 'checkpoint_pos'", [(self.next_pos - 1) as i64])
            .map_err(Error::storage("checkpoint heads"))?;
        Ok(())
    }

    /// Stores a snapshot if the entity already has its seq (committed or earlier in this
    /// transaction); when the snapshot is of the head, its hash must match the head's.
    fn save_snapshot(&self, txn: &Txn, s: &SnapshotRequest) -> Result<()> {
        let head = txn.head(self, &s.entity_id)?;
        if head.is_none() && self.is_erased(&s.entity_id)? {
            return Err(Error::Erased);
        }
        let Some(head) = head.filter(|h| s.seq >= 1 && s.seq <= h.seq) else {
            return Err(Error::invalid("snapshot", format!("entity has no event {}", s.seq)));
        };
        if s.seq == head.seq && s.hash != head.hash {
            return Err(Error::invalid("snapshot", "hash does not match the entity's event at that seq"));
        }
        let key = self.protection.data_key(&s.entity_id)?;
        let sealed = self.protection.seal_snapshot(key.as_ref(), &s.entity_id, s.seq, &s.data);
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO snapshots(eid, seq, version, ts, hash, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(Error::storage("save snapshot"))?
            .execute(params![head.eid, s.seq as i64, s.version, clock::now_us(), &s.hash[..], &sealed])
            .map_err(Error::storage("save snapshot"))?;
        Ok(())
    }

    /// Deletes an entity's snapshots of `version` (nothing to do for an entity without
    /// events; an erased one has none left).
    fn delete_snapshots(&self, txn: &Txn, entity_id: &[u8], version: u32) -> Result<()> {
        let head = match txn.head(self, entity_id) {
            Err(Error::Erased) => None,
            head => head?,
        };
        if let Some(head) = head {
            self.conn
                .prepare_cached("DELETE FROM snapshots WHERE eid = ?1 AND version = ?2")
                .map_err(Error::storage("delete snapshots"))?
                .execute(params![head.eid, version])
                .map_err(Error::storage("delete snapshots"))?;
        }
        Ok(())
    }

    /// The committed head of an entity; a head read from disk is clean (see heads.rs), so
    /// it is cached for the next append.
    fn lookup_head(&self, entity_id: &[u8]) -> Result<Option<Head>> {
        if let Some(h) = self.heads.get(entity_id) {
            return Ok(Some(h));
        }
        let head = head_on_disk(&self.conn, &self.protection.index(entity_id))?;
        if let Some(h) = head {
            self.heads.cache_clean(entity_id, h);
        }
        Ok(head)
    }

    fn append_entry<'a>(&mut self, txn: &mut Txn<'a>, entry: &'a AppendEntry) -> Result<Appended> {
        let id = entry.entity_id.as_slice();
        let head = txn.head(self, id)?;
        // An erased entity answers Erased whatever seq the caller expected (a mismatch would
        // send it to retry with the "right" seq, only to learn then that it is erased).
        if head.is_none() && self.is_erased(id)? {
            return Err(Error::Erased);
        }
        let current = head.map_or(0, |h| h.seq);
        if let Expected::Seq(expected) = entry.expected {
            if expected != current {
                return Err(Error::WrongExpectedSeq { expected, actual: current });
            }
        }
        // Erased (a tombstone in the keystore) or missing (KeyMissing): no event is written.
        let key = self.protection.data_key(id)?;
        let eid = match head {
            Some(h) => h.eid,
            None => {
                let idx = self.protection.index(id);
                self.create_entity(&idx, &self.protection.seal_id(key.as_ref(), &idx, id))?
            }
        };
        // Timestamps never go backwards within an entity, even if the clock does.
        let ts = clock::now_us().max(head.map_or(i64::MIN, |h| h.ts));
        let protection = self.protection.clone();
        let sealed = entry.events.iter().enumerate().map(|(i, ev)| {
            #[cfg(feature = "fault-injection")]
            if ev.event_type == crate::fault::PANIC_EVENT_TYPE {
                panic!("fault injection: writer panic requested");
            }
            let seq = current + 1 + i as u64;
            let (metadata, payload) = protection.seal_event(key.as_ref(), id, seq, &ev.metadata, &ev.payload);
            (ev.event_type.as_str(), metadata, payload, ev.scope.as_deref())
        });
        self.write_events(txn, id, eid, head, ts, sealed)
    }

    /// Writes an entity's next events (already sealed) after `head`, at timestamp `ts`:
    /// positions, back-pointers, skip rows and the hash chain; records the new head in `txn`.
    fn write_events<'a, 'e>(
        &mut self,
        txn: &mut Txn<'a>,
        id: &'a [u8],
        eid: i64,
        head: Option<Head>,
        ts: i64,
        events: impl Iterator<Item = (&'e str, Vec<u8>, Vec<u8>, Option<&'e str>)>,
    ) -> Result<Appended> {
        let current = head.map_or(0, |h| h.seq);
        let mut prev_hash = head.map_or(GENESIS, |h| h.hash);
        let mut prev_pos = head.map_or(0, |h| h.pos);
        let mut seq = current;
        let first_pos = self.next_pos;
        if let Some(written) = txn.entities.as_mut() {
            if !txn.tentative.contains_key(id) {
                written.push((id, first_pos, prev_pos));
            }
        }
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO events(pos, eid, seq, prev_pos, ts, type, meta, payload, hash, scope)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(Error::storage("insert event"))?;
        let mut skip = self
            .conn
            .prepare_cached("INSERT INTO skips(eid, seq, pos, ts) VALUES (?1, ?2, ?3, ?4)")
            .map_err(Error::storage("insert skip"))?;
        for (event_type, metadata, payload, scope) in events {
            seq += 1;
            let pos = self.next_pos;
            self.next_pos += 1;
            let hash = self.chainer.link(&prev_hash, id, seq, ts, event_type, &metadata, &payload);
            insert
                .execute(params![
                    pos as i64,
                    eid,
                    seq as i64,
                    prev_pos as i64,
                    ts,
                    event_type,
                    metadata,
                    payload,
                    &hash[..],
                    scope
                ])
                .map_err(Error::storage("insert event"))?;
            if seq.is_multiple_of(SKIP_EVERY) {
                skip.execute(params![eid, seq as i64, pos as i64, ts]).map_err(Error::storage("insert skip"))?;
            }
            if self.tail.is_on() {
                txn.hashes.push(hash);
            }
            prev_hash = hash;
            prev_pos = pos;
        }
        txn.tentative.insert(id, Head { eid, seq, pos: prev_pos, ts, hash: prev_hash });
        Ok(Appended {
            shard: self.index,
            first_seq: current + 1,
            last_seq: seq,
            first_pos,
            last_pos: prev_pos,
            timestamp_us: ts,
            last_hash: prev_hash,
        })
    }

    /// Cluster mode: installs the data keys that the batch's replicated appends carry, in
    /// one durable keystore transaction before the shard's. What each key's installation
    /// gave, by keyed hash (see `Keystore::install`).
    fn install_replicated_keys(&self, batch: &[Command]) -> Result<HashMap<[u8; 32], Result<bool>>> {
        let Some(keystore) = self.protection.keystore() else { return Ok(HashMap::new()) };
        let mut keys: Vec<([u8; 32], Vec<u8>)> = Vec::new();
        for command in batch {
            if let Command::Replicate(r) = command {
                if Some(r.raft_index) <= self.applied_index {
                    continue;
                }
                for c in &r.commands {
                    if let Replicated::Append(PreparedAppend { entity_id, new_key: Some(wrapped), .. }) = c {
                        let idx = keystore.index(entity_id);
                        if !keys.iter().any(|(i, w)| *i == idx && w == wrapped) {
                            keys.push((idx, wrapped.clone()));
                        }
                    }
                }
            }
        }
        let results = keystore.install(&keys)?;
        let mut out = HashMap::with_capacity(keys.len());
        for ((idx, _), r) in keys.into_iter().zip(results) {
            // Two different keys for one entity in one batch: the second one lost.
            out.entry(idx).and_modify(|prev: &mut Result<bool>| *prev = Ok(false)).or_insert(r);
        }
        Ok(out)
    }

    /// Cluster mode: applies the commands of Raft entry `raft_index` in the open
    /// transaction, one outcome each. An entry at or below the applied index was applied
    /// before (a replay after a restart): its outcomes are read back, nothing is written.
    fn apply_entry<'a>(
        &mut self,
        txn: &mut Txn<'a>,
        raft_index: u64,
        commands: &'a [Replicated],
        installed: &HashMap<[u8; 32], Result<bool>>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<()> {
        let Some(applied) = self.applied_index else { return Err(Error::invalid("replicate", "not a replica")) };
        let replay = raft_index <= applied.max(txn.applied_index.unwrap_or(0));
        for command in commands {
            let outcome = match self.stored_outcome(command.command_id())? {
                Some(o) => o,
                None if replay => Outcome::Conflict { head_seq: 0 },
                None => {
                    let outcome = match command {
                        Replicated::Append(a) => self.apply_append(txn, a, installed)?,
                        Replicated::Erase(e) => self.apply_erase(txn, e)?,
                    };
                    if let Some(bytes) = outcome.encode() {
                        self.conn
                            .prepare_cached(
                                "INSERT INTO applied_commands(command_id, raft_index, ts, outcome) VALUES (?1, ?2, ?3, ?4)",
                            )
                            .map_err(Error::storage("record applied command"))?
                            .execute(params![
                                &command.command_id()[..],
                                raft_index as i64,
                                command.timestamp_us(),
                                bytes
                            ])
                            .map_err(Error::storage("record applied command"))?;
                    }
                    outcome
                }
            };
            outcomes.push(outcome);
        }
        if replay {
            return Ok(());
        }
        self.conn
            .execute("UPDATE meta SET value = ?1 WHERE key = 'applied_index'", [raft_index as i64])
            .map_err(Error::storage("record applied index"))?;
        // Outcomes are kept for retries within the window (by the commands' own
        // timestamps, so every replica forgets the same ones).
        if raft_index.is_multiple_of(1024) {
            if let Some(newest) = commands.iter().map(|c| c.timestamp_us()).max() {
                self.conn
                    .execute("DELETE FROM applied_commands WHERE ts < ?1", [newest - replica::DEDUPE_WINDOW_US])
                    .map_err(Error::storage("forget old command outcomes"))?;
            }
        }
        txn.applied_index = Some(raft_index);
        Ok(())
    }

    /// The outcome stored for a command id applied before, if any.
    fn stored_outcome(&self, command_id: &[u8]) -> Result<Option<Outcome>> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT outcome FROM applied_commands WHERE command_id = ?1")
            .map_err(Error::storage("read applied command"))?
            .query_row([command_id], |r| r.get(0))
            .optional()
            .map_err(Error::storage("read applied command"))?;
        Ok(bytes.and_then(|b| Outcome::decode(self.index, &b)))
    }

    /// Applies a prepared append: the same checks as a local append, against this replica's
    /// state, then the leader's sealed bytes at this replica's next positions.
    fn apply_append<'a>(
        &mut self,
        txn: &mut Txn<'a>,
        a: &'a PreparedAppend,
        installed: &HashMap<[u8; 32], Result<bool>>,
    ) -> Result<Outcome> {
        let id = a.entity_id.as_slice();
        let head = match txn.head(self, id) {
            Err(Error::Erased) => return Ok(Outcome::Refused(Error::Erased)),
            head => head?,
        };
        if head.is_none() && self.is_erased(id)? {
            return Ok(Outcome::Refused(Error::Erased));
        }
        let current = head.map_or(0, |h| h.seq);
        if let Expected::Seq(expected) = a.expected {
            if expected != current {
                return Ok(Outcome::Refused(Error::WrongExpectedSeq { expected, actual: current }));
            }
        }
        if a.first_seq != current + 1 || a.events.is_empty() {
            return Ok(Outcome::Conflict { head_seq: current });
        }
        let idx = self.protection.index(id);
        if a.new_key.is_some() {
            match installed.get(&idx) {
                Some(Ok(true)) => {}
                Some(Err(Error::Erased)) => return Ok(Outcome::Refused(Error::Erased)),
                _ => return Ok(Outcome::Conflict { head_seq: current }),
            }
        }
        let key = match self.protection.data_key(id) {
            Ok(key) => key,
            Err(e @ (Error::Erased | Error::KeyMissing)) => return Ok(Outcome::Refused(e)),
            Err(e) => return Err(e),
        };
        // Sealed under another key than this replica's (a leader's stale view): refused
        // here, prepared again by the leader, never stored unreadable.
        let first = &a.events[0];
        if self.protection.open_event(key.as_ref(), id, a.first_seq, &first.metadata, &first.payload).is_err() {
            return Ok(Outcome::Conflict { head_seq: current });
        }
        let eid = match head {
            Some(h) => h.eid,
            None => self.create_entity(&idx, &a.id_sealed)?,
        };
        let ts = a.timestamp_us.max(head.map_or(i64::MIN, |h| h.ts));
        let events =
            a.events.iter().map(|e| (e.event_type.as_str(), e.metadata.clone(), e.payload.clone(), e.scope.as_deref()));
        let appended = self.write_events(txn, id, eid, head, ts, events)?;
        txn.written += appended.last_seq - appended.first_seq + 1;
        Ok(Outcome::Appended(appended))
    }

    /// Applies a replicated erasure (its tombstone dated by the leader).
    fn apply_erase<'a>(&mut self, txn: &mut Txn<'a>, e: &'a PreparedErase) -> Result<Outcome> {
        let id = e.entity_id.as_slice();
        let head = match txn.head(self, id) {
            Err(Error::Erased) => None,
            head => head?,
        };
        txn.tentative.remove(id);
        let count = self.delete_rows(id, head, e.timestamp_us)?;
        txn.erased.push((id, head.map(|h| h.eid)));
        Ok(Outcome::Erased(count))
    }

    /// Inserts a new entity's row (its head filled in at the next checkpoint); its eid.
    /// While erased entities' events are being deleted, their eids are not given out again
    /// (the events left would otherwise look like the new entity's).
    fn create_entity(&self, idx: &[u8; 32], id_sealed: &[u8]) -> Result<i64> {
        let sql = if self.purging {
            "INSERT INTO entities(eid, idx, id_sealed, head_seq, head_pos, head_ts, head_hash)
             VALUES (max(coalesce((SELECT max(eid) FROM entities), 0), coalesce((SELECT max(eid) FROM purges), 0)) + 1,
                     ?1, ?2, 0, 0, 0, ?3)"
        } else {
            "INSERT INTO entities(idx, id_sealed, head_seq, head_pos, head_ts, head_hash)
             VALUES (?1, ?2, 0, 0, 0, ?3)"
        };
        self.conn
            .prepare_cached(sql)
            .map_err(Error::storage("create entity"))?
            .execute(params![&idx[..], id_sealed, &GENESIS[..]])
            .map_err(Error::storage("create entity"))?;
        Ok(self.conn.last_insert_rowid())
    }

    fn is_erased(&self, entity_id: &[u8]) -> Result<bool> {
        let index = self.protection.index(entity_id);
        self.conn
            .prepare_cached("SELECT 1 FROM tombstones WHERE idx = ?1")
            .map_err(Error::storage("read tombstone"))?
            .exists([&index[..]])
            .map_err(Error::storage("read tombstone"))
    }

    /// Erases an entity in the open transaction: a tombstone, and its row, snapshots and
    /// skips deleted; its events are queued in `purges`, deleted after the commit in chunks
    /// (`purge_step`). Unreadable from the commit on: nothing finds them without the
    /// entity's row, and its key goes right after. Returns the number of events erased
    /// (seqs have no gaps).
    fn delete_rows(&mut self, entity_id: &[u8], head: Option<Head>, ts: i64) -> Result<u64> {
        let index = self.protection.index(entity_id);
        let mut count = 0u64;
        if let Some(head) = head {
            count = head.seq;
            for sql in [
                "DELETE FROM skips WHERE eid = ?1",
                "DELETE FROM snapshots WHERE eid = ?1",
                "DELETE FROM entities WHERE eid = ?1",
            ] {
                self.conn.execute(sql, [head.eid]).map_err(Error::storage("erase entity"))?;
            }
            if head.pos != 0 {
                self.conn
                    .execute(
                        "INSERT OR REPLACE INTO purges(eid, idx, next_pos) VALUES (?1, ?2, ?3)",
                        params![head.eid, &index[..], head.pos as i64],
                    )
                    .map_err(Error::storage("erase entity"))?;
                self.purging = true;
            }
        }
        self.conn
            .execute(
                "INSERT OR IGNORE INTO tombstones(idx, ts, key_destroyed) VALUES (?1, ?2, 0)",
                params![&index[..], ts],
            )
            .map_err(Error::storage("write tombstone"))?;
        // The deleted rows may have held the highest positions: never hand them out again.
        self.conn
            .execute("UPDATE meta SET value = max(value, ?1) WHERE key = 'pos_floor'", [(self.next_pos - 1) as i64])
            .map_err(Error::storage("write position floor"))?;
        Ok(count)
    }

    /// Whether erased entities' events are still to be deleted.
    fn purges_left(&self) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT 1 FROM purges LIMIT 1")
            .map_err(Error::storage("read purges"))?
            .exists([])
            .map_err(Error::storage("read purges"))
    }

    /// Deletes the next chunk of an erased entity's events (see `PURGE_CHUNK`); a failure
    /// (a full disk) leaves the rest for the next idle tick or open. Once the last one is
    /// gone, a plain store is compacted: its deleted rows were in clear, and SQLite may have
    /// left stale copies of them (moved cells) in the free space of pages. An encrypted
    /// store's stale copies are sealed under keys already destroyed.
    fn purge_step(&mut self) {
        let step = catch_unwind(AssertUnwindSafe(|| -> Result<bool> {
            let more = self.purge_chunk()?;
            if !more && !self.protection.is_encrypted() {
                sqlite::compact(&self.conn, "compact after erasure")?;
            }
            Ok(more)
        }));
        match step {
            Ok(Ok(more)) => self.purging = more,
            _ => self.purge_failed = true,
        }
    }

    /// Whether a chunk of erased events should be deleted now.
    fn purge_due(&self) -> bool {
        self.purging && !self.purge_failed
    }

    /// Runs `purge_step` until no erased event is left (or a step fails).
    fn purge_all(&mut self) {
        self.purge_failed = false;
        while self.purge_due() {
            self.purge_step();
        }
    }

    /// One transaction: deletes up to `PURGE_CHUNK` events of the first entity in
    /// `purges`, newest first along their back-pointers, within `PURGE_BUDGET`, and records
    /// where it stopped. Whether any erased event is left.
    fn purge_chunk(&mut self) -> Result<bool> {
        #[cfg(feature = "fault-injection")]
        crate::fault::purge()?;
        let started = Instant::now();
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)
            .map_err(Error::storage("purge erased events"))?;
        let job = tx
            .query_row("SELECT eid, next_pos FROM purges LIMIT 1", [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
            .optional()
            .map_err(Error::storage("purge erased events"))?;
        let Some((eid, mut pos)) = job else { return Ok(false) };
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM events WHERE pos = ?1 RETURNING prev_pos")
                .map_err(Error::storage("purge erased events"))?;
            let mut deleted = 0;
            while pos != 0 && deleted < PURGE_CHUNK && (deleted == 0 || started.elapsed() < PURGE_BUDGET) {
                // A row already gone (never expected) ends the walk rather than looping.
                pos = delete
                    .query_row([pos], |r| r.get::<_, i64>(0))
                    .optional()
                    .map_err(Error::storage("purge erased events"))?
                    .unwrap_or(0);
                deleted += 1;
            }
        }
        if pos == 0 {
            tx.execute("DELETE FROM purges WHERE eid = ?1", [eid])
        } else {
            tx.execute("UPDATE purges SET next_pos = ?2 WHERE eid = ?1", [eid, pos])
        }
        .map_err(Error::storage("purge erased events"))?;
        let more = pos != 0 || self.purges_left()?;
        tx.commit().map_err(Error::storage("purge erased events"))?;
        Ok(more)
    }

    /// Destroys an erased entity's data key and records that on its tombstone.
    fn destroy_key(&self, entity_id: &[u8]) -> Result<()> {
        #[cfg(feature = "fault-injection")]
        crate::fault::destroy_key(entity_id)?;
        if let Some(keystore) = self.protection.keystore() {
            keystore.destroy(entity_id)?;
        }
        let index = self.protection.index(entity_id);
        self.key_destroyed(&index[..])
    }

    /// Copies the shard's tombstones into the keystore (keystores written before it kept
    /// tombstones of its own), so that no key is made again for an erased id whatever
    /// shard files come with the keystore later.
    fn record_erasures_in_keystore(&self) -> Result<()> {
        let Some(keystore) = self.protection.keystore() else { return Ok(()) };
        let tombstones: Vec<[u8; 32]> = self
            .conn
            .prepare("SELECT idx FROM tombstones")
            .map_err(Error::storage("read tombstones"))?
            .query_map([], |r| Ok(hash_from(bytes(r.get_ref(0)?))))
            .map_err(Error::storage("read tombstones"))?
            .collect::<rusqlite::Result<_>>()
            .map_err(Error::storage("read tombstones"))?;
        keystore.record_erased(&tombstones)
    }

    /// Retries erasures whose keys could not be destroyed after their commit (a full disk
    /// under the keystore, a WAL kept busy by a reader): on failure, again at the next idle
    /// tick.
    fn retry_erasures(&mut self) {
        let done = catch_unwind(AssertUnwindSafe(|| self.finish_erasures()));
        self.erasures_pending = !matches!(done, Ok(Ok(())));
    }

    /// Finishes erasures interrupted by a crash or a failure after their commit: keys of
    /// tombstoned entities that still exist are destroyed (the keystore finds them by the
    /// tombstone's keyed hash).
    fn finish_erasures(&mut self) -> Result<()> {
        let pending: Vec<Vec<u8>> = self
            .conn
            .prepare("SELECT idx FROM tombstones WHERE key_destroyed = 0")
            .map_err(Error::storage("read tombstones"))?
            .query_map([], |r| r.get(0))
            .map_err(Error::storage("read tombstones"))?
            .collect::<rusqlite::Result<_>>()
            .map_err(Error::storage("read tombstones"))?;
        if pending.is_empty() {
            return Ok(());
        }
        // The WAL may still hold old images of the erased rows (a crash before it was
        // emptied): empty it before the keys go.
        sqlite::truncate_wal(&self.conn, "checkpoint after erasure")?;
        for idx in pending {
            if let (Some(keystore), Ok(index)) = (self.protection.keystore(), <[u8; 32]>::try_from(idx.as_slice())) {
                keystore.destroy_index(&index)?;
            }
            self.key_destroyed(&idx)?;
        }
        Ok(())
    }

    /// Records on an erased entity's tombstone that its key is gone; a claim of a pool key
    /// it may have had goes with it (the keystore deleted that pool row).
    fn key_destroyed(&self, idx: &[u8]) -> Result<()> {
        self.conn
            .execute("UPDATE tombstones SET key_destroyed = 1 WHERE idx = ?1", [idx])
            .map_err(Error::storage("update tombstone"))?;
        self.conn
            .execute("DELETE FROM key_claims WHERE idx = ?1", [idx])
            .map_err(Error::storage("update tombstone"))?;
        Ok(())
    }

    /// Has the keystore move this shard's claimed keys under their entities, then deletes
    /// the claims. On failure (a full disk under the keystore) they stay claimed, found in
    /// memory, and are settled at the next idle tick or open.
    fn settle_keys(&mut self) {
        let Some(keystore) = self.protection.keystore() else {
            self.unsettled = 0;
            return;
        };
        let settled = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
            let slots = keystore.settle(self.index)?;
            if slots.is_empty() {
                return Ok(());
            }
            // On failure the claims stay (rolled back when `tx` drops); the next open finds
            // their keys settled and drops them.
            let _ = (|| -> rusqlite::Result<()> {
                let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
                {
                    let mut delete = tx.prepare_cached("DELETE FROM key_claims WHERE slot = ?1")?;
                    for slot in &slots {
                        delete.execute([*slot as i64])?;
                    }
                }
                tx.commit()
            })();
            Ok(())
        }));
        if matches!(settled, Ok(Ok(()))) {
            self.unsettled = 0;
        }
    }

    /// After a crash (or a stop that could not settle): the keystore settles the claims
    /// left in this shard before it gives out any key, then they are deleted.
    fn recover_claims(&mut self) -> Result<()> {
        let Some(keystore) = self.protection.keystore() else { return Ok(()) };
        let claims: Vec<(u64, [u8; 32], bool)> = self
            .conn
            .prepare(
                "SELECT c.slot, c.idx, t.idx IS NOT NULL FROM key_claims c LEFT JOIN tombstones t ON t.idx = c.idx",
            )
            .map_err(Error::storage("read key claims"))?
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, hash_from(bytes(r.get_ref(1)?)), r.get(2)?)))
            .map_err(Error::storage("read key claims"))?
            .collect::<rusqlite::Result<_>>()
            .map_err(Error::storage("read key claims"))?;
        if claims.is_empty() {
            return Ok(());
        }
        keystore.recover_claims(&claims)?;
        self.conn.execute("DELETE FROM key_claims", []).map_err(Error::storage("delete key claims"))?;
        Ok(())
    }
}
