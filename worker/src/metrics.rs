//! The worker's Prometheus metrics: counters the agent bumps, gauges of the
//! machine, and their rendering in the Prometheus text format (version 0.0.4).
//!
//! Written by hand: a handful of numbers does not need a registry, and atomics let
//! the agent update them without a lock while the HTTP server reads them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_proto::v1::Resources;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters and gauges shared, through an `Arc`, by the agent and the HTTP server.
#[derive(Debug)]
pub struct Metrics {
    heartbeats_total: AtomicU64,
    heartbeat_failures_total: AtomicU64,
    disk_free_bytes: AtomicU64,
    chunks_written_total: AtomicU64,
    chunk_bytes_written_total: AtomicU64,
    chunks_read_total: AtomicU64,
    chunk_bytes_read_total: AtomicU64,
    chunks_corrupt_total: AtomicU64,
    cpu_cores: u64,
    memory_bytes: u64,
    disk_bytes: u64,
    gpus: u64,
}

impl Metrics {
    /// Creates the metrics of a machine with `resources`, every counter at zero.
    pub fn new(resources: &Resources) -> Metrics {
        Metrics {
            heartbeats_total: AtomicU64::new(0),
            heartbeat_failures_total: AtomicU64::new(0),
            disk_free_bytes: AtomicU64::new(resources.disk_free_bytes),
            chunks_written_total: AtomicU64::new(0),
            chunk_bytes_written_total: AtomicU64::new(0),
            chunks_read_total: AtomicU64::new(0),
            chunk_bytes_read_total: AtomicU64::new(0),
            chunks_corrupt_total: AtomicU64::new(0),
            cpu_cores: u64::from(resources.cpu_cores),
            memory_bytes: resources.memory_bytes,
            disk_bytes: resources.disk_bytes,
            gpus: resources.gpus.len() as u64,
        }
    }

    /// Counts one heartbeat sent to the coordinators.
    pub fn heartbeat_sent(&self) {
        self.heartbeats_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one heartbeat that got no answer or an error.
    pub fn heartbeat_failed(&self) {
        self.heartbeat_failures_total
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts chunks newly stored and the bytes received for them (new or not).
    pub fn chunks_written(&self, new: u64, bytes: u64) {
        self.chunks_written_total.fetch_add(new, Ordering::Relaxed);
        self.chunk_bytes_written_total
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one chunk served.
    pub fn chunks_read(&self, bytes: u64) {
        self.chunks_read_total.fetch_add(1, Ordering::Relaxed);
        self.chunk_bytes_read_total
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one stored chunk that failed its check.
    pub fn chunk_corrupt(&self) {
        self.chunks_corrupt_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the free space of the data directory's filesystem.
    pub fn set_disk_free_bytes(&self, bytes: u64) {
        self.disk_free_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Returns the heartbeats sent so far.
    pub fn heartbeats_total(&self) -> u64 {
        self.heartbeats_total.load(Ordering::Relaxed)
    }

    /// Returns the heartbeats failed so far.
    pub fn heartbeat_failures_total(&self) -> u64 {
        self.heartbeat_failures_total.load(Ordering::Relaxed)
    }

    /// Renders every metric in the Prometheus text format; `registered` is whether the
    /// coordinators currently know this worker.
    pub fn render(&self, registered: bool) -> String {
        let samples: [(&str, &str, &str, u64); 13] = [
            (
                "kiln_worker_registered",
                "gauge",
                "Whether the coordinators currently know this worker (1) or not (0).",
                u64::from(registered),
            ),
            (
                "kiln_worker_heartbeats_total",
                "counter",
                "Heartbeats sent to the coordinators, failed ones included.",
                self.heartbeats_total(),
            ),
            (
                "kiln_worker_heartbeat_failures_total",
                "counter",
                "Heartbeats that got an error or no answer in time.",
                self.heartbeat_failures_total(),
            ),
            (
                "kiln_worker_cpu_cores",
                "gauge",
                "CPU cores this worker may use.",
                self.cpu_cores,
            ),
            (
                "kiln_worker_memory_bytes",
                "gauge",
                "Memory of this machine, or of its cgroup when that is smaller.",
                self.memory_bytes,
            ),
            (
                "kiln_worker_disk_bytes",
                "gauge",
                "Size of the filesystem that holds the data directory.",
                self.disk_bytes,
            ),
            (
                "kiln_worker_disk_free_bytes",
                "gauge",
                "Free space of the filesystem that holds the data directory.",
                self.disk_free_bytes.load(Ordering::Relaxed),
            ),
            (
                "kiln_worker_gpus",
                "gauge",
                "GPUs found through NVML.",
                self.gpus,
            ),
            (
                "kiln_worker_chunks_written_total",
                "counter",
                "Chunks newly stored in this worker's blob store.",
                self.chunks_written_total.load(Ordering::Relaxed),
            ),
            (
                "kiln_worker_chunk_bytes_received_total",
                "counter",
                "Chunk bytes received for storing, duplicates included.",
                self.chunk_bytes_written_total.load(Ordering::Relaxed),
            ),
            (
                "kiln_worker_chunks_read_total",
                "counter",
                "Chunks served from this worker's blob store.",
                self.chunks_read_total.load(Ordering::Relaxed),
            ),
            (
                "kiln_worker_chunk_bytes_read_total",
                "counter",
                "Chunk bytes served.",
                self.chunk_bytes_read_total.load(Ordering::Relaxed),
            ),
            (
                "kiln_worker_chunks_corrupt_total",
                "counter",
                "Stored chunks that failed their hash check when read.",
                self.chunks_corrupt_total.load(Ordering::Relaxed),
            ),
        ];
        let mut out = String::with_capacity(1024);
        for (name, kind, help, value) in samples {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::Gpu;

    fn sample(text: &str, name: &str) -> Option<u64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
    }

    #[test]
    fn every_metric_has_help_type_and_value() {
        let resources = Resources {
            cpu_cores: 8,
            memory_bytes: 16 << 30,
            disk_bytes: 100,
            disk_free_bytes: 40,
            gpus: vec![Gpu::default(), Gpu::default()],
            engines: vec!["tract".into()],
            memory_limits: String::new(),
            gpu_engines: Vec::new(),
        };
        let metrics = Metrics::new(&resources);
        metrics.heartbeat_sent();
        metrics.heartbeat_sent();
        metrics.heartbeat_sent();
        metrics.heartbeat_failed();
        metrics.set_disk_free_bytes(30);
        let text = metrics.render(true);
        let expected = [
            ("kiln_worker_registered", "gauge", 1),
            ("kiln_worker_heartbeats_total", "counter", 3),
            ("kiln_worker_heartbeat_failures_total", "counter", 1),
            ("kiln_worker_cpu_cores", "gauge", 8),
            ("kiln_worker_memory_bytes", "gauge", 16 << 30),
            ("kiln_worker_disk_bytes", "gauge", 100),
            ("kiln_worker_disk_free_bytes", "gauge", 30),
            ("kiln_worker_gpus", "gauge", 2),
        ];
        for (name, kind, value) in expected {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}: {text}"
            );
            assert_eq!(sample(&text, name), Some(value), "{name}: {text}");
        }
        assert_eq!(
            sample(&metrics.render(false), "kiln_worker_registered"),
            Some(0)
        );
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let text = Metrics::new(&Resources::default()).render(false);
        for line in text.lines() {
            let ok = line.starts_with("# HELP ")
                || line.starts_with("# TYPE ")
                || (line.split(' ').count() == 2
                    && sample(line, line.split(' ').next().unwrap_or("")).is_some());
            assert!(ok, "bad line {line:?}");
        }
        assert!(text.ends_with('\n'));
    }
}
