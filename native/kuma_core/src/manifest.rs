//! The manifest `<data_dir>/KUMA`: a small text file naming the store (its id), its shard
//! count, its shard format and whether it is encrypted. It is written last when a store is
//! created (so a crash mid-creation leaves no manifest, and the next open refuses the
//! half-made shards instead of trusting them) and read first on every open.
//! Format: docs/storage-format.md.

use crate::cipher::Key;
use crate::error::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What the manifest records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub format: u32,
    pub store_id: String,
    pub shards: u32,
    pub encrypted: bool,
    /// Plain stores only: the key of the tombstones' keyed hash.
    pub tombstone_key: Option<[u8; 32]>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn path(dir: &Path) -> PathBuf {
    dir.join("KUMA")
}

impl Manifest {
    /// A manifest for a new store: a fresh random store id and, for a plain store, a fresh
    /// tombstone key.
    /// A given tombstone key (cluster mode: the cluster's, so every replica of a shard
    /// finds an entity under the same keyed hash) replaces the random one.
    pub fn new_with(format: u32, shards: u32, encrypted: bool, tombstone_key: Option<[u8; 32]>) -> Result<Manifest> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)
            .map_err(|e| Error::Storage { context: "generate store id", message: e.to_string() })?;
        let tombstone_key = match (encrypted, tombstone_key) {
            (true, _) => None,
            (false, Some(k)) => Some(k),
            (false, None) => Some(*Key::random()?.as_bytes()),
        };
        Ok(Manifest { format, store_id: hex(&id), shards, encrypted, tombstone_key })
    }

    /// The manifest of the store in `dir`, or `None` if there is none.
    pub fn read(dir: &Path) -> Result<Option<Manifest>> {
        let path = path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read manifest")(e)),
        };
        let foreign = |why: &str| Error::ForeignFile { path: path.display().to_string(), why: why.to_string() };
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        if lines.next() != Some("kuma-store") {
            return Err(foreign("not a Kuma manifest"));
        }
        // Stores created before encryption existed have no `encryption` line: they are plain.
        let mut m = Manifest { format: 0, store_id: String::new(), shards: 0, encrypted: false, tombstone_key: None };
        for line in lines {
            match line.split_once(' ') {
                Some(("format", v)) => m.format = v.parse().map_err(|_| foreign("bad format line"))?,
                Some(("store_id", v)) => m.store_id = v.to_string(),
                Some(("shards", v)) => m.shards = v.parse().map_err(|_| foreign("bad shards line"))?,
                Some(("encryption", v)) => m.encrypted = v == "on",
                Some(("tombstone_key", v)) => {
                    m.tombstone_key = Some(unhex32(v).ok_or_else(|| foreign("bad tombstone_key"))?)
                }
                _ => {}
            }
        }
        if m.format == 0 || m.store_id.is_empty() || m.shards == 0 {
            return Err(foreign("incomplete manifest"));
        }
        Ok(Some(m))
    }

    /// Writes the manifest durably (temporary file, fsync, rename, fsync of the directory),
    /// with permissions `mode`.
    pub fn write(&self, dir: &Path, mode: u32) -> Result<()> {
        let tmp = dir.join("KUMA.tmp");
        let mut text = format!(
            "kuma-store\n# Kuma store manifest: do not edit. See docs/storage-format.md.\nformat {}\nstore_id {}\nshards {}\nencryption {}\n",
            self.format,
            self.store_id,
            self.shards,
            if self.encrypted { "on" } else { "off" }
        );
        if let Some(k) = &self.tombstone_key {
            text.push_str(&format!("tombstone_key {}\n", hex(k)));
        }
        let mut f = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(Error::io("write manifest"))?;
        f.write_all(text.as_bytes()).map_err(Error::io("write manifest"))?;
        f.sync_all().map_err(Error::io("write manifest"))?;
        std::fs::rename(&tmp, path(dir)).map_err(Error::io("write manifest"))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("write manifest"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), None);
        let m = Manifest::new_with(2, 16, false, None).unwrap();
        assert_eq!(m.store_id.len(), 32);
        assert!(m.tombstone_key.is_some());
        m.write(dir.path(), 0o600).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(m));
        assert!(Manifest::new_with(2, 16, true, None).unwrap().tombstone_key.is_none());

        std::fs::write(path(dir.path()), "not-kuma\n").unwrap();
        assert!(matches!(Manifest::read(dir.path()), Err(Error::ForeignFile { .. })));
        std::fs::write(path(dir.path()), "kuma-store\nformat 2\n").unwrap();
        assert!(
            matches!(Manifest::read(dir.path()), Err(Error::ForeignFile { ref why, .. }) if why.contains("incomplete"))
        );
    }
}
