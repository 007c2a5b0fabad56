//! The SQLite database of a read model: a plain SQLite file in WAL mode whose tables are
//! written by SQL the projection's author supplies, plus Kuma's own bookkeeping tables.
//!
//! One connection writes (the projection process is the only writer) and one reads, so
//! queries never wait for a projection's transaction and see only committed batches.
//! A batch of statements runs in one transaction: all of it is kept or none (this is how
//! a read model's rows and its checkpoint move together, see `Kuma.ReadModel`).

use crate::error::{Error, Result};
use crate::readers::Readers;
use crate::sqlite::{self, SyncMode};
pub use rusqlite::types::Value;
use rusqlite::types::ValueRef;
use rusqlite::Connection;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One SQL statement and its positional parameters (`?1`, `?2`, ... or `?`).
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Value>,
}

/// The rows a query returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// Most rows one query returns; a query that would return more fails (add a LIMIT).
pub const MAX_QUERY_ROWS: usize = 1_000_000;

/// An open read-model database.
pub struct SqlDb {
    write: Mutex<Option<Connection>>,
    /// Read-only connections, one per query running at a time.
    read: Readers,
}

fn sql_error(index: Option<usize>) -> impl FnOnce(rusqlite::Error) -> Error {
    move |e| Error::Sql { index, message: e.to_string() }
}

/// A wrong number of parameters, reported with both counts. `what`: "statement" or "query".
fn check_params(st: &rusqlite::Statement, given: usize, index: Option<usize>, what: &str) -> Result<()> {
    if st.parameter_count() == given {
        return Ok(());
    }
    Err(Error::Sql {
        index,
        message: format!("the {what} takes {} parameters, {given} were given", st.parameter_count()),
    })
}

impl SqlDb {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, mode: u32) -> Result<SqlDb> {
        if let Some(parent) = path.parent() {
            sqlite::create_dirs(parent, mode, "create read model dir")?;
        }
        // NORMAL: a commit survives a crash of the VM; rows and checkpoint always agree.
        let write = sqlite::open_writer(path, Some(mode), "open read model")?;
        sqlite::configure(&write, SyncMode::Normal)?;
        write.pragma_update(None, "foreign_keys", "ON").map_err(Error::storage("open read model"))?;
        Ok(SqlDb { write: Mutex::new(Some(write)), read: Readers::new(path) })
    }

    fn with<T>(conn: &Mutex<Option<Connection>>, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_ref().ok_or(Error::Closed)?)
    }

    /// Runs `statements` in one transaction; returns the rows each changed. On the first
    /// failure everything is rolled back and the error names the failing statement.
    pub fn transaction(&self, statements: &[Statement]) -> Result<Vec<u64>> {
        Self::with(&self.write, |c| {
            c.execute_batch("BEGIN IMMEDIATE").map_err(Error::storage("begin read model transaction"))?;
            let run = || -> Result<Vec<u64>> {
                let mut changed = Vec::with_capacity(statements.len());
                for (i, s) in statements.iter().enumerate() {
                    let mut st = c.prepare_cached(&s.sql).map_err(sql_error(Some(i)))?;
                    check_params(&st, s.params.len(), Some(i), "statement")?;
                    let mut rows = st.query(rusqlite::params_from_iter(s.params.iter())).map_err(sql_error(Some(i)))?;
                    // Step through any rows (a RETURNING clause, a SELECT) so the statement completes.
                    while rows.next().map_err(sql_error(Some(i)))?.is_some() {}
                    drop(rows);
                    changed.push(c.changes());
                }
                Ok(changed)
            };
            match run() {
                Ok(changed) => {
                    c.execute_batch("COMMIT").map_err(Error::storage("commit read model transaction"))?;
                    Ok(changed)
                }
                Err(e) => {
                    let _ = c.execute_batch("ROLLBACK");
                    Err(e)
                }
            }
        })
    }

    /// Runs a query on a read-only connection (no statement can write through it). A query
    /// still running after `timeout` is interrupted: `Err(Timeout)`, and nothing of it is
    /// kept, so that queries cannot hold the schedulers they run on.
    pub fn query(&self, sql: &str, params: &[Value], timeout: Duration) -> Result<Rows> {
        self.read.with(|c| {
            let deadline = Instant::now() + timeout;
            c.progress_handler(1_000, Some(move || Instant::now() >= deadline)).map_err(sql_error(None))?;
            let rows = Self::run_query(c, sql, params);
            c.progress_handler(1_000, None::<fn() -> bool>).map_err(sql_error(None))?;
            match rows {
                Err(Error::Sql { .. }) if Instant::now() >= deadline => Err(Error::Timeout),
                rows => rows,
            }
        })
    }

    fn run_query(c: &Connection, sql: &str, params: &[Value]) -> Result<Rows> {
        {
            let mut st = c.prepare_cached(sql).map_err(sql_error(None))?;
            check_params(&st, params.len(), None, "query")?;
            let columns: Vec<String> = st.column_names().map(String::from).collect();
            let width = columns.len();
            let mut rows = st.query(rusqlite::params_from_iter(params.iter())).map_err(sql_error(None))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql_error(None))? {
                if out.len() == MAX_QUERY_ROWS {
                    return Err(Error::TooLarge {
                        what: "rows",
                        size: MAX_QUERY_ROWS as u64 + 1,
                        max: MAX_QUERY_ROWS as u64,
                    });
                }
                let mut row = Vec::with_capacity(width);
                for i in 0..width {
                    row.push(match r.get_ref(i).map_err(sql_error(None))? {
                        ValueRef::Null => Value::Null,
                        ValueRef::Integer(n) => Value::Integer(n),
                        ValueRef::Real(x) => Value::Real(x),
                        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                    });
                }
                out.push(row);
            }
            Ok(Rows { columns, rows: out })
        }
    }

    /// Moves every committed page into the main file and empties the WAL (after an
    /// erasure, so no old page image of forgotten rows stays in `-wal`).
    pub fn truncate_wal(&self) -> Result<()> {
        Self::with(&self.write, |c| sqlite::truncate_wal(c, "read model WAL truncate"))
    }

    /// Closes every connection; later calls return `Closed`.
    pub fn close(&self) {
        self.read.close();
        drop(self.write.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(sql: &str, params: Vec<Value>) -> Statement {
        Statement { sql: sql.into(), params }
    }

    #[test]
    fn a_failing_statement_keeps_nothing_of_its_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqlDb::open(&dir.path().join("rm.sqlite"), 0o600).unwrap();
        db.transaction(&[st("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)", vec![])]).unwrap();
        let changed = db
            .transaction(&[
                st("INSERT INTO t VALUES (?1, ?2)", vec![Value::Integer(1), Value::Text("a".into())]),
                st("INSERT INTO t VALUES (?, ?)", vec![Value::Integer(2), Value::Null]),
            ])
            .unwrap();
        assert_eq!(changed, vec![1, 1]);
        let err = db
            .transaction(&[st("INSERT INTO t VALUES (3, 'c')", vec![]), st("INSERT INTO nowhere VALUES (1)", vec![])])
            .unwrap_err();
        assert!(matches!(err, Error::Sql { index: Some(1), ref message } if message.contains("nowhere")), "{err}");
        let err = db.transaction(&[st("INSERT INTO t VALUES (?1, ?2)", vec![Value::Integer(9)])]).unwrap_err();
        assert!(matches!(err, Error::Sql { index: Some(0), .. }));
        let rows = db
            .query("SELECT id, name FROM t WHERE id > ? ORDER BY id", &[Value::Integer(0)], Duration::from_secs(5))
            .unwrap();
        assert_eq!(rows.columns, vec!["id", "name"]);
        assert_eq!(
            rows.rows,
            vec![vec![Value::Integer(1), Value::Text("a".into())], vec![Value::Integer(2), Value::Null]]
        );
        assert!(
            matches!(db.query("DELETE FROM t", &[], Duration::from_secs(5)), Err(Error::Sql { .. })),
            "the read connection cannot write"
        );
        assert!(matches!(db.query("SELEC 1", &[], Duration::from_secs(5)), Err(Error::Sql { index: None, .. })));
        // Read-only for good: a pragma cannot turn it back.
        let err = db
            .query("PRAGMA query_only = 0", &[], Duration::from_secs(5))
            .and_then(|_| db.query("DELETE FROM t RETURNING id", &[], Duration::from_secs(5)));
        assert!(matches!(err, Err(Error::Sql { .. })), "{err:?}");
        // A query that never ends is interrupted at its deadline.
        let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n";
        let started = std::time::Instant::now();
        assert!(matches!(db.query(endless, &[], Duration::from_millis(100)), Err(Error::Timeout)));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            db.query("SELECT count(*) FROM t", &[], Duration::from_secs(5)).unwrap().rows,
            vec![vec![Value::Integer(2)]]
        );
        db.close();
        assert!(matches!(db.query("SELECT 1", &[], Duration::from_secs(5)), Err(Error::Closed)));
    }
}
