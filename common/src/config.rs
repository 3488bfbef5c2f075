//! Configuration of coordinators and workers.
//!
//! Values come from, in rising precedence: built-in defaults, a TOML file
//! (`--config`), `KILN_*` variables and flags (clap reads both). An unknown key or a
//! bad value is an error that names the key; nothing is silently ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::tls::TlsFiles;

/// A configuration error: always names the key or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Raft timing and log retention of a coordinator.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    /// Length of one Raft tick.
    pub tick_ms: u64,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Ticks without a leader before a follower campaigns.
    pub election_ticks: usize,
    /// Random extra ticks added to each node's election timeout, so that one node
    /// usually times out first (raft-rs draws from `[election, election + jitter)`).
    pub election_jitter_ticks: usize,
    /// Applied entries since the last snapshot that trigger a new one and log compaction.
    pub snapshot_threshold_entries: u64,
    /// Entries kept in the log behind a snapshot, so slightly slow followers need no snapshot.
    pub log_keep_entries: u64,
    /// Largest append message, in bytes.
    pub max_size_per_msg: u64,
    /// Append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// Bound of the Raft actor's mailbox; a full mailbox answers "overloaded".
    pub mailbox_capacity: usize,
    /// How long a proposal waits for its commit before the caller is told it timed out.
    pub proposal_timeout_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            tick_ms: 100,
            heartbeat_ticks: 2,
            election_ticks: 10,
            election_jitter_ticks: 5,
            snapshot_threshold_entries: 10_000,
            log_keep_entries: 2_000,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            mailbox_capacity: 4096,
            proposal_timeout_ms: 5_000,
        }
    }
}

/// When a silent worker becomes Suspect, then Down.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    pub suspect_after_ms: u64,
    pub down_after_ms: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            suspect_after_ms: 3_000,
            down_after_ms: 10_000,
        }
    }
}

/// How the leader's autoscaler reads load and how long a change must hold
/// before it acts (stabilisation windows, as Kubernetes' HPA and Knative have).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscaleSettings {
    /// Load is averaged over this window of replica samples.
    pub sample_window_ms: u64,
    /// More replicas are added once the load has asked for them this long.
    pub up_window_ms: u64,
    /// Replicas are removed once the load has allowed it this long.
    pub down_window_ms: u64,
}

impl Default for AutoscaleSettings {
    fn default() -> Self {
        AutoscaleSettings {
            sample_window_ms: 6_000,
            up_window_ms: 3_000,
            down_window_ms: 60_000,
        }
    }
}

/// How the leader's drift monitor cuts telemetry into windows and judges them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DriftSettings {
    /// Length of a window (windows start at multiples of it).
    pub window_ms: u64,
    /// A window with fewer served rows is not judged (too little to tell).
    pub min_rows: u64,
    /// Share of features that must drift for the dataset to drift (Evidently: 0.5).
    pub drift_share: f64,
    /// Windows kept per model version in the replicated state.
    pub keep_windows: u32,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings {
            window_ms: 60_000,
            min_rows: 100,
            drift_share: 0.5,
            keep_windows: 1_440,
        }
    }
}

/// How the leader's scheduler treats the queue.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSettings {
    /// When the job at the head of the queue does not fit, stop running jobs of
    /// lower priority to make room; they go back to the queue and resume from
    /// their checkpoints, and a preemption does not count against their
    /// `max_failures`. Off by default.
    pub preemption: bool,
}

/// How the leader judges a canary a retrain policy started: after
/// `judge_after_ms` and `min_requests` answered by the canary, it is promoted when
/// its error rate and p99 latency are no worse than the primary's over the same
/// time (within the tolerances), rolled back otherwise; a canary that gets too
/// little traffic to judge within `max_wait_ms` is rolled back.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CanarySettings {
    pub judge_after_ms: u64,
    pub min_requests: u64,
    /// Most the canary's error rate may exceed the primary's (a share: 0.01 is
    /// one point).
    pub error_tolerance: f64,
    /// Most the canary's p99 may exceed the primary's, relative (0.25: 25%).
    pub latency_tolerance: f64,
    /// A p99 difference under this many milliseconds always passes (latency
    /// histograms have coarse buckets).
    pub latency_slack_ms: f64,
    /// With ground truth for both versions (`min_labelled` answers each): most
    /// the canary's accuracy may fall below the primary's (a share), or its RMSE
    /// rise above it (relative).
    pub quality_tolerance: f64,
    pub min_labelled: u64,
    pub max_wait_ms: u64,
}

impl Default for CanarySettings {
    fn default() -> Self {
        CanarySettings {
            judge_after_ms: 60_000,
            min_requests: 200,
            error_tolerance: 0.01,
            latency_tolerance: 0.25,
            latency_slack_ms: 1.0,
            quality_tolerance: 0.02,
            min_labelled: 50,
            max_wait_ms: 3_600_000,
        }
    }
}

/// Limits against abuse by token holders (nodes are not limited).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// State-changing calls a second per token, per coordinator; 0: no limit.
    pub token_writes_per_sec: u32,
    /// Calls a token may make at once before the rate applies.
    pub token_write_burst: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            token_writes_per_sec: 200,
            token_write_burst: 400,
        }
    }
}

/// The coordinator's configuration file, every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorFile {
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub http: Option<String>,
    pub peers: Option<Vec<String>>,
    pub join: Option<String>,
    /// Mixed into the id a new cluster gets at bootstrap, so that two clusters of
    /// the same peers (a test cluster made again on the same ports) differ.
    pub cluster_token: Option<String>,
    pub raft: RaftSettings,
    pub health: HealthSettings,
    pub limits: LimitSettings,
    pub autoscale: AutoscaleSettings,
    pub drift: DriftSettings,
    pub canary: CanarySettings,
    pub scheduler: SchedulerSettings,
    pub tls: TlsFiles,
    pub insecure: Option<bool>,
}

/// Overrides from flags and `KILN_*` variables.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorOverrides {
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub http: Option<String>,
    pub peers: Option<String>,
    pub join: Option<String>,
    pub cluster_token: Option<String>,
    /// Bootstraps a new cluster if the data dir is empty (a flag, never a
    /// config key: a restart must not repeat it).
    pub bootstrap: bool,
    /// Bootstraps the empty data dir and exits (the first step of a systemd
    /// install, as `initdb`).
    pub bootstrap_only: bool,
    pub tls: TlsFiles,
    pub insecure: bool,
}

/// A validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The gRPC address other nodes use to reach this one.
    pub advertise: String,
    pub http: SocketAddr,
    /// Initial voters by id, used only to bootstrap an empty data dir.
    pub peers: BTreeMap<u64, String>,
    /// A member to ask for admission, for a node that joins a running cluster.
    pub join: Option<String>,
    /// Bootstrap a new cluster from `peers` if the data dir is empty; without it
    /// an empty data dir is refused (unless `join` is set).
    pub bootstrap: bool,
    /// Stop after bootstrapping, without serving.
    pub bootstrap_only: bool,
    /// Mixed into the new cluster's id at bootstrap.
    pub cluster_token: String,
    pub raft: RaftSettings,
    pub health: HealthSettings,
    pub limits: LimitSettings,
    pub autoscale: AutoscaleSettings,
    pub drift: DriftSettings,
    pub canary: CanarySettings,
    pub scheduler: SchedulerSettings,
    /// Node TLS; `None` only with `insecure`.
    pub tls: Option<NodeTls>,
}

impl CoordinatorConfig {
    /// Builds the configuration from an optional file and overrides, and validates it.
    pub fn load(
        file: Option<&Path>,
        overrides: CoordinatorOverrides,
    ) -> Result<CoordinatorConfig, ConfigError> {
        let base: CoordinatorFile = match file {
            Some(path) => parse_file(path)?,
            None => CoordinatorFile::default(),
        };
        let id = overrides.id.or(base.id).unwrap_or(1);
        if id == 0 {
            return Err(invalid("id", "must be a positive integer, got 0"));
        }
        let data_dir = overrides
            .data_dir
            .or(base.data_dir)
            .unwrap_or_else(|| PathBuf::from(format!("kiln-coordinator-{id}")));
        let listen_text = overrides
            .listen
            .or(base.listen)
            .unwrap_or_else(|| "127.0.0.1:7070".into());
        let listen = parse_addr("listen", &listen_text)?;
        let http_text = overrides
            .http
            .or(base.http)
            .unwrap_or_else(|| "127.0.0.1:7080".into());
        let http = parse_addr("http", &http_text)?;
        let advertise = overrides
            .advertise
            .or(base.advertise)
            .unwrap_or_else(|| listen_text.clone());
        parse_host_port("advertise", &advertise)?;
        let peers = match overrides.peers {
            Some(text) => parse_peers(&text)?,
            None => parse_peer_list(base.peers.as_deref().unwrap_or(&[]))?,
        };
        let join = overrides.join.or(base.join);
        let bootstrap = overrides.bootstrap || overrides.bootstrap_only;
        if bootstrap && join.is_some() {
            return Err(invalid(
                "join",
                "give either --bootstrap (to make a new cluster) or join (to enter a running one), not both",
            ));
        }
        if let Some(addr) = &join {
            parse_host_port("join", addr)?;
            if !peers.is_empty() {
                return Err(invalid(
                    "join",
                    "give either peers (to bootstrap a new cluster) or join (to enter a running one), not both",
                ));
            }
        } else if !peers.is_empty() && !peers.contains_key(&id) {
            return Err(invalid(
                "peers",
                format!("must include this node's own id {id}"),
            ));
        }
        let raft = base.raft;
        validate_raft(&raft)?;
        let health = base.health;
        if health.suspect_after_ms == 0 || health.down_after_ms <= health.suspect_after_ms {
            return Err(invalid(
                "health.down_after_ms",
                format!(
                    "must be greater than health.suspect_after_ms ({} <= {})",
                    health.down_after_ms, health.suspect_after_ms
                ),
            ));
        }
        if base.autoscale.sample_window_ms == 0 {
            return Err(invalid("autoscale.sample_window_ms", "must be positive"));
        }
        let drift = base.drift;
        if drift.window_ms == 0 || drift.keep_windows == 0 {
            return Err(invalid(
                "drift.window_ms",
                "drift.window_ms and drift.keep_windows must be positive",
            ));
        }
        if !(drift.drift_share > 0.0 && drift.drift_share <= 1.0) {
            return Err(invalid(
                "drift.drift_share",
                format!("must be in (0, 1], got {}", drift.drift_share),
            ));
        }
        let canary = base.canary;
        let tolerances = [
            canary.error_tolerance,
            canary.latency_tolerance,
            canary.latency_slack_ms,
            canary.quality_tolerance,
        ];
        if tolerances.iter().any(|t| !(t.is_finite() && *t >= 0.0)) {
            return Err(invalid(
                "canary",
                "error_tolerance, latency_tolerance, latency_slack_ms and quality_tolerance must be finite and not negative",
            ));
        }
        if canary.min_requests == 0 || canary.max_wait_ms < canary.judge_after_ms {
            return Err(invalid(
                "canary",
                format!(
                    "min_requests must be positive and max_wait_ms ({}) at least judge_after_ms ({})",
                    canary.max_wait_ms, canary.judge_after_ms
                ),
            ));
        }
        let tls = node_tls(
            merge_tls(overrides.tls, base.tls),
            overrides.insecure || base.insecure.unwrap_or(false),
        )?;
        Ok(CoordinatorConfig {
            id,
            data_dir,
            listen,
            advertise,
            http,
            peers,
            join,
            bootstrap,
            bootstrap_only: overrides.bootstrap_only,
            cluster_token: overrides
                .cluster_token
                .or(base.cluster_token)
                .unwrap_or_default(),
            raft,
            health,
            limits: base.limits,
            autoscale: base.autoscale,
            drift,
            canary,
            scheduler: base.scheduler,
            tls,
        })
    }
}

fn validate_raft(raft: &RaftSettings) -> Result<(), ConfigError> {
    if raft.tick_ms == 0 {
        return Err(invalid("raft.tick_ms", "must be positive"));
    }
    if raft.heartbeat_ticks == 0 {
        return Err(invalid("raft.heartbeat_ticks", "must be positive"));
    }
    if raft.election_ticks <= raft.heartbeat_ticks {
        return Err(invalid(
            "raft.election_ticks",
            format!(
                "must be greater than raft.heartbeat_ticks ({} <= {})",
                raft.election_ticks, raft.heartbeat_ticks
            ),
        ));
    }
    if raft.election_jitter_ticks == 0 {
        return Err(invalid("raft.election_jitter_ticks", "must be positive"));
    }
    if raft.snapshot_threshold_entries == 0 {
        return Err(invalid(
            "raft.snapshot_threshold_entries",
            "must be positive",
        ));
    }
    if raft.log_keep_entries >= raft.snapshot_threshold_entries {
        return Err(invalid(
            "raft.log_keep_entries",
            "must be smaller than raft.snapshot_threshold_entries",
        ));
    }
    if raft.mailbox_capacity == 0 || raft.max_inflight_msgs == 0 {
        return Err(invalid(
            "raft.mailbox_capacity",
            "mailbox_capacity and max_inflight_msgs must be positive",
        ));
    }
    if raft.proposal_timeout_ms == 0 {
        return Err(invalid("raft.proposal_timeout_ms", "must be positive"));
    }
    Ok(())
}

/// The worker's configuration file, every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerFile {
    pub data_dir: Option<PathBuf>,
    pub coordinators: Option<Vec<String>>,
    pub listen: Option<String>,
    pub advertise_host: Option<String>,
    pub http: Option<String>,
    pub inference_grpc: Option<String>,
    pub heartbeat_interval_ms: Option<u64>,
    pub scrub_interval_ms: Option<u64>,
    pub telemetry_interval_ms: Option<u64>,
    pub onnxruntime_lib: Option<PathBuf>,
    pub tls: TlsFiles,
    pub insecure: Option<bool>,
}

/// Overrides from flags and `KILN_*` variables.
#[derive(Debug, Clone, Default)]
pub struct WorkerOverrides {
    pub data_dir: Option<PathBuf>,
    pub coordinators: Option<String>,
    pub listen: Option<String>,
    pub advertise_host: Option<String>,
    pub http: Option<String>,
    pub inference_grpc: Option<String>,
    pub heartbeat_interval_ms: Option<u64>,
    pub scrub_interval_ms: Option<u64>,
    pub telemetry_interval_ms: Option<u64>,
    pub onnxruntime_lib: Option<PathBuf>,
    pub tls: TlsFiles,
    pub insecure: bool,
}

/// A validated worker configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub data_dir: PathBuf,
    pub coordinators: Vec<String>,
    pub listen: SocketAddr,
    /// Host name or address that others use to reach this worker.
    pub advertise_host: String,
    /// Inference REST and /metrics.
    pub http: SocketAddr,
    pub inference_grpc: SocketAddr,
    pub heartbeat_interval_ms: u64,
    /// Pause between two passes of the blob scrubber, which reads and verifies
    /// every stored chunk; 0 turns it off.
    pub scrub_interval_ms: u64,
    /// Time between two telemetry reports to the leader.
    pub telemetry_interval_ms: u64,
    /// The ONNX Runtime library replicas serve with; `None` looks in the default
    /// directory and serves through tract when there is none.
    pub onnxruntime_lib: Option<PathBuf>,
    /// Node TLS; `None` only with `insecure`.
    pub tls: Option<NodeTls>,
}

/// Pause between scrub passes unless configured: six hours.
pub const DEFAULT_SCRUB_INTERVAL_MS: u64 = 6 * 3_600_000;

impl WorkerConfig {
    /// Builds the configuration from an optional file and overrides, and validates it.
    pub fn load(
        file: Option<&Path>,
        overrides: WorkerOverrides,
    ) -> Result<WorkerConfig, ConfigError> {
        let base: WorkerFile = match file {
            Some(path) => parse_file(path)?,
            None => WorkerFile::default(),
        };
        let data_dir = overrides
            .data_dir
            .or(base.data_dir)
            .unwrap_or_else(|| PathBuf::from("kiln-worker"));
        let coordinators = match overrides.coordinators {
            Some(text) => split_list(&text),
            None => base.coordinators.unwrap_or_default(),
        };
        if coordinators.is_empty() {
            return Err(invalid(
                "coordinators",
                "at least one coordinator address is required",
            ));
        }
        for addr in &coordinators {
            parse_host_port("coordinators", addr)?;
        }
        let listen = parse_addr(
            "listen",
            &overrides
                .listen
                .or(base.listen)
                .unwrap_or_else(|| "127.0.0.1:7071".into()),
        )?;
        let http = parse_addr(
            "http",
            &overrides
                .http
                .or(base.http)
                .unwrap_or_else(|| "127.0.0.1:8000".into()),
        )?;
        let inference_grpc = parse_addr(
            "inference_grpc",
            &overrides
                .inference_grpc
                .or(base.inference_grpc)
                .unwrap_or_else(|| "127.0.0.1:8001".into()),
        )?;
        let advertise_host = overrides
            .advertise_host
            .or(base.advertise_host)
            .unwrap_or_else(|| {
                if listen.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    listen.ip().to_string()
                }
            });
        let heartbeat_interval_ms = overrides
            .heartbeat_interval_ms
            .or(base.heartbeat_interval_ms)
            .unwrap_or(1_000);
        if heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be positive"));
        }
        let scrub_interval_ms = overrides
            .scrub_interval_ms
            .or(base.scrub_interval_ms)
            .unwrap_or(DEFAULT_SCRUB_INTERVAL_MS);
        let telemetry_interval_ms = overrides
            .telemetry_interval_ms
            .or(base.telemetry_interval_ms)
            .unwrap_or(5_000);
        if !(100..=600_000).contains(&telemetry_interval_ms) {
            return Err(invalid(
                "telemetry_interval_ms",
                format!("must be between 100 and 600000, got {telemetry_interval_ms}"),
            ));
        }
        let tls = node_tls(
            merge_tls(overrides.tls, base.tls),
            overrides.insecure || base.insecure.unwrap_or(false),
        )?;
        Ok(WorkerConfig {
            data_dir,
            coordinators,
            listen,
            advertise_host,
            http,
            inference_grpc,
            heartbeat_interval_ms,
            scrub_interval_ms,
            telemetry_interval_ms,
            onnxruntime_lib: overrides.onnxruntime_lib.or(base.onnxruntime_lib),
            tls,
        })
    }
}

/// A node's validated TLS files.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn merge_tls(over: TlsFiles, base: TlsFiles) -> TlsFiles {
    TlsFiles {
        ca: over.ca.or(base.ca),
        cert: over.cert.or(base.cert),
        key: over.key.or(base.key),
    }
}

/// Requires all three TLS files, or none of them with `insecure`.
fn node_tls(files: TlsFiles, insecure: bool) -> Result<Option<NodeTls>, ConfigError> {
    let any = files.ca.is_some() || files.cert.is_some() || files.key.is_some();
    if insecure {
        if any {
            return Err(invalid(
                "insecure",
                "TLS files are given too: drop --insecure or the tls settings",
            ));
        }
        return Ok(None);
    }
    match (files.ca, files.cert, files.key) {
        (Some(ca), Some(cert), Some(key)) => Ok(Some(NodeTls { ca, cert, key })),
        (ca, cert, _) => {
            let missing = if ca.is_none() {
                "tls.ca"
            } else if cert.is_none() {
                "tls.cert"
            } else {
                "tls.key"
            };
            Err(invalid(
                missing,
                "node TLS needs tls.ca, tls.cert and tls.key (make them with kiln certs), or --insecure to run without TLS",
            ))
        }
    }
}

fn parse_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message spans several lines (a caret picture); keep it on one.
        message: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// Splits a comma-separated list, dropping empty items.
pub fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("'{text}' is not a socket address like 127.0.0.1:7070"),
        )
    })
}

/// Checks that `text` looks like HOST:PORT (a name or an IP address).
pub fn parse_host_port(key: &str, text: &str) -> Result<(), ConfigError> {
    let bad = || {
        invalid(
            key,
            format!("'{text}' is not an address like 127.0.0.1:7070 or host:7070"),
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

/// Parses `1=ADDR,2=ADDR,...` into voters by id.
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    parse_peer_list(&split_list(text))
}

fn parse_peer_list(items: &[String]) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    let mut seen_addrs: BTreeMap<String, u64> = BTreeMap::new();
    for item in items {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| invalid("peers", format!("'{item}' is not of the form ID=ADDR")))?;
        let id: u64 =
            id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                invalid("peers", format!("'{item}': id must be a positive integer"))
            })?;
        let addr = addr.trim().to_string();
        parse_host_port("peers", &addr)?;
        if peers.contains_key(&id) {
            return Err(invalid("peers", format!("node {id} is listed twice")));
        }
        if let Some(other) = seen_addrs.insert(addr.clone(), id) {
            return Err(invalid(
                "peers",
                format!("address {addr} is listed twice (nodes {other} and {id})"),
            ));
        }
        peers.insert(id, addr);
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write temp file");
        file
    }

    #[test]
    fn flags_override_the_file() {
        let file = write("id = 2\nlisten = \"127.0.0.1:9000\"\npeers = [\"2=127.0.0.1:9000\"]\n[raft]\ntick_ms = 50\n");
        let cfg = CoordinatorConfig::load(
            Some(file.path()),
            CoordinatorOverrides {
                listen: Some("127.0.0.1:9001".into()),
                peers: Some("2=127.0.0.1:9001".into()),
                insecure: true,
                ..Default::default()
            },
        )
        .expect("valid config");
        assert_eq!(cfg.id, 2);
        assert_eq!(cfg.listen.port(), 9001);
        assert_eq!(cfg.advertise, "127.0.0.1:9001");
        assert_eq!(cfg.raft.tick_ms, 50);
        assert_eq!(cfg.raft.election_ticks, 10);
    }

    #[test]
    fn unknown_key_is_named() {
        let file = write("id = 1\n[raft]\ntick_msec = 5\n");
        let err = CoordinatorConfig::load(Some(file.path()), Default::default())
            .expect_err("unknown key");
        assert!(err.to_string().contains("tick_msec"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let file = write("id = \"one\"\n");
        let err =
            CoordinatorConfig::load(Some(file.path()), Default::default()).expect_err("bad value");
        assert!(err.to_string().contains("id"), "{err}");
        let err = CoordinatorConfig::load(
            None,
            CoordinatorOverrides {
                listen: Some("localhost".into()),
                ..Default::default()
            },
        )
        .expect_err("bad address");
        assert!(err.to_string().starts_with("listen:"), "{err}");
    }

    #[test]
    fn duplicate_peers_are_refused() {
        let err = parse_peers("1=127.0.0.1:1,1=127.0.0.1:2").expect_err("twice");
        assert_eq!(err.to_string(), "peers: node 1 is listed twice");
        let err = parse_peers("1=127.0.0.1:1,2=127.0.0.1:1").expect_err("same address");
        assert!(err.to_string().contains("listed twice (nodes 1 and 2)"));
        assert!(parse_peers("x=127.0.0.1:1").is_err());
        assert!(parse_peers("1=nowhere").is_err());
    }

    #[test]
    fn worker_needs_a_coordinator() {
        let err = WorkerConfig::load(None, Default::default()).expect_err("no coordinators");
        assert!(err.to_string().starts_with("coordinators:"));
        let cfg = WorkerConfig::load(
            None,
            WorkerOverrides {
                coordinators: Some("127.0.0.1:7070, 127.0.0.1:7072".into()),
                insecure: true,
                ..Default::default()
            },
        )
        .expect("valid");
        assert_eq!(cfg.coordinators.len(), 2);
        assert_eq!(cfg.heartbeat_interval_ms, 1000);
    }

    #[test]
    fn plaintext_needs_an_explicit_insecure() {
        let err = CoordinatorConfig::load(None, Default::default()).expect_err("no tls");
        assert!(err.to_string().starts_with("tls.ca:"), "{err}");
        assert!(err.to_string().contains("--insecure"), "{err}");
        let partial = CoordinatorOverrides {
            tls: TlsFiles {
                ca: Some("ca.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = CoordinatorConfig::load(None, partial.clone()).expect_err("no cert");
        assert!(err.to_string().starts_with("tls.cert:"), "{err}");
        let both = CoordinatorOverrides {
            insecure: true,
            ..partial
        };
        let err = CoordinatorConfig::load(None, both).expect_err("insecure with tls");
        assert!(err.to_string().starts_with("insecure:"), "{err}");
        let cfg = CoordinatorConfig::load(
            None,
            CoordinatorOverrides {
                insecure: true,
                ..Default::default()
            },
        )
        .expect("insecure is allowed when asked for");
        assert!(cfg.tls.is_none());
    }

    #[test]
    fn shipped_sample_configs_load() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let cfg =
            CoordinatorConfig::load(Some(&deploy.join("coordinator.toml")), Default::default())
                .expect("deploy/coordinator.toml is valid");
        assert_eq!(cfg.peers.len(), 3);
        assert_eq!(cfg.raft, RaftSettings::default());
        assert_eq!(cfg.health, HealthSettings::default());
        assert!(cfg.tls.is_some());
        let cfg = WorkerConfig::load(Some(&deploy.join("worker.toml")), Default::default())
            .expect("deploy/worker.toml is valid");
        assert_eq!(cfg.coordinators.len(), 3);
    }
}
