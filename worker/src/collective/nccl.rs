//! [`NcclComm`]: one rank of an NCCL communicator on one GPU, through cudarc
//! (compiled with the `cuda` feature only). Its calls block; the async shard uses
//! it through [`super::nccl_thread::NcclThread`].
//!
//! ```text
//!  check_libraries: libcuda and libnccl load?  no ─► Unavailable, naming the
//!        │                                           library and LD_LIBRARY_PATH
//!  CudaContext(device) ─► stream ─► ncclCommInitRank (blocks until all ranks join)
//!        │
//!  all_reduce_sum(&mut [f32]):  host ─► staging buffer on the GPU ─► ncclAllReduce
//!        │                      (in place, sum) ─► wait ─► host
//!  all_reduce_sum_device(&mut CudaSlice<f32>): ncclAllReduce ─► wait
//! ```
//!
//! cudarc opens libcuda and libnccl on first use and panics when a library or a
//! symbol is missing. So before anything else this module loads both libraries
//! under the names cudarc searches, and returns [`CollectiveError::Unavailable`]
//! when one is missing; every cudarc call then runs under `catch_unwind`, so that
//! a panic left (an old libnccl without a symbol) becomes an error too. The panic
//! hook still prints its message to stderr.
//!
//! Waiting: after enqueueing, the rank records an event on its stream and polls
//! it, instead of blocking in `cuStreamSynchronize`. When the work is not done
//! within the op timeout (a peer died, or stalls), it aborts the communicator
//! (`ncclCommAbort`, which makes the stuck kernels return) and every later call
//! fails with [`CollectiveError::Poisoned`]. Limits: `ncclCommInitRank` itself
//! blocks with no timeout of ours (NCCL's bootstrap gives up on its own only for
//! some failures), and cudarc keeps the raw communicator private, so
//! `ncclCommGetAsyncError` is not polled: a failed peer shows as the stall.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaStream, DriverError};
use cudarc::nccl::{Comm, Id, ReduceOp};

pub use cudarc::driver::CudaSlice;

use super::communicator::{NcclConfig, NcclId, NCCL_ID_BYTES};
use super::CollectiveError;
use crate::cuda;

/// How long a wait spins (yielding the CPU) before it sleeps between polls: most
/// all-reduces of a training step finish within it.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_millis(2);
/// Pause between two polls of a long wait.
const POLL_INTERVAL: Duration = Duration::from_micros(200);
/// libnccl, as [`cuda::check_library`] looks for it. cudarc does not search NCCL's
/// real soname, `libnccl.so.2`.
const NCCL: cuda::Library = cuda::Library {
    label: "libnccl",
    cudarc_name: "nccl",
    other_sonames: &["libnccl.so.2"],
    install: "install NCCL (Debian: libnccl2 and libnccl-dev; or pip install \
              nvidia-nccl-cu12, which puts it under site-packages/nvidia/nccl/lib) \
              and add its directory to LD_LIBRARY_PATH",
    present: cudarc::nccl::sys::is_culib_present,
};

/// One rank of an NCCL communicator, bound to one GPU and one CUDA stream.
///
/// It is not `Send` (cudarc's communicator holds a raw pointer): it lives on the
/// thread that created it, and that thread makes every call.
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: usize,
    op_timeout: Duration,
    stream: Arc<CudaStream>,
    /// `None` once aborted.
    comm: Option<Comm>,
    /// The GPU copy of host buffers, grown to the longest buffer seen.
    staging: Option<CudaSlice<f32>>,
    /// Why the communicator cannot be used any more.
    failed: Option<String>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("failed", &self.failed)
            .finish()
    }
}

impl NcclComm {
    /// Joins the communicator named by `config.id` as `config.rank` of
    /// `config.world`, on CUDA device `config.device`. Blocks until every rank has
    /// joined (`ncclCommInitRank`); `config.setup_timeout` is for the caller to
    /// enforce (see [`super::nccl_thread`]).
    ///
    /// Returns [`CollectiveError::Unavailable`] when libcuda or libnccl cannot be
    /// loaded or the device does not exist, before touching either library.
    pub fn new(config: &NcclConfig) -> Result<NcclComm, CollectiveError> {
        config.validate()?;
        check_libraries()?;
        let device = config.device;
        let count = guarded("count CUDA devices", CudaContext::device_count)?
            .map_err(|e| gpu_error("count CUDA devices", e))?;
        if device >= usize::try_from(count).unwrap_or(0) {
            return Err(CollectiveError::Unavailable(format!(
                "CUDA device {device} does not exist: this machine has {count} \
                 (CUDA_VISIBLE_DEVICES={})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
            )));
        }
        let open = format!("open CUDA device {device}");
        let stream = guarded(&open, || {
            CudaContext::new(device).and_then(|ctx| ctx.new_stream())
        })?
        .map_err(|e| gpu_error(&open, e))?;
        let id = Id::uninit(config.id.0.map(|b| b as std::ffi::c_char));
        let (rank, world) = (config.rank, config.world);
        let join = format!("join the NCCL communicator as rank {rank} of {world}");
        let comm = guarded(&join, || {
            Comm::from_rank(Arc::clone(&stream), rank, world, id)
        })?
        .map_err(|e| nccl_error(&join, e))?;
        tracing::info!(rank, world, device, "nccl communicator joined");
        Ok(NcclComm {
            rank,
            world,
            device,
            op_timeout: config.op_timeout,
            stream,
            comm: Some(comm),
            staging: None,
            failed: None,
        })
    }

    /// Returns this rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Returns the number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Returns the CUDA stream the communicator works on; device buffers for
    /// [`NcclComm::all_reduce_sum_device`] are best allocated on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies `host` to a new buffer on this rank's GPU.
    pub fn to_device(&self, host: &[f32]) -> Result<CudaSlice<f32>, CollectiveError> {
        let op = "copy a buffer to the GPU";
        guarded(op, || self.stream.clone_htod(host))?.map_err(|e| gpu_error(op, e))
    }

    /// Copies `buf` from this rank's GPU to a new host vector; waits for the
    /// stream's work first.
    pub fn to_host(&mut self, buf: &CudaSlice<f32>) -> Result<Vec<f32>, CollectiveError> {
        self.wait("copy a buffer from the GPU")?;
        let op = "copy a buffer from the GPU";
        guarded(op, || self.stream.clone_dtoh(buf))?.map_err(|e| gpu_error(op, e))
    }

    /// Replaces `buf` with the element-wise sum of every rank's `buf`, through a
    /// buffer on the GPU.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.usable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut staging = match self.staging.take() {
            Some(staging) if staging.len() >= buf.len() => staging,
            _ => {
                let op = "allocate the GPU buffer";
                guarded(op, || self.stream.alloc_zeros::<f32>(buf.len()))?
                    .map_err(|e| gpu_error(op, e))?
            }
        };
        let result = self.reduce_via(&mut staging, buf);
        self.staging = Some(staging);
        result
    }

    /// Replaces `buf` with the element-wise mean of every rank's `buf`: the sum,
    /// divided by the world size on the host, as the ring does.
    pub fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buf)?;
        let divisor = self.world as f32;
        buf.iter_mut().for_each(|x| *x /= divisor);
        Ok(())
    }

    /// Replaces `buf`, on this rank's GPU, with the element-wise sum of every
    /// rank's `buf`, and waits until it is done.
    pub fn all_reduce_sum_device(
        &mut self,
        buf: &mut CudaSlice<f32>,
    ) -> Result<(), CollectiveError> {
        self.enqueue_sum(buf)?;
        self.wait("all-reduce")
    }

    /// Enqueues the sum of `buf` over all ranks on the stream and returns at once;
    /// [`NcclComm::wait`] waits for it. Benchmarks enqueue several before waiting.
    pub fn enqueue_sum(&mut self, buf: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        self.usable()?;
        if buf.context() != self.stream.context() {
            return Err(CollectiveError::Config(format!(
                "the buffer is on CUDA device {}, the communicator on {}",
                buf.ordinal(),
                self.device
            )));
        }
        let op = "enqueue the NCCL all-reduce";
        let comm = self.comm.as_ref().expect("usable() checked it");
        let enqueued = guarded(op, || comm.all_reduce_in_place(buf, &ReduceOp::Sum))
            .and_then(|r| r.map_err(|e| nccl_error(op, e)));
        self.fail_on_error(enqueued.map(drop))
    }

    /// Waits until the work enqueued on the stream is done. After the op timeout
    /// it aborts the communicator and fails; so does it on a CUDA error.
    pub fn wait(&mut self, what: &'static str) -> Result<(), CollectiveError> {
        self.usable()?;
        let started = Instant::now();
        let op = "record a CUDA event";
        let event = guarded(op, || self.stream.record_event(None))
            .and_then(|r| r.map_err(|e| gpu_error(op, e)));
        let event = self.fail_on_error(event)?;
        loop {
            let op = "poll a CUDA event";
            let done = guarded(op, || event.try_is_complete())
                .and_then(|r| r.map_err(|e| gpu_error(op, e)));
            if self.fail_on_error(done)? {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= self.op_timeout {
                let err = CollectiveError::Deadline {
                    op: what,
                    after: self.op_timeout,
                };
                self.abort(err.to_string());
                return Err(err);
            }
            if waited < SPIN_BEFORE_SLEEP {
                std::thread::yield_now();
            } else {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }

    /// Copies `buf` into `staging`, sums it over all ranks there and copies it back.
    fn reduce_via(
        &mut self,
        staging: &mut CudaSlice<f32>,
        buf: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let n = buf.len();
        let mut view = staging.slice_mut(..n);
        let op = "copy the buffer to the GPU";
        let copied = guarded(op, || self.stream.memcpy_htod(&*buf, &mut view))
            .and_then(|r| r.map_err(|e| gpu_error(op, e)));
        self.fail_on_error(copied)?;
        let op = "enqueue the NCCL all-reduce";
        let comm = self.comm.as_ref().expect("usable() checked it");
        let enqueued = guarded(op, || comm.all_reduce_in_place(&mut view, &ReduceOp::Sum))
            .and_then(|r| r.map_err(|e| nccl_error(op, e)));
        self.fail_on_error(enqueued.map(drop))?;
        self.wait("all-reduce")?;
        let op = "copy the sum back from the GPU";
        let copied = guarded(op, || self.stream.memcpy_dtoh(&view, buf))
            .and_then(|r| r.map_err(|e| gpu_error(op, e)));
        self.fail_on_error(copied)
    }

    fn usable(&self) -> Result<(), CollectiveError> {
        match &self.failed {
            Some(reason) => Err(CollectiveError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Aborts the communicator on an error: the ranks are out of step and NCCL's
    /// kernels may be waiting for a peer.
    fn fail_on_error<T>(
        &mut self,
        result: Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        if let Err(err) = &result {
            self.abort(err.to_string());
        }
        result
    }

    /// Aborts the communicator (`ncclCommAbort`) and remembers why.
    fn abort(&mut self, reason: String) {
        if let Some(comm) = self.comm.take() {
            tracing::warn!(rank = self.rank, %reason, "abort the nccl communicator");
            // cudarc's Drop calls ncclCommAbort and panics if it fails.
            if catch_unwind(AssertUnwindSafe(|| drop(comm))).is_err() {
                tracing::warn!(rank = self.rank, "ncclCommAbort failed");
            }
        }
        self.failed.get_or_insert(reason);
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Some(comm) = self.comm.take() {
            // ncclCommAbort, not ncclCommDestroy: no wait for peers that may be gone.
            let _ = catch_unwind(AssertUnwindSafe(|| drop(comm)));
        }
    }
}

/// Creates a fresh NCCL unique id (`ncclGetUniqueId`); see
/// [`super::communicator::new_nccl_id`].
pub fn unique_id() -> Result<NcclId, CollectiveError> {
    check_libraries()?;
    let op = "create an NCCL id";
    let id = guarded(op, Id::new)?.map_err(|e| nccl_error(op, e))?;
    let mut bytes = [0u8; NCCL_ID_BYTES];
    for (b, c) in bytes.iter_mut().zip(id.internal()) {
        *b = *c as u8;
    }
    Ok(NcclId(bytes))
}

/// Returns the number of CUDA devices.
pub fn device_count() -> Result<usize, CollectiveError> {
    check_driver()?;
    let op = "count CUDA devices";
    let count = guarded(op, CudaContext::device_count)?.map_err(|e| gpu_error(op, e))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Returns the NCCL version of the loaded libnccl, as "2.21.5".
pub fn nccl_version() -> Result<String, CollectiveError> {
    check_libraries()?;
    let op = "read the NCCL version";
    let code =
        guarded(op, cudarc::nccl::result::get_nccl_version)?.map_err(|e| nccl_error(op, e))?;
    // NCCL_VERSION(X,Y,Z): X*1000+Y*100+Z before 2.9, X*10000+Y*100+Z since.
    let (major, minor, patch) = if code >= 10_000 {
        (code / 10_000, code % 10_000 / 100, code % 100)
    } else {
        (code / 1_000, code % 1_000 / 100, code % 100)
    };
    Ok(format!("{major}.{minor}.{patch}"))
}

/// Returns the name of CUDA device `device`, as "NVIDIA H100 80GB HBM3".
pub fn device_name(device: usize) -> Result<String, CollectiveError> {
    check_driver()?;
    let op = format!("name CUDA device {device}");
    guarded(&op, || CudaContext::new(device).and_then(|ctx| ctx.name()))?
        .map_err(|e| gpu_error(&op, e))
}

/// Checks that cudarc will find both libcuda and libnccl under the names it
/// searches, so that no later call panics for want of a library.
pub fn check_libraries() -> Result<(), CollectiveError> {
    cuda::check_driver().map_err(CollectiveError::Unavailable)?;
    cuda::check_library(NCCL).map_err(CollectiveError::Unavailable)
}

fn check_driver() -> Result<(), CollectiveError> {
    cuda::check_driver().map_err(CollectiveError::Unavailable)
}

/// Runs a cudarc call, turning its panics (a missing library or symbol) into
/// errors.
fn guarded<T>(op: &str, f: impl FnOnce() -> T) -> Result<T, CollectiveError> {
    cuda::guarded(op, f).map_err(CollectiveError::Unavailable)
}

fn gpu_error(op: &str, err: DriverError) -> CollectiveError {
    CollectiveError::Gpu {
        op: op.to_string(),
        reason: err.to_string(),
    }
}

fn nccl_error(op: &str, err: cudarc::nccl::result::NcclError) -> CollectiveError {
    CollectiveError::Gpu {
        op: op.to_string(),
        // The result code's name, as "ncclSystemError"; NCCL_DEBUG=WARN says more.
        reason: format!("{:?} (set NCCL_DEBUG=WARN for NCCL's own account)", err.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::communicator::NcclConfig;

    /// Returns whether this machine can run NCCL; the tests below check the error
    /// path where it cannot, and the real all-reduce where it can.
    fn gpu_here() -> bool {
        check_libraries().is_ok() && device_count().is_ok_and(|n| n > 0)
    }

    #[test]
    fn a_missing_library_is_a_clear_error_not_a_panic() {
        if check_libraries().is_ok() {
            eprintln!("skipped: libcuda and libnccl both load here");
            return;
        }
        let err = unique_id().expect_err("no library");
        let text = err.to_string();
        assert!(
            text.contains("libnccl not found") || text.contains("no CUDA driver"),
            "{text}"
        );
        assert!(text.contains("LD_LIBRARY_PATH"), "{text}");
        let config = NcclConfig::new(0, 1, NcclId([0; NCCL_ID_BYTES]), 0);
        let err = NcclComm::new(&config).expect_err("no library");
        assert!(matches!(err, CollectiveError::Unavailable(_)), "{err}");
    }

    #[test]
    fn a_bad_rank_is_refused_before_the_libraries() {
        let config = NcclConfig::new(3, 2, NcclId([0; NCCL_ID_BYTES]), 0);
        let err = NcclComm::new(&config).expect_err("rank out of range");
        assert!(matches!(err, CollectiveError::Config(_)), "{err}");
    }

    #[test]
    fn one_rank_sums_to_itself_on_a_gpu() {
        if !gpu_here() {
            eprintln!("skipped: no CUDA driver, libnccl or GPU here");
            return;
        }
        let id = unique_id().expect("an id");
        let mut comm = NcclComm::new(&NcclConfig::new(0, 1, id, 0)).expect("a communicator");
        let mut buf: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        comm.all_reduce_sum(&mut buf).expect("all-reduce");
        assert_eq!(buf, (0..1000).map(|i| i as f32).collect::<Vec<_>>());
        let mut dev = comm.to_device(&[1.5; 64]).expect("to device");
        comm.all_reduce_sum_device(&mut dev)
            .expect("device all-reduce");
        assert_eq!(comm.to_host(&dev).expect("to host"), vec![1.5; 64]);
    }
}
