//! Who may call the coordinator: a cluster node by its certificate, or a token
//! holder checked against the tokens in this coordinator's replicated state, so a
//! revocation holds here as soon as this coordinator has applied it. The token
//! rules themselves live in [`kiln_common::auth`].

use kiln_common::{Error, Result};

pub use kiln_common::auth::{claimed_name, grpc_authorization, mint, validate_name};
pub use kiln_common::auth::{Caller, Permission, RateLimiter};

use crate::state::reader::StateReader;

/// Returns the caller of a gRPC `request`, or an error when it may not do `need`.
pub fn authorize<T>(
    request: &tonic::Request<T>,
    tls_enabled: bool,
    reader: &StateReader,
    need: Permission,
    now_ms: u64,
) -> Result<Caller> {
    if !tls_enabled {
        return Ok(Caller::Insecure);
    }
    if kiln_common::tls::is_node(request) {
        return Ok(Caller::Node);
    }
    authorize_bearer(grpc_authorization(request), reader, need, now_ms)
}

/// Returns the caller that an `authorization` header names (HTTP has no client
/// certificates), or an error when it may not do `need`.
pub fn authorize_bearer(
    authorization: Option<&str>,
    reader: &StateReader,
    need: Permission,
    now_ms: u64,
) -> Result<Caller> {
    kiln_common::auth::verify_bearer(
        authorization,
        |name| {
            reader
                .token(name)
                .map_err(|e| Error::Internal(e.to_string()))
        },
        need,
        now_ms,
    )
}
