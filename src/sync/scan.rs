//! Walking the source: each rule's tree, filtered, with watches added as
//! directories are found, shared out over the cores; symlinks resolved to
//! what the target can hold; and, as carefully as what was found, what
//! could not be read.

use super::{Engine, Rule};
use crate::filter::Filter;
use crate::watch::Watch;
use devloop_agent::index::{self, Found, ScanFailed, Skipped, WalkOptions};
use devloop_agent::paths::{self, WirePath};
use devloop_agent::protocol::EntryKind;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What a walk of the source found.
pub(super) struct Scan {
    pub found: Vec<Found>,
    /// Ignored directories it did not enter (left alone on the target).
    pub pruned: Vec<WirePath>,
    /// What it could not read: unknown, never absent.
    pub skipped: Vec<Skipped>,
}

/// Paths of the source whose state is unknown: a file that could not be
/// read, a directory that could not be listed (with everything below
/// it). Nothing they cover is ever taken for absent (invariant 7).
#[derive(Default)]
pub(super) struct Unknown(BTreeSet<WirePath>);

impl Unknown {
    pub fn from_skipped(skipped: &[Skipped]) -> Unknown {
        Unknown(skipped.iter().filter_map(|s| s.wire.clone()).collect())
    }

    /// Whether `p` is unknown, or lies below something unknown.
    pub fn covers(&self, p: &WirePath) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let b = p.as_bytes();
        // `p` itself and each directory above it.
        self.0.contains(b)
            || b.iter().enumerate().filter(|(_, c)| **c == b'/').any(|(i, _)| self.0.contains(&b[..i]))
            || self.0.contains(&b""[..])
    }
}

impl Engine {
    /// Walks every rule's source tree (adding watches as it goes).
    /// Symlinks come out as the target will hold them (see
    /// [`link_for_target`]); one that leaves the tree is left out, with a
    /// warning.
    pub(super) fn scan_source(&mut self) -> Result<Scan, ScanFailed> {
        let mut scan = Scan { found: Vec::new(), pruned: Vec::new(), skipped: Vec::new() };
        let mut watch_errors = Vec::new();
        let mut outside = Vec::new();
        for rule in &mut self.rules {
            if let Some(w) = &self.watch {
                if let Err(e) = w.add(&rule.from) {
                    watch_errors.push(format!("cannot watch {}: {e}", rule.from.display()));
                }
            }
            let start = scan.found.len();
            scan_rule(rule, &self.watch, &mut scan.found, &mut scan.pruned, &mut scan.skipped, &mut watch_errors)?;
            let mut kept = Vec::with_capacity(scan.found.len() - start);
            for mut f in scan.found.drain(start..) {
                if let Some(t) = &f.link {
                    match link_for_target(&rule.from, &rule.to, &f.path, t) {
                        Some(t) => f.link = Some(t),
                        None => {
                            outside
                                .push(format!("symlink {} -> {t} points outside the synced tree; not synced", f.path));
                            continue;
                        }
                    }
                }
                kept.push(f);
            }
            scan.found.extend(kept);
        }
        for m in outside {
            self.warn(m);
        }
        for e in watch_errors.into_iter().take(3) {
            self.warn(format!("{e} (raise fs.inotify.max_user_watches, or exclude large directories)"));
        }
        Ok(scan)
    }
}

/// The target a symlink gets on the target side, or None when it points
/// outside the synced tree. A relative target is kept as it is (if it
/// stays inside the target's root). An absolute one that points into the
/// rule's source tree is rewritten as the relative path to the same place
/// (inside a pod, the absolute path would name the container's own
/// files); lexically first, then through the real path for a target
/// reached through a symlinked directory (`/tmp` → `/private/tmp`).
pub(super) fn link_for_target(from: &Path, to: &WirePath, link: &WirePath, target: &WirePath) -> Option<WirePath> {
    let t = target.as_bytes();
    if t.first() != Some(&b'/') {
        return paths::check_link_target(link.as_bytes(), t).is_ok().then(|| target.clone());
    }
    let abs = Path::new(OsStr::from_bytes(t));
    let rel = lexical(abs)
        .and_then(|n| n.strip_prefix(from).ok().map(Path::to_path_buf))
        .or_else(|| std::fs::canonicalize(abs).ok()?.strip_prefix(from).ok().map(Path::to_path_buf))?;
    let dest: Vec<&[u8]> = to
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .chain(rel.components().map(|c| c.as_os_str().as_bytes()))
        .collect();
    let here: Vec<&[u8]> = link.as_bytes().split(|b| *b == b'/').collect();
    let dir = &here[..here.len().saturating_sub(1)];
    let common = dir.iter().zip(&dest).take_while(|(a, b)| a == b).count();
    let mut out: Vec<&[u8]> = vec![b".."; dir.len() - common];
    out.extend(&dest[common..]);
    let rewritten = if out.is_empty() { b".".to_vec() } else { out.join(&b'/') };
    paths::check_link_target(link.as_bytes(), &rewritten).ok()?;
    Some(WirePath::new(rewritten))
}

/// `p` with `.` and `..` resolved by name (no filesystem access); None if
/// it climbs above `/`.
fn lexical(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

/// Walks below `base` (wire path `prefix`) of a rule, applying its filter,
/// loading nested ignore files and adding watches for kept directories
/// before their contents are read (so nothing created meanwhile is missed).
pub(super) fn walk_rule(
    rule: &mut Rule,
    base: &Path,
    prefix: &WirePath,
    watch: &Option<Watch>,
    scan: &mut Scan,
    watch_errors: &mut Vec<String>,
) {
    let mut visit = RuleVisit {
        from: rule.from.clone(),
        to: rule.to.clone(),
        filter: &mut rule.filter,
        pruned: &mut scan.pruned,
        watch,
        watch_errors,
        descend: true,
    };
    index::walk(base, prefix, &mut visit, WalkOptions::default(), &mut scan.found, &mut scan.skipped);
}

/// What one thread of [`scan_rule`] found below one top-level directory.
#[derive(Default)]
struct Subtree {
    found: Vec<Found>,
    pruned: Vec<WirePath>,
    skipped: Vec<Skipped>,
    watch_errors: Vec<String>,
}

/// Walks a rule's whole source tree, sharing it out over the cores: the top
/// level here, then each top-level directory on whichever thread is free,
/// each thread with its own copy of the filter (merged back after). A walk
/// is mostly `stat`s and directory reads, which run in parallel in the
/// kernel; the result is in the same order as a one-thread walk.
///
/// A helper thread that cannot be started costs speed; one that panics
/// fails the scan (a partial walk must never pass for the whole tree).
fn scan_rule(
    rule: &mut Rule,
    watch: &Option<Watch>,
    found: &mut Vec<Found>,
    pruned: &mut Vec<WirePath>,
    skipped: &mut Vec<Skipped>,
    watch_errors: &mut Vec<String>,
) -> Result<(), ScanFailed> {
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
    let mut base = rule.filter.clone();
    base.warnings.clear();
    // Each thread walks with its own copy of the filter (it loads the
    // ignore files it finds), merged back after.
    let (subtrees, filters) = index::share_out(dirs.len(), "walking", &|| base.clone(), &|filter, k| {
        let mut sub = Subtree::default();
        let mut v = RuleVisit {
            from: from.clone(),
            to: to.clone(),
            filter,
            pruned: &mut sub.pruned,
            watch,
            watch_errors: &mut sub.watch_errors,
            descend: true,
        };
        let d = &top[dirs[k]];
        index::walk(&d.abs, &d.path, &mut v, WalkOptions::default(), &mut sub.found, &mut sub.skipped);
        sub
    })?;
    for f in filters {
        rule.filter.absorb(f);
    }
    let mut subtrees = subtrees.into_iter();
    // Each directory's subtree goes right after the directory.
    for f in top {
        let is_dir = f.kind == EntryKind::Dir;
        found.push(f);
        if let Some(sub) = is_dir.then(|| subtrees.next()).flatten() {
            found.extend(sub.found);
            pruned.extend(sub.pruned);
            skipped.extend(sub.skipped);
            watch_errors.extend(sub.watch_errors);
        }
    }
    Ok(())
}

/// A rule's source path for a wire path below its `to`.
pub(super) fn source_path(from: &Path, to: &WirePath, wire: &WirePath) -> PathBuf {
    let rel = &wire.as_bytes()[to.len()..];
    let rel = rel.strip_prefix(b"/").unwrap_or(rel);
    if rel.is_empty() {
        from.to_path_buf()
    } else {
        from.join(OsStr::from_bytes(rel))
    }
}

/// What a walk of one rule's source keeps: not ignored; entering a
/// directory reads its ignore files and watches it before its contents are
/// read (so nothing created meanwhile is missed).
struct RuleVisit<'a> {
    from: PathBuf,
    to: WirePath,
    filter: &'a mut Filter,
    pruned: &'a mut Vec<WirePath>,
    watch: &'a Option<Watch>,
    watch_errors: &'a mut Vec<String>,
    /// False: directories are kept but not entered (see [`scan_rule`]).
    descend: bool,
}

impl index::Visit for RuleVisit<'_> {
    fn keep(&mut self, wire: &WirePath, is_dir: bool) -> bool {
        let abs = source_path(&self.from, &self.to, wire);
        if self.filter.is_ignored(&abs, is_dir) {
            if is_dir {
                self.pruned.push(wire.clone());
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

    fn descend(&mut self, _wire: &WirePath) -> bool {
        self.descend
    }
}

/// Reads a small file whose size was just seen, in as few system calls as
/// possible (this is the path of every single edit): one read asking for
/// one byte more than `size`; an answer of exactly `size` bytes is the
/// whole file (a regular file's read only comes up short at its end), so
/// neither `fs::read`'s fstat nor a read that returns 0 is needed.
pub(super) fn read_small(path: &Path, size: u64) -> std::io::Result<Vec<u8>> {
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

    fn w(s: &str) -> WirePath {
        WirePath::from(s)
    }

    /// Absolute links into the synced tree become the relative path to the
    /// same place under the target root; relative ones stay; ones that
    /// leave the tree are refused.
    #[test]
    fn links_are_kept_rewritten_or_refused() {
        let from = Path::new("/src/proj");
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            // (rule to, link path, link target, sent as)
            ("", "a/l", "../b", Some("../b")),
            ("", "l", "../etc", None),
            ("", "a/l", "/src/proj/b/c", Some("../b/c")),
            ("", "l", "/src/proj/b", Some("b")),
            ("", "a/b/l", "/src/proj/a/x", Some("../x")),
            ("", "a/l", "/src/proj/./a/../z", Some("../z")),
            ("", "a/l", "/src/proj", Some("..")),
            ("", "l", "/src/proj", Some(".")),
            ("app", "app/d/l", "/src/proj/f", Some("../f")),
            ("", "a/l", "/etc/passwd", None),
            ("", "a/l", "/src/project-other/x", None),
            ("", "a/l", "/src/proj/../../..", None),
        ];
        for (to, link, target, want) in cases {
            let got = link_for_target(from, &w(to), &w(link), &w(target));
            assert_eq!(got.as_ref().map(|p| p.to_str().unwrap()), *want, "{link} -> {target} (to {to:?})");
        }
    }

    #[test]
    fn unknown_covers_itself_and_what_is_below() {
        assert!(!Unknown::default().covers(&w("a")));
        let mut u = Unknown(BTreeSet::from([w("a/b")]));
        assert!(u.covers(&w("a/b")));
        assert!(u.covers(&w("a/b/c/d")));
        assert!(!u.covers(&w("a/bc")));
        assert!(!u.covers(&w("a")));
        u.0.insert(w(""));
        assert!(u.covers(&w("anything")), "the whole rule root is unknown");
    }
}
