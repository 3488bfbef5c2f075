//! The autoscaler of serving deployments, on the leader: workers send each
//! replica's in-flight requests with every heartbeat; the leader keeps the recent
//! samples in memory (a new leader starts afresh, which only delays a decision by
//! one window) and decides, for each deployment with `min < max`:
//!
//! ```text
//! desired = ceil(sum over ready primary replicas of mean in-flight / target_in_flight),
//!           clamped to [min, max]
//! ```
//!
//! Canary replicas are left out: `replicas` counts primaries, and the canary
//! set's size follows from it and the canary's percent.
//!
//! A change is made only once the load has asked for it for the whole window in
//! its direction (`up_window_ms`, `down_window_ms`), so a burst does not add
//! replicas that leave a second later. Each decision is a `ScaleDeployment`
//! command, recorded with its reason in the deployment's history.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_common::config::AutoscaleSettings;
use kiln_proto::v1::{DeploymentRecord, ReplicaLoad, ReplicaState};

/// Most samples kept per replica.
const MAX_SAMPLES: usize = 256;
/// Most replicas tracked (a bound against a flood of made-up loads).
const MAX_REPLICAS: usize = 65_536;

#[derive(Default)]
struct Inner {
    /// (deployment, replica) → (when, in-flight) samples, oldest first.
    samples: HashMap<(String, u64), VecDeque<(Instant, u32)>>,
    /// deployment → (desired, since when the load has asked for a change in
    /// that direction).
    pending: HashMap<String, (u32, Instant)>,
}

/// The leader's autoscaler state; cheap to clone.
#[derive(Clone)]
pub struct Autoscaler {
    settings: AutoscaleSettings,
    inner: Arc<Mutex<Inner>>,
}

impl Autoscaler {
    pub fn new(settings: AutoscaleSettings) -> Autoscaler {
        Autoscaler {
            settings,
            inner: Arc::default(),
        }
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.settings.sample_window_ms)
    }

    /// Records the loads one worker reported at `now`.
    pub fn record(&self, loads: &[ReplicaLoad], now: Instant) {
        let window = self.window();
        let mut inner = self.inner.lock().expect("autoscaler lock");
        for load in loads {
            let key = (load.deployment.clone(), load.replica_id);
            if !inner.samples.contains_key(&key) && inner.samples.len() >= MAX_REPLICAS {
                continue;
            }
            let samples = inner.samples.entry(key).or_default();
            samples.push_back((now, load.in_flight));
            while samples.len() > MAX_SAMPLES
                || samples
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > window)
            {
                samples.pop_front();
            }
        }
    }

    /// Forgets replicas that have sent nothing for a window (gone or retired).
    pub fn prune(&self, now: Instant) {
        let window = self.window();
        let mut inner = self.inner.lock().expect("autoscaler lock");
        inner.samples.retain(|_, samples| {
            samples
                .back()
                .is_some_and(|(t, _)| now.duration_since(*t) <= window)
        });
    }

    /// The mean in-flight requests of `deployment`'s ready primary replicas
    /// over the window, summed, and how many replicas reported.
    fn load(&self, d: &DeploymentRecord, now: Instant) -> (f64, usize) {
        let window = self.window();
        let inner = self.inner.lock().expect("autoscaler lock");
        let mut total = 0.0;
        let mut reporting = 0;
        for r in &d.replica_set {
            if r.canary || r.state != ReplicaState::ReplicaReady as i32 {
                continue;
            }
            let Some(samples) = inner.samples.get(&(d.name.clone(), r.id)) else {
                continue;
            };
            let recent: Vec<u32> = samples
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= window)
                .map(|(_, v)| *v)
                .collect();
            if recent.is_empty() {
                continue;
            }
            total += recent.iter().map(|v| f64::from(*v)).sum::<f64>() / recent.len() as f64;
            reporting += 1;
        }
        (total, reporting)
    }

    /// Returns the replicas `d` should have and why, when it is time to change.
    pub fn decide(&self, d: &DeploymentRecord, now: Instant) -> Option<(u32, String)> {
        if d.min_replicas >= d.max_replicas {
            return None;
        }
        let (load, reporting) = self.load(d, now);
        if reporting == 0 {
            return None;
        }
        let target = f64::from(d.target_in_flight.max(1));
        let desired = ((load / target).ceil() as u32).clamp(d.min_replicas, d.max_replicas);
        let mut inner = self.inner.lock().expect("autoscaler lock");
        if desired == d.replicas {
            inner.pending.remove(&d.name);
            return None;
        }
        let up = desired > d.replicas;
        let since = match inner.pending.get(&d.name) {
            // Still the same direction: the window keeps running.
            Some((previous, since)) if (*previous > d.replicas) == up => *since,
            _ => now,
        };
        inner.pending.insert(d.name.clone(), (desired, since));
        let window = Duration::from_millis(if up {
            self.settings.up_window_ms
        } else {
            self.settings.down_window_ms
        });
        if now.duration_since(since) < window {
            return None;
        }
        inner.pending.remove(&d.name);
        Some((
            desired,
            format!(
                "mean in-flight {load:.1} over {reporting} ready primary replica(s), target {} per replica, for {} s",
                d.target_in_flight,
                window.as_secs()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::ReplicaRecord;

    fn deployment(replicas: u32) -> DeploymentRecord {
        DeploymentRecord {
            name: "d".into(),
            replicas,
            min_replicas: 1,
            max_replicas: 4,
            target_in_flight: 4,
            replica_set: (1..=replicas as u64)
                .map(|id| ReplicaRecord {
                    id,
                    state: ReplicaState::ReplicaReady as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn loads(d: &DeploymentRecord, in_flight: u32) -> Vec<ReplicaLoad> {
        d.replica_set
            .iter()
            .map(|r| ReplicaLoad {
                deployment: d.name.clone(),
                replica_id: r.id,
                in_flight,
                requests: 0,
            })
            .collect()
    }

    #[test]
    fn scales_up_after_the_up_window_and_down_after_the_down_window() {
        let scaler = Autoscaler::new(AutoscaleSettings {
            sample_window_ms: 2_000,
            up_window_ms: 1_000,
            down_window_ms: 5_000,
        });
        let t0 = Instant::now();
        let d = deployment(1);
        scaler.record(&loads(&d, 10), t0);
        assert_eq!(scaler.decide(&d, t0), None, "the up window has not passed");
        let t1 = t0 + Duration::from_millis(1_100);
        scaler.record(&loads(&d, 10), t1);
        let (replicas, reason) = scaler.decide(&d, t1).expect("scale up");
        assert_eq!(replicas, 3, "10 in flight at 4 per replica: 3");
        assert!(reason.contains("target 4"), "{reason}");

        let d = deployment(3);
        let t2 = t1 + Duration::from_secs(3);
        scaler.record(&loads(&d, 0), t2);
        assert_eq!(scaler.decide(&d, t2), None);
        let t3 = t2 + Duration::from_secs(4);
        scaler.record(&loads(&d, 0), t3);
        assert_eq!(scaler.decide(&d, t3), None, "4 s of the 5 s down window");
        let t4 = t2 + Duration::from_millis(5_100);
        scaler.record(&loads(&d, 0), t4);
        assert_eq!(scaler.decide(&d, t4).map(|(n, _)| n), Some(1));
    }

    #[test]
    fn a_burst_that_ends_within_the_window_changes_nothing() {
        let scaler = Autoscaler::new(AutoscaleSettings {
            sample_window_ms: 500,
            up_window_ms: 1_000,
            down_window_ms: 1_000,
        });
        let d = deployment(1);
        let t0 = Instant::now();
        scaler.record(&loads(&d, 20), t0);
        assert_eq!(scaler.decide(&d, t0), None);
        let t1 = t0 + Duration::from_millis(600);
        scaler.record(&loads(&d, 1), t1);
        assert_eq!(scaler.decide(&d, t1), None, "back to what it has");
        let t2 = t0 + Duration::from_millis(1_200);
        scaler.record(&loads(&d, 1), t2);
        assert_eq!(scaler.decide(&d, t2), None);
    }

    #[test]
    fn a_busy_canary_does_not_scale_the_primaries() {
        let scaler = Autoscaler::new(AutoscaleSettings {
            sample_window_ms: 2_000,
            up_window_ms: 1_000,
            down_window_ms: 1_000,
        });
        // Two primaries at 4 in flight each (8 at a target of 4: two replicas
        // are what they need) beside a canary at 8 in flight.
        let mut d = deployment(2);
        d.replica_set.push(ReplicaRecord {
            id: 3,
            canary: true,
            state: ReplicaState::ReplicaReady as i32,
            ..Default::default()
        });
        let mut canary_load = loads(&d, 4);
        canary_load[2].in_flight = 8;
        let t0 = Instant::now();
        scaler.record(&canary_load, t0);
        assert_eq!(scaler.decide(&d, t0), None);
        let t1 = t0 + Duration::from_millis(1_100);
        scaler.record(&canary_load, t1);
        assert_eq!(
            scaler.decide(&d, t1),
            None,
            "the primaries carry 8 in flight at a target of 4 each: 2 is enough"
        );
    }
}
