//! Leader election, linearizable reads through every node, failover under load
//! without losing an acknowledged write, and a full restart.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_proto::v1::PutRequest;
use kiln_tests::{ClientOptions, Cluster, Writer};

/// Time for a fresh cluster to elect its first leader (process start included).
const FIRST_LEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a write may be impossible after the leader crashes.
const FAILOVER_BOUND: Duration = Duration::from_secs(3);
/// Concurrent writers while the leader crashes.
const WRITERS: usize = 4;
/// Pause between two writes of one writer.
const WRITE_PAUSE: Duration = Duration::from_millis(10);
/// Acknowledged writes per writer before the crash.
const ACKS_BEFORE_CRASH: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_elect_one_leader_and_read_linearizably_through_every_node() {
    let mut cluster = Cluster::start(3, "");
    let (leader, term) = cluster.wait_for_leader(FIRST_LEADER_TIMEOUT).await;

    // Every node, not just a majority, comes to name the same leader at the same term.
    let statuses = cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let leaders: Vec<u64> = statuses
        .iter()
        .filter(|s| s.role == "leader")
        .map(|s| s.id)
        .collect();
    assert_eq!(
        leaders.len(),
        1,
        "exactly one node says it leads: {leaders:?}"
    );
    assert_eq!(
        statuses[0].leader_id, leaders[0],
        "the named leader is the one that leads"
    );
    assert!(statuses[0].term >= term, "the term never goes back");
    if statuses[0].term == term {
        assert_eq!(leaders[0], leader, "two leaders in term {term}");
    }
    let leader = leaders[0];
    for s in &statuses {
        if s.id != leader {
            assert_eq!(s.role, "follower", "node {} is a follower", s.id);
        }
        assert_eq!(
            s.voters.iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([1, 2, 3])
        );
    }

    // A write through any node, followers included, is visible to a linearizable
    // read on every node as soon as the write returns.
    for round in 0..5 {
        for writer_id in [1u64, 2, 3] {
            let key = format!("lin-{round}-{writer_id}");
            let value = format!("from {writer_id} in round {round}");
            cluster
                .put(writer_id, &key, &value)
                .await
                .unwrap_or_else(|e| panic!("write {key} through coordinator {writer_id}: {e}"));
            for reader_id in [1u64, 2, 3] {
                let read = cluster
                    .get(reader_id, &key, false)
                    .await
                    .unwrap_or_else(|e| panic!("read {key} through coordinator {reader_id}: {e}"));
                assert_eq!(
                    read.as_deref(),
                    Some(value.as_str()),
                    "linearizable read of {key} (written through {writer_id}) on {reader_id}"
                );
            }
        }
    }

    // The CLI reads many keys in one call, one value a line in the order asked,
    // and names every key it did not find.
    let out = cluster
        .run_cli(&["kv", "get", "lin-4-3", "lin-0-1", "lin-2-2"])
        .await;
    assert!(out.status.success(), "{}", kiln_tests::stderr_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from 3 in round 4\nfrom 1 in round 0\nfrom 2 in round 2\n"
    );
    let out = cluster
        .run_cli(&["kv", "get", "lin-0-1", "nope-1", "nope-2"])
        .await;
    assert!(!out.status.success(), "missing keys read without an error");
    let stderr = kiln_tests::stderr_text(&out);
    assert!(stderr.contains("not found: nope-1, nope-2"), "{stderr}");
    assert!(out.stdout.is_empty(), "printed values despite missing keys");
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_takes_over_a_crash_without_losing_acknowledged_writes() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(FIRST_LEADER_TIMEOUT).await;
    let all = cluster.cluster_client();

    let writers: Vec<Writer> = (0..WRITERS)
        .map(|i| Writer::spawn(all.clone(), &format!("w{i}"), WRITE_PAUSE))
        .collect();
    let ws = &writers;
    kiln_tests::wait_for(
        Duration::from_secs(15),
        "every writer to get writes acknowledged",
        move || async move {
            let counts: Vec<usize> = ws.iter().map(Writer::acked).collect();
            if counts.iter().all(|&n| n >= ACKS_BEFORE_CRASH) {
                Ok(())
            } else {
                Err(format!("acked per writer {counts:?}"))
            }
        },
    )
    .await;

    cluster.kill(leader);
    let killed_at = Instant::now();

    // A client that knows all three addresses, as a user's does, and starts after
    // the crash: its first success is a write a new leader committed.
    let probe = kiln_common::client::ClusterClient::new(
        cluster
            .coordinator_ids()
            .iter()
            .map(|&id| cluster.addr(id))
            .collect(),
        ClientOptions {
            deadline: Duration::from_secs(10),
            ..cluster.client_options()
        },
    )
    .expect("a client of three addresses");
    probe
        .call(|mut c| async move {
            c.put(PutRequest {
                key: "after-crash".to_string(),
                value: b"probe".to_vec(),
            })
            .await
        })
        .await
        .expect("a write after the leader crashed");
    let failover = killed_at.elapsed();
    eprintln!("first write after the leader crashed: {failover:?}");
    assert!(
        failover <= FAILOVER_BOUND,
        "the first write after the leader crashed took {failover:?} (bound {FAILOVER_BOUND:?})"
    );

    let (new_leader, _) = cluster.wait_for_leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader, "the crashed node cannot lead");

    // Let the writers run under the new leader for a while.
    let acked_at_failover: Vec<usize> = writers.iter().map(Writer::acked).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut logs = Vec::new();
    for writer in writers {
        logs.push(writer.finish().await);
    }
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.acked.len() > acked_at_failover[i],
            "writer {i} got writes acknowledged under the new leader ({} acked, failures: {:?})",
            log.acked.len(),
            log.failures.iter().rev().take(3).collect::<Vec<_>>()
        );
    }

    eprintln!(
        "writers: {:?} acked of {:?} attempted",
        logs.iter().map(|l| l.acked.len()).collect::<Vec<_>>(),
        logs.iter().map(|l| l.attempted.len()).collect::<Vec<_>>()
    );
    let survivors = cluster.live_ids();
    cluster
        .wait_converged(&survivors, Duration::from_secs(10))
        .await;
    for &id in &survivors {
        for log in &logs {
            log.check_on(&cluster, id).await;
        }
        assert_eq!(
            cluster
                .get(id, "after-crash", true)
                .await
                .expect("read the probe key")
                .as_deref(),
            Some("probe"),
            "the probe write is on coordinator {id}"
        );
    }
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_term_and_membership_survive_a_full_restart() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(FIRST_LEADER_TIMEOUT).await;
    // Writes go through followers too, so each must know the leader.
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let keys: Vec<(String, String)> = (0..30)
        .map(|i| (format!("durable-{i:03}"), format!("value {i}")))
        .collect();
    for (i, (key, value)) in keys.iter().enumerate() {
        // Spread the writes over every node; followers forward.
        let via = [1u64, 2, 3][i % 3];
        cluster
            .put(via, key, value)
            .await
            .unwrap_or_else(|e| panic!("write {key} through coordinator {via}: {e}"));
    }
    let before = cluster
        .node_status(leader)
        .await
        .expect("read the leader's status");
    let mut voters_before = before.voters.clone();
    voters_before.sort_unstable();
    assert_eq!(
        voters_before,
        vec![1, 2, 3],
        "three voters before the restart"
    );

    for id in [1u64, 2, 3] {
        let status = cluster.stop(id).await;
        assert!(
            status.success(),
            "coordinator {id} exited with {status} on SIGTERM"
        );
    }
    for id in [1u64, 2, 3] {
        cluster.restart(id);
    }
    let (_, term) = cluster.wait_for_leader(FIRST_LEADER_TIMEOUT).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    assert!(
        term >= before.term,
        "the term went back from {} to {term} across the restart",
        before.term
    );

    for id in [1u64, 2, 3] {
        let status = cluster.node_status(id).await.expect("read a node's status");
        let mut voters = status.voters.clone();
        voters.sort_unstable();
        assert_eq!(
            voters,
            vec![1, 2, 3],
            "voters on coordinator {id} after the restart"
        );
        assert!(
            status.term >= before.term,
            "term on coordinator {id} went back"
        );
        for (key, value) in &keys {
            let read = cluster
                .get(id, key, false)
                .await
                .unwrap_or_else(|e| panic!("read {key} through coordinator {id}: {e}"));
            assert_eq!(
                read.as_deref(),
                Some(value.as_str()),
                "{key} on coordinator {id} after the restart"
            );
        }
    }
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_whose_data_dir_was_wiped_stops_and_the_cluster_keeps_its_data() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(FIRST_LEADER_TIMEOUT).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    for n in 0..30 {
        cluster
            .put(leader, &format!("before-wipe-{n:02}"), "v")
            .await
            .unwrap_or_else(|e| panic!("write before-wipe-{n:02}: {e}"));
    }
    let wiped = cluster.follower_of(leader);
    cluster
        .wait_converged(&cluster.live_ids(), Duration::from_secs(10))
        .await;
    cluster.stop(wiped).await;
    let dir = cluster.data_dir(wiped);
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("wipe {}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("recreate {}: {e}", dir.display()));

    // Started again as a restart starts it (--peers, no --bootstrap), it asks its
    // peers, finds their cluster, and refuses to start, saying how to re-add it.
    cluster.restart(wiped);
    let status = cluster.expect_exit(wiped, Duration::from_secs(30)).await;
    assert!(
        !status.success(),
        "the wiped coordinator exited with {status}"
    );
    let log = cluster.coordinator_log(wiped);
    assert!(
        log.contains("cannot rejoin as itself")
            && log.contains(&format!("kiln admin remove-coordinator {wiped}")),
        "the wiped coordinator's refusal says why and how to re-add it:\n{log}"
    );
    assert_eq!(
        log.matches("bootstrapped a new cluster").count(),
        1,
        "the wiped coordinator bootstrapped again (its log holds every start):\n{log}"
    );

    // Told to bootstrap anyway, it makes a member with no log: the leader's next
    // heartbeat names a commit index it lacks, raft-rs panics on the Raft thread,
    // and the process must stop with the reason, not stay up with its ports open.
    cluster.restart_with(wiped, &["--bootstrap"]);
    let status = cluster.expect_exit(wiped, Duration::from_secs(30)).await;
    assert!(
        !status.success(),
        "the re-bootstrapped coordinator exited with {status}"
    );
    let log = cluster.coordinator_log(wiped);
    assert!(
        log.contains("the raft thread stopped"),
        "the re-bootstrapped coordinator's log names why it stopped:\n{log}"
    );

    // The two others still hold every write and take new ones.
    let live = cluster.live_ids();
    cluster
        .put(leader, "after-wipe", "v")
        .await
        .expect("write with the wiped coordinator stopped");
    for id in live {
        for n in 0..30 {
            let key = format!("before-wipe-{n:02}");
            let read = cluster
                .get(id, &key, false)
                .await
                .unwrap_or_else(|e| panic!("read {key} through coordinator {id}: {e}"));
            assert_eq!(read.as_deref(), Some("v"), "{key} on coordinator {id}");
        }
    }
}
