//! kiln's worker agent: one per machine, it makes the machine known to the
//! coordinators and keeps it known.
//!
//! # Layout
//!
//! - `identity`: the worker id, a UUID v4 kept in `<data_dir>/worker-id`, so that a
//!   restart comes back under the same id.
//! - `resources`: what the machine offers (CPU cores, memory, the data directory's
//!   disk, NVIDIA GPUs through NVML), as a `kiln_proto::v1::Resources`.
//! - `agent`: the [`agent::Agent`] actor; registers with the coordinators, then
//!   heartbeats, and registers again when they forget this worker. It publishes its
//!   [`agent::Registration`] state on a `watch` and bumps counters in `metrics`.
//! - `metrics`: counters and gauges as atomics, rendered in the Prometheus text
//!   format.
//! - `blob`, `blob_service`, `scrub`: the chunk store in RocksDB, its gRPC service
//!   (`kiln.v1.Blobs`: push, read, copy, delete chunks) and the scrubber that
//!   re-verifies stored chunks on a schedule.
//! - `collective`: the all-reduce between the shards of a training job, which
//!   averages their gradient buffers: the CPU ring over TCP ([`collective::Ring`])
//!   or, with the `cuda` feature, NCCL on the shards' GPUs through cudarc
//!   (`collective::nccl`); [`collective::Collective`] is either.
//! - `train`: training shards: the supervisor starts and stops the shards the
//!   heartbeat answers list; each pulls its data, trains with the ring all-reduce
//!   and reports to the coordinators.
//! - `serving`: ONNX models behind KServe v2: the replica supervisor starts and
//!   stops the replicas the heartbeat answers list (pull, load, warm up, report
//!   Ready), and the router sends each inference request to a ready replica here
//!   or on another worker.
//! - `http`: the HTTP server (KServe v2 health, metadata and inference endpoints,
//!   `/metrics`).
//! - `telemetry`: reports host load, replica requests and latency, and what each
//!   model version served (counted into its reference bins) to the leader.
//!
//! How data moves:
//!
//! ```text
//!  identity ─ id ─┐
//!  resources ─────┼─► Agent ── RegisterWorker / Heartbeat ──► coordinators (leader)
//!                 │     │ watch<Registration>, Arc<Metrics>
//!                 │     ▼
//!                 └─► http: /v2/health/ready, /metrics ◄── probes, Prometheus
//! ```
//!
//! [`run`] holds three listeners: HTTP (`http`: health, KServe v2 REST,
//! metrics), the worker's gRPC port (`listen`: the blob store) and the inference
//! gRPC port (`inference_grpc`: KServe v2 gRPC).
//!
//! Shutdown, on cancellation of the token given to [`run`]: the agent stops first
//! (no heartbeat leaves a worker that is going away), then the servers finish their
//! open requests; the whole is bounded by [`SHUTDOWN_TIMEOUT`], after which what is
//! left is aborted.

pub mod agent;
pub mod blob;
pub mod blob_service;
pub mod collective;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod resources;
pub mod scrub;
pub mod serving;
pub mod telemetry;
pub mod tracking_proxy;
pub mod train;

#[cfg(test)]
mod in_process_coordinator;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kiln_common::auth::TokenBook;
use kiln_common::client::{ClientOptions, ClusterClient};
use kiln_common::config::WorkerConfig;
use kiln_proto::v1::{Resources, WorkerRecord};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agent::{Agent, AgentHandle, AgentSettings, Registration};
use crate::blob::BlobStore;
use crate::blob_service::BlobService;
use crate::http::HttpState;
use crate::metrics::Metrics;
use crate::resources::ResourceProbe;
use kiln_proto::v1::blobs_server::BlobsServer;

/// Longest time from cancellation to a stopped worker.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a worker until `shutdown` is cancelled, then stops it in order.
///
/// Returns an error when a port cannot be bound, the worker id cannot be loaded, or
/// a server fails while running.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await
}

/// A started worker: its ports are bound and its agent runs.
#[derive(Debug)]
pub struct Worker {
    id: Uuid,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    inference_grpc_addr: SocketAddr,
    agent: AgentHandle,
    agent_stop: CancellationToken,
    servers: JoinSet<anyhow::Result<()>>,
    servers_stop: CancellationToken,
    shutdown: CancellationToken,
}

/// Binds the worker's ports, loads its id, discovers its resources and starts the
/// agent and the servers; [`Worker::wait`] then runs it until `shutdown`.
pub async fn start(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<Worker> {
    let http_listener = bind("worker http", config.http).await?;
    let grpc_listener = bind("worker grpc", config.listen).await?;
    let inference_grpc_listener = bind("worker inference grpc", config.inference_grpc).await?;
    let http_addr = local_addr(&http_listener)?;
    let grpc_addr = local_addr(&grpc_listener)?;
    let inference_grpc_addr = local_addr(&inference_grpc_listener)?;

    let library = config.onnxruntime_lib.clone();
    let onnxruntime =
        tokio::task::spawn_blocking(move || serving::engine::onnxruntime::init(library.as_deref()))
            .await
            .context("join the ONNX Runtime load")??;
    match &onnxruntime {
        Some(library) => tracing::info!(library = %library.display(), "replicas serve on ONNX Runtime (tract for --engine tract)"),
        None => tracing::info!(
            "no ONNX Runtime library (--onnxruntime-lib, KILN_ONNXRUNTIME_LIB, or {}): replicas serve through tract",
            serving::engine::onnxruntime::DEFAULT_DIR
        ),
    }
    let data_dir = config.data_dir.clone();
    let (id, probe, resources, memory_limits) = tokio::task::spawn_blocking(move || {
        let id = identity::load_or_create(&data_dir)?;
        let (probe, mut resources) = ResourceProbe::discover(&data_dir);
        let memory_limits = train::limits::MemoryLimits::detect(&id.to_string());
        resources.memory_limits = memory_limits.describe();
        tracing::info!(
            "memory limits of command jobs' ranks (memory_mib_per_shard): {}",
            resources.memory_limits
        );
        Ok::<_, identity::IdentityError>((id, probe, resources, memory_limits))
    })
    .await
    .context("join identity and resource discovery")?
    .context("load worker id")?;
    let blob_dir = config.data_dir.join("blobs");
    let store = tokio::task::spawn_blocking(move || BlobStore::open(&blob_dir))
        .await
        .context("join blob store open")?
        .context("open the blob store")?;

    let tls = match &config.tls {
        Some(files) => Some(
            kiln_common::tls::TlsMaterial::node(&files.ca, &files.cert, &files.key)
                .context("load worker tls")?,
        ),
        None => {
            tracing::warn!("running WITHOUT TLS (--insecure): coordinators are not authenticated");
            None
        }
    };
    let server_tls = tls
        .as_ref()
        .map(|t| t.server_config())
        .transpose()
        .context("worker grpc tls")?;
    let tokens = Arc::new(TokenBook::default());
    let options = ClientOptions {
        tls: tls.clone(),
        ..ClientOptions::default()
    };
    // One client for the agent's calls, the scrubber's reports and the chunk
    // copies between workers: they share its channels.
    let client = Arc::new(
        ClusterClient::new(config.coordinators.clone(), options)
            .context("create coordinator client")?,
    );
    let record = worker_record(
        &id,
        &config.advertise_host,
        Ports {
            grpc: grpc_addr.port(),
            http: http_addr.port(),
            inference_grpc: inference_grpc_addr.port(),
        },
        &resources,
    );
    tracing::info!(
        worker_id = %id,
        addr = %record.addr,
        http_addr = %record.http_addr,
        inference_grpc_addr = %record.inference_grpc_addr,
        coordinators = %config.coordinators.join(","),
        "worker starting"
    );

    let metrics = Arc::new(Metrics::new(&resources));
    let agent_stop = shutdown.child_token();
    let shards = Arc::new(watch::Sender::new(Vec::new()));
    let lease = Arc::new(train::supervisor::ShardLease::default());
    let running_shards = Arc::new(watch::Sender::new(Vec::new()));
    tokio::spawn(train::supervisor::supervise(
        train::shard::ShardContext {
            client: Arc::clone(&client),
            worker_id: id.to_string(),
            work_dir: config.data_dir.join("jobs"),
            bind_host: config.advertise_host.clone(),
            ca: config
                .tls
                .as_ref()
                .map(|t| std::fs::canonicalize(&t.ca).unwrap_or_else(|_| t.ca.clone())),
            memory_limits: Arc::new(memory_limits),
            tracking_uri: format!(
                "{}://{}",
                kiln_common::https::scheme(tls.is_some()),
                record.http_addr
            ),
        },
        shards.subscribe(),
        Arc::clone(&lease),
        Arc::clone(&running_shards),
        agent_stop.clone(),
    ));
    let replicas = Arc::new(watch::Sender::new(Vec::new()));
    let routes = Arc::new(watch::Sender::new(Vec::new()));
    let serving_table = Arc::new(serving::replicas::ServingTable::default());
    tokio::spawn(serving::replicas::supervise(
        serving::replicas::ServingContext {
            client: Arc::clone(&client),
            worker_id: id.to_string(),
            work_dir: config.data_dir.join("replicas"),
        },
        Arc::clone(&serving_table),
        replicas.subscribe(),
        agent_stop.clone(),
    ));
    let serving_router = Arc::new(
        serving::router::Router::new(
            id.to_string(),
            Arc::clone(&serving_table),
            routes.subscribe(),
            tls.as_ref().map(|tls| (tls, Arc::clone(&tokens))),
        )
        .context("worker http client")?,
    );
    tokio::spawn(telemetry::telemetry_loop(
        telemetry::TelemetryContext {
            client: Arc::clone(&client),
            worker_id: id.to_string(),
            table: Arc::clone(&serving_table),
            feedback: Arc::clone(serving_router.feedback()),
            data_dir: config.data_dir.clone(),
            interval: Duration::from_millis(config.telemetry_interval_ms),
        },
        agent_stop.clone(),
    ));
    let agent = Agent::spawn(
        Arc::clone(&client),
        AgentSettings {
            record,
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
            tokens: Arc::clone(&tokens),
            shards,
            replicas,
            routes,
            serving: serving_table,
            lease,
            running_shards: running_shards.subscribe(),
        },
        probe,
        resources,
        Arc::clone(&metrics),
        agent_stop.clone(),
    );

    // Not a child of `shutdown`: the servers stop only after the agent has.
    let servers_stop = CancellationToken::new();
    let mut servers = JoinSet::new();
    let state = HttpState {
        metrics: Arc::clone(&metrics),
        registration: agent.registration(),
        tokens: tls.is_some().then(|| Arc::clone(&tokens)),
        serving: Arc::clone(&serving_router),
        tracking: tracking_proxy::TrackingProxy::new(
            kiln_common::https::http_client(tls.as_ref(), Default::default())
                .context("the tracking port's client")?,
            Arc::clone(&client),
            tls.is_some(),
        ),
    };
    let stop = servers_stop.clone().cancelled_owned();
    let https = kiln_common::https::acceptor(tls.as_ref()).context("worker https")?;
    servers.spawn(async move {
        http::serve(http_listener, state, https, stop)
            .await
            .with_context(|| format!("serve worker http {http_addr}"))
    });
    tokio::spawn(scrub::scrub_loop(
        store.clone(),
        Arc::clone(&client),
        id.to_string(),
        Duration::from_millis(config.scrub_interval_ms),
        Arc::clone(&metrics),
        agent_stop.clone(),
    ));
    let blobs = BlobsServer::new(BlobService {
        store,
        tokens: tls.is_some().then(|| Arc::clone(&tokens)),
        metrics: Arc::clone(&metrics),
        writers: Arc::new(tokio::sync::Semaphore::new(blob_service::MAX_WRITERS)),
        peers: Arc::clone(&client),
    })
    .max_decoding_message_size(kiln_common::client::MAX_DATA_MESSAGE_BYTES)
    .max_encoding_message_size(kiln_common::client::MAX_DATA_MESSAGE_BYTES);
    let inference =
        kiln_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            serving::grpc::InferenceService {
                router: Arc::clone(&serving_router),
                peers: Arc::clone(&client),
                registered: agent.registration(),
            },
        )
        .max_decoding_message_size(serving::router::MAX_BODY_BYTES)
        .max_encoding_message_size(serving::router::MAX_BODY_BYTES);
    let services = [
        (
            "worker grpc",
            grpc_listener,
            grpc_addr,
            tonic::service::Routes::new(blobs),
        ),
        (
            "worker inference grpc",
            inference_grpc_listener,
            inference_grpc_addr,
            tonic::service::Routes::new(inference),
        ),
    ];
    for (name, listener, addr, routes) in services {
        let stop = servers_stop.clone().cancelled_owned();
        let tls = server_tls.clone();
        servers.spawn(async move {
            serve_grpc(listener, tls, routes, stop)
                .await
                .with_context(|| format!("serve {name} {addr}"))
        });
    }

    Ok(Worker {
        id,
        http_addr,
        grpc_addr,
        inference_grpc_addr,
        agent,
        agent_stop,
        servers,
        servers_stop,
        shutdown,
    })
}

impl Worker {
    /// Returns this worker's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Returns the bound address of the HTTP server.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Returns the bound address of the worker's gRPC port.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Returns the bound address of the inference gRPC port.
    pub fn inference_grpc_addr(&self) -> SocketAddr {
        self.inference_grpc_addr
    }

    /// Returns a receiver of the agent's registration state.
    pub fn registration(&self) -> watch::Receiver<Registration> {
        self.agent.registration()
    }

    /// Runs until the shutdown token is cancelled or a server fails, then stops the
    /// agent and the servers, in that order, within [`SHUTDOWN_TIMEOUT`].
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = tokio::select! {
            _ = self.shutdown.cancelled() => None,
            Some(joined) = self.servers.join_next() => Some(
                flatten(joined).err().unwrap_or_else(|| anyhow::anyhow!("a worker server stopped by itself")),
            ),
        };
        if let Some(err) = &first_error {
            tracing::info!(error = %format!("{err:#}"), "worker server ended; stopping the worker");
        }
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        self.agent_stop.cancel();
        if !self.agent.join(deadline).await {
            tracing::warn!(
                timeout_ms = SHUTDOWN_TIMEOUT.as_millis() as u64,
                "agent did not stop in time; aborted it"
            );
        }
        self.servers_stop.cancel();
        loop {
            match tokio::time::timeout_at(deadline, self.servers.join_next()).await {
                Ok(None) => break,
                Ok(Some(joined)) => {
                    if let Err(err) = flatten(joined) {
                        first_error.get_or_insert(err);
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        timeout_ms = SHUTDOWN_TIMEOUT.as_millis() as u64,
                        "servers did not stop in time; aborting open connections"
                    );
                    self.servers.abort_all();
                    break;
                }
            }
        }
        tracing::info!(worker_id = %self.id, "worker stopped");
        first_error.map_or(Ok(()), Err)
    }
}

fn flatten(joined: Result<anyhow::Result<()>, JoinError>) -> anyhow::Result<()> {
    joined.context("join worker server")?
}

async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {what} {addr}"))
}

fn local_addr(listener: &TcpListener) -> anyhow::Result<SocketAddr> {
    listener.local_addr().context("read bound address")
}

/// Serves `routes` over gRPC (TLS when configured) until `stop` completes. The
/// inference port has no routes yet: every call there answers UNIMPLEMENTED.
async fn serve_grpc(
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    routes: tonic::service::Routes,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut builder = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Chunks arrive as streams of 64 KiB - 1 MiB messages: larger frames and
        // windows than HTTP/2's 16 KiB and 64 KiB defaults keep the per-frame work
        // and the window updates down.
        .max_frame_size(Some(kiln_common::tls::DATA_FRAME_BYTES))
        .initial_stream_window_size(Some(kiln_common::tls::DATA_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * kiln_common::tls::DATA_STREAM_WINDOW_BYTES))
        .timeout(kiln_common::client::DATA_CALL_TIMEOUT);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stop)
        .await?;
    Ok(())
}

/// The ports this worker was bound to.
#[derive(Debug, Clone, Copy)]
struct Ports {
    grpc: u16,
    http: u16,
    inference_grpc: u16,
}

/// Returns the record this worker registers, its addresses built from the advertised
/// host and the bound ports (so that port 0 in the config reports the real port).
fn worker_record(id: &Uuid, host: &str, ports: Ports, resources: &Resources) -> WorkerRecord {
    let http_addr = host_port(host, ports.http);
    WorkerRecord {
        id: id.to_string(),
        addr: host_port(host, ports.grpc),
        inference_http_addr: http_addr.clone(),
        http_addr,
        inference_grpc_addr: host_port(host, ports.inference_grpc),
        resources: Some(resources.clone()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    }
}

/// Joins a host and a port, bracketing an IPv6 literal.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::http_get;
    use crate::in_process_coordinator::{wait_for, InProcessCoordinator};
    use kiln_proto::v1::WorkerState;

    fn config(data_dir: &std::path::Path, coordinator: SocketAddr) -> WorkerConfig {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        WorkerConfig {
            data_dir: data_dir.to_path_buf(),
            coordinators: vec![coordinator.to_string()],
            listen: any,
            advertise_host: "127.0.0.1".into(),
            http: any,
            inference_grpc: any,
            heartbeat_interval_ms: 50,
            scrub_interval_ms: 0,
            telemetry_interval_ms: 1_000,
            onnxruntime_lib: None,
            tls: None,
        }
    }

    /// Returns a loopback address that nothing listens on.
    async fn dead_addr() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    }

    /// Cancels `shutdown` and checks that the worker stops cleanly within
    /// [`SHUTDOWN_TIMEOUT`].
    async fn stop(
        shutdown: &CancellationToken,
        running: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let started = std::time::Instant::now();
        shutdown.cancel();
        tokio::time::timeout(SHUTDOWN_TIMEOUT, running)
            .await
            .expect("stops within the shutdown timeout")
            .expect("join")
            .expect("clean stop");
        // Stopping aborts nothing here, so it should take a fraction of the bound.
        assert!(
            started.elapsed() < SHUTDOWN_TIMEOUT / 2,
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn addresses_join_host_and_port() {
        assert_eq!(host_port("10.0.0.7", 8000), "10.0.0.7:8000");
        assert_eq!(host_port("worker-3.local", 7071), "worker-3.local:7071");
        assert_eq!(host_port("::1", 8001), "[::1]:8001");
        assert_eq!(host_port("[fe80::1]", 8001), "[fe80::1]:8001");
    }

    #[test]
    fn record_names_every_address() {
        let id = Uuid::new_v4();
        let ports = Ports {
            grpc: 7071,
            http: 8000,
            inference_grpc: 8001,
        };
        let resources = Resources {
            cpu_cores: 2,
            ..Default::default()
        };
        let record = worker_record(&id, "10.1.2.3", ports, &resources);
        assert_eq!(record.id, id.to_string());
        assert_eq!(record.addr, "10.1.2.3:7071");
        assert_eq!(record.http_addr, "10.1.2.3:8000");
        assert_eq!(record.inference_http_addr, "10.1.2.3:8000");
        assert_eq!(record.inference_grpc_addr, "10.1.2.3:8001");
        assert_eq!(record.resources, Some(resources));
        assert_eq!(record.version, env!("CARGO_PKG_VERSION"));
    }

    #[tokio::test]
    async fn a_taken_http_port_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let taken_addr = taken.local_addr().expect("addr");
        let mut config = config(dir.path(), dead_addr().await);
        config.http = taken_addr;
        let err = run(config, CancellationToken::new())
            .await
            .expect_err("the port is taken");
        let text = format!("{err:#}");
        assert!(
            text.starts_with(&format!("bind worker http {taken_addr}: ")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn without_coordinators_it_is_live_not_ready_and_stops_in_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let shutdown = CancellationToken::new();
        let worker = start(config(dir.path(), dead_addr().await), shutdown.clone())
            .await
            .expect("start");
        let http_addr = worker.http_addr();
        let grpc_addr = worker.grpc_addr();
        let id = worker.id();
        let running = tokio::spawn(worker.wait());

        assert_eq!(http_get(http_addr, "/v2/health/live").await.0, 200);
        assert_eq!(http_get(http_addr, "/v2/health/ready").await.0, 503);
        tokio::net::TcpStream::connect(grpc_addr)
            .await
            .expect("the grpc port is held");

        stop(&shutdown, running).await;
        assert!(
            TcpListener::bind(http_addr).await.is_ok(),
            "the http port is released"
        );

        // A restart in the same data dir keeps the id.
        let worker = start(
            config(dir.path(), dead_addr().await),
            CancellationToken::new(),
        )
        .await
        .expect("restart");
        assert_eq!(worker.id(), id);
    }

    /// Returns the value of sample `name` in a Prometheus text `body`.
    fn sample(body: &str, name: &str) -> Option<u64> {
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
    }

    #[tokio::test]
    async fn registers_and_becomes_ready() {
        let coordinator = InProcessCoordinator::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let shutdown = CancellationToken::new();
        let worker = start(
            config(dir.path(), coordinator.grpc_addr()),
            shutdown.clone(),
        )
        .await
        .expect("start");
        let (http_addr, grpc_addr, inference_grpc_addr, id) = (
            worker.http_addr(),
            worker.grpc_addr(),
            worker.inference_grpc_addr(),
            worker.id().to_string(),
        );
        let running = tokio::spawn(worker.wait());

        let record = wait_for(
            "the coordinator to list the worker",
            Duration::from_secs(10),
            || coordinator.worker(&id),
        )
        .await;
        assert_eq!(record.addr, format!("127.0.0.1:{}", grpc_addr.port()));
        assert_eq!(record.http_addr, format!("127.0.0.1:{}", http_addr.port()));
        assert_eq!(
            record.inference_http_addr,
            format!("127.0.0.1:{}", http_addr.port())
        );
        assert_eq!(
            record.inference_grpc_addr,
            format!("127.0.0.1:{}", inference_grpc_addr.port())
        );
        assert_eq!(record.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(record.incarnation, 1);
        assert_eq!(record.state(), WorkerState::Alive);
        let resources = record.resources.expect("resources");
        assert!(resources.cpu_cores >= 1);
        assert!(resources.memory_bytes > 0);

        // The coordinator sets the interval (1 s), so two heartbeats take about 2 s.
        let metrics = wait_for(
            "two heartbeats",
            Duration::from_secs(10),
            move || async move {
                let (_, metrics) = http_get(http_addr, "/metrics").await;
                (sample(&metrics, "kiln_worker_heartbeats_total")? >= 2).then_some(metrics)
            },
        )
        .await;
        assert_eq!(
            sample(&metrics, "kiln_worker_heartbeat_failures_total"),
            Some(0),
            "{metrics}"
        );
        assert_eq!(
            sample(&metrics, "kiln_worker_registered"),
            Some(1),
            "{metrics}"
        );
        let (status, body) = http_get(http_addr, "/v2/health/ready").await;
        assert_eq!((status, body.as_str()), (200, r#"{"ready":true}"#));
        let record = coordinator.worker(&id).await.expect("still listed");
        assert_eq!(record.state(), WorkerState::Alive);

        stop(&shutdown, running).await;
    }
}
