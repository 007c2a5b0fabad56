//! Backup segments (backup.rs): a live shard copied while it is written, framed with CRC32,
//! read back byte for byte; every kind of damage refused with the first bad frame named.

use kuma_core::backup::{self, FRAME_BYTES};
use kuma_core::*;
use std::path::Path;

fn store(dir: &Path) -> Store {
    let mut c = StoreConfig::new(dir);
    c.shards = 1;
    Store::open(c).unwrap()
}

/// A store with `n` entities of 20 events each (payloads large enough for several frames).
fn filled(dir: &Path, n: usize) -> Store {
    let s = store(dir);
    for e in 0..n {
        let events = (0..20).map(|i| NewEvent::new("T", vec![], vec![(e * 31 + i) as u8; 4000])).collect();
        s.append_wait(format!("e{e}").as_bytes(), Expected::Any, events).unwrap();
    }
    s
}

#[test]
fn a_live_shard_round_trips_and_its_summary_is_recomputed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = filled(&tmp.path().join("data"), 40);
    let shard = kuma_core::shard::shard_path(&tmp.path().join("data/shards"), 0);
    let seg = tmp.path().join("shard-000.seg");
    // Writes go on while the copy is taken: the copy is one consistent moment of them.
    let writer = {
        let s = &s;
        std::thread::scope(|scope| {
            let h = scope.spawn(move || {
                for i in 0..200u32 {
                    s.append_wait(b"busy", Expected::Any, vec![NewEvent::new("T", vec![], i.to_be_bytes().to_vec())])
                        .unwrap();
                }
            });
            let r =
                backup::backup_database(&shard, &tmp.path().join("copy.tmp"), &seg, "shard-000", "sid", 0o600, true)
                    .unwrap();
            h.join().unwrap();
            r
        })
    };
    let (info, summary) = writer;
    let summary = summary.unwrap();
    assert!(info.frames >= 3, "3 MB of payloads span several 1 MiB frames: {info:?}");
    assert!(!tmp.path().join("copy.tmp").exists(), "the temporary copy is removed");
    assert!(summary.events >= 800 && summary.events <= 1000, "{summary:?}");
    assert_eq!(summary.entities, 40 + u64::from(summary.events > 800));

    let restored = tmp.path().join("restored.kuma");
    let back = backup::read_segment(&seg, "shard-000", "sid", Some((&restored, 0o600))).unwrap();
    assert_eq!(back, info);
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), info.bytes);
    assert_eq!(backup::summarize_file(&restored).unwrap(), summary);
    assert_eq!(*blake3::hash(&std::fs::read(&restored).unwrap()).as_bytes(), info.digest);
}

fn framed(tmp: &Path, content: &[u8]) -> std::path::PathBuf {
    let src = tmp.join("plain");
    std::fs::write(&src, content).unwrap();
    let seg = tmp.join("plain.seg");
    let _ = std::fs::remove_file(&seg);
    backup::frame_file(&src, &seg, "manifest", "sid", 0o600).unwrap();
    seg
}

fn damage(seg: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(seg).unwrap();
    f(&mut bytes);
    std::fs::write(seg, bytes).unwrap();
}

fn check(seg: &Path) -> Result<backup::SegmentInfo> {
    backup::read_segment(seg, "manifest", "sid", None)
}

fn damaged_at(r: Result<backup::SegmentInfo>) -> (u64, String) {
    match r {
        Err(Error::BackupDamaged { frame, why, .. }) => (frame, why),
        other => panic!("expected BackupDamaged, got {other:?}"),
    }
}

#[test]
fn damage_is_found_and_named_by_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..(2 * FRAME_BYTES + 100)).map(|i| (i % 251) as u8).collect();
    let seg = framed(tmp.path(), &content);
    assert_eq!(check(&seg).unwrap().frames, 3);
    let header = 8 + 8 + "manifest\nsid".len();

    // A bit flipped in the second data frame.
    damage(&seg, |b| b[header + 8 + FRAME_BYTES + 8 + 17] ^= 0x04);
    assert_eq!(damaged_at(check(&seg)), (2, "CRC32 mismatch".into()));

    // Cut inside the last data frame, and cut exactly before the end frame.
    let seg = framed(tmp.path(), &content);
    let len = std::fs::metadata(&seg).unwrap().len() as usize;
    damage(&seg, |b| b.truncate(len - 8 - 50));
    assert_eq!(damaged_at(check(&seg)).0, 3);
    let seg = framed(tmp.path(), &content);
    damage(&seg, |b| b.truncate(len - 8));
    assert!(damaged_at(check(&seg)).1.contains("truncated"));

    // Two frames swapped: each frame's index is inside its CRC.
    let seg = framed(tmp.path(), &content);
    damage(&seg, |b| {
        let f1 = header..header + 8 + FRAME_BYTES;
        let f2 = f1.end..f1.end + 8 + FRAME_BYTES;
        let (one, two) = (b[f1.clone()].to_vec(), b[f2.clone()].to_vec());
        b[f1.start..f1.start + two.len()].copy_from_slice(&two);
        b[f2.start..f2.start + one.len()].copy_from_slice(&one);
    });
    assert_eq!(damaged_at(check(&seg)), (1, "CRC32 mismatch".into()));

    // Not a segment; bytes after the end.
    let seg = framed(tmp.path(), &content);
    damage(&seg, |b| b[0] = b'X');
    assert!(damaged_at(check(&seg)).1.contains("magic"));
    let seg = framed(tmp.path(), &content);
    damage(&seg, |b| b.push(0));
    assert!(damaged_at(check(&seg)).1.contains("after the end"));
}

#[test]
fn a_segment_of_another_store_or_place_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let seg = framed(tmp.path(), b"kuma-store\n");
    let dest = tmp.path().join("out");
    let r = backup::read_segment(&seg, "manifest", "other-store", Some((&dest, 0o600)));
    let (frame, why) = damaged_at(r);
    assert_eq!(frame, 0);
    assert!(why.contains("other-store"), "{why}");
    assert!(!dest.exists(), "nothing is written for a segment refused at its header");
    // Damage found after content was written: what was written is removed.
    let big: Vec<u8> = (0..(FRAME_BYTES + 10)).map(|i| i as u8).collect();
    let seg = framed(tmp.path(), &big);
    damage(&seg, |b| {
        let n = b.len();
        b[n - 20] ^= 1
    });
    assert_eq!(damaged_at(backup::read_segment(&seg, "manifest", "sid", Some((&dest, 0o600)))).0, 2);
    assert!(!dest.exists(), "a partly written file is removed");
    let (_, why) = damaged_at(backup::read_segment(&seg, "shard-001", "sid", None));
    assert!(why.contains("holds manifest, expected shard-001"), "{why}");
    let (_, why) = damaged_at(backup::read_segment(&tmp.path().join("nope.seg"), "manifest", "sid", None));
    assert!(why.contains("missing"), "{why}");
}
