//! Counts what a replica serves into its model version's reference bins, for the
//! drift monitor on the leader.
//!
//! Each answered request adds its feature rows (the model input the reference
//! describes) and its prediction rows (the output, when the caller asked for it)
//! to the window open here; [`Monitor::take`] hands the window to the telemetry
//! loop and opens a fresh one. The engine's inference threads call
//! [`Monitor::observe`] once per batch, so the lock is taken once per batch, and
//! what is kept is a count and a sum per bin: memory does not grow with traffic.
//!
//! CPU is bounded too: a replica counts at most [`MAX_COUNTED_ROWS_PER_SEC`] rows
//! a second. Below that rate it counts every row; above it, an even sample (every
//! k-th row of each batch, k chosen from what is left of the second's budget), so
//! the cost of drift telemetry stays a few milliseconds a second however fast the
//! model serves. A window of a minute still holds up to 1.2 million rows, far
//! more than the statistics need.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use kiln_common::drift::LiveColumn;
use kiln_common::reference::{FeatureStats, ReferenceStats};
use kiln_proto::v1::ModelTelemetry;

use super::{DataType, Signature, Tensor};

/// Most rows one replica counts per second (an even sample above it).
pub const MAX_COUNTED_ROWS_PER_SEC: u64 = 20_000;

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
    started: Instant,
    /// Rows counted a second at most.
    budget: u64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Rows counted.
    rows: u64,
    columns: Vec<LiveColumn>,
    /// The second (since `started`) the budget below is for.
    second: u64,
    /// Rows counted in that second.
    counted_in_second: u64,
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
            started: Instant::now(),
            budget: MAX_COUNTED_ROWS_PER_SEC,
            window: Mutex::new(Window {
                rows: 0,
                columns,
                second: 0,
                counted_in_second: 0,
            }),
        })
    }

    /// The same monitor with another budget of rows counted a second (the
    /// benchmark measures the cost of counting with `u64::MAX`).
    pub fn with_row_budget(mut self, rows_per_sec: u64) -> Monitor {
        self.budget = rows_per_sec.max(1);
        self
    }

    /// Counts the answered requests of a batch: each item is a request's inputs
    /// (in the model's order) and the outputs it was answered with.
    pub fn observe<'a>(
        &self,
        answered: impl Iterator<Item = (&'a [Tensor], &'a [Tensor])> + Clone,
    ) {
        let features_of = |inputs: &'a [Tensor]| inputs.iter().find(|t| t.name == self.input);
        let batch_rows: u64 = answered
            .clone()
            .filter_map(|(inputs, _)| features_of(inputs))
            .map(|x| x.shape.first().copied().unwrap_or(0) as u64)
            .sum();
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let window = &mut *window;
        let second = self.started.elapsed().as_secs();
        if second != window.second {
            window.second = second;
            window.counted_in_second = 0;
        }
        let allowance = self.budget.saturating_sub(window.counted_in_second);
        if batch_rows == 0 || allowance == 0 {
            return;
        }
        let stride = batch_rows.div_ceil(allowance) as usize;
        // Rows of the batch so far, so that the sample is every stride-th row of
        // the whole batch, whatever its requests' sizes.
        let mut seen = 0;
        for (inputs, outputs) in answered {
            let Some(x) = features_of(inputs) else {
                continue;
            };
            let first = (stride - seen % stride) % stride;
            let (features, predictions) = window.columns.split_at_mut(self.features);
            let (feature_refs, prediction_refs) = self.reference.columns.split_at(self.features);
            let counted = count(features, feature_refs, x, first, stride);
            window.rows += counted;
            window.counted_in_second += counted;
            let answered = self
                .output
                .as_ref()
                .and_then(|name| outputs.iter().find(|t| &t.name == name));
            if let Some(y) = answered {
                count(predictions, prediction_refs, y, first, stride);
            }
            seen += x.shape.first().copied().unwrap_or(0);
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

/// Adds rows `first`, `first + stride`, ... of a `[rows, columns.len()]` FP32
/// tensor column by column into the bins of `references` (one per column);
/// returns the rows counted (0 for a tensor of another shape, which is not
/// counted).
fn count(
    columns: &mut [LiveColumn],
    references: &[FeatureStats],
    tensor: &Tensor,
    first: usize,
    stride: usize,
) -> u64 {
    let width = columns.len();
    if width == 0 || tensor.shape.len() != 2 || tensor.shape[1] != width {
        return 0;
    }
    let mut rows = 0;
    for row in tensor
        .data
        .chunks_exact(4 * width)
        .skip(first)
        .step_by(stride.max(1))
    {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::Spec;

    const FEATURES: usize = 2;

    fn signature() -> Signature {
        let matrix = |name: &str, width: i64| Spec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, width],
        };
        Signature {
            inputs: vec![matrix("input", FEATURES as i64)],
            outputs: vec![matrix("output", 1)],
        }
    }

    fn reference() -> ReferenceStats {
        let a: Vec<f32> = (0..100).map(|i| i as f32).collect();
        ReferenceStats::compute(&[("a", &a), ("b", &a), ("output", &a)])
    }

    fn tensor(name: &str, width: usize, values: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![values.len() / width, width],
            data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }
    }

    #[test]
    fn every_row_of_a_batch_is_counted_with_its_prediction() {
        let monitor = Monitor::new("m", 3, FEATURES, reference(), &signature()).expect("monitor");
        let inputs = [
            vec![tensor("input", 2, &[1.0, 50.0, 2.0, f32::NAN])],
            vec![tensor("input", 2, &[99.0, 99.0])],
        ];
        let outputs = [vec![tensor("output", 1, &[10.0, 20.0])], vec![]];
        monitor.observe(
            inputs
                .iter()
                .zip(&outputs)
                .map(|(i, o)| (i.as_slice(), o.as_slice())),
        );
        let taken = monitor.take().expect("counted");
        assert_eq!(
            (taken.model.as_str(), taken.version, taken.rows),
            ("m", 3, 3)
        );
        assert_eq!(taken.columns[0].counts.iter().sum::<u64>(), 3);
        assert_eq!(taken.columns[1].non_finite, 1);
        assert_eq!(
            taken.columns[2].counts.iter().sum::<u64>(),
            2,
            "the second request asked for no output"
        );
        assert!(monitor.take().is_none(), "a fresh window after take");
    }

    #[test]
    fn above_the_budget_an_even_sample_is_counted() {
        let monitor = Monitor::new("m", 1, FEATURES, reference(), &signature()).expect("monitor");
        let rows = 3 * MAX_COUNTED_ROWS_PER_SEC as usize;
        let x: Vec<f32> = (0..rows * FEATURES).map(|i| (i % 100) as f32).collect();
        let inputs = [vec![tensor("input", 2, &x)]];
        let outputs = [vec![tensor("output", 1, &vec![5.0; rows])]];
        monitor.observe(
            inputs
                .iter()
                .zip(&outputs)
                .map(|(i, o)| (i.as_slice(), o.as_slice())),
        );
        let taken = monitor.take().expect("counted");
        assert_eq!(taken.rows, MAX_COUNTED_ROWS_PER_SEC, "every third row");
        assert_eq!(
            taken.columns[2].counts.iter().sum::<u64>(),
            MAX_COUNTED_ROWS_PER_SEC
        );
        // The budget of this second is spent: the next batch counts nothing
        // (unless the second has just turned).
        monitor.observe(
            inputs
                .iter()
                .zip(&outputs)
                .map(|(i, o)| (i.as_slice(), o.as_slice())),
        );
        let again = monitor.take().map_or(0, |t| t.rows);
        assert!(again == 0 || again == MAX_COUNTED_ROWS_PER_SEC, "{again}");
    }

    #[test]
    fn a_model_whose_inputs_the_reference_does_not_describe_is_not_monitored() {
        let err = Monitor::new("m", 1, 3, reference(), &signature()).expect_err("3 features");
        assert!(err.contains("[-1, 3]"), "{err}");
    }
}
