//! Answers that come later. A write NIF hands its work to a shard's writer thread and
//! returns `:ok` at once; the writer calls the reply made here after the commit, which
//! sends `{:kuma_reply, ref, answer}` to the process that called the NIF. Every write NIF
//! builds its reply with `later`, so the message has one shape and one sending path.

use crate::atoms;
use crate::error::encode_result;
use kuma_core::{Error, Result};
use rustler::env::OwnedEnv;
use rustler::{Encoder, Env, Term};

/// A reply for the writer thread: `{:kuma_reply, reference, {:ok, ok(value)} | {:error,
/// reason}}`, sent to the calling process. `reference` must be a reference (the caller's
/// way to match the answer); `OwnedEnv::send_and_clear` may only run on a thread Kuma
/// started, which the writer threads are.
pub fn later<'a, T: Send + 'static>(
    env: Env<'a>,
    reference: Term<'a>,
    ok: for<'b> fn(Env<'b>, T) -> Term<'b>,
) -> Result<Box<dyn FnOnce(Result<T>) + Send>> {
    if !reference.is_ref() {
        return Err(Error::Invalid { what: "reply_ref", why: "must be a reference".into() });
    }
    let mut owned = OwnedEnv::new();
    let saved = owned.save(reference);
    let pid = env.pid();
    Ok(Box::new(move |result| {
        let _ = owned
            .send_and_clear(&pid, |e| (atoms::kuma_reply(), saved.load(e), encode_result(e, result, ok)).encode(e));
    }))
}
