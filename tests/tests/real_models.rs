//! Models as users bring them, made by the real exporters (torchvision's
//! ResNet-18, a transformers BERT classifier with dynamic batch and sequence,
//! a time-major LSTM, a scikit-learn text pipeline taking strings, a random
//! forest with skl2onnx's ZipMap, a model that normalises over axis 0; scripts/models.sh
//! exports them once into a cache), registered, deployed on ONNX Runtime and
//! served over REST JSON, REST binary and gRPC within the exporter's tolerance of
//! onnxruntime in Python. scripts/test.sh points `EXPORTED_MODELS_DIR` at the
//! cache and `KILN_ONNXRUNTIME_LIB` at the wheel's library; where either could not
//! be installed the test says it skipped (and fails if `EXPECT_EXPORTED_MODELS`
//! says it must run).

use std::path::PathBuf;
use std::time::Duration;

use kiln_proto::inference::{model_infer_request, ModelInferRequest};
use kiln_tests::{http_call, Cluster};
use serde_json::{json, Value};

/// The exported models' directory and ONNX Runtime's library, or `None` (with a
/// note) where either is missing. (The harness gives kiln processes no `KILN_*`
/// variable: the library is passed as a flag.)
fn models_and_library() -> Option<(PathBuf, String)> {
    let dir = std::env::var_os("EXPORTED_MODELS_DIR").map(PathBuf::from);
    let lib = std::env::var("KILN_ONNXRUNTIME_LIB").ok();
    match (dir, lib) {
        (Some(dir), Some(lib)) => Some((dir, lib)),
        _ => {
            assert!(
                std::env::var_os("EXPECT_EXPORTED_MODELS").is_none(),
                "EXPECT_EXPORTED_MODELS is set but EXPORTED_MODELS_DIR or KILN_ONNXRUNTIME_LIB is not"
            );
            eprintln!(
                "SKIPPED: EXPORTED_MODELS_DIR and KILN_ONNXRUNTIME_LIB are needed (scripts/test.sh sets them)"
            );
            None
        }
    }
}

/// One tensor of an `<model>.expected.json` (scripts/export_models.py). A
/// sequence of maps (ZipMap) is what kiln serves for it: FP32 `[rows, classes]`,
/// classes in the maps' (sorted) order.
struct Expected {
    name: String,
    datatype: &'static str,
    shape: Vec<usize>,
    data: Vec<f64>,
    /// A string tensor's elements (BYTES); `data` is then empty.
    text: Vec<String>,
}

impl Expected {
    fn parse(doc: &Value) -> Expected {
        let name = doc["name"].as_str().expect("name").to_string();
        if doc["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("seq(map("))
        {
            let rows = doc["data"].as_array().expect("maps");
            let data: Vec<f64> = rows
                .iter()
                .flat_map(|row| row.as_array().expect("a map's pairs").iter())
                .map(|pair| pair[1].as_f64().expect("a probability"))
                .collect();
            return Expected {
                name,
                datatype: "FP32",
                shape: vec![rows.len(), data.len() / rows.len().max(1)],
                data,
                text: Vec::new(),
            };
        }
        let datatype = match doc["dtype"].as_str().expect("dtype") {
            "float32" => "FP32",
            "float16" => "FP16",
            "int64" => "INT64",
            "string" => "BYTES",
            other => panic!("the test reads float32, int64 and string tensors, not {other}"),
        };
        let values = doc["data"].as_array().expect("data");
        let (data, text) = match datatype {
            "BYTES" => (
                Vec::new(),
                values
                    .iter()
                    .map(|v| v.as_str().expect("a string").to_string())
                    .collect(),
            ),
            _ => (
                values
                    .iter()
                    .map(|v| v.as_f64().expect("a number"))
                    .collect(),
                Vec::new(),
            ),
        };
        Expected {
            name,
            datatype,
            shape: doc["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("a dimension") as usize)
                .collect(),
            data,
            text,
        }
    }

    /// Little-endian bytes, as the binary extension and gRPC carry them (BYTES:
    /// each element's 4-byte length, then the element).
    fn bytes(&self) -> Vec<u8> {
        match self.datatype {
            "BYTES" => self
                .text
                .iter()
                .flat_map(|t| {
                    let mut element = (t.len() as u32).to_le_bytes().to_vec();
                    element.extend_from_slice(t.as_bytes());
                    element
                })
                .collect(),
            "FP32" => self
                .data
                .iter()
                .flat_map(|v| (*v as f32).to_le_bytes())
                .collect(),
            "FP16" => self
                .data
                .iter()
                .flat_map(|v| half::f16::from_f64(*v).to_le_bytes())
                .collect(),
            _ => self
                .data
                .iter()
                .flat_map(|v| (*v as i64).to_le_bytes())
                .collect(),
        }
    }

    fn json_data(&self) -> Value {
        match self.datatype {
            "BYTES" => json!(self.text),
            "FP32" | "FP16" => json!(self.data),
            _ => json!(self.data.iter().map(|v| *v as i64).collect::<Vec<_>>()),
        }
    }
}

/// A model's sample inputs, onnxruntime's outputs for them and the tolerance.
struct Case {
    inputs: Vec<Expected>,
    outputs: Vec<Expected>,
    rtol: f64,
    atol: f64,
}

fn case(dir: &std::path::Path, model: &str) -> Case {
    let path = dir.join(format!("{model}.expected.json"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_slice(&text).expect("expected outputs are JSON");
    let tensors = |key: &str| -> Vec<Expected> {
        doc[key]
            .as_array()
            .expect("tensors")
            .iter()
            .map(Expected::parse)
            .collect()
    };
    Case {
        inputs: tensors("inputs"),
        outputs: tensors("outputs"),
        rtol: doc["tolerance"]["rtol"].as_f64().unwrap_or(1e-4),
        atol: doc["tolerance"]["atol"].as_f64().unwrap_or(1e-4),
    }
}

/// Checks an answer's elements against onnxruntime's: strings exactly, numbers
/// within the case's tolerance.
fn assert_answer(case: &Case, output: &Expected, got: Answer, what: &str) {
    match got {
        Answer::Numbers(got) => assert_within(case, output, &got, what),
        Answer::Text(got) => assert_eq!(got, output.text, "{what}: {}", output.name),
    }
}

/// An output's elements as an answer carried them.
enum Answer {
    Numbers(Vec<f64>),
    Text(Vec<String>),
}

/// The elements of an output's bytes from the binary extension or gRPC.
fn decode(output: &Expected, bytes: &[u8]) -> Answer {
    if output.datatype != "BYTES" {
        return Answer::Numbers(floats(output, bytes));
    }
    let mut text = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("a length")) as usize;
        text.push(String::from_utf8(rest[4..4 + len].to_vec()).expect("UTF-8"));
        rest = &rest[4 + len..];
    }
    Answer::Text(text)
}

fn assert_within(case: &Case, output: &Expected, got: &[f64], what: &str) {
    assert_eq!(
        got.len(),
        output.data.len(),
        "{what}: {} values",
        output.name
    );
    for (i, (g, w)) in got.iter().zip(&output.data).enumerate() {
        assert!(
            (g - w).abs() <= case.atol + case.rtol * w.abs(),
            "{what}: {} value {i}: {g} against onnxruntime's {w}",
            output.name
        );
    }
}

/// The values of an FP32, FP16 or INT64 output's little-endian bytes.
fn floats(output: &Expected, bytes: &[u8]) -> Vec<f64> {
    match output.datatype {
        "INT64" => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64)
            .collect(),
        "FP16" => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
    }
}

/// Every output over REST JSON, REST binary and gRPC, against onnxruntime's.
async fn check_protocols(cluster: &Cluster, model: &str, case: &Case, token: &str) {
    let addr = cluster.worker_flag("a", "--http");
    let auth = format!("Bearer {token}");
    let path = format!("/v2/models/{model}/infer");

    let body = json!({
        "inputs": case.inputs.iter().map(|t| json!({
            "name": t.name, "shape": t.shape, "datatype": t.datatype, "data": t.json_data(),
        })).collect::<Vec<_>>(),
    });
    let answer = http_call(
        &addr,
        "POST",
        &path,
        &[("Authorization", &auth)],
        body.to_string().as_bytes(),
    )
    .await
    .expect("JSON request");
    assert_eq!(answer.status, 200, "{model} JSON: {}", answer.text());
    let doc: Value = serde_json::from_slice(&answer.body).expect("a JSON answer");
    for output in &case.outputs {
        let tensor = doc["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|t| t["name"] == output.name.as_str()))
            .unwrap_or_else(|| panic!("{model}: no output {} in {doc}", output.name));
        let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone()).expect("shape");
        assert_eq!(
            shape, output.shape,
            "{model} JSON: shape of {}",
            output.name
        );
        let values = tensor["data"].as_array().expect("data").iter();
        let got = match output.datatype {
            "BYTES" => Answer::Text(
                values
                    .map(|v| v.as_str().expect("a string").to_string())
                    .collect(),
            ),
            _ => Answer::Numbers(values.map(|v| v.as_f64().expect("a number")).collect()),
        };
        assert_answer(case, output, got, &format!("{model} JSON"));
    }

    // The binary extension, one output at a time.
    for output in &case.outputs {
        let header = serde_json::to_vec(&json!({
            "inputs": case.inputs.iter().map(|t| json!({
                "name": t.name, "shape": t.shape, "datatype": t.datatype,
                "parameters": {"binary_data_size": t.bytes().len()},
            })).collect::<Vec<_>>(),
            "outputs": [{"name": output.name, "parameters": {"binary_data": true}}],
        }))
        .expect("json");
        let mut body = header.clone();
        for t in &case.inputs {
            body.extend_from_slice(&t.bytes());
        }
        let json_len = header.len().to_string();
        let answer = http_call(
            &addr,
            "POST",
            &path,
            &[
                ("Authorization", &auth),
                ("Inference-Header-Content-Length", &json_len),
            ],
            &body,
        )
        .await
        .expect("binary request");
        assert_eq!(answer.status, 200, "{model} binary: {}", answer.text());
        let json_part: usize = answer
            .header("inference-header-content-length")
            .expect("binary answers carry the JSON length")
            .parse()
            .expect("number");
        assert_answer(
            case,
            output,
            decode(output, &answer.body[json_part..]),
            &format!("{model} binary"),
        );
    }

    // gRPC with raw contents.
    let peers = cluster.cluster_client();
    let grpc_addr = cluster.worker_flag("a", "--inference-grpc");
    let mut client = peers.inference_for(&grpc_addr).expect("grpc client");
    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: model.into(),
        inputs: case
            .inputs
            .iter()
            .map(|t| model_infer_request::InferInputTensor {
                name: t.name.clone(),
                datatype: t.datatype.into(),
                shape: t.shape.iter().map(|d| *d as i64).collect(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: case.inputs.iter().map(|t| t.bytes().into()).collect(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", auth.parse().expect("metadata"));
    let answer = client
        .model_infer(request)
        .await
        .expect("ModelInfer")
        .into_inner();
    for output in &case.outputs {
        let index = answer
            .outputs
            .iter()
            .position(|o| o.name == output.name)
            .unwrap_or_else(|| panic!("{model} gRPC: no output {}", output.name));
        assert_answer(
            case,
            output,
            decode(output, &answer.raw_output_contents[index]),
            &format!("{model} gRPC"),
        );
    }
}

/// Waits until the worker at `addr` routes to a ready replica of `name`.
async fn wait_route(addr: &str, name: &str) {
    kiln_tests::wait_for(
        Duration::from_secs(20),
        "the route on the worker",
        || async {
            let ready = http_call(addr, "GET", &format!("/v2/models/{name}/ready"), &[], b"")
                .await
                .map_err(|e| e.to_string())?;
            (ready.status == 200)
                .then_some(())
                .ok_or_else(|| format!("{name}: {}", ready.status))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_from_the_usual_exporters_answer_like_onnxruntime_in_python() {
    let Some((dir, lib)) = models_and_library() else {
        return;
    };
    let mut cluster = Cluster::start_with_workers("", &["a"], &["--onnxruntime-lib", &lib]).await;
    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    let models = [
        ("resnet", "resnet18"),
        ("bert", "bert"),
        ("lstm", "lstm_time_major"),
        ("fp16", "mlp_fp16"),
        ("forest", "forest_zipmap"),
        ("external", "external/model"),
        ("norm", "axis0_norm"),
    ];
    let addr = cluster.worker_flag("a", "--http");
    // One at a time: the worker has 2 CPUs, one per replica.
    for (name, file) in models {
        // A model saved with external data is registered as its directory.
        let onnx = match file.strip_suffix("/model") {
            Some(directory) => dir.join(directory),
            None => dir.join(format!("{file}.onnx")),
        };
        let onnx = onnx.display().to_string();
        cluster
            .cli_ok(&[
                "models",
                "register",
                "--onnx",
                &onnx,
                "--name",
                name,
                "--onnxruntime-lib",
                &lib,
            ])
            .await;
        cluster
            .cli_ok(&[
                "deploy",
                name,
                "--model",
                &format!("{name}@1"),
                "--replicas",
                "1",
                "--cpus",
                "2",
                "--engine",
                "onnxruntime",
                "--wait",
            ])
            .await;
        wait_route(&addr, name).await;
        let text = cluster
            .cli_ok(&["deployments", "show", name, "--json"])
            .await;
        let shown: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(shown["engine"], "onnxruntime", "{shown}");
        assert_eq!(
            shown["replica_set"][0]["engine"], "onnxruntime",
            "the replica says which engine serves it: {shown}"
        );
        check_protocols(&cluster, name, &case(&dir, file), &token).await;
        if name != "norm" {
            cluster.cli_ok(&["deployments", "rm", name]).await;
        }
    }

    // Concurrent one-row requests to the model that normalises over axis 0: were
    // they joined, each answer would depend on the others' rows; alone, a row
    // minus its own mean is zero.
    let auth = format!("Bearer {token}");
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let (addr, auth) = (addr.clone(), auth.clone());
            let row: Vec<f32> = (0..8).map(|j| (i * 8 + j) as f32 * 0.37 - 3.0).collect();
            tokio::spawn(async move {
                let body = json!({"inputs": [{"name": "input", "shape": [1, 8],
                                              "datatype": "FP32", "data": row}]});
                http_call(
                    &addr,
                    "POST",
                    "/v2/models/norm/infer",
                    &[("Authorization", &auth)],
                    body.to_string().as_bytes(),
                )
                .await
            })
        })
        .collect();
    for call in calls {
        let answer = call.await.expect("the call ends").expect("an answer");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let doc: Value = serde_json::from_slice(&answer.body).expect("JSON");
        let values = doc["outputs"][0]["data"].as_array().expect("data").clone();
        assert!(
            values
                .iter()
                .all(|v| v.as_f64().expect("a number").abs() < 1e-5),
            "a row served with others' rows: {values:?}"
        );
    }

    // The text pipeline takes strings, which tract does not serve: registration
    // records that, `--engine tract` is refused with the reason, and without an
    // engine named its replicas go only where ONNX Runtime runs, not to a worker
    // that serves through tract alone.
    cluster.cli_ok(&["deployments", "rm", "norm"]).await;
    cluster.start_worker_with("b", &[]);
    kiln_tests::wait_for(Duration::from_secs(30), "worker b alive", || async {
        let status: Value = serde_json::from_str(&cluster.cli_ok(&["status", "--json"]).await)
            .map_err(|e| e.to_string())?;
        let alive = status["workers"]
            .as_array()
            .map_or(0, |w| w.iter().filter(|w| w["state"] == "alive").count());
        (alive == 2)
            .then_some(())
            .ok_or_else(|| format!("{alive} alive"))
    })
    .await;
    let onnx = dir.join("text_clf.onnx").display().to_string();
    let register = ["models", "register", "--onnx", &onnx, "--name", "text"];
    cluster
        .cli_ok(&[&register[..], &["--onnxruntime-lib", &lib]].concat())
        .await;
    let shown: Value =
        serde_json::from_str(&cluster.cli_ok(&["models", "show", "text", "--json"]).await)
            .expect("JSON");
    let tract = shown["refused_engines"]["tract"]
        .as_str()
        .unwrap_or_default();
    assert!(tract.contains("ONNX Runtime"), "{shown}");
    assert!(
        shown["refused_engines"].get("onnxruntime").is_none(),
        "{shown}"
    );
    let refused = cluster
        .run_cli(&["deploy", "text", "--model", "text@1", "--engine", "tract"])
        .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("text@1 cannot be served by tract"),
        "{stderr}"
    );
    let (a_id, b_id) = (
        cluster.worker_id("a").expect("a's id"),
        cluster.worker_id("b").expect("b's id"),
    );
    cluster
        .cli_ok(&[
            "deploy",
            "text",
            "--model",
            "text@1",
            "--replicas",
            "2",
            "--cpus",
            "1",
            "--wait",
        ])
        .await;
    let shown: Value = serde_json::from_str(
        &cluster
            .cli_ok(&["deployments", "show", "text", "--json"])
            .await,
    )
    .expect("JSON");
    let replicas = shown["replica_set"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2, "{shown}");
    for replica in replicas {
        assert_eq!(
            replica["worker_id"],
            a_id.as_str(),
            "not on {b_id}: {shown}"
        );
        assert_eq!(replica["engine"], "onnxruntime", "{shown}");
    }
    // Concurrent requests of one row each are joined into batches; each answer
    // is its own row's.
    wait_route(&addr, "text").await;
    let text_case = case(&dir, "text_clf");
    check_protocols(&cluster, "text", &text_case, &token).await;
    let auth = format!("Bearer {token}");
    let texts = &text_case.inputs[0].text;
    let labels = &text_case.outputs[0].text;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let (addr, auth) = (addr.clone(), auth.clone());
            let text = texts[i % texts.len()].clone();
            tokio::spawn(async move {
                let body = json!({"inputs": [{"name": "text", "shape": [1, 1],
                                              "datatype": "BYTES", "data": [text]}],
                                  "outputs": [{"name": "label"}]});
                http_call(
                    &addr,
                    "POST",
                    "/v2/models/text/infer",
                    &[("Authorization", &auth)],
                    body.to_string().as_bytes(),
                )
                .await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.expect("the call ends").expect("an answer");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let doc: Value = serde_json::from_slice(&answer.body).expect("JSON");
        assert_eq!(
            doc["outputs"][0]["data"],
            json!([labels[i % labels.len()]]),
            "the label of {:?}",
            texts[i % texts.len()]
        );
    }
    // ... and they were joined: fewer batches than requests on worker a.
    let admin = cluster.admin_token().await;
    let (status, metrics) = kiln_tests::http_get(&addr, "/metrics", Some(&admin)).await;
    assert_eq!(status, 200, "{metrics}");
    let total = |family: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(family) && l.contains("deployment=\"text\""))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    let (batches, requests) = (
        total("kiln_inference_exec_total"),
        total("kiln_inference_requests_total"),
    );
    assert!(
        requests >= 24.0 && batches < requests,
        "{batches} batches for {requests} requests: {metrics}"
    );

    // The transformers BERT with its configuration declared as in Triton's:
    // batches of up to 4 rows without a probe, sequences of at most 32 tokens.
    cluster.cli_ok(&["deployments", "rm", "text"]).await;
    cluster
        .cli_ok(&[
            "deploy",
            "bert-declared",
            "--model",
            "bert@1",
            "--replicas",
            "1",
            "--cpus",
            "2",
            "--engine",
            "onnxruntime",
            "--max-batch-size",
            "4",
            "--preferred-batch-sizes",
            "2,4",
            "--max-input-shape",
            "input_ids=*,32",
            "--max-input-shape",
            "attention_mask=*,32",
            "--wait",
        ])
        .await;
    wait_route(&addr, "bert-declared").await;
    let shown: Value = serde_json::from_str(
        &cluster
            .cli_ok(&["deployments", "show", "bert-declared", "--json"])
            .await,
    )
    .expect("JSON");
    assert_eq!(shown["batching"], "declared", "{shown}");
    assert_eq!(shown["preferred_batch_sizes"], json!([2, 4]), "{shown}");
    assert_eq!(shown["replica_set"][0]["unbatched"], "", "{shown}");
    // The exporter's sample (24 tokens) answers as onnxruntime's; 33 tokens are
    // refused, naming the input and the limit.
    check_protocols(&cluster, "bert-declared", &case(&dir, "bert"), &token).await;
    let long = json!({"inputs": [
        {"name": "input_ids", "shape": [1, 33], "datatype": "INT64", "data": vec![1; 33]},
        {"name": "attention_mask", "shape": [1, 33], "datatype": "INT64", "data": vec![1; 33]},
    ]});
    let refused = http_call(
        &addr,
        "POST",
        "/v2/models/bert-declared/infer",
        &[("Authorization", &auth)],
        long.to_string().as_bytes(),
    )
    .await
    .expect("an answer");
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused
            .text()
            .contains("dimension 1 is 33, over the deployment's limit of 32"),
        "{}",
        refused.text()
    );
}
