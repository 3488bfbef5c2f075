//! The real coordinator (`kiln_coordinator::run`), run in-process for tests: a
//! single-node cluster on loopback ports that elects itself leader.
//!
//! Each coordinator runs on its own thread with its own runtime, as a separate
//! process would: stopping it ends that runtime, so that its ports and its RocksDB
//! are released before a test starts another one on the same ports.

use std::future::Future;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_common::config::{CoordinatorConfig, CoordinatorOverrides};
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, NodeStatusRequest, NodeStatusResponse,
    WorkerRecord,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pause between two polls of a condition.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for a fresh node to elect itself; an election timeout is 1 to
/// 1.5 s, the rest is room for a loaded machine.
const LEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a coordinator to stop; it gives its tasks 5 s and then its
/// Raft thread 5 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for one status call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the coordinator's runtime gives leftover tasks once `run` has returned.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Polls `probe` every [`POLL_INTERVAL`] until it returns a value; panics naming
/// `what` when `timeout` passes first (a probe that hangs counts against it too).
pub(crate) async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(value)) = tokio::time::timeout_at(deadline, probe()).await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A coordinator's thread and the token that stops it.
struct Running {
    stop: CancellationToken,
    thread: JoinHandle<anyhow::Result<()>>,
}

/// A running single-node coordinator; it stops when dropped.
pub(crate) struct InProcessCoordinator {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    data_dir: tempfile::TempDir,
    running: Option<Running>,
}

impl InProcessCoordinator {
    /// Starts a coordinator on free loopback ports with an empty data dir, and
    /// returns once it leads.
    pub(crate) async fn start() -> InProcessCoordinator {
        // Both listeners are held together, so that the two ports differ.
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a grpc port");
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an http port");
        let mut coordinator = InProcessCoordinator {
            grpc_addr: grpc.local_addr().expect("grpc port"),
            http_addr: http.local_addr().expect("http port"),
            data_dir: tempfile::tempdir().expect("coordinator data dir"),
            running: None,
        };
        drop((grpc, http));
        coordinator.launch();
        coordinator.wait_until_leader().await;
        coordinator
    }

    /// Returns the coordinator's gRPC address, the one workers are given.
    pub(crate) fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Stops the coordinator, deletes its data dir and starts a fresh one on the
    /// same ports, as a coordinator that lost its disk would come back; returns
    /// once the fresh one leads.
    pub(crate) async fn restart_without_state(&mut self) {
        self.stop().await;
        let dir = self.data_dir.path();
        std::fs::remove_dir_all(dir).expect("delete the coordinator data dir");
        std::fs::create_dir(dir).expect("create an empty coordinator data dir");
        self.launch();
        self.wait_until_leader().await;
    }

    /// Cancels the coordinator and waits for its `run` to return, which must be
    /// without error.
    pub(crate) async fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.cancel();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !running.thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the coordinator did not stop within {STOP_TIMEOUT:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        running
            .thread
            .join()
            .expect("the coordinator thread panicked")
            .expect("the coordinator stopped with an error");
    }

    /// Returns the cluster status, or `None` when the call fails.
    pub(crate) async fn cluster_status(&self) -> Option<ClusterStatusResponse> {
        let mut client = self.client().await?;
        let call = client.cluster_status(ClusterStatusRequest {});
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => Some(response.into_inner()),
            _ => None,
        }
    }

    /// Returns the record the coordinator keeps of worker `id`, or `None` when it
    /// lists no such worker (or cannot be asked).
    pub(crate) async fn worker(&self, id: &str) -> Option<WorkerRecord> {
        self.cluster_status()
            .await?
            .workers
            .into_iter()
            .find(|worker| worker.id == id)
    }

    async fn node_status(&self) -> Option<NodeStatusResponse> {
        let mut client = self.client().await?;
        let call = client.node_status(NodeStatusRequest {});
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => Some(response.into_inner()),
            _ => None,
        }
    }

    async fn client(&self) -> Option<CoordinatorClient<tonic::transport::Channel>> {
        let url = format!("http://{}", self.grpc_addr);
        match tokio::time::timeout(CALL_TIMEOUT, CoordinatorClient::connect(url)).await {
            Ok(Ok(client)) => Some(client),
            _ => None,
        }
    }

    /// Starts `kiln_coordinator::run` on a thread of its own, with the ports and
    /// the data dir of this coordinator.
    fn launch(&mut self) {
        assert!(self.running.is_none(), "the coordinator runs already");
        let config = CoordinatorConfig::load(
            None,
            CoordinatorOverrides {
                id: Some(1),
                data_dir: Some(self.data_dir.path().to_path_buf()),
                listen: Some(self.grpc_addr.to_string()),
                http: Some(self.http_addr.to_string()),
                insecure: true,
                // A new data dir on the first launch; a restart keeps its data.
                bootstrap: true,
                ..Default::default()
            },
        )
        .expect("single-node coordinator config");
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                let result = runtime.block_on(kiln_coordinator::run(config, token));
                // Ends what `run` left behind (its gRPC server task among them), so
                // that the ports are free once this thread has ended.
                runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
                result
            })
            .expect("spawn the coordinator thread");
        self.running = Some(Running { stop, thread });
    }

    /// Polls `NodeStatus` until this node leads; panics when it does not within
    /// [`LEADER_TIMEOUT`] or when the coordinator ends first.
    async fn wait_until_leader(&mut self) {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            if let Some(running) = self.running.take_if(|r| r.thread.is_finished()) {
                let result = running.thread.join().expect("coordinator thread panicked");
                panic!("the coordinator ended before leading: {result:?}");
            }
            if let Ok(Some(status)) = tokio::time::timeout_at(deadline, self.node_status()).await {
                if status.role == "leader" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the coordinator did not lead within {LEADER_TIMEOUT:?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for InProcessCoordinator {
    /// Stops the coordinator and waits, a bounded time, for it to end before its
    /// data dir is deleted.
    fn drop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.cancel();
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while !running.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}
