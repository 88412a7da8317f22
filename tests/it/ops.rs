//! Operations: gRPC health checking and server reflection through real clients (the
//! tonic-health and tonic-reflection generated clients).

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1 as reflection;
use tonic_reflection::pb::v1alpha as reflection_alpha;

use serde_json::json;

use crate::support::{eventually, http_get, http_status, publish, sample, TestServer, PATIENCE};

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn health_is_open_even_with_an_api_key_and_turns_not_serving_on_drain() {
    let server = TestServer::start(&[("api_key", "k3y")]).await;
    let mut health = HealthClient::new(channel(&server).await);
    for service in ["", "sidecast.v1.Control"] {
        let status = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health.check(check("nope.Service")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // A watcher sees the drain, then its stream ends so the server can stop.
    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stop = tokio::spawn(server.stop());
    let next = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("a status in time")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    loop {
        match tokio::time::timeout(PATIENCE, watch.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(_) => break,
            Err(_) => panic!("the watch stream did not end"),
        }
    }
    tokio::time::timeout(PATIENCE, stop)
        .await
        .expect("the node stops")
        .unwrap();
}

async fn list_v1(server: &TestServer, key: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    let mut client =
        reflection::server_reflection_client::ServerReflectionClient::new(channel(server).await);
    let request = reflection::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            reflection::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut call = tonic::Request::new(tokio_stream::iter([request]));
    if let Some(key) = key {
        call.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let mut responses = client.server_reflection_info(call).await?.into_inner();
    let response = responses.next().await.expect("a response")?;
    match response.message_response {
        Some(reflection::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_the_services_and_describes_control() {
    let server = TestServer::start(&[]).await;
    let services = list_v1(&server, None).await.unwrap();
    for want in [
        "sidecast.v1.Control",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(services.iter().any(|s| s == want), "{want} in {services:?}");
    }
    // v1alpha, for older grpcurl: the file that declares Control.
    let mut client = reflection_alpha::server_reflection_client::ServerReflectionClient::new(
        channel(&server).await,
    );
    let request = reflection_alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            reflection_alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "sidecast.v1.Control".into(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(
        reflection_alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(
            files,
        ),
    ) = response.message_response
    else {
        panic!("expected a file descriptor");
    };
    let file: tonic_reflection::pb::v1alpha::FileDescriptorResponse = files;
    let text = String::from_utf8_lossy(&file.file_descriptor_proto[0]).to_string();
    assert!(text.contains("sidecast/v1/control.proto"), "{text}");
    assert!(text.contains("Publish"));
}

#[tokio::test]
async fn reflection_needs_the_api_key_when_one_is_set() {
    let server = TestServer::start(&[("api_key", "k3y")]).await;
    let refused = list_v1(&server, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let wrong = list_v1(&server, Some("nope")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let services = list_v1(&server, Some("k3y")).await.unwrap();
    assert!(services.iter().any(|s| s == "sidecast.v1.Control"));
}

async fn scrape(server: &TestServer) -> String {
    let (status, body) = http_get(server.admin, "/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let server = TestServer::start_with_file(Some("[namespaces.room]\npublic = true\n"), &[]).await;
    let mut a = server.user("a", json!({})).await;
    let mut b = server.user("b", json!({})).await;
    a.subscribe(2, "room:x").await;
    b.subscribe(2, "room:x").await;
    let mut grpc = server.grpc().await;
    for i in 0..3 {
        grpc.publish(publish("room:x", &i.to_string()))
            .await
            .unwrap();
    }
    for client in [&mut a, &mut b] {
        for _ in 0..3 {
            assert_eq!(client.recv().await["type"], "pub");
        }
    }
    let refused = grpc
        .publish(publish("bad channel!", "1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let reply = a.request(json!({"id": 9, "op": "dance"})).await;
    assert_eq!(reply["error"]["code"], "bad_request");
    a.send_raw(tokio_tungstenite::tungstenite::Message::Close(None))
        .await;
    let closed = r#"sidecast_disconnects_total{code="1000"}"#;
    eventually("a's disconnect is counted", || async {
        sample(&scrape(&server).await, closed) == Some(1.0)
    })
    .await;
    let text = scrape(&server).await;
    let expect = [
        ("sidecast_up", 1.0),
        ("sidecast_connections", 1.0),
        ("sidecast_users", 1.0),
        ("sidecast_channels", 1.0),
        ("sidecast_subscriptions", 1.0),
        ("sidecast_connects_total", 2.0),
        ("sidecast_publications_total", 3.0),
        ("sidecast_deliveries_total", 6.0),
        // a: connect, subscribe, dance; b: connect, subscribe.
        ("sidecast_messages_received_total", 5.0),
        // a: connected, reply, 3 pubs, error, close; b: connected, reply, 3 pubs.
        ("sidecast_messages_sent_total", 12.0),
        (r#"sidecast_command_errors_total{code="bad_request"}"#, 1.0),
        (r#"sidecast_command_errors_total{code="forbidden"}"#, 0.0),
        (
            r#"sidecast_grpc_requests_total{method="/sidecast.v1.Control/Publish",code="OK"}"#,
            3.0,
        ),
        (
            r#"sidecast_grpc_requests_total{method="/sidecast.v1.Control/Publish",code="InvalidArgument"}"#,
            1.0,
        ),
        ("sidecast_fanout_seconds_count", 3.0),
        (r#"sidecast_fanout_seconds_bucket{le="+Inf"}"#, 3.0),
        ("sidecast_slow_consumer_closes_total", 0.0),
        ("sidecast_event_groups", 0.0),
    ];
    for (name, value) in expect {
        assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
    }
    assert!(sample(&text, "sidecast_bytes_sent_total").unwrap() > 100.0);
    // Each write carries at least one frame; frames queued together share one.
    let writes = sample(&text, "sidecast_socket_writes_total").unwrap();
    assert!(
        (1.0..=12.0).contains(&writes),
        "{writes} writes for 12 frames"
    );
    assert!(text.contains("# TYPE sidecast_fanout_seconds histogram"));
}

fn upgrade_request(origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n"
    )
}

#[tokio::test]
async fn origins_outside_allowed_origins_get_403() {
    let server = TestServer::start(&[(
        "allowed_origins",
        "https://app.example.com,https://*.example.org",
    )])
    .await;
    for (origin, status) in [
        (Some("https://evil.example.net"), 403),
        (Some("https://app.example.com.evil.io"), 403),
        (Some("https://example.org"), 403),
        (Some("https://app.example.com"), 101),
        (Some("https://a.b.example.org"), 101),
        (None, 101),
    ] {
        let got = http_status(server.ws_addr, &upgrade_request(origin)).await;
        assert_eq!(got, status, "{origin:?}");
    }
    // Without the setting, any origin upgrades.
    let open = TestServer::start(&[]).await;
    let got = http_status(
        open.ws_addr,
        &upgrade_request(Some("https://evil.example.net")),
    )
    .await;
    assert_eq!(got, 101);
}

#[tokio::test]
async fn shutdown_closes_with_1001_paced_over_the_drain_window() {
    let server = TestServer::start(&[("drain_window", "1s")]).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(server.user(&format!("u{i}"), json!({})).await);
    }
    let stop = tokio::spawn(server.stop());
    let closes = futures_util::future::join_all(clients.iter_mut().map(|c| async {
        let closed = c.closed().await;
        (closed, std::time::Instant::now())
    }))
    .await;
    for ((code, reason), _) in &closes {
        assert_eq!((*code, reason.as_str()), (1001, "server shutting down"));
    }
    // Ten batches 100 ms apart (never closer): the last close comes at least 0.9 s after the
    // first, minus what delivery jitter can take off.
    let first = closes.iter().map(|(_, t)| *t).min().unwrap();
    let last = closes.iter().map(|(_, t)| *t).max().unwrap();
    assert!(
        last - first >= std::time::Duration::from_millis(800),
        "closes spread over {:?}",
        last - first
    );
    stop.await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_within_the_timeout_despite_an_unresponsive_client_and_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&[("shutdown_timeout", "2s"), ("drain_window", "500ms")]).await;
    // A backend that never acknowledges: the disconnect events stay unacknowledged.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(sidecast::pb::EventsRequest {
        request: Some(sidecast::pb::events_request::Request::Join(
            sidecast::pb::Join {
                group: "stuck".into(),
                kinds: vec![sidecast::pb::EventKind::Disconnect as i32],
                rpc_methods: vec![],
                window: 0,
            },
        )),
    })
    .await
    .unwrap();
    let mut events = server
        .grpc()
        .await
        .events(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // A client that connects, then never reads again (nor answers the close).
    let mut raw = tokio::net::TcpStream::connect(server.ws_addr)
        .await
        .unwrap();
    raw.write_all(upgrade_request(None).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[9..12], b"101");
    let token = crate::support::token("mute", json!({}));
    let connect = json!({"id": 1, "op": "connect", "token": token}).to_string();
    let mut frame = vec![0x81, 0xFE];
    frame.extend_from_slice(&(connect.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // a zero mask leaves the payload as it is
    frame.extend_from_slice(connect.as_bytes());
    raw.write_all(&frame).await.unwrap();
    let mut responsive = server.user("talks", json!({})).await;
    eventually("both connections are registered", || async {
        let text = http_get(server.admin, "/metrics").await.1;
        sample(&text, "sidecast_connections") == Some(2.0)
    })
    .await;

    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("the node stops despite them");
    assert_eq!(responsive.closed().await.0, 1001);
    // The stuck backend's stream has ended too, after its unacknowledged disconnects.
    loop {
        match tokio::time::timeout(PATIENCE, events.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(_) => break,
            Err(_) => panic!("the event stream did not end"),
        }
    }
    drop(raw);
}
