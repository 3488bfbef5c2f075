//! Starts a coordinator: storage, Raft node, transport, APIs and the leader-only
//! loops, and stops them in order.
//!
//! ```text
//!  open RocksStore ─► bootstrap (new cluster) ─► bind gRPC + HTTP
//!    ─► RaftNode thread + ticker ─► serve ─► join (new member) ─► health loop
//!  shutdown: stop serving ─► stop the Raft thread ─► done
//! ```

use std::collections::BTreeMap;
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
/// Time a coordinator with an empty data dir gives each peer to answer.
const PEER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the Raft thread gets to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The initial voters of a new cluster: `peers`, or this node alone.
fn initial_voters(config: &CoordinatorConfig) -> BTreeMap<u64, String> {
    let mut peers = config.peers.clone();
    if peers.is_empty() {
        peers.insert(config.id, config.advertise.clone());
    }
    peers
}

/// The id a new cluster gets: a digest of its initial voters and the cluster
/// token, the same on every voter that bootstraps it, never 0.
fn new_cluster_id(voters: &BTreeMap<u64, String>, token: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"kiln cluster\0");
    hasher.update(token.as_bytes());
    for (id, addr) in voters {
        hasher.update(format!("\0{id}={addr}").as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_be_bytes(first).max(1)
}

/// Writes the initial state of a new cluster: every listed voter and the cluster's
/// id, at index 1 of term 1, identical on every node so that they agree without
/// talking.
fn bootstrap(store: &mut RocksStore, config: &CoordinatorConfig) -> Result<(), StoreError> {
    let peers = initial_voters(config);
    let cluster_id = new_cluster_id(&peers, &config.cluster_token);
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
    let pairs = peers.iter().map(|(id, addr)| {
        let record = MemberRecord {
            id: *id,
            addr: addr.clone(),
            http_addr: String::new(),
        };
        Ok((keys::member(*id), prost::Message::encode_to_vec(&record)))
    });
    let mut pairs = pairs.chain(std::iter::once(Ok((
        keys::CLUSTER_ID.to_vec(),
        cluster_id.to_be_bytes().to_vec(),
    ))));
    store.install_snapshot(&meta, None, &mut pairs)?;
    tracing::info!(
        voters = ?peers.keys().collect::<Vec<_>>(),
        cluster_id = %format!("{cluster_id:016x}"),
        "bootstrapped a new cluster"
    );
    Ok(())
}

/// What a peer listed in `peers` said when this node, with an empty data dir,
/// asked it how it stands.
struct PeerAnswer {
    id: u64,
    addr: String,
    cluster_id: u64,
    commit_index: u64,
    voters: Vec<u64>,
}

/// Asks every other initial voter, or the member a joining node joins through,
/// for its status at once, each for at most [`PEER_PROBE_TIMEOUT`]; returns the
/// answers (a peer that is not up yet, as on a cluster's first start, gives none).
async fn ask_peers(config: &CoordinatorConfig, tls: Option<&TlsMaterial>) -> Vec<PeerAnswer> {
    let targets: Vec<String> = match &config.join {
        Some(join) => vec![join.clone()],
        None => config
            .peers
            .iter()
            .filter(|(&id, _)| id != config.id)
            .map(|(_, addr)| addr.clone())
            .collect(),
    };
    // The same client the coordinator dials its peers with, bounded to the probe.
    let options = ClientOptions {
        tls: tls.cloned(),
        connect_timeout: PEER_PROBE_TIMEOUT,
        attempt_timeout: PEER_PROBE_TIMEOUT,
        ..ClientOptions::default()
    };
    let Ok(client) = ClusterClient::new(targets.clone(), options) else {
        return Vec::new();
    };
    let client = Arc::new(client);
    let mut asks = tokio::task::JoinSet::new();
    for addr in targets {
        let client = Arc::clone(&client);
        asks.spawn(async move {
            let mut coordinator = client.client_for(&addr).ok()?;
            let asked = coordinator.node_status(kiln_proto::v1::NodeStatusRequest {});
            let status = tokio::time::timeout(PEER_PROBE_TIMEOUT, asked)
                .await
                .ok()?
                .ok()?
                .into_inner();
            Some(PeerAnswer {
                id: status.id,
                addr,
                cluster_id: status.cluster_id,
                commit_index: status.commit_index,
                voters: status.voters,
            })
        });
    }
    let mut answers = Vec::new();
    while let Some(joined) = asks.join_next().await {
        if let Ok(Some(answer)) = joined {
            answers.push(answer);
        }
    }
    answers.sort_by_key(|a| a.id);
    answers
}

/// Decides what a coordinator with an empty data dir does, from its flags and
/// what its peers answered: bootstraps a new cluster (`Ok(true)`), waits to be
/// sent a snapshot as a joining learner (`Ok(false)`), or refuses to start.
fn plan_empty_dir(config: &CoordinatorConfig, answers: &[PeerAnswer]) -> anyhow::Result<bool> {
    let id = config.id;
    let dir = config.data_dir.display();
    if config.join.is_some() {
        // A learner that lost its data may ask again; a voter may not.
        if let Some(member) = answers.iter().find(|a| a.voters.contains(&id)) {
            anyhow::bail!(
                "coordinator {id}: the data dir {dir} is empty, but coordinator {} at {} counts \
                 coordinator {id} among its voters {:?}. A voter whose data was lost cannot rejoin \
                 as itself (it would have no log and no memory of its vote): remove it with `kiln \
                 admin remove-coordinator {id}`, then join with a new id",
                member.id,
                member.addr,
                member.voters
            );
        }
        return Ok(false);
    }
    if config.bootstrap {
        let mine = new_cluster_id(&initial_voters(config), &config.cluster_token);
        if let Some(other) = answers
            .iter()
            .find(|a| a.cluster_id != 0 && a.cluster_id != mine)
        {
            anyhow::bail!(
                "coordinator {id} will not bootstrap: coordinator {} at {} serves another cluster \
                 ({:016x}; these peers and this cluster token make {mine:016x}). Check --peers \
                 and --cluster-token",
                other.id,
                other.addr,
                other.cluster_id
            );
        }
        // `--bootstrap-only` runs before any coordinator of a new cluster serves:
        // a peer that has committed past the bootstrap entry serves a running
        // cluster, so this dir was lost, not new. (`--bootstrap` starts with its
        // peers and may start late, after they elected a leader.)
        if config.bootstrap_only {
            if let Some(running) = answers.iter().find(|a| a.commit_index > 1) {
                anyhow::bail!(
                    "coordinator {id} will not bootstrap: coordinator {} at {} serves a running \
                     cluster ({:016x}, commit index {}). Run --bootstrap-only on every initial \
                     voter before starting any; a coordinator whose data was lost cannot rejoin as \
                     itself: remove it with `kiln admin remove-coordinator {id}`, then add this \
                     machine with a new id and `join` (docs/operations.md, \"Adding and removing \
                     coordinators\")",
                    running.id,
                    running.addr,
                    running.cluster_id,
                    running.commit_index
                );
            }
        }
        return Ok(true);
    }
    match answers.first() {
        Some(peer) => anyhow::bail!(
            "coordinator {id}: the data dir {dir} is empty, but coordinator {} at {} serves a \
             cluster ({:016x}, voters {:?}). A coordinator whose data was lost cannot rejoin as \
             itself (it would have no log and no memory of its vote): remove it with `kiln admin \
             remove-coordinator {id}`, then start this machine with a new id, `join = \"{}\"` and \
             an empty data dir (docs/operations.md, \"Adding and removing coordinators\")",
            peer.id,
            peer.addr,
            peer.cluster_id,
            peer.voters,
            peer.addr
        ),
        None => anyhow::bail!(
            "coordinator {id}: the data dir {dir} holds no cluster and no peer answered. To make a \
             new cluster, give each initial voter --bootstrap on its first start only (kiln local \
             up and the compose cluster do; a systemd install runs `kiln coordinator --config F \
             --bootstrap-only` once); to enter a running cluster, give it --join ADDR"
        ),
    }
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
    let tls = match &config.tls {
        Some(files) => Some(TlsMaterial::node(&files.ca, &files.cert, &files.key)?),
        None => {
            tracing::warn!("running WITHOUT TLS (--insecure): any process that reaches these ports is trusted as a cluster node");
            None
        }
    };
    let raft_dir = config.data_dir.join("raft");
    let made = RocksStore::exists(&raft_dir);
    if config.bootstrap_only && made {
        // Never opened: a coordinator that runs on this dir holds its lock.
        tracing::info!(dir = %raft_dir.display(), "the data dir holds a store already; --bootstrap-only does nothing");
        return Ok(());
    }
    let mut store = RocksStore::open(&raft_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    // A joining node knows its cluster's id from the member it joins through, so
    // it never takes one from a stray node of another cluster.
    let mut joined_cluster_id = 0;
    if store.is_fresh() {
        let answers = ask_peers(&config, tls.as_ref()).await;
        if config.join.is_some() {
            joined_cluster_id = answers.first().map_or(0, |a| a.cluster_id);
        }
        match plan_empty_dir(&config, &answers) {
            Ok(true) => bootstrap(&mut store, &config).map_err(|e| anyhow::anyhow!("{e}"))?,
            Ok(false) => {}
            Err(refused) => {
                // A refusal leaves the dir as it was.
                drop(store);
                if !made {
                    let _ = std::fs::remove_dir_all(&raft_dir);
                }
                return Err(refused);
            }
        }
    } else if config.bootstrap || !config.peers.is_empty() {
        tracing::info!("data dir holds a cluster already; --peers and --bootstrap are ignored");
    }
    if config.bootstrap_only {
        tracing::info!(dir = %config.data_dir.display(), "bootstrapped; --bootstrap-only stops here");
        return Ok(());
    }
    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind coordinator grpc {}", config.listen))?;
    let http_listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("bind coordinator http {}", config.http))?;
    let snapshot_dir = store.checkpoint_dir();
    let transport = Transport::new(
        config.id,
        config.advertise.clone(),
        snapshot_dir.clone(),
        tls.clone(),
    );
    let reader = crate::state::reader::StateReader::new(store.db());
    let stored_cluster_id = reader.cluster_id().map_err(|e| anyhow::anyhow!("{e}"))?;
    transport.set_cluster_id(if stored_cluster_id != 0 {
        stored_cluster_id
    } else {
        joined_cluster_id
    });
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

    // The Raft thread ends only when told to; one that ends before (a panic, a
    // storage error) leaves nothing to serve, so the process stops with its reason
    // and a non-zero exit instead of keeping its ports open.
    let mut raft_thread = tokio::task::spawn_blocking(move || thread.join());
    tokio::select! {
        _ = shutdown.cancelled() => tracing::info!("shutting down"),
        r = grpc => tracing::error!(result = ?r, "grpc server ended"),
        ended = &mut raft_thread => {
            let reason = match ended {
                Ok(Ok(())) => "it returned".to_string(),
                Ok(Err(panic)) => format!("panicked: {}", kiln_common::panic_message(panic.as_ref())),
                Err(e) => format!("its join task failed: {e}"),
            };
            tracing::error!(reason, "the raft thread stopped; stopping the coordinator");
            tasks.cancel();
            anyhow::bail!("the raft thread stopped: {reason}");
        }
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
    if tokio::time::timeout(STOP_DEADLINE, raft_thread)
        .await
        .is_err()
    {
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

    /// A config of coordinator 1 of three, with the given start flags.
    fn member(bootstrap: bool, bootstrap_only: bool, join: Option<&str>) -> CoordinatorConfig {
        CoordinatorConfig::load(
            None,
            CoordinatorOverrides {
                peers: join
                    .is_none()
                    .then(|| "1=h1:7070,2=h2:7070,3=h3:7070".to_string()),
                join: join.map(str::to_string),
                cluster_token: Some("t".into()),
                bootstrap,
                bootstrap_only,
                insecure: true,
                ..CoordinatorOverrides::default()
            },
        )
        .expect("a valid config")
    }

    fn answer(id: u64, cluster_id: u64, commit_index: u64) -> PeerAnswer {
        PeerAnswer {
            id,
            addr: format!("h{id}:7070"),
            cluster_id,
            commit_index,
            voters: vec![1, 2, 3],
        }
    }

    fn refusal(config: &CoordinatorConfig, answers: &[PeerAnswer]) -> String {
        plan_empty_dir(config, answers)
            .expect_err("an empty dir that must be refused was accepted")
            .to_string()
    }

    #[test]
    fn cluster_ids_differ_by_voters_and_token_and_are_never_zero() {
        let voters = initial_voters(&member(true, false, None));
        let id = new_cluster_id(&voters, "t");
        assert_ne!(id, 0);
        assert_eq!(id, new_cluster_id(&voters, "t"), "the same on every voter");
        assert_ne!(id, new_cluster_id(&voters, "u"));
        let mut moved = voters.clone();
        moved.insert(3, "h4:7070".into());
        assert_ne!(id, new_cluster_id(&moved, "t"));
    }

    #[test]
    fn an_empty_dir_bootstraps_only_when_told_and_never_into_a_running_cluster() {
        let told = member(true, false, None);
        let mine = new_cluster_id(&initial_voters(&told), "t");
        // A first start: peers not up yet, or up with the same new cluster (late start).
        assert!(plan_empty_dir(&told, &[]).expect("bootstrap"));
        assert!(plan_empty_dir(&told, &[answer(2, mine, 7)]).expect("late start"));
        let text = refusal(&told, &[answer(2, mine ^ 1, 7)]);
        assert!(text.contains("serves another cluster"), "{text}");

        // As initdb: before any peer serves; a running cluster means the dir was lost.
        let init = member(false, true, None);
        assert!(plan_empty_dir(&init, &[answer(2, mine, 1)]).expect("peers bootstrapped too"));
        let text = refusal(&init, &[answer(3, mine, 40)]);
        assert!(
            text.contains("serves a running cluster") && text.contains("remove-coordinator 1"),
            "{text}"
        );

        // A restart's flags: refused either way, saying what to do.
        let restart = member(false, false, None);
        let text = refusal(&restart, &[answer(2, mine, 40)]);
        assert!(
            text.contains("cannot rejoin as itself")
                && text.contains("kiln admin remove-coordinator 1")
                && text.contains("join = \"h2:7070\""),
            "{text}"
        );
        let text = refusal(&restart, &[]);
        assert!(
            text.contains("holds no cluster") && text.contains("--bootstrap"),
            "{text}"
        );

        // A joining node waits for its snapshot, unless it was a voter already.
        let joining = member(false, false, Some("h1:7070"));
        assert!(!plan_empty_dir(&joining, &[]).expect("join"));
        let mut learner = answer(2, mine, 40);
        learner.voters = vec![2, 3, 4];
        assert!(!plan_empty_dir(&joining, &[learner]).expect("a learner asks again"));
        let text = refusal(&joining, &[answer(2, mine, 40)]);
        assert!(
            text.contains("counts coordinator 1 among its voters")
                && text.contains("remove-coordinator 1"),
            "{text}"
        );
    }
}
