//! Serving through a real cluster (3 coordinators, workers, TLS and tokens):
//! `kiln models register | alias`, `kiln deploy`, `kiln deployments ...`, the
//! KServe v2 endpoints of every worker, which route to replicas on any worker,
//! and the drift monitor watching what they serve (`kiln drift status`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_proto::inference::{model_infer_request, ModelInferRequest, ModelMetadataRequest};
use kiln_tests::{http_call, HttpAnswer};
use kiln_tests::{stderr_text, Cluster};
use kiln_worker::serving::router::MAX_BODY_BYTES;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tract_onnx::prelude::*;

#[path = "support/mlp.rs"]
mod mlp;

const FEATURES: usize = 4;
const CLASSES: usize = 3;

/// An MLP 4-16-3 with random weights from `seed`, as ONNX bytes.
fn model_bytes(seed: u64) -> Vec<u8> {
    model_bytes_with(seed, &[16])
}

/// An MLP 4-`hidden`-3 with random weights from `seed`, as ONNX bytes.
fn model_bytes_with(seed: u64, hidden: &[usize]) -> Vec<u8> {
    mlp::mlp_onnx(seed, FEATURES, hidden, CLASSES)
}

/// What tract computes in-process for `rows` rows of `x`.
fn in_process(bytes: &[u8], rows: usize, x: &[f32]) -> Vec<f32> {
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .expect("parse")
        .into_optimized()
        .expect("optimise")
        .into_runnable()
        .expect("plan");
    let input = Tensor::from_shape(&[rows, FEATURES], x).expect("tensor");
    let out = plan.run(tvec!(input.into())).expect("run");
    out[0]
        .to_plain_array_view::<f32>()
        .expect("f32")
        .iter()
        .copied()
        .collect()
}

fn write_model(dir: &Path, name: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let bytes = model_bytes(seed);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write model");
    (path, bytes)
}

/// A cluster (coordinators with `config`) with the named workers alive.
async fn cluster_with(workers: &[&str], config: &str) -> Cluster {
    cluster_with_args(workers, config, &[]).await
}

/// A cluster (coordinators with `config`) with the named workers alive, each
/// started with `worker_args`.
async fn cluster_with_args(workers: &[&str], config: &str, worker_args: &[&str]) -> Cluster {
    Cluster::start_with_workers(config, workers, worker_args).await
}

async fn deployment(cluster: &Cluster, name: &str) -> Value {
    let text = cluster
        .cli_ok(&["deployments", "show", name, "--json"])
        .await;
    serde_json::from_str(&text).expect("deployments show --json prints JSON")
}

/// Waits until `path` answers 200 on every address.
async fn wait_ready(addrs: &[String], path: &str) {
    kiln_tests::wait_ready(addrs, path, Duration::from_secs(10)).await;
}

/// A JSON inference request for `rows` rows.
fn json_request(x: &[f32], rows: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [rows, FEATURES], "datatype": "FP32", "data": x}]
    }))
    .expect("json")
}

async fn infer(addr: &str, path: &str, token: &str, body: &[u8]) -> HttpAnswer {
    let auth = format!("Bearer {token}");
    http_call(addr, "POST", path, &[("Authorization", &auth)], body)
        .await
        .unwrap_or_else(|e| panic!("POST {addr}{path}: {e}"))
}

fn output_of(answer: &HttpAnswer) -> Vec<f32> {
    let doc: Value =
        serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.text()));
    doc["outputs"][0]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no output data in {doc}"))
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "{what}: value {i}: {g} against {w}");
    }
}

fn inference_addrs(cluster: &Cluster, workers: &[&str]) -> Vec<String> {
    workers
        .iter()
        .map(|w| cluster.worker_flag(w, "--http"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_model_answers_json_and_binary_on_every_worker_like_tract() {
    let workers = ["a", "b"];
    let cluster = cluster_with(&workers, "").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, bytes) = write_model(dir.path(), "model.onnx", 5);

    // A file tract cannot load is refused with tract's reason.
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model at all").expect("write");
    let out = cluster
        .run_cli(&[
            "models",
            "register",
            "--onnx",
            &junk.display().to_string(),
            "--name",
            "junk",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr_text(&out).contains("cannot be served"),
        "{}",
        stderr_text(&out)
    );

    let text = cluster
        .cli_ok(&[
            "models",
            "register",
            "--onnx",
            &path.display().to_string(),
            "--name",
            "blobs",
            "--json",
        ])
        .await;
    let registered: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(registered["version"], 1);
    assert_eq!(registered["inputs"][0]["name"], "input");
    assert_eq!(registered["inputs"][0]["shape"], json!([-1, FEATURES]));
    cluster
        .cli_ok(&["models", "alias", "blobs", "1", "prod"])
        .await;
    let shown = cluster.cli_ok(&["models", "show", "blobs", "--json"]).await;
    let shown: Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(shown["aliases"]["prod"], 1);

    // Bad deploys are refused with the reason.
    let out = cluster
        .run_cli(&["deploy", "nope", "--model", "blobs@7", "--replicas", "1"])
        .await;
    assert!(
        stderr_text(&out).contains("blobs@7 does not exist"),
        "{}",
        stderr_text(&out)
    );
    let out = cluster
        .run_cli(&[
            "deploy",
            "nope",
            "--model",
            "blobs@stable",
            "--replicas",
            "1",
        ])
        .await;
    assert!(
        stderr_text(&out).contains("no alias stable"),
        "{}",
        stderr_text(&out)
    );
    // Replicas on GPUs: tract never runs there, and these workers have none.
    for (args, needle) in [
        (
            &["--gpus", "1", "--engine", "tract"][..],
            "tract serves on CPUs only",
        ),
        (
            &["--gpus", "1"][..],
            "no worker can serve a replica on 1 GPU(s): no worker has GPUs",
        ),
        (&["--gpus", "9"][..], "at most 8 GPUs per replica"),
    ] {
        let mut deploy = vec!["deploy", "gpu", "--model", "blobs@1"];
        deploy.extend_from_slice(args);
        let out = cluster.run_cli(&deploy).await;
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr_text(&out).contains(needle),
            "{args:?}: {}",
            stderr_text(&out)
        );
    }

    cluster
        .cli_ok(&[
            "deploy",
            "blobs",
            "--model",
            "blobs@prod",
            "--replicas",
            "2",
            "--wait",
        ])
        .await;
    let d = deployment(&cluster, "blobs").await;
    let hosts: std::collections::HashSet<&str> = d["replica_set"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["worker_id"].as_str().expect("worker"))
        .collect();
    assert_eq!(hosts.len(), 2, "replicas spread over both workers: {d}");
    // Placed with memory: twice the model's few kilobytes and 256 MiB, in whole MiB.
    assert_eq!(d["memory_mib_per_replica"], 257, "{d}");
    assert_eq!(d["gpus_per_replica"], 0, "{d}");
    let text = cluster.cli_ok(&["deployments", "show", "blobs"]).await;
    assert!(text.contains("each 1 CPU(s), 257 MiB"), "{text}");

    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    let viewer = cluster
        .create_token("looker", kiln_proto::v1::Role::Viewer, 0)
        .await;
    let rows = 5;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let x: Vec<f32> = (0..rows * FEATURES)
        .map(|_| rng.gen_range(-3.0..3.0))
        .collect();
    let want = in_process(&bytes, rows, &x);
    let addrs = inference_addrs(&cluster, &workers);
    wait_ready(&addrs, "/v2/models/blobs/ready").await;
    for addr in &addrs {
        // Several requests, so both replicas (one local, one forwarded) answer.
        for _ in 0..6 {
            let answer = infer(
                addr,
                "/v2/models/blobs/infer",
                &token,
                &json_request(&x, rows),
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            assert_close(&output_of(&answer), &want, "JSON");
        }
        let answer = infer(
            addr,
            "/v2/models/blobs/versions/1/infer",
            &token,
            &json_request(&x, rows),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let doc: Value = serde_json::from_slice(&answer.body).expect("json");
        assert_eq!(doc["model_name"], "blobs");
        assert_eq!(doc["model_version"], "1");

        // The binary tensor extension, both ways.
        let header = serde_json::to_vec(&json!({
            "inputs": [{"name": "input", "shape": [rows, FEATURES], "datatype": "FP32",
                        "parameters": {"binary_data_size": rows * FEATURES * 4}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
        }))
        .expect("json");
        let mut body = header.clone();
        for v in &x {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let auth = format!("Bearer {token}");
        let json_len = header.len().to_string();
        let answer = http_call(
            addr,
            "POST",
            "/v2/models/blobs/infer",
            &[
                ("Authorization", &auth),
                ("Inference-Header-Content-Length", &json_len),
            ],
            &body,
        )
        .await
        .expect("binary request");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let json_part: usize = answer
            .header("inference-header-content-length")
            .expect("binary answers carry the JSON length")
            .parse()
            .expect("number");
        let floats: Vec<f32> = answer.body[json_part..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_close(&floats, &want, "binary");

        let meta = http_call(
            addr,
            "GET",
            "/v2/models/blobs",
            &[("Authorization", &auth)],
            b"",
        )
        .await
        .expect("metadata");
        assert_eq!(meta.status, 200, "{}", meta.text());
        let meta: Value = serde_json::from_slice(&meta.body).expect("json");
        assert_eq!(meta["inputs"][0]["datatype"], "FP32");
        assert_eq!(meta["outputs"][0]["name"], "output");
    }

    // KServe v2 gRPC on every worker's inference gRPC port, raw contents.
    let peers = cluster.cluster_client();
    for w in workers {
        let grpc_addr = cluster.worker_flag(w, "--inference-grpc");
        let mut client = peers.inference_for(&grpc_addr).expect("grpc client");
        let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        for _ in 0..4 {
            let mut request = tonic::Request::new(ModelInferRequest {
                model_name: "blobs".into(),
                inputs: vec![model_infer_request::InferInputTensor {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape: vec![rows as i64, FEATURES as i64],
                    ..Default::default()
                }],
                raw_input_contents: vec![raw.clone().into()],
                ..Default::default()
            });
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("metadata"),
            );
            let answer = client
                .model_infer(request)
                .await
                .expect("ModelInfer")
                .into_inner();
            assert_eq!(answer.model_version, "1");
            let floats: Vec<f32> = answer.raw_output_contents[0]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_close(&floats, &want, "gRPC");
        }
        let mut request = tonic::Request::new(ModelMetadataRequest {
            name: "blobs".into(),
            version: String::new(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("metadata"),
        );
        let meta = client
            .model_metadata(request)
            .await
            .expect("ModelMetadata")
            .into_inner();
        assert_eq!(meta.inputs[0].shape, vec![-1, FEATURES as i64]);
        let denied = client
            .model_infer(ModelInferRequest {
                model_name: "blobs".into(),
                ..Default::default()
            })
            .await
            .expect_err("no token");
        assert_eq!(denied.code(), tonic::Code::Unauthenticated, "{denied}");
    }

    // Bad requests: 4xx naming the problem, and the replicas keep serving.
    let addr = &addrs[0];
    let bad = |name: &str, shape: Value, datatype: &str, data: Value| {
        serde_json::to_vec(&json!({
            "inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]
        }))
        .expect("json")
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "wrong input name",
            bad("pixels", json!([1, 4]), "FP32", json!([1, 2, 3, 4])),
            400,
            "pixels",
        ),
        (
            "wrong feature count",
            bad("input", json!([1, 5]), "FP32", json!([1, 2, 3, 4, 5])),
            400,
            "shape",
        ),
        (
            "wrong datatype",
            bad("input", json!([1, 4]), "INT64", json!([1, 2, 3, 4])),
            400,
            "INT64",
        ),
        (
            "not numbers",
            bad("input", json!([1, 4]), "FP32", json!(["a", "b", "c", "d"])),
            400,
            "is a string; FP32 takes numbers",
        ),
        (
            "count against shape",
            bad("input", json!([2, 4]), "FP32", json!([1, 2, 3])),
            400,
            "data has 3 elements but shape [2, 4] holds 8",
        ),
        (
            "not JSON",
            b"{{{".to_vec(),
            400,
            "parse the inference request's JSON",
        ),
    ];
    for (what, body, status, needle) in cases {
        let answer = infer(addr, "/v2/models/blobs/infer", &token, &body).await;
        assert_eq!(answer.status, status, "{what}: {}", answer.text());
        let doc: Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|e| panic!("{what}: errors are JSON ({e}): {}", answer.text()));
        let message = doc["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {doc}"));
        assert!(message.contains(needle), "{what}: {message}");
    }
    let answer = infer(
        addr,
        "/v2/models/nothing/infer",
        &token,
        &json_request(&x, rows),
    )
    .await;
    assert_eq!(answer.status, 404, "{}", answer.text());
    // Without credentials a name that is not deployed answers as a private
    // deployment does, so deployment names cannot be probed for.
    for path in [
        "/v2/models/nothing/infer",
        "/v2/models/blobs/infer",
        "/v2/models/nothing",
    ] {
        let method = if path.ends_with("infer") {
            "POST"
        } else {
            "GET"
        };
        let body = if method == "POST" {
            json_request(&x, rows)
        } else {
            Vec::new()
        };
        for (who, headers) in [
            ("no token", vec![]),
            (
                "a made-up token",
                vec![("authorization", "Bearer kiln_madeup")],
            ),
        ] {
            let answer = http_call(addr, method, path, &headers, &body)
                .await
                .expect("call");
            assert_eq!(answer.status, 401, "{who} on {path}: {}", answer.text());
        }
    }
    let answer = infer(
        addr,
        "/v2/models/blobs/versions/9/infer",
        &token,
        &json_request(&x, rows),
    )
    .await;
    assert_eq!(answer.status, 404, "{}", answer.text());
    let answer = infer(
        addr,
        "/v2/models/blobs/infer",
        &viewer,
        &json_request(&x, rows),
    )
    .await;
    assert_eq!(
        answer.status,
        403,
        "a viewer may not call models: {}",
        answer.text()
    );
    let answer = http_call(
        addr,
        "POST",
        "/v2/models/blobs/infer",
        &[],
        &json_request(&x, rows),
    )
    .await
    .expect("no token");
    assert_eq!(answer.status, 401, "{}", answer.text());
    let huge = vec![b' '; 65 << 20];
    let answer = infer(addr, "/v2/models/blobs/infer", &token, &huge).await;
    assert_eq!(answer.status, 413, "{}", answer.text());
    let answer = infer(
        addr,
        "/v2/models/blobs/infer",
        &token,
        &json_request(&x, rows),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "still serving after bad requests: {}",
        answer.text()
    );
    assert_close(&output_of(&answer), &want, "after errors");

    // A deployment made with --public answers without a token.
    cluster
        .cli_ok(&[
            "deploy",
            "open",
            "--model",
            "blobs@1",
            "--replicas",
            "1",
            "--public",
            "--wait",
        ])
        .await;
    wait_ready(&addrs, "/v2/models/open/ready").await;
    for addr in &addrs {
        let answer = http_call(
            addr,
            "POST",
            "/v2/models/open/infer",
            &[],
            &json_request(&x, rows),
        )
        .await
        .expect("public request");
        assert_eq!(
            answer.status,
            200,
            "a public deployment needs no token: {}",
            answer.text()
        );
        assert_close(&output_of(&answer), &want, "public");
    }
    // Its one replica is on one worker: the other forwards. A gRPC request as
    // large as the server takes (over 17 MiB) reaches the replica either way,
    // which refuses its made-up input.
    let padding = vec![0u8; 20 << 20];
    for w in workers {
        let grpc_addr = cluster.worker_flag(w, "--inference-grpc");
        let mut client = peers
            .inference_for(&grpc_addr)
            .expect("grpc client")
            .max_encoding_message_size(MAX_BODY_BYTES);
        let refused = client
            .model_infer(ModelInferRequest {
                model_name: "open".into(),
                inputs: vec![model_infer_request::InferInputTensor {
                    name: "padding".into(),
                    datatype: "UINT8".into(),
                    shape: vec![padding.len() as i64],
                    ..Default::default()
                }],
                raw_input_contents: vec![padding.clone().into()],
                ..Default::default()
            })
            .await
            .expect_err("an input the model does not take");
        assert_eq!(
            refused.code(),
            tonic::Code::InvalidArgument,
            "worker {w}: {refused}"
        );
        assert!(
            refused.message().contains("\"padding\" is not an input"),
            "worker {w}: {refused}"
        );
    }
    cluster.cli_ok(&["deployments", "rm", "open"]).await;

    // Prometheus counters per deployment, model, version and replica.
    let viewer_auth = format!("Bearer {viewer}");
    let (mut served, mut failed) = (0.0, 0.0);
    for addr in &addrs {
        let metrics = http_call(
            addr,
            "GET",
            "/metrics",
            &[("Authorization", &viewer_auth)],
            b"",
        )
        .await
        .expect("metrics");
        assert_eq!(metrics.status, 200, "{}", metrics.text());
        let text = metrics.text();
        assert!(
            text.contains("kiln_serving_replicas{deployment=\"blobs\"} 1"),
            "{text}"
        );
        for line in text.lines() {
            if !line.starts_with(
                "kiln_inference_requests_total{deployment=\"blobs\",model=\"blobs\",version=\"1\"",
            ) {
                continue;
            }
            let count: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("a count");
            if line.contains("outcome=\"success\"") {
                served += count;
            } else if line.contains("outcome=\"failed\"") {
                failed += count;
            }
        }
    }
    assert!(
        served >= 20.0,
        "the replicas counted what they served: {served}"
    );
    // The wrong name, feature count and datatype reached a replica; the other
    // bad requests were refused before (parse, auth, routing, size).
    assert_eq!(failed, 3.0, "requests the engines refused");

    cluster.cli_ok(&["deployments", "rm", "blobs"]).await;
    kiln_tests::wait_for(Duration::from_secs(15), "the deployment to go", || {
        let addr = addr.clone();
        let token = token.clone();
        let body = json_request(&x, rows);
        async move {
            let answer = infer(&addr, "/v2/models/blobs/infer", &token, &body).await;
            if answer.status == 404 {
                Ok(())
            } else {
                Err(format!("{}: {}", answer.status, answer.text()))
            }
        }
    })
    .await;
}

/// Sends requests round-robin over `addrs` until `stop`; returns the count of
/// answers by status (0: the connection failed) and by model version.
async fn load(
    addrs: Vec<String>,
    token: String,
    body: Vec<u8>,
    stop: tokio_util::sync::CancellationToken,
) -> (HashMap<u16, usize>, HashMap<String, usize>) {
    let mut statuses = HashMap::new();
    let mut versions = HashMap::new();
    let mut i = 0;
    while !stop.is_cancelled() {
        let addr = &addrs[i % addrs.len()];
        i += 1;
        let auth = format!("Bearer {token}");
        match http_call(
            addr,
            "POST",
            "/v2/models/svc/infer",
            &[("Authorization", &auth)],
            &body,
        )
        .await
        {
            Ok(answer) => {
                *statuses.entry(answer.status).or_default() += 1;
                if answer.status == 200 {
                    let doc: Value = serde_json::from_slice(&answer.body).expect("json");
                    let version = doc["model_version"].as_str().unwrap_or("?").to_string();
                    *versions.entry(version).or_default() += 1;
                } else if statuses.get(&answer.status) == Some(&1) {
                    eprintln!("first {} answer: {}", answer.status, answer.text());
                }
            }
            Err(_) => *statuses.entry(0).or_default() += 1,
        }
    }
    (statuses, versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_and_canaries_under_load_drop_nothing() {
    let workers = ["a", "b"];
    let cluster = cluster_with(&workers, "").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (v1, _) = write_model(dir.path(), "v1.onnx", 1);
    let (v2, _) = write_model(dir.path(), "v2.onnx", 2);
    for path in [&v1, &v2] {
        cluster
            .cli_ok(&[
                "models",
                "register",
                "--onnx",
                &path.display().to_string(),
                "--name",
                "svc",
            ])
            .await;
    }
    cluster
        .cli_ok(&[
            "deploy",
            "svc",
            "--model",
            "svc@1",
            "--replicas",
            "2",
            "--wait",
        ])
        .await;
    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    let addrs = inference_addrs(&cluster, &workers);
    let body = json_request(&[0.1, 0.2, 0.3, 0.4], 1);
    wait_ready(&addrs, "/v2/models/svc/ready").await;

    // A rollout to version 2 while two clients send requests: nothing fails.
    let stop = tokio_util::sync::CancellationToken::new();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(load(
                addrs.clone(),
                token.clone(),
                body.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    cluster
        .cli_ok(&[
            "deploy",
            "svc",
            "--model",
            "svc@2",
            "--replicas",
            "2",
            "--wait",
        ])
        .await;
    let rollout = started.elapsed();
    // Let every router learn the new routes and the old replicas drain.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let mut versions: HashMap<String, usize> = HashMap::new();
    for client in clients {
        let (s, v) = client.await.expect("client");
        for (k, n) in s {
            *statuses.entry(k).or_default() += n;
        }
        for (k, n) in v {
            *versions.entry(k).or_default() += n;
        }
    }
    let total: usize = statuses.values().sum();
    eprintln!("rollout in {rollout:?}: {statuses:?} {versions:?}");
    assert_eq!(
        statuses.get(&200),
        Some(&total),
        "every request answered: {statuses:?}"
    );
    assert!(
        versions.get("1").copied().unwrap_or(0) > 0 && versions.get("2").copied().unwrap_or(0) > 0,
        "{versions:?}"
    );
    let d = deployment(&cluster, "svc").await;
    assert!(
        d["replica_set"]
            .as_array()
            .expect("replicas")
            .iter()
            .all(|r| r["model"] == "svc@2"),
        "old replicas retired: {d}"
    );

    // A 20% canary of version 1 gets 20% ± 5% of 2,000 requests (one primary
    // and one canary replica: the two workers' 4 CPUs hold the change).
    cluster
        .cli_ok(&[
            "deploy",
            "svc",
            "--model",
            "svc@2",
            "--replicas",
            "1",
            "--canary",
            "svc@1",
            "--canary-percent",
            "20",
            "--wait",
        ])
        .await;
    wait_ready(&addrs, "/v2/models/svc/versions/1/ready").await;
    let mut canary = 0;
    let auth = format!("Bearer {token}");
    for i in 0..2000 {
        let answer = http_call(
            &addrs[i % 2],
            "POST",
            "/v2/models/svc/infer",
            &[("Authorization", &auth)],
            &body,
        )
        .await
        .expect("request");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let doc: Value = serde_json::from_slice(&answer.body).expect("json");
        if doc["model_version"] == "1" {
            canary += 1;
        }
    }
    eprintln!("canary answered {canary} of 2000");
    assert!(
        (300..=500).contains(&canary),
        "canary share {canary} of 2000 is not 20% ± 5%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_timeout_holds_through_a_forwarding_worker() {
    let workers = ["a", "b"];
    let cluster = cluster_with(&workers, "").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wide.onnx");
    std::fs::write(&path, model_bytes_with(6, &[1024, 1024])).expect("write model");
    cluster
        .cli_ok(&[
            "models",
            "register",
            "--onnx",
            &path.display().to_string(),
            "--name",
            "wide",
        ])
        .await;
    cluster
        .cli_ok(&[
            "deploy",
            "wide",
            "--model",
            "wide@1",
            "--replicas",
            "1",
            "--max-batch-size",
            "4096",
            "--wait",
        ])
        .await;
    let d = deployment(&cluster, "wide").await;
    let holder_id = d["replica_set"][0]["worker_id"]
        .as_str()
        .expect("a replica");
    let holder = workers
        .iter()
        .find(|w| cluster.worker_id(w).as_deref() == Some(holder_id))
        .expect("the holder is one of ours");
    // Ask the worker without the replica: it forwards to the holder.
    let other = workers.iter().find(|w| *w != holder).expect("another");
    let addr = cluster.worker_flag(other, "--http");
    let holder_addr = cluster.worker_flag(holder, "--http");
    wait_ready(&[addr.clone(), holder_addr], "/v2/models/wide/ready").await;
    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    // 4096 rows through two 1024-wide layers: tens of milliseconds at least.
    let rows = 4096;
    let x: Vec<f32> = (0..rows * FEATURES)
        .map(|i| (i % 13) as f32 * 0.1)
        .collect();
    let with_timeout = |us: u64| {
        let mut doc: Value = serde_json::from_slice(&json_request(&x, rows)).expect("json");
        doc["parameters"] = json!({ "timeout": us });
        serde_json::to_vec(&doc).expect("json")
    };
    // With time to spare it is answered through the forwarding worker (which
    // also opens its connection to the holder).
    let started = std::time::Instant::now();
    let answer = infer(
        &addr,
        "/v2/models/wide/infer",
        &token,
        &with_timeout(20_000_000),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(output_of(&answer).len() % rows, 0);
    // A tenth of that is too short.
    let timeout_us = (took.as_micros() / 10) as u64;
    let answer = infer(
        &addr,
        "/v2/models/wide/infer",
        &token,
        &with_timeout(timeout_us),
    )
    .await;
    eprintln!(
        "a request took {took:?}; with {timeout_us} us: {}",
        answer.text()
    );
    // 504 naming the deadline: the holder's engine gives up on it, or the
    // forwarding worker stops waiting for the holder when the time is up.
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert!(answer.text().contains("deadline"), "{}", answer.text());
    // That the forwarder passes the time left on (kiln-timeout-us) is checked by
    // the router's own tests; from outside, a holder that ignored it and one that
    // kept it look alike, since the forwarder stops waiting at the deadline.
}

/// Sends requests from `clients` concurrent clients to `addr` until `stop`;
/// returns the answers by status (0: the connection failed).
async fn load_on(
    addr: String,
    model: &'static str,
    clients: usize,
    token: String,
    body: Vec<u8>,
    stop: tokio_util::sync::CancellationToken,
) -> HashMap<u16, usize> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, token, body, stop) =
                (addr.clone(), token.clone(), body.clone(), stop.clone());
            tokio::spawn(async move {
                let mut statuses: HashMap<u16, usize> = HashMap::new();
                let auth = format!("Bearer {token}");
                let path = format!("/v2/models/{model}/infer");
                while !stop.is_cancelled() {
                    let status =
                        match http_call(&addr, "POST", &path, &[("Authorization", &auth)], &body)
                            .await
                        {
                            Ok(answer) => {
                                if answer.status != 200 && !statuses.contains_key(&answer.status) {
                                    eprintln!("first {}: {}", answer.status, answer.text());
                                }
                                answer.status
                            }
                            Err(_) => 0,
                        };
                    *statuses.entry(status).or_default() += 1;
                }
                statuses
            })
        })
        .collect();
    let mut total: HashMap<u16, usize> = HashMap::new();
    for task in tasks {
        for (k, n) in task.await.expect("client") {
            *total.entry(k).or_default() += n;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_costs_under_one_percent_and_its_replica_is_replaced() {
    let workers = ["a", "b", "c"];
    let mut cluster = cluster_with(&workers, "").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = write_model(dir.path(), "m.onnx", 3);
    cluster
        .cli_ok(&[
            "models",
            "register",
            "--onnx",
            &path.display().to_string(),
            "--name",
            "kept",
        ])
        .await;
    cluster
        .cli_ok(&[
            "deploy",
            "kept",
            "--model",
            "kept@1",
            "--replicas",
            "2",
            "--wait",
        ])
        .await;
    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    let entry = cluster.worker_flag("a", "--http");
    wait_ready(std::slice::from_ref(&entry), "/v2/models/kept/ready").await;
    // The victim: a worker other than the entry that holds a replica.
    let d = deployment(&cluster, "kept").await;
    let holders: Vec<String> = d["replica_set"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["worker_id"].as_str().expect("id").to_string())
        .collect();
    let victim = ["b", "c"]
        .into_iter()
        .find(|w| cluster.worker_id(w).is_some_and(|id| holders.contains(&id)))
        .expect("b or c holds a replica");
    let victim_id = cluster.worker_id(victim).expect("id");

    let stop = tokio_util::sync::CancellationToken::new();
    let body = json_request(&[0.5, -0.5, 1.0, 2.0], 1);
    let clients = tokio::spawn(load_on(
        entry.clone(),
        "kept",
        4,
        token.clone(),
        body,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill_worker(victim);
    let killed = Instant::now();
    // The replacement: two ready replicas, none on the victim.
    kiln_tests::wait_for(Duration::from_secs(40), "a replacement replica", || {
        let cluster = &cluster;
        let victim_id = victim_id.clone();
        async move {
            let d = deployment(cluster, "kept").await;
            let ready: Vec<&Value> = d["replica_set"]
                .as_array()
                .expect("replicas")
                .iter()
                .filter(|r| r["state"] == "Ready" && r["worker_id"] != victim_id.as_str())
                .collect();
            let on_victim = d["replica_set"]
                .as_array()
                .expect("replicas")
                .iter()
                .any(|r| r["worker_id"] == victim_id.as_str());
            (ready.len() == 2 && !on_victim)
                .then_some(())
                .ok_or(format!("{} ready elsewhere", ready.len()))
        }
    })
    .await;
    let replaced = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let statuses = clients.await.expect("load");
    let total: usize = statuses.values().sum();
    let ok = statuses.get(&200).copied().unwrap_or(0);
    eprintln!("replaced in {replaced:?}; {ok} of {total} answered: {statuses:?}");
    assert!(total > 100, "the load ran: {statuses:?}");
    assert!(ok * 100 >= total * 99, "at least 99% succeed: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_adds_replicas_under_load_and_removes_them_after() {
    let workers = ["a", "b"];
    let cluster = cluster_with(
        &workers,
        "[autoscale]\nsample_window_ms = 1500\nup_window_ms = 1000\ndown_window_ms = 3000\n",
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Wide enough that a batch takes a while: requests in flight show the load (a
    // request alone in a replica does not wait for a batch to fill).
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, model_bytes_with(4, &[1024, 1024])).expect("write model");
    cluster
        .cli_ok(&[
            "models",
            "register",
            "--onnx",
            &path.display().to_string(),
            "--name",
            "busy",
        ])
        .await;
    cluster
        .cli_ok(&[
            "deploy",
            "busy",
            "--model",
            "busy@1",
            "--min",
            "1",
            "--max",
            "3",
            "--target-in-flight",
            "2",
            "--max-queue-delay-us",
            "20000",
            "--wait",
        ])
        .await;
    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    let entry = cluster.worker_flag("a", "--http");
    wait_ready(std::slice::from_ref(&entry), "/v2/models/busy/ready").await;
    let stop = tokio_util::sync::CancellationToken::new();
    // Requests of 64 rows (the most a batch holds): none joins another, so each
    // runs alone and the queue, not HTTP, takes the time; 8 callers keep about
    // 8 requests in flight against a target of 2 per replica.
    let x: Vec<f32> = (0..64 * FEATURES).map(|i| (i % 7) as f32 * 0.5).collect();
    let body = json_request(&x, 64);
    let clients = tokio::spawn(load_on(entry, "busy", 8, token, body, stop.clone()));
    kiln_tests::wait_for(Duration::from_secs(90), "a scale-up", || {
        let cluster = &cluster;
        async move {
            let d = deployment(cluster, "busy").await;
            let n = d["replicas"].as_u64().unwrap_or(0);
            (n >= 2).then_some(()).ok_or(format!("{n} replica(s)"))
        }
    })
    .await;
    // The added replica loads, becomes ready and takes a share of the load
    // (each worker's /metrics counts its replicas' answers).
    let admin = cluster.admin_token().await;
    let served = kiln_tests::wait_for(Duration::from_secs(90), "the new replica serves", || {
        let (cluster, admin) = (&cluster, &admin);
        async move {
            let mut served = std::collections::BTreeMap::new();
            for w in ["a", "b"] {
                let addr = cluster.worker_flag(w, "--http");
                let (code, body) = kiln_tests::http_get(&addr, "/metrics", Some(admin)).await;
                if code != 200 {
                    return Err(format!("worker {w} /metrics: {code}"));
                }
                for line in body.lines().filter(|l| {
                    l.starts_with("kiln_inference_requests_total{deployment=\"busy\"")
                        && l.contains("outcome=\"success\"")
                }) {
                    let (labels, n) = line.rsplit_once(' ').expect("a sample");
                    let replica = labels
                        .split("replica=\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .expect("a replica label")
                        .to_string();
                    served.insert(replica, n.parse::<u64>().expect("a count"));
                }
            }
            let serving = served.values().filter(|&&n| n > 0).count();
            (serving >= 2)
                .then(|| served.clone())
                .ok_or(format!("replicas that answered: {served:?}"))
        }
    })
    .await;
    stop.cancel();
    let statuses = clients.await.expect("load");
    eprintln!("answers by replica: {served:?}; statuses {statuses:?}");
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0, "{statuses:?}");
    kiln_tests::wait_for(Duration::from_secs(60), "a scale-down", || {
        let cluster = &cluster;
        async move {
            let d = deployment(cluster, "busy").await;
            let n = d["replicas"].as_u64().unwrap_or(0);
            (n == 1).then_some(()).ok_or(format!("{n} replica(s)"))
        }
    })
    .await;
    let d = deployment(&cluster, "busy").await;
    let events: Vec<&str> = d["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.starts_with("autoscaler"))
        .collect();
    assert!(
        events.len() >= 2,
        "each decision is recorded with its reason: {events:?}"
    );
    assert!(events.iter().all(|m| m.contains("target 2")), "{events:?}");
}

/// `rows` rows of FEATURES standard normal values, the first `shifted` features
/// moved by `shift` (Box-Muller over a seeded generator).
fn normal_rows(rng: &mut rand::rngs::StdRng, rows: usize, shifted: usize, shift: f32) -> Vec<f32> {
    (0..rows * FEATURES)
        .map(|i| {
            let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen_range(0.0..1.0));
            let z = ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32;
            if i % FEATURES < shifted {
                z + shift
            } else {
                z
            }
        })
        .collect()
}

/// Sends 16-row requests round the workers until `until` says stop; returns the
/// rows answered. Every request must succeed.
async fn traffic_until<F, Fut>(
    addrs: &[String],
    path: &str,
    seed: u64,
    shift: f32,
    mut until: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = 0;
    let mut turn = 0;
    loop {
        for _ in 0..10 {
            let x = normal_rows(&mut rng, 16, 3, shift);
            let addr = &addrs[turn % addrs.len()];
            turn += 1;
            let answer = http_call(addr, "POST", path, &[], &json_request(&x, 16))
                .await
                .unwrap_or_else(|e| panic!("POST {addr}{path}: {e}"));
            assert_eq!(answer.status, 200, "{}", answer.text());
            rows += 16;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if until().await {
            return rows;
        }
    }
}

/// A webhook receiver on a loopback port: it answers its first POST 503 (so the
/// sender must retry) and every later one 200, and keeps the JSON bodies of the
/// POSTs it accepted.
async fn webhook_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let url = format!(
        "http://{}/hooks/drift",
        listener.local_addr().expect("addr")
    );
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = std::sync::Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut posts = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let body = loop {
                let Ok(n) = socket.read(&mut buf).await else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).to_string();
                let Some(end) = text.find("\r\n\r\n") else {
                    continue;
                };
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if raw.len() >= end + 4 + length {
                    break Some(raw[end + 4..end + 4 + length].to_vec());
                }
            };
            let Some(body) = body else { continue };
            posts += 1;
            let status = if posts == 1 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            if posts > 1 {
                let doc: Value = serde_json::from_slice(&body).expect("the webhook posts JSON");
                kept.lock().expect("lock").push(doc);
            }
            let _ = socket
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, accepted)
}

async fn drift_status(cluster: &Cluster, model: &str) -> Value {
    let text = cluster
        .cli_ok(&["drift", "status", model, "--windows", "100", "--json"])
        .await;
    serde_json::from_str(&text).expect("drift status --json prints JSON")
}

/// Judged windows of the first monitored version in a status.
fn judged(status: &Value) -> Vec<Value> {
    status["models"][0]["windows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn dataset_alerts(status: &Value) -> Vec<Value> {
    status["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|a| a["kind"] == "dataset_drift")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drifted_traffic_raises_an_alert_within_two_windows_and_calm_traffic_none_in_twenty() {
    const WINDOW_MS: u64 = 1000;
    let workers = ["a", "b"];
    let cluster = cluster_with_args(
        &workers,
        // The canary is judged after 3 s and 40 requests; latency histograms on a
        // busy 2-core machine are noisy, so the test allows a wide p99 slack
        // (the verdict's arithmetic is unit-tested in coordinator::canary).
        &format!(
            "[drift]\nwindow_ms = {WINDOW_MS}\nmin_rows = 300\n\n\
             [canary]\njudge_after_ms = 3000\nmin_requests = 40\nlatency_slack_ms = 25.0\n"
        ),
        &["--telemetry-interval-ms", "200"],
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = write_model(dir.path(), "model.onnx", 11);

    // The training data: 2,000 rows like the calm traffic below.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x = normal_rows(&mut rng, 2000, 0, 0.0);
    let mut csv = String::from("f0,f1,f2,f3,kind\n");
    for (i, row) in x.chunks(FEATURES).enumerate() {
        let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        csv.push_str(&format!("{},c{}\n", cells.join(","), i % CLASSES));
    }
    let data = dir.path().join("train.csv");
    std::fs::write(&data, csv).expect("write csv");
    let registered = cluster
        .cli_ok(&[
            "models",
            "register",
            "--onnx",
            &path.display().to_string(),
            "--name",
            "watched",
            "--reference-data",
            &data.display().to_string(),
            "--label",
            "kind",
            "--json",
        ])
        .await;
    let registered: Value = serde_json::from_str(&registered).expect("json");
    assert_eq!(registered["monitored"], true, "{registered}");
    assert_eq!(registered["features"], json!(["f0", "f1", "f2", "f3"]));
    let (hook, received) = webhook_receiver().await;
    // The training data is also the retraining dataset.
    cluster
        .cli_ok(&[
            "artifact",
            "push",
            &data.display().to_string(),
            "--name",
            "watched-data",
        ])
        .await;
    let job = dir.path().join("retrain.toml");
    std::fs::write(
        &job,
        "name = \"watched-retrained\"\nexperiment = \"watched\"\n\n[data]\nartifact = \"placeholder@1\"\nlabel = \"kind\"\n\n\
         [model]\nkind = \"mlp\"\nhidden = [8]\nactivation = \"tanh\"\n\n[optimizer]\nkind = \"adamw\"\nlr = 0.01\n\n\
         [train]\nepochs = 2\nbatch_size = 64\nseed = 3\ncheckpoint_every_steps = 1000\n\n[resources]\nshards = 1\ncpus_per_shard = 1\n",
    )
    .expect("write the job spec");
    cluster
        .cli_ok(&[
            "deploy",
            "watched",
            "--model",
            "watched@1",
            "--replicas",
            "2",
            "--public",
            "--drift-webhook",
            &hook,
            "--retrain-job",
            &job.display().to_string(),
            "--retrain-dataset",
            "watched-data",
            "--wait",
        ])
        .await;
    let out = cluster
        .run_cli(&[
            "deploy",
            "other",
            "--model",
            "watched@1",
            "--replicas",
            "1",
            "--drift-webhook",
            "https://hooks.example.com/x",
        ])
        .await;
    assert!(
        stderr_text(&out).contains("https receivers are not supported"),
        "{}",
        stderr_text(&out)
    );
    let addrs = inference_addrs(&cluster, &workers);
    let infer_path = "/v2/models/watched/infer";
    wait_ready(&addrs, "/v2/models/watched/ready").await;

    // `kiln status` shows each worker's load and the deployment's health.
    kiln_tests::wait_for(Duration::from_secs(10), "health in kiln status", || {
        let cluster = &cluster;
        async move {
            let text = cluster.run_cli(&["status", "--json"]).await;
            let status: Value = serde_json::from_slice(&text.stdout).map_err(|e| e.to_string())?;
            let hosts = status["hosts"].as_array().map_or(0, Vec::len);
            let watched = status["deployments"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["name"] == "watched").cloned())
                .unwrap_or_default();
            let memory = status["hosts"][0]["memory_total_bytes"]
                .as_u64()
                .unwrap_or(0);
            if hosts == 2 && memory > 0 && watched["ready"] == 2 && watched["wanted"] == 2 {
                assert_eq!(watched["model"], "watched@1");
                Ok(())
            } else {
                Err(format!("{status}"))
            }
        }
    })
    .await;
    let text = cluster.cli_ok(&["status"]).await;
    assert!(
        text.contains("host load") && text.contains("healthy"),
        "{text}"
    );

    // Calm traffic for 20 judged windows: no window drifts, no alert.
    let started = Instant::now();
    traffic_until(&addrs, infer_path, 2, 0.0, || async {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "20 windows took over a minute"
        );
        judged(&drift_status(&cluster, "watched").await).len() >= 20
    })
    .await;
    let calm = drift_status(&cluster, "watched").await;
    let windows = judged(&calm);
    assert!(windows.len() >= 20, "{calm}");
    for w in &windows {
        assert_eq!(w["dataset_drift"], false, "a calm window drifted: {w}");
        assert!(w["rows"].as_u64().expect("rows") >= 300);
        let tests: Vec<&str> = w["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c["test"].as_str().expect("test"))
            .collect();
        assert_eq!(
            tests[..FEATURES],
            ["wasserstein"; FEATURES],
            "2,000 reference rows: {w}"
        );
    }
    assert!(dataset_alerts(&calm).is_empty(), "{calm}");

    // Three of four features move by one standard deviation: the alert opens by
    // the end of the second window after the shift.
    let shifted_at = kiln_common::clock::now_ms();
    traffic_until(&addrs, infer_path, 3, 1.0, || async {
        assert!(
            kiln_common::clock::now_ms() < shifted_at + 10 * WINDOW_MS,
            "no alert 10 windows after the shift"
        );
        !dataset_alerts(&drift_status(&cluster, "watched").await).is_empty()
    })
    .await;
    let drifted = drift_status(&cluster, "watched").await;
    let alert = dataset_alerts(&drifted)[0].clone();
    assert_eq!(alert["state"], "firing", "{alert}");
    assert_eq!(alert["deployments"], json!(["watched"]));
    let opened = alert["opened_at_ms"].as_u64().expect("opened_at_ms");
    assert!(
        opened <= shifted_at + 2 * WINDOW_MS,
        "the alert came {} ms after the shift, over two windows",
        opened.saturating_sub(shifted_at)
    );
    let mut columns: Vec<&str> = alert["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c.as_str().expect("name"))
        .collect();
    columns.sort_unstable();
    assert_eq!(columns, ["f0", "f1", "f2"], "{alert}");
    let text = cluster.cli_ok(&["drift", "status", "watched"]).await;
    assert!(
        text.contains("dataset drift: yes") && text.contains("FIRING"),
        "{text}"
    );

    // The retrain policy submitted its job on the dataset's newest version.
    let (job_id, d) = kiln_tests::wait_for(Duration::from_secs(10), "the retraining job", || {
        let cluster = &cluster;
        async move {
            let d = deployment(cluster, "watched").await;
            match d["retrain"]["job_id"].as_u64() {
                Some(id) => Ok((id, d)),
                None => Err(format!("{d}")),
            }
        }
    })
    .await;
    assert_eq!(d["retrain"]["alert_id"], alert["id"], "{d}");
    assert!(
        d["events"]
            .to_string()
            .contains(&format!("retraining as job {job_id} on watched-data@1")),
        "{d}"
    );
    let shown = cluster
        .cli_ok(&["jobs", "show", &job_id.to_string(), "--json"])
        .await;
    let shown: Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(shown["name"], "watched-retrained", "{shown}");

    // Every coordinator's /metrics says so, followers' included.
    let admin = cluster.admin_token().await;
    for id in cluster.coordinator_ids() {
        let (code, body) =
            kiln_tests::http_get(&cluster.http_addr(id), "/metrics", Some(&admin)).await;
        assert_eq!(code, 200);
        assert!(
            body.contains(
                r#"kiln_drift_alert_firing{model="watched",version="1",kind="dataset_drift"} 1"#
            ),
            "coordinator {id}: {body}"
        );
        assert!(body
            .contains(r#"kiln_drift_column_drifted{model="watched",version="1",column="f0"} 1"#));
    }

    // Calm again: the alert is resolved.
    let calm_at = Instant::now();
    traffic_until(&addrs, infer_path, 4, 0.0, || async {
        assert!(
            calm_at.elapsed() < Duration::from_secs(15),
            "the alert did not resolve"
        );
        dataset_alerts(&drift_status(&cluster, "watched").await)[0]["state"] == "resolved"
    })
    .await;

    // The webhook got the alert firing (after a retry past its 503) and resolved.
    let id = alert["id"].clone();
    kiln_tests::wait_for(Duration::from_secs(15), "webhook posts", || {
        let received = std::sync::Arc::clone(&received);
        let id = id.clone();
        async move {
            let posts = received.lock().expect("lock").clone();
            let of_alert: Vec<&Value> = posts.iter().filter(|p| p["alert"]["id"] == id).collect();
            let statuses: Vec<&str> = of_alert
                .iter()
                .filter_map(|p| p["status"].as_str())
                .collect();
            if statuses.contains(&"firing") && statuses.contains(&"resolved") {
                for p in of_alert {
                    assert_eq!(p["deployment"], "watched");
                    assert_eq!(p["alert"]["kind"], "dataset_drift");
                }
                Ok(())
            } else {
                Err(format!("posts so far: {posts:?}"))
            }
        }
    })
    .await;

    // The retraining job ends, and the version it registered becomes the canary.
    let d = kiln_tests::wait_for(Duration::from_secs(120), "the retrained canary", || {
        let cluster = &cluster;
        async move {
            let d = deployment(cluster, "watched").await;
            if d["canary"] == "watched-retrained@1" {
                Ok(d)
            } else {
                Err(format!("{d}"))
            }
        }
    })
    .await;
    assert_eq!(d["canary_percent"], 10, "{d}");
    assert_eq!(
        d["model"], "watched@1",
        "the primary stays until the canary is judged"
    );
    assert_eq!(
        d["retrain"]["job_id"], job_id,
        "the policy names the job that trained its canary: {d}"
    );
    assert!(
        d["events"].to_string().contains(&format!(
            "retraining job {job_id} registered watched-retrained@1; canary at 10%"
        )),
        "{d}"
    );
    assert_eq!(d["retrain"]["canary"], "watched-retrained@1", "{d}");

    // The canary takes its share of the traffic; judged no worse than the
    // primary over the same windows, it is promoted.
    let canary_at = Instant::now();
    traffic_until(&addrs, infer_path, 5, 0.0, || async {
        let d = deployment(&cluster, "watched").await;
        assert!(
            canary_at.elapsed() < Duration::from_secs(60),
            "the canary was not judged within a minute: {d}"
        );
        // The promotion is deployed first, then recorded on the policy.
        d["model"] == "watched-retrained@1"
            && d["canary"].is_null()
            && d["retrain"]["canary"].is_null()
    })
    .await;
    let d = deployment(&cluster, "watched").await;
    let events = d["events"].to_string();
    assert!(
        events.contains("canary watched-retrained@1 promoted over watched@1: "),
        "{d}"
    );
    assert!(
        d["retrain"]["canary"].is_null() && d["retrain"]["job_id"].is_null(),
        "the policy is free: {d}"
    );
    // The serving windows the verdict read are gauges on /metrics.
    let (code, body) = kiln_tests::http_get(
        &cluster.http_addr(cluster.coordinator_ids()[0]),
        "/metrics",
        Some(&admin),
    )
    .await;
    assert_eq!(code, 200);
    for version in [
        "model=\"watched\",version=\"1\"",
        "model=\"watched-retrained\",version=\"1\"",
    ] {
        assert!(
            body.contains(&format!(
                "kiln_serving_requests_per_second{{deployment=\"watched\",{version}}}"
            )),
            "{version}: {body}"
        );
    }
}
