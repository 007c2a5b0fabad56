//! Events as the core sees them, their size limits, and the canonical envelope the hash
//! chain covers.
//!
//! The core stores opaque bytes: the Elixir side encodes terms (see `Kuma.Codec`). The
//! canonical envelope is a fixed binary layout so the chain can be recomputed by any
//! implementation (documented in docs/storage-format.md):
//!
//! ```text
//! envelope = "KUMAEV1\0"
//!            u32be len(entity_id) || entity_id
//!            u64be seq
//!            i64be timestamp_us
//!            u32be len(type)      || type
//!            u32be len(metadata)  || metadata
//!            u32be len(payload)
//! ```
//! Length prefixes make the concatenation unambiguous; the position is deliberately not
//! covered (it is a storage location that may change when data is moved).

use crate::error::{Error, Result};

/// Largest entity id, in bytes.
pub const MAX_ENTITY_ID_BYTES: usize = 512;
/// Largest event type, in bytes (UTF-8).
pub const MAX_TYPE_BYTES: usize = 255;
/// Largest scope of an event, in bytes (UTF-8).
pub const MAX_SCOPE_BYTES: usize = 255;
/// Largest metadata blob of one event.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Largest payload of one event.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;
/// Most events in one append (one entity).
pub const MAX_EVENTS_PER_APPEND: usize = 100_000;
/// Most bytes (payload + metadata + type) in one append request.
pub const MAX_APPEND_BYTES: usize = 64 * 1024 * 1024;

/// An event to be appended: type, metadata and payload, all already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub metadata: Vec<u8>,
    pub payload: Vec<u8>,
    /// Where the event belongs for queries across entities ("org:acme/team:7"); stored in
    /// clear in its own indexed column (the metadata, which is sealed and hashed, holds the
    /// authoritative copy).
    pub scope: Option<String>,
}

impl NewEvent {
    pub fn new(event_type: impl Into<String>, metadata: Vec<u8>, payload: Vec<u8>) -> Self {
        NewEvent { event_type: event_type.into(), metadata, payload, scope: None }
    }

    /// The same event with a scope.
    pub fn with_scope(self, scope: impl Into<String>) -> Self {
        NewEvent { scope: Some(scope.into()), ..self }
    }

    fn byte_size(&self) -> usize {
        self.event_type.len() + self.metadata.len() + self.payload.len() + self.scope.as_ref().map_or(0, |s| s.len())
    }
}

/// An event as stored, with everything a reader needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The shard that stores the entity.
    pub shard: u32,
    pub entity_id: Vec<u8>,
    pub seq: u64,
    pub position: u64,
    pub timestamp_us: i64,
    pub event_type: String,
    pub metadata: Vec<u8>,
    pub payload: Vec<u8>,
    pub hash: [u8; 32],
}

/// What the caller expects the entity's current last sequence to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No check.
    Any,
    /// The entity's last seq must be exactly this (0 = the entity has no events yet).
    Seq(u64),
}

/// Checks an entity id against the documented rules.
pub fn validate_entity_id(id: &[u8]) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid("entity_id", "must not be empty"));
    }
    if id.len() > MAX_ENTITY_ID_BYTES {
        return Err(Error::TooLarge { what: "entity_id", size: id.len() as u64, max: MAX_ENTITY_ID_BYTES as u64 });
    }
    Ok(())
}

/// Checks one append (one entity's events) against the limits; returns its byte size.
pub fn validate_append(id: &[u8], events: &[NewEvent]) -> Result<usize> {
    validate_entity_id(id)?;
    if events.is_empty() {
        return Err(Error::invalid("events", "must not be empty"));
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(Error::TooLarge { what: "events", size: events.len() as u64, max: MAX_EVENTS_PER_APPEND as u64 });
    }
    let mut total = 0usize;
    for ev in events {
        if ev.event_type.len() > MAX_TYPE_BYTES {
            return Err(Error::TooLarge {
                what: "event_type",
                size: ev.event_type.len() as u64,
                max: MAX_TYPE_BYTES as u64,
            });
        }
        if let Some(scope) = &ev.scope {
            if scope.is_empty() {
                return Err(Error::invalid("scope", "must not be empty"));
            }
            if scope.len() > MAX_SCOPE_BYTES {
                return Err(Error::TooLarge { what: "scope", size: scope.len() as u64, max: MAX_SCOPE_BYTES as u64 });
            }
        }
        if ev.metadata.len() > MAX_METADATA_BYTES {
            return Err(Error::TooLarge {
                what: "metadata",
                size: ev.metadata.len() as u64,
                max: MAX_METADATA_BYTES as u64,
            });
        }
        if ev.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::TooLarge {
                what: "payload",
                size: ev.payload.len() as u64,
                max: MAX_PAYLOAD_BYTES as u64,
            });
        }
        total += ev.byte_size();
    }
    if total > MAX_APPEND_BYTES {
        return Err(Error::TooLarge { what: "append", size: total as u64, max: MAX_APPEND_BYTES as u64 });
    }
    Ok(total)
}

const ENVELOPE_MAGIC: &[u8; 8] = b"KUMAEV1\0";

/// Writes the canonical envelope of an event (everything but the payload bytes and the
/// previous hash) into `out`.
pub fn write_envelope(
    out: &mut Vec<u8>,
    entity_id: &[u8],
    seq: u64,
    timestamp_us: i64,
    event_type: &str,
    metadata: &[u8],
    payload_len: usize,
) {
    out.clear();
    out.extend_from_slice(ENVELOPE_MAGIC);
    out.extend_from_slice(&(entity_id.len() as u32).to_be_bytes());
    out.extend_from_slice(entity_id);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&timestamp_us.to_be_bytes());
    out.extend_from_slice(&(event_type.len() as u32).to_be_bytes());
    out.extend_from_slice(event_type.as_bytes());
    out.extend_from_slice(&(metadata.len() as u32).to_be_bytes());
    out.extend_from_slice(metadata);
    out.extend_from_slice(&(payload_len as u32).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_layout_is_exact() {
        let mut out = Vec::new();
        write_envelope(&mut out, b"ab", 3, -1, "T", b"", 5);
        let mut want = b"KUMAEV1\0".to_vec();
        want.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        want.extend_from_slice(&[0xff; 8]);
        want.extend_from_slice(&[0, 0, 0, 1, b'T']);
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 5]);
        assert_eq!(out, want);
    }

    #[test]
    fn limits_are_enforced() {
        let ev = |p: usize| NewEvent::new("T", vec![], vec![0; p]);
        assert!(validate_append(b"a", &[ev(10)]).is_ok());
        assert!(matches!(validate_append(b"", &[ev(1)]), Err(Error::Invalid { what: "entity_id", .. })));
        assert!(matches!(validate_append(b"a", &[]), Err(Error::Invalid { what: "events", .. })));
        assert!(matches!(
            validate_append(&[1; MAX_ENTITY_ID_BYTES + 1], &[ev(1)]),
            Err(Error::TooLarge { what: "entity_id", .. })
        ));
        assert!(matches!(
            validate_append(b"a", &[ev(MAX_PAYLOAD_BYTES + 1)]),
            Err(Error::TooLarge { what: "payload", .. })
        ));
        let long_type = NewEvent::new("x".repeat(MAX_TYPE_BYTES + 1), vec![], vec![]);
        assert!(matches!(validate_append(b"a", &[long_type]), Err(Error::TooLarge { what: "event_type", .. })));
        let scoped = |s: &str| NewEvent::new("T", vec![], vec![]).with_scope(s);
        assert!(validate_append(b"a", &[scoped("org:acme")]).is_ok());
        assert!(matches!(validate_append(b"a", &[scoped("")]), Err(Error::Invalid { what: "scope", .. })));
        assert!(matches!(
            validate_append(b"a", &[scoped(&"s".repeat(MAX_SCOPE_BYTES + 1))]),
            Err(Error::TooLarge { what: "scope", .. })
        ));
        let big: Vec<NewEvent> = (0..9).map(|_| ev(MAX_PAYLOAD_BYTES)).collect();
        assert!(matches!(validate_append(b"a", &big), Err(Error::TooLarge { what: "append", .. })));
    }
}
