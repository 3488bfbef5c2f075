//! Triton's extensions of the KServe v2 protocol that clients call, through a
//! real cluster (3 coordinators, 2 workers, TLS and tokens): statistics summed
//! over the replicas on both workers (HTTP and gRPC), with a frozen worker named
//! in a bounded answer; the repository index, with load and unload refused naming
//! `kiln deploy`; and the classification parameter on a requested output (JSON,
//! binary and gRPC), checked against the plain scores of the same request.

use std::time::{Duration, Instant};

use kiln_proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request, InferParameter, ModelInferRequest,
    ModelStatisticsRequest, RepositoryIndexRequest, RepositoryModelLoadRequest,
    RepositoryModelUnloadRequest,
};
use kiln_tests::{http_call, Cluster, HttpAnswer};
use kiln_worker::serving::router::{STATS_LOCAL_HEADER, STATS_TIMEOUT};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[path = "support/mlp.rs"]
mod mlp;

const FEATURES: usize = 4;
const CLASSES: usize = 5;
const ROWS: usize = 3;

/// A random 4-8-5 classifier as ONNX bytes.
fn classifier() -> Vec<u8> {
    mlp::mlp_onnx(17, FEATURES, &[8], CLASSES)
}

async fn call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> HttpAnswer {
    call_with(addr, method, path, token, &[], body).await
}

async fn call_with(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    http_call(addr, method, path, &headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"))
}

fn json_of(answer: &HttpAnswer) -> Value {
    serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.text()))
}

/// Waits until `path` answers 200 on every address.
async fn wait_ready(addrs: &[String], path: &str) {
    kiln_tests::wait_ready(addrs, path, Duration::from_secs(20)).await;
}

/// The statistics entry of `name` (its only version) in a stats answer.
fn entry<'a>(stats: &'a Value, name: &str) -> &'a Value {
    let found: Vec<&Value> = stats["model_stats"]
        .as_array()
        .unwrap_or_else(|| panic!("no model_stats in {stats}"))
        .iter()
        .filter(|m| m["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one version of {name}: {stats}");
    found[0]
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// A JSON request for `x`, with `outputs` when given.
fn request(x: &[f32], outputs: Option<Value>) -> Vec<u8> {
    let mut body = json!({
        "inputs": [{"name": "input", "shape": [ROWS, FEATURES], "datatype": "FP32", "data": x}]
    });
    if let Some(outputs) = outputs {
        body["outputs"] = outputs;
    }
    serde_json::to_vec(&body).expect("json")
}

/// Parses `"value:index"`.
fn value_index(text: &str) -> (f32, usize) {
    let (value, index) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("{text:?} is not value:index"));
    (
        value.parse().unwrap_or_else(|e| panic!("{text:?}: {e}")),
        index.parse().unwrap_or_else(|e| panic!("{text:?}: {e}")),
    )
}

/// Each row's `k` largest scores of `plain` ([ROWS, CLASSES]) as (value, index),
/// highest first.
fn top(plain: &[f32], k: usize) -> Vec<(f32, usize)> {
    plain
        .chunks_exact(CLASSES)
        .flat_map(|row| {
            let mut order: Vec<usize> = (0..CLASSES).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.into_iter().take(k).map(|i| (row[i], i))
        })
        .collect()
}

/// Splits length-prefixed BYTES elements.
fn elements(mut data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = u32::from_le_bytes(data[..4].try_into().expect("prefix")) as usize;
        out.push(String::from_utf8(data[4..4 + len].to_vec()).expect("utf-8"));
        data = &data[4 + len..];
    }
    out
}

fn grpc_request<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    request
}

/// Longest the venv may take to make: a first install from PyPI takes minutes.
const VENV_INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// Returns the python of the tritonclient venv, making it on first use, or
/// `None` (after saying why) when it cannot be made; with
/// `EXPECT_TRITONCLIENT=1` that is a failure.
async fn tritonclient_python() -> Option<std::path::PathBuf> {
    let mut command = tokio::process::Command::new("bash");
    command
        .args([
            "-c",
            // scripts/env.sh pins tritonclient's versions; the venv is made once
            // under the target directory.
            "source scripts/env.sh && kiln_tritonclient_python",
        ])
        .current_dir(kiln_tests::mlflow::repo_root());
    let out =
        kiln_tests::mlflow::run_bounded(command, VENV_INSTALL_TIMEOUT, "kiln_tritonclient_python")
            .await;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !path.is_empty() {
        return Some(path.into());
    }
    let why = format!(
        "the tritonclient venv could not be made ({}): {}",
        out.status,
        kiln_tests::stderr_text(&out)
    );
    assert!(
        std::env::var("EXPECT_TRITONCLIENT").as_deref() != Ok("1"),
        "EXPECT_TRITONCLIENT=1 but {why}"
    );
    println!("SKIPPED the tritonclient part: {why}");
    None
}

/// Calls the extensions with tritonclient: statistics over HTTP and gRPC agree
/// and count at least N successes, the repository index lists the model ready,
/// loading is refused naming `kiln deploy`, and `class_count=2` answers each
/// row's two largest scores of a plain request. Arguments: HTTP address, gRPC
/// address, CA file, token, the rows as JSON, N.
const TRITONCLIENT_SCRIPT: &str = r#"
import json, sys
import gevent.ssl
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

http_addr, grpc_addr, ca, token, rows, n = sys.argv[1:7]
n = int(n)
# A fresh dict per call: tritonclient.http adds its own headers to the one given.
def headers():
    return {"authorization": "Bearer " + token}
http = th.InferenceServerClient(
    http_addr, ssl=True,
    ssl_context_factory=lambda: gevent.ssl.create_default_context(cafile=ca))
grpc = tg.InferenceServerClient(grpc_addr, ssl=True, root_certificates=ca)

over_http = http.get_inference_statistics("scored", headers=headers())
over_grpc = grpc.get_inference_statistics("scored", headers=headers(), as_json=True)
h = over_http["model_stats"][0]
g = over_grpc["model_stats"][0]
assert (h["name"], h["version"]) == ("scored", "1"), over_http
assert h["inference_stats"]["success"]["count"] >= n, over_http
assert int(g["inference_stats"]["success"]["count"]) == h["inference_stats"]["success"]["count"], (over_http, over_grpc)
assert int(g["inference_count"]) == h["inference_count"], (over_http, over_grpc)
assert h["inference_stats"]["compute_infer"]["ns"] > 0, over_http

index = http.get_model_repository_index(headers=headers())
assert {"name": "scored", "version": "1", "state": "READY", "reason": ""} in index, index
gindex = grpc.get_model_repository_index(headers=headers(), as_json=True)
assert any(m["name"] == "scored" and m["state"] == "READY" for m in gindex["models"]), gindex
try:
    http.load_model("scored", headers=headers())
    raise AssertionError("load_model answered")
except InferenceServerException as e:
    assert "kiln deploy" in str(e), e

x = np.array(json.loads(rows), dtype=np.float32).reshape(-1, 4)
for client, module in ((http, th), (grpc, tg)):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    plain = client.infer("scored", [tensor], headers=headers()).as_numpy("output")
    top = client.infer(
        "scored", [tensor], outputs=[module.InferRequestedOutput("output", class_count=2)],
        headers=headers()).as_numpy("output")
    assert top.shape == (x.shape[0], 2), top.shape
    for row, classes in zip(plain, top):
        want = sorted(range(len(row)), key=lambda i: (-row[i], i))[:2]
        got = [c.decode().split(":") for c in classes]
        assert [int(i) for _, i in got] == want, (row, classes)
        assert [np.float32(v) for v, _ in got] == [row[i] for i in want], (row, classes)
print("tritonclient ok", json.dumps(over_http))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_repository_index_and_classification_answer_as_triton_does() {
    let workers = ["a", "b"];
    let cluster = Cluster::start_with_workers("", &workers, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, classifier()).expect("write model");
    cluster
        .cli_ok(&[
            "models",
            "register",
            "--onnx",
            &path.display().to_string(),
            "--name",
            "clf",
        ])
        .await;
    for (name, replicas, public) in [("scored", "2", false), ("open", "1", true)] {
        let mut args = vec![
            "deploy",
            name,
            "--model",
            "clf@1",
            "--replicas",
            replicas,
            "--wait",
        ];
        if public {
            args.push("--public");
        }
        cluster.cli_ok(&args).await;
    }
    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    let token = token.as_str();
    let addrs: Vec<String> = workers
        .iter()
        .map(|w| cluster.worker_flag(w, "--http"))
        .collect();
    wait_ready(&addrs, "/v2/models/scored/ready").await;
    wait_ready(&addrs, "/v2/models/open/ready").await;

    // Nothing served yet: the version is listed with zero counts.
    let before = json_of(
        &call(
            &addrs[0],
            "GET",
            "/v2/models/scored/stats",
            Some(token),
            b"",
        )
        .await,
    );
    let scored = entry(&before, "scored");
    assert_eq!(scored["version"], "1");
    assert_eq!(
        count(&scored["inference_stats"]["success"]["count"]),
        0,
        "{before}"
    );
    assert_eq!(count(&scored["last_inference"]), 0);

    // N requests of ROWS rows through both workers' routers, which send them to
    // the replicas on both workers.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..ROWS * FEATURES)
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let per_worker = 6;
    let mut plain: Vec<f32> = Vec::new();
    for addr in &addrs {
        for _ in 0..per_worker {
            let answer = call(
                addr,
                "POST",
                "/v2/models/scored/infer",
                Some(token),
                &request(&x, None),
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            let doc = json_of(&answer);
            let output = doc["outputs"]
                .as_array()
                .expect("outputs")
                .iter()
                .find(|o| o["name"] == "output")
                .unwrap_or_else(|| panic!("no output named output: {doc}"));
            plain = output["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
                .collect();
        }
    }
    let n = (per_worker * addrs.len()) as u64;

    // Every worker answers the cluster's sums, in Triton's shape.
    for addr in &addrs {
        for path in [
            "/v2/models/scored/stats",
            "/v2/models/scored/versions/1/stats",
        ] {
            let answer = call(addr, "GET", path, Some(token), b"").await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.text());
            let stats = json_of(&answer);
            assert!(stats.get("unanswered_workers").is_none(), "{stats}");
            let m = entry(&stats, "scored");
            assert_eq!(m["version"], "1");
            let s = &m["inference_stats"];
            assert_eq!(count(&s["success"]["count"]), n, "{stats}");
            assert_eq!(count(&s["fail"]["count"]), 0, "{stats}");
            assert_eq!(count(&s["queue"]["count"]), n);
            assert_eq!(count(&s["compute_infer"]["count"]), n);
            assert!(count(&s["compute_infer"]["ns"]) > 0, "{stats}");
            assert!(count(&s["success"]["ns"]) >= count(&s["compute_infer"]["ns"]) / n);
            assert_eq!(count(&m["inference_count"]), n * ROWS as u64);
            let executions = count(&m["execution_count"]);
            assert!((1..=n).contains(&executions), "{stats}");
            let last = count(&m["last_inference"]);
            assert!(last >= started_ms && last <= started_ms + 600_000, "{last}");
            assert_eq!(m["batch_stats"], json!([]));
        }
    }
    // Each worker alone answers for its own replica; together, all of them.
    let mut alone = Vec::new();
    for addr in &addrs {
        let answer = call_with(
            addr,
            "GET",
            "/v2/models/scored/stats",
            Some(token),
            &[(STATS_LOCAL_HEADER, "1")],
            b"",
        )
        .await;
        let stats = json_of(&answer);
        alone.push(count(
            &entry(&stats, "scored")["inference_stats"]["success"]["count"],
        ));
    }
    assert_eq!(alone.iter().sum::<u64>(), n, "per worker: {alone:?}");
    assert!(
        alone.iter().all(|&c| c > 0),
        "both replicas served: {alone:?}"
    );

    // A version that is not served is 404; a model that is not deployed is 404
    // with a token and 401 without, as for metadata; a public one needs none.
    let answer = call(
        &addrs[1],
        "GET",
        "/v2/models/scored/versions/7/stats",
        Some(token),
        b"",
    )
    .await;
    assert_eq!(answer.status, 404, "{}", answer.text());
    assert!(answer.text().contains("version 7"), "{}", answer.text());
    assert_eq!(
        call(
            &addrs[0],
            "GET",
            "/v2/models/nothing/stats",
            Some(token),
            b""
        )
        .await
        .status,
        404
    );
    for path in ["/v2/models/nothing/stats", "/v2/models/scored/stats"] {
        assert_eq!(
            call(&addrs[0], "GET", path, None, b"").await.status,
            401,
            "{path}"
        );
    }
    let answer = call(&addrs[0], "GET", "/v2/models/open/stats", None, b"").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let open = json_of(&answer);
    assert_eq!(
        count(&entry(&open, "open")["inference_stats"]["success"]["count"]),
        0
    );
    // Replica ids are per deployment: another deployment's replica 1 on the
    // same worker lends it no last inference.
    assert_eq!(count(&entry(&open, "open")["last_inference"]), 0, "{open}");
    // All models: a caller without a token sees the public ones only.
    let all = json_of(&call(&addrs[1], "GET", "/v2/models/stats", Some(token), b"").await);
    assert_eq!(
        count(&entry(&all, "scored")["inference_stats"]["success"]["count"]),
        n
    );
    entry(&all, "open");
    let anonymous = json_of(&call(&addrs[1], "GET", "/v2/models/stats", None, b"").await);
    let names: Vec<&Value> = anonymous["model_stats"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| &m["name"])
        .collect();
    assert_eq!(names, [&json!("open")], "{anonymous}");
    assert_eq!(
        call(
            &addrs[1],
            "GET",
            "/v2/models/stats",
            Some("kiln_bogus.token"),
            b""
        )
        .await
        .status,
        401
    );

    // gRPC ModelStatistics answers the same sums.
    let peers = cluster.cluster_client();
    let grpc_addrs: Vec<String> = workers
        .iter()
        .map(|w| cluster.worker_flag(w, "--inference-grpc"))
        .collect();
    let mut grpc = peers.inference_for(&grpc_addrs[1]).expect("grpc client");
    let stats = grpc
        .model_statistics(grpc_request(
            ModelStatisticsRequest {
                name: "scored".into(),
                version: String::new(),
            },
            token,
        ))
        .await
        .expect("ModelStatistics")
        .into_inner();
    assert_eq!(stats.model_stats.len(), 1, "{stats:?}");
    let m = &stats.model_stats[0];
    assert_eq!((m.name.as_str(), m.version.as_str()), ("scored", "1"));
    assert_eq!(m.inference_count, n * ROWS as u64);
    let s = m.inference_stats.as_ref().expect("inference_stats");
    assert_eq!(s.success.as_ref().expect("success").count, n);
    assert!(s.compute_infer.as_ref().expect("compute_infer").ns > 0);
    assert!(stats.unanswered_workers.is_empty(), "{stats:?}");
    let every = grpc
        .model_statistics(grpc_request(ModelStatisticsRequest::default(), token))
        .await
        .expect("ModelStatistics of every model")
        .into_inner();
    let names: Vec<&str> = every.model_stats.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["open", "scored"]);
    let denied = grpc
        .model_statistics(ModelStatisticsRequest {
            name: "scored".into(),
            version: String::new(),
        })
        .await
        .expect_err("no token");
    assert_eq!(denied.code(), tonic::Code::Unauthenticated, "{denied}");

    // The repository index lists what the caller may see, each version ready.
    let answer = call(&addrs[0], "POST", "/v2/repository/index", Some(token), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        json_of(&answer),
        json!([
            {"name": "open", "version": "1", "state": "READY", "reason": ""},
            {"name": "scored", "version": "1", "state": "READY", "reason": ""}
        ])
    );
    let answer = call(
        &addrs[1],
        "POST",
        "/v2/repository/index",
        None,
        br#"{"ready": true}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        json_of(&answer),
        json!([{"name": "open", "version": "1", "state": "READY", "reason": ""}])
    );
    let answer = call(
        &addrs[1],
        "POST",
        "/v2/repository/index",
        Some(token),
        br#"{"ready": "yes"}"#,
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(answer.text().contains("ready"), "{}", answer.text());
    let index = grpc
        .repository_index(grpc_request(
            RepositoryIndexRequest {
                repository_name: String::new(),
                ready: true,
            },
            token,
        ))
        .await
        .expect("RepositoryIndex")
        .into_inner();
    let listed: Vec<(&str, &str, &str)> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.version.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(listed, [("open", "1", "READY"), ("scored", "1", "READY")]);
    // Loading and unloading are kiln deploy's: refused, saying so.
    for verb in ["load", "unload"] {
        let answer = call(
            &addrs[0],
            "POST",
            &format!("/v2/repository/models/scored/{verb}"),
            Some(token),
            b"{}",
        )
        .await;
        assert_eq!(answer.status, 501, "{}", answer.text());
        assert!(
            json_of(&answer)["error"]
                .as_str()
                .expect("error")
                .contains("kiln deploy"),
            "{}",
            answer.text()
        );
    }
    let refused = grpc
        .repository_model_load(grpc_request(
            RepositoryModelLoadRequest {
                model_name: "scored".into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect_err("load is refused");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    assert!(refused.message().contains("kiln deploy"), "{refused}");
    let refused = grpc
        .repository_model_unload(grpc_request(
            RepositoryModelUnloadRequest {
                model_name: "scored".into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect_err("unload is refused");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    // Classification: each row's top 2 as "value:index", the two largest of the
    // plain scores of the same request, on both workers (local and forwarded).
    let want = top(&plain, 2);
    for addr in &addrs {
        for _ in 0..2 {
            let outputs = json!([{"name": "output", "parameters": {"classification": 2}}]);
            let answer = call(
                addr,
                "POST",
                "/v2/models/scored/infer",
                Some(token),
                &request(&x, Some(outputs)),
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            let doc = json_of(&answer);
            let out = &doc["outputs"][0];
            assert_eq!(out["datatype"], "BYTES", "{doc}");
            assert_eq!(out["shape"], json!([ROWS, 2]));
            let got: Vec<(f32, usize)> = out["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|v| value_index(v.as_str().expect("string")))
                .collect();
            assert_eq!(got, want, "{doc}");
        }
    }
    // Binary: length-prefixed strings after the JSON.
    let outputs =
        json!([{"name": "output", "parameters": {"classification": 3, "binary_data": true}}]);
    let answer = call(
        &addrs[1],
        "POST",
        "/v2/models/scored/infer",
        Some(token),
        &request(&x, Some(outputs)),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let json_len: usize = answer
        .header("inference-header-content-length")
        .expect("binary")
        .parse()
        .expect("number");
    let got: Vec<(f32, usize)> = elements(&answer.body[json_len..])
        .iter()
        .map(|t| value_index(t))
        .collect();
    assert_eq!(got, top(&plain, 3));
    // gRPC: the classification parameter is an int64.
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    for addr in &grpc_addrs {
        let mut client = peers.inference_for(addr).expect("grpc client");
        let answer = client
            .model_infer(grpc_request(
                ModelInferRequest {
                    model_name: "scored".into(),
                    inputs: vec![model_infer_request::InferInputTensor {
                        name: "input".into(),
                        datatype: "FP32".into(),
                        shape: vec![ROWS as i64, FEATURES as i64],
                        ..Default::default()
                    }],
                    outputs: vec![model_infer_request::InferRequestedOutputTensor {
                        name: "output".into(),
                        parameters: [(
                            "classification".to_string(),
                            InferParameter {
                                parameter_choice: Some(ParameterChoice::Int64Param(2)),
                            },
                        )]
                        .into(),
                    }],
                    raw_input_contents: vec![raw.clone().into()],
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect("ModelInfer")
            .into_inner();
        assert_eq!(answer.outputs[0].datatype, "BYTES");
        assert_eq!(answer.outputs[0].shape, [ROWS as i64, 2]);
        let got: Vec<(f32, usize)> = elements(&answer.raw_output_contents[0])
            .iter()
            .map(|t| value_index(t))
            .collect();
        assert_eq!(got, want);
    }
    // More classes than the output has, or a bad count, is a 400 naming the
    // output, before anything runs.
    let failed_before = count(
        &entry(
            &json_of(
                &call(
                    &addrs[0],
                    "GET",
                    "/v2/models/scored/stats",
                    Some(token),
                    b"",
                )
                .await,
            ),
            "scored",
        )["inference_stats"]["fail"]["count"],
    );
    for (k, needle) in [
        (json!(6), "5 classes"),
        (json!(0), "at least 1"),
        (json!("two"), "whole number"),
    ] {
        let outputs = json!([{"name": "output", "parameters": {"classification": k}}]);
        let answer = call(
            &addrs[0],
            "POST",
            "/v2/models/scored/infer",
            Some(token),
            &request(&x, Some(outputs)),
        )
        .await;
        assert_eq!(answer.status, 400, "{}", answer.text());
        let error = json_of(&answer)["error"]
            .as_str()
            .expect("error")
            .to_string();
        assert!(
            error.contains("\"output\"") && error.contains(needle),
            "{error}"
        );
    }
    let failed_after = count(
        &entry(
            &json_of(
                &call(
                    &addrs[0],
                    "GET",
                    "/v2/models/scored/stats",
                    Some(token),
                    b"",
                )
                .await,
            ),
            "scored",
        )["inference_stats"]["fail"]["count"],
    );
    assert_eq!(
        failed_before, failed_after,
        "refused before reaching a replica"
    );

    // NVIDIA's tritonclient, unchanged, reads all of it (when its venv can be
    // made).
    if let Some(python) = tritonclient_python().await {
        let x_json = serde_json::to_string(&x).expect("json");
        let ca = cluster.certs_dir().join("ca.pem");
        let mut command = tokio::process::Command::new(python);
        command.args([
            "-c",
            TRITONCLIENT_SCRIPT,
            &addrs[0],
            &grpc_addrs[1],
            &ca.display().to_string(),
            token,
            &x_json,
            &n.to_string(),
        ]);
        let out =
            kiln_tests::mlflow::run_bounded(command, Duration::from_secs(120), "tritonclient")
                .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "tritonclient: {stdout}\n{}",
            kiln_tests::stderr_text(&out)
        );
        assert!(stdout.contains("tritonclient ok"), "{stdout}");
    }

    // A frozen worker does not hold the answer past the bound, and is named.
    let answer = call_with(
        &addrs[0],
        "GET",
        "/v2/models/scored/stats",
        Some(token),
        &[(STATS_LOCAL_HEADER, "1")],
        b"",
    )
    .await;
    let own = entry(&json_of(&answer), "scored")["inference_stats"]["success"]["count"].clone();
    let frozen = cluster.worker_id("b").expect("worker b's id");
    cluster.pause_worker("b");
    let asked = Instant::now();
    let answer = call(
        &addrs[0],
        "GET",
        "/v2/models/scored/stats",
        Some(token),
        b"",
    )
    .await;
    let took = asked.elapsed();
    cluster.resume_worker("b");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        took < STATS_TIMEOUT + Duration::from_secs(2),
        "took {took:?}"
    );
    let stats = json_of(&answer);
    let unanswered = stats["unanswered_workers"]
        .as_array()
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(unanswered.len(), 1, "{stats}");
    assert_eq!(unanswered[0]["worker"], frozen.as_str(), "{stats}");
    // What worker a's replica counted is still there.
    assert_eq!(
        entry(&stats, "scored")["inference_stats"]["success"]["count"],
        own,
        "{stats}"
    );
}
