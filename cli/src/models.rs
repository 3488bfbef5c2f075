//! `kiln models ls | show NAME[@VERSION] | register --onnx FILE --name NAME |
//! alias NAME VERSION ALIAS`: the model registry.

use std::sync::Arc;

use anyhow::Context;
use kiln_common::client::ClusterClient;
use kiln_proto::v1::{
    GetModelRequest, ListModelsRequest, ModelVersion, RegisterModelRequest, SetModelAlias,
    SetModelAliasRequest,
};
use kiln_worker::serving::engine::signature_of;
use kiln_worker::train::shard::{model_artifact, MODEL_FILE};
use kiln_worker::transfer::{self, PushOptions};
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
        "created_at_ms": m.created_at_ms,
        "created_by": m.created_by,
    })
}

/// Checks an ONNX file with tract, pushes it as the next version of the model's
/// artifact and registers it with the signature tract read.
async fn register(
    client: ClusterClient,
    onnx: &std::path::Path,
    name: &str,
) -> anyhow::Result<ModelVersion> {
    kiln_common::artifact::validate_name(name)?;
    let bytes = std::fs::read(onnx).with_context(|| format!("read {}", onnx.display()))?;
    let signature = tokio::task::spawn_blocking(move || signature_of(&bytes))
        .await
        .context("join the model check")?
        .map_err(|e| anyhow::anyhow!("{} cannot be served: {e}", onnx.display()))?;
    // The artifact holds model.onnx, as the versions training registers do.
    let staging = tempfile::tempdir().context("make a staging directory")?;
    std::fs::copy(onnx, staging.path().join(MODEL_FILE))
        .with_context(|| format!("copy {}", onnx.display()))?;
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

/// `kiln models ...`.
pub async fn run(client: ClusterClient, command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Register { onnx, name, json } => {
            let model = register(client, &onnx, &name).await?;
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
