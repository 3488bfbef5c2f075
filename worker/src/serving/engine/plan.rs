//! A model as the engine runs it: the optimised tract plan, its [`Signature`], how
//! each input's dimensions may vary, and the data-only steps of a batch (check a
//! request, join requests along the batch dimension, cut the outputs back apart).
//! Nothing here owns a thread or a clock.
//!
//! The batch dimension: every input's first dimension becomes one symbol, the
//! model's own `dim_param` when its first input has one (`batch` in kiln's
//! exports), a new `batch` symbol when the file leaves it unknown. A first
//! dimension that is a fixed number stays fixed. The model is *batched*, and
//! requests are joined, only when every input and every output starts with that
//! symbol; otherwise each request runs alone with exactly the shape the model
//! declares (a model exported with a batch of 1 takes requests of one row).

use bytes::Bytes;
use kiln_common::{Error, Result};
use tract_onnx::prelude::{
    self as tract, Framework as _, InferenceModelExt as _, IntoRunnable as _, IntoTValue as _,
};
use tract_onnx::tract_hir::infer::{Factoid as _, GenericFactoid, ShapeFactoid};

use crate::serving::{DataType, Signature, Spec, Tensor};

/// How one dimension of an input may vary.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dim {
    /// The batch dimension: any number of rows from 1 up to the engine's limit,
    /// the same in every input.
    Batch,
    /// Exactly this size.
    Fixed(usize),
    /// Any size, the same wherever the same symbol (or expression) appears.
    Var(String),
}

/// A loaded, optimised model ready to run, with what requests must look like.
#[derive(Debug)]
pub struct Plan {
    runnable: std::sync::Arc<tract::TypedRunnableModel>,
    signature: Signature,
    /// Each input's dimensions, in the model's input order.
    dims: Vec<Vec<Dim>>,
    /// Requests can be joined along the first dimension (see the module docs).
    batched: bool,
}

/// A request that passed [`Plan::check`]: inputs in the model's order, the outputs
/// to return (indices into the signature's outputs) and its row count.
#[derive(Debug)]
pub(super) struct Checked {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<usize>,
    pub rows: usize,
}

/// Parses and optimises an ONNX model; a file tract cannot load, or an input or
/// output of a datatype kiln does not serve, is an `InvalidArgument` carrying the
/// reason. Blocking: optimising a large model takes a while.
pub fn inspect(onnx: &[u8]) -> Result<Plan> {
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
    Ok(Plan {
        runnable,
        signature: Signature { inputs, outputs },
        dims,
        batched,
    })
}

/// Returns what the model takes and gives, for the registry.
pub fn signature_of(onnx: &[u8]) -> Result<Signature> {
    Ok(inspect(onnx)?.signature)
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
        let shape = dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(size) => *size as i64,
                Dim::Batch | Dim::Var(_) => -1,
            })
            .collect();
        specs.push(Spec {
            name,
            datatype,
            shape,
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
        other => return Err(format!("datatype {other:?} is not served")),
    })
}

/// The tract datum type of a served datatype.
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
    }
}

impl Plan {
    /// What the model takes and gives.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Returns true when requests are joined into batches (see the module docs).
    pub fn batched(&self) -> bool {
        self.batched
    }

    /// A fresh execution state, which a thread keeps between runs.
    pub(super) fn spawn(&self) -> tract::TractResult<tract::TypedSimpleState> {
        self.runnable.spawn()
    }

    /// Runs the model once on zeros, a batch of one row (every other variable
    /// dimension 1); a model that fails is refused.
    pub(super) fn warm_up(&self) -> Result<()> {
        let inputs = self
            .signature
            .inputs
            .iter()
            .zip(&self.dims)
            .map(|(spec, dims)| {
                let shape: Vec<usize> = dims
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(size) => *size,
                        Dim::Batch | Dim::Var(_) => 1,
                    })
                    .collect();
                Ok(tract::Tensor::zero_dt(datum_type(spec.datatype), &shape)?.into_tvalue())
            })
            .collect::<tract::TractResult<_>>();
        inputs
            .and_then(|inputs| self.runnable.run(inputs))
            .map(drop)
            .map_err(|e| {
                Error::InvalidArgument(format!("the model fails on a batch of zeros: {e:#}"))
            })
    }

    /// Checks a request against the signature and puts its inputs in the model's
    /// order. Each error names the input or output and what was expected.
    pub(super) fn check(
        &self,
        inputs: Vec<Tensor>,
        outputs: Option<Vec<String>>,
        max_batch_size: usize,
    ) -> Result<Checked> {
        let specs = &self.signature.inputs;
        let mut placed: Vec<Option<Tensor>> = specs.iter().map(|_| None).collect();
        for tensor in inputs {
            let Some(index) = specs.iter().position(|s| s.name == tensor.name) else {
                return Err(invalid(format!(
                    "input {:?} is not an input of the model; it takes {}",
                    tensor.name,
                    names(specs)
                )));
            };
            if placed[index].is_some() {
                return Err(invalid(format!("input {:?} is given twice", tensor.name)));
            }
            self.check_input(index, &tensor)?;
            placed[index] = Some(tensor);
        }
        let mut inputs = Vec::with_capacity(specs.len());
        for (spec, tensor) in specs.iter().zip(placed) {
            inputs.push(tensor.ok_or_else(|| {
                invalid(format!(
                    "input {:?} is missing; the model takes {}",
                    spec.name,
                    names(specs)
                ))
            })?);
        }
        let rows = self.check_agreement(&inputs, max_batch_size)?;
        let outputs = self.output_indices(outputs)?;
        Ok(Checked {
            inputs,
            outputs,
            rows,
        })
    }

    /// Checks one input's datatype, shape and byte count against its spec.
    fn check_input(&self, index: usize, tensor: &Tensor) -> Result<()> {
        let spec = &self.signature.inputs[index];
        let name = &spec.name;
        if tensor.datatype != spec.datatype {
            return Err(invalid(format!(
                "input {name:?}: expected datatype {}, got {}",
                spec.datatype.name(),
                tensor.datatype.name()
            )));
        }
        let dims = &self.dims[index];
        let fits = tensor.shape.len() == dims.len()
            && dims.iter().zip(&tensor.shape).all(|(dim, size)| match dim {
                Dim::Fixed(fixed) => fixed == size,
                Dim::Batch | Dim::Var(_) => true,
            });
        if !fits {
            return Err(invalid(format!(
                "input {name:?}: expected shape {:?}, got {:?}",
                spec.shape, tensor.shape
            )));
        }
        if dims.first() == Some(&Dim::Batch) && tensor.shape[0] == 0 {
            return Err(invalid(format!(
                "input {name:?}: expected at least one row, got shape {:?}",
                tensor.shape
            )));
        }
        let bytes = tensor
            .shape
            .iter()
            .try_fold(tensor.datatype.size(), |n, d| n.checked_mul(*d));
        if bytes != Some(tensor.data.len()) {
            return Err(invalid(format!(
                "input {name:?}: shape {:?} of {} takes {} bytes, got {}",
                tensor.shape,
                tensor.datatype.name(),
                bytes.map_or("too many".to_string(), |b| b.to_string()),
                tensor.data.len()
            )));
        }
        if tensor.datatype == DataType::Bool {
            if let Some(at) = tensor.data.iter().position(|b| *b > 1) {
                return Err(invalid(format!(
                    "input {name:?}: BOOL values are 0 or 1, got {} at element {at}",
                    tensor.data[at]
                )));
            }
        }
        Ok(())
    }

    /// Checks that the inputs agree on their row count and on each variable
    /// dimension; returns the row count (1 for a model without a batch dimension).
    fn check_agreement(&self, inputs: &[Tensor], max_batch_size: usize) -> Result<usize> {
        // (symbol, size, input, axis) of the first input that fixed each symbol.
        let mut seen: tract::TVec<(&Dim, usize, &str, usize)> = tract::TVec::new();
        for (tensor, dims) in inputs.iter().zip(&self.dims) {
            for (axis, (dim, &size)) in dims.iter().zip(&tensor.shape).enumerate() {
                if let Dim::Fixed(_) = dim {
                    continue;
                }
                match seen.iter().find(|(d, ..)| *d == dim) {
                    None => seen.push((dim, size, &tensor.name, axis)),
                    Some(&(_, first, _, _)) if first == size => {}
                    Some((Dim::Batch, first, other, _)) => {
                        return Err(invalid(format!(
                            "input {:?}: expected {first} rows like input {other:?}, got {size}",
                            tensor.name
                        )))
                    }
                    Some((_, first, other, other_axis)) => {
                        return Err(invalid(format!(
                            "input {:?}: dimension {axis} must equal dimension {other_axis} of \
                             input {other:?} ({first}), got {size}",
                            tensor.name
                        )))
                    }
                }
            }
        }
        let Some(&(_, rows, name, _)) = seen.iter().find(|(d, ..)| **d == Dim::Batch) else {
            return Ok(1);
        };
        if rows > max_batch_size {
            return Err(invalid(format!(
                "input {name:?}: {rows} rows exceed the max batch size ({max_batch_size})"
            )));
        }
        Ok(rows)
    }

    /// Indices of the requested outputs, in the requested order; all outputs in the
    /// model's order when none are named.
    fn output_indices(&self, requested: Option<Vec<String>>) -> Result<Vec<usize>> {
        let specs = &self.signature.outputs;
        let Some(requested) = requested else {
            return Ok((0..specs.len()).collect());
        };
        let mut indices = Vec::with_capacity(requested.len());
        for name in &requested {
            let index = specs.iter().position(|s| &s.name == name).ok_or_else(|| {
                invalid(format!(
                    "output {name:?} is not an output of the model; it gives {}",
                    names(specs)
                ))
            })?;
            if indices.contains(&index) {
                return Err(invalid(format!("output {name:?} is requested twice")));
            }
            indices.push(index);
        }
        Ok(indices)
    }

    /// Returns true when request `next` may join a batch that starts with `first`:
    /// the model is batched and every input's dimensions past the first agree.
    pub(super) fn joinable(&self, first: &[Tensor], next: &[Tensor]) -> bool {
        self.batched
            && first
                .iter()
                .zip(next)
                .all(|(a, b)| a.shape[1..] == b.shape[1..])
    }

    /// Runs requests' inputs (each in the model's order, all [`joinable`]) as one
    /// batch of `rows` rows: each input's bytes are copied once, request after
    /// request, into one tensor.
    ///
    /// [`joinable`]: Plan::joinable
    pub(super) fn run<'a, I>(
        &self,
        state: &mut tract::TypedSimpleState,
        requests: I,
        rows: usize,
    ) -> tract::TractResult<Outputs<'_>>
    where
        I: Iterator<Item = &'a [Tensor]> + Clone,
    {
        let mut joined = tract::TVec::with_capacity(self.signature.inputs.len());
        for (input, spec) in self.signature.inputs.iter().enumerate() {
            let first = requests.clone().next().map(|r| &r[input]);
            let first = first.ok_or_else(|| anyhow::format_err!("an empty batch"))?;
            let mut shape = first.shape.clone();
            if self.batched {
                shape[0] = rows;
            }
            let mut tensor = tract::Tensor::zero_dt(datum_type(spec.datatype), &shape)?;
            let bytes = tensor.as_bytes_mut();
            let mut at = 0;
            for request in requests.clone() {
                let data = &request[input].data;
                let end = at + data.len();
                anyhow::ensure!(end <= bytes.len(), "input {input} overflows the batch");
                bytes[at..end].copy_from_slice(data);
                at = end;
            }
            anyhow::ensure!(at == bytes.len(), "input {input} underfills the batch");
            joined.push(tensor.into_tvalue());
        }
        let values = state.run(joined)?;
        Outputs::new(self, values, rows)
    }

    /// Runs one request on a fresh state on the calling thread.
    pub(super) fn run_alone(&self, checked: Checked) -> tract::TractResult<Vec<Tensor>> {
        let mut state = self.spawn()?;
        let mut outputs = self.run(
            &mut state,
            std::iter::once(checked.inputs.as_slice()),
            checked.rows,
        )?;
        checked
            .outputs
            .iter()
            .map(|&o| outputs.cut(o, 0, checked.rows))
            .collect()
    }
}

/// A batch's outputs, cut back into each request's rows; each output's bytes are
/// copied once, on first use, into a buffer the requests' tensors share.
pub(super) struct Outputs<'p> {
    plan: &'p Plan,
    values: tract::TVec<tract::TValue>,
    bytes: Vec<Option<Bytes>>,
    rows: usize,
}

impl<'p> Outputs<'p> {
    fn new(
        plan: &'p Plan,
        values: tract::TVec<tract::TValue>,
        rows: usize,
    ) -> tract::TractResult<Self> {
        let specs = &plan.signature.outputs;
        anyhow::ensure!(
            values.len() == specs.len(),
            "the model gave {} outputs, not {}",
            values.len(),
            specs.len()
        );
        for (value, spec) in values.iter().zip(specs) {
            anyhow::ensure!(
                value.datum_type() == datum_type(spec.datatype),
                "output {:?} is {:?}, not {}",
                spec.name,
                value.datum_type(),
                spec.datatype.name()
            );
            if plan.batched {
                anyhow::ensure!(
                    value.shape().first() == Some(&rows),
                    "output {:?} has shape {:?} for a batch of {rows} rows",
                    spec.name,
                    value.shape()
                );
            }
        }
        Ok(Outputs {
            plan,
            bytes: vec![None; values.len()],
            values,
            rows,
        })
    }

    /// Output `output`'s rows `start..start + rows` (the whole output when the model
    /// is not batched), as a served tensor.
    pub(super) fn cut(
        &mut self,
        output: usize,
        start: usize,
        rows: usize,
    ) -> tract::TractResult<Tensor> {
        let value = &self.values[output];
        let bytes = match &self.bytes[output] {
            Some(bytes) => bytes.clone(),
            None => {
                let bytes = Bytes::copy_from_slice(value.try_as_plain_ram()?.as_bytes());
                self.bytes[output] = Some(bytes.clone());
                bytes
            }
        };
        let spec = &self.plan.signature.outputs[output];
        let mut shape = value.shape().to_vec();
        let data = if self.plan.batched {
            let row_bytes = bytes.len() / self.rows;
            shape[0] = rows;
            bytes.slice(start * row_bytes..(start + rows) * row_bytes)
        } else {
            bytes
        };
        Ok(Tensor {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape,
            data,
        })
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

/// `"a", "b"`: the names of specs, for error messages.
fn names(specs: &[Spec]) -> String {
    specs
        .iter()
        .map(|s| format!("{:?}", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::tests::{classifier, fp32};
    use super::*;
    use kiln_proto::onnx::{tensor_shape_proto::dimension::Value, type_proto, ModelProto};
    use prost::Message;

    /// The iris-sized classifier with every `batch` dimension of its inputs and
    /// outputs replaced by `dim`.
    fn with_batch_dim(dim: Value) -> Vec<u8> {
        let mut model = ModelProto::decode(&classifier(4, &[5], 3, 8)[..]).expect("our export");
        let graph = model.graph.as_mut().expect("a graph");
        for value in graph.input.iter_mut().chain(graph.output.iter_mut()) {
            let Some(type_proto::Value::TensorType(tensor)) =
                value.r#type.as_mut().and_then(|t| t.value.as_mut())
            else {
                panic!("a tensor type");
            };
            let shape = tensor.shape.as_mut().expect("a shape");
            shape.dim[0].value = Some(dim.clone());
        }
        model.encode_to_vec()
    }

    fn spec(name: &str, batch: i64, width: i64) -> Spec {
        Spec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![batch, width],
        }
    }

    #[test]
    fn a_fixed_first_dimension_runs_each_request_alone_with_that_many_rows() {
        let plan = inspect(&with_batch_dim(Value::DimValue(1))).expect("loads");
        assert!(!plan.batched());
        assert_eq!(plan.signature().inputs, vec![spec("input", 1, 4)]);
        assert_eq!(plan.signature().outputs[0], spec("output", 1, 3));
        plan.warm_up().expect("runs on zeros");

        let one = plan
            .check(vec![fp32("input", 1, &[0.5; 4])], None, 64)
            .expect("one row fits");
        assert_eq!(one.rows, 1);
        assert!(!plan.joinable(&one.inputs, &one.inputs));
        let outputs = plan.run_alone(one).expect("runs");
        assert_eq!(outputs[0].shape, [1, 3]);
        let sum: f32 = outputs[0]
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .sum();
        assert!((sum - 1.0).abs() < 1e-6, "probabilities sum to {sum}");

        let two = plan.check(vec![fp32("input", 2, &[0.5; 8])], None, 64);
        assert_eq!(
            two.map(drop),
            Err(Error::InvalidArgument(
                r#"input "input": expected shape [1, 4], got [2, 4]"#.into()
            ))
        );
    }

    #[test]
    fn an_unknown_or_renamed_first_dimension_becomes_the_batch() {
        for dim in [
            Value::DimParam("?".into()),
            Value::DimParam("N".into()),
            Value::DimParam("unk__7".into()),
        ] {
            let plan = inspect(&with_batch_dim(dim.clone())).expect("loads");
            assert!(plan.batched(), "{dim:?}");
            assert_eq!(plan.signature().inputs, vec![spec("input", -1, 4)]);
            assert_eq!(plan.signature().outputs[0], spec("output", -1, 3));
            let checked = plan
                .check(vec![fp32("input", 5, &[0.5; 20])], None, 64)
                .expect("five rows fit");
            assert_eq!(plan.run_alone(checked).expect("runs")[1].shape, [5, 3]);
        }
    }
}
