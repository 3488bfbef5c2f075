//! A model's reference statistics for drift detection: per input feature and per
//! prediction column, bin edges frozen at training time, the training data's count
//! in each bin, and its moments. Stored as JSON beside the model version.
//!
//! Why frozen quantile bins. Evidently bins a numeric column with many values into
//! Sturges equal-width bins over the reference *and* the current window together,
//! and NannyML into Doane bins over the reference with a leftover bin for values
//! outside it; both recompute bins from raw values. kiln's replicas only count, and
//! the coordinator adds their counts across replicas and windows, which is exact
//! only if every replica uses the same edges, chosen once. The edges are the
//! reference's quantiles ([`BINS`] bins of about a twentieth of the rows each, as
//! many as the Sturges bins Evidently draws for 100,000 rows), so no reference bin
//! is nearly empty and PSI's `ln(ref / cur)` stays tame on skewed features, where
//! equal-width bins would leave most bins empty. Each bin also keeps the sum of its
//! values, so that distances between distributions (Wasserstein) place a bin's
//! mass at its mean rather than at a guessed centre.
//!
//! The edges, for `n` finite reference values sorted as `v`:
//!
//! ```text
//! edge_k = v[⌊k·n / BINS⌋]  for k = 1 … BINS-1, then duplicates removed
//!
//!   bin 0          bin 1          …   bin k
//! (-∞, e₀)   [e₀, e₁)   …   [e_{k-1}, +∞)
//! ```
//!
//! Edges are data values, so a discrete feature gets one bin per value (its
//! duplicate edges collapse) and a value equal to an edge always falls in the bin
//! above it. The outer bins are open, so live values beyond the reference range still
//! land in a bin. When the top edge is the reference maximum (a discrete or constant
//! column), one more edge just above it gives values above the maximum a bin of
//! their own, as values below the minimum already have.
//!
//! NaN and ±∞ are never binned and never enter the moments: they are counted in
//! `non_finite`, so a missing-value rate can be compared on its own.

use kiln_proto::v1::ReferenceColumn;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Number of bins the reference quantiles aim at (fewer where values repeat).
pub const BINS: usize = 20;

/// Up to this many edges, a bin is found by counting edges rather than by
/// binary search.
const LINEAR_EDGES: usize = 64;

/// Version of the JSON layout below, raised whenever it changes so that a reader can
/// tell the reference of an older model version apart.
pub const FORMAT: u32 = 1;

/// The statistics of every column a model was trained and evaluated on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceStats {
    pub format: u32,
    /// One entry per column, in the order given to [`ReferenceStats::compute`].
    pub columns: Vec<FeatureStats>,
}

/// One column's frozen bins, reference counts and moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    pub name: String,
    /// Inner bin edges, strictly increasing; `edges.len() + 1` bins (see the module
    /// docs).
    pub edges: Vec<f32>,
    /// The reference's finite values in each bin; sums to `count`.
    pub counts: Vec<u64>,
    /// The sum of the values in each bin (empty in references written before it
    /// was kept).
    #[serde(default)]
    pub sums: Vec<f64>,
    /// Finite values.
    pub count: u64,
    /// NaN and ±∞ values, which are in no bin and no moment.
    pub non_finite: u64,
    /// Mean of the finite values; 0 when there are none.
    pub mean: f64,
    /// Population standard deviation (ddof 0, as Evidently's `np.std`) of the
    /// finite values; 0 when there are none.
    pub std: f64,
    /// Smallest finite value; 0 when there are none.
    pub min: f32,
    /// Largest finite value; 0 when there are none.
    pub max: f32,
}

impl ReferenceStats {
    /// Computes every column's statistics with [`BINS`] target bins.
    pub fn compute(columns: &[(&str, &[f32])]) -> ReferenceStats {
        ReferenceStats {
            format: FORMAT,
            columns: columns
                .iter()
                .map(|(name, values)| FeatureStats::compute(name, values, BINS))
                .collect(),
        }
    }

    /// The statistics of a model's data given as row-major tables: `x` holds
    /// rows of `features.len()` input values, `y` the same rows of
    /// `outputs.len()` answers; features come first, as [`Self::feature_count`]
    /// expects.
    pub fn from_rows(
        features: &[String],
        x: &[f32],
        outputs: &[String],
        y: &[f32],
    ) -> ReferenceStats {
        let column = |table: &[f32], width: usize, j: usize| -> Vec<f32> {
            table
                .iter()
                .skip(j)
                .step_by(width.max(1))
                .copied()
                .collect()
        };
        let columns: Vec<(&str, Vec<f32>)> = features
            .iter()
            .enumerate()
            .map(|(j, name)| (name.as_str(), column(x, features.len(), j)))
            .chain(
                outputs
                    .iter()
                    .enumerate()
                    .map(|(j, name)| (name.as_str(), column(y, outputs.len(), j))),
            )
            .collect();
        let borrowed: Vec<(&str, &[f32])> =
            columns.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        ReferenceStats::compute(&borrowed)
    }

    /// Number of leading input-feature columns: the output columns that follow are
    /// named `output` or `output:<name>` (as the trainer and `kiln models
    /// register` write them).
    pub fn feature_count(&self) -> usize {
        self.columns
            .iter()
            .take_while(|c| !is_output_column(&c.name))
            .count()
    }

    /// Returns the column called `name`.
    pub fn column(&self, name: &str) -> Option<&FeatureStats> {
        self.columns.iter().find(|c| c.name == name)
    }
}

impl FeatureStats {
    /// Computes one column's statistics with up to `bins` quantile bins (plus one
    /// above a repeated maximum; `bins` of 0 is taken as 1).
    pub fn compute(name: &str, values: &[f32], bins: usize) -> FeatureStats {
        let bins = bins.max(1);
        let mut finite: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
        finite.sort_by(f32::total_cmp);
        let n = finite.len();

        let mut edges: Vec<f32> = (1..bins)
            .filter_map(|k| finite.get(k * n / bins))
            .copied()
            .collect();
        // -0.0 and 0.0 are one value to `<=`, so deduplicate by comparison, not bits.
        edges.dedup_by(|a, b| a == b);
        if let (Some(&top), Some(&max)) = (edges.last(), finite.last()) {
            if top == max {
                edges.push(next_above(max));
            }
        }

        let mut stats = FeatureStats {
            name: name.to_string(),
            counts: vec![0; edges.len() + 1],
            sums: vec![0.0; edges.len() + 1],
            edges,
            count: n as u64,
            non_finite: (values.len() - n) as u64,
            mean: 0.0,
            std: 0.0,
            min: finite.first().copied().unwrap_or(0.0),
            max: finite.last().copied().unwrap_or(0.0),
        };
        for &v in &finite {
            if let Some(bin) = stats.bin_of(v) {
                stats.counts[bin] += 1;
                stats.sums[bin] += f64::from(v);
            }
        }
        if n > 0 {
            let mean = finite.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let var = finite
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            stats.mean = mean;
            stats.std = var.sqrt();
        }
        stats
    }

    /// Returns the bin `value` falls in, or `None` for NaN and ±∞, which are counted
    /// apart (an `Option` rather than a sentinel index, so no caller can add a NaN to
    /// a real bin by mistake).
    pub fn bin_of(&self, value: f32) -> Option<usize> {
        if !value.is_finite() {
            return None;
        }
        // The edges are sorted, so the bin is the number of edges at or below
        // the value. For the usual handful of edges, counting them all without
        // a branch (which the compiler turns into vector compares) is several
        // times faster than a binary search, whose branches mispredict.
        Some(if self.edges.len() <= LINEAR_EDGES {
            self.edges.iter().map(|&e| usize::from(e <= value)).sum()
        } else {
            self.edges.partition_point(|e| *e <= value)
        })
    }

    /// Number of bins: `counts.len()`.
    pub fn bins(&self) -> usize {
        self.edges.len() + 1
    }

    /// The registry's form of these statistics.
    pub fn to_proto(&self) -> ReferenceColumn {
        ReferenceColumn {
            name: self.name.clone(),
            edges: self.edges.clone(),
            counts: self.counts.clone(),
            sums: self.sums.clone(),
            count: self.count,
            non_finite: self.non_finite,
            mean: self.mean,
            std: self.std,
            min: self.min,
            max: self.max,
        }
    }

    /// Reads the registry's form, refusing one whose bins do not hold together
    /// (edges not strictly increasing, or counts and sums that do not match them).
    pub fn from_proto(column: &ReferenceColumn) -> Result<FeatureStats> {
        let bad = |what: String| {
            Error::InvalidArgument(format!("reference column {:?}: {what}", column.name))
        };
        if !column.edges.iter().all(|e| e.is_finite())
            || column.edges.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(bad(
                "bin edges must be finite and strictly increasing".into()
            ));
        }
        let bins = column.edges.len() + 1;
        if column.counts.len() != bins {
            return Err(bad(format!(
                "{} edges make {bins} bins, but there are {} counts",
                column.edges.len(),
                column.counts.len()
            )));
        }
        if !column.sums.is_empty() && column.sums.len() != bins {
            return Err(bad(format!(
                "{bins} bins, but there are {} sums",
                column.sums.len()
            )));
        }
        let total = column
            .counts
            .iter()
            .try_fold(0u64, |sum, &c| sum.checked_add(c));
        if total != Some(column.count) {
            return Err(bad(format!(
                "the bin counts do not add up to the count {}",
                column.count
            )));
        }
        Ok(FeatureStats {
            name: column.name.clone(),
            edges: column.edges.clone(),
            counts: column.counts.clone(),
            sums: column.sums.clone(),
            count: column.count,
            non_finite: column.non_finite,
            mean: column.mean,
            std: column.std,
            min: column.min,
            max: column.max,
        })
    }
}

impl ReferenceStats {
    /// The registry's form: one column per feature, then per output.
    pub fn to_proto(&self) -> Vec<ReferenceColumn> {
        self.columns.iter().map(FeatureStats::to_proto).collect()
    }

    /// Reads the registry's form (see [`FeatureStats::from_proto`]).
    pub fn from_proto(columns: &[ReferenceColumn]) -> Result<ReferenceStats> {
        Ok(ReferenceStats {
            format: FORMAT,
            columns: columns
                .iter()
                .map(FeatureStats::from_proto)
                .collect::<Result<_>>()?,
        })
    }
}

/// True for the name of an output (prediction) column.
pub fn is_output_column(name: &str) -> bool {
    name == "output" || name.starts_with("output:")
}

/// The smallest f32 greater than the finite `v` (`f32::next_up` needs Rust 1.86).
fn next_above(v: f32) -> f32 {
    if v == 0.0 {
        return f32::from_bits(1);
    }
    let bits = v.to_bits();
    if v > 0.0 {
        f32::from_bits(bits + 1)
    } else {
        f32::from_bits(bits - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(values: &[f32]) -> FeatureStats {
        FeatureStats::compute("x", values, BINS)
    }

    /// Counts by brute force: values `>=` each edge.
    fn brute_counts(edges: &[f32], values: &[f32]) -> Vec<u64> {
        let mut counts = vec![0; edges.len() + 1];
        for v in values.iter().filter(|v| v.is_finite()) {
            counts[edges.iter().filter(|e| *e <= v).count()] += 1;
        }
        counts
    }

    #[test]
    fn distinct_values_split_into_equal_quantile_bins() {
        let values: Vec<f32> = (0..100).rev().map(|i| i as f32).collect();
        let s = stats(&values);
        assert_eq!(s.edges, (1..20).map(|k| (k * 5) as f32).collect::<Vec<_>>());
        assert_eq!(s.counts, vec![5; 20]);
        let first_bin: f64 = (0..5).map(f64::from).sum();
        assert_eq!((s.sums[0], s.sums[19]), (first_bin, first_bin + 95.0 * 5.0));
        assert_eq!((s.min, s.max, s.count, s.non_finite), (0.0, 99.0, 100, 0));
        assert!((s.mean - 49.5).abs() < 1e-12);
        let std = (((100 * 100 - 1) as f64) / 12.0).sqrt();
        assert!((s.std - std).abs() < 1e-9, "{}", s.std);
        // The outer bins are open: values beyond the reference still land.
        assert_eq!(s.bin_of(-1e30), Some(0));
        assert_eq!(s.bin_of(1e30), Some(19));
        assert_eq!(
            s.bin_of(5.0),
            Some(1),
            "an edge belongs to the bin above it"
        );
        assert_eq!(s.bin_of(4.99), Some(0));
    }

    #[test]
    fn uneven_row_counts_keep_bins_within_one_row_of_each_other() {
        for n in [41usize, 23, 101, 999] {
            let values: Vec<f32> = (0..n).map(|i| (i as f32).sqrt()).collect();
            let s = stats(&values);
            assert_eq!(s.bins(), BINS, "{n} rows");
            let (lo, hi) = (n / BINS, n.div_ceil(BINS));
            assert!(
                s.counts
                    .iter()
                    .all(|&c| c as usize >= lo && c as usize <= hi),
                "{n} rows: {:?}",
                s.counts
            );
        }
    }

    #[test]
    fn discrete_values_get_a_bin_each_and_room_above_and_below() {
        let mut values = vec![0.0; 70];
        values.extend([1.0; 20]);
        values.extend([2.0; 10]);
        let s = stats(&values);
        assert_eq!(s.edges, vec![0.0, 1.0, 2.0, next_above(2.0)]);
        assert_eq!(s.counts, vec![0, 70, 20, 10, 0]);
        assert_eq!(s.bin_of(-1.0), Some(0), "below the reference minimum");
        assert_eq!(s.bin_of(3.0), Some(4), "above the reference maximum");
        assert_eq!(s.bin_of(2.0), Some(3));
    }

    #[test]
    fn a_constant_column_has_one_full_bin_between_two_empty_ones() {
        let s = stats(&[4.5; 50]);
        assert_eq!(s.edges, vec![4.5, next_above(4.5)]);
        assert_eq!(s.counts, vec![0, 50, 0]);
        assert_eq!((s.mean, s.std, s.min, s.max), (4.5, 0.0, 4.5, 4.5));
        assert_eq!(s.bin_of(4.4), Some(0));
        assert_eq!(s.bin_of(4.5), Some(1));
        assert_eq!(s.bin_of(4.6), Some(2));

        for v in [0.0f32, -3.0, f32::MIN_POSITIVE, -f32::MIN_POSITIVE] {
            assert!(next_above(v) > v, "{v}");
            assert_eq!(
                stats(&[v; 3]).counts,
                vec![0, 3, 0],
                "constant {v}: nothing between it and the next edge"
            );
        }
    }

    #[test]
    fn nan_and_infinities_are_counted_apart_and_never_binned() {
        let values = [
            1.0,
            f32::NAN,
            2.0,
            f32::INFINITY,
            3.0,
            f32::NEG_INFINITY,
            4.0,
        ];
        let s = stats(&values);
        assert_eq!((s.count, s.non_finite), (4, 3));
        assert_eq!(s.counts.iter().sum::<u64>(), 4);
        assert_eq!((s.min, s.max, s.mean), (1.0, 4.0, 2.5));
        assert_eq!(s.bin_of(f32::NAN), None);
        assert_eq!(s.bin_of(f32::INFINITY), None);

        let empty = stats(&[f32::NAN, f32::NAN]);
        assert_eq!(empty.edges, Vec::<f32>::new());
        assert_eq!(empty.counts, vec![0]);
        assert_eq!((empty.count, empty.non_finite), (0, 2));
        assert_eq!(empty.bin_of(7.0), Some(0));
        let none = stats(&[]);
        assert_eq!((none.count, none.counts.clone()), (0, vec![0]));
    }

    #[test]
    fn bin_of_agrees_with_the_counts() {
        // A skewed mixture with ties, negative values and signed zeros.
        let mut state = 0x2545_f491_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let values: Vec<f32> = (0..5000)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => -0.0,
                2 => (next() * 10.0).round() as f32,
                _ => (-(next().max(1e-12)).ln() * 3.0 - 1.0) as f32,
            })
            .collect();
        let s = stats(&values);
        assert!(s.edges.windows(2).all(|w| w[0] < w[1]), "{:?}", s.edges);
        assert_eq!(s.counts, brute_counts(&s.edges, &values));
        let mut by_bin_of = vec![0u64; s.bins()];
        for &v in &values {
            by_bin_of[s.bin_of(v).expect("finite")] += 1;
        }
        assert_eq!(by_bin_of, s.counts);
    }

    #[test]
    fn reference_stats_round_trip_through_json() {
        let a: Vec<f32> = (0..40).map(|i| i as f32 * 0.25).collect();
        let b = [1.0, 0.0, 1.0, f32::NAN];
        let reference = ReferenceStats::compute(&[("a", &a), ("output:yes", &b)]);
        assert_eq!(reference.columns.len(), 2);
        assert_eq!(
            reference.column("output:yes").map(|c| c.non_finite),
            Some(1)
        );
        let json = serde_json::to_string(&reference).expect("to json");
        let back: ReferenceStats = serde_json::from_str(&json).expect("from json");
        assert_eq!(back, reference, "edges survive JSON bit for bit");
        let proto = ReferenceStats::from_proto(&reference.to_proto()).expect("from proto");
        assert_eq!(proto, reference, "and the registry's form");
    }

    #[test]
    fn row_major_tables_split_into_named_columns() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let x = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0];
        let y = [0.5, 0.7, 0.9];
        let r = ReferenceStats::from_rows(&names(&["a", "b"]), &x, &names(&["output"]), &y);
        let by_hand = ReferenceStats::compute(&[
            ("a", &[1.0, 2.0, 3.0]),
            ("b", &[10.0, 20.0, 30.0]),
            ("output", &[0.5, 0.7, 0.9]),
        ]);
        assert_eq!(r, by_hand);
        assert_eq!(r.feature_count(), 2);
    }

    #[test]
    fn a_reference_whose_bins_do_not_hold_together_is_refused() {
        let good = stats(&[1.0, 2.0, 3.0, 4.0]).to_proto();
        let mut unsorted = good.clone();
        unsorted.edges.reverse();
        let mut short = good.clone();
        short.counts.pop();
        let mut miscounted = good.clone();
        miscounted.count += 1;
        for (bad, what) in [
            (unsorted, "strictly increasing"),
            (short, "counts"),
            (miscounted, "add up"),
        ] {
            let err = FeatureStats::from_proto(&bad).expect_err(what).to_string();
            assert!(err.contains(what) && err.contains("\"x\""), "{err}");
        }
    }
}
