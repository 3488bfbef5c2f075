//! Gang scheduling decisions for training jobs, as pure functions over what the
//! workers have free; the leader calls them and proposes the result through Raft.
//!
//! - A job's shards are placed all in one decision or not at all: nothing is held
//!   for a job that cannot start, so two jobs can never each hold half of what the
//!   other needs.
//! - Each shard goes to the worker where it fits most tightly (best fit: fewest
//!   GPUs, then fewest CPUs, then least memory left), which packs GPUs and keeps
//!   large holes for large shards.
//! - The queue runs by priority (higher first), then by age. A job that does not
//!   fit now holds back every job behind it (no backfilling), so a large job is
//!   never starved by a stream of small ones. A job that could not fit even on the
//!   whole cluster, empty, does not hold anything back: it waits, with that reason,
//!   until machines join.
//! - With preemption on, the job at the head of the queue that must wait may stop
//!   running gangs of lower priority ([`preemption`]): the lowest priority first,
//!   the most recently started first among equals (the least work lost), as few as
//!   make room. They go back to the queue and resume from their checkpoints.

use std::cmp::Reverse;

/// What one worker offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub worker_id: String,
    pub cpus: u32,
    /// Indices of the free GPUs.
    pub gpus: Vec<u32>,
    pub memory_bytes: u64,
}

/// What one job asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gang {
    pub job_id: String,
    pub priority: i32,
    pub submitted_at_ms: u64,
    pub shards: u32,
    pub cpus_per_shard: u32,
    pub gpus_per_shard: u32,
    pub memory_per_shard: u64,
}

/// Where one shard runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub shard: u32,
    pub worker_id: String,
    pub gpus: Vec<u32>,
}

/// The outcome of one scheduling pass for a pending job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start now, with these placements (one per shard, in shard order).
    Start(Vec<Placement>),
    /// Wait: it fits the cluster but not what is free now (or a job ahead waits).
    Wait(String),
    /// Wait: even the whole cluster, empty, could not hold it.
    TooLarge(String),
}

/// Takes what `held` (one shard's, or one gang's on one worker) holds out of
/// its worker in `capacity`; nothing when the worker is not there (not Alive).
pub fn take(capacity: &mut [Capacity], held: &Capacity) {
    if let Some(c) = capacity.iter_mut().find(|c| c.worker_id == held.worker_id) {
        c.cpus = c.cpus.saturating_sub(held.cpus);
        c.memory_bytes = c.memory_bytes.saturating_sub(held.memory_bytes);
        c.gpus.retain(|g| !held.gpus.contains(g));
    }
}

/// Gives what `held` holds back to its worker in `capacity`.
fn give(capacity: &mut [Capacity], held: &Capacity) {
    if let Some(c) = capacity.iter_mut().find(|c| c.worker_id == held.worker_id) {
        c.cpus += held.cpus;
        c.memory_bytes += held.memory_bytes;
        c.gpus.extend(&held.gpus);
    }
}

fn fits(c: &Capacity, g: &Gang) -> bool {
    c.cpus >= g.cpus_per_shard
        && c.gpus.len() as u32 >= g.gpus_per_shard
        && c.memory_bytes >= g.memory_per_shard
}

/// Places every shard of `gang` on `capacity`, best fit, or none; on success the
/// capacity is reduced by what the shards take.
pub fn place(gang: &Gang, capacity: &mut [Capacity]) -> Option<Vec<Placement>> {
    let mut trial = capacity.to_vec();
    let mut placements = Vec::with_capacity(gang.shards as usize);
    for shard in 0..gang.shards {
        let best = trial
            .iter()
            .enumerate()
            .filter(|(_, c)| fits(c, gang))
            .min_by_key(|(_, c)| {
                (
                    c.gpus.len() as u32 - gang.gpus_per_shard,
                    c.cpus - gang.cpus_per_shard,
                    c.memory_bytes - gang.memory_per_shard,
                    c.worker_id.clone(),
                )
            })
            .map(|(i, _)| i)?;
        let worker = &mut trial[best];
        worker.cpus -= gang.cpus_per_shard;
        worker.memory_bytes -= gang.memory_per_shard;
        worker.gpus.sort_unstable();
        let gpus: Vec<u32> = worker.gpus.drain(..gang.gpus_per_shard as usize).collect();
        placements.push(Placement {
            shard,
            worker_id: worker.worker_id.clone(),
            gpus,
        });
    }
    capacity.clone_from_slice(&trial);
    Some(placements)
}

/// Decides, for each pending job, whether it starts now. `free` is what the
/// workers have free now; `total` what they would have with nothing running.
/// Returns a decision per job, in the order the queue runs.
pub fn schedule(
    pending: &[Gang],
    free: &[Capacity],
    total: &[Capacity],
) -> Vec<(String, Decision)> {
    let mut queue: Vec<&Gang> = pending.iter().collect();
    queue.sort_by_key(|g| (Reverse(g.priority), g.submitted_at_ms, g.job_id.clone()));
    let mut free = free.to_vec();
    let mut blocked_by: Option<String> = None;
    let mut out = Vec::with_capacity(queue.len());
    for gang in queue {
        let mut empty = total.to_vec();
        if place(gang, &mut empty).is_none() {
            out.push((
                gang.job_id.clone(),
                Decision::TooLarge(format!(
                    "{} shard(s) of {} CPU(s), {} GPU(s) and {} bytes each do not fit the cluster's {} worker(s) even when idle",
                    gang.shards,
                    gang.cpus_per_shard,
                    gang.gpus_per_shard,
                    gang.memory_per_shard,
                    total.len()
                )),
            ));
            continue;
        }
        if let Some(ahead) = &blocked_by {
            out.push((
                gang.job_id.clone(),
                Decision::Wait(format!("queued behind job {ahead}")),
            ));
            continue;
        }
        match place(gang, &mut free) {
            Some(placements) => out.push((gang.job_id.clone(), Decision::Start(placements))),
            None => {
                blocked_by = Some(gang.job_id.clone());
                out.push((
                    gang.job_id.clone(),
                    Decision::Wait("waiting for resources held by running jobs".into()),
                ));
            }
        }
    }
    out
}

/// A running gang that preemption may stop, and what it holds on each worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub job_id: String,
    pub priority: i32,
    pub started_at_ms: u64,
    /// What each of the gang's shards holds on its worker.
    pub held: Vec<Capacity>,
}

/// Which running gangs to stop so that `gang` fits in `free` plus what they hold:
/// only gangs of lower priority, the lowest priority first and, among equals, the
/// most recently started; as few as it takes (a victim whose resources turn out
/// not to be needed is spared). `None` when stopping every one of them would still
/// not make room.
pub fn preemption(gang: &Gang, free: &[Capacity], running: &[Holder]) -> Option<Vec<String>> {
    let mut candidates: Vec<&Holder> = running
        .iter()
        .filter(|h| h.priority < gang.priority)
        .collect();
    candidates.sort_by_key(|h| (h.priority, Reverse(h.started_at_ms), h.job_id.clone()));
    let fits_with = |victims: &[&Holder]| {
        let mut trial = free.to_vec();
        for held in victims.iter().flat_map(|v| &v.held) {
            give(&mut trial, held);
        }
        place(gang, &mut trial).is_some()
    };
    let mut victims: Vec<&Holder> = Vec::new();
    for candidate in candidates {
        if fits_with(&victims) {
            break;
        }
        victims.push(candidate);
    }
    if !fits_with(&victims) {
        return None;
    }
    // Spare the victims the gang does not need after all, the earliest chosen
    // (the ones the order preferred to stop) last.
    let mut i = victims.len();
    while i > 0 {
        i -= 1;
        let mut without = victims.clone();
        without.remove(i);
        if fits_with(&without) {
            victims = without;
        }
    }
    Some(victims.into_iter().map(|h| h.job_id.clone()).collect())
}

/// What one serving replica takes from its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaNeed {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
}

/// Where one replica goes: its worker and the GPUs it holds there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPlacement {
    pub worker_id: String,
    pub gpus: Vec<u32>,
}

/// Places up to `count` replicas of one deployment, each asking `need`, with a
/// spread: each goes to the worker holding the fewest replicas of the same
/// deployment (`held`, by worker id), then the fewest free GPUs beyond those it
/// needs (GPUs stay whole for the gangs that need many), then the most free
/// CPUs. Unlike a gang, replicas are placed one by one: as many as fit. A replica
/// takes the lowest free GPU indices. Returns the placements and reduces `free`
/// by what they take.
pub fn spread(
    count: usize,
    need: &ReplicaNeed,
    free: &mut [Capacity],
    held: &std::collections::HashMap<String, usize>,
) -> Vec<ReplicaPlacement> {
    let mut held = held.clone();
    let mut chosen = Vec::with_capacity(count);
    for _ in 0..count {
        let Some(best) = free
            .iter_mut()
            .filter(|c| {
                c.cpus >= need.cpus
                    && c.memory_bytes >= need.memory_bytes
                    && c.gpus.len() as u32 >= need.gpus
            })
            .min_by_key(|c| {
                (
                    held.get(&c.worker_id).copied().unwrap_or(0),
                    c.gpus.len() as u32 - need.gpus,
                    Reverse(c.cpus),
                    c.worker_id.clone(),
                )
            })
        else {
            break;
        };
        best.cpus -= need.cpus;
        best.memory_bytes -= need.memory_bytes;
        best.gpus.sort_unstable();
        let gpus: Vec<u32> = best.gpus.drain(..need.gpus as usize).collect();
        *held.entry(best.worker_id.clone()).or_default() += 1;
        chosen.push(ReplicaPlacement {
            worker_id: best.worker_id.clone(),
            gpus,
        });
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, cpus: u32, gpus: u32) -> Capacity {
        Capacity {
            worker_id: id.into(),
            cpus,
            gpus: (0..gpus).collect(),
            memory_bytes: 64 << 30,
        }
    }

    fn gang(id: &str, priority: i32, at: u64, shards: u32, cpus: u32, gpus: u32) -> Gang {
        Gang {
            job_id: id.into(),
            priority,
            submitted_at_ms: at,
            shards,
            cpus_per_shard: cpus,
            gpus_per_shard: gpus,
            memory_per_shard: 1 << 30,
        }
    }

    fn holder(id: &str, priority: i32, started: u64, held: &[(&str, u32)]) -> Holder {
        Holder {
            job_id: id.into(),
            priority,
            started_at_ms: started,
            held: held
                .iter()
                .map(|(w, cpus)| Capacity {
                    worker_id: w.to_string(),
                    cpus: *cpus,
                    gpus: Vec::new(),
                    memory_bytes: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn preemption_stops_the_fewest_lowest_priority_newest_gangs() {
        // Two workers of 4 CPUs, all busy: old-low (2+2), new-low (1+1), mid (1+1).
        let free = vec![worker("a", 0, 0), worker("b", 0, 0)];
        let running = vec![
            holder("old-low", 1, 100, &[("a", 2), ("b", 2)]),
            holder("new-low", 1, 200, &[("a", 1), ("b", 1)]),
            holder("mid", 5, 150, &[("a", 1), ("b", 1)]),
        ];
        // Two shards of 1 CPU: the newest of the lowest priority is enough.
        let urgent = gang("urgent", 9, 300, 2, 1, 0);
        assert_eq!(
            preemption(&urgent, &free, &running),
            Some(vec!["new-low".to_string()])
        );
        // Two shards of 2 CPUs: new-low alone is too small, so old-low is stopped
        // too, then new-low is spared as old-low alone makes room.
        let bigger = gang("bigger", 9, 300, 2, 2, 0);
        assert_eq!(
            preemption(&bigger, &free, &running),
            Some(vec!["old-low".to_string()])
        );
        // Only gangs of lower priority may be stopped: mid is not, for a job of 5.
        let peer = gang("peer", 5, 300, 2, 4, 0);
        assert_eq!(preemption(&peer, &free, &running), None);
        // A gang that would not fit even with every lower one stopped stops none.
        let huge = gang("huge", 9, 300, 3, 4, 0);
        assert_eq!(preemption(&huge, &free, &running), None);
    }

    #[test]
    fn replicas_spread_over_workers_and_stop_where_nothing_fits() {
        let mut free = vec![worker("a", 8, 0), worker("b", 2, 0), worker("c", 1, 0)];
        let held = std::collections::HashMap::from([("a".to_string(), 1)]);
        let need = ReplicaNeed {
            cpus: 1,
            memory_bytes: 1 << 30,
            gpus: 0,
        };
        let chosen: Vec<String> = spread(4, &need, &mut free, &held)
            .into_iter()
            .map(|p| p.worker_id)
            .collect();
        // b and c hold none; b has more CPUs; then a, b and c hold one each.
        assert_eq!(chosen, vec!["b", "c", "a", "b"]);
        let cpus: Vec<u32> = free.iter().map(|c| c.cpus).collect();
        assert_eq!(cpus, vec![7, 0, 0]);
        let more = spread(9, &need, &mut free, &held);
        assert_eq!(more.len(), 7, "only a has CPUs left");
    }

    #[test]
    fn gpu_replicas_take_free_gpus_once_and_only_where_there_are_some() {
        let mut free = vec![
            worker("cpu", 16, 0),
            worker("big", 8, 4),
            worker("one", 8, 1),
        ];
        // A training shard holds GPU 0 of big.
        free[1].gpus.retain(|&g| g != 0);
        let need = ReplicaNeed {
            cpus: 1,
            memory_bytes: 1 << 30,
            gpus: 1,
        };
        let placed = spread(5, &need, &mut free, &Default::default());
        let at: Vec<(&str, &[u32])> = placed
            .iter()
            .map(|p| (p.worker_id.as_str(), p.gpus.as_slice()))
            .collect();
        // one's single GPU first (it leaves no GPU idle), then big's lowest free ones;
        // never the CPU worker, never GPU 0 of big, and no more than there are.
        assert_eq!(
            at,
            vec![
                ("one", &[0][..]),
                ("big", &[1]),
                ("big", &[2]),
                ("big", &[3])
            ]
        );
        assert!(free.iter().all(|c| c.gpus.is_empty()));
    }

    #[test]
    fn a_gang_is_placed_whole_or_not_at_all() {
        let mut free = vec![worker("a", 4, 0), worker("b", 2, 0)];
        let before = free.clone();
        assert!(place(&gang("j", 0, 0, 4, 2, 0), &mut free).is_none());
        assert_eq!(free, before, "a gang that does not fit holds nothing");
        let placed = place(&gang("j", 0, 0, 3, 2, 0), &mut free).expect("fits");
        assert_eq!(placed.len(), 3);
        assert_eq!(free.iter().map(|c| c.cpus).sum::<u32>(), 0);
    }

    #[test]
    fn memory_bounds_the_shards_a_worker_takes() {
        // Plenty of CPUs; 1 GiB a shard: 2 fit on "small", 3 on "big".
        let total = vec![
            Capacity {
                memory_bytes: 2 << 30,
                ..worker("small", 16, 0)
            },
            Capacity {
                memory_bytes: 3 << 30,
                ..worker("big", 16, 0)
            },
        ];
        let mut free = total.clone();
        let placed = place(&gang("j", 0, 0, 5, 1, 0), &mut free).expect("fits");
        let on = |id: &str| placed.iter().filter(|p| p.worker_id == id).count();
        assert_eq!((on("small"), on("big")), (2, 3));
        assert!(free.iter().all(|c| c.memory_bytes == 0), "{free:?}");
        let decisions = schedule(&[gang("k", 0, 0, 6, 1, 0)], &total, &total);
        match &decisions[0].1 {
            Decision::TooLarge(why) => {
                assert!(why.contains(&format!("{} bytes each", 1u64 << 30)), "{why}")
            }
            other => panic!("six 1 GiB shards on 5 GiB: {other:?}"),
        }
    }

    #[test]
    fn gpus_are_packed_best_fit() {
        // One 2-GPU shard goes to the worker with 2 free, keeping the 8-GPU one whole.
        let mut free = vec![worker("big", 32, 8), worker("small", 32, 2)];
        let placed = place(&gang("j", 0, 0, 1, 1, 2), &mut free).expect("fits");
        assert_eq!(placed[0].worker_id, "small");
        assert_eq!(placed[0].gpus, vec![0, 1]);
        let placed = place(&gang("k", 0, 0, 1, 1, 8), &mut free).expect("fits");
        assert_eq!(placed[0].worker_id, "big");
    }

    #[test]
    fn the_queue_runs_by_priority_then_age_without_starving_big_jobs() {
        let total = vec![worker("a", 4, 0), worker("b", 4, 0)];
        // 6 CPUs are busy: 2 free.
        let free = vec![worker("a", 1, 0), worker("b", 1, 0)];
        let pending = vec![
            gang("small-late", 0, 30, 1, 1, 0),
            gang("big", 0, 10, 2, 4, 0),
            gang("urgent", 5, 20, 1, 1, 0),
            gang("huge", 9, 0, 3, 4, 0),
        ];
        let decisions = schedule(&pending, &free, &total);
        let order: Vec<&str> = decisions.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(order, vec!["huge", "urgent", "big", "small-late"]);
        assert!(
            matches!(decisions[0].1, Decision::TooLarge(_)),
            "needs 12 CPUs of 8"
        );
        assert!(
            matches!(decisions[1].1, Decision::Start(_)),
            "urgent fits in what is free"
        );
        assert!(matches!(decisions[2].1, Decision::Wait(_)), "big must wait");
        match &decisions[3].1 {
            Decision::Wait(reason) => assert!(reason.contains("behind job big"), "{reason}"),
            other => panic!("small-late must not overtake big: {other:?}"),
        }
        // When everything is free again, big starts.
        let decisions = schedule(&pending[..2], &total, &total);
        assert!(
            matches!(decisions[0].1, Decision::Start(_)),
            "{decisions:?}"
        );
    }
}
