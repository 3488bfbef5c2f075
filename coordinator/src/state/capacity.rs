//! What each worker has left, read from the replicated state where placements
//! commit.
//!
//! The leader decides placements from what it has applied, but two leaders of
//! neighbouring terms (or one leader's two rounds) can propose placements from
//! the same view; only apply sees them in order. So apply checks every placement
//! (a gang's shards, a deployment's new replicas) against what the running
//! shards and the placed replicas already hold on its workers, and refuses one
//! that does not fit: no CPU, GPU or byte of memory is promised twice. What apply
//! counts is never more than the leader counts (the leader also holds back what
//! stopping shards still use), so a placement the leader made from a current
//! view always fits.

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::v1::{DeploymentRecord, JobRecord, JobState, WorkerRecord, WorkerState};
use prost::Message;

use super::keys;
use super::machine::{Rejection, StateRead};
use crate::raft::storage::StoreError;

/// Most active jobs the leader's scheduling round, and apply here, read (the
/// first ones in key order): both count the same holders.
pub const MAX_ACTIVE_JOBS: usize = 10_000;
/// Most deployments one listing or scheduling round, and apply here, read.
pub const MAX_DEPLOYMENTS: usize = 1_000;

/// What one placement asks of one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ask {
    pub worker_id: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub gpus: Vec<u32>,
}

/// What a worker's running shards and replicas hold.
#[derive(Debug, Default)]
struct Held {
    cpus: u64,
    memory_bytes: u64,
    gpus: BTreeSet<u32>,
}

impl Held {
    fn add(&mut self, cpus: u32, memory_bytes: u64, gpus: &[u32]) {
        self.cpus += u64::from(cpus);
        self.memory_bytes = self.memory_bytes.saturating_add(memory_bytes);
        self.gpus.extend(gpus);
    }
}

/// Leaves out of the count what a placement replaces.
#[derive(Debug, Clone, Copy, Default)]
pub struct Except<'a> {
    /// A job whose next attempt this is (its last attempt's shards).
    pub job: Option<u64>,
    /// A deployment's replicas that the same update removes.
    pub replicas: Option<(&'a str, &'a [u64])>,
}

/// Refuses `asks` when, with what the workers' running shards and placed
/// replicas hold, any worker would give more CPUs, memory or GPUs than it has,
/// a GPU it does not have or one GPU twice, or when a worker is not Alive.
pub fn check_fits(
    state: &dyn StateRead,
    asks: &[Ask],
    except: Except<'_>,
) -> Result<Result<(), Rejection>, StoreError> {
    if asks.is_empty() {
        return Ok(Ok(()));
    }
    let on: BTreeSet<&str> = asks.iter().map(|a| a.worker_id.as_str()).collect();
    let mut held = held_on(state, &on, except)?;
    for ask in asks {
        let Some(bytes) = state.read(&keys::worker(&ask.worker_id))? else {
            return Ok(Err(format!("worker {} is not registered", ask.worker_id)));
        };
        let worker = WorkerRecord::decode(bytes.as_slice()).map_err(|e| StoreError {
            op: "decode worker",
            message: e.to_string(),
        })?;
        if worker.state != WorkerState::Alive as i32 {
            let state = match WorkerState::try_from(worker.state) {
                Ok(WorkerState::Suspect) => "suspect (its heartbeats stopped)",
                Ok(WorkerState::Down) => "down",
                _ => "not alive",
            };
            return Ok(Err(format!("worker {} is {state}", ask.worker_id)));
        }
        let has = worker.resources.unwrap_or_default();
        let h = held.entry(ask.worker_id.clone()).or_default();
        // What is left, never below zero: the leader's view (a worker that came
        // back smaller may hold more than it has; an ask of nothing still fits).
        if u64::from(ask.cpus) > u64::from(has.cpu_cores).saturating_sub(h.cpus) {
            return Ok(Err(format!(
                "worker {} has {} CPU(s), {} held: {} more do not fit",
                ask.worker_id, has.cpu_cores, h.cpus, ask.cpus
            )));
        }
        if ask.memory_bytes > has.memory_bytes.saturating_sub(h.memory_bytes) {
            return Ok(Err(format!(
                "worker {} has {} MiB of memory, {} MiB held: {} MiB more do not fit",
                ask.worker_id,
                has.memory_bytes >> 20,
                h.memory_bytes >> 20,
                ask.memory_bytes >> 20
            )));
        }
        for gpu in &ask.gpus {
            if !has.gpus.iter().any(|g| g.index == *gpu) {
                return Ok(Err(format!("worker {} has no GPU {gpu}", ask.worker_id)));
            }
            if h.gpus.contains(gpu) {
                return Ok(Err(format!(
                    "GPU {gpu} of worker {} is already held",
                    ask.worker_id
                )));
            }
        }
        h.add(ask.cpus, ask.memory_bytes, &ask.gpus);
    }
    Ok(Ok(()))
}

/// What running shards and placed replicas hold on the workers in `on`.
fn held_on(
    state: &dyn StateRead,
    on: &BTreeSet<&str>,
    except: Except<'_>,
) -> Result<BTreeMap<String, Held>, StoreError> {
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    for (key, _) in state.scan_prefix(keys::JOB_ACTIVE.as_bytes(), MAX_ACTIVE_JOBS)? {
        let id = std::str::from_utf8(&key[keys::JOB_ACTIVE.len()..])
            .ok()
            .and_then(|id| id.parse::<u64>().ok());
        let Some(id) = id else { continue };
        if except.job == Some(id) {
            continue;
        }
        let Some(job) = super::jobs::read_job(state, id)? else {
            continue;
        };
        if job.state != JobState::Running as i32 {
            continue;
        }
        add_job(&mut held, on, &job);
    }
    for (_, bytes) in state.scan_prefix(keys::DEPLOYMENT.as_bytes(), MAX_DEPLOYMENTS)? {
        let d = DeploymentRecord::decode(bytes.as_slice()).map_err(|e| StoreError {
            op: "decode deployment",
            message: e.to_string(),
        })?;
        let removed: &[u64] = match except.replicas {
            Some((name, ids)) if name == d.name => ids,
            _ => &[],
        };
        for r in &d.replica_set {
            if on.contains(r.worker_id.as_str()) && !removed.contains(&r.id) {
                held.entry(r.worker_id.clone()).or_default().add(
                    d.cpus_per_replica,
                    d.memory_per_replica,
                    &r.gpus,
                );
            }
        }
    }
    Ok(held)
}

fn add_job(held: &mut BTreeMap<String, Held>, on: &BTreeSet<&str>, job: &JobRecord) {
    for shard in &job.shards {
        if on.contains(shard.worker_id.as_str()) {
            held.entry(shard.worker_id.clone()).or_default().add(
                job.cpus_per_shard,
                job.memory_per_shard,
                &shard.gpus,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::deployments::read_deployment;
    use crate::state::jobs::read_job;
    use crate::state::machine::testing::{apply_at, register_worker, Empty};
    use crate::state::machine::Txn;
    use kiln_proto::v1::{
        command, Deploy, ModelTarget, PlaceJob, ReplicaRecord, SetWorkerState, ShardAssignment,
        SubmitJob, UpdateReplicas,
    };

    fn submit(txn: &mut Txn<'_>, gpus_per_shard: u32) -> u64 {
        let seq = super::super::machine::read_counter(txn, keys::JOB_SEQ).expect("read");
        let job = JobRecord {
            experiment: "capacity".into(),
            run_id: format!("{:032x}", seq + 1),
            shards_wanted: 1,
            cpus_per_shard: 1,
            gpus_per_shard,
            memory_per_shard: 1 << 30,
            ..Default::default()
        };
        let kind = command::Kind::SubmitJob(SubmitJob {
            job: Some(job),
            params: Default::default(),
        });
        apply_at(txn, 2, kind).expect("submitted")
    }

    fn place_job(
        txn: &mut Txn<'_>,
        job_id: u64,
        worker: &str,
        gpus: &[u32],
    ) -> Result<u64, String> {
        let kind = command::Kind::PlaceJob(PlaceJob {
            job_id,
            attempt: 1,
            session_id: 1,
            shards: vec![ShardAssignment {
                rank: 0,
                worker_id: worker.into(),
                gpus: gpus.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        });
        apply_at(txn, 3, kind)
    }

    fn deploy(txn: &mut Txn<'_>, cpus: u32, gpus: u32) {
        let record = DeploymentRecord {
            name: "resnet".into(),
            primary: Some(ModelTarget {
                model: "resnet".into(),
                version: 1,
                artifact: "resnet-model@1".into(),
                ..Default::default()
            }),
            replicas: 2,
            min_replicas: 2,
            max_replicas: 2,
            cpus_per_replica: cpus,
            memory_per_replica: 1 << 30,
            gpus_per_replica: gpus,
            ..Default::default()
        };
        let kind = command::Kind::Deploy(Deploy {
            deployment: Some(record),
        });
        apply_at(txn, 4, kind).expect("deployed");
    }

    fn place_replicas(
        txn: &mut Txn<'_>,
        add: &[(&str, &[u32])],
        remove: &[u64],
    ) -> Result<u64, String> {
        let d = read_deployment(txn, "resnet")
            .expect("read")
            .expect("deployed");
        let kind = command::Kind::UpdateReplicas(UpdateReplicas {
            name: "resnet".into(),
            generation: d.generation,
            next_replica_id: d.next_replica_id,
            add: add
                .iter()
                .map(|(worker, gpus)| ReplicaRecord {
                    worker_id: worker.to_string(),
                    target: d.primary.clone(),
                    gpus: gpus.to_vec(),
                    ..Default::default()
                })
                .collect(),
            remove: remove.to_vec(),
            reason: String::new(),
        });
        apply_at(txn, 5, kind)
    }

    #[test]
    fn no_gpu_is_promised_twice_to_shards_and_replicas() {
        let mut txn = Txn::new(&Empty);
        register_worker(&mut txn, "gpu-box", 8, 2);
        let first = submit(&mut txn, 1);
        let second = submit(&mut txn, 1);
        assert_eq!(place_job(&mut txn, first, "gpu-box", &[0]), Ok(0));
        // A second leader's view from before the first placement: GPU 0 again.
        let twice = place_job(&mut txn, second, "gpu-box", &[0]).expect_err("refused");
        assert!(
            twice.contains("GPU 0 of worker gpu-box is already held"),
            "{twice}"
        );
        let job = read_job(&txn, second).expect("read").expect("job");
        assert_eq!(
            job.state,
            JobState::Pending as i32,
            "the refused job still waits"
        );
        assert_eq!(job.attempt, 0);

        deploy(&mut txn, 1, 1);
        let taken = place_replicas(&mut txn, &[("gpu-box", &[0])], &[]).expect_err("refused");
        assert!(
            taken.contains("GPU 0 of worker gpu-box is already held"),
            "{taken}"
        );
        let none = place_replicas(&mut txn, &[("gpu-box", &[7])], &[]).expect_err("refused");
        assert!(none.contains("worker gpu-box has no GPU 7"), "{none}");
        let both = place_replicas(&mut txn, &[("gpu-box", &[1]), ("gpu-box", &[1])], &[])
            .expect_err("refused");
        assert!(
            both.contains("GPU 1 of worker gpu-box is already held"),
            "{both}"
        );
        assert_eq!(place_replicas(&mut txn, &[("gpu-box", &[1])], &[]), Ok(1));
        // Now both GPUs are held: the second job cannot have either.
        let full = place_job(&mut txn, second, "gpu-box", &[1]).expect_err("refused");
        assert!(full.contains("already held"), "{full}");
        let wrong_count = place_job(&mut txn, second, "gpu-box", &[]).expect_err("refused");
        assert!(
            wrong_count.contains("wants 1 GPU(s) per shard"),
            "{wrong_count}"
        );
    }

    #[test]
    fn cpus_and_memory_bound_placements_and_a_removal_frees_its_share() {
        let mut txn = Txn::new(&Empty);
        register_worker(&mut txn, "small", 2, 0);
        deploy(&mut txn, 1, 0);
        assert_eq!(
            place_replicas(&mut txn, &[("small", &[]), ("small", &[])], &[]),
            Ok(1)
        );
        let job = submit(&mut txn, 0);
        let cpus = place_job(&mut txn, job, "small", &[]).expect_err("refused");
        assert!(
            cpus.contains("worker small has 2 CPU(s), 2 held: 1 more do not fit"),
            "{cpus}"
        );
        let over = place_replicas(&mut txn, &[("small", &[])], &[]).expect_err("refused");
        assert!(over.contains("do not fit"), "{over}");
        // Replacing replica 1 in the same update fits.
        assert_eq!(place_replicas(&mut txn, &[("small", &[])], &[1]), Ok(1));
        let ids: Vec<u64> = read_deployment(&txn, "resnet")
            .expect("read")
            .expect("deployed")
            .replica_set
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![2, 3]);
        // Memory: 16 GiB, two replicas hold 1 GiB each; a 15 GiB shard does not
        // fit (the CPUs freed first: a 15 GiB shard of 0 CPUs).
        let mut big = read_job(&txn, job).expect("read").expect("job");
        big.memory_per_shard = 15 << 30;
        big.cpus_per_shard = 0;
        txn.put(keys::job(job), big.encode_to_vec());
        let memory = place_job(&mut txn, job, "small", &[]).expect_err("refused");
        assert!(
            memory.contains("has 16384 MiB of memory, 2048 MiB held: 15360 MiB more do not fit"),
            "{memory}"
        );
        // The worker comes back with one CPU while its two replicas hold two: what
        // asks for nothing still fits, as the leader sees it.
        register_worker(&mut txn, "small", 1, 0);
        big.memory_per_shard = 0;
        txn.put(keys::job(job), big.encode_to_vec());
        assert_eq!(place_job(&mut txn, job, "small", &[]), Ok(0));
    }

    #[test]
    fn a_stale_or_misplaced_update_is_refused() {
        let mut txn = Txn::new(&Empty);
        register_worker(&mut txn, "a", 4, 0);
        register_worker(&mut txn, "b", 4, 0);
        deploy(&mut txn, 1, 0);
        let d = read_deployment(&txn, "resnet")
            .expect("read")
            .expect("deployed");
        assert_eq!(place_replicas(&mut txn, &[("a", &[])], &[]), Ok(1));
        // A second update planned from the same view as the first.
        let stale = command::Kind::UpdateReplicas(UpdateReplicas {
            name: "resnet".into(),
            generation: d.generation,
            next_replica_id: d.next_replica_id,
            add: vec![ReplicaRecord {
                worker_id: "b".into(),
                target: d.primary.clone(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let refused = apply_at(&mut txn, 6, stale).expect_err("refused");
        assert!(refused.contains("stale"), "{refused}");
        let kind = command::Kind::SetWorkerState(SetWorkerState {
            worker_id: "b".into(),
            state: WorkerState::Down as i32,
        });
        apply_at(&mut txn, 7, kind).expect("set");
        let down = place_replicas(&mut txn, &[("b", &[])], &[]).expect_err("refused");
        assert!(down.contains("worker b is down"), "{down}");
        let unknown = place_replicas(&mut txn, &[("c", &[])], &[]).expect_err("refused");
        assert!(unknown.contains("worker c is not registered"), "{unknown}");
    }
}
