//! Errors at the boundary: every `kuma_core::Error` reaches Elixir as one documented reason
//! term, encoded here and nowhere else. The text of each reason lives in `Kuma.Error`
//! (Elixir); this only gives it its shape. Every NIF body runs inside `guard`, so a Rust
//! panic becomes `{:error, {:panic, message}}` instead of taking the VM down.

use crate::atoms;
use kuma_core::Error;
use rustler::{Atom, Encoder, Env, Term};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A core error, encodable as its reason term.
pub struct Reason(pub Error);

/// `{:ok, value}` or `{:error, reason}`.
pub type NifResult<T> = Result<T, Reason>;

/// Runs a NIF body, turning a panic into `Error::Panic`.
pub fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> NifResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(Reason),
        Err(panic) => Err(Reason(Error::from_panic(panic))),
    }
}

/// `{:ok, value}` or `{:error, reason}` for a result computed off the NIF's own call (a
/// writer thread's answer).
pub fn encode_result<'a, T>(
    env: Env<'a>,
    result: Result<T, Error>,
    ok: impl FnOnce(Env<'a>, T) -> Term<'a>,
) -> Term<'a> {
    match result {
        Ok(value) => (atoms::ok(), ok(env, value)).encode(env),
        Err(e) => (atoms::error(), Reason(e)).encode(env),
    }
}

/// The field an `{:invalid, what, why}` or `{:too_large, what, size, max}` names, as an
/// atom: the set of `what`s is fixed in the core (static strings), so this creates a
/// bounded number of atoms.
fn what_atom<'a>(env: Env<'a>, what: &'static str) -> Term<'a> {
    Atom::from_str(env, what).map(|a| a.encode(env)).unwrap_or_else(|_| what.encode(env))
}

impl Encoder for Reason {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match &self.0 {
            Error::Invalid { what, why } => (atoms::invalid(), what_atom(env, what), why.as_str()).encode(env),
            Error::TooLarge { what, size, max } => (atoms::too_large(), what_atom(env, what), *size, *max).encode(env),
            Error::WrongExpectedSeq { expected, actual } => {
                (atoms::wrong_expected_seq(), *expected, *actual).encode(env)
            }
            Error::Closed => atoms::store_closed().encode(env),
            Error::Locked { path } => (atoms::data_dir_locked(), path.as_str()).encode(env),
            Error::ShardCountMismatch { stored, given } => (atoms::shard_count_mismatch(), *stored, *given).encode(env),
            Error::ForeignFile { path, why } => (atoms::foreign_file(), path.as_str(), why.as_str()).encode(env),
            Error::MissingShard { path } => (atoms::missing_shard(), path.as_str()).encode(env),
            Error::UnsupportedFormat { found, supported } => {
                (atoms::unsupported_format(), *found, *supported).encode(env)
            }
            Error::Storage { context, message } => (atoms::storage(), *context, message.as_str()).encode(env),
            Error::Corrupt { seq, why } => (atoms::corrupt(), *seq, why.as_str()).encode(env),
            Error::Panic { message } => (atoms::panic(), message.as_str()).encode(env),
            Error::WrongMasterKey => atoms::wrong_master_key().encode(env),
            Error::MissingKeystore { path } => (atoms::missing_keystore(), path.as_str()).encode(env),
            Error::EncryptionMismatch { stored: true } => {
                (atoms::encryption_mismatch(), atoms::store_is_encrypted()).encode(env)
            }
            Error::EncryptionMismatch { stored: false } => {
                (atoms::encryption_mismatch(), atoms::store_is_plain()).encode(env)
            }
            Error::Erased => atoms::entity_erased().encode(env),
            Error::KeyMissing => atoms::key_missing().encode(env),
            Error::Decrypt { seq, why } => (atoms::decrypt_failed(), *seq, why.as_str()).encode(env),
            Error::Timeout => atoms::timeout().encode(env),
            Error::Sql { index, message } => (atoms::sql(), *index, message.as_str()).encode(env),
            Error::Conflict { head_seq } => (atoms::conflict(), *head_seq).encode(env),
            Error::Replicated => atoms::replicated().encode(env),
            Error::ClusterMismatch { why } => (atoms::cluster_mismatch(), why.as_str()).encode(env),
            Error::BackupDamaged { file, frame, why } => {
                (atoms::backup_damaged(), file.as_str(), *frame, why.as_str()).encode(env)
            }
        }
    }
}
