//! Applying deployments: what a deployment serves (deploy, remove) and where its
//! replicas run (the leader's placements, the workers' reports).
//!
//! One key per deployment, `deployment/<name>`, holds its [`DeploymentRecord`] with
//! its replicas, so a placement and the generation it was decided for commit
//! together. A deploy that changes what runs (the model versions or the batching)
//! bumps the generation; replicas of an older generation keep serving until the
//! leader retires them, once the new generation is ready.

use kiln_proto::v1::{
    Deploy, DeploymentEvent, DeploymentRecord, ModelTarget, RemoveDeployment, ReplicaState,
    ReportReplica, RetrainPolicy, ScaleDeployment, UpdateReplicas,
};
use prost::Message;

use super::artifacts::read_record;
use super::capacity;
use super::keys;
use super::machine::{Rejection, StateRead, Txn};
use crate::raft::storage::StoreError;

/// Most decisions a deployment remembers.
pub const MAX_EVENTS: usize = 50;

/// Most replicas one deployment may hold, old generations included.
pub const MAX_REPLICAS: usize = 256;

/// Returns deployment `name`.
pub fn read_deployment(
    state: &dyn StateRead,
    name: &str,
) -> Result<Option<DeploymentRecord>, StoreError> {
    read_record(state, &keys::deployment(name), "decode deployment")
}

fn write(txn: &mut Txn<'_>, deployment: &DeploymentRecord) {
    txn.put(
        keys::deployment(&deployment.name),
        deployment.encode_to_vec(),
    );
}

/// Appends a decision to a deployment's bounded history.
fn record_event(deployment: &mut DeploymentRecord, now_ms: u64, message: String) {
    deployment.events.push(DeploymentEvent {
        at_ms: now_ms,
        message,
    });
    let excess = deployment.events.len().saturating_sub(MAX_EVENTS);
    deployment.events.drain(..excess);
}

/// True when two specs run their primary differently (another version, other
/// batching), so replicas must be replaced rather than kept. A canary added,
/// changed or removed replaces only the canary's replicas.
fn runs_differently(a: &DeploymentRecord, b: &DeploymentRecord) -> bool {
    !same_target(&a.primary, &b.primary)
        || a.max_batch_size != b.max_batch_size
        || a.max_queue_delay_us != b.max_queue_delay_us
        || a.queue_capacity != b.queue_capacity
        || a.cpus_per_replica != b.cpus_per_replica
        || a.memory_per_replica != b.memory_per_replica
        || a.gpus_per_replica != b.gpus_per_replica
        || a.engine != b.engine
        || a.batching != b.batching
        || a.preferred_batch_sizes != b.preferred_batch_sizes
        || a.instances != b.instances
        || a.input_limits != b.input_limits
}

/// True when two targets serve the same files, however the user named them
/// (`iris@prod` and `iris@3` while the alias points at 3): renaming what runs
/// does not roll it out again.
pub fn same_target(a: &Option<ModelTarget>, b: &Option<ModelTarget>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a.model == b.model
                && a.version == b.version
                && a.artifact == b.artifact
                && a.refused_engines == b.refused_engines
        }
        (None, None) => true,
        _ => false,
    }
}

/// `MODEL@VERSION` of a target (empty when there is none).
pub fn target_text(t: &Option<kiln_proto::v1::ModelTarget>) -> String {
    t.as_ref()
        .map(|t| format!("{}@{}", t.model, t.version))
        .unwrap_or_default()
}

/// Describes what a deployment serves, for its history and the CLI.
pub fn describe(d: &DeploymentRecord) -> String {
    let mut text = target_text(&d.primary);
    if d.canary.is_some() {
        text.push_str(&format!(
            " with canary {} at {}%",
            target_text(&d.canary),
            d.canary_percent
        ));
    }
    text
}

/// Creates a deployment or changes its spec; returns its generation.
pub fn apply_deploy(
    txn: &mut Txn<'_>,
    deploy: &Deploy,
    now_ms: u64,
    who: &str,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(spec) = &deploy.deployment else {
        return Ok(Err("deploy without a deployment".into()));
    };
    if let Err(e) = kiln_common::artifact::validate_name(&spec.name) {
        return Ok(Err(format!("deployment name: {e}")));
    }
    if spec.primary.is_none() {
        return Ok(Err(format!("deployment {} names no model", spec.name)));
    }
    if spec.replicas == 0 || spec.min_replicas > spec.max_replicas {
        return Ok(Err(format!(
            "deployment {} wants {} replica(s) within [{}, {}]",
            spec.name, spec.replicas, spec.min_replicas, spec.max_replicas
        )));
    }
    let mut record = match read_deployment(txn, &spec.name)? {
        None => DeploymentRecord {
            generation: 1,
            next_replica_id: 1,
            created_at_ms: now_ms,
            created_by: who.to_string(),
            ..spec.clone()
        },
        Some(old) => {
            let generation = if runs_differently(&old, spec) {
                old.generation + 1
            } else {
                old.generation
            };
            let retrain = carried_policy(old.retrain, spec.retrain.clone());
            DeploymentRecord {
                generation,
                next_replica_id: old.next_replica_id,
                replica_set: old.replica_set,
                events: old.events,
                created_at_ms: old.created_at_ms,
                created_by: old.created_by,
                retrain,
                ..spec.clone()
            }
        }
    };
    record.updated_at_ms = now_ms;
    let message = format!(
        "deployed {} on {} replica(s) (generation {}) by {}",
        describe(&record),
        record.replicas,
        record.generation,
        if who.is_empty() {
            "an unnamed caller"
        } else {
            who
        }
    );
    record_event(&mut record, now_ms, message);
    write(txn, &record);
    Ok(Ok(record.generation))
}

/// The retrain policy after a redeploy: one with the same job spec and dataset
/// keeps following its job, alert and canary (a canary started by the policy is
/// itself such a redeploy); a new or changed policy starts afresh.
fn carried_policy(old: Option<RetrainPolicy>, new: Option<RetrainPolicy>) -> Option<RetrainPolicy> {
    match (old, new) {
        (Some(old), Some(new)) if old.job_spec == new.job_spec && old.dataset == new.dataset => {
            Some(RetrainPolicy {
                canary_percent: new.canary_percent,
                ..old
            })
        }
        (_, new) => new,
    }
}

/// Removes a deployment; its workers stop its replicas at their next heartbeat.
pub fn apply_remove(
    txn: &mut Txn<'_>,
    remove: &RemoveDeployment,
) -> Result<Result<u64, Rejection>, StoreError> {
    if read_deployment(txn, &remove.name)?.is_none() {
        return Ok(Err(format!(
            "NOT_FOUND: deployment {} does not exist",
            remove.name
        )));
    }
    txn.delete(keys::deployment(&remove.name));
    super::serving::forget(txn, &remove.name)?;
    Ok(Ok(0))
}

/// Applies the autoscaler's decision, within the deployment's bounds.
pub fn apply_scale(
    txn: &mut Txn<'_>,
    scale: &ScaleDeployment,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(mut record) = read_deployment(txn, &scale.name)? else {
        return Ok(Err(format!(
            "NOT_FOUND: deployment {} does not exist",
            scale.name
        )));
    };
    if scale.replicas < record.min_replicas || scale.replicas > record.max_replicas {
        return Ok(Err(format!(
            "deployment {} scales within [{}, {}], not to {}",
            scale.name, record.min_replicas, record.max_replicas, scale.replicas
        )));
    }
    if record.replicas != scale.replicas {
        let message = format!(
            "autoscaler: {} -> {} replicas ({})",
            record.replicas, scale.replicas, scale.reason
        );
        record.replicas = scale.replicas;
        record_event(&mut record, now_ms, message);
        write(txn, &record);
    }
    Ok(Ok(u64::from(record.replicas)))
}

/// Applies the leader's placements and retirements, if the deployment is still
/// at the generation they were decided for; new replicas get their ids here.
pub fn apply_update_replicas(
    txn: &mut Txn<'_>,
    update: &UpdateReplicas,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(mut record) = read_deployment(txn, &update.name)? else {
        return Ok(Err(format!(
            "NOT_FOUND: deployment {} does not exist",
            update.name
        )));
    };
    if record.generation != update.generation {
        return Ok(Err(format!(
            "deployment {} is at generation {}, not {}: the placement is stale",
            update.name, record.generation, update.generation
        )));
    }
    // 0: an update from before the field existed (replayed from the log).
    if update.next_replica_id != 0 && update.next_replica_id != record.next_replica_id {
        return Ok(Err(format!(
            "deployment {} placed replicas up to {} since this update was planned (from {}): it is stale",
            update.name, record.next_replica_id, update.next_replica_id
        )));
    }
    if let Some(r) = update
        .add
        .iter()
        .find(|r| r.gpus.len() != record.gpus_per_replica as usize)
    {
        return Ok(Err(format!(
            "deployment {} wants {} GPU(s) per replica; one was placed on worker {} with {}",
            update.name,
            record.gpus_per_replica,
            r.worker_id,
            r.gpus.len()
        )));
    }
    let asks: Vec<capacity::Ask> = update
        .add
        .iter()
        .map(|r| capacity::Ask {
            worker_id: r.worker_id.clone(),
            cpus: record.cpus_per_replica,
            memory_bytes: record.memory_per_replica,
            gpus: r.gpus.clone(),
        })
        .collect();
    let except = capacity::Except {
        replicas: Some((&update.name, &update.remove)),
        ..Default::default()
    };
    if let Err(e) = capacity::check_fits(&*txn, &asks, except)? {
        return Ok(Err(format!(
            "replicas of deployment {} do not fit: {e}",
            update.name
        )));
    }
    record
        .replica_set
        .retain(|r| !update.remove.contains(&r.id));
    if record.replica_set.len() + update.add.len() > MAX_REPLICAS {
        return Ok(Err(format!(
            "deployment {} would hold more than {MAX_REPLICAS} replicas",
            update.name
        )));
    }
    for replica in &update.add {
        let mut replica = replica.clone();
        replica.id = record.next_replica_id;
        record.next_replica_id += 1;
        replica.state = ReplicaState::ReplicaStarting as i32;
        replica.placed_at_ms = now_ms;
        replica.state_since_ms = now_ms;
        replica.generation = record.generation;
        replica.reason = "loading the model".into();
        record.replica_set.push(replica);
    }
    if !update.reason.is_empty() {
        record_event(&mut record, now_ms, update.reason.clone());
    }
    write(txn, &record);
    Ok(Ok(record.generation))
}

/// Records a replica's state as its worker reports it; returns 1 while the replica
/// is still wanted, and rejects a report about a replica the deployment no longer
/// holds (its worker then stops it).
pub fn apply_report(
    txn: &mut Txn<'_>,
    report: &ReportReplica,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let gone = || {
        Ok(Err(format!(
            "NOT_FOUND: deployment {} holds no replica {} on worker {}",
            report.deployment, report.replica_id, report.worker_id
        )))
    };
    let Some(mut record) = read_deployment(txn, &report.deployment)? else {
        return gone();
    };
    let Some(replica) = record
        .replica_set
        .iter_mut()
        .find(|r| r.id == report.replica_id && r.worker_id == report.worker_id)
    else {
        return gone();
    };
    let state = ReplicaState::try_from(report.state).unwrap_or(ReplicaState::Unspecified);
    if state == ReplicaState::Unspecified || state == ReplicaState::ReplicaStarting {
        return Ok(Err(format!(
            "a replica reports Ready or Failed, not {:?}",
            state
        )));
    }
    if replica.state != report.state
        || replica.reason != report.reason
        || replica.engine != report.engine
        || replica.unbatched != report.unbatched
    {
        replica.state = report.state;
        replica.reason = report.reason.clone();
        replica.engine = report.engine.clone();
        replica.unbatched = report.unbatched.clone();
        replica.state_since_ms = now_ms;
        let message = match state {
            ReplicaState::ReplicaReady => format!(
                "replica {} on worker {} is ready",
                report.replica_id, report.worker_id
            ),
            _ => format!(
                "replica {} on worker {} failed: {}",
                report.replica_id, report.worker_id, report.reason
            ),
        };
        record_event(&mut record, now_ms, message);
        write(txn, &record);
    }
    Ok(Ok(1))
}

/// Records the retraining job the leader submitted for a deployment.
pub fn apply_retrain(
    txn: &mut Txn<'_>,
    record: &kiln_proto::v1::RecordRetrain,
    now_ms: u64,
) -> Result<Result<u64, Rejection>, StoreError> {
    let Some(mut deployment) = read_deployment(txn, &record.deployment)? else {
        return Ok(Err(format!(
            "NOT_FOUND: no deployment {}",
            record.deployment
        )));
    };
    let Some(policy) = deployment.retrain.as_mut() else {
        return Ok(Err(format!(
            "deployment {} has no retrain policy",
            record.deployment
        )));
    };
    policy.job_id = record.job_id;
    policy.alert_id = record.alert_id;
    policy.canary = record.canary.clone();
    policy.canary_since_ms = record.canary_since_ms;
    if !record.retired_model.is_empty() {
        super::drift::resolve_retired(
            txn,
            &record.retired_model,
            record.retired_version,
            now_ms,
            &record.message,
        )?;
    }
    record_event(&mut deployment, now_ms, record.message.clone());
    deployment.updated_at_ms = now_ms;
    write(txn, &deployment);
    Ok(Ok(record.job_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::machine::Txn;
    use kiln_proto::v1::ReplicaRecord;
    use std::collections::HashMap;

    use crate::state::machine::testing::{register_worker, Empty};

    fn target(version: u64) -> Option<ModelTarget> {
        Some(ModelTarget {
            model: "iris".into(),
            version,
            artifact: format!("iris-model@{version}"),
            requested: format!("iris@{version}"),
            ..Default::default()
        })
    }

    fn spec(version: u64, replicas: u32) -> Deploy {
        Deploy {
            deployment: Some(DeploymentRecord {
                name: "iris".into(),
                primary: target(version),
                replicas,
                min_replicas: replicas,
                max_replicas: replicas,
                cpus_per_replica: 1,
                max_batch_size: 64,
                max_queue_delay_us: 500,
                queue_capacity: 1024,
                ..Default::default()
            }),
        }
    }

    fn place(txn: &mut Txn<'_>, generation: u64, workers: &[&str]) -> Result<u64, Rejection> {
        for w in workers {
            if txn.get(&keys::worker(w)).expect("read").is_none() {
                register_worker(txn, w, 4, 0);
            }
        }
        let next_replica_id = read_deployment(txn, "iris")
            .expect("read")
            .map_or(0, |d| d.next_replica_id);
        let add = workers
            .iter()
            .map(|w| ReplicaRecord {
                worker_id: w.to_string(),
                target: target(1),
                ..Default::default()
            })
            .collect();
        apply_update_replicas(
            txn,
            &UpdateReplicas {
                name: "iris".into(),
                generation,
                add,
                remove: vec![],
                reason: "placed".into(),
                next_replica_id,
            },
            5,
        )
        .expect("ok")
    }

    #[test]
    fn a_new_version_bumps_the_generation_and_a_rescale_does_not() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        assert_eq!(
            apply_deploy(&mut txn, &spec(1, 2), 1, "ada").expect("ok"),
            Ok(1)
        );
        assert_eq!(place(&mut txn, 1, &["a", "b"]), Ok(1));
        assert_eq!(
            apply_deploy(&mut txn, &spec(1, 3), 2, "ada").expect("ok"),
            Ok(1)
        );
        let kept = read_deployment(&txn, "iris").expect("ok").expect("ok");
        assert_eq!(kept.replica_set.len(), 2, "a rescale keeps the replicas");
        assert_eq!(kept.created_at_ms, 1);
        // The same version named another way (an alias, then its number, as a
        // retraining canary's redeploy names it) rolls nothing out.
        let mut renamed = spec(1, 3);
        if let Some(t) = renamed.deployment.as_mut().and_then(|d| d.primary.as_mut()) {
            t.requested = "iris@prod".into();
        }
        assert_eq!(
            apply_deploy(&mut txn, &renamed, 2, "ada").expect("ok"),
            Ok(1),
            "a renamed target keeps the generation"
        );
        assert_eq!(
            apply_deploy(&mut txn, &spec(2, 3), 3, "ada").expect("ok"),
            Ok(2)
        );
        assert!(
            place(&mut txn, 1, &["c"])
                .expect_err("refused")
                .contains("stale"),
            "a placement for the old generation is refused"
        );
        let ids: Vec<u64> = read_deployment(&txn, "iris")
            .expect("ok")
            .expect("ok")
            .replica_set
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn reports_move_replicas_and_unknown_ones_are_refused() {
        let base = Empty;
        let mut txn = Txn::new(&base);
        apply_deploy(&mut txn, &spec(1, 1), 1, "ada")
            .expect("ok")
            .expect("ok");
        place(&mut txn, 1, &["a"]).expect("ok");
        let report = |id: u64, worker: &str, state: ReplicaState| ReportReplica {
            deployment: "iris".into(),
            replica_id: id,
            worker_id: worker.into(),
            state: state as i32,
            reason: String::new(),
            engine: "tract".into(),
            unbatched: String::new(),
        };
        assert_eq!(
            apply_report(&mut txn, &report(1, "a", ReplicaState::ReplicaReady), 9).expect("ok"),
            Ok(1)
        );
        let states: HashMap<u64, i32> = read_deployment(&txn, "iris")
            .expect("ok")
            .expect("ok")
            .replica_set
            .iter()
            .map(|r| (r.id, r.state))
            .collect();
        assert_eq!(states[&1], ReplicaState::ReplicaReady as i32);
        let refused =
            apply_report(&mut txn, &report(1, "b", ReplicaState::ReplicaReady), 9).expect("ok");
        assert!(refused.expect_err("refused").starts_with("NOT_FOUND"));
        assert_eq!(
            apply_remove(
                &mut txn,
                &RemoveDeployment {
                    name: "iris".into()
                }
            )
            .expect("ok"),
            Ok(0)
        );
        assert!(read_deployment(&txn, "iris").expect("ok").is_none());
    }
}
