//! Training on a worker: the pieces a data-parallel shard is built from.
//!
//! - `data`: a CSV table as a feature matrix and a target (classes or values),
//!   standardisation statistics over the whole table, each rank's rows.
//! - `optim`: SGD with momentum and AdamW over flat parameter buffers, with state
//!   that checkpoints and resumes exactly.
//!
//! The shard loop (data from the artifact store, the model, the all-reduce through
//! [`crate::collective`], checkpoints) joins them.

pub mod arch;
pub mod data;
pub mod optim;
