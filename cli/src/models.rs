//! `kiln models ls | show NAME[@VERSION] | register --onnx FILE|DIR --name NAME |
//! alias NAME VERSION ALIAS`: the model registry.

use std::sync::Arc;

use anyhow::Context;
use kiln_common::artifact::model_artifact;
use kiln_common::client::ClusterClient;
use kiln_common::reference::ReferenceStats;
use kiln_common::transfer::{self, PushOptions};
use kiln_proto::v1::{
    GetModelRequest, ListModelsRequest, ModelVersion, RegisterModelRequest, SetModelAlias,
    SetModelAliasRequest,
};
use kiln_worker::serving::engine::{registration, Engine, EngineConfig, ModelFiles};
use kiln_worker::serving::{DataType, Tensor};
use kiln_worker::train::data::read_csv;
use kiln_worker::train::shard::{MODEL_FILE, REFERENCE_FILE};
use serde_json::{json, Value};

use crate::ModelsCommand;

fn model_json(m: &ModelVersion) -> Value {
    let tensors = |specs: &[kiln_proto::v1::TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect()
    };
    json!({
        "name": m.name,
        "version": m.version,
        "artifact": m.artifact,
        "run_id": m.run_id,
        "job_id": m.job_id,
        "dataset": m.dataset,
        "spec_digest": m.spec_digest,
        "metrics": m.metrics.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "inputs": tensors(&m.inputs),
        "outputs": tensors(&m.outputs),
        "classes": m.classes,
        "features": m.features,
        "monitored": !m.reference.is_empty(),
        "source": m.source,
        "model_id": m.model_id,
        "description": m.description,
        "tags": m.tags.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "refused_engines": m.refused_engines.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "deployable": m.undeployable.is_empty(),
        "undeployable": m.undeployable,
        "created_at_ms": m.created_at_ms,
        "created_by": m.created_by,
    })
}

/// Most values (rows × features) `--reference-data` may hold.
const MAX_REFERENCE_VALUES: usize = 100_000_000;
/// Rows per inference when the model answers the reference data.
const REFERENCE_BATCH: usize = 256;

/// The drift reference of a model from the data it was trained on: every feature
/// column of the CSV (all but `label`), then every column of the model's answers.
fn reference_from_csv(
    model: &ModelFiles,
    csv: &std::path::Path,
    label: &str,
) -> anyhow::Result<(ReferenceStats, Vec<String>)> {
    let file = std::fs::File::open(csv).with_context(|| format!("open {}", csv.display()))?;
    let data = read_csv(std::io::BufReader::new(file), label, &[])
        .map_err(|e| anyhow::anyhow!("{}: {e}", csv.display()))?;
    anyhow::ensure!(
        data.x.len() <= MAX_REFERENCE_VALUES,
        "{} holds {} values; the reference data may hold at most {MAX_REFERENCE_VALUES}",
        csv.display(),
        data.x.len()
    );
    let engine = Engine::load_files(
        model,
        "reference",
        EngineConfig {
            max_batch_size: REFERENCE_BATCH,
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .map_err(|e| anyhow::anyhow!("load the model: {e}"))?;
    let reference = reference_of_model(&engine, &data.features, &data.x)
        .with_context(|| format!("the reference data {}", csv.display()));
    engine.shutdown();
    Ok((reference?, data.features))
}

/// The reference of a model on row-major inputs `x` (rows of `features.len()`
/// values): those columns, then the columns of the model's answers (`output`, or
/// `output:<j>` for several), run through `engine` in batches of at most its
/// max batch size. The model must take the features as one FP32
/// `[-1, features]` input and answer with an FP32 `[-1, k]` output.
pub fn reference_of_model(
    engine: &Engine,
    features: &[String],
    x: &[f32],
) -> anyhow::Result<ReferenceStats> {
    let d = features.len();
    let signature = engine.signature();
    let input = signature
        .inputs
        .iter()
        .find(|s| s.datatype == DataType::Fp32 && s.shape.len() == 2 && s.shape[1] == d as i64)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the model takes no FP32 input of shape [-1, {d}] for the {d} feature columns ({})",
                features.join(", ")
            )
        })?;
    anyhow::ensure!(
        signature.inputs.len() == 1,
        "the model takes {} inputs; a reference from one table needs a model of one input",
        signature.inputs.len()
    );
    let output = signature
        .outputs
        .iter()
        .find(|s| s.datatype == DataType::Fp32 && s.shape.len() == 2 && s.shape[1] > 0)
        .ok_or_else(|| anyhow::anyhow!("the model gives no FP32 output of shape [-1, k]"))?;
    let k = output.shape[1] as usize;
    let batch = engine.config().max_batch_size.max(1);
    let mut answers: Vec<f32> = Vec::with_capacity(x.len() / d.max(1) * k);
    for rows in x.chunks(batch * d.max(1)) {
        let tensor = Tensor {
            name: input.name.clone(),
            datatype: DataType::Fp32,
            shape: vec![rows.len() / d.max(1), d],
            data: rows
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        };
        let outputs = engine
            .run_batch_blocking(vec![tensor])
            .map_err(|e| anyhow::anyhow!("run the model: {e}"))?;
        let answer = outputs
            .iter()
            .find(|t| t.name == output.name)
            .ok_or_else(|| anyhow::anyhow!("the model did not give output {}", output.name))?;
        answers.extend(
            answer
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    let outputs: Vec<String> = match k {
        1 => vec!["output".to_string()],
        _ => (0..k).map(|j| format!("output:{j}")).collect(),
    };
    Ok(ReferenceStats::from_rows(features, x, &outputs, &answers))
}

/// Checks an ONNX file with the preferred engine, pushes it (with its drift reference, when the
/// training data is given) as the next version of the model's artifact and
/// registers it with the signature the engine read.
async fn register(
    client: ClusterClient,
    onnx: &std::path::Path,
    name: &str,
    reference_data: Option<(std::path::PathBuf, String)>,
) -> anyhow::Result<ModelVersion> {
    kiln_common::artifact::validate_name(name)?;
    let onnx = model_file(onnx)?;
    let path = onnx.clone();
    let model = tokio::task::spawn_blocking(move || ModelFiles::read(&path))
        .await
        .context("join the model read")??;
    let checked = model.clone();
    let registered = tokio::task::spawn_blocking(move || registration(&checked))
        .await
        .context("join the model check")?
        .map_err(|e| anyhow::anyhow!("{} cannot be served: {e}", onnx.display()))?;
    let signature = registered.signature;
    // The artifact holds model.onnx (and reference.json), as the versions
    // training registers do, and the external data files beside it under the
    // names the model gives them.
    let staging = tempfile::tempdir().context("make a staging directory")?;
    std::fs::write(staging.path().join(MODEL_FILE), &model.onnx)
        .with_context(|| format!("copy {}", onnx.display()))?;
    for (location, data) in &model.external {
        anyhow::ensure!(
            location != MODEL_FILE && location != REFERENCE_FILE,
            "the model keeps tensors in {location}, a name the registry keeps for its own file; \
             save the external data under another name"
        );
        let target = staging.path().join(location);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("make {}", parent.display()))?;
        }
        std::fs::write(&target, data).with_context(|| format!("copy {location}"))?;
    }
    let (reference, features) = match reference_data {
        Some((csv, label)) => {
            let (reference, features) =
                tokio::task::spawn_blocking(move || reference_from_csv(&model, &csv, &label))
                    .await
                    .context("join the reference computation")??;
            std::fs::write(
                staging.path().join(REFERENCE_FILE),
                serde_json::to_vec_pretty(&reference)?,
            )
            .context("write the reference")?;
            (reference.to_proto(), features)
        }
        None => (Vec::new(), Vec::new()),
    };
    let client = Arc::new(client);
    let pushed = transfer::push(
        Arc::clone(&client),
        staging.path(),
        PushOptions {
            name: model_artifact(name),
            tags: vec![],
            replicas: 0,
            parents: vec![],
            produced_by: String::new(),
            media_type: "application/onnx".into(),
            metadata: Default::default(),
            quiet: true,
        },
    )
    .await?;
    let model = ModelVersion {
        name: name.to_string(),
        artifact: format!("{}@{}", pushed.name, pushed.version),
        inputs: signature.inputs.iter().map(|s| s.to_proto()).collect(),
        outputs: signature.outputs.iter().map(|s| s.to_proto()).collect(),
        features,
        reference,
        refused_engines: registered
            .refused
            .into_iter()
            .map(|(kind, why)| (kind.name().to_string(), why))
            .collect(),
        ..Default::default()
    };
    let request = RegisterModelRequest {
        model: Some(model.clone()),
    };
    let version = client
        .call(|mut c| {
            let request = request.clone();
            async move { c.register_model(request).await.map(|r| r.into_inner()) }
        })
        .await?
        .version;
    Ok(ModelVersion { version, ..model })
}

/// The ONNX file `--onnx` names: the file itself, or the one `.onnx` file of a
/// directory (which holds the model and its external data files).
fn model_file(path: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("read {}", path.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => anyhow::bail!("{} holds no .onnx file", path.display()),
        _ => anyhow::bail!(
            "{} holds {} .onnx files ({}); name the model's file with --onnx",
            path.display(),
            found.len(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `kiln models ...`.
pub async fn run(client: ClusterClient, command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Register {
            onnx,
            onnxruntime_lib,
            name,
            reference_data,
            label,
            json,
        } => {
            let reference = reference_data.zip(label);
            kiln_worker::serving::engine::onnxruntime::init(onnxruntime_lib.as_deref())?;
            let model = register(client, &onnx, &name, reference).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&model_json(&model))?);
            } else {
                println!(
                    "registered {}@{} ({})",
                    model.name, model.version, model.artifact
                );
            }
            Ok(())
        }
        ModelsCommand::Alias {
            name,
            version,
            alias,
        } => {
            let request = SetModelAliasRequest {
                alias: Some(SetModelAlias {
                    name: name.clone(),
                    alias: alias.clone(),
                    version,
                }),
            };
            client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.set_model_alias(request).await.map(|r| r.into_inner()) }
                })
                .await?;
            println!("{name}@{alias} is {name}@{version}");
            Ok(())
        }
        ModelsCommand::Ls { json } => {
            let models = client
                .call(|mut c| async move {
                    c.list_models(ListModelsRequest {})
                        .await
                        .map(|r| r.into_inner())
                })
                .await?
                .models;
            if json {
                let docs: Vec<Value> = models.iter().map(model_json).collect();
                println!("{}", serde_json::to_string_pretty(&docs)?);
                return Ok(());
            }
            println!(
                "{:<24} {:>7} {:<28} {:<24}  METRICS",
                "NAME", "LATEST", "ARTIFACT", "DATASET"
            );
            for m in &models {
                let mut metrics: Vec<String> = m
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k}={v:.4}"))
                    .collect();
                metrics.sort();
                println!(
                    "{:<24} {:>7} {:<28} {:<24}  {}",
                    m.name,
                    m.version,
                    m.artifact,
                    m.dataset,
                    metrics.join(" ")
                );
                if !m.undeployable.is_empty() {
                    println!("{:<24} cannot be deployed: {}", "", m.undeployable);
                }
            }
            Ok(())
        }
        ModelsCommand::Show { model, json } => {
            let (name, version) = match model.split_once('@') {
                Some((n, v)) => (
                    n.to_string(),
                    v.parse::<u64>()
                        .with_context(|| format!("{model}: the version must be a number"))?,
                ),
                None => (model.clone(), 0),
            };
            let request = GetModelRequest {
                name,
                version,
                all_versions: true,
            };
            let resp = client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.get_model(request).await.map(|r| r.into_inner()) }
                })
                .await?;
            let m = resp.model.context("the coordinators sent no model")?;
            let aliases: std::collections::BTreeMap<&String, &u64> = resp.aliases.iter().collect();
            if json {
                let mut doc = model_json(&m);
                doc["versions"] = resp.versions.iter().map(model_json).collect();
                doc["aliases"] = json!(aliases);
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            println!("model {}@{} ({})", m.name, m.version, m.artifact);
            println!(
                "lineage:  run {} job {} dataset {}",
                m.run_id, m.job_id, m.dataset
            );
            println!("spec:     {}", m.spec_digest);
            for t in &m.inputs {
                println!("input:    {} {} {:?}", t.name, t.datatype, t.shape);
            }
            for t in &m.outputs {
                println!("output:   {} {} {:?}", t.name, t.datatype, t.shape);
            }
            if !m.classes.is_empty() {
                println!("classes:  {}", m.classes.join(", "));
            }
            let refused: std::collections::BTreeMap<_, _> = m.refused_engines.iter().collect();
            for (engine, why) in refused {
                println!("engine:   {engine} cannot serve it: {why}");
            }
            let mut metrics: Vec<(&String, &f64)> = m.metrics.iter().collect();
            metrics.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in metrics {
                println!("metric:   {k} = {v:.5}");
            }
            for (alias, version) in &aliases {
                println!("alias:    {alias} -> {version}");
            }
            println!("versions: {}", resp.versions.len());
            Ok(())
        }
    }
}
