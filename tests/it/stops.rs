//! The `sidecast` process stopping for real, under load: SIGTERM while clients receive, a
//! publisher publishes and a backend consumes events; SIGKILL, then a restart on the same
//! addresses.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use serde_json::{json, Value};
use sidecast::pb::{self, EventKind};

use crate::events::{disconnect, kind, Member};
use crate::support::{eventually, free_port, publish, token, Client, KillOnDrop, SECRET};

const HISTORY: &str = "[namespaces.load]\nhistory_size = 10000\nhistory_ttl = \"5m\"\n";

/// A `sidecast` process on fixed loopback ports, with the test secret and `HISTORY`.
struct Node {
    child: KillOnDrop,
    ports: (u16, u16, u16),
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(ports: (u16, u16, u16), settings: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sidecast.toml");
        std::fs::write(&file, HISTORY).unwrap();
        let (ws, grpc, admin) = ports;
        let mut command = Command::new(env!("CARGO_BIN_EXE_sidecast"));
        command
            .args(["--config", file.to_str().unwrap()])
            .args(["--ws-addr", &format!("127.0.0.1:{ws}")])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--set", &format!("token_hmac_secret={SECRET}")]);
        for setting in settings {
            command.args(["--set", setting]);
        }
        let child = command
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        eventually("the binary serves /readyz", || async move {
            tokio::net::TcpStream::connect(admin_addr).await.is_ok()
        })
        .await;
        Node {
            child: KillOnDrop(Some(child)),
            ports,
            _dir: dir,
        }
    }

    fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.1)
    }

    async fn client(&self, user: &str) -> Client {
        let token = token(user, json!({"channels": ["load:*"]}));
        Client::open(&format!("ws://127.0.0.1:{}/ws?token={token}", self.ports.0)).await
    }

    async fn control(&self) -> pb::control_client::ControlClient<tonic::transport::Channel> {
        pb::control_client::ControlClient::connect(self.grpc_url())
            .await
            .unwrap()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.0.as_ref().unwrap().id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (within the usual patience); its exit status.
    async fn exited(mut self) -> std::process::ExitStatus {
        let mut child = self.child.0.take().unwrap();
        let waiting = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + crate::support::PATIENCE;
            while std::time::Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    return status;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not exit in time");
        });
        waiting.await.unwrap()
    }
}

/// The offsets of the `pub` messages among `messages`, in order.
fn offsets(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .filter(|m| m["type"] == "pub")
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

/// SIGTERM while 40 clients receive a stream of publications, a publisher keeps publishing
/// and a backend consumes disconnect events: every client gets every publication
/// acknowledged before the signal and then the rest without a gap, then 1001; every
/// publication is answered (OK or an error status, never a hang); the backend gets one 1001
/// disconnect per client and then the documented end of its stream; the process exits 0.
#[tokio::test]
async fn sigterm_under_load_delivers_or_refuses_and_closes_every_client_1001() {
    const CLIENTS: usize = 40;
    let ports = (free_port(), free_port(), free_port());
    let node = Node::start(ports, &["drain_window=500ms", "shutdown_timeout=5s"]).await;
    let mut member =
        Member::join_at(&node.grpc_url(), "drain", &[EventKind::Disconnect], 0, &[]).await;
    let mut readers = Vec::new();
    for i in 0..CLIENTS {
        let mut client = node.client(&format!("u{i}")).await;
        assert_eq!(client.recv().await["type"], "connected");
        let reply = client.subscribe(1, "load:feed").await;
        assert_eq!(reply["result"]["offset"], 0, "{reply}");
        // The clock runs from here, through the publishing before the signal and the drain.
        let deadline = tokio::time::Instant::now() + 3 * crate::support::PATIENCE;
        readers.push(tokio::spawn(async move {
            client.drain_until_close_by(deadline).await
        }));
    }

    // The backend acknowledges each disconnect as it comes, until its stream ends.
    let consumer = tokio::spawn(async move {
        let mut closes = 0;
        let end = loop {
            match member.next_or_end().await {
                Ok(Some(event)) => {
                    assert_eq!(kind(&event), "disconnect");
                    assert_eq!(disconnect(&event).0, 1001, "{event:?}");
                    member.ack(&[event.seq]).await;
                    closes += 1;
                }
                other => break other,
            }
        };
        (closes, end)
    });

    // Publishes in order until refused; the offsets acknowledged, and how it ended.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let publisher = {
        let mut control = node.control().await;
        let acknowledged = acknowledged.clone();
        tokio::spawn(async move {
            for n in 1u64.. {
                let call = control.publish(publish("load:feed", &format!(r#"{{"n":{n}}}"#)));
                let answer = tokio::time::timeout(crate::support::PATIENCE, call)
                    .await
                    .expect("every publication is answered");
                match answer {
                    Ok(response) => {
                        assert_eq!(response.into_inner().offset, n, "in order, no gap");
                        acknowledged.store(n, SeqCst);
                    }
                    Err(status) => return status,
                }
            }
            unreachable!()
        })
    };
    eventually("publications flowing", || {
        let acknowledged = acknowledged.clone();
        async move { acknowledged.load(SeqCst) >= 200 }
    })
    .await;
    let before = acknowledged.load(SeqCst);
    node.signal("-TERM");

    for reader in readers {
        let (messages, code) = reader.await.unwrap();
        assert_eq!(code, 1001);
        let got = offsets(&messages);
        let expected: Vec<u64> = (1..=got.len() as u64).collect();
        assert_eq!(got, expected, "from the first publication, without a gap");
        assert!(got.len() as u64 >= before, "{} < {before}", got.len());
    }
    let refused = publisher.await.unwrap();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{refused:?}"
    );

    let (closes, end) = consumer.await.unwrap();
    assert_eq!(closes, CLIENTS);
    let status = end.expect_err("the stream ends with a status");
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unavailable, "the server is shutting down")
    );
    assert!(node.exited().await.success());
}

/// SIGKILL, then the same addresses again: a client's socket ends without a close (its
/// library reports 1006) and, reconnecting, is told its position is gone (`recovered:
/// false` with the new epoch, and `unrecoverable_position` from history); an idempotency
/// key publishes again; the backend's group starts over (`resumed: false`).
#[tokio::test]
async fn sigkill_then_restart_tells_clients_their_position_is_gone() {
    let ports = (free_port(), free_port(), free_port());
    let node = Node::start(ports, &[]).await;
    let mut member = Member::join_at(&node.grpc_url(), "g", &[EventKind::Connect], 0, &[]).await;
    let mut client = node.client("ann").await;
    assert_eq!(client.recv().await["type"], "connected");
    let first = client.subscribe(1, "load:feed").await["result"].clone();
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let mut control = node.control().await;
    let mut keyed = publish("load:feed", r#"{"n":1}"#);
    keyed.idempotency_key = "order-1".into();
    control.publish(keyed.clone()).await.unwrap();
    for n in 2..=3 {
        control
            .publish(publish("load:feed", &format!(r#"{{"n":{n}}}"#)))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let message = client.recv().await;
        got.extend(offsets(&[message]));
    }
    assert_eq!(got, [1, 2, 3]);
    assert_eq!(kind(&member.next().await), "connect");

    node.signal("-KILL");
    let (_, close) = client.count_until_end().await;
    assert_eq!(close, None, "no close frame: the process is gone");
    assert!(
        member.ended().await.is_err(),
        "the event stream breaks, it does not end OK"
    );
    let status = node.exited().await;
    assert!(!status.success());

    let node = Node::start(ports, &[]).await;
    let rejoined = Member::join_at(&node.grpc_url(), "g", &[EventKind::Connect], 0, &[]).await;
    assert!(
        !rejoined.joined.resumed,
        "the group's buffer died with the process"
    );
    let mut client = node.client("ann").await;
    assert_eq!(client.recv().await["type"], "connected");
    let since = json!({"offset": 3, "epoch": epoch});
    let reply = client
        .request(json!({"id": 2, "op": "subscribe", "channel": "load:feed", "since": since}))
        .await;
    let result = &reply["result"];
    assert_eq!(result["recovered"], false, "{reply}");
    assert_eq!(result["publications"], json!([]));
    assert_eq!(result["offset"], 0);
    assert_ne!(result["epoch"], json!(epoch), "a new epoch");
    let history = client
        .request(json!({"id": 3, "op": "history", "channel": "load:feed", "since": since}))
        .await;
    assert_eq!(
        history["error"]["code"], "unrecoverable_position",
        "{history}"
    );
    // Idempotency keys lived in the process too (docs/protocol.md says so).
    let mut control = node.control().await;
    let again = control.publish(keyed).await.unwrap().into_inner();
    assert_eq!(again.offset, 1);
    let message = client.recv().await;
    assert_eq!(offsets(&[message]), [1]);
}
