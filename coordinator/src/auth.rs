//! Who may call the coordinator: a cluster node by its certificate, or a token
//! holder checked against the tokens in this coordinator's replicated state, so a
//! revocation holds here as soon as this coordinator has applied it. The token
//! rules themselves live in [`kiln_common::auth`].

use kiln_common::{Error, Result};

pub use kiln_common::auth::{claimed_name, grpc_authorization, mint, validate_name};
pub use kiln_common::auth::{Caller, Permission, RateLimiter, Scope};

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
    verify(authorization, reader, need, None, now_ms)
}

/// [`authorize_bearer`] for an endpoint about one run or experiment: a job's
/// own token passes for its run (see [`kiln_common::auth::verify_bearer_scoped`]).
pub fn authorize_bearer_scoped(
    authorization: Option<&str>,
    reader: &StateReader,
    need: Permission,
    scope: Scope<'_>,
    now_ms: u64,
) -> Result<Caller> {
    verify(authorization, reader, need, Some(scope), now_ms)
}

/// Checks a bearer header against the tokens this coordinator has applied.
fn verify(
    authorization: Option<&str>,
    reader: &StateReader,
    need: Permission,
    scope: Option<Scope<'_>>,
    now_ms: u64,
) -> Result<Caller> {
    kiln_common::auth::verify_bearer_scoped(
        authorization,
        |name| {
            reader
                .token(name)
                .map_err(|e| Error::Internal(e.to_string()))
        },
        need,
        scope,
        now_ms,
    )
}
