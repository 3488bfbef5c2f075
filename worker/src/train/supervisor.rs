//! Runs the training shards the coordinators want on this worker: each heartbeat
//! answer lists them (desired state); a listed shard that is not running starts,
//! a running shard that is no longer listed (its job was cancelled, or its gang
//! restarts) is stopped. A shard that ended is not started again for the same
//! attempt, even while the coordinators still list it.
//!
//! Two rules keep one copy of a shard at a time across the cluster:
//! - the shards hold a lease ([`ShardLease`]) that each heartbeat answer renews;
//!   when no answer came for the lease's term, which ends before the leader would
//!   call this worker Down and place the gang elsewhere, every shard here stops
//!   (and reports Failed, so its gang restarts at once if it can);
//! - the heartbeats tell the leader which shards run here, stopping ones
//!   included, and the leader places a restarted gang only once no worker that
//!   is not Down runs its earlier attempt. A shard of a later attempt does not
//!   start here either while one of an earlier attempt still stops.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_common::jobspec::JobSpec;
use kiln_proto::v1::{RunningShard, ShardTask};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::shard::{self, Outcome, ShardContext};

/// How often the supervisor looks at its shards and the lease, besides when the
/// desired list changes.
const TICK: Duration = Duration::from_millis(250);
/// Longest a shard told to stop may take before it is aborted; a command
/// job's rank has its own grace (`command.grace_secs`) and this much more.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a shard of the job `spec` describes may take to stop.
fn stop_grace(spec: Option<&JobSpec>) -> Duration {
    spec.and_then(|spec| spec.command())
        .map(|c| Duration::from_secs(u64::from(c.command.grace_secs)) + STOP_GRACE)
        .unwrap_or(STOP_GRACE)
}

/// A shard's identity: job, attempt, rank.
type Key = (u64, u32, u32);

fn key(task: &ShardTask) -> Key {
    (task.job_id, task.attempt, task.rank)
}

/// The training shards' lease: renewed by every answer from the coordinators
/// (registration or heartbeat), it lapses when none came for its term. Time is
/// the monotonic clock, which also runs while the process is frozen (a paused
/// container), so a worker that wakes after a long pause sees the lapse.
#[derive(Debug, Default)]
pub struct ShardLease {
    inner: Mutex<LeaseInner>,
}

#[derive(Debug, Default)]
struct LeaseInner {
    /// `None`: the coordinators set no term; the lease never lapses.
    term: Option<Duration>,
    renewed_at: Option<Instant>,
    /// Lapses seen at renewals.
    lapses: u64,
}

impl LeaseInner {
    fn expired(&self, now: Instant) -> bool {
        match (self.term, self.renewed_at) {
            (Some(term), Some(at)) => now.saturating_duration_since(at) > term,
            _ => false,
        }
    }
}

impl ShardLease {
    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseInner> {
        // The fields are plain values; a panic elsewhere cannot half-write them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the term the coordinators named at registration (0: none).
    pub fn set_term_ms(&self, term_ms: u64) {
        self.lock().term = (term_ms > 0).then(|| Duration::from_millis(term_ms));
    }

    /// Renews the lease: an answer came from the coordinators now. A renewal
    /// after a lapse counts the lapse.
    pub fn renew(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.expired(now) {
            inner.lapses += 1;
        }
        inner.renewed_at = Some(now);
    }

    /// Lapses so far, the one going on now included: a shard started when this
    /// was lower must stop.
    pub fn lapses(&self) -> u64 {
        let inner = self.lock();
        inner.lapses + u64::from(inner.expired(Instant::now()))
    }

    /// Whether the lease has lapsed and not been renewed since.
    pub fn expired(&self) -> bool {
        self.lock().expired(Instant::now())
    }
}

/// A shard task running here.
struct Running {
    /// Stops it quietly: its attempt is over or the worker shuts down.
    stop: CancellationToken,
    /// Stops it with a failure report: the lease lapsed.
    lapse: CancellationToken,
    handle: JoinHandle<Outcome>,
    /// The lease's lapses when it started.
    lapses: u64,
    /// When it was told to stop.
    stopping_since: Option<Instant>,
    /// How long it may take to stop.
    grace: Duration,
    /// Whether it was aborted after its stop grace.
    aborted: bool,
}

impl Running {
    /// Tells shard `k` to stop, once: with a failure report when the lease
    /// `lapsed`, quietly otherwise (no longer listed, or shutting down).
    fn stop(&mut self, k: Key, lapsed: bool) {
        if self.stopping_since.is_some() {
            return;
        }
        self.stopping_since = Some(Instant::now());
        let (job, attempt, rank) = k;
        if lapsed {
            tracing::warn!(
                job,
                attempt,
                rank,
                "stopping a training shard: no answer from the coordinators within its lease"
            );
            self.lapse.cancel();
        } else {
            tracing::info!(job, attempt, rank, "stopping a training shard");
            self.stop.cancel();
        }
    }
}

/// Reconciles running shards with `desired` until `shutdown`, publishing the
/// shards running here (stopping ones included) on `running_now`.
pub async fn supervise(
    ctx: ShardContext,
    mut desired: watch::Receiver<Vec<ShardTask>>,
    lease: Arc<ShardLease>,
    running_now: Arc<watch::Sender<Vec<RunningShard>>>,
    shutdown: CancellationToken,
) {
    // Ranks of command jobs an earlier life of this worker could not stop.
    super::command::reap_orphans(&ctx.work_dir);
    let mut running: HashMap<Key, Running> = HashMap::new();
    let mut ended: HashSet<Key> = HashSet::new();
    loop {
        let tasks = desired.borrow_and_update().clone();
        let wanted: HashSet<Key> = tasks.iter().map(key).collect();
        let finished: Vec<Key> = running
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(k, _)| *k)
            .collect();
        for k in finished {
            if let Some(r) = running.remove(&k) {
                let outcome = match r.handle.await {
                    Ok(outcome) => format!("{outcome:?}"),
                    Err(e) if e.is_cancelled() => "Aborted".to_string(),
                    Err(e) => format!("Panicked ({e})"),
                };
                tracing::info!(
                    job = k.0,
                    attempt = k.1,
                    rank = k.2,
                    outcome,
                    "a training shard ended"
                );
            }
            ended.insert(k);
        }
        ended.retain(|k| wanted.contains(k));
        let lapses = lease.lapses();
        for (k, r) in &mut running {
            if let Some(since) = r.stopping_since {
                if since.elapsed() > r.grace && !r.aborted {
                    r.aborted = true;
                    tracing::warn!(
                        job = k.0,
                        attempt = k.1,
                        rank = k.2,
                        grace_s = r.grace.as_secs(),
                        "a training shard did not stop within its grace; aborting it"
                    );
                    r.handle.abort();
                }
            } else if r.lapses < lapses {
                r.stop(*k, true);
            } else if !wanted.contains(k) {
                r.stop(*k, false);
            }
        }
        // Nothing starts on a lapsed lease: the list may be stale.
        if !lease.expired() {
            for task in tasks {
                let k = key(&task);
                if running.contains_key(&k) || ended.contains(&k) {
                    continue;
                }
                // An earlier attempt of the job still stopping here: next round.
                if running.keys().any(|r| r.0 == k.0 && r.1 < k.1) {
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
                let lapse = CancellationToken::new();
                // Parsed once here, for the grace and for the shard.
                let spec = JobSpec::parse(&task.spec_toml).map_err(|e| e.to_string());
                let grace = stop_grace(spec.as_ref().ok());
                let handle = tokio::spawn(shard::run(
                    ctx.clone(),
                    task,
                    spec,
                    stop.clone(),
                    lapse.clone(),
                ));
                running.insert(
                    k,
                    Running {
                        stop,
                        lapse,
                        handle,
                        lapses,
                        stopping_since: None,
                        grace,
                        aborted: false,
                    },
                );
            }
        }
        let mut now: Vec<RunningShard> = running
            .keys()
            .map(|&(job_id, attempt, rank)| RunningShard {
                job_id,
                attempt,
                rank,
            })
            .collect();
        now.sort_by_key(|s| (s.job_id, s.attempt, s.rank));
        running_now.send_if_modified(|old| {
            let changed = *old != now;
            if changed {
                *old = now;
            }
            changed
        });
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = desired.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    // Every shard stops at once, each within its own grace (a command job's
    // rank gets SIGTERM and its grace_secs).
    let stopping: Vec<_> = running
        .into_iter()
        .map(|(k, mut r)| {
            r.stop(k, false);
            tokio::spawn(async move {
                if tokio::time::timeout(r.grace, &mut r.handle).await.is_err() {
                    r.handle.abort();
                }
            })
        })
        .collect();
    for s in stopping {
        let _ = s.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_without_a_term_never_lapses() {
        let lease = ShardLease::default();
        lease.renew();
        assert!(!lease.expired());
        assert_eq!(lease.lapses(), 0);
    }

    #[test]
    fn a_lease_lapses_after_its_term_and_a_late_renewal_keeps_the_count() {
        let lease = ShardLease::default();
        lease.set_term_ms(30);
        lease.renew();
        assert_eq!(lease.lapses(), 0);
        std::thread::sleep(Duration::from_millis(60));
        assert!(lease.expired());
        // A shard started before now must stop: the count moved.
        assert_eq!(lease.lapses(), 1);
        lease.renew();
        assert!(!lease.expired());
        // The lapse stays counted after the renewal: shards started before it
        // still stop, shards started after it do not.
        assert_eq!(lease.lapses(), 1);
        lease.renew();
        assert_eq!(lease.lapses(), 1);
    }
}
