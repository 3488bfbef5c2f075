//! Drift monitoring: workers' telemetry in, judged windows and alerts out.
//!
//! - [`Api::report_telemetry_call`] (leader): merges a worker's report into the
//!   open windows of the [`TelemetryStore`].
//! - [`Api::drift_round`] (leader, every second): judges every closed window
//!   against its model version's reference (`kiln_common::drift`) and proposes
//!   the verdict; applying it keeps the window and opens or resolves alerts
//!   (`state::drift`).
//! - [`Api::serving_round`] (leader, every second): records what each
//!   deployment served of each version in every closed window (`state::serving`).
//! - [`Api::drift_status_call`]: the newest windows of each monitored version and
//!   the alert history, for `kiln drift status` and the dashboard.
//! - [`Api::render_drift_metrics`]: the latest verdicts as Prometheus gauges on
//!   every coordinator's `/metrics` (each reads its own replica of the state).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use kiln_common::drift::{window_drift, DriftSettings};
use kiln_common::reference::ReferenceStats;
use kiln_common::{Error, Result};
use kiln_proto::v1::*;
use prost::Message;

use super::grpc::{command, Api};
use super::storage;
use crate::monitor::{ClosedWindow, VersionKey};
use crate::state::drift::read_alert;
use crate::state::keys;
use crate::state::machine::read_counter;
use crate::state::models::read_model;

/// Windows per model version `drift status` returns unless asked otherwise.
const DEFAULT_STATUS_WINDOWS: u32 = 10;
/// Most windows per model version one status returns.
const MAX_STATUS_WINDOWS: u32 = 1_000;
/// Alerts one status returns, newest first.
const STATUS_ALERTS: u64 = 100;
/// Most model versions one status or metrics page covers.
const MAX_MONITORED: usize = 10_000;

impl Api {
    /// Merges a worker's telemetry into the open windows (on the leader).
    pub fn report_telemetry_call(&self, report: &TelemetryReport) -> Result<()> {
        let now_ms = kiln_common::clock::now_ms();
        let mut references = HashMap::new();
        for model in &report.models {
            let key: VersionKey = (model.model.clone(), model.version);
            if references.contains_key(&key) {
                continue;
            }
            if let Some(reference) = self.reference_of(&key)? {
                references.insert(key, reference);
            }
        }
        self.telemetry.record(report, now_ms, &references);
        Ok(())
    }

    /// The parsed reference of a model version (`None`: the version does not exist
    /// or has no reference).
    fn reference_of(&self, key: &VersionKey) -> Result<Option<Arc<ReferenceStats>>> {
        if let Some(cached) = self.telemetry.reference(key) {
            return Ok(Some(cached));
        }
        let Some(model) = read_model(&self.reader, &key.0, key.1).map_err(storage)? else {
            return Ok(None);
        };
        if model.reference.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(ReferenceStats::from_proto(
            &model.reference,
        )?)))
    }

    /// Judges the windows that closed by `now_ms` and records the verdicts of
    /// those with enough rows; returns how many were recorded.
    pub async fn drift_round(&self, now_ms: u64) -> Result<usize> {
        let mut recorded = 0;
        for closed in self.telemetry.take_closed(now_ms) {
            if closed.window.rows < self.drift.min_rows {
                tracing::debug!(
                    model = %closed.model,
                    version = closed.version,
                    rows = closed.window.rows,
                    "drift window too small to judge"
                );
                continue;
            }
            // Off the executor: an exact KS p-value over thousands of rows per
            // column can take tens of milliseconds.
            let (model, version) = (closed.model.clone(), closed.version);
            let share = self.drift.drift_share;
            let judged = tokio::task::spawn_blocking(move || judge(&closed, share))
                .await
                .map_err(|e| Error::Internal(format!("drift judge task: {e}")))
                .and_then(|judged| judged);
            let window = match judged {
                Ok(window) => window,
                Err(e) => {
                    tracing::warn!(%model, %version, error = %e, "drift window not judged");
                    continue;
                }
            };
            // One window's failure (a lost leadership, a storage error) costs that
            // window only; the others taken with it are still recorded.
            match self.record_window(&model, version, window).await {
                Ok(()) => recorded += 1,
                Err(e) => {
                    tracing::warn!(%model, %version, error = %e, "drift window not recorded")
                }
            }
        }
        Ok(recorded)
    }

    /// Records the serving windows that closed by `now_ms` (every deployment and
    /// version that served in them); returns how many.
    pub async fn serving_round(&self, now_ms: u64) -> Result<usize> {
        let closed = self.telemetry.take_closed_serving(now_ms);
        for chunk in closed.chunks(crate::state::serving::MAX_WINDOWS_PER_RECORD) {
            let kind = command::Kind::RecordServing(RecordServing {
                windows: chunk.to_vec(),
                keep_windows: self.drift.keep_windows,
            });
            self.propose(command(kind), false).await?;
        }
        Ok(closed.len())
    }

    /// Proposes a judged window, then tells the webhooks (and the retrain
    /// policies) of the alerts it opened or resolved.
    async fn record_window(&self, model: &str, version: u64, window: DriftWindow) -> Result<()> {
        let before = self.open_alerts(model, version)?;
        let kind = command::Kind::RecordDrift(RecordDrift {
            window: Some(window),
            keep_windows: self.drift.keep_windows,
        });
        self.propose(command(kind), false).await?;
        let after = self.open_alerts(model, version)?;
        for (was, is) in before.into_iter().zip(after) {
            if was != is {
                // Opened (is), resolved (was), or both.
                for id in [was, is].into_iter().filter(|&id| id != 0) {
                    if let Err(e) = self.notify(id).await {
                        tracing::warn!(alert = id, error = %e, "drift alert not sent");
                    }
                }
            }
        }
        Ok(())
    }

    /// The firing alert of each kind for a model version (0: none), in
    /// [`crate::state::drift::KINDS`] order.
    pub(super) fn open_alerts(&self, model: &str, version: u64) -> Result<Vec<u64>> {
        crate::state::drift::KINDS
            .iter()
            .map(|(kind, _)| {
                crate::state::drift::open_alert(&self.reader, model, version, kind).map_err(storage)
            })
            .collect()
    }

    /// Sends alert `id` to the webhook of every deployment it names that has one,
    /// and, when it has just opened, starts the retraining it calls for.
    pub(super) async fn notify(&self, id: u64) -> Result<()> {
        let Some(alert) = read_alert(&self.reader, id).map_err(storage)? else {
            return Ok(());
        };
        if alert.resolved_at_ms == 0 {
            if let Err(e) = self.retrain_on(&alert).await {
                tracing::warn!(alert = id, error = %e, "retraining not started");
            }
        }
        for name in &alert.deployments {
            let deployment =
                crate::state::deployments::read_deployment(&self.reader, name).map_err(storage)?;
            if let Some(d) = deployment.filter(|d| !d.drift_webhook.is_empty()) {
                self.notifier
                    .send(d.drift_webhook, crate::webhook::payload(&alert, name));
            }
        }
        Ok(())
    }

    /// The newest windows of each monitored version (of `model`, or all) and the
    /// newest alerts.
    pub async fn drift_status_call(&self, req: DriftStatusRequest) -> Result<DriftStatusResponse> {
        self.read_barrier(false).await?;
        let windows = match req.windows {
            0 => DEFAULT_STATUS_WINDOWS,
            n => n.min(MAX_STATUS_WINDOWS),
        };
        let mut models = Vec::new();
        for (model, version) in self.monitored_versions()? {
            if !req.model.is_empty() && req.model != model {
                continue;
            }
            let reference = read_model(&self.reader, &model, version)
                .map_err(storage)?
                .map(|m| m.reference)
                .unwrap_or_default();
            models.push(ModelDrift {
                windows: self.newest_windows(&model, version, windows)?,
                model,
                version,
                reference,
            });
        }
        if !req.model.is_empty() && models.is_empty() {
            let known = crate::state::models::latest(&self.reader, &req.model).map_err(storage)?;
            if known == 0 {
                return Err(Error::NotFound(format!("no model is named {}", req.model)));
            }
        }
        let last = read_counter(&self.reader, keys::DRIFT_ALERT_SEQ).map_err(storage)?;
        let mut alerts = Vec::new();
        for id in (1..=last).rev().take(STATUS_ALERTS as usize) {
            let Some(alert) = read_alert(&self.reader, id).map_err(storage)? else {
                break;
            };
            if req.model.is_empty() || alert.model == req.model {
                alerts.push(alert);
            }
        }
        Ok(DriftStatusResponse { models, alerts })
    }

    /// Every model version with at least one judged window, in key order.
    fn monitored_versions(&self) -> Result<Vec<VersionKey>> {
        let prefix = keys::DRIFT_SEQ.as_bytes();
        let mut out = Vec::new();
        for (key, _) in self.reader.scan(prefix, MAX_MONITORED).map_err(storage)? {
            let rest = String::from_utf8_lossy(&key[prefix.len()..]).to_string();
            let Some((model, version)) = rest.rsplit_once('/') else {
                continue;
            };
            if let Ok(version) = version.parse() {
                out.push((model.to_string(), version));
            }
        }
        Ok(out)
    }

    /// Up to `n` newest windows of a model version, oldest first.
    fn newest_windows(&self, model: &str, version: u64, n: u32) -> Result<Vec<DriftWindow>> {
        let last = read_counter(&self.reader, &keys::drift_seq(model, version)).map_err(storage)?;
        let first = last.saturating_sub(u64::from(n)) + 1;
        let mut windows = Vec::new();
        for seq in first..=last {
            if let Some(bytes) = self
                .reader
                .get(&keys::drift_window(model, version, seq))
                .map_err(storage)?
            {
                windows.push(
                    DriftWindow::decode(bytes.as_slice())
                        .map_err(|e| Error::Internal(format!("decode drift window: {e}")))?,
                );
            }
        }
        Ok(windows)
    }

    /// Prometheus text for the newest window of every monitored version and the
    /// firing alerts.
    pub fn render_drift_metrics(&self) -> Result<String> {
        let mut latest = Vec::new();
        for (model, version) in self.monitored_versions()? {
            if let Some(window) = self.newest_windows(&model, version, 1)?.pop() {
                latest.push(window);
            }
        }
        // (name, help, samples): each family's header, then its samples.
        let mut families: Vec<(&str, &str, Vec<String>)> = vec![
            ("kiln_drift_share", "Share of drifted columns in the newest judged window, by kind (features, outputs).", Vec::new()),
            ("kiln_drift_detected", "1 when the newest window drifts, by kind (dataset, prediction).", Vec::new()),
            ("kiln_drift_window_rows", "Rows counted in the newest judged window (every served row, or an even sample above each replica's budget).", Vec::new()),
            ("kiln_drift_statistic", "Each column's value of the test that judges it (a p-value or a distance).", Vec::new()),
            ("kiln_drift_column_drifted", "1 when a column drifted in the newest window.", Vec::new()),
            ("kiln_drift_psi", "Each column's population stability index.", Vec::new()),
            ("kiln_drift_alert_firing", "1 while a drift alert of the kind fires for the model version.", Vec::new()),
        ];
        for w in &latest {
            let labels = format!("model=\"{}\",version=\"{}\"", escape(&w.model), w.version);
            let ratio = |d: u32, t: u32| {
                if t == 0 {
                    0.0
                } else {
                    f64::from(d) / f64::from(t)
                }
            };
            let mut add = |family: usize, extra: String, value: String| {
                let name = families[family].0;
                families[family]
                    .2
                    .push(format!("{name}{{{labels}{extra}}} {value}"));
            };
            add(
                0,
                ",kind=\"features\"".into(),
                ratio(w.drifted_features, w.features).to_string(),
            );
            add(
                0,
                ",kind=\"outputs\"".into(),
                ratio(w.drifted_outputs, w.outputs).to_string(),
            );
            add(
                1,
                ",kind=\"dataset\"".into(),
                u8::from(w.dataset_drift).to_string(),
            );
            add(
                1,
                ",kind=\"prediction\"".into(),
                u8::from(w.prediction_drift).to_string(),
            );
            add(2, String::new(), w.rows.to_string());
            for c in &w.columns {
                let column = format!(",column=\"{}\"", escape(&c.name));
                add(
                    3,
                    format!("{column},test=\"{}\"", c.test),
                    number(c.statistic),
                );
                add(4, column.clone(), u8::from(c.drifted).to_string());
                add(5, column, number(c.psi));
            }
            for (kind, _) in crate::state::drift::KINDS {
                let open = crate::state::drift::open_alert(&self.reader, &w.model, w.version, kind)
                    .map_err(storage)?;
                add(
                    6,
                    format!(",kind=\"{kind}\""),
                    u8::from(open != 0).to_string(),
                );
            }
        }
        let mut text = String::new();
        for (name, help, samples) in families {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
            for sample in samples {
                let _ = writeln!(text, "{sample}");
            }
        }
        Ok(text)
    }
}

/// Judges a closed window against its reference.
fn judge(closed: &ClosedWindow, drift_share: f64) -> Result<DriftWindow> {
    let reference = &closed.reference;
    let settings = DriftSettings { drift_share };
    let mut window = window_drift(
        reference,
        reference.feature_count(),
        &closed.window.columns,
        &settings,
    )?;
    window.model = closed.model.clone();
    window.version = closed.version;
    window.start_ms = closed.start_ms;
    window.end_ms = closed.end_ms;
    window.rows = closed.window.rows;
    window.deployments = closed.window.deployments.iter().cloned().collect();
    Ok(window)
}

/// A label value with `\`, `"` and newlines escaped.
pub(super) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value as Prometheus writes it (NaN for a statistic not computed).
pub(super) fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}
