//! `kiln drift status [MODEL]`: per-feature drift of the newest window of each
//! monitored model version, the trend over the recent windows, and the alerts.

use kiln_common::client::ClusterClient;
use kiln_proto::v1::{
    ColumnDrift, DriftAlert, DriftStatusRequest, DriftStatusResponse, DriftWindow,
};
use serde_json::{json, Value};

use crate::DriftCommand;

/// `kiln drift ...`.
pub async fn run(client: ClusterClient, command: DriftCommand) -> anyhow::Result<()> {
    match command {
        DriftCommand::Status {
            model,
            windows,
            json,
        } => {
            let request = DriftStatusRequest {
                model: model.unwrap_or_default(),
                windows,
            };
            let status = client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.drift_status(request).await.map(|r| r.into_inner()) }
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
    }
}

/// A number for JSON: NaN (a statistic not computed) becomes null.
fn number(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

fn column_json(c: &ColumnDrift) -> Value {
    json!({
        "name": c.name,
        "output": c.output,
        "test": c.test,
        "statistic": number(c.statistic),
        "threshold": number(c.threshold),
        "drifted": c.drifted,
        "psi": number(c.psi),
        "jensen_shannon": number(c.jensen_shannon),
        "wasserstein": number(c.wasserstein),
        "ks_statistic": number(c.ks_statistic),
        "ks_p_value": number(c.ks_p_value),
        "chi_square_p_value": number(c.chi_square_p_value),
        "rows": c.rows,
        "non_finite": c.non_finite,
        "mean": number(c.mean),
        "counts": c.counts,
    })
}

fn window_json(w: &DriftWindow) -> Value {
    json!({
        "start_ms": w.start_ms,
        "end_ms": w.end_ms,
        "rows": w.rows,
        "features": w.features,
        "drifted_features": w.drifted_features,
        "dataset_drift": w.dataset_drift,
        "outputs": w.outputs,
        "drifted_outputs": w.drifted_outputs,
        "prediction_drift": w.prediction_drift,
        "deployments": w.deployments,
        "columns": w.columns.iter().map(column_json).collect::<Vec<_>>(),
    })
}

fn alert_json(a: &DriftAlert) -> Value {
    json!({
        "id": a.id,
        "model": a.model,
        "version": a.version,
        "kind": a.kind,
        "state": if a.resolved_at_ms == 0 { "firing" } else { "resolved" },
        "opened_at_ms": a.opened_at_ms,
        "resolved_at_ms": (a.resolved_at_ms != 0).then_some(a.resolved_at_ms),
        "resolution": (!a.resolution.is_empty()).then_some(a.resolution.clone()),
        "columns": a.columns,
        "drifted_share": a.drifted_share,
        "deployments": a.deployments,
        "windows": a.windows,
    })
}

fn status_json(status: &DriftStatusResponse) -> Value {
    json!({
        "models": status.models.iter().map(|m| json!({
            "model": m.model,
            "version": m.version,
            "windows": m.windows.iter().map(window_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "alerts": status.alerts.iter().map(alert_json).collect::<Vec<_>>(),
    })
}

/// A statistic for the table: 4 significant places, `-` when not computed.
fn figure(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// Seconds or minutes since `ms`.
fn ago(ms: u64) -> String {
    let seconds = kiln_common::clock::now_ms().saturating_sub(ms) / 1000;
    if seconds < 120 {
        format!("{seconds}s ago")
    } else {
        format!("{}m ago", seconds / 60)
    }
}

fn print_status(status: &DriftStatusResponse) {
    if status.models.is_empty() {
        println!("no model version has a judged drift window yet");
    }
    for m in &status.models {
        let Some(latest) = m.windows.last() else {
            continue;
        };
        println!(
            "{}@{}  window ended {} ({} rows, deployments: {})",
            m.model,
            m.version,
            ago(latest.end_ms),
            latest.rows,
            if latest.deployments.is_empty() {
                "-".to_string()
            } else {
                latest.deployments.join(", ")
            }
        );
        println!(
            "  dataset drift: {} ({} of {} features)   prediction drift: {} ({} of {} outputs)",
            yes_no(latest.dataset_drift),
            latest.drifted_features,
            latest.features,
            yes_no(latest.prediction_drift),
            latest.drifted_outputs,
            latest.outputs
        );
        println!(
            "  {:<20} {:<15} {:>10} {:>9} {:>8} {:>8} {:>11} {:>10}  trend ({} windows)",
            "COLUMN",
            "TEST",
            "STATISTIC",
            "DRIFTED",
            "PSI",
            "JS",
            "WASSERSTEIN",
            "KS",
            m.windows.len()
        );
        for (i, c) in latest.columns.iter().enumerate() {
            let trend: String = m
                .windows
                .iter()
                .map(|w| match w.columns.get(i) {
                    Some(c) if c.drifted => '#',
                    Some(_) => '.',
                    None => ' ',
                })
                .collect();
            println!(
                "  {:<20} {:<15} {:>10} {:>9} {:>8} {:>8} {:>11} {:>10}  {trend}",
                if c.output {
                    format!("{} (out)", c.name)
                } else {
                    c.name.clone()
                },
                c.test,
                figure(c.statistic),
                yes_no(c.drifted),
                figure(c.psi),
                figure(c.jensen_shannon),
                figure(c.wasserstein),
                figure(c.ks_statistic),
            );
        }
        println!();
    }
    if status.alerts.is_empty() {
        println!("no drift alerts");
        return;
    }
    println!("ALERTS (newest first)");
    for a in &status.alerts {
        let state = if a.resolved_at_ms == 0 {
            format!("FIRING since {}", ago(a.opened_at_ms))
        } else {
            format!(
                "resolved {} (opened {})",
                ago(a.resolved_at_ms),
                ago(a.opened_at_ms)
            )
        };
        println!(
            "  #{} {}@{} {}: {} ({} windows; drifted: {})",
            a.id,
            a.model,
            a.version,
            a.kind,
            state,
            a.windows,
            a.columns.join(", ")
        );
        if !a.resolution.is_empty() {
            println!("      resolved by: {}", a.resolution);
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
