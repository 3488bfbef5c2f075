//! Telemetry to the leader, every `telemetry_interval_ms`: the host (CPU, memory,
//! the data disk, GPUs through NVML when present), each replica's requests and
//! latency histogram since the last report, what each model version served,
//! counted into its reference bins (the drift monitor's input), and the labels
//! the feedback endpoint matched, scored per model version.
//!
//! Everything in a report is a delta, so reports add up on the leader. A report
//! that cannot be sent is not lost: its model counts and feedback scores are
//! merged into the next one (counts add, so the pending report stays the size of
//! one report however long the leader is away), and replica deltas are taken
//! against the last report that went through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_common::client::ClusterClient;
use kiln_common::drift::LiveColumn;
use kiln_proto::v1::{
    FeedbackTelemetry, GpuTelemetry, HostTelemetry, ModelTelemetry, ReplicaTelemetry,
    TelemetryReport,
};
use nvml_wrapper::Nvml;
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, System};
use tokio_util::sync::CancellationToken;

use crate::resources::pick_disk;
use crate::serving::engine::EngineStats;
use crate::serving::feedback::{self, Feedback};
use crate::serving::replicas::ServingTable;

/// Reads the host's load; blocking (it reads `/proc` and calls NVML).
struct HostProbe {
    system: System,
    disks: Disks,
    data_disk: Option<usize>,
    nvml: Option<Nvml>,
}

impl HostProbe {
    fn new(data_dir: &Path) -> HostProbe {
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        let disks =
            Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
        let data_disk = pick_disk(disks.list().iter().map(|d| d.mount_point()), &data_dir);
        let mut system = System::new();
        system.refresh_cpu_usage();
        HostProbe {
            system,
            disks,
            data_disk,
            nvml: Nvml::init().ok(),
        }
    }

    /// The host now; CPU use is the average since the previous read.
    fn read(&mut self) -> HostTelemetry {
        self.system
            .refresh_cpu_specifics(CpuRefreshKind::nothing().with_cpu_usage());
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let (disk_total_bytes, disk_free_bytes) = self
            .data_disk
            .and_then(|i| self.disks.list_mut().get_mut(i))
            .map(|disk| {
                disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
                (disk.total_space(), disk.available_space())
            })
            .unwrap_or((0, 0));
        HostTelemetry {
            cpu_percent: f64::from(self.system.global_cpu_usage()),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            disk_free_bytes,
            disk_total_bytes,
            gpus: self.gpus(),
        }
    }

    fn gpus(&self) -> Vec<GpuTelemetry> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok();
                Some(GpuTelemetry {
                    index,
                    name: device.name().unwrap_or_default(),
                    utilization_percent: device.utilization_rates().map_or(0, |u| u.gpu),
                    memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
                    memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
                })
            })
            .collect()
    }
}

/// What the telemetry loop needs.
pub struct TelemetryContext {
    pub client: Arc<ClusterClient>,
    pub worker_id: String,
    pub table: Arc<ServingTable>,
    /// Scores of the labels matched since the last report.
    pub feedback: Arc<Feedback>,
    pub data_dir: PathBuf,
    pub interval: Duration,
}

/// Reports telemetry every interval until `stop`.
pub async fn telemetry_loop(ctx: TelemetryContext, stop: CancellationToken) {
    let data_dir = ctx.data_dir.clone();
    let probe = tokio::task::spawn_blocking(move || HostProbe::new(&data_dir)).await;
    let Ok(mut probe) = probe else {
        tracing::warn!("the host probe did not start; no telemetry");
        return;
    };
    let mut sent: HashMap<(String, u64), EngineStats> = HashMap::new();
    let mut pending: HashMap<(String, u64), ModelTelemetry> = HashMap::new();
    let mut pending_feedback: HashMap<(String, String, u64), FeedbackTelemetry> = HashMap::new();
    let mut interval = tokio::time::interval(ctx.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let read = tokio::task::spawn_blocking(move || {
            let host = probe.read();
            (probe, host)
        })
        .await;
        let Ok((returned, host)) = read else {
            tracing::warn!("the host probe failed; no more telemetry");
            return;
        };
        probe = returned;

        for model in ctx
            .table
            .all()
            .iter()
            .filter_map(|r| r.engine.monitor()?.take())
        {
            merge_model(&mut pending, model);
        }
        for scored in ctx.feedback.take_scores() {
            merge_feedback(&mut pending_feedback, scored);
        }
        let now: Vec<_> = ctx
            .table
            .all()
            .iter()
            .map(|r| {
                (
                    r.deployment.clone(),
                    r.id,
                    r.model.clone(),
                    r.version,
                    r.engine.stats(),
                )
            })
            .collect();
        let replicas = now
            .iter()
            .map(|(deployment, id, model, version, stats)| {
                let before = sent.get(&(deployment.clone(), *id));
                replica_delta(deployment, *id, model, *version, stats, before)
            })
            .collect();
        let report = TelemetryReport {
            worker_id: ctx.worker_id.clone(),
            interval_ms: ctx.interval.as_millis() as u64,
            host: Some(host),
            replicas,
            models: pending.values().cloned().collect(),
            feedback: pending_feedback.values().cloned().collect(),
        };
        let result = ctx
            .client
            .call(|mut c| {
                let report = report.clone();
                async move { c.report_telemetry(report).await.map(|r| r.into_inner()) }
            })
            .await;
        match result {
            Ok(_) => {
                pending.clear();
                pending_feedback.clear();
                sent = now
                    .into_iter()
                    .map(|(deployment, id, _, _, stats)| ((deployment, id), stats))
                    .collect();
            }
            Err(e) => {
                tracing::debug!(error = %e, models = pending.len(), "telemetry not sent; kept for the next report");
            }
        }
    }
}

/// Adds a model's counts to those waiting to be sent.
fn merge_model(pending: &mut HashMap<(String, u64), ModelTelemetry>, model: ModelTelemetry) {
    let key = (model.model.clone(), model.version);
    let Some(waiting) = pending.get_mut(&key) else {
        pending.insert(key, model);
        return;
    };
    if waiting.columns.len() != model.columns.len() {
        *waiting = model;
        return;
    }
    waiting.rows += model.rows;
    for (into, from) in waiting.columns.iter_mut().zip(&model.columns) {
        let bins = into.counts.len();
        let merged = LiveColumn::from_proto(into, bins).and_then(|mut a| {
            a.merge(&LiveColumn::from_proto(from, bins)?)?;
            Ok(a)
        });
        if let Ok(merged) = merged {
            *into = merged.to_proto();
        }
    }
}

/// Adds a model version's feedback scores to those waiting to be sent.
fn merge_feedback(
    pending: &mut HashMap<(String, String, u64), FeedbackTelemetry>,
    scored: FeedbackTelemetry,
) {
    let key = (
        scored.deployment.clone(),
        scored.model.clone(),
        scored.version,
    );
    match pending.get_mut(&key) {
        Some(waiting) => feedback::merge(waiting, &scored),
        None => {
            pending.insert(key, scored);
        }
    }
}

/// One replica's requests since `before` (its stats at the last report sent).
fn replica_delta(
    deployment: &str,
    id: u64,
    model: &str,
    version: u64,
    now: &EngineStats,
    before: Option<&EngineStats>,
) -> ReplicaTelemetry {
    let zero = EngineStats::default();
    let before = before.unwrap_or(&zero);
    let latency_counts = now
        .latency_counts
        .iter()
        .enumerate()
        .map(|(i, c)| c.saturating_sub(before.latency_counts.get(i).copied().unwrap_or(0)))
        .collect();
    ReplicaTelemetry {
        deployment: deployment.to_string(),
        replica_id: id,
        model: model.to_string(),
        version,
        requests: now.requests.saturating_sub(before.requests),
        failures: now.failures.saturating_sub(before.failures),
        rejected: now.rejected.saturating_sub(before.rejected),
        invalid: now.invalid.saturating_sub(before.invalid),
        timeouts: now.timeouts.saturating_sub(before.timeouts),
        rows: now.rows.saturating_sub(before.rows),
        latency_counts,
        latency_sum_ms: now.latency_us.saturating_sub(before.latency_us) as f64 / 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_deltas_subtract_the_last_report_sent() {
        let before = EngineStats {
            requests: 10,
            failures: 1,
            latency_counts: vec![5, 5],
            latency_us: 1_000,
            ..EngineStats::default()
        };
        let now = EngineStats {
            requests: 25,
            failures: 1,
            rows: 40,
            latency_counts: vec![9, 16],
            latency_us: 4_000,
            ..EngineStats::default()
        };
        let delta = replica_delta("iris", 3, "iris-mlp", 2, &now, Some(&before));
        assert_eq!((delta.requests, delta.failures, delta.rows), (15, 0, 40));
        assert_eq!(delta.latency_counts, vec![4, 11]);
        assert!((delta.latency_sum_ms - 3.0).abs() < 1e-9);
        let first = replica_delta("iris", 3, "iris-mlp", 2, &now, None);
        assert_eq!(first.requests, 25);
    }

    #[test]
    fn unsent_model_counts_add_up_into_the_next_report() {
        let column = |count: u64| kiln_proto::v1::ColumnCounts {
            counts: vec![count, 1],
            sums: vec![count as f64, 2.0],
            non_finite: 1,
            min: 0.0,
            max: count as f32,
        };
        let model = |rows: u64, count: u64| ModelTelemetry {
            model: "m".into(),
            version: 1,
            rows,
            columns: vec![column(count)],
        };
        let mut pending = HashMap::new();
        merge_model(&mut pending, model(3, 2));
        merge_model(&mut pending, model(4, 5));
        let merged = &pending[&("m".to_string(), 1)];
        assert_eq!(merged.rows, 7);
        assert_eq!(merged.columns[0].counts, vec![7, 2]);
        assert_eq!(merged.columns[0].non_finite, 2);
        assert_eq!((merged.columns[0].min, merged.columns[0].max), (0.0, 5.0));
    }

    #[test]
    fn unsent_feedback_scores_add_up_into_the_next_report() {
        let scored = |deployment: &str, labelled: u64, correct: u64| FeedbackTelemetry {
            deployment: deployment.into(),
            model: "m".into(),
            version: 2,
            labelled,
            correct,
            abs_error_sum: 0.5,
            squared_error_sum: 0.25,
            classification: true,
        };
        let mut pending = HashMap::new();
        merge_feedback(&mut pending, scored("a", 3, 1));
        merge_feedback(&mut pending, scored("a", 4, 4));
        merge_feedback(&mut pending, scored("b", 1, 0));
        assert_eq!(pending.len(), 2);
        let a = &pending[&("a".to_string(), "m".to_string(), 2)];
        assert_eq!((a.labelled, a.correct), (7, 5));
        assert_eq!((a.abs_error_sum, a.squared_error_sum), (1.0, 0.5));
        assert!(a.classification);
    }
}
