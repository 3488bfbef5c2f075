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
//! gradient. On the trainer's models (tens of thousands to a few million
//! parameters) those copies are small next to the pass.
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

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use kiln_common::jobspec::Activation;

use super::arch::Arch;
use super::model::{Batch, Model, ModelError, StepOutput};
use crate::cuda::{self, Library};

const CUBLAS: Library = Library {
    label: "libcublas",
    cudarc_name: "cublas",
    other_sonames: &["libcublas.so.13"],
    install: "install cuBLAS (the CUDA toolkit's lib64, or pip install nvidia-cublas-cu12, \
              which puts it under site-packages/nvidia/cublas/lib) and add its directory \
              to LD_LIBRARY_PATH",
};

const NVRTC: Library = Library {
    label: "libnvrtc",
    cudarc_name: "nvrtc",
    other_sonames: &["libnvrtc.so.13"],
    install: "install NVRTC (the CUDA toolkit's lib64, or pip install \
              nvidia-cuda-nvrtc-cu12, which puts it under \
              site-packages/nvidia/cuda_nvrtc/lib) and add its directory to \
              LD_LIBRARY_PATH",
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
    cuda::check_library(NVRTC, nvrtc_present())?;
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

#[allow(unsafe_code)]
fn nvrtc_present() -> bool {
    // SAFETY: loading libnvrtc runs its initialisers, as cudarc's first call
    // would; nothing is called through the handle, which is closed.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[allow(unsafe_code)]
fn cublas_present() -> bool {
    // SAFETY: as for `nvrtc_present`, with libcublas.
    unsafe { cudarc::cublas::sys::is_culib_present() }
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

/// Runs `C = op(A) · op(B)` (row-major, see [`RowMajor`]) on `blas`'s stream.
#[allow(unsafe_code)]
fn product<A, B, C>(
    blas: &CudaBlas,
    shape: RowMajor,
    a: &A,
    b: &B,
    c: &mut C,
) -> Result<(), ModelError>
where
    A: DevicePtr<f32>,
    B: DevicePtr<f32>,
    C: DevicePtrMut<f32>,
{
    let (want_a, want_b, want_c) = shape.lengths();
    if a.len() < want_a || b.len() < want_b || c.len() < want_c {
        return Err(ModelError::Gpu(format!(
            "a product of {shape:?} got operands of {}, {} and {} values",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    let cm = shape.column_major();
    let int = |v: usize| {
        i32::try_from(v)
            .map_err(|_| ModelError::Gpu(format!("a product of {shape:?} is too large for cuBLAS")))
    };
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
    // SAFETY: the operands hold at least the elements the shape reads and writes
    // (checked above), every leading dimension is the stored width, and all of
    // them live on the stream's device.
    unsafe { blas.gemm(config, b, a, c) }
        .map_err(|e| ModelError::Gpu(format!("cuBLAS sgemm {shape:?}: {e:?}")))
}

/// The compiled kernels, in [`KERNEL_NAMES`]' order.
struct Kernels {
    add_bias: CudaFunction,
    bias_act: CudaFunction,
    act_backward: CudaFunction,
    softmax_xent: CudaFunction,
    squared_error: CudaFunction,
}

/// Device buffers for batches of `rows` examples.
struct Buffers {
    rows: usize,
    x: CudaSlice<f32>,
    /// Each layer's pre-activation, `outputs × rows`.
    z: Vec<CudaSlice<f32>>,
    /// Each hidden layer's activation, `outputs × rows`.
    h: Vec<CudaSlice<f32>>,
    /// The gradient flowing back (`dZ`) and the next one, `widest × rows` each.
    d: CudaSlice<f32>,
    d_next: CudaSlice<f32>,
    labels: CudaSlice<u32>,
    values: CudaSlice<f32>,
    loss: CudaSlice<f32>,
    correct: CudaSlice<f32>,
    ones: CudaSlice<f32>,
}

/// The forward and backward pass of one architecture on one GPU.
pub struct GpuPass {
    device: usize,
    name: String,
    arch: Arch,
    shapes: Vec<(usize, usize)>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    buffers: Option<Buffers>,
}

impl std::fmt::Debug for GpuPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPass")
            .field("device", &self.device)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn driver_error(op: &str) -> impl Fn(cudarc::driver::DriverError) -> ModelError + '_ {
    move |e| ModelError::Gpu(format!("{op}: {e}"))
}

impl GpuPass {
    /// Opens CUDA device `device` for `arch`: checks that libcuda, libcublas and
    /// libnvrtc load, compiles the kernels and allocates the parameters and
    /// gradient. A missing library or device is an error naming it.
    pub fn new(device: usize, arch: &Arch) -> Result<GpuPass, ModelError> {
        cuda::check_driver().map_err(ModelError::Gpu)?;
        cuda::check_library(CUBLAS, cublas_present()).map_err(ModelError::Gpu)?;
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
        let module = ctx
            .load_module(ptx)
            .map_err(driver_error("load the training kernels"))?;
        let mut functions = KERNEL_NAMES.iter().map(|name| {
            module
                .load_function(name)
                .map_err(driver_error("find a training kernel"))
        });
        let mut next = || functions.next().expect("one function per kernel name");
        let kernels = Kernels {
            add_bias: next()?,
            bias_act: next()?,
            act_backward: next()?,
            softmax_xent: next()?,
            squared_error: next()?,
        };
        let n = arch.parameter_count();
        let params = stream
            .alloc_zeros::<f32>(n)
            .map_err(driver_error("allocate the parameters"))?;
        let grads = stream
            .alloc_zeros::<f32>(n)
            .map_err(driver_error("allocate the gradient"))?;
        Ok(GpuPass {
            device,
            name,
            arch: arch.clone(),
            shapes: arch.layer_shapes(),
            stream,
            blas,
            kernels,
            params,
            grads,
            buffers: None,
        })
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
        model.check_batch(x, rows, target)?;
        if rows == 0 {
            return Ok(StepOutput {
                grads: vec![0.0; model.params().len()],
                loss_sum: 0.0,
                correct: 0,
            });
        }
        let op = format!("a training pass on CUDA device {}", self.device);
        cuda::guarded(&op, || self.pass(model.params(), x, rows, target, scale))
            .map_err(ModelError::Gpu)?
    }

    /// Allocates the buffers for `rows` examples, unless they are.
    fn ensure_buffers(&mut self, rows: usize) -> Result<(), ModelError> {
        if self.buffers.as_ref().is_some_and(|b| b.rows == rows) {
            return Ok(());
        }
        self.buffers = None;
        let alloc = |n: usize| {
            self.stream
                .alloc_zeros::<f32>(n)
                .map_err(driver_error("allocate a batch buffer"))
        };
        let widest = self.shapes.iter().map(|&(_, o)| o).max().unwrap_or(1);
        let widest = widest.max(self.arch.inputs);
        let z = self
            .shapes
            .iter()
            .map(|&(_, o)| alloc(o * rows))
            .collect::<Result<Vec<_>, _>>()?;
        let h = self.shapes[..self.shapes.len() - 1]
            .iter()
            .map(|&(_, o)| alloc(o * rows))
            .collect::<Result<Vec<_>, _>>()?;
        let ones = self
            .stream
            .clone_htod(&vec![1.0f32; rows])
            .map_err(driver_error("upload a ones vector"))?;
        self.buffers = Some(Buffers {
            rows,
            x: alloc(rows * self.arch.inputs)?,
            z,
            h,
            d: alloc(widest * rows)?,
            d_next: alloc(widest * rows)?,
            labels: self
                .stream
                .alloc_zeros::<u32>(rows)
                .map_err(driver_error("allocate the labels"))?,
            values: alloc(rows)?,
            loss: alloc(rows)?,
            correct: alloc(rows)?,
            ones,
        });
        Ok(())
    }

    #[allow(unsafe_code)]
    fn pass(
        &mut self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        target: Batch<'_>,
        scale: f32,
    ) -> Result<StepOutput, ModelError> {
        let too_large = || ModelError::Gpu(format!("a batch of {rows} rows is too large"));
        let rows_i = i32::try_from(rows).map_err(|_| too_large())?;
        self.ensure_buffers(rows)?;
        let upload = driver_error("upload to the GPU");
        let download = driver_error("download from the GPU");
        let launch = driver_error("launch a training kernel");
        let act = activation_code(self.arch.activation);
        let layers = self.shapes.len();
        let GpuPass {
            stream,
            blas,
            kernels,
            params: params_dev,
            grads,
            buffers,
            shapes,
            ..
        } = self;
        let b = buffers.as_mut().expect("allocated above");
        stream.memcpy_htod(params, params_dev).map_err(&upload)?;
        stream.memcpy_htod(x, &mut b.x).map_err(&upload)?;

        // Where each layer's weight and bias start in the flat layout.
        let mut offsets = Vec::with_capacity(layers);
        let mut at = 0;
        for &(inputs, outputs) in shapes.iter() {
            offsets.push((at, at + inputs * outputs));
            at += inputs * outputs + outputs;
        }

        // Forward.
        for (l, &(inputs, outputs)) in shapes.iter().enumerate() {
            let (w_at, b_at) = offsets[l];
            let w = params_dev.slice(w_at..b_at);
            let bias = params_dev.slice(b_at..b_at + outputs);
            let z = &mut b.z[l];
            if l == 0 {
                let shape = RowMajor {
                    a_t: false,
                    b_t: true,
                    m: outputs,
                    n: rows,
                    k: inputs,
                };
                product(blas, shape, &w, &b.x, z)?;
            } else {
                let shape = RowMajor {
                    a_t: false,
                    b_t: false,
                    m: outputs,
                    n: rows,
                    k: inputs,
                };
                product(blas, shape, &w, &b.h[l - 1], z)?;
            }
            let outputs_i = i32::try_from(outputs).map_err(|_| too_large())?;
            let cfg = launch_config(outputs * rows)?;
            let z = &mut b.z[l];
            // SAFETY: z holds outputs × rows values, bias outputs, h (when there)
            // outputs × rows; the kernels touch no index beyond outputs × rows.
            if l + 1 < layers {
                let h = &mut b.h[l];
                unsafe {
                    stream
                        .launch_builder(&kernels.bias_act)
                        .arg(z)
                        .arg(&bias)
                        .arg(h)
                        .arg(&outputs_i)
                        .arg(&rows_i)
                        .arg(&act)
                        .launch(cfg)
                }
                .map_err(&launch)?;
            } else {
                unsafe {
                    stream
                        .launch_builder(&kernels.add_bias)
                        .arg(z)
                        .arg(&bias)
                        .arg(&outputs_i)
                        .arg(&rows_i)
                        .launch(cfg)
                }
                .map_err(&launch)?;
            }
        }

        // The loss and the gradient of the last layer's output.
        let cfg = launch_config(rows)?;
        let last = &b.z[layers - 1];
        let classification = match target {
            Batch::Classes(y) => {
                stream.memcpy_htod(y, &mut b.labels).map_err(&upload)?;
                let classes = i32::try_from(shapes[layers - 1].1).map_err(|_| too_large())?;
                // SAFETY: z and d hold classes × rows values, labels, loss and
                // correct rows; every label is below classes (checked by
                // `check_batch`).
                unsafe {
                    stream
                        .launch_builder(&kernels.softmax_xent)
                        .arg(last)
                        .arg(&mut b.d)
                        .arg(&b.labels)
                        .arg(&mut b.loss)
                        .arg(&mut b.correct)
                        .arg(&classes)
                        .arg(&rows_i)
                        .arg(&scale)
                        .launch(cfg)
                }
                .map_err(&launch)?;
                true
            }
            Batch::Values(y) => {
                stream.memcpy_htod(y, &mut b.values).map_err(&upload)?;
                // SAFETY: z, d, values and loss hold rows values each.
                unsafe {
                    stream
                        .launch_builder(&kernels.squared_error)
                        .arg(last)
                        .arg(&mut b.d)
                        .arg(&b.values)
                        .arg(&mut b.loss)
                        .arg(&rows_i)
                        .arg(&scale)
                        .launch(cfg)
                }
                .map_err(&launch)?;
                false
            }
        };

        // Backward, last layer first; `b.d` holds this layer's dZ.
        for l in (0..layers).rev() {
            let (inputs, outputs) = shapes[l];
            let (w_at, b_at) = offsets[l];
            let weight_grad = RowMajor {
                a_t: false,
                b_t: l != 0,
                m: outputs,
                n: inputs,
                k: rows,
            };
            {
                let mut dw = grads.slice_mut(w_at..b_at);
                if l == 0 {
                    product(blas, weight_grad, &b.d, &b.x, &mut dw)?;
                } else {
                    product(blas, weight_grad, &b.d, &b.h[l - 1], &mut dw)?;
                }
            }
            {
                let mut db = grads.slice_mut(b_at..b_at + outputs);
                let bias_grad = RowMajor {
                    a_t: false,
                    b_t: false,
                    m: outputs,
                    n: 1,
                    k: rows,
                };
                product(blas, bias_grad, &b.d, &b.ones, &mut db)?;
            }
            if l == 0 {
                break;
            }
            let w = params_dev.slice(w_at..b_at);
            let input_grad = RowMajor {
                a_t: true,
                b_t: false,
                m: inputs,
                n: rows,
                k: outputs,
            };
            product(blas, input_grad, &w, &b.d, &mut b.d_next)?;
            let n = (inputs * rows) as i64;
            let cfg = launch_config(inputs * rows)?;
            // SAFETY: d_next holds at least inputs × rows values, z[l - 1] exactly.
            unsafe {
                stream
                    .launch_builder(&kernels.act_backward)
                    .arg(&mut b.d_next)
                    .arg(&b.z[l - 1])
                    .arg(&n)
                    .arg(&act)
                    .launch(cfg)
            }
            .map_err(&launch)?;
            std::mem::swap(&mut b.d, &mut b.d_next);
        }

        let mut out = vec![0f32; grads.len()];
        stream.memcpy_dtoh(grads, &mut out).map_err(&download)?;
        let mut loss = vec![0f32; rows];
        stream.memcpy_dtoh(&b.loss, &mut loss).map_err(&download)?;
        let mut correct = vec![0f32; rows];
        if classification {
            stream
                .memcpy_dtoh(&b.correct, &mut correct)
                .map_err(&download)?;
        }
        stream
            .synchronize()
            .map_err(driver_error("wait for the training pass"))?;
        Ok(StepOutput {
            grads: out,
            loss_sum: loss.iter().map(|&l| f64::from(l)).sum(),
            correct: correct.iter().filter(|&&c| c > 0.5).count(),
        })
    }
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

    #[test]
    fn the_kernels_compile_with_nvrtc() {
        if !nvrtc_present() {
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
            && cublas_present()
            && nvrtc_present()
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

    /// The GPU's gradient, loss and correct count against the CPU's, for every
    /// task and activation, on batches of uneven size.
    #[test]
    fn the_gpu_pass_matches_the_cpu_pass() {
        if !gpu_here() {
            eprintln!("skipped: no CUDA driver, libcublas, libnvrtc or GPU here");
            return;
        }
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
                let mut gpu = GpuPass::new(0, &arch).expect("a GPU pass");
                for rows in [1usize, 64, 257, 64] {
                    let x: Vec<f32> = (0..rows * 7).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let classes: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..5)).collect();
                    let values: Vec<f32> = (0..rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let target = match task {
                        Task::Classification { .. } => Batch::Classes(&classes),
                        Task::Regression => Batch::Values(&values),
                    };
                    let scale = 1.0 / rows as f32;
                    let cpu = model.gradient(&x, rows, target, scale).expect("cpu");
                    let dev = gpu.gradient(&model, &x, rows, target, scale).expect("gpu");
                    let what = format!("{activation:?} {task:?} rows {rows}");
                    assert_eq!(cpu.grads.len(), dev.grads.len(), "{what}");
                    let worst = cpu
                        .grads
                        .iter()
                        .zip(&dev.grads)
                        .map(|(c, g)| (c - g).abs() / c.abs().max(1e-2))
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-3, "{what}: gradients differ by {worst}");
                    let loss_gap = (cpu.loss_sum - dev.loss_sum).abs() / cpu.loss_sum.max(1e-3);
                    assert!(
                        loss_gap < 1e-4,
                        "{what}: loss {} vs {}",
                        cpu.loss_sum,
                        dev.loss_sum
                    );
                    assert!(
                        cpu.correct.abs_diff(dev.correct) <= 1,
                        "{what}: correct {} vs {}",
                        cpu.correct,
                        dev.correct
                    );
                }
                let err = gpu
                    .gradient(&model, &[0.0; 6], 1, Batch::Values(&[0.0]), 1.0)
                    .expect_err("6 values are not one row of 7");
                assert!(err.to_string().contains("features"), "{err}");
            }
        }
    }
}
