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
//! By job:
//! - [`scan`]: walking the source, and what could not be read;
//! - [`plan`]: comparing with the model, and the rule that nothing is
//!   deleted unless known absent (invariant 7);
//! - [`archive`]: the tar archive a batch carries;
//! - [`live`]: the live loop and its batching;
//! - here: the engine, the first sync, and sending plans as batches.

mod archive;
mod live;
mod model;
mod plan;
mod prefetch;
mod scan;

use crate::client::{AgentClient, Applied, ClientError};
use crate::config::{PathMatcher, Service};
use crate::events::{Kind, Reporter};
use crate::filter::Filter;
use crate::watch::Watch;
use devloop_agent::codec::CompressWriter;
use devloop_agent::hash_cache;
use devloop_agent::index::{self, HashCache, ScanFailed};
use devloop_agent::paths::WirePath;
use devloop_agent::protocol::{CommandSpec, Encoding, EntryKind};
pub use model::Shelf;
use model::{Known, Model};
use plan::{Outgoing, Plan};
use scan::Unknown;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

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

/// One rule's source side.
struct Rule {
    from: PathBuf,
    to: WirePath,
    filter: Filter,
}

/// Each target path's kind, size and mode: what a source file must match to
/// possibly be equal.
type TargetShapes = HashMap<WirePath, (EntryKind, u64, u32)>;

/// Why the live loop stopped.
pub enum LiveEnd {
    Shutdown,
    Lost(String),
    /// A full resync was asked for; the answer goes here once it is done.
    Resync(tokio::sync::oneshot::Sender<crate::hub::Answer>),
}

/// How the app is restarted after a sync: the agent restarts the app it
/// runs, or a post-sync command does, which the endpoint gives (the
/// Kubernetes restart wrapper's signal to the container's own process).
#[derive(Debug, Clone)]
pub enum Restart {
    Agent,
    Command(CommandSpec),
}

/// Why a sync could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The scan of the source failed: nothing was sent or deleted.
    #[error(transparent)]
    Scan(#[from] ScanFailed),
}

pub struct Engine {
    svc: Service,
    rules: Vec<Rule>,
    model: Model,
    rep: Reporter,
    watch: Option<Watch>,
    warned: HashSet<String>,
    batches: u64,
    /// Source paths that could not be read, and why: left as they are on
    /// the target, and examined again until they can be read.
    unread: BTreeMap<PathBuf, String>,
    /// The names of each file that has several (hard links), by device
    /// and inode.
    links: HashMap<(u64, u64), Vec<PathBuf>>,
    /// How the app is restarted, if there is one to restart.
    restart: Option<Restart>,
    /// Where the hashes of the source's settled files are kept between
    /// scans (None: nowhere to keep them).
    hash_cache: Option<PathBuf>,
}

/// What one batch achieved.
pub struct BatchOutcome {
    pub errors: usize,
}

impl Engine {
    /// `watch` is None for a one-shot sync; `restart` says how the
    /// endpoint restarts the app (None: there is no app to restart).
    pub fn new(svc: Service, rep: Reporter, watch: Option<Watch>, restart: Option<Restart>, shelf: Shelf) -> Engine {
        let rules = svc
            .rules
            .iter()
            .map(|r| Rule {
                from: r.from.clone(),
                to: WirePath::from(r.to.as_str()),
                filter: Filter::new(&r.from, &r.exclude),
            })
            .collect::<Vec<_>>();
        let hash_cache = crate::cache_dir().map(|d| {
            let mut key = svc.name.as_bytes().to_vec();
            for r in &rules {
                key.push(0);
                key.extend_from_slice(r.from.as_os_str().as_encoded_bytes());
            }
            hash_cache::path_for(&d.join("hashes"), "", &key)
        });
        let mut e = Engine {
            svc,
            rules,
            model: Model::new(shelf),
            rep,
            watch,
            warned: HashSet::new(),
            batches: 0,
            unread: BTreeMap::new(),
            links: HashMap::new(),
            restart,
            hash_cache,
        };
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

    /// Whether syncs restart the app (`app.restart`).
    fn restarts_app(&self) -> bool {
        self.svc.app.as_ref().is_some_and(|a| a.restart)
    }

    /// Restarts the app now (an action).
    pub async fn restart_now(&self, link: &AgentClient) -> crate::hub::Answer {
        match &self.restart {
            Some(Restart::Agent) => {
                link.restart_app().map_err(|e| e.to_string())?;
                Ok("the app is restarting".into())
            }
            Some(Restart::Command(c)) => {
                let applied = link.batch(Vec::new(), vec![c.clone()], false).map_err(|e| e.to_string())?;
                applied.await.map_err(|_| "the connection closed".to_string())?.map_err(|e| e.to_string())?;
                Ok("the container's process is restarting".into())
            }
            None => Err(format!("service `{}` has no app to restart (add `app:`)", self.svc.name)),
        }
    }

    /// Runs one of the service's post-sync commands now (an action).
    pub async fn run_now(&self, link: &AgentClient, index: usize) -> crate::hub::Answer {
        let Some(t) = self.svc.on_sync.get(index) else {
            return Err(format!(
                "service `{}` has {} on_sync command(s); there is no [{index}]",
                self.svc.name,
                self.svc.on_sync.len()
            ));
        };
        let applied = link.batch(Vec::new(), vec![t.command.clone()], false).map_err(|e| e.to_string())?;
        applied.await.map_err(|_| "the connection closed".to_string())?.map_err(|e| e.to_string())?;
        Ok(format!("`{}` is running; its output follows", t.command.display()))
    }

    /// Source paths that could not be read (so the target is not known to
    /// match them).
    pub fn unread(&self) -> usize {
        self.unread.len()
    }

    /// Records what a scan could not read; paths it read again are no
    /// longer unread.
    fn take_unreadable(&mut self, skipped: &[index::Skipped]) {
        self.unread.clear();
        for s in skipped {
            match &s.wire {
                Some(w) => self.unreadable(&s.abs, w, &s.reason),
                None => self.warn(format!("skipped {}: {}", s.abs.display(), s.reason)),
            }
        }
    }

    /// The first sync of a session: compare the source with the agent's
    /// index, by content, and send only the differences. Returns the number
    /// of paths that failed or could not be read.
    pub async fn initial_sync(&mut self, link: &AgentClient) -> Result<usize, SyncError> {
        let shelf = self.model.shelf().clone();
        let _turn = match shelf.first_sync_turn_now() {
            Some(t) => t,
            None => {
                self.rep.send(Kind::SyncTurn { waiting: true });
                let t = shelf.first_sync_turn().await;
                self.rep.send(Kind::SyncTurn { waiting: false });
                t
            }
        };
        let t0 = Instant::now();
        let (cache, scan) = tokio::task::block_in_place(|| (self.hash_cache(), self.scan_source()));
        let scan = scan?;
        let unders: Vec<WirePath> = self.rules.iter().map(|r| r.to.clone()).collect();
        let pruned = scan.pruned;
        // Hash the source while the agent indexes the target. Once the
        // target's index is in, only files it holds with the same size and
        // mode can be equal; the rest travel anyway (and are hashed as they
        // are read for sending), so their hashing is skipped: a first sync
        // into an empty target reads each file once, not twice.
        let known: Arc<OnceLock<TargetShapes>> = Arc::default();
        let hashing = tokio::task::spawn_blocking({
            let known = known.clone();
            let (found, mut skipped) = (scan.found, scan.skipped);
            move || {
                let skip = |f: &index::Found| {
                    known.get().is_some_and(|k| k.get(&f.path) != Some(&(EntryKind::File, f.size, f.mode)))
                };
                let r = index::hash_cached(found, &mut skipped, &skip, &cache);
                if let Ok((hashed, _)) = &r {
                    cache.store(hashed);
                }
                (r, skipped)
            }
        });
        let index = link.index(unders, pruned.clone()).await?;
        let (target, target_reused) = (index.entries, index.reused);
        let _ = known.set(target.iter().map(|e| (e.path.clone(), (e.kind, e.size, e.mode))).collect());
        // A hashing task that panicked (or could not run) is a failed scan,
        // never an empty source: an empty source would delete the target.
        let ((src, stats), skipped) = match hashing.await {
            Ok((r, skipped)) => (r?, skipped),
            Err(e) => return Err(ScanFailed(format!("the hashing task failed: {e}")).into()),
        };
        self.take_unreadable(&skipped);
        self.links.clear();
        for (f, _) in &src {
            self.note_links(f);
        }
        let unknown = Unknown::from_skipped(&skipped);
        // Until acknowledged otherwise, the target holds what it reported
        // (what the source side ignores is left alone, and forgotten).
        let have: Vec<(WirePath, Known)> =
            target.into_iter().map(Known::from_entry).filter(|(p, k)| !self.ignored_wire(p, k.is_dir())).collect();
        self.model.reset(have);
        let plan = self.diff(&src, &unknown, &self.model, &pruned);
        let files = src.iter().filter(|(f, _)| f.kind == EntryKind::File).count() as u64;
        let dirs = src.iter().filter(|(f, _)| f.kind == EntryKind::Dir).count() as u64;
        // The plan holds what it needs: the scan (two paths and an entry
        // per file, about 350 bytes each) goes before the sending, not
        // after it, which is when the most is held. (Before the model is
        // built, its nodes would fill the scan's freed space and leave the
        // heap more fragmented: RSS then grew 41% over 20 reconnects.)
        drop((src, unknown));
        let mut errors = 0;
        if !plan.is_empty() {
            errors = self.send_plan(link, plan, true, t0).await?;
            if let (Some(Restart::Command(c)), true) = (&self.restart, self.restarts_app()) {
                // The container's own process started on the image's files,
                // before these landed: restart it once, now.
                let applied = link.batch(Vec::new(), vec![c.clone()], false)?;
                applied.await.map_err(|_| ClientError::Lost("connection closed".into()))??;
            }
        }
        // Folded into one compact base, shared with the other pods that
        // hold the same tree.
        self.model.settle();
        self.rep.send(Kind::InSync {
            files,
            dirs,
            checked_ms: t0.elapsed().as_secs_f64() * 1e3,
            reused: stats.reused,
            target_reused,
        });
        Ok(errors + self.unread.len())
    }

    /// The source's hash cache, for a scan that begins now.
    fn hash_cache(&self) -> HashCache {
        self.hash_cache.clone().map_or_else(HashCache::none, HashCache::open)
    }

    /// Sends a plan as one or more batches; returns how many paths failed.
    async fn send_plan(
        &mut self,
        link: &AgentClient,
        plan: Plan,
        initial: bool,
        t0: Instant,
    ) -> Result<usize, ClientError> {
        let mut errors = 0;
        let (writes, mut deletes) = plan.into_parts();
        let (files_total, bytes_total) = (writes.len() as u64, writes.iter().map(|w| w.size).sum::<u64>());
        let (mut files_done, mut bytes_done) = (0u64, 0u64);
        let mut chunk: Vec<Outgoing> = Vec::new();
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
            let dels: Vec<WirePath> = deletes.drain(..deletes.len().min(BATCH_DELETES_MAX)).collect();
            if chunk.is_empty() && dels.is_empty() {
                break;
            }
            let n = chunk.len() as u64;
            errors += self.send_batch(link, std::mem::take(&mut chunk), dels, initial, t0).await?.errors;
            (files_done, bytes_done) = (files_done + n, bytes_done + chunk_bytes);
            if initial && files_total > 0 {
                self.rep.send(Kind::SyncProgress { files_done, files_total, bytes_done, bytes_total });
            }
            chunk_bytes = 0;
        }
        Ok(errors)
    }

    async fn send_batch(
        &mut self,
        link: &AgentClient,
        writes: Vec<Outgoing>,
        deletes: Vec<WirePath>,
        initial: bool,
        t0: Instant,
    ) -> Result<BatchOutcome, ClientError> {
        let changed = || writes.iter().map(|w| w.wire.as_bytes()).chain(deletes.iter().map(WirePath::as_bytes));
        let matches = |m: &PathMatcher| changed().any(|p| m.is_match(p));
        let mut commands: Vec<CommandSpec> =
            self.svc.on_sync.iter().filter(|t| matches(&t.when)).map(|t| t.command.clone()).collect();
        // The initial sync happens before the app is configured (it starts on
        // the synced files), so only live batches restart it.
        let wants_restart = !initial
            && self.restarts_app()
            && self.svc.app.as_ref().is_some_and(|a| a.restart_when.as_ref().is_none_or(matches));
        let mut restart = false;
        match (&self.restart, wants_restart) {
            (Some(Restart::Agent), true) => restart = true,
            // After the other post-sync commands succeeded.
            (Some(Restart::Command(c)), true) => commands.push(c.clone()),
            _ => {}
        }
        let bytes: u64 = writes.iter().map(|w| w.size).sum();
        let paths: Vec<String> = changed().take(20).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        self.batches += 1;
        let files = writes.len() as u64;
        let started = Kind::SyncStarted { batch: self.batches, initial, files, deletes: deletes.len() as u64, bytes };
        let closed = || ClientError::Lost("connection closed while sending".into());
        let inline =
            bytes <= INLINE_BATCH_MAX && writes.iter().all(|w| w.kind != EntryKind::File || w.content.is_some());
        if writes.is_empty() || !inline {
            self.rep.send(started.clone());
        }
        // Files read only now, as the archive is built: one that cannot be
        // read is left out, and said so here.
        let to_read: Vec<(WirePath, PathBuf)> = writes
            .iter()
            .filter(|w| w.kind == EntryKind::File && w.content.is_none())
            .map(|w| (w.wire.clone(), w.abs.clone()))
            .collect();
        let mut read_errors = Vec::new();
        let (sent, applied) = if writes.is_empty() {
            (Vec::new(), link.batch(deletes.clone(), commands, restart)?)
        } else if inline {
            // The fast path for an edit: built in memory, sent in one write.
            let mut buf = Vec::with_capacity(bytes as usize + 1024 * writes.len());
            let (sent, _) = archive::build_archive(&mut buf, writes);
            let applied = link.inline_batch(deletes.clone(), commands, restart, &buf).await?;
            // Let the writer put it on the wire before anything else runs
            // here: the event's printer, woken first, would push the writer
            // off this thread's next-task slot and wake another thread.
            tokio::task::yield_now().await;
            self.rep.send(started);
            (sent, applied)
        } else {
            let encoding = link.compresses().then_some(Encoding::Zstd);
            let (stream, applied) = link.stream_batch(deletes.clone(), commands, restart, encoding)?;
            let rt = tokio::runtime::Handle::current();
            let build = tokio::task::spawn_blocking(move || {
                let w = stream.blocking(rt);
                if encoding.is_none() {
                    let mut w = w;
                    let built = archive::build_archive(&mut w, writes);
                    return w.finish().map(|_| built);
                }
                let mut packed = CompressWriter::new(w)?;
                let built = archive::build_archive(&mut packed, writes);
                let (w, _, _) = packed.finish()?;
                w.finish().map(|_| built)
            });
            match build.await {
                Ok(Ok((s, errs))) => {
                    read_errors = errs;
                    (s, applied)
                }
                _ => return Err(closed()),
            }
        };
        for m in read_errors {
            self.warn(m);
        }
        if !to_read.is_empty() {
            let got: HashSet<&WirePath> = sent.iter().map(|e| &e.path).collect();
            for (wire, abs) in &to_read {
                if !got.contains(wire) {
                    match std::fs::symlink_metadata(abs) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        _ => self.unreadable(abs, wire, "it could not be opened for sending"),
                    }
                }
            }
        }
        let Applied { written, deleted, bytes, errors, .. } =
            applied.await.map_err(|_| ClientError::Lost("connection closed".into()))??;
        for d in &deletes {
            self.model.remove(d);
        }
        let failed: HashSet<&WirePath> = errors.iter().map(|e| &e.path).collect();
        for e in sent {
            if !failed.contains(&e.path) {
                self.model.insert(e);
            } else {
                self.model.remove(&e.path);
            }
        }
        // A first sync settles once, at its end.
        if !initial && self.model.unsettled() {
            self.model.settle();
        }
        for e in &errors {
            self.rep.send(Kind::SyncError {
                path: e.path.lossy().into_owned(),
                path_not_utf8: !e.path.is_utf8(),
                message: e.message.clone(),
            });
        }
        self.rep.send(Kind::SyncApplied {
            batch: self.batches,
            initial,
            written,
            deleted,
            bytes,
            latency_ms: t0.elapsed().as_secs_f64() * 1e3,
            paths,
        });
        Ok(BatchOutcome { errors: errors.len() })
    }
}
