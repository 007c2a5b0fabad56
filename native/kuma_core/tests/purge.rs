//! An erasure commits its tombstone and destroys the key at once; the entity's events are
//! deleted afterwards, in chunks between the shard's other writes. These tests hold that
//! deletion back (feature `fault-injection`, `HOLD_PURGES`) to look at the store while
//! erased events are still in the file, and crash it there. `HOLD_PURGES` is process-wide,
//! so this file is a test binary of its own and its one test runs alone.

mod common;

use common::crash_copy_all;
use kuma_core::fault::HOLD_PURGES;
use kuma_core::*;
use rusqlite::Connection;
use std::path::Path;
use std::sync::atomic::Ordering;

fn open(dir: &Path) -> Store {
    let mut c = StoreConfig::new(dir);
    c.shards = 1;
    c.master_key = Some(Key::from_bytes(&[9u8; 32]).unwrap());
    Store::open(c).expect("open store")
}

fn ev(marker: &str) -> NewEvent {
    NewEvent::new("Noted", vec![], format!("payload-{marker}").into_bytes())
}

/// (events, purge jobs) in the shard file, read with a connection of its own.
fn rows(dir: &Path) -> (i64, i64) {
    let c = Connection::open(dir.join("shards/000.kuma")).unwrap();
    let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    (count("SELECT count(*) FROM events"), count("SELECT count(*) FROM purges"))
}

#[test]
fn erased_events_are_deleted_after_the_erasure_and_a_crash_resumes_their_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // The victim is the newest entity: its eid is the highest.
    store.append_wait(b"bystander", Expected::Any, vec![ev("b")]).unwrap();
    for batch in 0..10 {
        let events = (0..500).map(|i| ev(&format!("victim-{batch}-{i}"))).collect();
        store.append_wait(b"victim", Expected::Any, events).unwrap();
    }
    store.flush().unwrap();

    HOLD_PURGES.store(true, Ordering::SeqCst);
    assert_eq!(store.delete_wait(b"victim").unwrap(), 5_000);
    // Unreadable at once, while its events are still in the file.
    assert!(matches!(store.read_entity(b"victim", 1, 10), Err(Error::Erased)));
    assert!(matches!(store.head(b"victim"), Err(Error::Erased)));
    assert_eq!(store.erasure_state(b"victim").unwrap(), Some(false));
    assert_eq!(store.erasure_state(b"bystander").unwrap(), None);
    store.flush().unwrap();
    assert_eq!(rows(dir.path()), (5_001, 1), "held back: the flush could not delete them");

    // A new entity made meanwhile gets an eid of its own (the erased events would
    // otherwise read as its), reads across the shard skip the erased events, and verify
    // checks only the live entities.
    store.append_wait(b"newcomer", Expected::Any, vec![ev("n1"), ev("n2")]).unwrap();
    let ids: Vec<Vec<u8>> = store.read_shard(0, 0, 10_000).unwrap().into_iter().map(|e| e.entity_id).collect();
    assert_eq!(ids, vec![b"bystander".to_vec(), b"newcomer".to_vec(), b"newcomer".to_vec()]);
    let report = store.verify_shard(0, 10).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.entities, report.events), (2, 3));
    assert!(matches!(store.verify_entity(b"newcomer").unwrap(), EntityVerdict::Intact { events: 2, .. }));

    // The VM dies here: the copy holds the erasure and the events still to delete.
    let copy = tempfile::tempdir().unwrap();
    crash_copy_all(dir.path(), copy.path());
    store.close().unwrap();
    drop(store);
    HOLD_PURGES.store(false, Ordering::SeqCst);
    assert_eq!(rows(copy.path()), (5_003, 1));

    // Opened again, the deletion resumes; a flush waits for it.
    let store = open(copy.path());
    assert!(matches!(store.read_entity(b"victim", 1, 10), Err(Error::Erased)));
    store.flush().unwrap();
    assert_eq!(rows(copy.path()), (3, 0));
    assert_eq!(store.erasure_state(b"victim").unwrap(), Some(true));
    assert!(matches!(store.append_wait(b"victim", Expected::Any, vec![ev("again")]), Err(Error::Erased)));
    assert_eq!(store.read_entity(b"newcomer", 1, 10).unwrap().len(), 2);
    let report = store.verify_shard(0, 10).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.entities, report.events), (2, 3));
}
