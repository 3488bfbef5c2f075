//! Golden tests: every drift statistic against the values scipy (and
//! Evidently's formulas on top of scipy) computes for the same inputs.
//!
//! `golden.json` is produced by `scripts/drift_golden.py`; regenerate it with
//! `python3 scripts/drift_golden.py > common/src/drift/golden.json`. Every
//! statistic and p-value must satisfy `|ours − scipy| ≤ 1e-9 · max(1, |scipy|)`,
//! the exact/asymptotic choice of the KS test must match, and where the JSON
//! names the branch scipy's `kstwo` took, our branch selection must agree.
//! Tail probabilities (KS p-values, `kstwo`, `smirnov`, `chi2_sf`,
//! `normal_sf`) must in addition agree to 1e-9 *relative* to scipy's value,
//! so that a tiny p-value is checked for more than being close to zero.
//! Each test collects all mismatches before failing, and prints the largest
//! difference it saw (visible with `cargo test -- --nocapture`).

use super::ks::{self, KsMethod, Tail};
use super::stats;
use serde_json::Value;

const GOLDEN: &str = include_str!("golden.json");

/// The acceptance criterion of the golden tests.
const TOLERANCE: f64 = 1e-9;

fn golden() -> Value {
    serde_json::from_str(GOLDEN).expect("golden.json is valid JSON")
}

fn section(key: &str) -> Vec<Value> {
    golden()[key]
        .as_array()
        .unwrap_or_else(|| panic!("golden.json has no array {key:?}"))
        .clone()
}

fn number(case: &Value, key: &str) -> f64 {
    case[key].as_f64().unwrap_or_else(|| {
        panic!(
            "case {case_name} has no number {key:?}",
            case_name = name(case)
        )
    })
}

fn integer(case: &Value, key: &str) -> u64 {
    case[key]
        .as_u64()
        .unwrap_or_else(|| panic!("case {} has no integer {key:?}", name(case)))
}

fn numbers(case: &Value, key: &str) -> Vec<f64> {
    case[key]
        .as_array()
        .unwrap_or_else(|| panic!("case {} has no array {key:?}", name(case)))
        .iter()
        .map(|v| {
            v.as_f64()
                .unwrap_or_else(|| panic!("{key} holds a non-number"))
        })
        .collect()
}

fn integers(case: &Value, key: &str) -> Vec<u64> {
    case[key]
        .as_array()
        .unwrap_or_else(|| panic!("case {} has no array {key:?}", name(case)))
        .iter()
        .map(|v| {
            v.as_u64()
                .unwrap_or_else(|| panic!("{key} holds a non-integer"))
        })
        .collect()
}

fn optional_numbers(case: &Value, key: &str) -> Option<Vec<f64>> {
    (!case[key].is_null()).then(|| numbers(case, key))
}

fn name(case: &Value) -> String {
    case["name"].as_str().unwrap_or("<unnamed>").to_string()
}

/// The KS statistic of a case: a ratio of integers where the exact bits
/// matter (branch boundaries), else the stored number.
fn statistic_d(case: &Value) -> f64 {
    match case["d_ratio"].as_array() {
        Some(ratio) => {
            let part = |i: usize| ratio[i].as_f64().expect("d_ratio holds two numbers");
            part(0) / part(1)
        }
        None => number(case, "d"),
    }
}

fn method_label(method: KsMethod) -> &'static str {
    match method {
        KsMethod::Exact => "exact",
        KsMethod::Asymptotic => "asymptotic",
    }
}

/// scipy's effective sample size for the asymptotic two-sample p-value.
fn effective_n(n1: u64, n2: u64) -> u64 {
    let (big, small) = (n1.max(n2) as f64, n1.min(n2) as f64);
    (big * small / (big + small)).round_ties_even() as u64
}

/// Collects comparisons for one test and fails with all mismatches at once.
struct Checker {
    test: &'static str,
    failures: Vec<String>,
    largest_abs: f64,
    largest_abs_at: String,
    largest_rel: f64,
    largest_rel_at: String,
    compared: usize,
}

impl Checker {
    fn new(test: &'static str) -> Self {
        Checker {
            test,
            failures: Vec::new(),
            largest_abs: 0.0,
            largest_abs_at: String::new(),
            largest_rel: 0.0,
            largest_rel_at: String::new(),
            compared: 0,
        }
    }

    /// `|ours − expected| ≤ 1e-9 · max(1, |expected|)`.
    fn close(&mut self, what: String, ours: f64, expected: f64) {
        self.compared += 1;
        let diff = if ours == expected {
            0.0
        } else {
            (ours - expected).abs()
        };
        if diff.is_nan() || diff > TOLERANCE * expected.abs().max(1.0) {
            self.failures.push(format!(
                "{what}: ours {ours:e}, scipy {expected:e}, diff {diff:e}"
            ));
            return;
        }
        if diff > self.largest_abs || self.largest_abs_at.is_empty() {
            self.largest_abs = diff;
            self.largest_abs_at = what;
        }
    }

    /// Additionally `|ours − expected| ≤ 1e-9 · |expected|` for a value that
    /// may be far below 1 (a tail probability), where the main criterion is
    /// only an absolute one.
    fn relative(&mut self, what: String, ours: f64, expected: f64) {
        if expected == 0.0 {
            if ours != 0.0 {
                self.failures
                    .push(format!("{what}: ours {ours:e}, scipy exactly 0"));
            }
            return;
        }
        let rel = (ours - expected).abs() / expected.abs();
        if rel.is_nan() || rel > TOLERANCE {
            self.failures.push(format!(
                "{what}: ours {ours:e}, scipy {expected:e}, relative diff {rel:e}"
            ));
            return;
        }
        if rel > self.largest_rel || self.largest_rel_at.is_empty() {
            self.largest_rel = rel;
            self.largest_rel_at = what;
        }
    }

    fn same(&mut self, what: String, ours: &str, expected: &str) {
        self.compared += 1;
        if ours != expected {
            self.failures
                .push(format!("{what}: ours {ours:?}, scipy {expected:?}"));
        }
    }

    fn finish(self) {
        eprintln!(
            "{}: {} comparisons, largest |ours - scipy| = {:e} ({})",
            self.test, self.compared, self.largest_abs, self.largest_abs_at
        );
        if !self.largest_rel_at.is_empty() {
            eprintln!(
                "{}: largest relative difference in tails = {:e} ({})",
                self.test, self.largest_rel, self.largest_rel_at
            );
        }
        assert!(
            self.failures.is_empty(),
            "{} mismatches:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

fn check_ks(check: &mut Checker, case: &Value, ours: ks::Ks, sizes: (u64, u64)) {
    let case_name = name(case);
    check.close(
        format!("{case_name} statistic"),
        ours.statistic,
        number(case, "statistic"),
    );
    check.close(
        format!("{case_name} p_value"),
        ours.p_value,
        number(case, "p_value"),
    );
    check.relative(
        format!("{case_name} p_value"),
        ours.p_value,
        number(case, "p_value"),
    );
    let expected_method = case["method"].as_str().unwrap_or("<missing>");
    check.same(
        format!("{case_name} method"),
        method_label(ours.method),
        expected_method,
    );
    if let Some(branch) = case["kstwo_branch"].as_str() {
        let n = effective_n(sizes.0, sizes.1);
        let ours_branch = ks::kolmogorov_method(n, ours.statistic, Tail::Upper).label();
        check.same(format!("{case_name} kstwo branch"), ours_branch, branch);
    }
}

#[test]
fn ks_2samp_matches_scipy() {
    let mut check = Checker::new("ks_2samp");
    for case in section("ks_2samp") {
        let a = numbers(&case, "a");
        let b = numbers(&case, "b");
        match ks::ks_2samp(&a, &b) {
            Ok(ours) => check_ks(&mut check, &case, ours, (a.len() as u64, b.len() as u64)),
            Err(e) => check.failures.push(format!("{}: error {e}", name(&case))),
        }
    }
    check.finish();
}

#[test]
fn ks_from_counts_matches_scipy_and_expanded_samples() {
    let mut check = Checker::new("ks_from_counts");
    for case in section("ks_counts") {
        let reference = integers(&case, "reference");
        let current = integers(&case, "current");
        let ours = match ks::ks_from_counts(&reference, &current) {
            Ok(ours) => ours,
            Err(e) => {
                check.failures.push(format!("{}: error {e}", name(&case)));
                continue;
            }
        };
        let (n1, n2) = (reference.iter().sum(), current.iter().sum());
        check_ks(&mut check, &case, ours, (n1, n2));

        // Bin i as the value i repeated counts[i] times: the same test.
        let expand = |counts: &[u64]| -> Vec<f64> {
            counts
                .iter()
                .enumerate()
                .flat_map(|(i, &c)| std::iter::repeat_n(i as f64, c as usize))
                .collect()
        };
        match ks::ks_2samp(&expand(&reference), &expand(&current)) {
            Ok(samples) => {
                if samples != ours {
                    check.failures.push(format!(
                        "{}: counts {ours:?} but expanded samples {samples:?}",
                        name(&case)
                    ));
                }
            }
            Err(e) => check
                .failures
                .push(format!("{}: expanded error {e}", name(&case))),
        }
    }
    check.finish();
}

#[test]
fn ks_p_value_matches_scipy() {
    let mut check = Checker::new("ks_p_value");
    for case in section("ks_p_value") {
        let case_name = name(&case);
        let (n1, n2) = (integer(&case, "n1"), integer(&case, "n2"));
        let d = statistic_d(&case);
        let (p, method) = ks::ks_p_value(d, n1, n2);
        check.close(format!("{case_name} p_value"), p, number(&case, "p_value"));
        check.relative(format!("{case_name} p_value"), p, number(&case, "p_value"));
        let expected_method = case["method"].as_str().unwrap_or("<missing>");
        check.same(
            format!("{case_name} method"),
            method_label(method),
            expected_method,
        );
        if let Some(branch) = case["kstwo_branch"].as_str() {
            let ours = ks::kolmogorov_method(effective_n(n1, n2), d, Tail::Upper).label();
            check.same(format!("{case_name} kstwo branch"), ours, branch);
        }
    }
    check.finish();
}

#[test]
fn kstwo_matches_scipy() {
    let mut check = Checker::new("kstwo");
    for case in section("kstwo") {
        let case_name = name(&case);
        let n = integer(&case, "n");
        let d = statistic_d(&case);
        let tail = match case["tail"].as_str() {
            Some("cdf") => Tail::Lower,
            _ => Tail::Upper,
        };
        let ours = match tail {
            Tail::Lower => ks::kstwo_cdf(d, n),
            Tail::Upper => ks::kstwo_sf(d, n),
        };
        let expected = number(&case, "value");
        check.close(format!("{case_name} value"), ours, expected);
        // The CDF cases probe the methods where the value itself is small.
        check.relative(format!("{case_name} value"), ours, expected);
        let branch = case["branch"].as_str().unwrap_or("<missing>");
        check.same(
            format!("{case_name} branch"),
            ks::kolmogorov_method(n, d, tail).label(),
            branch,
        );
    }
    check.finish();
}

#[test]
fn smirnov_matches_scipy() {
    let mut check = Checker::new("smirnov");
    for case in section("smirnov") {
        let case_name = name(&case);
        let ours = ks::smirnov_sf(integer(&case, "n"), number(&case, "x"));
        let expected = number(&case, "sf");
        check.close(format!("{case_name} sf"), ours, expected);
        check.relative(format!("{case_name} sf"), ours, expected);
    }
    check.finish();
}

#[test]
fn psi_matches_evidently() {
    let mut check = Checker::new("psi");
    for case in section("psi") {
        let reference = numbers(&case, "reference");
        let current = numbers(&case, "current");
        match stats::psi(&reference, &current) {
            Ok(ours) => check.close(name(&case), ours, number(&case, "psi")),
            Err(e) => check.failures.push(format!("{}: error {e}", name(&case))),
        }
    }
    check.finish();
}

#[test]
fn jensen_shannon_matches_scipy() {
    let mut check = Checker::new("jensen_shannon");
    for case in section("jensen_shannon") {
        let p = numbers(&case, "p");
        let q = numbers(&case, "q");
        match stats::jensen_shannon(&p, &q) {
            Ok(ours) => check.close(name(&case), ours, number(&case, "distance")),
            Err(e) => check.failures.push(format!("{}: error {e}", name(&case))),
        }
    }
    check.finish();
}

#[test]
fn wasserstein_matches_scipy() {
    let mut check = Checker::new("wasserstein");
    for case in section("wasserstein") {
        let u = numbers(&case, "u_values");
        let v = numbers(&case, "v_values");
        let uw = optional_numbers(&case, "u_weights");
        let vw = optional_numbers(&case, "v_weights");
        match stats::wasserstein(&u, &v, uw.as_deref(), vw.as_deref()) {
            Ok(ours) => check.close(name(&case), ours, number(&case, "distance")),
            Err(e) => check.failures.push(format!("{}: error {e}", name(&case))),
        }
    }
    check.finish();
}

#[test]
fn chisquare_matches_scipy() {
    let mut check = Checker::new("chisquare");
    for case in section("chisquare") {
        let case_name = name(&case);
        let observed = numbers(&case, "observed");
        let expected = numbers(&case, "expected");
        match stats::chisquare(&observed, &expected) {
            Ok(ours) => {
                check.close(
                    format!("{case_name} statistic"),
                    ours.statistic,
                    number(&case, "statistic"),
                );
                check.close(
                    format!("{case_name} p_value"),
                    ours.p_value,
                    number(&case, "p_value"),
                );
                check.same(
                    format!("{case_name} dof"),
                    &ours.dof.to_string(),
                    &integer(&case, "dof").to_string(),
                );
            }
            Err(e) => check.failures.push(format!("{case_name}: error {e}")),
        }
    }
    check.finish();
}

#[test]
fn chi2_sf_matches_scipy() {
    let mut check = Checker::new("chi2_sf");
    for case in section("chi2_sf") {
        let (x, dof) = (number(&case, "x"), number(&case, "dof"));
        let expected = number(&case, "sf");
        let ours = stats::chi2_sf(x, dof);
        check.close(format!("chi2_sf({x}, {dof})"), ours, expected);
        check.relative(format!("chi2_sf({x}, {dof})"), ours, expected);
    }
    check.finish();
}

#[test]
fn normal_sf_matches_scipy() {
    let mut check = Checker::new("normal_sf");
    for case in section("normal_sf") {
        let z = number(&case, "z");
        let expected = number(&case, "sf");
        let ours = stats::normal_sf(z);
        check.close(format!("normal_sf({z})"), ours, expected);
        check.relative(format!("normal_sf({z})"), ours, expected);
    }
    check.finish();
}

#[test]
fn z_test_matches_evidently() {
    let mut check = Checker::new("z_test");
    for case in section("z_test") {
        let case_name = name(&case);
        let result = stats::z_test(
            integer(&case, "ref_ones"),
            integer(&case, "ref_n"),
            integer(&case, "cur_ones"),
            integer(&case, "cur_n"),
        );
        match result {
            Ok(ours) => {
                check.close(
                    format!("{case_name} statistic"),
                    ours.statistic,
                    number(&case, "statistic"),
                );
                check.close(
                    format!("{case_name} p_value"),
                    ours.p_value,
                    number(&case, "p_value"),
                );
            }
            Err(e) => check.failures.push(format!("{case_name}: error {e}")),
        }
    }
    check.finish();
}
