//! Ground truth through a real cluster (3 coordinators, 2 workers, TLS and
//! tokens): answers given over REST and gRPC by replicas on both workers are
//! labelled through `POST /v2/models/{m}/feedback` on either worker (the worker
//! asked finds ids remembered by the other), and every coordinator's `/metrics`
//! shows the labelled count and the live accuracy of the model version.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kiln_common::jobspec::Activation;
use kiln_proto::inference::{model_infer_request::InferInputTensor, ModelInferRequest};
use kiln_tests::{http_call, stderr_text, Cluster, HttpAnswer};
use kiln_worker::train::arch::{Arch, Task};
use kiln_worker::train::data::Standardizer;
use kiln_worker::train::onnx::{export, ExportMeta};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const FEATURES: usize = 4;
const CLASSES: usize = 3;
const DEPLOYMENT: &str = "graded";

/// A random 4-8-3 classifier with class names `c0..c2` in its ONNX metadata.
fn classifier() -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let arch = Arch {
        inputs: FEATURES,
        hidden: vec![8],
        activation: Activation::Relu,
        task: Task::Classification {
            classes: (0..CLASSES).map(|c| format!("c{c}")).collect(),
        },
    };
    let weights: Vec<f32> = (0..arch.parameter_count())
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    let layers = arch.split(&weights).expect("parameters");
    let standardizer = Standardizer {
        mean: vec![0.0; FEATURES],
        std: vec![1.0; FEATURES],
    };
    let meta = ExportMeta {
        features: (0..FEATURES).map(|i| format!("f{i}")).collect(),
        label: "kind".into(),
        ..Default::default()
    };
    export(&arch, &layers, &standardizer, &meta).expect("export")
}

/// Runs the CLI; panics with its stderr when it fails.
async fn kiln(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.run_cli(args).await;
    if !out.status.success() {
        panic!("kiln {}: {}", args.join(" "), stderr_text(&out));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One answered request: its id, the worker whose router took it, and the
/// class the model gave each row.
#[derive(Debug, Clone)]
struct Answered {
    id: String,
    via: usize,
    classes: Vec<usize>,
}

/// The index of the largest of each row's `CLASSES` scores.
fn argmax_rows(scores: &[f32]) -> Vec<usize> {
    scores
        .chunks_exact(CLASSES)
        .map(|row| {
            (0..CLASSES)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                .expect("classes")
        })
        .collect()
}

async fn post(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpAnswer {
    http_call(addr, "POST", path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("POST {addr}{path}: {e}"))
}

/// Sends a REST request of `rows` random rows (with `id` when given) to the
/// worker at `addr`; returns the id the response carries and the classes.
async fn infer_rest(
    addr: &str,
    auth: &str,
    rng: &mut rand::rngs::StdRng,
    rows: usize,
    id: Option<&str>,
) -> (String, Vec<usize>) {
    let x: Vec<f32> = (0..rows * FEATURES)
        .map(|_| rng.gen_range(-3.0..3.0))
        .collect();
    let mut body = json!({
        "inputs": [{"name": "input", "shape": [rows, FEATURES], "datatype": "FP32", "data": x}]
    });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    let path = format!("/v2/models/{DEPLOYMENT}/infer");
    let answer = post(
        addr,
        &path,
        &[("Authorization", auth)],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let doc: Value = serde_json::from_slice(&answer.body).expect("json");
    let scores: Vec<f32> = doc["outputs"][0]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no output data in {doc}"))
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect();
    let given = doc["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the response carries no id: {doc}"));
    if let Some(id) = id {
        assert_eq!(given, id, "the caller's id is echoed exactly");
    }
    (given.to_string(), argmax_rows(&scores))
}

/// Sends a gRPC ModelInfer of one random row to `grpc_addr`.
async fn infer_grpc(
    cluster: &Cluster,
    grpc_addr: &str,
    auth: &str,
    rng: &mut rand::rngs::StdRng,
    id: &str,
) -> (String, Vec<usize>) {
    let mut client = cluster
        .cluster_client()
        .inference_for(grpc_addr)
        .expect("grpc client");
    let raw: Vec<u8> = (0..FEATURES)
        .flat_map(|_| rng.gen_range(-3.0f32..3.0).to_le_bytes())
        .collect();
    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: DEPLOYMENT.into(),
        id: id.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, FEATURES as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
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
    assert!(!answer.id.is_empty(), "a gRPC answer carries an id");
    if !id.is_empty() {
        assert_eq!(answer.id, id);
    }
    let scores: Vec<f32> = answer.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (answer.id, argmax_rows(&scores))
}

/// The feedback item labelling `answered`: right on rows where `right` says
/// so, else the next class; by name on odd requests, by index on even ones.
fn item(answered: &Answered, nth: usize, right: &mut impl FnMut() -> bool) -> (Value, u64) {
    let mut correct = 0;
    let labels: Vec<Value> = answered
        .classes
        .iter()
        .map(|&class| {
            let label = if right() {
                correct += 1;
                class
            } else {
                (class + 1) % CLASSES
            };
            if nth % 2 == 1 {
                json!(format!("c{label}"))
            } else {
                json!(label)
            }
        })
        .collect();
    let item = match labels.as_slice() {
        [one] => json!({"id": answered.id, "label": one}),
        _ => json!({"id": answered.id, "labels": labels}),
    };
    (item, correct)
}

/// Posts a feedback body to a worker; returns the status and the JSON answer.
async fn feedback(addr: &str, auth: &str, extra: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let mut headers = vec![("Authorization", auth)];
    headers.extend_from_slice(extra);
    let path = format!("/v2/models/{DEPLOYMENT}/feedback");
    let answer = post(addr, &path, &headers, body.to_string().as_bytes()).await;
    let doc =
        serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.text()));
    (answer.status, doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_posted_to_any_worker_become_the_live_accuracy_of_the_version() {
    let mut cluster = Cluster::start(3, "[drift]\nwindow_ms = 1000\n");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let names = ["a", "b"];
    for name in names {
        cluster.start_worker_with(name, &["--telemetry-interval-ms", "200"]);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("graded.onnx");
    std::fs::write(&model, classifier()).expect("write the model");
    let model = model.display().to_string();
    let registered = kiln(
        &cluster,
        &["models", "register", "--onnx", &model, "--name", DEPLOYMENT],
    )
    .await;
    assert!(registered.contains(DEPLOYMENT), "{registered}");
    kiln_tests::wait_for(Duration::from_secs(30), "both workers alive", || {
        let cluster = &cluster;
        async move {
            let status: Value = serde_json::from_str(&kiln(cluster, &["status", "--json"]).await)
                .map_err(|e| e.to_string())?;
            let alive = status["workers"]
                .as_array()
                .map_or(0, |w| w.iter().filter(|w| w["state"] == "alive").count());
            (alive == 2).then_some(()).ok_or(format!("{alive} alive"))
        }
    })
    .await;
    let model_ref = format!("{DEPLOYMENT}@1");
    kiln(
        &cluster,
        &[
            "deploy",
            DEPLOYMENT,
            "--model",
            &model_ref,
            "--replicas",
            "2",
            "--wait",
        ],
    )
    .await;
    let shown: Value =
        serde_json::from_str(&kiln(&cluster, &["deployments", "show", DEPLOYMENT, "--json"]).await)
            .expect("json");
    let hosts: HashSet<&str> = shown["replica_set"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["worker_id"].as_str().expect("worker"))
        .collect();
    assert_eq!(hosts.len(), 2, "one replica on each worker: {shown}");

    let token = cluster
        .create_token("grader", kiln_proto::v1::Role::Inference, 0)
        .await;
    let auth = format!("Bearer {token}");
    let addrs: Vec<String> = names
        .iter()
        .map(|w| cluster.worker_flag(w, "--http"))
        .collect();
    // Generated ids start with the first 8 characters of the answering worker's id.
    let prefixes: Vec<String> = names
        .iter()
        .map(|w| cluster.worker_id(w).expect("worker id")[..8].to_string())
        .collect();
    // Each worker must route the deployment; it knows the token at once (a token
    // it does not hold makes it ask for the records first), answering 403 on
    // /metrics (an inference token may not read).
    let ready = format!("/v2/models/{DEPLOYMENT}/ready");
    let checks = [(ready.as_str(), 200), ("/metrics", 403)];
    kiln_tests::wait_for(
        Duration::from_secs(10),
        "routes and the token on both workers",
        || {
            let (addrs, auth, checks) = (&addrs, &auth, &checks);
            async move {
                for addr in addrs {
                    for &(path, want) in checks {
                        let answer = http_call(addr, "GET", path, &[("Authorization", auth)], b"")
                            .await
                            .map_err(|e| e.to_string())?;
                        if answer.status != want {
                            return Err(format!("{addr}{path}: {}", answer.status));
                        }
                    }
                }
                Ok(())
            }
        },
    )
    .await;

    // Requests through both workers: ids given by the caller, and none (until
    // both replicas have answered some of those), over REST and gRPC.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut answered: Vec<Answered> = Vec::new();
    for (via, addr) in addrs.iter().enumerate() {
        for i in 0..2 {
            let id = format!("client-{via}-{i}");
            let (id, classes) = infer_rest(addr, &auth, &mut rng, 1 + i, Some(&id)).await;
            answered.push(Answered { id, via, classes });
        }
    }
    let mut generated_by = [0usize; 2];
    let mut sent = 0;
    while generated_by.iter().any(|&n| n < 2) {
        assert!(sent < 60, "60 requests all went to one replica");
        let via = sent % 2;
        let (id, classes) = infer_rest(&addrs[via], &auth, &mut rng, 2, None).await;
        let by = prefixes
            .iter()
            .position(|p| id.starts_with(&format!("{p}-")))
            .unwrap_or_else(|| panic!("generated id {id} names no worker of {prefixes:?}"));
        generated_by[by] += 1;
        answered.push(Answered { id, via, classes });
        sent += 1;
    }
    let grpc = cluster.worker_flag("a", "--inference-grpc");
    for id in ["", "grpc-given"] {
        let (id, classes) = infer_grpc(&cluster, &grpc, &auth, &mut rng, id).await;
        answered.push(Answered {
            id,
            via: 0,
            classes,
        });
    }
    let ids: HashSet<&str> = answered.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids.len(), answered.len(), "ids are unique: {answered:?}");

    // Which worker remembers a generated id is in its prefix; a caller's id
    // may be on either, and any worker finds it.
    let remembered_by = |a: &Answered| {
        prefixes
            .iter()
            .position(|p| a.id.starts_with(&format!("{p}-")))
    };
    let mut right_rows = 0u64;
    let mut flip = false;
    let mut right = || {
        flip = !flip;
        flip
    };
    let mut to_a = Vec::new();
    let mut to_b = Vec::new();
    let mut labelled_rows = 0u64;
    for (nth, a) in answered.iter().enumerate() {
        let (item, correct) = item(a, nth, &mut right);
        right_rows += correct;
        labelled_rows += a.classes.len() as u64;
        // Ids worker b remembers go to a and the other way round, so each is
        // found through the other worker; the callers' ids go to the worker
        // their request did not go through.
        let send_to_a = match remembered_by(a) {
            Some(worker) => worker == 1,
            None => a.via == 1,
        };
        if send_to_a {
            to_a.push(item);
        } else {
            to_b.push(item);
        }
    }
    assert!(!to_a.is_empty() && !to_b.is_empty());

    // Bad bodies are refused whole, naming the problem; nothing is counted.
    let path = format!("/v2/models/{DEPLOYMENT}/feedback");
    let bad = post(
        &addrs[0],
        &path,
        &[("Authorization", &auth)],
        b"{\"feedback\": [",
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(
        bad.text().contains("parse the feedback body's JSON"),
        "{}",
        bad.text()
    );
    let (status, doc) = feedback(
        &addrs[0],
        &auth,
        &[],
        &json!({"feedback": [{"id": answered[0].id, "labels": [true]}]}),
    )
    .await;
    assert_eq!(status, 400, "{doc}");
    assert!(
        doc["error"]
            .as_str()
            .expect("error")
            .contains("label 0 is true"),
        "{doc}"
    );
    let missing = post(
        &addrs[0],
        "/v2/models/nowhere/feedback",
        &[("Authorization", &auth)],
        br#"{"feedback": []}"#,
    )
    .await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert!(
        missing.text().contains("nowhere is not deployed"),
        "{}",
        missing.text()
    );
    let anonymous = post(&addrs[0], &path, &[], br#"{"feedback": []}"#).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());

    // A forwarded call labels only what its worker remembers: it asks no one.
    let on_a = answered
        .iter()
        .find(|a| remembered_by(a) == Some(0))
        .expect("an id remembered on a");
    let (status, doc) = feedback(
        &addrs[1],
        &auth,
        &[("kiln-feedback-forwarded", "1")],
        &json!({"feedback": [{"id": on_a.id, "labels": vec![0; on_a.classes.len()]}]}),
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["matched"], 0, "{doc}");
    assert_eq!(doc["unknown"], json!([on_a.id]), "{doc}");

    // A label count that does not fit is rejected and the id stays remembered.
    let two_rows = answered
        .iter()
        .find(|a| a.classes.len() == 2)
        .expect("a request of two rows");
    let (status, doc) = feedback(
        &addrs[0],
        &auth,
        &[],
        &json!({"feedback": [{"id": two_rows.id, "label": 0}]}),
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["rejected"][0]["id"], json!(two_rows.id), "{doc}");
    let why = doc["rejected"][0]["error"].as_str().expect("error");
    assert!(why.contains("had 2 rows but 1 labels"), "{doc}");

    // Every label, through the worker that does not hold it, plus an unknown id.
    to_a.push(json!({"id": "never-sent", "label": 1}));
    let mut matched = 0;
    for (addr, items) in [(&addrs[0], &to_a), (&addrs[1], &to_b)] {
        let (status, doc) = feedback(addr, &auth, &[], &json!({ "feedback": items })).await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["rejected"], json!([]), "{doc}");
        matched += doc["matched"].as_u64().expect("matched");
        let unknown = if addr == &addrs[0] {
            json!(["never-sent"])
        } else {
            json!([])
        };
        assert_eq!(doc["unknown"], unknown, "{doc}");
    }
    assert_eq!(matched as usize, answered.len());

    // A label counts once: the same ids again are unknown everywhere.
    let (status, doc) = feedback(&addrs[1], &auth, &[], &json!({ "feedback": to_a })).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["matched"], 0, "{doc}");
    assert_eq!(
        doc["unknown"].as_array().map(Vec::len),
        Some(to_a.len()),
        "{doc}"
    );

    // Every coordinator shows the labelled rows and the share that was right.
    let admin = cluster.admin_token().await;
    let labels = format!("{{deployment=\"{DEPLOYMENT}\",model=\"{DEPLOYMENT}\",version=\"1\"}}");
    let accuracy = right_rows as f64 / labelled_rows as f64;
    assert!(right_rows > 0 && right_rows < labelled_rows);
    let mut figures: HashMap<u64, (u64, f64)> = HashMap::new();
    for id in cluster.coordinator_ids() {
        let addr = cluster.http_addr(id);
        let seen =
            kiln_tests::wait_for(Duration::from_secs(30), "live accuracy on /metrics", || {
                let (addr, admin, labels) = (&addr, &admin, &labels);
                async move {
                    let (status, text) = kiln_tests::http_get(addr, "/metrics", Some(admin)).await;
                    if status != 200 {
                        return Err(format!("status {status}"));
                    }
                    let value = |family: &str| {
                        let prefix = format!("{family}{labels} ");
                        text.lines()
                            .find_map(|l| l.strip_prefix(&prefix))
                            .and_then(|v| v.parse::<f64>().ok())
                    };
                    match (
                        value("kiln_serving_labelled"),
                        value("kiln_serving_accuracy"),
                    ) {
                        (Some(n), Some(share)) if n as u64 == labelled_rows => {
                            Ok((n as u64, share))
                        }
                        other => Err(format!("labelled and accuracy {other:?}")),
                    }
                }
            })
            .await;
        figures.insert(id, seen);
    }
    for (id, (n, share)) in figures {
        assert_eq!(n, labelled_rows, "coordinator {id}");
        assert!(
            (share - accuracy).abs() < 1e-9,
            "coordinator {id}: {share} against {accuracy}"
        );
    }

    // The workers say how much they still remember: nothing, every id was
    // labelled.
    let viewer = cluster
        .create_token("looker", kiln_proto::v1::Role::Viewer, 0)
        .await;
    for addr in &addrs {
        kiln_tests::wait_for(Duration::from_secs(10), "worker metrics", || {
            let (addr, viewer) = (addr, &viewer);
            async move {
                let (status, text) = kiln_tests::http_get(addr, "/metrics", Some(viewer)).await;
                if status != 200 {
                    return Err(format!("status {status}: {text}"));
                }
                text.contains("\nkiln_feedback_remembered_requests 0\n")
                    .then_some(())
                    .ok_or(text)
            }
        })
        .await;
    }
    cluster.assert_healthy();
}
