//! Cluster mode: a shard replicated by Raft. The shard's leader *prepares* each write (the
//! entity's seqs, the timestamp, the data key if the entity has none yet, the sealed bytes),
//! the prepared command travels through the Raft log, and every replica *applies* it
//! (`writer.rs`, `Command::Replicate`): the expected-seq check, positions, the hash chain
//! and the rows, in one transaction that also stores the Raft index it applied and the
//! command's outcome. So every replica holds the same events at the same positions with the
//! same chain, and nothing in clear enters the Raft log.
//!
//! Determinism: applying depends only on the command and on the shard's state, which is
//! the same on every replica that applied the same commands. Idempotence: a command at or
//! below the stored index is not applied again (a replay after a restart), and a command
//! whose id was applied before (a caller retrying after a timeout or a leader change)
//! answers its first outcome again, from `applied_commands`.

use crate::codec::{Expected, NewEvent};
use crate::error::Error;
use crate::writer::Appended;

/// Length of a command id: chosen by the caller (random), reused when it retries.
pub const COMMAND_ID_LEN: usize = 16;

/// How long an applied command's outcome is kept for retries, in µs of the commands'
/// own (leader-given) timestamps. A retry later than this is applied as a new command.
pub const DEDUPE_WINDOW_US: i64 = 10 * 60 * 1_000_000;

/// Table that cluster mode adds to a shard: the outcome of every command applied within
/// `DEDUPE_WINDOW_US`, by command id. Meta `applied_index` is the last Raft index applied.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS applied_commands (
  command_id BLOB PRIMARY KEY NOT NULL,
  raft_index INTEGER NOT NULL,
  ts         INTEGER NOT NULL,
  outcome    BLOB NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta(key, value) VALUES ('applied_index', 0);
";

/// A write to prepare (cluster mode, on the shard's leader).
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub command_id: [u8; COMMAND_ID_LEN],
    pub entity_id: Vec<u8>,
    pub expected: Expected,
    pub events: Vec<NewEvent>,
}

/// One event as the leader sealed it; replicas store it as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEvent {
    pub event_type: String,
    pub metadata: Vec<u8>,
    pub payload: Vec<u8>,
    pub scope: Option<String>,
}

/// An append prepared by a shard's leader: everything a replica needs to write it exactly
/// as every other replica does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedAppend {
    pub command_id: [u8; COMMAND_ID_LEN],
    pub entity_id: Vec<u8>,
    pub expected: Expected,
    /// The seq the first event was sealed for (its encryption is bound to it).
    pub first_seq: u64,
    /// The leader's clock; applied as `max(this, the entity's last timestamp)`.
    pub timestamp_us: i64,
    /// What `entities.id_sealed` holds if the entity is new.
    pub id_sealed: Vec<u8>,
    /// The entity's new data key, wrapped by the master key, while no replica had one.
    pub new_key: Option<Vec<u8>>,
    pub events: Vec<SealedEvent>,
}

/// A replicated erasure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedErase {
    pub command_id: [u8; COMMAND_ID_LEN],
    pub entity_id: Vec<u8>,
    pub timestamp_us: i64,
}

/// A command of a shard's Raft log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replicated {
    Append(PreparedAppend),
    Erase(PreparedErase),
}

impl Replicated {
    pub fn command_id(&self) -> &[u8; COMMAND_ID_LEN] {
        match self {
            Replicated::Append(a) => &a.command_id,
            Replicated::Erase(e) => &e.command_id,
        }
    }

    pub fn entity_id(&self) -> &[u8] {
        match self {
            Replicated::Append(a) => &a.entity_id,
            Replicated::Erase(e) => &e.entity_id,
        }
    }

    pub fn timestamp_us(&self) -> i64 {
        match self {
            Replicated::Append(a) => a.timestamp_us,
            Replicated::Erase(e) => e.timestamp_us,
        }
    }
}

/// What applying one replicated command gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Appended(Appended),
    /// An erasure: the number of events deleted.
    Erased(u64),
    /// Refused, the same way on every replica: `WrongExpectedSeq`, `Erased`, `KeyMissing`.
    Refused(Error),
    /// Not applied: prepared against a stale head or key (`Error::Conflict`); never stored,
    /// so the same command id prepared again is applied.
    Conflict {
        head_seq: u64,
    },
}

impl Outcome {
    /// The outcome as stored in `applied_commands` (`None` for a conflict, which is not).
    pub(crate) fn encode(&self) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(80);
        match self {
            Outcome::Appended(a) => {
                out.push(0);
                for n in [a.first_seq, a.last_seq, a.first_pos, a.last_pos] {
                    out.extend_from_slice(&n.to_be_bytes());
                }
                out.extend_from_slice(&a.timestamp_us.to_be_bytes());
                out.extend_from_slice(&a.last_hash);
            }
            Outcome::Erased(n) => {
                out.push(1);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Outcome::Refused(Error::WrongExpectedSeq { expected, actual }) => {
                out.push(2);
                out.extend_from_slice(&expected.to_be_bytes());
                out.extend_from_slice(&actual.to_be_bytes());
            }
            Outcome::Refused(Error::Erased) => out.push(3),
            Outcome::Refused(Error::KeyMissing) => out.push(4),
            Outcome::Refused(_) | Outcome::Conflict { .. } => return None,
        }
        Some(out)
    }

    /// Reads what `encode` stored (for shard `shard`).
    pub(crate) fn decode(shard: u32, bytes: &[u8]) -> Option<Outcome> {
        let u64_at = |i: usize| bytes.get(i..i + 8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])));
        match bytes.first()? {
            0 if bytes.len() == 1 + 40 + 32 => {
                let mut last_hash = [0u8; 32];
                last_hash.copy_from_slice(&bytes[41..73]);
                Some(Outcome::Appended(Appended {
                    shard,
                    first_seq: u64_at(1)?,
                    last_seq: u64_at(9)?,
                    first_pos: u64_at(17)?,
                    last_pos: u64_at(25)?,
                    timestamp_us: u64_at(33)? as i64,
                    last_hash,
                }))
            }
            1 => Some(Outcome::Erased(u64_at(1)?)),
            2 => Some(Outcome::Refused(Error::WrongExpectedSeq { expected: u64_at(1)?, actual: u64_at(9)? })),
            3 => Some(Outcome::Refused(Error::Erased)),
            4 => Some(Outcome::Refused(Error::KeyMissing)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_and_conflicts_are_not_stored() {
        let appended = Appended {
            shard: 3,
            first_seq: 4,
            last_seq: 9,
            first_pos: 100,
            last_pos: 105,
            timestamp_us: -7,
            last_hash: [9; 32],
        };
        for o in [
            Outcome::Appended(appended),
            Outcome::Erased(12),
            Outcome::Refused(Error::WrongExpectedSeq { expected: 2, actual: 5 }),
            Outcome::Refused(Error::Erased),
            Outcome::Refused(Error::KeyMissing),
        ] {
            let bytes = o.encode().unwrap();
            assert_eq!(Outcome::decode(3, &bytes), Some(o));
        }
        assert_eq!(Outcome::Conflict { head_seq: 1 }.encode(), None);
        assert_eq!(Outcome::decode(0, &[0, 1, 2]), None);
        assert_eq!(Outcome::decode(0, &[]), None);
    }
}
