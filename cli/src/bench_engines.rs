//! `kiln bench engines`: tract against ONNX Runtime on every exported model
//! (the files of scripts/export_models.py and their `<model>.expected.json`
//! samples): whether each engine loads the model (or its reason), the median
//! time of one run of the sample on the calling thread, and how far its answers
//! are from onnxruntime's in Python on the same sample.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use kiln_worker::serving::engine::{Batching, Engine, EngineConfig, EngineKind, ModelFiles};
use kiln_worker::serving::protocol::parse_rest_request;
use kiln_worker::serving::{split_bytes, DataType, Tensor};
use serde_json::{json, Value};

/// Most runs of one sample on one engine.
const MAX_RUNS: usize = 10_000;

#[derive(Debug, serde::Serialize)]
pub struct EngineRow {
    pub engine: &'static str,
    /// Why the engine does not serve the model; empty when it does.
    pub refused: String,
    /// Median milliseconds of one run of the sample.
    pub p50_ms: f64,
    pub runs: usize,
    /// The largest absolute difference of a numeric answer from onnxruntime's
    /// in Python, and how many string answers differ.
    pub max_abs_diff: f64,
    pub strings_differing: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct ModelRows {
    pub model: String,
    /// Rows in the sample.
    pub rows: usize,
    pub engines: Vec<EngineRow>,
}

#[derive(Debug, serde::Serialize)]
pub struct EnginesReport {
    pub threads: usize,
    pub onnxruntime: String,
    pub models: Vec<ModelRows>,
}

impl crate::bench::Table for EnginesReport {
    fn print_table(&self) {
        println!(
            "one run of each model's sample on the calling thread, {} thread(s); onnxruntime: {}",
            self.threads, self.onnxruntime
        );
        println!("| model | rows | tract p50 ms | onnxruntime p50 ms | tract / onnxruntime | max abs diff from onnxruntime in Python (tract; onnxruntime) |");
        println!("|---|---:|---:|---:|---:|---|");
        for m in &self.models {
            let cell = |engine: &str| {
                m.engines
                    .iter()
                    .find(|e| e.engine == engine)
                    .map_or("-".to_string(), |e| {
                        if e.refused.is_empty() {
                            format!("{:.3}", e.p50_ms)
                        } else {
                            format!("refused: {}", short(&e.refused))
                        }
                    })
            };
            let time = |engine: &str| {
                m.engines
                    .iter()
                    .find(|e| e.engine == engine && e.refused.is_empty())
                    .map(|e| e.p50_ms)
            };
            let ratio = match (time("tract"), time("onnxruntime")) {
                (Some(t), Some(o)) if o > 0.0 => format!("{:.2}x", t / o),
                _ => "-".into(),
            };
            let diffs: Vec<String> = m
                .engines
                .iter()
                .filter(|e| e.refused.is_empty())
                .map(|e| {
                    let strings = if e.strings_differing > 0 {
                        format!(", {} string(s) differ", e.strings_differing)
                    } else {
                        String::new()
                    };
                    format!("{}: {:.1e}{strings}", e.engine, e.max_abs_diff)
                })
                .collect();
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                m.model,
                m.rows,
                cell("tract"),
                cell("onnxruntime"),
                ratio,
                diffs.join("; ")
            );
        }
    }
}

/// The first clause of a refusal, for a table cell.
fn short(reason: &str) -> String {
    let reason = reason.strip_prefix("invalid argument: ").unwrap_or(reason);
    let first = reason.split([';', '\n']).next().unwrap_or(reason);
    let mut text: String = first.chars().take(90).collect();
    if text.len() < first.len() {
        text.push('…');
    }
    text.replace('|', "/")
}

/// The models of an export directory: each `<model>.expected.json`, also one
/// level down (a model saved with external data lives in its own directory).
fn samples(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    for sub in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = sub?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    for d in dirs {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".expected.json"))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The sample's inputs as a KServe v2 JSON request, read by the worker's own
/// parser.
fn sample_inputs(doc: &Value) -> anyhow::Result<Vec<Tensor>> {
    let inputs: Vec<Value> = doc["inputs"]
        .as_array()
        .context("the sample has no inputs")?
        .iter()
        .map(|t| {
            let datatype = kserve_datatype(t["dtype"].as_str().unwrap_or_default())?;
            Ok(json!({
                "name": t["name"], "shape": t["shape"], "datatype": datatype, "data": t["data"],
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    let body = Bytes::from(serde_json::to_vec(&json!({ "inputs": inputs }))?);
    Ok(parse_rest_request(&body, None)
        .map_err(|e| anyhow::anyhow!("the sample's inputs: {e}"))?
        .inputs)
}

fn kserve_datatype(dtype: &str) -> anyhow::Result<&'static str> {
    Ok(match dtype {
        "float32" => "FP32",
        "float16" => "FP16",
        "float64" => "FP64",
        "int64" => "INT64",
        "int32" => "INT32",
        "string" => "BYTES",
        other => anyhow::bail!("the sample has a {other} tensor"),
    })
}

/// One expected output: numbers (a ZipMap's maps as `[rows, classes]` in the
/// maps' order), or strings.
enum Want {
    Numbers(Vec<f64>),
    Strings(Vec<String>),
}

fn wanted(doc: &Value) -> Want {
    let data = doc["data"].as_array().cloned().unwrap_or_default();
    if doc["type"]
        .as_str()
        .is_some_and(|t| t.starts_with("seq(map("))
    {
        return Want::Numbers(
            data.iter()
                .flat_map(|row| row.as_array().cloned().unwrap_or_default())
                .filter_map(|pair| pair[1].as_f64())
                .collect(),
        );
    }
    if doc["dtype"] == "string" {
        return Want::Strings(
            data.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
        );
    }
    Want::Numbers(data.iter().filter_map(Value::as_f64).collect())
}

/// The largest numeric difference and the count of differing strings between
/// an engine's outputs and the expected ones, matched by name; an output that is
/// missing, of another length, or not a number where one is expected is an
/// error, never a small difference.
fn compare(got: &[Tensor], names: &[String], expected: &[Value]) -> Result<(f64, usize), String> {
    let mut worst = 0.0f64;
    let mut strings = 0;
    for want in expected {
        let name = want["name"].as_str().unwrap_or_default();
        let tensor = names
            .iter()
            .position(|n| n == name)
            .and_then(|i| got.get(i))
            .ok_or_else(|| format!("no output {name:?}"))?;
        match wanted(want) {
            Want::Numbers(values) => {
                let got = tensor.values_f64();
                if got.len() != values.len() {
                    return Err(format!(
                        "output {name:?} has {} values, onnxruntime's {}",
                        got.len(),
                        values.len()
                    ));
                }
                for (g, w) in got.iter().zip(&values) {
                    let diff = (g - w).abs();
                    if diff.is_nan() {
                        return Err(format!("output {name:?} has {g} where onnxruntime has {w}"));
                    }
                    worst = worst.max(diff);
                }
            }
            Want::Strings(values) => {
                if tensor.datatype != DataType::Bytes {
                    return Err(format!("output {name:?} is not strings"));
                }
                let got = split_bytes(&tensor.data).map_err(|e| format!("output {name:?}: {e}"))?;
                if got.len() != values.len() {
                    return Err(format!(
                        "output {name:?} has {} strings, onnxruntime's {}",
                        got.len(),
                        values.len()
                    ));
                }
                strings += got
                    .iter()
                    .zip(&values)
                    .filter(|(g, w)| **g != w.as_bytes())
                    .count();
            }
        }
    }
    Ok((worst, strings))
}

fn measure(
    files: &ModelFiles,
    kind: EngineKind,
    inputs: &[Tensor],
    expected: &[Value],
    threads: usize,
    seconds: f64,
) -> EngineRow {
    let config = EngineConfig {
        engine: Some(kind),
        threads,
        max_batch_size: 4096,
        // Declared off: each run is the whole sample, as the sample came.
        batching: Batching::Off,
        ..EngineConfig::default()
    };
    let refused = |reason: String| EngineRow {
        engine: kind.name(),
        refused: reason,
        p50_ms: 0.0,
        runs: 0,
        max_abs_diff: 0.0,
        strings_differing: 0,
    };
    let engine = match Engine::load_files(files, "bench", config) {
        Ok(engine) => engine,
        Err(e) => return refused(e.to_string()),
    };
    let names: Vec<String> = engine
        .signature()
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .collect();
    let first = match engine.run_batch_blocking(inputs.to_vec()) {
        Ok(outputs) => outputs,
        Err(e) => return refused(format!("the sample does not run: {e}")),
    };
    let (max_abs_diff, strings_differing) = match compare(&first, &names, expected) {
        Ok(diff) => diff,
        Err(why) => return refused(format!("answers unlike onnxruntime's: {why}")),
    };
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs_f64(seconds) && times.len() < MAX_RUNS {
        let run = Instant::now();
        if let Err(e) = engine.run_batch_blocking(inputs.to_vec()) {
            return refused(format!("a run failed: {e}"));
        }
        times.push(run.elapsed().as_secs_f64() * 1e3);
    }
    engine.shutdown();
    times.sort_by(f64::total_cmp);
    EngineRow {
        engine: kind.name(),
        refused: String::new(),
        p50_ms: times.get(times.len() / 2).copied().unwrap_or(0.0),
        runs: times.len(),
        max_abs_diff,
        strings_differing,
    }
}

/// Measures both engines on every model under `dir`, with ONNX Runtime from
/// `library` (or the worker's default directory).
pub fn engines(dir: &Path, library: Option<&Path>, seconds: f64) -> anyhow::Result<EnginesReport> {
    let loaded = kiln_worker::serving::engine::onnxruntime::init(library)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .context("no ONNX Runtime library: pass --onnxruntime-lib")?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut models = Vec::new();
    for sample in samples(dir)? {
        let doc: Value = serde_json::from_slice(&std::fs::read(&sample)?)
            .with_context(|| format!("parse {}", sample.display()))?;
        // The sample names its model relative to the export directory.
        let file = dir.join(doc["model"].as_str().context("the sample names no model")?);
        let files = ModelFiles::read(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
        let inputs = sample_inputs(&doc)?;
        let expected = doc["outputs"].as_array().cloned().unwrap_or_default();
        let rows = inputs
            .first()
            .and_then(|t| t.shape.first())
            .copied()
            .unwrap_or(0);
        let name = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        eprintln!("bench engines: {name}");
        let engines = [EngineKind::Tract, EngineKind::OnnxRuntime]
            .into_iter()
            .map(|kind| measure(&files, kind, &inputs, &expected, threads, seconds))
            .collect();
        models.push(ModelRows {
            model: name,
            rows,
            engines,
        });
    }
    Ok(EnginesReport {
        threads,
        onnxruntime: loaded.display().to_string(),
        models,
    })
}
