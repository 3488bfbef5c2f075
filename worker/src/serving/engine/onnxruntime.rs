//! ONNX Runtime, the engine Triton and KServe run ONNX models on, through the `ort`
//! crate with the library loaded at run time (`load-dynamic`): kiln builds without
//! it and a worker uses the `libonnxruntime.so` it is given (`--onnxruntime-lib`,
//! `KILN_ONNXRUNTIME_LIB`, or the one in [`DEFAULT_DIR`]), PyPI's `onnxruntime`
//! wheel's library.
//!
//! One ONNX Runtime environment per process ([`init`]); each replica's session
//! runs its batches with the replica's threads as intra-op threads and every graph
//! optimisation. A session's `run` takes `&mut self`, so each inference thread
//! keeps its own.
//!
//! The batch dimension: the first input's first dimension when it is dynamic; the
//! model is batched when every input and output starts with a dynamic dimension of
//! that same symbol (an unnamed one matches any).
//!
//! Strings are BYTES tensors (UTF-8 text: ONNX Runtime's string tensors hold
//! text). An output that is a sequence of maps from class to probability (the
//! ZipMap that skl2onnx puts after a classifier by default) is served as an FP32
//! tensor `[rows, classes]`, classes in the maps' order (ONNX Runtime's maps
//! keep their keys sorted, which is scikit-learn's order of `classes_`); a
//! sequence output counts as batched (one map per row).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use kiln_common::{Error, Result};
use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session as OrtSession, SessionInputValue};
use ort::value::{DynValue, Outlet, Tensor as OrtTensor, TensorElementType, ValueType};

use super::backend::{Backend, Dim, EngineKind, Loaded, Session};
use super::plan::ModelFiles;
use crate::serving::{push_bytes_element, split_bytes, DataType, Signature, Spec, Tensor};

/// Where a worker looks for the library when none is named: the scripts and the
/// container image install the wheel's `libonnxruntime.so.*` here.
pub const DEFAULT_DIR: &str = "/usr/local/lib/kiln/onnxruntime";

/// The library this process loaded and its environment.
struct Runtime {
    library: PathBuf,
    environment: Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Loads ONNX Runtime once per process: from `library` when named (a library that
/// is missing or does not load is an error naming the path and the fix), else from
/// [`DEFAULT_DIR`] when a library is there. Returns the library loaded, or `None`
/// when none was named or found (the process then serves through tract). A second
/// call returns the first one's library, and fails if it names another.
pub fn init(library: Option<&Path>) -> Result<Option<PathBuf>> {
    let fix = "point --onnxruntime-lib (KILN_ONNXRUNTIME_LIB) at libonnxruntime.so.* from PyPI's \
               onnxruntime wheel (onnxruntime/capi/), or leave it unset to serve through tract";
    if let Some(path) = library.filter(|path| !path.is_file()) {
        return Err(Error::InvalidArgument(format!(
            "ONNX Runtime library {} does not exist; {fix}",
            path.display()
        )));
    }
    if let Some(runtime) = RUNTIME.get() {
        return match library {
            Some(path) if path != runtime.library => Err(Error::InvalidArgument(format!(
                "ONNX Runtime is loaded from {} already; a process loads one library",
                runtime.library.display()
            ))),
            _ => Ok(Some(runtime.library.clone())),
        };
    }
    let (path, named) = match library {
        Some(path) => (path.to_path_buf(), true),
        None => match find_in(Path::new(DEFAULT_DIR)) {
            Some(path) => (path, false),
            None => return Ok(None),
        },
    };
    let loaded = ort::init_from(&path)
        .map_err(|e| e.to_string())
        .and_then(|builder| {
            builder
                .with_name("kiln")
                .with_telemetry(false)
                .build()
                .map_err(|e| e.to_string())
        });
    let environment = match loaded {
        Ok(environment) => environment,
        Err(reason) => {
            let origin = if named {
                ""
            } else {
                " (found in the default directory)"
            };
            return Err(Error::InvalidArgument(format!(
                "ONNX Runtime library {}{origin} cannot be used: {reason}; {fix}",
                path.display()
            )));
        }
    };
    let runtime = RUNTIME.get_or_init(|| Runtime {
        library: path,
        environment,
    });
    Ok(Some(runtime.library.clone()))
}

/// The library loaded by [`init`], if any.
pub fn loaded() -> Option<&'static Path> {
    RUNTIME.get().map(|r| r.library.as_path())
}

/// The first `libonnxruntime.so*` file in `dir` (by name).
fn find_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// A model committed to a session of the environment; the bytes are kept to
/// commit more sessions for more threads.
struct Ort {
    model: ModelFiles,
    threads: usize,
    /// The GPU its sessions run on (CUDA execution provider); `None`: CPUs.
    gpu: Option<u32>,
    /// The model's outputs, in its order, as sessions return them.
    outputs: Vec<String>,
}

struct OrtRun {
    session: OrtSession,
    outputs: Vec<String>,
}

/// What an input or output of the model is, as kiln serves it.
struct Served {
    datatype: DataType,
    /// -1 where dynamic.
    shape: Vec<i64>,
    symbols: Vec<String>,
}

/// Commits the model to a session whose runs use `threads` intra-op threads and
/// reads its inputs and outputs; a model ONNX Runtime cannot load, or an input or
/// output kiln does not serve, is an `InvalidArgument` carrying the reason.
pub(super) fn load(model: &ModelFiles, threads: usize, gpu: Option<u32>) -> Result<Loaded> {
    let session = commit(model, threads, gpu)?;
    let inputs = session.inputs();
    if inputs.is_empty() {
        return Err(Error::InvalidArgument("the model takes no inputs".into()));
    }
    let batch = inputs
        .first()
        .and_then(|i| tensor_type(i).ok())
        .and_then(|input| match input.shape.first() {
            Some(-1) => Some(input.symbols.first().cloned().unwrap_or_default()),
            _ => None,
        });
    let same_batch = |symbol: &str| match &batch {
        Some(batch) => batch.is_empty() || symbol.is_empty() || symbol == batch,
        None => false,
    };
    let mut specs = Vec::with_capacity(inputs.len());
    let mut dims = Vec::with_capacity(inputs.len());
    for input in inputs {
        let Served {
            datatype,
            shape,
            symbols,
        } = tensor_type(input)
            .map_err(|e| refused(format!("input {:?} of the model: {e}", input.name())))?;
        let input_dims: Vec<Dim> = shape
            .iter()
            .enumerate()
            .map(|(axis, &size)| {
                let symbol = symbols.get(axis).map_or("", String::as_str);
                match size {
                    -1 if axis == 0 && same_batch(symbol) => Dim::Batch,
                    -1 if symbol.is_empty() => Dim::Var(format!("{}:{axis}", input.name())),
                    -1 => Dim::Var(symbol.to_string()),
                    size => Dim::Fixed(size.max(0) as usize),
                }
            })
            .collect();
        specs.push(Spec {
            name: input.name().to_string(),
            datatype,
            shape: Dim::spec_shape(&input_dims),
        });
        dims.push(input_dims);
    }
    let mut outputs = Vec::with_capacity(session.outputs().len());
    let mut outputs_batched = true;
    for output in session.outputs() {
        let Served {
            datatype,
            shape,
            symbols,
        } = output_type(output)
            .map_err(|e| refused(format!("output {:?} of the model: {e}", output.name())))?;
        let symbol = symbols.first().map_or("", String::as_str);
        outputs_batched &= shape.first() == Some(&-1) && same_batch(symbol);
        outputs.push(Spec {
            name: output.name().to_string(),
            datatype,
            shape: shape.iter().map(|&d| d.max(-1)).collect(),
        });
    }
    let batched = outputs_batched && dims.iter().all(|d| d.first() == Some(&Dim::Batch));
    let names: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
    Ok(Loaded {
        first: Some(Box::new(OrtRun {
            session,
            outputs: names.clone(),
        })),
        backend: Box::new(Ort {
            model: model.clone(),
            threads,
            gpu,
            outputs: names,
        }),
        signature: Signature {
            inputs: specs,
            outputs,
        },
        dims,
        batched,
    })
}

/// True when the loaded library has ONNX Runtime's CUDA execution provider
/// (PyPI's onnxruntime-gpu has it; onnxruntime does not).
pub fn has_cuda() -> bool {
    RUNTIME.get().is_some()
        && <ort::ep::CUDA as ort::ep::ExecutionProvider>::is_available().unwrap_or(false)
}

/// A session of the process's environment with the model (and its external
/// data files, from memory) committed, on GPU `gpu` through the CUDA execution
/// provider when one is given (an error when the provider cannot take it,
/// never a silent fall back to CPUs).
fn commit(model: &ModelFiles, threads: usize, gpu: Option<u32>) -> Result<OrtSession> {
    let runtime = RUNTIME.get().ok_or_else(|| {
        Error::Unavailable(
            "ONNX Runtime is not loaded in this process; start the worker with \
             --onnxruntime-lib or serve through tract"
                .into(),
        )
    })?;
    let text = |e: ort::Error<_>| e.to_string();
    let builder = OrtSession::builder(&runtime.environment).map_err(|e| e.to_string());
    let builder = builder
        .and_then(|b| {
            b.with_optimization_level(GraphOptimizationLevel::All)
                .map_err(text)
        })
        .and_then(|b| b.with_intra_threads(threads.max(1)).map_err(text))
        .and_then(|b| b.with_intra_op_spinning(false).map_err(text));
    let builder = match gpu {
        None => builder,
        Some(gpu) => {
            if !has_cuda() {
                return Err(Error::Unavailable(format!(
                    "the ONNX Runtime library {} has no CUDA execution provider, so it \
                     cannot serve on GPU {gpu}: point --onnxruntime-lib at onnxruntime-gpu's \
                     library (pip install onnxruntime-gpu)",
                    runtime.library.display()
                )));
            }
            let cuda = ort::ep::CUDA::default()
                .with_device_id(gpu as i32)
                .build()
                .error_on_failure();
            builder.and_then(|b| b.with_execution_providers([cuda]).map_err(text))
        }
    };
    let builder = model.external.iter().fold(builder, |b, (name, data)| {
        b.and_then(|b| {
            b.with_external_initializer_file_in_memory(name, Arc::clone(data))
                .map_err(text)
        })
    });
    builder
        .and_then(|mut b| b.commit_from_memory(&model.onnx).map_err(|e| e.to_string()))
        .map_err(refused)
}

fn refused(reason: String) -> Error {
    Error::InvalidArgument(format!("ONNX Runtime cannot load the model: {reason}"))
}

/// A tensor input's or output's datatype, shape and dimension names.
fn tensor_type(outlet: &Outlet) -> std::result::Result<Served, String> {
    match outlet.dtype() {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => Ok(Served {
            datatype: data_type(*ty)?,
            shape: shape.to_vec(),
            symbols: dimension_symbols.iter().cloned().collect(),
        }),
        other => Err(format!(
            "it is a {other}, not a tensor; kiln serves tensors (and an output that \
             is a sequence of maps to floats, one per row)"
        )),
    }
}

/// An output as served: a tensor as it is, a sequence of maps (ZipMap) as FP32
/// `[rows, classes]`.
fn output_type(outlet: &Outlet) -> std::result::Result<Served, String> {
    match outlet.dtype() {
        ValueType::Sequence(inner) => match inner.as_ref() {
            ValueType::Map { key, value } => {
                map_key(*key)?;
                if *value != TensorElementType::Float32 {
                    return Err(format!(
                        "it is a sequence of maps to {value}; kiln serves maps to float32"
                    ));
                }
                Ok(Served {
                    datatype: DataType::Fp32,
                    shape: vec![-1, -1],
                    symbols: Vec::new(),
                })
            }
            other => Err(format!(
                "it is a sequence of {other}; kiln serves sequences of maps (one per row)"
            )),
        },
        _ => tensor_type(outlet),
    }
}

/// Refuses a map key type other than the integers and strings ZipMap makes.
fn map_key(key: TensorElementType) -> std::result::Result<(), String> {
    match key {
        TensorElementType::Int64 | TensorElementType::String => Ok(()),
        other => Err(format!(
            "its maps have {other} keys; kiln serves int64 or string class keys"
        )),
    }
}

impl Backend for Ort {
    fn kind(&self) -> EngineKind {
        EngineKind::OnnxRuntime
    }

    /// A session already runs each batch on all the replica's threads.
    fn instances(&self, _threads: usize) -> usize {
        1
    }

    fn session(&self) -> anyhow::Result<Box<dyn Session>> {
        Ok(Box::new(OrtRun {
            session: commit(&self.model, self.threads, self.gpu)?,
            outputs: self.outputs.clone(),
        }))
    }
}

impl Session for OrtRun {
    fn run(&mut self, inputs: Vec<Tensor>) -> anyhow::Result<Vec<Tensor>> {
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for input in &inputs {
            values.push((Cow::Borrowed(input.name.as_str()), ort_value(input)?.into()));
        }
        let outputs = self.session.run(values)?;
        (0..self.outputs.len())
            .map(|o| served(&self.outputs[o], &outputs[o]))
            .collect()
    }
}

/// Makes a typed ORT tensor of `$t` from a served tensor's little-endian bytes.
macro_rules! typed_value {
    ($t:ty, $tensor:expr) => {{
        let values: Vec<$t> = $tensor
            .data
            .chunks_exact(std::mem::size_of::<$t>())
            .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunks of the element size")))
            .collect();
        OrtTensor::<$t>::from_array(($tensor.shape.clone(), values))?.into_dyn()
    }};
}

/// An ORT value holding a copy of `tensor`.
fn ort_value(tensor: &Tensor) -> anyhow::Result<DynValue> {
    Ok(match tensor.datatype {
        DataType::Bytes => {
            let elements = split_bytes(&tensor.data).map_err(anyhow::Error::msg)?;
            let mut text = Vec::with_capacity(elements.len());
            for (at, element) in elements.into_iter().enumerate() {
                let element = std::str::from_utf8(element).map_err(|_| {
                    anyhow::format_err!(
                        "input {:?}: element {at} is not UTF-8; ONNX Runtime's strings are text",
                        tensor.name
                    )
                })?;
                text.push(element.to_string());
            }
            OrtTensor::from_string_array((tensor.shape.clone(), &text[..]))?.into_dyn()
        }
        DataType::Bool => {
            let values: Vec<bool> = tensor.data.iter().map(|b| *b != 0).collect();
            OrtTensor::<bool>::from_array((tensor.shape.clone(), values))?.into_dyn()
        }
        DataType::Uint8 => typed_value!(u8, tensor),
        DataType::Uint16 => typed_value!(u16, tensor),
        DataType::Uint32 => typed_value!(u32, tensor),
        DataType::Uint64 => typed_value!(u64, tensor),
        DataType::Int8 => typed_value!(i8, tensor),
        DataType::Int16 => typed_value!(i16, tensor),
        DataType::Int32 => typed_value!(i32, tensor),
        DataType::Int64 => typed_value!(i64, tensor),
        DataType::Fp32 => typed_value!(f32, tensor),
        DataType::Fp64 => typed_value!(f64, tensor),
        DataType::Fp16 => typed_value!(half::f16, tensor),
        DataType::Bf16 => typed_value!(half::bf16, tensor),
    })
}

/// The little-endian bytes of an ORT tensor of `$t`.
macro_rules! typed_bytes {
    ($t:ty, $value:expr) => {{
        let (_, values) = $value.try_extract_tensor::<$t>()?;
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    }};
}

/// A served tensor holding a copy of output `name`.
fn served(name: &str, value: &DynValue) -> anyhow::Result<Tensor> {
    let (ty, shape) = match value.dtype() {
        ValueType::Tensor { ty, shape, .. } => (ty, shape),
        ValueType::Sequence(_) => return class_scores(name, value),
        other => anyhow::bail!("output {name:?} is a {other}, not a tensor"),
    };
    let datatype = data_type(*ty).map_err(anyhow::Error::msg)?;
    let data = match datatype {
        DataType::Bytes => {
            let (_, strings) = value.try_extract_strings()?;
            let mut out = Vec::with_capacity(strings.iter().map(|s| s.len() + 4).sum());
            for s in &strings {
                push_bytes_element(&mut out, s.as_bytes());
            }
            out.into()
        }
        DataType::Bool => {
            let (_, values) = value.try_extract_tensor::<bool>()?;
            values
                .iter()
                .map(|b| u8::from(*b))
                .collect::<Vec<u8>>()
                .into()
        }
        DataType::Uint8 => typed_bytes!(u8, value),
        DataType::Uint16 => typed_bytes!(u16, value),
        DataType::Uint32 => typed_bytes!(u32, value),
        DataType::Uint64 => typed_bytes!(u64, value),
        DataType::Int8 => typed_bytes!(i8, value),
        DataType::Int16 => typed_bytes!(i16, value),
        DataType::Int32 => typed_bytes!(i32, value),
        DataType::Int64 => typed_bytes!(i64, value),
        DataType::Fp32 => typed_bytes!(f32, value),
        DataType::Fp64 => typed_bytes!(f64, value),
        DataType::Fp16 => typed_bytes!(half::f16, value),
        DataType::Bf16 => typed_bytes!(half::bf16, value),
    };
    Ok(Tensor {
        name: String::new(),
        datatype,
        shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
        data,
    })
}

/// A sequence of maps from class to probability, one per row, as FP32
/// `[rows, classes]` in the maps' order; maps that disagree on their classes are
/// an error.
fn class_scores(name: &str, value: &DynValue) -> anyhow::Result<Tensor> {
    let maps = value.try_extract_sequence::<ort::value::DynValueTypeMarker>()?;
    let mut classes: Option<usize> = None;
    let mut data = Vec::new();
    for (row, map) in maps.iter().enumerate() {
        let scores: Vec<f32> = match map.dtype() {
            ValueType::Map {
                key: TensorElementType::Int64,
                ..
            } => map
                .try_extract_key_values::<i64, f32>()?
                .into_iter()
                .map(|(_, v)| v)
                .collect(),
            ValueType::Map { .. } => map
                .try_extract_key_values::<String, f32>()?
                .into_iter()
                .map(|(_, v)| v)
                .collect(),
            other => anyhow::bail!("output {name:?}: row {row} is a {other}, not a map"),
        };
        match classes {
            None => classes = Some(scores.len()),
            Some(n) if n != scores.len() => anyhow::bail!(
                "output {name:?}: row {row} has {} classes, the first row {n}",
                scores.len()
            ),
            Some(_) => {}
        }
        data.extend(scores.iter().flat_map(|v| v.to_le_bytes()));
    }
    Ok(Tensor {
        name: String::new(),
        datatype: DataType::Fp32,
        shape: vec![maps.len(), classes.unwrap_or(0)],
        data: data.into(),
    })
}

/// The served datatype of an ONNX Runtime element type.
fn data_type(ty: TensorElementType) -> std::result::Result<DataType, String> {
    use TensorElementType as T;
    Ok(match ty {
        T::Bool => DataType::Bool,
        T::Uint8 => DataType::Uint8,
        T::Uint16 => DataType::Uint16,
        T::Uint32 => DataType::Uint32,
        T::Uint64 => DataType::Uint64,
        T::Int8 => DataType::Int8,
        T::Int16 => DataType::Int16,
        T::Int32 => DataType::Int32,
        T::Int64 => DataType::Int64,
        T::Float32 => DataType::Fp32,
        T::Float64 => DataType::Fp64,
        T::Float16 => DataType::Fp16,
        T::Bfloat16 => DataType::Bf16,
        T::String => DataType::Bytes,
        other => return Err(format!("datatype {other} is not served")),
    })
}
