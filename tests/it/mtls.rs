//! Identity and TLS: who may do what is decided by the client certificate.

use std::time::Duration;

use outpost::proto::{
    agent_message, ingest_client::IngestClient, query_client::QueryClient, AgentMessage, Hello,
    ListNodesRequest,
};
use outpost::tls::{self, Identity, PkiLayout, TlsFiles};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

use crate::harness::{Aggregator, World};

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

fn client_tls(pki: &PkiLayout, stem: &str) -> ClientTlsConfig {
    TlsFiles {
        ca: pki.ca_cert(),
        cert: pki.cert(stem),
        key: pki.key(stem),
        crl: None,
    }
    .client_config("localhost")
    .unwrap()
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
