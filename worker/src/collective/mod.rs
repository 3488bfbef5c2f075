//! Collectives between the shards of a data-parallel job: after each backward
//! pass every shard holds its own flat gradient buffer, and each must end with the
//! mean of all of them.
//!
//! - [`ring`]: the [`Ring`] communicator on CPUs; TCP links to its two neighbours,
//!   the handshake that keeps other jobs out, and the chunked, pipelined
//!   all-reduce.
//! - [`lane`]: shared-memory lanes that carry a link's values when both ranks
//!   are on one host (the TCP link keeps headers, credits and failure detection).
//! - `nccl` (`cuda` feature): `nccl::NcclComm`, one rank of an NCCL
//!   communicator on one GPU through cudarc, with blocking calls; libcuda and
//!   libnccl are loaded at run time, and a missing one is an error, not a panic.
//! - `nccl_thread` (`cuda` feature): `nccl_thread::NcclThread`, an `NcclComm`
//!   on a thread of its own, with async calls.
//! - [`communicator`]: [`Collective`], either of the two for a training shard, and
//!   the choice between them that travels with the rendezvous (rank 0's NCCL id).
//! - This file: the [`CollectiveError`] every call returns, and the ring schedule
//!   (which segment each rank sends and receives at each step) as pure functions,
//!   tested without sockets.
//!
//! The ring all-reduce of a buffer over `world` ranks cuts it into `world`
//! segments and runs two phases of `world - 1` steps each. In every step each rank
//! sends one segment to its right neighbour while it receives another from its
//! left one:
//!
//! ```text
//!  reduce-scatter, step s: rank r sends segment r-s, receives segment r-s-1
//!                          and adds it into its own copy
//!  (after world-1 steps rank r holds segment r+1 summed over all ranks; for a
//!   mean it divides that segment by world)
//!  all-gather, step s:     rank r sends segment r+1-s, receives segment r-s
//!                          and overwrites its own copy
//!                                       (all indices modulo world)
//! ```
//!
//! Each rank sends and receives `2 (world - 1) / world` of the buffer, whatever the
//! world size: the algorithm is bandwidth-optimal, and its latency grows with the
//! number of ranks. Each segment is reduced once, in ring order, and then copied to
//! every rank, so all ranks end with bit-identical buffers.

pub mod communicator;
pub mod lane;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
pub mod nccl_thread;
pub mod ring;

use std::ops::Range;
use std::time::Duration;

pub use communicator::{Backend, Collective, NcclConfig, NcclId};
pub use lane::LaneConfig;
pub use ring::{Carrier, Ring, RingConfig, RingKey};

/// Why a collective call failed. Failures on a link name the peer rank at the
/// other end, so that a job can report which shard broke.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The configuration cannot describe a communicator (rank out of range, no
    /// addresses, a zero timeout, a chunk size out of bounds, an NCCL id of the
    /// wrong length).
    #[error("invalid communicator config: {0}")]
    Config(String),
    /// A link to a neighbour could not be set up before the setup deadline.
    #[error("set up the link with rank {peer} at {addr}: {reason}")]
    Setup {
        peer: usize,
        addr: String,
        reason: String,
    },
    /// A neighbour answered the handshake with a refusal: it belongs to another
    /// job attempt, another world size, or expects another rank.
    #[error("rank {peer} at {addr} refused the connection: {reason}")]
    Refused {
        peer: usize,
        addr: String,
        reason: String,
    },
    /// A peer made no progress (sent or took no frame) for the I/O timeout.
    #[error("{op} rank {peer}: no progress in {} ms", after.as_millis())]
    Timeout {
        peer: usize,
        op: LinkOp,
        after: Duration,
    },
    /// A peer closed its end of the link (end of stream, reset, broken pipe).
    #[error("{op} rank {peer}: connection closed ({how})")]
    PeerClosed {
        peer: usize,
        op: LinkOp,
        how: &'static str,
    },
    /// A peer sent something other than what this rank expected: out of step, a
    /// different buffer length or operation, a malformed frame.
    #[error("receive from rank {peer}: {reason}")]
    Protocol { peer: usize, reason: String },
    /// Any other I/O failure on a link.
    #[error("{op} rank {peer}: {source}")]
    Io {
        peer: usize,
        op: LinkOp,
        #[source]
        source: std::io::Error,
    },
    /// An earlier call failed or was cancelled midway; the ring's links are closed
    /// (or the NCCL communicator aborted) and the job must set up a new one.
    #[error("the communicator failed earlier and cannot be used again: {0}")]
    Poisoned(String),
    /// GPU collectives cannot run here: kiln was built without the `cuda` feature,
    /// or the CUDA driver, libnccl or the device is missing. The message names
    /// what is missing and where it was looked for.
    #[error("GPU all-reduce unavailable: {0}")]
    Unavailable(String),
    /// A CUDA driver or NCCL call failed.
    #[error("{op}: {reason}")]
    Gpu { op: String, reason: String },
    /// A GPU operation did not finish in time; an NCCL communicator that existed
    /// was aborted.
    #[error("{op}: not finished within {} ms", after.as_millis())]
    Deadline { op: &'static str, after: Duration },
}

impl CollectiveError {
    /// Returns the rank at the other end of the failed link, when one is known.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CollectiveError::Setup { peer, .. }
            | CollectiveError::Refused { peer, .. }
            | CollectiveError::Timeout { peer, .. }
            | CollectiveError::PeerClosed { peer, .. }
            | CollectiveError::Protocol { peer, .. }
            | CollectiveError::Io { peer, .. } => Some(*peer),
            CollectiveError::Config(_)
            | CollectiveError::Poisoned(_)
            | CollectiveError::Unavailable(_)
            | CollectiveError::Gpu { .. }
            | CollectiveError::Deadline { .. } => None,
        }
    }
}

/// What a rank was doing on a link when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOp {
    /// Sending to the right neighbour.
    Send,
    /// Receiving from the left neighbour.
    Receive,
}

impl std::fmt::Display for LinkOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkOp::Send => "send to",
            LinkOp::Receive => "receive from",
        })
    }
}

/// One step of the ring schedule: the segments a rank sends and receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub send: usize,
    pub recv: usize,
}

/// Returns the rank's right neighbour, the one it sends to.
pub(crate) fn right_of(rank: usize, world: usize) -> usize {
    (rank + 1) % world
}

/// Returns the rank's left neighbour, the one it receives from.
pub(crate) fn left_of(rank: usize, world: usize) -> usize {
    (rank + world - 1) % world
}

/// Returns the steps of the reduce-scatter phase for `rank`: it receives a partial
/// sum of a segment and adds its own values into it.
pub(crate) fn reduce_scatter_steps(rank: usize, world: usize) -> impl Iterator<Item = Step> {
    (0..world.saturating_sub(1)).map(move |s| Step {
        send: (rank + world - s) % world,
        recv: (rank + 2 * world - s - 1) % world,
    })
}

/// Returns the segment that `rank` holds fully reduced after the reduce-scatter
/// phase (and sends first in the all-gather phase).
pub(crate) fn reduced_segment(rank: usize, world: usize) -> usize {
    right_of(rank, world)
}

/// Returns the steps of the all-gather phase for `rank`: it receives a fully
/// reduced segment and overwrites its own copy.
pub(crate) fn all_gather_steps(rank: usize, world: usize) -> impl Iterator<Item = Step> {
    (0..world.saturating_sub(1)).map(move |s| Step {
        send: (rank + world + 1 - s) % world,
        recv: (rank + world - s) % world,
    })
}

/// Returns the element range of segment `index` of a buffer of `len` elements cut
/// into `world` segments. Sizes differ by at most one, the longer ones first; when
/// `len < world` the last segments are empty.
pub(crate) fn segment(len: usize, world: usize, index: usize) -> Range<usize> {
    let (base, extra) = (len / world, len % world);
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

/// Cuts `range` into pieces of at most `max` elements. An empty range gives one
/// empty piece, so that every step exchanges at least one frame and a rank that is
/// out of step is noticed at once.
pub(crate) fn pieces(range: Range<usize>, max: usize) -> impl Iterator<Item = Range<usize>> {
    assert!(max > 0, "pieces of zero elements never end");
    let count = range.len().div_ceil(max).max(1);
    (0..count).map(move |i| {
        let start = range.start + i * max;
        start..(start + max).min(range.end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the schedule on in-memory buffers, one per rank, the way the ring does
    /// over sockets (every rank's step `s` happens before anyone's step `s + 1`).
    fn simulate(inputs: &[Vec<u64>]) -> Vec<Vec<u64>> {
        let world = inputs.len();
        let len = inputs[0].len();
        let mut bufs = inputs.to_vec();
        let reduce_scatter: Vec<Vec<Step>> = (0..world)
            .map(|r| reduce_scatter_steps(r, world).collect())
            .collect();
        let all_gather: Vec<Vec<Step>> = (0..world)
            .map(|r| all_gather_steps(r, world).collect())
            .collect();
        for (schedules, add) in [(reduce_scatter, true), (all_gather, false)] {
            for s in 0..world - 1 {
                let sent: Vec<Vec<u64>> = (0..world)
                    .map(|r| bufs[r][segment(len, world, schedules[r][s].send)].to_vec())
                    .collect();
                for r in 0..world {
                    let step = schedules[r][s];
                    let from = left_of(r, world);
                    assert_eq!(
                        schedules[from][s].send, step.recv,
                        "rank {r} expects the segment its left neighbour sends"
                    );
                    let dst = &mut bufs[r][segment(len, world, step.recv)];
                    for (d, x) in dst.iter_mut().zip(&sent[from]) {
                        *d = if add { *d + x } else { *x };
                    }
                }
            }
        }
        bufs
    }

    #[test]
    fn the_schedule_leaves_every_rank_with_the_sum() {
        for world in 1..=7 {
            for len in 0..=3 * world + 2 {
                // Distinct powers of two per rank: a sum that missed or doubled a
                // rank's value shows.
                let inputs: Vec<Vec<u64>> = (0..world)
                    .map(|r| (0..len).map(|i| (1 << r) * (i as u64 + 1)).collect())
                    .collect();
                let expected: Vec<u64> = (0..len)
                    .map(|i| ((1 << world) - 1) * (i as u64 + 1))
                    .collect();
                for (rank, out) in simulate(&inputs).iter().enumerate() {
                    assert_eq!(out, &expected, "world {world}, len {len}, rank {rank}");
                }
            }
        }
    }

    #[test]
    fn after_reduce_scatter_each_rank_owns_the_segment_it_received_last() {
        for world in 2..=7 {
            for rank in 0..world {
                let last = reduce_scatter_steps(rank, world).last().expect("a step");
                assert_eq!(last.recv, reduced_segment(rank, world));
                let first = all_gather_steps(rank, world).next().expect("a step");
                assert_eq!(first.send, reduced_segment(rank, world));
            }
        }
    }

    #[test]
    fn a_world_of_one_has_no_steps() {
        assert_eq!(reduce_scatter_steps(0, 1).count(), 0);
        assert_eq!(all_gather_steps(0, 1).count(), 0);
    }

    #[test]
    fn segments_cover_the_buffer_in_order_and_balance() {
        for world in 1..=9 {
            for len in 0..=40 {
                let segments: Vec<Range<usize>> =
                    (0..world).map(|i| segment(len, world, i)).collect();
                assert_eq!(segments[0].start, 0);
                assert_eq!(segments[world - 1].end, len);
                for pair in segments.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start, "world {world}, len {len}");
                }
                let sizes: Vec<usize> = segments.iter().map(|s| s.len()).collect();
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(
                    max.zip(min).is_some_and(|(max, min)| max - min <= 1),
                    "{sizes:?}"
                );
            }
        }
    }

    #[test]
    fn pieces_cover_a_range_and_an_empty_range_is_one_empty_piece() {
        assert_eq!(pieces(5..5, 4).collect::<Vec<_>>(), vec![5..5]);
        assert_eq!(pieces(3..4, 4).collect::<Vec<_>>(), vec![3..4]);
        assert_eq!(pieces(0..8, 4).collect::<Vec<_>>(), vec![0..4, 4..8]);
        assert_eq!(
            pieces(10..19, 4).collect::<Vec<_>>(),
            vec![10..14, 14..18, 18..19]
        );
    }

    #[test]
    fn errors_name_the_peer_and_what_happened() {
        let err = CollectiveError::PeerClosed {
            peer: 2,
            op: LinkOp::Receive,
            how: "end of stream",
        };
        assert_eq!(
            err.to_string(),
            "receive from rank 2: connection closed (end of stream)"
        );
        assert_eq!(err.peer(), Some(2));
        let err = CollectiveError::Timeout {
            peer: 1,
            op: LinkOp::Send,
            after: Duration::from_secs(2),
        };
        assert_eq!(err.to_string(), "send to rank 1: no progress in 2000 ms");
    }
}
