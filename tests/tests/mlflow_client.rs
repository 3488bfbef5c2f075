//! The real `mlflow` Python client (3.x from PyPI), unchanged, against a follower
//! coordinator of a 3-coordinator cluster with TLS and tokens: MLflow's quickstart
//! (scripts/mlflow_client_check.py asserts every answer the client gets), then
//! kiln's side of what it logged: `kiln runs show`, `kiln artifact pull` of the
//! run's and the logged model's files, `kiln models ls | show`, and the registered
//! model deployed through its MLflow alias and answering KServe v2 on a worker.
//!
//! The client lives in the venv that scripts/env.sh's `kiln_mlflow_python` installs
//! once from PyPI; where it cannot, the test says SKIPPED, unless
//! `EXPECT_MLFLOW_CLIENT=1` (scripts/test.sh sets it when the venv installed).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kiln_tests::mlflow::{client_command, mlflow_python, run_bounded};
use kiln_tests::v1::Role;
use kiln_tests::{http_call, stderr_text, Cluster};
use serde_json::{json, Value};

/// Longest the quickstart script may run (about 30 s against `mlflow server`).
const CLIENT_CHECK_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest the workers take to learn the deployment's route.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

const MODEL: &str = "quickstart-mlp";
const DEPLOYMENT: &str = "quickstart-mlp-svc";

/// Runs a CLI command that must succeed; returns its stdout parsed as JSON.
async fn cli_json(cluster: &Cluster, args: &[&str]) -> Value {
    let out = cluster.run_cli(args).await;
    assert!(
        out.status.success(),
        "kiln {}: {}",
        args.join(" "),
        stderr_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kiln {} printed no JSON ({e}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Asserts that every file `names` under `got` has the bytes of the one under
/// `want`.
fn assert_same_files(want: &Path, got: &Path, names: &[String], what: &str) {
    for name in names {
        let (a, b) = (read(&want.join(name)), read(&got.join(name)));
        assert!(
            a == b,
            "{what}: {name} has {} bytes, the mlflow client logged {} other bytes",
            b.len(),
            a.len()
        );
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("not text: {v}"))
                .to_string()
        })
        .collect()
}

/// POSTs `body` to `path` on `addr` until a deployment answers 200 (its route
/// reaches the worker at its next heartbeat); returns the answer's JSON.
async fn first_answer(addr: &str, path: &str, auth: &str, body: &[u8]) -> Value {
    let answer = kiln_tests::wait_for(READY_TIMEOUT, "an answer from the deployment", || async {
        let answer = http_call(addr, "POST", path, &[("Authorization", auth)], body)
            .await
            .map_err(|e| e.to_string())?;
        if answer.status != 200 {
            return Err(format!("{addr}{path}: {} {}", answer.status, answer.text()));
        }
        Ok(answer)
    })
    .await;
    serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mlflow_client_works_unchanged_against_a_cluster() {
    let Some(python) = mlflow_python().await else {
        return;
    };
    let workers = ["a", "b"];
    // ONNX Runtime, where scripts/test.sh installed it, serves the model
    // mlflow.onnx saved with external data.
    let onnxruntime = std::env::var("KILN_ONNXRUNTIME_LIB").ok();
    let worker_args: Vec<&str> = match &onnxruntime {
        Some(lib) => vec!["--onnxruntime-lib", lib],
        None => Vec::new(),
    };
    let mut cluster = Cluster::start_with_workers("", &workers, &worker_args).await;
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let token = cluster
        .create_token("mlflow-quickstart", Role::Operator, 0)
        .await;
    let follower = cluster
        .coordinator_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let http = cluster.http_addr(follower);

    // MLflow's quickstart through the unchanged client, every answer asserted.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path();
    let mut command = client_command(&python, "mlflow_client_check.py", &cluster, &http, &token);
    command.current_dir(out).env("KILN_CHECK_OUT", out);
    let check = run_bounded(command, CLIENT_CHECK_TIMEOUT, "mlflow_client_check.py").await;
    assert!(
        check.status.success(),
        "the mlflow client against coordinator {follower} (a follower) failed ({}):\n\
         ----- stdout\n{}\n----- stderr\n{}",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        stderr_text(&check)
    );
    let report: Value =
        serde_json::from_slice(&read(&out.join("report.json"))).expect("report.json is JSON");
    let run_id = report["run_id"].as_str().expect("run_id").to_string();
    let model_id = report["logged_model_id"]
        .as_str()
        .expect("logged_model_id")
        .to_string();
    let version = report["model_version"].as_u64().expect("model_version");
    let files = strings(&report["files"]);
    let model_files = strings(&report["model_files"]);
    let originals = out.join("originals");
    let model_originals = out.join("model");

    // `kiln runs show`: the run as logged, its files and its logged model.
    let shown = cli_json(&cluster, &["runs", "show", &run_id, "--json"]).await;
    assert_eq!(shown["run_id"], run_id.as_str(), "{shown}");
    assert_eq!(shown["experiment"], "quickstart", "{shown}");
    assert_eq!(shown["status"], "FINISHED", "{shown}");
    assert_eq!(
        shown["params"],
        json!({"lr": "0.01", "layers": "2"}),
        "{shown}"
    );
    assert_eq!(shown["metrics"]["loss"]["step"], 9, "{shown}");
    assert_eq!(shown["artifacts"]["name"], format!("mlflow-run-{run_id}"));
    let listed: BTreeMap<String, u64> = shown["artifacts"]["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no artifacts.files in {shown}"))
        .iter()
        .map(|f| {
            (
                f["path"].as_str().expect("path").to_string(),
                f["size"].as_u64().expect("size"),
            )
        })
        .collect();
    for path in &files {
        let size = read(&originals.join(path)).len() as u64;
        assert_eq!(
            listed.get(path),
            Some(&size),
            "kiln runs show lists {path} with its size: {listed:?}"
        );
    }
    let models = shown["models"].as_array().expect("models");
    let logged = models
        .iter()
        .find(|m| m["model_id"] == model_id.as_str())
        .unwrap_or_else(|| panic!("kiln runs show lists no logged model {model_id}: {shown}"));
    assert_eq!(logged["name"], "model", "{logged}");
    assert_eq!(logged["status"], "LOGGED_MODEL_READY", "{logged}");
    assert_eq!(logged["artifact"], format!("mlflow-model-{model_id}"));
    assert_eq!(logged["files"], model_files.len(), "{logged}");
    let model_bytes: u64 = model_files
        .iter()
        .map(|f| read(&model_originals.join(f)).len() as u64)
        .sum();
    assert_eq!(logged["bytes"], model_bytes, "{logged}");

    // `kiln artifact pull`: the same bytes the client logged, run and model.
    let pulled = out.join("pulled-run");
    let run_artifact = format!("mlflow-run-{run_id}");
    let pulled_arg = pulled.display().to_string();
    cli_json(
        &cluster,
        &[
            "artifact",
            "pull",
            &run_artifact,
            "-o",
            &pulled_arg,
            "--json",
        ],
    )
    .await;
    assert_same_files(&originals, &pulled, &files, &run_artifact);
    let pulled = out.join("pulled-model");
    let model_artifact = format!("mlflow-model-{model_id}");
    let pulled_arg = pulled.display().to_string();
    cli_json(
        &cluster,
        &[
            "artifact",
            "pull",
            &model_artifact,
            "-o",
            &pulled_arg,
            "--json",
        ],
    )
    .await;
    assert_same_files(&model_originals, &pulled, &model_files, &model_artifact);

    // `kiln models ls | show`: the registered version, its run and its alias.
    let registered = cli_json(&cluster, &["models", "ls", "--json"]).await;
    let entry = registered
        .as_array()
        .expect("models ls --json prints a list")
        .iter()
        .find(|m| m["name"] == MODEL)
        .unwrap_or_else(|| panic!("kiln models ls has no {MODEL}: {registered}"));
    assert_eq!(entry["version"], version, "{entry}");
    assert_eq!(
        entry["run_id"],
        run_id.as_str(),
        "the version's lineage: {entry}"
    );
    let shown = cli_json(&cluster, &["models", "show", MODEL, "--json"]).await;
    assert_eq!(shown["aliases"]["champion"], version, "{shown}");
    assert_eq!(entry["deployable"], true, "{entry}");

    // A scikit-learn pipeline: kept and listed, and `kiln deploy` refuses it,
    // saying why.
    let unservable = report["unservable_models"]
        .as_object()
        .expect("report.json lists the models kiln cannot serve");
    assert_eq!(unservable.len(), 1, "{unservable:?}");
    for (name, why) in unservable {
        let why = why.as_str().expect("a reason");
        let listed = registered
            .as_array()
            .expect("a list")
            .iter()
            .find(|m| m["name"] == name.as_str())
            .unwrap_or_else(|| panic!("kiln models ls has no {name}: {registered}"));
        assert_eq!(listed["deployable"], false, "{listed}");
        assert!(
            listed["undeployable"]
                .as_str()
                .unwrap_or_default()
                .contains(why),
            "{name}: {listed}"
        );
        let refused = cluster
            .run_cli(&[
                "deploy",
                "refused",
                "--model",
                &format!("{name}@1"),
                "--replicas",
                "1",
            ])
            .await;
        let said = stderr_text(&refused);
        assert!(
            !refused.status.success() && said.contains("cannot be deployed") && said.contains(why),
            "kiln deploy {name}@1: {said}"
        );
    }

    // Deployed through its MLflow alias; KServe v2 on every worker answers X·W + B.
    let model_ref = format!("{MODEL}@champion");
    let out_deploy = cluster
        .run_cli(&[
            "deploy",
            DEPLOYMENT,
            "--model",
            &model_ref,
            "--replicas",
            "1",
            "--wait",
        ])
        .await;
    assert!(
        out_deploy.status.success(),
        "kiln deploy {DEPLOYMENT} --model {model_ref}: {}",
        stderr_text(&out_deploy)
    );
    let infer = &report["infer"];
    let body = serde_json::to_vec(&json!({
        "inputs": [{
            "name": infer["input"],
            "shape": infer["x_shape"],
            "datatype": "FP32",
            "data": infer["x"],
        }]
    }))
    .expect("json");
    let want: Vec<f64> = infer["y"]
        .as_array()
        .expect("y")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    let auth = format!("Bearer {token}");
    let path = format!("/v2/models/{DEPLOYMENT}/infer");
    for worker in workers {
        let addr = cluster.worker_flag(worker, "--http");
        let doc = first_answer(&addr, &path, &auth, &body).await;
        let output = &doc["outputs"][0];
        assert_eq!(output["name"], infer["output"], "{doc}");
        assert_eq!(output["datatype"], "FP32", "{doc}");
        assert_eq!(output["shape"], infer["y_shape"], "{doc}");
        let got: Vec<f64> = output["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no output data in {doc}"))
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        assert_eq!(got.len(), want.len(), "{doc}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5,
                "worker {worker}: {got:?} against {want:?}"
            );
        }
    }

    // The ONNX model mlflow.onnx saved with its weights in an external file (its
    // default) serves from the files logged beside model.onnx, on ONNX Runtime
    // (tract, which does not load external data, is recorded as refusing it).
    let external = &report["external_data_model"];
    let name = external["model"]
        .as_str()
        .expect("the external model's name");
    let shown = cli_json(
        &cluster,
        &["models", "show", &format!("{name}@1"), "--json"],
    )
    .await;
    assert_eq!(shown["deployable"], true, "{shown}");
    assert!(
        shown["refused_engines"]["tract"]
            .as_str()
            .is_some_and(|why| why.contains("external data")),
        "{shown}"
    );
    if onnxruntime.is_none() {
        eprintln!("SKIPPED: serving the external-data model needs KILN_ONNXRUNTIME_LIB");
        cluster.assert_healthy();
        return;
    }
    cluster
        .cli_ok(&[
            "deploy",
            "external",
            "--model",
            &format!("{name}@1"),
            "--replicas",
            "1",
            "--wait",
        ])
        .await;
    let body = serde_json::to_vec(&json!({
        "inputs": [{"name": external["input"], "shape": external["x_shape"],
                    "datatype": "FP32", "data": external["x"]}]
    }))
    .expect("json");
    let addr = cluster.worker_flag("a", "--http");
    let doc = first_answer(&addr, "/v2/models/external/infer", &auth, &body).await;
    let got = doc["outputs"][0]["data"].as_array().expect("data").clone();
    let want = external["y"].as_array().expect("y");
    assert_eq!(got.len(), want.len(), "{doc}");
    for (g, w) in got.iter().zip(want) {
        let (g, w) = (g.as_f64().expect("number"), w.as_f64().expect("number"));
        assert!(
            (g - w).abs() <= 1e-4 + 1e-4 * w.abs(),
            "{g} against X·W's {w}"
        );
    }
    cluster.assert_healthy();
}
