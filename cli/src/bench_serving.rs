//! `kiln bench serving-engine`: the serving engine in-process, without HTTP: rows/s
//! at batch 1 and 64 on the calling thread, and one-row requests/s through the
//! dynamic batcher from many concurrent tasks. The served figures of
//! `scripts/bench_serving.sh` are compared with these (the ceiling).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use kiln_worker::serving::engine::{Engine, EngineConfig};
use kiln_worker::serving::{DataType, Tensor};

/// Concurrent one-row callers of the batcher.
const CALLERS: usize = 256;

#[derive(Debug, serde::Serialize)]
pub struct EngineReport {
    pub model: String,
    pub features: usize,
    pub threads: usize,
    pub batch1_rows_per_s: f64,
    pub batch64_rows_per_s: f64,
    pub batched_requests_per_s: f64,
    pub mean_batch: f64,
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
    };
    let engine =
        tokio::task::spawn_blocking(move || Engine::load(&bytes, "bench", config)).await??;
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
    let before = engine.stats();
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(seconds);
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let engine = Arc::clone(&engine);
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
    Ok(EngineReport {
        model: onnx.display().to_string(),
        features,
        threads,
        batch1_rows_per_s: batch1,
        batch64_rows_per_s: batch64,
        batched_requests_per_s: requests as f64 / elapsed,
        mean_batch: after.rows.saturating_sub(before.rows) as f64 / batches as f64,
    })
}
