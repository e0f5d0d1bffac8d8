//! The portable backend: the `notify` crate (FSEvents on macOS, inotify on
//! Linux when `DEVLOOP_WATCHER=notify` picks it there, for testing it).
//!
//! notify calls back on a thread of its own; the callback classifies each
//! event and hands it to the subscribers through their bounded channels
//! (`try_send`): a full channel drops the change and sets that
//! subscriber's overflow flag, so its engine rescans. The callback never
//! blocks, whatever the engines do.
//!
//! Where the platform reports a file's close after writing (Linux), a data
//! change is "being written" until that close, as on the fast path; where
//! it does not (FSEvents coalesces changes and reports no close), every
//! change is at rest when reported, and the engine's comparison by content
//! catches a file still being written at its next change.

use super::{push, Backend, Change, Subscribers, WriteThrottle};
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Whether the platform says when a file written to is closed.
const CLOSE_IS_REPORTED: bool = cfg!(target_os = "linux");

pub(super) struct Portable {
    /// The watcher and the directories it watches (notify's own state is
    /// not enumerable).
    inner: Mutex<(RecommendedWatcher, BTreeSet<PathBuf>)>,
}

impl Portable {
    pub(super) fn start(subscribers: Arc<Subscribers>) -> std::io::Result<Portable> {
        let throttle = Mutex::new(WriteThrottle::default());
        let handler = move |res: notify::Result<notify::Event>| {
            let changes = match res {
                Ok(ev) if ev.need_rescan() => vec![Change::Rescan("the watcher lost events".into())],
                Ok(ev) => classify(ev, &mut throttle.lock().unwrap_or_else(|e| e.into_inner())),
                Err(e) => vec![Change::Rescan(format!("watcher error: {e}"))],
            };
            for c in changes {
                subscribers.send(c);
            }
        };
        let watcher = RecommendedWatcher::new(handler, notify::Config::default()).map_err(to_io)?;
        Ok(Portable { inner: Mutex::new((watcher, BTreeSet::new())) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (RecommendedWatcher, BTreeSet<PathBuf>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn to_io(e: notify::Error) -> std::io::Error {
    match e.kind {
        notify::ErrorKind::Io(io) => io,
        notify::ErrorKind::MaxFilesWatch => std::io::Error::other("the watch limit is reached"),
        _ => std::io::Error::other(e.to_string()),
    }
}

impl Backend for Portable {
    fn add(&self, dir: &Path) -> std::io::Result<()> {
        let mut g = self.lock();
        if g.1.contains(dir) {
            return Ok(());
        }
        g.0.watch(dir, RecursiveMode::NonRecursive).map_err(to_io)?;
        g.1.insert(dir.to_path_buf());
        Ok(())
    }

    fn remove_tree(&self, dir: &Path) {
        let mut g = self.lock();
        let gone: Vec<PathBuf> = g.1.iter().filter(|p| p.starts_with(dir)).cloned().collect();
        for p in gone {
            // Failure means it is gone already (the directory was deleted).
            let _ = g.0.unwatch(&p);
            g.1.remove(&p);
        }
    }

    fn name(&self) -> &'static str {
        "notify"
    }

    fn len(&self) -> usize {
        self.lock().1.len()
    }
}

/// What one notify event means for the engine.
fn classify(ev: notify::Event, throttle: &mut WriteThrottle) -> Vec<Change> {
    let writing = CLOSE_IS_REPORTED
        && matches!(
            ev.kind,
            EventKind::Modify(ModifyKind::Data(_))
                | EventKind::Modify(ModifyKind::Any)
                | EventKind::Create(CreateKind::File)
        );
    // Opens and reads change nothing.
    if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
        return Vec::new();
    }
    let now = Instant::now();
    let mut out = Vec::new();
    for path in ev.paths {
        if writing {
            if !throttle.writing(&path, now) {
                continue;
            }
        } else {
            throttle.settled(&path);
        }
        push(&mut out, path, writing);
    }
    out
}
