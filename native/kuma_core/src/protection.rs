//! How a store protects what it writes: `Plain` (encryption switched off when the store was
//! created) or `Encrypted` with a keystore. Shared by the shard writers (which seal) and
//! the readers (which open).
//!
//! In encrypted stores an event's payload and metadata are sealed separately, each bound to
//! (entity id, seq); the chain hash covers the sealed bytes, so `verify` needs no key.
//! Empty metadata stays empty (there is nothing to hide, and it saves 40 bytes).

use crate::cipher::{self, Binding, Key};
use crate::codec::StoredEvent;
use crate::error::{Error, Result};
use crate::keystore::Keystore;
use std::collections::HashMap;

pub enum Protection {
    /// No encryption. Tombstones use a keyed hash whose key is stored in the manifest: it
    /// keeps ids out of the files, but anyone with the data dir can test a guessed id.
    Plain {
        tombstone_key: [u8; 32],
    },
    Encrypted(Box<Keystore>),
}

impl Protection {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Protection::Encrypted(_))
    }

    pub fn keystore(&self) -> Option<&Keystore> {
        match self {
            Protection::Encrypted(ks) => Some(ks),
            Protection::Plain { .. } => None,
        }
    }

    /// The keyed hash standing for an entity id in tombstones (and in the keystore).
    pub fn index(&self, entity_id: &[u8]) -> [u8; 32] {
        match self {
            Protection::Encrypted(ks) => ks.index(entity_id),
            Protection::Plain { tombstone_key } => *blake3::keyed_hash(tombstone_key, entity_id).as_bytes(),
        }
    }

    /// The entity's data key: `Ok(None)` in plain stores. In encrypted stores a missing key
    /// is `Erased` only if the keystore holds the entity's tombstone; otherwise it is
    /// `KeyMissing` (a keystore that lost keys), never mistaken for an erasure.
    pub fn data_key(&self, entity_id: &[u8]) -> Result<Option<Key>> {
        self.data_key_by_index(&self.index(entity_id))
    }

    /// `data_key` by keyed hash (what a shard stores instead of the id).
    pub fn data_key_by_index(&self, index: &[u8; 32]) -> Result<Option<Key>> {
        match self {
            Protection::Plain { .. } => Ok(None),
            Protection::Encrypted(ks) => match ks.get_by_index(index)? {
                Some(key) => Ok(Some(key)),
                None if ks.is_erased_index(index)? => Err(Error::Erased),
                None => Err(Error::KeyMissing),
            },
        }
    }

    /// Whether the keystore holds a tombstone for the entity (encrypted stores; plain
    /// stores have only the shards' tombstones).
    pub fn is_erased(&self, entity_id: &[u8]) -> Result<bool> {
        match self {
            Protection::Plain { .. } => Ok(false),
            Protection::Encrypted(ks) => ks.is_erased_index(&ks.index(entity_id)),
        }
    }

    /// What a shard stores of an entity's id: sealed under its data key (bound to its
    /// keyed hash) in encrypted stores, so that once the key is destroyed no copy of the id
    /// left anywhere in the file can be read; the id itself in plain stores.
    pub fn seal_id(&self, key: Option<&Key>, index: &[u8; 32], entity_id: &[u8]) -> Vec<u8> {
        match key {
            None => entity_id.to_vec(),
            Some(key) => cipher::seal(key, Binding::EntityId { index }, entity_id),
        }
    }

    /// Opens what `seal_id` stored.
    pub fn open_id(&self, key: Option<&Key>, index: &[u8; 32], stored: &[u8]) -> Result<Vec<u8>> {
        match key {
            None => Ok(stored.to_vec()),
            Some(key) => cipher::open(key, Binding::EntityId { index }, stored)
                .map_err(|why| Error::Corrupt { seq: 0, why: format!("entity id: {why}") }),
        }
    }

    /// Seals what is stored of one event: `(metadata, payload)`.
    pub fn seal_event(
        &self,
        key: Option<&Key>,
        entity_id: &[u8],
        seq: u64,
        metadata: &[u8],
        payload: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
        match key {
            None => (metadata.to_vec(), payload.to_vec()),
            Some(key) => {
                let meta = if metadata.is_empty() {
                    Vec::new()
                } else {
                    cipher::seal(key, Binding::Metadata { entity_id, seq }, metadata)
                };
                (meta, cipher::seal(key, Binding::Payload { entity_id, seq }, payload))
            }
        }
    }

    /// Opens what `seal_event` stored.
    pub fn open_event(
        &self,
        key: Option<&Key>,
        entity_id: &[u8],
        seq: u64,
        metadata: &[u8],
        payload: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        match key {
            None => Ok((metadata.to_vec(), payload.to_vec())),
            Some(key) => {
                let decrypt = |why: &str| Error::Decrypt { seq, why: why.to_string() };
                let meta = if metadata.is_empty() {
                    Vec::new()
                } else {
                    cipher::open(key, Binding::Metadata { entity_id, seq }, metadata).map_err(decrypt)?
                };
                let payload = cipher::open(key, Binding::Payload { entity_id, seq }, payload).map_err(decrypt)?;
                Ok((meta, payload))
            }
        }
    }

    /// Opens a stored event (metadata and payload) with its entity's key.
    pub fn open_stored(&self, key: Option<&Key>, mut ev: StoredEvent) -> Result<StoredEvent> {
        let (metadata, payload) = self.open_event(key, &ev.entity_id, ev.seq, &ev.metadata, &ev.payload)?;
        ev.metadata = metadata;
        ev.payload = payload;
        Ok(ev)
    }

    /// Opens stored events of any entities, looking each entity's key up once. Events of an
    /// entity whose key is gone (erased, seen in a copy of the files taken before the
    /// erasure) are left out.
    pub fn open_events(&self, raw: Vec<StoredEvent>) -> Result<Vec<StoredEvent>> {
        let mut keys: HashMap<Vec<u8>, Option<Key>> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for ev in raw {
            let key = match keys.get(&ev.entity_id) {
                Some(k) => k.clone(),
                None => {
                    let k = match self.data_key(&ev.entity_id) {
                        Ok(k) => k,
                        Err(Error::Erased) => None,
                        Err(e) => return Err(e),
                    };
                    keys.insert(ev.entity_id.clone(), k.clone());
                    k
                }
            };
            if key.is_none() && self.is_encrypted() {
                continue;
            }
            out.push(self.open_stored(key.as_ref(), ev)?);
        }
        Ok(out)
    }

    pub fn seal_snapshot(&self, key: Option<&Key>, entity_id: &[u8], seq: u64, data: &[u8]) -> Vec<u8> {
        match key {
            None => data.to_vec(),
            Some(key) => cipher::seal(key, Binding::Snapshot { entity_id, seq }, data),
        }
    }

    pub fn open_snapshot(&self, key: Option<&Key>, entity_id: &[u8], seq: u64, data: &[u8]) -> Result<Vec<u8>> {
        match key {
            None => Ok(data.to_vec()),
            Some(key) => cipher::open(key, Binding::Snapshot { entity_id, seq }, data)
                .map_err(|why| Error::Decrypt { seq, why: format!("snapshot: {why}") }),
        }
    }
}
