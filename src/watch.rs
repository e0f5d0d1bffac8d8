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

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Events waiting for the engine before the callback starts dropping them.
const QUEUE: usize = 8192;

/// What the watcher tells the engine.
#[derive(Debug)]
pub enum Change {
    /// These paths (files or directories) may have changed.
    Paths(Vec<PathBuf>),
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
        let inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let change = match res {
                Ok(ev) if ev.need_rescan() => {
                    Change::Rescan("the kernel's event queue overflowed".into())
                }
                Ok(ev) => {
                    if !relevant(&ev.kind) || ev.paths.is_empty() {
                        return;
                    }
                    Change::Paths(ev.paths)
                }
                Err(e) => Change::Rescan(format!("watcher error: {e}")),
            };
            if tx.try_send(change).is_err() {
                // Full (the engine is busy) or closed (shutting down).
                flag.store(true, Ordering::Relaxed);
            }
        })?;
        Ok((
            Watch {
                inner,
                watched: HashSet::new(),
                overflow,
            },
            rx,
        ))
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
        let gone: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
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

/// Reads and opens change nothing; everything else may.
fn relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}
