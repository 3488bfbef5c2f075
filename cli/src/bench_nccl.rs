//! `kiln bench nccl`: NCCL all-reduce time and bandwidth on this machine's GPUs,
//! one rank per GPU, each a thread of this process (the shape of nccl-tests'
//! `all_reduce_perf -t N`). It needs the `cuda` feature; without it the command
//! says so and fails.
//!
//! ```text
//!  create the NCCL id; thread r of N, on CUDA device r:
//!    join the communicator (ncclCommInitRank: waits for all N)
//!    for each size:
//!      check: a buffer of r+1 everywhere, one all-reduce, every element N(N+1)/2
//!      device: `warmup` all-reduces, then `iters` enqueued back to back and one
//!              wait; time / iters
//!      host:   through a buffer on the host (copy to the GPU, reduce, copy
//!              back), `warmup` then `iters`, each waited for
//!  then, with a new NCCL id, N shard communicators (`Collective::nccl`: each
//!  rank's NcclComm on its own thread, async calls) in one runtime:
//!    for each size:
//!      shard:  the path training shards take: all ranks' `all_reduce_mean` on
//!              host buffers at once; checked once, `warmup`, then `iters`
//!  figures: the slowest rank's time; algbw = bytes / time,
//!           busbw = algbw * 2 (N - 1) / N (nccl-tests' PERFORMANCE.md), 0 for N = 1
//! ```
//!
//! The device and host buffers keep their sums between iterations; the values
//! grow, which changes nothing of the time.

use anyhow::{bail, Context};
use serde::Serialize;

/// What `kiln bench nccl` measures.
#[derive(Debug, Clone)]
pub struct NcclBenchOptions {
    /// Ranks, one per GPU: devices 0 to ranks - 1.
    pub ranks: usize,
    /// Buffer sizes in bytes, each a multiple of 4 (f32).
    pub sizes: Vec<u64>,
    /// Untimed all-reduces before each timed run.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub warmup: usize,
    /// Timed all-reduces per size and path.
    pub iters: usize,
}

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct NcclReport {
    pub nccl_version: String,
    /// The name of each rank's GPU, by rank.
    pub devices: Vec<String>,
    pub ranks: usize,
    pub rows: Vec<NcclRow>,
}

/// One size on one path.
#[derive(Debug, Serialize)]
pub struct NcclRow {
    /// "device" (buffer on the GPU), "host" (copied there and back) or "shard"
    /// (the host path through the async communicator training shards use).
    pub path: &'static str,
    pub bytes: u64,
    /// Mean time of one all-reduce on the slowest rank.
    pub time_us: f64,
    pub algbw_gb_s: f64,
    pub busbw_gb_s: f64,
}

impl crate::bench::Table for NcclReport {
    fn print_table(&self) {
        println!("NCCL {}, {} rank(s)", self.nccl_version, self.ranks);
        for (rank, name) in self.devices.iter().enumerate() {
            println!("  rank {rank}: CUDA device {rank}, {name}");
        }
        println!(
            "{:<8} {:>14} {:>12} {:>12} {:>12}",
            "path", "bytes", "time us", "algbw GB/s", "busbw GB/s"
        );
        for r in &self.rows {
            println!(
                "{:<8} {:>14} {:>12.1} {:>12.2} {:>12.2}",
                r.path, r.bytes, r.time_us, r.algbw_gb_s, r.busbw_gb_s
            );
        }
        if self.ranks == 1 {
            println!("(one rank: nothing crosses a link, so busbw is 0 by definition)");
        }
    }
}

/// Reads a byte count: digits with an optional K, M or G suffix (powers of 1024;
/// "KiB", "MB" and the like read the same).
pub fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .with_context(|| format!("'{text}' is not a size like 64M"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => bail!("'{text}': the unit must be K, M or G"),
    };
    number
        .checked_mul(1 << shift)
        .with_context(|| format!("'{text}' is too large"))
}

/// Returns nccl-tests' bus bandwidth of an all-reduce over `ranks`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn bus_bandwidth(algbw: f64, ranks: usize) -> f64 {
    let n = ranks as f64;
    algbw * 2.0 * (n - 1.0) / n
}

/// Checks the options before any GPU is touched.
fn validate(options: &NcclBenchOptions) -> anyhow::Result<()> {
    if options.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if options.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if options.sizes.is_empty() {
        bail!("--bytes names no size");
    }
    for &size in &options.sizes {
        if size == 0 || size % 4 != 0 {
            bail!("--bytes: {size} is not a positive multiple of 4 (the buffers hold f32)");
        }
    }
    Ok(())
}

/// Runs the benchmark; blocks for its whole length.
#[cfg(not(feature = "cuda"))]
pub fn run(options: NcclBenchOptions) -> anyhow::Result<NcclReport> {
    validate(&options)?;
    bail!(kiln_worker::collective::communicator::WITHOUT_CUDA)
}

/// Runs the benchmark; blocks for its whole length.
#[cfg(feature = "cuda")]
pub fn run(options: NcclBenchOptions) -> anyhow::Result<NcclReport> {
    use kiln_worker::collective::nccl;

    validate(&options)?;
    let version = nccl::nccl_version()?;
    let available = nccl::device_count()?;
    if options.ranks > available {
        bail!(
            "--ranks {}: this machine has {available} CUDA device(s), and a rank needs one",
            options.ranks
        );
    }
    let devices = (0..options.ranks)
        .map(nccl::device_name)
        .collect::<Result<Vec<_>, _>>()?;
    let id = nccl::unique_id()?;
    let per_rank: Vec<anyhow::Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..options.ranks)
            .map(|rank| {
                let options = &options;
                scope.spawn(move || rank_run(rank, options, id))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank's thread panicked")))
            })
            .collect()
    });
    let mut slowest = Vec::new();
    for (rank, times) in per_rank.into_iter().enumerate() {
        let times = times.with_context(|| format!("rank {rank}"))?;
        slowest.resize(times.len(), 0f64);
        for (s, t) in slowest.iter_mut().zip(times) {
            *s = s.max(t);
        }
    }
    let shard_times = shard_path_times(&options)?;
    let mut rows = Vec::new();
    let mut times = slowest.into_iter();
    for (&bytes, shard_seconds) in options.sizes.iter().zip(shard_times) {
        for path in ["device", "host", "shard"] {
            let seconds = if path == "shard" {
                shard_seconds
            } else {
                times.next().context("a rank returned too few times")?
            };
            let algbw = bytes as f64 / seconds / 1e9;
            rows.push(NcclRow {
                path,
                bytes,
                time_us: seconds * 1e6,
                algbw_gb_s: algbw,
                busbw_gb_s: bus_bandwidth(algbw, options.ranks),
            });
        }
    }
    Ok(NcclReport {
        nccl_version: version,
        devices,
        ranks: options.ranks,
        rows,
    })
}

/// One rank's part: for each size, the seconds of one all-reduce on the device
/// path, then on the host path.
#[cfg(feature = "cuda")]
fn rank_run(
    rank: usize,
    options: &NcclBenchOptions,
    id: kiln_worker::collective::NcclId,
) -> anyhow::Result<Vec<f64>> {
    use kiln_worker::collective::nccl::NcclComm;
    use kiln_worker::collective::NcclConfig;
    use std::time::Instant;

    let world = options.ranks;
    let mut comm = NcclComm::new(&NcclConfig::new(rank, world, id, rank))?;
    let expected = (world * (world + 1) / 2) as f32;
    let mut times = Vec::new();
    for &bytes in &options.sizes {
        let len = usize::try_from(bytes / 4).context("the size does not fit in memory")?;
        let mut host = vec![(rank + 1) as f32; len];

        let mut dev = comm.to_device(&host)?;
        comm.all_reduce_sum_device(&mut dev)?;
        check_sum(&comm.to_host(&dev)?, expected, "device")?;
        for _ in 0..options.warmup {
            comm.enqueue_sum(&mut dev)?;
        }
        comm.wait("warm-up all-reduces")?;
        let started = Instant::now();
        for _ in 0..options.iters {
            comm.enqueue_sum(&mut dev)?;
        }
        comm.wait("timed all-reduces")?;
        times.push(started.elapsed().as_secs_f64() / options.iters as f64);
        drop(dev);

        comm.all_reduce_sum(&mut host)?;
        check_sum(&host, expected, "host")?;
        for _ in 0..options.warmup {
            comm.all_reduce_sum(&mut host)?;
        }
        let started = Instant::now();
        for _ in 0..options.iters {
            comm.all_reduce_sum(&mut host)?;
        }
        times.push(started.elapsed().as_secs_f64() / options.iters as f64);
    }
    Ok(times)
}

/// Returns, for each size, the seconds of one all-reduce (mean) of all ranks
/// through the shards' communicator, [`kiln_worker::collective::Collective`].
#[cfg(feature = "cuda")]
fn shard_path_times(options: &NcclBenchOptions) -> anyhow::Result<Vec<f64>> {
    use futures_util::future::try_join_all;
    use kiln_worker::collective::{nccl, Collective, CollectiveError, NcclConfig};
    use std::time::Instant;

    async fn round(comms: &mut [Collective], bufs: &mut [Vec<f32>]) -> Result<(), CollectiveError> {
        let calls = comms
            .iter_mut()
            .zip(bufs.iter_mut())
            .map(|(comm, buf)| comm.all_reduce_mean(buf));
        try_join_all(calls).await.map(drop)
    }

    let world = options.ranks;
    let id = nccl::unique_id()?;
    // `run` is on a blocking thread of the runtime, where blocking on it is allowed.
    tokio::runtime::Handle::current().block_on(async {
        let joins = (0..world).map(|rank| Collective::nccl(NcclConfig::new(rank, world, id, rank)));
        let mut comms = try_join_all(joins).await?;
        let mut times = Vec::new();
        for &bytes in &options.sizes {
            let len = usize::try_from(bytes / 4).context("the size does not fit in memory")?;
            let mut bufs: Vec<Vec<f32>> = (0..world).map(|r| vec![(r + 1) as f32; len]).collect();
            round(&mut comms, &mut bufs).await?;
            for buf in &bufs {
                check_sum(buf, (world + 1) as f32 / 2.0, "shard")?;
            }
            for _ in 0..options.warmup {
                round(&mut comms, &mut bufs).await?;
            }
            let started = Instant::now();
            for _ in 0..options.iters {
                round(&mut comms, &mut bufs).await?;
            }
            times.push(started.elapsed().as_secs_f64() / options.iters as f64);
        }
        Ok(times)
    })
}

/// Fails unless every element of `sum` is `expected`.
#[cfg(feature = "cuda")]
fn check_sum(sum: &[f32], expected: f32, path: &str) -> anyhow::Result<()> {
    if let Some((i, x)) = sum.iter().enumerate().find(|(_, x)| **x != expected) {
        bail!("{path} all-reduce is wrong: element {i} is {x}, not {expected}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_binary_units() {
        assert_eq!(parse_bytes("4096").ok(), Some(4096));
        assert_eq!(parse_bytes("64M").ok(), Some(64 << 20));
        assert_eq!(parse_bytes("64MiB").ok(), Some(64 << 20));
        assert_eq!(parse_bytes("1g").ok(), Some(1 << 30));
        assert_eq!(parse_bytes("512K").ok(), Some(512 << 10));
        assert!(parse_bytes("64T").is_err());
        assert!(parse_bytes("M").is_err());
    }

    #[test]
    fn busbw_follows_nccl_tests() {
        assert_eq!(bus_bandwidth(100.0, 1), 0.0);
        assert_eq!(bus_bandwidth(100.0, 2), 100.0);
        assert_eq!(bus_bandwidth(100.0, 8), 175.0);
    }

    #[test]
    fn sizes_must_hold_whole_floats() {
        let options = NcclBenchOptions {
            ranks: 1,
            sizes: vec![6],
            warmup: 0,
            iters: 1,
        };
        assert!(validate(&options).is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_the_command_says_so() {
        let options = NcclBenchOptions {
            ranks: 1,
            sizes: vec![64 << 20],
            warmup: 1,
            iters: 1,
        };
        let err = run(options).expect_err("no cuda feature");
        assert!(
            err.to_string()
                .starts_with("this kiln was built without the cuda feature"),
            "{err}"
        );
    }
}
