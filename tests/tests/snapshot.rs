//! A follower that was down while the log was compacted catches up from a snapshot;
//! a snapshot stream cut short is refused and leaves the receiver's state alone.

use std::time::Duration;

use kiln_proto::v1::{KvPair, PutRequest, RaftBatch, SnapshotChunk, SnapshotTrailer};
use kiln_tests::Cluster;
use prost_raft::Message as _;
use raft::eraftpb::{ConfState, Message, MessageType, Snapshot, SnapshotMetadata};
use tokio::task::JoinSet;

/// Snapshots every 200 entries and keeps only 20 behind one, so that 1000 writes
/// compact the log far past a stopped follower.
const CONFIG: &str = "[raft]\nsnapshot_threshold_entries = 200\nlog_keep_entries = 20\n";
const KEYS: usize = 1000;
/// Writes in flight at once while filling the log.
const CONCURRENT_WRITES: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(3, CONFIG);
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let follower = cluster.follower_of(leader);
    cluster.stop(follower).await;

    let client = cluster.cluster_client();
    let mut tasks = JoinSet::new();
    for lane in 0..CONCURRENT_WRITES {
        let client = client.clone();
        tasks.spawn(async move {
            for n in (lane..KEYS).step_by(CONCURRENT_WRITES) {
                let key = format!("snap-{n:04}");
                let value = format!("value-{n}");
                client
                    .call(|mut c| {
                        let request = PutRequest {
                            key: key.clone(),
                            value: value.clone().into_bytes(),
                        };
                        async move { c.put(request).await }
                    })
                    .await
                    .unwrap_or_else(|e| panic!("write {key} with one follower down: {e}"));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a writing task panicked");
    }

    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let leader_status = cluster
        .node_status(leader)
        .await
        .expect("read the leader's status");
    assert!(
        leader_status.first_index > 1 && leader_status.snapshot_index > 0,
        "the leader compacted its log after {KEYS} writes (first index {}, snapshot index {})",
        leader_status.first_index,
        leader_status.snapshot_index
    );

    cluster.restart(follower);
    let live = cluster.live_ids();
    let applied = cluster.wait_converged(&live, Duration::from_secs(30)).await;
    assert!(
        applied >= leader_status.commit_index,
        "the nodes converged at {applied}, before the leader's commit index {}",
        leader_status.commit_index
    );

    let mut missing = Vec::new();
    for n in 0..KEYS {
        let key = format!("snap-{n:04}");
        let read = cluster
            .get(follower, &key, true)
            .await
            .unwrap_or_else(|e| panic!("read {key} from the restarted follower: {e}"));
        if read.as_deref() != Some(format!("value-{n}").as_str()) {
            missing.push(format!("{key} = {read:?}"));
        }
    }
    assert!(
        missing.is_empty(),
        "the restarted follower lacks {} of {KEYS} keys, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    let status = cluster
        .node_status(follower)
        .await
        .expect("read the restarted follower's status");
    eprintln!(
        "restarted follower: snapshots received {}, first index {}, applied {}; leader first index {}",
        status.snapshots_received, status.first_index, status.applied_index, leader_status.first_index
    );
    assert!(
        status.snapshots_received >= 1,
        "the restarted follower received no snapshot: {status:?}"
    );
    assert!(
        status.first_index > 1,
        "the restarted follower's log starts at {} (it replayed the whole log)",
        status.first_index
    );
    cluster.assert_healthy();
}

/// The first chunk of a snapshot stream from `leader` to `to`: a snapshot far ahead
/// of everything applied, so that a receiver that installed it would replace its
/// whole state with the pairs that follow.
fn snapshot_offer(leader: u64, leader_addr: &str, to: u64, term: u64, index: u64) -> SnapshotChunk {
    let mut meta = SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    meta.set_conf_state(ConfState {
        voters: vec![1, 2, 3],
        ..Default::default()
    });
    let mut snapshot = Snapshot::default();
    snapshot.set_metadata(meta);
    let mut message = Message {
        to,
        from: leader,
        term,
        ..Default::default()
    };
    message.set_msg_type(MessageType::MsgSnapshot);
    message.set_snapshot(snapshot);
    SnapshotChunk {
        from_id: leader,
        from_addr: leader_addr.to_string(),
        message: message.encode_to_vec(),
        pairs: vec![KvPair {
            key: b"kv/only-this".to_vec(),
            value: b"1".to_vec(),
        }],
        trailer: None,
        cluster_id: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_stream_cut_short_or_corrupted_is_refused_and_the_state_stays_whole() {
    let mut cluster = Cluster::start(3, CONFIG);
    let (leader, term) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    const WRITTEN: usize = 20;
    for n in 0..WRITTEN {
        cluster
            .put(leader, &format!("kept-{n:02}"), &format!("v{n}"))
            .await
            .unwrap_or_else(|e| panic!("write kept-{n:02}: {e}"));
    }
    let follower = cluster.follower_of(leader);
    cluster
        .wait_converged(&cluster.live_ids(), Duration::from_secs(10))
        .await;
    let before = cluster
        .node_status(follower)
        .await
        .expect("the follower's status");
    let offer = || {
        snapshot_offer(
            leader,
            &cluster.addr(leader),
            follower,
            term,
            before.applied_index + 1000,
        )
    };

    // Cut short: the stream ends after its pairs, with no trailer.
    let refused = cluster
        .client(follower)
        .install_snapshot(tokio_stream::iter(vec![offer()]))
        .await
        .expect_err("a snapshot stream without its trailer was installed");
    assert!(
        refused
            .message()
            .contains("without its trailer: it was cut short"),
        "the refusal names the missing trailer: {refused:?}"
    );

    // Corrupted: the trailer counts the pairs but its digest is of other bytes.
    let mut wrong = offer();
    wrong.trailer = Some(SnapshotTrailer {
        pairs: 1,
        digest: vec![0; 32],
    });
    let refused = cluster
        .client(follower)
        .install_snapshot(tokio_stream::iter(vec![wrong]))
        .await
        .expect_err("a snapshot stream with a wrong digest was installed");
    assert!(
        refused.message().contains("differs from the sender's"),
        "the refusal names the digest: {refused:?}"
    );

    // Pairs after the trailer.
    let mut early = offer();
    early.trailer = Some(SnapshotTrailer {
        pairs: 1,
        digest: Vec::new(),
    });
    let late = SnapshotChunk {
        pairs: vec![KvPair {
            key: b"kv/late".to_vec(),
            value: b"2".to_vec(),
        }],
        ..Default::default()
    };
    let refused = cluster
        .client(follower)
        .install_snapshot(tokio_stream::iter(vec![early, late]))
        .await
        .expect_err("a snapshot stream with pairs after its trailer was installed");
    assert!(
        refused.message().contains("pairs after the trailer"),
        "the refusal names the late pairs: {refused:?}"
    );

    let after = cluster
        .node_status(follower)
        .await
        .expect("the follower's status after the refusals");
    assert_eq!(
        after.snapshots_received, before.snapshots_received,
        "a refused stream counted as a received snapshot"
    );
    for n in 0..WRITTEN {
        let key = format!("kept-{n:02}");
        let read = cluster
            .get(follower, &key, true)
            .await
            .unwrap_or_else(|e| panic!("read {key} from the follower: {e}"));
        assert_eq!(
            read.as_deref(),
            Some(format!("v{n}").as_str()),
            "the follower lost {key} to a refused snapshot"
        );
    }
    // Where the receiver spools (it made the dir before the first refusal): a
    // wrong path fails here rather than finding nothing.
    let spool_dir = cluster.data_dir(follower).join("raft").join("snapshots");
    let spools: Vec<_> = std::fs::read_dir(&spool_dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", spool_dir.display()))
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("incoming-"))
        .collect();
    assert!(spools.is_empty(), "refused streams left spools: {spools:?}");

    // Every member knows the cluster's id, and a batch of another cluster (a node
    // left over from an earlier cluster on the same address) is refused.
    let mut ids = Vec::new();
    for id in cluster.live_ids() {
        ids.push(
            cluster
                .node_status(id)
                .await
                .expect("a node's status")
                .cluster_id,
        );
    }
    assert!(
        ids[0] != 0 && ids.iter().all(|&id| id == ids[0]),
        "the members' cluster ids: {ids:x?}"
    );
    let refused = cluster
        .client(follower)
        .raft(RaftBatch {
            from_id: leader,
            from_addr: cluster.addr(leader),
            messages: Vec::new(),
            cluster_id: ids[0] ^ 1,
        })
        .await
        .expect_err("a raft batch of another cluster was taken");
    assert!(
        refused
            .message()
            .contains(&format!("of cluster {:016x}", ids[0] ^ 1)),
        "the refusal names the other cluster: {refused:?}"
    );

    // The cluster goes on: a new write reaches the follower.
    cluster
        .put(leader, "after-refusals", "yes")
        .await
        .expect("write after the refusals");
    cluster
        .wait_converged(&cluster.live_ids(), Duration::from_secs(10))
        .await;
    assert_eq!(
        cluster
            .get(follower, "after-refusals", true)
            .await
            .expect("read after the refusals")
            .as_deref(),
        Some("yes")
    );
    cluster.assert_healthy();
}
