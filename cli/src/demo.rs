//! `kiln demo`: the whole life of a model on a fresh local cluster, in a few
//! minutes and with nothing but the `kiln` binary.
//!
//! 1. A local cluster (3 coordinators, 2 workers) under `--dir`, replacing the
//!    one there, with drift windows of a few seconds so the story fits in minutes.
//! 2. A dataset generated from `--seed` ("the calm world") pushed as an artifact.
//! 3. A 2-shard training job on it, registered as a model version with its
//!    training reference statistics.
//! 4. The model deployed on both workers with a drift webhook (a receiver in this
//!    process) and a retrain policy (the same job on the dataset's newest version,
//!    canaried at 25%).
//! 5. Traffic from the calm world, each answer labelled through the feedback
//!    endpoint a moment later (the ground truth arrives): no drift.
//! 6. The world shifts: new data is pushed as the dataset's next version and the
//!    traffic comes from the shifted world: a dataset-drift alert, to `kiln drift
//!    status` and the webhook.
//! 7. The retrain policy trains on the new version, canaries the new model and
//!    judges it on live traffic and labels: promoted (or rolled back).
//! 8. A summary: the timeline, the live accuracy of each version, the dashboard
//!    URL and the token to open it.
//!
//! Every visible step is the CLI command a user would type, printed before it
//! runs (through the same code as the typed command).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kiln_common::client::{ClientOptions, ClusterClient};
use kiln_common::https::{self, ClientSettings, HttpClient};
use kiln_common::tls::TlsMaterial;
use kiln_proto::v1::DriftStatusRequest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::local::{self, ClusterInfo, LocalOptions};

/// The coordinators' settings for the demo: windows of 4 s (60 s by default),
/// canaries judged after 12 s and 100 requests. The demo's story is the answers'
/// accuracy; a p99 within 25 ms passes, as five processes and the traffic share
/// two cores here and a latency spike would otherwise decide the verdict.
const DEMO_CONFIG: &str = "[drift]\nwindow_ms = 4000\nmin_rows = 200\n\n\
    [canary]\njudge_after_ms = 12000\nmin_requests = 100\nmin_labelled = 50\nlatency_slack_ms = 25.0\n";
/// Features of the generated data.
const FEATURES: [&str; 4] = ["income", "debt", "age", "tenure"];
/// Classes of the label, in the order the trainer numbers them (sorted).
const CLASSES: [&str; 3] = ["high", "low", "mid"];
/// Rows of each dataset version.
const DATASET_ROWS: usize = 20_000;
/// Rows per inference request.
const ROWS_PER_REQUEST: usize = 8;
/// Inference requests in flight at once.
const CLIENTS: usize = 2;
/// Longest the demo waits for each stage (an alert, a job, a verdict).
const STAGE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest one HTTP call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What `kiln demo` was asked.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The local cluster's directory; with `existing`, where the generated data
    /// and job spec are written.
    pub dir: PathBuf,
    pub seed: u64,
    pub base_port: u16,
    /// Runs against this cluster instead of starting a local one.
    pub existing: Option<ExistingCluster>,
}

/// A running cluster the demo uses instead of a fresh local one (such as the
/// compose cluster). Its `[drift]` and `[canary]` settings decide how long the
/// demo takes: deploy/compose's demo override gives it the demo's.
#[derive(Debug, Clone)]
pub struct ExistingCluster {
    pub coordinators: Vec<String>,
    pub ca: Option<PathBuf>,
    pub token: Option<String>,
    /// The host name the coordinators reach this process at, for the drift
    /// webhook (127.0.0.1 when they run on this machine).
    pub webhook_host: String,
}

/// The two worlds the data comes from. In the shifted one, incomes, debts and
/// ages moved, and so did what counts as a low, mid or high risk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum World {
    Calm,
    Shifted,
}

impl World {
    /// One row of features and its class name.
    fn row(self, rng: &mut StdRng) -> ([f32; 4], &'static str) {
        let (means, spreads, cut) = match self {
            World::Calm => ([0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], 0.0),
            World::Shifted => ([1.0, 0.8, -0.6, 0.0], [1.0, 1.3, 1.0, 1.0], 1.0),
        };
        let mut x = [0.0f32; 4];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (means[i] + spreads[i] * normal(rng)) as f32;
        }
        let score = f64::from(x[0]) + 0.5 * f64::from(x[1]) - 0.3 * f64::from(x[2]) - cut;
        let mut class = if score < -0.6 {
            "low"
        } else if score < 0.6 {
            "mid"
        } else {
            "high"
        };
        // 3% of labels are noise, as real labels are.
        if rng.gen_bool(0.03) {
            class = CLASSES[rng.gen_range(0..CLASSES.len())];
        }
        (x, class)
    }

    /// A CSV of `rows` rows with a header.
    fn csv(self, rng: &mut StdRng, rows: usize) -> String {
        let mut out = format!("{},risk\n", FEATURES.join(","));
        for _ in 0..rows {
            let (x, class) = self.row(rng);
            let _ = writeln!(
                out,
                "{:.4},{:.4},{:.4},{:.4},{class}",
                x[0], x[1], x[2], x[3]
            );
        }
        out
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The training job: `data` is replaced by the retrain policy with the dataset's
/// newest version.
fn job_spec(dataset: &str) -> String {
    format!(
        "name = \"risk-model\"\nexperiment = \"demo\"\n\n[data]\nartifact = \"{dataset}\"\nlabel = \"risk\"\n\n\
         [model]\nkind = \"mlp\"\nhidden = [32]\nactivation = \"relu\"\n\n\
         [optimizer]\nkind = \"adamw\"\nlr = 0.01\n\n\
         [train]\nepochs = 4\nbatch_size = 256\nseed = 7\ncheckpoint_every_steps = 200\n\n\
         [resources]\nshards = 2\ncpus_per_shard = 1\n"
    )
}

/// Runs the demo.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut timeline = Timeline::new(started);
    let mut rng = StdRng::seed_from_u64(opts.seed);

    let (info, conn) = match &opts.existing {
        None => {
            heading(1, "a fresh local cluster: 3 coordinators, 2 workers");
            let info = fresh_cluster(&opts).await?;
            let token = local::read_token(&info)?;
            let conn = Connection::of(&info, token)?;
            (info, conn)
        }
        Some(existing) => {
            heading(1, "the running cluster");
            let info = existing_cluster(existing).await?;
            let conn = Connection::of(&info, existing.token.clone())?;
            (info, conn)
        }
    };
    kiln(&conn, &["status"]).await?;
    timeline.mark("cluster up");

    heading(
        2,
        "a dataset from the calm world, pushed as a versioned artifact",
    );
    let work = opts.dir.join("demo");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    push_world(&conn, &work, World::Calm, &mut rng).await?;

    heading(3, "train it: 2 shards averaging gradients every step");
    let spec = work.join("risk.toml");
    write(&spec, &job_spec("risk-data@1"))?;
    kiln(&conn, &["train", "submit", &path(&spec), "--follow"]).await?;
    kiln(&conn, &["models", "show", "risk-model@1"]).await?;
    timeline.mark("risk-model@1 trained and registered");

    heading(4, "deploy it, watched for drift, with a retrain policy");
    let webhook_host = opts
        .existing
        .as_ref()
        .map_or("127.0.0.1", |e| e.webhook_host.as_str());
    let hook = WebhookReceiver::start(webhook_host).await?;
    kiln(
        &conn,
        &[
            "deploy",
            "risk",
            "--model",
            "risk-model@1",
            "--replicas",
            "2",
            "--drift-webhook",
            &hook.url,
            "--retrain-job",
            &path(&spec),
            "--retrain-dataset",
            "risk-data",
            "--retrain-canary-percent",
            "25",
            "--wait",
        ],
    )
    .await?;
    timeline.mark("risk deployed");

    heading(
        5,
        "traffic from the calm world, labelled as the truth arrives",
    );
    wait_ready(&info, "risk").await?;
    let traffic = Traffic::start(&info, &conn.token, opts.seed + 1)?;
    let calm_until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < calm_until {
        tokio::time::sleep(Duration::from_secs(2)).await;
        traffic.check()?;
    }
    println!("{}", traffic.line());
    kiln(&conn, &["drift", "status", "risk-model"]).await?;
    timeline.mark("calm traffic: no drift");

    heading(6, "the world shifts: new data, shifted traffic");
    push_world(&conn, &work, World::Shifted, &mut rng).await?;
    traffic.shift();
    let shifted_at = Instant::now();
    timeline.mark("traffic shifted");
    let alert = wait_for("a dataset-drift alert", &traffic, || async {
        let status = conn
            .client
            .call(|mut c| async move {
                c.drift_status(DriftStatusRequest {
                    model: "risk-model".into(),
                    windows: 1,
                })
                .await
                .map(|r| r.into_inner())
            })
            .await?;
        Ok(status
            .alerts
            .into_iter()
            .find(|a| a.kind == "dataset_drift" && a.resolved_at_ms == 0))
    })
    .await?;
    timeline.mark(&format!(
        "drift alert #{} on {}@{} ({:.1} s after the shift): {} drifted",
        alert.id,
        alert.model,
        alert.version,
        shifted_at.elapsed().as_secs_f64(),
        alert.columns.join(", ")
    ));
    kiln(&conn, &["drift", "status", "risk-model"]).await?;
    match hook.wait_first(Duration::from_secs(15)).await {
        Some(post) => println!(
            "webhook {} received: {} {} alert #{} ({})",
            hook.url,
            post["status"],
            post["alert"]["kind"],
            post["alert"]["id"],
            post["deployment"]
        ),
        None => println!("webhook {}: nothing received yet", hook.url),
    }

    heading(
        7,
        "the retrain policy: train on the newest data, canary, judge",
    );
    // Each step is read from the deployment's history, which keeps them all: a
    // probe that comes after the job has ended, or after the canary was judged,
    // still sees every step.
    let progress = || async {
        let d = crate::deployments::get(&conn.client, "risk").await?;
        RetrainProgress::of(&d.events)
    };
    let job = wait_for("the retraining job", &traffic, || async {
        Ok(progress().await?.job)
    })
    .await?;
    timeline.mark(&format!("retraining job {job} submitted on risk-data@2"));
    let canary = wait_for("the retrained canary", &traffic, || async {
        Ok(progress().await?.canary)
    })
    .await?;
    timeline.mark(&format!("{canary} on canary at 25%"));
    let verdict = wait_for("the canary's verdict", &traffic, || async {
        Ok(progress().await?.verdict)
    })
    .await?;
    timeline.mark(&verdict);
    kiln(&conn, &["deployments", "show", "risk"]).await?;
    // One more window, so the live figures cover the promoted version alone too.
    tokio::time::sleep(Duration::from_secs(6)).await;
    traffic.check()?;
    let served = traffic.stop().await;

    heading(8, "summary");
    timeline.print();
    println!("\ntraffic: {}", served.line());
    let (coordinator_http, token) = (&info.coordinators[0].http_addr, conn.token.clone());
    let http = Http::of(&info)?;
    match live_figures(&http, coordinator_http, token.as_deref()).await {
        Ok(lines) if !lines.is_empty() => {
            println!("\nlive accuracy against the labels sent (last 15 minutes):");
            for line in lines {
                println!("  {line}");
            }
        }
        Ok(_) => println!("\nno live accuracy recorded"),
        Err(e) => println!("\nlive accuracy not read: {e:#}"),
    }
    let scheme = http.scheme;
    println!("\ndashboard: {scheme}://{coordinator_http}/ui  (any coordinator serves it)");
    if let Some(ca) = &info.ca {
        println!(
            "(its certificate is signed by the cluster CA {}: trust that file in the browser, or accept the warning)",
            path(ca)
        );
    }
    if opts.existing.is_none() {
        if let Some(token) = &token {
            println!("open it with: {scheme}://{coordinator_http}/ui/login?token={token}");
            println!(
                "(the admin token; it is also in {})",
                path(&opts.dir.join("admin.token"))
            );
        }
        // The CLI finds a local cluster through `.kiln/` in the directory it
        // runs from; a cluster elsewhere is named with flags.
        let mut kiln = kiln_command();
        let from = match (opts.dir.file_name(), opts.dir.parent()) {
            (Some(name), Some(parent)) if name == ".kiln" => {
                let parent = if parent.as_os_str().is_empty() {
                    std::env::current_dir().unwrap_or_default()
                } else {
                    parent.to_path_buf()
                };
                format!(" (from {}, where the CLI finds .kiln/)", path(&parent))
            }
            _ => {
                if let Some(c) = info.coordinators.first() {
                    kiln.push_str(&format!(" --coordinator {}", c.addr));
                }
                if let Some(ca) = &info.ca {
                    kiln.push_str(&format!(" --ca {}", path(ca)));
                }
                if let Some(token) = &info.token_file {
                    kiln.push_str(&format!(" --token-file {}", path(token)));
                }
                String::new()
            }
        };
        println!(
            "\nthe cluster keeps running under {}: try `{kiln} drift status`, `{kiln} runs ls`, \
             `{kiln} deployments show risk`{from}; stop it with `{kiln} local down --dir {}`",
            path(&opts.dir),
            path(&opts.dir)
        );
    }
    println!("demo done in {:.0} s", started.elapsed().as_secs_f64());
    if !verdict.contains("promoted") {
        bail!("the retrained canary was not promoted: {verdict}");
    }
    Ok(())
}

/// How a new shell runs this binary: `kiln` when that name on the PATH is this
/// very file, else its full path (the build leaves it under the target
/// directory, which no PATH names).
fn kiln_command() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else {
        return "kiln".to_string();
    };
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("kiln"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_default();
    match on_path.and_then(|p| p.canonicalize().ok()) {
        Some(found) if found == me => "kiln".to_string(),
        _ => me.display().to_string(),
    }
}

/// Writes [`DATASET_ROWS`] rows of `world` under `work` and pushes them as the
/// next version of `risk-data`.
async fn push_world(
    conn: &Connection,
    work: &Path,
    world: World,
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    let file = work.join(format!("{world:?}.csv").to_lowercase());
    write(&file, &world.csv(rng, DATASET_ROWS))?;
    kiln(
        conn,
        &["artifact", "push", &path(&file), "--name", "risk-data"],
    )
    .await
}

/// Describes a running cluster the way `cluster.json` describes a local one,
/// from its status: the coordinators' addresses and the workers' inference
/// HTTP addresses.
async fn existing_cluster(existing: &ExistingCluster) -> anyhow::Result<ClusterInfo> {
    let client = ClusterClient::new(
        existing.coordinators.clone(),
        ClientOptions {
            tls: existing
                .ca
                .as_deref()
                .map(TlsMaterial::client)
                .transpose()?,
            token: existing.token.clone(),
            ..ClientOptions::default()
        },
    )?;
    let status = client
        .call(|mut c| async move {
            c.cluster_status(kiln_proto::v1::ClusterStatusRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
        .context("read the cluster's status")?;
    let node = |name: String, id: String, addr: &str, http_addr: &str| local::NodeInfo {
        name,
        id,
        addr: addr.to_string(),
        http_addr: http_addr.to_string(),
        inference_grpc_addr: None,
        pid: 0,
        data_dir: PathBuf::new(),
        log: PathBuf::new(),
        args: Vec::new(),
    };
    let info = ClusterInfo {
        coordinators: status
            .coordinators
            .iter()
            .filter(|c| !c.http_addr.is_empty())
            .map(|c| {
                node(
                    format!("coordinator-{}", c.id),
                    c.id.to_string(),
                    &c.addr,
                    &c.http_addr,
                )
            })
            .collect(),
        workers: status
            .workers
            .iter()
            .filter(|w| w.state == kiln_proto::v1::WorkerState::Alive as i32)
            .map(|w| node(w.id.clone(), w.id.clone(), &w.addr, &w.inference_http_addr))
            .collect(),
        ca: existing.ca.clone(),
        token_file: None,
    };
    if info.coordinators.is_empty() {
        bail!("the cluster's status names no coordinator with an HTTP address");
    }
    if info.workers.len() < 2 {
        bail!(
            "the demo needs 2 live workers; the cluster has {}",
            info.workers.len()
        );
    }
    Ok(info)
}

/// Stops the local cluster under `opts.dir` (if any), removes the directory and
/// starts a new one with the demo's settings.
async fn fresh_cluster(opts: &DemoOptions) -> anyhow::Result<ClusterInfo> {
    if opts.dir.exists() {
        let is_local = opts.dir.join(local::CLUSTER_FILE).exists()
            || std::fs::read_dir(&opts.dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !is_local {
            bail!(
                "{} exists and holds no local cluster; pass --dir with a new or a kiln local directory",
                opts.dir.display()
            );
        }
        if opts.dir.join(local::CLUSTER_FILE).exists() {
            let stopped = local::down(&opts.dir).await?;
            println!(
                "stopped the {stopped} processes of the cluster in {}",
                opts.dir.display()
            );
        }
        std::fs::remove_dir_all(&opts.dir)
            .with_context(|| format!("remove {}", opts.dir.display()))?;
    }
    let info = local::up(&LocalOptions {
        dir: opts.dir.clone(),
        base_port: opts.base_port,
        coordinator_config: Some(DEMO_CONFIG.into()),
        worker_args: vec!["--telemetry-interval-ms".into(), "1000".into()],
        ..LocalOptions::default()
    })
    .await?;
    local::print_endpoints(&info);
    Ok(info)
}

/// How the demo reaches the cluster: the admin's client, and the flags that
/// make a typed command reach the same cluster.
struct Connection {
    client: ClusterClient,
    flags: Vec<String>,
    token: Option<String>,
}

impl Connection {
    fn of(info: &ClusterInfo, token: Option<String>) -> anyhow::Result<Connection> {
        let mut flags = vec![
            "--coordinator".to_string(),
            info.coordinator_addrs().join(","),
        ];
        if let Some(ca) = &info.ca {
            flags.extend(["--ca".to_string(), path(ca)]);
        }
        if let Some(token) = &token {
            flags.extend(["--token".to_string(), token.clone()]);
        }
        let client = local::admin_client(
            info,
            ClientOptions {
                token: token.clone(),
                ..ClientOptions::default()
            },
        )?;
        Ok(Connection {
            client,
            flags,
            token,
        })
    }
}

/// Prints `$ kiln ARGS` and runs it as the CLI would.
async fn kiln(conn: &Connection, args: &[&str]) -> anyhow::Result<()> {
    println!("\n$ kiln {}", args.join(" "));
    let argv = std::iter::once("kiln".to_string())
        .chain(conn.flags.iter().cloned())
        .chain(args.iter().map(|a| a.to_string()));
    let cli = <crate::Cli as clap::Parser>::try_parse_from(argv)
        .with_context(|| format!("kiln {}", args.join(" ")))?;
    Box::pin(crate::run(cli))
        .await
        .with_context(|| format!("kiln {}", args.join(" ")))
}

fn heading(n: u32, what: &str) {
    println!("\n== {n}/8 {what}");
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn write(file: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(file, text).with_context(|| format!("write {}", file.display()))
}

/// How far the retrain policy got after the newest drift alert that started a
/// job, as the deployment's history tells it (the coordinator's messages in
/// `api/retrain.rs`).
#[derive(Debug, Default, PartialEq)]
struct RetrainProgress {
    job: Option<u64>,
    /// `MODEL@VERSION` the job registered, started as the canary.
    canary: Option<String>,
    /// The canary's promotion or rollback.
    verdict: Option<String>,
}

impl RetrainProgress {
    /// An error when the policy stopped short of a canary: the job failed,
    /// registered nothing, or its canary was refused.
    fn of(events: &[kiln_proto::v1::DeploymentEvent]) -> anyhow::Result<RetrainProgress> {
        let mut progress = RetrainProgress::default();
        let Some(at) = events.iter().rposition(|e| {
            e.message.starts_with("drift alert #") && e.message.contains(": retraining as job ")
        }) else {
            return Ok(progress);
        };
        let job = events[at]
            .message
            .split(": retraining as job ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|id| id.parse::<u64>().ok())
            .with_context(|| format!("no job id in the event {:?}", events[at].message))?;
        progress.job = Some(job);
        let later = &events[at + 1..];
        let of_job = format!("retraining job {job} ");
        let Some(step) = later.iter().find(|e| e.message.starts_with(&of_job)) else {
            return Ok(progress);
        };
        let canary = step
            .message
            .strip_prefix(&format!("{of_job}registered "))
            .and_then(|rest| rest.strip_suffix('%'))
            .and_then(|rest| rest.split_once("; canary at "))
            .map(|(canary, _)| canary.to_string());
        let Some(canary) = canary else {
            bail!("the retrain policy stopped: {}", step.message);
        };
        let judged = format!("canary {canary} ");
        progress.verdict = later
            .iter()
            .find(|e| e.message.starts_with(&judged))
            .map(|e| e.message.clone());
        progress.canary = Some(canary);
        Ok(progress)
    }
}

/// Polls `probe` every second until it gives a value, while the traffic keeps
/// flowing (and is checked), for at most [`STAGE_TIMEOUT`].
async fn wait_for<T, F, Fut>(what: &str, traffic: &Traffic, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + STAGE_TIMEOUT;
    let mut last_report = Instant::now();
    loop {
        traffic.check()?;
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("no {what} within {} s", STAGE_TIMEOUT.as_secs());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            println!("  waiting for {what}... {}", traffic.line());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Moments of the demo, from its start.
struct Timeline {
    started: Instant,
    marks: Vec<(Duration, String)>,
}

impl Timeline {
    fn new(started: Instant) -> Timeline {
        Timeline {
            started,
            marks: Vec::new(),
        }
    }

    fn mark(&mut self, what: &str) {
        let at = self.started.elapsed();
        println!("[{:>6.1} s] {what}", at.as_secs_f64());
        self.marks.push((at, what.to_string()));
    }

    fn print(&self) {
        for (at, what) in &self.marks {
            println!("  {:>6.1} s  {what}", at.as_secs_f64());
        }
    }
}

/// The live accuracy lines of a coordinator's `/metrics`.
async fn live_figures(
    http: &Http,
    http_addr: &str,
    token: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let (code, body) = http_call(http, http_addr, "GET", "/metrics", token, None).await?;
    if code != 200 {
        bail!("GET /metrics answered {code}");
    }
    Ok(body
        .lines()
        .filter(|l| {
            l.starts_with("kiln_serving_accuracy{") || l.starts_with("kiln_serving_labelled{")
        })
        .map(str::to_string)
        .collect())
}

/// How the demo calls the cluster's HTTP ports: HTTPS trusting the cluster CA,
/// or plain HTTP when the cluster runs `--insecure`.
#[derive(Clone)]
struct Http {
    client: HttpClient,
    scheme: &'static str,
}

impl Http {
    fn of(info: &ClusterInfo) -> anyhow::Result<Http> {
        let tls = info.ca.as_deref().map(TlsMaterial::client).transpose()?;
        Ok(Http {
            client: https::http_client(tls.as_ref(), ClientSettings::default())?,
            scheme: https::scheme(tls.is_some()),
        })
    }
}

/// One HTTP/1.1 call on loopback; the status and the body as text.
async fn http_call(
    http: &Http,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, String)> {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("{}://{addr}{path}", http.scheme))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = request.body(Full::new(body))?;
    let response = tokio::time::timeout(CALL_TIMEOUT, http.client.request(request))
        .await
        .with_context(|| format!("{method} {addr}{path} timed out"))?
        .with_context(|| format!("{method} {addr}{path}"))?;
    let code = response.status().as_u16();
    let bytes = tokio::time::timeout(CALL_TIMEOUT, response.into_body().collect())
        .await
        .with_context(|| format!("{method} {addr}{path}: body timed out"))?
        .with_context(|| format!("{method} {addr}{path}: body"))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Waits until every worker's router routes `deployment` to a ready replica (a
/// worker learns the routes at its next heartbeat).
async fn wait_ready(info: &ClusterInfo, deployment: &str) -> anyhow::Result<()> {
    let http = Http::of(info)?;
    let path = format!("/v2/models/{deployment}/ready");
    for worker in &info.workers {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, _) = http_call(&http, &worker.http_addr, "GET", &path, None, None).await?;
            if code == 200 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not route {deployment} after 30 s",
                    worker.http_addr
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// POSTs `body` and returns the JSON of a 200 answer. A 503 (no ready replica
/// for a moment, as routes change in a rollout) is retried a few times.
async fn post_json(
    http: &Http,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> anyhow::Result<Value> {
    let mut tries = 0;
    loop {
        tries += 1;
        match post_json_once(http, addr, path, token, body).await {
            Err(e) if tries < 5 && format!("{e:#}").contains("answered 503") => {
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            other => return other,
        }
    }
}

/// POSTs `body` once and returns the JSON of a 200 answer.
async fn post_json_once(
    http: &Http,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> anyhow::Result<Value> {
    let (code, text) = http_call(http, addr, "POST", path, token, Some(body)).await?;
    if code != 200 {
        bail!("POST {addr}{path} answered {code}: {text}");
    }
    serde_json::from_str(&text)
        .with_context(|| format!("POST {addr}{path}: the answer is not JSON"))
}

/// Inference traffic in the background: [`CLIENTS`] loops, each sending a
/// request of [`ROWS_PER_REQUEST`] rows from the current world to the workers in
/// turn, then posting the true labels of the answered rows to the other worker's
/// feedback endpoint.
struct Traffic {
    shared: Arc<TrafficState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct TrafficState {
    shifted: AtomicBool,
    stop: AtomicBool,
    requests: AtomicU64,
    labelled: AtomicU64,
    /// Answers by the model version that gave them.
    by_version: Mutex<BTreeMap<String, u64>>,
    /// The first failure, which stops the demo.
    failure: Mutex<Option<String>>,
}

/// What the traffic did.
struct Served {
    requests: u64,
    labelled: u64,
    by_version: BTreeMap<String, u64>,
}

impl Served {
    fn line(&self) -> String {
        let versions: Vec<String> = self
            .by_version
            .iter()
            .map(|(v, n)| format!("{n} by version {v}"))
            .collect();
        format!(
            "{} requests of {ROWS_PER_REQUEST} rows ({}), {} rows labelled",
            self.requests,
            versions.join(", "),
            self.labelled
        )
    }
}

impl Traffic {
    fn start(info: &ClusterInfo, token: &Option<String>, seed: u64) -> anyhow::Result<Traffic> {
        let workers: Vec<String> = info.workers.iter().map(|w| w.http_addr.clone()).collect();
        if workers.is_empty() {
            bail!("the cluster has no workers to send traffic to");
        }
        let shared = Arc::new(TrafficState::default());
        let http = Http::of(info)?;
        let tasks = (0..CLIENTS)
            .map(|k| {
                let http = http.clone();
                let shared = Arc::clone(&shared);
                let workers = workers.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed + k as u64);
                    let mut n = 0u64;
                    while !shared.stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = format!("demo-{k}-{n}");
                        let turn = (n as usize + k) % workers.len();
                        let other = (turn + 1) % workers.len();
                        if let Err(e) = one_request(
                            &http,
                            &shared,
                            &mut rng,
                            (&workers[turn], &workers[other]),
                            token.as_deref(),
                            &id,
                        )
                        .await
                        {
                            let mut failure = shared
                                .failure
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner);
                            failure.get_or_insert_with(|| format!("{e:#}"));
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                })
            })
            .collect();
        Ok(Traffic { shared, tasks })
    }

    fn shift(&self) {
        self.shared.shifted.store(true, Ordering::Relaxed);
    }

    /// Fails when a request has failed.
    fn check(&self) -> anyhow::Result<()> {
        match &*self
            .shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(failure) => bail!("traffic failed: {failure}"),
            None => Ok(()),
        }
    }

    fn served(&self) -> Served {
        Served {
            requests: self.shared.requests.load(Ordering::Relaxed),
            labelled: self.shared.labelled.load(Ordering::Relaxed),
            by_version: self
                .shared
                .by_version
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    fn line(&self) -> String {
        self.served().line()
    }

    async fn stop(mut self) -> Served {
        self.shared.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.served()
    }
}

/// One inference request and the feedback for its answer.
async fn one_request(
    http: &Http,
    shared: &TrafficState,
    rng: &mut StdRng,
    (infer_at, feedback_at): (&str, &str),
    token: Option<&str>,
    id: &str,
) -> anyhow::Result<()> {
    let world = if shared.shifted.load(Ordering::Relaxed) {
        World::Shifted
    } else {
        World::Calm
    };
    let rows: Vec<([f32; 4], &str)> = (0..ROWS_PER_REQUEST).map(|_| world.row(rng)).collect();
    let data: Vec<f32> = rows.iter().flat_map(|(x, _)| x.iter().copied()).collect();
    let request = json!({
        "id": id,
        "inputs": [{
            "name": "input",
            "shape": [ROWS_PER_REQUEST, FEATURES.len()],
            "datatype": "FP32",
            "data": data,
        }],
    });
    let answer = post_json(http, infer_at, "/v2/models/risk/infer", token, &request).await?;
    let version = answer["model_version"].as_str().unwrap_or("?").to_string();
    shared.requests.fetch_add(1, Ordering::Relaxed);
    *shared
        .by_version
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(version)
        .or_default() += 1;
    // The truth arrives: the labels of the rows, to the other worker (which
    // finds the answer on the worker that gave it).
    let labels: Vec<&str> = rows.iter().map(|(_, class)| *class).collect();
    let feedback = json!({"feedback": [{"id": id, "labels": labels}]});
    let matched = post_json(
        http,
        feedback_at,
        "/v2/models/risk/feedback",
        token,
        &feedback,
    )
    .await?;
    if matched["matched"].as_u64() == Some(1) {
        shared
            .labelled
            .fetch_add(ROWS_PER_REQUEST as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// A webhook receiver on a loopback port that keeps the JSON bodies posted.
struct WebhookReceiver {
    url: String,
    received: Arc<Mutex<Vec<Value>>>,
}

impl WebhookReceiver {
    /// Listens on a free port, on loopback when `host` is a loopback address and
    /// on every interface otherwise; the coordinators post to `host`.
    async fn start(host: &str) -> anyhow::Result<WebhookReceiver> {
        use axum::routing::post;
        let loopback = host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
        let bind = if loopback { host } else { "0.0.0.0" };
        let listener = tokio::net::TcpListener::bind((bind, 0))
            .await
            .context("bind the webhook receiver")?;
        let url = format!("http://{host}:{}/alerts", listener.local_addr()?.port());
        let received: Arc<Mutex<Vec<Value>>> = Arc::default();
        let kept = Arc::clone(&received);
        let app = axum::Router::new().route(
            "/alerts",
            post(move |axum::Json(body): axum::Json<Value>| {
                let kept = Arc::clone(&kept);
                async move {
                    let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                    if kept.len() < 1000 {
                        kept.push(body);
                    }
                    "ok"
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("the demo's webhook receiver stopped: {e}");
            }
        });
        Ok(WebhookReceiver { url, received })
    }

    /// The first post, waiting up to `timeout` for it.
    async fn wait_first(&self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(first) = self
                .received
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .first()
            {
                return Some(first.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(messages: &[&str]) -> Vec<kiln_proto::v1::DeploymentEvent> {
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| kiln_proto::v1::DeploymentEvent {
                at_ms: i as u64,
                message: m.to_string(),
            })
            .collect()
    }

    #[test]
    fn the_retrain_progress_is_read_from_the_history_however_late() {
        let ready = "replica 3 on worker w1 is ready";
        let submitted = "drift alert #4: retraining as job 2 on risk-data@2";
        let canary = "retraining job 2 registered risk-model@2; canary at 25%";
        let promoted = "canary risk-model@2 promoted over risk-model@1: 120 requests";
        let of = |messages: &[&str]| RetrainProgress::of(&history(messages)).expect("progress");
        assert_eq!(of(&[ready]), RetrainProgress::default());
        assert_eq!(
            of(&[ready, submitted]),
            RetrainProgress {
                job: Some(2),
                ..RetrainProgress::default()
            }
        );
        assert_eq!(
            of(&[submitted, ready, canary]),
            RetrainProgress {
                job: Some(2),
                canary: Some("risk-model@2".into()),
                verdict: None,
            }
        );
        // Every step already done when first read.
        let done = of(&[submitted, canary, ready, promoted]);
        assert_eq!(done.verdict.as_deref(), Some(promoted));
        // A newer alert's job is the one followed; the earlier cycle is history.
        let newer = of(&[
            submitted,
            canary,
            promoted,
            "drift alert #9: retraining as job 5 on risk-data@3",
        ]);
        assert_eq!((newer.job, newer.canary), (Some(5), None));
    }

    #[test]
    fn a_retrain_that_stops_short_of_a_canary_is_an_error_naming_why() {
        for step in [
            "retraining job 2 ended Failed: shard 1 failed; no canary",
            "retraining job 2 succeeded but registered no model version",
            "retraining job 2 registered risk-model@2, but the canary was refused: no workers",
        ] {
            let events = history(&["drift alert #4: retraining as job 2 on risk-data@2", step]);
            let error = RetrainProgress::of(&events).expect_err(step).to_string();
            assert!(error.contains(step), "{error}");
        }
    }

    #[test]
    fn the_worlds_are_seeded_and_differ() {
        let a = World::Calm.csv(&mut StdRng::seed_from_u64(1), 100);
        let b = World::Calm.csv(&mut StdRng::seed_from_u64(1), 100);
        assert_eq!(a, b, "the same seed gives the same data");
        assert!(a.starts_with("income,debt,age,tenure,risk\n"));
        assert_eq!(a.lines().count(), 101);
        let mean_income = |csv: &str| {
            let rows: Vec<f64> = csv
                .lines()
                .skip(1)
                .map(|l| {
                    l.split(',')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .expect("an income")
                })
                .collect();
            rows.iter().sum::<f64>() / rows.len() as f64
        };
        let calm = World::Calm.csv(&mut StdRng::seed_from_u64(2), 5000);
        let shifted = World::Shifted.csv(&mut StdRng::seed_from_u64(2), 5000);
        assert!(mean_income(&calm).abs() < 0.1);
        assert!((mean_income(&shifted) - 1.0).abs() < 0.1);
        for class in CLASSES {
            assert!(calm.contains(&format!(",{class}\n")), "{class}");
        }
    }
}
