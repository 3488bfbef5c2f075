//! Drift statistics that compare a reference window with a current window.
//!
//! What: the population stability index (PSI), the Jensen–Shannon distance,
//! the 1-D Wasserstein distance, Pearson's chi-square goodness-of-fit test,
//! the pooled two-proportion Z test, and the two survival functions these
//! tests need (normal and chi-square).
//!
//! Why: kiln reports drift with the same numbers a data scientist gets from
//! scipy and Evidently on the same inputs, so every function here follows the
//! definition (and the edge-case conventions) of one named reference
//! implementation, and `golden_tests.rs` checks the outputs against values
//! that `scripts/drift_golden.py` computes with scipy to within 1e-9.
//!
//! Inputs are validated before any arithmetic: empty inputs, slices of
//! different lengths, negative or non-finite counts and weights, and inputs
//! whose totals are zero are rejected with a [`StatsError`] whose message names
//! the argument and, where it helps, the offending index.

use std::f64::consts::PI;
use std::fmt;

/// Bad input to a drift statistic; the message names the argument at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsError(String);

impl StatsError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        StatsError(message.into())
    }

    /// The human-readable description of the problem.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StatsError {}

// ---------------------------------------------------------------------------
// Input validation shared by the statistics (and by `ks`).
// ---------------------------------------------------------------------------

/// Rejects an empty slice.
pub(crate) fn require_nonempty<T>(name: &str, values: &[T]) -> Result<(), StatsError> {
    if values.is_empty() {
        return Err(StatsError::new(format!("{name} is empty")));
    }
    Ok(())
}

/// Rejects two slices that must be bin-aligned but have different lengths.
fn require_same_len(
    left_name: &str,
    left: &[f64],
    right_name: &str,
    right: &[f64],
) -> Result<(), StatsError> {
    if left.len() != right.len() {
        return Err(StatsError::new(format!(
            "{left_name} has {} bins but {right_name} has {}; they must be the same bins",
            left.len(),
            right.len()
        )));
    }
    Ok(())
}

/// Checks counts, frequencies or weights (finite, non-negative) and returns
/// their total, which must be positive and finite.
fn nonnegative_total(name: &str, values: &[f64]) -> Result<f64, StatsError> {
    require_nonempty(name, values)?;
    let mut total = 0.0;
    for (i, &v) in values.iter().enumerate() {
        if !v.is_finite() {
            return Err(StatsError::new(format!(
                "{name}[{i}] is {v}, not a finite number"
            )));
        }
        if v < 0.0 {
            return Err(StatsError::new(format!("{name}[{i}] is negative ({v})")));
        }
        total += v;
    }
    if total <= 0.0 {
        return Err(StatsError::new(format!("{name} sums to zero")));
    }
    if !total.is_finite() {
        return Err(StatsError::new(format!("{name} sums to infinity")));
    }
    Ok(total)
}

/// Rejects NaN and infinite sample values.
pub(crate) fn require_finite(name: &str, values: &[f64]) -> Result<(), StatsError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(StatsError::new(format!(
            "{name}[{i}] is {}, not a finite number",
            values[i]
        ))),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Population stability index (Evidently's `psi_stat_test`).
// ---------------------------------------------------------------------------

/// Population stability index of two histograms over the same bins.
///
/// Each histogram (`reference`, `current`: counts per bin) becomes shares
/// `r_i`, `c_i` that sum to one, and
/// `PSI = Σ (r_i − c_i) · ln(r_i / c_i)`.
///
/// An empty bin would make the logarithm infinite, so, as Evidently's
/// `get_binned_data(feel_zeroes=True)` does, every zero share of a histogram
/// is replaced by a small positive share: the histogram's smallest non-zero
/// share divided by 10⁶ when that share is at most 10⁻⁴, otherwise 10⁻⁴.
/// Each histogram is filled separately and is not renormalised afterwards.
pub fn psi(reference: &[f64], current: &[f64]) -> Result<f64, StatsError> {
    require_same_len("reference", reference, "current", current)?;
    let ref_total = nonnegative_total("reference", reference)?;
    let cur_total = nonnegative_total("current", current)?;
    let ref_fill = empty_bin_share(reference, ref_total);
    let cur_fill = empty_bin_share(current, cur_total);
    let share = |count: f64, total: f64, fill: f64| {
        if count == 0.0 {
            fill
        } else {
            count / total
        }
    };
    Ok(reference
        .iter()
        .zip(current)
        .map(|(&r, &c)| {
            let r = share(r, ref_total, ref_fill);
            let c = share(c, cur_total, cur_fill);
            (r - c) * (r / c).ln()
        })
        .sum())
}

/// The share Evidently substitutes for an empty bin (see [`psi`]).
fn empty_bin_share(counts: &[f64], total: f64) -> f64 {
    let smallest = counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| c / total)
        .fold(f64::INFINITY, f64::min);
    if smallest <= 1e-4 {
        smallest / 1e6
    } else {
        1e-4
    }
}

// ---------------------------------------------------------------------------
// Jensen–Shannon distance (scipy.spatial.distance.jensenshannon).
// ---------------------------------------------------------------------------

/// Jensen–Shannon distance between two histograms over the same bins, as
/// `scipy.spatial.distance.jensenshannon(p, q)` (natural logarithm).
///
/// Both inputs are normalised to probability vectors, `m = (p + q) / 2`, and
/// the distance is `sqrt((KL(p‖m) + KL(q‖m)) / 2)`, where a bin with zero
/// probability contributes nothing to its Kullback–Leibler sum
/// (`0 · ln 0 = 0`). It is 0 for identical histograms and at most `sqrt(ln 2)`.
pub fn jensen_shannon(p: &[f64], q: &[f64]) -> Result<f64, StatsError> {
    require_same_len("p", p, "q", q)?;
    let p_total = nonnegative_total("p", p)?;
    let q_total = nonnegative_total("q", q)?;
    let mut left = 0.0;
    let mut right = 0.0;
    for (&pi, &qi) in p.iter().zip(q) {
        let pi = pi / p_total;
        let qi = qi / q_total;
        let mi = (pi + qi) / 2.0;
        left += relative_entropy_term(pi, mi);
        right += relative_entropy_term(qi, mi);
    }
    // Rounding can leave the sum a hair below zero for identical inputs.
    Ok(((left + right) / 2.0).max(0.0).sqrt())
}

/// `x · ln(x / y)` with the convention that a zero `x` contributes zero.
fn relative_entropy_term(x: f64, y: f64) -> f64 {
    if x > 0.0 {
        x * (x / y).ln()
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------
// Wasserstein-1 distance (scipy.stats.wasserstein_distance).
// ---------------------------------------------------------------------------

/// First Wasserstein (earth mover's) distance between two 1-D empirical
/// distributions, as `scipy.stats.wasserstein_distance`.
///
/// With `U` and `V` the (weighted) empirical CDFs, the distance is the area
/// between them, `∫ |U(x) − V(x)| dx`. Both CDFs are step functions that only
/// change at the observed values, so the integral is a finite sum over the
/// gaps between consecutive values of the pooled sample. Without weights
/// every value weighs the same; weights are normalised by their total.
pub fn wasserstein(
    u_values: &[f64],
    v_values: &[f64],
    u_weights: Option<&[f64]>,
    v_weights: Option<&[f64]>,
) -> Result<f64, StatsError> {
    let u = weighted_sorted("u_values", u_values, "u_weights", u_weights)?;
    let v = weighted_sorted("v_values", v_values, "v_weights", v_weights)?;
    Ok(area_between_cdfs(&u, &v))
}

/// A sample sorted by value, each value paired with its weight, plus the
/// total weight.
struct WeightedSample {
    points: Vec<(f64, f64)>,
    total: f64,
}

/// Validates a sample and its optional weights and sorts it by value.
fn weighted_sorted(
    values_name: &str,
    values: &[f64],
    weights_name: &str,
    weights: Option<&[f64]>,
) -> Result<WeightedSample, StatsError> {
    require_nonempty(values_name, values)?;
    require_finite(values_name, values)?;
    let (mut points, total): (Vec<(f64, f64)>, f64) = match weights {
        None => (
            values.iter().map(|&x| (x, 1.0)).collect(),
            values.len() as f64,
        ),
        Some(w) => {
            if w.len() != values.len() {
                return Err(StatsError::new(format!(
                    "{weights_name} has {} entries but {values_name} has {}",
                    w.len(),
                    values.len()
                )));
            }
            let total = nonnegative_total(weights_name, w)?;
            (
                values.iter().copied().zip(w.iter().copied()).collect(),
                total,
            )
        }
    };
    points.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    Ok(WeightedSample { points, total })
}

/// `∫ |U − V|` for two sorted weighted samples: walk the pooled values in
/// order; between one distinct value and the next both CDFs are constant.
fn area_between_cdfs(u: &WeightedSample, v: &WeightedSample) -> f64 {
    let (mut i, mut j) = (0, 0);
    let (mut u_cum, mut v_cum) = (0.0, 0.0);
    let mut area = 0.0;
    let mut previous: Option<f64> = None;
    loop {
        let x = match (u.points.get(i), v.points.get(j)) {
            (Some(a), Some(b)) => a.0.min(b.0),
            (Some(a), None) => a.0,
            (None, Some(b)) => b.0,
            (None, None) => return area,
        };
        if let Some(prev) = previous {
            area += (u_cum / u.total - v_cum / v.total).abs() * (x - prev);
        }
        while let Some(&(_, weight)) = u.points.get(i).filter(|p| p.0 <= x) {
            u_cum += weight;
            i += 1;
        }
        while let Some(&(_, weight)) = v.points.get(j).filter(|p| p.0 <= x) {
            v_cum += weight;
            j += 1;
        }
        previous = Some(x);
    }
}

// ---------------------------------------------------------------------------
// Chi-square goodness of fit (scipy.stats.chisquare).
// ---------------------------------------------------------------------------

/// Result of Pearson's chi-square goodness-of-fit test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChiSquare {
    pub statistic: f64,
    pub p_value: f64,
    pub dof: u64,
}

/// Relative tolerance within which observed and expected totals must agree:
/// scipy uses the square root of the float64 machine epsilon.
const CHISQUARE_SUM_RTOL: f64 = 1.490_116_119_384_765_6e-8;

/// Pearson's chi-square goodness-of-fit test of observed bin frequencies
/// against expected ones, as `scipy.stats.chisquare(f_obs, f_exp)`.
///
/// The statistic is `Σ (o_i − e_i)² / e_i`; under the null hypothesis it
/// follows a chi-square distribution with `k − 1` degrees of freedom (`k`
/// bins), and the p-value is that distribution's survival function at the
/// statistic.
///
/// As in scipy, the totals of `observed` and `expected` must agree to a
/// relative tolerance of `sqrt(f64::EPSILON)` (≈1.5e-8): scale the expected
/// shares to the observed total first. A bin with zero expected frequency
/// and positive observed frequency makes the statistic infinite and the
/// p-value 0 (scipy's result); a bin that is zero in both is rejected, since
/// scipy's answer there is NaN.
pub fn chisquare(observed: &[f64], expected: &[f64]) -> Result<ChiSquare, StatsError> {
    require_same_len("observed", observed, "expected", expected)?;
    let observed_total = nonnegative_total("observed", observed)?;
    let expected_total = nonnegative_total("expected", expected)?;
    if observed.len() < 2 {
        return Err(StatsError::new(
            "chi-square needs at least 2 bins; with 1 bin the degrees of freedom are 0",
        ));
    }
    let relative_diff =
        (observed_total - expected_total).abs() / observed_total.min(expected_total);
    if relative_diff > CHISQUARE_SUM_RTOL {
        return Err(StatsError::new(format!(
            "observed frequencies sum to {observed_total} but expected frequencies sum to \
             {expected_total}; they must agree to a relative tolerance of \
             {CHISQUARE_SUM_RTOL:e} (relative difference {relative_diff:e})"
        )));
    }
    let mut statistic = 0.0;
    for (i, (&o, &e)) in observed.iter().zip(expected).enumerate() {
        if e == 0.0 && o == 0.0 {
            return Err(StatsError::new(format!(
                "bin {i} has zero observed and zero expected frequency; drop empty bins"
            )));
        }
        statistic += (o - e) * (o - e) / e;
    }
    let dof = observed.len() as u64 - 1;
    Ok(ChiSquare {
        statistic,
        p_value: chi2_sf(statistic, dof as f64),
        dof,
    })
}

/// Survival function of the chi-square distribution with `dof` degrees of
/// freedom: `P(X > x) = Q(dof/2, x/2)`, the regularised upper incomplete
/// gamma function. Returns 1 for `x ≤ 0`, 0 for `x = ∞`, and NaN when `dof`
/// is not positive or an argument is NaN.
pub fn chi2_sf(x: f64, dof: f64) -> f64 {
    if x.is_nan() || dof.is_nan() || dof <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    upper_gamma_regularized(dof / 2.0, x / 2.0)
}

/// Standard normal survival function `1 − Φ(z)`, accurate far into the upper
/// tail (no cancellation): for `z ≥ 0` it is `erfc(z/√2)/2 = Q(1/2, z²/2)/2`.
pub fn normal_sf(z: f64) -> f64 {
    if z.is_nan() {
        return f64::NAN;
    }
    let tail = 0.5 * upper_gamma_regularized(0.5, z * z / 2.0);
    if z >= 0.0 {
        tail
    } else {
        1.0 - tail
    }
}

// ---------------------------------------------------------------------------
// Two-proportion Z test (Evidently's `z_stat_test`).
// ---------------------------------------------------------------------------

/// Result of the two-proportion Z test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZTest {
    pub statistic: f64,
    pub p_value: f64,
}

/// Pooled two-proportion Z test, as Evidently's `z_stat_test`.
///
/// With shares `p1 = ref_ones/ref_n`, `p2 = cur_ones/cur_n` and the pooled
/// share `P = (p1·n1 + p2·n2)/(n1 + n2)`, the statistic is
/// `z = (p1 − p2) / sqrt(P(1 − P)(1/n1 + 1/n2))` and the two-sided p-value
/// is `2·(1 − Φ(|z|))`. When both samples hold one and the same constant
/// (`P` is 0 or 1) the statistic is undefined; Evidently reports p = 1 and
/// this function reports statistic 0 and p-value 1.
pub fn z_test(ref_ones: u64, ref_n: u64, cur_ones: u64, cur_n: u64) -> Result<ZTest, StatsError> {
    for (name, ones, n) in [("reference", ref_ones, ref_n), ("current", cur_ones, cur_n)] {
        if n == 0 {
            return Err(StatsError::new(format!("{name} sample is empty")));
        }
        if ones > n {
            return Err(StatsError::new(format!(
                "{name} has {ones} ones out of only {n} observations"
            )));
        }
    }
    let both_all_zero = ref_ones == 0 && cur_ones == 0;
    let both_all_one = ref_ones == ref_n && cur_ones == cur_n;
    if both_all_zero || both_all_one {
        return Ok(ZTest {
            statistic: 0.0,
            p_value: 1.0,
        });
    }
    let (n1, n2) = (ref_n as f64, cur_n as f64);
    let p1 = ref_ones as f64 / n1;
    let p2 = cur_ones as f64 / n2;
    let pooled = (p1 * n1 + p2 * n2) / (n1 + n2);
    let statistic = (p1 - p2) / (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    Ok(ZTest {
        statistic,
        p_value: 2.0 * normal_sf(statistic.abs()),
    })
}

// ---------------------------------------------------------------------------
// Incomplete gamma function and its helpers.
// ---------------------------------------------------------------------------

/// Regularised upper incomplete gamma function `Q(a, x) = Γ(a, x)/Γ(a)` for
/// `a > 0`, `x ≥ 0`.
///
/// Below `x = a + 1` the power series of the lower function `P(a, x)`
/// converges fast and `Q = 1 − P` loses nothing (Q is not small there);
/// above it, the continued fraction for `Q` converges fast and keeps full
/// relative accuracy deep into the tail. Both carry the common factor
/// `x^a e^{−x} / Γ(a)`, computed in log space by [`ln_gamma_prefactor`].
fn upper_gamma_regularized(a: f64, x: f64) -> f64 {
    if x.is_nan() || a.is_nan() || a <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    if x.is_infinite() {
        return 0.0;
    }
    if x < a + 1.0 {
        1.0 - lower_gamma_series(a, x)
    } else {
        upper_gamma_continued_fraction(a, x)
    }
}

/// Enough iterations for the series and the continued fraction to converge:
/// near `x ≈ a` both need a few multiples of `sqrt(a)` terms.
fn gamma_iteration_cap(a: f64) -> usize {
    1_000 + (50.0 * a.sqrt()) as usize
}

/// `P(a, x) = x^a e^{−x}/Γ(a) · Σ_{k≥0} x^k / (a (a+1) ⋯ (a+k))`.
fn lower_gamma_series(a: f64, x: f64) -> f64 {
    let mut term = 1.0 / a;
    let mut sum = term;
    let mut denominator = a;
    for _ in 0..gamma_iteration_cap(a) {
        denominator += 1.0;
        term *= x / denominator;
        sum += term;
        if term <= sum * f64::EPSILON {
            break;
        }
    }
    (sum * ln_gamma_prefactor(a, x).exp()).min(1.0)
}

/// `Q(a, x) = x^a e^{−x}/Γ(a) · 1/(x+1−a − 1·(1−a)/(x+3−a − 2·(2−a)/(x+5−a − ⋯)))`,
/// evaluated with the modified Lentz algorithm.
fn upper_gamma_continued_fraction(a: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut fraction = d;
    for i in 1..gamma_iteration_cap(a) {
        let i = i as f64;
        let numerator = -i * (i - a);
        b += 2.0;
        d = numerator * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + numerator / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let step = d * c;
        fraction *= step;
        if (step - 1.0).abs() <= f64::EPSILON {
            break;
        }
    }
    fraction * ln_gamma_prefactor(a, x).exp()
}

/// `ln(x^a e^{−x} / Γ(a))`.
///
/// For large `a` the three terms `a ln x`, `x` and `ln Γ(a)` are each huge
/// and nearly cancel, so Stirling's series is substituted for `ln Γ(a)` and
/// the cancelling parts are folded into `a · (ln(1+t) − t)` with
/// `t = (x − a)/a`, which [`ln1p_minus`] computes without cancellation.
fn ln_gamma_prefactor(a: f64, x: f64) -> f64 {
    if a >= STIRLING_MIN_ARG {
        let t = (x - a) / a;
        a * ln1p_minus(t) + 0.5 * (a / (2.0 * PI)).ln() - stirling_series(a)
    } else {
        a * x.ln() - x - ln_gamma(a)
    }
}

/// Smallest argument for which [`stirling_series`] with its eight terms is
/// accurate to double precision.
const STIRLING_MIN_ARG: f64 = 10.0;

/// Stirling's correction `ln Γ(z) − ((z − ½) ln z − z + ½ ln 2π)
/// = Σ_j B_{2j} / (2j (2j−1) z^{2j−1})`, eight terms (`B` the Bernoulli
/// numbers); accurate to double precision for `z ≥ 10`.
pub(crate) fn stirling_series(z: f64) -> f64 {
    const COEFFICIENTS: [f64; 8] = [
        1.0 / 12.0,
        -1.0 / 360.0,
        1.0 / 1260.0,
        -1.0 / 1680.0,
        1.0 / 1188.0,
        -691.0 / 360_360.0,
        1.0 / 156.0,
        -3617.0 / 122_400.0,
    ];
    let inv = 1.0 / z;
    let inv_sq = inv * inv;
    let series = COEFFICIENTS
        .iter()
        .rev()
        .fold(0.0, |acc, &c| acc * inv_sq + c);
    series * inv
}

/// `ln Γ(a)` for `a > 0`: Stirling's formula at `a + k ≥ 10`, shifted back
/// with `Γ(a) = Γ(a + k) / (a (a+1) ⋯ (a+k−1))`.
fn ln_gamma(a: f64) -> f64 {
    let mut z = a;
    let mut product = 1.0;
    while z < STIRLING_MIN_ARG {
        product *= z;
        z += 1.0;
    }
    (z - 0.5) * z.ln() - z + 0.5 * (2.0 * PI).ln() + stirling_series(z) - product.ln()
}

/// `ln(1 + t) − t` for `t > −1`, accurate when `t` is small.
///
/// With `y = t/(2 + t)`, `ln(1 + t) = 2 atanh(y) = 2(y + y³/3 + y⁵/5 + ⋯)`
/// and `2y − t = −y·t`, so `ln(1+t) − t = −y·t + 2(y³/3 + y⁵/5 + ⋯)`, a sum
/// without cancellation; `|y| ≤ 1/3` for `|t| < 1/2`, so it converges fast.
pub(crate) fn ln1p_minus(t: f64) -> f64 {
    if t.abs() >= 0.5 {
        return t.ln_1p() - t;
    }
    let y = t / (2.0 + t);
    let y2 = y * y;
    let mut power = y * y2;
    let mut odd = 3.0;
    let mut series = 0.0;
    loop {
        let term = power / odd;
        series += term;
        if term.abs() <= series.abs() * f64::EPSILON {
            break;
        }
        power *= y2;
        odd += 2.0;
    }
    -y * t + 2.0 * series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_problem() {
        let err = psi(&[1.0, 2.0], &[1.0]).expect_err("length mismatch");
        assert!(err.message().contains("reference has 2 bins"), "{err}");
        let err = psi(&[1.0, -2.0], &[1.0, 1.0]).expect_err("negative count");
        assert!(err.message().contains("reference[1] is negative"), "{err}");
        let err = psi(&[0.0, 0.0], &[1.0, 1.0]).expect_err("all zero");
        assert!(err.message().contains("reference sums to zero"), "{err}");
        let err = jensen_shannon(&[f64::NAN], &[1.0]).expect_err("NaN");
        assert!(err.message().contains("p[0] is NaN"), "{err}");
        let err = wasserstein(&[], &[1.0], None, None).expect_err("empty");
        assert!(err.message().contains("u_values is empty"), "{err}");
        let err = wasserstein(&[1.0], &[1.0], Some(&[0.0]), None).expect_err("zero weights");
        assert!(err.message().contains("u_weights sums to zero"), "{err}");
        let err = wasserstein(&[1.0], &[1.0], None, Some(&[1.0, 2.0])).expect_err("weights len");
        assert!(err.message().contains("v_weights has 2 entries"), "{err}");
        let err = chisquare(&[5.0], &[5.0]).expect_err("dof 0");
        assert!(err.message().contains("degrees of freedom are 0"), "{err}");
        let err = chisquare(&[5.0, 5.0], &[5.0, 6.0]).expect_err("sums differ");
        assert!(err.message().contains("relative tolerance"), "{err}");
        let err = chisquare(&[5.0, 0.0, 5.0], &[5.0, 0.0, 5.0]).expect_err("empty bin");
        assert!(err.message().contains("bin 1"), "{err}");
        let err = z_test(3, 2, 1, 2).expect_err("ones > n");
        assert!(err.message().contains("reference has 3 ones"), "{err}");
        let err = z_test(0, 0, 1, 2).expect_err("empty");
        assert!(err.message().contains("reference sample is empty"), "{err}");
    }

    #[test]
    fn chisquare_zero_expected_is_infinite() {
        let r = chisquare(&[10.0, 0.0], &[0.0, 10.0]).expect("valid input");
        assert_eq!(r.statistic, f64::INFINITY);
        assert_eq!(r.p_value, 0.0);
    }

    #[test]
    fn survival_function_edges() {
        assert_eq!(chi2_sf(0.0, 3.0), 1.0);
        assert_eq!(chi2_sf(-1.0, 3.0), 1.0);
        assert_eq!(chi2_sf(f64::INFINITY, 3.0), 0.0);
        assert!(chi2_sf(1.0, 0.0).is_nan());
        assert_eq!(normal_sf(f64::INFINITY), 0.0);
        assert_eq!(normal_sf(f64::NEG_INFINITY), 1.0);
        assert_eq!(normal_sf(0.0), 0.5);
    }

    #[test]
    fn ln1p_minus_matches_direct_formula_away_from_zero() {
        for &t in &[-0.49, -0.3, -1e-3, 1e-8, 0.2, 0.49] {
            let direct = f64::ln_1p(t) - t;
            let ours = ln1p_minus(t);
            assert!(
                (ours - direct).abs() <= 1e-15 * direct.abs().max(1e-3),
                "t={t}"
            );
        }
    }

    #[test]
    fn ln_gamma_at_integers_is_log_factorial() {
        let mut factorial = 1.0_f64;
        for k in 1..25 {
            assert!((ln_gamma(k as f64) - factorial.ln()).abs() < 1e-13, "k={k}");
            factorial *= k as f64;
        }
        let diff = ln_gamma(0.5) - 0.5 * PI.ln();
        assert!(diff.abs() < 4e-15, "{diff}");
    }
}
