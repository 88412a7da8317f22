//! Faults of a client's or a backend's path caused for real: a client that vanishes without
//! a FIN (its network link taken down, so nothing it sent or would send reaches the node,
//! and nothing the node sends reaches it), and a backend that opens its event stream and
//! never reads it.

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

/// A backend that opens its event stream and then never reads it holds back nobody: another
/// group and the group's other member get every event, the silent member is dropped at
/// `events_ack_timeout` (its stream, once read, ends ABORTED), and the events it held go
/// to the other member, marked redelivered. The events carry 2 KB of `info` each, so what
/// the silent member holds is more than HTTP/2's 64 KiB stream window: its stream is
/// blocked at the transport, not only unread.
#[tokio::test]
async fn a_member_that_never_reads_its_stream_holds_back_nobody() {
    const CLIENTS: usize = 150;
    let server = TestServer::start(&[("events_ack_timeout", "1s")]).await;
    let mut silent = Member::join(&server, "g", &[EventKind::Connect], 0).await;
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
