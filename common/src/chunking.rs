//! Content-defined chunking of artifacts: FastCDC (2020, normalisation level 1)
//! cut points, each chunk named by the BLAKE3 hash of its bytes.
//!
//! Cut points depend only on the bytes near them, so an edit moves the boundaries of
//! the chunks around it and no others: a version that differs from the last by an
//! append or an inserted line shares every other chunk with it.
//!
//! [`Chunker`] reads any `Read` through one window of [`WINDOW_BYTES`] and hands out
//! chunks one at a time, so chunking a file of any size holds at most the window
//! and one chunk in memory.

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use fastcdc::v2020::{cut, MASKS};

use crate::{Error, Result};

/// Smallest chunk, except the last one of a stream.
pub const MIN_CHUNK_BYTES: usize = 64 * 1024;
/// Target average chunk size (see docs/benchmarks.md for how it was chosen).
pub const AVG_CHUNK_BYTES: usize = 256 * 1024;
/// Largest chunk.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest chunk a store accepts, whatever the chunker's settings.
pub const MAX_STORED_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// Codec byte of a chunk kept as is.
const CODEC_RAW: u8 = 0;
/// Codec byte of an LZ4 block.
const CODEC_LZ4: u8 = 1;
/// Bytes before the payload: codec and uncompressed length (u32, little endian).
const HEADER_BYTES: usize = 5;
/// Bytes read ahead of the chunker; a multiple of the largest chunk so that the
/// window is refilled, and its tail moved, once every few chunks.
const WINDOW_BYTES: usize = 8 * MAX_CHUNK_BYTES;
/// FastCDC normalisation level: fewer chunks far from the average.
const NORMALIZATION_BITS: u32 = 1;

/// The name of a chunk: the BLAKE3 hash of its uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Returns the id of `data`.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Reads an id from its 32 bytes on the wire, naming `what` in the error.
    pub fn from_slice(bytes: &[u8], what: &str) -> Result<ChunkId> {
        bytes.try_into().map(ChunkId).map_err(|_| {
            Error::InvalidArgument(format!(
                "{what}: a chunk id has 32 bytes, got {}",
                bytes.len()
            ))
        })
    }

    /// Returns the id in lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..12])
    }
}

impl FromStr for ChunkId {
    type Err = Error;

    fn from_str(text: &str) -> Result<ChunkId> {
        let bytes = hex::decode(text)
            .map_err(|e| Error::InvalidArgument(format!("chunk id '{text}': {e}")))?;
        ChunkId::from_slice(&bytes, "chunk id")
    }
}

/// Encodes a chunk as stores keep it (and as a push may send it): a codec byte,
/// the uncompressed length, then the LZ4 block, or the bytes as they are when LZ4
/// does not make them smaller.
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    let compressed = lz4::block::compress(data, Some(lz4::block::CompressionMode::DEFAULT), false)
        .unwrap_or_default();
    let (codec, payload) = if !compressed.is_empty() && compressed.len() < data.len() {
        (CODEC_LZ4, compressed.as_slice())
    } else {
        (CODEC_RAW, data)
    };
    let mut value = Vec::with_capacity(HEADER_BYTES + payload.len());
    value.push(codec);
    value.extend_from_slice(&(data.len() as u32).to_le_bytes());
    value.extend_from_slice(payload);
    value
}

/// Decodes an encoded chunk and checks it against `id`; the error says what is
/// wrong with it.
pub fn decode_chunk(id: ChunkId, value: &[u8]) -> std::result::Result<Vec<u8>, String> {
    match decoded(id, value)? {
        std::borrow::Cow::Borrowed(raw) => Ok(raw.to_vec()),
        std::borrow::Cow::Owned(data) => Ok(data),
    }
}

/// Checks an encoded chunk against `id` without keeping its bytes: a raw chunk
/// is hashed where it lies (a worker checks every chunk it is sent).
pub fn check_chunk(id: ChunkId, value: &[u8]) -> std::result::Result<(), String> {
    decoded(id, value).map(drop)
}

/// The checked bytes of an encoded chunk, borrowed from `value` when stored raw.
fn decoded(id: ChunkId, value: &[u8]) -> std::result::Result<std::borrow::Cow<'_, [u8]>, String> {
    if value.len() < HEADER_BYTES {
        return Err(format!("an encoded value of {} bytes", value.len()));
    }
    let len = u32::from_le_bytes([value[1], value[2], value[3], value[4]]) as usize;
    if len > MAX_STORED_CHUNK_BYTES {
        return Err(format!("an encoded length of {len}"));
    }
    let payload = &value[HEADER_BYTES..];
    let data = match value[0] {
        CODEC_RAW => std::borrow::Cow::Borrowed(payload),
        CODEC_LZ4 => std::borrow::Cow::Owned(
            lz4::block::decompress(payload, Some(len as i32)).map_err(|e| format!("lz4: {e}"))?,
        ),
        other => return Err(format!("unknown codec {other}")),
    };
    if data.len() != len {
        return Err(format!("{} bytes, {len} expected", data.len()));
    }
    let actual = ChunkId::of(&data);
    if actual != id {
        return Err(format!("its bytes hash to {actual}"));
    }
    Ok(data)
}

/// One chunk of a stream.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub id: ChunkId,
    /// Where the chunk starts in the stream.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Splits a byte stream into content-defined chunks.
pub struct Chunker<R: Read> {
    source: R,
    window: Vec<u8>,
    /// Unchunked bytes are `window[start..end]`.
    start: usize,
    end: usize,
    eof: bool,
    offset: u64,
    masks: (u64, u64),
    /// Sizes; the defaults outside tests.
    min: usize,
    avg: usize,
    max: usize,
}

impl<R: Read> fmt::Debug for Chunker<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunker")
            .field("offset", &self.offset)
            .field("avg", &self.avg)
            .finish()
    }
}

impl<R: Read> Chunker<R> {
    /// Chunks `source` with the default sizes.
    pub fn new(source: R) -> Chunker<R> {
        Chunker::with_sizes(source, MIN_CHUNK_BYTES, AVG_CHUNK_BYTES, MAX_CHUNK_BYTES)
    }

    /// Chunks `source` with the given sizes (FastCDC's bounds apply: min 64 bytes to
    /// 1 MiB, average 256 bytes to 4 MiB, max 1 KiB to 16 MiB; min < avg < max).
    pub fn with_sizes(source: R, min: usize, avg: usize, max: usize) -> Chunker<R> {
        assert!(
            min < avg && avg < max,
            "chunk sizes must grow: {min} {avg} {max}"
        );
        let bits = (avg as f64).log2().round() as u32;
        let masks = (
            MASKS[(bits + NORMALIZATION_BITS) as usize],
            MASKS[(bits - NORMALIZATION_BITS) as usize],
        );
        Chunker {
            source,
            window: vec![0; WINDOW_BYTES.max(2 * max)],
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
            masks,
            min,
            avg,
            max,
        }
    }

    /// Returns the next chunk, or `None` at the end of the stream.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Chunk>> {
        if self.end - self.start < self.max && !self.eof {
            self.refill()?;
        }
        if self.start == self.end {
            return Ok(None);
        }
        let pending = &self.window[self.start..self.end];
        let (_, len) = cut(
            pending,
            self.min,
            self.avg,
            self.max,
            self.masks.0,
            self.masks.1,
            self.masks.0 << 1,
            self.masks.1 << 1,
        );
        let data = pending[..len].to_vec();
        let chunk = Chunk {
            id: ChunkId::of(&data),
            offset: self.offset,
            data,
        };
        self.start += len;
        self.offset += len as u64;
        Ok(Some(chunk))
    }

    /// Moves the unchunked tail to the front of the window and fills the rest.
    fn refill(&mut self) -> std::io::Result<()> {
        self.window.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < self.window.len() {
            match self.source.read(&mut self.window[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen()).collect()
    }

    fn chunks(bytes: &[u8]) -> Vec<Chunk> {
        Chunker::new(bytes)
            .collect::<std::io::Result<Vec<_>>>()
            .expect("chunk")
    }

    #[test]
    fn chunks_cover_the_stream_in_order_within_bounds() {
        let bytes = data(9 * 1024 * 1024 + 17, 1);
        let parts = chunks(&bytes);
        let joined: Vec<u8> = parts.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, bytes);
        let mut offset = 0;
        for (i, c) in parts.iter().enumerate() {
            assert_eq!(c.offset, offset);
            assert_eq!(c.id, ChunkId::of(&c.data));
            assert!(c.data.len() <= MAX_CHUNK_BYTES);
            if i + 1 < parts.len() {
                assert!(c.data.len() >= MIN_CHUNK_BYTES);
            }
            offset += c.data.len() as u64;
        }
        let avg = bytes.len() / parts.len();
        assert!(
            (AVG_CHUNK_BYTES / 2..AVG_CHUNK_BYTES * 2).contains(&avg),
            "average {avg}"
        );
    }

    #[test]
    fn small_and_empty_streams() {
        assert!(chunks(&[]).is_empty());
        let one = chunks(b"x");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].data, b"x");
    }

    #[test]
    fn the_window_does_not_change_cut_points() {
        // One byte at a time through a reader gives the same chunks as a slice.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(buf.len()).min(4093);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let bytes = data(20 * 1024 * 1024, 2);
        let a: Vec<ChunkId> = chunks(&bytes).iter().map(|c| c.id).collect();
        let b: Vec<ChunkId> = Chunker::new(Trickle(&bytes))
            .map(|c| c.expect("chunk").id)
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn an_insert_near_the_start_changes_only_nearby_chunks() {
        let bytes = data(16 * 1024 * 1024, 3);
        let mut edited = bytes.clone();
        edited.splice(1000..1000, b"a new line\n".iter().copied());
        let before: std::collections::HashSet<ChunkId> =
            chunks(&bytes).iter().map(|c| c.id).collect();
        let after = chunks(&edited);
        let new_bytes: usize = after
            .iter()
            .filter(|c| !before.contains(&c.id))
            .map(|c| c.data.len())
            .sum();
        assert!(
            new_bytes <= 2 * MAX_CHUNK_BYTES,
            "{new_bytes} new bytes after an 11-byte insert"
        );
    }

    #[test]
    fn chunks_encode_and_decode() {
        let text = b"id,value\n1,2\n".repeat(1000);
        let random: Vec<u8> = (0..5000).map(|_| rand::random::<u8>()).collect();
        for data in [&text[..], &random[..], b""] {
            let id = ChunkId::of(data);
            let value = encode_chunk(data);
            assert_eq!(decode_chunk(id, &value).expect("decode"), data);
            let mut bad = value.clone();
            let last = bad.len() - 1;
            if !data.is_empty() {
                bad[last] ^= 1;
                assert!(decode_chunk(id, &bad).is_err(), "a flipped byte is caught");
            }
        }
        assert!(
            encode_chunk(&text).len() < text.len() / 4,
            "text compresses"
        );
        assert!(decode_chunk(ChunkId::of(b"x"), &[9, 1, 0, 0, 0, b'x']).is_err());
    }

    #[test]
    fn ids_round_trip_through_hex() {
        let id = ChunkId::of(b"kiln");
        assert_eq!(id.to_hex().parse::<ChunkId>().expect("parse"), id);
        assert!("abc".parse::<ChunkId>().is_err());
        assert!(ChunkId::from_slice(&[0; 31], "test").is_err());
    }
}
