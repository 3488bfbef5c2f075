//! `kiln deploy` and `kiln deployments ls | show | rm`: serving model versions.

use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_common::client::ClusterClient;
use kiln_proto::v1::{
    Batching, DeleteDeploymentRequest, DeployRequest, DeploymentRecord, GetDeploymentRequest,
    InputLimit, ListDeploymentsRequest, ReplicaState,
};
use serde_json::{json, Value};

use kiln_coordinator::api::deployments::{is_current, wanted_canaries};
use kiln_coordinator::state::deployments::{describe, target_text};

use crate::{DeployArgs, DeploymentsCommand};

/// Longest `kiln deploy --wait` waits for the replicas to be ready.
const WAIT_LIMIT: Duration = Duration::from_secs(300);

fn state_name(state: i32) -> &'static str {
    match ReplicaState::try_from(state).unwrap_or(ReplicaState::Unspecified) {
        ReplicaState::ReplicaStarting => "Starting",
        ReplicaState::ReplicaReady => "Ready",
        ReplicaState::ReplicaFailed => "Failed",
        ReplicaState::Unspecified => "Unknown",
    }
}

fn deployment_json(d: &DeploymentRecord) -> Value {
    json!({
        "name": d.name,
        "model": target_text(&d.primary),
        "artifact": d.primary.as_ref().map(|t| t.artifact.clone()),
        "canary": d.canary.as_ref().map(|_| target_text(&d.canary)),
        "canary_percent": d.canary_percent,
        "replicas": d.replicas,
        "min_replicas": d.min_replicas,
        "max_replicas": d.max_replicas,
        "ready_replicas": ready(d),
        "cpus_per_replica": d.cpus_per_replica,
        "gpus_per_replica": d.gpus_per_replica,
        "memory_mib_per_replica": d.memory_per_replica >> 20,
        "max_batch_size": d.max_batch_size,
        "batching": batching_name(d.batching),
        "preferred_batch_sizes": d.preferred_batch_sizes,
        "instances": d.instances,
        "input_limits": d.input_limits.iter().map(|l| json!({
            "name": l.name, "max_shape": l.max_shape,
        })).collect::<Vec<_>>(),
        "max_queue_delay_us": d.max_queue_delay_us,
        "queue_capacity": d.queue_capacity,
        "engine": if d.engine.is_empty() { "preferred" } else { d.engine.as_str() },
        "target_in_flight": d.target_in_flight,
        "public": d.public,
        "drift_webhook": d.drift_webhook,
        "retrain": d.retrain.as_ref().map(|r| json!({
            "dataset": r.dataset,
            "canary_percent": r.canary_percent,
            "job_id": (r.job_id != 0).then_some(r.job_id),
            "alert_id": (r.alert_id != 0).then_some(r.alert_id),
            "canary": (!r.canary.is_empty()).then_some(r.canary.clone()),
            "canary_since_ms": (r.canary_since_ms != 0).then_some(r.canary_since_ms),
        })),
        "generation": d.generation,
        "replica_set": d.replica_set.iter().map(|r| json!({
            "id": r.id,
            "worker_id": r.worker_id,
            "model": target_text(&r.target),
            "canary": r.canary,
            "state": state_name(r.state),
            "reason": r.reason,
            "generation": r.generation,
            "engine": r.engine,
            "gpus": r.gpus,
            "unbatched": r.unbatched,
        })).collect::<Vec<_>>(),
        "events": d.events.iter().map(|e| json!({"at_ms": e.at_ms, "message": e.message})).collect::<Vec<_>>(),
        "created_at_ms": d.created_at_ms,
        "updated_at_ms": d.updated_at_ms,
        "created_by": d.created_by,
    })
}

/// How a deployment batches, as `--json` names it.
fn batching_name(batching: i32) -> &'static str {
    match Batching::try_from(batching) {
        Ok(Batching::Off) => "off",
        Ok(Batching::Declared) => "declared",
        _ => "probed",
    }
}

/// Parses `--max-input-shape NAME=D,D,...` (each D a size, or `*` for no limit).
fn input_limit(text: &str) -> anyhow::Result<InputLimit> {
    let usage = || {
        anyhow::anyhow!(
            "--max-input-shape {text:?}: write NAME=D,D,... with one size (or *) per dimension"
        )
    };
    let (name, dims) = text.split_once('=').ok_or_else(usage)?;
    let max_shape = dims
        .split(',')
        .map(|d| match d.trim() {
            "*" => Ok(-1),
            d => d.parse::<i64>().ok().filter(|&n| n >= 1).ok_or_else(usage),
        })
        .collect::<anyhow::Result<Vec<i64>>>()?;
    anyhow::ensure!(!name.is_empty(), usage());
    Ok(InputLimit {
        name: name.to_string(),
        max_shape,
    })
}

/// Ready replicas of what the deployment runs now (its primary and canary).
fn ready(d: &DeploymentRecord) -> usize {
    d.replica_set
        .iter()
        .filter(|r| is_current(d, r) && r.state == ReplicaState::ReplicaReady as i32)
        .count()
}

/// True once every replica the deployment wants is ready and the ones it no
/// longer runs (an older generation or canary) have retired.
fn rolled_out(d: &DeploymentRecord) -> bool {
    let retired = d.replica_set.iter().all(|r| is_current(d, r));
    retired && ready(d) >= (d.replicas + wanted_canaries(d)) as usize
}

/// The deployment `name`, as the coordinators have it.
pub(crate) async fn get(client: &ClusterClient, name: &str) -> anyhow::Result<DeploymentRecord> {
    let request = GetDeploymentRequest { name: name.into() };
    client
        .call(|mut c| {
            let request = request.clone();
            async move { c.get_deployment(request).await.map(|r| r.into_inner()) }
        })
        .await?
        .deployment
        .context("the coordinators sent no deployment")
}

/// `kiln deploy NAME --model M@V ...`.
pub async fn deploy(client: ClusterClient, args: DeployArgs) -> anyhow::Result<()> {
    let request = DeployRequest {
        name: args.name.clone(),
        model: args.model,
        replicas: args.replicas.unwrap_or(0),
        min_replicas: args.min.unwrap_or(0),
        max_replicas: args.max.unwrap_or(0),
        canary: args.canary.unwrap_or_default(),
        canary_percent: args.canary_percent.unwrap_or(0),
        cpus_per_replica: args.cpus.unwrap_or(0),
        gpus_per_replica: args.gpus.unwrap_or(0),
        memory_mib_per_replica: args.memory_mib.unwrap_or(0),
        max_batch_size: args.max_batch_size,
        preferred_batch_sizes: args.preferred_batch_sizes.clone(),
        instances: args.instances.unwrap_or(0),
        input_limits: args
            .max_input_shape
            .iter()
            .map(|text| input_limit(text))
            .collect::<anyhow::Result<_>>()?,
        max_queue_delay_us: args.max_queue_delay_us.unwrap_or(0),
        queue_capacity: args.queue_capacity.unwrap_or(0),
        public: args.public,
        target_in_flight: args.target_in_flight.unwrap_or(0),
        drift_webhook: args.drift_webhook.unwrap_or_default(),
        retrain_job: match &args.retrain_job {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
            }
            None => String::new(),
        },
        retrain_dataset: args.retrain_dataset.unwrap_or_default(),
        retrain_canary_percent: args.retrain_canary_percent.unwrap_or(0),
        engine: args.engine.unwrap_or_default(),
    };
    let mut deployment = client
        .call(|mut c| {
            let request = request.clone();
            async move { c.deploy(request).await.map(|r| r.into_inner()) }
        })
        .await?
        .deployment
        .context("the coordinators sent no deployment")?;
    if args.wait {
        let started = Instant::now();
        while !rolled_out(&deployment) {
            if started.elapsed() > WAIT_LIMIT {
                anyhow::bail!(
                    "deployment {} is not ready after {} s: {} of {} replicas ready; see kiln deployments show {}",
                    deployment.name,
                    WAIT_LIMIT.as_secs(),
                    ready(&deployment),
                    deployment.replicas,
                    deployment.name
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            deployment = get(&client, &args.name).await?;
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&deployment_json(&deployment))?
        );
    } else {
        println!(
            "deployment {} serves {} on {} replica(s) (generation {}){}",
            deployment.name,
            describe(&deployment),
            deployment.replicas,
            deployment.generation,
            if args.wait { ", ready" } else { "" }
        );
    }
    Ok(())
}

/// `kiln deployments ...`.
pub async fn run(client: ClusterClient, command: DeploymentsCommand) -> anyhow::Result<()> {
    match command {
        DeploymentsCommand::Ls { json } => {
            let deployments = client
                .call(|mut c| async move {
                    c.list_deployments(ListDeploymentsRequest {})
                        .await
                        .map(|r| r.into_inner())
                })
                .await?
                .deployments;
            if json {
                let docs: Vec<Value> = deployments.iter().map(deployment_json).collect();
                println!("{}", serde_json::to_string_pretty(&docs)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<40} {:>8} {:>6}  SCALE",
                "NAME", "MODEL", "REPLICAS", "READY"
            );
            for d in &deployments {
                let scale = if d.min_replicas == d.max_replicas {
                    "fixed".to_string()
                } else {
                    format!("{}..{}", d.min_replicas, d.max_replicas)
                };
                println!(
                    "{:<24} {:<40} {:>8} {:>6}  {}",
                    d.name,
                    describe(d),
                    d.replicas,
                    ready(d),
                    scale
                );
            }
            Ok(())
        }
        DeploymentsCommand::Show { name, json } => {
            let d = get(&client, &name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&deployment_json(&d))?);
                return Ok(());
            }
            println!("deployment {} (generation {})", d.name, d.generation);
            println!("model:     {}", describe(&d));
            println!(
                "replicas:  {} wanted ({}..{}), {} ready; each {} CPU(s), {} MiB{}",
                d.replicas,
                d.min_replicas,
                d.max_replicas,
                ready(&d),
                d.cpus_per_replica,
                d.memory_per_replica >> 20,
                if d.gpus_per_replica > 0 {
                    format!(", {} GPU(s) (onnxruntime on CUDA)", d.gpus_per_replica)
                } else {
                    String::new()
                }
            );
            let batches = match Batching::try_from(d.batching) {
                Ok(Batching::Off) => "none (--max-batch-size 0: each request alone)".to_string(),
                Ok(Batching::Declared) => format!("up to {} rows, declared", d.max_batch_size),
                _ => format!(
                    "up to {} rows where the model's first dimension is a batch (probed)",
                    d.max_batch_size
                ),
            };
            println!(
                "batching:  {batches}; max queue delay {} us, queue {} requests",
                d.max_queue_delay_us, d.queue_capacity
            );
            if !d.preferred_batch_sizes.is_empty() {
                println!("preferred: batches of {:?}", d.preferred_batch_sizes);
            }
            if d.instances > 0 {
                println!("instances: {} per replica", d.instances);
            }
            for limit in &d.input_limits {
                let dims: Vec<String> = limit
                    .max_shape
                    .iter()
                    .map(|&d| {
                        if d < 0 {
                            "*".to_string()
                        } else {
                            d.to_string()
                        }
                    })
                    .collect();
                println!(
                    "limit:     input {} at most [{}]",
                    limit.name,
                    dims.join(", ")
                );
            }
            println!(
                "engine:    {}",
                if d.engine.is_empty() {
                    "each worker's preferred (onnxruntime where loaded, else tract)"
                } else {
                    d.engine.as_str()
                }
            );
            println!("access:    {}", if d.public { "public" } else { "token" });
            if !d.drift_webhook.is_empty() {
                println!("drift webhook: {}", d.drift_webhook);
            }
            for r in &d.replica_set {
                println!(
                    "replica {:>4}  {:<9} {:<20} {:<11} worker {}{}{}{}",
                    r.id,
                    state_name(r.state),
                    target_text(&r.target),
                    if r.engine.is_empty() {
                        "-"
                    } else {
                        r.engine.as_str()
                    },
                    r.worker_id,
                    if r.gpus.is_empty() {
                        String::new()
                    } else {
                        format!(" gpus {:?}", r.gpus)
                    },
                    if r.canary { " canary" } else { "" },
                    if r.reason.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", r.reason)
                    }
                );
                if !r.unbatched.is_empty() {
                    println!("              serves each request alone: {}", r.unbatched);
                }
            }
            for e in &d.events {
                println!("event  {}  {}", e.at_ms, e.message);
            }
            Ok(())
        }
        DeploymentsCommand::Rm { name } => {
            let request = DeleteDeploymentRequest { name: name.clone() };
            client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.delete_deployment(request).await.map(|r| r.into_inner()) }
                })
                .await?;
            println!("removed deployment {name}");
            Ok(())
        }
    }
}
