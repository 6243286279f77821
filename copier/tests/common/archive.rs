//! Sources in the official `aclImdb/` layout, made from a list of files: a gzip tar or an
//! unpacked folder. Shared by the copier's tests and the system tests (`tests/common`
//! includes this file), so both build their archives one way.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

/// One file of a dataset: its path relative to `aclImdb/` and its bytes.
pub type Entry = (String, Vec<u8>);

/// Writes `entries` as a gzip tar with every path under `aclImdb/`, folders first, in
/// the given order.
pub fn write_archive(path: &Path, entries: &[Entry]) {
    let file = fs::File::create(path).unwrap();
    let mut tar = tar::Builder::new(GzEncoder::new(file, Compression::fast()));
    let mut dirs = BTreeSet::new();
    for (name, _) in entries {
        let mut p = PathBuf::from("aclImdb").join(name);
        while p.pop() {
            if !p.as_os_str().is_empty() {
                dirs.insert(p.clone());
            }
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_cksum();
        tar.append_data(&mut h, d, std::io::empty()).unwrap();
    }
    for (name, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, Path::new("aclImdb").join(name), bytes.as_slice())
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

/// Writes `entries` as files under `root/aclImdb/`.
pub fn write_folder(root: &Path, entries: &[Entry]) {
    for (name, bytes) in entries {
        let p = root.join("aclImdb").join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
}
