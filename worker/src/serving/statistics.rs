//! Triton's statistics and model repository extensions, as data: a replica's
//! [`EngineStats`] read as Triton's per-version statistics, their sums over the
//! replicas of the cluster, and the repository index of the routes. Pure; the
//! router gathers the counters (its own replicas', and the other workers' over
//! HTTP) and both protocols encode what this module returns.
//!
//! Triton's fields from kiln's counters:
//!
//! | Triton                         | kiln                                      |
//! |--------------------------------|-------------------------------------------|
//! | `inference_count`              | rows inferred                             |
//! | `execution_count`              | batches executed                          |
//! | `success` count / ns           | requests answered / their latency         |
//! | `fail` count (ns 0)            | requests answered with an error           |
//! | `queue` count / ns             | requests answered / time queued           |
//! | `compute_infer` count / ns     | requests answered / batch time per request|
//! | `compute_input`, `_output`     | 0: inside `compute_infer` in kiln         |
//! | `last_inference`               | the router's clock at the last success    |
//!
//! The counts are those of the replicas ready now, since each loaded: a replica
//! that leaves takes its counts with it.

use std::collections::{BTreeMap, HashSet};

use kiln_proto::inference as pb;
use kiln_proto::v1::Route;
use serde::{Deserialize, Serialize};

use super::engine::EngineStats;

/// The state of a version that replicas serve now.
pub const READY: &str = "READY";
/// The state of a deployment no replica serves yet.
pub const UNAVAILABLE: &str = "UNAVAILABLE";

/// How many times something happened and how long it took in all (Triton's
/// `StatisticDuration`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timed {
    pub count: u64,
    pub ns: u64,
}

impl Timed {
    fn add(&mut self, other: Timed) {
        self.count = self.count.saturating_add(other.count);
        self.ns = self.ns.saturating_add(other.ns);
    }

    fn to_proto(self) -> Option<pb::StatisticDuration> {
        Some(pb::StatisticDuration {
            count: self.count,
            ns: self.ns,
        })
    }
}

/// Triton's `inference_stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferStats {
    pub success: Timed,
    pub fail: Timed,
    pub queue: Timed,
    pub compute_input: Timed,
    pub compute_infer: Timed,
    pub compute_output: Timed,
}

/// One batch size's executions (Triton's `batch_stats` entry); kiln reports none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    pub batch_size: u64,
    pub compute_input: Timed,
    pub compute_infer: Timed,
    pub compute_output: Timed,
}

/// The statistics of one version of one model (deployment).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStats {
    pub name: String,
    pub version: String,
    /// Milliseconds since the epoch of the last successful inference; 0 for none.
    pub last_inference: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub inference_stats: InferStats,
    #[serde(default)]
    pub batch_stats: Vec<BatchStats>,
}

impl ModelStats {
    /// A version nothing has been counted for.
    pub fn empty(name: &str, version: u64) -> ModelStats {
        ModelStats {
            name: name.to_string(),
            version: version.to_string(),
            ..ModelStats::default()
        }
    }

    /// One replica's counters, read as Triton's statistics.
    pub fn of_replica(
        name: &str,
        version: u64,
        stats: &EngineStats,
        last_inference_ms: u64,
    ) -> ModelStats {
        let us = |us: u64| us.saturating_mul(1000);
        ModelStats {
            name: name.to_string(),
            version: version.to_string(),
            last_inference: last_inference_ms,
            inference_count: stats.rows,
            execution_count: stats.inferences,
            inference_stats: InferStats {
                success: Timed {
                    count: stats.requests,
                    ns: us(stats.latency_us),
                },
                fail: Timed {
                    count: stats.failures,
                    ns: 0,
                },
                queue: Timed {
                    count: stats.requests,
                    ns: us(stats.queue_us),
                },
                compute_input: Timed::default(),
                compute_infer: Timed {
                    count: stats.requests,
                    ns: us(stats.compute_us),
                },
                compute_output: Timed::default(),
            },
            batch_stats: Vec::new(),
        }
    }

    /// Adds another replica's statistics of the same version.
    pub fn add(&mut self, other: &ModelStats) {
        self.last_inference = self.last_inference.max(other.last_inference);
        self.inference_count = self.inference_count.saturating_add(other.inference_count);
        self.execution_count = self.execution_count.saturating_add(other.execution_count);
        let (mine, theirs) = (&mut self.inference_stats, &other.inference_stats);
        mine.success.add(theirs.success);
        mine.fail.add(theirs.fail);
        mine.queue.add(theirs.queue);
        mine.compute_input.add(theirs.compute_input);
        mine.compute_infer.add(theirs.compute_infer);
        mine.compute_output.add(theirs.compute_output);
    }

    /// The gRPC form.
    pub fn to_proto(&self) -> pb::ModelStatistics {
        let s = &self.inference_stats;
        pb::ModelStatistics {
            name: self.name.clone(),
            version: self.version.clone(),
            last_inference: self.last_inference,
            inference_count: self.inference_count,
            execution_count: self.execution_count,
            inference_stats: Some(pb::InferStatistics {
                success: s.success.to_proto(),
                fail: s.fail.to_proto(),
                queue: s.queue.to_proto(),
                compute_input: s.compute_input.to_proto(),
                compute_infer: s.compute_infer.to_proto(),
                compute_output: s.compute_output.to_proto(),
            }),
            batch_stats: Vec::new(),
        }
    }
}

/// A worker whose replicas' counts are missing from an answer, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unanswered {
    pub worker: String,
    pub error: String,
}

/// The body of `GET /v2/models[/{m}[/versions/{v}]]/stats`: Triton's
/// `model_stats`, and kiln's `unanswered_workers` when some worker did not
/// answer (left out when all did).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsAnswer {
    pub model_stats: Vec<ModelStats>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unanswered_workers: Vec<Unanswered>,
}

impl StatsAnswer {
    /// The gRPC form.
    pub fn to_proto(&self) -> pb::ModelStatisticsResponse {
        pb::ModelStatisticsResponse {
            model_stats: self.model_stats.iter().map(ModelStats::to_proto).collect(),
            unanswered_workers: self
                .unanswered_workers
                .iter()
                .map(|u| format!("{}: {}", u.worker, u.error))
                .collect(),
        }
    }
}

/// Sums statistics per model version, in name then version order.
#[derive(Debug, Default)]
pub struct StatsSum {
    by_version: BTreeMap<(String, u64, String), ModelStats>,
}

impl StatsSum {
    /// Adds one replica's (or one worker's) statistics of a version.
    pub fn add(&mut self, stats: &ModelStats) {
        // Versions are numbers; one that is not sorts last, by its text.
        let number = stats.version.parse::<u64>().unwrap_or(u64::MAX);
        let key = (stats.name.clone(), number, stats.version.clone());
        match self.by_version.get_mut(&key) {
            Some(sum) => sum.add(stats),
            None => {
                self.by_version.insert(key, stats.clone());
            }
        }
    }

    /// Lists `version` of `name` with zero counts unless something was counted.
    pub fn ensure(&mut self, name: &str, version: u64) {
        self.add(&ModelStats::empty(name, version));
    }

    /// The sums, in name then version order.
    pub fn into_stats(self) -> Vec<ModelStats> {
        self.by_version.into_values().collect()
    }
}

/// One entry of the repository index (Triton's `ModelIndex`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: String,
    pub reason: String,
}

impl IndexEntry {
    /// The gRPC form.
    pub fn to_proto(&self) -> pb::repository_index_response::ModelIndex {
        pb::repository_index_response::ModelIndex {
            name: self.name.clone(),
            version: self.version.clone(),
            state: self.state.clone(),
            reason: self.reason.clone(),
        }
    }
}

/// The repository index of `routes`: each version that replicas serve now,
/// READY, and each deployment that no replica serves yet, UNAVAILABLE with no
/// version; with `ready_only`, the READY entries alone. In name then version
/// order.
pub fn repository_index(routes: &[Route], ready_only: bool) -> Vec<IndexEntry> {
    let mut entries = Vec::new();
    let mut routes: Vec<&Route> = routes.iter().collect();
    routes.sort_by(|a, b| a.deployment.cmp(&b.deployment));
    for route in routes {
        let mut versions: Vec<u64> = route.endpoints.iter().map(|e| e.version).collect();
        versions.sort_unstable();
        versions.dedup();
        if versions.is_empty() && !ready_only {
            entries.push(IndexEntry {
                name: route.deployment.clone(),
                version: String::new(),
                state: UNAVAILABLE.to_string(),
                reason: "no replica is ready yet".to_string(),
            });
        }
        for version in versions {
            entries.push(IndexEntry {
                name: route.deployment.clone(),
                version: version.to_string(),
                state: READY.to_string(),
                reason: String::new(),
            });
        }
    }
    entries
}

/// Why the repository's load and unload calls are refused: kiln changes what
/// it serves through deployments.
pub fn repository_change_refusal(model: &str) -> String {
    format!(
        "kiln does not load or unload models through the model repository API: serve \
         {model:?} with `kiln deploy {model} --model MODEL@VERSION` and stop it with \
         `kiln deployments rm {model}`"
    )
}

/// The other workers that serve `routes`, each once: (worker id, inference HTTP
/// address), in id order, without `this_worker`.
pub fn peers<'a>(
    routes: impl IntoIterator<Item = &'a Route>,
    this_worker: &str,
) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    let mut peers: Vec<(String, String)> = routes
        .into_iter()
        .flat_map(|r| &r.endpoints)
        .filter(|e| e.worker_id != this_worker && seen.insert(e.worker_id.clone()))
        .map(|e| (e.worker_id.clone(), e.http_addr.clone()))
        .collect();
    peers.sort();
    peers
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::RouteEndpoint;

    fn engine_stats(requests: u64, rows: u64) -> EngineStats {
        EngineStats {
            requests,
            failures: 1,
            inferences: 2,
            rows,
            queue_us: 10,
            compute_us: 30,
            latency_us: 50,
            ..EngineStats::default()
        }
    }

    #[test]
    fn replicas_of_a_version_sum_and_keep_the_latest_inference() {
        let mut sum = StatsSum::default();
        sum.add(&ModelStats::of_replica("m", 2, &engine_stats(3, 7), 100));
        sum.add(&ModelStats::of_replica("m", 2, &engine_stats(4, 9), 50));
        sum.add(&ModelStats::of_replica("m", 10, &engine_stats(1, 1), 0));
        sum.ensure("m", 2);
        sum.ensure("a", 1);
        let stats = sum.into_stats();
        let names: Vec<(&str, &str)> = stats
            .iter()
            .map(|s| (s.name.as_str(), s.version.as_str()))
            .collect();
        // Numeric version order: 2 before 10.
        assert_eq!(names, [("a", "1"), ("m", "2"), ("m", "10")]);
        assert_eq!(stats[0], ModelStats::empty("a", 1));
        let m2 = &stats[1];
        assert_eq!(m2.last_inference, 100);
        assert_eq!(m2.inference_count, 16);
        assert_eq!(m2.execution_count, 4);
        let s = &m2.inference_stats;
        assert_eq!(
            s.success,
            Timed {
                count: 7,
                ns: 100_000
            }
        );
        assert_eq!(s.fail, Timed { count: 2, ns: 0 });
        assert_eq!(
            s.queue,
            Timed {
                count: 7,
                ns: 20_000
            }
        );
        assert_eq!(
            s.compute_infer,
            Timed {
                count: 7,
                ns: 60_000
            }
        );
        assert_eq!(s.compute_input, Timed::default());
    }

    #[test]
    fn the_json_is_tritons_shape_and_reads_back() {
        let answer = StatsAnswer {
            model_stats: vec![ModelStats::of_replica("m", 1, &engine_stats(3, 5), 9)],
            unanswered_workers: Vec::new(),
        };
        let json = serde_json::to_value(&answer).expect("json");
        let m = &json["model_stats"][0];
        assert_eq!(m["name"], "m");
        assert_eq!(m["version"], "1");
        assert_eq!(m["inference_count"], 5);
        assert_eq!(m["inference_stats"]["success"]["count"], 3);
        assert_eq!(m["inference_stats"]["compute_infer"]["ns"], 30_000);
        assert_eq!(m["batch_stats"], serde_json::json!([]));
        assert!(json.get("unanswered_workers").is_none(), "{json}");
        let back: StatsAnswer = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, answer);
        let proto = answer.to_proto();
        let stats = proto.model_stats[0].inference_stats.expect("stats");
        assert_eq!(stats.success.expect("success").count, 3);
    }

    fn route(name: &str, versions: &[u64], worker: &str) -> Route {
        Route {
            deployment: name.into(),
            endpoints: versions
                .iter()
                .enumerate()
                .map(|(i, &version)| RouteEndpoint {
                    replica_id: i as u64,
                    worker_id: worker.into(),
                    http_addr: format!("{worker}:8000"),
                    version,
                    ..RouteEndpoint::default()
                })
                .collect(),
            ..Route::default()
        }
    }

    #[test]
    fn the_index_lists_ready_versions_and_deployments_not_ready_yet() {
        let routes = [
            route("z", &[2, 1, 2], "w1"),
            route("a", &[], "w1"),
            route("m", &[3], "w2"),
        ];
        let index = repository_index(&routes, false);
        let seen: Vec<(&str, &str, &str)> = index
            .iter()
            .map(|e| (e.name.as_str(), e.version.as_str(), e.state.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", "", UNAVAILABLE),
                ("m", "3", READY),
                ("z", "1", READY),
                ("z", "2", READY)
            ]
        );
        assert!(index[0].reason.contains("no replica"));
        let ready = repository_index(&routes, true);
        assert!(ready.iter().all(|e| e.state == READY) && ready.len() == 3);
    }

    #[test]
    fn peers_are_the_other_workers_once_each() {
        let routes = [
            route("a", &[1, 1], "w2"),
            route("b", &[1], "w1"),
            route("c", &[1], "w3"),
        ];
        assert_eq!(
            peers(&routes, "w1"),
            [
                ("w2".to_string(), "w2:8000".to_string()),
                ("w3".to_string(), "w3:8000".to_string())
            ]
        );
    }
}
