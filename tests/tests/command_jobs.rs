//! Command jobs through a real cluster: the user's own program as real
//! processes on the workers, with torchrun's environment. The PyTorch test runs
//! an unchanged DistributedDataParallel script (gloo, CPU) with torch from PyPI,
//! whose python `TORCH_PYTHON` names (scripts/test.sh sets it to the
//! exporters' cached venv); the others need only a shell and python3.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_tests::Cluster;
use serde_json::{json, Value};

/// A cluster with the named workers and a small CSV dataset pushed as `blobs@1`.
async fn cluster_with_data(workers: &[&str]) -> (Cluster, tempfile::TempDir) {
    let cluster = Cluster::start_with_workers("", workers, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("blobs.csv");
    let mut csv = String::from("f0,f1,f2,f3,kind\n");
    let centres = [
        [2.0, 0.0, -1.0, 0.5],
        [-2.0, 1.0, 1.0, -0.5],
        [0.0, -2.0, 0.0, 2.0],
    ];
    let names = ["north", "south", "west"];
    for i in 0..600usize {
        let c = i % 3;
        let jitter = ((i * 7919) % 101) as f64 / 101.0 - 0.5;
        let row: Vec<String> = centres[c]
            .iter()
            .map(|m| format!("{:.4}", m + jitter))
            .collect();
        csv.push_str(&format!("{},{}\n", row.join(","), names[c]));
    }
    std::fs::write(&data, csv).expect("write data");
    cluster.push_when_taken(&data, "blobs").await;
    (cluster, dir)
}

/// Writes `files` into `dir/code` and a spec beside it, submits it with the
/// CLI (which pushes the code); returns the job id.
async fn submit(cluster: &Cluster, dir: &Path, spec: &str, files: &[(&str, &str)]) -> u64 {
    let code = dir.join("code");
    std::fs::create_dir_all(&code).expect("code dir");
    for (name, text) in files {
        std::fs::write(code.join(name), text).expect("write code");
    }
    cluster.submit_job(&dir.join("job.toml"), spec).await
}

async fn show(cluster: &Cluster, job: u64) -> Value {
    cluster.job(job).await
}

/// Waits until job `job` is in one of `states`; returns its record.
async fn wait_state(cluster: &Cluster, job: u64, states: &[&str], timeout: Duration) -> Value {
    kiln_tests::wait_for(timeout, &format!("job {job} {states:?}"), || async move {
        let doc = show(cluster, job).await;
        let state = doc["state"].as_str().unwrap_or("").to_string();
        if states.contains(&state.as_str()) {
            Ok(doc)
        } else if ["Failed", "Cancelled", "Succeeded"].contains(&state.as_str()) {
            let logs = logs(cluster, job).await;
            panic!("job {job} ended {state} instead: {}\n{logs}", doc["reason"]);
        } else {
            Err(format!("{state} ({})", doc["reason"]))
        }
    })
    .await
}

async fn logs(cluster: &Cluster, job: u64) -> String {
    let out = cluster.run_cli(&["jobs", "logs", &job.to_string()]).await;
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The lines of a job's log that start with `prefix` (after the log's own
/// prefix), by rank.
fn lines_with(logs: &str, prefix: &str) -> BTreeMap<u32, Vec<String>> {
    let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for line in logs.lines() {
        let Some(at) = line.find(prefix) else {
            continue;
        };
        let rank = line
            .split("rank ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|r| r.parse().ok())
            .unwrap_or(u32::MAX);
        out.entry(rank).or_default().push(line[at..].to_string());
    }
    out
}

/// The spec of tests/programs/ddp_train.py as job `name`: 2 ranks of `cores`
/// CPUs each (a whole worker each, so the gang spans two), `env` more
/// variables (", KEY = \"VALUE\"").
fn ddp_spec(
    name: &str,
    python: &str,
    cores: u32,
    epochs: u32,
    max_failures: u32,
    env: &str,
) -> String {
    format!(
        r#"name = "{name}"
experiment = "torch"
max_failures = {max_failures}

[command]
run = ["python", "train.py", "--epochs", "{epochs}"]
code = "./code"

[environment]
python = "{python}"
env = {{ OMP_NUM_THREADS = "1"{env} }}

[data]
artifact = "blobs@1"

[resources]
shards = 2
cpus_per_shard = {cores}
"#
    )
}

/// The python with torch that the PyTorch test runs, or `None` (the test says
/// it skipped) when the suite was not given one.
fn torch_python() -> Option<String> {
    match std::env::var("TORCH_PYTHON") {
        Ok(p) if !p.is_empty() => {
            assert!(Path::new(&p).exists(), "TORCH_PYTHON={p} does not exist");
            Some(p)
        }
        _ => {
            eprintln!(
                "skipped: TORCH_PYTHON is not set (scripts/test.sh sets it to a cached venv with torch)"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pytorch_ddp_script_trains_on_two_workers_and_its_exported_model_serves() {
    let Some(python) = torch_python() else {
        return;
    };
    let (cluster, dir) = cluster_with_data(&["a", "b"]).await;
    // A rank takes a whole worker, so the gang spans both.
    let cores = cluster.worker_cores().await;
    let spec = ddp_spec("ddp-blobs", &python, cores, 3, 0, "");
    let script = include_str!("../programs/ddp_train.py");
    let started = Instant::now();
    let job = submit(&cluster, dir.path(), &spec, &[("train.py", script)]).await;
    let done = wait_state(&cluster, job, &["Succeeded"], Duration::from_secs(300)).await;
    eprintln!("the DDP job took {:.1} s", started.elapsed().as_secs_f64());
    let logs = logs(&cluster, job).await;

    // Two workers, torchrun's variables as torchrun sets them.
    let workers = kiln_tests::shard_workers(&done);
    assert_eq!(workers.len(), 2);
    assert_ne!(workers[0], workers[1], "{done}");
    let env = lines_with(&logs, "env rank=");
    for rank in 0..2u32 {
        let line = &env
            .get(&rank)
            .unwrap_or_else(|| panic!("no env line of rank {rank}: {logs}"))[0];
        assert!(
            line.starts_with(&format!(
                "env rank={rank} world=2 local_rank=0 node_rank={rank} master=127.0.0.1:"
            )),
            "{line}"
        );
    }
    // The code arrived as an artifact version of its own.
    assert_eq!(
        done["spec"]["command"]["code"], "ddp-blobs-code@1",
        "{done}"
    );
    assert_eq!(
        done["spec"]["environment"]["runtime"]["python"],
        python.as_str()
    );

    // Both ranks end with the same weights: the gradients were averaged.
    let digests = lines_with(&logs, "weights digest ");
    let (a, b) = (&digests[&0][0], &digests[&1][0]);
    assert_eq!(a, b, "the ranks' weights differ:\n{logs}");
    let rank_one = cluster
        .cli_ok(&["jobs", "logs", &job.to_string(), "--rank", "1"])
        .await;
    assert!(rank_one.contains("weights digest"), "{rank_one}");
    assert!(
        rank_one.lines().all(|l| l.contains(" rank 1] ")),
        "--rank 1 printed another rank's line: {rank_one}"
    );

    // Rank 0's checkpoints went to the job's checkpoint artifact, one per epoch.
    assert_eq!(done["checkpoint_step"].as_u64(), Some(30), "{done}");

    // The exported model is a model version with its lineage, and it serves.
    let model = done["model"].as_str().expect("a model").to_string();
    assert_eq!(model, "ddp-blobs@1", "{done}");
    let versions: Value =
        serde_json::from_str(&cluster.cli_ok(&["models", "ls", "--json"]).await).expect("models");
    let version = versions
        .as_array()
        .and_then(|v| v.iter().find(|m| m["name"] == "ddp-blobs"))
        .unwrap_or_else(|| panic!("ddp-blobs not listed: {versions}"));
    assert_eq!(version["dataset"], "blobs@1", "{version}");
    assert_eq!(version["run_id"], done["run_id"], "{version}");
    cluster
        .cli_ok(&[
            "deploy",
            "ddp",
            "--model",
            &model,
            "--replicas",
            "1",
            "--wait",
        ])
        .await;
    let token = cluster.admin_token().await;
    let addr_a = cluster.worker_flag("a", "--http");
    let body = json!({"inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
        "data": [2.0, 0.0, -1.0, 0.5, -2.0, 1.0, 1.0, -0.5]}]});
    let answer = kiln_tests::wait_for(Duration::from_secs(30), "an answer", || {
        let (addr, token, body) = (addr_a.clone(), token.clone(), body.to_string());
        async move {
            let r = kiln_tests::http_call(
                &addr,
                "POST",
                "/v2/models/ddp/infer",
                &[("Authorization", &format!("Bearer {token}"))],
                body.as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
            (r.status == 200).then(|| r.text()).ok_or_else(|| r.text())
        }
    })
    .await;
    let doc: Value = serde_json::from_str(&answer).expect("JSON");
    let logits: Vec<f64> = serde_json::from_value(doc["outputs"][0]["data"].clone()).expect("data");
    assert_eq!(logits.len(), 6, "{doc}");
    // The first row is the "north" centre (class 0), the second "south" (1).
    let argmax = |row: &[f64]| {
        (0..row.len())
            .max_by(|&i, &j| row[i].total_cmp(&row[j]))
            .expect("a class")
    };
    assert_eq!(
        (argmax(&logits[..3]), argmax(&logits[3..])),
        (0, 1),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_ddp_gang_restarts_from_the_newest_checkpoint_and_leaves_no_rank_behind() {
    let Some(python) = torch_python() else {
        return;
    };
    let (mut cluster, dir) = cluster_with_data(&["a", "b", "c"]).await;
    let cores = cluster.worker_cores().await;
    // Slowed down (STEP_PAUSE) so that the kill lands mid-training.
    let spec = ddp_spec(
        "ddp-restart",
        &python,
        cores,
        8,
        2,
        ", STEP_PAUSE = \"0.25\"",
    );
    let script = include_str!("../programs/ddp_train.py");
    let job = submit(&cluster, dir.path(), &spec, &[("train.py", script)]).await;
    let running = kiln_tests::wait_for(Duration::from_secs(180), "a checkpoint", || async {
        let doc = show(&cluster, job).await;
        if doc["state"] == "Running" && doc["checkpoint_step"].as_u64() > Some(0) {
            Ok(doc)
        } else if doc["state"] == "Succeeded" || doc["state"] == "Failed" {
            panic!("job {job} ended before the kill: {doc}");
        } else {
            Err(format!("{} ({})", doc["state"], doc["reason"]))
        }
    })
    .await;
    let victim_id = running["shards"][1]["worker_id"]
        .as_str()
        .expect("worker")
        .to_string();
    let victim = ["a", "b", "c"]
        .into_iter()
        .find(|w| cluster.worker_id(w).as_deref() == Some(victim_id.as_str()))
        .expect("a worker of the cluster");
    // Rank 1's process on the victim.
    let before = logs(&cluster, job).await;
    let pid: i32 = before
        .lines()
        .filter(|l| l.contains("rank 1] rank 1 of 2: started"))
        .find_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no pid of rank 1 in {before}"));
    cluster.kill_worker(victim);
    // The rank does not outlive its worker.
    kiln_tests::wait_for(Duration::from_secs(10), "rank 1's process gone", || async {
        gone(pid).then_some(()).ok_or(format!("{pid} still runs"))
    })
    .await;
    let done = wait_state(&cluster, job, &["Succeeded"], Duration::from_secs(300)).await;
    assert!(done["attempt"].as_u64() >= Some(2), "{done}");
    let logs = logs(&cluster, job).await;
    let resumed: Vec<u64> = logs
        .lines()
        .filter(|l| l.contains("] resumed from step ") && !l.contains("[attempt 1 "))
        .filter_map(|l| l.split("] resumed from step ").nth(1)?.trim().parse().ok())
        .collect();
    assert!(
        !resumed.is_empty() && resumed.iter().all(|&s| s > 0),
        "the restarted gang did not resume from a checkpoint: {resumed:?}\n{logs}"
    );
    let digests = lines_with(&logs, "weights digest ");
    let last = |rank: u32| digests[&rank].last().cloned().expect("a digest");
    assert_eq!(last(0), last(1), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_program_fails_its_job_naming_the_rank_the_exit_code_and_its_last_lines() {
    let (cluster, dir) = cluster_with_data(&["a"]).await;
    let spec = r#"name = "boom"
max_failures = 1

[command]
run = ["sh", "fail.sh"]
code = "./code"
"#;
    let job = submit(
        &cluster,
        dir.path(),
        spec,
        &[("fail.sh", "echo starting\necho boom >&2\nexit 3\n")],
    )
    .await;
    let done = wait_state(&cluster, job, &["Failed"], Duration::from_secs(120)).await;
    let reason = done["reason"].as_str().unwrap_or_default();
    for wanted in ["rank 0", "exited with code 3", "boom", "starting"] {
        assert!(
            reason.contains(wanted),
            "no {wanted:?} in the reason: {reason}"
        );
    }
    // One restart (max_failures = 1), then the job failed.
    assert_eq!(done["attempt"].as_u64(), Some(2), "{done}");
    // `kiln jobs show` names what ran: the command, the code the CLI pushed, the
    // environment.
    let shown = cluster.cli_ok(&["jobs", "show", &job.to_string()]).await;
    for line in [
        "command:    sh fail.sh",
        "code:       boom-code@1",
        "runtime:    the worker's PATH",
    ] {
        assert!(shown.contains(line), "no {line:?} in {shown}");
    }
    let logs = logs(&cluster, job).await;
    assert!(logs.contains("boom"), "{logs}");
}

/// Whether process `pid` is gone (a zombie counts as gone: it runs nothing).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_job_leaves_no_process_behind_and_pinned_ranks_get_a_core_each() {
    let (cluster, dir) = cluster_with_data(&["a"]).await;
    // Two ranks of one CPU each on one worker: each pinned to a core of its
    // own. Each starts a child that ignores SIGTERM, so only the SIGKILL after
    // the grace ends it.
    let script = r#"python3 -c 'import os; print("affinity", sorted(os.sched_getaffinity(0)))'
(trap '' TERM; exec sleep 1000) &
echo "child $!"
echo "leader $$"
wait
"#;
    let spec = r#"name = "sleepy"
max_failures = 0

[command]
run = ["sh", "sleepy.sh"]
code = "./code"
grace_secs = 2

[resources]
shards = 2
cpus_per_shard = 1
"#;
    let job = submit(&cluster, dir.path(), spec, &[("sleepy.sh", script)]).await;
    wait_state(&cluster, job, &["Running"], Duration::from_secs(60)).await;
    let pids = kiln_tests::wait_for(Duration::from_secs(30), "both ranks' pids", || async {
        let logs = logs(&cluster, job).await;
        let mut pids = Vec::new();
        for prefix in ["child ", "leader "] {
            for lines in lines_with(&logs, prefix).values() {
                for line in lines {
                    if let Some(Ok(pid)) = line.strip_prefix(prefix).map(str::parse::<i32>) {
                        pids.push(pid);
                    }
                }
            }
        }
        (pids.len() == 4).then_some(pids).ok_or(logs)
    })
    .await;
    let logs_now = logs(&cluster, job).await;
    let cores_of_host = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores_of_host >= 2 {
        let affinity = lines_with(&logs_now, "affinity ");
        let sets: Vec<&String> = affinity.values().map(|l| &l[0]).collect();
        assert_eq!(sets.len(), 2, "{logs_now}");
        for set in &sets {
            assert_eq!(set.matches(',').count(), 0, "one core each: {set}");
        }
        assert_ne!(sets[0], sets[1], "two ranks share a core: {logs_now}");
    } else {
        eprintln!("skipped the pinning check: this host has one core");
    }
    for &pid in &pids {
        assert!(!gone(pid), "process {pid} is not running yet");
    }
    let cancelled = Instant::now();
    cluster.cli_ok(&["jobs", "cancel", &job.to_string()]).await;
    kiln_tests::wait_for(
        Duration::from_secs(15),
        "every process of the job gone",
        || async {
            let left: Vec<i32> = pids.iter().copied().filter(|&p| !gone(p)).collect();
            left.is_empty()
                .then_some(())
                .ok_or(format!("{left:?} still run"))
        },
    )
    .await;
    let took = cancelled.elapsed();
    // The child ignored SIGTERM: it went at the SIGKILL, after the grace.
    assert!(
        took >= Duration::from_secs(2),
        "gone after {took:?}, before the grace"
    );
    // The job's log is closed once it is cancelled; the worker's says it.
    let worker = cluster.worker_log("a");
    assert!(
        worker.contains("the job stopped; SIGTERM to its processes, SIGKILL after 2 s"),
        "{worker}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pip_environment_is_built_once_and_reused_by_the_next_job_with_the_same_list() {
    let (cluster, dir) = cluster_with_data(&["a"]).await;
    let spec = |name: &str| {
        format!(
            r#"name = "{name}"
max_failures = 0

[command]
run = ["python", "-c", "import six; print('six is', six.__version__)"]

[environment]
pip = ["six==1.17.0"]
"#
        )
    };
    let first = submit(&cluster, dir.path(), &spec("pip-one"), &[]).await;
    wait_state(&cluster, first, &["Succeeded"], Duration::from_secs(300)).await;
    let logs_first = logs(&cluster, first).await;
    assert!(
        logs_first.contains("building pip environment"),
        "{logs_first}"
    );
    assert!(
        logs_first.contains("pip: "),
        "pip's output is in the job's log: {logs_first}"
    );
    assert!(logs_first.contains("six is 1.17.0"), "{logs_first}");

    let second = submit(&cluster, dir.path(), &spec("pip-two"), &[]).await;
    wait_state(&cluster, second, &["Succeeded"], Duration::from_secs(120)).await;
    let logs_second = logs(&cluster, second).await;
    assert!(logs_second.contains("six is 1.17.0"), "{logs_second}");
    assert!(logs_second.contains("reused"), "{logs_second}");
    assert!(
        !logs_second.contains("pip: "),
        "pip ran again: {logs_second}"
    );

    // A requirement pip cannot find fails the job with pip's own words.
    let bad = submit(
        &cluster,
        dir.path(),
        &spec("pip-bad").replace("six==1.17.0", "kiln-no-such-package-xyz==0.0.1"),
        &[],
    )
    .await;
    let failed = wait_state(&cluster, bad, &["Failed"], Duration::from_secs(300)).await;
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("the pip environment"), "{reason}");
    assert!(reason.contains("kiln-no-such-package-xyz"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unchanged_mlflow_script_logs_into_its_jobs_run_through_a_failover_with_a_token_that_can_do_nothing_else(
) {
    let Some(python) = kiln_tests::mlflow::mlflow_python().await else {
        return;
    };
    let (mut cluster, dir) = cluster_with_data(&["a"]).await;
    // Another job's run, which the script's token must not reach.
    let other = submit(
        &cluster,
        dir.path(),
        "name = \"other\"\nexperiment = \"elsewhere\"\n[command]\nrun = [\"true\"]\n",
        &[],
    )
    .await;
    let other = wait_state(&cluster, other, &["Succeeded"], Duration::from_secs(60)).await;
    let other_run = other["run_id"].as_str().expect("a run").to_string();

    let spec = format!(
        r#"name = "tracked"
experiment = "mine"
max_failures = 0

[command]
run = ["python", "mlflow_in_job.py"]
code = "./code"

[environment]
python = "{}"
env = {{ OTHER_RUN = "{other_run}", TICKS = "40" }}
"#,
        python.display()
    );
    let script = include_str!("../programs/mlflow_in_job.py");
    let job = submit(&cluster, dir.path(), &spec, &[("mlflow_in_job.py", script)]).await;
    // The leading coordinator dies while the script logs its ticks.
    kiln_tests::wait_for(Duration::from_secs(120), "the script's ticks", || async {
        let logs = logs(&cluster, job).await;
        logs.contains("] tick 3")
            .then_some(())
            .ok_or(format!("{}", show(&cluster, job).await["reason"]))
    })
    .await;
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(10)).await;
    cluster.kill(leader);
    let done = wait_state(&cluster, job, &["Succeeded"], Duration::from_secs(180)).await;
    let run_id = done["run_id"].as_str().expect("a run").to_string();
    let logs = logs(&cluster, job).await;
    // Nothing lost across the failover. (A write in flight when the leader
    // died may be retried by the client and counted twice.)
    let logged: u64 = logs
        .lines()
        .find_map(|l| l.split("] ticks logged ").nth(1)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("the script did not count its ticks:\n{logs}"));
    assert!(
        (40..=41).contains(&logged),
        "{logged} ticks of 40 logged:\n{logs}"
    );
    assert!(
        logs.contains(&format!("] run {run_id}")),
        "the script did not log into the job's run {run_id}:\n{logs}"
    );
    for what in [
        "read another run",
        "write another run",
        "search experiments",
        "create an experiment",
    ] {
        assert!(
            logs.contains(&format!("REFUSED {what}: PERMISSION_DENIED")),
            "the job's token could {what}:\n{logs}"
        );
    }

    // What the script logged is the job's run's.
    let shown: Value =
        serde_json::from_str(&cluster.cli_ok(&["runs", "show", &run_id, "--json"]).await)
            .expect("runs show --json");
    let text = shown.to_string();
    assert!(text.contains("\"lr\""), "no param lr: {shown}");
    assert!(text.contains("\"loss\""), "no metric loss: {shown}");
    let files = shown["artifacts"]["files"].to_string();
    assert!(
        files.contains("config.json"),
        "log_dict's file is not among the run's artifacts: {shown}"
    );
    // 40 MiB in two parts of the multipart upload, through the worker.
    let big = shown["artifacts"]["files"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["path"] == "big.bin"))
        .unwrap_or_else(|| panic!("log_artifact's big file is missing: {shown}"));
    assert_eq!(big["size"].as_u64(), Some(40 << 20), "{big}");

    // The token ended with the job: the coordinators no longer know it.
    let tokens = cluster.cli_ok(&["token", "ls", "--json"]).await;
    assert!(!tokens.contains(&format!("job-{job}")), "{tokens}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rank_over_its_memory_limit_is_killed_and_its_reason_says_so() {
    let (cluster, dir) = cluster_with_data(&["a"]).await;
    let status: Value =
        serde_json::from_str(&cluster.cli_ok(&["status", "--json"]).await).expect("status");
    let limits = status["workers"][0]["resources"]["memory_limits"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // "enforced (cgroup v1|v2, <the worker's own cgroup directory>)" or "not
    // enforced: <why>".
    let enforced = limits.starts_with("enforced (cgroup v1, /")
        || limits.starts_with("enforced (cgroup v2, /");
    assert!(
        enforced || (limits.starts_with("not enforced: ") && limits.len() > 16),
        "kiln status says {limits:?} of memory limits: {status}"
    );
    if !enforced {
        eprintln!("skipped: this worker's memory limits are {limits}");
        return;
    }
    let spec = r#"name = "hungry"
max_failures = 0

[command]
run = ["python3", "-c", "print('allocating', flush=True); x = b'a' * (512 << 20); print('survived')"]

[resources]
memory_mib_per_shard = 64
"#;
    let job = submit(&cluster, dir.path(), spec, &[]).await;
    let failed = wait_state(&cluster, job, &["Failed"], Duration::from_secs(120)).await;
    let reason = failed["reason"].as_str().unwrap_or_default();
    for wanted in [
        "rank 0 was killed by the out-of-memory killer",
        "memory_mib_per_shard = 64 MiB",
        "allocating",
    ] {
        assert!(
            reason.contains(wanted),
            "no {wanted:?} in the reason: {reason}"
        );
    }
    assert!(!reason.contains("survived"), "{reason}");
}
