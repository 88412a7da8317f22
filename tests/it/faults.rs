//! Faults of a client's or a backend's path caused for real: a client that vanishes without
//! a FIN (its network link taken down, so nothing it sent or would send reaches the node,
//! and nothing the node sends reaches it), a backend that vanishes the same way, and a
//! backend that opens its event stream and never reads it.

use std::process::Stdio;

use serde_json::json;
use sidecast::config::Config;
use sidecast::pb::EventKind;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::events::{disconnect, kind, Member};
use crate::support::{token, KillOnDrop, Netns, TestServer, PATIENCE, SECRET};

/// A WebSocket client in Python's standard library: upgrade, `connect` with the token in
/// argv[2], print "connected" once the node says so, then read and never answer (the
/// heartbeat's pings go unanswered once the link is down anyway).
const CLIENT: &str = r#"
import base64, os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
assert b" 101 " in head, head
payload = ('{"id":1,"op":"connect","token":"%s"}' % sys.argv[2]).encode()
mask = os.urandom(4)
masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
s.sendall(bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask + masked)
seen = b""
while b'"type":"connected"' not in seen:
    seen += s.recv(4096)
print("connected", flush=True)
while s.recv(4096):
    pass
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_without_a_fin_is_closed_by_the_heartbeat() {
    let net = Netns::new("hoc");
    let overrides = [
        ("token_hmac_secret".to_string(), SECRET.to_string()),
        ("ping_interval".to_string(), "300ms".to_string()),
        ("pong_timeout".to_string(), "300ms".to_string()),
    ];
    let config = Config::from_layers(None, &[], &overrides).unwrap();
    let server = TestServer::start_config_on(config, &net.near_ip).await;
    let mut ends = Member::join(&server, "ends", &[EventKind::Disconnect], 0).await;
    let ws = format!("{}:{}", net.near_ip, server.ws_addr.port());
    let child = net
        .exec("python3")
        .args(["-c", CLIENT, &ws, &token("far", json!({}))])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 in the namespace");
    let mut child = KillOnDrop(Some(child));
    let stdout = child.0.as_mut().unwrap().stdout.take().unwrap();
    let mut lines = BufReader::new(tokio::process::ChildStdout::from_std(stdout).unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the client connects in time")
        .unwrap();
    assert_eq!(line.as_deref(), Some("connected"));
    let connected = server
        .grpc()
        .await
        .info(sidecast::pb::InfoRequest {})
        .await
        .unwrap();
    assert_eq!(connected.into_inner().connections, 1);

    // The link goes down: no FIN, no reset, nothing more in either direction.
    net.link("down");
    let started = std::time::Instant::now();
    let event = ends.next_acked().await;
    assert_eq!(event.user, "far");
    assert_eq!(
        disconnect(&event),
        (4007, "no pong within pong_timeout".into())
    );
    // Reported, not asserted: timings are for benchmarks. The bound is ping_interval +
    // pong_timeout, plus the close handshake's wait for an answer that cannot come.
    eprintln!("half-open client ended after {:?}", started.elapsed());
    crate::support::eventually("the node forgets the connection", || async {
        let info = server
            .grpc()
            .await
            .info(sidecast::pb::InfoRequest {})
            .await
            .unwrap();
        info.into_inner().connections == 0
    })
    .await;
}

/// A backend's event stream in Python's grpcio, without generated stubs: argv[2] is the
/// encoded EventsRequest (a join), sent as raw bytes; prints "joined" at the first
/// response, then "event" at each one, and never acknowledges or half-closes.
const MEMBER: &str = r#"
import sys, threading, grpc
channel = grpc.insecure_channel(sys.argv[1])
events = channel.stream_stream("/sidecast.v1.Control/Events",
    request_serializer=lambda b: b, response_deserializer=lambda b: b)
def requests():
    yield bytes.fromhex(sys.argv[2])
    threading.Event().wait()
responses = events(requests())
next(responses)
print("joined", flush=True)
for _ in responses:
    print("event", flush=True)
"#;

/// A backend that vanishes without a FIN (its veth link taken down) is found by the
/// control API's HTTP/2 keepalive: its connection is closed, its event stream leaves the
/// group, and the events it held go to the group's other member, marked redelivered, long
/// before `events_ack_timeout` (30 s) could have moved them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_vanishes_without_a_fin_is_found_by_the_keepalive() {
    const CLIENTS: usize = 16;
    let net = Netns::new("hod");
    let overrides = [
        ("token_hmac_secret".to_string(), SECRET.to_string()),
        ("grpc_keepalive_interval".to_string(), "300ms".to_string()),
        ("grpc_keepalive_timeout".to_string(), "300ms".to_string()),
    ];
    let config = Config::from_layers(None, &[], &overrides).unwrap();
    let server = TestServer::start_config_hosts(config, "127.0.0.1", &net.near_ip).await;
    let port = server.grpc_url.rsplit(':').next().unwrap().to_string();
    let join = sidecast::pb::EventsRequest {
        request: Some(sidecast::pb::events_request::Request::Join(
            sidecast::pb::Join {
                group: "g".into(),
                kinds: vec![EventKind::Connect as i32],
                rpc_methods: vec![],
                window: 0,
            },
        )),
    };
    let join: String = prost::Message::encode_to_vec(&join)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let python = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/backends/python/.venv/bin/python"
    );
    assert!(
        std::path::Path::new(python).exists(),
        "{python}: the examples' Python venv (scripts/test makes it)"
    );
    let child = net
        .exec(python)
        .args(["-c", MEMBER, &format!("{}:{port}", net.near_ip), &join])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ip netns exec");
    let mut child = KillOnDrop(Some(child));
    let stdout = child.0.as_mut().unwrap().stdout.take().unwrap();
    let mut lines = BufReader::new(tokio::process::ChildStdout::from_std(stdout).unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the backend joins in time")
        .unwrap();
    assert_eq!(line.as_deref(), Some("joined"));
    let grpc_url = server.grpc_url.clone();
    let mut peer = Member::join_at(&grpc_url, "g", &[EventKind::Connect], 0, &[]).await;

    // The clients' connects are spread over both members; wait for the far one's share.
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(server.user(&format!("u{i}"), json!({})).await);
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut held_far = 0;
    while seen.len() + held_far < CLIENTS {
        tokio::select! {
            // Reading is cancel-safe, acknowledging in the middle of it would not be.
            event = peer.next() => {
                peer.ack(&[event.seq]).await;
                seen.insert(event.client);
            }
            line = lines.next_line() => {
                assert_eq!(line.unwrap().as_deref(), Some("event"));
                held_far += 1;
            }
        }
    }
    assert!(held_far > 0, "all {CLIENTS} connects went to one member");

    net.link("down");
    let mut redelivered = 0;
    while seen.len() < CLIENTS {
        let event = peer.next_acked().await;
        redelivered += usize::from(event.redelivered);
        seen.insert(event.client);
    }
    assert_eq!(redelivered, held_far, "what the vanished backend held");
}

/// A backend that opens its event stream and then never reads it holds back nobody: another
/// group and the group's other member get every event, the silent member is dropped at
/// `events_ack_timeout` (its stream, once read, ends ABORTED), and the events it held go
/// to the other member, marked redelivered. The silent member's connection has HTTP/2's
/// default 64 KiB receive window and the events carry 2 KB of `info` each, so what it holds
/// is more than its window: its stream is blocked at the transport, not only unread.
#[tokio::test]
async fn a_member_that_never_reads_its_stream_holds_back_nobody() {
    const CLIENTS: usize = 150;
    let server = TestServer::start(&[("events_ack_timeout", "1s")]).await;
    let (kinds, url) = ([EventKind::Connect], &server.grpc_url);
    let mut silent = Member::join_windowed(url, "g", &kinds, 0, &[], Some(65_535)).await;
    let mut peer = Member::join(&server, "g", &[EventKind::Connect], 0).await;
    let mut other = Member::join(&server, "h", &[EventKind::Connect], 0).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let info = json!({"info": {"pad": "x".repeat(2000)}});
        clients.push(server.user(&format!("u{i}"), info).await);
    }
    let ids: std::collections::BTreeSet<String> =
        clients.iter().map(|c| c.client_id.clone()).collect();

    let mut in_order = Vec::new();
    for _ in 0..CLIENTS {
        let event = other.next_acked().await;
        assert_eq!(kind(&event), "connect");
        in_order.push(event.seq);
    }
    assert_eq!(in_order, (1..=CLIENTS as u64).collect::<Vec<_>>());

    let mut seen = std::collections::BTreeSet::new();
    let mut redelivered = 0;
    while seen.len() < CLIENTS {
        let event = peer.next_acked().await;
        redelivered += usize::from(event.redelivered);
        seen.insert(event.client);
    }
    assert_eq!(seen, ids, "every client's connect, the silent member's too");
    assert!(
        redelivered * 2000 > 64 * 1024,
        "the silent member held {redelivered}"
    );

    let mut read = 0;
    let end = loop {
        match silent.next_or_end().await {
            Ok(Some(_)) => read += 1,
            other => break other,
        }
    };
    assert!(read <= redelivered, "{read} > {redelivered}");
    let status = end.expect_err("dropped with a status");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
}
