//! Compression of a batch stream's archive (feature `transport`).
//!
//! A stream whose [`StreamHeader::Batch`](crate::protocol::StreamHeader)
//! says `encoding: zstd` carries its tar archive as blocks:
//!
//! ```text
//! header (u32, big-endian): bit 31 set = zstd frame, clear = stored
//!                           bits 0-30 = the payload's length
//! payload                   a zstd frame of at most BLOCK bytes of archive,
//!                           or the archive's bytes as they are
//! ```
//!
//! Each block is compressed on its own, at level 1: source trees shrink
//! 4-5x at about 500 MB/s per core, so it pays on any link slower than
//! that, and a block that does not shrink (media, archives, compressed
//! files) is stored, so incompressible data costs one attempt, not a
//! second decompression. A receiver bounds every block: a payload or an
//! expansion beyond [`BLOCK`] is refused, so a hostile stream costs at
//! most one block of memory.

use std::io::{self, Read, Write};

/// The most archive bytes one block carries.
pub const BLOCK: usize = 128 << 10;
/// The compression level: the fastest of zstd's regular levels.
const LEVEL: i32 = 1;
const COMPRESSED: u32 = 1 << 31;
/// A block is stored when compressing saves less than 1/16 of it.
fn worth_it(raw: usize, packed: usize) -> bool {
    packed < raw - raw / 16
}

/// What a peer names in `Hello.features` when it reads zstd blocks.
pub const FEATURE_ZSTD: &str = "zstd";

/// Writes blocks to `inner`; [`CompressWriter::finish`] writes the last
/// one. Counts what went in and what came out, for reports.
pub struct CompressWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    packer: zstd::bulk::Compressor<'static>,
    packed: Vec<u8>,
    /// Archive bytes in, block bytes (headers included) out.
    pub raw_bytes: u64,
    pub wire_bytes: u64,
}

impl<W: Write> CompressWriter<W> {
    pub fn new(inner: W) -> io::Result<CompressWriter<W>> {
        Ok(CompressWriter {
            inner,
            buf: Vec::with_capacity(BLOCK),
            packer: zstd::bulk::Compressor::new(LEVEL)?,
            packed: Vec::with_capacity(zstd::zstd_safe::compress_bound(BLOCK)),
            raw_bytes: 0,
            wire_bytes: 0,
        })
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.packed.clear();
        let packed = self.packer.compress_to_buffer(&self.buf, &mut self.packed).is_ok()
            && worth_it(self.buf.len(), self.packed.len());
        let (flag, payload) = if packed { (COMPRESSED, &self.packed) } else { (0, &self.buf) };
        self.inner.write_all(&(flag | payload.len() as u32).to_be_bytes())?;
        self.inner.write_all(payload)?;
        self.raw_bytes += self.buf.len() as u64;
        self.wire_bytes += 4 + payload.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered and returns the inner writer.
    pub fn finish(mut self) -> io::Result<(W, u64, u64)> {
        self.flush_block()?;
        Ok((self.inner, self.raw_bytes, self.wire_bytes))
    }
}

impl<W: Write> Write for CompressWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(BLOCK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == BLOCK {
            self.flush_block()?;
        }
        Ok(n)
    }

    /// Blocks are cut at [`BLOCK`]; a flush does not cut one short (the
    /// tar builder's flushes would make small blocks that compress badly).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the archive back out of blocks.
pub struct DecompressReader<R: Read> {
    inner: R,
    unpacker: zstd::bulk::Decompressor<'static>,
    payload: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> DecompressReader<R> {
    pub fn new(inner: R) -> io::Result<DecompressReader<R>> {
        Ok(DecompressReader {
            inner,
            unpacker: zstd::bulk::Decompressor::new()?,
            payload: Vec::new(),
            out: Vec::with_capacity(BLOCK),
            pos: 0,
        })
    }

    /// The next block into `out`; false at the end of the stream.
    fn next_block(&mut self) -> io::Result<bool> {
        let mut head = [0u8; 4];
        // The end of the stream is only allowed between blocks.
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let head = u32::from_be_bytes(head);
        let len = (head & !COMPRESSED) as usize;
        if len > BLOCK || len == 0 {
            return Err(invalid(format!(
                "a compressed block of {len} bytes (the limit is {BLOCK}, and none is empty)"
            )));
        }
        self.pos = 0;
        if head & COMPRESSED == 0 {
            self.out.resize(len, 0);
            self.inner.read_exact(&mut self.out)?;
            return Ok(true);
        }
        self.payload.resize(len, 0);
        self.inner.read_exact(&mut self.payload)?;
        self.out.clear();
        self.unpacker
            .decompress_to_buffer(&self.payload, &mut self.out)
            .map_err(|e| invalid(format!("a compressed block does not decompress to {BLOCK} bytes or less: {e}")))?;
        if self.out.len() > BLOCK || self.out.is_empty() {
            return Err(invalid(format!("a compressed block of {} bytes (the limit is {BLOCK})", self.out.len())));
        }
        Ok(true)
    }

    /// The reader the blocks came from (to drain what is left of it).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for DecompressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if !self.next_block()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(data: &[u8], writes: usize) -> (Vec<u8>, u64, u64) {
        let mut w = CompressWriter::new(Vec::new()).unwrap();
        for piece in data.chunks(writes.max(1)) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    fn unpack(wire: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        DecompressReader::new(wire).unwrap().read_to_end(&mut out)?;
        Ok(out)
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| format!("fn line_{}() {{ return {}; }}\n", i % 977, i % 13)).collect::<String>().into_bytes()
    }

    /// Bytes that do not compress: the index's own hash of a counter.
    fn noise(n: usize) -> Vec<u8> {
        (0..n.div_ceil(8) as u64)
            .flat_map(|i| crate::index::hash_bytes(&i.to_le_bytes()).to_le_bytes())
            .take(n)
            .collect()
    }

    /// Text shrinks; noise is stored and grows only by the block headers;
    /// both come back byte for byte, whatever the write sizes.
    #[test]
    fn text_shrinks_noise_is_stored_and_both_round_trip() {
        let t = text(1_000_000);
        let (wire, raw, sent) = pack(&t, 8 << 10);
        assert_eq!(raw, t.len() as u64);
        assert_eq!(sent, wire.len() as u64);
        assert!(wire.len() * 4 < t.len(), "text should shrink 4x or more: {} -> {}", t.len(), wire.len());
        assert_eq!(unpack(&wire).unwrap(), t);

        let n = noise(1_000_000);
        let (wire, _, _) = pack(&n, 100_003);
        let blocks = n.len().div_ceil(BLOCK);
        assert_eq!(wire.len(), n.len() + 4 * blocks, "noise is stored, plus one header a block");
        assert_eq!(unpack(&wire).unwrap(), n);

        // Mixed, in odd write sizes, and the empty stream.
        let mixed: Vec<u8> = [text(300_000), noise(300_000), text(5)].concat();
        assert_eq!(unpack(&pack(&mixed, 4099).0).unwrap(), mixed);
        assert_eq!(unpack(&pack(b"", 1).0).unwrap(), b"");
    }

    /// A hostile or broken stream is an error, never a panic nor a large
    /// allocation: an oversized block, an empty one, a block that expands
    /// beyond the limit, garbage, and a stream cut mid-block.
    #[test]
    fn hostile_blocks_are_refused() {
        let err = |wire: &[u8]| unpack(wire).expect_err("must be refused");
        let huge = (COMPRESSED | (BLOCK as u32 + 1)).to_be_bytes();
        assert_eq!(err(&huge).kind(), io::ErrorKind::InvalidData);
        assert_eq!(err(&0u32.to_be_bytes()).kind(), io::ErrorKind::InvalidData);
        // A zstd frame of 1 MiB of zeros: small on the wire, too big unpacked.
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        let mut wire = (COMPRESSED | bomb.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&bomb);
        assert_eq!(err(&wire).kind(), io::ErrorKind::InvalidData);
        let mut wire = (COMPRESSED | 100).to_be_bytes().to_vec();
        wire.extend_from_slice(&[0x55; 100]);
        assert_eq!(err(&wire).kind(), io::ErrorKind::InvalidData);
        let (good, _, _) = pack(&text(200_000), 1 << 20);
        assert_eq!(err(&good[..good.len() - 1]).kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(err(&good[..2]).kind(), io::ErrorKind::UnexpectedEof);
    }
}
