//! The model of what one target holds: path → kind, size, mode, hash.
//!
//! A watcher of a large tree keeps one entry per file for as long as it
//! runs, and a service with several replicas keeps one model per pod, so
//! the model is built for size:
//! - an entry is only what a comparison needs ([`Known`]: 40 bytes beside
//!   its path), not a protocol [`Entry`] with its path a second time;
//! - a model is a shared, immutable *base* and this target's *delta* (what
//!   changed since). [`Model::settle`] folds the delta into a new base and
//!   looks for an equal base on the [`Shelf`] of the service: pods that hold
//!   the same tree (the usual case once each is in sync) share one base, so
//!   three replicas cost about one model, not three. Pods that diverge keep
//!   their own.
//! - a base is built in one go from sorted entries, which fills the
//!   B-tree's nodes; a map built by inserting in order leaves them about
//!   half empty.

use devloop_agent::paths::WirePath;
use devloop_agent::protocol::{Entry, EntryKind};
use std::cmp::Ordering;
use std::collections::{btree_map, BTreeMap};
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::{Arc, Mutex, Weak};

/// What the model knows of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub size: u64,
    pub hash: u64,
    /// Symlink target, as stored in the link.
    pub link: Option<Box<[u8]>>,
    pub mode: u32,
    pub kind: EntryKind,
}

impl Known {
    pub fn from_entry(e: Entry) -> (WirePath, Known) {
        let link = e.link.map(|l| l.into_bytes().into_boxed_slice());
        (e.path, Known { size: e.size, hash: e.hash, link, mode: e.mode, kind: e.kind })
    }

    /// Does the source's entry differ from what the target holds?
    pub fn differs(&self, s: &Entry) -> bool {
        self.kind != s.kind
            || match s.kind {
                EntryKind::File => self.size != s.size || self.hash != s.hash || self.mode != s.mode,
                EntryKind::Symlink => self.link.as_deref() != s.link.as_ref().map(WirePath::as_bytes),
                EntryKind::Dir => false,
            }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }
}

type Map = BTreeMap<WirePath, Known>;

/// What a service's sessions share: the bases of their models, held
/// weakly (a base lives as long as a model uses it), and the turn to run a
/// first sync.
#[derive(Clone)]
pub struct Shelf {
    bases: Arc<Mutex<Vec<Weak<Map>>>>,
    turn: Arc<tokio::sync::Semaphore>,
}

impl Default for Shelf {
    fn default() -> Shelf {
        Shelf { bases: Arc::default(), turn: Arc::new(tokio::sync::Semaphore::new(1)) }
    }
}

impl Shelf {
    /// Waits for this session's turn to run a first sync. One at a time:
    /// each scans and hashes the whole source and holds its plan, so
    /// three replicas syncing at once held three times the memory (212 MiB
    /// at the peak for 100k files) and shared one disk and one link, and
    /// the first pod was in sync only when the last one was.
    pub async fn first_sync_turn(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.turn.clone().acquire_owned().await.expect("the semaphore is never closed")
    }

    /// The turn at once, if no other target's first sync is running.
    pub fn first_sync_turn_now(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.turn.clone().try_acquire_owned().ok()
    }

    /// An equal base already on the shelf, or `base` itself, now shelved.
    fn share(&self, base: Arc<Map>) -> Arc<Map> {
        // A poisoned lock only means another session panicked while it
        // looked: the list of weak pointers is still sound.
        let mut bases = self.bases.lock().unwrap_or_else(|p| p.into_inner());
        bases.retain(|w| w.strong_count() > 0);
        // Already shelved (a settle with nothing new): no comparison.
        if bases.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&base))) {
            return base;
        }
        if let Some(b) = bases.iter().filter_map(Weak::upgrade).find(|b| **b == *base) {
            return b;
        }
        bases.push(Arc::downgrade(&base));
        base
    }
}

/// The model of one target.
pub struct Model {
    base: Arc<Map>,
    /// What changed since `base`: `Some` holds this now, `None` is gone.
    delta: BTreeMap<WirePath, Option<Known>>,
    shelf: Shelf,
}

impl Model {
    pub fn new(shelf: Shelf) -> Model {
        Model { base: Arc::default(), delta: BTreeMap::new(), shelf }
    }

    /// Starts over from what the target reported.
    pub fn reset(&mut self, entries: impl IntoIterator<Item = (WirePath, Known)>) {
        self.delta.clear();
        self.base = Arc::new(entries.into_iter().collect());
    }

    pub fn get(&self, p: &WirePath) -> Option<&Known> {
        match self.delta.get(p) {
            Some(d) => d.as_ref(),
            None => self.base.get(p),
        }
    }

    pub fn contains_key(&self, p: &WirePath) -> bool {
        self.get(p).is_some()
    }

    pub fn insert(&mut self, e: Entry) {
        let (p, k) = Known::from_entry(e);
        if self.base.get(&p) == Some(&k) {
            self.delta.remove(&p);
        } else {
            self.delta.insert(p, Some(k));
        }
    }

    pub fn remove(&mut self, p: &WirePath) {
        if self.base.contains_key(p) {
            self.delta.insert(p.clone(), None);
        } else {
            self.delta.remove(p);
        }
    }

    /// Every path, in order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            base: self.base.range::<WirePath, _>(..).peekable(),
            delta: self.delta.range::<WirePath, _>(..).peekable(),
        }
    }

    /// The paths from `start` on, in order.
    pub fn range_from(&self, start: &WirePath) -> Iter<'_> {
        let r = (Bound::Included(start), Bound::Unbounded);
        Iter {
            base: self.base.range::<WirePath, _>(r).peekable(),
            delta: self.delta.range::<WirePath, _>(r).peekable(),
        }
    }

    /// Whether the delta has grown enough to be worth folding in (a pass
    /// over the whole model).
    pub fn unsettled(&self) -> bool {
        self.delta.len() > (self.base.len() / 8).max(4096)
    }

    /// Folds the delta into a new base, and shares it with any other
    /// target's equal base.
    pub fn settle(&mut self) {
        if !self.delta.is_empty() {
            let merged: Map = self.iter().map(|(p, k)| (p.clone(), k.clone())).collect();
            self.delta.clear();
            self.base = Arc::new(merged);
        }
        self.base = self.shelf.share(self.base.clone());
    }

    pub fn shelf(&self) -> &Shelf {
        &self.shelf
    }

    #[cfg(test)]
    fn shares_base_with(&self, other: &Model) -> bool {
        Arc::ptr_eq(&self.base, &other.base)
    }
}

/// The base and the delta, merged: the delta wins, and its `None`s hide
/// the base's paths.
pub struct Iter<'a> {
    base: Peekable<btree_map::Range<'a, WirePath, Known>>,
    delta: Peekable<btree_map::Range<'a, WirePath, Option<Known>>>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a WirePath, &'a Known);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.base.peek(), self.delta.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((b, _)), Some((d, _))) => b.cmp(d),
            };
            match order {
                Ordering::Less => return self.base.next(),
                Ordering::Equal | Ordering::Greater => {
                    if order == Ordering::Equal {
                        self.base.next();
                    }
                    if let Some((p, Some(k))) = self.delta.next() {
                        return Some((p, k));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, hash: u64) -> Entry {
        Entry { path: WirePath::from(p), kind: EntryKind::File, size: 1, mode: 0o644, hash, link: None }
    }

    fn paths(m: &Model) -> Vec<(String, u64)> {
        m.iter().map(|(p, k)| (p.lossy().into_owned(), k.hash)).collect()
    }

    #[test]
    fn the_delta_overrides_and_hides_the_base_in_order() {
        let mut m = Model::new(Shelf::default());
        m.reset(["a", "b/x", "c"].iter().map(|p| Known::from_entry(file(p, 1))));
        m.insert(file("b/x", 2));
        m.insert(file("ab", 3));
        m.remove(&WirePath::from("c"));
        m.insert(file("d", 4));
        assert_eq!(paths(&m), [("a".into(), 1), ("ab".into(), 3), ("b/x".into(), 2), ("d".into(), 4)]);
        let from_b: Vec<String> = m.range_from(&WirePath::from("b")).map(|(p, _)| p.lossy().into_owned()).collect();
        assert_eq!(from_b, ["b/x", "d"]);
        assert!(m.get(&WirePath::from("c")).is_none());
        assert_eq!(m.get(&WirePath::from("b/x")).map(|k| k.hash), Some(2));
        // Put back as the base has it: nothing left in the delta.
        m.insert(file("b/x", 1));
        m.remove(&WirePath::from("ab"));
        m.remove(&WirePath::from("d"));
        m.insert(file("c", 1));
        assert!(m.delta.is_empty());
        let before = paths(&m);
        m.settle();
        assert_eq!(paths(&m), before);
    }

    #[tokio::test(start_paused = true)]
    async fn first_syncs_of_a_service_take_turns() {
        let shelf = Shelf::default();
        let first = shelf.first_sync_turn().await;
        assert!(shelf.first_sync_turn_now().is_none(), "a turn at once while another first sync runs");
        let other = shelf.clone();
        let mut second = tokio::spawn(async move { other.first_sync_turn().await });
        let waited = tokio::time::timeout(std::time::Duration::from_secs(60), &mut second).await;
        assert!(waited.is_err(), "the second first sync started while the first ran");
        drop(first);
        let got = tokio::time::timeout(std::time::Duration::from_secs(1), second).await;
        assert!(matches!(got, Ok(Ok(_))), "the second first sync got its turn once the first ended");
    }

    #[test]
    fn targets_that_hold_the_same_tree_share_one_base_until_they_diverge() {
        let shelf = Shelf::default();
        let tree = || (0..100).map(|i| Known::from_entry(file(&format!("f{i:03}"), i)));
        let (mut a, mut b) = (Model::new(shelf.clone()), Model::new(shelf.clone()));
        // Reached by different routes: one reported it, one was sent it.
        a.reset(tree());
        b.reset(std::iter::empty());
        for i in 0..100 {
            b.insert(file(&format!("f{i:03}"), i));
        }
        a.settle();
        b.settle();
        assert!(a.shares_base_with(&b));
        // One pod diverges: its change is its own.
        b.insert(file("f000", 99));
        assert_eq!(a.get(&WirePath::from("f000")).map(|k| k.hash), Some(0));
        b.settle();
        assert!(!a.shares_base_with(&b));
        // And converges again.
        a.insert(file("f000", 99));
        a.settle();
        assert!(a.shares_base_with(&b));
    }
}
