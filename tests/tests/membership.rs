//! Membership changes under load: a fourth coordinator joins and becomes a voter,
//! then a follower and then the leader are removed, while writes keep succeeding.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_tests::{longest_ack_gap, stderr_text, wait_for, Cluster, Writer};

/// Concurrent background writers.
const WRITERS: usize = 2;
/// Pause between two writes of one writer.
const WRITE_PAUSE: Duration = Duration::from_millis(20);
/// Longest stretch in which no writer may get an acknowledgement: one election plus
/// the client's retries.
const MAX_WRITE_GAP: Duration = Duration::from_secs(5);
/// Time for a membership change to take effect.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until a node of `expected` leads with exactly `expected` as its voters and
/// a majority of `expected` names it at its term; returns its id.
async fn wait_for_voters(cluster: &Cluster, expected: &BTreeSet<u64>) -> u64 {
    let what = format!("voters {expected:?} under a leader among them");
    wait_for(CHANGE_TIMEOUT, &what, move || async move {
        let mut statuses = Vec::new();
        for &id in expected {
            if let Ok(status) = cluster.node_status(id).await {
                statuses.push(status);
            }
        }
        for leader in statuses.iter().filter(|s| s.role == "leader") {
            let voters: BTreeSet<u64> = leader.voters.iter().copied().collect();
            let backers = statuses
                .iter()
                .filter(|s| s.leader_id == leader.id && s.term == leader.term)
                .count();
            if voters == *expected && backers > expected.len() / 2 {
                return Ok(leader.id);
            }
        }
        Err(format!(
            "{:?}",
            statuses
                .iter()
                .map(|s| (
                    s.id,
                    s.role.clone(),
                    s.term,
                    s.leader_id,
                    s.voters.clone(),
                    s.learners.clone()
                ))
                .collect::<Vec<_>>()
        ))
    })
    .await
}

/// Removes coordinator `id` with the CLI and checks that the command succeeded.
async fn remove_with_cli(cluster: &Cluster, id: u64) {
    let id_text = id.to_string();
    let output = cluster
        .run_cli(&["admin", "remove-coordinator", &id_text])
        .await;
    assert!(
        output.status.success(),
        "kiln admin remove-coordinator {id} failed: {}",
        stderr_text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joined_node_becomes_a_voter_and_removals_keep_writes_flowing() {
    let mut cluster = Cluster::start(3, "");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    let client = cluster.cluster_client();
    let writers: Vec<Writer> = (0..WRITERS)
        .map(|i| Writer::spawn(client.clone(), &format!("m{i}"), WRITE_PAUSE))
        .collect();
    let ws = &writers;
    wait_for(
        Duration::from_secs(15),
        "the writers to get going",
        move || async move {
            let counts: Vec<usize> = ws.iter().map(Writer::acked).collect();
            if counts.iter().all(|&n| n >= 10) {
                Ok(())
            } else {
                Err(format!("acked per writer {counts:?}"))
            }
        },
    )
    .await;
    let changes_started = Instant::now();

    // Join: coordinator 4 starts as a learner and is promoted once caught up.
    cluster.add_coordinator(4);
    let with_four = BTreeSet::from([1, 2, 3, 4]);
    let leader = wait_for_voters(&cluster, &with_four).await;
    let marker_index = cluster
        .put(leader, "joined-marker", "4 is a voter")
        .await
        .expect("write a marker after coordinator 4 became a voter");
    let c = &cluster;
    wait_for(
        CHANGE_TIMEOUT,
        "coordinator 4 to apply the marker",
        move || async move {
            let status = c.node_status(4).await.map_err(|e| e.to_string())?;
            let marker = c
                .get(4, "joined-marker", true)
                .await
                .map_err(|e| e.to_string())?;
            if status.role == "follower" && marker.is_some() && status.applied_index >= marker_index
            {
                Ok(())
            } else {
                Err(format!(
                    "role {}, applied {}, marker {marker:?}",
                    status.role, status.applied_index
                ))
            }
        },
    )
    .await;

    // Remove a follower among the original three.
    let follower = [1u64, 2, 3]
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower among the original three");
    remove_with_cli(&cluster, follower).await;
    let mut expected = with_four.clone();
    expected.remove(&follower);
    let leader = wait_for_voters(&cluster, &expected).await;
    cluster.kill(follower);

    // Remove the leader itself: the others elect a new one among them.
    remove_with_cli(&cluster, leader).await;
    expected.remove(&leader);
    let new_leader = wait_for_voters(&cluster, &expected).await;
    assert_ne!(new_leader, leader, "the removed leader still leads");
    cluster.kill(leader);

    // Writes go on under the final membership.
    let acked_after_changes: Vec<usize> = writers.iter().map(Writer::acked).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let changes_done = Instant::now();
    let mut logs = Vec::new();
    for writer in writers {
        logs.push(writer.finish().await);
    }
    for (i, log) in logs.iter().enumerate() {
        assert!(
            log.acked.len() > acked_after_changes[i],
            "writer {i} got no write acknowledged under the final membership; last failures: {:?}",
            log.failures.iter().rev().take(3).collect::<Vec<_>>()
        );
    }
    let gap = longest_ack_gap(&logs, changes_started, changes_done);
    eprintln!(
        "membership changes took {:?}; longest write gap {gap:?}; writers {:?} acked of {:?} attempted",
        changes_done - changes_started,
        logs.iter().map(|l| l.acked.len()).collect::<Vec<_>>(),
        logs.iter().map(|l| l.attempted.len()).collect::<Vec<_>>()
    );
    assert!(
        gap <= MAX_WRITE_GAP,
        "writes stalled for {gap:?} during the membership changes (bound {MAX_WRITE_GAP:?})"
    );

    let remaining: Vec<u64> = expected.iter().copied().collect();
    assert_eq!(
        cluster.live_ids(),
        remaining,
        "the running nodes are the final voters"
    );
    cluster
        .wait_converged(&remaining, Duration::from_secs(10))
        .await;
    for &id in &remaining {
        let status = cluster
            .node_status(id)
            .await
            .expect("read a final voter's status");
        let voters: BTreeSet<u64> = status.voters.iter().copied().collect();
        assert_eq!(voters, expected, "voters as coordinator {id} sees them");
        assert!(
            status.learners.is_empty(),
            "learners left on coordinator {id}: {:?}",
            status.learners
        );
        for log in &logs {
            log.check_on(&cluster, id).await;
        }
    }
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joined_node_restarts_as_a_voter_with_its_data() {
    let mut cluster = Cluster::start(3, "");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.add_coordinator(4);
    let all: BTreeSet<u64> = [1, 2, 3, 4].into_iter().collect();
    let leader = wait_for_voters(&cluster, &all).await;
    cluster
        .put(leader, "before-crash", "1")
        .await
        .expect("write with four voters");

    // A crash of the joined node: it restarts with the same arguments (--join
    // included) and must come back from its own data, not ask to join again.
    cluster.kill(4);
    let leader = wait_for_voters(&cluster, &all).await;
    cluster
        .put(leader, "while-down", "2")
        .await
        .expect("three of four voters commit");
    cluster.restart(4);
    wait_for(CHANGE_TIMEOUT, "node 4 catches up", || async {
        match cluster.get(4, "while-down", true).await {
            Ok(Some(v)) if v == "2" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        cluster.get(4, "before-crash", true).await.expect("read"),
        Some("1".to_string())
    );
    let status = cluster.node_status(4).await.expect("status of node 4");
    assert_eq!(status.voters, vec![1, 2, 3, 4]);
    assert!(status.learners.is_empty(), "learners {:?}", status.learners);
    cluster.assert_healthy();
}
