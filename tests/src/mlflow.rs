//! MLflow in tests: the real `mlflow` Python client's venv that scripts/env.sh
//! installs once (`kiln_mlflow_python`), bounded runs of its scripts, and
//! [`mlflow_call`], one call of MLflow's REST API as its client makes it.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{http_request, stderr_text, Cluster};

/// Longest `kiln_mlflow_python` may take: a first install from PyPI takes minutes.
const VENV_INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// Returns the repository root (the tests crate is one of its members).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace root")
        .to_path_buf()
}

/// Runs `command` to completion within `timeout`, killing it after; panics if it
/// cannot start or overruns, naming `what`.
pub async fn run_bounded(
    mut command: tokio::process::Command,
    timeout: Duration,
    what: &str,
) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("start {what}: {e}"),
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// Returns the python of the MLflow venv, installing it on first use, or `None`
/// when it cannot be installed (and the test may skip).
pub async fn mlflow_python() -> Option<PathBuf> {
    let mut command = tokio::process::Command::new("bash");
    command
        .args(["-c", "source scripts/env.sh && kiln_mlflow_python"])
        .current_dir(repo_root());
    let out = run_bounded(command, VENV_INSTALL_TIMEOUT, "kiln_mlflow_python").await;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !path.is_empty() {
        return Some(PathBuf::from(path));
    }
    let why = format!(
        "scripts/env.sh's kiln_mlflow_python could not install the mlflow venv ({}): {}",
        out.status,
        stderr_text(&out)
    );
    assert!(
        std::env::var("EXPECT_MLFLOW_CLIENT").as_deref() != Ok("1"),
        "EXPECT_MLFLOW_CLIENT=1 but {why}"
    );
    println!("SKIPPED: {why}");
    None
}

/// Returns a command that runs `script` (under scripts/) with the mlflow venv's
/// `python`, pointed at `http_addr` with `token` and the cluster's CA, and none
/// of the caller's own MLflow settings (experiment, run, credentials).
pub fn client_command(
    python: &Path,
    script: &str,
    cluster: &Cluster,
    http_addr: &str,
    token: &str,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(python);
    command.arg(repo_root().join("scripts").join(script));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MLFLOW_") {
            command.env_remove(key);
        }
    }
    let ca = cluster.certs_dir().join("ca.pem");
    command
        .env("MLFLOW_TRACKING_URI", format!("https://{http_addr}"))
        .env("MLFLOW_TRACKING_TOKEN", token)
        .env("MLFLOW_TRACKING_SERVER_CERT_PATH", &ca)
        // MLflow sends multipart parts with bare `requests`, which reads this.
        .env("REQUESTS_CA_BUNDLE", &ca);
    command
}

/// Calls MLflow's REST API (`/api/2.0/mlflow/<path>`) with a bearer token; returns
/// the status and the JSON answer (panics on a body that is not JSON: MLflow's
/// client needs JSON on every answer, errors included).
pub async fn mlflow_call(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = http_request(
        addr,
        method,
        &format!("/api/2.0/mlflow/{path}"),
        Some(token),
        body.as_deref(),
    )
    .await;
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    (status, value)
}
