//! The sync engine of one service.
//!
//! The engine keeps a *model* of what the target holds (path → kind, size,
//! mode, hash), built from the agent's index at the start of a session and
//! updated from the agent's acknowledgements. File events are only hints of
//! where to look: each dirty path is compared, by content, with the model,
//! and only differences travel. So a lost, duplicated or reordered event
//! never makes the target wrong, an editor's save that changes nothing sends
//! nothing, and after an overflow a rescan of the source against the model
//! puts everything right.
//!
//! Batching: the first change goes out at once (no quiet period); changes
//! arriving while a batch is in flight pile up in the dirty set and form the
//! next batch. A `git checkout` storm therefore becomes a few batches.

use crate::config::{PathMatcher, Service};
use crate::events::{Kind, Reporter};
use crate::filter::Filter;
use crate::link::{Applied, Link, LinkError};
use crate::watch::{Change, Watch};
use devloop_agent::index::{self, Found, Skipped, WalkOptions};
use devloop_agent::paths;
use devloop_agent::protocol::{CommandSpec, Entry, EntryKind};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;

/// Files up to this size are read once, when examined, and sent from memory.
const READ_AHEAD_MAX: u64 = 16 << 20;
/// Batches that fit in this many bytes are built in memory, on the engine's
/// task: the fast path for a single edit.
const INLINE_BATCH_MAX: u64 = 1 << 20;
/// Initial syncs are cut into batches of about this many bytes, so that
/// progress is visible and one failure does not cost everything.
const BATCH_BYTES_MAX: u64 = 256 << 20;
/// Deletions per batch (keeps control messages well under the frame limit).
const BATCH_DELETES_MAX: usize = 10_000;
/// A file being written is synced when closed, or after this long if its
/// writer keeps it open (a log, a long download).
const WRITE_HOLD: std::time::Duration = std::time::Duration::from_millis(250);
/// A storm (changes still arriving when a batch is acknowledged: a branch
/// switch, a build writing files) is let settle before the next batch, so
/// that it becomes a few large batches rather than one per round trip: the
/// engine waits while changes keep coming less than `STORM_GAP` apart, up
/// to `STORM_MAX`. A lone edit never waits: it finds the engine idle.
const STORM_GAP: std::time::Duration = std::time::Duration::from_millis(2);
const STORM_MAX: std::time::Duration = std::time::Duration::from_millis(25);

/// One rule's source side.
struct Rule {
    from: PathBuf,
    to: String,
    filter: Filter,
}

/// A path to send.
#[derive(Debug, Clone)]
struct Write_ {
    wire: String,
    abs: PathBuf,
    kind: EntryKind,
    mode: u32,
    size: u64,
    link: Option<String>,
    /// Content already read (and its hash), for small files.
    content: Option<(Vec<u8>, u64)>,
}

/// Each target path's kind, size and mode: what a source file must match to
/// possibly be equal.
type TargetShapes = HashMap<String, (EntryKind, u64, u32)>;

#[derive(Default)]
struct Plan {
    writes: Vec<Write_>,
    deletes: Vec<String>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.deletes.is_empty()
    }
}

/// Why the live loop stopped.
pub enum LiveEnd {
    Shutdown,
    Lost(String),
}

pub struct Engine {
    svc: Service,
    rules: Vec<Rule>,
    model: BTreeMap<String, Entry>,
    rep: Reporter,
    watch: Option<Watch>,
    warned: HashSet<String>,
    batches: u64,
}

/// What one batch achieved.
pub struct BatchOutcome {
    pub errors: usize,
}

impl Engine {
    /// `watch` is None for a one-shot sync.
    pub fn new(svc: Service, rep: Reporter, watch: Option<Watch>) -> Engine {
        let rules = svc
            .rules
            .iter()
            .map(|r| Rule { from: r.from.clone(), to: r.to.clone(), filter: Filter::new(&r.from, &r.exclude) })
            .collect::<Vec<_>>();
        let mut e = Engine { svc, rules, model: BTreeMap::new(), rep, watch, warned: HashSet::new(), batches: 0 };
        let warnings: Vec<String> = e.rules.iter_mut().flat_map(|r| std::mem::take(&mut r.filter.warnings)).collect();
        for w in warnings {
            e.warn(w);
        }
        e
    }

    fn warn(&mut self, message: String) {
        if self.warned.insert(message.clone()) {
            self.rep.send(Kind::Warning { message });
        }
    }

    pub fn service(&self) -> &Service {
        &self.svc
    }

    /// Walks every rule's source tree (adding watches as it goes), returning
    /// what it found and the ignored directories it did not enter.
    fn scan_source(&mut self) -> (Vec<Found>, Vec<String>) {
        let mut found = Vec::new();
        let mut pruned = Vec::new();
        let mut skipped: Vec<Skipped> = Vec::new();
        let mut watch_errors = Vec::new();
        for rule in &mut self.rules {
            if let Some(w) = &self.watch {
                if let Err(e) = w.add(&rule.from) {
                    watch_errors.push(format!("cannot watch {}: {e}", rule.from.display()));
                }
            }
            scan_rule(rule, &self.watch, &mut found, &mut pruned, &mut skipped, &mut watch_errors);
        }
        for s in skipped {
            self.warn(format!("skipped {}: {}", s.abs.display(), s.reason));
        }
        for e in watch_errors.into_iter().take(3) {
            self.warn(format!("{e} (raise fs.inotify.max_user_watches, or exclude large directories)"));
        }
        let found = found
            .into_iter()
            .filter(|f| match &f.link {
                Some(t) if paths::check_link_target(&f.path, t).is_err() => {
                    if self.warned.insert(f.path.clone()) {
                        self.rep.send(Kind::Warning {
                            message: format!("symlink {} -> {t} points outside the synced tree; not synced", f.path),
                        });
                    }
                    false
                }
                _ => true,
            })
            .collect();
        (found, pruned)
    }

    /// The first sync of a session: compare the source with the agent's
    /// index, by content, and send only the differences. Returns the number
    /// of paths that failed.
    pub async fn initial_sync(&mut self, link: &mut Link) -> Result<usize, LinkError> {
        let t0 = Instant::now();
        let (found, pruned) = tokio::task::block_in_place(|| self.scan_source());
        let unders: Vec<String> = self.rules.iter().map(|r| r.to.clone()).collect();
        // Hash the source while the agent indexes the target. Once the
        // target's index is in, only files it holds with the same size and
        // mode can be equal; the rest travel anyway (and are hashed as they
        // are read for sending), so their hashing is skipped: a first sync
        // into an empty target reads each file once, not twice.
        let known: Arc<OnceLock<TargetShapes>> = Arc::default();
        let hashing = tokio::task::spawn_blocking({
            let known = known.clone();
            move || {
                let mut sk = Vec::new();
                let skip =
                    |f: &Found| known.get().is_some_and(|k| k.get(&f.path) != Some(&(EntryKind::File, f.size, f.mode)));
                let r = index::hash_unless(found, &mut sk, &skip);
                (r, sk)
            }
        });
        let target = link.index(unders, pruned.clone()).await?;
        let _ = known.set(target.iter().map(|e| (e.path.clone(), (e.kind, e.size, e.mode))).collect());
        let (src, skipped) = hashing.await.unwrap_or_default();
        for s in skipped {
            self.warn(format!("skipped {}: {}", s.abs.display(), s.reason));
        }
        let have: BTreeMap<String, Entry> = target.into_iter().map(|e| (e.path.clone(), e)).collect();
        let plan = self.diff(&src, &have, &pruned);
        let files = src.iter().filter(|(f, _)| f.kind == EntryKind::File).count() as u64;
        let dirs = src.iter().filter(|(f, _)| f.kind == EntryKind::Dir).count() as u64;
        // Until acknowledged otherwise, the target holds what it reported.
        self.model = have.into_iter().filter(|(p, e)| !self.ignored_wire(p, e.kind == EntryKind::Dir)).collect();
        let mut errors = 0;
        if !plan.is_empty() {
            errors = self.send_plan(link, plan, true, t0).await?;
            if self.svc.app.as_ref().is_some_and(|a| a.restart && a.spec.is_none()) {
                // The container's own process started on the image's files,
                // before these landed: restart it once, now.
                let restart = vec![crate::target::workload::restart_command()];
                let pending = link.begin_batch(Vec::new(), restart, false, false).await?;
                pending.applied.await.map_err(|_| LinkError::Lost("connection closed".into()))??;
            }
        }
        self.rep.send(Kind::InSync { files, dirs, checked_ms: t0.elapsed().as_secs_f64() * 1e3 });
        Ok(errors)
    }

    /// What must change for the target (`have`) to match the source.
    fn diff(&self, src: &[(Found, Entry)], have: &BTreeMap<String, Entry>, pruned: &[String]) -> Plan {
        let mut plan = Plan::default();
        let mut present: std::collections::HashMap<&str, EntryKind> =
            std::collections::HashMap::with_capacity(src.len());
        for (f, e) in src {
            present.insert(e.path.as_str(), e.kind);
            if have.get(&e.path).is_none_or(|t| differs(t, e)) {
                plan.writes.push(Write_ {
                    wire: e.path.clone(),
                    abs: f.abs.clone(),
                    kind: e.kind,
                    mode: e.mode,
                    size: e.size,
                    link: e.link.clone(),
                    content: None,
                });
            }
        }
        let mut dirs = Vec::new();
        for (p, t) in have {
            let t_dir = t.kind == EntryKind::Dir;
            match present.get(p.as_str()) {
                // Same path, and a directory on both sides or on neither:
                // the write above (if any) replaces it in place.
                Some(k) if (*k == EntryKind::Dir) == t_dir => continue,
                // Kind changed between directory and not: remove first.
                Some(_) => {}
                None => {
                    if pruned.iter().any(|d| paths::is_within(p, d)) || self.ignored_wire(p, t_dir) {
                        continue;
                    }
                }
            }
            if t_dir {
                dirs.push(p.clone());
            } else {
                plan.deletes.push(p.clone());
            }
        }
        // Directories last, deepest first, so each is empty when removed.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        plan.deletes.extend(dirs);
        plan
    }

    /// Is a target path one the source side ignores (left alone)?
    fn ignored_wire(&self, wire: &str, is_dir: bool) -> bool {
        for r in &self.rules {
            if paths::is_within(wire, &r.to) {
                let rel = if r.to.is_empty() { wire } else { wire[r.to.len()..].trim_start_matches('/') };
                if rel.is_empty() {
                    return false;
                }
                return r.filter.is_ignored(&r.from.join(rel), is_dir);
            }
        }
        true
    }

    /// The live loop: watch, examine, send, until shutdown or the link ends.
    pub async fn live(
        &mut self,
        link: &mut Link,
        changes: &mut mpsc::Receiver<Change>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<LiveEnd, LinkError> {
        let mut dirty: BTreeSet<PathBuf> = BTreeSet::new();
        // Files being written, and since when: held back until closed.
        let mut writing: HashMap<PathBuf, Instant> = HashMap::new();
        let mut rescan = false;
        let mut first_seen: Option<Instant> = None;
        if let Some(w) = &self.watch {
            self.rep.send(Kind::Watching { dirs: w.len() });
        }
        loop {
            if dirty.is_empty() && !rescan {
                let hold_until = writing.values().min().map(|t| *t + WRITE_HOLD);
                tokio::select! {
                    c = changes.recv() => match c {
                        Some(c) => absorb(c, &mut dirty, &mut writing, &mut rescan),
                        None => return Ok(LiveEnd::Shutdown),
                    },
                    _ = sleep_until(hold_until) => {}
                    r = link.ended() => return Ok(LiveEnd::Lost(r)),
                    _ = shutdown.changed() => return Ok(LiveEnd::Shutdown),
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
                tokio::task::block_in_place(|| self.rescan_plan())
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
                        _ = shutdown.changed() => return Ok(LiveEnd::Shutdown),
                    }
                }
            }
        }
    }

    /// Full rescan of the source against the model (after lost events or an
    /// ignore-file change).
    fn rescan_plan(&mut self) -> Plan {
        let (found, pruned) = self.scan_source();
        let mut sk = Vec::new();
        let src = index::hash_all(found, &mut sk);
        // Paths that became ignored are left alone on the target and
        // forgotten here.
        let ignored: Vec<String> = self
            .model
            .iter()
            .filter(|(p, e)| self.ignored_wire(p, e.kind == EntryKind::Dir))
            .map(|(p, _)| p.clone())
            .collect();
        for p in ignored {
            self.model.remove(&p);
        }
        {
            // Taken out rather than cloned: diff only reads it.
            let model = std::mem::take(&mut self.model);
            let plan = self.diff(&src, &model, &pruned);
            self.model = model;
            plan
        }
    }

    /// Compares each dirty path with the model. Returns the plan and whether
    /// a full rescan is needed (an ignore file changed).
    fn examine(&mut self, dirty: BTreeSet<PathBuf>) -> (Plan, bool) {
        let mut plan = Plan::default();
        let mut planned: HashSet<String> = HashSet::new();
        let mut rescan = false;
        for abs in dirty {
            let Some(ri) = self.rule_for(&abs) else {
                continue;
            };
            let (from, to) = (self.rules[ri].from.clone(), self.rules[ri].to.clone());
            let rel = abs.strip_prefix(&from).unwrap_or(Path::new(""));
            if rel.as_os_str().is_empty() {
                // The rule's root itself changed (deleted, moved): look again
                // at everything.
                rescan = true;
                continue;
            }
            if Filter::is_ignore_file(&abs) {
                if let Some(dir) = abs.parent() {
                    self.rules[ri].filter.load_dir(dir);
                }
                rescan = true;
            }
            let wire = match paths::to_wire(rel) {
                Ok(r) => paths::join_wire(&to, &r),
                Err(e) => {
                    self.warn(format!("skipped {}: {e}", abs.display()));
                    continue;
                }
            };
            if planned.contains(&wire) {
                continue;
            }
            let md = match std::fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(_) => {
                    // Gone: delete it and everything the model has below it.
                    if let Some(w) = &mut self.watch {
                        w.remove_tree(&abs);
                    }
                    self.plan_removal(&wire, &mut plan, &mut planned);
                    continue;
                }
            };
            let is_dir = md.is_dir();
            if self.rules[ri].filter.is_ignored(&abs, is_dir) {
                continue;
            }
            if is_dir {
                let mut found = vec![Found {
                    path: wire.clone(),
                    abs: abs.clone(),
                    kind: EntryKind::Dir,
                    size: 0,
                    mode: md.permissions().mode() & 0o777,
                    link: None,
                }];
                let mut pruned = Vec::new();
                let mut skipped = Vec::new();
                let mut werr = Vec::new();
                if let Some(w) = &self.watch {
                    let _ = w.add(&abs);
                }
                walk_rule(
                    &mut self.rules[ri],
                    &abs,
                    &wire,
                    &self.watch,
                    &mut found,
                    &mut pruned,
                    &mut skipped,
                    &mut werr,
                );
                let present: HashSet<&str> = found.iter().map(|f| f.path.as_str()).collect();
                // Model entries below that are no longer there.
                let gone: Vec<String> = self
                    .model
                    .range(format!("{wire}/")..)
                    .take_while(|(p, _)| paths::is_within(p, &wire))
                    .filter(|(p, e)| !present.contains(p.as_str()) && !self.ignored_wire(p, e.kind == EntryKind::Dir))
                    .map(|(p, _)| p.clone())
                    .collect();
                for g in gone {
                    self.plan_removal(&g, &mut plan, &mut planned);
                }
                for f in found {
                    self.plan_found(f, &mut plan, &mut planned);
                }
            } else {
                let f = Found {
                    path: wire,
                    abs,
                    kind: if md.file_type().is_symlink() { EntryKind::Symlink } else { EntryKind::File },
                    size: md.size(),
                    mode: md.permissions().mode() & 0o777,
                    link: None,
                };
                if !md.file_type().is_symlink() && !md.is_file() {
                    continue;
                }
                self.plan_found(f, &mut plan, &mut planned);
            }
        }
        (plan, rescan)
    }

    /// Adds a found path to the plan if it differs from the model.
    fn plan_found(&mut self, mut f: Found, plan: &mut Plan, planned: &mut HashSet<String>) {
        if !planned.insert(f.path.clone()) {
            return;
        }
        let mut content = None;
        let entry = match f.kind {
            EntryKind::Dir => {
                Entry { path: f.path.clone(), kind: EntryKind::Dir, size: 0, mode: f.mode, hash: 0, link: None }
            }
            EntryKind::Symlink => {
                let t = match std::fs::read_link(&f.abs).ok().and_then(|t| t.to_str().map(String::from)) {
                    Some(t) => t,
                    None => return,
                };
                if paths::check_link_target(&f.path, &t).is_err() {
                    self.warn(format!("symlink {} -> {t} points outside the synced tree; not synced", f.path));
                    return;
                }
                f.link = Some(t.clone());
                Entry { path: f.path.clone(), kind: EntryKind::Symlink, size: 0, mode: 0o777, hash: 0, link: Some(t) }
            }
            EntryKind::File => {
                let (hash, size) = if f.size <= READ_AHEAD_MAX {
                    match read_small(&f.abs, f.size) {
                        Ok(b) => {
                            let h = index::hash_bytes(&b);
                            let n = b.len() as u64;
                            content = Some((b, h));
                            (h, n)
                        }
                        Err(_) => return, // vanished: its removal event follows
                    }
                } else {
                    match index::hash_file(&f.abs) {
                        Ok(x) => x,
                        Err(_) => return,
                    }
                };
                f.size = size;
                Entry { path: f.path.clone(), kind: EntryKind::File, size, mode: f.mode, hash, link: None }
            }
        };
        let old = self.model.get(&f.path);
        if old.is_some_and(|o| !differs(o, &entry)) {
            return;
        }
        // A directory replaced by a file or link: remove it (and what the
        // model has below it) first.
        if old.is_some_and(|o| o.kind == EntryKind::Dir) && entry.kind != EntryKind::Dir {
            let p = f.path.clone();
            planned.remove(&p);
            self.plan_removal(&p, plan, planned);
            planned.insert(p);
        }
        // Parents the target does not have yet (a file in a new directory
        // whose own event has not been seen).
        if let Some(parent) = f.path.rsplit_once('/').map(|(p, _)| p.to_string()) {
            if !self.model.contains_key(&parent)
                && !planned.contains(&parent)
                && !self.rules.iter().any(|r| r.to == parent)
            {
                if let Some(pabs) = f.abs.parent() {
                    if let Ok(m) = std::fs::symlink_metadata(pabs) {
                        let pf = Found {
                            path: parent,
                            abs: pabs.to_path_buf(),
                            kind: EntryKind::Dir,
                            size: 0,
                            mode: m.permissions().mode() & 0o777,
                            link: None,
                        };
                        self.plan_found(pf, plan, planned);
                    }
                }
            }
        }
        plan.writes.push(Write_ {
            wire: f.path,
            abs: f.abs,
            kind: entry.kind,
            mode: entry.mode,
            size: entry.size,
            link: entry.link,
            content,
        });
    }

    /// Plans the deletion of a path and everything the model has below it.
    fn plan_removal(&mut self, wire: &str, plan: &mut Plan, planned: &mut HashSet<String>) {
        let below: Vec<(String, EntryKind)> = self
            .model
            .range(wire.to_string()..)
            .take_while(|(p, _)| paths::is_within(p, wire))
            .map(|(p, e)| (p.clone(), e.kind))
            .collect();
        let mut dirs = Vec::new();
        for (p, k) in below {
            if !planned.insert(p.clone()) {
                continue;
            }
            if k == EntryKind::Dir {
                dirs.push(p);
            } else {
                plan.deletes.push(p);
            }
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        plan.deletes.extend(dirs);
    }

    fn rule_for(&self, abs: &Path) -> Option<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| abs.starts_with(&r.from))
            .max_by_key(|(_, r)| r.from.as_os_str().len())
            .map(|(i, _)| i)
    }

    /// Sends a plan as one or more batches; returns how many paths failed.
    async fn send_plan(&mut self, link: &mut Link, plan: Plan, initial: bool, t0: Instant) -> Result<usize, LinkError> {
        let mut errors = 0;
        let Plan { writes, mut deletes } = plan;
        let mut chunk: Vec<Write_> = Vec::new();
        let mut chunk_bytes = 0u64;
        let mut rest = writes.into_iter().peekable();
        loop {
            while let Some(w) = rest.peek() {
                if !chunk.is_empty() && chunk_bytes + w.size > BATCH_BYTES_MAX {
                    break;
                }
                chunk_bytes += w.size;
                chunk.push(rest.next().expect("peeked"));
            }
            let dels: Vec<String> = deletes.drain(..deletes.len().min(BATCH_DELETES_MAX)).collect();
            if chunk.is_empty() && dels.is_empty() {
                break;
            }
            errors += self.send_batch(link, std::mem::take(&mut chunk), dels, initial, t0).await?.errors;
            chunk_bytes = 0;
        }
        Ok(errors)
    }

    async fn send_batch(
        &mut self,
        link: &mut Link,
        writes: Vec<Write_>,
        deletes: Vec<String>,
        initial: bool,
        t0: Instant,
    ) -> Result<BatchOutcome, LinkError> {
        let changed = || writes.iter().map(|w| w.wire.as_str()).chain(deletes.iter().map(String::as_str));
        let matches = |m: &PathMatcher| changed().any(|p| m.is_match(p));
        let mut commands: Vec<CommandSpec> =
            self.svc.on_sync.iter().filter(|t| matches(&t.when)).map(|t| t.command.clone()).collect();
        // The initial sync happens before the app is configured (it starts on
        // the synced files), so only live batches restart it.
        let mut restart =
            !initial && self.svc.app.as_ref().is_some_and(|a| a.restart && a.restart_when.as_ref().is_none_or(matches));
        if restart && self.svc.app.as_ref().is_some_and(|a| a.spec.is_none()) {
            // The container's own process: its restart wrapper restarts it
            // on SIGHUP, after the other post-sync commands succeeded.
            commands.push(crate::target::workload::restart_command());
            restart = false;
        }
        let bytes: u64 = writes.iter().map(|w| w.size).sum();
        self.batches += 1;
        let files = writes.len() as u64;
        let started = Kind::SyncStarted { batch: self.batches, initial, files, deletes: deletes.len() as u64, bytes };
        let closed = || LinkError::Lost("connection closed while sending".into());
        let inline =
            bytes <= INLINE_BATCH_MAX && writes.iter().all(|w| w.kind != EntryKind::File || w.content.is_some());
        if writes.is_empty() || !inline {
            self.rep.send(started.clone());
        }
        // Files read only now, as the archive is built: one that cannot be
        // read is left out, and said so here.
        let to_read: Vec<(String, PathBuf)> = writes
            .iter()
            .filter(|w| w.kind == EntryKind::File && w.content.is_none())
            .map(|w| (w.wire.clone(), w.abs.clone()))
            .collect();
        let mut read_errors = Vec::new();
        let (sent, applied) = if writes.is_empty() {
            (Vec::new(), link.begin_batch(deletes.clone(), commands, restart, false).await?.applied)
        } else if inline {
            // The fast path for an edit: built in memory, sent in one write.
            let mut buf = Vec::with_capacity(bytes as usize + 1024 * writes.len());
            let (sent, _) = build_archive(&mut buf, writes);
            let applied = link.inline_batch(deletes.clone(), commands, restart, &buf)?;
            // Let the writer put it on the wire before anything else runs
            // here: the event's printer, woken first, would push the writer
            // off this thread's next-task slot and wake another thread.
            tokio::task::yield_now().await;
            self.rep.send(started);
            (sent, applied)
        } else {
            let pending = link.begin_batch(deletes.clone(), commands, restart, true).await?;
            let stream = pending.stream.ok_or_else(closed)?;
            let rt = tokio::runtime::Handle::current();
            let build = tokio::task::spawn_blocking(move || {
                let mut w = stream.blocking_writer(rt);
                let built = build_archive(&mut w, writes);
                w.finish().map(|_| built)
            });
            match build.await {
                Ok(Ok((s, errs))) => {
                    read_errors = errs;
                    (s, pending.applied)
                }
                _ => return Err(closed()),
            }
        };
        for m in read_errors {
            self.warn(m);
        }
        if !to_read.is_empty() {
            let got: HashSet<&str> = sent.iter().map(|e| e.path.as_str()).collect();
            for (wire, abs) in &to_read {
                if !got.contains(wire.as_str()) {
                    self.warn(format!(
                        "skipped {}: it could not be read; it is synced when it changes again",
                        abs.display()
                    ));
                }
            }
        }
        let Applied { written, deleted, bytes, errors, .. } =
            applied.await.map_err(|_| LinkError::Lost("connection closed".into()))??;
        for d in &deletes {
            self.model.remove(d);
        }
        let failed: HashSet<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for e in sent {
            if !failed.contains(e.path.as_str()) {
                self.model.insert(e.path.clone(), e);
            } else {
                self.model.remove(&e.path);
            }
        }
        for e in &errors {
            self.rep.send(Kind::SyncError { path: e.path.clone(), message: e.message.clone() });
        }
        self.rep.send(Kind::SyncApplied {
            batch: self.batches,
            initial,
            written,
            deleted,
            bytes,
            latency_ms: t0.elapsed().as_secs_f64() * 1e3,
        });
        Ok(BatchOutcome { errors: errors.len() })
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

/// Does the target's entry differ from the source's?
fn differs(t: &Entry, s: &Entry) -> bool {
    t.kind != s.kind
        || match s.kind {
            EntryKind::File => t.size != s.size || t.hash != s.hash || t.mode != s.mode,
            EntryKind::Symlink => t.link != s.link,
            EntryKind::Dir => false,
        }
}

/// Walks below `base` (wire path `prefix`) of a rule, applying its filter,
/// loading nested ignore files and adding watches for kept directories
/// before their contents are read (so nothing created meanwhile is missed).
#[allow(clippy::too_many_arguments)]
fn walk_rule(
    rule: &mut Rule,
    base: &Path,
    prefix: &str,
    watch: &Option<Watch>,
    found: &mut Vec<Found>,
    pruned: &mut Vec<String>,
    skipped: &mut Vec<Skipped>,
    watch_errors: &mut Vec<String>,
) {
    let mut visit = RuleVisit {
        from: rule.from.clone(),
        to: rule.to.clone(),
        filter: &mut rule.filter,
        pruned,
        watch,
        watch_errors,
        descend: true,
    };
    index::walk(base, prefix, &mut visit, WalkOptions::default(), found, skipped);
}

/// What one thread of [`scan_rule`] found below one top-level directory.
#[derive(Default)]
struct Subtree {
    found: Vec<Found>,
    pruned: Vec<String>,
    skipped: Vec<Skipped>,
    watch_errors: Vec<String>,
}

/// Walks a rule's whole source tree, sharing it out over the cores: the top
/// level here, then each top-level directory on whichever thread is free,
/// each thread with its own copy of the filter (merged back after). A walk
/// is mostly `stat`s and directory reads, which run in parallel in the
/// kernel; the result is in the same order as a one-thread walk.
fn scan_rule(
    rule: &mut Rule,
    watch: &Option<Watch>,
    found: &mut Vec<Found>,
    pruned: &mut Vec<String>,
    skipped: &mut Vec<Skipped>,
    watch_errors: &mut Vec<String>,
) {
    let (from, to) = (rule.from.clone(), rule.to.clone());
    let mut top = Vec::new();
    let mut visit = RuleVisit {
        from: from.clone(),
        to: to.clone(),
        filter: &mut rule.filter,
        pruned,
        watch,
        watch_errors,
        descend: false,
    };
    index::walk(&from, &to, &mut visit, WalkOptions::default(), &mut top, skipped);
    let dirs: Vec<usize> = (0..top.len()).filter(|&i| top[i].kind == EntryKind::Dir).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(dirs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut base = rule.filter.clone();
    base.warnings.clear();
    // Each worker takes the next directory until none is left; this thread
    // works too, so a helper thread that cannot be started costs only speed.
    let work = |mut filter: Filter| {
        let mut done = Vec::new();
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&i) = dirs.get(k) else { break };
            let mut sub = Subtree::default();
            let mut v = RuleVisit {
                from: from.clone(),
                to: to.clone(),
                filter: &mut filter,
                pruned: &mut sub.pruned,
                watch,
                watch_errors: &mut sub.watch_errors,
                descend: true,
            };
            let d = &top[i];
            index::walk(&d.abs, &d.path, &mut v, WalkOptions::default(), &mut sub.found, &mut sub.skipped);
            done.push((k, sub));
        }
        (done, filter)
    };
    let mut results = Vec::new();
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                let (work, filter) = (&work, base.clone());
                std::thread::Builder::new().name("scan".into()).spawn_scoped(s, move || work(filter)).ok()
            })
            .collect();
        results.push(work(base.clone()));
        for h in helpers {
            // A walk thread only panics if the walk does; pass it on.
            results.push(h.join().expect("walk thread"));
        }
    });
    let mut subtrees: Vec<Option<Subtree>> = (0..dirs.len()).map(|_| None).collect();
    for (done, filter) in results {
        rule.filter.absorb(filter);
        for (k, sub) in done {
            subtrees[k] = Some(sub);
        }
    }
    // Each directory's subtree goes right after the directory.
    let mut subtrees = subtrees.into_iter();
    for f in top {
        let is_dir = f.kind == EntryKind::Dir;
        found.push(f);
        if let Some(sub) = is_dir.then(|| subtrees.next().flatten()).flatten() {
            found.extend(sub.found);
            pruned.extend(sub.pruned);
            skipped.extend(sub.skipped);
            watch_errors.extend(sub.watch_errors);
        }
    }
}

/// What a walk of one rule's source keeps: not ignored; entering a
/// directory reads its ignore files and watches it before its contents are
/// read (so nothing created meanwhile is missed).
struct RuleVisit<'a> {
    from: PathBuf,
    to: String,
    filter: &'a mut Filter,
    pruned: &'a mut Vec<String>,
    watch: &'a Option<Watch>,
    watch_errors: &'a mut Vec<String>,
    /// False: directories are kept but not entered (see [`scan_rule`]).
    descend: bool,
}

impl index::Visit for RuleVisit<'_> {
    fn keep(&mut self, wire: &str, is_dir: bool) -> bool {
        let rel = if self.to.is_empty() { wire } else { wire[self.to.len()..].trim_start_matches('/') };
        let abs = self.from.join(rel);
        if self.filter.is_ignored(&abs, is_dir) {
            if is_dir {
                self.pruned.push(wire.to_string());
            }
            return false;
        }
        if is_dir {
            if let Some(w) = self.watch.as_ref() {
                if let Err(e) = w.add(&abs) {
                    self.watch_errors.push(format!("cannot watch {}: {e}", abs.display()));
                }
            }
        }
        true
    }

    fn entered(&mut self, dir: &Path, has: &dyn Fn(&str) -> bool) {
        self.filter.load_listed(dir, has);
    }

    fn descend(&mut self, _wire: &str) -> bool {
        self.descend
    }
}

/// Writes a tar archive of `writes` and returns the entries as sent (hash
/// of the bytes actually sent) and a warning for each streamed file whose
/// read failed part-way. Files that vanished are left out.
fn build_archive<W: Write>(out: W, writes: Vec<Write_>) -> (Vec<Entry>, Vec<String>) {
    let mut b = tar::Builder::new(out);
    let mut sent = Vec::with_capacity(writes.len());
    let mut read_errors = Vec::new();
    let mtime = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    for w in writes {
        let mut h = tar::Header::new_gnu();
        h.set_mode(w.mode);
        h.set_mtime(mtime);
        let res = match w.kind {
            EntryKind::File if w.content.is_none() && w.size > STREAM_FILE_MIN => {
                // Large files are streamed, not read whole into memory (a
                // 50 MiB Vec costs its page faults and zeroing, and the
                // memory). The header needs the size up front: the size at
                // open is sent, zero-padded if the file shrinks meanwhile;
                // its next change event sends it again.
                let Ok(f) = std::fs::File::open(&w.abs) else { continue };
                let Ok(size) = f.metadata().map(|m| m.len()) else { continue };
                let mut src = HashingReader::new(f, size);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(size);
                let r = b.append_data(&mut h, &w.wire, &mut src);
                if let Some(e) = &src.failed {
                    read_errors.push(format!(
                        "{}: reading failed part-way ({e}); the target's copy is incomplete until it is synced again",
                        w.abs.display()
                    ));
                }
                sent.push(Entry {
                    path: w.wire,
                    kind: EntryKind::File,
                    size,
                    mode: w.mode,
                    hash: src.hash.digest(),
                    link: None,
                });
                r
            }
            EntryKind::File => {
                let (data, hash) = match w.content {
                    Some(c) => c,
                    None => match std::fs::read(&w.abs) {
                        Ok(d) => {
                            let h = index::hash_bytes(&d);
                            (d, h)
                        }
                        Err(_) => continue,
                    },
                };
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                let r = b.append_data(&mut h, &w.wire, data.as_slice());
                sent.push(Entry {
                    path: w.wire,
                    kind: EntryKind::File,
                    size: data.len() as u64,
                    mode: w.mode,
                    hash,
                    link: None,
                });
                r
            }
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                let r = b.append_data(&mut h, &w.wire, std::io::empty());
                sent.push(Entry { path: w.wire, kind: EntryKind::Dir, size: 0, mode: w.mode, hash: 0, link: None });
                r
            }
            EntryKind::Symlink => {
                let target = w.link.clone().unwrap_or_default();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                let r = b.append_link(&mut h, &w.wire, &target);
                sent.push(Entry {
                    path: w.wire,
                    kind: EntryKind::Symlink,
                    size: 0,
                    mode: 0o777,
                    hash: 0,
                    link: Some(target),
                });
                r
            }
        };
        if res.is_err() {
            // The stream is gone; what was not sent is not in `sent`.
            sent.pop();
            break;
        }
    }
    let _ = b.finish();
    (sent, read_errors)
}

/// Files larger than this are streamed into an archive rather than read
/// whole first.
const STREAM_FILE_MIN: u64 = 1 << 20;

/// Reads exactly `left` bytes of a file, hashing them as they pass; a file
/// that ends early, or whose read fails part-way, reads as zeros up to its
/// announced size, so the archive stays whole for the files after it. The
/// hash is of what was sent, so the model holds what the target holds, and
/// the next comparison (a change, a rescan, a reconnect) sends it again.
///
/// It reads the file [`READ_CHUNK`] at a time: the tar builder asks for
/// 8 KiB per read, which would be 25,600 `read(2)` calls for a 200 MiB file.
struct HashingReader {
    inner: std::fs::File,
    left: u64,
    hash: xxhash_rust::xxh3::Xxh3,
    failed: Option<std::io::Error>,
    /// Read and hashed, not yet handed out: `buf[pos..end]`.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// How much of a large file is read at once.
const READ_CHUNK: usize = 256 << 10;

impl HashingReader {
    fn new(inner: std::fs::File, size: u64) -> HashingReader {
        let buf = vec![0; size.min(READ_CHUNK as u64) as usize];
        HashingReader { inner, left: size, hash: xxhash_rust::xxh3::Xxh3::new(), failed: None, buf, pos: 0, end: 0 }
    }

    /// Refills the buffer with the next piece of the announced size.
    fn fill(&mut self) {
        let want = self.left.min(self.buf.len() as u64) as usize;
        let mut n = 0;
        while n < want && self.failed.is_none() {
            match std::io::Read::read(&mut self.inner, &mut self.buf[n..want]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => self.failed = Some(e),
            }
        }
        self.buf[n..want].fill(0);
        self.hash.update(&self.buf[..want]);
        (self.pos, self.end) = (0, want);
    }
}

impl std::io::Read for HashingReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.end {
            if self.left == 0 {
                return Ok(0);
            }
            self.fill();
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads a small file whose size was just seen, in as few system calls as
/// possible (this is the path of every single edit): one read asking for
/// one byte more than `size`; an answer of exactly `size` bytes is the
/// whole file (a regular file's read only comes up short at its end), so
/// neither `fs::read`'s fstat nor a read that returns 0 is needed.
fn read_small(path: &Path, size: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let want = size as usize + 1;
    let mut buf = vec![0u8; want];
    let n = loop {
        match f.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    buf.truncate(n);
    if n == want || n + 1 < want {
        // It grew, or came up short of its size (it shrank, or a network
        // filesystem answers in pieces): read on to the real end.
        f.read_to_end(&mut buf)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A large file whose read fails part-way (here: a directory, whose
    /// read says EISDIR) still fills its announced size, so the archive
    /// stays whole for the files after it, and the failure is kept to be
    /// reported.
    #[test]
    fn a_failed_read_keeps_the_archive_whole_and_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let inner = std::fs::File::open(d.path()).unwrap();
        let mut r = HashingReader::new(inner, 10_000);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, vec![0u8; 10_000]);
        assert!(r.failed.is_some());
        assert_eq!(r.hash.digest(), index::hash_bytes(&got), "the hash is of what was sent");

        // A file that shrank: what is there, then zeros; not a failure.
        let f = d.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        let inner = std::fs::File::open(&f).unwrap();
        let mut r = HashingReader::new(inner, 5);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc\0\0");
        assert!(r.failed.is_none());
    }
}
