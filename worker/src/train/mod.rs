//! Training on a worker: the pieces a data-parallel shard is built from.
//!
//! - `arch`: the network's shape and the flat parameter layout every rank,
//!   checkpoint and export shares.
//! - `bench`: the training-speed benchmark (one shard's step on a reference MLP).
//! - `checkpoint`: a shard's training state as one safetensors file.
//! - `command`: a rank of a command job, the user's own program as a process
//!   group with torchrun's environment (the other way a shard runs).
//! - `data`: a CSV or Parquet table as a feature matrix and a target (classes or
//!   values), standardisation statistics over the whole table, each rank's rows.
//! - `onnx`: the trained network, its standardisation and its class names as one
//!   self-contained ONNX model for serving.
//! - `limits`: command jobs' ranks held to `memory_mib_per_shard` through
//!   the kernel's memory controller (cgroup v1 or v2), where the worker may.
//! - `model`: the network's parameters as one flat buffer and its forward and
//!   backward pass through candle; gradients come back in the flat layout.
//! - `optim`: SGD with momentum and AdamW over flat parameter buffers, with state
//!   that checkpoints and resumes exactly.
//! - `shard`: one shard of a job from its task to its last report (data from the
//!   artifact store, the model, the all-reduce through [`crate::collective`],
//!   checkpoints, the model's publication); `supervisor` starts and stops shards
//!   as the heartbeat answers list them.

pub mod arch;
pub mod bench;
pub mod checkpoint;
pub mod command;
pub mod data;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod limits;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod sgemm;
pub mod shard;
pub mod supervisor;
