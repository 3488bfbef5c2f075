//! The coordinator's HTTP endpoints: `GET /api/v1/status` (the status JSON of
//! DESIGN §6), `GET /health`, `GET /metrics` (Prometheus text format) and the
//! experiment tracking API under `/api/2.0/mlflow` (see `tracking`) and the
//! dashboard under `/ui` (see `dashboard`, which checks its own token cookie).
//!
//! With TLS on the gRPC port, every endpoint but `/health` (a liveness probe that
//! tells nothing but role and term) needs a bearer token with the viewer role or
//! more: 401 without a valid one, 403 for a role that may not read.

use std::fmt::Write as _;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kiln_common::clock::now_ms;
use kiln_common::http::{authorization, error_response};
use kiln_common::status::cluster_status_json;

use super::grpc::Api;
use crate::auth::{self, Permission};

/// Largest request body accepted where a route sets no bound of its own (the
/// tracking API allows more; artifact uploads stream theirs).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Builds the HTTP router.
pub fn router(api: Api) -> Router {
    let guarded = Router::new()
        .route("/api/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_viewer,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(guarded)
        .merge(super::tracking::routes())
        .merge(super::mlflow_artifacts::routes())
        .merge(super::logged_models::routes())
        .merge(super::registry::routes())
        .merge(super::dashboard::routes(api.clone()))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// Lets a request through when its bearer token may read cluster state.
async fn require_viewer(State(api): State<Api>, request: Request, next: Next) -> Response {
    if api.tls_enabled {
        let header = authorization(request.headers());
        let caller = auth::authorize_bearer(header, &api.reader, Permission::Read, now_ms());
        if let Err(e) = api.admit(caller, header, Permission::Read, request.uri().path()) {
            return error_response(&e);
        }
    }
    next.run(request).await
}

/// Answers an unknown path with a JSON 404 (MLflow's client reads it as
/// ENDPOINT_NOT_FOUND).
async fn not_found(request: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({
            "error_code": "ENDPOINT_NOT_FOUND",
            "message": format!("no endpoint {} {}", request.method(), request.uri().path()),
        })),
    )
        .into_response()
}

async fn status(State(api): State<Api>) -> Response {
    match api.cluster_status().await {
        Ok(s) => Json(cluster_status_json(&s)).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn health(State(api): State<Api>) -> Response {
    let view = api.node.view();
    let body = serde_json::json!({
        "id": view.id,
        "role": view.role,
        "leader_id": view.leader_id,
        "term": view.term,
    });
    let code = if view.leader_id != 0 && !view.removed {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    let v = api.node.view();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge("kiln_raft_term", "Current Raft term.", v.term);
    gauge(
        "kiln_raft_leader_id",
        "Id of the known leader (0 when none).",
        v.leader_id,
    );
    gauge(
        "kiln_raft_is_leader",
        "1 when this coordinator leads.",
        u64::from(v.is_leader()),
    );
    gauge(
        "kiln_raft_commit_index",
        "Highest committed log index.",
        v.commit_index,
    );
    gauge(
        "kiln_raft_applied_index",
        "Highest applied log index.",
        v.applied_index,
    );
    gauge(
        "kiln_raft_first_index",
        "First index kept in the log.",
        v.first_index,
    );
    gauge(
        "kiln_raft_last_index",
        "Last index in the log.",
        v.last_index,
    );
    gauge("kiln_raft_voters", "Voting members.", v.voters.len() as u64);
    gauge("kiln_raft_learners", "Learners.", v.learners.len() as u64);
    gauge(
        "kiln_raft_snapshots_received_total",
        "Snapshots installed from a leader.",
        v.snapshots_received,
    );
    let _ = writeln!(
        out,
        "# HELP kiln_rate_limited_total Calls refused for going over a token's rate limit.\n\
         # TYPE kiln_rate_limited_total counter\nkiln_rate_limited_total {}",
        api.limiter.refused()
    );
    if let Ok(workers) = api.reader.workers() {
        let _ = writeln!(
            out,
            "# HELP kiln_workers Registered workers by state.\n# TYPE kiln_workers gauge"
        );
        for state in ["alive", "suspect", "down"] {
            let n = workers
                .iter()
                .filter(|w| kiln_common::status::worker_state_name(w.state) == state)
                .count();
            let _ = writeln!(out, "kiln_workers{{state=\"{state}\"}} {n}");
        }
    }
    match api.render_drift_metrics() {
        Ok(drift) => out.push_str(&drift),
        Err(e) => tracing::warn!(error = %e, "render the drift metrics"),
    }
    match api.render_serving_metrics(now_ms()) {
        Ok(live) => out.push_str(&live),
        Err(e) => tracing::warn!(error = %e, "render the serving metrics"),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
