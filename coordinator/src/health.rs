//! Worker health: heartbeats arrive at the leader; a leader-only loop turns
//! silence into Suspect, then Down, by proposing state changes.
//!
//! Heartbeat times live only in the leader's memory (a new leader starts every
//! clock at its election), while the resulting states are replicated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_common::config::HealthSettings;
use kiln_proto::v1::WorkerState;

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

/// Last heartbeat of each worker, as seen by this coordinator while it leads.
#[derive(Clone, Default)]
pub struct HeartbeatClock {
    inner: Arc<Mutex<ClockInner>>,
}

#[derive(Default)]
struct ClockInner {
    last_seen: HashMap<String, Instant>,
    leading_since: Option<Instant>,
}

impl HeartbeatClock {
    /// Records a heartbeat from `worker_id` now.
    pub fn beat(&self, worker_id: &str) {
        let mut inner = self.inner.lock().expect("heartbeat clock poisoned");
        inner
            .last_seen
            .insert(worker_id.to_string(), Instant::now());
    }

    /// Starts or stops the clocks as leadership is gained or lost.
    pub fn set_leading(&self, leading: bool) {
        let mut inner = self.inner.lock().expect("heartbeat clock poisoned");
        match (leading, inner.leading_since) {
            (true, None) => {
                inner.leading_since = Some(Instant::now());
                inner.last_seen.clear();
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
}
