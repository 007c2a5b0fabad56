//! Online backups and restores (`Kuma.Backup`): copying one of the store's SQLite files
//! into a framed segment, and reading segments back. All of it touches the disk for as long
//! as a file takes, so every NIF here runs on a dirty IO scheduler.

use crate::atoms;
use crate::error::{guard, NifResult};
use kuma_core::backup::{self, SegmentInfo, ShardSummary};
use rustler::{Binary, Encoder, Env, NifMap, OwnedBinary, Term};
use std::path::Path;

/// `%{bytes, frames, digest}`.
#[derive(NifMap)]
#[rustler(encode)]
struct SegmentTerm<'a> {
    bytes: u64,
    frames: u64,
    digest: Binary<'a>,
}

/// `%{position, entities, events, heads}`.
#[derive(NifMap)]
#[rustler(encode)]
struct SummaryTerm<'a> {
    position: u64,
    entities: u64,
    events: u64,
    heads: Binary<'a>,
}

fn bin<'a>(env: Env<'a>, bytes: &[u8; 32]) -> Binary<'a> {
    let mut owned = OwnedBinary::new(32);
    owned.as_mut_slice().copy_from_slice(bytes);
    owned.release(env)
}

fn segment<'a>(env: Env<'a>, info: &SegmentInfo) -> Term<'a> {
    SegmentTerm { bytes: info.bytes, frames: info.frames, digest: bin(env, &info.digest) }.encode(env)
}

fn summary<'a>(env: Env<'a>, s: &ShardSummary) -> Term<'a> {
    SummaryTerm { position: s.position, entities: s.entities, events: s.events, heads: bin(env, &s.heads) }.encode(env)
}

fn path(p: &str) -> &Path {
    Path::new(p)
}

/// Copies the live database `src` into the segment file (through `tmp`); with `shard`,
/// `{segment, summary}`, else `{segment, nil}`.
#[rustler::nif(schedule = "DirtyIo")]
#[allow(clippy::too_many_arguments)]
fn backup_database<'a>(
    env: Env<'a>,
    src: String,
    tmp: String,
    seg: String,
    label: String,
    store_id: String,
    mode: u32,
    shard: bool,
) -> NifResult<Term<'a>> {
    let (info, sum) =
        guard(|| backup::backup_database(path(&src), path(&tmp), path(&seg), &label, &store_id, mode, shard))?;
    let sum = match &sum {
        Some(s) => summary(env, s),
        None => atoms::nil().encode(env),
    };
    Ok((segment(env, &info), sum).encode(env))
}

/// Frames the plain file `src` into the segment file.
#[rustler::nif(schedule = "DirtyIo")]
fn backup_frame_file<'a>(
    env: Env<'a>,
    src: String,
    seg: String,
    label: String,
    store_id: String,
    mode: u32,
) -> NifResult<Term<'a>> {
    let info = guard(|| backup::frame_file(path(&src), path(&seg), &label, &store_id, mode))?;
    Ok(segment(env, &info))
}

/// Checks every frame of a segment; with `dest` (a path, or nil) also writes its content.
#[rustler::nif(schedule = "DirtyIo")]
fn backup_read_segment<'a>(
    env: Env<'a>,
    seg: String,
    label: String,
    store_id: String,
    dest: Option<String>,
    mode: u32,
) -> NifResult<Term<'a>> {
    let info = guard(|| backup::read_segment(path(&seg), &label, &store_id, dest.as_deref().map(|d| (path(d), mode))))?;
    Ok(segment(env, &info))
}

/// The summary of a shard file (a restored copy; never a live shard).
#[rustler::nif(schedule = "DirtyIo")]
fn backup_summarize(env: Env<'_>, shard: String) -> NifResult<Term<'_>> {
    let s = guard(|| backup::summarize_file(path(&shard)))?;
    Ok(summary(env, &s))
}
