//! Content hashes remembered between scans, so that a tree that has not
//! changed is walked, not read: an unchanged re-sync costs a `stat` per
//! file on each side instead of reading every byte twice.
//!
//! A hash is keyed by what `stat` says of the file: device and inode,
//! size, mtime and ctime. Any write changes mtime and ctime; ctime cannot
//! be set back from user space, so restoring an mtime (`touch -d`, `tar
//! -x`) does not hide a change. The one gap is a write in the same clock
//! tick as the stat that saw the file (timestamps advance in ticks of a
//! few milliseconds, or seconds on some filesystems): a hash is only kept
//! for a file whose mtime and ctime were at least [`SETTLED`] old when the
//! scan began, as git does with "racily clean" entries. A file written
//! more recently is hashed every time until it has settled.
//!
//! The cache is a file, written whole (temporary, then rename) and read
//! whole. It is only ever a hint to skip reading: one that is missing,
//! truncated, corrupt, a symlink, not ours or writable by others is
//! ignored, and the files are read.

use crate::index::Found;
use crate::protocol::{Entry, EntryKind};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a file must have been left alone before its hash is kept.
pub const SETTLED: Duration = Duration::from_secs(2);

/// Trees smaller than this are hashed every time (it costs less than a
/// file to remember them in).
const WORTH_FILES: usize = 1000;
const WORTH_BYTES: u64 = 64 << 20;

const MAGIC: &[u8; 16] = b"devloop-hashes1\n";
const RECORD: usize = 48;
/// A cache file larger than this is not read (about 1.4 million files).
const MAX_FILE: u64 = 64 << 20;

/// What `stat` said of a file, and its content's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Record {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    ctime: i64,
    hash: u64,
}

impl Record {
    fn of(f: &Found, hash: u64) -> Record {
        Record { dev: f.dev, ino: f.ino, size: f.size, mtime: f.mtime, ctime: f.ctime, hash }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.dev, self.ino, self.size, self.mtime as u64, self.ctime as u64, self.hash] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(b: &[u8]) -> Record {
        let v = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Record { dev: v(0), ino: v(1), size: v(2), mtime: v(3) as i64, ctime: v(4) as i64, hash: v(5) }
    }
}

/// The hashes a scan may reuse, and where to keep the next scan's.
#[derive(Debug, Default)]
pub struct HashCache {
    path: Option<PathBuf>,
    /// Sorted by (dev, ino).
    known: Vec<Record>,
    /// When the scan began, in ns since the epoch: what is younger than
    /// [`SETTLED`] at this moment is not kept.
    began: i64,
}

/// How a scan's hashes were come by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashStats {
    /// Files read and hashed.
    pub read: u64,
    /// Files whose hash came from the cache.
    pub reused: u64,
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64)
}

impl HashCache {
    /// No cache: every file is read, nothing is kept.
    pub fn none() -> HashCache {
        HashCache::default()
    }

    /// The cache kept at `path`, for a scan that begins now. Call it before
    /// the walk.
    pub fn open(path: PathBuf) -> HashCache {
        HashCache::open_at(path, SystemTime::now())
    }

    /// [`HashCache::open`] for a scan that began at `now`.
    pub fn open_at(path: PathBuf, now: SystemTime) -> HashCache {
        let known = read(&path).unwrap_or_default();
        HashCache { path: Some(path), known, began: nanos(now) }
    }

    /// The hash of `f`'s content, if the cache knows this very file as it
    /// is now.
    pub fn get(&self, f: &Found) -> Option<u64> {
        if f.kind != EntryKind::File || self.known.is_empty() {
            return None;
        }
        let i = self.known.binary_search_by(|r| (r.dev, r.ino).cmp(&(f.dev, f.ino))).ok()?;
        let r = &self.known[i];
        (r.size == f.size && r.mtime == f.mtime && r.ctime == f.ctime && self.settled(f)).then_some(r.hash)
    }

    fn settled(&self, f: &Found) -> bool {
        let limit = self.began.saturating_sub(SETTLED.as_nanos() as i64);
        f.mtime < limit && f.ctime < limit
    }

    /// Keeps the hashes of this scan's settled files (and only those:
    /// files gone from the tree are forgotten) for the next scan. A cache
    /// that cannot be written costs the next scan its speed, nothing else.
    pub fn store(self, hashed: &[(Found, Entry)]) {
        let Some(path) = &self.path else { return };
        let files = hashed.iter().filter(|(f, _)| f.kind == EntryKind::File);
        let bytes: u64 = files.clone().map(|(f, _)| f.size).sum();
        if files.clone().count() < WORTH_FILES && bytes < WORTH_BYTES {
            return;
        }
        // Hash 0 is a file whose reading was skipped (see `hash_unless`).
        let mut keep: Vec<Record> = files
            .filter(|(f, e)| e.hash != 0 && e.size == f.size && self.settled(f))
            .map(|(f, e)| Record::of(f, e.hash))
            .collect();
        keep.sort_unstable();
        keep.dedup_by_key(|r| (r.dev, r.ino));
        if keep == self.known {
            return;
        }
        drop(self.known);
        let _ = write(path, &keep);
    }
}

/// The records of a cache file, or None if there is none or it cannot be
/// trusted.
fn read(path: &Path) -> Option<Vec<Record>> {
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    let md = f.metadata().ok()?;
    // Someone else's file, or one others may write, is not taken for ours.
    if !md.is_file() || md.uid() != unsafe { libc::geteuid() } || md.mode() & 0o022 != 0 || md.len() > MAX_FILE {
        return None;
    }
    let mut b = Vec::with_capacity(md.len() as usize);
    f.read_to_end(&mut b).ok()?;
    let body = b.len().checked_sub(8)?;
    if b.len() < MAGIC.len() + 16 || &b[..MAGIC.len()] != MAGIC {
        return None;
    }
    let (content, sum) = b.split_at(body);
    if crate::index::hash_bytes(content).to_le_bytes() != sum {
        return None;
    }
    let records = &content[MAGIC.len()..];
    if records.len() % RECORD != 0 {
        return None;
    }
    let mut out: Vec<Record> = records.chunks_exact(RECORD).map(Record::decode).collect();
    if !out.windows(2).all(|w| (w[0].dev, w[0].ino) < (w[1].dev, w[1].ino)) {
        out.sort_unstable();
        out.dedup_by_key(|r| (r.dev, r.ino));
    }
    Some(out)
}

/// Writes the records to `path` whole: a reader sees the old file or the
/// new one, never half of one.
fn write(path: &Path, records: &[Record]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per write: the sessions of one process (a service's pods)
    // may write the same cache at once.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    // Streamed (a copy of 100k records would cost 5 MB at the moment the
    // first sync holds the most).
    let mut out = std::io::BufWriter::with_capacity(64 << 10, f);
    let mut sum = xxhash_rust::xxh3::Xxh3::new();
    let mut put = |b: &[u8]| {
        sum.update(b);
        out.write_all(b)
    };
    let mut done = put(MAGIC);
    let mut rec = Vec::with_capacity(RECORD);
    for r in records {
        rec.clear();
        r.encode(&mut rec);
        done = done.and_then(|_| put(&rec));
    }
    let done = done
        .and_then(|_| out.write_all(&sum.digest().to_le_bytes()))
        .and_then(|_| out.flush())
        .and_then(|_| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    if done.is_ok() {
        prune(dir, &name);
    }
    done
}

/// Caches of trees not synced for this long are removed (by whoever
/// writes a cache beside them), so that every tree ever synced does not
/// leave a file behind for good.
const FORGOTTEN: Duration = Duration::from_secs(30 * 24 * 3600);

/// Removes the caches beside `name` (same prefix, see [`path_for`]) that
/// were not written for [`FORGOTTEN`].
fn prune(dir: &Path, name: &str) {
    let Some(prefix) = name.len().checked_sub(16).and_then(|i| name.get(..i)) else { return };
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    for e in rd.flatten() {
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        let ours =
            n.len() == name.len() && n.starts_with(prefix) && n[prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit());
        if !ours || n == name {
            continue;
        }
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| now.duration_since(t).ok());
        if old.is_some_and(|age| age > FORGOTTEN) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where a process keeps, in `dir`, the cache for the trees `key` names
/// (their paths, say): one file each, named `prefix` and a hash of `key`.
pub fn path_for(dir: &Path, prefix: &str, key: &[u8]) -> PathBuf {
    dir.join(format!("{prefix}{:016x}", crate::index::hash_bytes(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{self, WalkOptions};
    use crate::paths::WirePath;

    fn scan(root: &Path) -> Vec<Found> {
        let (mut found, mut skipped) = (vec![], vec![]);
        let keep = &mut |_: &WirePath, _: bool| true;
        index::walk(root, &WirePath::default(), keep, WalkOptions::default(), &mut found, &mut skipped);
        assert!(skipped.is_empty(), "{skipped:?}");
        found
    }

    /// A tree of `n` files worth caching.
    fn tree(n: usize) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for i in 0..n {
            std::fs::write(d.path().join(format!("f{i:04}")), format!("content {i}")).unwrap();
        }
        d
    }

    /// A tree of 1200 files, scanned 10 s from now (all settled) with a
    /// cache at `at` in `dir`, which now holds their hashes.
    fn stored() -> (tempfile::TempDir, tempfile::TempDir, PathBuf, HashStats) {
        let d = tree(1200);
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("c");
        let c = HashCache::open_at(at.clone(), later(10));
        let (first, stats) = hash(scan(d.path()), &c);
        c.store(&first);
        (d, dir, at, stats)
    }

    fn later(s: u64) -> SystemTime {
        SystemTime::now() + Duration::from_secs(s)
    }

    fn hash(found: Vec<Found>, cache: &HashCache) -> (Vec<(Found, Entry)>, HashStats) {
        let mut skipped = vec![];
        let r = index::hash_cached(found, &mut skipped, &|_| false, cache).unwrap();
        assert!(skipped.is_empty());
        r
    }

    /// Settled files are read once; the next scan takes their hashes from
    /// the cache, and they are the hashes of their content.
    #[test]
    fn a_settled_tree_is_read_once() {
        let (d, _dir, at, stats) = stored();
        assert_eq!(stats, HashStats { read: 1200, reused: 0 });
        let c = HashCache::open_at(at.clone(), later(20));
        let (second, stats) = hash(scan(d.path()), &c);
        assert_eq!(stats, HashStats { read: 0, reused: 1200 });
        for (f, e) in &second {
            assert_eq!(e.hash, index::hash_bytes(&std::fs::read(&f.abs).unwrap()), "{}", f.path);
        }
        let md = std::fs::metadata(&at).unwrap();
        assert_eq!(md.mode() & 0o777, 0o600, "the cache is private");
    }

    /// A file rewritten with the same size and its old mtime put back is
    /// read again: its ctime moved.
    #[test]
    fn a_changed_file_is_read_again() {
        let (d, _dir, at, _) = stored();
        let f = d.path().join("f0007");
        let old = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, "CONTENT 7").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().modified().unwrap(), old, "mtime put back");
        let c = HashCache::open_at(at, later(20));
        let (second, stats) = hash(scan(d.path()), &c);
        assert_eq!(stats, HashStats { read: 1, reused: 1199 });
        let e = &second.iter().find(|(x, _)| x.path.as_bytes() == b"f0007").unwrap().1;
        assert_eq!(e.hash, index::hash_bytes(b"CONTENT 7"));
    }

    /// Files written just before the scan began are read, and their
    /// hashes are not kept: a write in the same clock tick could follow
    /// unseen.
    #[test]
    fn young_files_are_not_kept() {
        let d = tree(1200);
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("c");
        let c = HashCache::open_at(at.clone(), SystemTime::now());
        let (first, stats) = hash(scan(d.path()), &c);
        assert_eq!(stats.read, 1200);
        c.store(&first);
        let c = HashCache::open_at(at, later(10));
        assert_eq!(hash(scan(d.path()), &c).1, HashStats { read: 1200, reused: 0 });
    }

    /// A cache file that is corrupt, truncated, a symlink or writable by
    /// others is ignored: every file is read, and hashed right.
    #[test]
    fn an_untrustworthy_cache_is_ignored() {
        let (d, dir, at, _) = stored();
        let good = std::fs::read(&at).unwrap();
        let reads = |what: &str| {
            let c = HashCache::open_at(at.clone(), later(20));
            let (out, stats) = hash(scan(d.path()), &c);
            for (f, e) in &out {
                assert_eq!(e.hash, index::hash_bytes(&std::fs::read(&f.abs).unwrap()), "{what}: {}", f.path);
            }
            stats.read
        };
        assert_eq!(reads("good"), 0);
        let mut flipped = good.clone();
        flipped[MAGIC.len() + 40] ^= 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a flipped bit", flipped),
            ("truncated", good[..good.len() - 13].to_vec()),
            ("empty", vec![]),
            ("garbage", vec![0xff; 5000]),
        ];
        for (what, bytes) in cases {
            std::fs::write(&at, bytes).unwrap();
            assert_eq!(reads(what), 1200, "{what}");
        }
        std::fs::write(&at, &good).unwrap();
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(reads("writable by others"), 1200);
        std::fs::remove_file(&at).unwrap();
        let real = dir.path().join("real");
        std::fs::write(&real, &good).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&real, &at).unwrap();
        assert_eq!(reads("a symlink"), 1200);
    }

    use std::os::unix::fs::PermissionsExt;

    /// Writing a cache removes the caches beside it that were not written
    /// for 30 days, and nothing else.
    #[test]
    fn forgotten_caches_are_removed() {
        let d = tree(1200);
        let dir = tempfile::tempdir().unwrap();
        let name = |k: &str| path_for(dir.path(), "h-", k.as_bytes());
        let (stale, recent, other) = (name("stale"), name("recent"), dir.path().join("h-notacache"));
        for p in [&stale, &recent, &other] {
            std::fs::write(p, "x").unwrap();
        }
        let long_ago = SystemTime::now() - Duration::from_secs(40 * 24 * 3600);
        for p in [&stale, &other] {
            std::fs::File::options().write(true).open(p).unwrap().set_modified(long_ago).unwrap();
        }
        let c = HashCache::open_at(name("this"), later(10));
        let (first, _) = hash(scan(d.path()), &c);
        c.store(&first);
        assert!(name("this").exists());
        assert!(!stale.exists(), "a cache not written for 40 days is removed");
        assert!(recent.exists() && other.exists(), "a recent cache, and a file that is not a cache, stay");
    }

    /// A small tree is not worth a file.
    #[test]
    fn a_small_tree_leaves_no_file() {
        let d = tree(10);
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("c");
        let c = HashCache::open_at(at.clone(), later(10));
        let (first, _) = hash(scan(d.path()), &c);
        c.store(&first);
        assert!(!at.exists());
    }
}
