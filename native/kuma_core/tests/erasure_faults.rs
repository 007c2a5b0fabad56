//! Erasure under failure and races: what a delete that fails before its COMMIT leaves (nothing), what
//! one that fails after it leaves (a committed erasure, finished later), and erasure racing
//! writes in one group commit. The faults are injected (feature `fault-injection`);
//! ExUnit repeats the disk-full cases on a real full volume.

use kuma_core::fault::{FAIL_COMMIT_PREFIX, FAIL_DESTROY_ONCE_PREFIX};
use kuma_core::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn open(dir: &Path) -> Store {
    let mut c = StoreConfig::new(dir);
    c.shards = 1;
    c.master_key = Some(Key::from_bytes(&[7u8; 32]).unwrap());
    // Long enough that heads stay dirty (not checkpointed) during a test.
    c.writer.checkpoint_interval = Duration::from_secs(3600);
    Store::open(c).expect("open store")
}

fn ev(i: u64) -> NewEvent {
    NewEvent::new("Deposited", vec![], format!("payload-{i}").into_bytes())
}

fn id(prefix: &[u8], name: &str) -> Vec<u8> {
    [prefix, name.as_bytes()].concat()
}

#[test]
fn a_delete_that_fails_before_commit_changes_nothing_in_memory_or_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let victim = id(FAIL_COMMIT_PREFIX, "alice");
    {
        let store = open(dir.path());
        for i in 1..=5 {
            store.append_wait(&victim, Expected::Any, vec![ev(i)]).unwrap();
        }
        // Her head is dirty (only in memory and the events); the delete fails at COMMIT.
        let err = store.delete_wait(&victim).unwrap_err();
        assert!(matches!(err, Error::Storage { context: "commit", .. }), "{err}");
        assert_eq!(store.head(&victim).unwrap().unwrap().seq, 5, "the in-memory head did not move");
        assert!(!store.is_erased(&victim).unwrap());
        // Other writes and a checkpoint: the head that was about to be erased is still
        // dirty, so it is persisted with the others.
        store.append_wait(b"bob", Expected::Any, vec![ev(1)]).unwrap();
        store.flush().unwrap();
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.read_entity(&victim, 1, 100).unwrap().len(), 5);
    assert!(matches!(store.verify_entity(&victim).unwrap(), EntityVerdict::Intact { events: 5, .. }));
    assert!(store.verify_shard(0, 10).unwrap().problems.is_empty());
}

#[test]
fn a_failure_after_commit_fails_only_that_erasure_and_it_is_finished_later() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let victim = id(FAIL_DESTROY_ONCE_PREFIX, "carol");
    store.append_wait(&victim, Expected::Any, vec![ev(1), ev(2)]).unwrap();
    store.append_wait(b"dave", Expected::Any, vec![ev(1)]).unwrap();
    let before = store.commit_positions()[0];

    let err = store.delete_wait(&victim).unwrap_err();
    assert!(matches!(err, Error::Storage { context: "destroy data key", .. }), "{err}");
    // The rows are gone (the commit stands) and the shard goes on: no position reused.
    assert!(matches!(store.read_entity(&victim, 1, 10), Err(Error::Erased)));
    let a = store.append_wait(b"dave", Expected::Seq(1), vec![ev(2)]).unwrap();
    assert!(a.first_pos > before, "positions go on after the committed erasure");
    assert!(matches!(store.append_wait(&victim, Expected::Any, vec![ev(3)]), Err(Error::Erased)));

    // Deleting again finishes it at once (idempotent)...
    assert_eq!(store.delete_wait(&victim).unwrap(), 0);
    // ...and a store left alone finishes it on its own, then on the next open.
    let other = id(FAIL_DESTROY_ONCE_PREFIX, "erin");
    store.append_wait(&other, Expected::Any, vec![ev(1)]).unwrap();
    assert!(store.delete_wait(&other).is_err());
    store.close().unwrap();
    let store = open(dir.path());
    assert!(store.is_erased(&other).unwrap());
    assert!(matches!(store.append_wait(&other, Expected::Any, vec![ev(1)]), Err(Error::Erased)));
    assert_eq!(store.read_entity(b"dave", 1, 10).unwrap().len(), 2);
}

#[test]
fn writes_queued_behind_an_erasure_in_the_same_group_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for round in 0..20 {
        let victim = format!("victim-{round}").into_bytes();
        store.append_wait(&victim, Expected::Any, vec![ev(1), ev(2)]).unwrap();
        // Keep the writer busy so that what follows is drained into one group.
        let (tx, rx) = crossbeam_channel::unbounded();
        let big: Vec<NewEvent> = (0..3000).map(ev).collect();
        let t = tx.clone();
        store
            .append(b"busy".to_vec(), Expected::Any, big, Box::new(move |r| drop(t.send(("busy", r.map(|_| 0))))))
            .unwrap();
        let t = tx.clone();
        store.delete(victim.clone(), Box::new(move |r| drop(t.send(("delete", r))))).unwrap();
        let t = tx.clone();
        store
            .append(
                victim.clone(),
                Expected::Any,
                vec![ev(3)],
                Box::new(move |r| drop(t.send(("append", r.map(|a| a.last_seq))))),
            )
            .unwrap();
        let snap =
            SnapshotRequest { entity_id: victim.clone(), seq: 2, version: 1, hash: [0; 32], data: b"s".to_vec() };
        store.save_snapshot(snap, Box::new(move |r| drop(tx.send(("snapshot", r.map(|_| 0)))))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut answers = Vec::new();
        while answers.len() < 4 {
            answers.push(rx.recv_timeout(deadline - Instant::now()).unwrap());
        }
        for (what, r) in answers {
            match what {
                "busy" => assert!(r.is_ok()),
                "delete" => assert_eq!(r.unwrap(), 2),
                _ => assert!(matches!(r, Err(Error::Erased)), "round {round}: {what} after the erasure answered {r:?}"),
            }
        }
        assert!(matches!(store.read_entity(&victim, 1, 10), Err(Error::Erased)));
    }
    assert!(store.verify_shard(0, 10).unwrap().problems.is_empty());
}

#[test]
fn reads_racing_an_erasure_get_the_events_or_erased_never_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path()));
    for round in 0..30 {
        let victim = format!("read-victim-{round}").into_bytes();
        let events: Vec<NewEvent> = (1..=300).map(ev).collect();
        store.append_wait(&victim, Expected::Any, events).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (store, victim, stop) = (store.clone(), victim.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut answers = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        for r in [
                            store.read_entity(&victim, 1, 1000).map(|e| e.len() as u64),
                            store.seq_at(&victim, i64::MAX),
                            store.verify_entity(&victim).map(|v| match v {
                                EntityVerdict::Intact { events, .. } => events,
                                EntityVerdict::Broken { seq, why } => panic!("broken at {seq}: {why}"),
                            }),
                        ] {
                            match r {
                                Ok(300) | Err(Error::Erased) => answers += 1,
                                // Erased between the head lookup and the read: nothing, not corrupt.
                                Ok(0) => answers += 1,
                                other => panic!("a read racing the erasure answered {other:?}"),
                            }
                        }
                    }
                    answers
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(store.delete_wait(&victim).unwrap(), 300);
        std::thread::sleep(Duration::from_millis(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }
}

/// Cluster mode: a replica whose apply failed (here, a replicated erasure failing at
/// COMMIT) refuses every later entry, unapplied, until it is reset: an entry applied after
/// a failed one would leave a hole in the replica. After the reset it applies again.
#[test]
fn a_replica_that_failed_to_apply_refuses_later_entries_until_reset() {
    use kuma_core::replica::{AppendRequest, PreparedErase, Replicated};
    let dir = tempfile::tempdir().unwrap();
    let mut c = StoreConfig::new(dir.path());
    c.shards = 1;
    c.master_key = Some(Key::from_bytes(&[7u8; 32]).unwrap());
    c.cluster_key = Some([9; 32]);
    let store = Store::open(c).unwrap();
    let append = |cid: u8, who: &[u8]| {
        let request = AppendRequest {
            command_id: [cid; 16],
            entity_id: who.to_vec(),
            expected: Expected::Any,
            events: vec![ev(1)],
        };
        vec![Replicated::Append(store.prepare(vec![request]).remove(0).unwrap())]
    };
    store.replicate_wait(0, 1, append(1, b"bob")).unwrap();
    let victim = id(FAIL_COMMIT_PREFIX, "alice");
    let erase = vec![Replicated::Erase(PreparedErase { command_id: [2; 16], entity_id: victim, timestamp_us: 1 })];
    assert!(matches!(store.replicate_wait(0, 2, erase), Err(Error::Storage { context: "commit", .. })));
    // Refused, unapplied: bob stays at seq 1, the applied index at 1.
    let later = append(3, b"bob");
    assert!(matches!(store.replicate_wait(0, 3, later.clone()), Err(Error::Storage { .. })));
    assert_eq!(store.head(b"bob").unwrap().unwrap().seq, 1);
    assert_eq!(store.applied_index(0).unwrap(), 1);
    let (tx, rx) = crossbeam_channel::bounded(1);
    store.replica_reset(0, Box::new(move |r| drop(tx.send(r)))).unwrap();
    rx.recv().unwrap().unwrap();
    assert!(store.replicate_wait(0, 3, later).is_ok());
    assert_eq!(store.head(b"bob").unwrap().unwrap().seq, 2);
}
