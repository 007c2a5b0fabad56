//! The store-wide order (order.rs): one gapless sequence over every shard's events, in
//! commit order, that survives a crash.

mod common;

use kuma_core::*;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(dir: &Path, shards: u32) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.shards = shards;
    c
}

fn ev(i: u64) -> NewEvent {
    NewEvent::new("T", vec![], format!("e{i}").into_bytes())
}

/// Waits until the store-wide order reaches `n` events (it follows the commits closely,
/// not at once: the sequencer records them after the writers answered).
fn wait_for(store: &Store, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.global_position().unwrap() < n {
        assert!(Instant::now() < deadline, "order stuck at {:?} of {n}", store.global_position());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every event in the store-wide order, read in pages of `page`.
fn read_all(store: &Store, page: usize) -> Vec<(u64, StoredEvent)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let AllPage { events, searched } = store.read_all(after, page).unwrap();
        assert!(events.len() <= page);
        assert!(events.iter().all(|(g, _)| *g > after && *g <= searched));
        out.extend(events);
        if searched == after {
            return out;
        }
        after = searched;
    }
}

/// The checks every reading of the order must pass: numbers 1..=n with none missing or
/// repeated, each entity's events in seq order, each shard's in position order.
fn check_order(all: &[(u64, StoredEvent)], n: u64) {
    let globals: Vec<u64> = all.iter().map(|(g, _)| *g).collect();
    assert_eq!(globals, (1..=n).collect::<Vec<_>>(), "gapless, each once, in order");
    let mut seqs: HashMap<&[u8], u64> = HashMap::new();
    let mut positions: HashMap<u32, u64> = HashMap::new();
    for (_, e) in all {
        let seq = seqs.entry(&e.entity_id).or_insert(0);
        assert_eq!(e.seq, *seq + 1, "an entity's events in seq order");
        *seq = e.seq;
        let pos = positions.entry(e.shard).or_insert(0);
        assert!(e.position > *pos, "a shard's events in position order");
        *pos = e.position;
    }
}

#[test]
fn concurrent_appends_over_many_shards_read_back_in_one_gapless_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(config(dir.path(), 4)).unwrap());
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut written = 0;
                for i in 0..150u64 {
                    let n = 1 + (i + w) % 3;
                    let id = format!("w{w}-{}", i % 7);
                    store.append_wait(id.as_bytes(), Expected::Any, (0..n).map(ev).collect()).unwrap();
                    written += n;
                }
                written
            })
        })
        .collect();
    let total: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    wait_for(&store, total);
    for page in [1, 7, 100, 10_000] {
        let all = read_all(&store, page);
        check_order(&all, total);
        let distinct: HashSet<(Vec<u8>, u64)> = all.iter().map(|(_, e)| (e.entity_id.clone(), e.seq)).collect();
        assert_eq!(distinct.len() as u64, total);
    }
    // Each event's number is found from its shard position too.
    for (g, e) in read_all(&store, 500).iter().step_by(37) {
        assert_eq!(store.global_of(e.shard, e.position).unwrap(), Some(*g));
    }
}

#[test]
fn a_write_acknowledged_before_another_began_comes_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), 8)).unwrap();
    let ids: Vec<String> = (0..40).map(|i| format!("entity-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        store.append_wait(id.as_bytes(), Expected::Any, vec![ev(i as u64)]).unwrap();
    }
    wait_for(&store, 40);
    let order: Vec<Vec<u8>> = read_all(&store, 1000).into_iter().map(|(_, e)| e.entity_id).collect();
    assert_eq!(order, ids.iter().map(|i| i.as_bytes().to_vec()).collect::<Vec<_>>());
}

#[test]
fn erased_events_keep_their_numbers_and_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path(), 2)).unwrap();
    store.append_wait(b"keep-1", Expected::Any, vec![ev(1), ev(2)]).unwrap();
    store.append_wait(b"gone", Expected::Any, vec![ev(3), ev(4), ev(5)]).unwrap();
    store.append_wait(b"keep-2", Expected::Any, vec![ev(6)]).unwrap();
    wait_for(&store, 6);
    let before = read_all(&store, 100);
    store.delete_wait(b"gone").unwrap();
    let after = read_all(&store, 2);
    let kept: Vec<(u64, StoredEvent)> = before.into_iter().filter(|(_, e)| e.entity_id != b"gone").collect();
    assert_eq!(after, kept);
    assert_eq!(after.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![1, 2, 6]);
    // Later writes go on from 7: numbers are never given twice.
    store.append_wait(b"keep-2", Expected::Any, vec![ev(7)]).unwrap();
    wait_for(&store, 7);
    assert_eq!(store.read_all(6, 10).unwrap().events.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![7]);
}

#[test]
fn after_a_crash_commits_the_log_missed_are_numbered_and_nothing_seen_changes() {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(config(dir.path(), 4)).unwrap());
    for i in 0..200u64 {
        store.append_wait(format!("a{}", i % 13).as_bytes(), Expected::Any, vec![ev(i)]).unwrap();
    }
    wait_for(&store, 200);
    let seen = read_all(&store, 1000);
    // Writers keep going while the files are copied (what kill -9 leaves): the copy's
    // order log may lag its shards.
    let busy = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..400u64 {
                store.append_wait(format!("b{}", i % 11).as_bytes(), Expected::Any, vec![ev(i), ev(i + 1)]).unwrap();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(5));
    common::crash_copy_all(dir.path(), copy.path());
    busy.join().unwrap();

    let reopened = Store::open(config(copy.path(), 4)).unwrap();
    let total: u64 = (0..4).map(|s| reopened.read_shard(s, 0, 100_000).unwrap().len() as u64).sum();
    wait_for(&reopened, total);
    let all = read_all(&reopened, 64);
    check_order(&all, total);
    // What readers saw before the crash kept its numbers.
    assert_eq!(&all[..seen.len()], &seen[..]);
    // And it numbers new writes after them.
    reopened.append_wait(b"after", Expected::Any, vec![ev(0)]).unwrap();
    wait_for(&reopened, total + 1);
    assert_eq!(reopened.read_all(total, 10).unwrap().events[0].1.entity_id, b"after".to_vec());
}

#[test]
fn a_store_that_keeps_no_order_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 2);
    c.global_order = false;
    let store = Store::open(c).unwrap();
    store.append_wait(b"x", Expected::Any, vec![ev(1)]).unwrap();
    assert_eq!(store.global_position(), None);
    assert!(matches!(store.read_all(0, 10), Err(Error::Invalid { .. })));
    assert!(!dir.path().join("order.kuma").exists());
}

#[test]
fn events_stored_before_the_order_existed_are_numbered_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 3);
    c.global_order = false;
    let store = Store::open(c).unwrap();
    for i in 0..30u64 {
        store.append_wait(format!("old{}", i % 5).as_bytes(), Expected::Any, vec![ev(i)]).unwrap();
    }
    store.close().unwrap();
    drop(store);
    let store = Store::open(config(dir.path(), 3)).unwrap();
    assert_eq!(store.global_position(), Some(30));
    check_order(&read_all(&store, 8), 30);
}
