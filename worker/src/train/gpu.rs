//! The trainer's forward and backward pass on an NVIDIA GPU (`cuda` feature):
//! matrix products through cuBLAS, the element-wise work in five small kernels
//! compiled at run time with NVRTC. Both libraries are opened through cudarc at
//! run time, like libcuda and libnccl, so the build needs no CUDA toolkit.
//!
//! It computes exactly what [`Model::gradient`] computes on the CPU, in the same
//! layout: the gradient of `scale × Σ per-example loss` in the flat parameter
//! layout, the summed loss and the correct count. The flat host buffer stays the
//! master copy (the optimizer, the all-reduce, checkpoints and the export read
//! it), so each pass uploads the parameters and the batch and downloads the
//! gradient; an optimizer on the device, which would save those copies, is not
//! built.
//!
//! ```text
//!  params ──htod──▶ W₁ b₁ … Wₗ bₗ (device)      x ──htod──▶ X (rows × inputs)
//!  forward:  Zₗ = Wₗ·Hₗ₋₁ (cuBLAS), H₀ = Xᵀ;  Zₗ += bₗ, Hₗ = act(Zₗ) (bias_act)
//!  loss:     softmax_xent or squared_error: per-row loss, correct, dZ_last
//!  backward: dWₗ = dZₗ·Hₗ₋₁ᵀ, dbₗ = dZₗ·1 (cuBLAS, straight into the flat grads)
//!            dHₗ₋₁ = Wₗᵀ·dZₗ, dZₗ₋₁ = dHₗ₋₁ ⊙ act′(Zₗ₋₁) (act_backward)
//!  grads, per-row loss and correct ──dtoh──▶ host
//! ```
//!
//! Activations are kept transposed (`width × rows`, one column per example), as on
//! the CPU, so every weight gradient comes out in the flat `[outputs][inputs]`
//! order. cuBLAS is column-major; [`RowMajor`] maps each row-major product onto
//! its arguments.
//!
//! The pass itself ([`run_pass`]) is written once over [`PassDevice`]: the GPU
//! ([`Cuda`]) is one device; the tests run the same pass on a host twin whose
//! kernels are [`KERNELS`] built by the C++ compiler and whose products follow
//! cuBLAS's column-major arguments, and compare it with candle's pass. So the
//! layer order, the offsets, the transposes and the kernels' arithmetic are
//! checked on any machine; on a GPU, the same comparison runs on the device.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use kiln_common::jobspec::Activation;

use super::arch::{Arch, LayerAt};
use super::model::{Batch, Model, ModelError, StepOutput};
use crate::cuda::{self, Library};

const CUBLAS: Library = Library {
    label: "libcublas",
    cudarc_name: "cublas",
    other_sonames: &["libcublas.so.13"],
    install: "install cuBLAS (the CUDA toolkit's lib64, or pip install nvidia-cublas-cu12, \
              which puts it under site-packages/nvidia/cublas/lib) and add its directory \
              to LD_LIBRARY_PATH",
    present: cudarc::cublas::sys::is_culib_present,
};

const NVRTC: Library = Library {
    label: "libnvrtc",
    cudarc_name: "nvrtc",
    other_sonames: &["libnvrtc.so.13"],
    install: "install NVRTC (the CUDA toolkit's lib64, or pip install \
              nvidia-cuda-nvrtc-cu12, which puts it under \
              site-packages/nvidia/cuda_nvrtc/lib) and add its directory to \
              LD_LIBRARY_PATH",
    present: cudarc::nvrtc::sys::is_culib_present,
};

/// The element-wise kernels. Matrices are row-major `width × rows` (one column
/// per example); `act` is 0 for ReLU, 1 for the exact (erf) GELU, 2 for tanh, as
/// [`activation_code`] numbers them.
const KERNELS: &str = r#"
__device__ __forceinline__ float activate(float v, int act) {
    if (act == 0) return v > 0.0f ? v : 0.0f;
    if (act == 1) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    return tanhf(v);
}

__device__ __forceinline__ float slope(float v, int act) {
    if (act == 0) return v > 0.0f ? 1.0f : 0.0f;
    if (act == 1) {
        return 0.5f * (1.0f + erff(v * 0.70710678118654752f))
             + v * 0.39894228040143268f * expf(-0.5f * v * v);
    }
    float t = tanhf(v);
    return 1.0f - t * t;
}

extern "C" __global__ void add_bias(float* z, const float* b, int outputs, int rows) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)outputs * rows) return;
    z[i] += b[i / rows];
}

extern "C" __global__ void bias_act(float* z, const float* b, float* h, int outputs,
                                    int rows, int act) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)outputs * rows) return;
    float v = z[i] + b[i / rows];
    z[i] = v;
    h[i] = activate(v, act);
}

extern "C" __global__ void act_backward(float* d, const float* z, long long n, int act) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    d[i] *= slope(z[i], act);
}

// One thread per example (column j): the loss log Σ exp(z - max) - (z[label] - max),
// whether the first largest logit is the label, and dZ = scale (softmax - onehot).
extern "C" __global__ void softmax_xent(const float* z, float* d, const unsigned int* labels,
                                        float* loss, float* correct, int classes, int rows,
                                        float scale) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= rows) return;
    float top = z[j];
    int best = 0;
    for (int c = 1; c < classes; ++c) {
        float v = z[(long long)c * rows + j];
        if (v > top) { top = v; best = c; }
    }
    float sum = 0.0f;
    for (int c = 0; c < classes; ++c) sum += expf(z[(long long)c * rows + j] - top);
    unsigned int label = labels[j];
    loss[j] = logf(sum) - (z[(long long)label * rows + j] - top);
    correct[j] = best == (int)label ? 1.0f : 0.0f;
    for (int c = 0; c < classes; ++c) {
        long long at = (long long)c * rows + j;
        float p = expf(z[at] - top) / sum;
        d[at] = scale * (p - (c == (int)label ? 1.0f : 0.0f));
    }
}

extern "C" __global__ void squared_error(const float* z, float* d, const float* y,
                                         float* loss, int rows, float scale) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= rows) return;
    float e = z[j] - y[j];
    loss[j] = e * e;
    d[j] = scale * 2.0f * e;
}
"#;

/// The kernels' names, in [`Kernels`]' order.
const KERNEL_NAMES: [&str; 5] = [
    "add_bias",
    "bias_act",
    "act_backward",
    "softmax_xent",
    "squared_error",
];

/// The number [`KERNELS`] gives an activation.
fn activation_code(activation: Activation) -> i32 {
    match activation {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::Tanh => 2,
    }
}

/// Compiles [`KERNELS`] to PTX with NVRTC (no GPU needed).
pub fn compile_kernels() -> Result<Ptx, String> {
    cuda::check_library(NVRTC)?;
    let options = CompileOptions {
        name: Some("kiln_train.cu".into()),
        ..Default::default()
    };
    cuda::guarded("compile the training kernels", || {
        cudarc::nvrtc::compile_ptx_with_opts(KERNELS, options)
    })?
    .map_err(|e| match e {
        CompileError::CompileError { log, .. } => format!(
            "NVRTC refused the training kernels: {}",
            log.to_string_lossy()
        ),
        other => format!("compile the training kernels: {other:?}"),
    })
}

/// A row-major product `C (m × n) = op(A) · op(B)`, `op(A)` being `m × k` and
/// `op(B)` `k × n`; `a_t` says A is stored transposed (`k × m`), `b_t` that B is
/// (`n × k`). Every matrix is dense: its leading dimension is its stored width.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RowMajor {
    a_t: bool,
    b_t: bool,
    m: usize,
    n: usize,
    k: usize,
}

/// A column-major product as cuBLAS's `sgemm` takes it, operands A′ and B′.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ColumnMajor {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
}

impl RowMajor {
    /// The column-major product on the same storage. A row-major `C` is the
    /// column-major `Cᵀ`, and `Cᵀ = op(B)ᵀ · op(A)ᵀ`: cuBLAS gets B's storage as
    /// its A′ and A's as its B′, each with the same transpose flag, and `m`, `n`
    /// swapped.
    fn column_major(self) -> ColumnMajor {
        ColumnMajor {
            trans_a: self.b_t,
            trans_b: self.a_t,
            m: self.n,
            n: self.m,
            k: self.k,
            lda: if self.b_t { self.k } else { self.n },
            ldb: if self.a_t { self.m } else { self.k },
            ldc: self.n,
        }
    }

    /// Elements each operand must hold: A, B, C.
    fn lengths(self) -> (usize, usize, usize) {
        (self.m * self.k, self.k * self.n, self.m * self.n)
    }
}

/// The place a pass runs: buffers, products and the five kernels. [`Cuda`] is the
/// GPU; the tests run the same pass ([`run_pass`]) on a host twin whose kernels
/// are [`KERNELS`] compiled by the C++ compiler, against candle's pass.
trait PassDevice {
    /// A buffer of `f32` values.
    type F32;
    /// A buffer of `u32` values (class labels).
    type U32;

    fn alloc(&mut self, n: usize) -> Result<Self::F32, ModelError>;
    fn alloc_u32(&mut self, n: usize) -> Result<Self::U32, ModelError>;
    fn upload(&mut self, src: &[f32], dst: &mut Self::F32) -> Result<(), ModelError>;
    fn upload_u32(&mut self, src: &[u32], dst: &mut Self::U32) -> Result<(), ModelError>;
    fn download(&mut self, src: &Self::F32, dst: &mut [f32]) -> Result<(), ModelError>;
    /// Waits until every download has landed.
    fn finish(&mut self) -> Result<(), ModelError>;

    /// `c[c_at..] = op(a[a_at..]) · op(b[b_at..])`, row-major (see [`RowMajor`]).
    fn product(
        &mut self,
        shape: RowMajor,
        a: (&Self::F32, usize),
        b: (&Self::F32, usize),
        c: (&mut Self::F32, usize),
    ) -> Result<(), ModelError>;
    /// `z += bias` per row of `z` (`outputs × rows`).
    fn add_bias(
        &mut self,
        z: &mut Self::F32,
        bias: (&Self::F32, usize),
        outputs: usize,
        rows: usize,
    ) -> Result<(), ModelError>;
    /// `z += bias`, then `h = act(z)`.
    fn bias_act(
        &mut self,
        z: &mut Self::F32,
        bias: (&Self::F32, usize),
        h: &mut Self::F32,
        outputs: usize,
        rows: usize,
        act: i32,
    ) -> Result<(), ModelError>;
    /// `d *= act′(z)` over the first `n` values.
    fn act_backward(
        &mut self,
        d: &mut Self::F32,
        z: &Self::F32,
        n: usize,
        act: i32,
    ) -> Result<(), ModelError>;
    /// Per column of `z` (`classes × rows`): the loss, whether the first largest
    /// logit is the label, and `d = scale (softmax − onehot)`.
    #[allow(clippy::too_many_arguments)]
    fn softmax_xent(
        &mut self,
        z: &Self::F32,
        d: &mut Self::F32,
        labels: &Self::U32,
        loss: &mut Self::F32,
        correct: &mut Self::F32,
        classes: usize,
        rows: usize,
        scale: f32,
    ) -> Result<(), ModelError>;
    /// Per column of `z` (`1 × rows`): the squared error and `d = 2 scale (z − y)`.
    fn squared_error(
        &mut self,
        z: &Self::F32,
        d: &mut Self::F32,
        y: &Self::F32,
        loss: &mut Self::F32,
        rows: usize,
        scale: f32,
    ) -> Result<(), ModelError>;
}

/// A pass's buffers for batches of `rows` examples.
struct Buffers<D: PassDevice> {
    rows: usize,
    x: D::F32,
    /// Each layer's pre-activation, `outputs × rows`.
    z: Vec<D::F32>,
    /// Each hidden layer's activation, `outputs × rows`.
    h: Vec<D::F32>,
    /// The gradient flowing back (`dZ`) and the next one, `widest × rows` each.
    d: D::F32,
    d_next: D::F32,
    labels: D::U32,
    values: D::F32,
    loss: D::F32,
    correct: D::F32,
    ones: D::F32,
}

impl<D: PassDevice> Buffers<D> {
    fn new(dev: &mut D, layout: &[LayerAt], rows: usize) -> Result<Buffers<D>, ModelError> {
        let inputs = layout.first().map_or(0, |layer| layer.inputs);
        let widest = layout
            .iter()
            .map(|layer| layer.outputs)
            .chain([inputs])
            .max()
            .unwrap_or(1);
        let mut z = Vec::with_capacity(layout.len());
        for layer in layout {
            z.push(dev.alloc(layer.outputs * rows)?);
        }
        let mut h = Vec::with_capacity(layout.len());
        for layer in &layout[..layout.len().saturating_sub(1)] {
            h.push(dev.alloc(layer.outputs * rows)?);
        }
        let mut ones = dev.alloc(rows)?;
        dev.upload(&vec![1.0; rows], &mut ones)?;
        Ok(Buffers {
            rows,
            x: dev.alloc(rows * inputs)?,
            z,
            h,
            d: dev.alloc(widest * rows)?,
            d_next: dev.alloc(widest * rows)?,
            labels: dev.alloc_u32(rows)?,
            values: dev.alloc(rows)?,
            loss: dev.alloc(rows)?,
            correct: dev.alloc(rows)?,
            ones,
        })
    }
}

/// A layer stack and its parameters on a device, with the gradient's buffer.
struct Network<'a, D: PassDevice> {
    layout: &'a [LayerAt],
    act: i32,
    params: &'a mut D::F32,
    grads: &'a mut D::F32,
}

/// One batch on the host.
struct HostBatch<'a> {
    params: &'a [f32],
    x: &'a [f32],
    rows: usize,
    target: Batch<'a>,
    scale: f32,
}

/// The forward and backward pass of [`Model::gradient`] on `dev`, on checked
/// inputs (`rows` > 0, `b` allocated for `rows`).
fn run_pass<D: PassDevice>(
    dev: &mut D,
    net: Network<'_, D>,
    b: &mut Buffers<D>,
    batch: HostBatch<'_>,
) -> Result<StepOutput, ModelError> {
    let Network {
        layout,
        act,
        params,
        grads,
    } = net;
    let rows = batch.rows;
    dev.upload(batch.params, params)?;
    dev.upload(batch.x, &mut b.x)?;
    let layers = layout.len();

    // Forward: Zₗ = Wₗ·Hₗ₋₁ (H₀ = Xᵀ), then the bias and, but for the last layer,
    // the activation.
    for (l, layer) in layout.iter().enumerate() {
        let (layer_inputs, outputs) = (layer.inputs, layer.outputs);
        let (w_at, b_at) = (layer.weight.start, layer.bias.start);
        let shape = RowMajor {
            a_t: false,
            b_t: l == 0,
            m: outputs,
            n: rows,
            k: layer_inputs,
        };
        let input = if l == 0 { &b.x } else { &b.h[l - 1] };
        dev.product(shape, (&*params, w_at), (input, 0), (&mut b.z[l], 0))?;
        if l + 1 < layers {
            dev.bias_act(
                &mut b.z[l],
                (&*params, b_at),
                &mut b.h[l],
                outputs,
                rows,
                act,
            )?;
        } else {
            dev.add_bias(&mut b.z[l], (&*params, b_at), outputs, rows)?;
        }
    }

    // The loss and the gradient of the last layer's output.
    let last = &b.z[layers - 1];
    let classification = match batch.target {
        Batch::Classes(y) => {
            dev.upload_u32(y, &mut b.labels)?;
            let classes = layout[layers - 1].outputs;
            dev.softmax_xent(
                last,
                &mut b.d,
                &b.labels,
                &mut b.loss,
                &mut b.correct,
                classes,
                rows,
                batch.scale,
            )?;
            true
        }
        Batch::Values(y) => {
            dev.upload(y, &mut b.values)?;
            dev.squared_error(last, &mut b.d, &b.values, &mut b.loss, rows, batch.scale)?;
            false
        }
    };

    // Backward, last layer first; `b.d` holds this layer's dZ.
    for l in (0..layers).rev() {
        let (layer_inputs, outputs) = (layout[l].inputs, layout[l].outputs);
        let (w_at, b_at) = (layout[l].weight.start, layout[l].bias.start);
        // dWₗ = dZₗ·Hₗ₋₁ᵀ, where H₀ᵀ = X as stored.
        let weight_grad = RowMajor {
            a_t: false,
            b_t: l != 0,
            m: outputs,
            n: layer_inputs,
            k: rows,
        };
        let input = if l == 0 { &b.x } else { &b.h[l - 1] };
        dev.product(weight_grad, (&b.d, 0), (input, 0), (&mut *grads, w_at))?;
        // dbₗ = dZₗ·1.
        let bias_grad = RowMajor {
            a_t: false,
            b_t: false,
            m: outputs,
            n: 1,
            k: rows,
        };
        dev.product(bias_grad, (&b.d, 0), (&b.ones, 0), (&mut *grads, b_at))?;
        if l == 0 {
            break;
        }
        // dZₗ₋₁ = (Wₗᵀ·dZₗ) ⊙ act′(Zₗ₋₁).
        let input_grad = RowMajor {
            a_t: true,
            b_t: false,
            m: layer_inputs,
            n: rows,
            k: outputs,
        };
        dev.product(input_grad, (&*params, w_at), (&b.d, 0), (&mut b.d_next, 0))?;
        dev.act_backward(&mut b.d_next, &b.z[l - 1], layer_inputs * rows, act)?;
        std::mem::swap(&mut b.d, &mut b.d_next);
    }

    let mut out = vec![0f32; batch.params.len()];
    dev.download(grads, &mut out)?;
    let mut loss = vec![0f32; rows];
    dev.download(&b.loss, &mut loss)?;
    let mut correct = vec![0f32; rows];
    if classification {
        dev.download(&b.correct, &mut correct)?;
    }
    dev.finish()?;
    Ok(StepOutput {
        grads: out,
        loss_sum: loss.iter().map(|&l| f64::from(l)).sum(),
        correct: correct.iter().filter(|&&c| c > 0.5).count(),
    })
}

/// One thread per value, in blocks of 256.
fn launch_config(n: usize) -> Result<LaunchConfig, ModelError> {
    let n = u32::try_from(n)
        .ok()
        .filter(|&n| n < u32::MAX - 256)
        .ok_or_else(|| ModelError::Gpu(format!("{n} values are too many for one launch")))?;
    Ok(LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Checks that each buffer `kernel` touches holds what it needs: `(name, holds,
/// needs)`. The launches' safety rests on it, on the GPU and on the host twin.
fn holds(kernel: &str, buffers: &[(&str, usize, usize)]) -> Result<(), ModelError> {
    match buffers.iter().find(|(_, holds, needs)| holds < needs) {
        None => Ok(()),
        Some((name, holds, needs)) => Err(ModelError::Gpu(format!(
            "{kernel}: {name} holds {holds} values; it needs {needs}"
        ))),
    }
}

/// A size as the kernels' `int`.
fn int(v: usize) -> Result<i32, ModelError> {
    i32::try_from(v).map_err(|_| ModelError::Gpu(format!("{v} is too large for a kernel's int")))
}

/// The compiled kernels, in [`KERNEL_NAMES`]' order.
struct Kernels {
    add_bias: CudaFunction,
    bias_act: CudaFunction,
    act_backward: CudaFunction,
    softmax_xent: CudaFunction,
    squared_error: CudaFunction,
}

/// The GPU: one stream runs the products (cuBLAS) and the kernels in order.
struct Cuda {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
}

fn driver_error(op: &str) -> impl Fn(cudarc::driver::DriverError) -> ModelError + '_ {
    move |e| ModelError::Gpu(format!("{op}: {e}"))
}

/// `len` values of `buf` from `at`, or an error naming what did not fit.
fn view(buf: &CudaSlice<f32>, at: usize, len: usize) -> Result<CudaView<'_, f32>, ModelError> {
    buf.try_slice(at..at + len).ok_or_else(|| {
        ModelError::Gpu(format!(
            "{len} values from {at} do not fit a buffer of {}",
            buf.len()
        ))
    })
}

#[allow(unsafe_code)]
impl PassDevice for Cuda {
    type F32 = CudaSlice<f32>;
    type U32 = CudaSlice<u32>;

    fn alloc(&mut self, n: usize) -> Result<CudaSlice<f32>, ModelError> {
        self.stream
            .alloc_zeros(n)
            .map_err(driver_error("allocate on the GPU"))
    }

    fn alloc_u32(&mut self, n: usize) -> Result<CudaSlice<u32>, ModelError> {
        self.stream
            .alloc_zeros(n)
            .map_err(driver_error("allocate on the GPU"))
    }

    fn upload(&mut self, src: &[f32], dst: &mut CudaSlice<f32>) -> Result<(), ModelError> {
        self.stream
            .memcpy_htod(src, dst)
            .map_err(driver_error("upload to the GPU"))
    }

    fn upload_u32(&mut self, src: &[u32], dst: &mut CudaSlice<u32>) -> Result<(), ModelError> {
        self.stream
            .memcpy_htod(src, dst)
            .map_err(driver_error("upload to the GPU"))
    }

    fn download(&mut self, src: &CudaSlice<f32>, dst: &mut [f32]) -> Result<(), ModelError> {
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(driver_error("download from the GPU"))
    }

    fn finish(&mut self) -> Result<(), ModelError> {
        self.stream
            .synchronize()
            .map_err(driver_error("wait for the training pass"))
    }

    fn product(
        &mut self,
        shape: RowMajor,
        (a, a_at): (&CudaSlice<f32>, usize),
        (b, b_at): (&CudaSlice<f32>, usize),
        (c, c_at): (&mut CudaSlice<f32>, usize),
    ) -> Result<(), ModelError> {
        let (a_len, b_len, c_len) = shape.lengths();
        let a = view(a, a_at, a_len)?;
        let b = view(b, b_at, b_len)?;
        let c_total = c.len();
        let mut c = c.try_slice_mut(c_at..c_at + c_len).ok_or_else(|| {
            ModelError::Gpu(format!(
                "{c_len} values from {c_at} do not fit a buffer of {c_total}"
            ))
        })?;
        let cm = shape.column_major();
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let config = GemmConfig {
            transa: op(cm.trans_a),
            transb: op(cm.trans_b),
            m: int(cm.m)?,
            n: int(cm.n)?,
            k: int(cm.k)?,
            alpha: 1.0f32,
            lda: int(cm.lda)?,
            ldb: int(cm.ldb)?,
            beta: 0.0f32,
            ldc: int(cm.ldc)?,
        };
        // SAFETY: each operand is a view of exactly the elements the shape reads
        // or writes, every leading dimension is the stored width, and all of them
        // live on the stream's device. cuBLAS gets B as its A′ and A as its B′.
        unsafe { self.blas.gemm(config, &b, &a, &mut c) }
            .map_err(|e| ModelError::Gpu(format!("cuBLAS sgemm {shape:?}: {e:?}")))
    }

    fn add_bias(
        &mut self,
        z: &mut CudaSlice<f32>,
        (bias, at): (&CudaSlice<f32>, usize),
        outputs: usize,
        rows: usize,
    ) -> Result<(), ModelError> {
        let bias = view(bias, at, outputs)?;
        let (outputs_i, rows_i) = (int(outputs)?, int(rows)?);
        let cfg = launch_config(outputs * rows)?;
        holds("add_bias", &[("z", z.len(), outputs * rows)])?;
        // SAFETY: z holds outputs × rows values and bias outputs; the kernel
        // touches no index beyond them.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.add_bias)
                .arg(z)
                .arg(&bias)
                .arg(&outputs_i)
                .arg(&rows_i)
                .launch(cfg)
        }
        .map_err(driver_error("launch add_bias"))?;
        Ok(())
    }

    fn bias_act(
        &mut self,
        z: &mut CudaSlice<f32>,
        (bias, at): (&CudaSlice<f32>, usize),
        h: &mut CudaSlice<f32>,
        outputs: usize,
        rows: usize,
        act: i32,
    ) -> Result<(), ModelError> {
        let bias = view(bias, at, outputs)?;
        let (outputs_i, rows_i) = (int(outputs)?, int(rows)?);
        let cfg = launch_config(outputs * rows)?;
        let n = outputs * rows;
        holds("bias_act", &[("z", z.len(), n), ("h", h.len(), n)])?;
        // SAFETY: z and h hold outputs × rows values, bias outputs.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.bias_act)
                .arg(z)
                .arg(&bias)
                .arg(h)
                .arg(&outputs_i)
                .arg(&rows_i)
                .arg(&act)
                .launch(cfg)
        }
        .map_err(driver_error("launch bias_act"))?;
        Ok(())
    }

    fn act_backward(
        &mut self,
        d: &mut CudaSlice<f32>,
        z: &CudaSlice<f32>,
        n: usize,
        act: i32,
    ) -> Result<(), ModelError> {
        holds("act_backward", &[("d", d.len(), n), ("z", z.len(), n)])?;
        let n_i = n as i64;
        let cfg = launch_config(n)?;
        // SAFETY: d and z hold at least n values.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.act_backward)
                .arg(d)
                .arg(z)
                .arg(&n_i)
                .arg(&act)
                .launch(cfg)
        }
        .map_err(driver_error("launch act_backward"))?;
        Ok(())
    }

    fn softmax_xent(
        &mut self,
        z: &CudaSlice<f32>,
        d: &mut CudaSlice<f32>,
        labels: &CudaSlice<u32>,
        loss: &mut CudaSlice<f32>,
        correct: &mut CudaSlice<f32>,
        classes: usize,
        rows: usize,
        scale: f32,
    ) -> Result<(), ModelError> {
        let n = classes * rows;
        holds(
            "softmax_xent",
            &[
                ("z", z.len(), n),
                ("d", d.len(), n),
                ("labels", labels.len(), rows),
                ("loss", loss.len(), rows),
                ("correct", correct.len(), rows),
            ],
        )?;
        let (classes_i, rows_i) = (int(classes)?, int(rows)?);
        let cfg = launch_config(rows)?;
        // SAFETY: z and d hold classes × rows values; labels, loss and correct
        // rows; every label is below classes (checked by `Model::check_step`).
        unsafe {
            self.stream
                .launch_builder(&self.kernels.softmax_xent)
                .arg(z)
                .arg(d)
                .arg(labels)
                .arg(loss)
                .arg(correct)
                .arg(&classes_i)
                .arg(&rows_i)
                .arg(&scale)
                .launch(cfg)
        }
        .map_err(driver_error("launch softmax_xent"))?;
        Ok(())
    }

    fn squared_error(
        &mut self,
        z: &CudaSlice<f32>,
        d: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        loss: &mut CudaSlice<f32>,
        rows: usize,
        scale: f32,
    ) -> Result<(), ModelError> {
        holds(
            "squared_error",
            &[
                ("z", z.len(), rows),
                ("d", d.len(), rows),
                ("y", y.len(), rows),
                ("loss", loss.len(), rows),
            ],
        )?;
        let rows_i = int(rows)?;
        let cfg = launch_config(rows)?;
        // SAFETY: z, d, y and loss hold at least rows values each.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.squared_error)
                .arg(z)
                .arg(d)
                .arg(y)
                .arg(loss)
                .arg(&rows_i)
                .arg(&scale)
                .launch(cfg)
        }
        .map_err(driver_error("launch squared_error"))?;
        Ok(())
    }
}

/// The forward and backward pass of one architecture on one GPU.
pub struct GpuPass {
    device: usize,
    name: String,
    arch: Arch,
    /// Each layer's place in the flat parameters, cached from the arch.
    layout: Vec<LayerAt>,
    cuda: Cuda,
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    buffers: Option<Buffers<Cuda>>,
}

impl Drop for GpuPass {
    /// Binds the context and waits for the stream before the fields go (the cuBLAS
    /// handle, then the buffers): the pass may be dropped on a thread that never
    /// ran it, and cudarc's drops do not bind the context themselves.
    fn drop(&mut self) {
        let _ = cuda::guarded("release the GPU pass", || {
            if self.bind().is_ok() {
                let _ = self.cuda.finish();
            }
        });
    }
}

impl std::fmt::Debug for GpuPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPass")
            .field("device", &self.device)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl GpuPass {
    /// Opens CUDA device `device` for `arch`: checks that libcuda, libcublas and
    /// libnvrtc load, compiles the kernels and allocates the parameters and
    /// gradient. A missing library or device is an error naming it.
    pub fn new(device: usize, arch: &Arch) -> Result<GpuPass, ModelError> {
        cuda::check_driver().map_err(ModelError::Gpu)?;
        cuda::check_library(CUBLAS).map_err(ModelError::Gpu)?;
        let ptx = compile_kernels().map_err(ModelError::Gpu)?;
        let open = format!("open CUDA device {device}");
        cuda::guarded(&open, || Self::open(device, arch, ptx)).map_err(ModelError::Gpu)?
    }

    #[allow(unsafe_code)]
    fn open(device: usize, arch: &Arch, ptx: Ptx) -> Result<GpuPass, ModelError> {
        let count = CudaContext::device_count().map_err(driver_error("count CUDA devices"))?;
        if device >= usize::try_from(count).unwrap_or(0) {
            return Err(ModelError::Gpu(format!(
                "CUDA device {device} does not exist; this machine has {count}"
            )));
        }
        let ctx = CudaContext::new(device).map_err(driver_error("open the CUDA context"))?;
        let name = ctx.name().map_err(driver_error("name the device"))?;
        // One stream runs everything in order, so cudarc's per-buffer events are
        // not needed.
        // SAFETY: no other stream touches this context's buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| ModelError::Gpu(format!("create a cuBLAS handle: {e:?}")))?;
        let module = ctx.load_module(ptx).map_err(|e| {
            let hint = if format!("{e:?}").contains("UNSUPPORTED_PTX_VERSION") {
                ": this libnvrtc is newer than the driver; put an NVRTC of the \
                 driver's CUDA version (or older) first on LD_LIBRARY_PATH"
            } else {
                ""
            };
            ModelError::Gpu(format!("load the training kernels: {e}{hint}"))
        })?;
        let function = |name: &str| {
            module
                .load_function(name)
                .map_err(driver_error("find a training kernel"))
        };
        let kernels = Kernels {
            add_bias: function(KERNEL_NAMES[0])?,
            bias_act: function(KERNEL_NAMES[1])?,
            act_backward: function(KERNEL_NAMES[2])?,
            softmax_xent: function(KERNEL_NAMES[3])?,
            squared_error: function(KERNEL_NAMES[4])?,
        };
        let mut cuda = Cuda {
            stream,
            blas,
            kernels,
        };
        let n = arch.parameter_count();
        Ok(GpuPass {
            device,
            name,
            arch: arch.clone(),
            layout: arch.layout(),
            params: cuda.alloc(n)?,
            grads: cuda.alloc(n)?,
            cuda,
            buffers: None,
        })
    }

    /// Makes the pass's context current on this thread (cudarc frees buffers
    /// without doing so).
    fn bind(&self) -> Result<(), ModelError> {
        self.cuda
            .stream
            .context()
            .bind_to_thread()
            .map_err(driver_error("make the CUDA context current"))
    }

    /// Returns the device as logs name it: "CUDA device 0 (NVIDIA H100 80GB HBM3)".
    pub fn describe(&self) -> String {
        format!("CUDA device {} ({})", self.device, self.name)
    }

    /// [`Model::gradient`] on the GPU: the same checks, the same result up to float
    /// reduction order.
    pub fn gradient(
        &mut self,
        model: &Model,
        x: &[f32],
        rows: usize,
        target: Batch<'_>,
        scale: f32,
    ) -> Result<StepOutput, ModelError> {
        if model.arch() != &self.arch {
            return Err(ModelError::Gpu(
                "the model's architecture is not the one this GPU pass was made for".into(),
            ));
        }
        if let Some(empty) = model.check_step(x, rows, target)? {
            return Ok(empty);
        }
        let op = format!("a training pass on CUDA device {}", self.device);
        cuda::guarded(&op, || {
            // Each step may run on another thread (a blocking-pool thread in a
            // shard): make the context current before any allocation or free.
            self.bind()?;
            if self.buffers.as_ref().is_none_or(|b| b.rows != rows) {
                self.buffers = None;
                let buffers = Buffers::new(&mut self.cuda, &self.layout, rows)?;
                self.buffers = Some(buffers);
            }
            let net = Network {
                layout: &self.layout,
                act: activation_code(self.arch.activation),
                params: &mut self.params,
                grads: &mut self.grads,
            };
            let batch = HostBatch {
                params: model.params(),
                x,
                rows,
                target,
                scale,
            };
            let buffers = self.buffers.as_mut().expect("allocated above");
            run_pass(&mut self.cuda, net, buffers, batch)
        })
        .map_err(ModelError::Gpu)?
    }
}

#[cfg(test)]
mod tests {
    use kiln_common::jobspec::Activation;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::train::arch::Task;

    /// cuBLAS's column-major `sgemm` (alpha 1, beta 0), written out.
    fn column_major_reference(cm: ColumnMajor, a: &[f32], b: &[f32], c: &mut [f32]) {
        for j in 0..cm.n {
            for i in 0..cm.m {
                let mut sum = 0f32;
                for p in 0..cm.k {
                    let av = if cm.trans_a {
                        a[p + i * cm.lda]
                    } else {
                        a[i + p * cm.lda]
                    };
                    let bv = if cm.trans_b {
                        b[j + p * cm.ldb]
                    } else {
                        b[p + j * cm.ldb]
                    };
                    sum += av * bv;
                }
                c[i + j * cm.ldc] = sum;
            }
        }
    }

    #[test]
    fn row_major_products_map_onto_cublas_column_major_arguments() {
        let mut rng = StdRng::seed_from_u64(5);
        for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
            for (m, n, k) in [(3, 5, 4), (1, 7, 2), (6, 1, 9), (4, 4, 1)] {
                let shape = RowMajor { a_t, b_t, m, n, k };
                let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                // op(A)[i][p] and op(B)[p][j] from their row-major storage.
                let op_a = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
                let op_b = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
                let mut want = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        want[i * n + j] = (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum();
                    }
                }
                let mut got = vec![f32::NAN; m * n];
                // cuBLAS gets B's storage as A′ and A's as B′.
                column_major_reference(shape.column_major(), &b, &a, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "{shape:?}: {got:?} != {want:?}");
                }
            }
        }
    }

    /// [`KERNELS`] for the host: the C++ compiler builds them with a shim that
    /// runs a launch's blocks and threads one after another.
    const HOST_SHIM: &str = r#"
#include <math.h>
struct KilnDim { unsigned x, y, z; };
static KilnDim blockIdx, blockDim, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
KERNELS
#define KILN_RUN(call) \
    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x) \
        for (threadIdx.x = 0; threadIdx.x < block; ++threadIdx.x) { blockDim.x = block; call; }
extern "C" void run_add_bias(unsigned grid, unsigned block, float* z, const float* b,
                             int outputs, int rows) {
    KILN_RUN(add_bias(z, b, outputs, rows));
}
extern "C" void run_bias_act(unsigned grid, unsigned block, float* z, const float* b,
                             float* h, int outputs, int rows, int act) {
    KILN_RUN(bias_act(z, b, h, outputs, rows, act));
}
extern "C" void run_act_backward(unsigned grid, unsigned block, float* d, const float* z,
                                 long long n, int act) {
    KILN_RUN(act_backward(d, z, n, act));
}
extern "C" void run_softmax_xent(unsigned grid, unsigned block, const float* z, float* d,
                                 const unsigned int* labels, float* loss, float* correct,
                                 int classes, int rows, float scale) {
    KILN_RUN(softmax_xent(z, d, labels, loss, correct, classes, rows, scale));
}
extern "C" void run_squared_error(unsigned grid, unsigned block, const float* z, float* d,
                                  const float* y, float* loss, int rows, float scale) {
    KILN_RUN(squared_error(z, d, y, loss, rows, scale));
}
"#;

    /// The pass's host twin: products through the column-major reference, called
    /// as cuBLAS is, and [`KERNELS`] built by the C++ compiler, launched with
    /// [`launch_config`]'s grid as on the GPU.
    struct Host {
        lib: libloading::Library,
        _dir: tempfile::TempDir,
    }

    impl Host {
        /// Builds the kernels; `None` where there is no C++ compiler.
        fn new() -> Option<Host> {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let source = dir.path().join("kernels.cc");
            let library = dir.path().join("libkernels.so");
            std::fs::write(&source, HOST_SHIM.replace("KERNELS", KERNELS)).expect("write");
            let built = std::process::Command::new("c++")
                .args(["-O1", "-shared", "-fPIC", "-o"])
                .arg(&library)
                .arg(&source)
                .output()
                .ok()?;
            assert!(
                built.status.success(),
                "the kernels do not build as C++: {}",
                String::from_utf8_lossy(&built.stderr)
            );
            // SAFETY: the library was just built from the shim; loading runs no
            // initialiser of consequence.
            #[allow(unsafe_code)]
            let lib = unsafe { libloading::Library::new(&library) }.expect("load the kernels");
            Some(Host { lib, _dir: dir })
        }

        /// Returns the launch's grid and block sizes for `n` threads.
        fn grid(n: usize) -> (u32, u32) {
            let cfg = launch_config(n).expect("a launch");
            (cfg.grid_dim.0, cfg.block_dim.0)
        }

        #[allow(unsafe_code)]
        fn symbol<T>(&self, name: &str) -> libloading::Symbol<'_, T> {
            // SAFETY: each call site names the shim's function with its signature.
            unsafe { self.lib.get(name.as_bytes()) }.expect("a shim function")
        }
    }

    type AddBias = unsafe extern "C" fn(u32, u32, *mut f32, *const f32, i32, i32);
    type BiasAct = unsafe extern "C" fn(u32, u32, *mut f32, *const f32, *mut f32, i32, i32, i32);
    type ActBackward = unsafe extern "C" fn(u32, u32, *mut f32, *const f32, i64, i32);
    type SoftmaxXent = unsafe extern "C" fn(
        u32,
        u32,
        *const f32,
        *mut f32,
        *const u32,
        *mut f32,
        *mut f32,
        i32,
        i32,
        f32,
    );
    type SquaredError =
        unsafe extern "C" fn(u32, u32, *const f32, *mut f32, *const f32, *mut f32, i32, f32);

    // SAFETY (every kernel call below): the buffers are checked to hold what the
    // kernel touches, as the GPU device's calls check them.
    #[allow(unsafe_code)]
    impl PassDevice for Host {
        type F32 = Vec<f32>;
        type U32 = Vec<u32>;

        fn alloc(&mut self, n: usize) -> Result<Vec<f32>, ModelError> {
            Ok(vec![f32::NAN; n])
        }
        fn alloc_u32(&mut self, n: usize) -> Result<Vec<u32>, ModelError> {
            Ok(vec![u32::MAX; n])
        }
        fn upload(&mut self, src: &[f32], dst: &mut Vec<f32>) -> Result<(), ModelError> {
            dst[..src.len()].copy_from_slice(src);
            Ok(())
        }
        fn upload_u32(&mut self, src: &[u32], dst: &mut Vec<u32>) -> Result<(), ModelError> {
            dst[..src.len()].copy_from_slice(src);
            Ok(())
        }
        fn download(&mut self, src: &Vec<f32>, dst: &mut [f32]) -> Result<(), ModelError> {
            dst.copy_from_slice(&src[..dst.len()]);
            Ok(())
        }
        fn finish(&mut self) -> Result<(), ModelError> {
            Ok(())
        }
        fn product(
            &mut self,
            shape: RowMajor,
            (a, a_at): (&Vec<f32>, usize),
            (b, b_at): (&Vec<f32>, usize),
            (c, c_at): (&mut Vec<f32>, usize),
        ) -> Result<(), ModelError> {
            let (a_len, b_len, c_len) = shape.lengths();
            column_major_reference(
                shape.column_major(),
                &b[b_at..b_at + b_len],
                &a[a_at..a_at + a_len],
                &mut c[c_at..c_at + c_len],
            );
            Ok(())
        }
        fn add_bias(
            &mut self,
            z: &mut Vec<f32>,
            (bias, at): (&Vec<f32>, usize),
            outputs: usize,
            rows: usize,
        ) -> Result<(), ModelError> {
            holds(
                "add_bias",
                &[
                    ("z", z.len(), outputs * rows),
                    ("bias", bias.len().saturating_sub(at), outputs),
                ],
            )?;
            let (grid, block) = Host::grid(outputs * rows);
            let f = self.symbol::<AddBias>("run_add_bias");
            unsafe {
                f(
                    grid,
                    block,
                    z.as_mut_ptr(),
                    bias[at..].as_ptr(),
                    int(outputs)?,
                    int(rows)?,
                )
            };
            Ok(())
        }
        fn bias_act(
            &mut self,
            z: &mut Vec<f32>,
            (bias, at): (&Vec<f32>, usize),
            h: &mut Vec<f32>,
            outputs: usize,
            rows: usize,
            act: i32,
        ) -> Result<(), ModelError> {
            let n = outputs * rows;
            holds(
                "bias_act",
                &[
                    ("z", z.len(), n),
                    ("h", h.len(), n),
                    ("bias", bias.len().saturating_sub(at), outputs),
                ],
            )?;
            let (grid, block) = Host::grid(outputs * rows);
            let f = self.symbol::<BiasAct>("run_bias_act");
            unsafe {
                f(
                    grid,
                    block,
                    z.as_mut_ptr(),
                    bias[at..].as_ptr(),
                    h.as_mut_ptr(),
                    int(outputs)?,
                    int(rows)?,
                    act,
                )
            };
            Ok(())
        }
        fn act_backward(
            &mut self,
            d: &mut Vec<f32>,
            z: &Vec<f32>,
            n: usize,
            act: i32,
        ) -> Result<(), ModelError> {
            holds("act_backward", &[("d", d.len(), n), ("z", z.len(), n)])?;
            let (grid, block) = Host::grid(n);
            let f = self.symbol::<ActBackward>("run_act_backward");
            unsafe { f(grid, block, d.as_mut_ptr(), z.as_ptr(), n as i64, act) };
            Ok(())
        }
        fn softmax_xent(
            &mut self,
            z: &Vec<f32>,
            d: &mut Vec<f32>,
            labels: &Vec<u32>,
            loss: &mut Vec<f32>,
            correct: &mut Vec<f32>,
            classes: usize,
            rows: usize,
            scale: f32,
        ) -> Result<(), ModelError> {
            let n = classes * rows;
            holds(
                "softmax_xent",
                &[
                    ("z", z.len(), n),
                    ("d", d.len(), n),
                    ("labels", labels.len(), rows),
                    ("loss", loss.len(), rows),
                    ("correct", correct.len(), rows),
                ],
            )?;
            let (grid, block) = Host::grid(rows);
            let f = self.symbol::<SoftmaxXent>("run_softmax_xent");
            unsafe {
                f(
                    grid,
                    block,
                    z.as_ptr(),
                    d.as_mut_ptr(),
                    labels.as_ptr(),
                    loss.as_mut_ptr(),
                    correct.as_mut_ptr(),
                    int(classes)?,
                    int(rows)?,
                    scale,
                )
            };
            Ok(())
        }
        fn squared_error(
            &mut self,
            z: &Vec<f32>,
            d: &mut Vec<f32>,
            y: &Vec<f32>,
            loss: &mut Vec<f32>,
            rows: usize,
            scale: f32,
        ) -> Result<(), ModelError> {
            holds(
                "squared_error",
                &[
                    ("z", z.len(), rows),
                    ("d", d.len(), rows),
                    ("y", y.len(), rows),
                    ("loss", loss.len(), rows),
                ],
            )?;
            let (grid, block) = Host::grid(rows);
            let f = self.symbol::<SquaredError>("run_squared_error");
            unsafe {
                f(
                    grid,
                    block,
                    z.as_ptr(),
                    d.as_mut_ptr(),
                    y.as_ptr(),
                    loss.as_mut_ptr(),
                    int(rows)?,
                    scale,
                )
            };
            Ok(())
        }
    }

    /// Every task and activation, on batches of uneven size (reusing buffers,
    /// then changing their size), against candle's pass on the same model.
    fn check_against_candle(
        mut pass: impl FnMut(&Model, &[f32], usize, Batch<'_>, f32) -> StepOutput,
    ) {
        let mut rng = StdRng::seed_from_u64(11);
        for activation in [Activation::Relu, Activation::Gelu, Activation::Tanh] {
            for task in [
                Task::Classification {
                    classes: (0..5).map(|c| c.to_string()).collect(),
                },
                Task::Regression,
            ] {
                let arch = Arch {
                    inputs: 7,
                    hidden: vec![33, 17],
                    activation,
                    task: task.clone(),
                };
                let model = Model::init(arch.clone(), 3);
                for rows in [1usize, 64, 64, 257] {
                    let x: Vec<f32> = (0..rows * 7).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let classes: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..5)).collect();
                    let values: Vec<f32> = (0..rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let target = match task {
                        Task::Classification { .. } => Batch::Classes(&classes),
                        Task::Regression => Batch::Values(&values),
                    };
                    let scale = 1.0 / rows as f32;
                    let cpu = model.gradient(&x, rows, target, scale).expect("cpu");
                    let other = pass(&model, &x, rows, target, scale);
                    let what = format!("{activation:?} {task:?} rows {rows}");
                    assert_eq!(cpu.grads.len(), other.grads.len(), "{what}");
                    let worst = cpu
                        .grads
                        .iter()
                        .zip(&other.grads)
                        .map(|(c, g)| (c - g).abs() / c.abs().max(1e-2))
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-3, "{what}: gradients differ by {worst}");
                    let loss_gap = (cpu.loss_sum - other.loss_sum).abs() / cpu.loss_sum.max(1e-3);
                    assert!(
                        loss_gap < 1e-4,
                        "{what}: loss {} vs {}",
                        cpu.loss_sum,
                        other.loss_sum
                    );
                    assert!(
                        cpu.correct.abs_diff(other.correct) <= 1,
                        "{what}: correct {} vs {}",
                        cpu.correct,
                        other.correct
                    );
                }
            }
        }
    }

    #[test]
    fn the_pass_on_its_host_twin_matches_candle() {
        let Some(mut host) = Host::new() else {
            eprintln!("skipped: no C++ compiler here");
            return;
        };
        let mut buffers: Option<Buffers<Host>> = None;
        check_against_candle(|model, x, rows, target, scale| {
            let arch = model.arch();
            let layout = arch.layout();
            if buffers.as_ref().is_none_or(|b| b.rows != rows) {
                buffers = Some(Buffers::new(&mut host, &layout, rows).expect("alloc"));
            }
            let n = arch.parameter_count();
            let (mut params, mut grads) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let net = Network {
                layout: &layout,
                act: activation_code(arch.activation),
                params: &mut params,
                grads: &mut grads,
            };
            let batch = HostBatch {
                params: model.params(),
                x,
                rows,
                target,
                scale,
            };
            let b = buffers.as_mut().expect("allocated");
            run_pass(&mut host, net, b, batch).expect("the host twin's pass")
        });
    }

    #[test]
    fn a_buffer_too_small_for_a_kernel_is_an_error_naming_it() {
        assert!(holds("bias_act", &[("z", 12, 12), ("h", 13, 12)]).is_ok());
        let err = holds("bias_act", &[("z", 12, 12), ("h", 11, 12)]).expect_err("h is short");
        assert_eq!(
            err.to_string(),
            "GPU: bias_act: h holds 11 values; it needs 12"
        );
    }

    #[test]
    fn the_kernels_compile_with_nvrtc() {
        if !NVRTC.loads() {
            // scripts/test.sh installs one and says so; then this must not skip.
            let expected =
                std::env::var_os("KILN_TEST_EXPECT_NVRTC").is_some_and(|v| !v.is_empty());
            assert!(
                !expected,
                "KILN_TEST_EXPECT_NVRTC is set, but no libnvrtc loads (searched {}; LD_LIBRARY_PATH={:?})",
                cuda::searched_names("nvrtc"),
                std::env::var("LD_LIBRARY_PATH")
            );
            eprintln!(
                "skipped: no libnvrtc here ({})",
                cuda::searched_names("nvrtc")
            );
            return;
        }
        let ptx = compile_kernels().expect("the kernels compile");
        let text = ptx.to_src();
        for name in KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}")),
                "no entry {name} in the PTX"
            );
        }
    }

    fn gpu_here() -> bool {
        cuda::check_driver().is_ok()
            && CUBLAS.loads()
            && NVRTC.loads()
            && cuda::guarded("count", CudaContext::device_count)
                .is_ok_and(|count| count.is_ok_and(|n| n > 0))
    }

    #[test]
    fn without_a_gpu_the_pass_is_a_clear_error_not_a_panic() {
        if gpu_here() {
            eprintln!("skipped: this machine has a GPU and its libraries");
            return;
        }
        let arch = Arch {
            inputs: 3,
            hidden: vec![4],
            activation: Activation::Relu,
            task: Task::Regression,
        };
        let err = GpuPass::new(0, &arch).expect_err("no GPU here").to_string();
        assert!(
            err.contains("no CUDA driver")
                || err.contains("not found")
                || err.contains("does not exist"),
            "{err}"
        );
    }

    /// The GPU's gradient, loss and correct count against the CPU's, as the host
    /// twin's above, and a bad batch refused.
    #[test]
    fn the_gpu_pass_matches_the_cpu_pass() {
        if !gpu_here() {
            eprintln!("skipped: no CUDA driver, libcublas, libnvrtc or GPU here");
            return;
        }
        let mut passes: Vec<(Arch, GpuPass)> = Vec::new();
        check_against_candle(|model, x, rows, target, scale| {
            let at = match passes.iter().position(|(arch, _)| arch == model.arch()) {
                Some(at) => at,
                None => {
                    let pass = GpuPass::new(0, model.arch()).expect("a GPU pass");
                    passes.push((model.arch().clone(), pass));
                    passes.len() - 1
                }
            };
            passes[at]
                .1
                .gradient(model, x, rows, target, scale)
                .expect("the GPU's pass")
        });
        let (arch, mut pass) = passes.pop().expect("a pass");
        let model = Model::init(arch, 1);
        let err = pass
            .gradient(&model, &[0.0; 6], 1, Batch::Values(&[0.0]), 1.0)
            .expect_err("6 values are not one row of 7");
        assert!(err.to_string().contains("features"), "{err}");

        // A shard's steps run on whichever thread its blocking pool gives, and a
        // new batch size frees the old buffers there; the pass is dropped on yet
        // another thread.
        let pass = std::thread::spawn(move || {
            let x = vec![0.5f32; 3 * 7];
            let out = pass.gradient(&model, &x, 3, Batch::Values(&[0.0; 3]), 1.0);
            out.expect("a pass on a thread that never ran one");
            pass
        })
        .join()
        .expect("the thread");
        std::thread::spawn(move || drop(pass))
            .join()
            .expect("dropped on another thread");
    }
}
