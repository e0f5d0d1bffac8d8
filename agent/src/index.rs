//! Content index of a tree: (path, kind, size, mode, hash) per entry. Both
//! sides build one for the first sync of a session, so that only what differs
//! travels, whatever the timestamps say.

use crate::paths;
use crate::protocol::{Entry, EntryKind, TEMP_PREFIX};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One entry found by [`walk`], before hashing.
#[derive(Debug, Clone)]
pub struct Found {
    /// Wire path (relative to the root the walk's prefix is relative to).
    pub path: String,
    pub abs: PathBuf,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub link: Option<String>,
}

/// Something the walk passed over, and why (unreadable directory,
/// non-UTF-8 name, socket...).
#[derive(Debug, Clone)]
pub struct Skipped {
    pub abs: PathBuf,
    pub reason: String,
}

/// What a walk wants done with a path it reached.
pub trait Visit {
    /// Return false to leave the path (and, for a directory, all below it)
    /// out of the walk.
    fn keep(&mut self, wire: &str, is_dir: bool) -> bool;

    /// Called with each directory's listing (`has(name)`) before any of its
    /// entries is visited: the CLI reads ignore files here, only where the
    /// listing shows one (probing for them costs two `stat`s a directory).
    fn entered(&mut self, _dir: &Path, _has: &dyn Fn(&str) -> bool) {}

    /// Whether to walk below a kept directory now (false: the caller walks
    /// it later, for instance on another thread).
    fn descend(&mut self, _wire: &str) -> bool {
        true
    }
}

impl<F: FnMut(&str, bool) -> bool> Visit for F {
    fn keep(&mut self, wire: &str, is_dir: bool) -> bool {
        self(wire, is_dir)
    }
}

/// Options for [`walk`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WalkOptions {
    /// Remove temporaries left by an earlier agent process (crash mid-batch).
    /// Temporaries of the current process are in flight and left alone.
    pub clean_stale_temps: bool,
}

/// Walks `base` (whose wire path is `prefix`, "" for the root) without
/// following symlinks, and appends every kept entry below it to `out`.
/// A missing `base` is an empty tree.
pub fn walk(
    base: &Path,
    prefix: &str,
    visit: &mut dyn Visit,
    opts: WalkOptions,
    out: &mut Vec<Found>,
    skipped: &mut Vec<Skipped>,
) {
    let rd = match std::fs::read_dir(base) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            skipped.push(Skipped { abs: base.to_path_buf(), reason: e.to_string() });
            return;
        }
    };
    let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| (e.file_name(), e)).collect();
    // Sorted so that indexes and batches come out in a stable order.
    names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    visit.entered(base, &|n| names.iter().any(|(x, _)| x == n));
    for (name, de) in names {
        let abs = de.path();
        let Some(name) = name.to_str() else {
            skipped.push(Skipped { abs, reason: "name is not valid UTF-8".into() });
            continue;
        };
        if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
            if opts.clean_stale_temps && !rest.starts_with(&format!("{}-", std::process::id())) {
                let _ = std::fs::remove_file(&abs);
            }
            continue;
        }
        let wire = paths::join_wire(prefix, name);
        if paths::components(&wire).is_err() {
            skipped.push(Skipped { abs, reason: "path too long".into() });
            continue;
        }
        // Relative to the open directory, and not following a symlink.
        let md = match de.metadata() {
            Ok(m) => m,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    skipped.push(Skipped { abs, reason: e.to_string() });
                }
                continue;
            }
        };
        let ft = md.file_type();
        let mode = md.permissions().mode() & 0o777;
        if ft.is_dir() {
            if !visit.keep(&wire, true) {
                continue;
            }
            out.push(Found { path: wire.clone(), abs: abs.clone(), kind: EntryKind::Dir, size: 0, mode, link: None });
            if visit.descend(&wire) {
                walk(&abs, &wire, visit, opts, out, skipped);
            }
        } else if ft.is_file() {
            if visit.keep(&wire, false) {
                out.push(Found { path: wire, abs, kind: EntryKind::File, size: md.size(), mode, link: None });
            }
        } else if ft.is_symlink() {
            if !visit.keep(&wire, false) {
                continue;
            }
            match std::fs::read_link(&abs).map(|t| t.to_str().map(str::to_owned)) {
                Ok(Some(t)) => {
                    out.push(Found { path: wire, abs, kind: EntryKind::Symlink, size: 0, mode: 0o777, link: Some(t) })
                }
                Ok(None) => skipped.push(Skipped { abs, reason: "symlink target is not valid UTF-8".into() }),
                Err(e) => skipped.push(Skipped { abs, reason: e.to_string() }),
            }
        } else {
            skipped.push(Skipped { abs, reason: "not a regular file, directory or symlink".into() });
        }
    }
}

/// xxh3-64 of a file's content, read in large blocks.
pub fn hash_file(path: &Path) -> io::Result<(u64, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    Ok((h.digest(), len))
}

/// xxh3-64 of bytes already in memory.
pub fn hash_bytes(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// Hashes every file in `found` (on all cores) and returns index entries in
/// the same order. Files that vanish or cannot be read are dropped and
/// reported in `skipped`: they will be seen again by the next event or sync.
pub fn hash_all(found: Vec<Found>, skipped: &mut Vec<Skipped>) -> Vec<(Found, Entry)> {
    hash_unless(found, skipped, &|_| false)
}

/// [`hash_all`], except that files for which `skip` holds (asked when the
/// file's turn comes) are not read: their entries carry hash 0. For
/// callers that learn, while hashing, which files cannot be equal anyway.
pub fn hash_unless(
    found: Vec<Found>,
    skipped: &mut Vec<Skipped>,
    skip: &(dyn Fn(&Found) -> bool + Sync),
) -> Vec<(Found, Entry)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let total_bytes: u64 = found.iter().map(|f| f.size).sum();
    let hash_one = |f: Found| -> Result<(Found, Entry), Skipped> {
        let hash = if f.kind == EntryKind::File && !skip(&f) {
            match hash_file(&f.abs) {
                Ok((h, len)) if len == f.size => h,
                Ok(_) => return Err(Skipped { abs: f.abs, reason: "changed while being read".into() }),
                Err(e) => return Err(Skipped { abs: f.abs, reason: e.to_string() }),
            }
        } else {
            0
        };
        let e = Entry { path: f.path.clone(), kind: f.kind, size: f.size, mode: f.mode, hash, link: f.link.clone() };
        Ok((f, e))
    };
    let results: Vec<Result<(Found, Entry), Skipped>> = if threads < 2 || total_bytes < (8 << 20) {
        found.into_iter().map(hash_one).collect()
    } else {
        // Interleave files over the threads so large files spread out.
        let mut parts: Vec<Vec<(usize, Found)>> = (0..threads).map(|_| Vec::new()).collect();
        let n = found.len();
        for (i, f) in found.into_iter().enumerate() {
            parts[i % threads].push((i, f));
        }
        let mut slots: Vec<Option<Result<(Found, Entry), Skipped>>> = (0..n).map(|_| None).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| s.spawn(move || part.into_iter().map(|(i, f)| (i, hash_one(f))).collect::<Vec<_>>()))
                .collect();
            for h in handles {
                // A hashing thread only panics if hash_one panics, which it
                // does not; propagate if it ever does.
                for (i, r) in h.join().expect("hash thread") {
                    slots[i] = Some(r);
                }
            }
        });
        slots.into_iter().flatten().collect()
    };
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(x) => out.push(x),
            Err(s) => skipped.push(s),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_finds_files_dirs_links_and_skips_temps() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), "hello").unwrap();
        std::fs::write(d.path().join("top"), "x").unwrap();
        std::os::unix::fs::symlink("top", d.path().join("l")).unwrap();
        std::fs::write(d.path().join(".devloop-tmp-1-1"), "stale").unwrap();
        let mut out = vec![];
        let mut sk = vec![];
        walk(d.path(), "", &mut |_: &str, _: bool| true, WalkOptions { clean_stale_temps: true }, &mut out, &mut sk);
        let paths: Vec<_> = out.iter().map(|f| (f.path.as_str(), f.kind)).collect();
        assert_eq!(
            paths,
            vec![
                ("a", EntryKind::Dir),
                ("a/b", EntryKind::Dir),
                ("a/b/f", EntryKind::File),
                ("l", EntryKind::Symlink),
                ("top", EntryKind::File)
            ]
        );
        assert!(!d.path().join(".devloop-tmp-1-1").exists(), "stale temp removed");
        let hashed = hash_all(out, &mut sk);
        assert_eq!(hashed[2].1.hash, hash_bytes(b"hello"));
        assert_eq!(hashed[3].1.link.as_deref(), Some("top"));
    }
}
