//! Encryption, erasure, crypto-shredding and key rotation, through the public API.

mod common;

use common::crash_copy_all;
use kuma_core::*;
use rusqlite::Connection;
use std::path::Path;

fn master() -> Key {
    Key::from_bytes(&[7u8; 32]).unwrap()
}

fn config(dir: &Path, key: Option<Key>) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.shards = 2;
    c.master_key = key;
    c
}

fn ev(marker: &str) -> NewEvent {
    NewEvent::new("Noted", format!("meta-{marker}").into_bytes(), format!("payload-{marker}").into_bytes())
}

/// Every regular file under `dir`, recursively, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

fn occurrences(dir: &Path, needle: &[u8]) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p)
        .collect()
}

#[test]
fn encrypted_round_trip_leaves_no_plaintext_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    assert!(store.is_encrypted());
    let a = store.append_wait(b"alice", Expected::Any, vec![ev("SECRET-1"), ev("SECRET-2")]).unwrap();
    let events = store.read_entity(b"alice", 1, 10).unwrap();
    assert_eq!(events[0].payload, b"payload-SECRET-1");
    assert_eq!(events[1].metadata, b"meta-SECRET-2");
    let sealed = store.read_entity_sealed(b"alice", 1, 10).unwrap();
    assert_eq!(sealed[0].payload.len(), b"payload-SECRET-1".len() + cipher::OVERHEAD);
    assert_eq!(sealed[1].hash, a.last_hash);
    // The chain covers the ciphertext: verifiable without any key.
    assert!(matches!(store.verify_entity(b"alice").unwrap(), EntityVerdict::Intact { events: 2, .. }));
    store.close().unwrap();
    drop(store);
    assert_eq!(occurrences(dir.path(), b"SECRET"), Vec::<String>::new());
    assert!(!occurrences(dir.path(), b"alice").iter().any(|p| p.ends_with("keystore.kuma")));
}

#[test]
fn a_ciphertext_moved_elsewhere_does_not_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(config(dir.path(), Some(master()))).unwrap();
        store.append_wait(b"x", Expected::Any, vec![ev("a"), ev("b")]).unwrap();
        store.close().unwrap();
    }
    let shard = Store::open(config(dir.path(), Some(master()))).unwrap().shard_for(b"x");
    let c = Connection::open(dir.path().join(format!("shards/{shard:03}.kuma"))).unwrap();
    // Copy event 1's sealed payload over event 2 (same entity, other seq).
    c.execute("UPDATE events SET payload = (SELECT payload FROM events WHERE seq = 1) WHERE seq = 2", []).unwrap();
    drop(c);
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    // The chain notices first, on read as on verify.
    assert!(matches!(store.read_entity(b"x", 2, 1), Err(Error::Corrupt { seq: 2, .. })));
    assert!(matches!(store.verify_entity(b"x").unwrap(), EntityVerdict::Broken { seq: 2, .. }));
    store.close().unwrap();
    drop(store);
    // A forger who rewrites the chain (hash and head) to match passes a keyless verify; the
    // cipher, which binds each ciphertext to its entity and seq, still refuses it.
    let c = Connection::open(dir.path().join(format!("shards/{shard:03}.kuma"))).unwrap();
    let (prev, ts, ty, meta, payload): (Vec<u8>, i64, String, Vec<u8>, Vec<u8>) = c
        .query_row(
            "SELECT (SELECT hash FROM events WHERE seq = 1), ts, type, meta, payload FROM events WHERE seq = 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    let forged = kuma_core::chain::Chainer::new().link(&prev.try_into().unwrap(), b"x", 2, ts, &ty, &meta, &payload);
    c.execute("UPDATE events SET hash = ?1 WHERE seq = 2", [&forged[..]]).unwrap();
    c.execute("UPDATE entities SET head_hash = ?1", [&forged[..]]).unwrap();
    drop(c);
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    assert!(matches!(store.verify_entity(b"x").unwrap(), EntityVerdict::Intact { events: 2, .. }));
    assert!(matches!(store.read_entity(b"x", 2, 1), Err(Error::Decrypt { seq: 2, .. })));
    assert_eq!(store.read_entity(b"x", 1, 1).unwrap()[0].payload, b"payload-a");
}

#[test]
fn wrong_master_key_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(config(dir.path(), Some(master()))).unwrap();
        store.append_wait(b"x", Expected::Any, vec![ev("a")]).unwrap();
        store.close().unwrap();
    }
    let before = files(dir.path());
    let wrong = Key::from_bytes(&[8u8; 32]).unwrap();
    assert!(matches!(Store::open(config(dir.path(), Some(wrong))), Err(Error::WrongMasterKey)));
    let after: Vec<_> = files(dir.path()).into_iter().filter(|(p, _)| !p.ends_with(".lock")).collect();
    let before: Vec<_> = before.into_iter().filter(|(p, _)| !p.ends_with(".lock")).collect();
    assert_eq!(before, after, "a failed open must not touch any file");
    assert!(matches!(Store::open(config(dir.path(), None)), Err(Error::EncryptionMismatch { stored: true })));
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    assert_eq!(store.read_entity(b"x", 1, 1).unwrap()[0].payload, b"payload-a");
}

#[test]
fn a_plain_store_stays_plain() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(config(dir.path(), None)).unwrap());
    assert!(matches!(
        Store::open(config(dir.path(), Some(master()))),
        Err(Error::EncryptionMismatch { stored: false })
    ));
    let store = Store::open(config(dir.path(), None)).unwrap();
    assert!(!store.is_encrypted());
    assert!(matches!(store.seal_sensitive(b"s", b"v"), Err(Error::Invalid { .. })));
}

fn erasure_case(encrypted: bool) {
    let dir = tempfile::tempdir().unwrap();
    let backup = tempfile::tempdir().unwrap();
    let key = encrypted.then(master);
    let store = Store::open(config(dir.path(), key.clone())).unwrap();
    // Victim and bystander share a shard: find a bystander id placed with "victim-7".
    let shard = store.shard_for(b"victim-7");
    let bystander = (0..).map(|i| format!("bystander-{i}")).find(|b| store.shard_for(b.as_bytes()) == shard).unwrap();
    for i in 0..50 {
        store.append_wait(b"victim-7", Expected::Any, vec![ev(&format!("MARKER-{i}"))]).unwrap();
        store.append_wait(bystander.as_bytes(), Expected::Any, vec![ev(&format!("keep-{i}"))]).unwrap();
    }
    store.flush().unwrap();
    let stored: Vec<Vec<u8>> =
        store.read_entity_sealed(b"victim-7", 1, 100).unwrap().into_iter().map(|e| e.payload).collect();

    // The "backup": a copy of the shards taken before the erasure (the keystore is not copied).
    std::fs::create_dir_all(backup.path().join("shards")).unwrap();
    for f in std::fs::read_dir(dir.path().join("shards")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), backup.path().join("shards").join(f.file_name())).unwrap();
    }
    std::fs::copy(dir.path().join("KUMA"), backup.path().join("KUMA")).unwrap();

    assert_eq!(store.delete_wait(b"victim-7").unwrap(), 50);
    assert!(matches!(store.append_wait(b"victim-7", Expected::Any, vec![ev("again")]), Err(Error::Erased)));
    // The refused append must not have created a new key for the erased id: unsealing
    // answers Erased only when the keystore has no key (with a key it would fail to decrypt).
    if encrypted {
        let r = store.unseal_sensitive(b"victim-7", &[0u8; 64]);
        assert!(matches!(r, Err(Error::Erased)), "{r:?}");
    }
    assert!(matches!(store.read_entity(b"victim-7", 1, 10), Err(Error::Erased)));
    assert!(matches!(store.head(b"victim-7"), Err(Error::Erased)));
    assert_eq!(store.read_entity(bystander.as_bytes(), 1, 100).unwrap().len(), 50);
    assert!(store.verify_shard(shard, 10).unwrap().problems.is_empty());
    store.close().unwrap();
    drop(store);

    // Nothing of the victim remains in any file: not its plaintext, not its ciphertexts,
    // not its id.
    assert_eq!(occurrences(dir.path(), b"MARKER"), Vec::<String>::new());
    for c in &stored {
        assert_eq!(occurrences(dir.path(), &c[..32.min(c.len())]), Vec::<String>::new());
    }
    assert_eq!(occurrences(dir.path(), b"victim-7"), Vec::<String>::new());
    // The scan does find what is there: the bystander's events (sealed or not) and, in a
    // plain store only, its id (an encrypted store keeps ids sealed too).
    let kept = store_bytes_of(dir.path(), bystander.as_bytes(), encrypted);
    assert!(!kept.is_empty());

    if encrypted {
        // The backup still holds the victim's ciphertext, but no key exists to read it.
        let mut cfg = config(backup.path(), key);
        cfg.keystore_path = Some(dir.path().join("keystore.kuma"));
        let copy = Store::open(cfg).unwrap();
        let r = copy.read_entity(b"victim-7", 1, 10).map(|v| v.len());
        assert!(matches!(r, Err(Error::Erased)), "{r:?}");
        assert_eq!(copy.read_entity(bystander.as_bytes(), 1, 100).unwrap().len(), 50);
        let everything = copy.read_shard(shard, 0, 1000).unwrap();
        assert!(everything.iter().all(|e| e.entity_id != b"victim-7"));
        assert_eq!(everything.len(), 50);
    }
}

/// Where a bystander's own bytes are found: its id in a plain store, else nowhere in clear
/// (checked) and its events' payloads in the sealed form (found through a fresh open).
fn store_bytes_of(dir: &Path, id: &[u8], encrypted: bool) -> Vec<String> {
    if !encrypted {
        return occurrences(dir, id);
    }
    assert_eq!(occurrences(dir, id), Vec::<String>::new(), "an encrypted store keeps no id in clear");
    let store = Store::open(config(dir, Some(master()))).unwrap();
    let sealed = store.read_entity_sealed(id, 1, 1).unwrap();
    store.close().unwrap();
    occurrences(dir, &sealed[0].payload[..32])
}

#[test]
fn erasure_leaves_nothing_behind_encrypted() {
    erasure_case(true);
}

#[test]
fn erasure_leaves_nothing_behind_plain() {
    erasure_case(false);
}

#[test]
fn an_interrupted_erasure_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    store.append_wait(b"gone", Expected::Any, vec![ev("x")]).unwrap();
    store.close().unwrap();
    drop(store);
    let keystore_before = std::fs::read(dir.path().join("keystore.kuma")).unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    let shard = store.shard_for(b"gone");
    store.delete_wait(b"gone").unwrap();
    store.close().unwrap();
    drop(store);
    // Simulate a crash after the shard commit but before the key was destroyed: the old
    // keystore (still holding the key) and a tombstone not yet marked.
    std::fs::write(dir.path().join("keystore.kuma"), keystore_before).unwrap();
    Connection::open(dir.path().join(format!("shards/{shard:03}.kuma")))
        .unwrap()
        .execute("UPDATE tombstones SET key_destroyed = 0", [])
        .unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    assert!(matches!(
        store.unseal_sensitive(b"gone", b"0123456789012345678901234567890123456789x"),
        Err(Error::Erased)
    ));
}

#[test]
fn rotation_keeps_every_entity_readable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    for i in 0..100 {
        store.append_wait(format!("e{i}").as_bytes(), Expected::Any, vec![ev(&i.to_string())]).unwrap();
    }
    let new = Key::from_bytes(&[9u8; 32]).unwrap();
    assert_eq!(store.rotate_master_key(new.clone()).unwrap(), 100);
    // New entities after the rotation get keys wrapped by the new master key.
    store.append_wait(b"after", Expected::Any, vec![ev("z")]).unwrap();
    store.close().unwrap();
    drop(store);
    assert!(matches!(Store::open(config(dir.path(), Some(master()))), Err(Error::WrongMasterKey)));
    let store = Store::open(config(dir.path(), Some(new))).unwrap();
    for i in 0..100 {
        assert_eq!(
            store.read_entity(format!("e{i}").as_bytes(), 1, 1).unwrap()[0].payload,
            format!("payload-{i}").into_bytes()
        );
    }
    assert_eq!(store.read_entity(b"after", 1, 1).unwrap()[0].payload, b"payload-z");
}

#[test]
fn sensitive_values_die_with_their_subject() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    let sealed = store.seal_sensitive(b"subject:alice", b"alice@example.com").unwrap();
    assert_eq!(store.unseal_sensitive(b"subject:alice", &sealed).unwrap(), b"alice@example.com");
    assert!(store.unseal_sensitive(b"subject:bob", &sealed).is_err());
    // Alice never wrote an event of her own: erasing her still destroys her key.
    assert_eq!(store.delete_wait(b"subject:alice").unwrap(), 0);
    assert!(matches!(store.unseal_sensitive(b"subject:alice", &sealed), Err(Error::Erased)));
    assert!(matches!(store.seal_sensitive(b"subject:alice", b"again"), Err(Error::Erased)));
}

#[test]
fn snapshots_are_encrypted_and_erased() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    let a = store.append_wait(b"s", Expected::Any, vec![ev("1")]).unwrap();
    let snap = SnapshotRequest {
        entity_id: b"s".to_vec(),
        seq: 1,
        version: 1,
        hash: a.last_hash,
        data: b"STATE-TEXT".to_vec(),
    };
    store.save_snapshot_wait(snap).unwrap();
    assert_eq!(store.latest_snapshot(b"s", 1, 10).unwrap().unwrap().data, b"STATE-TEXT");
    assert_eq!(store.snapshots(b"s").unwrap().len(), 1);
    store.flush().unwrap();
    store.close().unwrap();
    drop(store);
    assert_eq!(occurrences(dir.path(), b"STATE-TEXT"), Vec::<String>::new());
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    store.delete_wait(b"s").unwrap();
    assert!(matches!(store.snapshots(b"s"), Err(Error::Erased)) || store.snapshots(b"s").unwrap().is_empty());
}

/// How many data keys a keystore file holds.
fn keys_in(keystore: &Path) -> i64 {
    let c = Connection::open(keystore).unwrap();
    c.query_row("SELECT count(*) FROM keys", [], |r| r.get(0)).unwrap()
}

#[test]
fn a_key_missing_without_an_erasure_is_an_error_and_no_new_key_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore.kuma");
    {
        let store = Store::open(config(dir.path(), Some(master()))).unwrap();
        store.append_wait(b"alice", Expected::Any, vec![ev("a1")]).unwrap();
        store.close().unwrap();
    }
    // A keystore "backup" from before bob existed.
    std::fs::copy(&keystore, old.path().join("keystore.kuma")).unwrap();
    {
        let store = Store::open(config(dir.path(), Some(master()))).unwrap();
        store.append_wait(b"bob", Expected::Any, vec![ev("b1")]).unwrap();
        store.close().unwrap();
    }
    // The older keystore is put back: bob's events are there, his key is not.
    std::fs::copy(old.path().join("keystore.kuma"), &keystore).unwrap();
    let keys_before = keys_in(&keystore);
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    assert!(matches!(store.read_entity(b"bob", 1, 10), Err(Error::KeyMissing)));
    assert!(matches!(store.append_wait(b"bob", Expected::Any, vec![ev("b2")]), Err(Error::KeyMissing)));
    assert!(matches!(store.seal_sensitive(b"bob", b"x"), Err(Error::KeyMissing)));
    assert!(!store.is_erased(b"bob").unwrap(), "a missing key is not an erasure");
    assert_eq!(store.read_entity(b"alice", 1, 10).unwrap().len(), 1);
    store.append_wait(b"carol", Expected::Any, vec![ev("c1")]).unwrap();
    store.close().unwrap();
    assert_eq!(keys_in(&keystore), keys_before + 1, "only carol got a key; bob did not get a new one");
}

#[test]
fn shards_restored_from_before_an_erasure_cannot_bring_the_id_back() {
    let dir = tempfile::tempdir().unwrap();
    let backup = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore.kuma");
    {
        let store = Store::open(config(dir.path(), Some(master()))).unwrap();
        store.append_wait(b"alice", Expected::Any, vec![ev("a1"), ev("a2")]).unwrap();
        store.append_wait(b"bob", Expected::Any, vec![ev("b1")]).unwrap();
        store.close().unwrap();
    }
    // The shards are backed up; then alice is erased.
    std::fs::create_dir_all(backup.path().join("shards")).unwrap();
    for f in std::fs::read_dir(dir.path().join("shards")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), backup.path().join("shards").join(f.file_name())).unwrap();
    }
    std::fs::copy(dir.path().join("KUMA"), backup.path().join("KUMA")).unwrap();
    {
        let store = Store::open(config(dir.path(), Some(master()))).unwrap();
        assert_eq!(store.delete_wait(b"alice").unwrap(), 2);
        store.close().unwrap();
    }
    let keys_after_erasure = keys_in(&keystore);
    // The old shards with the live keystore: alice's rows are there, her tombstone is not.
    let mut cfg = config(backup.path(), Some(master()));
    cfg.keystore_path = Some(keystore.clone());
    let store = Store::open(cfg).unwrap();
    assert!(store.is_erased(b"alice").unwrap(), "the keystore remembers the erasure");
    assert!(matches!(store.read_entity(b"alice", 1, 10), Err(Error::Erased)));
    assert!(matches!(store.append_wait(b"alice", Expected::Any, vec![ev("again")]), Err(Error::Erased)));
    assert!(matches!(store.seal_sensitive(b"alice", b"x"), Err(Error::Erased)));
    assert_eq!(store.read_entity(b"bob", 1, 10).unwrap().len(), 1);
    assert!(store.read_shard(store.shard_for(b"alice"), 0, 100).unwrap().iter().all(|e| e.entity_id != b"alice"));
    store.close().unwrap();
    assert_eq!(keys_in(&keystore), keys_after_erasure, "no key was made again for alice");
}

/// 20,000 entities, 2,000 of them erased, then every file scanned for each erased id and
/// payload. SQLite moves cells between pages as b-trees grow and leaves stale copies in free
/// space that secure_delete never sees: at this scale format-2 files kept an erased id in a
/// leaf of the entities' unique index (which now holds keyed hashes only).
fn scale_case(encrypted: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), encrypted.then(master))).unwrap();
    let ids: Vec<String> = (0..20_000).map(|i| format!("scale-entity-{i:06}")).collect();
    for chunk in ids.chunks(500) {
        let entries = chunk
            .iter()
            .map(|id| AppendEntry { entity_id: id.as_bytes().to_vec(), expected: Expected::Any, events: vec![ev(id)] })
            .collect();
        assert!(store.append_batch_wait(entries).unwrap().iter().all(|r| r.is_ok()));
    }
    store.flush().unwrap();
    // Queued together, as many erasures at once would be.
    let erased: Vec<&String> = ids.iter().step_by(10).collect();
    let (tx, rx) = crossbeam_channel::unbounded();
    for id in &erased {
        let tx = tx.clone();
        store.delete(id.as_bytes().to_vec(), Box::new(move |r| drop(tx.send(r)))).unwrap();
    }
    for _ in &erased {
        assert_eq!(rx.recv().unwrap().unwrap(), 1);
    }
    store.close().unwrap();
    // One pass over every file: every "scale-entity-NNNNNN" it holds (ids, and in a plain
    // store the payloads and metadata that name them).
    let prefix = b"scale-entity-";
    let mut found = std::collections::HashSet::new();
    for (_, bytes) in files(dir.path()) {
        for (at, w) in bytes.windows(prefix.len()).enumerate() {
            if w == prefix && at + prefix.len() + 6 <= bytes.len() {
                found.insert(bytes[at..at + prefix.len() + 6].to_vec());
            }
        }
    }
    for id in &erased {
        assert!(!found.contains(id.as_bytes()), "{id} survives");
    }
    // The scan does see what is kept (ids in clear only in a plain store).
    assert_eq!(found.contains(ids[1].as_bytes()), !encrypted);
}

#[test]
fn no_erased_id_survives_in_the_files_at_scale_encrypted() {
    scale_case(true);
}

#[test]
fn no_erased_id_survives_in_the_files_at_scale_plain() {
    scale_case(false);
}

fn claims_in(dir: &Path) -> i64 {
    (0..2)
        .map(|s| {
            Connection::open(dir.join(format!("shards/{s:03}.kuma")))
                .unwrap()
                .query_row("SELECT count(*) FROM key_claims", [], |r| r.get::<_, i64>(0))
                .unwrap()
        })
        .sum()
}

#[test]
fn keys_given_from_the_pool_survive_a_crash_and_erasure_destroys_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    let ids: Vec<String> = (0..50).map(|i| format!("new-{i}")).collect();
    for id in &ids {
        store.append_wait(id.as_bytes(), Expected::Any, vec![ev(&format!("{id}-A"))]).unwrap();
    }
    // Every new entity got a pool key, claimed in its shard.
    assert_eq!(claims_in(dir.path()), 50, "claims settled before this check");
    // Erased while its key is only claimed (not yet settled in the keystore): the pool row
    // and the claim go.
    store.delete_wait(b"new-7").unwrap();
    let copy = tempfile::tempdir().unwrap();
    crash_copy_all(dir.path(), copy.path());
    store.close().unwrap();
    drop(store);
    // The crash left the keys claimed: the shards hold the claims, the keystore the pool.
    assert_eq!(claims_in(copy.path()), 49, "the crash copy was taken after the claims settled");
    let store = Store::open(config(copy.path(), Some(master()))).unwrap();
    for id in ids.iter().filter(|id| *id != "new-7") {
        let events = store.read_entity(id.as_bytes(), 1, 10).unwrap();
        assert_eq!(events[0].payload, format!("payload-{id}-A").into_bytes(), "{id}");
    }
    assert!(matches!(store.read_entity(b"new-7", 1, 10), Err(Error::Erased)));
    assert!(matches!(store.append_wait(b"new-7", Expected::Any, vec![ev("again")]), Err(Error::Erased)));
    // Settled at open: no claim is left, and entities made after it get keys of their own.
    assert_eq!(claims_in(copy.path()), 0);
    store.append_wait(b"after", Expected::Any, vec![ev("after")]).unwrap();
    store.close().unwrap();
    drop(store);
    assert_eq!(claims_in(copy.path()), 0, "a clean stop settles its claims");
    let store = Store::open(config(copy.path(), Some(master()))).unwrap();
    assert_eq!(store.read_entity(b"after", 1, 1).unwrap()[0].payload, b"payload-after");
    assert_eq!(store.read_entity(b"new-3", 1, 1).unwrap()[0].payload, b"payload-new-3-A");
}

#[test]
fn after_a_flush_a_quiet_store_changes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), Some(master()))).unwrap();
    for i in 0..20 {
        store.append_wait(format!("q-{i}").as_bytes(), Expected::Any, vec![ev("q")]).unwrap();
    }
    assert_eq!(claims_in(dir.path()), 20);
    store.flush().unwrap();
    // Settled by the flush: the keystore holds the keys under their entities, so a copy
    // of the files in any order (keystore first, shards later) opens with every key.
    assert_eq!(claims_in(dir.path()), 0);
    let copy = tempfile::tempdir().unwrap();
    crash_copy_all(dir.path(), copy.path());
    store.close().unwrap();
    drop(store);
    let store = Store::open(config(copy.path(), Some(master()))).unwrap();
    for i in 0..20 {
        assert_eq!(store.read_entity(format!("q-{i}").as_bytes(), 1, 1).unwrap()[0].payload, b"payload-q");
    }
}
