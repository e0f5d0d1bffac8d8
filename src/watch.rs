//! File watching: which source paths may have changed, as hints for the
//! sync engine (which compares by content, so a lost or extra hint never
//! makes the target wrong).
//!
//! Directories are watched one by one (non-recursively), and only those the
//! filter keeps, so `node_modules` or `target/` cost no watches and no
//! events. The sync engine adds a watch when it finds a new directory.
//!
//! Two backends, behind one [`Watch`]:
//! - Linux: inotify, read on the async runtime itself ([`inotify`]): an
//!   edit wakes the runtime once, and the engine task runs next on the
//!   same thread (a watcher thread costs every edit one more cross-thread
//!   wake-up).
//! - elsewhere (macOS: FSEvents), and on Linux with
//!   `DEVLOOP_WATCHER=notify`: the `notify` crate ([`portable`]), whose
//!   callback thread hands changes over.
//!
//! Either way, changes reach each subscriber through a bounded channel
//! with `try_send`. When a channel is full, the change is dropped and that
//! subscriber's overflow flag set; its engine then rescans everything,
//! which is correct whatever was lost. A kernel queue overflow is a rescan
//! for everyone.
//!
//! One watcher serves every session of a service: the sessions of a
//! Kubernetes target's replicas [`subscribe`](Watch::subscribe) to the same
//! watches, so ten replicas cost one set of watches, not ten.

#[cfg(target_os = "linux")]
mod inotify;
mod portable;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Changes waiting for an engine before they are dropped (and it rescans).
const QUEUE: usize = 8192;
/// How often a file that is still being written is reported again.
const WRITING_REMINDER: Duration = Duration::from_millis(100);
/// The variable that picks the backend: `notify` for the portable one
/// (also on Linux), `inotify` (Linux only, the default there).
pub const WATCHER_ENV: &str = "DEVLOOP_WATCHER";

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

/// What a backend does; the [`Watch`] facade and the fan-out are shared.
trait Backend: Send + Sync {
    /// Watches one directory (not its subdirectories); idempotent.
    fn add(&self, dir: &Path) -> std::io::Result<()>;
    /// Forgets a directory and every watched directory below it.
    fn remove_tree(&self, dir: &Path);
    /// Number of directories watched.
    fn len(&self) -> usize;
    /// Its name, for people: `inotify` or `notify`.
    fn name(&self) -> &'static str;
}

/// A subscription to a shared watcher. `add` and `remove_tree` act on the
/// shared watches; the overflow flag is this subscriber's own.
pub struct Watch {
    backend: Arc<dyn Backend>,
    subscribers: Arc<Subscribers>,
    overflow: Arc<AtomicBool>,
}

/// Everyone listening to one watcher.
#[derive(Default)]
struct Subscribers(Mutex<Vec<Subscriber>>);

struct Subscriber {
    tx: mpsc::Sender<Change>,
    overflow: Arc<AtomicBool>,
}

impl Subscribers {
    /// Gives a change to every subscriber; one that is full overflows, one
    /// whose receiver is gone (its session ended) leaves.
    fn send(&self, change: Change) {
        let mut subs = self.0.lock().unwrap_or_else(|e| e.into_inner());
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
}

/// Which backend a new watcher uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Inotify,
    Notify,
}

impl Kind {
    /// From `DEVLOOP_WATCHER`, else the platform's fast path.
    pub fn from_env() -> std::io::Result<Kind> {
        match std::env::var(WATCHER_ENV).ok().as_deref() {
            None | Some("") => Ok(if cfg!(target_os = "linux") { Kind::Inotify } else { Kind::Notify }),
            Some("notify") => Ok(Kind::Notify),
            Some("inotify") if cfg!(target_os = "linux") => Ok(Kind::Inotify),
            Some(other) => Err(std::io::Error::other(format!(
                "{WATCHER_ENV}={other}: use `notify`{}",
                if cfg!(target_os = "linux") { " or `inotify`" } else { " (inotify is Linux only)" }
            ))),
        }
    }
}

impl Watch {
    /// Starts the watcher (on the current runtime); changes arrive on the
    /// returned receiver.
    pub fn new() -> std::io::Result<(Watch, mpsc::Receiver<Change>)> {
        let subscribers = Arc::new(Subscribers::default());
        let backend: Arc<dyn Backend> = match Kind::from_env()? {
            #[cfg(target_os = "linux")]
            Kind::Inotify => Arc::new(inotify::Inotify::start(subscribers.clone())?),
            _ => Arc::new(portable::Portable::start(subscribers.clone())?),
        };
        Ok(Watch { backend, subscribers, overflow: Arc::default() }.with_receiver())
    }

    /// Another subscription to the same watches: every change from now on
    /// arrives on its receiver too.
    pub fn subscribe(&self) -> (Watch, mpsc::Receiver<Change>) {
        Watch { backend: self.backend.clone(), subscribers: self.subscribers.clone(), overflow: Arc::default() }
            .with_receiver()
    }

    fn with_receiver(self) -> (Watch, mpsc::Receiver<Change>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.subscribers
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Subscriber { tx, overflow: self.overflow.clone() });
        (self, rx)
    }

    /// Watches one directory (not its subdirectories). Idempotent, also
    /// across subscribers.
    pub fn add(&self, dir: &Path) -> std::io::Result<()> {
        self.backend.add(dir)
    }

    /// Forgets a directory and every watched directory below it (after it
    /// was deleted).
    pub fn remove_tree(&mut self, dir: &Path) {
        self.backend.remove_tree(dir)
    }

    /// Number of directories watched.
    pub fn len(&self) -> usize {
        self.backend.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend's name: `inotify` or `notify`.
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// True (once) when events were dropped since the last call.
    pub fn take_overflow(&self) -> bool {
        self.overflow.swap(false, Ordering::Relaxed)
    }
}

/// Passes on "being written" hints at most every [`WRITING_REMINDER`] per
/// file: further writes add nothing until the file settles, and each
/// would wake the engine for nothing; the reminder keeps a file that
/// stays open (a log) syncing. Bounded: cleared if it ever grows large.
#[derive(Default)]
struct WriteThrottle {
    writing: HashMap<PathBuf, Instant>,
}

impl WriteThrottle {
    /// Whether a "being written" hint for `path` goes on now.
    fn writing(&mut self, path: &Path, now: Instant) -> bool {
        if self.writing.len() > 4096 {
            self.writing.clear();
        }
        match self.writing.get(path) {
            Some(t) if now.duration_since(*t) < WRITING_REMINDER => false,
            _ => {
                self.writing.insert(path.to_path_buf(), now);
                true
            }
        }
    }

    /// The file is at rest.
    fn settled(&mut self, path: &Path) {
        self.writing.remove(path);
    }
}

/// Appends a path to the last change if it is of the same kind, or starts
/// a new one: neighbours of a kind merge, order is kept.
fn push(out: &mut Vec<Change>, path: PathBuf, writing: bool) {
    match (out.last_mut(), writing) {
        (Some(Change::Writing(v)), true) | (Some(Change::Settled(v)), false) => v.push(path),
        (_, true) => out.push(Change::Writing(vec![path])),
        (_, false) => out.push(Change::Settled(vec![path])),
    }
}
