//! A follower that was down while the log was compacted catches up from a snapshot.

use std::time::Duration;

use kiln_proto::v1::PutRequest;
use kiln_tests::Cluster;
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
    let follower = cluster
        .live_ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower among three nodes");
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
