//! Which source paths are synced: `.gitignore` files (in the synced tree and
//! its parents up to the repository root), `.devloopignore` files, and the
//! rule's `exclude` patterns. `.git` is never synced.
//!
//! Ignored paths are left alone on both sides: not sent, and not deleted
//! from the target when the target has them.

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::Match;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Names of the ignore files read in every directory, lowest precedence
/// first.
pub const IGNORE_FILES: [&str; 2] = [".gitignore", ".devloopignore"];

/// The ignore rules of one sync rule's source tree.
#[derive(Clone)]
pub struct Filter {
    root: PathBuf,
    excludes: Gitignore,
    /// Ignore files by the directory they sit in (absolute paths).
    layers: BTreeMap<PathBuf, Vec<Gitignore>>,
    /// Problems reading ignore files, to report once.
    pub warnings: Vec<String>,
}

impl Filter {
    /// Builds the filter for `root` with the config's exclude patterns, and
    /// reads the ignore files of `root` and of its parents up to the
    /// repository root (the nearest directory holding `.git`).
    pub fn new(root: &Path, excludes: &[String]) -> Filter {
        let mut b = GitignoreBuilder::new(root);
        for pat in excludes {
            // Validated when the config was loaded.
            let _ = b.add_line(None, pat);
        }
        let excludes = b.build().unwrap_or_else(|_| Gitignore::empty());
        let mut f = Filter { root: root.to_path_buf(), excludes, layers: BTreeMap::new(), warnings: Vec::new() };
        let mut dirs = vec![];
        let mut d = Some(root);
        while let Some(dir) = d {
            dirs.push(dir.to_path_buf());
            if dir.join(".git").exists() {
                break;
            }
            d = dir.parent();
        }
        // Without a repository, only the synced tree's own files count.
        if !root.ancestors().any(|a| a.join(".git").exists()) {
            dirs.truncate(1);
        }
        for dir in dirs {
            f.load_dir(&dir);
        }
        f
    }

    /// (Re)reads the ignore files in `dir`. Call when entering a directory
    /// during a walk, and when one of its ignore files changed.
    pub fn load_dir(&mut self, dir: &Path) {
        let mut layer = Vec::new();
        for name in IGNORE_FILES {
            let p = dir.join(name);
            if p.is_file() {
                let (g, err) = Gitignore::new(&p);
                if let Some(e) = err {
                    self.warnings.push(format!("{}: {e}", p.display()));
                }
                layer.push(g);
            }
        }
        if layer.is_empty() {
            self.layers.remove(dir);
        } else {
            self.layers.insert(dir.to_path_buf(), layer);
        }
    }

    /// Like [`Filter::load_dir`], during a walk that has the directory's
    /// listing: ignore files the listing does not show are not looked for.
    pub fn load_listed(&mut self, dir: &Path, has: &dyn Fn(&str) -> bool) {
        if IGNORE_FILES.iter().any(|n| has(n)) {
            self.load_dir(dir);
        } else {
            self.layers.remove(dir);
        }
    }

    /// Takes over the ignore files (and warnings) another copy of this
    /// filter read: a walk shared out over threads gives each its own copy,
    /// with its warnings cleared.
    pub fn absorb(&mut self, other: Filter) {
        self.layers.extend(other.layers);
        self.warnings.extend(other.warnings);
    }

    /// Is an absolute path under the root ignored? Deeper ignore files win
    /// over shallower ones, `.devloopignore` over `.gitignore` in the same
    /// directory, and the config's excludes over everything.
    pub fn is_ignored(&self, abs: &Path, is_dir: bool) -> bool {
        let Ok(rel) = abs.strip_prefix(&self.root) else {
            return true;
        };
        if rel.components().any(|c| c.as_os_str() == ".git") {
            return true;
        }
        if rel.as_os_str().is_empty() {
            return false;
        }
        if matches!(self.excludes.matched_path_or_any_parents(rel, is_dir), Match::Ignore(_)) {
            return true;
        }
        let mut ignored = false;
        for (dir, layer) in &self.layers {
            if !abs.starts_with(dir) || abs == dir {
                continue;
            }
            for g in layer {
                match g.matched_path_or_any_parents(abs, is_dir) {
                    Match::Ignore(_) => ignored = true,
                    Match::Whitelist(_) => ignored = false,
                    Match::None => {}
                }
            }
        }
        ignored
    }

    /// Is this file one of the ignore files (a change means rescanning)?
    pub fn is_ignore_file(abs: &Path) -> bool {
        abs.file_name().and_then(|n| n.to_str()).is_some_and(|n| IGNORE_FILES.contains(&n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join(".git")).unwrap();
        std::fs::create_dir_all(r.join("sub/deep")).unwrap();
        std::fs::write(r.join(".gitignore"), "*.log\nbuild/\n!keep.log\n").unwrap();
        std::fs::write(r.join(".devloopignore"), "secret.txt\n").unwrap();
        std::fs::write(r.join("sub/.gitignore"), "!special.log\nlocal-only\n").unwrap();
        let mut f = Filter::new(r, &["node_modules/".to_string(), "/top-only".to_string()]);
        f.load_dir(&r.join("sub"));
        let cases: &[(&str, bool, bool)] = &[
            ("a.txt", false, false),
            ("a.log", false, true),
            ("keep.log", false, false),
            ("build", true, true),
            ("build/x.o", false, true),
            ("secret.txt", false, true),
            ("sub/special.log", false, false),
            ("sub/other.log", false, true),
            ("sub/local-only", false, true),
            ("local-only", false, false),
            ("node_modules", true, true),
            ("sub/node_modules/x/y.js", false, true),
            ("top-only", false, true),
            ("sub/top-only", false, false),
            (".git/config", false, true),
            ("sub/deep/file", false, false),
        ];
        for (p, is_dir, want) in cases {
            assert_eq!(f.is_ignored(&r.join(p), *is_dir), *want, "{p}");
        }
    }
}
