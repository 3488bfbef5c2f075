//! Moving artifacts between files and the cluster: `kiln artifact push | pull |
//! diff` and the trainers' datasets, checkpoints and models.
//!
//! Push: a blocking thread reads each file through the [`Chunker`] and hands chunks
//! over a bounded channel; batches of up to [`BATCH_BYTES`] go to the coordinators
//! (PlanPush: which chunks does the cluster lack, and which workers take them),
//! the missing chunks go to every target worker at once, the replicas the workers
//! acknowledged are recorded (RecordChunks), and at most [`BATCHES_IN_FLIGHT`]
//! batches are sent while the next is read. The manifest is committed last, so an
//! interrupted push leaves no version, and pushing again sends only the chunks
//! that were not recorded yet.
//!
//! Pull: the manifest and the replicas of each chunk from the coordinators; chunks
//! fetched [`FETCHES_IN_FLIGHT`] at a time in file order, each verified against
//! its id, a replica that fails or sends bad bytes skipped for the next. Files are
//! written under a temporary name and renamed once complete and verified.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::artifact::parse_reference;
use crate::chunking::{Chunk, ChunkId, Chunker};
use crate::client::ClusterClient;
use anyhow::{bail, Context};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use kiln_proto::v1::*;
use tokio::sync::mpsc;

use tokio::task::JoinSet;

use crate::progress::Progress;

/// Bytes of chunks planned and sent together.
const BATCH_BYTES: usize = 16 << 20;
/// Batches being sent while the next one is read.
const BATCHES_IN_FLIGHT: usize = 2;
/// Chunks read ahead of the sender.
const CHUNKS_AHEAD: usize = 16;
/// Pause before retrying a worker that did not know our token yet.
const TOKEN_PROPAGATION_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// Chunk fetches in flight during a pull.
const FETCHES_IN_FLIGHT: usize = 8;

/// What `kiln artifact push` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    pub name: String,
    pub tags: Vec<String>,
    /// 0: the cluster default.
    pub replicas: u32,
    pub parents: Vec<String>,
    pub produced_by: String,
    pub media_type: String,
    pub metadata: BTreeMap<String, String>,
    /// Shows no progress (a worker pushing checkpoints and models).
    pub quiet: bool,
}

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    pub name: String,
    pub version: u64,
    pub files: usize,
    pub bytes: u64,
    pub chunks: usize,
    pub new_chunks: usize,
    pub new_bytes: u64,
    pub replicas: u32,
    pub seconds: f64,
    pub warning: String,
}

/// Where a file's bytes come from.
pub enum Input {
    /// A file on disk, opened when its turn comes.
    Disk(PathBuf),
    /// Any reader (an HTTP body through a bridge), read on the reader thread.
    Stream(Box<dyn std::io::Read + Send>),
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Disk(path) => write!(f, "Disk({})", path.display()),
            Input::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// A file to upload: where its bytes come from, its path in the version or tree,
/// and its Unix mode (0: not recorded).
#[derive(Debug)]
pub struct Source {
    pub input: Input,
    pub path: String,
    pub mode: u32,
}

fn file_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

/// Lists the files under `root` (or `root` itself), in path order. Symbolic links
/// are refused: a version holds bytes, not pointers.
fn sources(root: &Path) -> anyhow::Result<(bool, Vec<Source>)> {
    let meta = std::fs::symlink_metadata(root)
        .with_context(|| format!("cannot read {}", root.display()))?;
    if meta.is_file() {
        let name = root
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no usable file name", root.display()))?;
        return Ok((
            false,
            vec![Source {
                input: Input::Disk(root.to_path_buf()),
                path: name.to_string(),
                mode: file_mode(&meta),
            }],
        ));
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a directory", root.display());
    }
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let meta = std::fs::symlink_metadata(entry.path())
                .with_context(|| format!("cannot read {}", entry.path().display()))?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() {
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .expect("under the root")
                    .to_str()
                    .with_context(|| format!("{} is not UTF-8", entry.path().display()))?
                    .replace(std::path::MAIN_SEPARATOR, "/");
                out.push(Source {
                    input: Input::Disk(entry.path()),
                    path: rel,
                    mode: file_mode(&meta),
                });
            } else {
                bail!(
                    "{} is a link or special file; push its target instead",
                    entry.path().display()
                );
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((true, out))
}

/// What the reader thread sends: a chunk, or the end of a file with its digest.
enum Read {
    Chunk(Chunk),
    FileDone { size: u64, digest: [u8; 32] },
}

/// Reads `inputs` in order on a blocking thread.
fn spawn_reader(
    inputs: Vec<(String, Input)>,
) -> (
    mpsc::Receiver<anyhow::Result<Read>>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    let handle = std::thread::spawn(move || {
        for (what, input) in inputs {
            let reader: Box<dyn std::io::Read + Send> = match input {
                Input::Disk(path) => match std::fs::File::open(&path) {
                    Ok(f) => Box::new(f),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(anyhow::anyhow!("cannot read {what}: {e}")));
                        return;
                    }
                },
                Input::Stream(reader) => reader,
            };
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            for chunk in Chunker::new(std::io::BufReader::with_capacity(1 << 20, reader)) {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(anyhow::anyhow!("cannot read {what}: {e}")));
                        return;
                    }
                };
                hasher.update(&chunk.data);
                size += chunk.data.len() as u64;
                if tx.blocking_send(Ok(Read::Chunk(chunk))).is_err() {
                    return;
                }
            }
            let digest = *hasher.finalize().as_bytes();
            if tx
                .blocking_send(Ok(Read::FileDone { size, digest }))
                .is_err()
            {
                return;
            }
        }
    });
    (rx, handle)
}

/// What one batch did.
#[derive(Debug, Default)]
struct BatchOutcome {
    /// Chunks the cluster lacked, now stored and recorded, and their bytes.
    new_chunks: usize,
    new_bytes: u64,
    /// Replicas each got, and the coordinators' warning when fewer than asked.
    replicas: u32,
    warning: String,
}

/// Sends one batch's missing chunks to every target and records them.
async fn send_batch(
    client: Arc<ClusterClient>,
    batch: Vec<Chunk>,
    replicas: u32,
) -> anyhow::Result<BatchOutcome> {
    let ids: Vec<Vec<u8>> = batch.iter().map(|c| c.id.0.to_vec()).collect();
    let plan = client
        .call(|mut c| {
            let req = PlanPushRequest {
                chunk_ids: ids.clone(),
                replicas,
            };
            async move { c.plan_push(req).await.map(|r| r.into_inner()) }
        })
        .await
        .context("plan the push")?;
    if plan.targets.is_empty() {
        bail!("the coordinators named no worker to store chunks");
    }
    // The missing chunks are compressed once, here, for every replica; the batch
    // is shared by the uploads and each message shares its chunk's bytes.
    let batch = Arc::new(batch);
    let missing: Arc<Vec<usize>> = Arc::new(plan.missing.iter().map(|&i| i as usize).collect());
    let encoded: Arc<Vec<bytes::Bytes>> = {
        let (batch, missing) = (Arc::clone(&batch), Arc::clone(&missing));
        Arc::new(
            tokio::task::spawn_blocking(move || {
                missing
                    .iter()
                    .map(|&i| crate::chunking::encode_chunk(&batch[i].data).into())
                    .collect()
            })
            .await
            .context("compress chunks")?,
        )
    };
    if !missing.is_empty() {
        let mut sends = JoinSet::new();
        for target in &plan.targets {
            let mut blobs = client.blobs_for(&target.addr)?;
            let target = target.clone();
            let (batch, encoded) = (Arc::clone(&batch), Arc::clone(&encoded));
            let missing = Arc::clone(&missing);
            sends.spawn(async move {
                // A worker that does not hold a token asks for the records first,
                // but gives up after 2 s when the coordinators do not answer (an
                // election): an UNAUTHENTICATED answer is retried a few times.
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let (batch, order) = (Arc::clone(&batch), Arc::clone(&missing));
                    let values = Arc::clone(&encoded);
                    let requests = stream::iter(0..order.len()).map(move |k| PutChunksRequest {
                        id: batch[order[k]].id.0.to_vec(),
                        data: values[k].clone(),
                        encoded: true,
                    });
                    let result = blobs.put_chunks(requests).await.map(|r| r.into_inner());
                    match result {
                        Err(e) if e.code() == tonic::Code::Unauthenticated && attempts < 5 => {
                            tokio::time::sleep(TOKEN_PROPAGATION_WAIT).await;
                        }
                        other => {
                            return other.map_err(|e| {
                                anyhow::anyhow!(
                                    "worker {} at {} refused chunks: {}",
                                    target.worker_id,
                                    target.addr,
                                    crate::Error::from(e)
                                )
                            })
                        }
                    }
                }
            });
        }
        while let Some(joined) = sends.join_next().await {
            let ack = joined.context("join a chunk upload")??;
            if ack.received as usize != missing.len() {
                bail!(
                    "a worker acknowledged {} of {} chunks",
                    ack.received,
                    missing.len()
                );
            }
        }
    }
    let workers: Vec<String> = plan.targets.iter().map(|t| t.worker_id.clone()).collect();
    let placements: Vec<ChunkPlacement> = missing
        .iter()
        .map(|&i| &batch[i])
        .map(|c| ChunkPlacement {
            id: c.id.0.to_vec(),
            size: c.data.len() as u64,
            workers: workers.clone(),
        })
        .collect();
    let outcome = BatchOutcome {
        new_chunks: placements.len(),
        new_bytes: placements.iter().map(|p| p.size).sum(),
        replicas: plan.targets.len() as u32,
        warning: plan.warning,
    };
    // Recorded batch by batch: a push that is interrupted and run again finds
    // these chunks stored and sends only the rest.
    if !placements.is_empty() {
        let request = RecordChunksRequest {
            placements,
            replicas: if replicas == 0 {
                crate::artifact::DEFAULT_REPLICAS
            } else {
                replicas
            },
        };
        client
            .call(|mut c| {
                let req = request.clone();
                async move { c.record_chunks(req).await.map(|r| r.into_inner()) }
            })
            .await
            .context("record the stored chunks")?;
    }
    Ok(outcome)
}

/// What an upload stored: each file's manifest entry, and what it sent.
#[derive(Debug, Default)]
pub struct Uploaded {
    pub files: Vec<ArtifactFile>,
    pub chunks: usize,
    pub new_chunks: usize,
    pub new_bytes: u64,
    /// Replicas each chunk got, and the coordinators' warning when fewer than asked.
    pub replicas: u32,
    pub warning: String,
}

/// Chunks `sources` in order, stores the chunks the cluster lacks on its workers
/// and records their replicas, batch by batch; returns the files' manifest
/// entries. Nothing refers to the chunks until the caller commits the entries (a
/// version, a tree file); until then garbage collection spares them for its grace
/// period.
pub async fn upload(
    client: Arc<ClusterClient>,
    sources: Vec<Source>,
    replicas: u32,
    progress: &mut Progress,
) -> anyhow::Result<Uploaded> {
    let mut names = Vec::with_capacity(sources.len());
    let mut inputs = Vec::with_capacity(sources.len());
    for source in sources {
        let what = match &source.input {
            Input::Disk(path) => path.display().to_string(),
            Input::Stream(_) => source.path.clone(),
        };
        names.push((source.path, source.mode));
        inputs.push((what, source.input));
    }
    let (mut rx, reader) = spawn_reader(inputs);

    let mut done = Uploaded::default();
    let mut current: Vec<ChunkRef> = Vec::new();
    let mut batch: Vec<Chunk> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut in_flight = JoinSet::new();
    let collect = |done: &mut Uploaded, result: anyhow::Result<BatchOutcome>| {
        let outcome = result?;
        done.new_chunks += outcome.new_chunks;
        done.new_bytes += outcome.new_bytes;
        done.replicas = outcome.replicas;
        if !outcome.warning.is_empty() {
            done.warning = outcome.warning;
        }
        anyhow::Ok(())
    };
    loop {
        let next = rx.recv().await;
        let flush = match &next {
            None => !batch.is_empty(),
            Some(_) => batch_bytes >= BATCH_BYTES,
        };
        if flush {
            if in_flight.len() >= BATCHES_IN_FLIGHT {
                let joined = in_flight.join_next().await.expect("a batch in flight");
                collect(&mut done, joined.context("join a batch")?)?;
            }
            in_flight.spawn(send_batch(
                Arc::clone(&client),
                std::mem::take(&mut batch),
                replicas,
            ));
            batch_bytes = 0;
        }
        match next {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(Read::Chunk(chunk))) => {
                done.chunks += 1;
                progress.advance(chunk.data.len() as u64);
                current.push(ChunkRef {
                    id: chunk.id.0.to_vec(),
                    size: chunk.data.len() as u64,
                });
                batch_bytes += chunk.data.len();
                batch.push(chunk);
            }
            Some(Ok(Read::FileDone { size, digest })) => {
                let (path, mode) = names
                    .get(done.files.len())
                    .cloned()
                    .context("the reader ended more files than it was given")?;
                done.files.push(ArtifactFile {
                    path,
                    size,
                    digest: digest.to_vec(),
                    chunks: std::mem::take(&mut current),
                    mode,
                });
            }
        }
    }
    while let Some(joined) = in_flight.join_next().await {
        collect(&mut done, joined.context("join a batch")?)?;
    }
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the file reader panicked"))?;
    if done.files.len() != names.len() {
        bail!("read {} of {} files", done.files.len(), names.len());
    }
    if done.replicas == 0 {
        // Nothing was planned: empty files only. Ask for the replica count anyway
        // so that the report says what the cluster would do.
        let planned = send_batch(Arc::clone(&client), Vec::new(), replicas).await?;
        done.replicas = planned.replicas;
        done.warning = planned.warning;
    }
    Ok(done)
}

/// Pushes a file or directory as a new version of `options.name`.
pub async fn push(
    client: Arc<ClusterClient>,
    root: &Path,
    options: PushOptions,
) -> anyhow::Result<PushReport> {
    crate::artifact::validate_name(&options.name)?;
    for tag in &options.tags {
        crate::artifact::validate_tag(tag)?;
    }
    let started = Instant::now();
    let (directory, sources) = sources(root)?;
    let total: u64 = sources
        .iter()
        .map(|s| match &s.input {
            Input::Disk(path) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            Input::Stream(_) => 0,
        })
        .sum();
    let what = format!("push {}", options.name);
    let mut progress = if options.quiet {
        Progress::quiet(&what, total)
    } else {
        Progress::new(&what, total)
    };
    let uploaded = upload(
        Arc::clone(&client),
        sources,
        options.replicas,
        &mut progress,
    )
    .await?;
    progress.finish();
    let files = uploaded.files;

    let size: u64 = files.iter().map(|f| f.size).sum();
    let digest = if directory {
        directory_digest(&files)
    } else {
        files[0].digest.clone()
    };
    let version = ArtifactVersion {
        name: options.name.clone(),
        size,
        digest,
        media_type: options.media_type.clone(),
        metadata: options.metadata.clone().into_iter().collect(),
        parents: options.parents.clone(),
        produced_by: options.produced_by.clone(),
        directory,
        files,
        replicas: if options.replicas == 0 {
            crate::artifact::DEFAULT_REPLICAS
        } else {
            options.replicas
        },
        ..Default::default()
    };
    let file_count = version.files.len();
    let request = CommitArtifactRequest {
        version: Some(version),
        // Recorded batch by batch already.
        placements: Vec::new(),
        tags: options.tags.clone(),
    };
    // Retried only on errors that say the commit was not applied (no leader, not
    // the leader); a lost answer after the apply would make a second, identical
    // version, never a half-written one.
    let number = client
        .call(|mut c| {
            let req = request.clone();
            async move { c.commit_artifact(req).await.map(|r| r.into_inner()) }
        })
        .await
        .context("commit the version")?
        .version;
    Ok(PushReport {
        name: options.name,
        version: number,
        files: file_count,
        bytes: size,
        chunks: uploaded.chunks,
        new_chunks: uploaded.new_chunks,
        new_bytes: uploaded.new_bytes,
        replicas: uploaded.replicas,
        seconds: started.elapsed().as_secs_f64(),
        warning: uploaded.warning,
    })
}

/// The digest of a directory version: BLAKE3 over each file's path, size and
/// digest, in path order.
pub fn directory_digest(files: &[ArtifactFile]) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    for f in files {
        hasher.update(f.path.as_bytes());
        hasher.update(&[0]);
        hasher.update(&f.size.to_le_bytes());
        hasher.update(&f.digest);
    }
    hasher.finalize().as_bytes().to_vec()
}

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    pub name: String,
    pub version: u64,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub path: PathBuf,
}

/// Writes `reference` to `out`: the file itself (into `out`, or into the directory
/// `out` names), or a directory's tree under `out`.
pub async fn pull(
    client: Arc<ClusterClient>,
    reference: &str,
    out: &Path,
    quiet: bool,
) -> anyhow::Result<PullReport> {
    let started = Instant::now();
    let resp = get_artifact(&client, reference).await?;
    let version = resp.version.context("the coordinators sent no version")?;
    let name = version.name.clone();
    let sources: Arc<ChunkSources> = Arc::new(
        resp.sources
            .into_iter()
            .map(|s| (s.id, s.replicas))
            .collect(),
    );

    let target = if version.directory {
        if out.exists() && !out.is_dir() {
            bail!("{} exists and is not a directory", out.display());
        }
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        out.to_path_buf()
    } else if out.is_dir() {
        out.join(&version.files[0].path)
    } else {
        out.to_path_buf()
    };
    let what = format!("pull {name}@{}", version.version);
    let mut progress = if quiet {
        Progress::quiet(&what, version.size)
    } else {
        Progress::new(&what, version.size)
    };
    for file in &version.files {
        let path = if version.directory {
            target.join(&file.path)
        } else {
            target.clone()
        };
        write_file(&client, &sources, file, &path, &mut progress).await?;
    }
    progress.finish();
    Ok(PullReport {
        name,
        version: version.version,
        files: version.files.len(),
        bytes: version.size,
        seconds: started.elapsed().as_secs_f64(),
        path: target,
    })
}

/// Fetches a file's chunks in order and writes them to `path` through a temporary
/// file, checking the file's digest before the rename.
async fn write_file(
    client: &Arc<ClusterClient>,
    sources: &Arc<ChunkSources>,
    file: &ArtifactFile,
    path: &Path,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?;
    let partial = parent.join(format!(".{file_name}.kiln-partial"));
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?,
    );
    let mut hasher = blake3::Hasher::new();
    let mut fetched = std::pin::pin!(file_chunks(Arc::clone(client), Arc::clone(sources), file));
    let result: anyhow::Result<()> = async {
        while let Some(data) = fetched.try_next().await? {
            progress.advance(data.len() as u64);
            hasher.update(&data);
            out.write_all(&data)
                .with_context(|| format!("cannot write {}", partial.display()))?;
        }
        out.flush()
            .with_context(|| format!("cannot write {}", partial.display()))?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    if hasher.finalize().as_bytes().as_slice() != file.digest.as_slice() {
        let _ = std::fs::remove_file(&partial);
        bail!("{} does not match its digest after the pull", file.path);
    }
    if let Some(mode) = restored_mode(file.mode) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", partial.display()))?;
    }
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The mode a pulled file gets: its recorded permission bits, never setuid,
/// setgid or sticky (a pushed artifact must not hand whoever pulls it a program
/// that runs as its owner); `None` when no mode was recorded.
fn restored_mode(recorded: u32) -> Option<u32> {
    (recorded != 0).then_some(recorded & 0o777)
}

/// Chunk replicas by chunk id, as GetArtifact answers them.
pub type ChunkSources = std::collections::HashMap<Vec<u8>, Vec<ChunkTarget>>;

/// Fetches `file`'s chunks in order, [`FETCHES_IN_FLIGHT`] at a time, each
/// verified against its id (a replica that fails or sends bad bytes is skipped
/// for the next). The caller checks the file's digest at the end.
pub fn file_chunks(
    client: Arc<ClusterClient>,
    sources: Arc<ChunkSources>,
    file: &ArtifactFile,
) -> impl futures_util::Stream<Item = anyhow::Result<Vec<u8>>> + Send + 'static {
    // Owned ids: a closure over borrowed chunk refs makes this future fail the
    // higher-ranked `Send` check when a worker's spawned task awaits it.
    let ids: Vec<Vec<u8>> = file.chunks.iter().map(|c| c.id.clone()).collect();
    stream::iter(ids.into_iter().map(move |id| {
        let client = Arc::clone(&client);
        let sources = Arc::clone(&sources);
        async move {
            let chunk_id = ChunkId::from_slice(&id, "manifest")?;
            let replicas = sources.get(&id).cloned().unwrap_or_default();
            Ok::<_, anyhow::Error>(client.fetch_chunk(chunk_id, &replicas).await?)
        }
    }))
    .buffered(FETCHES_IN_FLIGHT)
}

/// What changed from one version to another.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct Diff {
    pub from: String,
    pub to: String,
    /// Bytes of the second version's distinct chunks that the first holds too.
    pub shared_bytes: u64,
    /// Bytes of the second version's distinct chunks that the first does not hold.
    pub new_bytes: u64,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
}

/// Compares two manifests.
pub fn diff_versions(a: &ArtifactVersion, b: &ArtifactVersion) -> Diff {
    let held: std::collections::HashSet<&[u8]> = a
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(|c| c.id.as_slice()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut diff = Diff {
        from: format!("{}@{}", a.name, a.version),
        to: format!("{}@{}", b.name, b.version),
        ..Diff::default()
    };
    for chunk in b.files.iter().flat_map(|f| f.chunks.iter()) {
        if !seen.insert(chunk.id.as_slice()) {
            continue;
        }
        if held.contains(chunk.id.as_slice()) {
            diff.shared_bytes += chunk.size;
        } else {
            diff.new_bytes += chunk.size;
        }
    }
    // A single file keeps its identity across versions whatever its name.
    let key = |v: &ArtifactVersion, f: &ArtifactFile| {
        if v.directory {
            f.path.clone()
        } else {
            String::new()
        }
    };
    let before: BTreeMap<String, &ArtifactFile> = a.files.iter().map(|f| (key(a, f), f)).collect();
    let after: BTreeMap<String, &ArtifactFile> = b.files.iter().map(|f| (key(b, f), f)).collect();
    for (path, file) in &after {
        match before.get(path) {
            None => diff.added.push(file.path.clone()),
            Some(old) if old.digest != file.digest => diff.changed.push(file.path.clone()),
            Some(_) => diff.unchanged += 1,
        }
    }
    for (path, file) in &before {
        if !after.contains_key(path) {
            diff.removed.push(file.path.clone());
        }
    }
    diff
}

/// Fetches two versions' manifests and compares them.
pub async fn diff(client: Arc<ClusterClient>, from: &str, to: &str) -> anyhow::Result<Diff> {
    let mut versions = Vec::new();
    for reference in [from, to] {
        let resp = get_artifact(&client, reference).await?;
        versions.push(resp.version.context("the coordinators sent no version")?);
    }
    Ok(diff_versions(&versions[0], &versions[1]))
}

/// Resolves `NAME[@REF]` to its manifest and chunk replicas.
async fn get_artifact(
    client: &ClusterClient,
    reference: &str,
) -> anyhow::Result<GetArtifactResponse> {
    let (name, selector) = parse_reference(reference)?;
    let request = GetArtifactRequest {
        name,
        reference: selector.to_string(),
    };
    Ok(client
        .call(|mut c| {
            let req = request.clone();
            async move { c.get_artifact(req).await.map(|r| r.into_inner()) }
        })
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulled_file_keeps_its_permission_bits_and_never_setuid() {
        assert_eq!(restored_mode(0o4755), Some(0o755), "setuid dropped");
        assert_eq!(restored_mode(0o2750), Some(0o750), "setgid dropped");
        assert_eq!(restored_mode(0o1777), Some(0o777), "sticky dropped");
        assert_eq!(restored_mode(0o640), Some(0o640));
        assert_eq!(restored_mode(0), None, "no mode recorded: the umask's");
    }

    fn file(path: &str, digest: u8, chunks: &[(u8, u64)]) -> ArtifactFile {
        ArtifactFile {
            path: path.into(),
            size: chunks.iter().map(|(_, s)| s).sum(),
            digest: vec![digest; 32],
            chunks: chunks
                .iter()
                .map(|(b, size)| ChunkRef {
                    id: vec![*b; 32],
                    size: *size,
                })
                .collect(),
            mode: 0,
        }
    }

    #[test]
    fn diffs_count_shared_and_new_bytes_and_files() {
        let a = ArtifactVersion {
            name: "d".into(),
            version: 1,
            directory: true,
            files: vec![
                file("same.csv", 1, &[(1, 100)]),
                file("edited.csv", 2, &[(2, 100), (3, 50)]),
                file("gone.csv", 3, &[(4, 10)]),
            ],
            ..Default::default()
        };
        let b = ArtifactVersion {
            name: "d".into(),
            version: 2,
            directory: true,
            files: vec![
                file("same.csv", 1, &[(1, 100)]),
                file("edited.csv", 9, &[(2, 100), (5, 70)]),
                file("new.csv", 4, &[(6, 30), (1, 100)]),
            ],
            ..Default::default()
        };
        let d = diff_versions(&a, &b);
        assert_eq!(d.shared_bytes, 200, "chunks 1 and 2, once each");
        assert_eq!(d.new_bytes, 100, "chunks 5 and 6");
        assert_eq!(d.added, vec!["new.csv"]);
        assert_eq!(d.removed, vec!["gone.csv"]);
        assert_eq!(d.changed, vec!["edited.csv"]);
        assert_eq!(d.unchanged, 1);
    }
}
