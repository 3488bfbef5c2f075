//! The real `mlflow` client through coordinator faults (scripts/mlflow_fault_check.py):
//! - a 200 MB artifact through MLflow's proxy multipart upload while the leading
//!   coordinator (not the one the tracking URI names) is killed: the upload
//!   completes, the bytes read back whole, and the file is never listed
//!   half-written;
//! - the coordinator the tracking URI names restarted while the client logs: the
//!   client's own retries carry it through, and no point is lost or doubled.
//!
//! Skipped (said so) where the mlflow venv cannot be installed, unless
//! `EXPECT_MLFLOW_CLIENT=1`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_tests::mlflow::{client_command, mlflow_python};
use kiln_tests::v1::Role;
use kiln_tests::{http_request, Cluster};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Size of the multipart artifact.
const BIG_MB: u64 = 200;
/// Longest either script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// A running client script whose stdout lines arrive on a channel.
struct Script {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Script {
    fn start(mut command: tokio::process::Command) -> Script {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start the mlflow client script");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Script {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; returns it.
    async fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "the script ended before printing '{prefix}': {}",
                    self.finish_text().await
                ),
                Err(_) => panic!("no '{prefix}' line within {timeout:?}: {:?}", self.seen),
            }
        }
    }

    /// Says whether the script has ended.
    fn ended(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the script to end; panics unless it succeeded. Returns its stdout.
    async fn succeed(mut self) -> Vec<String> {
        let status = tokio::time::timeout(SCRIPT_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the script did not end within {SCRIPT_TIMEOUT:?}"))
            .expect("wait for the script");
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        if !status.success() {
            panic!("the script failed ({status}): {}", self.finish_text().await);
        }
        self.seen
    }

    async fn finish_text(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = stderr.read_to_string(&mut err).await;
        }
        format!("stdout {:?}\n----- stderr\n{err}", self.seen)
    }
}

async fn setup() -> Option<(std::path::PathBuf, Cluster, String, u64, u64)> {
    let python = mlflow_python().await?;
    let cluster = Cluster::start_with_workers("", &["a", "b"], &[]).await;
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let token = cluster.create_token("faults", Role::Operator, 0).await;
    let named = cluster
        .coordinator_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    Some((python, cluster, token, leader, named))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multipart_upload_completes_through_a_leader_death_and_is_never_listed_half_written() {
    let Some((python, mut cluster, token, leader, named)) = setup().await else {
        return;
    };
    let http = cluster.http_addr(named);
    let mut command = client_command(&python, "mlflow_fault_check.py", &cluster, &http, &token);
    command.args(["multipart", &BIG_MB.to_string()]);
    let mut script = Script::start(command);
    let started = script.wait_line("UPLOADING", Duration::from_secs(60)).await;
    let words: Vec<&str> = started.split_whitespace().collect();
    let (experiment, run) = (words[1].to_string(), words[2].to_string());

    // Until the script ends, the file is either absent or listed whole. The leader
    // dies while the parts go up, once the file has been seen absent.
    let listing =
        format!("/api/2.0/mlflow-artifacts/artifacts?path={experiment}/{run}/artifacts/blobs");
    let mut polls = 0;
    let mut killed = false;
    while !script.ended() {
        let (status, text) = http_request(&http, "GET", &listing, Some(&token), None).await;
        if status == 200 {
            let answer: Value = serde_json::from_str(&text).expect("a listing is JSON");
            for file in answer["files"].as_array().into_iter().flatten() {
                assert_eq!(
                    file["file_size"].as_u64(),
                    Some(BIG_MB << 20),
                    "listed half-written: {text}"
                );
            }
            polls += 1;
        }
        if polls > 0 && !killed {
            cluster.kill(leader);
            killed = true;
            println!("killed the leader, coordinator {leader}, during the upload");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed,
        "the upload ended before a listing answered: {:?}",
        script.seen
    );
    let lines = script.succeed().await;
    assert!(
        lines.iter().any(|l| l == &format!("OK {}", BIG_MB << 20)),
        "the bytes were not read back whole: {lines:?}"
    );
    println!("{} listings during the upload; {lines:?}", polls);

    // It went up in parts, every one stored, and was completed once: the client
    // did not fall back to one PUT.
    let audit = cluster.run_cli(&["audit", "--json"]).await;
    let audit: Value = serde_json::from_slice(&audit.stdout).expect("kiln audit --json");
    let records = audit.as_array().expect("a list");
    let said = |what: &str| {
        records
            .iter()
            // "ok", or "ok: N" when the command answered a number.
            .filter(|r| r["outcome"].as_str().is_some_and(|o| o.starts_with("ok")))
            .filter_map(|r| r["what"].as_str())
            .filter(|w| w.contains(what))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let parts = BIG_MB.div_ceil(10);
    assert_eq!(
        said("start uploading blobs/big.bin"),
        vec![format!(
            "start uploading blobs/big.bin into mlflow-run-{run} in {parts} parts"
        )]
    );
    let stored: std::collections::BTreeSet<String> = said("store part ")
        .iter()
        .filter_map(|w| w.split_whitespace().nth(2).map(str::to_string))
        .collect();
    assert_eq!(stored.len() as u64, parts, "parts stored: {stored:?}");
    let uploads: Vec<&Value> = records
        .iter()
        .filter(|r| r["what"].as_str().is_some_and(|w| w.contains("upload")))
        .collect();
    assert_eq!(said("complete upload").len(), 1, "{uploads:#?}");
    cluster.restart(leader);
    cluster.wait_for_agreement(Duration::from_secs(20)).await;
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_retries_through_a_restart_of_the_coordinator_it_names() {
    let Some((python, mut cluster, token, _, named)) = setup().await else {
        return;
    };
    let http = cluster.http_addr(named);
    let mut command = client_command(&python, "mlflow_fault_check.py", &cluster, &http, &token);
    command.args(["retry", "60"]);
    let mut script = Script::start(command);
    script.wait_line("LOGGED 10", Duration::from_secs(60)).await;
    // Down for 2 s: the client's first retries fail, a later one (MLflow backs off
    // 0, 4, 8, ... s, seven times by default) reaches it again.
    cluster.kill(named);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(named);
    println!("restarted coordinator {named}, the one the tracking URI names");
    let lines = script.succeed().await;
    assert!(
        lines.iter().any(|l| l == "OK 60"),
        "the client did not log all 60 points: {lines:?}"
    );
    cluster.wait_for_agreement(Duration::from_secs(20)).await;
    cluster.assert_healthy();
}
