//! Building the tar archive a batch carries: small files from memory,
//! large ones streamed from disk and hashed as they pass, so the model
//! records exactly what was sent.

use super::plan::Outgoing;
use super::prefetch::Prefetch;
use devloop_agent::index;
use devloop_agent::protocol::{Entry, EntryKind};
use std::io::Write;

/// Writes a tar archive of `writes` and returns the entries as sent (hash
/// of the bytes actually sent) and a warning for each streamed file whose
/// read failed part-way. Files that vanished are left out.
pub(super) fn build_archive<W: Write>(out: W, writes: Vec<Outgoing>) -> (Vec<Entry>, Vec<String>) {
    let mut b = tar::Builder::new(out);
    let mut sent = Vec::with_capacity(writes.len());
    let mut read_errors = Vec::new();
    let mtime = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Files read only now (an edit's content is already in memory).
    let to_read = writes.iter().filter(|w| w.kind == EntryKind::File && w.content.is_none());
    let prefetch = Prefetch::start(to_read.map(|w| (w.abs.clone(), w.size)).collect());
    for w in writes {
        if let (Some(p), EntryKind::File, None) = (&prefetch, w.kind, &w.content) {
            p.passed(w.size);
        }
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
                let r = b.append_data(&mut h, w.wire.as_path(), &mut src);
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
                let r = b.append_data(&mut h, w.wire.as_path(), data.as_slice());
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
                let r = b.append_data(&mut h, w.wire.as_path(), std::io::empty());
                sent.push(Entry { path: w.wire, kind: EntryKind::Dir, size: 0, mode: w.mode, hash: 0, link: None });
                r
            }
            EntryKind::Symlink => {
                let target = w.link.clone().unwrap_or_default();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                let r = b.append_link(&mut h, w.wire.as_path(), target.as_path());
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
pub(super) const STREAM_FILE_MIN: u64 = 1 << 20;

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
