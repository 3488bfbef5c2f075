//! Ground truth: every answer a replica of this worker gives is remembered under
//! its request id for a while, so that a label sent later to
//! `POST /v2/models/{m}/feedback` can be matched to it and scored; the scores go
//! to the leader with the next telemetry report and become the live accuracy (or
//! error) of each model version.
//!
//! ```text
//!  request ─► router ─► replica here: ensure an id (the caller's, else
//!                       `<worker>-<start>-<n>`), infer, read the answer output
//!                       ─► AnswerBook: (deployment, id) → model, version, one
//!                          answer per row (argmax class or value)
//!  feedback ─► any worker: parse_body ─► AnswerBook::label: matched (scored,
//!              forgotten), rejected (kept), unknown ─► the router asks the other
//!              workers of the deployment for the unknown ones, each once
//!  scores ─► Feedback::take_scores ─► telemetry: FeedbackTelemetry deltas
//! ```
//!
//! The answer is read from the model's first output: with more than one column
//! per row it classifies and the answer is the index of the largest column; with
//! one integer column the value is the class; with one float column it regresses
//! and the answer is the value. A model trained by kiln says so in its ONNX
//! metadata (`kiln.task`, `kiln.classes`), which also gives the class names a
//! label may use instead of an index.
//!
//! Memory is bounded: at most [`MAX_REMEMBERED_IDS`] requests and
//! [`MAX_REMEMBERED_ROWS`] answered rows per worker, the oldest forgotten first;
//! ids over [`MAX_ID_BYTES`] are answered but not remembered. That is at most
//! about 70 MB with the longest ids, about 40 MB with UUIDs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_common::{Error, Result};
use kiln_proto::v1::FeedbackTelemetry;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::replicas::LocalReplica;
use super::{DataType, Signature, Tensor};

/// Most requests remembered per worker; the oldest is forgotten first.
pub const MAX_REMEMBERED_IDS: usize = 200_000;
/// Most answered rows remembered per worker; the oldest requests are forgotten
/// until a new one fits (one larger than this is not remembered).
pub const MAX_REMEMBERED_ROWS: usize = 1_000_000;
/// Longest request id remembered, in bytes; a longer one is still echoed.
pub const MAX_ID_BYTES: usize = 128;
/// Most items one feedback body may hold.
pub const MAX_FEEDBACK_ITEMS: usize = 10_000;
/// Largest feedback body.
pub const MAX_FEEDBACK_BODY_BYTES: usize = 16 << 20;
/// Longest wait for one other worker to answer a forwarded feedback call.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest time a feedback call spends asking other workers, all of them.
pub const FORWARD_BUDGET: Duration = Duration::from_secs(10);
/// Marks a feedback call one worker forwarded to another, which must not
/// forward it again.
pub const FORWARDED_HEADER: &str = "kiln-feedback-forwarded";
/// Most (deployment, model, version) scores kept between two telemetry reports.
const MAX_SCORED_VERSIONS: usize = 4096;
/// The class of a row whose scores were all NaN (or whose class id does not fit):
/// no label equals it.
const NO_CLASS: u32 = u32::MAX;

// ---------------------------------------------------------------------------
// How a model version answers.
// ---------------------------------------------------------------------------

/// What a model file says about its task, from its ONNX `metadata_props`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskMetadata {
    /// `kiln.task`: `classification` or `regression`, when the file says.
    pub task: Option<String>,
    /// `kiln.classes`: class names in output order; empty when not given.
    pub classes: Vec<String>,
}

/// The part of an ONNX `ModelProto` that holds `metadata_props` (field 14):
/// decoding only it skips the graph's bytes without copying them.
#[derive(Clone, PartialEq, prost::Message)]
struct OnnxProps {
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<kiln_proto::onnx::StringStringEntryProto>,
}

impl TaskMetadata {
    /// Reads `kiln.task` and `kiln.classes` from an ONNX file; a file without
    /// them (or that does not parse) says nothing.
    pub fn of_onnx(onnx: &[u8]) -> TaskMetadata {
        let Ok(props) = <OnnxProps as prost::Message>::decode(onnx) else {
            return TaskMetadata::default();
        };
        let mut meta = TaskMetadata::default();
        for entry in props.metadata_props {
            match entry.key.as_str() {
                "kiln.task" => meta.task = Some(entry.value),
                "kiln.classes" => {
                    meta.classes = serde_json::from_str(&entry.value).unwrap_or_default()
                }
                _ => {}
            }
        }
        meta
    }
}

/// How a row of the answer output becomes one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerKind {
    /// `width` scores per row; the answer is the index of the largest.
    Scores { width: usize },
    /// One integer per row, which is the class.
    ClassIds,
    /// One number per row, the regressed value.
    Value,
}

/// How one model version's answers are read and labels checked against them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerSpec {
    pub model: String,
    pub version: u64,
    /// The output the answer is read from (the model's first).
    pub output: String,
    pub kind: AnswerKind,
    /// Class names in class order, which labels may give instead of indexes;
    /// empty when the model has none.
    pub classes: Vec<String>,
}

impl AnswerSpec {
    /// Reads the answer from the signature's first output (see the module doc);
    /// `None` when its shape is not `[-1]` or `[-1, width]` with a known width,
    /// or when the metadata contradicts it: such a version's answers are not
    /// remembered.
    pub fn of(
        model: &str,
        version: u64,
        signature: &Signature,
        meta: &TaskMetadata,
    ) -> Option<AnswerSpec> {
        let output = signature.outputs.first()?;
        if output.datatype == DataType::Bytes {
            // String labels are not class ids; scoring them is not built yet.
            return None;
        }
        let width = match output.shape.as_slice() {
            [_] => 1,
            [_, w] if *w > 0 => usize::try_from(*w).ok()?,
            _ => return None,
        };
        let integer = !matches!(
            output.datatype,
            DataType::Fp32 | DataType::Fp64 | DataType::Fp16 | DataType::Bf16
        );
        let kind = match (meta.task.as_deref(), width) {
            (Some("regression"), 1) if !integer => AnswerKind::Value,
            (Some("regression"), _) => return None,
            (_, 1) if integer => AnswerKind::ClassIds,
            (Some("classification"), 1) => return None,
            (_, 1) => AnswerKind::Value,
            (_, width) => AnswerKind::Scores { width },
        };
        let classes = match kind {
            AnswerKind::Scores { width } if meta.classes.len() == width => meta.classes.clone(),
            AnswerKind::ClassIds => meta.classes.clone(),
            _ => Vec::new(),
        };
        Some(AnswerSpec {
            model: model.to_string(),
            version,
            output: output.name.clone(),
            kind,
            classes,
        })
    }

    /// True when the answers are classes (accuracy), false for values (error).
    pub fn classifies(&self) -> bool {
        self.kind != AnswerKind::Value
    }

    /// One answer per row of `output`; `None` when its shape does not fit.
    pub fn read(&self, output: &Tensor) -> Option<Answers> {
        let rows = *output.shape.first()?;
        let values = output.values_f64();
        match self.kind {
            AnswerKind::Scores { width } => {
                if output.shape.len() != 2
                    || output.shape[1] != width
                    || values.len() != rows * width
                {
                    return None;
                }
                Some(Answers::Classes(
                    values.chunks_exact(width).map(argmax).collect(),
                ))
            }
            AnswerKind::ClassIds | AnswerKind::Value => {
                if values.len() != rows || output.shape.iter().skip(1).any(|&d| d != 1) {
                    return None;
                }
                Some(match self.kind {
                    AnswerKind::ClassIds => Answers::Classes(
                        values
                            .iter()
                            .map(|&v| class_of(v).unwrap_or(NO_CLASS))
                            .collect(),
                    ),
                    _ => Answers::Values(values),
                })
            }
        }
    }

    /// The class a label names: an index (any non-negative integer for class
    /// ids, below the width for scores) or one of the class names.
    fn class_of_label(&self, label: &Label) -> std::result::Result<u32, String> {
        match label {
            Label::Number(v) => {
                let class = class_of(*v).ok_or_else(|| {
                    format!("label {v} is not a class index (a non-negative integer)")
                })?;
                match self.kind {
                    AnswerKind::Scores { width } if class as usize >= width => Err(format!(
                        "class index {class} is out of range; the model has {width} classes"
                    )),
                    _ => Ok(class),
                }
            }
            Label::Name(name) => {
                if self.classes.is_empty() {
                    return Err(format!(
                        "label {name:?} is a name but the model has no class names; give the class index"
                    ));
                }
                self.classes
                    .iter()
                    .position(|c| c == name)
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| {
                        let shown: Vec<&str> =
                            self.classes.iter().take(20).map(String::as_str).collect();
                        format!(
                            "label {name:?} is not one of the model's classes ({}{})",
                            shown.join(", "),
                            if self.classes.len() > 20 { ", ..." } else { "" }
                        )
                    })
            }
        }
    }
}

/// The class a number stands for, when it is a non-negative integer that fits.
fn class_of(v: f64) -> Option<u32> {
    (v.fract() == 0.0 && v >= 0.0 && v < f64::from(NO_CLASS)).then_some(v as u32)
}

/// The index of the largest finite-or-infinite score, ignoring NaN; [`NO_CLASS`]
/// when every score is NaN. The first of equal scores wins.
fn argmax(scores: &[f64]) -> u32 {
    let mut best: Option<(usize, f64)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if s.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.and_then(|(i, _)| u32::try_from(i).ok())
        .unwrap_or(NO_CLASS)
}

/// A request's answers, one per row.
#[derive(Debug, Clone, PartialEq)]
pub enum Answers {
    Classes(Vec<u32>),
    Values(Vec<f64>),
}

impl Answers {
    /// Rows answered.
    pub fn rows(&self) -> usize {
        match self {
            Answers::Classes(c) => c.len(),
            Answers::Values(v) => v.len(),
        }
    }
}

// ---------------------------------------------------------------------------
// Labels and their scores.
// ---------------------------------------------------------------------------

/// One row's ground truth: a number (class index or value) or a class name.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Label {
    Number(f64),
    Name(String),
}

/// One item of a feedback body: a request id and one label per row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeedbackItem {
    pub id: String,
    pub labels: Vec<Label>,
}

/// What labelling some answers adds to a model version's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Score {
    pub labelled: u64,
    pub correct: u64,
    pub abs_error_sum: f64,
    pub squared_error_sum: f64,
}

/// Scores `labels` against `answers`, one per row; the error names what does not
/// fit (the count, a label's kind or range). A regression row whose answer is
/// not finite is left out (its error is not a number).
pub fn score(
    spec: &AnswerSpec,
    answers: &Answers,
    labels: &[Label],
) -> std::result::Result<Score, String> {
    if labels.len() != answers.rows() {
        return Err(format!(
            "the request had {} rows but {} labels were given",
            answers.rows(),
            labels.len()
        ));
    }
    let mut score = Score::default();
    match answers {
        Answers::Classes(classes) => {
            for (row, (label, &answer)) in labels.iter().zip(classes).enumerate() {
                let label = spec
                    .class_of_label(label)
                    .map_err(|why| format!("row {row}: {why}"))?;
                score.labelled += 1;
                score.correct += u64::from(label == answer && answer != NO_CLASS);
            }
        }
        Answers::Values(values) => {
            for (row, (label, &answer)) in labels.iter().zip(values).enumerate() {
                let Label::Number(label) = label else {
                    return Err(format!(
                        "row {row}: the model regresses; its label is a number, not {label:?}"
                    ));
                };
                if !answer.is_finite() {
                    continue;
                }
                let error = answer - label;
                score.labelled += 1;
                score.abs_error_sum += error.abs();
                score.squared_error_sum += error * error;
            }
        }
    }
    Ok(score)
}

/// Adds `score` of a version into its telemetry entry.
fn add(into: &mut FeedbackTelemetry, score: &Score) {
    into.labelled = into.labelled.saturating_add(score.labelled);
    into.correct = into.correct.saturating_add(score.correct);
    into.abs_error_sum += score.abs_error_sum;
    into.squared_error_sum += score.squared_error_sum;
}

/// Adds one telemetry entry into another of the same version (a report that was
/// not sent, merged into the next).
pub fn merge(into: &mut FeedbackTelemetry, from: &FeedbackTelemetry) {
    add(
        into,
        &Score {
            labelled: from.labelled,
            correct: from.correct,
            abs_error_sum: from.abs_error_sum,
            squared_error_sum: from.squared_error_sum,
        },
    );
}

/// Parses a feedback body, `{"feedback": [{"id": "...", "labels": [..]} |
/// {"id": "...", "label": x}, ...]}`; the error names the item and what is wrong
/// with it. Nothing is labelled when the body does not parse.
pub fn parse_body(body: &[u8]) -> Result<Vec<FeedbackItem>> {
    let invalid = Error::InvalidArgument;
    let shape = r#"the body must be {"feedback": [{"id": "...", "labels": [...]}, ...]}"#;
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("parse the feedback body's JSON: {e}")))?;
    let Value::Object(mut doc) = doc else {
        return Err(invalid(shape.to_string()));
    };
    if let Some(key) = doc.keys().find(|k| *k != "feedback") {
        return Err(invalid(format!("unknown key {key:?}: {shape}")));
    }
    let Some(Value::Array(items)) = doc.remove("feedback") else {
        return Err(invalid(shape.to_string()));
    };
    if items.len() > MAX_FEEDBACK_ITEMS {
        return Err(invalid(format!(
            "the body has {} feedback items; at most {MAX_FEEDBACK_ITEMS} are taken at once",
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| parse_item(item).map_err(|why| invalid(format!("feedback[{i}]: {why}"))))
        .collect()
}

/// A JSON value as text for an error message, cut after 60 characters.
fn brief(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Parses one feedback item.
fn parse_item(item: Value) -> std::result::Result<FeedbackItem, String> {
    let Value::Object(mut item) = item else {
        return Err(format!(
            "{} is not an object with an id and labels",
            brief(&item)
        ));
    };
    if let Some(key) = item
        .keys()
        .find(|k| !matches!(k.as_str(), "id" | "label" | "labels"))
    {
        return Err(format!(
            "unknown key {key:?}; an item has \"id\" and \"labels\" (or \"label\")"
        ));
    }
    let id = match item.remove("id") {
        Some(Value::String(id)) if !id.is_empty() => id,
        Some(other) => return Err(format!("id {} is not a non-empty string", brief(&other))),
        None => return Err("no id".to_string()),
    };
    let values = match (item.remove("labels"), item.remove("label")) {
        (Some(Value::Array(labels)), None) => labels,
        (Some(other), None) => {
            return Err(format!(
                "id {id:?}: labels {} is not an array (use \"label\" for one row)",
                brief(&other)
            ))
        }
        (None, Some(label)) => vec![label],
        (Some(_), Some(_)) => return Err(format!("id {id:?}: both label and labels are given")),
        (None, None) => return Err(format!("id {id:?}: no label or labels")),
    };
    let labels = values
        .into_iter()
        .enumerate()
        .map(|(row, value)| match value {
            Value::Number(n) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .map(Label::Number)
                .ok_or_else(|| format!("id {id:?}: label {row} ({n}) is not a finite number")),
            Value::String(name) => Ok(Label::Name(name)),
            other => Err(format!(
                "id {id:?}: label {row} is {}; a label is a number (class index or value) \
                 or a class name",
                brief(&other)
            )),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(FeedbackItem { id, labels })
}

// ---------------------------------------------------------------------------
// The bounded book of answers.
// ---------------------------------------------------------------------------

/// What labelling one item came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Scored and forgotten.
    Matched { spec: Arc<AnswerSpec>, score: Score },
    /// Not remembered here (never, forgotten, or labelled before).
    Unknown,
    /// Remembered, but the labels do not fit it; it stays remembered.
    Rejected(String),
}

struct Remembered {
    seq: u64,
    spec: Arc<AnswerSpec>,
    answers: Answers,
}

/// The answers of recent requests by (deployment, id), bounded in requests and
/// rows; the oldest go first. Pure: no clock, no I/O.
pub struct AnswerBook {
    max_ids: usize,
    max_rows: usize,
    /// Keyed by `deployment NUL id` (deployment names hold no NUL).
    entries: HashMap<Arc<str>, Remembered>,
    /// Keys by insertion sequence: the oldest first.
    order: BTreeMap<u64, Arc<str>>,
    next_seq: u64,
    rows: usize,
}

impl std::fmt::Debug for AnswerBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerBook")
            .field("ids", &self.entries.len())
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

fn book_key(deployment: &str, id: &str) -> String {
    format!("{deployment}\0{id}")
}

impl AnswerBook {
    /// An empty book that holds at most `max_ids` requests and `max_rows` rows.
    pub fn new(max_ids: usize, max_rows: usize) -> AnswerBook {
        AnswerBook {
            max_ids: max_ids.max(1),
            max_rows: max_rows.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            rows: 0,
        }
    }

    /// Requests remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Rows remembered.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Remembers a request's answers, replacing an earlier request with the same
    /// id, forgetting the oldest requests until it fits. Returns false (and
    /// remembers nothing) for an empty or too long id, no rows, or more rows than
    /// the book holds.
    pub fn remember(
        &mut self,
        deployment: &str,
        id: &str,
        spec: Arc<AnswerSpec>,
        answers: Answers,
    ) -> bool {
        let rows = answers.rows();
        if id.is_empty() || id.len() > MAX_ID_BYTES || rows == 0 || rows > self.max_rows {
            return false;
        }
        let key: Arc<str> = book_key(deployment, id).into();
        self.forget(&key);
        while self.entries.len() >= self.max_ids || self.rows + rows > self.max_rows {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.rows -= gone.answers.rows();
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, Arc::clone(&key));
        self.rows += rows;
        self.entries.insert(key, Remembered { seq, spec, answers });
        true
    }

    fn forget(&mut self, key: &str) -> Option<Remembered> {
        let gone = self.entries.remove(key)?;
        self.order.remove(&gone.seq);
        self.rows -= gone.answers.rows();
        Some(gone)
    }

    /// Scores `labels` against the answers remembered for `id` of `deployment`;
    /// a match is forgotten, so a second label for the same id is unknown.
    pub fn label(&mut self, deployment: &str, id: &str, labels: &[Label]) -> Outcome {
        let key = book_key(deployment, id);
        let Some(entry) = self.entries.get(key.as_str()) else {
            return Outcome::Unknown;
        };
        match score(&entry.spec, &entry.answers, labels) {
            Err(why) => Outcome::Rejected(why),
            Ok(score) => {
                let spec = Arc::clone(&entry.spec);
                self.forget(&key);
                Outcome::Matched { spec, score }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The worker's feedback state.
// ---------------------------------------------------------------------------

/// An item a worker could not label, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub id: String,
    pub error: String,
}

/// The answer to a feedback call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackAnswer {
    /// Items matched and counted.
    pub matched: u64,
    /// Ids no worker asked remembers.
    pub unknown: Vec<String>,
    /// Items remembered whose labels do not fit.
    pub rejected: Vec<Rejected>,
}

/// One worker's remembered answers and the scores not yet reported.
pub struct Feedback {
    book: Mutex<AnswerBook>,
    scores: Mutex<HashMap<(String, String, u64), FeedbackTelemetry>>,
    /// Generated ids are this, a dash and a counter.
    id_prefix: String,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Feedback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feedback")
            .field("id_prefix", &self.id_prefix)
            .finish_non_exhaustive()
    }
}

impl Feedback {
    /// The feedback state of worker `worker_id`, with the default bounds.
    pub fn new(worker_id: &str) -> Feedback {
        Feedback::with_bounds(worker_id, MAX_REMEMBERED_IDS, MAX_REMEMBERED_ROWS)
    }

    /// The feedback state of worker `worker_id`, remembering at most `max_ids`
    /// requests and `max_rows` rows. Generated ids start with the first eight
    /// characters of the worker id and a number drawn at start, so that ids of
    /// another worker, or of this one before a restart, are not made again.
    pub fn with_bounds(worker_id: &str, max_ids: usize, max_rows: usize) -> Feedback {
        let worker: String = worker_id.chars().filter(|c| *c != '-').take(8).collect();
        let start: u32 = rand::random();
        Feedback {
            book: Mutex::new(AnswerBook::new(max_ids, max_rows)),
            scores: Mutex::new(HashMap::new()),
            id_prefix: format!("{worker}-{start:08x}"),
            next_id: AtomicU64::new(1),
        }
    }

    /// Gives a request that came without an id (or with an empty one over gRPC,
    /// where empty means none) one that is unique to this worker.
    pub fn ensure_id(&self, id: &mut Option<String>) {
        if id.is_none() {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            *id = Some(format!("{}-{n}", self.id_prefix));
        }
    }

    /// Runs a request on `replica` as [`super::engine::Engine::infer`] does, and
    /// remembers its answers under `id` (see [`Feedback::ensure_id`]; an empty id
    /// is not remembered).
    /// When the caller asked for outputs that leave out the answer output, it is
    /// asked for too and dropped from what is returned.
    pub async fn infer(
        &self,
        replica: &LocalReplica,
        id: &str,
        inputs: Vec<Tensor>,
        wanted: Option<Vec<String>>,
        deadline: Instant,
    ) -> Result<Vec<Tensor>> {
        let Some(spec) = replica.answers.as_ref() else {
            return replica.engine.infer(inputs, wanted, deadline).await;
        };
        let (wanted, extra) = match wanted {
            Some(mut names) if !names.contains(&spec.output) => {
                names.push(spec.output.clone());
                (Some(names), true)
            }
            other => (other, false),
        };
        let mut outputs = replica.engine.infer(inputs, wanted, deadline).await?;
        let answer = if extra {
            outputs.pop()
        } else {
            outputs.iter().find(|t| t.name == spec.output).cloned()
        };
        if let Some(answers) = answer.as_ref().and_then(|t| spec.read(t)) {
            self.book
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remember(&replica.deployment, id, Arc::clone(spec), answers);
        }
        Ok(outputs)
    }

    /// Labels the items remembered here for `deployment`; returns the answer with
    /// the unknown items, which the caller may ask other workers about.
    pub fn label(
        &self,
        deployment: &str,
        items: Vec<FeedbackItem>,
    ) -> (FeedbackAnswer, Vec<FeedbackItem>) {
        let mut answer = FeedbackAnswer::default();
        let mut unknown = Vec::new();
        let mut matched = Vec::new();
        {
            let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
            for item in items {
                match book.label(deployment, &item.id, &item.labels) {
                    Outcome::Matched { spec, score } => matched.push((spec, score)),
                    Outcome::Unknown => unknown.push(item),
                    Outcome::Rejected(error) => {
                        answer.rejected.push(Rejected { id: item.id, error })
                    }
                }
            }
        }
        answer.matched = matched.len() as u64;
        if !matched.is_empty() {
            let mut scores = self.scores.lock().unwrap_or_else(PoisonError::into_inner);
            for (spec, score) in matched {
                let key = (deployment.to_string(), spec.model.clone(), spec.version);
                if !scores.contains_key(&key) && scores.len() >= MAX_SCORED_VERSIONS {
                    tracing::warn!(deployment, model = %spec.model, version = spec.version, "too many model versions scored since the last report; labels dropped");
                    continue;
                }
                let entry = scores.entry(key).or_insert_with(|| FeedbackTelemetry {
                    deployment: deployment.to_string(),
                    model: spec.model.clone(),
                    version: spec.version,
                    classification: spec.classifies(),
                    ..FeedbackTelemetry::default()
                });
                add(entry, &score);
            }
        }
        answer.unknown = unknown.iter().map(|i| i.id.clone()).collect();
        (answer, unknown)
    }

    /// Takes the scores since the last call, one entry per model version, for
    /// the telemetry report.
    pub fn take_scores(&self) -> Vec<FeedbackTelemetry> {
        let mut scores = self.scores.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut *scores).into_values().collect()
    }

    /// Requests and rows remembered now.
    pub fn remembered(&self) -> (usize, usize) {
        let book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        (book.len(), book.rows())
    }

    /// Prometheus text: the requests and rows remembered now, against their
    /// bounds.
    pub fn render_metrics(&self) -> String {
        let (requests, rows) = self.remembered();
        format!(
            "# HELP kiln_feedback_remembered_requests Requests whose answers this worker remembers for the feedback endpoint (at most {MAX_REMEMBERED_IDS}).\n\
             # TYPE kiln_feedback_remembered_requests gauge\n\
             kiln_feedback_remembered_requests {requests}\n\
             # HELP kiln_feedback_remembered_rows Answered rows this worker remembers for the feedback endpoint (at most {MAX_REMEMBERED_ROWS}).\n\
             # TYPE kiln_feedback_remembered_rows gauge\n\
             kiln_feedback_remembered_rows {rows}\n"
        )
    }
}

/// Keeps the items whose ids another worker's answer still lists as unknown.
pub fn still_unknown(items: Vec<FeedbackItem>, answer: &FeedbackAnswer) -> Vec<FeedbackItem> {
    let unknown: HashSet<&str> = answer.unknown.iter().map(String::as_str).collect();
    items
        .into_iter()
        .filter(|i| unknown.contains(i.id.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::Spec;
    use bytes::Bytes;

    fn signature(datatype: DataType, shape: &[i64]) -> Signature {
        Signature {
            inputs: vec![],
            outputs: vec![Spec {
                name: "output".into(),
                datatype,
                shape: shape.to_vec(),
            }],
        }
    }

    fn classifier(names: &[&str]) -> Arc<AnswerSpec> {
        let meta = TaskMetadata {
            task: Some("classification".into()),
            classes: names.iter().map(|s| s.to_string()).collect(),
        };
        Arc::new(
            AnswerSpec::of("m", 2, &signature(DataType::Fp32, &[-1, 3]), &meta)
                .expect("a classifier"),
        )
    }

    fn regressor() -> Arc<AnswerSpec> {
        Arc::new(
            AnswerSpec::of(
                "r",
                1,
                &signature(DataType::Fp32, &[-1, 1]),
                &TaskMetadata::default(),
            )
            .expect("a regressor"),
        )
    }

    fn f32_tensor(shape: &[usize], values: &[f32]) -> Tensor {
        Tensor {
            name: "output".into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
            data: Bytes::from(
                values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
        }
    }

    fn numbers(values: &[f64]) -> Vec<Label> {
        values.iter().map(|&v| Label::Number(v)).collect()
    }

    #[test]
    fn the_first_output_says_how_answers_are_read() {
        let none = TaskMetadata::default();
        let kind = |datatype, shape: &[i64], meta: &TaskMetadata| {
            AnswerSpec::of("m", 1, &signature(datatype, shape), meta).map(|s| s.kind)
        };
        assert_eq!(
            kind(DataType::Fp32, &[-1, 3], &none),
            Some(AnswerKind::Scores { width: 3 })
        );
        assert_eq!(
            kind(DataType::Fp32, &[-1, 1], &none),
            Some(AnswerKind::Value)
        );
        assert_eq!(kind(DataType::Fp64, &[-1], &none), Some(AnswerKind::Value));
        assert_eq!(
            kind(DataType::Int64, &[-1], &none),
            Some(AnswerKind::ClassIds)
        );
        assert_eq!(kind(DataType::Fp32, &[-1, -1], &none), None);
        assert_eq!(kind(DataType::Fp32, &[-1, 2, 2], &none), None);
        let regression = TaskMetadata {
            task: Some("regression".into()),
            classes: vec![],
        };
        assert_eq!(
            kind(DataType::Fp32, &[-1, 1], &regression),
            Some(AnswerKind::Value)
        );
        assert_eq!(kind(DataType::Fp32, &[-1, 3], &regression), None);
        // Class names are kept only when they fit the width.
        assert_eq!(classifier(&["a", "b", "c"]).classes, ["a", "b", "c"]);
        assert!(classifier(&["a", "b"]).classes.is_empty());
        assert!(classifier(&[]).classifies());
        assert!(!regressor().classifies());
    }

    #[test]
    fn the_task_metadata_is_read_from_an_onnx_file() {
        use kiln_proto::onnx::{ModelProto, StringStringEntryProto};
        use prost::Message;
        let entry = |key: &str, value: &str| StringStringEntryProto {
            key: key.into(),
            value: value.into(),
        };
        let model = ModelProto {
            producer_name: "kiln".into(),
            metadata_props: vec![
                entry("kiln.task", "classification"),
                entry("kiln.classes", r#"["setosa","versicolor"]"#),
                entry("owner", "ada"),
            ],
            ..Default::default()
        };
        let meta = TaskMetadata::of_onnx(&model.encode_to_vec());
        assert_eq!(meta.task.as_deref(), Some("classification"));
        assert_eq!(meta.classes, ["setosa", "versicolor"]);
        assert_eq!(
            TaskMetadata::of_onnx(b"\xff\xff not onnx"),
            TaskMetadata::default()
        );
    }

    #[test]
    fn answers_are_the_argmax_or_the_value_per_row() {
        let spec = classifier(&[]);
        let scores = f32_tensor(&[3, 3], &[0.1, 0.7, 0.2, 0.5, 0.5, 0.0, f32::NAN, 0.0, 3.0]);
        assert_eq!(spec.read(&scores), Some(Answers::Classes(vec![1, 0, 2])));
        let all_nan = f32_tensor(&[1, 3], &[f32::NAN; 3]);
        assert_eq!(spec.read(&all_nan), Some(Answers::Classes(vec![NO_CLASS])));
        // A tensor of another shape is not read.
        assert_eq!(spec.read(&f32_tensor(&[2, 2], &[0.0; 4])), None);
        let values = f32_tensor(&[2, 1], &[1.5, -2.0]);
        assert_eq!(
            regressor().read(&values),
            Some(Answers::Values(vec![1.5, -2.0]))
        );
        let ids = Tensor {
            name: "label".into(),
            datatype: DataType::Int64,
            shape: vec![3],
            data: Bytes::from(
                [2i64, -1, 0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
        };
        let spec = AnswerSpec::of(
            "m",
            1,
            &signature(DataType::Int64, &[-1]),
            &TaskMetadata::default(),
        )
        .expect("class ids");
        assert_eq!(
            spec.read(&ids),
            Some(Answers::Classes(vec![2, NO_CLASS, 0]))
        );
    }

    #[test]
    fn accuracy_counts_labels_equal_to_the_answer() {
        let spec = classifier(&["a", "b", "c"]);
        let answers = Answers::Classes(vec![1, 0, 2, NO_CLASS]);
        let labels = vec![
            Label::Number(1.0),
            Label::Name("b".into()),
            Label::Name("c".into()),
            Label::Number(0.0),
        ];
        let s = score(&spec, &answers, &labels).expect("scores");
        assert_eq!((s.labelled, s.correct), (4, 2));
        assert_eq!(s.abs_error_sum, 0.0);
    }

    #[test]
    fn error_sums_add_absolute_and_squared_differences() {
        let spec = regressor();
        let answers = Answers::Values(vec![1.0, 4.0, f64::NAN]);
        let s = score(&spec, &answers, &numbers(&[2.0, 1.0, 0.0])).expect("scores");
        // The NaN answer is left out.
        assert_eq!(s.labelled, 2);
        assert_eq!(s.correct, 0);
        assert!((s.abs_error_sum - 4.0).abs() < 1e-12);
        assert!((s.squared_error_sum - 10.0).abs() < 1e-12);
    }

    #[test]
    fn labels_that_do_not_fit_are_refused_with_the_reason() {
        let spec = classifier(&["a", "b", "c"]);
        let answers = Answers::Classes(vec![1, 0]);
        let refused = |labels: Vec<Label>| score(&spec, &answers, &labels).expect_err("refused");
        assert!(refused(numbers(&[1.0])).contains("had 2 rows but 1 labels"));
        assert!(refused(numbers(&[1.0, 3.0])).contains("row 1: class index 3 is out of range"));
        assert!(refused(numbers(&[1.5, 0.0])).contains("row 0: label 1.5 is not a class index"));
        assert!(refused(numbers(&[-1.0, 0.0])).contains("not a class index"));
        let msg = refused(vec![Label::Name("z".into()), Label::Number(0.0)]);
        assert!(
            msg.contains("\"z\" is not one of the model's classes (a, b, c)"),
            "{msg}"
        );
        let nameless = classifier(&[]);
        let msg = score(
            &nameless,
            &answers,
            &[Label::Name("a".into()), Label::Number(0.0)],
        )
        .expect_err("refused");
        assert!(msg.contains("has no class names"), "{msg}");
        let msg = score(
            &regressor(),
            &Answers::Values(vec![1.0]),
            &[Label::Name("a".into())],
        )
        .expect_err("refused");
        assert!(msg.contains("regresses; its label is a number"), "{msg}");
    }

    #[test]
    fn feedback_bodies_parse_or_name_the_problem() {
        let items =
            parse_body(br#"{"feedback":[{"id":"a","labels":[1,"cat",2.5]},{"id":"b","label":0}]}"#)
                .expect("parses");
        assert_eq!(
            items,
            vec![
                FeedbackItem {
                    id: "a".into(),
                    labels: vec![
                        Label::Number(1.0),
                        Label::Name("cat".into()),
                        Label::Number(2.5)
                    ],
                },
                FeedbackItem {
                    id: "b".into(),
                    labels: vec![Label::Number(0.0)],
                },
            ]
        );
        let refused = |body: &str| match parse_body(body.as_bytes()) {
            Err(Error::InvalidArgument(msg)) => msg,
            other => panic!("expected InvalidArgument for {body}, got {other:?}"),
        };
        assert!(refused("{not json").contains("parse the feedback body's JSON"));
        assert!(refused("[1]").contains(r#"the body must be {"feedback""#));
        assert!(refused(r#"{"labels":[]}"#).contains("unknown key \"labels\""));
        assert!(refused(r#"{"feedback":{}}"#).contains("the body must be"));
        assert!(refused(r#"{"feedback":[3]}"#).contains("feedback[0]: 3 is not an object"));
        assert!(refused(r#"{"feedback":[{"labels":[1]}]}"#).contains("feedback[0]: no id"));
        assert!(refused(r#"{"feedback":[{"id":7,"label":1}]}"#)
            .contains("id 7 is not a non-empty string"));
        assert!(
            refused(r#"{"feedback":[{"id":"","label":1}]}"#).contains("is not a non-empty string")
        );
        assert!(refused(r#"{"feedback":[{"id":"x"}]}"#).contains("id \"x\": no label or labels"));
        assert!(
            refused(r#"{"feedback":[{"id":"x","label":1,"labels":[1]}]}"#)
                .contains("both label and labels")
        );
        assert!(
            refused(r#"{"feedback":[{"id":"x","labels":1}]}"#).contains("labels 1 is not an array")
        );
        assert!(
            refused(r#"{"feedback":[{"id":"x","lables":[1]}]}"#).contains("unknown key \"lables\"")
        );
        let msg = refused(r#"{"feedback":[{"id":"ok","label":1},{"id":"x","labels":[1,true]}]}"#);
        assert!(
            msg.contains("feedback[1]: id \"x\": label 1 is true"),
            "{msg}"
        );
        let many = format!(
            r#"{{"feedback":[{}]}}"#,
            vec![r#"{"id":"i","label":0}"#; MAX_FEEDBACK_ITEMS + 1].join(",")
        );
        assert!(refused(&many).contains("at most 10000"));
        let long = format!(
            r#"{{"feedback":[{{"id":"x","labels":{{"k":"{}"}}}}]}}"#,
            "v".repeat(500)
        );
        let msg = refused(&long);
        assert!(msg.contains("...") && msg.len() < 200, "{msg}");
        // The parsed items serialise back to a body that parses to the same.
        let again = serde_json::to_vec(&serde_json::json!({ "feedback": items })).expect("json");
        assert_eq!(parse_body(&again).expect("parses"), items);
    }

    #[test]
    fn an_id_is_labelled_once_and_a_rejected_one_stays() {
        let mut book = AnswerBook::new(10, 100);
        let spec = classifier(&["a", "b", "c"]);
        assert!(book.remember("d", "r1", Arc::clone(&spec), Answers::Classes(vec![0, 1])));
        assert!(matches!(
            book.label("d", "r1", &numbers(&[0.0])),
            Outcome::Rejected(msg) if msg.contains("had 2 rows")
        ));
        // Another deployment's id of the same name is another request.
        assert_eq!(
            book.label("other", "r1", &numbers(&[0.0, 1.0])),
            Outcome::Unknown
        );
        match book.label("d", "r1", &numbers(&[0.0, 2.0])) {
            Outcome::Matched { score, .. } => assert_eq!((score.labelled, score.correct), (2, 1)),
            other => panic!("expected a match, got {other:?}"),
        }
        assert_eq!(
            book.label("d", "r1", &numbers(&[0.0, 2.0])),
            Outcome::Unknown
        );
        assert!(book.is_empty());
        assert_eq!(book.rows(), 0);
    }

    #[test]
    fn the_oldest_answers_go_first_when_ids_or_rows_run_out() {
        let spec = classifier(&[]);
        let rows = |n: usize| Answers::Classes(vec![0; n]);
        let mut book = AnswerBook::new(3, 10);
        for id in ["a", "b", "c", "d"] {
            assert!(book.remember("d", id, Arc::clone(&spec), rows(1)));
        }
        assert_eq!(book.len(), 3);
        assert_eq!(book.label("d", "a", &numbers(&[0.0])), Outcome::Unknown);
        // Eight rows need room for an id and for rows: b goes, c and d stay.
        assert!(book.remember("d", "e", Arc::clone(&spec), rows(8)));
        assert_eq!((book.len(), book.rows()), (3, 10));
        assert_eq!(book.label("d", "b", &numbers(&[0.0])), Outcome::Unknown);
        // Two rows more: the oldest, c and d, go although one id would do.
        assert!(book.remember("d", "f", Arc::clone(&spec), rows(2)));
        assert_eq!((book.len(), book.rows()), (2, 10));
        assert_eq!(book.label("d", "c", &numbers(&[0.0])), Outcome::Unknown);
        assert_eq!(book.label("d", "d", &numbers(&[0.0])), Outcome::Unknown);
        assert!(matches!(
            book.label("d", "f", &numbers(&[0.0, 0.0])),
            Outcome::Matched { .. }
        ));
        // Too large, too long or empty ids, and empty answers, are not kept.
        assert!(!book.remember("d", "big", Arc::clone(&spec), rows(11)));
        assert!(!book.remember("d", "", Arc::clone(&spec), rows(1)));
        assert!(!book.remember(
            "d",
            &"x".repeat(MAX_ID_BYTES + 1),
            Arc::clone(&spec),
            rows(1)
        ));
        assert!(!book.remember("d", "none", Arc::clone(&spec), rows(0)));
        // The same id again replaces the earlier answers.
        assert!(book.remember("d", "e", Arc::clone(&spec), rows(2)));
        assert_eq!((book.len(), book.rows()), (1, 2));
        // A labelled id leaves no trace in the order: many remember-and-label
        // rounds keep the book at one entry.
        for i in 0..1000 {
            let id = format!("t{i}");
            assert!(book.remember("d", &id, Arc::clone(&spec), rows(1)));
            assert!(matches!(
                book.label("d", &id, &numbers(&[0.0])),
                Outcome::Matched { .. }
            ));
        }
        assert_eq!((book.len(), book.order.len()), (1, 1));
    }

    #[test]
    fn scores_add_up_per_version_until_taken() {
        let feedback = Feedback::with_bounds("0123abcd-ef45-6789", 100, 1000);
        let spec = classifier(&["a", "b", "c"]);
        {
            let mut book = feedback.book.lock().expect("book");
            for (id, answer) in [("x", 0), ("y", 1), ("z", 2)] {
                book.remember(
                    "iris",
                    id,
                    Arc::clone(&spec),
                    Answers::Classes(vec![answer]),
                );
            }
        }
        let items = parse_body(
            br#"{"feedback":[{"id":"x","label":0},{"id":"y","label":"a"},{"id":"nope","label":0},{"id":"z","labels":[9]}]}"#,
        )
        .expect("parses");
        let (answer, unknown) = feedback.label("iris", items);
        assert_eq!(answer.matched, 2);
        assert_eq!(answer.unknown, ["nope"]);
        assert_eq!(unknown.len(), 1);
        assert_eq!(answer.rejected.len(), 1);
        assert_eq!(answer.rejected[0].id, "z");
        assert!(answer.rejected[0].error.contains("out of range"));
        let scores = feedback.take_scores();
        assert_eq!(scores.len(), 1);
        let s = &scores[0];
        assert_eq!(
            (s.deployment.as_str(), s.model.as_str(), s.version),
            ("iris", "m", 2)
        );
        assert_eq!((s.labelled, s.correct, s.classification), (2, 1, true));
        assert!(feedback.take_scores().is_empty());
        // Merging an unsent report adds.
        let mut pending = s.clone();
        merge(&mut pending, s);
        assert_eq!((pending.labelled, pending.correct), (4, 2));
    }

    #[test]
    fn generated_ids_are_unique_and_a_callers_id_is_kept() {
        let a = Feedback::new("0123abcd-ef45-6789");
        let mut first = None;
        let mut second = None;
        a.ensure_id(&mut first);
        a.ensure_id(&mut second);
        let (first, second) = (first.expect("id"), second.expect("id"));
        assert!(first.starts_with("0123abcd-"), "{first}");
        assert_ne!(first, second);
        let mut given = Some("client-7".to_string());
        a.ensure_id(&mut given);
        assert_eq!(given.as_deref(), Some("client-7"));
    }

    #[test]
    fn still_unknown_keeps_the_items_another_worker_did_not_know() {
        let items = vec![
            FeedbackItem {
                id: "a".into(),
                labels: numbers(&[1.0]),
            },
            FeedbackItem {
                id: "b".into(),
                labels: numbers(&[1.0]),
            },
        ];
        let answer = FeedbackAnswer {
            matched: 1,
            unknown: vec!["b".into()],
            rejected: vec![],
        };
        let left = still_unknown(items, &answer);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, "b");
    }
}
