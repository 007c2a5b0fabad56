//! The store-wide order (single node): one gapless sequence of "global positions" over the
//! events of every shard, in the order their commits completed.
//!
//! Shards commit independently, so a global number cannot be written into the event rows
//! (it would have to be chosen before the commit, and a failed commit would leave a gap).
//! Instead every writer, right after a commit that wrote events and before it answers
//! anyone, hands `(shard, first position, last position)` to the sequencer; the sequencer
//! thread numbers those ranges in the order it receives them and records them in
//! `order.kuma` (table `ranges`), many per transaction. Only once a range is committed
//! there does the *watermark* (the last global position readers may see) move past it, so
//! no reader ever sees N+1 before N is recorded, and a number once seen never changes.
//!
//! Invariants
//! - Ranges are contiguous: each starts where the one before ended (`first` = previous
//!   `first + count`), so global positions have no gaps. An erased event keeps its number
//!   (its range still covers its shard position); readers skip it.
//! - A write acknowledged before another began has the smaller number: the writer sends
//!   its range before it answers.
//! - After a crash, shard commits that never reached `order.kuma` are numbered at the next
//!   open, before any new write (`recover`), shard by shard. A shard that lost committed
//!   events (`sync: :normal` and a power loss) has its ranges cut back to what it holds;
//!   their numbers then stay unused (the only way a hole appears).

use crate::error::{Error, Result};
use crate::sqlite::{self, SyncMode};
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ranges (
  first INTEGER PRIMARY KEY,   -- global position of the range's first event
  shard INTEGER NOT NULL,
  pos   INTEGER NOT NULL,      -- shard position of that event
  count INTEGER NOT NULL       -- events (shard positions pos .. pos + count - 1)
);
CREATE INDEX IF NOT EXISTS ranges_by_shard ON ranges(shard, pos);
";

/// A run of one shard's positions, as one commit wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Global position of its first event.
    pub first: u64,
    pub shard: u32,
    /// Shard position of its first event.
    pub pos: u64,
    pub count: u64,
}

/// How long the sequencer waits after the first range of a batch for others to join it.
const GATHER: std::time::Duration = std::time::Duration::from_micros(500);

/// Told the new watermark after each recorded batch (runs on the sequencer thread).
pub type OrderListener = Arc<dyn Fn(u64) + Send + Sync>;

/// The sequencer: its file, the watermark, and the thread that numbers ranges.
pub struct Order {
    conn: Arc<Mutex<Connection>>,
    watermark: Arc<AtomicU64>,
    next: u64,
    listener: Arc<RwLock<Option<OrderListener>>>,
    sender: Mutex<Option<Sender<(u32, u64, u64)>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Order {
    /// Opens (or creates) `order.kuma` in `dir`.
    pub fn open(dir: &Path, sync: SyncMode, mode: u32) -> Result<Order> {
        let path = dir.join("order.kuma");
        let conn = sqlite::open_writer(&path, Some(mode), "open order log")?;
        sqlite::configure(&conn, sync)?;
        conn.execute_batch(SCHEMA).map_err(Error::storage("create order log"))?;
        let next: u64 = conn
            .query_row("SELECT coalesce(max(first + count), 1) FROM ranges", [], |r| r.get::<_, i64>(0))
            .map_err(Error::storage("read order log"))? as u64;
        Ok(Order {
            conn: Arc::new(Mutex::new(conn)),
            watermark: Arc::new(AtomicU64::new(next - 1)),
            next,
            listener: Arc::default(),
            sender: Mutex::new(None),
            thread: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the log level with the shards (`last[shard]`: each shard's last committed
    /// position), before any new write: ranges past what a shard holds are cut back, and
    /// positions a shard committed that the log lacks are numbered.
    pub fn recover(&mut self, last: &[u64]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(Error::storage("recover order log"))?;
        let mut next = self.next;
        for (shard, &last_pos) in last.iter().enumerate() {
            tx.execute("DELETE FROM ranges WHERE shard = ?1 AND pos > ?2", params![shard as i64, last_pos as i64])
                .map_err(Error::storage("recover order log"))?;
            tx.execute(
                "UPDATE ranges SET count = ?2 - pos + 1 WHERE shard = ?1 AND pos + count - 1 > ?2",
                params![shard as i64, last_pos as i64],
            )
            .map_err(Error::storage("recover order log"))?;
            let covered: u64 = tx
                .query_row(
                    "SELECT coalesce(max(pos + count - 1), 0) FROM ranges WHERE shard = ?1",
                    [shard as i64],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(Error::storage("recover order log"))? as u64;
            if last_pos > covered {
                let count = last_pos - covered;
                tx.execute(
                    "INSERT INTO ranges(first, shard, pos, count) VALUES (?1, ?2, ?3, ?4)",
                    params![next as i64, shard as i64, (covered + 1) as i64, count as i64],
                )
                .map_err(Error::storage("recover order log"))?;
                next += count;
            }
        }
        tx.commit().map_err(Error::storage("recover order log"))?;
        drop(conn);
        self.next = next;
        self.watermark.store(next - 1, Ordering::Release);
        Ok(())
    }

    /// Starts the sequencer thread; what it returns is what writers send
    /// `(shard, first position, last position)` to after each commit that wrote events.
    pub fn start(&self) -> Result<Sender<(u32, u64, u64)>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (conn, watermark, listener, next) =
            (self.conn.clone(), self.watermark.clone(), self.listener.clone(), self.next);
        let handle = std::thread::Builder::new()
            .name("kuma-sequencer".into())
            .spawn(move || sequence(rx, conn, watermark, listener, next))
            .map_err(Error::io("start sequencer"))?;
        *self.sender.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(tx)
    }

    /// The last global position recorded (readers see up to here).
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Sets (or removes) the function told each new watermark.
    pub fn set_listener(&self, listener: Option<OrderListener>) {
        *self.listener.write().unwrap_or_else(|p| p.into_inner()) = listener;
    }

    /// Up to `max` ranges holding global positions after `after`, up to the watermark, in
    /// order (the first may begin before `after + 1`).
    pub fn ranges_after(&self, after: u64, max: usize) -> Result<Vec<Range>> {
        let conn = self.lock();
        let mut st = conn
            .prepare_cached(
                "SELECT first, shard, pos, count FROM ranges
                 WHERE first >= (SELECT coalesce(max(first), 0) FROM ranges WHERE first <= ?1)
                   AND first + count - 1 > ?1 AND first <= ?2
                 ORDER BY first LIMIT ?3",
            )
            .map_err(Error::storage("read order log"))?;
        let rows = st
            .query_map(params![after as i64, self.watermark() as i64, max as i64], |r| {
                Ok(Range {
                    first: r.get::<_, i64>(0)? as u64,
                    shard: r.get::<_, i64>(1)? as u32,
                    pos: r.get::<_, i64>(2)? as u64,
                    count: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(Error::storage("read order log"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::storage("read order log"))
    }

    /// The global position of a shard's event, if the log has numbered it.
    pub fn global_of(&self, shard: u32, pos: u64) -> Result<Option<u64>> {
        let conn = self.lock();
        let global = conn
            .prepare_cached("SELECT first + (?2 - pos) FROM ranges WHERE shard = ?1 AND pos <= ?2 AND pos + count > ?2")
            .map_err(Error::storage("read order log"))?
            .query_row(params![shard as i64, pos as i64], |r| r.get::<_, i64>(0))
            .optional()
            .map_err(Error::storage("read order log"))?;
        Ok(global.map(|g| g as u64).filter(|g| *g <= self.watermark()))
    }

    /// Stops the sequencer once it has recorded everything sent to it (the writers have
    /// stopped first), and closes the file.
    pub fn close(&self) {
        drop(self.sender.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(handle) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
        let mut conn = self.lock();
        let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        if let Ok(closed) = Connection::open_in_memory() {
            drop(std::mem::replace(&mut *conn, closed));
        }
    }
}

/// The sequencer thread: takes every range queued, numbers them in arrival order, records
/// them in one transaction, then moves the watermark and tells the listener. A failed
/// transaction (a full disk) is retried with the same numbers until it succeeds: numbers
/// are handed out only by committing them.
fn sequence(
    rx: Receiver<(u32, u64, u64)>,
    conn: Arc<Mutex<Connection>>,
    watermark: Arc<AtomicU64>,
    listener: Arc<RwLock<Option<OrderListener>>>,
    mut next: u64,
) {
    while let Ok(first) = rx.recv() {
        // A moment for more commits to arrive: one transaction records them all (under
        // single-event writes a commit every few tens of microseconds, else each would
        // get its own).
        std::thread::sleep(GATHER);
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let ranges: Vec<Range> = batch
            .into_iter()
            .map(|(shard, from, to)| {
                let r = Range { first: next, shard, pos: from, count: to - from + 1 };
                next += r.count;
                r
            })
            .collect();
        let mut delay = std::time::Duration::from_millis(1);
        // Nothing is visible until recorded; readers wait, writers go on.
        while record(&conn, &ranges).is_err() {
            std::thread::sleep(delay);
            delay = (delay * 2).min(std::time::Duration::from_secs(1));
        }
        let last = next - 1;
        watermark.store(last, Ordering::Release);
        let listener = listener.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(listener) = listener {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener(last)));
        }
    }
}

fn record(conn: &Mutex<Connection>, ranges: &[Range]) -> Result<()> {
    let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    let tx = conn.transaction().map_err(Error::storage("record order"))?;
    {
        let mut insert = tx
            .prepare_cached("INSERT OR REPLACE INTO ranges(first, shard, pos, count) VALUES (?1, ?2, ?3, ?4)")
            .map_err(Error::storage("record order"))?;
        for r in ranges {
            insert
                .execute(params![r.first as i64, r.shard as i64, r.pos as i64, r.count as i64])
                .map_err(Error::storage("record order"))?;
        }
    }
    tx.commit().map_err(Error::storage("record order"))
}
