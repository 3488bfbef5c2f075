//! `kiln bench raft`: committed writes per second, commit latency and leader
//! failover time of kiln's coordinators, and of etcd measured the same way on the
//! same machine (DESIGN §9, control plane).
//!
//! ```text
//!  for each system (kiln; then etcd with --etcd):
//!    start 3 voters on loopback, each with its shipped timing: kiln heartbeat
//!    200 ms, election timeout 1000-1500 ms; etcd heartbeat 100 ms, election
//!    timeout 1000 ms
//!    for each client count N:
//!      N tasks, each with its own client and connection, put distinct keys back to
//!      back for a 1 s warm-up plus `duration`; a put counts when it starts after
//!      the warm-up and finishes before the end
//!    `failovers` times:
//!      one client writes continuously; SIGKILL the leader; the failover time runs
//!      from the kill to the commit of the first put that started after it;
//!      restart the killed voter with its arguments and wait until all three agree
//!      on a leader and have applied what it committed
//!    stop the voters
//! ```
//!
//! Both systems are driven by the same closed loop through [`KvTarget`], with the
//! same retry policy: back-off from 10 ms doubling to 50 ms, 5 s per put. A kiln
//! client finds the leader by itself; an etcd client starts at the leader's
//! endpoint (etcd's fastest path, with no forwarding) and moves to the next
//! endpoint on an error. During failover rounds both use a 250 ms attempt timeout:
//! an etcd follower forwards a put to the leader it still believes in, and a put
//! stranded there would otherwise wait for etcd's 7 s request timeout.
//!
//! Every process the bench starts is killed on any error, on Ctrl-C and when `run`
//! returns (a [`Reaper`] guard); the scratch directory is removed after a run that
//! succeeds and kept, with its logs, after one that fails.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use kiln_common::client::{ClientOptions, ClusterClient};
use kiln_proto::v1::{NodeStatusRequest, NodeStatusResponse, PutRequest};
use rand::RngCore;
use serde::Serialize;
use tokio::sync::{oneshot, OnceCell};
use tokio::task::JoinSet;

use crate::local::{self, ClusterInfo, Detach, LocalOptions, Proc};

/// Puts issued before this much time has passed in a level are not counted.
const WARMUP: Duration = Duration::from_secs(1);
/// Longest a put may take, retries included, under load.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one attempt may take during a failover round.
const FAILOVER_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);
/// Longest a TCP connection may take under load.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause between two attempts of one put; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait for a commit after the leader is killed.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a cluster to agree on a leader and catch up.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest one status call may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// Commits the failover writer makes before the leader is killed.
const WRITER_WARMUP_WRITES: u64 = 20;
const WRITER_WARMUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause of a load client after a failed put, so that a dead target is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Voters of each system.
const VOTERS: usize = 3;
/// etcd's default timing, passed explicitly so the figures state what ran.
const HEARTBEAT_MS: u64 = 100;
const ELECTION_TIMEOUT_MS: u64 = 1_000;
const MAX_CLIENTS: usize = 1_024;
/// Largest value kiln's key-value namespace accepts.
const MAX_VALUE_BYTES: usize = 1 << 20;
/// etcd member k (1-based) listens for clients on base + 300 + k - 1 and for peers
/// on base + 310 + k - 1: clear of the ranges `kiln local` uses.
const ETCD_CLIENT_PORT_OFFSET: usize = 300;
const ETCD_PEER_PORT_OFFSET: usize = 310;
const ETCD_DEFAULT_PATH: &str = "/usr/bin/etcd";
const LOG_TAIL_LINES: usize = 20;

/// What `kiln bench raft` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Client counts, one load level each.
    pub clients: Vec<usize>,
    /// Measured time per level, after a 1 s warm-up.
    pub duration: Duration,
    /// Leader kills per system.
    pub failovers: usize,
    /// Whether to measure etcd too.
    pub etcd: bool,
    /// Whether to measure kiln with mutual TLS too ("kiln+tls"), to price it.
    pub tls: bool,
    /// Bytes of each written value.
    pub value_size: usize,
    /// Scratch directory; each run uses a fresh subdirectory.
    pub dir: PathBuf,
    /// First port; kiln uses the layout of `kiln local`, etcd base + 300 to 312.
    pub base_port: u16,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            clients: vec![1, 16, 64],
            duration: Duration::from_secs(10),
            failovers: 5,
            etcd: false,
            tls: false,
            value_size: 256,
            dir: PathBuf::from(".kiln/bench"),
            base_port: 17_070,
        }
    }
}

/// Results of one run, printable as a table or serialisable as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub cpus: usize,
    pub cpu_model: String,
    pub etcd_version: Option<String>,
    pub voters: usize,
    pub etcd_heartbeat_ms: u64,
    pub etcd_election_timeout_ms: u64,
    pub value_size_bytes: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub failover_attempt_timeout_ms: f64,
    pub levels: Vec<LevelResult>,
    pub failovers: Vec<FailoverResult>,
    /// kiln's writes/s over etcd's, per client count (empty without etcd).
    pub ratios: Vec<Ratio>,
    /// kiln with mutual TLS over plaintext kiln, per client count (empty without --tls).
    pub tls_ratios: Vec<TlsRatio>,
}

/// One load level of one system.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub system: String,
    pub clients: usize,
    /// Puts committed within the measured window.
    pub writes: u64,
    /// Puts that failed within the measured window.
    pub errors: u64,
    pub writes_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
}

/// Leader failover times of one system.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub system: String,
    pub rounds_ms: Vec<f64>,
    pub failover_ms_median: f64,
    pub failover_ms_max: f64,
}

/// kiln's throughput with mutual TLS over its plaintext throughput.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRatio {
    pub clients: usize,
    pub tls_over_plaintext_writes_per_s: f64,
}

/// kiln's throughput over etcd's at one client count.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub clients: usize,
    pub kiln_over_etcd_writes_per_s: f64,
}

/// Finds a peer's benchmark script: in the source tree this kiln was built from,
/// else under `scripts/` in the current directory (a kiln built elsewhere and run
/// from a checkout).
pub fn peer_script(name: &str) -> anyhow::Result<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name);
    let here = Path::new("scripts").join(name);
    if built.is_file() {
        return Ok(built);
    }
    if here.is_file() {
        return Ok(here);
    }
    bail!(
        "the peer's script {name} is neither at {} nor at {}",
        built.display(),
        here.display()
    )
}

/// A benchmark's result: JSON for programs, a table for people.
pub trait Table: serde::Serialize {
    /// Prints the figures as a table, with the ratios to the peer.
    fn print_table(&self);
}

/// Prints `report` as pretty JSON, or as its table.
pub fn show<R: Table>(report: &R, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        report.print_table();
    }
    Ok(())
}

impl Table for BenchReport {
    /// Prints the load levels, the failover times and the kiln/etcd ratios as
    /// plain-text tables.
    fn print_table(&self) {
        println!(
            "raft bench: {} voters on loopback, each system at its defaults (kiln heartbeat \
             200 ms, election 1000-1500 ms; etcd heartbeat {} ms, election {} ms), \
             {}-byte values, {:.0} s per level after {:.0} s warm-up",
            self.voters,
            self.etcd_heartbeat_ms,
            self.etcd_election_timeout_ms,
            self.value_size_bytes,
            self.duration_s,
            self.warmup_s
        );
        println!("machine: {} cpus, {}", self.cpus, self.cpu_model);
        if let Some(version) = &self.etcd_version {
            println!("etcd: {version}");
        }
        println!();
        println!(
            "{:<8} {:>7} {:>11} {:>8} {:>8} {:>7}",
            "system", "clients", "writes/s", "p50 ms", "p99 ms", "errors"
        );
        for l in &self.levels {
            println!(
                "{:<8} {:>7} {:>11.1} {:>8.2} {:>8.2} {:>7}",
                l.system, l.clients, l.writes_per_s, l.latency_ms_p50, l.latency_ms_p99, l.errors
            );
        }
        if !self.failovers.is_empty() {
            println!();
            println!(
                "failover: SIGKILL the leader, time until the next write commits \
                 (attempt timeout {:.0} ms)",
                self.failover_attempt_timeout_ms
            );
            println!(
                "{:<8} {:>6} {:>10} {:>10}  rounds ms",
                "system", "rounds", "median ms", "max ms"
            );
            for f in &self.failovers {
                let rounds: Vec<String> = f.rounds_ms.iter().map(|ms| format!("{ms:.0}")).collect();
                println!(
                    "{:<8} {:>6} {:>10.0} {:>10.0}  {}",
                    f.system,
                    f.rounds_ms.len(),
                    f.failover_ms_median,
                    f.failover_ms_max,
                    rounds.join(" ")
                );
            }
        }
        if !self.ratios.is_empty() {
            println!();
            println!("{:>7} {:>18}", "clients", "kiln/etcd writes/s");
            for r in &self.ratios {
                println!("{:>7} {:>18.2}", r.clients, r.kiln_over_etcd_writes_per_s);
            }
        }
        if !self.tls_ratios.is_empty() {
            println!();
            println!("{:>7} {:>24}", "clients", "kiln+tls/kiln writes/s");
            for r in &self.tls_ratios {
                println!(
                    "{:>7} {:>24.2}",
                    r.clients, r.tls_over_plaintext_writes_per_s
                );
            }
        }
    }
}

/// Runs the bench described by `opts` and returns its report.
pub async fn run(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    validate(&opts)?;
    let etcd_program = if opts.etcd { Some(find_etcd()?) } else { None };
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let run_dir = std::path::absolute(&opts.dir)
        .with_context(|| format!("resolve directory {}", opts.dir.display()))?
        .join(format!("raft-{millis}"));
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("create directory {}", run_dir.display()))?;

    let reaper = Reaper::default();
    let interrupted = async {
        // Without a Ctrl-C handler the bench still runs; it only cannot be told apart
        // from an ordinary kill.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = bench(&opts, &run_dir, etcd_program.as_deref(), &reaper) => r,
        () = interrupted => Err(anyhow!("bench interrupted")),
    };
    drop(reaper);
    match result {
        Ok(report) => {
            if let Err(e) = std::fs::remove_dir_all(&run_dir) {
                tracing::warn!(dir = %run_dir.display(), error = %e, "cannot remove scratch directory");
            }
            Ok(report)
        }
        Err(e) => Err(e.context(format!(
            "run raft bench (data and logs kept in {})",
            run_dir.display()
        ))),
    }
}

fn validate(opts: &BenchOptions) -> anyhow::Result<()> {
    if opts.clients.is_empty() || opts.clients.iter().any(|&c| c == 0 || c > MAX_CLIENTS) {
        bail!(
            "check options: client counts must be 1 to {MAX_CLIENTS}, got {:?}",
            opts.clients
        );
    }
    if opts.duration.is_zero() {
        bail!("check options: duration must be positive");
    }
    if opts.value_size > MAX_VALUE_BYTES {
        bail!(
            "check options: value size must be at most {MAX_VALUE_BYTES} bytes, got {}",
            opts.value_size
        );
    }
    Ok(())
}

/// Returns the path of the etcd server, or an error saying how to install it.
fn find_etcd() -> anyhow::Result<PathBuf> {
    let default = PathBuf::from(ETCD_DEFAULT_PATH);
    if default.is_file() {
        return Ok(default);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("etcd"))
                .find(|p| p.is_file())
        })
        .context(
            "find etcd: /usr/bin/etcd is missing; install it with `apt-get install etcd-server`",
        )
}

async fn bench(
    opts: &BenchOptions,
    run_dir: &Path,
    etcd_program: Option<&Path>,
    reaper: &Reaper,
) -> anyhow::Result<BenchReport> {
    let mut levels = Vec::new();
    let mut failovers = Vec::new();

    tracing::info!(dir = %run_dir.display(), "starting kiln coordinators");
    let mut kiln = Cluster::Kiln(Box::new(
        KilnCluster::start(run_dir.join("kiln"), opts.base_port, false, reaper).await?,
    ));
    for (level, &clients) in opts.clients.iter().enumerate() {
        kiln.wait_healthy().await?;
        let addrs = kiln.kiln_addrs();
        let targets = (0..clients)
            .map(|_| KilnTarget::new(addrs.clone(), Timing::LOAD, None, None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        levels.push(run_level("kiln", targets, level, opts).await?);
    }
    if opts.failovers > 0 {
        let addrs = kiln.kiln_addrs();
        failovers.push(
            measure_failovers(&mut kiln, opts.failovers, reaper, |_| {
                KilnTarget::new(addrs.clone(), Timing::FAILOVER, None, None)
            })
            .await?,
        );
    }
    kiln.stop(reaper).await?;

    if opts.tls {
        tracing::info!("starting kiln coordinators with mutual TLS");
        let kiln = Cluster::Kiln(Box::new(
            KilnCluster::start(run_dir.join("kiln-tls"), opts.base_port, true, reaper).await?,
        ));
        for (level, &clients) in opts.clients.iter().enumerate() {
            kiln.wait_healthy().await?;
            let (addrs, tls, token) = kiln.kiln_client_setup()?;
            let targets = (0..clients)
                .map(|_| KilnTarget::new(addrs.clone(), Timing::LOAD, tls.clone(), token.clone()))
                .collect::<anyhow::Result<Vec<_>>>()?;
            levels.push(run_level("kiln+tls", targets, level, opts).await?);
        }
        kiln.stop(reaper).await?;
    }

    let mut etcd_version = None;
    if let Some(program) = etcd_program {
        etcd_version = Some(etcd_version_of(program));
        tracing::info!(program = %program.display(), "starting etcd members");
        let mut etcd = Cluster::Etcd(
            EtcdCluster::start(program, run_dir.join("etcd"), opts.base_port, reaper).await?,
        );
        for (level, &clients) in opts.clients.iter().enumerate() {
            let leader = etcd.wait_healthy().await?;
            let endpoints = etcd.etcd_endpoints();
            let targets: Vec<EtcdTarget> = (0..clients)
                .map(|_| EtcdTarget::new(endpoints.clone(), leader, Timing::LOAD))
                .collect();
            levels.push(run_level("etcd", targets, level, opts).await?);
        }
        if opts.failovers > 0 {
            let endpoints = etcd.etcd_endpoints();
            failovers.push(
                measure_failovers(&mut etcd, opts.failovers, reaper, |leader| {
                    Ok(EtcdTarget::new(endpoints.clone(), leader, Timing::FAILOVER))
                })
                .await?,
            );
        }
        etcd.stop(reaper).await?;
    }

    let ratios = ratios(&levels);
    let tls_ratios = levels
        .iter()
        .filter(|t| t.system == "kiln+tls")
        .filter_map(|t| {
            let plain = levels
                .iter()
                .find(|p| p.system == "kiln" && p.clients == t.clients)?;
            (plain.writes_per_s > 0.0).then(|| TlsRatio {
                clients: t.clients,
                tls_over_plaintext_writes_per_s: t.writes_per_s / plain.writes_per_s,
            })
        })
        .collect();
    Ok(BenchReport {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpu_model(),
        etcd_version,
        voters: VOTERS,
        etcd_heartbeat_ms: HEARTBEAT_MS,
        etcd_election_timeout_ms: ELECTION_TIMEOUT_MS,
        value_size_bytes: opts.value_size,
        warmup_s: WARMUP.as_secs_f64(),
        duration_s: opts.duration.as_secs_f64(),
        failover_attempt_timeout_ms: ms(FAILOVER_ATTEMPT_TIMEOUT),
        levels,
        failovers,
        ratios,
        tls_ratios,
    })
}

fn ratios(levels: &[LevelResult]) -> Vec<Ratio> {
    levels
        .iter()
        .filter(|l| l.system == "kiln")
        .filter_map(|k| {
            let e = levels
                .iter()
                .find(|e| e.system == "etcd" && e.clients == k.clients)?;
            (e.writes_per_s > 0.0).then(|| Ratio {
                clients: k.clients,
                kiln_over_etcd_writes_per_s: k.writes_per_s / e.writes_per_s,
            })
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".to_string())
}

fn etcd_version_of(program: &Path) -> String {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(|line| line.trim_start_matches("etcd Version:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown version".to_string())
}

// ---------------------------------------------------------------------------
// Load.
// ---------------------------------------------------------------------------

/// A key-value store the closed loop writes to: one instance per client, each with
/// its own connections.
trait KvTarget: Send + Sync + 'static {
    /// Writes `value` under `key` and returns once the write has committed.
    fn put(&self, key: String, value: Vec<u8>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Timing bounds of a bench client.
#[derive(Debug, Clone, Copy)]
struct Timing {
    connect: Duration,
    attempt: Duration,
    deadline: Duration,
}

impl Timing {
    const LOAD: Timing = Timing {
        connect: CONNECT_TIMEOUT,
        attempt: REQUEST_TIMEOUT,
        deadline: REQUEST_TIMEOUT,
    };
    const FAILOVER: Timing = Timing {
        connect: FAILOVER_ATTEMPT_TIMEOUT,
        attempt: FAILOVER_ATTEMPT_TIMEOUT,
        deadline: REQUEST_TIMEOUT,
    };
}

/// Addresses, TLS settings and bearer token of a kiln cluster's clients.
type KilnClientSetup = (
    Vec<String>,
    Option<kiln_common::tls::TlsMaterial>,
    Option<String>,
);

/// Returns the client TLS settings of a local cluster: its CA, or none when insecure.
/// A kiln client: [`ClusterClient`] follows the leader and retries by itself.
struct KilnTarget {
    client: ClusterClient,
}

impl KilnTarget {
    fn new(
        addrs: Vec<String>,
        timing: Timing,
        tls: Option<kiln_common::tls::TlsMaterial>,
        token: Option<String>,
    ) -> anyhow::Result<KilnTarget> {
        let client = ClusterClient::new(
            addrs,
            ClientOptions {
                connect_timeout: timing.connect,
                attempt_timeout: timing.attempt,
                deadline: timing.deadline,
                initial_backoff: INITIAL_BACKOFF,
                max_backoff: MAX_BACKOFF,
                tls,
                token,
                ..ClientOptions::default()
            },
        )
        .context("create kiln client")?;
        Ok(KilnTarget { client })
    }
}

impl KvTarget for KilnTarget {
    async fn put(&self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .call(|mut c| {
                let request = PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                };
                async move { c.put(request).await.map(|r| r.into_inner()) }
            })
            .await
            .context("put to kiln")?;
        Ok(())
    }
}

/// An etcd client: one connection per member, opened on first use, starting at
/// `first` and moving to the next member after a failed attempt.
struct EtcdTarget {
    endpoints: Vec<String>,
    clients: Vec<OnceCell<etcd_client::KvClient>>,
    current: AtomicUsize,
    timing: Timing,
}

impl EtcdTarget {
    fn new(endpoints: Vec<String>, first: usize, timing: Timing) -> EtcdTarget {
        let clients = endpoints.iter().map(|_| OnceCell::new()).collect();
        EtcdTarget {
            endpoints,
            clients,
            current: AtomicUsize::new(first),
            timing,
        }
    }

    async fn client(&self, index: usize) -> anyhow::Result<etcd_client::KvClient> {
        let endpoint = &self.endpoints[index];
        let client = self.clients[index]
            .get_or_try_init(|| async {
                let options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(self.timing.connect)
                    .with_timeout(self.timing.attempt);
                etcd_client::Client::connect([endpoint.as_str()], Some(options))
                    .await
                    .map(|c| c.kv_client())
            })
            .await
            .with_context(|| format!("connect to etcd at {endpoint}"))?;
        Ok(client.clone())
    }
}

impl KvTarget for EtcdTarget {
    async fn put(&self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut backoff = INITIAL_BACKOFF;
        let members = self.endpoints.len();
        loop {
            let index = self.current.load(Ordering::Relaxed) % members;
            let failure = match self.client(index).await {
                Ok(mut client) => {
                    let attempt = client.put(key.clone(), value.clone(), None);
                    match tokio::time::timeout(self.timing.attempt, attempt).await {
                        Ok(Ok(_)) => return Ok(()),
                        Ok(Err(e)) => anyhow!(e),
                        Err(_) => anyhow!("no answer within {:.0} ms", ms(self.timing.attempt)),
                    }
                }
                Err(e) => e,
            };
            // Another task may have moved on already; move only from where we failed.
            let _ = self.current.compare_exchange(
                index,
                (index + 1) % members,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if started.elapsed() + backoff >= self.timing.deadline {
                return Err(failure.context(format!(
                    "put to etcd within {:.1} s (last at {})",
                    self.timing.deadline.as_secs_f64(),
                    self.endpoints[index]
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// What one load client saw.
#[derive(Debug, Default)]
struct ClientStats {
    latencies: Vec<Duration>,
    errors: u64,
    last_error: Option<String>,
}

/// Returns `bytes` random bytes, so that no storage engine gains by compressing.
fn random_value(bytes: usize) -> Vec<u8> {
    let mut value = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut value);
    value
}

/// Drives every target in a closed loop for the warm-up plus `opts.duration` and
/// summarises the puts of the measured window.
async fn run_level<T: KvTarget>(
    system: &str,
    targets: Vec<T>,
    level: usize,
    opts: &BenchOptions,
) -> anyhow::Result<LevelResult> {
    let clients = targets.len();
    tracing::info!(system, clients, "running load level");
    let value = Arc::new(random_value(opts.value_size));
    let measure_from = Instant::now() + WARMUP;
    let end = measure_from + opts.duration;
    let mut tasks = JoinSet::new();
    for (client, target) in targets.into_iter().enumerate() {
        let value = Arc::clone(&value);
        tasks.spawn(async move {
            let mut stats = ClientStats::default();
            let mut seq = 0u64;
            while Instant::now() < end {
                let key = format!("{level:x}-{client:x}-{seq:x}");
                seq += 1;
                let started = Instant::now();
                let result = target.put(key, value.to_vec()).await;
                let finished = Instant::now();
                match result {
                    Ok(()) => {
                        if started >= measure_from && finished <= end {
                            stats.latencies.push(finished - started);
                        }
                    }
                    Err(e) => {
                        if started >= measure_from {
                            stats.errors += 1;
                        }
                        stats.last_error = Some(format!("{e:#}"));
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            stats
        });
    }

    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let mut last_error = None;
    let bound =
        end.saturating_duration_since(Instant::now()) + REQUEST_TIMEOUT + Duration::from_secs(1);
    let joined = tokio::time::timeout(bound, async {
        while let Some(joined) = tasks.join_next().await {
            let stats = joined.context("join load client")?;
            latencies.extend(stats.latencies);
            errors += stats.errors;
            if stats.last_error.is_some() {
                last_error = stats.last_error;
            }
        }
        anyhow::Ok(())
    })
    .await;
    match joined {
        Ok(result) => result?,
        Err(_) => {
            tasks.abort_all();
            bail!(
                "finish the {clients}-client level of {system}: clients still busy {:.0} s after its end",
                bound.as_secs_f64()
            );
        }
    }
    if latencies.is_empty() {
        bail!(
            "measure the {clients}-client level of {system}: no write committed; last error: {}",
            last_error.as_deref().unwrap_or("none")
        );
    }
    if let Some(error) = &last_error {
        tracing::warn!(system, clients, errors, error = %error, "some puts failed");
    }
    latencies.sort_unstable();
    let p50 = percentile(&latencies, 50.0).unwrap_or_default();
    let p99 = percentile(&latencies, 99.0).unwrap_or_default();
    let writes = latencies.len() as u64;
    let result = LevelResult {
        system: system.to_string(),
        clients,
        writes,
        errors,
        writes_per_s: writes as f64 / opts.duration.as_secs_f64(),
        latency_ms_p50: ms(p50),
        latency_ms_p99: ms(p99),
    };
    tracing::info!(
        system,
        clients,
        writes_per_s = result.writes_per_s,
        latency_ms_p50 = result.latency_ms_p50,
        latency_ms_p99 = result.latency_ms_p99,
        "load level done"
    );
    Ok(result)
}

/// Returns the `p`-th percentile (0 < p <= 100) of ascending `sorted` by the
/// nearest-rank method: the smallest value with at least p% of values at or below it.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------
// Failover.
// ---------------------------------------------------------------------------

/// Set when the leader has been killed: the writer reports the commit time of its
/// first put that started after `killed_at`.
struct Armed {
    killed_at: Instant,
    committed: oneshot::Sender<Instant>,
}

/// Kills the leader `rounds` times while one client writes, and measures the time
/// from each kill to the next commit.
async fn measure_failovers<T: KvTarget>(
    cluster: &mut Cluster,
    rounds: usize,
    reaper: &Reaper,
    make_writer: impl Fn(usize) -> anyhow::Result<T>,
) -> anyhow::Result<FailoverResult> {
    let system = cluster.system();
    let mut rounds_ms = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let leader = cluster.wait_healthy().await?;
        let writer = Arc::new(make_writer(leader)?);
        let armed: Arc<Mutex<Option<Armed>>> = Arc::new(Mutex::new(None));
        let commits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(write_continuously(
            Arc::clone(&writer),
            round,
            Arc::clone(&armed),
            Arc::clone(&commits),
            Arc::clone(&stop),
        ));
        let outcome = failover_round(cluster, &armed, &commits).await;
        stop.store(true, Ordering::Relaxed);
        if tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), task)
            .await
            .is_err()
        {
            tracing::warn!(system, round, "failover writer did not stop in time");
        }
        let (leader, elapsed) = outcome?;
        tracing::info!(
            system,
            round,
            failover_ms = ms(elapsed),
            "measured failover"
        );
        rounds_ms.push(ms(elapsed));
        cluster.restart(leader, reaper).await?;
    }
    if rounds > 0 {
        cluster.wait_healthy().await?;
    }
    let mut sorted = rounds_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FailoverResult {
        system: system.to_string(),
        failover_ms_median: median(&sorted),
        failover_ms_max: sorted.last().copied().unwrap_or_default(),
        rounds_ms,
    })
}

/// Waits until the writer commits, kills the leader and waits for the next commit.
/// Returns the killed member and the time from the kill to that commit.
async fn failover_round(
    cluster: &mut Cluster,
    armed: &Mutex<Option<Armed>>,
    commits: &AtomicU64,
) -> anyhow::Result<(usize, Duration)> {
    let warm_deadline = Instant::now() + WRITER_WARMUP_TIMEOUT;
    while commits.load(Ordering::Relaxed) < WRITER_WARMUP_WRITES {
        if Instant::now() >= warm_deadline {
            bail!(
                "warm up the failover writer of {}: {} commits in {} s",
                cluster.system(),
                commits.load(Ordering::Relaxed),
                WRITER_WARMUP_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leader = cluster.wait_healthy().await?;
    let (committed, on_commit) = oneshot::channel();
    let killed_at = {
        // Held across the kill so that the writer cannot report a put that started
        // before it.
        let mut slot = armed.lock().unwrap_or_else(PoisonError::into_inner);
        cluster.crash(leader)?;
        let killed_at = Instant::now();
        *slot = Some(Armed {
            killed_at,
            committed,
        });
        killed_at
    };
    tracing::info!(
        system = cluster.system(),
        member = leader + 1,
        "killed leader"
    );
    match tokio::time::timeout(FAILOVER_TIMEOUT, on_commit).await {
        Ok(Ok(at)) => Ok((leader, at.saturating_duration_since(killed_at))),
        Ok(Err(_)) => bail!("measure failover of {}: the writer stopped", cluster.system()),
        Err(_) => bail!(
            "measure failover of {}: no write committed within {} s of killing the leader; logs in {}",
            cluster.system(),
            FAILOVER_TIMEOUT.as_secs(),
            cluster.log_dir().display()
        ),
    }
}

/// Puts distinct keys back to back until `stop`; counts commits and reports the
/// first commit of a put that started after the kill.
async fn write_continuously<T: KvTarget>(
    writer: Arc<T>,
    round: usize,
    armed: Arc<Mutex<Option<Armed>>>,
    commits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let value = random_value(64);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("failover-{round:x}-{seq:x}");
        seq += 1;
        let started = Instant::now();
        match writer.put(key, value.clone()).await {
            Ok(()) => {
                let finished = Instant::now();
                commits.fetch_add(1, Ordering::Relaxed);
                let mut slot = armed.lock().unwrap_or_else(PoisonError::into_inner);
                if slot.as_ref().is_some_and(|a| started >= a.killed_at) {
                    if let Some(a) = slot.take() {
                        let _ = a.committed.send(finished);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "failover put failed; retrying");
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------
// The clusters under test.
// ---------------------------------------------------------------------------

/// Kills every process the bench started and has not stopped, when dropped.
#[derive(Default)]
struct Reaper {
    procs: Mutex<Vec<Proc>>,
}

impl Reaper {
    fn track(&self, proc: Proc) {
        self.procs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(proc);
    }

    fn forget(&self, pid: u32) {
        self.procs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| p.pid != pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let procs = std::mem::take(self.procs.get_mut().unwrap_or_else(PoisonError::into_inner));
        let mut killed = Vec::new();
        for p in procs {
            if local::is_running(p.pid, &p.marker) {
                tracing::info!(process = %p.name, pid = p.pid, "killing leftover process");
                if local::send_signal(p.pid, local::SIGKILL).is_ok() {
                    killed.push(p);
                }
            }
        }
        // Reap them, so that none outlives the bench as a zombie; SIGKILL is prompt.
        let deadline = Instant::now() + local::KILL_TIMEOUT;
        while !killed.is_empty() && Instant::now() < deadline {
            killed.retain(|p| local::is_running(p.pid, &p.marker));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A system under test.
enum Cluster {
    Kiln(Box<KilnCluster>),
    Etcd(EtcdCluster),
}

impl Cluster {
    fn system(&self) -> &'static str {
        match self {
            Cluster::Kiln(_) => "kiln",
            Cluster::Etcd(_) => "etcd",
        }
    }

    fn log_dir(&self) -> PathBuf {
        match self {
            Cluster::Kiln(k) => k.dir.join("logs"),
            Cluster::Etcd(e) => e.dir.join("logs"),
        }
    }

    fn kiln_addrs(&self) -> Vec<String> {
        match self {
            Cluster::Kiln(k) => k.info.coordinator_addrs(),
            Cluster::Etcd(_) => Vec::new(),
        }
    }

    /// Returns the addresses and the client TLS settings of a kiln cluster.
    fn kiln_client_setup(&self) -> anyhow::Result<KilnClientSetup> {
        match self {
            Cluster::Kiln(k) => Ok((
                k.info.coordinator_addrs(),
                local::client_tls(&k.info)?,
                local::read_token(&k.info)?,
            )),
            Cluster::Etcd(_) => Ok((Vec::new(), None, None)),
        }
    }

    fn etcd_endpoints(&self) -> Vec<String> {
        match self {
            Cluster::Kiln(_) => Vec::new(),
            Cluster::Etcd(e) => e.members.iter().map(|m| m.client_url.clone()).collect(),
        }
    }

    fn procs(&self) -> Vec<Proc> {
        match self {
            Cluster::Kiln(k) => k.info.coordinators.iter().map(Proc::from).collect(),
            Cluster::Etcd(e) => e.members.iter().map(EtcdMember::proc).collect(),
        }
    }

    /// Waits until every voter agrees on one leader and has applied what the leader
    /// had committed; returns the leader's index among the voters.
    async fn wait_healthy(&self) -> anyhow::Result<usize> {
        match self {
            Cluster::Kiln(k) => {
                wait_until_healthy(self.system(), &self.procs(), &self.log_dir(), || k.health())
                    .await
            }
            Cluster::Etcd(e) => {
                wait_until_healthy(self.system(), &self.procs(), &self.log_dir(), || e.health())
                    .await
            }
        }
    }

    /// Kills voter `index` with SIGKILL, as a crash.
    fn crash(&self, index: usize) -> anyhow::Result<()> {
        let proc = self
            .procs()
            .into_iter()
            .nth(index)
            .with_context(|| format!("find voter {index} of {}", self.system()))?;
        local::send_signal(proc.pid, local::SIGKILL)
            .with_context(|| format!("kill {} (pid {})", proc.name, proc.pid))
    }

    /// Starts voter `index` again with the arguments it was started with.
    async fn restart(&mut self, index: usize, reaper: &Reaper) -> anyhow::Result<()> {
        let old = self
            .procs()
            .into_iter()
            .nth(index)
            .with_context(|| format!("find voter {index} of {}", self.system()))?;
        // The killed process must be gone before its ports and data are reused.
        let deadline = Instant::now() + local::KILL_TIMEOUT;
        while local::is_running(old.pid, &old.marker) {
            if Instant::now() >= deadline {
                bail!("restart {}: pid {} is still running", old.name, old.pid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reaper.forget(old.pid);
        let new = match self {
            Cluster::Kiln(k) => {
                let node = local::restart_node(&k.dir, &old.name, Detach::No)?;
                let proc = Proc::from(&node);
                k.info.coordinators[index] = node;
                proc
            }
            Cluster::Etcd(e) => {
                let member = &mut e.members[index];
                let child = local::spawn_process(&e.program, &member.args, &member.log, Detach::No)
                    .with_context(|| format!("restart {}", member.name))?;
                member.pid = child.id();
                member.proc()
            }
        };
        tracing::info!(process = %new.name, pid = new.pid, "restarted voter");
        reaper.track(new);
        Ok(())
    }

    /// Stops every voter (SIGTERM, then SIGKILL after 10 s).
    async fn stop(&self, reaper: &Reaper) -> anyhow::Result<()> {
        match self {
            Cluster::Kiln(k) => {
                local::down(&k.dir)
                    .await
                    .context("stop kiln coordinators")?;
            }
            Cluster::Etcd(_) => {
                local::stop_processes(self.procs(), local::STOP_TIMEOUT)
                    .await
                    .context("stop etcd members")?;
            }
        }
        for p in self.procs() {
            reaper.forget(p.pid);
        }
        Ok(())
    }
}

/// Polls `health` until it names a leader, for at most [`HEALTHY_TIMEOUT`]; fails
/// at once when one of `procs` has exited.
async fn wait_until_healthy<F, Fut>(
    system: &str,
    procs: &[Proc],
    log_dir: &Path,
    health: F,
) -> anyhow::Result<usize>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<usize>>,
{
    let deadline = Instant::now() + HEALTHY_TIMEOUT;
    loop {
        if let Some(p) = procs.iter().find(|p| !local::is_running(p.pid, &p.marker)) {
            bail!(
                "wait for {system} to be healthy: {} (pid {}) is not running; last lines of its log:\n{}",
                p.name,
                p.pid,
                local::log_tail(&log_dir.join(format!("{}.log", p.name)), LOG_TAIL_LINES)
            );
        }
        match health().await {
            Ok(leader) => return Ok(leader),
            Err(gap) if Instant::now() >= deadline => bail!(
                "wait for {system} to be healthy: not within {} s: {gap:#}; logs in {}",
                HEALTHY_TIMEOUT.as_secs(),
                log_dir.display()
            ),
            Err(_) => tokio::time::sleep(HEALTH_POLL_INTERVAL).await,
        }
    }
}

/// Three kiln coordinators started through `kiln local`.
struct KilnCluster {
    dir: PathBuf,
    info: ClusterInfo,
    admin: ClusterClient,
}

impl KilnCluster {
    async fn start(
        dir: PathBuf,
        base_port: u16,
        tls: bool,
        reaper: &Reaper,
    ) -> anyhow::Result<KilnCluster> {
        let options = LocalOptions {
            coordinators: VOTERS,
            workers: 0,
            dir: dir.clone(),
            base_port,
            // kiln's shipped defaults, so the figures are what a user gets, except
            // the per-token rate limit on writes (200/s): the bench's clients share
            // one token and measure the write path itself.
            coordinator_config: tls.then(|| "[limits]\ntoken_writes_per_sec = 0\n".to_string()),
            // Plaintext like the etcd it is compared with, unless TLS is priced.
            insecure: !tls,
            worker_args: Vec::new(),
        };
        let info = local::up_with(&options, Detach::No)
            .await
            .context("start kiln coordinators")?;
        for node in &info.coordinators {
            reaper.track(Proc::from(node));
        }
        let admin = local::admin_client(
            &info,
            ClientOptions {
                connect_timeout: STATUS_TIMEOUT,
                attempt_timeout: STATUS_TIMEOUT,
                deadline: STATUS_TIMEOUT,
                ..ClientOptions::default()
            },
        )
        .context("create kiln admin client")?;
        Ok(KilnCluster { dir, info, admin })
    }

    async fn node_status(&self, addr: &str) -> anyhow::Result<NodeStatusResponse> {
        let mut client = self.admin.client_for(addr)?;
        let status = tokio::time::timeout(STATUS_TIMEOUT, client.node_status(NodeStatusRequest {}))
            .await
            .map_err(|_| anyhow!("no answer within {} s", STATUS_TIMEOUT.as_secs()))?
            .map_err(kiln_common::Error::from)?;
        Ok(status.into_inner())
    }

    /// Returns the leader's index when all coordinators agree on it and have applied
    /// its commit index; otherwise what is missing.
    async fn health(&self) -> anyhow::Result<usize> {
        let mut statuses = Vec::with_capacity(self.info.coordinators.len());
        for node in &self.info.coordinators {
            let status = self
                .node_status(&node.addr)
                .await
                .with_context(|| format!("read status of {}", node.name))?;
            statuses.push(status);
        }
        let agreed = statuses.first().map_or(0, |s| s.leader_id);
        if agreed == 0 || statuses.iter().any(|s| s.leader_id != agreed) {
            let seen: Vec<u64> = statuses.iter().map(|s| s.leader_id).collect();
            bail!("coordinators do not agree on a leader: {seen:?}");
        }
        let leader = statuses
            .iter()
            .position(|s| s.id == agreed)
            .with_context(|| format!("find leader {agreed} among the coordinators"))?;
        let committed = statuses[leader].commit_index;
        if let Some(lagging) = statuses.iter().find(|s| s.applied_index < committed) {
            bail!(
                "coordinator {} applied {} of {committed}",
                lagging.id,
                lagging.applied_index
            );
        }
        Ok(leader)
    }
}

/// One etcd member: its arguments, so that it can be restarted as it was.
struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    client_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    pid: u32,
}

impl EtcdMember {
    fn proc(&self) -> Proc {
        Proc {
            name: self.name.clone(),
            pid: self.pid,
            marker: self.data_dir.clone(),
        }
    }
}

/// Three etcd members on loopback.
struct EtcdCluster {
    program: PathBuf,
    dir: PathBuf,
    members: Vec<EtcdMember>,
}

fn etcd_port(base: u16, offset: usize) -> anyhow::Result<u16> {
    usize::from(base)
        .checked_add(offset)
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("compute etcd port {base} + {offset}: beyond 65535"))
}

/// Returns the arguments of every member: client and peer URLs, the initial
/// cluster and the same Raft timing as kiln's coordinators.
fn etcd_members(dir: &Path, base: u16) -> anyhow::Result<Vec<EtcdMember>> {
    let mut ports = Vec::new();
    for k in 1..=VOTERS {
        ports.push((
            etcd_port(base, ETCD_CLIENT_PORT_OFFSET + k - 1)?,
            etcd_port(base, ETCD_PEER_PORT_OFFSET + k - 1)?,
        ));
    }
    let initial_cluster = ports
        .iter()
        .enumerate()
        .map(|(k, (_, peer))| format!("e{}=http://127.0.0.1:{peer}", k + 1))
        .collect::<Vec<_>>()
        .join(",");
    let members = ports
        .into_iter()
        .enumerate()
        .map(|(k, (client_port, peer_port))| {
            let name = format!("e{}", k + 1);
            let client_url = format!("http://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let data_dir = dir.join(&name);
            let args = [
                "--name",
                &name,
                "--data-dir",
                &data_dir.display().to_string(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "kiln-bench",
                "--heartbeat-interval",
                &HEARTBEAT_MS.to_string(),
                "--election-timeout",
                &ELECTION_TIMEOUT_MS.to_string(),
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ]
            .map(str::to_string)
            .to_vec();
            EtcdMember {
                log: dir.join("logs").join(format!("{name}.log")),
                name,
                client_port,
                peer_port,
                client_url,
                data_dir,
                args,
                pid: 0,
            }
        })
        .collect();
    Ok(members)
}

impl EtcdCluster {
    async fn start(
        program: &Path,
        dir: PathBuf,
        base_port: u16,
        reaper: &Reaper,
    ) -> anyhow::Result<EtcdCluster> {
        let mut members = etcd_members(&dir, base_port)?;
        local::ensure_ports_free(members.iter().flat_map(|m| {
            [
                (m.client_port, format!("etcd {} client", m.name)),
                (m.peer_port, format!("etcd {} peer", m.name)),
            ]
        }))?;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("create directory {}", logs.display()))?;
        for member in &mut members {
            let child = local::spawn_process(program, &member.args, &member.log, Detach::No)
                .with_context(|| format!("start etcd member {}", member.name))?;
            member.pid = child.id();
            reaper.track(member.proc());
            tracing::info!(member = %member.name, pid = member.pid, url = %member.client_url, "started etcd member");
        }
        let cluster = EtcdCluster {
            program: program.to_path_buf(),
            dir,
            members,
        };
        let procs: Vec<Proc> = cluster.members.iter().map(EtcdMember::proc).collect();
        wait_until_healthy("etcd", &procs, &cluster.dir.join("logs"), || {
            cluster.health()
        })
        .await
        .context("start etcd members")?;
        Ok(cluster)
    }

    /// Returns the leader's index when all members agree on it and have applied its
    /// commit index; otherwise what is missing.
    async fn health(&self) -> anyhow::Result<usize> {
        let mut statuses = Vec::with_capacity(self.members.len());
        for member in &self.members {
            let status = etcd_status(&member.client_url)
                .await
                .with_context(|| format!("read status of etcd member {}", member.name))?;
            statuses.push(status);
        }
        let agreed = statuses.first().map_or(0, |s| s.leader);
        if agreed == 0 || statuses.iter().any(|s| s.leader != agreed) {
            let seen: Vec<String> = statuses.iter().map(|s| format!("{:x}", s.leader)).collect();
            bail!("etcd members do not agree on a leader: {seen:?}");
        }
        let leader = statuses
            .iter()
            .position(|s| s.member_id == agreed)
            .with_context(|| format!("find leader {agreed:x} among the etcd members"))?;
        let committed = statuses[leader].raft_index;
        if let Some(lagging) = statuses.iter().find(|s| s.raft_applied_index < committed) {
            bail!(
                "etcd member {:x} applied {} of {committed}",
                lagging.member_id,
                lagging.raft_applied_index
            );
        }
        Ok(leader)
    }
}

/// What the bench reads from an etcd member's status.
struct EtcdStatus {
    member_id: u64,
    leader: u64,
    raft_index: u64,
    raft_applied_index: u64,
}

async fn etcd_status(url: &str) -> anyhow::Result<EtcdStatus> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(STATUS_TIMEOUT)
        .with_timeout(STATUS_TIMEOUT);
    let call = async {
        let client = etcd_client::Client::connect([url], Some(options)).await?;
        client.maintenance_client().status().await
    };
    let status = tokio::time::timeout(STATUS_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("no answer within {} s", STATUS_TIMEOUT.as_secs()))??;
    Ok(EtcdStatus {
        member_id: status.header().map_or(0, |h| h.member_id()),
        leader: status.leader(),
        raft_index: status.raft_index(),
        raft_applied_index: status.raft_applied_index(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durations(ms: &[u64]) -> Vec<Duration> {
        ms.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentile_uses_nearest_rank() {
        let sorted = durations(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&sorted, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&sorted, 0.1), Some(Duration::from_millis(1)));
    }

    #[test]
    fn percentile_of_few_values() {
        assert_eq!(percentile(&[], 50.0), None);
        let one = durations(&[7]);
        assert_eq!(percentile(&one, 50.0), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&one, 99.0), Some(Duration::from_millis(7)));
        let three = durations(&[1, 2, 30]);
        assert_eq!(percentile(&three, 50.0), Some(Duration::from_millis(2)));
        // One slow put in three is above the 99th percentile's rank of 3.
        assert_eq!(percentile(&three, 99.0), Some(Duration::from_millis(30)));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }

    #[test]
    fn ratios_pair_levels_by_client_count() {
        let level = |system: &str, clients, writes_per_s| LevelResult {
            system: system.into(),
            clients,
            writes: 1,
            errors: 0,
            writes_per_s,
            latency_ms_p50: 1.0,
            latency_ms_p99: 2.0,
        };
        let levels = vec![
            level("kiln", 1, 500.0),
            level("kiln", 16, 4_000.0),
            level("etcd", 1, 1_000.0),
            level("etcd", 16, 2_000.0),
        ];
        let r = ratios(&levels);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].clients, r[0].kiln_over_etcd_writes_per_s), (1, 0.5));
        assert_eq!((r[1].clients, r[1].kiln_over_etcd_writes_per_s), (16, 2.0));
    }

    #[test]
    fn etcd_members_share_one_initial_cluster_and_distinct_ports() {
        let members = etcd_members(Path::new("/d"), 17_070).expect("members");
        assert_eq!(members.len(), VOTERS);
        let unique: std::collections::HashSet<u16> = members
            .iter()
            .flat_map(|m| [m.client_port, m.peer_port])
            .collect();
        assert_eq!(unique.len(), 2 * VOTERS);
        let args = members[1].args.join(" ");
        assert!(args.contains("--name e2"));
        assert!(args.contains("--listen-client-urls http://127.0.0.1:17371"));
        assert!(args.contains(
            "--initial-cluster e1=http://127.0.0.1:17380,e2=http://127.0.0.1:17381,e3=http://127.0.0.1:17382"
        ));
    }

    #[test]
    fn options_are_checked() {
        let mut opts = BenchOptions::default();
        assert!(validate(&opts).is_ok());
        opts.clients = vec![1, 0];
        assert!(validate(&opts).is_err());
        opts.clients = vec![1];
        opts.value_size = MAX_VALUE_BYTES + 1;
        assert!(validate(&opts).is_err());
    }
}
