//! Models as users bring them, made by the real exporters (torchvision's
//! ResNet-18, a transformers BERT classifier with dynamic batch and sequence,
//! a time-major LSTM, a model that normalises over axis 0; scripts/models.sh
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

/// One tensor of an `<model>.expected.json` (scripts/export_models.py).
struct Expected {
    name: String,
    datatype: &'static str,
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl Expected {
    fn parse(doc: &Value) -> Expected {
        let datatype = match doc["dtype"].as_str().expect("dtype") {
            "float32" => "FP32",
            "float16" => "FP16",
            "int64" => "INT64",
            other => panic!("the test reads float32 and int64 tensors, not {other}"),
        };
        Expected {
            name: doc["name"].as_str().expect("name").to_string(),
            datatype,
            shape: doc["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("a dimension") as usize)
                .collect(),
            data: doc["data"]
                .as_array()
                .expect("data")
                .iter()
                .map(|v| v.as_f64().expect("a number"))
                .collect(),
        }
    }

    /// Little-endian bytes, as the binary extension and gRPC carry them.
    fn bytes(&self) -> Vec<u8> {
        match self.datatype {
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

/// The values of an FP32 or FP16 output's little-endian bytes.
fn floats(output: &Expected, bytes: &[u8]) -> Vec<f64> {
    match output.datatype {
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
        let got: Vec<f64> = tensor["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|v| v.as_f64().expect("a number"))
            .collect();
        assert_within(case, output, &got, &format!("{model} JSON"));
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
        assert_within(
            case,
            output,
            &floats(output, &answer.body[json_part..]),
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
        assert_within(
            case,
            output,
            &floats(output, &answer.raw_output_contents[index]),
            &format!("{model} gRPC"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_from_the_usual_exporters_answer_like_onnxruntime_in_python() {
    let Some((dir, lib)) = models_and_library() else {
        return;
    };
    let cluster = Cluster::start_with_workers("", &["a"], &["--onnxruntime-lib", &lib]).await;
    let token = cluster
        .create_token("caller", kiln_proto::v1::Role::Inference, 0)
        .await;
    let models = [
        ("resnet", "resnet18"),
        ("bert", "bert"),
        ("lstm", "lstm_time_major"),
        ("fp16", "mlp_fp16"),
        ("norm", "axis0_norm"),
    ];
    let addr = cluster.worker_flag("a", "--http");
    // One at a time: the worker has 2 CPUs, one per replica.
    for (name, file) in models {
        let onnx = dir.join(format!("{file}.onnx")).display().to_string();
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
        kiln_tests::wait_for(
            Duration::from_secs(20),
            "the route on the worker",
            || async {
                let ready = http_call(&addr, "GET", &format!("/v2/models/{name}/ready"), &[], b"")
                    .await
                    .map_err(|e| e.to_string())?;
                (ready.status == 200)
                    .then_some(())
                    .ok_or_else(|| format!("{name}: {}", ready.status))
            },
        )
        .await;
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
}
