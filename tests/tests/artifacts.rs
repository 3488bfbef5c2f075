//! Artifacts through a real cluster (3 coordinators, 2 workers, TLS and tokens):
//! `kiln artifact push | pull | ls | log | tag` as a user runs them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_tests::v1::{GetChunkRequest, HasChunksRequest};
use kiln_tests::{stderr_text, Cluster};
use rand::{Rng, SeedableRng};

/// A cluster with two workers that know the admin token.
async fn cluster() -> Cluster {
    cluster_with(&["a", "b"]).await
}

/// A cluster with the named workers, which know the admin token.
async fn cluster_with(workers: &[&str]) -> Cluster {
    let with_args: Vec<(&str, &[&str])> = workers.iter().map(|w| (*w, &[][..])).collect();
    cluster_with_args(&with_args).await
}

/// A cluster with the named workers, each with extra flags.
async fn cluster_with_args(workers: &[(&str, &[&str])]) -> Cluster {
    let mut cluster = Cluster::start(3, "");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    for (name, extra) in workers {
        cluster.start_worker_with(name, extra);
    }
    // The admin token exists once run_cli has made it; both workers know it once a
    // pull of a pushed file succeeds.
    let dir = tempfile::tempdir().expect("tempdir");
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"probe").expect("write probe");
    let probe_text = probe.display().to_string();
    let out_text = dir.path().join("probe.out").display().to_string();
    kiln_tests::wait_for(
        Duration::from_secs(20),
        "two workers that take pushes",
        || {
            let cluster = &cluster;
            let (probe, out) = (probe_text.clone(), out_text.clone());
            async move {
                let push = cluster
                    .run_cli(&["artifact", "push", &probe, "--name", "probe", "--json"])
                    .await;
                if !push.status.success() {
                    return Err(stderr_text(&push));
                }
                let report: serde_json::Value =
                    serde_json::from_slice(&push.stdout).map_err(|e| e.to_string())?;
                if report["replicas"] != 2 {
                    return Err(format!("pushed on {} replica(s)", report["replicas"]));
                }
                let pull = cluster
                    .run_cli(&["artifact", "pull", "probe", "-o", &out])
                    .await;
                if pull.status.success() {
                    Ok(())
                } else {
                    Err(stderr_text(&pull))
                }
            }
        },
    )
    .await;
    cluster
}

/// Runs `kiln artifact push PATH --name NAME --json ...` and returns its report.
async fn push(cluster: &Cluster, path: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let path = path.display().to_string();
    let mut args = vec!["artifact", "push", path.as_str(), "--name", name, "--json"];
    args.extend_from_slice(extra);
    let out = cluster.run_cli(&args).await;
    assert!(
        out.status.success(),
        "push {path} as {name}: {}",
        stderr_text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("push --json prints JSON")
}

/// Runs `kiln artifact pull REFERENCE -o OUT`.
async fn pull(cluster: &Cluster, reference: &str, out: &Path) {
    let out_text = out.display().to_string();
    let result = cluster
        .run_cli(&["artifact", "pull", reference, "-o", &out_text])
        .await;
    assert!(
        result.status.success(),
        "pull {reference}: {}",
        stderr_text(&result)
    );
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

/// CSV rows `from..to`, the same for the same range.
fn csv_rows(from: usize, to: usize) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(from as u64);
    (from..to)
        .map(|i| {
            format!(
                "{i},{:.6},{:.6},{},class{}\n",
                rng.gen::<f64>(),
                rng.gen::<f64>() * 100.0,
                rng.gen_range(0..1000),
                i % 7
            )
        })
        .collect()
}

/// Every file under `root`, by relative path.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path.strip_prefix(root).expect("under root").to_path_buf();
                out.insert(rel, std::fs::read(&path).expect("read"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trips_are_byte_identical_and_identical_bytes_are_stored_once() {
    let mut cluster = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    // Files: empty, one byte, a few MB.
    let cases: [(&str, Vec<u8>); 3] = [
        ("empty", Vec::new()),
        ("one", b"x".to_vec()),
        ("few-mb", random_bytes(5 * 1024 * 1024 + 3, 7)),
    ];
    for (name, bytes) in &cases {
        let src = d.join(format!("{name}.bin"));
        std::fs::write(&src, bytes).expect("write");
        let report = push(&cluster, &src, name, &["--tag", "first"]).await;
        assert_eq!(report["version"], 1, "{report}");
        assert_eq!(report["bytes"], bytes.len() as u64);
        let out = d.join(format!("{name}.out"));
        pull(&cluster, &format!("{name}@first"), &out).await;
        assert_eq!(&std::fs::read(&out).expect("read"), bytes, "{name}");
    }

    // A tree of many small files, nested, one of them empty.
    let src_tree = d.join("tree");
    for i in 0..120 {
        let path = src_tree.join(format!("part-{}/sub-{}/f{i}.txt", i % 5, i % 3));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, format!("file {i}\n").repeat(i)).expect("write");
    }
    let report = push(&cluster, &src_tree, "tree", &[]).await;
    assert_eq!(report["files"], 120);
    let out_tree = d.join("tree.out");
    pull(&cluster, "tree", &out_tree).await;
    assert_eq!(tree(&src_tree), tree(&out_tree), "the tree came back whole");

    // The same content again stores no new chunk.
    let few_mb = d.join("few-mb.bin");
    let again = push(&cluster, &few_mb, "few-mb", &[]).await;
    assert_eq!(again["version"], 2);
    assert_eq!(again["new_chunks"], 0, "{again}");
    assert_eq!(again["new_bytes"], 0);

    // A CSV: appending 1% stores at most 5% new bytes; a line inserted near the
    // start stores little more than the chunks around it.
    let rows = 400_000;
    let base = csv_rows(0, rows);
    let csv = d.join("data.csv");
    std::fs::write(&csv, &base).expect("write csv");
    let first = push(&cluster, &csv, "data", &[]).await;
    let total = first["bytes"].as_u64().expect("bytes");
    assert!(total > 10_000_000, "a CSV of {total} bytes");
    let appended = format!("{base}{}", csv_rows(rows, rows + rows / 100));
    std::fs::write(&csv, &appended).expect("append");
    let second = push(&cluster, &csv, "data", &[]).await;
    let new_bytes = second["new_bytes"].as_u64().expect("new bytes");
    println!(
        "append 1%: {new_bytes} new bytes of {} ({:.2}%)",
        second["bytes"],
        100.0 * new_bytes as f64 / second["bytes"].as_f64().expect("bytes")
    );
    assert!(
        new_bytes * 20 <= second["bytes"].as_u64().expect("bytes"),
        "appending 1% stored {new_bytes} new bytes"
    );
    let inserted = format!(
        "{}an inserted line\n{}",
        &appended[..5000],
        &appended[5000..]
    );
    std::fs::write(&csv, &inserted).expect("insert");
    let third = push(&cluster, &csv, "data", &[]).await;
    let new_bytes = third["new_bytes"].as_u64().expect("new bytes");
    println!("insert a line: {new_bytes} new bytes");
    assert!(
        new_bytes <= 2 * 1024 * 1024,
        "an inserted line stored {new_bytes} new bytes; the chunks around it are at most 2 MiB"
    );
    // Diff says the same as the pushes did.
    let diff = cluster
        .run_cli(&["artifact", "diff", "data@1", "data@2", "--json"])
        .await;
    assert!(diff.status.success(), "diff: {}", stderr_text(&diff));
    let diff: serde_json::Value = serde_json::from_slice(&diff.stdout).expect("diff --json");
    assert_eq!(diff["new_bytes"], second["new_bytes"], "{diff}");
    assert_eq!(diff["changed"][0], "data.csv");
    let same = cluster
        .run_cli(&["artifact", "diff", "tree@1", "tree@latest", "--json"])
        .await;
    let same: serde_json::Value = serde_json::from_slice(&same.stdout).expect("diff --json");
    assert_eq!(same["unchanged"], 120, "{same}");
    assert_eq!(same["new_bytes"], 0);

    let out = d.join("data.out");
    pull(&cluster, "data@2", &out).await;
    assert_eq!(std::fs::read(&out).expect("read"), appended.as_bytes());
    pull(&cluster, "data", &out).await;
    assert_eq!(std::fs::read(&out).expect("read"), inserted.as_bytes());

    // Listings.
    let ls = cluster.run_cli(&["artifact", "ls", "--json"]).await;
    let ls: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("ls --json");
    let data = ls
        .as_array()
        .expect("a list")
        .iter()
        .find(|a| a["name"] == "data")
        .expect("data is listed");
    assert_eq!(data["latest"], 3);
    let log = cluster
        .run_cli(&["artifact", "log", "data", "--json"])
        .await;
    let log: serde_json::Value = serde_json::from_slice(&log.stdout).expect("log --json");
    let versions: Vec<u64> = log
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["version"].as_u64().expect("version"))
        .collect();
    assert_eq!(versions, vec![3, 2, 1], "newest first");
    assert!(log[0]["created_by"]
        .as_str()
        .is_some_and(|w| w.starts_with("token:")));
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_of_one_name_get_two_complete_versions() {
    let mut cluster = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let one = dir.path().join("one.bin");
    let two = dir.path().join("two.bin");
    std::fs::write(&one, random_bytes(3 * 1024 * 1024, 1)).expect("write");
    std::fs::write(&two, random_bytes(3 * 1024 * 1024, 2)).expect("write");
    let (a, b) = tokio::join!(
        push(&cluster, &one, "shared", &[]),
        push(&cluster, &two, "shared", &[])
    );
    let mut numbers = vec![a["version"].as_u64(), b["version"].as_u64()];
    numbers.sort();
    assert_eq!(numbers, vec![Some(1), Some(2)], "{a} {b}");
    let mut pulled = Vec::new();
    for version in [1, 2] {
        let out = dir.path().join(format!("v{version}"));
        pull(&cluster, &format!("shared@{version}"), &out).await;
        pulled.push(std::fs::read(&out).expect("read"));
    }
    pulled.sort();
    let mut sources = vec![
        std::fs::read(&one).expect("read"),
        std::fs::read(&two).expect("read"),
    ];
    sources.sort();
    assert_eq!(pulled, sources, "each version holds one push, whole");
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_replica_is_skipped_for_a_good_one() {
    let mut cluster = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("model.bin");
    // Random bytes do not compress, so they sit on disk as they are.
    let bytes = random_bytes(2 * 1024 * 1024, 9);
    std::fs::write(&src, &bytes).expect("write");
    let report = push(&cluster, &src, "model", &[]).await;
    assert_eq!(report["replicas"], 2);

    corrupt_on_disk(&cluster, "a", &bytes[100_000..100_064]);

    // Worker a refuses to serve the rotten chunk; worker b serves it whole.
    let chunk = chunk_at(&bytes, 100_000);
    let ask = |name: &str| {
        let mut client = cluster.blobs_client(name);
        let id = chunk.id.0.to_vec();
        async move { client.get_chunk(GetChunkRequest { id }).await }
    };
    let refused = ask("a")
        .await
        .expect_err("worker a must not serve rotten bytes");
    assert_eq!(refused.code(), tonic::Code::DataLoss, "{refused}");
    let good = ask("b").await.expect("worker b serves the chunk");
    assert_eq!(good.into_inner().data, chunk.data);

    // A pull skips the bad replica, whichever it asks first.
    for _ in 0..2 {
        let out = dir.path().join("model.out");
        pull(&cluster, "model", &out).await;
        assert_eq!(std::fs::read(&out).expect("read"), bytes);
    }
    let (_, metrics) = kiln_tests::http_get(
        &cluster.worker_flag("a", "--http"),
        "/metrics",
        Some(&cluster.admin_token().await),
    )
    .await;
    let corrupt: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_worker_chunks_corrupt_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("kiln_worker_chunks_corrupt_total");
    assert!(
        corrupt >= 1,
        "worker a counted no corrupt chunk:\n{metrics}"
    );
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_error_and_leaves_nothing_behind() {
    let mut cluster = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("x.csv");
    std::fs::write(&src, csv_rows(0, 1000)).expect("write");
    push(&cluster, &src, "x", &["--tag", "good"]).await;
    let src_text = src.display().to_string();
    let out = dir.path().join("out");
    let out_text = out.display().to_string();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["artifact", "pull", "nosuch", "-o", &out_text],
            "no artifact is named nosuch",
        ),
        (
            vec!["artifact", "pull", "x@9", "-o", &out_text],
            "x@9 does not exist",
        ),
        (
            vec!["artifact", "pull", "x@nope", "-o", &out_text],
            "x@nope does not exist",
        ),
        (
            vec!["artifact", "pull", "bad/name", "-o", &out_text],
            "artifact name 'bad/name'",
        ),
        (
            vec!["artifact", "log", "nosuch"],
            "no artifact is named nosuch",
        ),
        (
            vec!["artifact", "push", "/nonexistent/file", "--name", "x"],
            "cannot read /nonexistent/file",
        ),
        (
            vec![
                "artifact",
                "push",
                &src_text,
                "--name",
                "x",
                "--replicas",
                "3",
            ],
            "3 replicas asked but only 2 worker(s) are alive",
        ),
        (
            vec!["artifact", "push", &src_text, "--name", "x", "--tag", "12"],
            "tag '12' is a number",
        ),
        (
            vec![
                "artifact",
                "pull",
                "x",
                "-o",
                "/proc/kiln-cannot-write-here",
            ],
            "cannot",
        ),
    ];
    for (args, expected) in &cases {
        let result = cluster.run_cli(args).await;
        let stderr = stderr_text(&result);
        assert!(!result.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected '{expected}' in: {stderr}"
        );
    }
    assert!(!out.exists(), "a failed pull leaves no file");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("kiln-partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    // None of the refused pushes made a version.
    let log = cluster.run_cli(&["artifact", "log", "x", "--json"]).await;
    let log: serde_json::Value = serde_json::from_slice(&log.stdout).expect("log --json");
    assert_eq!(log.as_array().map(Vec::len), Some(1), "{log}");
    cluster.assert_healthy();
}

/// Flips a byte of the stored copy of `needle` on worker `name`'s disk, wherever
/// its blob store put it (random bytes do not compress, so they sit there as is).
fn corrupt_on_disk(cluster: &Cluster, name: &str, needle: &[u8]) {
    let blobs = cluster.root().join(format!("worker-{name}")).join("blobs");
    let mut flipped = 0;
    for entry in std::fs::read_dir(&blobs).expect("read blob dir").flatten() {
        let mut data = std::fs::read(entry.path()).expect("read");
        if let Some(at) = data.windows(needle.len()).position(|w| w == needle) {
            data[at + 7] ^= 0x5a;
            std::fs::write(entry.path(), &data).expect("corrupt");
            flipped += 1;
        }
    }
    assert_eq!(
        flipped, 1,
        "the bytes were found once on worker {name}'s disk"
    );
}

/// The chunk of `bytes` that holds byte `offset`.
fn chunk_at(bytes: &[u8], offset: u64) -> kiln_common::chunking::Chunk {
    kiln_common::chunking::Chunker::new(bytes)
        .map(|c| c.expect("chunk"))
        .find(|c| c.offset <= offset && offset < c.offset + c.data.len() as u64)
        .expect("a chunk holds the offset")
}

/// The ids of the chunks of `bytes`, as a push cuts them.
fn chunk_ids(bytes: &[u8]) -> Vec<Vec<u8>> {
    kiln_common::chunking::Chunker::new(bytes)
        .map(|c| c.expect("chunk").id.0.to_vec())
        .collect()
}

/// How many of `ids` worker `name` holds.
async fn held(cluster: &Cluster, name: &str, ids: &[Vec<u8>]) -> usize {
    let present = cluster
        .blobs_client(name)
        .has_chunks(HasChunksRequest { ids: ids.to_vec() })
        .await
        .expect("has_chunks")
        .into_inner()
        .present;
    present.iter().filter(|p| **p).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_chunks_are_copied_back_to_two_replicas() {
    let mut cluster = cluster_with(&["a", "b", "c"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("dataset.bin");
    let bytes = random_bytes(8 * 1024 * 1024, 11);
    std::fs::write(&src, &bytes).expect("write");
    let report = push(&cluster, &src, "dataset", &[]).await;
    assert_eq!(report["replicas"], 2);
    let ids = chunk_ids(&bytes);

    let mut holders = Vec::new();
    for name in ["a", "b", "c"] {
        let n = held(&cluster, name, &ids).await;
        if n > 0 {
            holders.push(name);
        }
    }
    let victim = holders[0];
    let survivors: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != victim)
        .collect();
    cluster.kill_worker(victim);
    let killed_at = std::time::Instant::now();
    // Down after 10 s of silence, then a repair round every 2 s.
    kiln_tests::wait_for(
        Duration::from_secs(60),
        "two live replicas of every chunk",
        || {
            let (cluster, ids, survivors) = (&cluster, &ids, &survivors);
            async move {
                let mut total = 0;
                for name in survivors {
                    total += held(cluster, name, ids).await;
                }
                if total == 2 * ids.len() {
                    Ok(())
                } else {
                    Err(format!("{total} of {} replicas", 2 * ids.len()))
                }
            }
        },
    )
    .await;
    let took = killed_at.elapsed();
    println!(
        "{} chunks back to 2 replicas {took:?} after kill -9 of worker {victim}",
        ids.len()
    );
    assert!(
        took < Duration::from_secs(30),
        "re-replication took {took:?}; the bound is 30 s (10 s to Down, then rounds of 2 s)"
    );
    // And the data reads back with the victim gone.
    let out = dir.path().join("dataset.out");
    pull(&cluster, "dataset", &out).await;
    assert_eq!(std::fs::read(&out).expect("read"), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scrubber_replaces_a_corrupt_replica() {
    let mut cluster =
        cluster_with_args(&[("a", &["--scrub-interval-ms", "1000"]), ("b", &[])]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("weights.bin");
    let bytes = random_bytes(2 * 1024 * 1024, 13);
    std::fs::write(&src, &bytes).expect("write");
    push(&cluster, &src, "weights", &[]).await;
    corrupt_on_disk(&cluster, "a", &bytes[300_000..300_064]);
    let chunk = chunk_at(&bytes, 300_000);

    // The scrubber finds it, the coordinators forget that replica, and the repair
    // loop copies a good one back to worker a (the only worker without one).
    let corrupted_at = std::time::Instant::now();
    kiln_tests::wait_for(
        Duration::from_secs(30),
        "worker a to hold a good copy again",
        || {
            let mut client = cluster.blobs_client("a");
            let id = chunk.id.0.to_vec();
            let want = chunk.data.clone();
            async move {
                match client.get_chunk(GetChunkRequest { id }).await {
                    Ok(resp) if resp.get_ref().data == want => Ok(()),
                    Ok(_) => Err("different bytes".to_string()),
                    Err(e) => Err(format!("{:?}: {}", e.code(), e.message())),
                }
            }
        },
    )
    .await;
    println!("repaired {:?} after the corruption", corrupted_at.elapsed());
    let out = dir.path().join("weights.out");
    pull(&cluster, "weights", &out).await;
    assert_eq!(std::fs::read(&out).expect("read"), bytes);
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_push_resumes_and_its_leftovers_are_collected() {
    let mut cluster = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kept = dir.path().join("kept.bin");
    let kept_bytes = random_bytes(3 * 1024 * 1024, 21);
    std::fs::write(&kept, &kept_bytes).expect("write");
    let kept_text = kept.display().to_string();

    // A push whose commit is refused (its parent does not exist) has stored and
    // recorded its chunks, but made no version.
    let args = [
        "artifact", "push", &kept_text, "--name", "kept", "--parent", "nosuch@1",
    ];
    let failed = cluster.run_cli(&args).await;
    assert!(!failed.status.success());
    assert!(stderr_text(&failed).contains("parent nosuch@1 does not exist"));
    // Run again, it sends nothing: every chunk is stored already.
    let resumed = push(&cluster, &kept, "kept", &[]).await;
    assert_eq!(resumed["version"], 1);
    assert_eq!(resumed["new_chunks"], 0, "{resumed}");

    // Leftovers of another refused push: chunks no version lists.
    let orphan = dir.path().join("orphan.bin");
    let orphan_bytes = random_bytes(2 * 1024 * 1024, 22);
    std::fs::write(&orphan, &orphan_bytes).expect("write");
    let orphan_text = orphan.display().to_string();
    let args = [
        "artifact",
        "push",
        &orphan_text,
        "--name",
        "orphan",
        "--parent",
        "nosuch@1",
    ];
    assert!(!cluster.run_cli(&args).await.status.success());
    let orphan_ids = chunk_ids(&orphan_bytes);
    assert_eq!(held(&cluster, "a", &orphan_ids).await, orphan_ids.len());

    // Young chunks are spared (they may belong to a push in flight).
    let gc = |extra: &'static [&'static str]| {
        let cluster = &cluster;
        async move {
            let mut args = vec!["artifact", "gc", "--json"];
            args.extend_from_slice(extra);
            let out = cluster.run_cli(&args).await;
            assert!(out.status.success(), "gc: {}", stderr_text(&out));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("gc --json")
        }
    };
    assert_eq!(gc(&[]).await["chunks"], 0, "the default grace is an hour");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dry = gc(&["--grace", "1s", "--dry-run"]).await;
    assert_eq!(dry["chunks"], orphan_ids.len() as u64, "{dry}");
    assert_eq!(dry["bytes"], orphan_bytes.len() as u64);
    assert_eq!(held(&cluster, "a", &orphan_ids).await, orphan_ids.len());
    let done = gc(&["--grace", "1s"]).await;
    assert_eq!(done["chunks"], orphan_ids.len() as u64, "{done}");
    assert_eq!(done["pending"], 0);
    for name in ["a", "b"] {
        assert_eq!(held(&cluster, name, &orphan_ids).await, 0, "worker {name}");
    }
    // What versions list is untouched.
    let kept_ids = chunk_ids(&kept_bytes);
    assert_eq!(held(&cluster, "a", &kept_ids).await, kept_ids.len());
    let out = dir.path().join("kept.out");
    pull(&cluster, "kept", &out).await;
    assert_eq!(std::fs::read(&out).expect("read"), kept_bytes);
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gigabyte_round_trips_in_bounded_memory() {
    const LIMIT: u64 = 256 << 20;
    let mut cluster = cluster().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("big.bin");
    // 1 GiB in 64 MiB blocks of random bytes, written as it is made.
    {
        use std::io::Write as _;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
        for block in 0..16 {
            file.write_all(&random_bytes(64 << 20, 100 + block))
                .expect("write");
        }
        file.flush().expect("flush");
    }
    let src_text = src.display().to_string();
    let (out, cli_peak) = cluster
        .run_cli_measured(
            &["artifact", "push", &src_text, "--name", "big", "--json"],
            Duration::from_secs(300),
        )
        .await;
    assert!(out.status.success(), "push: {}", stderr_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    println!(
        "push 1 GiB: {:.1} s, CLI peak {} MiB",
        report["seconds"].as_f64().unwrap_or(0.0),
        cli_peak >> 20
    );
    assert!(
        cli_peak < LIMIT,
        "the CLI peaked at {} MiB pushing 1 GiB",
        cli_peak >> 20
    );

    let dst = dir.path().join("big.out");
    let dst_text = dst.display().to_string();
    let (out, cli_peak) = cluster
        .run_cli_measured(
            &["artifact", "pull", "big", "-o", &dst_text],
            Duration::from_secs(300),
        )
        .await;
    assert!(out.status.success(), "pull: {}", stderr_text(&out));
    println!("pull 1 GiB: CLI peak {} MiB", cli_peak >> 20);
    assert!(
        cli_peak < LIMIT,
        "the CLI peaked at {} MiB pulling 1 GiB",
        cli_peak >> 20
    );
    for name in ["a", "b"] {
        let peak = cluster.worker_peak_rss(name);
        println!("worker {name} peak {} MiB", peak >> 20);
        assert!(peak < LIMIT, "worker {name} peaked at {} MiB", peak >> 20);
    }
    // Byte-identical, compared block by block.
    {
        use std::io::Read as _;
        let mut a = std::io::BufReader::new(std::fs::File::open(&src).expect("open"));
        let mut b = std::io::BufReader::new(std::fs::File::open(&dst).expect("open"));
        let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let n = a.read(&mut x).expect("read");
            b.read_exact(&mut y[..n]).expect("same length");
            assert_eq!(x[..n], y[..n], "the pulled bytes differ");
            if n == 0 {
                break;
            }
        }
        assert_eq!(
            b.read(&mut y).expect("read"),
            0,
            "the pulled file is longer"
        );
    }
    cluster.assert_healthy();
}
