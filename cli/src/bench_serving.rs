//! `kiln bench serving-engine`: the serving engine in-process, without HTTP: rows/s
//! at batch 1 and 64 on the calling thread, and one-row requests/s through the
//! dynamic batcher from many concurrent tasks. The served figures of
//! `scripts/bench_serving.sh` are compared with these (the ceiling).
//!
//! The cost of drift telemetry: the batcher is measured twice more, on a plain
//! engine and on one whose monitor counts every input and output into reference
//! bins, in four turns (plain then monitored, monitored then plain, ...) so that
//! drift in the machine's speed falls on both.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use kiln_worker::serving::engine::{Engine, EngineConfig};
use kiln_worker::serving::monitor::{Monitor, MAX_COUNTED_ROWS_PER_SEC};
use kiln_worker::serving::{DataType, Tensor};

/// Concurrent one-row callers of the batcher.
const CALLERS: usize = 256;
/// Turns of the unmonitored and monitored engines (each measured once a turn).
const TURNS: usize = 4;

#[derive(Debug, serde::Serialize)]
pub struct EngineReport {
    pub model: String,
    pub features: usize,
    pub threads: usize,
    pub batch1_rows_per_s: f64,
    pub batch64_rows_per_s: f64,
    pub batched_requests_per_s: f64,
    pub mean_batch: f64,
    /// The batcher without and with a drift monitor, each the mean of four turns.
    pub unmonitored_requests_per_s: f64,
    pub monitored_requests_per_s: f64,
    /// How much slower the monitored engine is, in percent.
    pub telemetry_cost_percent: f64,
    /// Counting one row's inputs and outputs into their bins, on one thread.
    pub count_ns_per_row: f64,
    /// The engine's time per row at batch 64 on one thread.
    pub infer_ns_per_row: f64,
    /// The CPU share counting takes at most: the replica's row budget a second
    /// times the cost of a row, over the machine's cores.
    pub count_cpu_percent_at_budget: f64,
}

impl crate::bench::Table for EngineReport {
    fn print_table(&self) {
        println!("| engine path | rows/s |");
        println!("|---|---:|");
        println!(
            "| tract, batch 1, calling thread | {:.0} |",
            self.batch1_rows_per_s
        );
        println!(
            "| tract, batch 64, calling thread | {:.0} |",
            self.batch64_rows_per_s
        );
        println!(
            "| dynamic batcher, {CALLERS} one-row callers, {} threads (mean batch {:.1}) | {:.0} |",
            self.threads, self.mean_batch, self.batched_requests_per_s
        );
        println!(
            "| dynamic batcher, unmonitored (mean of 4 turns) | {:.0} |",
            self.unmonitored_requests_per_s
        );
        println!(
            "| dynamic batcher, counting inputs and outputs for drift (mean of 4 turns) | {:.0} |",
            self.monitored_requests_per_s
        );
        println!(
            "drift telemetry costs {:.1}% of the batcher's throughput",
            self.telemetry_cost_percent
        );
        println!(
            "counting a row for drift: {:.0} ns (inferring it at batch 64: {:.0} ns); at the budget of {} rows/s that is at most {:.2}% of {} cores",
            self.count_ns_per_row,
            self.infer_ns_per_row,
            MAX_COUNTED_ROWS_PER_SEC,
            self.count_cpu_percent_at_budget,
            self.threads
        );
    }
}

fn rows(features: usize, n: usize) -> Tensor {
    let values: Vec<u8> = (0..n * features)
        .flat_map(|i| ((i % 17) as f32 * 0.25 - 2.0).to_le_bytes())
        .collect();
    Tensor {
        name: "input".into(),
        datatype: DataType::Fp32,
        shape: vec![n, features],
        data: Bytes::from(values),
    }
}

/// Rows/s of `run_batch_blocking` at `batch` rows for `seconds`.
fn blocking(engine: &Engine, features: usize, batch: usize, seconds: f64) -> anyhow::Result<f64> {
    let input = rows(features, batch);
    for _ in 0..100 {
        engine.run_batch_blocking(vec![input.clone()])?;
    }
    let started = Instant::now();
    let mut calls = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        engine.run_batch_blocking(vec![input.clone()])?;
        calls += 1;
    }
    Ok((calls * batch) as f64 / started.elapsed().as_secs_f64())
}

pub async fn engine(onnx: &Path, seconds: f64) -> anyhow::Result<EngineReport> {
    let bytes = std::fs::read(onnx).with_context(|| format!("read {}", onnx.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = EngineConfig {
        max_batch_size: 64,
        max_queue_delay: Duration::from_micros(500),
        queue_capacity: 4 * CALLERS,
        threads,
        ..EngineConfig::default()
    };
    let engine = tokio::task::spawn_blocking({
        let (bytes, config) = (bytes.clone(), config.clone());
        move || Engine::load(&bytes, "bench", config)
    })
    .await??;
    let input = engine
        .signature()
        .inputs
        .first()
        .context("the model has no input")?
        .clone();
    let features = usize::try_from(*input.shape.get(1).context("the input is not [batch, N]")?)
        .context("the input's second dimension is not fixed")?;
    let batch1 = blocking(&engine, features, 1, seconds)?;
    let batch64 = blocking(&engine, features, 64, seconds)?;

    let engine = Arc::new(engine);
    let (batched_requests_per_s, mean_batch) = batched(&engine, features, seconds).await?;

    let monitored =
        tokio::task::spawn_blocking(move || Engine::load(&bytes, "bench-monitored", config))
            .await??;
    monitored.attach_monitor(Arc::new(monitor_for(&engine, features)?));
    let count_ns_per_row = counting_cost(&engine, features, seconds)?;
    let infer_ns_per_row = 1e9 / batch64;
    let monitored = Arc::new(monitored);
    let mut plain = 0.0;
    let mut counted = 0.0;
    for turn in 0..TURNS {
        // ABBA: each engine goes first as often as the other.
        let (first, second) = if turn % 2 == 0 {
            (&engine, &monitored)
        } else {
            (&monitored, &engine)
        };
        let a = batched(first, features, seconds).await?.0 / TURNS as f64;
        let b = batched(second, features, seconds).await?.0 / TURNS as f64;
        let (p, c) = if turn % 2 == 0 { (a, b) } else { (b, a) };
        plain += p;
        counted += c;
    }
    Ok(EngineReport {
        model: onnx.display().to_string(),
        features,
        threads,
        batch1_rows_per_s: batch1,
        batch64_rows_per_s: batch64,
        batched_requests_per_s,
        mean_batch,
        unmonitored_requests_per_s: plain,
        monitored_requests_per_s: counted,
        telemetry_cost_percent: (plain - counted) / plain * 100.0,
        count_ns_per_row,
        infer_ns_per_row,
        count_cpu_percent_at_budget: MAX_COUNTED_ROWS_PER_SEC as f64 * count_ns_per_row
            / 1e9
            / threads as f64
            * 100.0,
    })
}

/// Nanoseconds to count one row's inputs and outputs (batches of 64 rows, no
/// budget) on the calling thread.
fn counting_cost(engine: &Engine, features: usize, seconds: f64) -> anyhow::Result<f64> {
    let monitor = monitor_for(engine, features)?.with_row_budget(u64::MAX);
    let inputs = vec![rows(features, 64)];
    let outputs = engine.run_batch_blocking(inputs.clone())?;
    let batch = [(inputs.as_slice(), outputs.as_slice())];
    let started = Instant::now();
    let mut counted = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..100 {
            monitor.observe(batch.iter().copied());
        }
        counted += 6400;
    }
    let elapsed = started.elapsed().as_secs_f64();
    monitor.take();
    Ok(elapsed * 1e9 / counted as f64)
}

/// Requests/s and the mean batch of one-row requests from [`CALLERS`] tasks
/// through the batcher for `seconds`.
async fn batched(
    engine: &Arc<Engine>,
    features: usize,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let before = engine.stats();
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(seconds);
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let engine = Arc::clone(engine);
            let input = rows(features, 1);
            tokio::spawn(async move {
                let mut done = 0usize;
                while Instant::now() < stop {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    engine.infer(vec![input.clone()], None, deadline).await?;
                    done += 1;
                }
                Ok::<_, kiln_common::Error>(done)
            })
        })
        .collect();
    let mut requests = 0usize;
    for caller in callers {
        requests += caller.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = engine.stats();
    let batches = after.inferences.saturating_sub(before.inferences).max(1);
    Ok((
        requests as f64 / elapsed,
        after.rows.saturating_sub(before.rows) as f64 / batches as f64,
    ))
}

/// A drift monitor for the model: the reference of the benchmark's rows and of
/// the model's answers to them.
fn monitor_for(engine: &Engine, features: usize) -> anyhow::Result<Monitor> {
    const ROWS: usize = 1024;
    let x: Vec<f32> = rows(features, ROWS)
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let names: Vec<String> = (0..features).map(|j| format!("f{j}")).collect();
    let reference = crate::models::reference_of_model(engine, &names, &x)?;
    Monitor::new("bench", 1, features, reference, engine.signature())
        .map_err(|e| anyhow::anyhow!("monitor the model: {e}"))
}
