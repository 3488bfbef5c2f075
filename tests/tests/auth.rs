//! Every call needs the right caller: a cluster node (by certificate) or a token
//! whose role allows it. The table below names every RPC of the Coordinator
//! service; a new RPC that is not in it fails `every_rpc_is_in_the_table`.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_common::tls::{endpoint, TlsMaterial};
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::*;
use kiln_tests::Cluster;
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
    let table: BTreeSet<&str> = TABLE.iter().map(|(name, _)| *name).collect();
    assert_eq!(rpcs, table, "every RPC needs a row saying who may call it");
}

/// Calls `method` harmlessly, with `token` as bearer when given.
async fn call(
    client: &mut CoordinatorClient<Channel>,
    method: &str,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
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
    let unique = format!("t{}", rand::random::<u32>());
    match method {
        "Raft" => client
            .raft(req(
                RaftBatch {
                    from_id: 99,
                    from_addr: "127.0.0.1:1".into(),
                    messages: Vec::new(),
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
        other => panic!("no call for {other}"),
    }
}

fn is_auth_error(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

async fn create(cluster: &Cluster, name: &str, role: Role, expires_in_ms: u64) -> String {
    cluster
        .cluster_client()
        .call(|mut c| {
            let name = name.to_string();
            async move {
                c.create_token(CreateTokenRequest {
                    name,
                    role: role as i32,
                    expires_in_ms,
                })
                .await
                .map(|r| r.into_inner())
            }
        })
        .await
        .expect("create token")
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_checks_its_caller() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.wait_for_agreement(Duration::from_secs(10)).await;
    let ca = TlsMaterial::client(&cluster.certs_dir().join("ca.pem")).expect("ca");
    let channel = endpoint(&cluster.addr(leader), Some(&ca), Duration::from_secs(2))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    // A person's connection: it trusts the CA and presents no certificate.
    let mut person = CoordinatorClient::new(channel);
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
    let forged = format!("{}0", &admin[..admin.len() - 1]);
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
            let allowed = match (need, role) {
                (Need::Node, _) | (_, None) => false,
                (Need::Read, Some(r)) => matches!(r, Role::Viewer | Role::Operator | Role::Admin),
                (Need::Write, Some(r)) => matches!(r, Role::Operator | Role::Admin),
                (Need::Admin, Some(r)) => *r == Role::Admin,
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
