//! Drift of served data against a model's training reference.
//!
//! - `stats` and `ks`: the statistics themselves, each equal to scipy's (or
//!   Evidently's, where Evidently adds a rule of its own) on the same inputs, which
//!   the golden tests check against values a committed script computed with scipy.
//! - this module: the mergeable live counts a replica keeps per column
//!   ([`LiveColumn`]), and the verdict of one window ([`window_drift`]).
//!
//! Why counts. A replica never keeps raw values: it counts each served value into
//! the reference's frozen bins (and sums it into its bin), so the counts of every
//! replica and every telemetry interval add up exactly into one window per model
//! version. Every statistic is computed from the binned data:
//!
//! | statistic | from the bins |
//! |---|---|
//! | PSI, Jensen-Shannon | the two count vectors |
//! | chi-square, Z | the counts of the bins either side has values in |
//! | Kolmogorov-Smirnov | `ks_2samp` on the values replaced by their bin (ties) |
//! | Wasserstein | `wasserstein_distance` with each bin's mass at its mean |
//!
//! Which test decides is Evidently's default for a numeric column
//! (`_get_default_stattest`): with at most 1,000 reference rows, KS (p <= 0.05),
//! or chi-square (p < 0.05) for 3 to 5 distinct values, or the two-proportion Z
//! test (p < 0.05) for two; with more reference rows, the normed Wasserstein
//! distance (>= 0.1), or Jensen-Shannon (>= 0.1) for at most 5 distinct values.
//! Distinct values are counted as bins holding values on either side: a
//! discrete column gets a bin per value (see `reference`), a continuous one
//! [`crate::reference::BINS`]. A window drifts as a dataset when at least
//! `drift_share` of its features drift (Evidently's `DataDriftPreset`, 0.5); its
//! predictions drift when that share of its output columns do.

pub mod ks;
pub mod stats;

#[cfg(test)]
mod golden_tests;

use kiln_proto::v1::{ColumnCounts, ColumnDrift, DriftWindow};

use crate::reference::{FeatureStats, ReferenceStats};
use crate::{Error, Result};

/// Upper bounds (milliseconds) of the request latency buckets replicas report;
/// one more bucket holds everything slower.
pub const LATENCY_BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// The `q` quantile (0 to 1) of a latency histogram over [`LATENCY_BUCKETS_MS`]
/// (one more count for everything slower), in milliseconds, interpolated
/// linearly inside its bucket as Prometheus' `histogram_quantile` does; a
/// quantile in the overflow bucket reads as the last bound. `None` for an empty
/// histogram or a `q` outside [0, 1].
pub fn latency_quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().fold(0u64, |a, &c| a.saturating_add(c));
    if total == 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        let upto = below.saturating_add(count);
        if count > 0 && upto as f64 >= rank {
            let Some(&upper) = LATENCY_BUCKETS_MS.get(i) else {
                return LATENCY_BUCKETS_MS.last().copied();
            };
            let lower = if i == 0 {
                0.0
            } else {
                LATENCY_BUCKETS_MS[i - 1]
            };
            let within = (rank - below as f64) / count as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        below = upto;
    }
    LATENCY_BUCKETS_MS.last().copied()
}

/// Reference rows above which Evidently switches from p-value tests to distances.
const SMALL_REFERENCE: u64 = 1000;
/// At most this many distinct values make a column discrete for the test choice.
const DISCRETE_VALUES: usize = 5;
/// Evidently's thresholds: p-values below, distances at or above.
pub const P_VALUE_THRESHOLD: f64 = 0.05;
pub const DISTANCE_THRESHOLD: f64 = 0.1;
/// Smallest reference standard deviation the Wasserstein distance is divided by.
const MIN_STD: f64 = 0.001;

/// How windows are judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftSettings {
    /// Share of features (or output columns) that must drift for the dataset (or
    /// the predictions) to drift.
    pub drift_share: f64,
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings { drift_share: 0.5 }
    }
}

/// One column's served values, counted into its reference bins; windows and
/// replicas merge by adding.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveColumn {
    pub counts: Vec<u64>,
    pub sums: Vec<f64>,
    pub non_finite: u64,
    /// Of the finite values (+∞ and -∞ while there are none).
    pub min: f32,
    pub max: f32,
}

impl LiveColumn {
    /// An empty column of `bins` bins.
    pub fn new(bins: usize) -> LiveColumn {
        LiveColumn {
            counts: vec![0; bins],
            sums: vec![0.0; bins],
            non_finite: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }

    /// Counts one value into `reference`'s bins (which must be this column's).
    pub fn observe(&mut self, reference: &FeatureStats, value: f32) {
        match reference.bin_of(value) {
            Some(bin) => {
                self.counts[bin] += 1;
                self.sums[bin] += f64::from(value);
                self.min = self.min.min(value);
                self.max = self.max.max(value);
            }
            None => self.non_finite += 1,
        }
    }

    /// Finite values counted.
    pub fn rows(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another count of the same bins.
    pub fn merge(&mut self, other: &LiveColumn) -> Result<()> {
        if other.counts.len() != self.counts.len() || other.sums.len() != self.sums.len() {
            return Err(Error::InvalidArgument(format!(
                "cannot add counts of {} bins to counts of {} bins",
                other.counts.len(),
                self.counts.len()
            )));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
        self.non_finite = self.non_finite.saturating_add(other.non_finite);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        Ok(())
    }

    /// The telemetry form.
    pub fn to_proto(&self) -> ColumnCounts {
        ColumnCounts {
            counts: self.counts.clone(),
            sums: self.sums.clone(),
            non_finite: self.non_finite,
            min: self.min,
            max: self.max,
        }
    }

    /// Reads the telemetry form of a column with `bins` reference bins, refusing
    /// counts of another shape.
    pub fn from_proto(counts: &ColumnCounts, bins: usize) -> Result<LiveColumn> {
        if counts.counts.len() != bins || counts.sums.len() != bins {
            return Err(Error::InvalidArgument(format!(
                "expected counts and sums of {bins} bins, got {} counts and {} sums",
                counts.counts.len(),
                counts.sums.len()
            )));
        }
        Ok(LiveColumn {
            counts: counts.counts.clone(),
            sums: counts.sums.clone(),
            non_finite: counts.non_finite,
            min: counts.min,
            max: counts.max,
        })
    }
}

/// Judges one window of a model version: `live` holds one column per reference
/// column (features first, then `reference.columns.len() - features` outputs).
pub fn window_drift(
    reference: &ReferenceStats,
    features: usize,
    live: &[LiveColumn],
    settings: &DriftSettings,
) -> Result<DriftWindow> {
    if live.len() != reference.columns.len() || features > live.len() {
        return Err(Error::InvalidArgument(format!(
            "the window has {} columns and {features} features; the reference has {} columns",
            live.len(),
            reference.columns.len()
        )));
    }
    let mut columns = Vec::with_capacity(live.len());
    for (index, (r, l)) in reference.columns.iter().zip(live).enumerate() {
        let mut drift = column_drift(r, l)?;
        drift.output = index >= features;
        columns.push(drift);
    }
    let judged = |outputs: bool| {
        let of_kind = columns.iter().filter(|c| c.output == outputs);
        let total = of_kind.clone().count();
        let drifted = of_kind.filter(|c| c.drifted).count();
        (total, drifted)
    };
    let (feature_count, drifted_features) = judged(false);
    let (output_count, drifted_outputs) = judged(true);
    let over_share = |drifted: usize, total: usize| {
        total > 0 && drifted as f64 / total as f64 >= settings.drift_share
    };
    Ok(DriftWindow {
        rows: live.first().map_or(0, |c| c.rows() + c.non_finite),
        columns,
        features: feature_count as u32,
        drifted_features: drifted_features as u32,
        dataset_drift: over_share(drifted_features, feature_count),
        outputs: output_count as u32,
        drifted_outputs: drifted_outputs as u32,
        prediction_drift: over_share(drifted_outputs, output_count),
        ..DriftWindow::default()
    })
}

/// Every statistic of one column and the verdict of Evidently's default test (see
/// the module docs). A column with no finite live or reference values is not
/// judged (`drifted` false, statistics NaN).
pub fn column_drift(reference: &FeatureStats, live: &LiveColumn) -> Result<ColumnDrift> {
    if live.counts.len() != reference.counts.len() {
        return Err(Error::InvalidArgument(format!(
            "column {:?}: {} live bins against {} reference bins",
            reference.name,
            live.counts.len(),
            reference.counts.len()
        )));
    }
    let rows = live.rows();
    let mut drift = ColumnDrift {
        name: reference.name.clone(),
        rows,
        non_finite: live.non_finite,
        counts: live.counts.clone(),
        mean: if rows > 0 {
            live.sums.iter().sum::<f64>() / rows as f64
        } else {
            f64::NAN
        },
        statistic: f64::NAN,
        psi: f64::NAN,
        jensen_shannon: f64::NAN,
        wasserstein: f64::NAN,
        ks_statistic: f64::NAN,
        ks_p_value: f64::NAN,
        chi_square_p_value: f64::NAN,
        ..ColumnDrift::default()
    };
    if rows == 0 || reference.count == 0 {
        drift.test = "none".into();
        return Ok(drift);
    }
    let bad = |e: stats::StatsError| {
        Error::Internal(format!("drift of column {:?}: {e}", reference.name))
    };
    let ref_counts: Vec<f64> = reference.counts.iter().map(|&c| c as f64).collect();
    let live_counts: Vec<f64> = live.counts.iter().map(|&c| c as f64).collect();
    drift.psi = stats::psi(&ref_counts, &live_counts).map_err(bad)?;
    drift.jensen_shannon = stats::jensen_shannon(&ref_counts, &live_counts).map_err(bad)?;
    drift.wasserstein = normed_wasserstein(reference, live).map_err(bad)?;
    drift.ks_statistic =
        ks::ks_statistic_from_counts(&reference.counts, &live.counts).map_err(bad)?;

    // The bins either side has values in: the categories of chi-square and Z.
    let occupied: Vec<usize> = (0..live.counts.len())
        .filter(|&b| reference.counts[b] > 0 || live.counts[b] > 0)
        .collect();
    let (observed, expected): (Vec<f64>, Vec<f64>) = occupied
        .iter()
        .map(|&b| {
            (
                live_counts[b],
                ref_counts[b] * rows as f64 / reference.count as f64,
            )
        })
        .unzip();
    if occupied.len() >= 2 {
        drift.chi_square_p_value = stats::chisquare(&observed, &expected).map_err(bad)?.p_value;
    }

    let small = reference.count <= SMALL_REFERENCE;
    let discrete = occupied.len() <= DISCRETE_VALUES;
    let wants_ks_p = small && !discrete || rows.max(reference.count) > ks::MAX_EXACT_N;
    if wants_ks_p {
        drift.ks_p_value = ks::ks_p_value(drift.ks_statistic, reference.count, rows).0;
    }
    let (test, statistic, threshold, drifted) = match (small, discrete) {
        (true, false) => {
            let p = drift.ks_p_value;
            ("ks", p, P_VALUE_THRESHOLD, p <= P_VALUE_THRESHOLD)
        }
        (true, true) if occupied.len() > 2 => {
            let p = drift.chi_square_p_value;
            ("chi_square", p, P_VALUE_THRESHOLD, p < P_VALUE_THRESHOLD)
        }
        (true, true) => {
            let p = two_proportions(reference, live, &occupied).map_err(bad)?;
            ("z", p, P_VALUE_THRESHOLD, p < P_VALUE_THRESHOLD)
        }
        (false, true) => {
            let d = drift.jensen_shannon;
            (
                "jensen_shannon",
                d,
                DISTANCE_THRESHOLD,
                d >= DISTANCE_THRESHOLD,
            )
        }
        (false, false) => {
            let d = drift.wasserstein;
            (
                "wasserstein",
                d,
                DISTANCE_THRESHOLD,
                d >= DISTANCE_THRESHOLD,
            )
        }
    };
    drift.test = test.into();
    drift.statistic = statistic;
    drift.threshold = threshold;
    drift.drifted = drifted;
    Ok(drift)
}

/// Evidently's Z test on a column of at most two values: the share of the upper
/// value on each side (a column with one value has a share of 0 on both).
fn two_proportions(
    reference: &FeatureStats,
    live: &LiveColumn,
    occupied: &[usize],
) -> std::result::Result<f64, stats::StatsError> {
    let upper = occupied.get(1).copied();
    let ones = |counts: &[u64]| upper.map_or(0, |b| counts[b]);
    let test = stats::z_test(
        ones(&reference.counts),
        reference.count,
        ones(&live.counts),
        live.rows(),
    )?;
    Ok(test.p_value)
}

/// Evidently's normed Wasserstein distance, `wasserstein_distance(ref, cur) /
/// max(std(ref), 0.001)`, with each bin's mass at the mean of its values on its
/// own side (at the middle of the bin for a reference that kept no sums, the
/// outer bins bounded by the smallest and largest values seen).
fn normed_wasserstein(
    reference: &FeatureStats,
    live: &LiveColumn,
) -> std::result::Result<f64, stats::StatsError> {
    let lowest = f64::from(reference.min.min(live.min));
    let highest = f64::from(reference.max.max(live.max));
    let middle = |bin: usize| {
        let lo = bin
            .checked_sub(1)
            .map_or(lowest, |b| f64::from(reference.edges[b]));
        let hi = reference.edges.get(bin).map_or(highest, |&e| f64::from(e));
        (lo + hi) / 2.0
    };
    let atoms = |counts: &[u64], sums: &[f64]| -> (Vec<f64>, Vec<f64>) {
        counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(b, &c)| {
                let at = match sums.get(b) {
                    Some(sum) => sum / c as f64,
                    None => middle(b),
                };
                (at, c as f64)
            })
            .unzip()
    };
    let (ref_at, ref_w) = atoms(&reference.counts, &reference.sums);
    let (live_at, live_w) = atoms(&live.counts, &live.sums);
    let distance = stats::wasserstein(&ref_at, &live_at, Some(&ref_w), Some(&live_w))?;
    Ok(distance / reference.std.max(MIN_STD))
}

#[cfg(test)]
mod tests {
    #[test]
    fn latency_quantiles_interpolate_inside_their_bucket() {
        // 100 requests: 50 under 0.5 ms, 40 in (0.5, 1], 10 in (1, 2.5].
        let mut counts = vec![0u64; LATENCY_BUCKETS_MS.len() + 1];
        counts[0] = 50;
        counts[1] = 40;
        counts[2] = 10;
        assert_eq!(latency_quantile(&counts, 0.5), Some(0.5));
        let p70 = latency_quantile(&counts, 0.7).expect("p70");
        assert!((p70 - 0.75).abs() < 1e-12, "{p70}");
        let p99 = latency_quantile(&counts, 0.99).expect("p99");
        assert!((p99 - (1.0 + 1.5 * 0.9)).abs() < 1e-12, "{p99}");
        assert_eq!(latency_quantile(&counts, 0.0), Some(0.0));
        // Everything slower than the last bound reads as that bound.
        let mut slow = vec![0u64; LATENCY_BUCKETS_MS.len() + 1];
        slow[LATENCY_BUCKETS_MS.len()] = 3;
        assert_eq!(latency_quantile(&slow, 0.99), Some(10_000.0));
        assert_eq!(latency_quantile(&[0, 0], 0.5), None);
        assert_eq!(latency_quantile(&counts, 1.5), None);
    }

    use super::*;

    /// A deterministic normal sample (Box-Muller over xorshift).
    fn normal(n: usize, mean: f64, std: f64, seed: u64) -> Vec<f32> {
        let mut state = seed.max(1);
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (mean + std * z) as f32
            })
            .collect()
    }

    fn live(reference: &FeatureStats, values: &[f32]) -> LiveColumn {
        let mut column = LiveColumn::new(reference.bins());
        for &v in values {
            column.observe(reference, v);
        }
        column
    }

    #[test]
    fn counts_merge_by_adding_and_refuse_other_bins() {
        let reference = FeatureStats::compute("x", &normal(1000, 0.0, 1.0, 1), 20);
        let values = normal(500, 0.0, 1.0, 2);
        let whole = live(&reference, &values);
        let mut halves = live(&reference, &values[..200]);
        halves
            .merge(&live(&reference, &values[200..]))
            .expect("same bins");
        assert_eq!(halves.counts, whole.counts);
        assert_eq!((halves.min, halves.max), (whole.min, whole.max));
        for (a, b) in halves.sums.iter().zip(&whole.sums) {
            assert!((a - b).abs() < 1e-9);
        }
        let other = LiveColumn::new(3);
        assert!(halves.merge(&other).is_err());
        let proto = whole.to_proto();
        assert_eq!(
            LiveColumn::from_proto(&proto, reference.bins()).expect("shape"),
            whole
        );
        let err = LiveColumn::from_proto(&proto, 7)
            .expect_err("7 bins")
            .to_string();
        assert!(err.contains("7 bins"), "{err}");
    }

    #[test]
    fn a_large_reference_is_judged_by_the_normed_wasserstein_distance() {
        let reference = FeatureStats::compute("x", &normal(20_000, 3.0, 2.0, 3), 20);
        let same =
            column_drift(&reference, &live(&reference, &normal(5000, 3.0, 2.0, 4))).expect("drift");
        assert_eq!(same.test, "wasserstein");
        assert!(!same.drifted && same.statistic < 0.05, "{same:?}");
        // Half a standard deviation: the normed distance is about 0.5.
        let shifted =
            column_drift(&reference, &live(&reference, &normal(5000, 4.0, 2.0, 5))).expect("drift");
        assert!(shifted.drifted, "{shifted:?}");
        assert!((shifted.statistic - 0.5).abs() < 0.05, "{shifted:?}");
        assert!(shifted.psi > same.psi && shifted.ks_statistic > same.ks_statistic);
        assert!((shifted.mean - 4.0).abs() < 0.1);
    }

    #[test]
    fn a_small_reference_is_judged_by_ks_and_discrete_columns_by_chi_square_or_z() {
        let reference = FeatureStats::compute("x", &normal(500, 0.0, 1.0, 6), 20);
        let same =
            column_drift(&reference, &live(&reference, &normal(400, 0.0, 1.0, 7))).expect("drift");
        assert_eq!(same.test, "ks");
        assert!(!same.drifted && same.statistic > 0.05, "{same:?}");
        let moved =
            column_drift(&reference, &live(&reference, &normal(400, 0.5, 1.0, 8))).expect("drift");
        assert!(moved.drifted && moved.statistic <= 0.05, "{moved:?}");

        let three: Vec<f32> = (0..300).map(|i| (i % 3) as f32).collect();
        let reference = FeatureStats::compute("k", &three, 20);
        let tilted: Vec<f32> = (0..300)
            .map(|i| if i % 5 == 0 { 1.0 } else { 2.0 })
            .collect();
        let chi = column_drift(&reference, &live(&reference, &tilted)).expect("drift");
        assert_eq!(chi.test, "chi_square");
        assert!(chi.drifted, "{chi:?}");

        let two: Vec<f32> = (0..300).map(|i| (i % 2) as f32).collect();
        let reference = FeatureStats::compute("b", &two, 20);
        let z = column_drift(&reference, &live(&reference, &two)).expect("drift");
        assert_eq!(z.test, "z");
        assert!(!z.drifted && z.statistic > 0.9, "{z:?}");
    }

    #[test]
    fn a_window_drifts_when_half_its_features_do() {
        let columns: Vec<Vec<f32>> = (0..4).map(|i| normal(5000, 0.0, 1.0, 10 + i)).collect();
        let named: Vec<(String, &[f32])> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("f{i}"), c.as_slice()))
            .collect();
        let borrowed: Vec<(&str, &[f32])> = named.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        let reference = ReferenceStats::compute(&borrowed);
        let window = |shifted: usize| {
            let live: Vec<LiveColumn> = reference
                .columns
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mean = if i < shifted { 1.0 } else { 0.0 };
                    live(r, &normal(2000, mean, 1.0, 100 + i as u64))
                })
                .collect();
            window_drift(&reference, 3, &live, &DriftSettings::default()).expect("window")
        };
        let calm = window(0);
        assert_eq!(
            (calm.features, calm.outputs, calm.drifted_features),
            (3, 1, 0)
        );
        assert!(!calm.dataset_drift && !calm.prediction_drift);
        assert_eq!(calm.rows, 2000);
        let one = window(1);
        assert_eq!(one.drifted_features, 1);
        assert!(!one.dataset_drift, "a third is under half");
        let two = window(2);
        assert!(two.dataset_drift && !two.prediction_drift);
        let all = window(4);
        assert!(all.dataset_drift && all.prediction_drift);

        let err = window_drift(&reference, 3, &[], &DriftSettings::default())
            .expect_err("no columns")
            .to_string();
        assert!(err.contains("4 columns"), "{err}");
    }
}
