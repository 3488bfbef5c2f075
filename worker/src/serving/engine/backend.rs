//! What an engine is to the rest of serving: which engines there are
//! ([`EngineKind`]), a model one of them loaded (`Backend`), a thread's way to run
//! it (`Session`) and how each input's dimensions may vary (`Dim`). `plan` runs
//! models through these; `onnxruntime` and `tract` implement them.

use kiln_common::{Error, Result};

use crate::serving::{Signature, Tensor};

/// The inference engines a replica can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// ONNX Runtime, loaded at run time from the library the worker was given.
    OnnxRuntime,
    /// tract, built into kiln: the fallback that needs no library.
    Tract,
}

impl EngineKind {
    /// The name in flags and listings.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::OnnxRuntime => "onnxruntime",
            EngineKind::Tract => "tract",
        }
    }

    /// Parses `onnxruntime` or `tract`.
    pub fn parse(name: &str) -> Result<EngineKind> {
        match name {
            "onnxruntime" => Ok(EngineKind::OnnxRuntime),
            "tract" => Ok(EngineKind::Tract),
            other => Err(Error::InvalidArgument(format!(
                "engine {other:?} is not known; use onnxruntime or tract"
            ))),
        }
    }
}

/// A model loaded by one engine.
pub(super) trait Backend: Send + Sync {
    fn kind(&self) -> EngineKind;
    /// How many batches a replica of `threads` threads runs at once.
    fn instances(&self, threads: usize) -> usize;
    /// A fresh execution state, which a thread keeps between runs.
    fn session(&self) -> anyhow::Result<Box<dyn Session>>;
}

/// One thread's way to run the model.
pub(super) trait Session: Send {
    /// Runs the model on `inputs` (in the model's order, each with its shape) and
    /// returns every output in the model's order (names are the plan's business).
    fn run(&mut self, inputs: Vec<Tensor>) -> anyhow::Result<Vec<Tensor>>;
}

/// What an engine's loader gives.
pub(super) struct Loaded {
    pub backend: Box<dyn Backend>,
    /// A session the loader made anyway (ONNX Runtime reads the signature from
    /// one): the plan's first spare, so the model is not committed twice.
    pub first: Option<Box<dyn Session>>,
    pub signature: Signature,
    /// Each input's dimensions, in the model's input order.
    pub dims: Vec<Vec<Dim>>,
    /// Every input and output starts with the batch dimension.
    pub batched: bool,
}

/// How one dimension of an input may vary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Dim {
    /// The batch dimension: any number of rows from 1 up to the engine's limit,
    /// the same in every input.
    Batch,
    /// Exactly this size.
    Fixed(usize),
    /// Any size, the same wherever the same symbol (or expression) appears.
    Var(String),
}

impl Dim {
    /// The shape of one row: fixed sizes, 1 for the others.
    pub fn one_row(dims: &[Dim]) -> Vec<usize> {
        dims.iter()
            .map(|d| match d {
                Dim::Fixed(size) => *size,
                Dim::Batch | Dim::Var(_) => 1,
            })
            .collect()
    }

    /// A spec's shape: fixed sizes, -1 for the others.
    pub fn spec_shape(dims: &[Dim]) -> Vec<i64> {
        dims.iter()
            .map(|d| match d {
                Dim::Fixed(size) => *size as i64,
                Dim::Batch | Dim::Var(_) => -1,
            })
            .collect()
    }
}
