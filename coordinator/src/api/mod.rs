//! The coordinator's APIs: gRPC (Raft transport, client and worker calls) and HTTP
//! (status JSON, Prometheus metrics, the dashboard).

pub mod artifacts;
pub mod dashboard;
pub mod deployments;
pub mod drift;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod live;
pub mod logged_models;
pub mod mlflow_artifacts;
pub mod models;
pub mod registry;
pub mod retrain;
pub mod search;
pub mod tracking;

/// A storage failure as the error a caller sees.
pub(crate) fn storage(e: impl std::fmt::Display) -> kiln_common::Error {
    kiln_common::Error::Internal(e.to_string())
}

/// Maps a rejection's code prefix to the error a caller sees.
pub(crate) fn rejection(e: kiln_common::Error) -> kiln_common::Error {
    match e {
        kiln_common::Error::InvalidArgument(msg) => {
            if let Some(rest) = msg.strip_prefix("NOT_FOUND: ") {
                kiln_common::Error::NotFound(rest.to_string())
            } else if let Some(rest) = msg.strip_prefix("FAILED_PRECONDITION: ") {
                kiln_common::Error::InvalidArgument(rest.to_string())
            } else {
                kiln_common::Error::InvalidArgument(msg)
            }
        }
        other => other,
    }
}
