//! `kiln`: the one binary. Each subcommand either starts a role (coordinator,
//! worker, a local cluster) or calls a running cluster.
//!
//! The cluster address comes from `--coordinator`, then `KILN_COORDINATOR`, then
//! the `cluster.json` that `kiln local up` writes under `.kiln/`.

mod bench;
mod bench_artifacts;
mod bench_drift;
mod bench_engines;
mod bench_nccl;
mod bench_serving;
mod bench_train;
mod certs;
mod demo;
mod deployments;
mod drift;
mod jobs;
mod local;
mod models;
mod runs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use kiln_common::client::{ClientOptions, ClusterClient};
use kiln_common::config::{
    split_list, CoordinatorConfig, CoordinatorOverrides, WorkerConfig, WorkerOverrides,
};
use kiln_common::transfer as artifact;
use kiln_proto::v1::{
    ClusterStatusRequest, GetRequest, PutRequest, RemoveMemberRequest, TransferLeaderRequest,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Run the whole life of a model on a cluster you own"
)]
struct Cli {
    /// Coordinator addresses (HOST:PORT, comma-separated).
    #[arg(long, global = true, env = "KILN_COORDINATOR")]
    coordinator: Option<String>,
    /// Cluster CA certificate to verify coordinators with (default: the local
    /// cluster's, from .kiln/cluster.json; none means plaintext).
    #[arg(long, global = true, env = "KILN_CA")]
    ca: Option<PathBuf>,
    /// Bearer token (default: the local cluster's admin token, from .kiln/).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Dial another address for a node the cluster names: NAME:PORT=HOST:PORT,
    /// comma-separated (as curl's --resolve), for reaching a cluster through
    /// published ports, such as the compose cluster's from its host.
    #[arg(long, global = true, env = "KILN_RESOLVE", value_delimiter = ',')]
    resolve: Vec<String>,
    /// A file that holds the bearer token (as `token create --out` writes it);
    /// --token wins when both are given.
    #[arg(long, global = true, env = "KILN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// A node certificate of the cluster CA (with --key and --ca): the CLI calls
    /// as a cluster node, which may do everything. For bootstrapping, such as
    /// making the first admin token of a new cluster; tokens are for the rest.
    // Checked in `cluster_client`: clap cannot name a missing global argument.
    // Own ids: a global argument's id must not clash with a subcommand's (`kv put KEY`).
    #[arg(
        long = "cert",
        id = "node_cert",
        value_name = "FILE",
        global = true,
        env = "KILN_CERT"
    )]
    cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(
        long = "key",
        id = "node_key",
        value_name = "FILE",
        global = true,
        env = "KILN_KEY"
    )]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a coordinator.
    Coordinator(CoordinatorArgs),
    /// Runs a worker agent.
    Worker(WorkerArgs),
    /// Runs a whole cluster as local background processes.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Shows the leader, the term, the coordinators and the workers.
    Status {
        /// Prints JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pushes, pulls and lists versioned artifacts (datasets, checkpoints, models).
    Artifact {
        #[command(subcommand)]
        command: ArtifactCommand,
    },
    /// Submits training jobs.
    Train {
        #[command(subcommand)]
        command: TrainCommand,
    },
    /// Lists, shows, follows and cancels training jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Lists, shows, registers and aliases model versions.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Serves a model version (or an alias) on replicas behind KServe v2.
    Deploy(DeployArgs),
    /// Lists, shows and removes deployments.
    Deployments {
        #[command(subcommand)]
        command: DeploymentsCommand,
    },
    /// Drift of served data against each model version's training reference.
    Drift {
        #[command(subcommand)]
        command: DriftCommand,
    },
    /// Lists, shows and compares tracked runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// The whole life of a model on a fresh local cluster: data, 2-shard
    /// training, deployment, traffic, drift, retraining, canary and promotion.
    /// Replaces the local cluster under --dir.
    Demo {
        #[arg(long, default_value = ".kiln")]
        dir: PathBuf,
        /// Seed of the generated data and traffic.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// First port of the local cluster's layout.
        #[arg(long, default_value_t = 7070)]
        base_port: u16,
        /// Runs against the cluster that --coordinator (with --ca and --token or
        /// --token-file) names instead of a fresh local one; --dir then only
        /// holds the generated data.
        #[arg(long)]
        existing: bool,
        /// With --existing: the host name the coordinators reach this process at,
        /// for the drift webhook.
        #[arg(long, default_value = "127.0.0.1")]
        webhook_host: String,
    },
    /// Reads and writes the small replicated key-value namespace.
    Kv {
        #[command(subcommand)]
        command: KvCommand,
    },
    /// Changes the coordinator membership.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Creates, lists and revokes bearer tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Shows the audit log: who changed what, when, and how it ended.
    Audit {
        /// Only records from this long ago on, e.g. 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// At most this many records, the newest.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Makes the cluster CA and node certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Measures kiln against its peers.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Args)]
struct CoordinatorArgs {
    /// TOML configuration file.
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// This coordinator's id (positive, unique in the cluster).
    #[arg(long, env = "KILN_ID")]
    id: Option<u64>,
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC address to listen on (Raft transport and API).
    #[arg(long, env = "KILN_LISTEN")]
    listen: Option<String>,
    /// gRPC address others use to reach this node (default: --listen).
    #[arg(long, env = "KILN_ADVERTISE")]
    advertise: Option<String>,
    /// HTTP address (status, /metrics).
    #[arg(long, env = "KILN_HTTP")]
    http: Option<String>,
    /// Initial voters of a new cluster: 1=ADDR,2=ADDR,...
    #[arg(long, env = "KILN_PEERS")]
    peers: Option<String>,
    /// Address of a running member to join through.
    #[arg(long, env = "KILN_JOIN")]
    join: Option<String>,
    /// Makes a new cluster from --peers if the data dir is empty: give it on a
    /// cluster's first start only (`kiln local up` and the compose cluster do).
    /// Without it an empty data dir is refused, so that a coordinator whose data
    /// was lost never rejoins as a member with no log and no memory of its vote.
    #[arg(long)]
    bootstrap: bool,
    /// Like --bootstrap, then exits without serving (a systemd install's first
    /// step, as `initdb`).
    #[arg(long)]
    bootstrap_only: bool,
    /// Mixed into the new cluster's id at bootstrap (the same on every initial
    /// voter), so that clusters of the same peers differ.
    #[arg(long, env = "KILN_CLUSTER_TOKEN")]
    cluster_token: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args)]
struct TlsArgs {
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "KILN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This node's certificate, signed by the cluster CA (PEM).
    #[arg(long, env = "KILN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "KILN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Runs without TLS: any process that reaches the ports is trusted. Warns on
    /// every start.
    #[arg(long, env = "KILN_INSECURE")]
    insecure: bool,
}

impl TlsArgs {
    fn files(&self) -> kiln_common::config::TlsFiles {
        kiln_common::config::TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

#[derive(Args)]
struct WorkerArgs {
    /// TOML configuration file.
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "KILN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Coordinator addresses, comma-separated.
    #[arg(long, env = "KILN_COORDINATORS")]
    coordinators: Option<String>,
    /// gRPC address (blobs, collectives).
    #[arg(long, env = "KILN_LISTEN")]
    listen: Option<String>,
    /// Host that others use to reach this worker.
    #[arg(long, env = "KILN_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Inference HTTP address (KServe v2 REST, /metrics).
    #[arg(long, env = "KILN_HTTP")]
    http: Option<String>,
    /// Inference gRPC address.
    #[arg(long, env = "KILN_INFERENCE_GRPC")]
    inference_grpc: Option<String>,
    #[arg(long, env = "KILN_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    /// Pause between passes of the blob scrubber (0: off; default 6 hours).
    #[arg(long, env = "KILN_SCRUB_INTERVAL_MS")]
    scrub_interval_ms: Option<u64>,
    /// Time between two telemetry reports to the leader (default 5000).
    #[arg(long, env = "KILN_TELEMETRY_INTERVAL_MS")]
    telemetry_interval_ms: Option<u64>,
    /// ONNX Runtime library for serving (libonnxruntime.so.* from PyPI's onnxruntime
    /// wheel); unset, the worker looks in /usr/local/lib/kiln/onnxruntime and serves
    /// through tract when there is none.
    #[arg(long, env = "KILN_ONNXRUNTIME_LIB")]
    onnxruntime_lib: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Starts coordinators and workers as background processes.
    Up {
        #[arg(long, default_value_t = 3)]
        coordinators: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value = ".kiln")]
        dir: PathBuf,
        /// First port of the layout (coordinator 1 gRPC).
        #[arg(long, default_value_t = 7070)]
        base_port: u16,
        /// Coordinator TOML configuration passed to every coordinator.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Runs the nodes without TLS (they warn on every start).
        #[arg(long)]
        insecure: bool,
    },
    /// Stops the processes of a local cluster.
    Down {
        #[arg(long, default_value = ".kiln")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Checks a job spec (TOML), queues the job and prints its id.
    Submit {
        spec: PathBuf,
        /// Shows progress (epoch, step, loss, accuracy, samples/s) until the job
        /// ends; exits non-zero unless it succeeds.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Lists jobs, newest first.
    Ls {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Shows one job: state and why, shards, progress, checkpoint, run.
    Show {
        job: u64,
        #[arg(long)]
        json: bool,
    },
    /// Prints a job's log lines.
    Logs {
        job: u64,
        /// Keeps printing new lines until the job ends.
        #[arg(long, short)]
        follow: bool,
        /// Only the lines of this rank (a command job's rank writes its
        /// program's output; every line is also in the rank's log file on its
        /// worker, which the job's log names).
        #[arg(long)]
        rank: Option<u32>,
    },
    /// Cancels a job; its shards stop.
    Cancel { job: u64 },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Lists every model with its newest version.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Shows a model version (the newest unless NAME@VERSION): lineage,
    /// signature, metrics, and how many versions exist.
    Show {
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Registers an ONNX file as the next version of a model; a file the engine
    /// (ONNX Runtime where its library is given, else tract) cannot load is
    /// refused with its reason.
    Register {
        /// The ONNX file, or the directory that holds it; the external data files
        /// a model saved with them names are taken from beside it.
        #[arg(long)]
        onnx: PathBuf,
        /// ONNX Runtime library that reads the model's signature (as the worker's
        /// flag); unset, the default directory's or tract.
        #[arg(long, env = "KILN_ONNXRUNTIME_LIB")]
        onnxruntime_lib: Option<PathBuf>,
        /// The model's name.
        #[arg(long)]
        name: String,
        /// The data the model was trained on (CSV with a header): its columns
        /// become the drift monitor's reference, and the model's answers on it the
        /// reference of its outputs. Without it the model is served unmonitored.
        #[arg(long, requires = "label")]
        reference_data: Option<PathBuf>,
        /// The label column of --reference-data, left out of the features.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Points ALIAS at a version of a model (`kiln deploy --model NAME@ALIAS`).
    Alias {
        name: String,
        version: u64,
        alias: String,
    },
}

#[derive(Args)]
struct DeployArgs {
    /// The deployment's name, which is the model name clients call.
    name: String,
    /// MODEL@VERSION or MODEL@ALIAS (MODEL alone: its newest version).
    #[arg(long)]
    model: String,
    /// A fixed number of replicas (default 1).
    #[arg(long, conflicts_with_all = ["min", "max"])]
    replicas: Option<u32>,
    /// Autoscaling: fewest replicas.
    #[arg(long, requires = "max")]
    min: Option<u32>,
    /// Autoscaling: most replicas.
    #[arg(long, requires = "min")]
    max: Option<u32>,
    /// A second model version that takes --canary-percent of the requests.
    #[arg(long, requires = "canary_percent")]
    canary: Option<String>,
    #[arg(long, requires = "canary")]
    canary_percent: Option<u32>,
    /// CPUs (and inference threads) per replica (default 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// GPUs per replica: ONNX Runtime's CUDA provider on the first, placed only
    /// on workers whose library has it (onnxruntime-gpu). GPUs are never shared
    /// with training shards or other replicas. Default 0: CPUs.
    #[arg(long)]
    gpus: Option<u32>,
    /// Memory each replica is placed with, in MiB. Default: twice the model's
    /// files plus 256 MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Largest batch the dynamic batcher forms, declaring that the model's
    /// first dimension is a batch; 0: no batching, each request runs alone (as in
    /// Triton's model config). Unset: batches of up to 64 rows where the model's
    /// inputs and outputs share a dynamic first dimension and a probe at load
    /// agrees.
    #[arg(long)]
    max_batch_size: Option<u32>,
    /// Batch sizes that run as soon as they form, e.g. 4,8 (each at most the
    /// max batch size).
    #[arg(long, value_delimiter = ',')]
    preferred_batch_sizes: Vec<u32>,
    /// Model instances per replica, each running a batch at once (the engine's
    /// count when unset: one ONNX Runtime session on all the replica's CPUs, or
    /// one tract plan per CPU).
    #[arg(long)]
    instances: Option<u32>,
    /// The most an input's dimensions may be, NAME=D,D,... (* for no limit); a
    /// request beyond them is refused with 400. Repeatable.
    #[arg(long)]
    max_input_shape: Vec<String>,
    /// Longest a request waits for a batch to fill, in microseconds (default 500);
    /// a request alone in a replica never waits.
    #[arg(long)]
    max_queue_delay_us: Option<u64>,
    /// The engine replicas run on: onnxruntime or tract (default: each worker's
    /// preferred, ONNX Runtime where its library is loaded). Replicas go only to
    /// workers that run it.
    #[arg(long, value_parser = ["onnxruntime", "tract"])]
    engine: Option<String>,
    /// Most requests a replica queues before answering 429 (default 1024).
    #[arg(long)]
    queue_capacity: Option<u32>,
    /// Autoscaling target: requests in flight per replica (default 8).
    #[arg(long)]
    target_in_flight: Option<u32>,
    /// Inference without a token.
    #[arg(long)]
    public: bool,
    /// An http:// URL that receives each drift alert of the versions this
    /// deployment serves as a JSON POST (retried with backoff).
    #[arg(long)]
    drift_webhook: Option<String>,
    /// A job spec to submit when the served version's data drifts, with its
    /// dataset at the newest version of --retrain-dataset.
    #[arg(long, requires = "retrain_dataset")]
    retrain_job: Option<PathBuf>,
    /// The dataset artifact the retraining job learns from.
    #[arg(long, requires = "retrain_job")]
    retrain_dataset: Option<String>,
    /// Share of requests the retrained version gets as a canary (default 10).
    #[arg(long)]
    retrain_canary_percent: Option<u32>,
    /// Waits until every replica of this deployment is ready and older ones
    /// have retired.
    #[arg(long)]
    wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DeploymentsCommand {
    /// Lists deployments with their ready replicas.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Shows a deployment: replicas, their states and its recent decisions.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Removes a deployment; its replicas stop.
    Rm { name: String },
}

#[derive(Subcommand)]
pub(crate) enum DriftCommand {
    /// Per-feature statistics and verdicts of the newest window, the trend over
    /// the recent windows, and the alerts.
    Status {
        /// Only this model's versions.
        model: Option<String>,
        /// Windows of trend to show.
        #[arg(long, default_value_t = 10)]
        windows: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Lists runs, newest first.
    Ls {
        /// Only this experiment's runs.
        #[arg(long)]
        experiment: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Shows one run: status, params, tags, latest metrics.
    Show {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Puts runs side by side: params, final metrics, and each metric's history
    /// summarised (points, first, min, max, last).
    Compare {
        #[arg(required = true, num_args = 1..)]
        runs: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ArtifactCommand {
    /// Pushes a file or a directory as the next version of NAME.
    Push {
        path: PathBuf,
        #[arg(long)]
        name: String,
        /// Tags to point at the new version (repeatable).
        #[arg(long)]
        tag: Vec<String>,
        /// Replicas of each new chunk (default 2, fewer when fewer workers are alive).
        #[arg(long)]
        replicas: Option<u32>,
        /// A version this one derives from, NAME@VERSION (repeatable).
        #[arg(long)]
        parent: Vec<String>,
        /// The run or job that produced it.
        #[arg(long, default_value = "")]
        produced_by: String,
        #[arg(long, default_value = "")]
        media_type: String,
        /// User metadata, KEY=VALUE (repeatable).
        #[arg(long)]
        meta: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Writes NAME[@VERSION|@TAG] to a path.
    Pull {
        reference: String,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Lists artifacts with their newest version.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Lists the versions of an artifact, newest first.
    Log {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Points TAG at NAME[@VERSION|@TAG].
    Tag { reference: String, tag: String },
    /// Shows what changed between two versions: bytes shared and new, and files
    /// added, removed and changed.
    Diff {
        from: String,
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Removes chunks that no version lists (left by interrupted pushes).
    Gc {
        /// Spares chunks recorded more recently than this, e.g. 1h, 30m (default 1h).
        #[arg(long)]
        grace: Option<String>,
        /// Only counts what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Creates a token and prints it once; only its salted hash is kept.
    Create {
        #[arg(long)]
        name: String,
        /// admin, operator, viewer or inference.
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 90d, 12h, 30m (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
        /// Writes the token to FILE (mode 0600) instead of printing it. When FILE
        /// exists already nothing is created, so an init job that runs on every
        /// start makes the token once.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Lists tokens (names, roles, times; never secrets).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revokes a token on every coordinator.
    Revoke { name: String },
}

/// Parses a duration like 90d, 12h, 30m or 45s into milliseconds.
fn parse_lifetime(text: &str) -> anyhow::Result<u64> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("'{text}' is not a duration like 90d, 12h, 30m or 45s"))?;
    let unit_ms = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1_000,
        _ => bail!("'{text}' is not a duration like 90d, 12h, 30m or 45s"),
    };
    n.checked_mul(unit_ms)
        .with_context(|| format!("'{text}' is too long"))
}

fn parse_role(text: &str) -> anyhow::Result<kiln_proto::v1::Role> {
    use kiln_proto::v1::Role;
    Ok(match text {
        "admin" => Role::Admin,
        "operator" => Role::Operator,
        "viewer" => Role::Viewer,
        "inference" => Role::Inference,
        _ => bail!("--role: '{text}' is not admin, operator, viewer or inference"),
    })
}

fn role_name(role: i32) -> String {
    let role = kiln_proto::v1::Role::try_from(role).unwrap_or(kiln_proto::v1::Role::Unspecified);
    kiln_common::auth::role_name(role)
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Makes a new cluster CA (ca.pem, ca-key.pem) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Makes what is missing in DIR: the CA, and a certificate for each of
    /// --nodes valid for the node's own name and every --san. Keeps whatever
    /// exists, so a container cluster's init job can run it on every start.
    Ensure {
        #[arg(long)]
        dir: PathBuf,
        /// Node names, which are also the host names they are reached at
        /// (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// More names or addresses for every certificate, such as localhost for
        /// health probes (comma-separated).
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
    },
    /// Signs a node certificate (NAME.pem, NAME-key.pem) with the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Node name (the certificate's common name and file name).
        #[arg(long)]
        node: String,
        /// Host names or IP addresses the node is reached at (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', required = true)]
        san: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KvCommand {
    /// Writes a value.
    Put { key: String, value: String },
    /// Reads values (linearizable unless --stale), one line per key in the
    /// order given; fails naming every key not found.
    Get {
        #[arg(required = true, num_args = 1..=MAX_KV_GET_KEYS)]
        keys: Vec<String>,
        #[arg(long)]
        stale: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Removes a coordinator from the membership.
    RemoveCoordinator { id: u64 },
    /// Hands leadership to another voter.
    TransferLeader { id: u64 },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Chunking and hashing GB/s against memcpy, and the average chunk size sweep.
    Chunking {
        /// MiB of random bytes to chunk.
        #[arg(long, default_value_t = 1024)]
        size_mib: usize,
        /// MiB of CSV for the average chunk size sweep.
        #[arg(long, default_value_t = 256)]
        csv_mib: usize,
        #[arg(long)]
        json: bool,
    },
    /// Artifact push and pull MB/s against DVC with a local remote (pip install dvc).
    Artifacts {
        /// MiB of the CSV file pushed.
        #[arg(long, default_value_t = 1024)]
        size_mib: usize,
        /// Scratch directory (emptied first, removed after a run that succeeds).
        #[arg(long, default_value = ".kiln/bench-artifacts")]
        dir: PathBuf,
        #[arg(long, default_value_t = 18070)]
        base_port: u16,
        #[arg(long)]
        json: bool,
    },
    /// The ring all-reduce's bus bandwidth against torch.distributed's gloo
    /// (`--python` with torch installed) and memcpy.
    Allreduce {
        /// World sizes, comma-separated (above the core count they oversubscribe).
        #[arg(long, default_value = "2,4")]
        worlds: String,
        /// Buffer sizes in MiB, comma-separated.
        #[arg(long, default_value = "1,4,16,64,256")]
        sizes_mib: String,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// The ring's TCP frame size in KiB (0: its default).
        #[arg(long, default_value_t = 0)]
        chunk_kib: usize,
        /// What carries the ring's frames, comma-separated: `lane` (shared
        /// memory, as ranks on one host use) and `tcp` (as between hosts).
        #[arg(long, default_value = "lane,tcp")]
        carriers: String,
        /// A Python with torch, to measure gloo in the same run.
        #[arg(long)]
        python: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One training shard's samples/s on an MLP 64-256-256-10, batch 256, AdamW,
    /// against PyTorch on the same model (`--python` with torch installed).
    Train {
        /// Threads for the matrix products (and torch's intra-op threads).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Run the pass on this CUDA device, and PyTorch on the same one (a kiln
        /// built with the cuda feature).
        #[arg(long)]
        gpu: Option<u32>,
        /// A Python with torch, to measure PyTorch in the same run.
        #[arg(long)]
        python: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The time to judge one drift window against Evidently's DataDriftPreset on
    /// the same data (`--python` with evidently installed), and the verdicts.
    Drift {
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 100)]
        features: usize,
        /// Columns of the current table moved by half a standard deviation.
        #[arg(long, default_value_t = 30)]
        shifted: usize,
        /// A Python with evidently, to measure it in the same run.
        #[arg(long)]
        python: Option<String>,
        /// Where the tables go for the Python peer (removed after).
        #[arg(long, default_value = "/tmp/kiln-bench-drift")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The serving engine in-process: rows/s of a model at batch 1 and 64 on the
    /// calling thread, and of one-row requests through the dynamic batcher (the
    /// ceiling the servers are measured against).
    ServingEngine {
        /// The ONNX model (input [batch, N] FP32).
        #[arg(long)]
        onnx: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// tract against ONNX Runtime on every exported model (scripts/models.sh's
    /// directory: each `<model>.onnx` with its `<model>.expected.json` sample):
    /// whether each engine loads it, the median time of one run of the sample on
    /// the calling thread, and the largest difference from onnxruntime in Python.
    Engines {
        /// The export directory (printed by scripts/models.sh's kiln_exported_models).
        #[arg(long)]
        models: PathBuf,
        /// libonnxruntime.so.* (default: the worker's default directory).
        #[arg(long, env = "KILN_ONNXRUNTIME_LIB")]
        onnxruntime_lib: Option<PathBuf>,
        /// Seconds per model and engine.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// NCCL all-reduce time and bandwidth on this machine's GPUs, one rank per GPU
    /// (needs a kiln built with the cuda feature, libcuda and libnccl).
    Nccl {
        /// Ranks, one per GPU: CUDA devices 0 to ranks - 1.
        #[arg(long, default_value_t = 1)]
        ranks: usize,
        /// Buffer sizes, comma-separated, with K, M or G (powers of 1024).
        #[arg(long, default_value = "64M")]
        bytes: String,
        /// Untimed all-reduces before each timed run.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Timed all-reduces per size and path.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        json: bool,
    },
    /// Committed writes/s, commit latency and leader failover of the control plane.
    Raft {
        /// Concurrent clients per level, comma-separated.
        #[arg(long, default_value = "1,16,64")]
        clients: String,
        /// Seconds of load per level.
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        /// Leader kills to time.
        #[arg(long, default_value_t = 5)]
        failovers: usize,
        /// Also measures a 3-member etcd cluster under the same load.
        #[arg(long)]
        etcd: bool,
        /// Also measures kiln with mutual TLS between nodes and clients.
        #[arg(long)]
        tls: bool,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        /// Scratch directory for the benchmark clusters.
        #[arg(long, default_value = ".kiln/bench")]
        dir: PathBuf,
        #[arg(long, default_value_t = 17070)]
        base_port: u16,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "{}",
                if line.starts_with("error:") {
                    line.to_string()
                } else {
                    format!("error: {line}")
                }
            );
            return ExitCode::from(2);
        }
    };
    if let Err(e) = check_kiln_variables() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // kiln numbers GPUs as NVML does (by PCI bus: the workers' reports, the
    // scheduler's placements); CUDA numbers them fastest first unless told
    // otherwise. Set before any thread starts, so that the CUDA ordinal a shard
    // opens is the GPU it was given.
    if std::env::var_os("CUDA_DEVICE_ORDER").is_none() {
        std::env::set_var("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    }
    kiln_common::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            eprintln!(
                "error: {}",
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let conn = Connection {
        coordinator: cli.coordinator,
        ca: cli.ca,
        token: match (cli.token, cli.token_file) {
            (Some(token), _) => Some(token),
            (None, Some(file)) => Some(
                std::fs::read_to_string(&file)
                    .with_context(|| format!("read the token file {}", file.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        },
        resolve: parse_resolve(&cli.resolve)?,
        node: match (cli.cert, cli.key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => bail!("--cert needs --key, the certificate's private key"),
            (None, Some(_)) => bail!("--key needs --cert"),
        },
    };
    match cli.command {
        Command::Coordinator(args) => {
            let config = CoordinatorConfig::load(
                args.config.as_deref(),
                CoordinatorOverrides {
                    id: args.id,
                    data_dir: args.data_dir,
                    listen: args.listen,
                    advertise: args.advertise,
                    http: args.http,
                    peers: args.peers,
                    join: args.join,
                    cluster_token: args.cluster_token,
                    bootstrap: args.bootstrap,
                    bootstrap_only: args.bootstrap_only,
                    tls: args.tls.files(),
                    insecure: args.tls.insecure,
                },
            )?;
            kiln_coordinator::run(config, shutdown_on_signal()?).await
        }
        Command::Worker(args) => {
            let config = WorkerConfig::load(
                args.config.as_deref(),
                WorkerOverrides {
                    data_dir: args.data_dir,
                    coordinators: args.coordinators,
                    listen: args.listen,
                    advertise_host: args.advertise_host,
                    http: args.http,
                    inference_grpc: args.inference_grpc,
                    heartbeat_interval_ms: args.heartbeat_interval_ms,
                    scrub_interval_ms: args.scrub_interval_ms,
                    telemetry_interval_ms: args.telemetry_interval_ms,
                    onnxruntime_lib: args.onnxruntime_lib,
                    tls: args.tls.files(),
                    insecure: args.tls.insecure,
                },
            )?;
            kiln_worker::run(config, shutdown_on_signal()?).await
        }
        Command::Local { command } => match command {
            LocalCommand::Up {
                coordinators,
                workers,
                dir,
                base_port,
                config,
                insecure,
            } => {
                let coordinator_config = match config {
                    Some(path) => Some(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("read {}", path.display()))?,
                    ),
                    None => None,
                };
                let opts = local::LocalOptions {
                    coordinators,
                    workers,
                    dir,
                    base_port,
                    coordinator_config,
                    insecure,
                    worker_args: Vec::new(),
                };
                let info = local::up(&opts).await?;
                local::print_endpoints(&info);
                Ok(())
            }
            LocalCommand::Down { dir } => {
                let stopped = local::down(&dir).await?;
                println!("stopped {stopped} processes");
                Ok(())
            }
        },
        Command::Token { command } => {
            let client = cluster_client(&conn)?;
            match command {
                TokenCommand::Create {
                    name,
                    role,
                    expires,
                    out,
                } => {
                    if let Some(out) = out.as_deref().filter(|out| out.exists()) {
                        println!("{} exists already: no new token", out.display());
                        return Ok(());
                    }
                    let req = kiln_proto::v1::CreateTokenRequest {
                        name,
                        role: parse_role(&role)? as i32,
                        expires_in_ms: expires
                            .as_deref()
                            .map(parse_lifetime)
                            .transpose()?
                            .unwrap_or(0),
                    };
                    let resp = client
                        .call(|mut c| {
                            let req = req.clone();
                            async move { c.create_token(req).await.map(|r| r.into_inner()) }
                        })
                        .await?;
                    match out {
                        Some(out) => {
                            certs::write_new(&out, &format!("{}\n", resp.token), 0o600)?;
                            println!("token {} written to {}", req.name, out.display());
                        }
                        // The one time the secret is shown.
                        None => println!("{}", resp.token),
                    }
                }
                TokenCommand::Ls { json } => {
                    let resp = client
                        .call(|mut c| async move {
                            c.list_tokens(kiln_proto::v1::ListTokensRequest {})
                                .await
                                .map(|r| r.into_inner())
                        })
                        .await?;
                    if json {
                        let doc: Vec<_> = resp
                            .tokens
                            .iter()
                            .map(|t| {
                                serde_json::json!({
                                    "name": t.name,
                                    "role": role_name(t.role),
                                    "created_at_ms": t.created_at_ms,
                                    "expires_at_ms": t.expires_at_ms,
                                })
                            })
                            .collect();
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    } else {
                        println!(
                            "{:<24} {:<10} {:>15} {:>15}",
                            "name", "role", "created_at_ms", "expires_at_ms"
                        );
                        for t in &resp.tokens {
                            println!(
                                "{:<24} {:<10} {:>15} {:>15}",
                                t.name,
                                role_name(t.role),
                                t.created_at_ms,
                                t.expires_at_ms
                            );
                        }
                    }
                }
                TokenCommand::Revoke { name } => {
                    let req = kiln_proto::v1::RevokeTokenRequest { name: name.clone() };
                    client
                        .call(|mut c| {
                            let req = req.clone();
                            async move { c.revoke_token(req).await.map(|r| r.into_inner()) }
                        })
                        .await?;
                    println!("revoked token {name}");
                }
            }
            Ok(())
        }
        Command::Audit { since, limit, json } => {
            let client = cluster_client(&conn)?;
            let since_ms = match since {
                Some(text) => kiln_common::clock::now_ms().saturating_sub(parse_lifetime(&text)?),
                None => 0,
            };
            let resp = client
                .call(|mut c| async move {
                    c.list_audit(kiln_proto::v1::ListAuditRequest { since_ms, limit })
                        .await
                        .map(|r| r.into_inner())
                })
                .await?;
            if json {
                let doc: Vec<_> = resp
                    .records
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "seq": r.seq,
                            "at_ms": r.at_ms,
                            "who": r.who,
                            "what": r.what,
                            "outcome": r.outcome,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                for r in &resp.records {
                    println!(
                        "{:>8} {:>15} {:<28} {:<40} {}",
                        r.seq, r.at_ms, r.who, r.what, r.outcome
                    );
                }
            }
            Ok(())
        }
        Command::Certs { command } => match command {
            CertsCommand::Init { dir } => {
                let ca = certs::init(&dir)?;
                println!(
                    "cluster CA: {} (key {})",
                    ca.cert.display(),
                    ca.key.display()
                );
                Ok(())
            }
            CertsCommand::Ensure { dir, nodes, san } => {
                for made in certs::ensure(&dir, &nodes, &san)? {
                    println!("made {}", made.display());
                }
                Ok(())
            }
            CertsCommand::Issue { dir, node, san } => {
                let issued = certs::issue(&dir, &node, &san)?;
                println!(
                    "{}: {} (key {})",
                    node,
                    issued.cert.display(),
                    issued.key.display()
                );
                Ok(())
            }
        },
        Command::Status { json } => {
            let client = cluster_client(&conn)?;
            let status = client
                .call(|mut c| async move {
                    c.cluster_status(ClusterStatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                })
                .await?;
            if json {
                let doc = kiln_common::status::cluster_status_json(&status);
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Artifact { command } => run_artifact(&conn, command).await,
        Command::Runs { command } => runs::run(cluster_client(&conn)?, command).await,
        Command::Train { command } => jobs::train(cluster_client(&conn)?, command).await,
        Command::Jobs { command } => jobs::run(cluster_client(&conn)?, command).await,
        Command::Models { command } => models::run(cluster_client(&conn)?, command).await,
        Command::Deploy(args) => deployments::deploy(cluster_client(&conn)?, args).await,
        Command::Deployments { command } => deployments::run(cluster_client(&conn)?, command).await,
        Command::Drift { command } => drift::run(cluster_client(&conn)?, command).await,
        Command::Demo {
            dir,
            seed,
            base_port,
            existing,
            webhook_host,
        } => {
            let existing = if existing {
                let Some(coordinators) = conn.coordinator.as_deref() else {
                    bail!("--existing needs --coordinator (or KILN_COORDINATOR): the cluster to run against");
                };
                Some(demo::ExistingCluster {
                    coordinators: split_list(coordinators),
                    ca: conn.ca.clone(),
                    token: conn.token.clone(),
                    webhook_host,
                })
            } else {
                None
            };
            demo::run(demo::DemoOptions {
                dir,
                seed,
                base_port,
                existing,
            })
            .await
        }
        Command::Kv { command } => {
            let client = cluster_client(&conn)?;
            match command {
                KvCommand::Put { key, value } => {
                    let req = PutRequest {
                        key,
                        value: value.into_bytes(),
                    };
                    let resp = client
                        .call(|mut c| {
                            let req = req.clone();
                            async move { c.put(req).await.map(|r| r.into_inner()) }
                        })
                        .await?;
                    println!("committed at index {}", resp.index);
                }
                KvCommand::Get { keys, stale } => {
                    let mut missing = Vec::new();
                    let mut out = String::new();
                    for key in keys {
                        let req = GetRequest {
                            key: key.clone(),
                            stale,
                        };
                        let resp = client
                            .call(|mut c| {
                                let req = req.clone();
                                async move { c.get(req).await.map(|r| r.into_inner()) }
                            })
                            .await?;
                        if resp.found {
                            out.push_str(&String::from_utf8_lossy(&resp.value));
                            out.push('\n');
                        } else {
                            missing.push(key);
                        }
                    }
                    if !missing.is_empty() {
                        bail!("not found: {}", missing.join(", "));
                    }
                    print!("{out}");
                }
            }
            Ok(())
        }
        Command::Admin { command } => {
            let client = cluster_client(&conn)?;
            match command {
                AdminCommand::RemoveCoordinator { id } => {
                    let resp = client
                        .call_with_deadline(Duration::from_secs(15), |mut c| async move {
                            c.remove_member(RemoveMemberRequest { id })
                                .await
                                .map(|r| r.into_inner())
                        })
                        .await?;
                    println!("removed coordinator {id}; voters now {:?}", resp.voters);
                }
                AdminCommand::TransferLeader { id } => {
                    client
                        .call(|mut c| async move {
                            c.transfer_leader(TransferLeaderRequest { to: id })
                                .await
                                .map(|r| r.into_inner())
                        })
                        .await?;
                    println!("asked the leader to hand over to coordinator {id}");
                }
            }
            Ok(())
        }
        Command::Bench { command } => match command {
            BenchCommand::Train {
                threads,
                steps,
                gpu,
                python,
                json,
            } => {
                let report = bench_train::train(threads, steps, gpu, python.as_deref())?;
                bench::show(&report, json)
            }
            BenchCommand::Drift {
                rows,
                features,
                shifted,
                python,
                dir,
                json,
            } => {
                let report = bench_drift::drift(rows, features, shifted, python.as_deref(), &dir)?;
                bench::show(&report, json)
            }
            BenchCommand::ServingEngine {
                onnx,
                seconds,
                json,
            } => {
                let report = bench_serving::engine(&onnx, seconds).await?;
                bench::show(&report, json)
            }
            BenchCommand::Engines {
                models,
                onnxruntime_lib,
                seconds,
                json,
            } => {
                let report = tokio::task::spawn_blocking(move || {
                    bench_engines::engines(&models, onnxruntime_lib.as_deref(), seconds)
                })
                .await??;
                bench::show(&report, json)
            }
            BenchCommand::Allreduce {
                worlds,
                sizes_mib,
                iters,
                warmup,
                chunk_kib,
                carriers,
                python,
                json,
            } => {
                let carriers: Vec<_> = split_list(&carriers)
                    .iter()
                    .map(|c| bench_train::carrier(c))
                    .collect::<anyhow::Result<_>>()?;
                let worlds: Vec<usize> = split_list(&worlds)
                    .iter()
                    .map(|w| {
                        w.parse()
                            .with_context(|| format!("--worlds: {w} is not a number"))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let sizes: Vec<usize> = split_list(&sizes_mib)
                    .iter()
                    .map(|s| {
                        s.parse::<usize>()
                            .map(|m| m << 20)
                            .with_context(|| format!("--sizes-mib: {s} is not a number"))
                    })
                    .collect::<anyhow::Result<_>>()?;
                if iters == 0 || worlds.iter().any(|w| *w < 2) {
                    bail!("--iters must be above 0 and every world at least 2");
                }
                let report = tokio::task::spawn_blocking(move || {
                    bench_train::allreduce(
                        &worlds,
                        &sizes,
                        iters,
                        warmup,
                        chunk_kib << 10,
                        &carriers,
                        python.as_deref(),
                    )
                })
                .await??;
                bench::show(&report, json)
            }
            BenchCommand::Chunking {
                size_mib,
                csv_mib,
                json,
            } => {
                let report = tokio::task::spawn_blocking(move || {
                    bench_artifacts::chunking(size_mib, csv_mib)
                })
                .await??;
                bench::show(&report, json)
            }
            BenchCommand::Artifacts {
                size_mib,
                dir,
                base_port,
                json,
            } => {
                let report = bench_artifacts::artifacts(size_mib, &dir, base_port).await?;
                bench::show(&report, json)
            }
            BenchCommand::Nccl {
                ranks,
                bytes,
                warmup,
                iters,
                json,
            } => {
                let sizes = split_list(&bytes)
                    .iter()
                    .map(|b| bench_nccl::parse_bytes(b).context("--bytes"))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let options = bench_nccl::NcclBenchOptions {
                    ranks,
                    sizes,
                    warmup,
                    iters,
                };
                let report =
                    tokio::task::spawn_blocking(move || bench_nccl::run(options)).await??;
                bench::show(&report, json)
            }
            BenchCommand::Raft {
                clients,
                duration_secs,
                failovers,
                etcd,
                tls,
                value_size,
                dir,
                base_port,
                json,
            } => {
                let clients = split_list(&clients)
                    .iter()
                    .map(|c| {
                        c.parse::<usize>()
                            .with_context(|| format!("--clients: '{c}' is not a number"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let report = bench::run(bench::BenchOptions {
                    clients,
                    duration: Duration::from_secs(duration_secs),
                    failovers,
                    etcd,
                    tls,
                    value_size,
                    dir,
                    base_port,
                })
                .await?;
                bench::show(&report, json)
            }
        },
    }
}

/// Most keys one `kiln kv get` reads.
const MAX_KV_GET_KEYS: usize = 100_000;

/// Variables read outside clap: the log filter, and the binary the tests run.
const OTHER_VARIABLES: &[&str] = &["KILN_LOG", "KILN_BIN"];

/// The prefix of deploy/compose's settings (`KILN_COMPOSE_IMAGE`, ...), which
/// docker-compose reads, not kiln: a shell that drives the compose cluster also
/// runs the CLI.
const COMPOSE_PREFIX: &str = "KILN_COMPOSE_";

/// Refuses `KILN_*` variables that no flag reads: a misspelt one would otherwise be
/// ignored without a word.
fn check_kiln_variables() -> anyhow::Result<()> {
    use clap::CommandFactory;
    fn collect(cmd: &clap::Command, known: &mut std::collections::BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(name) = arg.get_env() {
                known.insert(name.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            collect(sub, known);
        }
    }
    let mut known: std::collections::BTreeSet<String> =
        OTHER_VARIABLES.iter().map(|s| s.to_string()).collect();
    collect(&Cli::command(), &mut known);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("KILN_")
            && !name.starts_with(COMPOSE_PREFIX)
            && !known.contains(name.as_ref())
        {
            bail!(
                "unknown variable {name}: kiln reads {}",
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(())
}

/// Returns a token cancelled on SIGTERM or SIGINT.
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}

async fn run_artifact(conn: &Connection, command: ArtifactCommand) -> anyhow::Result<()> {
    let client = std::sync::Arc::new(cluster_client(conn)?);
    match command {
        ArtifactCommand::Push {
            path,
            name,
            tag,
            replicas,
            parent,
            produced_by,
            media_type,
            meta,
            json,
        } => {
            let mut metadata = std::collections::BTreeMap::new();
            for pair in meta {
                let (k, v) = pair
                    .split_once('=')
                    .with_context(|| format!("--meta {pair}: expected KEY=VALUE"))?;
                metadata.insert(k.to_string(), v.to_string());
            }
            let options = artifact::PushOptions {
                name,
                tags: tag,
                replicas: replicas.unwrap_or(0),
                parents: parent,
                produced_by,
                media_type,
                metadata,
                quiet: false,
            };
            let report = artifact::push(client, &path, options).await?;
            if !report.warning.is_empty() {
                eprintln!("warning: {}", report.warning);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pushed {}@{}: {} file(s), {} bytes in {} chunks; {} new chunks ({} bytes) \
                     on {} replica(s); {:.1} MB/s",
                    report.name,
                    report.version,
                    report.files,
                    report.bytes,
                    report.chunks,
                    report.new_chunks,
                    report.new_bytes,
                    report.replicas,
                    report.bytes as f64 / 1e6 / report.seconds.max(1e-9)
                );
            }
        }
        ArtifactCommand::Pull {
            reference,
            output,
            json,
        } => {
            let report = artifact::pull(client, &reference, &output, false).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pulled {}@{} to {}: {} file(s), {} bytes; {:.1} MB/s",
                    report.name,
                    report.version,
                    report.path.display(),
                    report.files,
                    report.bytes,
                    report.bytes as f64 / 1e6 / report.seconds.max(1e-9)
                );
            }
        }
        ArtifactCommand::Ls { json } => {
            let resp = client
                .call(|mut c| async move {
                    c.list_artifacts(kiln_proto::v1::ListArtifactsRequest {})
                        .await
                        .map(|r| r.into_inner())
                })
                .await?;
            if json {
                let doc: Vec<_> = resp
                    .artifacts
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "name": a.name,
                            "latest": a.latest,
                            "size": a.size,
                            "updated_at_ms": a.updated_at_ms,
                            "tags": a.tags,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("{:<32} {:>7} {:>14}  tags", "name", "latest", "bytes");
                for a in &resp.artifacts {
                    println!(
                        "{:<32} {:>7} {:>14}  {}",
                        a.name,
                        a.latest,
                        a.size,
                        a.tags.join(" ")
                    );
                }
            }
        }
        ArtifactCommand::Log { name, json } => {
            let req = kiln_proto::v1::ListVersionsRequest { name };
            let resp = client
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.list_versions(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            if json {
                let doc: Vec<_> = resp
                    .versions
                    .iter()
                    .map(|v| {
                        serde_json::json!({
                            "name": v.name,
                            "version": v.version,
                            "size": v.size,
                            "digest": hex::encode(&v.digest),
                            "created_at_ms": v.created_at_ms,
                            "created_by": v.created_by,
                            "directory": v.directory,
                            "media_type": v.media_type,
                            "metadata": v.metadata,
                            "parents": v.parents,
                            "produced_by": v.produced_by,
                            "replicas": v.replicas,
                            "tags": v.tags,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!(
                    "{:>7} {:>14} {:<16} {:<20} tags",
                    "version", "bytes", "digest", "created_by"
                );
                for v in &resp.versions {
                    let digest = hex::encode(&v.digest);
                    println!(
                        "{:>7} {:>14} {:<16} {:<20} {}",
                        v.version,
                        v.size,
                        &digest[..digest.len().min(16)],
                        v.created_by,
                        v.tags.join(" ")
                    );
                }
            }
        }
        ArtifactCommand::Tag { reference, tag } => {
            let (name, selector) = kiln_common::artifact::parse_reference(&reference)?;
            let req = kiln_proto::v1::TagArtifactRequest {
                name: name.clone(),
                tag: tag.clone(),
                reference: selector.to_string(),
            };
            let resp = client
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.tag_artifact(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            println!("{name}@{tag} -> {}", resp.version);
        }
        ArtifactCommand::Diff { from, to, json } => {
            let d = artifact::diff(client, &from, &to).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("{} -> {}", d.from, d.to);
                println!("bytes: {} shared, {} new", d.shared_bytes, d.new_bytes);
                println!(
                    "files: {} added, {} removed, {} changed, {} unchanged",
                    d.added.len(),
                    d.removed.len(),
                    d.changed.len(),
                    d.unchanged
                );
                for (mark, paths) in [("+", &d.added), ("-", &d.removed), ("~", &d.changed)] {
                    for p in paths {
                        println!("  {mark} {p}");
                    }
                }
            }
        }
        ArtifactCommand::Gc {
            grace,
            dry_run,
            json,
        } => {
            let req = kiln_proto::v1::CollectGarbageRequest {
                grace_ms: grace
                    .as_deref()
                    .map(parse_lifetime)
                    .transpose()?
                    .unwrap_or(0),
                dry_run,
            };
            let resp = client
                .call_with_deadline(std::time::Duration::from_secs(300), |mut c| async move {
                    c.collect_garbage(req).await.map(|r| r.into_inner())
                })
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "chunks": resp.chunks,
                        "bytes": resp.bytes,
                        "pending": resp.pending,
                        "dry_run": dry_run,
                    })
                );
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                println!("{verb} {} chunk(s), {} bytes", resp.chunks, resp.bytes);
                if resp.pending > 0 {
                    println!(
                        "{} chunk(s) stay on disk on workers that did not answer (their records are gone)",
                        resp.pending
                    );
                }
            }
        }
    }
    Ok(())
}

/// How the CLI reaches the cluster: the global flags.
struct Connection {
    coordinator: Option<String>,
    ca: Option<PathBuf>,
    token: Option<String>,
    /// A node certificate and key to call with (`--cert`, `--key`).
    node: Option<(PathBuf, PathBuf)>,
    /// Addresses to dial instead (`--resolve`).
    resolve: HashMap<String, String>,
}

/// Parses `--resolve` entries (`NAME:PORT=HOST:PORT`).
fn parse_resolve(entries: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    for entry in entries.iter().filter(|e| !e.trim().is_empty()) {
        let Some((name, dial)) = entry.trim().split_once('=') else {
            bail!("--resolve {entry}: expected NAME:PORT=HOST:PORT");
        };
        kiln_common::config::parse_host_port("--resolve", name)?;
        kiln_common::config::parse_host_port("--resolve", dial)?;
        map.insert(name.to_string(), dial.to_string());
    }
    Ok(map)
}

fn cluster_client(cli: &Connection) -> anyhow::Result<ClusterClient> {
    let flag = cli.coordinator.as_deref();
    let ca = cli.ca.as_deref();
    let dir = Path::new(".kiln");
    let local = if dir.join(local::CLUSTER_FILE).exists() {
        Some(local::read_cluster(dir)?)
    } else {
        None
    };
    let endpoints = match (flag, &local) {
        (Some(list), _) => split_list(list),
        (None, Some(info)) => info.coordinator_addrs(),
        (None, None) => bail!("no coordinator address: pass --coordinator, set KILN_COORDINATOR, or start a local cluster with kiln local up"),
    };
    for addr in &endpoints {
        kiln_common::config::parse_host_port("--coordinator", addr)?;
    }
    let ca = ca
        .map(Path::to_path_buf)
        .or_else(|| local.as_ref().and_then(|info| info.ca.clone()));
    let tls = match (ca, &cli.node) {
        (Some(ca), Some((cert, key))) => Some(kiln_common::tls::TlsMaterial::node(&ca, cert, key)?),
        (Some(ca), None) => Some(kiln_common::tls::TlsMaterial::client(&ca)?),
        (None, Some(_)) => {
            bail!("--cert needs --ca, the cluster CA that signed it and the coordinators' certificates")
        }
        (None, None) => None,
    };
    let token = match (&cli.token, &local) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(info)) => local::read_token(info)?,
        (None, None) => None,
    };
    Ok(ClusterClient::new(
        endpoints,
        ClientOptions {
            tls,
            token,
            resolve: cli.resolve.clone(),
            ..ClientOptions::default()
        },
    )?)
}

fn print_status(s: &kiln_proto::v1::ClusterStatusResponse) {
    use kiln_common::status::worker_state_name;
    if s.leader_id == 0 {
        println!("leader: none (no quorum)   term: {}", s.term);
    } else {
        println!(
            "leader: {}   term: {}   commit: {}",
            s.leader_id, s.term, s.commit_index
        );
    }
    println!("\ncoordinators");
    println!(
        "  {:<4} {:<22} {:<22} {:<12} healthy",
        "id", "addr", "http", "role"
    );
    for c in &s.coordinators {
        println!(
            "  {:<4} {:<22} {:<22} {:<12} {}",
            c.id, c.addr, c.http_addr, c.role, c.healthy
        );
    }
    println!("\nworkers");
    if s.workers.is_empty() {
        println!("  (none)");
    }
    for w in &s.workers {
        let r = w.resources.clone().unwrap_or_default();
        println!(
            "  {}  {:<8} {:<22} cpus {:<3} mem {:>6.1} GiB  gpus {}  inference {} / {}",
            w.id,
            worker_state_name(w.state),
            w.addr,
            r.cpu_cores,
            r.memory_bytes as f64 / (1u64 << 30) as f64,
            r.gpus.len(),
            w.inference_http_addr,
            w.inference_grpc_addr
        );
        if !r.memory_limits.is_empty() {
            println!("      memory limits of job ranks: {}", r.memory_limits);
        }
    }
    if !s.hosts.is_empty() {
        println!("\nhost load (last telemetry)");
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        for h in &s.hosts {
            let host = h.host.clone().unwrap_or_default();
            let gpus: Vec<String> = host
                .gpus
                .iter()
                .map(|g| {
                    format!(
                        "gpu{} {}% {:.1}/{:.1} GiB",
                        g.index,
                        g.utilization_percent,
                        gib(g.memory_used_bytes),
                        gib(g.memory_total_bytes)
                    )
                })
                .collect();
            println!(
                "  {}  cpu {:>5.1}%  mem {:.1}/{:.1} GiB  disk free {:.1}/{:.1} GiB  {}s ago{}",
                h.worker_id,
                host.cpu_percent,
                gib(host.memory_used_bytes),
                gib(host.memory_total_bytes),
                gib(host.disk_free_bytes),
                gib(host.disk_total_bytes),
                kiln_common::clock::now_ms().saturating_sub(h.reported_at_ms) / 1000,
                if gpus.is_empty() {
                    String::new()
                } else {
                    format!("  {}", gpus.join(", "))
                }
            );
        }
    }
    println!("\ndeployments");
    if s.deployments.is_empty() {
        println!("  (none)");
    }
    for d in &s.deployments {
        let health = if d.ready >= d.wanted && d.failed == 0 {
            "healthy"
        } else {
            "degraded"
        };
        println!(
            "  {:<20} {:<24} {health:<9} ready {}/{}  starting {}  failed {}{}",
            d.name,
            d.model,
            d.ready,
            d.wanted,
            d.starting,
            d.failed,
            if d.canary.is_empty() {
                String::new()
            } else {
                format!("  canary {}", d.canary)
            }
        );
    }
    println!("\njobs (pending and running)");
    if s.jobs.is_empty() {
        println!("  (none)");
    }
    for j in &s.jobs {
        println!("  {:<6} {:<24} {:<8} {}", j.id, j.name, j.state, j.reason);
    }
}
