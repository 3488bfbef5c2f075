//! Durable Raft storage: the log, the hard state, the conf state and the state
//! machine's key space, behind one trait with two implementations.
//!
//! ```text
//!            RaftNode (only writer)
//!                 │ persist / apply / install_snapshot / compact
//!        ┌────────▼─────────┐
//!        │  trait RaftStore │──── raft::Storage (read side, used by RawNode)
//!        └───┬──────────┬───┘
//!   RocksStore          MemStore
//!   column families:    the same records in maps behind a shared
//!   raft_log, raft_meta, "disk", so a test can drop the store and
//!   state               reopen it as after a crash
//! ```
//!
//! Invariants both keep: every call that returns `Ok` is durable; entries and hard
//! state written by one [`RaftStore::persist`] land together; the applied position
//! and the conf state are written in the same batch as the effects they cover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost_raft::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use kiln_proto::v1::AppliedState;

/// Column family of the Raft log: big-endian index → `eraftpb.Entry`.
pub const CF_LOG: &str = "raft_log";
/// Column family of Raft metadata: hard state, conf state, truncation point.
pub const CF_META: &str = "raft_meta";
/// Column family of the replicated state machine.
pub const CF_STATE: &str = "state";

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_TRUNCATED: &[u8] = b"truncated";
/// Key of the applied position inside the state column family.
pub const KEY_APPLIED: &[u8] = b"\x00applied";

/// A storage failure, with the operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {message}")]
pub struct StoreError {
    pub op: &'static str,
    pub message: String,
}

fn store_err(op: &'static str) -> impl Fn(String) -> StoreError {
    move |message| StoreError { op, message }
}

/// One applied batch: state-machine effects plus the position they bring it to.
#[derive(Debug, Default, Clone)]
pub struct ApplyBatch {
    /// Writes in order; `None` deletes the key.
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub applied: AppliedState,
    /// Set when a membership change was applied in this batch.
    pub conf_state: Option<ConfState>,
}

/// The write side of Raft storage plus the state machine's key space.
pub trait RaftStore: Storage + Send {
    /// Appends entries (dropping any conflicting tail) and optionally the hard state,
    /// as one durable write.
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError>;

    /// Appends entries alone, durably.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.persist(entries, None)
    }

    /// Writes the hard state alone, durably.
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StoreError> {
        self.persist(&[], Some(hs))
    }

    /// Raises the commit index in the hard state (a lower one changes nothing).
    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError>;

    /// Writes a batch of applied effects with its applied position.
    fn apply(&mut self, batch: &ApplyBatch) -> Result<(), StoreError>;

    /// Returns the applied position.
    fn applied(&self) -> AppliedState;

    /// Reads one state-machine key.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Replaces the whole state with a snapshot's contents and resets the log to
    /// start after it. `hard_state` (the Ready's, when the snapshot comes with one)
    /// is written in the same batch, so that no crash leaves the new state under an
    /// old term or vote; without it the stored one is kept, raised to the
    /// snapshot's term with no vote if that term is newer.
    fn install_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        hard_state: Option<&HardState>,
        pairs: &mut dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>>,
    ) -> Result<(), StoreError>;

    /// Drops log entries up to and including `index` (which must be applied).
    fn compact(&mut self, index: u64) -> Result<(), StoreError>;

    /// Returns the index and term just before the first entry of the log.
    fn truncated(&self) -> (u64, u64);
}

/// The hard state a snapshot install writes: the Ready's when given, else the
/// stored one raised to the snapshot's term (with no vote: a vote belongs to its
/// term). The commit index is the snapshot's: the log ends there until the
/// Ready's entries are persisted, and a stored commit index past the log's end
/// would stop the next start.
fn snapshot_hard_state(
    stored: &HardState,
    ready: Option<&HardState>,
    meta: &SnapshotMetadata,
) -> HardState {
    let mut hs = match ready {
        Some(hs) => hs.clone(),
        None if meta.term > stored.term => HardState {
            term: meta.term,
            vote: 0,
            commit: stored.commit,
        },
        None => stored.clone(),
    };
    hs.commit = meta.index;
    hs
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("column families are created at open")
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode<M: prost_raft::Message + Default>(
    op: &'static str,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError {
        op,
        message: format!("corrupt record: {e}"),
    })
}

fn raft_store_error(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// Drops entries past `max_size` bytes, keeping at least one, as raft-rs expects.
fn limit_size(entries: &mut Vec<Entry>, max_size: Option<u64>) {
    let Some(max) = max_size else { return };
    let mut size = 0u64;
    let keep = entries
        .iter()
        .take_while(|e| {
            size += e.encoded_len() as u64;
            size <= max
        })
        .count();
    entries.truncate(keep.max(1));
}

// ---------------------------------------------------------------------------
// RocksDB
// ---------------------------------------------------------------------------

/// Raft storage on RocksDB: one database, three column families, synced batches.
pub struct RocksStore {
    db: Arc<DB>,
    dir: PathBuf,
    hard_state: HardState,
    conf_state: ConfState,
    truncated: (u64, u64),
    last_index: u64,
    applied: AppliedState,
    /// The newest checkpoint made for sending snapshots: its metadata.
    checkpoint: std::cell::RefCell<Option<SnapshotMetadata>>,
}

impl RocksStore {
    /// Returns true when a store was made in `dir` (it may still be empty).
    pub fn exists(dir: &Path) -> bool {
        dir.join("db").join("CURRENT").exists()
    }

    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> Result<RocksStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError {
            op: "create raft data dir",
            message: format!("{}: {e}", dir.display()),
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let cfs = [CF_LOG, CF_META, CF_STATE]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db_path = dir.join("db");
        let db = DB::open_cf_descriptors(&opts, &db_path, cfs).map_err(|e| StoreError {
            op: "open raft rocksdb",
            message: format!("{}: {e}", db_path.display()),
        })?;
        let mut store = RocksStore {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            truncated: (0, 0),
            last_index: 0,
            applied: AppliedState::default(),
            checkpoint: std::cell::RefCell::new(None),
        };
        store.load()?;
        store.remove_partial_snapshots();
        Ok(store)
    }

    fn load(&mut self) -> Result<(), StoreError> {
        let meta = cf(&self.db, CF_META);
        let read = |key: &[u8]| {
            self.db
                .get_cf(meta, key)
                .map_err(|e| e.to_string())
                .map_err(store_err("read raft metadata"))
        };
        if let Some(bytes) = read(KEY_HARD_STATE)? {
            self.hard_state = decode("decode hard state", &bytes)?;
        }
        if let Some(bytes) = read(KEY_CONF_STATE)? {
            self.conf_state = decode("decode conf state", &bytes)?;
        }
        if let Some(bytes) = read(KEY_TRUNCATED)? {
            let m: SnapshotMetadata = decode("decode truncation point", &bytes)?;
            self.truncated = (m.index, m.term);
        }
        let state = cf(&self.db, CF_STATE);
        if let Some(bytes) = self
            .db
            .get_cf(state, KEY_APPLIED)
            .map_err(|e| e.to_string())
            .map_err(store_err("read applied index"))?
        {
            self.applied = kiln_proto_decode(&bytes)?;
        }
        // An applied entry was committed. The commit index is written without a
        // sync, so a crash can keep an apply batch and lose the commit index
        // written with it; raft-rs refuses to start with applied > committed.
        if self.applied.index > self.hard_state.commit {
            self.hard_state.commit = self.applied.index;
        }
        let log = cf(&self.db, CF_LOG);
        let mut iter = self.db.raw_iterator_cf(&log);
        iter.seek_to_last();
        self.last_index = match iter.key() {
            Some(key) => u64::from_be_bytes(key.try_into().map_err(|_| StoreError {
                op: "read raft log",
                message: "log key is not 8 bytes".into(),
            })?),
            None => self.truncated.0,
        };
        Ok(())
    }

    /// Removes snapshot files a crash or a rejected transfer left behind: received
    /// spools (`incoming-*`) and unfinished checkpoints (`tmp-*`).
    fn remove_partial_snapshots(&self) {
        let Ok(entries) = std::fs::read_dir(self.checkpoint_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("incoming-") || name.starts_with("tmp-") {
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if let Err(e) = removed {
                    tracing::warn!(path = %path.display(), error = %e, "remove partial snapshot");
                }
            }
        }
    }

    /// Returns true when nothing was ever written: no log, no hard state, no members.
    pub fn is_fresh(&self) -> bool {
        self.hard_state == HardState::default()
            && self.conf_state.voters.is_empty()
            && self.conf_state.learners.is_empty()
            && self.last_index == 0
            && self.truncated == (0, 0)
    }

    /// Returns the directory the store lives in.
    pub fn dir_path(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Returns the database, shared with readers of the state machine.
    pub fn db(&self) -> Arc<DB> {
        self.db.clone()
    }

    /// Returns the directory that holds checkpoints made for snapshots.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// Returns the path of the checkpoint for a snapshot at `index`/`term`.
    pub fn checkpoint_path(dir: &Path, index: u64, term: u64) -> PathBuf {
        dir.join(format!("snap-{term:020}-{index:020}"))
    }

    fn write(&self, batch: WriteBatch, sync: bool, op: &'static str) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(|e| StoreError {
            op,
            message: e.to_string(),
        })
    }

    fn entry_term(&self, index: u64) -> Result<Option<u64>, StoreError> {
        let log = cf(&self.db, CF_LOG);
        match self
            .db
            .get_cf(log, index_key(index))
            .map_err(|e| e.to_string())
            .map_err(store_err("read raft log"))?
        {
            Some(bytes) => Ok(Some(decode::<Entry>("decode log entry", &bytes)?.term)),
            None => Ok(None),
        }
    }

    /// Makes a checkpoint of the whole database at the applied position, for
    /// streaming to a follower, and keeps only the newest two.
    fn make_checkpoint(&self) -> Result<SnapshotMetadata, StoreError> {
        let dir = self.checkpoint_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .map_err(store_err("create snapshot dir"))?;
        let mut meta = SnapshotMetadata {
            index: self.applied.index,
            term: self.applied.term,
            ..Default::default()
        };
        meta.set_conf_state(self.conf_state.clone());
        let path = Self::checkpoint_path(&dir, meta.index, meta.term);
        if !path.exists() {
            let tmp = dir.join(format!("tmp-{}", meta.index));
            let _ = std::fs::remove_dir_all(&tmp);
            rocksdb::checkpoint::Checkpoint::new(&self.db)
                .and_then(|c| c.create_checkpoint(&tmp))
                .map_err(|e| e.to_string())
                .map_err(store_err("create snapshot checkpoint"))?;
            std::fs::rename(&tmp, &path)
                .map_err(|e| e.to_string())
                .map_err(store_err("publish snapshot checkpoint"))?;
        }
        // Keep the two newest: one may still be streaming to a follower.
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())
            .map_err(store_err("list snapshot dir"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("snap-"))
            })
            .collect();
        names.sort();
        let excess = names.len().saturating_sub(2);
        for old in names.into_iter().take(excess) {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(meta)
    }

    /// Makes a checkpoint now (after compaction the leader serves it to followers).
    pub fn checkpoint_now(&self) -> Result<SnapshotMetadata, StoreError> {
        let meta = self.make_checkpoint()?;
        *self.checkpoint.borrow_mut() = Some(meta.clone());
        Ok(meta)
    }
}

fn kiln_proto_decode(bytes: &[u8]) -> Result<AppliedState, StoreError> {
    prost::Message::decode(bytes).map_err(|e| StoreError {
        op: "decode applied index",
        message: e.to_string(),
    })
}

impl Storage for RocksStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        let log = cf(&self.db, CF_LOG);
        let mut iter = self.db.raw_iterator_cf(&log);
        iter.seek(index_key(low));
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        let mut expected = low;
        while expected < high && iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            if key != index_key(expected) {
                return Err(raft::Error::Store(StorageError::Unavailable));
            }
            let entry: Entry = decode("decode log entry", value).map_err(raft_store_error)?;
            size += entry.encoded_len() as u64;
            if max_size.is_some_and(|max| size > max) && !out.is_empty() {
                break;
            }
            out.push(entry);
            expected += 1;
            iter.next();
        }
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if idx < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.entry_term(idx).map_err(raft_store_error)? {
            Some(term) => Ok(term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let current = self.checkpoint.borrow().clone();
        let usable = current.filter(|m| m.index >= request_index && m.index >= self.truncated.0);
        let meta = match usable {
            Some(meta) => meta,
            None => {
                if self.applied.index < request_index.max(self.truncated.0) {
                    return Err(raft::Error::Store(
                        StorageError::SnapshotTemporarilyUnavailable,
                    ));
                }
                let meta = self.make_checkpoint().map_err(raft_store_error)?;
                *self.checkpoint.borrow_mut() = Some(meta.clone());
                meta
            }
        };
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        Ok(snap)
    }
}

impl RaftStore for RocksStore {
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        let mut new_last = self.last_index;
        if let Some(first) = entries.first() {
            if first.index <= self.truncated.0 {
                return Err(StoreError {
                    op: "append raft log",
                    message: format!(
                        "entry {} is at or before the truncation point {}",
                        first.index, self.truncated.0
                    ),
                });
            }
            if first.index > self.last_index + 1 {
                return Err(StoreError {
                    op: "append raft log",
                    message: format!(
                        "gap in log: last index {}, appending {}",
                        self.last_index, first.index
                    ),
                });
            }
            for e in entries {
                batch.put_cf(log, index_key(e.index), e.encode_to_vec());
            }
            let last = entries[entries.len() - 1].index;
            // A conflicting leader overwrote our tail: drop what lies beyond.
            if last < self.last_index {
                batch.delete_range_cf(log, index_key(last + 1), index_key(self.last_index + 1));
            }
            new_last = last;
        }
        if let Some(hs) = hard_state {
            let meta = cf(&self.db, CF_META);
            batch.put_cf(meta, KEY_HARD_STATE, hs.encode_to_vec());
        }
        self.write(batch, true, "persist raft log")?;
        self.last_index = new_last;
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        // No sync: a lost commit index is learned again from the leader, and the
        // WAL orders this write before any apply batch that depends on it.
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        let mut batch = WriteBatch::default();
        let meta = cf(&self.db, CF_META);
        batch.put_cf(meta, KEY_HARD_STATE, hs.encode_to_vec());
        self.write(batch, false, "persist commit index")?;
        self.hard_state = hs;
        Ok(())
    }

    fn apply(&mut self, batch: &ApplyBatch) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        let state = cf(&self.db, CF_STATE);
        for (key, value) in &batch.writes {
            match value {
                Some(v) => wb.put_cf(state, key, v),
                None => wb.delete_cf(state, key),
            }
        }
        wb.put_cf(
            &state,
            KEY_APPLIED,
            prost::Message::encode_to_vec(&batch.applied),
        );
        if let Some(cs) = &batch.conf_state {
            let meta = cf(&self.db, CF_META);
            wb.put_cf(meta, KEY_CONF_STATE, cs.encode_to_vec());
        }
        // No sync: the entries are durable in the log, and the applied position moves
        // with the effects, so a crash re-applies exactly what was lost.
        self.write(wb, false, "apply committed entries")?;
        self.applied = batch.applied;
        if let Some(cs) = &batch.conf_state {
            self.conf_state = cs.clone();
        }
        Ok(())
    }

    fn applied(&self) -> AppliedState {
        self.applied
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let state = cf(&self.db, CF_STATE);
        self.db
            .get_cf(state, key)
            .map_err(|e| e.to_string())
            .map_err(store_err("read state"))
    }

    fn install_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        hard_state: Option<&HardState>,
        pairs: &mut dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>>,
    ) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        let state = cf(&self.db, CF_STATE);
        let log = cf(&self.db, CF_LOG);
        let meta_cf = cf(&self.db, CF_META);
        wb.delete_range_cf(state, &[][..], &[0xffu8; 8][..]);
        wb.delete_range_cf(log, index_key(0), index_key(u64::MAX));
        for pair in pairs {
            let (k, v) = pair?;
            if k.as_slice() != KEY_APPLIED {
                wb.put_cf(state, k, v);
            }
        }
        let applied = AppliedState {
            index: meta.index,
            term: meta.term,
        };
        wb.put_cf(state, KEY_APPLIED, prost::Message::encode_to_vec(&applied));
        let hs = snapshot_hard_state(&self.hard_state, hard_state, meta);
        wb.put_cf(meta_cf, KEY_HARD_STATE, hs.encode_to_vec());
        wb.put_cf(
            &meta_cf,
            KEY_CONF_STATE,
            meta.get_conf_state().encode_to_vec(),
        );
        let truncated = SnapshotMetadata {
            index: meta.index,
            term: meta.term,
            ..Default::default()
        };
        wb.put_cf(meta_cf, KEY_TRUNCATED, truncated.encode_to_vec());
        self.write(wb, true, "install snapshot")?;
        self.hard_state = hs;
        self.conf_state = meta.get_conf_state().clone();
        self.truncated = (meta.index, meta.term);
        self.last_index = meta.index;
        self.applied = applied;
        *self.checkpoint.borrow_mut() = None;
        Ok(())
    }

    fn compact(&mut self, index: u64) -> Result<(), StoreError> {
        if index <= self.truncated.0 {
            return Ok(());
        }
        if index > self.applied.index || index > self.last_index {
            return Err(StoreError {
                op: "compact raft log",
                message: format!(
                    "index {index} is beyond the applied index {}",
                    self.applied.index
                ),
            });
        }
        let term = self.entry_term(index)?.ok_or_else(|| StoreError {
            op: "compact raft log",
            message: format!("entry {index} is missing"),
        })?;
        let mut wb = WriteBatch::default();
        let log = cf(&self.db, CF_LOG);
        let meta_cf = cf(&self.db, CF_META);
        wb.delete_range_cf(log, index_key(0), index_key(index + 1));
        let truncated = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        wb.put_cf(meta_cf, KEY_TRUNCATED, truncated.encode_to_vec());
        self.write(wb, true, "compact raft log")?;
        self.truncated = (index, term);
        Ok(())
    }

    fn truncated(&self) -> (u64, u64) {
        self.truncated
    }
}

// ---------------------------------------------------------------------------
// In memory
// ---------------------------------------------------------------------------

/// What an in-memory store keeps "on disk": survives dropping the store.
#[derive(Debug, Default, Clone)]
pub struct MemDisk {
    log: BTreeMap<u64, Entry>,
    hard_state: HardState,
    conf_state: ConfState,
    truncated: (u64, u64),
    state: BTreeMap<Vec<u8>, Vec<u8>>,
    applied: AppliedState,
}

/// Raft storage in memory, for simulation and as the reference the RocksDB store
/// is held to. Each call is "durable" the moment it returns, as after a sync.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    disk: Arc<Mutex<MemDisk>>,
}

impl MemStore {
    /// Creates an empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Opens a store over the "disk" of an earlier one, as a restart after a crash.
    pub fn reopen(&self) -> MemStore {
        MemStore {
            disk: self.disk.clone(),
        }
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, MemDisk> {
        self.disk.lock().expect("mem store lock poisoned")
    }
}

impl Storage for MemStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let d = self.disk();
        Ok(RaftState::new(d.hard_state.clone(), d.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let d = self.disk();
        if low <= d.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let last = d.log.keys().next_back().copied().unwrap_or(d.truncated.0);
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out: Vec<Entry> = d.log.range(low..high).map(|(_, e)| e.clone()).collect();
        limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let d = self.disk();
        if idx == d.truncated.0 {
            return Ok(d.truncated.1);
        }
        if idx < d.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        d.log
            .get(&idx)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.disk().truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        let d = self.disk();
        Ok(d.log.keys().next_back().copied().unwrap_or(d.truncated.0))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let d = self.disk();
        if d.applied.index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = d.applied.index;
        snap.mut_metadata().term = d.applied.term;
        snap.mut_metadata().set_conf_state(d.conf_state.clone());
        Ok(snap)
    }
}

impl RaftStore for MemStore {
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError> {
        let mut d = self.disk();
        if let Some(first) = entries.first() {
            let last = d.log.keys().next_back().copied().unwrap_or(d.truncated.0);
            if first.index <= d.truncated.0 || first.index > last + 1 {
                return Err(StoreError {
                    op: "append raft log",
                    message: format!(
                        "entry {} does not follow the log (truncated {}, last {last})",
                        first.index, d.truncated.0
                    ),
                });
            }
            let _ = d.log.split_off(&first.index);
            for e in entries {
                d.log.insert(e.index, e.clone());
            }
        }
        if let Some(hs) = hard_state {
            d.hard_state = hs.clone();
        }
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        let mut d = self.disk();
        d.hard_state.commit = d.hard_state.commit.max(commit);
        Ok(())
    }

    fn apply(&mut self, batch: &ApplyBatch) -> Result<(), StoreError> {
        let mut d = self.disk();
        for (k, v) in &batch.writes {
            match v {
                Some(v) => d.state.insert(k.clone(), v.clone()),
                None => d.state.remove(k),
            };
        }
        d.applied = batch.applied;
        if let Some(cs) = &batch.conf_state {
            d.conf_state = cs.clone();
        }
        Ok(())
    }

    fn applied(&self) -> AppliedState {
        self.disk().applied
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.disk().state.get(key).cloned())
    }

    fn install_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        hard_state: Option<&HardState>,
        pairs: &mut dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>>,
    ) -> Result<(), StoreError> {
        let mut state = BTreeMap::new();
        for pair in pairs {
            let (k, v) = pair?;
            if k.as_slice() != KEY_APPLIED {
                state.insert(k, v);
            }
        }
        let mut d = self.disk();
        d.state = state;
        d.log.clear();
        d.truncated = (meta.index, meta.term);
        d.applied = AppliedState {
            index: meta.index,
            term: meta.term,
        };
        d.conf_state = meta.get_conf_state().clone();
        d.hard_state = snapshot_hard_state(&d.hard_state, hard_state, meta);
        Ok(())
    }

    fn compact(&mut self, index: u64) -> Result<(), StoreError> {
        let mut d = self.disk();
        if index <= d.truncated.0 {
            return Ok(());
        }
        if index > d.applied.index {
            return Err(StoreError {
                op: "compact raft log",
                message: format!(
                    "index {index} is beyond the applied index {}",
                    d.applied.index
                ),
            });
        }
        let term = d
            .log
            .get(&index)
            .map(|e| e.term)
            .ok_or_else(|| StoreError {
                op: "compact raft log",
                message: format!("entry {index} is missing"),
            })?;
        let rest = d.log.split_off(&(index + 1));
        d.log = rest;
        d.truncated = (index, term);
        Ok(())
    }

    fn truncated(&self) -> (u64, u64) {
        self.disk().truncated
    }
}
