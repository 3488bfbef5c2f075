//! Types that coordinators, workers and the CLI share.
//!
//! Layout:
//! - `artifact`: artifact names, tags and `NAME@REF` references.
//! - `auth`: bearer tokens, roles, the workers' [`auth::TokenBook`] and per-caller
//!   rate limits.
//! - `error`: [`Error`], the failures a caller must tell apart, and their one mapping
//!   to and from gRPC status codes.
//! - `config`: coordinator and worker configuration from TOML, flags and `KILN_*`
//!   variables, validated with errors that name the bad key.
//! - `chunking`: content-defined chunks (FastCDC) named by BLAKE3, read from any
//!   stream through a bounded window.
//! - `client`: [`client::ClusterClient`], which finds the leader by itself, follows
//!   leader hints and retries within a bounded deadline.
//! - `drift`: the drift statistics (equal to scipy's) and the verdict of a window
//!   from the mergeable counts replicas keep in each column's reference bins.
//! - `http`: the JSON error body and status codes every HTTP server answers with.
//! - `https`: the server loop of every HTTP port (HTTPS with the node's cluster
//!   certificate, plain HTTP only with `--insecure`) and the one HTTP client.
//! - `jobspec`: the training job spec, checked whole, every problem named.
//! - `reference`: a model's reference statistics for drift detection: frozen
//!   quantile bins, training counts and moments per feature and prediction column.
//! - `logging`: the `tracing` subscriber every role installs.
//! - `clock`: wall-clock milliseconds, read only by proposers, never by apply.

pub mod artifact;
pub mod auth;
pub mod chunking;
pub mod client;
pub mod clock;
pub mod config;
pub mod drift;
pub mod error;
pub mod http;
pub mod https;
pub mod jobspec;
pub mod logging;
pub mod onnx;
pub mod progress;
pub mod reference;
pub mod status;
pub mod tls;
pub mod transfer;

pub use error::{panic_message, Error, Result};
