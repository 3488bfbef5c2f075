//! The `kiln.v1.Blobs` gRPC service on the worker's port: clients and other workers
//! store and read chunks here.
//!
//! Callers are cluster nodes (by certificate) or token holders checked against the
//! worker's [`TokenBook`]: storing needs a role that may change data, reading one
//! that may read. Chunks of a stream are verified and written in synced batches of
//! at most [`MAX_BATCH_BYTES`], so a long stream holds one batch in memory, and
//! the answer comes only after the last batch is on disk.

use std::sync::Arc;

use futures_util::StreamExt as _;
use kiln_common::auth::{grpc_authorization, Permission, TokenBook};
use kiln_common::chunking::ChunkId;
use kiln_common::client::ClusterClient;
use kiln_common::clock::now_ms;
use kiln_common::Error;
use kiln_proto::v1::blobs_server::Blobs;
use kiln_proto::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::blob::BlobStore;
use crate::metrics::Metrics;

/// Bytes of chunks written in one synced batch (held three times while it is
/// written: received, encoded, in the memtable).
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Most ids one HasChunks call may ask about.
pub const MAX_HAS_IDS: usize = 65_536;

/// The chunk service of one worker.
#[derive(Debug, Clone)]
pub struct BlobService {
    pub store: BlobStore,
    /// Token records to check callers against; `None` without TLS.
    pub tokens: Option<Arc<TokenBook>>,
    pub metrics: Arc<Metrics>,
    /// Bounds the PutChunks streams writing at once (each holds up to one batch).
    pub writers: Arc<tokio::sync::Semaphore>,
    /// Reaches other workers (as a node) to copy chunks from them.
    pub peers: Arc<ClusterClient>,
}

/// Most chunks one ReplicateChunks or DeleteChunks call may name.
pub const MAX_COPIES: usize = 1024;
/// Chunks fetched at once while copying.
const COPIES_IN_FLIGHT: usize = 4;

/// PutChunks streams that write at once; more wait their turn.
pub const MAX_WRITERS: usize = 4;

impl BlobService {
    /// Checks the caller may do `need`; the future holds the request's header,
    /// not the request (a stream is not `Sync`).
    fn authorize<T>(
        &self,
        request: &Request<T>,
        need: Permission,
    ) -> impl std::future::Future<Output = kiln_common::Result<()>> + '_ {
        let tokens = self
            .tokens
            .as_ref()
            .filter(|_| !kiln_common::tls::is_node(request));
        let header = grpc_authorization(request).map(str::to_owned);
        async move {
            match tokens {
                Some(tokens) => tokens
                    .verify_fresh(header.as_deref(), need, now_ms)
                    .await
                    .map(drop),
                None => Ok(()),
            }
        }
    }

    /// Refuses a caller that is not a cluster node (with TLS).
    fn require_node<T>(&self, request: &Request<T>) -> kiln_common::Result<()> {
        kiln_common::tls::require_node(request, self.tokens.is_some())
    }

    /// Fetches one chunk from the first source that returns good bytes.
    async fn copy_one(&self, source: &ChunkSource) -> Result<(ChunkId, Vec<u8>), String> {
        let id = ChunkId::from_slice(&source.id, "replicate").map_err(|e| e.to_string())?;
        let data = self
            .peers
            .fetch_chunk(id, &source.replicas)
            .await
            .map_err(|e| e.to_string())?;
        Ok((id, data))
    }

    /// Writes one batch on a blocking thread, not yet durable; returns how many
    /// chunks were new.
    async fn write(&self, batch: Vec<(ChunkId, bytes::Bytes, bool)>) -> Result<usize, Status> {
        let store = self.store.clone();
        let bytes: usize = batch.iter().map(|(_, d, _)| d.len()).sum();
        let new = tokio::task::spawn_blocking(move || {
            let pick = |encoded: bool| -> Vec<(ChunkId, &[u8])> {
                batch
                    .iter()
                    .filter(|(_, _, e)| *e == encoded)
                    .map(|(id, d, _)| (*id, &d[..]))
                    .collect()
            };
            Ok::<_, crate::blob::BlobError>(
                store.write_many(&pick(false))? + store.write_encoded(&pick(true))?,
            )
        })
        .await
        .map_err(|e| Status::internal(format!("chunk write task: {e}")))?
        .map_err(|e| Status::from(Error::from(e)))?;
        self.metrics.chunks_written(new as u64, bytes as u64);
        Ok(new)
    }

    /// Makes every write so far durable, on a blocking thread.
    async fn sync(&self) -> Result<(), Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .map_err(|e| Status::internal(format!("chunk sync task: {e}")))?
            .map_err(|e| Status::from(Error::from(e)))
    }
}

#[tonic::async_trait]
impl Blobs for BlobService {
    async fn put_chunks(
        &self,
        request: Request<Streaming<PutChunksRequest>>,
    ) -> Result<Response<PutChunksResponse>, Status> {
        self.authorize(&request, Permission::Write).await?;
        let _permit = self
            .writers
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the worker is stopping"))?;
        let mut stream = request.into_inner();
        let mut batch = Vec::new();
        let mut batch_bytes = 0usize;
        let mut received = 0u32;
        let mut stored_new = 0u32;
        while let Some(message) = stream.next().await {
            let message = message?;
            let id = ChunkId::from_slice(&message.id, "put_chunks").map_err(Status::from)?;
            received += 1;
            batch_bytes += message.data.len();
            batch.push((id, message.data, message.encoded));
            if batch_bytes >= MAX_BATCH_BYTES {
                stored_new += self.write(std::mem::take(&mut batch)).await? as u32;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            stored_new += self.write(batch).await? as u32;
        }
        // One flush for the whole stream; the answer means every chunk is on disk.
        if received > 0 {
            self.sync().await?;
        }
        Ok(Response::new(PutChunksResponse {
            received,
            stored_new,
        }))
    }

    async fn get_chunk(
        &self,
        request: Request<GetChunkRequest>,
    ) -> Result<Response<GetChunkResponse>, Status> {
        self.authorize(&request, Permission::Read).await?;
        let id = ChunkId::from_slice(&request.get_ref().id, "get_chunk").map_err(Status::from)?;
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || store.get(id))
            .await
            .map_err(|e| Status::internal(format!("chunk read task: {e}")))?;
        match read {
            Ok(Some(data)) => {
                self.metrics.chunks_read(data.len() as u64);
                Ok(Response::new(GetChunkResponse { data }))
            }
            Ok(None) => Err(Error::NotFound(format!("chunk {id} is not stored here")).into()),
            Err(e) => {
                tracing::error!(chunk = %id, error = %e, "a stored chunk failed its check");
                self.metrics.chunk_corrupt();
                Err(Error::from(e).into())
            }
        }
    }

    async fn has_chunks(
        &self,
        request: Request<HasChunksRequest>,
    ) -> Result<Response<HasChunksResponse>, Status> {
        self.authorize(&request, Permission::Read).await?;
        let ids = request.into_inner().ids;
        if ids.len() > MAX_HAS_IDS {
            return Err(Status::invalid_argument(format!(
                "{} ids in one call; at most {MAX_HAS_IDS}",
                ids.len()
            )));
        }
        let ids: Vec<ChunkId> = ids
            .iter()
            .map(|id| ChunkId::from_slice(id, "has_chunks"))
            .collect::<kiln_common::Result<_>>()?;
        let store = self.store.clone();
        let present = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| store.contains(id))
                .collect::<Result<Vec<bool>, _>>()
        })
        .await
        .map_err(|e| Status::internal(format!("chunk lookup task: {e}")))?
        .map_err(|e| Status::from(Error::from(e)))?;
        Ok(Response::new(HasChunksResponse { present }))
    }

    async fn replicate_chunks(
        &self,
        request: Request<ReplicateChunksRequest>,
    ) -> Result<Response<ReplicateChunksResponse>, Status> {
        self.require_node(&request)?;
        let copies = request.into_inner().copies;
        if copies.len() > MAX_COPIES {
            return Err(Status::invalid_argument(format!(
                "{} copies in one call; at most {MAX_COPIES}",
                copies.len()
            )));
        }
        let mut fetched = futures_util::stream::iter(copies.into_iter().map(|copy| {
            let service = self.clone();
            async move { service.copy_one(&copy).await }
        }))
        .buffer_unordered(COPIES_IN_FLIGHT);
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut stored = Vec::new();
        let mut failures = Vec::new();
        while let Some(result) = futures_util::StreamExt::next(&mut fetched).await {
            match result {
                Ok((id, data)) => {
                    batch_bytes += data.len();
                    stored.push(id.0.to_vec());
                    batch.push((id, data.into(), false));
                    if batch_bytes >= MAX_BATCH_BYTES {
                        self.write(std::mem::take(&mut batch)).await?;
                        batch_bytes = 0;
                    }
                }
                Err(e) => failures.push(e),
            }
        }
        if !batch.is_empty() {
            self.write(batch).await?;
        }
        if !stored.is_empty() {
            self.sync().await?;
        }
        if !failures.is_empty() {
            tracing::warn!(failed = failures.len(), first = %failures[0], "some chunks could not be copied");
        }
        Ok(Response::new(ReplicateChunksResponse { stored, failures }))
    }

    async fn delete_chunks(
        &self,
        request: Request<DeleteChunksRequest>,
    ) -> Result<Response<DeleteChunksResponse>, Status> {
        self.require_node(&request)?;
        let req = request.into_inner();
        if req.ids.len() > MAX_COPIES {
            return Err(Status::invalid_argument(format!(
                "{} ids in one call; at most {MAX_COPIES}",
                req.ids.len()
            )));
        }
        let ids: Vec<ChunkId> = req
            .ids
            .iter()
            .map(|id| ChunkId::from_slice(id, "delete_chunks"))
            .collect::<kiln_common::Result<_>>()?;
        let store = self.store.clone();
        let before = req.written_before_ms;
        let deleted = tokio::task::spawn_blocking(move || store.delete_older(&ids, before))
            .await
            .map_err(|e| Status::internal(format!("chunk delete task: {e}")))?
            .map_err(|e| Status::from(Error::from(e)))?;
        Ok(Response::new(DeleteChunksResponse {
            deleted: deleted as u32,
        }))
    }
}
