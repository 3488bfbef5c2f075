#!/usr/bin/env python3
"""Golden values for kiln's drift statistics (common/src/drift/stats.rs, ks.rs).

How to run (from the repository root, with numpy and scipy installed):

    python3 scripts/drift_golden.py > common/src/drift/golden.json

Generated with scipy 1.17.1 and numpy 2.4.6 on CPython 3.11 (the versions are
also written into the output). The Rust tests in common/src/drift/golden_tests.rs
read the JSON and require |ours - scipy| <= 1e-9 * max(1, |scipy|).

Every input is generated from fixed seeds, and every sample value is rounded
(to 6 decimals, or to integers for data with ties) *before* scipy sees it, so the
JSON holds exactly the inputs scipy was given. Where a statistic must be
reproduced bit for bit (lattice values of the KS statistic that sit on a branch
boundary), the JSON stores it as a ratio of integers that both sides divide the
same way.

What is covered:
  * ks_2samp on raw samples: exact path with n1 == n2 (closed form) and
    n1 != n2 (inside-band recursion), small and moderate sizes, ties, tiny and
    large p; the exact path's numeric-failure fallback to the asymptotic
    distribution (the equal-size closed form rounding to just above 1); and
    full samples with max(n1, n2) > 10000 (asymptotic).
  * ks on binned counts (samples expanded as np.repeat(arange(k), counts)),
    exact at n1 = n2 = 10000 and n1 = 10000, n2 = 7000, asymptotic beyond.
  * ks_p_value(d, n1, n2) and kstwo.sf / kstwo.cdf for every branch of
    scipy's _kolmogn (Ruben-Gambino low/high, 2*smirnov, Durbin, Pomeranz,
    Pelz-Good, the n*x^2 cut-offs); the branch is checked by tracing scipy's
    own calls and is part of each case name.
  * scipy.special.smirnov for each of its code paths.
  * PSI (Evidently's feel_zeroes), Jensen-Shannon, Wasserstein (with and
    without weights), chisquare (several dof), chi2 sf, normal sf and
    Evidently's two-proportion Z test (including the both-constant case).
"""

import json
import math
import sys
import warnings

import numpy as np
import scipy
import scipy.special
from scipy import stats
from scipy.spatial import distance
from scipy.stats import _ksstats

MAX_AUTO_N = 10000  # scipy's ks_2samp switch from exact to asymptotic


def f(x):
    """A plain Python float (JSON has no numpy scalars)."""
    return float(x)


# ---------------------------------------------------------------------------
# Branch tracing for scipy's _kolmogn.
# ---------------------------------------------------------------------------

def expected_kolmogn_branch(n, x, cdf):
    """The branch scipy's _kolmogn takes, by its own selection rules."""
    if x >= 1.0 or x <= 0.0:
        return "trivial"
    t = n * x
    if t <= 1.0:
        return "trivial" if t <= 0.5 else "ruben_gambino_low"
    if t >= n - 1:
        return "ruben_gambino_high"
    if x >= 0.5:
        return "twice_smirnov"
    nxsquared = t * x
    if n <= 140:
        if nxsquared <= 0.754693:
            return "durbin"
        if nxsquared <= 4:
            return "pomeranz"
        return "twice_smirnov"
    if not cdf:
        if nxsquared >= 370.0:
            return "sf_zero"
        if nxsquared >= 2.2:
            return "twice_smirnov"
    if nxsquared >= 18.0:
        return "cdf_one"
    if n <= 100000 and n * x**1.5 <= 1.4:
        return "durbin"
    return "pelz_good"


def traced_kstwo(n, x, cdf):
    """kstwo.sf (or .cdf) with the methods scipy called recorded."""
    calls = []
    originals = {
        "durbin": _ksstats._kolmogn_DMTW,
        "pomeranz": _ksstats._kolmogn_Pomeranz,
        "pelz_good": _ksstats._kolmogn_PelzGood,
    }
    original_smirnov = scipy.special.smirnov

    def wrap(name, fn):
        def inner(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return inner

    try:
        for name, fn in originals.items():
            setattr(_ksstats, "_kolmogn_" + {"durbin": "DMTW", "pomeranz": "Pomeranz",
                                              "pelz_good": "PelzGood"}[name], wrap(name, fn))
        scipy.special.smirnov = wrap("twice_smirnov", original_smirnov)
        value = stats.kstwo.cdf(x, n) if cdf else stats.kstwo.sf(x, n)
    finally:
        _ksstats._kolmogn_DMTW = originals["durbin"]
        _ksstats._kolmogn_Pomeranz = originals["pomeranz"]
        _ksstats._kolmogn_PelzGood = originals["pelz_good"]
        scipy.special.smirnov = original_smirnov
    branch = expected_kolmogn_branch(n, x, cdf)
    traced = {"durbin", "pomeranz", "pelz_good", "twice_smirnov"}
    if branch in traced:
        assert calls == [branch], (n, x, cdf, branch, calls)
    else:
        assert calls == [], (n, x, cdf, branch, calls)
    return f(value), branch


# ---------------------------------------------------------------------------
# Two-sample KS.
# ---------------------------------------------------------------------------

def ks_scipy(a, b):
    """scipy.stats.ks_2samp(a, b) and the method it ended up using."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = stats.ks_2samp(a, b)
    fell_back = any("Exact calculation unsuccessful" in str(w.message) for w in caught)
    exact = max(len(a), len(b)) <= MAX_AUTO_N and not fell_back
    return f(res.statistic), f(res.pvalue), ("exact" if exact else "asymptotic")


def asymptotic_n(n1, n2):
    m, n = sorted([float(n1), float(n2)], reverse=True)
    return int(np.round(m * n / (m + n)))


def ks_sample_case(name, a, b, integers=False):
    stat, p, method = ks_scipy(np.asarray(a, float), np.asarray(b, float))
    conv = (lambda v: [int(x) for x in v]) if integers else (lambda v: [f(x) for x in v])
    case = {"name": name, "a": conv(a), "b": conv(b),
            "statistic": stat, "p_value": p, "method": method}
    if method == "asymptotic":
        case["kstwo_branch"] = expected_kolmogn_branch(asymptotic_n(len(a), len(b)), stat, False)
    return case


def ks_counts_case(name, reference, current):
    k = len(reference)
    a = np.repeat(np.arange(k, dtype=float), reference)
    b = np.repeat(np.arange(k, dtype=float), current)
    stat, p, method = ks_scipy(a, b)
    case = {"name": name, "reference": [int(c) for c in reference],
            "current": [int(c) for c in current],
            "statistic": stat, "p_value": p, "method": method}
    if method == "asymptotic":
        case["kstwo_branch"] = expected_kolmogn_branch(asymptotic_n(len(a), len(b)), stat, False)
    return case


def ks_p_value_scipy(d, n1, n2):
    """The p-value ks_2samp reports for statistic d (same code path)."""
    from scipy.stats._stats_py import _attempt_exact_2kssamp
    if max(n1, n2) <= MAX_AUTO_N:
        g = math.gcd(n1, n2)
        success, d_lattice, p = _attempt_exact_2kssamp(n1, n2, g, d, "two-sided")
        if success:
            return f(np.clip(p, 0, 1)), "exact", None
        d = d_lattice
    n = asymptotic_n(n1, n2)
    p, branch = traced_kstwo(n, d, cdf=False)
    return f(np.clip(p, 0, 1)), "asymptotic", branch


def ks_p_value_case(name, n1, n2, d=None, ratio=None):
    if ratio is not None:
        d = ratio[0] / ratio[1]
    p, method, branch = ks_p_value_scipy(d, n1, n2)
    case = {"name": name, "n1": n1, "n2": n2, "p_value": p, "method": method}
    if ratio is not None:
        case["d_ratio"] = list(ratio)
    else:
        case["d"] = f(d)
    if branch is not None:
        case["kstwo_branch"] = branch
        assert branch in name, (name, branch)
    return case


def kstwo_case(name, n, d=None, ratio=None, cdf=False):
    if ratio is not None:
        d = ratio[0] / ratio[1]
    value, branch = traced_kstwo(n, d, cdf)
    assert branch in name, (name, branch)
    case = {"name": name, "n": n, "tail": "cdf" if cdf else "sf", "value": value,
            "branch": branch}
    if ratio is not None:
        case["d_ratio"] = list(ratio)
    else:
        case["d"] = f(d)
    return case


def smirnov_case(name, n, x):
    return {"name": name, "n": n, "x": f(x), "sf": f(scipy.special.smirnov(n, x))}


def interleaved(n, block):
    """Two samples of size n whose pooled order alternates in blocks: D = block/n."""
    a, b = [], []
    value = 0
    for start in range(0, n, block):
        for _ in range(min(block, n - start)):
            a.append(value)
            value += 1
        for _ in range(min(block, n - start)):
            b.append(value)
            value += 1
    return a, b


def ks_cases(rng):
    r6 = lambda v: np.round(v, 6)
    cases = [
        ks_sample_case("exact_equal_n8_normal",
                       r6(rng.normal(0, 1, 8)), r6(rng.normal(0.3, 1, 8))),
        ks_sample_case("exact_equal_n50_shift_small_p",
                       r6(rng.normal(0, 1, 50)), r6(rng.normal(1.2, 1, 50))),
        ks_sample_case("exact_equal_n200_same_large_p",
                       r6(rng.normal(0, 1, 200)), r6(rng.normal(0, 1, 200))),
        ks_sample_case("exact_equal_n120_integer_ties",
                       rng.poisson(3.0, 120), rng.poisson(3.4, 120), integers=True),
        ks_sample_case("exact_unequal_7_11",
                       r6(rng.uniform(0, 1, 7)), r6(rng.uniform(0.2, 1.2, 11))),
        ks_sample_case("exact_unequal_300_200_gcd100",
                       r6(rng.normal(0, 1, 300)), r6(rng.normal(0.1, 1.1, 200))),
        ks_sample_case("exact_unequal_1000_750_moderate_p",
                       r6(rng.normal(0, 1, 1000)), r6(rng.normal(0.08, 1, 750))),
        ks_sample_case("exact_unequal_400_301_tiny_p",
                       r6(rng.normal(0, 1, 400)), r6(rng.normal(1.0, 1, 301))),
        ks_sample_case("exact_unequal_90_37_same_large_p",
                       r6(rng.exponential(1, 90)), r6(rng.exponential(1, 37))),
        ks_sample_case("exact_unequal_250_180_integer_ties",
                       rng.integers(0, 12, 250), rng.integers(1, 13, 180), integers=True),
        ks_sample_case("exact_unequal_3_1_tiny_sizes", [0.5, 1.5, 2.5], [1.0]),
        ks_sample_case("exact_identical_samples_p1", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
    ]
    # The equal-size closed form rounds to 1.0000000000000002 for these (n, h):
    # scipy falls back to the asymptotic distribution.
    for n, block in [(5, 1), (60, 2), (69, 2)]:
        a, b = interleaved(n, block)
        case = ks_sample_case(f"fallback_equal_n{n}_h{block}_closed_form_above_one", a, b,
                              integers=True)
        assert case["method"] == "asymptotic", case["name"]
        cases.append(case)
    # Full samples beyond MAX_AUTO_N, stored as integers (rounded draws).
    big_a = np.round(rng.normal(0, 1, 10001) * 300).astype(int)
    big_b = np.round(rng.normal(0.05, 1, 2500) * 300).astype(int)
    cases.append(ks_sample_case("asymptotic_full_10001_2500_ties", big_a, big_b, integers=True))
    for c in cases:
        if c["method"] == "asymptotic" and "kstwo_branch" in c:
            c["name"] += "_" + c["kstwo_branch"]
    return cases


def binned(rng, n, loc, scale, bins=100, span=4.0):
    """Counts of n normal draws in `bins` bins (two open-ended tail bins)."""
    edges = np.linspace(-span, span, bins - 1)
    idx = np.searchsorted(edges, rng.normal(loc, scale, n))
    return np.bincount(idx, minlength=bins)


def ks_count_cases(rng):
    cases = [
        ks_counts_case("counts_exact_equal_10000", binned(rng, 10000, 0, 1),
                       binned(rng, 10000, 0.03, 1)),
        ks_counts_case("counts_exact_unequal_10000_7000", binned(rng, 10000, 0, 1),
                       binned(rng, 7000, 0.02, 1.02)),
        ks_counts_case("counts_exact_unequal_9999_10000_coprime", binned(rng, 9999, 0, 1),
                       binned(rng, 10000, 0.01, 1)),
        ks_counts_case("counts_exact_small_with_empty_bins", [0, 3, 0, 5, 2, 0, 1, 0],
                       [1, 0, 0, 2, 4, 3, 0, 0]),
        ks_counts_case("counts_asymptotic_200000_150000", binned(rng, 200000, 0, 1),
                       binned(rng, 150000, 0.01, 1)),
        ks_counts_case("counts_asymptotic_300000_250000_drift", binned(rng, 300000, 0, 1),
                       binned(rng, 250000, 0.05, 1)),
        ks_counts_case("counts_asymptotic_20000_60_small_n", binned(rng, 20000, 0, 1, 20),
                       binned(rng, 60, 0.2, 1, 20)),
    ]
    for c in cases:
        if c["method"] == "asymptotic":
            c["name"] += "_" + c["kstwo_branch"]
    return cases


def ks_p_value_cases():
    big_small = (20000, 50)  # effective n = round(49.875) = 50 (<= 140)
    big_big = (20000, 20000)  # effective n = 10000
    return [
        ks_p_value_case("exact_equal_h_large", 10000, 10000, d=0.0123),
        ks_p_value_case("exact_unequal_10000_7000", 10000, 7000, d=0.0213),
        ks_p_value_case("exact_unequal_10000_7000_d_half", 10000, 7000, d=0.5),
        ks_p_value_case("exact_d_zero", 30, 20, d=0.0),
        ks_p_value_case("exact_d_one", 30, 20, d=1.0),
        ks_p_value_case("exact_fallback_equal_n60_h2_ruben_gambino_low", 60, 60, ratio=(2, 60)),
        ks_p_value_case("asym_n50_trivial", *big_small, d=0.009),
        ks_p_value_case("asym_n50_ruben_gambino_low", *big_small, d=0.015),
        ks_p_value_case("asym_n50_t_equals_1_ruben_gambino_low", *big_small, ratio=(1, 50)),
        ks_p_value_case("asym_n50_ruben_gambino_high", *big_small, d=0.985),
        ks_p_value_case("asym_n50_t_equals_n_minus_1_ruben_gambino_high", *big_small,
                        ratio=(49, 50)),
        ks_p_value_case("asym_n50_x_half_twice_smirnov", *big_small, d=0.5),
        ks_p_value_case("asym_n50_x_0.6_twice_smirnov", *big_small, d=0.6),
        ks_p_value_case("asym_n50_durbin", *big_small, d=0.1),
        ks_p_value_case("asym_n50_pomeranz_integer_t", *big_small, d=0.2),
        ks_p_value_case("asym_n50_pomeranz_frac_low", *big_small, d=0.205),
        ks_p_value_case("asym_n50_pomeranz_frac_high", *big_small, d=0.213),
        ks_p_value_case("asym_n50_twice_smirnov_tail", *big_small, d=0.35),
        ks_p_value_case("asym_n10000_sf_zero", *big_big, d=0.2),
        ks_p_value_case("asym_n10000_twice_smirnov", *big_big, d=0.02),
        ks_p_value_case("asym_n10000_twice_smirnov_tiny_p", *big_big, d=0.08),
        ks_p_value_case("asym_n10000_durbin", *big_big, d=0.0025),
        ks_p_value_case("asym_n10000_pelz_good", *big_big, d=0.01),
        ks_p_value_case("asym_n10000_pelz_good_near_cutoff", *big_big, d=0.0148),
        ks_p_value_case("asym_n10000_ruben_gambino_low", *big_big, d=0.00008),
        ks_p_value_case("asym_n10000_ruben_gambino_high", *big_big, d=0.99995),
        ks_p_value_case("asym_n10000_x_half_twice_smirnov", *big_big, d=0.5),
        ks_p_value_case("asym_n200000_pelz_good", 400000, 400000, d=0.003),
        ks_p_value_case("asym_n200000_twice_smirnov", 400000, 400000, d=0.004),
        ks_p_value_case("asym_n1500000_twice_smirnov_large_n_approx", 3000000, 3000000,
                        d=0.0015),
        ks_p_value_case("asym_n1500000_pelz_good", 3000000, 3000000, d=0.0008),
    ]


def kstwo_cases():
    cases = [
        kstwo_case("sf_n1_ruben_gambino_low", 1, d=0.7),
        kstwo_case("sf_n2_ruben_gambino_high", 2, d=0.6),
        kstwo_case("sf_n3_twice_smirnov", 3, d=0.5),
        kstwo_case("sf_n10_durbin", 10, d=0.2),
        kstwo_case("sf_n10_pomeranz", 10, d=0.33),
        kstwo_case("sf_n100_durbin", 100, d=0.07),
        kstwo_case("sf_n100_pomeranz", 100, d=0.15),
        kstwo_case("sf_n100_nx2_eq_4_boundary_pomeranz", 100, ratio=(1, 5)),
        kstwo_case("sf_n140_twice_smirnov", 140, d=0.25),
        kstwo_case("sf_n140_ruben_gambino_low", 140, d=0.0055),
        kstwo_case("sf_n141_ruben_gambino_low", 141, d=0.0055),
        kstwo_case("sf_n141_durbin", 141, d=0.04),
        kstwo_case("sf_n141_pelz_good", 141, d=0.1),
        kstwo_case("sf_n141_twice_smirnov", 141, d=0.13),
        kstwo_case("sf_n1000_twice_smirnov", 1000, d=0.06),
        kstwo_case("sf_n1000_pelz_good", 1000, d=0.03),
        kstwo_case("sf_n1000_durbin", 1000, d=0.0115),
        kstwo_case("sf_n100000_durbin", 100000, d=0.0005),
        kstwo_case("sf_n100001_pelz_good", 100001, d=0.0005),
        kstwo_case("sf_n50000_sf_zero", 50000, d=0.09),
        # CDF tails: exercise the methods where the CDF itself is small.
        kstwo_case("cdf_n10_durbin", 10, d=0.12, cdf=True),
        kstwo_case("cdf_n50_durbin", 50, d=0.07, cdf=True),
        kstwo_case("cdf_n50_pomeranz", 50, d=0.2, cdf=True),
        kstwo_case("cdf_n137_pomeranz", 137, d=0.16, cdf=True),
        kstwo_case("cdf_n500_durbin", 500, d=0.019, cdf=True),
        kstwo_case("cdf_n500_pelz_good", 500, d=0.05, cdf=True),
        kstwo_case("cdf_n5000_pelz_good_mid", 5000, d=0.03, cdf=True),
        kstwo_case("cdf_n5000_cdf_one", 5000, d=0.07, cdf=True),
        kstwo_case("cdf_n200000_pelz_good_small", 200000, d=0.0015, cdf=True),
        kstwo_case("cdf_n300_ruben_gambino_low", 300, d=0.003, cdf=True),
    ]
    return cases


def smirnov_cases():
    return [
        smirnov_case("n1", 1, 0.3),
        smirnov_case("x_below_1_over_n", 20, 0.03),
        smirnov_case("x_equals_1_over_n", 20, 0.05),
        smirnov_case("x_above_1_minus_1_over_n", 20, 0.96),
        smirnov_case("underflow_zero", 2000, 0.7),
        smirnov_case("n_above_1e6_approx", 2000000, 0.001),
        smirnov_case("n_above_1e6_approx_small_logp", 2000000, 0.0001),
        smirnov_case("complement_sum", 100, 0.015),
        smirnov_case("complement_sum_n1000", 1000, 0.0025),
        smirnov_case("lower_sum_small_n", 7, 0.3),
        smirnov_case("lower_sum_mid", 100, 0.1),
        smirnov_case("lower_sum_x_half", 100, 0.5),
        smirnov_case("lower_sum_n1000_tail", 1000, 0.08),
        smirnov_case("lower_sum_n20000", 20000, 0.012),
        smirnov_case("lower_sum_n1e6", 1000000, 0.0015),
        smirnov_case("lower_sum_n1e6_tail", 1000000, 0.004),
    ]


# ---------------------------------------------------------------------------
# Other statistics.
# ---------------------------------------------------------------------------

def evidently_psi(reference_counts, current_counts):
    """Evidently's _psi on histograms (get_binned_data with feel_zeroes=True)."""
    reference_percents = np.asarray(reference_counts, float) / np.sum(reference_counts)
    current_percents = np.asarray(current_counts, float) / np.sum(current_counts)
    for percents in (reference_percents, current_percents):
        smallest = min(percents[percents != 0])
        np.place(percents, percents == 0, smallest / 10**6 if smallest <= 0.0001 else 0.0001)
    psi_values = (reference_percents - current_percents) * np.log(
        reference_percents / current_percents)
    return f(np.sum(psi_values))


def psi_cases(rng):
    raw = [
        ("no_empty_bins", binned(rng, 5000, 0, 1, 12), binned(rng, 4000, 0.2, 1, 12)),
        ("empty_in_current", [120, 80, 40, 10, 5], [100, 90, 50, 0, 0]),
        ("empty_in_reference", [0, 80, 40, 10, 5], [3, 90, 50, 8, 1]),
        ("empty_in_both_same_bin", [10, 0, 30, 60], [12, 0, 33, 50]),
        ("tiny_share_fill_min_over_1e6", [1, 49999, 0, 30000], [0, 40000, 100, 20000]),
        ("identical", [5, 5, 5, 5], [10, 10, 10, 10]),
        ("strong_shift", binned(rng, 3000, 0, 1, 30), binned(rng, 3000, 1.5, 1, 30)),
    ]
    return [{"name": name, "reference": [f(x) for x in r], "current": [f(x) for x in c],
             "psi": evidently_psi(r, c)} for name, r, c in raw]


def js_cases(rng):
    raw = [
        ("simple", [0.1, 0.4, 0.5], [0.3, 0.3, 0.4]),
        ("unnormalised_counts", [10, 40, 50, 0], [3, 3, 4, 10]),
        ("zero_bins_both", [0, 5, 5, 0], [0, 1, 9, 0]),
        ("disjoint_support", [1, 1, 0, 0], [0, 0, 1, 1]),
        ("identical", [2, 3, 5], [4, 6, 10]),
        ("many_bins", binned(rng, 10000, 0, 1, 40), binned(rng, 8000, 0.1, 1.1, 40)),
    ]
    return [{"name": name, "p": [f(x) for x in p], "q": [f(x) for x in q],
             "distance": f(distance.jensenshannon(np.asarray(p, float),
                                                  np.asarray(q, float)))}
            for name, p, q in raw]


def wasserstein_cases(rng):
    r6 = lambda v: [f(x) for x in np.round(v, 6)]
    raw = [
        ("unweighted_small", [0.0, 1.0, 3.0], [5.0, 6.0, 8.0], None, None),
        ("unweighted_ties", [1, 1, 2, 3, 3, 3], [1, 2, 2, 4], None, None),
        ("unweighted_normal", r6(rng.normal(0, 1, 500)), r6(rng.normal(0.3, 1.2, 300)),
         None, None),
        ("weighted_both", [0.0, 1.0, 3.0], [5.0, 6.0, 8.0], [1.0, 1.0, 1.0],
         [1.0, 1.0, 1.0]),
        ("weighted_scipy_doc", [3.4, 3.9, 7.5, 7.8], [4.5, 1.4], [1.4, 0.9, 3.1, 7.2],
         [3.2, 3.5]),
        ("weighted_u_only_with_zero_weight", [0.5, 2.0, 2.0, 4.0], [1.0, 3.0],
         [0.0, 2.0, 1.0, 3.0], None),
        ("weighted_histogram_bins", list(range(20)), list(range(20)),
         [f(x) for x in binned(rng, 2000, 0, 1, 20)],
         [f(x) for x in binned(rng, 1500, 0.3, 1, 20)]),
    ]
    cases = []
    for name, u, v, uw, vw in raw:
        u = [f(x) for x in u]
        v = [f(x) for x in v]
        cases.append({"name": name, "u_values": u, "v_values": v, "u_weights": uw,
                      "v_weights": vw,
                      "distance": f(stats.wasserstein_distance(u, v, uw, vw))})
    return cases


def chisquare_cases(rng):
    def scaled_expected(obs, ref):
        ref = np.asarray(ref, float)
        return ref / ref.sum() * np.sum(obs)

    raw = []
    raw.append(("dof1", [30.0, 70.0], [40.0, 60.0]))
    raw.append(("dof2", [20.0, 30.0, 50.0], [25.0, 25.0, 50.0]))
    obs = binned(rng, 2000, 0, 1, 6, span=2.0)
    raw.append(("dof5_from_reference_shares", obs,
                scaled_expected(obs, binned(rng, 5000, 0, 1, 6, span=2.0))))
    obs = binned(rng, 5000, 0.1, 1, 21, span=2.5)
    raw.append(("dof20", obs, scaled_expected(obs, binned(rng, 5000, 0, 1, 21, span=2.5))))
    obs = rng.poisson(50, 101)
    raw.append(("dof100", obs, scaled_expected(obs, np.full(101, 1.0))))
    obs = binned(rng, 4000, 0.8, 1, 10, span=2.0)
    raw.append(("dof9_tiny_p", obs, scaled_expected(obs, binned(rng, 4000, 0, 1, 10, span=2.0))))
    raw.append(("dof3_sums_differ_within_tolerance", [10.0, 20.0, 30.0, 40.0],
                [10.0, 20.0, 30.0, 40.0 + 1e-7]))
    obs = rng.poisson(1000, 1001)
    raw.append(("dof1000_large", obs, scaled_expected(obs, np.full(1001, 1.0))))
    cases = []
    for name, o, e in raw:
        o = [f(x) for x in o]
        e = [f(x) for x in e]
        res = stats.chisquare(o, e)
        cases.append({"name": name, "observed": o, "expected": e,
                      "statistic": f(res.statistic), "p_value": f(res.pvalue),
                      "dof": len(o) - 1})
    return cases


def chi2_sf_cases():
    grid = [(0.5, 1), (3.84, 1), (40.0, 1), (0.1, 2), (5.99, 2), (1.0, 3), (11.3, 3),
            (25.0, 5), (3.0, 7), (60.0, 10), (0.01, 0.5), (900.0, 1000), (1100.0, 1000),
            (1500.0, 1000), (99000.0, 100000), (101500.0, 100000), (1e-8, 4), (700.0, 3),
            (1800.0, 7)]
    return [{"x": x, "dof": f(k), "sf": f(stats.chi2.sf(x, k))} for x, k in grid]


def normal_sf_cases():
    zs = [-8.0, -3.0, -1.0, -1e-9, 0.0, 0.5, 1.0, 1.6448536269514722, 1.959963984540054,
          2.5, 3.0, 5.0, 8.0, 12.0, 20.0, 37.5]
    return [{"z": z, "sf": f(stats.norm.sf(z))} for z in zs]


def evidently_z(ref_ones, ref_n, cur_ones, cur_n):
    """Evidently's _z_stat_test on 0/1 data given as counts of ones."""
    ref_constant = ref_ones in (0, ref_n)
    cur_constant = cur_ones in (0, cur_n)
    if ref_constant and cur_constant and (ref_ones == 0) == (cur_ones == 0):
        return 0.0, 1.0
    n1, n2 = ref_n, cur_n
    p1 = float(ref_ones) / n1
    p2 = float(cur_ones) / n2
    P = float(p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / np.sqrt(P * (1 - P) * (1.0 / n1 + 1.0 / n2))
    return f(z), f(2 * (1 - stats.norm.cdf(np.abs(z))))


def z_cases():
    raw = [
        ("balanced", 50, 100, 60, 100),
        ("unequal_sizes", 120, 1000, 90, 600),
        ("tiny_p", 100, 1000, 300, 1000),
        ("no_difference", 30, 300, 20, 200),
        ("both_all_zero", 0, 50, 0, 80),
        ("both_all_one", 50, 50, 80, 80),
        ("ref_all_zero_cur_all_one", 0, 40, 30, 30),
        ("ref_constant_cur_mixed", 0, 100, 3, 100),
        ("large_counts", 51234, 100000, 50011, 98000),
    ]
    cases = []
    for name, ro, rn, co, cn in raw:
        z, p = evidently_z(ro, rn, co, cn)
        cases.append({"name": name, "ref_ones": ro, "ref_n": rn, "cur_ones": co,
                      "cur_n": cn, "statistic": z, "p_value": p})
    return cases


def main():
    rng = np.random.default_rng(20240611)
    golden = {
        "generated_by": "scripts/drift_golden.py",
        "versions": {"scipy": scipy.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "ks_2samp": ks_cases(rng),
        "ks_counts": ks_count_cases(rng),
        "ks_p_value": ks_p_value_cases(),
        "kstwo": kstwo_cases(),
        "smirnov": smirnov_cases(),
        "psi": psi_cases(rng),
        "jensen_shannon": js_cases(rng),
        "wasserstein": wasserstein_cases(rng),
        "chisquare": chisquare_cases(rng),
        "chi2_sf": chi2_sf_cases(),
        "normal_sf": normal_sf_cases(),
        "z_test": z_cases(),
    }
    # One case per line: readable diffs, compact file.
    sections = []
    for key, value in golden.items():
        if isinstance(value, list):
            body = ",\n".join("  " + json.dumps(case, allow_nan=False) for case in value)
            sections.append(f"{json.dumps(key)}: [\n{body}\n ]")
        else:
            sections.append(f"{json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
    sys.stdout.write("{\n " + ",\n ".join(sections) + "\n}\n")


if __name__ == "__main__":
    main()
