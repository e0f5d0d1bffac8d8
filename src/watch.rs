//! File watching: notify's callback, bridged into async.
//!
//! Directories are watched one by one (non-recursively), and only those the
//! filter keeps, so `node_modules` or `target/` cost no watches and no
//! events. The sync engine adds a watch when it finds a new directory.
//!
//! The callback runs on notify's thread and must not block: it `try_send`s
//! into a bounded channel per subscriber. When a channel is full, the event
//! is dropped and that subscriber's overflow flag set; its engine then
//! rescans everything, which is correct whatever was lost (events are only
//! hints of where to look).
//!
//! One watcher serves every session of a service: the sessions of a
//! Kubernetes target's replicas [`subscribe`](Watch::subscribe) to the same
//! inotify watches, so ten replicas cost one set of watches, not ten.

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Events waiting for the engine before the callback starts dropping them.
const QUEUE: usize = 8192;
/// How often a file that is still being written is reported again.
const WRITING_REMINDER: Duration = Duration::from_millis(100);

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
    watches: Arc<Mutex<Watches>>,
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    overflow: Arc<AtomicBool>,
}

/// The inotify watches. Locked only by engines, never by the callback:
/// notify's `watch` waits on the thread that runs the callback.
struct Watches {
    inner: notify::RecommendedWatcher,
    watched: HashSet<PathBuf>,
}

struct Subscriber {
    tx: mpsc::Sender<Change>,
    overflow: Arc<AtomicBool>,
}

impl Watch {
    /// Starts the watcher; changes arrive on the returned receiver.
    pub fn new() -> notify::Result<(Watch, mpsc::Receiver<Change>)> {
        let subscribers: Arc<Mutex<Vec<Subscriber>>> = Arc::default();
        let subs = subscribers.clone();
        // Files this callback reported as being written, and when. Further
        // writes add nothing until they settle, so they are passed on at
        // most every [`WRITING_REMINDER`] (each would otherwise wake the
        // engine for nothing); the reminder keeps a file that stays open (a
        // log) syncing. Bounded: cleared if it ever grows large.
        let mut writing: HashMap<PathBuf, Instant> = HashMap::new();
        let inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let change = match res {
                Ok(ev) if ev.need_rescan() => Change::Rescan("the kernel's event queue overflowed".into()),
                Ok(ev) => {
                    if ev.paths.is_empty() {
                        return;
                    }
                    match classify(&ev.kind) {
                        Some(true) => {
                            if writing.len() > 4096 {
                                writing.clear();
                            }
                            let now = Instant::now();
                            let fresh: Vec<PathBuf> = ev
                                .paths
                                .into_iter()
                                .filter(|p| match writing.get(p) {
                                    Some(t) if now.duration_since(*t) < WRITING_REMINDER => false,
                                    _ => {
                                        writing.insert(p.clone(), now);
                                        true
                                    }
                                })
                                .collect();
                            if fresh.is_empty() {
                                return;
                            }
                            Change::Writing(fresh)
                        }
                        Some(false) => {
                            for p in &ev.paths {
                                writing.remove(p);
                            }
                            Change::Settled(ev.paths)
                        }
                        None => return,
                    }
                }
                Err(e) => Change::Rescan(format!("watcher error: {e}")),
            };
            let mut subs = subs.lock().unwrap_or_else(|e| e.into_inner());
            // A subscriber whose receiver is gone (its session ended) leaves.
            subs.retain(|s| !s.tx.is_closed());
            if let Some((last, rest)) = subs.split_last() {
                for s in rest {
                    if s.tx.try_send(change.clone()).is_err() {
                        s.overflow.store(true, Ordering::Relaxed);
                    }
                }
                if last.tx.try_send(change).is_err() {
                    // Full: that engine is busy and will rescan.
                    last.overflow.store(true, Ordering::Relaxed);
                }
            }
        })?;
        let watches = Arc::new(Mutex::new(Watches { inner, watched: HashSet::new() }));
        Ok(Watch { watches, subscribers, overflow: Arc::default() }.with_receiver())
    }

    /// Another subscription to the same watches: every change from now on
    /// arrives on its receiver too.
    pub fn subscribe(&self) -> (Watch, mpsc::Receiver<Change>) {
        Watch { watches: self.watches.clone(), subscribers: self.subscribers.clone(), overflow: Arc::default() }
            .with_receiver()
    }

    fn with_receiver(self) -> (Watch, mpsc::Receiver<Change>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sub = Subscriber { tx, overflow: self.overflow.clone() };
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(sub);
        (self, rx)
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, Watches> {
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches one directory (not its subdirectories). Idempotent, also
    /// across subscribers.
    pub fn add(&mut self, dir: &Path) -> notify::Result<()> {
        let mut w = self.watches();
        if w.watched.contains(dir) {
            return Ok(());
        }
        w.inner.watch(dir, RecursiveMode::NonRecursive)?;
        w.watched.insert(dir.to_path_buf());
        Ok(())
    }

    /// Forgets a directory and every watched directory below it (after it
    /// was deleted; the kernel already dropped its watches).
    pub fn remove_tree(&mut self, dir: &Path) {
        let mut w = self.watches();
        let gone: Vec<PathBuf> = w.watched.iter().filter(|p| p.starts_with(dir)).cloned().collect();
        for p in gone {
            let _ = w.inner.unwatch(&p);
            w.watched.remove(&p);
        }
    }

    /// Number of directories watched.
    pub fn len(&self) -> usize {
        self.watches().watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True (once) when events were dropped since the last call.
    pub fn take_overflow(&self) -> bool {
        self.overflow.swap(false, Ordering::Relaxed)
    }
}

/// None: ignore (reads and opens change nothing); Some(true): a write in
/// progress; Some(false): a change at rest.
fn classify(kind: &EventKind) -> Option<bool> {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(false),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Data(_)) | EventKind::Create(CreateKind::File) => Some(true),
        _ => Some(false),
    }
}
