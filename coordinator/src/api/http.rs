//! The coordinator's HTTP endpoints: `GET /api/v1/status` (the status JSON of
//! DESIGN §6), `GET /health` and `GET /metrics` (Prometheus text format).

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kiln_common::status::cluster_status_json;

use super::grpc::Api;

/// Builds the HTTP router.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(api)
}

async fn status(State(api): State<Api>) -> Response {
    match api.cluster_status().await {
        Ok(s) => Json(cluster_status_json(&s)).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
