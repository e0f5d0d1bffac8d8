//! The live loop: watch, examine, send, until shutdown or the link ends.
//!
//! The first change goes out at once (no quiet period); changes arriving
//! while a batch is in flight pile up in the dirty set and form the next
//! batch. A `git checkout` storm therefore becomes a few batches.

use super::plan::Plan;
use super::scan::Unknown;
use super::{Engine, LiveEnd, SyncError};
use crate::client::AgentClient;
use crate::events::Kind;
use crate::hub::{Action, ActionKind};
use crate::watch::Change;
use devloop_agent::index::{self, ScanFailed};
use devloop_agent::paths::WirePath;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A file being written is synced when closed, or after this long if its
/// writer keeps it open (a log, a long download).
const WRITE_HOLD: Duration = Duration::from_millis(250);
/// A storm (changes still arriving when a batch is acknowledged: a branch
/// switch, a build writing files) is let settle before the next batch, so
/// that it becomes a few large batches rather than one per round trip: the
/// engine waits while changes keep coming less than `STORM_GAP` apart, up
/// to `STORM_MAX`. A lone edit never waits: it finds the engine idle.
const STORM_GAP: Duration = Duration::from_millis(2);
const STORM_MAX: Duration = Duration::from_millis(25);
/// How often source paths that could not be read are tried again.
const UNREAD_RETRY: Duration = Duration::from_secs(1);

impl Engine {
    /// The live loop: watch, examine, send, until shutdown or the link ends.
    pub async fn live(
        &mut self,
        link: &AgentClient,
        changes: &mut mpsc::Receiver<Change>,
        cancel: &CancellationToken,
        actions: &mut mpsc::Receiver<Action>,
    ) -> Result<LiveEnd, SyncError> {
        let mut dirty: BTreeSet<PathBuf> = BTreeSet::new();
        // When the paths that could not be read are tried again.
        let mut retry_at = Instant::now() + UNREAD_RETRY;
        // Files being written, and since when: held back until closed.
        let mut writing: HashMap<PathBuf, Instant> = HashMap::new();
        let mut rescan = false;
        let mut first_seen: Option<Instant> = None;
        if let Some(w) = &self.watch {
            self.rep.send(Kind::Watching { dirs: w.len(), watcher: w.backend().to_string() });
        }
        loop {
            if dirty.is_empty() && !rescan {
                let hold_until = writing.values().min().map(|t| *t + WRITE_HOLD);
                let retry = (!self.unread.is_empty()).then_some(retry_at);
                tokio::select! {
                    c = changes.recv() => match c {
                        Some(c) => absorb(c, &mut dirty, &mut writing, &mut rescan),
                        None => return Ok(LiveEnd::Shutdown),
                    },
                    _ = sleep_until(hold_until) => {}
                    _ = sleep_until(retry) => {
                        dirty.extend(self.unread.keys().cloned());
                        retry_at = Instant::now() + UNREAD_RETRY;
                    }
                    r = link.ended() => return Ok(LiveEnd::Lost(r)),
                    _ = cancel.cancelled() => return Ok(LiveEnd::Shutdown),
                    Some(a) = actions.recv() => {
                        let answer = match a.kind {
                            ActionKind::Resync => return Ok(LiveEnd::Resync(a.reply)),
                            ActionKind::Restart => self.restart_now(link).await,
                            ActionKind::Run { index } => self.run_now(link, index).await,
                            // The session routes these to its intercept.
                            ActionKind::Intercept { .. } => Err("this session has no intercept".into()),
                        };
                        let _ = a.reply.send(answer);
                        continue;
                    }
                }
                if first_seen.is_none() {
                    first_seen = Some(Instant::now());
                }
            }
            while let Ok(c) = changes.try_recv() {
                absorb(c, &mut dirty, &mut writing, &mut rescan);
            }
            release_held(&mut writing, &mut dirty);
            if dirty.is_empty() && !rescan {
                continue;
            }
            if self.watch.as_ref().is_some_and(|w| w.take_overflow()) {
                rescan = true;
            }
            let t_first = first_seen.take().unwrap_or_else(Instant::now);
            let plan = if rescan {
                rescan = false;
                dirty.clear();
                tokio::task::block_in_place(|| self.rescan_plan())?
            } else {
                let d = std::mem::take(&mut dirty);
                // A few paths are examined in place: handing the worker over
                // (block_in_place) costs more than reading a small file.
                let (plan, again) =
                    if d.len() <= 16 { self.examine(d) } else { tokio::task::block_in_place(|| self.examine(d)) };
                rescan |= again;
                plan
            };
            if plan.is_empty() {
                continue;
            }
            // Send, and keep collecting changes meanwhile: they form the
            // next batch.
            let send = self.send_plan(link, plan, false, t_first);
            tokio::pin!(send);
            loop {
                tokio::select! {
                    r = &mut send => { r?; break; }
                    c = changes.recv() => if let Some(c) = c {
                        if first_seen.is_none() { first_seen = Some(Instant::now()); }
                        absorb(c, &mut dirty, &mut writing, &mut rescan);
                    },
                }
            }
            if !dirty.is_empty() {
                let until = Instant::now() + STORM_MAX;
                while Instant::now() < until {
                    tokio::select! {
                        c = changes.recv() => match c {
                            Some(c) => absorb(c, &mut dirty, &mut writing, &mut rescan),
                            None => break,
                        },
                        _ = tokio::time::sleep(STORM_GAP) => break,
                        _ = cancel.cancelled() => return Ok(LiveEnd::Shutdown),
                    }
                }
            }
        }
    }

    /// Full rescan of the source against the model (after lost events or an
    /// ignore-file change). What it cannot read stays as it is on the
    /// target (and is tried again); a scan that fails plans nothing.
    fn rescan_plan(&mut self) -> Result<Plan, ScanFailed> {
        let cache = self.hash_cache();
        let scan = self.scan_source()?;
        let mut skipped = scan.skipped;
        let (src, _) = index::hash_cached(scan.found, &mut skipped, &|_| false, &cache)?;
        cache.store(&src);
        self.take_unreadable(&skipped);
        self.links.clear();
        for (f, _) in &src {
            self.note_links(f);
        }
        let unknown = Unknown::from_skipped(&skipped);
        // Paths that became ignored are left alone on the target and
        // forgotten here.
        let ignored: Vec<WirePath> =
            self.model.iter().filter(|(p, k)| self.ignored_wire(p, k.is_dir())).map(|(p, _)| p.clone()).collect();
        for p in ignored {
            self.model.remove(&p);
        }
        Ok(self.diff(&src, &unknown, &self.model, &scan.pruned))
    }
}

fn absorb(c: Change, dirty: &mut BTreeSet<PathBuf>, writing: &mut HashMap<PathBuf, Instant>, rescan: &mut bool) {
    match c {
        Change::Settled(ps) => {
            for p in ps {
                writing.remove(&p);
                dirty.insert(p);
            }
        }
        Change::Writing(ps) => {
            let now = Instant::now();
            for p in ps {
                dirty.remove(&p);
                writing.entry(p).or_insert(now);
            }
        }
        Change::Rescan(_) => *rescan = true,
    }
}

/// Moves files held open past [`WRITE_HOLD`] into the dirty set.
fn release_held(writing: &mut HashMap<PathBuf, Instant>, dirty: &mut BTreeSet<PathBuf>) {
    if writing.is_empty() {
        return;
    }
    let now = Instant::now();
    writing.retain(|p, since| {
        let keep = now.duration_since(*since) < WRITE_HOLD;
        if !keep {
            dirty.insert(p.clone());
        }
        keep
    });
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
