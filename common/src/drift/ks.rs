//! Two-sample Kolmogorov–Smirnov test, numerically equal to
//! `scipy.stats.ks_2samp(a, b)` with its defaults (two-sided, `method='auto'`).
//!
//! What: the statistic `D = sup_x |F_a(x) − F_b(x)|` (the largest gap between
//! the two empirical CDFs) and its p-value under the null hypothesis that both
//! samples come from the same continuous distribution.
//!
//! Why this much machinery: the drift monitor must report the same p-value a
//! data scientist gets from scipy, and scipy's answer depends on which of
//! several algorithms it picks, so this module picks the same one:
//!
//! * **Exact** when both samples have at most 10 000 points (scipy's
//!   `MAX_AUTO_N`). `D` is first rounded onto the lattice `h / lcm(n1, n2)`
//!   on which it necessarily lies, and `P(D ≥ h/lcm)` is a lattice-path
//!   count: for equal sizes a closed-form alternating sum of binomial ratios
//!   (`prob_outside_square`), otherwise a column-by-column recursion over
//!   the paths that stay strictly inside the band (`prob_outside_band`).
//!   If the result is not a probability (the closed form can round to a hair
//!   above 1), scipy gives up on the exact answer and so do we.
//! * **Asymptotic** otherwise: the one-sample two-sided distribution
//!   `kstwo.sf(D, round(n1·n2/(n1+n2)))`, which scipy evaluates
//!   ([`kstwo_sf`]) with the Simard–L'Ecuyer choice among closed forms
//!   (Ruben–Gambino), the one-sided Smirnov distribution ([`smirnov_sf`]),
//!   Durbin's matrix method, Pomeranz's recursion and the Pelz–Good
//!   expansion, depending on `n` and on `n·D²`.
//!
//! Allocation: the exact path (the one the drift monitor calls per feature
//! per window) uses a single `Vec` per call, first for the sorted samples and
//! then for the lattice-path column.

use super::stats::{ln1p_minus, require_nonempty, stirling_series, StatsError};
use std::f64::consts::PI;

/// Which null distribution produced a p-value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsMethod {
    /// The exact lattice-path distribution for the two sample sizes.
    Exact,
    /// The one-sample two-sided distribution at the effective size
    /// `round(n1·n2/(n1+n2))`.
    Asymptotic,
}

/// Result of a two-sample Kolmogorov–Smirnov test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ks {
    /// Largest absolute gap between the two empirical CDFs (on the exact
    /// path, rounded onto the `1/lcm(n1, n2)` lattice as scipy does).
    pub statistic: f64,
    pub p_value: f64,
    pub method: KsMethod,
}

/// Largest sample size for which the exact distribution is used (scipy's
/// `MAX_AUTO_N`). At this size `lcm(n1, n2) ≤ 10⁸`, far below scipy's int32
/// guard, so that guard never applies on the automatic path.
pub const MAX_EXACT_N: u64 = 10_000;

/// Two-sample Kolmogorov–Smirnov test of raw samples, as
/// `scipy.stats.ks_2samp(a, b)`. Ties are allowed; NaN is rejected.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> Result<Ks, StatsError> {
    require_nonempty("a", a)?;
    require_nonempty("b", b)?;
    require_not_nan("a", a)?;
    require_not_nan("b", b)?;
    let mut buffer = Vec::with_capacity(a.len() + b.len());
    buffer.extend_from_slice(a);
    buffer.extend_from_slice(b);
    let (sorted_a, sorted_b) = buffer.split_at_mut(a.len());
    sorted_a.sort_unstable_by(f64::total_cmp);
    sorted_b.sort_unstable_by(f64::total_cmp);
    let statistic = sorted_samples_statistic(sorted_a, sorted_b);
    let (n1, n2) = (a.len() as u64, b.len() as u64);
    Ok(ks_with_p_value(statistic, n1, n2, &mut buffer))
}

/// Two-sample Kolmogorov–Smirnov test of two histograms over the same
/// ordered bins. Equal to [`ks_2samp`] on the samples in which bin `i`'s
/// value appears `counts[i]` times (every bin a block of ties).
pub fn ks_from_counts(reference: &[u64], current: &[u64]) -> Result<Ks, StatsError> {
    let (statistic, n1, n2) = counts_statistic(reference, current)?;
    Ok(ks_with_p_value(statistic, n1, n2, &mut Vec::new()))
}

/// The two-sample statistic `D` of two histograms over the same ordered
/// bins, without a p-value (cheap: one pass over the bins). This is the raw
/// largest CDF gap; [`ks_from_counts`] and [`ks_p_value`] round it onto the
/// `1/lcm(n1, n2)` lattice on the exact path, a change of at most a few ulps.
pub fn ks_statistic_from_counts(reference: &[u64], current: &[u64]) -> Result<f64, StatsError> {
    counts_statistic(reference, current).map(|(statistic, _, _)| statistic)
}

/// Validates two histograms and returns the statistic and both totals.
fn counts_statistic(reference: &[u64], current: &[u64]) -> Result<(f64, u64, u64), StatsError> {
    require_nonempty("reference", reference)?;
    require_nonempty("current", current)?;
    if reference.len() != current.len() {
        return Err(StatsError::new(format!(
            "reference has {} bins but current has {}; they must be the same bins",
            reference.len(),
            current.len()
        )));
    }
    let n1 = count_total("reference", reference)?;
    let n2 = count_total("current", current)?;
    let mut extremes = CdfGapExtremes::new();
    let (mut cum1, mut cum2) = (0u64, 0u64);
    for (&r, &c) in reference.iter().zip(current) {
        cum1 += r;
        cum2 += c;
        extremes.record(cum1, n1, cum2, n2);
    }
    Ok((extremes.statistic(), n1, n2))
}

/// p-value of a two-sample statistic `d` for sample sizes `n1`, `n2`, with
/// scipy's automatic choice between the exact and the asymptotic
/// distribution. On the exact path `d` is rounded onto the `1/lcm` lattice
/// first. `d` is clamped to `[0, 1]`; NaN `d` or an empty sample gives NaN.
pub fn ks_p_value(d: f64, n1: u64, n2: u64) -> (f64, KsMethod) {
    let ks = ks_with_p_value(d, n1, n2, &mut Vec::new());
    (ks.p_value, ks.method)
}

/// Survival function `P(D_n ≥ d)` of the one-sample two-sided
/// Kolmogorov–Smirnov statistic for a sample of size `n`, as
/// `scipy.stats.kstwo.sf(d, n)`. NaN for `n = 0` or NaN `d`.
pub fn kstwo_sf(d: f64, n: u64) -> f64 {
    if n == 0 || d.is_nan() {
        return f64::NAN;
    }
    // scipy's distribution support is (1/(2n), 1].
    if d <= 0.5 / n as f64 {
        return 1.0;
    }
    if d >= 1.0 {
        return 0.0;
    }
    kolmogorov_two_sided(n, d, Tail::Upper)
}

/// Cumulative distribution function `P(D_n ≤ d)` of the one-sample
/// two-sided statistic, as `scipy.stats.kstwo.cdf(d, n)`. NaN for `n = 0` or
/// NaN `d`.
pub fn kstwo_cdf(d: f64, n: u64) -> f64 {
    if n == 0 || d.is_nan() {
        return f64::NAN;
    }
    if d <= 0.5 / n as f64 {
        return 0.0;
    }
    if d >= 1.0 {
        return 1.0;
    }
    kolmogorov_two_sided(n, d, Tail::Lower)
}

// ---------------------------------------------------------------------------
// Input checks.
// ---------------------------------------------------------------------------

fn require_not_nan(name: &str, values: &[f64]) -> Result<(), StatsError> {
    match values.iter().position(|v| v.is_nan()) {
        Some(i) => Err(StatsError::new(format!("{name}[{i}] is NaN"))),
        None => Ok(()),
    }
}

fn count_total(name: &str, counts: &[u64]) -> Result<u64, StatsError> {
    let total = counts
        .iter()
        .try_fold(0u64, |acc, &c| acc.checked_add(c))
        .ok_or_else(|| StatsError::new(format!("{name} counts overflow u64")))?;
    if total == 0 {
        return Err(StatsError::new(format!("{name} counts sum to zero")));
    }
    Ok(total)
}

// ---------------------------------------------------------------------------
// The statistic.
// ---------------------------------------------------------------------------

/// Running extremes of `F_a − F_b` over the pooled sample.
struct CdfGapExtremes {
    max: f64,
    min: f64,
}

impl CdfGapExtremes {
    fn new() -> Self {
        CdfGapExtremes {
            max: f64::NEG_INFINITY,
            min: f64::INFINITY,
        }
    }

    /// Records the gap where `cum1` of `n1` and `cum2` of `n2` points are at
    /// or below the current value (each CDF computed as `count / n`).
    fn record(&mut self, cum1: u64, n1: u64, cum2: u64, n2: u64) {
        let gap = cum1 as f64 / n1 as f64 - cum2 as f64 / n2 as f64;
        self.max = self.max.max(gap);
        self.min = self.min.min(gap);
    }

    /// The two-sided statistic: the larger of the largest positive gap and
    /// the largest negative gap (the latter clipped to `[0, 1]`, as scipy).
    fn statistic(&self) -> f64 {
        let below = (-self.min).clamp(0.0, 1.0);
        if below > self.max {
            below
        } else {
            self.max
        }
    }
}

/// Walks the distinct values of two sorted samples in order and returns the
/// two-sided statistic. Both empirical CDFs are right-continuous steps, so
/// the supremum is attained at an observed value.
fn sorted_samples_statistic(a: &[f64], b: &[f64]) -> f64 {
    let (n1, n2) = (a.len() as u64, b.len() as u64);
    let mut extremes = CdfGapExtremes::new();
    let (mut i, mut j) = (0usize, 0usize);
    loop {
        let x = match (a.get(i), b.get(j)) {
            (Some(&p), Some(&q)) => p.min(q),
            (Some(&p), None) => p,
            (None, Some(&q)) => q,
            (None, None) => return extremes.statistic(),
        };
        while a.get(i).is_some_and(|&v| v <= x) {
            i += 1;
        }
        while b.get(j).is_some_and(|&v| v <= x) {
            j += 1;
        }
        extremes.record(i as u64, n1, j as u64, n2);
    }
}

/// Chooses the null distribution as scipy's `method='auto'` does and
/// computes the p-value; `buffer` is reused for the lattice-path column.
fn ks_with_p_value(d: f64, n1: u64, n2: u64, buffer: &mut Vec<f64>) -> Ks {
    let exact = n1.max(n2) <= MAX_EXACT_N;
    if n1 == 0 || n2 == 0 || d.is_nan() {
        let method = if exact {
            KsMethod::Exact
        } else {
            KsMethod::Asymptotic
        };
        return Ks {
            statistic: d,
            p_value: f64::NAN,
            method,
        };
    }
    let d = d.clamp(0.0, 1.0);
    if exact {
        let (lattice_d, p) = exact_p_value(d, n1, n2, buffer);
        if let Some(p) = p {
            return Ks {
                statistic: lattice_d,
                p_value: p,
                method: KsMethod::Exact,
            };
        }
        return asymptotic(lattice_d, n1, n2);
    }
    asymptotic(d, n1, n2)
}

/// The asymptotic p-value: the one-sample two-sided distribution at the
/// effective sample size `round(n1·n2/(n1+n2))` (ties to even, as numpy).
fn asymptotic(d: f64, n1: u64, n2: u64) -> Ks {
    let (big, small) = (n1.max(n2) as f64, n1.min(n2) as f64);
    let effective = (big * small / (big + small)).round_ties_even() as u64;
    Ks {
        statistic: d,
        p_value: kstwo_sf(d, effective).clamp(0.0, 1.0),
        method: KsMethod::Asymptotic,
    }
}

// ---------------------------------------------------------------------------
// Exact two-sample distribution (lattice paths).
// ---------------------------------------------------------------------------

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Rounds `d` onto the lattice `h / lcm(n1, n2)` and computes
/// `P(D ≥ h/lcm)`. Returns the lattice statistic and the probability, or
/// `None` for the probability when the computation did not produce a
/// number in `[0, 1]` (scipy then falls back to the asymptotic method).
fn exact_p_value(d: f64, n1: u64, n2: u64, buffer: &mut Vec<f64>) -> (f64, Option<f64>) {
    let g = gcd(n1, n2);
    let lcm = (n1 / g) * n2;
    let h = (d * lcm as f64).round_ties_even() as u64;
    let lattice_d = h as f64 / lcm as f64;
    if h == 0 {
        return (lattice_d, Some(1.0));
    }
    let p = if n1 == n2 {
        prob_outside_square(n1, h)
    } else {
        prob_outside_band(n1, n2, g, h, buffer)
    };
    (lattice_d, (0.0..=1.0).contains(&p).then_some(p))
}

/// `P(D ≥ h/n)` for two samples of equal size `n`.
///
/// A sample pair is a lattice path of `n` right steps and `n` up steps;
/// `D ≥ h/n` means the path touches one of the diagonals `x − y = ±h`. By
/// reflection, the count is `2 Σ_{k≥1} (−1)^{k+1} C(2n, n − k·h)` out of
/// `C(2n, n)` paths. The ratios `A_k = C(2n, n−(k+1)h) / C(2n, n−kh)` are
/// products of `h` simple factors, and the alternating sum is evaluated
/// innermost-first as `2 A_0 (1 − A_1 (1 − A_2 (1 − ⋯)))`, which avoids both
/// huge binomials and the cancellation of the plain sum.
fn prob_outside_square(n: u64, h: u64) -> f64 {
    let (n, h) = (n as i64, h as i64);
    let mut p = 0.0;
    for k in (0..=n / h).rev() {
        let mut ratio = 1.0;
        for j in 0..h {
            ratio = ((n - k * h - j) as f64 * ratio) / ((n + k * h + j + 1) as f64);
        }
        p = ratio * (1.0 - p);
    }
    2.0 * p
}

/// `P(D ≥ h/lcm)` for samples of sizes `n1 ≠ n2` with gcd `g`.
///
/// With `m ≥ n` the two sizes, a path from `(0, 0)` to `(m, n)` keeps
/// `D < h/lcm` while it stays strictly inside the band
/// `|x·n/g − y·m/g| < h`. Rather than counting inside paths (numbers as
/// large as `C(m+n, n)`), the recursion (Hodges' inside method, in the
/// `1 − p` form of Viehmann, arXiv:2102.08037) carries for each lattice
/// point the probability that a uniformly random path to it has already
/// left the band: a path to `(i, j)` arrives from `(i−1, j)` with
/// probability `i/(i+j)` and from `(i, j−1)` with probability `j/(i+j)`, and
/// the value is 1 outside the band. Only one column `x = i` is kept, and only
/// its window of in-band `j`, so the cost is `O(m · band width)`.
fn prob_outside_band(n1: u64, n2: u64, g: u64, h: u64, column: &mut Vec<f64>) -> f64 {
    let (m, n) = (n1.max(n2) as i64, n1.min(n2) as i64);
    let (g, h) = (g as i64, h as i64);
    let (mg, ng) = (m / g, n / g);
    let ceil_div = |num: i64, den: i64| -(-num).div_euclid(den);

    // Column x = 0: points (0, j) with j < ceil(h/mg) are inside the band.
    let mut lo = 0i64;
    let mut hi = ceil_div(h, mg).min(n + 1);
    let mut width = hi - lo;
    // The window never grows beyond 2·hi + 1 entries, nor beyond n + 1;
    // entries past the current window always hold 1 (outside the band).
    let len = (2 * hi + 2).min(n + 1) as usize;
    column.clear();
    column.resize(len, 1.0);
    column[..hi as usize].fill(0.0);

    for i in 1..=m {
        let (prev_lo, prev_width) = (lo, width);
        lo = ((ng * i - h).div_euclid(mg) + 1).clamp(0, n);
        hi = ceil_div(ng * i + h, mg).min(n + 1);
        if hi <= lo {
            // No point of this column is inside the band: every path leaves it.
            return 1.0;
        }
        width = hi - lo;
        let shift = (lo - prev_lo) as usize;
        let fi = i as f64;
        // Value just below the window: outside the band (1) unless j = 0,
        // where it gets weight j = 0 anyway.
        let mut below = if lo == 0 { 0.0 } else { 1.0 };
        for jj in 0..width as usize {
            let j = (lo + jj as i64) as f64;
            below = (column[jj + shift] * fi + below * j) / (fi + j);
            column[jj] = below;
        }
        if prev_width > width {
            column[width as usize..prev_width as usize].fill(1.0);
        }
    }
    column[width as usize - 1]
}

// ---------------------------------------------------------------------------
// One-sample two-sided distribution (scipy's `_kolmogn`).
// ---------------------------------------------------------------------------

/// Which tail of the distribution of `D_n` is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// `P(D_n ≤ x)`.
    Lower,
    /// `P(D_n ≥ x)`.
    Upper,
}

/// The method scipy's `_kolmogn` (Simard & L'Ecuyer 2011) uses for `(n, x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KolmogorovMethod {
    /// `x ≥ 1` (CDF 1) or `n·x ≤ 1/2` (CDF 0).
    Trivial,
    /// `1/2 < n·x ≤ 1`: Ruben–Gambino, `CDF = n!/nⁿ · (2nx − 1)ⁿ`.
    RubenGambinoLow,
    /// `n·x ≥ n − 1`: Ruben–Gambino, `SF = 2 (1 − x)ⁿ`.
    RubenGambinoHigh,
    /// `SF = 2 · smirnov(n, x)`: exact for `x ≥ 1/2` (the one-sided events
    /// are disjoint), and accurate in the far upper tail.
    TwiceSmirnov,
    /// Durbin's matrix method (Marsaglia–Tsang–Wang) for the CDF.
    Durbin,
    /// Pomeranz's recursion for the CDF.
    Pomeranz,
    /// Pelz–Good asymptotic expansion of the CDF.
    PelzGood,
    /// `n > 140`, `n·x² ≥ 370`, SF wanted: the SF underflows to 0.
    UpperTailZero,
    /// `n > 140`, `n·x² ≥ 18`, CDF wanted: the CDF rounds to 1.
    LowerTailOne,
}

impl KolmogorovMethod {
    /// The label `scripts/drift_golden.py` uses for this method.
    #[cfg(test)]
    pub(crate) fn label(self) -> &'static str {
        match self {
            KolmogorovMethod::Trivial => "trivial",
            KolmogorovMethod::RubenGambinoLow => "ruben_gambino_low",
            KolmogorovMethod::RubenGambinoHigh => "ruben_gambino_high",
            KolmogorovMethod::TwiceSmirnov => "twice_smirnov",
            KolmogorovMethod::Durbin => "durbin",
            KolmogorovMethod::Pomeranz => "pomeranz",
            KolmogorovMethod::PelzGood => "pelz_good",
            KolmogorovMethod::UpperTailZero => "sf_zero",
            KolmogorovMethod::LowerTailOne => "cdf_one",
        }
    }
}

/// Below this size the exact methods (Durbin, Pomeranz) cover the body of
/// the distribution.
const SMALL_N: u64 = 140;

/// scipy's branch selection in `_kolmogn`, for `n ≥ 1`.
pub(crate) fn kolmogorov_method(n: u64, x: f64, tail: Tail) -> KolmogorovMethod {
    use KolmogorovMethod::*;
    if x >= 1.0 || x <= 0.0 {
        return Trivial;
    }
    let t = n as f64 * x;
    if t <= 1.0 {
        return if t <= 0.5 { Trivial } else { RubenGambinoLow };
    }
    if t >= (n - 1) as f64 {
        return RubenGambinoHigh;
    }
    if x >= 0.5 {
        return TwiceSmirnov;
    }
    let nxx = t * x;
    if n <= SMALL_N {
        return if nxx <= 0.754693 {
            Durbin
        } else if nxx <= 4.0 {
            Pomeranz
        } else {
            TwiceSmirnov
        };
    }
    if tail == Tail::Upper {
        if nxx >= 370.0 {
            return UpperTailZero;
        }
        if nxx >= 2.2 {
            return TwiceSmirnov;
        }
    }
    if nxx >= 18.0 {
        LowerTailOne
    } else if n <= 100_000 && n as f64 * x.powf(1.5) <= 1.4 {
        Durbin
    } else {
        PelzGood
    }
}

/// `P(D_n ≤ x)` or `P(D_n ≥ x)` by the method scipy would choose.
fn kolmogorov_two_sided(n: u64, x: f64, tail: Tail) -> f64 {
    use KolmogorovMethod::*;
    let cdf = match kolmogorov_method(n, x, tail) {
        Trivial => {
            if x >= 1.0 {
                1.0
            } else {
                0.0
            }
        }
        RubenGambinoLow => ruben_gambino_low_cdf(n, n as f64 * x),
        RubenGambinoHigh => return tail_value(tail, 2.0 * (1.0 - x).powf(n as f64)),
        TwiceSmirnov => return tail_value(tail, 2.0 * smirnov_sf(n, x)),
        Durbin => durbin_cdf(n, x),
        Pomeranz => pomeranz_cdf(n, x),
        PelzGood => pelz_good_cdf(n, x),
        UpperTailZero => return 0.0,
        LowerTailOne => 1.0,
    };
    let cdf = cdf.clamp(0.0, 1.0);
    match tail {
        Tail::Lower => cdf,
        Tail::Upper => (1.0 - cdf).clamp(0.0, 1.0),
    }
}

/// Converts an upper-tail probability to the requested tail, clipped.
fn tail_value(tail: Tail, sf: f64) -> f64 {
    match tail {
        Tail::Lower => (1.0 - sf).clamp(0.0, 1.0),
        Tail::Upper => sf.clamp(0.0, 1.0),
    }
}

/// Ruben–Gambino: for `1/2 < t = n·x ≤ 1`, `P(D_n ≤ x) = n!/nⁿ · (2t − 1)ⁿ`.
/// Up to `n = 140` as a product of `n` factors `(i/n)(2t − 1)`; beyond, in
/// log space with Stirling's series for `ln(n!/nⁿ)`.
fn ruben_gambino_low_cdf(n: u64, t: f64) -> f64 {
    let nf = n as f64;
    if n <= SMALL_N {
        let inv_n = 1.0 / nf;
        (1..=n).fold(1.0, |acc, i| acc * (i as f64 * inv_n * (2.0 * t - 1.0)))
    } else {
        let ln_factorial_over_power =
            nf.ln() / 2.0 - nf + (2.0 * PI).ln() / 2.0 + stirling_series(nf);
        (ln_factorial_over_power + nf * (2.0 * t - 1.0).ln()).exp()
    }
}

/// 2¹²⁸ and 2⁻¹²⁸: the rescaling steps of the Durbin and Pomeranz methods,
/// whose intermediate values span far more than the double exponent range.
const TWO_POW_128: f64 = 340_282_366_920_938_463_463_374_607_431_768_211_456.0;
const TWO_POW_MINUS_128: f64 = 1.0 / TWO_POW_128;

/// `x · 2^exponent` without intermediate overflow or underflow.
fn scale_by_power_of_two(mut x: f64, mut exponent: i64) -> f64 {
    while exponent > 1000 {
        x *= 2f64.powi(1000);
        exponent -= 1000;
    }
    while exponent < -1000 {
        x *= 2f64.powi(-1000);
        exponent += 1000;
    }
    x * 2f64.powi(exponent as i32)
}

/// Durbin's matrix method in the Marsaglia–Tsang–Wang form.
///
/// Write `n·x = k − h` with integer `k` and `0 ≤ h < 1`. Then
/// `P(D_n < x) = n!/nⁿ · (Hⁿ)_{kk}` for an `m × m` matrix `H`, `m = 2k − 1`,
/// whose entries are `1/j!` below a Toeplitz diagonal, with corrections
/// involving `hʲ` in the first column and last row. `Hⁿ` is formed by
/// repeated squaring, rescaling by 2⁻¹²⁸ whenever the centre entry grows
/// past 2¹²⁸ and carrying the exponent separately; the factor `n!/nⁿ` is
/// applied one `i/n` at a time with the opposite rescaling.
fn durbin_cdf(n: u64, x: f64) -> f64 {
    if x >= 1.0 {
        return 1.0;
    }
    let nx = n as f64 * x;
    if nx <= 0.5 {
        return 0.0;
    }
    let k = nx.ceil() as usize;
    let h = k as f64 - nx;
    let m = 2 * k - 1;
    let centre = (k - 1) * m + (k - 1);

    let mut base = durbin_matrix(m, h);
    let mut result = vec![0.0; m * m];
    for i in 0..m {
        result[i * m + i] = 1.0;
    }
    let mut scratch = vec![0.0; m * m];
    let (mut result_exponent, mut base_exponent) = (0i64, 0i64);
    let mut remaining = n;
    loop {
        if remaining % 2 == 1 {
            matrix_product(&result, &base, &mut scratch, m);
            std::mem::swap(&mut result, &mut scratch);
            result_exponent += base_exponent;
        }
        remaining /= 2;
        if remaining == 0 {
            break;
        }
        matrix_product(&base, &base, &mut scratch, m);
        std::mem::swap(&mut base, &mut scratch);
        base_exponent *= 2;
        if base[centre].abs() > TWO_POW_128 {
            base.iter_mut().for_each(|v| *v *= TWO_POW_MINUS_128);
            base_exponent += 128;
        }
    }

    let nf = n as f64;
    let mut p = result[centre];
    for i in 1..=n {
        p = i as f64 * p / nf;
        if p.abs() < TWO_POW_MINUS_128 {
            p *= TWO_POW_128;
            result_exponent -= 128;
        }
    }
    scale_by_power_of_two(p, result_exponent).clamp(0.0, 1.0)
}

/// The `m × m` Durbin matrix (row-major) for fractional offset `h`.
fn durbin_matrix(m: usize, h: f64) -> Vec<f64> {
    // inv_factorial[j] = 1/j!, built by repeated division (it may underflow,
    // which is harmless).
    let mut inv_factorial = Vec::with_capacity(m + 1);
    let mut fac = 1.0;
    inv_factorial.push(fac);
    for j in 1..=m {
        fac /= j as f64;
        inv_factorial.push(fac);
    }
    // First column: v[r] = (1 − h^{r+1}) / (r+1)!, with a correction in the
    // corner entry for the part of the band cut off at both ends.
    let mut first_column: Vec<f64> = (1..=m)
        .map(|j| (1.0 - h.powf(j as f64)) * inv_factorial[j])
        .collect();
    let corner = (2.0 * h - 1.0).max(0.0).powf(m as f64) - 2.0 * h.powf(m as f64);
    first_column[m - 1] = (1.0 + corner) * inv_factorial[m];

    let mut matrix = vec![0.0; m * m];
    for r in 0..m {
        for c in 1..m {
            if r + 1 >= c {
                matrix[r * m + c] = inv_factorial[r + 1 - c];
            }
        }
        matrix[r * m] = first_column[r];
    }
    for c in 0..m {
        matrix[(m - 1) * m + c] = first_column[m - 1 - c];
    }
    matrix
}

/// `out = a · b` for row-major `m × m` matrices.
fn matrix_product(a: &[f64], b: &[f64], out: &mut [f64], m: usize) {
    out.fill(0.0);
    for i in 0..m {
        let out_row = &mut out[i * m..(i + 1) * m];
        for (k, &aik) in a[i * m..(i + 1) * m].iter().enumerate() {
            if aik == 0.0 {
                continue;
            }
            for (o, &bkj) in out_row.iter_mut().zip(&b[k * m..(k + 1) * m]) {
                *o += aik * bkj;
            }
        }
    }
}

/// Pomeranz's recursion for `P(D_n ≤ x)`.
///
/// The band edges `i/n ± x` cut `[0, 1]` into `2n + 1` slices whose lengths
/// take only three values (`g/n`, `2g/n`, `(1 − 2g)/n`, with `g` the distance
/// of `n·x` to the nearest integer). Row `i` holds, for every admissible
/// number `j` of sample points below the `i`-th cut, a scaled probability;
/// the next row is the convolution of this row with the Poisson-like weights
/// `(c/n)^r / r!` of the next slice, restricted to the admissible `j` range
/// (the rows' ranges come from [`pomeranz_row_range`]). The answer is
/// `n!` times the entry for `j = n` in the last row; underflow is avoided by
/// rescaling rows by 2¹²⁸ and carrying the exponent.
fn pomeranz_cdf(n: u64, x: f64) -> f64 {
    let n_i = n as i64;
    let t = n as f64 * x;
    let whole = t.floor() as i64;
    let frac = t - whole as f64;
    let g = frac.min(1.0 - frac);
    let frac_up = i64::from(frac > 0.0);
    let frac_round = i64::from(frac > 0.5);
    let width = (2 * (whole + 1)) as usize;

    // Three kernels: weights[w][r] = (c_w/n)^r / r!.
    let nf = n as f64;
    let steps = [g / nf, 2.0 * g / nf, (1.0 - 2.0 * g) / nf];
    let mut weights = [vec![1.0; width], vec![1.0; width], vec![1.0; width]];
    for (kernel, &step) in weights.iter_mut().zip(&steps) {
        for r in 1..width {
            kernel[r] = kernel[r - 1] * step / r as f64;
        }
    }

    let mut previous = vec![0.0; width];
    let mut current = vec![0.0; width];
    current[0] = 1.0;
    let mut exponent = 0i64;
    let (mut start, _) = pomeranz_row_range(0, n_i, whole, frac_up, frac_round);
    for i in 1..=2 * n_i + 1 {
        let prev_start = start;
        std::mem::swap(&mut previous, &mut current);
        current.fill(0.0);
        let (j1, j2) = pomeranz_row_range(i, n_i, whole, frac_up, frac_round);
        let kernel = if i == 1 || i == 2 * n_i + 1 {
            &weights[0]
        } else if i % 2 == 1 {
            &weights[1]
        } else {
            &weights[2]
        };
        let span = j2 - prev_start + 1;
        if span <= 0 {
            // Nothing admissible carries over: the probability is zero.
            return 0.0;
        }
        // Both the previous row and the kernel are used up to `span` terms.
        let used = (span as usize).min(width);
        for (offset, slot) in current.iter_mut().take((j2 - j1 + 1) as usize).enumerate() {
            // Convolution index of absolute position j1 + offset.
            let lag = (j1 - prev_start) as usize + offset;
            let first = lag.saturating_sub(used - 1);
            let last = lag.min(used - 1);
            *slot = (first..=last).map(|s| previous[s] * kernel[lag - s]).sum();
        }
        let peak = current.iter().copied().fold(0.0, f64::max);
        if peak > 0.0 && peak < TWO_POW_MINUS_128 {
            current.iter_mut().for_each(|v| *v *= TWO_POW_128);
            exponent -= 128;
        }
        start = j1;
    }

    let mut answer = current[(n_i - start) as usize];
    for r in 1..=n {
        if answer.abs() > TWO_POW_128 {
            answer *= TWO_POW_MINUS_128;
            exponent += 128;
        }
        answer *= r as f64;
    }
    scale_by_power_of_two(answer, exponent).clamp(0.0, 1.0)
}

/// Admissible range `[j1, j2]` of point counts in row `i` of Pomeranz's
/// recursion (`whole = ⌊n·x⌋`, `frac_up = [frac > 0]`,
/// `frac_round = [frac > 1/2]`). Odd rows follow cuts of the form
/// `i/n + x`, even rows cuts `i/n − x`; the range is clipped to `[0, n]`.
fn pomeranz_row_range(i: i64, n: i64, whole: i64, frac_up: i64, frac_round: i64) -> (i64, i64) {
    let (j1, j2) = if i == 0 {
        (-whole - frac_up - 1, whole + frac_up - 1)
    } else {
        let half = (i + 1) / 2;
        if (i + 1) % 2 == 0 {
            if half == n + 1 {
                (n - whole - frac_up - 1, n + whole + frac_up - 1)
            } else {
                (half - whole - frac_round - 2, half + whole + frac_up - 2)
            }
        } else {
            (half - whole - 2, half + whole + frac_round - 1)
        }
    };
    ((j1 + 2).max(0), j2.min(n))
}

/// Pelz–Good expansion of `P(D_n ≤ x)`.
///
/// Li-Chien and Korolyuk expanded the CDF as
/// `K₀(z) + K₁(z)/√n + K₂(z)/n + K₃(z)/n^{3/2}` with `z = x√n`; Pelz and Good
/// rewrote each `K_i` with the Jacobi theta transformation into sums over
/// odd `m` of polynomials in `m²` times `q^{m²}`, `q = e^{−π²/(8z²)}`, which
/// converge quickly for small `z`. The sums are evaluated Horner-style in
/// `q^{8k}`, plus two extra sums over all integers `k` for `K₂` and `K₃`.
fn pelz_good_cdf(n: u64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let pi2 = PI * PI;
    let pi4 = pi2 * pi2;
    let pi6 = pi4 * pi2;
    let sqrt_2pi = (2.0 * PI).sqrt();
    let z = (n as f64).sqrt() * x;
    let (z2, z3, z4, z6) = (z * z, z.powi(3), z.powi(4), z.powi(6));

    let q_log = -pi2 / 8.0 / z2;
    if q_log < -708.0 {
        return 0.0;
    }
    let q = q_log.exp();

    let k1a = -z2;
    let k1b = pi2 / 4.0;
    let k2a = 6.0 * z6 + 2.0 * z4;
    let k2b = (2.0 * z4 - 5.0 * z2) * pi2 / 4.0;
    let k2c = pi4 * (1.0 - 2.0 * z2) / 16.0;
    let k3d = pi6 * (5.0 - 30.0 * z2) / 64.0;
    let k3c = pi4 * (-60.0 * z2 + 212.0 * z4) / 16.0;
    let k3b = pi2 * (135.0 * z4 - 96.0 * z6) / 4.0;
    let k3a = -30.0 * z6 - 90.0 * z.powi(8);

    let max_k = (16.0 * z / PI).ceil() as i64;
    let mut terms = [0.0f64; 4];
    for k in (1..=max_k).rev() {
        let m = (2 * k - 1) as f64;
        let (m2, m4, m6) = (m * m, m.powi(4), m.powi(6));
        let q_power = q.powf((8 * k) as f64);
        let coefficients = [
            1.0,
            k1a + k1b * m2,
            k2a + k2b * m2 + k2c * m4,
            k3a + k3b * m2 + k3c * m4 + k3d * m6,
        ];
        for (term, c) in terms.iter_mut().zip(coefficients) {
            *term = *term * q_power + c;
        }
    }
    let denominators = [z, 6.0 * z4, 72.0 * z.powi(7), 6480.0 * z.powi(10)];
    for (term, den) in terms.iter_mut().zip(denominators) {
        *term = *term * q * sqrt_2pi / den;
    }

    let q_all = (-pi2 / 2.0 / z2).exp();
    let sqrt3_z = 3f64.sqrt() * z;
    let (mut k2_extra, mut k3_extra) = (0.0, 0.0);
    for k in (1..=max_k).rev() {
        let kf = k as f64;
        let k_sq = kf * kf;
        let q_power = q_all.powf(k_sq);
        let k_pi = PI * kf;
        k2_extra += k_sq * q_power;
        k3_extra += (sqrt3_z + k_pi) * (sqrt3_z - k_pi) * k_sq * q_power;
    }
    terms[2] += k2_extra * (pi2 * sqrt_2pi / (-36.0 * z3));
    terms[3] += k3_extra * (pi2 * sqrt_2pi / (216.0 * z6));

    let nf = n as f64;
    terms
        .iter()
        .enumerate()
        .map(|(i, &term)| term / nf.powf(i as f64 / 2.0))
        .sum()
}

// ---------------------------------------------------------------------------
// One-sided Smirnov distribution (scipy.special.smirnov).
// ---------------------------------------------------------------------------

/// Below this (natural) logarithm `exp` underflows completely (cephes'
/// `MINLOG`, `ln 2⁻¹⁰⁷⁵`).
const MIN_LOG: f64 = -745.133_219_101_941_2;

/// Above this size scipy replaces the exact sum by an approximation.
const SMIRNOV_MAX_EXACT_N: u64 = 1_000_000;

/// Exact survival function of the one-sided statistic
/// `D⁺_n = sup (F_n − F)`: `smirnov(n, x) = P(D⁺_n ≥ x)`, as
/// `scipy.special.smirnov`. NaN for `n = 0` or `x` outside `[0, 1]`.
///
/// Birnbaum–Tingey: `P(D⁺_n ≥ x) = x Σ_{v=0}^{⌊n(1−x)⌋} C(n, v)
/// (x + v/n)^{v−1} (1 − x − v/n)^{n−v}`, a sum of positive terms. Special
/// cases as scipy: closed forms for `x ≤ 1/n` and `x ≥ 1 − 1/n`, 0 when the
/// value underflows, the approximation `exp(−(6nx+1)²/(18n))` for
/// `n > 10⁶`, and, when `x ≤ 1/(2√n)` with at most three terms, the
/// complementary (Dwass) sum for the CDF.
pub fn smirnov_sf(n: u64, x: f64) -> f64 {
    if n == 0 || !(0.0..=1.0).contains(&x) {
        return f64::NAN;
    }
    if n == 1 {
        return 1.0 - x;
    }
    if x == 0.0 {
        return 1.0;
    }
    if x == 1.0 {
        return 0.0;
    }
    let nf = n as f64;
    let (nx_floor, alpha) = split_scaled(n, x);
    if nx_floor == 0 || (nx_floor == 1 && alpha == 0.0) {
        // x ≤ 1/n: only the v = n term of the complementary sum survives.
        let cdf = x * ((nf - 1.0) * x.ln_1p()).exp();
        return 1.0 - cdf;
    }
    if -2.0 * nf * x * x < MIN_LOG {
        return 0.0;
    }
    if nx_floor >= n - 1 {
        // x ≥ 1 − 1/n: only the v = 0 term remains.
        return (nf * (-x).ln_1p()).exp();
    }
    if n > SMIRNOV_MAX_EXACT_N {
        return smirnov_large_n(nf, x);
    }
    let upper_terms = nx_floor + 1 - u64::from(alpha == 0.0);
    let use_complement = n >= 10 && upper_terms <= 3 && x <= 0.5 / nf.sqrt();
    let sf = if use_complement {
        1.0 - smirnov_complement_cdf(n, x, nx_floor, alpha, upper_terms)
    } else {
        smirnov_birnbaum_tingey(n, x, nx_floor, alpha)
    };
    sf.clamp(0.0, 1.0)
}

/// `n·x` as its integer part and its fractional part, computed exactly
/// (the product's rounding error is recovered with a fused multiply-add).
fn split_scaled(n: u64, x: f64) -> (u64, f64) {
    let nf = n as f64;
    let product = nf * x;
    let error = nf.mul_add(x, -product);
    let mut whole = product.floor();
    let mut frac = (product - whole) + error;
    if frac < 0.0 {
        whole -= 1.0;
        frac += 1.0;
    }
    if frac >= 1.0 {
        whole += 1.0;
        frac = 0.0;
    }
    (whole as u64, frac)
}

/// scipy's approximation for `n > 10⁶`: `P ≈ exp(−(6nx + 1)² / (18n))`.
fn smirnov_large_n(nf: f64, x: f64) -> f64 {
    let log_p = -(6.0 * nf * x + 1.0).powi(2) / 18.0 / nf;
    if log_p < -std::f64::consts::LN_2 {
        log_p.exp()
    } else {
        1.0 - (-log_p.exp_m1())
    }
}

/// Stirling's remainder for `ln k!`: `ln k! − (k ln k − k + ½ ln 2πk)`.
fn ln_factorial_remainder(k: u64) -> f64 {
    if k >= 10 {
        return stirling_series(k as f64);
    }
    let kf = k as f64;
    let factorial: f64 = (1..=k).map(|i| i as f64).product();
    factorial.ln() - (kf * kf.ln() - kf + 0.5 * (2.0 * PI * kf).ln())
}

/// Whether a sum may stop: the current term times the number of terms left
/// (with a safety factor 4) is below the rounding error of the sum.
fn negligible(term: f64, terms_left: u64, sum: f64) -> bool {
    4.0 * terms_left as f64 * term.abs() < f64::EPSILON * sum
}

/// The Birnbaum–Tingey sum for `P(D⁺_n ≥ x)`, `1 ≤ ⌊nx⌋ ≤ n − 2`.
///
/// Each term `x C(n,v) (x+v/n)^{v−1} (1−x−v/n)^{n−v}` is formed in log
/// space. With `a = n·x` and Stirling's formula for the three factorials of
/// the binomial, the `n ln n`-sized parts cancel analytically, leaving
/// `v·λ(a/v) + (n−v)·λ(−a/(n−v)) + ln(a/(v+a)) + ½ ln(n / (2π v (n−v)))`
/// plus the Stirling remainders, where `λ(t) = ln(1+t) − t` is computed
/// without cancellation; so each term keeps nearly full relative accuracy
/// even for `n` near 10⁶.
fn smirnov_birnbaum_tingey(n: u64, x: f64, nx_floor: u64, alpha: f64) -> f64 {
    let nf = n as f64;
    let a = nx_floor as f64 + alpha;
    let last = n - nx_floor - 1;
    let n_terms = last + 1;
    let remainder_n = ln_factorial_remainder(n);
    let mut sum = (nf * (-x).ln_1p()).exp();
    for v in 1..n_terms {
        let (vf, rest) = (v as f64, (n - v) as f64);
        let up = vf * ln1p_minus(a / vf);
        let t = a / rest;
        let down = if t <= 0.5 {
            rest * ln1p_minus(-t)
        } else {
            // (n − v − a)/(n − v) directly: the integer part is exact.
            let ratio = (((n - v - nx_floor) as f64) - alpha) / rest;
            rest * (ratio.ln() + t)
        };
        let ln_term = up
            + down
            + (a / (vf + a)).ln()
            + 0.5 * (nf / (2.0 * PI * vf * rest)).ln()
            + remainder_n
            - ln_factorial_remainder(v)
            - ln_factorial_remainder(n - v);
        let term = ln_term.exp();
        if term.is_finite() && term != 0.0 {
            sum += term;
        }
        if term != 0.0 {
            if negligible(term, n_terms - v, sum) && v != n_terms - 1 {
                break;
            }
        } else if v > n / 2 {
            break;
        }
    }
    sum
}

/// The complementary (Dwass) sum for `P(D⁺_n < x)`: the terms `v = n, n−1,
/// …` of the same summand, where `1 − x − v/n < 0` makes them alternate;
/// used for at most three terms.
fn smirnov_complement_cdf(n: u64, x: f64, nx_floor: u64, alpha: f64, n_terms: u64) -> f64 {
    let nf = n as f64;
    let mut sum = x * ((nf - 1.0) * x.ln_1p()).exp();
    let mut binomial = 1.0;
    for k in 1..n_terms {
        // v = n − k; (x + v/n) = 1 + (a − k)/n and (1 − x − v/n) = (k − a)/n.
        binomial *= (n - k + 1) as f64 / k as f64;
        let a_minus_k = (nx_floor as f64 - k as f64) + alpha;
        let k_minus_a = (k as f64 - nx_floor as f64) - alpha;
        let v = (n - k) as f64;
        let term = x
            * binomial
            * ((v - 1.0) * (a_minus_k / nf).ln_1p()).exp()
            * (k_minus_a / nf).powi(k as i32);
        if term.is_finite() {
            sum += term;
        }
        if term != 0.0 && negligible(term, n_terms - k, sum) && k != n_terms - 1 {
            break;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_problem() {
        let err = ks_2samp(&[], &[1.0]).expect_err("empty");
        assert!(err.message().contains("a is empty"), "{err}");
        let err = ks_2samp(&[1.0, f64::NAN], &[1.0]).expect_err("NaN");
        assert!(err.message().contains("a[1] is NaN"), "{err}");
        let err = ks_from_counts(&[1, 2], &[1]).expect_err("bins");
        assert!(err.message().contains("reference has 2 bins"), "{err}");
        let err = ks_from_counts(&[0, 0], &[1, 1]).expect_err("zero");
        assert!(
            err.message().contains("reference counts sum to zero"),
            "{err}"
        );
        let err = ks_from_counts(&[u64::MAX, 1], &[1, 1]).expect_err("overflow");
        assert!(err.message().contains("overflow"), "{err}");
    }

    #[test]
    fn statistic_from_counts_is_the_raw_gap() {
        let reference = [3u64, 0, 5, 2];
        let current = [1u64, 4, 0, 5];
        let d = ks_statistic_from_counts(&reference, &current).expect("valid counts");
        // Cumulative shares 0.3/0.1, 0.3/0.5, 0.8/0.5, 1/1: largest gap 0.3.
        assert!((d - 0.3).abs() < 1e-15, "{d}");
        let full = ks_from_counts(&reference, &current).expect("valid counts");
        assert!((full.statistic - d).abs() < 1e-15);
        let err = ks_statistic_from_counts(&[1], &[0]).expect_err("empty current");
        assert!(
            err.message().contains("current counts sum to zero"),
            "{err}"
        );
    }

    #[test]
    fn invalid_sizes_give_nan() {
        assert!(ks_p_value(0.5, 0, 3).0.is_nan());
        assert!(ks_p_value(f64::NAN, 3, 3).0.is_nan());
        assert!(kstwo_sf(0.5, 0).is_nan());
        assert!(smirnov_sf(0, 0.5).is_nan());
        assert!(smirnov_sf(5, 1.5).is_nan());
    }

    #[test]
    fn identical_samples_have_p_one() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let ks = ks_2samp(&a, &a).expect("valid samples");
        assert_eq!(ks.statistic, 0.0);
        assert_eq!(ks.p_value, 1.0);
        assert_eq!(ks.method, KsMethod::Exact);
    }

    /// The band recursion and the closed form agree where both apply:
    /// equal sizes are handled by the band recursion when forced.
    #[test]
    fn band_recursion_matches_closed_form_for_equal_sizes() {
        let mut column = Vec::new();
        for n in [3u64, 10, 57, 400] {
            for h in 1..n.min(30) {
                let closed = prob_outside_square(n, h);
                let band = prob_outside_band(n, n, n, h, &mut column);
                assert!(
                    (closed - band).abs() < 1e-12,
                    "n={n} h={h}: {closed} vs {band}"
                );
            }
        }
    }

    /// The two Smirnov sums agree where scipy would use the complement.
    #[test]
    fn smirnov_sums_agree() {
        for (n, x) in [(100u64, 0.015), (400, 0.006), (1000, 0.0025), (50, 0.05)] {
            let (nx_floor, alpha) = split_scaled(n, x);
            let terms = nx_floor + 1 - u64::from(alpha == 0.0);
            let lower = smirnov_birnbaum_tingey(n, x, nx_floor, alpha);
            let complement = 1.0 - smirnov_complement_cdf(n, x, nx_floor, alpha, terms);
            assert!(
                (lower - complement).abs() < 1e-13,
                "n={n} x={x}: {lower} vs {complement}"
            );
        }
    }

    #[test]
    fn split_scaled_is_exact() {
        // 0.3 is slightly below 3/10, so 10 · 0.3 is slightly below 3.
        assert_eq!(split_scaled(10, 0.3), (2, 1.0 - f64::EPSILON / 2.0));
        assert_eq!(split_scaled(3, 1.0 / 3.0).0, 1);
        assert_eq!(split_scaled(5, 0.2).0, 1);
    }
}
