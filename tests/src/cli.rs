//! The `kiln` binary under test and bounded runs of its CLI.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// Longest a CLI command may run before the test fails.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns the path of the `kiln` binary: `$KILN_BIN` when set, otherwise `kiln`
/// beside the test executable's `deps` folder (`target/debug/deps/x` →
/// `target/debug/kiln`). Panics if it is missing.
pub fn kiln_bin() -> PathBuf {
    let path = match std::env::var_os("KILN_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("locate the test executable");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("the test executable lives in target/<profile>/deps");
            profile_dir.join(format!("kiln{}", std::env::consts::EXE_SUFFIX))
        }
    };
    if !path.is_file() {
        panic!(
            "build the kiln binary first: cargo build -p kiln-cli (no file at {})",
            path.display()
        );
    }
    path
}

/// Returns a `kiln args...` command with no `KILN_*` variables of ours leaking in.
fn command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(kiln_bin());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KILN_") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `kiln args...` to completion and returns its output; panics if it runs
/// longer than `timeout` (the process is killed then).
pub async fn run_kiln(args: &[&str], timeout: Duration) -> Output {
    let output = command(args).output();
    match tokio::time::timeout(timeout, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("run kiln {}: {e}", args.join(" ")),
        Err(_) => panic!("kiln {} did not exit within {timeout:?}", args.join(" ")),
    }
}

/// Runs `kiln args...` like [`run_kiln`] and also returns its peak resident memory
/// in bytes (VmHWM, read from /proc while it runs).
pub async fn run_kiln_measured(args: &[&str], timeout: Duration) -> (Output, u64) {
    let child = command(args)
        .spawn()
        .unwrap_or_else(|e| panic!("run kiln {}: {e}", args.join(" ")));
    let pid = child.id().expect("a running child has a pid");
    let watcher = tokio::spawn(async move {
        let mut peak = 0;
        while let Some(hwm) = peak_rss(pid) {
            peak = peak.max(hwm);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    });
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("run kiln {}: {e}", args.join(" ")),
        Err(_) => panic!("kiln {} did not exit within {timeout:?}", args.join(" ")),
    };
    let peak = watcher.await.expect("join the memory watcher");
    (output, peak)
}

/// Returns the peak resident memory (VmHWM) of process `pid` in bytes, while it
/// lives.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Returns a command's stderr as text.
pub fn stderr_text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
