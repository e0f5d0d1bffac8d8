//! Deciding what to send: the source compared, by content, with the model
//! of the target, for a whole scan ([`Engine::diff`]) or for the paths a
//! watcher named ([`Engine::examine`]).
//!
//! Invariant 7 lives here: a path goes into a plan's deletions only with a
//! [`Gone`], and only three things make one: the source path was looked
//! at and is not there; a complete scan did not find it and nothing that
//! scan could not read covers it; or the source holds the path as
//! something else (a file where a directory was). A file that could not be
//! read, a directory that could not be listed, or a scan that failed can
//! therefore never become a deletion, whatever calls this module.

use super::model::Model;
use super::scan::{self, read_small, Scan, Unknown};
use super::{Engine, READ_AHEAD_MAX};
use crate::filter::Filter;
use devloop_agent::index::{self, Found};
use devloop_agent::paths::{self, WirePath};
use devloop_agent::protocol::{Entry, EntryKind};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

/// A path to send.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub wire: WirePath,
    pub abs: PathBuf,
    pub kind: EntryKind,
    pub mode: u32,
    pub size: u64,
    pub link: Option<WirePath>,
    /// Content already read (and its hash), for small files.
    pub content: Option<(Vec<u8>, u64)>,
}

/// Proof that the source does not hold a path (see the module's doc).
pub(super) struct Gone(());

impl Gone {
    /// The source path was looked up and does not exist: not any error,
    /// only "no such file".
    fn observed(e: &std::io::Error) -> Option<Gone> {
        (e.kind() == std::io::ErrorKind::NotFound).then_some(Gone(()))
    }

    /// A complete scan did not find `p`, and nothing it could not read
    /// covers it.
    fn not_found(p: &WirePath, present: &HashMap<&WirePath, EntryKind>, unknown: &Unknown) -> Option<Gone> {
        (!present.contains_key(p) && !unknown.covers(p)).then_some(Gone(()))
    }

    /// The source holds the path as a directory where the target has a
    /// file or link, or the other way round: the old one goes first.
    fn kind_changed() -> Gone {
        Gone(())
    }
}

/// What to send to make the target match.
#[derive(Default)]
pub(super) struct Plan {
    pub writes: Vec<Outgoing>,
    deletes: Vec<WirePath>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.deletes.is_empty()
    }

    fn delete(&mut self, p: WirePath, _: Gone) {
        self.deletes.push(p);
    }

    pub fn into_parts(self) -> (Vec<Outgoing>, Vec<WirePath>) {
        (self.writes, self.deletes)
    }
}

impl Engine {
    /// What must change for the target (`have`) to match the source, as
    /// far as a scan knows it: `unknown` is what the scan could not read.
    pub(super) fn diff(&self, src: &[(Found, Entry)], unknown: &Unknown, have: &Model, pruned: &[WirePath]) -> Plan {
        let mut plan = Plan::default();
        let mut present: HashMap<&WirePath, EntryKind> = HashMap::with_capacity(src.len());
        for (f, e) in src {
            present.insert(&e.path, e.kind);
            if have.get(&e.path).is_none_or(|t| t.differs(e)) {
                plan.writes.push(Outgoing {
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
        for (p, t) in have.iter() {
            let t_dir = t.is_dir();
            let gone = match present.get(p) {
                // Same path, and a directory on both sides or on neither:
                // the write above (if any) replaces it in place.
                Some(k) if (*k == EntryKind::Dir) == t_dir => continue,
                Some(_) => Gone::kind_changed(),
                None => {
                    if pruned.iter().any(|d| p.is_within(d)) || self.ignored_wire(p, t_dir) {
                        continue;
                    }
                    match Gone::not_found(p, &present, unknown) {
                        Some(g) => g,
                        None => continue,
                    }
                }
            };
            if t_dir {
                dirs.push((p.clone(), gone));
            } else {
                plan.delete(p.clone(), gone);
            }
        }
        // Directories last, deepest first, so each is empty when removed.
        dirs.sort_by_key(|(d, _)| std::cmp::Reverse(d.depth()));
        for (d, g) in dirs {
            plan.delete(d, g);
        }
        plan
    }

    /// Is a target path one the source side ignores (left alone)?
    pub(super) fn ignored_wire(&self, wire: &WirePath, is_dir: bool) -> bool {
        for r in &self.rules {
            if wire.is_within(&r.to) {
                if wire.len() == r.to.len() {
                    return false;
                }
                return r.filter.is_ignored(&scan::source_path(&r.from, &r.to, wire), is_dir);
            }
        }
        true
    }

    /// Compares each dirty path with the model. Returns the plan and whether
    /// a full rescan is needed (an ignore file changed). A file with other
    /// names (hard links) brings them along: a write through one name
    /// changes them all, and the watcher reports only the one written.
    pub(super) fn examine(&mut self, dirty: BTreeSet<PathBuf>) -> (Plan, bool) {
        let mut plan = Plan::default();
        let mut planned: HashSet<WirePath> = HashSet::new();
        let mut rescan = false;
        let mut work: VecDeque<PathBuf> = dirty.into_iter().collect();
        let mut seen: HashSet<PathBuf> = HashSet::new();
        while let Some(abs) = work.pop_front() {
            if !seen.insert(abs.clone()) {
                continue;
            }
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
                Ok(r) if to.is_empty() => r,
                Ok(r) => to.join(r.as_bytes()),
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
                Err(e) => {
                    match Gone::observed(&e) {
                        // Gone: delete it and everything the model has
                        // below it.
                        Some(g) => {
                            if let Some(w) = &mut self.watch {
                                w.remove_tree(&abs);
                            }
                            self.unread.remove(&abs);
                            self.forget_links(&abs);
                            self.plan_removal(&wire, g, &mut plan, &mut planned);
                        }
                        // Not "no such file" (a parent without search
                        // permission, say): unknown, not absent.
                        None => self.unreadable(&abs, &wire, &e.to_string()),
                    }
                    continue;
                }
            };
            let is_dir = md.is_dir();
            if self.rules[ri].filter.is_ignored(&abs, is_dir) {
                continue;
            }
            if is_dir {
                let mut sub = Scan {
                    found: vec![Found::of(wire.clone(), abs.clone(), EntryKind::Dir, &md)],
                    pruned: Vec::new(),
                    skipped: Vec::new(),
                };
                let mut werr = Vec::new();
                if let Some(w) = &self.watch {
                    let _ = w.add(&abs);
                }
                scan::walk_rule(&mut self.rules[ri], &abs, &wire, &self.watch, &mut sub, &mut werr);
                let unknown = Unknown::from_skipped(&sub.skipped);
                for s in &sub.skipped {
                    if let Some(w) = &s.wire {
                        self.unreadable(&s.abs, w, &s.reason);
                    }
                }
                let present: HashMap<&WirePath, EntryKind> = sub.found.iter().map(|f| (&f.path, f.kind)).collect();
                // Model entries below that are no longer there.
                let gone: Vec<(WirePath, Gone)> = self
                    .model
                    .range_from(&wire.children_start())
                    .take_while(|(p, _)| p.is_within(&wire))
                    .filter(|(p, k)| !self.ignored_wire(p, k.is_dir()))
                    .filter_map(|(p, _)| Some((p.clone(), Gone::not_found(p, &present, &unknown)?)))
                    .collect();
                drop(present);
                for (g, proof) in gone {
                    self.plan_removal(&g, proof, &mut plan, &mut planned);
                }
                for f in sub.found {
                    self.note_links(&f);
                    self.plan_found(ri, f, &mut plan, &mut planned);
                }
            } else {
                if !md.file_type().is_symlink() && !md.is_file() {
                    continue;
                }
                let kind = if md.file_type().is_symlink() { EntryKind::Symlink } else { EntryKind::File };
                let f = Found::of(wire, abs.clone(), kind, &md);
                if let Some(siblings) = self.note_links(&f) {
                    work.extend(siblings);
                }
                self.plan_found(ri, f, &mut plan, &mut planned);
            }
        }
        (plan, rescan)
    }

    /// Records a file's names if it has several; returns the others.
    pub(super) fn note_links(&mut self, f: &Found) -> Option<Vec<PathBuf>> {
        if f.kind != EntryKind::File || f.nlink < 2 {
            return None;
        }
        let names = self.links.entry((f.dev, f.ino)).or_default();
        if !names.contains(&f.abs) {
            names.push(f.abs.clone());
        }
        Some(names.iter().filter(|n| **n != f.abs).cloned().collect())
    }

    fn forget_links(&mut self, abs: &Path) {
        if self.links.is_empty() {
            return;
        }
        self.links.retain(|_, names| {
            names.retain(|n| n != abs);
            names.len() > 1
        });
    }

    /// A source path that could not be read: it stays as it is on the
    /// target, is reported, and is examined again until it can be read.
    pub(super) fn unreadable(&mut self, abs: &Path, wire: &WirePath, reason: &str) {
        let fresh = self.unread.insert(abs.to_path_buf(), reason.to_string()).as_deref() != Some(reason);
        if fresh {
            self.rep.send(crate::events::Kind::SyncError {
                path: wire.lossy().into_owned(),
                path_not_utf8: !wire.is_utf8(),
                message: format!(
                    "cannot read {}: {reason}; it is left as it is on the target, and tried again",
                    abs.display()
                ),
            });
        }
    }

    /// Adds a found path to the plan if it differs from the model.
    fn plan_found(&mut self, ri: usize, mut f: Found, plan: &mut Plan, planned: &mut HashSet<WirePath>) {
        if !planned.insert(f.path.clone()) {
            return;
        }
        let mut content = None;
        let entry = match f.kind {
            EntryKind::Dir => {
                Entry { path: f.path.clone(), kind: EntryKind::Dir, size: 0, mode: f.mode, hash: 0, link: None }
            }
            EntryKind::Symlink => {
                let t = match std::fs::read_link(&f.abs) {
                    Ok(t) => WirePath::new(std::os::unix::ffi::OsStringExt::into_vec(t.into_os_string())),
                    Err(e) => return self.read_failed(&f, &e),
                };
                let rule = &self.rules[ri];
                let Some(t) = scan::link_for_target(&rule.from, &rule.to, &f.path, &t) else {
                    self.warn(format!("symlink {} -> {t} points outside the synced tree; not synced", f.path));
                    return;
                };
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
                        Err(e) => return self.read_failed(&f, &e),
                    }
                } else {
                    match index::hash_file(&f.abs) {
                        Ok(x) => x,
                        Err(e) => return self.read_failed(&f, &e),
                    }
                };
                f.size = size;
                Entry { path: f.path.clone(), kind: EntryKind::File, size, mode: f.mode, hash, link: None }
            }
        };
        self.unread.remove(&f.abs);
        let old = self.model.get(&f.path);
        if old.is_some_and(|o| !o.differs(&entry)) {
            return;
        }
        // A directory replaced by a file or link: remove it (and what the
        // model has below it) first.
        if old.is_some_and(|o| o.kind == EntryKind::Dir) && entry.kind != EntryKind::Dir {
            let p = f.path.clone();
            planned.remove(&p);
            self.plan_removal(&p, Gone::kind_changed(), plan, planned);
            planned.insert(p);
        }
        // Parents the target does not have yet (a file in a new directory
        // whose own event has not been seen).
        if let Some(parent) = f.path.parent().filter(|p| !p.is_empty()) {
            if !self.model.contains_key(&parent)
                && !planned.contains(&parent)
                && !self.rules.iter().any(|r| r.to == parent)
            {
                if let Some(pabs) = f.abs.parent() {
                    if let Ok(m) = std::fs::symlink_metadata(pabs) {
                        let pf = Found::of(parent, pabs.to_path_buf(), EntryKind::Dir, &m);
                        self.plan_found(ri, pf, plan, planned);
                    }
                }
            }
        }
        plan.writes.push(Outgoing {
            wire: f.path,
            abs: f.abs,
            kind: entry.kind,
            mode: entry.mode,
            size: entry.size,
            link: entry.link,
            content,
        });
    }

    /// A read of a found path failed: vanished (its removal event
    /// follows), or unreadable (kept, reported, tried again).
    fn read_failed(&mut self, f: &Found, e: &std::io::Error) {
        if e.kind() != std::io::ErrorKind::NotFound {
            self.unreadable(&f.abs, &f.path, &e.to_string());
        }
    }

    /// Plans the deletion of a path and everything the model has below it
    /// (what lies below a path that is gone is gone too).
    fn plan_removal(&mut self, wire: &WirePath, _: Gone, plan: &mut Plan, planned: &mut HashSet<WirePath>) {
        // The path itself, then its children: they sort together from
        // `wire/` on (not from `wire`: `a-b` and `a.txt` sort between `a`
        // and `a/x`).
        let mut below: Vec<(WirePath, EntryKind)> =
            self.model.get(wire).map(|e| (wire.clone(), e.kind)).into_iter().collect();
        below.extend(
            self.model
                .range_from(&wire.children_start())
                .take_while(|(p, _)| p.is_within(wire))
                .map(|(p, e)| (p.clone(), e.kind)),
        );
        let mut dirs = Vec::new();
        for (p, k) in below {
            if !planned.insert(p.clone()) {
                continue;
            }
            if k == EntryKind::Dir {
                dirs.push(p);
            } else {
                plan.delete(p, Gone(()));
            }
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.depth()));
        for d in dirs {
            plan.delete(d, Gone(()));
        }
    }

    pub(super) fn rule_for(&self, abs: &Path) -> Option<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| abs.starts_with(&r.from))
            .max_by_key(|(_, r)| r.from.as_os_str().len())
            .map(|(i, _)| i)
    }
}
