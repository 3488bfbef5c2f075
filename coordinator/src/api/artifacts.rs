//! The artifact calls of the Coordinator service: plan a push, commit a version,
//! resolve a reference to its manifest and replicas, list, tag.
//!
//! The coordinators keep manifests and chunk locations; chunk bytes travel between
//! clients and workers only. A push asks [`Api::plan_push`] which chunks the cluster
//! lacks and where to send them, sends them to those workers, then commits the
//! manifest with the replicas the workers acknowledged; apply refuses a manifest
//! that names a chunk without a replica, so a version exists only once its bytes
//! are stored.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_common::artifact::{self, Selector};
use kiln_common::{Error, Result};
use kiln_proto::v1::*;
use prost::Message;

use super::grpc::{audited, command, Api};
use super::storage;
use crate::auth::Caller;
use crate::state::artifacts::{read_record, read_version, resolve};
use crate::state::keys;
use crate::state::machine::read_counter;
use crate::state::trees::{self, TreeOwner};

/// Most chunk ids one PlanPush may ask about.
pub const MAX_PLAN_CHUNKS: usize = 65_536;
/// Most artifacts and versions one listing returns.
const MAX_LISTED: usize = 10_000;

/// The workers a chunk may be sent to or read from, by state.
struct Workers {
    by_id: HashMap<String, WorkerRecord>,
}

impl Workers {
    fn alive(&self) -> Vec<&WorkerRecord> {
        let mut alive: Vec<&WorkerRecord> = self
            .by_id
            .values()
            .filter(|w| w.state == WorkerState::Alive as i32)
            .collect();
        // Most free disk first, then by id so that equal workers order the same way.
        alive.sort_by(|a, b| {
            let free = |w: &WorkerRecord| w.resources.as_ref().map_or(0, |r| r.disk_free_bytes);
            free(b).cmp(&free(a)).then_with(|| a.id.cmp(&b.id))
        });
        alive
    }
}

impl Api {
    fn workers(&self) -> Result<Workers> {
        let by_id = self
            .reader
            .workers()
            .map_err(storage)?
            .into_iter()
            .map(|w| (w.id.clone(), w))
            .collect();
        Ok(Workers { by_id })
    }

    /// Says which of the chunks the cluster lacks (fewer Alive replicas than the
    /// push wants) and which workers to send them to.
    pub async fn plan_push_call(&self, req: PlanPushRequest) -> Result<PlanPushResponse> {
        if req.chunk_ids.len() > MAX_PLAN_CHUNKS {
            return Err(Error::InvalidArgument(format!(
                "{} chunk ids in one plan; at most {MAX_PLAN_CHUNKS}",
                req.chunk_ids.len()
            )));
        }
        if req.replicas > artifact::MAX_REPLICAS {
            return Err(Error::InvalidArgument(format!(
                "{} replicas asked; at most {}",
                req.replicas,
                artifact::MAX_REPLICAS
            )));
        }
        let workers = self.workers()?;
        let alive = workers.alive();
        if alive.is_empty() {
            return Err(Error::Unavailable(
                "no worker is alive to store chunks; start one with `kiln worker`".into(),
            ));
        }
        let (wanted, warning) = if req.replicas == 0 {
            let wanted = artifact::DEFAULT_REPLICAS.min(alive.len() as u32);
            let warning = if wanted < artifact::DEFAULT_REPLICAS {
                format!(
                    "only {} worker(s) alive: chunks get {wanted} replica(s), not {}",
                    alive.len(),
                    artifact::DEFAULT_REPLICAS
                )
            } else {
                String::new()
            };
            (wanted, warning)
        } else if req.replicas as usize > alive.len() {
            return Err(Error::InvalidArgument(format!(
                "{} replicas asked but only {} worker(s) are alive",
                req.replicas,
                alive.len()
            )));
        } else {
            (req.replicas, String::new())
        };
        let alive_ids: BTreeSet<&str> = alive.iter().map(|w| w.id.as_str()).collect();
        let mut missing = Vec::new();
        for (i, id) in req.chunk_ids.iter().enumerate() {
            if id.len() != 32 {
                return Err(Error::InvalidArgument(format!(
                    "chunk id {i} has {} bytes, not 32",
                    id.len()
                )));
            }
            let record: Option<ChunkRecord> =
                read_record(&self.reader, &keys::chunk(id), "decode chunk record")
                    .map_err(storage)?;
            let replicas = record.map_or(0, |r| {
                r.workers
                    .iter()
                    .filter(|w| alive_ids.contains(w.as_str()))
                    .count()
            });
            if replicas < wanted as usize {
                missing.push(i as u32);
            }
        }
        let targets = alive
            .iter()
            .take(wanted as usize)
            .map(|w| ChunkTarget {
                worker_id: w.id.clone(),
                addr: w.addr.clone(),
            })
            .collect();
        Ok(PlanPushResponse {
            missing,
            targets,
            warning,
        })
    }

    /// Commits a pushed version; returns its number.
    pub async fn commit_artifact_call(
        &self,
        caller: &Caller,
        req: CommitArtifactRequest,
    ) -> Result<u64> {
        let version = req
            .version
            .ok_or_else(|| Error::InvalidArgument("commit without a version".into()))?;
        artifact::validate_name(&version.name)?;
        let what = format!(
            "push artifact {} ({} file(s), {} bytes)",
            version.name,
            version.files.len(),
            version.size
        );
        let result = self
            .propose(
                audited(
                    caller,
                    what,
                    command::Kind::CommitArtifact(CommitArtifact {
                        version: Some(version),
                        placements: req.placements,
                        tags: req.tags,
                    }),
                ),
                false,
            )
            .await?;
        Ok(result.value)
    }

    /// Resolves `name@reference` (linearizably) to its number.
    async fn resolve_reference(&self, name: &str, reference: &str) -> Result<u64> {
        artifact::validate_name(name)?;
        let selector = Selector::parse(reference)?;
        self.read_barrier(false).await?;
        resolve(&self.reader, name, &selector)
            .map_err(storage)?
            .ok_or_else(|| match selector {
                Selector::Latest => Error::NotFound(format!("no artifact is named {name}")),
                other => Error::NotFound(format!("{name}@{other} does not exist")),
            })
    }

    /// Returns the tags of `name`, with the version each points at.
    fn tags_of(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let prefix = keys::artifact_tags(name);
        self.reader
            .scan(&prefix, MAX_LISTED)
            .map_err(storage)?
            .into_iter()
            .map(|(key, value)| {
                let tag = String::from_utf8_lossy(&key[prefix.len()..]).to_string();
                let version = value
                    .as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| Error::Internal(format!("tag {name}@{tag} is corrupt")))?;
                Ok((tag, version))
            })
            .collect()
    }

    /// Returns a version's manifest and where each of its chunks can be read. A
    /// living tree (an MLflow run's or logged model's files) answers its latest
    /// version with the tree as it stands, numbered by its generation.
    pub async fn get_artifact_call(&self, req: GetArtifactRequest) -> Result<GetArtifactResponse> {
        let version = match self.resolve_reference(&req.name, &req.reference).await {
            Ok(number) => {
                let mut version = read_version(&self.reader, &req.name, number)
                    .map_err(storage)?
                    .ok_or_else(|| {
                        Error::NotFound(format!("{}@{number} does not exist", req.name))
                    })?;
                version.tags = self
                    .tags_of(&req.name)?
                    .into_iter()
                    .filter(|(_, v)| *v == number)
                    .map(|(t, _)| t)
                    .collect();
                version
            }
            Err(Error::NotFound(why)) => match self.tree_version(&req.name, &req.reference)? {
                Some(version) => version,
                None => return Err(Error::NotFound(why)),
            },
            Err(e) => return Err(e),
        };
        let sources = self.chunk_sources(&version.files)?;
        Ok(GetArtifactResponse {
            version: Some(version),
            sources,
        })
    }

    /// Returns a living tree as a directory version: its files now, numbered by
    /// the tree's generation (only the latest can be read: a tree keeps no past).
    fn tree_version(&self, name: &str, reference: &str) -> Result<Option<ArtifactVersion>> {
        if TreeOwner::of(name).is_none() {
            return Ok(None);
        }
        let head = trees::read_head(&self.reader, name).map_err(storage)?;
        let latest = matches!(Selector::parse(reference)?, Selector::Latest)
            || reference == head.generation.to_string();
        if head.generation == 0 || !latest {
            return Ok(None);
        }
        let files = self.tree_files(name, "")?;
        Ok(Some(ArtifactVersion {
            name: name.to_string(),
            version: head.generation,
            created_at_ms: head.updated_at_ms,
            size: files.iter().map(|f| f.size).sum(),
            digest: kiln_common::transfer::directory_digest(&files),
            directory: true,
            replicas: artifact::DEFAULT_REPLICAS,
            files,
            ..Default::default()
        }))
    }

    /// Returns the files of a tree under `dir` (empty: all), in path order.
    pub fn tree_files(&self, tree: &str, dir: &str) -> Result<Vec<ArtifactFile>> {
        let prefix = keys::tree_files(tree, dir);
        let entries = self
            .reader
            .scan(&prefix, trees::MAX_TREE_FILES + 1)
            .map_err(storage)?;
        if entries.len() > trees::MAX_TREE_FILES {
            return Err(Error::InvalidArgument(format!(
                "{tree} holds more than {} files under '{dir}'",
                trees::MAX_TREE_FILES
            )));
        }
        entries
            .into_iter()
            .map(|(_, bytes)| {
                ArtifactFile::decode(bytes.as_slice())
                    .map_err(|e| Error::Internal(format!("decode tree file: {e}")))
            })
            .collect()
    }

    /// Says where each distinct chunk of `files` can be read, Alive workers first.
    pub fn chunk_sources(&self, files: &[ArtifactFile]) -> Result<Vec<ChunkSource>> {
        let workers = self.workers()?;
        let rank = |id: &str| match workers.by_id.get(id).map(|w| w.state) {
            Some(s) if s == WorkerState::Alive as i32 => 0,
            Some(s) if s == WorkerState::Suspect as i32 => 1,
            _ => 2,
        };
        let mut seen = BTreeSet::new();
        let mut sources = Vec::new();
        for chunk in files.iter().flat_map(|f| f.chunks.iter()) {
            if !seen.insert(chunk.id.clone()) {
                continue;
            }
            let record: ChunkRecord =
                read_record(&self.reader, &keys::chunk(&chunk.id), "decode chunk record")
                    .map_err(storage)?
                    .unwrap_or_default();
            let mut holders: Vec<&String> = record.workers.iter().collect();
            holders.sort_by_key(|id| rank(id));
            let replicas = holders
                .into_iter()
                .filter_map(|id| workers.by_id.get(id))
                .map(|w| ChunkTarget {
                    worker_id: w.id.clone(),
                    addr: w.addr.clone(),
                })
                .collect();
            sources.push(ChunkSource {
                id: chunk.id.clone(),
                replicas,
            });
        }
        Ok(sources)
    }

    /// Lists every artifact with its newest version.
    pub async fn list_artifacts_call(&self) -> Result<ListArtifactsResponse> {
        self.read_barrier(false).await?;
        let mut artifacts = Vec::new();
        for (key, value) in self
            .reader
            .scan(keys::ARTIFACT_HEAD.as_bytes(), MAX_LISTED)
            .map_err(storage)?
        {
            let name = String::from_utf8_lossy(&key[keys::ARTIFACT_HEAD.len()..]).to_string();
            let latest = value
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Internal(format!("head of {name} is corrupt")))?;
            let Some(version) = read_version(&self.reader, &name, latest).map_err(storage)? else {
                continue;
            };
            artifacts.push(ArtifactSummary {
                latest,
                size: version.size,
                updated_at_ms: version.created_at_ms,
                tags: self
                    .tags_of(&name)?
                    .into_iter()
                    .map(|(t, v)| format!("{t}={v}"))
                    .collect(),
                name,
            });
        }
        Ok(ListArtifactsResponse { artifacts })
    }

    /// Lists the versions of one artifact, newest first, without their files.
    pub async fn list_versions_call(
        &self,
        req: ListVersionsRequest,
    ) -> Result<ListVersionsResponse> {
        artifact::validate_name(&req.name)?;
        self.read_barrier(false).await?;
        let tags = self.tags_of(&req.name)?;
        let mut versions = Vec::new();
        for (_, bytes) in self
            .reader
            .scan(&keys::artifact_versions(&req.name), MAX_LISTED)
            .map_err(storage)?
        {
            let mut version = ArtifactVersion::decode(bytes.as_slice())
                .map_err(|e| Error::Internal(format!("decode artifact version: {e}")))?;
            version.files.clear();
            version.tags = tags
                .iter()
                .filter(|(_, v)| *v == version.version)
                .map(|(t, _)| t.clone())
                .collect();
            versions.push(version);
        }
        if versions.is_empty() {
            return Err(Error::NotFound(format!(
                "no artifact is named {}",
                req.name
            )));
        }
        versions.reverse();
        Ok(ListVersionsResponse { versions })
    }

    /// Points a tag at the version a reference names.
    pub async fn tag_artifact_call(&self, caller: &Caller, req: TagArtifactRequest) -> Result<u64> {
        artifact::validate_tag(&req.tag)?;
        let version = self.resolve_reference(&req.name, &req.reference).await?;
        self.propose(
            audited(
                caller,
                format!("tag artifact {}@{version} as {}", req.name, req.tag),
                command::Kind::SetArtifactTag(SetArtifactTag {
                    name: req.name,
                    tag: req.tag,
                    version,
                }),
            ),
            false,
        )
        .await?;
        Ok(version)
    }
}

/// Chunk records read per page while walking them all.
const RECORD_PAGE: usize = 4096;
/// Most chunk copies one repair round starts.
pub const MAX_REPAIRS_PER_ROUND: usize = 1024;
/// Chunks named in one worker call (ReplicateChunks, DeleteChunks).
const CHUNKS_PER_CALL: usize = 256;
/// Chunk records removed by one Raft entry.
const DELETES_PER_ENTRY: usize = 1000;
/// Garbage collection spares chunks younger than this unless told otherwise.
pub const DEFAULT_GC_GRACE_MS: u64 = 3_600_000;

/// One chunk record as walked: its id and the record.
type ChunkEntry = (Vec<u8>, ChunkRecord);

impl Api {
    /// Calls `visit` on every chunk record, page by page.
    fn walk_chunks(&self, mut visit: impl FnMut(ChunkEntry)) -> Result<()> {
        let prefix = keys::CHUNK.as_bytes();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .reader
                .scan_after(prefix, after.as_deref(), RECORD_PAGE)
                .map_err(storage)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            let full = page.len() == RECORD_PAGE;
            for (key, value) in page {
                let id = hex::decode(&key[prefix.len()..])
                    .map_err(|e| Error::Internal(format!("chunk key: {e}")))?;
                let record = ChunkRecord::decode(value.as_slice())
                    .map_err(|e| Error::Internal(format!("decode chunk record: {e}")))?;
                visit((id, record));
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Records the replicas a push has stored (one batch).
    pub async fn record_chunks_call(
        &self,
        caller: &Caller,
        req: RecordChunksRequest,
    ) -> Result<()> {
        if req.placements.len() > MAX_PLAN_CHUNKS {
            return Err(Error::InvalidArgument(format!(
                "{} placements in one call; at most {MAX_PLAN_CHUNKS}",
                req.placements.len()
            )));
        }
        let mut command = audited(
            caller,
            String::new(),
            command::Kind::AddChunkReplicas(AddChunkReplicas {
                placements: req.placements,
                replicas: req.replicas.min(artifact::MAX_REPLICAS),
            }),
        );
        // Chunk bookkeeping is not an audited change of its own: the commit that
        // follows is.
        command.audit = None;
        self.propose(command, false).await?;
        Ok(())
    }

    /// Forgets a worker's replicas that it found corrupt (and dropped); the repair
    /// loop then copies them back from a good replica.
    pub async fn report_corrupt_call(&self, req: ReportCorruptChunksRequest) -> Result<()> {
        if req.ids.len() > MAX_PLAN_CHUNKS {
            return Err(Error::InvalidArgument("too many chunk ids".into()));
        }
        tracing::warn!(worker = %req.worker_id, chunks = req.ids.len(), "worker reports corrupt chunks");
        self.propose(
            command(command::Kind::DropChunkReplicas(DropChunkReplicas {
                worker_id: req.worker_id,
                ids: req.ids,
            })),
            false,
        )
        .await?;
        Ok(())
    }

    /// What the chunks' replica counts depend on: each worker's state, and the
    /// count of changes that may have left a chunk short. A repair round that
    /// found nothing to do stays true until this changes.
    pub fn repair_signature(&self) -> Result<(Vec<(String, i32)>, u64)> {
        let mut states: Vec<(String, i32)> = self
            .reader
            .workers()
            .map_err(storage)?
            .into_iter()
            .map(|w| (w.id, w.state))
            .collect();
        states.sort();
        let short = read_counter(&self.reader, keys::CHUNKS_SHORT).map_err(storage)?;
        Ok((states, short))
    }

    /// One repair round on the leader: every chunk with fewer live replicas than
    /// it wants (bounded by the workers alive) is copied from a live replica to
    /// a worker without one. Returns the copies it planned (0: nothing to do).
    pub async fn repair_round(&self) -> Result<usize> {
        let workers = self.workers()?;
        let alive = workers.alive();
        if alive.is_empty() {
            return Ok(0);
        }
        let live = |id: &str| {
            workers.by_id.get(id).is_some_and(|w| {
                w.state == WorkerState::Alive as i32 || w.state == WorkerState::Suspect as i32
            })
        };
        // Per target worker: the copies it should make.
        let mut plan: BTreeMap<String, Vec<(ChunkSource, u64)>> = BTreeMap::new();
        let mut planned = 0usize;
        let mut lost = 0usize;
        self.walk_chunks(|(id, record)| {
            if planned >= MAX_REPAIRS_PER_ROUND {
                return;
            }
            let holders: Vec<&String> = record.workers.iter().filter(|w| live(w)).collect();
            let want = (record.replicas.max(1) as usize).min(alive.len());
            if holders.len() >= want {
                return;
            }
            if holders.is_empty() {
                lost += 1;
                return;
            }
            let sources: Vec<ChunkTarget> = holders
                .iter()
                .filter_map(|w| workers.by_id.get(w.as_str()))
                .map(|w| ChunkTarget {
                    worker_id: w.id.clone(),
                    addr: w.addr.clone(),
                })
                .collect();
            let targets = alive
                .iter()
                .filter(|w| !record.workers.contains(&w.id))
                .take(want - holders.len());
            for target in targets {
                plan.entry(target.id.clone()).or_default().push((
                    ChunkSource {
                        id: id.clone(),
                        replicas: sources.clone(),
                    },
                    record.size,
                ));
                planned += 1;
            }
        })?;
        if lost > 0 {
            tracing::error!(
                chunks = lost,
                "chunks have no live replica; they return only if their workers do"
            );
        }
        let mut copies = 0;
        for (target, work) in plan {
            let Some(worker) = workers.by_id.get(&target) else {
                continue;
            };
            let mut client = self.peers.blobs_for(&worker.addr)?;
            for part in work.chunks(CHUNKS_PER_CALL) {
                let sizes: HashMap<&[u8], u64> = part
                    .iter()
                    .map(|(s, size)| (s.id.as_slice(), *size))
                    .collect();
                let request = ReplicateChunksRequest {
                    copies: part.iter().map(|(s, _)| s.clone()).collect(),
                };
                let resp = match client.replicate_chunks(request).await {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        tracing::warn!(worker = %target, error = %e.message(), "repair copy failed");
                        break;
                    }
                };
                if resp.stored.is_empty() {
                    continue;
                }
                let placements = resp
                    .stored
                    .iter()
                    .map(|id| ChunkPlacement {
                        id: id.clone(),
                        size: sizes.get(id.as_slice()).copied().unwrap_or(0),
                        workers: vec![target.clone()],
                    })
                    .collect::<Vec<_>>();
                copies += placements.len();
                self.propose(
                    command(command::Kind::AddChunkReplicas(AddChunkReplicas {
                        placements,
                        replicas: 0,
                    })),
                    false,
                )
                .await?;
            }
        }
        if copies > 0 {
            tracing::info!(copies, planned, "re-replicated chunks");
        }
        Ok(planned)
    }

    /// Removes chunks that no version lists and that are older than the grace
    /// period: their records first (apply keeps any that a version has listed
    /// since), then their bytes on the workers, only bytes written before the
    /// collection began (a chunk pushed again since stays).
    pub async fn collect_garbage_call(
        &self,
        caller: &Caller,
        req: CollectGarbageRequest,
    ) -> Result<CollectGarbageResponse> {
        self.require_leader()?;
        self.read_barrier(false).await?;
        let started_ms = kiln_common::clock::now_ms();
        let grace = if req.grace_ms == 0 {
            DEFAULT_GC_GRACE_MS
        } else {
            req.grace_ms
        };
        let mut candidates: Vec<ChunkEntry> = Vec::new();
        self.walk_chunks(|(id, record)| {
            if record.refs == 0 && record.created_at_ms.saturating_add(grace) <= started_ms {
                candidates.push((id, record));
            }
        })?;
        let bytes: u64 = candidates.iter().map(|(_, r)| r.size).sum();
        if req.dry_run || candidates.is_empty() {
            return Ok(CollectGarbageResponse {
                chunks: candidates.len() as u64,
                bytes,
                pending: 0,
            });
        }
        for part in candidates.chunks(DELETES_PER_ENTRY) {
            self.propose(
                audited(
                    caller,
                    format!("collect {} unreferenced chunk(s)", part.len()),
                    command::Kind::DeleteChunkRecords(DeleteChunkRecords {
                        ids: part.iter().map(|(id, _)| id.clone()).collect(),
                    }),
                ),
                false,
            )
            .await?;
        }
        // Only the records that are gone now lose their bytes.
        let mut by_worker: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut removed = 0u64;
        let mut removed_bytes = 0u64;
        for (id, record) in &candidates {
            let still: Option<ChunkRecord> =
                read_record(&self.reader, &keys::chunk(id), "decode chunk record")
                    .map_err(storage)?;
            if still.is_some() {
                continue;
            }
            removed += 1;
            removed_bytes += record.size;
            for worker in &record.workers {
                by_worker
                    .entry(worker.clone())
                    .or_default()
                    .push(id.clone());
            }
        }
        let workers = self.workers()?;
        let mut pending = 0u64;
        for (worker_id, ids) in by_worker {
            let Some(worker) = workers.by_id.get(&worker_id) else {
                continue;
            };
            let mut client = self.peers.blobs_for(&worker.addr)?;
            for part in ids.chunks(CHUNKS_PER_CALL) {
                let request = DeleteChunksRequest {
                    ids: part.to_vec(),
                    written_before_ms: started_ms,
                };
                if let Err(e) = client.delete_chunks(request).await {
                    tracing::warn!(worker = %worker_id, error = %e.message(), "delete chunks");
                    pending += part.len() as u64;
                }
            }
        }
        Ok(CollectGarbageResponse {
            chunks: removed,
            bytes: removed_bytes,
            pending,
        })
    }
}
