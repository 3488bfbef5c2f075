//! A rank of a command job: the user's own program (a PyTorch DDP script, an
//! XGBoost script, any executable) run as a process of its own, with torchrun's
//! environment, beside the built-in trainer ([`super::shard`] runs both: the
//! task, the report, the rendezvous and the lease are the same).
//!
//! ```text
//!  report Ready ─► pull code, data, checkpoint; build the pip environment
//!        ─► rank 0 reserves MASTER_PORT ─► report Ready(host:port)
//!        ─► rendezvous (every rank's address) ─► spawn in its own process group
//!        ─► lines to the rank's log file and the job's log; rank 0 pushes each new
//!           checkpoint directory ─► exit 0: rank 0 pushes KILN_OUTPUT_DIR (and
//!           registers its model.onnx) ─► report Succeeded
//!                                   exit ≠ 0 ─► report Failed(rank, code, last lines)
//!  stop (cancel, lapse, restart) ─► SIGTERM to the group ─► SIGKILL after grace_secs
//! ```
//!
//! No process of a rank outlives it: the rank leads its own process group, the
//! whole group is killed when the rank ends (its children included), the leader
//! gets SIGKILL if the worker dies (`PR_SET_PDEATHSIG`), and a worker that was
//! killed reaps the groups its earlier life left ([`reap_orphans`]).
//!
//! Process groups, signals, the parent-death signal, CPU affinity and file
//! locks are system calls through `libc` that std does not wrap, which is why
//! this module allows unsafe code; each call says why it is sound.

#![allow(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_common::jobspec::{Code, CommandJob, JobSpec, Runtime, RANK_VARIABLES};
use kiln_common::transfer::PushOptions;
use kiln_proto::v1::{ModelVersion, ReportShard, ShardState, ShardTask};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::limits::RankCgroup;
use super::shard::{
    checkpoint_artifact, pull, push, register, rendezvous, Outcome, Reporter, ShardContext,
    ShardResult, MODEL_FILE,
};

/// Longest line kept from a rank's output; the rest of a longer line is cut.
const MAX_LINE_BYTES: usize = 2_000;
/// Lines of a rank's output kept for its failure reason.
const LAST_LINES: usize = 20;
/// Bytes of a rank's log file before it is rotated (one older file is kept).
pub const MAX_LOG_FILE_BYTES: u64 = 16 << 20;
/// Lines a rank forwards to the job's log each second; the rest stay in its
/// log file on the worker.
const FORWARDED_LINES_PER_SEC: usize = 100;
/// Time between two reports (log lines, checkpoints) of a running rank.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Time between two looks at the checkpoint directory.
const CHECKPOINT_POLL: Duration = Duration::from_secs(1);
/// Job log directories kept on a worker.
const KEPT_LOG_DIRS: usize = 200;

/// Where a rank's output is kept on the worker: `logs/job<ID>/a<ATTEMPT>-r<RANK>.log`.
pub fn log_path(work_dir: &Path, job_id: u64, attempt: u32, rank: u32) -> PathBuf {
    work_dir
        .join("logs")
        .join(format!("job{job_id}"))
        .join(format!("a{attempt}-r{rank}.log"))
}

/// The directory that records the process groups of running ranks, so that a
/// worker restarted after a kill reaps them.
fn groups_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("process-groups")
}

/// Kills the process groups an earlier life of this worker left running (it
/// was killed before it could stop its ranks). Each record holds the group's
/// id and its leader's start time. The leader itself died with the worker
/// (`PR_SET_PDEATHSIG`), but its children live on in its group; the kernel
/// reuses no id while a group of that id has members, so a group whose leader
/// is gone is the rank's. A live leader with another start time is a new
/// process that reused the id, and is left alone.
pub fn reap_orphans(work_dir: &Path) {
    let dir = groups_dir(work_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let record = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parts = record.split_whitespace();
        let (Some(Ok(pgid)), Some(started), boot) = (
            parts.next().map(str::parse::<i32>),
            parts.next(),
            parts.next(),
        ) else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        // A record from before a reboot names nothing of ours.
        if boot != Some(boot_id().as_str()) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let ours = match start_time(pgid) {
            None => true,
            Some(now) => now == started,
        };
        // SAFETY: signal 0 only checks that the group exists.
        if pgid > 1 && ours && unsafe { libc::kill(-pgid, 0) } == 0 {
            tracing::warn!(
                pgid,
                "killing the process group of a rank left by this worker's earlier run"
            );
            // SAFETY: kill(2) with a negative id signals a process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// This boot's id (a group id and start time mean nothing across a reboot).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat` field 22).
fn start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// A running rank's process group: killed whole when dropped, whatever ended
/// the rank (its program exited, the job stopped, the shard's task aborted).
struct Group {
    pgid: i32,
    record: PathBuf,
}

impl Group {
    fn signal(&self, signal: i32) {
        // Never 0 or 1: kill(0) would signal the worker's own group.
        if self.pgid > 1 {
            // SAFETY: kill(2) with a negative id signals a process group.
            unsafe { libc::kill(-self.pgid, signal) };
        }
    }

    /// Whether any process of the group is still alive.
    fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the group exists.
        self.pgid > 1 && unsafe { libc::kill(-self.pgid, 0) == 0 }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = std::fs::remove_file(&self.record);
    }
}

/// CPU cores claimed for a rank across every worker of this host: one lock file
/// per core, held while the rank runs, so that two workers on one host do not
/// pin their ranks to the same core.
struct Cores {
    cores: Vec<usize>,
    _locks: Vec<std::fs::File>,
    shared: bool,
}

/// The cores this process may run on.
fn allowed_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Claims `wanted` of this host's cores for a rank; `None` when the rank may
/// use every core (it asks for as many as there are, or for none).
fn claim_cores(wanted: usize) -> Option<Cores> {
    let allowed = allowed_cores();
    if wanted == 0 || wanted >= allowed.len() {
        return None;
    }
    let dir = std::env::temp_dir().join("kiln-cores");
    let _ = std::fs::create_dir_all(&dir);
    let mut cores = Vec::new();
    let mut locks = Vec::new();
    for &core in &allowed {
        if cores.len() == wanted {
            break;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("core-{core}.lock")))
        else {
            continue;
        };
        // SAFETY: flock(2) on an open file descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            cores.push(core);
            locks.push(file);
        }
    }
    // Every core is taken: share the first ones rather than wait.
    let shared = cores.len() < wanted;
    for &core in &allowed {
        if cores.len() == wanted {
            break;
        }
        if !cores.contains(&core) {
            cores.push(core);
        }
    }
    cores.sort_unstable();
    Some(Cores {
        cores,
        _locks: locks,
        shared,
    })
}

/// Where each rank runs: worker ids in rank order.
struct Layout {
    local_rank: usize,
    local_world: usize,
    node_rank: usize,
}

fn layout(workers: &[String], rank: usize) -> Layout {
    let me = &workers[rank];
    let mut nodes: Vec<&String> = Vec::new();
    for w in workers {
        if !nodes.contains(&w) {
            nodes.push(w);
        }
    }
    Layout {
        local_rank: workers[..rank].iter().filter(|w| *w == me).count(),
        local_world: workers.iter().filter(|w| *w == me).count(),
        node_rank: nodes.iter().position(|w| *w == me).unwrap_or(0),
    }
}

/// The directories a rank's program sees.
struct Dirs {
    code: PathBuf,
    data: Option<PathBuf>,
    output: PathBuf,
    checkpoint: PathBuf,
}

/// The program to start: `run[0]` as the environment means it (`python` is
/// the environment's interpreter; `venv` is the `pip` environment's directory).
fn program(job: &CommandJob, code: &Path, venv: Option<&Path>) -> PathBuf {
    let first = &job.command.run[0];
    let python = match (&job.environment.runtime, venv) {
        (Runtime::Python(python), _) => Some(PathBuf::from(python)),
        (_, Some(venv)) => Some(venv.join("bin").join("python")),
        _ => None,
    };
    if let Some(python) = python {
        if first == "python" || first == "python3" {
            return python;
        }
    }
    if let Some(venv) = venv {
        let own = venv.join("bin").join(first);
        if !first.contains('/') && own.is_file() {
            return own;
        }
    }
    // A relative path with a slash is the code's own program.
    if first.contains('/') && Path::new(first).is_relative() {
        return code.join(first);
    }
    PathBuf::from(first)
}

/// Longest a rank waits for the rest of its gang to be staged: a peer may be
/// pulling a large dataset or building its pip environment.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(PIP_TIMEOUT.as_secs() + 600);
/// Lines of a pip build's output in the job's log (its last lines are in a
/// failure's reason).
const MAX_PIP_LINES: usize = 200;
/// Longest a `pip` environment may take to build.
const PIP_TIMEOUT: Duration = Duration::from_secs(1800);

/// The `pip` environment for `requirements` on this worker: a virtual
/// environment under the worker's data directory, named by the digest of the
/// requirements, built once (behind a lock, so concurrent jobs share one
/// build) and reused by every later job that lists the same requirements.
/// The build's output goes to the job's log; a failed build fails the rank
/// with pip's last lines.
async fn pip_environment(
    ctx: &ShardContext,
    requirements: &[String],
    reporter: &mut Reporter,
) -> ShardResult<PathBuf> {
    let digest = blake3::hash(requirements.join("\n").as_bytes()).to_hex();
    let root = ctx.work_dir.join("envs");
    let venv = root.join(&digest.as_str()[..16]);
    let marker = venv.join("kiln-requirements.txt");
    let wanted = requirements.join("\n");
    std::fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let lock_path = root.join(format!("{}.lock", &digest.as_str()[..16]));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("open {}: {e}", lock_path.display()))?;
    // Waits for a build another rank of this worker runs.
    let lock = tokio::task::spawn_blocking(move || {
        // SAFETY: flock(2) on an open file descriptor.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0;
        locked.then_some(lock)
    })
    .await
    .map_err(|e| format!("lock the pip environment: {e}"))?
    .ok_or("lock the pip environment")?;
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        reporter.log(format!(
            "pip environment {} reused ({})",
            venv.display(),
            requirements.join(" ")
        ));
        return Ok(venv);
    }
    reporter.log(format!(
        "building pip environment {} ({})",
        venv.display(),
        requirements.join(" ")
    ));
    let stale = venv.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(stale)).await;
    let steps: [(PathBuf, Vec<String>); 2] = [
        (
            PathBuf::from("python3"),
            vec!["-m".into(), "venv".into(), venv.display().to_string()],
        ),
        (
            venv.join("bin").join("python"),
            [
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
            ]
            .into_iter()
            .map(String::from)
            .chain(requirements.iter().cloned())
            .collect(),
        ),
    ];
    for (program, args) in steps {
        let mut command = tokio::process::Command::new(&program);
        // The worker's secrets stay out of pip and the packages' build code.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_none_or(withheld) {
                command.env_remove(&key);
            }
        }
        let mut child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("pip environment: start {}: {e}", program.display()))?;
        let (tx, mut rx) = mpsc::channel::<String>(256);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(read_lines(out, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(read_lines(err, tx));
        }
        let mut last: VecDeque<String> = VecDeque::with_capacity(LAST_LINES);
        let mut forwarded = 0usize;
        let run = async {
            while let Some(line) = rx.recv().await {
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(line.clone());
                forwarded += 1;
                if forwarded <= MAX_PIP_LINES {
                    reporter.forward(format!("pip: {line}"));
                }
            }
            child.wait().await
        };
        let status = tokio::time::timeout(PIP_TIMEOUT, run)
            .await
            .map_err(|_| {
                format!(
                    "the pip environment took over {} s to build",
                    PIP_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("pip environment: {e}"))?;
        if !status.success() {
            let failed = venv.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(failed)).await;
            return Err(format!(
                "the pip environment ({}) failed to build: {} {}; last lines:\n{}",
                requirements.join(" "),
                program.display(),
                exit_text(status),
                last.into_iter().collect::<Vec<_>>().join("\n")
            ));
        }
    }
    std::fs::write(&marker, &wanted).map_err(|e| format!("write {}: {e}", marker.display()))?;
    drop(lock);
    Ok(venv)
}

/// Every variable the rank's program gets from kiln: torchrun's, kiln's own.
fn rank_env(
    task: &ShardTask,
    job_name: &str,
    master: &str,
    layout: &Layout,
    dirs: &Dirs,
) -> BTreeMap<String, String> {
    let (master_addr, master_port) = master.rsplit_once(':').unwrap_or((master, "0"));
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set("RANK", task.rank.to_string());
    set("WORLD_SIZE", task.world.to_string());
    set("LOCAL_RANK", layout.local_rank.to_string());
    set("LOCAL_WORLD_SIZE", layout.local_world.to_string());
    set("NODE_RANK", layout.node_rank.to_string());
    set("GROUP_RANK", layout.node_rank.to_string());
    set("MASTER_ADDR", master_addr.to_string());
    set("MASTER_PORT", master_port.to_string());
    set("TORCHELASTIC_RUN_ID", format!("kiln-job-{}", task.job_id));
    // The GPUs placed for this rank, and only those, numbered as NVML (and
    // the scheduler) numbers them: by PCI bus, not CUDA's fastest-first.
    set("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string());
    set(
        "CUDA_VISIBLE_DEVICES",
        task.gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    set("KILN_JOB_ID", task.job_id.to_string());
    set("KILN_JOB_NAME", job_name.to_string());
    set("KILN_ATTEMPT", task.attempt.to_string());
    set("KILN_RUN_ID", task.run_id.clone());
    if let Some(data) = &dirs.data {
        set("KILN_DATA_DIR", data.display().to_string());
    }
    set("KILN_OUTPUT_DIR", dirs.output.display().to_string());
    set("KILN_CHECKPOINT_DIR", dirs.checkpoint.display().to_string());
    set("PYTHONUNBUFFERED", "1".to_string());
    env
}

/// MLflow's variables, so that an unchanged `mlflow` script logs into the
/// job's run: the tracking URI of this worker (which passes the calls to a
/// live coordinator, so logging survives a failover), the job's own token
/// (which may write only this run), the cluster CA, the run and its
/// experiment; artifacts above [`crate::tracking_proxy::MULTIPART_CHUNK_BYTES`]
/// go up in parts of that size.
fn tracking_env(ctx: &ShardContext, task: &ShardTask, spec: &JobSpec) -> Vec<(String, String)> {
    let chunk = crate::tracking_proxy::MULTIPART_CHUNK_BYTES.to_string();
    let mut env = vec![
        ("MLFLOW_TRACKING_URI".to_string(), ctx.tracking_uri.clone()),
        ("MLFLOW_RUN_ID".to_string(), task.run_id.clone()),
        (
            "MLFLOW_EXPERIMENT_NAME".to_string(),
            spec.experiment.clone(),
        ),
        (
            "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD".to_string(),
            "true".to_string(),
        ),
        (
            "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE".to_string(),
            chunk.clone(),
        ),
        ("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE".to_string(), chunk),
    ];
    if !task.job_token.is_empty() {
        env.push(("MLFLOW_TRACKING_TOKEN".to_string(), task.job_token.clone()));
    }
    if let Some(ca) = &ctx.ca {
        env.push((
            "MLFLOW_TRACKING_SERVER_CERT_PATH".to_string(),
            ca.display().to_string(),
        ));
    }
    env
}

/// Whether the worker's own variable `key` stays out of a rank's environment:
/// kiln's and MLflow's (the worker's secrets among them) and the rank
/// variables kiln sets.
fn withheld(key: &str) -> bool {
    key.starts_with("KILN_") || key.starts_with("MLFLOW_") || RANK_VARIABLES.contains(&key)
}

/// Makes every file under `root` read-only (the staged dataset).
fn make_read_only(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555));
        } else if meta.is_file() {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444));
        }
    }
}

/// Gives write permission back (a read-only tree cannot be removed otherwise).
pub fn make_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
}

/// A rank's output, kept in a bounded file and passed on as lines.
struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
}

impl LogFile {
    fn open(path: PathBuf) -> std::io::Result<LogFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogFile {
            path,
            file,
            written,
        })
    }

    fn write_line(&mut self, line: &str) {
        if self.written + line.len() as u64 + 1 > MAX_LOG_FILE_BYTES {
            let mut older = self.path.clone().into_os_string();
            older.push(".1");
            let _ = std::fs::rename(&self.path, &older);
            if let Ok(file) = std::fs::File::create(&self.path) {
                self.file = file;
                self.written = 0;
            }
        }
        if writeln!(self.file, "{line}").is_ok() {
            self.written += line.len() as u64 + 1;
        }
    }
}

/// A running rank's output: every line to its log file, the last ones kept
/// for a failure's reason, up to [`FORWARDED_LINES_PER_SEC`] a second to the
/// job's log.
struct Output {
    log: LogFile,
    last: VecDeque<String>,
    window: Instant,
    forwarded: usize,
    held_back: u64,
}

impl Output {
    fn take(&mut self, line: String, reporter: &mut Reporter) {
        self.log.write_line(&line);
        if self.last.len() == LAST_LINES {
            self.last.pop_front();
        }
        self.last.push_back(line.clone());
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.forwarded = 0;
        }
        if self.forwarded < FORWARDED_LINES_PER_SEC {
            self.forwarded += 1;
            reporter.forward(line);
        } else {
            self.held_back += 1;
        }
    }

    /// Says in the job's log how many lines only the log file holds.
    fn note_held_back(&mut self, rank: usize, reporter: &mut Reporter) {
        if self.held_back > 0 {
            reporter.log(format!(
                "rank {rank}: {} line(s) beyond {FORWARDED_LINES_PER_SEC}/s kept only in {}",
                self.held_back,
                self.log.path.display()
            ));
            self.held_back = 0;
        }
    }
}

/// Keeps the newest [`KEPT_LOG_DIRS`] job log directories of this worker.
fn prune_logs(work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir.join("logs")) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if dirs.len() <= KEPT_LOG_DIRS {
        return;
    }
    dirs.sort();
    // A directory written to within the last day may belong to a job that
    // still runs: kept.
    let recent = std::time::SystemTime::now() - Duration::from_secs(86_400);
    for (modified, dir) in &dirs[..dirs.len() - KEPT_LOG_DIRS] {
        if *modified < recent {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Reads a stream into lines of at most [`MAX_LINE_BYTES`] and sends them on.
async fn read_lines<R: tokio::io::AsyncRead + Unpin>(mut from: R, to: mpsc::Sender<String>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut line: Vec<u8> = Vec::new();
    let mut cut = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                line.clear();
                cut = false;
                if to.send(text).await.is_err() {
                    return;
                }
            } else if line.len() < MAX_LINE_BYTES {
                line.push(b);
            } else if !cut {
                cut = true;
            }
        }
    }
    if !line.is_empty() {
        let _ = to.send(String::from_utf8_lossy(&line).to_string()).await;
    }
}

/// How the rank's program ended, in words.
fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal} ({})", signal_name(signal)),
        _ => "ended".to_string(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL: out of memory, or killed",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

/// The step a checkpoint directory's name holds (its last run of digits), if any.
fn step_of(name: &str) -> Option<u64> {
    let digits: String = name
        .chars()
        .rev()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

/// Entries of the checkpoint directory that are complete checkpoints: not
/// hidden, not temporary.
fn checkpoint_names(dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && !n.ends_with(".tmp") && !n.ends_with(".partial"))
        .collect()
}

/// The newest of the checkpoints in `dir` not yet `seen` (by the step its name
/// holds, then by modification time), and the older new ones it supersedes.
fn newest_new(dir: &Path, seen: &BTreeSet<String>) -> Option<(String, Vec<String>)> {
    let mut fresh: Vec<(Option<u64>, std::time::SystemTime, String)> = checkpoint_names(dir)
        .into_iter()
        .filter(|n| !seen.contains(n))
        .filter(|n| {
            std::fs::symlink_metadata(dir.join(n)).is_ok_and(|m| !m.file_type().is_symlink())
        })
        .map(|n| {
            let modified = std::fs::metadata(dir.join(&n))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (step_of(&n), modified, n)
        })
        .collect();
    fresh.sort();
    let (_, _, newest) = fresh.pop()?;
    Some((newest, fresh.into_iter().map(|(_, _, n)| n).collect()))
}

/// A checkpoint push running beside the rank's program, so that its output is
/// still read while the bytes travel.
type Pushing = Option<(String, tokio::task::JoinHandle<ShardResult<String>>)>;

/// Starts pushing the newest new checkpoint of rank 0, if there is one and no
/// push runs; the older new ones are skipped (the newest supersedes them).
fn start_push(
    ctx: &ShardContext,
    task: &ShardTask,
    spec: &JobSpec,
    checkpoints: &Path,
    stage: &Path,
    seen: &mut BTreeSet<String>,
    pushing: &mut Pushing,
) {
    if pushing.is_some() {
        return;
    }
    let Some((name, older)) = newest_new(checkpoints, seen) else {
        return;
    };
    seen.extend(older);
    seen.insert(name.clone());
    let (ctx, task, spec) = (ctx.clone(), task.clone(), spec.clone());
    let (checkpoints, stage, what) = (checkpoints.to_path_buf(), stage.to_path_buf(), name.clone());
    let handle = tokio::spawn(async move {
        push_checkpoint(&ctx, &task, &spec, &checkpoints, &what, &stage).await
    });
    *pushing = Some((name, handle));
}

/// Waits for the running push, if any (never resolves without one).
async fn pushed(pushing: &mut Pushing) -> (String, ShardResult<String>) {
    match pushing {
        Some((name, handle)) => {
            let result = handle
                .await
                .unwrap_or_else(|e| Err(format!("push checkpoint {name}: {e}")));
            (name.clone(), result)
        }
        None => std::future::pending().await,
    }
}

/// Records a finished push in the next report (a failed one is logged; the
/// program goes on, and its next checkpoint is pushed).
fn record_push(
    name: String,
    result: ShardResult<String>,
    report: &mut ReportShard,
    reporter: &mut Reporter,
) {
    match result {
        Ok(reference) => {
            reporter.log(format!("rank 0: checkpoint {name} pushed as {reference}"));
            report.checkpoint = reference;
            report.checkpoint_step = step_of(&name).unwrap_or(report.checkpoint_step + 1);
        }
        Err(e) => reporter.log(format!("rank 0: {e}; the next checkpoint will be pushed")),
    }
}

/// Copies `from` (a file or a tree) to `to`, hard-linking files where it can.
fn link_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if meta.is_file() && std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
    }
    // Symbolic links (a `latest` pointing at a step) are not checkpoints of
    // their own and stay behind.
    Ok(())
}

/// Pushes the checkpoint `name` (a directory or a file the program renamed
/// into the checkpoint directory) as a version of the job's checkpoint
/// artifact, whose one top-level entry is `name`; returns its reference.
async fn push_checkpoint(
    ctx: &ShardContext,
    task: &ShardTask,
    spec: &JobSpec,
    checkpoints: &Path,
    name: &str,
    stage: &Path,
) -> ShardResult<String> {
    let _ = tokio::fs::remove_dir_all(stage).await;
    let (from, to) = (checkpoints.join(name), stage.join(name));
    tokio::task::spawn_blocking(move || link_tree(&from, &to))
        .await
        .map_err(|e| format!("stage checkpoint {name}: {e}"))?
        .map_err(|e| format!("stage checkpoint {name}: {e}"))?;
    let mut metadata: BTreeMap<String, String> = [
        ("kiln.job".to_string(), task.job_id.to_string()),
        ("kiln.checkpoint".to_string(), name.to_string()),
    ]
    .into_iter()
    .collect();
    if let Some(step) = step_of(name) {
        metadata.insert("kiln.step".into(), step.to_string());
    }
    let options = PushOptions {
        name: checkpoint_artifact(task.job_id),
        parents: spec.dataset().map(|d| d.to_string()).into_iter().collect(),
        produced_by: task.run_id.clone(),
        media_type: "application/vnd.kiln.checkpoint".into(),
        metadata,
        quiet: true,
        ..PushOptions::default()
    };
    let pushed = push(Arc::clone(&ctx.client), stage.to_path_buf(), options)
        .await
        .map_err(|e| format!("push checkpoint {name}: {e:#}"))?;
    let _ = tokio::fs::remove_dir_all(stage).await;
    Ok(format!("{}@{}", pushed.name, pushed.version))
}

/// Rank 0 of a successful job: pushes KILN_OUTPUT_DIR as `<name>-output` and
/// registers a `model.onnx` in it as a version of the model named as the job,
/// with its lineage. Returns the model's `NAME@VERSION`, or empty.
async fn publish_output(
    ctx: &ShardContext,
    task: &ShardTask,
    spec: &JobSpec,
    dirs: &Dirs,
    reporter: &mut Reporter,
) -> ShardResult<String> {
    let empty = std::fs::read_dir(&dirs.output)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if empty {
        reporter.log("rank 0: KILN_OUTPUT_DIR is empty; nothing to publish".to_string());
        return Ok(String::new());
    }
    let dataset = spec.dataset().map(|d| d.to_string());
    let mut parents: Vec<String> = dataset.iter().cloned().collect();
    if let Some(Code::Artifact(code)) = spec.command().and_then(|c| c.command.code.as_ref()) {
        parents.push(code.to_string());
    }
    let options = PushOptions {
        name: format!("{}-output", spec.name),
        parents,
        produced_by: task.run_id.clone(),
        media_type: "application/vnd.kiln.output".into(),
        metadata: [("kiln.job".to_string(), task.job_id.to_string())]
            .into_iter()
            .collect(),
        quiet: true,
        ..PushOptions::default()
    };
    let pushed = push(Arc::clone(&ctx.client), dirs.output.clone(), options)
        .await
        .map_err(|e| format!("push the output: {e:#}"))?;
    let output = format!("{}@{}", pushed.name, pushed.version);
    reporter.log(format!("rank 0: output pushed as {output}"));
    let model_path = dirs.output.join(MODEL_FILE);
    if !model_path.is_file() {
        return Ok(String::new());
    }
    // Tensors kept in external data files beside it are read too.
    let registered = tokio::task::spawn_blocking(move || {
        use crate::serving::engine::{registration, ModelFiles};
        ModelFiles::read(&model_path).and_then(|model| registration(&model))
    })
    .await
    .map_err(|e| format!("read the model's signature: {e}"))?;
    let mut version = ModelVersion {
        name: spec.name.clone(),
        artifact: output,
        run_id: task.run_id.clone(),
        job_id: task.job_id,
        dataset: dataset.unwrap_or_default(),
        spec_digest: blake3::hash(task.spec_toml.as_bytes()).to_hex().to_string(),
        ..Default::default()
    };
    match registered {
        Ok(registered) => {
            let signature = registered.signature;
            version.inputs = signature.inputs.iter().map(|s| s.to_proto()).collect();
            version.outputs = signature.outputs.iter().map(|s| s.to_proto()).collect();
            version.refused_engines = registered
                .refused
                .into_iter()
                .map(|(kind, why)| (kind.name().to_string(), why))
                .collect();
        }
        Err(e) => {
            version.undeployable = format!("{MODEL_FILE} cannot be served: {e}");
            reporter.log(format!("rank 0: {}", version.undeployable));
        }
    }
    register(ctx, version).await
}

/// Runs one rank of a command job to its end. `cancel` stops it quietly and
/// `lapse` with a failure; both give the program its grace (SIGTERM, then
/// SIGKILL).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    ctx: &ShardContext,
    task: &ShardTask,
    spec: &JobSpec,
    job: &CommandJob,
    dir: &Path,
    reporter: &mut Reporter,
    cancel: &CancellationToken,
    lapse: &CancellationToken,
) -> ShardResult<Outcome> {
    let dirs = Dirs {
        code: dir.join("code"),
        data: job.data.as_ref().map(|_| dir.join("data")),
        output: dir.join("output"),
        checkpoint: dir.join("checkpoint"),
    };
    for d in [&dirs.code, &dirs.output, &dirs.checkpoint] {
        tokio::fs::create_dir_all(d)
            .await
            .map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    // Started (the leader waits this long for it), with no address yet: the
    // gang meets once every rank has staged and reported one.
    let started = ReportShard {
        state: ShardState::Ready as i32,
        ..Default::default()
    };
    if !reporter.send(started).await? {
        return Ok(Outcome::Stopped);
    }

    // Everything the program reads, before the gang meets.
    let staging = async {
        if let Some(Code::Artifact(code)) = &job.command.code {
            pull(Arc::clone(&ctx.client), code.to_string(), dirs.code.clone())
                .await
                .map_err(|e| format!("pull the code {code}: {e:#}"))?;
        }
        if let (Some(data), Some(to)) = (&job.data, &dirs.data) {
            tokio::fs::create_dir_all(to)
                .await
                .map_err(|e| format!("create {}: {e}", to.display()))?;
            pull(Arc::clone(&ctx.client), data.to_string(), to.clone())
                .await
                .map_err(|e| format!("pull the data {data}: {e:#}"))?;
            let to = to.clone();
            let _ = tokio::task::spawn_blocking(move || make_read_only(&to)).await;
        }
        if !task.checkpoint.is_empty() {
            pull(
                Arc::clone(&ctx.client),
                task.checkpoint.clone(),
                dirs.checkpoint.clone(),
            )
            .await
            .map_err(|e| format!("pull checkpoint {}: {e:#}", task.checkpoint))?;
        }
        Ok::<_, String>(())
    };
    tokio::select! {
        r = staging => r?,
        _ = cancel.cancelled() => return Ok(Outcome::Stopped),
        _ = lapse.cancelled() => return Err(LAPSED.to_string()),
    }
    if !task.checkpoint.is_empty() {
        reporter.log(format!(
            "rank {}: restored {} into KILN_CHECKPOINT_DIR",
            task.rank, task.checkpoint
        ));
    }
    if let Runtime::Image(image) = &job.environment.runtime {
        return Err(format!(
            "environment.image = \"{image}\": this worker runs command jobs as processes; container ranks are not built yet"
        ));
    }
    let venv = match &job.environment.runtime {
        Runtime::Pip(requirements) => {
            let built = tokio::select! {
                v = pip_environment(ctx, requirements, reporter) => v?,
                _ = cancel.cancelled() => return Ok(Outcome::Stopped),
                _ = lapse.cancelled() => return Err(LAPSED.to_string()),
            };
            Some(built)
        }
        _ => None,
    };

    // Rank 0 holds the rendezvous port (torchrun's MASTER_PORT) from now until
    // its program starts, so that no one else takes it: bound, not listening,
    // so a peer that dials early is refused (and retries) rather than queued
    // on a socket that will close. Every rank reports Ready only now, staged
    // and with its environment built, so the gang's programs start together.
    let reserved = if task.rank == 0 {
        let addr: std::net::SocketAddr = tokio::net::lookup_host((ctx.bind_host.as_str(), 0))
            .await
            .map_err(|e| format!("reserve MASTER_PORT on {}: {e}", ctx.bind_host))?
            .next()
            .ok_or_else(|| format!("reserve MASTER_PORT: {} has no address", ctx.bind_host))?;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| format!("reserve MASTER_PORT: {e}"))?;
        socket
            .bind(addr)
            .map_err(|e| format!("reserve MASTER_PORT on {}: {e}", ctx.bind_host))?;
        Some(socket)
    } else {
        None
    };
    let port = match &reserved {
        Some(socket) => socket
            .local_addr()
            .map_err(|e| format!("MASTER_PORT: {e}"))?
            .port(),
        None => 0,
    };
    let ready = ReportShard {
        state: ShardState::Ready as i32,
        data_addr: format!("{}:{port}", ctx.bind_host),
        ..Default::default()
    };
    if !reporter.send(ready).await? {
        return Ok(Outcome::Stopped);
    }

    let meeting = tokio::select! {
        m = rendezvous(ctx, task, RENDEZVOUS_TIMEOUT) => m?,
        _ = cancel.cancelled() => return Ok(Outcome::Stopped),
        _ = lapse.cancelled() => return Err(LAPSED.to_string()),
    };
    let Some(meeting) = meeting else {
        return Ok(Outcome::Stopped);
    };
    let rank = task.rank as usize;
    let layout = layout(&meeting.workers, rank);
    let mut env = rank_env(task, &spec.name, &meeting.addrs[0], &layout, &dirs);
    for (k, v) in &job.environment.env {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in tracking_env(ctx, task, spec) {
        env.insert(k, v);
    }
    // MLflow sends the parts of a multipart upload with plain `requests`,
    // which trusts its own bundle, not MLFLOW_TRACKING_SERVER_CERT_PATH: a
    // bundle of the system's CAs and the cluster's, so that public hosts still
    // verify too.
    if let (Some(ca), false) = (&ctx.ca, env.contains_key("REQUESTS_CA_BUNDLE")) {
        let bundle = dir.join("ca-bundle.pem");
        let mut text = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        text.push(b'\n');
        text.extend(std::fs::read(ca).unwrap_or_default());
        if std::fs::write(&bundle, &text).is_ok() {
            env.insert(
                "REQUESTS_CA_BUNDLE".to_string(),
                bundle.display().to_string(),
            );
        }
    }
    let program = program(job, &dirs.code, venv.as_deref());
    let cores = claim_cores(spec.resources.cpus_per_shard as usize);
    let log_file = log_path(&ctx.work_dir, task.job_id, task.attempt, task.rank);
    let work_dir = ctx.work_dir.clone();
    let _ = tokio::task::spawn_blocking(move || prune_logs(&work_dir)).await;
    let log = LogFile::open(log_file.clone())
        .map_err(|e| format!("open the rank's log {}: {e}", log_file.display()))?;

    let mut command = tokio::process::Command::new(&program);
    command
        .args(&job.command.run[1..])
        .current_dir(&dirs.code)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_none_or(withheld) {
            command.env_remove(&key);
        }
    }
    command.envs(&env);
    if let Some(venv) = &venv {
        let path = job
            .environment
            .env
            .get("PATH")
            .cloned()
            .unwrap_or_else(|| std::env::var("PATH").unwrap_or_default());
        command
            .env("VIRTUAL_ENV", venv)
            .env("PATH", format!("{}:{path}", venv.join("bin").display()));
    }
    // memory_mib_per_shard, held by the kernel where the worker may.
    let mib = spec.resources.memory_mib_per_shard;
    let cgroup = if mib > 0 {
        let name = format!("job{}-a{}-r{}", task.job_id, task.attempt, task.rank);
        match ctx.memory_limits.for_rank(&name, mib) {
            Ok(Some(cgroup)) => Some(cgroup),
            Ok(None) => {
                reporter.log(format!(
                    "rank {rank}: memory_mib_per_shard = {mib} is not enforced on this worker ({})",
                    ctx.memory_limits.describe()
                ));
                None
            }
            Err(e) => return Err(format!("rank {rank}: memory limit: {e}")),
        }
    } else {
        None
    };
    let procs = cgroup.as_ref().map(|c| c.procs().clone());
    let pinned: Vec<usize> = cores.as_ref().map(|c| c.cores.clone()).unwrap_or_default();
    // SAFETY: between fork and exec the closure only makes async-signal-safe
    // system calls (prctl, sched_setaffinity) on values prepared before fork.
    unsafe {
        command.pre_exec(move || {
            // The rank dies with the worker.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Into its memory cgroup: "0" is the writing process itself.
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            if !pinned.is_empty() {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &c in &pinned {
                    libc::CPU_SET(c, &mut set);
                }
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    drop(reserved);
    let mut child = command.spawn().map_err(|e| {
        format!(
            "rank {rank}: start {}: {e} (command.run = {:?})",
            program.display(),
            job.command.run
        )
    })?;
    let pgid = match child.id().map(|id| id as i32) {
        Some(pid) if pid > 1 => pid,
        _ => {
            let _ = child.kill().await;
            return Err(format!(
                "rank {rank}: the program started without a process id"
            ));
        }
    };
    let groups = groups_dir(&ctx.work_dir);
    let _ = std::fs::create_dir_all(&groups);
    let record = groups.join(format!("job{}-a{}-r{}", task.job_id, task.attempt, rank));
    let _ = std::fs::write(
        &record,
        format!(
            "{pgid} {} {}",
            start_time(pgid).unwrap_or_default(),
            boot_id()
        ),
    );
    let group = Group { pgid, record };
    reporter.log(format!(
        "rank {rank} of {}: started {} (pid {pgid}) on worker {}{}; log {}",
        task.world,
        job.command.run.join(" "),
        ctx.worker_id,
        match &cores {
            Some(c) if c.shared => format!(
                ", sharing cores {:?} (every core of this host is claimed)",
                c.cores
            ),
            Some(c) => format!(", pinned to cores {:?}", c.cores),
            None => String::new(),
        } + &match &cgroup {
            Some(c) => format!(", memory held to {mib} MiB ({})", c.dir().display()),
            None => String::new(),
        },
        log_file.display()
    ));
    if !reporter.state(ShardState::Running).await? {
        return stop(
            &mut child,
            &group,
            job,
            reporter,
            rank,
            "its attempt is over",
        )
        .await;
    }

    let (lines_tx, mut lines) = mpsc::channel::<String>(1024);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(read_lines(out, lines_tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(read_lines(err, lines_tx.clone()));
    }
    drop(lines_tx);

    let mut out = Output {
        log,
        last: VecDeque::with_capacity(LAST_LINES),
        window: Instant::now(),
        forwarded: 0,
        held_back: 0,
    };
    // Checkpoints restored into the directory are already in the artifact.
    let mut seen: BTreeSet<String> = checkpoint_names(&dirs.checkpoint);
    let mut pushing: Pushing = None;
    let mut report = ReportShard::default();
    let mut report_tick = tokio::time::interval(REPORT_EVERY);
    let mut checkpoint_tick = tokio::time::interval(CHECKPOINT_POLL);
    let stage = dir.join("checkpoint-stage");
    let status = loop {
        tokio::select! {
            Some(line) = lines.recv() => out.take(line, reporter),
            status = child.wait() => {
                break status.map_err(|e| format!("rank {rank}: wait for the program: {e}"))?;
            }
            _ = report_tick.tick() => {
                out.note_held_back(rank, reporter);
                if reporter.pending() || !report.checkpoint.is_empty() {
                    let keep = reporter.send(std::mem::take(&mut report)).await?;
                    if !keep {
                        abort_push(&mut pushing);
                        return stop(&mut child, &group, job, reporter, rank, "its attempt is over").await;
                    }
                }
            }
            _ = checkpoint_tick.tick(), if rank == 0 => {
                start_push(ctx, task, spec, &dirs.checkpoint, &stage, &mut seen, &mut pushing);
            }
            (name, result) = pushed(&mut pushing) => {
                pushing = None;
                record_push(name, result, &mut report, reporter);
            }
            _ = cancel.cancelled() => {
                abort_push(&mut pushing);
                return stop(&mut child, &group, job, reporter, rank, "the job stopped").await;
            }
            _ = lapse.cancelled() => {
                abort_push(&mut pushing);
                stop(&mut child, &group, job, reporter, rank, "the shard lease lapsed").await?;
                return Err(LAPSED.to_string());
            }
        }
    };
    // Children the program left behind go with it; then its last lines, up to
    // the pipes' end.
    drop(group);
    let drained = async {
        while let Some(line) = lines.recv().await {
            out.take(line, reporter);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
    out.note_held_back(rank, reporter);
    let oom = cgroup.as_ref().is_some_and(RankCgroup::oom_killed);
    if let Some(cgroup) = cgroup {
        let _ = tokio::task::spawn_blocking(move || drop(cgroup)).await;
    }
    if !status.success() {
        abort_push(&mut pushing);
        let tail: Vec<String> = out.last.into_iter().collect();
        let how = if oom {
            format!(
                "was killed by the out-of-memory killer: it used more than memory_mib_per_shard = {mib} MiB ({})",
                exit_text(status)
            )
        } else {
            exit_text(status)
        };
        return Err(format!(
            "rank {rank} {how}; last lines:\n{}",
            tail.join("\n")
        ));
    }
    reporter.log(format!("rank {rank} {}", exit_text(status)));
    // A checkpoint renamed in just before the end still travels.
    let mut last_report = report;
    if rank == 0 {
        if pushing.is_some() {
            let (name, result) = pushed(&mut pushing).await;
            record_push(name, result, &mut last_report, reporter);
        }
        pushing = None;
        start_push(
            ctx,
            task,
            spec,
            &dirs.checkpoint,
            &stage,
            &mut seen,
            &mut pushing,
        );
        // The last checkpoint must travel: the job's record names it.
        if pushing.is_some() {
            let (name, result) = pushed(&mut pushing).await;
            let reference = result?;
            record_push(name, Ok(reference), &mut last_report, reporter);
        }
        last_report.model = publish_output(ctx, task, spec, &dirs, reporter).await?;
        if !last_report.model.is_empty() {
            reporter.log(format!("registered model {}", last_report.model));
        }
    }
    // Every line before the last report: one report carries at most a few
    // hundred.
    while reporter.backlog() {
        reporter.send(ReportShard::default()).await?;
    }
    last_report.state = ShardState::Succeeded as i32;
    reporter.send(last_report).await?;
    Ok(Outcome::Succeeded)
}

/// Stops a checkpoint push that no longer matters (the rank stops).
fn abort_push(pushing: &mut Pushing) {
    if let Some((_, handle)) = pushing.take() {
        handle.abort();
    }
}

/// Why a rank stopped when its worker's lease lapsed.
pub(super) const LAPSED: &str = "the worker had no answer from the coordinators within the \
     shard lease; stopped so that the gang can be placed again";

/// Stops a running rank: SIGTERM to its group, SIGKILL to what is left after
/// the job's grace.
async fn stop(
    child: &mut tokio::process::Child,
    group: &Group,
    job: &CommandJob,
    reporter: &mut Reporter,
    rank: usize,
    why: &str,
) -> ShardResult<Outcome> {
    let grace = Duration::from_secs(u64::from(job.command.grace_secs));
    reporter.log(format!(
        "rank {rank}: {why}; SIGTERM to its processes, SIGKILL after {} s",
        grace.as_secs()
    ));
    group.signal(libc::SIGTERM);
    let deadline = Instant::now() + grace;
    let _ = tokio::time::timeout(grace, child.wait()).await;
    // The leader is gone; its children may still be finishing.
    while group.alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    group.signal(libc::SIGKILL);
    let _ = child.wait().await;
    Ok(Outcome::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ranks_and_nodes_follow_the_workers_in_rank_order() {
        let workers: Vec<String> = ["a", "b", "a", "c", "b"].map(String::from).to_vec();
        let l = layout(&workers, 2);
        assert_eq!((l.local_rank, l.local_world, l.node_rank), (1, 2, 0));
        let l = layout(&workers, 4);
        assert_eq!((l.local_rank, l.local_world, l.node_rank), (1, 2, 1));
        let l = layout(&workers, 3);
        assert_eq!((l.local_rank, l.local_world, l.node_rank), (0, 1, 2));
    }

    #[test]
    fn a_checkpoint_names_its_step_by_its_last_digits() {
        assert_eq!(step_of("step-1200"), Some(1200));
        assert_eq!(step_of("epoch3-step40"), Some(40));
        assert_eq!(step_of("ckpt_0007.pt"), Some(7));
        assert_eq!(step_of("latest"), None);
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["step-1", ".step-2", "step-3.tmp", "step-4"] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        let names: Vec<String> = checkpoint_names(dir.path()).into_iter().collect();
        assert_eq!(
            names,
            ["step-1", "step-4"],
            "hidden and temporary ones wait"
        );
    }

    #[test]
    fn the_workers_secrets_and_rank_variables_stay_out_of_a_ranks_environment() {
        for key in ["KILN_TOKEN", "MLFLOW_TRACKING_TOKEN", "RANK", "MASTER_PORT"] {
            assert!(withheld(key), "{key}");
        }
        for key in ["PATH", "HOME", "LANG", "NCCL_DEBUG"] {
            assert!(!withheld(key), "{key}");
        }
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_every_line_arrives() {
        let (tx, mut rx) = mpsc::channel(16);
        let long = "x".repeat(MAX_LINE_BYTES * 3);
        let text = format!("one\r\n{long}\nlast without newline");
        tokio::spawn(read_lines(std::io::Cursor::new(text.into_bytes()), tx));
        let mut got = Vec::new();
        while let Some(line) = rx.recv().await {
            got.push(line);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], "one");
        assert_eq!(got[1].len(), MAX_LINE_BYTES);
        assert_eq!(got[2], "last without newline");
    }

    #[test]
    fn a_group_is_killed_whole_when_dropped() {
        use std::os::unix::process::CommandExt;
        // A leader that starts a child of its own and waits.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & wait"])
            .process_group(0)
            .spawn()
            .expect("spawn");
        let pgid = leader.id() as i32;
        let dir = tempfile::tempdir().expect("tempdir");
        let group = Group {
            pgid,
            record: dir.path().join("record"),
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(group.alive());
        drop(group);
        let _ = leader.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks that the group exists.
        while unsafe { libc::kill(-pgid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_ne!(
            unsafe { libc::kill(-pgid, 0) },
            0,
            "a process of the group outlived it"
        );
    }

    #[test]
    fn a_restarted_worker_reaps_the_groups_its_earlier_life_left_and_only_those() {
        use std::os::unix::process::CommandExt;
        let work = tempfile::tempdir().expect("tempdir");
        let groups = groups_dir(work.path());
        std::fs::create_dir_all(&groups).expect("mkdir");
        // A rank whose leader died (as with its worker) and left a child in
        // its group.
        let pid_file = work.path().join("child.pid");
        let mut leader = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "sleep 300 & echo $! > {}; sleep 0.5",
                pid_file.display()
            ))
            .process_group(0)
            .spawn()
            .expect("spawn");
        let pgid = leader.id() as i32;
        let started = start_time(pgid).expect("a start time");
        std::fs::write(
            groups.join("job1-a1-r0"),
            format!("{pgid} {started} {}", boot_id()),
        )
        .expect("record");
        leader.wait().expect("the leader ends");
        let child: i32 = std::fs::read_to_string(&pid_file)
            .expect("the child's pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(start_time(child).is_some(), "the child outlived its leader");
        // A record whose id a live process of another start time holds now is
        // left alone.
        let mut bystander = std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .expect("spawn");
        let other = bystander.id() as i32;
        std::fs::write(
            groups.join("job2-a1-r0"),
            format!("{other} 1 {}", boot_id()),
        )
        .expect("record");

        reap_orphans(work.path());
        let deadline = Instant::now() + Duration::from_secs(5);
        let gone = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
            })
        };
        while !gone(child) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(gone(child), "the orphaned child still runs");
        assert!(
            bystander.try_wait().expect("try_wait").is_none(),
            "the bystander runs on"
        );
        assert_eq!(
            std::fs::read_dir(&groups).expect("dir").count(),
            0,
            "records removed"
        );
        let _ = bystander.kill();
        let _ = bystander.wait();
    }
}
