//! Fault injection, in test builds only (feature `fault-injection`): entity ids and event
//! types that make the core fail at a chosen point, so tests can check what a failure
//! there leaves behind. Release builds of Kuma do not contain this module.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::sync::Mutex;

/// An event of this type makes the shard writer panic mid-transaction.
pub const PANIC_EVENT_TYPE: &str = "__kuma_fault_panic__";
/// Erasing an id with this prefix makes its transaction fail at COMMIT (as a full disk does).
pub const FAIL_COMMIT_PREFIX: &[u8] = b"__kuma_fault_commit__";
/// Erasing an id with this prefix fails to destroy its key the first time (as a full disk
/// under the keystore does), after the erasure committed.
pub const FAIL_DESTROY_ONCE_PREFIX: &[u8] = b"__kuma_fault_destroy__";

/// `Err` at COMMIT of a transaction that erased one of `erased`.
pub(crate) fn commit<'a>(mut erased: impl Iterator<Item = &'a [u8]>) -> Result<()> {
    if erased.any(|id| id.starts_with(FAIL_COMMIT_PREFIX)) {
        return Err(Error::Storage { context: "commit", message: "fault injection: database or disk is full".into() });
    }
    Ok(())
}

/// `Err` the first time the key of such an id is destroyed.
pub(crate) fn destroy_key(entity_id: &[u8]) -> Result<()> {
    static FAILED: Mutex<Option<HashSet<Vec<u8>>>> = Mutex::new(None);
    if entity_id.starts_with(FAIL_DESTROY_ONCE_PREFIX) {
        let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
        if failed.get_or_insert_with(HashSet::new).insert(entity_id.to_vec()) {
            return Err(Error::Storage {
                context: "destroy data key",
                message: "fault injection: database or disk is full".into(),
            });
        }
    }
    Ok(())
}

/// While set, deleting erased events fails (as on a full disk): they stay in `purges`
/// until it is cleared and the writer is next idle or the store next opens. Process-wide:
/// only for a test binary of its own.
pub static HOLD_PURGES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `Err` while `HOLD_PURGES` is set.
pub(crate) fn purge() -> Result<()> {
    if HOLD_PURGES.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::Storage { context: "purge erased events", message: "fault injection: held".into() });
    }
    Ok(())
}
