//! Runs the serving replicas the coordinators want on this worker: each heartbeat
//! answer lists them (desired state). A new replica pulls its model version from
//! the artifact store, loads it (tract plan, warm-up inference) and only then
//! joins the [`ServingTable`] and reports itself Ready; a replica that is no
//! longer listed leaves the table after [`DRAIN_GRACE`], so the routers on other
//! workers, which learn of the change at their next heartbeat, do not send
//! requests to a replica that has already gone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kiln_common::client::ClusterClient;
use kiln_common::reference::ReferenceStats;
use kiln_proto::v1::{
    Batching, ReplicaLoad, ReplicaState, ReplicaTask, ReportReplica, ReportReplicaRequest,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::engine::{Engine, EngineConfig, EngineKind, ModelFiles};
use super::feedback::{AnswerSpec, TaskMetadata};
use super::monitor::Monitor;
use crate::train::shard::{MODEL_FILE, REFERENCE_FILE};
use kiln_common::transfer;

/// How long a replica that is no longer wanted keeps serving.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// Attempts at reporting a replica's state before giving up (the leader then
/// replaces a replica that never reported).
const REPORT_ATTEMPTS: u32 = 10;

/// A replica that serves on this worker.
pub struct LocalReplica {
    pub id: u64,
    pub deployment: String,
    pub model: String,
    pub version: u64,
    pub engine: Engine,
    /// How its answers are read for the feedback endpoint; `None` when the
    /// model's first output is not one answer per row.
    pub answers: Option<Arc<AnswerSpec>>,
}

impl std::fmt::Debug for LocalReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalReplica")
            .field("id", &self.id)
            .field("deployment", &self.deployment)
            .field("model", &self.model)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The ready replicas on this worker, by deployment; the HTTP and gRPC handlers
/// read it, the supervisor writes it.
#[derive(Debug, Default)]
pub struct ServingTable {
    replicas: RwLock<HashMap<String, Vec<Arc<LocalReplica>>>>,
}

impl ServingTable {
    /// The ready local replicas of `deployment`.
    pub fn replicas(&self, deployment: &str) -> Vec<Arc<LocalReplica>> {
        self.replicas
            .read()
            .expect("serving table lock")
            .get(deployment)
            .cloned()
            .unwrap_or_default()
    }

    /// The local replica `id` of `deployment`, when it is ready here.
    pub fn replica(&self, deployment: &str, id: u64) -> Option<Arc<LocalReplica>> {
        self.replicas(deployment).into_iter().find(|r| r.id == id)
    }

    /// Every ready local replica.
    pub fn all(&self) -> Vec<Arc<LocalReplica>> {
        self.replicas
            .read()
            .expect("serving table lock")
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    /// Each ready replica's load, for the heartbeat (the leader's autoscaler).
    pub fn loads(&self) -> Vec<ReplicaLoad> {
        self.all()
            .iter()
            .map(|r| {
                let stats = r.engine.stats();
                ReplicaLoad {
                    deployment: r.deployment.clone(),
                    replica_id: r.id,
                    in_flight: u32::try_from(stats.in_flight).unwrap_or(u32::MAX),
                    requests: stats.requests,
                }
            })
            .collect()
    }

    /// Prometheus text for every ready replica: requests by outcome, executions,
    /// rows, queue and compute time, queue length and in-flight requests,
    /// labelled by deployment, model, version and replica (Triton's counters,
    /// under kiln's names).
    pub fn render_metrics(&self) -> String {
        let mut replicas = self.all();
        replicas.sort_by(|a, b| (&a.deployment, a.id).cmp(&(&b.deployment, b.id)));
        let mut deployments: HashMap<&str, usize> = HashMap::new();
        for r in &replicas {
            *deployments.entry(r.deployment.as_str()).or_default() += 1;
        }
        let mut out = String::new();
        let families: [(&str, &str, &str); 9] = [
            (
                "kiln_inference_requests_total",
                "counter",
                "Requests answered, by outcome: success, failed (a bad request or an engine error), rejected (queue full), timeout.",
            ),
            ("kiln_inference_exec_total", "counter", "Batches executed."),
            ("kiln_inference_rows_total", "counter", "Rows inferred."),
            (
                "kiln_inference_queue_seconds_total",
                "counter",
                "Time requests spent queued.",
            ),
            (
                "kiln_inference_compute_seconds_total",
                "counter",
                "Time spent computing batches.",
            ),
            (
                "kiln_inference_queue_length",
                "gauge",
                "Requests queued now.",
            ),
            (
                "kiln_inference_in_flight",
                "gauge",
                "Requests queued or running now.",
            ),
            (
                "kiln_inference_batch_size_mean",
                "gauge",
                "Mean rows per executed batch.",
            ),
            (
                "kiln_serving_replicas",
                "gauge",
                "Ready replicas on this worker, by deployment.",
            ),
        ];
        for (name, kind, help) in families {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            if name == "kiln_serving_replicas" {
                let mut names: Vec<(&&str, &usize)> = deployments.iter().collect();
                names.sort();
                for (d, n) in names {
                    out.push_str(&format!("{name}{{deployment=\"{d}\"}} {n}\n"));
                }
                continue;
            }
            for r in &replicas {
                let s = r.engine.stats();
                let labels = format!(
                    "deployment=\"{}\",model=\"{}\",version=\"{}\",replica=\"{}\"",
                    r.deployment, r.model, r.version, r.id
                );
                // `failures` counts every error; rejected and timed-out ones
                // are shown apart.
                let failed = s.failures.saturating_sub(s.rejected + s.timeouts);
                match name {
                    "kiln_inference_requests_total" => {
                        for (outcome, n) in [
                            ("success", s.requests),
                            ("failed", failed),
                            ("rejected", s.rejected),
                            ("timeout", s.timeouts),
                        ] {
                            out.push_str(&format!(
                                "{name}{{{labels},outcome=\"{outcome}\"}} {n}\n"
                            ));
                        }
                    }
                    "kiln_inference_exec_total" => {
                        out.push_str(&format!("{name}{{{labels}}} {}\n", s.inferences))
                    }
                    "kiln_inference_rows_total" => {
                        out.push_str(&format!("{name}{{{labels}}} {}\n", s.rows))
                    }
                    "kiln_inference_queue_seconds_total" => {
                        out.push_str(&format!("{name}{{{labels}}} {}\n", s.queue_us as f64 / 1e6))
                    }
                    "kiln_inference_compute_seconds_total" => out.push_str(&format!(
                        "{name}{{{labels}}} {}\n",
                        s.compute_us as f64 / 1e6
                    )),
                    "kiln_inference_queue_length" => {
                        out.push_str(&format!("{name}{{{labels}}} {}\n", s.queue_len))
                    }
                    "kiln_inference_in_flight" => {
                        out.push_str(&format!("{name}{{{labels}}} {}\n", s.in_flight))
                    }
                    _ => {
                        let mean = if s.inferences == 0 {
                            0.0
                        } else {
                            s.rows as f64 / s.inferences as f64
                        };
                        out.push_str(&format!("{name}{{{labels}}} {mean}\n"))
                    }
                }
            }
        }
        out
    }

    fn insert(&self, replica: Arc<LocalReplica>) {
        self.replicas
            .write()
            .expect("serving table lock")
            .entry(replica.deployment.clone())
            .or_default()
            .push(replica);
    }

    /// Removes this replica (not another with the same id: a deployment removed
    /// and made again numbers its replicas from 1 while an old one drains).
    fn remove(&self, replica: &Arc<LocalReplica>) {
        let mut table = self.replicas.write().expect("serving table lock");
        if let Some(list) = table.get_mut(&replica.deployment) {
            list.retain(|r| !Arc::ptr_eq(r, replica));
            if list.is_empty() {
                table.remove(&replica.deployment);
            }
        }
    }
}

/// What replicas need from their worker.
#[derive(Clone)]
pub struct ServingContext {
    pub client: Arc<ClusterClient>,
    pub worker_id: String,
    /// Scratch space for pulled model files; each replica uses its own directory
    /// under it and removes it once loaded.
    pub work_dir: PathBuf,
}

/// A replica's identity: deployment, replica id.
type Key = (String, u64);

fn key(task: &ReplicaTask) -> Key {
    (task.deployment.clone(), task.replica_id)
}

/// Reconciles this worker's replicas with `desired` until `shutdown`.
pub async fn supervise(
    ctx: ServingContext,
    table: Arc<ServingTable>,
    mut desired: watch::Receiver<Vec<ReplicaTask>>,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<Key, (CancellationToken, JoinHandle<()>)> = HashMap::new();
    loop {
        let tasks = desired.borrow_and_update().clone();
        let wanted: HashSet<Key> = tasks.iter().map(key).collect();
        running.retain(|k, (stop, _)| {
            if wanted.contains(k) {
                return true;
            }
            tracing::info!(
                deployment = %k.0,
                replica = k.1,
                "draining a replica the coordinators no longer list"
            );
            stop.cancel();
            false
        });
        for task in tasks {
            let k = key(&task);
            if running.contains_key(&k) {
                continue;
            }
            tracing::info!(deployment = %k.0, replica = k.1, "starting a replica");
            let stop = shutdown.child_token();
            let handle = tokio::spawn(run_replica(
                ctx.clone(),
                Arc::clone(&table),
                task,
                stop.clone(),
            ));
            running.insert(k, (stop, handle));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = desired.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    for (_, (stop, handle)) in running {
        stop.cancel();
        let _ = tokio::time::timeout(DRAIN_GRACE + Duration::from_secs(1), handle).await;
    }
}

/// Loads one replica, serves it until `stop`, then drains it.
async fn run_replica(
    ctx: ServingContext,
    table: Arc<ServingTable>,
    task: ReplicaTask,
    stop: CancellationToken,
) {
    let loaded = tokio::select! {
        _ = stop.cancelled() => return,
        loaded = load(&ctx, &task) => loaded,
    };
    let replica = match loaded {
        Ok(replica) => Arc::new(replica),
        Err(reason) => {
            tracing::warn!(deployment = %task.deployment, replica = task.replica_id, %reason, "replica failed to load");
            let failed = Outcome {
                state: ReplicaState::ReplicaFailed,
                reason,
                engine: "",
                unbatched: "",
            };
            report(&ctx, &task, failed, &stop).await;
            return;
        }
    };
    table.insert(Arc::clone(&replica));
    tracing::info!(
        deployment = %task.deployment,
        replica = task.replica_id,
        model = %replica.model,
        version = replica.version,
        "replica ready"
    );
    let ready = Outcome {
        state: ReplicaState::ReplicaReady,
        reason: String::new(),
        engine: replica.engine.kind().name(),
        unbatched: replica.engine.unbatched_reason().unwrap_or_default(),
    };
    report(&ctx, &task, ready, &stop).await;
    stop.cancelled().await;
    // Routers elsewhere may still send requests until their next heartbeat.
    tokio::time::sleep(DRAIN_GRACE).await;
    table.remove(&replica);
    tracing::info!(deployment = %task.deployment, replica = task.replica_id, "replica stopped");
}

/// Pulls the model file and builds the engine (which runs a warm-up inference).
async fn load(ctx: &ServingContext, task: &ReplicaTask) -> Result<LocalReplica, String> {
    let target = task
        .target
        .clone()
        .ok_or_else(|| "the replica task names no model".to_string())?;
    let dir = ctx
        .work_dir
        .join(format!("{}-{}", task.deployment, task.replica_id));
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let pulled = transfer::pull(Arc::clone(&ctx.client), &target.artifact, &dir, true)
        .await
        .map_err(|e| format!("pull {}: {e:#}", target.artifact))?;
    let file = if pulled.path.is_dir() {
        pulled.path.join(MODEL_FILE)
    } else {
        pulled.path.clone()
    };
    // The model file and the external data files it names, from beside it.
    let files = tokio::task::spawn_blocking(move || ModelFiles::read(&file))
        .await
        .map_err(|e| format!("read the model: {e}"))
        .and_then(|read| read.map_err(|e| e.to_string()));
    let reference = match pulled.path.is_dir() {
        true => tokio::fs::read(pulled.path.join(REFERENCE_FILE)).await.ok(),
        false => None,
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let files = files?;
    let engine = match task.engine.as_str() {
        // Only ONNX Runtime serves on GPUs.
        "" if !task.gpus.is_empty() => Some(EngineKind::OnnxRuntime),
        // The preferred engine of this worker's that did not refuse the model at
        // registration.
        "" => Some(
            EngineKind::available()
                .into_iter()
                .find(|kind| !target.refused_engines.iter().any(|r| r == kind.name()))
                .ok_or_else(|| {
                    format!(
                        "{}@{} was refused at registration by {}, the engines this worker runs",
                        target.model,
                        target.version,
                        target.refused_engines.join(" and ")
                    )
                })?,
        ),
        name => Some(EngineKind::parse(name).map_err(|e| e.to_string())?),
    };
    let config = EngineConfig {
        max_batch_size: task.max_batch_size.max(1) as usize,
        max_queue_delay: Duration::from_micros(task.max_queue_delay_us),
        queue_capacity: task.queue_capacity.max(1) as usize,
        threads: task.threads.max(1) as usize,
        engine,
        batching: Batching::try_from(task.batching).unwrap_or(Batching::Probed),
        preferred_batch_sizes: task
            .preferred_batch_sizes
            .iter()
            .map(|&s| s as usize)
            .collect(),
        instances: (task.instances > 0).then_some(task.instances as usize),
        input_limits: task
            .input_limits
            .iter()
            .map(|l| {
                let dims = l.max_shape.iter().map(|&d| usize::try_from(d).ok());
                (l.name.clone(), dims.collect())
            })
            .collect(),
        gpu: task.gpus.first().copied(),
    };
    let meta = TaskMetadata::of_onnx(&files.onnx);
    let name = task.deployment.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::load_files(&files, &name, config))
        .await
        .map_err(|e| format!("load the model: {e}"))?
        .map_err(|e| format!("load {}@{}: {e}", target.model, target.version))?;
    if let Some(reference) = reference {
        attach_monitor(&engine, &target.model, target.version, &reference);
    }
    let answers = AnswerSpec::of(&target.model, target.version, engine.signature(), &meta);
    if answers.is_none() {
        tracing::info!(model = %target.model, version = target.version, "the first output is not one answer per row; no feedback for this version");
    }
    Ok(LocalReplica {
        id: task.replica_id,
        deployment: task.deployment.clone(),
        model: target.model,
        version: target.version,
        engine,
        answers: answers.map(Arc::new),
    })
}

/// Counts what the replica serves into the version's reference bins; a model
/// whose reference does not fit it is served unmonitored, with a warning.
fn attach_monitor(engine: &Engine, model: &str, version: u64, reference: &[u8]) {
    let monitor = serde_json::from_slice::<ReferenceStats>(reference)
        .map_err(|e| format!("{REFERENCE_FILE} does not parse: {e}"))
        .and_then(|reference| {
            let features = reference.feature_count();
            Monitor::new(model, version, features, reference, engine.signature())
        });
    match monitor {
        Ok(monitor) => {
            engine.attach_monitor(Arc::new(monitor));
        }
        Err(reason) => {
            tracing::warn!(%model, version, %reason, "served without drift monitoring");
        }
    }
}

/// What a replica reports: its state and why, the engine it loaded on and why it
/// serves each request alone (when it does).
struct Outcome<'a> {
    state: ReplicaState,
    reason: String,
    engine: &'a str,
    unbatched: &'a str,
}

/// Reports a replica's state to the coordinators, retrying with backoff.
async fn report(
    ctx: &ServingContext,
    task: &ReplicaTask,
    outcome: Outcome<'_>,
    stop: &CancellationToken,
) {
    let report = ReportReplica {
        deployment: task.deployment.clone(),
        replica_id: task.replica_id,
        worker_id: ctx.worker_id.clone(),
        state: outcome.state as i32,
        reason: outcome.reason,
        engine: outcome.engine.to_string(),
        unbatched: outcome.unbatched.to_string(),
    };
    let mut pause = Duration::from_millis(200);
    for attempt in 1..=REPORT_ATTEMPTS {
        let request = ReportReplicaRequest {
            report: Some(report.clone()),
        };
        match ctx
            .client
            .call(|mut c| {
                let request = request.clone();
                async move { c.report_replica(request).await.map(|r| r.into_inner()) }
            })
            .await
        {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(attempt, error = %e, "report a replica");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
