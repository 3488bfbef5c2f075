//! A coordinator stand-in for tests: a real tonic server on a loopback port that
//! answers `RegisterWorker` and `Heartbeat` like the leader would, records what it
//! got, and can be told to forget its workers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use kiln_proto::v1::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Default)]
struct Recorded {
    registrations: Vec<WorkerRecord>,
    heartbeats: Vec<HeartbeatRequest>,
    /// Ids of the workers it knows, with their incarnation.
    known: Vec<(String, u64)>,
}

/// The service half of the fake.
#[derive(Debug, Clone)]
struct Service {
    recorded: Arc<Mutex<Recorded>>,
    heartbeat_interval_ms: u64,
}

/// A running fake coordinator; it stops when dropped.
#[derive(Debug)]
pub(crate) struct FakeCoordinator {
    pub(crate) addr: SocketAddr,
    recorded: Arc<Mutex<Recorded>>,
    stop: CancellationToken,
}

impl FakeCoordinator {
    /// Starts a fake that tells workers to heartbeat every `heartbeat_interval_ms`
    /// (0: use their own setting).
    pub(crate) async fn start(heartbeat_interval_ms: u64) -> FakeCoordinator {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let service = Service {
            recorded: Arc::clone(&recorded),
            heartbeat_interval_ms,
        };
        let stop = CancellationToken::new();
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
            .expect("incoming");
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(service))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
        });
        FakeCoordinator {
            addr,
            recorded,
            stop,
        }
    }

    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().expect("fake lock")
    }

    /// Returns the registrations received so far.
    pub(crate) fn registrations(&self) -> Vec<WorkerRecord> {
        self.recorded().registrations.clone()
    }

    /// Returns the heartbeats accepted so far.
    pub(crate) fn heartbeats(&self) -> Vec<HeartbeatRequest> {
        self.recorded().heartbeats.clone()
    }

    /// Forgets every worker, as a coordinator that lost its state would.
    pub(crate) fn forget_workers(&self) {
        self.recorded().known.clear();
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Polls `condition` until it holds; panics naming `what` after five seconds.
pub(crate) async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn unimplemented() -> Status {
    Status::unimplemented("not part of the fake coordinator")
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn raft(&self, _: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        Err(unimplemented())
    }
    async fn install_snapshot(
        &self,
        _: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        Err(unimplemented())
    }
    async fn propose(
        &self,
        _: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        Err(unimplemented())
    }
    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        Err(unimplemented())
    }
    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(unimplemented())
    }
    async fn scan(&self, _: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        Err(unimplemented())
    }
    async fn node_status(
        &self,
        _: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        Err(unimplemented())
    }
    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Err(unimplemented())
    }
    async fn add_member(
        &self,
        _: Request<AddMemberRequest>,
    ) -> Result<Response<AddMemberResponse>, Status> {
        Err(unimplemented())
    }
    async fn remove_member(
        &self,
        _: Request<RemoveMemberRequest>,
    ) -> Result<Response<RemoveMemberResponse>, Status> {
        Err(unimplemented())
    }
    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        Err(unimplemented())
    }

    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let worker = request
            .into_inner()
            .worker
            .ok_or_else(|| Status::invalid_argument("no worker record"))?;
        let mut recorded = self.recorded.lock().expect("fake lock");
        let incarnation = recorded
            .registrations
            .iter()
            .filter(|r| r.id == worker.id)
            .count() as u64
            + 1;
        recorded.known.retain(|(id, _)| *id != worker.id);
        recorded.known.push((worker.id.clone(), incarnation));
        recorded.registrations.push(worker);
        Ok(Response::new(RegisterWorkerResponse {
            incarnation,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let heartbeat = request.into_inner();
        let mut recorded = self.recorded.lock().expect("fake lock");
        let known = recorded.known.iter().any(|(id, incarnation)| {
            *id == heartbeat.worker_id && *incarnation == heartbeat.incarnation
        });
        if !known {
            return Err(Status::not_found(format!(
                "worker {} is not registered",
                heartbeat.worker_id
            )));
        }
        recorded.heartbeats.push(heartbeat);
        Ok(Response::new(HeartbeatResponse {
            state: WorkerState::Alive as i32,
        }))
    }
}
