//! The dashboard through a real cluster (3 coordinators, 2 workers, TLS and
//! tokens): two small training jobs, a deployment of the first one's model,
//! traffic until the drift monitor has judged a window, then every page loaded
//! in headless Chromium (Debian's `chromium`) after a login through
//! `/ui/login?token=...&next=PAGE`, so the cookie does the rest; and the token
//! checks of the pages with a plain HTTP client.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_tests::{http_call, stderr_text, v1::Role, Cluster, HttpAnswer};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Length of a drift window (short, so that one is judged within seconds).
const WINDOW_MS: u64 = 1000;
/// Longest one Chromium run may take before it is killed.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);
/// Features of the training data.
const FEATURES: usize = 4;

/// The Chromium binary: `$KILN_CHROMIUM`, else `chromium` on the PATH. Fails the
/// test when there is none: a dashboard test that skips proves nothing.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is needed for the dashboard test and there is no `chromium` \
                 on the PATH: install Debian's package (apt-get install -y chromium; \
                 scripts/test.sh does) or point KILN_CHROMIUM at the binary"
            )
        })
}

/// Percent-encodes a query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Loads `page` in a fresh headless Chromium profile through the login link,
/// and returns the DOM it rendered. Chromium runs under `timeout`, which kills
/// its whole process group if it hangs.
/// Headless Chromium and the key of the coordinator it reads from: Chromium has
/// no cluster CA to verify with, so the test pins that coordinator's public key
/// (`--ignore-certificate-errors-spki-list`, the SHA-256 of its SPKI); any other
/// certificate still fails.
struct Browser {
    bin: PathBuf,
    pin: String,
}

impl Browser {
    fn new(cluster: &Cluster, coordinator: u64) -> Browser {
        use base64::Engine as _;
        let key_file = cluster
            .certs_dir()
            .join(format!("coordinator-{coordinator}-key.pem"));
        let pem = std::fs::read_to_string(&key_file)
            .unwrap_or_else(|e| panic!("read {}: {e}", key_file.display()));
        let key = rcgen::KeyPair::from_pem(&pem).expect("a PEM key");
        let digest = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
        Browser {
            bin: chromium(),
            pin: base64::engine::general_purpose::STANDARD.encode(digest.as_ref()),
        }
    }
}

async fn dump_dom(browser: &Browser, addr: &str, token: &str, page: &str) -> String {
    let profile = tempfile::tempdir().expect("a profile dir");
    let url = format!(
        "https://{addr}/ui/login?token={}&next={}",
        encode(token),
        encode(page)
    );
    let mut command = tokio::process::Command::new("timeout");
    command
        .arg("--kill-after=5")
        .arg(CHROMIUM_TIMEOUT.as_secs().to_string())
        .arg(&browser.bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!(
            "--ignore-certificate-errors-spki-list={}",
            browser.pin
        ))
        .arg("--dump-dom")
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT + Duration::from_secs(10), command.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not exit for {page}"))
        .unwrap_or_else(|e| panic!("run chromium for {page}: {e}"));
    let dom = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success() && dom.contains("</html>"),
        "chromium failed on {page} after {:?} ({}): {}\n{dom}",
        started.elapsed(),
        output.status,
        stderr_text(&output)
    );
    assert!(
        !dom.contains("action=\"/ui/login\""),
        "{page} showed the login form: the cookie did not work\n{dom}"
    );
    dom
}

/// The value of attribute `name` in the first element that holds `marker`.
fn attribute_after<'a>(dom: &'a str, marker: &str, name: &str) -> Option<&'a str> {
    let start = dom.find(marker)?;
    let element = &dom[start..start + dom[start..].find('>')?];
    let from = element.find(&format!("{name}=\""))? + name.len() + 2;
    element[from..].split('"').next()
}

/// Training rows: FEATURES uniform values, labelled by the sign of a sum.
fn rows(seed: u64, n: usize) -> Vec<[f32; FEATURES]> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| std::array::from_fn(|_| rng.gen_range(-1.0f32..1.0)))
        .collect()
}

fn label(row: &[f32; FEATURES]) -> &'static str {
    if row[0] + row[1] > 0.0 {
        "high"
    } else {
        "low"
    }
}

fn job_spec(name: &str, lr: &str) -> String {
    format!(
        "name = \"{name}\"\nexperiment = \"dashboard\"\n\n[data]\nartifact = \"signs@1\"\nlabel = \"kind\"\n\n\
         [model]\nkind = \"mlp\"\nhidden = [8]\nactivation = \"tanh\"\n\n\
         [optimizer]\nkind = \"adamw\"\nlr = {lr}\n\n\
         [train]\nepochs = 3\nbatch_size = 32\nseed = 5\ncheckpoint_every_steps = 1000\n\n\
         [resources]\nshards = 1\ncpus_per_shard = 1\n"
    )
}

async fn cli_json(cluster: &Cluster, args: &[&str]) -> Value {
    let out = cluster.run_cli(args).await;
    assert!(
        out.status.success(),
        "kiln {}: {}",
        args.join(" "),
        stderr_text(&out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("kiln {} printed no JSON: {e}", args.join(" ")))
}

async fn get(addr: &str, path: &str, cookie: Option<&str>) -> HttpAnswer {
    let cookie = cookie.map(|t| format!("kiln_token={t}"));
    let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", c.as_str())).collect();
    http_call(addr, "GET", path, &headers, b"")
        .await
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

fn assert_login_form(answer: &HttpAnswer, status: u16, what: &str) {
    let text = answer.text();
    assert_eq!(answer.status, status, "{what}: {text}");
    assert!(
        text.contains("<form class=\"login\" method=\"post\" action=\"/ui/login\">")
            && text.contains("name=\"token\""),
        "{what}: no login form: {text}"
    );
    assert!(
        answer
            .header("set-cookie")
            .is_none_or(|c| c.contains("Max-Age=0")),
        "{what}: a refused token got a cookie"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_page_shows_the_cluster_in_headless_chromium() {
    let test_started = Instant::now();
    let mut cluster = Cluster::start(
        3,
        &format!("[drift]\nwindow_ms = {WINDOW_MS}\nmin_rows = 50\n"),
    );
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let workers = ["a", "b"];
    for name in workers {
        cluster.start_worker_with(name, &["--telemetry-interval-ms", "200"]);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut csv = String::from("f0,f1,f2,f3,kind\n");
    for row in rows(1, 300) {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:.4}")).collect();
        csv.push_str(&format!("{},{}\n", cells.join(","), label(&row)));
    }
    let data = dir.path().join("signs.csv");
    std::fs::write(&data, csv).expect("write the dataset");
    let data_text = data.display().to_string();
    kiln_tests::wait_for(
        Duration::from_secs(30),
        "workers that take the dataset",
        || {
            let (cluster, data) = (&cluster, data_text.clone());
            async move {
                let push = cluster
                    .run_cli(&["artifact", "push", &data, "--name", "signs", "--json"])
                    .await;
                if push.status.success() {
                    Ok(())
                } else {
                    Err(stderr_text(&push))
                }
            }
        },
    )
    .await;

    // Two small runs that differ in their learning rate.
    let mut job_ids = Vec::new();
    for (name, lr) in [("dash-a", "0.01"), ("dash-b", "0.05")] {
        let spec = dir.path().join(format!("{name}.toml"));
        std::fs::write(&spec, job_spec(name, lr)).expect("write the job spec");
        let submitted = cli_json(
            &cluster,
            &["train", "submit", &spec.display().to_string(), "--json"],
        )
        .await;
        job_ids.push(submitted["job_id"].as_u64().expect("a job id"));
    }
    let mut jobs = Vec::new();
    for id in &job_ids {
        let job = kiln_tests::wait_for(Duration::from_secs(180), "the job to succeed", || {
            let cluster = &cluster;
            async move {
                let job = cli_json(cluster, &["jobs", "show", &id.to_string(), "--json"]).await;
                match job["state"].as_str() {
                    Some("Succeeded") => Ok(job),
                    Some("Failed" | "Cancelled") => panic!("job {id} ended: {job}"),
                    _ => Err(format!("{} {}", job["state"], job["reason"])),
                }
            }
        })
        .await;
        jobs.push(job);
    }
    let run_ids: Vec<String> = jobs
        .iter()
        .map(|j| j["run_id"].as_str().expect("a run id").to_string())
        .collect();

    // The first job's model, deployed and served until a drift window is judged.
    cli_json(
        &cluster,
        &[
            "deploy",
            "dash",
            "--model",
            "dash-a@1",
            "--replicas",
            "1",
            "--public",
            "--wait",
            "--json",
        ],
    )
    .await;
    let addrs: Vec<String> = workers
        .iter()
        .map(|w| cluster.worker_flag(w, "--http"))
        .collect();
    let infer = "/v2/models/dash/infer";
    kiln_tests::wait_for(Duration::from_secs(15), "the route on every worker", || {
        let addrs = &addrs;
        async move {
            for addr in addrs {
                let ready = http_call(addr, "GET", "/v2/models/dash/ready", &[], b"")
                    .await
                    .map_err(|e| e.to_string())?;
                if ready.status != 200 {
                    return Err(format!("{addr}: {}", ready.status));
                }
            }
            Ok(())
        }
    })
    .await;
    let traffic_started = Instant::now();
    let mut seed = 100;
    loop {
        for turn in 0..10 {
            let x: Vec<f32> = rows(seed, 16).into_iter().flatten().collect();
            seed += 1;
            let body = serde_json::to_vec(&json!({
                "inputs": [{"name": "input", "shape": [16, FEATURES], "datatype": "FP32", "data": x}]
            }))
            .expect("json");
            let addr = &addrs[turn % addrs.len()];
            let answer = http_call(addr, "POST", infer, &[], &body)
                .await
                .unwrap_or_else(|e| panic!("POST {addr}{infer}: {e}"));
            assert_eq!(answer.status, 200, "{}", answer.text());
        }
        let drift = cli_json(&cluster, &["drift", "status", "dash-a", "--json"]).await;
        if drift["models"][0]["windows"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
        {
            break;
        }
        assert!(
            traffic_started.elapsed() < Duration::from_secs(60),
            "no drift window judged after a minute of traffic: {drift}"
        );
    }

    // Tokens: a viewer's, an inference one's, and a forged one of a real name.
    let viewer = cluster.create_token("dash-viewer", Role::Viewer, 0).await;
    let inference = cluster.create_token("dash-infer", Role::Inference, 0).await;
    let secret = viewer.rsplit('.').next().expect("a secret").to_string();
    let forged = format!("kt.dash-viewer.{}", "0".repeat(secret.len()));
    let status = cli_json(&cluster, &["status", "--json"]).await;
    let leader = status["leader_id"].as_u64().expect("a leader");
    let follower = cluster
        .coordinator_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    // The follower draws the pages from its own replica.
    let http = cluster.http_addr(follower);
    let browser = Browser::new(&cluster, follower);

    // Without the cookie: the login form, 401.
    for page in ["/ui", "/ui/jobs", "/ui/drift/dash-a/1"] {
        assert_login_form(&get(&http, page, None).await, 401, page);
    }
    // A forged token and an inference token are refused, by link and by cookie.
    for (token, status, what) in [(&forged, 401, "forged"), (&inference, 403, "inference")] {
        let path = format!("/ui/login?token={}&next=/ui", encode(token));
        let answer = get(&http, &path, None).await;
        assert_login_form(&answer, status, what);
        assert!(!answer.text().contains(token.as_str()), "{what}: echoed");
        assert_login_form(&get(&http, "/ui", Some(token.as_str())).await, status, what);
    }
    // A viewer posts the form and gets the cookie and the page it asked for; a
    // login never sends the browser off the dashboard.
    let form = format!("token={}&next={}", encode(&viewer), encode("/ui/jobs"));
    let answer = http_call(
        &http,
        "POST",
        "/ui/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    )
    .await
    .expect("POST /ui/login");
    assert_eq!(answer.status, 303, "{}", answer.text());
    assert_eq!(answer.header("location"), Some("/ui/jobs"));
    let cookie = answer.header("set-cookie").expect("a cookie").to_string();
    for part in [
        "kiln_token=",
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/ui",
        "Max-Age=",
    ] {
        assert!(cookie.contains(part), "{part} missing from {cookie}");
    }
    let away = format!(
        "/ui/login?token={}&next={}",
        encode(&viewer),
        encode("https://elsewhere.example/ui")
    );
    assert_eq!(
        get(&http, &away, None).await.header("location"),
        Some("/ui")
    );
    // Unknown records are 404 pages.
    for page in [
        "/ui/jobs/999999",
        "/ui/jobs/not-a-number",
        "/ui/deployments/none-such",
        "/ui/drift/none-such/1",
        "/ui/drift/dash-a/99",
        "/ui/runs/compare?ids=00000000000000000000000000000000",
    ] {
        let answer = get(&http, page, Some(viewer.as_str())).await;
        assert_eq!(answer.status, 404, "{page}: {}", answer.text());
        assert!(answer.text().contains("<h1>Not found</h1>"), "{page}");
    }

    // Every page in Chromium.
    let chromium_started = Instant::now();
    let dom = dump_dom(&browser, &http, &viewer, "/ui").await;
    assert!(
        dom.contains(&format!("id=\"leader\">coordinator {leader}</b>")),
        "the overview does not name leader {leader}: {dom}"
    );
    for name in workers {
        let id = cluster.worker_id(name).expect("a worker id");
        assert!(dom.contains(&id), "worker {id} missing: {dom}");
    }
    assert!(dom.contains("href=\"/ui/deployments/dash\""), "{dom}");

    let dom = dump_dom(&browser, &http, &viewer, "/ui/jobs").await;
    assert!(dom.contains("dash-a") && dom.contains("dash-b"), "{dom}");
    let page = format!("/ui/jobs/{}", job_ids[0]);
    let dom = dump_dom(&browser, &http, &viewer, &page).await;
    assert!(dom.contains("Job ") && dom.contains("dash-a"), "{dom}");
    let points = attribute_after(&dom, "data-series=\"train_loss\"", "points")
        .unwrap_or_else(|| panic!("no loss line on {page}: {dom}"));
    assert!(
        points.split_whitespace().count() >= 2,
        "the loss line has fewer than 2 points: {points:?}"
    );

    let dom = dump_dom(&browser, &http, &viewer, "/ui/runs").await;
    for run in &run_ids {
        assert!(
            dom.contains(&format!("value=\"{run}\"")),
            "run {run}: {dom}"
        );
    }
    let page = format!("/ui/runs/compare?ids={}", run_ids.join(","));
    let dom = dump_dom(&browser, &http, &viewer, &page).await;
    for needle in [
        "dash-a",
        "dash-b",
        "optimizer.lr",
        ">0.01<",
        ">0.05<",
        "train.batch_size",
    ] {
        assert!(dom.contains(needle), "{needle} missing from {page}: {dom}");
    }
    assert!(
        dom.matches("<polyline").count() >= 2,
        "one curve per run: {dom}"
    );

    let dom = dump_dom(&browser, &http, &viewer, "/ui/deployments").await;
    assert!(dom.contains("href=\"/ui/deployments/dash\""), "{dom}");
    let dom = dump_dom(&browser, &http, &viewer, "/ui/deployments/dash").await;
    assert!(dom.contains("dash-a@1"), "{dom}");
    let windows: u64 = attribute_after(&dom, "id=\"traffic\"", "data-windows")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no traffic section: {dom}"));
    // The leader records the serving windows with the drift windows waited for
    // above: the charts are drawn from them.
    assert!(windows > 0, "no serving window recorded: {dom}");
    assert!(
        dom.contains("aria-label=\"requests per second\"") && dom.contains("<polyline"),
        "{windows} serving windows but no request rate chart: {dom}"
    );

    let dom = dump_dom(&browser, &http, &viewer, "/ui/drift").await;
    assert!(dom.contains("href=\"/ui/drift/dash-a/1\""), "{dom}");
    let dom = dump_dom(&browser, &http, &viewer, "/ui/drift/dash-a/1").await;
    for feature in ["f0", "f1", "f2", "f3"] {
        let start = dom
            .find(&format!("data-column=\"{feature}\""))
            .unwrap_or_else(|| panic!("no figure of {feature}: {dom}"));
        let figure = &dom[start..start + dom[start..].find("</figure>").expect("a figure end")];
        assert!(figure.contains(feature), "{figure}");
        for side in ["reference", "live"] {
            let at = figure
                .find(&format!("data-series=\"{side}\""))
                .unwrap_or_else(|| panic!("no {side} histogram of {feature}: {figure}"));
            assert!(
                figure[at..].contains("<rect"),
                "the {side} histogram of {feature} has no bars"
            );
        }
    }
    let chromium_took = chromium_started.elapsed();

    // No token reached a coordinator's log.
    for id in cluster.coordinator_ids() {
        let log = cluster.root().join(format!("coordinator-{id}.log"));
        let text = std::fs::read_to_string(&log).expect("read the coordinator log");
        for (what, secret) in [
            ("viewer", &viewer),
            ("inference", &inference),
            ("forged", &forged),
        ] {
            let secret = secret.rsplit('.').next().expect("a secret");
            assert!(
                !text.contains(secret),
                "the {what} token is in {}",
                log.display()
            );
        }
    }
    cluster.assert_healthy();
    eprintln!(
        "dashboard test: {:?} in all, {:?} for 9 pages in Chromium",
        test_started.elapsed(),
        chromium_took
    );
}
