//! How fast a shard reads back in position order (catch-up), with and without encryption:
//! `cargo run --release --example read_speed`. Figures: docs/benchmarks.md, "PROJ".
use kuma_core::*;
use std::time::Instant;

fn main() {
    for encrypted in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = StoreConfig::new(dir.path());
        c.shards = 1;
        if encrypted {
            c.master_key = Some(Key::random().unwrap());
        }
        let store = Store::open(c).unwrap();
        let payload = vec![b'x'; 200];
        let entries: Vec<AppendEntry> = (0..2_000)
            .map(|i| AppendEntry {
                entity_id: format!("user_{}", i % 1000).into_bytes(),
                expected: Expected::Any,
                events: (0..100).map(|_| NewEvent::new("deposited", vec![], payload.clone())).collect(),
            })
            .collect();
        for chunk in entries.chunks(100) {
            for r in store.append_batch_wait(chunk.to_vec()).unwrap() {
                r.unwrap();
            }
        }
        let total = 200_000u64;
        for round in 0..2 {
            let t = Instant::now();
            let (mut after, mut n) = (0, 0u64);
            loop {
                let Page { events, searched, .. } =
                    store.query_shard(0, &ShardQuery { after, ..Default::default() }, 2_000).unwrap();
                if events.is_empty() {
                    break;
                }
                n += events.len() as u64;
                after = searched;
            }
            assert_eq!(n, total);
            let secs = t.elapsed().as_secs_f64();
            println!(
                "encrypted={encrypted} round {round}: {:.0} ev/s ({:.2} us/event)",
                n as f64 / secs,
                secs * 1e6 / n as f64
            );
        }
    }
}
