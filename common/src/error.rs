//! The errors a caller of the cluster must tell apart, and their single mapping to
//! and from `tonic::Status`.
//!
//! A follower answers a write with [`Error::NotLeader`] carrying the leader's address
//! in the `x-kiln-leader` metadata key, so that clients can follow it; every other
//! case maps to one gRPC code and back.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// Metadata key that carries the leader's gRPC address on a not-leader answer.
pub const LEADER_ADDR_KEY: &str = "x-kiln-leader";
/// Metadata key that carries the leader's id on a not-leader answer.
pub const LEADER_ID_KEY: &str = "x-kiln-leader-id";
/// Metadata key that marks an error as a quorum loss.
pub const NO_QUORUM_KEY: &str = "x-kiln-no-quorum";

/// A result with a kiln [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The failures a caller must tell apart.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// This node does not lead; the leader is named when known.
    #[error("not the leader{}", leader_hint(*.leader_id, .leader_addr))]
    NotLeader {
        leader_id: u64,
        leader_addr: Option<String>,
    },
    /// No quorum of coordinators is reachable, so nothing can commit.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The request did not complete within its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The request is malformed or names something impossible.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller did not prove who it is (no or a bad certificate or token).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller went over a limit (a rate limit or a bounded queue); it should
    /// slow down. Not retried by [`crate::client::ClusterClient`], so that the
    /// caller sees it.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The node is overloaded or shutting down; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Stored bytes failed their check (a corrupt chunk); another replica may hold
    /// good ones.
    #[error("data loss: {0}")]
    DataLoss(String),
    /// Anything else: a bug or a storage failure on the server.
    #[error("internal error: {0}")]
    Internal(String),
}

fn leader_hint(leader_id: u64, leader_addr: &Option<String>) -> String {
    match (leader_id, leader_addr) {
        (0, _) => "; no leader is known".to_string(),
        (id, Some(addr)) => format!("; leader is {id} at {addr}"),
        (id, None) => format!("; leader is {id}"),
    }
}

impl Error {
    /// Returns true when retrying on another coordinator or later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. } | Error::NoQuorum(_) | Error::Unavailable(_)
        )
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match &err {
            Error::NotLeader {
                leader_id,
                leader_addr,
            } => {
                let mut status = Status::new(Code::FailedPrecondition, err.to_string());
                if let Ok(v) = MetadataValue::try_from(leader_id.to_string()) {
                    status.metadata_mut().insert(LEADER_ID_KEY, v);
                }
                if let Some(addr) = leader_addr {
                    if let Ok(v) = MetadataValue::try_from(addr.as_str()) {
                        status.metadata_mut().insert(LEADER_ADDR_KEY, v);
                    }
                }
                status
            }
            Error::NoQuorum(msg) => {
                let mut status = Status::new(Code::Unavailable, format!("no quorum: {msg}"));
                status
                    .metadata_mut()
                    .insert(NO_QUORUM_KEY, MetadataValue::from_static("1"));
                status
            }
            Error::Timeout(msg) => Status::new(Code::DeadlineExceeded, msg.clone()),
            Error::InvalidArgument(msg) => Status::new(Code::InvalidArgument, msg.clone()),
            Error::NotFound(msg) => Status::new(Code::NotFound, msg.clone()),
            Error::Unauthenticated(msg) => Status::new(Code::Unauthenticated, msg.clone()),
            Error::PermissionDenied(msg) => Status::new(Code::PermissionDenied, msg.clone()),
            Error::ResourceExhausted(msg) => Status::new(Code::ResourceExhausted, msg.clone()),
            Error::Unavailable(msg) => Status::new(Code::Unavailable, msg.clone()),
            Error::DataLoss(msg) => Status::new(Code::DataLoss, msg.clone()),
            Error::Internal(msg) => Status::new(Code::Internal, msg.clone()),
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        let meta = status.metadata();
        let text = |key: &str| {
            meta.get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if status.code() == Code::FailedPrecondition {
            if let Some(id) = text(LEADER_ID_KEY) {
                return Error::NotLeader {
                    leader_id: id.parse().unwrap_or(0),
                    leader_addr: text(LEADER_ADDR_KEY),
                };
            }
        }
        if meta.get(NO_QUORUM_KEY).is_some() {
            let msg = status.message();
            return Error::NoQuorum(msg.strip_prefix("no quorum: ").unwrap_or(msg).to_string());
        }
        let msg = status.message().to_string();
        match status.code() {
            Code::DeadlineExceeded | Code::Cancelled => Error::Timeout(msg),
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(msg),
            Code::NotFound => Error::NotFound(msg),
            Code::Unauthenticated => Error::Unauthenticated(msg),
            Code::PermissionDenied => Error::PermissionDenied(msg),
            Code::ResourceExhausted => Error::ResourceExhausted(msg),
            Code::DataLoss => Error::DataLoss(msg),
            Code::Unavailable | Code::Aborted | Code::Unknown => {
                Error::Unavailable(if msg.is_empty() {
                    format!("{:?}", status.code())
                } else {
                    msg
                })
            }
            _ => Error::Internal(msg),
        }
    }
}

/// The message of a caught panic's payload (a `&str` or a `String`), as the panic
/// hook prints it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_survives_the_wire() {
        let err = Error::NotLeader {
            leader_id: 2,
            leader_addr: Some("127.0.0.1:7072".into()),
        };
        let back = Error::from(Status::from(err.clone()));
        assert_eq!(back, err);
        assert!(back.to_string().contains("leader is 2 at 127.0.0.1:7072"));
    }

    #[test]
    fn no_quorum_survives_the_wire() {
        let err = Error::NoQuorum("1 of 3 coordinators reachable".into());
        let back = Error::from(Status::from(err.clone()));
        assert_eq!(back, err);
        assert!(back.to_string().starts_with("no quorum"));
    }

    #[test]
    fn plain_codes_map_back() {
        let back = Error::from(Status::from(Error::InvalidArgument("bad key".into())));
        assert_eq!(back, Error::InvalidArgument("bad key".into()));
        assert!(!back.is_retryable());
        let back = Error::from(Status::from(Error::ResourceExhausted("slow down".into())));
        assert_eq!(back, Error::ResourceExhausted("slow down".into()));
        assert!(!back.is_retryable());
    }
}
