//! The training job spec (DESIGN §6), read from TOML and checked whole: every
//! unknown key, wrong type and bad value is reported at once, each naming its key,
//! so that a user fixes a spec in one pass.
//!
//! ```toml
//! name = "iris-mlp"
//! experiment = "iris"
//! priority = 0            # higher runs first
//! max_failures = 3        # gang restarts before the job fails
//!
//! [data]
//! artifact = "iris@3"     # NAME@VERSION (a number: the exact bytes)
//! format = "csv"          # csv | parquet
//! label = "species"
//! features = ["sepal_length", "sepal_width"]   # default: every other column
//!
//! [model]
//! kind = "mlp"            # mlp | linear
//! hidden = [64, 32]
//! activation = "relu"     # relu | gelu | tanh
//!
//! [optimizer]
//! kind = "adamw"          # sgd | adamw
//! lr = 0.001
//! momentum = 0.9          # sgd only
//! weight_decay = 0.01
//!
//! [train]
//! epochs = 20
//! batch_size = 64         # global, split across shards
//! seed = 42
//! checkpoint_every_steps = 100
//!
//! [resources]
//! shards = 2
//! cpus_per_shard = 1
//! gpus_per_shard = 0
//! memory_mib_per_shard = 0 # held on the worker while a shard runs; 0: not counted
//! ```

use std::fmt;

use serde::Serialize;
use toml::{Table, Value};

use crate::artifact::{parse_reference, Selector};

/// Data formats a trainer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Csv,
    Parquet,
}

impl DataFormat {
    /// The file name extension of the format, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            DataFormat::Csv => "csv",
            DataFormat::Parquet => "parquet",
        }
    }
}

/// Model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Linear,
    Mlp,
}

/// Hidden-layer activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Gelu,
    Tanh,
}

/// Optimizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adamw,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataSpec {
    /// The artifact's name and exact version.
    pub artifact: String,
    pub version: u64,
    pub format: DataFormat,
    pub label: String,
    /// Empty: every column but the label.
    pub features: Vec<String>,
}

impl DataSpec {
    /// The files of a dataset version a trainer reads, in path order: those named
    /// with the format's extension, or the only file of a one-file version. Every
    /// file must have the same columns; their rows are read one after another.
    pub fn files<'a>(&self, paths: &[&'a str]) -> Vec<&'a str> {
        let suffix = format!(".{}", self.format.extension());
        let mut chosen: Vec<&'a str> = paths
            .iter()
            .copied()
            .filter(|p| p.to_ascii_lowercase().ends_with(&suffix))
            .collect();
        if chosen.is_empty() && paths.len() == 1 {
            chosen.push(paths[0]);
        }
        chosen.sort_unstable();
        chosen
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub kind: ModelKind,
    pub hidden: Vec<u32>,
    pub activation: Activation,
}

/// `[optimizer]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimizerSpec {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSpec {
    pub epochs: u32,
    /// Global batch: the shards split it.
    pub batch_size: u32,
    pub seed: u64,
    /// 0: only at the end.
    pub checkpoint_every_steps: u64,
}

/// `[resources]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceSpec {
    pub shards: u32,
    pub cpus_per_shard: u32,
    pub gpus_per_shard: u32,
    /// MiB of the worker's memory a shard holds while it runs (0: not counted,
    /// as Ray's default `memory` request).
    pub memory_mib_per_shard: u64,
}

/// Largest `memory_mib_per_shard`: 64 TiB.
pub const MAX_MEMORY_MIB: i64 = 64 << 20;

/// A checked job spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSpec {
    pub name: String,
    pub experiment: String,
    pub priority: i32,
    pub max_failures: u32,
    pub data: DataSpec,
    pub model: ModelSpec,
    pub optimizer: OptimizerSpec,
    pub train: TrainSpec,
    pub resources: ResourceSpec,
}

/// Everything wrong with a spec, one line per problem.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecErrors(pub Vec<String>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the job spec has {} problem(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Most shards a job may ask for.
pub const MAX_SHARDS: u32 = 1024;

/// Reads a table's keys, remembering which were used, and collects problems.
struct Reader<'a> {
    table: &'a Table,
    section: &'static str,
    used: Vec<&'static str>,
    errors: &'a mut Vec<String>,
}

impl<'a> Reader<'a> {
    fn key(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.section)
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.push(key);
        self.table.get(key)
    }

    fn string(&mut self, key: &'static str, default: Option<&str>) -> Option<String> {
        match self.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(Value::String(_)) => {
                let k = self.key(key);
                self.errors.push(format!("{k} is empty"));
                None
            }
            Some(other) => {
                let k = self.key(key);
                self.errors
                    .push(format!("{k} must be a string, not {}", other.type_str()));
                None
            }
            None => match default {
                Some(d) => Some(d.to_string()),
                None => {
                    let k = self.key(key);
                    self.errors.push(format!("{k} is required"));
                    None
                }
            },
        }
    }

    fn integer(
        &mut self,
        key: &'static str,
        default: Option<i64>,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let value = match self.get(key) {
            Some(Value::Integer(n)) => *n,
            Some(other) => {
                let k = self.key(key);
                self.errors
                    .push(format!("{k} must be an integer, not {}", other.type_str()));
                return None;
            }
            None => match default {
                Some(d) => return Some(d),
                None => {
                    let k = self.key(key);
                    self.errors.push(format!("{k} is required"));
                    return None;
                }
            },
        };
        if value < min || value > max {
            let k = self.key(key);
            self.errors
                .push(format!("{k} = {value} is out of range {min}..={max}"));
            return None;
        }
        Some(value)
    }

    fn float(&mut self, key: &'static str, default: f64, min: f64, max: f64) -> Option<f64> {
        let value = match self.get(key) {
            Some(Value::Float(x)) => *x,
            Some(Value::Integer(n)) => *n as f64,
            Some(other) => {
                let k = self.key(key);
                self.errors
                    .push(format!("{k} must be a number, not {}", other.type_str()));
                return None;
            }
            None => return Some(default),
        };
        if !value.is_finite() || value < min || value > max {
            let k = self.key(key);
            self.errors
                .push(format!("{k} = {value} is out of range {min}..={max}"));
            return None;
        }
        Some(value)
    }

    fn choice<T: Copy>(
        &mut self,
        key: &'static str,
        default: Option<&str>,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(key, default)?;
        match options.iter().find(|(name, _)| *name == text) {
            Some((_, value)) => Some(*value),
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                let k = self.key(key);
                self.errors.push(format!(
                    "{k} = \"{text}\" is not one of {}",
                    names.join(", ")
                ));
                None
            }
        }
    }

    fn strings(&mut self, key: &'static str) -> Option<Vec<String>> {
        self.array(key, "a non-empty string", |v| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        })
    }

    fn sizes(&mut self, key: &'static str) -> Option<Vec<u32>> {
        self.array(key, "a layer width from 1 to 65536", |v| match v {
            Value::Integer(n) if (1..=65_536).contains(n) => Some(*n as u32),
            _ => None,
        })
    }

    /// Reads an array whose items `convert` accepts (absent: empty), naming the
    /// first item it refuses as not `what`.
    fn array<T>(
        &mut self,
        key: &'static str,
        what: &str,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = match self.get(key) {
            None => return Some(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => {
                let k = self.key(key);
                self.errors
                    .push(format!("{k} must be an array, not {}", other.type_str()));
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match convert(item) {
                Some(v) => out.push(v),
                None => {
                    let k = self.key(key);
                    self.errors
                        .push(format!("{k}[{i}] must be {what}, not {item}"));
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Reports every key of the table that no reader asked for.
    fn finish(self) {
        for key in self.table.keys() {
            if !self.used.contains(&key.as_str()) {
                let k = self.key(key);
                self.errors.push(format!("unknown key {k}"));
            }
        }
    }
}

/// Returns the sub-table `name` of `root`, reporting a wrong type.
fn section<'a>(root: &'a Table, name: &str, errors: &mut Vec<String>) -> Option<&'a Table> {
    match root.get(name) {
        Some(Value::Table(t)) => Some(t),
        Some(other) => {
            errors.push(format!(
                "[{name}] must be a table, not {}",
                other.type_str()
            ));
            None
        }
        None => None,
    }
}

impl JobSpec {
    /// Parses and checks a spec; the error lists every problem found.
    pub fn parse(text: &str) -> Result<JobSpec, SpecErrors> {
        let root: Table = text.parse().map_err(|e: toml::de::Error| {
            SpecErrors(vec![format!("not valid TOML: {}", e.message())])
        })?;
        let mut errors = Vec::new();
        // Stands for a section the spec leaves out: its keys take their defaults.
        let empty = Table::new();
        let sections = ["data", "model", "optimizer", "train", "resources"];

        let mut top = Reader {
            table: &root,
            section: "",
            used: sections.to_vec(),
            errors: &mut errors,
        };
        let name = top.string("name", None);
        let experiment = top.string("experiment", Some("default"));
        let priority = top.integer("priority", Some(0), -1000, 1000);
        let max_failures = top.integer("max_failures", Some(3), 0, 100);
        top.finish();
        if let Some(n) = &name {
            if let Err(e) = crate::artifact::validate_name(n) {
                errors.push(format!("name: {e}"));
            }
        }

        let data_table = section(&root, "data", &mut errors);
        if data_table.is_none() && root.get("data").is_none() {
            errors.push("[data] is required".into());
        }
        let mut r = Reader {
            table: data_table.unwrap_or(&empty),
            section: "data",
            used: Vec::new(),
            errors: &mut errors,
        };
        let artifact = if data_table.is_some() {
            r.string("artifact", None)
        } else {
            None
        };
        let format = r.choice(
            "format",
            Some("csv"),
            &[("csv", DataFormat::Csv), ("parquet", DataFormat::Parquet)],
        );
        let label = if data_table.is_some() {
            r.string("label", None)
        } else {
            None
        };
        let features = r.strings("features");
        r.finish();
        let artifact = artifact.and_then(|a| match parse_reference(&a) {
            Ok((name, Selector::Version(v))) => Some((name, v)),
            Ok(_) => {
                errors.push(format!(
                    "data.artifact = \"{a}\" must name an exact version, NAME@NUMBER, so that the run records the bytes it learned from"
                ));
                None
            }
            Err(e) => {
                errors.push(format!("data.artifact: {e}"));
                None
            }
        });
        if let (Some(label), Some(features)) = (&label, &features) {
            if features.contains(label) {
                errors.push(format!("data.features lists the label {label}"));
            }
        }

        let mut r = Reader {
            table: section(&root, "model", &mut errors).unwrap_or(&empty),
            section: "model",
            used: Vec::new(),
            errors: &mut errors,
        };
        let kind = r.choice(
            "kind",
            Some("mlp"),
            &[("mlp", ModelKind::Mlp), ("linear", ModelKind::Linear)],
        );
        let hidden = r.sizes("hidden");
        let activation = r.choice(
            "activation",
            Some("relu"),
            &[
                ("relu", Activation::Relu),
                ("gelu", Activation::Gelu),
                ("tanh", Activation::Tanh),
            ],
        );
        r.finish();
        let hidden = match (kind, hidden) {
            (Some(ModelKind::Linear), Some(h)) if !h.is_empty() => {
                errors.push(
                    "model.hidden is for kind = \"mlp\"; a linear model has no hidden layer".into(),
                );
                None
            }
            (Some(ModelKind::Mlp), Some(h)) if h.is_empty() => Some(vec![64]),
            (_, h) => h,
        };

        let mut r = Reader {
            table: section(&root, "optimizer", &mut errors).unwrap_or(&empty),
            section: "optimizer",
            used: Vec::new(),
            errors: &mut errors,
        };
        let opt_kind = r.choice(
            "kind",
            Some("adamw"),
            &[("adamw", OptimizerKind::Adamw), ("sgd", OptimizerKind::Sgd)],
        );
        let default_lr = if opt_kind == Some(OptimizerKind::Sgd) {
            0.01
        } else {
            0.001
        };
        let lr = r.float("lr", default_lr, 1e-12, 10.0);
        let momentum = r.float("momentum", 0.0, 0.0, 0.999_999);
        let weight_decay = r.float(
            "weight_decay",
            if opt_kind == Some(OptimizerKind::Adamw) {
                0.01
            } else {
                0.0
            },
            0.0,
            1.0,
        );
        r.finish();
        if opt_kind == Some(OptimizerKind::Adamw) && momentum.is_some_and(|m| m != 0.0) {
            errors
                .push("optimizer.momentum is for kind = \"sgd\"; adamw has its own moments".into());
        }

        let mut r = Reader {
            table: section(&root, "train", &mut errors).unwrap_or(&empty),
            section: "train",
            used: Vec::new(),
            errors: &mut errors,
        };
        let epochs = r.integer("epochs", Some(10), 1, 1_000_000);
        let batch_size = r.integer("batch_size", Some(64), 1, 1 << 24);
        let seed = r.integer("seed", Some(0), 0, i64::MAX);
        let checkpoint_every_steps = r.integer("checkpoint_every_steps", Some(0), 0, i64::MAX);
        r.finish();

        let mut r = Reader {
            table: section(&root, "resources", &mut errors).unwrap_or(&empty),
            section: "resources",
            used: Vec::new(),
            errors: &mut errors,
        };
        let shards = r.integer("shards", Some(1), 1, i64::from(MAX_SHARDS));
        let cpus_per_shard = r.integer("cpus_per_shard", Some(1), 0, 1024);
        let gpus_per_shard = r.integer("gpus_per_shard", Some(0), 0, 16);
        let memory_mib_per_shard = r.integer("memory_mib_per_shard", Some(0), 0, MAX_MEMORY_MIB);
        r.finish();
        if let (Some(b), Some(s)) = (batch_size, shards) {
            if b < s {
                errors.push(format!(
                    "train.batch_size = {b} is smaller than resources.shards = {s}: every shard needs at least one example a step"
                ));
            }
        }
        if cpus_per_shard == Some(0) && gpus_per_shard == Some(0) {
            errors.push("resources: a shard needs at least one CPU or one GPU".into());
        }

        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        // Every field is Some once no error was recorded.
        let missing = || SpecErrors(vec!["internal: a checked field is missing".into()]);
        let (artifact, version) = artifact.ok_or_else(missing)?;
        Ok(JobSpec {
            name: name.ok_or_else(missing)?,
            experiment: experiment.ok_or_else(missing)?,
            priority: priority.ok_or_else(missing)? as i32,
            max_failures: max_failures.ok_or_else(missing)? as u32,
            data: DataSpec {
                artifact,
                version,
                format: format.ok_or_else(missing)?,
                label: label.ok_or_else(missing)?,
                features: features.ok_or_else(missing)?,
            },
            model: ModelSpec {
                kind: kind.ok_or_else(missing)?,
                hidden: hidden.ok_or_else(missing)?,
                activation: activation.ok_or_else(missing)?,
            },
            optimizer: OptimizerSpec {
                kind: opt_kind.ok_or_else(missing)?,
                lr: lr.ok_or_else(missing)?,
                momentum: momentum.ok_or_else(missing)?,
                weight_decay: weight_decay.ok_or_else(missing)?,
            },
            train: TrainSpec {
                epochs: epochs.ok_or_else(missing)? as u32,
                batch_size: batch_size.ok_or_else(missing)? as u32,
                seed: seed.ok_or_else(missing)? as u64,
                checkpoint_every_steps: checkpoint_every_steps.ok_or_else(missing)? as u64,
            },
            resources: ResourceSpec {
                shards: shards.ok_or_else(missing)? as u32,
                cpus_per_shard: cpus_per_shard.ok_or_else(missing)? as u32,
                gpus_per_shard: gpus_per_shard.ok_or_else(missing)? as u32,
                memory_mib_per_shard: memory_mib_per_shard.ok_or_else(missing)? as u64,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "iris-mlp"
experiment = "iris"
priority = 5

[data]
artifact = "iris@3"
label = "species"
features = ["a", "b"]

[model]
kind = "mlp"
hidden = [32, 16]
activation = "tanh"

[optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9

[train]
epochs = 3
batch_size = 32
seed = 7
checkpoint_every_steps = 50

[resources]
shards = 2
"#;

    #[test]
    fn a_good_spec_parses_with_defaults_filled() {
        let spec = JobSpec::parse(GOOD).expect("valid");
        assert_eq!(spec.name, "iris-mlp");
        assert_eq!(spec.data.artifact, "iris");
        assert_eq!(spec.data.version, 3);
        assert_eq!(spec.data.format, DataFormat::Csv);
        assert_eq!(spec.model.hidden, vec![32, 16]);
        assert_eq!(spec.model.activation, Activation::Tanh);
        assert_eq!(spec.optimizer.kind, OptimizerKind::Sgd);
        assert_eq!(spec.optimizer.momentum, 0.9);
        assert_eq!(spec.resources.shards, 2);
        assert_eq!(spec.resources.cpus_per_shard, 1);
        assert_eq!(
            spec.resources.memory_mib_per_shard, 0,
            "not counted by default"
        );
        assert_eq!(spec.max_failures, 3);
        let with_memory =
            JobSpec::parse(&format!("{GOOD}memory_mib_per_shard = 2048\n")).expect("valid");
        assert_eq!(with_memory.resources.memory_mib_per_shard, 2048);
        let minimal = JobSpec::parse("name = \"m\"\n[data]\nartifact = \"d@1\"\nlabel = \"y\"\n")
            .expect("defaults");
        assert_eq!(minimal.model.kind, ModelKind::Mlp);
        assert_eq!(minimal.model.hidden, vec![64]);
        assert_eq!(minimal.optimizer.kind, OptimizerKind::Adamw);
        assert_eq!(minimal.optimizer.weight_decay, 0.01);
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let bad = r#"
name = "x"
colour = "blue"

[data]
artifact = "iris@latest"
label = "y"
features = ["y"]

[model]
kind = "transformer"
hidden = [0]

[optimizer]
lr = "fast"

[train]
epochs = 0
batch_size = 1
learning = 1

[resources]
shards = 4
memory_mib_per_shard = -1
"#;
        let errors = JobSpec::parse(bad).expect_err("invalid").0;
        let text = errors.join("\n");
        for wanted in [
            "unknown key colour",
            "data.artifact = \"iris@latest\" must name an exact version",
            "data.features lists the label y",
            "model.kind = \"transformer\" is not one of mlp, linear",
            "model.hidden[0] must be a layer width",
            "optimizer.lr must be a number, not string",
            "train.epochs = 0 is out of range",
            "unknown key train.learning",
            "train.batch_size = 1 is smaller than resources.shards = 4",
            "resources.memory_mib_per_shard = -1 is out of range 0..=67108864",
        ] {
            assert!(text.contains(wanted), "missing '{wanted}' in:\n{text}");
        }
        assert_eq!(errors.len(), 10, "{text}");
    }

    #[test]
    fn missing_required_keys_and_bad_toml() {
        let errors = JobSpec::parse("experiment = \"e\"\n")
            .expect_err("invalid")
            .0;
        assert!(
            errors.contains(&"name is required".to_string()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"[data] is required".to_string()),
            "{errors:?}"
        );
        let errors = JobSpec::parse("name = ").expect_err("invalid").0;
        assert!(errors[0].starts_with("not valid TOML"), "{errors:?}");
        let errors = JobSpec::parse("name = \"a\"\ndata = 3\n")
            .expect_err("invalid")
            .0;
        assert!(errors[0].contains("[data] must be a table"), "{errors:?}");
    }
}
