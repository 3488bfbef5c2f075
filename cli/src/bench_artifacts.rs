//! `kiln bench chunking` and `kiln bench artifacts`: the data plane of issue 4
//! measured against its peers on the same machine in the same run.
//!
//! Chunking: memcpy, BLAKE3 alone, FastCDC cut points alone, and the whole chunker
//! (cut, copy, BLAKE3) over one buffer of random bytes; then, for each candidate
//! average chunk size, the chunker's speed and the new bytes that a 1% append and
//! a line inserted near the start of a CSV cost, which is how the default average
//! was chosen.
//!
//! Artifacts: a local kiln cluster (3 coordinators, 2 workers, TLS and tokens, as
//! `kiln local up` makes it) against DVC with a local directory remote, on one
//! generated CSV file: first push, pull into an empty place, then the push of a
//! version with 1% appended, with the new bytes each stores. kiln's push and pull
//! are the code of `kiln artifact push | pull`, called in this process; DVC runs as
//! `python3 -m dvc` (`dvc add` + `dvc push`, `dvc pull` after emptying the cache).

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use kiln_common::chunking::{ChunkId, Chunker};
use kiln_common::client::ClientOptions;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::local::{self, Detach, LocalOptions, Proc};
use kiln_common::transfer::{self as artifact, PushOptions};

/// Candidate average chunk sizes.
const AVERAGES: [usize; 5] = [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20];

/// One throughput figure.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub what: String,
    pub gb_per_s: f64,
    /// Against memcpy in the same run.
    pub of_memcpy: f64,
}

/// One candidate average chunk size.
#[derive(Debug, Clone, Serialize)]
pub struct AverageRow {
    pub avg_bytes: usize,
    pub gb_per_s: f64,
    /// New bytes after a 1% append, as a share of the new version.
    pub append_new_pct: f64,
    /// New bytes after one line inserted near the start.
    pub insert_new_bytes: u64,
}

/// What `kiln bench chunking` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkingReport {
    pub cpu: String,
    pub buffer_mib: usize,
    pub rates: Vec<Rate>,
    pub csv_mib: usize,
    pub averages: Vec<AverageRow>,
}

fn best_of<F: FnMut()>(runs: usize, bytes: usize, mut f: F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..runs {
        let started = Instant::now();
        f();
        best = best.min(started.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// A CSV of about `bytes` bytes: an id, two floats, an integer, a class.
fn csv(bytes: usize, seed: u64, first_row: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(bytes + 128);
    let mut row = first_row;
    while out.len() < bytes {
        let _ = writeln!(
            out,
            "{row},{:.6},{:.6},{},class{}",
            rng.gen::<f64>(),
            rng.gen::<f64>() * 100.0,
            rng.gen_range(0..1000),
            row % 7
        );
        row += 1;
    }
    out
}

fn ids(data: &[u8], avg: usize) -> Vec<(ChunkId, usize)> {
    Chunker::with_sizes(data, avg / 4, avg, avg * 4)
        .map(|c| {
            let c = c.expect("reading memory does not fail");
            (c.id, c.data.len())
        })
        .collect()
}

fn new_bytes(before: &[(ChunkId, usize)], after: &[(ChunkId, usize)]) -> u64 {
    let known: std::collections::HashSet<ChunkId> = before.iter().map(|(id, _)| *id).collect();
    let mut seen = std::collections::HashSet::new();
    after
        .iter()
        .filter(|(id, _)| !known.contains(id) && seen.insert(*id))
        .map(|(_, len)| *len as u64)
        .sum()
}

/// Runs `kiln bench chunking`.
pub fn chunking(buffer_mib: usize, csv_mib: usize) -> anyhow::Result<ChunkingReport> {
    if buffer_mib == 0 || csv_mib == 0 {
        bail!("--size-mib and --csv-mib must be positive");
    }
    let bytes = buffer_mib << 20;
    let mut data = vec![0u8; bytes];
    rand::rngs::StdRng::seed_from_u64(1).fill(&mut data[..]);
    let mut copy = vec![0u8; bytes];
    let memcpy = best_of(3, bytes, || copy.copy_from_slice(&data));
    std::hint::black_box(&copy);
    drop(copy);
    let blake3 = best_of(3, bytes, || {
        std::hint::black_box(blake3::hash(&data));
    });
    let cut = best_of(3, bytes, || {
        let cuts = fastcdc::v2020::FastCDC::new(
            &data,
            kiln_common::chunking::MIN_CHUNK_BYTES as u32,
            kiln_common::chunking::AVG_CHUNK_BYTES as u32,
            kiln_common::chunking::MAX_CHUNK_BYTES as u32,
        )
        .count();
        std::hint::black_box(cuts);
    });
    let chunker = best_of(3, bytes, || {
        let n = Chunker::new(&data[..]).count();
        std::hint::black_box(n);
    });
    let rate = |what: &str, gb: f64| Rate {
        what: what.to_string(),
        gb_per_s: gb,
        of_memcpy: gb / memcpy,
    };
    let rates = vec![
        rate("memcpy", memcpy),
        rate("BLAKE3 alone", blake3),
        rate("FastCDC cut points alone", cut),
        rate("kiln chunker: cut, copy, BLAKE3", chunker),
    ];
    drop(data);

    let base = csv(csv_mib << 20, 2, 0);
    let rows = base.iter().filter(|b| **b == b'\n').count();
    let mut appended = base.clone();
    appended.extend(csv(base.len() / 100, 3, rows));
    let mut inserted = appended.clone();
    let at = inserted[5000..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(5000, |p| 5001 + p);
    inserted.splice(at..at, b"an inserted line\n".iter().copied());
    let mut averages = Vec::new();
    for avg in AVERAGES {
        let started = Instant::now();
        let first = ids(&base, avg);
        let gb_per_s = base.len() as f64 / started.elapsed().as_secs_f64() / 1e9;
        let second = ids(&appended, avg);
        let third = ids(&inserted, avg);
        averages.push(AverageRow {
            avg_bytes: avg,
            gb_per_s,
            append_new_pct: 100.0 * new_bytes(&first, &second) as f64 / appended.len() as f64,
            insert_new_bytes: new_bytes(&second, &third),
        });
    }
    Ok(ChunkingReport {
        cpu: crate::bench::cpu_model(),
        buffer_mib,
        rates,
        csv_mib,
        averages,
    })
}

impl crate::bench::Table for ChunkingReport {
    fn print_table(&self) {
        println!("{} ({} MiB of random bytes)", self.cpu, self.buffer_mib);
        println!("{:<34} {:>8} {:>10}", "", "GB/s", "of memcpy");
        for r in &self.rates {
            println!("{:<34} {:>8.2} {:>10.2}", r.what, r.gb_per_s, r.of_memcpy);
        }
        println!("\naverage chunk size ({} MiB CSV)", self.csv_mib);
        println!(
            "{:>8} {:>8} {:>16} {:>18}",
            "avg KiB", "GB/s", "append 1% new %", "insert line new B"
        );
        for a in &self.averages {
            println!(
                "{:>8} {:>8.2} {:>16.2} {:>18}",
                a.avg_bytes >> 10,
                a.gb_per_s,
                a.append_new_pct,
                a.insert_new_bytes
            );
        }
    }
}

/// One system's figures in `kiln bench artifacts`.
#[derive(Debug, Clone, Serialize)]
pub struct TransferRow {
    pub system: String,
    pub push_mb_s: f64,
    pub pull_mb_s: f64,
    pub append_push_s: f64,
    pub append_new_bytes: u64,
    pub append_new_pct: f64,
}

/// What `kiln bench artifacts` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactsReport {
    pub cpu: String,
    pub file_bytes: u64,
    pub rows: Vec<TransferRow>,
    /// kiln over DVC: push and pull MB/s, and the speed-up of the appended push.
    pub push_ratio: f64,
    pub pull_ratio: f64,
    pub append_speedup: f64,
}

impl crate::bench::Table for ArtifactsReport {
    fn print_table(&self) {
        println!(
            "{}; file {:.1} MB CSV",
            self.cpu,
            self.file_bytes as f64 / 1e6
        );
        println!(
            "{:<10} {:>10} {:>10} {:>14} {:>16} {:>8}",
            "system", "push MB/s", "pull MB/s", "append push s", "append new B", "new %"
        );
        for r in &self.rows {
            println!(
                "{:<10} {:>10.1} {:>10.1} {:>14.2} {:>16} {:>8.2}",
                r.system,
                r.push_mb_s,
                r.pull_mb_s,
                r.append_push_s,
                r.append_new_bytes,
                r.append_new_pct
            );
        }
        println!(
            "kiln / dvc: push {:.2}x, pull {:.2}x, appended version pushed {:.2}x faster",
            self.push_ratio, self.pull_ratio, self.append_speedup
        );
    }
}

/// Writes the benchmark's CSV of `mib` MiB to `path` without holding it all.
fn write_csv(path: &Path, mib: usize, first_row: usize, seed: u64) -> anyhow::Result<usize> {
    let mut file = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("create {}", path.display()))?,
    );
    let mut rows = first_row;
    let block = 8 << 20;
    let mut left = mib << 20;
    let mut seed = seed;
    while left > 0 {
        let text = csv(block.min(left), seed, rows);
        rows += text.iter().filter(|b| **b == b'\n').count();
        file.write_all(&text)?;
        left = left.saturating_sub(text.len());
        seed += 1;
    }
    file.flush()?;
    Ok(rows)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => dirs.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn dvc(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("python3")
        .arg("-m")
        .arg("dvc")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run python3 -m dvc (pip install dvc)")?;
    if !out.status.success() {
        bail!(
            "dvc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let started = Instant::now();
    let value = f()?;
    Ok((value, started.elapsed().as_secs_f64()))
}

/// Runs `kiln bench artifacts`.
pub async fn artifacts(
    size_mib: usize,
    dir: &Path,
    base_port: u16,
) -> anyhow::Result<ArtifactsReport> {
    if size_mib == 0 {
        bail!("--size-mib must be positive");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let file = data.join("big.csv");
    let rows = write_csv(&file, size_mib, 0, 10)?;
    let file_bytes = std::fs::metadata(&file)?.len();
    let append_mib = (size_mib / 100).max(1);

    // DVC first, on its own copy, so both push the same bytes.
    let dvc_dir = dir.join("dvc");
    std::fs::create_dir_all(&dvc_dir)?;
    let remote = dir.join("dvc-remote");
    std::fs::create_dir_all(&remote)?;
    let dvc_file = dvc_dir.join("big.csv");
    std::fs::copy(&file, &dvc_file)?;
    dvc(&dvc_dir, &["init", "--no-scm", "-q"])?;
    dvc(
        &dvc_dir,
        &[
            "remote",
            "add",
            "-d",
            "store",
            &remote.display().to_string(),
        ],
    )?;
    let ((), dvc_push) = timed(|| {
        dvc(&dvc_dir, &["add", "-q", "big.csv"])?;
        dvc(&dvc_dir, &["push", "-q"])
    })?;
    std::fs::remove_dir_all(dvc_dir.join(".dvc").join("cache"))?;
    std::fs::remove_file(&dvc_file)?;
    let ((), dvc_pull) = timed(|| dvc(&dvc_dir, &["pull", "-q"]))?;
    let remote_before = dir_bytes(&remote);
    write_csv(&dvc_file, append_mib, rows, 99)?;
    let appended_bytes = std::fs::metadata(&dvc_file)?.len();
    let ((), dvc_append) = timed(|| {
        dvc(&dvc_dir, &["add", "-q", "big.csv"])?;
        dvc(&dvc_dir, &["push", "-q"])
    })?;
    let dvc_new = dir_bytes(&remote).saturating_sub(remote_before);
    std::fs::remove_dir_all(&dvc_dir)?;
    std::fs::remove_dir_all(&remote)?;

    // kiln: a local cluster as `kiln local up` makes it.
    let options = LocalOptions {
        coordinators: 3,
        workers: 2,
        dir: dir.join("kiln"),
        base_port,
        coordinator_config: None,
        insecure: false,
        worker_args: Vec::new(),
    };
    let info = local::up_with(&options, Detach::No)
        .await
        .context("start the kiln cluster")?;
    let procs: Vec<Proc> = info
        .coordinators
        .iter()
        .chain(info.workers.iter())
        .map(Proc::from)
        .collect();
    let result = kiln_side(&info, &file, rows, append_mib, appended_bytes).await;
    for p in &procs {
        let _ = local::send_signal(p.pid, local::SIGKILL);
    }
    let (push_s, pull_s, append_s, kiln_new) = result?;
    let _ = std::fs::remove_dir_all(&dir);

    let mb = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs.max(1e-9);
    let rows = vec![
        TransferRow {
            system: "kiln".into(),
            push_mb_s: mb(file_bytes, push_s),
            pull_mb_s: mb(file_bytes, pull_s),
            append_push_s: append_s,
            append_new_bytes: kiln_new,
            append_new_pct: 100.0 * kiln_new as f64 / appended_bytes as f64,
        },
        TransferRow {
            system: "dvc".into(),
            push_mb_s: mb(file_bytes, dvc_push),
            pull_mb_s: mb(file_bytes, dvc_pull),
            append_push_s: dvc_append,
            append_new_bytes: dvc_new,
            append_new_pct: 100.0 * dvc_new as f64 / appended_bytes as f64,
        },
    ];
    Ok(ArtifactsReport {
        cpu: crate::bench::cpu_model(),
        file_bytes,
        push_ratio: rows[0].push_mb_s / rows[1].push_mb_s,
        pull_ratio: rows[0].pull_mb_s / rows[1].pull_mb_s,
        append_speedup: dvc_append / append_s.max(1e-9),
        rows,
    })
}

/// Push, pull, append and push again on the kiln cluster; returns seconds and the
/// appended version's new bytes.
async fn kiln_side(
    info: &local::ClusterInfo,
    file: &Path,
    rows: usize,
    append_mib: usize,
    appended_bytes: u64,
) -> anyhow::Result<(f64, f64, f64, u64)> {
    let client = Arc::new(local::admin_client(info, ClientOptions::default())?);
    let options = PushOptions {
        name: "big".into(),
        ..PushOptions::default()
    };
    let first = artifact::push(Arc::clone(&client), file, options.clone()).await?;
    let out = file.with_file_name("pulled.csv");
    let pulled = artifact::pull(Arc::clone(&client), "big", &out, false).await?;
    std::fs::remove_file(&out)?;
    write_csv(file, append_mib, rows, 99)?;
    if std::fs::metadata(file)?.len() != appended_bytes {
        bail!("the appended files differ between kiln and dvc");
    }
    let second = artifact::push(Arc::clone(&client), file, options).await?;
    Ok((
        first.seconds,
        pulled.seconds,
        second.seconds,
        second.new_bytes,
    ))
}
