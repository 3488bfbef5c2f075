//! The `kiln.v1.Blobs` gRPC service on the worker's port: clients and other workers
//! store and read chunks here.
//!
//! Callers are cluster nodes (by certificate) or token holders checked against the
//! worker's [`TokenBook`]: storing needs a role that may change data, reading one
//! that may read. Chunks of a stream are verified and written in synced batches of
//! at most [`MAX_BATCH_BYTES`], so a long stream holds one batch in memory, and
//! the answer comes only after the last batch is on disk.

use std::sync::Arc;

use kiln_common::auth::{grpc_authorization, Permission, TokenBook};
use kiln_common::chunking::ChunkId;
use kiln_common::clock::now_ms;
use kiln_common::Error;
use kiln_proto::v1::blobs_server::Blobs;
use kiln_proto::v1::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::blob::BlobStore;
use crate::metrics::Metrics;

/// Bytes of chunks written in one synced batch.
pub const MAX_BATCH_BYTES: usize = 16 << 20;
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
}

/// PutChunks streams that write at once; more wait their turn.
pub const MAX_WRITERS: usize = 4;

impl BlobService {
    fn authorize<T>(&self, request: &Request<T>, need: Permission) -> kiln_common::Result<()> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        if kiln_common::tls::is_node(request) {
            return Ok(());
        }
        tokens
            .verify(grpc_authorization(request), need, now_ms())
            .map(drop)
    }

    /// Writes one batch on a blocking thread; returns how many chunks were new.
    async fn write(&self, batch: Vec<(ChunkId, Vec<u8>)>) -> Result<usize, Status> {
        let store = self.store.clone();
        let bytes: usize = batch.iter().map(|(_, d)| d.len()).sum();
        let new = tokio::task::spawn_blocking(move || {
            let refs: Vec<(ChunkId, &[u8])> =
                batch.iter().map(|(id, d)| (*id, d.as_slice())).collect();
            store.put_many(&refs)
        })
        .await
        .map_err(|e| Status::internal(format!("chunk write task: {e}")))?
        .map_err(|e| Status::from(Error::from(e)))?;
        self.metrics.chunks_written(new as u64, bytes as u64);
        Ok(new)
    }
}

#[tonic::async_trait]
impl Blobs for BlobService {
    async fn put_chunks(
        &self,
        request: Request<Streaming<PutChunksRequest>>,
    ) -> Result<Response<PutChunksResponse>, Status> {
        self.authorize(&request, Permission::Write)?;
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
            batch.push((id, message.data));
            if batch_bytes >= MAX_BATCH_BYTES {
                stored_new += self.write(std::mem::take(&mut batch)).await? as u32;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            stored_new += self.write(batch).await? as u32;
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
        self.authorize(&request, Permission::Read)?;
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
        self.authorize(&request, Permission::Read)?;
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
}
