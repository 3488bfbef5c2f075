//! `kiln bench allreduce`: the ring all-reduce's bus bandwidth on loopback against
//! torch.distributed's gloo backend (scripts/bench_gloo.py) and memcpy.
//! `kiln bench train`: one shard's training samples/s against PyTorch
//! (scripts/bench_train_torch.py) on the same model, batch and threads.
//!
//! Each rank is a thread with its own single-threaded tokio runtime and its own
//! ring links, as separate processes would be; `kiln ring` rows link them with
//! shared-memory lanes (ranks on one host do by default), `kiln tcp` rows with
//! TCP loopback only (as between hosts). Timing as nccl-tests and the gloo
//! script do it: every iteration starts after a barrier (a one-value all-reduce),
//! each rank times its own call, and the iteration counts the slowest rank.
//! algbw = bytes / time; busbw = algbw · 2(n-1)/n.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use kiln_worker::collective::ring::{Carrier, Ring, RingConfig, RingKey};
use serde::Serialize;

/// One size's figures for one system.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub system: String,
    pub world: usize,
    pub bytes: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub p90_ms: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cpu: String,
    pub cores: usize,
    pub memcpy_gbs: f64,
    pub rows: Vec<Row>,
}

fn row(system: &str, world: usize, bytes: usize, mut times: Vec<f64>) -> Row {
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let p90 = times[((times.len() as f64 * 0.9) as usize).min(times.len() - 1)];
    let algbw = bytes as f64 / median / 1e9;
    Row {
        system: system.into(),
        world,
        bytes,
        median_ms: median * 1e3,
        min_ms: times[0] * 1e3,
        p90_ms: p90 * 1e3,
        algbw_gbs: algbw,
        busbw_gbs: algbw * 2.0 * (world as f64 - 1.0) / world as f64,
    }
}

/// A carrier as `--carriers` names it: `lane` (shared memory, as ranks on one
/// host use by default) or `tcp` (loopback only, as between hosts).
pub fn carrier(name: &str) -> anyhow::Result<Carrier> {
    match name {
        "lane" => Ok(Carrier::Lane),
        "tcp" => Ok(Carrier::Tcp),
        other => bail!("--carriers: {other} is not lane or tcp"),
    }
}

/// The report's name for the ring over `carrier`.
fn system(carrier: Carrier) -> &'static str {
    match carrier {
        Carrier::Lane => "kiln ring",
        Carrier::Tcp => "kiln tcp",
    }
}

/// Times kiln's ring: per size, `iters` timed all-reduces after `warmup`.
fn ring(
    world: usize,
    sizes: &[usize],
    iters: usize,
    warmup: usize,
    chunk_bytes: usize,
    carrier: Carrier,
) -> anyhow::Result<Vec<Row>> {
    let listeners: Vec<std::net::TcpListener> = (0..world)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("bind the ranks' ports")?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let session = rand::random::<u64>();
    let key = RingKey::random();
    let mut threads = Vec::new();
    for (rank, listener) in listeners.into_iter().enumerate() {
        let addrs = addrs.clone();
        let sizes = sizes.to_vec();
        threads.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<Vec<f64>>> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    listener.set_nonblocking(true)?;
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let mut config = RingConfig::new(session, key, rank, addrs);
                    if chunk_bytes > 0 {
                        config.chunk_bytes = chunk_bytes;
                    }
                    if carrier == Carrier::Tcp {
                        config.lanes = None;
                    }
                    let mut ring = Ring::connect(listener, config).await?;
                    let carried = ring.carriers().map(|(to_right, _)| to_right);
                    if carried != Some(carrier) {
                        bail!("rank {rank} links through {carried:?}, not {carrier}");
                    }
                    let mut all = Vec::new();
                    for bytes in sizes {
                        let mut buf = vec![(rank + 1) as f32; bytes / 4];
                        ring.all_reduce_sum(&mut buf).await?;
                        let want = (world * (world + 1) / 2) as f32;
                        if buf.first() != Some(&want) || buf.last() != Some(&want) {
                            bail!("the ring summed {:?}, expected {want}", buf.first());
                        }
                        for _ in 0..warmup {
                            ring.all_reduce_sum(&mut buf).await?;
                        }
                        let mut times = Vec::with_capacity(iters);
                        let mut barrier = [0f32];
                        for _ in 0..iters {
                            ring.all_reduce_sum(&mut barrier).await?;
                            let started = Instant::now();
                            ring.all_reduce_sum(&mut buf).await?;
                            times.push(started.elapsed().as_secs_f64());
                        }
                        all.push(times);
                    }
                    Ok(all)
                })
            },
        ));
    }
    let mut per_rank = Vec::new();
    for t in threads {
        per_rank.push(t.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??);
    }
    Ok(sizes
        .iter()
        .enumerate()
        .map(|(i, &bytes)| {
            let slowest: Vec<f64> = (0..iters)
                .map(|k| per_rank.iter().map(|r| r[i][k]).fold(0.0, f64::max))
                .collect();
            row(system(carrier), world, bytes, slowest)
        })
        .collect())
}

/// Runs scripts/bench_gloo.py with `python`.
fn gloo(
    python: &str,
    world: usize,
    sizes: &[usize],
    iters: usize,
    warmup: usize,
) -> anyhow::Result<Vec<Row>> {
    let script = crate::bench::peer_script("bench_gloo.py")?;
    let list: Vec<String> = sizes.iter().map(usize::to_string).collect();
    let port = 29_000 + (rand::random::<u16>() % 1000);
    let out = Command::new(python)
        .arg(&script)
        .args([
            world.to_string(),
            list.join(","),
            iters.to_string(),
            warmup.to_string(),
            port.to_string(),
        ])
        .env("GLOO_SOCKET_IFNAME", "lo")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .with_context(|| format!("run {python} {} (pip install torch)", script.display()))?;
    if !out.status.success() {
        bail!(
            "the gloo benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 5 {
            continue;
        }
        let parse = |s: &str| s.parse::<f64>().context("gloo output");
        let bytes: usize = f[1].parse().context("gloo output")?;
        let median = parse(f[2])?;
        let algbw = bytes as f64 / median / 1e9;
        rows.push(Row {
            system: "torch gloo".into(),
            world,
            bytes,
            median_ms: median * 1e3,
            min_ms: parse(f[3])? * 1e3,
            p90_ms: parse(f[4])? * 1e3,
            algbw_gbs: algbw,
            busbw_gbs: algbw * 2.0 * (world as f64 - 1.0) / world as f64,
        });
    }
    Ok(rows)
}

/// Single-threaded memcpy GB/s over 256 MiB.
fn memcpy_gbs() -> f64 {
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(started.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    src.len() as f64 / best / 1e9
}

/// Measures the ring over each carrier (and gloo when `python` is given) for
/// each world and size; `chunk_bytes` 0 keeps the ring's default TCP frame size.
pub fn allreduce(
    worlds: &[usize],
    sizes: &[usize],
    iters: usize,
    warmup: usize,
    chunk_bytes: usize,
    carriers: &[Carrier],
    python: Option<&str>,
) -> anyhow::Result<Report> {
    let mut rows = Vec::new();
    for &world in worlds {
        for &carrier in carriers {
            rows.extend(ring(world, sizes, iters, warmup, chunk_bytes, carrier)?);
        }
        if let Some(python) = python {
            rows.extend(gloo(python, world, sizes, iters, warmup)?);
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    Ok(Report {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memcpy_gbs: memcpy_gbs(),
        rows,
    })
}

impl crate::bench::Table for Report {
    /// Prints the table and, where both systems ran, kiln's ratio to gloo.
    fn print_table(&self) {
        println!(
            "CPU: {} ({} cores); memcpy {:.2} GB/s",
            self.cpu, self.cores, self.memcpy_gbs
        );
        println!(
            "{:<11} {:>5} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7}",
            "system", "world", "bytes", "median ms", "min ms", "p90 ms", "algbw", "busbw", "ratio"
        );
        for r in &self.rows {
            let peer = self
                .rows
                .iter()
                .find(|p| p.system == "torch gloo" && p.world == r.world && p.bytes == r.bytes);
            let ratio = match peer {
                Some(p) if r.system != p.system => format!("{:.2}", r.busbw_gbs / p.busbw_gbs),
                _ => "-".into(),
            };
            println!(
                "{:<11} {:>5} {:>10} {:>10.2} {:>10.2} {:>10.2} {:>9.2} {:>9.2} {:>7}",
                r.system,
                r.world,
                r.bytes,
                r.median_ms,
                r.min_ms,
                r.p90_ms,
                r.algbw_gbs,
                r.busbw_gbs,
                ratio
            );
        }
    }
}

/// Training speed of kiln's shard step and, when measured, PyTorch's.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub threads: usize,
    /// Where kiln's pass ran: "the CPU (1 thread)", "CUDA device 0 (...)".
    pub engine: String,
    /// The CUDA device both ran on, if any.
    pub gpu: Option<u32>,
    pub steps: usize,
    pub batch: usize,
    pub kiln_samples_per_sec: f64,
    pub kiln_first_loss: f64,
    pub kiln_last_loss: f64,
    pub torch_samples_per_sec: Option<f64>,
    pub torch_version: Option<String>,
}

/// Runs kiln's step benchmark, then PyTorch's with `python` when given, both on
/// CUDA device `gpu` when given.
pub fn train(
    threads: usize,
    steps: usize,
    gpu: Option<u32>,
    python: Option<&str>,
) -> anyhow::Result<TrainReport> {
    if threads == 0 || steps == 0 {
        bail!("--threads and --steps must be above 0");
    }
    let kiln = kiln_worker::train::bench::samples_per_sec(threads, steps, gpu)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut torch, mut version) = (None, None);
    if let Some(python) = python {
        let script = crate::bench::peer_script("bench_train_torch.py")?;
        let device = gpu.map_or("cpu".to_string(), |g| format!("cuda:{g}"));
        let out = Command::new(python)
            .arg(&script)
            .args([
                "--threads",
                &threads.to_string(),
                "--steps",
                &steps.to_string(),
                "--device",
                &device,
            ])
            .output()
            .with_context(|| format!("run {python} {} (pip install torch)", script.display()))?;
        if !out.status.success() {
            bail!(
                "the PyTorch benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // "... in 1.834 s: 139612 samples/s (loss ...)"
        torch = text
            .split(" samples/s")
            .next()
            .and_then(|head| head.split_whitespace().last())
            .and_then(|n| n.parse::<f64>().ok());
        if torch.is_none() {
            bail!("the PyTorch benchmark printed no samples/s: {text}");
        }
        version = text
            .lines()
            .find_map(|l| l.split("torch ").nth(1))
            .map(|v| {
                v.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_end_matches(':')
                    .to_string()
            });
    }
    Ok(TrainReport {
        threads: kiln.threads,
        engine: kiln.engine,
        gpu,
        steps: kiln.steps,
        batch: kiln.batch,
        kiln_samples_per_sec: kiln.samples_per_sec,
        kiln_first_loss: kiln.first_loss,
        kiln_last_loss: kiln.last_loss,
        torch_samples_per_sec: torch,
        torch_version: version,
    })
}

impl crate::bench::Table for TrainReport {
    /// Prints the figures and the ratio.
    fn print_table(&self) {
        println!(
            "MLP 64-256-256-10, batch {}, AdamW, {} steps, {} thread(s)",
            self.batch, self.steps, self.threads
        );
        println!(
            "kiln on {}: {:.0} samples/s (loss {:.4} -> {:.4})",
            self.engine, self.kiln_samples_per_sec, self.kiln_first_loss, self.kiln_last_loss
        );
        if let Some(torch) = self.torch_samples_per_sec {
            println!(
                "pytorch {}: {torch:.0} samples/s; kiln / pytorch = {:.2}",
                self.torch_version.as_deref().unwrap_or("?"),
                self.kiln_samples_per_sec / torch
            );
        }
    }
}
