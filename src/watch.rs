//! File watching: notify's callback, bridged into async.
//!
//! Directories are watched one by one (non-recursively), and only those the
//! filter keeps, so `node_modules` or `target/` cost no watches and no
//! events. The sync engine adds a watch when it finds a new directory.
//!
//! The callback runs on notify's thread and must not block: it `try_send`s
//! into a bounded channel. When the channel is full, the event is dropped
//! and the overflow flag set; the engine then rescans everything, which is
//! correct whatever was lost (events are only hints of where to look).

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Events waiting for the engine before the callback starts dropping them.
const QUEUE: usize = 8192;
/// How often a file that is still being written is reported again.
const WRITING_REMINDER: Duration = Duration::from_millis(100);

/// What the watcher tells the engine.
#[derive(Debug)]
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

pub struct Watch {
    inner: notify::RecommendedWatcher,
    watched: HashSet<PathBuf>,
    overflow: Arc<AtomicBool>,
}

impl Watch {
    /// Starts the watcher; changes arrive on the returned receiver.
    pub fn new() -> notify::Result<(Watch, mpsc::Receiver<Change>)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let flag = overflow.clone();
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
            if tx.try_send(change).is_err() {
                // Full (the engine is busy) or closed (shutting down).
                flag.store(true, Ordering::Relaxed);
            }
        })?;
        Ok((Watch { inner, watched: HashSet::new(), overflow }, rx))
    }

    /// Watches one directory (not its subdirectories). Idempotent.
    pub fn add(&mut self, dir: &Path) -> notify::Result<()> {
        if self.watched.contains(dir) {
            return Ok(());
        }
        self.inner.watch(dir, RecursiveMode::NonRecursive)?;
        self.watched.insert(dir.to_path_buf());
        Ok(())
    }

    /// Forgets a directory and every watched directory below it (after it
    /// was deleted; the kernel already dropped its watches).
    pub fn remove_tree(&mut self, dir: &Path) {
        let gone: Vec<PathBuf> = self.watched.iter().filter(|p| p.starts_with(dir)).cloned().collect();
        for p in gone {
            let _ = self.inner.unwatch(&p);
            self.watched.remove(&p);
        }
    }

    /// Number of directories watched.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
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
