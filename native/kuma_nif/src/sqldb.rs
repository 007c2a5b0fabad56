//! A read model's SQLite database (`Kuma.ReadModel`): transactions of the projection's
//! statements, queries on a read-only connection. Values: integers, floats, binaries (TEXT
//! when valid UTF-8, else BLOB), `{:blob, binary}`, `nil`, booleans (1/0).

use crate::atoms;
use crate::error::{guard, NifResult};
use crate::term::bin;
use kuma_core::sqldb::{SqlDb, Statement, Value};
use kuma_core::Error;
use rustler::types::binary::Binary;
use rustler::{Encoder, Env, ResourceArc, Term};

/// A read model's database, as held by Elixir.
pub struct SqlDbResource {
    db: SqlDb,
}

#[rustler::resource_impl]
impl rustler::Resource for SqlDbResource {}

/// Parameters: integers, floats, binaries (TEXT when valid UTF-8, else BLOB), `{:blob, b}`,
/// `nil`, `true`/`false` (1/0).
fn decode_value(term: Term) -> Result<Value, Error> {
    let bad = || Error::Invalid {
        what: "sql_params",
        why: "a parameter must be an integer (64-bit), float, binary, {:blob, binary}, nil or boolean".into(),
    };
    if let Ok(n) = term.decode::<i64>() {
        return Ok(Value::Integer(n));
    }
    if let Ok(x) = term.decode::<f64>() {
        return Ok(Value::Real(x));
    }
    if let Ok(b) = term.decode::<Binary>() {
        return Ok(match std::str::from_utf8(b.as_slice()) {
            Ok(text) => Value::Text(text.to_string()),
            Err(_) => Value::Blob(b.as_slice().to_vec()),
        });
    }
    if term.is_atom() {
        return match term.atom_to_string().map_err(|_| bad())?.as_str() {
            "nil" => Ok(Value::Null),
            "true" => Ok(Value::Integer(1)),
            "false" => Ok(Value::Integer(0)),
            _ => Err(bad()),
        };
    }
    if let Ok((tag, b)) = term.decode::<(rustler::Atom, Binary)>() {
        if tag == atoms::blob() {
            return Ok(Value::Blob(b.as_slice().to_vec()));
        }
    }
    Err(bad())
}

fn decode_params(term: Term) -> Result<Vec<Value>, Error> {
    let list: Vec<Term> =
        term.decode().map_err(|_| Error::Invalid { what: "sql_params", why: "must be a list".into() })?;
    list.into_iter().map(decode_value).collect()
}

fn encode_value<'a>(env: Env<'a>, v: &Value) -> Term<'a> {
    match v {
        Value::Null => atoms::nil().encode(env),
        Value::Integer(n) => n.encode(env),
        Value::Real(x) => x.encode(env),
        Value::Text(t) => t.as_str().encode(env),
        Value::Blob(b) => bin(env, b),
    }
}

#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_open(path: String, mode: u32) -> NifResult<ResourceArc<SqlDbResource>> {
    guard(|| Ok(ResourceArc::new(SqlDbResource { db: SqlDb::open(std::path::Path::new(&path), mode)? })))
}

/// Runs `[{sql, params}]` in one transaction: `{:ok, [changed]}` or `{:error, {:sql, index, msg}}`.
#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_transaction(db: ResourceArc<SqlDbResource>, statements: Term) -> NifResult<Vec<u64>> {
    guard(|| {
        let raw: Vec<(String, Term)> = statements
            .decode()
            .map_err(|_| Error::Invalid { what: "sql", why: "statements must be a list of {sql, params}".into() })?;
        let statements = raw
            .into_iter()
            .map(|(sql, params)| Ok(Statement { sql, params: decode_params(params)? }))
            .collect::<Result<Vec<_>, Error>>()?;
        db.db.transaction(&statements)
    })
}

/// `{:ok, {columns, rows}}`, rows as lists.
#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_query<'a>(
    env: Env<'a>,
    db: ResourceArc<SqlDbResource>,
    sql: String,
    params: Term<'a>,
    timeout_ms: u64,
) -> NifResult<Term<'a>> {
    guard(|| {
        let params = decode_params(params)?;
        let rows = db.db.query(&sql, &params, std::time::Duration::from_millis(timeout_ms))?;
        let encoded: Vec<Term<'a>> =
            rows.rows.iter().map(|r| r.iter().map(|v| encode_value(env, v)).collect::<Vec<_>>().encode(env)).collect();
        Ok((rows.columns, encoded).encode(env))
    })
}

#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_truncate_wal(db: ResourceArc<SqlDbResource>) -> NifResult<rustler::Atom> {
    guard(|| db.db.truncate_wal().map(|_| atoms::ok()))
}

#[rustler::nif(schedule = "DirtyIo")]
fn sqldb_close(db: ResourceArc<SqlDbResource>) -> rustler::Atom {
    db.db.close();
    atoms::ok()
}
