//! The coordinator's APIs: gRPC (Raft transport, client and worker calls) and HTTP
//! (status JSON, Prometheus metrics).

pub mod artifacts;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod models;
pub mod tracking;
