//! The blob scrubber: on a schedule, reads and verifies every stored chunk at a
//! bounded rate. A chunk that fails its check is reported to the coordinators,
//! which forget this replica (the leader's repair loop then copies a good one back
//! from another worker), and only then removed here; a report that fails leaves the
//! chunk for the next pass, so no bad replica goes unreported.

use std::sync::Arc;
use std::time::Duration;

use kiln_common::chunking::ChunkId;
use kiln_common::client::ClusterClient;
use kiln_proto::v1::ReportCorruptChunksRequest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::blob::{BlobError, BlobStore};
use crate::metrics::Metrics;

/// Chunk bytes read a second, at most, so that a pass does not starve serving.
const SCRUB_BYTES_PER_SEC: u64 = 64 << 20;
/// Chunk ids read per page of the walk.
const PAGE: usize = 256;

/// What one pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScrubReport {
    pub checked: u64,
    pub bytes: u64,
    pub corrupt: u64,
}

/// Runs a pass every `interval` until `stop` is cancelled; a zero interval turns the
/// scrubber off.
pub async fn scrub_loop(
    store: BlobStore,
    client: Arc<ClusterClient>,
    worker_id: String,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match scrub_pass(&store, &client, &worker_id, &metrics, &stop).await {
            Ok(report) if report.corrupt > 0 => {
                tracing::warn!(?report, "scrub pass found corrupt chunks");
            }
            Ok(report) => tracing::debug!(?report, "scrub pass"),
            Err(e) => tracing::warn!(error = %e, "scrub pass stopped"),
        }
    }
}

/// Reads every stored chunk once.
pub async fn scrub_pass(
    store: &BlobStore,
    client: &ClusterClient,
    worker_id: &str,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> anyhow::Result<ScrubReport> {
    let mut report = ScrubReport::default();
    let started = Instant::now();
    let mut after: Option<ChunkId> = None;
    loop {
        let page = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.ids_after(after, PAGE)).await??
        };
        let Some(last) = page.last().copied() else {
            return Ok(report);
        };
        after = Some(last);
        let mut corrupt = Vec::new();
        for id in page {
            if stop.is_cancelled() {
                return Ok(report);
            }
            let read = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.get(id)).await?
            };
            match read {
                Ok(Some(data)) => {
                    report.checked += 1;
                    report.bytes += data.len() as u64;
                }
                // Removed since the page was read.
                Ok(None) => {}
                Err(BlobError::Corrupt { reason, .. }) => {
                    tracing::error!(chunk = %id, %reason, "scrub found a corrupt chunk");
                    metrics.chunk_corrupt();
                    report.corrupt += 1;
                    corrupt.push(id);
                }
                Err(e) => return Err(e.into()),
            }
            // Bounded rate: never ahead of SCRUB_BYTES_PER_SEC on average.
            let due = Duration::from_secs_f64(report.bytes as f64 / SCRUB_BYTES_PER_SEC as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
        if !corrupt.is_empty() {
            let request = ReportCorruptChunksRequest {
                worker_id: worker_id.to_string(),
                ids: corrupt.iter().map(|id| id.0.to_vec()).collect(),
            };
            client
                .call(|mut c| {
                    let req = request.clone();
                    async move { c.report_corrupt_chunks(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                corrupt.iter().try_for_each(|id| store.delete(*id))
            })
            .await??;
        }
    }
}
