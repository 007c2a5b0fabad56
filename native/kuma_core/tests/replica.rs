//! Cluster mode in the core: what a leader prepares, every replica applies the same way.

use kuma_core::replica::{AppendRequest, Outcome, PreparedAppend, PreparedErase, Replicated};
use kuma_core::*;
use std::path::Path;

const CLUSTER: [u8; 32] = [7; 32];

fn master() -> Key {
    Key::from_bytes(&[3u8; 32]).unwrap()
}

fn open(dir: &Path, encrypted: bool) -> Store {
    let mut c = StoreConfig::new(dir);
    c.shards = 2;
    c.master_key = encrypted.then(master);
    c.cluster_key = Some(CLUSTER);
    Store::open(c).unwrap()
}

fn ev(text: &str) -> NewEvent {
    NewEvent::new("Noted", format!("meta-{text}").into_bytes(), format!("payload-{text}").into_bytes())
}

fn cid(n: u8) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = n;
    id[15] = 0xA5;
    id
}

fn request(n: u8, id: &str, expected: Expected, texts: &[&str]) -> AppendRequest {
    AppendRequest {
        command_id: cid(n),
        entity_id: id.as_bytes().to_vec(),
        expected,
        events: texts.iter().map(|t| ev(t)).collect(),
    }
}

fn prepared(store: &Store, requests: Vec<AppendRequest>) -> Vec<Replicated> {
    store.prepare(requests).into_iter().map(|r| Replicated::Append(r.unwrap())).collect()
}

/// Ids that land in shard 0 of a 2-shard store.
fn ids_in_shard0(store: &Store, n: usize) -> Vec<String> {
    (0..).map(|i| format!("e{i}")).filter(|id| store.shard_for(id.as_bytes()) == 0).take(n).collect()
}

/// Everything stored of an entity, sealed (seq, position, timestamp, type, metadata,
/// payload, hash): what replicas are compared by.
fn rows(store: &Store, id: &str) -> Vec<StoredEvent> {
    let mut events = store.read_entity_sealed(id.as_bytes(), 1, 1000).unwrap();
    for e in &mut events {
        e.shard = 0;
    }
    events
}

fn appended(o: &Outcome) -> Appended {
    match o {
        Outcome::Appended(a) => *a,
        other => panic!("not appended: {other:?}"),
    }
}

#[test]
fn every_replica_stores_the_same_events_positions_and_chains() {
    for encrypted in [true, false] {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let replicas: Vec<Store> = dirs.iter().map(|d| open(d.path(), encrypted)).collect();
        let leader = &replicas[0];
        let ids = ids_in_shard0(leader, 3);
        for round in 0..5u8 {
            let index = u64::from(round) + 1;
            let commands = prepared(
                leader,
                vec![
                    request(round * 10 + 1, &ids[0], Expected::Any, &["a", "b"]),
                    request(round * 10 + 2, &ids[1], Expected::Any, &["c"]),
                    // The same entity twice in one entry: seqs continue within the entry.
                    request(round * 10 + 3, &ids[0], Expected::Any, &["d"]),
                ],
            );
            let outcomes: Vec<_> =
                replicas.iter().map(|r| r.replicate_wait(0, index, commands.clone()).unwrap()).collect();
            assert!(outcomes.iter().all(|o| *o == outcomes[0]), "encrypted={encrypted}: {outcomes:?}");
            assert_eq!(appended(&outcomes[0][2]).first_seq, appended(&outcomes[0][0]).last_seq + 1);
        }
        for id in &ids[..2] {
            let want = rows(leader, id);
            assert_eq!(want.len(), if id == &ids[0] { 15 } else { 5 });
            for r in &replicas[1..] {
                assert_eq!(rows(r, id), want, "encrypted={encrypted}");
                assert!(matches!(r.verify_entity(id.as_bytes()).unwrap(), EntityVerdict::Intact { .. }));
                // Each replica opens what the leader sealed.
                let events = r.read_entity(id.as_bytes(), 1, 1000).unwrap();
                assert!(events[0].payload.starts_with(b"payload-"));
            }
        }
        for r in &replicas {
            assert_eq!(r.applied_index(0).unwrap(), 5);
        }
    }
}

#[test]
fn a_replayed_entry_and_a_retried_command_are_not_applied_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let id = ids_in_shard0(&store, 1).remove(0);
    let commands = prepared(&store, vec![request(1, &id, Expected::Any, &["x"])]);
    let first = store.replicate_wait(0, 1, commands.clone()).unwrap();
    // Raft replays entry 1 after a restart: nothing is written, the outcome comes back.
    assert_eq!(store.replicate_wait(0, 1, commands.clone()).unwrap(), first);
    // A caller retries the same command (same id) after a timeout: a new entry, same answer.
    assert_eq!(store.replicate_wait(0, 2, commands.clone()).unwrap(), first);
    assert_eq!(rows(&store, &id).len(), 1);
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), true);
    assert_eq!(store.applied_index(0).unwrap(), 2);
    assert_eq!(store.replicate_wait(0, 2, commands).unwrap(), first);
    assert_eq!(rows(&store, &id).len(), 1);
}

#[test]
fn refusals_are_the_same_everywhere_and_stale_preparations_conflict() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas: Vec<Store> = dirs.iter().map(|d| open(d.path(), true)).collect();
    let leader = &replicas[0];
    let id = ids_in_shard0(leader, 1).remove(0);
    let apply = |index: u64, commands: Vec<Replicated>| -> Vec<Outcome> {
        let outs: Vec<_> = replicas.iter().map(|r| r.replicate_wait(0, index, commands.clone()).unwrap()).collect();
        assert_eq!(outs[0], outs[1]);
        outs[0].clone()
    };
    apply(1, prepared(leader, vec![request(1, &id, Expected::Any, &["a"])]));
    // A stale expected seq is refused, and the refusal is what a retry gets too.
    let stale = prepared(leader, vec![request(2, &id, Expected::Seq(0), &["b"])]);
    let refused = apply(2, stale.clone());
    assert_eq!(refused, vec![Outcome::Refused(Error::WrongExpectedSeq { expected: 0, actual: 1 })]);
    assert_eq!(apply(3, stale), refused);
    // Two preparations against the same head (a new leader that had not applied the
    // first yet): the second conflicts, is not recorded, and applies once prepared again.
    let one = prepared(leader, vec![request(4, &id, Expected::Any, &["c"])]);
    let two = prepared(leader, vec![request(5, &id, Expected::Any, &["d"])]);
    assert!(matches!(apply(4, one)[0], Outcome::Appended(_)));
    assert_eq!(apply(5, two), vec![Outcome::Conflict { head_seq: 2 }]);
    let again = prepared(leader, vec![request(5, &id, Expected::Any, &["d"])]);
    assert_eq!(appended(&apply(6, again)[0]).first_seq, 3);
    assert_eq!(rows(leader, &id).len(), 3);
}

#[test]
fn a_new_entity_gets_one_key_everywhere_and_a_second_one_conflicts() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas: Vec<Store> = dirs.iter().map(|d| open(d.path(), true)).collect();
    let id = ids_in_shard0(&replicas[0], 1).remove(0);
    // Two leaders (one deposed) each prepared the entity's first append with its own new key.
    let from_a = prepared(&replicas[0], vec![request(1, &id, Expected::Any, &["a"])]);
    let from_b = prepared(&replicas[1], vec![request(2, &id, Expected::Any, &["b"])]);
    match (&from_a[0], &from_b[0]) {
        (
            Replicated::Append(PreparedAppend { new_key: Some(ka), .. }),
            Replicated::Append(PreparedAppend { new_key: Some(kb), .. }),
        ) => {
            assert_ne!(ka, kb)
        }
        other => panic!("expected two new keys: {other:?}"),
    }
    for r in &replicas {
        assert!(matches!(r.replicate_wait(0, 1, from_a.clone()).unwrap()[0], Outcome::Appended(_)));
        // The same first seq with another key: never stored under a key nobody keeps.
        assert_eq!(r.replicate_wait(0, 2, from_b.clone()).unwrap(), vec![Outcome::Conflict { head_seq: 1 }]);
    }
    // Prepared again, now with the installed key and no new one.
    let again = prepared(&replicas[1], vec![request(2, &id, Expected::Any, &["b"])]);
    assert!(matches!(&again[0], Replicated::Append(PreparedAppend { new_key: None, first_seq: 2, .. })));
    for r in &replicas {
        assert!(matches!(r.replicate_wait(0, 3, again.clone()).unwrap()[0], Outcome::Appended(_)));
        let payloads: Vec<_> = r.read_entity(id.as_bytes(), 1, 10).unwrap().into_iter().map(|e| e.payload).collect();
        assert_eq!(payloads, vec![b"payload-a".to_vec(), b"payload-b".to_vec()]);
    }
}

#[test]
fn a_replicated_erasure_erases_on_every_replica() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas: Vec<Store> = dirs.iter().map(|d| open(d.path(), true)).collect();
    let id = ids_in_shard0(&replicas[0], 1).remove(0);
    let append = prepared(&replicas[0], vec![request(1, &id, Expected::Any, &["secret-1", "secret-2"])]);
    let erase = vec![Replicated::Erase(PreparedErase {
        command_id: cid(2),
        entity_id: id.as_bytes().to_vec(),
        timestamp_us: 5,
    })];
    for r in &replicas {
        r.replicate_wait(0, 1, append.clone()).unwrap();
        assert_eq!(r.replicate_wait(0, 2, erase.clone()).unwrap(), vec![Outcome::Erased(2)]);
        assert!(r.is_erased(id.as_bytes()).unwrap());
        assert!(matches!(r.read_entity(id.as_bytes(), 1, 10), Err(Error::Erased)));
    }
    // Preparing for an erased entity fails at once; an old preparation is refused.
    assert!(matches!(replicas[0].prepare(vec![request(3, &id, Expected::Any, &["x"])]).remove(0), Err(Error::Erased)));
    for r in &replicas {
        assert_eq!(
            r.replicate_wait(
                0,
                3,
                append
                    .iter()
                    .cloned()
                    .map(|c| match c {
                        Replicated::Append(a) => Replicated::Append(PreparedAppend { command_id: cid(9), ..a }),
                        other => other,
                    })
                    .collect()
            )
            .unwrap(),
            vec![Outcome::Refused(Error::Erased)]
        );
        r.close().unwrap();
    }
    drop(replicas);
    for d in &dirs {
        for f in walk(d.path()) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(!bytes.windows(8).any(|w| w == b"secret-1"), "{f:?}");
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_replica_refuses_local_writes_and_other_clusters_files() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), true);
        let id = ids_in_shard0(&store, 1).remove(0);
        assert!(matches!(store.append_wait(id.as_bytes(), Expected::Any, vec![ev("x")]), Err(Error::Replicated)));
        assert!(matches!(store.delete_wait(id.as_bytes()), Err(Error::Replicated)));
        assert!(matches!(store.rotate_master_key(Key::random().unwrap()), Err(Error::Replicated)));
        // A command for another shard's entity is refused before anything happens.
        let other: String = (0..).map(|i| format!("o{i}")).find(|i| store.shard_for(i.as_bytes()) == 1).unwrap();
        let commands = prepared(&store, vec![request(1, &other, Expected::Any, &["x"])]);
        assert!(matches!(store.replicate_wait(0, 1, commands), Err(Error::Invalid { .. })));
        store.close().unwrap();
    }
    let mut c = StoreConfig::new(dir.path());
    c.shards = 2;
    c.master_key = Some(master());
    c.cluster_key = Some([8; 32]);
    assert!(matches!(Store::open(c), Err(Error::ClusterMismatch { .. })));
    // A replica's data dir opened without the cluster is refused: written locally, it
    // would differ from the other replicas for good.
    let mut c = StoreConfig::new(dir.path());
    c.shards = 2;
    c.master_key = Some(master());
    assert!(matches!(Store::open(c), Err(Error::ClusterMismatch { .. })));
    // A single-node store cannot apply replicated commands.
    let plain_dir = tempfile::tempdir().unwrap();
    let mut c = StoreConfig::new(plain_dir.path());
    c.shards = 2;
    let single = Store::open(c).unwrap();
    assert!(matches!(single.replicate_wait(0, 1, vec![]), Err(Error::Invalid { .. })));
}

#[test]
fn a_replica_catches_up_from_another_replicas_copy_of_the_shard() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path(), true);
    let b = open(dirs[1].path(), true);
    let ids = ids_in_shard0(&a, 3);
    // B applied the first entry, then was down while A applied four more (one erasing).
    let first = prepared(&a, vec![request(1, &ids[2], Expected::Any, &["doomed"])]);
    a.replicate_wait(0, 1, first.clone()).unwrap();
    b.replicate_wait(0, 1, first).unwrap();
    for n in 2..=4u8 {
        let entry = prepared(
            &a,
            vec![request(n, &ids[0], Expected::Any, &["x", "y"]), request(n + 50, &ids[1], Expected::Any, &["z"])],
        );
        a.replicate_wait(0, u64::from(n), entry).unwrap();
    }
    let erase = vec![Replicated::Erase(PreparedErase {
        command_id: cid(9),
        entity_id: ids[2].as_bytes().to_vec(),
        timestamp_us: 9,
    })];
    a.replicate_wait(0, 5, erase).unwrap();

    // A's copy (a Raft snapshot), then B takes it: first the keys it lacks, then the file.
    let copy = dirs[0].path().join("snapshot.kuma");
    assert_eq!(a.snapshot_point(0).unwrap(), 5);
    assert_eq!(a.copy_shard(0, &copy).unwrap(), 5);
    let wanted = Store::copy_indexes(&copy).unwrap();
    let missing = b.missing_keys(&wanted).unwrap();
    assert_eq!(missing.len(), 2, "B lacks the keys of the two entities it never saw");
    b.install_keys(&a.export_keys(&missing).unwrap()).unwrap();
    assert_eq!(b.install_wait(0, copy).unwrap(), 5);
    // Restored into the live file, which stays in WAL mode.
    let shard_file = kuma_core::shard::shard_path(&dirs[1].path().join("shards"), 0);
    let mode: String =
        rusqlite::Connection::open(&shard_file).unwrap().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");

    assert_eq!(b.applied_index(0).unwrap(), 5);
    for (id, first) in [(&ids[0], &b"payload-x"[..]), (&ids[1], &b"payload-z"[..])] {
        assert_eq!(rows(&b, id), rows(&a, id));
        // B opens them with the keys it was given.
        assert_eq!(b.read_entity(id.as_bytes(), 1, 10).unwrap()[0].payload, first);
    }
    // The entity erased in the copy is erased here too (B had its key: it is destroyed).
    assert!(matches!(b.read_entity(ids[2].as_bytes(), 1, 10), Err(Error::Erased)));
    // The entries it holds are not applied again; the next one is.
    let next = prepared(&a, vec![request(60, &ids[0], Expected::Seq(6), &["w"])]);
    let want = a.replicate_wait(0, 6, next.clone()).unwrap();
    assert_eq!(b.replicate_wait(0, 6, next).unwrap(), want);
    assert_eq!(rows(&b, &ids[0]), rows(&a, &ids[0]));
    assert!(matches!(b.verify_entity(ids[0].as_bytes()).unwrap(), EntityVerdict::Intact { events: 7, .. }));
}

#[test]
fn a_released_shard_leaves_no_event_or_key_of_its_entities_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let moved = ids_in_shard0(&a, 2);
    let kept = (0..).map(|i| format!("k{i}")).find(|id| a.shard_for(id.as_bytes()) == 1).unwrap();
    let entry = prepared(
        &a,
        vec![request(1, &moved[0], Expected::Any, &["m1", "m2"]), request(2, &moved[1], Expected::Any, &["m3"])],
    );
    a.replicate_wait(0, 1, entry).unwrap();
    a.replicate_wait(1, 1, prepared(&a, vec![request(3, &kept, Expected::Any, &["k1"])])).unwrap();
    a.flush().unwrap();

    // What would betray the moved entities: their sealed events and their wrapped keys.
    let sealed: Vec<Vec<u8>> = moved.iter().flat_map(|id| rows(&a, id)).map(|e| e.payload[..16].to_vec()).collect();
    let indexes = Store::copy_indexes(&kuma_core::shard::shard_path(&dir.path().join("shards"), 0)).unwrap();
    let wrapped: Vec<Vec<u8>> = a.export_keys(&indexes).unwrap().into_iter().map(|(_, w)| w).collect();

    assert_eq!(a.release_wait(0).unwrap(), 2, "the keys of both moved entities are deleted");
    assert_eq!(a.applied_index(0).unwrap(), 0);
    for id in &moved {
        assert!(a.read_entity(id.as_bytes(), 1, 10).unwrap().is_empty());
        assert!(a.head(id.as_bytes()).unwrap().is_none());
    }
    // The other shard is untouched.
    assert_eq!(a.read_entity(kept.as_bytes(), 1, 10).unwrap()[0].payload, b"payload-k1");
    a.close().unwrap();
    drop(a);

    assert_eq!(wrapped.len(), 2, "both keys were exported before the release");
    for f in walk(dir.path()) {
        let bytes = std::fs::read(&f).unwrap();
        for needle in sealed.iter().chain(wrapped.iter()) {
            assert!(!bytes.windows(needle.len()).any(|w| w == &needle[..]), "{f:?} still holds moved bytes");
        }
    }
}
