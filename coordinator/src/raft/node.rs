//! [`RaftNode`]: the actor that owns `RawNode` and the Raft RocksDB.
//!
//! It runs on a dedicated OS thread (fsync blocks), fed by one bounded mailbox:
//!
//! ```text
//!  API tasks ──propose/read/conf──┐
//!  transport ──raft msgs/snapshots┼─► mailbox ─► RaftNode thread
//!  ticker ─────Tick───────────────┘                 │ drain mailbox
//!                                                   │ Ready: send msgs → install snapshot
//!                                                   │   → apply committed → persist (sync)
//!                                                   │   → send persisted msgs → advance
//!                                                   ▼
//!                         replies (oneshot) · NodeView (watch) · transport
//! ```
//!
//! A proposal is remembered by the log index it landed at; when that index is
//! applied the proposer learns for certain whether its entry (same term) or another
//! one committed there.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_common::{Error, Result};
use kiln_proto::v1::{
    AppliedState, Command, CommandResult, ConfChangeContext, MemberRecord, SnapshotTrailer,
};
use prost_raft::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType, HardState, Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use super::storage::{ApplyBatch, RaftStore, RocksStore, StoreError};
use super::transport::Transport;
use crate::state::machine::{apply_command, apply_member_added, apply_member_removed, Txn};
use crate::state::reader::StateReader;
use kiln_common::config::RaftSettings;

/// Bytes of committed entries one Ready hands to the state machine at most, so
/// that one apply batch (and the memory it holds) stays bounded when a node
/// catches up on a long log.
const MAX_COMMITTED_BYTES_PER_READY: u64 = 32 << 20;
/// Readies handled per wake-up of the Raft thread before the mailbox is read again.
const MAX_READIES_PER_WAKE: usize = 8;
/// Mailbox messages drained per loop turn before handling Ready.
const MAX_DRAIN: usize = 4096;

/// A snapshot received from the leader, waiting on disk to be installed.
pub struct IncomingSnapshot {
    pub message: Message,
    pub file: PathBuf,
}

/// What the Raft node is asked to do.
pub enum NodeMsg {
    Tick,
    Step(Vec<Message>),
    Snapshot(Box<IncomingSnapshot>),
    Propose {
        command: Vec<u8>,
        reply: oneshot::Sender<Result<CommandResult>>,
    },
    ConfChange {
        change: ConfChangeSingle,
        member: Option<MemberRecord>,
        reply: oneshot::Sender<Result<ConfState>>,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64>>,
    },
    TransferLeader {
        to: u64,
    },
    Unreachable(u64),
    /// A call to the peer failed at the transport: it is down or cut off.
    PeerDown(u64),
    SnapshotDone {
        to: u64,
        ok: bool,
    },
    Shutdown,
}

/// A role in the group, as reported to users.
pub fn role_name(role: StateRole, is_learner: bool, removed: bool) -> &'static str {
    if removed {
        return "removed";
    }
    if is_learner {
        return "learner";
    }
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre_candidate",
    }
}

/// An immutable picture of the node, published after every loop turn.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    pub id: u64,
    pub role: &'static str,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub members: Arc<BTreeMap<u64, MemberRecord>>,
    /// Matched log index of each peer, on the leader only.
    pub matched: BTreeMap<u64, u64>,
    pub snapshots_received: u64,
    pub removed: bool,
    /// On the leader, the index of its first entry of this term (the empty
    /// entry it appended when elected); 0 elsewhere.
    pub term_start_index: u64,
}

impl NodeView {
    /// Returns true when this node leads.
    pub fn is_leader(&self) -> bool {
        self.role == "leader"
    }

    /// True when this node leads and has applied its term's first entry, so its
    /// state holds every write any earlier leader committed: only then may it
    /// decide from that state (schedule, place, tell workers what to run).
    pub fn leads_applied(&self) -> bool {
        self.is_leader() && self.term_start_index > 0 && self.applied_index >= self.term_start_index
    }

    /// Returns the gRPC address of the leader, when known.
    pub fn leader_addr(&self) -> Option<String> {
        self.members.get(&self.leader_id).map(|m| m.addr.clone())
    }

    /// Returns the error a non-leader gives for a write.
    pub fn not_leader(&self) -> Error {
        if self.leader_id == 0 {
            Error::NoQuorum(format!(
                "coordinator {} knows no leader: a majority of the {} voters may be unreachable",
                self.id,
                self.voters.len()
            ))
        } else {
            Error::NotLeader {
                leader_id: self.leader_id,
                leader_addr: self.leader_addr(),
            }
        }
    }
}

/// A cloneable handle to the Raft node.
#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<NodeMsg>,
    view: watch::Receiver<NodeView>,
    timeout: Duration,
}

impl RaftHandle {
    /// Returns the latest published view of the node.
    pub fn view(&self) -> NodeView {
        self.view.borrow().clone()
    }

    /// Returns a receiver of view updates.
    pub fn watch(&self) -> watch::Receiver<NodeView> {
        self.view.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> NodeMsg) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::Unavailable("raft mailbox is full: coordinator overloaded".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                Error::Unavailable("raft node has stopped".into())
            }
        })?;
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Unavailable("raft node has stopped".into())),
            Err(_) => Err(Error::Timeout("raft node did not answer".into())),
        }
    }

    /// Proposes an encoded command on this node, which must lead, and waits until
    /// it is applied.
    pub async fn propose(&self, command: &Command) -> Result<CommandResult> {
        let command = prost::Message::encode_to_vec(command);
        self.ask(|reply| NodeMsg::Propose { command, reply }).await
    }

    /// Proposes one membership change and waits until it is applied.
    pub async fn conf_change(
        &self,
        change: ConfChangeSingle,
        member: Option<MemberRecord>,
    ) -> Result<ConfState> {
        self.ask(|reply| NodeMsg::ConfChange {
            change,
            member,
            reply,
        })
        .await
    }

    /// Waits until this node has applied everything committed before the call
    /// (ReadIndex), and returns that index.
    pub async fn read_index(&self) -> Result<u64> {
        self.ask(|reply| NodeMsg::ReadIndex { reply }).await
    }

    /// Hands messages from a peer to the node, waiting for mailbox room.
    pub async fn step(&self, msgs: Vec<Message>) -> Result<()> {
        self.tx
            .send(NodeMsg::Step(msgs))
            .await
            .map_err(|_| Error::Unavailable("raft node has stopped".into()))
    }

    /// Hands a received snapshot to the node.
    pub async fn snapshot(&self, incoming: IncomingSnapshot) -> Result<()> {
        self.tx
            .send(NodeMsg::Snapshot(Box::new(incoming)))
            .await
            .map_err(|_| Error::Unavailable("raft node has stopped".into()))
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.tx.try_send(NodeMsg::TransferLeader { to });
    }

    /// Tells the node that a message to a peer was dropped.
    pub fn report_unreachable(&self, to: u64) {
        let _ = self.tx.try_send(NodeMsg::Unreachable(to));
    }

    /// Tells the node that a call to a peer failed: the peer no longer counts
    /// towards a quorum until it is heard from again.
    pub fn report_peer_down(&self, to: u64) {
        let _ = self.tx.try_send(NodeMsg::PeerDown(to));
    }

    /// Tells the node how sending a snapshot to `to` ended. Waits for room in the
    /// mailbox: raft-rs sends the follower nothing more until it hears this, so a
    /// report dropped on a full mailbox would leave it without a snapshot until
    /// the leader changed.
    pub async fn report_snapshot(&self, to: u64, ok: bool) {
        let _ = self.tx.send(NodeMsg::SnapshotDone { to, ok }).await;
    }

    pub(crate) fn sender(&self) -> mpsc::Sender<NodeMsg> {
        self.tx.clone()
    }
}

enum Waiter {
    Command(oneshot::Sender<Result<CommandResult>>),
    Conf(oneshot::Sender<Result<ConfState>>),
}

struct Pending {
    term: u64,
    waiter: Waiter,
    deadline: Instant,
}

/// The Raft actor. Built by [`RaftNode::start`].
pub struct RaftNode {
    id: u64,
    raw: RawNode<RocksStore>,
    rx: mpsc::Receiver<NodeMsg>,
    transport: Transport,
    reader: StateReader,
    view_tx: watch::Sender<NodeView>,
    settings: RaftSettings,
    /// Proposals by the log index they were appended at.
    pending: BTreeMap<u64, Pending>,
    /// ReadIndex requests by context, then by the index they wait for.
    /// Each with its deadline and when it was last handed to raft-rs.
    reads: HashMap<u64, (oneshot::Sender<Result<u64>>, Instant, Instant)>,
    reads_waiting_apply: Vec<(u64, oneshot::Sender<Result<u64>>)>,
    next_ctx: u64,
    members: Arc<BTreeMap<u64, MemberRecord>>,
    snapshot_files: HashMap<(u64, u64), PathBuf>,
    last_heard: HashMap<u64, Instant>,
    snapshots_received: u64,
    removed: bool,
    stopped: bool,
    /// The term this node last led and the index of its first entry in it.
    term_start: (u64, u64),
}

impl RaftNode {
    /// Starts the actor thread over an opened store, and returns its handle.
    pub fn start(
        id: u64,
        store: RocksStore,
        settings: RaftSettings,
        transport: Transport,
    ) -> anyhow::Result<(RaftHandle, std::thread::JoinHandle<()>)> {
        let reader = StateReader::new(store.db());
        let applied = store.applied().index;
        let config = raft::Config {
            id,
            election_tick: settings.election_ticks,
            heartbeat_tick: settings.heartbeat_ticks,
            min_election_tick: settings.election_ticks,
            max_election_tick: settings.election_ticks + settings.election_jitter_ticks,
            applied,
            max_size_per_msg: settings.max_size_per_msg,
            max_inflight_msgs: settings.max_inflight_msgs,
            max_committed_size_per_ready: MAX_COMMITTED_BYTES_PER_READY,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid raft settings: {e}"))?;
        let logger = super::logger::raft_logger(id);
        let raw = RawNode::new(&config, store, &logger)
            .map_err(|e| anyhow::anyhow!("start raft node {id}: {e}"))?;
        let (tx, rx) = mpsc::channel(settings.mailbox_capacity);
        let (view_tx, view) = watch::channel(NodeView::default());
        let handle = RaftHandle {
            tx,
            view,
            timeout: Duration::from_millis(settings.proposal_timeout_ms),
        };
        let members = Arc::new(load_members(&reader)?);
        transport.set_members(&members);
        let mut node = RaftNode {
            id,
            raw,
            rx,
            transport,
            reader,
            view_tx,
            settings,
            pending: BTreeMap::new(),
            reads: HashMap::new(),
            reads_waiting_apply: Vec::new(),
            next_ctx: rand::random::<u64>() >> 1,
            members,
            snapshot_files: HashMap::new(),
            last_heard: HashMap::new(),
            snapshots_received: 0,
            removed: false,
            stopped: false,
            term_start: (0, 0),
        };
        {
            let conf = node.raw.raft.prs().conf();
            let empty = conf.voters().ids().is_empty() && conf.learners().is_empty();
            node.removed = !empty && !conf.voters().contains(id) && !conf.learners().contains(&id);
        }
        node.publish();
        let thread = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || node.run())
            .map_err(|e| anyhow::anyhow!("spawn raft thread: {e}"))?;
        Ok((handle, thread))
    }

    fn run(mut self) {
        let _span = tracing::info_span!("raft", node_id = self.id).entered();
        let mut last_tick = Instant::now();
        while let Some(msg) = self.rx.blocking_recv() {
            self.handle(msg);
            let mut drained = 0;
            while drained < MAX_DRAIN {
                match self.rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
                drained += 1;
            }
            if self.stopped {
                break;
            }
            // A Ready holds at most MAX_COMMITTED_BYTES_PER_READY of committed
            // entries; what is left comes in the next ones, a few per wake-up so
            // that the mailbox is not starved by a long catch-up.
            for _ in 0..MAX_READIES_PER_WAKE {
                if let Err(e) = self.on_ready() {
                    // A storage failure leaves the node unable to take part safely.
                    tracing::error!(error = %e, "raft storage failed; stopping this coordinator");
                    eprintln!("error: raft storage failed on coordinator {}: {e}", self.id);
                    std::process::exit(70);
                }
                if !self.raw.has_ready() {
                    break;
                }
            }
            if last_tick.elapsed() >= Duration::from_millis(self.settings.tick_ms) {
                last_tick = Instant::now();
                self.on_tick_housekeeping();
            }
            self.publish();
        }
        self.fail_all(Error::Unavailable("coordinator is shutting down".into()));
        tracing::info!("raft node stopped");
    }

    fn handle(&mut self, msg: NodeMsg) {
        match msg {
            NodeMsg::Tick => {
                self.raw.tick();
            }
            NodeMsg::Step(msgs) => {
                let now = Instant::now();
                for m in msgs {
                    self.last_heard.insert(m.from, now);
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(error = %e, "dropped raft message");
                    }
                }
            }
            NodeMsg::Snapshot(incoming) => {
                let meta = incoming.message.get_snapshot().get_metadata();
                self.snapshot_files
                    .insert((meta.index, meta.term), incoming.file);
                self.last_heard
                    .insert(incoming.message.from, Instant::now());
                if let Err(e) = self.raw.step(incoming.message) {
                    tracing::warn!(error = %e, "snapshot message rejected");
                }
            }
            NodeMsg::Propose { command, reply } => self.propose(command, reply),
            NodeMsg::ConfChange {
                change,
                member,
                reply,
            } => self.propose_conf_change(change, member, reply),
            NodeMsg::ReadIndex { reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(self.view_now().not_leader()));
                    return;
                }
                self.next_ctx += 1;
                let ctx = self.next_ctx;
                self.raw.read_index(ctx.to_be_bytes().to_vec());
                self.reads
                    .insert(ctx, (reply, self.deadline(), Instant::now()));
            }
            NodeMsg::TransferLeader { to } => self.raw.transfer_leader(to),
            NodeMsg::Unreachable(to) => self.raw.report_unreachable(to),
            NodeMsg::PeerDown(to) => {
                self.last_heard.remove(&to);
                self.raw.report_unreachable(to);
            }
            NodeMsg::SnapshotDone { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            NodeMsg::Shutdown => self.stopped = true,
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.settings.proposal_timeout_ms)
    }

    /// Returns the time within which a voter must have been heard from to count
    /// towards a quorum: one election timeout, as raft-rs's check_quorum uses.
    fn quorum_window(&self) -> Duration {
        Duration::from_millis(self.settings.tick_ms * self.settings.election_ticks as u64)
    }

    /// Returns true when a majority of voters, this node included, was heard from
    /// within the quorum window and has not failed a call since. A leader that
    /// fails this refuses new proposals instead of appending entries that cannot
    /// commit.
    fn quorum_recently_active(&self) -> bool {
        let window = self.quorum_window();
        let conf = self.raw.raft.prs().conf();
        let voters: Vec<u64> = conf.voters().ids().iter().collect();
        let active = voters
            .iter()
            .filter(|&&v| {
                v == self.id
                    || self
                        .last_heard
                        .get(&v)
                        .is_some_and(|t| t.elapsed() <= window)
            })
            .count();
        active * 2 > voters.len()
    }

    fn check_can_propose(&self) -> Result<()> {
        if self.removed {
            return Err(Error::Unavailable(format!(
                "coordinator {} was removed from the cluster",
                self.id
            )));
        }
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.view_now().not_leader());
        }
        if !self.quorum_recently_active() {
            let voters = self.raw.raft.prs().conf().voters().ids().len();
            return Err(Error::NoQuorum(format!(
                "leader {} cannot reach a majority of the {voters} voters",
                self.id
            )));
        }
        Ok(())
    }

    fn propose(&mut self, command: Vec<u8>, reply: oneshot::Sender<Result<CommandResult>>) {
        if let Err(e) = self.check_can_propose() {
            let _ = reply.send(Err(e));
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose(Vec::new(), command) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                if index == before {
                    let _ = reply.send(Err(Error::Unavailable("proposal dropped".into())));
                    return;
                }
                let pending = Pending {
                    term: self.raw.raft.term,
                    waiter: Waiter::Command(reply),
                    deadline: self.deadline(),
                };
                self.pending.insert(index, pending);
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Unavailable(format!("proposal dropped: {e}"))));
            }
        }
    }

    fn propose_conf_change(
        &mut self,
        change: ConfChangeSingle,
        member: Option<MemberRecord>,
        reply: oneshot::Sender<Result<ConfState>>,
    ) {
        if let Err(e) = self.check_can_propose() {
            let _ = reply.send(Err(e));
            return;
        }
        if self.raw.raft.has_pending_conf() {
            let _ = reply.send(Err(Error::Unavailable(
                "another membership change is in progress; retry".into(),
            )));
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.mut_changes().push(change);
        let context = ConfChangeContext {
            proposal: Vec::new(),
            member,
        };
        cc.context = prost::Message::encode_to_vec(&context);
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) if self.raw.raft.raft_log.last_index() > before => {
                let index = self.raw.raft.raft_log.last_index();
                self.pending.insert(
                    index,
                    Pending {
                        term: self.raw.raft.term,
                        waiter: Waiter::Conf(reply),
                        deadline: self.deadline(),
                    },
                );
            }
            Ok(()) => {
                let _ = reply.send(Err(Error::Unavailable(
                    "membership change dropped; retry".into(),
                )));
            }
            Err(e) => {
                let _ = reply.send(Err(Error::InvalidArgument(format!(
                    "membership change refused: {e}"
                ))));
            }
        }
    }

    fn on_ready(&mut self) -> std::result::Result<(), StoreError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        let hs = ready.hs().cloned();
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(&snap, hs.as_ref())?;
        }
        let read_states = ready.take_read_states();
        let committed = ready.take_committed_entries();
        if let Some(last) = committed.last() {
            // The commit index of what is applied goes to the WAL before the apply
            // batch, so no restart finds an entry applied beyond the stored commit
            // index. Only up to the last applied entry: committed entries are
            // persisted ones, while the Ready's commit index may run past them.
            self.raw.mut_store().set_commit(last.index)?;
        }
        self.apply(committed)?;
        if !ready.entries().is_empty() || ready.must_sync() {
            self.raw.mut_store().persist(ready.entries(), hs.as_ref())?;
        } else if let Some(hs) = hs {
            // Only the commit index moved: it needs no fsync (a lost one is learned
            // again from the leader), which halves the fsyncs of a follower.
            self.raw.mut_store().set_commit(hs.commit)?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply();
        for rs in read_states {
            let ctx = ctx_of(&rs.request_ctx);
            if let Some((reply, _, _)) = self.reads.remove(&ctx) {
                self.reads_waiting_apply.push((rs.index, reply));
            }
        }
        self.release_reads();
        self.maybe_compact()?;
        Ok(())
    }

    fn release_reads(&mut self) {
        if self.reads_waiting_apply.is_empty() {
            return;
        }
        let applied = self.raw.store().applied().index;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_waiting_apply)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_waiting_apply = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(applied));
        }
    }

    fn install_snapshot(
        &mut self,
        snap: &Snapshot,
        hard_state: Option<&HardState>,
    ) -> std::result::Result<(), StoreError> {
        let meta = snap.get_metadata().clone();
        let file = self
            .snapshot_files
            .remove(&(meta.index, meta.term))
            .ok_or_else(|| StoreError {
                op: "install snapshot",
                message: format!("no data received for snapshot {}/{}", meta.term, meta.index),
            })?;
        let reader = std::fs::File::open(&file).map_err(|e| StoreError {
            op: "open received snapshot",
            message: format!("{}: {e}", file.display()),
        })?;
        let mut pairs = SnapshotFileReader {
            inner: std::io::BufReader::new(reader),
        };
        self.raw
            .mut_store()
            .install_snapshot(&meta, hard_state, &mut pairs)?;
        let _ = std::fs::remove_file(&file);
        // Spools of older snapshots that Raft passed over are useless now.
        self.snapshot_files.retain(|(index, _), path| {
            let keep = *index > meta.index;
            if !keep {
                let _ = std::fs::remove_file(path);
            }
            keep
        });
        self.snapshots_received += 1;
        self.reload_members();
        // Proposals at or below the snapshot can no longer be matched to entries.
        let stale: Vec<u64> = self.pending.range(..=meta.index).map(|(i, _)| *i).collect();
        for index in stale {
            if let Some(p) = self.pending.remove(&index) {
                fail(
                    p.waiter,
                    Error::Unavailable(
                        "leadership changed before the write was confirmed; its outcome is unknown"
                            .into(),
                    ),
                );
            }
        }
        tracing::info!(index = meta.index, term = meta.term, "installed snapshot");
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> std::result::Result<(), StoreError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let applied = AppliedState {
            index: last.index,
            term: last.term,
        };
        let reader = self.reader.clone();
        let mut txn = Txn::new(&reader);
        let mut conf_state = None;
        let mut replies: Vec<(Pending, Result<Outcome>)> = Vec::new();
        let mut members_changed = false;
        for entry in &entries {
            let pending = self.pending.remove(&entry.index);
            let ours = pending.as_ref().is_some_and(|p| p.term == entry.term);
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    let outcome = if entry.data.is_empty() {
                        Ok(Outcome::Command(Ok(0)))
                    } else {
                        match <Command as prost::Message>::decode(entry.data.as_slice()) {
                            Ok(cmd) => Ok(Outcome::Command(apply_command(&mut txn, &cmd)?)),
                            Err(e) => {
                                Ok(Outcome::Command(Err(format!("undecodable command: {e}"))))
                            }
                        }
                    };
                    if let Some(p) = pending {
                        replies.push((p, if ours { outcome } else { Err(lost_write()) }));
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc = decode_conf_change(entry);
                    let outcome = match cc {
                        Ok(cc) => match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => {
                                members_changed |= self.record_members(&mut txn, &cc);
                                conf_state = Some(cs.clone());
                                Ok(Outcome::Conf(cs))
                            }
                            Err(e) => Err(Error::InvalidArgument(format!(
                                "membership change not applied: {e}"
                            ))),
                        },
                        Err(e) => Err(Error::Internal(e)),
                    };
                    if let Some(p) = pending {
                        replies.push((p, if ours { outcome } else { Err(lost_write()) }));
                    }
                }
            }
        }
        let batch = ApplyBatch {
            writes: txn.writes,
            applied,
            conf_state,
        };
        self.raw.mut_store().apply(&batch)?;
        if members_changed {
            self.reload_members();
        }
        for (p, outcome) in replies {
            reply(p.waiter, outcome, &applied);
        }
        Ok(())
    }

    /// Records member addresses for a membership change; returns true if any changed.
    fn record_members(&mut self, txn: &mut Txn<'_>, cc: &ConfChangeV2) -> bool {
        let context: Option<ConfChangeContext> = prost::Message::decode(cc.context.as_slice()).ok();
        let mut changed = false;
        for change in cc.get_changes() {
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if let Some(member) = context.as_ref().and_then(|c| c.member.as_ref()) {
                        if member.id == change.node_id {
                            apply_member_added(txn, member);
                            changed = true;
                        }
                    }
                }
                ConfChangeType::RemoveNode => {
                    apply_member_removed(txn, change.node_id);
                    if change.node_id == self.id {
                        tracing::warn!("this coordinator was removed from the cluster");
                        self.removed = true;
                    }
                    changed = true;
                }
            }
        }
        changed
    }

    fn reload_members(&mut self) {
        match load_members(&self.reader) {
            Ok(members) => {
                self.members = Arc::new(members);
                self.transport.set_members(&self.members);
            }
            Err(e) => tracing::error!(error = %e, "reload coordinator members"),
        }
    }

    fn maybe_compact(&mut self) -> std::result::Result<(), StoreError> {
        let store = self.raw.store();
        let applied = store.applied().index;
        let (truncated, _) = store.truncated();
        if applied < truncated + self.settings.snapshot_threshold_entries {
            return Ok(());
        }
        // A checkpoint at the applied index first: after compaction, followers that
        // fell behind the log are served from it.
        store.checkpoint_now()?;
        let keep_from = applied.saturating_sub(self.settings.log_keep_entries);
        if keep_from > truncated {
            self.raw.mut_store().compact(keep_from)?;
            tracing::info!(
                applied,
                compacted_to = keep_from,
                "made snapshot and compacted the raft log"
            );
        }
        Ok(())
    }

    fn on_tick_housekeeping(&mut self) {
        let now = Instant::now();
        // Without a leader, or as a leader cut off from a majority, nothing pending
        // can commit now: say so at once rather than at the deadline. (With a new
        // leader elected, pending entries resolve when their index is applied.)
        let leaderless = self.raw.raft.leader_id == 0;
        let cut_off = self.raw.raft.state == StateRole::Leader && !self.quorum_recently_active();
        if leaderless || cut_off {
            let err = Error::NoQuorum(format!(
                "coordinator {} knows no leader that a majority follows; the read cannot be confirmed",
                self.id
            ));
            for (_, (reply, _, _)) in self.reads.drain() {
                let _ = reply.send(Err(err.clone()));
            }
        }
        if (leaderless || cut_off) && !self.pending.is_empty() {
            for (index, p) in std::mem::take(&mut self.pending) {
                fail(
                    p.waiter,
                    Error::NoQuorum(format!(
                        "coordinator {} lost contact with a majority before entry {index} committed; it may still commit if they return",
                        self.id
                    )),
                );
            }
        }
        // Proposals past their deadline: the caller gets an answer, never silence.
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(i, _)| *i)
            .collect();
        for index in expired {
            if let Some(p) = self.pending.remove(&index) {
                let err = if self.raw.raft.state == StateRole::Leader
                    && self.quorum_recently_active()
                {
                    Error::Timeout(format!(
                        "entry {index} not committed within {} ms; it may still commit",
                        self.settings.proposal_timeout_ms
                    ))
                } else {
                    Error::NoQuorum(format!(
                        "entry {index} not committed within {} ms: a majority of coordinators is unreachable; it may commit if they return",
                        self.settings.proposal_timeout_ms
                    ))
                };
                fail(p.waiter, err);
            }
        }
        let expired_reads: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, (_, d, _))| *d <= now)
            .map(|(c, _)| *c)
            .collect();
        for ctx in expired_reads {
            if let Some((reply, _, _)) = self.reads.remove(&ctx) {
                let _ = reply.send(Err(Error::NoQuorum(
                    "read index not confirmed by a majority in time".into(),
                )));
            }
        }
        self.reissue_reads(now);
        if self.raw.raft.state == StateRole::Leader {
            self.promote_caught_up_learners();
        }
    }

    /// Hands raft-rs again the reads it has not answered within a tick. A leader
    /// that has not yet committed an entry of its term drops a ReadIndex without a
    /// word (raft-rs 0.7), as does a leader that lost its role while a follower's
    /// read was on the way; asked again, the read is answered as soon as the new
    /// leader's first entry commits, not at its deadline. raft-rs ignores a
    /// context it already holds, and a second answer finds no waiter.
    fn reissue_reads(&mut self, now: Instant) {
        if self.raw.raft.leader_id == 0 {
            return;
        }
        let tick = Duration::from_millis(self.settings.tick_ms);
        for (ctx, (_, _, issued)) in self.reads.iter_mut() {
            if now.duration_since(*issued) >= tick {
                *issued = now;
                self.raw.read_index(ctx.to_be_bytes().to_vec());
            }
        }
    }

    fn promote_caught_up_learners(&mut self) {
        if self.raw.raft.has_pending_conf() {
            return;
        }
        let committed = self.raw.raft.raft_log.committed;
        let learners: Vec<u64> = self
            .raw
            .raft
            .prs()
            .conf()
            .learners()
            .iter()
            .copied()
            .collect();
        for id in learners {
            let caught_up = self
                .raw
                .raft
                .prs()
                .get(id)
                .is_some_and(|pr| pr.matched + 5 >= committed && pr.matched > 0);
            if !caught_up {
                continue;
            }
            let mut change = ConfChangeSingle::default();
            change.set_change_type(ConfChangeType::AddNode);
            change.node_id = id;
            let member = self.members.get(&id).cloned();
            let (reply, _rx) = oneshot::channel();
            tracing::info!(learner = id, "promoting caught-up learner to voter");
            self.propose_conf_change(change, member, reply);
            return;
        }
    }

    fn fail_all(&mut self, err: Error) {
        for (_, p) in std::mem::take(&mut self.pending) {
            fail(p.waiter, err.clone());
        }
        for (_, (reply, _, _)) in self.reads.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, reply) in self.reads_waiting_apply.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
    }

    fn view_now(&self) -> NodeView {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let conf = raft.prs().conf();
        let mut voters: Vec<u64> = conf.voters().ids().iter().collect();
        voters.sort_unstable();
        let mut learners: Vec<u64> = conf.learners().iter().copied().collect();
        learners.sort_unstable();
        let is_leader = raft.state == StateRole::Leader;
        let matched = if is_leader {
            raft.prs()
                .iter()
                .map(|(id, pr)| (*id, pr.matched))
                .collect()
        } else {
            BTreeMap::new()
        };
        NodeView {
            id: self.id,
            role: role_name(raft.state, learners.contains(&self.id), self.removed),
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            applied_index: store.applied().index,
            first_index: store.truncated().0 + 1,
            last_index: raft.raft_log.last_index(),
            snapshot_index: store.truncated().0,
            voters,
            learners,
            members: self.members.clone(),
            matched,
            snapshots_received: self.snapshots_received,
            removed: self.removed,
            term_start_index: match self.term_start {
                (term, index) if is_leader && term == raft.term => index,
                _ => 0,
            },
        }
    }

    /// The index of this leader's first entry of its term, found once per term by
    /// walking back from the last index over the entries of this term (few: the
    /// empty entry of the election and what was proposed since).
    fn note_term_start(&mut self) {
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader && self.term_start.0 != raft.term {
            let log = &raft.raft_log;
            let mut index = log.last_index();
            while index > log.first_index() && log.term(index - 1).ok() == Some(raft.term) {
                index -= 1;
            }
            self.term_start = (raft.term, index);
        }
    }

    fn publish(&mut self) {
        self.note_term_start();
        let view = self.view_now();
        self.view_tx.send_if_modified(|old| {
            let changed = old.role != view.role
                || old.term != view.term
                || old.leader_id != view.leader_id
                || old.commit_index != view.commit_index
                || old.applied_index != view.applied_index
                || old.voters != view.voters
                || old.learners != view.learners
                || old.removed != view.removed
                || old.last_index != view.last_index
                || old.matched != view.matched
                || old.term_start_index != view.term_start_index
                || !Arc::ptr_eq(&old.members, &view.members);
            if changed {
                *old = view;
            }
            changed
        });
    }
}

enum Outcome {
    /// The value apply returned, or why it refused the command.
    Command(std::result::Result<u64, String>),
    Conf(ConfState),
}

fn lost_write() -> Error {
    Error::Unavailable("leadership changed before the write committed; it was not applied".into())
}

fn reply(waiter: Waiter, outcome: Result<Outcome>, applied: &AppliedState) {
    match (waiter, outcome) {
        (Waiter::Command(tx), Ok(Outcome::Command(verdict))) => {
            let (value, rejected) = match verdict {
                Ok(value) => (value, String::new()),
                Err(reason) => (0, reason),
            };
            let _ = tx.send(Ok(CommandResult {
                index: applied.index,
                term: applied.term,
                rejected,
                value,
            }));
        }
        (Waiter::Conf(tx), Ok(Outcome::Conf(cs))) => {
            let _ = tx.send(Ok(cs));
        }
        (Waiter::Conf(tx), Ok(Outcome::Command(_))) => {
            let _ = tx.send(Err(Error::Unavailable(
                "another membership change was in progress; retry".into(),
            )));
        }
        (Waiter::Command(tx), Ok(Outcome::Conf(_))) => {
            let _ = tx.send(Err(lost_write()));
        }
        (waiter, Err(e)) => fail(waiter, e),
    }
}

fn fail(waiter: Waiter, err: Error) {
    match waiter {
        Waiter::Command(tx) => {
            let _ = tx.send(Err(err));
        }
        Waiter::Conf(tx) => {
            let _ = tx.send(Err(err));
        }
    }
}

fn ctx_of(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX)
}

fn decode_conf_change(entry: &Entry) -> std::result::Result<ConfChangeV2, String> {
    match entry.get_entry_type() {
        EntryType::EntryConfChange => ConfChange::decode(entry.data.as_slice())
            .map(|cc| {
                let single = ConfChangeSingle {
                    change_type: cc.change_type,
                    node_id: cc.node_id,
                };
                let mut v2 = ConfChangeV2::default();
                v2.mut_changes().push(single);
                v2.context = cc.context;
                v2
            })
            .map_err(|e| format!("undecodable conf change at {}: {e}", entry.index)),
        _ => ConfChangeV2::decode(entry.data.as_slice())
            .map_err(|e| format!("undecodable conf change at {}: {e}", entry.index)),
    }
}

fn load_members(reader: &StateReader) -> anyhow::Result<BTreeMap<u64, MemberRecord>> {
    Ok(reader
        .members()
        .map_err(|e| anyhow::anyhow!("load coordinator members: {e}"))?
        .into_iter()
        .map(|m| (m.id, m))
        .collect())
}

/// Reads the key-value records of a received snapshot file.
struct SnapshotFileReader<R: Read> {
    inner: R,
}

impl<R: Read> Iterator for SnapshotFileReader<R> {
    type Item = std::result::Result<(Vec<u8>, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut len = [0u8; 4];
        match self.inner.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(io_err(e))),
        }
        let read_field = |inner: &mut R, len: usize| {
            let mut buf = vec![0u8; len];
            inner.read_exact(&mut buf).map(|_| buf).map_err(io_err)
        };
        let key = match read_field(&mut self.inner, u32::from_be_bytes(len) as usize) {
            Ok(k) => k,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.inner.read_exact(&mut len) {
            return Some(Err(io_err(e)));
        }
        let value = match read_field(&mut self.inner, u32::from_be_bytes(len) as usize) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok((key, value)))
    }
}

fn io_err(e: std::io::Error) -> StoreError {
    StoreError {
        op: "read received snapshot",
        message: e.to_string(),
    }
}

/// Writes one key-value record in the format [`SnapshotFileReader`] reads.
pub fn write_snapshot_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

/// What a snapshot stream carried, summed the same way by its sender and its
/// receiver: the pairs, counted, and the BLAKE3 digest of their records in stream
/// order (the framing of [`write_snapshot_record`]).
#[derive(Default)]
pub struct SnapshotDigest {
    pairs: u64,
    hasher: blake3::Hasher,
}

impl SnapshotDigest {
    /// Adds one pair, in stream order.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        self.pairs += 1;
        self.hasher.update(&(key.len() as u32).to_be_bytes());
        self.hasher.update(key);
        self.hasher.update(&(value.len() as u32).to_be_bytes());
        self.hasher.update(value);
    }

    /// The trailer a sender ends its stream with.
    pub fn trailer(&self) -> SnapshotTrailer {
        SnapshotTrailer {
            pairs: self.pairs,
            digest: self.hasher.finalize().as_bytes().to_vec(),
        }
    }

    /// Checks what arrived against the sender's trailer; the error says how a
    /// stream that was cut short or corrupted differs.
    pub fn check(&self, trailer: Option<&SnapshotTrailer>) -> std::result::Result<(), String> {
        let Some(sent) = trailer else {
            return Err(format!(
                "the stream ended after {} pairs without its trailer: it was cut short",
                self.pairs
            ));
        };
        if sent.pairs != self.pairs {
            return Err(format!(
                "{} pairs arrived, the sender's trailer counts {}",
                self.pairs, sent.pairs
            ));
        }
        if sent.digest != self.hasher.finalize().as_bytes() {
            return Err(format!(
                "the digest of the {} pairs that arrived differs from the sender's",
                self.pairs
            ));
        }
        Ok(())
    }
}

/// Returns true when `m` is a snapshot message (sent as a stream, not in a batch).
pub fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}
