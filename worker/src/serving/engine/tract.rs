//! The embedded engine: tract, built into kiln, so a worker serves every model tract
//! can load without any library beside it. Each batch runs on one core.
//!
//! The batch dimension: every input's first dimension becomes one symbol, the
//! model's own `dim_param` when its first input has one (`batch` in kiln's
//! exports), a new `batch` symbol when the file leaves it unknown. A first
//! dimension that is a fixed number stays fixed. The model is batched only when
//! every input and every output starts with that symbol.

use std::sync::Arc;

use bytes::Bytes;
use kiln_common::{Error, Result};
use tract_onnx::prelude::{
    self as tract, Framework as _, InferenceModelExt as _, IntoRunnable as _, IntoTValue as _,
};
use tract_onnx::tract_hir::infer::{Factoid as _, GenericFactoid, ShapeFactoid};

use super::backend::{Backend, Dim, EngineKind, Loaded, Session};
use crate::serving::{DataType, Signature, Spec, Tensor};

/// An optimised tract plan.
struct Tract {
    runnable: Arc<tract::TypedRunnableModel>,
}

/// A thread's execution state of the plan.
struct TractSession {
    state: tract::TypedSimpleState,
}

/// Parses and optimises an ONNX model; a file tract cannot load, or an input or
/// output of a datatype tract does not serve, is an `InvalidArgument` carrying the
/// reason. Blocking: optimising a large model takes a while.
pub(super) fn load(onnx: &[u8]) -> Result<Loaded> {
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])
        .map_err(refused)?;
    let batch = batch_symbol(&model);
    let input_count = model.inputs.len();
    if input_count == 0 {
        return Err(Error::InvalidArgument("the model takes no inputs".into()));
    }
    for input in 0..input_count {
        let fact = input_fact(&model, input, &batch)?;
        model.set_input_fact(input, fact).map_err(refused)?;
    }
    let typed = model.into_optimized().map_err(refused)?;
    let batch = tract::TDim::Sym(batch);
    let (inputs, dims) = input_specs(&typed, &batch)?;
    let outputs = output_specs(&typed)?;
    let batched = dims.iter().all(|d| d.first() == Some(&Dim::Batch))
        && (0..outputs.len()).all(|o| {
            typed
                .output_fact(o)
                .is_ok_and(|f| f.shape.dims().first() == Some(&batch))
        });
    let runnable = typed.into_runnable().map_err(refused)?;
    Ok(Loaded {
        first: None,
        backend: Box::new(Tract { runnable }),
        signature: Signature { inputs, outputs },
        dims,
        batched,
    })
}

impl Backend for Tract {
    fn kind(&self) -> EngineKind {
        EngineKind::Tract
    }

    /// One batch runs on one core, so a replica runs as many at once as it has
    /// threads.
    fn instances(&self, threads: usize) -> usize {
        threads
    }

    fn session(&self) -> anyhow::Result<Box<dyn Session>> {
        Ok(Box::new(TractSession {
            state: self.runnable.spawn()?,
        }))
    }
}

impl Session for TractSession {
    fn run(&mut self, inputs: Vec<Tensor>) -> anyhow::Result<Vec<Tensor>> {
        let mut values = tract::TVec::with_capacity(inputs.len());
        for input in &inputs {
            let mut tensor = tract::Tensor::zero_dt(datum_type(input.datatype), &input.shape)?;
            let bytes = tensor.as_bytes_mut();
            anyhow::ensure!(
                bytes.len() == input.data.len(),
                "input {:?} holds {} bytes for shape {:?}",
                input.name,
                input.data.len(),
                input.shape
            );
            bytes.copy_from_slice(&input.data);
            values.push(tensor.into_tvalue());
        }
        drop(inputs);
        let outputs = self.state.run(values)?;
        outputs
            .iter()
            .map(|value| {
                let datatype = data_type(value.datum_type()).map_err(anyhow::Error::msg)?;
                Ok(Tensor {
                    name: String::new(),
                    datatype,
                    shape: value.shape().to_vec(),
                    data: Bytes::copy_from_slice(value.try_as_plain_ram()?.as_bytes()),
                })
            })
            .collect()
    }
}

fn refused(e: tract::TractError) -> Error {
    Error::InvalidArgument(format!("tract cannot load the model: {e:#}"))
}

/// The symbol the batch dimension becomes: the first input's own `dim_param` when
/// its first dimension has one, else a new one named `batch`.
fn batch_symbol(model: &tract::InferenceModel) -> tract::Symbol {
    let first_dim = model
        .input_fact(0)
        .ok()
        .and_then(|fact| fact.shape.dims().next().cloned());
    match first_dim {
        Some(GenericFactoid::Only(tract::TDim::Sym(symbol))) => symbol,
        _ => model.symbols.new_with_prefix("batch"),
    }
}

/// Input `input`'s fact with its first dimension made the batch symbol (unless it
/// is a fixed number or an expression) and every unknown dimension a new symbol.
fn input_fact(
    model: &tract::InferenceModel,
    input: usize,
    batch: &tract::Symbol,
) -> Result<tract::InferenceFact> {
    let name = &model.node(model.inputs[input].node).name;
    let fact = model.input_fact(input).map_err(refused)?;
    let datum_type = fact.datum_type.concretize().ok_or_else(|| {
        Error::InvalidArgument(format!("input {name:?} of the model has no datatype"))
    })?;
    data_type(datum_type)
        .map_err(|e| Error::InvalidArgument(format!("input {name:?} of the model: {e}")))?;
    if fact.shape.is_open() {
        return Err(Error::InvalidArgument(format!(
            "input {name:?} of the model has no shape; kiln needs the rank of every input"
        )));
    }
    let dims = fact
        .shape
        .dims()
        .enumerate()
        .map(|(axis, dim)| match (axis, dim) {
            (0, GenericFactoid::Any | GenericFactoid::Only(tract::TDim::Sym(_))) => {
                GenericFactoid::Only(tract::TDim::Sym(batch.clone()))
            }
            (_, GenericFactoid::Any) => {
                GenericFactoid::Only(tract::TDim::Sym(model.symbols.new_with_prefix("dim")))
            }
            (_, known) => known.clone(),
        })
        .collect();
    Ok(tract::InferenceFact::dt_shape(
        datum_type,
        ShapeFactoid::closed(dims),
    ))
}

/// The inputs' specs and dimension rules, in the model's order.
fn input_specs(
    model: &tract::TypedModel,
    batch: &tract::TDim,
) -> Result<(Vec<Spec>, Vec<Vec<Dim>>)> {
    let mut specs = Vec::with_capacity(model.inputs.len());
    let mut all_dims = Vec::with_capacity(model.inputs.len());
    for input in 0..model.inputs.len() {
        let name = model.node(model.inputs[input].node).name.clone();
        let fact = model.input_fact(input).map_err(refused)?;
        let datatype = data_type(fact.datum_type)
            .map_err(|e| Error::InvalidArgument(format!("input {name:?} of the model: {e}")))?;
        let dims: Vec<Dim> = fact
            .shape
            .dims()
            .iter()
            .enumerate()
            .map(|(axis, dim)| match dim.to_i64() {
                _ if axis == 0 && dim == batch => Dim::Batch,
                Ok(size) if size >= 0 => Dim::Fixed(size as usize),
                _ => Dim::Var(dim.to_string()),
            })
            .collect();
        specs.push(Spec {
            name,
            datatype,
            shape: Dim::spec_shape(&dims),
        });
        all_dims.push(dims);
    }
    Ok((specs, all_dims))
}

/// The outputs' specs, in the model's order; a dimension that is not a number is -1.
fn output_specs(model: &tract::TypedModel) -> Result<Vec<Spec>> {
    let outlets = model.output_outlets().map_err(refused)?;
    let mut specs = Vec::with_capacity(outlets.len());
    for (output, outlet) in outlets.iter().enumerate() {
        let name = model
            .outlet_label(*outlet)
            .unwrap_or(&model.node(outlet.node).name)
            .to_string();
        let fact = model.output_fact(output).map_err(refused)?;
        let datatype = data_type(fact.datum_type)
            .map_err(|e| Error::InvalidArgument(format!("output {name:?} of the model: {e}")))?;
        let shape = fact
            .shape
            .dims()
            .iter()
            .map(|d| d.to_i64().ok().filter(|n| *n >= 0).unwrap_or(-1))
            .collect();
        specs.push(Spec {
            name,
            datatype,
            shape,
        });
    }
    Ok(specs)
}

/// The served datatype of a tract datum type.
fn data_type(datum_type: tract::DatumType) -> std::result::Result<DataType, String> {
    use tract::DatumType as D;
    Ok(match datum_type {
        D::Bool => DataType::Bool,
        D::U8 => DataType::Uint8,
        D::U16 => DataType::Uint16,
        D::U32 => DataType::Uint32,
        D::U64 => DataType::Uint64,
        D::I8 => DataType::Int8,
        D::I16 => DataType::Int16,
        D::I32 => DataType::Int32,
        D::I64 => DataType::Int64,
        D::F32 => DataType::Fp32,
        D::F64 => DataType::Fp64,
        D::F16 => DataType::Fp16,
        D::String => {
            return Err("strings (BYTES) are served by ONNX Runtime, not tract".to_string())
        }
        other => return Err(format!("datatype {other:?} is not served by tract")),
    })
}

/// The tract datum type of a served datatype (tract has no BF16 and serves no
/// strings: such a model never loads on tract, so no request of it reaches here).
fn datum_type(datatype: DataType) -> tract::DatumType {
    use tract::DatumType as D;
    match datatype {
        DataType::Bool => D::Bool,
        DataType::Uint8 => D::U8,
        DataType::Uint16 => D::U16,
        DataType::Uint32 => D::U32,
        DataType::Uint64 => D::U64,
        DataType::Int8 => D::I8,
        DataType::Int16 => D::I16,
        DataType::Int32 => D::I32,
        DataType::Int64 => D::I64,
        DataType::Fp32 => D::F32,
        DataType::Fp64 => D::F64,
        DataType::Fp16 => D::F16,
        DataType::Bf16 => D::U16,
        DataType::Bytes => D::String,
    }
}
