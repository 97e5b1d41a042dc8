//! Identity and TLS: who may do what is decided by the client certificate.

use std::time::Duration;

use outpost::proto::{
    agent_message, ingest_client::IngestClient, query_client::QueryClient, AgentMessage, Hello,
    ListNodesRequest,
};
use outpost::tls::{self, Identity, PkiLayout, TlsFiles};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

use crate::harness::{client_tls, Aggregator, World};

async fn channel(
    agg: &Aggregator,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://127.0.0.1:{}", agg.port))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).unwrap();
    }
    ep.connect().await
}

async fn list_nodes(ch: Channel) -> Result<(), tonic::Status> {
    QueryClient::new(ch)
        .list_nodes(ListNodesRequest {})
        .await
        .map(|_| ())
}

/// Opens an ingest stream whose Hello claims `claimed`; returns the status.
async fn open_stream(ch: Channel, claimed: &str) -> Result<(), tonic::Status> {
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            node_id: claimed.into(),
            network: "devnet".into(),
            chain: "ethereum".into(),
            ..Default::default()
        })),
    };
    let mut inbound = IngestClient::new(ch)
        .report(tokio_stream::iter(vec![hello]).chain(tokio_stream::pending()))
        .await?
        .into_inner();
    inbound.message().await.map(|_| ())
}

use tokio_stream::StreamExt as _;

#[tokio::test]
async fn refuses_missing_foreign_and_wrong_role_certificates() {
    tls::install_crypto_provider();
    let world = World::new();
    let agg = Aggregator::start(&world).await;
    let pki = world.pki();
    world.issue(&Identity::Agent("node-1".into()));
    world.issue(&Identity::Operator("alice".into()));

    // An operator cert works: the baseline the refusals are measured against.
    list_nodes(
        channel(&agg, Some(client_tls(&pki, "operator-alice")))
            .await
            .unwrap(),
    )
    .await
    .expect("operator may query");

    // No client certificate: Unauthenticated, saying so.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.ca_cert()).unwrap()))
        .domain_name("localhost");
    let err = list_nodes(channel(&agg, Some(no_cert)).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("no client certificate"),
        "{}",
        err.message()
    );

    // A certificate from another CA: the TLS layer refuses it.
    let other = tempfile::tempdir().unwrap();
    tls::init_pki(other.path(), &[], 1).unwrap();
    tls::issue_client(other.path(), &Identity::Operator("mallory".into()), 1).unwrap();
    let foreign = TlsFiles {
        ca: pki.ca_cert(),
        cert: PkiLayout::new(other.path()).cert("operator-mallory"),
        key: PkiLayout::new(other.path()).key("operator-mallory"),
        crl: None,
    }
    .client_config("localhost")
    .unwrap();
    let refused = match channel(&agg, Some(foreign)).await {
        Err(_) => true,
        Ok(ch) => list_nodes(ch).await.is_err(),
    };
    assert!(refused, "a foreign CA's certificate must be refused");

    // Plaintext to the TLS port: refused.
    let plain = match channel(&agg, None).await {
        Err(_) => true,
        Ok(ch) => list_nodes(ch).await.is_err(),
    };
    assert!(plain, "plaintext must be refused");

    // An agent certificate on the query API: PermissionDenied.
    let err = list_nodes(
        channel(&agg, Some(client_tls(&pki, "agent-node-1")))
            .await
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // So is reflection: grpcurl needs an operator certificate too.
    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        channel(&agg, Some(client_tls(&pki, "agent-node-1")))
            .await
            .unwrap(),
    );
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let err = refl
        .server_reflection_info(tokio_stream::iter(vec![req.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // ... and works with one, listing both services.
    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        channel(&agg, Some(client_tls(&pki, "operator-alice")))
            .await
            .unwrap(),
    );
    let mut answers = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let answer = format!("{:?}", answers.message().await.unwrap().unwrap());
    assert!(
        answer.contains("outpost.v1.Query") && answer.contains("outpost.v1.Ingest"),
        "{answer}"
    );

    // An agent whose stream claims another node id: PermissionDenied.
    let err = open_stream(
        channel(&agg, Some(client_tls(&pki, "agent-node-1")))
            .await
            .unwrap(),
        "node-2",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node-2"), "{}", err.message());

    // An operator certificate on the ingest stream: PermissionDenied.
    let err = open_stream(
        channel(&agg, Some(client_tls(&pki, "operator-alice")))
            .await
            .unwrap(),
        "alice",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The honest agent's claim is accepted (Welcome arrives).
    open_stream(
        channel(&agg, Some(client_tls(&pki, "agent-node-1")))
            .await
            .unwrap(),
        "node-1",
    )
    .await
    .expect("an agent with its own id is welcomed");

    // Every refusal is in the audit log.
    let log = std::fs::read_to_string(&agg.log).unwrap();
    for needle in [
        "refused: no client certificate",
        "refused: agent certificate on the query API",
        "refused: stream claims another node id",
    ] {
        assert!(log.contains(needle), "audit log lacks {needle:?}");
    }
}

/// Whether a query over `tls` fails: at the handshake or at the call.
async fn refused(agg: &Aggregator, tls: ClientTlsConfig) -> bool {
    match channel(agg, Some(tls)).await {
        Err(_) => true,
        Ok(ch) => list_nodes(ch).await.is_err(),
    }
}

/// Waits until the aggregator's log holds `needle` `n` times.
async fn logged(agg: &Aggregator, needle: &str, n: usize) {
    let logs = [agg.log.as_path()];
    crate::harness::wait_for(
        &format!("{n} × {needle:?} in the aggregator's log"),
        Duration::from_secs(10),
        &logs,
        || async {
            let log = std::fs::read_to_string(&agg.log).unwrap_or_default();
            (log.matches(needle).count() >= n).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn expired_early_revoked_and_odd_certificates_are_refused_and_audited() {
    use time::{Duration as Days, OffsetDateTime};
    tls::install_crypto_provider();
    let world = World::new();
    let pki = world.pki();
    let anvil = crate::harness::Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let mut q = world.query(&agg).await;
    let now = OffsetDateTime::now_utc();
    let handshake = "refused a connection: TLS handshake failed";
    let mut expected = 0;

    // Expired, and not yet valid.
    for (name, from, until) in [
        ("expired", now - Days::days(10), now - Days::days(1)),
        ("early", now + Days::days(1), now + Days::days(10)),
    ] {
        let id = Identity::Operator(name.into());
        tls::issue_client_between(&pki.dir, &id, (from, until)).unwrap();
        assert!(
            refused(&agg, client_tls(&pki, &format!("operator-{name}"))).await,
            "{name}"
        );
        expected += 1;
        logged(&agg, handshake, expected).await;
        // Refusals of one kind are logged at most once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // The aggregator's own server certificate used as a client's.
    assert!(refused(&agg, client_tls(&pki, "aggregator")).await);
    expected += 1;
    logged(&agg, handshake, expected).await;

    // Signed by the CA, but without an outpost:// identity: the TLS layer
    // lets it through, every service refuses it.
    let ca = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(pki.ca_cert()).unwrap(),
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.ca_key()).unwrap()).unwrap(),
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["nobody".into()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(pki.cert("nobody"), cert.pem()).unwrap();
    std::fs::write(pki.key("nobody"), key.serialize_pem()).unwrap();
    let err = list_nodes(
        channel(&agg, Some(client_tls(&pki, "nobody")))
            .await
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    logged(&agg, "refused: certificate has no outpost:// identity", 1).await;

    // Revoked: two agents stream; node-2's certificate is revoked and the
    // list loaded with a reload. node-2's open stream ends at the reload and
    // its next handshake is refused; node-1's stream is not dropped.
    let node1 =
        crate::harness::Agent::start(&world, "node-1", &anvil.url(), &agg, Default::default());
    let node2 =
        crate::harness::Agent::start(&world, "node-2", &anvil.url(), &agg, Default::default());
    crate::spine::wait_at_head(&mut q, &anvil, &node1, &agg).await;
    crate::spine::wait_at_head(&mut q, &anvil, &node2, &agg).await;
    let out = std::process::Command::new(crate::harness::outpost_bin())
        .args(["certs", "revoke", "agent", "node-2", "--dir"])
        .arg(&pki.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = std::fs::read_to_string(&agg.config).unwrap().replace(
        "[tls]\n",
        &format!("[tls]\ncrl = \"{}\"\n", pki.crl().display()),
    );
    std::fs::write(&agg.config, config).unwrap();
    agg.signal("HUP");
    logged(&agg, "TLS files reloaded; connections kept", 1).await;
    logged(
        &agg,
        "ending the stream of node-2: its certificate is revoked",
        1,
    )
    .await;
    let node2_log = node2.log.clone();
    let logs = [node2_log.as_path(), agg.log.as_path()];
    crate::harness::wait_for("node-2 refused", Duration::from_secs(20), &logs, || async {
        let log = std::fs::read_to_string(&node2_log).unwrap_or_default();
        log.contains("certificate is revoked").then_some(())
    })
    .await;
    logged(&agg, "Revoked", 1).await;
    anvil.mine(2).await;
    crate::spine::wait_at_head(&mut q, &anvil, &node1, &agg).await;
    let log = std::fs::read_to_string(&agg.log).unwrap();
    let node1_connects = log
        .lines()
        .filter(|l| l.contains("agent connected") && l.contains("node-1"))
        .count();
    assert_eq!(node1_connects, 1, "node-1's stream survived the reload");
}

#[tokio::test]
async fn a_certificate_near_expiry_is_a_metric_a_warning_and_a_finding() {
    use outpost::proto::{FindingKind, FindingState};
    use time::{Duration as Days, OffsetDateTime};
    let world = World::new();
    let pki = world.pki();
    let anvil = crate::harness::Anvil::start(&world, "anvil").await;
    let agg = Aggregator::start(&world).await;
    let now = OffsetDateTime::now_utc();
    let id = Identity::Agent("node-1".into());
    tls::issue_client_between(&pki.dir, &id, (now - Days::days(1), now + Days::days(3))).unwrap();
    let agent =
        crate::harness::Agent::start(&world, "node-1", &anvil.url(), &agg, Default::default());
    let q = world.query(&agg).await;
    let logs = [agent.log.as_path(), agg.log.as_path()];
    let f = crate::spine::wait_finding(
        &q,
        "node-1",
        FindingKind::CertExpiry,
        FindingState::Open,
        &logs,
    )
    .await;
    assert!(
        f.summary.contains("expires in 2 days") || f.summary.contains("expires in 3 days"),
        "{}",
        f.summary
    );
    let metrics = agg.metrics().await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("outpost_certificate_expiry_timestamp_seconds{")
                && l.contains("name=\"node-1\"")
        })
        .unwrap_or_else(|| panic!("no expiry metric for node-1: {metrics}"));
    let t: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        (t - (now + Days::days(3)).unix_timestamp()).abs() < 5,
        "{line}"
    );
    assert!(metrics.contains("role=\"ca\""), "the CA's expiry too");
    let agent_log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        agent_log.contains("this agent's certificate expires in"),
        "{agent_log}"
    );
    let audit = std::fs::read_to_string(&agg.log).unwrap();
    assert!(
        audit.contains("the certificate of agent node-1 expires in"),
        "{audit}"
    );
}
