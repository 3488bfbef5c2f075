//! Training on a worker: the pieces a data-parallel shard is built from.
//!
//! - `data`: a CSV table as a feature matrix and a target (classes or values),
//!   standardisation statistics over the whole table, each rank's rows.
//! - `onnx`: the trained network, its standardisation and its class names as one
//!   self-contained ONNX model for serving.
//! - `optim`: SGD with momentum and AdamW over flat parameter buffers, with state
//!   that checkpoints and resumes exactly.
//!
//! The shard loop (data from the artifact store, the model, the all-reduce through
//! [`crate::collective`], checkpoints) joins them.

pub mod arch;
pub mod checkpoint;
pub mod data;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod shard;
pub mod supervisor;
