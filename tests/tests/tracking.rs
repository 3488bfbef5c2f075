//! Experiment tracking through the MLflow-shaped REST API of a real 3-coordinator
//! cluster with TLS and tokens, the way a training program or MLflow's client
//! drives it.

use std::time::Duration;

use kiln_tests::mlflow::mlflow_call as call;
use kiln_tests::v1::Role;
use kiln_tests::{http_request, Cluster};

const API: &str = "/api/2.0/mlflow";
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_params_and_metrics_are_tracked_like_mlflow() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let writer = cluster.create_token("trainer", Role::Operator, 0).await;
    let reader = cluster.create_token("dashboard", Role::Viewer, 0).await;
    let http = cluster.http_addr(leader);
    let follower = cluster
        .coordinator_ids()
        .into_iter()
        .find(|id| *id != leader)
        .map(|id| cluster.http_addr(id))
        .expect("a follower");

    // Experiments: created once, found by name; "Default" (0) always exists.
    let (status, created) = call(
        &http,
        "POST",
        "experiments/create",
        &writer,
        Some(json!({"name": "iris"})),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let experiment_id = created["experiment_id"].as_str().expect("id").to_string();
    let (status, again) = call(
        &http,
        "POST",
        "experiments/create",
        &writer,
        Some(json!({"name": "iris"})),
    )
    .await;
    assert_eq!(
        (status, again["error_code"].as_str()),
        (400, Some("RESOURCE_ALREADY_EXISTS"))
    );
    let (status, found) = call(
        &follower,
        "GET",
        "experiments/get-by-name?experiment_name=iris",
        &reader,
        None,
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["experiment"]["experiment_id"], experiment_id.as_str());
    let (status, default) = call(
        &http,
        "GET",
        "experiments/get?experiment_id=0",
        &reader,
        None,
    )
    .await;
    assert_eq!(
        (status, default["experiment"]["name"].as_str()),
        (200, Some("Default"))
    );
    let (status, missing) = call(
        &http,
        "GET",
        "experiments/get-by-name?experiment_name=nope",
        &reader,
        None,
    )
    .await;
    assert_eq!(
        (status, missing["error_code"].as_str()),
        (404, Some("RESOURCE_DOES_NOT_EXIST"))
    );

    // A run, as mlflow.start_run() creates it (int64 as strings).
    let (status, run) = call(
        &http,
        "POST",
        "runs/create",
        &writer,
        Some(json!({
            "experiment_id": experiment_id,
            "run_name": "mlp-1",
            "start_time": "1700000000000",
            "tags": [{"key": "mlflow.source.name", "value": "train.py"}],
        })),
    )
    .await;
    assert_eq!(status, 200, "{run}");
    let run_id = run["run"]["info"]["run_id"]
        .as_str()
        .expect("run id")
        .to_string();
    assert_eq!(run["run"]["info"]["status"], "RUNNING");
    assert_eq!(run["run"]["info"]["user_id"], "token:trainer");

    // A batch of metrics, params and tags; sent twice, as a client retry would.
    let metrics: Vec<Value> = (0..5)
        .map(|step| json!({"key": "loss", "value": 1.0 / f64::from(step + 1), "timestamp": 1000 + step, "step": step}))
        .chain([json!({"key": "grad_norm", "value": "NaN", "timestamp": 1000, "step": 0})])
        .collect();
    let batch = json!({
        "run_id": run_id,
        "metrics": metrics,
        "params": [{"key": "lr", "value": "0.01"}, {"key": "hidden", "value": "64,32"}],
        "tags": [{"key": "stage", "value": "dev"}],
    });
    for _ in 0..2 {
        let (status, answer) = call(
            &http,
            "POST",
            "runs/log-batch",
            &writer,
            Some(batch.clone()),
        )
        .await;
        assert_eq!((status, answer), (200, json!({})));
    }
    let (status, history) = call(
        &follower,
        "GET",
        &format!("metrics/get-history?run_id={run_id}&metric_key=loss"),
        &reader,
        None,
    )
    .await;
    assert_eq!(status, 200, "{history}");
    let steps: Vec<i64> = history["metrics"]
        .as_array()
        .expect("points")
        .iter()
        .map(|m| m["step"].as_i64().expect("step"))
        .collect();
    assert_eq!(
        steps,
        vec![0, 1, 2, 3, 4],
        "a retried batch logs nothing twice"
    );

    // A param cannot change; a single metric and a tag can be logged on their own.
    let (status, refused) = call(
        &http,
        "POST",
        "runs/log-parameter",
        &writer,
        Some(json!({"run_id": run_id, "key": "lr", "value": "0.1"})),
    )
    .await;
    assert_eq!(
        (status, refused["error_code"].as_str()),
        (400, Some("INVALID_PARAMETER_VALUE")),
        "{refused}"
    );
    let (status, _) = call(
        &http,
        "POST",
        "runs/log-metric",
        &writer,
        Some(json!({"run_id": run_id, "key": "accuracy", "value": 0.93, "timestamp": "2000", "step": "4"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &http,
        "POST",
        "runs/update",
        &writer,
        Some(json!({"run_id": run_id, "status": "FINISHED", "end_time": 1700000009000u64})),
    )
    .await;
    assert_eq!(status, 200);

    let (status, got) = call(
        &follower,
        "GET",
        &format!("runs/get?run_id={run_id}"),
        &reader,
        None,
    )
    .await;
    assert_eq!(status, 200, "{got}");
    let run = &got["run"];
    assert_eq!(run["info"]["status"], "FINISHED");
    let metric = |key: &str| {
        run["data"]["metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .find(|m| m["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no metric {key} in {run}"))
    };
    assert_eq!(metric("loss")["value"], 0.2, "the latest step's value");
    assert_eq!(metric("grad_norm")["value"], "NaN");
    assert_eq!(metric("accuracy")["step"], 4);
    assert!(run["data"]["params"]
        .as_array()
        .expect("params")
        .contains(&json!({"key": "lr", "value": "0.01"})));

    let (status, found) = call(
        &http,
        "POST",
        "runs/search",
        &reader,
        Some(json!({"experiment_ids": [experiment_id]})),
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["runs"].as_array().map(Vec::len), Some(1));

    // Who may do what.
    let (status, denied) = call(
        &http,
        "POST",
        "experiments/create",
        &reader,
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(
        (status, denied["error_code"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    let (status, _) = http_request(
        &http,
        "GET",
        &format!("{API}/runs/get?run_id={run_id}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, unknown) = call(&http, "GET", "registered-models/list", &reader, None).await;
    assert_eq!(
        (status, unknown["error_code"].as_str()),
        (404, Some("ENDPOINT_NOT_FOUND"))
    );
    let (status, bad) = http_request(
        &http,
        "POST",
        &format!("{API}/runs/log-batch"),
        Some(&writer),
        Some("{not json"),
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    // The CLI reads the same runs.
    let ls = cluster
        .run_cli(&["runs", "ls", "--experiment", "iris", "--json"])
        .await;
    assert!(ls.status.success(), "{}", kiln_tests::stderr_text(&ls));
    let ls: Value = serde_json::from_slice(&ls.stdout).expect("runs ls --json");
    assert_eq!(ls[0]["run_id"], run_id.as_str());
    assert_eq!(ls[0]["experiment"], "iris");
    let compare = cluster
        .run_cli(&["runs", "compare", &run_id, "--json"])
        .await;
    assert!(
        compare.status.success(),
        "{}",
        kiln_tests::stderr_text(&compare)
    );
    let compare: Value = serde_json::from_slice(&compare.stdout).expect("runs compare --json");
    assert_eq!(compare[0]["history"]["loss"]["points"], 5, "{compare}");
    assert_eq!(compare[0]["history"]["loss"]["last"], 0.2);
    assert_eq!(compare[0]["params"]["lr"], "0.01");
    let missing = cluster.run_cli(&["runs", "show", &"0".repeat(32)]).await;
    assert!(!missing.status.success());
    assert!(kiln_tests::stderr_text(&missing).contains("does not exist"));
    let missing = cluster
        .run_cli(&["runs", "ls", "--experiment", "nope"])
        .await;
    assert!(kiln_tests::stderr_text(&missing).contains("no experiment is named 'nope'"));
    cluster.assert_healthy();
}
