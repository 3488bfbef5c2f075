//! [`Cluster`]: coordinators and workers of one test, in one temporary dir.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_common::client::{ClientOptions, ClusterClient};
use kiln_common::tls::TlsMaterial;
use kiln_proto::v1::blobs_client::BlobsClient;
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{GetRequest, NodeStatusRequest, NodeStatusResponse, PutRequest};
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::cli::{kiln_bin, run_kiln, CLI_TIMEOUT};
use crate::port::free_port;
use crate::process::Proc;
use crate::wait::wait_for;

/// How long a stopped node may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Time for a TCP connection to one node from the test.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Time for one RPC from the test to one node.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// One `kiln` process of the cluster, running or not.
#[derive(Debug)]
struct Node {
    name: String,
    args: Vec<String>,
    data_dir: PathBuf,
    log: PathBuf,
    /// The gRPC address (`--listen`).
    addr: String,
    proc: Option<Proc>,
}

impl Node {
    /// Returns the value of `flag` on this node's command line.
    fn flag(&self, flag: &str) -> String {
        self.args
            .iter()
            .position(|arg| arg == flag)
            .and_then(|i| self.args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| panic!("{} has no {flag} flag", self.name))
    }
}

/// A cluster of `kiln` coordinators and workers on loopback ports.
///
/// Coordinators are known by id, workers by a name the test picks. Nodes keep their
/// ports and data dirs across restarts. If the test panics while the cluster is
/// alive, dropping it prints the tail of every log and keeps the temporary dir.
#[derive(Debug)]
pub struct Cluster {
    // Declared before `dir`: processes die before their data dirs are removed.
    coordinators: BTreeMap<u64, Node>,
    workers: BTreeMap<String, Node>,
    channels: Mutex<HashMap<String, Channel>>,
    bin: PathBuf,
    config: Option<PathBuf>,
    /// The cluster CA and node certificates, made with `kiln certs`.
    certs: PathBuf,
    /// The harness's own node certificate: its probes act as a cluster node.
    tls: TlsMaterial,
    /// An admin token for CLI runs, made on first use.
    admin_token: Mutex<Option<String>>,
    dir: TempDir,
}

impl Cluster {
    /// Starts coordinators 1..=`n` as a new cluster, each with `config_toml` as its
    /// `--config` file unless it is blank. Does not wait for a leader.
    pub fn start(n: u64, config_toml: &str) -> Cluster {
        assert!(n > 0, "a cluster needs at least one coordinator");
        let bin = kiln_bin();
        let dir = tempfile::Builder::new()
            .prefix("kiln-cluster-")
            .tempdir()
            .expect("create a temporary dir for the cluster");
        let config = if config_toml.trim().is_empty() {
            None
        } else {
            let path = dir.path().join("kiln.toml");
            std::fs::write(&path, config_toml).expect("write the coordinator config file");
            Some(path)
        };
        let certs = dir.path().join("certs");
        run_kiln_sync(
            &bin,
            &["certs", "init", "--dir", &certs.display().to_string()],
        );
        let tls = TlsMaterial::client(&certs.join("ca.pem")).expect("load the cluster CA");
        let mut cluster = Cluster {
            admin_token: Mutex::new(None),
            coordinators: BTreeMap::new(),
            workers: BTreeMap::new(),
            channels: Mutex::new(HashMap::new()),
            bin,
            config,
            certs,
            tls,
            dir,
        };
        cluster.node_tls_args("harness");
        cluster.tls = TlsMaterial::node(
            &cluster.certs.join("ca.pem"),
            &cluster.certs.join("harness.pem"),
            &cluster.certs.join("harness-key.pem"),
        )
        .expect("load the harness node certificate");
        let ports: Vec<(u64, u16, u16)> =
            (1..=n).map(|id| (id, free_port(), free_port())).collect();
        let peers = ports
            .iter()
            .map(|(id, port, _)| format!("{id}=127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        // Clusters of the same ports (made again by a later test) get different ids.
        let token = format!("{:016x}", rand::random::<u64>());
        for (id, port, http_port) in ports {
            let addr = format!("127.0.0.1:{port}");
            let extra = vec![
                "--peers".to_string(),
                peers.clone(),
                "--cluster-token".to_string(),
                token.clone(),
            ];
            cluster.spawn_coordinator(id, addr, http_port, extra, &["--bootstrap"]);
        }
        cluster
    }

    /// Starts coordinator `id` with `extra` flags, and `first_start` flags that
    /// this start gets and restarts do not (`--bootstrap`).
    fn spawn_coordinator(
        &mut self,
        id: u64,
        addr: String,
        http_port: u16,
        extra: Vec<String>,
        first_start: &[&str],
    ) {
        let name = format!("coordinator-{id}");
        let data_dir = self.dir.path().join(&name);
        let mut args = vec![
            "coordinator".to_string(),
            "--id".to_string(),
            id.to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--listen".to_string(),
            addr.clone(),
            "--http".to_string(),
            format!("127.0.0.1:{http_port}"),
        ];
        crate::trust(
            &format!("127.0.0.1:{http_port}"),
            &self.certs.join("ca.pem"),
        );
        args.extend(extra);
        args.extend(self.node_tls_args(&name));
        if let Some(config) = &self.config {
            args.push("--config".to_string());
            args.push(config.display().to_string());
        }
        let log = self.dir.path().join(format!("{name}.log"));
        let mut first_args = args.clone();
        first_args.extend(first_start.iter().map(|flag| flag.to_string()));
        let proc = Proc::spawn(&name, &self.bin, &first_args, &log);
        self.coordinators.insert(
            id,
            Node {
                name,
                args,
                data_dir,
                log,
                addr,
                proc: Some(proc),
            },
        );
    }

    /// Returns the temporary dir that holds data dirs, logs and the config file.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Starts 3 coordinators (with `config`) and the named workers (each with
    /// `worker_args`), and waits until a leader is known and every worker is
    /// alive.
    pub async fn start_with_workers(
        config: &str,
        workers: &[&str],
        worker_args: &[&str],
    ) -> Cluster {
        let mut cluster = Cluster::start(3, config);
        cluster.wait_for_leader(Duration::from_secs(20)).await;
        cluster.wait_for_agreement(Duration::from_secs(10)).await;
        for name in workers {
            cluster.start_worker_with(name, worker_args);
        }
        let want = workers.len();
        wait_for(Duration::from_secs(30), "workers alive", || {
            let cluster = &cluster;
            async move {
                let status = cluster.run_cli(&["status", "--json"]).await;
                let status: serde_json::Value =
                    serde_json::from_slice(&status.stdout).map_err(|e| e.to_string())?;
                let alive = status["workers"]
                    .as_array()
                    .map_or(0, |w| w.iter().filter(|w| w["state"] == "alive").count());
                if alive < want {
                    return Err(format!("{alive} worker(s) alive"));
                }
                Ok(())
            }
        })
        .await;
        cluster
    }

    /// Returns the ids of all coordinators ever started, running or not.
    pub fn coordinator_ids(&self) -> Vec<u64> {
        self.coordinators.keys().copied().collect()
    }

    /// Returns the ids of the coordinators whose process runs.
    pub fn live_ids(&self) -> Vec<u64> {
        self.coordinators
            .iter()
            .filter(|(_, node)| node.proc.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Returns the gRPC address of coordinator `id`.
    pub fn addr(&self, id: u64) -> String {
        self.coordinator(id).addr.clone()
    }

    /// Returns the gRPC addresses of the running coordinators.
    pub fn live_addrs(&self) -> Vec<String> {
        self.live_ids()
            .into_iter()
            .map(|id| self.addr(id))
            .collect()
    }

    /// Returns the data dir of coordinator `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.coordinator(id).data_dir.clone()
    }

    fn coordinator(&self, id: u64) -> &Node {
        self.coordinators
            .get(&id)
            .unwrap_or_else(|| panic!("no coordinator {id} in this cluster"))
    }

    fn coordinator_mut(&mut self, id: u64) -> &mut Node {
        self.coordinators
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no coordinator {id} in this cluster"))
    }

    /// Crashes coordinator `id` with SIGKILL.
    pub fn kill(&mut self, id: u64) {
        let node = self.coordinator_mut(id);
        let proc = node
            .proc
            .take()
            .unwrap_or_else(|| panic!("kill {}: it is not running", node.name));
        proc.kill();
    }

    /// Stops coordinator `id` with SIGTERM and waits for it to exit; panics if it
    /// takes longer than 10 s. Returns its exit status.
    pub async fn stop(&mut self, id: u64) -> ExitStatus {
        let node = self.coordinator_mut(id);
        let proc = node
            .proc
            .take()
            .unwrap_or_else(|| panic!("stop {}: it is not running", node.name));
        proc.terminate(STOP_GRACE).await
    }

    /// Waits up to `timeout` for coordinator `id` to exit on its own and returns
    /// its exit status; panics with its log if it still runs then.
    pub async fn expect_exit(&mut self, id: u64, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let node = self.coordinator_mut(id);
            let proc = node
                .proc
                .as_mut()
                .unwrap_or_else(|| panic!("{} is not running", node.name));
            if let Some(status) = proc.exited() {
                node.proc = None;
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "coordinator {id} still runs {timeout:?} after its start; its log:\n{}",
                    self.coordinator_log(id)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A running coordinator other than `leader`.
    pub fn follower_of(&self, leader: u64) -> u64 {
        self.live_ids()
            .into_iter()
            .find(|&id| id != leader)
            .unwrap_or_else(|| panic!("no running coordinator besides {leader}"))
    }

    /// The log of coordinator `id`, as written so far.
    pub fn coordinator_log(&self, id: u64) -> String {
        std::fs::read_to_string(&self.coordinator(id).log).unwrap_or_default()
    }

    /// Starts coordinator `id` again with the same flags and data dir.
    pub fn restart(&mut self, id: u64) {
        self.restart_with(id, &[]);
    }

    /// Starts coordinator `id` again with the same flags and data dir, and
    /// `extra` flags for this start only.
    pub fn restart_with(&mut self, id: u64, extra: &[&str]) {
        let bin = self.bin.clone();
        let node = self.coordinator_mut(id);
        assert!(
            node.proc.is_none(),
            "restart {}: it is still running",
            node.name
        );
        let mut args = node.args.clone();
        args.extend(extra.iter().map(|flag| flag.to_string()));
        node.proc = Some(Proc::spawn(&node.name, &bin, &args, &node.log));
    }

    /// Starts coordinator `id` as a new node that joins the running cluster through
    /// the first running coordinator (`--join`).
    pub fn add_coordinator(&mut self, id: u64) {
        assert!(
            !self.coordinators.contains_key(&id),
            "coordinator {id} already exists"
        );
        let via = self
            .live_addrs()
            .into_iter()
            .next()
            .expect("a running coordinator to join through");
        let addr = format!("127.0.0.1:{}", free_port());
        self.spawn_coordinator(id, addr, free_port(), vec!["--join".to_string(), via], &[]);
    }

    /// Starts a worker called `name` against the running coordinators.
    pub fn start_worker(&mut self, name: &str) {
        self.start_worker_with(name, &[]);
    }

    /// Starts worker `name` with `extra` flags after the usual ones.
    pub fn start_worker_with(&mut self, name: &str, extra: &[&str]) {
        assert!(
            !self.workers.contains_key(name),
            "worker {name} already exists"
        );
        let coordinators = self.live_addrs().join(",");
        assert!(
            !coordinators.is_empty(),
            "a worker needs a running coordinator"
        );
        let data_dir = self.dir.path().join(format!("worker-{name}"));
        let addr = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        crate::trust(&http, &self.certs.join("ca.pem"));
        let args = vec![
            "worker".to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--coordinators".to_string(),
            coordinators,
            "--listen".to_string(),
            addr.clone(),
            "--http".to_string(),
            http,
            "--inference-grpc".to_string(),
            format!("127.0.0.1:{}", free_port()),
        ];
        let full_name = format!("worker-{name}");
        let mut args = args;
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(self.node_tls_args(&full_name));
        let log = self.dir.path().join(format!("{full_name}.log"));
        let proc = Proc::spawn(&full_name, &self.bin, &args, &log);
        self.workers.insert(
            name.to_string(),
            Node {
                name: full_name,
                args,
                data_dir,
                log,
                addr,
                proc: Some(proc),
            },
        );
    }

    fn worker(&self, name: &str) -> &Node {
        self.workers
            .get(name)
            .unwrap_or_else(|| panic!("no worker {name} in this cluster"))
    }

    fn worker_mut(&mut self, name: &str) -> &mut Node {
        self.workers
            .get_mut(name)
            .unwrap_or_else(|| panic!("no worker {name} in this cluster"))
    }

    /// Crashes worker `name` with SIGKILL.
    pub fn kill_worker(&mut self, name: &str) {
        let node = self.worker_mut(name);
        let proc = node
            .proc
            .take()
            .unwrap_or_else(|| panic!("kill {}: it is not running", node.name));
        proc.kill();
    }

    /// Freezes worker `name` (SIGSTOP) until [`Cluster::resume_worker`].
    pub fn pause_worker(&self, name: &str) {
        self.running_worker(name).pause();
    }

    /// Lets a frozen worker `name` run again (SIGCONT).
    pub fn resume_worker(&self, name: &str) {
        self.running_worker(name).resume();
    }

    fn running_worker(&self, name: &str) -> &Proc {
        self.worker(name)
            .proc
            .as_ref()
            .unwrap_or_else(|| panic!("worker {name} is not running"))
    }

    /// Returns what worker `name` has logged so far.
    pub fn worker_log(&self, name: &str) -> String {
        std::fs::read_to_string(&self.worker(name).log).unwrap_or_default()
    }

    /// Starts worker `name` again with the same flags and data dir.
    pub fn restart_worker(&mut self, name: &str) {
        let bin = self.bin.clone();
        let node = self.worker_mut(name);
        assert!(
            node.proc.is_none(),
            "restart {}: it is still running",
            node.name
        );
        node.proc = Some(Proc::spawn(&node.name, &bin, &node.args, &node.log));
    }

    /// Returns the gRPC address of worker `name`.
    pub fn worker_addr(&self, name: &str) -> String {
        self.worker(name).addr.clone()
    }

    /// Returns the value of `flag` on worker `name`'s command line.
    pub fn worker_flag(&self, name: &str, flag: &str) -> String {
        self.worker(name).flag(flag)
    }

    /// Returns the HTTP address (`--http`) of coordinator `id`.
    pub fn http_addr(&self, id: u64) -> String {
        self.coordinators
            .get(&id)
            .unwrap_or_else(|| panic!("no coordinator {id} in this cluster"))
            .flag("--http")
    }

    /// Returns the id worker `name` keeps in `DATA_DIR/worker-id`, once written.
    pub fn worker_id(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.worker(name).data_dir.join("worker-id"))
            .ok()
            .map(|text| text.trim().to_string())
            .filter(|id| !id.is_empty())
    }

    /// Returns a gRPC client of coordinator `id` (connected lazily, shared channel).
    pub fn client(&self, id: u64) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel(&self.addr(id)))
    }

    /// Returns a client of worker `name`'s chunk service, as a cluster node.
    pub fn blobs_client(&self, name: &str) -> BlobsClient<Channel> {
        BlobsClient::new(self.channel(&self.worker_addr(name)))
    }

    /// Returns the shared channel to `addr`, with the harness's node certificate.
    fn channel(&self, addr: &str) -> Channel {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        channels
            .entry(addr.to_string())
            .or_insert_with(|| {
                kiln_common::tls::endpoint(addr, Some(&self.tls), CONNECT_TIMEOUT)
                    .expect("a loopback address is a valid endpoint")
                    .timeout(RPC_TIMEOUT)
                    .connect_lazy()
            })
            .clone()
    }

    /// Returns a [`ClusterClient`] of the running coordinators with default options.
    pub fn cluster_client(&self) -> Arc<ClusterClient> {
        self.cluster_client_with(self.client_options())
    }

    /// Returns default client options that trust this cluster's CA and present the
    /// harness's node certificate.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            tls: Some(self.tls.clone()),
            ..ClientOptions::default()
        }
    }

    /// Returns the directory of the cluster CA (`ca.pem`) and node certificates.
    pub fn certs_dir(&self) -> &Path {
        &self.certs
    }

    /// Returns the cluster's temporary directory: data dirs, logs, certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the path of the kiln binary the cluster runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Issues a certificate for node `name` from the cluster CA (once), and returns
    /// the flags that hand it to a node.
    fn node_tls_args(&self, name: &str) -> Vec<String> {
        let cert = self.certs.join(format!("{name}.pem"));
        if !cert.exists() {
            run_kiln_sync(
                &self.bin,
                &[
                    "certs",
                    "issue",
                    "--dir",
                    &self.certs.display().to_string(),
                    "--node",
                    name,
                    "--san",
                    "127.0.0.1,localhost",
                ],
            );
        }
        vec![
            "--tls-ca".to_string(),
            self.certs.join("ca.pem").display().to_string(),
            "--tls-cert".to_string(),
            cert.display().to_string(),
            "--tls-key".to_string(),
            self.certs
                .join(format!("{name}-key.pem"))
                .display()
                .to_string(),
        ]
    }

    /// Returns a [`ClusterClient`] of the running coordinators.
    pub fn cluster_client_with(&self, options: ClientOptions) -> Arc<ClusterClient> {
        Arc::new(
            ClusterClient::new(self.live_addrs(), options)
                .expect("a cluster client needs a running coordinator"),
        )
    }

    /// Returns coordinator `id`'s own view of Raft.
    pub async fn node_status(&self, id: u64) -> Result<NodeStatusResponse, tonic::Status> {
        self.client(id)
            .node_status(NodeStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
    }

    /// Writes `key` through coordinator `id` (a follower forwards it) and returns the
    /// log index.
    pub async fn put(&self, id: u64, key: &str, value: &str) -> Result<u64, tonic::Status> {
        self.client(id)
            .put(PutRequest {
                key: key.to_string(),
                value: value.as_bytes().to_vec(),
            })
            .await
            .map(|r| r.into_inner().index)
    }

    /// Reads `key` through coordinator `id`: linearizably, or from its applied state
    /// when `stale`. Returns `None` when the key is absent.
    pub async fn get(
        &self,
        id: u64,
        key: &str,
        stale: bool,
    ) -> Result<Option<String>, tonic::Status> {
        let response = self
            .client(id)
            .get(GetRequest {
                key: key.to_string(),
                stale,
            })
            .await?
            .into_inner();
        Ok(response
            .found
            .then(|| String::from_utf8_lossy(&response.value).into_owned()))
    }

    /// Waits until a leader is established: a running node says it leads at some
    /// term, and a majority of its voters (itself included) name it at that term.
    /// Returns `(leader_id, term)`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> (u64, u64) {
        let this = self;
        wait_for(
            timeout,
            "a leader backed by a majority",
            move || async move {
                let mut statuses = Vec::new();
                let mut seen = Vec::new();
                for id in this.live_ids() {
                    match this.node_status(id).await {
                        Ok(status) => {
                            seen.push(format!(
                                "{id}: {} term {} leader {}",
                                status.role, status.term, status.leader_id
                            ));
                            statuses.push(status);
                        }
                        Err(e) => seen.push(format!("{id}: {}", e.message())),
                    }
                }
                for leader in statuses.iter().filter(|s| s.role == "leader") {
                    let backers = statuses
                        .iter()
                        .filter(|s| {
                            leader.voters.contains(&s.id)
                                && s.leader_id == leader.id
                                && s.term == leader.term
                        })
                        .count();
                    if backers > leader.voters.len() / 2 {
                        return Ok((leader.id, leader.term));
                    }
                }
                Err(seen.join("; "))
            },
        )
        .await
    }

    /// Waits until every running coordinator names the same leader at the same term
    /// (a majority knows first; a follower learns at the leader's first message).
    /// Returns their statuses, in id order.
    pub async fn wait_for_agreement(&self, timeout: Duration) -> Vec<NodeStatusResponse> {
        let this = self;
        wait_for(
            timeout,
            "every node to name the same leader",
            move || async move {
                let mut statuses = Vec::new();
                for id in this.live_ids() {
                    let status = this
                        .node_status(id)
                        .await
                        .map_err(|e| format!("{id}: {}", e.message()))?;
                    statuses.push(status);
                }
                let first = statuses.first().ok_or("no running coordinator")?;
                let agree = statuses
                    .iter()
                    .all(|s| s.leader_id == first.leader_id && s.term == first.term);
                if agree && first.leader_id != 0 {
                    Ok(statuses)
                } else {
                    Err(statuses
                        .iter()
                        .map(|s| {
                            format!(
                                "{}: {} term {} leader {}",
                                s.id, s.role, s.term, s.leader_id
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "))
                }
            },
        )
        .await
    }

    /// Waits until coordinators `ids` have applied everything they know committed and
    /// agree on the applied index; returns it.
    pub async fn wait_converged(&self, ids: &[u64], timeout: Duration) -> u64 {
        let this = self;
        wait_for(
            timeout,
            "the nodes to apply the same index",
            move || async move {
                let mut applied = Vec::new();
                let mut seen = Vec::new();
                for &id in ids {
                    let status = this
                        .node_status(id)
                        .await
                        .map_err(|e| format!("{id}: {}", e.message()))?;
                    seen.push(format!(
                        "{id}: commit {} applied {}",
                        status.commit_index, status.applied_index
                    ));
                    if status.applied_index != status.commit_index {
                        return Err(seen.join("; "));
                    }
                    applied.push(status.applied_index);
                }
                match applied.first() {
                    Some(&first) if applied.iter().all(|&a| a == first) => Ok(first),
                    _ => Err(seen.join("; ")),
                }
            },
        )
        .await
    }

    /// Returns an admin token, made on first use through a node connection, the
    /// way an operator holding the CA bootstraps one.
    pub async fn admin_token(&self) -> String {
        if let Some(token) = self
            .admin_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return token;
        }
        let token = self
            .create_token("harness-admin", kiln_proto::v1::Role::Admin, 0)
            .await;
        *self.admin_token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        token
    }

    /// Creates a token as a cluster node and returns its bearer text; 0 never
    /// expires.
    pub async fn create_token(
        &self,
        name: &str,
        role: kiln_proto::v1::Role,
        expires_in_ms: u64,
    ) -> String {
        self.cluster_client()
            .call(|mut c| {
                let name = name.to_string();
                async move {
                    c.create_token(kiln_proto::v1::CreateTokenRequest {
                        name,
                        role: role as i32,
                        expires_in_ms,
                    })
                    .await
                    .map(|r| r.into_inner())
                }
            })
            .await
            .unwrap_or_else(|e| panic!("create token {name}: {e}"))
            .token
    }

    /// Runs `kiln --coordinator <running coordinators> --ca <CA> --token <admin>
    /// args...`.
    pub async fn run_cli(&self, args: &[&str]) -> Output {
        let global = self.cli_args().await;
        let mut full: Vec<&str> = global.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        run_kiln(&full, CLI_TIMEOUT).await
    }

    /// Runs a CLI command like [`Cluster::run_cli`] that must succeed; returns its
    /// standard output (a failure panics with its standard error).
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.run_cli(args).await;
        assert!(
            out.status.success(),
            "kiln {}: {}",
            args.join(" "),
            crate::stderr_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Pushes `path` as a version of artifact `name`, again until it is taken:
    /// a worker that has just come alive may not know the token yet.
    pub async fn push_when_taken(&self, path: &Path, name: &str) {
        let path = path.display().to_string();
        crate::wait_for(
            Duration::from_secs(30),
            "workers that take the artifact",
            || {
                let path = path.clone();
                async move {
                    let push = self
                        .run_cli(&["artifact", "push", &path, "--name", name, "--json"])
                        .await;
                    push.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| crate::stderr_text(&push))
                }
            },
        )
        .await;
    }

    /// Writes `text` to `path` and submits it with `kiln train submit`;
    /// returns the job id.
    pub async fn submit_job(&self, path: &Path, text: &str) -> u64 {
        std::fs::write(path, text).expect("write spec");
        let shown = path.display().to_string();
        let out = self.cli_ok(&["train", "submit", &shown, "--json"]).await;
        let doc: serde_json::Value = serde_json::from_str(&out).expect("submit --json prints JSON");
        doc["job_id"].as_u64().expect("a job id")
    }

    /// `kiln jobs show JOB --json`.
    pub async fn job(&self, job: u64) -> serde_json::Value {
        let text = self
            .cli_ok(&["jobs", "show", &job.to_string(), "--json"])
            .await;
        serde_json::from_str(&text).expect("jobs show --json prints JSON")
    }

    /// The CPU cores of the first worker `kiln status` lists.
    pub async fn worker_cores(&self) -> u32 {
        let status: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["status", "--json"]).await)
                .expect("status --json prints JSON");
        status["workers"][0]["resources"]["cpu_cores"]
            .as_u64()
            .expect("cores") as u32
    }

    /// Runs a CLI command like [`Cluster::run_cli`], within `timeout`, and returns
    /// its peak resident memory in bytes too.
    pub async fn run_cli_measured(&self, args: &[&str], timeout: Duration) -> (Output, u64) {
        let global = self.cli_args().await;
        let mut full: Vec<&str> = global.iter().map(String::as_str).collect();
        full.extend_from_slice(args);
        crate::cli::run_kiln_measured(&full, timeout).await
    }

    /// The global flags that point the CLI at this cluster as its admin.
    async fn cli_args(&self) -> Vec<String> {
        vec![
            "--coordinator".into(),
            self.live_addrs().join(","),
            "--ca".into(),
            self.certs.join("ca.pem").display().to_string(),
            "--token".into(),
            self.admin_token().await,
        ]
    }

    /// Returns the peak resident memory (VmHWM) of running worker `name`, in bytes.
    pub fn worker_peak_rss(&self, name: &str) -> u64 {
        let pid = self.running_worker(name).pid();
        crate::cli::peak_rss(pid).unwrap_or_else(|| panic!("read the memory of worker {name}"))
    }

    fn all_nodes(&self) -> impl Iterator<Item = &Node> {
        self.coordinators.values().chain(self.workers.values())
    }

    /// Prints the last lines of every node's log to stderr.
    pub fn dump_logs(&self) {
        for node in self.all_nodes() {
            let text = std::fs::read_to_string(&node.log).unwrap_or_else(|e| format!("({e})"));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "----- {} ({}), last {} lines of {}",
                node.name,
                if node.proc.is_some() {
                    "running"
                } else {
                    "not running"
                },
                tail.len(),
                node.log.display()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }

    /// Panics if any node has exited on its own, or if any log shows a panic.
    pub fn assert_healthy(&mut self) {
        let mut problems = Vec::new();
        for node in self
            .coordinators
            .values_mut()
            .chain(self.workers.values_mut())
        {
            if let Some(proc) = node.proc.as_mut() {
                if let Some(status) = proc.exited() {
                    problems.push(format!("{} exited on its own: {status}", node.name));
                }
            }
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            if text.contains("panicked") {
                problems.push(format!(
                    "{} panicked (see {})",
                    node.name,
                    node.log.display()
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "unhealthy nodes: {}",
            problems.join("; ")
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            self.dir.disable_cleanup(true);
            eprintln!(
                "----- kept the cluster's dir for inspection: {}",
                self.dir.path().display()
            );
        }
    }
}

/// The worker of each shard of a job as `kiln jobs show --json` prints it, in
/// the order listed.
pub fn shard_workers(job: &serde_json::Value) -> Vec<&str> {
    job["shards"]
        .as_array()
        .expect("the job lists its shards")
        .iter()
        .map(|s| s["worker_id"].as_str().expect("a shard's worker"))
        .collect()
}

/// Runs the kiln binary to completion and panics with its stderr if it fails.
pub fn run_kiln_sync(bin: &Path, args: &[&str]) {
    let out = std::process::Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run kiln {args:?}: {e}"));
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
