//! Queries across entities and the commit feed, through the core's public API.

use kuma_core::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

fn open(dir: &Path, shards: u32) -> Store {
    let mut c = StoreConfig::new(dir);
    c.shards = shards;
    Store::open(c).expect("open store")
}

fn typed(t: &str, scope: Option<&str>, i: u64) -> NewEvent {
    let e = NewEvent::new(t, vec![], format!("{t}-{i}").into_bytes());
    match scope {
        Some(s) => e.with_scope(s),
        None => e,
    }
}

/// Every event of every shard that `q` matches, read in pages of `page` with the
/// returned search position as the next `after`.
fn query_all(store: &Store, q: &ShardQuery, page: usize) -> Vec<StoredEvent> {
    let mut out = Vec::new();
    for shard in 0..store.shard_count() {
        let mut q = q.clone();
        loop {
            let Page { events, searched, .. } = store.query_shard(shard, &q, page).unwrap();
            assert!(events.iter().all(|e| e.position > q.after && e.position <= searched));
            let done = events.len() < page;
            out.extend(events);
            q.after = searched;
            if done {
                break;
            }
        }
    }
    out
}

#[test]
fn queries_filter_by_type_scope_id_prefix_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3);
    let scopes = [Some("org:acme/team:1"), Some("org:acme/team:2"), Some("org:acmex"), None];
    for i in 0..120u64 {
        let id = format!("{}-{}", if i % 2 == 0 { "user" } else { "order" }, i % 10);
        let t = if i % 3 == 0 { "Created" } else { "Renamed" };
        store.append_wait(id.as_bytes(), Expected::Any, vec![typed(t, scopes[(i % 4) as usize], i)]).unwrap();
    }
    let all = query_all(&store, &ShardQuery::default(), 7);
    assert_eq!(all.len(), 120);

    let created = query_all(&store, &ShardQuery { types: vec!["Created".into()], ..Default::default() }, 5);
    assert_eq!(created.len(), 40);
    assert!(created.iter().all(|e| e.event_type == "Created"));

    let acme = ShardQuery { scope: Some(ScopeMatch::Prefix("org:acme/".into())), ..Default::default() };
    let acme = query_all(&store, &acme, 4);
    assert_eq!(acme.len(), 60, "team:1 and team:2, not org:acmex nor unscoped");
    let exact = ShardQuery { scope: Some(ScopeMatch::Exact("org:acmex".into())), ..Default::default() };
    assert_eq!(query_all(&store, &exact, 100).len(), 30);

    let users = ShardQuery { id_prefix: Some(b"user-".to_vec()), types: vec!["Created".into()], ..Default::default() };
    let users = query_all(&store, &users, 3);
    assert_eq!(users.len(), 20);
    assert!(users.iter().all(|e| e.entity_id.starts_with(b"user-") && e.event_type == "Created"));

    // One entity, exactly: not "user-1" as a prefix of "user-10".
    let one = ShardQuery { entity_id: Some(b"user-2".to_vec()), ..Default::default() };
    let one = query_all(&store, &one, 2);
    assert_eq!(one.len(), 12);
    assert!(one.iter().all(|e| e.entity_id == b"user-2"));
    // Every event says which shard it came from, the shard its entity is placed in.
    assert!(all.iter().all(|e| e.shard == store.shard_for(&e.entity_id)));

    let mid = all.iter().map(|e| e.timestamp_us).max().unwrap();
    let until = ShardQuery { to_ts: Some(mid - 1), ..Default::default() };
    assert!(query_all(&store, &until, 50).len() < 120);
    let from = ShardQuery { from_ts: Some(mid), ..Default::default() };
    assert!(!query_all(&store, &from, 50).is_empty());

    // Paging returned each event once, in position order per shard.
    let mut seen: HashMap<(Vec<u8>, u64), u32> = HashMap::new();
    for e in &all {
        *seen.entry((e.entity_id.clone(), e.seq)).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1));

    let too_many = ShardQuery { types: vec!["t".into(); 65], ..Default::default() };
    assert!(matches!(store.query_shard(0, &too_many, 1), Err(Error::TooLarge { what: "types", .. })));
    assert!(matches!(store.query_shard(9, &ShardQuery::default(), 1), Err(Error::Invalid { what: "shard", .. })));
}

#[test]
fn the_search_position_passes_events_that_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1);
    for i in 0..10 {
        store.append_wait(b"a", Expected::Any, vec![typed("Other", None, i)]).unwrap();
    }
    let q = ShardQuery { types: vec!["Wanted".into()], ..Default::default() };
    let Page { events, searched, .. } = store.query_shard(0, &q, 100).unwrap();
    assert!(events.is_empty());
    assert_eq!(searched, 10, "a filtered reader still moves past what it searched");
    store.append_wait(b"a", Expected::Any, vec![typed("Wanted", None, 11)]).unwrap();
    let Page { events, searched, .. } = store.query_shard(0, &ShardQuery { after: 10, ..q }, 100).unwrap();
    assert_eq!((events.len(), searched), (1, 11));
}

#[test]
fn the_commit_listener_hears_every_commit_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), 2));
    store.append_wait(b"before", Expected::Any, vec![typed("T", None, 0)]).unwrap();
    let start = store.commit_positions();
    assert_eq!(start.iter().sum::<u64>(), 1);
    let heard: Arc<Mutex<Vec<(u32, u64)>>> = Arc::default();
    let h = heard.clone();
    store.set_commit_listener(Some(Arc::new(move |shard, pos, _| h.lock().unwrap().push((shard, pos)))), false);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let id = format!("e{w}-{}", i % 5);
                    let a = store.append_wait(id.as_bytes(), Expected::Any, vec![typed("T", None, i)]).unwrap();
                    // What a caller was told is committed is already in the positions.
                    let shard = store.shard_for(id.as_bytes()) as usize;
                    assert!(store.commit_positions()[shard] >= a.last_pos);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let heard = heard.lock().unwrap().clone();
    let positions = store.commit_positions();
    assert_eq!(positions.iter().sum::<u64>(), 201);
    for shard in 0..2u32 {
        let mine: Vec<u64> = heard.iter().filter(|(s, _)| *s == shard).map(|(_, p)| *p).collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "commits are told in order");
        if positions[shard as usize] > start[shard as usize] {
            assert_eq!(mine.last().copied(), Some(positions[shard as usize]));
        }
    }
    // Once told, the events are readable.
    for (shard, pos) in heard {
        let Page { events, searched, .. } =
            store.query_shard(shard, &ShardQuery { after: pos - 1, ..Default::default() }, 1).unwrap();
        assert_eq!(events.len(), 1);
        assert!(searched >= pos);
    }
    store.set_commit_listener(None, false);
}

/// (shard, last position, entities told) of every commit heard.
type Heard = Arc<Mutex<Vec<(u32, u64, Option<Vec<CommittedEntity>>)>>>;

#[test]
fn a_listener_that_asks_for_details_hears_each_entity_with_its_first_and_previous_position() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), 1));
    let heard: Heard = Arc::default();
    let h = heard.clone();
    store.set_commit_listener(
        Some(Arc::new(move |shard, pos, entities| h.lock().unwrap().push((shard, pos, entities.map(<[_]>::to_vec))))),
        true,
    );
    let a1 = store.append_wait(b"a", Expected::Any, vec![typed("T", None, 1), typed("T", None, 2)]).unwrap();
    let b1 = store.append_wait(b"b", Expected::Any, vec![typed("T", None, 3)]).unwrap();
    let a2 = store.append_wait(b"a", Expected::Any, vec![typed("T", None, 4)]).unwrap();
    let told = |id: &[u8], first_pos, prev_pos| CommittedEntity { entity_id: id.to_vec(), first_pos, prev_pos };
    let got = heard.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (0, 2, Some(vec![told(b"a", a1.first_pos, 0)])),
            (0, 3, Some(vec![told(b"b", b1.first_pos, 0)])),
            (0, 4, Some(vec![told(b"a", a2.first_pos, a1.last_pos)])),
        ]
    );

    // Several appends in one group commit (one batch to one shard): each entity once, with
    // its first event in the commit.
    heard.lock().unwrap().clear();
    let entries = vec![
        AppendEntry { entity_id: b"a".to_vec(), expected: Expected::Any, events: vec![typed("T", None, 5)] },
        AppendEntry { entity_id: b"c".to_vec(), expected: Expected::Any, events: vec![typed("T", None, 6)] },
        AppendEntry { entity_id: b"a".to_vec(), expected: Expected::Any, events: vec![typed("T", None, 7)] },
    ];
    let results = store.append_batch_wait(entries).unwrap();
    let firsts: Vec<u64> = results.iter().map(|r| r.as_ref().unwrap().first_pos).collect();
    let got = heard.lock().unwrap().clone();
    assert_eq!(got, vec![(0, 7, Some(vec![told(b"a", firsts[0], a2.last_pos), told(b"c", firsts[1], 0)]))]);

    // Without details asked for: none given.
    heard.lock().unwrap().clear();
    let h = heard.clone();
    store.set_commit_listener(
        Some(Arc::new(move |shard, pos, entities| h.lock().unwrap().push((shard, pos, entities.map(<[_]>::to_vec))))),
        false,
    );
    store.append_wait(b"a", Expected::Any, vec![typed("T", None, 8)]).unwrap();
    assert_eq!(heard.lock().unwrap().clone(), vec![(0, 8, None)]);
    store.set_commit_listener(None, false);
}
