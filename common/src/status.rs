//! The JSON shape of cluster status, shared by `kiln status --json` and the
//! coordinator's `GET /api/v1/status`. Field names are a contract (DESIGN §6).

use kiln_proto::v1::{ClusterStatusResponse, JobState, Resources, WorkerRecord, WorkerState};
use serde_json::{json, Value};

/// Returns the lowercase name of a worker state.
pub fn worker_state_name(state: i32) -> &'static str {
    match WorkerState::try_from(state) {
        Ok(WorkerState::Alive) => "alive",
        Ok(WorkerState::Suspect) => "suspect",
        Ok(WorkerState::Down) => "down",
        _ => "unknown",
    }
}

/// Returns the name of a job state, as `kiln jobs` shows it.
pub fn job_state_name(state: i32) -> &'static str {
    match JobState::try_from(state) {
        Ok(JobState::Pending) => "Pending",
        Ok(JobState::Running) => "Running",
        Ok(JobState::Succeeded) => "Succeeded",
        Ok(JobState::Failed) => "Failed",
        Ok(JobState::Cancelled) => "Cancelled",
        _ => "Unknown",
    }
}

fn resources_json(r: Option<&Resources>) -> Value {
    let r = r.cloned().unwrap_or_default();
    json!({
        "cpu_cores": r.cpu_cores,
        "memory_bytes": r.memory_bytes,
        "disk_bytes": r.disk_bytes,
        "disk_free_bytes": r.disk_free_bytes,
        "gpus": r.gpus.iter().map(|g| json!({
            "index": g.index,
            "name": g.name,
            "uuid": g.uuid,
            "memory_bytes": g.memory_bytes,
        })).collect::<Vec<_>>(),
        "engines": r.engines,
        "memory_limits": r.memory_limits,
    })
}

fn worker_json(w: &WorkerRecord) -> Value {
    json!({
        "id": w.id,
        "addr": w.addr,
        "http_addr": w.http_addr,
        "inference_http_addr": w.inference_http_addr,
        "inference_grpc_addr": w.inference_grpc_addr,
        "state": worker_state_name(w.state),
        "state_since_ms": w.state_since_ms,
        "registered_at_ms": w.registered_at_ms,
        "incarnation": w.incarnation,
        "version": w.version,
        "resources": resources_json(w.resources.as_ref()),
    })
}

/// Returns the status JSON document.
pub fn cluster_status_json(s: &ClusterStatusResponse) -> Value {
    json!({
        "leader_id": s.leader_id,
        "term": s.term,
        "commit_index": s.commit_index,
        "coordinators": s.coordinators.iter().map(|c| json!({
            "id": c.id,
            "addr": c.addr,
            "http_addr": c.http_addr,
            "role": c.role,
            "healthy": c.healthy,
            "matched_index": c.matched_index,
            "applied_index": c.applied_index,
        })).collect::<Vec<_>>(),
        "workers": s.workers.iter().map(worker_json).collect::<Vec<_>>(),
        "hosts": s.hosts.iter().map(|h| {
            let host = h.host.clone().unwrap_or_default();
            json!({
                "worker_id": h.worker_id,
                "reported_at_ms": h.reported_at_ms,
                "cpu_percent": host.cpu_percent,
                "memory_used_bytes": host.memory_used_bytes,
                "memory_total_bytes": host.memory_total_bytes,
                "disk_free_bytes": host.disk_free_bytes,
                "disk_total_bytes": host.disk_total_bytes,
                "gpus": host.gpus.iter().map(|g| json!({
                    "index": g.index,
                    "name": g.name,
                    "utilization_percent": g.utilization_percent,
                    "memory_used_bytes": g.memory_used_bytes,
                    "memory_total_bytes": g.memory_total_bytes,
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "deployments": s.deployments.iter().map(|d| json!({
            "name": d.name,
            "model": d.model,
            "canary": (!d.canary.is_empty()).then_some(&d.canary),
            "wanted": d.wanted,
            "ready": d.ready,
            "starting": d.starting,
            "failed": d.failed,
        })).collect::<Vec<_>>(),
        "jobs": s.jobs.iter().map(|j| json!({
            "id": j.id,
            "name": j.name,
            "state": j.state,
            "reason": j.reason,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::CoordinatorStatus;

    #[test]
    fn status_json_has_the_contract_fields() {
        let s = ClusterStatusResponse {
            leader_id: 2,
            term: 7,
            commit_index: 10,
            coordinators: vec![CoordinatorStatus {
                id: 2,
                addr: "a:1".into(),
                http_addr: "a:2".into(),
                role: "leader".into(),
                healthy: true,
                ..Default::default()
            }],
            workers: vec![WorkerRecord {
                id: "w".into(),
                state: WorkerState::Suspect as i32,
                ..Default::default()
            }],
            deployments: vec![kiln_proto::v1::DeploymentHealth {
                name: "iris".into(),
                model: "iris@2".into(),
                wanted: 2,
                ready: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = cluster_status_json(&s);
        assert_eq!(v["leader_id"], 2);
        assert_eq!(v["term"], 7);
        for key in ["id", "addr", "http_addr", "role", "healthy"] {
            assert!(v["coordinators"][0].get(key).is_some(), "coordinator.{key}");
        }
        for key in [
            "id",
            "addr",
            "inference_http_addr",
            "inference_grpc_addr",
            "state",
            "resources",
        ] {
            assert!(v["workers"][0].get(key).is_some(), "worker.{key}");
        }
        assert_eq!(v["workers"][0]["state"], "suspect");
        assert_eq!(v["deployments"][0]["ready"], 1);
        assert!(v["deployments"][0]["canary"].is_null());
        assert_eq!(v["hosts"], serde_json::json!([]));
        assert_eq!(v["jobs"], serde_json::json!([]));
    }
}
