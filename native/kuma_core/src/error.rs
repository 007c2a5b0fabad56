//! One error type for the whole core. Every variant carries what a user needs to act on it;
//! the NIF crate turns each into an Elixir `{:error, reason}` term.

use std::fmt;

/// What can go wrong in the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Input rejected before anything was written: `what` names the field, `why` says why.
    Invalid { what: &'static str, why: String },
    /// A size limit was exceeded (`what`: entity_id, event_type, metadata, payload, events, append).
    TooLarge { what: &'static str, size: u64, max: u64 },
    /// Optimistic concurrency: the entity's current sequence is not what the caller expected.
    WrongExpectedSeq { expected: u64, actual: u64 },
    /// The store (or this shard) has been stopped.
    Closed,
    /// The data directory is in use by another store (this VM or another process).
    Locked { path: String },
    /// The data directory was created with another shard count.
    ShardCountMismatch { stored: u32, given: u32 },
    /// A file where a shard should be is not a Kuma shard (another SQLite DB, or garbage).
    ForeignFile { path: String, why: String },
    /// A shard file the manifest lists is missing: refusing to recreate it empty.
    MissingShard { path: String },
    /// The data dir was written by an unknown (newer) format version.
    UnsupportedFormat { found: u32, supported: u32 },
    /// SQLite or the file system failed; `context` says what Kuma was doing.
    Storage { context: &'static str, message: String },
    /// Stored data failed an integrity check (used by reads that meet a broken chain).
    Corrupt { seq: u64, why: String },
    /// A panic inside the core was caught; the operation did not complete.
    Panic { message: String },
    /// The master key given does not open the keystore.
    WrongMasterKey,
    /// The store is encrypted but its keystore file is not where it should be.
    MissingKeystore { path: String },
    /// The store was created with (`stored: true`) or without encryption, and is being
    /// opened the other way.
    EncryptionMismatch { stored: bool },
    /// The entity was erased: its key is gone (and on a live store, its events too).
    Erased,
    /// An encrypted entity's data key is missing from the keystore although the entity was
    /// never erased (a keystore restored from an older backup, a copy taken while the store
    /// ran, a damaged file). Nothing is read or written for it, and no new key is made.
    KeyMissing,
    /// A stored ciphertext did not decrypt (altered bytes, or moved from elsewhere).
    Decrypt { seq: u64, why: String },
    /// A query ran out of its time and was interrupted (nothing was changed).
    Timeout,
    /// A statement of a read model failed (`index`: its place in the transaction, if any);
    /// nothing of the transaction was kept.
    Sql { index: Option<usize>, message: String },
    /// Cluster mode: a replicated append was prepared against a head that is no longer the
    /// entity's (`head_seq` is); nothing was written, and its leader prepares it again.
    Conflict { head_seq: u64 },
    /// Cluster mode: this store is a replica, written only by applying replicated commands.
    Replicated,
    /// Cluster mode: the data dir or keystore belongs to another cluster (`why` says how).
    ClusterMismatch { why: String },
    /// A backup segment failed a check: `file` is the segment, `frame` the first bad frame
    /// (0 is the header), `why` what is wrong. Nothing was restored.
    BackupDamaged { file: String, frame: u64, why: String },
}

impl Error {
    pub(crate) fn invalid(what: &'static str, why: impl Into<String>) -> Self {
        Error::Invalid { what, why: why.into() }
    }

    /// Wraps a SQLite error with what Kuma was doing when it happened.
    pub(crate) fn storage(context: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
        move |e| Error::Storage { context, message: e.to_string() }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |e| Error::Storage { context, message: e.to_string() }
    }

    /// Turns a caught panic payload into an error.
    pub fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "unknown panic".to_string()
        };
        Error::Panic { message }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { what, why } => write!(f, "invalid {what}: {why}"),
            Error::TooLarge { what, size, max } => write!(f, "{what} too large: {size} > {max}"),
            Error::WrongExpectedSeq { expected, actual } => {
                write!(f, "wrong expected seq: expected {expected}, actual {actual}")
            }
            Error::Closed => write!(f, "store closed"),
            Error::Locked { path } => write!(f, "data dir {path} is in use by another store"),
            Error::ShardCountMismatch { stored, given } => {
                write!(f, "data dir has {stored} shards, {given} requested")
            }
            Error::ForeignFile { path, why } => write!(f, "{path} is not a Kuma shard: {why}"),
            Error::MissingShard { path } => write!(f, "shard file {path} is missing"),
            Error::UnsupportedFormat { found, supported } => {
                write!(f, "storage format {found} is newer than supported {supported}")
            }
            Error::Storage { context, message } => write!(f, "{context}: {message}"),
            Error::Corrupt { seq, why } => write!(f, "corrupt event at seq {seq}: {why}"),
            Error::Panic { message } => write!(f, "internal panic: {message}"),
            Error::WrongMasterKey => write!(f, "the master key does not open the keystore"),
            Error::MissingKeystore { path } => write!(f, "keystore {path} is missing"),
            Error::EncryptionMismatch { stored: true } => write!(f, "the store is encrypted: a master key is required"),
            Error::EncryptionMismatch { stored: false } => {
                write!(f, "the store was created without encryption; it cannot be opened encrypted")
            }
            Error::Erased => write!(f, "the entity was erased"),
            Error::KeyMissing => {
                write!(f, "the entity's data key is missing from the keystore, and it was never erased")
            }
            Error::Decrypt { seq, why } => write!(f, "event {seq} does not decrypt: {why}"),
            Error::Timeout => write!(f, "the query ran out of time and was interrupted"),
            Error::Sql { index: Some(i), message } => write!(f, "statement {i} failed: {message}"),
            Error::Sql { index: None, message } => write!(f, "SQL failed: {message}"),
            Error::Conflict { head_seq } => {
                write!(f, "prepared against a stale head (the entity is at seq {head_seq}); prepare again")
            }
            Error::Replicated => write!(f, "this store is a replica: writes go through the shard's leader"),
            Error::ClusterMismatch { why } => write!(f, "belongs to another cluster: {why}"),
            Error::BackupDamaged { file, frame, why } => write!(f, "backup damaged: {file}, frame {frame}: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Result with the core's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
