//! Every call needs the right caller: a cluster node (by certificate) or a token
//! whose role allows it. The tables below name every RPC of the Coordinator and
//! the workers' Blobs services, and every HTTP endpoint; a new RPC that is not in
//! them fails `every_rpc_is_in_the_table`.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_common::tls::{endpoint, TlsMaterial};
use kiln_proto::v1::blobs_client::BlobsClient;
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::*;
use kiln_tests::{run_kiln_sync, Cluster};
use tonic::transport::Channel;
use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Need {
    Node,
    Read,
    Write,
    Admin,
}

const TABLE: &[(&str, Need)] = &[
    ("Raft", Need::Node),
    ("InstallSnapshot", Need::Node),
    ("Propose", Need::Node),
    ("Put", Need::Write),
    ("Get", Need::Read),
    ("Scan", Need::Read),
    ("NodeStatus", Need::Read),
    ("ClusterStatus", Need::Read),
    ("AddMember", Need::Node),
    ("RemoveMember", Need::Admin),
    ("TransferLeader", Need::Admin),
    ("CreateToken", Need::Admin),
    ("ListTokens", Need::Admin),
    ("RevokeToken", Need::Admin),
    ("ListAudit", Need::Admin),
    ("RegisterWorker", Need::Node),
    ("Heartbeat", Need::Node),
    ("PlanPush", Need::Write),
    ("CommitArtifact", Need::Write),
    ("GetArtifact", Need::Read),
    ("ListArtifacts", Need::Read),
    ("ListVersions", Need::Read),
    ("TagArtifact", Need::Write),
    ("RecordChunks", Need::Write),
    ("ReportCorruptChunks", Need::Node),
    ("CollectGarbage", Need::Admin),
    ("ListRuns", Need::Read),
    ("GetRun", Need::Read),
    ("SubmitJob", Need::Write),
    ("ListJobs", Need::Read),
    ("GetJob", Need::Read),
    ("CancelJob", Need::Write),
    ("JobLogs", Need::Read),
    ("ReportShard", Need::Node),
    ("RegisterModel", Need::Write),
    ("ListModels", Need::Read),
    ("GetModel", Need::Read),
    ("SetModelAlias", Need::Write),
    ("Deploy", Need::Write),
    ("ListDeployments", Need::Read),
    ("GetDeployment", Need::Read),
    ("DeleteDeployment", Need::Write),
    ("ReportReplica", Need::Node),
    ("ReportTelemetry", Need::Node),
    ("DriftStatus", Need::Read),
];

/// The worker's RPCs (service `Blobs`), checked against the worker's token book.
const WORKER_TABLE: &[(&str, Need)] = &[
    ("PutChunks", Need::Write),
    ("GetChunk", Need::Read),
    ("HasChunks", Need::Read),
    ("ReplicateChunks", Need::Node),
    ("DeleteChunks", Need::Node),
];

#[test]
fn every_rpc_is_in_the_table() {
    let proto = include_str!("../../proto/proto/kiln.proto");
    let rpcs: BTreeSet<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .collect();
    let table: BTreeSet<&str> = TABLE
        .iter()
        .chain(WORKER_TABLE)
        .map(|(name, _)| *name)
        .collect();
    assert_eq!(rpcs, table, "every RPC needs a row saying who may call it");
}

/// Wraps `message` in a request with `token` as bearer when given.
fn req<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    request
}

/// Calls `method` harmlessly, with `token` as bearer when given.
async fn call(
    client: &mut CoordinatorClient<Channel>,
    method: &str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let unique = format!("t{}", rand::random::<u32>());
    match method {
        "Raft" => client
            .raft(req(
                RaftBatch {
                    from_id: 99,
                    from_addr: "127.0.0.1:1".into(),
                    messages: Vec::new(),
                    cluster_id: 0,
                },
                token,
            ))
            .await
            .map(drop),
        "InstallSnapshot" => client
            .install_snapshot(req(tokio_stream::iter(Vec::<SnapshotChunk>::new()), token))
            .await
            .map(drop),
        "Propose" => client
            .propose(req(ProposeRequest::default(), token))
            .await
            .map(drop),
        "Put" => client
            .put(req(
                PutRequest {
                    key: "auth".into(),
                    value: b"1".to_vec(),
                },
                token,
            ))
            .await
            .map(drop),
        "Get" => client
            .get(req(
                GetRequest {
                    key: "auth".into(),
                    stale: false,
                },
                token,
            ))
            .await
            .map(drop),
        "Scan" => client
            .scan(req(ScanRequest::default(), token))
            .await
            .map(drop),
        "NodeStatus" => client
            .node_status(req(NodeStatusRequest {}, token))
            .await
            .map(drop),
        "ClusterStatus" => client
            .cluster_status(req(ClusterStatusRequest {}, token))
            .await
            .map(drop),
        "AddMember" => client
            .add_member(req(AddMemberRequest::default(), token))
            .await
            .map(drop),
        "RemoveMember" => client
            .remove_member(req(RemoveMemberRequest { id: 99 }, token))
            .await
            .map(drop),
        "TransferLeader" => client
            .transfer_leader(req(TransferLeaderRequest { to: 99 }, token))
            .await
            .map(drop),
        "CreateToken" => client
            .create_token(req(
                CreateTokenRequest {
                    name: unique,
                    role: Role::Viewer as i32,
                    expires_in_ms: 0,
                },
                token,
            ))
            .await
            .map(drop),
        "ListTokens" => client
            .list_tokens(req(ListTokensRequest {}, token))
            .await
            .map(drop),
        "RevokeToken" => client
            .revoke_token(req(RevokeTokenRequest { name: unique }, token))
            .await
            .map(drop),
        "ListAudit" => client
            .list_audit(req(ListAuditRequest::default(), token))
            .await
            .map(drop),
        "RegisterWorker" => client
            .register_worker(req(RegisterWorkerRequest::default(), token))
            .await
            .map(drop),
        "Heartbeat" => client
            .heartbeat(req(
                HeartbeatRequest {
                    worker_id: "nobody".into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "PlanPush" => client
            .plan_push(req(PlanPushRequest::default(), token))
            .await
            .map(drop),
        "CommitArtifact" => client
            .commit_artifact(req(CommitArtifactRequest::default(), token))
            .await
            .map(drop),
        "GetArtifact" => client
            .get_artifact(req(
                GetArtifactRequest {
                    name: unique,
                    reference: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        "ListArtifacts" => client
            .list_artifacts(req(ListArtifactsRequest {}, token))
            .await
            .map(drop),
        "ListVersions" => client
            .list_versions(req(ListVersionsRequest { name: unique }, token))
            .await
            .map(drop),
        "TagArtifact" => client
            .tag_artifact(req(
                TagArtifactRequest {
                    name: unique,
                    tag: "t".into(),
                    reference: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        "RecordChunks" => client
            .record_chunks(req(RecordChunksRequest::default(), token))
            .await
            .map(drop),
        "ReportCorruptChunks" => client
            .report_corrupt_chunks(req(ReportCorruptChunksRequest::default(), token))
            .await
            .map(drop),
        "CollectGarbage" => client
            .collect_garbage(req(
                CollectGarbageRequest {
                    grace_ms: 0,
                    dry_run: true,
                },
                token,
            ))
            .await
            .map(drop),
        "ListRuns" => client
            .list_runs(req(ListRunsRequest::default(), token))
            .await
            .map(drop),
        "GetRun" => client
            .get_run(req(
                GetRunRequest {
                    run_id: unique,
                    with_history: false,
                    with_files: true,
                },
                token,
            ))
            .await
            .map(drop),
        // An empty spec: allowed callers get INVALID_ARGUMENT naming what is missing.
        "SubmitJob" => client
            .submit_job(req(SubmitJobRequest::default(), token))
            .await
            .map(drop),
        "ListJobs" => client
            .list_jobs(req(ListJobsRequest::default(), token))
            .await
            .map(drop),
        "GetJob" => client
            .get_job(req(GetJobRequest { job_id: 999_999 }, token))
            .await
            .map(drop),
        "CancelJob" => client
            .cancel_job(req(CancelJobRequest { job_id: 999_999 }, token))
            .await
            .map(drop),
        "JobLogs" => client
            .job_logs(req(
                JobLogsRequest {
                    job_id: 999_999,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "ReportShard" => client
            .report_shard(req(ReportShardRequest::default(), token))
            .await
            .map(drop),
        // No artifact: allowed callers get INVALID_ARGUMENT.
        "RegisterModel" => client
            .register_model(req(
                RegisterModelRequest {
                    model: Some(ModelVersion {
                        name: unique,
                        ..Default::default()
                    }),
                },
                token,
            ))
            .await
            .map(drop),
        "ListModels" => client
            .list_models(req(ListModelsRequest::default(), token))
            .await
            .map(drop),
        "GetModel" => client
            .get_model(req(
                GetModelRequest {
                    name: unique,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        // No such model or deployment: allowed callers get NOT_FOUND.
        "SetModelAlias" => client
            .set_model_alias(req(
                SetModelAliasRequest {
                    alias: Some(SetModelAlias {
                        name: unique,
                        alias: "prod".into(),
                        version: 1,
                    }),
                },
                token,
            ))
            .await
            .map(drop),
        "Deploy" => client
            .deploy(req(
                DeployRequest {
                    name: unique.clone(),
                    model: format!("{unique}@1"),
                    replicas: 1,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "ListDeployments" => client
            .list_deployments(req(ListDeploymentsRequest::default(), token))
            .await
            .map(drop),
        "GetDeployment" => client
            .get_deployment(req(GetDeploymentRequest { name: unique }, token))
            .await
            .map(drop),
        "DeleteDeployment" => client
            .delete_deployment(req(DeleteDeploymentRequest { name: unique }, token))
            .await
            .map(drop),
        "ReportReplica" => client
            .report_replica(req(ReportReplicaRequest::default(), token))
            .await
            .map(drop),
        "ReportTelemetry" => client
            .report_telemetry(req(TelemetryReport::default(), token))
            .await
            .map(drop),
        "DriftStatus" => client
            .drift_status(req(DriftStatusRequest::default(), token))
            .await
            .map(drop),
        other => panic!("no call for {other}"),
    }
}

/// Calls the worker's `method` harmlessly, with `token` as bearer when given.
async fn call_worker(
    client: &mut BlobsClient<Channel>,
    method: &str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    match method {
        "PutChunks" => client
            .put_chunks(req(
                tokio_stream::iter(Vec::<PutChunksRequest>::new()),
                token,
            ))
            .await
            .map(drop),
        "GetChunk" => client
            .get_chunk(req(GetChunkRequest { id: vec![0; 32] }, token))
            .await
            .map(drop),
        "HasChunks" => client
            .has_chunks(req(
                HasChunksRequest {
                    ids: vec![vec![0; 32]],
                },
                token,
            ))
            .await
            .map(drop),
        "ReplicateChunks" => client
            .replicate_chunks(req(ReplicateChunksRequest::default(), token))
            .await
            .map(drop),
        "DeleteChunks" => client
            .delete_chunks(req(DeleteChunksRequest::default(), token))
            .await
            .map(drop),
        other => panic!("no call for {other}"),
    }
}

fn is_auth_error(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

async fn create(cluster: &Cluster, name: &str, role: Role, expires_in_ms: u64) -> String {
    cluster.create_token(name, role, expires_in_ms).await
}

/// A person's connection to coordinator `id`: it trusts the CA and presents no
/// certificate, so only its bearer token speaks for it.
fn person_client(cluster: &Cluster, id: u64) -> CoordinatorClient<Channel> {
    CoordinatorClient::new(person_channel(cluster, &cluster.addr(id)))
}

/// A channel that trusts the cluster CA and presents no certificate.
fn person_channel(cluster: &Cluster, addr: &str) -> Channel {
    let ca = TlsMaterial::client(&cluster.certs_dir().join("ca.pem")).expect("ca");
    endpoint(addr, Some(&ca), Duration::from_secs(2))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Checks that `result` of `method` called by `who` (with `role`) is what the
/// table says: allowed, or refused with the right code.
fn check_outcome(
    method: &str,
    need: Need,
    who: &str,
    role: Option<Role>,
    result: Result<(), tonic::Status>,
) {
    let allowed = match (need, role) {
        (Need::Node, _) | (_, None) => false,
        (Need::Read, Some(r)) => matches!(r, Role::Viewer | Role::Operator | Role::Admin),
        (Need::Write, Some(r)) => matches!(r, Role::Operator | Role::Admin),
        (Need::Admin, Some(r)) => r == Role::Admin,
    };
    match result {
        Ok(()) => assert!(allowed, "{method} let {who} through"),
        Err(e) if allowed => {
            assert!(!is_auth_error(e.code()), "{method} refused {who}: {e}")
        }
        Err(e) => {
            let want = if role.is_some() && need != Need::Node {
                Code::PermissionDenied
            } else {
                Code::Unauthenticated
            };
            assert_eq!(e.code(), want, "{method} as {who}: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_checks_its_caller() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    cluster.start_worker("a");
    let mut person = person_client(&cluster, leader);
    let mut node = cluster.client(leader);

    let admin = create(&cluster, "t-admin", Role::Admin, 0).await;
    let operator = create(&cluster, "t-operator", Role::Operator, 0).await;
    let viewer = create(&cluster, "t-viewer", Role::Viewer, 0).await;
    let inference = create(&cluster, "t-inference", Role::Inference, 0).await;
    let expired = create(&cluster, "t-expired", Role::Admin, 1).await;
    let revoked = create(&cluster, "t-revoked", Role::Admin, 0).await;
    cluster
        .cluster_client()
        .call(|mut c| async move {
            c.revoke_token(RevokeTokenRequest {
                name: "t-revoked".into(),
            })
            .await
            .map(|r| r.into_inner())
        })
        .await
        .expect("revoke");
    // A wrong secret for a real name.
    let last = if admin.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &admin[..admin.len() - 1]);
    assert_ne!(forged, admin);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let roles: [(&str, Option<&str>, Option<Role>); 8] = [
        ("no token", None, None),
        ("expired", Some(&expired), None),
        ("revoked", Some(&revoked), None),
        ("forged", Some(&forged), None),
        ("inference", Some(&inference), Some(Role::Inference)),
        ("viewer", Some(&viewer), Some(Role::Viewer)),
        ("operator", Some(&operator), Some(Role::Operator)),
        ("admin", Some(&admin), Some(Role::Admin)),
    ];
    for &(method, need) in TABLE {
        // A cluster node may call everything.
        if let Err(e) = call(&mut node, method, None).await {
            assert!(!is_auth_error(e.code()), "{method} refused a node: {e}");
        }
        for (who, token, role) in &roles {
            let result = call(&mut person, method, *token).await;
            check_outcome(method, need, who, *role, result);
        }
    }

    // The worker checks the same tokens.
    let mut worker_node = cluster.blobs_client("a");
    let mut worker_person = BlobsClient::new(person_channel(&cluster, &cluster.worker_addr("a")));
    // A token made after the revocation works on the worker at once: the worker
    // does not hold it, so it asks for a heartbeat before answering, and then
    // holds the latest version of the records (the revocation included).
    let sentinel = create(&cluster, "t-sentinel", Role::Viewer, 0).await;
    if let Err(e) = call_worker(&mut worker_person, "HasChunks", Some(&sentinel)).await {
        panic!("a token made a moment ago was refused by the worker: {e}");
    }
    for &(method, need) in WORKER_TABLE {
        if let Err(e) = call_worker(&mut worker_node, method, None).await {
            assert!(
                !is_auth_error(e.code()),
                "worker {method} refused a node: {e}"
            );
        }
        for (who, token, role) in &roles {
            let result = call_worker(&mut worker_person, method, *token).await;
            check_outcome(method, need, who, *role, result);
        }
    }

    // The audit log has the changes and the refusals, with who and how they ended.
    kiln_tests::wait_for(Duration::from_secs(10), "audit records", || async {
        let out = cluster.run_cli(&["audit", "--json"]).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let records: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        let has = |who: &str, what: &str, outcome: &str| {
            records.iter().any(|r| {
                r["who"] == who
                    && r["what"].as_str().is_some_and(|w| w.contains(what))
                    && r["outcome"]
                        .as_str()
                        .is_some_and(|o| o.starts_with(outcome))
            })
        };
        let wanted = [
            has("token:t-operator", "put kv auth", "ok"),
            has("token:t-viewer", "Put", "denied"),
            has("anonymous", "Put", "denied"),
            has("node", "create token t-viewer", "ok"),
            has("node", "revoke token t-revoked", "ok"),
            has("token:t-admin", "RevokeToken", "denied")
                || has("token:t-admin", "revoke token", "rejected"),
        ];
        if wanted.iter().all(|w| *w) {
            Ok(())
        } else {
            Err(format!("{wanted:?} in {} records", records.len()))
        }
    })
    .await;

    // No secret is in any log, in any data file, `kiln token ls` or `kiln audit`.
    let audit = cluster.run_cli(&["audit", "--json"]).await;
    let audit = String::from_utf8_lossy(&audit.stdout).to_string();
    let listing = cluster.run_cli(&["token", "ls", "--json"]).await;
    assert!(listing.status.success(), "token ls failed");
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(
        listing.contains("t-viewer"),
        "token ls lists names: {listing}"
    );
    let secrets: Vec<String> = [&admin, &operator, &viewer, &inference, &expired]
        .iter()
        .map(|t| t.rsplit_once('.').expect("token shape").1.to_string())
        .collect();
    assert!(secrets.iter().all(|s| !listing.contains(s.as_str())));
    assert!(secrets.iter().all(|s| !audit.contains(s.as_str())));
    let mut files = vec![cluster.dir().to_path_buf()];
    let mut scanned = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read dir").flatten() {
                files.push(entry.path());
            }
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        scanned += 1;
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a token secret is stored in {}",
                path.display()
            );
        }
    }
    assert!(scanned > 10, "scanned only {scanned} files");
    cluster.assert_healthy();
}

/// The coordinators' and workers' HTTP ports speak HTTPS only, with certificates
/// of the cluster CA: a plain HTTP request is told so, and a client that trusts
/// another CA fails the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_ports_speak_https_with_the_cluster_certificates() {
    let mut cluster = Cluster::start(1, "");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.start_worker("a");
    let other_ca = cluster.dir().join("other-ca");
    run_kiln_sync(
        cluster.bin(),
        &["certs", "init", "--dir", &other_ca.display().to_string()],
    );
    let stranger = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        TlsMaterial::client(&other_ca.join("ca.pem"))
            .and_then(|tls| tls.https_client_config())
            .expect("client settings for the other CA"),
    ));
    let ports = [
        ("coordinator", cluster.http_addr(1), "/health"),
        (
            "worker",
            cluster.worker_flag("a", "--http"),
            "/v2/health/live",
        ),
    ];
    for (node, addr, probe) in ports {
        kiln_tests::wait_for(Duration::from_secs(15), "the port to answer", || {
            let addr = addr.clone();
            async move {
                // Not listening yet is a reason to wait, not a failure.
                tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                match kiln_tests::http_get(&addr, probe, None).await {
                    (200, _) => Ok(()),
                    (code, body) => Err(format!("{code}: {body}")),
                }
            }
        })
        .await;
        let (code, body) = kiln_tests::http_get_plaintext(&addr, probe).await;
        assert_eq!(code, 400, "{node} answered plain HTTP: {body}");
        assert!(body.contains("this port speaks HTTPS"), "{node}: {body}");

        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1")
            .expect("a server name");
        let Err(error) = stranger.connect(name, tcp).await else {
            panic!("{node}: a handshake with another CA must fail");
        };
        // Both CAs are named alike, so the check fails on the signature.
        assert!(
            error.to_string().contains("invalid peer certificate"),
            "{node}: {error}"
        );
    }
    cluster.assert_healthy();
}

/// An operator who holds a node certificate makes a new cluster's first admin
/// token with the CLI (`--cert`, `--key`); a certificate of another CA cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_makes_the_first_admin_token_with_a_node_certificate() {
    let cluster = Cluster::start(1, "");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    let certs = cluster.certs_dir().to_path_buf();
    let file = |name: &str| certs.join(name).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("harness.pem"), file("harness-key.pem"));
    let addr = cluster.addr(1);
    let global = ["--coordinator", addr.as_str(), "--ca", ca.as_str()];
    let as_node = |cert: &str, key: &str, args: &[&str]| {
        let mut full: Vec<String> = global.iter().map(|a| a.to_string()).collect();
        full.extend(["--cert", cert, "--key", key].map(str::to_string));
        full.extend(args.iter().map(|a| a.to_string()));
        full
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kiln_tests::run_kiln(&args, kiln_tests::CLI_TIMEOUT).await
    };

    let made = run(as_node(
        &cert,
        &key,
        &["token", "create", "--name", "first", "--role", "admin"],
    ))
    .await;
    assert!(made.status.success(), "{}", kiln_tests::stderr_text(&made));
    let stdout = String::from_utf8_lossy(&made.stdout);
    let token = stdout
        .lines()
        .find(|l| l.starts_with("kt.first."))
        .unwrap_or_else(|| panic!("no token printed: {stdout}"))
        .to_string();
    let mut listed: Vec<String> = global.iter().map(|a| a.to_string()).collect();
    listed.extend(["--token", token.as_str(), "token", "ls"].map(str::to_string));
    let listed = run(listed).await;
    assert!(
        listed.status.success(),
        "{}",
        kiln_tests::stderr_text(&listed)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("first"));

    // --cert without --ca is refused before anything is sent.
    let alone = run([
        "--coordinator",
        addr.as_str(),
        "--cert",
        &cert,
        "--key",
        &key,
        "token",
        "ls",
    ]
    .map(str::to_string)
    .to_vec())
    .await;
    assert!(!alone.status.success());
    let complaint = String::from_utf8_lossy(&alone.stderr);
    assert!(complaint.contains("--ca"), "{complaint}");

    // A node certificate of another CA is refused at the handshake.
    let other = cluster.dir().join("other-ca");
    let other_dir = other.display().to_string();
    run_kiln_sync(cluster.bin(), &["certs", "init", "--dir", &other_dir]);
    run_kiln_sync(
        cluster.bin(),
        &[
            "certs",
            "issue",
            "--dir",
            &other_dir,
            "--node",
            "intruder",
            "--san",
            "127.0.0.1",
        ],
    );
    let intruder = run(as_node(
        &other.join("intruder.pem").display().to_string(),
        &other.join("intruder-key.pem").display().to_string(),
        &["token", "create", "--name", "second", "--role", "admin"],
    ))
    .await;
    assert!(
        !intruder.status.success(),
        "a foreign node certificate made a token"
    );
    let listed = run(global
        .iter()
        .map(|a| a.to_string())
        .chain(["--token", token.as_str(), "token", "ls"].map(str::to_string))
        .collect())
    .await;
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("second"));
}

/// `--resolve NAME:PORT=HOST:PORT` dials another address for a node name and
/// still checks the certificate against the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_reaches_a_named_node_through_another_address() {
    let cluster = Cluster::start(1, "");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    let token = cluster.admin_token().await;
    let ca = cluster.certs_dir().join("ca.pem").display().to_string();
    let real = cluster.addr(1);
    let status = |coordinator: String, resolve: Option<String>| {
        let (ca, token) = (ca.clone(), token.clone());
        async move {
            let mut args = vec!["--coordinator".to_string(), coordinator];
            if let Some(resolve) = resolve {
                args.extend(["--resolve".to_string(), resolve]);
            }
            args.extend(["--ca", &ca, "--token", &token, "status", "--json"].map(str::to_string));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kiln_tests::run_kiln(&args, kiln_tests::CLI_TIMEOUT).await
        }
    };
    // `localhost` is in the certificate; port 1 has no server.
    let named = "localhost:1".to_string();
    let unreachable = status(named.clone(), None).await;
    assert!(!unreachable.status.success(), "nothing listens on {named}");
    let through = status(named.clone(), Some(format!("{named}={real}"))).await;
    assert!(
        through.status.success(),
        "{}",
        kiln_tests::stderr_text(&through)
    );
    let doc: serde_json::Value = serde_json::from_slice(&through.stdout).expect("status JSON");
    assert_eq!(doc["leader_id"], 1, "{doc}");
    // A name the certificate does not hold fails the check, whatever is dialled.
    let stranger = "kiln-elsewhere.invalid:1".to_string();
    let refused = status(stranger.clone(), Some(format!("{stranger}={real}"))).await;
    assert!(
        !refused.status.success(),
        "a name outside the certificate was accepted"
    );
    let bad = status(named, Some("localhost:1".into())).await;
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("NAME:PORT=HOST:PORT"),
        "{}",
        kiln_tests::stderr_text(&bad)
    );
}

/// Every HTTP endpoint and what it needs; `None`: open to anyone (probes).
const HTTP_TABLE: &[(&str, Option<Need>)] = &[
    ("/api/v1/status", Some(Need::Read)),
    ("/metrics", Some(Need::Read)),
    ("/health", None),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_endpoints_check_tokens_and_workers_learn_revocations() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    cluster.start_worker("a");
    let viewer = create(&cluster, "h-viewer", Role::Viewer, 0).await;
    let operator = create(&cluster, "h-operator", Role::Operator, 0).await;
    let inference = create(&cluster, "h-inference", Role::Inference, 0).await;
    let forged = format!("{}x", &viewer[..viewer.len() - 1]);

    for id in cluster.coordinator_ids() {
        let addr = cluster.http_addr(id);
        for &(path, need) in HTTP_TABLE {
            let cases: [(&str, Option<&str>, u16); 5] = match need {
                Some(_) => [
                    ("no token", None, 401),
                    ("forged", Some(&forged), 401),
                    ("inference", Some(&inference), 403),
                    ("viewer", Some(&viewer), 200),
                    ("operator", Some(&operator), 200),
                ],
                None => [
                    ("no token", None, 200),
                    ("forged", Some(&forged), 200),
                    ("inference", Some(&inference), 200),
                    ("viewer", Some(&viewer), 200),
                    ("operator", Some(&operator), 200),
                ],
            };
            for (who, token, want) in cases {
                let (status, body) = kiln_tests::http_get(&addr, path, token).await;
                assert_eq!(status, want, "coordinator {id} {path} as {who}: {body}");
                if status == 401 || status == 403 {
                    let error: serde_json::Value =
                        serde_json::from_str(&body).expect("errors are JSON");
                    assert!(error["error"].is_string(), "{body}");
                }
            }
        }
    }
    let (_, status) =
        kiln_tests::http_get(&cluster.http_addr(leader), "/api/v1/status", Some(&viewer)).await;
    assert!(status.contains("\"leader_id\""), "{status}");

    // The worker checks tokens it learned from heartbeats: once it knows the last
    // one made, it knows them all.
    let worker_http = cluster.worker_flag("a", "--http");
    let answers = |token: &str, want: u16| {
        let (addr, token) = (worker_http.clone(), token.to_string());
        async move {
            match kiln_tests::http_get(&addr, "/metrics", Some(&token)).await {
                (code, _) if code == want => Ok(()),
                (code, body) => Err(format!("{code}: {body}")),
            }
        }
    };
    kiln_tests::wait_for(
        Duration::from_secs(15),
        "the worker to know the inference token",
        || answers(&inference, 403),
    )
    .await;
    for (path, token, want) in [
        ("/metrics", Some(&viewer), 200),
        ("/metrics", None, 401),
        ("/metrics", Some(&inference), 403),
        ("/v2/health/live", None, 200),
    ] {
        let (code, body) =
            kiln_tests::http_get(&worker_http, path, token.map(|t| t.as_str())).await;
        assert_eq!(code, want, "worker {path}: {body}");
    }

    // A revocation reaches the worker within one heartbeat (1 s) and the time to
    // apply it.
    let out = cluster.run_cli(&["token", "revoke", "h-viewer"]).await;
    assert!(
        out.status.success(),
        "revoke: {}",
        kiln_tests::stderr_text(&out)
    );
    let revoked_at = std::time::Instant::now();
    kiln_tests::wait_for(
        Duration::from_secs(10),
        "the worker to refuse the revoked token",
        || answers(&viewer, 401),
    )
    .await;
    let took = revoked_at.elapsed();
    println!("revocation reached the worker in {took:?}");
    assert!(
        took < Duration::from_millis(2500),
        "a revocation took {took:?} to reach the worker; one heartbeat is 1 s"
    );
    for id in cluster.coordinator_ids() {
        assert_eq!(
            kiln_tests::http_get(&cluster.http_addr(id), "/metrics", Some(&viewer))
                .await
                .0,
            401,
            "coordinator {id} still takes a revoked token"
        );
    }
    cluster.assert_healthy();
}

/// Every MLflow REST route (method, path, what it needs): tracking, the artifact
/// proxy, logged models and the registry. Grows with every new path.
const MLFLOW_TABLE: &[(&str, &str, Need)] = &[
    ("POST", "/api/2.0/mlflow/experiments/create", Need::Write),
    (
        "GET",
        "/api/2.0/mlflow/experiments/get-by-name?experiment_name=x",
        Need::Read,
    ),
    (
        "GET",
        "/api/2.0/mlflow/experiments/get?experiment_id=0",
        Need::Read,
    ),
    ("POST", "/api/2.0/mlflow/experiments/search", Need::Read),
    ("POST", "/api/2.0/mlflow/experiments/update", Need::Write),
    ("POST", "/api/2.0/mlflow/experiments/delete", Need::Write),
    ("POST", "/api/2.0/mlflow/experiments/restore", Need::Write),
    (
        "POST",
        "/api/2.0/mlflow/experiments/set-experiment-tag",
        Need::Write,
    ),
    (
        "POST",
        "/api/2.0/mlflow/experiments/delete-experiment-tag",
        Need::Write,
    ),
    ("POST", "/api/2.0/mlflow/runs/create", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/update", Need::Write),
    ("GET", "/api/2.0/mlflow/runs/get?run_id=x", Need::Read),
    ("POST", "/api/2.0/mlflow/runs/log-metric", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/log-parameter", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/set-tag", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/delete-tag", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/log-batch", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/log-inputs", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/outputs", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/delete", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/restore", Need::Write),
    ("POST", "/api/2.0/mlflow/runs/search", Need::Read),
    (
        "GET",
        "/api/2.0/mlflow/metrics/get-history?run_id=x&metric_key=y",
        Need::Read,
    ),
    ("POST", "/api/2.0/mlflow/logged-models", Need::Write),
    ("POST", "/api/2.0/mlflow/logged-models/search", Need::Read),
    ("GET", "/api/2.0/mlflow/logged-models/m-0", Need::Read),
    ("PATCH", "/api/2.0/mlflow/logged-models/m-0", Need::Write),
    ("DELETE", "/api/2.0/mlflow/logged-models/m-0", Need::Write),
    (
        "POST",
        "/api/2.0/mlflow/logged-models/m-0/params",
        Need::Write,
    ),
    (
        "PATCH",
        "/api/2.0/mlflow/logged-models/m-0/tags",
        Need::Write,
    ),
    (
        "DELETE",
        "/api/2.0/mlflow/logged-models/m-0/tags/k",
        Need::Write,
    ),
    (
        "GET",
        "/api/2.0/mlflow-artifacts/artifacts?path=0/x/artifacts",
        Need::Read,
    ),
    (
        "GET",
        "/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/a",
        Need::Read,
    ),
    (
        "PUT",
        "/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/a",
        Need::Write,
    ),
    (
        "DELETE",
        "/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/a",
        Need::Write,
    ),
    (
        "POST",
        "/api/2.0/mlflow-artifacts/mpu/create/0/x/artifacts",
        Need::Write,
    ),
    (
        "POST",
        "/api/2.0/mlflow-artifacts/mpu/complete/0/x/artifacts",
        Need::Write,
    ),
    (
        "POST",
        "/api/2.0/mlflow-artifacts/mpu/abort/0/x/artifacts",
        Need::Write,
    ),
    (
        "POST",
        "/api/2.0/mlflow/registered-models/create",
        Need::Write,
    ),
    (
        "GET",
        "/api/2.0/mlflow/registered-models/get?name=x",
        Need::Read,
    ),
    (
        "POST",
        "/api/2.0/mlflow/registered-models/rename",
        Need::Write,
    ),
    (
        "PATCH",
        "/api/2.0/mlflow/registered-models/update",
        Need::Write,
    ),
    (
        "DELETE",
        "/api/2.0/mlflow/registered-models/delete",
        Need::Write,
    ),
    (
        "GET",
        "/api/2.0/mlflow/registered-models/search",
        Need::Read,
    ),
    (
        "POST",
        "/api/2.0/mlflow/registered-models/set-tag",
        Need::Write,
    ),
    (
        "DELETE",
        "/api/2.0/mlflow/registered-models/delete-tag",
        Need::Write,
    ),
    (
        "POST",
        "/api/2.0/mlflow/registered-models/get-latest-versions",
        Need::Read,
    ),
    (
        "POST",
        "/api/2.0/mlflow/registered-models/alias",
        Need::Write,
    ),
    (
        "DELETE",
        "/api/2.0/mlflow/registered-models/alias",
        Need::Write,
    ),
    (
        "GET",
        "/api/2.0/mlflow/registered-models/alias?name=x&alias=a",
        Need::Read,
    ),
    ("POST", "/api/2.0/mlflow/model-versions/create", Need::Write),
    (
        "GET",
        "/api/2.0/mlflow/model-versions/get?name=x&version=1",
        Need::Read,
    ),
    (
        "PATCH",
        "/api/2.0/mlflow/model-versions/update",
        Need::Write,
    ),
    (
        "DELETE",
        "/api/2.0/mlflow/model-versions/delete",
        Need::Write,
    ),
    ("GET", "/api/2.0/mlflow/model-versions/search", Need::Read),
    (
        "GET",
        "/api/2.0/mlflow/model-versions/get-download-uri?name=x&version=1",
        Need::Read,
    ),
    (
        "POST",
        "/api/2.0/mlflow/model-versions/set-tag",
        Need::Write,
    ),
    (
        "DELETE",
        "/api/2.0/mlflow/model-versions/delete-tag",
        Need::Write,
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mlflow_routes_check_roles() {
    let mut cluster = Cluster::start(3, "");
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let viewer = create(&cluster, "m-viewer", Role::Viewer, 0).await;
    let operator = create(&cluster, "m-operator", Role::Operator, 0).await;
    let inference = create(&cluster, "m-inference", Role::Inference, 0).await;
    let addr = cluster.http_addr(cluster.coordinator_ids()[0]);
    for &(method, path, need) in MLFLOW_TABLE {
        let body = (method != "GET").then_some("{}");
        let may_write = need != Need::Read;
        for (who, token, refused) in [
            ("no token", None, Some(401)),
            ("inference", Some(&inference), Some(403)),
            ("viewer", Some(&viewer), may_write.then_some(403)),
            ("operator", Some(&operator), None),
        ] {
            let (status, text) =
                kiln_tests::http_request(&addr, method, path, token.map(String::as_str), body)
                    .await;
            let answer: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path} as {who}: not JSON ({e}): {text}"));
            match refused {
                Some(code) => {
                    assert_eq!(status, code, "{method} {path} as {who}: {text}");
                    let want = if code == 401 {
                        "UNAUTHENTICATED"
                    } else {
                        "PERMISSION_DENIED"
                    };
                    assert_eq!(answer["error_code"], want, "{method} {path} as {who}");
                }
                // Allowed: whatever the (empty) request earns, never a refusal
                // of the caller, and never a route that is not there.
                None => assert!(
                    ![401, 403].contains(&status) && answer["error_code"] != "ENDPOINT_NOT_FOUND",
                    "{method} {path} as {who}: {status} {text}"
                ),
            }
        }
    }
    // A part PUT carries its upload's secret instead of a token.
    let (status, text) = kiln_tests::http_request(
        &addr,
        "PUT",
        "/api/2.0/mlflow-artifacts/mpu/part/0123456789abcdef0123456789abcdef/1?secret=x",
        None,
        Some("bytes"),
    )
    .await;
    assert_eq!(status, 404, "a part of no upload: {text}");
    cluster.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_changing_calls_are_rate_limited_per_token() {
    let mut cluster = Cluster::start(
        3,
        "[limits]\ntoken_writes_per_sec = 5\ntoken_write_burst = 10\n",
    );
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let fast = create(&cluster, "r-fast", Role::Operator, 0).await;
    let other = create(&cluster, "r-other", Role::Operator, 0).await;
    let mut person = person_client(&cluster, leader);

    let mut accepted = 0;
    let mut limited = 0;
    let started = std::time::Instant::now();
    for _ in 0..40 {
        match call(&mut person, "Put", Some(&fast)).await {
            Ok(()) => accepted += 1,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(e.message().contains("rate limit"), "{e}");
                limited += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst, plus what the rate refilled while the loop ran.
    let allowed = 10.0 + 5.0 * elapsed;
    assert!(
        limited > 0,
        "40 writes in {elapsed:.2} s were never limited"
    );
    assert!(
        f64::from(accepted) <= allowed + 1.0,
        "{accepted} accepted in {elapsed:.2} s; the limit allows {allowed:.1}"
    );
    // Reads are not limited, other tokens have their own bucket, nodes none.
    call(&mut person, "Get", Some(&fast))
        .await
        .expect("reads are not limited");
    call(&mut person, "Put", Some(&other))
        .await
        .expect("another token's bucket is full");
    let mut node = cluster.client(leader);
    for _ in 0..30 {
        call(&mut node, "Put", None)
            .await
            .expect("nodes are not limited");
    }
    // The refusals are counted on /metrics.
    let viewer = create(&cluster, "r-viewer", Role::Viewer, 0).await;
    let (_, metrics) =
        kiln_tests::http_get(&cluster.http_addr(leader), "/metrics", Some(&viewer)).await;
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_rate_limited_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("kiln_rate_limited_total on /metrics");
    assert_eq!(counted, limited, "{metrics}");
    cluster.assert_healthy();
}
