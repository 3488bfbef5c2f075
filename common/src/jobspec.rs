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
//!
//! A command job runs the user's own program instead of the built-in trainer:
//! `[command]` replaces `[model]`, `[optimizer]` and `[train]`, and `[data]` is
//! optional (staged read-only for every rank).
//!
//! ```toml
//! name = "resnet-cifar"
//! experiment = "vision"
//!
//! [command]
//! run = ["python", "train.py", "--epochs", "10"]   # argv, no shell
//! code = "./src"          # a directory the CLI pushes as artifact <name>-code,
//!                         # or an artifact version, "my-code@3"
//! grace_secs = 30         # SIGTERM to SIGKILL when the job stops
//!
//! [environment]           # at most one of python / pip / image
//! python = "/opt/venv/bin/python"   # what "python" in run means on the workers
//! env = { NCCL_DEBUG = "WARN" }
//!
//! [data]
//! artifact = "cifar@2"    # staged read-only at KILN_DATA_DIR
//!
//! [checkpoint]
//! keep = 3                # checkpoint versions kept (0: all)
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

impl OptimizerKind {
    /// Bytes of memory one parameter takes while it trains with this optimizer,
    /// at least: its weight, its gradient, the optimizer's state (SGD's momentum;
    /// AdamW's two moments) and its slot in the all-reduce buffer, each an f32.
    pub fn training_bytes_per_parameter(self) -> u64 {
        let state = match self {
            OptimizerKind::Sgd => 1,
            OptimizerKind::Adamw => 2,
        };
        (3 + state) * 4
    }
}

impl ModelSpec {
    /// The parameters (weights and biases) of this network with `inputs` features
    /// and `outputs` outputs, saturating at `u64::MAX`.
    pub fn parameters(&self, inputs: u64, outputs: u64) -> u64 {
        let widths: Vec<u64> = std::iter::once(inputs)
            .chain(self.hidden.iter().map(|&w| u64::from(w)))
            .chain(std::iter::once(outputs))
            .collect();
        widths.windows(2).fold(0u64, |total, pair| {
            let layer = pair[0].saturating_mul(pair[1]).saturating_add(pair[1]);
            total.saturating_add(layer)
        })
    }
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

/// What the built-in trainer learns and how (`[data]`, `[model]`,
/// `[optimizer]`, `[train]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Builtin {
    pub data: DataSpec,
    pub model: ModelSpec,
    pub optimizer: OptimizerSpec,
    pub train: TrainSpec,
}

/// Where a command job's program comes from (`command.code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Code {
    /// A directory on the submitting machine: the CLI pushes it as artifact
    /// `<name>-code` and submits the spec with that version instead. The
    /// coordinators refuse a spec that still names a path.
    Path(String),
    /// An artifact version holding the program's files.
    Artifact(ArtifactRef),
}

/// An artifact's name and exact version (`NAME@NUMBER`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRef {
    pub name: String,
    pub version: u64,
}

impl fmt::Display for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

impl Serialize for ArtifactRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `[command]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandSpec {
    /// The program and its arguments (no shell).
    pub run: Vec<String>,
    pub code: Option<Code>,
    /// How long a rank has between SIGTERM and SIGKILL when the job stops.
    pub grace_secs: u32,
}

/// What runs a command job's program (`[environment]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// The worker's own environment: `run[0]` is looked up on its PATH.
    Host,
    /// A Python interpreter on the workers: `run[0] = "python"` (or `python3`)
    /// means it.
    Python(String),
    /// A virtual environment with these requirements, built once per worker.
    Pip(Vec<String>),
    /// A container image each rank runs in.
    Image(String),
}

impl fmt::Display for Runtime {
    /// As `kiln jobs show` and the dashboard say it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Runtime::Host => f.write_str("the worker's PATH"),
            Runtime::Python(p) => write!(f, "python {p}"),
            Runtime::Pip(reqs) => write!(f, "pip {}", reqs.join(" ")),
            Runtime::Image(image) => write!(f, "image {image}"),
        }
    }
}

/// `[environment]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnvironmentSpec {
    pub runtime: Runtime,
    /// Variables every rank gets, besides those kiln sets.
    pub env: std::collections::BTreeMap<String, String>,
}

/// A command job: the user's program, its environment and its inputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandJob {
    pub command: CommandSpec,
    pub environment: EnvironmentSpec,
    /// The dataset staged read-only for every rank, if any.
    pub data: Option<ArtifactRef>,
    /// Checkpoint versions kept (0: every one).
    pub checkpoint_keep: u32,
}

/// What a job runs: the built-in trainer or the user's program.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Workload {
    Builtin(Box<Builtin>),
    Command(Box<CommandJob>),
}

/// A checked job spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSpec {
    pub name: String,
    pub experiment: String,
    pub priority: i32,
    pub max_failures: u32,
    #[serde(flatten)]
    pub workload: Workload,
    pub resources: ResourceSpec,
}

impl JobSpec {
    /// The built-in trainer's part, when the job runs it.
    pub fn builtin(&self) -> Option<&Builtin> {
        match &self.workload {
            Workload::Builtin(b) => Some(b),
            Workload::Command(_) => None,
        }
    }

    /// The command, when the job runs the user's program.
    pub fn command(&self) -> Option<&CommandJob> {
        match &self.workload {
            Workload::Command(c) => Some(c),
            Workload::Builtin(_) => None,
        }
    }

    /// The dataset version the job learns from, if it names one.
    pub fn dataset(&self) -> Option<ArtifactRef> {
        match &self.workload {
            Workload::Builtin(b) => Some(ArtifactRef {
                name: b.data.artifact.clone(),
                version: b.data.version,
            }),
            Workload::Command(c) => c.data.clone(),
        }
    }
}

/// Variables kiln sets for every rank of a command job; `environment.env` may
/// not set them.
pub const RANK_VARIABLES: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
    "TORCHELASTIC_RUN_ID",
];

/// Longest `command.grace_secs`.
pub const MAX_GRACE_SECS: i64 = 3600;

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

/// Most log lines one shard report carries: a worker sends no more at once, and
/// the coordinators keep no more of one.
pub const MAX_REPORT_LOG_LINES: usize = 200;

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
        let command = root.contains_key("command");
        let (mine, others): (&[&'static str], &[&'static str]) = if command {
            (&COMMAND_SECTIONS, &BUILTIN_ONLY)
        } else {
            (&BUILTIN_SECTIONS, &COMMAND_ONLY)
        };
        for other in others {
            if root.contains_key(*other) {
                errors.push(if command {
                    format!("[{other}] is for the built-in trainer; a [command] job runs its own program")
                } else {
                    format!("[{other}] is for a [command] job; this spec has no [command]")
                });
            }
        }

        let mut top = Reader {
            table: &root,
            section: "",
            used: [mine, others, &["resources"]].concat(),
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
        let workload = if command {
            parse_command(&root, &mut errors).map(|c| Workload::Command(Box::new(c)))
        } else {
            parse_builtin(&root, shards, &mut errors).map(|b| Workload::Builtin(Box::new(b)))
        };

        if cpus_per_shard == Some(0) && gpus_per_shard == Some(0) {
            errors.push("resources: a shard needs at least one CPU or one GPU".into());
        }

        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        // Every field is Some once no error was recorded.
        let missing = || SpecErrors(vec!["internal: a checked field is missing".into()]);
        Ok(JobSpec {
            name: name.ok_or_else(missing)?,
            experiment: experiment.ok_or_else(missing)?,
            priority: priority.ok_or_else(missing)? as i32,
            max_failures: max_failures.ok_or_else(missing)? as u32,
            workload: workload.ok_or_else(missing)?,
            resources: ResourceSpec {
                shards: shards.ok_or_else(missing)? as u32,
                cpus_per_shard: cpus_per_shard.ok_or_else(missing)? as u32,
                gpus_per_shard: gpus_per_shard.ok_or_else(missing)? as u32,
                memory_mib_per_shard: memory_mib_per_shard.ok_or_else(missing)? as u64,
            },
        })
    }
}

/// The sections of a built-in trainer's spec and of a command job's.
const BUILTIN_SECTIONS: [&str; 4] = ["data", "model", "optimizer", "train"];
const COMMAND_SECTIONS: [&str; 4] = ["command", "environment", "data", "checkpoint"];
/// Sections only one kind of job has.
const BUILTIN_ONLY: [&str; 3] = ["model", "optimizer", "train"];
const COMMAND_ONLY: [&str; 2] = ["environment", "checkpoint"];

/// Reads `NAME@NUMBER` at `key`, naming the problem.
fn exact_version(
    key: &str,
    text: &str,
    why: &str,
    errors: &mut Vec<String>,
) -> Option<ArtifactRef> {
    match parse_reference(text) {
        Ok((name, Selector::Version(version))) => Some(ArtifactRef { name, version }),
        Ok(_) => {
            errors.push(format!(
                "{key} = \"{text}\" must name an exact version, NAME@NUMBER, {why}"
            ));
            None
        }
        Err(e) => {
            errors.push(format!("{key}: {e}"));
            None
        }
    }
}

/// `[data]`, `[model]`, `[optimizer]` and `[train]` of a built-in trainer's spec.
fn parse_builtin(root: &Table, shards: Option<i64>, errors: &mut Vec<String>) -> Option<Builtin> {
    let empty = Table::new();
    let data_table = section(root, "data", errors);
    if data_table.is_none() && root.get("data").is_none() {
        errors.push("[data] is required".into());
    }
    let mut r = Reader {
        table: data_table.unwrap_or(&empty),
        section: "data",
        used: Vec::new(),
        errors,
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
    let artifact = artifact.and_then(|a| {
        exact_version(
            "data.artifact",
            &a,
            "so that the run records the bytes it learned from",
            errors,
        )
    });
    if let (Some(label), Some(features)) = (&label, &features) {
        if features.contains(label) {
            errors.push(format!("data.features lists the label {label}"));
        }
    }

    let mut r = Reader {
        table: section(root, "model", errors).unwrap_or(&empty),
        section: "model",
        used: Vec::new(),
        errors,
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
        table: section(root, "optimizer", errors).unwrap_or(&empty),
        section: "optimizer",
        used: Vec::new(),
        errors,
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
        errors.push("optimizer.momentum is for kind = \"sgd\"; adamw has its own moments".into());
    }

    let mut r = Reader {
        table: section(root, "train", errors).unwrap_or(&empty),
        section: "train",
        used: Vec::new(),
        errors,
    };
    let epochs = r.integer("epochs", Some(10), 1, 1_000_000);
    let batch_size = r.integer("batch_size", Some(64), 1, 1 << 24);
    let seed = r.integer("seed", Some(0), 0, i64::MAX);
    let checkpoint_every_steps = r.integer("checkpoint_every_steps", Some(0), 0, i64::MAX);
    r.finish();
    if let (Some(b), Some(s)) = (batch_size, shards) {
        if b < s {
            errors.push(format!(
                "train.batch_size = {b} is smaller than resources.shards = {s}: every shard needs at least one example a step"
            ));
        }
    }

    Some(Builtin {
        data: {
            let artifact = artifact?;
            DataSpec {
                artifact: artifact.name,
                version: artifact.version,
                format: format?,
                label: label?,
                features: features?,
            }
        },
        model: ModelSpec {
            kind: kind?,
            hidden: hidden?,
            activation: activation?,
        },
        optimizer: OptimizerSpec {
            kind: opt_kind?,
            lr: lr?,
            momentum: momentum?,
            weight_decay: weight_decay?,
        },
        train: TrainSpec {
            epochs: epochs? as u32,
            batch_size: batch_size? as u32,
            seed: seed? as u64,
            checkpoint_every_steps: checkpoint_every_steps? as u64,
        },
    })
}

/// `[command]`, `[environment]`, `[data]` and `[checkpoint]` of a command job.
fn parse_command(root: &Table, errors: &mut Vec<String>) -> Option<CommandJob> {
    let empty = Table::new();
    let mut r = Reader {
        table: section(root, "command", errors).unwrap_or(&empty),
        section: "command",
        used: Vec::new(),
        errors,
    };
    let run = r.strings("run");
    let code = match r.get("code") {
        None => Some(None),
        Some(Value::String(s)) if s.trim().is_empty() => {
            r.errors.push("command.code is empty".into());
            None
        }
        Some(Value::String(s)) if s.contains('@') => {
            exact_version("command.code", s, "or a directory to push", r.errors)
                .map(|a| Some(Code::Artifact(a)))
        }
        Some(Value::String(s)) => Some(Some(Code::Path(s.clone()))),
        Some(other) => {
            r.errors.push(format!(
                "command.code must be a string, not {}",
                other.type_str()
            ));
            None
        }
    };
    let grace_secs = r.integer("grace_secs", Some(30), 1, MAX_GRACE_SECS);
    r.finish();
    if run.as_ref().is_some_and(|r| r.is_empty()) {
        errors.push("command.run is empty: it is the program and its arguments, e.g. [\"python\", \"train.py\"]".into());
    }

    let env_table = section(root, "environment", errors);
    let mut r = Reader {
        table: env_table.unwrap_or(&empty),
        section: "environment",
        used: Vec::new(),
        errors,
    };
    let python = r
        .get("python")
        .is_some()
        .then(|| r.string("python", None))
        .flatten();
    let pip = r.get("pip").is_some().then(|| r.strings("pip")).flatten();
    let image = r
        .get("image")
        .is_some()
        .then(|| r.string("image", None))
        .flatten();
    let env = match r.get("env") {
        None => Some(std::collections::BTreeMap::new()),
        Some(Value::Table(t)) => {
            let mut env = std::collections::BTreeMap::new();
            for (k, v) in t {
                let valid = !k.is_empty()
                    && !k.starts_with(|c: char| c.is_ascii_digit())
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    r.errors
                        .push(format!("environment.env.{k} is not a variable name"));
                } else if RANK_VARIABLES.contains(&k.as_str())
                    || k.starts_with("KILN_")
                    || k.starts_with("MLFLOW_")
                {
                    r.errors.push(format!(
                        "environment.env.{k} is set by kiln for every rank and cannot be overridden"
                    ));
                } else {
                    match v {
                        Value::String(s) => {
                            env.insert(k.clone(), s.clone());
                        }
                        other => r.errors.push(format!(
                            "environment.env.{k} must be a string, not {}",
                            other.type_str()
                        )),
                    }
                }
            }
            Some(env)
        }
        Some(other) => {
            r.errors.push(format!(
                "environment.env must be a table, not {}",
                other.type_str()
            ));
            None
        }
    };
    r.finish();
    let chosen: Vec<Runtime> = [
        python.map(Runtime::Python),
        pip.map(Runtime::Pip),
        image.map(Runtime::Image),
    ]
    .into_iter()
    .flatten()
    .collect();
    let runtime = match chosen.len() {
        0 => Some(Runtime::Host),
        1 => chosen.into_iter().next(),
        _ => {
            errors.push("environment: choose one of python, pip and image, not several".into());
            None
        }
    };
    if let Some(Runtime::Pip(p)) = &runtime {
        if p.is_empty() {
            errors.push("environment.pip is empty: list the requirements to install".into());
        }
    }

    let data_table = section(root, "data", errors);
    let mut r = Reader {
        table: data_table.unwrap_or(&empty),
        section: "data",
        used: Vec::new(),
        errors,
    };
    let data = if data_table.is_some() {
        match r.string("artifact", None) {
            Some(a) => exact_version(
                "data.artifact",
                &a,
                "so that the run records the bytes it learned from",
                r.errors,
            )
            .map(Some),
            None => None,
        }
    } else {
        Some(None)
    };
    r.finish();

    let mut r = Reader {
        table: section(root, "checkpoint", errors).unwrap_or(&empty),
        section: "checkpoint",
        used: Vec::new(),
        errors,
    };
    let keep = r.integer("keep", Some(0), 0, 1_000_000);
    r.finish();

    Some(CommandJob {
        command: CommandSpec {
            run: run?,
            code: code?,
            grace_secs: grace_secs? as u32,
        },
        environment: EnvironmentSpec {
            runtime: runtime?,
            env: env?,
        },
        data: data?,
        checkpoint_keep: keep? as u32,
    })
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
        let parsed = JobSpec::parse(GOOD).expect("valid");
        assert_eq!(parsed.name, "iris-mlp");
        let spec = parsed.builtin().expect("the built-in trainer");
        assert_eq!(spec.data.artifact, "iris");
        assert_eq!(spec.data.version, 3);
        assert_eq!(spec.data.format, DataFormat::Csv);
        assert_eq!(spec.model.hidden, vec![32, 16]);
        assert_eq!(spec.model.activation, Activation::Tanh);
        assert_eq!(spec.optimizer.kind, OptimizerKind::Sgd);
        assert_eq!(spec.optimizer.momentum, 0.9);
        assert_eq!(parsed.resources.shards, 2);
        assert_eq!(parsed.resources.cpus_per_shard, 1);
        assert_eq!(
            parsed.resources.memory_mib_per_shard, 0,
            "not counted by default"
        );
        assert_eq!(parsed.max_failures, 3);
        let with_memory =
            JobSpec::parse(&format!("{GOOD}memory_mib_per_shard = 2048\n")).expect("valid");
        assert_eq!(with_memory.resources.memory_mib_per_shard, 2048);
        let minimal = JobSpec::parse("name = \"m\"\n[data]\nartifact = \"d@1\"\nlabel = \"y\"\n")
            .expect("defaults");
        let minimal = minimal.builtin().expect("the built-in trainer");
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

    const COMMAND: &str = r#"
name = "resnet-cifar"
experiment = "vision"
max_failures = 1

[command]
run = ["python", "train.py", "--epochs", "10"]
code = "./src"

[environment]
python = "/opt/venv/bin/python"
env = { NCCL_DEBUG = "WARN" }

[data]
artifact = "cifar@2"

[checkpoint]
keep = 3

[resources]
shards = 2
"#;

    #[test]
    fn a_command_job_parses_with_its_program_environment_and_data() {
        let spec = JobSpec::parse(COMMAND).expect("valid");
        let job = spec.command().expect("a command job");
        assert!(spec.builtin().is_none());
        assert_eq!(job.command.run, ["python", "train.py", "--epochs", "10"]);
        assert_eq!(job.command.code, Some(Code::Path("./src".into())));
        assert_eq!(job.command.grace_secs, 30, "the default grace");
        assert_eq!(
            job.environment.runtime,
            Runtime::Python("/opt/venv/bin/python".into())
        );
        assert_eq!(job.environment.env["NCCL_DEBUG"], "WARN");
        let data = ArtifactRef {
            name: "cifar".into(),
            version: 2,
        };
        assert_eq!(job.data.as_ref(), Some(&data));
        assert_eq!(spec.dataset(), Some(data));
        assert_eq!(job.checkpoint_keep, 3);
        assert_eq!(spec.resources.shards, 2);

        let minimal =
            JobSpec::parse("name = \"m\"\n[command]\nrun = [\"./train\"]\ncode = \"mine@4\"\n")
                .expect("valid");
        let job = minimal.command().expect("a command job");
        assert_eq!(job.environment.runtime, Runtime::Host);
        assert_eq!(job.data, None, "data is optional for a command job");
        assert_eq!(
            job.command.code,
            Some(Code::Artifact(ArtifactRef {
                name: "mine".into(),
                version: 4
            }))
        );
        // The params a run records name the command's parts.
        let value = serde_json::to_value(&spec).expect("serialize");
        assert_eq!(value["command"]["run"][1], "train.py");
        assert_eq!(value["data"], "cifar@2");
        assert_eq!(
            value["environment"]["runtime"]["python"],
            "/opt/venv/bin/python"
        );
    }

    #[test]
    fn a_command_job_with_the_trainers_sections_or_two_environments_is_refused() {
        let bad = r#"
name = "x"
[command]
run = []
code = "code@latest"
grace_secs = 0
[environment]
python = "/usr/bin/python3"
pip = ["torch"]
env = { RANK = "3", "bad name" = "x", KILN_TOKEN = "t" }
[model]
kind = "mlp"
[data]
artifact = "d@1"
label = "y"
"#;
        let errors = JobSpec::parse(bad).expect_err("invalid").0;
        let text = errors.join("\n");
        for wanted in [
            "[model] is for the built-in trainer; a [command] job runs its own program",
            "command.run is empty",
            "command.code = \"code@latest\" must name an exact version",
            "command.grace_secs = 0 is out of range",
            "environment: choose one of python, pip and image",
            "environment.env.RANK is set by kiln",
            "environment.env.KILN_TOKEN is set by kiln",
            "environment.env.bad name is not a variable name",
            "unknown key data.label",
        ] {
            assert!(text.contains(wanted), "missing '{wanted}' in:\n{text}");
        }
        assert_eq!(errors.len(), 9, "{text}");
        let errors = JobSpec::parse(&format!("{GOOD}\n[checkpoint]\nkeep = 2\n"))
            .expect_err("invalid")
            .0;
        assert_eq!(
            errors,
            ["[checkpoint] is for a [command] job; this spec has no [command]"]
        );
    }
}
