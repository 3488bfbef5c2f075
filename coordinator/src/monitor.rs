//! The leader's telemetry store: what workers report, merged in memory into fixed
//! windows per model version until the drift monitor judges them.
//!
//! Windows start at multiples of `drift.window_ms` of the leader's clock, and a
//! report counts in the window open when it arrives (reports are deltas since the
//! worker's previous one, so a report lands at most one telemetry interval late).
//! A window closes once its end has passed; the drift monitor then takes it,
//! judges it against the version's reference and proposes the verdict. Counts add
//! exactly, so the order in which workers report does not matter.
//!
//! Memory: one open window per model version and window start, each the size of
//! one reference (columns × bins); at most [`MAX_OPEN_WINDOWS`] are open, and a
//! report beyond that is dropped with a warning. A new leader starts with no open
//! windows: the window in progress at a failover is judged on what reaches the new
//! leader only, and a window with too few rows is not judged at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use kiln_common::drift::LiveColumn;
use kiln_common::reference::ReferenceStats;
use kiln_common::{Error, Result};
use kiln_proto::v1::{HostTelemetry, ReplicaTelemetry, ServingWindow, TelemetryReport};

/// Most windows open at once (model versions × starts).
pub const MAX_OPEN_WINDOWS: usize = 1024;
/// A worker's last host report is forgotten after this long without another.
pub const HOST_FORGET_MS: u64 = 10 * 60_000;
/// Most serving windows open at once (deployments × versions × starts).
pub const MAX_OPEN_SERVING: usize = 4096;
/// Most model versions whose reference is kept parsed.
const MAX_REFERENCES: usize = 1024;

/// A model version: name and version.
pub type VersionKey = (String, u64);

/// A deployment, a model version it serves and a window start.
type ServingSlot = (String, VersionKey, u64);

/// One model version's counts over one window.
#[derive(Debug, Clone)]
pub struct OpenWindow {
    pub start_ms: u64,
    pub rows: u64,
    pub columns: Vec<LiveColumn>,
    /// Deployments whose replicas reported this version in the window.
    pub deployments: BTreeSet<String>,
}

/// A closed window handed to the drift monitor.
#[derive(Debug, Clone)]
pub struct ClosedWindow {
    pub model: String,
    pub version: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub window: OpenWindow,
    pub reference: Arc<ReferenceStats>,
}

#[derive(Debug, Default)]
struct Inner {
    windows: BTreeMap<(VersionKey, u64), OpenWindow>,
    references: HashMap<VersionKey, Arc<ReferenceStats>>,
    /// Serving counts by deployment, model version and window start.
    serving: BTreeMap<ServingSlot, ServingWindow>,
    hosts: BTreeMap<String, (u64, HostTelemetry)>,
}

/// The leader's telemetry; cheap to clone.
#[derive(Debug, Clone)]
pub struct TelemetryStore {
    window_ms: u64,
    inner: Arc<Mutex<Inner>>,
}

impl TelemetryStore {
    pub fn new(window_ms: u64) -> TelemetryStore {
        TelemetryStore {
            window_ms: window_ms.max(1),
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The parsed reference of a model version, if it was cached.
    pub fn reference(&self, key: &VersionKey) -> Option<Arc<ReferenceStats>> {
        self.lock().references.get(key).cloned()
    }

    /// Adds a worker's report at `now_ms`. `references` holds each reported model
    /// version's reference (one missing: not a monitored version, and its counts
    /// are refused). Returns how many model counts were refused, each with a
    /// warning.
    pub fn record(
        &self,
        report: &TelemetryReport,
        now_ms: u64,
        references: &HashMap<VersionKey, Arc<ReferenceStats>>,
    ) -> usize {
        let start_ms = now_ms - now_ms % self.window_ms;
        let mut refused = 0;
        let mut inner = self.lock();
        if let Some(host) = &report.host {
            inner
                .hosts
                .insert(report.worker_id.clone(), (now_ms, host.clone()));
        }
        for replica in &report.replicas {
            let counts = ServingWindow {
                requests: replica.requests,
                failures: replica.failures,
                rejected: replica.rejected,
                invalid: replica.invalid,
                timeouts: replica.timeouts,
                rows: replica.rows,
                latency_counts: replica.latency_counts.clone(),
                latency_sum_ms: replica.latency_sum_ms,
                ..ServingWindow::default()
            };
            if !is_idle(replica) {
                refused += inner.add_serving(
                    (
                        replica.deployment.clone(),
                        (replica.model.clone(), replica.version),
                        start_ms,
                    ),
                    self.window_ms,
                    &counts,
                );
            }
        }
        for feedback in &report.feedback {
            let counts = ServingWindow {
                labelled: feedback.labelled,
                correct: feedback.correct,
                abs_error_sum: feedback.abs_error_sum,
                squared_error_sum: feedback.squared_error_sum,
                classification: feedback.classification,
                ..ServingWindow::default()
            };
            refused += inner.add_serving(
                (
                    feedback.deployment.clone(),
                    (feedback.model.clone(), feedback.version),
                    start_ms,
                ),
                self.window_ms,
                &counts,
            );
        }
        for model in &report.models {
            let key = (model.model.clone(), model.version);
            let checked = references
                .get(&key)
                .cloned()
                .ok_or_else(|| {
                    Error::NotFound(format!("{}@{} has no reference statistics", key.0, key.1))
                })
                .and_then(|r| Ok((counts_of(&r, model)?, r)));
            let columns = match checked {
                Ok((columns, reference)) => {
                    if inner.references.len() >= MAX_REFERENCES {
                        inner.references.clear();
                    }
                    inner.references.insert(key.clone(), reference);
                    columns
                }
                Err(e) => {
                    // A version registered before references were kept sends counts
                    // every report: not worth a warning each time.
                    tracing::debug!(worker = %report.worker_id, error = %e, "telemetry counts refused");
                    refused += 1;
                    continue;
                }
            };
            let deployments: BTreeSet<String> = report
                .replicas
                .iter()
                .filter(|r| r.model == key.0 && r.version == key.1)
                .map(|r| r.deployment.clone())
                .collect();
            let slot = (key, start_ms);
            if !inner.windows.contains_key(&slot) && inner.windows.len() >= MAX_OPEN_WINDOWS {
                tracing::warn!(model = %slot.0 .0, version = slot.0 .1, "too many open drift windows; counts dropped");
                refused += 1;
                continue;
            }
            let window = inner.windows.entry(slot).or_insert_with(|| OpenWindow {
                start_ms,
                rows: 0,
                columns: columns
                    .iter()
                    .map(|c| LiveColumn::new(c.counts.len()))
                    .collect(),
                deployments: BTreeSet::new(),
            });
            window.rows = window.rows.saturating_add(model.rows);
            for (into, from) in window.columns.iter_mut().zip(&columns) {
                // Same reference, same bins: cannot fail.
                let _ = into.merge(from);
            }
            window.deployments.extend(deployments);
        }
        refused
    }

    /// Takes every window whose end has passed at `now_ms`.
    pub fn take_closed(&self, now_ms: u64) -> Vec<ClosedWindow> {
        let mut inner = self.lock();
        let closed: Vec<(VersionKey, u64)> = inner
            .windows
            .keys()
            .filter(|(_, start)| start + self.window_ms <= now_ms)
            .cloned()
            .collect();
        closed
            .into_iter()
            .filter_map(|slot| {
                let window = inner.windows.remove(&slot)?;
                let reference = inner.references.get(&slot.0)?.clone();
                Some(ClosedWindow {
                    model: slot.0 .0,
                    version: slot.0 .1,
                    start_ms: slot.1,
                    end_ms: slot.1 + self.window_ms,
                    window,
                    reference,
                })
            })
            .collect()
    }

    /// Takes every serving window whose end has passed at `now_ms`, in
    /// deployment, version and start order.
    pub fn take_closed_serving(&self, now_ms: u64) -> Vec<ServingWindow> {
        let mut inner = self.lock();
        let closed: Vec<_> = inner
            .serving
            .keys()
            .filter(|(_, _, start)| start + self.window_ms <= now_ms)
            .cloned()
            .collect();
        closed
            .into_iter()
            .filter_map(|slot| inner.serving.remove(&slot))
            .collect()
    }

    /// Forgets the open windows (on losing the leadership).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.windows.clear();
        inner.serving.clear();
    }

    /// The last host report of each worker, with when it arrived; a worker
    /// silent for [`HOST_FORGET_MS`] is forgotten.
    pub fn hosts(&self) -> Vec<(String, u64, HostTelemetry)> {
        let now_ms = kiln_common::clock::now_ms();
        let mut inner = self.lock();
        inner
            .hosts
            .retain(|_, (at, _)| now_ms.saturating_sub(*at) < HOST_FORGET_MS);
        inner
            .hosts
            .iter()
            .map(|(id, (at, host))| (id.clone(), *at, host.clone()))
            .collect()
    }
}

impl Inner {
    /// Adds one report's serving counts to the window of their deployment and
    /// version; returns 1 when the window could not open (too many are), else 0.
    fn add_serving(&mut self, slot: ServingSlot, window_ms: u64, counts: &ServingWindow) -> usize {
        if !self.serving.contains_key(&slot) && self.serving.len() >= MAX_OPEN_SERVING {
            tracing::warn!(deployment = %slot.0, model = %slot.1 .0, version = slot.1 .1, "too many open serving windows; counts dropped");
            return 1;
        }
        let window = self.serving.entry(slot).or_insert_with_key(
            |(deployment, (model, version), start_ms)| ServingWindow {
                deployment: deployment.clone(),
                model: model.clone(),
                version: *version,
                start_ms: *start_ms,
                end_ms: start_ms + window_ms,
                ..ServingWindow::default()
            },
        );
        crate::state::serving::add_into(window, counts);
        0
    }
}

/// Whether a replica's report counts nothing (an idle replica still reports).
fn is_idle(replica: &ReplicaTelemetry) -> bool {
    replica.requests == 0 && replica.failures == 0
}

/// Checks a model's reported counts against its reference: one column per
/// reference column, each with the reference's bins.
fn counts_of(
    reference: &ReferenceStats,
    model: &kiln_proto::v1::ModelTelemetry,
) -> Result<Vec<LiveColumn>> {
    if model.columns.len() != reference.columns.len() {
        return Err(Error::InvalidArgument(format!(
            "{}@{}: {} columns reported, the reference has {}",
            model.model,
            model.version,
            model.columns.len(),
            reference.columns.len()
        )));
    }
    model
        .columns
        .iter()
        .zip(&reference.columns)
        .map(|(counts, column)| {
            LiveColumn::from_proto(counts, column.bins()).map_err(|e| {
                Error::InvalidArgument(format!(
                    "{}@{} column {:?}: {e}",
                    model.model, model.version, column.name
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{ModelTelemetry, ReplicaTelemetry};

    fn reference() -> Arc<ReferenceStats> {
        let a: Vec<f32> = (0..100).map(|i| i as f32).collect();
        Arc::new(ReferenceStats::compute(&[("a", &a), ("output", &a)]))
    }

    fn known() -> HashMap<VersionKey, Arc<ReferenceStats>> {
        [(("m".to_string(), 1), reference())].into_iter().collect()
    }

    fn report(worker: &str, values: &[f32]) -> TelemetryReport {
        let r = reference();
        let columns = r
            .columns
            .iter()
            .map(|c| {
                let mut live = LiveColumn::new(c.bins());
                for &v in values {
                    live.observe(c, v);
                }
                live.to_proto()
            })
            .collect();
        TelemetryReport {
            worker_id: worker.into(),
            replicas: vec![ReplicaTelemetry {
                deployment: "iris".into(),
                model: "m".into(),
                version: 1,
                ..ReplicaTelemetry::default()
            }],
            models: vec![ModelTelemetry {
                model: "m".into(),
                version: 1,
                rows: values.len() as u64,
                columns,
            }],
            ..TelemetryReport::default()
        }
    }

    #[test]
    fn reports_from_workers_add_up_in_their_window_until_it_closes() {
        let store = TelemetryStore::new(1000);
        let known = &known();
        assert_eq!(store.record(&report("w1", &[1.0, 50.0]), 10_100, known), 0);
        assert_eq!(store.record(&report("w2", &[99.0]), 10_900, known), 0);
        assert_eq!(store.record(&report("w1", &[7.0]), 11_000, known), 0);
        assert!(store.reference(&("m".into(), 1)).is_some());
        assert!(store.take_closed(10_999).is_empty(), "still open");
        let closed = store.take_closed(11_000);
        assert_eq!(closed.len(), 1);
        let w = &closed[0];
        assert_eq!((w.start_ms, w.end_ms, w.window.rows), (10_000, 11_000, 3));
        assert_eq!(w.window.columns[0].rows(), 3);
        assert_eq!(
            w.window.deployments.iter().collect::<Vec<_>>(),
            vec!["iris"]
        );
        let next = store.take_closed(12_000);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].window.rows, 1);
        assert_eq!(store.hosts().len(), 0, "no host part was sent");
    }

    #[test]
    fn counts_without_a_reference_or_of_another_shape_are_refused() {
        let store = TelemetryStore::new(1000);
        assert_eq!(store.record(&report("w1", &[1.0]), 5, &HashMap::new()), 1);
        let mut bad = report("w1", &[1.0]);
        bad.models[0].columns.pop();
        assert_eq!(store.record(&bad, 5, &known()), 1);
        let mut short = report("w1", &[1.0]);
        short.models[0].columns[0].counts.pop();
        assert_eq!(store.record(&short, 5, &known()), 1);
        assert!(store.take_closed(u64::MAX / 2).is_empty());
    }
}
