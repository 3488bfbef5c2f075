//! Every user mistake ends the process with a non-zero status and one stderr line
//! that starts with "error:" and names the problem; nothing panics.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use kiln_tests::{free_port, run_kiln, stderr_text};
use tempfile::TempDir;

/// Longest a refused command may run: it must fail, not serve.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest the CLI may try an unreachable coordinator.
const UNREACHABLE_BOUND: Duration = Duration::from_secs(10);

/// Checks the shape of a refusal; `needles` are alternatives, one of which the
/// message must contain (case-insensitive).
fn assert_refused(output: &Output, what: &str, needles: &[&str]) {
    let stderr = stderr_text(output);
    assert!(
        !output.status.success(),
        "{what}: exited 0; stderr {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{what}: panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one stderr line, got {stderr:?}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("error: "),
        "{what}: line does not start with 'error: ': {line:?}"
    );
    let lower = line.to_lowercase();
    assert!(
        needles.iter().any(|n| lower.contains(&n.to_lowercase())),
        "{what}: the message names none of {needles:?}: {line:?}"
    );
}

/// Returns the arguments of a valid single-node coordinator in `dir`, with
/// `--listen` and `--peers` filled in from `listen`.
fn coordinator_args(dir: &Path, listen: &str, peers: &str) -> Vec<String> {
    vec![
        "coordinator".to_string(),
        "--id".to_string(),
        "1".to_string(),
        "--data-dir".to_string(),
        dir.join("data").display().to_string(),
        "--listen".to_string(),
        listen.to_string(),
        "--http".to_string(),
        format!("127.0.0.1:{}", free_port()),
        "--peers".to_string(),
        peers.to_string(),
    ]
}

async fn run(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_kiln(&args, REFUSAL_TIMEOUT).await
}

/// Returns the args of a coordinator that reads `config` from a file in `dir`.
fn with_config(dir: &TempDir, file_name: &str, config: &str) -> Vec<String> {
    let path = dir.path().join(file_name);
    std::fs::write(&path, config).expect("write the config file");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = coordinator_args(dir.path(), &listen, &format!("1={listen}"));
    args.push("--config".to_string());
    args.push(path.display().to_string());
    args
}

#[tokio::test]
async fn a_malformed_config_file_is_refused() {
    let dir = TempDir::new().expect("temporary dir");
    let args = with_config(&dir, "malformed.toml", "id = \n");
    let output = run(&args).await;
    assert_refused(&output, "malformed toml", &["malformed.toml"]);
}

#[tokio::test]
async fn an_unknown_config_key_is_named() {
    let dir = TempDir::new().expect("temporary dir");
    let args = with_config(&dir, "unknown.toml", "[raft]\ntick_msec = 5\n");
    let output = run(&args).await;
    assert_refused(&output, "unknown key", &["tick_msec"]);
}

#[tokio::test]
async fn a_node_listed_twice_in_peers_is_refused() {
    let dir = TempDir::new().expect("temporary dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let peers = format!("1={listen},1=127.0.0.1:{}", free_port());
    let output = run(&coordinator_args(dir.path(), &listen, &peers)).await;
    assert_refused(&output, "peer listed twice", &["listed twice"]);
}

#[tokio::test]
async fn an_empty_data_dir_without_bootstrap_is_refused_with_what_to_do() {
    let dir = TempDir::new().expect("temporary dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = coordinator_args(dir.path(), &listen, &format!("1={listen}"));
    args.push("--insecure".to_string());
    let output = run(&args).await;
    // The config is valid, so the node logs its start (the --insecure warning)
    // before it looks at its data dir: the refusal is the last line.
    let text = stderr_text(&output);
    assert!(!output.status.success(), "exited 0: {text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("holds no cluster and no peer answered")
            && last.contains("--bootstrap")
            && last.contains("--join"),
        "the refusal says how to make or enter a cluster: {text}"
    );
    assert!(
        !dir.path().join("data").join("raft").join("db").exists(),
        "the refused start left a store behind"
    );

    args.push("--bootstrap".to_string());
    args.push("--join".to_string());
    args.push(listen.clone());
    let output = run(&args).await;
    assert_refused(&output, "--bootstrap with --join", &["not both"]);
}

#[tokio::test]
async fn a_bad_listen_address_is_refused() {
    let dir = TempDir::new().expect("temporary dir");
    let peer = format!("1=127.0.0.1:{}", free_port());
    let output = run(&coordinator_args(dir.path(), "nowhere", &peer)).await;
    assert_refused(&output, "bad listen address", &["listen", "nowhere"]);
}

#[tokio::test]
async fn an_unreachable_coordinator_is_reported_promptly() {
    // Nothing listens on a port that was just found free.
    let addr = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let output = run_kiln(&["--coordinator", &addr, "status"], REFUSAL_TIMEOUT).await;
    let took = started.elapsed();
    assert_refused(
        &output,
        "unreachable coordinator",
        &[&addr, "unreachable", "reach"],
    );
    assert!(
        took <= UNREACHABLE_BOUND,
        "gave up after {took:?} (bound {UNREACHABLE_BOUND:?})"
    );
}

#[tokio::test]
async fn a_misspelt_kiln_variable_is_refused_by_name() {
    let output = tokio::time::timeout(
        REFUSAL_TIMEOUT,
        tokio::process::Command::new(kiln_tests::kiln_bin())
            .args(["--coordinator", "127.0.0.1:1", "status"])
            .env("KILN_PEEERS", "1=127.0.0.1:1")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("kiln exits")
    .expect("run kiln");
    assert_refused(&output, "misspelt variable", &["KILN_PEEERS"]);
}
