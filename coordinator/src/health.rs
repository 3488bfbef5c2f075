//! Worker health: heartbeats arrive at the leader; a leader-only loop turns
//! silence into Suspect, then Down, by proposing state changes.
//!
//! Heartbeat times live only in the leader's memory (a new leader starts every
//! clock at its election), while the resulting states are replicated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_common::config::HealthSettings;
use kiln_proto::v1::{RunningShard, WorkerState};

/// Returns the state a worker should move to after `silence` without heartbeats,
/// or `None` when it should stay as it is. Only degrades: recovery comes with a
/// heartbeat.
pub fn assess(
    current: WorkerState,
    silence: Duration,
    settings: &HealthSettings,
) -> Option<WorkerState> {
    let silence_ms = silence.as_millis() as u64;
    let target = if silence_ms >= settings.down_after_ms {
        WorkerState::Down
    } else if silence_ms >= settings.suspect_after_ms {
        WorkerState::Suspect
    } else {
        return None;
    };
    let rank = |s: WorkerState| match s {
        WorkerState::Unspecified | WorkerState::Alive => 0,
        WorkerState::Suspect => 1,
        WorkerState::Down => 2,
    };
    (rank(target) > rank(current)).then_some(target)
}

/// How long a worker's training shards may run without a heartbeat answer: two
/// heartbeat intervals short of the Down threshold (at least half of it), so a
/// worker cut off from the leader stops its shards before the leader calls it
/// Down and places their gang again.
pub fn shard_lease_ms(settings: &HealthSettings, heartbeat_interval_ms: u64) -> u64 {
    let down = settings.down_after_ms;
    down.saturating_sub(2 * heartbeat_interval_ms).max(down / 2)
}

/// Last heartbeat of each worker, as seen by this coordinator while it leads.
#[derive(Clone, Default)]
pub struct HeartbeatClock {
    inner: Arc<Mutex<ClockInner>>,
}

#[derive(Default)]
struct ClockInner {
    last_seen: HashMap<String, Instant>,
    /// The training shards each worker said in its last heartbeat it runs;
    /// `None` for a worker too old to list them.
    running: HashMap<String, Option<Vec<RunningShard>>>,
    /// The training shards this leader's last heartbeat answer to each worker
    /// told it to run: the worker may start them before its next heartbeat
    /// lists them.
    delivered: HashMap<String, Vec<RunningShard>>,
    leading_since: Option<Instant>,
}

/// Where the earlier attempt of a job may still run, as the leader knows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Stopping {
    /// The worker said in its last heartbeat that it still runs this shard.
    Running(String, RunningShard),
    /// The worker has not sent a heartbeat to this leader yet.
    Unheard(String),
}

impl HeartbeatClock {
    /// Records a heartbeat from `worker_id` now.
    pub fn beat(&self, worker_id: &str) {
        let mut inner = self.inner.lock().expect("heartbeat clock poisoned");
        inner
            .last_seen
            .insert(worker_id.to_string(), Instant::now());
    }

    /// Records a heartbeat from `worker_id` now, with the shards it runs (`None`:
    /// it does not list them).
    pub fn beat_running(&self, worker_id: &str, running: Option<Vec<RunningShard>>) {
        let mut inner = self.inner.lock().expect("heartbeat clock poisoned");
        inner
            .last_seen
            .insert(worker_id.to_string(), Instant::now());
        inner.running.insert(worker_id.to_string(), running);
    }

    /// Records the shards the answer to `worker_id`'s heartbeat tells it to run.
    pub fn delivered(&self, worker_id: &str, shards: Vec<RunningShard>) {
        let mut inner = self.inner.lock().expect("heartbeat clock poisoned");
        inner.delivered.insert(worker_id.to_string(), shards);
    }

    /// Whether `worker_id` said in its last heartbeat that it runs `shard`;
    /// `None` when it has not told this leader (not heard yet, or too old to list
    /// its shards).
    pub fn runs(&self, worker_id: &str, shard: &RunningShard) -> Option<bool> {
        let inner = self.inner.lock().expect("heartbeat clock poisoned");
        let listed = inner.running.get(worker_id)?.as_ref()?;
        Some(listed.contains(shard))
    }

    /// Where a shard of `job_id` may still run among `workers` (those not Down):
    /// a worker that reported one in its last heartbeat, or was told to run one
    /// in the answer to it (it may have started it since), or one this leader has
    /// not heard from yet. Empty when every such worker has said it runs none
    /// (a worker too old to list its shards says nothing and holds nothing).
    pub fn stopping(&self, job_id: u64, workers: &[&str]) -> Vec<Stopping> {
        let inner = self.inner.lock().expect("heartbeat clock poisoned");
        let mut out = Vec::new();
        for worker in workers {
            match inner.running.get(*worker) {
                None => out.push(Stopping::Unheard(worker.to_string())),
                Some(None) => {}
                Some(Some(shards)) => {
                    let told = inner.delivered.get(*worker).map_or(&[][..], Vec::as_slice);
                    let mut mine: Vec<RunningShard> = shards
                        .iter()
                        .chain(told)
                        .filter(|s| s.job_id == job_id)
                        .copied()
                        .collect();
                    mine.sort_by_key(|s| (s.attempt, s.rank));
                    mine.dedup();
                    out.extend(
                        mine.into_iter()
                            .map(|s| Stopping::Running(worker.to_string(), s)),
                    );
                }
            }
        }
        out
    }

    /// Starts or stops the clocks as leadership is gained or lost.
    pub fn set_leading(&self, leading: bool) {
        let mut inner = self.inner.lock().expect("heartbeat clock poisoned");
        match (leading, inner.leading_since) {
            (true, None) => {
                inner.leading_since = Some(Instant::now());
                inner.last_seen.clear();
                inner.running.clear();
                inner.delivered.clear();
            }
            (false, Some(_)) => inner.leading_since = None,
            _ => {}
        }
    }

    /// Returns how long `worker_id` has been silent, counting from the start of
    /// this leadership for workers not heard from since.
    pub fn silence(&self, worker_id: &str) -> Option<Duration> {
        let inner = self.inner.lock().expect("heartbeat clock poisoned");
        let since = inner
            .last_seen
            .get(worker_id)
            .copied()
            .or(inner.leading_since)?;
        Some(since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_degrades_in_steps_and_never_recovers_by_itself() {
        let s = HealthSettings {
            suspect_after_ms: 3000,
            down_after_ms: 10000,
        };
        let ms = Duration::from_millis;
        assert_eq!(assess(WorkerState::Alive, ms(2999), &s), None);
        assert_eq!(
            assess(WorkerState::Alive, ms(3000), &s),
            Some(WorkerState::Suspect)
        );
        assert_eq!(assess(WorkerState::Suspect, ms(5000), &s), None);
        assert_eq!(
            assess(WorkerState::Suspect, ms(10000), &s),
            Some(WorkerState::Down)
        );
        assert_eq!(
            assess(WorkerState::Alive, ms(12000), &s),
            Some(WorkerState::Down)
        );
        assert_eq!(assess(WorkerState::Down, ms(1), &s), None);
    }

    #[test]
    fn a_new_leader_counts_silence_from_its_election() {
        let clock = HeartbeatClock::default();
        assert!(clock.silence("w").is_none());
        clock.set_leading(true);
        assert!(clock
            .silence("w")
            .is_some_and(|d| d < Duration::from_secs(1)));
        clock.set_leading(false);
        assert!(clock.silence("w").is_none());
    }

    #[test]
    fn the_shard_lease_ends_two_heartbeats_before_down() {
        let s = HealthSettings {
            suspect_after_ms: 3000,
            down_after_ms: 10000,
        };
        assert_eq!(shard_lease_ms(&s, 1000), 8000);
        // Never below half the Down threshold, whatever the interval.
        assert_eq!(shard_lease_ms(&s, 4000), 5000);
    }

    #[test]
    fn a_gang_waits_for_workers_that_run_its_shards_or_have_not_reported() {
        let clock = HeartbeatClock::default();
        clock.set_leading(true);
        let shard = |job_id, attempt, rank| RunningShard {
            job_id,
            attempt,
            rank,
        };
        clock.beat_running("a", Some(vec![shard(7, 1, 0), shard(8, 1, 0)]));
        clock.beat_running("b", Some(vec![shard(8, 2, 1)]));
        assert_eq!(
            clock.stopping(7, &["a", "b", "c"]),
            vec![
                Stopping::Running("a".into(), shard(7, 1, 0)),
                Stopping::Unheard("c".into())
            ]
        );
        clock.beat_running("a", Some(vec![shard(8, 1, 0)]));
        clock.beat_running("c", Some(Vec::new()));
        assert!(clock.stopping(7, &["a", "b", "c"]).is_empty());
        assert_eq!(clock.runs("a", &shard(8, 1, 0)), Some(true));
        assert_eq!(clock.runs("a", &shard(7, 1, 0)), Some(false));
        // A worker too old to list its shards holds nothing and tells nothing.
        clock.beat_running("old", None);
        assert!(clock.stopping(7, &["old"]).is_empty());
        assert_eq!(clock.runs("old", &shard(7, 1, 0)), None);
        // A new leader has heard from nobody.
        clock.set_leading(false);
        clock.set_leading(true);
        assert_eq!(
            clock.stopping(7, &["a"]),
            vec![Stopping::Unheard("a".into())]
        );
    }

    #[test]
    fn a_shard_told_to_a_worker_holds_its_gang_until_a_heartbeat_lists_it_or_not() {
        // The fault suite's race: the answer to a heartbeat that listed nothing
        // tells the worker to run rank 1 of attempt 3; the attempt fails before
        // the next heartbeat, which would be the first to list the shard.
        let clock = HeartbeatClock::default();
        clock.set_leading(true);
        let told = RunningShard {
            job_id: 2,
            attempt: 3,
            rank: 1,
        };
        clock.beat_running("w", Some(Vec::new()));
        clock.delivered("w", vec![told]);
        assert_eq!(
            clock.stopping(2, &["w"]),
            vec![Stopping::Running("w".into(), told)]
        );
        // The next heartbeat lists it (the attempt is over: nothing is told).
        clock.beat_running("w", Some(vec![told]));
        clock.delivered("w", Vec::new());
        assert_eq!(
            clock.stopping(2, &["w"]),
            vec![Stopping::Running("w".into(), told)]
        );
        // Listed and told at once: one entry.
        clock.delivered("w", vec![told]);
        assert_eq!(clock.stopping(2, &["w"]).len(), 1);
        // It stopped, and nothing more is told.
        clock.beat_running("w", Some(Vec::new()));
        clock.delivered("w", Vec::new());
        assert!(clock.stopping(2, &["w"]).is_empty());
    }
}
