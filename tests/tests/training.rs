//! Training jobs through a real cluster (3 coordinators, workers, TLS and tokens):
//! `kiln train submit`, `kiln jobs ...`, the gang scheduler, the ring all-reduce
//! between shards on different workers, checkpoints in the artifact store.

use std::path::Path;
use std::time::Duration;

use kiln_tests::{stderr_text, Cluster};
use kiln_worker::train::checkpoint::Checkpoint;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// A cluster with the named workers, and a dataset pushed as `blobs@1`.
async fn cluster_with_data(workers: &[&str], rows: usize) -> (Cluster, tempfile::TempDir) {
    cluster_with_config(workers, rows, "").await
}

/// The same, with `config` as the coordinators' configuration file.
async fn cluster_with_config(
    workers: &[&str],
    rows: usize,
    config: &str,
) -> (Cluster, tempfile::TempDir) {
    let cluster = Cluster::start_with_workers(config, workers, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("blobs.csv");
    std::fs::write(&data, blobs_csv(rows, 7)).expect("write data");
    cluster.push_when_taken(&data, "blobs").await;
    (cluster, dir)
}

/// Three well separated Gaussian blobs in 4 features; the label is a word.
fn blobs_csv(rows: usize, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let centres = [
        [2.0, 0.0, -1.0, 0.5],
        [-2.0, 1.0, 1.0, -0.5],
        [0.0, -2.0, 0.0, 2.0],
    ];
    let names = ["north", "south", "west"];
    let mut out = String::from("f0,f1,f2,f3,kind\n");
    for i in 0..rows {
        let c = i % 3;
        let row: Vec<String> = centres[c]
            .iter()
            .map(|m| format!("{:.4}", m + rng.gen_range(-1.0..1.0) * 0.8))
            .collect();
        out.push_str(&format!("{},{}\n", row.join(","), names[c]));
    }
    out
}

fn spec(name: &str, shards: u32, cpus: u32, epochs: u32, extra: &str) -> String {
    format!(
        r#"name = "{name}"
experiment = "blobs"
max_failures = 2
{extra}

[data]
artifact = "blobs@1"
label = "kind"

[model]
kind = "mlp"
hidden = [16, 8]
activation = "tanh"

[optimizer]
kind = "adamw"
lr = 0.01
weight_decay = 0.01

[train]
epochs = {epochs}
batch_size = 32
seed = 11
checkpoint_every_steps = 20

[resources]
shards = {shards}
cpus_per_shard = {cpus}
"#
    )
}

/// The CPU cores of the (alike) workers.
async fn worker_cores(cluster: &Cluster) -> u32 {
    cluster.worker_cores().await
}

/// Submits a spec through the CLI; returns the job id.
async fn submit(cluster: &Cluster, dir: &Path, file: &str, text: &str) -> u64 {
    cluster.submit_job(&dir.join(file), text).await
}

async fn show(cluster: &Cluster, job: u64) -> Value {
    cluster.job(job).await
}

/// Waits until job `job` is in `state`; returns its record.
async fn wait_state(cluster: &Cluster, job: u64, state: &str, timeout: Duration) -> Value {
    kiln_tests::wait_for(timeout, &format!("job {job} {state}"), || async move {
        let doc = show(cluster, job).await;
        if doc["state"] == state {
            Ok(doc)
        } else if ["Failed", "Cancelled", "Succeeded"]
            .contains(&doc["state"].as_str().unwrap_or(""))
        {
            panic!(
                "job {job} ended {} instead: {}",
                doc["state"], doc["reason"]
            );
        } else {
            Err(format!("{} ({})", doc["state"], doc["reason"]))
        }
    })
    .await
}

/// Whether a job runs and has written a checkpoint.
fn checkpointed(doc: &Value) -> bool {
    doc["state"] == "Running" && doc["checkpoint_step"].as_u64() > Some(0)
}

/// Waits until job `job`'s record satisfies `ready`; returns the record.
async fn wait_job(
    cluster: &Cluster,
    job: u64,
    timeout: Duration,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let ready = &ready;
    kiln_tests::wait_for(timeout, what, || async move {
        let doc = show(cluster, job).await;
        if ready(&doc) {
            Ok(doc)
        } else {
            Err(format!(
                "attempt {} {} at step {} ({})",
                doc["attempt"], doc["state"], doc["progress"]["step"], doc["reason"]
            ))
        }
    })
    .await
}

/// Pulls a job's final checkpoint and returns its parameters.
async fn final_params(cluster: &Cluster, dir: &Path, job: &Value) -> Vec<f32> {
    let reference = job["checkpoint"].as_str().expect("a checkpoint");
    let out = dir.join(format!("ckpt-{}", job["id"]));
    let out_text = out.display().to_string();
    let pulled = cluster
        .run_cli(&["artifact", "pull", reference, "-o", &out_text])
        .await;
    assert!(
        pulled.status.success(),
        "pull {reference}: {}",
        stderr_text(&pulled)
    );
    let bytes = std::fs::read(&out).expect("read checkpoint");
    Checkpoint::decode(&bytes)
        .expect("decode checkpoint")
        .params
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_shards_end_with_the_weights_of_one_shard() {
    let (cluster, dir) = cluster_with_data(&["a", "b"], 600).await;
    // Shards that take a whole worker each, so that the ring crosses workers.
    let cores = worker_cores(&cluster).await;
    let one = submit(
        &cluster,
        dir.path(),
        "one.toml",
        &spec("blobs-one", 1, 1, 3, ""),
    )
    .await;
    let two = submit(
        &cluster,
        dir.path(),
        "two.toml",
        &spec("blobs-two", 2, cores, 3, ""),
    )
    .await;
    let one = wait_state(&cluster, one, "Succeeded", Duration::from_secs(120)).await;
    let two = wait_state(&cluster, two, "Succeeded", Duration::from_secs(120)).await;

    // The two shards ran on different workers, linked by the ring.
    let workers = kiln_tests::shard_workers(&two);
    assert_eq!(workers.len(), 2);
    assert_ne!(workers[0], workers[1], "{two}");
    // The ring's key went to the shards' workers only: callers never see it.
    let id = two["id"].as_u64().expect("id");
    let record = cluster
        .cluster_client()
        .call(|mut c| async move {
            c.get_job(kiln_proto::v1::GetJobRequest { job_id: id })
                .await
                .map(|r| r.into_inner())
        })
        .await
        .expect("get job")
        .job
        .expect("a job");
    assert!(record.session_id != 0, "placed: {record:?}");
    assert!(record.ring_key.is_empty(), "GetJob shows the ring key");

    let a = final_params(&cluster, dir.path(), &one).await;
    let b = final_params(&cluster, dir.path(), &two).await;
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4,
        "the 2-shard weights differ from the 1-shard weights by up to {worst}"
    );

    // It learned, and the run holds the curve.
    let accuracy = one["progress"]["accuracy"].as_f64().expect("accuracy");
    assert!(accuracy > 0.9, "accuracy {accuracy} on separable blobs");
    let run = one["run_id"].as_str().expect("run id");
    let out = cluster.run_cli(&["runs", "show", run, "--json"]).await;
    assert!(out.status.success(), "{}", stderr_text(&out));
    let run: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(run["status"], "FINISHED", "{run}");
    assert_eq!(run["params"]["train.batch_size"], "32", "{run}");
    assert!(
        run["metrics"]["train_loss"]["value"].as_f64().is_some(),
        "{run}"
    );

    let logs = cluster
        .run_cli(&["jobs", "logs", &one["id"].to_string()])
        .await;
    let logs = String::from_utf8_lossy(&logs.stdout).to_string();
    assert!(logs.contains("epoch 3/3"), "{logs}");

    // The two workers share this host's /dev/shm: the ring's values went
    // through shared-memory lanes both ways.
    let logs = cluster.run_cli(&["jobs", "logs", &id.to_string()]).await;
    let logs = String::from_utf8_lossy(&logs.stdout).to_string();
    for (rank, peer) in [(0, 1), (1, 0)] {
        let line = format!(
            "rank {rank}: all-reduce through ring (to rank {peer}: shared memory, from rank {peer}: shared memory)"
        );
        assert!(logs.contains(&line), "no {line:?} in {logs}");
        // CPU shards name where their pass runs (a GPU shard names its device).
        let line = format!("rank {rank}: forward and backward on the CPU (");
        assert!(logs.contains(&line), "no {line:?} in {logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gang_that_does_not_fit_waits_then_runs() {
    let (cluster, dir) = cluster_with_data(&["a", "b"], 3000).await;
    let cores = worker_cores(&cluster).await;
    // The first job takes every core of both workers for a while.
    let big = submit(
        &cluster,
        dir.path(),
        "big.toml",
        &spec("big", 2, cores, 20, ""),
    )
    .await;
    wait_state(&cluster, big, "Running", Duration::from_secs(30)).await;
    let small = submit(
        &cluster,
        dir.path(),
        "small.toml",
        &spec("small", 1, 1, 1, ""),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = show(&cluster, small).await;
    assert_eq!(waiting["state"], "Pending", "{waiting}");
    // The scheduler's own reason, not the one a job is submitted with.
    assert_eq!(
        waiting["reason"], "waiting for resources held by running jobs",
        "{waiting}"
    );
    wait_state(&cluster, big, "Succeeded", Duration::from_secs(240)).await;
    wait_state(&cluster, small, "Succeeded", Duration::from_secs(120)).await;

    // Cancelling an ended job is refused by name; cancelling a queued one works.
    let out = cluster
        .run_cli(&["jobs", "cancel", &small.to_string()])
        .await;
    assert!(!out.status.success());
    assert!(stderr_text(&out).contains("ended"), "{}", stderr_text(&out));
    let again = submit(
        &cluster,
        dir.path(),
        "again.toml",
        &spec("again", 2, cores, 20, ""),
    )
    .await;
    let out = cluster
        .run_cli(&["jobs", "cancel", &again.to_string()])
        .await;
    assert!(out.status.success(), "{}", stderr_text(&out));
    assert_eq!(show(&cluster, again).await["state"], "Cancelled");

    // Memory is held like cores: a shard that takes 60% of a worker's memory
    // leaves no room for another beside it, though cores are free.
    let out = cluster.run_cli(&["status", "--json"]).await;
    let status: Value = serde_json::from_slice(&out.stdout).expect("json");
    let memory_mib = status["workers"][0]["resources"]["memory_bytes"]
        .as_u64()
        .expect("memory")
        >> 20;
    let heavy_spec = |name: &str, shards: u32, epochs: u32| {
        spec(name, shards, 1, epochs, "").replace(
            "cpus_per_shard = 1",
            &format!(
                "cpus_per_shard = 1\nmemory_mib_per_shard = {}",
                memory_mib * 6 / 10
            ),
        )
    };
    let heavy = submit(
        &cluster,
        dir.path(),
        "heavy.toml",
        &heavy_spec("heavy", 2, 20),
    )
    .await;
    let running = wait_state(&cluster, heavy, "Running", Duration::from_secs(30)).await;
    assert_eq!(
        running["resources"]["memory_mib_per_shard"],
        memory_mib * 6 / 10,
        "{running}"
    );
    let beside = submit(
        &cluster,
        dir.path(),
        "beside.toml",
        &heavy_spec("beside", 1, 1),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = show(&cluster, beside).await;
    assert_eq!(waiting["state"], "Pending", "{waiting}");
    assert_eq!(
        waiting["reason"], "waiting for resources held by running jobs",
        "{waiting}"
    );
    wait_state(&cluster, heavy, "Succeeded", Duration::from_secs(240)).await;
    wait_state(&cluster, beside, "Succeeded", Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_specs_are_refused_at_submit_with_the_reason() {
    let (cluster, dir) = cluster_with_data(&["a"], 30).await;
    let good = spec("fine", 1, 1, 1, "");
    let cases = [
        (
            "unknown key",
            good.replace("seed = 11", "seed = 11\nsped = 3"),
            "train.sped",
        ),
        (
            "missing dataset version",
            good.replace("blobs@1", "blobs@9"),
            "blobs@9 does not exist",
        ),
        (
            "label not a column",
            good.replace("label = \"kind\"", "label = \"species\""),
            "'species' is not in",
        ),
        (
            "no shards",
            good.replace("shards = 1", "shards = 0"),
            "resources.shards",
        ),
        (
            "too many GPUs",
            good.replace(
                "cpus_per_shard = 1",
                "cpus_per_shard = 1\ngpus_per_shard = 4",
            ),
            "4 GPU(s)",
        ),
        (
            "more memory than any worker has",
            good.replace(
                "cpus_per_shard = 1",
                "cpus_per_shard = 1\nmemory_mib_per_shard = 67108864",
            ),
            "67108864 MiB of memory; no worker has that",
        ),
        (
            "a model too big to train in any worker's memory",
            good.replace("hidden = [16, 8]", "hidden = [65536, 65536, 65536]"),
            "holds at least",
        ),
    ];
    for (what, text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).expect("write");
        let out = cluster
            .run_cli(&["train", "submit", &path.display().to_string()])
            .await;
        assert!(!out.status.success(), "{what}: accepted");
        let err = stderr_text(&out);
        assert!(
            err.contains(needle),
            "{what}: the error does not say '{needle}': {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    let out = cluster.run_cli(&["jobs", "ls", "--json"]).await;
    let jobs: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(0),
        "a refused spec left a job: {jobs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_gang_restarts_from_its_checkpoint_and_matches_an_undisturbed_run() {
    let (mut cluster, dir) = cluster_with_data(&["a", "b", "c"], 3000).await;
    let cores = worker_cores(&cluster).await;
    let epochs = 12;
    // Undisturbed first, then the same spec again with a worker killed mid-way.
    let calm = submit(
        &cluster,
        dir.path(),
        "calm.toml",
        &spec("calm", 2, cores, epochs, ""),
    )
    .await;
    let calm = wait_state(&cluster, calm, "Succeeded", Duration::from_secs(300)).await;
    let hit = submit(
        &cluster,
        dir.path(),
        "hit.toml",
        &spec("hit", 2, cores, epochs, ""),
    )
    .await;
    let running = wait_job(
        &cluster,
        hit,
        Duration::from_secs(120),
        "a checkpoint of the second job",
        checkpointed,
    )
    .await;
    let total = running["progress"]["total_steps"]
        .as_u64()
        .expect("total steps");
    let step = running["progress"]["step"].as_u64().expect("step");
    assert!(
        step < total,
        "the job ended before the kill: make it longer ({step}/{total})"
    );
    // Kill the worker of rank 1: rank 0's all-reduce fails at once (no hang), and
    // the leader sees the worker Down.
    let victim_id = running["shards"][1]["worker_id"]
        .as_str()
        .expect("worker")
        .to_string();
    let victim = ["a", "b", "c"]
        .into_iter()
        .find(|w| cluster.worker_id(w).as_deref() == Some(victim_id.as_str()))
        .expect("a worker of the cluster");
    cluster.kill_worker(victim);
    let done = wait_state(&cluster, hit, "Succeeded", Duration::from_secs(300)).await;
    assert!(done["failures"].as_u64() >= Some(1), "{done}");
    assert!(done["attempt"].as_u64() >= Some(2), "{done}");
    let placed = kiln_tests::shard_workers(&done);
    assert!(
        !placed.contains(&victim_id.as_str()),
        "placed on the dead worker: {done}"
    );
    let logs = cluster.run_cli(&["jobs", "logs", &hit.to_string()]).await;
    let logs = String::from_utf8_lossy(&logs.stdout).to_string();
    assert!(logs.contains("resumed from job-"), "{logs}");
    let before = calm["progress"]["accuracy"].as_f64().expect("accuracy");
    let after = done["progress"]["accuracy"].as_f64().expect("accuracy");
    assert!(
        (before - after).abs() <= 0.01,
        "accuracy {after} after the restart, {before} undisturbed"
    );
}

/// The log lines of `log` that say `what` about a shard of `job` at `attempt`,
/// with their timestamps (RFC 3339 UTC, which sort as text).
fn shard_lines<'a>(log: &'a str, what: &str, job: u64, attempt: u64) -> Vec<&'a str> {
    let needle = format!("job={job} attempt={attempt} ");
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&needle))
        .collect()
}

fn stamp(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_worker_stops_its_shard_on_its_lease_and_the_gang_moves_only_after_the_rest_stopped(
) {
    let (cluster, dir) = cluster_with_data(&["a", "b", "c"], 3000).await;
    let cores = worker_cores(&cluster).await;
    let job = submit(
        &cluster,
        dir.path(),
        "long.toml",
        &spec("long", 2, cores, 400, ""),
    )
    .await;
    let running = wait_job(
        &cluster,
        job,
        Duration::from_secs(120),
        "the job training",
        |doc| doc["state"] == "Running" && doc["progress"]["step"].as_u64() > Some(0),
    )
    .await;
    let worker_of = |rank: usize| {
        let id = running["shards"][rank]["worker_id"]
            .as_str()
            .expect("worker")
            .to_string();
        ["a", "b", "c"]
            .into_iter()
            .find(|w| cluster.worker_id(w).as_deref() == Some(id.as_str()))
            .expect("a worker of the cluster")
    };
    let (frozen, survivor) = (worker_of(1), worker_of(0));
    let frozen_id = cluster.worker_id(frozen).expect("id");
    // A hung machine: its shard's peer waits on an open socket (the ring's I/O
    // timeout is minutes), so only the leader's Down verdict restarts the gang.
    cluster.pause_worker(frozen);
    let moved = wait_job(
        &cluster,
        job,
        Duration::from_secs(90),
        "the gang running again without the frozen worker",
        |doc| {
            let all_running = doc["shards"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["state"] == "Running"));
            doc["attempt"].as_u64() >= Some(2) && doc["state"] == "Running" && all_running
        },
    )
    .await;
    for shard in moved["shards"].as_array().expect("shards") {
        assert_ne!(shard["worker_id"], frozen_id.as_str(), "{moved}");
    }
    cluster.resume_worker(frozen);
    // Woken, the frozen worker finds its lease lapsed and stops its shard with a
    // failure, before a heartbeat could tell it anything.
    let stopped = kiln_tests::wait_for(
        Duration::from_secs(30),
        "the woken worker's shard stopped",
        || {
            let log = cluster.worker_log(frozen);
            std::future::ready(
                if shard_lines(&log, "a training shard ended", job, 1).is_empty() {
                    Err("no end of its shard logged yet".to_string())
                } else {
                    Ok(log)
                },
            )
        },
    )
    .await;
    assert_eq!(
        shard_lines(
            &stopped,
            "no answer from the coordinators within its lease",
            job,
            1
        )
        .len(),
        1,
        "the woken shard did not stop on its lease:\n{stopped}"
    );
    // The survivor's shard of attempt 1 ended before any shard of attempt 2
    // started, on any worker: the leader held the gang until it had.
    let survivor_log = cluster.worker_log(survivor);
    let ended = shard_lines(&survivor_log, "a training shard ended", job, 1);
    assert_eq!(ended.len(), 1, "{survivor_log}");
    let ended_at = stamp(ended[0]);
    assert!(
        ended_at.starts_with("20"),
        "a log line without a timestamp: {}",
        ended[0]
    );
    let attempt = moved["attempt"].as_u64().expect("attempt");
    let mut started = 0;
    for w in ["a", "b", "c"] {
        let log = cluster.worker_log(w);
        for line in shard_lines(&log, "starting a training shard", job, attempt) {
            started += 1;
            assert!(
                stamp(line) > ended_at,
                "worker {w} started attempt {attempt} at {} before the survivor's attempt-1 shard ended at {ended_at}",
                stamp(line)
            );
        }
    }
    assert_eq!(started, 2, "attempt {attempt}'s two shards");
    let out = cluster.run_cli(&["jobs", "cancel", &job.to_string()]).await;
    assert!(out.status.success(), "cancel: {}", stderr_text(&out));
    wait_state(&cluster, job, "Cancelled", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_higher_priority_job_preempts_a_lower_one_which_resumes_from_its_checkpoint() {
    let (cluster, dir) =
        cluster_with_config(&["a", "b"], 3000, "[scheduler]\npreemption = true\n").await;
    let cores = worker_cores(&cluster).await;
    // The low job takes every core of both workers.
    let low = submit(
        &cluster,
        dir.path(),
        "low.toml",
        &spec("low", 2, cores, 300, "priority = 1"),
    )
    .await;
    wait_job(
        &cluster,
        low,
        Duration::from_secs(120),
        "a checkpoint of the low job",
        checkpointed,
    )
    .await;
    // An equal priority waits; a higher one stops the low job.
    let peer = submit(
        &cluster,
        dir.path(),
        "peer.toml",
        &spec("peer", 1, 1, 1, "priority = 1"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(show(&cluster, low).await["state"], "Running");
    assert_eq!(show(&cluster, peer).await["state"], "Pending");
    let out = cluster
        .run_cli(&["jobs", "cancel", &peer.to_string()])
        .await;
    assert!(out.status.success(), "{}", stderr_text(&out));
    let high = submit(
        &cluster,
        dir.path(),
        "high.toml",
        &spec("high", 2, cores, 2, "priority = 5"),
    )
    .await;
    let by = format!("preempted by job {high}");
    let preempted = wait_job(
        &cluster,
        low,
        Duration::from_secs(60),
        "the low job preempted",
        |doc| doc["reason"].as_str().unwrap_or_default().contains(&by),
    )
    .await;
    assert_eq!(preempted["state"], "Pending", "{preempted}");
    wait_state(&cluster, high, "Succeeded", Duration::from_secs(120)).await;
    // The low job comes back on its own, from its checkpoint, and a preemption
    // is not a failure.
    let back = wait_job(
        &cluster,
        low,
        Duration::from_secs(60),
        "the low job running again",
        |doc| doc["state"] == "Running" && doc["attempt"].as_u64() >= Some(2),
    )
    .await;
    assert_eq!(back["failures"].as_u64(), Some(0), "{back}");
    let logs = cluster.run_cli(&["jobs", "logs", &low.to_string()]).await;
    let logs = String::from_utf8_lossy(&logs.stdout).to_string();
    assert!(
        logs.contains("attempt 1 preempted: preempted by job"),
        "{logs}"
    );
    kiln_tests::wait_for(
        Duration::from_secs(60),
        "the low job resumed from its checkpoint",
        || {
            let cluster = &cluster;
            async move {
                let logs = cluster.run_cli(&["jobs", "logs", &low.to_string()]).await;
                let logs = String::from_utf8_lossy(&logs.stdout).to_string();
                if logs.contains("resumed from job-") {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            }
        },
    )
    .await;
    let out = cluster.run_cli(&["jobs", "cancel", &low.to_string()]).await;
    assert!(out.status.success(), "{}", stderr_text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dataset_in_parts_trains_as_the_same_rows_in_one_file() {
    let (cluster, dir) = cluster_with_data(&["a"], 600).await;
    // The same rows as blobs@1, split in two files of a directory version (with
    // a file of another format beside them, which the trainer leaves alone).
    let whole = std::fs::read_to_string(dir.path().join("blobs.csv")).expect("read data");
    let (header, rows) = whole.split_once('\n').expect("a header");
    let rows: Vec<&str> = rows.lines().collect();
    let parts = dir.path().join("parts");
    std::fs::create_dir_all(&parts).expect("mkdir");
    let (first, second) = rows.split_at(rows.len() / 3);
    for (name, chunk) in [("part-0.csv", first), ("part-1.csv", second)] {
        std::fs::write(
            parts.join(name),
            format!("{header}\n{}\n", chunk.join("\n")),
        )
        .expect("write part");
    }
    std::fs::write(parts.join("README.txt"), "two parts of blobs").expect("write");
    let parts_text = parts.display().to_string();
    let push = cluster
        .run_cli(&["artifact", "push", &parts_text, "--name", "blobs-parts"])
        .await;
    assert!(push.status.success(), "{}", stderr_text(&push));
    let one_file = submit(
        &cluster,
        dir.path(),
        "file.toml",
        &spec("from-file", 1, 1, 2, ""),
    )
    .await;
    let in_parts = submit(
        &cluster,
        dir.path(),
        "parts.toml",
        &spec("from-parts", 1, 1, 2, "").replace("blobs@1", "blobs-parts@1"),
    )
    .await;
    let one_file = wait_state(&cluster, one_file, "Succeeded", Duration::from_secs(120)).await;
    let in_parts = wait_state(&cluster, in_parts, "Succeeded", Duration::from_secs(120)).await;
    assert_eq!(
        one_file["progress"]["total_steps"], in_parts["progress"]["total_steps"],
        "{in_parts}"
    );
    // The same rows in the same order, the same seed: the same weights.
    let a = final_params(&cluster, dir.path(), &one_file).await;
    let b = final_params(&cluster, dir.path(), &in_parts).await;
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_whose_loss_is_not_finite_fails_and_registers_no_model() {
    let (cluster, dir) = cluster_with_data(&["a"], 30).await;
    // Targets far beyond what a squared error can hold in f32: the first batch's
    // loss is an infinity, as a run that diverged would reach later.
    let mut csv = String::from("f0,f1,f2,f3,kind\n");
    for i in 0..60 {
        csv.push_str(&format!("{i},1,2,3,{}e30\n", i + 1));
    }
    let data = dir.path().join("huge.csv");
    std::fs::write(&data, csv).expect("write data");
    cluster.push_when_taken(&data, "huge").await;
    let text = spec("diverges", 1, 1, 2, "")
        .replace("blobs@1", "huge@1")
        .replace("max_failures = 2", "max_failures = 0");
    let job = submit(&cluster, dir.path(), "diverges.toml", &text).await;
    let doc = kiln_tests::wait_for(
        Duration::from_secs(120),
        "the diverging job to end",
        || async {
            let doc = show(&cluster, job).await;
            match doc["state"].as_str() {
                Some("Failed" | "Succeeded" | "Cancelled") => Ok(doc),
                other => Err(format!("{other:?} ({})", doc["reason"])),
            }
        },
    )
    .await;
    assert_eq!(doc["state"], "Failed", "a run with an infinite loss: {doc}");
    let reason = doc["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("(not finite): training diverged"),
        "the reason names the loss: {reason}"
    );
    let models: Value =
        serde_json::from_str(&cluster.cli_ok(&["models", "ls", "--json"]).await).expect("models");
    assert!(
        !models.to_string().contains("diverges"),
        "a failed run registered a model: {models}"
    );
}
