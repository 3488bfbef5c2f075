//! The drift pages: every monitored model version with its newest judged window,
//! and one version with its drifted share over time, each column's verdict, each
//! column's reference and live histograms side by side, and its alerts.

use std::fmt::Write as _;

use kiln_proto::v1::{DriftAlert, DriftStatusResponse, DriftWindow, ModelDrift, ReferenceColumn};

use super::html::{ago, esc, link, note, num, percent, table, url_part, Cell};
use super::svg::{histogram, line_chart, Histogram, LineChart, Series, XAxis};

/// Most columns one version's page draws histograms for.
pub const MAX_COLUMNS_DRAWN: usize = 100;

/// The page of a model version.
fn version_href(model: &str, version: u64) -> String {
    format!("/ui/drift/{}/{version}", url_part(model))
}

fn yes_no(drifted: bool) -> Cell {
    if drifted {
        Cell::Html("<span class=\"bad\">yes</span>".into())
    } else {
        Cell::Html("<span class=\"good\">no</span>".into())
    }
}

fn share(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        f64::NAN
    } else {
        f64::from(part) / f64::from(whole)
    }
}

/// Returns a table of alerts, newest first as given.
pub fn alerts_table(alerts: &[DriftAlert], now_ms: u64) -> String {
    let rows: Vec<Vec<Cell>> = alerts
        .iter()
        .map(|a| {
            vec![
                Cell::Num(a.id.to_string()),
                Cell::Html(link(
                    &version_href(&a.model, a.version),
                    &format!("{}@{}", a.model, a.version),
                )),
                Cell::text(&a.kind),
                if a.resolved_at_ms == 0 {
                    Cell::Html("<span class=\"bad\">firing</span>".into())
                } else {
                    Cell::text(format!("resolved {}", ago(a.resolved_at_ms, now_ms)))
                },
                Cell::text(ago(a.opened_at_ms, now_ms)),
                Cell::text(a.columns.join(", ")),
                Cell::Num(percent(a.drifted_share)),
                Cell::text(a.deployments.join(", ")),
                Cell::Num(a.windows.to_string()),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "model",
            "kind",
            "state",
            "opened",
            "columns",
            "drifted share",
            "deployments",
            "windows",
        ],
        &rows,
    )
}

/// Returns the drift list's body: the newest window of each monitored version,
/// then the alert history.
pub fn overview(status: &DriftStatusResponse, now_ms: u64) -> String {
    let mut out = String::from("<h2>Monitored model versions</h2>");
    if status.models.is_empty() {
        out.push_str(&note("no model version has a judged drift window yet"));
    } else {
        let rows: Vec<Vec<Cell>> = status
            .models
            .iter()
            .map(|m| {
                let w = m.windows.last().cloned().unwrap_or_default();
                vec![
                    Cell::Html(link(
                        &version_href(&m.model, m.version),
                        &format!("{}@{}", m.model, m.version),
                    )),
                    Cell::text(ago(w.end_ms, now_ms)),
                    Cell::Num(w.rows.to_string()),
                    Cell::Num(format!("{} / {}", w.drifted_features, w.features)),
                    yes_no(w.dataset_drift),
                    Cell::Num(format!("{} / {}", w.drifted_outputs, w.outputs)),
                    yes_no(w.prediction_drift),
                    Cell::text(w.deployments.join(", ")),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "model",
                "newest window",
                "rows",
                "drifted features",
                "dataset drift",
                "drifted outputs",
                "prediction drift",
                "deployments",
            ],
            &rows,
        ));
    }
    out.push_str("<h2>Alerts</h2>");
    if status.alerts.is_empty() {
        out.push_str(&note("no alert yet"));
    } else {
        out.push_str(&alerts_table(&status.alerts, now_ms));
    }
    out
}

/// The reference column a live column is judged against: the one of its name,
/// else the one at its position.
fn reference_of<'a>(
    reference: &'a [ReferenceColumn],
    name: &str,
    index: usize,
) -> Option<&'a ReferenceColumn> {
    reference
        .iter()
        .find(|r| r.name == name)
        .or_else(|| reference.get(index))
}

/// Returns one model version's body. `alerts` are the version's, newest first.
pub fn version(drift: &ModelDrift, alerts: &[DriftAlert], now_ms: u64) -> String {
    let mut out = String::new();
    let Some(newest) = drift.windows.last() else {
        out.push_str(&note("no drift window of this version has been judged yet"));
        return out;
    };
    let _ = write!(
        out,
        "<p>Newest window: {} rows, ended {}, served by {}. Dataset drift: {}; prediction drift: {}.</p>",
        newest.rows,
        esc(&ago(newest.end_ms, now_ms)),
        esc(&newest.deployments.join(", ")),
        if newest.dataset_drift { "<b class=\"bad\">yes</b>" } else { "no" },
        if newest.prediction_drift { "<b class=\"bad\">yes</b>" } else { "no" },
    );
    out.push_str(&drifted_share_chart(&drift.windows, now_ms));

    out.push_str("<h2>Columns in the newest window</h2>");
    out.push_str(&columns_table(newest));

    out.push_str("<h2>Reference and live histograms</h2>");
    if newest.columns.len() > MAX_COLUMNS_DRAWN {
        out.push_str(&note(&format!(
            "the first {MAX_COLUMNS_DRAWN} of {} columns",
            newest.columns.len()
        )));
    }
    for (i, c) in newest.columns.iter().take(MAX_COLUMNS_DRAWN).enumerate() {
        let reference = reference_of(&drift.reference, &c.name, i);
        let (edges, counts) = reference.map_or((&[][..], &[][..]), |r| {
            (r.edges.as_slice(), r.counts.as_slice())
        });
        let title = format!(
            "{} ({}): {}",
            c.name,
            if c.output { "output" } else { "feature" },
            if c.drifted { "drifted" } else { "no drift" }
        );
        let chart = histogram(&Histogram {
            title: &title,
            edges,
            reference: counts,
            live: &c.counts,
        });
        let _ = write!(
            out,
            "<figure class=\"column\" id=\"column-{i}\" data-column=\"{}\">{chart}<figcaption>\
             reference mean {}, live mean {}; {} live rows</figcaption></figure>",
            esc(&c.name),
            num(reference.map_or(f64::NAN, |r| r.mean)),
            num(c.mean),
            c.rows
        );
    }

    out.push_str("<h2>Alerts</h2>");
    if alerts.is_empty() {
        out.push_str(&note("no alert for this version"));
    } else {
        out.push_str(&alerts_table(alerts, now_ms));
    }
    out
}

/// The share of drifted features and outputs per window, over time.
fn drifted_share_chart(windows: &[DriftWindow], now_ms: u64) -> String {
    let line = |name: &str, f: &dyn Fn(&DriftWindow) -> f64| Series {
        name: name.into(),
        points: windows.iter().map(|w| (w.end_ms as f64, f(w))).collect(),
    };
    let chart = line_chart(&LineChart {
        title: "drifted share per window".into(),
        y_label: "share of columns".into(),
        x: XAxis::Time { now_ms },
        y_from_zero: true,
        series: vec![
            line("features", &|w| share(w.drifted_features, w.features)),
            line("outputs", &|w| share(w.drifted_outputs, w.outputs)),
        ],
    });
    format!("<figure>{chart}</figure>")
}

fn columns_table(window: &DriftWindow) -> String {
    let rows: Vec<Vec<Cell>> = window
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            vec![
                Cell::Html(format!("<a href=\"#column-{i}\">{}</a>", esc(&c.name))),
                Cell::text(if c.output { "output" } else { "feature" }),
                Cell::text(&c.test),
                Cell::Num(num(c.statistic)),
                Cell::Num(num(c.threshold)),
                if c.drifted {
                    Cell::Html("<span class=\"bad\">drifted</span>".into())
                } else {
                    Cell::Html("<span class=\"good\">no drift</span>".into())
                },
                Cell::Num(num(c.psi)),
                Cell::Num(c.rows.to_string()),
            ]
        })
        .collect();
    table(
        &[
            "column",
            "kind",
            "test",
            "statistic",
            "threshold",
            "verdict",
            "PSI",
            "rows",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::ColumnDrift;

    fn column(name: &str, output: bool, drifted: bool) -> ColumnDrift {
        ColumnDrift {
            name: name.into(),
            output,
            test: "wasserstein".into(),
            statistic: 0.2,
            threshold: 0.1,
            drifted,
            psi: 0.3,
            rows: 40,
            counts: vec![10, 10, 20],
            ..Default::default()
        }
    }

    fn reference(name: &str) -> ReferenceColumn {
        ReferenceColumn {
            name: name.into(),
            edges: vec![-1.0, 1.0],
            counts: vec![5, 90, 5],
            mean: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn a_version_page_shows_each_column_with_two_histograms() {
        let drift = ModelDrift {
            model: "m<1>".into(),
            version: 3,
            windows: vec![DriftWindow {
                rows: 40,
                end_ms: 1000,
                features: 2,
                drifted_features: 1,
                columns: vec![
                    column("f0", false, true),
                    column("f<1>", false, false),
                    column("output:a", true, false),
                ],
                ..Default::default()
            }],
            reference: vec![reference("f0"), reference("f<1>"), reference("output:a")],
        };
        let alert = DriftAlert {
            id: 1,
            model: "m<1>".into(),
            version: 3,
            kind: "dataset_drift".into(),
            ..Default::default()
        };
        let body = version(&drift, &[alert], 2000);
        assert_eq!(body.matches("<figure class=\"column\"").count(), 3);
        assert_eq!(body.matches("data-series=\"reference\"").count(), 3);
        assert_eq!(body.matches("data-series=\"live\"").count(), 3);
        assert!(body.contains("data-column=\"f&lt;1&gt;\""));
        assert!(body.contains("<span class=\"bad\">drifted</span>"));
        assert!(body.contains("/ui/drift/m%3C1%3E/3"));
        assert!(body.contains("<span class=\"bad\">firing</span>"));
        // Reference 90% in the middle bin, live 25% there.
        assert!(body.contains("reference -1 to 1: 90.0%"), "{body}");
        assert!(body.contains("live -1 to 1: 25.0%"), "{body}");
        let empty = version(&ModelDrift::default(), &[], 0);
        assert!(empty.contains("no drift window"));
    }
}
