//! The `kiln.v1.Coordinator` gRPC service.
//!
//! Writes go through [`Api::propose`]: proposed here when this node leads, else
//! forwarded once to the leader. Reads are linearizable through ReadIndex unless
//! the caller asks for a stale read.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_common::client::ClusterClient;
use kiln_common::clock::now_ms;
use kiln_common::{Error, Result};
use kiln_proto::v1::coordinator_server::Coordinator;
use kiln_proto::v1::*;
use prost_raft::Message as _;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, Message};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Caller, Permission};
use crate::health::HeartbeatClock;
use crate::raft::node::{
    write_snapshot_record, IncomingSnapshot, NodeView, RaftHandle, SnapshotDigest,
};
use crate::raft::transport::Transport;
use crate::state::keys;
use crate::state::machine::validate_kv;
use crate::state::reader::StateReader;

/// Audit records returned when the caller names no limit.
const DEFAULT_AUDIT_LIMIT: usize = 1000;
/// Largest number of pairs a scan returns.
const MAX_SCAN: usize = 10_000;
/// Time to ask one peer for its status while building the cluster status.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest a call waits for a just-elected leader to apply its term's first
/// entry before it answers Unavailable (workers retry their heartbeat).
const APPLIED_LEADER_WAIT: Duration = Duration::from_secs(2);

/// Everything the API handlers share.
#[derive(Clone)]
pub struct Api {
    pub node: RaftHandle,
    pub reader: StateReader,
    pub transport: Transport,
    pub heartbeats: HeartbeatClock,
    /// Replica loads and pending scale decisions, in memory on the leader.
    pub autoscaler: crate::autoscaler::Autoscaler,
    /// Workers' telemetry merged into open drift windows, in memory on the leader.
    pub telemetry: crate::monitor::TelemetryStore,
    /// How drift windows are cut and judged.
    pub drift: kiln_common::config::DriftSettings,
    pub canary: kiln_common::config::CanarySettings,
    /// Sends drift alerts to deployments' webhooks.
    pub notifier: crate::webhook::Notifier,
    pub peers: Arc<ClusterClient>,
    pub http_addr: String,
    pub advertise: String,
    pub snapshot_dir: PathBuf,
    /// With TLS, node-only calls need a client certificate from the cluster CA.
    pub tls_enabled: bool,
    pub heartbeat_interval_ms: u64,
    /// How long a worker's shards may run without a heartbeat answer
    /// ([`crate::health::shard_lease_ms`]).
    pub shard_lease_ms: u64,
    /// Whether the scheduler may stop lower-priority gangs for the queue's head.
    pub preemption: bool,
    /// Bounds the audit proposals of refused calls in flight.
    pub denials: Arc<tokio::sync::Semaphore>,
    /// Per-token rate limits on state-changing calls.
    pub limiter: Arc<auth::RateLimiter>,
}

/// Most running shards one heartbeat may list.
pub const MAX_RUNNING_SHARDS: usize = 4096;

/// Audit proposals of refused calls in flight at once, per coordinator.
pub const MAX_DENIALS_IN_FLIGHT: usize = 64;

impl Api {
    /// Proposes `command` through the leader and returns its result.
    pub async fn propose(&self, command: Command, forwarded: bool) -> Result<CommandResult> {
        let result = self.propose_result(command, forwarded).await?;
        if !result.rejected.is_empty() {
            return Err(Error::InvalidArgument(result.rejected));
        }
        Ok(result)
    }

    /// Proposes `command` here when this node leads, else forwards it once to the
    /// leader; returns the result as applied, a deterministic rejection included.
    async fn propose_result(&self, command: Command, forwarded: bool) -> Result<CommandResult> {
        let view = self.node.view();
        let result = if view.is_leader() {
            self.node.propose(&command).await?
        } else {
            let Some(addr) = view.leader_addr().filter(|_| !forwarded) else {
                return Err(view.not_leader());
            };
            let mut client = self.peers.client_for(&addr)?;
            client
                .propose(ProposeRequest {
                    command: Some(command),
                    forwarded: true,
                })
                .await
                .map_err(Error::from)?
                .into_inner()
                .result
                .ok_or_else(|| Error::Internal("leader sent no result".into()))?
        };
        Ok(result)
    }

    pub(crate) async fn read_barrier(&self, stale: bool) -> Result<u64> {
        if stale {
            return Ok(self.node.view().applied_index);
        }
        self.node.read_index().await
    }

    /// Checks that the caller of `request` may do `need` (see [`crate::auth`]) and,
    /// for a state-changing call by a token, that it is within its rate limit. A
    /// refused state-changing call (`method`) goes to the audit log.
    fn authorize<T>(&self, request: &Request<T>, need: Permission, method: &str) -> Result<Caller> {
        let caller = auth::authorize(request, self.tls_enabled, &self.reader, need, now_ms());
        self.admit(caller, auth::grpc_authorization(request), need, method)
    }

    /// Applies the rate limit to an authorised caller and audits refusals; shared by
    /// the gRPC and HTTP endpoints.
    pub fn admit(
        &self,
        caller: Result<Caller>,
        authorization: Option<&str>,
        need: Permission,
        method: &str,
    ) -> Result<Caller> {
        let caller = caller.and_then(|c| {
            if need != Permission::Read {
                if let Caller::Token { .. } = &c {
                    self.limiter.check(&c.name())?;
                }
            }
            Ok(c)
        });
        if let Err(e) = &caller {
            tracing::debug!(method, error = %e, "refused a call");
            // A caller over its rate limit is counted (`kiln_rate_limited_total`),
            // not audited one call at a time: that would turn the flood it stops
            // into a flood of audit records.
            if need != Permission::Read && !matches!(e, Error::ResourceExhausted(_)) {
                let who = match e {
                    // The role was read from a verified token.
                    Error::PermissionDenied(_) => auth::claimed_name(authorization)
                        .map_or_else(|| "anonymous".to_string(), |n| format!("token:{n}")),
                    // Nothing was proven: say what was claimed, as a claim.
                    _ => auth::claimed_name(authorization).map_or_else(
                        || "anonymous".to_string(),
                        |n| format!("unverified token:{n}"),
                    ),
                };
                self.record_denied(who, method.to_string(), e.to_string());
            }
        }
        caller
    }

    /// Proposes an audit record of a refused call, without waiting; at most
    /// `MAX_DENIALS_IN_FLIGHT` at once, so refusals cannot flood the log.
    fn record_denied(&self, who: String, what: String, reason: String) {
        let Ok(permit) = self.denials.clone().try_acquire_owned() else {
            tracing::warn!(%who, %what, "audit of a refused call dropped: too many in flight");
            return;
        };
        let api = self.clone();
        tokio::spawn(async move {
            let event = command(command::Kind::AuditEvent(AuditEvent {
                who,
                what,
                outcome: format!("denied: {reason}"),
            }));
            if let Err(e) = Api::propose(&api, event, false).await {
                tracing::warn!(error = %e, "record a refused call in the audit log");
            }
            drop(permit);
        });
    }

    /// Records an audited event that is not itself a command (a membership change).
    async fn record_event(&self, caller: &Caller, what: String, outcome: String) {
        let event = command(command::Kind::AuditEvent(AuditEvent {
            who: caller.name(),
            what,
            outcome,
        }));
        if let Err(e) = Api::propose(self, event, false).await {
            tracing::warn!(error = %e, "record an event in the audit log");
        }
    }

    /// Every worker record, by id.
    pub(crate) fn workers_by_id(&self) -> Result<std::collections::BTreeMap<String, WorkerRecord>> {
        Ok(self
            .reader
            .workers()
            .map_err(super::storage)?
            .into_iter()
            .map(|w| (w.id.clone(), w))
            .collect())
    }

    pub(crate) fn require_leader(&self) -> Result<NodeView> {
        let view = self.node.view();
        if view.is_leader() {
            Ok(view)
        } else {
            Err(view.not_leader())
        }
    }

    /// [`Api::require_leader`] that also waits (briefly, bounded) until a new
    /// leader has applied its term's first entry, so that what it answers from
    /// its state holds every write of the leaders before it.
    pub(crate) async fn require_applied_leader(&self) -> Result<NodeView> {
        let deadline = tokio::time::Instant::now() + APPLIED_LEADER_WAIT;
        loop {
            let view = self.require_leader()?;
            if view.leads_applied() {
                return Ok(view);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "coordinator {} has just been elected and has not applied its term's first \
                     entry (applied {}, first {}); retry",
                    view.id, view.applied_index, view.term_start_index
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Returns this node's own status.
    pub fn node_status(&self) -> NodeStatusResponse {
        let v = self.node.view();
        NodeStatusResponse {
            id: v.id,
            addr: self.advertise.clone(),
            http_addr: self.http_addr.clone(),
            role: v.role.to_string(),
            term: v.term,
            leader_id: v.leader_id,
            commit_index: v.commit_index,
            applied_index: v.applied_index,
            first_index: v.first_index,
            last_index: v.last_index,
            snapshot_index: v.snapshot_index,
            voters: v.voters.clone(),
            learners: v.learners.clone(),
            snapshots_received: v.snapshots_received,
            version: env!("CARGO_PKG_VERSION").to_string(),
            leader_addr: v.leader_addr().unwrap_or_default(),
            cluster_id: self.transport.cluster_id(),
        }
    }

    /// Builds the cluster status from this node's view, asking each peer for its
    /// own status (a peer that does not answer in time is unhealthy).
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse> {
        let view = self.node.view();
        if !view.is_leader() {
            if let Some(addr) = view.leader_addr() {
                if let Ok(mut client) = self.peers.client_for(&addr) {
                    let call = client.cluster_status(ClusterStatusRequest {});
                    if let Ok(Ok(resp)) = tokio::time::timeout(PEER_STATUS_TIMEOUT * 2, call).await
                    {
                        return Ok(resp.into_inner());
                    }
                }
            }
        }
        let mut ids: Vec<u64> = view
            .voters
            .iter()
            .chain(view.learners.iter())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut asks = Vec::new();
        for id in &ids {
            let id = *id;
            let addr = view
                .members
                .get(&id)
                .map(|m| m.addr.clone())
                .unwrap_or_default();
            let api = self.clone();
            asks.push(tokio::spawn(async move {
                if id == api.node.view().id {
                    return (id, addr, Some(api.node_status()));
                }
                let Ok(mut client) = api.peers.client_for(&addr) else {
                    return (id, addr, None);
                };
                let call = client.node_status(NodeStatusRequest {});
                match tokio::time::timeout(PEER_STATUS_TIMEOUT, call).await {
                    Ok(Ok(resp)) => (id, addr, Some(resp.into_inner())),
                    _ => (id, addr, None),
                }
            }));
        }
        let mut coordinators = Vec::new();
        for ask in asks {
            let (id, addr, status) = ask
                .await
                .map_err(|e| Error::Internal(format!("status task: {e}")))?;
            let matched = view.matched.get(&id).copied().unwrap_or(0);
            coordinators.push(match status {
                Some(s) => CoordinatorStatus {
                    id,
                    addr: if addr.is_empty() { s.addr } else { addr },
                    http_addr: s.http_addr,
                    role: if view.learners.contains(&id) {
                        "learner".into()
                    } else {
                        s.role
                    },
                    healthy: true,
                    matched_index: matched,
                    applied_index: s.applied_index,
                },
                None => CoordinatorStatus {
                    id,
                    addr,
                    http_addr: String::new(),
                    role: "unreachable".into(),
                    healthy: false,
                    matched_index: matched,
                    applied_index: 0,
                },
            });
        }
        let workers = self
            .reader
            .workers()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let hosts = self
            .telemetry
            .hosts()
            .into_iter()
            .map(|(worker_id, reported_at_ms, host)| HostHealth {
                worker_id,
                reported_at_ms,
                host: Some(host),
            })
            .collect();
        Ok(ClusterStatusResponse {
            leader_id: view.leader_id,
            term: view.term,
            commit_index: view.commit_index,
            coordinators,
            workers,
            hosts,
            deployments: self.deployment_health()?,
            jobs: self.job_health()?,
        })
    }

    async fn receive_snapshot(&self, mut stream: Streaming<SnapshotChunk>) -> Result<()> {
        let first = stream
            .next()
            .await
            .ok_or_else(|| Error::InvalidArgument("empty snapshot stream".into()))?
            .map_err(Error::from)?;
        self.transport
            .admit(first.from_id, first.cluster_id)
            .map_err(Error::PermissionDenied)?;
        let message = Message::decode(first.message.as_slice())
            .map_err(|e| Error::InvalidArgument(format!("undecodable snapshot message: {e}")))?;
        self.transport.learn(first.from_id, &first.from_addr);
        let meta = message.get_snapshot().get_metadata();
        tokio::fs::create_dir_all(&self.snapshot_dir)
            .await
            .map_err(|e| Error::Internal(format!("create snapshot dir: {e}")))?;
        // A spool of its own: another stream of the same snapshot (a retry, or a
        // new leader's checkpoint at the same index) never writes into, or
        // removes, a file this one wrote or the Raft thread holds.
        let path = self.snapshot_dir.join(format!(
            "incoming-{:020}-{:020}-{:016x}",
            meta.term,
            meta.index,
            rand::random::<u64>()
        ));
        let spooled = spool_snapshot(&path, first, &mut stream).await;
        if let Err(e) = spooled {
            // Nothing of a refused stream is kept, so nothing of it can be installed.
            let _ = tokio::fs::remove_file(&path).await;
            tracing::warn!(from = message.from, index = meta.index, error = %e, "refused a snapshot");
            return Err(e);
        }
        self.node
            .snapshot(IncomingSnapshot {
                message,
                file: path,
            })
            .await
    }
}

/// Writes the pairs of a snapshot stream to `path`, synced, and checks them
/// against the sender's trailer: a stream cut short, or one with pairs after its
/// trailer, is refused.
async fn spool_snapshot(
    path: &std::path::Path,
    first: SnapshotChunk,
    stream: &mut Streaming<SnapshotChunk>,
) -> Result<()> {
    let file = tokio::fs::File::create(path)
        .await
        .map_err(|e| Error::Internal(format!("create {}: {e}", path.display())))?;
    let mut out = tokio::io::BufWriter::new(file);
    let mut buf = Vec::new();
    let mut digest = SnapshotDigest::default();
    let mut trailer = None;
    let mut chunk = Some(first);
    while let Some(current) = chunk.take() {
        if trailer.is_some() {
            return Err(Error::InvalidArgument(
                "snapshot stream: pairs after the trailer".into(),
            ));
        }
        buf.clear();
        for p in &current.pairs {
            write_snapshot_record(&mut buf, &p.key, &p.value);
            digest.add(&p.key, &p.value);
        }
        out.write_all(&buf).await.map_err(io_error)?;
        trailer = current.trailer;
        chunk = stream.next().await.transpose().map_err(Error::from)?;
    }
    digest
        .check(trailer.as_ref())
        .map_err(|e| Error::InvalidArgument(format!("snapshot stream refused: {e}")))?;
    out.flush().await.map_err(io_error)?;
    out.into_inner().sync_all().await.map_err(io_error)?;
    Ok(())
}

fn io_error(e: std::io::Error) -> Error {
    Error::Internal(format!("write received snapshot: {e}"))
}

fn token_info(record: &TokenRecord) -> TokenInfo {
    TokenInfo {
        name: record.name.clone(),
        role: record.role,
        created_at_ms: record.created_at_ms,
        expires_at_ms: record.expires_at_ms,
    }
}

pub(crate) fn command(kind: command::Kind) -> Command {
    Command {
        proposed_at_ms: now_ms(),
        audit: None,
        kind: Some(kind),
    }
}

/// Returns a command that the audit log records with its outcome.
pub(crate) fn audited(caller: &Caller, what: String, kind: command::Kind) -> Command {
    Command {
        audit: Some(AuditInfo {
            who: caller.name(),
            what,
        }),
        ..command(kind)
    }
}

#[tonic::async_trait]
impl Coordinator for Api {
    async fn raft(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        let batch = request.into_inner();
        self.transport
            .admit(batch.from_id, batch.cluster_id)
            .map_err(Status::permission_denied)?;
        self.transport.learn(batch.from_id, &batch.from_addr);
        let mut msgs = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let m = Message::decode(bytes.as_slice())
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            msgs.push(m);
        }
        self.node.step(msgs).await?;
        Ok(Response::new(RaftAck {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        self.receive_snapshot(request.into_inner()).await?;
        Ok(Response::new(RaftAck {}))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        let req = request.into_inner();
        let cmd = req
            .command
            .ok_or_else(|| Status::invalid_argument("propose without a command"))?;
        let result = self.propose_result(cmd, req.forwarded).await?;
        Ok(Response::new(ProposeResponse {
            result: Some(result),
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "Put")?;
        let req = request.into_inner();
        validate_kv(&req.key, req.value.len()).map_err(Status::invalid_argument)?;
        let what = format!("put kv {}", req.key);
        let result = Api::propose(
            self,
            audited(
                &caller,
                what,
                command::Kind::KvPut(KvPut {
                    key: req.key,
                    value: req.value,
                }),
            ),
            false,
        )
        .await?;
        Ok(Response::new(PutResponse {
            index: result.index,
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.authorize(&request, Permission::Read, "Get")?;
        let req = request.into_inner();
        if req.key.is_empty() {
            return Err(Status::invalid_argument("key is empty"));
        }
        let index = self.read_barrier(req.stale).await?;
        let value = self
            .reader
            .get(&keys::kv(&req.key))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(GetResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
            applied_index: index,
        }))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        self.authorize(&request, Permission::Read, "Scan")?;
        let req = request.into_inner();
        let index = self.read_barrier(req.stale).await?;
        let limit = if req.limit == 0 {
            MAX_SCAN
        } else {
            (req.limit as usize).min(MAX_SCAN)
        };
        let prefix = keys::kv(&req.prefix);
        let pairs = self
            .reader
            .scan(&prefix, limit)
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|(k, v)| KvPair {
                key: k[keys::KV.len()..].to_vec(),
                value: v,
            })
            .collect();
        Ok(Response::new(ScanResponse {
            pairs,
            applied_index: index,
        }))
    }

    async fn node_status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        self.authorize(&_request, Permission::Read, "NodeStatus")?;
        Ok(Response::new(Api::node_status(self)))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.authorize(&_request, Permission::Read, "ClusterStatus")?;
        Ok(Response::new(Api::cluster_status(self).await?))
    }

    async fn add_member(
        &self,
        request: Request<AddMemberRequest>,
    ) -> Result<Response<AddMemberResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        let member = request
            .into_inner()
            .member
            .ok_or_else(|| Status::invalid_argument("add_member without a member"))?;
        if member.id == 0 {
            return Err(Status::invalid_argument("member id must be positive"));
        }
        kiln_common::config::parse_host_port("member.addr", &member.addr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let view = self.require_leader()?;
        if let Some(existing) = view.members.get(&member.id) {
            if existing.addr != member.addr {
                return Err(Status::invalid_argument(format!(
                    "coordinator {} is already a member at {}",
                    member.id, existing.addr
                )));
            }
        }
        if !view.voters.contains(&member.id) && !view.learners.contains(&member.id) {
            self.transport.learn(member.id, &member.addr);
            let mut change = ConfChangeSingle::default();
            change.set_change_type(ConfChangeType::AddLearnerNode);
            change.node_id = member.id;
            self.node.conf_change(change, Some(member)).await?;
        }
        let view = self.node.view();
        Ok(Response::new(AddMemberResponse {
            members: view.members.values().cloned().collect(),
            leader_id: view.leader_id,
        }))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<RemoveMemberResponse>, Status> {
        let caller = self.authorize(&request, Permission::Admin, "RemoveMember")?;
        let id = request.into_inner().id;
        let view = self.require_leader()?;
        if !view.voters.contains(&id) && !view.learners.contains(&id) {
            return Err(Error::NotFound(format!("coordinator {id} is not a member")).into());
        }
        if view.voters.len() == 1 && view.voters.contains(&id) {
            return Err(Status::invalid_argument(
                "cannot remove the last voting coordinator",
            ));
        }
        if id == view.id {
            // A leader does not remove itself: it hands leadership to the most
            // caught-up voter, and the caller retries there.
            let target = view
                .voters
                .iter()
                .filter(|v| **v != id)
                .max_by_key(|v| view.matched.get(v).copied().unwrap_or(0))
                .copied()
                .unwrap_or(0);
            self.node.transfer_leader(target);
            return Err(Error::Unavailable(format!(
                "leadership is moving from {id} to {target} before removal; retry"
            ))
            .into());
        }
        let mut change = ConfChangeSingle::default();
        change.set_change_type(ConfChangeType::RemoveNode);
        change.node_id = id;
        let result = self.node.conf_change(change, None).await;
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        self.record_event(&caller, format!("remove coordinator {id}"), outcome)
            .await;
        let cs = result?;
        Ok(Response::new(RemoveMemberResponse { voters: cs.voters }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let caller = self.authorize(&request, Permission::Admin, "TransferLeader")?;
        let to = request.into_inner().to;
        let view = self.require_leader()?;
        if !view.voters.contains(&to) {
            return Err(Status::invalid_argument(format!(
                "coordinator {to} is not a voter"
            )));
        }
        self.node.transfer_leader(to);
        self.record_event(
            &caller,
            format!("transfer leadership to {to}"),
            "asked".into(),
        )
        .await;
        Ok(Response::new(TransferLeaderResponse {}))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = self.authorize(&request, Permission::Admin, "CreateToken")?;
        let req = request.into_inner();
        auth::validate_name(&req.name)?;
        let role = Role::try_from(req.role)
            .ok()
            .filter(|r| *r != Role::Unspecified && *r != Role::Job)
            .ok_or_else(|| {
                Status::invalid_argument("role must be admin, operator, viewer or inference")
            })?;
        if req.name.starts_with("job-") {
            return Err(Status::invalid_argument(format!(
                "token name {}: names starting with job- are kept for command jobs' own tokens",
                req.name
            )));
        }
        let now = now_ms();
        let expires_at_ms = if req.expires_in_ms == 0 {
            0
        } else {
            now.saturating_add(req.expires_in_ms)
        };
        let (token, record) = auth::mint(&req.name, role, now, expires_at_ms);
        let info = token_info(&record);
        let what = format!("create token {} with role {}", req.name, role.as_str_name());
        Api::propose(
            self,
            audited(
                &caller,
                what,
                command::Kind::CreateToken(CreateToken {
                    token: Some(record),
                }),
            ),
            false,
        )
        .await?;
        tracing::info!(name = %req.name, role = ?role, by = %caller.name(), "token created");
        Ok(Response::new(CreateTokenResponse {
            token,
            info: Some(info),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.authorize(&request, Permission::Admin, "ListTokens")?;
        self.read_barrier(false).await?;
        let tokens = self
            .reader
            .tokens()
            .map_err(|e| Status::internal(e.to_string()))?
            .iter()
            .map(token_info)
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = self.authorize(&request, Permission::Admin, "RevokeToken")?;
        let name = request.into_inner().name;
        auth::validate_name(&name)?;
        Api::propose(
            self,
            audited(
                &caller,
                format!("revoke token {name}"),
                command::Kind::RevokeToken(RevokeToken { name: name.clone() }),
            ),
            false,
        )
        .await?;
        tracing::info!(name = %name, by = %caller.name(), "token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.authorize(&request, Permission::Admin, "ListAudit")?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_AUDIT_LIMIT,
            n => (n as usize).min(keys::MAX_AUDIT_RECORDS as usize),
        };
        self.read_barrier(false).await?;
        let mut records = std::collections::VecDeque::with_capacity(limit);
        for (_, bytes) in self
            .reader
            .scan(keys::AUDIT.as_bytes(), usize::MAX)
            .map_err(|e| Status::internal(e.to_string()))?
        {
            let record = <AuditRecord as prost::Message>::decode(bytes.as_slice())
                .map_err(|e| Status::internal(format!("decode audit record: {e}")))?;
            if record.at_ms < req.since_ms {
                continue;
            }
            if records.len() == limit {
                records.pop_front();
            }
            records.push_back(record);
        }
        Ok(Response::new(ListAuditResponse {
            records: records.into(),
        }))
    }

    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        let worker = request
            .into_inner()
            .worker
            .ok_or_else(|| Status::invalid_argument("register_worker without a worker"))?;
        if worker.id.is_empty() || worker.id.len() > 128 {
            return Err(Status::invalid_argument("worker id must be 1 to 128 bytes"));
        }
        self.require_leader()?;
        let id = worker.id.clone();
        Api::propose(
            self,
            command(command::Kind::RegisterWorker(RegisterWorker {
                worker: Some(worker),
            })),
            true,
        )
        .await?;
        self.heartbeats.beat(&id);
        let incarnation = self
            .reader
            .worker(&id)
            .map_err(|e| Status::internal(e.to_string()))?
            .map_or(0, |w| w.incarnation);
        Ok(Response::new(RegisterWorkerResponse {
            incarnation,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            shard_lease_ms: self.shard_lease_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        let req = request.into_inner();
        self.require_applied_leader().await?;
        let record = self
            .reader
            .worker(&req.worker_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| {
                Status::from(Error::NotFound(format!(
                    "worker {} is not registered",
                    req.worker_id
                )))
            })?;
        if req.running_shards.len() > MAX_RUNNING_SHARDS {
            return Err(Status::invalid_argument(format!(
                "a heartbeat lists {} running shards; at most {MAX_RUNNING_SHARDS}",
                req.running_shards.len()
            )));
        }
        self.heartbeats.beat_running(
            &req.worker_id,
            req.lists_running_shards.then(|| req.running_shards.clone()),
        );
        self.autoscaler
            .record(&req.replica_loads, std::time::Instant::now());
        let mut state = WorkerState::try_from(record.state).unwrap_or(WorkerState::Unspecified);
        if state != WorkerState::Alive {
            Api::propose(
                self,
                command(command::Kind::SetWorkerState(SetWorkerState {
                    worker_id: req.worker_id.clone(),
                    state: WorkerState::Alive as i32,
                })),
                true,
            )
            .await?;
            state = WorkerState::Alive;
        }
        let tokens_version = self
            .reader
            .tokens_version()
            .map_err(|e| Status::internal(e.to_string()))?;
        let tokens = if tokens_version > req.tokens_version {
            self.reader
                .tokens()
                .map_err(|e| Status::internal(e.to_string()))?
        } else {
            Vec::new()
        };
        let shards = self.shard_tasks_for(&req.worker_id)?;
        // Until the worker's next heartbeat lists them, these may run there.
        self.heartbeats.delivered(
            &req.worker_id,
            shards
                .iter()
                .map(|t| RunningShard {
                    job_id: t.job_id,
                    attempt: t.attempt,
                    rank: t.rank,
                })
                .collect(),
        );
        let deployments = self.deployments()?;
        let replicas = self.replica_tasks_for(&req.worker_id, &deployments);
        let routes = self.routes(&deployments)?;
        Ok(Response::new(HeartbeatResponse {
            state: state as i32,
            tokens_version,
            tokens,
            shards,
            replicas,
            routes,
        }))
    }

    async fn plan_push(
        &self,
        request: Request<PlanPushRequest>,
    ) -> Result<Response<PlanPushResponse>, Status> {
        self.authorize(&request, Permission::Write, "PlanPush")?;
        Ok(Response::new(
            self.plan_push_call(request.into_inner()).await?,
        ))
    }

    async fn commit_artifact(
        &self,
        request: Request<CommitArtifactRequest>,
    ) -> Result<Response<CommitArtifactResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "CommitArtifact")?;
        let version = self
            .commit_artifact_call(&caller, request.into_inner())
            .await?;
        Ok(Response::new(CommitArtifactResponse { version }))
    }

    async fn get_artifact(
        &self,
        request: Request<GetArtifactRequest>,
    ) -> Result<Response<GetArtifactResponse>, Status> {
        self.authorize(&request, Permission::Read, "GetArtifact")?;
        Ok(Response::new(
            self.get_artifact_call(request.into_inner()).await?,
        ))
    }

    async fn list_artifacts(
        &self,
        request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        self.authorize(&request, Permission::Read, "ListArtifacts")?;
        Ok(Response::new(self.list_artifacts_call().await?))
    }

    async fn list_versions(
        &self,
        request: Request<ListVersionsRequest>,
    ) -> Result<Response<ListVersionsResponse>, Status> {
        self.authorize(&request, Permission::Read, "ListVersions")?;
        Ok(Response::new(
            self.list_versions_call(request.into_inner()).await?,
        ))
    }

    async fn tag_artifact(
        &self,
        request: Request<TagArtifactRequest>,
    ) -> Result<Response<TagArtifactResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "TagArtifact")?;
        let version = self
            .tag_artifact_call(&caller, request.into_inner())
            .await?;
        Ok(Response::new(TagArtifactResponse { version }))
    }

    async fn record_chunks(
        &self,
        request: Request<RecordChunksRequest>,
    ) -> Result<Response<RecordChunksResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "RecordChunks")?;
        self.record_chunks_call(&caller, request.into_inner())
            .await?;
        Ok(Response::new(RecordChunksResponse {}))
    }

    async fn report_corrupt_chunks(
        &self,
        request: Request<ReportCorruptChunksRequest>,
    ) -> Result<Response<ReportCorruptChunksResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        self.report_corrupt_call(request.into_inner()).await?;
        Ok(Response::new(ReportCorruptChunksResponse {}))
    }

    async fn collect_garbage(
        &self,
        request: Request<CollectGarbageRequest>,
    ) -> Result<Response<CollectGarbageResponse>, Status> {
        let caller = self.authorize(&request, Permission::Admin, "CollectGarbage")?;
        Ok(Response::new(
            self.collect_garbage_call(&caller, request.into_inner())
                .await?,
        ))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        self.authorize(&request, Permission::Read, "ListRuns")?;
        Ok(Response::new(
            self.list_runs_call(request.into_inner()).await?,
        ))
    }

    async fn get_run(
        &self,
        request: Request<GetRunRequest>,
    ) -> Result<Response<GetRunResponse>, Status> {
        self.authorize(&request, Permission::Read, "GetRun")?;
        Ok(Response::new(
            self.get_run_call(request.into_inner()).await?,
        ))
    }

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "SubmitJob")?;
        Ok(Response::new(
            self.submit_job_call(&caller, request.into_inner()).await?,
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = self.authorize(&request, Permission::Read, "ListJobs")?;
        Ok(Response::new(
            self.list_jobs_call(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        let caller = self.authorize(&request, Permission::Read, "GetJob")?;
        Ok(Response::new(
            self.get_job_call(&caller, request.into_inner()).await?,
        ))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "CancelJob")?;
        self.cancel_job_call(&caller, request.into_inner()).await?;
        Ok(Response::new(CancelJobResponse {}))
    }

    async fn job_logs(
        &self,
        request: Request<JobLogsRequest>,
    ) -> Result<Response<JobLogsResponse>, Status> {
        self.authorize(&request, Permission::Read, "JobLogs")?;
        Ok(Response::new(
            self.job_logs_call(request.into_inner()).await?,
        ))
    }

    async fn report_shard(
        &self,
        request: Request<ReportShardRequest>,
    ) -> Result<Response<ReportShardResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        let keep_running = self.report_shard_call(request.into_inner()).await?;
        Ok(Response::new(ReportShardResponse { keep_running }))
    }

    async fn register_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<RegisterModelResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "RegisterModel")?;
        let version = self
            .register_model_call(&caller, request.into_inner())
            .await?;
        Ok(Response::new(RegisterModelResponse { version }))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        self.authorize(&request, Permission::Read, "ListModels")?;
        Ok(Response::new(self.list_models_call().await?))
    }

    async fn get_model(
        &self,
        request: Request<GetModelRequest>,
    ) -> Result<Response<GetModelResponse>, Status> {
        self.authorize(&request, Permission::Read, "GetModel")?;
        Ok(Response::new(
            self.get_model_call(request.into_inner()).await?,
        ))
    }

    async fn set_model_alias(
        &self,
        request: Request<SetModelAliasRequest>,
    ) -> Result<Response<SetModelAliasResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "SetModelAlias")?;
        self.set_model_alias_call(&caller, request.into_inner())
            .await?;
        Ok(Response::new(SetModelAliasResponse {}))
    }

    async fn deploy(
        &self,
        request: Request<DeployRequest>,
    ) -> Result<Response<DeployResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "Deploy")?;
        let deployment = self.deploy_call(&caller, request.into_inner()).await?;
        Ok(Response::new(DeployResponse {
            deployment: Some(deployment),
        }))
    }

    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        self.authorize(&request, Permission::Read, "ListDeployments")?;
        Ok(Response::new(self.list_deployments_call().await?))
    }

    async fn get_deployment(
        &self,
        request: Request<GetDeploymentRequest>,
    ) -> Result<Response<GetDeploymentResponse>, Status> {
        self.authorize(&request, Permission::Read, "GetDeployment")?;
        let deployment = self.get_deployment_call(request.into_inner()).await?;
        Ok(Response::new(GetDeploymentResponse {
            deployment: Some(deployment),
        }))
    }

    async fn delete_deployment(
        &self,
        request: Request<DeleteDeploymentRequest>,
    ) -> Result<Response<DeleteDeploymentResponse>, Status> {
        let caller = self.authorize(&request, Permission::Write, "DeleteDeployment")?;
        self.delete_deployment_call(&caller, request.into_inner())
            .await?;
        Ok(Response::new(DeleteDeploymentResponse {}))
    }

    async fn report_replica(
        &self,
        request: Request<ReportReplicaRequest>,
    ) -> Result<Response<ReportReplicaResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        let keep_running = self.report_replica_call(request.into_inner()).await?;
        Ok(Response::new(ReportReplicaResponse { keep_running }))
    }

    async fn report_telemetry(
        &self,
        request: Request<TelemetryReport>,
    ) -> Result<Response<ReportTelemetryResponse>, Status> {
        kiln_common::tls::require_node(&request, self.tls_enabled)?;
        self.require_leader()?;
        self.report_telemetry_call(request.get_ref())?;
        Ok(Response::new(ReportTelemetryResponse {}))
    }

    async fn drift_status(
        &self,
        request: Request<DriftStatusRequest>,
    ) -> Result<Response<DriftStatusResponse>, Status> {
        self.authorize(&request, Permission::Read, "DriftStatus")?;
        Ok(Response::new(
            self.drift_status_call(request.into_inner()).await?,
        ))
    }
}
