//! The NIF boundary: term conversion and scheduling only. Logic lives in `kuma_core`.
//!
//! Organised by domain, like the Elixir module that declares every NIF (`Kuma.Native`):
//! - `store`: open, close, facts, commit positions;
//! - `write`: appends, snapshots, erasure, flush (queued to the shard's writer thread and
//!   answered later by message, `reply`);
//! - `read`: one entity's events, head and snapshots, queries across a shard, chain checks;
//! - `keys`: sensitive values and master key rotation;
//! - `sqldb`: read-model databases;
//! - `backup`: copying the store's files into backup segments and reading them back;
//! - `cluster`: preparing writes on a shard's leader, applying replicated ones everywhere;
//! - `term`, `error`, `atoms`: the shapes that cross the boundary, errors, atoms.
//!
//! Scheduling rules: writes return at once (the commit is answered with `{:kuma_reply, ref,
//! answer}` from the writer thread); anything that may touch the disk or wait runs on a
//! dirty IO scheduler; large writes are decoded on a dirty CPU scheduler. Every NIF body
//! runs inside `error::guard`, so a Rust panic becomes `{:error, {:panic, message}}`.

mod atoms;
mod backup;
mod cluster;
mod error;
mod keys;
mod read;
mod reply;
mod sqldb;
mod store;
mod term;
mod write;

use error::{guard, NifResult};

/// Test builds only: panics inside a NIF, to show the VM survives it.
#[rustler::nif]
fn fault_panic() -> NifResult<rustler::Atom> {
    guard(|| {
        if cfg!(feature = "fault-injection") {
            panic!("fault injection: NIF panic requested");
        }
        Err(kuma_core::Error::Invalid { what: "fault_panic", why: "not a fault-injection build".into() })
    })
}

rustler::init!("Elixir.Kuma.Native");
