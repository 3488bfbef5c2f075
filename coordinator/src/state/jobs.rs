//! Applying training-job commands: submit, placement, shard reports, failures of
//! an attempt (with gang restarts up to `max_failures`) and cancellation.
//!
//! Keys (see `keys`): `job/<id:020>` holds the [`JobRecord`]; `job_active/<id:020>`
//! marks the jobs the scheduler and the workers' heartbeats look at (Pending and
//! Running); `job_log/<id:020>/<seq:020>` holds the job's log lines, the newest
//! [`MAX_JOB_LOG_LINES`] of them.
//!
//! Every report names the attempt it belongs to; a report of an earlier attempt (a
//! shard that had not yet seen its gang restart) is rejected and changes nothing.

use kiln_proto::v1::{
    CancelJob, CreateExperiment, CreateRun, FailJobAttempt, JobLogLine, JobRecord, JobState,
    LogBatch, PlaceJob, ReportShard, Role, RunRecord, SetJobWaiting, ShardState, SubmitJob,
    UpdateRun,
};
use prost::Message;

use super::artifacts::read_record;
use super::capacity;
use super::keys;
use super::machine::{bump_counter, Rejection, StateRead, Txn};
use super::tracking;
use crate::raft::storage::StoreError;

/// Log lines kept per job; older ones are dropped as new ones arrive.
pub const MAX_JOB_LOG_LINES: u64 = 5_000;
use kiln_common::jobspec::MAX_REPORT_LOG_LINES;
/// Longest log line kept (longer ones are cut).
pub const MAX_LOG_LINE_BYTES: usize = 2_000;
/// Longest job spec accepted.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// Returns job `id`.
pub fn read_job(state: &dyn StateRead, id: u64) -> Result<Option<JobRecord>, StoreError> {
    read_record(state, &keys::job(id), "decode job")
}

/// Returns true for a state a job never leaves.
pub fn is_terminal(state: i32) -> bool {
    matches!(
        JobState::try_from(state),
        Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    )
}

fn write(txn: &mut Txn<'_>, job: &JobRecord) {
    txn.put(keys::job(job.id), job.encode_to_vec());
    if is_terminal(job.state) {
        txn.delete(keys::job_active(job.id));
    } else {
        txn.put(keys::job_active(job.id), Vec::new());
    }
}

fn job_or_reject(txn: &Txn<'_>, id: u64) -> Result<Result<JobRecord, Rejection>, StoreError> {
    Ok(match read_job(txn, id)? {
        Some(job) => Ok(job),
        None => Err(format!("NOT_FOUND: job {id} does not exist")),
    })
}

/// Ends the job's run with `status` at `now_ms`, when it has one.
/// The name of a command job's own token (`ROLE_JOB`): `job-<id>`, a name
/// `kiln token create` refuses, so no person's token can take it.
pub fn job_token_name(job_id: u64) -> String {
    format!("job-{job_id}")
}

/// Ends a job's run with `status`, and the job's own token with it.
fn end_run(
    txn: &mut Txn<'_>,
    job: &JobRecord,
    status: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    // The job's own token ends with it.
    let token = keys::token(&job_token_name(job.id));
    if txn.get(&token)?.is_some() {
        txn.delete(token);
        bump_counter(txn, keys::TOKENS_VERSION)?;
    }
    if job.run_id.is_empty() {
        return Ok(());
    }
    let update = UpdateRun {
        run_id: job.run_id.clone(),
        status: status.into(),
        end_time_ms: now_ms,
        ..Default::default()
    };
    // A run deleted or never made is no reason to keep a job from ending.
    let _ = tracking::apply_update_run(txn, &update)?;
    Ok(())
}

/// Queues a checked job; returns its id.
pub fn apply_submit(
    txn: &mut Txn<'_>,
    submit: &SubmitJob,
    now_ms: u64,
    who: &str,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(job) = &submit.job else {
        return Ok(Err("submit_job without a job".into()));
    };
    if job.spec_toml.len() > MAX_SPEC_BYTES {
        return Ok(Err(format!(
            "the job spec is {} bytes; at most {MAX_SPEC_BYTES}",
            job.spec_toml.len()
        )));
    }
    if job.shards_wanted == 0 {
        return Ok(Err("a job needs at least one shard".into()));
    }
    let experiment = match tracking::experiment_id(txn, &job.experiment)? {
        Some(id) => id,
        None => {
            let create = CreateExperiment {
                name: job.experiment.clone(),
                tags: Default::default(),
            };
            match tracking::apply_create_experiment(txn, &create, now_ms)? {
                Ok(id) => id,
                Err(e) => return Ok(Err(e)),
            }
        }
    };
    let id = bump_counter(txn, keys::JOB_SEQ)?;
    let mut tags = std::collections::BTreeMap::new();
    tags.insert("kiln.job_id".to_string(), id.to_string());
    tags.insert("kiln.spec_digest".to_string(), job.spec_digest.clone());
    let run = CreateRun {
        run_id: job.run_id.clone(),
        experiment_id: experiment,
        name: job.name.clone(),
        user: who.to_string(),
        start_time_ms: now_ms,
        tags,
    };
    if let Err(e) = tracking::apply_create_run(txn, &run)? {
        return Ok(Err(e));
    }
    let update = UpdateRun {
        run_id: job.run_id.clone(),
        status: "SCHEDULED".into(),
        ..Default::default()
    };
    if let Err(e) = tracking::apply_update_run(txn, &update)? {
        return Ok(Err(e));
    }
    if !submit.params.is_empty() {
        let batch = LogBatch {
            run_id: job.run_id.clone(),
            params: submit.params.clone(),
            ..Default::default()
        };
        if let Err(e) = tracking::apply_log_batch(txn, &batch)? {
            return Ok(Err(e));
        }
    }
    let record = JobRecord {
        id,
        state: JobState::Pending as i32,
        reason: "waiting to be scheduled".into(),
        user: who.to_string(),
        submitted_at_ms: now_ms,
        started_at_ms: 0,
        ended_at_ms: 0,
        failures: 0,
        attempt: 0,
        session_id: 0,
        shards: Vec::new(),
        progress: None,
        checkpoint: String::new(),
        checkpoint_step: 0,
        model: String::new(),
        log_seq: 0,
        ..job.clone()
    };
    write(txn, &record);
    Ok(Ok(id))
}

/// Starts the next attempt of a pending job on the placed shards.
pub fn apply_place(
    txn: &mut Txn<'_>,
    place: &PlaceJob,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut job = match job_or_reject(txn, place.job_id)? {
        Ok(job) => job,
        Err(e) => return Ok(Err(e)),
    };
    if job.state != JobState::Pending as i32 || place.attempt != job.attempt + 1 {
        return Ok(Err(format!(
            "job {} is not waiting for attempt {} (state {}, attempt {})",
            job.id, place.attempt, job.state, job.attempt
        )));
    }
    if place.shards.len() != job.shards_wanted as usize {
        return Ok(Err(format!(
            "job {} wants {} shard(s); {} placed",
            job.id,
            job.shards_wanted,
            place.shards.len()
        )));
    }
    let asks: Vec<capacity::Ask> = place
        .shards
        .iter()
        .map(|s| capacity::Ask {
            worker_id: s.worker_id.clone(),
            cpus: job.cpus_per_shard,
            memory_bytes: job.memory_per_shard,
            gpus: s.gpus.clone(),
        })
        .collect();
    if let Some(shard) = place
        .shards
        .iter()
        .find(|s| s.gpus.len() != job.gpus_per_shard as usize)
    {
        return Ok(Err(format!(
            "job {} wants {} GPU(s) per shard; rank {} was placed with {}",
            job.id,
            job.gpus_per_shard,
            shard.rank,
            shard.gpus.len()
        )));
    }
    let except = capacity::Except {
        job: Some(job.id),
        ..Default::default()
    };
    if let Err(e) = capacity::check_fits(&*txn, &asks, except)? {
        return Ok(Err(format!(
            "job {} attempt {} does not fit: {e}",
            job.id, place.attempt
        )));
    }
    job.attempt = place.attempt;
    job.session_id = place.session_id;
    job.ring_key = place.ring_key.clone();
    // A command job's token for this attempt replaces the last attempt's: only
    // the ranks placed now hold it. It may write the job's run and read the
    // run's experiment.
    if let Some(token) = &place.token {
        let mut token = token.clone();
        token.name = job_token_name(job.id);
        token.role = Role::Job as i32;
        token.job_id = job.id;
        token.run_id.clone_from(&job.run_id);
        token.experiment_id =
            read_record::<RunRecord>(&*txn, &keys::run(&job.run_id), "decode run")?
                .map(|run| run.experiment_id.to_string())
                .unwrap_or_default();
        txn.put(keys::token(&token.name), token.encode_to_vec());
        bump_counter(txn, keys::TOKENS_VERSION)?;
        job.job_token = place.job_token.clone();
    }
    job.nccl_id.clear();
    job.shards = place.shards.clone();
    for shard in &mut job.shards {
        shard.state = ShardState::Assigned as i32;
        shard.data_addr.clear();
        shard.error.clear();
    }
    job.state = JobState::Running as i32;
    job.reason = format!(
        "attempt {}: starting {} shard(s)",
        job.attempt,
        job.shards.len()
    );
    if job.started_at_ms == 0 {
        job.started_at_ms = now_ms;
    }
    job.attempt_started_at_ms = now_ms;
    let placed: Vec<String> = job
        .shards
        .iter()
        .map(|s| format!("rank {} on {}", s.rank, s.worker_id))
        .collect();
    let line = format!("attempt {} placed: {}", job.attempt, placed.join(", "));
    append_log(txn, &mut job, now_ms, 0, &[line]);
    write(txn, &job);
    if job.attempt == 1 {
        let update = UpdateRun {
            run_id: job.run_id.clone(),
            status: "RUNNING".into(),
            ..Default::default()
        };
        let _ = tracking::apply_update_run(txn, &update)?;
    }
    Ok(Ok(0))
}

/// Records why a pending job waits.
pub fn apply_waiting(
    txn: &mut Txn<'_>,
    waiting: &SetJobWaiting,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut job = match job_or_reject(txn, waiting.job_id)? {
        Ok(job) => job,
        Err(e) => return Ok(Err(e)),
    };
    if job.state != JobState::Pending as i32 {
        return Ok(Err(format!("job {} is not pending", job.id)));
    }
    job.reason = waiting.reason.clone();
    write(txn, &job);
    Ok(Ok(0))
}

/// Appends log lines to a job, dropping the oldest beyond the bound.
fn append_log(txn: &mut Txn<'_>, job: &mut JobRecord, now_ms: u64, rank: u32, lines: &[String]) {
    for line in lines.iter().take(MAX_REPORT_LOG_LINES) {
        job.log_seq += 1;
        let mut text = line.clone();
        if text.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let record = JobLogLine {
            seq: job.log_seq,
            at_ms: now_ms,
            attempt: job.attempt,
            rank,
            line: text,
        };
        txn.put(keys::job_log(job.id, job.log_seq), record.encode_to_vec());
        if job.log_seq > MAX_JOB_LOG_LINES {
            txn.delete(keys::job_log(job.id, job.log_seq - MAX_JOB_LOG_LINES));
        }
    }
}

/// Where a gang placed again resumes: its newest checkpoint, or the start.
fn resume_point(job: &JobRecord) -> String {
    if job.checkpoint.is_empty() {
        "the start".to_string()
    } else {
        format!(
            "checkpoint {} (step {})",
            job.checkpoint, job.checkpoint_step
        )
    }
}

/// Ends the current attempt with `reason`: the gang goes back to the queue to be
/// placed again, unless it has failed more than `max_failures` times. A
/// preempted attempt goes back to the queue without counting a failure.
fn fail_attempt(
    txn: &mut Txn<'_>,
    job: &mut JobRecord,
    reason: &str,
    preempted: bool,
    now_ms: u64,
) -> Result<(), StoreError> {
    if !preempted {
        job.failures += 1;
    }
    for shard in &mut job.shards {
        if shard.state != ShardState::Failed as i32 && shard.state != ShardState::Succeeded as i32 {
            shard.state = ShardState::Failed as i32;
        }
    }
    if preempted {
        job.state = JobState::Pending as i32;
        job.reason = format!("{reason}; resumes from {}", resume_point(job));
    } else if job.failures > job.max_failures {
        job.state = JobState::Failed as i32;
        job.reason = format!(
            "failed {} time(s), more than max_failures = {}; last: {reason}",
            job.failures, job.max_failures
        );
        job.ended_at_ms = now_ms;
        end_run(txn, job, "FAILED", now_ms)?;
    } else {
        job.state = JobState::Pending as i32;
        job.reason = format!(
            "restarting from {} after failure {} of at most {}: {reason}",
            resume_point(job),
            job.failures,
            job.max_failures
        );
    }
    let how = if preempted { "preempted" } else { "failed" };
    let line = format!("attempt {} {how}: {reason}", job.attempt);
    append_log(txn, job, now_ms, 0, &[line]);
    Ok(())
}

/// Applies a shard's report; returns 1 when the shard should keep running.
pub fn apply_report(
    txn: &mut Txn<'_>,
    report: &ReportShard,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut job = match job_or_reject(txn, report.job_id)? {
        Ok(job) => job,
        Err(e) => return Ok(Err(e)),
    };
    if job.state != JobState::Running as i32 || report.attempt != job.attempt {
        return Ok(Err(format!(
            "STALE: attempt {} of job {} is over",
            report.attempt, job.id
        )));
    }
    let Some(index) = job.shards.iter().position(|s| s.rank == report.rank) else {
        return Ok(Err(format!("job {} has no rank {}", job.id, report.rank)));
    };
    if !report.log.is_empty() {
        let lines = report.log.clone();
        append_log(txn, &mut job, now_ms, report.rank, &lines);
    }
    if !report.metrics.is_empty() && !job.run_id.is_empty() {
        let batch = LogBatch {
            run_id: job.run_id.clone(),
            metrics: report.metrics.clone(),
            ..Default::default()
        };
        if let Err(e) = tracking::apply_log_batch(txn, &batch)? {
            return Ok(Err(e));
        }
    }
    if let Some(progress) = &report.progress {
        job.progress = Some(*progress);
    }
    if !report.checkpoint.is_empty() && report.checkpoint_step >= job.checkpoint_step {
        job.checkpoint = report.checkpoint.clone();
        job.checkpoint_step = report.checkpoint_step;
    }
    if !report.model.is_empty() {
        job.model = report.model.clone();
    }
    if report.rank == 0 && !report.nccl_id.is_empty() {
        if report.nccl_id.len() != 128 {
            return Ok(Err(format!(
                "an NCCL id is 128 bytes, not {}",
                report.nccl_id.len()
            )));
        }
        job.nccl_id = report.nccl_id.clone();
    }
    let shard = &mut job.shards[index];
    if !report.data_addr.is_empty() {
        shard.data_addr = report.data_addr.clone();
    }
    let state = ShardState::try_from(report.state).unwrap_or(ShardState::Unspecified);
    if state != ShardState::Unspecified {
        shard.state = state as i32;
    }
    if state == ShardState::Failed {
        shard.error = report.error.clone();
        let reason = format!(
            "rank {} on worker {}: {}",
            shard.rank, shard.worker_id, report.error
        );
        fail_attempt(txn, &mut job, &reason, false, now_ms)?;
        write(txn, &job);
        return Ok(Ok(0));
    }
    if state == ShardState::Running && job.reason.contains("starting") {
        job.reason = format!("attempt {}: training", job.attempt);
    }
    if job
        .shards
        .iter()
        .all(|s| s.state == ShardState::Succeeded as i32)
    {
        job.state = JobState::Succeeded as i32;
        job.reason = if job.model.is_empty() {
            "every shard finished".into()
        } else {
            format!("every shard finished; model {}", job.model)
        };
        job.ended_at_ms = now_ms;
        end_run(txn, &job, "FINISHED", now_ms)?;
    }
    let keep = u64::from(job.state == JobState::Running as i32);
    write(txn, &job);
    Ok(Ok(keep))
}

/// Fails the current attempt from outside (a worker went Down).
pub fn apply_fail_attempt(
    txn: &mut Txn<'_>,
    fail: &FailJobAttempt,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut job = match job_or_reject(txn, fail.job_id)? {
        Ok(job) => job,
        Err(e) => return Ok(Err(e)),
    };
    if job.state != JobState::Running as i32 || fail.attempt != job.attempt {
        return Ok(Err(format!(
            "STALE: attempt {} of job {} is over",
            fail.attempt, job.id
        )));
    }
    fail_attempt(txn, &mut job, &fail.reason, fail.preempted, now_ms)?;
    write(txn, &job);
    Ok(Ok(0))
}

/// Cancels a job that has not ended.
pub fn apply_cancel(
    txn: &mut Txn<'_>,
    cancel: &CancelJob,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let mut job = match job_or_reject(txn, cancel.job_id)? {
        Ok(job) => job,
        Err(e) => return Ok(Err(e)),
    };
    if is_terminal(job.state) {
        let state = JobState::try_from(job.state).map_or("ended", |s| s.as_str_name());
        return Ok(Err(format!(
            "FAILED_PRECONDITION: job {} has ended ({state})",
            job.id
        )));
    }
    job.state = JobState::Cancelled as i32;
    job.reason = cancel.reason.clone();
    job.ended_at_ms = now_ms;
    let line = format!("cancelled: {}", cancel.reason);
    append_log(txn, &mut job, now_ms, 0, &[line]);
    end_run(txn, &job, "KILLED", now_ms)?;
    write(txn, &job);
    Ok(Ok(0))
}
