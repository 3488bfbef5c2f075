//! Counts what a replica serves into its model version's reference bins, for the
//! drift monitor on the leader.
//!
//! Each answered request adds its feature rows (the model input the reference
//! describes) and its prediction rows (the output, when the caller asked for it)
//! to the window open here; [`Monitor::take`] hands the window to the telemetry
//! loop and opens a fresh one. The engine's inference threads call
//! [`Monitor::observe`] once per batch, so the lock is taken once per batch, and
//! what is kept is a count and a sum per bin: memory does not grow with traffic.

use std::sync::{Mutex, PoisonError};

use kiln_common::drift::LiveColumn;
use kiln_common::reference::{FeatureStats, ReferenceStats};
use kiln_proto::v1::ModelTelemetry;

use super::{DataType, Signature, Tensor};

/// The window of one replica's served values.
#[derive(Debug)]
pub struct Monitor {
    model: String,
    version: u64,
    /// The model input that holds the features, `[rows, features]` FP32.
    input: String,
    /// The model output that holds the predictions, `[rows, outputs]` FP32.
    output: Option<String>,
    features: usize,
    reference: ReferenceStats,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    rows: u64,
    columns: Vec<LiveColumn>,
}

impl Monitor {
    /// A monitor for a model version whose reference lists `features` input
    /// columns, then its output columns; refused when no FP32 `[-1, features]`
    /// input of the signature matches (a model registered without a reference of
    /// its own inputs). Predictions are counted when an FP32 output has as many
    /// columns as the reference has output columns.
    pub fn new(
        model: &str,
        version: u64,
        features: usize,
        reference: ReferenceStats,
        signature: &Signature,
    ) -> Result<Monitor, String> {
        let outputs = reference
            .columns
            .len()
            .checked_sub(features)
            .ok_or_else(|| {
                format!(
                    "the reference has {} columns, fewer than the {features} features",
                    reference.columns.len()
                )
            })?;
        let matrix = |width: usize| {
            move |spec: &&super::Spec| {
                spec.datatype == DataType::Fp32
                    && spec.shape.len() == 2
                    && spec.shape[1] == width as i64
            }
        };
        let input = signature
            .inputs
            .iter()
            .find(matrix(features))
            .ok_or_else(|| {
                format!("no FP32 input of shape [-1, {features}] holds the reference's features")
            })?
            .name
            .clone();
        let output = (outputs > 0)
            .then(|| signature.outputs.iter().find(matrix(outputs)))
            .flatten()
            .map(|spec| spec.name.clone());
        let columns = fresh(&reference);
        Ok(Monitor {
            model: model.to_string(),
            version,
            input,
            output,
            features,
            reference,
            window: Mutex::new(Window { rows: 0, columns }),
        })
    }

    /// Counts the answered requests of a batch: each item is a request's inputs
    /// (in the model's order) and the outputs it was answered with.
    pub fn observe<'a>(&self, answered: impl Iterator<Item = (&'a [Tensor], &'a [Tensor])>) {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let window = &mut *window;
        for (inputs, outputs) in answered {
            let Some(x) = inputs.iter().find(|t| t.name == self.input) else {
                continue;
            };
            let (features, predictions) = window.columns.split_at_mut(self.features);
            let (feature_refs, prediction_refs) = self.reference.columns.split_at(self.features);
            window.rows += count(features, feature_refs, x);
            let answered = self
                .output
                .as_ref()
                .and_then(|name| outputs.iter().find(|t| &t.name == name));
            if let Some(y) = answered {
                count(predictions, prediction_refs, y);
            }
        }
    }

    /// Hands over the window (when it counted anything) and opens a fresh one.
    pub fn take(&self) -> Option<ModelTelemetry> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if window.rows == 0 {
            return None;
        }
        let columns = std::mem::replace(&mut window.columns, fresh(&self.reference));
        let rows = std::mem::take(&mut window.rows);
        Some(ModelTelemetry {
            model: self.model.clone(),
            version: self.version,
            rows,
            columns: columns.iter().map(LiveColumn::to_proto).collect(),
        })
    }
}

/// Adds a `[rows, columns.len()]` FP32 tensor column by column into the bins of
/// `references` (one per column); returns its rows (0 for a tensor of another
/// shape, which is not counted).
fn count(columns: &mut [LiveColumn], references: &[FeatureStats], tensor: &Tensor) -> u64 {
    let width = columns.len();
    if width == 0 || tensor.shape.len() != 2 || tensor.shape[1] != width {
        return 0;
    }
    let mut rows = 0;
    for row in tensor.data.chunks_exact(4 * width) {
        for ((column, reference), value) in
            columns.iter_mut().zip(references).zip(row.chunks_exact(4))
        {
            let value = f32::from_le_bytes([value[0], value[1], value[2], value[3]]);
            column.observe(reference, value);
        }
        rows += 1;
    }
    rows
}

/// Empty counts for every reference column.
fn fresh(reference: &ReferenceStats) -> Vec<LiveColumn> {
    reference
        .columns
        .iter()
        .map(|c| LiveColumn::new(c.bins()))
        .collect()
}
