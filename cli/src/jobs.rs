//! `kiln train submit` and `kiln jobs ls | show | logs | cancel`.
//!
//! `--follow` polls the job (and its log) until it ends: a progress bar with the
//! epoch, step, loss, accuracy and samples/s on a terminal, the log lines as they
//! come otherwise; it exits non-zero unless the job succeeds.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_common::client::ClusterClient;
use kiln_common::jobspec::{Code, JobSpec};
use kiln_common::transfer::{self, PushOptions};
use kiln_coordinator::state::jobs::is_terminal as ended;
use kiln_proto::v1::{
    CancelJobRequest, GetJobRequest, JobLogLine, JobLogsRequest, JobRecord, JobState,
    ListJobsRequest, ShardState, SubmitJobRequest,
};
use serde_json::{json, Value};

use crate::{JobsCommand, TrainCommand};

/// Time between two looks at a followed job.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

use kiln_common::status::job_state_name as state_name;

fn shard_state_name(state: i32) -> &'static str {
    match ShardState::try_from(state) {
        Ok(ShardState::Assigned) => "Assigned",
        Ok(ShardState::Ready) => "Ready",
        Ok(ShardState::Running) => "Running",
        Ok(ShardState::Succeeded) => "Succeeded",
        Ok(ShardState::Failed) => "Failed",
        _ => "Unknown",
    }
}

fn job_json(job: &JobRecord) -> Value {
    let progress = job.progress.as_ref().map(|p| {
        json!({
            "epoch": p.epoch, "epochs": p.epochs, "step": p.step, "total_steps": p.total_steps,
            "loss": p.loss,
            "accuracy": if p.accuracy.is_nan() { Value::Null } else { json!(p.accuracy) },
            "samples_per_sec": p.samples_per_sec,
        })
    });
    json!({
        "id": job.id,
        "name": job.name,
        "experiment": job.experiment,
        "state": state_name(job.state),
        "reason": job.reason,
        "priority": job.priority,
        "user": job.user,
        "submitted_at_ms": job.submitted_at_ms,
        "started_at_ms": job.started_at_ms,
        "ended_at_ms": job.ended_at_ms,
        "attempt": job.attempt,
        "failures": job.failures,
        "max_failures": job.max_failures,
        "resources": {
            "shards": job.shards_wanted,
            "cpus_per_shard": job.cpus_per_shard,
            "gpus_per_shard": job.gpus_per_shard,
            "memory_mib_per_shard": job.memory_per_shard >> 20,
        },
        "shards": job.shards.iter().map(|s| json!({
            "rank": s.rank, "worker_id": s.worker_id, "gpus": s.gpus,
            "state": shard_state_name(s.state), "data_addr": s.data_addr, "error": s.error,
        })).collect::<Vec<_>>(),
        "run_id": job.run_id,
        "progress": progress,
        "checkpoint": job.checkpoint,
        "checkpoint_step": job.checkpoint_step,
        "model": job.model,
        "spec_digest": job.spec_digest,
        // The spec as checked: for a command job its command, environment,
        // code and data versions.
        "spec": JobSpec::parse(&job.spec_toml).ok(),
    })
}

/// Log lines asked for at once.
const LOG_PAGE: u32 = 1000;

/// A job's log lines after `after_seq`, at most [`LOG_PAGE`] of them.
async fn log_lines(
    client: &ClusterClient,
    job_id: u64,
    after_seq: u64,
) -> anyhow::Result<Vec<JobLogLine>> {
    let request = JobLogsRequest {
        job_id,
        after_seq,
        max_lines: LOG_PAGE,
    };
    Ok(client
        .call(|mut c| async move { c.job_logs(request).await.map(|r| r.into_inner()) })
        .await?
        .lines)
}

/// `" accuracy 0.9876"`, or nothing for a regression.
fn accuracy_text(accuracy: f64) -> String {
    if accuracy.is_nan() {
        String::new()
    } else {
        format!(" accuracy {accuracy:.4}")
    }
}

async fn get_job(client: &ClusterClient, job_id: u64) -> anyhow::Result<JobRecord> {
    let request = GetJobRequest { job_id };
    client
        .call(|mut c| async move { c.get_job(request).await.map(|r| r.into_inner()) })
        .await?
        .job
        .context("the coordinators sent no job")
}

/// A command job whose `command.code` is a directory here: pushes it as a
/// version of artifact `<name>-code` (only new chunks travel) and returns the
/// spec naming that version instead. A relative path is relative to the spec's
/// own directory.
async fn push_code(
    client: &Arc<ClusterClient>,
    spec_path: &Path,
    spec: &JobSpec,
    spec_toml: String,
) -> anyhow::Result<String> {
    let Some(Code::Path(code)) = spec.command().and_then(|c| c.command.code.as_ref()) else {
        return Ok(spec_toml);
    };
    let base = spec_path.parent().unwrap_or(Path::new("."));
    let dir = base.join(code);
    if !dir.exists() {
        bail!(
            "{}: command.code = \"{code}\": {} does not exist",
            spec_path.display(),
            dir.display()
        );
    }
    let options = PushOptions {
        name: format!("{}-code", spec.name),
        media_type: "application/vnd.kiln.code".into(),
        metadata: [("kiln.source".to_string(), dir.display().to_string())]
            .into_iter()
            .collect(),
        quiet: true,
        ..PushOptions::default()
    };
    let pushed = transfer::push(Arc::clone(client), &dir, options)
        .await
        .with_context(|| format!("push the code in {}", dir.display()))?;
    eprintln!(
        "code {} pushed as {}@{} ({} file(s), {} new byte(s))",
        dir.display(),
        pushed.name,
        pushed.version,
        pushed.files,
        pushed.new_bytes
    );
    let mut doc: toml::Table = spec_toml.parse().context("the job spec")?;
    if let Some(toml::Value::Table(command)) = doc.get_mut("command") {
        command.insert(
            "code".into(),
            toml::Value::String(format!("{}@{}", pushed.name, pushed.version)),
        );
    }
    toml::to_string(&doc).context("write the job spec")
}

/// `kiln train ...`.
pub async fn train(client: ClusterClient, command: TrainCommand) -> anyhow::Result<()> {
    match command {
        TrainCommand::Submit { spec, follow, json } => {
            let spec_toml = std::fs::read_to_string(&spec)
                .with_context(|| format!("read the job spec {}", spec.display()))?;
            // Checked here too, so that a bad spec fails before any network call.
            let parsed = kiln_common::jobspec::JobSpec::parse(&spec_toml)
                .map_err(|e| anyhow::anyhow!("{}: {e}", spec.display()))?;
            let client = Arc::new(client);
            let spec_toml = push_code(&client, &spec, &parsed, spec_toml).await?;
            let request = SubmitJobRequest { spec_toml };
            let resp = client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.submit_job(request).await.map(|r| r.into_inner()) }
                })
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"job_id": resp.job_id, "run_id": resp.run_id})
                    )?
                );
            } else {
                println!("job {} submitted (run {})", resp.job_id, resp.run_id);
            }
            if follow {
                follow_job(&client, resp.job_id).await?;
            }
            Ok(())
        }
    }
}

/// Shows a job's progress until it ends; an error unless it succeeded.
async fn follow_job(client: &ClusterClient, job_id: u64) -> anyhow::Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let mut after_seq = 0;
    loop {
        for line in log_lines(client, job_id, after_seq).await? {
            after_seq = line.seq;
            let text = format!(
                "[attempt {} rank {}] {}",
                line.attempt, line.rank, line.line
            );
            match &bar {
                Some(bar) => bar.println(text),
                None => eprintln!("{text}"),
            }
        }
        let job = get_job(client, job_id).await?;
        if let (Some(bar), Some(p)) = (&bar, &job.progress) {
            bar.set_length(p.total_steps);
            bar.set_position(p.step);
            bar.set_prefix(format!("epoch {}/{}", p.epoch, p.epochs));
            let accuracy = accuracy_text(p.accuracy);
            bar.set_message(format!(
                "loss {:.5}{accuracy} {:.0} samples/s",
                p.loss, p.samples_per_sec
            ));
        } else if let Some(bar) = &bar {
            bar.set_prefix(state_name(job.state).to_string());
            bar.set_message(job.reason.clone());
        }
        if ended(job.state) {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let summary = format!(
                "job {} {}: {}",
                job.id,
                state_name(job.state).to_lowercase(),
                job.reason
            );
            if job.state == JobState::Succeeded as i32 {
                println!("{summary}");
                if let Some(p) = &job.progress {
                    let accuracy = accuracy_text(p.accuracy);
                    println!("final loss {:.5}{accuracy}; run {}", p.loss, job.run_id);
                }
                return Ok(());
            }
            bail!("{summary}");
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// `kiln jobs ...`.
pub async fn run(client: ClusterClient, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::Ls { limit, json } => {
            let request = ListJobsRequest { max_results: limit };
            let jobs = client
                .call(|mut c| async move { c.list_jobs(request).await.map(|r| r.into_inner()) })
                .await?
                .jobs;
            if json {
                let docs: Vec<Value> = jobs.iter().map(job_json).collect();
                println!("{}", serde_json::to_string_pretty(&docs)?);
                return Ok(());
            }
            println!(
                "{:<6} {:<24} {:<10} {:>7} {:>12}  REASON",
                "ID", "NAME", "STATE", "SHARDS", "STEP"
            );
            for job in &jobs {
                let step = job
                    .progress
                    .as_ref()
                    .map_or("-".to_string(), |p| format!("{}/{}", p.step, p.total_steps));
                println!(
                    "{:<6} {:<24} {:<10} {:>7} {:>12}  {}",
                    job.id,
                    job.name,
                    state_name(job.state),
                    job.shards_wanted,
                    step,
                    job.reason
                );
            }
            Ok(())
        }
        JobsCommand::Show { job, json } => {
            let job = get_job(&client, job).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
                return Ok(());
            }
            println!("job {} {} ({})", job.id, job.name, job.experiment);
            println!("state:      {} - {}", state_name(job.state), job.reason);
            println!(
                "attempt:    {} (failures {} of at most {})",
                job.attempt, job.failures, job.max_failures
            );
            println!("run:        {}", job.run_id);
            if let Some(command) = JobSpec::parse(&job.spec_toml)
                .ok()
                .and_then(|spec| spec.command().cloned())
            {
                println!("command:    {}", command.command.run.join(" "));
                if let Some(Code::Artifact(code)) = &command.command.code {
                    println!("code:       {code}");
                }
                println!("runtime:    {}", command.environment.runtime);
                if let Some(data) = &command.data {
                    println!("data:       {data}");
                }
            }
            println!("spec:       {}", job.spec_digest);
            if let Some(p) = &job.progress {
                let accuracy = accuracy_text(p.accuracy);
                println!(
                    "progress:   epoch {}/{} step {}/{} loss {:.5}{accuracy} {:.0} samples/s",
                    p.epoch, p.epochs, p.step, p.total_steps, p.loss, p.samples_per_sec
                );
            }
            if !job.checkpoint.is_empty() {
                println!(
                    "checkpoint: {} (step {})",
                    job.checkpoint, job.checkpoint_step
                );
            }
            if !job.model.is_empty() {
                println!("model:      {}", job.model);
            }
            for s in &job.shards {
                println!(
                    "  rank {:<3} {:<38} {:<10} {} {}",
                    s.rank,
                    s.worker_id,
                    shard_state_name(s.state),
                    s.data_addr,
                    s.error
                );
            }
            Ok(())
        }
        JobsCommand::Logs { job, follow, rank } => {
            let mut after_seq = 0;
            loop {
                let lines = log_lines(&client, job, after_seq).await?;
                let more = lines.len() == LOG_PAGE as usize;
                for line in lines {
                    after_seq = line.seq;
                    if rank.is_some_and(|r| r != line.rank) {
                        continue;
                    }
                    println!(
                        "{} [attempt {} rank {}] {}",
                        line.at_ms, line.attempt, line.rank, line.line
                    );
                }
                if more {
                    continue;
                }
                if !follow || ended(get_job(&client, job).await?.state) {
                    return Ok(());
                }
                tokio::time::sleep(FOLLOW_POLL).await;
            }
        }
        JobsCommand::Cancel { job } => {
            let request = CancelJobRequest { job_id: job };
            client
                .call(|mut c| async move { c.cancel_job(request).await.map(|r| r.into_inner()) })
                .await?;
            println!("job {job} cancelled");
            Ok(())
        }
    }
}
