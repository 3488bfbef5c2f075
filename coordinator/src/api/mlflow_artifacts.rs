//! MLflow's artifact proxy (`mlflow server --serve-artifacts`) over kiln's artifact
//! store: `/api/2.0/mlflow-artifacts/artifacts/<path>` uploads (PUT), downloads
//! (GET), lists (GET with `?path=`) and deletes (DELETE) the files of runs and
//! logged models.
//!
//! A run's `artifact_uri` is `mlflow-artifacts:/<experiment>/<run>/artifacts`; a
//! logged model's is `mlflow-artifacts:/<experiment>/models/<model id>/artifacts`.
//! Each is a living tree (`state::trees`): `mlflow-run-<run>` or
//! `mlflow-model-<id>`, which `kiln artifact pull` reads like any artifact. A
//! registered version's frozen files are read (never written) at
//! `mlflow-artifacts:/registry/<model>/<version>` (see `registry`).
//!
//! ```text
//!  PUT body ─► pump (bounded frames) ─► reader thread: chunk, hash
//!           ─► transfer::upload: missing chunks to the workers, replicas recorded
//!           ─► PutTreeFile through Raft (one entry: the file's manifest)
//!  GET      ─► tree file ─► chunk replicas ─► transfer::file_chunks ─► body
//! ```
//!
//! The coordinator holds no bytes: it streams them between the client and the
//! workers, with at most a few chunk batches in memory whatever the file's size.
//! A PUT is answered once the file is replicated and its record committed, so a
//! retried PUT (MLflow retries on 5xx and timeouts) overwrites the same path with
//! the same bytes and adds nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use kiln_common::progress::Progress;
use kiln_common::transfer::{self, ChunkSources, Input, Source};
use kiln_common::Error;
use kiln_proto::v1::*;
use serde_json::{json, Value};

use super::grpc::{audited, Api};
use super::tracking::{bad, caller, caller_scoped, ApiError};
use crate::auth::{Caller, Permission, Scope};
use crate::state::artifacts::validate_path;
use crate::state::trees::{self, TreeOwner, MAX_DELETE_PATHS};

/// Largest file one PUT may carry.
pub const MAX_ARTIFACT_FILE_BYTES: u64 = 256 << 30;
/// Runs of body frames buffered between the HTTP connection and the chunker.
const BODY_RUNS_AHEAD: usize = 4;
/// Bytes of body frames handed to the chunker at once: a client writes 16 KiB at
/// a time, and waking the chunker's thread for each frame cost more than the
/// chunking.
const BODY_RUN_BYTES: usize = 1 << 20;

/// The artifact routes, to merge into the coordinator's HTTP router.
pub fn routes() -> Router<Api> {
    let base = "/api/2.0/mlflow-artifacts";
    Router::new()
        .route(&format!("{base}/artifacts"), get(list))
        .route(
            &format!("{base}/artifacts/*path"),
            get(download).put(upload).delete(remove),
        )
        .route(&format!("{base}/mpu/create/*path"), post(create_upload))
        .route(&format!("{base}/mpu/complete/*path"), post(complete_upload))
        .route(&format!("{base}/mpu/abort/*path"), post(abort_upload))
        .route(&format!("{base}/mpu/part/:upload/:part"), put(upload_part))
        // Bodies are streamed to the workers and bounded by MAX_ARTIFACT_FILE_BYTES.
        .layer(DefaultBodyLimit::disable())
}

/// What an artifact path's files belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Root {
    /// A run's or logged model's living tree, in an experiment.
    Tree { experiment: u64, owner: TreeOwner },
    /// A registered model version's frozen files (read only).
    Registry { model: String, version: u64 },
}

/// Where an artifact path points: a root and a path inside it (empty: the root).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    root: Root,
    path: String,
}

impl Location {
    /// Reads `<exp>/<run>/artifacts[/path]`, `<exp>/models/<id>/artifacts[/path]`
    /// or `registry/<model>/<version>[/path]`.
    fn parse(full: &str) -> Result<Location, ApiError> {
        let full = full.trim_matches('/');
        let parts: Vec<&str> = full.splitn(4, '/').collect();
        let (root, rest) = match parts.as_slice() {
            ["registry", model, version, rest @ ..] => {
                let version = version.parse().map_err(|_| unknown_path(full))?;
                let root = Root::Registry {
                    model: model.to_string(),
                    version,
                };
                (root, rest.first().copied().unwrap_or_default().to_string())
            }
            [exp, "models", id, rest @ ..] => {
                let rest = rest.first().copied().unwrap_or_default();
                let (top, path) = rest.split_once('/').unwrap_or((rest, ""));
                if top != "artifacts" {
                    return Err(unknown_path(full));
                }
                let root = Root::Tree {
                    experiment: exp.parse().map_err(|_| unknown_path(full))?,
                    owner: TreeOwner::Model(id.to_string()),
                };
                (root, path.to_string())
            }
            [exp, run, "artifacts", rest @ ..] => {
                let root = Root::Tree {
                    experiment: exp.parse().map_err(|_| unknown_path(full))?,
                    owner: TreeOwner::Run(run.to_string()),
                };
                (root, rest.first().copied().unwrap_or_default().to_string())
            }
            _ => return Err(unknown_path(full)),
        };
        if !rest.is_empty() {
            validate_path(&rest).map_err(bad)?;
        }
        Ok(Location { root, path: rest })
    }

    /// The tree this location writes to; a registry version is read only.
    fn tree(&self) -> Result<(u64, &TreeOwner), ApiError> {
        match &self.root {
            Root::Tree { experiment, owner } => Ok((*experiment, owner)),
            Root::Registry { model, version } => Err(bad(format!(
                "{model} version {version} is registered and cannot change; \
                 log the files to a run or a logged model and register a new version"
            ))),
        }
    }

    /// The run whose artifacts this is, if any (a job's own token may reach
    /// its run's).
    fn run(&self) -> &str {
        match &self.root {
            Root::Tree {
                owner: TreeOwner::Run(id),
                ..
            } => id,
            _ => "",
        }
    }

    /// The artifact path of this location's root, as MLflow names it.
    fn root_path(&self) -> String {
        match &self.root {
            Root::Tree {
                experiment,
                owner: TreeOwner::Run(id),
            } => format!("{experiment}/{id}/artifacts"),
            Root::Tree {
                experiment,
                owner: TreeOwner::Model(id),
            } => format!("{experiment}/models/{id}/artifacts"),
            Root::Registry { model, version } => format!("registry/{model}/{version}"),
        }
    }
}

/// The files under a location's path (all of them at the root), in path order.
fn files_under(api: &Api, at: &Location) -> Result<Vec<ArtifactFile>, ApiError> {
    match &at.root {
        Root::Tree { owner, .. } => Ok(api.tree_files(&owner.tree(), &at.path)?),
        Root::Registry { model, version } => {
            let prefix = if at.path.is_empty() {
                String::new()
            } else {
                format!("{}/", at.path)
            };
            Ok(registered_files(api, model, *version)?
                .into_iter()
                .filter(|f| f.path.starts_with(&prefix))
                .collect())
        }
    }
}

/// The file a location names, if it names one.
fn file_at(api: &Api, at: &Location) -> Result<Option<ArtifactFile>, ApiError> {
    let internal = |e: crate::raft::storage::StoreError| Error::Internal(e.to_string());
    match &at.root {
        Root::Tree { owner, .. } => Ok(crate::state::artifacts::read_record(
            &api.reader,
            &crate::state::keys::tree_file(&owner.tree(), &at.path),
            "decode tree file",
        )
        .map_err(internal)?),
        Root::Registry { model, version } => Ok(registered_files(api, model, *version)?
            .into_iter()
            .find(|f| f.path == at.path)),
    }
}

/// The files of a registered model version (none when it keeps none in kiln).
fn registered_files(api: &Api, model: &str, version: u64) -> Result<Vec<ArtifactFile>, ApiError> {
    let internal = |e: crate::raft::storage::StoreError| Error::Internal(e.to_string());
    let record = crate::state::models::read_model(&api.reader, model, version)
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError(
                "RESOURCE_DOES_NOT_EXIST",
                StatusCode::NOT_FOUND,
                format!("model version {model}/{version} does not exist"),
            )
        })?;
    if record.artifact.is_empty() {
        return Ok(Vec::new());
    }
    let (name, selector) =
        kiln_common::artifact::parse_reference(&record.artifact).map_err(ApiError::from)?;
    let kiln_common::artifact::Selector::Version(number) = selector else {
        return Err(Error::Internal(format!(
            "{model}@{version} names artifact {} without a version number",
            record.artifact
        ))
        .into());
    };
    Ok(
        crate::state::artifacts::read_version(&api.reader, &name, number)
            .map_err(internal)?
            .map(|v| v.files)
            .unwrap_or_default(),
    )
}

fn unknown_path(path: &str) -> ApiError {
    ApiError(
        "RESOURCE_DOES_NOT_EXIST",
        StatusCode::NOT_FOUND,
        format!(
            "'{path}' is not an artifact path of kiln: runs keep theirs under \
             <experiment>/<run>/artifacts, logged models under \
             <experiment>/models/<model id>/artifacts"
        ),
    )
}

/// Returns a run's artifact URI.
pub fn run_artifact_uri(experiment: u64, run_id: &str) -> String {
    format!("mlflow-artifacts:/{experiment}/{run_id}/artifacts")
}

/// Returns a logged model's artifact URI.
pub fn model_artifact_uri(experiment: u64, model_id: &str) -> String {
    format!("mlflow-artifacts:/{experiment}/models/{model_id}/artifacts")
}

/// Checks that the run or logged model exists and lives in the experiment named.
async fn check_owner(api: &Api, experiment: u64, owner: &TreeOwner) -> Result<(), ApiError> {
    api.read_barrier(false).await?;
    let internal = |e: crate::raft::storage::StoreError| Error::Internal(e.to_string());
    let found = match owner {
        TreeOwner::Run(id) => crate::state::artifacts::read_record::<RunRecord>(
            &api.reader,
            &crate::state::keys::run(id),
            "decode run",
        )
        .map_err(internal)?
        .map(|r| r.experiment_id),
        TreeOwner::Model(id) => trees::read_logged_model(&api.reader, id)
            .map_err(internal)?
            .map(|m| m.experiment_id),
    };
    match found {
        Some(e) if e == experiment => Ok(()),
        _ => Err(ApiError(
            "RESOURCE_DOES_NOT_EXIST",
            StatusCode::NOT_FOUND,
            match owner {
                TreeOwner::Run(id) => format!("run {id} does not exist in experiment {experiment}"),
                TreeOwner::Model(id) => {
                    format!("logged model {id} does not exist in experiment {experiment}")
                }
            },
        )),
    }
}

/// A blocking reader over an HTTP body that an async task pumps in runs of frames.
struct BodyReader {
    runs: tokio::sync::mpsc::Receiver<std::io::Result<Vec<Bytes>>>,
    run: std::vec::IntoIter<Bytes>,
    current: Bytes,
}

impl std::io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if let Some(frame) = self.run.next() {
                self.current = frame;
                continue;
            }
            match self.runs.blocking_recv() {
                Some(Ok(run)) => self.run = run.into_iter(),
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Feeds `body` to a [`BodyReader`] in runs of about [`BODY_RUN_BYTES`], refusing
/// more than `limit` bytes.
fn pump(body: Body, limit: u64) -> BodyReader {
    let (tx, rx) = tokio::sync::mpsc::channel(BODY_RUNS_AHEAD);
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        let mut seen = 0u64;
        let mut run = Vec::new();
        let mut run_bytes = 0usize;
        loop {
            let frame = stream.next().await;
            let end = match frame {
                None => true,
                Some(Ok(bytes)) => {
                    seen += bytes.len() as u64;
                    if seen > limit {
                        let e =
                            std::io::Error::other(format!("the file is larger than {limit} bytes"));
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    run_bytes += bytes.len();
                    run.push(bytes);
                    false
                }
                Some(Err(e)) => {
                    let e = std::io::Error::other(format!("the request body broke off: {e}"));
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if (end && !run.is_empty()) || run_bytes >= BODY_RUN_BYTES {
                run_bytes = 0;
                if tx.send(Ok(std::mem::take(&mut run))).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    BodyReader {
        runs: rx,
        run: Vec::new().into_iter(),
        current: Bytes::new(),
    }
}

async fn upload(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(full): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let caller = caller_on_path(&api, &headers, "mlflow-artifacts/upload", &full)?;
    let at = Location::parse(&full)?;
    let (experiment, owner) = at.tree()?;
    if at.path.is_empty() {
        return Err(bad(format!(
            "'{full}' names the artifact root; upload to a file under it"
        )));
    }
    check_owner(&api, experiment, owner).await?;
    let input = Input::Stream(Box::new(pump(body, MAX_ARTIFACT_FILE_BYTES)));
    let file = store_file(&api, &at.path, input).await?;
    put_tree_file(&api, &caller, &owner.tree(), file).await?;
    Ok(Json(json!({})))
}

/// Chunks `input` and stores its chunks on the workers; returns its manifest entry.
async fn store_file(api: &Api, path: &str, input: Input) -> Result<ArtifactFile, ApiError> {
    let mut progress = Progress::quiet(path, 0);
    let source = Source {
        input,
        path: path.to_string(),
        mode: 0,
    };
    let uploaded = transfer::upload(Arc::clone(&api.peers), vec![source], 0, &mut progress)
        .await
        .map_err(|e| {
            let message = format!("{e:#}");
            if message.contains("larger than") || message.contains("broke off") {
                bad(message)
            } else {
                ApiError(
                    "TEMPORARILY_UNAVAILABLE",
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("store {path}: {message}"),
                )
            }
        })?;
    uploaded
        .files
        .into_iter()
        .next()
        .ok_or_else(|| Error::Internal(format!("the upload of {path} made no file")).into())
}

/// Commits a stored file into its tree.
async fn put_tree_file(
    api: &Api,
    caller: &Caller,
    tree: &str,
    file: ArtifactFile,
) -> Result<(), ApiError> {
    let what = format!("put {} ({} bytes) into {tree}", file.path, file.size);
    let kind = command::Kind::PutTreeFile(PutTreeFile {
        tree: tree.to_string(),
        file: Some(file),
        placements: Vec::new(),
        replicas: 0,
    });
    // Putting the same file at the same path twice changes nothing more.
    propose_patiently(api, caller, what, kind).await?;
    Ok(())
}

async fn download(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(full): Path<String>,
) -> Result<Response, ApiError> {
    let at = Location::parse(&full);
    let run = at.as_ref().map_or("", |at| at.run());
    caller_scoped(
        &api,
        &headers,
        Permission::Read,
        "mlflow-artifacts/download",
        Scope::Run(run),
    )?;
    let at = at?;
    api.read_barrier(false).await?;
    let file = file_at(&api, &at)?.ok_or_else(|| {
        ApiError(
            "RESOURCE_DOES_NOT_EXIST",
            StatusCode::NOT_FOUND,
            format!("{}/{} is not a file", at.root_path(), at.path),
        )
    })?;
    let sources: ChunkSources = api
        .chunk_sources(std::slice::from_ref(&file))?
        .into_iter()
        .map(|s| (s.id, s.replicas))
        .collect();
    let size = file.size;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(verified(&api, Arc::new(sources), file)),
    )
        .into_response())
}

/// The file's bytes, chunk by chunk; the stream fails (and the client sees a
/// short body) if a chunk cannot be read or the whole does not match its digest.
fn verified(
    api: &Api,
    sources: Arc<ChunkSources>,
    file: ArtifactFile,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let chunks = transfer::file_chunks(Arc::clone(&api.peers), sources, &file);
    let digest = file.digest.clone();
    let path = file.path.clone();
    futures_util::stream::unfold(
        (Box::pin(chunks), blake3::Hasher::new(), false),
        move |(mut chunks, mut hasher, done)| {
            let (digest, path) = (digest.clone(), path.clone());
            async move {
                if done {
                    return None;
                }
                match chunks.next().await {
                    Some(Ok(data)) => {
                        hasher.update(&data);
                        Some((Ok(Bytes::from(data)), (chunks, hasher, false)))
                    }
                    Some(Err(e)) => {
                        tracing::warn!(file = %path, error = %e, "read an artifact's chunks");
                        Some((
                            Err(std::io::Error::other(e.to_string())),
                            (chunks, hasher, true),
                        ))
                    }
                    None if hasher.finalize().as_bytes().as_slice() != digest.as_slice() => {
                        tracing::error!(file = %path, "an artifact does not match its digest");
                        Some((
                            Err(std::io::Error::other(format!(
                                "{path} does not match its digest"
                            ))),
                            (chunks, hasher, true),
                        ))
                    }
                    None => None,
                }
            }
        },
    )
}

async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let asked = q.get("path").map(|p| Location::parse(p));
    let run = match &asked {
        Some(Ok(at)) => at.run(),
        _ => "",
    };
    caller_scoped(
        &api,
        &headers,
        Permission::Read,
        "mlflow-artifacts/list",
        Scope::Run(run),
    )?;
    let Some(full) = q.get("path").filter(|p| !p.trim_matches('/').is_empty()) else {
        // The proxy's root holds experiments, which kiln does not list as files.
        return Ok(Json(json!({})));
    };
    let at = match Location::parse(full) {
        Ok(at) => at,
        // Above a tree's root (an experiment's folder): nothing to list.
        Err(_) => return Ok(Json(json!({}))),
    };
    api.read_barrier(false).await?;
    Ok(Json(listing(&api, &at)?))
}

/// The direct children of a directory in a tree: `{"files": [...]}`, or `{}` when
/// the path is a file or holds nothing (MLflow's client reads both so).
fn listing(api: &Api, at: &Location) -> Result<Value, ApiError> {
    let files = files_under(api, at)?;
    // Sorted children: files with their size, directories once.
    let mut children: BTreeMap<String, Option<u64>> = BTreeMap::new();
    let skip = if at.path.is_empty() {
        0
    } else {
        at.path.len() + 1
    };
    for file in &files {
        let Some(rest) = file.path.get(skip..) else {
            continue;
        };
        match rest.split_once('/') {
            Some((dir, _)) => {
                children.entry(dir.to_string()).or_insert(None);
            }
            None => {
                children.insert(rest.to_string(), Some(file.size));
            }
        }
    }
    if children.is_empty() {
        return Ok(json!({}));
    }
    let files: Vec<Value> = children
        .into_iter()
        .map(|(name, size)| match size {
            Some(size) => json!({"path": name, "is_dir": false, "file_size": size}),
            None => json!({"path": name, "is_dir": true}),
        })
        .collect();
    Ok(json!({ "files": files }))
}

async fn remove(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(full): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = caller(&api, &headers, Permission::Write, "mlflow-artifacts/delete")?;
    let at = Location::parse(&full)?;
    let tree = at.tree()?.1.tree();
    api.read_barrier(false).await?;
    // The path is a file, or a directory whose files all go.
    let mut paths: Vec<String> = files_under(&api, &at)?
        .into_iter()
        .map(|f| f.path)
        .collect();
    if !at.path.is_empty() && file_at(&api, &at)?.is_some() {
        paths.push(at.path.clone());
    }
    if paths.is_empty() {
        return Err(ApiError(
            "RESOURCE_DOES_NOT_EXIST",
            StatusCode::NOT_FOUND,
            format!("{}/{} holds no artifact", at.root_path(), at.path),
        ));
    }
    delete_tree_paths(&api, &caller, &tree, paths).await?;
    Ok(Json(json!({})))
}

/// Removes `paths` from `tree`, [`MAX_DELETE_PATHS`] per Raft entry.
pub(super) async fn delete_tree_paths(
    api: &Api,
    caller: &Caller,
    tree: &str,
    paths: Vec<String>,
) -> Result<(), ApiError> {
    for part in paths.chunks(MAX_DELETE_PATHS) {
        let what = format!("delete {} file(s) from {tree}", part.len());
        let kind = command::Kind::DeleteTreeFiles(DeleteTreeFiles {
            tree: tree.to_string(),
            paths: part.to_vec(),
        });
        api.propose(audited(caller, what, kind), false).await?;
    }
    Ok(())
}

/// How long an upload keeps retrying a write while the coordinators elect a leader.
const WRITE_PATIENCE: Duration = Duration::from_secs(30);
/// First pause between those retries; doubles up to a second.
const WRITE_BACKOFF: Duration = Duration::from_millis(100);

/// Proposes an idempotent command, retrying while no leader answers (a leader
/// killed during an upload): the client's part PUTs are not retried by MLflow's
/// client, so the part must ride out an election here.
async fn propose_patiently(
    api: &Api,
    caller: &Caller,
    what: String,
    kind: command::Kind,
) -> Result<u64, ApiError> {
    let started = Instant::now();
    let mut pause = WRITE_BACKOFF;
    loop {
        match api
            .propose(audited(caller, what.clone(), kind.clone()), false)
            .await
        {
            Ok(result) => return Ok(result.value),
            Err(e)
                if (e.is_retryable() || matches!(e, Error::Timeout(_)))
                    && started.elapsed() < WRITE_PATIENCE =>
            {
                tracing::info!(error = %e, what = %what, "no leader took an upload's write; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The caller of a write under the artifact path `full`: a command job's own
/// token may write under its run's root.
fn caller_on_path(
    api: &Api,
    headers: &HeaderMap,
    what: &str,
    full: &str,
) -> Result<Caller, ApiError> {
    let at = Location::parse(full);
    let run = at.as_ref().map_or("", |at| at.run());
    caller_scoped(api, headers, Permission::Write, what, Scope::Run(run))
}

/// Where a multipart upload's file goes: `<root>[/<dir>]` plus the base name of
/// the client's local path.
fn upload_target(full: &str, v: &Value) -> Result<(Location, String), ApiError> {
    let at = Location::parse(full)?;
    at.tree()?;
    let local = super::tracking::text(v, "path")?;
    let name = local
        .rsplit(['/', '\\'])
        .next()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad(format!("'{local}' names no file")))?;
    let path = if at.path.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", at.path)
    };
    validate_path(&path).map_err(bad)?;
    Ok((at, path))
}

async fn create_upload(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(full): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = caller_on_path(&api, &headers, "mlflow-artifacts/mpu/create", &full)?;
    let v = super::tracking::body(&raw)?;
    let (at, path) = upload_target(&full, &v)?;
    let (experiment, owner) = at.tree()?;
    let num_parts = match super::tracking::int(&v, "num_parts")? {
        Some(n) if n >= 1 && n <= i64::from(trees::MAX_UPLOAD_PARTS) => n as u32,
        other => {
            return Err(bad(format!(
                "num_parts must be 1 to {}, not {}",
                trees::MAX_UPLOAD_PARTS,
                other.map_or("nothing".to_string(), |n| n.to_string())
            )))
        }
    };
    check_owner(&api, experiment, owner).await?;
    let upload_id = format!("{:032x}", rand::random::<u128>());
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let upload = UploadRecord {
        upload_id: upload_id.clone(),
        tree: owner.tree(),
        path: path.clone(),
        secret_digest: blake3::hash(secret.as_bytes()).as_bytes().to_vec(),
        num_parts,
        ..Default::default()
    };
    let what = format!(
        "start uploading {path} into {} in {num_parts} parts",
        owner.tree()
    );
    let kind = command::Kind::StartUpload(StartUpload {
        upload: Some(upload),
    });
    api.propose(audited(&caller, what, kind), false).await?;
    // The parts come back here, to the address the client used, without its
    // credentials: the URL carries the upload's secret instead.
    let scheme = if api.tls_enabled { "https" } else { "http" };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| api.http_addr.clone(), str::to_string);
    let credentials: Vec<Value> = (1..=num_parts)
        .map(|part| {
            json!({
                "url": format!(
                    "{scheme}://{host}/api/2.0/mlflow-artifacts/mpu/part/{upload_id}/{part}?secret={secret}"
                ),
                "part_number": part,
                "headers": {},
            })
        })
        .collect();
    Ok(Json(
        json!({"upload_id": upload_id, "credentials": credentials}),
    ))
}

/// Returns the upload a part's URL names, once its secret is checked.
async fn open_upload(
    api: &Api,
    upload_id: &str,
    secret: Option<&String>,
) -> Result<UploadRecord, ApiError> {
    api.read_barrier(false).await?;
    let upload = trees::read_upload(&api.reader, upload_id)
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError(
                "RESOURCE_DOES_NOT_EXIST",
                StatusCode::NOT_FOUND,
                format!("upload {upload_id} does not exist (completed or aborted)"),
            )
        })?;
    let given = secret.map(|s| blake3::hash(s.as_bytes()));
    if given.is_none_or(|g| g.as_bytes().as_slice() != upload.secret_digest.as_slice()) {
        return Err(ApiError(
            "PERMISSION_DENIED",
            StatusCode::FORBIDDEN,
            format!("the URL does not carry upload {upload_id}'s secret"),
        ));
    }
    Ok(upload)
}

async fn upload_part(
    State(api): State<Api>,
    Path((upload_id, part)): Path<(String, u32)>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, ApiError> {
    let upload = open_upload(&api, &upload_id, q.get("secret")).await?;
    if part == 0 || part > upload.num_parts {
        return Err(bad(format!(
            "part {part} of an upload of {} parts",
            upload.num_parts
        )));
    }
    let input = Input::Stream(Box::new(pump(body, MAX_ARTIFACT_FILE_BYTES)));
    let stored = store_file(&api, &format!("{}#{part}", upload.path), input).await?;
    let etag = hex::encode(&stored.digest);
    let caller = Caller::Node;
    let what = format!("store part {part} of upload {upload_id}");
    let kind = command::Kind::PutUploadPart(PutUploadPart {
        upload_id,
        part_number: part,
        part: Some(ArtifactFile {
            path: String::new(),
            ..stored
        }),
    });
    propose_patiently(&api, &caller, what, kind).await?;
    Ok(([(header::ETAG, format!("\"{etag}\""))], Json(json!({}))).into_response())
}

async fn complete_upload(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(full): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = caller_on_path(&api, &headers, "mlflow-artifacts/mpu/complete", &full)?;
    let v = super::tracking::body(&raw)?;
    let (at, path) = upload_target(&full, &v)?;
    let upload_id = super::tracking::text(&v, "upload_id")?.to_string();
    let listed = match v.get("parts") {
        Some(Value::Array(items)) => items.clone(),
        _ => return Err(bad("'parts' must list {part_number, etag}")),
    };
    api.read_barrier(false).await?;
    let tree = at.tree()?.1.tree();
    let Some(upload) =
        trees::read_upload(&api.reader, &upload_id).map_err(|e| Error::Internal(e.to_string()))?
    else {
        // A retried complete whose first attempt went through finds the file.
        if let Some(file) = file_at(
            &api,
            &Location {
                path: path.clone(),
                ..at.clone()
            },
        )? {
            tracing::info!(upload = %upload_id, file = %file.path, "upload already complete");
            return Ok(Json(json!({})));
        }
        return Err(ApiError(
            "RESOURCE_DOES_NOT_EXIST",
            StatusCode::NOT_FOUND,
            format!("upload {upload_id} does not exist (completed or aborted)"),
        ));
    };
    if upload.tree != tree || upload.path != path {
        return Err(bad(format!(
            "upload {upload_id} is for {} in {}, not {path} in {tree}",
            upload.path, upload.tree
        )));
    }
    // The parts as the client lists them, each checked against what was stored.
    let mut parts = Vec::with_capacity(listed.len());
    let mut files = Vec::with_capacity(listed.len());
    for item in &listed {
        let number = super::tracking::int(item, "part_number")?
            .filter(|n| *n >= 1 && *n <= i64::from(upload.num_parts))
            .ok_or_else(|| bad("a part needs a part_number within the upload"))?
            as u32;
        let stored: ArtifactFile = crate::state::artifacts::read_record(
            &api.reader,
            &crate::state::keys::upload_part(&upload_id, number),
            "decode upload part",
        )
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| {
            bad(format!(
                "part {number} of upload {upload_id} was never stored"
            ))
        })?;
        let etag = super::tracking::opt_text(item, "etag");
        if !etag.is_empty() && etag.trim_matches('"') != hex::encode(&stored.digest) {
            return Err(bad(format!(
                "part {number}'s etag {etag} is not the stored part's; upload it again"
            )));
        }
        parts.push(number);
        files.push(stored);
    }
    // The whole file's digest, read back from the workers: parts may have come
    // in any order, so nobody has hashed the file from start to end.
    let whole = ArtifactFile {
        path: path.clone(),
        size: files.iter().map(|f| f.size).sum(),
        chunks: files.into_iter().flat_map(|f| f.chunks).collect(),
        ..Default::default()
    };
    let digest = digest_of(&api, &whole).await?;
    let what = format!("complete upload {upload_id} of {path} into {tree}");
    let kind = command::Kind::FinishUpload(FinishUpload {
        upload_id: upload_id.clone(),
        parts,
        digest: digest.clone(),
        abort: false,
    });
    match propose_patiently(&api, &caller, what, kind).await {
        Ok(_) => Ok(Json(json!({}))),
        // Applied by an attempt whose answer was lost: the file is there, whole.
        Err(e) if e.0 == "RESOURCE_DOES_NOT_EXIST" => {
            match file_at(&api, &Location { path, ..at })? {
                Some(file) if file.digest == digest => Ok(Json(json!({}))),
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// BLAKE3 of a stored file's bytes, read chunk by chunk from the workers.
async fn digest_of(api: &Api, file: &ArtifactFile) -> Result<Vec<u8>, ApiError> {
    let sources: ChunkSources = api
        .chunk_sources(std::slice::from_ref(file))?
        .into_iter()
        .map(|s| (s.id, s.replicas))
        .collect();
    let mut chunks = std::pin::pin!(transfer::file_chunks(
        Arc::clone(&api.peers),
        Arc::new(sources),
        file
    ));
    let mut hasher = blake3::Hasher::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError(
                "TEMPORARILY_UNAVAILABLE",
                StatusCode::SERVICE_UNAVAILABLE,
                format!("read back {}: {e:#}", file.path),
            )
        })?;
        hasher.update(&chunk);
    }
    Ok(hasher.finalize().as_bytes().to_vec())
}

async fn abort_upload(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(full): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = caller_on_path(&api, &headers, "mlflow-artifacts/mpu/abort", &full)?;
    let v = super::tracking::body(&raw)?;
    upload_target(&full, &v)?;
    let upload_id = super::tracking::text(&v, "upload_id")?.to_string();
    let what = format!("abort upload {upload_id}");
    let kind = command::Kind::FinishUpload(FinishUpload {
        upload_id,
        abort: true,
        ..Default::default()
    });
    propose_patiently(&api, &caller, what, kind).await?;
    Ok(Json(json!({})))
}

impl Api {
    /// Lists a run's or logged model's files for `kiln runs show` (path, size and
    /// digest; no chunks).
    pub fn tree_listing(&self, owner: &TreeOwner) -> kiln_common::Result<Vec<ArtifactFile>> {
        Ok(self
            .tree_files(&owner.tree(), "")?
            .into_iter()
            .map(|f| ArtifactFile {
                chunks: Vec::new(),
                ..f
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn artifact_paths_name_a_run_or_a_logged_model_and_a_file() {
        let run = "0123456789abcdef0123456789abcdef";
        let at = Location::parse(&format!("3/{run}/artifacts/plots/loss.png")).expect("run path");
        assert_eq!(at.tree().expect("a tree"), (3, &TreeOwner::Run(run.into())));
        assert_eq!(at.path, "plots/loss.png");
        assert_eq!(at.root_path(), format!("3/{run}/artifacts"));

        let root = Location::parse(&format!("3/{run}/artifacts")).expect("run root");
        assert_eq!(root.path, "");

        let model =
            Location::parse("0/models/m-0123456789abcdef0123456789abcdef/artifacts/MLmodel")
                .expect("model path");
        let (_, owner) = model.tree().expect("a tree");
        assert_eq!(
            owner.tree(),
            "mlflow-model-m-0123456789abcdef0123456789abcdef"
        );
        assert_eq!(model.path, "MLmodel");

        let registered = Location::parse("registry/iris/3/model.onnx").expect("registry path");
        assert_eq!(
            registered.root,
            Root::Registry {
                model: "iris".into(),
                version: 3
            }
        );
        assert_eq!(registered.path, "model.onnx");
        let refused = registered
            .tree()
            .expect_err("a registered version is read only");
        assert!(refused.2.contains("cannot change"), "{}", refused.2);

        for wrong in [
            "",
            "3",
            "3/run",
            "x/run/artifacts/a",
            "3/run/other/a",
            "3/models/m-1/other/a",
            "3/run/artifacts/../escape",
            "3/run/artifacts/a//b",
            "registry/iris/x/model.onnx",
        ] {
            assert!(Location::parse(wrong).is_err(), "{wrong} should be refused");
        }
    }

    #[tokio::test]
    async fn a_pumped_body_reads_back_whole_and_a_body_over_the_limit_is_an_error() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let reader = pump(Body::from(data.clone()), 1 << 20);
        let back = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        })
        .await
        .expect("join");
        assert_eq!(back.expect("read"), data);

        let reader = pump(Body::from(data), 1000);
        let err = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            let mut out = Vec::new();
            reader.read_to_end(&mut out)
        })
        .await
        .expect("join")
        .expect_err("over the limit");
        assert!(err.to_string().contains("larger than 1000 bytes"), "{err}");
    }
}
