//! Applies batches under the sync root. One worker thread applies every
//! batch of every session in arrival order, so two sessions never race on a
//! path.
//!
//! Invariant 1: nothing outside the root is written, deleted or followed.
//! Every wire path passes [`paths::components`]; every parent directory on
//! the way is checked with `lstat` to be a real directory (never a symlink);
//! the last component is replaced by `rename`, which does not follow links.
//! Tar entries other than files, directories and in-root symlinks are
//! refused.
//!
//! Invariant 2: a file is written to a temporary name beside its target and
//! renamed into place, so a reader sees the old content or the new, never
//! half of either.

use devloop_agent::codec::DecompressReader;
use devloop_agent::mux::BlockingReader;
use devloop_agent::paths::{self, WirePath};
use devloop_agent::protocol::{Encoding, PathError, TEMP_PREFIX};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// A batch's archive: still arriving (streamed from the connection), or
/// complete in memory (small batches).
pub enum Archive {
    Stream { reader: BlockingReader, encoding: Option<Encoding> },
    Buffered(Vec<u8>),
}

/// One batch handed to the worker.
pub struct Job {
    pub deletes: Vec<WirePath>,
    pub archive: Option<Archive>,
    pub done: oneshot::Sender<Outcome>,
}

/// The apply thread, and how many batches it holds.
pub struct Worker {
    tx: std::sync::mpsc::Sender<Job>,
    busy: Arc<AtomicUsize>,
}

impl Worker {
    /// Queues a batch; false if the thread is gone.
    pub fn send(&self, job: Job) -> bool {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.tx.send(job).is_ok()
    }

    /// True when no batch is queued or being applied: a batch applied
    /// elsewhere now cannot overtake one.
    pub fn idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub written: u64,
    pub deleted: u64,
    pub bytes: u64,
    pub errors: Vec<PathError>,
    pub apply_us: u64,
}

/// Starts the worker thread.
pub fn start(root: PathBuf) -> Worker {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let busy = Arc::new(AtomicUsize::new(0));
    let count = busy.clone();
    std::thread::Builder::new()
        .name("apply".into())
        .spawn(move || {
            for job in rx {
                let out = apply(&root, job.deletes, job.archive);
                reaper::remove_now();
                count.fetch_sub(1, Ordering::SeqCst);
                let _ = job.done.send(out);
            }
        })
        // Failing to start a thread at startup leaves nothing to serve.
        .expect("spawn apply thread");
    Worker { tx, busy }
}

/// Applies one batch: deletions first, then the archive.
pub fn apply(root: &Path, deletes: Vec<WirePath>, archive: Option<Archive>) -> Outcome {
    let t0 = Instant::now();
    let mut out = Outcome::default();
    if !deletes.is_empty() {
        reaper::remove_now();
    }
    for d in deletes {
        match delete(root, d.as_bytes()) {
            Ok(true) => out.deleted += 1,
            Ok(false) => {}
            Err(message) => out.errors.push(PathError { path: d, message }),
        }
    }
    match archive {
        Some(Archive::Stream { mut reader, encoding }) => {
            match encoding {
                None => apply_archive(root, &mut reader, &mut out),
                Some(Encoding::Zstd) => match DecompressReader::new(&mut reader) {
                    Ok(mut unpacked) => apply_archive(root, &mut unpacked, &mut out),
                    Err(e) => out.errors.push(PathError {
                        path: WirePath::default(),
                        message: format!("cannot start decompressing: {e}"),
                    }),
                },
            }
            // Whatever happened, consume the rest so the sender finishes.
            reader.drain();
        }
        Some(Archive::Buffered(bytes)) => apply_archive(root, &mut bytes.as_slice(), &mut out),
        None => {}
    }
    out.apply_us = t0.elapsed().as_micros() as u64;
    out
}

fn apply_archive(root: &Path, reader: &mut impl Read, out: &mut Outcome) {
    let mut ar = tar::Archive::new(reader);
    let entries = match ar.entries() {
        Ok(e) => e,
        Err(e) => {
            out.errors.push(PathError { path: WirePath::default(), message: format!("unreadable archive: {e}") });
            return;
        }
    };
    let mut dirs_ok = VerifiedDirs::default();
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // The stream itself is broken: nothing after this point can
                // be trusted to be framed correctly.
                out.errors.push(PathError {
                    path: WirePath::default(),
                    message: format!("archive is corrupt or truncated: {e}"),
                });
                return;
            }
        };
        let raw = entry.path_bytes().into_owned();
        match apply_entry(root, &raw, &mut entry, &mut dirs_ok) {
            Ok(Some(bytes)) => {
                out.written += 1;
                out.bytes += bytes;
            }
            Ok(None) => out.written += 1,
            Err(message) => out.errors.push(PathError { path: WirePath::new(raw), message }),
        }
    }
}

/// Directories of the root this batch has already checked (or made) to be
/// real directories, by wire path, so that a batch of many files checks
/// each parent once rather than once per file. An entry that replaces one
/// of them (a file or symlink where a checked directory was) empties the
/// set: from then on every parent is checked again, so a batch can never
/// write through a symlink it put in place of a directory.
#[derive(Default)]
struct VerifiedDirs(std::collections::HashSet<Vec<u8>>);

/// Applies one tar entry; returns the bytes written for a file.
fn apply_entry<R: Read>(
    root: &Path,
    raw: &[u8],
    entry: &mut tar::Entry<R>,
    dirs_ok: &mut VerifiedDirs,
) -> Result<Option<u64>, String> {
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    let mut path = raw;
    if kind == T::Directory {
        path = path.strip_suffix(b"/").unwrap_or(path);
    }
    let comps = paths::components(path).map_err(|e| e.to_string())?;
    let (name, parents) = comps.split_last().ok_or("empty path")?;
    let dir = ensure_dirs(root, parents, dirs_ok)?;
    let target = dir.join(OsStr::from_bytes(name));
    let mode = entry.header().mode().map_err(|e| format!("bad mode: {e}"))? & 0o777;
    if kind != T::Directory && dirs_ok.0.contains(path) {
        dirs_ok.0.clear();
    }
    match kind {
        T::Regular | T::Continuous => {
            let size = entry.size();
            let n = write_file(&dir, &target, entry, size, mode).map_err(|e| format!("write failed: {e}"))?;
            Ok(Some(n))
        }
        T::Directory => {
            // Owner rwx always: the agent must be able to write into it.
            let want = mode | 0o700;
            let create = || {
                std::fs::DirBuilder::new().mode(want).create(&target).map_err(|e| e.to_string())?;
                // mkdir applies the umask; only fix the mode when it bit.
                if want & umask() != 0 {
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(want))
                        .map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            };
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {
                    if m.permissions().mode() & 0o777 != want {
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(want))
                            .map_err(|e| e.to_string())?;
                    }
                }
                Ok(_) => {
                    // A file or symlink where a directory belongs: replace it
                    // (removing a symlink does not follow it).
                    std::fs::remove_file(&target).map_err(|e| e.to_string())?;
                    create()?;
                }
                Err(_) => create()?,
            }
            dirs_ok.0.insert(path.to_vec());
            Ok(None)
        }
        T::Symlink => {
            let link = entry.link_name_bytes().ok_or("symlink without a target")?.into_owned();
            paths::check_link_target(path, &link).map_err(|e| e.to_string())?;
            let tmp = temp_name(&dir);
            std::os::unix::fs::symlink(OsStr::from_bytes(&link), &tmp).map_err(|e| e.to_string())?;
            replace(&tmp, &target).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                e.to_string()
            })?;
            Ok(None)
        }
        T::Link => Err("hard links are not synced (only files, directories and symlinks)".into()),
        T::Char | T::Block | T::Fifo => Err("device and fifo entries are not synced".into()),
        other => Err(format!("tar entry type {:?} is not synced", other.as_byte() as char)),
    }
}

/// Makes sure every parent exists as a real directory under the root;
/// refuses to pass through a symlink or a file. Returns the last one.
fn ensure_dirs(root: &Path, parents: &[&[u8]], dirs_ok: &mut VerifiedDirs) -> Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    let mut wire = Vec::new();
    let shown = |i: usize| String::from_utf8_lossy(&parents[..=i].join(&b'/')).into_owned();
    for (i, c) in parents.iter().enumerate() {
        p.push(OsStr::from_bytes(c));
        if i > 0 {
            wire.push(b'/');
        }
        wire.extend_from_slice(c);
        if dirs_ok.0.contains(&wire) {
            continue;
        }
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("parent `{}` is a symlink; refusing to write through it", shown(i)))
            }
            Ok(_) => return Err(format!("parent `{}` is not a directory", shown(i))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&p).map_err(|e| format!("cannot create `{}`: {e}", shown(i)))?
            }
            Err(e) => return Err(e.to_string()),
        }
        dirs_ok.0.insert(wire.clone());
    }
    Ok(p)
}

static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Reads the process umask. Reading it means setting it, so call this once
/// at startup, before any other thread exists or any process is spawned.
pub fn init_umask() {
    // SAFETY: umask(2) swaps a process-wide integer; single-threaded here.
    let m = unsafe { libc::umask(0o077) };
    unsafe { libc::umask(m) };
    let _ = UMASK.set(m as u32);
}

/// The umask read at startup (the strictest one if it was not read).
fn umask() -> u32 {
    UMASK.get().copied().unwrap_or(0o777)
}

fn temp_name(dir: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    // The pid, asked once: getpid is a system call on every edit otherwise.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    dir.join(format!("{TEMP_PREFIX}{pid}-{}", N.fetch_add(1, Ordering::Relaxed)))
}

fn write_file(dir: &Path, target: &Path, src: &mut impl Read, size: u64, mode: u32) -> io::Result<u64> {
    let tmp = temp_name(dir);
    let res = (|| {
        // Created with its final mode when the umask cannot have changed it
        // (the common 0644/0755 under umask 022), saving an fchmod on the
        // hot path; otherwise private first, then the exact mode.
        let direct = mode & umask() == 0;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if direct { mode } else { 0o600 })
            .open(&tmp)?;
        let n = copy_in_large_writes(src, &mut f, size)?;
        if !direct {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        drop(f);
        replace(&tmp, target)?;
        Ok(n)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Largest write into a file being synced.
const WRITE_CHUNK: usize = 256 << 10;

/// Copies an entry's content (`size` announced) into its file, in writes
/// of up to [`WRITE_CHUNK`]. `io::copy` moves a generic reader through an
/// 8 KiB buffer: one `write(2)` per 8 KiB, 25,600 calls for a 200 MiB file.
/// The buffer is the thread's own, kept between files, and grows only as
/// large as the files need (a 1 KiB edit uses 1 KiB of it).
fn copy_in_large_writes(src: &mut impl Read, f: &mut std::fs::File, size: u64) -> io::Result<u64> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        let want = (size.min(WRITE_CHUNK as u64) as usize).max(1);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let buf = &mut buf[..want];
        let mut total = 0u64;
        loop {
            // Fill the buffer (the stream hands out one 64 KiB chunk per
            // read), then write it at once.
            let mut filled = 0;
            while filled < buf.len() {
                match src.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                return Ok(total);
            }
            f.write_all(&buf[..filled])?;
            total += filled as u64;
            if filled < buf.len() {
                return Ok(total);
            }
        }
    })
}

/// Renames `tmp` over `target`. An empty directory in the way is removed;
/// a non-empty one is an error (it holds paths devloop does not own).
///
/// A file or symlink in the way is swapped out with `RENAME_EXCHANGE` and
/// removed once the batch is acknowledged (see [`reaper`]), off the edit's path: renaming
/// over an existing file makes ext4 start writeback of the new file
/// (`auto_da_alloc`) and then, evicting the old inode, wait for the discard
/// of its blocks (~140 µs per edit on a disk mounted with `discard`, against
/// ~13 µs for an exchange). The price is ext4's zero-length-after-power-loss
/// heuristic, which a dev sync does not need: the next session resyncs by
/// content.
fn replace(tmp: &Path, target: &Path) -> io::Result<()> {
    // A new name (most of a first sync) takes one call. Where these flags
    // are not supported (an old kernel, some FUSE or network file systems),
    // or the entry changed meanwhile, a plain rename does.
    match rename2(tmp, target, libc::RENAME_NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            if std::fs::symlink_metadata(target).is_ok_and(|m| !m.is_dir())
                && rename2(tmp, target, libc::RENAME_EXCHANGE).is_ok()
            {
                reaper::remove_later(tmp.to_path_buf());
                return Ok(());
            }
        }
        Err(_) => {}
    }
    match std::fs::rename(tmp, target) {
        Err(e) if target.is_dir() && !target.is_symlink() => match std::fs::remove_dir(target) {
            Ok(()) => std::fs::rename(tmp, target),
            Err(_) => Err(io::Error::new(e.kind(), "a non-empty directory is in the way")),
        },
        r => r,
    }
}

/// `renameat2` with flags: `RENAME_NOREPLACE` (fails with EEXIST rather
/// than replace) or `RENAME_EXCHANGE` (atomically swaps the two paths).
fn rename2(a: &Path, b: &Path, flags: libc::c_uint) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r =
        unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Files swapped out by [`replace`], removed after the batch is
/// acknowledged rather than on the edit's path. A shared to-do list rather
/// than a thread of its own: waking a thread per edit competes for the CPU
/// with the reader who is waiting to see the file.
pub mod reaper {
    use std::path::PathBuf;
    use std::sync::Mutex;

    static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
        PENDING.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when no swapped-out path waits for removal.
    pub fn is_empty() -> bool {
        pending().is_empty()
    }

    /// Queues a swapped-out path for removal.
    pub fn remove_later(p: PathBuf) {
        pending().push(p);
    }

    /// Removes every queued path. Called after each batch is acknowledged,
    /// and before anything that must not see them: deleting directories (a
    /// leftover would keep one from being empty) and post-sync commands.
    pub fn remove_now() {
        let paths = std::mem::take(&mut *pending());
        for p in paths {
            // A directory swapped in by a concurrent writer is removed only
            // if empty; what is left is a stale temporary, which the next
            // agent's index walk removes.
            if std::fs::remove_file(&p).is_err() {
                let _ = std::fs::remove_dir(&p);
            }
        }
    }
}

/// Deletes one path. A directory is removed only when empty: what is left in
/// it belongs to someone else (excluded paths, files the app wrote).
/// Returns whether something was removed.
fn delete(root: &Path, wire: &[u8]) -> Result<bool, String> {
    let comps = paths::components(wire).map_err(|e| e.to_string())?;
    let (name, parents) = comps.split_last().ok_or("empty path")?;
    let mut p = root.to_path_buf();
    for (i, c) in parents.iter().enumerate() {
        p.push(OsStr::from_bytes(c));
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                let shown = String::from_utf8_lossy(&parents[..=i].join(&b'/')).into_owned();
                return Err(format!("parent `{shown}` is a symlink; refusing to delete through it"));
            }
            // Nothing can exist below a missing parent or a file.
            _ => return Ok(false),
        }
    }
    p.push(OsStr::from_bytes(name));
    match std::fs::symlink_metadata(&p) {
        Err(_) => Ok(false),
        Ok(m) if m.is_dir() => match std::fs::remove_dir(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(false),
            Err(e) => Err(e.to_string()),
        },
        Ok(_) => std::fs::remove_file(&p).map(|_| true).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_never_follows_a_symlinked_parent() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        assert!(delete(root.path(), b"link/victim").is_err());
        assert!(outside.path().join("victim").exists());
        // Deleting the link itself removes the link, not its target.
        assert_eq!(delete(root.path(), b"link"), Ok(true));
        assert!(outside.path().join("victim").exists());
    }

    /// Hands out at most `piece` bytes per read, like the stream's chunks.
    struct Pieces<'a> {
        data: &'a [u8],
        piece: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.piece).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn large_writes_copy_every_byte_in_order_across_pieces_and_buffers() {
        let d = tempfile::tempdir().unwrap();
        // Not a multiple of the piece or of the buffer; every byte distinct
        // in its neighbourhood, so a misplaced piece shows.
        let data: Vec<u8> = (0..WRITE_CHUNK * 2 + 12_345).map(|i| (i % 251) as u8).collect();
        for (size, piece) in [(data.len(), 1000), (data.len(), 64 << 10), (10, 3), (0, 7)] {
            let path = d.path().join(format!("f{size}-{piece}"));
            let mut f = std::fs::File::create(&path).unwrap();
            let n = copy_in_large_writes(&mut Pieces { data: &data[..size], piece }, &mut f, size as u64).unwrap();
            assert_eq!(n, size as u64);
            assert_eq!(std::fs::read(&path).unwrap(), &data[..size]);
        }
        // A stream that ends before its announced size: what came is written.
        let path = d.path().join("short");
        let mut f = std::fs::File::create(&path).unwrap();
        let n = copy_in_large_writes(&mut Pieces { data: &data[..5000], piece: 999 }, &mut f, 1 << 20).unwrap();
        assert_eq!(n, 5000);
        assert_eq!(std::fs::read(&path).unwrap(), &data[..5000]);
    }

    #[test]
    fn delete_keeps_non_empty_directories() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("d/excluded")).unwrap();
        assert_eq!(delete(root.path(), b"d"), Ok(false));
        assert!(root.path().join("d/excluded").exists());
        assert_eq!(delete(root.path(), b"missing/x"), Ok(false));
    }
}
