//! [`NcclThread`]: an [`NcclComm`] on an OS thread of its own, with async calls
//! (compiled with the `cuda` feature only).
//!
//! NCCL calls block, and cudarc's communicator cannot move between threads, so
//! one thread creates the communicator and makes every call on it; the async side
//! sends it requests and awaits the replies:
//!
//! ```text
//!  connect ── spawn "nccl-rank-R" ──► NcclComm::new (blocks until all ranks join)
//!     ◄──────── ready (Ok / Err) ─────┘   bounded here by setup_timeout
//!  all_reduce_sum(&mut [f32]):
//!     buf ─copy─► Vec ── request ──► NcclComm::all_reduce_sum (host ─► GPU ─► host)
//!     buf ◄─copy─ Vec ◄── reply ─────┘   bounded there by op_timeout (then abort),
//!                                        here by op_timeout + REPLY_GRACE
//! ```
//!
//! The host vector travels to the thread and back, so that a step allocates
//! nothing. When the thread does not answer in time (a call blocked inside NCCL),
//! or a call's future is dropped midway, the handle is poisoned and lets go of
//! the thread, which ends (aborting the communicator) as soon as NCCL lets it.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::communicator::NcclConfig;
use super::nccl::NcclComm;
use super::CollectiveError;

/// Time the thread has beyond its own op timeout to answer: it aborts the
/// communicator and replies within this, unless it is stuck inside NCCL.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// The reduction a request asks for.
#[derive(Debug, Clone, Copy)]
enum Op {
    Sum,
    Mean,
}

struct Request {
    buf: Vec<f32>,
    op: Op,
    reply: oneshot::Sender<(Vec<f32>, Result<(), CollectiveError>)>,
}

/// A rank's NCCL communicator, driven from async code.
pub struct NcclThread {
    rank: usize,
    world: usize,
    op_timeout: Duration,
    /// `None` once failed: dropping it ends the thread.
    requests: Option<mpsc::Sender<Request>>,
    /// The host vector that goes to the thread and back with each call.
    spare: Vec<f32>,
    failed: Option<String>,
}

impl std::fmt::Debug for NcclThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclThread")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("failed", &self.failed)
            .finish()
    }
}

impl NcclThread {
    /// Starts the rank's thread and joins the communicator there; returns once
    /// every rank has joined, or fails after `config.setup_timeout`.
    pub async fn connect(config: NcclConfig) -> Result<NcclThread, CollectiveError> {
        config.validate()?;
        let (rank, world) = (config.rank, config.world);
        let (setup_timeout, op_timeout) = (config.setup_timeout, config.op_timeout);
        let (ready_tx, ready_rx) = oneshot::channel();
        // One request at a time: calls take `&mut self`.
        let (requests, mut incoming) = mpsc::channel::<Request>(1);
        std::thread::Builder::new()
            .name(format!("nccl-rank-{rank}"))
            .spawn(move || {
                let mut comm = match NcclComm::new(&config) {
                    Ok(comm) => comm,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    // The caller gave up waiting; the communicator is aborted on drop.
                    return;
                }
                while let Some(Request { mut buf, op, reply }) = incoming.blocking_recv() {
                    let result = match op {
                        Op::Sum => comm.all_reduce_sum(&mut buf),
                        Op::Mean => comm.all_reduce_mean(&mut buf),
                    };
                    let _ = reply.send((buf, result));
                }
            })
            .map_err(|e| CollectiveError::Unavailable(format!("start the NCCL thread: {e}")))?;
        match tokio::time::timeout(setup_timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(NcclThread {
                rank,
                world,
                op_timeout,
                requests: Some(requests),
                spare: Vec::new(),
                failed: None,
            }),
            Ok(Ok(Err(err))) => Err(err),
            Ok(Err(_)) => Err(CollectiveError::Unavailable(
                "the NCCL thread ended during setup".into(),
            )),
            // Dropping `ready_rx` tells the thread, once NCCL returns, to give up.
            Err(_) => Err(CollectiveError::Deadline {
                op: "join the NCCL communicator (every rank must join)",
                after: setup_timeout,
            }),
        }
    }

    /// Returns this rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Returns the number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Replaces `buf` with the element-wise sum of every rank's `buf`.
    pub async fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.call(buf, Op::Sum).await
    }

    /// Replaces `buf` with the element-wise mean of every rank's `buf`.
    pub async fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.call(buf, Op::Mean).await
    }

    async fn call(&mut self, buf: &mut [f32], op: Op) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.failed {
            return Err(CollectiveError::Poisoned(reason.clone()));
        }
        let Some(requests) = self.requests.clone() else {
            return Err(CollectiveError::Poisoned("the NCCL thread is gone".into()));
        };
        let call = Call {
            thread: self,
            finished: false,
        };
        call.run(requests, buf, op).await
    }

    /// Lets go of the thread (it ends once NCCL returns) and remembers why.
    fn fail(&mut self, reason: String) {
        self.requests = None;
        self.failed.get_or_insert(reason);
    }
}

/// One call on the thread. Dropped before it finishes (its future was
/// cancelled), it fails the communicator: the ranks are out of step.
struct Call<'a> {
    thread: &'a mut NcclThread,
    finished: bool,
}

impl Call<'_> {
    async fn run(
        mut self,
        requests: mpsc::Sender<Request>,
        buf: &mut [f32],
        op: Op,
    ) -> Result<(), CollectiveError> {
        let result = self.exchange(requests, buf, op).await;
        self.finished = true;
        if let Err(err) = &result {
            self.thread.fail(err.to_string());
        }
        result
    }

    async fn exchange(
        &mut self,
        requests: mpsc::Sender<Request>,
        buf: &mut [f32],
        op: Op,
    ) -> Result<(), CollectiveError> {
        let mut host = std::mem::take(&mut self.thread.spare);
        host.clear();
        host.extend_from_slice(buf);
        let (reply, answer) = oneshot::channel();
        let gone = || CollectiveError::Poisoned("the NCCL thread stopped".into());
        requests
            .send(Request {
                buf: host,
                op,
                reply,
            })
            .await
            .map_err(|_| gone())?;
        let bound = self.thread.op_timeout + REPLY_GRACE;
        let (host, result) = match tokio::time::timeout(bound, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(gone()),
            Err(_) => {
                return Err(CollectiveError::Deadline {
                    op: "all-reduce (the NCCL thread did not answer)",
                    after: bound,
                })
            }
        };
        if result.is_ok() {
            buf.copy_from_slice(&host);
        }
        self.thread.spare = host;
        result
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.thread
                .fail("an earlier all-reduce was cancelled midway".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::communicator::{NcclId, NCCL_ID_BYTES};
    use crate::collective::nccl;

    #[tokio::test]
    async fn without_libraries_connect_fails_with_the_library_named() {
        if nccl::check_libraries().is_ok() {
            eprintln!("skipped: libcuda and libnccl both load here");
            return;
        }
        let config = NcclConfig::new(0, 2, NcclId([0; NCCL_ID_BYTES]), 0);
        let err = NcclThread::connect(config).await.expect_err("no library");
        let text = err.to_string();
        assert!(
            text.contains("libnccl not found") || text.contains("no CUDA driver"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn one_rank_on_the_first_gpu_or_skip() {
        // NCCL wants a GPU per rank; a world of one is what every GPU machine runs.
        if nccl::check_libraries().is_err() || nccl::device_count().map_or(true, |n| n == 0) {
            eprintln!("skipped: no CUDA driver, libnccl or GPU here");
            return;
        }
        let id = nccl::unique_id().expect("an id");
        let mut thread = NcclThread::connect(NcclConfig::new(0, 1, id, 0))
            .await
            .expect("connect");
        let mut buf = vec![2.0f32; 4096];
        thread.all_reduce_mean(&mut buf).await.expect("mean");
        assert_eq!(buf, vec![2.0; 4096]);
    }
}
