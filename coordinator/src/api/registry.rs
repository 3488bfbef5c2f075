//! MLflow's model registry REST API (`/api/2.0/mlflow/registered-models/...` and
//! `/model-versions/...`) over kiln's registry: one registry, two doors. A
//! version created through MLflow is a kiln [`ModelVersion`] with its run as
//! lineage; kiln's aliases are MLflow's aliases.
//!
//! Registering a version freezes its files: the logged model's (or run folder's)
//! files become a committed version of the artifact `<model>-model`, the same
//! artifact kiln's own registrations use, sharing the chunks (no bytes are
//! copied). A version whose files hold `model.onnx` can be deployed at once; one
//! without (a pickled scikit-learn model, files outside kiln) is kept with the
//! reason in `undeployable`, which `kiln deploy` gives when it refuses it. Its
//! files are served back through the artifact proxy at
//! `mlflow-artifacts:/registry/<model>/<version>`, which is what
//! `get-download-uri` answers and `models:/name@alias` resolves to.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt as _;
use kiln_common::artifact::{model_artifact, validate_name, validate_tag};
use kiln_common::transfer::{self, ChunkSources};
use kiln_common::Error;
use kiln_proto::v1::*;
use prost::Message as _;
use serde_json::{json, Value};

use super::grpc::{audited, Api};
use super::search::{self, Scope, Searchable};
use super::tracking::{
    bad, body, caller, int, opt_text, paged, pairs, pairs_json, tag_key, tag_pair, ApiError,
    ApiResult,
};
use crate::auth::{Caller, Permission};
use crate::state::artifacts::read_record;
use crate::state::keys;
use crate::state::models::{self, latest, read_model, MAX_MODEL_VERSIONS};
use crate::state::trees::{read_logged_model, TreeOwner};

/// Most registered models or versions one search reads.
pub const MAX_SEARCHED: usize = 100_000;
/// Most registered models one search page returns (MLflow's limit).
pub const MAX_MODELS_PER_PAGE: usize = 1000;
/// Most versions one search page returns.
pub const MAX_VERSIONS_PER_PAGE: usize = 200_000;
/// Largest model.onnx read to check for weights kept in external files.
pub const MAX_CHECKED_ONNX_BYTES: u64 = 512 << 20;
/// The file a version must hold to be served.
pub const MODEL_FILE: &str = "model.onnx";

/// The registry routes, to merge into the coordinator's HTTP router.
pub fn routes() -> Router<Api> {
    let rm = "/api/2.0/mlflow/registered-models";
    let mv = "/api/2.0/mlflow/model-versions";
    Router::new()
        .route(&format!("{rm}/create"), post(create_model))
        .route(&format!("{rm}/get"), get(get_model))
        .route(&format!("{rm}/rename"), post(rename_model))
        .route(&format!("{rm}/update"), axum::routing::patch(update_model))
        .route(&format!("{rm}/delete"), axum::routing::delete(delete_model))
        .route(&format!("{rm}/search"), get(search_models))
        .route(&format!("{rm}/set-tag"), post(set_model_tag))
        .route(
            &format!("{rm}/delete-tag"),
            axum::routing::delete(delete_model_tag),
        )
        .route(
            &format!("{rm}/get-latest-versions"),
            post(latest_versions).get(latest_versions_query),
        )
        .route(
            &format!("{rm}/alias"),
            post(set_alias).delete(delete_alias).get(get_by_alias),
        )
        .route(&format!("{mv}/create"), post(create_version))
        .route(&format!("{mv}/get"), get(get_version))
        .route(
            &format!("{mv}/update"),
            axum::routing::patch(update_version),
        )
        .route(
            &format!("{mv}/delete"),
            axum::routing::delete(delete_version),
        )
        .route(&format!("{mv}/search"), get(search_versions))
        .route(&format!("{mv}/get-download-uri"), get(download_uri))
        .route(&format!("{mv}/set-tag"), post(set_version_tag))
        .route(
            &format!("{mv}/delete-tag"),
            axum::routing::delete(delete_version_tag),
        )
}

fn not_found(what: String) -> ApiError {
    ApiError("RESOURCE_DOES_NOT_EXIST", StatusCode::NOT_FOUND, what)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    Error::Internal(e.to_string()).into()
}

/// A model name as kiln accepts it, or MLflow's error naming the rule.
fn model_name(v: &Value, key: &str) -> Result<String, ApiError> {
    let name = super::tracking::text(v, key)?;
    validate_name(name).map_err(|e| bad(e.to_string()))?;
    Ok(name.to_string())
}

/// A version number given as a string or a number.
fn version_of(v: &Value) -> Result<u64, ApiError> {
    match int(v, "version")? {
        Some(n) if n > 0 => Ok(n as u64),
        _ => Err(bad("'version' must be a version number (1, 2, ...)")),
    }
}

/// The query string as a JSON object (a repeated key becomes a list).
fn query_json(pairs: &[(String, String)]) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in pairs {
        match out.get_mut(k) {
            Some(Value::Array(items)) => items.push(json!(v)),
            Some(first) => *first = json!([first.clone(), v]),
            None => {
                out.insert(k.clone(), json!(v));
            }
        }
    }
    Value::Object(out)
}

/// A list of strings given as one string or a list.
fn strings(v: &Value, key: &str) -> Vec<String> {
    match v.get(key) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Returns a model's aliases by name.
fn aliases_of(api: &Api, name: &str) -> Result<Vec<(String, u64)>, ApiError> {
    let prefix = keys::model_aliases(name);
    let mut out = Vec::new();
    for (key, value) in api.reader.scan(&prefix, MAX_SEARCHED).map_err(internal)? {
        let alias = String::from_utf8_lossy(&key[prefix.len()..]).to_string();
        let version = value
            .as_slice()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| internal(format!("alias {alias} of {name} is corrupt")))?;
        out.push((alias, version));
    }
    Ok(out)
}

/// Returns every version of a model, oldest first.
fn versions_of(api: &Api, name: &str) -> Result<Vec<ModelVersion>, ApiError> {
    api.reader
        .scan(&keys::model_versions(name), MAX_SEARCHED)
        .map_err(internal)?
        .into_iter()
        .map(|(_, bytes)| ModelVersion::decode(bytes.as_slice()).map_err(internal))
        .collect()
}

/// A model's own record, or one made from its versions; None when it does not
/// exist.
fn record_of(api: &Api, name: &str) -> Result<Option<RegisteredModel>, ApiError> {
    models::record_or_default(&api.reader, name).map_err(internal)
}

fn version_json(m: &ModelVersion, aliases: &[(String, u64)]) -> Value {
    let mine: Vec<&str> = aliases
        .iter()
        .filter(|(_, v)| *v == m.version)
        .map(|(a, _)| a.as_str())
        .collect();
    json!({
        "name": m.name,
        "version": m.version.to_string(),
        "creation_timestamp": m.created_at_ms,
        "last_updated_timestamp": m.updated_at_ms.max(m.created_at_ms),
        "user_id": m.created_by,
        "current_stage": "None",
        "description": m.description,
        "source": if m.source.is_empty() { download_uri_of(m) } else { m.source.clone() },
        "run_id": m.run_id,
        "status": "READY",
        "status_message": m.undeployable,
        "run_link": "",
        "tags": pairs_json(&m.tags),
        "aliases": mine,
        "model_id": m.model_id,
    })
}

/// Where a version's files are served through the artifact proxy.
fn download_uri_of(m: &ModelVersion) -> String {
    if m.artifact.is_empty() {
        m.source.clone()
    } else {
        format!("mlflow-artifacts:/registry/{}/{}", m.name, m.version)
    }
}

fn model_json(api: &Api, record: &RegisteredModel) -> Result<Value, ApiError> {
    let aliases = aliases_of(api, &record.name)?;
    let newest = latest(&api.reader, &record.name).map_err(internal)?;
    let latest_versions: Vec<Value> = read_model(&api.reader, &record.name, newest)
        .map_err(internal)?
        .iter()
        .map(|m| version_json(m, &aliases))
        .collect();
    Ok(json!({
        "name": record.name,
        "creation_timestamp": record.created_at_ms,
        "last_updated_timestamp": record.updated_at_ms,
        "description": record.description,
        "latest_versions": latest_versions,
        "tags": pairs_json(&record.tags),
        "aliases": aliases.iter().map(|(a, v)| json!({"alias": a, "version": v.to_string()})).collect::<Vec<_>>(),
    }))
}

async fn propose(
    api: &Api,
    caller: &Caller,
    what: String,
    kind: command::Kind,
) -> Result<u64, ApiError> {
    Ok(api.propose(audited(caller, what, kind), false).await?.value)
}

async fn model_answer(api: &Api, name: &str) -> ApiResult {
    api.read_barrier(false).await?;
    let record = record_of(api, name)?
        .ok_or_else(|| not_found(format!("registered model {name} does not exist")))?;
    Ok(Json(json!({"registered_model": model_json(api, &record)?})))
}

async fn create_model(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "registered-models/create",
    )?;
    let v = body(&raw)?;
    let name = model_name(&v, "name")?;
    let model = RegisteredModel {
        name: name.clone(),
        description: opt_text(&v, "description"),
        tags: pairs(&v, "tags")?,
        ..Default::default()
    };
    let kind = command::Kind::CreateRegisteredModel(CreateRegisteredModel { model: Some(model) });
    propose(
        &api,
        &caller,
        format!("create registered model {name}"),
        kind,
    )
    .await?;
    model_answer(&api, &name).await
}

async fn get_model(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "registered-models/get")?;
    let v = query_json(&q);
    model_answer(&api, super::tracking::text(&v, "name")?).await
}

async fn update_record(
    api: &Api,
    caller: &Caller,
    path: &str,
    update: UpdateRegisteredModel,
) -> Result<(), ApiError> {
    let what = format!("{path} {}", update.name);
    propose(
        api,
        caller,
        what,
        command::Kind::UpdateRegisteredModel(update),
    )
    .await?;
    Ok(())
}

async fn update_model(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "registered-models/update",
    )?;
    let v = body(&raw)?;
    let name = model_name(&v, "name")?;
    let update = UpdateRegisteredModel {
        name: name.clone(),
        set_description: v.get("description").is_some(),
        description: opt_text(&v, "description"),
        ..Default::default()
    };
    update_record(&api, &caller, "registered-models/update", update).await?;
    model_answer(&api, &name).await
}

async fn set_model_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "registered-models/set-tag",
    )?;
    let v = body(&raw)?;
    let update = UpdateRegisteredModel {
        name: model_name(&v, "name")?,
        set_tags: tag_pair(&v)?,
        ..Default::default()
    };
    update_record(&api, &caller, "registered-models/set-tag", update).await?;
    Ok(Json(json!({})))
}

async fn delete_model_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "registered-models/delete-tag",
    )?;
    let v = body(&raw)?;
    let update = UpdateRegisteredModel {
        name: model_name(&v, "name")?,
        delete_tags: tag_key(&v)?,
        ..Default::default()
    };
    update_record(&api, &caller, "registered-models/delete-tag", update).await?;
    Ok(Json(json!({})))
}

/// Refuses to change a model (any version: `None`) or one version that a
/// deployment serves, naming the deployment.
fn check_not_deployed(api: &Api, name: &str, version: Option<u64>) -> Result<(), ApiError> {
    for d in api.deployments()? {
        let serves = [&d.primary, &d.canary]
            .into_iter()
            .flatten()
            .any(|t| t.model == name && version.is_none_or(|v| t.version == v));
        if serves {
            let what = version.map_or_else(|| format!("model {name}"), |v| format!("{name}@{v}"));
            return Err(ApiError(
                "INVALID_STATE",
                StatusCode::BAD_REQUEST,
                format!(
                    "deployment {} serves {what}; remove it or move it off first \
                     (kiln deployments rm {} | kiln deploy {} --model ...)",
                    d.name, d.name, d.name
                ),
            ));
        }
    }
    Ok(())
}

/// The versions and aliases of a model as they stand, for a rename or delete.
fn listed(api: &Api, name: &str) -> Result<(Vec<u64>, Vec<String>), ApiError> {
    let versions: Vec<u64> = versions_of(api, name)?.iter().map(|m| m.version).collect();
    if versions.len() as u64 > MAX_MODEL_VERSIONS {
        return Err(bad(format!(
            "model {name} has more than {MAX_MODEL_VERSIONS} versions"
        )));
    }
    let aliases = aliases_of(api, name)?.into_iter().map(|(a, _)| a).collect();
    Ok((versions, aliases))
}

async fn rename_model(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "registered-models/rename",
    )?;
    let v = body(&raw)?;
    let name = model_name(&v, "name")?;
    let new_name = model_name(&v, "new_name")?;
    api.read_barrier(false).await?;
    check_not_deployed(&api, &name, None)?;
    let (versions, aliases) = listed(&api, &name)?;
    let kind = command::Kind::RenameRegisteredModel(RenameRegisteredModel {
        name: name.clone(),
        new_name: new_name.clone(),
        versions,
        aliases,
    });
    propose(
        &api,
        &caller,
        format!("rename model {name} to {new_name}"),
        kind,
    )
    .await?;
    model_answer(&api, &new_name).await
}

async fn delete_model(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "registered-models/delete",
    )?;
    let v = body(&raw)?;
    let name = model_name(&v, "name")?;
    api.read_barrier(false).await?;
    check_not_deployed(&api, &name, None)?;
    let (versions, aliases) = listed(&api, &name)?;
    let kind = command::Kind::DeleteRegisteredModel(DeleteRegisteredModel {
        name: name.clone(),
        versions,
        aliases,
    });
    propose(&api, &caller, format!("delete model {name}"), kind).await?;
    Ok(Json(json!({})))
}

/// A registered model as search reads it.
struct FoundModel<'a>(&'a RegisteredModel);

impl Searchable for FoundModel<'_> {
    fn value(&self, field: &search::Field) -> Option<search::Value> {
        use search::{Field, Value as V};
        let m = self.0;
        match field {
            Field::Tag(k) => m.tags.get(k).map(|v| V::Text(v.clone())),
            Field::Attribute(a) => match a.as_str() {
                "name" => Some(V::Text(m.name.clone())),
                "creation_timestamp" => Some(V::Number(m.created_at_ms as f64)),
                "last_updated_timestamp" => Some(V::Number(m.updated_at_ms as f64)),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Every model name: those with records and those with versions.
fn model_names(api: &Api) -> Result<Vec<String>, ApiError> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in [keys::REGISTERED_MODEL, keys::MODEL_HEAD] {
        for (key, _) in api
            .reader
            .scan(prefix.as_bytes(), MAX_SEARCHED)
            .map_err(internal)?
        {
            names.insert(String::from_utf8_lossy(&key[prefix.len()..]).to_string());
        }
    }
    Ok(names.into_iter().collect())
}

/// The search parameters every search takes: filter, order_by, max_results, page_token.
struct SearchAsk {
    filter: search::Filter,
    order: Vec<search::OrderKey>,
    max: usize,
    offset: usize,
}

fn search_ask(
    v: &Value,
    scope: &Scope,
    default_max: usize,
    most: usize,
) -> Result<SearchAsk, ApiError> {
    Ok(SearchAsk {
        filter: search::Filter::parse(&opt_text(v, "filter"), scope).map_err(bad)?,
        order: search::parse_order_by(&strings(v, "order_by"), scope).map_err(bad)?,
        max: match int(v, "max_results")? {
            None => default_max,
            Some(m) if m >= 1 && m as usize <= most => m as usize,
            Some(m) => return Err(bad(format!("max_results {m} is out of range: 1 to {most}"))),
        },
        offset: search::parse_page_token(&opt_text(v, "page_token")).map_err(bad)?,
    })
}

async fn search_models(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "registered-models/search")?;
    let v = query_json(&q);
    let ask = search_ask(&v, &Scope::registered_models(), 100, MAX_MODELS_PER_PAGE)?;
    api.read_barrier(false).await?;
    let mut found = Vec::new();
    for name in model_names(&api)? {
        if let Some(record) = record_of(&api, &name)? {
            if ask.filter.matches(&FoundModel(&record)) {
                found.push(record);
            }
        }
    }
    // By name unless ordered otherwise.
    found.sort_by(|a, b| {
        search::compare(&FoundModel(a), &FoundModel(b), &ask.order)
            .then_with(|| a.name.cmp(&b.name))
    });
    let (page, next) = search::page(found, ask.offset, ask.max);
    let models = page
        .iter()
        .map(|r| model_json(&api, r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(paged("registered_models", models, next))
}

async fn latest_answer(api: &Api, v: &Value) -> ApiResult {
    let name = model_name(v, "name")?;
    api.read_barrier(false).await?;
    if record_of(api, &name)?.is_none() {
        return Err(not_found(format!("registered model {name} does not exist")));
    }
    // Stages are gone from MLflow's registry; every version is in "None".
    let stages = strings(v, "stages");
    let wants_none = stages.is_empty() || stages.iter().any(|s| s.eq_ignore_ascii_case("none"));
    let aliases = aliases_of(api, &name)?;
    let newest = latest(&api.reader, &name).map_err(internal)?;
    let versions: Vec<Value> = match read_model(&api.reader, &name, newest).map_err(internal)? {
        Some(m) if wants_none => vec![version_json(&m, &aliases)],
        _ => Vec::new(),
    };
    Ok(Json(json!({"model_versions": versions})))
}

async fn latest_versions(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    caller(
        &api,
        &headers,
        Permission::Read,
        "registered-models/get-latest-versions",
    )?;
    latest_answer(&api, &body(&raw)?).await
}

async fn latest_versions_query(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(
        &api,
        &headers,
        Permission::Read,
        "registered-models/get-latest-versions",
    )?;
    latest_answer(&api, &query_json(&q)).await
}

async fn set_alias(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "registered-models/alias")?;
    let v = body(&raw)?;
    let name = model_name(&v, "name")?;
    let alias = super::tracking::text(&v, "alias")?.to_string();
    validate_tag(&alias).map_err(|e| bad(format!("alias: {e}")))?;
    let set = SetModelAlias {
        name: name.clone(),
        alias: alias.clone(),
        version: version_of(&v)?,
    };
    let what = format!("alias {name}@{} as {alias}", set.version);
    propose(&api, &caller, what, command::Kind::SetModelAlias(set)).await?;
    Ok(Json(json!({})))
}

async fn delete_alias(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "registered-models/alias")?;
    let v = body(&raw)?;
    let name = model_name(&v, "name")?;
    let alias = super::tracking::text(&v, "alias")?.to_string();
    let set = SetModelAlias {
        name: name.clone(),
        alias: alias.clone(),
        version: 0,
    };
    propose(
        &api,
        &caller,
        format!("remove alias {alias} of model {name}"),
        command::Kind::SetModelAlias(set),
    )
    .await?;
    Ok(Json(json!({})))
}

async fn get_by_alias(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "registered-models/alias")?;
    let v = query_json(&q);
    let name = model_name(&v, "name")?;
    let alias = super::tracking::text(&v, "alias")?;
    api.read_barrier(false).await?;
    let version = models::alias(&api.reader, &name, alias).map_err(internal)?;
    let model = read_model(&api.reader, &name, version)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("registered model {name} has no alias {alias}")))?;
    let aliases = aliases_of(&api, &name)?;
    Ok(Json(
        json!({"model_version": version_json(&model, &aliases)}),
    ))
}

/// Where a version's files are in kiln: a tree and a folder in it.
fn files_of_source(source: &str, model_id: &str) -> Option<(String, String)> {
    if !model_id.is_empty() && (source.is_empty() || source == format!("models:/{model_id}")) {
        return Some((TreeOwner::Model(model_id.to_string()).tree(), String::new()));
    }
    if let Some(id) = source.strip_prefix("models:/") {
        if crate::state::trees::valid_model_id(id) {
            return Some((TreeOwner::Model(id.to_string()).tree(), String::new()));
        }
        return None;
    }
    if let Some(rest) = source.strip_prefix("runs:/") {
        let (run, dir) = rest.split_once('/').unwrap_or((rest, ""));
        return Some((
            TreeOwner::Run(run.to_string()).tree(),
            dir.trim_matches('/').to_string(),
        ));
    }
    let rest = source
        .strip_prefix("mlflow-artifacts:")?
        .trim_start_matches('/');
    let parts: Vec<&str> = rest.splitn(4, '/').collect();
    match parts.as_slice() {
        [_, "models", id, rest @ ..] => {
            let rest = rest.first().copied().unwrap_or_default();
            let dir = rest.strip_prefix("artifacts").unwrap_or(rest);
            Some((
                TreeOwner::Model(id.to_string()).tree(),
                dir.trim_matches('/').to_string(),
            ))
        }
        [_, run, "artifacts", rest @ ..] => Some((
            TreeOwner::Run(run.to_string()).tree(),
            rest.first()
                .copied()
                .unwrap_or_default()
                .trim_matches('/')
                .to_string(),
        )),
        _ => None,
    }
}

/// A version's files as [`freeze`] made them an artifact.
struct Frozen {
    /// NAME@VERSION, or empty when kiln does not hold the files.
    artifact: String,
    /// Why it cannot be served; empty when it can.
    undeployable: String,
    /// Engines known not to load it, with why (`ModelVersion.refused_engines`).
    refused_engines: std::collections::BTreeMap<String, String>,
}

/// Freezes a version's files (when kiln holds them) into the next version of the
/// model's artifact, and says why it cannot be served when it cannot.
async fn freeze(
    api: &Api,
    caller: &Caller,
    name: &str,
    source: &str,
    model_id: &str,
    run_id: &str,
) -> Result<Frozen, ApiError> {
    let Some((tree, dir)) = files_of_source(source, model_id) else {
        return Ok(Frozen {
            artifact: String::new(),
            undeployable: format!("its files are at {source}, outside kiln's artifact store"),
            refused_engines: Default::default(),
        });
    };
    let skip = if dir.is_empty() { 0 } else { dir.len() + 1 };
    let files: Vec<ArtifactFile> = api
        .tree_files(&tree, &dir)?
        .into_iter()
        .filter_map(|f| {
            let path = f.path.get(skip..)?.to_string();
            Some(ArtifactFile { path, ..f })
        })
        .collect();
    if files.is_empty() {
        return Ok(Frozen {
            artifact: String::new(),
            undeployable: format!("kiln holds no files at {source}"),
            refused_engines: Default::default(),
        });
    }
    let mut refused_engines = std::collections::BTreeMap::new();
    let undeployable = match files.iter().find(|f| f.path == MODEL_FILE) {
        None => format!(
            "its files hold no {MODEL_FILE} ({}): kiln serves ONNX models",
            files
                .iter()
                .take(8)
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(onnx) => match onnx_problem(api, onnx, &files).await {
            Checked::Problem(why) => why,
            Checked::TractRefuses(why) => {
                refused_engines.insert("tract".to_string(), why);
                String::new()
            }
            Checked::Fine => String::new(),
        },
    };
    let version = ArtifactVersion {
        name: model_artifact(name),
        size: files.iter().map(|f| f.size).sum(),
        digest: transfer::directory_digest(&files),
        media_type: "application/vnd.mlflow.model".into(),
        metadata: [("mlflow.source".to_string(), source.to_string())].into(),
        produced_by: run_id.to_string(),
        directory: true,
        files,
        replicas: kiln_common::artifact::DEFAULT_REPLICAS,
        ..Default::default()
    };
    let what = format!("freeze {source} as {}", version.name);
    let kind = command::Kind::CommitArtifact(CommitArtifact {
        version: Some(version),
        placements: Vec::new(),
        tags: Vec::new(),
    });
    let number = propose(api, caller, what, kind).await?;
    Ok(Frozen {
        artifact: format!("{}@{number}", model_artifact(name)),
        undeployable,
        refused_engines,
    })
}

/// What [`onnx_problem`] found.
enum Checked {
    /// Servable as far as can be told here.
    Fine,
    /// Servable by ONNX Runtime, not tract (strings, ZipMap, external data
    /// logged beside it), and why.
    TractRefuses(String),
    /// Not servable, and why.
    Problem(String),
}

/// Reads model.onnx and says why kiln cannot serve it, if it can tell: it is not
/// ONNX, or it keeps tensors in external files (ONNX's external data, which
/// mlflow.onnx writes by default) that the logged `files` do not hold.
async fn onnx_problem(api: &Api, file: &ArtifactFile, files: &[ArtifactFile]) -> Checked {
    if file.size > MAX_CHECKED_ONNX_BYTES {
        return Checked::Fine;
    }
    let Ok(sources) = api.chunk_sources(std::slice::from_ref(file)) else {
        return Checked::Fine;
    };
    let sources: ChunkSources = sources.into_iter().map(|s| (s.id, s.replicas)).collect();
    let chunks: Result<Vec<Vec<u8>>, _> =
        transfer::file_chunks(Arc::clone(&api.peers), Arc::new(sources), file)
            .try_collect()
            .await;
    let Ok(chunks) = chunks else {
        return Checked::Fine;
    };
    let bytes = chunks.concat();
    // Decoded once for both questions below.
    let Ok(model) = kiln_proto::onnx::ModelProto::decode(bytes.as_slice()) else {
        return Checked::Problem(format!("its {MODEL_FILE} is not an ONNX model"));
    };
    let locations = match kiln_common::onnx::locations_in(&model) {
        Ok(locations) => locations,
        Err(e) => return Checked::Problem(format!("its {MODEL_FILE}: {e}")),
    };
    let missing: Vec<&String> = locations
        .iter()
        .filter(|l| !files.iter().any(|f| &f.path == *l))
        .collect();
    if missing.is_empty() {
        return match kiln_common::onnx::tract_refusal(&model) {
            Some(why) => Checked::TractRefuses(why),
            None => Checked::Fine,
        };
    }
    Checked::Problem(format!(
        "{MODEL_FILE} keeps tensors in external files that were not logged beside it: {}",
        missing
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

async fn create_version(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "model-versions/create")?;
    let v = body(&raw)?;
    let name = model_name(&v, "name")?;
    let source = opt_text(&v, "source");
    let model_id = opt_text(&v, "model_id");
    let mut run_id = opt_text(&v, "run_id");
    api.read_barrier(false).await?;
    if record_of(&api, &name)?.is_none() {
        return Err(not_found(format!("registered model {name} does not exist")));
    }
    if run_id.is_empty() && !model_id.is_empty() {
        if let Some(logged) = read_logged_model(&api.reader, &model_id).map_err(internal)? {
            run_id = logged.source_run_id;
        }
    }
    // The run's training data, when it logged a kiln dataset as an input.
    let dataset = if run_id.is_empty() {
        String::new()
    } else {
        read_record::<RunRecord>(&api.reader, &keys::run(&run_id), "decode run")
            .map_err(internal)?
            .and_then(|r| r.inputs.into_iter().find(|d| !d.artifact.is_empty()))
            .map(|d| d.artifact)
            .unwrap_or_default()
    };
    let frozen = freeze(&api, &caller, &name, &source, &model_id, &run_id).await?;
    let model = ModelVersion {
        name: name.clone(),
        artifact: frozen.artifact,
        run_id,
        dataset,
        description: opt_text(&v, "description"),
        tags: pairs(&v, "tags")?,
        source,
        model_id,
        undeployable: frozen.undeployable,
        refused_engines: frozen.refused_engines,
        ..Default::default()
    };
    let what = format!("register a version of model {name}");
    let kind = command::Kind::RegisterModel(RegisterModel {
        model: Some(model),
        require_registered: true,
    });
    let version = propose(&api, &caller, what, kind).await?;
    version_answer(&api, &name, version).await
}

async fn version_answer(api: &Api, name: &str, version: u64) -> ApiResult {
    api.read_barrier(false).await?;
    let model = read_model(&api.reader, name, version)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("model version {name}/{version} does not exist")))?;
    let aliases = aliases_of(api, name)?;
    Ok(Json(
        json!({"model_version": version_json(&model, &aliases)}),
    ))
}

async fn get_version(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "model-versions/get")?;
    let v = query_json(&q);
    version_answer(&api, &model_name(&v, "name")?, version_of(&v)?).await
}

async fn change_version(
    api: &Api,
    caller: &Caller,
    path: &str,
    update: UpdateModelVersion,
) -> Result<(), ApiError> {
    let what = format!("{path} {}/{}", update.name, update.version);
    propose(api, caller, what, command::Kind::UpdateModelVersion(update)).await?;
    Ok(())
}

async fn update_version(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "model-versions/update")?;
    let v = body(&raw)?;
    let (name, version) = (model_name(&v, "name")?, version_of(&v)?);
    let update = UpdateModelVersion {
        name: name.clone(),
        version,
        set_description: v.get("description").is_some(),
        description: opt_text(&v, "description"),
        ..Default::default()
    };
    change_version(&api, &caller, "model-versions/update", update).await?;
    version_answer(&api, &name, version).await
}

async fn delete_version(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "model-versions/delete")?;
    let v = body(&raw)?;
    let (name, version) = (model_name(&v, "name")?, version_of(&v)?);
    api.read_barrier(false).await?;
    check_not_deployed(&api, &name, Some(version))?;
    let aliases = aliases_of(&api, &name)?
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    let update = UpdateModelVersion {
        name,
        version,
        delete: true,
        aliases,
        ..Default::default()
    };
    change_version(&api, &caller, "model-versions/delete", update).await?;
    Ok(Json(json!({})))
}

async fn set_version_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(&api, &headers, Permission::Write, "model-versions/set-tag")?;
    let v = body(&raw)?;
    let update = UpdateModelVersion {
        name: model_name(&v, "name")?,
        version: version_of(&v)?,
        set_tags: tag_pair(&v)?,
        ..Default::default()
    };
    change_version(&api, &caller, "model-versions/set-tag", update).await?;
    Ok(Json(json!({})))
}

async fn delete_version_tag(State(api): State<Api>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    let caller = caller(
        &api,
        &headers,
        Permission::Write,
        "model-versions/delete-tag",
    )?;
    let v = body(&raw)?;
    let update = UpdateModelVersion {
        name: model_name(&v, "name")?,
        version: version_of(&v)?,
        delete_tags: tag_key(&v)?,
        ..Default::default()
    };
    change_version(&api, &caller, "model-versions/delete-tag", update).await?;
    Ok(Json(json!({})))
}

/// A model version as search reads it.
struct FoundVersion<'a>(&'a ModelVersion);

impl Searchable for FoundVersion<'_> {
    fn value(&self, field: &search::Field) -> Option<search::Value> {
        use search::{Field, Value as V};
        let m = self.0;
        match field {
            Field::Tag(k) => m.tags.get(k).map(|v| V::Text(v.clone())),
            Field::Attribute(a) => match a.as_str() {
                "name" => Some(V::Text(m.name.clone())),
                "version_number" | "version" => Some(V::Number(m.version as f64)),
                "run_id" => Some(V::Text(m.run_id.clone())),
                "source_path" | "source" => Some(V::Text(m.source.clone())),
                "current_stage" => Some(V::Text("None".into())),
                "model_id" => Some(V::Text(m.model_id.clone())),
                "creation_timestamp" => Some(V::Number(m.created_at_ms as f64)),
                "last_updated_timestamp" => {
                    Some(V::Number(m.updated_at_ms.max(m.created_at_ms) as f64))
                }
                _ => None,
            },
            _ => None,
        }
    }
}

async fn search_versions(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(&api, &headers, Permission::Read, "model-versions/search")?;
    let v = query_json(&q);
    let ask = search_ask(&v, &Scope::model_versions(), 10_000, MAX_VERSIONS_PER_PAGE)?;
    api.read_barrier(false).await?;
    let mut found = Vec::new();
    for name in model_names(&api)? {
        for m in versions_of(&api, &name)? {
            if ask.filter.matches(&FoundVersion(&m)) {
                found.push(m);
            }
            if found.len() > MAX_SEARCHED {
                return Err(bad(format!(
                    "more than {MAX_SEARCHED} versions match; narrow the filter"
                )));
            }
        }
    }
    // Newest first unless ordered otherwise.
    found.sort_by(|a, b| {
        search::compare(&FoundVersion(a), &FoundVersion(b), &ask.order)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| b.version.cmp(&a.version))
    });
    let (page, next) = search::page(found, ask.offset, ask.max);
    let mut aliases: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    let mut versions = Vec::with_capacity(page.len());
    for m in &page {
        if !aliases.contains_key(&m.name) {
            aliases.insert(m.name.clone(), aliases_of(&api, &m.name)?);
        }
        versions.push(version_json(m, &aliases[&m.name]));
    }
    Ok(paged("model_versions", versions, next))
}

async fn download_uri(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(
        &api,
        &headers,
        Permission::Read,
        "model-versions/get-download-uri",
    )?;
    let v = query_json(&q);
    let (name, version) = (model_name(&v, "name")?, version_of(&v)?);
    api.read_barrier(false).await?;
    let model = read_model(&api.reader, &name, version)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("model version {name}/{version} does not exist")))?;
    Ok(Json(json!({"artifact_uri": download_uri_of(&model)})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_source_names_the_tree_and_folder_that_hold_its_files() {
        let id = "m-0123456789abcdef0123456789abcdef";
        let run = "0123456789abcdef0123456789abcdef";
        let model_tree = TreeOwner::Model(id.into()).tree();
        let run_tree = TreeOwner::Run(run.into()).tree();
        assert_eq!(
            files_of_source(&format!("models:/{id}"), ""),
            Some((model_tree.clone(), String::new()))
        );
        assert_eq!(
            files_of_source("", id),
            Some((model_tree.clone(), String::new()))
        );
        assert_eq!(
            files_of_source(&format!("mlflow-artifacts:/2/models/{id}/artifacts"), ""),
            Some((model_tree, String::new()))
        );
        assert_eq!(
            files_of_source(&format!("runs:/{run}/model"), ""),
            Some((run_tree.clone(), "model".into()))
        );
        assert_eq!(
            files_of_source(
                &format!("mlflow-artifacts:/2/{run}/artifacts/nested/model"),
                ""
            ),
            Some((run_tree, "nested/model".into()))
        );
        assert_eq!(files_of_source("s3://bucket/model", ""), None);
        assert_eq!(files_of_source("models:/not-an-id", ""), None);
    }

    #[test]
    fn repeated_query_keys_become_lists() {
        let q = vec![
            ("name".to_string(), "m".to_string()),
            ("order_by".to_string(), "name ASC".to_string()),
            ("order_by".to_string(), "version_number DESC".to_string()),
        ];
        let v = query_json(&q);
        assert_eq!(v["name"], "m");
        assert_eq!(
            strings(&v, "order_by"),
            vec!["name ASC", "version_number DESC"]
        );
        assert_eq!(strings(&v, "name"), vec!["m"]);
    }
}
