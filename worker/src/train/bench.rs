//! Training throughput: samples per second of one shard's step (forward, backward,
//! AdamW) on the reference MLP 64-256-256-10 with batches of 256, on random data.
//! `scripts/bench_train_torch.py` runs the same step with PyTorch for comparison.
//! With a GPU (the `cuda` feature), the pass runs there and the optimizer on the
//! CPU, as in a shard.

use std::time::Instant;

use kiln_common::jobspec::{Activation, OptimizerKind, OptimizerSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::arch::{Arch, Task};
use super::model::{self, Batch, Engine, Model, ModelError};
use super::optim::Optimizer;

/// The reference model's widths: inputs, hidden layers, classes.
pub const BENCH_INPUTS: usize = 64;
pub const BENCH_HIDDEN: [usize; 2] = [256, 256];
pub const BENCH_CLASSES: usize = 10;
/// Examples per step.
pub const BENCH_BATCH: usize = 256;
/// Distinct batches the steps cycle through.
pub const BENCH_BATCHES: usize = 8;
/// Untimed steps before the timed ones.
pub const BENCH_WARMUP_STEPS: usize = 20;

/// One run's result.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainBench {
    /// The threads candle used (see [`model::threads`]).
    pub threads: usize,
    /// Where the pass ran ([`Engine::describe`]).
    pub engine: String,
    pub steps: usize,
    pub batch: usize,
    pub seconds: f64,
    pub samples_per_sec: f64,
    /// Mean loss of the first and the last timed step, to show it trained.
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "candle's element-wise pool already runs {0} threads in this process; \
         the benchmark needs a process where it has not started"
    )]
    ElementWisePool(usize),
    #[error("run the model: {0}")]
    Model(#[from] ModelError),
    #[error("step the optimizer: {0}")]
    Optim(#[from] super::optim::OptimError),
    #[error("this kiln was built without the cuda feature; rebuild with --features cuda")]
    NoCuda,
}

/// Times `steps` training steps after [`BENCH_WARMUP_STEPS`] untimed ones, with
/// candle limited to `threads` threads, on CUDA device `gpu` when given (a build
/// without `cuda` refuses one). It calls [`model::set_threads`], so it runs at the
/// top of a fresh process, before candle or any other thread starts.
pub fn samples_per_sec(
    threads: usize,
    steps: usize,
    gpu: Option<u32>,
) -> Result<TrainBench, BenchError> {
    if gpu.is_some() && !cfg!(feature = "cuda") {
        return Err(BenchError::NoCuda);
    }
    model::set_threads(threads);
    // candle starts its element-wise pool on first use; one started earlier in this
    // process would keep its size (see `model::set_threads`).
    let element_wise = candle_core::utils::barrier_pool().n_workers() + 1;
    if element_wise != 1 {
        return Err(BenchError::ElementWisePool(element_wise));
    }

    let arch = Arch {
        inputs: BENCH_INPUTS,
        hidden: BENCH_HIDDEN.to_vec(),
        activation: Activation::Relu,
        task: Task::Classification {
            classes: (0..BENCH_CLASSES).map(|c| c.to_string()).collect(),
        },
    };
    let mut rng = StdRng::seed_from_u64(0);
    let rows = BENCH_BATCH * BENCH_BATCHES;
    let x: Vec<f32> = (0..rows * BENCH_INPUTS)
        .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
        .collect();
    let y: Vec<u32> = (0..rows)
        .map(|_| rng.gen_range(0..BENCH_CLASSES as u32))
        .collect();
    let mut engine = Engine::for_shard(gpu.as_slice(), &arch)?;
    let mut model = Model::init(arch, 0);
    let spec = OptimizerSpec {
        kind: OptimizerKind::Adamw,
        lr: 1e-3,
        momentum: 0.0,
        weight_decay: 0.01,
    };
    let mut opt = Optimizer::new(&spec, model.params().len());
    let scale = 1.0 / BENCH_BATCH as f32;
    let mut step = |i: usize| -> Result<f64, BenchError> {
        let b = i % BENCH_BATCHES;
        let xs = &x[b * BENCH_BATCH * BENCH_INPUTS..(b + 1) * BENCH_BATCH * BENCH_INPUTS];
        let ys = &y[b * BENCH_BATCH..(b + 1) * BENCH_BATCH];
        let out = engine.gradient(&model, xs, BENCH_BATCH, Batch::Classes(ys), scale)?;
        opt.step(model.params_mut(), &out.grads)?;
        Ok(out.loss_sum / BENCH_BATCH as f64)
    };
    for i in 0..BENCH_WARMUP_STEPS {
        step(i)?;
    }
    let start = Instant::now();
    let mut first_loss = f64::NAN;
    let mut last_loss = f64::NAN;
    for i in 0..steps {
        last_loss = step(i)?;
        if i == 0 {
            first_loss = last_loss;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(TrainBench {
        threads: model::threads(),
        engine: engine.describe(),
        steps,
        batch: BENCH_BATCH,
        seconds,
        samples_per_sec: (steps * BENCH_BATCH) as f64 / seconds,
        first_loss,
        last_loss,
    })
}

// A build with `cuda` would run the benchmark on the GPU instead.
#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_run_without_the_cuda_feature_is_refused_before_anything_starts() {
        let err = samples_per_sec(1, 1, Some(0)).expect_err("no cuda in this build");
        assert!(matches!(err, BenchError::NoCuda), "{err}");
        assert!(err.to_string().contains("--features cuda"), "{err}");
    }
}
