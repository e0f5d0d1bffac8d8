//! Reading ahead of the archive builder. The builder reads a batch's files
//! one after another; from a cold disk it then waits on each file in turn,
//! and over a network the link idles meanwhile (a compressed tree of small
//! files costs little on the wire, so the reads are the time). A second
//! thread asks the kernel for the next files (`posix_fadvise(WILLNEED)`
//! queues the reads and does not wait for them), staying at most
//! [`AHEAD`] bytes ahead, so the disk works while the builder sends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How far ahead of the builder the kernel is asked to read: enough to
/// keep the disk's queue full, small against the page cache.
const AHEAD: u64 = 64 << 20;

/// The builder's side: it says how far it got; dropping it stops the
/// thread.
pub(super) struct Prefetch {
    passed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Prefetch {
    /// Starts reading ahead through `files` (path and size, in the order
    /// the builder takes them). None when there is nothing worth it or no
    /// thread can be started (reading ahead is only ever a speed-up).
    pub(super) fn start(files: Vec<(PathBuf, u64)>) -> Option<Prefetch> {
        if files.len() < 2 {
            return None;
        }
        let (passed, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (passed.clone(), stop.clone());
        std::thread::Builder::new().name("prefetch".into()).spawn(move || run(files, &p, &s)).ok()?;
        Some(Prefetch { passed, stop })
    }

    /// The builder has read `bytes` more.
    pub(super) fn passed(&self, bytes: u64) {
        self.passed.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(files: Vec<(PathBuf, u64)>, passed: &AtomicU64, stop: &AtomicBool) {
    let mut asked = 0u64;
    for (path, size) in files {
        while asked > passed.load(Ordering::Relaxed) + AHEAD {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        will_need(&path);
        asked += size;
    }
}

#[cfg(target_os = "linux")]
fn will_need(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: an advice on a descriptor this thread holds; a failure
        // only means no read-ahead.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn will_need(_: &std::path::Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread stays within its distance of the builder and stops when
    /// the builder is done, whatever is left.
    #[test]
    fn stays_ahead_by_at_most_its_distance_and_stops_with_the_builder() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        // Each "file" claims 40 MiB: the thread may ask for two (80 MiB >
        // 64 MiB ahead of 0 only after the second), then waits.
        let files = vec![(f.clone(), 40 << 20); 100];
        let (passed, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (passed.clone(), stop.clone());
        let t = std::thread::spawn(move || run(files, &p, &s));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "it waits for the builder");
        stop.store(true, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        while !t.is_finished() {
            assert!(t0.elapsed() < Duration::from_secs(5), "it did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().unwrap();
    }
}
