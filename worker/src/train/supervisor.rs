//! Runs the training shards the coordinators want on this worker: each heartbeat
//! answer lists them (desired state); a listed shard that is not running starts,
//! a running shard that is no longer listed (its job was cancelled, or its gang
//! restarts) is stopped. A shard that ended is not started again for the same
//! attempt, even while the coordinators still list it.

use std::collections::{HashMap, HashSet};

use kiln_proto::v1::ShardTask;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::shard::{self, ShardContext};

/// A shard's identity: job, attempt, rank.
type Key = (u64, u32, u32);

fn key(task: &ShardTask) -> Key {
    (task.job_id, task.attempt, task.rank)
}

/// Reconciles running shards with `desired` until `shutdown`.
pub async fn supervise(
    ctx: ShardContext,
    mut desired: watch::Receiver<Vec<ShardTask>>,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<Key, (CancellationToken, JoinHandle<shard::Outcome>)> = HashMap::new();
    let mut ended: HashSet<Key> = HashSet::new();
    loop {
        let tasks = desired.borrow_and_update().clone();
        let wanted: HashSet<Key> = tasks.iter().map(key).collect();
        running.retain(|k, (_, handle)| {
            if handle.is_finished() {
                ended.insert(*k);
                false
            } else {
                true
            }
        });
        ended.retain(|k| wanted.contains(k));
        for (k, (stop, _)) in &running {
            if !wanted.contains(k) {
                tracing::info!(
                    job = k.0,
                    attempt = k.1,
                    rank = k.2,
                    "stopping a shard the coordinators no longer list"
                );
                stop.cancel();
            }
        }
        for task in tasks {
            let k = key(&task);
            if running.contains_key(&k) || ended.contains(&k) {
                continue;
            }
            tracing::info!(
                job = k.0,
                attempt = k.1,
                rank = k.2,
                world = task.world,
                "starting a training shard"
            );
            let stop = shutdown.child_token();
            let handle = tokio::spawn(shard::run(ctx.clone(), task, stop.clone()));
            running.insert(k, (stop, handle));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = desired.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            // Notice shards that ended even when the list does not change.
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    for (_, (stop, handle)) in running {
        stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), handle).await;
    }
}
