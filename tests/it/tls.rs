//! TLS on both listeners with certificates generated at test time (rcgen): a client over
//! wss, and the control API over TLS with client certificates (mTLS).

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;
use sidecast::pb::control_client::ControlClient;
use sidecast::pb::InfoRequest;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::{eventually, http_get, sample, token, TestServer, PATIENCE};

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    client_cert: String,
    client_key: String,
}

impl Pki {
    /// A CA, a server certificate for localhost signed by it (files in `dir`), and a client
    /// certificate signed by it.
    fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("sidecast-tls-")
            .tempdir()
            .unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let client = CertificateParams::new(vec!["backend".to_string()])
            .unwrap()
            .signed_by(&client_key, &ca)
            .unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            client_cert: client.pem(),
            client_key: client_key.serialize_pem(),
            dir,
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

#[tokio::test]
async fn a_client_connects_over_wss() {
    let pki = Pki::new();
    let server = TestServer::start(&[
        ("ws_tls_cert_file", &pki.file("server.pem")),
        ("ws_tls_key_file", &pki.file("server.key")),
    ])
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server.ws_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .expect("upgrade over TLS");
    let connect = json!({"id": 1, "op": "connect", "token": token("ann", json!({}))});
    ws.send(Message::text(connect.to_string())).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let reply: serde_json::Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
    assert_eq!(reply["type"], "connected");
    assert_eq!(reply["user"], "ann");
    // What goes out over TLS is counted like plain TCP's frames.
    eventually("the reply is counted", || async {
        let text = http_get(server.admin, "/metrics").await.1;
        sample(&text, "sidecast_messages_sent_total") == Some(1.0)
            && sample(&text, "sidecast_socket_writes_total") >= Some(1.0)
    })
    .await;

    // A plain-text upgrade on the TLS port gets no WebSocket.
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.ws_addr)).await;
    assert!(plain.is_err());
}

#[tokio::test]
async fn the_control_api_over_tls_requires_a_client_certificate() {
    let pki = Pki::new();
    let server = TestServer::start(&[
        ("grpc_tls_cert_file", &pki.file("server.pem")),
        ("grpc_tls_key_file", &pki.file("server.key")),
        ("grpc_tls_client_ca_file", &pki.file("ca.pem")),
        ("header_read_timeout", "300ms"),
    ])
    .await;
    let url = server.grpc_url.replace("http://", "https://");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    // With the client certificate: served.
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(
            tls.clone()
                .identity(Identity::from_pem(&pki.client_cert, &pki.client_key)),
        )
        .unwrap()
        .connect()
        .await
        .expect("mTLS handshake");
    let mut grpc = ControlClient::new(channel);
    let info = grpc.info(InfoRequest {}).await.unwrap().into_inner();
    assert!(!info.node_id.is_empty());
    // A connection that has called stays open past header_read_timeout (the first-call
    // deadline): an event stream opened on it still receives.
    let join = sidecast::pb::EventsRequest {
        request: Some(sidecast::pb::events_request::Request::Join(
            sidecast::pb::Join {
                group: "tls".into(),
                kinds: vec![sidecast::pb::EventKind::Connect as i32],
                rpc_methods: vec![],
                window: 0,
            },
        )),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(join).await.unwrap();
    let mut events = grpc
        .events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    async fn next(
        events: &mut tonic::Streaming<sidecast::pb::EventsResponse>,
    ) -> sidecast::pb::EventsResponse {
        tokio::time::timeout(crate::support::PATIENCE, events.message())
            .await
            .expect("a response in time")
            .expect("the stream is open")
            .expect("a response")
    }
    next(&mut events).await; // joined
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let _ann = server.user("ann", serde_json::json!({})).await;
    let event = next(&mut events).await;
    assert!(
        matches!(
            event.response,
            Some(sidecast::pb::events_response::Response::Event(_))
        ),
        "{event:?}"
    );
    // Without one: no call gets through.
    let refused = match Channel::from_shared(url)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => ControlClient::new(channel)
            .info(InfoRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_reported_at_start() {
    let pki = Pki::new();
    let other_key = pki.dir.path().join("other.key");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let other_key = other_key.to_str().unwrap().to_string();
    for (cert_key, key_key) in [
        ("grpc_tls_cert_file", "grpc_tls_key_file"),
        ("ws_tls_cert_file", "ws_tls_key_file"),
    ] {
        let config = sidecast::config::Config::from_layers(
            None,
            &[],
            &[
                (cert_key.to_string(), pki.file("server.pem")),
                (key_key.to_string(), other_key.clone()),
            ],
        )
        .unwrap();
        let error = sidecast::tls::grpc_config(&config)
            .err()
            .or_else(|| sidecast::tls::ws_acceptor(&config).err())
            .expect("refused");
        assert_eq!(error.key, key_key, "{error}");
    }
    // A client CA file without a certificate.
    let empty = pki.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let config = sidecast::config::Config::from_layers(
        None,
        &[],
        &[
            ("grpc_tls_cert_file".into(), pki.file("server.pem")),
            ("grpc_tls_key_file".into(), pki.file("server.key")),
            (
                "grpc_tls_client_ca_file".into(),
                empty.to_str().unwrap().into(),
            ),
        ],
    )
    .unwrap();
    let error = sidecast::tls::grpc_config(&config).expect_err("refused");
    assert_eq!(error.key, "grpc_tls_client_ca_file", "{error}");
}
