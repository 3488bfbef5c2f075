//! [`Proc`]: one `kiln` child process of a test.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::wait::POLL_INTERVAL;

/// A running child process whose stdout and stderr go to a log file. Dropping it
/// kills the process with SIGKILL and reaps it, so a failing test leaves no node
/// behind.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Starts `bin args...`, appending its output to `log` after a header line.
    pub fn spawn(name: &str, bin: &Path, args: &[String], log: &Path) -> Proc {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open log file {}: {e}", log.display()));
        writeln!(
            file,
            "===== start {name}: {} {}",
            bin.display(),
            args.join(" ")
        )
        .unwrap_or_else(|e| panic!("write log file {}: {e}", log.display()));
        let stderr = file
            .try_clone()
            .unwrap_or_else(|e| panic!("clone log file handle {}: {e}", log.display()));
        let mut command = Command::new(bin);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr))
            .env("RUST_BACKTRACE", "1")
            // Logs go to a file that people read; no terminal colours in it.
            .env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // The nodes read `KILN_*` variables as flags; the test's flags must be all there is.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KILN_") {
                command.env_remove(key);
            }
        }
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", bin.display()));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    /// Returns the process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the exit status if the process has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Freezes the process with SIGSTOP (a hung machine: it neither runs nor
    /// answers, and its sockets stay open).
    pub fn pause(&self) {
        send_signal(self.pid(), libc::SIGSTOP, "SIGSTOP");
    }

    /// Lets a frozen process run again with SIGCONT.
    pub fn resume(&self) {
        send_signal(self.pid(), libc::SIGCONT, "SIGCONT");
    }

    /// Kills the process with SIGKILL (a crash: nothing is flushed) and reaps it.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit; panics, after
    /// killing it, if it does not.
    pub async fn terminate(mut self, grace: Duration) -> ExitStatus {
        if let Some(status) = self.exited() {
            panic!("{} had already exited before SIGTERM: {status}", self.name);
        }
        send_sigterm(self.pid());
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("wait for {}: {e}", self.name),
            }
            if started.elapsed() >= grace {
                self.kill_and_reap();
                panic!("{} did not exit within {grace:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn kill_and_reap(&mut self) {
        // kill fails only when the child was already reaped; wait then returns at once.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn send_sigterm(pid: u32) {
    send_signal(pid, libc::SIGTERM, "SIGTERM");
}

#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int, name: &str) {
    let pid = libc::pid_t::try_from(pid).expect("a child pid fits in pid_t");
    // SAFETY: kill(2) takes two integers and touches none of our memory. The pid is
    // that of our own child, not yet reaped, so it cannot name another process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        panic!(
            "send {name} to pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Asks Linux to SIGKILL the child when the thread that started it dies, so that a
/// test binary killed by a timeout leaves no node running. The signal follows the
/// starting thread, not the process: nodes are started from the test's own thread,
/// which outlives its cluster.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and calls only prctl(2),
    // which is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}
