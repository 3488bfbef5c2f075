//! With two of three coordinators down, writes fail fast with a "no quorum" error,
//! and work again once the nodes are back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::v1::{GetRequest, PutRequest};
use kiln_tests::{run_kiln, stderr_text, ClientOptions, Cluster, ClusterClient, CLI_TIMEOUT};

/// Overall deadline the user's client gives a write.
const CLIENT_DEADLINE: Duration = Duration::from_secs(3);
/// Longest a failing write may take: the deadline plus one second of slack.
const FAIL_BOUND: Duration = Duration::from_secs(4);
/// Longest the CLI may take to give up on a write (its default deadline is 5 s).
const CLI_FAIL_BOUND: Duration = Duration::from_secs(10);
/// Writes attempted while the quorum is lost.
const LOST_WRITES: usize = 3;

/// Returns a client of all three coordinators, as a user configures it.
fn client_of_all(cluster: &Cluster) -> Arc<ClusterClient> {
    let addrs = cluster
        .coordinator_ids()
        .iter()
        .map(|&id| cluster.addr(id))
        .collect();
    Arc::new(
        ClusterClient::new(
            addrs,
            ClientOptions {
                deadline: CLIENT_DEADLINE,
                ..cluster.client_options()
            },
        )
        .expect("a client of three addresses"),
    )
}

async fn put(client: &ClusterClient, key: &str, value: &str) -> kiln_common::Result<u64> {
    client
        .call(|mut c| {
            let request = PutRequest {
                key: key.to_string(),
                value: value.as_bytes().to_vec(),
            };
            async move { c.put(request).await.map(|r| r.into_inner().index) }
        })
        .await
}

async fn get(client: &ClusterClient, key: &str) -> kiln_common::Result<Option<String>> {
    client
        .call(|mut c| {
            let request = GetRequest {
                key: key.to_string(),
                stale: false,
            };
            async move { c.get(request).await.map(|r| r.into_inner()) }
        })
        .await
        .map(|r| {
            r.found
                .then(|| String::from_utf8_lossy(&r.value).into_owned())
        })
}

/// Attempts `LOST_WRITES` writes and checks that each fails within the bound with
/// an error about the quorum. Returns the attempted keys.
async fn attempt_writes_without_quorum(client: &ClusterClient, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for n in 0..LOST_WRITES {
        let key = format!("{prefix}-{n}");
        let started = Instant::now();
        let result = put(client, &key, "lost").await;
        let took = started.elapsed();
        keys.push(key.clone());
        let err = match result {
            Ok(index) => {
                panic!("write {key} succeeded at index {index} with two of three nodes down")
            }
            Err(err) => err,
        };
        assert!(
            took <= FAIL_BOUND,
            "write {key} took {took:?} to fail (client deadline {CLIENT_DEADLINE:?}): {err}"
        );
        assert!(
            err.to_string().to_lowercase().contains("quorum"),
            "write {key} failed, but the error does not say the quorum is lost: {err}"
        );
    }
    keys
}

/// Restarts `down`, waits for a leader, and checks that writes work again.
async fn recover(cluster: &mut Cluster, down: &[u64]) -> Arc<ClusterClient> {
    for &id in down {
        cluster.restart(id);
    }
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    let client = cluster.cluster_client();
    put(&client, "after-recovery", "back")
        .await
        .expect("a write once all nodes are back");
    assert_eq!(
        get(&client, "after-recovery")
            .await
            .expect("read after recovery")
            .as_deref(),
        Some("back")
    );
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_fail_fast_and_are_not_applied_when_the_leader_and_a_follower_crash() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let client = client_of_all(&cluster);
    put(&client, "before", "ok")
        .await
        .expect("a write with all nodes up");

    // The CLI's token, made while the cluster can still commit it, and applied on
    // every node: the node left alive must know it to say "no quorum" rather than
    // refuse an unknown token.
    let token = cluster.admin_token().await;
    cluster
        .wait_converged(&cluster.live_ids(), Duration::from_secs(10))
        .await;
    let follower = cluster
        .live_ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower among three nodes");
    cluster.kill(leader);
    cluster.kill(follower);

    let mut lost = attempt_writes_without_quorum(&client, "lost").await;

    // The CLI reports the same condition as one line, within its own deadline.
    let all = cluster
        .coordinator_ids()
        .iter()
        .map(|&id| cluster.addr(id))
        .collect::<Vec<_>>()
        .join(",");
    let ca = cluster.certs_dir().join("ca.pem").display().to_string();
    let started = Instant::now();
    let output = run_kiln(
        &[
            "--coordinator",
            &all,
            "--ca",
            &ca,
            "--token",
            &token,
            "kv",
            "put",
            "lost-cli",
            "lost",
        ],
        CLI_TIMEOUT,
    )
    .await;
    let took = started.elapsed();
    let stderr = stderr_text(&output);
    assert!(!output.status.success(), "kv put without a quorum exited 0");
    assert!(
        took <= CLI_FAIL_BOUND,
        "kv put without a quorum took {took:?}"
    );
    assert!(
        stderr.trim().starts_with("error:") && stderr.trim().lines().count() == 1,
        "kv put without a quorum printed: {stderr:?}"
    );
    assert!(
        stderr.to_lowercase().contains("quorum"),
        "kv put without a quorum printed: {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    lost.push("lost-cli".to_string());

    // The survivor never had a leader to take these writes, so none may appear.
    let client = recover(&mut cluster, &[leader, follower]).await;
    for key in &lost {
        let read = get(&client, key)
            .await
            .unwrap_or_else(|e| panic!("read {key}: {e}"));
        assert_eq!(
            read, None,
            "{key} was refused for lack of quorum, yet it is stored"
        );
    }
    assert_eq!(
        get(&client, "before")
            .await
            .expect("read before")
            .as_deref(),
        Some("ok")
    );
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_fail_fast_when_both_followers_crash() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let client = client_of_all(&cluster);
    put(&client, "before", "ok")
        .await
        .expect("a write with all nodes up");

    let followers: Vec<u64> = cluster
        .live_ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    for &id in &followers {
        cluster.kill(id);
    }
    let lost = attempt_writes_without_quorum(&client, "lost").await;
    // By now the leader has noticed the loss: these writes are refused before
    // they reach its log.
    let late = attempt_writes_without_quorum(&client, "late").await;

    // The lone leader may have put a write in its log before it noticed; Raft then
    // commits it once the followers return. What may not happen is a different value.
    let client = recover(&mut cluster, &followers).await;
    for key in &late {
        let read = get(&client, key)
            .await
            .unwrap_or_else(|e| panic!("read {key}: {e}"));
        assert!(read.is_none(), "{key} was refused but applied: {read:?}");
    }
    for key in &lost {
        let read = get(&client, key)
            .await
            .unwrap_or_else(|e| panic!("read {key}: {e}"));
        assert!(
            read.is_none() || read.as_deref() == Some("lost"),
            "{key} = {read:?}"
        );
    }
    assert_eq!(
        get(&client, "before")
            .await
            .expect("read before")
            .as_deref(),
        Some("ok")
    );
    cluster.assert_healthy();
}
