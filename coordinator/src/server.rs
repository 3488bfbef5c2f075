//! Starts a coordinator: storage, Raft node, transport, APIs and the leader-only
//! loops, and stops them in order.
//!
//! ```text
//!  open RocksStore ─► bootstrap (new cluster) ─► bind gRPC + HTTP
//!    ─► RaftNode thread + ticker ─► serve ─► join (new member) ─► health loop
//!  shutdown: stop serving ─► stop the Raft thread ─► done
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kiln_common::client::{ClientOptions, ClusterClient};
use kiln_common::clock::now_ms;
use kiln_common::config::CoordinatorConfig;
use kiln_common::tls::TlsMaterial;
use kiln_proto::v1::coordinator_server::CoordinatorServer;
use kiln_proto::v1::{
    command, AddMemberRequest, Command, MemberRecord, SetWorkerState, WorkerState,
};
use raft::eraftpb::{ConfState, SnapshotMetadata};
use tokio_util::sync::CancellationToken;

use crate::api::grpc::Api;
use crate::health::{assess, HeartbeatClock};
use crate::raft::node::{NodeMsg, RaftNode};
use crate::raft::storage::{RaftStore, RocksStore, StoreError};
use crate::raft::transport::Transport;
use crate::state::keys;

/// Largest gRPC message accepted (Raft batches, snapshot chunks).
const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;
/// Longest a gRPC call may run on the server (a snapshot stream included).
const GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the leader checks worker heartbeats.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// How long a new member keeps asking to be admitted.
const JOIN_DEADLINE: Duration = Duration::from_secs(120);
/// Time the Raft thread gets to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Writes the initial state of a new cluster: every listed voter, at index 1 of
/// term 1, identical on every node so that they agree without talking.
fn bootstrap(store: &mut RocksStore, config: &CoordinatorConfig) -> Result<(), StoreError> {
    let mut peers = config.peers.clone();
    if peers.is_empty() {
        peers.insert(config.id, config.advertise.clone());
    }
    let mut meta = SnapshotMetadata {
        index: 1,
        term: 1,
        ..Default::default()
    };
    let cs = ConfState {
        voters: peers.keys().copied().collect(),
        ..Default::default()
    };
    meta.set_conf_state(cs);
    let mut pairs = peers.iter().map(|(id, addr)| {
        let record = MemberRecord {
            id: *id,
            addr: addr.clone(),
            http_addr: String::new(),
        };
        Ok((keys::member(*id), prost::Message::encode_to_vec(&record)))
    });
    store.install_snapshot(&meta, &mut pairs)?;
    tracing::info!(voters = ?peers.keys().collect::<Vec<_>>(), "bootstrapped a new cluster");
    Ok(())
}

/// The HTTP address others reach this coordinator at: `--http` itself, or, when
/// it listens on every interface (0.0.0.0, [::]), the host of `--advertise` with
/// the HTTP port, so that links and clients get an address they can dial.
fn advertised_http(config: &CoordinatorConfig) -> String {
    if !config.http.ip().is_unspecified() {
        return config.http.to_string();
    }
    match config.advertise.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{}", config.http.port()),
        None => config.http.to_string(),
    }
}

/// Runs a coordinator until `shutdown` is cancelled.
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let span = tracing::info_span!("coordinator", node_id = config.id);
    let _enter = span.enter();
    let raft_dir = config.data_dir.join("raft");
    let mut store = RocksStore::open(&raft_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    if store.is_fresh() {
        if config.join.is_none() {
            bootstrap(&mut store, &config).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    } else if !config.peers.is_empty() {
        tracing::info!("data dir holds a cluster already; --peers is ignored");
    }
    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind coordinator grpc {}", config.listen))?;
    let http_listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("bind coordinator http {}", config.http))?;
    let tls = match &config.tls {
        Some(files) => Some(TlsMaterial::node(&files.ca, &files.cert, &files.key)?),
        None => {
            tracing::warn!("running WITHOUT TLS (--insecure): any process that reaches these ports is trusted as a cluster node");
            None
        }
    };
    let snapshot_dir = store.checkpoint_dir();
    let transport = Transport::new(
        config.id,
        config.advertise.clone(),
        snapshot_dir.clone(),
        tls.clone(),
    );
    let reader = crate::state::reader::StateReader::new(store.db());
    let (node, thread) = RaftNode::start(config.id, store, config.raft.clone(), transport.clone())?;
    transport.attach(node.clone());

    let tasks = CancellationToken::new();
    let ticker = {
        let tx = node.sender();
        let token = tasks.clone();
        let tick = Duration::from_millis(config.raft.tick_ms);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = interval.tick() => {
                        if tx.send(NodeMsg::Tick).await.is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };

    let peers = Arc::new(ClusterClient::new(
        vec![config.advertise.clone()],
        ClientOptions {
            tls: tls.clone(),
            ..ClientOptions::default()
        },
    )?);
    // Three heartbeats fit in the suspect window, at most one a second.
    let heartbeat_interval_ms = (config.health.suspect_after_ms / 3).clamp(10, 1000);
    let api = Api {
        node: node.clone(),
        reader,
        transport,
        heartbeats: HeartbeatClock::default(),
        autoscaler: crate::autoscaler::Autoscaler::new(config.autoscale.clone()),
        telemetry: crate::monitor::TelemetryStore::new(config.drift.window_ms),
        drift: config.drift.clone(),
        canary: config.canary.clone(),
        notifier: crate::webhook::Notifier::default(),
        peers,
        http_addr: advertised_http(&config),
        advertise: config.advertise.clone(),
        snapshot_dir,
        tls_enabled: tls.is_some(),
        denials: Arc::new(tokio::sync::Semaphore::new(
            crate::api::grpc::MAX_DENIALS_IN_FLIGHT,
        )),
        limiter: Arc::new(crate::auth::RateLimiter::new(
            config.limits.token_writes_per_sec,
            config.limits.token_write_burst,
        )),
        heartbeat_interval_ms,
        shard_lease_ms: crate::health::shard_lease_ms(&config.health, heartbeat_interval_ms),
        preemption: config.scheduler.preemption,
    };

    let grpc = {
        let token = tasks.clone();
        let service = CoordinatorServer::new(api.clone())
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let mut builder = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .timeout(GRPC_REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(tls) = &tls {
            builder = builder
                .tls_config(tls.server_config()?)
                .context("configure coordinator grpc tls")?;
        }
        tokio::spawn(async move {
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                    token.cancelled_owned(),
                )
                .await
        })
    };
    let http = {
        let token = tasks.clone();
        let router = crate::api::http::router(api.clone());
        let https = kiln_common::https::acceptor(tls.as_ref()).context("coordinator https")?;
        tokio::spawn(async move {
            kiln_common::https::serve(http_listener, router, https, token.cancelled_owned()).await
        })
    };
    let health = tokio::spawn(health_loop(
        api.clone(),
        config.health.clone(),
        tasks.clone(),
    ));
    let repair = tokio::spawn(repair_loop(api.clone(), tasks.clone()));
    let scheduling = tokio::spawn(schedule_loop(api.clone(), tasks.clone()));
    let drift = tokio::spawn(drift_loop(api.clone(), tasks.clone()));
    if let Some(join) = config.join.clone() {
        let member = MemberRecord {
            id: config.id,
            addr: config.advertise.clone(),
            http_addr: advertised_http(&config),
        };
        tokio::spawn(join_cluster(join, member, tls.clone(), tasks.clone()));
    }
    tracing::info!(grpc = %config.listen, http = %config.http, "coordinator serving");

    tokio::select! {
        _ = shutdown.cancelled() => tracing::info!("shutting down"),
        r = grpc => tracing::error!(result = ?r, "grpc server ended"),
    }
    tasks.cancel();
    let _ = tokio::time::timeout(STOP_DEADLINE, async {
        let _ = http.await;
        let _ = health.await;
        let _ = repair.await;
        let _ = scheduling.await;
        let _ = drift.await;
        let _ = ticker.await;
    })
    .await;
    let _ = node.sender().send(NodeMsg::Shutdown).await;
    drop(node);
    drop(api);
    let joined = tokio::task::spawn_blocking(move || thread.join());
    if tokio::time::timeout(STOP_DEADLINE, joined).await.is_err() {
        tracing::warn!("raft thread did not stop in time");
    }
    Ok(())
}

/// Asks the cluster at `join` to admit this node as a learner, until it succeeds.
async fn join_cluster(
    join: String,
    member: MemberRecord,
    tls: Option<TlsMaterial>,
    token: CancellationToken,
) {
    let options = ClientOptions {
        tls,
        ..ClientOptions::default()
    };
    let client = match ClusterClient::new(vec![join.clone()], options) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "join cluster");
            return;
        }
    };
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(200);
    while started.elapsed() < JOIN_DEADLINE && !token.is_cancelled() {
        let req = AddMemberRequest {
            member: Some(member.clone()),
        };
        let result = client
            .call(|mut c| {
                let req = req.clone();
                async move { c.add_member(req).await.map(|r| r.into_inner()) }
            })
            .await;
        match result {
            Ok(resp) => {
                tracing::info!(
                    leader = resp.leader_id,
                    "admitted to the cluster as a learner"
                );
                return;
            }
            Err(e) => tracing::warn!(error = %e, via = %join, "join cluster; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
    tracing::error!(via = %join, "could not join the cluster within {}s", JOIN_DEADLINE.as_secs());
}

/// Time between two repair rounds on the leader.
const REPAIR_INTERVAL: Duration = Duration::from_secs(2);

/// On the leader, copies chunks with too few live replicas back to their count,
/// a bounded number each round (see [`Api::repair_round`]). A round walks every
/// chunk record, so once one finds nothing to do the loop waits until the workers'
/// states or the count of short-making changes move ([`Api::repair_signature`]).
async fn repair_loop(api: Api, token: CancellationToken) {
    let mut interval = tokio::time::interval(REPAIR_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut settled = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = interval.tick() => {}
        }
        if !api.node.view().leads_applied() {
            settled = None;
            continue;
        }
        let signature = match api.repair_signature() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "read the repair signature");
                continue;
            }
        };
        if settled.as_ref() == Some(&signature) {
            continue;
        }
        let round = tokio::select! {
            _ = token.cancelled() => return,
            round = api.repair_round() => round,
        };
        settled = match round {
            Ok(0) => Some(signature),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "chunk repair round");
                None
            }
        };
    }
}

/// Time between two scheduling rounds on the leader.
const SCHEDULE_INTERVAL: Duration = Duration::from_millis(500);

/// On the leader, places queued training gangs and fails attempts that lost a
/// worker (see [`Api::schedule_round`]), then places, replaces and retires
/// serving replicas (see [`Api::replica_round`]).
async fn schedule_loop(api: Api, token: CancellationToken) {
    leader_loop(
        api,
        token,
        SCHEDULE_INTERVAL,
        "scheduling round",
        |api, now_ms| async move {
            let free = api.schedule_round(now_ms).await?;
            api.replica_round(now_ms, free).await
        },
    )
    .await;
}

/// Time between two drift rounds on the leader.
const DRIFT_INTERVAL: Duration = Duration::from_secs(1);

/// On the leader, judges the drift windows that have closed (see
/// [`Api::drift_round`]), records the serving windows (see [`Api::serving_round`])
/// and follows retraining jobs to their canary and its verdict (see
/// [`Api::retrain_round`]); a coordinator that is not the leader keeps no windows.
async fn drift_loop(api: Api, token: CancellationToken) {
    leader_loop(
        api,
        token,
        DRIFT_INTERVAL,
        "drift round",
        |api, now_ms| async move {
            api.drift_round(now_ms).await?;
            api.serving_round(now_ms).await?;
            api.retrain_round(now_ms).await
        },
    )
    .await;
}

/// Runs `round` every `every` while this coordinator leads, until `token` is
/// cancelled (a round in progress is abandoned then); a round's error is logged
/// as `what`. On a tick where it does not lead, it drops the leader-only memory
/// that would be stale by the time it leads again (the drift windows).
async fn leader_loop<F, Fut, T, E>(
    api: Api,
    token: CancellationToken,
    every: Duration,
    what: &'static str,
    mut round: F,
) where
    F: FnMut(Api, u64) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = interval.tick() => {}
        }
        if !api.node.view().is_leader() {
            api.telemetry.clear();
            continue;
        }
        // A new leader decides only from a state that holds its predecessors'
        // writes.
        if !api.node.view().leads_applied() {
            continue;
        }
        let now_ms = kiln_common::clock::now_ms();
        let result = tokio::select! {
            _ = token.cancelled() => return,
            result = round(api.clone(), now_ms) => result,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "{what}");
        }
    }
}

/// On the leader, turns worker silence into Suspect and Down.
async fn health_loop(
    api: Api,
    settings: kiln_common::config::HealthSettings,
    token: CancellationToken,
) {
    let mut interval = tokio::time::interval(HEALTH_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = interval.tick() => {}
        }
        // Silence is counted from when this leader could first hear heartbeats
        // (it answers none before it has applied its term's first entry).
        let leading = api.node.view().leads_applied();
        api.heartbeats.set_leading(leading);
        if !leading {
            continue;
        }
        let workers = match api.reader.workers() {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "read workers");
                continue;
            }
        };
        for w in workers {
            let state = WorkerState::try_from(w.state).unwrap_or(WorkerState::Unspecified);
            let Some(silence) = api.heartbeats.silence(&w.id) else {
                continue;
            };
            let Some(target) = assess(state, silence, &settings) else {
                continue;
            };
            let cmd = Command {
                proposed_at_ms: now_ms(),
                audit: None,
                kind: Some(command::Kind::SetWorkerState(SetWorkerState {
                    worker_id: w.id.clone(),
                    state: target as i32,
                })),
            };
            match api.node.propose(&cmd).await {
                Ok(_) => {
                    tracing::info!(worker = %w.id, state = ?target, silence_ms = silence.as_millis() as u64, "worker health changed")
                }
                Err(e) => tracing::warn!(worker = %w.id, error = %e, "record worker health"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::config::CoordinatorOverrides;

    fn config(http: &str, advertise: &str) -> CoordinatorConfig {
        CoordinatorConfig::load(
            None,
            CoordinatorOverrides {
                http: Some(http.into()),
                advertise: Some(advertise.into()),
                insecure: true,
                ..CoordinatorOverrides::default()
            },
        )
        .expect("a valid config")
    }

    #[test]
    fn a_coordinator_on_every_interface_advertises_its_hosts_http_port() {
        assert_eq!(
            advertised_http(&config("0.0.0.0:7080", "coordinator-2:7070")),
            "coordinator-2:7080"
        );
        assert_eq!(
            advertised_http(&config("[::]:9080", "[fd00::2]:7070")),
            "[fd00::2]:9080"
        );
        assert_eq!(
            advertised_http(&config("10.0.0.5:7080", "host5:7070")),
            "10.0.0.5:7080"
        );
    }
}
