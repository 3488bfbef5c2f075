//! The training pages: jobs listed, one job with its loss and accuracy curves,
//! runs listed, and runs compared (params and final metrics side by side, one
//! metric's curves overlaid).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kiln_common::status::job_state_name;
use kiln_proto::v1::{
    GetRunResponse, JobLogLine, JobRecord, MetricHistory, MetricPoint, RunRecord, ShardState,
};

use super::html::{ago, esc, link, note, num, table, url_part, Cell};
use super::svg::{line_chart, LineChart, Series, XAxis};

/// Most rows of params compared.
pub const MAX_PARAM_ROWS: usize = 200;

/// The metric shown when the caller names none: the loss when every run has it.
const DEFAULT_METRIC: &str = "train_loss";

/// Returns the jobs list's body.
pub fn jobs(jobs: &[JobRecord], now_ms: u64) -> String {
    if jobs.is_empty() {
        return note("no job has been submitted");
    }
    let rows: Vec<Vec<Cell>> = jobs
        .iter()
        .map(|j| {
            let p = j.progress.unwrap_or_default();
            vec![
                Cell::Html(link(&format!("/ui/jobs/{}", j.id), &j.id.to_string())),
                Cell::Html(link(&format!("/ui/jobs/{}", j.id), &j.name)),
                Cell::text(&j.experiment),
                Cell::text(job_state_name(j.state)),
                Cell::Num(format!("{} / {}", p.step, p.total_steps)),
                Cell::Num(num(p.loss)),
                Cell::Num(num(p.accuracy)),
                Cell::Num(j.shards_wanted.to_string()),
                Cell::text(&j.user),
                Cell::text(ago(j.submitted_at_ms, now_ms)),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "name",
            "experiment",
            "state",
            "step",
            "loss",
            "accuracy",
            "shards",
            "user",
            "submitted",
        ],
        &rows,
    )
}

/// Returns the lowercase name of a shard state.
fn shard_state(state: i32) -> String {
    ShardState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SHARD_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// A chart of the run's metrics whose key contains `word`, by step.
fn metric_chart(history: &[MetricHistory], word: &str, title: &str) -> Option<String> {
    let series: Vec<Series> = history
        .iter()
        .filter(|h| h.key.contains(word))
        .map(|h| Series {
            name: h.key.clone(),
            points: points(&h.points),
        })
        .collect();
    if series.is_empty() {
        return None;
    }
    Some(line_chart(&LineChart {
        title: title.into(),
        y_label: word.into(),
        x: XAxis::Steps,
        y_from_zero: false,
        series,
    }))
}

/// A metric's points as (step, value).
fn points(history: &[MetricPoint]) -> Vec<(f64, f64)> {
    history.iter().map(|p| (p.step as f64, p.value)).collect()
}

/// Returns one job's body: its record, curves, shards, spec and newest log lines.
pub fn job(
    job: &JobRecord,
    run: Option<&GetRunResponse>,
    logs: &[JobLogLine],
    now_ms: u64,
) -> String {
    let mut out = String::new();
    let p = job.progress.unwrap_or_default();
    let run_cell = if job.run_id.is_empty() {
        Cell::text("-")
    } else {
        Cell::Html(link(
            &format!("/ui/runs/compare?ids={}", url_part(&job.run_id)),
            &job.run_id,
        ))
    };
    let facts: Vec<Vec<Cell>> = vec![
        vec![Cell::text("name"), Cell::text(&job.name)],
        vec![
            Cell::text("state"),
            Cell::text(format!("{} {}", job_state_name(job.state), job.reason)),
        ],
        vec![Cell::text("experiment"), Cell::text(&job.experiment)],
        vec![Cell::text("run"), run_cell],
        vec![Cell::text("user"), Cell::text(&job.user)],
        vec![Cell::text("priority"), Cell::Num(job.priority.to_string())],
        vec![
            Cell::text("submitted / started / ended"),
            Cell::text(format!(
                "{} / {} / {}",
                ago(job.submitted_at_ms, now_ms),
                ago(job.started_at_ms, now_ms),
                ago(job.ended_at_ms, now_ms)
            )),
        ],
        vec![
            Cell::text("shards"),
            Cell::text(format!(
                "{} × {} CPU, {} GPU{}",
                job.shards_wanted,
                job.cpus_per_shard,
                job.gpus_per_shard,
                match job.memory_per_shard >> 20 {
                    0 => String::new(),
                    mib => format!(", {mib} MiB"),
                }
            )),
        ],
        vec![
            Cell::text("attempt / failures"),
            Cell::text(format!(
                "{} / {} (of {} allowed)",
                job.attempt, job.failures, job.max_failures
            )),
        ],
        vec![
            Cell::text("progress"),
            Cell::text(format!(
                "epoch {}/{}, step {}/{}, loss {}, accuracy {}, {} samples/s",
                p.epoch,
                p.epochs,
                p.step,
                p.total_steps,
                num(p.loss),
                num(p.accuracy),
                num(p.samples_per_sec)
            )),
        ],
        vec![
            Cell::text("checkpoint"),
            Cell::text(format!("{} (step {})", job.checkpoint, job.checkpoint_step)),
        ],
        vec![
            Cell::text("model"),
            Cell::text(if job.model.is_empty() {
                "-"
            } else {
                job.model.as_str()
            }),
        ],
    ];
    let mut facts = facts;
    if let Some(command) = kiln_common::jobspec::JobSpec::parse(&job.spec_toml)
        .ok()
        .and_then(|spec| spec.command().cloned())
    {
        use kiln_common::jobspec::Code;
        let code = match &command.command.code {
            Some(Code::Artifact(code)) => code.to_string(),
            Some(Code::Path(path)) => path.clone(),
            None => "-".to_string(),
        };
        let runtime = command.environment.runtime.to_string();
        facts.push(vec![
            Cell::text("command"),
            Cell::text(command.command.run.join(" ")),
        ]);
        facts.push(vec![Cell::text("code"), Cell::text(code)]);
        facts.push(vec![Cell::text("environment"), Cell::text(runtime)]);
        facts.push(vec![
            Cell::text("data"),
            Cell::text(command.data.map_or("-".to_string(), |d| d.to_string())),
        ]);
    }
    facts.push(vec![
        Cell::text("spec digest"),
        Cell::text(&job.spec_digest),
    ]);
    out.push_str(&table(&["", ""], &facts));

    out.push_str("<h2>Curves</h2>");
    let history = run.map_or(&[][..], |r| r.history.as_slice());
    let charts: Vec<String> = [("loss", "loss per step"), ("accuracy", "accuracy per step")]
        .into_iter()
        .filter_map(|(word, title)| metric_chart(history, word, title))
        .collect();
    if charts.is_empty() {
        out.push_str(&note("no loss logged yet"));
    }
    for chart in charts {
        let _ = write!(out, "<figure>{chart}</figure>");
    }

    out.push_str("<h2>Shards</h2>");
    let rows: Vec<Vec<Cell>> = job
        .shards
        .iter()
        .map(|s| {
            vec![
                Cell::Num(s.rank.to_string()),
                Cell::text(&s.worker_id),
                Cell::text(format!("{:?}", s.gpus)),
                Cell::text(shard_state(s.state)),
                Cell::text(&s.error),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str(&note("not placed"));
    } else {
        out.push_str(&table(&["rank", "worker", "GPUs", "state", "error"], &rows));
    }

    out.push_str("<h2>Spec</h2>");
    let _ = write!(out, "<pre>{}</pre>", esc(&job.spec_toml));
    out.push_str("<h2>Newest log lines</h2>");
    if logs.is_empty() {
        out.push_str(&note("no log lines"));
    } else {
        out.push_str("<pre>");
        for line in logs {
            let _ = writeln!(
                out,
                "[attempt {} rank {}] {}",
                line.attempt,
                line.rank,
                esc(&line.line)
            );
        }
        out.push_str("</pre>");
    }
    out
}

/// The latest value of a run's metric, as text.
fn latest(run: &RunRecord, key: &str) -> String {
    run.latest
        .get(key)
        .map_or_else(|| "-".into(), |p| num(p.value))
}

/// Returns the runs list's body: a form that compares the runs ticked.
pub fn runs(runs: &[RunRecord], experiments: &BTreeMap<u64, String>, now_ms: u64) -> String {
    if runs.is_empty() {
        return note("no run has been logged");
    }
    let rows: Vec<Vec<Cell>> = runs
        .iter()
        .map(|r| {
            vec![
                Cell::Html(format!(
                    "<input type=\"checkbox\" name=\"ids\" value=\"{}\">",
                    esc(&r.run_id)
                )),
                Cell::Html(link(
                    &format!("/ui/runs/compare?ids={}", url_part(&r.run_id)),
                    &run_name(r),
                )),
                Cell::text(
                    experiments
                        .get(&r.experiment_id)
                        .map_or("-", String::as_str),
                ),
                Cell::text(&r.status),
                Cell::text(&r.user),
                Cell::text(ago(r.start_time_ms, now_ms)),
                Cell::Num(latest(r, "train_loss")),
                Cell::Num(latest(r, "train_accuracy")),
            ]
        })
        .collect();
    format!(
        "<form method=\"get\" action=\"/ui/runs/compare\">{}<p><button type=\"submit\">Compare the runs ticked</button></p></form>",
        table(
            &[
                "",
                "run",
                "experiment",
                "status",
                "user",
                "started",
                "train_loss",
                "train_accuracy"
            ],
            &rows
        )
    )
}

/// A run's name and the start of its id, which tells runs of one name apart.
pub fn run_name(run: &RunRecord) -> String {
    let short: String = run.run_id.chars().take(8).collect();
    if run.name.is_empty() {
        short
    } else {
        format!("{} ({short})", run.name)
    }
}

/// The metric keys every run has, sorted.
pub fn common_metrics(runs: &[RunRecord]) -> Vec<String> {
    let mut keys: Option<BTreeSet<&String>> = None;
    for run in runs {
        let these: BTreeSet<&String> = run.latest.keys().collect();
        keys = Some(match keys {
            None => these,
            Some(k) => k.intersection(&these).copied().collect(),
        });
    }
    keys.unwrap_or_default().into_iter().cloned().collect()
}

/// The metric to overlay: the one asked for when every run has it, else the
/// loss, else the first common one.
pub fn chosen_metric(runs: &[RunRecord], asked: Option<&str>) -> Option<String> {
    let common = common_metrics(runs);
    asked
        .filter(|a| common.iter().any(|c| c == a))
        .or_else(|| {
            common
                .iter()
                .find(|c| *c == DEFAULT_METRIC)
                .map(String::as_str)
        })
        .or_else(|| common.first().map(String::as_str))
        .map(str::to_string)
}

/// Rows of one value per run, for every key any run has (at most `max`), the
/// rows whose values differ marked.
fn side_by_side(
    runs: &[RunRecord],
    values: impl Fn(&RunRecord) -> BTreeMap<String, String>,
    max: usize,
) -> Vec<Vec<Cell>> {
    let per_run: Vec<BTreeMap<String, String>> = runs.iter().map(values).collect();
    let keys: BTreeSet<&String> = per_run.iter().flat_map(|m| m.keys()).collect();
    keys.into_iter()
        .take(max)
        .map(|key| {
            let cells: Vec<&str> = per_run
                .iter()
                .map(|m| m.get(key).map_or("-", String::as_str))
                .collect();
            let differs = cells.windows(2).any(|w| w[0] != w[1]);
            let mut row = vec![Cell::text(key)];
            row.extend(cells.into_iter().map(|v| {
                if differs {
                    Cell::Html(format!("<span class=\"differs\">{}</span>", esc(v)))
                } else {
                    Cell::text(v)
                }
            }));
            row
        })
        .collect()
}

/// Returns the comparison's body: `runs` with their experiments' names, the
/// `metric` overlaid and each run's points of it (`histories`, in run order).
pub fn compare(
    runs: &[(RunRecord, String)],
    metric: Option<&str>,
    histories: &[Vec<MetricPoint>],
    dropped: usize,
) -> String {
    let mut out = String::new();
    if dropped > 0 {
        out.push_str(&note(&format!(
            "{dropped} more run(s) asked for are not shown"
        )));
    }
    let records: Vec<RunRecord> = runs.iter().map(|(r, _)| r.clone()).collect();
    let names: Vec<String> = records.iter().map(run_name).collect();
    let mut header = vec![""];
    header.extend(names.iter().map(String::as_str));

    out.push_str("<h2>Runs</h2>");
    let facts = |label: &str, f: &dyn Fn(&(RunRecord, String)) -> String| -> Vec<Cell> {
        let mut row = vec![Cell::text(label)];
        row.extend(runs.iter().map(|r| Cell::text(f(r))));
        row
    };
    let rows = vec![
        facts("run id", &|(r, _)| r.run_id.clone()),
        facts("experiment", &|(_, e)| e.clone()),
        facts("status", &|(r, _)| r.status.clone()),
        facts("user", &|(r, _)| r.user.clone()),
    ];
    out.push_str(&table(&header, &rows));

    out.push_str("<h2>Params</h2>");
    let params = side_by_side(
        &records,
        |r| {
            r.params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        },
        MAX_PARAM_ROWS,
    );
    if params.is_empty() {
        out.push_str(&note("no params logged"));
    } else {
        out.push_str(&table(&header, &params));
    }

    out.push_str("<h2>Final metrics</h2>");
    let metrics = side_by_side(
        &records,
        |r| {
            r.latest
                .iter()
                .map(|(k, p)| (k.clone(), num(p.value)))
                .collect()
        },
        MAX_PARAM_ROWS,
    );
    if metrics.is_empty() {
        out.push_str(&note("no metrics logged"));
    } else {
        out.push_str(&table(&header, &metrics));
    }

    out.push_str("<h2>Curves</h2>");
    let common = common_metrics(&records);
    if !common.is_empty() {
        let ids: Vec<String> = records.iter().map(|r| url_part(&r.run_id)).collect();
        out.push_str("<p>Metric: ");
        for key in &common {
            if Some(key.as_str()) == metric {
                let _ = write!(out, "<b>{}</b> ", esc(key));
            } else {
                let href = format!(
                    "/ui/runs/compare?ids={}&metric={}",
                    ids.join(","),
                    url_part(key)
                );
                let _ = write!(out, "{} ", link(&href, key));
            }
        }
        out.push_str("</p>");
    }
    match metric {
        Some(metric) => {
            let series = names
                .iter()
                .zip(histories)
                .map(|(name, points_of)| Series {
                    name: name.clone(),
                    points: points(points_of),
                })
                .collect();
            let chart = line_chart(&LineChart {
                title: format!("{metric} per step"),
                y_label: metric.into(),
                x: XAxis::Steps,
                y_from_zero: false,
                series,
            });
            let _ = write!(out, "<figure>{chart}</figure>");
        }
        None => out.push_str(&note("the runs have no metric in common")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{JobProgress, JobState};

    fn run(id: &str, lr: &str, loss: f64) -> RunRecord {
        let mut r = RunRecord {
            run_id: id.into(),
            name: format!("job-{id}"),
            ..Default::default()
        };
        r.params.insert("optimizer.lr".into(), lr.into());
        r.params.insert("train.epochs".into(), "3".into());
        r.latest.insert(
            "train_loss".into(),
            MetricPoint {
                key: "train_loss".into(),
                value: loss,
                ..Default::default()
            },
        );
        r
    }

    fn history(key: &str, values: &[f64]) -> MetricHistory {
        MetricHistory {
            key: key.into(),
            points: values
                .iter()
                .enumerate()
                .map(|(i, v)| MetricPoint {
                    key: key.into(),
                    value: *v,
                    step: i as i64 * 10,
                    timestamp_ms: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_job_page_draws_loss_and_accuracy_per_step() {
        let job = JobRecord {
            id: 4,
            name: "blobs <small>".into(),
            state: JobState::Succeeded as i32,
            progress: Some(JobProgress {
                loss: 0.1,
                accuracy: f64::NAN,
                ..Default::default()
            }),
            spec_toml: "name = \"a<b\"".into(),
            ..Default::default()
        };
        let run = GetRunResponse {
            history: vec![
                history("train_loss", &[1.0, 0.5, 0.2]),
                history("train_accuracy", &[0.5, 0.9, 0.95]),
                history("samples_per_sec", &[100.0, 110.0, 120.0]),
            ],
            ..Default::default()
        };
        let body = job_body(&job, Some(&run));
        assert!(body.contains("blobs &lt;small&gt;"));
        assert!(body.contains("name = &quot;a&lt;b&quot;"));
        assert_eq!(body.matches("<polyline").count(), 2, "loss and accuracy");
        assert!(body.contains("data-series=\"train_loss\""));
        assert!(!body.contains("data-series=\"samples_per_sec\""));
        let none = job_body(&job, None);
        assert!(none.contains("no loss logged yet"));
    }

    #[test]
    fn a_command_jobs_page_names_its_command_code_environment_and_data() {
        let job = JobRecord {
            id: 7,
            name: "resnet".into(),
            state: JobState::Running as i32,
            spec_toml: r#"name = "resnet"
[command]
run = ["python", "train.py", "--epochs", "3"]
code = "resnet-code@2"
[environment]
pip = ["torch==2.*"]
[data]
artifact = "cifar@4"
"#
            .into(),
            ..Default::default()
        };
        let body = job_body(&job, None);
        for row in [
            "<td>command</td><td>python train.py --epochs 3</td>",
            "<td>code</td><td>resnet-code@2</td>",
            "<td>environment</td><td>pip torch==2.*</td>",
            "<td>data</td><td>cifar@4</td>",
        ] {
            assert!(body.contains(row), "no {row:?} in {body}");
        }
        // A job of the built-in trainer has none of these rows.
        let builtin = JobRecord {
            spec_toml: "name = \"mlp\"".into(),
            ..job
        };
        assert!(!job_body(&builtin, None).contains("<td>command</td>"));
    }

    fn job_body(job: &JobRecord, run: Option<&GetRunResponse>) -> String {
        super::job(job, run, &[], 0)
    }

    #[test]
    fn runs_compared_show_params_side_by_side_and_overlay_a_metric() {
        let a = run("aaaaaaaa11", "0.01", 0.2);
        let b = run("bbbbbbbb22", "0.1", 0.3);
        let records = [a.clone(), b.clone()];
        assert_eq!(common_metrics(&records), ["train_loss"]);
        assert_eq!(
            chosen_metric(&records, Some("nope")).as_deref(),
            Some("train_loss")
        );
        let body = compare(
            &[(a, "blobs".into()), (b, "blobs".into())],
            Some("train_loss"),
            &[
                history("train_loss", &[1.0, 0.2]).points,
                history("train_loss", &[1.0, 0.3]).points,
            ],
            0,
        );
        assert!(body.contains("job-aaaaaaaa11 (aaaaaaaa)"));
        assert!(body.contains("<span class=\"differs\">0.01</span>"));
        assert!(body.contains("<span class=\"differs\">0.1</span>"));
        assert!(body.contains("<td>3</td>"), "equal values are not marked");
        assert_eq!(body.matches("<polyline").count(), 2);
        assert!(chosen_metric(&[], None).is_none());
    }
}
