//! MLflow's registry, lifecycle and dataset calls over REST against a real
//! 3-coordinator cluster with TLS (no Python needed): a version whose files hold
//! no ONNX model is kept and listed, and `kiln deploy` refuses it with the reason;
//! an empty registered model too; rename and delete; deleted experiments and runs
//! leave active searches and come back on restore; a dataset input named like a
//! kiln artifact records its version; each error code MLflow's client branches on.

use std::time::Duration;

use kiln_tests::mlflow::mlflow_call as call;
use kiln_tests::v1::Role;
use kiln_tests::{http_request, stderr_text, Cluster};
use serde_json::{json, Value};

/// Calls and asserts a 200; returns the answer.
async fn ok(addr: &str, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
    let (status, answer) = call(addr, method, path, token, body).await;
    assert_eq!(status, 200, "{method} {path}: {answer}");
    answer
}

/// Calls and asserts MLflow's error code and HTTP status.
async fn fails(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
    want: (u16, &str),
) {
    let (status, answer) = call(addr, method, path, token, body).await;
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (want.0, Some(want.1)),
        "{method} {path}: {answer}"
    );
}

/// Uploads a file into a run's artifacts through the proxy.
async fn put_artifact(addr: &str, token: &str, path: &str, bytes: &[u8]) {
    let answer = kiln_tests::http_call(
        addr,
        "PUT",
        &format!("/api/2.0/mlflow-artifacts/artifacts/{path}"),
        &[("Authorization", &format!("Bearer {token}"))],
        bytes,
    )
    .await
    .expect("PUT an artifact");
    assert_eq!(
        answer.status,
        200,
        "PUT {path}: {}",
        String::from_utf8_lossy(&answer.body)
    );
}

async fn names(addr: &str, token: &str, path: &str, body: Value, field: &str) -> Vec<String> {
    let answer = ok(addr, "POST", path, token, Some(body)).await;
    answer[field]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            e["name"]
                .as_str()
                .or_else(|| e["info"]["run_name"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

async fn deploy_refused(cluster: &Cluster, model: &str) -> String {
    let out = cluster
        .run_cli(&["deploy", "refused-svc", "--model", model, "--replicas", "1"])
        .await;
    assert!(!out.status.success(), "kiln deploy {model} was accepted");
    stderr_text(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mlflow_registry_lifecycle_and_datasets_over_one_registry() {
    let mut cluster = Cluster::start_with_workers("", &["a", "b"], &[]).await;
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let token = cluster.create_token("mlflow-rest", Role::Operator, 0).await;
    let http = cluster.http_addr(leader);
    let t = token.as_str();

    // A kiln dataset, then a run that reads it under the same name.
    let data = tempfile::tempdir().expect("tempdir");
    let csv = data.path().join("iris.csv");
    std::fs::write(&csv, "a,b,label\n1,2,0\n3,4,1\n").expect("write csv");
    let pushed = cluster
        .run_cli(&[
            "artifact",
            "push",
            csv.to_str().expect("utf-8"),
            "--name",
            "iris",
        ])
        .await;
    assert!(pushed.status.success(), "push: {}", stderr_text(&pushed));
    let exp = ok(
        &http,
        "POST",
        "experiments/create",
        t,
        Some(json!({"name": "reg"})),
    )
    .await;
    let exp = exp["experiment_id"].as_str().expect("id").to_string();
    let run = ok(
        &http,
        "POST",
        "runs/create",
        t,
        Some(json!({"experiment_id": exp, "run_name": "sk"})),
    )
    .await;
    let run_id = run["run"]["info"]["run_id"]
        .as_str()
        .expect("run id")
        .to_string();
    let inputs = json!({"run_id": run_id, "datasets": [
        {"dataset": {"name": "iris", "digest": "d1", "source_type": "local", "source": "{}"},
         "tags": [{"key": "mlflow.data.context", "value": "training"}]},
        {"dataset": {"name": "not-in-kiln", "digest": "d2", "source_type": "local", "source": "{}"}},
    ]});
    ok(&http, "POST", "runs/log-inputs", t, Some(inputs.clone())).await;
    ok(&http, "POST", "runs/log-inputs", t, Some(inputs)).await; // a retry changes nothing
    let got = ok(&http, "GET", &format!("runs/get?run_id={run_id}"), t, None).await;
    let datasets = got["run"]["inputs"]["dataset_inputs"]
        .as_array()
        .expect("inputs")
        .clone();
    assert_eq!(datasets.len(), 2, "{datasets:?}");
    let lineage: Vec<&str> = datasets[0]["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .filter(|t| t["key"] == "kiln.artifact")
        .filter_map(|t| t["value"].as_str())
        .collect();
    assert_eq!(lineage, vec!["iris@1"], "{datasets:?}");
    let by_context = names(
        &http,
        t,
        "runs/search",
        json!({"experiment_ids": [exp], "filter": "datasets.context = 'training'"}),
        "runs",
    )
    .await;
    assert_eq!(by_context, vec!["sk"]);

    // A scikit-learn model logged as files: kept, listed, not deployable.
    put_artifact(
        &http,
        t,
        &format!("{exp}/{run_id}/artifacts/model/MLmodel"),
        b"flavors:\n  sklearn: {}\n",
    )
    .await;
    put_artifact(
        &http,
        t,
        &format!("{exp}/{run_id}/artifacts/model/model.pkl"),
        b"\x80\x04pickled",
    )
    .await;
    ok(
        &http,
        "POST",
        "registered-models/create",
        t,
        Some(json!({"name": "sk", "description": "a pickle"})),
    )
    .await;
    fails(
        &http,
        "POST",
        "registered-models/create",
        t,
        Some(json!({"name": "sk"})),
        (400, "RESOURCE_ALREADY_EXISTS"),
    )
    .await;
    let version = ok(
        &http,
        "POST",
        "model-versions/create",
        t,
        Some(json!({
            "name": "sk",
            "source": format!("mlflow-artifacts:/{exp}/{run_id}/artifacts/model"),
            "run_id": run_id,
        })),
    )
    .await;
    let v = &version["model_version"];
    assert_eq!(
        (v["version"].as_str(), v["status"].as_str()),
        (Some("1"), Some("READY")),
        "{v}"
    );
    assert!(
        v["status_message"]
            .as_str()
            .unwrap_or_default()
            .contains("no model.onnx"),
        "{v}"
    );
    let listed = cluster.run_cli(&["models", "ls", "--json"]).await;
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("models ls --json");
    let sk = listed
        .as_array()
        .expect("a list")
        .iter()
        .find(|m| m["name"] == "sk")
        .unwrap_or_else(|| panic!("kiln models ls lacks sk: {listed}"));
    assert_eq!(
        (sk["run_id"].as_str(), sk["deployable"].as_bool()),
        (Some(run_id.as_str()), Some(false)),
        "{sk}"
    );
    assert_eq!(
        sk["dataset"], "iris@1",
        "the run's kiln dataset is the version's lineage"
    );
    let refused = deploy_refused(&cluster, "sk@1").await;
    assert!(
        refused.contains("cannot be deployed") && refused.contains("no model.onnx"),
        "{refused}"
    );
    // Its files were frozen: the version reads back after the run's are deleted.
    let (status, text) = http_request(
        &http,
        "DELETE",
        &format!("/api/2.0/mlflow-artifacts/artifacts/{exp}/{run_id}/artifacts/model"),
        Some(t),
        None,
    )
    .await;
    assert_eq!(status, 200, "delete the run's model folder: {text}");
    let frozen = kiln_tests::http_call(
        &http,
        "GET",
        "/api/2.0/mlflow-artifacts/artifacts/registry/sk/1/model.pkl",
        &[("Authorization", &format!("Bearer {t}"))],
        b"",
    )
    .await
    .expect("GET a registered file");
    assert_eq!(
        (frozen.status, frozen.body.as_slice()),
        (200, &b"\x80\x04pickled"[..])
    );
    let uri = ok(
        &http,
        "GET",
        "model-versions/get-download-uri?name=sk&version=1",
        t,
        None,
    )
    .await;
    assert_eq!(uri["artifact_uri"], "mlflow-artifacts:/registry/sk/1");

    // An empty registered model is kept; deploying it says it has no versions.
    ok(
        &http,
        "POST",
        "registered-models/create",
        t,
        Some(json!({"name": "empty"})),
    )
    .await;
    let refused = deploy_refused(&cluster, "empty").await;
    assert!(refused.contains("has no versions"), "{refused}");
    let found = ok(
        &http,
        "GET",
        "registered-models/search?filter=name+LIKE+%27%25mp%25%27",
        t,
        None,
    )
    .await;
    let found: Vec<&str> = found["registered_models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(found, vec!["empty"]);

    // Rename, aliases, delete.
    ok(
        &http,
        "POST",
        "registered-models/alias",
        t,
        Some(json!({"name": "sk", "alias": "prod", "version": "1"})),
    )
    .await;
    ok(
        &http,
        "POST",
        "registered-models/rename",
        t,
        Some(json!({"name": "sk", "new_name": "sk2"})),
    )
    .await;
    let aliased = ok(
        &http,
        "GET",
        "registered-models/alias?name=sk2&alias=prod",
        t,
        None,
    )
    .await;
    assert_eq!(aliased["model_version"]["version"], "1");
    fails(
        &http,
        "GET",
        "registered-models/get?name=sk",
        t,
        None,
        (404, "RESOURCE_DOES_NOT_EXIST"),
    )
    .await;
    fails(
        &http,
        "GET",
        "model-versions/get?name=sk2&version=9",
        t,
        None,
        (404, "RESOURCE_DOES_NOT_EXIST"),
    )
    .await;
    fails(
        &http,
        "POST",
        "registered-models/create",
        t,
        Some(json!({"name": "bad name"})),
        (400, "INVALID_PARAMETER_VALUE"),
    )
    .await;
    ok(
        &http,
        "DELETE",
        "registered-models/delete",
        t,
        Some(json!({"name": "sk2"})),
    )
    .await;
    fails(
        &http,
        "GET",
        "registered-models/get?name=sk2",
        t,
        None,
        (404, "RESOURCE_DOES_NOT_EXIST"),
    )
    .await;

    // Experiments and runs: delete hides them from active searches; restore.
    let either = json!({"filter": "name = 'reg' or name = 'x'"});
    fails(
        &http,
        "POST",
        "experiments/search",
        t,
        Some(either),
        (400, "INVALID_PARAMETER_VALUE"),
    )
    .await;
    let search_exps = |view: &'static str| {
        names(
            &http,
            t,
            "experiments/search",
            json!({"view_type": view, "filter": "name LIKE 're%'"}),
            "experiments",
        )
    };
    ok(
        &http,
        "POST",
        "experiments/update",
        t,
        Some(json!({"experiment_id": exp, "new_name": "registry"})),
    )
    .await;
    assert_eq!(search_exps("ACTIVE_ONLY").await, vec!["registry"]);
    ok(
        &http,
        "POST",
        "experiments/delete",
        t,
        Some(json!({"experiment_id": exp})),
    )
    .await;
    assert!(search_exps("ACTIVE_ONLY").await.is_empty());
    assert_eq!(search_exps("DELETED_ONLY").await, vec!["registry"]);
    ok(
        &http,
        "POST",
        "experiments/restore",
        t,
        Some(json!({"experiment_id": exp})),
    )
    .await;
    assert_eq!(search_exps("ALL").await, vec!["registry"]);

    ok(
        &http,
        "POST",
        "runs/delete",
        t,
        Some(json!({"run_id": run_id})),
    )
    .await;
    assert!(names(
        &http,
        t,
        "runs/search",
        json!({"experiment_ids": [exp]}),
        "runs"
    )
    .await
    .is_empty());
    fails(
        &http,
        "POST",
        "runs/log-metric",
        t,
        Some(json!({"run_id": run_id, "key": "x", "value": 1, "timestamp": 1, "step": 0})),
        (400, "INVALID_PARAMETER_VALUE"),
    )
    .await;
    ok(
        &http,
        "POST",
        "runs/restore",
        t,
        Some(json!({"run_id": run_id})),
    )
    .await;
    assert_eq!(
        names(
            &http,
            t,
            "runs/search",
            json!({"experiment_ids": [exp]}),
            "runs"
        )
        .await,
        vec!["sk"]
    );
    cluster.assert_healthy();
}
