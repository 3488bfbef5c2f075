//! Raft transport over tonic: one sender task per peer that batches every queued
//! message into one `Raft` call, and a streaming `InstallSnapshot` call per
//! snapshot, read from a RocksDB checkpoint in bounded chunks.
//!
//! Messages are fire-and-forget as Raft expects: a full queue or a failed call drops
//! them and reports the peer unreachable; Raft retransmits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_common::tls::TlsMaterial;
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{KvPair, MemberRecord, RaftBatch, SnapshotChunk};
use prost_raft::Message as _;
use raft::eraftpb::Message;
use rocksdb::{IteratorMode, Options, DB};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::node::{is_snapshot, RaftHandle, SnapshotDigest};
use super::storage::{RocksStore, CF_LOG, CF_META, CF_STATE};

/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
/// Messages sent in one `Raft` call at most.
const MAX_BATCH_MESSAGES: usize = 1024;
/// Bytes of state-machine pairs in one snapshot chunk at most.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Time for one `Raft` call.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a whole snapshot transfer.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

struct Peer {
    addr: String,
    tx: mpsc::Sender<Message>,
}

struct Inner {
    peers: HashMap<u64, Peer>,
    node: Option<RaftHandle>,
}

/// A cloneable handle to the transport of one coordinator.
#[derive(Clone)]
pub struct Transport {
    self_id: u64,
    self_addr: String,
    /// The cluster's id, sent with every message and checked on every message
    /// received (0: not known yet, so neither).
    cluster_id: Arc<AtomicU64>,
    checkpoint_dir: PathBuf,
    tls: Option<TlsMaterial>,
    runtime: tokio::runtime::Handle,
    inner: Arc<Mutex<Inner>>,
}

impl Transport {
    /// Creates a transport for node `self_id`, advertised at `self_addr`.
    pub fn new(
        self_id: u64,
        self_addr: String,
        checkpoint_dir: PathBuf,
        tls: Option<TlsMaterial>,
    ) -> Transport {
        Transport {
            self_id,
            self_addr,
            cluster_id: Arc::new(AtomicU64::new(0)),
            checkpoint_dir,
            tls,
            runtime: tokio::runtime::Handle::current(),
            inner: Arc::new(Mutex::new(Inner {
                peers: HashMap::new(),
                node: None,
            })),
        }
    }

    /// Sets the cluster's id, as the state holds it.
    pub fn set_cluster_id(&self, id: u64) {
        self.cluster_id.store(id, Ordering::Relaxed);
    }

    /// The cluster's id (0: not known yet).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id.load(Ordering::Relaxed)
    }

    /// Checks the cluster id of a batch or snapshot from coordinator `from`: one
    /// of another cluster is refused (a node of an old cluster on the same
    /// address, a peer list mixed up). A node that does not know its cluster's id
    /// yet (a joining learner whose join target did not answer at its start)
    /// takes the first one it is sent; 0 is not checked (a peer of a version
    /// before ids).
    pub fn admit(&self, from: u64, theirs: u64) -> Result<(), String> {
        if theirs == 0 {
            return Ok(());
        }
        match self
            .cluster_id
            .compare_exchange(0, theirs, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Ok(()),
            Err(own) if own == theirs => Ok(()),
            Err(own) => Err(format!(
                "a raft message from coordinator {from} of cluster {theirs:016x}; this \
                 coordinator is a member of cluster {own:016x}"
            )),
        }
    }

    /// Connects the transport to the node it reports to.
    pub fn attach(&self, node: RaftHandle) {
        self.lock().node = Some(node);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("transport lock poisoned")
    }

    /// Sets peer addresses from the member records (peers not listed keep theirs:
    /// a joining node learns the leader's address from its messages first).
    pub fn set_members(&self, members: &std::collections::BTreeMap<u64, MemberRecord>) {
        for m in members.values() {
            self.learn(m.id, &m.addr);
        }
    }

    /// Records that peer `id` is at `addr`, starting or re-pointing its sender.
    pub fn learn(&self, id: u64, addr: &str) {
        if id == self.self_id || id == 0 || addr.is_empty() {
            return;
        }
        let mut inner = self.lock();
        if inner.peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let task = PeerSender {
            to: id,
            addr: addr.to_string(),
            from_id: self.self_id,
            from_addr: self.self_addr.clone(),
            transport: self.clone(),
        };
        self.runtime.spawn(task.run(rx));
        // Replacing the sender closes the old queue, which ends the old task.
        inner.peers.insert(
            id,
            Peer {
                addr: addr.to_string(),
                tx,
            },
        );
    }

    /// Sends messages to their peers; never blocks.
    pub fn send(&self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let inner = self.lock();
        let mut unreachable = Vec::new();
        for m in msgs {
            let to = m.to;
            let Some(peer) = inner.peers.get(&to) else {
                tracing::debug!(to, "no address for raft peer; message dropped");
                unreachable.push(to);
                continue;
            };
            if is_snapshot(&m) {
                let task = SnapshotSender {
                    to,
                    addr: peer.addr.clone(),
                    cluster_id: self.cluster_id(),
                    from_id: self.self_id,
                    from_addr: self.self_addr.clone(),
                    checkpoint_dir: self.checkpoint_dir.clone(),
                    tls: self.tls.clone(),
                    node: inner.node.clone(),
                };
                self.runtime.spawn(task.run(m));
                continue;
            }
            if peer.tx.try_send(m).is_err() {
                unreachable.push(to);
            }
        }
        let node = inner.node.clone();
        drop(inner);
        if let Some(node) = node {
            for to in unreachable {
                node.report_unreachable(to);
            }
        }
    }

    fn node(&self) -> Option<RaftHandle> {
        self.lock().node.clone()
    }
}

fn channel(addr: &str, tls: Option<&TlsMaterial>) -> Option<Channel> {
    match kiln_common::tls::endpoint(addr, tls, Duration::from_millis(500)) {
        Ok(endpoint) => Some(endpoint.connect_lazy()),
        Err(e) => {
            tracing::error!(addr, error = %e, "bad raft peer address");
            None
        }
    }
}

struct PeerSender {
    to: u64,
    addr: String,
    from_id: u64,
    from_addr: String,
    transport: Transport,
}

impl PeerSender {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let Some(channel) = channel(&self.addr, self.transport.tls.as_ref()) else {
            return;
        };
        let mut client = CoordinatorClient::new(channel);
        let mut failing = false;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first.encode_to_vec()];
            while batch.len() < MAX_BATCH_MESSAGES {
                match rx.try_recv() {
                    Ok(m) => batch.push(m.encode_to_vec()),
                    Err(_) => break,
                }
            }
            let request = RaftBatch {
                from_id: self.from_id,
                from_addr: self.from_addr.clone(),
                messages: batch,
                cluster_id: self.transport.cluster_id(),
            };
            let result = tokio::time::timeout(SEND_TIMEOUT, client.raft(request)).await;
            match result {
                Ok(Ok(_)) => {
                    if failing {
                        tracing::info!(to = self.to, addr = %self.addr, "raft peer reachable again");
                    }
                    failing = false;
                }
                Ok(Err(_)) | Err(_) => {
                    if !failing {
                        tracing::warn!(to = self.to, addr = %self.addr, "raft peer unreachable");
                    }
                    failing = true;
                    if let Some(node) = self.transport.node() {
                        node.report_peer_down(self.to);
                    }
                    // Drop what queued while the peer was down; Raft resends.
                    while rx.try_recv().is_ok() {}
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct SnapshotSender {
    to: u64,
    addr: String,
    cluster_id: u64,
    from_id: u64,
    from_addr: String,
    checkpoint_dir: PathBuf,
    tls: Option<TlsMaterial>,
    node: Option<RaftHandle>,
}

impl SnapshotSender {
    async fn run(self, msg: Message) {
        let meta = msg.get_snapshot().get_metadata().clone();
        let to = self.to;
        let outcome = tokio::time::timeout(SNAPSHOT_TIMEOUT, self.stream(msg)).await;
        let ok = matches!(outcome, Ok(Ok(())));
        match outcome {
            Ok(Ok(())) => tracing::info!(to, index = meta.index, "sent snapshot"),
            Ok(Err(e)) => {
                tracing::warn!(to, index = meta.index, error = %e, "send snapshot failed")
            }
            Err(_) => tracing::warn!(to, index = meta.index, "send snapshot timed out"),
        }
        if let Some(node) = &self.node {
            node.report_snapshot(to, ok).await;
        }
    }

    async fn stream(&self, msg: Message) -> anyhow::Result<()> {
        let meta = msg.get_snapshot().get_metadata();
        let path = RocksStore::checkpoint_path(&self.checkpoint_dir, meta.index, meta.term);
        let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
        let first = SnapshotChunk {
            from_id: self.from_id,
            from_addr: self.from_addr.clone(),
            message: msg.encode_to_vec(),
            cluster_id: self.cluster_id,
            ..Default::default()
        };
        tx.send(first)
            .await
            .map_err(|_| anyhow::anyhow!("snapshot stream closed"))?;
        let channel = channel(&self.addr, self.tls.as_ref())
            .ok_or_else(|| anyhow::anyhow!("bad address {}", self.addr))?;
        let mut reader = tokio::task::spawn_blocking(move || read_checkpoint(path, tx));
        let mut client = CoordinatorClient::new(channel);
        let call = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        tokio::pin!(call);
        let answered = |sent: std::result::Result<_, tonic::Status>| {
            sent.map(drop)
                .map_err(|s| anyhow::anyhow!("install snapshot on {}: {}", self.addr, s.message()))
        };
        let joined = |read: std::result::Result<anyhow::Result<()>, tokio::task::JoinError>| {
            read.map_err(|e| anyhow::anyhow!("snapshot reader task: {e}"))?
        };
        tokio::select! {
            read = &mut reader => {
                // A reader that failed returns here, dropping the call: the stream is
                // reset, not ended, and the receiver has no trailer either way.
                joined(read)?;
                answered(call.await)
            }
            sent = &mut call => {
                // The receiver answered first: it refused, or it took the trailer
                // just before the reader's end was seen.
                let read = joined(reader.await);
                answered(sent)?;
                read
            }
        }
    }
}

/// Streams the state column family of a checkpoint as chunks of bounded size.
fn read_checkpoint(path: PathBuf, tx: mpsc::Sender<SnapshotChunk>) -> anyhow::Result<()> {
    let db = DB::open_cf_for_read_only(
        &Options::default(),
        &path,
        [CF_LOG, CF_META, CF_STATE],
        false,
    )
    .map_err(|e| anyhow::anyhow!("open snapshot checkpoint {}: {e}", path.display()))?;
    let cf = db
        .cf_handle(CF_STATE)
        .ok_or_else(|| anyhow::anyhow!("checkpoint {} has no state", path.display()))?;
    let mut chunk = Vec::new();
    let mut bytes = 0usize;
    let mut digest = SnapshotDigest::default();
    for item in db.iterator_cf(&cf, IteratorMode::Start) {
        let (key, value) = item.map_err(|e| anyhow::anyhow!("read snapshot checkpoint: {e}"))?;
        bytes += key.len() + value.len();
        digest.add(&key, &value);
        chunk.push(KvPair {
            key: key.to_vec(),
            value: value.to_vec(),
        });
        if bytes >= SNAPSHOT_CHUNK_BYTES {
            let pairs = std::mem::take(&mut chunk);
            bytes = 0;
            tx.blocking_send(SnapshotChunk {
                pairs,
                ..Default::default()
            })
            .map_err(|_| anyhow::anyhow!("snapshot stream closed by receiver"))?;
        }
    }
    tx.blocking_send(SnapshotChunk {
        pairs: chunk,
        trailer: Some(digest.trailer()),
        ..Default::default()
    })
    .map_err(|_| anyhow::anyhow!("snapshot stream closed by receiver"))?;
    Ok(())
}
