//! The [`Agent`]: makes this worker known to the coordinators and keeps it known.
//!
//! ```text
//!  start ──► register ──(accepted)──► heartbeat each interval ──(cancelled)──► stopped
//!             ▲  │  ▲                       │
//!             │  └──┘ failed: wait 100 ms,  │ other failures: try again next tick
//!             │       doubling to 2 s       │
//!             └──── NOT_FOUND: forgotten ───┘
//! ```
//!
//! The agent is a task that owns its state; others see the registration state
//! through a `watch` (HTTP readiness reads it) and counters through [`Metrics`].
//! Failures are logged at warn when they start or change kind, at debug while they
//! repeat, and at info when they end, so a long outage costs a few lines, not one a
//! second. Nothing asks the agent anything yet, so it has no mailbox; desired
//! state from the coordinators will arrive through it later.

use std::mem::Discriminant;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_common::auth::TokenBook;
use kiln_common::client::ClusterClient;
use kiln_common::Error;
use kiln_proto::v1::{
    HeartbeatRequest, RegisterWorkerRequest, ReplicaTask, Resources, Route, RunningShard,
    ShardTask, WorkerRecord, WorkerState,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::resources::ResourceProbe;
use crate::serving::replicas::ServingTable;
use crate::train::supervisor::ShardLease;

/// First pause between registration attempts.
pub const REGISTER_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest pause between registration attempts.
pub const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Heartbeats between two reads of the data disk's free space.
pub const DISK_REFRESH_EVERY_HEARTBEATS: u64 = 10;
/// Shortest time between heartbeats that callers with unknown tokens ask for, so
/// that a flood of bad tokens costs the coordinators at most five beats a second.
const EARLY_BEAT_GAP: Duration = Duration::from_millis(200);
const _: () = assert!(DISK_REFRESH_EVERY_HEARTBEATS > 0);
/// Shortest heartbeat interval, whoever sets it (a zero interval would spin).
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Longest heartbeat interval, whoever sets it.
pub const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// Whether the coordinators know this worker, as HTTP readiness and metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Not registered yet, or forgotten by the coordinators and registering again.
    Unregistered,
    /// Registered; heartbeats carry this incarnation.
    Registered { incarnation: u64 },
    /// The agent has stopped.
    Stopped,
}

impl Registration {
    /// Returns true while the coordinators know this worker.
    pub fn is_registered(&self) -> bool {
        matches!(self, Registration::Registered { .. })
    }
}

/// Publishes a heartbeat answer's desired state, waking receivers only when it
/// changed.
fn publish<T: PartialEq>(sender: &watch::Sender<Vec<T>>, value: Vec<T>) {
    sender.send_if_modified(|held| {
        let changed = *held != value;
        if changed {
            *held = value;
        }
        changed
    });
}

/// Returns the pause after failed registration attempt number `attempt` (from 0):
/// 100 ms doubling up to 2 s.
pub fn register_backoff(attempt: u32) -> Duration {
    // Capping the shift keeps the product far from overflow; 2^16 steps pass any
    // sensible maximum long before.
    (REGISTER_BACKOFF_INITIAL * (1u32 << attempt.min(16))).min(REGISTER_BACKOFF_MAX)
}

/// Returns the heartbeat interval: the coordinators' when they name one (they know
/// when they would suspect a silent worker), else the configured one, within bounds.
pub fn heartbeat_interval(from_coordinator_ms: u64, configured: Duration) -> Duration {
    let interval = if from_coordinator_ms > 0 {
        Duration::from_millis(from_coordinator_ms)
    } else {
        configured
    };
    interval.clamp(HEARTBEAT_INTERVAL_MIN, HEARTBEAT_INTERVAL_MAX)
}

/// Tracks a run of failures so that each run is logged once, not each failure.
#[derive(Debug, Default)]
struct FailureLog {
    kind: Option<Discriminant<Error>>,
    count: u64,
}

impl FailureLog {
    /// Records a failure; returns true when it starts a run of failures or changes
    /// their kind, which is when it deserves a warning.
    fn failed(&mut self, err: &Error) -> bool {
        self.count += 1;
        let kind = std::mem::discriminant(err);
        let changed = self.kind != Some(kind);
        self.kind = Some(kind);
        changed
    }

    /// Records a success; returns the length of the run of failures it ends.
    fn succeeded(&mut self) -> Option<u64> {
        self.kind = None;
        let count = std::mem::take(&mut self.count);
        (count > 0).then_some(count)
    }
}

/// How a heartbeat loop ended.
enum HeartbeatEnd {
    /// The coordinators no longer know this worker.
    Forgotten,
    Cancelled,
}

/// What the agent needs besides its collaborators.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The record to register; its resources are replaced by fresh ones each time.
    pub record: WorkerRecord,
    /// The interval to heartbeat at unless the coordinators name another.
    pub heartbeat_interval: Duration,
    /// The token records this worker checks callers against; heartbeats refresh it.
    pub tokens: Arc<TokenBook>,
    /// The training shards the coordinators want running here, as each heartbeat
    /// answer lists them.
    pub shards: Arc<watch::Sender<Vec<ShardTask>>>,
    /// The serving replicas the coordinators want here, likewise.
    pub replicas: Arc<watch::Sender<Vec<ReplicaTask>>>,
    /// Every deployment's ready replicas, for the router.
    pub routes: Arc<watch::Sender<Vec<Route>>>,
    /// The replicas here, whose load each heartbeat carries.
    pub serving: Arc<ServingTable>,
    /// The training shards' lease, renewed by each answer.
    pub lease: Arc<ShardLease>,
    /// The training shards running here, which each heartbeat carries.
    pub running_shards: watch::Receiver<Vec<RunningShard>>,
}

/// The registration and heartbeat actor of one worker.
pub struct Agent {
    client: Arc<ClusterClient>,
    record: WorkerRecord,
    resources: Resources,
    configured_interval: Duration,
    tokens: Arc<TokenBook>,
    shards: Arc<watch::Sender<Vec<ShardTask>>>,
    replicas: Arc<watch::Sender<Vec<ReplicaTask>>>,
    routes: Arc<watch::Sender<Vec<Route>>>,
    serving: Arc<ServingTable>,
    lease: Arc<ShardLease>,
    running_shards: watch::Receiver<Vec<RunningShard>>,
    probe: Arc<Mutex<ResourceProbe>>,
    metrics: Arc<Metrics>,
    state: watch::Sender<Registration>,
    shutdown: CancellationToken,
}

/// The handle of a running [`Agent`].
#[derive(Debug)]
pub struct AgentHandle {
    registration: watch::Receiver<Registration>,
    task: JoinHandle<()>,
}

impl AgentHandle {
    /// Returns a receiver of the registration state.
    pub fn registration(&self) -> watch::Receiver<Registration> {
        self.registration.clone()
    }

    /// Waits until the agent has stopped (after its token is cancelled) or
    /// `deadline` passes, then aborts it; returns true when it stopped in time.
    pub async fn join(mut self, deadline: Instant) -> bool {
        match tokio::time::timeout_at(deadline, &mut self.task).await {
            Ok(Ok(())) => true,
            Ok(Err(err)) => {
                tracing::error!(error = %err, "agent task failed");
                true
            }
            Err(_) => {
                self.task.abort();
                false
            }
        }
    }
}

impl Agent {
    /// Starts the agent; it runs until `shutdown` is cancelled.
    pub fn spawn(
        client: Arc<ClusterClient>,
        settings: AgentSettings,
        probe: ResourceProbe,
        resources: Resources,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> AgentHandle {
        let (state, registration) = watch::channel(Registration::Unregistered);
        let span = tracing::info_span!("agent", worker_id = %settings.record.id);
        let agent = Agent {
            client,
            record: settings.record,
            resources,
            configured_interval: settings.heartbeat_interval,
            tokens: settings.tokens,
            shards: settings.shards,
            replicas: settings.replicas,
            routes: settings.routes,
            serving: settings.serving,
            lease: settings.lease,
            running_shards: settings.running_shards,
            probe: Arc::new(Mutex::new(probe)),
            metrics,
            state,
            shutdown,
        };
        let task = tokio::spawn(agent.run().instrument(span));
        AgentHandle { registration, task }
    }

    async fn run(mut self) {
        loop {
            let Some((incarnation, interval)) = self.register().await else {
                break;
            };
            match self.heartbeat(incarnation, interval).await {
                HeartbeatEnd::Forgotten => continue,
                HeartbeatEnd::Cancelled => break,
            }
        }
        self.state.send_replace(Registration::Stopped);
        tracing::info!("agent stopped");
    }

    /// Registers until the coordinators accept; returns the incarnation and the
    /// heartbeat interval, or `None` when cancelled first.
    async fn register(&mut self) -> Option<(u64, Duration)> {
        self.state.send_replace(Registration::Unregistered);
        let mut failures = FailureLog::default();
        let mut attempt = 0u32;
        loop {
            let mut record = self.record.clone();
            record.resources = Some(self.resources.clone());
            let request = RegisterWorkerRequest {
                worker: Some(record),
            };
            let call = self.client.call(|mut client| {
                let request = request.clone();
                async move {
                    client
                        .register_worker(request)
                        .await
                        .map(|r| r.into_inner())
                }
            });
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                result = call => result,
            };
            match result {
                Ok(response) => {
                    let interval = heartbeat_interval(
                        response.heartbeat_interval_ms,
                        self.configured_interval,
                    );
                    tracing::info!(
                        incarnation = response.incarnation,
                        heartbeat_interval_ms = interval.as_millis() as u64,
                        failed_attempts = failures.succeeded().unwrap_or(0),
                        "registered with the coordinators"
                    );
                    self.lease.set_term_ms(response.shard_lease_ms);
                    self.lease.renew();
                    self.state.send_replace(Registration::Registered {
                        incarnation: response.incarnation,
                    });
                    return Some((response.incarnation, interval));
                }
                Err(err) => {
                    let delay = register_backoff(attempt);
                    if failures.failed(&err) {
                        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "register worker failed; retrying");
                    } else {
                        tracing::debug!(error = %err, attempt, "register worker failed again");
                    }
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Heartbeats until the coordinators forget this worker or the agent is cancelled.
    async fn heartbeat(&mut self, incarnation: u64, interval: Duration) -> HeartbeatEnd {
        // The first beat goes at once: it brings the token records.
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failures = FailureLog::default();
        let mut last_state = WorkerState::Unspecified;
        let mut beats_until_disk_refresh = DISK_REFRESH_EVERY_HEARTBEATS;
        let mut last_beat: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return HeartbeatEnd::Cancelled,
                _ = ticker.tick() => {}
                // A caller holds a token the records may be too old for: beat now,
                // but no more often than EARLY_BEAT_GAP.
                _ = self.tokens.refresh_wanted() => {
                    if let Some(wait) = last_beat
                        .map(|t| EARLY_BEAT_GAP.saturating_sub(t.elapsed()))
                        .filter(|w| !w.is_zero())
                    {
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return HeartbeatEnd::Cancelled,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    ticker.reset();
                }
            }
            last_beat = Some(Instant::now());
            let beat = self.tokens.heartbeat_started();
            // Counted in beats, early ones included: at most five a second, so a
            // flood of unknown tokens reads the disk at most every two seconds.
            beats_until_disk_refresh -= 1;
            if beats_until_disk_refresh == 0 {
                beats_until_disk_refresh = DISK_REFRESH_EVERY_HEARTBEATS;
                self.refresh_disk_free().await;
            }
            let request = HeartbeatRequest {
                worker_id: self.record.id.clone(),
                incarnation,
                resources: Some(self.resources.clone()),
                tokens_version: self.tokens.version(),
                replica_loads: self.serving.loads(),
                running_shards: self.running_shards.borrow().clone(),
                lists_running_shards: true,
            };
            let call = self.client.call_with_deadline(interval, |mut client| {
                let request = request.clone();
                async move { client.heartbeat(request).await.map(|r| r.into_inner()) }
            });
            self.metrics.heartbeat_sent();
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return HeartbeatEnd::Cancelled,
                result = call => result,
            };
            match result {
                Ok(response) => {
                    self.lease.renew();
                    if let Some(failed) = failures.succeeded() {
                        tracing::info!(failed, "heartbeats answered again");
                    }
                    let state = response.state();
                    // Only a newer version replaces what is held: a new leader that
                    // has not applied the latest change must not bring back a
                    // revoked token.
                    if response.tokens_version > self.tokens.version() {
                        tracing::debug!(
                            version = response.tokens_version,
                            tokens = response.tokens.len(),
                            "token records refreshed"
                        );
                        self.tokens
                            .replace(response.tokens_version, response.tokens);
                    }
                    self.tokens.heartbeat_answered(beat);
                    publish(&self.shards, response.shards);
                    publish(&self.replicas, response.replicas);
                    publish(&self.routes, response.routes);
                    if state != last_state {
                        tracing::info!(state = state.as_str_name(), "coordinators see this worker");
                        last_state = state;
                    }
                }
                Err(Error::NotFound(message)) => {
                    self.metrics.heartbeat_failed();
                    tracing::warn!(%message, incarnation, "coordinators do not know this worker; registering again");
                    return HeartbeatEnd::Forgotten;
                }
                Err(err) => {
                    self.metrics.heartbeat_failed();
                    if failures.failed(&err) {
                        tracing::warn!(error = %err, "heartbeat failed; retrying each interval");
                    } else {
                        tracing::debug!(error = %err, "heartbeat failed again");
                    }
                }
            }
        }
    }

    /// Reads the data disk's free space on a blocking thread: `statvfs` can stall on
    /// a network filesystem, and the executor must not.
    async fn refresh_disk_free(&mut self) {
        let probe = Arc::clone(&self.probe);
        let read = tokio::task::spawn_blocking(move || {
            // A panic while refreshing leaves nothing half-written worth refusing.
            let mut probe = probe
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            probe.refresh_disk_free()
        });
        match read.await {
            Ok(Some(free)) => {
                self.resources.disk_free_bytes = free;
                self.metrics.set_disk_free_bytes(free);
            }
            Ok(None) => {}
            Err(err) => tracing::debug!(error = %err, "disk refresh task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_process_coordinator::{wait_for, InProcessCoordinator};
    use kiln_common::config::HealthSettings;

    #[test]
    fn backoff_doubles_from_100ms_to_2s() {
        let delays: Vec<u64> = (0..8)
            .map(|a| register_backoff(a).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(register_backoff(40), REGISTER_BACKOFF_MAX);
        assert_eq!(register_backoff(u32::MAX), REGISTER_BACKOFF_MAX);
    }

    #[test]
    fn interval_prefers_the_coordinators_within_bounds() {
        let configured = Duration::from_millis(1000);
        assert_eq!(heartbeat_interval(0, configured), configured);
        assert_eq!(
            heartbeat_interval(250, configured),
            Duration::from_millis(250)
        );
        assert_eq!(heartbeat_interval(1, configured), HEARTBEAT_INTERVAL_MIN);
        assert_eq!(
            heartbeat_interval(u64::MAX, configured),
            HEARTBEAT_INTERVAL_MAX
        );
        assert_eq!(
            heartbeat_interval(0, Duration::ZERO),
            HEARTBEAT_INTERVAL_MIN
        );
    }

    #[test]
    fn failures_warn_once_per_change() {
        let mut log = FailureLog::default();
        assert_eq!(log.succeeded(), None);
        let unavailable = Error::Unavailable("down".into());
        assert!(log.failed(&unavailable), "the first failure warns");
        assert!(!log.failed(&unavailable), "a repeat does not");
        assert!(!log.failed(&Error::Unavailable("other text".into())));
        assert!(log.failed(&Error::NoQuorum("x".into())), "a new kind warns");
        assert_eq!(log.succeeded(), Some(4));
        assert_eq!(log.succeeded(), None);
        assert!(log.failed(&unavailable), "a new run warns again");
    }

    fn spawn_agent(
        coordinator: String,
        shutdown: &CancellationToken,
    ) -> (AgentHandle, Arc<Metrics>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let (probe, resources) = ResourceProbe::discover(dir.path());
        let metrics = Arc::new(Metrics::new(&resources));
        let client =
            Arc::new(ClusterClient::new(vec![coordinator], Default::default()).expect("client"));
        let record = WorkerRecord {
            id: "worker-a".into(),
            ..Default::default()
        };
        let handle = Agent::spawn(
            client,
            AgentSettings {
                record,
                tokens: Arc::default(),
                shards: Arc::new(watch::Sender::new(Vec::new())),
                replicas: Arc::new(watch::Sender::new(Vec::new())),
                routes: Arc::new(watch::Sender::new(Vec::new())),
                serving: Arc::default(),
                lease: Arc::default(),
                running_shards: watch::channel(Vec::new()).1,
                heartbeat_interval: Duration::from_millis(1000),
            },
            probe,
            resources,
            Arc::clone(&metrics),
            shutdown.clone(),
        );
        (handle, metrics)
    }

    /// Waits until `registration` shows `expected`.
    async fn wait_for_registration(
        what: &str,
        registration: &watch::Receiver<Registration>,
        expected: Registration,
    ) {
        wait_for(what, Duration::from_secs(15), || {
            let reached = *registration.borrow() == expected;
            std::future::ready(reached.then_some(()))
        })
        .await;
    }

    #[tokio::test]
    async fn registers_heartbeats_and_registers_again_when_forgotten() {
        let mut coordinator = InProcessCoordinator::start().await;
        let shutdown = CancellationToken::new();
        let (handle, metrics) = spawn_agent(coordinator.grpc_addr().to_string(), &shutdown);
        let registration = handle.registration();

        wait_for_registration(
            "registration",
            &registration,
            Registration::Registered { incarnation: 1 },
        )
        .await;
        let registered = coordinator.worker("worker-a").await.expect("listed");
        assert_eq!(registered.incarnation, 1);
        assert_eq!(registered.state(), WorkerState::Alive);
        assert!(
            registered.resources.is_some(),
            "the record carries resources"
        );

        // Heartbeats keep it alive: past the suspect window (3 s by default) a silent
        // worker would have turned Suspect, and its state would have changed since.
        let suspect_after = Duration::from_millis(HealthSettings::default().suspect_after_ms);
        tokio::time::sleep(suspect_after + Duration::from_millis(500)).await;
        let record = coordinator.worker("worker-a").await.expect("still listed");
        assert_eq!(record.state(), WorkerState::Alive);
        assert_eq!(
            record.state_since_ms, registered.state_since_ms,
            "alive without a break since it registered"
        );
        assert_eq!(record.incarnation, 1);
        assert!(
            metrics.heartbeats_total() >= 2,
            "{}",
            metrics.heartbeats_total()
        );
        assert_eq!(metrics.heartbeat_failures_total(), 0);

        // A coordinator that lost its state answers NOT_FOUND; the worker registers
        // again, as the first registration under its id there.
        coordinator.restart_without_state().await;
        let record = wait_for(
            "registration with the fresh coordinator",
            Duration::from_secs(15),
            || coordinator.worker("worker-a"),
        )
        .await;
        assert_eq!(record.incarnation, 1);
        assert_eq!(record.state(), WorkerState::Alive);
        assert!(record.resources.is_some());
        wait_for_registration(
            "registered again",
            &registration,
            Registration::Registered { incarnation: 1 },
        )
        .await;
        let failures = metrics.heartbeat_failures_total();
        assert!(failures >= 1, "the refused heartbeat counts");

        // Heartbeats flow again: once a second one is sent, the first has been
        // answered, and none failed.
        let sent = metrics.heartbeats_total();
        wait_for(
            "heartbeats to the fresh coordinator",
            Duration::from_secs(10),
            || std::future::ready((metrics.heartbeats_total() >= sent + 2).then_some(())),
        )
        .await;
        assert_eq!(metrics.heartbeat_failures_total(), failures);

        shutdown.cancel();
        assert!(handle.join(Instant::now() + Duration::from_secs(2)).await);
        assert_eq!(*registration.borrow(), Registration::Stopped);
    }

    #[tokio::test]
    async fn cancellation_stops_a_registration_that_cannot_succeed() {
        let nobody = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        let shutdown = CancellationToken::new();
        let (handle, metrics) = spawn_agent(nobody.to_string(), &shutdown);
        let registration = handle.registration();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*registration.borrow(), Registration::Unregistered);
        assert_eq!(metrics.heartbeats_total(), 0);

        // The client's own deadline is 5 s; cancellation must not wait for it.
        shutdown.cancel();
        assert!(
            handle
                .join(Instant::now() + Duration::from_millis(500))
                .await
        );
        assert_eq!(*registration.borrow(), Registration::Stopped);
    }

    #[test]
    fn only_registered_is_ready() {
        assert!(Registration::Registered { incarnation: 1 }.is_registered());
        assert!(!Registration::Unregistered.is_registered());
        assert!(!Registration::Stopped.is_registered());
    }
}
