//! Online backups: a consistent copy of one of the store's SQLite files, taken with SQLite's
//! online backup API while its writer goes on, written as a *segment*: a file of frames,
//! each checked by CRC32, which a restore reads back and checks before it writes anything.
//!
//! ```text
//! segment = "KUMASEG1" frame_0 frame_1 ... frame_n end
//! frame_i = u32be len || u32be crc32(u64be i || payload) || payload      (len <= 1 MiB)
//! frame_0 = the header: "<label>\n<store_id>"  (e.g. "shard-003\n3f6c...")
//! end     = u32be 0   || u32be crc32(u64be n+1)                           (no payload)
//! ```
//!
//! The frame's index is inside its CRC, so a frame moved, repeated or dropped is found as
//! surely as a flipped bit; the end frame makes a file cut at a frame boundary incomplete
//! rather than shorter. The header names what the segment holds and which store it is of,
//! so a segment of another store or put in the wrong place is refused by name. The whole
//! content's BLAKE3 goes into the backup's manifest (written by the Elixir side).
//!
//! Layout and rules: docs/operations.md ("Backup and restore").

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};
use crate::sqlite;

const MAGIC: &[u8; 8] = b"KUMASEG1";
/// Content bytes per frame.
pub const FRAME_BYTES: usize = 1 << 20;

/// What a segment holds, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Content bytes (the SQLite file or plain file framed).
    pub bytes: u64,
    /// Data frames (the header and end frames not counted).
    pub frames: u64,
    /// BLAKE3 of the content.
    pub digest: [u8; 32],
}

/// What a shard copy holds: its last position, its entities and a digest of every chain's
/// head, recorded at backup and recomputed after a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    pub position: u64,
    pub entities: u64,
    pub events: u64,
    /// BLAKE3 over every entity's last event, `idx || u64be seq || hash`, in `idx` order.
    pub heads: [u8; 32],
}

fn io<'p>(context: &'static str, path: &'p Path) -> impl Fn(std::io::Error) -> Error + 'p {
    move |e| Error::Storage { context, message: format!("{}: {e}", path.display()) }
}

fn damaged(path: &Path, frame: u64, why: impl Into<String>) -> Error {
    Error::BackupDamaged { file: file_name(path), frame, why: why.into() }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

fn crc(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_be_bytes());
    h.update(payload);
    h.finalize()
}

/// Copies the live SQLite database at `src` with the online backup API (in one step, so
/// the copy is one consistent snapshot; the database's writer is not held up) into `tmp`,
/// frames the copy into `segment`, and removes `tmp`. With `shard`, also summarises the
/// copy (`ShardSummary`). `tmp` and `segment` must not exist.
pub fn backup_database(
    src: &Path,
    tmp: &Path,
    segment: &Path,
    label: &str,
    store_id: &str,
    mode: u32,
    shard: bool,
) -> Result<(SegmentInfo, Option<ShardSummary>)> {
    let result = (|| {
        let source = sqlite::open_reader(src)?;
        sqlite::create_file(tmp, mode, "create backup copy")?;
        let mut dest = Connection::open_with_flags(tmp, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(Error::storage("open backup copy"))?;
        {
            let backup = rusqlite::backup::Backup::new(&source, &mut dest).map_err(Error::storage("start backup"))?;
            // -1: every page in one step, under one read transaction of the source.
            match backup.step(-1).map_err(Error::storage("copy database"))? {
                rusqlite::backup::StepResult::Done => {}
                other => {
                    return Err(Error::Storage {
                        context: "copy database",
                        message: format!("{}: the backup did not finish ({other:?})", src.display()),
                    })
                }
            }
        }
        drop(source);
        let summary = if shard { Some(summarize(&dest)?) } else { None };
        dest.close().map_err(|(_, e)| Error::storage("close backup copy")(e))?;
        let info = frame_file(tmp, segment, label, store_id, mode)?;
        Ok((info, summary))
    })();
    let _ = std::fs::remove_file(tmp);
    result
}

/// Frames the plain file `src` into `segment` (created with `mode`; must not exist).
pub fn frame_file(src: &Path, segment: &Path, label: &str, store_id: &str, mode: u32) -> Result<SegmentInfo> {
    let mut input = BufReader::new(File::open(src).map_err(io("read file to back up", src))?);
    let mut out = BufWriter::new(create_new(segment, mode, "create segment")?);
    let write = io("write segment", segment);
    out.write_all(MAGIC).map_err(&write)?;
    let header = format!("{label}\n{store_id}");
    write_frame(&mut out, 0, header.as_bytes()).map_err(&write)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; FRAME_BYTES];
    let (mut bytes, mut frames) = (0u64, 0u64);
    loop {
        let n = read_full(&mut input, &mut buf).map_err(io("read file to back up", src))?;
        if n == 0 {
            break;
        }
        frames += 1;
        bytes += n as u64;
        hasher.update(&buf[..n]);
        write_frame(&mut out, frames, &buf[..n]).map_err(&write)?;
    }
    write_frame(&mut out, frames + 1, &[]).map_err(&write)?;
    let file = out.into_inner().map_err(|e| write(e.into_error()))?;
    file.sync_all().map_err(&write)?;
    Ok(SegmentInfo { bytes, frames, digest: *hasher.finalize().as_bytes() })
}

/// A new file (it must not exist) with permissions `mode`.
fn create_new(path: &Path, mode: u32, context: &'static str) -> Result<File> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io(context, path))
}

fn write_frame(out: &mut impl Write, index: u64, payload: &[u8]) -> std::io::Result<()> {
    out.write_all(&(payload.len() as u32).to_be_bytes())?;
    out.write_all(&crc(index, payload).to_be_bytes())?;
    out.write_all(payload)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads every frame of `segment` and checks each CRC, the header (it must hold `label`
/// of `store_id`) and the end frame; with `dest`, writes the content there (created with
/// `mode`; must not exist; removed again if the segment turns out damaged). The first bad
/// frame is named in `Error::BackupDamaged`.
pub fn read_segment(segment: &Path, label: &str, store_id: &str, dest: Option<(&Path, u32)>) -> Result<SegmentInfo> {
    let mut out = None;
    let result = read_frames(segment, label, store_id, |index, payload| {
        let Some((path, mode)) = dest else { return Ok(()) };
        if out.is_none() {
            out = Some(BufWriter::new(create_new(path, mode, "restore file")?));
        }
        let w = out.as_mut().expect("opened above");
        if index > 0 {
            w.write_all(payload).map_err(io("restore file", path))?;
        }
        Ok(())
    })
    .and_then(|info| {
        if let (Some(w), Some((path, _))) = (out.take(), dest) {
            let file = w.into_inner().map_err(|e| io("restore file", path)(e.into_error()))?;
            file.sync_all().map_err(io("restore file", path))?;
        }
        Ok(info)
    });
    if result.is_err() {
        if let Some((path, _)) = dest {
            drop(out);
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

/// Reads and checks every frame, handing each good one (index, payload) to `each`: the
/// header (index 0) once it is known to be the right one, then the data frames.
fn read_frames(
    segment: &Path,
    label: &str,
    store_id: &str,
    mut each: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<SegmentInfo> {
    let mut input = BufReader::new(File::open(segment).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => damaged(segment, 0, "the file is missing"),
        _ => io("read segment", segment)(e),
    })?);
    let read = io("read segment", segment);
    let mut magic = [0u8; 8];
    if read_full(&mut input, &mut magic).map_err(&read)? != 8 || &magic != MAGIC {
        return Err(damaged(segment, 0, "not a Kuma backup segment (bad magic)"));
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; FRAME_BYTES];
    let (mut bytes, mut index) = (0u64, 0u64);
    loop {
        let mut head = [0u8; 8];
        if read_full(&mut input, &mut head).map_err(&read)? != 8 {
            return Err(damaged(segment, index, "the file ends inside the frame (truncated)"));
        }
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
        if len > FRAME_BYTES {
            return Err(damaged(segment, index, format!("frame length {len} is over the limit")));
        }
        if read_full(&mut input, &mut buf[..len]).map_err(&read)? != len {
            return Err(damaged(segment, index, "the file ends inside the frame (truncated)"));
        }
        let payload = &buf[..len];
        if crc(index, payload) != sum {
            return Err(damaged(segment, index, "CRC32 mismatch"));
        }
        if index == 0 {
            let header = String::from_utf8_lossy(payload);
            let (got_label, got_store) = header.split_once('\n').unwrap_or((&header, ""));
            if got_label != label {
                return Err(damaged(segment, 0, format!("holds {got_label}, expected {label}")));
            }
            if got_store != store_id {
                return Err(damaged(
                    segment,
                    0,
                    format!("is of store {got_store}, this backup is of store {store_id}"),
                ));
            }
        } else if len == 0 {
            let mut rest = [0u8; 1];
            if read_full(&mut input, &mut rest).map_err(&read)? != 0 {
                return Err(damaged(segment, index + 1, "bytes after the end frame"));
            }
            return Ok(SegmentInfo { bytes, frames: index - 1, digest: *hasher.finalize().as_bytes() });
        } else {
            bytes += len as u64;
            hasher.update(payload);
        }
        each(index, payload)?;
        index += 1;
    }
}

/// The summary of the shard database at `path` (opened read-only).
pub fn summarize_file(path: &Path) -> Result<ShardSummary> {
    summarize(&sqlite::open_reader(path)?)
}

fn summarize(conn: &Connection) -> Result<ShardSummary> {
    let err = |e: rusqlite::Error| Error::Storage { context: "summarize shard copy", message: e.to_string() };
    let (position, events): (i64, i64) = conn
        .query_row("SELECT coalesce(max(pos), 0), count(*) FROM events", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(&err)?;
    let mut st = conn
        .prepare(
            // One pass over the events (there is no per-entity index to look heads up by);
            // SQLite takes the bare columns of a max() aggregate from the row with the max.
            "SELECT e.idx, m.seq, m.hash FROM \
             (SELECT eid, max(pos) AS p, seq, hash FROM events GROUP BY eid) m \
             JOIN entities e ON e.eid = m.eid ORDER BY e.idx",
        )
        .map_err(&err)?;
    let mut rows = st.query([]).map_err(&err)?;
    let mut hasher = blake3::Hasher::new();
    let mut entities = 0u64;
    while let Some(r) = rows.next().map_err(&err)? {
        let idx: Vec<u8> = r.get(0).map_err(&err)?;
        let seq: i64 = r.get(1).map_err(&err)?;
        let hash: Vec<u8> = r.get(2).map_err(&err)?;
        hasher.update(&idx);
        hasher.update(&(seq as u64).to_be_bytes());
        hasher.update(&hash);
        entities += 1;
    }
    Ok(ShardSummary {
        position: position as u64,
        entities,
        events: events as u64,
        heads: *hasher.finalize().as_bytes(),
    })
}
