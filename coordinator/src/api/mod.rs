//! The coordinator's APIs: gRPC (Raft transport, client and worker calls) and HTTP
//! (status JSON, Prometheus metrics).

pub mod artifacts;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod models;
pub mod tracking;

/// A storage failure as the error a caller sees.
pub(crate) fn storage(e: impl std::fmt::Display) -> kiln_common::Error {
    kiln_common::Error::Internal(e.to_string())
}
