//! Kuma's storage core: an event log sharded over SQLite files, with a BLAKE3 hash chain per
//! entity and one group-committing writer thread per shard.
//!
//! This crate knows nothing about the BEAM: it takes bytes and plain types, answers through
//! callbacks, and is tested with `cargo test`. The NIF crate (`kuma_nif`) only converts terms
//! and schedules calls.
//!
//! Where a write goes: [`store::Store::append`] -> [`router`] picks the shard ->
//! [`writer`] thread of that shard -> [`shard`] file, chained by [`chain`] over the
//! envelope from [`codec`], sealed by [`protection`] with keys from [`keystore`].
//! Reads: [`reader`] (one entity), [`query`] (across entities), [`verify`] (chains), on
//! connections from [`readers`]. Every SQLite file is set up by [`sqlite`]; the data
//! directory is described by its [`manifest`]. In cluster mode a shard's writes are
//! prepared by its leader and applied by every replica ([`replica`]).

pub mod backup;
pub mod chain;
pub mod cipher;
pub mod clock;
pub mod codec;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod heads;
pub mod keystore;
mod manifest;
pub mod order;
pub mod protection;
pub mod query;
pub mod reader;
mod readers;
pub mod replica;
pub mod router;
pub mod shard;
pub mod sqldb;
pub mod sqlite;
pub mod store;
pub mod tail;
pub mod verify;
pub mod writer;

pub use cipher::Key;
pub use codec::{Expected, NewEvent, StoredEvent};
pub use error::{Error, Result};
pub use heads::Head;
pub use query::{Page, ScopeMatch, ShardQuery};
pub use reader::Snapshot;
pub use sqlite::SyncMode;
pub use store::{AllPage, Store, StoreConfig};
pub use verify::{EntityVerdict, ShardProblem, ShardReport};
pub use writer::{AppendEntry, Appended, CommitListener, CommittedEntity, SnapshotRequest, WriterConfig, WriterStats};

impl Store {
    /// Appends and waits for the commit (for Rust callers and tests; the NIF uses the
    /// callback form so no scheduler thread ever blocks).
    pub fn append_wait(&self, entity_id: &[u8], expected: Expected, events: Vec<NewEvent>) -> Result<Appended> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.append(entity_id.to_vec(), expected, events, Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// `save_snapshot` and wait.
    pub fn save_snapshot_wait(&self, snapshot: SnapshotRequest) -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.save_snapshot(snapshot, Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// `delete_snapshots`, waiting for the answer.
    pub fn delete_snapshots_wait(&self, entity_id: &[u8], version: u32) -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.delete_snapshots(entity_id.to_vec(), version, Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// `delete` and wait.
    pub fn delete_wait(&self, entity_id: &[u8]) -> Result<u64> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.delete(entity_id.to_vec(), Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// `replicate` and wait.
    pub fn replicate_wait(
        &self,
        shard: u32,
        raft_index: u64,
        commands: Vec<replica::Replicated>,
    ) -> Result<Vec<replica::Outcome>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.replicate(shard, raft_index, commands, Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| Error::Closed)?
    }

    /// `append_batch` and wait.
    pub fn append_batch_wait(&self, entries: Vec<AppendEntry>) -> Result<Vec<Result<Appended>>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.append_batch(entries, Box::new(move |r| drop(tx.send(r))))?;
        rx.recv().map_err(|_| Error::Closed)
    }
}
