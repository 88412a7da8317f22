//! Each connection limit reached once, with its documented answer (docs/protocol.md
//! section 9): 503 at max_connections and max_connections_per_ip (addresses from trusted
//! proxies' X-Forwarded-For), 429 past connect_rate_per_ip, close 4005 past
//! max_commands_per_second, and the header read timeout.

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{eventually, http_get, TestServer, PATIENCE};

/// Sends an upgrade request (with `headers`) and returns the status, the response head and
/// the open socket.
async fn upgrade(server: &TestServer, headers: &str) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(server.ws_addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(n, 1, "the server closed before answering");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, stream)
}

#[tokio::test]
async fn max_connections_answers_503_until_a_place_frees() {
    let server = TestServer::start(&[("max_connections", "2")]).await;
    let first = server.user("a", json!({})).await;
    let (status, _, _second) = upgrade(&server, "").await;
    assert_eq!(status, 101);
    let (status, head, _) = upgrade(&server, "").await;
    assert_eq!(status, 503);
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    drop(first);
    eventually("the place is given back", || async {
        upgrade(&server, "").await.0 == 101
    })
    .await;
}

#[tokio::test]
async fn per_address_limit_believes_forwarded_for_only_from_trusted_proxies() {
    let server = TestServer::start(&[
        ("max_connections_per_ip", "1"),
        ("trusted_proxies", "127.0.0.0/8"),
    ])
    .await;
    let (status, _, _ann) = upgrade(&server, "X-Forwarded-For: 1.1.1.1\r\n").await;
    assert_eq!(status, 101);
    let (status, _, _) = upgrade(&server, "X-Forwarded-For: 1.1.1.1\r\n").await;
    assert_eq!(status, 503);
    // What a client writes itself in front is not believed: the proxy's hop counts.
    let (status, _, _) = upgrade(&server, "X-Forwarded-For: 9.9.9.9, 1.1.1.1\r\n").await;
    assert_eq!(status, 503);
    let (status, _, _bob) = upgrade(&server, "X-Forwarded-For: 2.2.2.2\r\n").await;
    assert_eq!(status, 101);

    // The peer is not a trusted proxy here: its own address counts, whatever it forwards.
    let direct = TestServer::start(&[("max_connections_per_ip", "1")]).await;
    let (status, _, _one) = upgrade(&direct, "X-Forwarded-For: 1.1.1.1\r\n").await;
    assert_eq!(status, 101);
    let (status, _, _) = upgrade(&direct, "X-Forwarded-For: 2.2.2.2\r\n").await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn connection_attempts_past_the_rate_get_429() {
    // One attempt per second per address (a burst of one): the second, right after, is refused.
    let server = TestServer::start(&[("connect_rate_per_ip", "1")]).await;
    let (first, _, _a) = upgrade(&server, "").await;
    let (second, head, _) = upgrade(&server, "").await;
    assert_eq!((first, second), (101, 429), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
}

#[tokio::test]
async fn commands_past_the_rate_close_4005() {
    let server = TestServer::start(&[("max_commands_per_second", "5")]).await;
    let mut client = server.user("a", json!({})).await;
    // The burst is 10 (the connect took one); 30 at once overflow it.
    for id in 2..32 {
        client.send(json!({"id": id, "op": "ping"})).await;
    }
    let (code, reason) = client.closed().await;
    assert_eq!(code, 4005);
    assert_eq!(reason, "too many commands (max_commands_per_second)");
    // Counted as a disconnect with its code.
    eventually("the 4005 is counted", || async {
        http_get(server.admin, "/metrics")
            .await
            .1
            .contains(r#"sidecast_disconnects_total{code="4005"} 1"#)
    })
    .await;
}

#[tokio::test]
async fn headers_not_sent_within_header_read_timeout_close_the_socket() {
    let server = TestServer::start(&[("header_read_timeout", "200ms")]).await;
    let mut stream = TcpStream::connect(server.ws_addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    // The server gives up on the request: the socket ends (hyper may answer 408 first).
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the socket")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// A socket still sending its upgrade headers holds a place like an upgraded one: sockets
/// that never finish their headers cannot hold memory past max_connections. Past the limit,
/// the 503 is written as soon as the connection is accepted.
#[tokio::test]
async fn sockets_before_their_upgrade_count_against_max_connections() {
    let server =
        TestServer::start(&[("max_connections", "3"), ("header_read_timeout", "60s")]).await;
    let mut pending = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(server.ws_addr).await.unwrap();
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        pending.push(stream);
    }
    eventually("the pending sockets hold every place", || async {
        upgrade(&server, "").await.0 == 503
    })
    .await;
    // A socket that has not sent a byte is answered too.
    let mut silent = TcpStream::connect(server.ws_addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, silent.read_to_end(&mut answer))
        .await
        .expect("answered and closed at once")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(
        answer.ends_with("the server is at max_connections\n"),
        "{answer}"
    );
    pending.pop();
    eventually("the place is given back", || async {
        upgrade(&server, "").await.0 == 101
    })
    .await;
}

/// The upgrade's headers are bounded (32 KiB): more is refused with 431 at once, instead of
/// being held until header_read_timeout.
#[tokio::test]
async fn headers_past_their_bound_are_refused_at_once() {
    let server = TestServer::start(&[("header_read_timeout", "60s")]).await;
    let mut stream = TcpStream::connect(server.ws_addr).await.unwrap();
    let mut request = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    request.resize(request.len() + 100_000, b'a');
    // The server may stop reading (and reset the socket) once it has answered.
    let _ = stream.write_all(&request).await;
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut answer))
        .await
        .expect("answered at once, not at header_read_timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}
