//! Experiment tracking over REST, in the shape of MLflow's `/api/2.0/mlflow` API, so
//! that programs (and `mlflow.set_tracking_uri(...)`) can create experiments and
//! runs and log params, tags and metrics to the replicated state.
//!
//! Wire rules, as MLflow's client expects them: snake_case JSON; int64 accepted as a
//! number or a string; a double accepted as a number or "NaN" / "Infinity" /
//! "-Infinity" and written back the same way; a 200 answer is always a JSON object;
//! an error is `{"error_code": ..., "message": ...}` with the matching HTTP status.
//! Reads are linearizable. Writing needs a token that may change data, reading one
//! that may read (with TLS); logging calls are rate limited per token like every
//! state-changing call.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_common::clock::now_ms;
use kiln_common::http::authorization;
use kiln_common::Error;
use kiln_proto::v1::*;
use serde_json::{json, Value};

use super::grpc::{audited, command, Api};
use crate::auth::{self, Caller, Permission};
use crate::state::artifacts::read_record;
use crate::state::keys;
use crate::state::tracking::{self, experiment_id, read_experiment, MAX_BATCH_METRICS};

/// Most runs one search returns.
pub const MAX_SEARCH_RESULTS: usize = 50_000;
/// Most points one history call returns.
pub const MAX_HISTORY: usize = 25_000;

/// The tracking routes, to merge into the coordinator's HTTP router.
pub fn routes() -> Router<Api> {
    let base = "/api/2.0/mlflow";
    Router::new()
        .route(
            &format!("{base}/experiments/create"),
            post(create_experiment),
        )
        .route(
            &format!("{base}/experiments/get-by-name"),
            get(get_experiment_by_name),
        )
        .route(&format!("{base}/experiments/get"), get(get_experiment))
        .route(&format!("{base}/runs/create"), post(create_run))
        .route(&format!("{base}/runs/update"), post(update_run))
        .route(&format!("{base}/runs/get"), get(get_run))
        .route(&format!("{base}/runs/log-metric"), post(log_metric))
        .route(&format!("{base}/runs/log-parameter"), post(log_parameter))
        .route(&format!("{base}/runs/set-tag"), post(set_tag))
        .route(&format!("{base}/runs/log-batch"), post(log_batch))
        .route(&format!("{base}/runs/search"), post(search_runs))
        .route(&format!("{base}/metrics/get-history"), get(get_history))
}

/// An MLflow-style error: its code, HTTP status and message.
struct ApiError(&'static str, StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.1,
            Json(json!({"error_code": self.0, "message": self.2})),
        )
            .into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        match e {
            Error::InvalidArgument(msg) => {
                for (code, status) in [
                    ("RESOURCE_ALREADY_EXISTS", StatusCode::BAD_REQUEST),
                    ("RESOURCE_DOES_NOT_EXIST", StatusCode::NOT_FOUND),
                    ("INVALID_PARAMETER_VALUE", StatusCode::BAD_REQUEST),
                ] {
                    if let Some(rest) = msg.strip_prefix(code) {
                        return ApiError(code, status, rest.trim_start_matches(": ").to_string());
                    }
                }
                ApiError("INVALID_PARAMETER_VALUE", StatusCode::BAD_REQUEST, msg)
            }
            Error::NotFound(msg) => ApiError("RESOURCE_DOES_NOT_EXIST", StatusCode::NOT_FOUND, msg),
            Error::Unauthenticated(msg) => {
                ApiError("UNAUTHENTICATED", StatusCode::UNAUTHORIZED, msg)
            }
            Error::PermissionDenied(msg) => {
                ApiError("PERMISSION_DENIED", StatusCode::FORBIDDEN, msg)
            }
            Error::ResourceExhausted(msg) => {
                ApiError("REQUEST_LIMIT_EXCEEDED", StatusCode::TOO_MANY_REQUESTS, msg)
            }
            Error::Internal(msg) | Error::DataLoss(msg) => {
                ApiError("INTERNAL_ERROR", StatusCode::INTERNAL_SERVER_ERROR, msg)
            }
            other => ApiError(
                "TEMPORARILY_UNAVAILABLE",
                StatusCode::SERVICE_UNAVAILABLE,
                other.to_string(),
            ),
        }
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(
        "INVALID_PARAMETER_VALUE",
        StatusCode::BAD_REQUEST,
        msg.into(),
    )
}

/// Checks the caller for `need` (any caller without TLS).
fn caller(
    api: &Api,
    headers: &HeaderMap,
    need: Permission,
    path: &str,
) -> Result<Caller, ApiError> {
    if !api.tls_enabled {
        return Ok(Caller::Insecure);
    }
    let header = authorization(headers);
    let caller = auth::authorize_bearer(header, &api.reader, need, now_ms());
    Ok(api.admit(caller, header, need, path)?)
}

fn body(bytes: &Bytes) -> Result<Value, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(bad("the body must be a JSON object"))
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(format!("missing value for required parameter '{key}'")))
}

fn opt_text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// An int64 as a JSON number or string (protobuf's JSON mapping uses strings).
fn int(v: &Value, key: &str) -> Result<Option<i64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| bad(format!("'{key}' must be an integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("'{key}' must be an integer, not '{s}'"))),
        Some(_) => Err(bad(format!("'{key}' must be an integer"))),
    }
}

/// A double as a JSON number or one of "NaN", "Infinity", "-Infinity".
fn double(v: &Value, key: &str) -> Result<f64, ApiError> {
    match v.get(key) {
        Some(Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| bad(format!("'{key}' is not a number"))),
        Some(Value::String(s)) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            other => other
                .parse()
                .map_err(|_| bad(format!("'{key}' must be a number, not '{other}'"))),
        },
        _ => Err(bad(format!("missing value for required parameter '{key}'"))),
    }
}

fn double_json(x: f64) -> Value {
    if x.is_nan() {
        json!("NaN")
    } else if x == f64::INFINITY {
        json!("Infinity")
    } else if x == f64::NEG_INFINITY {
        json!("-Infinity")
    } else {
        json!(x)
    }
}

/// `[{key, value}]` into a map.
fn pairs(v: &Value, key: &str) -> Result<HashMap<String, String>, ApiError> {
    let Some(items) = v.get(key) else {
        return Ok(HashMap::new());
    };
    let items = items
        .as_array()
        .ok_or_else(|| bad(format!("'{key}' must be a list of {{key, value}}")))?;
    items
        .iter()
        .map(|item| Ok((text(item, "key")?.to_string(), opt_text(item, "value"))))
        .collect()
}

fn pairs_json(map: &HashMap<String, String>) -> Value {
    let mut items: Vec<(&String, &String)> = map.iter().collect();
    items.sort();
    Value::Array(
        items
            .into_iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect(),
    )
}

fn experiment_json(e: &Experiment) -> Value {
    json!({
        "experiment_id": e.id.to_string(),
        "name": e.name,
        "artifact_location": "",
        "lifecycle_stage": "active",
        "creation_time": e.created_at_ms,
        "last_update_time": e.created_at_ms,
        "tags": pairs_json(&e.tags),
    })
}

fn point_json(m: &MetricPoint) -> Value {
    json!({"key": m.key, "value": double_json(m.value), "timestamp": m.timestamp_ms, "step": m.step})
}

fn run_info_json(r: &RunRecord) -> Value {
    json!({
        "run_id": r.run_id,
        "run_uuid": r.run_id,
        "run_name": r.name,
        "experiment_id": r.experiment_id.to_string(),
        "user_id": r.user,
        "status": r.status,
        "start_time": r.start_time_ms,
        "end_time": if r.end_time_ms == 0 { Value::Null } else { json!(r.end_time_ms) },
        "artifact_uri": "",
        "lifecycle_stage": "active",
    })
}

fn run_json(r: &RunRecord) -> Value {
    let mut metrics: Vec<&MetricPoint> = r.latest.values().collect();
    metrics.sort_by(|a, b| a.key.cmp(&b.key));
    json!({
        "info": run_info_json(r),
        "data": {
            "metrics": metrics.into_iter().map(point_json).collect::<Vec<_>>(),
            "params": pairs_json(&r.params),
            "tags": pairs_json(&r.tags),
        },
        "inputs": {},
    })
}

fn experiment_number(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| bad(format!("experiment_id '{text}' is not a number")))
}

async fn read_run(api: &Api, run_id: &str) -> Result<RunRecord, ApiError> {
    api.read_barrier(false).await?;
    read_record::<RunRecord>(&api.reader, &keys::run(run_id), "decode run")
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError(
                "RESOURCE_DOES_NOT_EXIST",
                StatusCode::NOT_FOUND,
                format!("run {run_id} does not exist"),
            )
        })
}

async fn propose(
    api: &Api,
    caller: &Caller,
    what: Option<String>,
    kind: command::Kind,
) -> Result<u64, ApiError> {
    let cmd = match what {
        Some(what) => audited(caller, what, kind),
        None => command(kind),
    };
    Ok(api.propose(cmd, false).await?.value)
}

async fn create_experiment(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "experiments/create")?;
    let v = body(&raw)?;
    let name = text(&v, "name")?.to_string();
    let kind = command::Kind::CreateExperiment(CreateExperiment {
        tags: pairs(&v, "tags")?,
        name: name.clone(),
    });
    let id = propose(
        &api,
        &caller,
        Some(format!("create experiment {name}")),
        kind,
    )
    .await?;
    Ok(Json(json!({"experiment_id": id.to_string()})))
}

async fn get_experiment_by_name(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "experiments/get-by-name")?;
    let name = q
        .get("experiment_name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("missing value for required parameter 'experiment_name'"))?;
    api.read_barrier(false).await?;
    let id = experiment_id(&api.reader, name)
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError(
                "RESOURCE_DOES_NOT_EXIST",
                StatusCode::NOT_FOUND,
                format!("no experiment is named '{name}'"),
            )
        })?;
    experiment_answer(&api, id)
}

async fn get_experiment(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "experiments/get")?;
    let id = experiment_number(
        q.get("experiment_id")
            .ok_or_else(|| bad("missing value for required parameter 'experiment_id'"))?,
    )?;
    api.read_barrier(false).await?;
    experiment_answer(&api, id)
}

fn experiment_answer(api: &Api, id: u64) -> ApiResult {
    let experiment = read_experiment(&api.reader, id)
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError(
                "RESOURCE_DOES_NOT_EXIST",
                StatusCode::NOT_FOUND,
                format!("experiment {id} does not exist"),
            )
        })?;
    Ok(Json(json!({"experiment": experiment_json(&experiment)})))
}

async fn create_run(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/create")?;
    let v = body(&raw)?;
    let experiment = match v.get("experiment_id") {
        None => 0,
        Some(Value::String(s)) => experiment_number(s)?,
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad("experiment_id is not a number"))?,
        Some(_) => return Err(bad("experiment_id must be a string")),
    };
    let run_id = format!("{:032x}", rand::random::<u128>());
    let user = match opt_text(&v, "user_id") {
        u if u.is_empty() => caller.name(),
        u => u,
    };
    let kind = command::Kind::CreateRun(CreateRun {
        run_id: run_id.clone(),
        experiment_id: experiment,
        name: opt_text(&v, "run_name"),
        user,
        start_time_ms: int(&v, "start_time")?.map_or_else(now_ms, |t| t.max(0) as u64),
        tags: pairs(&v, "tags")?,
    });
    propose(
        &api,
        &caller,
        Some(format!("create run {run_id} in experiment {experiment}")),
        kind,
    )
    .await?;
    let run = read_run(&api, &run_id).await?;
    Ok(Json(json!({"run": run_json(&run)})))
}

fn run_id_of(v: &Value) -> Result<String, ApiError> {
    match text(v, "run_id") {
        Ok(id) => Ok(id.to_string()),
        Err(_) => text(v, "run_uuid").map(str::to_string),
    }
}

async fn update_run(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/update")?;
    let v = body(&raw)?;
    let run_id = run_id_of(&v)?;
    let kind = command::Kind::UpdateRun(UpdateRun {
        run_id: run_id.clone(),
        status: opt_text(&v, "status"),
        end_time_ms: int(&v, "end_time")?.map_or(0, |t| t.max(0) as u64),
        name: opt_text(&v, "run_name"),
    });
    propose(&api, &caller, Some(format!("update run {run_id}")), kind).await?;
    let run = read_run(&api, &run_id).await?;
    Ok(Json(json!({"run_info": run_info_json(&run)})))
}

async fn get_run(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "runs/get")?;
    let run_id = q
        .get("run_id")
        .or_else(|| q.get("run_uuid"))
        .ok_or_else(|| bad("missing value for required parameter 'run_id'"))?;
    let run = read_run(&api, run_id).await?;
    Ok(Json(json!({"run": run_json(&run)})))
}

fn metric_of(v: &Value) -> Result<MetricPoint, ApiError> {
    Ok(MetricPoint {
        key: text(v, "key")?.to_string(),
        value: double(v, "value")?,
        timestamp_ms: int(v, "timestamp")?.map_or_else(now_ms, |t| t.max(0) as u64),
        step: int(v, "step")?.unwrap_or(0),
    })
}

async fn log(api: &Api, caller: &Caller, batch: LogBatch) -> ApiResult {
    propose(api, caller, None, command::Kind::LogBatch(batch)).await?;
    Ok(Json(json!({})))
}

async fn log_metric(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/log-metric")?;
    let v = body(&raw)?;
    let batch = LogBatch {
        run_id: run_id_of(&v)?,
        metrics: vec![metric_of(&v)?],
        ..Default::default()
    };
    log(&api, &caller, batch).await
}

async fn log_parameter(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/log-parameter")?;
    let v = body(&raw)?;
    let batch = LogBatch {
        run_id: run_id_of(&v)?,
        params: [(text(&v, "key")?.to_string(), opt_text(&v, "value"))].into(),
        ..Default::default()
    };
    log(&api, &caller, batch).await
}

async fn set_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/set-tag")?;
    let v = body(&raw)?;
    let batch = LogBatch {
        run_id: run_id_of(&v)?,
        tags: [(text(&v, "key")?.to_string(), opt_text(&v, "value"))].into(),
        ..Default::default()
    };
    log(&api, &caller, batch).await
}

async fn log_batch(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/log-batch")?;
    let v = body(&raw)?;
    let metrics = match v.get("metrics") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.iter().map(metric_of).collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("'metrics' must be a list")),
    };
    if metrics.len() > MAX_BATCH_METRICS {
        return Err(bad(format!(
            "{} metrics in one batch; at most {MAX_BATCH_METRICS}",
            metrics.len()
        )));
    }
    let batch = LogBatch {
        run_id: run_id_of(&v)?,
        metrics,
        params: pairs(&v, "params")?,
        tags: pairs(&v, "tags")?,
    };
    log(&api, &caller, batch).await
}

async fn get_history(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "metrics/get-history")?;
    let run_id = q
        .get("run_id")
        .or_else(|| q.get("run_uuid"))
        .ok_or_else(|| bad("missing value for required parameter 'run_id'"))?;
    let key = q
        .get("metric_key")
        .ok_or_else(|| bad("missing value for required parameter 'metric_key'"))?;
    read_run(&api, run_id).await?;
    let points: Vec<Value> = tracking::history(&api.reader, run_id, key, MAX_HISTORY)
        .map_err(|e| Error::Internal(e.to_string()))?
        .iter()
        .map(point_json)
        .collect();
    Ok(Json(json!({"metrics": points})))
}

async fn search_runs(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    caller(&api, &headers, Permission::Read, "runs/search")?;
    let v = body(&raw)?;
    if !opt_text(&v, "filter").trim().is_empty() {
        return Err(bad(
            "filter expressions are not supported yet: list the experiment's runs and filter them yourself",
        ));
    }
    let ids: Vec<u64> = match v.get("experiment_ids") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => experiment_number(s),
                Value::Number(n) => n
                    .as_u64()
                    .ok_or_else(|| bad("experiment_ids must be numbers")),
                _ => Err(bad("experiment_ids must be strings")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("missing value for required parameter 'experiment_ids'")),
    };
    let max = int(&v, "max_results")?.map_or(1000, |m| (m.max(1) as usize).min(MAX_SEARCH_RESULTS));
    api.read_barrier(false).await?;
    // Newest first, as MLflow orders by default.
    let runs =
        tracking::runs(&api.reader, &ids, max).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Json(
        json!({"runs": runs.iter().map(run_json).collect::<Vec<_>>()}),
    ))
}

impl Api {
    /// Lists runs of one experiment (by name) or of all, newest first.
    pub async fn list_runs_call(
        &self,
        req: ListRunsRequest,
    ) -> kiln_common::Result<ListRunsResponse> {
        self.read_barrier(false).await?;
        let internal = |e: crate::raft::storage::StoreError| Error::Internal(e.to_string());
        let all = tracking::experiments(&self.reader).map_err(internal)?;
        let chosen: Vec<&Experiment> = if req.experiment.is_empty() {
            all.iter().collect()
        } else {
            let found: Vec<&Experiment> = all.iter().filter(|e| e.name == req.experiment).collect();
            if found.is_empty() {
                return Err(Error::NotFound(format!(
                    "no experiment is named '{}'",
                    req.experiment
                )));
            }
            found
        };
        let ids: Vec<u64> = chosen.iter().map(|e| e.id).collect();
        let max = match req.max_results {
            0 => 1000,
            n => (n as usize).min(MAX_SEARCH_RESULTS),
        };
        Ok(ListRunsResponse {
            runs: tracking::runs(&self.reader, &ids, max).map_err(internal)?,
            experiments: chosen.iter().map(|e| (e.id, e.name.clone())).collect(),
        })
    }

    /// Returns one run, with the history of each metric when asked.
    pub async fn get_run_call(&self, req: GetRunRequest) -> kiln_common::Result<GetRunResponse> {
        self.read_barrier(false).await?;
        let internal = |e: crate::raft::storage::StoreError| Error::Internal(e.to_string());
        let run = read_record::<RunRecord>(&self.reader, &keys::run(&req.run_id), "decode run")
            .map_err(internal)?
            .ok_or_else(|| Error::NotFound(format!("run {} does not exist", req.run_id)))?;
        let experiment = read_experiment(&self.reader, run.experiment_id)
            .map_err(internal)?
            .map(|e| e.name)
            .unwrap_or_default();
        let mut history = Vec::new();
        if req.with_history {
            let mut keys: Vec<&String> = run.latest.keys().collect();
            keys.sort();
            for key in keys {
                history.push(MetricHistory {
                    key: key.clone(),
                    points: tracking::history(&self.reader, &run.run_id, key, MAX_HISTORY)
                        .map_err(internal)?,
                });
            }
        }
        Ok(GetRunResponse {
            run: Some(run),
            experiment,
            history,
        })
    }
}
