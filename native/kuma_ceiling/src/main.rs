//! Raw SQLite write ceiling for Kuma's benchmarks.
//!
//! Writes `--events` rows of `--payload` bytes for `--entities` entities into `--shards`
//! SQLite files (WAL), with `--threads` threads each owning a slice of the shards, in
//! transactions of `--batch` rows. No BEAM, no hashing, no encryption: this is what SQLite
//! alone achieves on this machine, and Kuma reports its own throughput as a ratio of it.
//!
//! Layouts (`--layout`):
//! - `plain`: one append-only table keyed by position, no secondary index (the baseline ceiling (docs/baselines.md)).
//! - `naive`: the same plus `UNIQUE(entity TEXT, seq)`, the obvious per-entity index.
//! - `runs`: interned integer entity ids and a `runs` index with one row per (entity,
//!   transaction) instead of one per event.
//! - `eager-heads`: Kuma's back-pointer layout, but entity heads updated in every transaction.
//! - `kuma`: Kuma's real schema (`kuma_core::shard::SCHEMA`) and insert pattern: back-pointers,
//!   a skip row every 64th event, heads checkpointed every 32,768 events. No hashing: the
//!   hash column gets a constant. This is the ceiling Kuma's benchmarks compare against.
//!
//! `runs` and `eager-heads` are kept so the layout study in docs/storage-format.md can be rerun.
//!
//! Patterns (`--pattern`): `entity` = each batch is `--batch` events of one entity (an
//! `append` of a list), and `--group K` batches share a transaction (default 1; Kuma's group
//! commit merges the appends queued at a shard the same way); `scatter` = each event of a
//! batch belongs to a random entity.
//!
//! Prints one line of JSON with the figures.

use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    Plain,
    Naive,
    Runs,
    EagerHeads,
    Kuma,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Pattern {
    Entity,
    Scatter,
}

struct Args {
    events: u64,
    entities: u64,
    shards: usize,
    threads: usize,
    batch: usize,
    group: usize,
    payload: usize,
    full_sync: bool,
    layout: Layout,
    pattern: Pattern,
    indexes: bool,
    dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        events: 1_000_000,
        entities: 10_000,
        shards: 16,
        threads: 2,
        batch: 100,
        group: 1,
        payload: 200,
        full_sync: false,
        layout: Layout::Plain,
        pattern: Pattern::Entity,
        indexes: true,
        dir: std::env::temp_dir().join(format!("kuma_ceiling_{}", std::process::id())),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let key = argv[i].as_str();
        let val = argv.get(i + 1).ok_or_else(|| format!("{key} needs a value"))?;
        let num = || val.parse::<u64>().map_err(|e| format!("{key}: {e}"));
        match key {
            "--events" => a.events = num()?,
            "--entities" => a.entities = num()?.max(1),
            "--shards" => a.shards = num()?.max(1) as usize,
            "--threads" => a.threads = num()?.max(1) as usize,
            "--batch" => a.batch = num()?.max(1) as usize,
            "--group" => a.group = num()?.max(1) as usize,
            "--payload" => a.payload = num()? as usize,
            "--sync" => {
                a.full_sync = match val.as_str() {
                    "normal" => false,
                    "full" => true,
                    other => return Err(format!("--sync: normal or full, not {other}")),
                }
            }
            "--layout" => {
                a.layout = match val.as_str() {
                    "plain" => Layout::Plain,
                    "naive" => Layout::Naive,
                    "runs" => Layout::Runs,
                    "eager-heads" => Layout::EagerHeads,
                    "kuma" => Layout::Kuma,
                    other => return Err(format!("--layout: plain, naive, runs, eager-heads or kuma, not {other}")),
                }
            }
            "--pattern" => {
                a.pattern = match val.as_str() {
                    "entity" => Pattern::Entity,
                    "scatter" => Pattern::Scatter,
                    other => return Err(format!("--pattern: entity or scatter, not {other}")),
                }
            }
            "--dir" => a.dir = PathBuf::from(val),
            "--indexes" => a.indexes = val != "0",
            other => return Err(format!("unknown option {other}")),
        }
        i += 2;
    }
    Ok(a)
}

/// xorshift64*: a tiny deterministic generator so runs are repeatable without a rand crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn open(path: &Path, a: &Args) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", if a.full_sync { "FULL" } else { "NORMAL" })?;
    match a.layout {
        Layout::Plain => c.execute_batch(
            "CREATE TABLE events(pos INTEGER PRIMARY KEY, entity TEXT NOT NULL, seq INTEGER NOT NULL,
               type TEXT NOT NULL, ts INTEGER NOT NULL, payload BLOB NOT NULL);",
        )?,
        Layout::Naive => c.execute_batch(
            "CREATE TABLE events(pos INTEGER PRIMARY KEY, entity TEXT NOT NULL, seq INTEGER NOT NULL,
               type TEXT NOT NULL, ts INTEGER NOT NULL, payload BLOB NOT NULL, UNIQUE(entity, seq));",
        )?,
        Layout::Runs => c.execute_batch(
            "CREATE TABLE entities(eid INTEGER PRIMARY KEY, entity_id BLOB NOT NULL UNIQUE);
             CREATE TABLE events(pos INTEGER PRIMARY KEY, eid INTEGER NOT NULL, seq INTEGER NOT NULL,
               ts INTEGER NOT NULL, type TEXT NOT NULL, meta BLOB, payload BLOB NOT NULL, hash BLOB NOT NULL);
             CREATE TABLE runs(eid INTEGER NOT NULL, first_seq INTEGER NOT NULL, first_pos INTEGER NOT NULL,
               count INTEGER NOT NULL, PRIMARY KEY(eid, first_seq)) WITHOUT ROWID;",
        )?,
        Layout::EagerHeads => c.execute_batch(kuma_core::shard::SCHEMA)?,
        // Kuma's shards also carry the query indexes (format 2); `--indexes 0` leaves them
        // out, to measure what they cost.
        Layout::Kuma => {
            c.execute_batch(kuma_core::shard::SCHEMA)?;
            if a.indexes {
                c.execute_batch(kuma_core::shard::QUERY_INDEXES)?;
            }
        }
    }
    Ok(c)
}

/// One unit of work: `batch` events, each (entity number, seq).
type Txn = Vec<(u64, u64)>;

fn plan(a: &Args) -> Vec<Vec<(usize, Txn)>> {
    let shard_of = |e: u64| (e % a.shards as u64) as usize;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seqs = vec![0u64; a.entities as usize];
    let mut per_thread: Vec<Vec<(usize, Txn)>> = vec![Vec::new(); a.threads];
    // Per shard, an open transaction being filled until it holds `batch` (scatter) or
    // `batch * group` (entity) events.
    let mut open_txn: Vec<Txn> = vec![Vec::new(); a.shards];
    let mut written = 0;
    while written < a.events {
        match a.pattern {
            Pattern::Entity => {
                let e = rng.next() % a.entities;
                let n = (a.batch as u64).min(a.events - written);
                let s = shard_of(e);
                for _ in 0..n {
                    seqs[e as usize] += 1;
                    open_txn[s].push((e, seqs[e as usize]));
                }
                // `--group` appends share one transaction, as Kuma's group commit does.
                if open_txn[s].len() >= a.batch * a.group {
                    per_thread[s % a.threads].push((s, std::mem::take(&mut open_txn[s])));
                }
                written += n;
            }
            Pattern::Scatter => {
                let e = rng.next() % a.entities;
                seqs[e as usize] += 1;
                let s = shard_of(e);
                open_txn[s].push((e, seqs[e as usize]));
                if open_txn[s].len() == a.batch {
                    per_thread[s % a.threads].push((s, std::mem::take(&mut open_txn[s])));
                }
                written += 1;
            }
        }
    }
    for (s, txn) in open_txn.into_iter().enumerate() {
        if !txn.is_empty() {
            per_thread[s % a.threads].push((s, txn));
        }
    }
    per_thread
}

/// A shard owned by one thread: its connection, next position, and (kuma layout) the heads
/// changed since the last checkpoint.
struct ShardConn {
    shard: usize,
    conn: Connection,
    next_pos: u64,
    dirty: HashMap<u64, (u64, u64)>,
    since_checkpoint: u64,
}

fn run_thread(a: &Args, conns: &mut [ShardConn], work: &[(usize, Txn)]) -> rusqlite::Result<u64> {
    let payload = vec![0x5Au8; a.payload];
    let hash = [7u8; 32];
    let mut n = 0;
    for (shard, txn) in work {
        let sc = conns.iter_mut().find(|c| c.shard == *shard).expect("owned shard");
        let (next_pos, dirty, since_checkpoint) = (&mut sc.next_pos, &mut sc.dirty, &mut sc.since_checkpoint);
        let tx = sc.conn.transaction()?;
        {
            match a.layout {
                Layout::Plain | Layout::Naive => {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO events(pos, entity, seq, type, ts, payload) VALUES (?1, ?2, ?3, 'Deposited', ?4, ?5)",
                    )?;
                    for (e, seq) in txn {
                        *next_pos += 1;
                        st.execute(params![*next_pos as i64, format!("user_{e}"), *seq as i64, *seq as i64, &payload])?;
                    }
                }
                Layout::EagerHeads | Layout::Kuma => {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO events(pos, eid, seq, prev_pos, ts, type, meta, payload, hash)
                         VALUES (?1, ?2, ?3, ?4, ?5, 'Deposited', X'', ?6, ?7)",
                    )?;
                    let mut skip = tx.prepare_cached("INSERT INTO skips(eid, seq, pos, ts) VALUES (?1, ?2, ?3, ?4)")?;
                    let mut head = tx.prepare_cached(
                        "UPDATE entities SET head_seq = ?2, head_pos = ?3, head_hash = ?4 WHERE eid = ?1",
                    )?;
                    for (e, seq) in txn {
                        *next_pos += 1;
                        let prev_pos = dirty.get(e).map_or(0, |d| d.1);
                        st.execute(params![
                            *next_pos as i64,
                            *e as i64 + 1,
                            *seq as i64,
                            prev_pos as i64,
                            *seq as i64,
                            &payload,
                            &hash[..]
                        ])?;
                        if seq % kuma_core::shard::SKIP_EVERY == 0 {
                            skip.execute(params![*e as i64 + 1, *seq as i64, *next_pos as i64, *seq as i64])?;
                        }
                        dirty.insert(*e, (*seq, *next_pos));
                    }
                    // Eager: heads written in every transaction. Kuma: at a checkpoint every
                    // 32,768 events of the shard, like the real writer's default.
                    *since_checkpoint += txn.len() as u64;
                    if a.layout == Layout::EagerHeads {
                        let touched: std::collections::HashSet<u64> = txn.iter().map(|(e, _)| *e).collect();
                        for e in touched {
                            let (seq, pos) = dirty[&e];
                            head.execute(params![e as i64 + 1, seq as i64, pos as i64, &hash[..]])?;
                        }
                    } else if *since_checkpoint >= 32_768 {
                        for (e, (seq, pos)) in dirty.iter() {
                            head.execute(params![*e as i64 + 1, *seq as i64, *pos as i64, &hash[..]])?;
                        }
                        *since_checkpoint = 0;
                    }
                }
                Layout::Runs => {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO events(pos, eid, seq, ts, type, meta, payload, hash) VALUES (?1, ?2, ?3, ?4, 'Deposited', NULL, ?5, ?6)",
                    )?;
                    let mut run = tx
                        .prepare_cached("INSERT INTO runs(eid, first_seq, first_pos, count) VALUES (?1, ?2, ?3, ?4)")?;
                    // One runs row per (entity, transaction): consecutive events of an entity
                    // in the transaction are given consecutive positions.
                    let mut i = 0;
                    while i < txn.len() {
                        let (e, first_seq) = txn[i];
                        let mut j = i;
                        while j < txn.len() && txn[j].0 == e {
                            *next_pos += 1;
                            st.execute(params![
                                *next_pos as i64,
                                e as i64 + 1,
                                txn[j].1 as i64,
                                txn[j].1 as i64,
                                &payload,
                                &hash[..]
                            ])?;
                            j += 1;
                        }
                        run.execute(params![
                            e as i64 + 1,
                            first_seq as i64,
                            (*next_pos - (j - i) as u64 + 1) as i64,
                            (j - i) as i64
                        ])?;
                        i = j;
                    }
                }
            }
        }
        tx.commit()?;
        n += txn.len() as u64;
    }
    Ok(n)
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kuma_ceiling: {e}");
            std::process::exit(2);
        }
    };
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::create_dir_all(&a.dir).expect("create --dir");
    let work = plan(&a);
    let mut thread_conns: Vec<Vec<ShardConn>> = (0..a.threads).map(|_| Vec::new()).collect();
    for s in 0..a.shards {
        let c = open(&a.dir.join(format!("shard_{s:03}.db")), &a).expect("open shard");
        if a.layout != Layout::Plain && a.layout != Layout::Naive {
            let tx = c.unchecked_transaction().expect("tx");
            for e in (s as u64..a.entities).step_by(a.shards) {
                let id = format!("user_{e}");
                if a.layout == Layout::Runs {
                    tx.execute("INSERT INTO entities(eid, entity_id) VALUES (?1, ?2)", params![e as i64 + 1, id])
                } else {
                    // Kuma's entities are found by a keyed hash of the id and keep the id
                    // sealed (40 bytes more than the id): the same sizes, no crypto here.
                    let idx = blake3::hash(id.as_bytes());
                    let sealed = [id.as_bytes(), &[0u8; 40]].concat();
                    tx.execute(
                        "INSERT INTO entities(eid, idx, id_sealed, head_seq, head_pos, head_ts, head_hash)
                         VALUES (?1, ?2, ?3, 0, 0, 0, X'')",
                        params![e as i64 + 1, &idx.as_bytes()[..], sealed],
                    )
                }
                .expect("intern");
            }
            tx.commit().expect("commit");
        }
        thread_conns[s % a.threads].push(ShardConn {
            shard: s,
            conn: c,
            next_pos: 0,
            dirty: HashMap::new(),
            since_checkpoint: 0,
        });
    }
    let start = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = thread_conns
            .iter_mut()
            .zip(work.iter())
            .map(|(conns, w)| {
                let a = &a;
                scope.spawn(move || run_thread(a, conns, w).expect("insert"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    drop(thread_conns);
    let _ = std::fs::remove_dir_all(&a.dir);
    println!(
        "{{\"events\":{total},\"seconds\":{secs:.3},\"events_per_sec\":{:.0},\"layout\":\"{:?}\",\"pattern\":\"{:?}\",\"batch\":{},\"group\":{},\"shards\":{},\"threads\":{},\"sync\":\"{}\",\"sqlite\":\"{}\"}}",
        total as f64 / secs,
        a.layout,
        a.pattern,
        a.batch,
        a.group,
        a.shards,
        a.threads,
        if a.full_sync { "full" } else { "normal" },
        rusqlite::version()
    );
}
