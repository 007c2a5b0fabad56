//! End-to-end tests of the core through its public API.

use kuma_core::*;
use rusqlite::Connection;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn ev(i: u64) -> NewEvent {
    NewEvent::new("Deposited", b"m".to_vec(), format!("payload-{i}").into_bytes())
}

fn config(dir: &Path, shards: u32) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.shards = shards;
    c
}

fn open(dir: &Path, shards: u32) -> Store {
    Store::open(config(dir, shards)).expect("open store")
}

/// Copies a data directory while the store is open: the files then hold exactly what a
/// `kill -9` would leave behind (committed WAL frames, no clean-shutdown checkpoint).
fn crash_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("shards")).unwrap();
    std::fs::copy(from.join("KUMA"), to.join("KUMA")).unwrap();
    for f in std::fs::read_dir(from.join("shards")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join("shards").join(f.file_name())).unwrap();
    }
}

#[test]
fn append_then_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    let a = store.append_wait(b"alice", Expected::Any, vec![ev(1), ev(2)]).unwrap();
    assert_eq!((a.first_seq, a.last_seq), (1, 2));
    let b = store.append_wait(b"alice", Expected::Seq(2), vec![ev(3)]).unwrap();
    assert_eq!((b.first_seq, b.last_seq), (3, 3));
    assert!(b.timestamp_us >= a.timestamp_us);
    let events = store.read_entity(b"alice", 1, 100).unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(events[2].payload, b"payload-3");
    assert_eq!(events[0].metadata, b"m");
    assert_eq!(events[0].event_type, "Deposited");
    assert_eq!(events[2].hash, b.last_hash);
    assert!(events.windows(2).all(|w| w[0].position < w[1].position));
    // Writes and reads report the shard the core placed the entity in.
    let shard = store.shard_for(b"alice");
    assert!(a.shard == shard && b.shard == shard && events.iter().all(|e| e.shard == shard));
    assert_eq!(store.read_entity(b"alice", 3, 10).unwrap().len(), 1);
    assert!(store.read_entity(b"alice", 4, 10).unwrap().is_empty());
    assert!(store.read_entity(b"nobody", 1, 10).unwrap().is_empty());
    assert_eq!(store.head(b"alice").unwrap().unwrap().seq, 3);
    assert_eq!(store.verify_entity(b"alice").unwrap(), EntityVerdict::Intact { events: 3, head_hash: b.last_hash });
}

#[test]
fn wrong_expected_seq_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    store.append_wait(b"e", Expected::Seq(0), vec![ev(1)]).unwrap();
    let err = store.append_wait(b"e", Expected::Seq(0), vec![ev(2), ev(3)]).unwrap_err();
    assert_eq!(err, Error::WrongExpectedSeq { expected: 0, actual: 1 });
    let err = store.append_wait(b"new", Expected::Seq(5), vec![ev(1)]).unwrap_err();
    assert_eq!(err, Error::WrongExpectedSeq { expected: 5, actual: 0 });
    assert_eq!(store.read_entity(b"e", 1, 10).unwrap().len(), 1);
    assert!(store.head(b"new").unwrap().is_none());
    let total: usize = (0..2).map(|s| store.read_shard(s, 0, 100).unwrap().len()).sum();
    assert_eq!(total, 1);
}

#[test]
fn invalid_input_is_refused_before_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    assert!(matches!(store.append_wait(b"", Expected::Any, vec![ev(1)]), Err(Error::Invalid { .. })));
    assert!(matches!(store.append_wait(b"x", Expected::Any, vec![]), Err(Error::Invalid { .. })));
    let big = NewEvent::new("T", vec![], vec![0; codec::MAX_PAYLOAD_BYTES + 1]);
    assert!(matches!(store.append_wait(b"x", Expected::Any, vec![big]), Err(Error::TooLarge { what: "payload", .. })));
    // One bad entry refuses the whole batch.
    let entries = vec![
        AppendEntry { entity_id: b"ok".to_vec(), expected: Expected::Any, events: vec![ev(1)] },
        AppendEntry { entity_id: vec![], expected: Expected::Any, events: vec![ev(1)] },
    ];
    assert!(store.append_batch_wait(entries).is_err());
    assert!(store.head(b"ok").unwrap().is_none());
    assert!(matches!(store.read_shard(9, 0, 1), Err(Error::Invalid { .. })));
}

#[test]
fn concurrent_writers_are_group_committed_and_gapless() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), 4));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    // Several threads share each entity: seqs must still be gapless.
                    let id = format!("acct-{}", (t * 7 + i) % 40);
                    store.append_wait(id.as_bytes(), Expected::Any, vec![ev(i), ev(i + 1)]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut total = 0;
    for e in 0..40 {
        let id = format!("acct-{e}");
        let events = store.read_entity(id.as_bytes(), 1, 100_000).unwrap();
        assert!(events.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
        assert!(matches!(store.verify_entity(id.as_bytes()).unwrap(), EntityVerdict::Intact { .. }));
        total += events.len();
    }
    assert_eq!(total, 16 * 200 * 2);
    let stats = store.stats();
    let txns: u64 = stats.iter().map(|s| s.transactions).sum();
    let events: u64 = stats.iter().map(|s| s.events).sum();
    assert_eq!(events, 6400);
    // 3,200 appends from 16 threads: the writers must have grouped some of them.
    assert!(txns < 3200, "no group commit happened: {txns} transactions");
    for s in 0..4 {
        assert!(store.verify_shard(s, 10).unwrap().problems.is_empty());
    }
}

#[test]
fn atomic_batch_with_per_entry_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    store.append_wait(b"b", Expected::Any, vec![ev(0)]).unwrap();
    let entries = vec![
        AppendEntry { entity_id: b"a".to_vec(), expected: Expected::Seq(0), events: vec![ev(1), ev(2)] },
        AppendEntry { entity_id: b"b".to_vec(), expected: Expected::Seq(0), events: vec![ev(1)] },
        AppendEntry { entity_id: b"a".to_vec(), expected: Expected::Seq(2), events: vec![ev(3)] },
        AppendEntry { entity_id: b"c".to_vec(), expected: Expected::Any, events: vec![ev(1)] },
    ];
    let results = store.append_batch_wait(entries).unwrap();
    assert_eq!(results[0].as_ref().unwrap().last_seq, 2);
    assert_eq!(results[1], Err(Error::WrongExpectedSeq { expected: 0, actual: 1 }));
    assert_eq!(results[2].as_ref().unwrap().last_seq, 3);
    assert_eq!(results[3].as_ref().unwrap().last_seq, 1);
    assert_eq!(store.read_entity(b"b", 1, 10).unwrap().len(), 1);
}

#[test]
fn reads_across_skip_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    // Interleave two entities so back-pointers jump over foreign rows.
    for i in 0..300u64 {
        store.append_wait(b"x", Expected::Any, vec![ev(i)]).unwrap();
        store.append_wait(b"y", Expected::Any, vec![ev(i), ev(i)]).unwrap();
    }
    for (from, max) in [(1, 1000), (1, 64), (60, 10), (64, 1), (65, 64), (127, 3), (250, 100), (300, 5)] {
        let got = store.read_entity(b"x", from, max).unwrap();
        let want: Vec<u64> = (from..=300.min(from + max as u64 - 1)).collect();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), want, "from {from} max {max}");
        assert!(got.iter().all(|e| e.payload == format!("payload-{}", e.seq - 1).into_bytes()));
    }
    assert_eq!(store.read_entity(b"y", 1, 10_000).unwrap().len(), 600);
}

#[test]
fn read_shard_is_position_ordered_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3);
    for i in 0..100u64 {
        store.append_wait(format!("e{}", i % 17).as_bytes(), Expected::Any, vec![ev(i)]).unwrap();
    }
    let mut total = 0;
    for s in 0..3 {
        let mut after = 0;
        loop {
            let page = store.read_shard(s, after, 7).unwrap();
            if page.is_empty() {
                break;
            }
            for e in &page {
                assert_eq!(e.position, after + 1, "positions are dense and ordered");
                assert_eq!(store.shard_for(&e.entity_id), s);
                after = e.position;
            }
            total += page.len();
        }
    }
    assert_eq!(total, 100);
}

#[test]
fn reopen_after_clean_close_and_after_crash() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 4);
    // No checkpoint during the test: the crash copy must recover heads from the tail.
    cfg.writer.checkpoint_events = u64::MAX;
    cfg.writer.checkpoint_interval = Duration::from_secs(3600);
    let store = Store::open(cfg).unwrap();
    let mut last = std::collections::HashMap::new();
    for i in 0..500u64 {
        let id = format!("user_{}", i % 50);
        let a = store.append_wait(id.as_bytes(), Expected::Any, vec![ev(i)]).unwrap();
        last.insert(id, a);
    }
    assert_eq!(store.stats().iter().map(|s| s.checkpoints).sum::<u64>(), 0);
    crash_copy(dir.path(), crashed.path());
    store.close().unwrap();
    assert!(matches!(store.append_wait(b"x", Expected::Any, vec![ev(0)]), Err(Error::Closed)));
    assert!(matches!(store.read_entity(b"x", 1, 1), Err(Error::Closed)));
    drop(store);

    for path in [dir.path(), crashed.path()] {
        let store = open(path, 4);
        for (id, a) in &last {
            let head = store.head(id.as_bytes()).unwrap().unwrap();
            assert_eq!((head.seq, head.hash, head.pos), (a.last_seq, a.last_hash, a.last_pos), "{id} in {path:?}");
            assert!(matches!(store.verify_entity(id.as_bytes()).unwrap(), EntityVerdict::Intact { events: 10, .. }));
        }
        // Appending continues the chains and positions.
        let a = store.append_wait(b"user_0", Expected::Seq(10), vec![ev(9)]).unwrap();
        assert_eq!(a.last_seq, 11);
        for s in 0..4 {
            assert!(store.verify_shard(s, 10).unwrap().problems.is_empty());
        }
    }
}

#[test]
fn positions_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1);
    let a = store.append_wait(b"a", Expected::Any, vec![ev(1), ev(2)]).unwrap();
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), 1);
    let b = store.append_wait(b"b", Expected::Any, vec![ev(1)]).unwrap();
    assert_eq!(b.first_pos, a.last_pos + 1);
}

#[test]
fn heads_beyond_the_cap_fall_back_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.heads_cap = 16;
    let store = Store::open(cfg).unwrap();
    for round in 0..3u64 {
        for e in 0..100u64 {
            store.append_wait(format!("e{e}").as_bytes(), Expected::Seq(round), vec![ev(round)]).unwrap();
        }
    }
    store.flush().unwrap();
    for e in 0..100u64 {
        let id = format!("e{e}");
        assert_eq!(store.head(id.as_bytes()).unwrap().unwrap().seq, 3);
        assert_eq!(store.read_entity(id.as_bytes(), 1, 10).unwrap().len(), 3);
    }
    assert!(store.stats()[0].checkpoints > 0);
}

#[test]
fn data_dir_rules() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    assert!(matches!(Store::open(config(dir.path(), 4)), Err(Error::Locked { .. })));
    store.close().unwrap();
    drop(store);
    assert_eq!(Store::open(config(dir.path(), 8)).err(), Some(Error::ShardCountMismatch { stored: 4, given: 8 }));
    assert!(matches!(Store::open(config(dir.path(), 0)), Err(Error::Invalid { .. })));

    // A shard replaced by a foreign SQLite file.
    let shard = dir.path().join("shards/002.kuma");
    std::fs::remove_file(&shard).unwrap();
    let _ = std::fs::remove_file(dir.path().join("shards/002.kuma-wal"));
    let _ = std::fs::remove_file(dir.path().join("shards/002.kuma-shm"));
    Connection::open(&shard).unwrap().execute_batch("CREATE TABLE x(y)").unwrap();
    assert!(matches!(Store::open(config(dir.path(), 4)), Err(Error::ForeignFile { .. })));
    std::fs::write(&shard, vec![0x42; 8192]).unwrap();
    assert!(matches!(Store::open(config(dir.path(), 4)), Err(Error::ForeignFile { .. })));
    std::fs::remove_file(&shard).unwrap();
    assert!(matches!(Store::open(config(dir.path(), 4)), Err(Error::MissingShard { .. })));

    // Shard files without a manifest are not silently adopted.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("shards")).unwrap();
    std::fs::write(other.path().join("shards/000.kuma"), b"x").unwrap();
    assert!(matches!(Store::open(config(other.path(), 1)), Err(Error::ForeignFile { .. })));

    // An unwritable location.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    assert!(matches!(Store::open(config(&blocker.join("sub"), 1)), Err(Error::Storage { .. })));
}

fn tamper(store_dir: &Path, shard: u32, sql: &str) {
    let c = Connection::open(store_dir.join(format!("shards/{shard:03}.kuma"))).unwrap();
    assert!(c.execute(sql, []).unwrap() > 0, "tamper statement changed nothing: {sql}");
}

#[test]
fn tampering_is_detected() {
    let cases = [
        ("payload", "UPDATE events SET payload = X'00' WHERE seq = 5 AND eid = 1", 5),
        ("metadata", "UPDATE events SET meta = X'01' WHERE seq = 3 AND eid = 1", 3),
        ("type", "UPDATE events SET type = 'Withdrawn' WHERE seq = 7 AND eid = 1", 7),
        ("timestamp", "UPDATE events SET ts = ts + 1 WHERE seq = 2 AND eid = 1", 2),
        ("hash", "UPDATE events SET hash = zeroblob(32) WHERE seq = 9 AND eid = 1", 9),
        ("deleted row", "DELETE FROM events WHERE seq = 4 AND eid = 1", 4),
    ];
    for (what, sql, bad_seq) in cases {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), 1);
            store.append_wait(b"victim", Expected::Any, (0..10).map(ev).collect()).unwrap();
            store.append_wait(b"bystander", Expected::Any, (0..10).map(ev).collect()).unwrap();
            store.close().unwrap();
        }
        tamper(dir.path(), 0, sql);
        let store = open(dir.path(), 1);
        match store.verify_entity(b"victim").unwrap() {
            EntityVerdict::Broken { seq, .. } => assert_eq!(seq, bad_seq, "{what}"),
            ok => panic!("{what}: tampering not detected: {ok:?}"),
        }
        assert!(matches!(store.verify_entity(b"bystander").unwrap(), EntityVerdict::Intact { events: 10, .. }));
        let report = store.verify_shard(0, 10).unwrap();
        assert_eq!(report.problems.len(), 1, "{what}: {report:?}");
        assert_eq!(report.problems[0].entity_id, b"victim");
        assert_eq!(report.problems[0].seq, bad_seq, "{what}");
        // Reads check the chain too: the altered event is never returned as if intact
        // (this store has no cipher that would notice), and reads that end before it work.
        match store.read_entity(b"victim", 1, 100) {
            Err(Error::Corrupt { seq, .. }) => assert_eq!(seq, bad_seq, "{what}"),
            other => panic!("{what}: read returned {other:?}"),
        }
        match store.read_entity(b"victim", bad_seq, 1) {
            Err(Error::Corrupt { seq, .. }) => assert_eq!(seq, bad_seq, "{what}"),
            other => panic!("{what}: read of seq {bad_seq} alone returned {other:?}"),
        }
        if what != "deleted row" {
            // (A missing row breaks the back-pointers that lead to earlier events.)
            let before = store.read_entity(b"victim", 1, bad_seq as usize - 1).unwrap();
            assert_eq!(before.len() as u64, bad_seq - 1, "{what}");
        }
        assert_eq!(store.read_entity(b"bystander", 1, 100).unwrap().len(), 10);
    }
}

#[test]
fn reads_check_the_chain_across_skip_entries_and_to_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3 * kuma_core::shard::SKIP_EVERY + 5;
    {
        let store = open(dir.path(), 1);
        store.append_wait(b"v", Expected::Any, (0..n).map(ev).collect()).unwrap();
        store.close().unwrap();
    }
    // The last event's row and hash replaced together by someone who knows the chain but not
    // the head: only the head can tell. A read that stops before it is fine.
    tamper(dir.path(), 0, &format!("UPDATE events SET hash = zeroblob(32) WHERE seq = {n}"));
    let store = open(dir.path(), 1);
    assert!(matches!(store.read_entity(b"v", n, 1), Err(Error::Corrupt { seq, .. }) if seq == n));
    let mid = kuma_core::shard::SKIP_EVERY + 3;
    let evs = store.read_entity(b"v", mid, 2 * kuma_core::shard::SKIP_EVERY as usize).unwrap();
    assert_eq!(evs.first().map(|e| e.seq), Some(mid));
    assert_eq!(evs.len() as u64, 2 * kuma_core::shard::SKIP_EVERY);
    store.close().unwrap();
    // A middle event's payload changed: a read that starts right after it still works
    // (the predecessor's stored hash is what it links to), one that includes it does not.
    tamper(dir.path(), 0, &format!("UPDATE events SET payload = X'00' WHERE seq = {mid}"));
    let store = open(dir.path(), 1);
    assert!(store.read_entity(b"v", mid + 1, 3).is_ok());
    assert!(matches!(store.read_entity(b"v", 1, n as usize), Err(Error::Corrupt { seq, .. }) if seq == mid));
    assert!(matches!(store.read_entity(b"v", mid - 2, 5), Err(Error::Corrupt { seq, .. }) if seq == mid));
}

#[test]
fn truncated_tail_is_detected_by_the_shard_scan() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 1);
        store.append_wait(b"v", Expected::Any, (0..10).map(ev).collect()).unwrap();
        store.close().unwrap();
    }
    tamper(dir.path(), 0, "DELETE FROM events WHERE seq = 10");
    let store = open(dir.path(), 1);
    let report = store.verify_shard(0, 10).unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert!(matches!(store.verify_entity(b"v").unwrap(), EntityVerdict::Broken { seq: 10, .. }));
}

#[test]
fn sync_full_mode_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.sync = SyncMode::Full;
    let store = Store::open(cfg).unwrap();
    store.append_wait(b"a", Expected::Any, vec![ev(1)]).unwrap();
    assert_eq!(store.read_entity(b"a", 1, 1).unwrap().len(), 1);
}

#[test]
fn a_writer_panic_fails_its_transaction_and_the_shard_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1);
    store.append_wait(b"a", Expected::Any, vec![ev(1)]).unwrap();
    let boom = NewEvent::new("__kuma_fault_panic__", vec![], vec![]);
    let err = store.append_wait(b"a", Expected::Any, vec![ev(2), boom]).unwrap_err();
    assert!(matches!(err, Error::Panic { .. }), "{err:?}");
    // Nothing of the failed append is visible, in memory or on disk, and the chain continues.
    assert_eq!(store.head(b"a").unwrap().unwrap().seq, 1);
    let a = store.append_wait(b"a", Expected::Seq(1), vec![ev(3)]).unwrap();
    assert_eq!((a.first_seq, a.first_pos), (2, 2));
    assert!(matches!(store.verify_entity(b"a").unwrap(), EntityVerdict::Intact { events: 2, .. }));
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), 1);
    assert_eq!(store.read_entity(b"a", 1, 10).unwrap().len(), 2);
}

#[test]
fn snapshots_are_stored_checked_and_found_by_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    let a = store.append_wait(b"s", Expected::Any, (1..=10).map(ev).collect()).unwrap();
    let snap = |seq, version, hash: [u8; 32], data: &[u8]| SnapshotRequest {
        entity_id: b"s".to_vec(),
        seq,
        version,
        hash,
        data: data.to_vec(),
    };
    store.save_snapshot_wait(snap(10, 1, a.last_hash, b"v1@10")).unwrap();
    store.save_snapshot_wait(snap(5, 1, [0; 32], b"v1@5")).unwrap();
    store.save_snapshot_wait(snap(8, 2, [0; 32], b"v2@8")).unwrap();
    // Refused: beyond the head, unknown entity, wrong hash for the head.
    assert!(matches!(store.save_snapshot_wait(snap(11, 1, [0; 32], b"x")), Err(Error::Invalid { .. })));
    let mut other = snap(1, 1, [0; 32], b"x");
    other.entity_id = b"nobody".to_vec();
    assert!(matches!(store.save_snapshot_wait(other), Err(Error::Invalid { .. })));
    assert!(matches!(store.save_snapshot_wait(snap(10, 1, [9; 32], b"x")), Err(Error::Invalid { .. })));

    let found = |version, max| store.latest_snapshot(b"s", version, max).unwrap().map(|s| (s.seq, s.data));
    assert_eq!(found(1, u64::MAX), Some((10, b"v1@10".to_vec())));
    assert_eq!(found(1, 9), Some((5, b"v1@5".to_vec())));
    assert_eq!(found(1, 4), None);
    assert_eq!(found(2, 100), Some((8, b"v2@8".to_vec())));
    assert_eq!(found(3, 100), None);
    assert_eq!(store.latest_snapshot(b"nobody", 1, 100).unwrap(), None);
    // Snapshots survive a reopen.
    store.close().unwrap();
    drop(store);
    let store = open(dir.path(), 2);
    assert_eq!(store.latest_snapshot(b"s", 1, 100).unwrap().unwrap().hash, a.last_hash);

    // Deleting one version's snapshots leaves the others; an entity without events has none.
    store.delete_snapshots_wait(b"s", 1).unwrap();
    assert_eq!(store.latest_snapshot(b"s", 1, 100).unwrap(), None);
    assert_eq!(store.latest_snapshot(b"s", 2, 100).unwrap().map(|s| s.seq), Some(8));
    store.delete_snapshots_wait(b"nobody", 1).unwrap();
    assert!(matches!(store.delete_snapshots_wait(b"", 1), Err(Error::Invalid { .. })));
}

#[test]
fn seq_at_finds_the_last_event_at_or_before_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1);
    let mut stamps = Vec::new();
    for i in 0..300u64 {
        let a = store.append_wait(b"t", Expected::Any, vec![ev(i)]).unwrap();
        stamps.push(a.timestamp_us);
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(store.seq_at(b"t", stamps[0] - 1).unwrap(), 0);
    assert_eq!(store.seq_at(b"t", i64::MAX).unwrap(), 300);
    for probe in [0usize, 1, 50, 63, 64, 65, 127, 128, 200, 299] {
        let ts = stamps[probe];
        // The last seq whose timestamp is <= ts (several events may share a microsecond).
        let want = stamps.iter().rposition(|&s| s <= ts).unwrap() as u64 + 1;
        assert_eq!(store.seq_at(b"t", ts).unwrap(), want, "probe {probe}");
    }
    assert_eq!(store.seq_at(b"nobody", i64::MAX).unwrap(), 0);
}

#[test]
fn shards_can_share_writer_threads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 5);
    cfg.writer_threads = Some(2);
    cfg.writer.checkpoint_interval = Duration::from_millis(50);
    let store = Arc::new(Store::open(cfg).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..100u64 {
                    store
                        .append_wait(format!("e{}", (t * 13 + i) % 30).as_bytes(), Expected::Any, vec![ev(i)])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let total: usize = (0..5).map(|s| store.read_shard(s, 0, 10_000).unwrap().len()).sum();
    assert_eq!(total, 800);
    for s in 0..5 {
        assert!(store.verify_shard(s, 10).unwrap().problems.is_empty());
    }
    // Idle shards of a shared thread still get their heads checkpointed.
    std::thread::sleep(Duration::from_millis(300));
    assert!(store.stats().iter().all(|s| s.events == 0 || s.checkpoints > 0), "{:?}", store.stats());
    Arc::try_unwrap(store).ok().unwrap().close().unwrap();
    let store = open(dir.path(), 5);
    let total: usize = (0..5).map(|s| store.read_shard(s, 0, 10_000).unwrap().len()).sum();
    assert_eq!(total, 800);
}
