//! `kiln models ls | show NAME[@VERSION]`: the model registry.

use anyhow::Context;
use kiln_common::client::ClusterClient;
use kiln_proto::v1::{GetModelRequest, ListModelsRequest, ModelVersion};
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

/// `kiln models ...`.
pub async fn run(client: ClusterClient, command: ModelsCommand) -> anyhow::Result<()> {
    match command {
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
            if json {
                let mut doc = model_json(&m);
                doc["versions"] = resp.versions.iter().map(model_json).collect();
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
            println!("versions: {}", resp.versions.len());
            Ok(())
        }
    }
}
