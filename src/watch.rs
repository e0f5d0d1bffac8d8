//! File watching: inotify, read on the async runtime itself.
//!
//! Directories are watched one by one (non-recursively), and only those the
//! filter keeps, so `node_modules` or `target/` cost no watches and no
//! events. The sync engine adds a watch when it finds a new directory.
//!
//! The inotify descriptor is polled by the runtime (`AsyncFd`), not by a
//! watcher thread of its own: an edit wakes the runtime once, and the
//! engine task runs next on the same thread. (A watcher thread, as in the
//! `notify` crate, costs every edit one more cross-thread wake-up; with the
//! agent's stdio moved onto its own runtime thread, this took the
//! edit-to-visible p50 from 0.61-0.68 ms to 0.53-0.56 ms on the 2-core VM.)
//!
//! The reader task hands changes to each subscriber through a bounded
//! channel with `try_send`. When a channel is full, the change is dropped
//! and that subscriber's overflow flag set; its engine then rescans
//! everything, which is correct whatever was lost (events are only hints of
//! where to look). A kernel queue overflow is a rescan for everyone.
//!
//! One watcher serves every session of a service: the sessions of a
//! Kubernetes target's replicas [`subscribe`](Watch::subscribe) to the same
//! inotify watches, so ten replicas cost one set of watches, not ten.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

/// Changes waiting for an engine before they are dropped (and it rescans).
const QUEUE: usize = 8192;
/// How often a file that is still being written is reported again.
const WRITING_REMINDER: Duration = Duration::from_millis(100);
/// What is watched in each directory. Opens and reads change nothing.
const MASK: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// What the watcher tells the engine.
#[derive(Debug, Clone)]
pub enum Change {
    /// These paths may have changed and are at rest: closed after writing,
    /// renamed, removed, chmod-ed, or a directory created.
    Settled(Vec<PathBuf>),
    /// These files are being written (data modified, or created) and not yet
    /// closed. Syncing them now would send a half-written file (editors
    /// that save in place truncate first), so the engine waits for their
    /// close, or a short deadline for files held open.
    Writing(Vec<PathBuf>),
    /// Events were lost (queue overflow, kernel queue overflow, watcher
    /// error): look at everything again.
    Rescan(String),
}

/// A subscription to a shared watcher. `add` and `remove_tree` act on the
/// shared watches; the overflow flag is this subscriber's own.
pub struct Watch {
    shared: Arc<Shared>,
    overflow: Arc<AtomicBool>,
}

/// What every subscription shares; the reader task stops when it goes.
struct Shared {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Watch descriptor → directory, and the directories watched.
    dirs: Arc<Mutex<Dirs>>,
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    _stop: oneshot::Sender<()>,
}

#[derive(Default)]
struct Dirs {
    by_wd: HashMap<i32, PathBuf>,
    watched: HashMap<PathBuf, i32>,
}

struct Subscriber {
    tx: mpsc::Sender<Change>,
    overflow: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watch {
    /// Starts the watcher (on the current runtime); changes arrive on the
    /// returned receiver.
    pub fn new() -> std::io::Result<(Watch, mpsc::Receiver<Change>)> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by inotify_init1 and is owned here;
        // the OwnedFd keeps it open, unchanged, as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register(OwnedFd::from_raw_fd(fd)) }.map_err(std::io::Error::from)?;
        let fd = Arc::new(fd);
        let (stop, stopped) = oneshot::channel();
        let shared = Arc::new(Shared { fd, dirs: Arc::default(), subscribers: Arc::default(), _stop: stop });
        tokio::spawn(read_events(shared.fd.clone(), shared.dirs.clone(), shared.subscribers.clone(), stopped));
        Ok(Watch { shared, overflow: Arc::default() }.with_receiver())
    }

    /// Another subscription to the same watches: every change from now on
    /// arrives on its receiver too.
    pub fn subscribe(&self) -> (Watch, mpsc::Receiver<Change>) {
        Watch { shared: self.shared.clone(), overflow: Arc::default() }.with_receiver()
    }

    fn with_receiver(self) -> (Watch, mpsc::Receiver<Change>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        lock(&self.shared.subscribers).push(Subscriber { tx, overflow: self.overflow.clone() });
        (self, rx)
    }

    /// Watches one directory (not its subdirectories). Idempotent, also
    /// across subscribers.
    pub fn add(&self, dir: &Path) -> std::io::Result<()> {
        let mut d = lock(&self.shared.dirs);
        if d.watched.contains_key(dir) {
            return Ok(());
        }
        let c = CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.shared.fd.as_raw_fd(), c.as_ptr(), MASK | libc::IN_ONLYDIR) };
        if wd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                std::io::Error::other("the inotify watch limit is reached")
            } else {
                e
            });
        }
        // The same directory under a new name (it was moved) keeps its
        // watch descriptor: the old name no longer owns it.
        if let Some(prev) = d.by_wd.insert(wd, dir.to_path_buf()) {
            if prev != dir {
                d.watched.remove(&prev);
            }
        }
        d.watched.insert(dir.to_path_buf(), wd);
        Ok(())
    }

    /// Forgets a directory and every watched directory below it (after it
    /// was deleted; the kernel already dropped its watches).
    pub fn remove_tree(&mut self, dir: &Path) {
        let mut d = lock(&self.shared.dirs);
        let gone: Vec<(PathBuf, i32)> =
            d.watched.iter().filter(|(p, _)| p.starts_with(dir)).map(|(p, w)| (p.clone(), *w)).collect();
        for (p, wd) in gone {
            // SAFETY: plain system call; failure (already gone) is fine.
            unsafe { libc::inotify_rm_watch(self.shared.fd.as_raw_fd(), wd) };
            d.watched.remove(&p);
            d.by_wd.remove(&wd);
        }
    }

    /// Number of directories watched.
    pub fn len(&self) -> usize {
        lock(&self.shared.dirs).watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True (once) when events were dropped since the last call.
    pub fn take_overflow(&self) -> bool {
        self.overflow.swap(false, Ordering::Relaxed)
    }
}

/// Reads inotify events until every subscription is gone, and passes them
/// on as changes.
async fn read_events(
    fd: Arc<AsyncFd<OwnedFd>>,
    dirs: Arc<Mutex<Dirs>>,
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut classify = Classifier::default();
    loop {
        let mut guard = tokio::select! {
            g = fd.readable() => match g { Ok(g) => g, Err(_) => return },
            _ = &mut stopped => return,
        };
        // SAFETY: reads into a buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            send(&subscribers, Change::Rescan(format!("watcher error: {e}")));
            return;
        }
        let changes = classify.events(&buf[..n as usize], &mut lock(&dirs));
        for c in changes {
            send(&subscribers, c);
        }
        // inotify hands over every queued event that fits: a read well
        // short of the buffer emptied the queue, so the read that would
        // only say EAGAIN is skipped (one system call per edit). An event
        // queued since is a new edge for epoll, and sets readiness again.
        if (n as usize) < buf.len() / 2 {
            guard.clear_ready();
        }
    }
}

/// Gives a change to every subscriber; one that is full overflows, one
/// whose receiver is gone (its session ended) leaves.
fn send(subscribers: &Mutex<Vec<Subscriber>>, change: Change) {
    let mut subs = lock(subscribers);
    subs.retain(|s| !s.tx.is_closed());
    if let Some((last, rest)) = subs.split_last() {
        for s in rest {
            if s.tx.try_send(change.clone()).is_err() {
                s.overflow.store(true, Ordering::Relaxed);
            }
        }
        if last.tx.try_send(change).is_err() {
            last.overflow.store(true, Ordering::Relaxed);
        }
    }
}

/// Turns raw events into changes, in order, merging neighbours of a kind.
#[derive(Default)]
struct Classifier {
    /// Files reported as being written, and when. Further writes add
    /// nothing until they settle, so they are passed on at most every
    /// [`WRITING_REMINDER`] (each would otherwise wake the engine for
    /// nothing); the reminder keeps a file that stays open (a log)
    /// syncing. Bounded: cleared if it ever grows large.
    writing: HashMap<PathBuf, Instant>,
}

impl Classifier {
    fn events(&mut self, mut raw: &[u8], dirs: &mut Dirs) -> Vec<Change> {
        const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
        let mut out: Vec<Change> = Vec::new();
        let mut seen_rescan = HashSet::new();
        let now = Instant::now();
        while raw.len() >= HEADER {
            // SAFETY: at least HEADER bytes remain; read_unaligned copes
            // with any alignment.
            let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
            let end = (HEADER + ev.len as usize).min(raw.len());
            let name = &raw[HEADER..end];
            raw = &raw[end..];
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                if seen_rescan.insert("overflow") {
                    out.push(Change::Rescan("the kernel's event queue overflowed".into()));
                }
                continue;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                if let Some(p) = dirs.by_wd.remove(&ev.wd) {
                    dirs.watched.remove(&p);
                }
                continue;
            }
            let Some(dir) = dirs.by_wd.get(&ev.wd) else { continue };
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            let path = if name.is_empty() { dir.clone() } else { dir.join(std::ffi::OsStr::from_bytes(name)) };
            let writing =
                ev.mask & libc::IN_MODIFY != 0 || (ev.mask & libc::IN_CREATE != 0 && ev.mask & libc::IN_ISDIR == 0);
            if writing {
                if self.writing.len() > 4096 {
                    self.writing.clear();
                }
                match self.writing.get(&path) {
                    Some(t) if now.duration_since(*t) < WRITING_REMINDER => continue,
                    _ => {
                        self.writing.insert(path.clone(), now);
                    }
                }
                match out.last_mut() {
                    Some(Change::Writing(v)) => v.push(path),
                    _ => out.push(Change::Writing(vec![path])),
                }
            } else {
                self.writing.remove(&path);
                match out.last_mut() {
                    Some(Change::Settled(v)) => v.push(path),
                    _ => out.push(Change::Settled(vec![path])),
                }
            }
        }
        out
    }
}
