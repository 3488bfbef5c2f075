//! Pieces every kiln HTTP server shares: the JSON error body and its status code,
//! and reading a bearer token.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::Error;

/// Returns the HTTP status that matches an error.
pub fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
        Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Internal(_) | Error::DataLoss(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::NotLeader { .. } | Error::NoQuorum(_) | Error::Unavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// Answers an error as `{"error": "..."}` with its status; a 401 names the
/// scheme it wants (`WWW-Authenticate: Bearer`).
pub fn error_response(e: &Error) -> Response {
    let code = status_of(e);
    let body = Json(serde_json::json!({ "error": e.to_string() }));
    if code == StatusCode::UNAUTHORIZED {
        (code, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
    } else {
        (code, body).into_response()
    }
}

/// Returns the `authorization` header, when it is text.
pub fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()
}
