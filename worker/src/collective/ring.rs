//! The [`Ring`] communicator: one TCP link to each neighbour and the chunked,
//! pipelined ring all-reduce over them (the schedule is in [`super`]).
//!
//! Setup, on every rank at once, bounded by [`RingConfig::setup_timeout`]:
//!
//! ```text
//!  rank r-1 ──connect──► [listener of r] ── hello? ──► accept or refuse, keep listening
//!  rank r ── connect to r+1 (retry: 20 ms doubling to 1 s) ── hello ──► verdict
//!            ▲ refused: fail at once, naming rank r+1 and why
//! ```
//!
//! The hello names the job attempt (`session_id`), the world size, the sender's
//! rank and the rank it means to reach; the listener refuses any mismatch with a
//! verdict, so that a shard of another job (or of an earlier attempt of this one)
//! fails with a clear error instead of mixing its gradients in. A connection that
//! does not speak the protocol is dropped; either way the listener keeps waiting
//! for its real left neighbour.
//!
//! The session id is no secret, so both ends then prove they hold the attempt's
//! [`RingKey`] (32 random bytes the leader draws at placement and sends only to
//! cluster nodes, in the attempt's shard tasks, over mutual TLS): each sends a fresh nonce and a keyed
//! BLAKE3 of the hello and both nonces, under its own label, and checks the
//! other's. A process that does not hold the key can neither join a ring nor pose
//! as a neighbour that gradients are sent to; replaying an old handshake fails on
//! the fresh nonces. The frames themselves are not authenticated or encrypted: on
//! a network where someone can inject into an established TCP stream, run the
//! data plane on a private network (docs/operations.md).
//!
//! Last, each rank offers its right neighbour a shared-memory lane
//! ([`super::lane`]): when both are on one host, the values of every frame on
//! that link go through it, and the TCP link carries only headers one way and a
//! credit byte per slot the other. Otherwise (another host, lanes off, no room in
//! the tmpfs) the frames go over TCP, values and all.
//!
//! Wire format, all integers little endian:
//!
//! ```text
//!  hello  (32 B): "KILNRING" | version u32 | session u64 | world u32 | from u32 | to u32
//!  verdict(32 B): "KILNRING" | version u32 | verdict u32 | session u64 | world u32 | rank u32
//!  then, when accepted:
//!    listener  → listener nonce (32 B)
//!    connector → connector nonce (32 B) | keyed BLAKE3 "connector" proof (32 B)
//!    listener  → verdict (32 B: accepted, or wrong key) | "listener" proof (32 B, if accepted)
//!    connector → lane offer (72 B): "KILNLANE" | kind u32 (0 none, 1 lane) | slots u32 |
//!                slot bytes u32 | 0 u32 | file name nonce (16 B) | token (32 B)
//!    listener  → answer u32 (1: mapped, 0: frames over TCP)
//!  frame: header (32 B): step u64 | buffer len u64 | offset u64 | len u32 | op u32
//!         payload over TCP: len f32 values (little endian); through a lane, the
//!         values are in the next slot and the receiver answers each header with
//!         one credit byte (0xC5) once it has read the slot
//! ```
//!
//! Each step of the schedule moves one segment to the right neighbour in frames of
//! at most [`RingConfig::chunk_bytes`] (or a lane's slot), while the segment from the left neighbour
//! streams in and is added or copied frame by frame; an empty segment still sends
//! one empty frame. `step` counts ring steps since setup, so a rank that missed a
//! call, or called with another buffer length or operation, is reported as a
//! protocol error, never misread.
//!
//! Each frame must be sent, and each received, within [`RingConfig::io_timeout`];
//! a peer that dies shows as a closed connection, one that stalls as a timeout.
//! After any failure, or when a call's future is dropped midway, the ring closes
//! its links at once (so its neighbours fail promptly too) and every later call
//! returns [`CollectiveError::Poisoned`]: a job restarts its shards on a new ring.

use std::ops::Range;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::lane::{Lane, LaneConfig, Offer, ANSWER_BYTES, CREDIT, MAX_SLOTS, OFFER_BYTES};
use super::{
    all_gather_steps, left_of, pieces, reduce_scatter_steps, reduced_segment, right_of, segment,
    CollectiveError, LinkOp, Step,
};

/// Default largest frame payload: large enough that headers and wake-ups cost
/// nothing, small enough that sending and receiving overlap within a step.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;
/// Largest frame payload a ring accepts in its config.
pub const MAX_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// Default time for all ranks to come up and link.
pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest wait for one frame. It also bounds how long a rank waits for a
/// slower neighbour to reach the same all-reduce, so it must exceed the spread of
/// the shards' step times; a peer that dies is noticed sooner, by its closed
/// connection.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for an accepted connection's hello, so that a silent stray
/// connection cannot hold the listener until the setup deadline.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause before connecting again to a right neighbour that is not listening.
pub const CONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(20);
/// Longest pause between connection attempts.
pub const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (out of file descriptors, an aborted connection).
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

const MAGIC: [u8; 8] = *b"KILNRING";
const VERSION: u32 = 3;
const HELLO_BYTES: usize = 32;
const HEADER_BYTES: usize = 32;
const F32_BYTES: usize = std::mem::size_of::<f32>();

/// A job attempt's ring key: 32 random bytes the leader draws at placement and
/// sends only to cluster nodes, in the attempt's shard tasks (over mutual TLS).
/// Its `Debug` shows no byte of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RingKey(pub [u8; 32]);

impl RingKey {
    /// A fresh random key (for rings made outside a cluster: benchmarks, tests).
    pub fn random() -> RingKey {
        RingKey(rand::random())
    }

    /// The key a shard task carries, or why it is not one.
    pub fn from_task(bytes: &[u8]) -> Result<RingKey, CollectiveError> {
        <[u8; 32]>::try_from(bytes).map(RingKey).map_err(|_| {
            CollectiveError::Config(format!(
                "the ring key is {} bytes, not 32 (a leader older than this worker?)",
                bytes.len()
            ))
        })
    }

    /// This side's proof that it holds the key, bound to the link's hello and
    /// both nonces; the two sides use different labels, so that neither proof can
    /// be sent back as the other.
    fn proof(
        &self,
        side: &str,
        hello: &Hello,
        listener: &[u8; 32],
        connector: &[u8; 32],
    ) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(b"kiln ring v2 ");
        hasher.update(side.as_bytes());
        hasher.update(&hello.encode());
        hasher.update(listener);
        hasher.update(connector);
        hasher.finalize()
    }
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(..)")
    }
}

/// Labels of the two proofs.
const CONNECTOR: &str = "connector";
const LISTENER: &str = "listener";

/// Where a rank sits in its ring and how long it waits.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Identifies the job attempt; only ranks with the same id link up.
    pub session_id: u64,
    /// The attempt's secret: both ends of a link prove they hold it.
    pub key: RingKey,
    /// This rank, from 0.
    pub rank: usize,
    /// The data-plane address (`host:port`) of every rank, indexed by rank; the
    /// world size is its length.
    pub addrs: Vec<String>,
    /// Longest time from [`Ring::connect`] to linked neighbours.
    pub setup_timeout: Duration,
    /// Longest wait for one frame to be sent or received.
    pub io_timeout: Duration,
    /// Largest frame payload in bytes over TCP: a multiple of 4 up to
    /// [`MAX_CHUNK_BYTES`].
    pub chunk_bytes: usize,
    /// Shared-memory lanes to a right neighbour on the same host (see
    /// [`super::lane`]); `None`: every link carries its frames over TCP.
    pub lanes: Option<LaneConfig>,
}

impl RingConfig {
    /// Returns a config with the default timeouts and chunk size.
    pub fn new(session_id: u64, key: RingKey, rank: usize, addrs: Vec<String>) -> RingConfig {
        RingConfig {
            session_id,
            key,
            rank,
            addrs,
            setup_timeout: DEFAULT_SETUP_TIMEOUT,
            io_timeout: DEFAULT_IO_TIMEOUT,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            lanes: Some(LaneConfig::default()),
        }
    }

    fn validate(&self) -> Result<(), CollectiveError> {
        let invalid = |reason: String| Err(CollectiveError::Config(reason));
        let world = self.addrs.len();
        if world == 0 {
            return invalid("no rank addresses".into());
        }
        if u32::try_from(world).is_err() {
            return invalid(format!("{world} ranks; at most {} are supported", u32::MAX));
        }
        if self.rank >= world {
            return invalid(format!("rank {} in a world of {world}", self.rank));
        }
        if self.setup_timeout.is_zero() || self.io_timeout.is_zero() {
            return invalid("timeouts must be above zero".into());
        }
        if self.chunk_bytes < F32_BYTES
            || self.chunk_bytes > MAX_CHUNK_BYTES
            || !self.chunk_bytes.is_multiple_of(F32_BYTES)
        {
            return invalid(format!(
                "chunk of {} bytes; it must be a multiple of {F32_BYTES} from {F32_BYTES} to {MAX_CHUNK_BYTES}",
                self.chunk_bytes
            ));
        }
        if let Some(problem) = self.lanes.as_ref().and_then(LaneConfig::invalid) {
            return invalid(problem);
        }
        Ok(())
    }
}

/// What carries a link's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// Headers and values over the TCP link.
    Tcp,
    /// Values through a shared-memory lane, headers and credits over TCP.
    Lane,
}

impl Carrier {
    fn of(has_lane: bool) -> Carrier {
        if has_lane {
            Carrier::Lane
        } else {
            Carrier::Tcp
        }
    }
}

impl std::fmt::Display for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Carrier::Tcp => "tcp",
            Carrier::Lane => "shared memory",
        })
    }
}

/// A rank's place in a ring of `world` ranks, linked to both neighbours: it sends
/// to rank `rank + 1` and receives from rank `rank - 1` (modulo `world`).
///
/// Calls take `&mut self`, one at a time; every rank must make the same sequence of
/// calls with buffers of the same length.
pub struct Ring {
    rank: usize,
    world: usize,
    session_id: u64,
    /// `None` in a world of one, and once the ring has failed.
    links: Option<Links>,
    /// Why the ring cannot be used any more.
    failed: Option<String>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("session_id", &self.session_id)
            .field("step", &self.links.as_ref().map(|links| links.step))
            .field("failed", &self.failed)
            .finish()
    }
}

impl Ring {
    /// Links this rank to its neighbours: connects to the right one, retrying while
    /// it is not listening yet, and accepts the left one on `listener` (bound to
    /// this rank's address in `config.addrs`). Both must complete within
    /// `config.setup_timeout`.
    ///
    /// Returns an error naming the neighbour that could not be linked, or that
    /// refused this rank. In a world of one there is nobody to link and `listener`
    /// is dropped.
    pub async fn connect(
        listener: TcpListener,
        config: RingConfig,
    ) -> Result<Ring, CollectiveError> {
        config.validate()?;
        let world = config.addrs.len();
        let mut ring = Ring {
            rank: config.rank,
            world,
            session_id: config.session_id,
            links: None,
            failed: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + config.setup_timeout;
        // Accepting is polled first: a hello that has arrived gets its verdict
        // before this rank gives up on a refusal of its own. Each link settles
        // its lane as soon as it is up, whatever the other link is waiting for
        // (a neighbour's neighbour may still be loading its data).
        let ((left, left_lane), (right, right_lane)) = tokio::try_join!(
            async {
                let mut left = accept_left(&listener, &config, deadline).await?;
                let lane = take_lane(&mut left, &config, deadline).await?;
                Ok::<_, CollectiveError>((left, lane))
            },
            async {
                let mut right = connect_right(&config, deadline).await?;
                let lane = offer_lane(&mut right, &config, deadline).await?;
                Ok::<_, CollectiveError>((right, lane))
            }
        )?;
        let chunk_elems = config.chunk_bytes / F32_BYTES;
        let to_right = Sender {
            peer: right_of(config.rank, world),
            stream: right,
            chunk_elems: right_lane.as_ref().map_or(chunk_elems, Lane::slot_elems),
            lane: right_lane.map(|lane| SendLane {
                lane,
                next: 0,
                in_flight: 0,
            }),
        };
        let from_left = Receiver {
            peer: left_of(config.rank, world),
            stream: left,
            chunk_elems: left_lane.as_ref().map_or(chunk_elems, Lane::slot_elems),
            // Only frames over TCP land in scratch before they are added.
            scratch: if left_lane.is_some() {
                Vec::new()
            } else {
                vec![0.0; chunk_elems]
            },
            lane: left_lane.map(|lane| RecvLane { lane, next: 0 }),
        };
        tracing::info!(
            session_id = config.session_id,
            rank = config.rank,
            world,
            to_right = %to_right.carrier(),
            from_left = %from_left.carrier(),
            "ring linked"
        );
        ring.links = Some(Links {
            rank: config.rank,
            world,
            io_timeout: config.io_timeout,
            step: 0,
            to_right,
            from_left,
        });
        Ok(ring)
    }

    /// What carries the frames to the right neighbour and from the left one;
    /// `None` in a world of one or once the ring has failed.
    pub fn carriers(&self) -> Option<(Carrier, Carrier)> {
        self.links
            .as_ref()
            .map(|links| (links.to_right.carrier(), links.from_left.carrier()))
    }

    /// Returns this rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Returns the number of ranks in the ring.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Returns the job attempt this ring belongs to.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Replaces `buf` with the element-wise sum of every rank's `buf`.
    pub async fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce(buf, Op::Sum).await
    }

    /// Replaces `buf` with the element-wise mean of every rank's `buf`, as
    /// data-parallel training averages gradients. Every rank ends with the same
    /// bits.
    pub async fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce(buf, Op::Mean).await
    }

    async fn all_reduce(&mut self, buf: &mut [f32], op: Op) -> Result<(), CollectiveError> {
        if let Some(reason) = &self.failed {
            return Err(CollectiveError::Poisoned(reason.clone()));
        }
        if self.links.is_none() {
            // A world of one: the sum and the mean of one buffer are that buffer.
            return Ok(());
        }
        let call = Call {
            ring: self,
            finished: false,
        };
        call.run(buf, op).await
    }

    /// Closes the links, so that the neighbours fail now rather than at their
    /// timeout, and remembers why.
    fn fail(&mut self, reason: String) {
        self.links = None;
        self.failed.get_or_insert(reason);
    }
}

/// One all-reduce on a linked ring. Dropped before it finishes (its future was
/// cancelled), it fails the ring: the links are out of step mid-frame.
struct Call<'a> {
    ring: &'a mut Ring,
    finished: bool,
}

impl Call<'_> {
    async fn run(mut self, buf: &mut [f32], op: Op) -> Result<(), CollectiveError> {
        let links = self.ring.links.as_mut().expect("checked by all_reduce");
        let result = links.all_reduce(buf, op).await;
        self.finished = true;
        if let Err(err) = &result {
            self.ring.fail(err.to_string());
        }
        result
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.ring
                .fail("an earlier all-reduce was cancelled midway".into());
        }
    }
}

/// The reduction an all-reduce applies; frames carry it, so that ranks that
/// disagree fail instead of ending with different buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Sum,
    Mean,
}

impl Op {
    fn code(self) -> u32 {
        match self {
            Op::Sum => 1,
            Op::Mean => 2,
        }
    }

    fn name_of(code: u32) -> String {
        match code {
            1 => "sum".into(),
            2 => "mean".into(),
            other => format!("unknown operation {other}"),
        }
    }
}

/// What a received frame does to this rank's copy of its segment.
#[derive(Debug, Clone, Copy)]
enum Combine {
    /// Reduce-scatter: add the partial sum into the local values.
    Add,
    /// All-gather: take the reduced values.
    Replace,
}

/// The two links of a ring that works.
struct Links {
    rank: usize,
    world: usize,
    io_timeout: Duration,
    /// Ring steps taken since setup.
    step: u64,
    to_right: Sender,
    from_left: Receiver,
}

impl Links {
    async fn all_reduce(&mut self, buf: &mut [f32], op: Op) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank, self.world);
        for step in reduce_scatter_steps(rank, world) {
            self.exchange(step, buf, op, Combine::Add).await?;
        }
        if op == Op::Mean {
            // Divided once, by the rank that owns the sum, so every rank gets the
            // same quotient.
            let divisor = world as f32;
            let owned = segment(buf.len(), world, reduced_segment(rank, world));
            for x in &mut buf[owned] {
                *x /= divisor;
            }
        }
        for step in all_gather_steps(rank, world) {
            self.exchange(step, buf, op, Combine::Replace).await?;
        }
        Ok(())
    }

    /// Runs one step: streams segment `step.send` to the right neighbour while
    /// segment `step.recv` streams in from the left one.
    async fn exchange(
        &mut self,
        step: Step,
        buf: &mut [f32],
        op: Op,
        combine: Combine,
    ) -> Result<(), CollectiveError> {
        let Links {
            world,
            io_timeout,
            step: step_no,
            to_right,
            from_left,
            ..
        } = self;
        let (world, io_timeout) = (*world, *io_timeout);
        let buf_len = buf.len();
        let header = |piece: &Range<usize>| Header {
            step: *step_no,
            buf_len: buf_len as u64,
            offset: piece.start as u64,
            len: u32::try_from(piece.len()).expect("a piece is at most a slot or a chunk"),
            op: op.code(),
        };
        let send = segment(buf_len, world, step.send);
        let recv = segment(buf_len, world, step.recv);
        let (src, dst) = split_disjoint(buf, send.clone(), recv.clone());

        let sending = async {
            for piece in pieces(send.clone(), to_right.chunk_elems) {
                let values = &src[piece.start - send.start..piece.end - send.start];
                to_right.send(&header(&piece), values, io_timeout).await?;
            }
            Ok(())
        };
        let receiving = async {
            for piece in pieces(recv.clone(), from_left.chunk_elems) {
                let values = &mut dst[piece.start - recv.start..piece.end - recv.start];
                from_left
                    .receive(&header(&piece), values, combine, io_timeout)
                    .await?;
            }
            Ok(())
        };
        tokio::try_join!(sending, receiving)?;
        *step_no += 1;
        Ok(())
    }
}

/// Returns the `send` range of `buf` to read and the `recv` range to write. The
/// schedule never sends and receives the same segment in one step, and segments
/// do not overlap.
fn split_disjoint(buf: &mut [f32], send: Range<usize>, recv: Range<usize>) -> (&[f32], &mut [f32]) {
    if send.end <= recv.start {
        let (head, tail) = buf.split_at_mut(recv.start);
        (&head[send], &mut tail[..recv.len()])
    } else {
        assert!(
            recv.end <= send.start,
            "a ring step sends {send:?} and receives {recv:?}, which overlap"
        );
        let (head, tail) = buf.split_at_mut(send.start);
        (&tail[..send.len()], &mut head[recv])
    }
}

// Frames carry f32s as little-endian bytes, which is the host's own layout: the
// values are sent and received in place, without an encoding pass.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "the ring sends f32 values in the host's byte order, which must be little-endian"
);

/// The sending end of the link to the right neighbour.
struct Sender {
    peer: usize,
    stream: TcpStream,
    /// Largest frame, in values: the lane's slot, or the TCP chunk.
    chunk_elems: usize,
    lane: Option<SendLane>,
}

/// A lane's sending side: the next slot to fill and how many filled slots the
/// receiver has not yet given back.
struct SendLane {
    lane: Lane,
    next: usize,
    in_flight: usize,
}

impl Sender {
    fn carrier(&self) -> Carrier {
        Carrier::of(self.lane.is_some())
    }

    /// Sends one frame: over TCP, the header and then the values' bytes straight
    /// from the buffer (one vectored write where the socket takes it); through a
    /// lane, the values into the next free slot and then the header.
    async fn send(
        &mut self,
        header: &Header,
        values: &[f32],
        io_timeout: Duration,
    ) -> Result<(), CollectiveError> {
        if let Some(lane) = &mut self.lane {
            return lane
                .send(&mut self.stream, self.peer, header, values, io_timeout)
                .await;
        }
        let head = header.encode();
        let payload: &[u8] = bytemuck::cast_slice(values);
        let stream = &mut self.stream;
        let write = async {
            let (mut head, mut payload) = (&head[..], payload);
            while !head.is_empty() || !payload.is_empty() {
                let parts = [std::io::IoSlice::new(head), std::io::IoSlice::new(payload)];
                let n = stream.write_vectored(&parts).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                let from_head = n.min(head.len());
                head = &head[from_head..];
                payload = &payload[n - from_head..];
            }
            Ok(())
        };
        let peer = self.peer;
        within(io_timeout, peer, LinkOp::Send, async {
            write
                .await
                .map_err(|err| link_error(peer, LinkOp::Send, err))
        })
        .await
    }
}

impl SendLane {
    /// Waits for a free slot (reading the credits the receiver sent back on
    /// `stream`), puts the values in it, and sends the header that hands it over.
    async fn send(
        &mut self,
        stream: &mut TcpStream,
        peer: usize,
        header: &Header,
        values: &[f32],
        io_timeout: Duration,
    ) -> Result<(), CollectiveError> {
        let slots = self.lane.slots();
        let step = async {
            while self.in_flight == slots {
                let mut credits = [0u8; MAX_SLOTS];
                // At most one credit per slot in flight can be due.
                let n = stream
                    .read(&mut credits[..self.in_flight])
                    .await
                    .map_err(|err| link_error(peer, LinkOp::Send, err))?;
                if n == 0 {
                    return Err(CollectiveError::PeerClosed {
                        peer,
                        op: LinkOp::Send,
                        how: "end of stream",
                    });
                }
                if let Some(bad) = credits[..n].iter().find(|&&byte| byte != CREDIT) {
                    return Err(CollectiveError::Protocol {
                        peer,
                        reason: format!("a lane credit of {bad:#04x}"),
                    });
                }
                self.in_flight -= n;
            }
            // SAFETY: the lane's one sender; with fewer than `slots` frames in
            // flight, slot `next` was given back by its credit (or never used), and
            // the receiver reads it only after the header sent next.
            #[allow(unsafe_code)]
            unsafe {
                self.lane.put(self.next, values)
            };
            stream
                .write_all(&header.encode())
                .await
                .map_err(|err| link_error(peer, LinkOp::Send, err))?;
            self.next = (self.next + 1) % slots;
            self.in_flight += 1;
            Ok(())
        };
        within(io_timeout, peer, LinkOp::Send, step).await
    }
}

/// The receiving end of the link from the left neighbour, with its scratch
/// buffer for values that arrive over TCP and are added rather than taken.
struct Receiver {
    peer: usize,
    stream: TcpStream,
    /// Largest frame, in values: the lane's slot, or the TCP chunk.
    chunk_elems: usize,
    scratch: Vec<f32>,
    lane: Option<RecvLane>,
}

/// A lane's receiving side: the slot the next frame is in.
struct RecvLane {
    lane: Lane,
    next: usize,
}

impl Receiver {
    fn carrier(&self) -> Carrier {
        Carrier::of(self.lane.is_some())
    }

    /// Reads the next frame, checks that its header is `expected`, and adds its
    /// values into `values` (reduce-scatter) or writes them over `values`
    /// (all-gather). Over TCP, added values land in scratch first and taken ones
    /// are read straight into place; through a lane both come out of their slot,
    /// which a credit then gives back.
    async fn receive(
        &mut self,
        expected: &Header,
        values: &mut [f32],
        combine: Combine,
        io_timeout: Duration,
    ) -> Result<(), CollectiveError> {
        let peer = self.peer;
        let Receiver {
            stream,
            lane,
            scratch,
            ..
        } = self;
        if let Some(lane) = lane {
            let step = async {
                read_header(stream, peer, expected).await?;
                // SAFETY: the lane's one receiver; the header of the frame in slot
                // `next` has arrived, and the sender writes the slot again only
                // after the credit sent below.
                #[allow(unsafe_code)]
                unsafe {
                    lane.lane
                        .take(lane.next, values, matches!(combine, Combine::Add))
                };
                lane.next = (lane.next + 1) % lane.lane.slots();
                stream
                    .write_all(&[CREDIT])
                    .await
                    .map_err(|err| link_error(peer, LinkOp::Receive, err))
            };
            return within(io_timeout, peer, LinkOp::Receive, step).await;
        }
        let into: &mut [f32] = match combine {
            Combine::Add => &mut scratch[..values.len()],
            Combine::Replace => values,
        };
        let read = async {
            read_header(stream, peer, expected).await?;
            stream
                .read_exact(bytemuck::cast_slice_mut(into))
                .await
                .map_err(|err| link_error(peer, LinkOp::Receive, err))
        };
        within(io_timeout, peer, LinkOp::Receive, read).await?;
        if let Combine::Add = combine {
            for (x, y) in values.iter_mut().zip(scratch.iter()) {
                *x += *y;
            }
        }
        Ok(())
    }
}

/// Reads a frame header from the left neighbour and checks that it is the one
/// `expected`.
async fn read_header(
    stream: &mut TcpStream,
    peer: usize,
    expected: &Header,
) -> Result<(), CollectiveError> {
    let mut head = [0u8; HEADER_BYTES];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|err| link_error(peer, LinkOp::Receive, err))?;
    match expected.mismatch(&Header::decode(&head)) {
        Some(reason) => Err(CollectiveError::Protocol { peer, reason }),
        None => Ok(()),
    }
}

/// Runs one frame's work on a link, failing with a timeout naming the peer when
/// it makes no progress for `io_timeout`.
async fn within<T>(
    io_timeout: Duration,
    peer: usize,
    op: LinkOp,
    work: impl std::future::Future<Output = Result<T, CollectiveError>>,
) -> Result<T, CollectiveError> {
    match tokio::time::timeout(io_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(CollectiveError::Timeout {
            peer,
            op,
            after: io_timeout,
        }),
    }
}

/// Maps an I/O error on a link to a closed connection when that is what it means.
fn link_error(peer: usize, op: LinkOp, err: std::io::Error) -> CollectiveError {
    use std::io::ErrorKind;
    let how = match err.kind() {
        ErrorKind::UnexpectedEof => "end of stream",
        ErrorKind::ConnectionReset => "connection reset",
        ErrorKind::ConnectionAborted => "connection aborted",
        ErrorKind::BrokenPipe => "broken pipe",
        _ => {
            return CollectiveError::Io {
                peer,
                op,
                source: err,
            }
        }
    };
    CollectiveError::PeerClosed { peer, op, how }
}

/// The header of a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    /// Ring steps the sender had taken since setup.
    step: u64,
    /// Elements in the sender's whole buffer.
    buf_len: u64,
    /// Position of the frame's first element in the buffer.
    offset: u64,
    /// Elements in the frame.
    len: u32,
    op: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..8].copy_from_slice(&self.step.to_le_bytes());
        out[8..16].copy_from_slice(&self.buf_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..32].copy_from_slice(&self.op.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HEADER_BYTES]) -> Header {
        Header {
            step: u64_at(bytes, 0),
            buf_len: u64_at(bytes, 8),
            offset: u64_at(bytes, 16),
            len: u32_at(bytes, 24),
            op: u32_at(bytes, 28),
        }
    }

    /// Returns how the received header `got` differs from this expected one, the
    /// most telling difference first.
    fn mismatch(&self, got: &Header) -> Option<String> {
        if got.step != self.step {
            Some(format!(
                "out of step: it sent ring step {}, this rank is at step {}",
                got.step, self.step
            ))
        } else if got.op != self.op {
            Some(format!(
                "it runs a {} all-reduce, this rank a {}",
                Op::name_of(got.op),
                Op::name_of(self.op)
            ))
        } else if got.buf_len != self.buf_len {
            Some(format!(
                "it reduces a buffer of {} elements, this rank one of {}",
                got.buf_len, self.buf_len
            ))
        } else if got.offset != self.offset || got.len != self.len {
            Some(format!(
                "it sent elements {}..{}, this rank expected {}..{}",
                got.offset,
                got.offset.saturating_add(u64::from(got.len)),
                self.offset,
                self.offset + u64::from(self.len)
            ))
        } else {
            None
        }
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(le)
}

/// The first message on a link, from the connecting rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    version: u32,
    session_id: u64,
    world: u32,
    from: u32,
    to: u32,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..20].copy_from_slice(&self.session_id.to_le_bytes());
        out[20..24].copy_from_slice(&self.world.to_le_bytes());
        out[24..28].copy_from_slice(&self.from.to_le_bytes());
        out[28..32].copy_from_slice(&self.to.to_le_bytes());
        out
    }

    /// Returns `None` when the bytes are not a ring hello at all.
    fn decode(bytes: &[u8; HELLO_BYTES]) -> Option<Hello> {
        (bytes[0..8] == MAGIC).then(|| Hello {
            version: u32_at(bytes, 8),
            session_id: u64_at(bytes, 12),
            world: u32_at(bytes, 20),
            from: u32_at(bytes, 24),
            to: u32_at(bytes, 28),
        })
    }
}

/// The listener's answer to a hello, with its own identity so that a refused rank
/// can say what it ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reply {
    version: u32,
    verdict: Verdict,
    session_id: u64,
    world: u32,
    rank: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accepted,
    WrongVersion,
    WrongSession,
    WrongWorld,
    WrongRank,
    /// The connecting rank's proof of the ring key was wrong.
    WrongKey,
    /// A code this version does not know.
    Unknown(u32),
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Accepted => 0,
            Verdict::WrongVersion => 1,
            Verdict::WrongSession => 2,
            Verdict::WrongWorld => 3,
            Verdict::WrongRank => 4,
            Verdict::WrongKey => 5,
            Verdict::Unknown(code) => code,
        }
    }

    fn from_code(code: u32) -> Verdict {
        match code {
            0 => Verdict::Accepted,
            1 => Verdict::WrongVersion,
            2 => Verdict::WrongSession,
            3 => Verdict::WrongWorld,
            4 => Verdict::WrongRank,
            5 => Verdict::WrongKey,
            other => Verdict::Unknown(other),
        }
    }
}

impl Reply {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&self.verdict.code().to_le_bytes());
        out[16..24].copy_from_slice(&self.session_id.to_le_bytes());
        out[24..28].copy_from_slice(&self.world.to_le_bytes());
        out[28..32].copy_from_slice(&self.rank.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HELLO_BYTES]) -> Option<Reply> {
        (bytes[0..8] == MAGIC).then(|| Reply {
            version: u32_at(bytes, 8),
            verdict: Verdict::from_code(u32_at(bytes, 12)),
            session_id: u64_at(bytes, 16),
            world: u32_at(bytes, 24),
            rank: u32_at(bytes, 28),
        })
    }
}

/// Who a rank is, as its hello and reply tell it.
#[derive(Debug, Clone, Copy)]
struct Identity {
    session_id: u64,
    key: RingKey,
    world: u32,
    rank: u32,
}

impl Identity {
    fn of(config: &RingConfig) -> Identity {
        Identity {
            session_id: config.session_id,
            key: config.key,
            world: u32::try_from(config.addrs.len()).expect("validated: the world fits u32"),
            rank: u32::try_from(config.rank).expect("validated: the rank is below the world"),
        }
    }

    fn left(&self) -> u32 {
        (self.rank + self.world - 1) % self.world
    }

    /// Judges a hello this rank's listener received; a refusal comes with the
    /// reason this rank logs.
    fn judge(&self, hello: &Hello) -> (Verdict, Option<String>) {
        if hello.version != VERSION {
            let reason = format!(
                "protocol version {} from rank {}; this rank speaks {VERSION}",
                hello.version, hello.from
            );
            (Verdict::WrongVersion, Some(reason))
        } else if hello.session_id != self.session_id {
            let reason = format!(
                "session {} from rank {}; this ring is session {}",
                hello.session_id, hello.from, self.session_id
            );
            (Verdict::WrongSession, Some(reason))
        } else if hello.world != self.world {
            let reason = format!(
                "a world of {} from rank {}; this ring has {}",
                hello.world, hello.from, self.world
            );
            (Verdict::WrongWorld, Some(reason))
        } else if hello.to != self.rank || hello.from != self.left() {
            let reason = format!(
                "rank {} meant to reach rank {}; this is rank {}, expecting rank {}",
                hello.from,
                hello.to,
                self.rank,
                self.left()
            );
            (Verdict::WrongRank, Some(reason))
        } else {
            (Verdict::Accepted, None)
        }
    }

    /// Returns why the listener that sent `reply` refused this rank, as this rank
    /// reports it; `None` when it accepted this rank and is who it should be.
    fn refusal(&self, reply: &Reply, expected_peer: u32) -> Option<String> {
        match reply.verdict {
            Verdict::Accepted
                if reply.session_id == self.session_id
                    && reply.world == self.world
                    && reply.rank == expected_peer =>
            {
                None
            }
            Verdict::Accepted => Some(format!(
                "it accepted, but as rank {} of {} in session {}",
                reply.rank, reply.world, reply.session_id
            )),
            Verdict::WrongVersion => Some(format!(
                "it speaks protocol version {}, this rank {VERSION}",
                reply.version
            )),
            Verdict::WrongSession => Some(format!(
                "it belongs to session {}, this rank to session {}",
                reply.session_id, self.session_id
            )),
            Verdict::WrongWorld => Some(format!(
                "its world has {} ranks, this rank's has {}",
                reply.world, self.world
            )),
            Verdict::WrongRank => {
                // From the wire: no overflow or division by zero on odd values.
                let world = u64::from(reply.world.max(1));
                let expects = (u64::from(reply.rank) + world - 1) % world;
                Some(format!(
                    "it is rank {} and expects rank {expects}, not rank {}",
                    reply.rank, self.rank
                ))
            }
            Verdict::WrongKey => Some(
                "it refused this rank's proof of the ring key: the two were given \
                 different keys (another job or attempt, or not a kiln shard)"
                    .into(),
            ),
            Verdict::Unknown(code) => Some(format!("unknown verdict {code}")),
        }
    }
}

/// Returns the pause after failed connection attempt number `attempt` (from 0):
/// 20 ms doubling up to 1 s.
fn connect_backoff(attempt: u32) -> Duration {
    (CONNECT_BACKOFF_INITIAL * (1u32 << attempt.min(16))).min(CONNECT_BACKOFF_MAX)
}

/// Connects to the right neighbour and has it accept this rank, retrying while it
/// is not listening yet.
async fn connect_right(
    config: &RingConfig,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let me = Identity::of(config);
    let peer = right_of(config.rank, config.addrs.len());
    let addr = config.addrs[peer].as_str();
    let setup_error = |reason: String| CollectiveError::Setup {
        peer,
        addr: addr.to_string(),
        reason,
    };
    let started = Instant::now();
    let mut attempt = 0;
    let mut stream = loop {
        let err = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => break stream,
            Ok(Err(err)) => err,
            Err(_) => {
                return Err(setup_error(format!(
                    "connect did not complete within the setup timeout ({} ms)",
                    config.setup_timeout.as_millis()
                )))
            }
        };
        let pause = connect_backoff(attempt);
        attempt += 1;
        if Instant::now() + pause >= deadline {
            return Err(setup_error(format!(
                "not reachable after {attempt} attempts in {} ms: {err}",
                started.elapsed().as_millis()
            )));
        }
        tracing::debug!(peer, addr, attempt, error = %err, "right neighbour not reachable yet");
        tokio::time::sleep(pause).await;
    };
    stream
        .set_nodelay(true)
        .map_err(|err| setup_error(format!("set TCP_NODELAY: {err}")))?;
    let hello = Hello {
        version: VERSION,
        session_id: me.session_id,
        world: me.world,
        from: me.rank,
        to: u32::try_from(peer).expect("validated: ranks fit u32"),
    };
    let refused = |reason: String| CollectiveError::Refused {
        peer,
        addr: addr.to_string(),
        reason,
    };
    let handshake = async {
        stream
            .write_all(&hello.encode())
            .await
            .map_err(|err| setup_error(format!("handshake: {err}")))?;
        let reply = read_reply(&mut stream).await.map_err(&setup_error)?;
        if let Some(reason) = me.refusal(&reply, hello.to) {
            return Err(refused(reason));
        }
        // Accepted so far: the listener's nonce, then this rank's nonce and proof,
        // then the listener's verdict on it and its own proof.
        let connector: [u8; 32] = rand::random();
        let proof = async {
            let mut listener = [0u8; 32];
            stream.read_exact(&mut listener).await?;
            let mine = me.key.proof(CONNECTOR, &hello, &listener, &connector);
            let mut message = [0u8; 64];
            message[..32].copy_from_slice(&connector);
            message[32..].copy_from_slice(mine.as_bytes());
            stream.write_all(&message).await?;
            Ok::<_, std::io::Error>(listener)
        };
        let listener = proof
            .await
            .map_err(|err| setup_error(format!("key proof: {err}")))?;
        let verdict = read_reply(&mut stream).await.map_err(&setup_error)?;
        if let Some(reason) = me.refusal(&verdict, hello.to) {
            return Err(refused(reason));
        }
        let mut theirs = [0u8; 32];
        stream
            .read_exact(&mut theirs)
            .await
            .map_err(|err| setup_error(format!("key proof: {err}")))?;
        // blake3::Hash compares in constant time.
        if blake3::Hash::from(theirs) != me.key.proof(LISTENER, &hello, &listener, &connector) {
            return Err(refused(
                "its proof of the ring key is wrong: it was given another key \
                 (another job or attempt, or not a kiln shard)"
                    .into(),
            ));
        }
        Ok(())
    };
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(setup_error(
            "the handshake did not complete within the setup timeout".into(),
        )),
    }
}

/// Reads a listener's 32-byte reply.
async fn read_reply(stream: &mut TcpStream) -> Result<Reply, String> {
    let mut bytes = [0u8; HELLO_BYTES];
    stream
        .read_exact(&mut bytes)
        .await
        .map_err(|err| format!("handshake: {err}"))?;
    Reply::decode(&bytes)
        .ok_or_else(|| "it answered with something other than a ring handshake".into())
}

/// Accepts the left neighbour on `listener`, refusing any other connection and
/// waiting on.
async fn accept_left(
    listener: &TcpListener,
    config: &RingConfig,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let me = Identity::of(config);
    let peer = left_of(config.rank, config.addrs.len());
    let mut last_problem: Option<String> = None;
    loop {
        let (mut stream, from) = match tokio::time::timeout_at(deadline, listener.accept()).await {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "accept a ring connection");
                last_problem = Some(format!("accept: {err}"));
                tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                continue;
            }
            Err(_) => {
                let problem =
                    last_problem.map_or(String::new(), |p| format!("; last problem: {p}"));
                return Err(setup_failed(
                    config,
                    peer,
                    format!(
                        "it did not connect within the setup timeout ({} ms){problem}",
                        config.setup_timeout.as_millis()
                    ),
                ));
            }
        };
        match within_handshake(deadline, "no hello in time", admit(&mut stream, &me)).await {
            Ok(()) => {
                return match stream.set_nodelay(true) {
                    Ok(()) => Ok(stream),
                    Err(err) => Err(setup_failed(
                        config,
                        peer,
                        format!("set TCP_NODELAY: {err}"),
                    )),
                };
            }
            Err(reason) => {
                tracing::warn!(%from, %reason, "refused a ring connection");
                last_problem = Some(format!("refused {from}: {reason}"));
            }
        }
    }
}

/// Runs one exchange of a link's setup, bounded by [`HANDSHAKE_TIMEOUT`] and the
/// setup deadline; `late` says what did not come in time.
async fn within_handshake<T>(
    deadline: Instant,
    late: &str,
    exchange: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let bound = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
    tokio::time::timeout_at(bound, exchange)
        .await
        .unwrap_or_else(|_| Err(late.to_string()))
}

/// A failed setup of the link with rank `peer`.
fn setup_failed(config: &RingConfig, peer: usize, reason: String) -> CollectiveError {
    CollectiveError::Setup {
        peer,
        addr: config.addrs[peer].clone(),
        reason,
    }
}

/// Reads a hello and answers it; returns why when the connection is refused.
async fn admit(stream: &mut TcpStream, me: &Identity) -> Result<(), String> {
    let mut bytes = [0u8; HELLO_BYTES];
    stream
        .read_exact(&mut bytes)
        .await
        .map_err(|err| format!("read hello: {err}"))?;
    let Some(hello) = Hello::decode(&bytes) else {
        // Not a ring peer: answering in this protocol would mean nothing to it.
        return Err("not a ring handshake".into());
    };
    let (verdict, reason) = me.judge(&hello);
    let reply = |verdict| Reply {
        version: VERSION,
        verdict,
        session_id: me.session_id,
        world: me.world,
        rank: me.rank,
    };
    let send_failed = |err: std::io::Error| format!("send verdict: {err}");
    stream
        .write_all(&reply(verdict).encode())
        .await
        .map_err(send_failed)?;
    if let Some(reason) = reason {
        return Err(reason);
    }
    // The key proofs: this rank's nonce out, the connector's nonce and proof in.
    let listener: [u8; 32] = rand::random();
    stream.write_all(&listener).await.map_err(send_failed)?;
    let mut message = [0u8; 64];
    stream
        .read_exact(&mut message)
        .await
        .map_err(|err| format!("read key proof: {err}"))?;
    let connector: [u8; 32] = message[..32].try_into().expect("32 bytes");
    let theirs: [u8; 32] = message[32..].try_into().expect("32 bytes");
    // blake3::Hash compares in constant time.
    if blake3::Hash::from(theirs) != me.key.proof(CONNECTOR, &hello, &listener, &connector) {
        stream
            .write_all(&reply(Verdict::WrongKey).encode())
            .await
            .map_err(send_failed)?;
        return Err(format!(
            "rank {} holds another ring key (another job or attempt, or not a kiln shard)",
            hello.from
        ));
    }
    let mine = me.key.proof(LISTENER, &hello, &listener, &connector);
    let mut answer = [0u8; HELLO_BYTES + 32];
    answer[..HELLO_BYTES].copy_from_slice(&reply(Verdict::Accepted).encode());
    answer[HELLO_BYTES..].copy_from_slice(mine.as_bytes());
    stream.write_all(&answer).await.map_err(send_failed)?;
    Ok(())
}

/// The connector's side of the lane exchange, once the right neighbour has
/// accepted this rank: offers it a new lane (or none, when lanes are off or none
/// can be made here) and returns the lane if the neighbour mapped it. The lane's
/// file is unlinked before this returns, mapped or not.
async fn offer_lane(
    stream: &mut TcpStream,
    config: &RingConfig,
    deadline: Instant,
) -> Result<Option<Lane>, CollectiveError> {
    let peer = right_of(config.rank, config.addrs.len());
    let made = config
        .lanes
        .as_ref()
        .and_then(|lanes| match Lane::create(lanes) {
            Ok(made) => Some(made),
            Err(err) => {
                tracing::info!(peer, dir = %lanes.dir.display(), error = %err,
                    "no shared-memory lane to the right neighbour; frames go over TCP");
                None
            }
        });
    // `made` moves in: its file is unlinked when the exchange ends, however.
    let exchange = async {
        let offer = made.as_ref().map(|(_, offer, _)| offer);
        let failed = |err: std::io::Error| format!("lane offer: {err}");
        stream
            .write_all(&Offer::encode(offer))
            .await
            .map_err(failed)?;
        let mut answer = [0u8; ANSWER_BYTES];
        stream.read_exact(&mut answer).await.map_err(failed)?;
        match (made, u32::from_le_bytes(answer)) {
            (Some((lane, _, _unlink)), 1) => Ok(Some(lane)),
            (_, 0) => Ok(None),
            (None, 1) => Err("it mapped a lane it was not offered".into()),
            (_, other) => Err(format!("it answered the lane offer with {other}")),
        }
    };
    within_handshake(deadline, "lane offer: no answer in time", exchange)
        .await
        .map_err(|reason| setup_failed(config, peer, reason))
}

/// The listener's side of the lane exchange: maps the lane the left neighbour
/// offers when this rank uses lanes and the file is there (on another host it
/// is not), and answers.
async fn take_lane(
    stream: &mut TcpStream,
    config: &RingConfig,
    deadline: Instant,
) -> Result<Option<Lane>, CollectiveError> {
    let peer = left_of(config.rank, config.addrs.len());
    let exchange = async {
        let mut bytes = [0u8; OFFER_BYTES];
        stream
            .read_exact(&mut bytes)
            .await
            .map_err(|err| format!("lane offer: {err}"))?;
        let offer = Offer::decode(&bytes).map_err(|reason| format!("lane offer: {reason}"))?;
        let lane = match (offer, &config.lanes) {
            (Some(offer), Some(lanes)) => match Lane::open(&lanes.dir, &offer) {
                Ok(lane) => Some(lane),
                Err(reason) => {
                    tracing::info!(peer, %reason,
                        "declined the left neighbour's shared-memory lane; frames come over TCP");
                    None
                }
            },
            _ => None,
        };
        let answer = u32::from(lane.is_some());
        stream
            .write_all(&answer.to_le_bytes())
            .await
            .map_err(|err| format!("lane answer: {err}"))?;
        Ok(lane)
    };
    within_handshake(deadline, "no lane offer in time", exchange)
        .await
        .map_err(|reason| setup_failed(config, peer, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    const SESSION: u64 = 0x6b69_6c6e;
    const TEST_KEY: RingKey = RingKey([7; 32]);

    /// Binds `world` loopback listeners and returns them with their addresses.
    async fn bind_loopback(world: usize) -> (Vec<TcpListener>, Vec<String>) {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..world {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("addr").to_string());
            listeners.push(listener);
        }
        (listeners, addrs)
    }

    fn test_config(rank: usize, addrs: &[String]) -> RingConfig {
        RingConfig {
            setup_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(2),
            ..RingConfig::new(SESSION, TEST_KEY, rank, addrs.to_vec())
        }
    }

    /// Links a ring of `world` ranks on loopback, all ranks at once.
    async fn ring_of(world: usize, tweak: impl Fn(&mut RingConfig)) -> Vec<Ring> {
        let (listeners, addrs) = bind_loopback(world).await;
        let connecting: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let mut config = test_config(rank, &addrs);
                tweak(&mut config);
                tokio::spawn(Ring::connect(listener, config))
            })
            .collect();
        let mut rings = Vec::new();
        for task in connecting {
            rings.push(task.await.expect("join").expect("link the ring"));
        }
        rings
    }

    type Outcome = (Ring, Result<Vec<f32>, CollectiveError>);

    /// Runs an all-reduce on every rank at once, each on its own task.
    async fn reduce_on_all(rings: Vec<Ring>, bufs: Vec<Vec<f32>>, op: Op) -> Vec<Outcome> {
        let tasks: Vec<_> = rings
            .into_iter()
            .zip(bufs)
            .map(|(mut ring, mut buf)| {
                tokio::spawn(async move {
                    let result = ring.all_reduce(&mut buf, op).await.map(|()| buf);
                    (ring, result)
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("join"));
        }
        outcomes
    }

    /// Runs an all-reduce that must succeed on every rank; returns the rings and
    /// the buffers.
    async fn reduce_ok(
        rings: Vec<Ring>,
        bufs: Vec<Vec<f32>>,
        op: Op,
    ) -> (Vec<Ring>, Vec<Vec<f32>>) {
        reduce_on_all(rings, bufs, op)
            .await
            .into_iter()
            .map(|(ring, result)| {
                let rank = ring.rank();
                (ring, result.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
            })
            .unzip()
    }

    /// Returns a value in [0.5, 1.5) with 24 random bits, different per rank and
    /// position, so that a sum depends on the order it is taken in.
    fn value(rank: usize, i: usize, round: usize) -> f32 {
        let mut x = ((rank as u64) << 48) ^ ((round as u64) << 32) ^ i as u64;
        x = x
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 29;
        0.5 + (x >> 40) as f32 / (1u64 << 24) as f32
    }

    fn inputs(world: usize, len: usize, round: usize) -> Vec<Vec<f32>> {
        (0..world)
            .map(|rank| (0..len).map(|i| value(rank, i, round)).collect())
            .collect()
    }

    /// Checks that every rank holds the same bits and that they are the mean (or
    /// sum) of the inputs within f32 rounding.
    fn check(outputs: &[Vec<f32>], len: usize, round: usize, op: Op, what: &str) {
        let world = outputs.len();
        for (rank, out) in outputs.iter().enumerate() {
            assert_eq!(out.len(), len, "{what}: rank {rank}");
            if let Some(i) = (0..len).find(|&i| out[i].to_bits() != outputs[0][i].to_bits()) {
                panic!(
                    "{what}: rank {rank} differs from rank 0 at {i}: {} vs {}",
                    out[i], outputs[0][i]
                );
            }
        }
        for (i, &got) in outputs[0].iter().enumerate() {
            let sum: f64 = (0..world)
                .map(|rank| f64::from(value(rank, i, round)))
                .sum();
            let expected = if op == Op::Mean {
                sum / world as f64
            } else {
                sum
            };
            assert!(
                (f64::from(got) - expected).abs() <= 1e-6 * expected,
                "{what}: element {i} is {got}, expected {expected}"
            );
        }
    }

    /// Lanes of two one-page slots: every call wraps around them many times.
    fn small_slots(config: &mut RingConfig) {
        if let Some(lanes) = config.lanes.as_mut() {
            lanes.slots = 2;
            lanes.slot_bytes = 4096;
        }
    }

    /// A ring of `world` ranks, changed by `tweak`, whose every link uses
    /// `carrier` (lanes in a directory of the test's own, so that the host's
    /// /dev/shm does not matter); checked.
    async fn ring_over(
        world: usize,
        carrier: Carrier,
        tweak: impl Fn(&mut RingConfig),
    ) -> Vec<Ring> {
        let dir = tempfile::tempdir().expect("dir");
        let rings = ring_of(world, |config| {
            config.lanes = match carrier {
                Carrier::Tcp => None,
                Carrier::Lane => Some(LaneConfig {
                    dir: dir.path().to_path_buf(),
                    ..LaneConfig::default()
                }),
            };
            tweak(config);
        })
        .await;
        if world > 1 {
            assert_eq!(carriers(&rings), vec![(carrier, carrier); world]);
        }
        rings
    }

    /// The carrier of both links of every rank.
    fn carriers(rings: &[Ring]) -> Vec<(Carrier, Carrier)> {
        rings
            .iter()
            .map(|ring| ring.carriers().expect("linked"))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mean_is_right_and_bit_identical_on_every_rank() {
        for carrier in [Carrier::Tcp, Carrier::Lane] {
            for world in 1..=4 {
                let mut rings = ring_over(world, carrier, |_| {}).await;
                for len in [0, 1, world - 1, 1000, 1_000_003] {
                    let (next, outputs) = reduce_ok(rings, inputs(world, len, 0), Op::Mean).await;
                    rings = next;
                    check(
                        &outputs,
                        len,
                        0,
                        Op::Mean,
                        &format!("{carrier}: world {world}, len {len}"),
                    );
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranks_on_one_host_share_lanes_and_leave_no_file_behind() {
        const WORLD: usize = 3;
        let dir = tempfile::tempdir().expect("dir");
        let shared = dir.path().to_path_buf();
        let mut rings = ring_of(WORLD, |config| {
            if let Some(lanes) = config.lanes.as_mut() {
                lanes.dir = shared.clone();
            }
            small_slots(config);
        })
        .await;
        assert_eq!(
            carriers(&rings),
            vec![(Carrier::Lane, Carrier::Lane); WORLD]
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert!(left.is_empty(), "lane files left: {left:?}");
        // 1,024 values a slot: hundreds of frames a step around two slots.
        for (round, len) in [100_003, 7, 0, 300_000].into_iter().enumerate() {
            let op = if round % 2 == 0 { Op::Mean } else { Op::Sum };
            let (next, outputs) = reduce_ok(rings, inputs(WORLD, len, round), op).await;
            rings = next;
            check(&outputs, len, round, op, &format!("round {round}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn links_whose_ends_share_no_tmpfs_carry_frames_over_tcp() {
        // Ranks 0 and 1 share a directory, rank 2 has its own (another host, as
        // far as lanes go), rank 3 has lanes off.
        const WORLD: usize = 4;
        let one_host = tempfile::tempdir().expect("dir");
        let another = tempfile::tempdir().expect("dir");
        let dirs = [one_host.path(), one_host.path(), another.path()];
        let mut rings = ring_of(WORLD, |config| {
            match dirs.get(config.rank) {
                Some(dir) => config.lanes.as_mut().expect("on").dir = dir.to_path_buf(),
                None => config.lanes = None,
            }
            small_slots(config);
        })
        .await;
        use Carrier::{Lane, Tcp};
        assert_eq!(
            carriers(&rings),
            [(Lane, Tcp), (Tcp, Lane), (Tcp, Tcp), (Tcp, Tcp)]
        );
        for dir in [one_host.path(), another.path()] {
            let left: Vec<_> = std::fs::read_dir(dir).expect("list").collect();
            assert!(left.is_empty(), "lane files left: {left:?}");
        }
        // Lane frames (a page) and TCP frames (256 KiB) in one ring.
        for round in 0..3 {
            let len = 500_000 + round;
            let (next, outputs) = reduce_ok(rings, inputs(WORLD, len, round), Op::Mean).await;
            rings = next;
            check(&outputs, len, round, Op::Mean, &format!("round {round}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_buffer_streams_through_three_ranks() {
        const WORLD: usize = 3;
        const LEN: usize = 16 << 20;
        let rings = ring_of(WORLD, |_| {}).await;
        let bufs = inputs(WORLD, LEN, 0);
        let started = StdInstant::now();
        let (_rings, outputs) = reduce_ok(rings, bufs, Op::Mean).await;
        let elapsed = started.elapsed();
        let bytes = (LEN * F32_BYTES) as f64;
        let algbw = bytes / elapsed.as_secs_f64() / 1e9;
        let busbw = algbw * 2.0 * (WORLD - 1) as f64 / WORLD as f64;
        println!(
            "all-reduce of {} MiB over {WORLD} ranks on loopback: {:.1} ms, algbw {algbw:.2} GB/s, busbw {busbw:.2} GB/s",
            (LEN * F32_BYTES) >> 20,
            elapsed.as_secs_f64() * 1e3
        );
        check(&outputs, LEN, 0, Op::Mean, "16M floats");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_calls_stay_in_step() {
        const WORLD: usize = 3;
        // Tiny frames over TCP, many frames around small lanes; empty segments in
        // the short rounds.
        for carrier in [Carrier::Tcp, Carrier::Lane] {
            let mut rings = ring_over(WORLD, carrier, |config| {
                config.chunk_bytes = 64;
                small_slots(config);
            })
            .await;
            for round in 0..50 {
                let len = (round * 37) % 200 + (round % 3) * 1500;
                let op = if round % 2 == 0 { Op::Mean } else { Op::Sum };
                let (next, outputs) = reduce_ok(rings, inputs(WORLD, len, round), op).await;
                rings = next;
                check(&outputs, len, round, op, &format!("round {round}"));
            }
            let steps = 50 * 2 * (WORLD as u64 - 1);
            for ring in &rings {
                assert_eq!(ring.links.as_ref().map(|links| links.step), Some(steps));
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_killed_midway_fails_the_others_within_the_timeout() {
        a_peer_killed_midway(Carrier::Tcp).await;
        a_peer_killed_midway(Carrier::Lane).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_peer_fails_the_others_within_the_timeout() {
        a_stalled_peer(Carrier::Tcp).await;
        a_stalled_peer(Carrier::Lane).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rank_later_than_the_handshake_timeout_still_links() {
        // Rank 3 comes 6 s late (still loading its data): its neighbours' other
        // links settle their lanes meanwhile instead of giving up on them.
        const WORLD: usize = 4;
        let (listeners, addrs) = bind_loopback(WORLD).await;
        let tasks: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let config = test_config(rank, &addrs);
                tokio::spawn(async move {
                    if rank == WORLD - 1 {
                        tokio::time::sleep(HANDSHAKE_TIMEOUT + Duration::from_secs(1)).await;
                    }
                    Ring::connect(listener, config).await
                })
            })
            .collect();
        let mut rings = Vec::new();
        for task in tasks {
            rings.push(task.await.expect("join").expect("linked"));
        }
        let (_, outputs) = reduce_ok(rings, inputs(WORLD, 1000, 0), Op::Mean).await;
        check(&outputs, 1000, 0, Op::Mean, "a late rank");
    }

    #[tokio::test]
    async fn a_lane_sender_waits_for_credits_and_refuses_a_bad_one() {
        let dir = tempfile::tempdir().expect("dir");
        let (lane, _offer, _unlink) = Lane::create(&LaneConfig {
            dir: dir.path().to_path_buf(),
            slots: 2,
            slot_bytes: 4096,
        })
        .expect("lane");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (near, mut far) = (near.expect("connect"), far.expect("accept").0);
        let mut sender = Sender {
            peer: 1,
            stream: near,
            chunk_elems: lane.slot_elems(),
            lane: Some(SendLane {
                lane,
                next: 0,
                in_flight: 0,
            }),
        };
        let header = |step| Header {
            step,
            buf_len: 10,
            offset: 0,
            len: 1,
            op: Op::Sum.code(),
        };
        let wait = Duration::from_millis(300);
        // Two slots: two frames go at once; the third waits for a credit.
        sender.send(&header(0), &[1.0], wait).await.expect("slot 0");
        sender.send(&header(1), &[2.0], wait).await.expect("slot 1");
        let err = sender
            .send(&header(2), &[3.0], wait)
            .await
            .expect_err("no credit came");
        assert_eq!(err.to_string(), "send to rank 1: no progress in 300 ms");
        far.write_all(&[CREDIT]).await.expect("credit");
        sender
            .send(&header(2), &[3.0], wait)
            .await
            .expect("slot 0 again");
        let mut heads = [0u8; 3 * HEADER_BYTES];
        far.read_exact(&mut heads).await.expect("headers");
        let steps: Vec<u64> = heads
            .chunks(HEADER_BYTES)
            .map(|h| Header::decode(h.try_into().expect("32 bytes")).step)
            .collect();
        assert_eq!(steps, [0, 1, 2]);
        far.write_all(&[0]).await.expect("a bad credit");
        let err = sender
            .send(&header(3), &[4.0], wait)
            .await
            .expect_err("bad credit");
        assert_eq!(
            err.to_string(),
            "receive from rank 1: a lane credit of 0x00"
        );
        drop(far);
        let err = sender
            .send(&header(4), &[5.0], wait)
            .await
            .expect_err("the receiver is gone");
        assert!(
            matches!(err, CollectiveError::PeerClosed { peer: 1, .. }),
            "{err}"
        );
    }

    async fn a_peer_killed_midway(carrier: Carrier) {
        // Large enough that no rank finishes within the 5 ms before the cut.
        const LEN: usize = 16 << 20;
        let mut rings = ring_over(3, carrier, |_| {}).await;
        let mut victim = rings.pop().expect("rank 2");
        let started = StdInstant::now();
        let survivors = tokio::spawn(reduce_on_all(rings, inputs(2, LEN, 0), Op::Mean));
        let mut buf = vec![1.0; LEN];
        // Rank 2's call is cancelled midway (its shard is killed); its `Ring`
        // lives on, but the cancelled call closed the links.
        let cut = tokio::time::timeout(Duration::from_millis(5), victim.all_reduce_mean(&mut buf));
        assert!(cut.await.is_err(), "the victim finished before it was cut");

        let outcomes = survivors.await.expect("join");
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        let errors: Vec<&CollectiveError> = outcomes
            .iter()
            .map(|(_, result)| result.as_ref().expect_err("a peer is gone"))
            .collect();
        // Closed links, not the 2 s I/O timeout: the victim's ring closed them
        // when its call was cancelled, though the ring itself is still alive.
        for err in &errors {
            assert!(matches!(err, CollectiveError::PeerClosed { .. }), "{err}");
        }
        // Both survivors are rank 2's neighbours; the first to notice names it,
        // the other may see that survivor close its links first.
        assert!(errors.iter().any(|err| err.peer() == Some(2)), "{errors:?}");

        // The links are out of step: the victim's ring refuses to go on.
        let err = victim
            .all_reduce_mean(&mut buf)
            .await
            .expect_err("poisoned");
        assert_eq!(
            err.to_string(),
            "the communicator failed earlier and cannot be used again: \
             an earlier all-reduce was cancelled midway"
        );
    }

    async fn a_stalled_peer(carrier: Carrier) {
        // Rank 1 waits longer than rank 0, so that it hears of rank 0's failure
        // before its own timer could fire.
        let mut rings = ring_over(3, carrier, |config| {
            config.io_timeout = Duration::from_secs(if config.rank == 0 { 1 } else { 10 })
        })
        .await;
        // Rank 2 stays linked but never calls.
        let _stalled = rings.pop().expect("rank 2");
        let started = StdInstant::now();
        let outcomes = reduce_on_all(rings, inputs(2, 1000, 0), Op::Mean).await;
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
        let mut outcomes = outcomes.into_iter();
        let (mut rank0, result) = outcomes.next().expect("rank 0");
        let err = result.expect_err("rank 2 sent nothing");
        assert!(
            matches!(
                err,
                CollectiveError::Timeout {
                    peer: 2,
                    op: LinkOp::Receive,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "receive from rank 2: no progress in 1000 ms"
        );
        // Rank 0 closed its links on failure, so rank 1 did not wait for its own
        // timeout.
        let (_, result) = outcomes.next().expect("rank 1");
        let err = result.expect_err("rank 0 closed its links");
        assert!(
            matches!(err, CollectiveError::PeerClosed { peer: 0, .. }),
            "{err}"
        );

        let err = rank0
            .all_reduce_mean(&mut [1.0])
            .await
            .expect_err("poisoned");
        assert_eq!(
            err.to_string(),
            "the communicator failed earlier and cannot be used again: \
             receive from rank 2: no progress in 1000 ms"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranks_that_disagree_on_the_buffer_fail_instead_of_misreading() {
        let rings = ring_of(2, |_| {}).await;
        let outcomes = reduce_on_all(rings, vec![vec![1.0; 10], vec![1.0; 12]], Op::Mean).await;
        for (ring, result) in &outcomes {
            let err = result.as_ref().expect_err("lengths differ");
            assert!(matches!(err, CollectiveError::Protocol { .. }), "{err}");
            let (theirs, ours) = if ring.rank() == 0 { (12, 10) } else { (10, 12) };
            assert_eq!(
                err.to_string(),
                format!(
                    "receive from rank {}: it reduces a buffer of {theirs} elements, this rank one of {ours}",
                    1 - ring.rank()
                )
            );
        }

        let rings = ring_of(2, |_| {}).await;
        let mut outcomes = Vec::new();
        let mut tasks = Vec::new();
        for (mut ring, sum) in rings.into_iter().zip([true, false]) {
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![1.0; 4];
                if sum {
                    ring.all_reduce_sum(&mut buf).await
                } else {
                    ring.all_reduce_mean(&mut buf).await
                }
            }));
        }
        for task in tasks {
            outcomes.push(task.await.expect("join"));
        }
        let err = outcomes[0].as_ref().expect_err("ops differ");
        assert_eq!(
            err.to_string(),
            "receive from rank 1: it runs a mean all-reduce, this rank a sum"
        );
    }

    /// Has an intruder, rank 1 of a ring changed by `tweak`, reach rank 0 of a
    /// real ring before its rank 1 is up; returns the intruder's error and the real
    /// ring's addresses, after checking that rank 0 went on waiting for its real
    /// left neighbour and the real ring reduces.
    async fn intruder_refused(
        tweak: impl FnOnce(&mut RingConfig),
    ) -> (CollectiveError, Vec<String>) {
        let (mut listeners, addrs) = bind_loopback(2).await;
        let rank1 = listeners.pop().expect("rank 1");
        let rank0 = listeners.pop().expect("rank 0");
        let ring0 = tokio::spawn(Ring::connect(rank0, test_config(0, &addrs)));
        let (mut intruder_listener, intruder_addrs) = bind_loopback(1).await;
        let mut intruder = test_config(1, &[addrs[0].clone(), intruder_addrs[0].clone()]);
        tweak(&mut intruder);
        let err = Ring::connect(intruder_listener.pop().expect("intruder"), intruder)
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, CollectiveError::Refused { peer: 0, .. }),
            "{err}"
        );
        rank1_joins(ring0, rank1, &addrs, "after the intruder").await;
        (err, addrs)
    }

    /// Links the real rank 1 to rank 0 (still waiting in `ring0`) and checks that
    /// the pair reduces.
    async fn rank1_joins(
        ring0: tokio::task::JoinHandle<Result<Ring, CollectiveError>>,
        rank1: TcpListener,
        addrs: &[String],
        what: &str,
    ) {
        let ring1 = Ring::connect(rank1, test_config(1, addrs))
            .await
            .expect("rank 1 links");
        let ring0 = ring0.await.expect("join").expect("rank 0 links");
        let (_, outputs) = reduce_ok(vec![ring0, ring1], inputs(2, 10, 0), Op::Mean).await;
        check(&outputs, 10, 0, Op::Mean, what);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_session_is_refused_with_a_clear_error() {
        // A shard of an earlier attempt (session - 1), still running as rank 1,
        // reaches rank 0 of the new attempt before the new rank 1 is up.
        let (err, addrs) = intruder_refused(|c| c.session_id = SESSION - 1).await;
        assert_eq!(
            err.to_string(),
            format!(
                "rank 0 at {} refused the connection: it belongs to session {SESSION}, \
                 this rank to session {}",
                addrs[0],
                SESSION - 1
            )
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rank_without_the_ring_key_is_refused_and_setup_goes_on() {
        // An impostor that knows the session id (it is no secret) but not the
        // attempt's key.
        let (err, _) = intruder_refused(|c| c.key = RingKey([8; 32])).await;
        assert!(
            err.to_string()
                .contains("refused this rank's proof of the ring key"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listener_that_cannot_prove_the_key_is_refused() {
        // Something listens at rank 1's address and accepts every hello, but does
        // not hold the key: rank 0 must not send it gradients.
        let (mut listeners, addrs) = bind_loopback(2).await;
        let fake = listeners.pop().expect("rank 1's address");
        let rank0 = listeners.pop().expect("rank 0");
        let pretender = tokio::spawn(async move {
            let (mut stream, _) = fake.accept().await.expect("accept");
            let mut hello = [0u8; HELLO_BYTES];
            stream.read_exact(&mut hello).await.expect("hello");
            let hello = Hello::decode(&hello).expect("a hello");
            let accepted = Reply {
                version: VERSION,
                verdict: Verdict::Accepted,
                session_id: hello.session_id,
                world: hello.world,
                rank: hello.to,
            };
            stream.write_all(&accepted.encode()).await.expect("reply");
            stream.write_all(&[1; 32]).await.expect("nonce");
            let mut proof = [0u8; 64];
            stream.read_exact(&mut proof).await.expect("proof");
            stream.write_all(&accepted.encode()).await.expect("verdict");
            stream.write_all(&[0; 32]).await.expect("a made-up proof");
            stream
        });
        let mut config = test_config(0, &addrs);
        config.setup_timeout = Duration::from_secs(2);
        let err = Ring::connect(rank0, config).await.expect_err("refused");
        assert!(
            matches!(&err, CollectiveError::Refused { peer: 1, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("its proof of the ring key is wrong"),
            "{err}"
        );
        drop(pretender.await.expect("pretender"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stray_connection_is_refused_and_setup_goes_on() {
        let (mut listeners, addrs) = bind_loopback(2).await;
        let rank1 = listeners.pop().expect("rank 1");
        let rank0 = listeners.pop().expect("rank 0");
        let ring0 = tokio::spawn(Ring::connect(rank0, test_config(0, &addrs)));

        // Something that does not speak the protocol is dropped without an answer.
        let mut stray = TcpStream::connect(&addrs[0]).await.expect("connect");
        stray
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0")
            .await
            .expect("write");
        let mut answer = Vec::new();
        stray.read_to_end(&mut answer).await.expect("closed");
        assert!(answer.is_empty());

        // A rank that means another rank is refused with a verdict.
        let mut lost = TcpStream::connect(&addrs[0]).await.expect("connect");
        let hello = Hello {
            version: VERSION,
            session_id: SESSION,
            world: 2,
            from: 1,
            to: 1,
        };
        lost.write_all(&hello.encode()).await.expect("write");
        let mut reply = [0u8; HELLO_BYTES];
        lost.read_exact(&mut reply).await.expect("verdict");
        let reply = Reply::decode(&reply).expect("a reply");
        assert_eq!(reply.verdict, Verdict::WrongRank);
        assert_eq!(reply.rank, 0);

        rank1_joins(ring0, rank1, &addrs, "after strays").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_absent_neighbour_fails_setup_naming_it() {
        let (mut listeners, addrs) = bind_loopback(2).await;
        drop(listeners.pop());
        let mut config = test_config(0, &addrs);
        config.setup_timeout = Duration::from_millis(300);
        let started = StdInstant::now();
        let err = Ring::connect(listeners.pop().expect("rank 0"), config)
            .await
            .expect_err("rank 1 never comes");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(&err, CollectiveError::Setup { peer: 1, addr, .. } if *addr == addrs[1]),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("set up the link with rank 1 at {}: ", addrs[1])),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_world_of_one_needs_no_peers_and_changes_nothing() {
        let (mut listeners, addrs) = bind_loopback(1).await;
        let mut ring = Ring::connect(listeners.pop().expect("rank 0"), test_config(0, &addrs))
            .await
            .expect("link");
        let mut buf = vec![1.5, -2.0, 3.25];
        ring.all_reduce_mean(&mut buf).await.expect("mean");
        ring.all_reduce_sum(&mut buf).await.expect("sum");
        assert_eq!(buf, vec![1.5, -2.0, 3.25]);
    }

    #[tokio::test]
    async fn an_impossible_config_is_rejected() {
        let (mut listeners, addrs) = bind_loopback(2).await;
        let mut config = test_config(2, &addrs);
        let err = Ring::connect(listeners.pop().expect("listener"), config.clone())
            .await
            .expect_err("rank out of range");
        assert_eq!(
            err.to_string(),
            "invalid communicator config: rank 2 in a world of 2"
        );
        config.rank = 0;
        config.chunk_bytes = 6;
        let err = Ring::connect(listeners.pop().expect("listener"), config)
            .await
            .expect_err("chunk not a multiple of 4");
        assert!(matches!(err, CollectiveError::Config(_)), "{err}");
    }

    #[test]
    fn messages_round_trip() {
        let header = Header {
            step: 7,
            buf_len: 1 << 40,
            offset: 3,
            len: 65536,
            op: Op::Mean.code(),
        };
        assert_eq!(Header::decode(&header.encode()), header);
        assert_eq!(header.mismatch(&header), None);
        let hello = Hello {
            version: VERSION,
            session_id: u64::MAX,
            world: 4,
            from: 3,
            to: 0,
        };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
        let reply = Reply {
            version: VERSION,
            verdict: Verdict::WrongWorld,
            session_id: 9,
            world: 4,
            rank: 0,
        };
        assert_eq!(Reply::decode(&reply.encode()), Some(reply));
        assert_eq!(Hello::decode(&[0; HELLO_BYTES]), None);
    }

    #[test]
    fn a_refusal_with_odd_values_is_reported_not_a_panic() {
        let me = Identity {
            session_id: 1,
            key: TEST_KEY,
            world: 2,
            rank: 1,
        };
        for (rank, world) in [(u32::MAX, u32::MAX), (0, 0), (u32::MAX, 0)] {
            let reply = Reply {
                version: VERSION,
                verdict: Verdict::WrongRank,
                session_id: 1,
                world,
                rank,
            };
            assert!(me.refusal(&reply, 0).is_some());
        }
    }

    #[test]
    fn connect_backoff_doubles_up_to_its_bound() {
        assert_eq!(connect_backoff(0), CONNECT_BACKOFF_INITIAL);
        assert_eq!(connect_backoff(1), CONNECT_BACKOFF_INITIAL * 2);
        assert_eq!(connect_backoff(100), CONNECT_BACKOFF_MAX);
    }
}
