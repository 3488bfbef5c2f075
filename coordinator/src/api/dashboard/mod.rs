//! The web dashboard under `/ui`, served by every coordinator from its own
//! replica of the state: server-rendered HTML with inline CSS and inline SVG
//! charts, no JavaScript.
//!
//! | route | shows | reads |
//! |---|---|---|
//! | `/ui` | leader, coordinators, workers, deployments, active jobs, firing alerts | `Api::cluster_status`, `Api::drift_status_call` |
//! | `/ui/jobs`, `/ui/jobs/{id}` | jobs; one job's loss and accuracy per step, shards, spec, log | `list_jobs_call`, `get_job_call`, `get_run_call`, `job_logs_call` |
//! | `/ui/runs`, `/ui/runs/compare?ids=a,b` | runs; params and final metrics side by side, a metric overlaid | `list_runs_call`, `get_run_call`, `state::tracking::history` |
//! | `/ui/deployments`, `/ui/deployments/{name}` | request rate, p50/p99, errors, live accuracy per version; replicas, canary, retrain policy, history | `list_deployments_call`, `get_deployment_call`, `state::serving::windows_since` |
//! | `/ui/drift`, `/ui/drift/{model}/{version}` | verdicts per column, reference and live histograms, alerts | `drift_status_call` |
//! | `/ui/login`, `/ui/logout` | the token cookie (see `session`) | tokens |
//!
//! Layout: `session` (who may look), `html` (escaping, frame, tables, formats),
//! `svg` (charts), and one module of pages per area (`cluster`, `training`,
//! `serving`, `drift`): pure functions from records to markup, which the
//! handlers here feed. Every page reads a bounded amount: the caps below, and
//! charts downsampled to `svg::MAX_POINTS` points a series.

mod cluster;
mod drift;
mod html;
mod serving;
mod session;
mod svg;
mod training;

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kiln_common::clock::now_ms;
use kiln_common::http::status_of;
use kiln_common::{Error, Result};
use kiln_proto::v1::{
    DriftStatusRequest, GetDeploymentRequest, GetJobRequest, GetRunRequest, JobLogsRequest,
    ListJobsRequest, ListRunsRequest, ModelDrift, RunRecord,
};

use super::grpc::Api;
use super::storage;
use crate::auth::Caller;

/// Most jobs, runs or deployments one list shows (the newest).
const MAX_LISTED: u32 = 200;
/// Most runs one comparison shows.
const MAX_COMPARED: usize = 10;
/// Newest log lines a job's page shows.
const MAX_LOG_LINES: u32 = 50;
/// Newest serving windows (one per version per window) a deployment's page reads.
const MAX_SERVING_WINDOWS: usize = 1_000;
/// Newest serving windows read per deployment for the list.
const LISTED_SERVING_WINDOWS: usize = 8;
/// Newest drift windows a model version's page reads.
const MAX_DRIFT_WINDOWS: u32 = 120;

/// The dashboard's routes, to merge into the coordinator's HTTP router. Every
/// page but the login goes through [`session::require_viewer`].
pub fn routes(api: Api) -> Router<Api> {
    let pages = Router::new()
        .route("/ui", get(overview))
        .route("/ui/jobs", get(jobs))
        .route("/ui/jobs/:id", get(job))
        .route("/ui/runs", get(runs))
        .route("/ui/runs/compare", get(compare))
        .route("/ui/deployments", get(deployments))
        .route("/ui/deployments/:name", get(deployment))
        .route("/ui/drift", get(drift_overview))
        .route("/ui/drift/:model/:version", get(drift_version))
        .route_layer(axum::middleware::from_fn_with_state(
            api,
            session::require_viewer,
        ));
    Router::new()
        .route(
            "/ui/login",
            get(session::login_get).post(session::login_post),
        )
        .route("/ui/logout", get(session::logout))
        .merge(pages)
}

/// An HTML answer that no cache keeps, no frame holds and no script runs in.
fn respond(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A page's title and body.
type Page = Result<(String, String)>;

/// Answers a page, or the error as a page with its status (404 for unknown
/// records).
fn render(api: &Api, path: &str, page: Page) -> Response {
    let view = api.node.view();
    let footer = format!(
        "drawn by coordinator {} ({}) from its replica at applied index {}",
        view.id, view.role, view.applied_index
    );
    match page {
        Ok((title, body)) => respond(StatusCode::OK, html::page(&title, path, &body, &footer)),
        Err(e) => {
            let status = status_of(&e);
            let title = if status == StatusCode::NOT_FOUND {
                "Not found"
            } else {
                "Error"
            };
            let body = format!("<p class=\"bad\">{}</p>", html::esc(&e.to_string()));
            respond(status, html::page(title, path, &body, &footer))
        }
    }
}

/// Draws a page with `page`'s title and body.
macro_rules! handler {
    ($name:ident, $page:ident $(, $arg:ident : $ty:ty)*) => {
        async fn $name(State(api): State<Api>, $($arg: $ty,)* uri: Uri) -> Response {
            render(&api, uri.path(), $page(&api $(, $arg)*).await)
        }
    };
}

handler!(overview, overview_page);
handler!(jobs, jobs_page);
handler!(job, job_page, id: Path<String>);
handler!(runs, runs_page);
handler!(compare, compare_page, pairs: Query<Vec<(String, String)>>);
handler!(deployments, deployments_page);
handler!(deployment, deployment_page, name: Path<String>);
handler!(drift_overview, drift_overview_page);
handler!(drift_version, drift_version_page, key: Path<(String, String)>);

async fn overview_page(api: &Api) -> Page {
    let status = api.cluster_status().await?;
    let drift = api
        .drift_status_call(DriftStatusRequest {
            model: String::new(),
            windows: 1,
        })
        .await?;
    let firing: Vec<_> = drift
        .alerts
        .into_iter()
        .filter(|a| a.resolved_at_ms == 0)
        .collect();
    Ok((
        "Cluster".to_string(),
        cluster::overview(
            &status,
            &firing,
            kiln_common::https::scheme(api.tls_enabled),
            now_ms(),
        ),
    ))
}

/// Who the dashboard reads as: a viewer, never a cluster node, so that it is
/// shown nothing only nodes may hold.
fn dashboard_reader() -> Caller {
    Caller::Token {
        name: "dashboard".to_string(),
        role: kiln_proto::v1::Role::Viewer,
    }
}

async fn jobs_page(api: &Api) -> Page {
    let list = api
        .list_jobs_call(
            &dashboard_reader(),
            ListJobsRequest {
                max_results: MAX_LISTED,
            },
        )
        .await?;
    Ok(("Jobs".to_string(), training::jobs(&list.jobs, now_ms())))
}

/// A number from a path, or a 404 naming what was looked for.
fn number(text: &str, what: &str) -> Result<u64> {
    text.parse()
        .map_err(|_| Error::NotFound(format!("no {what} {text}")))
}

async fn job_page(api: &Api, Path(id): Path<String>) -> Page {
    let job_id = number(&id, "job")?;
    let job = api
        .get_job_call(&dashboard_reader(), GetJobRequest { job_id })
        .await?
        .job
        .ok_or_else(|| Error::NotFound(format!("no job {job_id}")))?;
    let run = if job.run_id.is_empty() {
        None
    } else {
        let asked = GetRunRequest {
            run_id: job.run_id.clone(),
            with_history: true,
            with_files: false,
        };
        match api.get_run_call(asked).await {
            Ok(run) => Some(run),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e),
        }
    };
    let logs = api
        .job_logs_call(JobLogsRequest {
            job_id,
            after_seq: job.log_seq.saturating_sub(u64::from(MAX_LOG_LINES)),
            max_lines: MAX_LOG_LINES,
        })
        .await?;
    Ok((
        format!("Job {job_id}: {}", job.name),
        training::job(&job, run.as_ref(), &logs.lines, now_ms()),
    ))
}

async fn runs_page(api: &Api) -> Page {
    let list = api
        .list_runs_call(ListRunsRequest {
            experiment: String::new(),
            max_results: MAX_LISTED,
        })
        .await?;
    let experiments: BTreeMap<u64, String> = list.experiments.into_iter().collect();
    Ok((
        "Runs".to_string(),
        training::runs(&list.runs, &experiments, now_ms()),
    ))
}

/// The run ids a comparison names: `ids=a,b` and repeated `ids=` (the runs
/// list's checkboxes), in order, without repeats.
fn run_ids(pairs: &[(String, String)]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for id in pairs
        .iter()
        .filter(|(k, _)| k == "ids")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|id| !id.is_empty())
    {
        if !ids.iter().any(|known| known == id) {
            ids.push(id.to_string());
        }
    }
    ids
}

async fn compare_page(api: &Api, Query(pairs): Query<Vec<(String, String)>>) -> Page {
    let ids = run_ids(&pairs);
    if ids.is_empty() {
        return Err(Error::InvalidArgument(
            "name the runs to compare: /ui/runs/compare?ids=RUN,RUN".into(),
        ));
    }
    let dropped = ids.len().saturating_sub(MAX_COMPARED);
    let mut runs: Vec<(RunRecord, String)> = Vec::new();
    for run_id in ids.into_iter().take(MAX_COMPARED) {
        let got = api
            .get_run_call(GetRunRequest {
                run_id: run_id.clone(),
                with_history: false,
                with_files: false,
            })
            .await?;
        let run = got
            .run
            .ok_or_else(|| Error::NotFound(format!("run {run_id} does not exist")))?;
        runs.push((run, got.experiment));
    }
    let records: Vec<RunRecord> = runs.iter().map(|(r, _)| r.clone()).collect();
    let asked = pairs
        .iter()
        .find(|(k, _)| k == "metric")
        .map(|(_, v)| v.as_str());
    let metric = training::chosen_metric(&records, asked);
    let mut histories = Vec::new();
    if let Some(metric) = &metric {
        for run in &records {
            let points = crate::state::tracking::history(
                &api.reader,
                &run.run_id,
                metric,
                super::tracking::MAX_HISTORY,
            )
            .map_err(storage)?;
            histories.push(points);
        }
    }
    Ok((
        "Runs compared".to_string(),
        training::compare(&runs, metric.as_deref(), &histories, dropped),
    ))
}

async fn deployments_page(api: &Api) -> Page {
    let list = api.list_deployments_call().await?;
    let mut rows = Vec::new();
    for d in list.deployments.into_iter().take(MAX_LISTED as usize) {
        let newest =
            crate::state::serving::windows_since(&api.reader, &d.name, 0, LISTED_SERVING_WINDOWS)
                .map_err(storage)?;
        rows.push((d, newest));
    }
    Ok((
        "Deployments".to_string(),
        serving::deployments(&rows, now_ms()),
    ))
}

async fn deployment_page(api: &Api, Path(name): Path<String>) -> Page {
    let d = api
        .get_deployment_call(GetDeploymentRequest { name: name.clone() })
        .await?;
    let windows = crate::state::serving::windows_since(&api.reader, &name, 0, MAX_SERVING_WINDOWS)
        .map_err(storage)?;
    // Whether each version served answers classes (accuracy) or values (RMSE).
    let mut classifiers: HashMap<(String, u64), bool> = HashMap::new();
    for w in &windows {
        if let std::collections::hash_map::Entry::Vacant(slot) =
            classifiers.entry((w.model.clone(), w.version))
        {
            let model = crate::state::models::read_model(&api.reader, &w.model, w.version)
                .map_err(storage)?;
            slot.insert(model.is_some_and(|m| !m.classes.is_empty()));
        }
    }
    let classifier = |model: &str, version: u64| {
        classifiers
            .get(&(model.to_string(), version))
            .copied()
            .unwrap_or(false)
    };
    Ok((
        format!("Deployment {name}"),
        serving::deployment(&d, &windows, &classifier, now_ms()),
    ))
}

async fn drift_overview_page(api: &Api) -> Page {
    let status = api
        .drift_status_call(DriftStatusRequest {
            model: String::new(),
            windows: 1,
        })
        .await?;
    Ok(("Drift".to_string(), drift::overview(&status, now_ms())))
}

async fn drift_version_page(api: &Api, Path((model, version)): Path<(String, String)>) -> Page {
    let version = number(&version, &format!("version of model {model}:"))?;
    let status = api
        .drift_status_call(DriftStatusRequest {
            model: model.clone(),
            windows: MAX_DRIFT_WINDOWS,
        })
        .await?;
    let drift = match status.models.into_iter().find(|m| m.version == version) {
        Some(monitored) => monitored,
        None => {
            // A version with no judged window yet, if it exists at all.
            crate::state::models::read_model(&api.reader, &model, version)
                .map_err(storage)?
                .ok_or_else(|| {
                    Error::NotFound(format!("model {model} has no version {version}"))
                })?;
            ModelDrift::default()
        }
    };
    let alerts: Vec<_> = status
        .alerts
        .into_iter()
        .filter(|a| a.version == version)
        .collect();
    Ok((
        format!("Drift of {model}@{version}"),
        drift::version(&drift, &alerts, now_ms()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compared_runs_come_from_lists_and_repeats_in_order() {
        let pairs = vec![
            ("ids".to_string(), "b, a".to_string()),
            ("metric".to_string(), "x".to_string()),
            ("ids".to_string(), "c".to_string()),
            ("ids".to_string(), "a".to_string()),
            ("ids".to_string(), ",".to_string()),
        ];
        assert_eq!(run_ids(&pairs), ["b", "a", "c"]);
        assert!(run_ids(&[]).is_empty());
    }
}
