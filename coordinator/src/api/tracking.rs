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

use std::collections::{BTreeMap, HashMap};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
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
use super::mlflow_artifacts::run_artifact_uri;
use super::search::{self, Field, Scope, Searchable};
use crate::auth::{self, Caller, Permission};
use crate::state::artifacts::read_record;
use crate::state::keys;
use crate::state::tracking::{self, experiment_id, read_experiment, MAX_BATCH_METRICS};
use crate::state::trees::TreeOwner;

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
        .route(&format!("{base}/runs/outputs"), post(log_outputs))
        .route(&format!("{base}/runs/log-inputs"), post(log_inputs))
        .route(&format!("{base}/runs/delete"), post(delete_run))
        .route(&format!("{base}/runs/restore"), post(restore_run))
        .route(&format!("{base}/runs/delete-tag"), post(delete_run_tag))
        .route(
            &format!("{base}/experiments/update"),
            post(update_experiment),
        )
        .route(
            &format!("{base}/experiments/delete"),
            post(delete_experiment),
        )
        .route(
            &format!("{base}/experiments/restore"),
            post(restore_experiment),
        )
        .route(
            &format!("{base}/experiments/set-experiment-tag"),
            post(set_experiment_tag),
        )
        .route(
            &format!("{base}/experiments/delete-experiment-tag"),
            post(delete_experiment_tag),
        )
        .route(
            &format!("{base}/experiments/search"),
            post(search_experiments),
        )
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
}

/// Largest request body of the tracking API (a full log-batch is well under it).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// An MLflow-style error: its code, HTTP status and message.
#[derive(Debug)]
pub(super) struct ApiError(pub &'static str, pub StatusCode, pub String);

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
                    ("RESOURCE_CONFLICT", StatusCode::CONFLICT),
                    ("REQUEST_LIMIT_EXCEEDED", StatusCode::TOO_MANY_REQUESTS),
                ] {
                    if let Some(rest) = msg.strip_prefix(code) {
                        return ApiError(code, status, rest.trim_start_matches(": ").to_string());
                    }
                }
                // kiln's own registry says NOT_FOUND (an alias to a missing version).
                if let Some(rest) = msg.strip_prefix("NOT_FOUND: ") {
                    return ApiError(
                        "RESOURCE_DOES_NOT_EXIST",
                        StatusCode::NOT_FOUND,
                        rest.into(),
                    );
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

pub(super) type ApiResult = Result<Json<Value>, ApiError>;

pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(
        "INVALID_PARAMETER_VALUE",
        StatusCode::BAD_REQUEST,
        msg.into(),
    )
}

/// Checks the caller for `need` (any caller without TLS).
pub(super) fn caller(
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

/// The caller of an endpoint that writes the run its JSON body names, and the
/// body: a command job's own token may write its run. A body that is not JSON
/// is refused after the caller is known (401 before 400).
fn run_caller(
    api: &Api,
    headers: &HeaderMap,
    need: Permission,
    path: &str,
    raw: &Bytes,
) -> Result<(Caller, Value), ApiError> {
    let v = body(raw);
    let run = v
        .as_ref()
        .ok()
        .and_then(|v| run_id_of(v).ok())
        .unwrap_or_default();
    let caller = caller_scoped(api, headers, need, path, auth::Scope::Run(&run))?;
    Ok((caller, v?))
}

/// [`caller`] for an endpoint about one run or experiment (`scope`), which a
/// command job's own token may call for its run.
pub(super) fn caller_scoped(
    api: &Api,
    headers: &HeaderMap,
    need: Permission,
    path: &str,
    scope: auth::Scope<'_>,
) -> Result<Caller, ApiError> {
    if !api.tls_enabled {
        return Ok(Caller::Insecure);
    }
    let header = authorization(headers);
    let caller = auth::authorize_bearer_scoped(header, &api.reader, need, scope, now_ms());
    Ok(api.admit(caller, header, need, path)?)
}

pub(super) fn body(bytes: &Bytes) -> Result<Value, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(bad("the body must be a JSON object"))
    }
}

pub(super) fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(format!("missing value for required parameter '{key}'")))
}

pub(super) fn opt_text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// An int64 as a JSON number or string (protobuf's JSON mapping uses strings).
pub(super) fn int(v: &Value, key: &str) -> Result<Option<i64>, ApiError> {
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
pub(super) fn double(v: &Value, key: &str) -> Result<f64, ApiError> {
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

pub(super) fn double_json(x: f64) -> Value {
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

/// The `{key, value}` of a set-tag call, as the one-entry map the commands take.
pub(super) fn tag_pair(v: &Value) -> Result<BTreeMap<String, String>, ApiError> {
    Ok([(text(v, "key")?.to_string(), opt_text(v, "value"))].into())
}

/// The `key` of a delete-tag call, as the list the commands take.
pub(super) fn tag_key(v: &Value) -> Result<Vec<String>, ApiError> {
    Ok(vec![text(v, "key")?.to_string()])
}

/// One page of a search answer: `{field: [...], next_page_token}`, the token only
/// while more remain (MLflow's client stops at a page without one).
pub(super) fn paged(field: &str, items: Vec<Value>, next: Option<String>) -> Json<Value> {
    let mut out = json!({ field: items });
    if let Some(next) = next {
        out["next_page_token"] = json!(next);
    }
    Json(out)
}

/// `[{key, value}]` into a map.
pub(super) fn pairs(v: &Value, key: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(items) = v.get(key) else {
        return Ok(BTreeMap::new());
    };
    let items = items
        .as_array()
        .ok_or_else(|| bad(format!("'{key}' must be a list of {{key, value}}")))?;
    items
        .iter()
        .map(|item| Ok((text(item, "key")?.to_string(), opt_text(item, "value"))))
        .collect()
}

/// A map as `[{key, value}]`, in key order.
pub(super) fn pairs_json(map: &BTreeMap<String, String>) -> Value {
    Value::Array(
        map.iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect(),
    )
}

/// A stored lifecycle stage as MLflow names it (stored empty when active).
fn stage(stored: &str) -> &str {
    if stored.is_empty() {
        "active"
    } else {
        stored
    }
}

fn dataset_json(d: &DatasetInput) -> Value {
    let mut tags = pairs_json(&d.tags);
    if !d.artifact.is_empty() {
        if let Value::Array(items) = &mut tags {
            items.push(json!({"key": "kiln.artifact", "value": d.artifact}));
        }
    }
    json!({
        "tags": tags,
        "dataset": {
            "name": d.name,
            "digest": d.digest,
            "source_type": d.source_type,
            "source": d.source,
            "schema": d.schema,
            "profile": d.profile,
        },
    })
}

pub(super) fn experiment_json(e: &Experiment) -> Value {
    json!({
        "experiment_id": e.id.to_string(),
        "name": e.name,
        "artifact_location": format!("mlflow-artifacts:/{}", e.id),
        "lifecycle_stage": stage(&e.lifecycle_stage),
        "creation_time": e.created_at_ms,
        "last_update_time": e.updated_at_ms.max(e.created_at_ms),
        "tags": pairs_json(&e.tags),
    })
}

pub(super) fn point_json(m: &MetricPoint) -> Value {
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
        "artifact_uri": run_artifact_uri(r.experiment_id, &r.run_id),
        "lifecycle_stage": stage(&r.lifecycle_stage),
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
        "inputs": {
            "dataset_inputs": r.inputs.iter().map(dataset_json).collect::<Vec<_>>(),
        },
        "outputs": {
            "model_outputs": r.outputs.iter().map(|o| json!({"model_id": o.model_id, "step": o.step})).collect::<Vec<_>>(),
        },
    })
}

pub(super) fn experiment_number(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| bad(format!("experiment_id '{text}' is not a number")))
}

pub(super) async fn read_run(api: &Api, run_id: &str) -> Result<RunRecord, ApiError> {
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

pub(super) async fn propose(
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
    // A job's token may read its run's experiment: the name is looked up
    // first (the answer waits for the check).
    let asked = q.get("experiment_name").filter(|n| !n.is_empty());
    let found = match asked {
        Some(name) => {
            experiment_id(&api.reader, name).map_err(|e| Error::Internal(e.to_string()))?
        }
        None => None,
    };
    let scope_id = found.map(|id| id.to_string()).unwrap_or_default();
    caller_scoped(
        &api,
        &headers,
        Permission::Read,
        "experiments/get-by-name",
        auth::Scope::Experiment(&scope_id),
    )?;
    let name =
        asked.ok_or_else(|| bad("missing value for required parameter 'experiment_name'"))?;
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
    caller_scoped(
        &api,
        &headers,
        Permission::Read,
        "experiments/get",
        auth::Scope::Experiment(q.get("experiment_id").map_or("", String::as_str)),
    )?;
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

pub(super) fn run_id_of(v: &Value) -> Result<String, ApiError> {
    match text(v, "run_id") {
        Ok(id) => Ok(id.to_string()),
        Err(_) => text(v, "run_uuid").map(str::to_string),
    }
}

async fn update_run(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let (caller, v) = run_caller(&api, &headers, Permission::Write, "runs/update", &raw)?;
    let run_id = run_id_of(&v)?;
    let kind = command::Kind::UpdateRun(UpdateRun {
        run_id: run_id.clone(),
        status: opt_text(&v, "status"),
        end_time_ms: int(&v, "end_time")?.map_or(0, |t| t.max(0) as u64),
        name: opt_text(&v, "run_name"),
        ..Default::default()
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
    let asked = q.get("run_id").or_else(|| q.get("run_uuid"));
    caller_scoped(
        &api,
        &headers,
        Permission::Read,
        "runs/get",
        auth::Scope::Run(asked.map_or("", String::as_str)),
    )?;
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
    let (caller, v) = run_caller(&api, &headers, Permission::Write, "runs/log-metric", &raw)?;
    let batch = LogBatch {
        run_id: run_id_of(&v)?,
        metrics: vec![metric_of(&v)?],
        ..Default::default()
    };
    log(&api, &caller, batch).await
}

async fn log_parameter(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let (caller, v) = run_caller(
        &api,
        &headers,
        Permission::Write,
        "runs/log-parameter",
        &raw,
    )?;
    let batch = LogBatch {
        run_id: run_id_of(&v)?,
        params: [(text(&v, "key")?.to_string(), opt_text(&v, "value"))].into(),
        ..Default::default()
    };
    log(&api, &caller, batch).await
}

async fn set_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let (caller, v) = run_caller(&api, &headers, Permission::Write, "runs/set-tag", &raw)?;
    let batch = LogBatch {
        run_id: run_id_of(&v)?,
        tags: tag_pair(&v)?,
        ..Default::default()
    };
    log(&api, &caller, batch).await
}

async fn log_batch(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let (caller, v) = run_caller(&api, &headers, Permission::Write, "runs/log-batch", &raw)?;
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

async fn log_outputs(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let (caller, v) = run_caller(&api, &headers, Permission::Write, "runs/outputs", &raw)?;
    let run_id = run_id_of(&v)?;
    let models = match v.get("models") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|m| {
                Ok(RunModelOutput {
                    model_id: text(m, "model_id")?.to_string(),
                    step: int(m, "step")?.unwrap_or(0),
                })
            })
            .collect::<Result<_, ApiError>>()?,
        Some(_) => return Err(bad("'models' must be a list of {model_id, step}")),
    };
    let kind = command::Kind::LogRunOutputs(LogRunOutputs {
        run_id: run_id.clone(),
        models,
    });
    propose(
        &api,
        &caller,
        Some(format!("log outputs of run {run_id}")),
        kind,
    )
    .await?;
    Ok(Json(json!({})))
}

/// An experiment id given as a string or a number.
fn experiment_of(v: &Value) -> Result<u64, ApiError> {
    match v.get("experiment_id") {
        Some(Value::String(s)) => experiment_number(s),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad("experiment_id is not a number")),
        _ => Err(bad("missing value for required parameter 'experiment_id'")),
    }
}

async fn change_experiment(
    api: &Api,
    caller: &Caller,
    path: &str,
    update: UpdateExperiment,
) -> ApiResult {
    let what = format!("{path} {}", update.id);
    propose(
        api,
        caller,
        Some(what),
        command::Kind::UpdateExperiment(update),
    )
    .await?;
    Ok(Json(json!({})))
}

async fn update_experiment(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "experiments/update")?;
    let v = body(&raw)?;
    let update = UpdateExperiment {
        id: experiment_of(&v)?,
        new_name: text(&v, "new_name")?.to_string(),
        ..Default::default()
    };
    change_experiment(&api, &caller, "experiments/update", update).await
}

async fn delete_experiment(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "experiments/delete")?;
    let v = body(&raw)?;
    let update = UpdateExperiment {
        id: experiment_of(&v)?,
        lifecycle_stage: "deleted".into(),
        ..Default::default()
    };
    change_experiment(&api, &caller, "experiments/delete", update).await
}

async fn restore_experiment(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "experiments/restore")?;
    let v = body(&raw)?;
    let update = UpdateExperiment {
        id: experiment_of(&v)?,
        lifecycle_stage: "active".into(),
        ..Default::default()
    };
    change_experiment(&api, &caller, "experiments/restore", update).await
}

async fn set_experiment_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "experiments/set-experiment-tag",
    )?;
    let v = body(&raw)?;
    let update = UpdateExperiment {
        id: experiment_of(&v)?,
        set_tags: tag_pair(&v)?,
        ..Default::default()
    };
    change_experiment(&api, &caller, "experiments/set-experiment-tag", update).await
}

async fn delete_experiment_tag(
    State(api): State<Api>,
    headers: HeaderMap,
    raw: Bytes,
) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "experiments/delete-experiment-tag",
    )?;
    let v = body(&raw)?;
    let update = UpdateExperiment {
        id: experiment_of(&v)?,
        delete_tags: tag_key(&v)?,
        ..Default::default()
    };
    change_experiment(&api, &caller, "experiments/delete-experiment-tag", update).await
}

async fn change_run(api: &Api, caller: &Caller, path: &str, update: UpdateRun) -> ApiResult {
    let what = format!("{path} {}", update.run_id);
    propose(api, caller, Some(what), command::Kind::UpdateRun(update)).await?;
    Ok(Json(json!({})))
}

async fn delete_run(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/delete")?;
    let v = body(&raw)?;
    let update = UpdateRun {
        run_id: run_id_of(&v)?,
        lifecycle_stage: "deleted".into(),
        ..Default::default()
    };
    change_run(&api, &caller, "runs/delete", update).await
}

async fn restore_run(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "runs/restore")?;
    let v = body(&raw)?;
    let update = UpdateRun {
        run_id: run_id_of(&v)?,
        lifecycle_stage: "active".into(),
        ..Default::default()
    };
    change_run(&api, &caller, "runs/restore", update).await
}

async fn delete_run_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let (caller, v) = run_caller(&api, &headers, Permission::Write, "runs/delete-tag", &raw)?;
    let update = UpdateRun {
        run_id: run_id_of(&v)?,
        delete_tags: tag_key(&v)?,
        ..Default::default()
    };
    change_run(&api, &caller, "runs/delete-tag", update).await
}

async fn log_inputs(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let (caller, v) = run_caller(&api, &headers, Permission::Write, "runs/log-inputs", &raw)?;
    let run_id = run_id_of(&v)?;
    let items = match v.get("datasets") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return Err(bad("'datasets' must be a list of {dataset, tags}")),
    };
    api.read_barrier(false).await?;
    let mut datasets = Vec::with_capacity(items.len());
    for item in &items {
        let d = item
            .get("dataset")
            .ok_or_else(|| bad("a dataset input needs 'dataset'"))?;
        let name = text(d, "name")?.to_string();
        // A kiln dataset of the same name: the input is that version's lineage.
        let artifact = match kiln_common::artifact::validate_name(&name) {
            Ok(()) => crate::state::artifacts::resolve(
                &api.reader,
                &name,
                &kiln_common::artifact::Selector::Latest,
            )
            .map_err(|e| Error::Internal(e.to_string()))?
            .map(|v| format!("{name}@{v}"))
            .unwrap_or_default(),
            Err(_) => String::new(),
        };
        datasets.push(DatasetInput {
            name,
            digest: opt_text(d, "digest"),
            source_type: opt_text(d, "source_type"),
            source: opt_text(d, "source"),
            schema: opt_text(d, "schema"),
            profile: opt_text(d, "profile"),
            tags: pairs(item, "tags")?,
            artifact,
        });
    }
    let kind = command::Kind::LogRunInputs(LogRunInputs {
        run_id: run_id.clone(),
        datasets,
    });
    propose(
        &api,
        &caller,
        Some(format!("log inputs of run {run_id}")),
        kind,
    )
    .await?;
    Ok(Json(json!({})))
}

async fn get_history(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let asked = q.get("run_id").or_else(|| q.get("run_uuid"));
    caller_scoped(
        &api,
        &headers,
        Permission::Read,
        "metrics/get-history",
        auth::Scope::Run(asked.map_or("", String::as_str)),
    )?;
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

/// Most runs one search reads before filtering.
pub const MAX_SEARCHED_RUNS: usize = 1_000_000;

/// A run as search reads it.
struct FoundRun<'a>(&'a RunRecord);

impl Searchable for FoundRun<'_> {
    fn value(&self, field: &Field) -> Option<search::Value> {
        use search::Value as V;
        let r = self.0;
        match field {
            Field::Metric(k) => r.latest.get(k).map(|m| V::Number(m.value)),
            Field::Param(k) => r.params.get(k).map(|v| V::Text(v.clone())),
            Field::Tag(k) if k == "mlflow.runName" && !r.tags.contains_key(k) => {
                Some(V::Text(r.name.clone()))
            }
            Field::Tag(k) => r.tags.get(k).map(|v| V::Text(v.clone())),
            Field::Attribute(a) => match a.as_str() {
                "run_id" => Some(V::Text(r.run_id.clone())),
                "run_name" => Some(V::Text(r.name.clone())),
                "status" => Some(V::Text(r.status.clone())),
                "user_id" => Some(V::Text(r.user.clone())),
                "artifact_uri" => Some(V::Text(run_artifact_uri(r.experiment_id, &r.run_id))),
                "lifecycle_stage" => Some(V::Text(stage(&r.lifecycle_stage).to_string())),
                "start_time" | "created" => Some(V::Number(r.start_time_ms as f64)),
                "end_time" if r.end_time_ms > 0 => Some(V::Number(r.end_time_ms as f64)),
                _ => None,
            },
            Field::Dataset(_) => self.values(field).into_iter().next(),
        }
    }

    fn values(&self, field: &Field) -> Vec<search::Value> {
        let Field::Dataset(part) = field else {
            return self.value(field).into_iter().collect();
        };
        self.0
            .inputs
            .iter()
            .filter_map(|d| match part.as_str() {
                "name" => Some(d.name.clone()),
                "digest" => Some(d.digest.clone()),
                "context" => d.tags.get("mlflow.data.context").cloned(),
                _ => None,
            })
            .map(search::Value::Text)
            .collect()
    }
}

/// Which lifecycle stages a search wants (MLflow's ViewType).
fn view_matches(view: &str, stored_stage: &str) -> Result<bool, ApiError> {
    let deleted = !stored_stage.is_empty();
    match view {
        "" | "ACTIVE_ONLY" | "1" => Ok(!deleted),
        "DELETED_ONLY" | "2" => Ok(deleted),
        "ALL" | "3" => Ok(true),
        other => Err(bad(format!(
            "view type '{other}' is not ACTIVE_ONLY, DELETED_ONLY or ALL"
        ))),
    }
}

/// A view type given as its name or number.
fn view_of(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::Number(n)) => n.to_string(),
        _ => opt_text(v, key),
    }
}

/// `order_by` as a list of strings.
fn order_of(v: &Value) -> Result<Vec<String>, ApiError> {
    match v.get("order_by") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("'order_by' must be a list of strings"))
            })
            .collect(),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(_) => Err(bad("'order_by' must be a list of strings")),
    }
}

/// max_results within 1..=most, `default` when absent.
fn max_results(v: &Value, default: usize, most: usize) -> Result<usize, ApiError> {
    match int(v, "max_results")? {
        None => Ok(default),
        Some(m) if m >= 1 && m as usize <= most => Ok(m as usize),
        Some(m) => Err(bad(format!("max_results {m} is out of range: 1 to {most}"))),
    }
}

async fn search_runs(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    caller(&api, &headers, Permission::Read, "runs/search")?;
    let v = body(&raw)?;
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
    let scope = Scope::runs();
    let filter = search::Filter::parse(&opt_text(&v, "filter"), &scope).map_err(bad)?;
    let order = search::parse_order_by(&order_of(&v)?, &scope).map_err(bad)?;
    let max = max_results(&v, 1000, MAX_SEARCH_RESULTS)?;
    let offset = search::parse_page_token(&opt_text(&v, "page_token")).map_err(bad)?;
    let view = view_of(&v, "run_view_type");
    view_matches(&view, "")?;
    api.read_barrier(false).await?;
    // Newest first: MLflow's default order, and the tiebreak of any other.
    let runs = tracking::runs(&api.reader, &ids, MAX_SEARCHED_RUNS + 1)
        .map_err(|e| Error::Internal(e.to_string()))?;
    if runs.len() > MAX_SEARCHED_RUNS {
        return Err(bad(format!(
            "the experiments hold more than {MAX_SEARCHED_RUNS} runs; search fewer at once"
        )));
    }
    let mut found = Vec::new();
    for run in runs {
        if view_matches(&view, &run.lifecycle_stage)? && filter.matches(&FoundRun(&run)) {
            found.push(run);
        }
    }
    found.sort_by(|a, b| {
        search::compare(&FoundRun(a), &FoundRun(b), &order)
            .then_with(|| b.start_time_ms.cmp(&a.start_time_ms))
            .then_with(|| a.run_id.cmp(&b.run_id))
    });
    let (page, next) = search::page(found, offset, max);
    Ok(paged("runs", page.iter().map(run_json).collect(), next))
}

/// An experiment as search reads it.
struct FoundExperiment<'a>(&'a Experiment);

impl Searchable for FoundExperiment<'_> {
    fn value(&self, field: &Field) -> Option<search::Value> {
        use search::Value as V;
        let e = self.0;
        match field {
            Field::Tag(k) => e.tags.get(k).map(|v| V::Text(v.clone())),
            Field::Attribute(a) => match a.as_str() {
                "name" => Some(V::Text(e.name.clone())),
                "experiment_id" => Some(V::Text(e.id.to_string())),
                "lifecycle_stage" => Some(V::Text(stage(&e.lifecycle_stage).to_string())),
                "creation_time" => Some(V::Number(e.created_at_ms as f64)),
                "last_update_time" => Some(V::Number(e.updated_at_ms.max(e.created_at_ms) as f64)),
                _ => None,
            },
            _ => None,
        }
    }
}

async fn search_experiments(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    caller(&api, &headers, Permission::Read, "experiments/search")?;
    let v = body(&raw)?;
    let scope = Scope::experiments();
    let filter = search::Filter::parse(&opt_text(&v, "filter"), &scope).map_err(bad)?;
    let order = search::parse_order_by(&order_of(&v)?, &scope).map_err(bad)?;
    let max = max_results(&v, 1000, MAX_SEARCH_RESULTS)?;
    let offset = search::parse_page_token(&opt_text(&v, "page_token")).map_err(bad)?;
    let view = view_of(&v, "view_type");
    view_matches(&view, "")?;
    api.read_barrier(false).await?;
    let mut found = Vec::new();
    for e in tracking::experiments(&api.reader).map_err(|e| Error::Internal(e.to_string()))? {
        if view_matches(&view, &e.lifecycle_stage)? && filter.matches(&FoundExperiment(&e)) {
            found.push(e);
        }
    }
    // MLflow's default: newest first, then by id.
    found.sort_by(|a, b| {
        search::compare(&FoundExperiment(a), &FoundExperiment(b), &order)
            .then_with(|| b.created_at_ms.cmp(&a.created_at_ms))
            .then_with(|| a.id.cmp(&b.id))
    });
    let (page, next) = search::page(found, offset, max);
    Ok(paged(
        "experiments",
        page.iter().map(experiment_json).collect(),
        next,
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
        let (files, models) = if req.with_files {
            (
                self.tree_listing(&TreeOwner::Run(run.run_id.clone()))?,
                self.run_models(&run)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(GetRunResponse {
            run: Some(run),
            experiment,
            history,
            files,
            models,
        })
    }
}
