//! `kiln bench drift`: the time to judge one drift window of `features` columns ×
//! `rows` rows, against Evidently's `DataDriftPreset` on the same data
//! (`--python` with evidently installed; `scripts/bench_drift_evidently.py`).
//!
//! The data: `features` normal columns (column j has mean j/10 and standard
//! deviation 1 + (j mod 5)/2), a reference and a current table of `rows` rows each
//! from one seeded generator; the first `shifted` columns of the current table
//! move by half their standard deviation. Both tables go to the Python peer as raw
//! little-endian f32 files, so both judge the very same values.
//!
//! What kiln times, as the cluster does the work:
//! - reference: the frozen bins and moments of every column (done once, when a
//!   model version is trained or registered);
//! - window: counting every current value into its column's bins (the replicas'
//!   work, here on every core, rows split between threads and merged as the
//!   coordinator merges replicas) and judging the merged counts (the leader's
//!   work).
//!
//! Evidently computes both from the two raw tables on every run, so its time is
//! compared with the window and with reference + window.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use kiln_common::drift::{window_drift, DriftSettings, LiveColumn};
use kiln_common::reference::ReferenceStats;

#[derive(Debug, serde::Serialize)]
pub struct DriftReport {
    pub rows: usize,
    pub features: usize,
    pub shifted: usize,
    pub threads: usize,
    pub kiln_reference_s: f64,
    pub kiln_window_s: f64,
    pub kiln_drifted: Vec<usize>,
    pub evidently_s: Option<f64>,
    pub evidently_version: Option<String>,
    pub evidently_drifted: Option<Vec<usize>>,
    pub same_verdicts: Option<bool>,
    /// Evidently's time over kiln's window.
    pub speedup_window: Option<f64>,
    /// Evidently's time over kiln's reference plus window.
    pub speedup_reference_and_window: Option<f64>,
}

impl crate::bench::Table for DriftReport {
    fn print_table(&self) {
        println!(
            "drift window of {} features × {} rows ({} shifted by half a standard deviation), {} threads",
            self.features, self.rows, self.shifted, self.threads
        );
        println!("| step | seconds | columns flagged |");
        println!("|---|---:|---:|");
        println!(
            "| kiln: reference bins (once per model version) | {:.3} | |",
            self.kiln_reference_s
        );
        println!(
            "| kiln: one window (count + judge) | {:.3} | {} |",
            self.kiln_window_s,
            self.kiln_drifted.len()
        );
        if let (Some(s), Some(drifted)) = (self.evidently_s, &self.evidently_drifted) {
            println!(
                "| Evidently {} DataDriftPreset | {s:.3} | {} |",
                self.evidently_version.as_deref().unwrap_or("?"),
                drifted.len()
            );
        }
        if let (Some(w), Some(t), Some(same)) = (
            self.speedup_window,
            self.speedup_reference_and_window,
            self.same_verdicts,
        ) {
            println!(
                "kiln is {w:.0}x faster per window ({t:.0}x with the reference built too); same verdicts: {same}"
            );
        }
    }
}

/// A seeded standard normal generator (xorshift64* and Box-Muller).
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (bits as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A row-major table of `rows` × `features`; the first `shifted` columns moved by
/// half a standard deviation.
fn table(rng: &mut Normal, rows: usize, features: usize, shifted: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * features);
    for _ in 0..rows {
        for j in 0..features {
            let std = 1.0 + (j % 5) as f64 / 2.0;
            let mean = j as f64 / 10.0 + if j < shifted { std / 2.0 } else { 0.0 };
            out.push((mean + std * rng.next()) as f32);
        }
    }
    out
}

fn write_f32(path: &Path, values: &[f32]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

/// Splits `0..n` into `parts` near-equal ranges.
fn ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    (0..parts)
        .map(|p| p * n / parts..(p + 1) * n / parts)
        .collect()
}

/// The reference of every column, columns spread over `threads`.
fn reference(x: &[f32], rows: usize, features: usize, threads: usize) -> ReferenceStats {
    let names: Vec<String> = (0..features).map(|j| format!("f{j}")).collect();
    let mut columns = Vec::with_capacity(features);
    std::thread::scope(|scope| {
        let parts: Vec<_> = ranges(features, threads)
            .into_iter()
            .map(|cols| {
                let names = &names;
                scope.spawn(move || {
                    cols.map(|j| {
                        let column: Vec<f32> = (0..rows).map(|i| x[i * features + j]).collect();
                        kiln_common::reference::FeatureStats::compute(
                            &names[j],
                            &column,
                            kiln_common::reference::BINS,
                        )
                    })
                    .collect::<Vec<_>>()
                })
            })
            .collect();
        for part in parts {
            columns.extend(part.join().expect("reference thread"));
        }
    });
    ReferenceStats {
        format: kiln_common::reference::FORMAT,
        columns,
    }
}

/// Counts the row-major table into `reference`'s bins, rows spread over
/// `threads`, then merges the counts.
fn count(reference: &ReferenceStats, x: &[f32], rows: usize, threads: usize) -> Vec<LiveColumn> {
    let features = reference.columns.len();
    let parts: Vec<Vec<LiveColumn>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges(rows, threads)
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    let mut live: Vec<LiveColumn> = reference
                        .columns
                        .iter()
                        .map(|c| LiveColumn::new(c.bins()))
                        .collect();
                    for row in x[part.start * features..part.end * features].chunks_exact(features)
                    {
                        for ((column, r), &v) in live.iter_mut().zip(&reference.columns).zip(row) {
                            column.observe(r, v);
                        }
                    }
                    live
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("count thread"))
            .collect()
    });
    let mut parts = parts.into_iter();
    let mut merged = parts.next().unwrap_or_default();
    for part in parts {
        for (into, from) in merged.iter_mut().zip(&part) {
            // Same reference, same bins.
            let _ = into.merge(from);
        }
    }
    merged
}

/// Runs Evidently on the two tables in `dir`; returns its seconds, version and
/// flagged columns.
fn evidently(
    python: &str,
    dir: &Path,
    rows: usize,
    features: usize,
) -> anyhow::Result<(f64, String, Vec<usize>)> {
    let script = crate::bench::peer_script("bench_drift_evidently.py")?;
    let out = Command::new(python)
        .arg(&script)
        .arg(dir)
        .arg(rows.to_string())
        .arg(features.to_string())
        .output()
        .with_context(|| format!("run {python} {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parse the output of {}", script.display()))?;
    let seconds = doc["seconds"]
        .as_f64()
        .context("no seconds in its output")?;
    let version = doc["version"].as_str().unwrap_or("?").to_string();
    let drifted = doc["drifted"]
        .as_array()
        .context("no drifted list in its output")?
        .iter()
        .filter_map(|v| v.as_u64().map(|v| v as usize))
        .collect();
    Ok((seconds, version, drifted))
}

pub fn drift(
    rows: usize,
    features: usize,
    shifted: usize,
    python: Option<&str>,
    dir: &Path,
) -> anyhow::Result<DriftReport> {
    anyhow::ensure!(
        rows >= 2 && features >= 1,
        "need at least 2 rows and 1 feature"
    );
    anyhow::ensure!(
        shifted <= features,
        "cannot shift {shifted} of {features} features"
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rng = Normal(0x9e37_79b9_7f4a_7c15);
    let reference_rows = table(&mut rng, rows, features, 0);
    let current_rows = table(&mut rng, rows, features, shifted);

    let started = Instant::now();
    let frozen = reference(&reference_rows, rows, features, threads);
    let kiln_reference_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let live = count(&frozen, &current_rows, rows, threads);
    let window = window_drift(&frozen, features, &live, &DriftSettings::default())?;
    let kiln_window_s = started.elapsed().as_secs_f64();
    let kiln_drifted: Vec<usize> = window
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.drifted)
        .map(|(j, _)| j)
        .collect();

    let mut report = DriftReport {
        rows,
        features,
        shifted,
        threads,
        kiln_reference_s,
        kiln_window_s,
        kiln_drifted,
        evidently_s: None,
        evidently_version: None,
        evidently_drifted: None,
        same_verdicts: None,
        speedup_window: None,
        speedup_reference_and_window: None,
    };
    if let Some(python) = python {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        write_f32(&dir.join("ref.f32"), &reference_rows)?;
        write_f32(&dir.join("cur.f32"), &current_rows)?;
        let (seconds, version, drifted) = evidently(python, dir, rows, features)?;
        report.same_verdicts = Some(drifted == report.kiln_drifted);
        report.speedup_window = Some(seconds / kiln_window_s);
        report.speedup_reference_and_window = Some(seconds / (kiln_window_s + kiln_reference_s));
        report.evidently_s = Some(seconds);
        report.evidently_version = Some(version);
        report.evidently_drifted = Some(drifted);
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(report)
}
