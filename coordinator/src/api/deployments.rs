//! Serving: model aliases, deployments (deploy, list, show, remove), the replicas'
//! reports and, on the leader, the round that places, replaces and retires
//! replicas and hands each worker its replica tasks and the routes.
//!
//! A replica takes traffic only once its worker reports it Ready (model loaded,
//! warm-up inference done). A rollout places the new generation's replicas first
//! and retires the old ones only when as many new ones are ready as the
//! deployment wants, so there is no moment without ready replicas.

use std::collections::{BTreeMap, HashMap};

use kiln_common::artifact::{parse_reference, Selector};
use kiln_common::{Error, Result};
use kiln_proto::v1::*;

use super::grpc::{audited, command, Api};
use super::{rejection, storage};
use crate::auth::Caller;
use crate::scheduler::{self, Capacity, ReplicaNeed, ReplicaPlacement};
use crate::state::deployments::{read_deployment, same_target};
use crate::state::keys;
use crate::state::models::{alias, latest, read_model};

// Most deployments one listing (or one scheduling round) reads: the ones apply
// counts.
use crate::state::capacity::MAX_DEPLOYMENTS;
/// Most replicas a deployment may ask for.
pub const MAX_WANTED_REPLICAS: u32 = 64;
/// How long a failed replica stays listed (so its reason can be read) before it
/// is replaced.
pub const FAILED_REPLICA_PAUSE_MS: u64 = 5_000;
/// Longest a placed replica may take to load its model and report Ready before it
/// is replaced on another worker.
pub const REPLICA_START_TIMEOUT_MS: u64 = 120_000;

/// Defaults of a deployment's serving settings (Triton-like).
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 64;
pub const DEFAULT_MAX_QUEUE_DELAY_US: u64 = 500;
pub const DEFAULT_QUEUE_CAPACITY: u32 = 1024;
pub const DEFAULT_TARGET_IN_FLIGHT: u32 = 8;
/// The serving engines a deployment may name (`Resources.engines` of workers).
pub const ENGINE_ONNXRUNTIME: &str = "onnxruntime";
pub const ENGINE_TRACT: &str = "tract";
/// Largest batch a replica forms.
pub const MAX_BATCH_SIZE: u32 = 4096;
/// Longest a replica holds a request to form a batch.
pub const MAX_QUEUE_DELAY_US: u64 = 1_000_000;
/// Most requests a replica queues.
pub const MAX_QUEUE_CAPACITY: u32 = 65_536;

/// The canary's share of a deployment's replicas: at least one.
pub fn canary_replicas(replicas: u32, percent: u32) -> u32 {
    ((replicas * percent).div_ceil(100)).max(1)
}

impl Api {
    /// Bytes of the artifact (`NAME@VERSION`) that holds a model's files.
    fn model_bytes(&self, artifact: &str) -> Result<u64> {
        let (name, version) = artifact
            .rsplit_once('@')
            .and_then(|(n, v)| Some((n, v.parse::<u64>().ok()?)))
            .ok_or_else(|| {
                Error::Internal(format!("model artifact {artifact:?} has no version"))
            })?;
        let manifest = crate::state::artifacts::read_version(&self.reader, name, version)
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("the model's artifact {artifact} is gone")))?;
        Ok(manifest.size)
    }

    /// Resolves `MODEL[@VERSION|@ALIAS]` to the version it names now.
    fn resolve_model(&self, text: &str) -> Result<(ModelVersion, ModelTarget)> {
        let (name, selector) = parse_reference(text)?;
        let version = match &selector {
            Selector::Latest => latest(&self.reader, &name).map_err(storage)?,
            Selector::Version(v) => *v,
            Selector::Tag(a) => {
                let version = alias(&self.reader, &name, a).map_err(storage)?;
                if version == 0 {
                    return Err(Error::NotFound(format!("model {name} has no alias {a}")));
                }
                version
            }
        };
        let model = read_model(&self.reader, &name, version)
            .map_err(storage)?
            .ok_or_else(|| {
                Error::NotFound(if version == 0 {
                    match crate::state::models::model_exists(&self.reader, &name) {
                        Ok(true) => format!("model {name} is registered but has no versions yet"),
                        _ => format!("no model is named {name}"),
                    }
                } else {
                    format!("{name}@{version} does not exist")
                })
            })?;
        if !model.undeployable.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{name}@{version} cannot be deployed: {}",
                model.undeployable
            )));
        }
        let target = ModelTarget {
            model: name,
            version,
            artifact: model.artifact.clone(),
            requested: text.to_string(),
            refused_engines: model.refused_engines.keys().cloned().collect(),
        };
        Ok((model, target))
    }

    /// Points an alias of a model at a version (0 removes it).
    pub async fn set_model_alias_call(
        &self,
        caller: &Caller,
        req: SetModelAliasRequest,
    ) -> Result<()> {
        let set = req
            .alias
            .ok_or_else(|| Error::InvalidArgument("set_model_alias without an alias".into()))?;
        kiln_common::artifact::validate_tag(&set.alias)?;
        let what = if set.version == 0 {
            format!("remove alias {} of model {}", set.alias, set.name)
        } else {
            format!("alias {}@{} as {}", set.name, set.version, set.alias)
        };
        self.propose(
            audited(caller, what, command::Kind::SetModelAlias(set)),
            false,
        )
        .await
        .map_err(rejection)?;
        Ok(())
    }

    /// Creates or changes a deployment; returns it as committed.
    pub async fn deploy_call(
        &self,
        caller: &Caller,
        req: DeployRequest,
    ) -> Result<DeploymentRecord> {
        self.read_barrier(false).await?;
        kiln_common::artifact::validate_name(&req.name)
            .map_err(|e| Error::InvalidArgument(format!("deployment name: {e}")))?;
        let (primary_model, primary) = self.resolve_model(&req.model)?;
        check_engine(&primary_model, &req.engine)?;
        check_input_limits(&primary_model, &req.input_limits)?;
        let (min, max) = match (req.replicas, req.min_replicas, req.max_replicas) {
            (n, 0, 0) if n > 0 => (n, n),
            (0, min, max) if min > 0 && max >= min => (min, max),
            (0, 0, 0) => (1, 1),
            (n, min, max) => {
                return Err(Error::InvalidArgument(format!(
                    "give either --replicas N (N >= 1) or --min N --max M (1 <= N <= M); got replicas {n}, min {min}, max {max}"
                )))
            }
        };
        if max > MAX_WANTED_REPLICAS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_WANTED_REPLICAS} replicas per deployment; asked for {max}"
            )));
        }
        let canary = if req.canary.is_empty() {
            if req.canary_percent != 0 {
                return Err(Error::InvalidArgument(
                    "--canary-percent needs --canary MODEL@VERSION".into(),
                ));
            }
            None
        } else {
            if !(1..=99).contains(&req.canary_percent) {
                return Err(Error::InvalidArgument(format!(
                    "--canary-percent must be 1 to 99, not {}",
                    req.canary_percent
                )));
            }
            let (canary_model, canary) = self.resolve_model(&req.canary)?;
            check_engine(&canary_model, &req.engine)?;
            check_input_limits(&canary_model, &req.input_limits)?;
            if req.gpus_per_replica > 0 {
                check_engine(&canary_model, ENGINE_ONNXRUNTIME)?;
            }
            Some(canary)
        };
        let or = |v: u32, default: u32| if v == 0 { default } else { v };
        let (batching, max_batch_size) = match req.max_batch_size {
            None => (Batching::Probed, DEFAULT_MAX_BATCH_SIZE),
            Some(0) => (Batching::Off, 0),
            Some(n) => (Batching::Declared, n),
        };
        let preferred_batch_sizes =
            preferred_sizes(&req.preferred_batch_sizes, batching, max_batch_size)?;
        if req.instances > MAX_INSTANCES {
            return Err(Error::InvalidArgument(format!(
                "--instances: at most {MAX_INSTANCES} model instances per replica, not {}",
                req.instances
            )));
        }
        let max_queue_delay_us = if req.max_queue_delay_us == 0 {
            DEFAULT_MAX_QUEUE_DELAY_US
        } else {
            req.max_queue_delay_us
        };
        let queue_capacity = or(req.queue_capacity, DEFAULT_QUEUE_CAPACITY);
        if !matches!(req.engine.as_str(), "" | ENGINE_ONNXRUNTIME | ENGINE_TRACT) {
            return Err(Error::InvalidArgument(format!(
                "engine {:?} is not known; use {ENGINE_ONNXRUNTIME} or {ENGINE_TRACT} (or none: each worker's preferred)",
                req.engine
            )));
        }
        if max_batch_size > MAX_BATCH_SIZE
            || max_queue_delay_us > MAX_QUEUE_DELAY_US
            || queue_capacity > MAX_QUEUE_CAPACITY
        {
            return Err(Error::InvalidArgument(format!(
                "batching limits: max_batch_size <= {MAX_BATCH_SIZE}, max_queue_delay_us <= {MAX_QUEUE_DELAY_US}, queue_capacity <= {MAX_QUEUE_CAPACITY}"
            )));
        }
        let gpus_per_replica = req.gpus_per_replica;
        if gpus_per_replica > 0 {
            check_gpu_serving(&self.workers_by_id()?, &req.engine, gpus_per_replica)?;
            check_engine(&primary_model, ENGINE_ONNXRUNTIME)?;
        }
        if req.memory_mib_per_replica > MAX_MEMORY_MIB_PER_REPLICA {
            return Err(Error::InvalidArgument(format!(
                "--memory-mib: at most {MAX_MEMORY_MIB_PER_REPLICA} MiB per replica, not {}",
                req.memory_mib_per_replica
            )));
        }
        // From the primary only: adding or dropping a canary must not change what
        // the primaries run with (that would roll them out).
        let memory_per_replica = match req.memory_mib_per_replica {
            0 => estimated_replica_memory(self.model_bytes(primary.artifact.as_str())?),
            mib => mib << 20,
        };
        // An autoscaled deployment keeps its current scale within the new bounds.
        let current = read_deployment(&self.reader, &req.name)
            .map_err(storage)?
            .map_or(min, |d| d.replicas.clamp(min, max));
        let spec = DeploymentRecord {
            name: req.name.clone(),
            primary: Some(primary),
            canary,
            canary_percent: req.canary_percent,
            replicas: if min == max { min } else { current },
            min_replicas: min,
            max_replicas: max,
            cpus_per_replica: or(req.cpus_per_replica, 1),
            memory_per_replica,
            gpus_per_replica,
            max_batch_size,
            max_queue_delay_us,
            queue_capacity,
            public: req.public,
            target_in_flight: or(req.target_in_flight, DEFAULT_TARGET_IN_FLIGHT),
            drift_webhook: crate::webhook::checked_url(&req.drift_webhook)?,
            retrain: super::retrain::retrain_policy(&req)?,
            engine: req.engine.clone(),
            batching: batching as i32,
            preferred_batch_sizes,
            instances: req.instances,
            input_limits: req.input_limits.clone(),
            ..Default::default()
        };
        let what = format!(
            "deploy {} as {}",
            crate::state::deployments::describe(&spec),
            req.name
        );
        let kind = command::Kind::Deploy(Deploy {
            deployment: Some(spec),
        });
        self.propose(audited(caller, what, kind), false)
            .await
            .map_err(rejection)?;
        read_deployment(&self.reader, &req.name)
            .map_err(storage)?
            .ok_or_else(|| Error::Internal(format!("deployment {} vanished", req.name)))
    }

    /// Each deployment's replicas by state, for `kiln status`.
    pub fn deployment_health(&self) -> Result<Vec<DeploymentHealth>> {
        Ok(self
            .deployments()?
            .iter()
            .map(|d| {
                let count = |state: ReplicaState| {
                    d.replica_set
                        .iter()
                        .filter(|r| r.state == state as i32)
                        .count() as u32
                };
                DeploymentHealth {
                    name: d.name.clone(),
                    model: crate::state::deployments::target_text(&d.primary),
                    canary: crate::state::deployments::target_text(&d.canary),
                    wanted: d.replicas,
                    ready: count(ReplicaState::ReplicaReady),
                    starting: count(ReplicaState::ReplicaStarting),
                    failed: count(ReplicaState::ReplicaFailed),
                }
            })
            .collect())
    }

    /// Every deployment, by name.
    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
        let mut out = Vec::new();
        for (_, bytes) in self
            .reader
            .scan(keys::DEPLOYMENT.as_bytes(), MAX_DEPLOYMENTS)
            .map_err(storage)?
        {
            out.push(
                <DeploymentRecord as prost::Message>::decode(bytes.as_slice())
                    .map_err(|e| Error::Internal(format!("decode deployment: {e}")))?,
            );
        }
        Ok(out)
    }

    pub async fn list_deployments_call(&self) -> Result<ListDeploymentsResponse> {
        self.read_barrier(false).await?;
        Ok(ListDeploymentsResponse {
            deployments: self.deployments()?,
        })
    }

    pub async fn get_deployment_call(&self, req: GetDeploymentRequest) -> Result<DeploymentRecord> {
        self.read_barrier(false).await?;
        read_deployment(&self.reader, &req.name)
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("deployment {} does not exist", req.name)))
    }

    pub async fn delete_deployment_call(
        &self,
        caller: &Caller,
        req: DeleteDeploymentRequest,
    ) -> Result<()> {
        let what = format!("remove deployment {}", req.name);
        let kind = command::Kind::RemoveDeployment(RemoveDeployment { name: req.name });
        self.propose(audited(caller, what, kind), false)
            .await
            .map_err(rejection)?;
        Ok(())
    }

    /// Applies a replica's report; returns whether it is still wanted.
    pub async fn report_replica_call(&self, req: ReportReplicaRequest) -> Result<bool> {
        let report = req
            .report
            .ok_or_else(|| Error::InvalidArgument("report_replica without a report".into()))?;
        match self
            .propose(command(command::Kind::ReportReplica(report)), false)
            .await
            .map_err(rejection)
        {
            Ok(_) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// CPUs and memory the replicas of every deployment hold, by worker.
    pub fn replica_holds(&self, deployments: &[DeploymentRecord]) -> Vec<Capacity> {
        deployments
            .iter()
            .flat_map(|d| {
                d.replica_set.iter().map(|r| Capacity {
                    worker_id: r.worker_id.clone(),
                    cpus: d.cpus_per_replica,
                    gpus: r.gpus.clone(),
                    memory_bytes: d.memory_per_replica,
                })
            })
            .collect()
    }

    /// The replicas worker `worker_id` should hold now.
    pub fn replica_tasks_for(
        &self,
        worker_id: &str,
        deployments: &[DeploymentRecord],
    ) -> Vec<ReplicaTask> {
        let mut tasks = Vec::new();
        for d in deployments {
            for r in &d.replica_set {
                if r.worker_id == worker_id && r.state != ReplicaState::ReplicaFailed as i32 {
                    tasks.push(ReplicaTask {
                        deployment: d.name.clone(),
                        replica_id: r.id,
                        target: r.target.clone(),
                        max_batch_size: d.max_batch_size,
                        max_queue_delay_us: d.max_queue_delay_us,
                        queue_capacity: d.queue_capacity,
                        threads: d.cpus_per_replica,
                        engine: d.engine.clone(),
                        batching: d.batching,
                        preferred_batch_sizes: d.preferred_batch_sizes.clone(),
                        instances: d.instances,
                        input_limits: d.input_limits.clone(),
                        gpus: r.gpus.clone(),
                    });
                }
            }
        }
        tasks
    }

    /// Every deployment's ready replicas on Alive workers, for the routers.
    pub fn routes(&self, deployments: &[DeploymentRecord]) -> Result<Vec<Route>> {
        let workers = self.workers_by_id()?;
        Ok(deployments
            .iter()
            .map(|d| Route {
                deployment: d.name.clone(),
                canary_percent: if d.canary.is_some() {
                    d.canary_percent
                } else {
                    0
                },
                public: d.public,
                endpoints: d
                    .replica_set
                    .iter()
                    .filter(|r| r.state == ReplicaState::ReplicaReady as i32)
                    .filter_map(|r| {
                        let w = workers.get(&r.worker_id)?;
                        (w.state == WorkerState::Alive as i32).then(|| RouteEndpoint {
                            replica_id: r.id,
                            worker_id: r.worker_id.clone(),
                            http_addr: w.inference_http_addr.clone(),
                            grpc_addr: w.inference_grpc_addr.clone(),
                            canary: r.canary,
                            model: r
                                .target
                                .as_ref()
                                .map(|t| t.model.clone())
                                .unwrap_or_default(),
                            version: r.target.as_ref().map_or(0, |t| t.version),
                        })
                    })
                    .collect(),
            })
            .collect())
    }

    /// One serving round on the leader: applies the autoscaler's decisions, drops
    /// replicas on Down workers, replaces
    /// failed and stuck ones, places what each deployment lacks, and retires old
    /// generations once the new one is ready. `free` is what the workers have
    /// free after training shards and the replicas already placed.
    pub async fn replica_round(&self, now_ms: u64, mut free: Vec<Capacity>) -> Result<()> {
        let deployments = self.deployments()?;
        let workers = self.workers_by_id()?;
        let now = std::time::Instant::now();
        self.autoscaler.prune(now);
        for mut d in deployments {
            if let Some((replicas, reason)) = self.autoscaler.decide(&d, now) {
                let kind = command::Kind::ScaleDeployment(ScaleDeployment {
                    name: d.name.clone(),
                    replicas,
                    reason,
                });
                match self.propose(command(kind), false).await {
                    Ok(_) => d.replicas = replicas,
                    Err(e) => tracing::debug!(deployment = %d.name, error = %e, "scale"),
                }
            }
            let update = plan_replicas(&d, &workers, &mut free, now_ms);
            if update.add.is_empty() && update.remove.is_empty() {
                continue;
            }
            if let Err(e) = self
                .propose(command(command::Kind::UpdateReplicas(update)), false)
                .await
            {
                tracing::debug!(deployment = %d.name, error = %e, "update replicas");
            }
        }
        Ok(())
    }
}

/// The canary replicas `d` wants now (0 without a canary).
pub fn wanted_canaries(d: &DeploymentRecord) -> u32 {
    if d.canary.is_some() {
        canary_replicas(d.replicas, d.canary_percent)
    } else {
        0
    }
}

/// True when replica `r` is part of what `d` runs now: a primary of the current
/// generation, or a canary of the current generation and canary target.
pub fn is_current(d: &DeploymentRecord, r: &ReplicaRecord) -> bool {
    r.generation == d.generation && (!r.canary || same_target(&r.target, &d.canary))
}

/// Decides one deployment's replica changes: pure, so it is tested on its own.
///
/// Replicas on Down workers, failed ones (after a pause) and ones that never
/// became ready are replaced. Each set (primary, canary) gets what it lacks,
/// spread over the workers; surplus is retired, starting ones and the newest
/// first. Replicas of an older generation (or an older canary) keep serving
/// until every set is ready, then retire together; when the cluster has no room
/// for the new ones, one old replica at a time makes room, as long as another
/// ready replica keeps serving.
pub fn plan_replicas(
    d: &DeploymentRecord,
    workers: &BTreeMap<String, WorkerRecord>,
    free: &mut [Capacity],
    now_ms: u64,
) -> UpdateReplicas {
    let mut remove: Vec<u64> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    let ready = ReplicaState::ReplicaReady as i32;
    let failed = ReplicaState::ReplicaFailed as i32;
    let starting = ReplicaState::ReplicaStarting as i32;
    for r in &d.replica_set {
        let down = workers
            .get(&r.worker_id)
            .is_none_or(|w| w.state == WorkerState::Down as i32);
        if down {
            remove.push(r.id);
            reasons.push(format!(
                "replaced replica {} (worker {} is down)",
                r.id, r.worker_id
            ));
        } else if r.state == failed && now_ms >= r.state_since_ms + FAILED_REPLICA_PAUSE_MS {
            remove.push(r.id);
            reasons.push(format!("replaced failed replica {} ({})", r.id, r.reason));
        } else if r.state == starting && now_ms >= r.placed_at_ms + REPLICA_START_TIMEOUT_MS {
            remove.push(r.id);
            reasons.push(format!(
                "replaced replica {}: not ready {} s after placement",
                r.id,
                REPLICA_START_TIMEOUT_MS / 1000
            ));
        }
    }
    let live: Vec<&ReplicaRecord> = d
        .replica_set
        .iter()
        .filter(|r| !remove.contains(&r.id) && r.state != failed)
        .collect();
    let mut held: HashMap<String, usize> = HashMap::new();
    for r in &live {
        *held.entry(r.worker_id.clone()).or_default() += 1;
    }
    let mut add = Vec::new();
    // Whether every replica the primary set, then the canary set, wants is ready.
    let mut set_ready = [true, true];
    let mut short_of_room = false;
    let canaries = wanted_canaries(d);
    let sets = [
        (d.primary.clone(), false, d.replicas),
        (d.canary.clone(), true, canaries),
    ];
    for (target, canary, want) in sets {
        let Some(target) = target else { continue };
        let want = want as usize;
        let current: Vec<&&ReplicaRecord> = live
            .iter()
            .filter(|r| r.canary == canary && is_current(d, r))
            .collect();
        if current.iter().filter(|r| r.state == ready).count() < want {
            set_ready[usize::from(canary)] = false;
        }
        let have = current.len();
        if have < want {
            let placed = spread_on_engine(d, &target, workers, want - have, free, &held);
            if placed.len() < want - have {
                short_of_room = true;
            }
            for ReplicaPlacement { worker_id, gpus } in placed {
                *held.entry(worker_id.clone()).or_default() += 1;
                reasons.push(format!(
                    "placed a {} replica of {}@{} on worker {worker_id}",
                    if canary { "canary" } else { "primary" },
                    target.model,
                    target.version
                ));
                add.push(ReplicaRecord {
                    worker_id,
                    target: Some(target.clone()),
                    canary,
                    gpus,
                    ..Default::default()
                });
            }
        } else if have > want {
            // Scale down: starting replicas first, then the newest.
            let mut extra: Vec<&&ReplicaRecord> = current.clone();
            extra.sort_by_key(|r| (r.state == ready, std::cmp::Reverse(r.id)));
            for r in extra.into_iter().take(have - want) {
                remove.push(r.id);
                reasons.push(format!("scaled down: retired replica {}", r.id));
            }
        }
    }
    let old: Vec<&&ReplicaRecord> = live
        .iter()
        .filter(|r| !is_current(d, r) && !remove.contains(&r.id))
        .collect();
    // An old primary retires once the new primaries are ready, whatever the
    // canary does (a canary that never loads must not hold a rollout forever);
    // an old canary once the new canary set is ready too (until then it keeps the
    // canary's share).
    let retiring: Vec<&&&ReplicaRecord> = old
        .iter()
        .filter(|r| set_ready[0] && (!r.canary || set_ready[1]))
        .collect();
    if !retiring.is_empty() {
        for r in &retiring {
            remove.push(r.id);
            reasons.push(format!(
                "retired replica {} of {} (the new replicas are ready)",
                r.id,
                r.target
                    .as_ref()
                    .map(|t| format!("{}@{}", t.model, t.version))
                    .unwrap_or_default()
            ));
        }
    } else if short_of_room && add.is_empty() {
        let serving = live
            .iter()
            .filter(|r| r.state == ready && !remove.contains(&r.id))
            .count();
        // The oldest old replica, if another ready one keeps serving.
        if let Some(r) = old.iter().min_by_key(|r| r.id) {
            if serving - usize::from(r.state == ready) >= 1 {
                remove.push(r.id);
                reasons.push(format!(
                    "retired replica {} early to make room for the rollout",
                    r.id
                ));
            }
        }
    }
    UpdateReplicas {
        name: d.name.clone(),
        generation: d.generation,
        add,
        remove,
        reason: reasons.join("; "),
        next_replica_id: d.next_replica_id,
    }
}

/// Most GPUs one replica may hold.
pub const MAX_GPUS_PER_REPLICA: u32 = 8;
/// Most memory one replica may be placed with (1 TiB).
pub const MAX_MEMORY_MIB_PER_REPLICA: u64 = 1 << 20;
/// What a replica needs beyond its model's bytes: the runtime, its threads'
/// buffers and a batch's activations.
const REPLICA_BASE_MEMORY_BYTES: u64 = 256 << 20;

/// The memory a replica is placed with when the deployment declares none: the
/// model's files twice (the bytes read, and the engine's optimised copy of
/// its weights) and a fixed allowance for the runtime and activations.
/// Whole MiB, rounded up, so that a redeploy naming it in MiB keeps it.
pub fn estimated_replica_memory(model_bytes: u64) -> u64 {
    let bytes = model_bytes
        .saturating_mul(2)
        .saturating_add(REPLICA_BASE_MEMORY_BYTES);
    bytes.div_ceil(1 << 20).saturating_mul(1 << 20)
}

/// Refuses replicas on `gpus` GPUs that no registered worker could serve: the
/// engine must be ONNX Runtime, and some worker must run it on at least that
/// many GPUs (its library has the CUDA execution provider).
fn check_gpu_serving(
    workers: &BTreeMap<String, WorkerRecord>,
    engine: &str,
    gpus: u32,
) -> Result<()> {
    if gpus > MAX_GPUS_PER_REPLICA {
        return Err(Error::InvalidArgument(format!(
            "--gpus: at most {MAX_GPUS_PER_REPLICA} GPUs per replica, not {gpus}"
        )));
    }
    if engine == ENGINE_TRACT {
        return Err(Error::InvalidArgument(
            "--gpus needs ONNX Runtime: tract serves on CPUs only (drop --engine tract)".into(),
        ));
    }
    let able: Vec<&str> = workers
        .values()
        .filter(|w| {
            w.resources.as_ref().is_some_and(|r| {
                r.gpu_engines.iter().any(|e| e == ENGINE_ONNXRUNTIME) && r.gpus.len() as u32 >= gpus
            })
        })
        .map(|w| w.id.as_str())
        .collect();
    if able.is_empty() {
        let with_gpus: Vec<String> = workers
            .values()
            .filter_map(|w| {
                let r = w.resources.as_ref()?;
                (!r.gpus.is_empty()).then(|| {
                    format!(
                        "{} ({} GPU(s), {})",
                        w.id,
                        r.gpus.len(),
                        if r.gpu_engines.is_empty() {
                            "its ONNX Runtime has no CUDA execution provider"
                        } else {
                            "ONNX Runtime on CUDA"
                        }
                    )
                })
            })
            .collect();
        return Err(Error::InvalidArgument(format!(
            "no worker can serve a replica on {gpus} GPU(s): {}; a worker serves on GPUs when \
             its --onnxruntime-lib is onnxruntime-gpu's library (pip install onnxruntime-gpu) \
             and NVIDIA's driver is loaded",
            if with_gpus.is_empty() {
                "no worker has GPUs".to_string()
            } else {
                format!("workers with GPUs: {}", with_gpus.join(", "))
            }
        )));
    }
    Ok(())
}

/// Most model instances one replica may run.
pub const MAX_INSTANCES: u32 = 16;

/// The preferred batch sizes of a deployment, sorted and each once; each must be
/// 1 to `max_batch_size`, and a deployment that does not batch has none.
fn preferred_sizes(sizes: &[u32], batching: Batching, max_batch_size: u32) -> Result<Vec<u32>> {
    if batching == Batching::Off && !sizes.is_empty() {
        return Err(Error::InvalidArgument(
            "--preferred-batch-sizes needs batching; --max-batch-size 0 turns it off".into(),
        ));
    }
    if let Some(bad) = sizes.iter().find(|&&s| s == 0 || s > max_batch_size) {
        return Err(Error::InvalidArgument(format!(
            "--preferred-batch-sizes: {bad} is not 1 to the max batch size ({max_batch_size})"
        )));
    }
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    Ok(sizes)
}

/// Refuses input limits that do not fit the model version's inputs: an unknown
/// or repeated name, another number of dimensions, a limit under 1 (-1: none).
fn check_input_limits(model: &ModelVersion, limits: &[InputLimit]) -> Result<()> {
    let invalid = |why: String| {
        Err(Error::InvalidArgument(format!(
            "--max-input-shape for {}@{}: {why}",
            model.name, model.version
        )))
    };
    for (i, limit) in limits.iter().enumerate() {
        if limits[..i].iter().any(|l| l.name == limit.name) {
            return invalid(format!("input {:?} is given twice", limit.name));
        }
        let Some(input) = model.inputs.iter().find(|s| s.name == limit.name) else {
            let names: Vec<&str> = model.inputs.iter().map(|s| s.name.as_str()).collect();
            return invalid(format!(
                "{:?} is not an input of the model; it takes {}",
                limit.name,
                names.join(", ")
            ));
        };
        if input.shape.len() != limit.max_shape.len() {
            return invalid(format!(
                "input {:?} has {} dimensions ({:?}), the limit {}",
                limit.name,
                input.shape.len(),
                input.shape,
                limit.max_shape.len()
            ));
        }
        if let Some(bad) = limit.max_shape.iter().find(|&&d| d == 0 || d < -1) {
            return invalid(format!(
                "input {:?}: a limit is a size of 1 or more, or * for none, not {bad}",
                limit.name
            ));
        }
    }
    Ok(())
}

/// Refuses an engine named for a deployment that registration found cannot load
/// the model, with the engine's reason.
fn check_engine(model: &ModelVersion, engine: &str) -> Result<()> {
    match model.refused_engines.get(engine) {
        Some(reason) => Err(Error::InvalidArgument(format!(
            "{}@{} cannot be served by {engine}: {reason}",
            model.name, model.version
        ))),
        None => Ok(()),
    }
}

/// Places `count` replicas of `target` for `d` like [`scheduler::spread`], only on
/// workers that run the deployment's engine or, when it names none, an engine that
/// did not refuse the model at registration (any worker when none did); a
/// replica with GPUs only where that engine runs on the worker's GPUs.
fn spread_on_engine(
    d: &DeploymentRecord,
    target: &ModelTarget,
    workers: &BTreeMap<String, WorkerRecord>,
    count: usize,
    free: &mut [Capacity],
    held: &HashMap<String, usize>,
) -> Vec<ReplicaPlacement> {
    let need = ReplicaNeed {
        cpus: d.cpus_per_replica,
        memory_bytes: d.memory_per_replica,
        gpus: d.gpus_per_replica,
    };
    if d.engine.is_empty() && target.refused_engines.is_empty() && need.gpus == 0 {
        return scheduler::spread(count, &need, free, held);
    }
    let eligible_worker = |worker_id: &str| {
        workers
            .get(worker_id)
            .and_then(|w| w.resources.as_ref())
            .is_some_and(|r| serves_on(d, target, r))
    };
    let mut eligible: Vec<Capacity> = free
        .iter()
        .filter(|c| eligible_worker(&c.worker_id))
        .cloned()
        .collect();
    let chosen = scheduler::spread(count, &need, &mut eligible, held);
    for left in eligible {
        if let Some(c) = free.iter_mut().find(|c| c.worker_id == left.worker_id) {
            *c = left;
        }
    }
    chosen
}

/// True when a worker with `resources` can serve replicas of `d` on `target`: it
/// runs the deployment's engine (or, when it names none, one that did not refuse
/// the model) and, for replicas with GPUs, runs that engine on its GPUs.
fn serves_on(d: &DeploymentRecord, target: &ModelTarget, resources: &Resources) -> bool {
    let serves = |engine: &String| match d.engine.as_str() {
        "" => !target.refused_engines.contains(engine),
        named => engine == named,
    };
    if d.gpus_per_replica > 0 {
        resources.gpu_engines.iter().any(serves)
            && resources.gpus.len() as u32 >= d.gpus_per_replica
    } else {
        resources.engines.iter().any(serves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, state: WorkerState) -> (String, WorkerRecord) {
        (
            id.to_string(),
            WorkerRecord {
                id: id.into(),
                state: state as i32,
                ..Default::default()
            },
        )
    }

    fn capacity(id: &str) -> Capacity {
        Capacity {
            worker_id: id.into(),
            cpus: 4,
            gpus: vec![],
            memory_bytes: 1 << 34,
        }
    }

    fn target(version: u64) -> Option<ModelTarget> {
        Some(ModelTarget {
            model: "m".into(),
            version,
            artifact: format!("m-model@{version}"),
            requested: format!("m@{version}"),
            ..Default::default()
        })
    }

    fn replica(id: u64, worker: &str, generation: u64, state: ReplicaState) -> ReplicaRecord {
        ReplicaRecord {
            id,
            worker_id: worker.into(),
            target: target(generation),
            state: state as i32,
            generation,
            ..Default::default()
        }
    }

    fn deployment(generation: u64, replicas: u32, set: Vec<ReplicaRecord>) -> DeploymentRecord {
        DeploymentRecord {
            name: "d".into(),
            primary: target(generation),
            replicas,
            min_replicas: replicas,
            max_replicas: replicas,
            cpus_per_replica: 1,
            generation,
            replica_set: set,
            ..Default::default()
        }
    }

    #[test]
    fn replicas_of_a_named_engine_go_only_to_workers_that_run_it() {
        let with_engines = |id: &str, engines: &[&str]| {
            let (id, mut record) = worker(id, WorkerState::Alive);
            record.resources = Some(Resources {
                engines: engines.iter().map(|e| e.to_string()).collect(),
                ..Default::default()
            });
            (id, record)
        };
        let workers = BTreeMap::from([
            with_engines("a", &[ENGINE_TRACT]),
            with_engines("b", &[ENGINE_ONNXRUNTIME, ENGINE_TRACT]),
            with_engines("c", &[ENGINE_TRACT]),
        ]);
        let mut free = vec![capacity("a"), capacity("b"), capacity("c")];
        let d = DeploymentRecord {
            engine: ENGINE_ONNXRUNTIME.into(),
            ..deployment(1, 3, vec![])
        };
        let plan = plan_replicas(&d, &workers, &mut free, 0);
        let placed: Vec<&str> = plan.add.iter().map(|r| r.worker_id.as_str()).collect();
        assert_eq!(placed, ["b", "b", "b"]);
        // What the placement took is taken from b's capacity, not another's.
        assert_eq!(free.iter().map(|c| c.cpus).collect::<Vec<_>>(), [4, 1, 4]);

        // Without an engine named, replicas spread over every worker.
        let mut free = vec![capacity("a"), capacity("b"), capacity("c")];
        let plan = plan_replicas(&deployment(1, 3, vec![]), &workers, &mut free, 0);
        let mut placed: Vec<&str> = plan.add.iter().map(|r| r.worker_id.as_str()).collect();
        placed.sort();
        assert_eq!(placed, ["a", "b", "c"]);

        // A model tract refused at registration (strings, external data) goes
        // only where another engine runs, though the deployment names none.
        let mut free = vec![capacity("a"), capacity("b"), capacity("c")];
        let mut d = deployment(1, 2, vec![]);
        if let Some(target) = d.primary.as_mut() {
            target.refused_engines = vec![ENGINE_TRACT.into()];
        }
        let plan = plan_replicas(&d, &workers, &mut free, 0);
        let placed: Vec<&str> = plan.add.iter().map(|r| r.worker_id.as_str()).collect();
        assert_eq!(placed, ["b", "b"]);
    }

    #[test]
    fn gpu_replicas_go_to_free_gpus_of_workers_whose_onnxruntime_has_cuda() {
        let host = |id: &str, gpus: u32, cuda: bool| {
            let (id, mut record) = worker(id, WorkerState::Alive);
            record.resources = Some(Resources {
                engines: vec![ENGINE_ONNXRUNTIME.into(), ENGINE_TRACT.into()],
                gpu_engines: if cuda {
                    vec![ENGINE_ONNXRUNTIME.into()]
                } else {
                    vec![]
                },
                gpus: (0..gpus)
                    .map(|index| Gpu {
                        index,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
            (id, record)
        };
        // a: GPUs but CPU-only onnxruntime; b: two GPUs with CUDA, GPU 0 held by
        // a training shard; c: no GPUs.
        let workers =
            BTreeMap::from([host("a", 2, false), host("b", 2, true), host("c", 0, false)]);
        let with_gpus = |id: &str, gpus: &[u32]| Capacity {
            gpus: gpus.to_vec(),
            ..capacity(id)
        };
        let mut free = vec![with_gpus("a", &[0, 1]), with_gpus("b", &[1]), capacity("c")];
        let d = DeploymentRecord {
            gpus_per_replica: 1,
            ..deployment(1, 2, vec![])
        };
        let plan = plan_replicas(&d, &workers, &mut free, 0);
        let placed: Vec<(&str, &[u32])> = plan
            .add
            .iter()
            .map(|r| (r.worker_id.as_str(), r.gpus.as_slice()))
            .collect();
        assert_eq!(placed, [("b", &[1][..])], "one free CUDA GPU: one replica");
        assert!(free[1].gpus.is_empty(), "the replica's GPU is taken");
        assert_eq!(free[0].gpus, [0, 1], "a's GPUs stay free: no CUDA there");

        assert!(check_gpu_serving(&workers, "", 2).is_ok());
        let tract = check_gpu_serving(&workers, ENGINE_TRACT, 1);
        assert!(
            matches!(&tract, Err(Error::InvalidArgument(m)) if m.contains("tract serves on CPUs only")),
            "{tract:?}"
        );
        let many = check_gpu_serving(&workers, "", 3);
        assert!(
            matches!(&many, Err(Error::InvalidArgument(m))
                if m.contains("no worker can serve a replica on 3 GPU(s)")
                    && m.contains("a (2 GPU(s), its ONNX Runtime has no CUDA execution provider)")
                    && m.contains("onnxruntime-gpu")),
            "{many:?}"
        );
        let none = check_gpu_serving(&BTreeMap::from([host("c", 0, false)]), "", 1);
        assert!(
            matches!(&none, Err(Error::InvalidArgument(m)) if m.contains("no worker has GPUs")),
            "{none:?}"
        );
        assert_eq!(
            estimated_replica_memory(100 << 20),
            456 << 20,
            "twice the model and 256 MiB"
        );
        assert_eq!(estimated_replica_memory(1), 257 << 20, "whole MiB, up");
    }

    #[test]
    fn preferred_sizes_and_input_limits_are_checked_at_deploy() {
        assert_eq!(
            preferred_sizes(&[8, 2, 8], Batching::Declared, 16),
            Ok(vec![2, 8])
        );
        for (sizes, batching, needle) in [
            (
                &[0][..],
                Batching::Probed,
                "0 is not 1 to the max batch size (16)",
            ),
            (&[32][..], Batching::Probed, "32 is not 1"),
            (&[2][..], Batching::Off, "needs batching"),
        ] {
            let refused = preferred_sizes(
                sizes,
                batching,
                if batching == Batching::Off { 0 } else { 16 },
            );
            assert!(
                matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains(needle)),
                "{sizes:?}: {refused:?}"
            );
        }
        let model = ModelVersion {
            name: "bert".into(),
            version: 1,
            inputs: vec![TensorSpec {
                name: "input_ids".into(),
                datatype: "INT64".into(),
                shape: vec![-1, -1],
            }],
            ..Default::default()
        };
        let limit = |name: &str, dims: &[i64]| InputLimit {
            name: name.into(),
            max_shape: dims.to_vec(),
        };
        assert_eq!(
            check_input_limits(&model, &[limit("input_ids", &[-1, 512])]),
            Ok(())
        );
        for (limits, needle) in [
            (
                vec![limit("ids", &[-1, 512])],
                "\"ids\" is not an input of the model; it takes input_ids",
            ),
            (vec![limit("input_ids", &[512])], "has 2 dimensions"),
            (vec![limit("input_ids", &[-1, 0])], "not 0"),
            (
                vec![limit("input_ids", &[-1, 8]), limit("input_ids", &[-1, 9])],
                "given twice",
            ),
        ] {
            let refused = check_input_limits(&model, &limits);
            assert!(
                matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains(needle) && m.contains("bert@1")),
                "{limits:?}: {refused:?}"
            );
        }
    }

    #[test]
    fn an_engine_that_refused_the_model_is_refused_at_deploy_with_its_reason() {
        let model = ModelVersion {
            name: "text".into(),
            version: 2,
            refused_engines: [(ENGINE_TRACT.to_string(), "strings".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(check_engine(&model, ENGINE_ONNXRUNTIME), Ok(()));
        assert_eq!(check_engine(&model, ""), Ok(()));
        assert_eq!(
            check_engine(&model, ENGINE_TRACT),
            Err(Error::InvalidArgument(
                "text@2 cannot be served by tract: strings".into()
            ))
        );
    }

    #[test]
    fn a_rollout_keeps_old_replicas_until_the_new_ones_are_ready() {
        let workers = BTreeMap::from([
            worker("a", WorkerState::Alive),
            worker("b", WorkerState::Alive),
        ]);
        let mut free = vec![capacity("a"), capacity("b")];
        let old = vec![
            replica(1, "a", 1, ReplicaState::ReplicaReady),
            replica(2, "b", 1, ReplicaState::ReplicaReady),
        ];
        let plan = plan_replicas(&deployment(2, 2, old.clone()), &workers, &mut free, 0);
        assert_eq!(plan.add.len(), 2, "{plan:?}");
        assert!(
            plan.remove.is_empty(),
            "nothing retires before the new ones are ready"
        );
        let mut set = old.clone();
        set.push(replica(3, "a", 2, ReplicaState::ReplicaReady));
        set.push(replica(4, "b", 2, ReplicaState::ReplicaStarting));
        let plan = plan_replicas(&deployment(2, 2, set.clone()), &workers, &mut free, 0);
        assert!(plan.add.is_empty() && plan.remove.is_empty(), "{plan:?}");
        set[3].state = ReplicaState::ReplicaReady as i32;
        let plan = plan_replicas(&deployment(2, 2, set), &workers, &mut free, 0);
        assert_eq!(plan.remove, vec![1, 2]);
    }

    #[test]
    fn replicas_on_down_workers_and_failed_ones_are_replaced() {
        let workers = BTreeMap::from([
            worker("a", WorkerState::Alive),
            worker("b", WorkerState::Down),
        ]);
        let mut free = vec![capacity("a")];
        let mut failed = replica(2, "a", 1, ReplicaState::ReplicaFailed);
        failed.state_since_ms = 1_000;
        let set = vec![replica(1, "b", 1, ReplicaState::ReplicaReady), failed];
        let plan = plan_replicas(&deployment(1, 2, set.clone()), &workers, &mut free, 2_000);
        assert_eq!(plan.remove, vec![1], "the failed one waits out its pause");
        assert_eq!(plan.add.len(), 2);
        assert!(plan.add.iter().all(|r| r.worker_id == "a"));
        let mut free = vec![capacity("a")];
        let plan = plan_replicas(
            &deployment(1, 2, set),
            &workers,
            &mut free,
            1_000 + FAILED_REPLICA_PAUSE_MS,
        );
        assert_eq!(plan.remove, vec![1, 2]);
        assert!(plan.reason.contains("worker b is down"), "{}", plan.reason);
    }

    #[test]
    fn a_full_cluster_rolls_out_one_replica_at_a_time() {
        let workers = BTreeMap::from([worker("a", WorkerState::Alive)]);
        let old = vec![
            replica(1, "a", 1, ReplicaState::ReplicaReady),
            replica(2, "a", 1, ReplicaState::ReplicaReady),
        ];
        // Both CPUs of a are taken by the old replicas.
        let mut full = vec![Capacity {
            cpus: 0,
            ..capacity("a")
        }];
        let plan = plan_replicas(&deployment(2, 2, old.clone()), &workers, &mut full, 0);
        assert!(plan.add.is_empty());
        assert_eq!(
            plan.remove,
            vec![1],
            "one old replica makes room: {}",
            plan.reason
        );
        // With only one old replica left and nothing new ready, it keeps serving.
        let plan = plan_replicas(&deployment(2, 2, old[1..].to_vec()), &workers, &mut full, 0);
        assert!(plan.remove.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_canary_gets_its_own_replicas_and_they_retire_with_it() {
        let workers = BTreeMap::from([worker("a", WorkerState::Alive)]);
        let mut free = vec![capacity("a")];
        let mut d = deployment(1, 3, vec![]);
        d.canary = target(2);
        d.canary_percent = 20;
        let plan = plan_replicas(&d, &workers, &mut free, 0);
        let canaries = plan.add.iter().filter(|r| r.canary).count();
        assert_eq!((plan.add.len(), canaries), (4, 1), "3 primary + 1 canary");
        assert_eq!(canary_replicas(10, 20), 2);
        assert_eq!(canary_replicas(1, 5), 1);
        // Removing the canary keeps the primaries and retires the canary once
        // the primaries are ready.
        let mut set: Vec<ReplicaRecord> = (1..=3)
            .map(|id| replica(id, "a", 1, ReplicaState::ReplicaReady))
            .collect();
        let mut canary = replica(4, "a", 1, ReplicaState::ReplicaReady);
        canary.canary = true;
        canary.target = target(2);
        set.push(canary);
        let plan = plan_replicas(&deployment(1, 3, set), &workers, &mut free, 0);
        assert!(plan.add.is_empty(), "{plan:?}");
        assert_eq!(plan.remove, vec![4]);
    }

    #[test]
    fn a_canary_that_never_loads_does_not_hold_the_old_primaries() {
        let workers = BTreeMap::from([worker("a", WorkerState::Alive)]);
        let mut free = vec![capacity("a")];
        // Generation 2 serves version 2 with a canary of version 3 that keeps
        // failing to load; generation 1's primaries and canary still run.
        let mut d = deployment(2, 2, vec![]);
        d.canary = target(3);
        d.canary_percent = 10;
        let mut old_canary = replica(3, "a", 1, ReplicaState::ReplicaReady);
        old_canary.canary = true;
        old_canary.target = target(9);
        let mut failing = replica(6, "a", 2, ReplicaState::ReplicaStarting);
        failing.canary = true;
        failing.target = target(3);
        d.replica_set = vec![
            replica(1, "a", 1, ReplicaState::ReplicaReady),
            replica(2, "a", 1, ReplicaState::ReplicaReady),
            old_canary,
            replica(4, "a", 2, ReplicaState::ReplicaReady),
            replica(5, "a", 2, ReplicaState::ReplicaReady),
            failing,
        ];
        let plan = plan_replicas(&d, &workers, &mut free, 0);
        assert_eq!(
            plan.remove,
            vec![1, 2],
            "the old primaries retire once the new ones are ready; the old canary keeps \
             the canary's share until the new canary is ready: {}",
            plan.reason
        );
        assert!(plan.add.is_empty(), "{plan:?}");
    }
}
