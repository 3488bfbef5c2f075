//! The serving pages: deployments listed, and one deployment with its request
//! rate, latency quantiles, error rate and live accuracy per model version over
//! its serving windows, its replicas, its canary and retrain policy, and its
//! history of decisions.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kiln_common::drift::latency_quantile;
use kiln_proto::v1::{DeploymentRecord, ModelTarget, ReplicaState, ServingWindow};

use super::html::{ago, esc, link, note, num, percent, table, url_part, Cell};
use super::svg::{line_chart, LineChart, Series, XAxis};
use crate::state::deployments::target_text;

/// A model version's serving windows, oldest first, with how it serves.
struct Version<'a> {
    label: String,
    windows: Vec<&'a ServingWindow>,
    /// A classifier (accuracy) rather than a regressor (RMSE).
    classifier: bool,
}

/// What a deployment does with `model@version`: primary, canary or earlier.
fn role(d: &DeploymentRecord, model: &str, version: u64) -> &'static str {
    let is = |t: &Option<ModelTarget>| {
        t.as_ref()
            .is_some_and(|t| t.model == model && t.version == version)
    };
    if is(&d.primary) {
        "primary"
    } else if is(&d.canary) {
        "canary"
    } else {
        "earlier"
    }
}

/// Requests answered either way.
fn answered(w: &ServingWindow) -> u64 {
    w.requests.saturating_add(w.failures)
}

/// Requests a second over a window.
fn rate(w: &ServingWindow) -> f64 {
    let seconds = w.end_ms.saturating_sub(w.start_ms) as f64 / 1000.0;
    if seconds > 0.0 {
        answered(w) as f64 / seconds
    } else {
        f64::NAN
    }
}

/// Failed share of the requests answered.
fn error_share(w: &ServingWindow) -> f64 {
    match answered(w) {
        0 => f64::NAN,
        n => w.failures as f64 / n as f64,
    }
}

/// Correct share of the labelled answers (classifiers) or the root mean squared
/// error (regressors); NaN without labels.
fn live_quality(w: &ServingWindow, classifier: bool) -> f64 {
    if w.labelled == 0 {
        f64::NAN
    } else if classifier {
        w.correct as f64 / w.labelled as f64
    } else {
        (w.squared_error_sum / w.labelled as f64).sqrt()
    }
}

fn quantile(w: &ServingWindow, q: f64) -> f64 {
    latency_quantile(&w.latency_counts, q).unwrap_or(f64::NAN)
}

/// Groups windows by model version (in version order).
fn versions<'a>(
    d: &DeploymentRecord,
    windows: &'a [ServingWindow],
    classifier: &dyn Fn(&str, u64) -> bool,
) -> Vec<Version<'a>> {
    let mut by: BTreeMap<(&str, u64), Vec<&ServingWindow>> = BTreeMap::new();
    for w in windows {
        by.entry((w.model.as_str(), w.version)).or_default().push(w);
    }
    by.into_iter()
        .map(|((model, version), mut windows)| {
            windows.sort_by_key(|w| w.start_ms);
            Version {
                label: format!("{model}@{version} ({})", role(d, model, version)),
                windows,
                classifier: classifier(model, version),
            }
        })
        .collect()
}

/// A chart over time of one value per window of each version.
fn time_chart(
    title: &str,
    y_label: &str,
    now_ms: u64,
    lines: Vec<(String, Vec<(f64, f64)>)>,
) -> String {
    let chart = line_chart(&LineChart {
        title: title.into(),
        y_label: y_label.into(),
        x: XAxis::Time { now_ms },
        y_from_zero: true,
        series: lines
            .into_iter()
            .map(|(name, points)| Series { name, points })
            .collect(),
    });
    format!("<figure>{chart}</figure>")
}

/// One value per window of `v`, at the window's end.
fn per_window(v: &Version<'_>, value: impl Fn(&ServingWindow) -> f64) -> Vec<(f64, f64)> {
    v.windows
        .iter()
        .map(|w| (w.end_ms as f64, value(w)))
        .collect()
}

/// Returns the deployments list's body; `newest` holds each deployment's newest
/// serving windows.
pub fn deployments(list: &[(DeploymentRecord, Vec<ServingWindow>)], now_ms: u64) -> String {
    if list.is_empty() {
        return note("no deployment");
    }
    let rows: Vec<Vec<Cell>> = list
        .iter()
        .map(|(d, newest)| {
            let ready = d
                .replica_set
                .iter()
                .filter(|r| r.state == ReplicaState::ReplicaReady as i32)
                .count();
            let last_end = newest.iter().map(|w| w.end_ms).max().unwrap_or(0);
            let last = crate::state::serving::sum(newest.iter().filter(|w| w.end_ms == last_end));
            let (rps, p99) = if newest.is_empty() {
                ("-".to_string(), "-".to_string())
            } else {
                (num(rate(&last)), num(quantile(&last, 0.99)))
            };
            vec![
                Cell::Html(link(
                    &format!("/ui/deployments/{}", url_part(&d.name)),
                    &d.name,
                )),
                Cell::text(target_text(&d.primary)),
                Cell::text(if d.canary.is_some() {
                    format!("{} at {}%", target_text(&d.canary), d.canary_percent)
                } else {
                    "-".into()
                }),
                Cell::Num(format!("{ready} / {}", d.replicas)),
                Cell::Num(rps),
                Cell::Num(p99),
                Cell::text(ago(d.updated_at_ms, now_ms)),
            ]
        })
        .collect();
    table(
        &[
            "name",
            "model",
            "canary",
            "ready / wanted",
            "requests/s (newest window)",
            "p99 ms",
            "updated",
        ],
        &rows,
    )
}

/// Returns one deployment's body. `windows` are its serving windows (any order);
/// `classifier` tells whether a model version answers classes.
pub fn deployment(
    d: &DeploymentRecord,
    windows: &[ServingWindow],
    classifier: &dyn Fn(&str, u64) -> bool,
    now_ms: u64,
) -> String {
    let mut out = String::new();
    let drift_link = |t: &Option<ModelTarget>| match t {
        Some(t) => Cell::Html(format!(
            "{} (as {}; {})",
            link(
                &format!("/ui/drift/{}/{}", url_part(&t.model), t.version),
                &format!("{}@{}", t.model, t.version)
            ),
            esc(&t.requested),
            esc(&t.artifact)
        )),
        None => Cell::text("-"),
    };
    let facts: Vec<Vec<Cell>> = vec![
        vec![Cell::text("model"), drift_link(&d.primary)],
        vec![
            Cell::text("canary"),
            if d.canary.is_some() {
                let mut cell = drift_link(&d.canary);
                if let Cell::Html(h) = &mut cell {
                    let _ = write!(h, " at {}% of requests", d.canary_percent);
                }
                cell
            } else {
                Cell::text("-")
            },
        ],
        vec![
            Cell::text("replicas"),
            Cell::text(format!(
                "{} wanted (min {}, max {}, target {} in flight each), {} CPU each",
                d.replicas, d.min_replicas, d.max_replicas, d.target_in_flight, d.cpus_per_replica
            )),
        ],
        vec![
            Cell::text("batching"),
            Cell::text(format!(
                "up to {} rows, {} µs queue delay, queue of {}",
                d.max_batch_size, d.max_queue_delay_us, d.queue_capacity
            )),
        ],
        vec![
            Cell::text("inference"),
            Cell::text(if d.public {
                "public (no token)"
            } else {
                "needs a token"
            }),
        ],
        vec![
            Cell::text("drift webhook"),
            Cell::text(if d.drift_webhook.is_empty() {
                "-"
            } else {
                d.drift_webhook.as_str()
            }),
        ],
        vec![
            Cell::text("created / updated"),
            Cell::text(format!(
                "{} by {} / {} (generation {})",
                ago(d.created_at_ms, now_ms),
                d.created_by,
                ago(d.updated_at_ms, now_ms),
                d.generation
            )),
        ],
    ];
    out.push_str(&table(&["", ""], &facts));

    let grouped = versions(d, windows, classifier);
    let _ = write!(
        out,
        "<h2>Traffic</h2><section id=\"traffic\" data-windows=\"{}\">",
        windows.len()
    );
    if grouped.is_empty() {
        out.push_str("<p class=\"muted\" id=\"no-traffic\">no traffic recorded yet</p>");
    } else {
        traffic(&mut out, &grouped, now_ms);
    }
    out.push_str("</section>");

    out.push_str("<h2>Replicas</h2>");
    let rows: Vec<Vec<Cell>> = d
        .replica_set
        .iter()
        .map(|r| {
            let state = ReplicaState::try_from(r.state)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("REPLICA_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| "unknown".into());
            vec![
                Cell::Num(r.id.to_string()),
                Cell::text(&r.worker_id),
                Cell::text(target_text(&r.target)),
                Cell::text(if r.canary { "canary" } else { "primary" }),
                Cell::text(state),
                Cell::text(&r.reason),
                Cell::text(ago(r.state_since_ms, now_ms)),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str(&note("no replica placed"));
    } else {
        out.push_str(&table(
            &["id", "worker", "model", "role", "state", "reason", "since"],
            &rows,
        ));
    }

    out.push_str("<h2>Retrain policy</h2>");
    match &d.retrain {
        None => out.push_str(&note("none")),
        Some(p) => {
            let rows = vec![
                vec![Cell::text("dataset"), Cell::text(&p.dataset)],
                vec![
                    Cell::text("canary share"),
                    Cell::text(format!("{}%", p.canary_percent)),
                ],
                vec![
                    Cell::text("job running"),
                    if p.job_id == 0 {
                        Cell::text("none")
                    } else {
                        Cell::Html(format!(
                            "{} for drift alert #{}",
                            link(&format!("/ui/jobs/{}", p.job_id), &p.job_id.to_string()),
                            p.alert_id
                        ))
                    },
                ],
                vec![
                    Cell::text("retrained canary"),
                    Cell::text(if p.canary.is_empty() {
                        "none".to_string()
                    } else {
                        format!("{} since {}", p.canary, ago(p.canary_since_ms, now_ms))
                    }),
                ],
            ];
            out.push_str(&table(&["", ""], &rows));
            let _ = write!(
                out,
                "<details><summary>job spec</summary><pre>{}</pre></details>",
                esc(&p.job_spec)
            );
        }
    }

    out.push_str("<h2>History</h2>");
    let rows: Vec<Vec<Cell>> = d
        .events
        .iter()
        .rev()
        .map(|e| vec![Cell::text(ago(e.at_ms, now_ms)), Cell::text(&e.message)])
        .collect();
    if rows.is_empty() {
        out.push_str(&note("no decisions yet"));
    } else {
        out.push_str(&table(&["when", "decision"], &rows));
    }
    out
}

/// The traffic charts and the totals per version.
fn traffic(out: &mut String, grouped: &[Version<'_>], now_ms: u64) {
    let lines = |value: &dyn Fn(&ServingWindow) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        grouped
            .iter()
            .map(|v| (v.label.clone(), per_window(v, value)))
            .collect()
    };
    out.push_str(&time_chart(
        "requests per second",
        "requests/s",
        now_ms,
        lines(&rate),
    ));
    let mut latency = Vec::new();
    for v in grouped {
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            latency.push((
                format!("{} {name}", v.label),
                per_window(v, |w| quantile(w, q)),
            ));
        }
    }
    out.push_str(&time_chart("latency p50 and p99", "ms", now_ms, latency));
    out.push_str(&time_chart(
        "error rate",
        "% of requests",
        now_ms,
        lines(&|w| error_share(w) * 100.0),
    ));
    for (classifier, title, y_label) in [
        (true, "live accuracy", "correct share of labelled"),
        (false, "live error (RMSE)", "RMSE"),
    ] {
        let quality: Vec<(String, Vec<(f64, f64)>)> = grouped
            .iter()
            .filter(|v| v.classifier == classifier && v.windows.iter().any(|w| w.labelled > 0))
            .map(|v| {
                (
                    v.label.clone(),
                    per_window(v, |w| live_quality(w, classifier)),
                )
            })
            .collect();
        if !quality.is_empty() {
            out.push_str(&time_chart(title, y_label, now_ms, quality));
        }
    }
    let rows: Vec<Vec<Cell>> = grouped
        .iter()
        .map(|v| {
            let total = crate::state::serving::sum(v.windows.iter().copied());
            let mean = if total.requests == 0 {
                f64::NAN
            } else {
                total.latency_sum_ms / total.requests as f64
            };
            vec![
                Cell::text(&v.label),
                Cell::Num(v.windows.len().to_string()),
                Cell::Num(total.requests.to_string()),
                Cell::Num(total.failures.to_string()),
                Cell::Num(percent(error_share(&total))),
                Cell::Num(num(quantile(&total, 0.5))),
                Cell::Num(num(quantile(&total, 0.99))),
                Cell::Num(num(mean)),
                Cell::Num(total.labelled.to_string()),
                Cell::Num(if v.classifier {
                    percent(live_quality(&total, true))
                } else {
                    num(live_quality(&total, false))
                }),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "version",
            "windows",
            "answered",
            "failed",
            "error rate",
            "p50 ms",
            "p99 ms",
            "mean ms",
            "labelled",
            "accuracy / RMSE",
        ],
        &rows,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::drift::LATENCY_BUCKETS_MS;

    fn window(version: u64, start_ms: u64, requests: u64, bucket: usize) -> ServingWindow {
        let mut latency_counts = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        latency_counts[bucket] = requests;
        ServingWindow {
            deployment: "iris".into(),
            model: "iris".into(),
            version,
            start_ms,
            end_ms: start_ms + 1000,
            requests,
            failures: 1,
            latency_counts,
            labelled: 10,
            correct: 9,
            ..Default::default()
        }
    }

    fn record() -> DeploymentRecord {
        let target = |version| ModelTarget {
            model: "iris".into(),
            version,
            artifact: format!("iris-onnx@{version}"),
            requested: format!("iris@{version}"),
            ..Default::default()
        };
        DeploymentRecord {
            name: "iris".into(),
            primary: Some(target(1)),
            canary: Some(target(2)),
            canary_percent: 10,
            ..Default::default()
        }
    }

    #[test]
    fn a_deployment_charts_each_version_apart() {
        let windows: Vec<ServingWindow> = (0..3)
            .flat_map(|i| [window(1, i * 1000, 99, 4), window(2, i * 1000, 9, 6)])
            .collect();
        let body = deployment(&record(), &windows, &|_, _| true, 5000);
        assert!(body.contains("data-windows=\"6\""));
        assert!(body.contains("aria-label=\"requests per second\""));
        assert!(body.contains("data-series=\"iris@1 (primary)\""));
        assert!(body.contains("data-series=\"iris@2 (canary)\""));
        assert!(body.contains("data-series=\"iris@1 (primary) p99\""));
        assert!(body.contains("aria-label=\"live accuracy\""));
        assert!(!body.contains("RMSE)"), "no regressor here");
        assert!(body.contains("90.0%"), "9 of 10 labelled correct");
        assert!(!body.contains("no traffic recorded yet"));
        // 99 + 1 answered over one second.
        assert_eq!(rate(&windows[0]), 100.0);
        assert_eq!(quantile(&windows[0], 0.5), 7.5);
    }

    #[test]
    fn a_regressor_gets_its_rmse_and_no_windows_say_so() {
        let mut w = window(1, 0, 10, 2);
        w.squared_error_sum = 40.0;
        assert_eq!(live_quality(&w, false), 2.0);
        let body = deployment(&record(), &[w], &|_, _| false, 5000);
        assert!(body.contains("aria-label=\"live error (RMSE)\""));
        let empty = deployment(&record(), &[], &|_, _| true, 5000);
        assert!(empty.contains("id=\"no-traffic\""));
        assert!(empty.contains("data-windows=\"0\""));
        assert!(!empty.contains("<polyline"));
    }
}
