//! The live tail (tail.rs): readers that have caught up are answered from memory. What it
//! answers must be what the file answers, page for page, and an erased entity's events
//! must never come from it.

use kuma_core::query::{ScopeMatch, ShardQuery};
use kuma_core::writer::AppendEntry;
use kuma_core::*;
use std::path::Path;

fn open(dir: &Path, tail_bytes: usize) -> Store {
    let mut c = StoreConfig::new(dir);
    c.shards = 2;
    c.master_key = Some(Key::from_bytes(&[5u8; 32]).unwrap());
    c.tail_bytes = tail_bytes;
    Store::open(c).expect("open store")
}

fn ev(ty: &str, scope: Option<&str>, marker: &str) -> NewEvent {
    let mut e = NewEvent::new(ty, format!("meta-{marker}").into_bytes(), format!("payload-{marker}").into_bytes());
    e.scope = scope.map(String::from);
    e
}

/// A spread of queries, from several positions: every filter the tail evaluates itself.
fn queries(last: u64) -> Vec<(ShardQuery, usize)> {
    let mut out = Vec::new();
    for after in [last.saturating_sub(400), last.saturating_sub(37), last.saturating_sub(1), last] {
        let base = ShardQuery { after, ..Default::default() };
        out.push((base.clone(), 1_000));
        out.push((base.clone(), 7));
        out.push((ShardQuery { types: vec!["Closed".into()], ..base.clone() }, 50));
        out.push((ShardQuery { scope: Some(ScopeMatch::Prefix("org:a".into())), ..base.clone() }, 50));
        out.push((ShardQuery { scope: Some(ScopeMatch::Exact("org:b".into())), ..base.clone() }, 3));
        out.push((ShardQuery { id_prefix: Some(b"acct-1".to_vec()), ..base.clone() }, 50));
        out.push((ShardQuery { entity_id: Some(b"acct-3".to_vec()), ..base.clone() }, 50));
    }
    out
}

fn write_mix(store: &Store, round: usize) {
    let mut entries = Vec::new();
    for i in 0..40 {
        let id = format!("acct-{}", (i * 7 + round) % 23).into_bytes();
        let events = (0..(1 + i % 4))
            .map(|k| {
                let ty = if (i + k) % 3 == 0 { "Closed" } else { "Opened" };
                let scope = match (i + k) % 4 {
                    0 => Some("org:a/t:1"),
                    1 => Some("org:b"),
                    2 => Some("org:a"),
                    _ => None,
                };
                ev(ty, scope, &format!("{round}-{i}-{k}"))
            })
            .collect();
        entries.push(AppendEntry { entity_id: id, expected: Expected::Any, events });
    }
    for r in store.append_batch_wait(entries).unwrap() {
        r.unwrap();
    }
}

#[test]
fn pages_from_memory_are_the_pages_the_file_gives() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    for round in 0..30 {
        write_mix(&store, round);
    }
    let lasts = store.commit_positions();
    let mut from_memory = Vec::new();
    for shard in 0..2 {
        let (first, last, bytes) = store.tail_span(shard).unwrap();
        assert_eq!(last, lasts[shard as usize]);
        assert!(first <= last.saturating_sub(400) + 1 && bytes > 0, "the tail holds the last 400 events");
        for (q, max) in queries(last) {
            from_memory.push(store.query_shard(shard, &q, max).unwrap());
        }
    }
    store.close().unwrap();
    drop(store);

    // Opened again with no tail: every page comes from the file.
    let store = open(dir.path(), 0);
    let mut i = 0;
    for shard in 0..2 {
        assert_eq!(store.tail_span(shard).unwrap().2, 0);
        for (q, max) in queries(lasts[shard as usize]) {
            let file = store.query_shard(shard, &q, max).unwrap();
            let mem = &from_memory[i];
            assert_eq!(mem.events, file.events, "shard {shard}, {q:?}, max {max}");
            assert_eq!((mem.searched, mem.searched_hash), (file.searched, file.searched_hash), "{q:?}");
            i += 1;
        }
    }
    assert!(from_memory.iter().any(|p| p.events.len() > 10), "the queries returned events");
}

#[test]
fn an_erased_entity_is_never_read_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let shard = store.shard_for(b"victim");
    store.append_wait(b"bystander-0", Expected::Any, vec![ev("Opened", None, "b")]).unwrap();
    let before = store.commit_positions()[shard as usize];
    store.append_wait(b"victim", Expected::Any, vec![ev("Opened", None, "v1"), ev("Opened", None, "v2")]).unwrap();
    let q = ShardQuery { after: before, ..Default::default() };
    let ids = |store: &Store| -> Vec<Vec<u8>> {
        store.query_shard(shard, &q, 100).unwrap().events.into_iter().map(|e| e.entity_id).collect()
    };
    assert_eq!(ids(&store), vec![b"victim".to_vec(), b"victim".to_vec()]);
    assert!(store.tail_span(shard).unwrap().0 <= before + 1, "read from memory");

    store.delete_wait(b"victim").unwrap();
    assert!(ids(&store).is_empty());
    for after in 0..=before + 2 {
        let page = store.query_shard(shard, &ShardQuery { after, ..Default::default() }, 100).unwrap();
        assert!(page.events.iter().all(|e| e.entity_id != b"victim"), "after {after}");
    }
    // Appends after the erasure are read from memory again.
    let mark = store.commit_positions()[shard as usize];
    let other = (1..).map(|i| format!("other-{i}")).find(|id| store.shard_for(id.as_bytes()) == shard).unwrap();
    store.append_wait(other.as_bytes(), Expected::Any, vec![ev("Opened", None, "o")]).unwrap();
    assert_eq!(store.tail_span(shard).unwrap().0, mark + 1);
    let page = store.query_shard(shard, &ShardQuery { after: mark, ..Default::default() }, 100).unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].payload, b"payload-o");
}
