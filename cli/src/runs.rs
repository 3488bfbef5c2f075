//! `kiln runs ls | show | compare`: the tracked runs, read through the
//! coordinators' gRPC API (programs log to them through the REST API).

use std::collections::{BTreeMap, BTreeSet};

use kiln_common::client::ClusterClient;
use kiln_proto::v1::{
    GetRunRequest, GetRunResponse, ListRunsRequest, LoggedModel, MetricPoint, RunRecord,
};
use serde_json::{json, Value};

use crate::RunsCommand;

/// A metric's history in a few numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub points: usize,
    pub first: f64,
    pub min: f64,
    pub max: f64,
    pub last: f64,
}

/// Summarises points in step order (NaNs are skipped for min and max).
pub fn summarise(points: &[MetricPoint]) -> Option<Summary> {
    let first = points.first()?.value;
    let last = points.last()?.value;
    let finite = points.iter().map(|p| p.value).filter(|v| !v.is_nan());
    Some(Summary {
        points: points.len(),
        first,
        min: finite.clone().fold(f64::INFINITY, f64::min),
        max: finite.fold(f64::NEG_INFINITY, f64::max),
        last,
    })
}

fn when(ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        format!(
            "{:.1} min ago",
            kiln_common::clock::now_ms().saturating_sub(ms) as f64 / 60_000.0
        )
    }
}

fn run_json(run: &RunRecord, experiment: &str) -> Value {
    let mut metrics: Vec<&MetricPoint> = run.latest.values().collect();
    metrics.sort_by(|a, b| a.key.cmp(&b.key));
    json!({
        "run_id": run.run_id,
        "name": run.name,
        "experiment": experiment,
        "status": run.status,
        "user": run.user,
        "start_time_ms": run.start_time_ms,
        "end_time_ms": run.end_time_ms,
        "params": run.params.iter().collect::<BTreeMap<_, _>>(),
        "tags": run.tags.iter().collect::<BTreeMap<_, _>>(),
        "metrics": metrics.iter().map(|m| (m.key.clone(), json!({"value": m.value, "step": m.step}))).collect::<BTreeMap<_, _>>(),
    })
}

/// A logged model in `kiln runs show --json`.
fn model_json(m: &LoggedModel) -> Value {
    let tag = |k: &str| {
        m.tags
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    json!({
        "model_id": m.model_id,
        "name": m.name,
        "status": m.status,
        "artifact": format!("mlflow-model-{}", m.model_id),
        "files": tag("kiln.files"),
        "bytes": tag("kiln.bytes"),
    })
}

async fn get(
    client: &ClusterClient,
    run_id: &str,
    with_history: bool,
    with_files: bool,
) -> anyhow::Result<GetRunResponse> {
    let request = GetRunRequest {
        run_id: run_id.to_string(),
        with_history,
        with_files,
    };
    Ok(client
        .call(|mut c| {
            let req = request.clone();
            async move { c.get_run(req).await.map(|r| r.into_inner()) }
        })
        .await?)
}

/// Runs one `kiln runs` command.
pub async fn run(client: ClusterClient, command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::Ls {
            experiment,
            limit,
            json,
        } => {
            let request = ListRunsRequest {
                experiment: experiment.unwrap_or_default(),
                max_results: limit,
            };
            let resp = client
                .call(|mut c| {
                    let req = request.clone();
                    async move { c.list_runs(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            let name = |id: u64| resp.experiments.get(&id).cloned().unwrap_or_default();
            if json {
                let doc: Vec<Value> = resp
                    .runs
                    .iter()
                    .map(|r| run_json(r, &name(r.experiment_id)))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!(
                    "{:<32}  {:<16} {:<20} {:<9} {:>14}",
                    "run", "experiment", "name", "status", "started"
                );
                for r in &resp.runs {
                    println!(
                        "{:<32}  {:<16} {:<20} {:<9} {:>14}",
                        r.run_id,
                        name(r.experiment_id),
                        r.name,
                        r.status,
                        when(r.start_time_ms)
                    );
                }
            }
        }
        RunsCommand::Show { run, json } => {
            let resp = get(&client, &run, false, true).await?;
            let r = resp.run.clone().unwrap_or_default();
            if json {
                let mut doc = run_json(&r, &resp.experiment);
                doc["artifacts"] = json!({
                    "name": format!("mlflow-run-{}", r.run_id),
                    "files": resp.files.iter().map(|f| json!({"path": f.path, "size": f.size})).collect::<Vec<_>>(),
                });
                doc["models"] = resp
                    .models
                    .iter()
                    .map(model_json)
                    .collect::<Vec<_>>()
                    .into();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("run {} ({})", r.run_id, r.name);
                println!(
                    "experiment {}   status {}   user {}",
                    resp.experiment, r.status, r.user
                );
                println!(
                    "started {}   ended {}",
                    when(r.start_time_ms),
                    when(r.end_time_ms)
                );
                for (title, map) in [("params", &r.params), ("tags", &r.tags)] {
                    println!("{title}:");
                    for (k, v) in map.iter().collect::<BTreeMap<_, _>>() {
                        println!("  {k} = {v}");
                    }
                }
                println!("metrics (latest):");
                for (k, m) in r.latest.iter().collect::<BTreeMap<_, _>>() {
                    println!("  {k} = {} (step {})", m.value, m.step);
                }
                if !resp.files.is_empty() {
                    println!(
                        "artifacts (kiln artifact pull mlflow-run-{} -o DIR):",
                        r.run_id
                    );
                    for f in &resp.files {
                        println!("  {:<48} {:>12} bytes", f.path, f.size);
                    }
                }
                if !resp.models.is_empty() {
                    println!("logged models:");
                    for m in &resp.models {
                        let tag = |k: &str| m.tags.get(k).cloned().unwrap_or_default();
                        println!(
                            "  {} {:<16} {:<26} {} files, {} bytes (kiln artifact pull mlflow-model-{} -o DIR)",
                            m.model_id,
                            m.name,
                            m.status,
                            tag("kiln.files"),
                            tag("kiln.bytes"),
                            m.model_id
                        );
                    }
                }
            }
        }
        RunsCommand::Compare { runs, json } => {
            let mut all = Vec::new();
            for id in &runs {
                all.push(get(&client, id, true, false).await?);
            }
            let params: BTreeSet<&String> = all
                .iter()
                .filter_map(|r| r.run.as_ref())
                .flat_map(|r| r.params.keys())
                .collect();
            let metrics: BTreeSet<&String> = all
                .iter()
                .flat_map(|r| r.history.iter().map(|h| &h.key))
                .collect();
            let summary = |resp: &GetRunResponse, key: &str| {
                resp.history
                    .iter()
                    .find(|h| h.key == key)
                    .and_then(|h| summarise(&h.points))
            };
            if json {
                let doc: Vec<Value> = all
                    .iter()
                    .map(|resp| {
                        let r = resp.run.clone().unwrap_or_default();
                        let mut v = run_json(&r, &resp.experiment);
                        v["history"] = metrics
                            .iter()
                            .map(|k| (k.to_string(), json!(summary(resp, k))))
                            .collect::<serde_json::Map<_, _>>()
                            .into();
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            let width = 26;
            print!("{:<24}", "");
            for resp in &all {
                let r = resp.run.clone().unwrap_or_default();
                print!(
                    " {:<width$}",
                    format!("{} {}", &r.run_id[..8.min(r.run_id.len())], r.name)
                );
            }
            println!();
            for key in &params {
                print!("{:<24}", format!("param {key}"));
                for resp in &all {
                    let v = resp.run.as_ref().and_then(|r| r.params.get(*key)).cloned();
                    print!(" {:<width$}", v.unwrap_or_else(|| "-".into()));
                }
                println!();
            }
            for key in &metrics {
                print!("{:<24}", format!("metric {key}"));
                for resp in &all {
                    let cell = match summary(resp, key) {
                        Some(s) => format!("{:.4} ({} pts, min {:.4})", s.last, s.points, s.min),
                        None => "-".into(),
                    };
                    print!(" {:<width$}", cell);
                }
                println!();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_summarise() {
        let points: Vec<MetricPoint> = [0.9, f64::NAN, 0.4, 0.6]
            .iter()
            .enumerate()
            .map(|(i, v)| MetricPoint {
                key: "loss".into(),
                value: *v,
                step: i as i64,
                timestamp_ms: 0,
            })
            .collect();
        let s = summarise(&points).expect("summary");
        assert_eq!(
            (s.points, s.first, s.min, s.max, s.last),
            (4, 0.9, 0.4, 0.9, 0.6)
        );
        assert!(summarise(&[]).is_none());
    }
}
