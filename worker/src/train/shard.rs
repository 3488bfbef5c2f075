//! One shard of a data-parallel training job, from its task to its last report.
//!
//! ```text
//!  bind data port ─► report Ready ─► pull dataset ─► model (seeded) ─► resume?
//!        ─► report the data address
//!        ─► rendezvous: GetJob until every rank of this attempt has an address
//!        ─► Ring::connect ─► steps ─► (rank 0) checkpoints, final checkpoint
//!        ─► report Succeeded                       any error ─► report Failed(why)
//! ```
//!
//! Every rank holds the whole (small, tabular) dataset and the same seeded
//! permutation of its rows for each epoch. A step takes the next `batch_size`
//! rows of the permutation (the global batch); rank r trains on its contiguous
//! share of them ([`partition`]), computes the gradient of its rows' summed loss
//! scaled by 1 / global batch, and the ring sums the shards' gradients. The sum
//! is the gradient of the global batch's mean loss, whatever the world size, so
//! a 2-shard job follows a 1-shard job's trajectory up to float reduction order.
//! The shards' loss sums and correct counts travel in the same all-reduce (two
//! values after the gradient), so every rank knows the global figures.
//!
//! Standardisation statistics come from the whole table, computed the same way
//! on every rank (f64 sums in row order), so every shard scales alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_common::client::ClusterClient;
use kiln_common::jobspec::{
    Builtin, DataFormat, JobSpec, ModelKind, Workload, MAX_REPORT_LOG_LINES,
};
use kiln_common::reference::ReferenceStats;
use kiln_proto::v1::{
    GetJobRequest, JobProgress, JobState, MetricPoint, ModelVersion, RegisterModelRequest,
    ReportShard, ReportShardRequest, ShardState, ShardTask, TensorSpec,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::arch::{Arch, Task};
use super::checkpoint::{self, Checkpoint};
use super::command;
use super::data::{self, partition, Dataset, Standardizer, Target};
use super::model::{Batch, Engine, Model};
use super::onnx::{self, ExportMeta};
use super::optim::Optimizer;
use crate::collective::communicator::{nccl_wanted, new_nccl_id};
use crate::collective::{Backend, Collective, NcclConfig, Ring, RingConfig, RingKey};
use kiln_common::transfer::{self, PushOptions};

/// Longest wait for every rank of an attempt to report its data address, which
/// it does after loading its data: a slow loader may take minutes, while a dead
/// rank's attempt is failed by the leader on its worker's lease long before.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);
/// Pause between two looks at the job during rendezvous.
const RENDEZVOUS_POLL: Duration = Duration::from_millis(200);
/// Time between two progress reports of rank 0.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What a shard needs from its worker.
#[derive(Clone)]
pub struct ShardContext {
    pub client: Arc<ClusterClient>,
    pub worker_id: String,
    /// Scratch space for datasets and checkpoints; each shard uses its own
    /// directory under it and removes it when done.
    pub work_dir: PathBuf,
    /// The host the data port binds to and peers dial.
    pub bind_host: String,
    /// The cluster CA's file (a command job's MLflow client trusts it); `None`
    /// without TLS.
    pub ca: Option<PathBuf>,
    /// How ranks of command jobs are held to their memory.
    pub memory_limits: Arc<super::limits::MemoryLimits>,
    /// This worker's MLflow tracking URI, which passes calls to a live
    /// coordinator (`crate::tracking_proxy`).
    pub tracking_uri: String,
}

/// How a shard ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Cancelled, or its attempt is over (the gang restarts elsewhere).
    Stopped,
    /// It failed and reported why.
    Failed,
}

pub(super) type ShardResult<T> = Result<T, String>;

/// Reports to the coordinators on behalf of one shard.
pub(super) struct Reporter {
    client: Arc<ClusterClient>,
    task: ShardTask,
    log: Vec<String>,
}

impl Reporter {
    pub(super) fn log(&mut self, line: String) {
        tracing::info!(job = self.task.job_id, rank = self.task.rank, "{line}");
        self.log.push(line);
    }

    /// Queues a line of a rank's own output for the job's log (the worker's
    /// log does not repeat it).
    pub(super) fn forward(&mut self, line: String) {
        self.log.push(line);
    }

    /// Whether log lines wait to be sent.
    pub(super) fn pending(&self) -> bool {
        !self.log.is_empty()
    }

    /// Whether more log lines wait than one report carries.
    pub(super) fn backlog(&self) -> bool {
        self.log.len() > MAX_REPORT_LOG_LINES
    }

    /// Sends a report with the pending log lines (at most as many as one report
    /// carries; the rest go with the next); returns whether to keep running.
    pub(super) async fn send(&mut self, mut report: ReportShard) -> ShardResult<bool> {
        report.job_id = self.task.job_id;
        report.attempt = self.task.attempt;
        report.rank = self.task.rank;
        let rest = self.log.split_off(self.log.len().min(MAX_REPORT_LOG_LINES));
        report.log = std::mem::replace(&mut self.log, rest);
        let request = ReportShardRequest {
            report: Some(report),
        };
        self.client
            .call(|mut c| {
                let request = request.clone();
                async move { c.report_shard(request).await.map(|r| r.into_inner()) }
            })
            .await
            .map(|r| r.keep_running)
            .map_err(|e| format!("report to the coordinators: {e}"))
    }

    pub(super) async fn state(&mut self, state: ShardState) -> ShardResult<bool> {
        self.send(ReportShard {
            state: state as i32,
            ..Default::default()
        })
        .await
    }
}

/// Runs one shard to its end and reports how it ended; never returns an error:
/// a failure is reported (the coordinators restart the gang).
/// `cancel` stops it quietly; `lapse` stops it with a failure report (the
/// worker's lease lapsed: the gang must be placed again).
pub async fn run(
    ctx: ShardContext,
    task: ShardTask,
    spec: Result<JobSpec, String>,
    cancel: CancellationToken,
    lapse: CancellationToken,
) -> Outcome {
    let dir = ctx.work_dir.join(format!(
        "job{}-a{}-r{}",
        task.job_id, task.attempt, task.rank
    ));
    let mut reporter = Reporter {
        client: Arc::clone(&ctx.client),
        task: task.clone(),
        log: Vec::new(),
    };
    let result = match spec {
        Err(e) => Err(e),
        Ok(spec) => match &spec.workload {
            Workload::Builtin(builtin) => tokio::select! {
                r = train(&ctx, &task, &spec, builtin, &dir, &mut reporter) => r,
                _ = cancel.cancelled() => Ok(Outcome::Stopped),
                _ = lapse.cancelled() => Err(command::LAPSED.to_string()),
            },
            // A program stops in its own time: its grace, then SIGKILL.
            Workload::Command(job) => {
                command::run(
                    &ctx,
                    &task,
                    &spec,
                    job,
                    &dir,
                    &mut reporter,
                    &cancel,
                    &lapse,
                )
                .await
            }
        },
    };
    // A staged dataset is read-only.
    let cleanup = dir.clone();
    let _ = tokio::task::spawn_blocking(move || command::make_writable(&cleanup)).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    match result {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::warn!(job = task.job_id, rank = task.rank, %error, "shard failed");
            let report = ReportShard {
                state: ShardState::Failed as i32,
                error,
                ..Default::default()
            };
            // The lines before the failure first, then the failure with the rest.
            while reporter.backlog() {
                if reporter.send(ReportShard::default()).await.is_err() {
                    break;
                }
            }
            if let Err(e) = reporter.send(report).await {
                tracing::warn!(job = task.job_id, error = %e, "report a failed shard");
            }
            Outcome::Failed
        }
    }
}

/// Reads the dataset version the spec names into memory.
async fn load_dataset(ctx: &ShardContext, spec: &Builtin, dir: &Path) -> ShardResult<Dataset> {
    let reference = format!("{}@{}", spec.data.artifact, spec.data.version);
    let out = dir.join("data");
    let pulled = pull(Arc::clone(&ctx.client), reference.clone(), out)
        .await
        .map_err(|e| format!("pull the dataset {reference}: {e:#}"))?;
    let files = data_files(&pulled.path, spec).map_err(|e| format!("dataset {reference}: {e}"))?;
    if files.is_empty() {
        return Err(format!(
            "dataset {reference} holds no {} file",
            spec.data.format.extension()
        ));
    }
    let label = spec.data.label.clone();
    let features = spec.data.features.clone();
    let format = spec.data.format;
    let root = pulled.path.clone();
    // Every file in path order, one table: a dataset may be split in parts. Each
    // file is read from disk as the table reaches it.
    tokio::task::spawn_blocking(move || {
        let sources = files.into_iter().map(|path| {
            let bytes = bytes::Bytes::from(
                std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?,
            );
            let name = path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .display()
                .to_string();
            Ok((
                name,
                match format {
                    DataFormat::Csv => data::Source::Csv(bytes),
                    DataFormat::Parquet => data::Source::Parquet(bytes),
                },
            ))
        });
        data::read_tables(sources, &label, &features)
            .map_err(|e| format!("dataset {reference}: {e}"))
    })
    .await
    .map_err(|e| format!("read the dataset: {e}"))?
}

/// A boxed future that is `Send` (the transfer futures' closures otherwise trip
/// the compiler's higher-ranked `Send` check when awaited inside a spawned task).
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Pulls `reference` quietly into `out`.
pub(super) fn pull(
    client: Arc<ClusterClient>,
    reference: String,
    out: PathBuf,
) -> BoxFuture<'static, anyhow::Result<transfer::PullReport>> {
    Box::pin(async move { transfer::pull(client, &reference, &out, true).await })
}

/// Pushes the file or directory `path` quietly as a new version.
pub(super) fn push(
    client: Arc<ClusterClient>,
    path: PathBuf,
    options: PushOptions,
) -> BoxFuture<'static, anyhow::Result<transfer::PushReport>> {
    Box::pin(async move { transfer::push(client, &path, options).await })
}

/// The files of a pulled dataset the trainer reads.
fn data_files(root: &Path, spec: &Builtin) -> Result<Vec<PathBuf>, String> {
    if root.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut all = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                all.push(rel.to_string_lossy().to_string());
            }
        }
    }
    let names: Vec<&str> = all.iter().map(String::as_str).collect();
    Ok(spec
        .data
        .files(&names)
        .into_iter()
        .map(|p| root.join(p))
        .collect())
}

/// The network a spec and a dataset call for.
pub fn arch_of(spec: &Builtin, dataset: &Dataset) -> Arch {
    Arch {
        inputs: dataset.features.len(),
        hidden: match spec.model.kind {
            ModelKind::Linear => Vec::new(),
            ModelKind::Mlp => spec.model.hidden.iter().map(|h| *h as usize).collect(),
        },
        activation: spec.model.activation,
        task: match &dataset.target {
            Target::Classes { names, .. } => Task::Classification {
                classes: names.clone(),
            },
            Target::Values(_) => Task::Regression,
        },
    }
}

/// Where the ranks of an attempt meet: every rank's data address, and rank 0's
/// NCCL id when the gang uses GPUs.
pub(super) struct Meeting {
    pub addrs: Vec<String>,
    /// The worker of each rank.
    pub workers: Vec<String>,
    nccl_id: Vec<u8>,
}

/// Waits (at most `timeout`) until every rank of this attempt has reported its
/// data address (rank 0 reports its NCCL id in the same report); `None` when
/// the attempt is over.
pub(super) async fn rendezvous(
    ctx: &ShardContext,
    task: &ShardTask,
    timeout: Duration,
) -> ShardResult<Option<Meeting>> {
    let deadline = Instant::now() + timeout;
    loop {
        let request = GetJobRequest {
            job_id: task.job_id,
        };
        let job = ctx
            .client
            .call(|mut c| async move { c.get_job(request).await.map(|r| r.into_inner()) })
            .await
            .map_err(|e| format!("rendezvous: read job {}: {e}", task.job_id))?
            .job
            .ok_or("rendezvous: the coordinators sent no job")?;
        if job.attempt != task.attempt || job.state != JobState::Running as i32 {
            return Ok(None);
        }
        let mut addrs = vec![String::new(); job.shards.len()];
        let mut workers = vec![String::new(); job.shards.len()];
        for shard in &job.shards {
            if let Some(slot) = addrs.get_mut(shard.rank as usize) {
                slot.clone_from(&shard.data_addr);
                workers[shard.rank as usize].clone_from(&shard.worker_id);
            }
        }
        if addrs.iter().all(|a| !a.is_empty()) && addrs.len() == task.world as usize {
            return Ok(Some(Meeting {
                addrs,
                workers,
                nccl_id: job.nccl_id,
            }));
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = addrs
                .iter()
                .enumerate()
                .filter(|(_, a)| a.is_empty())
                .map(|(r, _)| r.to_string())
                .collect();
            return Err(format!(
                "rendezvous: rank(s) {} did not report within {} s",
                missing.join(", "),
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(RENDEZVOUS_POLL).await;
    }
}

/// Pulls a checkpoint artifact and reads it.
async fn load_checkpoint(
    ctx: &ShardContext,
    reference: &str,
    dir: &Path,
) -> ShardResult<Checkpoint> {
    let out = dir.join("resume");
    let pulled = pull(Arc::clone(&ctx.client), reference.to_string(), out)
        .await
        .map_err(|e| format!("pull checkpoint {reference}: {e:#}"))?;
    let path = if pulled.path.is_dir() {
        pulled.path.join(checkpoint::FILE_NAME)
    } else {
        pulled.path
    };
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| format!("read checkpoint {}: {e}", path.display()))?;
    Checkpoint::decode(&bytes).map_err(|e| format!("checkpoint {reference}: {e}"))
}

/// Pushes a checkpoint as a new version of the job's checkpoint artifact;
/// returns its reference.
async fn save_checkpoint(
    ctx: &ShardContext,
    task: &ShardTask,
    spec: &Builtin,
    checkpoint: &Checkpoint,
    dir: &Path,
) -> ShardResult<String> {
    let bytes = checkpoint
        .encode()
        .map_err(|e| format!("encode checkpoint: {e}"))?;
    let path = dir.join(checkpoint::FILE_NAME);
    tokio::fs::write(&path, bytes)
        .await
        .map_err(|e| format!("write checkpoint {}: {e}", path.display()))?;
    let options = PushOptions {
        name: checkpoint_artifact(task.job_id),
        parents: vec![format!("{}@{}", spec.data.artifact, spec.data.version)],
        produced_by: task.run_id.clone(),
        media_type: "application/vnd.kiln.checkpoint+safetensors".into(),
        metadata: [
            ("kiln.job".to_string(), task.job_id.to_string()),
            (
                "kiln.step".to_string(),
                checkpoint.optimizer.step.to_string(),
            ),
        ]
        .into_iter()
        .collect(),
        quiet: true,
        ..PushOptions::default()
    };
    let report = push(Arc::clone(&ctx.client), path, options)
        .await
        .map_err(|e| format!("push checkpoint: {e:#}"))?;
    Ok(format!("{}@{}", report.name, report.version))
}

/// The last epoch's training figures, registered with the model.
#[derive(Debug, Clone, Copy)]
struct FinalMetrics {
    loss: f64,
    accuracy: f64,
}

/// File names inside a model artifact.
pub const MODEL_FILE: &str = "model.onnx";
pub const REFERENCE_FILE: &str = "reference.json";

/// Exports the trained network as ONNX with its training reference statistics,
/// pushes both as a version of the model's artifact and registers the model
/// version with its lineage; returns `NAME@VERSION` of the model.
#[allow(clippy::too_many_arguments)]
async fn publish_model(
    ctx: &ShardContext,
    task: &ShardTask,
    job: &JobSpec,
    spec: &Builtin,
    model: &Model,
    standardizer: &Standardizer,
    raw_x: &[f32],
    dataset: &Dataset,
    metrics: FinalMetrics,
    dir: &Path,
) -> ShardResult<String> {
    let dataset_ref = format!("{}@{}", spec.data.artifact, spec.data.version);
    let arch = model.arch().clone();
    let meta = ExportMeta {
        features: dataset.features.clone(),
        label: dataset.label.clone(),
        run_id: task.run_id.clone(),
        dataset: dataset_ref.clone(),
        extra: vec![("kiln.job".into(), task.job_id.to_string())],
    };
    let onnx = onnx::export(&arch, &model.layers(), standardizer, &meta)
        .map_err(|e| format!("export ONNX: {e}"))?;
    // Reference: every raw feature, then every output (probabilities for a
    // classification, as the served model answers).
    let rows = dataset.rows;
    let d = dataset.features.len();
    let outputs = model
        .predict(&dataset.x, rows)
        .map_err(|e| format!("predict the training data: {e}"))?;
    let width = arch.task.outputs();
    let served = match &arch.task {
        Task::Classification { .. } => softmax_rows(&outputs, width),
        Task::Regression => outputs,
    };
    let output_names: Vec<String> = match &arch.task {
        Task::Classification { classes } => classes.iter().map(|c| format!("output:{c}")).collect(),
        Task::Regression => vec!["output".into()],
    };
    let reference_stats =
        ReferenceStats::from_rows(&dataset.features, raw_x, &output_names, &served);
    let reference = serde_json::to_vec_pretty(&reference_stats)
        .map_err(|e| format!("reference statistics: {e}"))?;

    let out = dir.join("model");
    tokio::fs::create_dir_all(&out)
        .await
        .map_err(|e| format!("create {}: {e}", out.display()))?;
    for (file, bytes) in [(MODEL_FILE, &onnx), (REFERENCE_FILE, &reference)] {
        tokio::fs::write(out.join(file), bytes)
            .await
            .map_err(|e| format!("write {file}: {e}"))?;
    }
    let options = PushOptions {
        name: kiln_common::artifact::model_artifact(&job.name),
        parents: vec![dataset_ref.clone()],
        produced_by: task.run_id.clone(),
        media_type: "application/vnd.kiln.model".into(),
        metadata: [("kiln.job".to_string(), task.job_id.to_string())]
            .into_iter()
            .collect(),
        quiet: true,
        ..PushOptions::default()
    };
    let pushed = push(Arc::clone(&ctx.client), out, options)
        .await
        .map_err(|e| format!("push the model: {e:#}"))?;
    let mut figures = std::collections::BTreeMap::new();
    if metrics.loss.is_finite() {
        figures.insert("train_loss".to_string(), metrics.loss);
    }
    if metrics.accuracy.is_finite() {
        figures.insert("train_accuracy".to_string(), metrics.accuracy);
    }
    let fp32 = |name: &str, width: usize| TensorSpec {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![-1, width as i64],
    };
    let version = ModelVersion {
        name: job.name.clone(),
        artifact: format!("{}@{}", pushed.name, pushed.version),
        run_id: task.run_id.clone(),
        job_id: task.job_id,
        dataset: dataset_ref,
        spec_digest: blake3::hash(task.spec_toml.as_bytes()).to_hex().to_string(),
        metrics: figures,
        inputs: vec![fp32(onnx::INPUT, d)],
        outputs: vec![fp32(onnx::OUTPUT, width)],
        classes: match &arch.task {
            Task::Classification { classes } => classes.clone(),
            Task::Regression => Vec::new(),
        },
        features: dataset.features.clone(),
        reference: reference_stats.to_proto(),
        ..Default::default()
    };
    register(ctx, version).await
}

/// Registers a model version a job produced; returns its `NAME@VERSION`.
pub(super) async fn register(ctx: &ShardContext, version: ModelVersion) -> ShardResult<String> {
    let name = version.name.clone();
    let request = RegisterModelRequest {
        model: Some(version),
    };
    let registered = ctx
        .client
        .call(|mut c| {
            let request = request.clone();
            async move { c.register_model(request).await.map(|r| r.into_inner()) }
        })
        .await
        .map_err(|e| format!("register the model: {e}"))?;
    Ok(format!("{name}@{}", registered.version))
}

/// Row-wise softmax of `rows × width` logits.
fn softmax_rows(logits: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(width.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        out.extend(exps.iter().map(|e| e / sum));
    }
    out
}

/// The artifact holding a job's checkpoints, one version each.
pub fn checkpoint_artifact(job_id: u64) -> String {
    format!("job-{job_id}-checkpoint")
}

/// Gathers the rows `rows` of `data` into a batch.
fn gather(data: &Dataset, rows: &[usize]) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let d = data.features.len();
    let mut x = Vec::with_capacity(rows.len() * d);
    let (mut classes, mut values) = (Vec::new(), Vec::new());
    for &r in rows {
        x.extend_from_slice(&data.x[r * d..(r + 1) * d]);
        match &data.target {
            Target::Classes { y, .. } => classes.push(y[r]),
            Target::Values(v) => values.push(v[r]),
        }
    }
    (x, classes, values)
}

fn metric(key: &str, value: f64, step: u64) -> MetricPoint {
    MetricPoint {
        key: key.into(),
        value,
        timestamp_ms: kiln_common::clock::now_ms(),
        step: step as i64,
    }
}

async fn train(
    ctx: &ShardContext,
    task: &ShardTask,
    job: &JobSpec,
    spec: &Builtin,
    dir: &Path,
    reporter: &mut Reporter,
) -> ShardResult<Outcome> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let listener = TcpListener::bind((ctx.bind_host.as_str(), 0))
        .await
        .map_err(|e| format!("bind the data port on {}: {e}", ctx.bind_host))?;
    let data_addr = format!(
        "{}:{}",
        ctx.bind_host,
        listener
            .local_addr()
            .map_err(|e| format!("data port: {e}"))?
            .port()
    );
    reporter.log(format!(
        "rank {} of {} on worker {}: data port {data_addr}",
        task.rank, task.world, ctx.worker_id
    ));
    // Started: Ready without an address, so the leader's start timeout measures
    // the start, not the load. The address follows once everything is loaded.
    let started = ReportShard {
        state: ShardState::Ready as i32,
        ..Default::default()
    };
    if !reporter.send(started).await? {
        return Ok(Outcome::Stopped);
    }
    let mut dataset = load_dataset(ctx, spec, dir).await?;
    let standardizer = Standardizer::fit(&dataset);
    // The raw inputs feed the reference statistics (live requests arrive raw);
    // only rank 0 publishes the model.
    let raw_x = if task.rank == 0 {
        dataset.x.clone()
    } else {
        Vec::new()
    };
    standardizer.apply(&mut dataset.x);
    let arch = arch_of(spec, &dataset);
    let mut model = Model::init(arch.clone(), spec.train.seed);
    let n = model.params().len();
    let mut optimizer = Optimizer::new(&spec.optimizer, n);
    if !task.checkpoint.is_empty() {
        let resumed = load_checkpoint(ctx, &task.checkpoint, dir).await?;
        model = Model::from_params(arch.clone(), resumed.params)
            .map_err(|e| format!("checkpoint {}: {e}", task.checkpoint))?;
        optimizer = Optimizer::restore(&spec.optimizer, n, &resumed.optimizer)
            .map_err(|e| format!("checkpoint {}: {e}", task.checkpoint))?;
        reporter.log(format!(
            "resumed from {} at step {}",
            task.checkpoint,
            optimizer.steps()
        ));
    }

    // The pass runs on the shard's first GPU when this build has `cuda`.
    let gpus = task.gpus.clone();
    let engine_arch = arch.clone();
    let mut engine = tokio::task::spawn_blocking(move || Engine::for_shard(&gpus, &engine_arch))
        .await
        .map_err(|e| format!("open the shard's GPU: {e}"))?
        .map_err(|e| format!("open the shard's GPU: {e}"))?;
    reporter.log(format!(
        "rank {}: forward and backward on {}",
        task.rank,
        engine.describe()
    ));
    if !task.gpus.is_empty() && matches!(engine, Engine::Cpu) {
        reporter.log(format!(
            "rank {}: GPU {:?} assigned, but this kiln was built without the cuda \
             feature: the pass runs on the CPU",
            task.rank, task.gpus
        ));
    }

    // The data address only now that the data, the checkpoint and the engine are
    // loaded: peers link up as soon as every address is known, and a rank still
    // loading would leave their handshakes waiting until they fail the attempt
    // (again and again for a slow loader); the rendezvous waits for it instead.
    // A GPU gang (built with `cuda`) reduces through NCCL: rank 0 makes the
    // attempt's unique id and publishes it with its address.
    let nccl_id = if task.rank == 0 && nccl_wanted(task.gpus.len() as u32, task.world as usize) {
        new_nccl_id()
            .map_err(|e| format!("create the NCCL id: {e}"))?
            .as_bytes()
            .to_vec()
    } else {
        Vec::new()
    };
    let ready = ReportShard {
        state: ShardState::Ready as i32,
        data_addr,
        nccl_id,
        ..Default::default()
    };
    if !reporter.send(ready).await? {
        return Ok(Outcome::Stopped);
    }
    let Some(meeting) = rendezvous(ctx, task, RENDEZVOUS_TIMEOUT).await? else {
        return Ok(Outcome::Stopped);
    };
    let rank = task.rank as usize;
    let world = meeting.addrs.len();
    let mut ring = match Backend::from_rendezvous(&meeting.nccl_id).map_err(|e| e.to_string())? {
        Backend::Ring => Collective::from(
            Ring::connect(
                listener,
                RingConfig::new(
                    task.session_id,
                    RingKey::from_task(&task.ring_key).map_err(|e| e.to_string())?,
                    rank,
                    meeting.addrs,
                ),
            )
            .await
            .map_err(|e| format!("link the all-reduce ring: {e}"))?,
        ),
        Backend::Nccl(id) => {
            drop(listener);
            let device = *task
                .gpus
                .first()
                .ok_or("the gang reduces through NCCL but this shard has no GPU")?
                as usize;
            Collective::nccl(NcclConfig::new(rank, world, id, device))
                .await
                .map_err(|e| format!("join the NCCL communicator: {e}"))?
        }
    };
    reporter.log(format!(
        "rank {rank}: all-reduce through {}",
        ring.backend()
    ));
    if !reporter.state(ShardState::Running).await? {
        return Ok(Outcome::Stopped);
    }

    let rows = dataset.rows;
    let batch_size = (spec.train.batch_size as usize).min(rows).max(1);
    let steps_per_epoch = rows.div_ceil(batch_size) as u64;
    let total_steps = steps_per_epoch * u64::from(spec.train.epochs);
    let classification = matches!(dataset.target, Target::Classes { .. });
    let every = spec.train.checkpoint_every_steps;
    let mut buf = vec![0f32; n + 2];
    let mut order: Vec<usize> = (0..rows).collect();
    let mut order_epoch = u64::MAX;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let first_step = optimizer.steps();
    let (mut epoch_loss, mut epoch_correct, mut epoch_rows) = (0f64, 0f64, 0usize);
    let (mut last_loss, mut last_accuracy) = (f64::NAN, f64::NAN);
    let mut epoch_started = Instant::now();
    for step in first_step..total_steps {
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = (0..rows).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                spec.train.seed ^ (epoch + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            order.shuffle(&mut rng);
            order_epoch = epoch;
        }
        let b = (step % steps_per_epoch) as usize;
        let global = &order[b * batch_size..((b + 1) * batch_size).min(rows)];
        let mine = &global[partition(global.len(), rank, world)];
        let (x, classes, values) = gather(&dataset, mine);
        let scale = 1.0 / global.len() as f32;
        let count = mine.len();
        // The step's arithmetic runs on a blocking thread; the model goes there and back.
        let (back, back_engine, out) = tokio::task::spawn_blocking(move || {
            let target = if classification {
                Batch::Classes(&classes)
            } else {
                Batch::Values(&values)
            };
            let out = engine.gradient(&model, &x, count, target, scale);
            (model, engine, out)
        })
        .await
        .map_err(|e| format!("step {step}: {e}"))?;
        model = back;
        engine = back_engine;
        let out = out.map_err(|e| format!("step {step}: {e}"))?;
        buf[..n].copy_from_slice(&out.grads);
        buf[n] = out.loss_sum as f32;
        buf[n + 1] = out.correct as f32;
        ring.all_reduce_sum(&mut buf)
            .await
            .map_err(|e| format!("step {step}: all-reduce: {e}"))?;
        // Every rank holds the same sums, so every rank stops here alike: a run
        // that diverged must fail, not end Succeeded with NaN weights registered.
        if let Some(bad) = buf[..=n].iter().position(|v| !v.is_finite()) {
            let what = if bad == n {
                format!("the batch's loss is {}", buf[n])
            } else {
                format!("gradient {bad} of {n} is {}", buf[bad])
            };
            return Err(format!(
                "step {step}: {what} (not finite): training diverged; lower the learning \
                 rate, or scale the features"
            ));
        }
        optimizer
            .step(model.params_mut(), &buf[..n])
            .map_err(|e| format!("step {step}: optimizer: {e}"))?;
        epoch_loss += f64::from(buf[n]);
        epoch_correct += f64::from(buf[n + 1]);
        epoch_rows += global.len();
        let done = step + 1;
        let epoch_end = done % steps_per_epoch == 0;
        if rank != 0 {
            continue;
        }
        let loss = epoch_loss / epoch_rows.max(1) as f64;
        let accuracy = if classification {
            epoch_correct / epoch_rows.max(1) as f64
        } else {
            f64::NAN
        };
        let samples_per_sec = ((done - first_step) as f64 * batch_size as f64)
            / started.elapsed().as_secs_f64().max(1e-9);
        let mut report = ReportShard::default();
        if epoch_end {
            let epoch_rate = epoch_rows as f64 / epoch_started.elapsed().as_secs_f64().max(1e-9);
            report.metrics.push(metric("train_loss", loss, done));
            if classification {
                report
                    .metrics
                    .push(metric("train_accuracy", accuracy, done));
            }
            report
                .metrics
                .push(metric("samples_per_sec", epoch_rate, done));
            reporter.log(format!(
                "epoch {}/{} step {done}/{total_steps} loss {loss:.5}{} {epoch_rate:.0} samples/s",
                epoch + 1,
                spec.train.epochs,
                if classification {
                    format!(" accuracy {accuracy:.4}")
                } else {
                    String::new()
                }
            ));
            (epoch_loss, epoch_correct, epoch_rows) = (0.0, 0.0, 0);
            (last_loss, last_accuracy) = (loss, accuracy);
            epoch_started = Instant::now();
        }
        if every > 0 && done % every == 0 && done < total_steps {
            let saved = Checkpoint {
                params: model.params().to_vec(),
                optimizer: optimizer.state(),
                meta: [("kiln.job".to_string(), task.job_id.to_string())]
                    .into_iter()
                    .collect(),
            };
            report.checkpoint = save_checkpoint(ctx, task, spec, &saved, dir).await?;
            report.checkpoint_step = done;
            reporter.log(format!("checkpoint {} at step {done}", report.checkpoint));
        }
        let due =
            epoch_end || !report.checkpoint.is_empty() || last_report.elapsed() >= PROGRESS_EVERY;
        if due {
            report.progress = Some(JobProgress {
                epoch: (epoch + 1) as u32,
                epochs: spec.train.epochs,
                step: done,
                total_steps,
                loss,
                accuracy,
                samples_per_sec,
                at_ms: kiln_common::clock::now_ms(),
            });
            last_report = Instant::now();
            if !reporter.send(report).await? {
                return Ok(Outcome::Stopped);
            }
        }
    }

    let mut last = ReportShard {
        state: ShardState::Succeeded as i32,
        ..Default::default()
    };
    if rank == 0 {
        let saved = Checkpoint {
            params: model.params().to_vec(),
            optimizer: optimizer.state(),
            meta: [
                ("kiln.job".to_string(), task.job_id.to_string()),
                ("kiln.final".to_string(), "true".to_string()),
            ]
            .into_iter()
            .collect(),
        };
        last.checkpoint = save_checkpoint(ctx, task, spec, &saved, dir).await?;
        last.checkpoint_step = optimizer.steps();
        let summary = FinalMetrics {
            loss: last_loss,
            accuracy: last_accuracy,
        };
        last.model = publish_model(
            ctx,
            task,
            job,
            spec,
            &model,
            &standardizer,
            &raw_x,
            &dataset,
            summary,
            dir,
        )
        .await?;
        reporter.log(format!("registered model {}", last.model));
        reporter.log(format!(
            "finished {total_steps} step(s) in {:.1} s; final weights {}",
            started.elapsed().as_secs_f64(),
            last.checkpoint
        ));
    }
    reporter.send(last).await?;
    Ok(Outcome::Succeeded)
}
