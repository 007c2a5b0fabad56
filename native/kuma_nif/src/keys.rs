//! Keys: sealing values about a subject under the subject's key (`Kuma.Sensitive`), and
//! rotating the master key.

use crate::error::{guard, NifResult};
use crate::store::StoreResource;
use crate::term::{bin, decode_id};
use kuma_core::Key;
use rustler::types::binary::Binary;
use rustler::{Env, ResourceArc, Term};

/// Seals a value under a subject's data key (creating it durably if needed).
#[rustler::nif(schedule = "DirtyIo")]
fn keys_seal<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    subject_id: Term<'a>,
    plaintext: Binary<'a>,
) -> NifResult<Term<'a>> {
    guard(|| store.store.seal_sensitive(&decode_id(subject_id)?, plaintext.as_slice()).map(|s| bin(env, &s)))
}

/// Opens a sealed value; `{:error, :entity_erased}` once the subject is erased.
#[rustler::nif(schedule = "DirtyIo")]
fn keys_unseal<'a>(
    env: Env<'a>,
    store: ResourceArc<StoreResource>,
    subject_id: Term<'a>,
    sealed: Binary<'a>,
) -> NifResult<Term<'a>> {
    guard(|| store.store.unseal_sensitive(&decode_id(subject_id)?, sealed.as_slice()).map(|p| bin(env, &p)))
}

/// Rewraps every data key with a new master key; returns how many.
#[rustler::nif(schedule = "DirtyIo")]
fn keys_rotate(store: ResourceArc<StoreResource>, new_key: Binary) -> NifResult<u64> {
    guard(|| store.store.rotate_master_key(Key::from_bytes(new_key.as_slice())?))
}
