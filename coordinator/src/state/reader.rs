//! [`StateReader`]: read-only access to the applied state from API tasks, while the
//! Raft node alone writes. RocksDB batches are atomic, so a reader sees whole
//! batches only.

use std::sync::Arc;

use kiln_proto::v1::{MemberRecord, WorkerRecord};
use prost::Message;
use rocksdb::{IteratorMode, DB};

use super::keys;
use crate::raft::storage::{StoreError, CF_STATE};

/// A key and its value.
pub type Pair = (Vec<u8>, Vec<u8>);

/// A cloneable reader of the state column family.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<DB>,
}

impl StateReader {
    /// Creates a reader over the coordinator's database.
    pub fn new(db: Arc<DB>) -> StateReader {
        StateReader { db }
    }

    /// Reads one state key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let cf = self
            .db
            .cf_handle(CF_STATE)
            .expect("state column family exists");
        self.db.get_cf(&cf, key).map_err(|e| StoreError {
            op: "read state",
            message: e.to_string(),
        })
    }

    /// Returns up to `limit` pairs whose key starts with `prefix`, in key order.
    pub fn scan(&self, prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        self.scan_from(prefix, prefix, limit)
    }

    /// Returns up to `limit` pairs from key `from` on whose key starts with `prefix`.
    fn scan_from(&self, from: &[u8], prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        let cf = self
            .db
            .cf_handle(CF_STATE)
            .expect("state column family exists");
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(&cf, IteratorMode::From(from, rocksdb::Direction::Forward))
        {
            let (k, v) = item.map_err(|e| StoreError {
                op: "scan state",
                message: e.to_string(),
            })?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Returns up to `limit` pairs whose key starts with `prefix` and comes after
    /// `after` (from the start when `None`), in key order: a walk page by page.
    pub fn scan_after(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Pair>, StoreError> {
        let Some(after) = after else {
            return self.scan(prefix, limit);
        };
        // The smallest key greater than `after`.
        let mut start = after.to_vec();
        start.push(0);
        self.scan_from(&start, prefix, limit)
    }

    /// Returns every registered worker.
    pub fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        self.decode_all(keys::WORKER, "decode worker record")
    }

    /// Reads and decodes one record.
    fn get_decoded<M: Message + Default>(
        &self,
        key: &[u8],
        op: &'static str,
    ) -> Result<Option<M>, StoreError> {
        super::artifacts::read_record(self, key, op)
    }

    /// Returns the record of the token called `name`.
    pub fn token(&self, name: &str) -> Result<Option<kiln_proto::v1::TokenRecord>, StoreError> {
        self.get_decoded(&keys::token(name), "decode token record")
    }

    /// Returns the record of worker `id`.
    pub fn worker(&self, id: &str) -> Result<Option<WorkerRecord>, StoreError> {
        self.get_decoded(&keys::worker(id), "decode worker record")
    }

    /// Returns the version of the token records: it grows with every change.
    pub fn tokens_version(&self) -> Result<u64, StoreError> {
        super::machine::read_counter(self, keys::TOKENS_VERSION)
    }

    /// Returns the cluster's id (0 on a data dir made before ids, or not caught up).
    pub fn cluster_id(&self) -> Result<u64, StoreError> {
        super::machine::read_counter(self, keys::CLUSTER_ID)
    }

    /// Returns every token record.
    pub fn tokens(&self) -> Result<Vec<kiln_proto::v1::TokenRecord>, StoreError> {
        self.decode_all(keys::TOKEN, "decode token record")
    }

    /// Returns every coordinator member record.
    pub fn members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        self.decode_all(keys::MEMBER, "decode member record")
    }

    fn decode_all<M: Message + Default>(
        &self,
        prefix: &str,
        op: &'static str,
    ) -> Result<Vec<M>, StoreError> {
        self.scan(prefix.as_bytes(), usize::MAX)?
            .into_iter()
            .map(|(_, v)| {
                M::decode(v.as_slice()).map_err(|e| StoreError {
                    op,
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

impl super::machine::StateRead for StateReader {
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(key)
    }

    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<Pair>, StoreError> {
        self.scan(prefix, limit)
    }
}
