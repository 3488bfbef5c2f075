//! A model as the engine runs it: a loaded model of one of the engines (a
//! `Backend`), its [`Signature`], how each input's dimensions may vary, and the
//! data-only steps of a batch (check a request, join requests along the batch
//! dimension, cut the outputs back apart). Nothing here owns a thread or a clock.
//!
//! The model is *batched*, and requests are joined, only when every input and
//! every output starts with the batch dimension (how each engine finds it is in
//! its module); otherwise each request runs alone with exactly the shape the
//! model declares (a model exported with a batch of 1 takes requests of one row).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use kiln_common::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use super::backend::EngineKind;
use super::backend::{Backend, Dim, Loaded, Session};
use super::{onnxruntime, tract};
use crate::serving::{
    bytes_row_offsets, check_text, push_bytes_element, DataType, Signature, Spec, Tensor,
};
use kiln_proto::v1::Batching;

impl EngineKind {
    /// The engines this process can run: ONNX Runtime once its library is loaded
    /// ([`onnxruntime::init`]), tract always.
    pub fn available() -> Vec<EngineKind> {
        let mut kinds = Vec::with_capacity(2);
        if onnxruntime::loaded().is_some() {
            kinds.push(EngineKind::OnnxRuntime);
        }
        kinds.push(EngineKind::Tract);
        kinds
    }

    /// The engine a model runs on when none is named: ONNX Runtime where loaded,
    /// else tract.
    pub fn preferred() -> EngineKind {
        EngineKind::available()[0]
    }
}

/// A loaded model ready to run, with what requests must look like.
pub struct Plan {
    backend: Box<dyn Backend>,
    signature: Signature,
    dims: Vec<Vec<Dim>>,
    /// The most each input's dimensions may be (the deployment's limits).
    limits: Vec<Vec<Option<usize>>>,
    /// Why requests are not joined, when they are not; `None`: they are.
    unbatched: Option<String>,
    /// A session for runs past the batcher (the warm-up, [`Plan::run_alone`]);
    /// the first inference thread takes the warm-up's.
    spare: Mutex<Option<Box<dyn Session>>>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("engine", &self.backend.kind())
            .field("signature", &self.signature)
            .field("unbatched", &self.unbatched)
            .finish_non_exhaustive()
    }
}

/// A request that passed [`Plan::check`]: inputs in the model's order, the outputs
/// to return (indices into the signature's outputs) and its row count.
#[derive(Debug)]
pub(super) struct Checked {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<usize>,
    pub rows: usize,
}

/// An ONNX model as an engine loads it: the model file and, for a model saved
/// with external data, the files its tensors are kept in, each under the path
/// (relative to the model file's directory) the model names it by.
#[derive(Debug, Clone, Default)]
pub struct ModelFiles {
    pub onnx: Bytes,
    pub external: Vec<(String, Arc<[u8]>)>,
}

impl ModelFiles {
    /// A model whose tensors are all inside the file.
    pub fn inline(onnx: &[u8]) -> ModelFiles {
        ModelFiles {
            onnx: Bytes::copy_from_slice(onnx),
            external: Vec::new(),
        }
    }

    /// Reads the model file at `path` and the external data files it names from
    /// its directory. Blocking.
    pub fn read(path: &Path) -> Result<ModelFiles> {
        let onnx =
            std::fs::read(path).map_err(|e| invalid(format!("read {}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut external = Vec::new();
        for location in kiln_common::onnx::external_locations(&onnx)? {
            let file = dir.join(&location);
            let data = std::fs::read(&file).map_err(|e| {
                invalid(format!(
                    "the model keeps tensors in {location}, which cannot be read beside it ({}): {e}",
                    file.display()
                ))
            })?;
            external.push((location, Arc::from(data)));
        }
        Ok(ModelFiles {
            onnx: onnx.into(),
            external,
        })
    }
}

/// Loads an ONNX model on `engine`, whose runs may use `threads` threads; a file
/// the engine cannot load, or an input or output of a datatype kiln does not
/// serve, is an `InvalidArgument` carrying the reason. Blocking: optimising a
/// large model takes a while.
pub fn inspect(model: &ModelFiles, engine: EngineKind, threads: usize) -> Result<Plan> {
    inspect_declared(model, engine, threads, None, Batching::Probed)
}

/// [`inspect`] with batching as a deployment declares it: probed (requests are
/// joined when the shapes allow it and the probe agrees), off (each request
/// alone), or declared (joined without a probe; a model whose inputs and outputs
/// do not all start with one dynamic dimension is refused). With `gpu`, the
/// model runs on that GPU (ONNX Runtime's CUDA execution provider).
pub fn inspect_declared(
    model: &ModelFiles,
    engine: EngineKind,
    threads: usize,
    gpu: Option<u32>,
    batching: Batching,
) -> Result<Plan> {
    let loaded = load(model, engine, threads, gpu)?;
    let mut plan = Plan {
        backend: loaded.backend,
        signature: loaded.signature,
        dims: loaded.dims,
        limits: Vec::new(),
        unbatched: (!loaded.batched).then(|| {
            "not every input and output starts with the same dynamic (batch) dimension".into()
        }),
        spare: Mutex::new(loaded.first),
    };
    plan.limits = plan.dims.iter().map(|d| vec![None; d.len()]).collect();
    match batching {
        Batching::Off => {
            plan.unbatch("the deployment declares --max-batch-size 0 (no batching)".into())
        }
        Batching::Declared => {
            if let Some(why) = &plan.unbatched {
                return Err(invalid(format!(
                    "the deployment declares a batch (--max-batch-size N), but {why}; deploy it \
                     with --max-batch-size 0 to serve each request alone"
                )));
            }
        }
        Batching::Probed => {
            if let Some(reason) = plan.batched().then(|| plan.probe_batching()).flatten() {
                plan.unbatch(reason);
            }
        }
    }
    Ok(plan)
}

fn load(
    model: &ModelFiles,
    engine: EngineKind,
    threads: usize,
    gpu: Option<u32>,
) -> Result<Loaded> {
    match engine {
        EngineKind::OnnxRuntime => onnxruntime::load(model, threads, gpu),
        EngineKind::Tract if gpu.is_some() => Err(invalid(
            "tract serves on CPUs only; a replica with GPUs runs on onnxruntime".into(),
        )),
        EngineKind::Tract if !model.external.is_empty() => Err(invalid(
            kiln_common::onnx::TRACT_REFUSES_EXTERNAL_DATA.into(),
        )),
        EngineKind::Tract => tract::load(&model.onnx),
    }
}

/// Rows the batching probe serves together and one by one.
const PROBE_ROWS: usize = 3;

/// What the registry records of a model: what it takes and gives, as the first
/// engine of this process that loads it reads it (the preferred one first), and
/// each engine of this process that cannot load it, with why.
#[derive(Debug)]
pub struct Registration {
    pub signature: Signature,
    pub refused: Vec<(EngineKind, String)>,
}

/// Loads the model on every engine this process runs (see [`Registration`]); a
/// model none of them loads is an `InvalidArgument` with each one's reason.
/// Blocking.
pub fn registration(model: &ModelFiles) -> Result<Registration> {
    let mut signature = None;
    let mut refused = Vec::new();
    for kind in EngineKind::available() {
        match load(model, kind, 1, None) {
            Ok(loaded) => {
                signature.get_or_insert(loaded.signature);
            }
            Err(e) => refused.push((kind, e.to_string())),
        }
    }
    match signature {
        Some(signature) => Ok(Registration { signature, refused }),
        None => Err(invalid(
            refused
                .into_iter()
                .map(|(_, why)| why)
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

impl Plan {
    /// What the model takes and gives.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Returns true when requests are joined into batches (see the module docs).
    pub fn batched(&self) -> bool {
        self.unbatched.is_none()
    }

    /// Why requests are not joined into batches; `None` when they are.
    pub fn unbatched_reason(&self) -> Option<&str> {
        self.unbatched.as_deref()
    }

    /// Serves [`PROBE_ROWS`] random rows together and each alone; returns why
    /// they differ (the first dimension is then not a batch: a time axis, or a
    /// model that mixes rows, such as a normalisation over axis 0), or `None`
    /// when every row's answers agree.
    fn probe_batching(&self) -> Option<String> {
        let mut rng = StdRng::seed_from_u64(0x6b69_6c6e);
        let requests: Vec<Vec<Tensor>> = (0..PROBE_ROWS)
            .map(|_| {
                self.signature
                    .inputs
                    .iter()
                    .zip(&self.dims)
                    .map(|(spec, dims)| probe_input(spec, dims, &mut rng))
                    .collect()
            })
            .collect();
        let all: Vec<usize> = (0..self.signature.outputs.len()).collect();
        let probe = self.with_spare(|session| {
            let mut alone = Vec::with_capacity(PROBE_ROWS);
            for request in &requests {
                let mut outputs = self.run(session, std::iter::once(request.as_slice()), 1)?;
                let answer: Vec<Tensor> = all
                    .iter()
                    .map(|&o| outputs.cut(o, 0, 1))
                    .collect::<anyhow::Result<_>>()?;
                alone.push(answer);
            }
            let mut joined =
                self.run(session, requests.iter().map(|r| r.as_slice()), PROBE_ROWS)?;
            for (row, answer) in alone.iter().enumerate() {
                for (&o, want) in all.iter().zip(answer) {
                    let got = joined.cut(o, row, 1)?;
                    if !agree(&got, want) {
                        return Ok(Some(format!(
                            "output {:?} of a row served with others differs from the same row \
                             served alone, so the first dimension is not a batch",
                            want.name
                        )));
                    }
                }
            }
            Ok(None)
        });
        probe.unwrap_or_else(|e: anyhow::Error| {
            Some(format!("{PROBE_ROWS} rows served together fail: {e:#}"))
        })
    }

    /// Serves each request alone from now on: the first dimension is a free one.
    fn unbatch(&mut self, reason: String) {
        tracing::info!(%reason, "requests are served one by one");
        self.unbatched = Some(reason);
        for dims in &mut self.dims {
            for dim in dims.iter_mut().filter(|d| **d == Dim::Batch) {
                *dim = Dim::Var(":first".into());
            }
        }
    }

    /// Sets the most each named input's dimensions may be; a name that is not an
    /// input, or a limit of another rank, is refused.
    pub fn limit_inputs(&mut self, limits: &[(String, Vec<Option<usize>>)]) -> Result<()> {
        for (name, dims) in limits {
            let specs = &self.signature.inputs;
            let Some(index) = specs.iter().position(|s| &s.name == name) else {
                return Err(invalid(format!(
                    "the input limit names {name:?}, which is not an input of the model; it \
                     takes {}",
                    names(specs)
                )));
            };
            if dims.len() != self.dims[index].len() {
                return Err(invalid(format!(
                    "the input limit of {name:?} has {} dimensions; the input has {}",
                    dims.len(),
                    self.dims[index].len()
                )));
            }
            self.limits[index] = dims.clone();
        }
        Ok(())
    }

    /// Runs `f` on the spare session (made when there is none; kept afterwards).
    fn with_spare<T>(
        &self,
        f: impl FnOnce(&mut dyn Session) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut session = match self.take_spare() {
            Some(session) => session,
            None => self.backend.session()?,
        };
        let result = f(session.as_mut());
        *self.spare.lock().unwrap_or_else(PoisonError::into_inner) = Some(session);
        result
    }

    /// The engine the model runs on.
    pub fn kind(&self) -> EngineKind {
        self.backend.kind()
    }

    /// How many batches a replica of `threads` threads runs at once.
    pub(super) fn instances(&self, threads: usize) -> usize {
        self.backend.instances(threads).max(1)
    }

    /// An execution state for a thread: the warm-up's when it is still spare.
    pub(super) fn session(&self) -> anyhow::Result<Box<dyn Session>> {
        match self.take_spare() {
            Some(session) => Ok(session),
            None => self.backend.session(),
        }
    }

    fn take_spare(&self) -> Option<Box<dyn Session>> {
        self.spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Runs the model once on zeros, a batch of one row (every other variable
    /// dimension 1); a model that fails is refused.
    pub(super) fn warm_up(&self) -> Result<()> {
        let inputs = self
            .signature
            .inputs
            .iter()
            .zip(&self.dims)
            .map(|(spec, dims)| Tensor::zeros(&spec.name, spec.datatype, Dim::one_row(dims)))
            .collect();
        let checked = Checked {
            inputs,
            outputs: (0..self.signature.outputs.len()).collect(),
            rows: 1,
        };
        self.run_alone(checked).map(drop).map_err(|e| {
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
        let over = self.limits[index]
            .iter()
            .zip(&tensor.shape)
            .enumerate()
            .find_map(|(axis, (limit, &size))| limit.filter(|&l| size > l).map(|l| (axis, l)));
        if let Some((axis, limit)) = over {
            return Err(invalid(format!(
                "input {name:?}: dimension {axis} is {}, over the deployment's limit of {limit}",
                tensor.shape[axis]
            )));
        }
        if dims.first() == Some(&Dim::Batch) && tensor.shape[0] == 0 {
            return Err(invalid(format!(
                "input {name:?}: expected at least one row, got shape {:?}",
                tensor.shape
            )));
        }
        tensor
            .check_data()
            .map_err(|why| invalid(format!("input {name:?}: {why}")))?;
        // Strings reach ONNX Runtime (tract serves none) as text.
        if tensor.datatype == DataType::Bytes {
            check_text(&tensor.data).map_err(|why| {
                invalid(format!(
                    "input {name:?}: {why}; the model takes strings as text"
                ))
            })?;
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
        let mut seen: Vec<(&Dim, usize, &str, usize)> = Vec::with_capacity(4);
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
        self.batched()
            && first
                .iter()
                .zip(next)
                .all(|(a, b)| a.shape[1..] == b.shape[1..])
    }

    /// Runs requests' inputs (each in the model's order, all [`joinable`]) as one
    /// batch of `rows` rows: a request alone is passed as it is, several are
    /// copied once, request after request, into one buffer per input.
    ///
    /// [`joinable`]: Plan::joinable
    pub(super) fn run<'a, I>(
        &self,
        session: &mut dyn Session,
        requests: I,
        rows: usize,
    ) -> anyhow::Result<Outputs<'_>>
    where
        I: Iterator<Item = &'a [Tensor]> + Clone,
    {
        let mut joined = Vec::with_capacity(self.signature.inputs.len());
        for input in 0..self.signature.inputs.len() {
            let mut members = requests.clone().map(|r| &r[input]);
            let first = members
                .next()
                .ok_or_else(|| anyhow::format_err!("an empty batch"))?;
            if members.next().is_none() {
                joined.push(first.clone());
                continue;
            }
            let mut shape = first.shape.clone();
            if self.batched() {
                shape[0] = rows;
            }
            // BYTES elements carry their lengths, so they join as they are.
            let size: usize = requests.clone().map(|r| r[input].data.len()).sum();
            if let Some(element) = first.datatype.fixed_size() {
                let want = shape.iter().product::<usize>() * element;
                anyhow::ensure!(
                    size == want,
                    "input {input} has {size} bytes for a batch of {want}"
                );
            }
            let mut bytes = BytesMut::with_capacity(size);
            for request in requests.clone() {
                bytes.extend_from_slice(&request[input].data);
            }
            joined.push(Tensor {
                name: first.name.clone(),
                datatype: first.datatype,
                shape,
                data: bytes.freeze(),
            });
        }
        let values = session.run(joined)?;
        Outputs::new(self, values, rows)
    }

    /// Runs one request past the batcher on the calling thread, on the spare
    /// session (made when there is none; kept for the next call).
    pub(super) fn run_alone(&self, checked: Checked) -> anyhow::Result<Vec<Tensor>> {
        self.with_spare(|session| {
            let mut outputs = self.run(
                session,
                std::iter::once(checked.inputs.as_slice()),
                checked.rows,
            )?;
            checked
                .outputs
                .iter()
                .map(|&o| outputs.cut(o, 0, checked.rows))
                .collect()
        })
    }
}

/// A batch's outputs, cut back into each request's rows (slices of one buffer per
/// output, which the requests' tensors share).
pub(super) struct Outputs<'p> {
    plan: &'p Plan,
    values: Vec<Tensor>,
    rows: usize,
    /// For each BYTES output of a batch, where each row starts (and the data's
    /// end), walked once; `None` for the others.
    row_offsets: Vec<Option<Vec<usize>>>,
}

impl<'p> Outputs<'p> {
    fn new(plan: &'p Plan, values: Vec<Tensor>, rows: usize) -> anyhow::Result<Self> {
        let specs = &plan.signature.outputs;
        anyhow::ensure!(
            values.len() == specs.len(),
            "the model gave {} outputs, not {}",
            values.len(),
            specs.len()
        );
        let mut row_offsets = Vec::with_capacity(values.len());
        for (value, spec) in values.iter().zip(specs) {
            anyhow::ensure!(
                value.datatype == spec.datatype,
                "output {:?} is {}, not {}",
                spec.name,
                value.datatype.name(),
                spec.datatype.name()
            );
            if plan.batched() {
                anyhow::ensure!(
                    value.shape.first() == Some(&rows),
                    "output {:?} has shape {:?} for a batch of {rows} rows",
                    spec.name,
                    value.shape
                );
            }
            let per_row = value.shape.iter().skip(1).product::<usize>();
            row_offsets.push(match value.datatype.fixed_size() {
                None if plan.batched() && rows > 1 && per_row > 0 => Some(
                    bytes_row_offsets(&value.data, per_row)
                        .map_err(|e| anyhow::format_err!("output {:?}: {e}", spec.name))?,
                ),
                _ => None,
            });
        }
        Ok(Outputs {
            plan,
            values,
            rows,
            row_offsets,
        })
    }

    /// Output `output`'s rows `start..start + rows` (the whole output when the model
    /// is not batched), as a served tensor.
    pub(super) fn cut(
        &mut self,
        output: usize,
        start: usize,
        rows: usize,
    ) -> anyhow::Result<Tensor> {
        let value = &self.values[output];
        let spec = &self.plan.signature.outputs[output];
        let mut shape = value.shape.clone();
        let data = if self.plan.batched() && rows != self.rows {
            shape[0] = rows;
            let (from, to) = match &self.row_offsets[output] {
                None if value.datatype.fixed_size().is_none() => (0, 0), // rows of no elements
                None => {
                    let row_bytes = value.data.len() / self.rows;
                    (start * row_bytes, (start + rows) * row_bytes)
                }
                Some(offsets) => {
                    let at = |row: usize| {
                        offsets.get(row).copied().ok_or_else(|| {
                            anyhow::format_err!("output {:?} has no row {row}", spec.name)
                        })
                    };
                    (at(start)?, at(start + rows)?)
                }
            };
            value.data.slice(from..to)
        } else {
            value.data.clone()
        };
        Ok(Tensor {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape,
            data,
        })
    }
}

/// A random probe input of one row (every other variable dimension 1): floats in
/// [-1, 1), integers and booleans 0 or 1 (valid as indices and masks).
fn probe_input(spec: &Spec, dims: &[Dim], rng: &mut StdRng) -> Tensor {
    let shape = Dim::one_row(dims);
    let count: usize = shape.iter().product();
    let size = spec.datatype.min_size();
    let mut data = Vec::with_capacity(count * size);
    for _ in 0..count {
        match spec.datatype {
            DataType::Bytes => {
                const WORDS: [&str; 4] = ["the", "model", "serves", "text"];
                push_bytes_element(&mut data, WORDS[rng.gen_range(0..WORDS.len())].as_bytes())
            }
            DataType::Fp32 => data.extend_from_slice(&rng.gen_range(-1.0f32..1.0).to_le_bytes()),
            DataType::Fp64 => data.extend_from_slice(&rng.gen_range(-1.0f64..1.0).to_le_bytes()),
            DataType::Fp16 => {
                data.extend_from_slice(&half::f16::from_f32(rng.gen_range(-1.0..1.0)).to_le_bytes())
            }
            DataType::Bf16 => data
                .extend_from_slice(&half::bf16::from_f32(rng.gen_range(-1.0..1.0)).to_le_bytes()),
            _ => {
                let mut element = vec![0u8; size];
                element[0] = rng.gen_range(0..2);
                data.extend_from_slice(&element);
            }
        }
    }
    Tensor {
        name: spec.name.clone(),
        datatype: spec.datatype,
        shape,
        data: data.into(),
    }
}

/// Returns true when two answers for the same row agree: floats within 1e-4 plus
/// 1e-3 relative (another batch size may take another kernel; 1e-2 for the 16-bit
/// floats), the rest exactly.
fn agree(got: &Tensor, want: &Tensor) -> bool {
    if got.shape != want.shape || got.data.len() != want.data.len() {
        return false;
    }
    let relative = match want.datatype {
        DataType::Fp32 | DataType::Fp64 => 1e-3,
        DataType::Fp16 | DataType::Bf16 => 1e-2,
        _ => return got.data == want.data,
    };
    got.values_f64()
        .iter()
        .zip(want.values_f64())
        .all(|(a, b)| (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-4 + relative * b.abs())
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

    /// The iris-sized classifier fed `x - mean(x, axis 0)`: each row's answer
    /// depends on the other rows of its batch.
    fn normalised_over_axis_0() -> Vec<u8> {
        use kiln_proto::onnx::{attribute_proto::AttributeType, AttributeProto, NodeProto};
        let mut model = ModelProto::decode(&classifier(4, &[5], 3, 8)[..]).expect("our export");
        let graph = model.graph.as_mut().expect("a graph");
        graph.input[0].name = "raw".into();
        let node = |op: &str, inputs: &[&str], output: &str, attribute| NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|i| i.to_string()).collect(),
            output: vec![output.into()],
            name: output.into(),
            attribute,
            ..Default::default()
        };
        let axes = AttributeProto {
            name: "axes".into(),
            ints: vec![0],
            r#type: AttributeType::Ints as i32,
            ..Default::default()
        };
        let mut nodes = vec![
            node("ReduceMean", &["raw"], "raw.mean", vec![axes]),
            node("Sub", &["raw", "raw.mean"], "input", vec![]),
        ];
        nodes.append(&mut graph.node);
        graph.node = nodes;
        model.encode_to_vec()
    }

    #[test]
    fn a_model_that_mixes_the_rows_of_a_batch_serves_each_request_alone() {
        let plan = inspect(
            &ModelFiles::inline(&normalised_over_axis_0()),
            EngineKind::Tract,
            1,
        )
        .expect("loads");
        assert!(!plan.batched());
        let reason = plan.unbatched_reason().expect("a reason");
        assert!(
            reason.contains("differs from the same row served alone"),
            "{reason}"
        );
        // A request of several rows still runs, as one request.
        let checked = plan
            .check(vec![fp32("raw", 100, &[0.5; 400])], None, 64)
            .expect("a request of 100 rows is one request, not a batch");
        assert!(!plan.joinable(&checked.inputs, &checked.inputs));
        assert_eq!(plan.run_alone(checked).expect("runs")[0].shape, [100, 3]);

        // The model it was made from batches.
        let plain = inspect(
            &ModelFiles::inline(&classifier(4, &[5], 3, 8)),
            EngineKind::Tract,
            1,
        )
        .expect("loads");
        assert!(plain.batched());
        assert_eq!(plain.unbatched_reason(), None);
    }

    #[test]
    fn declared_batching_is_followed_without_a_probe_and_refused_where_impossible() {
        let mixing = ModelFiles::inline(&normalised_over_axis_0());
        // Declared: joined as the deployment says, though the probe would not.
        let declared = inspect_declared(&mixing, EngineKind::Tract, 1, None, Batching::Declared)
            .expect("loads");
        assert!(declared.batched());
        // Off: a model that could batch serves each request alone, and says why.
        let plain = ModelFiles::inline(&classifier(4, &[5], 3, 8));
        let off =
            inspect_declared(&plain, EngineKind::Tract, 1, None, Batching::Off).expect("loads");
        assert!(!off.batched());
        assert!(
            off.unbatched_reason()
                .is_some_and(|r| r.contains("--max-batch-size 0")),
            "{off:?}"
        );
        let checked = off
            .check(vec![fp32("input", 3, &[0.5; 12])], None, 1)
            .expect("three rows are one request");
        assert!(!off.joinable(&checked.inputs, &checked.inputs));
        // Declared on a model whose first dimension is fixed: refused with why.
        let fixed = ModelFiles::inline(&with_batch_dim(Value::DimValue(1)));
        let refused = inspect_declared(&fixed, EngineKind::Tract, 1, None, Batching::Declared);
        assert!(
            matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains("--max-batch-size 0")),
            "{refused:?}"
        );
    }

    #[test]
    fn an_input_over_its_limit_is_refused_naming_the_input_and_the_dimension() {
        let mut plan = inspect(
            &ModelFiles::inline(&classifier(4, &[5], 3, 8)),
            EngineKind::Tract,
            1,
        )
        .expect("loads");
        let unknown = plan.limit_inputs(&[("x".into(), vec![Some(2), None])]);
        assert!(
            matches!(&unknown, Err(Error::InvalidArgument(m)) if m.contains("\"x\", which is not an input")),
            "{unknown:?}"
        );
        let rank = plan.limit_inputs(&[("input".into(), vec![Some(2)])]);
        assert!(matches!(rank, Err(Error::InvalidArgument(_))), "{rank:?}");
        plan.limit_inputs(&[("input".into(), vec![Some(2), None])])
            .expect("a limit on the rows");
        plan.check(vec![fp32("input", 2, &[0.5; 8])], None, 64)
            .expect("two rows are within the limit");
        assert_eq!(
            plan.check(vec![fp32("input", 3, &[0.5; 12])], None, 64)
                .map(drop),
            Err(Error::InvalidArgument(
                r#"input "input": dimension 0 is 3, over the deployment's limit of 2"#.into()
            ))
        );
    }

    #[test]
    fn a_fixed_first_dimension_runs_each_request_alone_with_that_many_rows() {
        let plan = inspect(
            &ModelFiles::inline(&with_batch_dim(Value::DimValue(1))),
            EngineKind::Tract,
            1,
        )
        .expect("loads");
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
            let plan = inspect(
                &ModelFiles::inline(&with_batch_dim(dim.clone())),
                EngineKind::Tract,
                1,
            )
            .expect("loads");
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
