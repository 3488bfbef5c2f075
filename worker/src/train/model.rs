//! The trainer's network: its parameters as one flat `f32` buffer, and candle for
//! the forward and backward pass.
//!
//! The flat buffer (in [`Arch`]'s layout: each layer in order, its weight
//! `[outputs][inputs]` row-major, then its bias) is the master copy: the optimizer
//! updates it in place, the all-reduce sums gradients in the same layout, and
//! checkpoints and the ONNX export read it. Each [`Model::gradient`] call copies it
//! into candle variables, runs the pass, and flattens candle's gradients back into
//! that layout:
//!
//! On a GPU (the `cuda` feature), [`Engine::Gpu`] runs the same pass with cuBLAS
//! and kernels of our own (`super::gpu`), from and to the same flat buffers.
//!
//! ```text
//!   params (flat) ──copy──▶ Var per weight and bias ──forward──▶ loss per row
//!                                                                  │ sum × scale
//!   grads (flat)  ◀─flatten── GradStore ◀──────────backward────────┘
//! ```
//!
//! The gradient is that of `scale × Σ per-example loss`, not of the mean, so that a
//! data-parallel step is exact when shards get unequal rows: each shard passes
//! `scale = 1 / global_batch`, the all-reduce sums the shards' gradients, and the
//! sum equals the one-shard gradient of the whole batch (up to float order).
//!
//! # Threads
//!
//! candle's CPU backend has no per-call thread setting; its thread count is
//! process-wide and comes from the environment:
//!
//! - Matrix products (the `gemm` crate) are split into
//!   `candle_core::utils::get_num_threads()` pieces: `RAYON_NUM_THREADS`, else the
//!   number of physical cores, read on every product. The pieces run on the
//!   current rayon pool: [`Model::gradient`] runs its pass inside candle's own
//!   pool (`Device::with_context`, as many threads), where they start on warm
//!   workers; that made the 2-thread benchmark a fifth faster than handing each
//!   product to rayon's global pool.
//! - Element-wise operations on at least 64 Ki values run on a second pool that
//!   candle starts on first use, sized by `CANDLE_NUM_THREADS`, else
//!   `RAYON_NUM_THREADS`. Its threads spin for a while after each operation; next
//!   to gemm's rayon threads they oversubscribe the shard's cores: on the 2-core
//!   CI machine, busy with other builds, the benchmark's step with gemm on 2
//!   threads ran at 14 k samples/s with that pool at 2 threads, 99 k with it at 1
//!   (the element-wise work inline).
//!
//! [`set_threads`] sets both at the top of a process that has not started other
//! threads yet, as the benchmark does. Shards, though, run as tasks inside the
//! worker process (`super::supervisor`), so they share one process-wide count:
//! `RAYON_NUM_THREADS` from the worker's environment, else its physical cores.
//! The scheduler accounts `cpus_per_shard` per worker, but a shard's pass does not
//! hold itself to it; a process per shard would.
//!
//! # Speed
//!
//! On the benchmark's MLP (64-256-256-10, batches of 256, `super::bench`) matrix
//! products are most of the step; the rest was shaped by profiling:
//!
//! - Activations are transposed (one column per example), so weight gradients
//!   come out of gemm in the flat layout; no transposed copies.
//! - Autograd starts at the first layer's output: candle would also compute the
//!   never-used gradient of the features.
//! - ReLU is a custom op with a one-pass backward (`Relu`).
//! - glibc's mmap threshold is raised once (`raise_mmap_threshold`): page faults
//!   on candle's fresh buffers were a fifth of the step.
//! - Matrix products run on our own kernels (`super::sgemm`), backward included,
//!   where the CPU has AVX-512F or AVX2 with FMA; elsewhere on candle's (the
//!   `gemm` crate).

use std::sync::Once;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};
use kiln_common::jobspec::Activation;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::arch::{Arch, Dense, LayerAt, Task};
use super::sgemm;

/// One batch's targets, as the rows of [`super::data::Target`].
#[derive(Debug, Clone, Copy)]
pub enum Batch<'a> {
    /// Class indices, for a classification.
    Classes(&'a [u32]),
    /// Values, for a regression.
    Values(&'a [f32]),
}

impl Batch<'_> {
    fn len(&self) -> usize {
        match self {
            Batch::Classes(y) => y.len(),
            Batch::Values(y) => y.len(),
        }
    }
}

/// What one forward and backward pass over a batch gives.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Gradient of `scale × Σ per-example loss`, in the flat parameter layout.
    pub grads: Vec<f32>,
    /// Sum over the rows of the per-example loss (not scaled).
    pub loss_sum: f64,
    /// Classification: rows whose largest logit is their label. Regression: 0.
    pub correct: usize,
}

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the architecture has {want} parameters; got {got} values")]
    Params { want: usize, got: usize },
    #[error("{rows} rows of {inputs} features are {want} values; got {got}")]
    Features {
        rows: usize,
        inputs: usize,
        want: usize,
        got: usize,
    },
    #[error("{rows} rows need {rows} targets; got {got}")]
    Targets { rows: usize, got: usize },
    #[error("a {task} model needs {want}; got {got}")]
    TargetKind {
        task: &'static str,
        want: &'static str,
        got: &'static str,
    },
    #[error("row {row}: class {label} is out of range; the model has {classes} classes")]
    Label {
        row: usize,
        label: u32,
        classes: usize,
    },
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("GPU: {0}")]
    Gpu(String),
}

/// A dense network and its parameters.
#[derive(Debug, Clone)]
pub struct Model {
    arch: Arch,
    /// Each layer's place in `params`, cached from the arch.
    layout: Vec<LayerAt>,
    params: Vec<f32>,
}

/// Where a shard's forward and backward passes run.
#[derive(Debug)]
pub enum Engine {
    /// candle on the CPU ([`Model::gradient`]).
    Cpu,
    /// cuBLAS and NVRTC kernels on a GPU ([`super::gpu::GpuPass`]).
    #[cfg(feature = "cuda")]
    Gpu(Box<super::gpu::GpuPass>),
}

impl Engine {
    /// The engine for a shard holding `gpus` (CUDA ordinals): the first of them
    /// when this build has the `cuda` feature, else the CPU. A GPU that cannot be
    /// opened (no driver, no libcublas or libnvrtc) is an error naming why.
    pub fn for_shard(gpus: &[u32], arch: &Arch) -> Result<Engine, ModelError> {
        #[cfg(feature = "cuda")]
        if let Some(&device) = gpus.first() {
            let pass = super::gpu::GpuPass::new(device as usize, arch)?;
            return Ok(Engine::Gpu(Box::new(pass)));
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (gpus, arch);
        Ok(Engine::Cpu)
    }

    /// Names the engine for logs: "CUDA device 0 (NVIDIA H100 80GB HBM3)", or
    /// "the CPU (2 threads)".
    pub fn describe(&self) -> String {
        match self {
            Engine::Cpu => match threads() {
                1 => "the CPU (1 thread)".to_string(),
                n => format!("the CPU ({n} threads)"),
            },
            #[cfg(feature = "cuda")]
            Engine::Gpu(pass) => pass.describe(),
        }
    }

    /// Runs [`Model::gradient`] on this engine.
    pub fn gradient(
        &mut self,
        model: &Model,
        x: &[f32],
        rows: usize,
        target: Batch<'_>,
        scale: f32,
    ) -> Result<StepOutput, ModelError> {
        match self {
            Engine::Cpu => model.gradient(x, rows, target, scale),
            #[cfg(feature = "cuda")]
            Engine::Gpu(pass) => pass.gradient(model, x, rows, target, scale),
        }
    }
}

/// Limits candle's CPU work in this process to `threads` threads (see the module
/// doc): matrix products on `threads`, element-wise operations inline. It sets
/// `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS`, so it must run before any candle
/// operation (the pools are sized on first use) and before the process starts
/// other threads (changing the environment races with readers in C code).
pub fn set_threads(threads: usize) {
    std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    std::env::set_var("CANDLE_NUM_THREADS", "1");
}

/// Returns how many pieces candle splits a matrix product into in this process.
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

impl Model {
    /// Initialises the parameters from `seed` alone, as PyTorch's `nn.Linear` does:
    /// weights and biases uniform in `±1/√inputs`. Every rank and every run gets the
    /// same values for the same seed (with this build's `rand`).
    pub fn init(arch: Arch, seed: u64) -> Model {
        let mut rng = StdRng::seed_from_u64(seed);
        let layout = arch.layout();
        let mut params = Vec::with_capacity(arch.parameter_count());
        for layer in &layout {
            let bound = if layer.inputs == 0 {
                0.0
            } else {
                1.0 / (layer.inputs as f32).sqrt()
            };
            for _ in 0..layer.weight.len() + layer.bias.len() {
                params.push((rng.gen::<f32>() * 2.0 - 1.0) * bound);
            }
        }
        Model {
            arch,
            layout,
            params,
        }
    }

    /// Makes a model from parameters in the flat layout (a checkpoint's).
    pub fn from_params(arch: Arch, params: Vec<f32>) -> Result<Model, ModelError> {
        let want = arch.parameter_count();
        if params.len() != want {
            return Err(ModelError::Params {
                want,
                got: params.len(),
            });
        }
        Ok(Model {
            layout: arch.layout(),
            arch,
            params,
        })
    }

    /// Returns the architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// Returns the parameters in the flat layout.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Returns the parameters for the optimizer to update in place.
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// Returns the parameters cut into layers.
    pub fn layers(&self) -> Vec<Dense> {
        self.arch
            .split(&self.params)
            .expect("the parameters' length was checked when the model was made")
    }

    /// Returns the raw outputs (logits, or the predicted value) for `rows` examples
    /// of `x` (row-major), row-major `rows × outputs`.
    pub fn predict(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        self.check_features(x, rows)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let layers = self.tensors(usize::MAX)?;
        let x = Tensor::from_slice(x, (rows, self.arch.inputs), &Device::Cpu)?;
        let z = first_layer(&x, &layers[0])?;
        let out = self.forward_from(z, &layers[1..])?;
        Ok(out.t()?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Runs the forward and backward pass over `rows` examples of `x` (row-major)
    /// and returns the gradient of `scale × Σ per-example loss` (softmax
    /// cross-entropy, or the squared error), the summed loss and the correct count.
    pub fn gradient(
        &self,
        x: &[f32],
        rows: usize,
        target: Batch<'_>,
        scale: f32,
    ) -> Result<StepOutput, ModelError> {
        if let Some(empty) = self.check_step(x, rows, target)? {
            return Ok(empty);
        }
        RAISE_MMAP_THRESHOLD.call_once(raise_mmap_threshold);
        if threads() == 1 {
            return self.pass(x, rows, target, scale);
        }
        // Inside candle's rayon pool each matrix product's pieces start on warm
        // workers, the calling thread among them; outside it, every product would
        // hand its pieces to rayon's global pool and wait for them.
        Device::Cpu.with_context(|| self.pass(x, rows, target, scale))
    }

    /// Runs [`Model::gradient`]'s forward and backward pass on checked inputs.
    fn pass(
        &self,
        x: &[f32],
        rows: usize,
        target: Batch<'_>,
        scale: f32,
    ) -> Result<StepOutput, ModelError> {
        // The first layer's product runs outside the graph: candle's matmul backward
        // would also compute the gradient of the features, which nothing uses (a
        // tenth of the backward's multiply-adds on the benchmark's MLP). Autograd
        // stops at the first layer's output z₁; its weight's gradient is dz₁·x, its
        // bias's Σ dz₁ over the examples.
        let dev = Device::Cpu;
        let layers = self.tensors(1)?;
        let x = Tensor::from_slice(x, (rows, self.arch.inputs), &dev)?;
        let z1 = Var::from_tensor(&first_layer(&x, &layers[0])?)?.into_inner();
        let out = self.forward_from(z1.clone(), &layers[1..])?;
        // `out` is `outputs × rows`: one column per example.
        let (per_row, correct) = match target {
            Batch::Classes(y) => {
                let labels = Tensor::from_slice(y, (1, rows), &dev)?;
                let max = out.max_keepdim(0)?.detach();
                let shifted = out.broadcast_sub(&max)?;
                let log_sum_exp = shifted.exp()?.sum_keepdim(0)?.log()?;
                let picked = shifted.gather(&labels, 0)?;
                let logits = out.flatten_all()?.to_vec1::<f32>()?;
                let correct = y
                    .iter()
                    .enumerate()
                    .filter(|&(row, &label)| argmax(&logits, row, rows) == label as usize)
                    .count();
                ((log_sum_exp - picked)?, correct)
            }
            Batch::Values(y) => {
                let y = Tensor::from_slice(y, (1, rows), &dev)?;
                ((out - y)?.sqr()?, 0)
            }
        };
        let loss_sum = per_row
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&l| f64::from(l))
            .sum();
        let store = per_row
            .sum_all()?
            .affine(f64::from(scale), 0.0)?
            .backward()?;
        let mut grads = Vec::with_capacity(self.params.len());
        let (w1, b1) = &layers[0];
        match store.get(&z1) {
            Some(dz1) => {
                grads.extend(sgemm::product(dz1, &x)?.flatten_all()?.to_vec1::<f32>()?);
                grads.extend(dz1.sum_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?);
            }
            None => grads.resize(w1.elem_count() + b1.elem_count(), 0.0),
        }
        for (w, b) in &layers[1..] {
            for var in [w, b] {
                match store.get(var) {
                    Some(g) => grads.extend(g.flatten_all()?.to_vec1::<f32>()?),
                    // A zero scale cuts the graph: nothing reaches the parameters.
                    None => grads.resize(grads.len() + var.elem_count(), 0.0),
                }
            }
        }
        Ok(StepOutput {
            grads,
            loss_sum,
            correct,
        })
    }

    /// Checks that `x` holds `rows` examples and `target` their targets, of this
    /// model's kind and range; returns the step of an empty batch (a zero
    /// gradient), which needs no pass, on any engine.
    pub(super) fn check_step(
        &self,
        x: &[f32],
        rows: usize,
        target: Batch<'_>,
    ) -> Result<Option<StepOutput>, ModelError> {
        self.check_features(x, rows)?;
        self.check_target(target, rows)?;
        Ok((rows == 0).then(|| StepOutput {
            grads: vec![0.0; self.params.len()],
            loss_sum: 0.0,
            correct: 0,
        }))
    }

    fn check_features(&self, x: &[f32], rows: usize) -> Result<(), ModelError> {
        let inputs = self.arch.inputs;
        let want = rows.checked_mul(inputs).ok_or(ModelError::Features {
            rows,
            inputs,
            want: usize::MAX,
            got: x.len(),
        })?;
        if x.len() != want {
            return Err(ModelError::Features {
                rows,
                inputs,
                want,
                got: x.len(),
            });
        }
        Ok(())
    }

    fn check_target(&self, target: Batch<'_>, rows: usize) -> Result<(), ModelError> {
        match (&self.arch.task, target) {
            (Task::Classification { classes }, Batch::Classes(y)) => {
                if let Some((row, &label)) = y
                    .iter()
                    .enumerate()
                    .find(|(_, &label)| label as usize >= classes.len())
                {
                    return Err(ModelError::Label {
                        row,
                        label,
                        classes: classes.len(),
                    });
                }
            }
            (Task::Regression, Batch::Values(_)) => {}
            (Task::Classification { .. }, Batch::Values(_)) => {
                return Err(ModelError::TargetKind {
                    task: "classification",
                    want: "class indices",
                    got: "values",
                })
            }
            (Task::Regression, Batch::Classes(_)) => {
                return Err(ModelError::TargetKind {
                    task: "regression",
                    want: "values",
                    got: "class indices",
                })
            }
        }
        if target.len() != rows {
            return Err(ModelError::Targets {
                rows,
                got: target.len(),
            });
        }
        Ok(())
    }

    /// Copies each layer's weight (`outputs × inputs`) and bias (`outputs × 1`) into
    /// candle tensors; those of layers from `trainable_from` on are variables, which
    /// gradients reach.
    fn tensors(&self, trainable_from: usize) -> Result<Vec<(Tensor, Tensor)>, ModelError> {
        let dev = Device::Cpu;
        let tensor = |layer: usize, values: &[f32], shape: (usize, usize)| {
            if layer >= trainable_from {
                Var::from_slice(values, shape, &dev).map(Var::into_inner)
            } else {
                Tensor::from_slice(values, shape, &dev)
            }
        };
        let mut layers = Vec::with_capacity(self.layout.len());
        for (l, layer) in self.layout.iter().enumerate() {
            let shape = (layer.outputs, layer.inputs);
            let w = tensor(l, &self.params[layer.weight.clone()], shape)?;
            let b = tensor(l, &self.params[layer.bias.clone()], (layer.outputs, 1))?;
            layers.push((w, b));
        }
        Ok(layers)
    }

    /// Runs the layers after the first on its output `z`, with the activation
    /// after every layer but the last; returns the outputs, `outputs × rows`.
    fn forward_from(&self, z: Tensor, layers: &[(Tensor, Tensor)]) -> Result<Tensor, ModelError> {
        let mut z = z;
        for (w, b) in layers {
            let h = match self.arch.activation {
                Activation::Relu => z.apply_op1(Relu)?,
                // The exact form, as PyTorch's default `nn.GELU` and the ONNX
                // export; candle's `gelu` is the tanh approximation.
                Activation::Gelu => z.gelu_erf()?,
                Activation::Tanh => z.tanh()?,
            };
            z = sgemm::product(w, &h)?.broadcast_add(b)?;
        }
        Ok(z)
    }
}

/// Returns the first layer's output `z₁ = W₁·xᵀ + b₁` for `x` (`rows × inputs`),
/// `outputs × rows`.
///
/// The pass runs on transposed activations (one column per example) so that each
/// weight's gradient, `dz·hᵀ`, comes out of the matrix product already in the flat
/// layout's `[outputs][inputs]` order, with no transposed copies.
fn first_layer(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor, ModelError> {
    Ok(sgemm::product(w, &x.t()?)?.broadcast_add(b)?)
}

/// ReLU with a one-pass backward. candle's own `relu` builds its backward mask
/// with a scalar comparison, then converts it and multiplies: 90 µs for a
/// 256 × 256 activation on the 2-core CI machine, a tenth of the benchmark's step.
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "kiln-relu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            return Err(candle_core::Error::msg("kiln-relu takes f32 values"));
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::msg(
                "kiln-relu takes a contiguous tensor",
            ));
        };
        // `v < 0` is false for NaN, which passes through as in PyTorch.
        let out = values[start..end]
            .iter()
            .map(|&v| if v < 0.0 { 0.0 } else { v })
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let out = res.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad_res.flatten_all()?.to_vec1::<f32>()?;
        let masked = out
            .iter()
            .zip(grad)
            .map(|(&o, g)| if o > 0.0 { g } else { 0.0 })
            .collect();
        Ok(Some(Tensor::from_vec(masked, res.shape(), res.device())?))
    }
}

/// Makes [`raise_mmap_threshold`] run once per process.
static RAISE_MMAP_THRESHOLD: Once = Once::new();

/// Bytes of the allocation that raises glibc's mmap threshold: below its cap for
/// dynamic raises (32 MiB on 64-bit), above the largest tensor of a usual step.
const MMAP_THRESHOLD_BYTES: usize = 16 << 20;

/// Allocates and frees one block of [`MMAP_THRESHOLD_BYTES`].
///
/// candle allocates a fresh buffer for every operation; a 256-wide layer's
/// activations are 256 KiB per batch of 256, over glibc's initial 128 KiB mmap
/// threshold. Each step then maps and unmaps them, or grows and trims the heap:
/// the page faults took a fifth of the benchmark's step. glibc raises its mmap
/// threshold to the size of a freed mapped block, and its trim threshold to twice
/// that (mallopt(3), "dynamic mmap threshold"): after this, buffers below 16 MiB
/// are reused from the heap. Other allocators are not affected.
fn raise_mmap_threshold() {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(
        MMAP_THRESHOLD_BYTES,
    )));
}

/// Index of the first largest value in column `column` of a row-major matrix
/// with `columns` columns.
fn argmax(matrix: &[f32], column: usize, columns: usize) -> usize {
    let mut best = 0;
    for (i, v) in matrix.iter().skip(column).step_by(columns).enumerate() {
        if *v > matrix[best * columns + column] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use kiln_common::jobspec::{OptimizerKind, OptimizerSpec};

    use super::*;
    use crate::train::optim::Optimizer;

    fn classes(n: usize) -> Task {
        Task::Classification {
            classes: (0..n).map(|i| format!("c{i}")).collect(),
        }
    }

    fn arch(inputs: usize, hidden: &[usize], activation: Activation, task: Task) -> Arch {
        Arch {
            inputs,
            hidden: hidden.to_vec(),
            activation,
            task,
        }
    }

    fn uniform(rng: &mut StdRng, n: usize, bound: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * bound)
            .collect()
    }

    /// erf in f64: its Taylor series near 0, a continued fraction for erfc beyond.
    fn erf(x: f64) -> f64 {
        if x.abs() > 3.0 {
            let a = x.abs();
            let mut frac = 0.0;
            for k in (1..=80).rev() {
                frac = (k as f64 / 2.0) / (a + frac);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + frac);
            return (1.0 - erfc).copysign(x);
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// The network's outputs computed independently of candle, in f64.
    fn reference_forward(arch: &Arch, params: &[f64], x: &[f32], rows: usize) -> Vec<Vec<f64>> {
        let shapes = arch.layer_shapes();
        (0..rows)
            .map(|r| {
                let mut h: Vec<f64> = x[r * arch.inputs..(r + 1) * arch.inputs]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                let mut at = 0;
                for (l, &(inputs, outputs)) in shapes.iter().enumerate() {
                    let w = &params[at..at + inputs * outputs];
                    let b = &params[at + inputs * outputs..at + inputs * outputs + outputs];
                    at += inputs * outputs + outputs;
                    h = (0..outputs)
                        .map(|o| {
                            let z =
                                b[o] + (0..inputs).map(|i| w[o * inputs + i] * h[i]).sum::<f64>();
                            if l + 1 == shapes.len() {
                                return z;
                            }
                            match arch.activation {
                                Activation::Relu => z.max(0.0),
                                Activation::Gelu => {
                                    0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2))
                                }
                                Activation::Tanh => z.tanh(),
                            }
                        })
                        .collect();
                }
                h
            })
            .collect()
    }

    /// Σ per-example loss, in f64.
    fn reference_loss(
        arch: &Arch,
        params: &[f64],
        x: &[f32],
        rows: usize,
        target: Batch<'_>,
    ) -> f64 {
        let out = reference_forward(arch, params, x, rows);
        out.iter()
            .enumerate()
            .map(|(r, z)| match target {
                Batch::Classes(y) => {
                    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                    lse - z[y[r] as usize]
                }
                Batch::Values(y) => (z[0] - f64::from(y[r])).powi(2),
            })
            .sum()
    }

    #[test]
    fn gradients_match_central_differences_for_every_task_and_activation() {
        let mut rng = StdRng::seed_from_u64(7);
        let rows = 6;
        let x = uniform(&mut rng, rows * 4, 1.5);
        let labels: Vec<u32> = (0..rows as u32).map(|r| r % 3).collect();
        let values = uniform(&mut rng, rows, 2.0);
        let scale = 0.25;
        let cases = [Activation::Relu, Activation::Gelu, Activation::Tanh]
            .into_iter()
            .map(|activation| (activation, &[5, 3][..]))
            // No hidden layer: the first layer is also the last.
            .chain([(Activation::Relu, &[][..])]);
        for (activation, hidden) in cases {
            for (task, target) in [
                (classes(3), Batch::Classes(&labels)),
                (Task::Regression, Batch::Values(&values)),
            ] {
                let arch = arch(4, hidden, activation, task);
                let model = Model::init(arch.clone(), 11);
                let out = model.gradient(&x, rows, target, scale).expect("gradient");
                let p: Vec<f64> = model.params().iter().map(|&v| f64::from(v)).collect();
                let loss = reference_loss(&arch, &p, &x, rows, target);
                assert!(
                    (out.loss_sum - loss).abs() < 1e-5 * loss.max(1.0),
                    "{activation:?} {:?}: loss {} vs {loss}",
                    arch.task,
                    out.loss_sum
                );
                let h = 1e-6;
                for i in 0..p.len() {
                    let mut plus = p.clone();
                    plus[i] += h;
                    let mut minus = p.clone();
                    minus[i] -= h;
                    let fd = f64::from(scale)
                        * (reference_loss(&arch, &plus, &x, rows, target)
                            - reference_loss(&arch, &minus, &x, rows, target))
                        / (2.0 * h);
                    let g = f64::from(out.grads[i]);
                    assert!(
                        (g - fd).abs() < 1e-4 + 1e-3 * fd.abs(),
                        "{activation:?} {:?}: parameter {i}: autograd {g}, finite differences {fd}",
                        arch.task
                    );
                }
            }
        }
    }

    #[test]
    fn gelu_is_the_exact_erf_form() {
        // One hidden unit that passes x through: the output is gelu(x). The tanh
        // approximation is off by about 1e-4 at these points.
        let arch = arch(1, &[1], Activation::Gelu, Task::Regression);
        let model = Model::from_params(arch, vec![1.0, 0.0, 1.0, 0.0]).expect("params");
        let x = [-2.0f32, -1.0, 0.5, 1.5, 2.5];
        let out = model.predict(&x, x.len()).expect("predict");
        for (&v, &y) in x.iter().zip(&out) {
            let z = f64::from(v);
            let exact = 0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2));
            assert!(
                (f64::from(y) - exact).abs() < 2e-6,
                "gelu({v}) = {y}, not {exact}"
            );
        }
    }

    #[test]
    fn predict_matches_an_independent_forward_pass() {
        let mut rng = StdRng::seed_from_u64(3);
        let arch = arch(5, &[8, 4], Activation::Tanh, classes(3));
        let model = Model::init(arch.clone(), 5);
        let x = uniform(&mut rng, 7 * 5, 2.0);
        let out = model.predict(&x, 7).expect("predict");
        assert_eq!(out.len(), 7 * 3);
        let p: Vec<f64> = model.params().iter().map(|&v| f64::from(v)).collect();
        let want: Vec<f64> = reference_forward(&arch, &p, &x, 7).concat();
        for (got, want) in out.iter().zip(&want) {
            assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn row_splits_sum_to_the_whole_batch_gradient() {
        // Distributed training sums shards' gradients, each scaled by 1/global batch.
        let mut rng = StdRng::seed_from_u64(9);
        let rows = 5;
        let x = uniform(&mut rng, rows * 6, 1.0);
        let labels = [0u32, 2, 1, 1, 0];
        let values = uniform(&mut rng, rows, 1.0);
        for (task, y) in [
            (classes(3), Batch::Classes(&labels)),
            (Task::Regression, Batch::Values(&values)),
        ] {
            let model = Model::init(arch(6, &[7], Activation::Gelu, task), 1);
            let scale = 1.0 / rows as f32;
            let split = |r: std::ops::Range<usize>| match y {
                Batch::Classes(l) => Batch::Classes(&l[r]),
                Batch::Values(v) => Batch::Values(&v[r]),
            };
            let whole = model.gradient(&x, rows, y, scale).expect("whole");
            let a = model
                .gradient(&x[..3 * 6], 3, split(0..3), scale)
                .expect("first 3 rows");
            let b = model
                .gradient(&x[3 * 6..], 2, split(3..5), scale)
                .expect("last 2 rows");
            let empty = model.gradient(&[], 0, split(5..5), scale).expect("no rows");
            assert_eq!(empty.grads, vec![0.0; model.params().len()]);
            assert_eq!((empty.loss_sum, empty.correct), (0.0, 0));
            for (i, g) in whole.grads.iter().enumerate() {
                let sum = a.grads[i] + b.grads[i] + empty.grads[i];
                assert!((g - sum).abs() < 1e-6, "parameter {i}: {g} vs {sum}");
            }
            assert!((whole.loss_sum - (a.loss_sum + b.loss_sum)).abs() < 1e-5);
            assert_eq!(whole.correct, a.correct + b.correct);
            // The whole batch's loss is not trivially zero.
            assert!(whole.grads.iter().any(|g| g.abs() > 1e-3));
        }
    }

    fn adamw(lr: f64) -> OptimizerSpec {
        OptimizerSpec {
            kind: OptimizerKind::Adamw,
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
        }
    }

    #[test]
    fn adamw_learns_a_separable_classification() {
        // Three classes split by two hyperplanes through four features.
        let mut rng = StdRng::seed_from_u64(21);
        let rows = 300;
        let x = uniform(&mut rng, rows * 4, 1.0);
        let y: Vec<u32> = x
            .chunks(4)
            .map(|r| {
                let s = r[0] + 0.5 * r[1] - r[2];
                if s < -0.3 {
                    0
                } else if s < 0.3 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let mut model = Model::init(arch(4, &[16], Activation::Relu, classes(3)), 2);
        let mut opt = Optimizer::new(&adamw(0.02), model.params().len());
        let scale = 1.0 / rows as f32;
        let first = model
            .gradient(&x, rows, Batch::Classes(&y), scale)
            .expect("step");
        let mut last = first.clone();
        for _ in 0..400 {
            last = model
                .gradient(&x, rows, Batch::Classes(&y), scale)
                .expect("step");
            opt.step(model.params_mut(), &last.grads)
                .expect("optimizer");
        }
        let accuracy = last.correct as f64 / rows as f64;
        assert!(
            accuracy > 0.95,
            "accuracy {accuracy}, loss {} (first {})",
            last.loss_sum / rows as f64,
            first.loss_sum / rows as f64
        );
        assert!(last.loss_sum < first.loss_sum / 4.0);
    }

    #[test]
    fn adamw_fits_a_linear_regression() {
        let mut rng = StdRng::seed_from_u64(5);
        let rows = 200;
        let x = uniform(&mut rng, rows * 3, 1.0);
        let y: Vec<f32> = x
            .chunks(3)
            .map(|r| 2.0 * r[0] - 1.5 * r[1] + 0.5 * r[2] + 0.7)
            .collect();
        let mut model = Model::init(arch(3, &[8], Activation::Tanh, Task::Regression), 4);
        let mut opt = Optimizer::new(&adamw(0.02), model.params().len());
        let scale = 1.0 / rows as f32;
        let first = model
            .gradient(&x, rows, Batch::Values(&y), scale)
            .expect("step");
        for _ in 0..400 {
            let out = model
                .gradient(&x, rows, Batch::Values(&y), scale)
                .expect("step");
            opt.step(model.params_mut(), &out.grads).expect("optimizer");
        }
        let pred = model.predict(&x, rows).expect("predict");
        let mse = pred
            .iter()
            .zip(&y)
            .map(|(p, y)| f64::from(p - y).powi(2))
            .sum::<f64>()
            / rows as f64;
        let first_mse = first.loss_sum / rows as f64;
        assert!(mse < 0.01, "mse {mse}, first {first_mse}");
        assert!(
            first_mse > 0.5,
            "the problem was already solved: {first_mse}"
        );
    }

    #[test]
    fn the_seed_alone_decides_the_initial_parameters() {
        let a = arch(64, &[32], Activation::Relu, classes(4));
        let one = Model::init(a.clone(), 42);
        assert_eq!(one.params(), Model::init(a.clone(), 42).params());
        assert_ne!(one.params(), Model::init(a.clone(), 43).params());
        // nn.Linear's bound: ±1/√inputs for weights and biases of each layer.
        let layers = one.layers();
        for layer in &layers {
            let bound = 1.0 / (layer.inputs as f32).sqrt();
            let values = layer.weight.iter().chain(&layer.bias);
            let max = values.clone().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(max <= bound && max > 0.9 * bound, "{max} vs {bound}");
        }
        assert_eq!(layers[0].weight.len(), 32 * 64);
    }

    /// Without the `cuda` feature a shard given GPUs still trains, on the CPU, and
    /// its pass is candle's.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_a_shard_given_gpus_runs_its_pass_on_the_cpu() {
        let arch = arch(4, &[8], Activation::Tanh, Task::Regression);
        let model = Model::init(arch.clone(), 9);
        let mut engine = Engine::for_shard(&[0, 1], &arch).expect("an engine");
        assert!(matches!(engine, Engine::Cpu), "{engine:?}");
        assert!(
            engine.describe().starts_with("the CPU ("),
            "{}",
            engine.describe()
        );
        let x = [0.5, -1.0, 0.25, 2.0, 1.0, 0.0, -0.5, 0.75];
        let target = Batch::Values(&[0.3, -0.2]);
        let direct = model.gradient(&x, 2, target, 0.5).expect("direct");
        let through = engine.gradient(&model, &x, 2, target, 0.5).expect("engine");
        assert_eq!(direct, through);
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let a = arch(3, &[4], Activation::Relu, classes(2));
        let err = Model::from_params(a.clone(), vec![0.0; 5]).expect_err("short");
        assert!(
            matches!(err, ModelError::Params { want: 26, got: 5 }),
            "{err}"
        );
        let model = Model::init(a, 0);
        assert!(matches!(
            model.predict(&[0.0; 7], 2),
            Err(ModelError::Features {
                want: 6,
                got: 7,
                ..
            })
        ));
        assert!(matches!(
            model.gradient(&[0.0; 5], 2, Batch::Classes(&[0, 1]), 1.0),
            Err(ModelError::Features {
                want: 6,
                got: 5,
                ..
            })
        ));
        assert!(matches!(
            model.gradient(&[0.0; 6], 2, Batch::Classes(&[0]), 1.0),
            Err(ModelError::Targets { rows: 2, got: 1 })
        ));
        assert!(matches!(
            model.gradient(&[0.0; 6], 2, Batch::Classes(&[0, 2]), 1.0),
            Err(ModelError::Label {
                row: 1,
                label: 2,
                classes: 2
            })
        ));
        let err = model
            .gradient(&[0.0; 6], 2, Batch::Values(&[0.0, 1.0]), 1.0)
            .expect_err("values for a classification");
        assert_eq!(
            err.to_string(),
            "a classification model needs class indices; got values"
        );
    }

    #[test]
    fn an_empty_batch_or_a_zero_scale_gives_a_zero_gradient() {
        let model = Model::init(arch(3, &[4], Activation::Tanh, Task::Regression), 0);
        let out = model
            .gradient(&[], 0, Batch::Values(&[]), 0.5)
            .expect("no rows");
        assert_eq!(out.grads, vec![0.0; model.params().len()]);
        assert_eq!(out.loss_sum, 0.0);
        assert!(model.predict(&[], 0).expect("no rows").is_empty());
        let out = model
            .gradient(&[1.0, 2.0, 3.0], 1, Batch::Values(&[10.0]), 0.0)
            .expect("zero scale");
        assert_eq!(out.grads, vec![0.0; model.params().len()]);
        assert!(out.loss_sum > 1.0, "the loss is still reported");
    }
}
