//! [`Collective`]: the communicator a training shard reduces its gradients with,
//! either the TCP [`Ring`] or NCCL on the shard's GPU, and the choice between them.
//!
//! The choice is made once per job attempt, by rank 0, and travels with the
//! rendezvous so that every rank agrees on it:
//!
//! ```text
//!  rank 0:      nccl_wanted(gpus_per_shard, world)?
//!                 yes: new_nccl_id() ── 128 bytes ──► its ready report (nccl_id)
//!                 no:  nccl_id left empty
//!  every rank:  rendezvous done ─► Backend::from_rendezvous(rank 0's nccl_id)
//!                 Ring          ─► Ring::connect(listener, RingConfig)
//!                 Nccl(id)      ─► Collective::nccl(NcclConfig { id, device, .. })
//! ```
//!
//! Everything here is compiled with and without the `cuda` feature, so that the
//! shard needs no `cfg`: without it, [`new_nccl_id`] and [`Collective::nccl`] fail
//! with [`CollectiveError::Unavailable`] and [`nccl_wanted`] is always false.

use std::time::Duration;

use super::ring::{Ring, DEFAULT_IO_TIMEOUT, DEFAULT_SETUP_TIMEOUT};
use super::CollectiveError;

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES` in `nccl.h`).
pub const NCCL_ID_BYTES: usize = 128;

/// Whether this kiln was built with the `cuda` feature (NCCL through cudarc).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// What [`CollectiveError::Unavailable`] says when NCCL is asked of a kiln built
/// without it.
pub const WITHOUT_CUDA: &str = "this kiln was built without the cuda feature \
     (build it with `cargo build --workspace --features kiln-cli/cuda`)";

/// An NCCL unique id: rank 0 creates it, the rendezvous carries it to the other
/// ranks, and all of them create their communicator from it. It holds the address
/// of rank 0's bootstrap socket, so it is good for one job attempt only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; NCCL_ID_BYTES]);

impl NcclId {
    /// Reads an id from the bytes of a message; they must be exactly
    /// [`NCCL_ID_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId, CollectiveError> {
        let id: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            CollectiveError::Config(format!(
                "an NCCL id has {NCCL_ID_BYTES} bytes, not {}",
                bytes.len()
            ))
        })?;
        Ok(NcclId(id))
    }

    /// Returns the bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The first bytes are enough to tell two ids apart in a log.
        write!(f, "NcclId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// Returns whether rank 0 of a job should create an NCCL id, so that the job's
/// shards reduce on their GPUs: the shards were given GPUs, this kiln has the
/// `cuda` feature, and there is more than one rank (one rank has nothing to
/// reduce, and the ring skips it for free).
pub fn nccl_wanted(gpus_per_shard: u32, world: usize) -> bool {
    CUDA_BUILT && gpus_per_shard > 0 && world > 1
}

/// Creates a fresh NCCL id (`ncclGetUniqueId`) in this process, which must then
/// stay up: the id names a socket that rank 0's communicator setup listens on.
/// Fails with a clear error, never a panic, when kiln was built without `cuda` or
/// the CUDA driver or libnccl cannot be loaded.
pub fn new_nccl_id() -> Result<NcclId, CollectiveError> {
    #[cfg(feature = "cuda")]
    {
        super::nccl::unique_id()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(CollectiveError::Unavailable(WITHOUT_CUDA.into()))
    }
}

/// The communicator a job attempt uses, as rank 0 published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The TCP ring between the shards' data ports.
    Ring,
    /// NCCL on each shard's first GPU, set up from this id.
    Nccl(NcclId),
}

impl Backend {
    /// Reads rank 0's `nccl_id` from the rendezvous: empty means the ring, 128
    /// bytes mean NCCL. A kiln built without `cuda` that is asked for NCCL fails
    /// here, before any rank waits for it in the communicator setup.
    pub fn from_rendezvous(nccl_id: &[u8]) -> Result<Backend, CollectiveError> {
        if nccl_id.is_empty() {
            return Ok(Backend::Ring);
        }
        let id = NcclId::from_bytes(nccl_id)?;
        if !CUDA_BUILT {
            return Err(CollectiveError::Unavailable(format!(
                "rank 0 set the job up for NCCL, but {WITHOUT_CUDA}"
            )));
        }
        Ok(Backend::Nccl(id))
    }
}

/// How one rank joins an NCCL communicator.
#[derive(Debug, Clone)]
pub struct NcclConfig {
    pub rank: usize,
    pub world: usize,
    pub id: NcclId,
    /// The CUDA device ordinal. CUDA numbers devices fastest first unless
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`, which makes the ordinals NVML's indices.
    pub device: usize,
    /// Longest wait for every rank to join (`ncclCommInitRank` blocks until they do).
    pub setup_timeout: Duration,
    /// Longest one all-reduce may take on the GPU before the communicator is
    /// aborted; a rank that died shows as this stall.
    pub op_timeout: Duration,
}

impl NcclConfig {
    /// Returns the config with the ring's default timeouts.
    pub fn new(rank: usize, world: usize, id: NcclId, device: usize) -> NcclConfig {
        NcclConfig {
            rank,
            world,
            id,
            device,
            setup_timeout: DEFAULT_SETUP_TIMEOUT,
            op_timeout: DEFAULT_IO_TIMEOUT,
        }
    }

    /// Checks what can be checked before any library is loaded.
    pub(crate) fn validate(&self) -> Result<(), CollectiveError> {
        if self.world == 0 || self.rank >= self.world {
            return Err(CollectiveError::Config(format!(
                "rank {} is not in a world of {}",
                self.rank, self.world
            )));
        }
        if i32::try_from(self.world).is_err() {
            return Err(CollectiveError::Config(format!(
                "NCCL counts ranks in an i32; {} is too many",
                self.world
            )));
        }
        if self.setup_timeout.is_zero() || self.op_timeout.is_zero() {
            return Err(CollectiveError::Config("a timeout of zero".into()));
        }
        Ok(())
    }
}

/// A shard's communicator. Calls take `&mut self`, one at a time, and every rank
/// must make the same sequence of calls with buffers of the same length; after a
/// failure every later call fails too, and the job sets up a new one.
#[derive(Debug)]
pub enum Collective {
    // Boxed: the ring holds its buffers' bookkeeping inline, several times the
    // NCCL handle.
    Ring(Box<Ring>),
    #[cfg(feature = "cuda")]
    Nccl(super::nccl_thread::NcclThread),
}

impl Collective {
    /// Joins an NCCL communicator on the configured GPU; returns once every rank
    /// has joined. Fails at once, naming the library, when kiln was built without
    /// `cuda` or libcuda or libnccl cannot be loaded.
    pub async fn nccl(config: NcclConfig) -> Result<Collective, CollectiveError> {
        #[cfg(feature = "cuda")]
        {
            super::nccl_thread::NcclThread::connect(config)
                .await
                .map(Collective::Nccl)
        }
        #[cfg(not(feature = "cuda"))]
        {
            config.validate()?;
            Err(CollectiveError::Unavailable(WITHOUT_CUDA.into()))
        }
    }

    /// Returns "ring" or "nccl", for logs; a linked ring says what carries its
    /// links ("ring (to rank 1: shared memory, from rank 1: tcp)").
    pub fn backend(&self) -> String {
        match self {
            Collective::Ring(ring) => match ring.carriers() {
                Some((to_right, from_left)) => format!(
                    "ring (to rank {}: {to_right}, from rank {}: {from_left})",
                    super::right_of(ring.rank(), ring.world()),
                    super::left_of(ring.rank(), ring.world())
                ),
                None => "ring".into(),
            },
            #[cfg(feature = "cuda")]
            Collective::Nccl(_) => "nccl".into(),
        }
    }

    /// Returns this rank.
    pub fn rank(&self) -> usize {
        match self {
            Collective::Ring(ring) => ring.rank(),
            #[cfg(feature = "cuda")]
            Collective::Nccl(nccl) => nccl.rank(),
        }
    }

    /// Returns the number of ranks.
    pub fn world(&self) -> usize {
        match self {
            Collective::Ring(ring) => ring.world(),
            #[cfg(feature = "cuda")]
            Collective::Nccl(nccl) => nccl.world(),
        }
    }

    /// Replaces `buf` with the element-wise sum of every rank's `buf`.
    pub async fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        match self {
            Collective::Ring(ring) => ring.all_reduce_sum(buf).await,
            #[cfg(feature = "cuda")]
            Collective::Nccl(nccl) => nccl.all_reduce_sum(buf).await,
        }
    }

    /// Replaces `buf` with the element-wise mean of every rank's `buf`.
    pub async fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        match self {
            Collective::Ring(ring) => ring.all_reduce_mean(buf).await,
            #[cfg(feature = "cuda")]
            Collective::Nccl(nccl) => nccl.all_reduce_mean(buf).await,
        }
    }
}

impl From<Ring> for Collective {
    fn from(ring: Ring) -> Collective {
        Collective::Ring(Box::new(ring))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_nccl_id_means_the_ring() {
        assert_eq!(Backend::from_rendezvous(&[]).ok(), Some(Backend::Ring));
    }

    #[test]
    fn an_nccl_id_must_have_128_bytes() {
        let err = Backend::from_rendezvous(&[7; 100]).expect_err("short id");
        assert_eq!(
            err.to_string(),
            "invalid communicator config: an NCCL id has 128 bytes, not 100"
        );
        let id = NcclId::from_bytes(&[7; NCCL_ID_BYTES]).expect("128 bytes");
        assert_eq!(id.as_bytes(), &[7; NCCL_ID_BYTES][..]);
    }

    #[test]
    fn a_kiln_without_cuda_refuses_an_nccl_job_clearly() {
        let result = Backend::from_rendezvous(&[1; NCCL_ID_BYTES]);
        if CUDA_BUILT {
            assert_eq!(result.ok(), Some(Backend::Nccl(NcclId([1; NCCL_ID_BYTES]))));
        } else {
            let err = result.expect_err("no cuda feature");
            assert!(
                err.to_string().contains("built without the cuda feature"),
                "{err}"
            );
        }
    }

    #[test]
    fn nccl_is_wanted_only_with_gpus_the_feature_and_peers() {
        assert!(!nccl_wanted(0, 4));
        assert!(!nccl_wanted(1, 1));
        assert_eq!(nccl_wanted(1, 2), CUDA_BUILT);
    }

    #[test]
    fn configs_out_of_range_are_refused_before_any_library_loads() {
        let id = NcclId([0; NCCL_ID_BYTES]);
        assert!(NcclConfig::new(2, 2, id, 0).validate().is_err());
        assert!(NcclConfig::new(0, 0, id, 0).validate().is_err());
        let mut config = NcclConfig::new(0, 2, id, 0);
        assert!(config.validate().is_ok());
        config.op_timeout = Duration::ZERO;
        assert!(config.validate().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_nccl_fails_with_the_feature_named() {
        let err = new_nccl_id().expect_err("no cuda feature");
        assert!(
            err.to_string().contains("without the cuda feature"),
            "{err}"
        );
    }

    #[test]
    fn ids_print_only_their_first_bytes() {
        let mut bytes = [0u8; NCCL_ID_BYTES];
        bytes[0] = 0xab;
        assert_eq!(format!("{:?}", NcclId(bytes)), "NcclId(ab00000000000000..)");
    }
}
