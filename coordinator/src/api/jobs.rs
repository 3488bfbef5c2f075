//! Training jobs: submit (the spec checked whole, the dataset and its columns
//! checked against the cluster), list, show, cancel, logs; the shards' reports;
//! and, on the leader, the scheduling round that places queued gangs, fails
//! attempts whose workers went Down, and hands each worker its shard tasks.

use std::collections::{BTreeMap, HashMap};

use kiln_common::jobspec::{
    ArtifactRef, Builtin, Code, CommandJob, DataFormat, DataSpec, JobSpec, Runtime, Workload,
};
use kiln_common::{Error, Result};
use kiln_proto::v1::*;

use super::grpc::{audited, command, Api};
use super::{rejection, storage};
use crate::auth::{self, Caller};
use crate::health::Stopping;
use crate::scheduler::{self, Capacity, Decision, Gang};
use crate::state::jobs::{read_job, MAX_JOB_LOG_LINES};
use crate::state::keys;

/// Most jobs one listing returns.
const MAX_LISTED_JOBS: usize = 10_000;
// Most active jobs the scheduler looks at in one round: the ones apply counts.
use crate::state::capacity::MAX_ACTIVE_JOBS;
/// Longest a placed shard may take to report itself (pull its data, bind its
/// port) before the leader fails the attempt.
pub const SHARD_START_TIMEOUT_MS: u64 = 120_000;
/// How long after placing an attempt the leader starts to judge its shards by
/// the workers' heartbeats: a worker lists a shard from the heartbeat after the
/// one that brought it, a few seconds at most.
pub const SHARD_GONE_GRACE_MS: u64 = 10_000;

/// A job record as `caller` sees it: never the ring key or the job's token, which
/// only cluster nodes hold (the attempt's workers, through their heartbeats), and
/// the attempt's NCCL unique id only for a cluster node (the gang's workers meet
/// through it; anyone else holding it could join the gang's communicator).
fn without_secrets(mut job: JobRecord, caller: &Caller) -> JobRecord {
    job.ring_key.clear();
    job.job_token.clear();
    if !matches!(caller, Caller::Node | Caller::Insecure) {
        job.nccl_id.clear();
    }
    job
}

/// Why the built-in trainer's model cannot train in a shard's memory: the
/// shard's `memory_mib_per_shard` when set (`limit_bytes`), else the largest live
/// worker's memory (`most_bytes`, 0: unknown, not checked). The parameters are
/// counted with one output and the features the spec names (at least one), so
/// the count is a lower bound: a model refused here could never train, and the
/// worker, and the replicas it serves, are not OOM-killed finding out.
fn model_too_big(builtin: &Builtin, limit_bytes: u64, most_bytes: u64) -> Option<String> {
    let inputs = (builtin.data.features.len() as u64).max(1);
    let parameters = builtin.model.parameters(inputs, 1);
    let per_parameter = builtin.optimizer.kind.training_bytes_per_parameter();
    let needed = parameters.saturating_mul(per_parameter);
    let (available, what) = match (limit_bytes, most_bytes) {
        (0, 0) => return None,
        (0, most) => (most, "the largest live worker's memory"),
        (limit, _) => (limit, "resources.memory_mib_per_shard"),
    };
    (needed > available).then(|| {
        format!(
            "model: hidden = {:?} holds at least {parameters} parameters, which need at least {} MiB \
             to train ({per_parameter} bytes each: weight, gradient, optimizer state, all-reduce), \
             more than {what} ({} MiB); make the layers narrower",
            builtin.model.hidden,
            needed >> 20,
            available >> 20
        )
    })
}

/// A new attempt's own token for a command job (its record's role, run and
/// experiment are set at apply): the bearer text and the record.
fn job_token(job: &JobRecord) -> (String, Option<TokenRecord>) {
    let command = JobSpec::parse(&job.spec_toml)
        .ok()
        .is_some_and(|spec| spec.command().is_some());
    if !command {
        return (String::new(), None);
    }
    let name = crate::state::jobs::job_token_name(job.id);
    let (bearer, record) = auth::mint(&name, Role::Job, kiln_common::clock::now_ms(), 0);
    (bearer, Some(record))
}

/// What one shard of `job` holds on `worker_id`.
fn shard_holds(job: &JobRecord, worker_id: &str, gpus: &[u32]) -> Capacity {
    Capacity {
        worker_id: worker_id.to_string(),
        cpus: job.cpus_per_shard,
        gpus: gpus.to_vec(),
        memory_bytes: job.memory_per_shard,
    }
}

/// Why a restarted gang must not be placed yet: a worker that is not Down still
/// runs a shard of the job's earlier attempt (stopping it takes a heartbeat), or
/// has not told this leader what it runs. A Down worker's shards have stopped by
/// themselves: their lease ([`crate::health::shard_lease_ms`]) ends before the
/// worker is Down.
fn stopping_reason(stopping: &Stopping) -> String {
    match stopping {
        Stopping::Running(worker, shard) => format!(
            "attempt {}'s rank {} is still stopping on worker {worker}",
            shard.attempt, shard.rank
        ),
        Stopping::Unheard(worker) => {
            format!("worker {worker} has not told this leader which shards it runs")
        }
    }
}

/// The command that records why a pending job waits, or `None` when the job
/// already says so. A restarted or preempted job keeps saying why and adds what
/// it waits for.
fn waiting(job: &JobRecord, reason: String) -> Option<command::Kind> {
    let reason = if job.attempt > 0 {
        let why = job.reason.split(" (waiting: ").next().unwrap_or_default();
        format!("{why} (waiting: {reason})")
    } else {
        reason
    };
    if reason == job.reason {
        return None;
    }
    Some(command::Kind::SetJobWaiting(SetJobWaiting {
        job_id: job.id,
        reason,
    }))
}

/// The spec as flat `section.key` params for the job's run.
fn params_of(spec: &JobSpec) -> BTreeMap<String, String> {
    fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            serde_json::Value::String(s) => {
                out.insert(prefix.to_string(), s.clone());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(value) = serde_json::to_value(spec) {
        flatten("", &value, &mut out);
    }
    out
}

/// Reads the column names from the first bytes of a CSV file.
fn csv_header(first_chunk: &[u8]) -> Result<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(first_chunk);
    let header = reader.headers().map_err(|e| {
        Error::InvalidArgument(format!("the dataset's CSV header cannot be read: {e}"))
    })?;
    Ok(header.iter().map(|h| h.trim().to_string()).collect())
}

impl Api {
    /// Checks a spec against the cluster: the dataset version exists and holds a
    /// file of the spec's format, the label and features are among its columns
    /// (CSV), and some worker could hold one shard.
    async fn check_job(&self, spec: &JobSpec) -> Result<()> {
        let mut problems = Vec::new();
        match &spec.workload {
            Workload::Builtin(builtin) => self.check_dataset(&builtin.data, &mut problems).await?,
            Workload::Command(job) => self.check_command(job, &mut problems).await?,
        }
        self.check_fits(spec, &mut problems)?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(
                kiln_common::jobspec::SpecErrors(problems).to_string(),
            ))
        }
    }

    /// Whether an artifact version exists (`None`), or the problem with it.
    async fn missing_version(&self, key: &str, artifact: &ArtifactRef) -> Result<Option<String>> {
        match self
            .get_artifact_call(GetArtifactRequest {
                name: artifact.name.clone(),
                reference: artifact.version.to_string(),
            })
            .await
        {
            Ok(_) => Ok(None),
            Err(Error::NotFound(_)) => Ok(Some(format!("{key}: {artifact} does not exist"))),
            Err(e) => Err(e),
        }
    }

    /// A command job's code and data versions exist, and its code is not a path
    /// on the submitting machine (the CLI pushes that).
    async fn check_command(&self, job: &CommandJob, problems: &mut Vec<String>) -> Result<()> {
        match &job.command.code {
            Some(Code::Path(path)) => problems.push(format!(
                "command.code = \"{path}\" is a directory on the submitting machine; submit the spec with `kiln train submit`, which pushes it as an artifact, or name an artifact version (NAME@NUMBER)"
            )),
            Some(Code::Artifact(code)) => {
                problems.extend(self.missing_version("command.code", code).await?);
            }
            None => {}
        }
        if let Some(data) = &job.data {
            problems.extend(self.missing_version("data.artifact", data).await?);
        }
        if let Runtime::Image(image) = &job.environment.runtime {
            problems.push(format!(
                "environment.image = \"{image}\": this kiln runs command jobs as processes on the workers (environment.python or the worker's PATH); container ranks are not built yet"
            ));
        }
        Ok(())
    }

    /// The built-in trainer's dataset version exists and holds a file of the
    /// spec's format whose columns (CSV) include the label and features.
    async fn check_dataset(&self, spec: &DataSpec, problems: &mut Vec<String>) -> Result<()> {
        let dataset = self
            .get_artifact_call(GetArtifactRequest {
                name: spec.artifact.clone(),
                reference: spec.version.to_string(),
            })
            .await;
        match dataset {
            Err(Error::NotFound(_)) => problems.push(format!(
                "data.artifact: {}@{} does not exist",
                spec.artifact, spec.version
            )),
            Err(e) => return Err(e),
            Ok(found) => {
                let version = found.version.unwrap_or_default();
                let paths: Vec<&str> = version.files.iter().map(|f| f.path.as_str()).collect();
                let chosen = spec.files(&paths);
                match chosen.first() {
                    None => problems.push(format!(
                        "data.artifact: {}@{} holds no {} file (its files: {})",
                        spec.artifact,
                        spec.version,
                        spec.format.extension(),
                        paths.join(", ")
                    )),
                    Some(path) if spec.format == DataFormat::Csv => {
                        let file = version
                            .files
                            .iter()
                            .find(|f| f.path == *path)
                            .ok_or_else(|| Error::Internal("chosen file vanished".into()))?;
                        if let Some(first) = file.chunks.first() {
                            let replicas = found
                                .sources
                                .iter()
                                .find(|s| s.id == first.id)
                                .map(|s| s.replicas.clone())
                                .unwrap_or_default();
                            let id = kiln_common::chunking::ChunkId::from_slice(
                                &first.id,
                                "dataset chunk",
                            )?;
                            let bytes = self.peers.fetch_chunk(id, &replicas).await?;
                            let columns = csv_header(&bytes)?;
                            let wanted = std::iter::once(&spec.label).chain(spec.features.iter());
                            for column in wanted {
                                if !columns.contains(column) {
                                    problems.push(format!(
                                        "column '{column}' is not in {path} of {}@{} (its columns: {})",
                                        spec.artifact,
                                        spec.version,
                                        columns.join(", ")
                                    ));
                                }
                            }
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Some worker could hold one shard.
    fn check_fits(&self, spec: &JobSpec, problems: &mut Vec<String>) -> Result<()> {
        let workers = self.reader.workers().map_err(storage)?;
        let usable: Vec<&WorkerRecord> = workers
            .iter()
            .filter(|w| w.state != WorkerState::Down as i32)
            .collect();
        let memory_bytes = spec.resources.memory_mib_per_shard << 20;
        let fits = usable.iter().any(|w| {
            let r = w.resources.clone().unwrap_or_default();
            r.cpu_cores >= spec.resources.cpus_per_shard
                && r.gpus.len() as u32 >= spec.resources.gpus_per_shard
                && r.memory_bytes >= memory_bytes
        });
        if !fits {
            let most = |of: &dyn Fn(&kiln_proto::v1::Resources) -> u64| {
                usable
                    .iter()
                    .filter_map(|w| w.resources.as_ref().map(of))
                    .max()
                    .unwrap_or(0)
            };
            let most_gpus = most(&|r| r.gpus.len() as u64);
            let most_cpus = most(&|r| u64::from(r.cpu_cores));
            let most_mib = most(&|r| r.memory_bytes >> 20);
            problems.push(format!(
                "resources: a shard needs {} CPU(s), {} GPU(s) and {} MiB of memory; no worker has that (of {} live worker(s), the most are {most_cpus} CPU(s), {most_gpus} GPU(s) and {most_mib} MiB)",
                spec.resources.cpus_per_shard,
                spec.resources.gpus_per_shard,
                spec.resources.memory_mib_per_shard,
                usable.len()
            ));
        }
        if let Some(builtin) = spec.builtin() {
            let most_bytes = usable
                .iter()
                .filter_map(|w| w.resources.as_ref().map(|r| r.memory_bytes))
                .max()
                .unwrap_or(0);
            if let Some(problem) = model_too_big(builtin, memory_bytes, most_bytes) {
                problems.push(problem);
            }
        }
        Ok(())
    }

    /// Checks and queues a job.
    pub async fn submit_job_call(
        &self,
        caller: &Caller,
        req: SubmitJobRequest,
    ) -> Result<SubmitJobResponse> {
        if req.spec_toml.len() > crate::state::jobs::MAX_SPEC_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the job spec is {} bytes; at most {}",
                req.spec_toml.len(),
                crate::state::jobs::MAX_SPEC_BYTES
            )));
        }
        let spec =
            JobSpec::parse(&req.spec_toml).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.check_job(&spec).await?;
        let run_id = format!("{:032x}", rand::random::<u128>());
        let job = JobRecord {
            name: spec.name.clone(),
            experiment: spec.experiment.clone(),
            spec_toml: req.spec_toml.clone(),
            spec_digest: blake3::hash(req.spec_toml.as_bytes()).to_hex().to_string(),
            priority: spec.priority,
            shards_wanted: spec.resources.shards,
            cpus_per_shard: spec.resources.cpus_per_shard,
            gpus_per_shard: spec.resources.gpus_per_shard,
            memory_per_shard: spec.resources.memory_mib_per_shard << 20,
            max_failures: spec.max_failures,
            run_id: run_id.clone(),
            ..Default::default()
        };
        let kind = command::Kind::SubmitJob(SubmitJob {
            job: Some(job),
            params: params_of(&spec),
        });
        let what = format!(
            "submit job {} ({} shard(s))",
            spec.name, spec.resources.shards
        );
        let result = self
            .propose(audited(caller, what, kind), false)
            .await
            .map_err(rejection)?;
        Ok(SubmitJobResponse {
            job_id: result.value,
            run_id,
        })
    }

    /// Lists jobs, newest first.
    pub async fn list_jobs_call(
        &self,
        caller: &Caller,
        req: ListJobsRequest,
    ) -> Result<ListJobsResponse> {
        self.read_barrier(false).await?;
        let max = match req.max_results {
            0 => 1000,
            n => (n as usize).min(MAX_LISTED_JOBS),
        };
        let seq =
            crate::state::machine::read_counter(&self.reader, keys::JOB_SEQ).map_err(storage)?;
        let mut jobs = Vec::new();
        let mut id = seq;
        while id > 0 && jobs.len() < max {
            if let Some(job) = read_job(&self.reader, id).map_err(storage)? {
                jobs.push(without_secrets(job, caller));
            }
            id -= 1;
        }
        Ok(ListJobsResponse { jobs })
    }

    /// Returns one job.
    pub async fn get_job_call(
        &self,
        caller: &Caller,
        req: GetJobRequest,
    ) -> Result<GetJobResponse> {
        self.read_barrier(false).await?;
        let job = read_job(&self.reader, req.job_id)
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("job {} does not exist", req.job_id)))?;
        Ok(GetJobResponse {
            job: Some(without_secrets(job, caller)),
        })
    }

    /// Cancels a job; its shards stop at their next heartbeat or report.
    pub async fn cancel_job_call(&self, caller: &Caller, req: CancelJobRequest) -> Result<()> {
        let kind = command::Kind::CancelJob(CancelJob {
            job_id: req.job_id,
            reason: format!("cancelled by {}", caller.name()),
        });
        let what = format!("cancel job {}", req.job_id);
        self.propose(audited(caller, what, kind), false)
            .await
            .map_err(rejection)?;
        Ok(())
    }

    /// Returns a job's log lines after `after_seq`.
    pub async fn job_logs_call(&self, req: JobLogsRequest) -> Result<JobLogsResponse> {
        self.read_barrier(false).await?;
        let job = read_job(&self.reader, req.job_id)
            .map_err(storage)?
            .ok_or_else(|| Error::NotFound(format!("job {} does not exist", req.job_id)))?;
        let max = match req.max_lines {
            0 => 1000,
            n => (n as u64).min(MAX_JOB_LOG_LINES) as usize,
        };
        let first = req
            .after_seq
            .saturating_add(1)
            .max(job.log_seq.saturating_sub(MAX_JOB_LOG_LINES) + 1);
        let mut lines = Vec::new();
        let after = keys::job_log(job.id, first - 1);
        let prefix = keys::job_logs(job.id);
        for (_, bytes) in self
            .reader
            .scan_after(&prefix, Some(&after), max)
            .map_err(storage)?
        {
            lines.push(
                <JobLogLine as prost::Message>::decode(bytes.as_slice())
                    .map_err(|e| Error::Internal(format!("decode job log line: {e}")))?,
            );
        }
        Ok(JobLogsResponse { lines })
    }

    /// Applies a shard's report; returns whether the shard should keep running.
    pub async fn report_shard_call(&self, req: ReportShardRequest) -> Result<bool> {
        let report = req
            .report
            .ok_or_else(|| Error::InvalidArgument("report_shard without a report".into()))?;
        match self
            .propose(command(command::Kind::ReportShard(report)), false)
            .await
        {
            Ok(result) => Ok(result.value == 1),
            Err(Error::InvalidArgument(msg)) if msg.starts_with("STALE:") => Ok(false),
            Err(e) => Err(rejection(e)),
        }
    }

    /// The pending and running jobs, for `kiln status`.
    pub fn job_health(&self) -> Result<Vec<JobHealth>> {
        Ok(self
            .active_jobs()?
            .iter()
            .map(|j| JobHealth {
                id: j.id,
                name: j.name.clone(),
                state: kiln_common::status::job_state_name(j.state).to_string(),
                reason: j.reason.clone(),
            })
            .collect())
    }

    /// The jobs that have not ended.
    fn active_jobs(&self) -> Result<Vec<JobRecord>> {
        let mut jobs = Vec::new();
        for (key, _) in self
            .reader
            .scan(keys::JOB_ACTIVE.as_bytes(), MAX_ACTIVE_JOBS)
            .map_err(storage)?
        {
            let id: u64 = std::str::from_utf8(&key[keys::JOB_ACTIVE.len()..])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::Internal("corrupt active-job key".into()))?;
            if let Some(job) = read_job(&self.reader, id).map_err(storage)? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// The shards worker `worker_id` should run now.
    pub fn shard_tasks_for(&self, worker_id: &str) -> Result<Vec<ShardTask>> {
        let mut tasks = Vec::new();
        for job in self.active_jobs()? {
            if job.state != JobState::Running as i32 {
                continue;
            }
            let world = job.shards.len() as u32;
            for shard in &job.shards {
                let live = shard.state != ShardState::Failed as i32
                    && shard.state != ShardState::Succeeded as i32;
                if shard.worker_id == worker_id && live {
                    tasks.push(ShardTask {
                        job_id: job.id,
                        attempt: job.attempt,
                        rank: shard.rank,
                        world,
                        session_id: job.session_id,
                        ring_key: job.ring_key.clone(),
                        job_token: job.job_token.clone(),
                        spec_toml: job.spec_toml.clone(),
                        run_id: job.run_id.clone(),
                        checkpoint: job.checkpoint.clone(),
                        checkpoint_step: job.checkpoint_step,
                        gpus: shard.gpus.clone(),
                    });
                }
            }
        }
        Ok(tasks)
    }

    /// One scheduling round on the leader: fails running attempts that lost a
    /// worker or never started, then places what the queue allows. Returns what
    /// the workers have free after running shards, serving replicas and this
    /// round's placements, for the serving round.
    pub async fn schedule_round(&self, now_ms: u64) -> Result<Vec<Capacity>> {
        let jobs = self.active_jobs()?;
        let workers = self.workers_by_id()?;
        // Capacity: every Alive worker, less what running shards hold.
        let mut total: Vec<Capacity> = workers
            .values()
            .filter(|w| w.state == WorkerState::Alive as i32)
            .map(|w| {
                let r = w.resources.clone().unwrap_or_default();
                Capacity {
                    worker_id: w.id.clone(),
                    cpus: r.cpu_cores,
                    gpus: r.gpus.iter().map(|g| g.index).collect(),
                    memory_bytes: r.memory_bytes,
                }
            })
            .collect();
        total.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        let mut free = total.clone();
        // Workers that are not Down: where an earlier attempt's shard may still run.
        let live: Vec<&str> = workers
            .values()
            .filter(|w| w.state != WorkerState::Down as i32)
            .map(|w| w.id.as_str())
            .collect();
        let mut pending = Vec::new();
        // Running gangs that preemption may stop.
        let mut holders = Vec::new();
        // Restarted gangs whose earlier attempt may still run somewhere.
        let mut held: Vec<(&JobRecord, String)> = Vec::new();
        for job in &jobs {
            if job.state == JobState::Running as i32 {
                if let Some(reason) = self.attempt_failure(job, &workers, now_ms) {
                    let kind = command::Kind::FailJobAttempt(FailJobAttempt {
                        job_id: job.id,
                        attempt: job.attempt,
                        reason,
                        ..Default::default()
                    });
                    if let Err(e) = self.propose(command(kind), false).await {
                        tracing::debug!(job = job.id, error = %e, "fail a job attempt");
                    }
                    continue;
                }
                let held: Vec<Capacity> = job
                    .shards
                    .iter()
                    .map(|shard| shard_holds(job, &shard.worker_id, &shard.gpus))
                    .collect();
                for h in &held {
                    scheduler::take(&mut free, h);
                }
                holders.push(scheduler::Holder {
                    job_id: job.id.to_string(),
                    priority: job.priority,
                    started_at_ms: job.attempt_started_at_ms,
                    held,
                });
            } else if job.state == JobState::Pending as i32 {
                if job.attempt > 0 {
                    // A restarted gang waits until its earlier attempt has
                    // stopped everywhere; a stopping shard still holds what it took.
                    let stopping = self.heartbeats.stopping(job.id, &live);
                    for s in &stopping {
                        if let Stopping::Running(worker, running) = s {
                            // Its GPUs are those of its rank's last placement there.
                            let gpus: &[u32] = job
                                .shards
                                .iter()
                                .find(|p| p.rank == running.rank && &p.worker_id == worker)
                                .map_or(&[], |p| p.gpus.as_slice());
                            scheduler::take(&mut free, &shard_holds(job, worker, gpus));
                        }
                    }
                    if let Some(first) = stopping.first() {
                        held.push((job, stopping_reason(first)));
                        continue;
                    }
                }
                pending.push(Gang {
                    job_id: job.id.to_string(),
                    priority: job.priority,
                    submitted_at_ms: job.submitted_at_ms,
                    shards: job.shards_wanted,
                    cpus_per_shard: job.cpus_per_shard,
                    gpus_per_shard: job.gpus_per_shard,
                    memory_per_shard: job.memory_per_shard,
                });
            }
        }
        // Serving replicas hold their CPUs, GPUs and memory like running shards.
        for h in self.replica_holds(&self.deployments()?) {
            scheduler::take(&mut free, &h);
        }
        let by_id: HashMap<String, &JobRecord> =
            jobs.iter().map(|j| (j.id.to_string(), j)).collect();
        let decisions = scheduler::schedule(&pending, &free, &total);
        // One change at a time: no preemption while an earlier one's shards still
        // stop, nor in a round that starts a gang (what is free is changing).
        let starts = decisions
            .iter()
            .any(|(_, d)| matches!(d, Decision::Start(_)));
        if self.preemption && held.is_empty() && !starts {
            self.preempt_for_the_head(&decisions, &pending, &free, &holders, &by_id)
                .await;
        }
        for (job_id, decision) in decisions {
            let Some(job) = by_id.get(&job_id) else {
                continue;
            };
            let kind = match decision {
                Decision::Start(placements) => {
                    for p in &placements {
                        scheduler::take(&mut free, &shard_holds(job, &p.worker_id, &p.gpus));
                    }
                    let (job_token, token) = job_token(job);
                    command::Kind::PlaceJob(PlaceJob {
                        job_id: job.id,
                        attempt: job.attempt + 1,
                        session_id: rand::random::<u64>() | 1,
                        ring_key: rand::random::<[u8; 32]>().to_vec(),
                        token,
                        job_token,
                        shards: placements
                            .into_iter()
                            .map(|p| ShardAssignment {
                                rank: p.shard,
                                worker_id: p.worker_id,
                                gpus: p.gpus,
                                ..Default::default()
                            })
                            .collect(),
                    })
                }
                Decision::Wait(reason) | Decision::TooLarge(reason) => match waiting(job, reason) {
                    Some(kind) => kind,
                    None => continue,
                },
            };
            if let Err(e) = self.propose(command(kind), false).await {
                tracing::debug!(job = job.id, error = %e, "schedule a job");
            }
        }
        for (job, reason) in held {
            if let Some(kind) = waiting(job, reason) {
                if let Err(e) = self.propose(command(kind), false).await {
                    tracing::debug!(job = job.id, error = %e, "hold a restarted job");
                }
            }
        }
        Ok(free)
    }

    /// Stops the running gangs of lower priority that the head of the queue
    /// needs, when it must wait and stopping them makes room
    /// ([`scheduler::preemption`]).
    async fn preempt_for_the_head(
        &self,
        decisions: &[(String, Decision)],
        pending: &[Gang],
        free: &[Capacity],
        holders: &[scheduler::Holder],
        jobs: &HashMap<String, &JobRecord>,
    ) {
        // The first job that must wait for resources; those behind it wait for it.
        let Some((head_id, _)) = decisions
            .iter()
            .find(|(_, d)| matches!(d, Decision::Wait(_)))
        else {
            return;
        };
        let Some(head) = pending.iter().find(|g| &g.job_id == head_id) else {
            return;
        };
        let Some(victims) = scheduler::preemption(head, free, holders) else {
            return;
        };
        for victim in victims.iter().filter_map(|id| jobs.get(id)) {
            tracing::info!(
                job = victim.id,
                priority = victim.priority,
                for_job = %head.job_id,
                for_priority = head.priority,
                "preempting a training job"
            );
            let kind = command::Kind::FailJobAttempt(FailJobAttempt {
                job_id: victim.id,
                attempt: victim.attempt,
                reason: format!(
                    "preempted by job {} (priority {} over {})",
                    head.job_id, head.priority, victim.priority
                ),
                preempted: true,
            });
            if let Err(e) = self.propose(command(kind), false).await {
                tracing::debug!(job = victim.id, error = %e, "preempt a job");
            }
        }
    }

    /// Why a running attempt has failed from the outside, if it has: a worker of
    /// its gang is Down, a shard has not reported within the start timeout, or a
    /// shard that started is no longer running on its worker, as the worker's
    /// heartbeats say (it stopped without a report reaching the leader: its lease
    /// lapsed while the coordinators were unreachable, or its worker restarted).
    fn attempt_failure(
        &self,
        job: &JobRecord,
        workers: &BTreeMap<String, WorkerRecord>,
        now_ms: u64,
    ) -> Option<String> {
        for shard in &job.shards {
            match workers.get(&shard.worker_id) {
                None => {
                    return Some(format!(
                        "worker {} of rank {} is gone",
                        shard.worker_id, shard.rank
                    ))
                }
                Some(w) if w.state == WorkerState::Down as i32 => {
                    return Some(format!(
                        "worker {} of rank {} is Down",
                        shard.worker_id, shard.rank
                    ))
                }
                _ => {}
            }
        }
        let placed_at = job.attempt_started_at_ms;
        if now_ms.saturating_sub(placed_at) > SHARD_GONE_GRACE_MS {
            for shard in &job.shards {
                let started = shard.state == ShardState::Ready as i32
                    || shard.state == ShardState::Running as i32;
                let key = RunningShard {
                    job_id: job.id,
                    attempt: job.attempt,
                    rank: shard.rank,
                };
                if started && self.heartbeats.runs(&shard.worker_id, &key) == Some(false) {
                    return Some(format!(
                        "rank {} is no longer running on worker {} (it stopped without a report)",
                        shard.rank, shard.worker_id
                    ));
                }
            }
        }
        let silent = job
            .shards
            .iter()
            .find(|s| s.state == ShardState::Assigned as i32);
        match silent {
            Some(shard) if now_ms.saturating_sub(placed_at) > SHARD_START_TIMEOUT_MS => {
                Some(format!(
                    "rank {} on worker {} did not start within {} s",
                    shard.rank,
                    shard.worker_id,
                    SHARD_START_TIMEOUT_MS / 1000
                ))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cluster_nodes_read_a_gangs_nccl_id_and_nobody_its_ring_key_or_token() {
        let job = JobRecord {
            nccl_id: vec![7; 128],
            ring_key: vec![1; 32],
            job_token: "kt.job-1.secret".into(),
            ..Default::default()
        };
        let viewer = Caller::Token {
            name: "alice".into(),
            role: Role::Admin,
        };
        let seen = without_secrets(job.clone(), &viewer);
        assert!(seen.nccl_id.is_empty() && seen.ring_key.is_empty() && seen.job_token.is_empty());
        for node in [Caller::Node, Caller::Insecure] {
            let seen = without_secrets(job.clone(), &node);
            assert_eq!(
                seen.nccl_id, job.nccl_id,
                "{node:?} meets its gang through it"
            );
            assert!(seen.ring_key.is_empty() && seen.job_token.is_empty());
        }
    }

    #[test]
    fn a_model_that_cannot_train_in_a_shards_memory_is_refused_at_submit() {
        let spec = |hidden: &str, memory: &str| {
            JobSpec::parse(&format!(
                "name = \"m\"\n[data]\nartifact = \"d@1\"\nlabel = \"y\"\nfeatures = [\"a\", \"b\"]\n\
                 [model]\nkind = \"mlp\"\nhidden = {hidden}\n[train]\nepochs = 1\n\
                 [resources]\nshards = 1\n{memory}"
            ))
            .expect("a valid spec")
        };
        // 2 -> 65536 x 3 -> 1: 8.6 billion parameters, 160 GiB to train.
        let huge = spec("[65536, 65536, 65536]", "memory_mib_per_shard = 4096\n");
        let problem = model_too_big(huge.builtin().expect("builtin"), 4096 << 20, 64 << 30)
            .expect("an 8.6e9-parameter model in 4 GiB was accepted");
        assert!(
            problem.contains("holds at least 8590327809 parameters")
                && problem.contains("resources.memory_mib_per_shard (4096 MiB)"),
            "{problem}"
        );
        // No per-shard limit: the largest worker bounds it.
        let unbounded = spec("[65536, 65536, 65536]", "");
        let problem = model_too_big(unbounded.builtin().expect("builtin"), 0, 64 << 30)
            .expect("refused against the largest worker");
        assert!(
            problem.contains("the largest live worker's memory (65536 MiB)"),
            "{problem}"
        );
        // A model that fits, and a cluster whose memory is unknown.
        let small = spec("[64, 32]", "memory_mib_per_shard = 512\n");
        assert_eq!(
            model_too_big(small.builtin().expect("builtin"), 512 << 20, 0),
            None
        );
        assert_eq!(
            model_too_big(unbounded.builtin().expect("builtin"), 0, 0),
            None
        );
    }
}
