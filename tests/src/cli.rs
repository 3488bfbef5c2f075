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

/// Runs `kiln args...` to completion and returns its output; panics if it runs
/// longer than `timeout` (the process is killed then).
pub async fn run_kiln(args: &[&str], timeout: Duration) -> Output {
    let bin = kiln_bin();
    let mut command = tokio::process::Command::new(&bin);
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
    let output = command.output();
    match tokio::time::timeout(timeout, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("run {} {}: {e}", bin.display(), args.join(" ")),
        Err(_) => panic!("kiln {} did not exit within {timeout:?}", args.join(" ")),
    }
}

/// Returns a command's stderr as text.
pub fn stderr_text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
