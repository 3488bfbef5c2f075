//! A worker registers, is seen alive in `kiln status --json`, turns suspect and then
//! down on the configured clocks after a crash, and comes back under its own id.

use std::time::{Duration, Instant};

use kiln_proto::v1::{ClusterStatusRequest, WorkerState};
use kiln_tests::{stderr_text, wait_for, Cluster, POLL_INTERVAL};
use serde_json::Value;

const CONFIG: &str = "[health]\nsuspect_after_ms = 1000\ndown_after_ms = 2500\n";
/// Latest a crashed worker may turn suspect: `suspect_after_ms` plus a margin for
/// the last heartbeat's age and the health check's period.
const SUSPECT_BOUND: Duration = Duration::from_millis(1000 + 1500);
/// Latest a crashed worker may turn down: `down_after_ms` plus a margin.
const DOWN_BOUND: Duration = Duration::from_millis(2500 + 2000);
/// Time for a started worker to register and show up alive.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns `kiln status --json` parsed.
async fn status_json(cluster: &Cluster) -> Result<Value, String> {
    let output = cluster.run_cli(&["status", "--json"]).await;
    if !output.status.success() {
        return Err(format!(
            "kiln status --json failed: {}",
            stderr_text(&output)
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "kiln status --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Waits until `kiln status --json` lists a worker at `addr` as alive; returns the
/// whole status and that worker's entry.
async fn wait_alive(cluster: &Cluster, addr: &str) -> (Value, Value) {
    let what = format!("the worker at {addr} to be alive in kiln status --json");
    wait_for(REGISTER_TIMEOUT, &what, move || async move {
        let status = status_json(cluster).await?;
        let worker = status["workers"]
            .as_array()
            .and_then(|workers| workers.iter().find(|w| w["addr"] == addr))
            .cloned()
            .ok_or_else(|| format!("no worker at {addr} in {status}"))?;
        if worker["state"] == "alive" {
            Ok((status, worker))
        } else {
            Err(format!("worker state {}", worker["state"]))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_worker_turns_suspect_then_down_and_returns_under_its_id() {
    let mut cluster = Cluster::start(3, CONFIG);
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.start_worker("w1");
    let addr = cluster.worker_addr("w1");
    let (status, worker) = wait_alive(&cluster, &addr).await;

    // The cluster part of the status.
    assert!(
        status["term"].as_u64().is_some_and(|t| t > 0),
        "term in {status}"
    );
    let coordinators = status["coordinators"]
        .as_array()
        .expect("a coordinators array");
    assert_eq!(coordinators.len(), 3, "three coordinators in {status}");
    for c in coordinators {
        for field in ["id", "addr", "http_addr", "role", "healthy"] {
            assert!(!c[field].is_null(), "coordinator field {field} in {c}");
        }
    }
    let leader_id = status["leader_id"].as_u64().expect("a numeric leader_id");
    assert!(
        coordinators
            .iter()
            .any(|c| c["id"] == leader_id && c["role"] == "leader"),
        "leader_id {leader_id} is listed with role leader in {status}"
    );

    // The worker part.
    let id = worker["id"]
        .as_str()
        .expect("a worker id string")
        .to_string();
    assert!(!id.is_empty(), "empty worker id in {worker}");
    assert_eq!(
        cluster.worker_id("w1").as_deref(),
        Some(id.as_str()),
        "the id kept in worker-id"
    );
    let grpc = cluster.worker_flag("w1", "--inference-grpc");
    let http = cluster.worker_flag("w1", "--http");
    let port = |addr: &str| addr.rsplit(':').next().map(str::to_string);
    assert_eq!(
        worker["inference_grpc_addr"].as_str().and_then(port),
        port(&grpc),
        "inference_grpc_addr in {worker}"
    );
    assert_eq!(
        worker["inference_http_addr"].as_str().and_then(port),
        port(&http),
        "inference_http_addr in {worker}"
    );
    assert!(
        worker["resources"]["cpu_cores"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "resources.cpu_cores in {worker}"
    );

    // Crash it and watch the state on the clocks of the config.
    cluster.kill_worker("w1");
    let killed_at = Instant::now();
    let client = cluster.cluster_client();
    let mut suspect_after = None;
    let mut down_after = None;
    let mut seen = Vec::new();
    while down_after.is_none() && killed_at.elapsed() <= DOWN_BOUND + Duration::from_secs(2) {
        let response = client
            .call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await })
            .await
            .expect("read the cluster status");
        let state = response
            .into_inner()
            .workers
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.state)
            .expect("the crashed worker stays listed");
        let elapsed = killed_at.elapsed();
        if seen.last() != Some(&state) {
            seen.push(state);
        }
        if state == WorkerState::Suspect as i32 && suspect_after.is_none() {
            suspect_after = Some(elapsed);
        }
        if state == WorkerState::Down as i32 {
            down_after = Some(elapsed);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let suspect_after =
        suspect_after.unwrap_or_else(|| panic!("never saw suspect; states seen {seen:?}"));
    let down_after = down_after.unwrap_or_else(|| panic!("never saw down; states seen {seen:?}"));
    eprintln!("after the crash: suspect at {suspect_after:?}, down at {down_after:?}");
    assert!(
        suspect_after <= SUSPECT_BOUND,
        "suspect after {suspect_after:?} (bound {SUSPECT_BOUND:?})"
    );
    assert!(
        down_after <= DOWN_BOUND,
        "down after {down_after:?} (bound {DOWN_BOUND:?})"
    );
    assert!(
        suspect_after < down_after,
        "suspect before down; states seen {seen:?}"
    );
    let status = status_json(&cluster)
        .await
        .expect("kiln status --json after the crash");
    let listed = status["workers"]
        .as_array()
        .and_then(|workers| workers.iter().find(|w| w["id"] == id.as_str()))
        .cloned()
        .expect("the crashed worker in kiln status --json");
    assert_eq!(
        listed["state"], "down",
        "the crashed worker as kiln status shows it"
    );

    // Back with the same data dir: alive, under the same id, listed once.
    cluster.restart_worker("w1");
    let (status, worker) = wait_alive(&cluster, &addr).await;
    assert_eq!(
        worker["id"].as_str(),
        Some(id.as_str()),
        "the restarted worker's id"
    );
    assert_eq!(
        cluster.worker_id("w1").as_deref(),
        Some(id.as_str()),
        "the id kept in worker-id"
    );
    let workers = status["workers"].as_array().expect("a workers array");
    assert_eq!(
        workers.len(),
        1,
        "the restarted worker is listed once: {status}"
    );
    cluster.assert_healthy();
}
