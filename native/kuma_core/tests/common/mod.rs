//! Helpers shared by the integration tests (each test file is its own crate: `mod common;`).

use std::path::Path;

/// Copies a directory tree file by file while the store runs, as `kill -9` leaves it
/// (SQLite's WAL and shared-memory files included).
pub fn crash_copy_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            crash_copy_all(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
