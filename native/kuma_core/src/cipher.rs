//! Authenticated encryption of payloads, metadata, snapshots and sensitive values:
//! XChaCha20-Poly1305 with a fresh 24-byte nonce per message and associated data that
//! binds the ciphertext to where it belongs (entity id and seq), so a ciphertext copied to
//! another entity or position fails to decrypt instead of decrypting to the wrong record.
//!
//! Sealed format: `nonce (24) || ciphertext || tag (16)`: 40 bytes of overhead.
//!
//! Nonces: `BLAKE3.keyed_hash(seed, counter)[..24]`, with a random 32-byte seed per process
//! and a 64-bit counter. They are unpredictable and never repeat within a process; across
//! processes a repeat needs a 192-bit collision. This avoids a system call per message.

use crate::error::{Error, Result};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed message adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// A 32-byte secret key, zeroed when dropped.
#[derive(Clone)]
pub struct Key(Zeroizing<[u8; KEY_LEN]>);

impl Key {
    pub fn from_bytes(bytes: &[u8]) -> Result<Key> {
        let array: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| Error::invalid("key", format!("must be {KEY_LEN} bytes, got {}", bytes.len())))?;
        Ok(Key(Zeroizing::new(array)))
    }

    /// A new random key from the operating system's generator.
    pub fn random() -> Result<Key> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(bytes.as_mut())
            .map_err(|e| Error::Storage { context: "generate key", message: e.to_string() })?;
        Ok(Key(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

struct NonceSource {
    seed: [u8; 32],
    counter: AtomicU64,
}

fn nonces() -> &'static NonceSource {
    static SOURCE: OnceLock<NonceSource> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let mut seed = [0u8; 32];
        // If the OS generator fails, fall back to a hash of time and address-space layout
        // (still unique per process thanks to the counter).
        if getrandom::fill(&mut seed).is_err() {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let mut h = blake3::Hasher::new();
            h.update(&t.as_nanos().to_le_bytes());
            h.update(&(&seed as *const _ as usize).to_le_bytes());
            seed = *h.finalize().as_bytes();
        }
        NonceSource { seed, counter: AtomicU64::new(0) }
    })
}

fn next_nonce() -> [u8; NONCE_LEN] {
    let source = nonces();
    let n = source.counter.fetch_add(1, Ordering::Relaxed);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&blake3::keyed_hash(&source.seed, &n.to_le_bytes()).as_bytes()[..NONCE_LEN]);
    nonce
}

/// What a sealed message is bound to; each kind has its own domain tag so a ciphertext of
/// one kind can never be accepted as another.
#[derive(Debug, Clone, Copy)]
pub enum Binding<'a> {
    /// An event's payload.
    Payload { entity_id: &'a [u8], seq: u64 },
    /// An event's metadata.
    Metadata { entity_id: &'a [u8], seq: u64 },
    /// An entity's snapshot at `seq`.
    Snapshot { entity_id: &'a [u8], seq: u64 },
    /// A value sealed under a subject's key, wherever it is stored.
    Sensitive { subject_id: &'a [u8] },
    /// An entity's id, stored sealed in its shard (`index` = keyed hash of the id).
    EntityId { index: &'a [u8; 32] },
    /// An entity's data key, wrapped by the master key (`index` = keyed hash of the id).
    DataKey { index: &'a [u8; 32] },
    /// The keystore's index key, wrapped by the master key.
    IndexKey,
    /// A pre-created data key not yet given to an entity (keystore pool `slot`), wrapped
    /// by the master key.
    PoolKey { slot: u64 },
}

impl Binding<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let with_id = |tag: &[u8], id: &[u8], seq: Option<u64>| {
            let mut ad = Vec::with_capacity(tag.len() + 4 + id.len() + 8);
            ad.extend_from_slice(tag);
            ad.extend_from_slice(&(id.len() as u32).to_be_bytes());
            ad.extend_from_slice(id);
            if let Some(seq) = seq {
                ad.extend_from_slice(&seq.to_be_bytes());
            }
            ad
        };
        match *self {
            Binding::Payload { entity_id, seq } => with_id(b"kuma-payload-v1", entity_id, Some(seq)),
            Binding::Metadata { entity_id, seq } => with_id(b"kuma-metadata-v1", entity_id, Some(seq)),
            Binding::Snapshot { entity_id, seq } => with_id(b"kuma-snapshot-v1", entity_id, Some(seq)),
            Binding::Sensitive { subject_id } => with_id(b"kuma-sensitive-v1", subject_id, None),
            Binding::EntityId { index } => with_id(b"kuma-entity-id-v1", index, None),
            Binding::DataKey { index } => with_id(b"kuma-data-key-v1", index, None),
            Binding::IndexKey => b"kuma-index-key-v1".to_vec(),
            Binding::PoolKey { slot } => with_id(b"kuma-pool-key-v1", &slot.to_be_bytes(), None),
        }
    }
}

/// Encrypts `plaintext` under `key`, bound to `binding`.
pub fn seal(key: &Key, binding: Binding, plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    let nonce = next_nonce();
    let ad = binding.associated_data();
    // Encryption fails only for messages beyond 256 GiB, far above every Kuma limit.
    let ciphertext = cipher
        .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: &ad })
        .expect("XChaCha20-Poly1305 encryption of a bounded message");
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

/// Decrypts a sealed message; fails if it was altered, sealed under another key, or
/// bound to something else.
pub fn open(key: &Key, binding: Binding, sealed: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    if sealed.len() < OVERHEAD {
        return Err("ciphertext too short");
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| "bad nonce")?;
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    let ad = binding.associated_data();
    cipher
        .decrypt(&XNonce::from(nonce), Payload { msg: ciphertext, aad: &ad })
        .map_err(|_| "authentication failed (wrong key, altered bytes, or a ciphertext moved from elsewhere)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let k = Key::random().unwrap();
        let b = Binding::Payload { entity_id: b"alice", seq: 3 };
        let sealed = seal(&k, b, b"hello");
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(open(&k, b, &sealed).unwrap(), b"hello");
        // Another entity, another seq, another kind, another key: all refused.
        assert!(open(&k, Binding::Payload { entity_id: b"bob", seq: 3 }, &sealed).is_err());
        assert!(open(&k, Binding::Payload { entity_id: b"alice", seq: 4 }, &sealed).is_err());
        assert!(open(&k, Binding::Metadata { entity_id: b"alice", seq: 3 }, &sealed).is_err());
        assert!(open(&Key::random().unwrap(), b, &sealed).is_err());
        // Any flipped bit is caught.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&k, b, &bad).is_err(), "bit flip at {i} accepted");
        }
        assert!(open(&k, b, &sealed[..10]).is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        let k = Key::random().unwrap();
        let b = Binding::Sensitive { subject_id: b"s" };
        let a = seal(&k, b, b"same");
        let c = seal(&k, b, b"same");
        assert_ne!(a[..NONCE_LEN], c[..NONCE_LEN]);
        assert_ne!(a, c);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(next_nonce()));
        }
    }

    #[test]
    fn key_debug_redacts() {
        assert_eq!(format!("{:?}", Key::random().unwrap()), "Key(<redacted>)");
        assert!(Key::from_bytes(&[0; 31]).is_err());
    }
}
