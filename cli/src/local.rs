//! `kiln local`: a whole cluster as background processes on this machine.
//!
//! `up` starts every coordinator and worker as a child of the running `kiln` binary,
//! each in its own process group (so that Ctrl-C in the starting terminal does not
//! reach it), with its data in `DIR/<name>` and its output appended to
//! `DIR/logs/<name>.log`. It records what it started in `DIR/cluster.json`, which
//! `down`, `kiln status` and the other commands read.
//!
//! ```text
//!   up:  check DIR/cluster.json ──► check ports free ──► spawn coordinators
//!        ──► spawn workers ──► write cluster.json ──► poll ClusterStatus until a
//!        leader is known and every worker is ALIVE (30 s) ──► rewrite cluster.json
//!        with worker ids
//!        (any failure: SIGKILL everything started, remove cluster.json)
//!  down: SIGTERM every recorded pid ──► wait 10 s ──► SIGKILL survivors
//!        ──► remove cluster.json
//! ```
//!
//! Data dirs are kept across `down` and `up`: a cluster started again in the same
//! DIR recovers its state. Delete DIR to start empty.
//!
//! Port layout, derived from `base_port` B (default 7070, so that coordinator 1 has
//! the default ports of DESIGN §7):
//!
//! ```text
//!   node                 gRPC          HTTP                inference gRPC
//!   coordinator i (1-9)  B + i - 1     B + 10 + i - 1      -
//!   worker j (1-99)      B + 20 + j-1  B + 930 + 2(j-1)    B + 931 + 2(j-1)
//!
//!   B = 7070: coordinators 7070, 7071, ... with HTTP 7080, 7081, ...;
//!             workers 7090, 7091, ... with inference HTTP 8000, 8002, ...
//!             and inference gRPC 8001, 8003, ...
//! ```
//!
//! A worker's HTTP port serves inference (Open Inference Protocol) and `/metrics`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kiln_common::client::{ClientOptions, ClusterClient};
use kiln_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, WorkerState};
use serde::{Deserialize, Serialize};

/// Name of the file that records a running local cluster.
pub const CLUSTER_FILE: &str = "cluster.json";
/// Name of the coordinator configuration file written from
/// [`LocalOptions::coordinator_config`].
pub const COORDINATOR_CONFIG_FILE: &str = "coordinator.toml";
/// Most coordinators a local cluster runs.
pub const MAX_COORDINATORS: usize = 9;
/// Most workers a local cluster runs.
pub const MAX_WORKERS: usize = 99;
/// Time `up` waits for a leader and for every worker to be ALIVE.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness polls.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Time `down` grants processes to stop after SIGTERM before it sends SIGKILL.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a process gets to disappear after SIGKILL.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two checks of whether processes have exited.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of a log shown when a process exits during `up`.
const LOG_TAIL_LINES: usize = 20;

/// Signal numbers used here (POSIX values, re-exported for the bench).
pub(crate) const SIGKILL: i32 = libc::SIGKILL;
pub(crate) const SIGTERM: i32 = libc::SIGTERM;

/// What `kiln local up` starts.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Number of coordinators (1 to 9).
    pub coordinators: usize,
    /// Number of workers (0 to 99).
    pub workers: usize,
    /// Directory that holds data, logs and `cluster.json`.
    pub dir: PathBuf,
    /// First port of the layout described in the module documentation.
    pub base_port: u16,
    /// TOML text written to `DIR/coordinator.toml` and passed as `--config`.
    pub coordinator_config: Option<String>,
    /// Runs without TLS; otherwise a cluster CA and node certificates are made
    /// under `DIR/certs` (and kept for the next `up`).
    pub insecure: bool,
    /// Extra flags for every worker (e.g. `--telemetry-interval-ms 1000`).
    pub worker_args: Vec<String>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            coordinators: 3,
            workers: 2,
            dir: PathBuf::from(".kiln"),
            base_port: 7070,
            coordinator_config: None,
            insecure: false,
            worker_args: Vec::new(),
        }
    }
}

/// One process of a local cluster, as recorded in `cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `coordinator-<i>` or `worker-<j>`.
    pub name: String,
    /// The coordinator's Raft id, or the id a worker registered under (empty until
    /// it has registered).
    pub id: String,
    /// gRPC address.
    pub addr: String,
    /// HTTP address: REST and `/metrics` on a coordinator, inference on a worker.
    pub http_addr: String,
    /// Inference gRPC address (workers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_grpc_addr: Option<String>,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Arguments after the program, so that the node can be restarted as it was.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Everything a local cluster runs, as recorded in `cluster.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub coordinators: Vec<NodeInfo>,
    pub workers: Vec<NodeInfo>,
    /// The cluster CA that clients verify coordinators with; `None` when insecure.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// File (mode 0600) holding an admin token; `None` when insecure.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Returns the TLS settings that verify the local cluster's nodes (its CA);
/// `None` for an insecure cluster.
pub fn client_tls(info: &ClusterInfo) -> anyhow::Result<Option<kiln_common::tls::TlsMaterial>> {
    match &info.ca {
        Some(ca) => Ok(Some(kiln_common::tls::TlsMaterial::client(ca)?)),
        None => Ok(None),
    }
}

/// Returns a client of the cluster's coordinators that acts as its admin (the
/// CA of `info`, and the token of `options` or else `info`'s admin token), with
/// the other settings of `options`.
pub fn admin_client(info: &ClusterInfo, options: ClientOptions) -> anyhow::Result<ClusterClient> {
    let token = match options.token.clone() {
        Some(token) => Some(token),
        None => read_token(info)?,
    };
    Ok(ClusterClient::new(
        info.coordinator_addrs(),
        ClientOptions {
            tls: client_tls(info)?,
            token,
            ..options
        },
    )?)
}

/// Reads the local cluster's admin token, if it has one.
pub fn read_token(info: &ClusterInfo) -> anyhow::Result<Option<String>> {
    match &info.token_file {
        Some(path) => Ok(Some(
            fs::read_to_string(path)
                .with_context(|| format!("read token file {}", path.display()))?
                .trim()
                .to_string(),
        )),
        None => Ok(None),
    }
}

impl ClusterInfo {
    /// Returns the gRPC addresses of the coordinators.
    pub fn coordinator_addrs(&self) -> Vec<String> {
        self.coordinators.iter().map(|n| n.addr.clone()).collect()
    }

    /// Returns every node, coordinators first.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.coordinators.iter().chain(self.workers.iter())
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut NodeInfo> {
        self.coordinators
            .iter_mut()
            .chain(self.workers.iter_mut())
            .find(|n| n.name == name)
    }
}

/// gRPC and HTTP ports of coordinator `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CoordinatorPorts {
    grpc: u16,
    http: u16,
}

/// Ports of worker `j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WorkerPorts {
    grpc: u16,
    inference_http: u16,
    inference_grpc: u16,
}

fn port(base: u16, offset: usize) -> anyhow::Result<u16> {
    usize::from(base)
        .checked_add(offset)
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("compute port {base} + {offset}: beyond 65535"))
}

/// Returns the ports of coordinator `i` (1-based).
fn coordinator_ports(base: u16, i: usize) -> anyhow::Result<CoordinatorPorts> {
    Ok(CoordinatorPorts {
        grpc: port(base, i - 1)?,
        http: port(base, 10 + i - 1)?,
    })
}

/// Returns the ports of worker `j` (1-based).
fn worker_ports(base: u16, j: usize) -> anyhow::Result<WorkerPorts> {
    Ok(WorkerPorts {
        grpc: port(base, 20 + j - 1)?,
        inference_http: port(base, 930 + 2 * (j - 1))?,
        inference_grpc: port(base, 931 + 2 * (j - 1))?,
    })
}

/// One node to start: its record and where it listens.
struct Plan {
    node: NodeInfo,
    ports: Vec<(u16, &'static str)>,
}

/// Directory of the local cluster's CA and node certificates.
const CERTS_DIR: &str = "certs";

/// Returns the TLS flags of node `name`: its certificate from `DIR/certs`, or
/// `--insecure`.
fn tls_args(opts: &LocalOptions, dir: &Path, name: &str) -> Vec<String> {
    if opts.insecure {
        return vec!["--insecure".to_string()];
    }
    let certs = dir.join(CERTS_DIR);
    vec![
        "--tls-ca".to_string(),
        certs.join(crate::certs::CA_CERT).display().to_string(),
        "--tls-cert".to_string(),
        certs.join(format!("{name}.pem")).display().to_string(),
        "--tls-key".to_string(),
        certs.join(format!("{name}-key.pem")).display().to_string(),
    ]
}

/// Makes the cluster CA and each node's certificate when missing; returns the CA.
fn ensure_certs(dir: &Path, names: &[String]) -> anyhow::Result<PathBuf> {
    let certs = dir.join(CERTS_DIR);
    let ca = certs.join(crate::certs::CA_CERT);
    if !ca.exists() {
        crate::certs::init(&certs).context("make the local cluster CA")?;
    }
    let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    for name in names {
        if !certs.join(format!("{name}.pem")).exists() {
            crate::certs::issue(&certs, name, &sans)
                .with_context(|| format!("issue the certificate of {name}"))?;
        }
    }
    Ok(ca)
}

/// Lays out names, ports, paths and arguments of every node.
fn plan(opts: &LocalOptions, dir: &Path) -> anyhow::Result<Vec<Plan>> {
    if opts.coordinators == 0 || opts.coordinators > MAX_COORDINATORS {
        bail!(
            "check options: coordinators must be 1 to {MAX_COORDINATORS}, got {}",
            opts.coordinators
        );
    }
    if opts.workers > MAX_WORKERS {
        bail!(
            "check options: workers must be 0 to {MAX_WORKERS}, got {}",
            opts.workers
        );
    }
    let logs = dir.join("logs");
    let mut coordinator_ports_list = Vec::with_capacity(opts.coordinators);
    for i in 1..=opts.coordinators {
        coordinator_ports_list.push(coordinator_ports(opts.base_port, i)?);
    }
    let peers = coordinator_ports_list
        .iter()
        .enumerate()
        .map(|(k, p)| format!("{}=127.0.0.1:{}", k + 1, p.grpc))
        .collect::<Vec<_>>()
        .join(",");
    let coordinator_addrs = coordinator_ports_list
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.grpc))
        .collect::<Vec<_>>()
        .join(",");
    let config = dir.join(COORDINATOR_CONFIG_FILE);
    // A cluster made again in the same ports gets another id, so that a node
    // left over from the last one cannot take part in this one.
    let cluster_token = format!("{:016x}", rand::random::<u64>());

    let mut plans = Vec::with_capacity(opts.coordinators + opts.workers);
    for (k, ports) in coordinator_ports_list.iter().enumerate() {
        let i = k + 1;
        let name = format!("coordinator-{i}");
        let data_dir = dir.join(&name);
        let addr = format!("127.0.0.1:{}", ports.grpc);
        let http_addr = format!("127.0.0.1:{}", ports.http);
        let mut args = vec![
            "coordinator".to_string(),
            "--id".to_string(),
            i.to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--listen".to_string(),
            addr.clone(),
            "--http".to_string(),
            http_addr.clone(),
            "--peers".to_string(),
            peers.clone(),
            "--cluster-token".to_string(),
            cluster_token.clone(),
        ];
        if opts.coordinator_config.is_some() {
            args.push("--config".to_string());
            args.push(config.display().to_string());
        }
        args.extend(tls_args(opts, dir, &name));
        plans.push(Plan {
            node: NodeInfo {
                log: logs.join(format!("{name}.log")),
                name,
                id: i.to_string(),
                addr,
                http_addr,
                inference_grpc_addr: None,
                pid: 0,
                data_dir,
                args,
            },
            ports: vec![(ports.grpc, "gRPC"), (ports.http, "HTTP")],
        });
    }
    for j in 1..=opts.workers {
        let ports = worker_ports(opts.base_port, j)?;
        let name = format!("worker-{j}");
        let data_dir = dir.join(&name);
        let addr = format!("127.0.0.1:{}", ports.grpc);
        let http_addr = format!("127.0.0.1:{}", ports.inference_http);
        let inference_grpc_addr = format!("127.0.0.1:{}", ports.inference_grpc);
        let args = vec![
            "worker".to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--coordinators".to_string(),
            coordinator_addrs.clone(),
            "--listen".to_string(),
            addr.clone(),
            "--http".to_string(),
            http_addr.clone(),
            "--inference-grpc".to_string(),
            inference_grpc_addr.clone(),
        ];
        let mut args = args;
        args.extend(opts.worker_args.iter().cloned());
        args.extend(tls_args(opts, dir, &name));
        plans.push(Plan {
            node: NodeInfo {
                log: logs.join(format!("{name}.log")),
                name,
                id: String::new(),
                addr,
                http_addr,
                inference_grpc_addr: Some(inference_grpc_addr),
                pid: 0,
                data_dir,
                args,
            },
            ports: vec![
                (ports.grpc, "gRPC"),
                (ports.inference_http, "inference HTTP"),
                (ports.inference_grpc, "inference gRPC"),
            ],
        });
    }
    Ok(plans)
}

/// Fails, naming the first port, when one of `ports` cannot be bound on loopback.
pub(crate) fn ensure_ports_free(
    ports: impl IntoIterator<Item = (u16, String)>,
) -> anyhow::Result<()> {
    for (port, what) in ports {
        TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("bind port {port} ({what}): it is in use or not allowed"))?;
    }
    Ok(())
}

/// Whether `up` leaves its processes in their own process groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detach {
    /// Own process group: the processes outlive the terminal's Ctrl-C.
    Yes,
    /// The caller's process group: Ctrl-C reaches them too (the bench).
    No,
}

/// Starts `program args`, with stdin closed and stdout and stderr appended to `log`.
pub(crate) fn spawn_process(
    program: &Path,
    args: &[String],
    log: &Path,
    detach: Detach,
) -> anyhow::Result<Child> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open log {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("open log {}", log.display()))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if detach == Detach::Yes {
        command.process_group(0);
    }
    command
        .spawn()
        .with_context(|| format!("start {} {}", program.display(), args.join(" ")))
}

/// Sends `signal` to `pid`; signal 0 only checks that the process exists.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pid <= 0 {
        // 0 and negative pids address process groups; never signal those by accident.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "pid must be positive",
        ));
    }
    // SAFETY: kill(2) takes two integers and touches no memory of this process; a
    // positive pid addresses exactly one process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Collects the exit status of `pid` if it is an exited child of this process, so
/// that it does not linger as a zombie; does nothing otherwise.
#[allow(unsafe_code)]
fn reap(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid(2) writes one c_int through a pointer to a live local; WNOHANG
    // makes it return at once; a pid that is not our child yields ECHILD, ignored.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

/// Returns true when `pid` runs and is the process started with `marker` (a data
/// dir) on its command line, so that a recycled pid is never taken for ours. Reaps
/// `pid` when it is an exited child of this process.
pub(crate) fn is_running(pid: u32, marker: &Path) -> bool {
    if !Path::new("/proc/self/stat").exists() {
        // Without procfs, fall back on the bare existence of the pid.
        reap(pid);
        return send_signal(pid, 0).is_ok();
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((state, parent)) = parse_stat(&stat) else {
        return false;
    };
    if state == 'Z' || state == 'X' {
        reap(pid);
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline.is_empty() {
        // Between fork and exec, and while exiting, a process shows no command line;
        // it is ours only if we are its parent.
        return parent == std::process::id();
    }
    let marker = marker.as_os_str().as_bytes();
    !marker.is_empty() && cmdline.windows(marker.len()).any(|w| w == marker)
}

/// Returns the state letter and parent pid from the text of `/proc/PID/stat`.
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses, so split at the
    // last closing one.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// A process to stop: a name for messages, its pid and the marker that
/// [`is_running`] checks on its command line.
#[derive(Debug, Clone)]
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) marker: PathBuf,
}

impl From<&NodeInfo> for Proc {
    fn from(node: &NodeInfo) -> Self {
        Proc {
            name: node.name.clone(),
            pid: node.pid,
            marker: node.data_dir.clone(),
        }
    }
}

/// Waits until none of `procs` runs, or `timeout`; returns those still running.
async fn wait_exited(procs: Vec<Proc>, timeout: Duration) -> Vec<Proc> {
    let deadline = Instant::now() + timeout;
    let mut running = procs;
    loop {
        running.retain(|p| is_running(p.pid, &p.marker));
        if running.is_empty() || Instant::now() >= deadline {
            return running;
        }
        tokio::time::sleep(EXIT_POLL_INTERVAL).await;
    }
}

/// Stops `procs`: SIGTERM to those that run, SIGKILL to those alive after
/// `term_timeout`. Returns how many were running.
pub(crate) async fn stop_processes(
    procs: Vec<Proc>,
    term_timeout: Duration,
) -> anyhow::Result<usize> {
    let running: Vec<Proc> = procs
        .into_iter()
        .filter(|p| is_running(p.pid, &p.marker))
        .collect();
    let count = running.len();
    for p in &running {
        if let Err(e) = send_signal(p.pid, SIGTERM) {
            tracing::warn!(process = %p.name, pid = p.pid, error = %e, "sigterm failed");
        }
    }
    let survivors = wait_exited(running, term_timeout).await;
    for p in &survivors {
        tracing::warn!(process = %p.name, pid = p.pid, "still running after sigterm; sending sigkill");
        if let Err(e) = send_signal(p.pid, SIGKILL) {
            tracing::warn!(process = %p.name, pid = p.pid, error = %e, "sigkill failed");
        }
    }
    let stuck = wait_exited(survivors, KILL_TIMEOUT).await;
    if !stuck.is_empty() {
        let names: Vec<String> = stuck
            .iter()
            .map(|p| format!("{} (pid {})", p.name, p.pid))
            .collect();
        bail!(
            "stop processes: still running after sigkill: {}",
            names.join(", ")
        );
    }
    Ok(count)
}

/// Returns the last `lines` lines of `log`, or a note saying why there are none.
pub(crate) fn log_tail(log: &Path, lines: usize) -> String {
    match fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// Writes `info` to `DIR/cluster.json` through a temporary file and a rename, so
/// that a reader never sees half a file.
fn write_cluster(dir: &Path, info: &ClusterInfo) -> anyhow::Result<()> {
    let path = dir.join(CLUSTER_FILE);
    let tmp = dir.join(format!("{CLUSTER_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(info).context("encode cluster.json")?;
    let mut file = fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Reads the cluster recorded in `DIR/cluster.json`.
pub fn read_cluster(dir: &Path) -> anyhow::Result<ClusterInfo> {
    let path = dir.join(CLUSTER_FILE);
    let text = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))
}

fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(dir).with_context(|| format!("resolve directory {}", dir.display()))
}

/// Kills the processes `up` started unless it is disarmed: a failed `up` leaves
/// nothing behind.
struct Started {
    children: Vec<(String, Child)>,
    cluster_file: Option<PathBuf>,
    armed: bool,
}

impl Drop for Started {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for (name, child) in &mut self.children {
            if let Err(e) = child.kill() {
                tracing::debug!(node = %name, error = %e, "kill failed; process already gone");
            }
            // Reaps the child; SIGKILL cannot be ignored, so this returns promptly.
            let _ = child.wait();
        }
        if let Some(path) = &self.cluster_file {
            let _ = fs::remove_file(path);
        }
    }
}

/// Starts a local cluster as described by `opts` and waits until it serves: a
/// leader is elected and every worker is ALIVE.
pub async fn up(opts: &LocalOptions) -> anyhow::Result<ClusterInfo> {
    up_with(opts, Detach::Yes).await
}

/// Like [`up`], choosing whether the processes leave the caller's process group.
pub(crate) async fn up_with(opts: &LocalOptions, detach: Detach) -> anyhow::Result<ClusterInfo> {
    let dir = absolute(&opts.dir)?;
    if dir.join(CLUSTER_FILE).exists() {
        let old = read_cluster(&dir)?;
        let running: Vec<String> = old
            .nodes()
            .filter(|n| is_running(n.pid, &n.data_dir))
            .map(|n| format!("{} (pid {})", n.name, n.pid))
            .collect();
        if !running.is_empty() {
            bail!(
                "a local cluster is already running in {}: {}; run `kiln local down --dir {}` first",
                dir.display(),
                running.join(", "),
                opts.dir.display()
            );
        }
        tracing::info!(dir = %dir.display(), "replacing the record of a stopped cluster");
    }

    let plans = plan(opts, &dir)?;
    ensure_ports_free(plans.iter().flat_map(|p| {
        p.ports
            .iter()
            .map(|(port, kind)| (*port, format!("{} {kind}", p.node.name)))
    }))?;

    let program = std::env::current_exe().context("find the path of the kiln binary")?;
    fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("create directory {}", dir.join("logs").display()))?;
    if let Some(config) = &opts.coordinator_config {
        let path = dir.join(COORDINATOR_CONFIG_FILE);
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
    }

    let mut started = Started {
        children: Vec::with_capacity(plans.len()),
        cluster_file: Some(dir.join(CLUSTER_FILE)),
        armed: true,
    };
    let mut info = ClusterInfo::default();
    if !opts.insecure {
        let names: Vec<String> = plans.iter().map(|p| p.node.name.clone()).collect();
        info.ca = Some(ensure_certs(&dir, &names)?);
    }
    for plan in plans {
        let mut node = plan.node;
        fs::create_dir_all(&node.data_dir)
            .with_context(|| format!("create directory {}", node.data_dir.display()))?;
        // Coordinators bootstrap on this first start only: the recorded
        // arguments, which restarts use, never carry --bootstrap, so a coordinator
        // whose data dir was lost refuses to start instead of rejoining empty.
        let mut args = node.args.clone();
        if node.name.starts_with("coordinator-") {
            args.push("--bootstrap".to_string());
        }
        let child = spawn_process(&program, &args, &node.log, detach)
            .with_context(|| format!("start {}", node.name))?;
        node.pid = child.id();
        tracing::info!(node = %node.name, pid = node.pid, addr = %node.addr, "started node");
        started.children.push((node.name.clone(), child));
        if node.name.starts_with("coordinator-") {
            info.coordinators.push(node);
        } else {
            info.workers.push(node);
        }
    }
    write_cluster(&dir, &info)?;

    wait_ready(&mut info, &mut started, &dir).await?;
    if !opts.insecure {
        info.token_file = Some(ensure_admin_token(&dir, &info).await?);
        wait_workers_know_token(&info).await?;
    }
    write_cluster(&dir, &info)?;
    started.armed = false;
    Ok(info)
}

/// Longest wait for the workers to learn the admin token (a heartbeat brings it).
const TOKEN_WAIT: Duration = Duration::from_secs(15);

/// Waits until every worker takes the admin token, which it learns with a
/// heartbeat after the token is made, so that the cluster `up` hands back takes
/// pushes and pulls at once.
async fn wait_workers_know_token(info: &ClusterInfo) -> anyhow::Result<()> {
    let client = admin_client(info, ClientOptions::default())?;
    let deadline = Instant::now() + TOKEN_WAIT;
    for worker in &info.workers {
        loop {
            let probe = client
                .blobs_for(&worker.addr)?
                .has_chunks(kiln_proto::v1::HasChunksRequest { ids: Vec::new() })
                .await;
            match probe {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::Unauthenticated && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => bail!(
                    "worker {} at {} does not take the admin token: {}",
                    worker.name,
                    worker.addr,
                    kiln_common::Error::from(e)
                ),
            }
        }
    }
    Ok(())
}

/// Name of the admin token `kiln local up` makes.
const LOCAL_ADMIN_TOKEN: &str = "local-admin";
/// File that holds it, under the cluster directory.
const TOKEN_FILE: &str = "admin.token";

/// Returns TLS settings that authenticate as coordinator 1: a cluster node, which
/// may do anything, as the operator who holds the CA may.
fn node_identity(dir: &Path) -> anyhow::Result<kiln_common::tls::TlsMaterial> {
    let certs = dir.join(CERTS_DIR);
    Ok(kiln_common::tls::TlsMaterial::node(
        &certs.join(crate::certs::CA_CERT),
        &certs.join("coordinator-1.pem"),
        &certs.join("coordinator-1-key.pem"),
    )?)
}

/// Makes sure `DIR/admin.token` holds a working admin token: keeps one that the
/// cluster accepts, otherwise replaces the `local-admin` token with a new one.
async fn ensure_admin_token(dir: &Path, info: &ClusterInfo) -> anyhow::Result<PathBuf> {
    let path = dir.join(TOKEN_FILE);
    let options = |token: Option<String>, tls| ClientOptions {
        deadline: Duration::from_secs(5),
        tls: Some(tls),
        token,
        ..ClientOptions::default()
    };
    if let Ok(token) = fs::read_to_string(&path) {
        let client = ClusterClient::new(
            info.coordinator_addrs(),
            options(
                Some(token.trim().to_string()),
                kiln_common::tls::TlsMaterial::client(
                    info.ca.as_deref().context("a TLS cluster has a CA")?,
                )?,
            ),
        )?;
        let works = client
            .call(|mut c| async move {
                c.list_tokens(kiln_proto::v1::ListTokensRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await
            .is_ok();
        if works {
            return Ok(path);
        }
    }
    let node = ClusterClient::new(info.coordinator_addrs(), options(None, node_identity(dir)?))?;
    // A stale token of that name (its file lost or its cluster state gone) is revoked.
    let _ = node
        .call(|mut c| async move {
            c.revoke_token(kiln_proto::v1::RevokeTokenRequest {
                name: LOCAL_ADMIN_TOKEN.to_string(),
            })
            .await
            .map(|r| r.into_inner())
        })
        .await;
    let created = node
        .call(|mut c| async move {
            c.create_token(kiln_proto::v1::CreateTokenRequest {
                name: LOCAL_ADMIN_TOKEN.to_string(),
                role: kiln_proto::v1::Role::Admin as i32,
                expires_in_ms: 0,
            })
            .await
            .map(|r| r.into_inner())
        })
        .await
        .context("create the local admin token")?;
    let _ = fs::remove_file(&path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create token file {}", path.display()))?;
    file.write_all(created.token.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write token file {}", path.display()))?;
    Ok(path)
}

/// Polls ClusterStatus until a leader is known and every worker of `info` is ALIVE;
/// fills in worker ids. Fails early when a process exits.
async fn wait_ready(
    info: &mut ClusterInfo,
    started: &mut Started,
    dir: &Path,
) -> anyhow::Result<()> {
    // As a node: no token exists yet.
    let tls = match &info.ca {
        Some(_) => Some(node_identity(dir)?),
        None => None,
    };
    let client = ClusterClient::new(
        info.coordinator_addrs(),
        ClientOptions {
            connect_timeout: Duration::from_millis(300),
            attempt_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(1),
            tls,
            ..ClientOptions::default()
        },
    )
    .context("create coordinator client")?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut missing: Vec<String>;
    loop {
        for (name, child) in &mut started.children {
            if let Ok(Some(status)) = child.try_wait() {
                let log = info
                    .nodes()
                    .find(|n| &n.name == name)
                    .map(|n| n.log.clone())
                    .unwrap_or_default();
                bail!(
                    "start local cluster: {name} exited ({status}) during startup; last lines of {}:\n{}",
                    log.display(),
                    log_tail(&log, LOG_TAIL_LINES)
                );
            }
        }
        missing = Vec::new();
        match client
            .call(|mut c| async move {
                c.cluster_status(ClusterStatusRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await
        {
            Ok(status) => {
                missing = readiness_gaps(&status, info);
                if missing.is_empty() {
                    assign_worker_ids(&status, info);
                    tracing::info!(
                        leader = status.leader_id,
                        term = status.term,
                        "local cluster is ready"
                    );
                    return Ok(());
                }
            }
            Err(e) => missing.push(format!("cluster status unavailable ({e})")),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(READY_POLL_INTERVAL).await;
    }
    let logs = info
        .nodes()
        .map(|n| n.log.display().to_string())
        .collect::<Vec<_>>()
        .join("\n  ");
    bail!(
        "start local cluster: not ready within {} s: {}; logs:\n  {logs}",
        READY_TIMEOUT.as_secs(),
        missing.join("; ")
    )
}

fn port_of(addr: &str) -> Option<&str> {
    addr.rsplit_once(':').map(|(_, p)| p)
}

/// Returns what keeps the cluster from being ready: no leader, workers not
/// registered or not ALIVE. Workers are matched by gRPC port.
fn readiness_gaps(status: &ClusterStatusResponse, info: &ClusterInfo) -> Vec<String> {
    let mut gaps = Vec::new();
    if status.leader_id == 0 {
        gaps.push("no leader elected".to_string());
    }
    for worker in &info.workers {
        let record = status
            .workers
            .iter()
            .find(|w| port_of(&w.addr) == port_of(&worker.addr));
        match record {
            None => gaps.push(format!("{} not registered", worker.name)),
            Some(r) if r.state != WorkerState::Alive as i32 => {
                let state = WorkerState::try_from(r.state)
                    .map(|s| s.as_str_name().to_string())
                    .unwrap_or_else(|_| r.state.to_string());
                gaps.push(format!("{} is {state}", worker.name));
            }
            Some(_) => {}
        }
    }
    gaps
}

fn assign_worker_ids(status: &ClusterStatusResponse, info: &mut ClusterInfo) {
    for worker in &mut info.workers {
        if let Some(record) = status
            .workers
            .iter()
            .find(|w| port_of(&w.addr) == port_of(&worker.addr))
        {
            worker.id = record.id.clone();
        }
    }
}

/// Stops the cluster recorded in `DIR/cluster.json`: SIGTERM to every process that
/// still runs, SIGKILL to those alive after 10 s. Removes `cluster.json` and returns
/// how many processes were stopped; 0 when no cluster is recorded.
pub async fn down(dir: &Path) -> anyhow::Result<usize> {
    let dir = absolute(dir)?;
    let path = dir.join(CLUSTER_FILE);
    if !path.exists() {
        tracing::info!(dir = %dir.display(), "no local cluster recorded");
        return Ok(0);
    }
    let info = read_cluster(&dir)?;
    let stopped = stop_processes(info.nodes().map(Proc::from).collect(), STOP_TIMEOUT)
        .await
        .context("stop local cluster")?;
    fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    Ok(stopped)
}

/// Starts node `name` of the cluster recorded in `dir` again with its recorded
/// arguments (after a crash), records its new pid and returns its record.
pub(crate) fn restart_node(dir: &Path, name: &str, detach: Detach) -> anyhow::Result<NodeInfo> {
    let dir = absolute(dir)?;
    let mut info = read_cluster(&dir)?;
    let node = info
        .node_mut(name)
        .with_context(|| format!("find node {name} in {}", dir.join(CLUSTER_FILE).display()))?;
    if is_running(node.pid, &node.data_dir) {
        bail!("restart {name}: it still runs as pid {}", node.pid);
    }
    let program = std::env::current_exe().context("find the path of the kiln binary")?;
    let child = spawn_process(&program, &node.args, &node.log, detach)
        .with_context(|| format!("restart {name}"))?;
    node.pid = child.id();
    let node = node.clone();
    write_cluster(&dir, &info)?;
    tracing::info!(node = %name, pid = node.pid, "restarted node");
    Ok(node)
}

/// Prints a table of every node's endpoints, pid and log.
pub fn print_endpoints(info: &ClusterInfo) {
    let dash = || "-".to_string();
    let rows: Vec<[String; 7]> = info
        .nodes()
        .map(|n| {
            [
                n.name.clone(),
                if n.id.is_empty() {
                    dash()
                } else {
                    n.id.clone()
                },
                n.pid.to_string(),
                n.addr.clone(),
                n.http_addr.clone(),
                n.inference_grpc_addr.clone().unwrap_or_else(dash),
                n.log.display().to_string(),
            ]
        })
        .collect();
    let header = ["NAME", "ID", "PID", "GRPC", "HTTP", "INFERENCE GRPC", "LOG"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn options(coordinators: usize, workers: usize) -> LocalOptions {
        LocalOptions {
            coordinators,
            workers,
            dir: PathBuf::from("/tmp/kiln-test"),
            base_port: 7070,
            coordinator_config: Some("[raft]\ntick_ms = 50\n".into()),
            insecure: false,
            worker_args: Vec::new(),
        }
    }

    #[test]
    fn port_layout_has_no_duplicates() {
        let plans = plan(&options(5, 4), Path::new("/tmp/kiln-test")).expect("plan");
        let ports: Vec<u16> = plans
            .iter()
            .flat_map(|p| p.ports.iter().map(|(port, _)| *port))
            .collect();
        assert_eq!(ports.len(), 5 * 2 + 4 * 3);
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len(), "duplicate port in {ports:?}");
    }

    #[test]
    fn port_layout_has_no_duplicates_at_the_limits() {
        let plans = plan(
            &options(MAX_COORDINATORS, MAX_WORKERS),
            Path::new("/tmp/kiln-test"),
        )
        .expect("plan");
        let ports: Vec<u16> = plans
            .iter()
            .flat_map(|p| p.ports.iter().map(|(port, _)| *port))
            .collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn first_nodes_get_the_default_ports() {
        let c = coordinator_ports(7070, 1).expect("ports");
        assert_eq!((c.grpc, c.http), (7070, 7080));
        let w = worker_ports(7070, 1).expect("ports");
        assert_eq!(
            (w.grpc, w.inference_http, w.inference_grpc),
            (7090, 8000, 8001)
        );
    }

    #[test]
    fn plan_wires_peers_and_config() {
        let plans = plan(&options(3, 1), Path::new("/d")).expect("plan");
        let c2 = &plans[1].node;
        assert_eq!(c2.name, "coordinator-2");
        let args = c2.args.join(" ");
        assert!(args.contains("--peers 1=127.0.0.1:7070,2=127.0.0.1:7071,3=127.0.0.1:7072"));
        assert!(args.contains("--config /d/coordinator.toml"));
        let w1 = &plans[3].node;
        assert!(w1
            .args
            .join(" ")
            .contains("--coordinators 127.0.0.1:7070,127.0.0.1:7071,127.0.0.1:7072"));
        assert_eq!(w1.log, Path::new("/d/logs/worker-1.log"));
    }

    #[test]
    fn plan_rejects_bad_counts_and_ports() {
        assert!(plan(&options(0, 1), Path::new("/d")).is_err());
        assert!(plan(&options(10, 1), Path::new("/d")).is_err());
        let mut high = options(3, 2);
        high.base_port = 65_000;
        let err = match plan(&high, Path::new("/d")) {
            Ok(_) => panic!("a layout beyond port 65535 was accepted"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("65535"), "{err}");
    }

    #[test]
    fn cluster_file_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut info = ClusterInfo::default();
        for plan in plan(&options(3, 2), dir.path()).expect("plan") {
            let mut node = plan.node;
            node.pid = 4242;
            if node.name.starts_with("worker") {
                node.id = "w-1".into();
                info.workers.push(node);
            } else {
                info.coordinators.push(node);
            }
        }
        write_cluster(dir.path(), &info).expect("write");
        let back = read_cluster(dir.path()).expect("read");
        assert_eq!(back, info);
        assert_eq!(
            back.coordinator_addrs(),
            vec!["127.0.0.1:7070", "127.0.0.1:7071", "127.0.0.1:7072"]
        );
        assert!(!dir.path().join("cluster.json.tmp").exists());
    }

    #[test]
    fn readiness_names_what_is_missing() {
        let mut info = ClusterInfo::default();
        for plan in plan(&options(1, 2), Path::new("/d")).expect("plan") {
            if plan.node.name.starts_with("worker") {
                info.workers.push(plan.node);
            } else {
                info.coordinators.push(plan.node);
            }
        }
        let mut status = ClusterStatusResponse::default();
        let gaps = readiness_gaps(&status, &info);
        assert_eq!(
            gaps,
            vec![
                "no leader elected",
                "worker-1 not registered",
                "worker-2 not registered"
            ]
        );
        status.leader_id = 1;
        status.workers.push(kiln_proto::v1::WorkerRecord {
            id: "w-a".into(),
            addr: "127.0.0.1:7090".into(),
            state: WorkerState::Alive as i32,
            ..Default::default()
        });
        status.workers.push(kiln_proto::v1::WorkerRecord {
            id: "w-b".into(),
            addr: "127.0.0.1:7091".into(),
            state: WorkerState::Suspect as i32,
            ..Default::default()
        });
        assert_eq!(
            readiness_gaps(&status, &info),
            vec!["worker-2 is WORKER_STATE_SUSPECT"]
        );
        status.workers[1].state = WorkerState::Alive as i32;
        assert!(readiness_gaps(&status, &info).is_empty());
        assign_worker_ids(&status, &mut info);
        assert_eq!(info.workers[1].id, "w-b");
    }

    #[test]
    fn stat_line_yields_state_and_parent() {
        assert_eq!(
            parse_stat("4242 (kiln (x) y) S 17 4242 4242 0 -1"),
            Some(('S', 17))
        );
        assert_eq!(parse_stat("4242 (etcd) Z 1 0"), Some(('Z', 1)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_foreign_pid_is_not_taken_for_a_node() {
        let me = std::process::id();
        assert!(!is_running(me, Path::new("/no/such/kiln/data/dir")));
    }
}
