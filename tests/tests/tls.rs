//! Nobody gets in who does not belong: nodes speak mutual TLS, and a certificate
//! from another CA opens nothing.

use std::time::Duration;

use kiln_common::tls::{endpoint, TlsMaterial};
use kiln_proto::v1::coordinator_client::CoordinatorClient;
use kiln_proto::v1::{NodeStatusRequest, PutRequest, RaftBatch};
use kiln_tests::{free_port, run_kiln_sync, Cluster, Proc};

const CONNECT: Duration = Duration::from_secs(2);

fn client(addr: &str, tls: Option<&TlsMaterial>) -> CoordinatorClient<tonic::transport::Channel> {
    let channel = endpoint(addr, tls, CONNECT)
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    CoordinatorClient::new(channel)
}

fn empty_batch() -> RaftBatch {
    RaftBatch {
        from_id: 9,
        from_addr: "127.0.0.1:1".into(),
        messages: Vec::new(),
        cluster_id: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_from_another_ca_opens_nothing() {
    let mut cluster = Cluster::start(3, "");
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let leader_addr = cluster.addr(leader);
    let certs = cluster.certs_dir().to_path_buf();
    let ca = certs.join("ca.pem");
    let bin = cluster.bin().to_path_buf();

    // A second CA and a node certificate from it, made the way an operator would.
    let foreign = tempfile::tempdir().expect("temp dir");
    let foreign_dir = foreign.path().display().to_string();
    run_kiln_sync(&bin, &["certs", "init", "--dir", &foreign_dir]);
    run_kiln_sync(
        &bin,
        &[
            "certs",
            "issue",
            "--dir",
            &foreign_dir,
            "--node",
            "intruder",
            "--san",
            "127.0.0.1",
        ],
    );
    let intruder = TlsMaterial::node(
        &ca,
        &foreign.path().join("intruder.pem"),
        &foreign.path().join("intruder-key.pem"),
    )
    .expect("intruder tls");

    // Raft messages with the foreign certificate: the handshake fails.
    let err = client(&leader_addr, Some(&intruder))
        .raft(empty_batch())
        .await
        .expect_err("a foreign certificate must not reach the raft transport");
    assert_ne!(err.code(), tonic::Code::Ok);

    // Raft messages with no certificate at all: refused as unauthenticated.
    let ca_only = TlsMaterial::client(&ca).expect("ca");
    let err = client(&leader_addr, Some(&ca_only))
        .raft(empty_batch())
        .await
        .expect_err("a client without a node certificate must not send raft messages");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");

    // Plaintext gets nowhere.
    let err = client(&leader_addr, None)
        .node_status(NodeStatusRequest {})
        .await
        .expect_err("plaintext must not reach a TLS coordinator");
    assert_ne!(err.code(), tonic::Code::Ok);

    // The same calls with a certificate from the cluster CA go through, so the
    // refusals above are about the certificate, not the call.
    run_kiln_sync(
        &bin,
        &[
            "certs",
            "issue",
            "--dir",
            &certs.display().to_string(),
            "--node",
            "probe",
            "--san",
            "127.0.0.1",
        ],
    );
    let member = TlsMaterial::node(&ca, &certs.join("probe.pem"), &certs.join("probe-key.pem"))
        .expect("probe tls");
    client(&leader_addr, Some(&member))
        .raft(empty_batch())
        .await
        .expect("a cluster node may send raft messages");
    // A person's client needs the CA and a token.
    let err = client(&leader_addr, Some(&ca_only))
        .put(PutRequest {
            key: "tls-ok".into(),
            value: b"1".to_vec(),
        })
        .await
        .expect_err("a put without a token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let mut put = tonic::Request::new(PutRequest {
        key: "tls-ok".into(),
        value: b"1".to_vec(),
    });
    let bearer = format!("Bearer {}", cluster.admin_token().await);
    put.metadata_mut()
        .insert("authorization", bearer.parse().expect("header value"));
    client(&leader_addr, Some(&ca_only))
        .put(put)
        .await
        .expect("a put over TLS with a token");

    // A coordinator with the foreign certificate asks to join: it never becomes a
    // member, and the cluster keeps serving.
    let data_dir = foreign.path().join("intruder-data");
    let log = foreign.path().join("intruder.log");
    let args: Vec<String> = [
        "coordinator",
        "--id",
        "9",
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--http",
        &format!("127.0.0.1:{}", free_port()),
        "--join",
        &leader_addr,
        "--tls-ca",
        &ca.display().to_string(),
        "--tls-cert",
        &foreign.path().join("intruder.pem").display().to_string(),
        "--tls-key",
        &foreign
            .path()
            .join("intruder-key.pem")
            .display()
            .to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc = Proc::spawn("intruder", &bin, &args, &log);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = cluster.node_status(leader).await.expect("leader status");
    assert!(
        !status.voters.contains(&9) && !status.learners.contains(&9),
        "a node with a foreign certificate joined: voters {:?}, learners {:?}",
        status.voters,
        status.learners
    );
    proc.kill();

    let client = cluster.cluster_client();
    client
        .call(|mut c| async move {
            c.put(PutRequest {
                key: "after-intruder".into(),
                value: b"1".to_vec(),
            })
            .await
            .map(|r| r.into_inner())
        })
        .await
        .expect("the cluster still serves writes");
    cluster.assert_healthy();
}
