//! Content index of a tree: (path, kind, size, mode, hash) per entry. Both
//! sides build one for the first sync of a session, so that only what differs
//! travels, whatever the timestamps say.

pub use crate::hash_cache::{HashCache, HashStats};
use crate::paths::{self, WirePath};
use crate::protocol::{Entry, EntryKind, TEMP_PREFIX};
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One entry found by [`walk`], before hashing.
#[derive(Debug, Clone)]
pub struct Found {
    /// Wire path (relative to the root the walk's prefix is relative to).
    pub path: WirePath,
    pub abs: PathBuf,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub link: Option<WirePath>,
    /// Device and inode, and the number of names the inode has: a file
    /// with several names (hard links) changes under all of them when
    /// written through one.
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Last change of content and of the inode, in ns since the epoch:
    /// with the inode and size, what the [`HashCache`] keys a hash on.
    pub mtime: i64,
    pub ctime: i64,
}

impl Found {
    /// The entry for what `md` (from `symlink_metadata`) says is at `abs`:
    /// sizes of files only, and a symlink's mode is always 0o777. A
    /// symlink's `link` is the caller's to read.
    pub fn of(path: WirePath, abs: PathBuf, kind: EntryKind, md: &std::fs::Metadata) -> Found {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Found {
            path,
            abs,
            kind,
            size: if kind == EntryKind::File { md.size() } else { 0 },
            mode: if kind == EntryKind::Symlink { 0o777 } else { md.permissions().mode() & 0o777 },
            link: None,
            dev: md.dev(),
            ino: md.ino(),
            nlink: md.nlink(),
            mtime: ns(md.mtime(), md.mtime_nsec()),
            ctime: ns(md.ctime(), md.ctime_nsec()),
        }
    }
}

/// Something the walk could not read, and why (a directory it could not
/// list, a file it could not stat or read). `wire` is its path when it is
/// something the source may hold: what lies there is unknown, so it must
/// never be taken for absent. A socket or device is left out on purpose
/// and has none.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub abs: PathBuf,
    pub wire: Option<WirePath>,
    pub reason: String,
}

/// What a walk wants done with a path it reached.
pub trait Visit {
    /// Return false to leave the path (and, for a directory, all below it)
    /// out of the walk.
    fn keep(&mut self, wire: &WirePath, is_dir: bool) -> bool;

    /// Called with each directory's listing (`has(name)`) before any of its
    /// entries is visited: the CLI reads ignore files here, only where the
    /// listing shows one (probing for them costs two `stat`s a directory).
    fn entered(&mut self, _dir: &Path, _has: &dyn Fn(&str) -> bool) {}

    /// Whether to walk below a kept directory now (false: the caller walks
    /// it later, for instance on another thread).
    fn descend(&mut self, _wire: &WirePath) -> bool {
        true
    }
}

impl<F: FnMut(&WirePath, bool) -> bool> Visit for F {
    fn keep(&mut self, wire: &WirePath, is_dir: bool) -> bool {
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
/// A missing `base` is an empty tree; one that cannot be listed is
/// reported in `skipped` (with its wire path: its contents are unknown).
pub fn walk(
    base: &Path,
    prefix: &WirePath,
    visit: &mut dyn Visit,
    opts: WalkOptions,
    out: &mut Vec<Found>,
    skipped: &mut Vec<Skipped>,
) {
    let rd = match std::fs::read_dir(base) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            skipped.push(Skipped { abs: base.to_path_buf(), wire: Some(prefix.clone()), reason: e.to_string() });
            return;
        }
    };
    let mut names = Vec::new();
    for e in rd {
        match e {
            Ok(e) => names.push((e.file_name(), e)),
            // The listing broke off part-way: what it did not list is
            // unknown, so the whole directory is.
            Err(err) => {
                skipped.push(Skipped { abs: base.to_path_buf(), wire: Some(prefix.clone()), reason: err.to_string() });
                return;
            }
        }
    }
    // Sorted so that indexes and batches come out in a stable order.
    names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    visit.entered(base, &|n| names.iter().any(|(x, _)| x == n));
    for (name, de) in names {
        let abs = de.path();
        let name = name.as_bytes();
        if let Some(rest) = name.strip_prefix(TEMP_PREFIX.as_bytes()) {
            if opts.clean_stale_temps && !rest.starts_with(format!("{}-", std::process::id()).as_bytes()) {
                let _ = std::fs::remove_file(&abs);
            }
            continue;
        }
        let wire = prefix.join(name);
        if paths::components(wire.as_bytes()).is_err() {
            skipped.push(Skipped { abs, wire: None, reason: "path too long".into() });
            continue;
        }
        // Relative to the open directory, and not following a symlink.
        let md = match de.metadata() {
            Ok(m) => m,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    skipped.push(Skipped { abs, wire: Some(wire), reason: e.to_string() });
                }
                continue;
            }
        };
        let ft = md.file_type();
        let found = |kind| Found::of(wire.clone(), abs.clone(), kind, &md);
        if ft.is_dir() {
            if !visit.keep(&wire, true) {
                continue;
            }
            out.push(found(EntryKind::Dir));
            if visit.descend(&wire) {
                walk(&abs, &wire, visit, opts, out, skipped);
            }
        } else if ft.is_file() {
            if visit.keep(&wire, false) {
                out.push(found(EntryKind::File));
            }
        } else if ft.is_symlink() {
            if !visit.keep(&wire, false) {
                continue;
            }
            match std::fs::read_link(&abs) {
                Ok(t) => {
                    let link = WirePath::new(t.into_os_string().into_vec());
                    out.push(Found { link: Some(link), ..found(EntryKind::Symlink) })
                }
                Err(e) => skipped.push(Skipped { abs, wire: Some(wire), reason: e.to_string() }),
            }
        } else {
            skipped.push(Skipped { abs, wire: None, reason: "not a regular file, directory or symlink".into() });
        }
    }
}

/// A visitor that keeps what `keep` says, entering directories or not.
struct Shallow<'a> {
    keep: &'a (dyn Fn(&WirePath, bool) -> bool + Sync),
    descend: bool,
}

impl Visit for Shallow<'_> {
    fn keep(&mut self, wire: &WirePath, is_dir: bool) -> bool {
        (self.keep)(wire, is_dir)
    }

    fn descend(&mut self, _wire: &WirePath) -> bool {
        self.descend
    }
}

/// [`walk`] on all cores, for a visitor with no state of its own (the
/// agent's index): the top level here, then each top-level directory on
/// whichever thread is free ([`share_out`]). The result is in the same
/// order as [`walk`]'s. A walk is mostly `stat`s and directory reads,
/// which run in parallel in the kernel. (The CLI's walk, whose visitor
/// loads ignore files as it goes, shares its work out the same way, with a
/// filter per thread, in `sync::scan`.)
pub fn walk_parallel(
    base: &Path,
    prefix: &WirePath,
    keep: &(dyn Fn(&WirePath, bool) -> bool + Sync),
    opts: WalkOptions,
    out: &mut Vec<Found>,
    skipped: &mut Vec<Skipped>,
) -> Result<(), ScanFailed> {
    let mut top = Vec::new();
    walk(base, prefix, &mut Shallow { keep, descend: false }, opts, &mut top, skipped);
    let dirs: Vec<usize> = (0..top.len()).filter(|&i| top[i].kind == EntryKind::Dir).collect();
    let (subs, _) = share_out(dirs.len(), "walking", &|| (), &|_, k| {
        let (mut found, mut sk) = (Vec::new(), Vec::new());
        let d = &top[dirs[k]];
        walk(&d.abs, &d.path, &mut Shallow { keep, descend: true }, opts, &mut found, &mut sk);
        (found, sk)
    })?;
    // Each directory's subtree goes right after the directory.
    let mut subs = subs.into_iter();
    for f in top {
        let is_dir = f.kind == EntryKind::Dir;
        out.push(f);
        if let Some((found, sk)) = is_dir.then(|| subs.next()).flatten() {
            out.extend(found);
            skipped.extend(sk);
        }
    }
    Ok(())
}

/// Runs `work(state, k)` for every `k` in `0..n` on all cores (up to 8
/// threads): each thread takes the next `k` until none is left, with a
/// state of its own from `init`, and this thread works too, so a helper
/// thread that cannot be started costs only speed. Returns the results in
/// the order of `k`, and each thread's state. A thread that panics fails
/// the whole call: a partial walk or hash must never pass for the whole
/// tree. `what` names the work in that error ("walking", "hashing").
pub fn share_out<S: Send, T: Send>(
    n: usize,
    what: &str,
    init: &(dyn Fn() -> S + Sync),
    work: &(dyn Fn(&mut S, usize) -> T + Sync),
) -> Result<(Vec<T>, Vec<S>), ScanFailed> {
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get()).clamp(1, 8).min(n.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || {
        let mut state = init();
        let mut done = Vec::new();
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if k >= n {
                break;
            }
            done.push((k, work(&mut state, k)));
        }
        (done, state)
    };
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut states = Vec::with_capacity(threads);
    let mut failed = None;
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                if crate::fault::hit("spawn-fail") {
                    return None;
                }
                std::thread::Builder::new().name(what.into()).spawn_scoped(s, worker).ok()
            })
            .collect();
        let mut take = |r: std::thread::Result<(Vec<(usize, T)>, S)>| match r {
            Ok((done, state)) => {
                done.into_iter().for_each(|(k, t)| slots[k] = Some(t));
                states.push(state);
            }
            Err(p) => failed = Some(panic_message(&*p)),
        };
        take(std::panic::catch_unwind(std::panic::AssertUnwindSafe(worker)));
        for h in helpers {
            take(h.join());
        }
    });
    if let Some(m) = failed {
        return Err(ScanFailed(format!("a {what} thread panicked: {m}")));
    }
    if slots.iter().any(Option::is_none) {
        return Err(ScanFailed(format!("a {what} thread left work undone")));
    }
    Ok((slots.into_iter().flatten().collect(), states))
}

/// xxh3-64 of a file's content, read in large blocks.
pub fn hash_file(path: &Path) -> io::Result<(u64, u64)> {
    let mut f = std::fs::File::open(path)?;
    // A buffer the size of the file, up to 256 KiB: a 256 KiB buffer for
    // every file (zeroed, and above malloc's mmap threshold mapped and
    // faulted in) cost more than hashing a tree of small files.
    let size = f.metadata().map_or(0, |m| m.len());
    let mut buf = vec![0u8; (size as usize).clamp(4096, 256 << 10)];
    let mut h = xxhash_rust::xxh3::Xxh3::new();
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

/// The scan itself failed (a hashing thread panicked): nothing it
/// produced may be taken as the state of the tree.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the scan failed: {0}")]
pub struct ScanFailed(pub String);

/// Hashes every file in `found` (on all cores) and returns index entries in
/// the same order. Files that vanish, change while being read or cannot be
/// read are left out and reported in `skipped`, with their wire path: they
/// are unknown, never absent.
pub fn hash_all(found: Vec<Found>, skipped: &mut Vec<Skipped>) -> Result<Vec<(Found, Entry)>, ScanFailed> {
    hash_cached(found, skipped, &|_| false, &HashCache::none()).map(|(h, _)| h)
}

/// [`hash_all`], except that files whose hash `cache` knows are not read,
/// and neither are files for which `skip` holds (asked when the file's
/// turn comes): their entries carry hash 0. `skip` is for callers that
/// learn, while hashing, which files cannot be equal anyway.
///
/// A helper thread that cannot be started costs speed (its share is hashed
/// here); one that panics fails the whole call, so that a broken scan can
/// never pass for a tree that lacks the files it did not get to.
pub fn hash_cached(
    found: Vec<Found>,
    skipped: &mut Vec<Skipped>,
    skip: &(dyn Fn(&Found) -> bool + Sync),
    cache: &HashCache,
) -> Result<(Vec<(Found, Entry)>, HashStats), ScanFailed> {
    let total_bytes: u64 = found.iter().map(|f| f.size).sum();
    // Ok with whether the hash came from the cache.
    let hash_one = |f: Found| -> Result<(Found, Entry, bool), Skipped> {
        if crate::fault::hit("hash-panic") {
            panic!("fault injected: hash-panic");
        }
        let cached = cache.get(&f);
        let hash = if let Some(h) = cached {
            h
        } else if f.kind == EntryKind::File && !skip(&f) {
            match hash_file(&f.abs) {
                Ok((h, len)) if len == f.size => h,
                Ok(_) => {
                    return Err(Skipped { abs: f.abs, wire: Some(f.path), reason: "changed while being read".into() })
                }
                Err(e) => return Err(Skipped { abs: f.abs, wire: Some(f.path), reason: e.to_string() }),
            }
        } else {
            0
        };
        let e = Entry { path: f.path.clone(), kind: f.kind, size: f.size, mode: f.mode, hash, link: f.link.clone() };
        Ok((f, e, cached.is_some()))
    };
    let results: Vec<Result<(Found, Entry, bool), Skipped>> = if total_bytes < (8 << 20) {
        found.into_iter().map(hash_one).collect()
    } else {
        // Each file is taken by whichever thread gets to it first.
        let files: Vec<std::sync::Mutex<Option<Found>>> =
            found.into_iter().map(|f| std::sync::Mutex::new(Some(f))).collect();
        let take = |k: usize| files[k].lock().unwrap_or_else(|e| e.into_inner()).take();
        share_out(files.len(), "hashing", &|| (), &|_, k| take(k).map(hash_one))?.0.into_iter().flatten().collect()
    };
    let mut out = Vec::with_capacity(results.len());
    let mut stats = HashStats::default();
    for r in results {
        match r {
            Ok((f, e, cached)) => {
                if f.kind == EntryKind::File && e.hash != 0 {
                    match cached {
                        true => stats.reused += 1,
                        false => stats.read += 1,
                    }
                }
                out.push((f, e))
            }
            Err(s) => skipped.push(s),
        }
    }
    Ok((out, stats))
}

/// The message of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
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
        let root = WirePath::default();
        walk(
            d.path(),
            &root,
            &mut |_: &WirePath, _: bool| true,
            WalkOptions { clean_stale_temps: true },
            &mut out,
            &mut sk,
        );
        let paths: Vec<_> = out.iter().map(|f| (f.path.to_str().unwrap(), f.kind)).collect();
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
        let hashed = hash_all(out, &mut sk).unwrap();
        assert_eq!(hashed[2].1.hash, hash_bytes(b"hello"));
        assert_eq!(hashed[3].1.link, Some(WirePath::from("top")));
    }

    /// The walk on all cores finds what the walk on one finds, in the same
    /// order, leaving out the same pruned directory. (With no helper
    /// thread: `threads_that_cannot_start_cost_only_speed`, tests/data_safety.rs.)
    #[test]
    fn the_parallel_walk_is_the_walk() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..40 {
            let dir = d.path().join(format!("d{}/sub{}", i % 7, i % 3));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{i}")), format!("{i}")).unwrap();
        }
        std::fs::create_dir_all(d.path().join("pruned/deep")).unwrap();
        std::fs::write(d.path().join("pruned/deep/x"), "x").unwrap();
        std::fs::write(d.path().join("top"), "t").unwrap();
        std::os::unix::fs::symlink("top", d.path().join("link")).unwrap();
        let root = WirePath::default();
        let keep = |w: &WirePath, is_dir: bool| !(is_dir && w.as_bytes() == b"pruned");
        let (mut one, mut sk) = (vec![], vec![]);
        walk(
            d.path(),
            &root,
            &mut |w: &WirePath, is_dir: bool| keep(w, is_dir),
            WalkOptions::default(),
            &mut one,
            &mut sk,
        );
        let paths = |v: &[Found]| v.iter().map(|f| (f.path.to_str().unwrap().to_string(), f.kind)).collect::<Vec<_>>();
        assert!(paths(&one).iter().all(|(p, _)| !p.starts_with("pruned")));
        let (mut all, mut sk) = (vec![], vec![]);
        walk_parallel(d.path(), &root, &keep, WalkOptions::default(), &mut all, &mut sk).unwrap();
        assert_eq!(paths(&all), paths(&one));
    }

    /// A file whose size changed between the walk and the read is not
    /// dropped quietly: it comes back as skipped with its wire path, so the
    /// caller knows it is unknown (not absent).
    #[test]
    fn a_file_that_changed_while_read_is_unknown_not_absent() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("grew"), "longer now").unwrap();
        let mut found = vec![];
        let mut sk = vec![];
        let root = WirePath::default();
        walk(d.path(), &root, &mut |_: &WirePath, _: bool| true, WalkOptions::default(), &mut found, &mut sk);
        found[0].size = 3;
        let hashed = hash_all(found, &mut sk).unwrap();
        assert!(hashed.is_empty());
        assert_eq!(sk.len(), 1);
        assert_eq!(sk[0].wire, Some(WirePath::from("grew")));
        assert!(sk[0].reason.contains("changed while being read"), "{}", sk[0].reason);
    }
}
