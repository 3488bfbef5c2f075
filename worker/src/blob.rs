//! The worker's blob store: artifact chunks in RocksDB, keyed by their BLAKE3 id.
//!
//! A stored value is one header byte (the codec: raw or LZ4 block), the
//! uncompressed length (u32, little endian) and the payload. A chunk is compressed
//! only when that makes it smaller. Every write is verified against its id first
//! (a sender is not trusted to name its bytes right) and is on disk, synced, before
//! it is acknowledged: batches skip the write-ahead log and are flushed before the
//! answer (once per stream of batches), so chunk bytes are written once; every read is verified again, so a chunk that
//! rotted on disk is reported as corrupt, never returned.
//!
//! Values are kept in RocksDB's blob files (key-value separation): chunks are
//! 64 KiB to 1 MiB, and compaction then moves keys, not chunk bytes. Blob garbage
//! collection is off in ordinary compactions: on, it relocates every live blob of
//! the oldest files whenever a compaction touches their keys, garbage or not, and
//! since chunk ids are random every compaction touches them all; during a 1 GiB
//! upload that rewrote about twice the upload. Deleting chunks instead schedules
//! a [`BlobStore::reclaim`] once deletions have been quiet for [`RECLAIM_QUIET`]:
//! one compaction with collection on, which rewrites the live chunks of files
//! that hold garbage and drops the files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_common::chunking::{check_chunk, decode_chunk, encode_chunk, ChunkId};
use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};

/// Column family of each chunk's last write time (ms, little endian).
const CF_WRITTEN: &str = "written";
pub use kiln_common::chunking::MAX_STORED_CHUNK_BYTES;
/// How long deletions must pause before their space is reclaimed: a garbage
/// collection deletes in pages, and one reclaim follows the last page.
pub const RECLAIM_QUIET: Duration = Duration::from_secs(5);

/// Why a blob store call failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The bytes do not hash to the id they came with, or a stored chunk no longer
    /// does.
    #[error("chunk {id} is corrupt: {reason}")]
    Corrupt { id: ChunkId, reason: String },
    /// A chunk larger than the store accepts.
    #[error("chunk {id} has {len} bytes; at most {MAX_STORED_CHUNK_BYTES} are accepted")]
    TooLarge { id: ChunkId, len: usize },
    /// RocksDB failed.
    #[error("blob store {op}: {message}")]
    Storage { op: &'static str, message: String },
}

impl From<BlobError> for kiln_common::Error {
    fn from(e: BlobError) -> kiln_common::Error {
        match e {
            BlobError::Corrupt { .. } => kiln_common::Error::DataLoss(e.to_string()),
            BlobError::TooLarge { .. } => kiln_common::Error::InvalidArgument(e.to_string()),
            BlobError::Storage { .. } => kiln_common::Error::Internal(e.to_string()),
        }
    }
}

fn storage(op: &'static str) -> impl FnOnce(rocksdb::Error) -> BlobError {
    move |e| BlobError::Storage {
        op,
        message: e.to_string(),
    }
}

/// Counts of what a store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobStats {
    pub chunks: u64,
    /// Bytes of the stored values (compressed), headers included.
    pub stored_bytes: u64,
}

/// A chunk store over one RocksDB database; cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    db: Arc<DB>,
    path: PathBuf,
    reclaim: Arc<Mutex<Reclaim>>,
}

/// Deletions waiting for their space to be reclaimed; one lock, so that a
/// deletion and the reclaiming thread's exit cannot miss each other.
#[derive(Default)]
struct Reclaim {
    /// When chunks were last deleted, while their space is not reclaimed yet.
    pending_since: Option<Instant>,
    /// A thread is waiting to reclaim (at most one).
    scheduled: bool,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Decodes a stored (or sent) value and checks it against `id`.
fn decode(id: ChunkId, value: &[u8]) -> Result<Vec<u8>, BlobError> {
    decode_chunk(id, value).map_err(|reason| BlobError::Corrupt { id, reason })
}

impl BlobStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<BlobStore, BlobError> {
        std::fs::create_dir_all(dir).map_err(|e| BlobError::Storage {
            op: "create dir",
            message: format!("{}: {e}", dir.display()),
        })?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Chunks arrive compressed by us; RocksDB must not spend time on them again.
        options.set_compression_type(rocksdb::DBCompressionType::None);
        options.set_enable_blob_files(true);
        options.set_min_blob_size(4096);
        options.set_blob_compression_type(rocksdb::DBCompressionType::None);
        // Collected only by `reclaim`, after deletions (see the module's comment).
        options.set_enable_blob_gc(false);
        // Bounded memory: two 32 MiB memtables at most.
        options.set_write_buffer_size(32 * 1024 * 1024);
        options.set_max_write_buffer_number(2);
        options.set_paranoid_checks(true);
        // Writes skip the WAL, so the two column families are flushed as one.
        options.set_atomic_flush(true);
        let mut written = Options::default();
        written.set_compression_type(rocksdb::DBCompressionType::None);
        let cfs = || {
            vec![
                rocksdb::ColumnFamilyDescriptor::new(
                    rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
                    options.clone(),
                ),
                rocksdb::ColumnFamilyDescriptor::new(CF_WRITTEN, written.clone()),
            ]
        };
        // Flushes write blob files with direct I/O where the file system has it:
        // the bytes go to the disk from RocksDB's buffer instead of being copied
        // into the page cache first (a tenth of the CPU of an upload), and the
        // chunk bytes written do not crowd out the cache that serves reads.
        let mut direct = options.clone();
        direct.set_use_direct_io_for_flush_and_compaction(true);
        let db = match DB::open_cf_descriptors(&direct, dir, cfs()) {
            Ok(db) => db,
            Err(e) if e.to_string().to_lowercase().contains("direct") => {
                tracing::info!(store = %dir.display(), "the file system has no direct I/O; chunks are written through the page cache");
                DB::open_cf_descriptors(&options, dir, cfs()).map_err(storage("open"))?
            }
            Err(e) => return Err(storage("open")(e)),
        };
        Ok(BlobStore {
            db: Arc::new(db),
            path: dir.to_path_buf(),
            reclaim: Arc::default(),
        })
    }

    /// Returns the directory of the store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Verifies and stores chunks in one batch and syncs it; returns how many were
    /// new. Nothing is written when any chunk fails its check.
    pub fn put_many(&self, chunks: &[(ChunkId, &[u8])]) -> Result<usize, BlobError> {
        let new = self.write_many(chunks)?;
        self.sync()?;
        Ok(new)
    }

    /// Verifies and writes chunks in one batch, not yet durable: [`BlobStore::sync`]
    /// makes every write before it durable. Returns how many were new. Every chunk
    /// of the batch, new or not, is marked as written now, so that a garbage
    /// collection that started earlier spares it.
    pub fn write_many(&self, chunks: &[(ChunkId, &[u8])]) -> Result<usize, BlobError> {
        let mut values = Vec::with_capacity(chunks.len());
        for (id, data) in chunks {
            if data.len() > MAX_STORED_CHUNK_BYTES {
                return Err(BlobError::TooLarge {
                    id: *id,
                    len: data.len(),
                });
            }
            let actual = ChunkId::of(data);
            if actual != *id {
                return Err(BlobError::Corrupt {
                    id: *id,
                    reason: format!("the bytes sent hash to {actual}"),
                });
            }
            // A chunk held already is only marked as written again.
            let value = (!self.contains(id)?).then(|| encode_chunk(data));
            values.push((*id, value));
        }
        let values: Vec<(ChunkId, Option<&[u8]>)> =
            values.iter().map(|(id, v)| (*id, v.as_deref())).collect();
        self.commit(&values)
    }

    /// Writes chunks that arrive in the stored encoding (compressed by the sender):
    /// each new one is checked against its id, then kept as sent. Not yet durable,
    /// like [`BlobStore::write_many`].
    pub fn write_encoded(&self, chunks: &[(ChunkId, &[u8])]) -> Result<usize, BlobError> {
        let mut values = Vec::with_capacity(chunks.len());
        for &(id, value) in chunks {
            if self.contains(&id)? {
                values.push((id, None));
                continue;
            }
            check_chunk(id, value).map_err(|reason| BlobError::Corrupt { id, reason })?;
            values.push((id, Some(value)));
        }
        self.commit(&values)
    }

    /// Writes checked values (`None`: held already, only its write time moves) in
    /// one batch without the WAL; returns how many were new.
    fn commit(&self, values: &[(ChunkId, Option<&[u8]>)]) -> Result<usize, BlobError> {
        if values.is_empty() {
            return Ok(0);
        }
        let written = self.written_cf();
        let now = kiln_common::clock::now_ms().to_le_bytes();
        // Sized up front: a batch grown entry by entry copies its bytes again on
        // each doubling. Per chunk: two 32-byte keys, the 8-byte write time, the
        // value, and a few bytes of record header (tag, family, lengths) each.
        const RECORD_OVERHEAD: usize = 16;
        let bytes: usize = values
            .iter()
            .map(|(_, v)| 2 * (32 + RECORD_OVERHEAD) + 8 + v.map_or(0, <[u8]>::len))
            .sum();
        let mut batch = WriteBatch::with_capacity_bytes(bytes);
        let mut new = 0;
        for (id, value) in values {
            batch.put_cf(written, id.0, now);
            if let Some(value) = value {
                batch.put(id.0, value);
                new += 1;
            }
        }
        // Chunk bytes skip the write-ahead log: the flush in `sync` writes them
        // once, into synced blob files, instead of twice (log, then blob file).
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        self.db
            .write_opt(batch, &options)
            .map_err(storage("write"))?;
        Ok(new)
    }

    /// Makes every write so far durable: flushes both column families together
    /// (atomic flush), which syncs their files.
    pub fn sync(&self) -> Result<(), BlobError> {
        let chunks = self
            .db
            .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .expect("the default column family exists");
        self.db
            .flush_cfs_opt(
                &[&chunks, &self.written_cf()],
                &rocksdb::FlushOptions::default(),
            )
            .map_err(storage("flush"))
    }

    fn written_cf(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(CF_WRITTEN)
            .expect("the written column family exists")
    }

    /// Returns when the chunk was last written (pushed or copied), in ms.
    pub fn written_at(&self, id: &ChunkId) -> Result<Option<u64>, BlobError> {
        let value = self
            .db
            .get_pinned_cf(self.written_cf(), id.0)
            .map_err(storage("read"))?;
        Ok(value.and_then(|v| v.as_ref().try_into().ok().map(u64::from_le_bytes)))
    }

    /// Removes the chunks last written before `before_ms`; returns how many went.
    /// A chunk written since (pushed again after its record was collected) stays.
    pub fn delete_older(&self, ids: &[ChunkId], before_ms: u64) -> Result<usize, BlobError> {
        let written = self.written_cf();
        let mut batch = WriteBatch::default();
        let mut deleted = 0;
        for id in ids {
            if self.written_at(id)?.unwrap_or(0) >= before_ms || !self.contains(id)? {
                continue;
            }
            batch.delete(id.0);
            batch.delete_cf(written, id.0);
            deleted += 1;
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(storage("delete"))?;
        if deleted > 0 {
            self.schedule_reclaim();
        }
        Ok(deleted)
    }

    /// Reclaims the space of deleted chunks once deletions have paused for
    /// [`RECLAIM_QUIET`], on a thread of its own; one at a time.
    fn schedule_reclaim(&self) {
        {
            let mut reclaim = self.reclaim.lock().unwrap_or_else(PoisonError::into_inner);
            reclaim.pending_since = Some(Instant::now());
            if std::mem::replace(&mut reclaim.scheduled, true) {
                return;
            }
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("blob-reclaim".into())
            .spawn(move || store.reclaim_when_quiet());
        if let Err(e) = spawned {
            self.reclaim
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .scheduled = false;
            tracing::warn!(error = %e, "cannot start the thread that reclaims deleted chunks' space");
        }
    }

    /// The reclaiming thread: waits until deletions have been quiet for
    /// [`RECLAIM_QUIET`], reclaims, and ends once no deletion is pending.
    fn reclaim_when_quiet(&self) {
        loop {
            let wait = {
                let mut reclaim = self.reclaim.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(last) = reclaim.pending_since else {
                    reclaim.scheduled = false;
                    return;
                };
                let wait = (last + RECLAIM_QUIET).saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    reclaim.pending_since = None;
                }
                wait
            };
            if !wait.is_zero() {
                std::thread::sleep(wait);
            } else if let Err(e) = self.reclaim() {
                tracing::warn!(
                    store = %self.path.display(),
                    error = %e,
                    "reclaiming deleted chunks' space failed; the next deletion tries again"
                );
            }
        }
    }

    /// Rewrites the live chunks of blob files that hold deleted ones and drops those
    /// files: one compaction of the whole key range with blob garbage collection
    /// on (every blob file eligible), then collection off again.
    pub fn reclaim(&self) -> Result<(), BlobError> {
        self.db
            .set_options(&[
                ("enable_blob_garbage_collection", "true"),
                ("blob_garbage_collection_age_cutoff", "1.0"),
            ])
            .map_err(storage("enable blob collection"))?;
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        self.db
            .set_options(&[("enable_blob_garbage_collection", "false")])
            .map_err(storage("disable blob collection"))
    }

    /// Verifies and stores one chunk; returns true when it was new.
    pub fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool, BlobError> {
        Ok(self.put_many(&[(id, data)])? == 1)
    }

    /// Returns the chunk's bytes, verified; `None` when it is not stored.
    pub fn get(&self, id: ChunkId) -> Result<Option<Vec<u8>>, BlobError> {
        match self.db.get_pinned(id.0) {
            Ok(Some(value)) => decode(id, &value).map(Some),
            Ok(None) => Ok(None),
            // RocksDB's own checksums caught the rot first.
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => Err(BlobError::Corrupt {
                id,
                reason: e.to_string(),
            }),
            Err(e) => Err(storage("read")(e)),
        }
    }

    /// Returns true when the chunk is stored (without reading or verifying it).
    pub fn contains(&self, id: &ChunkId) -> Result<bool, BlobError> {
        // The small `written` entry stands for the chunk: it is written and removed
        // in the same batches, and reading it never touches the chunk's bytes, which
        // may be the rotten ones.
        Ok(self.written_at(id)?.is_some())
    }

    /// Removes a chunk (absent is fine).
    pub fn delete(&self, id: ChunkId) -> Result<(), BlobError> {
        let mut batch = WriteBatch::default();
        batch.delete(id.0);
        batch.delete_cf(self.written_cf(), id.0);
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(storage("delete"))?;
        self.schedule_reclaim();
        Ok(())
    }

    /// Returns up to `limit` stored ids greater than `after`, in order: a scrubber or
    /// an inventory walks the store page by page.
    pub fn ids_after(
        &self,
        after: Option<ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkId>, BlobError> {
        let mode = match &after {
            Some(id) => IteratorMode::From(&id.0, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        // Walks the `written` entries: listing ids must not read chunk bytes.
        for item in self.db.iterator_cf(self.written_cf(), mode) {
            let (key, _) = item.map_err(storage("scan"))?;
            let id = ChunkId::from_slice(&key, "stored key").map_err(|e| BlobError::Storage {
                op: "scan",
                message: e.to_string(),
            })?;
            if Some(id) == after {
                continue;
            }
            out.push(id);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Counts the stored chunks and their stored bytes (a full scan).
    pub fn stats(&self) -> Result<BlobStats, BlobError> {
        let mut stats = BlobStats::default();
        for item in self.db.iterator(IteratorMode::Start) {
            let (_, value) = item.map_err(storage("scan"))?;
            stats.chunks += 1;
            stats.stored_bytes += value.len() as u64;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(&dir.path().join("blobs")).expect("open");
        (dir, store)
    }

    #[test]
    fn round_trips_compressible_and_random_chunks() {
        let (_dir, store) = store();
        let text = b"id,value\n1,2\n".repeat(10_000);
        let random: Vec<u8> = (0..300_000).map(|_| rand::random::<u8>()).collect();
        for data in [&text[..], &random[..], b"", b"x"] {
            let id = ChunkId::of(data);
            assert!(store.put(id, data).expect("put"), "new");
            assert!(!store.put(id, data).expect("put again"), "stored once");
            assert_eq!(store.get(id).expect("get").as_deref(), Some(data));
        }
        let stats = store.stats().expect("stats");
        assert_eq!(stats.chunks, 4);
        // The CSV-like chunk compressed well; the random one is stored as is.
        assert!(
            stats.stored_bytes < (random.len() + text.len() / 4) as u64,
            "{stats:?}"
        );
        assert_eq!(store.get(ChunkId::of(b"absent")).expect("get"), None);
    }

    #[test]
    fn a_chunk_that_does_not_match_its_id_is_refused() {
        let (_dir, store) = store();
        let good = ChunkId::of(b"good");
        let e = store.put_many(&[(good, b"good"), (ChunkId::of(b"x"), b"y")]);
        assert!(matches!(e, Err(BlobError::Corrupt { .. })), "{e:?}");
        assert!(
            !store.contains(&good).expect("contains"),
            "nothing of the batch is kept"
        );
    }

    #[test]
    fn rot_on_disk_is_reported_not_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blobs");
        let data: Vec<u8> = (0..200_000).map(|_| rand::random::<u8>()).collect();
        let id = ChunkId::of(&data);
        {
            let store = BlobStore::open(&path).expect("open");
            store.put(id, &data).expect("put");
            store.db.flush().expect("flush");
        }
        // Flip one byte of the chunk wherever RocksDB put it.
        let needle = &data[1000..1064];
        let mut flipped = false;
        for entry in std::fs::read_dir(&path).expect("read dir").flatten() {
            let mut bytes = std::fs::read(entry.path()).expect("read");
            if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                bytes[at + 10] ^= 0xff;
                std::fs::write(entry.path(), bytes).expect("write");
                flipped = true;
            }
        }
        assert!(flipped, "the chunk's bytes were found on disk");
        let store = BlobStore::open(&path).expect("reopen");
        let e = store.get(id);
        assert!(matches!(e, Err(BlobError::Corrupt { .. })), "{e:?}");
        store.delete(id).expect("delete");
        assert!(
            store.put(id, &data).expect("repair"),
            "a deleted chunk is new again"
        );
        assert_eq!(store.get(id).expect("get").as_deref(), Some(&data[..]));
    }

    /// Bytes of the store's blob files.
    fn blob_file_bytes(store: &BlobStore) -> u64 {
        std::fs::read_dir(store.path())
            .expect("read dir")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "blob"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum()
    }

    #[test]
    fn the_space_of_deleted_chunks_is_reclaimed_and_the_rest_stays_readable() {
        let (_dir, store) = store();
        let chunks: Vec<Vec<u8>> = (0..32)
            .map(|_| (0..256 * 1024).map(|_| rand::random::<u8>()).collect())
            .collect();
        let batch: Vec<(ChunkId, &[u8])> = chunks
            .iter()
            .map(|c| (ChunkId::of(c), c.as_slice()))
            .collect();
        // One batch, one flush: the live and the deleted chunks share blob files,
        // so dropping whole dead files is not enough.
        assert_eq!(store.put_many(&batch).expect("put"), 32);
        let full = blob_file_bytes(&store);
        assert!(full >= 32 * 256 * 1024, "{full} bytes in blob files");
        let doomed: Vec<ChunkId> = batch[8..].iter().map(|(id, _)| *id).collect();
        assert_eq!(store.delete_older(&doomed, u64::MAX).expect("delete"), 24);
        store.reclaim().expect("reclaim");
        // Well before the scheduled reclaim would run.
        let wait_for = |bytes: u64, within: Duration| {
            let deadline = Instant::now() + within;
            while blob_file_bytes(&store) > bytes && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            blob_file_bytes(&store)
        };
        let left = wait_for(full / 3, RECLAIM_QUIET / 2);
        assert!(
            left <= full / 3,
            "{left} of {full} bytes left in blob files after 24 of 32 chunks were deleted"
        );
        for (id, data) in &batch[..8] {
            assert_eq!(store.get(*id).expect("get").as_deref(), Some(*data));
        }
        for id in &doomed {
            assert_eq!(store.get(*id).expect("get"), None);
        }
        // Without a call: deleting schedules one once deletions pause.
        let more: Vec<ChunkId> = batch[4..8].iter().map(|(id, _)| *id).collect();
        assert_eq!(store.delete_older(&more, u64::MAX).expect("delete"), 4);
        let left = wait_for(full / 6, RECLAIM_QUIET * 4);
        assert!(
            left <= full / 6,
            "{left} of {full} bytes left after 28 of 32 chunks were deleted"
        );
        for (id, data) in &batch[..4] {
            assert_eq!(store.get(*id).expect("get").as_deref(), Some(*data));
        }
    }

    #[test]
    fn only_chunks_written_before_a_time_are_deleted() {
        let (_dir, store) = store();
        let old = ChunkId::of(b"old");
        store.put(old, b"old").expect("put");
        let cut = kiln_common::clock::now_ms() + 1;
        std::thread::sleep(std::time::Duration::from_millis(5));
        let fresh = ChunkId::of(b"fresh");
        store.put(fresh, b"fresh").expect("put");
        assert_eq!(store.delete_older(&[old, fresh], cut).expect("delete"), 1);
        assert!(!store.contains(&old).expect("contains"));
        assert!(store.contains(&fresh).expect("contains"));
        // Pushing a chunk again refreshes its time: a collection that began before
        // the push spares it.
        let cut = kiln_common::clock::now_ms() + 1;
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(!store.put(fresh, b"fresh").expect("again"), "not new");
        assert_eq!(store.delete_older(&[fresh], cut).expect("delete"), 0);
    }

    #[test]
    fn ids_are_listed_page_by_page() {
        let (_dir, store) = store();
        let mut ids: Vec<ChunkId> = (0..25u32)
            .map(|i| {
                let data = i.to_le_bytes();
                let id = ChunkId::of(&data);
                store.put(id, &data).expect("put");
                id
            })
            .collect();
        ids.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.ids_after(after, 10).expect("page");
            if page.is_empty() {
                break;
            }
            after = page.last().copied();
            seen.extend(page);
        }
        assert_eq!(seen, ids);
    }
}
