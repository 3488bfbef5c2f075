//! MLflow 3's logged models over REST (`/api/2.0/mlflow/logged-models...`): what
//! `mlflow.<flavor>.log_model` creates, fills with files through the artifact
//! proxy (`mlflow_artifacts`), marks READY, and what `register_model` and
//! `models:/<model id>` URIs find again.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, patch, post};
use axum::{Json, Router};
use kiln_common::Error;
use kiln_proto::v1::*;
use serde_json::{json, Value};

use super::grpc::Api;
use super::mlflow_artifacts::{delete_tree_paths, model_artifact_uri};
use super::search::{self, Scope, Searchable};
use super::tracking::{
    bad, body, caller, experiment_number, int, opt_text, paged, pairs, pairs_json, propose, text,
    ApiError, ApiResult,
};
use crate::auth::{Caller, Permission};
use crate::state::keys;
use crate::state::trees::{self, read_logged_model, TreeOwner};

/// Most logged models one search reads.
pub const MAX_SEARCHED_MODELS: usize = 100_000;
/// Most logged models one search page returns.
pub const MAX_MODELS_PER_PAGE: usize = 1000;

/// The logged-model routes, to merge into the coordinator's HTTP router.
pub fn routes() -> Router<Api> {
    let base = "/api/2.0/mlflow/logged-models";
    Router::new()
        .route(base, post(create))
        .route(&format!("{base}/search"), post(search_models))
        .route(
            &format!("{base}/:id"),
            get(get_model).patch(finalize).delete(remove),
        )
        .route(&format!("{base}/:id/params"), post(log_params))
        .route(&format!("{base}/:id/tags"), patch(set_tags))
        .route(&format!("{base}/:id/tags/:key"), delete(delete_tag))
}

/// MLflow's status names by their proto numbers.
const STATUS_NAMES: [&str; 4] = [
    "LOGGED_MODEL_STATUS_UNSPECIFIED",
    "LOGGED_MODEL_PENDING",
    "LOGGED_MODEL_READY",
    "LOGGED_MODEL_UPLOAD_FAILED",
];

/// A status as a name or its proto number.
fn status_of(v: &Value) -> Result<String, ApiError> {
    match v.get("status") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|i| STATUS_NAMES.get(i as usize))
            .map(|s| s.to_string())
            .ok_or_else(|| bad(format!("status {n} is not a logged model status"))),
        Some(_) => Err(bad("'status' must be a status name")),
    }
}

fn model_json(m: &LoggedModel) -> Value {
    json!({
        "info": {
            "model_id": m.model_id,
            "experiment_id": m.experiment_id.to_string(),
            "name": m.name,
            "artifact_uri": model_artifact_uri(m.experiment_id, &m.model_id),
            "status": m.status,
            "creation_timestamp_ms": m.created_at_ms,
            "last_updated_timestamp_ms": m.updated_at_ms,
            "source_run_id": m.source_run_id,
            "model_type": m.model_type,
            "tags": pairs_json(&m.tags),
        },
        "data": {
            "params": pairs_json(&m.params),
            "metrics": [],
        },
    })
}

async fn read_model(api: &Api, id: &str) -> Result<LoggedModel, ApiError> {
    api.read_barrier(false).await?;
    read_logged_model(&api.reader, id)
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError(
                "RESOURCE_DOES_NOT_EXIST",
                StatusCode::NOT_FOUND,
                format!("logged model {id} does not exist"),
            )
        })
}

async fn answer(api: &Api, id: &str) -> ApiResult {
    let model = read_model(api, id).await?;
    Ok(Json(json!({"model": model_json(&model)})))
}

async fn create(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "logged-models/create")?;
    let v = body(&raw)?;
    let experiment_id = match v.get("experiment_id") {
        Some(Value::String(s)) => experiment_number(s)?,
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad("experiment_id is not a number"))?,
        _ => return Err(bad("missing value for required parameter 'experiment_id'")),
    };
    let model_id = format!("m-{:032x}", rand::random::<u128>());
    let name = match opt_text(&v, "name") {
        n if n.is_empty() => "model".to_string(),
        n => n,
    };
    let model = LoggedModel {
        model_id: model_id.clone(),
        experiment_id,
        name: name.clone(),
        source_run_id: opt_text(&v, "source_run_id"),
        model_type: opt_text(&v, "model_type"),
        params: pairs(&v, "params")?,
        tags: pairs(&v, "tags")?,
        ..Default::default()
    };
    let kind = command::Kind::CreateLoggedModel(CreateLoggedModel { model: Some(model) });
    propose(
        &api,
        &caller,
        Some(format!("log model {name} as {model_id}")),
        kind,
    )
    .await?;
    answer(&api, &model_id).await
}

async fn get_model(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "logged-models/get")?;
    answer(&api, &id).await
}

async fn update(api: &Api, caller: &Caller, update: UpdateLoggedModel) -> Result<(), ApiError> {
    let what = format!("update logged model {}", update.model_id);
    propose(
        api,
        caller,
        Some(what),
        command::Kind::UpdateLoggedModel(update),
    )
    .await?;
    Ok(())
}

async fn finalize(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Bytes,
) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "logged-models/finalize")?;
    let v = body(&raw)?;
    let change = UpdateLoggedModel {
        model_id: id.clone(),
        status: status_of(&v)?,
        ..Default::default()
    };
    update(&api, &caller, change).await?;
    answer(&api, &id).await
}

async fn log_params(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Bytes,
) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "logged-models/params")?;
    let v = body(&raw)?;
    let change = UpdateLoggedModel {
        model_id: id,
        params: pairs(&v, "params")?,
        ..Default::default()
    };
    update(&api, &caller, change).await?;
    Ok(Json(json!({})))
}

async fn set_tags(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Bytes,
) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "logged-models/tags")?;
    let v = body(&raw)?;
    let change = UpdateLoggedModel {
        model_id: id,
        set_tags: pairs(&v, "tags")?,
        ..Default::default()
    };
    update(&api, &caller, change).await?;
    Ok(Json(json!({})))
}

async fn delete_tag(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "logged-models/tags")?;
    let change = UpdateLoggedModel {
        model_id: id,
        delete_tags: vec![key],
        ..Default::default()
    };
    update(&api, &caller, change).await?;
    Ok(Json(json!({})))
}

async fn remove(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "logged-models/delete")?;
    read_model(&api, &id).await?;
    let tree = TreeOwner::Model(id.clone()).tree();
    let paths: Vec<String> = api
        .tree_files(&tree, "")?
        .into_iter()
        .map(|f| f.path)
        .collect();
    delete_tree_paths(&api, &caller, &tree, paths).await?;
    let change = UpdateLoggedModel {
        model_id: id.clone(),
        delete: true,
        ..Default::default()
    };
    propose(
        &api,
        &caller,
        Some(format!("delete logged model {id}")),
        command::Kind::UpdateLoggedModel(change),
    )
    .await?;
    Ok(Json(json!({})))
}

/// A logged model as search reads it.
struct Found<'a>(&'a LoggedModel);

impl Searchable for Found<'_> {
    fn value(&self, field: &search::Field) -> Option<search::Value> {
        use search::{Field, Value as V};
        let m = self.0;
        match field {
            Field::Param(k) => m.params.get(k).map(|v| V::Text(v.clone())),
            Field::Tag(k) => m.tags.get(k).map(|v| V::Text(v.clone())),
            Field::Attribute(a) => match a.as_str() {
                "name" => Some(V::Text(m.name.clone())),
                "model_id" => Some(V::Text(m.model_id.clone())),
                "source_run_id" => Some(V::Text(m.source_run_id.clone())),
                "status" => Some(V::Text(m.status.clone())),
                "creation_timestamp" | "creation_time" => Some(V::Number(m.created_at_ms as f64)),
                "last_updated_timestamp" => Some(V::Number(m.updated_at_ms as f64)),
                _ => None,
            },
            Field::Metric(_) | Field::Dataset(_) => None,
        }
    }
}

async fn search_models(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    caller(&api, &headers, Permission::Read, "logged-models/search")?;
    let v = body(&raw)?;
    let experiments: Vec<u64> = match v.get("experiment_ids") {
        None => Vec::new(),
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
        Some(_) => return Err(bad("'experiment_ids' must be a list")),
    };
    let filter =
        search::Filter::parse(&opt_text(&v, "filter"), &Scope::logged_models()).map_err(bad)?;
    // order_by comes as [{field_name, ascending}] here, not as strings.
    let order: Vec<String> = match v.get("order_by") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|o| {
                let field = text(o, "field_name")?;
                let ascending = o.get("ascending").and_then(Value::as_bool).unwrap_or(true);
                Ok(format!(
                    "{field} {}",
                    if ascending { "ASC" } else { "DESC" }
                ))
            })
            .collect::<Result<_, ApiError>>()?,
        Some(_) => return Err(bad("'order_by' must be a list")),
    };
    let order = search::parse_order_by(&order, &Scope::logged_models()).map_err(bad)?;
    let max = int(&v, "max_results")?.map_or(100, |m| (m.max(1) as usize).min(MAX_MODELS_PER_PAGE));
    let offset = search::parse_page_token(&opt_text(&v, "page_token")).map_err(bad)?;
    api.read_barrier(false).await?;
    let mut models = Vec::new();
    for (_, bytes) in api
        .reader
        .scan(keys::LOGGED_MODEL.as_bytes(), MAX_SEARCHED_MODELS)
        .map_err(|e| Error::Internal(e.to_string()))?
    {
        let model = <LoggedModel as prost::Message>::decode(bytes.as_slice())
            .map_err(|e| Error::Internal(format!("decode logged model: {e}")))?;
        if (experiments.is_empty() || experiments.contains(&model.experiment_id))
            && filter.matches(&Found(&model))
        {
            models.push(model);
        }
    }
    // Newest first unless ordered otherwise; the id breaks ties.
    models.sort_by(|a, b| {
        search::compare(&Found(a), &Found(b), &order)
            .then_with(|| b.created_at_ms.cmp(&a.created_at_ms))
            .then_with(|| a.model_id.cmp(&b.model_id))
    });
    let (page, next) = search::page(models, offset, max);
    Ok(paged("models", page.iter().map(model_json).collect(), next))
}

impl Api {
    /// Returns the logged models a run produced, each with its files' count and
    /// bytes in the tags `kiln.files` and `kiln.bytes`.
    pub fn run_models(&self, run: &RunRecord) -> kiln_common::Result<Vec<LoggedModel>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for output in &run.outputs {
            if !seen.insert(output.model_id.as_str()) {
                continue;
            }
            let Some(mut model) = read_logged_model(&self.reader, &output.model_id)
                .map_err(|e| Error::Internal(e.to_string()))?
            else {
                continue;
            };
            let head = trees::read_head(
                &self.reader,
                &TreeOwner::Model(model.model_id.clone()).tree(),
            )
            .map_err(|e| Error::Internal(e.to_string()))?;
            model
                .tags
                .insert("kiln.files".into(), head.files.to_string());
            model
                .tags
                .insert("kiln.bytes".into(), head.bytes.to_string());
            out.push(model);
        }
        Ok(out)
    }
}
