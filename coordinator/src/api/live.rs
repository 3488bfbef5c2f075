//! Live serving figures from the serving windows (`state::serving`): each
//! deployment's request rate, error rate and latency quantiles per model version
//! in its newest window, and the live accuracy (or RMSE) the feedback endpoint's
//! labels give over the last [`LIVE_SPAN_MS`], as Prometheus gauges on every
//! coordinator's `/metrics` (each reads its own replica of the state).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kiln_common::drift::latency_quantile;
use kiln_common::Result;
use kiln_proto::v1::ServingWindow;

use super::grpc::Api;
use super::storage;
use crate::canary::{accuracy, error_rate, rmse};
use crate::state::serving::{add_into, windows_since};

/// Live accuracy covers the labels of this long.
pub const LIVE_SPAN_MS: u64 = 15 * 60_000;
/// Most windows read per deployment.
const MAX_WINDOWS: usize = 10_000;

/// One model version of one deployment: its newest window and its sums over the
/// span.
#[derive(Debug, Default, Clone)]
pub struct LiveVersion {
    pub newest: ServingWindow,
    pub span: ServingWindow,
}

impl LiveVersion {
    /// Requests a second in the newest window.
    pub fn requests_per_second(&self) -> f64 {
        let ms = self
            .newest
            .end_ms
            .saturating_sub(self.newest.start_ms)
            .max(1);
        self.newest.requests as f64 * 1000.0 / ms as f64
    }

    /// Correct answers over labelled ones (classification), over the span.
    pub fn accuracy(&self) -> Option<f64> {
        (self.span.classification && self.span.labelled > 0).then(|| accuracy(&self.span))
    }

    /// Root mean squared error against the labels (regression), over the span.
    pub fn rmse(&self) -> Option<f64> {
        (!self.span.classification && self.span.labelled > 0).then(|| rmse(&self.span))
    }
}

/// A deployment's live figures per model version (name, version).
pub type LiveByVersion = BTreeMap<(String, u64), LiveVersion>;

/// Groups windows by model version: the newest of each and the sums of all.
pub fn by_version(windows: &[ServingWindow]) -> LiveByVersion {
    let mut out = LiveByVersion::new();
    for w in windows {
        let live = out.entry((w.model.clone(), w.version)).or_default();
        if live.span.model.is_empty() {
            live.span = ServingWindow {
                deployment: w.deployment.clone(),
                model: w.model.clone(),
                version: w.version,
                start_ms: w.start_ms,
                ..ServingWindow::default()
            };
        }
        add_into(&mut live.span, w);
        live.span.end_ms = live.span.end_ms.max(w.end_ms);
        if w.start_ms >= live.newest.start_ms {
            live.newest = w.clone();
        }
    }
    out
}

impl Api {
    /// Each deployment's live figures per model version over the last
    /// [`LIVE_SPAN_MS`] before `now_ms`.
    pub fn live_serving(&self, now_ms: u64) -> Result<Vec<(String, LiveByVersion)>> {
        let since = now_ms.saturating_sub(LIVE_SPAN_MS);
        self.deployments()?
            .into_iter()
            .map(|d| {
                let windows =
                    windows_since(&self.reader, &d.name, since, MAX_WINDOWS).map_err(storage)?;
                Ok((d.name, by_version(&windows)))
            })
            .collect()
    }

    /// Prometheus text for the live serving figures.
    pub fn render_serving_metrics(&self, now_ms: u64) -> Result<String> {
        let families: [(&str, &str); 6] = [
            ("kiln_serving_requests_per_second", "Requests a second a deployment's model version answered in its newest serving window."),
            ("kiln_serving_error_rate", "Failed and timed-out requests over requests in the newest serving window."),
            ("kiln_serving_latency_ms", "Request latency quantiles in the newest serving window (interpolated in histogram buckets)."),
            ("kiln_serving_labelled", "Answers matched to a label through the feedback endpoint in the last 15 minutes."),
            ("kiln_serving_accuracy", "Share of labelled answers that were right in the last 15 minutes (classification)."),
            ("kiln_serving_rmse", "Root mean squared error of labelled answers in the last 15 minutes (regression)."),
        ];
        let mut samples: Vec<Vec<String>> = vec![Vec::new(); families.len()];
        for (deployment, versions) in self.live_serving(now_ms)? {
            for ((model, version), live) in versions {
                let labels = format!(
                    "deployment=\"{}\",model=\"{}\",version=\"{version}\"",
                    super::drift::escape(&deployment),
                    super::drift::escape(&model)
                );
                let mut add = |family: usize, extra: &str, value: f64| {
                    samples[family].push(format!(
                        "{}{{{labels}{extra}}} {}",
                        families[family].0,
                        super::drift::number(value)
                    ));
                };
                add(0, "", live.requests_per_second());
                add(1, "", error_rate(&live.newest));
                for (q, name) in [(0.5, "0.5"), (0.99, "0.99")] {
                    if let Some(ms) = latency_quantile(&live.newest.latency_counts, q) {
                        add(2, &format!(",quantile=\"{name}\""), ms);
                    }
                }
                add(3, "", live.span.labelled as f64);
                if let Some(accuracy) = live.accuracy() {
                    add(4, "", accuracy);
                }
                if let Some(rmse) = live.rmse() {
                    add(5, "", rmse);
                }
            }
        }
        let mut text = String::new();
        for ((name, help), samples) in families.iter().zip(samples) {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
            for sample in samples {
                let _ = writeln!(text, "{sample}");
            }
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(
        version: u64,
        start_ms: u64,
        requests: u64,
        labelled: u64,
        correct: u64,
    ) -> ServingWindow {
        ServingWindow {
            deployment: "d".into(),
            model: "m".into(),
            version,
            start_ms,
            end_ms: start_ms + 2_000,
            requests,
            labelled,
            correct,
            classification: labelled > 0,
            ..ServingWindow::default()
        }
    }

    #[test]
    fn live_figures_take_rates_from_the_newest_window_and_accuracy_from_all() {
        let windows = [
            window(1, 0, 100, 10, 9),
            window(2, 0, 10, 0, 0),
            window(1, 2_000, 300, 10, 5),
        ];
        let live = by_version(&windows);
        let v1 = &live[&("m".to_string(), 1)];
        assert_eq!(v1.requests_per_second(), 150.0);
        assert_eq!(v1.span.requests, 400);
        assert_eq!(v1.accuracy(), Some(0.7));
        assert_eq!(v1.rmse(), None);
        let v2 = &live[&("m".to_string(), 2)];
        assert_eq!(v2.requests_per_second(), 5.0);
        assert_eq!(v2.accuracy(), None, "nothing labelled");
    }

    #[test]
    fn regression_feedback_reads_as_rmse() {
        let mut w = window(1, 0, 10, 4, 0);
        w.classification = false;
        w.squared_error_sum = 16.0;
        let live = by_version(&[w]);
        let v = &live[&("m".to_string(), 1)];
        assert_eq!(v.rmse(), Some(2.0));
        assert_eq!(v.accuracy(), None);
    }
}
